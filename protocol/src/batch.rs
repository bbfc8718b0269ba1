//! Metrics batches: the samples a worker took every interval, sent together
//! in one [`MetricsBatch`] frame per batch period, so that a metered link
//! carries one publish (and one acknowledgement) a few minutes instead of
//! one every interval, with the full history still stored.
//!
//! * **Seqs.** A batch of `count` samples covers the worker seqs
//!   `seq - count + 1 ..= seq`, where `seq` is its envelope's: the worker
//!   reserves them all when it seals the batch, so sample `i` (oldest first)
//!   is stored under seq `seq - (count - 1 - i)` and `(worker, seq)` still
//!   names one sample. Only the envelope's seq enters the replay window.
//! * **Times.** Device clocks are not trusted: the receiver dates the newest
//!   sample `age_ms` before it received the frame, and each older one
//!   `interval_ms` before the next.
//! * **Liveness.** `period_ms` is the longest the worker waits between two
//!   metrics frames: the receiver's liveness clock for it, like a birth's
//!   `interval_ms`.
//! * **Who sends them.** Only a conductor that sets
//!   [`STORED_ACCEPTS_BATCH`] in the `Command::id` of its `Stored`
//!   acknowledgements reads them; a worker sends plain `Metrics` frames until
//!   it has seen one, and again when the acknowledgements stop.
//!
//! The sample stream (`MetricsBatch::samples`) holds, per sample, a tag byte
//! and then either a whole [`Metrics`] in postcard (`00`) or its difference
//! from the sample before it (`01`): every field a zigzag varint of the
//! change, in the order of the `Metrics` fields, list lengths and names
//! left out. A sample is sent whole when it is the first, or when its shape
//! (core count, disks and their sizes, interface and sensor names, memory and
//! swap totals) differs from the one before. The byte table is in
//! `protocol/README.md`.
//!
//! Limits: at most [`MAX_BATCH_SAMPLES`] samples and [`MAX_BATCH_BYTES`] bytes
//! of stream per batch, so a batch frame stays under
//! [`crate::MAX_FRAME_LEN`] (`tests/limits.rs`). Decoding checks every
//! length, tag and range and never panics; it allocates nothing beyond one
//! [`Metrics`] per sample yielded.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::frame::Metrics;

/// Set in the `Command::id` of a conductor's `Action::Stored`: this
/// conductor reads [`crate::Body::MetricsBatch`] frames (and
/// [`crate::Action::Live`]). Conductors older than batches send 0 there,
/// and workers older than batches ignore it.
pub const STORED_ACCEPTS_BATCH: u32 = 1;

/// Most samples in one batch: 64 (over ten minutes at a 10 s interval).
pub const MAX_BATCH_SAMPLES: usize = 64;
/// Most bytes of sample stream in one batch: room for the envelope and tag
/// within [`crate::MAX_FRAME_LEN`].
pub const MAX_BATCH_BYTES: usize = 3968;

const TAG_WHOLE: u8 = 0;
const TAG_DELTA: u8 = 1;

/// Worker → conductor, on the metrics topic: several samples, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsBatch {
    /// Milliseconds between consecutive samples.
    pub interval_ms: u32,
    /// The worker sends its next metrics frame within this many ms: the
    /// conductor's liveness clock for it.
    pub period_ms: u32,
    /// Milliseconds from the newest sample to sealing.
    pub age_ms: u32,
    /// Samples in `samples`; at least 1, at most [`MAX_BATCH_SAMPLES`].
    pub count: u16,
    /// The sample stream (see the module docs).
    pub samples: Vec<u8, MAX_BATCH_BYTES>,
}

/// Why a batch's sample stream cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The stream ended inside a sample.
    #[error("sample stream truncated in sample {0}")]
    Truncated(u16),
    /// A sample's tag is neither whole nor delta.
    #[error("unknown sample tag {tag:#04x} in sample {index}")]
    BadTag {
        /// The sample.
        index: u16,
        /// Its tag.
        tag: u8,
    },
    /// The first sample is a delta.
    #[error("sample {0} is a delta with no sample before it")]
    NoBase(u16),
    /// A delta takes a field out of its type's range.
    #[error("sample {0} has a field out of range")]
    OutOfRange(u16),
    /// Bytes remain after `count` samples, or `count` is 0 or too large.
    #[error("sample stream does not hold exactly {0} samples")]
    Count(u16),
}

