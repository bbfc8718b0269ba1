//! Container services through the Docker Engine API (Podman's compatible
//! socket works too), over the engine's unix socket.
//!
//! A small **blocking** client: call it from `spawn_blocking` or a thread of
//! its own, never on the runtime thread. No pulls: images must already be in
//! the engine.
//!
//! * **Socket**: the path given to [`Engine::connect`], else
//!   `DOCKER_HOST=unix://…` when set, else the first of
//!   `/var/run/docker.sock`, `/run/podman/podman.sock` (rootful Podman) and
//!   `$XDG_RUNTIME_DIR/podman/podman.sock` that exists. Other `DOCKER_HOST`
//!   schemes (`tcp://`, `ssh://`) are refused.
//! * **API version**: the engine must speak API ≥ [`MIN_API_VERSION`]
//!   (Docker 19.03, Podman 2); requests go to `/v1.40/…`, or to the engine's
//!   own minimum version when it no longer accepts 1.40 (Docker 29 requires
//!   1.44). Every field used here means the same in all those versions.
//! * **Limits**: one connection per request; each request must be answered
//!   within [`DEFAULT_TIMEOUT`] ([`Engine::with_timeout`]; `/_ping` within
//!   [`PING_TIMEOUT`]; a stop within its grace period plus that timeout).
//!   Responses (logs included) are capped at [`MAX_RESPONSE`] bytes, the
//!   response head at 16 KiB; anything larger is a [`ContainerError::Protocol`].
//!
//! **Ownership.** The container of service `s` on worker `w` is named
//! [`container_name`]`(w, s)` = `aerekos-<w>-<s>` and carries the labels
//! [`LABEL_MANAGED`]`=true`, [`LABEL_WORKER`]`=<w>`, [`LABEL_SERVICE`]`=<s>`
//! and [`LABEL_VERSION`]`=<manifest version>`. Every call looks the
//! container up by that name and acts only if it carries the first three
//! labels with our values; a container with the name but not the labels
//! (created by hand, or by another worker whose id happens to give the same
//! name) is [`ContainerError::NotManaged`] and is never stopped, removed,
//! started or read. Changes then address the container by its id.
//!
//! **What the engine does and does not do.** Containers are created with
//! restart policy `no`: the worker's supervisor owns restarts (it polls
//! [`Engine::inspect`]). Ports are published on `0.0.0.0`. Limits map to
//! `HostConfig.Memory` (memory.max; swap stays the engine's default),
//! `NanoCpus` (millicores × 10⁶) and `PidsLimit`; an engine that cannot
//! apply one (a Pi kernel without the memory cgroup) drops it with a warning,
//! returned in [`Ensured::warnings`] and visible as `None` in
//! [`ContainerState::limits`]. A container whose start failed (port in use)
//! stays created; the next [`Engine::ensure`] starts it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::manifest::{ContainerRuntime, Limits, Manifest, Runtime};
use serde_json::{json, Value};

mod http;

/// Oldest Engine API version supported.
pub const MIN_API_VERSION: (u32, u32) = (1, 40);
/// [`MIN_API_VERSION`] as text.
pub const MIN_API_VERSION_STR: &str = "1.40";
/// Default time for one request to be answered.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for `/_ping` to be answered in [`Engine::connect`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body read from the engine, bytes.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// Grace period when [`Engine::ensure`] replaces another version, seconds.
pub const REPLACE_STOP_TIMEOUT_S: u32 = 10;
/// Grace period of [`Engine::remove`], seconds.
pub const REMOVE_STOP_TIMEOUT_S: u32 = 10;

/// Label present (`true`) on every container this module creates.
pub const LABEL_MANAGED: &str = "io.aerekos.managed";
/// Label carrying the worker id.
pub const LABEL_WORKER: &str = "io.aerekos.worker";
/// Label carrying the service name.
pub const LABEL_SERVICE: &str = "io.aerekos.service";
/// Label carrying the manifest version.
pub const LABEL_VERSION: &str = "io.aerekos.version";

