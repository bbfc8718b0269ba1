//! The frame decoder and HMAC verify path, in the conductor's order
//! (`conductor/src/ingest.rs`): size, `protocol::open`, claimed worker id
//! against the topic's, tag, body kind against the topic, replay window.
//!
//! Invariants checked on every input:
//! * no panic; every refusal maps to one of the conductor's counter reasons;
//! * a structurally valid frame re-seals within `MAX_FRAME_LEN`, and
//!   `open(seal(e)).verify(secret) == e` (decode(encode(x)) round trip);
//! * a frame sealed under one secret never verifies under another, nor
//!   after any single byte of it is changed;
//! * an authenticated input is the one encoding of its envelope (it equals
//!   its re-seal), so a frame cannot be re-spelled to slip past the replay
//!   window;
//! * the replay window refuses a seq once accepted.
//!
//! Allocation is bounded by `-malloc_limit_mb` in `run-smoke.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::topic::TopicKind;
use protocol::{examples, open, seal, DecodeError, Envelope, ReplayWindow, Secret, SeqVerdict};
use protocol::{FORMAT_V2, FORMAT_VERSION, MAX_FRAME_LEN};

/// The conductor's rejection reasons (`conductor::state::REJECT_REASONS`).
const REASONS: [&str; 10] = [
    "oversized",
    "truncated",
    "version",
    "malformed",
    "unknown_worker",
    "revoked",
    "topic_mismatch",
    "bad_tag",
    "replayed",
    "too_old",
];

/// Topics a worker publishes frames on.
const FRAME_TOPICS: [TopicKind; 7] = [
    TopicKind::Birth,
    TopicKind::Metrics,
    TopicKind::Events,
    TopicKind::Reply,
    TopicKind::Services,
    TopicKind::Logs,
    TopicKind::ServiceMetrics,
];

/// `ingest_frame` minus the shared state: one known worker with `secret`
/// and `window`.
fn ingest(
    secret: &Secret,
    window: &ReplayWindow,
    topic_worker: &str,
    kind: TopicKind,
    payload: &[u8],
) -> Result<Envelope, &'static str> {
    if payload.len() > MAX_FRAME_LEN {
        return Err("oversized");
    }
    let opened = open(payload, topic_worker).map_err(|e| e.reason())?;
    if opened.worker_id() != topic_worker {
        return Err("topic_mismatch");
    }
    let env = opened.verify(secret).map_err(|e| e.reason())?;
    if Some(env.body.kind()) != kind.expected_body() {
        return Err("topic_mismatch");
    }
    match window.check(env.seq) {
        SeqVerdict::Fresh => Ok(env),
        SeqVerdict::Replayed => Err("replayed"),
        SeqVerdict::TooOld => Err("too_old"),
    }
}

fuzz_target!(|data: &[u8]| {
    let secret = examples::secret();
    let worker = "w-0123456789ab";
    let window = ReplayWindow::new(5, 0b1011);
    let mut accepted_on = 0;
    for kind in FRAME_TOPICS {
        match ingest(&secret, &window, worker, kind, data) {
            Ok(_) => accepted_on += 1,
            Err(reason) => assert!(REASONS.contains(&reason), "unknown reason {reason}"),
        }
    }
    // A body kind belongs to exactly one topic.
    assert!(accepted_on <= 1);

    let Ok(opened) = open(data, worker) else {
        return;
    };
    let claimed = opened.worker_id().to_string();
    let authentic = open(data, worker)
        .ok()
        .and_then(|o| o.verify(&secret).ok());
    let env = opened.into_unverified();
    assert!(env.version == FORMAT_VERSION || env.version == FORMAT_V2);
    assert_eq!(claimed, env.worker_id.as_str());
    if env.version == FORMAT_V2 {
        // Format 2 carries no id: it is the topic's.
        assert_eq!(claimed, worker);
    }

    let sealed = seal(&secret, &env).expect("a decoded envelope re-seals within the limit");
    assert!(sealed.len() <= MAX_FRAME_LEN);
    if let Some(authentic) = authentic {
        assert_eq!(authentic, env);
        assert_eq!(sealed, data, "an authenticated frame has one encoding");
    }
    let back = open(&sealed, worker)
        .expect("a sealed frame opens")
        .verify(&secret)
        .expect("its own tag verifies");
    assert_eq!(back, env);

    let other = Secret::from_bytes([0xa5; 32]);
    assert_eq!(
        open(&sealed, worker).expect("opens").verify(&other).err(),
        Some(DecodeError::BadTag)
    );
    // Any one changed byte (chosen by the input) breaks the frame.
    let i = usize::from(data[data.len() / 2]) * 31 % sealed.len();
    let mut tampered = sealed.clone();
    tampered[i] ^= 1 << (data[0] % 8);
    if let Ok(o) = open(&tampered, worker) {
        assert!(
            o.verify(&secret).is_err(),
            "tampered byte {i} still verified"
        );
    }
    // Cut short: never verifies.
    if let Ok(o) = open(&sealed[..sealed.len() - 1], worker) {
        assert!(o.verify(&secret).is_err());
    }

    let mut w = window;
    if w.check(env.seq) == SeqVerdict::Fresh {
        w.accept(env.seq);
        assert_eq!(w.check(env.seq), SeqVerdict::Replayed);
    }
});
