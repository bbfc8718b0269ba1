//! The store-and-forward queue: every sealed frame the worker sends, in seq
//! order, until the broker acknowledges it.
//!
//! * **One queue, seq order.** Frames are appended with strictly increasing
//!   seqs and published from the front; a frame leaves only when its PubAck
//!   arrives ([`Outbox::ack`]). After a reconnect everything still queued is
//!   published again from the front ([`Outbox::reset_in_flight`]).
//! * **Bounded.** At most `capacity` frames; on overflow the *oldest* frame
//!   is dropped and counted ([`Outbox::take_dropped`]).
//! * **Persisted in batches** to `outbox.bin` so a power cut or restart does
//!   not lose queued frames, without writing to the SD card while the link is
//!   healthy: the file is rewritten only when frames have waited un-acked
//!   for `flush_interval` ([`Outbox::flush_due`]) and on clean shutdown, and
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

#[derive(Debug)]
struct Entry {
    frame: Frame,
    /// Handed to the MQTT client on the current connection, awaiting PubAck.
    in_flight: bool,
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
    /// Number of entries with `in_flight` set. Invariant: those entries form
    /// a prefix of `frames` (frames are sent from the front, in order).
    in_flight: usize,
    path: PathBuf,
    /// When the first frame not yet in the file was queued; `None` when the
    /// file holds everything queued (or the queue is empty).
    dirty_since: Option<Instant>,
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
            in_flight: 0,
            path: dir.join(OUTBOX_FILE),
            dirty_since: None,
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
        let mut pos = MAGIC.len();
        let mut last_seq = 0u64;
        while pos < bytes.len() {
            match parse_one(&bytes[pos..], worker_id, secret, last_seq) {
                Ok((frame, used)) => {
                    last_seq = frame.seq;
                    pos += used;
                    if outbox.frames.len() == outbox.capacity {
                        outbox.frames.pop_front();
                        outbox.dropped += 1;
                    }
                    outbox.frames.push_back(Entry {
                        frame,
                        in_flight: false,
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
        (outbox, report)
    }

    /// Appends a frame (its seq must be above every queued seq). Returns how
    /// many old frames were dropped to make room (0 or 1).
    pub fn push(&mut self, frame: Frame, now: Instant) -> usize {
        let mut dropped = 0;
        while self.frames.len() >= self.capacity {
            if let Some(old) = self.frames.pop_front() {
                if old.in_flight {
                    self.in_flight -= 1;
                }
                dropped += 1;
            }
        }
        self.dropped += dropped as u64;
        self.frames.push_back(Entry {
            frame,
            in_flight: false,
        });
        self.dirty_since.get_or_insert(now);
        dropped
    }

    /// The next frame to publish on this connection: the oldest one not yet
    /// in flight, if fewer than `window` are in flight.
    pub fn next_to_send(&self, window: usize) -> Option<&Frame> {
        if self.in_flight >= window {
            return None;
        }
        self.frames.get(self.in_flight).map(|e| &e.frame)
    }

    /// Marks the frame returned by [`Outbox::next_to_send`] as handed to the
    /// client.
    pub fn mark_sent(&mut self, seq: u64) {
        if let Some(e) = self.frames.get_mut(self.in_flight) {
            if e.frame.seq == seq && !e.in_flight {
                e.in_flight = true;
                self.in_flight += 1;
            }
        }
    }

    /// Removes the frame with `seq` (its PubAck arrived). Returns whether it
    /// was still queued (it may have been dropped by an overflow meanwhile).
    pub fn ack(&mut self, seq: u64) -> bool {
        let Some(pos) = self.frames.iter().position(|e| e.frame.seq == seq) else {
            return false;
        };
        if let Some(e) = self.frames.remove(pos) {
            if e.in_flight {
                self.in_flight -= 1;
            }
        }
        if self.frames.is_empty() {
            self.dirty_since = None;
        }
        true
    }

    /// The connection dropped: nothing is in flight any more, everything is
    /// published again from the front on the next connection.
    pub fn reset_in_flight(&mut self) {
        for e in &mut self.frames {
            e.in_flight = false;
        }
        self.in_flight = 0;
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

    /// Frames in flight on the current connection.
    pub fn in_flight(&self) -> usize {
        self.in_flight
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

    /// When the batched write is due: `flush_interval` after the first frame
    /// the file does not hold was queued. `None` when nothing needs writing.
    pub fn flush_due(&self, flush_interval: Duration) -> Option<Instant> {
        self.dirty_since.map(|t| t + flush_interval)
    }

    /// Brings `outbox.bin` in line with the queue: removes it when the queue
    /// is empty, rewrites it when it lacks queued frames, else does nothing.
    /// Call when [`Outbox::flush_due`] has passed, after acks drained the
    /// queue, and on shutdown. Performs at most one write or unlink.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if self.frames.is_empty() {
            self.dirty_since = None;
            if self.file_has_frames {
                match fs::remove_file(&self.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        // Not retried: a stale file only re-sends frames
                        // the conductor already has (refused as replays).
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
        if self.dirty_since.is_none() {
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
            // Sealed frames are at most MAX_FRAME_LEN bytes, so this fits in u32.
            buf.extend_from_slice(&(e.frame.bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(&e.frame.bytes);
        }
        if let Err(e) = write_atomic(&self.path, &buf) {
            // Try again one flush interval later rather than at once.
            self.dirty_since = Some(Instant::now());
            return Err(e.into());
        }
        self.file_has_frames = true;
        self.dirty_since = None;
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
    secret: &Secret,
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
    let opened = protocol::open(bytes).map_err(|e| e.to_string())?;
    if opened.worker_id() != worker_id {
        return Err(format!("frame for another worker ({})", opened.worker_id()));
    }
    let env = opened
        .verify(secret)
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
        assert!(o.ack(2), "out-of-order ack is fine");
        assert_eq!(o.next_to_send(3).map(|f| f.seq), Some(4));
        assert!(!o.ack(2), "double ack ignored");
        // Reconnect: everything un-acked goes again from the front.
        o.reset_in_flight();
        assert_eq!(o.in_flight(), 0);
        assert_eq!(o.next_to_send(3).map(|f| f.seq), Some(1));
        assert_eq!(seqs(&o), vec![1, 3, 4, 5]);
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
        assert!(!o.ack(1));
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
        o.ack(1);
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
        o.ack(2);
        o.sync().unwrap();
        assert!(path.exists(), "still one frame queued");
        o.ack(3);
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
        let len = fs::metadata(dir.path().join(OUTBOX_FILE)).unwrap().len() as usize;
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
            buf.extend_from_slice(&(f.bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(&f.bytes);
        }
        fs::write(dir.path().join(OUTBOX_FILE), &buf).unwrap();
        let (o, report) = Outbox::load(dir.path(), 10, "w-test", &secret());
        assert_eq!(seqs(&o), vec![5, 6]);
        assert!(report.problem.unwrap().contains("not above"));
    }
}
