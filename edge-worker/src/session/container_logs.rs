//! `Logs` for a container service: the engine's log of its container
//! (stdout and stderr interleaved, as `docker logs` shows it) as
//! [`LogChunk`] frames, like [`crate::logs`] does for processes.
//!
//! One task per request. It connects to the engine and reads the tail on a
//! blocking thread, then answers the command (`Ok`, or `Error` when there
//! is no engine or no container: no chunk then) and sends the tail: the
//! last `tail_bytes` (≤ [`MAX_TAIL`]) bytes of at most [`TAIL_LINES`] lines,
//! starting at a line start, in chunks indexed 0, 1, 2…. Following, it
//! re-reads the last [`FOLLOW_LINES`] lines every [`FOLLOW_POLL`] and sends
//! what comes after the last [`FINGERPRINT`] bytes it had read. The last
//! chunk has `last = true`. Frames go to the session's log channel, so the
//! reply is queued before the chunks.
//!
//! Limits: following is best effort: more than [`FOLLOW_LINES`] lines
//! between two polls, or a container replaced meanwhile, loses output (a
//! line `[aerekos: output may be missing]` says so); output repeating the
//! fingerprint exactly may be taken for old output. A poll sends at most
//! [`FOLLOW_BYTES`] (the newest; a note counts the rest). At most
//! [`MAX_FOLLOWS`] container follows run at once; `follow_s` is capped at
//! [`MAX_FOLLOW`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::frame::{bounded, LogRequest, LOG_CHUNK_LEN};
use protocol::{Body, Reply, ReplyStatus};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::container::Engine;
use crate::logs::{ChunkSender, MAX_FOLLOW, MAX_FOLLOWS, MAX_TAIL};

/// Most lines asked for the tail.
pub const TAIL_LINES: usize = 2000;
/// Lines re-read at every follow poll.
pub const FOLLOW_LINES: usize = 200;
/// How often a followed container log is read again.
pub const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// Most bytes a follow poll sends.
pub const FOLLOW_BYTES: usize = 16 * LOG_CHUNK_LEN;
/// Bytes of the last read that locate the follow position in the next.
pub const FINGERPRINT: usize = 256;

/// Whose containers, on which engine.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub worker_id: String,
    pub socket: Option<PathBuf>,
}

/// A follow slot, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Spawns the task answering `req` (see the module docs). `Some(detail)`
/// when it is refused at once (too many follows): the caller replies.
pub(crate) fn start(
    target: Target,
    cmd_id: u32,
    req: LogRequest,
    tx: mpsc::Sender<Body>,
    follows: Arc<AtomicUsize>,
) -> Option<String> {
    let follow = Duration::from_secs(req.follow_s.into()).min(MAX_FOLLOW);
    let slot = if follow.is_zero() {
        None
    } else {
        let taken = follows.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_FOLLOWS).then_some(n + 1)
        });
        if taken.is_err() {
            return Some(format!(
                "{MAX_FOLLOWS} log follows already running; try again later"
            ));
        }
        Some(Slot(follows))
    };
    tokio::spawn(async move {
        let _slot = slot;
        stream(target, cmd_id, req, follow, tx).await;
    });
    None
}

