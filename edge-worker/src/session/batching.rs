//! Metrics batching (`--batch`): samples are taken every interval and sent
//! together, one [`MetricsBatch`] frame per batch period, so a metered link
//! carries one publish and one acknowledgement every few minutes instead of
//! one every interval ([`protocol::batch`]).
//!
//! * **Only to a conductor that reads batches**: one whose `Stored` carries
//!   [`protocol::STORED_ACCEPTS_BATCH`]. Until then (and with `--batch 0`,
//!   and after acknowledgements stop) every sample goes at once as a plain
//!   `Metrics` frame, as before batching existed.
//! * **The first batch of a run goes at once** (one sample), so the
//!   conductor learns the batch period (its liveness clock for this worker)
//!   within one interval of the first acknowledgement; then a batch goes
//!   every `period / interval` samples (at most
//!   [`protocol::batch::MAX_BATCH_SAMPLES`]), or earlier when the next
//!   sample would not fit its bytes.
//! * **Live**: while `Action::Live` runs, samples are taken at its interval
//!   and each goes at once; a pending batch is sent first, so seqs and
//!   sample times stay in order.
//! * **Limits**: samples of an unsent batch live in memory only: a power cut
//!   loses at most one batch period of samples (a clean shutdown sends
//!   them). Everything sealed is in the outbox, as before.

use std::time::{Duration, Instant};

use protocol::batch::{BatchWriter, MAX_BATCH_SAMPLES};
use protocol::{Body, LiveRequest, Metrics, MAX_LIVE_S};

use super::MIN_INTERVAL;

/// What [`Action::Live`](protocol::Action::Live) set.
#[derive(Debug, Clone, Copy)]
struct Live {
    until: Instant,
    interval: Duration,
}

