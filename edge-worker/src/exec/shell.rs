//! Remote shell ([`protocol::Action::Shell`]): an interactive program on a
//! pseudo-terminal, **off** unless the agent runs with
//! `--allow-remote-exec` (the same switch as remote exec; a disabled worker
//! answers [`super::DISABLED`] and starts nothing).
//!
//! The terminal is the kernel's (`/dev/ptmx`, opened through `rustix`: no C,
//! no `libc`). The program (the request's argv, else `$SHELL`, else
//! `/bin/bash`, else `/bin/sh`) starts in a new session whose controlling
//! terminal is the pseudo-terminal, with `TERM=xterm-256color`, in `$HOME`
//! when that is a directory. Its bytes never travel over MQTT
//! ([`protocol::shell`]): one thread uploads the terminal's output in
//! `POST /api/v1/agent/shell/{session}`, another reads keystrokes, resizes
//! and the hang-up from `GET /api/v1/agent/shell/{session}/input`.
//!
//! Ends: the program exits (what its process group still writes is read for
//! up to [`super::DRAIN`], then the group is killed); the input stream ends
//! or says hang-up, or the output upload fails (the caller went away, the
//! conductor ended the session at its idle timeout, the conductor is gone):
//! the group gets `SIGHUP`, then `SIGKILL` after [`HANGUP_GRACE`].
//!
//! Limits: a shell takes one of the [`super::MAX_EXECS`] slots remote
//! commands use; no output cap (the stream is interactive and paced by the
//! reader: a full queue blocks the terminal, which blocks the program). A
//! conductor that vanishes without closing its connections leaves the input
//! thread blocked until the kernel gives up on the TCP connection; the
//! session itself ends when its output upload fails.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::exec::{ExecExit, ExecFrame, ExecOutcome};
use protocol::manifest::http_auth;
use protocol::shell::{shell_input_path, shell_path, ShellInput};
use protocol::{ReplyStatus, ShellRequest};
use rustix::process::Signal;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

use super::{
    not_started, signal_group, take_slot, upload, FrameReader, DISABLED, DRAIN, KEEPALIVE, POLL,
    QUEUE, READ_CHUNK,
};
use crate::fetch::Conductor;

/// After `SIGHUP`, the group has this long before `SIGKILL`.
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// The output upload's overall limit (a shell may run for days; the
/// conductor's idle timeout ends quiet ones much sooner).
const UPLOAD_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// The reply to a `Shell` command: refused when not `allowed`, else the
/// program is started on a pseudo-terminal, on its own threads.
pub fn on_command(
    allowed: bool,
    conductor: &Conductor,
    req: ShellRequest,
) -> (ReplyStatus, String) {
    if !allowed {
        tracing::warn!("remote shell refused: remote exec is disabled on this worker");
        return (ReplyStatus::Error, DISABLED.into());
    }
    match start(conductor.clone(), &req) {
        Ok(detail) => (ReplyStatus::Ok, detail),
        Err(e) => {
            tracing::warn!("remote shell not started: {e}");
            (ReplyStatus::Error, e)
        }
    }
}

/// The program a request runs: its argv, or the default shell.
fn program(req: &ShellRequest) -> Vec<String> {
    if !req.argv.is_empty() {
        return req.argv.iter().map(|a| a.to_string()).collect();
    }
    let shell = std::env::var("SHELL")
        .ok()
        .filter(|s| s.starts_with('/') && std::path::Path::new(s).is_file());
    let fallback = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("/bin/sh");
    vec![shell.unwrap_or_else(|| fallback.to_string())]
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// The terminal's two ends: (controller, the program's side).
fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let controller = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&controller)?;
    rustix::pty::unlockpt(&controller)?;
    let program_side = match rustix::pty::ioctl_tiocgptpeer(&controller, flags) {
        Ok(fd) => fd,
        // Kernels before 4.13: by name.
        Err(_) => {
            let name = rustix::pty::ptsname(&controller, Vec::new())?;
            rustix::fs::open(
                name.as_c_str(),
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?
        }
    };
    rustix::termios::tcsetwinsize(&controller, winsize(cols, rows))?;
    Ok((controller, program_side))
}

