//! Remote exec ([`protocol::Action::Exec`]): **off** unless the agent runs
//! with `--allow-remote-exec` (`AEREKOS_ALLOW_REMOTE_EXEC=1`); a disabled
//! worker answers every request with an error reply ([`DISABLED`]) and runs
//! nothing. The conductor adds its own switch (the worker's label
//! `remote-exec=allow`) and audits every session.
//!
//! An allowed request is answered `Ok` once started, and runs on its own
//! threads: the command's argv is spawned directly (no shell), stdin from
//! `/dev/null`, in a new process group; stdout and stderr are read by one
//! thread each and sent, as they come, to the conductor in one HTTP(S)
//! `POST /api/v1/agent/exec/{session hex}` whose chunked body is the
//! [`protocol::exec`] stream, signed like every download
//! ([`protocol::manifest::http_auth`], method `POST`). Nothing travels over
//! MQTT but the command and its reply.
//!
//! Limits: at most [`MAX_EXECS`] commands at once; `timeout_s` after the
//! start, or when stdout and stderr together pass `max_output` bytes (what
//! is sent stops exactly there), the whole process group gets `SIGKILL`. If
//! the upload fails (conductor gone, the caller went away) the group is
//! killed too. After the command itself exits, what its group still writes
//! is read for up to [`DRAIN`]; then the group is killed, so a background
//! child that keeps the output pipes open cannot hold the session. A child
//! that detached its output (`nohup … >/dev/null &`) keeps running.
//! A keep-alive frame goes out every [`KEEPALIVE`] so a silent command does
//! not hit the conductor's read timeout.

use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::exec::{exec_path, ExecExit, ExecFrame, ExecOutcome};
use protocol::manifest::http_auth;
use protocol::{ExecRequest, ReplyStatus};
use rustix::process::{kill_process_group, Pid, Signal};

use crate::fetch::Conductor;

pub mod shell;

/// Commands running at once, at most.
pub const MAX_EXECS: usize = 4;
/// The reply of a worker started without `--allow-remote-exec`.
pub const DISABLED: &str = "remote exec is disabled on this worker (start the agent with \
                            --allow-remote-exec or AEREKOS_ALLOW_REMOTE_EXEC=1)";
/// A keep-alive frame while the command is silent, this often.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long output is still read after the command exited.
pub const DRAIN: Duration = Duration::from_secs(2);
/// Bytes per read of a pipe (and at most per output frame).
const READ_CHUNK: usize = 16 * 1024;
/// How often the waiting thread looks at the child.
const POLL: Duration = Duration::from_millis(20);
/// Frames queued between the readers and the upload.
const QUEUE: usize = 16;
/// Extra time for the upload beyond the command's timeout.
const UPLOAD_GRACE: Duration = Duration::from_secs(60);

/// Commands running now (counts the threads of [`start`]).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Releases a [`RUNNING`] slot when the session's thread ends.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The reply to an `Exec` command: refused when not `allowed`, else the
/// command is started on its own threads (uploading to `conductor`).
pub fn on_command(allowed: bool, conductor: &Conductor, req: ExecRequest) -> (ReplyStatus, String) {
    if !allowed {
        tracing::warn!(argv = ?req.argv, "remote exec refused: disabled on this worker");
        return (ReplyStatus::Error, DISABLED.into());
    }
    match start(conductor.clone(), req) {
        Ok(detail) => (ReplyStatus::Ok, detail),
        Err(e) => (ReplyStatus::Error, e),
    }
}

/// A [`RUNNING`] slot, or why not: [`MAX_EXECS`] commands and shells
/// together run already.
fn take_slot() -> Result<Slot, String> {
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_EXECS {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return Err(format!(
            "at most {MAX_EXECS} remote commands and shells run at once"
        ));
    }
    Ok(Slot)
}

/// Starts `req` on its own threads; `Err` (nothing started) for an empty
/// argv or when [`MAX_EXECS`] already run.
fn start(conductor: Conductor, req: ExecRequest) -> Result<String, String> {
    let Some(program) = req.argv.first().map(|p| p.to_string()) else {
        return Err("empty command".into());
    };
    let slot = take_slot()?;
    tracing::info!(argv = ?req.argv, timeout_s = req.timeout_s, max_output = req.max_output, "remote exec");
    let spawned = std::thread::Builder::new()
        .name("exec".into())
        .spawn(move || {
            let _slot = slot;
            session(&conductor, &req);
        });
    match spawned {
        Ok(_) => Ok(format!("started {program}")),
        Err(e) => Err(format!("cannot start a thread: {e}")),
    }
}

