//! The worker side of [`protocol::Action::Logs`]: a service's log as
//! [`LogChunk`] frames.
//!
//! The supervisor writes a service's stdout and stderr to
//! `<state_dir>/services/<name>/output.log` and rotates it by copying its
//! last `LOG_MAX` bytes to `output.log.1` and truncating it to 0 (the
//! service keeps its append-mode descriptor). The log is therefore
//! `output.log.1` followed by `output.log`.
//!
//! A request is answered by one task ([`LogStreams::start`] spawns it,
//! [`stream_logs`] is the task): first the last `tail_bytes` of the log,
//! starting at a line start (a single line longer than that sends nothing),
//! split into chunks of at most [`LOG_CHUNK_LEN`] bytes indexed 0, 1, 2…;
//! then, if `follow_s > 0`, the file is polled every [`FOLLOW_POLL`] and
//! new bytes are sent as they appear until `follow_s` is over. The final
//! chunk has `last = true` (it may be empty). Chunks go to an
//! `mpsc::Sender<Body>` the session drains into its ordered outbox; the
//! task waits when that channel is full. File reads run on
//! `spawn_blocking`, never on the runtime thread.
//!
//! Rotation and truncation while following: when `output.log` is shorter
//! than what was sent, or the bytes just before the follow offset changed,
//! it restarted, and following continues from its start. If `output.log.1`
//! was rewritten meanwhile (a rotation), the bytes written between the
//! previous poll and the rotation are recovered from it by locating the
//! last [`FINGERPRINT`] bytes sent; if they cannot be found (or the file
//! was truncated by other means) those bytes are lost. A rotation that
//! happens before any followed byte was seen is not noticed.
//!
//! Limits: `tail_bytes` is capped at [`MAX_TAIL`], `follow_s` at
//! [`MAX_FOLLOW`], at most [`MAX_FOLLOWS`] follows run at once
//! ([`LogError::Busy`] beyond), and a follow sends at most
//! [`FOLLOW_BYTES_PER_POLL`] bytes per poll (32 KiB/s): output beyond that
//! is skipped (the newest is kept) and replaced by a line
//! `[aerekos: N bytes skipped]`, so one chatty service cannot flood the
//! outbox and evict other frames.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::frame::{LogChunk, LogRequest, Name, LOG_CHUNK_LEN};
use protocol::Body;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Dir of the per-service dirs inside the state dir (as the supervisor's).
pub const SERVICES_DIR: &str = "services";
/// A service's current log inside its dir.
pub const LOG_FILE: &str = "output.log";
/// The rotated, older part of a service's log inside its dir.
pub const LOG_OLD: &str = "output.log.1";
/// Most bytes sent for `tail_bytes`.
pub const MAX_TAIL: u32 = 64 * 1024;
/// Longest follow.
pub const MAX_FOLLOW: Duration = Duration::from_secs(600);
/// How often a followed log is checked for new output.
pub const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Most bytes a follow sends per poll; the rest is skipped.
pub const FOLLOW_BYTES_PER_POLL: usize = 4 * LOG_CHUNK_LEN;
/// Default bound on concurrent follows per worker.
pub const MAX_FOLLOWS: usize = 4;
/// Suggested capacity of the chunk channel to the session.
pub const CHANNEL_LEN: usize = 16;
/// Bytes remembered from before the follow offset, to detect a rewritten
/// file and to find the follow position in a rotated one.
pub const FINGERPRINT: usize = 64;
/// Most bytes read from `output.log.1` (it holds `LOG_MAX` = 64 KiB).
const MAX_OLD_READ: u64 = 256 * 1024;

/// Why a log request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Not a valid service name (`[a-z0-9-]{1,32}`).
    #[error("invalid service name {0:?}")]
    InvalidName(String),
    /// Neither `output.log` nor `output.log.1` exists.
    #[error("no log for service {0:?} (unknown, or it never ran)")]
    NotFound(String),
    /// [`MAX_FOLLOWS`] (or the configured bound) follows are running.
    #[error("{0} log follows already running; try again later")]
    Busy(usize),
    /// Reading the log failed.
    #[error("reading the log of {name:?}: {source}")]
    Io {
        /// Service name.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// The blocking read task died.
    #[error("log task failed: {0}")]
    Task(String),
}

/// Starts log streams for the session and bounds concurrent follows.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogStreams {
    services_dir: PathBuf,
    /// Follows running now. Invariant: `<= max_follows`; a [`FollowSlot`]
    /// holds one and gives it back on drop.
    follows: Arc<AtomicUsize>,
    max_follows: usize,
}