/// Default socket of Docker.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Default socket of rootful Podman.
pub const PODMAN_ROOT_SOCKET: &str = "/run/podman/podman.sock";

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No engine answers: no socket, connection refused, ping failed.
    #[error("no container engine at {looked}: {reason}")]
    EngineUnavailable {
        /// The socket path(s) tried.
        looked: String,
        /// What went wrong.
        reason: String,
    },
    /// The engine's API is older than [`MIN_API_VERSION`].
    #[error("the container engine speaks API {0}; {MIN_API_VERSION_STR} or later is required")]
    ApiTooOld(String),
    /// The engine refused a request: status and its `message`.
    #[error("container engine error {0}: {1}")]
    Http(u16, String),
    /// Reading or writing the socket failed (a timeout included).
    #[error("container engine I/O: {0}")]
    Io(#[source] std::io::Error),
    /// The engine's answer is not what the API promises.
    #[error("unexpected answer from the container engine: {0}")]
    Protocol(String),
    /// A container has our name but is not ours: it is left alone.
    #[error(
        "container {name} ({id}) exists but is not managed by this worker \
         (labels {LABEL_MANAGED}=true, {LABEL_WORKER}={worker} missing); \
         it is left alone: rename or remove it by hand"
    )]
    NotManaged {
        /// Container name.
        name: String,
        /// Container id.
        id: String,
        /// Our worker id.
        worker: String,
    },
    /// The request cannot be made (not a container manifest, bad name).
    #[error("invalid container request: {0}")]
    Invalid(String),
}

impl ContainerError {
    /// The engine is down or unreachable: worth retrying later as is.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ContainerError::EngineUnavailable { .. } | ContainerError::Io(_)
        )
    }
}

/// Result of this module.
pub type Result<T, E = ContainerError> = std::result::Result<T, E>;

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// Full container id.
    pub id: String,
    /// Container name (without the leading `/`).
    pub name: String,
    /// Image reference it was created from.
    pub image: String,
    /// Manifest version from [`LABEL_VERSION`].
    pub version: Option<u32>,
    /// Engine status: `created`, `running`, `paused`, `restarting`,
    /// `removing`, `exited` or `dead`.
    pub status: String,
    /// The main process runs (also while paused).
    pub running: bool,
    /// Exit code of the last run; `None` while running or before any run.
    pub exit_code: Option<i64>,
    /// Host pid of the main process while running.
    pub pid: Option<u32>,
    /// Start of the current or last run (RFC 3339, engine clock).
    pub started_at: Option<String>,
    /// End of the last run (RFC 3339, engine clock).
    pub finished_at: Option<String>,
    /// The last run was killed by the OOM killer.
    pub oom_killed: bool,
    /// The engine's error for the last start, if any.
    pub error: Option<String>,
    /// The limits the engine applied (`None`: no limit).
    pub limits: Limits,
}

/// What [`Engine::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureAction {
    /// It was already running at this version.
    AlreadyRunning,
    /// It existed at this version, stopped, and was started.
    Started,
    /// It did not exist and was created and started.
    Created,
    /// Another version (or a dead container) was removed first.
    Replaced {
        /// The version removed, if labelled.
        old_version: Option<u32>,
    },
}

/// The outcome of [`Engine::ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The container after the call.
    pub state: ContainerState,
    /// What was done.
    pub action: EnsureAction,
    /// The engine's warnings when creating (limits it dropped…).
    pub warnings: Vec<String>,
}

/// Name of the container of `service` on `worker_id`.
pub fn container_name(worker_id: &str, service: &str) -> String {
    format!("aerekos-{worker_id}-{service}")
}

/// A connection to one engine (just its socket path and API version: every
/// request opens its own connection). Cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Engine {
    socket: PathBuf,
    api_version: String,
    prefix: String,
    timeout: Duration,
}

impl Engine {
    /// Finds the engine (see the module docs for the socket search), pings
    /// it and checks its API version.
    pub fn connect(path: Option<&Path>) -> Result<Engine> {
        let socket = match path {
            Some(p) => p.to_path_buf(),
            None => default_socket()?,
        };
        let looked = socket.display().to_string();
        let unavailable = |reason: String| ContainerError::EngineUnavailable {
            looked: looked.clone(),
            reason,
        };
        let mut engine = Engine {
            socket: socket.clone(),
            api_version: String::new(),
            prefix: String::new(),
            timeout: DEFAULT_TIMEOUT,
        };
        let ping = http::request(&socket, "GET", "/_ping", None, PING_TIMEOUT, 4096);
        match ping {
            Ok(r) if r.status == 200 => {}
            Ok(r) => return Err(unavailable(format!("/_ping answered {}", r.status))),
            Err(e @ ContainerError::EngineUnavailable { .. }) => return Err(e),
            Err(e) => return Err(unavailable(format!("/_ping failed: {e}"))),
        }
        let v = engine.get_json("/version")?;
        let api = str_at(&v, &["ApiVersion"]).unwrap_or_default();
        let Some(max) = parse_api_version(&api) else {
            return Err(ContainerError::Protocol(format!(
                "/version has no usable ApiVersion ({api:?})"
            )));
        };
        if max < MIN_API_VERSION {
            return Err(ContainerError::ApiTooOld(api));
        }
        let min = str_at(&v, &["MinAPIVersion"])
            .and_then(|s| parse_api_version(&s))
            .unwrap_or(MIN_API_VERSION);
        let use_version = if min > MIN_API_VERSION && min <= max {
            min
        } else {
            MIN_API_VERSION
        };
        engine.prefix = format!("/v{}.{}", use_version.0, use_version.1);
        engine.api_version = api;
        Ok(engine)
    }

