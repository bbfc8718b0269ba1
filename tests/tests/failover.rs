//! Active/standby conductors on one PostgreSQL store (`--store
//! postgres://…`) and one Mosquitto: the active one is killed with
//! `kill -9` while a real agent sends metrics and hosts a service; the
//! standby — same TLS material, an HTTP address of its own (it opens no
//! port until it takes over), the second in the agent's `--conductor`
//! list — takes the lease, loads the fleet from the store and carries on:
//! no frame stored twice, the service not started again, a new deploy
//! through it runs (the agent fetches its manifest from B).

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::time::{Duration, Instant};

use e2e::services::{create_service, deploy, pid_of, state_of};
use e2e::*;
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Conductor A in `dir/a` with `args` and an agent (`dir/pi`) enrolled
/// with it, online and sending; the agent's `--conductor` list is A's
/// address, then a free one for a standby (returned).
fn active_with_worker(
    dir: &std::path::Path,
    args: &[&str],
) -> (Conductor, Worker, String, std::net::SocketAddr) {
    let a = Conductor::start_with(&dir.join("a"), args);
    let token = a.registration_token();
    let b_http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut w = Worker::start(
        &dir.join("pi"),
        &format!("{},http://{b_http}", a.url()),
        Some(&token),
        WorkerOpts::named("pi"),
    );
    let id = w.wait_id();
    wait_for("the worker online on A", SECS(20), || {
        let v = a.worker(&id);
        (v["status"] == "online" && v["metrics"]["seq"].as_u64() > Some(3)).then_some(())
    });
    (a, w, id, b_http)
}

#[test]
fn a_standby_conductor_takes_over_when_the_active_one_is_killed() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    // A backend notices at once that its conductor died (PostgreSQL's
    // default notices only when it next talks to it): A's batch that waits
    // on a lock below is then rolled back, as a crash mid-commit would.
    pg.psql(
        "fleet",
        "ALTER DATABASE fleet SET client_connection_check_interval = '100ms'",
    );
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let args = ["--mqtt-url", &broker.url(), "--store", &url];
    let (mut a, mut w, id, b_http) = active_with_worker(dir.path(), &args);

    // A service on the worker, deployed through A.
    create_service(
        &a,
        &json!({"name": "sleeper", "command": "/bin/sleep", "args": ["4717"]}),
    );
    deploy(&a, "sleeper", &json!({"workers": [id]}));
    let pid = wait_for("sleeper running", SECS(30), || {
        Some(pid_of(&a, "sleeper", &id)).filter(|p| *p != 0)
    });

    // B starts while A is active: it stands by, opening no port. It shares
    // A's TLS material; its HTTP address is its own, the agent's second.
    let b_dir = dir.path().join("b");
    let standby = a.standby_on(&b_dir, b_http, &args, &[]);
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(
        !b_dir.join("runtime.json").exists() && !standby.is_finished(),
        "B must not start while A holds the lease"
    );
    let seq_on_a = a.worker(&id)["metrics"]["seq"].as_u64().unwrap();

    // A dies with frames received and not committed: the metrics table is
    // locked for 5 s, so A's writer waits, and A is killed 2 s in. The
    // broker must hand those frames to B (A acknowledged none of them to
    // it); acknowledged on receipt, B's `Stored` would cover them unstored.
    let (b, takeover) = std::thread::scope(|scope| {
        scope.spawn(|| {
            pg.psql(
                "fleet",
                "BEGIN; LOCK TABLE metrics_raw IN ACCESS EXCLUSIVE MODE; \
                 SELECT pg_sleep(5); COMMIT;",
            )
        });
        std::thread::sleep(SECS(2));
        let killed = Instant::now();
        a.proc.kill9();
        let b = standby.join().unwrap();
        (b, killed.elapsed())
    });
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
    wait_for("B's frames committed", SECS(20), || {
        let n = pg.psql(
            "fleet",
            &format!(
                "SELECT count(*) FROM metrics_raw WHERE worker_id = '{id}' AND seq > {}",
                seq_on_a + 5
            ),
        );
        (n != "0").then_some(())
    });
    let counts = pg.psql(
        "fleet",
        &format!("SELECT count(*), count(DISTINCT seq) FROM metrics_raw WHERE worker_id = '{id}'"),
    );
    let (rows, distinct) = counts.split_once('|').unwrap();
    assert_eq!(rows, distinct, "a frame stored twice: {counts}");
    // Nothing lost around the kill: the agent sends a metrics frame every
    // 300 ms and nothing else then, so the stored seqs are consecutive.
    let gap = pg.psql(
        "fleet",
        &format!(
            "SELECT max(seq - prev) FROM (SELECT seq, lag(seq) OVER (ORDER BY seq) AS prev \
             FROM metrics_raw WHERE worker_id = '{id}' AND seq >= {seq_on_a}) t"
        ),
    );
    assert!(
        gap.parse::<u64>().unwrap() <= 2,
        "frames A had received and not committed were lost: a gap of {gap} seqs"
    );
    assert!(
        rows.parse::<u64>().unwrap() > seq_on_a,
        "frames from both conductors are stored: {counts}"
    );
    assert_eq!(
        pg.psql("fleet", "SELECT epoch FROM aerekos_lease"),
        "2",
        "A's lease, then B's"
    );
    // The service runs on, once: B reconciles what A deployed without
    // starting it again.
    wait_for("B sees the sleeper running", SECS(30), || {
        (state_of(&b, "sleeper", &id) == "running").then_some(())
    });
    assert_eq!(pid_of(&b, "sleeper", &id), pid, "the service was restarted");
    std::thread::sleep(SECS(2));
    let sleepers = std::process::Command::new("pgrep")
        .args(["-c", "-f", "^/bin/sleep 4717$"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sleepers.stdout).trim(),
        "1",
        "the service runs exactly once"
    );
    // A deploy through the survivor: A's address refuses, so the agent
    // fetches the manifest from the next in its list, B's.
    create_service(
        &b,
        &json!({"name": "after", "command": "/bin/sleep", "args": ["999"]}),
    );
    deploy(&b, "after", &json!({"workers": [id]}));
    wait_for("a service deployed through B running", SECS(30), || {
        (state_of(&b, "after", &id) == "running").then_some(())
    });
    let agent_log = std::fs::read_to_string(dir.path().join("pi.log")).unwrap();
    assert!(
        agent_log.contains(&format!("using https://{b_http}")),
        "the agent moved to B's address: {agent_log}"
    );
    w.proc.kill9();
}

