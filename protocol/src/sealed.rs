//! Sealing bytes to one worker: ChaCha20-Poly1305 (RFC 8439) under a key
//! derived from the worker's frame secret, so what is sealed can be read
//! only by that worker (and the conductor), whatever carries it.
//!
//! Used for service manifests, which carry the services' secrets: the
//! conductor answers `GET /api/v1/agent/sealed-manifests/{name}/{version}`
//! with the manifest bytes sealed under [`manifest_context`], and the worker
//! opens them before checking the command's digest. A plain-HTTP link, a
//! TLS-terminating proxy that logs bodies or a packet capture then sees
//! only ciphertext.
//!
//! ```text
//! +------+------------------+----------------------+-----------------+
//! | 01   | nonce (12 bytes) | ciphertext (n bytes) | tag (16 bytes)  |
//! +------+------------------+----------------------+-----------------+
//! key = HMAC-SHA256(worker secret, "aerekos seal v1")   (32 bytes)
//! ChaCha20-Poly1305(key, nonce, aad = context, plaintext) -> ciphertext ‖ tag
//! ```
//!
//! The context is authenticated but not sent: opening with another context
//! (another worker, service or version) fails like a wrong key or a flipped
//! bit ([`SealError::BadTag`]), so sealed bytes cannot be replayed to another
//! worker or as another manifest. The caller supplies the nonce (random, from
//! the OS: 96 random bits per message is safe for far more messages than one
//! worker's key ever seals), which keeps this crate deterministic in tests.
//!
//! The frame tags, HTTP tags and re-enrolment proofs the same secret makes
//! are HMACs of other messages (a version byte, `aerekos-http:`,
//! `aerekos-reenroll:`), so none of them reveals this key.
//!
//! Limits: the key is only as secret as the worker secret, which a first
//! enrolment over plain HTTP carries in its answer: whoever recorded that
//! exchange can open the worker's sealed manifests. [`open`] never panics on
//! arbitrary input (property-tested); it allocates one buffer of the input's
//! length, so callers cap what they read first (the worker reads at most
//! `MAX_MANIFEST_LEN + OVERHEAD`).
//! Byte tables: `protocol/README.md`, golden bytes in `tests/golden.rs`.

use core::fmt;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hmac::Mac;

use crate::Secret;

/// The first byte of sealed data: this layout.
pub const SEALED_FORMAT: u8 = 1;
/// Length of the nonce that follows the format byte.
pub const NONCE_LEN: usize = 12;
/// Length of the Poly1305 tag at the end.
pub const AEAD_TAG_LEN: usize = 16;
/// Bytes sealing adds to the plaintext: format byte, nonce and tag.
pub const OVERHEAD: usize = 1 + NONCE_LEN + AEAD_TAG_LEN;
/// Domain-separation label: the sealing key is HMAC-SHA256(secret, label).
pub const KEY_LABEL: &[u8] = b"aerekos seal v1";

/// Why sealed bytes did not open (or, for [`SealError::TooLong`], could not
/// be sealed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Shorter than a format byte, a nonce and a tag.
    #[error("sealed data of {0} bytes is too short (at least {OVERHEAD})")]
    TooShort(usize),
    /// The first byte is not a format this build knows.
    #[error("unknown sealed format {0}")]
    UnknownFormat(u8),
    /// The tag does not verify: another secret, another context, or the
    /// bytes were changed. Deliberately one case: which one is not told.
    #[error("the tag does not verify (wrong secret or context, or tampered)")]
    BadTag,
    /// The plaintext is beyond what ChaCha20-Poly1305 can seal under one
    /// nonce (256 GiB).
    #[error("{0} bytes are too long to seal")]
    TooLong(usize),
}

/// A sealing key. `Debug` never prints it.
#[derive(Clone)]
pub struct SealKey(ChaCha20Poly1305);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    /// The key for `secret`: HMAC-SHA256(secret, [`KEY_LABEL`]).
    pub fn derive(secret: &Secret) -> SealKey {
        let mut mac = secret.mac();
        mac.update(KEY_LABEL);
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        SealKey::from_bytes(key)
    }

    /// A raw ChaCha20-Poly1305 key (test vectors; use [`SealKey::derive`]).
    pub fn from_bytes(key: [u8; 32]) -> SealKey {
        SealKey(ChaCha20Poly1305::new(&Key::from(key)))
    }

    /// `01 ‖ nonce ‖ ciphertext ‖ tag`, the tag covering `context` too.
    /// `nonce` must never repeat under one key: take it from the OS RNG.
    pub fn seal(
        &self,
        context: &[u8],
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::with_capacity(plaintext.len().saturating_add(OVERHEAD));
        out.push(SEALED_FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let body = out.get_mut(1 + NONCE_LEN..).unwrap_or_default();
        let tag = self
            .0
            .encrypt_inout_detached(&Nonce::from(nonce), context, body.into())
            .map_err(|_| SealError::TooLong(plaintext.len()))?;
        out.extend_from_slice(tag.as_slice());
        Ok(out)
    }

    /// The plaintext of [`SealKey::seal`]'s output, if the tag verifies
    /// under this key and `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&format, rest) = sealed.split_first().ok_or(SealError::TooShort(0))?;
        if format != SEALED_FORMAT {
            return Err(SealError::UnknownFormat(format));
        }
        let too_short = || SealError::TooShort(sealed.len());
        let (nonce, rest) = rest.split_at_checked(NONCE_LEN).ok_or_else(too_short)?;
        let text_len = rest.len().checked_sub(AEAD_TAG_LEN).ok_or_else(too_short)?;
        let (ciphertext, tag) = rest.split_at_checked(text_len).ok_or_else(too_short)?;
        let nonce = Nonce::try_from(nonce).map_err(|_| too_short())?;
        let tag = Tag::try_from(tag).map_err(|_| too_short())?;
        let mut out = ciphertext.to_vec();
        self.0
            .decrypt_inout_detached(&nonce, context, out.as_mut_slice().into(), &tag)
            .map_err(|_| SealError::BadTag)?;
        Ok(out)
    }
}

