//! Remote shell: `POST /api/v1/workers/{id}/shell`, the client's input
//! `POST /api/v1/shell-sessions/{session}/input`, and the worker's two
//! streams, `POST /api/v1/agent/shell/{session}` (output, handled by
//! [`super::exec::upload`]) and `GET /api/v1/agent/shell/{session}/input`.
//!
//! `POST /workers/{id}/shell {"cols": 80, "rows": 24, "argv": [...],
//! "idle_timeout_s": 900}` (all optional; no argv = the worker's login
//! shell) is allowed exactly where remote exec is (the worker's label
//! `remote-exec=allow` on the conductor and the agent's
//! `--allow-remote-exec`) and only to admin tokens; refusals are those of
//! [`super::exec`]. Then it answers 200 `application/octet-stream` with the
//! session id in [`protocol::shell::SESSION_HEADER`] and streams the
//! terminal's output in the [`protocol::exec`] frame format: output bytes
//! (kind 1), a keep-alive (kind 0) every [`KEEPALIVE`] while the terminal
//! is quiet, and the exit frame last: the worker's (exited, signal, not
//! started), or the conductor's own `idle` (no keystroke and no output for
//! `idle_timeout_s`; the shell is hung up) or `lost` (the worker's stream
//! broke, or the worker went offline).
//!
//! The client sends [`protocol::shell::ShellInput`] frames to
//! `POST /shell-sessions/{session}/input`, one request per batch (a
//! browser) or one long chunked request (the CLI); only the token that
//! opened the session is taken (403 for another, 404 once it ended). Input
//! queues for the worker's input stream ([`crate::exec::INPUT_QUEUE`]
//! frames; a full queue holds the client's request back).
//!
//! Audit: a row per session in the exec audit (`kind` = `shell`, the argv
//! asked for, `[]` for the login shell), its end written with the exit
//! code and outcome.
//!
//! Limits: [`crate::exec::MAX_EXEC_SESSIONS`] exec and shell sessions
//! together; `cols` and `rows` 1..=[`MAX_SIZE`]; `idle_timeout_s`
//! 1..=[`super::exec::MAX_TIMEOUT_S`] (default [`DEFAULT_IDLE_S`]).

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::exec::{parse_session, ExecExit, ExecFrame, ExecOutcome};
use protocol::shell::{ShellInput, SESSION_HEADER};
use protocol::{Action, ShellRequest};
use serde::Deserialize;

use super::exec::{launch, wire_argv, Audit, Launch, Registration, MAX_TIMEOUT_S};
use super::message::{ApiError, Ctx, RawResp, Req, Resp};
use crate::exec::{ExecEvent, ExecSessions, InputRefused};
use crate::state::{now_ms, Shared, Status};
use crate::store::TokenRow;

/// Default `idle_timeout_s`.
pub const DEFAULT_IDLE_S: u32 = 900;
/// Largest `cols` and `rows`.
pub const MAX_SIZE: u16 = 1000;
/// A keep-alive goes to a quiet client (and the worker's input stream)
/// this often: a client that went away is noticed when it fails.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How often the worker's input stream looks whether its session ended.
const INPUT_POLL: Duration = Duration::from_secs(1);

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShellBody {
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default = "default_cols")]
    cols: u16,
    #[serde(default = "default_rows")]
    rows: u16,
    #[serde(default = "default_idle")]
    idle_timeout_s: u32,
}

fn default_cols() -> u16 {
    80
}

fn default_rows() -> u16 {
    24
}

fn default_idle() -> u32 {
    DEFAULT_IDLE_S
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, message)
}

impl ShellBody {
    /// The command as the wire carries it, or why not.
    fn request(&self, session: [u8; 16]) -> Result<ShellRequest, ApiError> {
        let argv = wire_argv(&self.argv, 0)?;
        for (name, v) in [("cols", self.cols), ("rows", self.rows)] {
            if !(1..=MAX_SIZE).contains(&v) {
                return Err(bad(format!("{name} must be 1..={MAX_SIZE}")));
            }
        }
        if !(1..=MAX_TIMEOUT_S).contains(&self.idle_timeout_s) {
            return Err(bad(format!("idle_timeout_s must be 1..={MAX_TIMEOUT_S}")));
        }
        Ok(ShellRequest {
            session,
            argv,
            cols: self.cols,
            rows: self.rows,
        })
    }
}

/// The response body: the terminal's output frames, as they arrive.
struct Relay {
    shared: Arc<Shared>,
    worker_id: String,
    rx: Receiver<ExecEvent>,
    /// Keeps the session open while the response lives.
    _reg: Registration,
    audit: Audit,
    /// The session's input (a hang-up goes there when the conductor ends it).
    input: Option<SyncSender<ShellInput>>,
    /// Last keystroke or output, ms.
    activity: Arc<AtomicU64>,
    /// The idle timeout.
    idle_s: u32,
    /// Encoded frames not yet read.
    pending: Vec<u8>,
    /// Read position in `pending`.
    pos: usize,
    /// The exit frame is queued.
    done: bool,
}

