//! Cryptography: random bytes, the master key, sealed blobs (key files)
//! and the ciphertext format handed to clients.
//!
//! Everything uses XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`, pure
//! Rust, fast without AES instructions) with random 24-byte nonces from the
//! OS (`getrandom`): with 192-bit nonces random choice is safe for any
//! number of messages a key will ever see.
//!
//! # Client ciphertext (format 1)
//!
//! | offset      | bytes | field                                                  |
//! |-------------|-------|--------------------------------------------------------|
//! | 0           | 1     | format byte [`CIPHERTEXT_FORMAT`] (`0xA1`)             |
//! | 1           | 1     | `n`, the key name length (1..=[`MAX_NAME_LEN`])        |
//! | 2           | n     | key name (ASCII `[a-z0-9][a-z0-9_-]*`)                  |
//! | 2+n         | 4     | key version, u32 big-endian (≥ 1)                      |
//! | 6+n         | 24    | XChaCha20 nonce                                        |
//! | 30+n        | m+16  | AEAD output: encrypted plaintext (m bytes) + Poly1305 tag |
//!
//! The AEAD's associated data is the header (bytes `0..6+n`) followed by
//! the caller's optional `aad`: the name and version are authenticated, so
//! a ciphertext cannot be re-labelled to another key or version, and the
//! caller's context must match on decryption. The header is
//! self-delimiting, so `header || aad` is unambiguous.
//!
//! # Sealed blobs (key files, the master-key check)
//!
//! | offset | bytes | field                                   |
//! |--------|-------|-----------------------------------------|
//! | 0      | 4     | magic [`SEAL_MAGIC`] (`AKM1`)           |
//! | 4      | 24    | nonce                                   |
//! | 28     | m+16  | AEAD output under the master key        |
//!
//! The associated data is a label naming what the blob is (for a key file
//! it includes the key name), so files cannot be swapped between keys.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Key length of every key (master and key versions), bytes.
pub const KEY_LEN: usize = 32;
/// XChaCha20 nonce length, bytes.
pub const NONCE_LEN: usize = 24;
/// Poly1305 tag length, bytes.
pub const TAG_LEN: usize = 16;
/// First byte of a client ciphertext.
pub const CIPHERTEXT_FORMAT: u8 = 0xA1;
/// Longest key name, bytes.
pub const MAX_NAME_LEN: usize = 64;
/// First bytes of a sealed blob.
pub const SEAL_MAGIC: &[u8; 4] = b"AKM1";
/// HKDF salt of the master key derived from the service token.
const MASTER_SALT: &[u8] = b"aerekos-key-manager/master-key/v1";
/// HKDF info of the master key derived from the service token.
const MASTER_INFO: &[u8] = b"key-file sealing key";

/// A cryptographic failure. Messages never contain key material or data.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The OS random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
    /// The ciphertext is not in the format at all.
    #[error("malformed ciphertext: {0}")]
    Malformed(&'static str),
    /// The AEAD tag did not verify.
    #[error(
        "ciphertext failed authentication (tampered, a different aad, or not made by this key-manager)"
    )]
    Auth,
    /// The master key material is unusable.
    #[error("invalid master key: {0}")]
    MasterKey(&'static str),
}

/// Fills `buf` from the OS random number generator.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// 32 bytes of key material. `Debug` is redacted; the bytes are cleared on
/// drop (best effort: copies made by moves are not tracked).
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SecretKey {
        SecretKey(bytes)
    }

    /// A fresh random key.
    pub fn random() -> Result<SecretKey, CryptoError> {
        let mut k = [0u8; KEY_LEN];
        random_bytes(&mut k)?;
        Ok(SecretKey(k))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The AEAD instance for this key.
    pub fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Where the master key came from (named in errors, never the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterSource {
    /// The `master_key` secret from the local API.
    Secret,
    /// HKDF-SHA256 of the service's `AEREKOS_TOKEN`.
    Token,
    /// Given by the embedding program (tests, the benchmark).
    Explicit,
}

impl std::fmt::Display for MasterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MasterSource::Secret => "the master_key secret",
            MasterSource::Token => "the key derived from AEREKOS_TOKEN",
            MasterSource::Explicit => "the given master key",
        })
    }
}

/// The key that seals key material at rest. Never written anywhere.
#[derive(Debug)]
pub struct MasterKey {
    key: SecretKey,
    cipher: XChaCha20Poly1305,
    source: MasterSource,
}

