//! The aerekos wire contract: the only crate that knows MQTT topics, frame
//! layouts and bytes. The conductor, the edge-worker, the tools and the tests
//! all depend on it, so the two ends can never drift apart.
//!
//! * [`topic`]: the topic tree `aerekos/v1/<worker_id>/…`.
//! * [`frame`]: the frame types (envelope, body enum, metrics, birth, …).
//! * [`codec`]: postcard encoding plus a truncated HMAC-SHA256 tag.
//! * [`replay`]: the sequence-number window that rejects replayed frames.
//! * [`manifest`]: full service manifests, fetched over HTTP by digest, and
//!   the worker's HTTP download authentication.
//!
//! Limits (checked by tests): a sealed frame is at most [`MAX_FRAME_LEN`]
//! bytes; every string and list on the wire is bounded by a `heapless`
//! capacity, so decoding arbitrary bytes allocates a bounded amount and never
//! panics. The byte layout is documented in `protocol/README.md` and pinned
//! by the golden tests in `tests/golden.rs`.

pub mod codec;
pub mod examples;
pub mod frame;
pub mod manifest;
pub mod replay;
pub mod topic;

pub use codec::{
    hex_string, open, reenroll_proof, seal, DecodeError, EncodeError, Opened, Secret, TAG_LEN,
};
pub use frame::*;
pub use manifest::{Manifest, ManifestError};
pub use replay::{ReplayWindow, SeqVerdict};
pub use topic::{Topic, TopicKind};

/// The format version carried in the first byte of every frame. A receiver
/// drops frames with any other version (counted as `version`).
pub const FORMAT_VERSION: u8 = 1;

/// Upper bound on a sealed frame (postcard body + tag), in bytes. Receivers
/// reject anything larger before decoding (counted as `oversized`). The
/// largest frame the bounded types can express fits (see `tests/limits.rs`).
pub const MAX_FRAME_LEN: usize = 4096;
