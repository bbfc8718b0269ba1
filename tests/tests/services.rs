//! End-to-end: process services deployed from the conductor to real
//! edge-worker processes, supervised through crashes, a conductor outage and
//! a worker restart, and removed without leaving orphans.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::time::Duration;

use e2e::chaos::{describe, pids_with};
use e2e::services::*;
use e2e::*;
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A `sleep` argument no other process on the machine has.
fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("3600.{}{}", std::process::id(), nanos % 100_000)
}

#[test]
fn deploy_by_label_supervise_survive_outage_and_undeploy_without_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut workers: Vec<Worker> = ["sensor", "sensor", "gateway"]
        .iter()
        .enumerate()
        .map(|(i, role)| {
            let mut opts = WorkerOpts::named(&format!("svc-{i}"));
            opts.extra = vec!["--label".into(), format!("role={role}")];
            Worker::start(
                &dir.path().join(format!("w{i}")),
                &c.url(),
                Some(&token),
                opts,
            )
        })
        .collect();
    let ids: Vec<String> = workers.iter_mut().map(|w| w.wait_id()).collect();
    for id in &ids {
        wait_for("online", SECS(20), || {
            (c.status_of(id) == "online").then_some(())
        });
    }

    // A long-running service, deployed by label: runs on exactly the two sensors.
    let mark = marker();
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "relay", "command": "sleep", "args": [mark],
                "restart": "always", "max_restarts": 5, "restart_window_s": 60, "backoff_ms": 200}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.put(
        "/api/v1/services/relay/deployment",
        &json!({"labels": {"role": "sensor"}}),
    );
    assert_eq!(status, 200, "{body}");
    for id in &ids[..2] {
        wait_for("relay running on a sensor", SECS(20), || {
            (state_of(&c, "relay", id) == "running").then_some(())
        });
    }
    wait_for("two copies, one per sensor", SECS(10), || {
        (pids_with(&mark).len() == 2).then_some(())
    });
    assert!(actual(&c, "relay", &ids[2]).is_none(), "not on the gateway");

    // Kill its process: the worker restarts it.
    let first = pid_of(&c, "relay", &ids[0]);
    assert!(pids_with(&mark).contains(&first));
    let _ = std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status();
    wait_for("relay restarted with a new pid", SECS(20), || {
        let a = actual(&c, "relay", &ids[0])?;
        (a["state"] == "running" && a["pid"].as_u64() != Some(u64::from(first))).then_some(())
    });
    assert_eq!(pids_with(&mark).len(), 2);

    // A service that crashes every time ends up failed.
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "crasher", "command": "sh", "args": ["-c", "exit 3"],
                "restart": "on-failure", "max_restarts": 2, "restart_window_s": 60, "backoff_ms": 100}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.put(
        "/api/v1/services/crasher/deployment",
        &json!({"workers": [ids[2]]}),
    );
    assert_eq!(status, 200, "{body}");
    wait_for("crasher failed", SECS(30), || {
        (state_of(&c, "crasher", &ids[2]) == "failed").then_some(())
    });

    // The conductor goes away: services keep running; a worker restarted
    // while it is down starts (or adopts) its service from its own state.
    c.proc.kill9();
    std::thread::sleep(SECS(1));
    assert_eq!(pids_with(&mark).len(), 2, "services outlive the conductor");
    workers[1].restart();
    // Never more than one copy per sensor while the restarted worker
    // re-adopts its service, and two in the end.
    let deadline = std::time::Instant::now() + SECS(5);
    loop {
        let pids = pids_with(&mark);
        assert!(
            pids.len() <= 2,
            "after a worker restart: one copy per sensor, not more: {}\nworker log:\n{}",
            describe(&pids),
            workers[1].proc.tail(30)
        );
        if std::time::Instant::now() > deadline {
            assert_eq!(
                pids.len(),
                2,
                "after a worker restart: {}\nworker log:\n{}",
                describe(&pids),
                workers[1].proc.tail(30)
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.restart_after_kill9();
    wait_for("worker 1 reports relay running again", SECS(30), || {
        (state_of(&c, "relay", &ids[1]) == "running").then_some(())
    });

    // Undeploy: gone everywhere, no orphan processes.
    let (status, body) = c.delete("/api/v1/services/relay/deployment");
    assert!(status == 200 || status == 204, "{status} {body}");
    wait_for("no relay process left", SECS(20), || {
        pids_with(&mark).is_empty().then_some(())
    });
    wait_for("conductor sees it removed", SECS(20), || {
        ids[..2]
            .iter()
            .all(|id| actual(&c, "relay", id).is_none())
            .then_some(())
    });
}

/// A service that used up its restarts is `failed`; once what made it fail
/// is fixed, the conductor's periodic redeploy (at most every 60 s) starts
/// it again without anyone touching it.
#[test]
fn a_failed_service_is_deployed_again_and_recovers_once_its_cause_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _w, id) = conductor_and_worker(dir.path(), "retry-host");
    let flag = dir.path().join("ready");
    let m = marker();
    // Exits at once until `flag` exists, then sleeps (carrying the marker).
    let script = format!("test -f {} && exec sleep {m}; exit 1", flag.display());
    create_service(
        &c,
        &json!({"name": "flaky", "command": "sh", "args": ["-c", script],
                "restart": "always", "max_restarts": 2, "restart_window_s": 60,
                "backoff_ms": 100}),
    );
    deploy(&c, "flaky", &json!({"workers": [id]}));
    wait_for("flaky failed", SECS(30), || {
        (state_of(&c, "flaky", &id) == "failed").then_some(())
    });
    std::fs::write(&flag, b"fixed").unwrap();
    let st = wait_for("flaky running again", SECS(100), || {
        let s = state_of(&c, "flaky", &id);
        (s == "running").then_some(s)
    });
    assert_eq!(st, "running");
    let pids = pids_with(&m);
    assert_eq!(pids.len(), 1, "one copy: {}", describe(&pids));
}