impl MasterKey {
    /// A master key from raw bytes.
    pub fn new(key: SecretKey, source: MasterSource) -> MasterKey {
        let cipher = key.cipher();
        MasterKey {
            key,
            cipher,
            source,
        }
    }

    /// From the `master_key` secret: exactly 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<MasterKey, CryptoError> {
        let hex = hex.trim();
        if hex.len() != 2 * KEY_LEN {
            return Err(CryptoError::MasterKey(
                "the master_key secret must be 64 hex characters",
            ));
        }
        let mut k = [0u8; KEY_LEN];
        for (i, out) in k.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or(CryptoError::MasterKey(
                "the master_key secret must be 64 hex characters",
            ))?;
            *out = u8::from_str_radix(pair, 16).map_err(|_| {
                CryptoError::MasterKey("the master_key secret must be 64 hex characters")
            })?;
        }
        Ok(MasterKey::new(SecretKey(k), MasterSource::Secret))
    }

    /// HKDF-SHA256 (RFC 5869) of the service token with a fixed salt and
    /// info. The token is unique per worker and service and stable across
    /// restarts, so the same worker always derives the same key.
    pub fn derive_from_token(token: &str) -> Result<MasterKey, CryptoError> {
        if token.len() < 32 {
            return Err(CryptoError::MasterKey(
                "AEREKOS_TOKEN is too short to derive a master key from",
            ));
        }
        let okm = hkdf_sha256(MASTER_SALT, token.as_bytes(), MASTER_INFO)?;
        Ok(MasterKey::new(SecretKey(okm), MasterSource::Token))
    }

    /// Where it came from.
    pub fn source(&self) -> MasterSource {
        self.source
    }

    /// The raw key (tests compare logs against it).
    pub fn secret(&self) -> &SecretKey {
        &self.key
    }

    /// Seals `plaintext` bound to `label` (see the module docs).
    pub fn seal(&self, label: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let ct = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: label,
                },
            )
            .map_err(|_| CryptoError::Auth)?;
        let mut out = Vec::with_capacity(SEAL_MAGIC.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(SEAL_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens a blob made by [`MasterKey::seal`] with the same `label`.
    pub fn open(&self, label: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let rest = sealed
            .strip_prefix(SEAL_MAGIC.as_slice())
            .ok_or(CryptoError::Malformed("not a sealed key-manager file"))?;
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed("sealed file is truncated"));
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| CryptoError::Malformed("sealed file is truncated"))?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: label,
                },
            )
            .map_err(|_| CryptoError::Auth)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Result<[u8; 32], CryptoError> {
    let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(key)
        .map_err(|_| CryptoError::MasterKey("HMAC key rejected"))?;
    for p in parts {
        mac.update(p);
    }
    let out = mac.finalize().into_bytes();
    let mut tag = [0u8; 32];
    tag.copy_from_slice(&out);
    Ok(tag)
}

/// HKDF-SHA256 with a 32-byte output (one expand block):
/// `PRK = HMAC(salt, ikm)`, `OKM = HMAC(PRK, info || 0x01)`.
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8]) -> Result<[u8; 32], CryptoError> {
    let prk = hmac(salt, &[ikm])?;
    hmac(&prk, &[info, &[1u8]])
}

/// Is `name` a valid key name: `[a-z0-9][a-z0-9_-]{0,63}`?
pub fn valid_key_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// A parsed client ciphertext (borrowing the input).
#[derive(Debug, Clone, Copy)]
pub struct Parsed<'a> {
    /// Key name.
    pub name: &'a str,
    /// Key version.
    pub version: u32,
    header: &'a [u8],
    nonce: [u8; NONCE_LEN],
    body: &'a [u8],
}

fn header(name: &str, version: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(6 + name.len());
    h.push(CIPHERTEXT_FORMAT);
    // Callers pass valid names (≤ 64 bytes), so the cast cannot truncate.
    h.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    h.extend_from_slice(name.as_bytes());
    h.extend_from_slice(&version.to_be_bytes());
    h
}

fn full_aad(header: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(header.len() + aad.len());
    v.extend_from_slice(header);
    v.extend_from_slice(aad);
    v
}

