//! End-to-end: a container service deployed from the conductor to a real
//! edge-worker, which runs it through the local Docker Engine API.
//!
//! No registry is reachable, so the image is built here `FROM scratch` with
//! the static (musl) `test-service`. Without a Docker engine the test says it
//! is skipped and why — unless `AEREKOS_REQUIRE_DOCKER=1` (CI), where that
//! is a failure.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::fs;
use std::process::Command;
use std::time::Duration;

use e2e::services::actual;
use e2e::*;
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn docker(args: &[&str]) -> (bool, String) {
    match Command::new("docker").args(args).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_string()
                + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn engine_available() -> Result<(), String> {
    let (ok, out) = docker(&["info", "--format", "{{.ServerVersion}}"]);
    if ok {
        Ok(())
    } else {
        Err(format!("no Docker engine: {out}"))
    }
}

/// Removes what the test created, even when it fails.
struct Cleanup {
    image: String,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn container_ids(filter: &str) -> Vec<String> {
    let (_, out) = docker(&["ps", "-aq", "--filter", filter]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn container_service_is_deployed_restarted_and_removed_and_foreign_containers_are_untouched() {
    if let Err(reason) = engine_available() {
        if std::env::var("AEREKOS_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("AEREKOS_REQUIRE_DOCKER=1 but {reason}");
        }
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("aerekos-e2e-ctr:{}", std::process::id());
    let foreign = format!("aerekos-foreign-{}", std::process::id());
    let _cleanup = Cleanup {
        image: tag.clone(),
        containers: vec![foreign.clone()],
    };

    // Image FROM scratch with the static test service.
    let ctx = dir.path().join("image");
    fs::create_dir_all(&ctx).unwrap();
    fs::copy(static_test_service_bin(), ctx.join("test-service")).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY test-service /test-service\nENTRYPOINT [\"/test-service\"]\n",
    )
    .unwrap();
    let (ok, out) = docker(&["build", "-q", "-t", &tag, ctx.to_str().unwrap()]);
    assert!(ok, "docker build: {out}");

    // A container that is not ours, from the same image, already running.
    let (ok, out) = docker(&[
        "run", "-d", "--name", &foreign, &tag, "--port", "0", "--tag", "foreign",
    ]);
    assert!(ok, "docker run foreign: {out}");

    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("ctr-host"),
    );
    let id = w.wait_id();
    wait_for("worker online", SECS(30), || {
        (c.status_of(&id) == "online").then_some(())
    });

    let port = free_port();
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "ctr", "kind": "container", "image": tag,
                "args": ["--port", "8080", "--listen", "0.0.0.0", "--tag", "in-container"],
                "ports": [{"host": port, "container": 8080, "udp": false}],
                "restart": "always", "backoff_ms": 300,
                "limits": {"memory_bytes": 64u64 << 20, "pids": 64}}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.put("/api/v1/services/ctr/deployment", &json!({"workers": [id]}));
    assert_eq!(status, 200, "{body}");
    wait_for("container running", SECS(60), || {
        actual(&c, "ctr", &id).filter(|a| a["state"] == "running")
    });
    let ours = container_ids("label=io.aerekos.service=ctr");
    assert_eq!(ours.len(), 1, "one container carries our labels: {ours:?}");
    let (_, inspect) = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{index .Config.Labels \"io.aerekos.worker\"}}",
        &ours[0],
    ]);
    assert!(
        inspect.contains(&(64u64 << 20).to_string()) && inspect.contains(&id),
        "limits and labels applied: {inspect}"
    );
    // The published port reaches the service inside.
    let info = wait_for("published port answers", SECS(20), || {
        let mut r = http()
            .get(format!("http://127.0.0.1:{port}/info"))
            .call()
            .ok()?;
        (r.status() == 200).then(|| r.body_mut().read_to_string().unwrap_or_default())
    });
    assert!(info.contains("tag=in-container"), "{info}");

    // Restart through the API: the container is started again.
    let (_, before) = docker(&["inspect", "--format", "{{.State.StartedAt}}", &ours[0]]);
    let (status, body) = c.post(
        &format!("/api/v1/workers/{id}/services/ctr/restart"),
        &json!({}),
    );
    assert_eq!(status, 200, "{body}");
    wait_for("container restarted", SECS(60), || {
        let ids = container_ids("label=io.aerekos.service=ctr");
        let cid = ids.first()?;
        let (_, after) = docker(&[
            "inspect",
            "--format",
            "{{.State.StartedAt}} {{.State.Running}}",
            cid,
        ]);
        (after.ends_with("true") && !after.starts_with(before.trim())).then_some(())
    });
    wait_for("running again", SECS(30), || {
        actual(&c, "ctr", &id).filter(|a| a["state"] == "running")
    });

    // Killed behind our back → restarted by the worker's policy.
    let cid = container_ids("label=io.aerekos.service=ctr").remove(0);
    let (ok, out) = docker(&["kill", &cid]);
    assert!(ok, "{out}");
    wait_for("restarted after docker kill", SECS(60), || {
        let a = actual(&c, "ctr", &id)?;
        (a["state"] == "running" && a["restarts"].as_u64().unwrap_or(0) >= 1).then_some(())
    });

    // Undeploy: our container is gone, the foreign one still runs.
    let (status, body) = c.delete("/api/v1/services/ctr/deployment");
    assert!(status == 200 || status == 204, "{status} {body}");
    wait_for("our container removed", SECS(60), || {
        container_ids("label=io.aerekos.service=ctr")
            .is_empty()
            .then_some(())
    });
    let (_, running) = docker(&["inspect", "--format", "{{.State.Running}}", &foreign]);
    assert!(
        running.starts_with("true"),
        "the foreign container was touched: {running}"
    );
    assert!(!w.proc.output().contains("panicked"), "{}", w.proc.tail(30));
    w.proc.terminate();
}
