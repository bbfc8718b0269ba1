//! Test harness: a real conductor in-process on ephemeral ports, an HTTP
//! helper and an MQTT "worker" that seals real frames.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use conductor::{Config, Started};
use protocol::topic::{topic, TopicKind};
use protocol::{Action, Body, Envelope, Secret, ServiceState};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

/// Called for every publish a test client receives.
pub type OnPublish = Box<dyn Fn(&Client, &rumqttc::Publish) + Send>;

pub const ADMIN_PW: &str = "test-admin-password";

pub struct Conductor {
    pub started: Started,
    pub dir: PathBuf,
    /// Where its store is (SQLite in `dir`, or `AEREKOS_TEST_STORE`'s).
    pub store_at: conductor::store::StoreLocation,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    session: std::sync::Mutex<Option<String>>,
}

/// A conductor's config for a test in `dir`. With
/// `AEREKOS_TEST_STORE=postgres` its store is a database of this test
/// process's PostgreSQL server, named after `dir` (a restart on the same
/// dir finds the same database), so the suite can run a second time
/// against PostgreSQL (`.ci/run` does).
pub fn test_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.display().to_string(),
        store: test_store(dir),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        mqtts_listen: "127.0.0.1:0".into(),
        admin_password: Some(ADMIN_PW.into()),
        ..Config::default()
    }
}

/// `AEREKOS_TEST_STORE`'s store for `dir` (see [`test_config`]).
pub fn test_store(dir: &Path) -> Option<String> {
    match std::env::var("AEREKOS_TEST_STORE").as_deref() {
        Ok("postgres") => {
            use std::hash::{Hash, Hasher};
            let pg = test_support::postgres::Postgres::shared()
                .expect("AEREKOS_TEST_STORE=postgres but PostgreSQL is not installed");
            let mut h = std::collections::hash_map::DefaultHasher::new();
            dir.hash(&mut h);
            Some(pg.database(&format!("t_{:016x}", h.finish())))
        }
        Ok("" | "sqlite") | Err(_) => None,
        Ok(other) => panic!("AEREKOS_TEST_STORE={other}: expected postgres or sqlite"),
    }
}

impl Conductor {
    pub fn start(dir: &Path) -> Conductor {
        Conductor::start_with(test_config(dir))
    }

    pub fn start_with(config: Config) -> Conductor {
        let dir = PathBuf::from(&config.data_dir);
        let store_at = conductor::store::StoreLocation::of(&config).expect("a valid store");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(conductor::run(
                config,
                async {
                    let _ = stop_rx.await;
                },
                ready_tx,
            ))
            .map_err(|e| e.to_string())
        });
        let started = ready_rx.blocking_recv().expect("conductor failed to start");
        Conductor {
            started,
            dir,
            store_at,
            stop: Some(stop_tx),
            thread: Some(thread),
            session: Default::default(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.started.http_addr, path)
    }

    /// Stops and waits for a clean shutdown.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("conductor thread panicked")
                .expect("conductor run failed");
        }
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        http(
            method,
            &self.url(path),
            token,
            body.map(|b| b.to_string().into_bytes()),
        )
    }

    /// Admin session token (logged in once per conductor).
    pub fn admin(&self) -> String {
        let mut s = self.session.lock().unwrap();
        if let Some(t) = &*s {
            return t.clone();
        }
        let (code, v) = self.call(
            "POST",
            "/api/v1/login",
            None,
            Some(json!({"username": "admin", "password": ADMIN_PW})),
        );
        assert_eq!(code, 200, "{v}");
        let t = v["token"].as_str().unwrap().to_string();
        *s = Some(t.clone());
        t
    }

    pub fn get(&self, path: &str) -> Value {
        let (code, v) = self.call("GET", path, Some(&self.admin()), None);
        assert_eq!(code, 200, "GET {path}: {v}");
        v
    }

    pub fn enroll(&self, body: Value) -> (u16, Value) {
        self.call("POST", "/api/v1/enroll", None, Some(body))
    }

    /// Enrols a new worker with the local token.
    pub fn enroll_new(&self, hostname: &str) -> Enrolled {
        let (code, v) = self.enroll(json!({
            "token": self.started.local_enroll_token,
            "hostname": hostname,
            "machine_id": format!("mid-{hostname}"),
            "labels": {"site": "lab"},
        }));
        assert_eq!(code, 200, "{v}");
        Enrolled::from_json(&v)
    }

    pub fn worker(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/workers/{id}"))
    }

    /// `id`'s row in the worker list (`GET /api/v1/workers`).
    pub fn listed(&self, id: &str) -> Value {
        self.get("/api/v1/workers")["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed"))
    }

    pub fn prometheus(&self) -> String {
        let agent = agent();
        let mut r = agent.get(self.url("/metrics")).call().unwrap();
        r.body_mut().read_to_string().unwrap()
    }

    pub fn rejected(&self, reason: &str) -> u64 {
        prom_value(
            &self.prometheus(),
            &format!("aerekos_frames_rejected_total{{reason=\"{reason}\"}}"),
        )
    }

    pub fn accepted(&self) -> u64 {
        prom_value(&self.prometheus(), "aerekos_frames_accepted_total")
    }
}

