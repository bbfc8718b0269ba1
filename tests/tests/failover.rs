//! Active/standby conductors on one PostgreSQL store (`--store
//! postgres://…`) and one Mosquitto: the active one is killed with
//! `kill -9` while a real agent sends metrics and hosts a service; the
//! standby — same TLS material, an HTTP address of its own (where it
//! forwards the API to the active one until it takes over), the second in
//! the agent's `--conductor` list — takes the lease, loads the fleet from
//! the store and carries on: no frame stored twice, the service not started
//! again, a new deploy through it runs (the agent fetches its manifest from
//! B). A standby answers the API and the dashboard by forwarding them to the
//! active one (issue 19), and a TLS standby creates no TLS material.

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

    // B starts while A is active: it stands by (forwarding its port's
    // requests to A). It shares A's TLS material; its HTTP address is its
    // own, the agent's second.
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

/// `GET` (or another method) on `base` with `token` (if any): status,
/// headers as (lower-case name, value), body.
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header("Authorization", format!("Bearer {t}"));
    }
    let resp = match body {
        Some(bytes) => agent.run(b.body(bytes).unwrap()),
        None => agent.run(b.body(()).unwrap()),
    };
    match resp {
        Ok(mut r) => {
            let headers = r
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let status = r.status().as_u16();
            let body = r
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_vec()
                .unwrap();
            (status, headers, body)
        }
        Err(e) => (0, vec![("error".into(), e.to_string())], Vec::new()),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn json_of(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)))
}

