//! The store-and-forward queue: every sealed frame the worker sends, in seq
//! order, until the conductor has durably processed it.
//!
//! * **One queue, seq order.** Frames are appended with strictly increasing
//!   seqs and published from the front, at most `window` awaiting a PubAck.
//!   A frame's states: *queued* (not published on this connection),
//!   *in flight* (awaiting the broker's PubAck), *broker-acked* (PubAck
//!   arrived, [`Outbox::broker_acked`]; never published again on this
//!   connection). It leaves when the conductor's `Stored(n)` covers it
//!   ([`Outbox::stored`]: every frame with seq ≤ n), since a broker PubAck
//!   alone does not survive a conductor crash (the embedded broker runs in
//!   the conductor's process). After a reconnect everything still queued —
//!   broker-acked or not — is published again from the front, in seq order
//!   ([`Outbox::reset_in_flight`]); the conductor drops what it already has
//!   as duplicates.
//! * **A conductor that never acknowledges** (one older than `Stored`): a
//!   frame broker-acked longer than the `stored_timeout` given to
//!   [`Outbox::expire`] ago is dropped, and the session then frees frames at
//!   the PubAck ([`Outbox::drop_broker_acked`]) until a `Stored` arrives, so
//!   the queue and the file behave as they did before `Stored`.
//! * **Bounded.** At most `capacity` frames, whatever their state; on
//!   overflow the *oldest* frame is dropped and counted
//!   ([`Outbox::take_dropped`]).
//! * **Persisted in batches** to `outbox.bin` so a power cut or restart does
//!   not lose queued frames, without writing to the SD card while the link is
//!   healthy: the file is rewritten only when a frame it does not hold has
//!   been queued for `flush_interval` ([`Outbox::flush_due`]; acknowledged
//!   frames leave within seconds, well before) and on clean shutdown, and
//!   removed (one unlink) when the queue drains.
//!
//! File format (`outbox.bin`): the magic `AEOB` then, per frame, a
//! little-endian `u32` length and the sealed frame bytes. Limits: at most
//! `capacity` frames of at most [`protocol::MAX_FRAME_LEN`] bytes each, so the
//! file never exceeds `8 + capacity × (4 + MAX_FRAME_LEN)` bytes. Loading
//! stops at the first corrupt or foreign frame (bad length, undecodable,
//! wrong worker id, bad tag, seq not increasing) and keeps what came before.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use protocol::{BodyKind, Secret, MAX_FRAME_LEN};

use crate::state::{sync_dir, write_atomic, StateError};

/// File name inside the state dir.
pub const OUTBOX_FILE: &str = "outbox.bin";
const MAGIC: &[u8; 4] = b"AEOB";

/// Errors persisting the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Writing `outbox.bin` failed.
    #[error(transparent)]
    Write(#[from] StateError),
    /// Removing the drained `outbox.bin` failed.
    #[error("cannot remove {path}: {source}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// One queued sealed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame's sequence number (also inside `bytes`).
    pub seq: u64,
    /// Its body kind (decides the topic).
    pub kind: BodyKind,
    /// The sealed bytes, exactly as published.
    pub bytes: Vec<u8>,
}

/// Where a queued frame stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not published on this connection.
    Queued,
    /// Handed to the MQTT client, awaiting the broker's PubAck.
    InFlight,
    /// PubAcked by the broker at this time; awaiting the conductor's `Stored`.
    BrokerAcked(Instant),
}

#[derive(Debug)]
struct Entry {
    frame: Frame,
    state: State,
    /// When it was queued (or loaded): its age decides the batched write.
    queued_at: Instant,
}

/// What [`Outbox::load`] found in `outbox.bin`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Frames restored.
    pub loaded: usize,
    /// Bytes at the end of the file that were skipped as corrupt or foreign.
    pub skipped_bytes: usize,
    /// Why loading stopped early, if it did.
    pub problem: Option<String>,
}