/// Seals `plaintext` to the worker holding `secret`, bound to `context`.
pub fn seal(
    secret: &Secret,
    context: &[u8],
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, SealError> {
    SealKey::derive(secret).seal(context, plaintext, nonce)
}

/// Opens bytes from [`seal`] with the same secret and context.
pub fn open(secret: &Secret, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    SealKey::derive(secret).open(context, sealed)
}

/// The context a manifest is sealed under: `manifest:<worker_id>:<name>:<version>`
/// (worker ids and service names hold no `:`).
pub fn manifest_context(worker_id: &str, name: &str, version: u32) -> String {
    format!("manifest:{worker_id}:{name}:{version}")
}

/// The context a rotated worker secret is sealed under
/// ([`crate::Action::RotateSecret`]): `rotate-secret:<worker_id>`.
pub fn rotation_context(worker_id: &str) -> String {
    format!("rotate-secret:{worker_id}")
}

/// Seals `next` under `current` for [`crate::Action::RotateSecret`].
pub fn seal_rotation(
    current: &Secret,
    worker_id: &str,
    next: &Secret,
    nonce: [u8; NONCE_LEN],
) -> Result<crate::SealedSecret, SealError> {
    let bytes = seal(
        current,
        rotation_context(worker_id).as_bytes(),
        next.as_bytes(),
        nonce,
    )?;
    crate::SealedSecret::from_slice(&bytes).map_err(|_| SealError::TooLong(bytes.len()))
}

/// Opens a [`crate::Action::RotateSecret`] payload with `current`.
pub fn open_rotation(
    current: &Secret,
    worker_id: &str,
    sealed: &[u8],
) -> Result<Secret, SealError> {
    let bytes = open(current, rotation_context(worker_id).as_bytes(), sealed)?;
    let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SealError::BadTag)?;
    Ok(Secret::from_bytes(raw))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn a_rotated_secret_opens_only_for_its_worker_under_the_current_secret() {
        let current = Secret::from_bytes([1; 32]);
        let next = Secret::from_bytes([2; 32]);
        let sealed = seal_rotation(&current, "w-1", &next, [3; NONCE_LEN]).unwrap();
        assert_eq!(sealed.len(), 32 + OVERHEAD);
        assert_eq!(open_rotation(&current, "w-1", &sealed).unwrap(), next);
        assert!(open_rotation(&next, "w-1", &sealed).is_err());
        assert!(open_rotation(&current, "w-2", &sealed).is_err());
        // A sealed manifest of the right size is not a secret for this context.
        let other = seal(&current, b"manifest:w-1:x:1", &[0; 32], [3; NONCE_LEN]).unwrap();
        assert!(open_rotation(&current, "w-1", &other).is_err());
    }

    #[test]
    fn round_trip_and_every_short_input_is_an_error() {
        let secret = Secret::from_bytes([7; 32]);
        let sealed = seal(&secret, b"ctx", b"hello", [9; NONCE_LEN]).unwrap();
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(open(&secret, b"ctx", &sealed).unwrap(), b"hello");
        let empty = seal(&secret, b"ctx", b"", [9; NONCE_LEN]).unwrap();
        assert_eq!(empty.len(), OVERHEAD);
        assert_eq!(open(&secret, b"ctx", &empty).unwrap(), b"");
        assert_eq!(open(&secret, b"ctx", &[]), Err(SealError::TooShort(0)));
        for n in 1..OVERHEAD {
            assert_eq!(
                open(&secret, b"ctx", &empty[..n]),
                Err(SealError::TooShort(n))
            );
        }
        assert_eq!(
            open(&secret, b"ctx", &[2; 40]),
            Err(SealError::UnknownFormat(2))
        );
        assert_eq!(
            format!("{:?}", SealKey::derive(&secret)),
            "SealKey(<redacted>)"
        );
    }
}