    /// Sets the time each request has to be answered.
    pub fn with_timeout(mut self, timeout: Duration) -> Engine {
        self.timeout = timeout;
        self
    }

    /// The socket in use.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The engine's (highest) API version, e.g. `1.41`.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// Makes the container of `m` run at `m.version`: starts ours if it is
    /// stopped, replaces ours if it has another version (stop within
    /// [`REPLACE_STOP_TIMEOUT_S`], remove with its anonymous volumes), else
    /// creates and starts it. Refuses a container with our name that is not
    /// ours ([`ContainerError::NotManaged`]).
    pub fn ensure(&self, worker_id: &str, m: &Manifest) -> Result<Ensured> {
        check_names(worker_id, &m.name)?;
        m.validate()
            .map_err(|e| ContainerError::Invalid(e.to_string()))?;
        let Runtime::Container(rt) = &m.runtime else {
            return Err(ContainerError::Invalid(format!(
                "service {} is not a container service",
                m.name
            )));
        };
        let name = container_name(worker_id, &m.name);
        let mut action = EnsureAction::Created;
        if let Some(cur) = self.owned(worker_id, &m.name)? {
            if cur.version == Some(m.version) && cur.status != "dead" {
                if cur.running {
                    return Ok(Ensured {
                        state: cur,
                        action: EnsureAction::AlreadyRunning,
                        warnings: Vec::new(),
                    });
                }
                self.start_id(&cur.id)?;
                let state = self.inspect_id(&cur.id)?;
                tracing::info!(container = %name, version = m.version, "container started");
                return Ok(Ensured {
                    state,
                    action: EnsureAction::Started,
                    warnings: Vec::new(),
                });
            }
            tracing::info!(
                container = %name,
                old = ?cur.version,
                new = m.version,
                "replacing container"
            );
            self.stop_id(&cur.id, REPLACE_STOP_TIMEOUT_S)?;
            self.delete_id(&cur.id)?;
            action = EnsureAction::Replaced {
                old_version: cur.version,
            };
        }
        let body = create_body(worker_id, m, rt);
        let target = format!("/containers/create?name={}", http::query_escape(&name));
        let created = self.call_json("POST", &target, Some(&body), self.timeout)?;
        let Some(id) = str_at(&created, &["Id"]) else {
            return Err(ContainerError::Protocol("create answered no Id".into()));
        };
        let warnings: Vec<String> = created
            .get("Warnings")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for w in &warnings {
            tracing::warn!(container = %name, "engine warning: {w}");
        }
        self.start_id(&id)?;
        let state = self.inspect_id(&id)?;
        tracing::info!(container = %name, version = m.version, id = %short(&id), "container created");
        Ok(Ensured {
            state,
            action,
            warnings,
        })
    }

    /// Our container of `service`, `None` if there is none.
    pub fn inspect(&self, worker_id: &str, service: &str) -> Result<Option<ContainerState>> {
        check_names(worker_id, service)?;
        self.owned(worker_id, service)
    }

    /// Starts our existing container of `service` (no-op if running); `None`
    /// if there is none.
    pub fn start(&self, worker_id: &str, service: &str) -> Result<Option<ContainerState>> {
        check_names(worker_id, service)?;
        let Some(cur) = self.owned(worker_id, service)? else {
            return Ok(None);
        };
        if !cur.running {
            self.start_id(&cur.id)?;
        }
        self.inspect_id(&cur.id).map(Some)
    }