/// The active conductor cut off from the broker (its only route, a proxy,
/// gone) while the store is fine: after `--bus-stepdown` it releases the
/// lease and stops, and the standby that reaches the broker takes over —
/// not a second standby that cannot reach it either.
#[test]
fn an_active_conductor_cut_off_from_the_bus_steps_down() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let proxy = e2e::chaos::BlackHoleProxy::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        broker.port,
    )));
    let a_args = [
        "--mqtt-url",
        &proxy.mqtt_url(),
        "--mqtt-public-url",
        &broker.url(),
        "--store",
        &url,
        "--bus-stepdown",
        "2s",
    ];
    let (mut a, mut w, id, b_http) = active_with_worker(dir.path(), &a_args);

    // B reaches the broker; C does not (a dead port): C must not lead.
    let b_args = ["--mqtt-url", &broker.url(), "--store", &url];
    let standby_b = a.standby_on(&dir.path().join("b"), b_http, &b_args, &[]);
    let dead = format!("mqtt://127.0.0.1:{}", free_port());
    let c_args = ["--mqtt-url", &dead, "--store", &url];
    let c_http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let standby_c = a.standby_on(&dir.path().join("c"), c_http, &c_args, &[]);
    let c_log = std::fs::read_to_string(dir.path().join("c").join("conductor.log")).unwrap();
    assert!(
        c_log.contains("no MQTT broker node accepts a connection"),
        "{c_log}"
    );

    // The partition: A's only route to the broker goes away.
    let cut = Instant::now();
    drop(proxy);
    let status = a.proc.wait_exit(SECS(30));
    eprintln!("A stopped {:?} after the cut ({status:?})", cut.elapsed());
    assert!(status.is_some_and(|s| s != 0), "A must stop: {status:?}");
    let a_log = std::fs::read_to_string(dir.path().join("a").join("conductor.log")).unwrap();
    assert!(
        a_log.contains("cut off from every MQTT broker node"),
        "{a_log}"
    );
    let b = standby_b.join().unwrap();
    eprintln!("B serving {:?} after the cut", cut.elapsed());
    assert_eq!(pg.psql("fleet", "SELECT epoch FROM aerekos_lease"), "2");
    let seq = b.worker(&id)["metrics"]["seq"].as_u64().unwrap_or(0);
    wait_for("the worker's frames stored through B", SECS(20), || {
        let v = b.worker(&id);
        (v["status"] == "online" && v["metrics"]["seq"].as_u64() > Some(seq + 3)).then_some(())
    });
    assert!(
        !standby_c.is_finished() && !dir.path().join("c").join("runtime.json").exists(),
        "C, cut off itself, must stand by"
    );
    w.proc.kill9();
    // C never leads, so no `Conductor` handle owns its process: kill it
    // by its data dir (its spawning thread then gives up, unjoined).
    let c_dir = dir.path().join("c");
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("data-dir {} ", c_dir.display())])
        .status();
}
