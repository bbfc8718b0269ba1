//! The frame checks, as one pure function: what
//! [`crate::ingest::handle_publish`] runs for every frame, and what the cargo-fuzz target `frame` runs (it
//! compiles this file as it is, so the fuzzer never drifts from the
//! conductor). It depends on `protocol` only and changes nothing: the
//! caller applies an accepted frame to its state.
//!
//! Order (each failure is one [`Reject`], one counter): size; structure
//! (`protocol::open`: version, postcard, trailing bytes, format 2's topic
//! worker id); the worker is known and not revoked; the envelope's worker
//! id is the topic's; the HMAC tag verifies with one of the worker's
//! secrets (the current one, a rotated one it switched to, the previous one
//! within its grace); the body kind is the topic's; the replay window says
//! the seq is fresh (a replay while the worker re-sends after a reconnect
//! is a `duplicate`, not an attack); then a fresh `MetricsBatch` must be
//! readable (every sample decodes, and its `count` seqs, ending at the
//! envelope's, are all ≥ 1), else it is `malformed` ([`body_readable`]), so
//! the caller never applies half a batch.

use protocol::topic::TopicKind;
use protocol::{Body, DecodeError, Envelope, ReplayWindow, Secret, SeqVerdict, MAX_FRAME_LEN};

/// Why a frame was refused; each is a counter
/// (`aerekos_frames_rejected_total{reason}`). **Append only** (the order is
/// the counters' order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Over `MAX_FRAME_LEN`.
    Oversized,
    /// Cut short.
    Truncated,
    /// A format version this conductor does not read.
    Version,
    /// Not a frame (postcard, trailing bytes, …), or a `MetricsBatch`
    /// whose samples cannot be read ([`body_readable`]).
    Malformed,
    /// No worker with the topic's id.
    UnknownWorker,
    /// The worker is revoked.
    Revoked,
    /// The claimed worker or the body kind is not the topic's.
    TopicMismatch,
    /// The tag does not verify with any of the worker's secrets.
    BadTag,
    /// A seq inside the window seen before.
    Replayed,
    /// A seq below the window.
    TooOld,
    /// A replayed or too-old seq in the re-send run after the worker's
    /// `online`: it publishing again what it had no `Stored` for.
    Duplicate,
}

impl Reject {
    /// Every reason, in counter order.
    pub const ALL: [Reject; 11] = [
        Reject::Oversized,
        Reject::Truncated,
        Reject::Version,
        Reject::Malformed,
        Reject::UnknownWorker,
        Reject::Revoked,
        Reject::TopicMismatch,
        Reject::BadTag,
        Reject::Replayed,
        Reject::TooOld,
        Reject::Duplicate,
    ];

    /// The counter label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Oversized => "oversized",
            Reject::Truncated => "truncated",
            Reject::Version => "version",
            Reject::Malformed => "malformed",
            Reject::UnknownWorker => "unknown_worker",
            Reject::Revoked => "revoked",
            Reject::TopicMismatch => "topic_mismatch",
            Reject::BadTag => "bad_tag",
            Reject::Replayed => "replayed",
            Reject::TooOld => "too_old",
            Reject::Duplicate => "duplicate",
        }
    }

    /// Its position in [`Reject::ALL`] (a counter index).
    pub fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(3)
    }

    fn from_decode(e: &DecodeError) -> Reject {
        match e {
            DecodeError::Oversized(_) => Reject::Oversized,
            DecodeError::Truncated(_) => Reject::Truncated,
            DecodeError::UnknownVersion(_) => Reject::Version,
            DecodeError::BadTag => Reject::BadTag,
            DecodeError::BadTopicWorker(_) | DecodeError::NeedsTopicWorker => Reject::TopicMismatch,
            DecodeError::Malformed(_) | DecodeError::TrailingBytes(_) | DecodeError::BadSecret => {
                Reject::Malformed
            }
        }
    }
}

/// What the checks need to know of the worker the topic names.
#[derive(Debug)]
pub struct Sender<'a> {
    /// Its secrets a frame may be sealed with, the current one first.
    pub secrets: &'a [&'a Secret],
    /// Revoked workers are refused.
    pub revoked: bool,
    /// Its replay window.
    pub replay: &'a ReplayWindow,
    /// In the re-send run after its `online` (replays are `duplicate`).
    pub resending: bool,
}

/// Checks one frame published on `topic_worker`'s `kind` topic. `sender`
/// is that worker (`None`: unknown). On success, the envelope and the index
/// in `sender.secrets` of the secret it was sealed with.
pub fn check(
    payload: &[u8],
    topic_worker: &str,
    kind: TopicKind,
    sender: Option<&Sender<'_>>,
) -> Result<(Envelope, usize), Reject> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(Reject::Oversized);
    }
    let opened = protocol::open(payload, topic_worker).map_err(|e| Reject::from_decode(&e))?;
    let Some(w) = sender else {
        return Err(Reject::UnknownWorker);
    };
    if w.revoked {
        return Err(Reject::Revoked);
    }
    if opened.worker_id() != topic_worker {
        return Err(Reject::TopicMismatch);
    }
    let (env, which) = opened
        .verify_any(w.secrets)
        .map_err(|e| Reject::from_decode(&e))?;
    if !kind.accepts(env.body.kind()) {
        return Err(Reject::TopicMismatch);
    }
    match w.replay.check(env.seq) {
        SeqVerdict::Fresh => {
            body_readable(&env)?;
            Ok((env, which))
        }
        SeqVerdict::Replayed | SeqVerdict::TooOld if w.resending => Err(Reject::Duplicate),
        SeqVerdict::Replayed => Err(Reject::Replayed),
        SeqVerdict::TooOld => Err(Reject::TooOld),
    }
}