impl Drop for Conductor {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// fits: the series read are counters and gauges of whole, non-negative
// numbers far below 2^53 (an `as` from f64 saturates anyway).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn prom_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        })
        .unwrap_or_else(|| panic!("series {series} missing"))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .build()
        .into()
}

pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<Vec<u8>>) -> (u16, Value) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header("Authorization", format!("Bearer {t}"));
    }
    b = b.header("Content-Type", "application/json");
    let req = b.body(body.unwrap_or_default()).unwrap();
    let mut resp = agent().run(req).unwrap();
    let code = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (code, v)
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub id: String,
    pub secret: Secret,
    pub username: String,
    pub password: String,
    pub mqtt_url: String,
}

impl Enrolled {
    pub fn from_json(v: &Value) -> Enrolled {
        Enrolled {
            id: v["worker_id"].as_str().unwrap().into(),
            secret: Secret::from_hex(v["secret"].as_str().unwrap()).unwrap(),
            username: v["mqtt_username"].as_str().unwrap().into(),
            password: v["mqtt_password"].as_str().unwrap().into(),
            mqtt_url: v["mqtt_url"].as_str().unwrap().into(),
        }
    }
}

/// An MQTT client acting as a worker; replies to commands when `auto_reply`.
pub struct FakeWorker {
    pub id: String,
    pub secret: Secret,
    pub client: Client,
    pub seq: Arc<AtomicU64>,
    _thread: JoinHandle<()>,
}

