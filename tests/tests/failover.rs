//! Active/standby conductors on one PostgreSQL store (`--store
//! postgres://…`) and one Mosquitto: the active one is killed with
//! `kill -9` while a real agent sends metrics; the standby takes the lease,
//! loads the fleet from the store and carries on, and no frame is stored
//! twice.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::time::{Duration, Instant};

use e2e::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn a_standby_conductor_takes_over_when_the_active_one_is_killed() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let args = ["--mqtt-url", &broker.url(), "--store", &url];
    let mut a = Conductor::start_with(&dir.path().join("a"), &args);
    let token = a.registration_token();
    let mut w = Worker::start(
        &dir.path().join("pi"),
        &a.url(),
        Some(&token),
        WorkerOpts::named("pi"),
    );
    let id = w.wait_id();
    wait_for("the worker online on A", SECS(20), || {
        let v = a.worker(&id);
        (v["status"] == "online" && v["metrics"]["seq"].as_u64() > Some(3)).then_some(())
    });

    // B starts while A is active: it stands by, opening no port.
    let b_dir = dir.path().join("b");
    let standby = {
        let (b_dir, args) = (b_dir.clone(), args.map(str::to_string));
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Conductor::start_with(&b_dir, &args)
        })
    };
    wait_for("B standing by", SECS(20), || {
        std::fs::read_to_string(b_dir.join("conductor.log"))
            .ok()
            .filter(|log| log.contains("standby"))
    });
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(
        !b_dir.join("runtime.json").exists() && !standby.is_finished(),
        "B must not start while A holds the lease"
    );
    let seq_on_a = a.worker(&id)["metrics"]["seq"].as_u64().unwrap();

    let killed = Instant::now();
    a.proc.kill9();
    let b = standby.join().unwrap();
    let takeover = killed.elapsed();
    eprintln!("takeover: {takeover:?} from kill -9 to B serving");
    assert!(takeover < SECS(15), "took {takeover:?}");
    let log = std::fs::read_to_string(b_dir.join("conductor.log")).unwrap();
    assert!(log.contains("lease taken"), "{log}");

    // B knows the fleet from the store and gets the agent's new frames
    // through the broker (it resumes the conductor's MQTT session).
    wait_for("the worker online on B, sending", SECS(20), || {
        let v = b.worker(&id);
        (v["status"] == "online" && v["metrics"]["seq"].as_u64() > Some(seq_on_a + 5)).then_some(())
    });
    let counts = pg.psql(
        "fleet",
        &format!("SELECT count(*), count(DISTINCT seq) FROM metrics_raw WHERE worker_id = '{id}'"),
    );
    let (rows, distinct) = counts.split_once('|').unwrap();
    assert_eq!(rows, distinct, "a frame stored twice: {counts}");
    assert!(
        rows.parse::<u64>().unwrap() > seq_on_a,
        "frames from both conductors are stored: {counts}"
    );
    assert_eq!(
        pg.psql("fleet", "SELECT epoch FROM aerekos_lease"),
        "2",
        "A's lease, then B's"
    );
    w.proc.kill9();
}