/// The checks a body needs beyond postcard: a `MetricsBatch`'s sample
/// stream decodes in full (`MetricsBatch::decode`) and its samples' seqs
/// (`seq - count + 1 ..= seq`, `protocol::batch`) do not go below 1.
/// `Malformed` otherwise. Every other body passes.
pub fn body_readable(env: &Envelope) -> Result<(), Reject> {
    match &env.body {
        Body::MetricsBatch(b) => {
            if u64::from(b.count) > env.seq {
                return Err(Reject::Malformed);
            }
            b.decode().map(|_| ()).map_err(|_| Reject::Malformed)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::examples;
    use protocol::BodyKind;

    #[test]
    fn labels_are_unique_and_indices_follow_all() {
        let labels: std::collections::HashSet<_> = Reject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Reject::ALL.len());
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn a_batch_is_accepted_on_the_metrics_topic_only_and_only_when_readable() {
        let secret = examples::secret();
        let id = examples::WORKER_ID;
        let keys = [&secret];
        let window = ReplayWindow::default();
        let w = Sender {
            secrets: &keys,
            revoked: false,
            replay: &window,
            resending: false,
        };
        let frame = |seq, batch| {
            let env = examples::envelope(seq, Body::MetricsBatch(batch));
            protocol::seal(&secret, &env).map(|f| (env, f))
        };
        let good = examples::metrics_batch();
        let Ok((env, sealed)) = frame(7, good.clone()) else {
            panic!("the example batch seals");
        };
        assert_eq!(
            check(&sealed, id, TopicKind::Metrics, Some(&w)),
            Ok((env, 0))
        );
        assert_eq!(
            check(&sealed, id, TopicKind::Birth, Some(&w)),
            Err(Reject::TopicMismatch)
        );
        // The sample stream cut short, sealed properly: malformed.
        let mut cut = good.clone();
        cut.samples.truncate(cut.samples.len() - 5);
        let Ok((_, sealed)) = frame(8, cut) else {
            panic!("seals");
        };
        assert_eq!(
            check(&sealed, id, TopicKind::Metrics, Some(&w)),
            Err(Reject::Malformed)
        );
        // Three samples cannot end at seq 2 (their seqs would reach 0).
        let Ok((_, sealed)) = frame(2, good.clone()) else {
            panic!("seals");
        };
        assert_eq!(
            check(&sealed, id, TopicKind::Metrics, Some(&w)),
            Err(Reject::Malformed)
        );
        let Ok((_, sealed)) = frame(3, good) else {
            panic!("seals");
        };
        assert!(check(&sealed, id, TopicKind::Metrics, Some(&w)).is_ok());
        assert!(TopicKind::Metrics.accepts(BodyKind::Metrics));
        assert!(TopicKind::Metrics.accepts(BodyKind::MetricsBatch));
        assert!(!TopicKind::Birth.accepts(BodyKind::MetricsBatch));
        assert!(!TopicKind::Status.accepts(BodyKind::MetricsBatch));
    }

    #[test]
    fn the_checks_in_order() {
        let secret = examples::secret();
        let env = examples::envelope(7, protocol::Body::Metrics(examples::metrics()));
        let frame = protocol::seal(&secret, &env).unwrap();
        let id = examples::WORKER_ID;
        let window = ReplayWindow::default();
        let keys = [&secret];
        let known = |revoked, replay, resending| Sender {
            secrets: &keys,
            revoked,
            replay,
            resending,
        };
        let ok = check(
            &frame,
            id,
            TopicKind::Metrics,
            Some(&known(false, &window, false)),
        );
        assert_eq!(ok.unwrap(), (env.clone(), 0));
        let big = vec![1u8; MAX_FRAME_LEN + 1];
        assert_eq!(
            check(&big, id, TopicKind::Metrics, None),
            Err(Reject::Oversized)
        );
        assert_eq!(
            check(&frame, id, TopicKind::Metrics, None),
            Err(Reject::UnknownWorker)
        );
        let revoked = known(true, &window, false);
        assert_eq!(
            check(&frame, id, TopicKind::Metrics, Some(&revoked)),
            Err(Reject::Revoked)
        );
        let w = known(false, &window, false);
        assert_eq!(
            check(&frame, id, TopicKind::Birth, Some(&w)),
            Err(Reject::TopicMismatch)
        );
        let other = Secret::from_bytes([9; 32]);
        let wrong = [&other];
        let stranger = Sender {
            secrets: &wrong,
            ..known(false, &window, false)
        };
        assert_eq!(
            check(&frame, id, TopicKind::Metrics, Some(&stranger)),
            Err(Reject::BadTag)
        );
        // Either of two secrets: the index says which.
        let both = [&other, &secret];
        let rotating = Sender {
            secrets: &both,
            ..known(false, &window, false)
        };
        assert_eq!(
            check(&frame, id, TopicKind::Metrics, Some(&rotating))
                .unwrap()
                .1,
            1
        );
        let mut seen = window;
        seen.accept(7);
        let again = known(false, &seen, false);
        assert_eq!(
            check(&frame, id, TopicKind::Metrics, Some(&again)),
            Err(Reject::Replayed)
        );
        let resend = known(false, &seen, true);
        assert_eq!(
            check(&frame, id, TopicKind::Metrics, Some(&resend)),
            Err(Reject::Duplicate)
        );
    }
}