/// The bounded, persisted queue of sealed frames. See the module docs.
#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<Entry>,
    /// Maximum frames held. Invariant: `frames.len() <= capacity`, `capacity >= 1`.
    capacity: usize,
    /// Number of entries not `Queued`. Invariant: those entries form a
    /// prefix of `frames` (frames are sent from the front, in order).
    sent: usize,
    /// Number of entries `InFlight` (all within the sent prefix).
    in_flight: usize,
    path: PathBuf,
    /// Highest seq `outbox.bin` holds (0: none); frames above it are not in
    /// the file.
    file_upto: u64,
    /// When a write last failed: it is retried one flush interval later.
    retry_from: Option<Instant>,
    /// `outbox.bin` exists with frames in it.
    file_has_frames: bool,
    /// Frames dropped since the last [`Outbox::take_dropped`].
    dropped: u64,
}

impl Outbox {
    /// An empty outbox persisted at `dir/outbox.bin` (nothing is read).
    pub fn new(dir: &Path, capacity: usize) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            capacity: capacity.max(1),
            sent: 0,
            in_flight: 0,
            path: dir.join(OUTBOX_FILE),
            file_upto: 0,
            retry_from: None,
            file_has_frames: false,
            dropped: 0,
        }
    }

    /// Restores frames from `dir/outbox.bin`, keeping only frames sealed for
    /// `worker_id` under `secret`, in increasing seq order; the newest
    /// `capacity` are kept. Never fails: an unreadable or corrupt file is
    /// reported in the [`LoadReport`] and its good prefix kept.
    pub fn load(
        dir: &Path,
        capacity: usize,
        worker_id: &str,
        secret: &Secret,
    ) -> (Outbox, LoadReport) {
        Outbox::load_any(dir, capacity, worker_id, &[secret])
    }

    /// [`Outbox::load`] keeping frames sealed under any of `secrets` (the
    /// current secret and, after a rotation, the previous one: frames queued
    /// before the switch go out as they were sealed).
    pub fn load_any(
        dir: &Path,
        capacity: usize,
        worker_id: &str,
        secrets: &[&Secret],
    ) -> (Outbox, LoadReport) {
        let mut outbox = Outbox::new(dir, capacity);
        let mut report = LoadReport::default();
        let bytes = match fs::read(&outbox.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (outbox, report),
            Err(e) => {
                report.problem = Some(format!("unreadable: {e}"));
                return (outbox, report);
            }
        };
        outbox.file_has_frames = true;
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            report.skipped_bytes = bytes.len();
            report.problem = Some("bad magic".into());
            return (outbox, report);
        }
        let now = Instant::now();
        let mut pos = MAGIC.len();
        let mut last_seq = 0u64;
        while pos < bytes.len() {
            match parse_one(&bytes[pos..], worker_id, secrets, last_seq) {
                Ok((frame, used)) => {
                    last_seq = frame.seq;
                    pos += used;
                    if outbox.frames.len() == outbox.capacity {
                        outbox.frames.pop_front();
                        outbox.dropped += 1;
                    }
                    outbox.frames.push_back(Entry {
                        frame,
                        state: State::Queued,
                        queued_at: now,
                    });
                    report.loaded += 1;
                }
                Err(why) => {
                    report.skipped_bytes = bytes.len() - pos;
                    report.problem = Some(why);
                    break;
                }
            }
        }
        // The file holds what was loaded.
        outbox.file_upto = last_seq;
        (outbox, report)
    }

    /// Removes the front entry, keeping the counts in line.
    fn pop_front(&mut self) -> Option<Entry> {
        let e = self.frames.pop_front()?;
        match e.state {
            State::Queued => {}
            State::InFlight => {
                self.in_flight -= 1;
                self.sent -= 1;
            }
            State::BrokerAcked(_) => self.sent -= 1,
        }
        Some(e)
    }

    /// Appends a frame (its seq must be above every queued seq). Returns how
    /// many old frames were dropped to make room (0 or 1).
    pub fn push(&mut self, frame: Frame, now: Instant) -> usize {
        let mut dropped = 0;
        while self.frames.len() >= self.capacity {
            if self.pop_front().is_some() {
                dropped += 1;
            }
        }
        self.dropped += dropped as u64;
        self.frames.push_back(Entry {
            frame,
            state: State::Queued,
            queued_at: now,
        });
        dropped
    }

    /// The next frame to publish on this connection: the oldest one not yet
    /// published on it, if fewer than `window` await a PubAck.
    pub fn next_to_send(&self, window: usize) -> Option<&Frame> {
        if self.in_flight >= window {
            return None;
        }
        self.frames.get(self.sent).map(|e| &e.frame)
    }

    /// Marks the frame returned by [`Outbox::next_to_send`] as handed to the
    /// client.
    pub fn mark_sent(&mut self, seq: u64) {
        if let Some(e) = self.frames.get_mut(self.sent) {
            if e.frame.seq == seq && e.state == State::Queued {
                e.state = State::InFlight;
                self.sent += 1;
                self.in_flight += 1;
            }
        }
    }

    /// The broker's PubAck for `seq` arrived at `now`: the frame stays
    /// queued (not published again on this connection) until a `Stored`
    /// covers it. Returns whether it was awaiting that PubAck.
    pub fn broker_acked(&mut self, seq: u64, now: Instant) -> bool {
        let pos = self.frames.partition_point(|e| e.frame.seq < seq);
        match self.frames.get_mut(pos) {
            Some(e) if e.frame.seq == seq && e.state == State::InFlight => {
                e.state = State::BrokerAcked(now);
                self.in_flight -= 1;
                true
            }
            _ => false,
        }
    }

    /// The conductor's `Stored(upto)`: removes every frame with seq ≤
    /// `upto`, whatever its state (one published on an earlier connection
    /// is covered too). Returns how many left.
    pub fn stored(&mut self, upto: u64) -> usize {
        let mut n = 0;
        while self.frames.front().is_some_and(|e| e.frame.seq <= upto) {
            self.pop_front();
            n += 1;
        }
        n
    }

    /// Drops frames broker-acked more than `stored_timeout` before `now`
    /// with no `Stored` since (a conductor that does not acknowledge):
    /// the front of the queue only, so seq order is kept. Returns how many.
    pub fn expire(&mut self, now: Instant, stored_timeout: Duration) -> usize {
        let mut n = 0;
        while let Some(e) = self.frames.front() {
            match e.state {
                State::BrokerAcked(at) if now.saturating_duration_since(at) >= stored_timeout => {
                    self.pop_front();
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }

    /// When [`Outbox::expire`] next has something to do: the front frame's
    /// PubAck time plus `stored_timeout`, if it is broker-acked.
    pub fn expire_due(&self, stored_timeout: Duration) -> Option<Instant> {
        match self.frames.front()?.state {
            State::BrokerAcked(at) => Some(at + stored_timeout),
            _ => None,
        }
    }

    /// Removes the frame with `seq` if it is the next to publish (one that
    /// cannot be published). Returns whether it was.
    pub fn discard_next(&mut self, seq: u64) -> bool {
        if self
            .frames
            .get(self.sent)
            .is_some_and(|e| e.frame.seq == seq)
        {
            self.frames.remove(self.sent);
            return true;
        }
        false
    }

    /// The connection dropped: nothing is published on the next one yet,
    /// everything queued (broker-acked or not) goes again from the front.
    pub fn reset_in_flight(&mut self) {
        for e in &mut self.frames {
            e.state = State::Queued;
        }
        self.sent = 0;
        self.in_flight = 0;
    }

    /// Drops the frames the broker acknowledged (the old at-PubAck rule; for
    /// a shutdown with a conductor that never sent `Stored`).
    pub fn drop_broker_acked(&mut self) -> usize {
        let before = self.frames.len();
        let mut in_flight = 0;
        self.frames.retain(|e| {
            in_flight += usize::from(e.state == State::InFlight);
            !matches!(e.state, State::BrokerAcked(_))
        });
        // What is left of the sent prefix is in flight, still a prefix.
        self.in_flight = in_flight;
        self.sent = in_flight;
        before - self.frames.len()
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// No frames queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Maximum frames held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Frames in flight on the current connection (awaiting a PubAck).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Every queued frame has been PubAcked by the broker on this
    /// connection (only `Stored` is awaited).
    pub fn all_broker_acked(&self) -> bool {
        self.in_flight == 0 && self.sent == self.frames.len()
    }

    /// Highest queued seq.
    pub fn last_seq(&self) -> Option<u64> {
        self.frames.back().map(|e| e.frame.seq)
    }

    /// The queued frames, oldest first.
    pub fn frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter().map(|e| &e.frame)
    }

    /// Frames dropped by overflow since the previous call; resets the count.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// When the batched write is due: `flush_interval` after the oldest
    /// frame the file does not hold was queued (no earlier than a failed
    /// write's retry time). `None` when nothing needs writing.
    pub fn flush_due(&self, flush_interval: Duration) -> Option<Instant> {
        let first = self
            .frames
            .partition_point(|e| e.frame.seq <= self.file_upto);
        let due = self.frames.get(first)?.queued_at + flush_interval;
        Some(self.retry_from.map_or(due, |r| due.max(r + flush_interval)))
    }

    /// Brings `outbox.bin` in line with the queue: removes it when the queue
    /// is empty, rewrites it when it lacks queued frames, else does nothing.
    /// Call when [`Outbox::flush_due`] has passed, after acks drained the
    /// queue, and on shutdown. Performs at most one write or unlink.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if self.frames.is_empty() {
            self.retry_from = None;
            if self.file_has_frames {
                match fs::remove_file(&self.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        // Not retried: a stale file only re-sends frames
                        // the conductor already has (refused as duplicates).
                        self.file_has_frames = false;
                        return Err(OutboxError::Remove {
                            path: self.path.clone(),
                            source,
                        });
                    }
                }
                self.file_has_frames = false;
                if let Some(dir) = self.path.parent() {
                    // Durability of the unlink is best-effort: a resurrected
                    // file only re-sends frames the conductor already has.
                    let _ = sync_dir(dir);
                }
            }
            return Ok(());
        }
        if self.last_seq().is_none_or(|last| last <= self.file_upto) {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(
            MAGIC.len()
                + self
                    .frames
                    .iter()
                    .map(|e| 4 + e.frame.bytes.len())
                    .sum::<usize>(),
        );
        buf.extend_from_slice(MAGIC);
        for e in &self.frames {
            // fits: sealed frames are at most MAX_FRAME_LEN bytes.
            #[allow(clippy::cast_possible_truncation)]
            let len = e.frame.bytes.len() as u32;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&e.frame.bytes);
        }
        if let Err(e) = write_atomic(&self.path, &buf) {
            // Try again one flush interval later rather than at once.
            self.retry_from = Some(Instant::now());
            return Err(e.into());
        }
        self.file_has_frames = true;
        self.file_upto = self.last_seq().unwrap_or(0);
        self.retry_from = None;
        Ok(())
    }

    /// Whether `outbox.bin` currently holds frames.
    pub fn file_has_frames(&self) -> bool {
        self.file_has_frames
    }
}

