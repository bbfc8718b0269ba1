//! Process services from manifests, with real processes: `DeployManifest`
//! over a real Mosquitto with the manifest and artifacts served by a real
//! HTTP server (tiny_http, checking the worker's `Authorization` with the
//! protocol's own functions), tampered manifests and artifacts refused,
//! the artifact cache, health checks, a worker restart without the
//! conductor, resource limits (applied, or reported not applied) and the
//! service environment; the local API as a service uses it (config, secret,
//! event, metric) and `Logs` (tail, then follow) over MQTT; a container
//! service on the local Docker engine (deployed, restarted after
//! `docker kill`, its log, removed, a foreign container untouched).
//!
//! Needs `/usr/sbin/mosquitto` and `python3` (CI installs both). The
//! container test needs a Docker engine, the docker CLI and the
//! `x86_64-unknown-linux-musl` target; without them it says `skipped: …`
//! and passes, unless `AEREKOS_REQUIRE_DOCKER=1` (CI).

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_worker::cgroup::Cgroups;
use edge_worker::fetch::{self, Conductor};
use edge_worker::supervisor::{proc_start_time, Supervisor, SupervisorOptions};
use edge_worker::{run, WorkerConfig};
use protocol::frame::bounded;
use protocol::manifest::{
    digest, ArtifactRef, HealthCheck, Limits, Probe, ProcessRuntime, Program, Runtime,
};
use protocol::{
    Action, Body, Envelope, EventKind, LogChunk, Manifest, ManifestRef, ReplyStatus, RestartPolicy,
    Secret, ServiceState, ServiceStatus, TopicKind,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use test_support::free_port;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const ID: &str = "w-svctest";
const SECRET_HEX: &str = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c";
const ARCH: &str = std::env::consts::ARCH;

fn secret() -> Secret {
    Secret::from_hex(SECRET_HEX).unwrap()
}

// fits: u64 milliseconds last 584 million years after 1970.
#[allow(clippy::cast_possible_truncation)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A marker no other process has in its command line.
fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("8{n}.{}{}", std::process::id(), now_ms() % 1_000_000)
}

