//! Remote exec: `POST /api/v1/workers/{id}/exec`, the worker's upload
//! `POST /api/v1/agent/exec/{session}` and the audit,
//! `GET /api/v1/exec-sessions?limit=N`.
//!
//! `POST /workers/{id}/exec {"argv": [...], "timeout_s": 60,
//! "max_output": 1048576}` (token-authenticated like every API route) is
//! refused 403 unless the worker carries the label [`EXEC_LABEL`] =
//! [`EXEC_LABEL_VALUE`] on the conductor (set with `PUT /workers/{id}/labels`),
//! 503 while it is not online (409 when revoked). Otherwise it opens a
//! session ([`crate::exec::ExecSessions`]), writes the audit row, sends
//! `Action::Exec` over MQTT and waits up to [`REPLY_TIMEOUT`] for the
//! worker's reply or first output: an error reply (the agent was started
//! without `--allow-remote-exec`, or cannot run it) is a 403 with the
//! worker's words; no answer is a 504. Then it answers 200 with
//! `application/x-ndjson`, one line per piece of output as it arrives,
//! `{"stream":"stdout"|"stderr","data":"…"}` (UTF-8; bytes that are not are
//! shown as U+FFFD, a character split between pieces is kept whole), and one
//! last line: `{"exit_code":N,"outcome":"exited"}`, or
//! `{"error":"…","outcome":"timeout"|"output_cap"|"signal"|"not_started"|"broken"|"lost"}`.
//! The wait ends at the worker's exit frame, or `timeout_s` + [`GRACE`].
//!
//! The upload is authenticated like the worker's downloads
//! (`Authorization: Aerekos-Worker`, method `POST`, [`super::agent`]) and
//! accepted only from the worker the session was sent to, once; its body is
//! the [`protocol::exec`] stream. When the caller goes away, the session
//! closes and the upload is answered 410, which makes the worker kill the
//! command.
//!
//! Audit: a row per request (who: the token's id and name; worker; argv;
//! start), completed at the end with the exit code, bytes relayed and the
//! outcome. A conductor stopped mid-session leaves the row without an end:
//! listed as `unfinished` (`running` while the session is still open).
//!
//! Limits: argv 1..=[`protocol::MAX_EXEC_ARGS`] elements of at most
//! [`protocol::EXEC_ARG_LEN`] bytes; `timeout_s` 1..=[`MAX_TIMEOUT_S`]
//! (default [`DEFAULT_TIMEOUT_S`]); `max_output` ≤ [`MAX_OUTPUT`] (default
//! [`DEFAULT_MAX_OUTPUT`]); [`crate::exec::MAX_EXEC_SESSIONS`] at once (503
//! beyond). Every token may use it: tokens carry no roles yet.

use std::io::{BufReader, Read};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::exec::{parse_session, ExecExit, ExecFrame, ExecOutcome};
use protocol::{Action, ExecRequest, Reply, ReplyStatus, EXEC_ARG_LEN, MAX_EXEC_ARGS};
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::{json, Value};

use super::message::{ApiError, Ctx, RawResp, Req, Resp};
use crate::exec::{ExecEvent, ExecSessions, MAX_EXEC_SESSIONS};
use crate::state::{now_ms, Shared, Status};
use crate::store::{ExecSessionRow, TokenRow};

/// The label that allows remote exec on a worker (conductor side).
pub const EXEC_LABEL: &str = "remote-exec";
/// Its value.
pub const EXEC_LABEL_VALUE: &str = "allow";
/// Default `timeout_s`.
pub const DEFAULT_TIMEOUT_S: u32 = 60;
/// Largest `timeout_s`.
pub const MAX_TIMEOUT_S: u32 = 24 * 3600;
/// Default `max_output`, bytes.
pub const DEFAULT_MAX_OUTPUT: u32 = 1 << 20;
/// Largest `max_output`, bytes.
pub const MAX_OUTPUT: u32 = 256 << 20;
/// How long the worker has to answer (reply or first output).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for the exit frame ends this long after `timeout_s`.
pub const GRACE: Duration = Duration::from_secs(15);
/// Events buffered between the upload and the caller's response.
const FEED: usize = 64;
/// Largest `limit` of the audit list.
const MAX_LIST: usize = 1000;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    argv: Vec<String>,
    #[serde(default = "default_timeout")]
    timeout_s: u32,
    #[serde(default = "default_max_output")]
    max_output: u32,
}

fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_S
}

fn default_max_output() -> u32 {
    DEFAULT_MAX_OUTPUT
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, message)
}

