//! The conductor's frame checks themselves: `conductor/src/frame_check.rs`
//! is compiled into this target as it is (it depends on `protocol` only),
//! so what is fuzzed is what ingests: size, `protocol::open`, the worker
//! known and not revoked, the claimed worker id against the topic's, the tag
//! (any of the worker's secrets), body kind against the topic, replay window.
//!
//! Invariants checked on every input:
//! * no panic; every refusal is one of `Reject::ALL` (the counters);
//! * a structurally valid frame re-seals within `MAX_FRAME_LEN`, and
//!   `open(seal(e)).verify(secret) == e` (decode(encode(x)) round trip);
//! * a frame sealed under one secret never verifies under another, nor
//!   after any single byte of it is changed;
//! * an authenticated input is the one encoding of its envelope (it equals
//!   its re-seal), so a frame cannot be re-spelled to slip past the replay
//!   window;
//! * the replay window refuses a seq once accepted (a `duplicate` while the
//!   worker re-sends); an unknown or revoked worker never has a frame
//!   accepted.
//!
//! Allocation is bounded by `-malloc_limit_mb` in `run-smoke.sh`.
#![no_main]

#[allow(dead_code)]
#[path = "../../conductor/src/frame_check.rs"]
mod check;

use check::{Reject, Sender};
use libfuzzer_sys::fuzz_target;
use protocol::topic::{Publisher, TopicKind};
use protocol::{examples, open, seal, DecodeError, Envelope, ReplayWindow, Secret, SeqVerdict};
use protocol::{FORMAT_V2, FORMAT_VERSION, MAX_FRAME_LEN};

/// `check` for one known worker with `secret` and `window`.
fn ingest(
    secret: &Secret,
    window: &ReplayWindow,
    topic_worker: &str,
    kind: TopicKind,
    payload: &[u8],
) -> Result<Envelope, Reject> {
    let secrets = [secret];
    let sender = Sender {
        secrets: &secrets,
        revoked: false,
        replay: window,
        resending: false,
    };
    check::check(payload, topic_worker, kind, Some(&sender)).map(|(env, _)| env)
}

fuzz_target!(|data: &[u8]| {
    let secret = examples::secret();
    let worker = "w-0123456789ab";
    let window = ReplayWindow::new(5, 0b1011);
    let mut accepted_on = 0;
    let frame_topics = TopicKind::ALL
        .into_iter()
        .filter(|k| k.publisher() == Publisher::Worker && k.expected_body().is_some());
    for kind in frame_topics {
        match ingest(&secret, &window, worker, kind, data) {
            Ok(env) => {
                accepted_on += 1;
                // The same frame from an unknown or revoked worker, or as a
                // re-send of an accepted seq: refused.
                assert_eq!(
                    check::check(data, worker, kind, None).err(),
                    Some(Reject::UnknownWorker)
                );
                let secrets = [&secret];
                let revoked = Sender {
                    secrets: &secrets,
                    revoked: true,
                    replay: &window,
                    resending: false,
                };
                assert_eq!(
                    check::check(data, worker, kind, Some(&revoked)).err(),
                    Some(Reject::Revoked)
                );
                let mut after = window;
                after.accept(env.seq);
                let resend = Sender {
                    secrets: &secrets,
                    revoked: false,
                    replay: &after,
                    resending: true,
                };
                assert_eq!(
                    check::check(data, worker, kind, Some(&resend)).err(),
                    Some(Reject::Duplicate)
                );
            }
            Err(reason) => assert!(Reject::ALL.contains(&reason), "{reason:?}"),
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