/// Live processes whose command line contains `needle` (zombies excluded).
fn procs_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let found = cmdline
            .split(|b| *b == 0)
            .any(|a| String::from_utf8_lossy(a).contains(needle));
        if found && proc_start_time(pid).is_some() {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Waits until exactly `want` processes carry `marker`.
fn wait_procs(marker: &str, want: &[u32]) {
    let t0 = Instant::now();
    while procs_with(marker) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{marker}: {:?}, want {want:?}",
            procs_with(marker)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `pid` is a zombie or gone (a process being killed loses its
/// command line before it stops running).
fn wait_dead(pid: u32) {
    let t0 = Instant::now();
    while proc_start_time(pid).is_some() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`wait_procs`] without blocking the runtime (the worker runs on it).
async fn wait_procs_async(marker: &str, want: &[u32]) {
    let t0 = Instant::now();
    while procs_with(marker) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{marker}: {:?}, want {want:?}",
            procs_with(marker)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs every process with one of the markers on drop.
struct Reaper(Vec<String>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for m in &self.0 {
            for pid in procs_with(m) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

fn environ(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// The conductor's download endpoints, served for real.

#[derive(Default)]
struct Served {
    manifests: HashMap<String, Vec<u8>>,
    artifacts: HashMap<String, Vec<u8>>,
    /// Requests per path that were authorised.
    hits: HashMap<String, usize>,
    unauthorised: usize,
    /// Bytes answered as-is on the sealed route (e.g. tampered), by
    /// `/name/version`, instead of the manifest sealed here.
    sealed_bytes: HashMap<String, Vec<u8>>,
    /// Play a conductor older than sealed manifests: answer the sealed route
    /// with this status (a real older conductor says 401: the path falls
    /// through to its bearer-token API).
    sealed_route_status: Option<u16>,
}

/// A tiny_http server answering `/api/v1/agent/{manifests,
/// sealed-manifests,artifacts}/…` for worker [`ID`], checking its
/// `Authorization` header; on the sealed route it seals the manifest to the
/// worker as the conductor does.
struct TestConductor {
    url: String,
    id: String,
    served: Arc<Mutex<Served>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestConductor {
    fn start() -> TestConductor {
        TestConductor::start_for(ID)
    }

    /// Serves worker `id` (its secret is [`SECRET_HEX`] too).
    fn start_for(id: &str) -> TestConductor {
        let worker = id.to_string();
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let served = Arc::new(Mutex::new(Served::default()));
        let (srv, state) = (server.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            for req in srv.incoming_requests() {
                let path = req.url().to_string();
                let auth = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.as_str().to_string())
                    .unwrap_or_default();
                let ok = protocol::manifest::verify_http_auth(&auth, "GET", &path, |id| {
                    (id == worker).then(secret)
                })
                .is_some();
                let mut st = state.lock().unwrap();
                if !ok {
                    st.unauthorised += 1;
                    drop(st);
                    let _ = req.respond(tiny_http::Response::empty(401));
                    continue;
                }
                *st.hits.entry(path.clone()).or_default() += 1;
                let body = if let Some(rest) = path.strip_prefix(fetch::SEALED_MANIFEST_PATH) {
                    if let Some(status) = st.sealed_route_status {
                        drop(st);
                        let _ = req.respond(tiny_http::Response::empty(status));
                        continue;
                    }
                    match st.sealed_bytes.get(rest) {
                        Some(b) => Some(b.clone()),
                        None => st
                            .manifests
                            .get(rest)
                            .map(|m| seal_manifest(&secret(), &worker, rest, m)),
                    }
                } else if let Some(rest) = path.strip_prefix(fetch::MANIFEST_PATH) {
                    st.manifests.get(rest).cloned()
                } else if let Some(rest) = path.strip_prefix(fetch::ARTIFACT_PATH) {
                    st.artifacts.get(rest.trim_start_matches('/')).cloned()
                } else {
                    None
                };
                drop(st);
                let _ = match body {
                    Some(b) => req.respond(tiny_http::Response::from_data(b)),
                    None => req.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        TestConductor {
            url: format!("http://127.0.0.1:{port}"),
            id: id.to_string(),
            served,
            server,
            thread: Some(thread),
        }
    }

    /// Serves `bytes` as manifest `name`/`version`.
    fn put_manifest_bytes(&self, name: &str, version: u32, bytes: Vec<u8>) {
        self.served
            .lock()
            .unwrap()
            .manifests
            .insert(format!("/{name}/{version}"), bytes);
    }

    /// Serves `m` and returns the reference a command would carry.
    fn put_manifest(&self, m: &Manifest) -> ManifestRef {
        let bytes = m.encode().unwrap();
        let r = manifest_ref(m);
        self.put_manifest_bytes(&m.name, m.version, bytes);
        r
    }

    /// Answers the sealed route for `name`/`version` with `bytes` as they are.
    fn put_sealed_bytes(&self, name: &str, version: u32, bytes: Vec<u8>) {
        self.served
            .lock()
            .unwrap()
            .sealed_bytes
            .insert(format!("/{name}/{version}"), bytes);
    }

    /// Plays an older conductor: the sealed route answers `status`.
    fn sealed_route_answers(&self, status: Option<u16>) {
        self.served.lock().unwrap().sealed_route_status = status;
    }

    /// Authorised requests for `path` so far.
    fn hits(&self, path: &str) -> usize {
        self.served
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn put_artifact(&self, sha256: &[u8; 32], bytes: Vec<u8>) {
        self.served
            .lock()
            .unwrap()
            .artifacts
            .insert(protocol::hex_string(sha256), bytes);
    }

    fn artifact_hits(&self, sha256: &[u8; 32]) -> usize {
        let path = format!("{}/{}", fetch::ARTIFACT_PATH, protocol::hex_string(sha256));
        self.served
            .lock()
            .unwrap()
            .hits
            .get(&path)
            .copied()
            .unwrap_or(0)
    }

    fn conductor(&self) -> Conductor {
        Conductor {
            urls: edge_worker::conductor_urls::ConductorUrls::parse(&self.url)
                .expect("a valid URL"),
            worker_id: self.id.clone(),
            secret: secret(),
            previous_secret: None,
            trust: None,
        }
    }
}

impl Drop for TestConductor {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `bytes` sealed to worker `id` as the conductor's sealed route answers
/// manifest `rest` (`/name/version`), under a fresh random nonce.
fn seal_manifest(secret: &Secret, id: &str, rest: &str, bytes: &[u8]) -> Vec<u8> {
    let (name, version) = rest.trim_start_matches('/').split_once('/').unwrap();
    let context = protocol::sealed::manifest_context(id, name, version.parse().unwrap());
    let mut nonce = [0u8; protocol::sealed::NONCE_LEN];
    getrandom::fill(&mut nonce).unwrap();
    protocol::sealed::seal(secret, context.as_bytes(), bytes, nonce).unwrap()
}

fn manifest_ref(m: &Manifest) -> ManifestRef {
    ManifestRef {
        name: bounded(&m.name),
        version: m.version,
        digest: digest(&m.encode().unwrap()),
    }
}

fn manifest(name: &str, version: u32, program: Program, args: &[&str]) -> Manifest {
    Manifest {
        name: name.into(),
        version,
        runtime: Runtime::Process(ProcessRuntime {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            working_dir: String::new(),
        }),
        restart: RestartPolicy::Always,
        max_restarts: 10,
        restart_window_s: 60,
        backoff_ms: 100,
        health: None,
        limits: Limits::default(),
        config: BTreeMap::new(),
        secrets: BTreeMap::new(),
    }
}

fn command(name: &str, version: u32, args: &[&str]) -> Manifest {
    manifest(name, version, Program::Command(name_of(args)), &args[1..])
}

fn name_of(args: &[&str]) -> String {
    args.first().copied().unwrap_or("true").to_string()
}

/// A copy of `sleep` as an artifact for this arch.
fn sleep_artifact() -> (Vec<u8>, ArtifactRef) {
    let path = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("a sleep binary");
    let bytes = fs::read(path).unwrap();
    let a = ArtifactRef {
        arch: ARCH.into(),
        sha256: digest(&bytes),
        size: bytes.len() as u64,
    };
    (bytes, a)
}

// ---------------------------------------------------------------------------
// MQTT plumbing (as in tests/mqtt.rs).

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    async fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        fs::create_dir_all(dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .unwrap();
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("mosquitto is not installed: apt-get install mosquitto (CI installs it)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Mosquitto { child, port }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Sub {
    id: String,
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Envelope)>,
    task: JoinHandle<()>,
}

impl Sub {
    async fn connect(port: u16) -> Sub {
        Sub::connect_as(port, ID).await
    }

    /// Observes and commands worker `id`.
    async fn connect_as(port: u16, id: &str) -> Sub {
        let worker = id.to_string();
        let mut opts = MqttOptions::new("svc-test-observer", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sub_client
                            .try_subscribe(format!("aerekos/v1/{worker}/+"), QoS::AtLeastOnce)
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic.ends_with("/status") || p.topic.ends_with("/cmd") {
                            continue;
                        }
                        let env = protocol::open(&p.payload, &worker)
                            .unwrap()
                            .verify(&secret())
                            .unwrap();
                        let _ = tx.send((p.topic.clone(), env));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscribed in time")
            .unwrap();
        Sub {
            id: id.to_string(),
            client,
            rx,
            task,
        }
    }

    /// Feeds frames to `f` until it returns true (panics after `secs`).
    async fn until(&mut self, secs: u64, what: &str, mut f: impl FnMut(&Body) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            let Ok(Some((_, env))) = got else {
                panic!("timed out waiting for {what}");
            };
            if f(&env.body) {
                return;
            }
        }
    }

    async fn send(&self, seq: u64, id: u32, action: Action) {
        let env = Envelope {
            version: protocol::FORMAT_VERSION,
            worker_id: bounded(&self.id),
            seq,
            sent_at_ms: now_ms(),
            body: Body::Command(protocol::Command { id, action }),
        };
        let bytes = protocol::seal(&secret(), &env).unwrap();
        self.client
            .publish(
                protocol::topic::topic(&self.id, TopicKind::Cmd),
                QoS::AtLeastOnce,
                false,
                bytes,
            )
            .await
            .unwrap();
    }

    /// Collects into a [`Seen`] what arrives, replies to no command,
    /// until `done` holds for it (panics after `secs`).
    async fn watch(&mut self, secs: u64, what: &str, done: impl FnMut(&Seen) -> bool) -> Seen {
        self.collect(0, secs, what, done).await
    }

    /// Sends command `n` (as seq and id) and collects what it produces
    /// until `done` holds for it (panics after `secs`).
    async fn command(
        &mut self,
        n: u32,
        action: Action,
        secs: u64,
        what: &str,
        done: impl FnMut(&Seen) -> bool,
    ) -> Seen {
        self.send(u64::from(n), n, action).await;
        self.collect(n, secs, what, done).await
    }

    async fn collect(
        &mut self,
        cmd_id: u32,
        secs: u64,
        what: &str,
        mut done: impl FnMut(&Seen) -> bool,
    ) -> Seen {
        let mut seen = Seen::default();
        self.until(secs, what, |b| {
            seen.take(b, cmd_id);
            done(&seen)
        })
        .await;
        seen
    }

    /// Sends `Logs` command `n` and collects its reply and chunks up to the
    /// last (panics after `secs`).
    async fn logs(
        &mut self,
        n: u32,
        action: Action,
        secs: u64,
        what: &str,
    ) -> (Option<(ReplyStatus, String)>, Vec<LogChunk>) {
        self.send(u64::from(n), n, action).await;
        let mut reply = None;
        let mut chunks: Vec<LogChunk> = Vec::new();
        self.until(secs, what, |b| {
            match b {
                Body::Reply(r) if r.cmd_id == n => reply = Some((r.status, r.detail.to_string())),
                Body::LogChunk(c) if c.cmd_id == n => chunks.push(c.clone()),
                _ => {}
            }
            chunks.last().is_some_and(|c| c.last)
        })
        .await;
        (reply, chunks)
    }
}

/// Stops a worker started with `run(cfg, stopped)` and checks it ends well.
async fn stop_worker(
    stop: oneshot::Sender<()>,
    worker: JoinHandle<Result<(), edge_worker::WorkerError>>,
) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Collects what one command produced: its reply, statuses, events.
#[derive(Default, Debug)]
struct Seen {
    reply: Option<(ReplyStatus, String)>,
    statuses: Vec<ServiceStatus>,
    events: Vec<(EventKind, String)>,
}

impl Seen {
    fn take(&mut self, body: &Body, cmd_id: u32) {
        match body {
            Body::Reply(r) if r.cmd_id == cmd_id => {
                self.reply = Some((r.status, r.detail.to_string()));
            }
            Body::ServiceStatus(s) => self.statuses.push(s.clone()),
            Body::Event(e) => self.events.push((e.kind, e.detail.to_string())),
            _ => {}
        }
    }

    fn status(&self, name: &str, state: ServiceState) -> Option<&ServiceStatus> {
        self.statuses
            .iter()
            .find(|s| s.name == name && s.state == state)
    }
}

fn write_state(dir: &Path, mqtt_url: &str, conductor_url: &str) {
    write_state_as(dir, ID, mqtt_url, conductor_url);
}

fn write_state_as(dir: &Path, id: &str, mqtt_url: &str, conductor_url: &str) {
    fs::create_dir_all(dir).unwrap();
    let json = serde_json::json!({
        "worker_id": id,
        "secret": SECRET_HEX,
        "conductor_url": conductor_url,
        "mqtt_url": mqtt_url,
        "mqtt_username": "",
        "mqtt_password": "",
        "seq_reserved": 1,
        "cmd_highest": 0,
        "cmd_bitmap": 0
    });
    fs::write(dir.join("state.json"), json.to_string()).unwrap();
}

#[tokio::test]
async fn deploy_manifest_over_mqtt_fetches_verifies_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let http = TestConductor::start();
    let state_dir = tmp.path().join("state");
    write_state(
        &state_dir,
        &format!("mqtt://127.0.0.1:{}", broker.port),
        &http.url,
    );
    let (m1, m2, m3, m4) = (unique(), unique(), unique(), unique());
    let _reaper = Reaper(vec![m1.clone(), m2.clone(), m3.clone(), m4.clone()]);
    let mut sub = Sub::connect(broker.port).await;

    let mut cfg = WorkerConfig::new(&state_dir);
    cfg.interval = Duration::from_millis(500);
    cfg.hostname = Some("svc-host".into());
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(cfg, async move {
        let _ = stopped.await;
    }));
    sub.until(10, "a birth", |b| matches!(b, Body::Birth(_)))
        .await;

    // 1. A command service: fetched, verified, run, with its env.
    let mut web = command("web", 1, &["sleep", &m1]);
    web.secrets.insert("TOKEN".into(), "s3cret".into());
    let r = http.put_manifest(&web);
    let seen = sub
        .command(1, Action::DeployManifest(r), 15, "web running", |seen| {
            seen.reply.is_some() && seen.status("web", ServiceState::Running).is_some()
        })
        .await;
    assert_eq!(seen.reply.as_ref().unwrap().0, ReplyStatus::Ok, "{seen:?}");
    let web_pid = seen.status("web", ServiceState::Running).unwrap().pid;
    wait_procs_async(&m1, &[web_pid]).await;
    assert!(environ(web_pid).contains(&"AEREKOS_SERVICE=web".to_string()));
    // Persisted with its secret: owner-only.
    let saved = state_dir.join("services.json");
    assert_eq!(
        fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(fs::read_to_string(&saved).unwrap().contains("s3cret"));

    // 2. A tampered manifest (bytes that do not hash to the digest): refused.
    let web2 = command("web", 2, &["sleep", &m2]);
    let r2 = manifest_ref(&web2);
    let mut evil = web2.clone();
    evil.runtime = command("web", 2, &["sh", "-c", &format!("sleep {m2}")]).runtime;
    http.put_manifest_bytes("web", 2, evil.encode().unwrap());
    let seen = sub
        .command(2, Action::DeployManifest(r2), 10, "the refusal", |seen| {
            seen.reply.is_some() && !seen.events.is_empty()
        })
        .await;
    let (status, detail) = seen.reply.clone().unwrap();
    assert_eq!(status, ReplyStatus::Error, "{detail}");
    assert!(detail.contains("digest mismatch"), "{detail}");
    assert_eq!(
        seen.events[0],
        (
            EventKind::ArtifactRejected,
            "web: manifest digest mismatch".into()
        )
    );
    assert!(procs_with(&m2).is_empty());
    assert_eq!(procs_with(&m1), vec![web_pid], "v1 keeps running");

    // 3. An artifact service: downloaded once into the cache, run from it.
    let (bytes, art) = sleep_artifact();
    http.put_artifact(&art.sha256, bytes.clone());
    let other_arch = ArtifactRef {
        arch: "riscv-none".into(),
        sha256: [7; 32],
        size: 1,
    };
    let tool = manifest(
        "tool",
        1,
        Program::Artifacts(vec![other_arch.clone(), art.clone()]),
        &[&m3],
    );
    let seen = sub
        .command(
            3,
            Action::DeployManifest(http.put_manifest(&tool)),
            15,
            "tool running",
            |seen| seen.reply.is_some() && seen.status("tool", ServiceState::Running).is_some(),
        )
        .await;
    assert_eq!(seen.reply.as_ref().unwrap().0, ReplyStatus::Ok, "{seen:?}");
    let tool_pid = seen.status("tool", ServiceState::Running).unwrap().pid;
    let cached = fetch::artifact_path(&state_dir, &art.sha256);
    assert_eq!(
        fs::read_link(format!("/proc/{tool_pid}/exe")).unwrap(),
        cached
    );
    assert_eq!(
        fs::metadata(&cached).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(http.artifact_hits(&art.sha256), 1);

    // A new version with the same artifact: no second download.
    let tool2 = manifest("tool", 2, Program::Artifacts(vec![art.clone()]), &[&m4]);
    let seen = sub
        .command(
            4,
            Action::DeployManifest(http.put_manifest(&tool2)),
            15,
            "tool v2 running",
            |seen| {
                seen.reply.is_some()
                    && seen
                        .status("tool", ServiceState::Running)
                        .is_some_and(|s| s.version == 2)
            },
        )
        .await;
    assert_eq!(seen.reply.as_ref().unwrap().0, ReplyStatus::Ok, "{seen:?}");
    let pid2 = seen.status("tool", ServiceState::Running).unwrap().pid;
    wait_procs_async(&m4, &[pid2]).await;
    assert!(procs_with(&m3).is_empty());
    assert_eq!(http.artifact_hits(&art.sha256), 1, "served from the cache");

    // 4. A tampered artifact: same size, one byte changed. Refused before
    // anything is made executable or run.
    let m5 = unique();
    let _reaper5 = Reaper(vec![m5.clone()]);
    let mut fake = bytes.clone();
    let mid = fake.len() / 2;
    fake[mid] ^= 0xff;
    let bad_art = ArtifactRef {
        arch: ARCH.into(),
        sha256: digest(&[bytes.as_slice(), b"x"].concat()),
        size: fake.len() as u64,
    };
    http.put_artifact(&bad_art.sha256, fake);
    let bad = manifest("bad", 1, Program::Artifacts(vec![bad_art.clone()]), &[&m5]);
    let seen = sub
        .command(
            5,
            Action::DeployManifest(http.put_manifest(&bad)),
            15,
            "the artifact refusal",
            |seen| {
                seen.reply.is_some()
                    && !seen.events.is_empty()
                    && seen.status("bad", ServiceState::Failed).is_some()
            },
        )
        .await;
    let (status, detail) = seen.reply.clone().unwrap();
    assert_eq!(status, ReplyStatus::Error, "{detail}");
    assert!(
        seen.events
            .contains(&(EventKind::ArtifactRejected, "bad: sha256 mismatch".into())),
        "{seen:?}"
    );
    let failed = seen.status("bad", ServiceState::Failed).unwrap();
    assert!(failed.detail.contains("sha256 mismatch"), "{failed:?}");
    assert_eq!(failed.pid, 0);
    assert_eq!(http.artifact_hits(&bad_art.sha256), 1);
    assert!(procs_with(&m5).is_empty(), "nothing executed");
    let leftovers: Vec<String> = fs::read_dir(state_dir.join(fetch::ARTIFACTS_DIR))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        leftovers,
        vec![protocol::hex_string(&art.sha256)],
        "the bad download is deleted"
    );

    // 5. Removing the artifact service prunes its cached file.
    sub.command(
        6,
        Action::Remove(bounded("tool")),
        15,
        "tool removed",
        |seen| seen.status("tool", ServiceState::Removed).is_some(),
    )
    .await;
    assert!(!cached.exists(), "an unreferenced artifact is pruned");
    assert!(procs_with(&m4).is_empty());
    assert_eq!(http.served.lock().unwrap().unauthorised, 0);

    sub.command(
        7,
        Action::Remove(bounded("web")),
        15,
        "web removed",
        |seen| seen.status("web", ServiceState::Removed).is_some(),
    )
    .await;
    stop_worker(stop, worker).await;
}

/// Samples every 20 ms, on its own thread, whether a process carries one
/// of the markers; [`NeverRan::finish`] returns every pid seen.
struct NeverRan {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u32>>>,
}

impl NeverRan {
    fn watch(markers: &[&str]) -> NeverRan {
        let markers: Vec<String> = markers.iter().map(|m| m.to_string()).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for m in &markers {
                    seen.extend(procs_with(m));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        NeverRan {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default()
    }
}

impl Drop for NeverRan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `InstallManifest`: the manifest and the artifact are fetched and checked
/// as for `DeployManifest` (a tampered manifest is refused), the service is
/// installed with desired state "stopped" and never started; the same
/// version again changes nothing; a new version stops the running copy and
/// stays stopped; a worker restart keeps it stopped.
#[tokio::test]
async fn install_manifest_fetches_verifies_and_never_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let http = TestConductor::start();
    let state_dir = tmp.path().join("state");
    write_state(
        &state_dir,
        &format!("mqtt://127.0.0.1:{}", broker.port),
        &http.url,
    );
    let (m1, m2) = (unique(), unique());
    let _reaper = Reaper(vec![m1.clone(), m2.clone()]);
    let mut sub = Sub::connect(broker.port).await;
    let start_worker = || {
        let mut cfg = WorkerConfig::new(&state_dir);
        cfg.interval = Duration::from_millis(500);
        cfg.hostname = Some("svc-host".into());
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = tokio::spawn(run(cfg, async move {
            let _ = stopped.await;
        }));
        (stop, worker)
    };
    let (stop, worker) = start_worker();
    sub.until(10, "a birth", |b| matches!(b, Body::Birth(_)))
        .await;
    let never = NeverRan::watch(&[&m1, &m2]);

    // 1. An artifact service: downloaded, checked, cached; not started.
    let (bytes, art) = sleep_artifact();
    http.put_artifact(&art.sha256, bytes);
    let v1 = manifest("idle", 1, Program::Artifacts(vec![art.clone()]), &[&m1]);
    let seen = sub
        .command(
            1,
            Action::InstallManifest(http.put_manifest(&v1)),
            15,
            "idle installed",
            |seen| seen.reply.is_some() && seen.status("idle", ServiceState::Stopped).is_some(),
        )
        .await;
    let (status, detail) = seen.reply.clone().unwrap();
    assert_eq!(status, ReplyStatus::Ok, "{detail}");
    assert_eq!(detail, "installed version 1, not started");
    let st = seen.status("idle", ServiceState::Stopped).unwrap();
    assert_eq!((st.version, st.pid), (1, 0), "{st:?}");
    assert_eq!(
        st.detail.as_str(),
        edge_worker::supervisor::INSTALLED_STOPPED
    );
    assert!(
        seen.statuses
            .iter()
            .all(|s| s.state == ServiceState::Stopped),
        "never reported anything but stopped: {seen:?}"
    );
    let cached = fetch::artifact_path(&state_dir, &art.sha256);
    assert_eq!(
        fs::metadata(&cached).unwrap().permissions().mode() & 0o777,
        0o700,
        "the artifact is verified and cached for a later start"
    );
    assert_eq!(http.artifact_hits(&art.sha256), 1);
    let saved: serde_json::Value =
        serde_json::from_slice(&fs::read(state_dir.join("services.json")).unwrap()).unwrap();
    assert_eq!(saved["services"][0]["run"], false, "{saved}");

    // 2. The same version again changes nothing.
    let seen = sub
        .command(
            2,
            Action::InstallManifest(manifest_ref(&v1)),
            10,
            "the reply",
            |seen| seen.reply.is_some(),
        )
        .await;
    assert_eq!(
        seen.reply.clone().unwrap(),
        (ReplyStatus::Ok, "unchanged".into())
    );
    assert!(seen.statuses.is_empty(), "{seen:?}");

    // 3. A tampered manifest is refused; version 1 stays installed.
    let v2 = command("idle", 2, &["sleep", &m2]);
    let mut evil = v2.clone();
    evil.runtime = command("idle", 2, &["sh", "-c", &format!("sleep {m2}")]).runtime;
    http.put_manifest_bytes("idle", 2, evil.encode().unwrap());
    let seen = sub
        .command(
            3,
            Action::InstallManifest(manifest_ref(&v2)),
            10,
            "the refusal",
            |seen| seen.reply.is_some() && !seen.events.is_empty(),
        )
        .await;
    let (status, detail) = seen.reply.clone().unwrap();
    assert_eq!(status, ReplyStatus::Error, "{detail}");
    assert!(detail.contains("digest mismatch"), "{detail}");
    let pids = never.finish();
    assert!(pids.is_empty(), "a stopped install ran: {pids:?}");

    // 4. Started on request, then version 2 installed: the running copy
    // is stopped and version 2 is not started.
    let seen = sub
        .command(
            4,
            Action::Start(bounded("idle")),
            15,
            "idle v1 running",
            |seen| seen.status("idle", ServiceState::Running).is_some(),
        )
        .await;
    let pid1 = seen.status("idle", ServiceState::Running).unwrap().pid;
    wait_procs_async(&m1, &[pid1]).await;
    let never = NeverRan::watch(&[&m2]);
    let seen = sub
        .command(
            5,
            Action::InstallManifest(http.put_manifest(&v2)),
            15,
            "idle v2 installed",
            |seen| {
                seen.reply.is_some()
                    && seen
                        .status("idle", ServiceState::Stopped)
                        .is_some_and(|s| s.version == 2)
            },
        )
        .await;
    let (status, detail) = seen.reply.clone().unwrap();
    assert_eq!(status, ReplyStatus::Ok, "{detail}");
    assert!(detail.contains("stopping the running copy"), "{detail}");
    wait_procs_async(&m1, &[]).await;

    // 5. A worker restart keeps it stopped (and reports it so).
    stop_worker(stop, worker).await;
    let (stop, worker) = start_worker();
    let seen = sub
        .watch(15, "idle reported after the restart", |seen| {
            seen.status("idle", ServiceState::Stopped).is_some()
        })
        .await;
    let st = seen.status("idle", ServiceState::Stopped).unwrap();
    assert_eq!((st.version, st.pid), (2, 0), "{st:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = never.finish();
    assert!(pids.is_empty(), "a stopped install ran: {pids:?}");
    assert!(procs_with(&m1).is_empty());

    sub.command(
        6,
        Action::Remove(bounded("idle")),
        15,
        "idle removed",
        |seen| seen.status("idle", ServiceState::Removed).is_some(),
    )
    .await;
    assert_eq!(http.served.lock().unwrap().unauthorised, 0);
    stop_worker(stop, worker).await;
}

// ---------------------------------------------------------------------------
// Supervisor-level tests (no broker).

/// Polls until `pred` holds for the service's status; every change and
/// event seen is kept in `log`.
fn wait_for(
    sup: &mut Supervisor,
    name: &str,
    secs: u64,
    log: &mut (Vec<ServiceStatus>, Vec<(EventKind, String)>),
    pred: impl Fn(&ServiceStatus, &[ServiceStatus]) -> bool,
) -> ServiceStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        sup.poll();
        log.0.extend(sup.take_changes());
        log.1.extend(sup.take_events());
        if let Some(st) = sup.status(name) {
            if pred(&st, &log.0) {
                return st;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {:?}; seen {log:?}",
            sup.status(name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `name` is forgotten and `Removed` was reported.
fn wait_removed(sup: &mut Supervisor, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while sup.status(name).is_some() {
        assert!(
            Instant::now() < deadline,
            "not removed: {:?}",
            sup.status(name)
        );
        std::thread::sleep(Duration::from_millis(20));
        sup.poll();
        seen.extend(sup.take_changes());
    }
    seen.extend(sup.take_changes());
    assert!(
        seen.iter()
            .any(|s| s.name == name && s.state == ServiceState::Removed),
        "{seen:?}"
    );
}

fn check(probe: Probe) -> HealthCheck {
    HealthCheck {
        probe,
        interval_ms: 200,
        timeout_ms: 1000,
        retries: 2,
        start_period_ms: 0,
    }
}

#[test]
fn passing_health_check_is_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let marker = format!("{}", port);
    let mut sup = Supervisor::load(tmp.path());
    let mut m = command(
        "web",
        1,
        &[
            "python3",
            "-m",
            "http.server",
            &marker,
            "--bind",
            "127.0.0.1",
        ],
    );
    // Python takes a moment to listen: failures meanwhile do not count.
    let mut hc = check(Probe::Http {
        port,
        path: "/".into(),
    });
    hc.start_period_ms = 20_000;
    m.health = Some(hc);
    sup.deploy_manifest(m).unwrap();
    let mut log = Default::default();
    let st = wait_for(&mut sup, "web", 20, &mut log, |s, _| {
        s.state == ServiceState::Healthy
    });
    assert!(st.pid != 0 && st.restarts == 0, "{st:?}");
    assert_eq!(st.detail, "healthy");
    // Running (started) before Healthy (first pass).
    let states: Vec<ServiceState> = log.0.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        vec![ServiceState::Running, ServiceState::Healthy],
        "{log:?}"
    );
    sup.remove("web").unwrap();
    wait_removed(&mut sup, "web");
}

#[test]
fn failing_health_check_makes_unhealthy_and_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = unique();
    let _r = Reaper(vec![marker.clone()]);
    let mut sup = Supervisor::load(tmp.path());
    let mut m = command("sick", 1, &["sleep", &marker]);
    m.health = Some(check(Probe::Command {
        command: "sh".into(),
        args: vec!["-c".into(), "exit 1".into()],
    }));
    sup.deploy_manifest(m).unwrap();
    let mut log = Default::default();
    let first = wait_for(&mut sup, "sick", 10, &mut log, |s, _| {
        s.state == ServiceState::Running && s.pid != 0
    });
    let st = wait_for(&mut sup, "sick", 20, &mut log, |s, _| {
        s.restarts >= 2 && s.state == ServiceState::Running
    });
    assert_ne!(st.pid, first.pid);
    wait_procs(&marker, &[st.pid]);
    let unhealthy = log
        .0
        .iter()
        .find(|s| s.state == ServiceState::Unhealthy)
        .expect("an Unhealthy status");
    assert!(
        unhealthy.detail.starts_with("unhealthy: sh exit status: 1"),
        "{unhealthy:?}"
    );
    assert!(
        log.1
            .iter()
            .any(|(k, d)| *k == EventKind::HealthFailed && d.starts_with("sick: ")),
        "{log:?}"
    );
    let backoff = log
        .0
        .iter()
        .find(|s| s.state == ServiceState::Backoff)
        .expect("a Backoff status");
    assert!(backoff.detail.contains("unhealthy"), "{backoff:?}");
    assert!(!log.0.iter().any(|s| s.state == ServiceState::Healthy));

    // max_restarts applies as to crashes.
    let mut m = command("sick", 2, &["sleep", &marker]);
    m.max_restarts = 1;
    m.health = Some(check(Probe::Command {
        command: "false".into(),
        args: vec![],
    }));
    sup.deploy_manifest(m).unwrap();
    let st = wait_for(&mut sup, "sick", 20, &mut log, |s, _| {
        s.state == ServiceState::Failed
    });
    assert!(st.detail.contains("gave up"), "{st:?}");
    assert!(procs_with(&marker).is_empty());
}

#[test]
fn a_restarted_worker_runs_the_persisted_manifests_without_the_conductor() {
    let tmp = tempfile::tempdir().unwrap();
    let (m1, m2) = (unique(), unique());
    let _r = Reaper(vec![m1.clone(), m2.clone()]);
    let mut sup = Supervisor::load(tmp.path());
    // The artifact comes from the conductor once (pinned while downloaded,
    // as the session does, so no prune removes it before the deploy)...
    let http = TestConductor::start();
    let (bytes, art) = sleep_artifact();
    http.put_artifact(&art.sha256, bytes);
    sup.pin_artifact(art.sha256);
    let (path, downloaded) = http.conductor().ensure_artifact(tmp.path(), &art).unwrap();
    assert!(downloaded);
    let (again, downloaded) = http.conductor().ensure_artifact(tmp.path(), &art).unwrap();
    assert_eq!((again, downloaded), (path.clone(), false));
    drop(http); // ...and is gone from then on.

    let mut keep = command("keep", 1, &["sh", "-c", "sleep $MARK & wait"]);
    if let Runtime::Process(p) = &mut keep.runtime {
        p.env.insert("MARK".into(), m1.clone());
    }
    keep.config.insert("greeting".into(), "hello".into());
    sup.deploy_manifest(keep.clone()).unwrap();
    sup.deploy_manifest(manifest(
        "bin",
        1,
        Program::Artifacts(vec![art.clone()]),
        &[&m2],
    ))
    .unwrap();
    sup.unpin_artifact(art.sha256);
    let mut log = Default::default();
    let keep_pid = wait_for(&mut sup, "keep", 10, &mut log, |s, _| s.pid != 0).pid;
    let bin_pid = wait_for(&mut sup, "bin", 10, &mut log, |s, _| s.pid != 0).pid;
    let t0 = Instant::now();
    while procs_with(&m1).len() != 1 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_procs(&m2, &[bin_pid]);
    drop(sup); // the worker exits; its services keep running

    // The host kills one service meanwhile.
    Command::new("kill")
        .args(["-9", &bin_pid.to_string()])
        .status()
        .unwrap();
    wait_dead(bin_pid);

    let mut sup = Supervisor::load(tmp.path());
    assert_eq!(sup.manifest("keep"), Some(&keep), "the manifest persisted");
    let st = sup.status("keep").unwrap();
    assert_eq!((st.state, st.pid), (ServiceState::Running, keep_pid));
    let st = wait_for(&mut sup, "bin", 10, &mut log, |s, _| {
        s.state == ServiceState::Running
    });
    assert_ne!(st.pid, bin_pid);
    assert_eq!(
        fs::read_link(format!("/proc/{}/exe", st.pid)).unwrap(),
        path
    );
    for _ in 0..5 {
        sup.poll();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(procs_with(&m1).len(), 1, "exactly one copy");
    wait_procs(&m2, &[st.pid]);

    // A cached artifact that changed on disk is refused at the next exec.
    drop(sup);
    Command::new("kill")
        .args(["-9", &st.pid.to_string()])
        .status()
        .unwrap();
    wait_dead(st.pid);
    fs::write(&path, b"#!/bin/sh\nexit 0\n").unwrap();
    let mut sup = Supervisor::load(tmp.path());
    let st = sup.status("bin").unwrap();
    assert_eq!(st.state, ServiceState::Failed, "{st:?}");
    assert!(st.detail.contains("sha256 mismatch"), "{st:?}");
    assert!(sup
        .take_events()
        .contains(&(EventKind::ArtifactRejected, "bin: sha256 mismatch".into())));
    assert!(!path.exists(), "the bad cached file is deleted");
    sup.remove("bin").unwrap();
    wait_removed(&mut sup, "bin");
    sup.remove("keep").unwrap();
    wait_removed(&mut sup, "keep");
    // The forked sleep was SIGKILLed with its group; it may take a moment to go.
    wait_procs(&m1, &[]);
}

#[test]
fn limits_are_applied_or_reported_and_the_env_hook_is_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = unique();
    let _r = Reaper(vec![marker.clone()]);
    let opts = SupervisorOptions {
        extra_env: Some(Arc::new(|m: &Manifest| {
            vec![("AEREKOS_TOKEN".to_string(), format!("token-of-{}", m.name))]
        })),
        ..SupervisorOptions::default()
    };
    let mut sup = Supervisor::load_with(tmp.path(), opts);
    let mut m = command("lim", 1, &["sleep", &marker]);
    m.limits = Limits {
        memory_bytes: Some(64 << 20),
        cpu_millicores: Some(500),
        pids: Some(64),
    };
    if let Runtime::Process(p) = &mut m.runtime {
        // The worker's variables win over the manifest's.
        p.env.insert("AEREKOS_SERVICE".into(), "spoofed".into());
        p.env.insert("APP_MODE".into(), "test".into());
    }
    sup.deploy_manifest(m).unwrap();
    let mut log = Default::default();
    let st = wait_for(&mut sup, "lim", 10, &mut log, |s, _| s.pid != 0);
    let env = environ(st.pid);
    for want in [
        "AEREKOS_SERVICE=lim",
        "AEREKOS_TOKEN=token-of-lim",
        "APP_MODE=test",
    ] {
        assert!(env.iter().any(|e| e == want), "{want} not in {env:?}");
    }
    assert!(!env.iter().any(|e| e == "AEREKOS_SERVICE=spoofed"));

    let cg_line = fs::read_to_string(format!("/proc/{}/cgroup", st.pid)).unwrap();
    let applied = !st.detail.starts_with("limits not applied: ");
    eprintln!("limits: {} ({})", st.detail, cg_line.trim());
    if applied {
        // Writable cgroup v2: the service sits in its own cgroup with the limits.
        let rel = cg_line
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .trim();
        assert!(rel.ends_with("/aerekos-lim"), "{rel}");
        let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max").trim(), (64u64 << 20).to_string());
        assert_eq!(read("cpu.max").trim(), "50000 100000");
        assert_eq!(read("pids.max").trim(), "64");
        sup.remove("lim").unwrap();
        wait_removed(&mut sup, "lim");
        assert!(!dir.exists(), "the cgroup goes with the service");
    } else {
        // Not applicable here: the service runs anyway and says why.
        let reason = Cgroups::default()
            .apply("probe-only", &Limits::default())
            .map(|_| String::new());
        assert!(st.detail.len() > "limits not applied: ".len(), "{st:?}");
        assert_eq!(st.state, ServiceState::Running);
        assert_eq!(procs_with(&marker), vec![st.pid]);
        assert_eq!(reason, Ok(String::new()), "no limits: nothing to apply");
        sup.remove("lim").unwrap();
    }
}

// ---------------------------------------------------------------------------
// The local API and `Logs`, through a whole worker.

/// The service of the local API test: reads its config and secret and the
/// worker's view of its health through the local API with the env it was
/// given, publishes an event and a metric, writes what it saw to `$OUT` (as
/// JSON, atomically), then prints three lines and a tick every 100 ms.
/// `argv[1]` is the test's process marker.
const API_CLIENT: &str = r#"
import json, os, sys, time, urllib.request
api, tok = os.environ["AEREKOS_API"], os.environ["AEREKOS_TOKEN"]
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, method=method, headers={
        "Authorization": "Bearer " + tok, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read().decode()
seen = {"api": api, "service": os.environ["AEREKOS_SERVICE"]}
seen["config"] = json.loads(call("GET", "/v1/config")[1])
seen["secret"] = json.loads(call("GET", "/v1/secrets/api_key")[1])
seen["health"] = json.loads(call("GET", "/v1/health")[1])
seen["event"] = call("POST", "/v1/events", {"text": "hello from api"})[0]
seen["metrics"] = call("POST", "/v1/metrics", {"samples": {"answers": 42}})[0]
out = os.environ["OUT"]
with open(out + ".tmp", "w") as f:
    json.dump(seen, f)
os.rename(out + ".tmp", out)
for i in range(1, 4):
    print("line", i, flush=True)
n = 0
while True:
    n += 1
    print("tick", n, flush=True)
    time.sleep(0.1)
"#;

/// The status line of `GET /v1/health` with `token` at `api` (`http://ip:port`).
fn api_status(api: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let addr = api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_service_uses_the_local_api_and_its_log_is_tailed_and_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let http = TestConductor::start();
    let state_dir = tmp.path().join("state");
    write_state(
        &state_dir,
        &format!("mqtt://127.0.0.1:{}", broker.port),
        &http.url,
    );
    let marker = unique();
    let _reaper = Reaper(vec![marker.clone()]);
    let mut sub = Sub::connect(broker.port).await;

    let mut cfg = WorkerConfig::new(&state_dir);
    cfg.interval = Duration::from_millis(500);
    // As the end-to-end harness runs several workers on one host.
    cfg.local_api = Some("127.0.0.1:0".into());
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(cfg, async move {
        let _ = stopped.await;
    }));
    sub.until(10, "a birth", |b| matches!(b, Body::Birth(_)))
        .await;

    let out = tmp.path().join("seen.json");
    // (A manifest argument holds at most 1 KiB: the script is a file.)
    let script = tmp.path().join("client.py");
    fs::write(&script, API_CLIENT).unwrap();
    let script = script.to_string_lossy().into_owned();
    let mut m = command("api", 1, &["python3", &script, &marker]);
    if let Runtime::Process(p) = &mut m.runtime {
        p.env
            .insert("OUT".into(), out.to_string_lossy().into_owned());
    }
    m.config.insert("greeting".into(), "hello".into());
    m.secrets.insert("api_key".into(), "s3cret".into());
    sub.send(1, 1, Action::DeployManifest(http.put_manifest(&m)))
        .await;
    let (mut event, mut metric, mut pid) = (false, false, 0);
    sub.until(20, "the service's event and metric", |b| {
        match b {
            Body::ServiceStatus(s) if s.name == "api" && s.pid != 0 => pid = s.pid,
            Body::Event(e) if e.kind == EventKind::ServiceEvent => {
                assert_eq!(e.detail, "api: hello from api");
                event = true;
            }
            Body::ServiceMetrics(sm) => {
                assert_eq!(sm.name, "api");
                let samples: Vec<(String, i64)> = sm
                    .samples
                    .iter()
                    .map(|s| (s.key.to_string(), s.value))
                    .collect();
                assert_eq!(samples, vec![("answers".to_string(), 42)]);
                metric = true;
            }
            _ => {}
        }
        event && metric
    })
    .await;
    // What the service read, with the env the worker gave it (written
    // right after its publishes).
    let t0 = Instant::now();
    while !out.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no {}",
            out.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(seen["service"], "api", "{seen}");
    assert_eq!(seen["config"], serde_json::json!({"greeting": "hello"}));
    assert_eq!(seen["secret"]["value"], "s3cret", "{seen}");
    assert_eq!(seen["health"]["worker_id"], ID, "{seen}");
    assert_eq!(
        (seen["event"].as_u64(), seen["metrics"].as_u64()),
        (Some(202), Some(202))
    );
    let api = seen["api"].as_str().unwrap().to_string();
    assert!(
        api.starts_with("http://127.0.0.1:") && !api.ends_with(":0"),
        "the bound port, not :0: {api}"
    );
    let env = environ(pid);
    let token = env
        .iter()
        .find_map(|e| e.strip_prefix("AEREKOS_TOKEN="))
        .expect("a token in the env")
        .to_string();
    assert!(api_status(&api, &token).contains(" 200"));
    assert!(api_status(&api, "not-a-token").contains(" 401"));

    // Logs: the tail, then 2 s of new lines; chunks in order, last marked.
    let req = |name: &str, tail_bytes, follow_s| {
        Action::Logs(protocol::frame::LogRequest {
            name: bounded(name),
            tail_bytes,
            follow_s,
        })
    };
    let (reply, chunks) = sub.logs(2, req("api", 4096, 2), 15, "the log chunks").await;
    let (status, detail) = reply.expect("the reply comes before the chunks");
    assert_eq!(status, ReplyStatus::Ok, "{detail}");
    assert!(detail.contains("following for 2 s"), "{detail}");
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!((c.index as usize, c.name.as_str()), (i, "api"));
        assert_eq!(c.last, i + 1 == chunks.len());
    }
    let text: String = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert!(
        text.starts_with("line 1\nline 2\nline 3\ntick 1\n"),
        "{text}"
    );
    let ticks: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "no line lost or repeated: {ticks:?}"
    );
    assert!(ticks.len() >= 15, "followed the new lines: {ticks:?}");

    let seen = sub
        .command(3, req("nope", 100, 0), 10, "the refusal", |seen| {
            seen.reply.is_some()
        })
        .await;
    let (status, detail) = seen.reply.unwrap();
    assert_eq!(status, ReplyStatus::Error, "{detail}");

    // Removed: its token is refused from then on.
    sub.command(
        4,
        Action::Remove(bounded("api")),
        15,
        "api removed",
        |seen| seen.status("api", ServiceState::Removed).is_some(),
    )
    .await;
    assert!(api_status(&api, &token).contains(" 401"));
    stop_worker(stop, worker).await;
}

// ---------------------------------------------------------------------------
// A container service on the local Docker engine, through a whole worker.

const MUSL: &str = "x86_64-unknown-linux-musl";

/// Runs the docker CLI; stdout on success.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Says why the test is skipped, or fails when CI requires Docker.
fn skipped(why: &str) {
    assert!(
        std::env::var("AEREKOS_REQUIRE_DOCKER").as_deref() != Ok("1"),
        "AEREKOS_REQUIRE_DOCKER=1 but {why}"
    );
    println!("skipped: {why}");
}

/// Builds the `FROM scratch` image of `images/test-service/` around the
/// static `examples/ctr_test_service.rs` (plain rustc, std only), as
/// `tests/container.rs` does.
fn build_test_image(tag: &str) -> Result<(), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ctr_test_service.rs");
    let ctx = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bin = ctx.path().join("ctr-test-service");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let res = Command::new(rustc)
        .args(["--edition", "2021", "--target", MUSL])
        .args(["-C", "opt-level=1", "-C", "strip=symbols", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("rustc: {e}"))?;
    if !res.status.success() {
        return Err(format!(
            "cannot build the test service for {MUSL} (rustup target add {MUSL}): {}",
            String::from_utf8_lossy(&res.stderr).trim()
        ));
    }
    let dockerfile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/test-service/Dockerfile");
    docker(&[
        "build",
        "-q",
        "-t",
        tag,
        "-f",
        dockerfile.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ])
    .map(drop)
}

/// Removes the test's containers, then its image, even when it fails.
struct DockerCleanup {
    containers: Vec<String>,
    image: String,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn container_running(name: &str) -> Option<bool> {
    docker(&["inspect", "--format", "{{.State.Running}}", name])
        .ok()
        .map(|s| s == "true")
}

#[tokio::test]
async fn a_container_service_runs_restarts_logs_and_goes_and_foreign_containers_stay() {
    if let Err(e) = edge_worker::container::Engine::connect(None) {
        return skipped(&format!("no Docker engine: {e}"));
    }
    let u = format!("{:x}{:x}", std::process::id(), now_ms() % 0xfffff);
    let wid = format!("w-ctr{u}");
    let image = format!("aerekos-ctr-test:svc{u}");
    let ours = edge_worker::container::container_name(&wid, "ctr");
    let foreign = format!("aerekos-foreign-{u}");
    let _cleanup = DockerCleanup {
        containers: vec![ours.clone(), foreign.clone()],
        image: image.clone(),
    };
    if let Err(e) = tokio::task::spawn_blocking({
        let image = image.clone();
        move || build_test_image(&image)
    })
    .await
    .unwrap()
    {
        return skipped(&e);
    }
    // Not ours although it carries our worker's label: never touched.
    docker(&[
        "run",
        "-d",
        "--name",
        &foreign,
        "--label",
        "io.aerekos.managed=true",
        "--label",
        &format!("io.aerekos.worker={wid}"),
        &image,
    ])
    .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let http = TestConductor::start_for(&wid);
    let state_dir = tmp.path().join("state");
    write_state_as(
        &state_dir,
        &wid,
        &format!("mqtt://127.0.0.1:{}", broker.port),
        &http.url,
    );
    let mut sub = Sub::connect_as(broker.port, &wid).await;
    let mut cfg = WorkerConfig::new(&state_dir);
    cfg.interval = Duration::from_millis(500);
    cfg.local_api = Some("127.0.0.1:0".into());
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(cfg, async move {
        let _ = stopped.await;
    }));
    sub.until(10, "a birth", |b| matches!(b, Body::Birth(_)))
        .await;

    let port = free_port();
    let mut m = command("ctr", 1, &["unused"]);
    m.runtime = Runtime::Container(protocol::manifest::ContainerRuntime {
        image: image.clone(),
        command: Vec::new(),
        env: BTreeMap::from([("GREETING".to_string(), "hi from the manifest".to_string())]),
        ports: vec![protocol::manifest::PortMap {
            host: port,
            container: 8080,
            udp: false,
        }],
        volumes: Vec::new(),
    });
    m.backoff_ms = 300;
    m.limits = Limits {
        memory_bytes: Some(64 << 20),
        cpu_millicores: None,
        pids: Some(64),
    };
    // Probes the container port: the worker goes through the host port.
    let mut hc = check(Probe::Http {
        port: 8080,
        path: "/".into(),
    });
    hc.start_period_ms = 10_000;
    m.health = Some(hc);
    let seen = sub
        .command(
            1,
            Action::DeployManifest(http.put_manifest(&m)),
            60,
            "ctr healthy",
            |seen| seen.reply.is_some() && seen.status("ctr", ServiceState::Healthy).is_some(),
        )
        .await;
    assert_eq!(seen.reply.as_ref().unwrap().0, ReplyStatus::Ok, "{seen:?}");
    let first = seen.status("ctr", ServiceState::Healthy).unwrap().clone();
    assert!(first.pid != 0, "the container's main pid: {first:?}");
    let labels = docker(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"io.aerekos.worker\"}} {{index .Config.Labels \"io.aerekos.service\"}} {{.HostConfig.Memory}} {{.HostConfig.RestartPolicy.Name}}",
        &ours,
    ])
    .unwrap();
    assert_eq!(labels, format!("{wid} ctr {} no", 64u64 << 20));

    // Killed behind the worker's back: restarted by the manifest's policy.
    docker(&["kill", &ours]).unwrap();
    let seen = sub
        .watch(60, "ctr restarted", |seen| {
            seen.statuses.iter().any(|s| {
                s.name == "ctr"
                    && s.restarts >= 1
                    && matches!(s.state, ServiceState::Running | ServiceState::Healthy)
            })
        })
        .await;
    let backoff = seen
        .status("ctr", ServiceState::Backoff)
        .expect("a Backoff status");
    assert!(
        backoff.detail.contains("exited with code 137"),
        "{backoff:?}"
    );
    assert_eq!(container_running(&ours), Some(true));

    // Its log comes from the engine: both runs.
    let (reply, chunks) = sub
        .logs(
            2,
            Action::Logs(protocol::frame::LogRequest {
                name: bounded("ctr"),
                tail_bytes: 8192,
                follow_s: 0,
            }),
            20,
            "the container log",
        )
        .await;
    assert_eq!(reply.unwrap().0, ReplyStatus::Ok);
    let text: String = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert_eq!(
        text.matches("greeting=hi from the manifest").count(),
        2,
        "{text}"
    );

    // Stop keeps the container (stopped); Remove deletes it.
    sub.command(3, Action::Stop(bounded("ctr")), 30, "ctr stopped", |seen| {
        seen.status("ctr", ServiceState::Stopped).is_some()
    })
    .await;
    assert_eq!(container_running(&ours), Some(false));
    sub.command(
        4,
        Action::Remove(bounded("ctr")),
        30,
        "ctr removed",
        |seen| seen.status("ctr", ServiceState::Removed).is_some(),
    )
    .await;
    assert_eq!(container_running(&ours), None, "our container is gone");
    assert_eq!(container_running(&foreign), Some(true), "foreign untouched");
    stop_worker(stop, worker).await;
}

fn container_manifest(name: &str, version: u32, image: &str) -> Manifest {
    let mut m = command(name, version, &["unused"]);
    m.runtime = Runtime::Container(protocol::manifest::ContainerRuntime {
        image: image.into(),
        command: Vec::new(),
        env: BTreeMap::new(),
        ports: Vec::new(),
        volumes: Vec::new(),
    });
    m
}

#[test]
fn without_an_engine_a_container_service_fails_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SupervisorOptions {
        worker_id: "w-noengine".into(),
        engine_socket: Some(tmp.path().join("no-such.sock")),
        ..SupervisorOptions::default()
    };
    let mut sup = Supervisor::load_with(tmp.path(), opts);
    sup.deploy_manifest(container_manifest("ctr", 1, "img:1"))
        .unwrap();
    let mut log = Default::default();
    let st = wait_for(&mut sup, "ctr", 10, &mut log, |s, _| {
        s.state == ServiceState::Failed
    });
    assert!(st.detail.starts_with("no container engine"), "{st:?}");
    assert!(
        log.1.iter().any(|(k, d)| *k == EventKind::ServiceChanged
            && d.starts_with("ctr: failed: no container engine")),
        "{log:?}"
    );
    // Tried again later, quietly; removal needs no engine.
    assert!(sup.next_wake().is_some());
    sup.remove("ctr").unwrap();
    wait_removed(&mut sup, "ctr");
}

#[test]
fn containers_are_found_again_after_a_restart_and_orphans_are_removed() {
    let engine = match edge_worker::container::Engine::connect(None) {
        Ok(e) => e,
        Err(e) => return skipped(&format!("no Docker engine: {e}")),
    };
    let u = format!("{:x}{:x}", std::process::id(), now_ms() % 0xfffff);
    let wid = format!("w-adopt{u}");
    let image = format!("aerekos-ctr-test:adopt{u}");
    let (ours, orphan) = (
        edge_worker::container::container_name(&wid, "keep"),
        edge_worker::container::container_name(&wid, "orphan"),
    );
    let _cleanup = DockerCleanup {
        containers: vec![ours.clone(), orphan.clone()],
        image: image.clone(),
    };
    if let Err(e) = build_test_image(&image) {
        return skipped(&e);
    }
    let tmp = tempfile::tempdir().unwrap();
    let opts = || SupervisorOptions {
        worker_id: wid.clone(),
        ..SupervisorOptions::default()
    };
    let mut sup = Supervisor::load_with(tmp.path(), opts());
    sup.deploy_manifest(container_manifest("keep", 1, &image))
        .unwrap();
    let mut log = Default::default();
    let first = wait_for(&mut sup, "keep", 60, &mut log, |s, _| {
        s.state == ServiceState::Running
    });
    assert_eq!(first.detail, "running");
    let id = docker(&["inspect", "--format", "{{.Id}}", &ours]).unwrap();
    drop(sup); // the worker exits: the container keeps running

    // Meanwhile a container of ours appears whose service is not deployed
    // here any more (as if its removal had failed).
    engine
        .ensure(&wid, &container_manifest("orphan", 1, &image))
        .unwrap();
    assert_eq!(container_running(&orphan), Some(true));

    let mut sup = Supervisor::load_with(tmp.path(), opts());
    let st = wait_for(&mut sup, "keep", 30, &mut log, |s, _| {
        s.state == ServiceState::Running
    });
    assert_eq!(
        (st.detail.as_str(), st.pid),
        ("adopted", first.pid),
        "{st:?}"
    );
    assert_eq!(
        docker(&["inspect", "--format", "{{.Id}}", &ours]).unwrap(),
        id,
        "the same container, never a second copy"
    );
    let t0 = Instant::now();
    while container_running(&orphan).is_some() {
        assert!(t0.elapsed() < Duration::from_secs(30), "orphan not removed");
        sup.poll();
        std::thread::sleep(Duration::from_millis(100));
    }
    // A restart by request restarts the same container.
    sup.restart("keep").unwrap();
    let st = wait_for(&mut sup, "keep", 30, &mut log, |s, seen| {
        s.state == ServiceState::Running
            && seen
                .iter()
                .filter(|x| x.state == ServiceState::Stopped)
                .count()
                >= 1
    });
    assert_ne!(st.pid, first.pid);
    assert_eq!(
        docker(&["inspect", "--format", "{{.Id}}", &ours]).unwrap(),
        id
    );
    sup.remove("keep").unwrap();
    wait_removed(&mut sup, "keep");
    assert_eq!(container_running(&ours), None);
}

// ---------------------------------------------------------------------------
// Sealed manifests: opened with the worker's secret, tampered ones refused,
// older conductors (no sealed route) served in plaintext.

fn sealed_path(name: &str, version: u32) -> String {
    format!("{}/{name}/{version}", fetch::SEALED_MANIFEST_PATH)
}

fn plain_path(name: &str, version: u32) -> String {
    format!("{}/{name}/{version}", fetch::MANIFEST_PATH)
}

#[test]
fn sealed_manifests_are_opened_refused_when_tampered_and_older_conductors_fall_back() {
    let mut m = command("vault", 1, &["sleep", "1000"]);
    m.secrets
        .insert("DB_PASSWORD".into(), "sealed-s3cret".into());
    let bytes = m.encode().unwrap();
    let r = manifest_ref(&m);

    // Fetched sealed, opened, digest-checked: the plaintext route is unused.
    let http = TestConductor::start();
    http.put_manifest(&m);
    let c = http.conductor();
    assert_eq!(c.fetch_manifest(&r).unwrap(), m);
    assert_eq!(http.hits(&sealed_path("vault", 1)), 1);
    assert_eq!(http.hits(&plain_path("vault", 1)), 0);

    // What does not open is refused, naming the cause, and never falls back:
    // a byte changed, sealed for another worker, another version, another
    // secret, cut short, an unknown format.
    let good = seal_manifest(&secret(), ID, "/vault/1", &bytes);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let other_secret = Secret::from_bytes([0x3d; 32]);
    let mut other_format = good.clone();
    other_format[0] = 2;
    for (what, sealed) in [
        ("a flipped byte", flipped),
        (
            "another worker",
            seal_manifest(&secret(), "w-other", "/vault/1", &bytes),
        ),
        (
            "another version",
            seal_manifest(&secret(), ID, "/vault/2", &bytes),
        ),
        (
            "another secret",
            seal_manifest(&other_secret, ID, "/vault/1", &bytes),
        ),
        ("cut short", good[..20].to_vec()),
        ("an unknown format", other_format),
        ("the plaintext", bytes.clone()),
    ] {
        http.put_sealed_bytes("vault", 1, sealed);
        let e = c.fetch_manifest(&r).unwrap_err();
        assert!(matches!(e, fetch::FetchError::Sealed(_)), "{what}: {e:?}");
        assert!(
            e.to_string()
                .contains("sealed manifest does not open: wrong worker secret or tampered"),
            "{what}: {e}"
        );
        assert_eq!(e.rejection(), Some("sealed manifest does not open"));
    }
    assert_eq!(http.hits(&plain_path("vault", 1)), 0, "no fallback");
    // Opened, but not the bytes the command names: the digest still decides.
    let mut evil = m.clone();
    evil.secrets.insert("DB_PASSWORD".into(), "swapped".into());
    http.put_sealed_bytes(
        "vault",
        1,
        seal_manifest(&secret(), ID, "/vault/1", &evil.encode().unwrap()),
    );
    let e = c.fetch_manifest(&r).unwrap_err();
    assert_eq!(e.rejection(), Some("manifest digest mismatch"), "{e}");

    // This conductor has served a sealed manifest: a 404 or 401 on the sealed
    // route from it now is final, never a reason to ask in plaintext.
    for status in [404, 401] {
        http.sealed_route_answers(Some(status));
        let e = c.fetch_manifest(&r).unwrap_err();
        assert!(
            matches!(&e, fetch::FetchError::Status { status: s, path } if *s == status && path.contains("sealed-manifests")),
            "{e:?}"
        );
    }
    assert_eq!(http.hits(&plain_path("vault", 1)), 0, "no downgrade");

    // Conductors older than the sealed route, never seen to seal: a 404 (an
    // unknown route) or a 401 (what a real older conductor answers: the path
    // falls through to its bearer-token API) falls back to the plaintext
    // route, still digest-checked.
    for status in [404, 401] {
        let old = TestConductor::start();
        old.sealed_route_answers(Some(status));
        old.put_manifest(&m);
        assert_eq!(old.conductor().fetch_manifest(&r).unwrap(), m, "{status}");
        assert_eq!(old.hits(&sealed_path("vault", 1)), 1);
        assert_eq!(old.hits(&plain_path("vault", 1)), 1);
        old.put_manifest_bytes("vault", 1, evil.encode().unwrap());
        let e = old.conductor().fetch_manifest(&r).unwrap_err();
        assert_eq!(e.rejection(), Some("manifest digest mismatch"), "{e}");
        // Not there on either route: the plaintext route's answer is reported.
        let r9 = ManifestRef {
            version: 9,
            ..r.clone()
        };
        let e = old.conductor().fetch_manifest(&r9).unwrap_err();
        assert!(
            matches!(&e, fetch::FetchError::Status { status: 404, path } if path == &plain_path("vault", 9)),
            "{e:?}"
        );
    }
}

#[tokio::test]
async fn a_sealed_manifest_that_does_not_open_is_refused_and_nothing_is_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let http = TestConductor::start();
    let state_dir = tmp.path().join("state");
    write_state(
        &state_dir,
        &format!("mqtt://127.0.0.1:{}", broker.port),
        &http.url,
    );
    let (m1, m2) = (unique(), unique());
    let _reaper = Reaper(vec![m1.clone(), m2.clone()]);
    let mut sub = Sub::connect(broker.port).await;
    let mut cfg = WorkerConfig::new(&state_dir);
    cfg.interval = Duration::from_millis(500);
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(cfg, async move {
        let _ = stopped.await;
    }));
    sub.until(10, "a birth", |b| matches!(b, Body::Birth(_)))
        .await;

    // Sealed with another secret (a conductor that is not ours, or bytes
    // changed on the way): refused, reported, nothing run or stored.
    let mut vault = command("vault", 1, &["sleep", &m1]);
    vault
        .secrets
        .insert("DB_PASSWORD".into(), "sealed-s3cret".into());
    let r = http.put_manifest(&vault);
    http.put_sealed_bytes(
        "vault",
        1,
        seal_manifest(
            &Secret::from_bytes([0x3d; 32]),
            ID,
            "/vault/1",
            &vault.encode().unwrap(),
        ),
    );
    let seen = sub
        .command(
            1,
            Action::DeployManifest(r.clone()),
            15,
            "the refusal",
            |seen| seen.reply.is_some() && !seen.events.is_empty(),
        )
        .await;
    let (status, detail) = seen.reply.clone().unwrap();
    assert_eq!(status, ReplyStatus::Error, "{detail}");
    assert!(
        detail.contains("sealed manifest does not open: wrong worker secret or tampered"),
        "{detail}"
    );
    assert_eq!(
        seen.events[0],
        (
            EventKind::ArtifactRejected,
            "vault: sealed manifest does not open".into()
        )
    );
    assert!(
        seen.status("vault", ServiceState::Running).is_none(),
        "{seen:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(procs_with(&m1).is_empty(), "nothing executed");
    let saved = fs::read_to_string(state_dir.join("services.json")).unwrap_or_default();
    assert!(
        !saved.contains("sealed-s3cret") && !saved.contains(&m1),
        "nothing installed: {saved}"
    );
    assert_eq!(http.hits(&plain_path("vault", 1)), 0, "no plaintext fetch");

    // The conductor's own sealing: deployed and run, with its secret.
    let mut vault2 = command("vault", 2, &["sleep", &m2]);
    vault2
        .secrets
        .insert("DB_PASSWORD".into(), "sealed-s3cret".into());
    let r2 = http.put_manifest(&vault2);
    let seen = sub
        .command(2, Action::DeployManifest(r2), 15, "vault running", |seen| {
            seen.reply.is_some() && seen.status("vault", ServiceState::Running).is_some()
        })
        .await;
    assert_eq!(seen.reply.as_ref().unwrap().0, ReplyStatus::Ok, "{seen:?}");
    let pid = seen.status("vault", ServiceState::Running).unwrap().pid;
    wait_procs_async(&m2, &[pid]).await;
    assert_eq!(http.hits(&sealed_path("vault", 2)), 1);
    assert_eq!(http.hits(&plain_path("vault", 2)), 0);
    sub.command(
        3,
        Action::Remove(bounded("vault")),
        15,
        "vault removed",
        |seen| seen.status("vault", ServiceState::Removed).is_some(),
    )
    .await;
    stop_worker(stop, worker).await;
}
