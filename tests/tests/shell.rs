//! Remote shell end to end (`aerekos shell`, `POST /api/v1/workers/{id}/shell`):
//! real conductor, edge-worker and CLI processes. The CLI runs on a
//! pseudo-terminal this test drives as a person would: it types a command
//! and reads the answer, checks the remote terminal's size, resizes the
//! local one and sees the remote follow, interrupts a `sleep` with Ctrl-C
//! and leaves with `exit 3` (the CLI's exit status). Through the API: the
//! refusals (no label, an agent without `--allow-remote-exec`, a
//! non-admin token), input only from the token that opened the session, the
//! hang-up, the idle timeout that kills the shell's process group, and the
//! audit rows (`kind` = `shell`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{bin, wait_for, Conductor, Worker, WorkerOpts};
use protocol::exec::{ExecExit, ExecFrame, ExecOutcome};
use protocol::shell::{client_input_path, ShellInput, SESSION_HEADER};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use serde_json::{json, Value};

fn online_worker(
    c: &Conductor,
    dir: &std::path::Path,
    name: &str,
    allow: bool,
) -> (Worker, String) {
    let mut opts = WorkerOpts::named(name);
    if allow {
        opts.extra.push("--allow-remote-exec".into());
    }
    let token = c.registration_token();
    let mut w = Worker::start(&dir.join(name), &c.url(), Some(&token), opts);
    let id = w.wait_id();
    wait_for("worker online", Duration::from_secs(20), || {
        (c.status_of(&id) == "online").then_some(())
    });
    (w, id)
}

fn allow(c: &Conductor, id: &str) {
    let (st, v) = c.put(
        &format!("/api/v1/workers/{id}/labels"),
        &json!({"remote-exec": "allow"}),
    );
    assert_eq!(st, 200, "{v}");
}