/// Starts the program on a new terminal; its session continues on its own
/// threads. `Err` (nothing running) when no slot is free or it cannot start.
fn start(conductor: Conductor, req: &ShellRequest) -> Result<String, String> {
    let slot = take_slot()?;
    let argv = program(req);
    let (controller, child) =
        spawn(&argv, req.cols, req.rows).map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
    tracing::info!(argv = ?argv, pid = child.id(), "remote shell");
    let session = req.session;
    let spawned = std::thread::Builder::new()
        .name("shell".into())
        .spawn(move || {
            let _slot = slot;
            run(&conductor, &session, controller, child);
        });
    match spawned {
        Ok(_) => Ok(format!("started {}", argv[0])),
        Err(e) => Err(format!("cannot start a thread: {e}")),
    }
}

/// Spawns `argv` on a new pseudo-terminal; the controller end and the child.
///
/// The one `unsafe` of the agent: std has no stable way to make the child a
/// session leader with a controlling terminal (`CommandExt::setsid` is
/// unstable), which job control and Ctrl-C need.
#[allow(unsafe_code)]
fn spawn(argv: &[String], cols: u16, rows: u16) -> std::io::Result<(OwnedFd, Child)> {
    let (controller, program_side) = open_pty(cols, rows)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::from(program_side.try_clone()?))
        .stdout(Stdio::from(program_side.try_clone()?))
        .stderr(Stdio::from(program_side))
        .env("TERM", "xterm-256color");
    if let Some(home) = std::env::var_os("HOME").filter(|h| std::path::Path::new(h).is_dir()) {
        cmd.current_dir(home);
    }
    // SAFETY: the closure runs in the child between fork and exec, after
    // std has put the terminal on fds 0–2. It makes two raw system calls
    // (setsid, then ioctl TIOCSCTTY on fd 0) through rustix's linux_raw
    // backend: no allocation, no lock, nothing that is not
    // async-signal-safe. fd 0 is open (std just dup2'd it) for the whole
    // call, so borrowing it is sound.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // `cmd` (and with it the parent's copies of the program's side) is
    // dropped here: the controller reads EIO once the program's group has
    // closed the terminal.
    drop(cmd);
    Ok((controller, child))
}

/// The session: output up, input down, until the program ends or the
/// session is hung up.
fn run(conductor: &Conductor, session: &[u8; 16], controller: OwnedFd, mut child: Child) {
    let pgid = child.id();
    let (tx, rx) = sync_channel(QUEUE);
    let hangup = Arc::new(AtomicBool::new(false));
    let up = conductor.clone();
    let path = shell_path(session);
    let uploader = std::thread::Builder::new()
        .name("shell-upload".into())
        .spawn(move || upload(&up, &path, FrameReader::new(rx), UPLOAD_LIMIT));
    let reader = match controller.try_clone().map(File::from) {
        Ok(f) => {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("shell-read".into())
                .spawn(move || read_terminal(f, &tx))
                .ok()
        }
        Err(e) => {
            tracing::warn!("shell: cannot read the terminal: {e}");
            None
        }
    };
    match controller.try_clone() {
        Ok(input_fd) => {
            let (c, s, h) = (conductor.clone(), *session, hangup.clone());
            let spawned = std::thread::Builder::new()
                .name("shell-input".into())
                .spawn(move || {
                    if let Err(e) = read_input(&c, &s, input_fd) {
                        tracing::info!("shell input ended: {e}");
                    }
                    h.store(true, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                tracing::warn!("shell: cannot start the input thread: {e}");
                hangup.store(true, Ordering::SeqCst);
            }
        }
        Err(e) => {
            tracing::warn!("shell: cannot write the terminal: {e}");
            hangup.store(true, Ordering::SeqCst);
        }
    }
    let exit = wait(&mut child, pgid, &hangup, reader, &tx);
    drop(controller);
    let _ = tx.send(ExecFrame::Exit(exit.clone()));
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
                "remote shell done"
            );
        }
        Ok(status) => tracing::info!(status, "remote shell: the conductor ended the session"),
        Err(e) => tracing::warn!("remote shell: output upload failed: {e}"),
    }
}

