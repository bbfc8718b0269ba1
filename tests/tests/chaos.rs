//! Chaos tests (issue 7): a broker restart, the conductor killed with -9
//! while it ingests, a worker killed with -9 while it deploys, a worker cut
//! off from the broker for 60 s, and a worker whose wall clock jumps an hour
//! either way. Everything runs on loopback with the real binaries; each test
//! asserts that no acknowledged state is lost, that no service runs twice
//! and that the fleet converges.
//!
//! What the system promises, and so what is asserted:
//! * A frame leaves the worker's outbox only when the conductor acknowledged
//!   it with `Stored` (it is processed and committed), not at the broker's
//!   PubAck; queued frames are published again, in seq order, after every
//!   reconnect. With a persistent broker stopped cleanly, every frame the
//!   worker sealed reaches the conductor: the seqs seen on the broker are
//!   contiguous and every metrics frame is in the conductor's history.
//! * An API write answered 2xx is committed to SQLite before the answer
//!   (services, deployments, labels, rollouts). With the embedded broker a
//!   conductor `kill -9` loses no frame either: every metrics frame the
//!   workers published before the kill — including those the broker had
//!   acknowledged and the conductor had not committed yet — is in the
//!   history after the restart, and the workers' re-sends of frames it had
//!   stored are counted as `duplicate`, not `replayed`.
//! * A one-shot command (`ping`, `restart`) sent while its worker is cut
//!   off fails with 504 after 5 s and is not run later (the worker's MQTT
//!   session is clean); desired state (deployments, stop overrides) is
//!   persisted and re-applied by reconciliation after the worker's Birth.
//! * Nothing trusts a device clock: replay protection uses seqs, the
//!   conductor stamps frames with its own receive time, liveness runs on the
//!   conductor's monotonic clock, and the worker's backoff and health checks
//!   run on its monotonic clock (libfaketime moves only the wall clock here,
//!   as an NTP step does).
//!
//! Known limits these tests do not assert (reported, not fixed):
//! * A service `failed` at the desired version is deployed again by the
//!   conductor at most every 60 s (tests/services.rs checks it recovers), so
//!   recovery from e.g. `artifact … is not in the cache` can take a minute.
//! * Mosquitto killed with -9 (not tested) loses what it acknowledged and had
//!   not yet saved; the broker test stops it cleanly.
//!
//! `AEREKOS_CHAOS_CUT_S` shortens the 60 s cut-off for local iteration.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::chaos::{describe, pids_with, unique_marker, uptime_s, BlackHoleProxy, FakeClock};
use e2e::services::*;
use e2e::*;
use protocol::Body;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

// ---- helpers ----

