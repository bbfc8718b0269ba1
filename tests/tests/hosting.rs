//! End-to-end: services with artifacts, health checks, the local API, logs,
//! rollouts and tampered downloads, across real conductor and edge-worker
//! processes, driven through the `aerekos` CLI where a user would use it.
//!
//! The hosted program is the workspace's `test-service` binary, uploaded to
//! the conductor as an x86_64 (this machine's arch) artifact.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::fs;
use std::path::Path;
use std::time::Duration;

use e2e::services::*;
use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn arch() -> &'static str {
    std::env::consts::ARCH
}

/// Stores a spec through `aerekos service create <file>`.
fn create(c: &Conductor, dir: &Path, spec: &Value) -> Value {
    let name = spec["name"].as_str().unwrap();
    let path = dir.join(format!("{name}-{}.json", rand_suffix()));
    fs::write(&path, spec.to_string()).unwrap();
    cli_json(c, &["service", "create", path.to_str().unwrap()])
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut resp = http()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?;
    (resp.status() == 200).then(|| resp.body_mut().read_to_string().unwrap_or_default())
}

fn start_fleet(dir: &Path, n: usize, labels: &[&str]) -> (Conductor, Vec<Worker>, Vec<String>) {
    let c = Conductor::start(&dir.join("conductor"));
    let token = c.registration_token();
    let mut workers: Vec<Worker> = (0..n)
        .map(|i| {
            let mut opts = WorkerOpts::named(&format!("host-{i}"));
            for l in labels {
                opts.extra.push("--label".into());
                opts.extra.push((*l).into());
            }
            Worker::start(&dir.join(format!("w{i}")), &c.url(), Some(&token), opts)
        })
        .collect();
    let ids: Vec<String> = workers.iter_mut().map(|w| w.wait_id()).collect();
    for id in &ids {
        wait_for("worker online", SECS(30), || {
            (c.status_of(id) == "online").then_some(())
        });
    }
    (c, workers, ids)
}

#[test]
fn artifact_service_is_healthy_reads_its_config_streams_logs_and_is_restarted_when_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let (c, workers, ids) = start_fleet(dir.path(), 1, &["site=shop"]);
    let id = &ids[0];
    let sha = upload_artifact(&c, &bin("test-service"));
    let listed = cli_json(&c, &["artifact", "list"]);
    assert!(listed.to_string().contains(&sha), "{listed}");

    let port = free_port();
    let sick_flag = dir.path().join("make-it-sick");
    let spec = json!({
        "name": "probe",
        "artifacts": {arch(): sha},
        "args": ["--port", port.to_string(), "--tag", "probe-v1",
                 "--unhealthy-if-exists", sick_flag.to_str().unwrap(), "--tick-ms", "200"],
        "restart": "always", "max_restarts": 10, "restart_window_s": 60, "backoff_ms": 200,
        "health": {"http": {"port": port, "path": "/healthz"},
                   "interval_ms": 300, "timeout_ms": 500, "retries": 2},
        "config": {"site": "shop", "greeting": "hello"},
        "secrets": {"api_key": "s3cr3t-value-never-shown"},
    });
    let created = create(&c, dir.path(), &spec);
    assert_eq!(created["name"], "probe", "{created}");
    let (ok, out, err) = cli(&c, &["deploy", "probe", "--label", "site=shop"]);
    assert!(ok, "{err}{out}");
    wait_for("probe healthy", SECS(30), || {
        (state_of(&c, "probe", id) == "healthy").then_some(())
    });

    // It runs the downloaded artifact, and read its own config and secret
    // through the worker's local API.
    let info = wait_for("probe answers /info", SECS(10), || http_get(port, "/info"));
    assert!(info.contains("tag=probe-v1"), "{info}");
    assert!(
        info.contains("site") && info.contains("greeting"),
        "config reached the service: {info}"
    );
    assert!(!info.contains("secret_sum=-"), "secret reached it: {info}");
    let first = actual(&c, "probe", id).unwrap();
    let pid = first["pid"].as_u64().unwrap();
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().contains(&sha),
        "runs the cached artifact, not the original: {}",
        exe.display()
    );
    // Under the service's name (argv[0] and comm), not the artifact's hash.
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap();
    assert_eq!(String::from_utf8_lossy(argv0), "probe");
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "probe");

    // Secrets never leave through the API, the CLI or the JSON mirror.
    for text in [
        cli(&c, &["--json", "service", "show", "probe"]).1,
        cli(&c, &["--json", "services"]).1,
        c.get(&format!("/api/v1/workers/{id}")).1.to_string(),
        fs::read_to_string(c.data_dir.join("conductor.log")).unwrap_or_default(),
        workers[0].proc.output(),
    ] {
        assert!(
            !text.contains("s3cr3t-value-never-shown"),
            "secret leaked: {text}"
        );
    }

    // The service's event and metric arrive through the local API.
    wait_for("service event on the conductor", SECS(20), || {
        c.get(&format!("/api/v1/workers/{id}"))
            .1
            .to_string()
            .contains("started probe-v1")
            .then_some(())
    });

    // Logs: the tail through the CLI, then follow picks up new lines.
    let (ok, out, err) = cli(&c, &["logs", id, "probe", "--tail", "2000"]);
    assert!(ok, "{err}");
    assert!(out.contains("tick") && out.contains("probe-v1"), "{out}");
    let (ok, out, err) = cli(&c, &["logs", id, "probe", "--tail", "10", "--follow", "2"]);
    assert!(ok, "{err}");
    assert!(
        out.matches("tick").count() >= 5,
        "followed new output: {out}"
    );

    // Failing health check → unhealthy → restarted with a new pid.
    let restarts = first["restarts"].as_u64().unwrap_or(0);
    fs::write(&sick_flag, b"x").unwrap();
    wait_for("probe restarted after failing health", SECS(30), || {
        let a = actual(&c, "probe", id)?;
        (a["restarts"].as_u64().unwrap_or(0) > restarts && a["pid"].as_u64() != Some(pid))
            .then_some(())
    });
    fs::remove_file(&sick_flag).unwrap();
    wait_for("probe healthy again", SECS(30), || {
        (state_of(&c, "probe", id) == "healthy").then_some(())
    });

    // Undeploy through the CLI: gone from the worker.
    let (ok, _, err) = cli(&c, &["undeploy", "probe"]);
    assert!(ok, "{err}");
    wait_for("probe removed", SECS(20), || {
        actual(&c, "probe", id).is_none().then_some(())
    });
    wait_for("probe port closed", SECS(10), || {
        http_get(port, "/healthz").is_none().then_some(())
    });
}

