//! Liveness: online → stale → offline, on the conductor's monotonic clock.
//!
//! A worker is `online` after a good frame, `stale` when no good frame came
//! for more than one interval + 25 %, `offline` after more than three
//! intervals or on its last-will `offline` status. Only a good frame moves
//! it back to `online`; the ticker only ever degrades a status. The interval
//! is the worker's last Birth `interval_ms` (the configured default before
//! that), or, while it batches its metrics, its last `MetricsBatch`'s
//! `period_ms` (the longest it waits between two metrics frames: a worker
//! batching 5 minutes is stale after 6¼ minutes without a frame, offline
//! after 15); a plain `Metrics` frame outside a live period puts the
//! Birth's back ([`crate::ingest`]). The ticker runs at a quarter of the shortest interval, at most
//! every 250 ms and at least every 25 ms. Status changes are persisted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::info;

use crate::state::{Shared, Status};
use crate::store::WriteOp;

/// The status a worker should have `elapsed` after its last good frame.
pub fn status_after(elapsed: Duration, interval_ms: u32) -> Status {
    let interval = u128::from(interval_ms.max(1));
    let e = elapsed.as_millis();
    if e > 3 * interval {
        Status::Offline
    } else if e * 4 > 5 * interval {
        Status::Stale
    } else {
        Status::Online
    }
}

/// One pass over all workers; returns the tick period to use next.
pub fn tick(shared: &Shared, now: Instant) -> Duration {
    let mut shortest = u32::MAX;
    let mut workers = shared.workers();
    for w in workers.values_mut() {
        shortest = shortest.min(w.interval_ms);
        let Some(last) = w.last_good else { continue };
        let target = status_after(now.saturating_duration_since(last), w.interval_ms);
        if target > w.status {
            info!(worker_id = %w.id, from = w.status.as_str(), to = target.as_str(), "liveness change");
            w.status = target;
            let _ = shared.writer.send(WriteOp::Status {
                worker_id: w.id.clone(),
                status: target.as_str(),
            });
        }
    }
    Duration::from_millis(u64::from(shortest / 4).clamp(25, 250))
}

/// Runs the ticker until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut period = Duration::from_millis(250);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => break,
        }
        period = tick(&shared, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let ms = Duration::from_millis;
        assert_eq!(status_after(ms(0), 1000), Status::Online);
        assert_eq!(status_after(ms(1250), 1000), Status::Online);
        assert_eq!(status_after(ms(1251), 1000), Status::Stale);
        assert_eq!(status_after(ms(3000), 1000), Status::Stale);
        assert_eq!(status_after(ms(3001), 1000), Status::Offline);
    }
}
