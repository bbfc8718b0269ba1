//! Sealing and opening frames.
//!
//! Wire layout of a sealed frame (see `protocol/README.md` for byte tables):
//!
//! ```text
//! +---------------------------------+-----------------------------+
//! | postcard(Envelope)  (n bytes)   | tag: HMAC-SHA256[..16]      |
//! +---------------------------------+-----------------------------+
//!   byte 0 is Envelope.version        key = the worker's secret
//! ```
//!
//! The tag covers every byte before it. It is truncated to 16 bytes (128
//! bits, as RFC 2104 §5 allows). Verification is constant-time.
//!
//! Format 2 ([`crate::FORMAT_V2`]) leaves the worker id out of the bytes
//! sent; the receiver takes it from the topic. Its tag is computed over the
//! format-1 layout with version byte `02` (the id put back in), so a frame
//! moved to another worker's topic fails verification even if two workers
//! shared a secret.
//!
//! Limits: input longer than [`crate::MAX_FRAME_LEN`] is rejected before any
//! decoding; decoding never panics on arbitrary bytes (property-tested).

use core::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::frame::{Body, WorkerId};
use crate::{Envelope, FORMAT_V2, FORMAT_VERSION, MAX_FRAME_LEN};

/// Length of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A worker's 32-byte frame-authentication secret. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Secret(bytes)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, DecodeError> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return Err(DecodeError::BadSecret);
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let hi = hex_val(chunk[0]).ok_or(DecodeError::BadSecret)?;
            let lo = hex_val(chunk[1]).ok_or(DecodeError::BadSecret)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Secret(out))
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex_string(&self.0)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn mac(&self) -> HmacSha256 {
        // An HMAC accepts keys of any length, so this cannot fail.
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lower-case hex of `bytes`.
pub fn hex_string(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Why a frame was refused. Each variant is a rejection counter on the conductor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    Oversized(usize),
    /// Shorter than a version byte plus a tag.
    #[error("frame of {0} bytes is too short to hold a tag")]
    Truncated(usize),
    /// First byte is not a version this build understands.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// postcard could not decode the envelope.
    #[error("malformed frame: {0}")]
    Malformed(postcard::Error),
    /// Bytes left between the envelope and the tag.
    #[error("{0} unexpected bytes after the envelope")]
    TrailingBytes(usize),
    /// The HMAC tag does not match the sender's secret.
    #[error("authentication tag mismatch")]
    BadTag,
    /// A secret was not 64 hex characters.
    #[error("secret must be 64 hex characters")]
    BadSecret,
    /// A format-2 frame arrived on a topic whose worker id is not a valid
    /// one (the id a format-2 frame is verified against).
    #[error("the topic's worker id {0:?} is not a valid worker id")]
    BadTopicWorker(String),
    /// [`open_captured`] without a worker id, on a format-2 frame.
    #[error("a format-2 frame does not carry its worker id: give the <worker_id> of its topic")]
    NeedsTopicWorker,
}

impl DecodeError {
    /// Stable short name, used as a metrics label (`reason="bad_tag"`).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized(_) => "oversized",
            DecodeError::Truncated(_) => "truncated",
            DecodeError::UnknownVersion(_) => "version",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::TrailingBytes(_) => "malformed",
            DecodeError::BadTag => "bad_tag",
            DecodeError::BadSecret => "bad_secret",
            DecodeError::BadTopicWorker(_) => "topic_mismatch",
            DecodeError::NeedsTopicWorker => "topic_mismatch",
        }
    }
}

/// Why a frame could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// postcard failed (cannot happen with the bounded frame types).
    #[error("encoding failed: {0}")]
    Postcard(postcard::Error),
    /// The sealed frame would exceed [`MAX_FRAME_LEN`].
    #[error("sealed frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
}

/// Format 2 on the wire: format 1 without the worker id.
#[derive(serde::Serialize)]
struct CompactRef<'a> {
    version: u8,
    seq: u64,
    sent_at_ms: u64,
    body: &'a Body,
}

/// [`CompactRef`], decoded.
#[derive(serde::Deserialize)]
struct Compact {
    version: u8,
    seq: u64,
    sent_at_ms: u64,
    body: Body,
}

