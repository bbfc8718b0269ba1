//! `GET /api/v1/workers/{id}/services/{name}/logs?tail=<bytes>&follow=<s>`:
//! sends `Action::Logs` and relays the worker's `LogChunk` frames for that
//! command id to the client as `text/plain`, chunked and flushed as they
//! arrive, until the chunk marked `last` or `follow + 10` s.
//!
//! 504 when the worker is offline or sends nothing within
//! [`FIRST_CHUNK_TIMEOUT`]. Chunks are relayed in index order; a duplicate
//! (QoS 1 redelivery) is dropped, a gap is marked in the text as
//! `[aerekos: N log chunk(s) lost]`.
//!
//! Limits: `tail` ≤ [`MAX_TAIL`] bytes (default [`DEFAULT_TAIL`]), `follow`
//! ≤ [`MAX_FOLLOW_S`] s (default 0); at most [`MAX_LOG_STREAMS`] relays at
//! once (503 beyond), each holding one HTTP thread; a relay buffers at most
//! [`RELAY_CHUNKS`] chunks for a slow client, then drops chunks.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{Action, LogChunk, LogRequest};
use rumqttc::QoS;

use super::message::{ApiError, Ctx, RawResp, Req};
use crate::state::{Shared, Status};

/// Default `tail`, bytes.
pub const DEFAULT_TAIL: u32 = 16 * 1024;
/// Largest `tail`, bytes.
pub const MAX_TAIL: u32 = 1024 * 1024;
/// Largest `follow`, seconds.
pub const MAX_FOLLOW_S: u16 = 300;
/// Concurrent relays.
pub const MAX_LOG_STREAMS: usize = 4;
/// How long the first chunk may take.
pub const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_secs(5);
/// Chunks buffered per relay.
pub const RELAY_CHUNKS: usize = 1024;
/// Grace after `follow` before the relay gives up waiting for `last`.
const GRACE: Duration = Duration::from_secs(10);

fn num<T: std::str::FromStr + PartialOrd>(
    req: &Req,
    key: &str,
    default: T,
    max: T,
) -> Result<T, ApiError> {
    match req.query.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<T>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| ApiError::new(400, format!("{key} must be a number ≤ the limit"))),
    }
}

/// Deregisters the relay when the response ends (or is never sent).
struct Registration {
    shared: Arc<Shared>,
    key: (String, u32),
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.log_streams().remove(&self.key);
    }
}

/// The response body: chunk data as it arrives.
struct Relay {
    rx: Receiver<LogChunk>,
    _reg: Option<Registration>,
    pending: VecDeque<u8>,
    next_index: u32,
    done: bool,
    deadline: Instant,
}

impl Relay {
    /// Queues a chunk's bytes (after a gap marker when chunks were lost).
    fn accept(&mut self, c: LogChunk) {
        if c.index < self.next_index {
            return; // duplicate
        }
        if c.index > self.next_index {
            let lost = c.index - self.next_index;
            self.pending
                .extend(format!("\n[aerekos: {lost} log chunk(s) lost]\n").bytes());
        }
        self.next_index = c.index.saturating_add(1);
        self.pending.extend(c.data.iter());
        self.done |= c.last;
    }
}

impl Read for Relay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() && !self.done {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.done = true;
                break;
            }
            match self.rx.recv_timeout(left) {
                Ok(c) => self.accept(c),
                Err(_) => self.done = true,
            }
        }
        // Whatever else already arrived goes in the same HTTP chunk.
        while let Ok(c) = self.rx.try_recv() {
            self.accept(c);
        }
        let n = buf.len().min(self.pending.len());
        for (slot, b) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *slot = b;
        }
        Ok(n)
    }
}

/// The handler.
pub(crate) fn stream(ctx: &Ctx, req: &Req, id: &str, name: &str) -> Result<RawResp, ApiError> {
    if !crate::spec::valid_name(name) {
        return Err(ApiError::new(
            400,
            "service name must be 1..=32 characters of [a-z0-9-]",
        ));
    }
    let tail = num(req, "tail", DEFAULT_TAIL, MAX_TAIL)?;
    let follow = num(req, "follow", 0u16, MAX_FOLLOW_S)?;
    let (tx, rx) = mpsc::sync_channel(RELAY_CHUNKS);
    let (cmd_id, frame) = {
        let mut workers = ctx.shared.workers();
        let w = super::commands::commandable(&mut workers, id)?;
        if w.status != Status::Online {
            return Err(ApiError::new(504, "worker is offline"));
        }
        // Checked, then released before sealing takes the store (the lock
        // order at `Shared`): only this path adds relays, and it holds the
        // worker map from here to the insert, so the count cannot grow.
        if ctx.shared.log_streams().len() >= MAX_LOG_STREAMS {
            return Err(ApiError::new(
                503,
                format!("at most {MAX_LOG_STREAMS} log streams at once"),
            ));
        }
        let action = Action::Logs(LogRequest {
            name: protocol::frame::bounded(name),
            tail_bytes: tail,
            follow_s: follow,
        });
        let (cmd_id, frame) =
            crate::commands::seal_command(&ctx.shared, w, action).map_err(ApiError::internal)?;
        // Registered before publishing, under the worker lock ingest takes
        // first: the first chunk cannot be missed.
        ctx.shared
            .log_streams()
            .insert((id.to_string(), cmd_id), tx);
        (cmd_id, frame)
    };
    let reg = Registration {
        shared: ctx.shared.clone(),
        key: (id.to_string(), cmd_id),
    };
    let topic = protocol::topic::topic(id, protocol::TopicKind::Cmd);
    ctx.client
        .try_publish(topic, QoS::AtLeastOnce, false, frame)
        .map_err(|e| ApiError::new(503, format!("MQTT queue unavailable: {e}")))?;
    let first = rx.recv_timeout(FIRST_CHUNK_TIMEOUT).map_err(|_| {
        ApiError::new(
            504,
            format!(
                "no log data from the worker within {} s",
                FIRST_CHUNK_TIMEOUT.as_secs()
            ),
        )
    })?;
    tracing::info!(
        worker_id = id,
        service = name,
        cmd_id,
        tail,
        follow,
        "log relay"
    );
    let mut relay = Relay {
        rx,
        _reg: Some(reg),
        pending: VecDeque::new(),
        next_index: 0,
        done: false,
        deadline: Instant::now() + Duration::from_secs(u64::from(follow)) + GRACE,
    };
    relay.accept(first);
    Ok(RawResp {
        status: 200,
        content_type: "text/plain; charset=utf-8",
        body: Box::new(relay),
        len: None,
        headers: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32, data: &str, last: bool) -> LogChunk {
        LogChunk {
            cmd_id: 1,
            name: protocol::frame::bounded("web"),
            index,
            data: heapless::Vec::from_slice(data.as_bytes()).unwrap_or_default(),
            last,
        }
    }

    #[test]
    fn relay_orders_marks_gaps_and_ends_at_last() {
        let (tx, rx) = mpsc::sync_channel(8);
        let shared_less = Relay {
            rx,
            _reg: None,
            pending: VecDeque::new(),
            next_index: 0,
            done: false,
            deadline: Instant::now() + Duration::from_secs(5),
        };
        for c in [
            chunk(0, "a\n", false),
            chunk(0, "dup\n", false),
            chunk(2, "c\n", false),
            chunk(3, "d\n", true),
        ] {
            tx.send(c).unwrap();
        }
        let mut out = String::new();
        let mut r = shared_less;
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "a\n\n[aerekos: 1 log chunk(s) lost]\nc\nd\n");
    }
}