    /// Stops our container of `service`: SIGTERM (or the image's stop
    /// signal), SIGKILL after `timeout_s`. Returns its state afterwards,
    /// `None` if there is none.
    pub fn stop(
        &self,
        worker_id: &str,
        service: &str,
        timeout_s: u32,
    ) -> Result<Option<ContainerState>> {
        check_names(worker_id, service)?;
        let Some(cur) = self.owned(worker_id, service)? else {
            return Ok(None);
        };
        if cur.running {
            self.stop_id(&cur.id, timeout_s)?;
        }
        self.inspect_id(&cur.id).map(Some)
    }

    /// Stops (within [`REMOVE_STOP_TIMEOUT_S`]) and deletes our container of
    /// `service` with its anonymous volumes. Absent is `Ok`.
    pub fn remove(&self, worker_id: &str, service: &str) -> Result<()> {
        check_names(worker_id, service)?;
        let Some(cur) = self.owned(worker_id, service)? else {
            return Ok(());
        };
        if cur.running {
            self.stop_id(&cur.id, REMOVE_STOP_TIMEOUT_S)?;
        }
        self.delete_id(&cur.id)?;
        tracing::info!(container = %cur.name, "container removed");
        Ok(())
    }

    /// Every container of ours on this worker, by service name, sorted (for
    /// orphan cleanup). Only containers with all our labels **and** our name
    /// for their service label are listed: exactly those the other calls act on.
    pub fn list_ours(&self, worker_id: &str) -> Result<Vec<(String, ContainerState)>> {
        if !protocol::topic::is_valid_worker_id(worker_id) {
            return Err(ContainerError::Invalid(format!(
                "bad worker id {worker_id:?}"
            )));
        }
        let filters = json!({
            "label": [format!("{LABEL_MANAGED}=true"), format!("{LABEL_WORKER}={worker_id}")]
        })
        .to_string();
        let target = format!(
            "/containers/json?all=1&filters={}",
            http::query_escape(&filters)
        );
        let list = self.get_json(&target)?;
        let Some(items) = list.as_array() else {
            return Err(ContainerError::Protocol(
                "container list is not an array".into(),
            ));
        };
        let mut out = Vec::new();
        for item in items {
            let Some(id) = str_at(item, &["Id"]) else {
                continue;
            };
            // The filter is the engine's; the ownership check is ours.
            let v = match self.get_json(&format!("/containers/{id}/json")) {
                Ok(v) => v,
                Err(ContainerError::Http(404, _)) => continue, // removed meanwhile
                Err(e) => return Err(e),
            };
            let labels = v.pointer("/Config/Labels");
            let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
            let Some(service) = label(LABEL_SERVICE) else {
                continue;
            };
            if !is_ours(labels, worker_id, service)
                || !protocol::manifest::valid_service_name(service)
            {
                continue;
            }
            // Only what the other calls can address (a renamed copy is not).
            let state = parse_state(&v)?;
            if state.name != container_name(worker_id, service) {
                continue;
            }
            out.push((service.to_string(), state));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The last `tail_lines` lines of our container's stdout and stderr,
    /// interleaved as written (without a TTY the engine multiplexes the two
    /// streams; the frames are decoded here). `None` if there is none.
    pub fn logs(
        &self,
        worker_id: &str,
        service: &str,
        tail_lines: usize,
    ) -> Result<Option<Vec<u8>>> {
        check_names(worker_id, service)?;
        let Some(cur) = self.owned_raw(worker_id, service)? else {
            return Ok(None);
        };
        let id = str_at(&cur, &["Id"]).unwrap_or_default();
        let tty = cur
            .pointer("/Config/Tty")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let target = format!("/containers/{id}/logs?stdout=1&stderr=1&tail={tail_lines}");
        let r = self.call("GET", &target, None, self.timeout)?;
        if tty {
            Ok(Some(r))
        } else {
            demux_logs(&r).map(Some)
        }
    }

    // ---- internals ----

    /// The raw inspect document of our container, `None` if absent.
    fn owned_raw(&self, worker_id: &str, service: &str) -> Result<Option<Value>> {
        let name = container_name(worker_id, service);
        let v = match self.get_json(&format!("/containers/{name}/json")) {
            Ok(v) => v,
            Err(ContainerError::Http(404, _)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let id = str_at(&v, &["Id"]).unwrap_or_default();
        // Names are exact in the API, but a name is never trusted alone.
        let got = str_at(&v, &["Name"]).unwrap_or_default();
        let labels = v.pointer("/Config/Labels");
        if got.trim_start_matches('/') != name || !is_ours(labels, worker_id, service) {
            return Err(ContainerError::NotManaged {
                name,
                id: short(&id).to_string(),
                worker: worker_id.to_string(),
            });
        }
        Ok(Some(v))
    }

    fn owned(&self, worker_id: &str, service: &str) -> Result<Option<ContainerState>> {
        match self.owned_raw(worker_id, service)? {
            Some(v) => parse_state(&v).map(Some),
            None => Ok(None),
        }
    }

    fn inspect_id(&self, id: &str) -> Result<ContainerState> {
        parse_state(&self.get_json(&format!("/containers/{id}/json"))?)
    }

    fn start_id(&self, id: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/containers/{id}/start"),
            None,
            self.timeout,
        )
        .map(drop)
    }

    fn stop_id(&self, id: &str, timeout_s: u32) -> Result<()> {
        let wait = self.timeout + Duration::from_secs(u64::from(timeout_s));
        match self.call(
            "POST",
            &format!("/containers/{id}/stop?t={timeout_s}"),
            None,
            wait,
        ) {
            Ok(_) | Err(ContainerError::Http(404, _)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn delete_id(&self, id: &str) -> Result<()> {
        match self.call(
            "DELETE",
            &format!("/containers/{id}?v=1&force=1"),
            None,
            self.timeout,
        ) {
            Ok(_) | Err(ContainerError::Http(404, _)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn get_json(&self, path: &str) -> Result<Value> {
        self.call_json("GET", path, None, self.timeout)
    }

    fn call_json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let bytes = self.call(method, path, body, timeout)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ContainerError::Protocol(format!("{method} {path}: bad JSON: {e}")))
    }

    /// One request; a status ≥ 300 (other than 304) is [`ContainerError::Http`].
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let body = body.map(|b| b.to_string().into_bytes());
        let target = format!("{}{path}", self.prefix);
        let r = http::request(
            &self.socket,
            method,
            &target,
            body.as_deref(),
            timeout,
            MAX_RESPONSE,
        )?;
        if (200..300).contains(&r.status) || r.status == 304 {
            return Ok(r.body);
        }
        Err(ContainerError::Http(r.status, error_message(&r.body)))
    }
}

/// The socket to use without an explicit path (see the module docs).
pub fn default_socket() -> Result<PathBuf> {
    resolve_socket(
        std::env::var("DOCKER_HOST").ok().as_deref(),
        std::env::var("XDG_RUNTIME_DIR").ok().as_deref(),
        |p| p.exists(),
    )
}

fn resolve_socket(
    docker_host: Option<&str>,
    xdg_runtime_dir: Option<&str>,
    exists: impl Fn(&Path) -> bool,
) -> Result<PathBuf> {
    if let Some(host) = docker_host.filter(|h| !h.is_empty()) {
        return match host.strip_prefix("unix://") {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err(ContainerError::EngineUnavailable {
                looked: format!("DOCKER_HOST={host}"),
                reason: "only unix:// sockets are supported".into(),
            }),
        };
    }
    let mut candidates = vec![
        PathBuf::from(DOCKER_SOCKET),
        PathBuf::from(PODMAN_ROOT_SOCKET),
    ];
    if let Some(dir) = xdg_runtime_dir.filter(|d| !d.is_empty()) {
        candidates.push(Path::new(dir).join("podman/podman.sock"));
    }
    if let Some(found) = candidates.iter().find(|p| exists(p)) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(ContainerError::EngineUnavailable {
        looked: looked.join(", "),
        reason: "no such socket (set DOCKER_HOST=unix://… for another one)".into(),
    })
}

fn check_names(worker_id: &str, service: &str) -> Result<()> {
    if !protocol::topic::is_valid_worker_id(worker_id) {
        return Err(ContainerError::Invalid(format!(
            "bad worker id {worker_id:?}"
        )));
    }
    if !protocol::manifest::valid_service_name(service) {
        return Err(ContainerError::Invalid(format!(
            "bad service name {service:?}"
        )));
    }
    Ok(())
}

/// Do `labels` say worker `worker_id` manages this container of `service`?
fn is_ours(labels: Option<&Value>, worker_id: &str, service: &str) -> bool {
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    get(LABEL_MANAGED) == Some("true")
        && get(LABEL_WORKER) == Some(worker_id)
        && get(LABEL_SERVICE) == Some(service)
}

/// `"1.41"` → `(1, 41)`.
fn parse_api_version(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn str_at(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k)?;
    }
    cur.as_str().map(str::to_string)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The engine's `{"message": …}`, else the body as text (bounded).
fn error_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| str_at(&v, &["message"]));
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    text.chars().take(512).collect()
}

/// The engine's create request for `m`.
fn create_body(worker_id: &str, m: &Manifest, rt: &ContainerRuntime) -> Value {
    let env: Vec<String> = rt.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut exposed = serde_json::Map::new();
    let mut bindings: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for p in &rt.ports {
        let key = format!("{}/{}", p.container, if p.udp { "udp" } else { "tcp" });
        exposed.insert(key.clone(), json!({}));
        bindings
            .entry(key)
            .or_default()
            .push(json!({"HostIp": "0.0.0.0", "HostPort": p.host.to_string()}));
    }
    let binds: Vec<String> = rt
        .volumes
        .iter()
        .map(|v| {
            let ro = if v.read_only { ":ro" } else { "" };
            format!("{}:{}{ro}", v.source, v.target)
        })
        .collect();
    let mut host = json!({
        "PortBindings": bindings,
        "Binds": binds,
        "RestartPolicy": {"Name": "no"},
    });
    if let Some(mem) = m.limits.memory_bytes {
        host["Memory"] = json!(mem);
    }
    if let Some(mc) = m.limits.cpu_millicores {
        host["NanoCpus"] = json!(u64::from(mc) * 1_000_000);
    }
    if let Some(pids) = m.limits.pids {
        host["PidsLimit"] = json!(pids);
    }
    let mut body = json!({
        "Image": rt.image,
        "Env": env,
        "Labels": {
            LABEL_MANAGED: "true",
            LABEL_WORKER: worker_id,
            LABEL_SERVICE: m.name,
            LABEL_VERSION: m.version.to_string(),
        },
        "ExposedPorts": exposed,
        "HostConfig": host,
    });
    if !rt.command.is_empty() {
        body["Cmd"] = json!(rt.command);
    }
    body
}

/// Docker's zero time means "never".
fn time_at(v: &Value, ptr: &str) -> Option<String> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && !s.starts_with("0001-01-01"))
        .map(str::to_string)
}

fn parse_state(v: &Value) -> Result<ContainerState> {
    let Some(id) = str_at(v, &["Id"]) else {
        return Err(ContainerError::Protocol("inspect answered no Id".into()));
    };
    let state = v.get("State");
    let flag = |k: &str| {
        state
            .and_then(|s| s.get(k))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let status = state
        .and_then(|s| s.get("Status"))
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let running = flag("Running");
    let exit_code = v.pointer("/State/ExitCode").and_then(Value::as_i64);
    let exit_code = exit_code.filter(|_| !running && (status == "exited" || status == "dead"));
    let pid = v
        .pointer("/State/Pid")
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0 && running);
    let positive = |ptr: &str| {
        v.pointer(ptr)
            .and_then(Value::as_i64)
            .and_then(|n| u64::try_from(n).ok())
            .filter(|&n| n > 0)
    };
    let limits = Limits {
        memory_bytes: positive("/HostConfig/Memory"),
        cpu_millicores: positive("/HostConfig/NanoCpus")
            .and_then(|n| u32::try_from(n / 1_000_000).ok()),
        pids: positive("/HostConfig/PidsLimit").and_then(|n| u32::try_from(n).ok()),
    };
    let version = v
        .pointer(&format!("/Config/Labels/{}", LABEL_VERSION))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok());
    Ok(ContainerState {
        id,
        name: str_at(v, &["Name"])
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: v
            .pointer("/Config/Image")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        version,
        status,
        running,
        exit_code,
        pid,
        started_at: time_at(v, "/State/StartedAt"),
        finished_at: time_at(v, "/State/FinishedAt"),
        oom_killed: flag("OOMKilled"),
        error: v
            .pointer("/State/Error")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        limits,
    })
}

/// Decodes the engine's multiplexed log stream: frames of an 8-byte header
/// (stream 0/1/2, three zero bytes, big-endian length) and the payload.
fn demux_logs(raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((head, tail)) = rest.split_first_chunk::<8>() else {
            return Err(ContainerError::Protocol(
                "truncated log frame header".into(),
            ));
        };
        if head[0] > 2 || head[1..4] != [0, 0, 0] {
            return Err(ContainerError::Protocol(format!(
                "bad log frame header {head:02x?}"
            )));
        }
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let take = len.min(tail.len()); // a cut last frame keeps what came
        out.extend_from_slice(&tail[..take]);
        rest = &tail[take..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use protocol::manifest::{PortMap, VolumeMount};
    use protocol::RestartPolicy;

    fn manifest() -> Manifest {
        Manifest {
            name: "web".into(),
            version: 3,
            runtime: Runtime::Container(ContainerRuntime {
                image: "img:1".into(),
                command: vec!["/bin/x".into(), "-v".into()],
                env: [("A".to_string(), "1".to_string())].into(),
                ports: vec![
                    PortMap {
                        host: 8080,
                        container: 80,
                        udp: false,
                    },
                    PortMap {
                        host: 5353,
                        container: 53,
                        udp: true,
                    },
                ],
                volumes: vec![VolumeMount {
                    source: "/srv".into(),
                    target: "/data".into(),
                    read_only: true,
                }],
            }),
            restart: RestartPolicy::Always,
            max_restarts: 5,
            restart_window_s: 60,
            backoff_ms: 500,
            health: None,
            limits: Limits {
                memory_bytes: Some(64 << 20),
                cpu_millicores: Some(500),
                pids: Some(32),
            },
            config: BTreeMap::new(),
            secrets: BTreeMap::new(),
        }
    }

    #[test]
    fn create_body_maps_the_manifest() {
        let m = manifest();
        let Runtime::Container(rt) = &m.runtime else {
            unreachable!()
        };
        let b = create_body("w1", &m, rt);
        assert_eq!(b["Image"], "img:1");
        assert_eq!(b["Cmd"], json!(["/bin/x", "-v"]));
        assert_eq!(b["Env"], json!(["A=1"]));
        assert_eq!(b["Labels"][LABEL_MANAGED], "true");
        assert_eq!(b["Labels"][LABEL_WORKER], "w1");
        assert_eq!(b["Labels"][LABEL_SERVICE], "web");
        assert_eq!(b["Labels"][LABEL_VERSION], "3");
        assert_eq!(b["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
        let h = &b["HostConfig"];
        assert_eq!(
            h["PortBindings"]["80/tcp"],
            json!([{"HostIp": "0.0.0.0", "HostPort": "8080"}])
        );
        assert_eq!(h["Binds"], json!(["/srv:/data:ro"]));
        assert_eq!(h["Memory"], 64 << 20);
        assert_eq!(h["NanoCpus"], 500_000_000u64);
        assert_eq!(h["PidsLimit"], 32);
        assert_eq!(h["RestartPolicy"]["Name"], "no");

        let mut bare = m.clone();
        bare.limits = Limits::default();
        if let Runtime::Container(rt) = &mut bare.runtime {
            rt.command.clear();
        }
        let Runtime::Container(rt) = &bare.runtime else {
            unreachable!()
        };
        let b = create_body("w1", &bare, rt);
        assert!(b.get("Cmd").is_none(), "empty command keeps the image's");
        assert!(b["HostConfig"].get("Memory").is_none());
        assert!(b["HostConfig"].get("NanoCpus").is_none());
    }

    #[test]
    fn state_parsing_tolerates_odd_documents() {
        let v = json!({
            "Id": "abcdef0123456789", "Name": "/aerekos-w-web",
            "Config": {"Image": "img", "Labels": {LABEL_VERSION: "7"}},
            "State": {"Status": "exited", "Running": false, "ExitCode": 137, "Pid": 0,
                      "OOMKilled": true, "StartedAt": "2024-01-01T00:00:00.1Z",
                      "FinishedAt": "0001-01-01T00:00:00Z", "Error": ""},
            "HostConfig": {"Memory": 0, "NanoCpus": 250000000, "PidsLimit": -1}
        });
        let s = parse_state(&v).unwrap();
        assert_eq!(s.name, "aerekos-w-web");
        assert_eq!(s.version, Some(7));
        assert_eq!(s.exit_code, Some(137));
        assert!(s.oom_killed && !s.running && s.pid.is_none());
        assert_eq!(s.started_at.as_deref(), Some("2024-01-01T00:00:00.1Z"));
        assert_eq!(s.finished_at, None);
        assert_eq!(s.error, None);
        assert_eq!(
            s.limits,
            Limits {
                memory_bytes: None,
                cpu_millicores: Some(250),
                pids: None
            }
        );
        // Missing or mistyped fields are defaults, never panics.
        let s =
            parse_state(&json!({"Id": "x", "State": null, "Config": {"Labels": null}})).unwrap();
        assert_eq!(
            (s.status.as_str(), s.running, s.version),
            ("unknown", false, None)
        );
        assert!(parse_state(&json!({"State": {}})).is_err());
        assert!(parse_state(&json!([1, 2])).is_err());
    }

    #[test]
    fn ownership_needs_all_three_labels() {
        let ours = json!({LABEL_MANAGED: "true", LABEL_WORKER: "w", LABEL_SERVICE: "s"});
        assert!(is_ours(Some(&ours), "w", "s"));
        assert!(!is_ours(Some(&ours), "w2", "s"));
        assert!(!is_ours(Some(&ours), "w", "t"));
        let no_managed = json!({LABEL_WORKER: "w", LABEL_SERVICE: "s"});
        assert!(!is_ours(Some(&no_managed), "w", "s"));
        assert!(!is_ours(Some(&json!(null)), "w", "s"));
        assert!(!is_ours(None, "w", "s"));
    }

    #[test]
    fn logs_are_demultiplexed() {
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 6];
        raw.extend_from_slice(b"hello\n");
        raw.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        raw.extend_from_slice(b"err\n");
        raw.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 9]);
        raw.extend_from_slice(b"cut");
        assert_eq!(demux_logs(&raw).unwrap(), b"hello\nerr\ncut");
        assert!(demux_logs(b"").unwrap().is_empty());
        assert!(demux_logs(b"plain text log line\n").is_err());
        assert!(demux_logs(&[1, 0, 0]).is_err());
    }

    #[test]
    fn socket_resolution() {
        let none = |_: &Path| false;
        let p = resolve_socket(Some("unix:///tmp/d.sock"), None, none).unwrap();
        assert_eq!(p, Path::new("/tmp/d.sock"));
        let e = resolve_socket(Some("tcp://1.2.3.4:2375"), None, none).unwrap_err();
        assert!(e.to_string().contains("tcp://1.2.3.4:2375"), "{e}");
        let e = resolve_socket(None, Some("/run/user/1000"), none).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(DOCKER_SOCKET), "{msg}");
        assert!(msg.contains("/run/user/1000/podman/podman.sock"), "{msg}");
        let podman = |p: &Path| p.starts_with("/run/user");
        let p = resolve_socket(Some(""), Some("/run/user/1000"), podman).unwrap();
        assert_eq!(p, Path::new("/run/user/1000/podman/podman.sock"));
        let p = resolve_socket(None, None, |p: &Path| p == Path::new(DOCKER_SOCKET)).unwrap();
        assert_eq!(p, Path::new(DOCKER_SOCKET));
    }

