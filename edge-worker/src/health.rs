//! Health probes of hosted services ([`protocol::manifest::HealthCheck`]).
//!
//! A probe runs on its own short-lived thread ([`ProbeTask::start`]); the
//! [`crate::supervisor::Supervisor`] only starts it and later collects the
//! result with [`ProbeTask::try_finish`], so neither a slow endpoint nor a
//! hanging command ever blocks the runtime thread.
//!
//! * HTTP: `GET http://127.0.0.1:<port><path>` over a plain `TcpStream`
//!   (HTTP/1.0, `Connection: close`); only the status line is read; 2xx
//!   passes.
//! * Command: run in its own process group with stdin/stdout/stderr on
//!   `/dev/null`; exit 0 passes. At the timeout the whole group is killed
//!   (SIGKILL) and the probe fails.
//!
//! Limits: the whole probe (connect, request, status line) must finish
//! within the check's `timeout_ms`; at most 1 KiB of the response is read;
//! one probe per service at a time (a probe still running when the next is
//! due delays it).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::manifest::Probe;
use rustix::process::{kill_process_group, Pid, Signal};

/// Outcome of one probe: `Err` says why it failed.
pub type ProbeResult = Result<(), String>;

/// A probe running on its own thread.
#[derive(Debug)]
pub struct ProbeTask {
    /// `None` once the result was collected.
    handle: Option<JoinHandle<ProbeResult>>,
}

impl ProbeTask {
    /// Starts `probe` on a new thread.
    pub fn start(probe: Probe, timeout: Duration, service: String) -> io::Result<ProbeTask> {
        let handle = std::thread::Builder::new()
            .name(format!("probe-{service}"))
            .stack_size(128 * 1024)
            .spawn(move || run_probe(&probe, timeout, &service))?;
        Ok(ProbeTask {
            handle: Some(handle),
        })
    }

    /// The result once the probe is done (returned once); `None` while it
    /// runs.
    pub fn try_finish(&mut self) -> Option<ProbeResult> {
        if !self.handle.as_ref()?.is_finished() {
            return None;
        }
        let handle = self.handle.take()?;
        Some(
            handle
                .join()
                .unwrap_or_else(|_| Err("the probe panicked".to_string())),
        )
    }
}

/// Runs one probe on the calling thread (blocking, at most `timeout`).
pub fn run_probe(probe: &Probe, timeout: Duration, service: &str) -> ProbeResult {
    match probe {
        Probe::Http { port, path } => http_probe(*port, path, timeout),
        Probe::Command { command, args } => command_probe(command, args, timeout, service),
    }
}

/// `GET http://127.0.0.1:<port><path>` must answer 2xx within `timeout`.
pub fn http_probe(port: u16, path: &str, timeout: Duration) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("GET {path} timed out after {} ms", timeout.as_millis()))
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_write_timeout(Some(left()?))
        .and_then(|()| {
            stream.write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
        })
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') && len < buf.len() {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| format!("GET {path}: {e}"))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "GET {path} timed out after {} ms",
                    timeout.as_millis()
                ))
            }
            Err(e) => return Err(format!("GET {path}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let line = line.lines().next().unwrap_or_default();
    let status = parse_status_line(line)
        .ok_or_else(|| format!("GET {path}: not an HTTP response ({line:?})"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

/// The status code of `HTTP/1.x NNN …`.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Runs `command args` in its own process group; exit 0 within `timeout`
/// passes. The group is killed at the timeout.
pub fn command_probe(
    command: &str,
    args: &[String],
    timeout: Duration,
    service: &str,
) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    let mut cmd = Command::new(command);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AEREKOS_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .args(args)
        .env(protocol::local_api::ENV_SERVICE, service)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{command} {status}")),
            Ok(None) if Instant::now() >= deadline => {
                if let Some(pid) = pid {
                    let _ = kill_process_group(pid, Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{command} timed out after {} ms",
                    timeout.as_millis()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {command}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static [u8]) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
            }
        });
        port
    }

    #[test]
    fn http_probe_statuses() {
        let t = Duration::from_secs(2);
        http_probe(serve_once(b"HTTP/1.1 204 No Content\r\n\r\n"), "/h", t).unwrap();
        let e = http_probe(serve_once(b"HTTP/1.0 503 Busy\r\n\r\n"), "/h", t).unwrap_err();
        assert!(e.contains("503"), "{e}");
        let e = http_probe(serve_once(b"garbage\n"), "/h", t).unwrap_err();
        assert!(e.contains("not an HTTP response"), "{e}");
        // Connection refused.
        // Nobody listens there: bind(:0) is never given it.
        let port = test_support::free_port();
        let e = http_probe(port, "/h", t).unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
        // A listener that never answers: the timeout.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let t0 = Instant::now();
        let e = http_probe(port, "/h", Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.1 2000 OK"), None);
    }

    #[test]
    fn command_probe_exit_codes_and_timeout() {
        let t = Duration::from_secs(5);
        command_probe("true", &[], t, "s").unwrap();
        let e = command_probe("sh", &["-c".into(), "exit 3".into()], t, "s").unwrap_err();
        assert!(e.contains('3'), "{e}");
        command_probe(
            "sh",
            &["-c".into(), "test \"$AEREKOS_SERVICE\" = s".into()],
            t,
            "s",
        )
        .unwrap();
        let t0 = Instant::now();
        let e = command_probe(
            "sh",
            &["-c".into(), "sleep 30 & wait".into()],
            Duration::from_millis(200),
            "s",
        )
        .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        let e = command_probe("/nonexistent/probe", &[], t, "s").unwrap_err();
        assert!(e.contains("cannot run"), "{e}");

        let mut task = ProbeTask::start(
            Probe::Command {
                command: "true".into(),
                args: vec![],
            },
            t,
            "s".into(),
        )
        .unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(r) = task.try_finish() {
                r.unwrap();
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
