//! The aerekos wire contract: the only crate that knows MQTT topics, frame
//! layouts and bytes. The conductor, the edge-worker, the tools and the tests
//! all depend on it, so the two ends can never drift apart.
//!
//! * [`topic`]: the topic tree `aerekos/v1/<worker_id>/…` (and the
//!   partitioned tree NATS moves worker frames into for several active
//!   conductors).
//! * [`partition`]: which partition a worker's frames belong to (NATS's
//!   `partition()` subject-mapping function).
//! * [`frame`]: the frame types (envelope, body enum, metrics, birth, …).
//! * [`batch`]: the samples of a batch period in one frame, delta-encoded.
//! * [`codec`]: postcard encoding plus a truncated HMAC-SHA256 tag.
//! * [`replay`]: the sequence-number window that rejects replayed frames.
//! * [`manifest`]: full service manifests, fetched over HTTP by digest, and
//!   the worker's HTTP download authentication.
//! * [`local_api`]: the contract between a worker and its hosted services
//!   (environment names, paths, bodies).
//! * [`registration`]: the registration token and the fleet CA fingerprint
//!   it pins.
//! * [`exec`]: the stream a worker uploads over HTTP while it runs an
//!   [`Action::Exec`] (output, then the exit status).
//! * [`shell`]: the two HTTP streams of an [`Action::Shell`] (terminal
//!   output up, keystrokes, resizes and the hang-up down).
//! * [`release`]: signed agent releases (what the Ed25519 signature
//!   covers, versions and their order) for [`Action::UpdateAgent`].
//! * [`sealed`]: ChaCha20-Poly1305 sealing under a key derived from a
//!   worker's secret, bound to a context; manifests (and their secrets)
//!   travel sealed to their worker.
//!
//! Limits (checked by tests): a sealed frame is at most [`MAX_FRAME_LEN`]
//! bytes; every string and list on the wire is bounded by a `heapless`
//! capacity, so decoding arbitrary bytes allocates a bounded amount and never
//! panics. The byte layout is documented in `protocol/README.md` and pinned
//! by the golden tests in `tests/golden.rs`.

pub mod batch;
pub mod board;
pub mod codec;
pub mod examples;
pub mod exec;
pub mod frame;
pub mod local_api;
pub mod manifest;
pub mod partition;
pub mod registration;
pub mod release;
pub mod replay;
pub mod sealed;
pub mod shell;
pub mod topic;

pub use batch::{MetricsBatch, STORED_ACCEPTS_BATCH};
pub use codec::{
    hex_string, open, open_captured, reenroll_proof, seal, DecodeError, EncodeError, Opened,
    Secret, TAG_LEN,
};
pub use frame::*;
pub use manifest::{Manifest, ManifestError};
pub use registration::{Fingerprint, RegistrationToken, TokenError};
pub use replay::{ReplayWindow, SeqVerdict};
pub use topic::{Topic, TopicKind};

/// Format 1, carried in the first byte of a frame: the envelope holds the
/// worker id. Every receiver understands it; a sender uses it until it knows
/// its peer takes [`FORMAT_V2`]. A receiver drops frames with a version it
/// does not know (counted as `version`).
pub const FORMAT_VERSION: u8 = 1;

/// Format 2: format 1 without the worker id on the wire (the topic carries
/// it, 15 of a metrics frame's 116 bytes); the tag still covers it, so a
/// frame only verifies on its own worker's topics. Conductors that send
/// `Action::Stored` accept it: a worker switches to it after a `Stored` and
/// the conductor answers each worker in the format it last received
/// (`protocol/README.md`, Formats).
pub const FORMAT_V2: u8 = 2;

/// Upper bound on a sealed frame (postcard body + tag), in bytes. Receivers
/// reject anything larger before decoding (counted as `oversized`). The
/// largest frame the bounded types can express fits (see `tests/limits.rs`).
pub const MAX_FRAME_LEN: usize = 4096;