/// Parses one length-prefixed frame; `(frame, bytes consumed)`.
fn parse_one(
    buf: &[u8],
    worker_id: &str,
    secrets: &[&Secret],
    last_seq: u64,
) -> Result<(Frame, usize), String> {
    let len_bytes: [u8; 4] = buf
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("truncated length")?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(format!("bad frame length {len}"));
    }
    let bytes = buf.get(4..4 + len).ok_or("truncated frame")?;
    let opened = protocol::open(bytes, worker_id).map_err(|e| e.to_string())?;
    if opened.worker_id() != worker_id {
        return Err(format!("frame for another worker ({})", opened.worker_id()));
    }
    let (env, _) = opened
        .verify_any(secrets)
        .map_err(|_| "frame sealed with another secret".to_string())?;
    if env.seq <= last_seq {
        return Err(format!("seq {} not above {last_seq}", env.seq));
    }
    let kind = env.body.kind();
    if kind == BodyKind::Command {
        return Err("command frame in the outbox".into());
    }
    Ok((
        Frame {
            seq: env.seq,
            kind,
            bytes: bytes.to_vec(),
        },
        4 + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Body, Envelope, Event, EventKind};

    fn secret() -> Secret {
        Secret::from_bytes([7; 32])
    }

    fn frame(seq: u64) -> Frame {
        frame_for("w-test", &secret(), seq)
    }

    fn frame_for(id: &str, secret: &Secret, seq: u64) -> Frame {
        let env = Envelope {
            version: protocol::FORMAT_VERSION,
            worker_id: protocol::frame::bounded(id),
            seq,
            sent_at_ms: 0,
            body: Body::Event(Event {
                kind: EventKind::AgentStarted,
                detail: protocol::frame::bounded("x"),
            }),
        };
        Frame {
            seq,
            kind: BodyKind::Event,
            bytes: protocol::seal(secret, &env).unwrap(),
        }
    }

    fn seqs(o: &Outbox) -> Vec<u64> {
        o.frames().map(|f| f.seq).collect()
    }

    #[test]
    fn sends_in_order_with_a_window_and_acks_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 100);
        let now = Instant::now();
        for s in 1..=5 {
            o.push(frame(s), now);
        }
        let mut sent = Vec::new();
        while let Some(f) = o.next_to_send(3) {
            let seq = f.seq;
            sent.push(seq);
            o.mark_sent(seq);
        }
        assert_eq!(sent, vec![1, 2, 3], "window of 3, from the front");
        assert!(o.broker_acked(2, now), "out-of-order PubAck is fine");
        assert_eq!(o.next_to_send(3).map(|f| f.seq), Some(4));
        assert!(!o.broker_acked(2, now), "double PubAck ignored");
        assert_eq!(o.stored(3), 3, "Stored(3) frees 1..=3, acked or not");
        assert_eq!(o.in_flight(), 0);
        // Reconnect: everything not Stored goes again from the front.
        o.mark_sent(4);
        o.reset_in_flight();
        assert_eq!(o.in_flight(), 0);
        assert_eq!(o.next_to_send(3).map(|f| f.seq), Some(4));
        assert_eq!(seqs(&o), vec![4, 5]);
    }

    /// Publishes everything the window allows; returns the seqs handed out.
    fn send_all(o: &mut Outbox, window: usize) -> Vec<u64> {
        let mut sent = Vec::new();
        while let Some(seq) = o.next_to_send(window).map(|f| f.seq) {
            o.mark_sent(seq);
            sent.push(seq);
        }
        sent
    }

    #[test]
    fn broker_acked_frames_stay_until_stored_and_are_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 100);
        let now = Instant::now();
        for s in 1..=4 {
            o.push(frame(s), now);
        }
        assert_eq!(send_all(&mut o, 2), vec![1, 2]);
        assert!(o.broker_acked(1, now));
        assert!(o.broker_acked(2, now));
        assert_eq!(seqs(&o), vec![1, 2, 3, 4], "a PubAck alone frees nothing");
        assert_eq!(o.in_flight(), 0);
        // The window frees up, but 1 and 2 are not published again on
        // this connection: the next ones are 3 and 4.
        assert_eq!(send_all(&mut o, 2), vec![3, 4]);
        assert!(!o.all_broker_acked());
        o.broker_acked(3, now);
        o.broker_acked(4, now);
        assert!(o.all_broker_acked());
        assert_eq!(
            send_all(&mut o, 2),
            Vec::<u64>::new(),
            "nothing left to send"
        );

        // Stored(2) frees exactly the covered prefix.
        assert_eq!(o.stored(2), 2);
        assert_eq!(seqs(&o), vec![3, 4]);
        assert_eq!(o.stored(2), 0, "a repeated or late Stored is harmless");
        assert_eq!(o.stored(1), 0);
        // A Stored between seqs (gaps are normal) frees what it covers.
        o.push(frame(9), now);
        assert_eq!(o.stored(7), 2);
        assert_eq!(seqs(&o), vec![9]);
        assert_eq!(send_all(&mut o, 2), vec![9], "the new frame still goes out");
        assert_eq!(o.stored(u64::MAX), 1);
        assert!(o.is_empty());
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn reconnect_republishes_only_frames_not_stored_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 100);
        let now = Instant::now();
        for s in 1..=6 {
            o.push(frame(s), now);
        }
        assert_eq!(send_all(&mut o, 10), vec![1, 2, 3, 4, 5, 6]);
        for s in 1..=4 {
            o.broker_acked(s, now);
        }
        o.stored(2);
        // Connection lost: 3, 4 (broker-acked, never Stored) and 5, 6 (in
        // flight) all go again, from the front, in order.
        o.reset_in_flight();
        assert_eq!(send_all(&mut o, 10), vec![3, 4, 5, 6]);
        // A Stored for frames sent on the old connection still counts.
        o.stored(4);
        assert_eq!(seqs(&o), vec![5, 6]);
        assert_eq!(o.in_flight(), 2);
        o.broker_acked(5, now);
        o.broker_acked(6, now);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn without_stored_broker_acked_frames_expire_from_the_front() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 100);
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        for s in 1..=3 {
            o.push(frame(s), t0);
        }
        send_all(&mut o, 10);
        assert_eq!(o.expire_due(timeout), None, "nothing broker-acked yet");
        o.broker_acked(1, t0);
        o.broker_acked(3, t0 + Duration::from_secs(1));
        assert_eq!(o.expire_due(timeout), Some(t0 + timeout));
        assert_eq!(o.expire(t0 + Duration::from_secs(9), timeout), 0);
        // 2 still awaits its PubAck: expiry stops there (seq order kept).
        assert_eq!(o.expire(t0 + timeout, timeout), 1);
        assert_eq!(seqs(&o), vec![2, 3]);
        assert_eq!(o.expire_due(timeout), None);
        o.broker_acked(2, t0 + Duration::from_secs(5));
        assert_eq!(o.expire(t0 + Duration::from_secs(12), timeout), 0);
        assert_eq!(o.expire(t0 + Duration::from_secs(15), timeout), 2);
        assert!(o.is_empty());
        assert_eq!(o.in_flight(), 0);

        // The shutdown rule for a conductor that never acknowledges.
        for s in 4..=6 {
            o.push(frame(s), t0);
        }
        send_all(&mut o, 10);
        o.broker_acked(4, t0);
        o.broker_acked(6, t0);
        assert_eq!(o.drop_broker_acked(), 2);
        assert_eq!(seqs(&o), vec![5]);
        assert_eq!(o.in_flight(), 1);
        o.reset_in_flight();
        assert_eq!(send_all(&mut o, 10), vec![5]);
    }

    #[test]
    fn capacity_bound_holds_for_broker_acked_frames() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 3);
        let now = Instant::now();
        for s in 1..=3 {
            o.push(frame(s), now);
        }
        send_all(&mut o, 10);
        o.broker_acked(1, now);
        o.broker_acked(2, now);
        // Full of broker-acked and in-flight frames: the oldest go first.
        assert_eq!(o.push(frame(4), now), 1);
        assert_eq!(o.push(frame(5), now), 1);
        assert_eq!(o.len(), 3);
        assert_eq!(seqs(&o), vec![3, 4, 5]);
        assert_eq!(o.in_flight(), 1, "3 still in flight");
        assert_eq!(
            send_all(&mut o, 10),
            vec![4, 5],
            "the prefix stays consistent"
        );
        assert_eq!(o.push(frame(6), now), 1);
        assert_eq!(o.in_flight(), 2);
        assert_eq!(o.take_dropped(), 3);
        for s in 7..=50 {
            o.push(frame(s), now);
            assert!(o.len() <= 3);
        }
        assert_eq!(seqs(&o), vec![48, 49, 50]);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn healthy_link_with_stored_acks_never_writes_the_file() {
        // Frames every 100 ms, each PubAcked at once and Stored 2 s later
        // (the conductor's acknowledgement interval): the queue never
        // empties, but no frame waits 30 s, so no write is ever due.
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 1000);
        let flush = Duration::from_secs(30);
        let t0 = Instant::now();
        for i in 1..=600u64 {
            let now = t0 + Duration::from_millis(100 * i);
            o.push(frame(i), now);
            send_all(&mut o, 10);
            o.broker_acked(i, now);
            if i % 20 == 0 {
                o.stored(i - 20);
            }
            let due = o.flush_due(flush).expect("frames queued");
            assert!(
                due > now + Duration::from_secs(25),
                "write due at frame {i}"
            );
        }
        assert!(!dir.path().join(OUTBOX_FILE).exists());
        // Without acknowledgements the same traffic would be written.
        let mut stuck = Outbox::new(dir.path(), 1000);
        for i in 1..=600u64 {
            stuck.push(frame(i), t0 + Duration::from_millis(100 * i));
        }
        assert_eq!(
            stuck.flush_due(flush),
            Some(t0 + Duration::from_millis(100) + flush)
        );
    }

    #[test]
    fn overflow_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 3);
        let now = Instant::now();
        o.push(frame(1), now);
        o.mark_sent(1);
        assert_eq!(o.push(frame(2), now), 0);
        assert_eq!(o.push(frame(3), now), 0);
        assert_eq!(o.push(frame(4), now), 1);
        assert_eq!(o.push(frame(5), now), 1);
        assert_eq!(seqs(&o), vec![3, 4, 5]);
        assert_eq!(o.in_flight(), 0, "the in-flight frame was dropped");
        assert!(!o.broker_acked(1, now));
        assert_eq!(o.take_dropped(), 2);
        assert_eq!(o.take_dropped(), 0, "count resets");
    }

    #[test]
    fn persist_and_reload_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut o = Outbox::new(dir.path(), 10);
        for s in [3, 4, 9] {
            o.push(frame(s), t0);
        }
        let flush = Duration::from_secs(30);
        assert_eq!(o.flush_due(flush), Some(t0 + flush));
        o.sync().unwrap();
        assert_eq!(o.flush_due(flush), None, "clean after the write");
        let path = dir.path().join(OUTBOX_FILE);
        assert!(path.exists());
        let (again, report) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert_eq!(report.loaded, 3);
        assert_eq!(report.problem, None);
        assert_eq!(seqs(&again), vec![3, 4, 9]);
        assert_eq!(
            again.frames().map(|f| f.bytes.clone()).collect::<Vec<_>>(),
            o.frames().map(|f| f.bytes.clone()).collect::<Vec<_>>()
        );
        // Loaded with a smaller capacity: the newest are kept.
        let (small, _) = Outbox::load(dir.path(), 2, "w-test", &secret());
        assert_eq!(seqs(&small), vec![4, 9]);
    }

    #[test]
    fn corrupt_tail_is_skipped_and_good_prefix_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(dir.path(), 10);
        for s in 1..=3 {
            o.push(frame(s), Instant::now());
        }
        o.sync().unwrap();
        let path = dir.path().join(OUTBOX_FILE);
        let full = fs::read(&path).unwrap();

        // Torn write: the last frame cut in half.
        fs::write(&path, &full[..full.len() - 10]).unwrap();
        let (again, report) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert_eq!(seqs(&again), vec![1, 2]);
        assert!(report.problem.is_some() && report.skipped_bytes > 0);

        // Garbage appended.
        let mut garbage = full.clone();
        garbage.extend_from_slice(&[0xff; 37]);
        fs::write(&path, &garbage).unwrap();
        let (again, report) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert_eq!(seqs(&again), vec![1, 2, 3]);
        assert_eq!(report.skipped_bytes, 37);

        // A flipped bit inside the second frame: the tag catches it.
        let mut flipped = full.clone();
        let second = 4 + 4 + o.frames().next().unwrap().bytes.len() + 4 + 3;
        flipped[second] ^= 0x40;
        fs::write(&path, &flipped).unwrap();
        let (again, _) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert_eq!(seqs(&again), vec![1]);

        // Another worker's or another secret's frames are not ours.
        let (theirs, _) = Outbox::load(dir.path(), 10, "w-other", &secret());
        assert!(theirs.is_empty());
        let (rekeyed, _) = Outbox::load(dir.path(), 10, "w-test", &Secret::from_bytes([8; 32]));
        assert!(rekeyed.is_empty());

        // Not an outbox at all.
        fs::write(&path, b"hello").unwrap();
        let (none, report) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert!(none.is_empty());
        assert_eq!(report.problem.as_deref(), Some("bad magic"));
    }

    #[test]
    fn file_removed_when_drained_and_no_write_when_acked_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OUTBOX_FILE);
        let mut o = Outbox::new(dir.path(), 10);
        // Healthy link: pushed and acked before any flush is due.
        o.push(frame(1), Instant::now());
        o.mark_sent(1);
        o.broker_acked(1, Instant::now());
        assert!(
            o.flush_due(Duration::from_secs(30)).is_some(),
            "a PubAck alone does not clear it"
        );
        o.stored(1);
        assert_eq!(o.flush_due(Duration::from_secs(30)), None);
        o.sync().unwrap();
        assert!(
            !path.exists(),
            "nothing written while frames are acked promptly"
        );

        // Outage: frames persisted, then drained → file removed.
        o.push(frame(2), Instant::now());
        o.push(frame(3), Instant::now());
        o.sync().unwrap();
        assert!(path.exists());
        assert!(o.file_has_frames());
        o.stored(2);
        o.sync().unwrap();
        assert!(path.exists(), "still one frame queued");
        o.stored(3);
        o.sync().unwrap();
        assert!(!path.exists(), "drained → file removed");
        assert!(!o.file_has_frames());
        o.sync().unwrap();
    }

    #[test]
    fn file_size_is_bounded_by_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 5;
        let mut o = Outbox::new(dir.path(), cap);
        for s in 1..=50 {
            o.push(frame(s), Instant::now());
        }
        o.sync().unwrap();
        let len =
            usize::try_from(fs::metadata(dir.path().join(OUTBOX_FILE)).unwrap().len()).unwrap();
        assert!(len <= MAGIC.len() + cap * (4 + MAX_FRAME_LEN));
        let (again, _) = Outbox::load(dir.path(), cap, "w-test", &secret());
        assert_eq!(seqs(&again), vec![46, 47, 48, 49, 50]);
    }

    #[test]
    fn frames_with_non_increasing_seq_stop_loading() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = MAGIC.to_vec();
        for s in [5u64, 6, 6, 7] {
            let f = frame(s);
            buf.extend_from_slice(&u32::try_from(f.bytes.len()).unwrap().to_le_bytes());
            buf.extend_from_slice(&f.bytes);
        }
        fs::write(dir.path().join(OUTBOX_FILE), &buf).unwrap();
        let (o, report) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert_eq!(seqs(&o), vec![5, 6]);
        assert!(report.problem.unwrap().contains("not above"));
    }
}
