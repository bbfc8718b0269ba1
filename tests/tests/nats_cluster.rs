//! The scale-out bus: a three-node NATS cluster (JetStream, the MQTT
//! gateway on every node), PostgreSQL, an active and a standby conductor
//! and a real agent, all real processes, NATS in operator mode (a login per
//! worker, signed by the conductors). Both conductors and the agent are
//! given every node (`--mqtt-url mqtt://…@a,b,c`; the agent gets the list
//! at enrolment). A NATS node is killed under everyone, then the active
//! conductor, then another node after the first is back, then PostgreSQL
//! is restarted: frames keep being stored exactly once with none lost,
//! commands and deploys keep working through the survivors, the service
//! never runs twice, the lease changes hands once.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::time::{Duration, Instant};

use e2e::nats::NatsCluster;
use e2e::services::{create_service, deploy, pid_of, state_of};
use e2e::*;
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The seq of the last metrics frame `c` stored for `id` (waiting out 503s).
fn seq(c: &Conductor, id: &str) -> u64 {
    wait_for("the worker's last seq", SECS(30), || {
        let (status, v) = c.get(&format!("/api/v1/workers/{id}"));
        (status == 200).then(|| v["metrics"]["seq"].as_u64().unwrap_or(0))
    })
}

/// Waits until `c` has stored `more` metrics frames past what it had (the
/// API may answer 503 meanwhile, while its store is unavailable).
fn frames_flow(what: &str, c: &Conductor, id: &str, more: u64) {
    let from = seq(c, id);
    wait_for(what, SECS(30), || {
        let (status, v) = c.get(&format!("/api/v1/workers/{id}"));
        assert!(status == 200 || status == 503, "{status} {v}");
        (v["status"] == "online" && v["metrics"]["seq"].as_u64() > Some(from + more)).then_some(())
    });
}

#[test]
fn the_fleet_rides_out_a_nats_node_and_the_active_conductor_dying() {
    let Some(mut pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Operator mode: every worker gets a NATS login of its own, which
    // every node accepts (nats_logins.rs tests what it allows).
    let Some((mut nats, seed)) = NatsCluster::start_operator(&dir.path().join("nats"), 3) else {
        return;
    };
    let store = pg.create_database("fleet");
    let bus = nats.conductor_url();
    let seed = seed.display().to_string();
    let args = [
        "--mqtt-url",
        &bus,
        "--store",
        &store,
        "--nats-account-seed",
        &seed,
    ];
    let env: [(&str, &str); 0] = [];
    let mut a = Conductor::start_with_env(&dir.path().join("a"), &args, &env);
    let token = a.registration_token();
    let mut w = Worker::start(
        &dir.path().join("pi"),
        &a.url(),
        Some(&token),
        WorkerOpts::named("pi"),
    );
    let id = w.wait_id();
    frames_flow("the worker online on A", &a, &id, 3);
    // The agent was handed every node.
    let state = std::fs::read_to_string(w.state_dir.join("state.json")).unwrap();
    for i in 0..3 {
        assert!(
            state.contains(&format!("127.0.0.1:{}", nats.mqtt_port(i))),
            "node {i} missing from the worker's broker list: {state}"
        );
    }

    create_service(
        &a,
        &json!({"name": "sleeper", "command": "/bin/sleep", "args": ["4718"]}),
    );
    deploy(&a, "sleeper", &json!({"workers": [id]}));
    let pid = wait_for("sleeper running", SECS(30), || {
        Some(pid_of(&a, "sleeper", &id)).filter(|p| *p != 0)
    });

    // Node 0 is everyone's first: kill it under the agent and A.
    let killed = Instant::now();
    nats.kill9(0);
    frames_flow("frames through the surviving nodes", &a, &id, 5);
    eprintln!(
        "NATS node killed: frames stored again after {:?}",
        killed.elapsed()
    );
    assert!(
        w.proc.output().contains("trying the next broker"),
        "{}",
        w.proc.tail(30)
    );
    assert!(
        a.proc.output().contains("trying the next broker node"),
        "{}",
        a.proc.tail(30)
    );
    // Commands reach the worker through the survivors.
    create_service(
        &a,
        &json!({"name": "second", "command": "/bin/sleep", "args": ["4719"]}),
    );
    deploy(&a, "second", &json!({"workers": [id]}));
    wait_for("a deploy through the survivors", SECS(30), || {
        (state_of(&a, "second", &id) == "running").then_some(())
    });

    // A standby on A's HTTP address and TLS material; then A dies.
    let standby = a.standby(&dir.path().join("b"), &args, &env);
    let killed = Instant::now();
    a.proc.kill9();
    let b = standby.join().unwrap();
    eprintln!("takeover: {:?} from kill -9 to B serving", killed.elapsed());
    frames_flow("frames stored by B", &b, &id, 5);

    // Node 0 back, node 1 down: everyone moves again.
    nats.restart(0);
    nats.kill9(1);
    frames_flow("frames after the second node failure", &b, &id, 5);
    create_service(
        &b,
        &json!({"name": "third", "command": "/bin/sleep", "args": ["4720"]}),
    );
    deploy(&b, "third", &json!({"workers": [id]}));
    wait_for(
        "a deploy through B after the second failure",
        SECS(30),
        || (state_of(&b, "third", &id) == "running").then_some(()),
    );

    // PostgreSQL killed and started again under B: it holds its writes,
    // takes the lease again and carries on.
    pg.kill();
    std::thread::sleep(SECS(2));
    pg.start_again();
    frames_flow("frames after PostgreSQL's restart", &b, &id, 5);

    // Exactly once, the lease A's then B's (taken again by B after the
    // restart), one sleeper with its first pid.
    let counts = pg.psql(
        "fleet",
        &format!("SELECT count(*), count(DISTINCT seq) FROM metrics_raw WHERE worker_id = '{id}'"),
    );
    let (rows, distinct) = counts.split_once('|').unwrap();
    assert_eq!(rows, distinct, "a frame stored twice: {counts}");
    assert_eq!(
        pg.psql("fleet", "SELECT epoch FROM aerekos_lease"),
        "3",
        "A's lease, then B's, then B's again"
    );
    assert_eq!(state_of(&b, "sleeper", &id), "running");
    assert_eq!(pid_of(&b, "sleeper", &id), pid, "the service was restarted");
    let sleepers = std::process::Command::new("pgrep")
        .args(["-c", "-f", "^/bin/sleep 4718$"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sleepers.stdout).trim(),
        "1",
        "the service runs exactly once"
    );
    // Nothing lost across three outages: the agent samples every 300 ms
    // whatever the link, so a lost stretch of frames is a gap in the stored
    // metrics' seqs. What lies between two metrics frames otherwise is a
    // reconnect's birth, board, statuses and events, and deploy replies.
    let gap = pg.psql(
        "fleet",
        &format!(
            "SELECT max(seq - prev) FROM (SELECT seq, lag(seq) OVER (ORDER BY seq) AS prev \
             FROM metrics_raw WHERE worker_id = '{id}') t"
        ),
    );
    eprintln!("largest gap between stored metrics frames: {gap} seqs ({counts} rows)");
    assert!(
        gap.parse::<u64>().unwrap() <= 15,
        "frames lost: a gap of {gap} seqs"
    );
    w.proc.kill9();
}
