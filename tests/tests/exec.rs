//! Remote exec end to end (`aerekos exec`, `POST /api/v1/workers/{id}/exec`):
//! real conductor, edge-worker and CLI processes. Output streams back with
//! stdout and stderr apart and the exit code; large output arrives whole up
//! to the cap and is cut there; a command that never ends is killed at its
//! timeout with its process group; a worker without `--allow-remote-exec`
//! and a worker without the conductor's `remote-exec=allow` label refuse;
//! every session is audited (who, worker, argv, exit code), and one cut off
//! by a conductor `kill -9` stays listed as `unfinished`. Non-admin tokens
//! are refused in `token_roles.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::time::{Duration, Instant};

use e2e::chaos::{pids_with, unique_marker};
use e2e::{bin, wait_for, Conductor, Worker, WorkerOpts};
use serde_json::{json, Value};

/// `POST /workers/{id}/exec`: the status and the NDJSON lines (or the error).
fn exec(c: &Conductor, id: &str, body: &Value) -> (u16, Vec<Value>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut resp = agent
        .post(format!("{}/api/v1/workers/{id}/exec", c.url()))
        .header("Authorization", format!("Bearer {}", c.admin))
        .send_json(body)
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.into())))
        .collect();
    (status, lines)
}

/// stdout, stderr and the last line of an exec answer.
fn split(lines: &[Value]) -> (String, String, Value) {
    let (mut out, mut err) = (String::new(), String::new());
    for l in &lines[..lines.len() - 1] {
        let data = l["data"].as_str().unwrap();
        match l["stream"].as_str().unwrap() {
            "stdout" => out.push_str(data),
            _ => err.push_str(data),
        }
    }
    (out, err, lines.last().unwrap().clone())
}

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

fn cli(c: &Conductor, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("aerekos"))
        .args(["--url", &c.url()])
        .args(args)
        .env("AEREKOS_TOKEN", &c.admin)
        .output()
        .unwrap()
}