/// Like [`wait_for`], but a timeout also prints the tails of `procs`' logs.
#[track_caller]
fn wait_logged<T>(
    what: &str,
    timeout: Duration,
    procs: &[&Proc],
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.log.display(), p.tail(40)))
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches the processes carrying `marker` every 20 ms and remembers the
/// most copies seen at once (and their descriptions); kills them on drop so
/// a failed test leaves nothing running.
struct CopyWatch {
    marker: String,
    max: Arc<AtomicUsize>,
    worst: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl CopyWatch {
    fn start(marker: &str) -> CopyWatch {
        let max = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, w, s, mk) = (max.clone(), worst.clone(), stop.clone(), marker.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let pids = pids_with(&mk);
                if pids.len() > m.load(Ordering::SeqCst) {
                    m.store(pids.len(), Ordering::SeqCst);
                    *w.lock().unwrap() = describe(&pids);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        CopyWatch {
            marker: marker.to_string(),
            max,
            worst,
            stop,
        }
    }

    /// Panics if more than `n` copies were ever seen at once.
    #[track_caller]
    fn assert_never_more_than(&self, n: usize, context: &str) {
        let max = self.max.load(Ordering::SeqCst);
        assert!(
            max <= n,
            "{context}: {max} copies of {} seen at once (at most {n} allowed): {}",
            self.marker,
            self.worst.lock().unwrap()
        );
    }
}

impl Drop for CopyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for pid in pids_with(&self.marker) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

fn is_up(state: &str) -> bool {
    state == "running" || state == "healthy"
}

/// A long-running process service (`test-service --tag <marker>`, so its
/// command line carries the marker), restarted always.
fn sleep_spec(name: &str, marker: &str) -> Value {
    json!({"name": name, "command": bin("test-service").to_str().unwrap(),
           "args": ["--tag", marker, "--tick-ms", "1000"],
           "restart": "always", "max_restarts": 10, "restart_window_s": 60, "backoff_ms": 200})
}

fn start_worker(dir: &Path, c: &Conductor, token: &str, host: &str, opts: WorkerOpts) -> Worker {
    Worker::start(&dir.join(host), &c.url(), Some(token), opts)
}

#[track_caller]
fn wait_online(c: &Conductor, id: &str, timeout: Duration) {
    wait_for(&format!("{id} online"), timeout, || {
        (c.status_of(id) == "online").then_some(())
    });
}

/// Raw history of a worker: seq → (uptime_s, dropped).
fn history(c: &Conductor, id: &str) -> BTreeMap<u64, (u64, u64)> {
    let points = c.raw_history(id);
    let mut out = BTreeMap::new();
    for p in &points {
        let seq = p["seq"].as_u64().unwrap();
        let m = &p["metrics"];
        let prev = out.insert(
            seq,
            (
                m["uptime_s"].as_u64().unwrap_or(0),
                m["dropped"].as_u64().unwrap_or(0),
            ),
        );
        assert!(prev.is_none(), "seq {seq} stored twice for {id}");
    }
    assert_eq!(
        out.len(),
        points.len(),
        "duplicate seqs in the history of {id}"
    );
    out
}

/// Sends `ping` and expects the worker's `ok` within the API's 5 s.
#[track_caller]
fn ping_ok(c: &Conductor, id: &str) {
    let (status, body) = c.post(
        &format!("/api/v1/workers/{id}/commands"),
        &json!({"action": "ping"}),
    );
    assert_eq!(status, 200, "ping {id}: {body}");
    assert_eq!(body["status"], "ok", "ping {id}: {body}");
}

// fits: u64 milliseconds last 584 million years after 1970.
#[allow(clippy::cast_possible_truncation)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---- 1. broker restart ----

/// Mosquitto (persistent) is stopped for ~5 s and started again on the same
/// port. The worker queues what it samples meanwhile; after the restart
/// every frame it sealed reaches the broker in seq order with no gap, every
/// metrics frame reaches the conductor's history, no frame was dropped by
/// the outbox, the hosted service kept its pid (one copy), and commands
/// work again.
#[test]
fn broker_restart_loses_no_queued_frame_and_keeps_the_service_running_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let broker_addr: SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let c = Conductor::start_with(
        &dir.path().join("conductor"),
        &["--mqtt-url", &broker.url()],
    );
    let token = c.registration_token();
    let mut opts = WorkerOpts::named("broker-restart");
    opts.interval_ms = 500;
    let mut w = start_worker(dir.path(), &c, &token, "w", opts);
    let id = w.wait_id();
    let secret = w.secret();
    wait_online(&c, &id, SECS(30));

    let mark = unique_marker("chaos-broker");
    let watch = CopyWatch::start(&mark);
    create_service(&c, &sleep_spec("steady", &mark));
    deploy(&c, "steady", &json!({"workers": [id]}));
    wait_for("steady running", SECS(30), || {
        is_up(&state_of(&c, "steady", &id)).then_some(())
    });
    let pid = pid_of(&c, "steady", &id);
    assert_eq!(pids_with(&mark), vec![pid]);

    let sniffer = MqttClient::connect_with(
        broker_addr,
        "chaos-sniffer",
        None,
        &[&format!("aerekos/v1/{id}/+")],
    )
    .unwrap();
    wait_for("a few samples", SECS(20), || {
        (c.raw_history(&id).len() >= 3).then_some(())
    });

    broker.stop();
    let stopped_at = now_ms();
    std::thread::sleep(SECS(5));
    let restarted_at = now_ms();
    broker.start_again();

    // Every frame the worker sealed, seen by a persistent sniffer, until
    // frames sealed well after the restart arrived.
    let mut seen: BTreeMap<u64, (u64, Body)> = BTreeMap::new();
    wait_for("frames sealed after the restart", SECS(40), || {
        while let Some((topic, payload, retained)) = sniffer.recv(Duration::from_millis(100)) {
            // The worker's own live stream only: not its last will, not the
            // conductor's commands (their own seq stream), not a retained
            // frame from before the sniffer subscribed.
            if retained || topic.ends_with("/status") || topic.ends_with("/cmd") {
                continue;
            }
            let env = protocol::open(&payload, &id)
                .unwrap()
                .verify(&secret)
                .unwrap();
            seen.insert(env.seq, (env.sent_at_ms, env.body));
        }
        seen.values()
            .any(|(sent, _)| *sent > restarted_at + 3000)
            .then_some(())
    });
    let seqs: Vec<u64> = seen.keys().copied().collect();
    let (first, last) = (seqs[0], *seqs.last().unwrap());
    assert_eq!(
        seqs.len() as u64,
        last - first + 1,
        "seqs contiguous from {first} to {last}: {seqs:?}"
    );
    let during = seen
        .values()
        .filter(|(sent, b)| {
            matches!(b, Body::Metrics(_) | Body::MetricsBatch(_))
                && *sent > stopped_at
                && *sent < restarted_at
        })
        .count();
    eprintln!(
        "broker restart: {during} samples from the 5 s outage, seqs {first}..={last} contiguous"
    );
    // 5 s at 500 ms: ~10 samples; a loaded machine skips some ticks.
    assert!(during >= 5, "only {during} samples from the outage");

    // Every metrics frame reached the conductor's history; nothing dropped.
    let metrics: Vec<u64> = seen
        .iter()
        .filter(|(_, (_, b))| matches!(b, Body::Metrics(_) | Body::MetricsBatch(_)))
        .map(|(seq, _)| *seq)
        .collect();
    let last_metrics = *metrics.last().unwrap();
    wait_for("the conductor caught up", SECS(20), || {
        history(&c, &id).contains_key(&last_metrics).then_some(())
    });
    let stored = history(&c, &id);
    for seq in &metrics {
        assert!(stored.contains_key(seq), "metrics seq {seq} lost");
    }
    assert!(
        stored.values().all(|(_, dropped)| *dropped == 0),
        "the outbox dropped frames: {stored:?}"
    );

    // Converged: online, commands work, the service never restarted.
    wait_online(&c, &id, SECS(20));
    wait_for("a command after the restart", SECS(20), || {
        let (status, body) = c.post(
            &format!("/api/v1/workers/{id}/commands"),
            &json!({"action": "ping"}),
        );
        (status == 200 && body["status"] == "ok").then_some(())
    });
    assert_eq!(pids_with(&mark), vec![pid], "the service kept its pid");
    assert_eq!(pid_of(&c, "steady", &id), pid);
    watch.assert_never_more_than(1, "broker restart");
    assert!(w.proc.alive(), "worker died:\n{}", w.proc.tail(30));
}

// ---- 2. conductor kill -9 mid-ingest ----

/// Three workers stream metrics every 100 ms while services, deployments,
/// labels and a rollout are written through the API; the conductor is
/// killed with -9 right after the last 2xx and started again on the same
/// data dir and ports. The SQLite file passes `integrity_check`, every
/// acknowledged write is there, every metrics frame a worker published
/// before the kill (seen by a sniffer on the embedded broker: contiguous
/// seqs up to the last one) is in the history after the restart, re-sent
/// frames count as `duplicate` and none as `replayed`, the workers
/// reconnect, and every service runs exactly once per target with its pid
/// unchanged.
#[test]
fn conductor_kill9_mid_ingest_loses_no_acknowledged_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| {
            let mut opts = WorkerOpts::named(&format!("ingest-{i}"));
            opts.interval_ms = 100;
            opts.extra = vec!["--label".into(), "role=edge".into()];
            start_worker(dir.path(), &c, &token, &format!("w{i}"), opts)
        })
        .collect();
    let ids: Vec<String> = workers.iter_mut().map(|w| w.wait_id()).collect();
    let secrets: Vec<protocol::Secret> = workers.iter().map(|w| w.secret()).collect();
    for id in &ids {
        wait_online(&c, id, SECS(30));
    }
    // Every frame the workers publish, as the embedded broker routes it.
    let (obs_user, obs_pass) = c.observer();
    let sniffer = MqttClient::connect_with(
        c.mqtt,
        "chaos-sniffer",
        Some((&obs_user, &obs_pass)),
        &["aerekos/v1/+/+"],
    )
    .unwrap();

    // A service everywhere (by label) and one being rolled out.
    let steady = unique_marker("chaos-steady");
    let rolling = unique_marker("chaos-rolling");
    let steady_watch = CopyWatch::start(&steady);
    let rolling_watch = CopyWatch::start(&rolling);
    create_service(&c, &sleep_spec("steady", &steady));
    deploy(&c, "steady", &json!({"labels": {"role": "edge"}}));
    create_service(&c, &sleep_spec("rolling", &format!("{rolling}-v1")));
    deploy(
        &c,
        "rolling",
        &json!({"workers": ids, "rollout": {"canary": 1, "settle_s": 3600}}),
    );
    for id in &ids {
        wait_for("steady and rolling up", SECS(30), || {
            (is_up(&state_of(&c, "steady", id)) && is_up(&state_of(&c, "rolling", id)))
                .then_some(())
        });
    }
    let steady_pids: BTreeSet<u32> = ids.iter().map(|id| pid_of(&c, "steady", id)).collect();
    assert_eq!(steady_pids.len(), 3);
    // v2 starts a rollout that stays in progress (one hour to settle).
    create_service(&c, &sleep_spec("rolling", &format!("{rolling}-v2")));
    let (status, body) = c.put(
        "/api/v1/services/rolling/deployment",
        &json!({"version": 2, "workers": ids}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rollout"]["to_version"], 2, "{body}");
    let rollout_id = body["rollout"]["id"].clone();

    // Writes acknowledged while ingest runs at full speed. (A deployment
    // created `stopped` is installed stopped and never runs; the watch
    // kills any copy at the end all the same.)
    let extra = unique_marker("chaos-extra");
    let _extra_cleanup = CopyWatch::start(&extra);
    let mut labels: BTreeMap<String, Value> = BTreeMap::new();
    for round in 0..8 {
        let name = format!("extra-{round}");
        create_service(&c, &sleep_spec(&name, &format!("{extra}-r{round}")));
        deploy(
            &c,
            &name,
            &json!({"workers": [ids[round % 3]], "desired_state": "stopped"}),
        );
        let id = &ids[round % 3];
        let l = json!({"role": "edge", "batch": format!("b{round}")});
        let (status, body) = c.put(&format!("/api/v1/workers/{id}/labels"), &l);
        assert_eq!(status, 200, "{body}");
        labels.insert(id.clone(), l);
    }
    // What the API has shown is committed.
    for id in &ids {
        wait_for("ingest running", SECS(30), || {
            (history(&c, id).len() >= 3).then_some(())
        });
    }
    let shown: Vec<BTreeSet<u64>> = ids
        .iter()
        .map(|id| history(&c, id).keys().copied().collect())
        .collect();

    // What the workers publish, per worker: seq → is it a metrics frame.
    let mut published: Vec<BTreeMap<u64, bool>> = vec![BTreeMap::new(); ids.len()];
    // Records one sniffed message; returns the worker index and seq of a
    // metrics frame.
    let mut record = |topic: &str, payload: &[u8], retained: bool| -> Option<(usize, u64)> {
        let i = ids
            .iter()
            .position(|id| topic.starts_with(&format!("aerekos/v1/{id}/")))?;
        // The worker's own stream only: not its status text, not the
        // conductor's commands (their own seq stream) or JSON mirror, not a
        // retained frame from before the sniffer subscribed.
        if retained
            || topic.ends_with("/status")
            || topic.ends_with("/cmd")
            || topic.contains("/json/")
        {
            return None;
        }
        let env = protocol::open(payload, &ids[i])
            .unwrap()
            .verify(&secrets[i])
            .unwrap();
        let metrics = matches!(env.body, Body::Metrics(_) | Body::MetricsBatch(_));
        published[i].insert(env.seq, metrics);
        metrics.then_some((i, env.seq))
    };
    // Kill the conductor the moment the broker routes a metrics frame newer
    // than anything the API has shown: the conductor received it at the same
    // time and commits it within 100 ms, so it is most likely not committed
    // yet (the window a PubAck alone used to lose).
    let deadline = Instant::now() + SECS(20);
    loop {
        let (topic, payload, retained) =
            sniffer.recv(Duration::from_millis(100)).unwrap_or_default();
        if let Some((i, seq)) = record(&topic, &payload, retained) {
            if shown[i].iter().all(|s| *s < seq) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no fresh metrics frame on the broker"
        );
    }
    c.proc.kill9();
    // What the broker had routed before the kill.
    while let Some((topic, payload, retained)) = sniffer.recv(Duration::from_millis(500)) {
        record(&topic, &payload, retained);
    }
    drop(sniffer);
    for (i, p) in published.iter().enumerate() {
        let seqs: Vec<u64> = p.keys().copied().collect();
        let (first, last) = (seqs[0], *seqs.last().unwrap());
        eprintln!(
            "conductor kill -9: {}: seqs {first}..={last} published before the kill",
            ids[i]
        );
        assert_eq!(
            seqs.len() as u64,
            last - first + 1,
            "{}: seqs on the broker contiguous from {first} to {last}: {seqs:?}",
            ids[i]
        );
    }
    // The store opens cleanly after the crash.
    {
        let db = rusqlite::Connection::open(c.data_dir.join("conductor.db")).unwrap();
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
    assert_eq!(
        pids_with(&steady).len(),
        3,
        "services outlive the conductor"
    );
    c.restart_after_kill9();

    // Every acknowledged write is there.
    for round in 0..8 {
        let name = format!("extra-{round}");
        let (status, body) = c.get(&format!("/api/v1/services/{name}"));
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["versions"].as_array().unwrap().len(), 1, "{body}");
        assert_eq!(body["deployment"]["desired_state"], "stopped", "{body}");
        assert_eq!(
            body["deployment"]["workers"],
            json!([ids[round % 3]]),
            "{body}"
        );
    }
    let (status, body) = c.get("/api/v1/services/steady");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deployment"]["labels"], json!({"role": "edge"}));
    let (status, body) = c.get("/api/v1/services/rolling");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["versions"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(body["rollout"]["id"], rollout_id, "{body}");
    assert_eq!(body["rollout"]["to_version"], 2, "{body}");
    assert_eq!(body["rollout"]["state"], "in_progress", "{body}");
    let listed: BTreeSet<String> = c
        .workers()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_string())
        .collect();
    for (id, l) in &labels {
        assert!(listed.contains(id), "worker {id} lost: {listed:?}");
        assert_eq!(&c.worker(id)["labels"], l, "labels of {id}");
    }
    for (id, before) in ids.iter().zip(&shown) {
        let after = history(&c, id);
        let lost: Vec<&u64> = before.iter().filter(|s| !after.contains_key(s)).collect();
        assert!(
            lost.is_empty(),
            "metrics of {id} shown before the crash, lost: {lost:?}"
        );
    }

    // Converges: online, fresh metrics, services reported with the same pids.
    for (i, (id, before)) in ids.iter().zip(&shown).enumerate() {
        wait_online(&c, id, SECS(30));
        let newest = *before.iter().max().unwrap();
        let last_published = *published[i].keys().last().unwrap();
        wait_for("metrics after the restart", SECS(20), || {
            history(&c, id)
                .keys()
                .any(|s| *s > newest.max(last_published) + 5)
                .then_some(())
        });
        // Every metrics frame published before the kill is there, also those
        // the broker had acknowledged and the conductor not yet committed.
        let after = history(&c, id);
        let metrics: Vec<u64> = published[i]
            .iter()
            .filter(|(_, is_metrics)| **is_metrics)
            .map(|(seq, _)| *seq)
            .collect();
        let at_risk = metrics.iter().filter(|s| **s > newest).count();
        let lost: Vec<&u64> = metrics.iter().filter(|s| !after.contains_key(s)).collect();
        eprintln!(
            "conductor kill -9: {id}: {} metrics frames published before the kill \
             ({at_risk} newer than the API had shown), {} lost",
            metrics.len(),
            lost.len()
        );
        assert!(
            lost.is_empty(),
            "{id}: metrics frames published before the kill, lost: {lost:?}"
        );
        wait_for("steady reported again", SECS(20), || {
            is_up(&state_of(&c, "steady", id)).then_some(())
        });
    }
    // The workers' re-sends of what the conductor had stored are benign.
    let duplicates = c.rejected("duplicate");
    eprintln!("conductor kill -9: {duplicates} re-sent frames counted as duplicate");
    assert_eq!(
        c.rejected("replayed") + c.rejected("too_old"),
        0.0,
        "re-sent frames counted as replays ({duplicates} as duplicates)"
    );
    let after: BTreeSet<u32> = ids.iter().map(|id| pid_of(&c, "steady", id)).collect();
    assert_eq!(
        after, steady_pids,
        "the conductor restart restarted no service"
    );
    assert_eq!(pids_with(&steady).len(), 3);
    // The rollout converges: the canary runs v2, the others still v1.
    let procs: Vec<&Proc> = std::iter::once(&c.proc)
        .chain(workers.iter().map(|w| &w.proc))
        .collect();
    wait_logged(
        "the canary runs v2, the others v1",
        SECS(30),
        &procs,
        || {
            let v1 = pids_with(&format!("{rolling}-v1")).len();
            let v2 = pids_with(&format!("{rolling}-v2")).len();
            (v1 == 2 && v2 == 1).then_some(())
        },
    );
    steady_watch.assert_never_more_than(3, "conductor kill -9");
    rolling_watch.assert_never_more_than(3, "conductor kill -9");
    for w in &mut workers {
        assert!(w.proc.alive(), "worker died:\n{}", w.proc.tail(30));
    }
}

// ---- 3. worker kill -9 mid-deploy ----

/// An artifact service (the workspace's `test-service`) is deployed and the
/// worker is killed with -9 at several delays after the deploy was accepted
/// (before, during and after the manifest and artifact downloads and the
/// spawn), then started again. Each round: never two copies, exactly one
/// copy in the end whose pid the conductor reports and the pid file names,
/// and none left after the undeploy.
#[test]
fn worker_kill9_mid_deploy_runs_the_service_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut w = start_worker(
        dir.path(),
        &c,
        &token,
        "w",
        WorkerOpts::named("deploy-kill"),
    );
    let id = w.wait_id();
    wait_online(&c, &id, SECS(30));
    let sha = cli_json(
        &c,
        &[
            "artifact",
            "upload",
            bin("test-service").to_str().unwrap(),
            "--arch",
            std::env::consts::ARCH,
        ],
    )["sha256"]
        .as_str()
        .unwrap()
        .to_string();

    for (round, delay_ms) in [0u64, 20, 60, 120, 250, 500, 1000].into_iter().enumerate() {
        let name = format!("kd-{round}");
        let tag = unique_marker(&format!("chaos-kd{round}"));
        let watch = CopyWatch::start(&tag);
        create_service(
            &c,
            &json!({"name": name, "artifacts": {std::env::consts::ARCH: sha},
                    "args": ["--tag", tag, "--tick-ms", "1000"],
                    "restart": "always", "max_restarts": 10, "restart_window_s": 60,
                    "backoff_ms": 200}),
        );
        deploy(&c, &name, &json!({"workers": [id]}));
        std::thread::sleep(Duration::from_millis(delay_ms));
        w.restart();

        let context = format!("round {round}, killed {delay_ms} ms after the deploy");
        let deadline = Instant::now() + SECS(40);
        loop {
            let state = actual(&c, &name, &id);
            let pids = pids_with(&tag);
            let up = state
                .as_ref()
                .is_some_and(|a| is_up(a["state"].as_str().unwrap_or("")));
            if up && pids.len() == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: not running once after 40 s: actual {state:?}, copies {}\nworker log:\n{}",
                describe(&pids),
                w.proc.tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Stays at one copy (a late duplicate would show up here).
        std::thread::sleep(Duration::from_millis(1500));
        let pids = pids_with(&tag);
        assert_eq!(pids.len(), 1, "{context}: {}", describe(&pids));
        assert_eq!(pid_of(&c, &name, &id), pids[0], "{context}: reported pid");
        let pid_file =
            std::fs::read_to_string(w.state_dir.join("services").join(&name).join("pid"))
                .unwrap_or_default();
        assert!(
            pid_file.contains(&pids[0].to_string()),
            "{context}: pid file {pid_file:?} names {}",
            pids[0]
        );
        watch.assert_never_more_than(1, &context);

        let (status, body) = c.delete(&format!("/api/v1/services/{name}/deployment"));
        assert_eq!(status, 200, "{body}");
        wait_for(
            &format!("{context}: no copy after undeploy"),
            SECS(20),
            || pids_with(&tag).is_empty().then_some(()),
        );
        wait_for(
            &format!("{context}: conductor sees it removed"),
            SECS(20),
            || actual(&c, &name, &id).is_none().then_some(()),
        );
        watch.assert_never_more_than(1, &context);
    }
    assert!(w.proc.alive(), "worker died:\n{}", w.proc.tail(30));
}

// ---- 4. worker cut off ----

/// The worker reaches the broker through a proxy that black-holes the link
/// for `AEREKOS_CHAOS_CUT_S` seconds (default 60) without closing it. The
/// conductor marks it offline within three intervals (plus margin); a
/// command sent meanwhile fails with 504 and is not run later; the samples
/// taken during the cut arrive after it, none dropped; the worker is online
/// again and its service ran throughout with one pid.
#[test]
fn worker_cut_off_buffers_metrics_and_its_service_runs_throughout_once() {
    let cut_s: u64 = std::env::var("AEREKOS_CHAOS_CUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let proxy = BlackHoleProxy::start(c.mqtt);
    let token = c.registration_token();
    let interval_ms = 1000u64;
    let mut opts = WorkerOpts::named("cut-off");
    opts.interval_ms = interval_ms;
    opts.extra = vec!["--mqtt-url".into(), proxy.mqtt_url()];
    let mut w = start_worker(dir.path(), &c, &token, "w", opts);
    let id = w.wait_id();
    wait_online(&c, &id, SECS(30));

    let mark = unique_marker("chaos-cut");
    let watch = CopyWatch::start(&mark);
    create_service(&c, &sleep_spec("steady", &mark));
    deploy(&c, "steady", &json!({"workers": [id]}));
    wait_for("steady running", SECS(30), || {
        is_up(&state_of(&c, "steady", &id)).then_some(())
    });
    let pid = pid_of(&c, "steady", &id);
    wait_for("a few samples", SECS(20), || {
        (history(&c, &id).len() >= 3).then_some(())
    });

    proxy.cut();
    let cut_at = Instant::now();
    let cut_uptime = uptime_s();
    wait_for("offline after the cut", SECS(20), || {
        (c.status_of(&id) == "offline").then_some(())
    });
    let took = cut_at.elapsed();
    eprintln!("cut off: offline after {took:?} (interval {interval_ms} ms)");
    // Offline after more than 3 intervals without a good frame (liveness
    // ticker ≤ 250 ms); 2 s of margin for a loaded machine.
    assert!(
        took <= Duration::from_millis(3 * interval_ms + 2000),
        "offline only after {took:?}"
    );

    // One-shot commands while cut off fail clearly.
    let started = Instant::now();
    let (status, body) = c.post(
        &format!("/api/v1/workers/{id}/commands"),
        &json!({"action": "ping"}),
    );
    assert_eq!(status, 504, "ping while cut off: {body}");
    assert!(body.to_string().contains("no reply"), "{body}");
    assert!(started.elapsed() < SECS(15), "took {:?}", started.elapsed());
    let (status, body) = c.post(
        &format!("/api/v1/workers/{id}/services/steady/restart"),
        &json!({}),
    );
    assert_eq!(status, 504, "restart while cut off: {body}");

    let left = Duration::from_secs(cut_s).saturating_sub(cut_at.elapsed());
    std::thread::sleep(left);
    assert_eq!(
        c.status_of(&id),
        "offline",
        "still offline at the end of the cut"
    );
    assert_eq!(
        pids_with(&mark),
        vec![pid],
        "the service runs during the cut"
    );
    proxy.restore();
    let restored_uptime = uptime_s();
    let restored_at = Instant::now();

    // Reconnects (backoff is capped at 30 s), then delivers its queue first.
    wait_for("online again", SECS(90), || {
        (c.status_of(&id) == "online").then_some(())
    });
    eprintln!(
        "cut off: online again {:?} after the restore",
        restored_at.elapsed()
    );
    // fits: host uptime in seconds, positive and far below 2^53; the
    // fraction is dropped on purpose.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let after = restored_uptime as u64 + 2;
    wait_for("samples taken after the restore", SECS(30), || {
        history(&c, &id)
            .values()
            .any(|(up, _)| *up > after)
            .then_some(())
    });
    let stored = history(&c, &id);
    let during = stored
        .values()
        .filter(|(up, _)| (*up as f64) > cut_uptime + 1.0 && (*up as f64) < restored_uptime - 1.0)
        .count();
    let expected = (cut_s * 1000 / interval_ms).saturating_sub(2);
    eprintln!("cut off: {during} samples taken during the {cut_s} s cut delivered");
    assert!(
        during as u64 * 10 >= expected * 7,
        "{during} samples from the {cut_s} s cut (about {expected} expected)"
    );
    assert!(
        stored.values().all(|(_, dropped)| *dropped == 0),
        "the outbox dropped frames"
    );

    // The service ran throughout, once, and the restart sent during the cut
    // was not run late.
    ping_ok(&c, &id);
    std::thread::sleep(SECS(2));
    assert_eq!(pids_with(&mark), vec![pid], "one copy, same pid");
    assert_eq!(pid_of(&c, "steady", &id), pid);
    assert!(is_up(&state_of(&c, "steady", &id)));
    watch.assert_never_more_than(1, "cut off");
    assert!(w.proc.alive(), "worker died:\n{}", w.proc.tail(30));
}

// ---- 5. clock jumps on a worker ----

/// The worker runs under libfaketime; its wall clock jumps one hour forward,
/// then two hours back (one hour behind the real time). Frames keep being
/// accepted (no replay or tag rejection), the worker never looks stale or
/// offline to the conductor, the health-checked service stays healthy with
/// its pid, a crash is restarted after its short backoff (monotonic), a
/// worker restart adopts the service (process start times, not clocks), and
/// a `kill -9` is still detected as offline in time.
#[test]
fn clock_jumps_on_a_worker_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let clock = FakeClock::new(&dir.path().join("clock"));
    let mut program = clock.program_prefix();
    program.push(bin("edge-worker").to_string_lossy().into_owned());
    let program: Vec<&str> = program.iter().map(String::as_str).collect();
    let interval_ms = 500u64;
    let mut opts = WorkerOpts::named("clock");
    opts.interval_ms = interval_ms;
    let mut w = Worker::start_with_program(
        &program,
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        opts,
    );
    let id = w.wait_id();
    wait_online(&c, &id, SECS(30));

    let tag = unique_marker("chaos-clock");
    let watch = CopyWatch::start(&tag);
    let port = free_port();
    create_service(
        &c,
        &json!({"name": "probe", "command": bin("test-service").to_str().unwrap(),
                "args": ["--port", port.to_string(), "--tag", tag, "--tick-ms", "1000"],
                "restart": "always", "max_restarts": 10, "restart_window_s": 60,
                "backoff_ms": 300,
                "health": {"http": {"port": port, "path": "/healthz"},
                           "interval_ms": 300, "timeout_ms": 1000, "retries": 3}}),
    );
    deploy(&c, "probe", &json!({"workers": [id]}));
    wait_for("probe healthy", SECS(30), || {
        (state_of(&c, "probe", &id) == "healthy").then_some(())
    });
    let pid = pid_of(&c, "probe", &id);
    let rejected = |c: &Conductor| -> f64 {
        ["replayed", "too_old", "bad_tag", "topic_mismatch"]
            .iter()
            .map(|r| c.rejected(r))
            .sum()
    };
    let rejected_before = rejected(&c);

    // Each jump: 4 s of polling; online throughout, metrics flowing.
    let check_period = |what: &str| {
        let before = history(&c, &id).len();
        let deadline = Instant::now() + SECS(4);
        while Instant::now() < deadline {
            let status = c.status_of(&id);
            assert_eq!(status, "online", "{what}: worker {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let grew = history(&c, &id).len() - before;
        assert!(grew >= 4, "{what}: only {grew} new samples in 4 s");
        assert_eq!(rejected(&c), rejected_before, "{what}: frames rejected");
        assert_eq!(state_of(&c, "probe", &id), "healthy", "{what}");
        assert_eq!(pids_with(&tag), vec![pid], "{what}: same single copy");
    };
    clock.set_offset_s(3600);
    check_period("an hour ahead");
    ping_ok(&c, &id);
    clock.set_offset_s(-3600);
    check_period("two hours back (an hour behind)");
    ping_ok(&c, &id);

    // A crash under the shifted clock: restarted after its 300 ms backoff.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let crashed = Instant::now();
    let restarted = wait_for("probe restarted", SECS(20), || {
        let pids = pids_with(&tag);
        (pids.len() == 1 && pids[0] != pid).then(|| pids[0])
    });
    eprintln!(
        "clock jumps: crash restarted after {:?} (backoff 300 ms)",
        crashed.elapsed()
    );
    assert!(
        crashed.elapsed() < SECS(10),
        "restart took {:?}",
        crashed.elapsed()
    );
    wait_for("probe healthy again", SECS(20), || {
        (state_of(&c, "probe", &id) == "healthy" && pid_of(&c, "probe", &id) == restarted)
            .then_some(())
    });

    // A worker restart under the shifted clock adopts the running copy.
    w.restart();
    wait_for("online after the worker restart", SECS(30), || {
        (c.status_of(&id) == "online" && c.worker(&id)["metrics"].is_object()).then_some(())
    });
    wait_for("probe reported after the restart", SECS(20), || {
        (state_of(&c, "probe", &id) == "healthy").then_some(())
    });
    assert_eq!(pids_with(&tag), vec![restarted], "adopted, not restarted");
    assert_eq!(pid_of(&c, "probe", &id), restarted);
    assert_eq!(
        rejected(&c),
        rejected_before,
        "frames rejected after the restart"
    );

    // The conductor's offline detection uses its own clock.
    clock.set_offset_s(3600);
    std::thread::sleep(Duration::from_millis(1000));
    w.proc.kill9();
    let killed = Instant::now();
    wait_for("offline after kill -9", SECS(15), || {
        (c.status_of(&id) == "offline").then_some(())
    });
    eprintln!("clock jumps: offline {:?} after kill -9", killed.elapsed());
    assert!(
        killed.elapsed() <= Duration::from_millis(3 * interval_ms + 2000),
        "offline after {:?}",
        killed.elapsed()
    );
    watch.assert_never_more_than(1, "clock jumps");
}