/// Encodes `envelope` in its `version`'s layout ([`FORMAT_V2`]: without the
/// worker id; any other: format 1) and appends its tag under `secret`.
pub fn seal(secret: &Secret, envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let mut mac = secret.mac();
    let mut bytes = if envelope.version == FORMAT_V2 {
        let bytes = postcard::to_stdvec(&CompactRef {
            version: envelope.version,
            seq: envelope.seq,
            sent_at_ms: envelope.sent_at_ms,
            body: &envelope.body,
        })
        .map_err(EncodeError::Postcard)?;
        mac_compact(&mut mac, &envelope.worker_id, &bytes);
        bytes
    } else {
        let bytes = postcard::to_stdvec(envelope).map_err(EncodeError::Postcard)?;
        mac.update(&bytes);
        bytes
    };
    let tag = mac.finalize().into_bytes();
    bytes.extend_from_slice(&tag[..TAG_LEN]);
    if bytes.len() > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Feeds `mac` the format-1 layout of a format-2 frame's `signed` bytes:
/// the version byte, then the worker id as postcard writes it (a one-byte
/// length: ids are at most 32 bytes), then the rest.
fn mac_compact(mac: &mut HmacSha256, worker_id: &WorkerId, signed: &[u8]) {
    let (version, rest) = signed.split_at(1.min(signed.len()));
    mac.update(version);
    // fits: `WorkerId` holds at most 32 bytes: the varint length is one byte.
    #[allow(clippy::cast_possible_truncation)]
    let id_len = worker_id.len() as u8;
    mac.update(&[id_len]);
    mac.update(worker_id.as_bytes());
    mac.update(rest);
}

/// A decoded but **not yet authenticated** frame. The receiver looks up the
/// sender's secret by [`Opened::worker_id`], then calls [`Opened::verify`].
#[derive(Debug)]
pub struct Opened<'a> {
    envelope: Envelope,
    signed: &'a [u8],
    tag: &'a [u8],
}

impl<'a> Opened<'a> {
    /// The claimed sender (unauthenticated until [`Opened::verify`]); for a
    /// format-2 frame, the topic's worker id it was opened with.
    pub fn worker_id(&self) -> &str {
        &self.envelope.worker_id
    }

    /// Checks the tag in constant time and yields the authenticated envelope.
    pub fn verify(self, secret: &Secret) -> Result<Envelope, DecodeError> {
        if self.tag_matches(secret) {
            Ok(self.envelope)
        } else {
            Err(DecodeError::BadTag)
        }
    }

    /// Like [`Opened::verify`] with each of `secrets` in turn (a secret
    /// being rotated: the current one, the next, the previous); yields the
    /// envelope and the index of the secret whose tag matched.
    pub fn verify_any(self, secrets: &[&Secret]) -> Result<(Envelope, usize), DecodeError> {
        match secrets.iter().position(|s| self.tag_matches(s)) {
            Some(i) => Ok((self.envelope, i)),
            None => Err(DecodeError::BadTag),
        }
    }

    fn tag_matches(&self, secret: &Secret) -> bool {
        let mut mac = secret.mac();
        if self.envelope.version == FORMAT_V2 {
            mac_compact(&mut mac, &self.envelope.worker_id, self.signed);
        } else {
            mac.update(self.signed);
        }
        mac.verify_truncated_left(self.tag).is_ok()
    }

    /// The envelope without authentication: only for inspection tools
    /// (`conductor decode`), never for acting on a frame.
    pub fn into_unverified(self) -> Envelope {
        self.envelope
    }
}

/// Decodes a sealed frame's structure (size, version, postcard, tag split).
/// `topic_worker` is the worker id of the topic the frame arrived on: a
/// format-2 frame does not carry one and is verified against it (a
/// format-1 frame's own id is returned as is; the caller compares it).
pub fn open<'a>(bytes: &'a [u8], topic_worker: &str) -> Result<Opened<'a>, DecodeError> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    if bytes.len() < 1 + TAG_LEN {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    let (envelope, rest) = match bytes[0] {
        FORMAT_VERSION => postcard::take_from_bytes::<Envelope>(signed),
        FORMAT_V2 => {
            let worker_id = WorkerId::try_from(topic_worker)
                .map_err(|_| DecodeError::BadTopicWorker(topic_worker.to_string()))?;
            postcard::take_from_bytes::<Compact>(signed).map(|(c, rest)| {
                let envelope = Envelope {
                    version: c.version,
                    worker_id,
                    seq: c.seq,
                    sent_at_ms: c.sent_at_ms,
                    body: c.body,
                };
                (envelope, rest)
            })
        }
        other => return Err(DecodeError::UnknownVersion(other)),
    }
    .map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(Opened {
        envelope,
        signed,
        tag,
    })
}

/// [`open`] for inspection tools (`decode` subcommands), where the topic a
/// captured frame came from may not be known: a format-1 frame opens
/// without `worker`, a format-2 frame needs it.
pub fn open_captured<'a>(bytes: &'a [u8], worker: Option<&str>) -> Result<Opened<'a>, DecodeError> {
    match worker {
        Some(id) => open(bytes, id),
        None if bytes.first() == Some(&FORMAT_V2) => Err(DecodeError::NeedsTopicWorker),
        None => open(bytes, ""),
    }
}

/// Proof that an enrolling machine holds `secret` for `worker_id`, sent
/// instead of the secret itself when a worker re-enrols (keeps its identity).
/// Lower-case hex of HMAC-SHA256(secret, "aerekos-reenroll:" || worker_id).
pub fn reenroll_proof(secret: &Secret, worker_id: &str) -> String {
    let mut mac = secret.mac();
    mac.update(b"aerekos-reenroll:");
    mac.update(worker_id.as_bytes());
    hex_string(&mac.finalize().into_bytes())
}
