//! End-to-end test support shared by the services' `tests/e2e.rs` (feature
//! `test-harness`; dev-dependency only, never in a service binary).
//!
//! * [`Worker`]: a real worker local API (edge-worker's [`LocalApi`]) on an
//!   ephemeral loopback port with services registered, and what they
//!   published (events, metrics);
//! * [`ServiceProcess`]: a service's real binary as a child process with a
//!   registered service's environment, ready once it printed
//!   `listening on URL`, killed when dropped, its stdout and stderr kept;
//! * [`sibling_binary`]: another service's binary, built with the cargo that
//!   runs the tests into the same target directory;
//! * [`http_agent`] and [`json_call`]: JSON over HTTP with an optional bearer
//!   token.
//!
//! Limits: helpers panic on failure (they are test code: a panic is the
//! failure report); a process gets 60 s to announce its URL; waits for
//! published items give up after 20 s; HTTP calls time out after 40 s;
//! [`sibling_binary`] assumes the standard `target/<profile>/deps/<test>`
//! layout (no `--target` triple) unless `<BIN>_BIN` (for example
//! `KEY_MANAGER_BIN`) names the binary.

#![allow(clippy::unwrap_used)] // test support: a panic is a failure report

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use edge_worker::local_api::{self, LocalApi, LocalPublish, Registry};
use protocol::Secret;
use serde_json::{json, Value};

/// How long a started process gets to print `listening on URL`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Worker::wait_for`] waits for a matching publish.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole-call timeout of [`http_agent`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(40);
/// Arguments making a service report and refresh client keys every 300 ms.
pub const FAST_REPORTING: [&str; 4] = [
    "--report-interval-ms",
    "300",
    "--refresh-interval-ms",
    "300",
];

/// A string map from `(key, value)` pairs (service config and secrets).
pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A service to register: name, config, secrets.
pub type ServiceSpec<'a> = (&'a str, BTreeMap<String, String>, BTreeMap<String, String>);

/// A worker's local API with services registered, and what they published.
#[derive(Debug)]
pub struct Worker {
    _api: LocalApi,
    /// The services the local API knows (register more, or again with new
    /// config, while it runs).
    pub registry: Registry,
    rx: tokio::sync::mpsc::Receiver<LocalPublish>,
    seen: Vec<LocalPublish>,
}

impl Worker {
    /// Starts a local API on `127.0.0.1:0` for worker `worker_id` whose
    /// secret is 32 × `secret_byte`, with `services` registered.
    pub fn start(secret_byte: u8, worker_id: &str, services: &[ServiceSpec]) -> Worker {
        let registry = Registry::new(&Secret::from_bytes([secret_byte; 32]), worker_id);
        for (name, config, secrets) in services {
            registry
                .register(name, config.clone(), secrets.clone())
                .unwrap();
        }
        let (tx, rx) = local_api::channel(1024);
        let api = LocalApi::start("127.0.0.1:0", registry.clone(), tx).unwrap();
        Worker {
            _api: api,
            registry,
            rx,
            seen: Vec::new(),
        }
    }

    /// The environment (`AEREKOS_API`, `AEREKOS_TOKEN`, `AEREKOS_SERVICE`)
    /// the worker gives `service`.
    pub fn env(&self, service: &str) -> Vec<(String, String)> {
        let env = self.registry.env(service);
        assert_eq!(env.len(), 3, "{service} is not registered");
        env
    }

    /// `service`'s local API token.
    pub fn token(&self, service: &str) -> String {
        self.env(service)
            .into_iter()
            .find(|(k, _)| k == local_api::ENV_TOKEN)
            .unwrap()
            .1
    }

    /// Waits until a publish matching `pred` arrived (keeps all seen, so
    /// an earlier publish matches too); panics after [`PUBLISH_TIMEOUT`].
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&LocalPublish) -> bool) {
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        loop {
            if self.seen.iter().any(&pred) {
                return;
            }
            match self.rx.try_recv() {
                Ok(p) => self.seen.push(p),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => {
                    let last = &self.seen[self.seen.len().saturating_sub(8)..];
                    panic!("no {what} published; last seen {last:?}");
                }
            }
        }
    }

    /// Waits for an event of `service` whose text contains `text`.
    pub fn wait_event(&mut self, service: &str, text: &str) {
        self.wait_for(text, |p| {
            matches!(p, LocalPublish::Event { name, text: t } if name == service && t.contains(text))
        });
    }
}

/// A spawned service process not yet known to be serving.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    urls: mpsc::Receiver<String>,
    out: Arc<Mutex<String>>,
    name: String,
}