    #[test]
    fn api_versions_and_error_messages() {
        assert_eq!(parse_api_version("1.41"), Some((1, 41)));
        assert_eq!(parse_api_version(" 1.40 "), Some((1, 40)));
        assert_eq!(parse_api_version("1"), None);
        assert_eq!(parse_api_version("x.y"), None);
        assert!(parse_api_version("1.39").unwrap() < MIN_API_VERSION);
        assert!(parse_api_version("2.0").unwrap() > MIN_API_VERSION);
        assert_eq!(
            error_message(br#"{"message":"No such image: x"}"#),
            "No such image: x"
        );
        assert_eq!(error_message(b"  plain\n"), "plain");
        assert_eq!(error_message(&[b'z'; 2000]).len(), 512);
    }

    #[test]
    fn bad_names_are_refused_before_any_io() {
        let engine = Engine {
            socket: PathBuf::from("/nonexistent/engine.sock"),
            api_version: "1.41".into(),
            prefix: "/v1.40".into(),
            timeout: DEFAULT_TIMEOUT,
        };
        for (w, s) in [("W", "s"), ("w", "S/../x"), ("", "s"), ("w", "")] {
            let e = engine.inspect(w, s).unwrap_err();
            assert!(matches!(e, ContainerError::Invalid(_)), "{e}");
        }
        let mut m = manifest();
        m.runtime = Runtime::Process(protocol::manifest::ProcessRuntime {
            program: protocol::manifest::Program::Command("x".into()),
            args: vec![],
            env: BTreeMap::new(),
            working_dir: String::new(),
        });
        let e = engine.ensure("w", &m).unwrap_err();
        assert!(matches!(e, ContainerError::Invalid(_)), "{e}");
        let e = engine.inspect("w", "s").unwrap_err();
        assert!(matches!(e, ContainerError::EngineUnavailable { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/engine.sock"), "{e}");
    }
}