fn size(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A pseudo-terminal: (controller, the other side).
fn pty(cols: u16, rows: u16) -> (OwnedFd, OwnedFd) {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let controller = rustix::pty::openpt(flags).unwrap();
    rustix::pty::grantpt(&controller).unwrap();
    rustix::pty::unlockpt(&controller).unwrap();
    let other = rustix::pty::ioctl_tiocgptpeer(&controller, flags).unwrap();
    rustix::termios::tcsetwinsize(&controller, size(cols, rows)).unwrap();
    (controller, other)
}

/// What a terminal showed so far, read on its own thread.
#[derive(Clone)]
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    fn reading(mut from: File) -> Screen {
        let s = Screen(Arc::default());
        let sink = s.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        s
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn text_since(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()[from..]).into_owned()
    }

    /// Waits until `needle` shows after byte `from`; where it ends.
    fn expect(&self, from: usize, needle: &str, within: Duration) -> usize {
        let until = Instant::now() + within;
        loop {
            let text = self.text_since(from);
            if let Some(at) = text.find(needle) {
                return from + at + needle.len();
            }
            assert!(
                Instant::now() < until,
                "{needle:?} did not show within {within:?}; the terminal showed {text:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < until, "the CLI did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_person_at_a_terminal_types_resizes_interrupts_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let (_w, id) = online_worker(&c, dir.path(), "shell-a", true);
    allow(&c, &id);

    let (controller, other) = pty(100, 30);
    let mut cli = Command::new(bin("aerekos"))
        .args(["--url", &c.url(), "shell", &id])
        .env("AEREKOS_TOKEN", &c.admin)
        .stdin(Stdio::from(other.try_clone().unwrap()))
        .stdout(Stdio::from(other.try_clone().unwrap()))
        .stderr(Stdio::from(other))
        .spawn()
        .unwrap();
    let screen = Screen::reading(File::from(controller.try_clone().unwrap()));
    let mut keys = File::from(controller.try_clone().unwrap());
    let mut type_ = |s: &[u8]| keys.write_all(s).unwrap();

    // The remote shell's prompt first (typed earlier, keys would be echoed
    // by this terminal before the CLI took it over).
    wait_for("the remote prompt", Duration::from_secs(20), || {
        (screen.len() > 0).then_some(())
    });
    // A command and its answer (the typed text echoes `6*7`, not `42`).
    type_(b"echo $((6*7))\r");
    let at = screen.expect(0, "42", Duration::from_secs(20));

    // The remote terminal has the local one's size, and follows a resize.
    type_(b"stty size\r");
    let at = screen.expect(at, "30 100", Duration::from_secs(10));
    rustix::termios::tcsetwinsize(&controller, size(120, 40)).unwrap();
    let mut at = at;
    wait_for(
        "the remote terminal resized",
        Duration::from_secs(10),
        || {
            type_(b"stty size\r");
            std::thread::sleep(Duration::from_millis(400));
            let text = screen.text_since(at);
            at = screen.len();
            text.contains("40 120").then_some(())
        },
    );

    // Ctrl-C reaches the foreground program through the remote terminal:
    // `sleep 30` ends at once and the shell goes on.
    type_(b"sleep 30\r");
    std::thread::sleep(Duration::from_millis(500));
    let from = screen.len();
    let started = Instant::now();
    type_(&[3]);
    type_(b"echo after-$((2+3))\r");
    screen.expect(from, "after-5", Duration::from_secs(15));
    assert!(started.elapsed() < Duration::from_secs(20));

    // `exit 3`: the CLI leaves with the remote status, the terminal restored.
    type_(b"exit 3\r");
    let st = wait_exit(&mut cli, Duration::from_secs(20));
    assert_eq!(st.code(), Some(3), "{}", screen.text_since(0));

    // Audited: who, where, what, how it ended.
    let (st, v) = c.get("/api/v1/exec-sessions?limit=5");
    assert_eq!(st, 200, "{v}");
    let row = &v["sessions"][0];
    assert_eq!(row["kind"], "shell", "{v}");
    assert_eq!(row["worker_id"], id.as_str(), "{v}");
    assert_eq!(row["exit_code"], 3, "{v}");
    assert_eq!(row["outcome"], "exited", "{v}");
    assert_eq!(row["argv"], json!([]), "{v}");
    assert!(row["bytes_out"].as_u64().unwrap() > 0, "{v}");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// An open session: its id, and its output frames as they come.
struct Session {
    id: String,
    frames: Receiver<ExecFrame>,
}

impl Session {
    /// Output until an exit frame or `within`; (output, exit).
    fn until_exit(&self, within: Duration) -> (String, Option<ExecExit>) {
        let until = Instant::now() + within;
        let mut out = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.frames.recv_timeout(left) {
                Ok(ExecFrame::Stdout(d) | ExecFrame::Stderr(d)) => out.extend_from_slice(&d),
                Ok(ExecFrame::Exit(e)) => return (String::from_utf8_lossy(&out).into(), Some(e)),
                Ok(ExecFrame::KeepAlive) => {}
                Err(_) => break,
            }
        }
        (String::from_utf8_lossy(&out).into(), None)
    }

    /// Output until it contains `needle`.
    fn expect(&self, needle: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        let mut out = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Ok(ExecFrame::Stdout(d)) = self.frames.recv_timeout(left) {
                out.extend_from_slice(&d);
                let text = String::from_utf8_lossy(&out).into_owned();
                if text.contains(needle) {
                    return text;
                }
            }
        }
        panic!(
            "{needle:?} did not come; the output was {:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// `POST /workers/{id}/shell` as `token`: the session, or (status, error).
fn open(c: &Conductor, token: &str, id: &str, body: &Value) -> Result<Session, (u16, String)> {
    let resp = agent()
        .post(format!("{}/api/v1/workers/{id}/shell", c.url()))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(body)
        .unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.into_body().read_to_string().unwrap_or_default();
        return Err((status, text));
    }
    let sid = resp.headers()[SESSION_HEADER].to_str().unwrap().to_string();
    let (tx, frames) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(resp.into_body().into_reader());
        while let Ok(Some(f)) = ExecFrame::read_from(&mut r) {
            if tx.send(f).is_err() {
                break;
            }
        }
    });
    Ok(Session { id: sid, frames })
}

/// `POST /shell-sessions/{id}/input` as `token`: the status.
fn input(c: &Conductor, token: &str, session: &str, frames: &[ShellInput]) -> u16 {
    let mut body = Vec::new();
    for f in frames {
        f.encode_into(&mut body);
    }
    agent()
        .post(format!("{}{}", c.url(), client_input_path(session)))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/octet-stream")
        .send(&body[..])
        .unwrap()
        .status()
        .as_u16()
}

fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn refusals_token_binding_hangup_and_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let (_a, a) = online_worker(&c, dir.path(), "shell-b", true);
    let (_b, b) = online_worker(&c, dir.path(), "shell-c", false);

    // No label on the conductor: refused there.
    let err = open(&c, &c.admin, &a, &json!({})).err().unwrap();
    assert_eq!(err.0, 403, "{err:?}");
    assert!(err.1.contains("remote-exec=allow"), "{err:?}");
    allow(&c, &a);
    allow(&c, &b);
    // The agent without --allow-remote-exec refuses.
    let err = open(&c, &c.admin, &b, &json!({})).err().unwrap();
    assert_eq!(err.0, 403, "{err:?}");
    assert!(err.1.contains("--allow-remote-exec"), "{err:?}");
    // A non-admin token is refused before anything is sent.
    let (st, v) = c.post(
        "/api/v1/tokens",
        &json!({"name": "ops", "role": "operator"}),
    );
    assert_eq!(st, 201, "{v}");
    let operator = v["token"].as_str().unwrap().to_string();
    let err = open(&c, &operator, &a, &json!({})).err().unwrap();
    assert_eq!(err.0, 403, "{err:?}");
    assert!(err.1.contains("admin"), "{err:?}");

    // Input only from the token that opened the session.
    let (st, v) = c.post("/api/v1/tokens", &json!({"name": "other-admin"}));
    assert_eq!(st, 201, "{v}");
    let other = v["token"].as_str().unwrap().to_string();
    let s = open(&c, &c.admin, &a, &json!({"cols": 90, "rows": 20})).unwrap();
    let typed = [ShellInput::Data(b"echo hi-$((40+2)); stty size\r".to_vec())];
    assert_eq!(input(&c, &other, &s.id, &typed), 403);
    assert_eq!(input(&c, &c.admin, &s.id, &typed), 204);
    s.expect("20 90", Duration::from_secs(20));
    assert_eq!(
        input(
            &c,
            &c.admin,
            &s.id,
            &[ShellInput::Resize { cols: 70, rows: 10 }]
        ),
        204
    );
    assert_eq!(
        input(
            &c,
            &c.admin,
            &s.id,
            &[ShellInput::Data(b"stty size\r".to_vec())]
        ),
        204
    );
    s.expect("10 70", Duration::from_secs(20));
    // A hang-up ends it; the input of a session that ended is refused.
    assert_eq!(input(&c, &c.admin, &s.id, &[ShellInput::Hangup]), 204);
    let (_, exit) = s.until_exit(Duration::from_secs(20));
    let exit = exit.expect("an exit frame after the hang-up");
    assert_ne!(exit.outcome, ExecOutcome::Idle, "{exit:?}");
    wait_for("the session closed", Duration::from_secs(10), || {
        let st = input(&c, &c.admin, &s.id, &[ShellInput::KeepAlive]);
        (st == 404).then_some(())
    });

    // Idle: nothing typed and nothing shown for 2 s ends the session, and
    // the shell's process group with it.
    let pidfile = dir.path().join("idle.pid");
    let script = format!("echo $$ > {}; exec sleep 1000", pidfile.display());
    let s = open(
        &c,
        &c.admin,
        &a,
        &json!({"argv": ["/bin/sh", "-c", script], "idle_timeout_s": 2}),
    )
    .unwrap();
    let pid: i32 = wait_for("the shell wrote its pid", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    assert!(pid_alive(pid));
    let (_, exit) = s.until_exit(Duration::from_secs(30));
    let exit = exit.expect("an exit frame at the idle timeout");
    assert_eq!(
        (exit.outcome, exit.value),
        (ExecOutcome::Idle, 2),
        "{exit:?}"
    );
    wait_for(
        "the idle shell's program is gone",
        Duration::from_secs(10),
        || (!pid_alive(pid)).then_some(()),
    );

    let (st, v) = c.get("/api/v1/exec-sessions?limit=10");
    assert_eq!(st, 200, "{v}");
    let rows = v["sessions"].as_array().unwrap();
    assert_eq!(rows[0]["kind"], "shell", "{v}");
    assert_eq!(rows[0]["outcome"], "idle", "{v}");
    assert!(
        rows.iter()
            .any(|r| r["worker_id"] == b.as_str()
                && r["outcome"].as_str().unwrap().contains("refused")),
        "{v}"
    );
}