/// One of the bounded follow slots, released on drop.
#[derive(Debug)]
struct FollowSlot(Arc<AtomicUsize>);

impl Drop for FollowSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LogStreams {
    /// Streams for the services under `<state_dir>/services`, at most
    /// `max_follows` following at once.
    pub fn new(state_dir: &Path, max_follows: usize) -> LogStreams {
        LogStreams {
            services_dir: state_dir.join(SERVICES_DIR),
            follows: Arc::new(AtomicUsize::new(0)),
            max_follows,
        }
    }

    /// The dir holding service `name`'s log (the name is checked: it
    /// becomes a path segment).
    pub fn log_dir(&self, name: &str) -> Result<PathBuf, LogError> {
        if !protocol::manifest::valid_service_name(name) {
            return Err(LogError::InvalidName(name.to_string()));
        }
        Ok(self.services_dir.join(name))
    }

    /// Checks the request and spawns the task sending the chunks to `tx`
    /// (must be called inside a tokio runtime). Returns the detail for an
    /// `Ok` reply; an error becomes an `Error` reply and sends no chunk.
    /// Only stats files: fine on the runtime thread.
    pub fn start(
        &self,
        cmd_id: u32,
        req: LogRequest,
        tx: mpsc::Sender<Body>,
    ) -> Result<String, LogError> {
        let dir = self.log_dir(&req.name)?;
        if !dir.join(LOG_FILE).exists() && !dir.join(LOG_OLD).exists() {
            return Err(LogError::NotFound(req.name.to_string()));
        }
        let permit = if req.follow_s > 0 {
            self.follows
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_follows).then_some(n + 1)
                })
                .map_err(|_| LogError::Busy(self.max_follows))?;
            Some(FollowSlot(self.follows.clone()))
        } else {
            None
        };
        let tail = req.tail_bytes.min(MAX_TAIL);
        let follow = Duration::from_secs(req.follow_s.into()).min(MAX_FOLLOW);
        let detail = if follow.is_zero() {
            format!("sending up to {tail} bytes")
        } else {
            format!(
                "sending up to {tail} bytes, then following for {} s",
                follow.as_secs()
            )
        };
        tokio::spawn(async move {
            let _permit = permit;
            let name = req.name.clone();
            if let Err(e) = stream_logs(dir, cmd_id, req, tx).await {
                tracing::warn!(service = %name, cmd_id, "log stream: {e}");
            }
        });
        Ok(detail)
    }
}

/// Sends the answer to one `Logs` request (see the module docs) for the
/// service whose dir is `dir`. `Ok` also when the receiver went away (the
/// session stopped). An error after the first chunk still ends the stream
/// with a `last` chunk.
pub async fn stream_logs(
    dir: PathBuf,
    cmd_id: u32,
    req: LogRequest,
    tx: mpsc::Sender<Body>,
) -> Result<(), LogError> {
    let name = req.name.to_string();
    let io_err = |source| LogError::Io {
        name: name.clone(),
        source,
    };
    let want = req.tail_bytes.min(MAX_TAIL) as usize;
    let follow = Duration::from_secs(req.follow_s.into()).min(MAX_FOLLOW);
    let d = dir.clone();
    let tail = tokio::task::spawn_blocking(move || read_tail(&d, want))
        .await
        .map_err(|e| LogError::Task(e.to_string()))?
        .map_err(io_err)?
        .ok_or_else(|| LogError::NotFound(name.clone()))?;
    let mut out = ChunkSender::new(tx, cmd_id, req.name.clone());
    let following = !follow.is_zero();
    if !out.send(&tail.data, !following).await || !following {
        return Ok(());
    }
    let deadline = Instant::now() + follow;
    let mut f = tail.follow;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(FOLLOW_POLL)).await;
        let last = Instant::now() >= deadline;
        let (back, polled) = tokio::task::spawn_blocking(move || {
            let r = f.poll(FOLLOW_BYTES_PER_POLL);
            (f, r)
        })
        .await
        .map_err(|e| LogError::Task(e.to_string()))?;
        f = back;
        let polled = match polled {
            Ok(p) => p,
            Err(e) => {
                out.send(&[], true).await;
                return Err(io_err(e));
            }
        };
        let mut data = Vec::new();
        if polled.skipped > 0 {
            data.extend_from_slice(
                format!("\n[aerekos: {} bytes skipped]\n", polled.skipped).as_bytes(),
            );
        }
        data.extend_from_slice(&polled.data);
        if !out.send(&data, last).await || last {
            return Ok(());
        }
    }
}