#[test]
fn remote_exec_streams_caps_times_out_refuses_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Conductor::start(&dir.path().join("conductor"));
    let (_a, a) = online_worker(&c, dir.path(), "exec-a", true);
    let (_b, b) = online_worker(&c, dir.path(), "exec-b", false);

    // Refused by the conductor while the worker lacks the label.
    let (status, lines) = exec(&c, &a, &json!({"argv": ["true"]}));
    assert_eq!(status, 403, "{lines:?}");
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("remote-exec=allow"),
        "{lines:?}"
    );
    for id in [&a, &b] {
        let (st, v) = c.put(
            &format!("/api/v1/workers/{id}/labels"),
            &json!({"remote-exec": "allow", "site": "exec-test"}),
        );
        assert_eq!(st, 200, "{v}");
    }

    // Refused by an agent started without --allow-remote-exec.
    let (status, lines) = exec(&c, &b, &json!({"argv": ["touch", "/tmp/aerekos-never"]}));
    assert_eq!(status, 403, "{lines:?}");
    let error = lines[0]["error"].as_str().unwrap();
    assert!(error.contains("disabled on this worker"), "{error}");

    // Exit codes, stdout and stderr apart.
    let (status, lines) = exec(
        &c,
        &a,
        &json!({"argv": ["sh", "-c", "echo out; echo err >&2; echo more; exit 3"]}),
    );
    assert_eq!(status, 200, "{lines:?}");
    let (out, err, last) = split(&lines);
    assert_eq!((out.as_str(), err.as_str()), ("out\nmore\n", "err\n"));
    assert_eq!(last, json!({"exit_code": 3, "outcome": "exited"}));
    let (_, lines) = exec(&c, &a, &json!({"argv": ["true"]}));
    assert_eq!(lines, [json!({"exit_code": 0, "outcome": "exited"})]);

    // Several MiB arrive complete under the cap...
    let big = 3_000_000;
    let (status, lines) = exec(
        &c,
        &a,
        &json!({"argv": ["sh", "-c", format!("yes abcdefghi | head -c {big}")],
                "max_output": 4 << 20}),
    );
    assert_eq!(status, 200);
    let (out, _, last) = split(&lines);
    assert_eq!(out.len(), big);
    assert!(out
        .lines()
        .all(|l| l == "abcdefghi" || "abcdefghi".starts_with(l)));
    assert_eq!(last["exit_code"], 0, "{last}");
    // ... and are cut exactly at it, with a marker.
    let cap = 1_000_000;
    let (_, lines) = exec(
        &c,
        &a,
        &json!({"argv": ["yes", "abcdefghi"], "max_output": cap}),
    );
    let (out, _, last) = split(&lines);
    assert_eq!(out.len(), cap);
    assert_eq!(
        (last["outcome"].as_str(), last["truncated"].as_bool()),
        (Some("output_cap"), Some(true)),
        "{last}"
    );

    // A command that never ends is killed at its timeout, with its group.
    let marker = unique_marker("exec-e2e");
    let started = Instant::now();
    let (_, lines) = exec(
        &c,
        &a,
        &json!({"argv": ["sh", "-c", format!("sh -c 'sleep 600; : {marker}' & sleep 601; : {marker}")],
                "timeout_s": 2}),
    );
    let last = lines.last().unwrap();
    assert_eq!(last["outcome"], "timeout", "{lines:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        pids_with(&marker).is_empty(),
        "left running: {:?}",
        pids_with(&marker)
    );

    // The CLI: output to stdout/stderr, the remote exit code as ours.
    let o = cli(
        &c,
        &[
            "exec",
            &a,
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"), "{o:?}");
    // On every worker with a label: output per worker, the worst status.
    let o = cli(
        &c,
        &["exec", "--label", "site=exec-test", "--", "echo", "hello"],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(stdout, "exec-a: hello\n", "{stderr}");
    assert!(stderr.contains("exec-a: exit 0"), "{stderr}");
    assert!(
        stderr.contains("exec-b: error") && stderr.contains("disabled"),
        "{stderr}"
    );
    assert_eq!(o.status.code(), Some(1));

    // The audit: newest first, who, where, what, how it ended.
    let (_, v) = c.get("/api/v1/exec-sessions?limit=100");
    let sessions = v["sessions"].as_array().unwrap();
    let first = &sessions[0];
    assert_eq!(first["argv"], json!(["echo", "hello"]), "{v}");
    let by_argv = |argv: Value| {
        sessions
            .iter()
            .find(|s| s["argv"] == argv)
            .unwrap_or_else(|| panic!("{argv} not audited: {v}"))
            .clone()
    };
    let cli_run = by_argv(json!(["sh", "-c", "echo hi; echo oops >&2; exit 7"]));
    assert_eq!(cli_run["worker_id"], a.as_str());
    assert_eq!(cli_run["exit_code"], 7);
    assert_eq!(cli_run["outcome"], "exited");
    assert_eq!(cli_run["bytes_out"], 8);
    assert!(
        !cli_run["token_name"].as_str().unwrap().is_empty(),
        "{cli_run}"
    );
    assert!(cli_run["ended_ms"].as_u64() >= cli_run["started_ms"].as_u64());
    let capped = by_argv(json!(["yes", "abcdefghi"]));
    assert_eq!(
        (capped["outcome"].as_str(), capped["bytes_out"].as_u64()),
        (Some("output_cap"), Some(1_000_000))
    );
    let refused = by_argv(json!(["touch", "/tmp/aerekos-never"]));
    assert_eq!(refused["worker_id"], b.as_str());
    assert!(
        refused["outcome"]
            .as_str()
            .unwrap()
            .starts_with("refused by the worker"),
        "{refused}"
    );
    assert!(refused["exit_code"].is_null());
    let o = cli(&c, &["exec-log", "--limit", "5"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("echo hello"),
        "{o:?}"
    );

    // A conductor killed mid-session leaves the row without an end.
    let url = c.url();
    let admin = c.admin.clone();
    let a2 = a.clone();
    let pending = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let _ = agent
            .post(format!("{url}/api/v1/workers/{a2}/exec"))
            .header("Authorization", format!("Bearer {admin}"))
            .send_json(json!({"argv": ["sleep", "30"], "timeout_s": 30}))
            .map(|mut r| r.body_mut().read_to_string());
    });
    wait_for("the session is running", Duration::from_secs(10), || {
        let (_, v) = c.get("/api/v1/exec-sessions?limit=1");
        (v["sessions"][0]["outcome"] == "running").then_some(())
    });
    c.restart_after_kill9();
    pending.join().unwrap();
    let (_, v) = c.get("/api/v1/exec-sessions?limit=1");
    let s = &v["sessions"][0];
    assert_eq!(
        (s["argv"].clone(), s["outcome"].as_str()),
        (json!(["sleep", "30"]), Some("unfinished")),
        "{v}"
    );
    assert!(s["ended_ms"].is_null());
}
