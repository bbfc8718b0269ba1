//! Exponential backoff with jitter, for enrolment retries and MQTT reconnects.

use std::time::Duration;

/// Doubling delays from `base` up to `cap`, each randomised to
/// `[d/2, d)` ("equal jitter") so a fleet restarted together does not
/// reconnect in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// The un-jittered delay the next call starts from. Invariant:
    /// `base <= current <= cap`.
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `base`, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        let cap = cap.max(base);
        Backoff {
            base,
            cap,
            current: base,
        }
    }

    /// The next delay (jittered), then doubles the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.cap);
        jitter(d)
    }

    /// The cap, jittered: used after errors that retrying soon cannot fix.
    pub fn at_cap(&self) -> Duration {
        jitter(self.cap)
    }

    /// Back to `base` (after a stable connection).
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

/// A random duration in `[d/2, d)`; `d` itself if the OS has no randomness.
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let span = u64::try_from((d - half).as_millis()).unwrap_or(u64::MAX);
    if span == 0 {
        return d;
    }
    let mut raw = [0u8; 8];
    if getrandom::fill(&mut raw).is_err() {
        return d;
    }
    half + Duration::from_millis(u64::from_le_bytes(raw) % span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut expected = Duration::from_millis(500);
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= expected / 2 && d <= expected, "{d:?} vs {expected:?}");
            expected = (expected * 2).min(Duration::from_secs(30));
        }
        assert!(b.next_delay() >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
        let c = b.at_cap();
        assert!(c >= Duration::from_secs(15) && c <= Duration::from_secs(30));
    }
}