/// Numbers and sends the [`LogChunk`]s answering one `Logs` command (shared
/// by process and container logs).
#[derive(Debug)]
pub(crate) struct ChunkSender {
    tx: mpsc::Sender<Body>,
    cmd_id: u32,
    name: Name,
    /// Next chunk's index: 0, 1, 2… so the conductor can spot a gap.
    index: u32,
}

impl ChunkSender {
    /// A sender for command `cmd_id` about service `name`, starting at index 0.
    pub(crate) fn new(tx: mpsc::Sender<Body>, cmd_id: u32, name: Name) -> ChunkSender {
        ChunkSender {
            tx,
            cmd_id,
            name,
            index: 0,
        }
    }

    /// Sends `data` in chunks of ≤ [`LOG_CHUNK_LEN`]; with `last`, the final
    /// chunk (an empty one if `data` is empty) is marked last. `false` once
    /// the receiver is gone.
    pub(crate) async fn send(&mut self, data: &[u8], last: bool) -> bool {
        if data.is_empty() {
            return !last || self.send_one(&[], true).await;
        }
        let n = data.len().div_ceil(LOG_CHUNK_LEN);
        for (i, piece) in data.chunks(LOG_CHUNK_LEN).enumerate() {
            if !self.send_one(piece, last && i + 1 == n).await {
                return false;
            }
        }
        true
    }

    async fn send_one(&mut self, piece: &[u8], last: bool) -> bool {
        let mut data = heapless::Vec::new();
        // `piece` is at most LOG_CHUNK_LEN bytes (chunks() above).
        if data.extend_from_slice(piece).is_err() {
            return false;
        }
        let chunk = LogChunk {
            cmd_id: self.cmd_id,
            name: self.name.clone(),
            index: self.index,
            data,
            last,
        };
        self.index = self.index.wrapping_add(1);
        self.tx.send(Body::LogChunk(chunk)).await.is_ok()
    }
}

/// Identity and version of `output.log.1`, to notice a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_ns: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_ns: m.mtime_nsec(),
    })
}

/// Follow position in `output.log`.
///
/// Invariant: `fp` is the last `min(FINGERPRINT, offset)` bytes of
/// `output.log` before `offset`, as last read.
#[derive(Debug)]
struct Follow {
    dir: PathBuf,
    offset: u64,
    fp: Vec<u8>,
    old_stamp: Option<Stamp>,
}

/// What one poll found.
#[derive(Debug, Default)]
struct Polled {
    data: Vec<u8>,
    /// Bytes skipped to stay within the per-poll budget.
    skipped: u64,
}

/// The tail to send first and where following starts.
#[derive(Debug)]
struct Tail {
    data: Vec<u8>,
    follow: Follow,
}