/// Connects `client_id` with the given login; Err if the broker refuses.
pub fn connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
    on_publish: Option<OnPublish>,
) -> Result<(Client, JoinHandle<()>), String> {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials(username, password);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(128 * 1024, 128 * 1024);
    let (client, mut connection) = Client::new(opts, 100);
    let (tx, rx) = mpsc::channel();
    let c2 = client.clone();
    let t = std::thread::spawn(move || {
        let mut first = true;
        for ev in connection.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) if first => {
                    first = false;
                    let _ = tx.send(Ok(()));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(f) = &on_publish {
                        f(&c2, &p);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if first {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    break;
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok((client, t)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no connack".into()),
    }
}

impl FakeWorker {
    pub fn connect(c: &Conductor, e: &Enrolled, auto_reply: bool) -> Result<FakeWorker, String> {
        let seq = Arc::new(AtomicU64::new(0));
        let handler: Option<OnPublish> = if auto_reply {
            let secret = e.secret.clone();
            let id = e.id.clone();
            let seq = seq.clone();
            Some(Box::new(move |client: &Client, p: &rumqttc::Publish| {
                let Ok(opened) = protocol::open(&p.payload, &id) else {
                    return;
                };
                let Ok(env) = opened.verify(&secret) else {
                    return;
                };
                if let Body::Command(cmd) = env.body {
                    let reply = Body::Reply(protocol::Reply {
                        cmd_id: cmd.id,
                        status: protocol::ReplyStatus::Ok,
                        detail: protocol::bounded("pong"),
                    });
                    let n = seq.fetch_add(1, Ordering::SeqCst) + 1;
                    let frame = seal(&secret, &id, n, reply);
                    let _ = client.try_publish(
                        topic(&id, TopicKind::Reply),
                        QoS::AtLeastOnce,
                        false,
                        frame,
                    );
                }
            }))
        } else {
            None
        };
        let (client, t) = connect(
            c.started.mqtt_addr,
            &e.id,
            &e.username,
            &e.password,
            handler,
        )?;
        if auto_reply {
            client
                .subscribe(topic(&e.id, TopicKind::Cmd), QoS::AtLeastOnce)
                .unwrap();
        }
        Ok(FakeWorker {
            id: e.id.clone(),
            secret: e.secret.clone(),
            client,
            seq,
            _thread: t,
        })
    }

    /// True once the broker closed this connection (its event thread ends at
    /// the first connection error).
    pub fn connection_closed(&self) -> bool {
        self._thread.is_finished()
    }

    /// Seals `body` with the next seq and publishes it on its topic; returns the bytes.
    pub fn send(&self, body: Body) -> Vec<u8> {
        let kind = match body {
            Body::Birth(_) => TopicKind::Birth,
            Body::Metrics(_) | Body::MetricsBatch(_) => TopicKind::Metrics,
            Body::Event(_) => TopicKind::Events,
            Body::Reply(_) => TopicKind::Reply,
            Body::Command(_) => TopicKind::Cmd,
            Body::LogChunk(_) => TopicKind::Logs,
            Body::ServiceMetrics(_) => TopicKind::ServiceMetrics,
            Body::ServiceStatus(_) => TopicKind::Services,
            Body::Board(_) => TopicKind::Board,
        };
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let frame = seal(&self.secret, &self.id, n, body);
        self.raw(&topic(&self.id, kind), frame.clone());
        frame
    }

    pub fn raw(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }
}

/// A client with the conductor's own broker login (allowed to publish
/// anywhere): frames that reach the conductor however they are published,
/// as on an external broker without ACLs, so its own checks can be tested.
pub struct Injector {
    client: Client,
    _thread: JoinHandle<()>,
}

impl Injector {
    pub fn connect(c: &Conductor) -> Injector {
        let store = conductor::store::Store::open_at(&c.store_at).unwrap();
        let password = store
            .setting(conductor::auth::CONDUCTOR_MQTT_PASSWORD)
            .unwrap()
            .unwrap();
        let (client, t) = connect(
            c.started.mqtt_addr,
            "conductor-test-injector",
            conductor::broker::CONDUCTOR_USER,
            &password,
            None,
        )
        .unwrap();
        Injector { client, _thread: t }
    }

    pub fn raw(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }
}

pub fn seal(secret: &Secret, id: &str, seq: u64, body: Body) -> Vec<u8> {
    protocol::seal(
        secret,
        &Envelope {
            version: protocol::FORMAT_VERSION,
            worker_id: protocol::bounded(id),
            seq,
            sent_at_ms: 0,
            body,
        },
    )
    .unwrap()
}

pub fn birth(hostname: &str, interval_ms: u32) -> Body {
    Body::Birth(protocol::Birth {
        hostname: protocol::bounded(hostname),
        os: protocol::bounded("Debian GNU/Linux 12"),
        kernel: protocol::bounded("6.6.31"),
        arch: protocol::bounded("aarch64"),
        cpu_model: protocol::bounded("Cortex-A76"),
        cores: 4,
        memory_total: 8 << 30,
        disks: heapless::Vec::new(),
        device_model: protocol::bounded("Raspberry Pi 5 Model B Rev 1.0"),
        agent_version: protocol::bounded("0.1.0"),
        boot_id: protocol::bounded("b00t"),
        labels: heapless::Vec::new(),
        interval_ms,
    })
}

pub fn metrics(cpu_hundredths: u16) -> Body {
    let mut temps = heapless::Vec::new();
    let _ = temps.push(protocol::Temperature {
        name: protocol::bounded("cpu-thermal"),
        millicelsius: 51_500,
    });
    let mut disks = heapless::Vec::new();
    let _ = disks.push(protocol::Disk {
        mount: protocol::bounded("/"),
        used: 10 << 30,
        total: 64 << 30,
    });
    Body::Metrics(protocol::Metrics {
        cpu_total: cpu_hundredths,
        cpu_per_core: heapless::Vec::new(),
        load: [150, 100, 50],
        memory_used: 2 << 30,
        memory_available: 6 << 30,
        memory_total: 8 << 30,
        swap_used: 0,
        swap_total: 0,
        disks,
        net: heapless::Vec::new(),
        temperatures: temps,
        uptime_s: 1234,
        processes: 150,
        dropped: 0,
    })
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_status(c: &Conductor, id: &str, status: &str, timeout: Duration) {
    wait_for(&format!("{id} {status}"), timeout, || {
        (c.worker(id)["status"] == status).then_some(())
    });
}

/// Default wait in service tests.
pub const T: Duration = Duration::from_secs(10);

/// A fake worker that records every command it can verify with its secret
/// (and counts every publish on its cmd topic) and replies `Ok`.
pub struct SvcWorker {
    pub id: String,
    pub secret: Secret,
    pub client: Client,
    pub seq: Arc<AtomicU64>,
    /// Every verified command, with its id.
    pub commands: Arc<Mutex<Vec<(u32, Action)>>>,
    /// The wire format of every verified frame it received.
    pub formats: Arc<Mutex<Vec<u8>>>,
    pub publishes: Arc<AtomicUsize>,
    _t: std::thread::JoinHandle<()>,
}

impl SvcWorker {
    pub fn connect(c: &Conductor, e: &Enrolled, hostname: &str) -> SvcWorker {
        SvcWorker::connect_from(c, e, hostname, 0)
    }

    /// Like [`SvcWorker::connect`], continuing after sequence number `seq`.
    pub fn connect_from(c: &Conductor, e: &Enrolled, hostname: &str, seq: u64) -> SvcWorker {
        let seq = Arc::new(AtomicU64::new(seq));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let publishes = Arc::new(AtomicUsize::new(0));
        let (secret, id) = (e.secret.clone(), e.id.clone());
        let formats = Arc::new(Mutex::new(Vec::new()));
        let (seq2, commands2, pubs2) = (seq.clone(), commands.clone(), publishes.clone());
        let formats2 = formats.clone();
        let handler: OnPublish = Box::new(move |client: &Client, p: &rumqttc::Publish| {
            pubs2.fetch_add(1, Ordering::SeqCst);
            let Ok(opened) = protocol::open(&p.payload, &id) else {
                return;
            };
            let Ok(env) = opened.verify(&secret) else {
                return;
            };
            formats2.lock().unwrap().push(env.version);
            if let Body::Command(cmd) = env.body {
                let detail = match &cmd.action {
                    Action::Start(_) => "started",
                    Action::Stop(_) => "stopped",
                    Action::Restart(_) => "restarted",
                    _ => "ok",
                };
                commands2.lock().unwrap().push((cmd.id, cmd.action));
                let reply = Body::Reply(protocol::Reply {
                    cmd_id: cmd.id,
                    status: protocol::ReplyStatus::Ok,
                    detail: protocol::bounded(detail),
                });
                let n = seq2.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = client.try_publish(
                    topic(&id, TopicKind::Reply),
                    QoS::AtLeastOnce,
                    false,
                    seal(&secret, &id, n, reply),
                );
            }
        });
        let (client, t) = connect(
            c.started.mqtt_addr,
            &e.id,
            &e.username,
            &e.password,
            Some(handler),
        )
        .unwrap();
        client
            .subscribe(topic(&e.id, TopicKind::Cmd), QoS::AtLeastOnce)
            .unwrap();
        std::thread::sleep(Duration::from_millis(200)); // let the SubAck land
        let w = SvcWorker {
            id: e.id.clone(),
            secret: e.secret.clone(),
            client,
            seq,
            commands,
            formats,
            publishes,
            _t: t,
        };
        // Online for 75 s.
        w.send(birth(hostname, 60_000), TopicKind::Birth);
        w
    }

    pub fn send(&self, body: Body, kind: TopicKind) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.client
            .publish(
                topic(&self.id, kind),
                QoS::AtLeastOnce,
                false,
                seal(&self.secret, &self.id, n, body),
            )
            .unwrap();
    }

    pub fn report(&self, name: &str, version: u32, state: ServiceState) {
        self.send(
            Body::ServiceStatus(protocol::ServiceStatus {
                name: protocol::bounded(name),
                version,
                state,
                pid: if state == ServiceState::Running {
                    4242
                } else {
                    0
                },
                restarts: 0,
                exit_code: None,
                detail: protocol::bounded(""),
            }),
            TopicKind::Services,
        );
    }

    pub fn actions(&self) -> Vec<Action> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Waits until a command matching `f` has been received; returns its id too.
    pub fn wait_command(&self, what: &str, f: impl Fn(&Action) -> bool) -> (u32, Action) {
        wait_for(&format!("{what} on {}", self.id), T, || {
            self.commands
                .lock()
                .unwrap()
                .iter()
                .find(|(_, a)| f(a))
                .cloned()
        })
    }

    /// Reports a state with a detail.
    pub fn report_detail(&self, name: &str, version: u32, state: ServiceState, detail: &str) {
        self.send(
            Body::ServiceStatus(protocol::ServiceStatus {
                name: protocol::bounded(name),
                version,
                state,
                pid: 4242,
                restarts: 0,
                exit_code: None,
                detail: protocol::bounded(detail),
            }),
            TopicKind::Services,
        );
    }

    /// `Authorization` for a worker download of `path`.
    pub fn http_auth(&self, path: &str) -> String {
        protocol::manifest::http_auth(&self.secret, &self.id, "GET", path)
    }

    /// Waits until an action matching `f` has been received.
    pub fn wait_action(&self, what: &str, f: impl Fn(&Action) -> bool) -> Action {
        wait_for(&format!("{what} on {}", self.id), T, || {
            self.actions().into_iter().find(|a| f(a))
        })
    }
}

/// A raw HTTP request; returns status, headers and body bytes.
pub fn http_raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(body).unwrap();
    let mut resp = agent().run(req).unwrap();
    let code = resp.status().as_u16();
    let hs = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap_or_default();
    (code, hs, bytes)
}

pub fn enroll_labels(c: &Conductor, host: &str, labels: Value) -> Enrolled {
    let (code, v) = c.enroll(json!({
        "token": c.started.local_enroll_token,
        "hostname": host,
        "machine_id": format!("mid-{host}"),
        "labels": labels,
    }));
    assert_eq!(code, 200, "{v}");
    Enrolled::from_json(&v)
}

pub fn call(c: &Conductor, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    c.call(method, path, Some(&c.admin()), body)
}

/// A `DeployManifest` of `name` v`version`.
pub fn is_deploy(a: &Action, name: &str, version: u32) -> bool {
    matches!(a, Action::DeployManifest(m) if m.name.as_str() == name && m.version == version)
}

/// An `InstallManifest` (install stopped) of `name` v`version`.
pub fn is_install(a: &Action, name: &str, version: u32) -> bool {
    matches!(a, Action::InstallManifest(m) if m.name.as_str() == name && m.version == version)
}

pub fn is_remove(a: &Action, name: &str) -> bool {
    matches!(a, Action::Remove(n) if n.as_str() == name)
}

pub fn target<'a>(svc: &'a Value, id: &str) -> &'a Value {
    svc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["worker_id"] == id)
        .unwrap_or_else(|| panic!("{id} not a target: {svc}"))
}

/// Fetches and verifies the manifest a `DeployManifest` (or an
/// `InstallManifest`) names, as a worker does.
pub fn fetch_manifest(c: &Conductor, w: &SvcWorker, a: &Action) -> protocol::Manifest {
    let (Action::DeployManifest(m) | Action::InstallManifest(m)) = a else {
        panic!("not a DeployManifest: {a:?}")
    };
    let path = format!("/api/v1/agent/manifests/{}/{}", m.name, m.version);
    let auth = w.http_auth(&path);
    let (code, _, bytes) = http_raw("GET", &c.url(&path), &[("Authorization", &auth)], vec![]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&bytes));
    protocol::Manifest::decode_verified(&bytes, m).unwrap()
}
