//! The system under test: a conductor process (embedded broker, or an
//! external Mosquitto started here), its HTTP API, and enrolment.
//!
//! The conductor is started like `e2e::Conductor` does, plus
//! `AEREKOS_RATE_LIMIT_BURST=0`: the per-IP enrolment limit (10 attempts,
//! one more every 6 s) would otherwise throttle thousands of enrolments
//! from 127.0.0.1 (`conductor/src/config.rs`, `state.rs::RateLimiter`).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::{free_port, wait_for, Proc, ADMIN_PASSWORD};
use serde_json::{json, Value};

use crate::sim::Identity;

/// Which broker the fleet and the conductor use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The conductor's embedded rumqttd.
    Embedded,
    /// An external Mosquitto (`--mqtt-url`).
    Mosquitto,
    /// One NATS node with JetStream and its MQTT gateway (`--mqtt-url`):
    /// the scale-out mode's bus, one node of it.
    Nats,
}

impl BrokerKind {
    /// Short label.
    pub fn label(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded",
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Nats => "nats",
        }
    }
}

/// A running conductor (and Mosquitto or NATS), killed on drop.
pub struct Target {
    /// The conductor process.
    pub conductor: Proc,
    /// The external broker's process (Mosquitto or the NATS node), when used.
    pub broker: Option<Proc>,
    /// The NATS node, when used (its process is taken into `broker`).
    _nats: Option<e2e::nats::NatsCluster>,
    /// HTTP API address.
    pub http: SocketAddr,
    /// Broker address (embedded or Mosquitto).
    pub mqtt: SocketAddr,
    /// Admin bearer token.
    pub admin: String,
    agent: ureq::Agent,
    _dir: tempfile::TempDir,
}

/// A keep-alive HTTP client that reports statuses instead of erroring.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn read(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let body = r
                .body_mut()
                .with_config()
                .limit(256 << 20)
                .read_to_string()
                .unwrap_or_default();
            let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
            (status, v)
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

fn mosquitto_bin() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Starts Mosquitto on a free loopback port with limits fit for 10,000+
/// clients (no connection cap, a deep queue for the conductor's session,
/// no persistence: it would only add disk writes to the measurement).
fn start_mosquitto(dir: &Path) -> (Proc, u16) {
    let bin = mosquitto_bin()
        .expect("mosquitto is not installed (apt-get install mosquitto; .ci/run installs it)");
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
             max_queued_messages 1000000\nmax_inflight_messages 100\npersistence false\n\
             set_tcp_nodelay true\n\
             log_dest stdout\nlog_type error\nlog_type warning\n"
        ),
    )
    .expect("write mosquitto.conf");
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let proc = Proc::spawn(cmd, dir.join("mosquitto.log"));
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("mosquitto to listen", Duration::from_secs(10), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    });
    (proc, port)
}