/// Why a sample was not added to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchFull {
    /// [`MAX_BATCH_SAMPLES`] samples already.
    #[error("the batch holds {MAX_BATCH_SAMPLES} samples")]
    Samples,
    /// The sample's bytes would pass [`MAX_BATCH_BYTES`].
    #[error("the sample does not fit in the batch's {MAX_BATCH_BYTES} bytes")]
    Bytes,
}

/// Builds the sample stream of a batch, one sample at a time.
#[derive(Debug, Clone, Default)]
pub struct BatchWriter {
    /// The last sample added: the next delta's base.
    last: Option<Metrics>,
    /// The uptime step the next delta predicts: the last delta's (0 after
    /// a whole sample). The reader keeps the same.
    step: u64,
    count: u16,
    bytes: Vec<u8, MAX_BATCH_BYTES>,
}

impl BatchWriter {
    /// An empty batch.
    pub fn new() -> BatchWriter {
        BatchWriter::default()
    }

    /// Samples added.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// No sample added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of sample stream so far.
    pub fn stream_len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends `m`; on error nothing changed (send the batch, then add `m`
    /// to a new one).
    pub fn push(&mut self, m: &Metrics) -> Result<(), BatchFull> {
        if usize::from(self.count) >= MAX_BATCH_SAMPLES {
            return Err(BatchFull::Samples);
        }
        let mut out = std::vec::Vec::with_capacity(64);
        let mut step = 0;
        match &self.last {
            Some(prev) if same_shape(prev, m) => {
                out.push(TAG_DELTA);
                write_delta(&mut out, prev, m, self.step);
                step = m.uptime_s.wrapping_sub(prev.uptime_s);
            }
            _ => {
                out.push(TAG_WHOLE);
                // Cannot fail: writing to a Vec, and every field is bounded.
                match postcard::to_extend(m, out) {
                    Ok(v) => out = v,
                    Err(_) => return Err(BatchFull::Bytes),
                }
            }
        }
        if self.bytes.extend_from_slice(&out).is_err() {
            return Err(BatchFull::Bytes);
        }
        self.count += 1;
        self.last = Some(m.clone());
        self.step = step;
        Ok(())
    }

    /// The batch frame's body, and an empty writer again.
    pub fn finish(&mut self, interval_ms: u32, period_ms: u32, age_ms: u32) -> MetricsBatch {
        let done = std::mem::take(self);
        MetricsBatch {
            interval_ms,
            period_ms,
            age_ms,
            count: done.count,
            samples: done.bytes,
        }
    }
}

impl MetricsBatch {
    /// The samples, oldest first, each checked; stops at the first error.
    pub fn samples(&self) -> BatchReader<'_> {
        BatchReader {
            rest: &self.samples,
            index: 0,
            count: self.count,
            last: None,
            step: 0,
            failed: false,
        }
    }

    /// Every sample, or why the stream is unreadable.
    pub fn decode(&self) -> Result<std::vec::Vec<Metrics>, BatchError> {
        self.samples().collect()
    }
}

/// Iterator over a batch's samples ([`MetricsBatch::samples`]).
#[derive(Debug)]
pub struct BatchReader<'a> {
    rest: &'a [u8],
    index: u16,
    count: u16,
    last: Option<Metrics>,
    /// As [`BatchWriter`]'s.
    step: u64,
    failed: bool,
}

impl Iterator for BatchReader<'_> {
    type Item = Result<Metrics, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.step();
        if !matches!(r, Some(Ok(_))) {
            self.failed = true;
        }
        r
    }
}

