//! Docker helpers shared by the container tests (`tests/tests/compose.rs`,
//! `tests/tests/compose_cluster.rs`): commands with a timeout, the compose
//! CLI or a reason to skip, and the static `image-test` binaries the images
//! are built from.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a failure report

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::wait_for;

/// Output of a finished command.
#[derive(Debug)]
pub struct Out {
    /// Exit status 0.
    pub ok: bool,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Out, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Out {
        ok: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Runs `cmd` and panics with its output unless it succeeds; its stdout.
#[track_caller]
pub fn must(cmd: &mut Command, timeout: Duration) -> String {
    let what = format!("{cmd:?}");
    match run(cmd, timeout) {
        Ok(o) if o.ok => o.stdout,
        Ok(o) => panic!("{what} failed:\n{}\n{}", o.stdout, o.stderr),
        Err(e) => panic!("{e}"),
    }
}

/// `docker`.
pub fn docker() -> Command {
    Command::new("docker")
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Why this test cannot run here, if it cannot: no engine, or no compose.
/// Otherwise the compose command (`docker compose` or `docker-compose`).
pub fn environment() -> Result<Vec<String>, String> {
    match run(
        docker().args(["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(30),
    ) {
        Err(e) => return Err(format!("no docker CLI ({e})")),
        Ok(o) if !o.ok => return Err(format!("no Docker engine: {}", o.stderr.trim())),
        Ok(_) => {}
    }
    for cli in [&["docker", "compose"][..], &["docker-compose"][..]] {
        let mut cmd = Command::new(cli[0]);
        cmd.args(&cli[1..]).arg("version");
        if run(&mut cmd, Duration::from_secs(30)).is_ok_and(|o| o.ok) {
            return Ok(cli.iter().map(|s| s.to_string()).collect());
        }
    }
    Err("neither `docker compose` nor `docker-compose` works".into())
}

/// The compose command line, or `None` after saying why the test skips
/// (a failure instead with `AEREKOS_REQUIRE_DOCKER=1`).
pub fn docker_compose_or_skip() -> Option<Vec<String>> {
    match environment() {
        Ok(cli) => Some(cli),
        Err(reason) if require_docker() => panic!("AEREKOS_REQUIRE_DOCKER is set but {reason}"),
        Err(reason) => {
            println!("skipped: {reason}");
            None
        }
    }
}

/// `AEREKOS_REQUIRE_DOCKER=1` (CI) turns a skip into a failure.
pub fn require_docker() -> bool {
    std::env::var("AEREKOS_REQUIRE_DOCKER").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The musl target and Docker platform of this machine.
pub fn platform() -> Option<(&'static str, &'static str)> {
    match std::env::consts::ARCH {
        "x86_64" => Some(("x86_64-unknown-linux-musl", "linux/amd64")),
        "aarch64" => Some(("aarch64-unknown-linux-musl", "linux/arm64")),
        _ => None,
    }
}

/// Builds (or finds up to date) the static `conductor` and `edge-worker` for
/// `triple` with the `image-test` profile; the directory holding them.
pub fn static_bins(triple: &str) -> PathBuf {
    let started = Instant::now();
    let out = run(
        Command::new(env!("CARGO"))
            .args(["build", "--profile", "image-test", "--target", triple])
            .args(["-p", "conductor", "-p", "edge-worker", "--bins"])
            .arg("--message-format=json-render-diagnostics")
            .current_dir(repo()),
        Duration::from_secs(40 * 60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let hint = format!(
        "static build for {triple} failed: it needs `rustup target add {triple}` and a musl C \
         compiler for SQLite (`apt-get install musl-tools` on Debian; .ci/run installs both)"
    );
    assert!(out.ok, "{hint}\n{}", out.stderr);
    let mut bins = BTreeMap::new();
    for line in out.stdout.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let (Some(c), Some(w)) = (bins.get("conductor"), bins.get("edge-worker")) else {
        panic!("cargo reported no conductor/edge-worker executables: {bins:?}");
    };
    assert_eq!(c.parent(), w.parent());
    eprintln!("static binaries ready in {:?}", started.elapsed());
    c.parent().unwrap().to_path_buf()
}

/// One compose project (`-p name -f file --env-file …`), taken down with
/// `down -v` on drop; its logs are printed first if the test is failing.
#[derive(Debug)]
pub struct ComposeProject {
    cli: Vec<String>,
    /// The project name (`-p`).
    pub name: String,
    /// `compose/<file>`, then any override files (`-f` each, in order).
    files: Vec<PathBuf>,
    env_file: PathBuf,
    down: bool,
}

impl ComposeProject {
    /// A project of `compose/<file>` with exactly `env` as its variables: the
    /// caller's own compose/.env and AEREKOS_*/COMPOSE_* variables are not seen.
    pub fn new(cli: &[String], name: &str, file: &str, env: &[(&str, String)], dir: &Path) -> Self {
        let env_file = dir.join(format!("{name}.env"));
        let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        fs::write(&env_file, text).unwrap();
        ComposeProject {
            cli: cli.to_vec(),
            name: name.to_string(),
            files: vec![repo().join("compose").join(file)],
            env_file,
            down: false,
        }
    }

    /// Adds an override file (`-f compose/<file> -f <path>`): compose merges
    /// it over the project's file.
    pub fn with_override(mut self, path: PathBuf) -> Self {
        self.files.push(path);
        self
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.cli[0]);
        cmd.args(&self.cli[1..]).args(["-p", &self.name]);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.arg("--env-file").arg(&self.env_file).args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("AEREKOS_") || k.starts_with("COMPOSE_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    #[track_caller]
    pub fn run(&self, args: &[&str]) -> String {
        must(&mut self.cmd(args), Duration::from_secs(180))
    }

    /// `down -v`, then checks that no container or volume of the project is left.
    /// The container id of `service`, once it exists.
    pub fn container(&self, service: &str) -> String {
        wait_for(
            &format!("the {service} container"),
            Duration::from_secs(60),
            || {
                let id = must(
                    &mut self.cmd(&["ps", "-q", service]),
                    Duration::from_secs(30),
                );
                let id = id.trim().to_string();
                (!id.is_empty()).then_some(id)
            },
        )
    }

    /// `down -v`, then checks that no container or volume of the project is left.
    pub fn down(&mut self) {
        self.down = true;
        self.run(&["down", "-v", "--remove-orphans", "-t", "10"]);
        let label = format!("label=com.docker.compose.project={}", self.name);
        let left = must(
            docker().args(["ps", "-aq", "--filter", &label]),
            Duration::from_secs(30),
        );
        assert_eq!(left.trim(), "", "containers left by {}", self.name);
        let left = must(
            docker().args(["volume", "ls", "-q", "--filter", &label]),
            Duration::from_secs(30),
        );
        assert_eq!(left.trim(), "", "volumes left by {}", self.name);
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() {
            if let Ok(o) = run(
                &mut self.cmd(&["logs", "--no-color", "--tail", "40"]),
                Duration::from_secs(60),
            ) {
                eprintln!("---- logs of {} ----\n{}{}", self.name, o.stdout, o.stderr);
            }
        }
        let _ = run(
            &mut self.cmd(&["down", "-v", "--remove-orphans", "-t", "5"]),
            Duration::from_secs(180),
        );
    }
}

/// The fleet CA a conductor container made in its data volume (`docker
/// cp`: the image has no shell), once it is there; a copy in `tmp`.
pub fn fleet_ca_pem(container: &str, tmp: &Path) -> String {
    let out = tmp.join(format!("{container}-ca.pem"));
    wait_for(
        "the fleet CA in the volume",
        Duration::from_secs(90),
        || {
            run(
                docker()
                    .args(["cp", &format!("{container}:/data/tls/ca.pem")])
                    .arg(&out),
                Duration::from_secs(30),
            )
            .ok()
            .and_then(|_| fs::read_to_string(&out).ok())
            .filter(|s| s.contains("BEGIN CERTIFICATE"))
        },
    )
}

/// A containerised conductor's API as the host sees it (HTTPS, trusting
/// the fleet CA), logged in as admin.
#[derive(Debug)]
pub struct HostApi {
    /// `https://127.0.0.1:<published port>`.
    pub url: String,
    /// The admin session's bearer token (empty before [`HostApi::login`]).
    pub token: String,
    agent: ureq::Agent,
}

impl HostApi {
    /// Not logged in yet.
    pub fn new(url: String, ca_pem: &str) -> HostApi {
        HostApi {
            url,
            token: String::new(),
            agent: crate::https(ca_pem),
        }
    }

    /// `method path` with the session's token and a JSON body (POST
    /// without one when `None`): the status (0 when there was no answer)
    /// and the body, as JSON when it parses.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let http = || self.agent.clone();
        let resp = match (method, body) {
            ("GET", _) => http().get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => http().delete(&url).header("Authorization", &auth).call(),
            ("PUT", Some(b)) => http().put(&url).header("Authorization", &auth).send_json(b),
            (_, Some(b)) => http()
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b),
            (_, None) => http()
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        match resp {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let text = r.body_mut().read_to_string().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// `/api/v1/health` answers 200.
    pub fn healthy(&self) -> bool {
        self.call("GET", "/api/v1/health", None).0 == 200
    }

    /// Who answers `/api/v1/health` with 200 here: `Some(false)` this
    /// conductor itself (the active one), `Some(true)` a standby forwarding
    /// to the active one (its answer carries `X-Aerekos-Forwarded-By`),
    /// `None` nobody.
    pub fn health_forwarded(&self) -> Option<bool> {
        let r = self
            .agent
            .get(format!("{}/api/v1/health", self.url))
            .call()
            .ok()?;
        (r.status().as_u16() == 200).then(|| r.headers().contains_key("x-aerekos-forwarded-by"))
    }

    /// This conductor itself serves (it is the active one, not a standby
    /// forwarding to it).
    pub fn serves_itself(&self) -> bool {
        self.health_forwarded() == Some(false)
    }

    /// Logs in as `admin` with `password`.
    pub fn login(&mut self, password: &str) {
        let (status, body) = self.call(
            "POST",
            "/api/v1/login",
            Some(&serde_json::json!({"username": "admin", "password": password})),
        );
        assert_eq!(status, 200, "admin login: {body}");
        self.token = body["token"].as_str().unwrap_or_default().to_string();
    }

    /// `/api/v1/workers`.
    pub fn workers(&self) -> Vec<Value> {
        let (status, body) = self.call("GET", "/api/v1/workers", None);
        assert_eq!(status, 200, "workers: {body}");
        body["workers"].as_array().cloned().unwrap_or_default()
    }

    /// `/api/v1/workers/{id}`.
    pub fn worker(&self, id: &str) -> Value {
        let (status, body) = self.call("GET", &format!("/api/v1/workers/{id}"), None);
        assert_eq!(status, 200, "worker {id}: {body}");
        body
    }
}