/// One session: the upload on its own thread, the command on this one.
fn session(conductor: &Conductor, req: &ExecRequest) {
    let (tx, rx) = sync_channel(QUEUE);
    let timeout = Duration::from_secs(u64::from(req.timeout_s)) + UPLOAD_GRACE;
    let up = conductor.clone();
    let session = req.session;
    let uploader = std::thread::Builder::new()
        .name("exec-upload".into())
        .spawn(move || upload(&up, &exec_path(&session), FrameReader::new(rx), timeout));
    let exit = execute(req, &tx);
    drop(tx);
    let result = match uploader {
        Ok(h) => h
            .join()
            .unwrap_or_else(|_| Err("upload thread panicked".into())),
        Err(e) => Err(format!("cannot start the upload thread: {e}")),
    };
    match result {
        Ok(status) if (200..300).contains(&status) => {
            tracing::info!(
                outcome = exit.outcome.as_str(),
                value = exit.value,
                "remote exec done"
            );
        }
        Ok(status) => tracing::warn!(status, "remote exec: the conductor refused the output"),
        Err(e) => tracing::warn!("remote exec: output upload failed: {e}"),
    }
}

/// POSTs the stream to the conductor's `path`; the HTTP status.
fn upload(
    conductor: &Conductor,
    path: &str,
    body: FrameReader,
    timeout: Duration,
) -> Result<u16, String> {
    let base = conductor.urls.reachable();
    let agent = crate::tls::http_agent(
        conductor.trust.as_ref(),
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(timeout)),
    );
    let auth = http_auth(&conductor.secret, &conductor.worker_id, "POST", path);
    agent
        .post(format!("{base}{path}"))
        .header("Authorization", auth)
        .header("Content-Type", "application/octet-stream")
        .send(ureq::SendBody::from_owned_reader(body))
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// The upload's body: the frames from the command's threads, encoded, up
/// to and including the exit frame (or until they all hang up).
struct FrameReader {
    /// Frames from [`execute`].
    rx: Receiver<ExecFrame>,
    /// Encoded bytes not yet read.
    buf: Vec<u8>,
    /// Read position in `buf`.
    pos: usize,
    /// The exit frame is in `buf`: nothing follows it.
    done: bool,
}