/// The batch being filled, and the live period. See the module docs.
#[derive(Debug)]
pub(super) struct Batcher {
    /// `--batch`: the batch period asked for; zero = no batching.
    period: Duration,
    /// The samples not sent yet, delta-encoded.
    writer: BatchWriter,
    /// When the newest sample in `writer` was taken.
    last_sample_at: Option<Instant>,
    /// A batch went to the conductor this run (the first goes at once).
    announced: bool,
    /// `Some` while an `Action::Live` runs.
    live: Option<Live>,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Batcher {
    /// Batches of `period` (zero: off).
    pub(super) fn new(period: Duration) -> Batcher {
        Batcher {
            period,
            writer: BatchWriter::new(),
            last_sample_at: None,
            announced: false,
            live: None,
        }
    }

    /// Samples per batch at `interval`: `period / interval`, 1 to
    /// [`MAX_BATCH_SAMPLES`].
    fn target(&self, interval: Duration) -> usize {
        let n = self.period.as_millis() / interval.as_millis().max(1);
        usize::try_from(n)
            .unwrap_or(MAX_BATCH_SAMPLES)
            .clamp(1, MAX_BATCH_SAMPLES)
    }

    /// The batch period actually used at `interval` (a whole number of
    /// intervals); zero when batching is off.
    pub(super) fn period(&self, interval: Duration) -> Duration {
        if self.period.is_zero() {
            return Duration::ZERO;
        }
        // fits: target ≤ 64.
        #[allow(clippy::cast_possible_truncation)]
        let n = self.target(interval) as u32;
        interval.saturating_mul(n)
    }

    /// The longest the conductor waits between metrics frames (a birth's
    /// `interval_ms`): the batch period when batches go (`batching`), else
    /// the interval.
    pub(super) fn liveness(&self, interval: Duration, batching: bool) -> Duration {
        if batching && !self.period.is_zero() {
            self.period(interval)
        } else {
            interval
        }
    }

    /// The sampling interval now: while `Live` runs, its interval (or the
    /// configured one, if shorter).
    pub(super) fn tick_interval(&self, interval: Duration, now: Instant) -> Duration {
        match self.live {
            Some(l) if now < l.until => l.interval.min(interval),
            _ => interval,
        }
    }

    /// Ends a live period that is over; true if one ended (the ticker goes
    /// back to the interval).
    pub(super) fn end_live_if_over(&mut self, now: Instant) -> bool {
        if self.live.is_some_and(|l| now >= l.until) {
            self.live = None;
            tracing::info!("live metrics over; batching again");
            return true;
        }
        false
    }

    /// Starts (or renews) a live period; returns the pending batch, to be
    /// sent before the live samples.
    pub(super) fn start_live(
        &mut self,
        req: &LiveRequest,
        interval: Duration,
        now: Instant,
    ) -> Option<Body> {
        let for_s = req.for_s.min(MAX_LIVE_S);
        let live_interval = Duration::from_millis(u64::from(req.interval_ms)).max(MIN_INTERVAL);
        self.live = Some(Live {
            until: now + Duration::from_secs(u64::from(for_s)),
            interval: live_interval,
        });
        self.flush(interval, now)
    }

    /// Takes one sample taken at `now` (at `interval`); returns what to
    /// queue, oldest first: nothing (kept for the batch), the batch, or
    /// the sample as a `Metrics` frame (after any pending batch).
    /// `batching`: the conductor reads batches.
    pub(super) fn on_sample(
        &mut self,
        m: Metrics,
        interval: Duration,
        batching: bool,
        now: Instant,
    ) -> Vec<Body> {
        let mut out = Vec::new();
        let live = self.live.is_some_and(|l| now < l.until);
        if self.period.is_zero() || !batching || live {
            out.extend(self.flush(interval, now));
            out.push(Body::Metrics(m));
            return out;
        }
        if self.writer.push(&m).is_err() {
            // Full: send what it holds, and start the next batch with `m`.
            out.extend(self.flush(interval, now));
            if let Err(e) = self.writer.push(&m) {
                // A whole sample always fits an empty batch
                // (`tests/limits.rs`); sent on its own if not.
                tracing::warn!("a sample does not fit a batch ({e}); sent alone");
                out.push(Body::Metrics(m));
                return out;
            }
        }
        self.last_sample_at = Some(now);
        if !self.announced || self.writer.len() >= self.target(interval) {
            out.extend(self.flush(interval, now));
        }
        out
    }

    /// The pending batch as a frame body (`None` if empty), taken at
    /// `interval`; the batch starts empty again.
    pub(super) fn flush(&mut self, interval: Duration, now: Instant) -> Option<Body> {
        if self.writer.is_empty() {
            return None;
        }
        let age = self
            .last_sample_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.announced = true;
        Some(Body::MetricsBatch(self.writer.finish(
            ms(interval),
            ms(self.period(interval)),
            ms(age),
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use protocol::examples;

    const TEN: Duration = Duration::from_secs(10);

    fn batch(body: &Body) -> &protocol::MetricsBatch {
        match body {
            Body::MetricsBatch(b) => b,
            other => panic!("expected a batch, got {:?}", other.kind()),
        }
    }

    #[test]
    fn the_first_goes_at_once_then_one_batch_per_period() {
        let mut b = Batcher::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let m = examples::metrics();
        let first = b.on_sample(m.clone(), TEN, true, t0);
        assert_eq!(first.len(), 1);
        assert_eq!(batch(&first[0]).count, 1);
        assert_eq!(batch(&first[0]).period_ms, 60_000);
        let mut sent = Vec::new();
        for i in 1..=12u32 {
            sent.extend(b.on_sample(m.clone(), TEN, true, t0 + TEN * i));
        }
        // 12 samples at 10 s in 60 s batches: two batches of six.
        assert_eq!(sent.len(), 2);
        for s in &sent {
            let s = batch(s);
            assert_eq!((s.count, s.interval_ms, s.age_ms), (6, 10_000, 0));
            assert_eq!(s.decode().unwrap().len(), 6);
        }
        assert_eq!(b.liveness(TEN, true), Duration::from_secs(60));
        assert_eq!(b.liveness(TEN, false), TEN);
    }

    #[test]
    fn without_the_conductors_consent_or_when_off_every_sample_goes_alone() {
        let m = examples::metrics();
        let now = Instant::now();
        let mut off = Batcher::new(Duration::ZERO);
        assert!(matches!(
            off.on_sample(m.clone(), TEN, true, now)[..],
            [Body::Metrics(_)]
        ));
        assert_eq!(off.liveness(TEN, true), TEN);
        let mut b = Batcher::new(Duration::from_secs(300));
        assert!(matches!(
            b.on_sample(m.clone(), TEN, false, now)[..],
            [Body::Metrics(_)]
        ));
        // Consent, then consent withdrawn with samples pending: the batch
        // goes first, then the sample on its own.
        b.on_sample(m.clone(), TEN, true, now);
        assert!(b.on_sample(m.clone(), TEN, true, now + TEN).is_empty());
        let out = b.on_sample(m, TEN, false, now + 2 * TEN);
        assert!(matches!(out[..], [Body::MetricsBatch(_), Body::Metrics(_)]));
        assert_eq!(batch(&out[0]).count, 1);
    }

    #[test]
    fn live_flushes_the_batch_then_sends_every_sample_until_it_ends() {
        let m = examples::metrics();
        let t0 = Instant::now();
        let mut b = Batcher::new(Duration::from_secs(300));
        b.on_sample(m.clone(), TEN, true, t0);
        assert!(b.on_sample(m.clone(), TEN, true, t0 + TEN).is_empty());
        let req = LiveRequest {
            interval_ms: 1000,
            for_s: 60,
        };
        let pending = b.start_live(&req, TEN, t0 + TEN + Duration::from_secs(3));
        let pending = pending.unwrap();
        assert_eq!(batch(&pending).count, 1);
        assert_eq!(batch(&pending).age_ms, 3000);
        let now = t0 + Duration::from_secs(20);
        assert_eq!(b.tick_interval(TEN, now), Duration::from_secs(1));
        assert!(matches!(
            b.on_sample(m.clone(), TEN, true, now)[..],
            [Body::Metrics(_)]
        ));
        assert!(!b.end_live_if_over(now));
        let later = t0 + Duration::from_secs(80);
        assert!(b.end_live_if_over(later));
        assert_eq!(b.tick_interval(TEN, later), TEN);
        assert!(b.on_sample(m, TEN, true, later).is_empty());
        // Clamped: at most MAX_LIVE_S, at least MIN_INTERVAL.
        let huge = LiveRequest {
            interval_ms: 1,
            for_s: u32::MAX,
        };
        b.start_live(&huge, TEN, later);
        assert_eq!(b.tick_interval(TEN, later), MIN_INTERVAL);
        // Never slower than the configured interval.
        let ms = Duration::from_millis;
        assert_eq!(b.tick_interval(ms(50), later), ms(50));
        let end = later + Duration::from_secs(u64::from(MAX_LIVE_S));
        assert!(b.end_live_if_over(end));
    }

    #[test]
    fn a_long_period_is_capped_at_the_most_samples_a_batch_holds() {
        let b = Batcher::new(Duration::from_secs(3600));
        assert_eq!(b.period(Duration::from_secs(1)), Duration::from_secs(64));
        assert_eq!(b.period(TEN), Duration::from_secs(640));
        let short = Batcher::new(Duration::from_secs(1));
        assert_eq!(short.period(TEN), TEN);
    }
}