/// Encrypts `plaintext` under key `name` version `version` (whose AEAD is
/// `cipher`) into the client format.
pub fn encrypt(
    cipher: &XChaCha20Poly1305,
    name: &str,
    version: u32,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if !valid_key_name(name) {
        return Err(CryptoError::Malformed("invalid key name"));
    }
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce)?;
    let mut out = header(name, version);
    let aad = full_aad(&out, aad);
    let ct = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Auth)?;
    out.reserve(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Parses the header of a client ciphertext. Never panics on any input.
pub fn parse(ct: &[u8]) -> Result<Parsed<'_>, CryptoError> {
    let (&format, rest) = ct
        .split_first()
        .ok_or(CryptoError::Malformed("empty ciphertext"))?;
    if format != CIPHERTEXT_FORMAT {
        return Err(CryptoError::Malformed("unknown ciphertext format byte"));
    }
    let (&n, rest) = rest
        .split_first()
        .ok_or(CryptoError::Malformed("ciphertext is truncated"))?;
    let n = usize::from(n);
    if n == 0 || n > MAX_NAME_LEN {
        return Err(CryptoError::Malformed("bad key name length"));
    }
    if rest.len() < n + 4 + NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed("ciphertext is truncated"));
    }
    let (name, rest) = rest.split_at(n);
    let name = std::str::from_utf8(name)
        .ok()
        .filter(|s| valid_key_name(s))
        .ok_or(CryptoError::Malformed("bad key name"))?;
    let (version, rest) = rest.split_at(4);
    let version = u32::from_be_bytes(
        version
            .try_into()
            .map_err(|_| CryptoError::Malformed("ciphertext is truncated"))?,
    );
    if version == 0 {
        return Err(CryptoError::Malformed("key version 0 does not exist"));
    }
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| CryptoError::Malformed("ciphertext is truncated"))?;
    Ok(Parsed {
        name,
        version,
        header: &ct[..6 + n],
        nonce,
        body,
    })
}

/// Decrypts a parsed ciphertext with the AEAD of its key version.
pub fn decrypt(
    cipher: &XChaCha20Poly1305,
    parsed: &Parsed<'_>,
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let aad = full_aad(parsed.header, aad);
    cipher
        .decrypt(
            &XNonce::from(parsed.nonce),
            Payload {
                msg: parsed.body,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Auth)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn hkdf_matches_rfc5869_case_1_prefix() {
        // RFC 5869 A.1 (first 32 bytes of the 42-byte OKM).
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = hkdf_sha256(&salt, &ikm, &info).unwrap();
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }

    #[test]
    fn round_trip_and_layout() {
        let k = SecretKey::random().unwrap();
        let c = k.cipher();
        let ct = encrypt(&c, "orders", 3, b"hello", b"ctx").unwrap();
        assert_eq!(ct[0], CIPHERTEXT_FORMAT);
        assert_eq!(ct[1], 6);
        assert_eq!(&ct[2..8], b"orders");
        assert_eq!(&ct[8..12], &3u32.to_be_bytes());
        assert_eq!(ct.len(), 12 + NONCE_LEN + 5 + TAG_LEN);
        let p = parse(&ct).unwrap();
        assert_eq!((p.name, p.version), ("orders", 3));
        assert_eq!(decrypt(&c, &p, b"ctx").unwrap(), b"hello");
        assert!(matches!(decrypt(&c, &p, b""), Err(CryptoError::Auth)));
        // Relabelling the version breaks authentication.
        let mut bad = ct.clone();
        bad[11] = 4;
        let p = parse(&bad).unwrap();
        assert!(matches!(decrypt(&c, &p, b"ctx"), Err(CryptoError::Auth)));
    }

    #[test]
    fn parse_never_panics_on_prefixes_and_noise() {
        let k = SecretKey::random().unwrap();
        let ct = encrypt(&k.cipher(), "k", 1, b"", b"").unwrap();
        for i in 0..ct.len() {
            assert!(parse(&ct[..i]).is_err(), "prefix {i}");
        }
        let mut seed = 1u32;
        for len in 0..200 {
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16).to_le_bytes()[0] // its low byte
                })
                .collect();
            let _ = parse(&noise);
        }
    }

    #[test]
    fn master_key_sources() {
        assert!(MasterKey::from_hex("zz").is_err());
        assert!(MasterKey::from_hex(&"g".repeat(64)).is_err());
        let m = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(m.secret().as_bytes(), &[0xab; 32]);
        let a = MasterKey::derive_from_token(&"1".repeat(64)).unwrap();
        let b = MasterKey::derive_from_token(&"2".repeat(64)).unwrap();
        assert_ne!(a.secret().as_bytes(), b.secret().as_bytes());
        let sealed = a.seal(b"label", b"data").unwrap();
        assert_eq!(a.open(b"label", &sealed).unwrap(), b"data");
        assert!(a.open(b"other", &sealed).is_err());
        assert!(b.open(b"label", &sealed).is_err());
        assert!(!format!("{a:?}").contains("171"));
    }
}