/// Samples every 20 ms, on its own thread, the processes whose command line
/// contains `marker`; [`Sampler::seen`] returns every pid found so far.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn watch(marker: &str) -> Sampler {
        use std::sync::atomic::Ordering;
        let marker = marker.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, out) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let pids = pids_with(&marker);
                if !pids.is_empty() {
                    let mut all = out.lock().unwrap_or_else(|e| e.into_inner());
                    for p in pids {
                        if !all.contains(&p) {
                            all.push(p);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<u32> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A deployment created `stopped` installs the service without ever
/// running it: no process of it is seen (sampled every 20 ms) and it never
/// wrote its output log, until the worker reports the version `stopped`.
/// A new version deployed while stopped (a rollout) and a worker restart
/// keep it so. Deployed `running` and started, it runs.
#[test]
fn a_service_deployed_stopped_never_runs_until_started() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut w, id) = conductor_and_worker(dir.path(), "stopped-host");
    wait_for("online", SECS(20), || {
        (c.status_of(&id) == "online").then_some(())
    });
    // `test-service --tag <marker>` prints a tick every 50 ms to its log.
    let (tag1, tag2) = (marker(), marker());
    let spec = |tag: &str| {
        json!({"name": "quiet", "command": bin("test-service").to_str().unwrap(),
               "args": ["--tag", tag, "--tick-ms", "50"], "restart": "always"})
    };
    let log = w.state_dir.join("services/quiet/output.log");
    let (s1, s2) = (Sampler::watch(&tag1), Sampler::watch(&tag2));
    let is = |version: u64, state: &str| {
        let a = actual(&c, "quiet", &id)?;
        (a["version"] == version && a["state"] == state).then_some(a)
    };

    // Deployed stopped: installed, reported stopped, never run.
    create_service(&c, &spec(&tag1));
    cli_json(&c, &["deploy", "quiet", "--workers", &id, "--stopped"]);
    let a = wait_for("quiet v1 reported stopped", SECS(30), || is(1, "stopped"));
    assert_eq!(a["pid"], 0, "{a}");
    // A pass that would stop a copy it had started has had time to run.
    std::thread::sleep(SECS(3));
    assert_eq!(state_of(&c, "quiet", &id), "stopped");
    assert!(
        s1.seen().is_empty(),
        "a service deployed stopped ran: {:?}\nworker log:\n{}",
        s1.seen(),
        w.proc.tail(30)
    );
    assert!(!log.exists(), "a service deployed stopped wrote output");

    // A new version while stopped: rolled out stopped, still never run.
    create_service(&c, &spec(&tag2));
    deploy(
        &c,
        "quiet",
        &json!({"workers": [id], "version": 2, "desired_state": "stopped",
                "rollout": {"settle_s": 1}}),
    );
    wait_for("quiet v2 reported stopped", SECS(30), || is(2, "stopped"));
    wait_for("the rollout to v2 succeeded", SECS(30), || {
        let (status, body) = c.get("/api/v1/services/quiet");
        assert_eq!(status, 200, "{body}");
        (body["deployment"]["version"] == 2).then_some(())
    });

    // A worker restart keeps it stopped.
    w.restart();
    wait_for("online again", SECS(20), || {
        (c.status_of(&id) == "online").then_some(())
    });
    std::thread::sleep(SECS(3));
    assert!(is(2, "stopped").is_some(), "{:?}", actual(&c, "quiet", &id));
    for (s, v) in [(&s1, 1), (&s2, 2)] {
        assert!(
            s.seen().is_empty(),
            "v{v} ran while stopped: {:?}\nworker log:\n{}",
            s.seen(),
            w.proc.tail(30)
        );
    }
    assert!(!log.exists(), "a service kept stopped wrote output");

    // Desired running, and started on the worker: version 2 runs.
    cli_json(&c, &["deploy", "quiet", "--workers", &id]);
    cli_json(&c, &["start", &id, "quiet"]);
    let a = wait_for("quiet v2 running", SECS(30), || is(2, "running"));
    let pid = u32::try_from(a["pid"].as_u64().unwrap()).unwrap();
    wait_for("its process, carrying the v2 tag", SECS(10), || {
        (pids_with(&tag2) == vec![pid]).then_some(())
    });
    wait_for("the sampler to see it (it can)", SECS(5), || {
        s2.seen().contains(&pid).then_some(())
    });
    wait_for("its output log", SECS(10), || log.exists().then_some(()));
    assert!(s1.seen().is_empty(), "v1 never ran: {:?}", s1.seen());
}
