//! Live metrics while someone looks at a batching worker.
//!
//! A worker on a metered link sends its samples in one `MetricsBatch` frame
//! per batch period ([`protocol::batch`], minutes apart), which is too slow
//! for someone watching its page. While someone looks, the conductor sends
//! it `Action::Live { interval_ms: LIVE_INTERVAL_MS, for_s: LIVE_FOR_S }`
//! on its command topic (QoS 1, no reply): for that long the worker samples
//! every [`LIVE_INTERVAL_MS`] and sends each sample at once as a `Metrics`
//! frame, then batches again.
//!
//! * **Who looks**: a `GET /api/v1/workers/{id}?live=1` (what the
//!   dashboard's worker page polls every 2 s) or an explicit
//!   `POST /api/v1/workers/{id}/live`. A plain `GET /api/v1/workers/{id}`
//!   does not count (scripts and the CLI poll it), nor does the history route
//!   (`GET /workers/{id}/metrics`) does not count: the fleet page polls it
//!   for every worker's sparkline.
//! * **Renewal**: a look sends a `Live` only when less than half of the
//!   last one's period remains ([`WorkerEntry::live_until_ms`]), so a
//!   worker gets at most one per `LIVE_FOR_S / 2` however many look, and a
//!   page left open keeps it live; closed, the period runs out.
//! * **Only to batching workers** ([`WorkerEntry::batching`]) that are not
//!   revoked or offline: an agent that never sent a batch does not know the
//!   action, and an offline one would get it whenever it is back.

use rumqttc::{AsyncClient, QoS};
use tracing::{debug, warn};

use crate::state::{now_ms, Shared, Status, WorkerEntry};

/// The sampling interval a `Live` asks for, ms.
pub const LIVE_INTERVAL_MS: u32 = 1000;
/// How long a `Live` lasts, s (within [`protocol::MAX_LIVE_S`]).
pub const LIVE_FOR_S: u32 = 120;
/// After [`WorkerEntry::live_until_ms`], how long plain `Metrics` frames
/// are still taken as the live period's ([`in_live`]) rather
/// than as the worker having stopped batching: the worker's period starts
/// when the command reaches it, and frames can wait in its outbox.
pub const LIVE_GRACE_MS: u64 = 30_000;

const LIVE_FOR_MS: u64 = LIVE_FOR_S as u64 * 1000;

const _: () = assert!(LIVE_FOR_S <= protocol::MAX_LIVE_S);

/// Why a worker was not asked for live metrics.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// No such worker.
    #[error("no such worker")]
    NotFound,
    /// The worker is revoked.
    #[error("the worker is revoked")]
    Revoked,
    /// The worker does not send metrics batches (its metrics are live
    /// already, or its agent does not know `Live`).
    #[error("the worker does not batch its metrics (they arrive as they are taken)")]
    NotBatching,
    /// The worker is offline.
    #[error("the worker is offline")]
    Offline,
    /// The command could not be sealed or its seq persisted.
    #[error("cannot seal the command: {0}")]
    Seal(String),
    /// The MQTT queue refused the publish.
    #[error("MQTT queue unavailable: {0}")]
    Queue(String),
}

/// A worker's live period after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveState {
    /// When its live period runs out (conductor clock, ms).
    pub live_until_ms: u64,
    /// This look sent a `Live` (else the running one has more than half
    /// its period left).
    pub sent: bool,
}

/// Is a plain `Metrics` frame from `w` received at `now_ms` part of a live
/// period: one asked for by an `Action::Live` that has not run out,
/// allowing [`LIVE_GRACE_MS`] for the worker's later start and frames
/// still on their way.
pub fn in_live(w: &WorkerEntry, now_ms: u64) -> bool {
    w.live_until_ms
        .is_some_and(|until| now_ms <= until.saturating_add(LIVE_GRACE_MS))
}

/// Does a look at `now_ms` send a `Live` to `w`: less than half of the
/// last one's period remains (or none was sent).
fn due(w: &WorkerEntry, now_ms: u64) -> bool {
    w.live_until_ms
        .is_none_or(|until| until.saturating_sub(now_ms) < LIVE_FOR_MS / 2)
}

/// Someone looks at worker `id`: sends it a `Live` when it batches and its
/// live period is due a renewal (see the module docs).
pub fn look(shared: &Shared, client: &AsyncClient, id: &str) -> Result<LiveState, LiveError> {
    let now = now_ms();
    let (frame, previous, until) = {
        let mut workers = shared.workers();
        let w = workers.get_mut(id).ok_or(LiveError::NotFound)?;
        if w.revoked {
            return Err(LiveError::Revoked);
        }
        if !w.batching {
            return Err(LiveError::NotBatching);
        }
        if w.status == Status::Offline {
            return Err(LiveError::Offline);
        }
        if !due(w, now) {
            return Ok(LiveState {
                live_until_ms: w.live_until_ms.unwrap_or(now),
                sent: false,
            });
        }
        let action = protocol::Action::Live(protocol::LiveRequest {
            interval_ms: LIVE_INTERVAL_MS,
            for_s: LIVE_FOR_S,
        });
        let (_, frame) = crate::commands::seal_command(shared, w, action)
            .map_err(|e| LiveError::Seal(e.to_string()))?;
        let until = now.saturating_add(LIVE_FOR_MS);
        let previous = w.live_until_ms.replace(until);
        (frame, previous, until)
    };
    let topic = protocol::topic::topic(id, protocol::TopicKind::Cmd);
    if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, frame) {
        // Not sent: the next look tries again.
        if let Some(w) = shared.workers().get_mut(id) {
            if w.live_until_ms == Some(until) {
                w.live_until_ms = previous;
            }
        }
        warn!(worker_id = id, "cannot queue a Live command: {e}");
        return Err(LiveError::Queue(e.to_string()));
    }
    debug!(
        worker_id = id,
        for_s = LIVE_FOR_S,
        interval_ms = LIVE_INTERVAL_MS,
        "live metrics asked for"
    );
    Ok(LiveState {
        live_until_ms: until,
        sent: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_is_renewed_only_in_the_second_half_of_its_period() {
        let mut w = crate::state::test_entry();
        assert!(due(&w, 1_000), "none sent yet");
        w.live_until_ms = Some(1_000 + LIVE_FOR_MS);
        assert!(!due(&w, 1_000));
        assert!(!due(&w, 1_000 + LIVE_FOR_MS / 2), "exactly half left");
        assert!(due(&w, 1_001 + LIVE_FOR_MS / 2));
        assert!(due(&w, 5_000 + LIVE_FOR_MS), "run out");
        // Plain metrics count as the live period's until the grace is over.
        assert!(in_live(&w, 1_000 + LIVE_FOR_MS + LIVE_GRACE_MS));
        assert!(!in_live(&w, 1_001 + LIVE_FOR_MS + LIVE_GRACE_MS));
    }
}