/// An argv as the wire carries it (`min`..=[`MAX_EXEC_ARGS`] elements of
/// at most [`EXEC_ARG_LEN`] bytes, no NUL, a non-empty program), or why
/// not; exec needs a program (`min` 1), a shell may take the login shell.
pub(super) fn wire_argv(
    argv: &[String],
    min: usize,
) -> Result<heapless::Vec<heapless::String<EXEC_ARG_LEN>, MAX_EXEC_ARGS>, ApiError> {
    if argv.len() < min || argv.len() > MAX_EXEC_ARGS {
        return Err(bad(format!(
            "argv must have {min}..={MAX_EXEC_ARGS} elements"
        )));
    }
    if argv.first().is_some_and(String::is_empty) {
        return Err(bad("argv[0] (the program) must not be empty"));
    }
    let mut out = heapless::Vec::new();
    for a in argv {
        if a.contains('\0') {
            return Err(bad("argv elements must not contain NUL"));
        }
        let s = heapless::String::try_from(a.as_str())
            .map_err(|_| bad(format!("argv elements are at most {EXEC_ARG_LEN} bytes")))?;
        out.push(s)
            .map_err(|_| bad(format!("argv must have {min}..={MAX_EXEC_ARGS} elements")))?;
    }
    Ok(out)
}

impl ExecBody {
    /// The command as the wire carries it, or why not.
    fn request(&self, session: [u8; 16]) -> Result<ExecRequest, ApiError> {
        let argv = wire_argv(&self.argv, 1)?;
        if !(1..=MAX_TIMEOUT_S).contains(&self.timeout_s) {
            return Err(bad(format!("timeout_s must be 1..={MAX_TIMEOUT_S}")));
        }
        if self.max_output > MAX_OUTPUT {
            return Err(bad(format!("max_output must be ≤ {MAX_OUTPUT}")));
        }
        Ok(ExecRequest {
            session,
            argv,
            timeout_s: self.timeout_s,
            max_output: self.max_output,
        })
    }
}

/// Closes the session and drops the reply waiter when the request ends,
/// however it ends.
pub(super) struct Registration {
    shared: Arc<Shared>,
    sessions: Arc<ExecSessions>,
    session: [u8; 16],
    worker_id: String,
    cmd_id: Option<u32>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.close(&self.session);
        if let Some(cmd_id) = self.cmd_id {
            self.shared.take_waiter(&self.worker_id, cmd_id);
        }
    }
}

/// The audit row's end, written once.
pub(super) struct Audit {
    shared: Arc<Shared>,
    /// Session id, hex (the row's key).
    id: String,
    /// Output bytes relayed so far.
    pub bytes_out: u64,
    /// The end is written.
    finished: bool,
}

impl Audit {
    /// Writes the end (once; later calls do nothing).
    pub fn finish(&mut self, exit_code: Option<i32>, outcome: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        let r = self.shared.db().finish_exec_session(
            &self.id,
            now_ms(),
            exit_code,
            self.bytes_out,
            outcome,
        );
        if let Err(e) = r {
            tracing::error!(session = %self.id, "exec audit: {e}");
        }
        tracing::info!(session = %self.id, outcome, exit_code, bytes_out = self.bytes_out, "exec ended");
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.finish(None, "client disconnected");
    }
}

/// Text of `data` after what `carry` kept of the previous piece: invalid
/// bytes become U+FFFD, an incomplete character at the end waits in `carry`.
fn text(carry: &mut Vec<u8>, data: &[u8]) -> String {
    let mut buf = std::mem::take(carry);
    buf.extend_from_slice(data);
    let mut out = String::new();
    let mut rest = buf.as_slice();
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        rest = &after[n..];
                    }
                    None => {
                        *carry = after.to_vec();
                        return out;
                    }
                }
            }
        }
    }
}

/// The last line for an exit frame, and the audit's exit code.
fn exit_line(e: &ExecExit) -> (Value, Option<i32>) {
    let outcome = e.outcome.as_str();
    match e.outcome {
        ExecOutcome::Exited => (
            json!({"exit_code": e.value, "outcome": outcome}),
            Some(e.value),
        ),
        ExecOutcome::Signalled => (
            json!({"error": e.detail, "outcome": outcome, "signal": e.value}),
            None,
        ),
        ExecOutcome::OutputCap => (
            json!({"error": e.detail, "outcome": outcome, "truncated": true}),
            None,
        ),
        ExecOutcome::TimedOut | ExecOutcome::NotStarted | ExecOutcome::Idle | ExecOutcome::Lost => {
            (json!({"error": e.detail, "outcome": outcome}), None)
        }
    }
}

