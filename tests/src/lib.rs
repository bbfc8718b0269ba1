//! Harness for end-to-end tests: starts the real `conductor` and
//! `edge-worker` binaries (and, where a test needs an external broker, a real
//! Mosquitto) on ephemeral ports in temp dirs, and talks to them the way a
//! user would: HTTP API, MQTT, signals.
//!
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing running. Each process's output goes to a log file in its temp dir;
//! on a failed wait the log tail is printed.

#![allow(clippy::unwrap_used)] // test harness: a panic is a failure report

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod agent_release;
pub mod docker;
pub mod nats;
pub mod pcap;
pub mod services;

/// Admin password every test conductor is started with.
pub const ADMIN_PASSWORD: &str = "e2e-admin-password-Xq7";

/// The workspace binaries the tests run.
pub const BINARIES: [&str; 4] = ["conductor", "edge-worker", "aerekos", "test-service"];

/// Directory holding the workspace's built binaries: the profile dir
/// (`target/debug` for tests, `target/release` for the benchmarks).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Tests live in target/<profile>/deps/, bench binaries in target/<profile>/.
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let have = |n: &str| dir.join(n).is_file();
        if !BINARIES.iter().all(|b| have(b)) || stale(&dir) {
            // `cargo test --workspace` builds both binaries (their packages have
            // integration tests); when this crate runs alone, build them.
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args([
                "build",
                "-p",
                "conductor",
                "-p",
                "edge-worker",
                "-p",
                "aerekos-cli",
                "-p",
                "aerekos-test-service",
                "--bins",
            ]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building {BINARIES:?} failed");
        }
        dir
    })
}

/// True when a source file is newer than the binaries (e.g. after
/// `cargo test -p aerekos-e2e`, which does not rebuild other packages' bins).
fn stale(dir: &Path) -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = [
        "protocol/src",
        "conductor/src",
        "conductor/assets",
        "edge-worker/src",
        "cli/src",
        "tests/test-service/src",
    ]
    .iter()
    .map(|d| newest_mtime(&root.join(d)))
    .max()
    .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    BINARIES.iter().any(|b| {
        fs::metadata(dir.join(b))
            .and_then(|m| m.modified())
            .map_or(true, |t| t < src)
    })
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A free loopback port that no `bind(:0)` can be given meanwhile.
pub use test_support::free_port;

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies the files (not subdirectories) of `from` into `to`: one
/// conductor's TLS material for another.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A child process killed (SIGKILL) on drop, with its output in `log`.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Combined stdout+stderr of the process.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log,
        }
    }

    /// OS pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to 10 s for exit (then SIGKILL).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Is it still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process's output so far.
    pub fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The last `n` lines of output, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking HTTP client that reports statuses instead of erroring on them.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .build()
        .into()
}

/// Like [`http`], for `https://` trusting only the CA in `ca_pem` (PEM).
pub fn https(ca_pem: &str) -> ureq::Agent {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM");
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
            ureq::tls::Certificate::from_der(ca.as_ref()).to_owned(),
        ])))
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .tls_config(tls)
        .build()
        .into()
}

/// A rustls client configuration trusting only the CA in `ca_pem`.
pub fn tls_client_config(ca_pem: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The remote addresses of the established TCP connections process `pid`
/// holds (from `/proc/<pid>/fd` and `/proc/net/tcp{,6}`; IPv4 peers only).
pub fn tcp_peers_of(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut peers = Vec::new();
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "01" || !inodes.contains(f[9]) {
            continue;
        }
        if let Some((ip, port)) = f[2].split_once(':') {
            if let (Ok(ip), Ok(port)) = (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16))
            {
                // /proc prints the in-memory (network order) address as a
                // host-order number.
                let ip = std::net::Ipv4Addr::from(ip.to_ne_bytes());
                peers.push(SocketAddr::from((ip, port)));
            }
        }
    }
    peers
}

