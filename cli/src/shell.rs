//! `aerekos shell <worker> [-- program args…]`: an interactive terminal on a
//! worker (`POST /api/v1/workers/{id}/shell`; its input goes to
//! `POST /api/v1/shell-sessions/{session}/input` as one streamed request).
//!
//! When stdin is a terminal it is put in raw mode for the session (every
//! key, Ctrl-C included, goes to the remote terminal; restored however the
//! session ends) and its size is sent at the start and whenever it changes
//! (looked at every [`RESIZE_POLL`]: no signal handler). When stdin is not a
//! terminal (a pipe), its bytes are typed as they come and its end is sent
//! as Ctrl-D. The exit status is the remote program's: its exit code,
//! 128 + N when signal N ended it, 127 when it could not start, 1 when the
//! session ended otherwise (idle, lost; the reason goes to stderr).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use protocol::exec::{ExecFrame, ExecOutcome};
use protocol::shell::{client_input_path, ShellInput, SESSION_HEADER};
use rustix::termios::{self, Termios};
use serde_json::json;

use crate::{CliError, Client};

/// How often the local terminal's size is looked at.
pub const RESIZE_POLL: Duration = Duration::from_millis(250);
/// A keep-alive goes with the input this often while nothing is typed.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// The whole session's limit (the conductor's idle timeout ends quiet ones).
const SESSION_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Puts the terminal back as it was when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw mode on stdin, if it is a terminal.
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(stdin.as_fd(), termios::OptionalActions::Drain, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            termios::OptionalActions::Drain,
            &self.saved,
        );
    }
}

/// The local terminal's size (columns, rows), if stdin or stdout is one.
fn local_size() -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(std::io::stdin().as_fd())
        .or_else(|_| termios::tcgetwinsize(std::io::stdout().as_fd()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The input request's body: frames from the stdin and resize threads,
/// a keep-alive while they are quiet.
struct InputBody {
    rx: Receiver<ShellInput>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for InputBody {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            match self.rx.recv_timeout(KEEPALIVE) {
                Ok(f) => f.encode_into(&mut self.buf),
                Err(RecvTimeoutError::Timeout) => ShellInput::KeepAlive.encode_into(&mut self.buf),
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
            }
            while let Ok(f) = self.rx.try_recv() {
                f.encode_into(&mut self.buf);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Types stdin into the session until it ends (then Ctrl-D when it is a
/// pipe) or the session does.
fn read_stdin(tx: &Sender<ShellInput>, tty: bool) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 4096];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                if !tty {
                    let _ = tx.send(ShellInput::Data(vec![4]));
                }
                return;
            }
            Ok(n) => {
                if tx.send(ShellInput::Data(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends the local terminal's size whenever it changes.
fn watch_size(tx: &Sender<ShellInput>, mut last: (u16, u16)) {
    loop {
        std::thread::sleep(RESIZE_POLL);
        if let Some(now) = local_size().filter(|s| *s != last) {
            last = now;
            let (cols, rows) = now;
            if tx.send(ShellInput::Resize { cols, rows }).is_err() {
                return;
            }
        }
    }
}

/// `aerekos shell`: the exit status to leave with.
pub fn run(
    client: &Client,
    out: &mut dyn Write,
    worker: &str,
    argv: &[String],
    idle_timeout_s: Option<u32>,
) -> Result<u8, CliError> {
    let (cols, rows) = local_size().unwrap_or((80, 24));
    let mut body = json!({"argv": argv, "cols": cols, "rows": rows});
    if let Some(s) = idle_timeout_s {
        body["idle_timeout_s"] = s.into();
    }
    let mut req = crate::agent(SESSION_LIMIT, &client.roots)
        .post(client.url(&format!("/workers/{worker}/shell")));
    if let Some(a) = client.auth() {
        req = req.header("Authorization", a);
    }
    let resp = req
        .header("Content-Type", "application/json")
        .send(body.to_string())?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Client::finish(Ok(resp)).map(|_| 1);
    }
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| CliError::Failed(format!("the conductor sent no {SESSION_HEADER}")))?;
    let raw = RawMode::enter();
    let tty = raw.is_some();
    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::spawn(move || read_stdin(&tx, tty));
    }
    if tty {
        std::thread::spawn(move || watch_size(&tx, (cols, rows)));
    } else {
        drop(tx);
    }
    let input_url = format!("{}{}", client.base, client_input_path(&session));
    let (agent, auth) = (crate::agent(SESSION_LIMIT, &client.roots), client.auth());
    std::thread::spawn(move || {
        let mut req = agent.post(input_url);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let sent = req.header("Content-Type", "application/octet-stream").send(
            ureq::SendBody::from_owned_reader(InputBody {
                rx,
                buf: Vec::new(),
                pos: 0,
            }),
        );
        if let Ok(r) = sent.as_ref().map(|r| r.status().as_u16()) {
            if !(200..300).contains(&r) {
                eprint!("aerekos: the conductor refused the input ({r})\r\n");
            }
        }
    });
    let mut output = std::io::BufReader::new(resp.into_body().into_reader());
    let code = loop {
        match ExecFrame::read_from(&mut output) {
            Ok(Some(ExecFrame::Stdout(d) | ExecFrame::Stderr(d))) => {
                out.write_all(&d)?;
                out.flush()?;
            }
            Ok(Some(ExecFrame::KeepAlive)) => {}
            Ok(Some(ExecFrame::Exit(e))) => {
                let code = match e.outcome {
                    // The low byte is the status on Unix.
                    ExecOutcome::Exited => u8::try_from(e.value & 0xff).unwrap_or(1),
                    ExecOutcome::Signalled => {
                        u8::try_from(e.value).map_or(1, |n| 128u8.saturating_add(n))
                    }
                    ExecOutcome::NotStarted => 127,
                    _ => 1,
                };
                if e.outcome != ExecOutcome::Exited {
                    drop(raw);
                    eprintln!(
                        "aerekos: shell ended ({}): {}",
                        e.outcome.as_str(),
                        e.detail
                    );
                    return Ok(code);
                }
                break code;
            }
            Ok(None) => {
                drop(raw);
                eprintln!("aerekos: the conductor ended the stream without an exit status");
                return Ok(1);
            }
            Err(e) => {
                drop(raw);
                eprintln!("aerekos: shell stream: {e}");
                return Ok(1);
            }
        }
    };
    drop(raw);
    Ok(code)
}