/// Waits for the program, hanging its group up when the session ends first;
/// what the exit frame says.
fn wait(
    child: &mut Child,
    pgid: u32,
    hangup: &AtomicBool,
    reader: Option<std::thread::JoinHandle<()>>,
    out: &SyncSender<ExecFrame>,
) -> ExecExit {
    let mut hung_up: Option<Instant> = None;
    let mut killed = false;
    let mut last_sent = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("shell: wait: {e}");
                signal_group(pgid, Signal::KILL);
                break child.wait().ok();
            }
        }
        if last_sent.elapsed() >= KEEPALIVE {
            last_sent = Instant::now();
            if let Err(TrySendError::Disconnected(_)) = out.try_send(ExecFrame::KeepAlive) {
                hangup.store(true, Ordering::SeqCst);
            }
        }
        match hung_up {
            None if hangup.load(Ordering::SeqCst) => {
                signal_group(pgid, Signal::HUP);
                hung_up = Some(Instant::now());
            }
            Some(at) if !killed && at.elapsed() >= HANGUP_GRACE => {
                signal_group(pgid, Signal::KILL);
                killed = true;
            }
            _ => {}
        }
        std::thread::sleep(POLL);
    };
    // What the group still writes, for a while; then it goes too.
    if let Some(r) = reader {
        let until = Instant::now() + DRAIN;
        while !r.is_finished() && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        if !r.is_finished() {
            signal_group(pgid, Signal::KILL);
        }
        let until = Instant::now() + DRAIN;
        while !r.is_finished() && Instant::now() < until {
            std::thread::sleep(POLL);
        }
        if r.is_finished() {
            let _ = r.join();
        }
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
                detail: format!("ended by signal {}", sig.unwrap_or(0)),
            },
        },
        None => not_started(-1, "lost track of the shell".into()),
    }
}

/// Copies the terminal's output into frames until it reads EIO (the
/// program's group closed it) or the upload hangs up.
fn read_terminal(mut terminal: File, out: &SyncSender<ExecFrame>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match terminal.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if out.send(ExecFrame::Stdout(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: every copy of the program's side is closed.
            Err(_) => return,
        }
    }
}

/// Reads the session's input stream into the terminal until it ends or
/// says hang-up.
fn read_input(conductor: &Conductor, session: &[u8; 16], terminal: OwnedFd) -> Result<(), String> {
    let base = conductor.urls.reachable();
    let path = shell_input_path(session);
    let agent = crate::tls::http_agent(
        conductor.trust.as_ref(),
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5))),
    );
    let auth = http_auth(&conductor.secret, &conductor.worker_id, "GET", &path);
    let resp = agent
        .get(format!("{base}{path}"))
        .header("Authorization", auth)
        .call()
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("the conductor answered {}", resp.status()));
    }
    let mut body = std::io::BufReader::new(resp.into_body().into_reader());
    let mut terminal = File::from(terminal);
    loop {
        match ShellInput::read_from(&mut body) {
            Ok(Some(ShellInput::Data(d))) => terminal
                .write_all(&d)
                .map_err(|e| format!("write to the terminal: {e}"))?,
            Ok(Some(ShellInput::Resize { cols, rows })) => {
                if let Err(e) = rustix::termios::tcsetwinsize(&terminal, winsize(cols, rows)) {
                    tracing::debug!("shell: resize: {e}");
                }
            }
            Ok(Some(ShellInput::KeepAlive)) => {}
            Ok(Some(ShellInput::Hangup)) => return Ok(()),
            Ok(None) => return Err("the conductor closed the input stream".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    /// Everything the terminal says within `for_`.
    fn collect(terminal: File, for_: Duration) -> String {
        let (tx, rx) = sync_channel(64);
        std::thread::spawn(move || read_terminal(terminal, &tx));
        let until = Instant::now() + for_;
        let mut out = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(ExecFrame::Stdout(d)) => out.extend_from_slice(&d),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn a_program_gets_a_controlling_terminal_of_the_requested_size() {
        // `stty size` reads the window size of its controlling terminal;
        // `tty` names it (not "not a tty").
        let argv = ["/bin/sh", "-c", "stty size; tty; exit 7"].map(String::from);
        let (controller, mut child) = spawn(&argv, 100, 30).unwrap();
        let out = collect(File::from(controller), Duration::from_secs(5));
        assert!(out.contains("30 100"), "{out:?}");
        assert!(out.contains("/dev/pts/"), "{out:?}");
        assert_eq!(child.wait().unwrap().code(), Some(7));
    }

    #[test]
    fn keystrokes_reach_the_program_and_ctrl_c_interrupts_it() {
        let argv = ["/bin/sh"].map(String::from);
        let (controller, mut child) = spawn(&argv, 80, 24).unwrap();
        let mut w = File::from(controller.try_clone().unwrap());
        // `sleep` in the foreground, Ctrl-C (byte 3) through the line
        // discipline, then a command that proves the shell survived.
        w.write_all(b"sleep 30\r").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        w.write_all(&[3]).unwrap();
        w.write_all(b"echo after-$((6*7))\rexit 5\r").unwrap();
        let out = collect(File::from(controller), Duration::from_secs(5));
        assert!(out.contains("after-42"), "{out:?}");
        assert_eq!(child.wait().unwrap().code(), Some(5));
    }
}