/// Issue 19: a standby answers the API and the dashboard on its own port by
/// forwarding every request to the active conductor (the address the lease
/// row records): reads, writes, logins with their cookie, a streamed log,
/// a 3 MiB upload; 503 with the reason while the active one cannot be
/// reached or none is recorded; and
/// once it has taken over it answers itself, on the same port.
#[test]
fn a_standby_forwards_the_api_to_the_active_one_until_it_takes_over() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let args = ["--mqtt-url", &broker.url(), "--store", &url];
    let (mut a, mut w, id, b_http) = active_with_worker(dir.path(), &args);
    let a_url = pg.psql("fleet", "SELECT api_url FROM aerekos_lease");
    assert_eq!(
        a_url,
        format!("https://127.0.0.1:{}", a.http.port()),
        "A records its API URL (TLS on, its listen IP, the bound port) in the lease row"
    );

    let b_dir = dir.path().join("b");
    let standby = a.standby_on(&b_dir, b_http, &args, &[]);
    let b_url = format!("http://{b_http}");
    let forwarded_by = format!("https://127.0.0.1:{}", b_http.port());
    let agent = http();
    let (status, headers, body) = wait_for("B forwarding", SECS(20), || {
        Some(call(
            &agent,
            "GET",
            &format!("{b_url}/api/v1/health"),
            None,
            None,
        ))
        .filter(|(s, _, _)| *s != 0)
    });
    assert_eq!(
        status,
        200,
        "health through B: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        header(&headers, "x-aerekos-forwarded-by"),
        Some(forwarded_by.as_str()),
        "{headers:?}"
    );
    assert!(!standby.is_finished() && !b_dir.join("runtime.json").exists());

    // Reads: what A answers, through B; without a token A's 401, relayed.
    let (status, _, body) = call(
        &agent,
        "GET",
        &format!("{b_url}/api/v1/workers"),
        Some(&a.admin),
        None,
    );
    assert_eq!(status, 200);
    let ids = |v: &serde_json::Value| {
        let list = v
            .as_array()
            .cloned()
            .unwrap_or_else(|| v["workers"].as_array().cloned().unwrap_or_default());
        let mut ids: Vec<String> = list
            .iter()
            .map(|w| w["id"].as_str().unwrap_or("").to_string())
            .collect();
        ids.sort();
        ids
    };
    let through_b = ids(&json_of(&body));
    assert_eq!(through_b, vec![id.clone()]);
    let (_, a_workers) = a.get("/api/v1/workers");
    assert_eq!(through_b, ids(&a_workers), "B answers what A answers");
    let (status, _, _) = call(
        &agent,
        "GET",
        &format!("{b_url}/api/v1/workers"),
        None,
        None,
    );
    assert_eq!(status, 401, "no token: A's refusal, relayed");
    let (status, headers, spec_b) = call(
        &agent,
        "GET",
        &format!("{b_url}/api/v1/openapi.json"),
        None,
        None,
    );
    let (_, _, spec_a) = call(
        &agent,
        "GET",
        &format!("{}/api/v1/openapi.json", a.url()),
        None,
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(spec_b, spec_a, "the same bytes through B");
    assert!(
        header(&headers, "content-type").is_some_and(|t| t.contains("json")),
        "{headers:?}"
    );
    let (status, _, page) = call(&agent, "GET", &format!("{b_url}/"), None, None);
    assert_eq!(status, 200, "the dashboard through B");
    assert!(
        String::from_utf8_lossy(&page).contains("<html"),
        "dashboard page"
    );

    // A write through B is A's: a service created through B, read on A.
    let spec = json!({"name": "via-b", "command": "/bin/sleep", "args": ["1"]});
    let (status, _, body) = call(
        &agent,
        "POST",
        &format!("{b_url}/api/v1/services"),
        Some(&a.admin),
        Some(serde_json::to_vec(&spec).unwrap()),
    );
    assert_eq!(
        status,
        201,
        "create through B: {}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = a.get("/api/v1/services/via-b");
    assert_eq!(status, 200, "the service created through B is on A: {body}");

    // A streamed (chunked) answer through B: a service deployed through B
    // on the worker, its log relayed by A and forwarded by B.
    let spec = json!({"name": "echoer", "command": "/bin/sh",
        "args": ["-c", "echo hello-through-b; exec sleep 600"]});
    let (status, _, body) = call(
        &agent,
        "POST",
        &format!("{b_url}/api/v1/services"),
        Some(&a.admin),
        Some(serde_json::to_vec(&spec).unwrap()),
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = call(
        &agent,
        "PUT",
        &format!("{b_url}/api/v1/services/echoer/deployment"),
        Some(&a.admin),
        Some(serde_json::to_vec(&json!({"workers": [id]})).unwrap()),
    );
    assert_eq!(
        status,
        200,
        "deploy through B: {}",
        String::from_utf8_lossy(&body)
    );
    wait_for("echoer running", SECS(30), || {
        (state_of(&a, "echoer", &id) == "running").then_some(())
    });
    let (headers, log) = wait_for("the log through B", SECS(20), || {
        let (status, headers, body) = call(
            &agent,
            "GET",
            &format!("{b_url}/api/v1/workers/{id}/services/echoer/logs"),
            Some(&a.admin),
            None,
        );
        let text = String::from_utf8_lossy(&body).into_owned();
        (status == 200 && text.contains("hello-through-b")).then_some((headers, text))
    });
    assert!(
        header(&headers, "x-aerekos-forwarded-by").is_some(),
        "{headers:?} {log}"
    );

    // A large request body: an artifact streamed up through B.
    let blob: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&blob)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let (status, _, body) = call(
        &agent,
        "POST",
        &format!("{b_url}/api/v1/artifacts?arch=x86_64&name=big"),
        Some(&a.admin),
        Some(blob),
    );
    assert!(
        status == 200 || status == 201,
        "upload through B: {status} {}",
        String::from_utf8_lossy(&body)
    );
    let (_, list) = a.get("/api/v1/artifacts");
    assert!(
        list.to_string().contains(&sha),
        "A stored the 3 MiB upload made through B: {list}"
    );

    // A login through B: A's cookie relayed, and sent back through B.
    let (status, headers, _) = call(
        &agent,
        "POST",
        &format!("{b_url}/api/v1/login"),
        None,
        Some(
            serde_json::to_vec(&json!({"username": "admin", "password": ADMIN_PASSWORD})).unwrap(),
        ),
    );
    assert_eq!(status, 200);
    let cookie = header(&headers, "set-cookie")
        .expect("Set-Cookie relayed")
        .to_string();
    let pair = cookie.split(';').next().unwrap().to_string();
    let resp = agent
        .get(format!("{b_url}/api/v1/workers"))
        .header("Cookie", &pair)
        .call()
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "the session cookie works through B"
    );

    // The active one unreachable, or none recorded: 503 naming why.
    let dead = format!("https://127.0.0.1:{}", free_port());
    pg.psql(
        "fleet",
        &format!("UPDATE aerekos_lease SET api_url = '{dead}'"),
    );
    let (status, headers, body) = wait_for("B's 503", SECS(10), || {
        Some(call(
            &agent,
            "GET",
            &format!("{b_url}/api/v1/health"),
            None,
            None,
        ))
        .filter(|(s, _, _)| *s == 503)
    });
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(
        header(&headers, "x-aerekos-forwarded-by"),
        Some(forwarded_by.as_str())
    );
    let error = json_of(&body)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(&dead) && error.contains("cannot be reached"),
        "{error}"
    );
    pg.psql("fleet", "UPDATE aerekos_lease SET api_url = NULL");
    let (_, _, body) = wait_for("B's 503 without an address", SECS(10), || {
        Some(call(
            &agent,
            "GET",
            &format!("{b_url}/api/v1/health"),
            None,
            None,
        ))
        .filter(|(s, _, b)| *s == 503 && !String::from_utf8_lossy(b).contains(&dead))
    });
    let error = json_of(&body)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("no active conductor has recorded"),
        "{error}"
    );
    pg.psql(
        "fleet",
        &format!("UPDATE aerekos_lease SET api_url = '{a_url}'"),
    );
    wait_for("B forwarding again", SECS(10), || {
        Some(call(
            &agent,
            "GET",
            &format!("{b_url}/api/v1/health"),
            None,
            None,
        ))
        .filter(|(s, _, _)| *s == 200)
    });

    // A dies: B takes over on the same port and answers itself.
    a.proc.kill9();
    let b = standby.join().unwrap();
    assert_eq!(b.http, b_http);
    let (status, headers, _) = call(&agent, "GET", &format!("{b_url}/api/v1/health"), None, None);
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "x-aerekos-forwarded-by"),
        None,
        "B answers itself now: {headers:?}"
    );
    assert_eq!(
        pg.psql("fleet", "SELECT api_url FROM aerekos_lease"),
        forwarded_by,
        "B records its own URL"
    );
    let (status, _) = b.get("/api/v1/services/via-b");
    assert_eq!(status, 200);
    assert_eq!(ids(&serde_json::Value::Array(b.workers())), vec![id]);
    w.proc.kill9();
}