async fn stream(
    target: Target,
    cmd_id: u32,
    req: LogRequest,
    follow: Duration,
    tx: mpsc::Sender<Body>,
) {
    let name = req.name.to_string();
    let want = req.tail_bytes.min(MAX_TAIL) as usize;
    let lines = want.clamp(1, TAIL_LINES);
    let (t, n) = (target.clone(), name.clone());
    let first = tokio::task::spawn_blocking(move || {
        let engine = Engine::connect(t.socket.as_deref()).map_err(|e| e.to_string())?;
        match engine.logs(&t.worker_id, &n, lines) {
            Ok(Some(bytes)) => Ok((engine, bytes)),
            Ok(None) => Err(format!("no container for service {n:?} (never started?)")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .map_err(|e| format!("log task failed: {e}"))
    .and_then(|r| r);
    let reply = |status, detail: &str| {
        Body::Reply(Reply {
            cmd_id,
            status,
            detail: bounded(detail),
        })
    };
    let (engine, mut prev) = match first {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(service = %name, cmd_id, "container logs: {e}");
            let _ = tx.send(reply(ReplyStatus::Error, &e)).await;
            return;
        }
    };
    let detail = if follow.is_zero() {
        format!("sending up to {want} bytes of the container log")
    } else {
        format!(
            "sending up to {want} bytes of the container log, then following for {} s",
            follow.as_secs()
        )
    };
    if tx.send(reply(ReplyStatus::Ok, &detail)).await.is_err() {
        return;
    }
    let mut out = ChunkSender::new(tx, cmd_id, req.name.clone());
    let following = !follow.is_zero();
    if !out.send(cut_tail(&prev, want), !following).await || !following {
        return;
    }
    let deadline = Instant::now() + follow;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(FOLLOW_POLL)).await;
        let last = Instant::now() >= deadline;
        let (e, t, n) = (engine.clone(), target.clone(), name.clone());
        let got = tokio::task::spawn_blocking(move || e.logs(&t.worker_id, &n, FOLLOW_LINES))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut data = Vec::new();
        match got {
            Ok(Some(cur)) => {
                let (fresh, lost) = after(&prev, &cur);
                if lost {
                    data.extend_from_slice(b"\n[aerekos: output may be missing]\n");
                }
                let skipped = fresh.len().saturating_sub(FOLLOW_BYTES);
                if skipped > 0 {
                    data.extend_from_slice(
                        format!("\n[aerekos: {skipped} bytes skipped]\n").as_bytes(),
                    );
                }
                data.extend_from_slice(&fresh[skipped..]);
                prev = cur;
            }
            Ok(None) => {
                out.send(b"\n[aerekos: the container is gone]\n", true)
                    .await;
                return;
            }
            Err(e) => {
                let note = format!("\n[aerekos: reading the container log failed: {e}]\n");
                out.send(note.as_bytes(), true).await;
                return;
            }
        }
        if !out.send(&data, last).await || last {
            return;
        }
    }
}

/// The last `want` bytes of `block`, from a line start (nothing if the
/// last line alone is longer).
fn cut_tail(block: &[u8], want: usize) -> &[u8] {
    if block.len() <= want {
        return block;
    }
    let window = &block[block.len() - want - 1..];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) => &window[i + 1..],
        None => &[],
    }
}

/// What `cur` (a later read of the log's end) has after `prev`'s end, and
/// whether output may be missing (the end of `prev` is not in `cur`).
fn after<'a>(prev: &[u8], cur: &'a [u8]) -> (&'a [u8], bool) {
    if prev.is_empty() {
        return (cur, false);
    }
    let fp = &prev[prev.len().saturating_sub(FINGERPRINT)..];
    if let Some(i) = cur.windows(fp.len()).rposition(|w| w == fp) {
        return (&cur[i + fp.len()..], false);
    }
    // `cur` may begin inside the fingerprint: the longest end of `prev`,
    // from a line start, that `cur` begins with.
    for k in (1..=fp.len().min(cur.len())).rev() {
        let from = prev.len() - k;
        let line_start = from == 0 || prev[from - 1] == b'\n';
        if line_start && cur.starts_with(&prev[from..]) {
            return (&cur[k..], false);
        }
    }
    (cur, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_start_at_a_line() {
        assert_eq!(cut_tail(b"a\nbb\nccc\n", 100), b"a\nbb\nccc\n");
        assert_eq!(cut_tail(b"a\nbb\nccc\n", 5), b"ccc\n");
        assert_eq!(cut_tail(b"a\nbb\nccc\n", 4), b"ccc\n");
        assert_eq!(cut_tail(b"a\nbb\nccc\n", 3), b"");
    }

    #[test]
    fn follow_finds_what_is_new() {
        assert_eq!(after(b"", b"x\n"), (&b"x\n"[..], false));
        assert_eq!(after(b"1\n2\n", b"1\n2\n3\n"), (&b"3\n"[..], false));
        assert_eq!(after(b"1\n2\n", b"2\n3\n4\n"), (&b"3\n4\n"[..], false));
        assert_eq!(after(b"1\n2\n", b"2\n"), (&b""[..], false));
        assert_eq!(after(b"1\n2\n", b"7\n8\n"), (&b"7\n8\n"[..], true));
    }
}