/// The response body: one JSON line per event, as they arrive.
struct Relay {
    rx: Receiver<ExecEvent>,
    /// Keeps the session open while the response lives.
    _reg: Registration,
    audit: Audit,
    /// Bytes of lines not yet read.
    pending: Vec<u8>,
    /// Read position in `pending`.
    pos: usize,
    /// An incomplete UTF-8 character at the end of stdout, stderr.
    carry: [Vec<u8>; 2],
    /// The last line is queued.
    done: bool,
    /// When waiting for the exit frame ends.
    deadline: Instant,
    /// `timeout_s` + [`GRACE`], for the message.
    patience: Duration,
}

impl Relay {
    fn line(&mut self, v: &Value) {
        self.pending.extend_from_slice(v.to_string().as_bytes());
        self.pending.push(b'\n');
    }

    fn output(&mut self, stderr: bool, data: &[u8]) {
        self.audit.bytes_out += u64::try_from(data.len()).unwrap_or(u64::MAX);
        let s = text(&mut self.carry[usize::from(stderr)], data);
        if !s.is_empty() {
            let stream = if stderr { "stderr" } else { "stdout" };
            self.line(&json!({"stream": stream, "data": s}));
        }
    }

    /// Flushes what the carries hold (the stream ended).
    fn flush_carries(&mut self) {
        for (i, stream) in ["stdout", "stderr"].into_iter().enumerate() {
            if !self.carry[i].is_empty() {
                let s = String::from_utf8_lossy(&std::mem::take(&mut self.carry[i])).into_owned();
                self.line(&json!({"stream": stream, "data": s}));
            }
        }
    }

    fn end(&mut self, last: &Value, exit_code: Option<i32>, outcome: &str) {
        self.flush_carries();
        self.line(last);
        self.audit.finish(exit_code, outcome);
        self.done = true;
    }

    fn accept(&mut self, ev: ExecEvent) {
        match ev {
            ExecEvent::Frame(ExecFrame::Stdout(d)) => self.output(false, &d),
            ExecEvent::Frame(ExecFrame::Stderr(d)) => self.output(true, &d),
            ExecEvent::Frame(ExecFrame::KeepAlive) => {}
            ExecEvent::Frame(ExecFrame::Exit(e)) => {
                let (last, code) = exit_line(&e);
                self.end(&last, code, e.outcome.as_str());
            }
            ExecEvent::Broken(why) => {
                let message = format!("the worker's output stream broke: {why}");
                self.end(
                    &json!({"error": message, "outcome": "broken"}),
                    None,
                    "broken",
                );
            }
        }
    }

    fn lost(&mut self) {
        let message = format!(
            "no exit status from the worker within {} s",
            self.patience.as_secs()
        );
        self.end(&json!({"error": message, "outcome": "lost"}), None, "lost");
    }
}

impl Read for Relay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        while self.pending.is_empty() && !self.done {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.lost();
                break;
            }
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.accept(ev),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => self.lost(),
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

/// A session the worker has answered: what its relay needs.
pub(super) struct Launched {
    /// Closes the session when dropped.
    pub reg: Registration,
    /// Its audit row's end.
    pub audit: Audit,
    /// The worker's upload, as it comes.
    pub rx: Receiver<ExecEvent>,
    /// What came before the reply, if anything did.
    pub first: Option<ExecEvent>,
    /// The session id, hex.
    pub session_hex: String,
}

/// What a remote exec or shell asks of [`launch`].
pub(super) struct Launch<'a> {
    /// The worker.
    pub id: &'a str,
    /// Who asks.
    pub token: &'a TokenRow,
    /// `exec` or `shell` (the audit's kind, and the logs).
    pub kind: &'static str,
    /// The audit's argv.
    pub argv: &'a [String],
    /// The session id.
    pub session: [u8; 16],
    /// The command.
    pub action: Action,
}