impl BatchReader<'_> {
    fn step(&mut self) -> Option<Result<Metrics, BatchError>> {
        if self.count == 0 || usize::from(self.count) > MAX_BATCH_SAMPLES {
            return Some(Err(BatchError::Count(self.count)));
        }
        if self.index == self.count {
            return (!self.rest.is_empty()).then_some(Err(BatchError::Count(self.count)));
        }
        let index = self.index;
        let Some((&tag, rest)) = self.rest.split_first() else {
            return Some(Err(BatchError::Count(self.count)));
        };
        let m = match tag {
            TAG_WHOLE => match postcard::take_from_bytes::<Metrics>(rest) {
                Ok((m, rest)) => {
                    self.rest = rest;
                    self.step = 0;
                    m
                }
                Err(_) => return Some(Err(BatchError::Truncated(index))),
            },
            TAG_DELTA => {
                let Some(prev) = &self.last else {
                    return Some(Err(BatchError::NoBase(index)));
                };
                let mut r = Reader { rest, index };
                match read_delta(&mut r, prev, self.step) {
                    Ok(m) => {
                        self.rest = r.rest;
                        self.step = m.uptime_s.wrapping_sub(prev.uptime_s);
                        m
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
            tag => return Some(Err(BatchError::BadTag { index, tag })),
        };
        self.index += 1;
        self.last = Some(m.clone());
        Some(Ok(m))
    }
}

/// Can `next` be sent as a delta from `prev`?
fn same_shape(prev: &Metrics, next: &Metrics) -> bool {
    prev.cpu_per_core.len() == next.cpu_per_core.len()
        && prev.memory_total == next.memory_total
        && prev.swap_total == next.swap_total
        && prev.disks.len() == next.disks.len()
        && prev
            .disks
            .iter()
            .zip(&next.disks)
            .all(|(a, b)| a.mount == b.mount && a.total == b.total)
        && prev.net.len() == next.net.len()
        && prev
            .net
            .iter()
            .zip(&next.net)
            .all(|(a, b)| a.name == b.name)
        && prev.temperatures.len() == next.temperatures.len()
        && prev
            .temperatures
            .iter()
            .zip(&next.temperatures)
            .all(|(a, b)| a.name == b.name)
}

fn put_varint(out: &mut std::vec::Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        // Low seven bits, continuation bit set: the truncation is the point.
        #[allow(clippy::cast_possible_truncation)]
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    #[allow(clippy::cast_possible_truncation)]
    out.push(v as u8);
}

/// The change from `prev` to `next`, zigzag: wrapping, so every pair of
/// `u64` values round-trips ([`unchange`] adds it back).
fn change(prev: u64, next: u64) -> u64 {
    // Reinterpreting the wrapped difference as signed is the encoding.
    #[allow(clippy::cast_possible_wrap)]
    let d = next.wrapping_sub(prev) as i64;
    #[allow(clippy::cast_sign_loss)]
    let z = ((d << 1) ^ (d >> 63)) as u64;
    z
}

/// `prev` plus a [`change`].
fn unchange(prev: u64, z: u64) -> u64 {
    // Inverse of the zigzag in `change`.
    #[allow(clippy::cast_possible_wrap)]
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    #[allow(clippy::cast_sign_loss)]
    prev.wrapping_add(d as u64)
}

/// A temperature as the `u64` its changes are taken on (sign-extended, so
/// a change of a negative reading stays small).
#[allow(clippy::cast_sign_loss)]
fn temp_word(t: i32) -> u64 {
    i64::from(t) as u64
}

/// How many change words a delta from a sample of `prev`'s shape holds:
/// cpu_total, each core, three loads, memory used, used + available, swap
/// used, each disk, two per interface, each sensor, uptime, processes,
/// dropped.
fn field_count(prev: &Metrics) -> usize {
    1 + prev.cpu_per_core.len()
        + 3
        + 3
        + prev.disks.len()
        + 2 * prev.net.len()
        + prev.temperatures.len()
        + 3
}

/// The change words of `m` from `prev`, in stream order. `step` is the
/// uptime step predicted (the previous delta's; 0 after a whole sample),
/// so a steady clock costs nothing. Memory available goes as the change of
/// used + available: memory changing hands between the two is 0.
fn changes(prev: &Metrics, m: &Metrics, step: u64) -> std::vec::Vec<u64> {
    let mut v = std::vec::Vec::with_capacity(field_count(prev));
    v.push(change(prev.cpu_total.into(), m.cpu_total.into()));
    for (a, b) in prev.cpu_per_core.iter().zip(&m.cpu_per_core) {
        v.push(change((*a).into(), (*b).into()));
    }
    for (a, b) in prev.load.iter().zip(&m.load) {
        v.push(change((*a).into(), (*b).into()));
    }
    v.push(change(prev.memory_used, m.memory_used));
    v.push(change(
        prev.memory_used.wrapping_add(prev.memory_available),
        m.memory_used.wrapping_add(m.memory_available),
    ));
    v.push(change(prev.swap_used, m.swap_used));
    for (a, b) in prev.disks.iter().zip(&m.disks) {
        v.push(change(a.used, b.used));
    }
    for (a, b) in prev.net.iter().zip(&m.net) {
        v.push(change(a.rx_bps, b.rx_bps));
        v.push(change(a.tx_bps, b.tx_bps));
    }
    for (a, b) in prev.temperatures.iter().zip(&m.temperatures) {
        v.push(change(temp_word(a.millicelsius), temp_word(b.millicelsius)));
    }
    v.push(change(prev.uptime_s.wrapping_add(step), m.uptime_s));
    v.push(change(prev.processes.into(), m.processes.into()));
    v.push(m.dropped.into());
    v
}

/// A delta: a bitmap of which change words are not zero (bit `i % 8` of
/// byte `i / 8` for word `i`), then those words as varints.
fn write_delta(out: &mut std::vec::Vec<u8>, prev: &Metrics, m: &Metrics, step: u64) {
    let words = changes(prev, m, step);
    let mut bitmap = vec![0u8; words.len().div_ceil(8)];
    for (i, w) in words.iter().enumerate() {
        if *w != 0 {
            bitmap[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bitmap);
    for w in words.into_iter().filter(|w| *w != 0) {
        put_varint(out, w);
    }
}

struct Reader<'a> {
    rest: &'a [u8],
    index: u16,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, BatchError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some((&b, rest)) = self.rest.split_first() else {
                return Err(BatchError::Truncated(self.index));
            };
            self.rest = rest;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(BatchError::OutOfRange(self.index));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(BatchError::OutOfRange(self.index))
    }

    /// The change words of a delta from a sample of `prev`'s shape.
    fn words(&mut self, prev: &Metrics) -> Result<std::vec::Vec<u64>, BatchError> {
        let n = field_count(prev);
        let len = n.div_ceil(8);
        if self.rest.len() < len {
            return Err(BatchError::Truncated(self.index));
        }
        let (bitmap, rest) = self.rest.split_at(len);
        self.rest = rest;
        // Bits past the last word are a foreign encoding, not ours.
        if n % 8 != 0 && bitmap[len - 1] >> (n % 8) != 0 {
            return Err(BatchError::OutOfRange(self.index));
        }
        let mut words = std::vec::Vec::with_capacity(n);
        for i in 0..n {
            words.push(if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                self.varint()?
            } else {
                0
            });
        }
        Ok(words)
    }
}

fn narrow<T: TryFrom<u64>>(v: u64, index: u16) -> Result<T, BatchError> {
    T::try_from(v).map_err(|_| BatchError::OutOfRange(index))
}

/// The sample a delta describes: the inverse of [`changes`].
fn read_delta(r: &mut Reader<'_>, prev: &Metrics, step: u64) -> Result<Metrics, BatchError> {
    let i = r.index;
    let words = r.words(prev)?;
    let mut w = words.into_iter();
    // `words` holds exactly `field_count(prev)` words, as many as are taken
    // below; a missing one would read as 0.
    let mut next = || w.next().unwrap_or(0);
    let mut m = prev.clone();
    m.cpu_total = narrow(unchange(prev.cpu_total.into(), next()), i)?;
    for c in m.cpu_per_core.iter_mut() {
        *c = narrow(unchange((*c).into(), next()), i)?;
    }
    for l in m.load.iter_mut() {
        *l = narrow(unchange((*l).into(), next()), i)?;
    }
    m.memory_used = unchange(prev.memory_used, next());
    let total = unchange(prev.memory_used.wrapping_add(prev.memory_available), next());
    m.memory_available = total.wrapping_sub(m.memory_used);
    m.swap_used = unchange(prev.swap_used, next());
    for d in m.disks.iter_mut() {
        d.used = unchange(d.used, next());
    }
    for n in m.net.iter_mut() {
        n.rx_bps = unchange(n.rx_bps, next());
        n.tx_bps = unchange(n.tx_bps, next());
    }
    for t in m.temperatures.iter_mut() {
        // Sign-extended on the way in (`temp_word`).
        #[allow(clippy::cast_possible_wrap)]
        let v = unchange(temp_word(t.millicelsius), next()) as i64;
        t.millicelsius = i32::try_from(v).map_err(|_| BatchError::OutOfRange(i))?;
    }
    m.uptime_s = unchange(prev.uptime_s.wrapping_add(step), next());
    m.processes = narrow(unchange(prev.processes.into(), next()), i)?;
    m.dropped = narrow(next(), i)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use crate::examples;

    fn later(m: &Metrics, step: u64) -> Metrics {
        let mut n = m.clone();
        n.cpu_total = 1250 + u16::try_from(step * 37 % 900).unwrap();
        n.cpu_per_core[1] = 0;
        n.load[0] += u32::try_from(step).unwrap();
        n.memory_used -= step * 4096;
        n.memory_available += step * 4096;
        n.disks[0].used += step * 8192;
        n.net[0].rx_bps = 1520 * step;
        n.temperatures[0].millicelsius = -5000 + i32::try_from(step).unwrap() * 900;
        n.uptime_s += 10 * step;
        n.processes = 142 - u32::try_from(step % 3).unwrap();
        n.dropped = u32::try_from(step % 2).unwrap();
        n
    }

    #[test]
    fn samples_round_trip_and_deltas_are_small() {
        let first = examples::metrics();
        let mut w = BatchWriter::new();
        let all: std::vec::Vec<Metrics> = (0..30).map(|i| later(&first, i)).collect();
        for m in &all {
            w.push(m).unwrap();
        }
        let whole = postcard::to_stdvec(&first).unwrap().len();
        let b = w.finish(10_000, 300_000, 120);
        assert!(w.is_empty());
        assert_eq!(b.count, 30);
        assert_eq!(b.decode().unwrap(), all);
        // 29 deltas of a changing Pi 4 sample, each far below a whole one.
        let per_delta = (b.samples.len() - whole - 1) / 29;
        assert!(per_delta < 30, "{per_delta} bytes per delta");
        assert!(per_delta * 3 < whole, "{per_delta} vs {whole}");
    }

    #[test]
    fn a_steady_sample_costs_its_tag_and_bitmap_only() {
        let first = examples::metrics();
        let mut w = BatchWriter::new();
        w.push(&first).unwrap();
        let mut m = first.clone();
        let mut sizes = std::vec::Vec::new();
        for _ in 0..3 {
            m.uptime_s += 10;
            // Memory changing hands: used up, available down as much.
            m.memory_used += 4096;
            m.memory_available -= 4096;
            let before = w.stream_len();
            w.push(&m).unwrap();
            sizes.push(w.stream_len() - before);
        }
        // The Pi 4 example has 18 change words: a 3-byte bitmap. The first
        // delta carries the uptime step (+10) and memory used (+4096,
        // zigzag 8192: 2 bytes); from the second on the step is predicted.
        assert_eq!(field_count(&first), 18);
        assert_eq!(sizes, [1 + 3 + 1 + 2, 1 + 3 + 2, 1 + 3 + 2]);
        let b = w.finish(10_000, 300_000, 0);
        assert_eq!(b.decode().unwrap().last(), Some(&m));
    }

    #[test]
    fn bits_past_the_last_word_are_refused() {
        let first = examples::metrics();
        let mut w = BatchWriter::new();
        w.push(&first).unwrap();
        let mut batch = w.finish(1, 1, 1);
        // 18 words: bits 2..8 of the third bitmap byte must be clear.
        batch
            .samples
            .extend_from_slice(&[TAG_DELTA, 0, 0, 0b100])
            .unwrap();
        batch.count = 2;
        assert_eq!(batch.decode(), Err(BatchError::OutOfRange(1)));
    }

    #[test]
    fn a_changed_shape_is_sent_whole() {
        let first = examples::metrics();
        let mut second = first.clone();
        second.disks.clear();
        let mut third = second.clone();
        third.cpu_total = 0;
        let mut w = BatchWriter::new();
        for m in [&first, &second, &third] {
            w.push(m).unwrap();
        }
        let b = w.finish(1000, 1000, 0);
        assert_eq!(b.decode().unwrap(), vec![first, second, third]);
    }

    #[test]
    fn extreme_values_round_trip() {
        let mut a = examples::metrics();
        let mut b = a.clone();
        a.memory_used = u64::MAX;
        b.memory_used = 0;
        a.uptime_s = 0;
        b.uptime_s = u64::MAX;
        a.temperatures[0].millicelsius = i32::MIN;
        b.temperatures[0].millicelsius = i32::MAX;
        a.cpu_total = u16::MAX;
        b.cpu_total = 0;
        b.dropped = u32::MAX;
        let mut w = BatchWriter::new();
        w.push(&a).unwrap();
        w.push(&b).unwrap();
        w.push(&a).unwrap();
        assert_eq!(w.finish(1, 1, 1).decode().unwrap(), vec![a.clone(), b, a]);
    }

    #[test]
    fn a_full_batch_refuses_and_keeps_what_it_has() {
        let m = examples::metrics();
        let mut w = BatchWriter::new();
        for _ in 0..MAX_BATCH_SAMPLES {
            w.push(&m).unwrap();
        }
        assert_eq!(w.push(&m), Err(BatchFull::Samples));
        assert_eq!(w.finish(1, 1, 1).decode().unwrap().len(), MAX_BATCH_SAMPLES);
    }

    #[test]
    fn bad_streams_are_errors_not_panics() {
        let first = examples::metrics();
        let mut w = BatchWriter::new();
        w.push(&first).unwrap();
        w.push(&later(&first, 1)).unwrap();
        let good = w.finish(1, 1, 1);
        // Every truncation, and every single-byte corruption, decodes to an
        // error or to some samples, never a panic.
        for cut in 0..good.samples.len() {
            let mut b = good.clone();
            b.samples.truncate(cut);
            assert!(b.decode().is_err(), "cut at {cut}");
        }
        for i in 0..good.samples.len() {
            for x in [0x00, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b.samples[i] = x;
                let _ = b.decode();
            }
        }
        let mut b = good.clone();
        b.count = 3;
        assert_eq!(b.decode(), Err(BatchError::Count(3)));
        b.count = 1;
        assert_eq!(b.decode(), Err(BatchError::Count(1)));
        b.count = 0;
        assert_eq!(b.decode(), Err(BatchError::Count(0)));
        let mut b = good.clone();
        b.samples[0] = TAG_DELTA;
        assert_eq!(b.decode(), Err(BatchError::NoBase(0)));
        let mut b = good;
        b.samples[0] = 7;
        assert_eq!(b.decode(), Err(BatchError::BadTag { index: 0, tag: 7 }));
    }

    #[test]
    fn a_delta_out_of_a_fields_range_is_refused() {
        let first = examples::metrics();
        let mut b = BatchWriter::new();
        b.push(&first).unwrap();
        let mut batch = b.finish(1, 1, 1);
        // A delta whose cpu_total change is +70 000 (beyond u16): the
        // bitmap names word 0 only, then the word.
        let words = field_count(&first);
        let mut delta = vec![TAG_DELTA];
        delta.extend(std::iter::repeat_n(0, words.div_ceil(8)));
        delta[1] = 1;
        put_varint(&mut delta, change(0, 70_000));
        batch.samples.extend_from_slice(&delta).unwrap();
        batch.count = 2;
        assert_eq!(batch.decode(), Err(BatchError::OutOfRange(1)));
    }
}