impl FrameReader {
    fn new(rx: Receiver<ExecFrame>) -> FrameReader {
        FrameReader {
            rx,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    fn push(&mut self, f: &ExecFrame) {
        self.done |= matches!(f, ExecFrame::Exit(_));
        f.encode_into(&mut self.buf);
    }
}

impl Read for FrameReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(f) => self.push(&f),
                Err(_) => return Ok(0),
            }
            // Whatever else is queued goes in the same chunk.
            while !self.done && self.buf.len() < READ_CHUNK {
                match self.rx.try_recv() {
                    Ok(f) => self.push(&f),
                    Err(_) => break,
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What the readers share with the waiting thread.
#[derive(Debug)]
struct Budget {
    /// Output bytes that may still be sent.
    left: AtomicU64,
    /// Output went past the cap (what is sent stops exactly at it).
    capped: AtomicBool,
    /// The upload hung up: nobody reads the output any more.
    gone: AtomicBool,
}

impl Budget {
    /// Takes up to `n` bytes from the budget; how many may be sent.
    fn take(&self, n: usize) -> usize {
        let want = u64::try_from(n).unwrap_or(u64::MAX);
        let mut got = 0;
        let _ = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                got = left.min(want);
                Some(left - got)
            });
        // fits: `got` ≤ `want`, which came from a usize.
        usize::try_from(got).unwrap_or(n)
    }
}

/// Reads one pipe into frames until it ends, the budget is spent, or the
/// upload hangs up.
fn read_pipe(mut pipe: impl Read, stderr: bool, budget: &Budget, out: &SyncSender<ExecFrame>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let allowed = budget.take(n);
        if allowed > 0 {
            let data = buf[..allowed].to_vec();
            let frame = if stderr {
                ExecFrame::Stderr(data)
            } else {
                ExecFrame::Stdout(data)
            };
            if out.send(frame).is_err() {
                budget.gone.store(true, Ordering::SeqCst);
                return;
            }
        }
        if allowed < n {
            budget.capped.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// `SIGKILL` to the process group `pgid` (the command is its leader).
fn kill_group(pgid: u32) {
    signal_group(pgid, Signal::KILL);
}

/// `signal` to the process group `pgid` (never to pid 0 or 1's group).
fn signal_group(pgid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    {
        if let Err(e) = kill_process_group(pid, signal) {
            tracing::debug!(pgid, "exec: signal the group: {e}");
        }
    }
}

fn not_started(value: i32, detail: String) -> ExecExit {
    ExecExit {
        outcome: ExecOutcome::NotStarted,
        value,
        detail,
    }
}

/// Runs `req` to its end, sending its output to `out` as it comes and the
/// exit frame last; returns what the exit frame says.
pub fn execute(req: &ExecRequest, out: &SyncSender<ExecFrame>) -> ExecExit {
    let exit = run(req, out);
    let _ = out.send(ExecFrame::Exit(exit.clone()));
    exit
}

fn run(req: &ExecRequest, out: &SyncSender<ExecFrame>) -> ExecExit {
    let Some((program, args)) = req.argv.split_first() else {
        return not_started(-1, "empty command".into());
    };
    let mut cmd = Command::new(program.as_str());
    cmd.args(args.iter().map(|a| a.as_str()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return not_started(
                e.raw_os_error().unwrap_or(-1),
                format!("cannot start {program}: {e}"),
            )
        }
    };
    let pgid = child.id();
    let budget = Arc::new(Budget {
        left: AtomicU64::new(u64::from(req.max_output)),
        capped: AtomicBool::new(false),
        gone: AtomicBool::new(false),
    });
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    let pipes: [(Option<Box<dyn Read + Send>>, bool); 2] = [
        (child.stdout.take().map(|p| Box::new(p) as _), false),
        (child.stderr.take().map(|p| Box::new(p) as _), true),
    ];
    for (pipe, stderr) in pipes {
        let Some(pipe) = pipe else { continue };
        let (b, tx) = (budget.clone(), out.clone());
        match std::thread::Builder::new()
            .name("exec-read".into())
            .spawn(move || read_pipe(pipe, stderr, &b, &tx))
        {
            Ok(h) => readers.push(h),
            Err(e) => {
                kill_group(pgid);
                let _ = child.wait();
                return not_started(-1, format!("cannot start a reader thread: {e}"));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(u64::from(req.timeout_s));
    let mut timed_out = false;
    let mut killed = false;
    let mut last_sent = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("exec: wait: {e}");
                kill_group(pgid);
                break child.wait().ok();
            }
        }
        if !killed {
            if Instant::now() >= deadline {
                timed_out = true;
            }
            if timed_out
                || budget.capped.load(Ordering::SeqCst)
                || budget.gone.load(Ordering::SeqCst)
            {
                killed = true;
                kill_group(pgid);
            }
        }
        if last_sent.elapsed() >= KEEPALIVE {
            last_sent = Instant::now();
            if let Err(TrySendError::Disconnected(_)) = out.try_send(ExecFrame::KeepAlive) {
                budget.gone.store(true, Ordering::SeqCst);
            }
        }
        std::thread::sleep(POLL);
    };
    // What the group still writes, for a while; then it goes too.
    let drain_until = Instant::now() + DRAIN;
    while readers.iter().any(|r| !r.is_finished()) && Instant::now() < drain_until {
        std::thread::sleep(POLL);
    }
    if readers.iter().any(|r| !r.is_finished()) {
        kill_group(pgid);
        let until = Instant::now() + DRAIN;
        while readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
            std::thread::sleep(POLL);
        }
    }
    for r in readers {
        // A reader still blocked (a process left the group and holds the
        // pipe) is left behind: the exit frame does not wait for it.
        if r.is_finished() {
            let _ = r.join();
        }
    }
    if budget.capped.load(Ordering::SeqCst) {
        return ExecExit {
            outcome: ExecOutcome::OutputCap,
            value: i32::try_from(req.max_output).unwrap_or(i32::MAX),
            detail: format!(
                "output over {} bytes: cut there, command killed",
                req.max_output
            ),
        };
    }
    if timed_out {
        return ExecExit {
            outcome: ExecOutcome::TimedOut,
            value: i32::try_from(req.timeout_s).unwrap_or(i32::MAX),
            detail: format!("killed after its timeout of {} s", req.timeout_s),
        };
    }
    match status {
        Some(st) => match (st.code(), st.signal()) {
            (Some(code), _) => ExecExit {
                outcome: ExecOutcome::Exited,
                value: code,
                detail: String::new(),
            },
            (None, sig) => ExecExit {
                outcome: ExecOutcome::Signalled,
                value: sig.unwrap_or(0),
                detail: format!("killed by signal {}", sig.unwrap_or(0)),
            },
        },
        None => not_started(-1, "lost track of the command".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn req(argv: &[&str], timeout_s: u32, max_output: u32) -> ExecRequest {
        ExecRequest {
            session: [1; 16],
            argv: argv.iter().map(|a| protocol::bounded(a)).collect(),
            timeout_s,
            max_output,
        }
    }

    /// Runs `r`, decoding the stream exactly as the conductor reads it.
    fn run_collect(r: &ExecRequest) -> (Vec<u8>, Vec<u8>, ExecExit, usize) {
        let (tx, rx) = sync_channel(QUEUE);
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            FrameReader::new(rx).read_to_end(&mut bytes).unwrap();
            bytes
        });
        let exit = execute(r, &tx);
        drop(tx);
        let bytes = reader.join().unwrap();
        let (mut out, mut err, mut last, mut frames) = (Vec::new(), Vec::new(), None, 0);
        let mut slice = bytes.as_slice();
        while let Some(f) = ExecFrame::read_from(&mut slice).unwrap() {
            frames += 1;
            assert!(last.is_none(), "nothing after the exit frame");
            match f {
                ExecFrame::Stdout(d) => out.extend(d),
                ExecFrame::Stderr(d) => err.extend(d),
                ExecFrame::KeepAlive => {}
                ExecFrame::Exit(e) => last = Some(e),
            }
        }
        let last = last.expect("an exit frame");
        assert_eq!(last, exit);
        (out, err, last, frames)
    }

    #[test]
    fn output_streams_and_exit_codes() {
        let (out, err, exit, _) = run_collect(&req(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            10,
            1024,
        ));
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        assert_eq!((exit.outcome, exit.value), (ExecOutcome::Exited, 3));
        let (_, _, exit, _) = run_collect(&req(&["true"], 10, 0));
        assert_eq!((exit.outcome, exit.value), (ExecOutcome::Exited, 0));
    }

    #[test]
    fn output_is_cut_exactly_at_the_cap() {
        let (out, _, exit, _) = run_collect(&req(&["yes", "abc"], 10, 100_000));
        assert_eq!(out.len(), 100_000);
        assert!(out.starts_with(b"abc\nabc\n"));
        assert_eq!(exit.outcome, ExecOutcome::OutputCap);
        // Exactly the cap and no more is not a cut.
        let (out, _, exit, _) = run_collect(&req(&["printf", "12345"], 10, 5));
        assert_eq!(
            (out.as_slice(), exit.outcome),
            (&b"12345"[..], ExecOutcome::Exited)
        );
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_group() {
        let marker = format!("exec-test-{}", std::process::id());
        let started = Instant::now();
        let (_, _, exit, _) = run_collect(&req(
            &[
                "sh",
                "-c",
                &format!("sh -c 'sleep 300; : {marker}' & sleep 301; : {marker}"),
            ],
            1,
            1024,
        ));
        assert_eq!(exit.outcome, ExecOutcome::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        // No process of the group is left (the background sleep included).
        let left: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .collect();
        assert!(left.is_empty(), "{} left", left.len());
    }

    #[test]
    fn a_program_that_does_not_exist_is_not_started() {
        let (_, _, exit, _) = run_collect(&req(&["/nonexistent/aerekos-exec-test"], 10, 10));
        assert_eq!((exit.outcome, exit.value), (ExecOutcome::NotStarted, 2));
        assert!(exit.detail.contains("cannot start"), "{}", exit.detail);
    }

    #[test]
    fn a_silent_command_sends_keep_alives() {
        let (_, _, exit, frames) = run_collect(&req(&["sleep", "6"], 20, 10));
        assert_eq!(exit.outcome, ExecOutcome::Exited);
        assert!(frames >= 2, "a keep-alive, then the exit: {frames}");
    }

    #[test]
    fn disabled_workers_refuse_and_run_nothing() {
        let c = Conductor {
            urls: crate::conductor_urls::ConductorUrls::parse("http://127.0.0.1:9").unwrap(),
            worker_id: "w-1".into(),
            secret: protocol::Secret::from_bytes([0; 32]),
            previous_secret: None,
            trust: None,
        };
        let (status, detail) = on_command(false, &c, req(&["touch", "/tmp/never"], 1, 1));
        assert_eq!(status, ReplyStatus::Error);
        assert!(detail.contains("--allow-remote-exec"), "{detail}");
        let (status, detail) = on_command(true, &c, req(&[], 1, 1));
        assert_eq!(
            (status, detail.as_str()),
            (ReplyStatus::Error, "empty command")
        );
    }
}