/// Checks that `l.id` may run it (the label, online), opens the session
/// with `open` (given the upload's feed; `false` = no room), writes the
/// audit row, sends the command and waits for the worker's answer: a 403
/// with its words when it refuses, a 504 when it does not answer.
pub(super) fn launch(
    ctx: &Ctx,
    l: Launch<'_>,
    open: impl FnOnce(mpsc::SyncSender<ExecEvent>) -> bool,
) -> Result<Launched, ApiError> {
    let Launch {
        id,
        token,
        kind,
        argv,
        session,
        action,
    } = l;
    let (tx, rx) = mpsc::sync_channel(FEED);
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let mut reg = Registration {
        shared: ctx.shared.clone(),
        sessions: ctx.exec.clone(),
        session,
        worker_id: id.to_string(),
        cmd_id: None,
    };
    let frame = {
        let mut workers = ctx.shared.workers();
        let w = super::commands::commandable(&mut workers, id)?;
        if w.labels.get(EXEC_LABEL).map(String::as_str) != Some(EXEC_LABEL_VALUE) {
            return Err(ApiError::new(
                403,
                format!(
                    "remote {kind} is not allowed on worker {id}: the conductor needs its label \
                     {EXEC_LABEL}={EXEC_LABEL_VALUE} (PUT /api/v1/workers/{id}/labels, or \
                     `aerekos labels {id} … {EXEC_LABEL}={EXEC_LABEL_VALUE}`), and the agent \
                     --allow-remote-exec"
                ),
            ));
        }
        if w.status != Status::Online {
            return Err(ApiError::new(503, format!("worker {id} is offline")));
        }
        if !open(tx) {
            return Err(ApiError::new(
                503,
                format!("at most {MAX_EXEC_SESSIONS} exec and shell sessions at once"),
            ));
        }
        let (cmd_id, frame) =
            crate::commands::seal_command(&ctx.shared, w, action).map_err(ApiError::internal)?;
        reg.cmd_id = Some(cmd_id);
        ctx.shared
            .pending()
            .insert((id.to_string(), cmd_id), reply_tx);
        frame
    };
    let session_hex = protocol::hex_string(&session);
    let argv_json = serde_json::to_string(argv).map_err(ApiError::internal)?;
    ctx.shared.db().insert_exec_session(&ExecSessionRow {
        id: session_hex.clone(),
        token_id: token.id.clone(),
        token_name: token.name.clone(),
        worker_id: id.to_string(),
        kind: kind.into(),
        argv_json,
        started_ms: now_ms(),
        ended_ms: None,
        exit_code: None,
        bytes_out: 0,
        outcome: String::new(),
    })?;
    let mut audit = Audit {
        shared: ctx.shared.clone(),
        id: session_hex.clone(),
        bytes_out: 0,
        finished: false,
    };
    tracing::info!(
        worker_id = id,
        session = %session_hex,
        token = %token.name,
        argv = ?argv,
        "remote {kind}"
    );
    let topic = protocol::topic::topic(id, protocol::TopicKind::Cmd);
    if let Err(e) = ctx
        .client
        .try_publish(topic, QoS::AtLeastOnce, false, frame)
    {
        audit.finish(None, "not sent");
        return Err(ApiError::new(503, format!("MQTT queue unavailable: {e}")));
    }
    // The worker's answer: its reply, or already its output (the upload
    // and the reply race; either means it runs).
    let answered_by = Instant::now() + REPLY_TIMEOUT;
    let first = loop {
        match reply_rx.try_recv() {
            Ok(r) if r.status == ReplyStatus::Ok => break None,
            Ok(r) => {
                let detail = r.detail.as_str();
                audit.finish(None, &format!("refused by the worker: {detail}"));
                return Err(ApiError::new(403, format!("worker {id} refused: {detail}")));
            }
            Err(_) => {}
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(ev) => break Some(ev),
            Err(RecvTimeoutError::Timeout) if Instant::now() < answered_by => {}
            Err(_) => {
                audit.finish(None, "no answer");
                return Err(ApiError::new(
                    504,
                    format!(
                        "worker {id} did not answer the {kind} command within {} s (an agent \
                         without remote exec ignores it)",
                        REPLY_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
    };
    Ok(Launched {
        reg,
        audit,
        rx,
        first,
        session_hex,
    })
}

/// `POST /workers/{id}/exec`.
pub(crate) fn start(ctx: &Ctx, req: &Req, id: &str, token: &TokenRow) -> Result<RawResp, ApiError> {
    let body: ExecBody = req.json()?;
    let session = crate::crypto::random_bytes::<16>()?;
    let request = body.request(session)?;
    let launched = launch(
        ctx,
        Launch {
            id,
            token,
            kind: "exec",
            argv: &body.argv,
            session,
            action: Action::Exec(request),
        },
        |tx| ctx.exec.open(session, id, tx),
    )?;
    let patience = Duration::from_secs(u64::from(body.timeout_s)) + GRACE;
    let mut relay = Relay {
        rx: launched.rx,
        _reg: launched.reg,
        audit: launched.audit,
        pending: Vec::new(),
        pos: 0,
        carry: [Vec::new(), Vec::new()],
        done: false,
        deadline: Instant::now() + patience,
        patience,
    };
    if let Some(ev) = launched.first {
        relay.accept(ev);
    }
    Ok(RawResp {
        status: 200,
        content_type: "application/x-ndjson",
        body: Box::new(relay),
        len: None,
        headers: vec![("X-Aerekos-Exec-Session", launched.session_hex)],
    })
}

/// `POST /agent/exec/{session}` (`POST /agent/shell/{session}` when
/// `shell`): the worker's output stream, fed to the session's relay until
/// the exit frame.
pub(crate) fn upload(
    ctx: &Ctx,
    req: &Req,
    session_hex: &str,
    body: &mut dyn Read,
    shell: bool,
) -> Result<Resp, ApiError> {
    let (worker, _) = super::agent::authenticated_for(ctx, req, "POST")?;
    let what = if shell {
        "shell session"
    } else {
        "exec session"
    };
    let gone = || ApiError::not_found(what);
    let session = parse_session(session_hex).ok_or_else(gone)?;
    let tx = ctx.exec.attach(&session, &worker, shell).ok_or_else(|| {
        tracing::info!(worker_id = %worker, session = session_hex, "{what} upload refused: no such session");
        gone()
    })?;
    let mut body = BufReader::with_capacity(64 * 1024, body);
    loop {
        match ExecFrame::read_from(&mut body) {
            Ok(Some(ExecFrame::KeepAlive)) => {}
            Ok(Some(f)) => {
                let last = matches!(f, ExecFrame::Exit(_));
                if tx.send(ExecEvent::Frame(f)).is_err() {
                    return Err(ApiError::new(410, format!("the {what} is over")));
                }
                if last {
                    return Ok(Resp::no_content());
                }
            }
            Ok(None) => {
                let why = "the stream ended without an exit status";
                let _ = tx.send(ExecEvent::Broken(why.into()));
                return Err(bad(why));
            }
            Err(e) => {
                let _ = tx.send(ExecEvent::Broken(e.to_string()));
                return Err(bad(format!("exec stream: {e}")));
            }
        }
    }
}

/// `GET /exec-sessions?limit=N`: the audit, newest first.
pub(crate) fn list(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let limit = match req.query.get("limit") {
        None => 50,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| bad(format!("limit must be 1..={MAX_LIST}")))?,
    };
    let rows = ctx.shared.db().exec_sessions(limit)?;
    let sessions: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let argv: Value = serde_json::from_str(&r.argv_json).unwrap_or(Value::Null);
            let outcome = match (r.ended_ms, r.outcome.is_empty()) {
                (Some(_), _) | (None, false) => r.outcome,
                (None, true) => {
                    let open = parse_session(&r.id).is_some_and(|s| ctx.exec.is_open(&s));
                    if open { "running" } else { "unfinished" }.to_string()
                }
            };
            json!({
                "id": r.id,
                "token_id": r.token_id,
                "token_name": r.token_name,
                "worker_id": r.worker_id,
                "kind": r.kind,
                "argv": argv,
                "started_ms": r.started_ms,
                "ended_ms": r.ended_ms,
                "exit_code": r.exit_code,
                "bytes_out": r.bytes_out,
                "outcome": outcome,
            })
        })
        .collect();
    Ok(Resp::ok(json!({ "sessions": sessions })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keeps_split_characters_whole_and_marks_bad_bytes() {
        let mut carry = Vec::new();
        let e = "é".as_bytes();
        assert_eq!(text(&mut carry, &[b'a', e[0]]), "a");
        assert_eq!(carry, [e[0]]);
        assert_eq!(text(&mut carry, &[e[1], b'b']), "éb");
        assert!(carry.is_empty());
        assert_eq!(text(&mut carry, &[0xff, b'c']), "\u{FFFD}c");
    }

    #[test]
    fn bodies_are_checked() {
        let body = |v: Value| serde_json::from_value::<ExecBody>(v).ok();
        let ok = body(json!({"argv": ["uname", "-a"]})).map(|b| b.request([0; 16]).is_ok());
        assert_eq!(ok, Some(true));
        for v in [
            json!({"argv": []}),
            json!({"argv": [""]}),
            json!({"argv": ["a\u{0}b"]}),
            json!({"argv": ["x".repeat(EXEC_ARG_LEN + 1)]}),
            json!({"argv": vec!["x"; MAX_EXEC_ARGS + 1]}),
            json!({"argv": ["ls"], "timeout_s": 0}),
            json!({"argv": ["ls"], "max_output": MAX_OUTPUT + 1}),
        ] {
            let b = body(v.clone());
            assert!(b.is_some_and(|b| b.request([0; 16]).is_err()), "{v}");
        }
        assert!(body(json!({"argv": ["ls"], "shell": true})).is_none());
    }
}