/// Copies `r` line by line into `out`; sends the URL of a `listening on
/// URL` line to `url_tx` (after recording the line, so whoever has the
/// URL also sees the line).
fn pump(
    r: impl Read + Send + 'static,
    out: Arc<Mutex<String>>,
    url_tx: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            {
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
            if let Some(tx) = &url_tx {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(url);
                }
            }
        }
    });
}

impl Spawned {
    /// Spawns `exe` with only `env` in its environment, running in `data`,
    /// with `--listen 127.0.0.1:0 --data-dir DATA` and then `extra`.
    pub fn new(exe: &Path, env: Vec<(String, String)>, data: &Path, extra: &[&str]) -> Spawned {
        let mut child = Command::new(exe)
            .env_clear()
            .envs(env)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .current_dir(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", exe.display()));
        let out = Arc::new(Mutex::new(String::new()));
        let (tx, urls) = mpsc::channel();
        pump(child.stdout.take().unwrap(), out.clone(), Some(tx));
        pump(child.stderr.take().unwrap(), out.clone(), None);
        let name = exe.file_name().map_or_else(
            || exe.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Spawned {
            child,
            urls,
            out,
            name,
        }
    }

    /// Waits for `listening on URL`; panics with the output (after killing
    /// the process) if it does not come within [`START_TIMEOUT`].
    pub fn ready(mut self) -> ServiceProcess {
        match self.urls.recv_timeout(START_TIMEOUT) {
            Ok(url) => ServiceProcess {
                child: self.child,
                url,
                out: self.out,
            },
            Err(_) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                std::thread::sleep(Duration::from_millis(200)); // let the pumps finish
                panic!("{} did not start: {}", self.name, self.out.lock().unwrap());
            }
        }
    }

    /// Waits for a process expected to refuse to start: asserts it exits
    /// unsuccessfully within `timeout`, returns its output.
    pub fn refusal(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(!status.success(), "{} exited with {status}", self.name);
                std::thread::sleep(Duration::from_millis(100)); // let the pumps finish
                return self.out.lock().unwrap().clone();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} started but should have refused: {}",
                    self.name,
                    self.out.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running service process that announced its URL; killed (SIGKILL) and
/// reaped when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    /// `http://ADDR` from its `listening on` line.
    pub url: String,
    out: Arc<Mutex<String>>,
}

impl ServiceProcess {
    /// [`Spawned::new`] then [`Spawned::ready`].
    pub fn start(
        exe: &Path,
        env: Vec<(String, String)>,
        data: &Path,
        extra: &[&str],
    ) -> ServiceProcess {
        Spawned::new(exe, env, data, extra).ready()
    }

    /// Kills with SIGKILL (no chance to clean up) and reaps.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Everything it printed so far (stdout and stderr, by lines).
    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Binary `bin` of workspace package `package`, built once per test
/// process with the cargo running the tests (`$CARGO`) into the test's own
/// target directory and profile; `<BIN>_BIN` (upper case, `-` → `_`)
/// overrides.
pub fn sibling_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = built.get(bin) {
        return p.clone();
    }
    let var = format!("{}_BIN", bin.to_uppercase().replace('-', "_"));
    let path = match std::env::var_os(&var) {
        Some(p) => PathBuf::from(p),
        None => {
            // target/<profile>/deps/<test exe>
            let exe = std::env::current_exe().unwrap();
            let mut profile_dir = exe.parent().unwrap().to_path_buf();
            if profile_dir.ends_with("deps") {
                profile_dir.pop();
            }
            let target = profile_dir.parent().unwrap().to_path_buf();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", package, "--bin", bin, "--target-dir"])
                .arg(&target)
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd
                .status()
                .unwrap_or_else(|e| panic!("running cargo build for {bin}: {e}"));
            assert!(status.success(), "building {bin} failed");
            profile_dir.join(bin)
        }
    };
    built.insert(bin.to_string(), path.clone());
    path
}

/// A ureq agent that returns 4xx/5xx as responses, with [`HTTP_TIMEOUT`].
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into()
}

/// `method base+path` (GET, DELETE, or else POST with `body`, `{}` if
/// none) with an optional bearer token → (status, JSON body, or the text
/// as a JSON string if it is not JSON). Panics on transport errors.
pub fn json_call(
    agent: &ureq::Agent,
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{base}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "GET" | "DELETE" => {
            let mut r = if method == "GET" {
                agent.get(&url)
            } else {
                agent.delete(&url)
            };
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.call()
        }
        _ => {
            let mut r = agent.post(&url);
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.send_json(body.unwrap_or(json!({})))
        }
    };
    let mut resp = resp.unwrap();
    let code = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}
