//! Replay protection by sequence number.
//!
//! Each sender numbers its frames with a strictly increasing `seq`. The
//! receiver keeps the highest accepted `seq` plus a 64-frame bitmap below it
//! (the IPsec anti-replay window, RFC 4303 §3.4.3), so frames that a broker
//! delivers slightly out of order are still accepted once, while any frame
//! seen before — or older than the window — is refused. Timestamps play no
//! part: devices without an RTC boot with a wrong clock.
//!
//! The window is two integers, so the conductor persists it with the worker
//! record and replays stay refused across a conductor restart.

/// Width of the out-of-order window, in frames.
pub const WINDOW: u64 = 64;

/// What [`ReplayWindow::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// First time this seq is seen: accept.
    Fresh,
    /// Seen before (a replay or a redelivery): drop.
    Replayed,
    /// Older than the window: drop.
    TooOld,
}

/// Highest accepted seq plus a bitmap of the [`WINDOW`] seqs below it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest seq accepted so far (0 = none; senders start at 1).
    pub highest: u64,
    /// Bit `i` set ⇔ seq `highest - i` was accepted (bit 0 is `highest`).
    pub bitmap: u64,
}

impl ReplayWindow {
    /// Restores a persisted window.
    pub fn new(highest: u64, bitmap: u64) -> Self {
        ReplayWindow { highest, bitmap }
    }

    /// Checks `seq` without recording it.
    pub fn check(&self, seq: u64) -> SeqVerdict {
        if seq == 0 {
            return SeqVerdict::TooOld;
        }
        if seq > self.highest {
            return SeqVerdict::Fresh;
        }
        let age = self.highest - seq;
        if age >= WINDOW {
            SeqVerdict::TooOld
        } else if self.bitmap & (1 << age) != 0 {
            SeqVerdict::Replayed
        } else {
            SeqVerdict::Fresh
        }
    }

    /// Records an accepted `seq`; call only after [`check`](Self::check)
    /// returned `Fresh` **and** the frame authenticated.
    pub fn accept(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.bitmap = if shift >= WINDOW {
                0
            } else {
                self.bitmap << shift
            };
            self.bitmap |= 1;
            self.highest = seq;
        } else {
            let age = self.highest - seq;
            if age < WINDOW {
                self.bitmap |= 1 << age;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_frames_are_fresh_once() {
        let mut w = ReplayWindow::default();
        for seq in 1..200 {
            assert_eq!(w.check(seq), SeqVerdict::Fresh);
            w.accept(seq);
            assert_eq!(w.check(seq), SeqVerdict::Replayed);
        }
        assert_eq!(w.check(199 - WINDOW), SeqVerdict::TooOld);
    }

    #[test]
    fn out_of_order_within_window_accepted_once() {
        let mut w = ReplayWindow::default();
        w.accept(10);
        assert_eq!(w.check(7), SeqVerdict::Fresh);
        w.accept(7);
        assert_eq!(w.check(7), SeqVerdict::Replayed);
        assert_eq!(w.check(8), SeqVerdict::Fresh);
        w.accept(100);
        assert_eq!(w.check(10), SeqVerdict::TooOld);
        assert_eq!(w.check(0), SeqVerdict::TooOld);
    }

    #[test]
    fn large_jump_clears_bitmap() {
        let mut w = ReplayWindow::default();
        w.accept(1);
        w.accept(1_000_000);
        assert_eq!(w.bitmap, 1);
        assert_eq!(w.check(999_999), SeqVerdict::Fresh);
    }
}