#[test]
fn tampered_artifact_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _workers, ids) = start_fleet(dir.path(), 1, &[]);
    let id = &ids[0];
    let sha = upload_artifact(&c, &bin("test-service"));
    // Someone swaps the bytes on the conductor's disk after the upload.
    let stored = c.data_dir.join("artifacts").join(&sha);
    assert!(stored.is_file(), "artifact stored at {}", stored.display());
    let mut bytes = fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&stored, &bytes).unwrap();

    create(
        &c,
        dir.path(),
        &json!({"name": "tampered", "artifacts": {arch(): sha},
                "args": ["--port", "0", "--tag", "tampered"], "restart": "always"}),
    );
    let (ok, _, err) = cli(&c, &["deploy", "tampered", "--workers", id]);
    assert!(ok, "{err}");
    let a = wait_for("tampered reported failed", SECS(30), || {
        actual(&c, "tampered", id).filter(|a| a["state"] == "failed")
    });
    assert!(
        a["detail"].as_str().unwrap_or("").contains("sha256"),
        "the reason names the digest: {a}"
    );
    let w = c.get(&format!("/api/v1/workers/{id}")).1.to_string();
    assert!(
        w.contains("ArtifactRejected") || w.contains("artifact_rejected"),
        "{w}"
    );
    // Nothing was executed.
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmd).contains("tampered\0"),
                "a tampered binary runs"
            );
        }
    }
}

#[test]
fn a_rollout_whose_new_version_fails_its_health_check_reverts() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _workers, ids) = start_fleet(dir.path(), 3, &["tier=edge"]);
    let sha = upload_artifact(&c, &bin("test-service"));
    let base = |tag: &str, health_cmd: &str| {
        json!({
            "name": "roll",
            "artifacts": {arch(): sha},
            "args": ["--port", "0", "--tag", tag],
            "restart": "always", "backoff_ms": 200, "max_restarts": 3, "restart_window_s": 60,
            "health": {"command": {"command": "sh", "args": ["-c", health_cmd]},
                       "interval_ms": 300, "timeout_ms": 1000, "retries": 2},
        })
    };
    create(&c, dir.path(), &base("roll-v1", "exit 0"));
    let (ok, _, err) = cli(&c, &["deploy", "roll", "--label", "tier=edge"]);
    assert!(ok, "{err}");
    for id in &ids {
        wait_for("v1 healthy everywhere", SECS(30), || {
            actual(&c, "roll", id)
                .filter(|a| a["state"] == "healthy" && a["version"] == 1)
                .map(|_| ())
        });
    }

    // v2's health check always fails.
    create(&c, dir.path(), &base("roll-v2", "exit 1"));
    let (ok, out, err) = cli(
        &c,
        &[
            "rollout",
            "roll",
            "--version",
            "2",
            "--canary",
            "1",
            "--settle",
            "2",
        ],
    );
    assert!(ok, "{err}{out}");
    let history = wait_for("rollout reverted", SECS(60), || {
        let v = cli_json(&c, &["rollouts", "roll"]);
        v.to_string().contains("reverted").then_some(v)
    });
    println!("rollout history: {history}");
    // Every worker ends on v1 and healthy; at most the canary ever saw v2.
    for id in &ids {
        wait_for("back on v1 and healthy", SECS(40), || {
            actual(&c, "roll", id)
                .filter(|a| a["state"] == "healthy" && a["version"] == 1)
                .map(|_| ())
        });
    }
    let shown = cli_json(&c, &["service", "show", "roll"]);
    assert_eq!(shown["deployment"]["version"], 1, "{shown}");
    let text = history.to_string();
    assert!(
        text.contains("health") || text.contains("unhealthy") || text.contains("failed"),
        "the reason is recorded: {text}"
    );
}