impl Relay {
    fn accept(&mut self, ev: ExecEvent) {
        match ev {
            ExecEvent::Frame(ExecFrame::Stdout(d) | ExecFrame::Stderr(d)) => {
                self.activity.store(now_ms(), Ordering::Relaxed);
                self.audit.bytes_out += u64::try_from(d.len()).unwrap_or(u64::MAX);
                ExecFrame::Stdout(d).encode_into(&mut self.pending);
            }
            ExecEvent::Frame(ExecFrame::KeepAlive) => {}
            ExecEvent::Frame(ExecFrame::Exit(e)) => {
                let code = (e.outcome == ExecOutcome::Exited).then_some(e.value);
                self.end(e, code);
            }
            ExecEvent::Broken(why) => {
                self.lost(format!("the worker's output stream broke: {why}"));
            }
        }
    }

    /// Queues the exit frame, writes the audit's end, hangs the shell up
    /// (when it still runs, the worker's input stream says so).
    fn end(&mut self, e: ExecExit, code: Option<i32>) {
        if let Some(input) = self.input.take() {
            let _ = input.try_send(ShellInput::Hangup);
        }
        self.audit.finish(code, e.outcome.as_str());
        ExecFrame::Exit(e).encode_into(&mut self.pending);
        self.done = true;
    }

    fn lost(&mut self, detail: String) {
        self.end(
            ExecExit {
                outcome: ExecOutcome::Lost,
                value: -1,
                detail,
            },
            None,
        );
    }

    /// Quiet for a while: end it idle, or lost, or send a keep-alive.
    fn tick(&mut self) {
        let quiet_ms = now_ms().saturating_sub(self.activity.load(Ordering::Relaxed));
        if quiet_ms >= u64::from(self.idle_s) * 1000 {
            let idle_s = self.idle_s;
            self.end(
                ExecExit {
                    outcome: ExecOutcome::Idle,
                    value: i32::try_from(idle_s).unwrap_or(i32::MAX),
                    detail: format!("no keystroke and no output for {idle_s} s"),
                },
                None,
            );
            return;
        }
        let online = self
            .shared
            .workers()
            .get(&self.worker_id)
            .is_some_and(|w| w.status == Status::Online && !w.revoked);
        if online {
            ExecFrame::KeepAlive.encode_into(&mut self.pending);
        } else {
            self.lost(format!("worker {} went offline", self.worker_id));
        }
    }

    /// How long to wait for the worker before [`Relay::tick`].
    fn wait(&self) -> Duration {
        let quiet_ms = now_ms().saturating_sub(self.activity.load(Ordering::Relaxed));
        let idle_left =
            Duration::from_millis((u64::from(self.idle_s) * 1000).saturating_sub(quiet_ms));
        idle_left.min(KEEPALIVE)
    }
}