impl Target {
    /// Starts the conductor `bin` (and Mosquitto or NATS, by `kind`).
    pub fn start(kind: BrokerKind, bin: &Path) -> Target {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args: Vec<String> = Vec::new();
        let mut env: Vec<(&str, &str)> = Vec::new();
        let (broker, nats) = match kind {
            BrokerKind::Embedded => (None, None),
            BrokerKind::Mosquitto => {
                let (proc, port) = start_mosquitto(dir.path());
                args.push("--mqtt-url".into());
                args.push(format!("mqtt://127.0.0.1:{port}"));
                (Some(proc), None)
            }
            BrokerKind::Nats => {
                let mut nats = e2e::nats::NatsCluster::start(&dir.path().join("nats"), 1)
                    .expect("nats-server (tests/setup.sh installs it)");
                args.push("--mqtt-url".into());
                args.push(nats.conductor_url());
                let (u, p) = e2e::nats::WORKER_LOGIN;
                env.push(("AEREKOS_WORKER_MQTT_USERNAME", u));
                env.push(("AEREKOS_WORKER_MQTT_PASSWORD", p));
                (nats.nodes[0].take(), Some(nats))
            }
        };
        let data_dir = dir.path().join("conductor");
        fs::create_dir_all(&data_dir).expect("data dir");
        let runtime = data_dir.join("runtime.json");
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--mqtts-listen",
                "127.0.0.1:0",
            ])
            .args(&args)
            .env("AEREKOS_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("AEREKOS_RATE_LIMIT_BURST", "0")
            .env("RUST_LOG", "info")
            .envs(env);
        let mut conductor = Proc::spawn(cmd, dir.path().join("conductor.log"));
        let pid = conductor.pid();
        let deadline = Instant::now() + Duration::from_secs(30);
        let info: Value = loop {
            if let Ok(text) = fs::read_to_string(&runtime) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if v["pid"].as_u64() == Some(u64::from(pid)) {
                        break v;
                    }
                }
            }
            assert!(
                conductor.alive() && Instant::now() < deadline,
                "conductor did not start:\n{}",
                conductor.tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let addr = |k: &str| -> SocketAddr {
            info[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("runtime.json {k}: {info}"))
        };
        let mut t = Target {
            http: addr("http_addr"),
            mqtt: addr("mqtt_addr"),
            conductor,
            broker,
            _nats: nats,
            admin: String::new(),
            agent: agent(),
            _dir: dir,
        };
        let (status, body) = t.post(
            "/api/v1/login",
            &json!({"username": "admin", "password": ADMIN_PASSWORD}),
        );
        assert_eq!(status, 200, "admin login: {body}");
        t.admin = body["token"].as_str().unwrap_or_default().to_string();
        t
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Authenticated GET.
    pub fn get(&self, path: &str) -> (u16, Value) {
        read(
            self.agent
                .get(format!("{}{path}", self.url()))
                .header("Authorization", format!("Bearer {}", self.admin))
                .call(),
        )
    }

    /// Authenticated POST of JSON (the admin token once known).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut req = self.agent.post(format!("{}{path}", self.url()));
        if !self.admin.is_empty() {
            req = req.header("Authorization", format!("Bearer {}", self.admin));
        }
        read(req.send_json(body))
    }

    /// Prometheus text of `GET /metrics`.
    pub fn prometheus(&self) -> String {
        match self.get("/metrics") {
            (200, Value::String(s)) => s,
            _ => String::new(),
        }
    }

    /// `GET /api/v1/health` (cheap: counters only).
    pub fn health(&self) -> Value {
        self.get("/api/v1/health").1
    }

    /// A fresh registration token.
    pub fn registration_token(&self) -> String {
        let (status, body) = self.post("/api/v1/registration-token/rotate", &json!({}));
        assert_eq!(status, 200, "rotate token: {body}");
        body["token"].as_str().unwrap_or_default().to_string()
    }

    /// The observer login of the embedded broker (`None` with an external one).
    pub fn observer(&self) -> Option<(String, String)> {
        let (_, body) = self.get("/api/v1/mqtt");
        Some((
            body["observer_username"].as_str()?.to_string(),
            body["observer_password"].as_str()?.to_string(),
        ))
    }
}

/// Parses `mqtt://host:port`.
fn parse_mqtt_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("mqtt://")?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// Outcome of [`enrol_all`].
pub struct Enrolled {
    /// One identity per worker that enrolled.
    pub idents: Vec<Identity>,
    /// Requests retried (429, 5xx, transport errors).
    pub retries: u64,
    /// Workers that gave up.
    pub failed: usize,
    /// Wall time.
    pub elapsed: Duration,
}

/// Enrols `n` workers through `POST /api/v1/enroll` from `threads`
/// concurrent keep-alive clients.
pub fn enrol_all(t: &Target, token: &str, n: usize, threads: usize) -> Enrolled {
    let url = format!("{}/api/v1/enroll", t.url());
    let next = AtomicUsize::new(0);
    let retries = AtomicU64::new(0);
    let out: Mutex<Vec<Option<Identity>>> = Mutex::new(vec![None; n]);
    let inventory = serde_json::to_value(protocol::examples::birth()).unwrap_or(Value::Null);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let agent = agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let body = json!({
                        "token": token,
                        "hostname": format!("sim-{i:05}"),
                        "machine_id": format!("fleet-sim-{}-{i}", std::process::id()),
                        "labels": {"fleet": "sim"},
                        "inventory": inventory,
                    });
                    for attempt in 0..30u64 {
                        let (status, v) = read(agent.post(&url).send_json(&body));
                        if status == 200 {
                            let ident = (|| {
                                let (host, port) = parse_mqtt_url(v["mqtt_url"].as_str()?)?;
                                Some(Identity {
                                    id: v["worker_id"].as_str()?.to_string(),
                                    secret: protocol::Secret::from_hex(v["secret"].as_str()?)
                                        .ok()?,
                                    host,
                                    port,
                                    username: v["mqtt_username"].as_str()?.to_string(),
                                    password: v["mqtt_password"]
                                        .as_str()
                                        .unwrap_or_default()
                                        .to_string(),
                                })
                            })();
                            if let Ok(mut o) = out.lock() {
                                o[i] = ident;
                            }
                            break;
                        }
                        if status != 0 && status != 429 && status < 500 {
                            eprintln!("enrolment {i} refused: HTTP {status} {v}");
                            break;
                        }
                        retries.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let all = out.into_inner().unwrap_or_default();
    let failed = all.iter().filter(|o| o.is_none()).count();
    Enrolled {
        idents: all.into_iter().flatten().collect(),
        retries: retries.load(Ordering::Relaxed),
        failed,
        elapsed,
    }
}