/// Issue 19: a TLS standby that starts first, on an empty data directory
/// it shares with the conductor that becomes active, creates no TLS
/// material and does not listen until the active one has created it; then
/// it serves HTTPS with the fleet's certificate (and forwards).
#[test]
fn a_tls_standby_creates_no_tls_material_and_waits_for_the_active_ones() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("data");
    std::fs::create_dir_all(&shared).unwrap();
    // B cannot reach its broker (nothing listens there), so it stands by
    // however long the lease is free: the conductor to start next leads.
    // It listens on every address, for the plain-HTTP rule below.
    let b_port = free_port();
    let b_http: std::net::SocketAddr = format!("127.0.0.1:{b_port}").parse().unwrap();
    let dead_broker = format!("mqtt://127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(bin("conductor"));
    cmd.arg("--data-dir")
        .arg(&shared)
        .args(["--http-listen", &format!("0.0.0.0:{b_port}")])
        .args(["--mqtt-url", &dead_broker, "--store", &url])
        .env("RUST_LOG", "info");
    let b_log = dir.path().join("b.log");
    let mut b = Proc::spawn(cmd, b_log.clone());
    wait_for("B standing by", SECS(20), || {
        std::fs::read_to_string(&b_log)
            .ok()
            .filter(|l| l.contains("no TLS material in"))
    });
    std::thread::sleep(SECS(2));
    assert!(b.alive(), "B runs: {}", b.tail(20));
    assert!(
        !shared.join("tls").exists(),
        "a standby must create no TLS material"
    );
    assert!(
        std::net::TcpStream::connect_timeout(&b_http, SECS(1)).is_err(),
        "B must not listen before the TLS material exists"
    );

    // A, the active one, on the same data directory, creates it.
    let a = Conductor::start_on(
        &shared,
        &["--store", &url],
        ["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"],
    );
    let ca_pem = a.ca_pem();
    let fleet = https(&ca_pem);
    let (status, headers, _) = wait_for("B serving HTTPS", SECS(20), || {
        Some(call(
            &fleet,
            "GET",
            &format!("https://{b_http}/api/v1/health"),
            None,
            None,
        ))
        .filter(|(s, _, _)| *s != 0)
    });
    assert_eq!(status, 200, "{headers:?}\n{}", b.tail(20));
    // Listening on 0.0.0.0, B advertises its hostname.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        header(&headers, "x-aerekos-forwarded-by"),
        Some(format!("https://{}:{b_port}", host.trim()).as_str()),
        "{headers:?}"
    );
    // Plain HTTP from another address: refused by B as A would (not
    // forwarded), pointing at HTTPS and the fleet CA.
    let lan = {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // No packet is sent: connect only picks the route.
        s.connect("10.255.255.1:9")
            .ok()
            .and_then(|()| s.local_addr().ok())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    };
    if let Some(ip) = lan {
        let (status, headers, body) = call(
            &http(),
            "GET",
            &format!("http://{ip}:{b_port}/api/v1/health"),
            None,
            None,
        );
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("plain HTTP is refused")
                && body.contains(a.ca_fingerprint.as_deref().unwrap()),
            "{body}"
        );
        assert_eq!(header(&headers, "x-aerekos-forwarded-by"), None);
    } else {
        eprintln!("no non-loopback address here: the plain-HTTP refusal is not checked");
    }
    // The certificate B serves is the fleet's: a client trusting another
    // CA is refused.
    let other = tempfile::tempdir().unwrap();
    let stranger = Conductor::start(other.path());
    let (status, headers, _) = call(
        &https(&stranger.ca_pem()),
        "GET",
        &format!("https://{b_http}/api/v1/health"),
        None,
        None,
    );
    assert_eq!(status, 0, "another CA must not verify B: {headers:?}");
    let (status, _, body) = call(
        &fleet,
        "GET",
        &format!("https://{b_http}/api/v1/workers"),
        Some(&a.admin),
        None,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    b.kill9();
}