impl Read for Relay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        while self.pending.is_empty() && !self.done {
            match self.rx.recv_timeout(self.wait()) {
                Ok(ev) => self.accept(ev),
                Err(RecvTimeoutError::Timeout) => self.tick(),
                Err(RecvTimeoutError::Disconnected) => {
                    self.lost("the worker's output stream ended".into());
                }
            }
        }
        // Whatever else already arrived goes in the same HTTP chunk.
        while !self.done && self.pending.len() < 64 * 1024 {
            match self.rx.try_recv() {
                Ok(ev) => self.accept(ev),
                Err(_) => break,
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `POST /workers/{id}/shell`.
pub(crate) fn start(ctx: &Ctx, req: &Req, id: &str, token: &TokenRow) -> Result<RawResp, ApiError> {
    let body: ShellBody = req.json()?;
    let session = crate::crypto::random_bytes::<16>()?;
    let request = body.request(session)?;
    let activity = Arc::new(AtomicU64::new(now_ms()));
    let launched = launch(
        ctx,
        Launch {
            id,
            token,
            kind: "shell",
            argv: &body.argv,
            session,
            action: Action::Shell(request),
        },
        |tx| {
            ctx.exec
                .open_shell(session, id, &token.id, tx, activity.clone())
        },
    )?;
    let input = ctx.exec.input(&session, &token.id).ok().map(|(tx, _)| tx);
    let mut relay = Relay {
        shared: ctx.shared.clone(),
        worker_id: id.to_string(),
        rx: launched.rx,
        _reg: launched.reg,
        audit: launched.audit,
        input,
        activity,
        idle_s: body.idle_timeout_s,
        pending: Vec::new(),
        pos: 0,
        done: false,
    };
    if let Some(ev) = launched.first {
        relay.accept(ev);
    }
    Ok(RawResp {
        status: 200,
        content_type: "application/octet-stream",
        body: Box::new(relay),
        len: None,
        headers: vec![(SESSION_HEADER, launched.session_hex)],
    })
}

/// `POST /shell-sessions/{session}/input`: the client's input frames, queued
/// for the worker until the body ends.
pub(crate) fn input(
    ctx: &Ctx,
    req: &Req,
    session_hex: &str,
    body: &mut dyn Read,
) -> Result<Resp, ApiError> {
    let token = super::auth::authorize(ctx, req)?;
    let gone = || ApiError::not_found("shell session");
    let session = parse_session(session_hex).ok_or_else(gone)?;
    let (tx, activity) = ctx.exec.input(&session, &token.id).map_err(|e| match e {
        InputRefused::NotFound => gone(),
        InputRefused::OtherToken => {
            ApiError::new(403, "this shell session was opened by another token")
        }
    })?;
    let mut body = BufReader::with_capacity(16 * 1024, body);
    loop {
        match ShellInput::read_from(&mut body) {
            Ok(Some(ShellInput::KeepAlive)) => {}
            Ok(Some(f)) => {
                activity.store(now_ms(), Ordering::Relaxed);
                if tx.send(f).is_err() || !ctx.exec.is_open(&session) {
                    return Err(ApiError::new(410, "the shell session is over"));
                }
            }
            Ok(None) => return Ok(Resp::no_content()),
            Err(e) => return Err(bad(format!("shell input: {e}"))),
        }
    }
}

/// `GET /agent/shell/{session}/input`: the session's input, streamed to
/// the worker it was sent to (once).
pub(crate) fn agent_input(ctx: &Ctx, req: &Req, session_hex: &str) -> Result<RawResp, ApiError> {
    let (worker, _) = super::agent::authenticated_for(ctx, req, "GET")?;
    let gone = || ApiError::not_found("shell session");
    let session = parse_session(session_hex).ok_or_else(gone)?;
    let rx = ctx.exec.take_input(&session, &worker).ok_or_else(|| {
        tracing::info!(worker_id = %worker, session = session_hex, "shell input refused: no such session");
        gone()
    })?;
    Ok(RawResp {
        status: 200,
        content_type: "application/octet-stream",
        body: Box::new(InputFeed {
            rx,
            sessions: ctx.exec.clone(),
            session,
            pending: Vec::new(),
            pos: 0,
            done: false,
            last_sent: Instant::now(),
        }),
        len: None,
        headers: Vec::new(),
    })
}

/// The worker's input stream: the queued frames, a keep-alive every
/// [`KEEPALIVE`], the end when the session ends or after a hang-up.
struct InputFeed {
    rx: Receiver<ShellInput>,
    sessions: Arc<ExecSessions>,
    session: [u8; 16],
    pending: Vec<u8>,
    pos: usize,
    done: bool,
    last_sent: Instant,
}

impl Read for InputFeed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        while self.pending.is_empty() && !self.done {
            match self.rx.recv_timeout(INPUT_POLL) {
                Ok(f) => {
                    self.done = f == ShellInput::Hangup;
                    f.encode_into(&mut self.pending);
                }
                Err(RecvTimeoutError::Timeout) if self.sessions.is_open(&self.session) => {
                    if self.last_sent.elapsed() >= KEEPALIVE {
                        ShellInput::KeepAlive.encode_into(&mut self.pending);
                    }
                }
                Err(_) => self.done = true,
            }
        }
        if !self.pending.is_empty() {
            self.last_sent = Instant::now();
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{EXEC_ARG_LEN, MAX_EXEC_ARGS};
    use serde_json::{json, Value};

    #[test]
    fn bodies_are_checked() {
        let body = |v: Value| serde_json::from_value::<ShellBody>(v).ok();
        for v in [
            json!({}),
            json!({"argv": ["htop"], "cols": 120, "rows": 40, "idle_timeout_s": 60}),
        ] {
            let ok = body(v.clone()).map(|b| b.request([0; 16]).is_ok());
            assert_eq!(ok, Some(true), "{v}");
        }
        for v in [
            json!({"argv": [""]}),
            json!({"argv": ["a\u{0}b"]}),
            json!({"argv": ["x".repeat(EXEC_ARG_LEN + 1)]}),
            json!({"argv": vec!["x"; MAX_EXEC_ARGS + 1]}),
            json!({"cols": 0}),
            json!({"rows": MAX_SIZE + 1}),
            json!({"idle_timeout_s": 0}),
        ] {
            let b = body(v.clone());
            assert!(b.is_some_and(|b| b.request([0; 16]).is_err()), "{v}");
        }
        assert!(body(json!({"cols": 70000})).is_none(), "not a u16");
        assert!(body(json!({"tty": true})).is_none(), "unknown field");
    }
}