/// Reads a response into (status, JSON or text).
pub fn read(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let body = r.body_mut().read_to_string().unwrap_or_default();
            let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
            (status, v)
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

/// A running conductor process.
#[derive(Debug)]
pub struct Conductor {
    /// The process.
    pub proc: Proc,
    /// Its data dir (kept across restarts by the test).
    pub data_dir: PathBuf,
    /// Extra arguments it was started with (reused on restart).
    pub args: Vec<String>,
    /// Extra environment it was started with (reused on restart).
    pub env: Vec<(String, String)>,
    /// HTTP API address.
    pub http: SocketAddr,
    /// MQTT address the conductor serves (embedded) or uses (external).
    pub mqtt: SocketAddr,
    /// The embedded broker's MQTT-over-TLS address (none with `--no-tls`
    /// or an external broker).
    pub mqtts: Option<SocketAddr>,
    /// SHA-256 of the CA the conductor's TLS chain ends in.
    pub ca_fingerprint: Option<String>,
    /// Admin bearer token.
    pub admin: String,
}

impl Conductor {
    /// Starts a conductor with the embedded broker on ephemeral ports.
    pub fn start(data_dir: &Path) -> Conductor {
        Conductor::start_with(data_dir, &[])
    }

    /// Starts a conductor with extra CLI arguments (e.g. `--mqtt-url`).
    pub fn start_with(data_dir: &Path, args: &[&str]) -> Conductor {
        Conductor::start_with_env(data_dir, args, &[])
    }

    /// Starts a conductor with extra CLI arguments and environment
    /// (`AEREKOS_*` settings without a flag).
    pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Conductor {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Conductor::spawn(
            data_dir.to_path_buf(),
            args,
            env,
            ["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"],
        )
    }

    /// `listen`: HTTP, MQTT and MQTT-over-TLS listen addresses.
    fn spawn(
        data_dir: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        listen: [&str; 3],
    ) -> Conductor {
        let [http, mqtt, mqtts] = listen;
        fs::create_dir_all(&data_dir).unwrap();
        let runtime = data_dir.join("runtime.json");
        let _ = fs::remove_file(&runtime);
        let mut cmd = Command::new(bin("conductor"));
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .args(["--http-listen", http, "--mqtt-listen", mqtt])
            .args(["--mqtts-listen", mqtts])
            .args(&args)
            .env("AEREKOS_ADMIN_PASSWORD", ADMIN_PASSWORD)
            // A start-up error is shown as its message chain, not buried
            // under a captured backtrace (the tail below is 40 lines).
            .env("RUST_LIB_BACKTRACE", "0")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn(cmd, data_dir.join("conductor.log"));
        let pid = proc.pid();
        let deadline = Instant::now() + Duration::from_secs(30);
        let info: Value = loop {
            if let Ok(text) = fs::read_to_string(&runtime) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if v["pid"].as_u64() == Some(u64::from(pid)) {
                        break v;
                    }
                }
            }
            if !proc.alive() || Instant::now() > deadline {
                panic!("conductor did not start:\n{}", proc.tail(40));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let http: SocketAddr = info["http_addr"].as_str().unwrap().parse().unwrap();
        let mqtt: SocketAddr = info["mqtt_addr"].as_str().unwrap().parse().unwrap();
        let mqtts = info["mqtts_addr"].as_str().map(|a| a.parse().unwrap());
        let ca_fingerprint = info["ca_fingerprint"].as_str().map(str::to_string);
        let mut c = Conductor {
            proc,
            data_dir,
            args,
            env,
            http,
            mqtt,
            mqtts,
            ca_fingerprint,
            admin: String::new(),
        };
        let (status, body) = c.post(
            "/api/v1/login",
            &json!({"username": "admin", "password": ADMIN_PASSWORD}),
        );
        assert_eq!(status, 200, "admin login: {body}\n{}", c.proc.tail(20));
        c.admin = body["token"].as_str().unwrap().to_string();
        c
    }

    /// Starts a conductor listening on `listen` (HTTP, MQTT, MQTT over
    /// TLS), e.g. `0.0.0.0:<port>` to be reached from another address.
    pub fn start_on(data_dir: &Path, args: &[&str], listen: [&str; 3]) -> Conductor {
        Conductor::spawn(
            data_dir.to_path_buf(),
            args.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
            listen,
        )
    }

    /// Starts a standby of `self` in `data_dir` with `args` and `env`, the
    /// way active/standby is deployed: `self`'s TLS material copied and,
    /// like a floating address, `self`'s HTTP address. Returns once the
    /// standby says it is standing by; the handle yields it when it has
    /// taken over and serves.
    pub fn standby(
        &self,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::thread::JoinHandle<Conductor> {
        self.standby_on(data_dir, self.http, args, env)
    }

    /// [`Conductor::standby`] on an HTTP address of its own (`http`), as
    /// on another host: agents reach it through their `--conductor` list.
    pub fn standby_on(
        &self,
        data_dir: &Path,
        http: SocketAddr,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::thread::JoinHandle<Conductor> {
        copy_dir(&self.data_dir.join("tls"), &data_dir.join("tls"));
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (dir, args, http) = (data_dir.to_path_buf(), own(args), http.to_string());
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let handle = std::thread::spawn(move || {
            Conductor::spawn(dir, args, env, [&http, "127.0.0.1:0", "127.0.0.1:0"])
        });
        wait_for("the standby standing by", Duration::from_secs(20), || {
            fs::read_to_string(data_dir.join("conductor.log"))
                .ok()
                .filter(|log| log.contains("standby"))
        });
        handle
    }

    /// The fleet CA certificate (PEM) the conductor made.
    pub fn ca_pem(&self) -> String {
        fs::read_to_string(self.data_dir.join("tls").join("ca.pem")).expect("tls/ca.pem")
    }

    /// `https://127.0.0.1:<port>` of the HTTP API (same port as plain).
    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.http.port())
    }

    /// `kill -9` then start again on the same data dir and the same ports
    /// (workers keep the URLs they enrolled with).
    pub fn restart_after_kill9(&mut self) {
        self.proc.kill9();
        let (http, mqtt) = (self.http.to_string(), self.mqtt.to_string());
        let mqtts = self
            .mqtts
            .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let next = Conductor::spawn(
            self.data_dir.clone(),
            self.args.clone(),
            self.env.clone(),
            [&http, &mqtt, &mqtts],
        );
        *self = next;
    }

    /// Base URL of the HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Authenticated GET.
    pub fn get(&self, path: &str) -> (u16, Value) {
        read(
            http()
                .get(format!("{}{path}", self.url()))
                .header("Authorization", format!("Bearer {}", self.admin))
                .call(),
        )
    }

    /// GET without credentials, body as text.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        match http().get(format!("{}{path}", self.url())).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Authenticated POST of JSON (the admin token is sent when set).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut req = http().post(format!("{}{path}", self.url()));
        if !self.admin.is_empty() {
            req = req.header("Authorization", format!("Bearer {}", self.admin));
        }
        read(req.send_json(body))
    }

    /// Authenticated PUT of JSON.
    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        read(
            http()
                .put(format!("{}{path}", self.url()))
                .header("Authorization", format!("Bearer {}", self.admin))
                .send_json(body),
        )
    }

    /// Authenticated DELETE.
    pub fn delete(&self, path: &str) -> (u16, Value) {
        read(
            http()
                .delete(format!("{}{path}", self.url()))
                .header("Authorization", format!("Bearer {}", self.admin))
                .call(),
        )
    }

    /// A fresh registration token (rotates it).
    pub fn registration_token(&self) -> String {
        let (status, body) = self.post("/api/v1/registration-token/rotate", &json!({}));
        assert_eq!(status, 200, "rotate token: {body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// `GET /api/v1/workers` as a list.
    pub fn workers(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/workers");
        assert_eq!(status, 200, "workers: {body}");
        match body {
            Value::Array(v) => v,
            other => other["workers"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// One worker's detail.
    pub fn worker(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/workers/{id}"));
        assert_eq!(status, 200, "worker {id}: {body}");
        body
    }

    /// The status string (`online`, `stale`, `offline`) of a worker.
    pub fn status_of(&self, id: &str) -> String {
        self.worker(id)["status"].as_str().unwrap_or("").to_string()
    }

    /// Raw metrics history points of a worker (all time).
    pub fn raw_history(&self, id: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!(
            "/api/v1/workers/{id}/metrics?from=0&to=99999999999999&resolution=raw"
        ));
        assert_eq!(status, 200, "history: {body}");
        match body {
            Value::Array(v) => v,
            other => other["points"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// Prometheus exposition text.
    pub fn prometheus(&self) -> String {
        let (status, text) = self.get_text("/metrics");
        assert_eq!(status, 200);
        text
    }

    /// Value of `aerekos_frames_rejected_total{reason="<reason>"}` (0 if absent).
    pub fn rejected(&self, reason: &str) -> f64 {
        metric(
            &self.prometheus(),
            &format!("aerekos_frames_rejected_total{{reason=\"{reason}\"}}"),
        )
    }

    /// MQTT credentials of the read-only observer login.
    pub fn observer(&self) -> (String, String) {
        let (status, body) = self.get("/api/v1/mqtt");
        assert_eq!(status, 200, "mqtt info: {body}");
        (
            body["observer_username"].as_str().unwrap().to_string(),
            body["observer_password"].as_str().unwrap().to_string(),
        )
    }
}

/// Reads one sample (`name{labels} value`) from Prometheus text; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A copy of one of the edge-worker's Raspberry Pi fixture trees
/// (`edge-worker/tests/fixtures/<name>`: `/sys` and `/proc` as a Pi has
/// them) at `to`, for `--host-root`: the test may change it under the
/// running agent (the firmware's throttling bits, say).
pub fn pi_host_root(name: &str, to: &Path) -> PathBuf {
    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_tree(&e.path(), &target);
            } else {
                fs::copy(e.path(), target).unwrap();
            }
        }
    }
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../edge-worker/tests/fixtures")
        .join(name);
    assert!(from.is_dir(), "no fixture {}", from.display());
    copy_tree(&from, to);
    to.to_path_buf()
}

/// The fixtures' `get_throttled` under a [`pi_host_root`].
pub fn pi_throttled_file(root: &Path) -> PathBuf {
    root.join("sys/devices/platform/soc/soc:firmware/get_throttled")
}

/// Options for an edge-worker process.
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    /// Metrics interval, ms.
    pub interval_ms: u64,
    /// Metrics batch period (`--batch`), ms; `None`: the interval, so every
    /// sample goes at once (as a one-sample `MetricsBatch` to a conductor
    /// that reads batches, which exercises that path in every test).
    pub batch_ms: Option<u64>,
    /// Hostname override.
    pub hostname: String,
    /// Machine id override.
    pub machine_id: String,
    /// Extra args.
    pub extra: Vec<String>,
}

impl WorkerOpts {
    /// A worker with `hostname`, a unique machine id and a 300 ms interval.
    pub fn named(hostname: &str) -> WorkerOpts {
        WorkerOpts {
            interval_ms: 300,
            batch_ms: None,
            hostname: hostname.to_string(),
            machine_id: format!("machine-{hostname}-{}", std::process::id()),
            extra: Vec::new(),
        }
    }
}

/// A running edge-worker process.
#[derive(Debug)]
pub struct Worker {
    /// The process.
    pub proc: Proc,
    /// Its state dir (identity, outbox).
    pub state_dir: PathBuf,
    /// How it was started.
    pub opts: WorkerOpts,
    /// The command that runs the agent (the native binary, or an emulator
    /// and an aarch64 binary); restarts reuse it.
    program: Vec<String>,
    conductor_url: String,
    token: Option<String>,
}

/// A dropped worker takes what it started with it: its hosted services
/// outlive it by design (a restarted worker adopts them), so without this
/// every test would leave them running (re-parented to init, their temp
/// dirs gone). Everything whose working directory or executable is under
/// the state dir is killed, also when the test fails.
impl Drop for Worker {
    fn drop(&mut self) {
        self.proc.kill9();
        test_support::reap::kill_processes_under(&self.state_dir);
    }
}

impl Worker {
    /// Starts an edge-worker enrolling with `conductor_url` using `token`.
    pub fn start(
        state_dir: &Path,
        conductor_url: &str,
        token: Option<&str>,
        opts: WorkerOpts,
    ) -> Worker {
        let native = bin("edge-worker").to_string_lossy().into_owned();
        Worker::start_with_program(&[&native], state_dir, conductor_url, token, opts)
    }

    /// Like [`Worker::start`], but the agent is run by `program`, e.g.
    /// `[qemu-aarch64-static, target/aarch64-unknown-linux-musl/release/edge-worker]`.
    pub fn start_with_program(
        program: &[&str],
        state_dir: &Path,
        conductor_url: &str,
        token: Option<&str>,
        opts: WorkerOpts,
    ) -> Worker {
        fs::create_dir_all(state_dir).unwrap();
        let cmd = worker_command(program, state_dir, conductor_url, token, &opts);
        Worker {
            proc: Proc::spawn(cmd, state_dir.with_extension("log")),
            state_dir: state_dir.to_path_buf(),
            opts,
            program: program.iter().map(|s| s.to_string()).collect(),
            conductor_url: conductor_url.to_string(),
            token: token.map(str::to_string),
        }
    }

    /// `kill -9`s the worker and starts it again (same program, same state
    /// dir) without a token: its identity is stored.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.token = None;
        let program: Vec<&str> = self.program.iter().map(String::as_str).collect();
        let cmd = worker_command(
            &program,
            &self.state_dir,
            &self.conductor_url,
            None,
            &self.opts,
        );
        self.proc = Proc::spawn(cmd, self.state_dir.with_extension("log"));
    }

    /// The worker id from its state file, once enrolled.
    pub fn id(&self) -> Option<String> {
        let text = fs::read_to_string(self.state_dir.join("state.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["worker_id"].as_str().map(str::to_string)
    }

    /// Waits for enrolment; the worker id.
    #[track_caller]
    pub fn wait_id(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(id) = self.id() {
                return id;
            }
            if Instant::now() > deadline || !self.proc.alive() {
                panic!("worker did not enrol:\n{}", self.proc.tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The frame secret from its state file.
    pub fn secret(&self) -> protocol::Secret {
        let text = fs::read_to_string(self.state_dir.join("state.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        protocol::Secret::from_hex(v["secret"].as_str().unwrap()).unwrap()
    }

    /// Its MQTT username and password from the state file.
    pub fn mqtt_login(&self) -> (String, String) {
        let text = fs::read_to_string(self.state_dir.join("state.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        (
            v["mqtt_username"].as_str().unwrap_or_default().to_string(),
            v["mqtt_password"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// A real Mosquitto broker on a loopback port, anonymous access allowed.
#[derive(Debug)]
pub struct Mosquitto {
    /// The process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
}

/// Path of the mosquitto binary; panics with an install hint when missing.
pub fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it");
}

impl Mosquitto {
    /// Starts mosquitto in `dir` on a free port, with persistence so the
    /// conductor's persistent session survives a broker restart.
    pub fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let proc = Mosquitto::spawn(dir, port);
        Mosquitto {
            proc,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn spawn(dir: &Path, port: u16) -> Proc {
        fs::create_dir_all(dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "user root\nlistener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nset_tcp_nodelay true\nlog_dest stdout\n",
                port,
                dir.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(mosquitto_bin());
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(cmd, dir.join("mosquitto.log"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        proc
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker cleanly (it saves its persistence file).
    pub fn stop(&mut self) {
        self.proc.terminate();
    }

    /// Starts it again on the same port.
    pub fn start_again(&mut self) {
        self.proc = Mosquitto::spawn(&self.dir, self.port);
    }
}

/// A Mosquitto with a TLS listener (its own CA, made here) and the
/// dynamic-security plugin, whose admin the conductor logs in as: the
/// external-broker set-up `conductor mosquitto-config` describes.
#[derive(Debug)]
pub struct SecureMosquitto {
    /// The process.
    pub proc: Proc,
    /// The TLS port (127.0.0.1).
    pub port: u16,
    /// The CA (PEM) the broker's certificate is signed by.
    pub ca_pem: String,
    /// Where the CA is, for `--mqtt-ca`.
    pub ca_file: PathBuf,
}

/// The dynamic-security admin [`SecureMosquitto`] creates.
pub const MOSQUITTO_ADMIN: (&str, &str) = ("conductor", "mosquitto-admin-pw");

impl SecureMosquitto {
    /// Starts one in `dir`; `None` (after a message) when the plugin or
    /// `mosquitto_ctrl` is missing, unless `AEREKOS_REQUIRE_MOSQUITTO=1`.
    pub fn start(dir: &Path) -> Option<SecureMosquitto> {
        let plugin = [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib",
        ]
        .iter()
        .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.is_file());
        let ctrl = Path::new("/usr/bin/mosquitto_ctrl");
        let (Some(plugin), true) = (plugin, ctrl.is_file()) else {
            assert!(
                std::env::var("AEREKOS_REQUIRE_MOSQUITTO").as_deref() != Ok("1"),
                "the dynamic-security plugin or mosquitto_ctrl is missing (apt-get install mosquitto)"
            );
            eprintln!("SKIP: Mosquitto's dynamic-security plugin or mosquitto_ctrl is missing");
            return None;
        };
        fs::create_dir_all(dir).unwrap();
        // A CA and a server certificate for 127.0.0.1.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test broker CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_file = dir.join("ca.pem");
        fs::write(&ca_file, ca.pem()).unwrap();
        fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        let dynsec = dir.join("dynamic-security.json");
        let out = Command::new(ctrl)
            .args(["dynsec", "init"])
            .arg(&dynsec)
            .args([MOSQUITTO_ADMIN.0, MOSQUITTO_ADMIN.1])
            .output()
            .unwrap();
        assert!(out.status.success(), "mosquitto_ctrl dynsec init: {out:?}");
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings false\nallow_anonymous false\nplugin {}\nplugin_opt_config_file {}\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nset_tcp_nodelay true\nlog_dest stdout\n",
                plugin.display(),
                dynsec.display(),
                ca_file.display(),
                dir.join("server.pem").display(),
                dir.join("server.key").display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(mosquitto_bin());
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(cmd, dir.join("mosquitto.log"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("mosquitto (TLS) to listen", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        Some(SecureMosquitto {
            proc,
            port,
            ca_pem: ca.pem(),
            ca_file,
        })
    }

    /// The conductor's `--mqtt-url`, as the dynamic-security admin.
    pub fn conductor_url(&self) -> String {
        format!(
            "mqtts://{}:{}@127.0.0.1:{}",
            MOSQUITTO_ADMIN.0, MOSQUITTO_ADMIN.1, self.port
        )
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A plain MQTT client for sniffing and forging.
pub struct MqttClient {
    /// The client.
    pub client: rumqttc::Client,
    rx: std::sync::mpsc::Receiver<(String, Vec<u8>, bool)>,
    /// Return codes of each SUBACK, in order.
    subacks: std::sync::mpsc::Receiver<Vec<rumqttc::SubscribeReasonCode>>,
    /// Set when the connection broke after the ConnAck.
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MqttClient")
    }
}

impl MqttClient {
    /// Connects to `addr` with optional credentials; waits for the ConnAck.
    /// `None` when the broker refuses the login.
    pub fn connect(addr: SocketAddr, client_id: &str, login: Option<(&str, &str)>) -> Option<Self> {
        MqttClient::connect_with(addr, client_id, login, &[])
    }

    /// Connects with a persistent session (clean session off) subscribed to
    /// `filters`, resubscribing after every reconnect: a sniffer that sees
    /// every message across broker restarts (with a persistent broker).
    pub fn connect_with(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
        filters: &[&str],
    ) -> Option<Self> {
        MqttClient::connect_full(addr, client_id, login, filters, None)
    }

    /// Connects over TLS trusting the CA in `ca_pem`.
    pub fn connect_tls(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
        ca_pem: &str,
    ) -> Option<Self> {
        MqttClient::connect_full(addr, client_id, login, &[], Some(tls_client_config(ca_pem)))
    }

    fn connect_full(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
        filters: &[&str],
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Option<Self> {
        let mut opts = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        if let Some(config) = tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
        if !filters.is_empty() {
            opts.set_clean_session(false);
        }
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut conn) = rumqttc::Client::new(opts, 1000);
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        let (suback_tx, subacks) = std::sync::mpsc::channel();
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped_flag = dropped.clone();
        let resubscriber = client.clone();
        std::thread::spawn(move || {
            let mut connected = false;
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) => {
                        let _ = suback_tx.send(a.return_codes);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                        connected = true;
                        for f in &filters {
                            let _ = resubscriber.try_subscribe(f, rumqttc::QoS::AtLeastOnce);
                        }
                        let _ = ack_tx.send(a.code == rumqttc::ConnectReturnCode::Success);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx
                            .send((p.topic.clone(), p.payload.to_vec(), p.retain))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(_)) => {
                        let _ = ack_tx.send(false);
                        return;
                    }
                    Err(_) => {
                        // Before the first ConnAck this reports failure to
                        // `connect`; afterwards the connection retries.
                        if connected {
                            dropped_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        let _ = ack_tx.send(false);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        });
        match ack_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(true) => Some(MqttClient {
                client,
                rx,
                subacks,
                dropped,
            }),
            _ => None,
        }
    }

    /// Subscribes and returns the SUBACK's return codes.
    pub fn subscribe_acked(&self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        while self.subacks.try_recv().is_ok() {}
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .unwrap();
        self.subacks
            .recv_timeout(Duration::from_secs(10))
            .expect("a SUBACK")
    }

    /// Whether the broker closed the connection after it was established.
    pub fn was_dropped(&self) -> bool {
        self.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Subscribes (QoS 1) and gives the broker a moment to register it.
    pub fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Publishes raw bytes (QoS 1).
    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// Next message within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<(String, Vec<u8>, bool)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits for a message matching `pred`.
    pub fn recv_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str, &[u8]) -> bool,
    ) -> Option<(String, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let (t, p, _) = self.recv(left)?;
            if pred(&t, &p) {
                return Some((t, p));
            }
        }
        None
    }
}

// ---- Emulated Pi workers: the aarch64 agent under qemu user mode ----

/// The Rust target of the agent for 64-bit Raspberry Pi OS (Pi 3/4/5).
pub const PI_TARGET: &str = "aarch64-unknown-linux-musl";

/// Cargo's target directory: the nearest ancestor of this executable
/// holding the `CACHEDIR.TAG` cargo writes there (so `--target` and
/// `CARGO_TARGET_DIR` layouts work too), else the parent of [`bin_dir`].
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    match exe
        .ancestors()
        .skip(1)
        .find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        Some(dir) => dir.to_path_buf(),
        None => bin_dir().parent().expect("target dir").to_path_buf(),
    }
}

/// Newest modification time of a file, or of any file below a directory.
pub fn newest_mtime(path: &Path) -> std::time::SystemTime {
    let epoch = std::time::SystemTime::UNIX_EPOCH;
    let Ok(meta) = fs::metadata(path) else {
        return epoch;
    };
    if !meta.is_dir() {
        return meta.modified().unwrap_or(epoch);
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| newest_mtime(&e.path()))
                .max()
                .unwrap_or(epoch)
        })
        .unwrap_or(epoch)
}

/// The release edge-worker for [`PI_TARGET`]
/// (`target/aarch64-unknown-linux-musl/release/edge-worker`, what `cargo pi`
/// builds). When it is missing or older than the agent's sources, this runs
/// `cargo build --release -p edge-worker --target aarch64-unknown-linux-musl`
/// first, so a fresh clone's `cargo test --workspace` works (CI builds it
/// before the tests, which makes this a no-op).
pub fn pi_worker_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        pi_build(
            "edge-worker",
            "edge-worker",
            &[
                "protocol/src",
                "protocol/Cargo.toml",
                "edge-worker/src",
                "edge-worker/Cargo.toml",
            ],
        )
    })
}

/// The release `test-service` for [`PI_TARGET`], built like [`pi_worker_bin`].
pub fn pi_test_service_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        pi_build(
            "aerekos-test-service",
            "test-service",
            &["tests/test-service/src", "tests/test-service/Cargo.toml"],
        )
    })
}

/// The release `test-service` for `x86_64-unknown-linux-musl` (static, for
/// `FROM scratch` test images), built like [`pi_worker_bin`].
pub fn static_test_service_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        build_for(
            "x86_64-unknown-linux-musl",
            "aerekos-test-service",
            "test-service",
            &["tests/test-service/src", "tests/test-service/Cargo.toml"],
        )
    })
}

fn pi_build(package: &str, bin_name: &str, source_dirs: &[&str]) -> PathBuf {
    build_for(PI_TARGET, package, bin_name, source_dirs)
}

fn build_for(triple: &str, package: &str, bin_name: &str, source_dirs: &[&str]) -> PathBuf {
    let target = target_dir();
    let bin = target.join(triple).join("release").join(bin_name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = source_dirs
        .iter()
        .chain(&["Cargo.lock"])
        .map(|p| newest_mtime(&root.join(p)))
        .max()
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    let built = fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if built.is_none_or(|t| t < sources) {
        eprintln!(
            "{} is {}: building it (cargo build --release -p {package} --target {triple})",
            bin.display(),
            if built.is_none() { "missing" } else { "stale" }
        );
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", package, "--target", triple])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "building the {triple} {bin_name} failed \
             (is the target installed? `rustup target add {triple}`)"
        );
    }
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

/// Makes the kernel run aarch64 ELF files through `qemu-aarch64-static`
/// (binfmt_misc with the `F` flag), so an emulated worker can exec the
/// aarch64 services it hosts. Registers the handler if it is missing and
/// this process may (root; mounts binfmt_misc if needed); otherwise returns
/// why not. `.ci/run` does the same before the tests.
pub fn ensure_binfmt_aarch64() -> Result<(), String> {
    ensure_binfmt(
        "aarch64",
        "7f454c460201010000000000000000000200b700",
        "\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00",
        &qemu_aarch64(),
    )
}

/// [`ensure_binfmt_aarch64`] for 32-bit ARM ELF files and `qemu-arm-static`
/// (the armv6/armv7 agents and the services they host; with the `F` flag
/// the interpreter also works inside a container's mount namespace).
pub fn ensure_binfmt_arm() -> Result<(), String> {
    ensure_binfmt(
        "arm",
        "7f454c4601010100000000000000000002002800",
        "\\x7fELF\\x01\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\x28\\x00",
        &qemu_user("arm"),
    )
}

/// Registers `qemu` for ELF headers matching `magic` (the rule's escaped
/// bytes; `magic_hex`, how /proc shows them) unless a handler is enabled.
fn ensure_binfmt(name: &str, magic_hex: &str, magic: &str, qemu: &Path) -> Result<(), String> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    let registered = || {
        fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                fs::read_to_string(e.path())
                    .is_ok_and(|t| t.starts_with("enabled") && t.contains(magic_hex))
            })
        })
    };
    if registered() {
        return Ok(());
    }
    if !dir.join("register").exists() {
        let _ = Command::new("mount")
            .args(["-t", "binfmt_misc", "binfmt_misc"])
            .arg(dir)
            .status();
    }
    // The mask: every byte but the ELF ABI version, and e_type 2 or 3.
    let mask = "\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff";
    let rule = format!(
        ":aerekos-qemu-{name}:M::{magic}:{mask}:{}:F",
        qemu.display()
    );
    fs::write(dir.join("register"), rule).map_err(|e| {
        format!(
            "cannot register qemu-{name} with binfmt_misc ({e}); run `sh tests/setup.sh` as root"
        )
    })?;
    if registered() {
        Ok(())
    } else {
        Err("binfmt_misc registration did not take".into())
    }
}

/// The ELF machine field of an executable (`EM_AARCH64` = 183, `EM_X86_64`
/// = 62, `EM_ARM` = 40); `None` if it is not a little-endian ELF file.
pub fn elf_machine(path: &Path) -> Option<u16> {
    let mut head = [0u8; 20];
    fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    (head[..4] == *b"\x7fELF" && head[5] == 1).then(|| u16::from_le_bytes([head[18], head[19]]))
}

/// Path of the aarch64 user-mode emulator (`qemu-aarch64-static`, else
/// `qemu-aarch64`, on `PATH`). Panics with the install hint when absent:
/// the emulated test must not pass by skipping.
pub fn qemu_aarch64() -> PathBuf {
    qemu_user("aarch64")
}

/// Path of the user-mode emulator for `arch` as qemu names it (`aarch64`,
/// `arm`): `qemu-<arch>-static`, else `qemu-<arch>`, on `PATH` or in
/// `/usr/bin`. Panics with the install hint when absent: an emulated test
/// must not pass by skipping.
pub fn qemu_user(arch: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [format!("qemu-{arch}-static"), format!("qemu-{arch}")] {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let candidate = dir.join(&name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "qemu-{arch}-static is not installed: the emulated {arch} edge-worker tests need it \
         (Debian/Ubuntu: apt-get install qemu-user-static; tests/setup.sh installs it)"
    );
}

/// The command line of an edge-worker run by `program` (its first element
/// is the executable, the rest come before the agent's own arguments).
fn worker_command(
    program: &[&str],
    state_dir: &Path,
    conductor_url: &str,
    token: Option<&str>,
    opts: &WorkerOpts,
) -> Command {
    let (exe, pre) = program.split_first().expect("a program");
    let mut cmd = Command::new(exe);
    cmd.args(pre)
        .arg("--conductor")
        .arg(conductor_url)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--interval", &format!("{}ms", opts.interval_ms)])
        .args([
            "--batch",
            &format!("{}ms", opts.batch_ms.unwrap_or(opts.interval_ms)),
        ])
        .args(["--hostname", &opts.hostname])
        .args(["--machine-id", &opts.machine_id])
        // Several workers share this machine: each gets its own local API port.
        .args(["--local-api", "127.0.0.1:0"])
        .args(&opts.extra)
        .env("AEREKOS_LOG", "info");
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    cmd
}

// ---- Chaos helpers (tests/tests/chaos.rs): process census, a TCP proxy ----
// ---- that can black-hole a link, libfaketime. Keep this block together. ----

/// Helpers for the chaos tests: counting service copies by command line,
/// a loopback TCP proxy that can be cut like a pulled cable, and running a
/// program under libfaketime with a clock the test moves.
pub mod chaos {
    use std::fs;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Pids of live processes whose command line contains `marker`
    /// (zombies have an empty command line and are not counted).
    pub fn pids_with(marker: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmd).contains(marker) {
                out.push(pid);
            }
        }
        out
    }

    /// `pid (ppid) cmdline` of each process, for failure messages.
    pub fn describe(pids: &[u32]) -> String {
        pids.iter()
            .map(|p| {
                let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .unwrap_or("?")
                    .to_string();
                let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!(
                    "{p} (ppid {ppid}) {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// A marker no other process on the machine has in its command line.
    pub fn unique_marker(prefix: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!("{prefix}-{}-{nanos}", std::process::id())
    }

    /// Seconds since boot (`/proc/uptime`), the clock the worker reports
    /// as `uptime_s` in every metrics sample.
    pub fn uptime_s() -> f64 {
        fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A loopback TCP proxy to `upstream` that can black-hole its traffic.
    ///
    /// [`BlackHoleProxy::cut`] stops forwarding in both directions without
    /// closing anything, like a pulled cable: bytes stay in the kernel's
    /// socket buffers, and new connections are accepted but not connected
    /// upstream (a client waits for an answer that never comes).
    /// [`BlackHoleProxy::restore`] resumes forwarding; a connection one end
    /// gave up on meanwhile is closed on the other end as soon as the proxy
    /// notices (read error or EOF). One thread per direction per connection.
    #[derive(Debug)]
    pub struct BlackHoleProxy {
        /// The port clients connect to.
        pub port: u16,
        cut: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
    }

    impl BlackHoleProxy {
        /// Listens on a free loopback port, forwarding to `upstream`.
        pub fn start(upstream: SocketAddr) -> BlackHoleProxy {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let cut = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let (c, s) = (cut.clone(), stop.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let (c, s) = (c.clone(), s.clone());
                    std::thread::spawn(move || connect_and_pump(client, upstream, c, s));
                }
            });
            BlackHoleProxy { port, cut, stop }
        }

        /// `mqtt://127.0.0.1:<port>`.
        pub fn mqtt_url(&self) -> String {
            format!("mqtt://127.0.0.1:{}", self.port)
        }

        /// Stops forwarding (nothing is closed).
        pub fn cut(&self) {
            self.cut.store(true, Ordering::SeqCst);
        }

        /// Resumes forwarding.
        pub fn restore(&self) {
            self.cut.store(false, Ordering::SeqCst);
        }
    }

    impl Drop for BlackHoleProxy {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            self.cut.store(false, Ordering::SeqCst);
            // Wake the accept loop so it sees `stop`.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
        }
    }

    fn connect_and_pump(
        client: TcpStream,
        upstream: SocketAddr,
        cut: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
    ) {
        // A connection made during a cut gets no upstream until the restore.
        while cut.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (cut2, stop2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || pump(c2, s2, cut2, stop2));
        pump(server, client, cut, stop);
    }

    fn pump(mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::SeqCst) {
            if cut.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }

    /// Path of `libfaketime.so.1`; panics with the install hint when missing.
    pub fn libfaketime() -> PathBuf {
        for p in [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
        ] {
            if Path::new(p).is_file() {
                return PathBuf::from(p);
            }
        }
        panic!("libfaketime is not installed (apt-get install faketime); .ci/run must install it");
    }

    /// A wall clock offset for programs run under libfaketime, moved by
    /// rewriting `FAKETIME_TIMESTAMP_FILE` (read on every time call with
    /// `FAKETIME_NO_CACHE=1`). The monotonic clock is left alone
    /// (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a device whose NTP daemon
    /// steps the wall clock.
    #[derive(Debug)]
    pub struct FakeClock {
        file: PathBuf,
    }

    impl FakeClock {
        /// A clock file in `dir`, starting at the real time (`+0`).
        pub fn new(dir: &Path) -> FakeClock {
            fs::create_dir_all(dir).unwrap();
            let clock = FakeClock {
                file: dir.join("faketime.rc"),
            };
            clock.set_offset_s(0);
            clock
        }

        /// Sets the wall clock to the real time plus `offset_s` seconds
        /// (atomically: a reader never sees a half-written file).
        pub fn set_offset_s(&self, offset_s: i64) {
            let tmp = self.file.with_extension("tmp");
            fs::write(&tmp, format!("{offset_s:+}\n")).unwrap();
            fs::rename(&tmp, &self.file).unwrap();
        }

        /// `env` + the libfaketime variables, to put in front of a program
        /// (e.g. for [`crate::Worker::start_with_program`]).
        pub fn program_prefix(&self) -> Vec<String> {
            vec![
                "/usr/bin/env".into(),
                format!("LD_PRELOAD={}", libfaketime().display()),
                format!("FAKETIME_TIMESTAMP_FILE={}", self.file.display()),
                "FAKETIME_NO_CACHE=1".into(),
                "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
            ]
        }
    }
}

/// The workspace's edge-worker built again with `AEREKOS_AGENT_VERSION` set
/// to `version` (it reports that version and runs a self-update's trial as
/// that release): the "newer agent" of the self-update tests. Built in the
/// test profile into `target/agent-<version>/` (its own target dir, so the
/// workspace's `edge-worker` is never overwritten and no build lock is
/// shared with the running `cargo test`); the first call builds it (about
/// as long as building the agent's dependencies once), later calls ask
/// cargo again, which is a no-op when it is fresh. Each call returns its
/// own copy of the binary.
pub fn agent_with_version(version: &str) -> PathBuf {
    let release = bin_dir().ends_with("release");
    agent_build(version, None, release)
}

/// Like [`agent_with_version`], the release agent for [`PI_TARGET`] (run it
/// under qemu: [`ensure_binfmt_aarch64`]), in
/// `target/agent-<version>/aarch64-unknown-linux-musl/release/`.
pub fn pi_agent_with_version(version: &str) -> PathBuf {
    agent_build(version, Some(PI_TARGET), true)
}

fn agent_build(version: &str, triple: Option<&str>, release: bool) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let target = target_dir().join(format!("agent-{version}"));
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", "edge-worker", "--bin", "edge-worker"])
        .arg("--target-dir")
        .arg(&target)
        .env("AEREKOS_AGENT_VERSION", version)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    if release {
        cmd.arg("--release");
    }
    let mut out = target.clone();
    if let Some(triple) = triple {
        cmd.args(["--target", triple]);
        out.push(triple);
    }
    out.push(if release { "release" } else { "debug" });
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building edge-worker {version} failed");
    let bin = out.join("edge-worker");
    assert!(bin.is_file(), "{} not built", bin.display());
    // Each caller gets its own copy: a later call may relink the shared
    // build (cargo decides by mtimes), and a test that compares a
    // worker's binary with the release it uploaded needs the bytes it
    // uploaded. A `cp` child, as a file this process held open for
    // writing could make another thread's exec fail with ETXTBSY.
    static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let copy = out.join(format!("edge-worker.{}.{n}", std::process::id()));
    let cp = Command::new("cp")
        .arg(&bin)
        .arg(&copy)
        .status()
        .expect("run cp");
    assert!(cp.success(), "cp {} failed", bin.display());
    copy
}