/// Opens `path`; `None` if it does not exist.
fn open_opt(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Up to the last `max` bytes of an open file; returns them and the offset
/// they start at.
fn last_bytes(f: &mut File, max: u64) -> io::Result<(Vec<u8>, u64)> {
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    Ok((buf, start))
}

/// The last `want` bytes of the log (`output.log.1` + `output.log`) cut at
/// a line start, and the follow position at the end of `output.log`.
/// `None` if neither file exists.
fn read_tail(dir: &Path, want: usize) -> io::Result<Option<Tail>> {
    // One byte more than wanted: it tells whether the window starts a line.
    let need = want as u64 + 1;
    let cur = open_opt(&dir.join(LOG_FILE))?;
    let old_path = dir.join(LOG_OLD);
    let old_stamp = stamp(&old_path);
    let old = open_opt(&old_path)?;
    if cur.is_none() && old.is_none() {
        return Ok(None);
    }
    let (cur_bytes, cur_start) = match cur {
        Some(mut f) => last_bytes(&mut f, need.max(FINGERPRINT as u64))?,
        None => (Vec::new(), 0),
    };
    let offset = cur_start + cur_bytes.len() as u64;
    let fp = cur_bytes[cur_bytes.len().saturating_sub(FINGERPRINT)..].to_vec();
    let need_len = usize::try_from(need).unwrap_or(usize::MAX);
    let from_cur = &cur_bytes[cur_bytes.len().saturating_sub(need_len)..];
    let mut window = Vec::new();
    let short = need - from_cur.len() as u64;
    if cur_start == 0 && short > 0 {
        if let Some(mut f) = old {
            window = last_bytes(&mut f, short.min(MAX_OLD_READ))?.0;
        }
    }
    window.extend_from_slice(from_cur);
    let data = if window.len() > want {
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => window.split_off(i + 1),
            None => Vec::new(),
        }
    } else {
        window
    };
    Ok(Some(Tail {
        data,
        follow: Follow {
            dir: dir.to_path_buf(),
            offset,
            fp,
            old_stamp,
        },
    }))
}

impl Follow {
    /// New output since the last poll, at most `max` bytes (the newest).
    fn poll(&mut self, max: usize) -> io::Result<Polled> {
        let old_path = self.dir.join(LOG_OLD);
        let old_now = stamp(&old_path);
        let cur = open_opt(&self.dir.join(LOG_FILE))?;
        let len = match &cur {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        let mut out = Polled::default();
        let restarted = len < self.offset
            || match &cur {
                Some(f) => !self.fp_matches(f),
                None => self.offset > 0,
            };
        if restarted {
            if old_now.is_some() && old_now != self.old_stamp {
                out.data = self.recover(&old_path)?;
            }
            self.offset = 0;
            self.fp.clear();
        }
        self.old_stamp = old_now;
        let avail = len.saturating_sub(self.offset);
        let take = avail.min(max as u64);
        let skip = avail - take;
        let mut fresh = Vec::new();
        if let (Some(f), true) = (&cur, take > 0) {
            let mut f = f;
            f.seek(SeekFrom::Start(self.offset + skip))?;
            f.take(take).read_to_end(&mut fresh)?;
        }
        self.offset += skip + fresh.len() as u64;
        if skip > 0 {
            self.fp.clear();
        }
        self.fp.extend_from_slice(&fresh);
        let extra = self.fp.len().saturating_sub(FINGERPRINT);
        self.fp.drain(..extra);
        // Budget: keep the newest `max` bytes of recovered + fresh.
        out.skipped = skip;
        out.data.extend_from_slice(&fresh);
        if out.data.len() > max {
            let cut = out.data.len() - max;
            out.data.drain(..cut);
            out.skipped += cut as u64;
        }
        Ok(out)
    }

    /// Are the bytes before `offset` still those last read?
    fn fp_matches(&self, f: &File) -> bool {
        if self.fp.is_empty() {
            return true;
        }
        let mut buf = vec![0u8; self.fp.len()];
        let at = self.offset - self.fp.len() as u64;
        f.read_exact_at(&mut buf, at).is_ok() && buf == self.fp
    }

    /// After a rotation: the bytes of `output.log.1` after the last
    /// occurrence of the fingerprint (all of it if nothing was seen yet;
    /// nothing if the fingerprint is not there).
    fn recover(&self, old_path: &Path) -> io::Result<Vec<u8>> {
        let Some(mut f) = open_opt(old_path)? else {
            return Ok(Vec::new());
        };
        let (old, _) = last_bytes(&mut f, MAX_OLD_READ)?;
        if self.fp.is_empty() {
            return Ok(old);
        }
        Ok(old
            .windows(self.fp.len())
            .rposition(|w| w == self.fp.as_slice())
            .map(|i| old[i + self.fp.len()..].to_vec())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use protocol::frame::bounded;
    use std::fs;
    use std::io::Write;

    fn req(name: &str, tail_bytes: u32, follow_s: u16) -> LogRequest {
        LogRequest {
            name: bounded(name),
            tail_bytes,
            follow_s,
        }
    }

    fn chunks_of(rx: &mut mpsc::Receiver<Body>) -> Vec<LogChunk> {
        let mut v = Vec::new();
        while let Ok(b) = rx.try_recv() {
            match b {
                Body::LogChunk(c) => v.push(c),
                other => panic!("unexpected {other:?}"),
            }
        }
        v
    }

    fn joined(chunks: &[LogChunk]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.data.iter().copied()).collect()
    }

    fn check_order(chunks: &[LogChunk], cmd_id: u32) {
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.index as usize, i);
            assert_eq!(c.cmd_id, cmd_id);
            assert_eq!(
                c.last,
                i + 1 == chunks.len(),
                "only the final chunk is last"
            );
            assert!(c.data.len() <= LOG_CHUNK_LEN);
        }
    }

