//! Deploy latency benchmark: time from the deploy API call to the conductor
//! reporting the service `running` on the worker, median of 20, for a
//! process service (the workspace's `test-service` binary, started by path).
//!
//! ```sh
//! cargo run --release -p aerekos-e2e --bin deploy_latency
//! ```
//!
//! Baselines measured in the same run, so the ratios mean something on a
//! shared machine: the Ping command round trip through the same API, broker
//! and worker (the floor for anything the conductor asks of a worker), and
//! the bare fork/exec of the same binary until its first output line.
//! Each round undeploys and waits until the worker reports the service
//! removed before the next; a round ends when the worker reports `running`
//! with a pid no earlier round had (so a stale report cannot count).

#![allow(clippy::unwrap_used)] // a benchmark: a panic is a failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::{json, Value};

const ROUNDS: usize = 20;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration, Duration) {
    v.sort();
    // fits: q is 0..=1, so the index is 0..len.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.9), v[0], v[v.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// What the worker last reported for `bench`: (state, pid). `None` once it
/// reported the service removed (this view keeps undeployed services until
/// the worker confirms, unlike the per-service view).
fn actual(c: &Conductor, worker: &str) -> Option<(String, u64)> {
    let (_, body) = c.get(&format!("/api/v1/workers/{worker}/services"));
    let a = body["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "bench")?["actual"]
        .clone();
    Some((
        a["state"].as_str()?.to_string(),
        a["pid"].as_u64().unwrap_or(0),
    ))
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("bench"),
    );
    let id = w.wait_id();
    wait_for("worker online", Duration::from_secs(30), || {
        (c.status_of(&id) == "online").then_some(())
    });
    let service_bin = bin("test-service");

    // Baseline 1: Ping round trip through the API.
    let mut ping = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let (status, body) = c.post(
            &format!("/api/v1/workers/{id}/commands"),
            &json!({"action": "ping"}),
        );
        assert_eq!(status, 200, "{body}");
        ping.push(t.elapsed());
    }

    // Baseline 2: fork/exec of the service until its first line.
    let mut exec = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut child = Command::new(&service_bin)
            .args(["--port", "0", "--tag", "baseline"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test-service");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        exec.push(t.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }

    // The measurement: deploy → running, as the API reports it.
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "bench", "command": service_bin.to_string_lossy(),
                "args": ["--port", "0", "--tag", "bench"], "restart": "always"}),
    );
    assert_eq!(status, 201, "{body}");
    let mut deploy = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    for round in 0..ROUNDS {
        let t = Instant::now();
        let (status, body) = c.put(
            "/api/v1/services/bench/deployment",
            &json!({"workers": [id]}),
        );
        assert_eq!(status, 200, "{body}");
        loop {
            if let Some((state, pid)) = actual(&c, &id) {
                if state == "running" && pid != 0 && !pids.contains(&pid) {
                    pids.insert(pid);
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "round {round}: not running after 30 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        deploy.push(t.elapsed());
        let (status, body) = c.delete("/api/v1/services/bench/deployment");
        assert!(status == 200 || status == 204, "{status} {body}");
        wait_for("bench removed", Duration::from_secs(30), || {
            actual(&c, &id).is_none().then_some(())
        });
    }

    let (pm, p9, pmin, pmax) = stats(ping.clone());
    let (em, e9, emin, emax) = stats(exec.clone());
    let (dm, d9, dmin, dmax) = stats(deploy.clone());
    println!(
        "deploy → running, {ROUNDS} rounds (process service, conductor + 1 worker on this machine)"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "", "median", "p90", "min", "max"
    );
    let row = |name: &str, m, p, lo, hi| {
        println!(
            "{name:<34} {:>10} {:>10} {:>10} {:>10}",
            ms(m),
            ms(p),
            ms(lo),
            ms(hi)
        )
    };
    row("baseline: Ping round trip (API)", pm, p9, pmin, pmax);
    row("baseline: fork/exec to first line", em, e9, emin, emax);
    row("deploy API call → running", dm, d9, dmin, dmax);
    println!(
        "ratio deploy/ping = {:.2}, deploy/(ping+exec) = {:.2}",
        dm.as_secs_f64() / pm.as_secs_f64(),
        dm.as_secs_f64() / (pm + em).as_secs_f64()
    );
    let v: Value = json!({
        "ping_median_ms": pm.as_secs_f64() * 1e3,
        "exec_median_ms": em.as_secs_f64() * 1e3,
        "deploy_median_ms": dm.as_secs_f64() * 1e3,
        "deploy_p90_ms": d9.as_secs_f64() * 1e3,
    });
    println!("{v}");
}