    /// `n` numbered lines of 20 bytes.
    fn lines(from: usize, n: usize) -> Vec<u8> {
        (from..from + n)
            .flat_map(|i| format!("line {i:08} xxxxx\n").into_bytes())
            .collect()
    }

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    #[tokio::test]
    async fn tail_starts_at_a_line_and_spans_chunks_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let content = lines(0, 512); // 10 KiB
        assert_eq!(content.len(), 10240);
        fs::write(dir.path().join(LOG_FILE), &content).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        stream_logs(dir.path().into(), 9, req("svc", 3000, 0), tx)
            .await
            .unwrap();
        let chunks = chunks_of(&mut rx);
        check_order(&chunks, 9);
        assert_eq!(chunks.len(), 2);
        let got = joined(&chunks);
        // 3000 bytes hold 150 whole lines of 20.
        assert_eq!(got, &content[content.len() - 3000..]);
        assert!(got.starts_with(b"line 00000362"));
        // One byte less: the partial first line is dropped.
        let (tx, mut rx) = mpsc::channel(64);
        stream_logs(dir.path().into(), 9, req("svc", 2999, 0), tx)
            .await
            .unwrap();
        assert_eq!(
            joined(&chunks_of(&mut rx)),
            &content[content.len() - 2980..]
        );
    }

    #[tokio::test]
    async fn tail_includes_the_rotated_part_and_small_files_whole() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOG_OLD), b"partial\nold 1\nold 2\n").unwrap();
        fs::write(dir.path().join(LOG_FILE), b"new 1\nnew 2").unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        stream_logs(dir.path().into(), 1, req("svc", 17, 0), tx)
            .await
            .unwrap();
        assert_eq!(joined(&chunks_of(&mut rx)), b"old 2\nnew 1\nnew 2");
        let (tx, mut rx) = mpsc::channel(64);
        stream_logs(dir.path().into(), 1, req("svc", 1000, 0), tx)
            .await
            .unwrap();
        assert_eq!(
            joined(&chunks_of(&mut rx)),
            b"partial\nold 1\nold 2\nnew 1\nnew 2"
        );
        // Nothing wanted: one empty last chunk.
        let (tx, mut rx) = mpsc::channel(64);
        stream_logs(dir.path().into(), 1, req("svc", 0, 0), tx)
            .await
            .unwrap();
        let chunks = chunks_of(&mut rx);
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].last && chunks[0].data.is_empty());
    }

    #[tokio::test]
    async fn follow_sends_appended_lines_then_ends_with_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, b"before\n").unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(stream_logs(dir.path().into(), 3, req("svc", 100, 1), tx));
        tokio::time::sleep(Duration::from_millis(300)).await;
        append(&path, b"after 1\n");
        tokio::time::sleep(Duration::from_millis(300)).await;
        append(&path, b"after 2\n");
        let started = std::time::Instant::now();
        task.await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        let chunks = chunks_of(&mut rx);
        check_order(&chunks, 3);
        assert_eq!(joined(&chunks), b"before\nafter 1\nafter 2\n");
        assert!(
            chunks.len() >= 3,
            "tail and follow output are separate chunks"
        );
    }

    #[tokio::test]
    async fn truncation_mid_follow_restarts_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, lines(0, 10)).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(stream_logs(dir.path().into(), 4, req("svc", 0, 2), tx));
        tokio::time::sleep(Duration::from_millis(400)).await;
        append(&path, b"more\n");
        tokio::time::sleep(Duration::from_millis(400)).await;
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        // Longer than before: only the fingerprint notices the rewrite.
        append(&path, &lines(100, 20));
        task.await.unwrap().unwrap();
        let chunks = chunks_of(&mut rx);
        check_order(&chunks, 4);
        let mut want = b"more\n".to_vec();
        want.extend_from_slice(&lines(100, 20));
        assert_eq!(joined(&chunks), want);
    }

    #[test]
    fn rotation_recovers_the_bytes_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, lines(0, 10)).unwrap();
        let mut f = read_tail(dir.path(), 0).unwrap().unwrap().follow;
        assert!(f.poll(1 << 20).unwrap().data.is_empty());
        // Written after the last poll, then rotated like the supervisor does.
        append(&path, &lines(10, 5));
        let all = fs::read(&path).unwrap();
        fs::write(dir.path().join(LOG_OLD), &all[all.len() - 250..]).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, b"fresh\n");
        let p = f.poll(1 << 20).unwrap();
        let mut want = lines(10, 5);
        want.extend_from_slice(b"fresh\n");
        assert_eq!(p.data, want);
        assert_eq!(p.skipped, 0);
        // A later plain truncation (old file untouched) recovers nothing.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, b"x\n");
        assert_eq!(f.poll(1 << 20).unwrap().data, b"x\n");
    }

    #[test]
    fn a_burst_over_the_budget_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, b"").unwrap();
        let mut f = read_tail(dir.path(), 0).unwrap().unwrap().follow;
        let burst = lines(0, 100);
        append(&path, &burst);
        let p = f.poll(500).unwrap();
        assert_eq!(p.data, &burst[burst.len() - 500..]);
        assert_eq!(p.skipped, burst.len() as u64 - 500);
        append(&path, b"next\n");
        let p = f.poll(500).unwrap();
        assert_eq!((p.data.as_slice(), p.skipped), (&b"next\n"[..], 0));
    }

    #[tokio::test]
    async fn missing_logs_bad_names_and_busy_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let streams = LogStreams::new(dir.path(), 1);
        let (tx, mut rx) = mpsc::channel(64);
        let err = streams
            .start(1, req("nope", 10, 0), tx.clone())
            .unwrap_err();
        assert!(matches!(err, LogError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("no log for service \"nope\""));
        let err = streams
            .start(1, req("../x", 10, 0), tx.clone())
            .unwrap_err();
        assert!(matches!(err, LogError::InvalidName(_)), "{err}");
        let err = stream_logs(dir.path().join("nope"), 1, req("nope", 10, 0), tx.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, LogError::NotFound(_)), "{err}");

        let svc = streams.log_dir("svc").unwrap();
        fs::create_dir_all(&svc).unwrap();
        fs::write(svc.join(LOG_FILE), b"hi\n").unwrap();
        let detail = streams.start(2, req("svc", 10, 1), tx.clone()).unwrap();
        assert!(detail.contains("following for 1 s"), "{detail}");
        let err = streams.start(3, req("svc", 10, 1), tx.clone()).unwrap_err();
        assert!(matches!(err, LogError::Busy(1)), "{err}");
        // Tail-only requests are not bounded by follows.
        streams.start(4, req("svc", 10, 0), tx.clone()).unwrap();
        // Once the follow ends its permit is free again.
        let mut last_seen = 0;
        while last_seen < 2 {
            if let Some(Body::LogChunk(c)) = rx.recv().await {
                last_seen += u32::from(c.last);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        streams.start(5, req("svc", 10, 1), tx).unwrap();
    }
}
