//! The local API: a small HTTP/JSON server on loopback that hosted services
//! use to read their own config and secrets, see the worker's view of their
//! health, and publish events and metrics to the conductor.
//!
//! Authentication: every service has its own bearer token,
//! `hex(HMAC-SHA256(worker secret, "aerekos-local:" + name))` (64 hex
//! characters). Derived rather than stored: it is the same across worker
//! restarts (an adopted service keeps the environment it was started with)
//! and re-enrolment (which keeps the secret), needs no file, and a token
//! reveals nothing about the secret or another service's token. The worker
//! hands it to the process as [`ENV_TOKEN`] together with [`ENV_API`] and
//! [`ENV_SERVICE`] ([`Registry::env`]). Only *registered* services are
//! answered: a token whose service is not registered gets 401 like any
//! wrong token. Tokens are compared in constant time against every
//! registered service.
//!
//! Routes (all JSON; `Authorization: Bearer <token>`, else 401):
//! * `GET /v1/health` → `{"service", "state", "worker_id"}`
//! * `GET /v1/config` → the service's config map
//! * `GET /v1/secrets` → the service's secrets map; `GET /v1/secrets/{key}`
//!   → `{"key", "value"}` or 404
//! * `POST /v1/events` `{"text": "..."}` → 202, queued as
//!   [`LocalPublish::Event`]
//! * `POST /v1/metrics` `{"samples": {"key": int, ...}}` → 202, queued as
//!   [`LocalPublish::Metrics`]
//!
//! Errors are `{"error": "..."}`: 400 bad JSON or values, 401, 404, 405,
//! 413 body over [`MAX_BODY`], 429 over the per-service publish rate, 503
//! publish queue full. Secret values are never logged.
//!
//! Limits: bodies ≤ [`MAX_BODY`] bytes; event text is cut to the wire's
//! [`protocol::frame::Detail`] (200 bytes including the `"<name>: "`
//! prefix); metric keys `[a-z0-9_]{1,32}`, 1..=[`MAX_SERVICE_SAMPLES`]
//! samples, `i64` values; publishes per service limited to a burst of
//! [`PUBLISH_BURST`] refilled at [`PUBLISH_PER_S`] per second (they end up
//! in the worker's outbox, which must not be flooded out by one chatty
//! service); the queue to the session holds what [`channel`] was given.
//!
//! HTTP (a minimal HTTP/1.1 server of its own, see `server.rs`): one
//! request per connection (`Connection: close`); the request head is at
//! most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields (431 beyond); POST
//! bodies need `Content-Length` (411 without it or with `Transfer-Encoding`);
//! the whole request must arrive within [`REQUEST_TIMEOUT`] of connecting
//! (400 for a request cut short; a silent client is closed without an
//! answer). [`HANDLER_THREADS`] threads accept and serve, one connection
//! each at a time, so a stalled client holds one of them for at most
//! [`REQUEST_TIMEOUT`]. Loopback only by default ([`DEFAULT_LISTEN`]); no
//! TLS.

mod server;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use protocol::frame::{bounded, Sample, ServiceMetrics, MAX_SERVICE_SAMPLES};
use protocol::{Body, Event, EventKind, Manifest, Secret, ServiceState};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

/// Where the local API listens unless configured otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3001";
/// Largest accepted request body, bytes (413 beyond).
pub const MAX_BODY: usize = 16 * 1024;
/// Default capacity of the queue from the API to the session.
pub const DEFAULT_QUEUE_LEN: usize = 64;
/// Request handler threads (each also accepts).
pub const HANDLER_THREADS: usize = 2;
/// Largest request head (request line and headers with their line ends),
/// bytes (431 beyond).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields in a request (431 beyond).
pub const MAX_HEADERS: usize = 64;
/// Time a client has from connecting to having sent its whole request
/// (400 for a request cut short); also bounds each write of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes (events + metrics) a service may make at once.
pub const PUBLISH_BURST: u32 = 20;
/// Sustained publishes per second per service.
pub const PUBLISH_PER_S: u32 = 5;
use protocol::local_api::{CONFIG, EVENTS, HEALTH, METRICS, SECRETS};
/// The environment names and paths both sides agree on ([`protocol::local_api`]).
pub use protocol::local_api::{ENV_API, ENV_SERVICE, ENV_TOKEN};
/// Domain separation of the token derivation.
const TOKEN_CONTEXT: &[u8] = b"aerekos-local:";

/// Why the local API could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// Not a valid service name (`[a-z0-9-]{1,32}`).
    #[error("invalid service name {0:?}")]
    InvalidName(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The configured address.
        addr: String,
        /// What the OS said.
        reason: String,
    },
    /// A handler thread could not be started.
    #[error("cannot start the local API thread: {0}")]
    Thread(String),
}

/// What a service published, for the session to send. Build the frame with
/// [`LocalPublish::into_body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalPublish {
    /// `POST /v1/events`.
    Event {
        /// Service name (valid, ≤ 32 bytes).
        name: String,
        /// Event text (non-empty; cut to the wire bound by `into_body`).
        text: String,
    },
    /// `POST /v1/metrics`.
    Metrics {
        /// Service name.
        name: String,
        /// Validated samples, in key order. Invariant: 1..=
        /// [`MAX_SERVICE_SAMPLES`] (a plain `Vec` keeps the queue's slots
        /// small; `into_body` copies them into the frame's bounded list).
        samples: Vec<Sample>,
    },
}

impl LocalPublish {
    /// The frame body: `Event(ServiceEvent, "<name>: <text>")` or
    /// `ServiceMetrics`.
    pub fn into_body(self) -> Body {
        match self {
            LocalPublish::Event { name, text } => Body::Event(Event {
                kind: EventKind::ServiceEvent,
                detail: bounded(&format!("{name}: {text}")),
            }),
            LocalPublish::Metrics { name, samples } => {
                let mut bounded_samples = heapless::Vec::new();
                for s in samples.into_iter().take(MAX_SERVICE_SAMPLES) {
                    // Cannot fail: at most MAX_SERVICE_SAMPLES are taken.
                    let _ = bounded_samples.push(s);
                }
                Body::ServiceMetrics(ServiceMetrics {
                    name: bounded(&name),
                    samples: bounded_samples,
                })
            }
        }
    }

    /// The publishing service.
    pub fn service(&self) -> &str {
        match self {
            LocalPublish::Event { name, .. } | LocalPublish::Metrics { name, .. } => name,
        }
    }
}

/// The queue from the API threads to the session (bounded; a full queue
/// answers 503).
pub fn channel(capacity: usize) -> (mpsc::Sender<LocalPublish>, mpsc::Receiver<LocalPublish>) {
    mpsc::channel(capacity.max(1))
}

/// Lower-case name of a service state, as `GET /v1/health` reports it.
pub fn state_str(state: ServiceState) -> &'static str {
    state.as_str()
}

/// The token of service `name` under `secret` (64 lower-case hex chars).
pub fn derive_token(secret: &Secret, name: &str) -> String {
    // HMAC takes keys of any length; the fallback (an all-zero tag) is
    // unreachable and would only ever fail closed for a wrong key length.
    let tag = match <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(TOKEN_CONTEXT);
            mac.update(name.as_bytes());
            let out = mac.finalize().into_bytes();
            let mut tag = [0u8; 32];
            tag.copy_from_slice(&out);
            tag
        }
        Err(_) => [0u8; 32],
    };
    protocol::hex_string(&tag)
}

/// Constant-time equality of two byte strings of public length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One registered service. `Debug` omits the token and the secrets.
struct Entry {
    token: String,
    config: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
    state: String,
    /// Publish tokens left (token bucket, see [`PUBLISH_BURST`]).
    allowance: f64,
    refilled: Instant,
}

impl Entry {
    /// Takes one publish from the bucket; `false` when empty.
    fn take_publish(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.allowance =
            (self.allowance + elapsed * f64::from(PUBLISH_PER_S)).min(f64::from(PUBLISH_BURST));
        if self.allowance >= 1.0 {
            self.allowance -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Inner {
    services: BTreeMap<String, Entry>,
    /// `http://127.0.0.1:<port>` once a server is running.
    api_url: Option<String>,
}

/// The services the local API answers for. Cheap to clone (shared state);
/// the supervisor registers a service before spawning it and unregisters it
/// when it is removed.
#[derive(Clone)]
pub struct Registry {
    secret: Arc<Secret>,
    worker_id: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Registry")
            .field("worker_id", &self.worker_id)
            .field("services", &inner.services.keys().collect::<Vec<_>>())
            .field("api_url", &inner.api_url)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry deriving tokens from the worker's `secret`.
    pub fn new(secret: &Secret, worker_id: &str) -> Registry {
        Registry {
            secret: Arc::new(secret.clone()),
            worker_id: Arc::from(worker_id),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// A poisoned lock only means a handler panicked; the data is still
    /// consistent (every update is a single assignment).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers (or updates) `name` with its config and secrets; returns its
    /// token. The state starts as `starting` for a new service and is kept
    /// for a known one.
    pub fn register(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
        secrets: BTreeMap<String, String>,
    ) -> Result<String, LocalApiError> {
        if !protocol::manifest::valid_service_name(name) {
            return Err(LocalApiError::InvalidName(name.to_string()));
        }
        let token = derive_token(&self.secret, name);
        let mut inner = self.lock();
        match inner.services.get_mut(name) {
            Some(e) => {
                e.config = config;
                e.secrets = secrets;
            }
            None => {
                inner.services.insert(
                    name.to_string(),
                    Entry {
                        token: token.clone(),
                        config,
                        secrets,
                        state: "starting".into(),
                        allowance: f64::from(PUBLISH_BURST),
                        refilled: Instant::now(),
                    },
                );
            }
        }
        Ok(token)
    }

    /// [`Registry::register`] with a manifest's name, config and secrets.
    pub fn register_manifest(&self, manifest: &Manifest) -> Result<String, LocalApiError> {
        self.register(
            &manifest.name,
            manifest.config.clone(),
            manifest.secrets.clone(),
        )
    }

    /// Forgets `name` (its token is refused from now on); `false` if unknown.
    pub fn unregister(&self, name: &str) -> bool {
        self.lock().services.remove(name).is_some()
    }

    /// Sets the state `GET /v1/health` reports (see [`state_str`]); `false`
    /// if `name` is not registered.
    pub fn set_state(&self, name: &str, state: &str) -> bool {
        match self.lock().services.get_mut(name) {
            Some(e) => {
                e.state = state.to_string();
                true
            }
            None => false,
        }
    }

    /// Is `name` registered?
    pub fn contains(&self, name: &str) -> bool {
        self.lock().services.contains_key(name)
    }

    /// The environment to give service `name`'s process: [`ENV_TOKEN`],
    /// [`ENV_API`] and [`ENV_SERVICE`]. Empty when no server is running (the
    /// service then sees no local API) or the name is invalid. Does not
    /// register.
    /// Matches [`crate::supervisor::EnvHook`]'s return type.
    pub fn env(&self, name: &str) -> Vec<(String, String)> {
        let Some(url) = self.lock().api_url.clone() else {
            return Vec::new();
        };
        if !protocol::manifest::valid_service_name(name) {
            return Vec::new();
        }
        vec![
            (ENV_TOKEN.into(), derive_token(&self.secret, name)),
            (ENV_API.into(), url),
            (ENV_SERVICE.into(), name.to_string()),
        ]
    }

    /// The service owning `token`, compared in constant time against every
    /// registered service (no early exit).
    fn authenticate(&self, token: &str) -> Option<String> {
        let inner = self.lock();
        let mut found = None;
        for (name, e) in &inner.services {
            if ct_eq(e.token.as_bytes(), token.as_bytes()) {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// A running local API server. Stops (and joins its threads) on
/// [`LocalApi::stop`] or drop.
pub struct LocalApi {
    server: server::Server,
    registry: Registry,
}

impl std::fmt::Debug for LocalApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApi")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl LocalApi {
    /// Binds `listen` (e.g. [`DEFAULT_LISTEN`], or `127.0.0.1:0` for any
    /// port), records the URL in `registry` (for [`Registry::env`]) and
    /// starts the [`HANDLER_THREADS`] handler threads. Publishes go to `tx`.
    pub fn start(
        listen: &str,
        registry: Registry,
        tx: mpsc::Sender<LocalPublish>,
    ) -> Result<LocalApi, LocalApiError> {
        let bind_err = |reason: String| LocalApiError::Bind {
            addr: listen.to_string(),
            reason,
        };
        let listener = TcpListener::bind(listen).map_err(|e| bind_err(e.to_string()))?;
        let handler_registry = registry.clone();
        let server = server::Server::start(
            listener,
            HANDLER_THREADS,
            REQUEST_TIMEOUT,
            move |conn: &mut server::Conn| serve(&handler_registry, &tx, conn),
        )
        .map_err(|e| LocalApiError::Thread(e.to_string()))?;
        let addr = server.addr();
        registry.lock().api_url = Some(format!("http://{addr}"));
        tracing::info!(%addr, "local API listening");
        Ok(LocalApi { server, registry })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://<addr>`, the value of [`ENV_API`].
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The registry the server answers from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Stops accepting, ends requests still being read (requests already
    /// read are answered) and joins the threads. Does not wait for idle or
    /// stalled clients.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.server.stop() {
            self.registry.lock().api_url = None;
        }
    }
}

impl Drop for LocalApi {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An HTTP error answer.
#[derive(Debug)]
struct ApiError(u16, String);

impl ApiError {
    fn new(code: u16, msg: impl Into<String>) -> ApiError {
        ApiError(code, msg.into())
    }
}

/// Status and JSON body.
type Answer = Result<(u16, Vec<u8>), ApiError>;

/// Typed bodies rather than `serde_json::Value`: the dynamic JSON code
/// costs binary size the worker does not otherwise pay.
fn answer<T: Serialize + ?Sized>(code: u16, body: &T) -> Answer {
    serde_json::to_vec(body)
        .map(|b| (code, b))
        .map_err(|e| ApiError::new(500, format!("encoding the answer: {e}")))
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    error: &'a str,
}

#[derive(Serialize)]
struct HealthOut<'a> {
    service: &'a str,
    state: &'a str,
    worker_id: &'a str,
}

#[derive(Serialize)]
struct SecretOut<'a> {
    key: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct QueuedOut {
    queued: bool,
}

use protocol::local_api::{EventBody as EventIn, MetricsBody as MetricsIn};

fn bearer(head: &server::Head) -> Option<&str> {
    let v = head.header("Authorization")?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Answers one connection.
fn serve(registry: &Registry, tx: &mpsc::Sender<LocalPublish>, conn: &mut server::Conn) {
    let (code, bytes) = match conn.read_head() {
        Ok(None) => return,
        Ok(Some(head)) => answer_head(registry, tx, conn, &head),
        Err(e) => {
            tracing::debug!(code = e.0, "local API: {}", e.1);
            error_body(e)
        }
    };
    conn.respond(code, &bytes);
}

fn error_body(ApiError(code, msg): ApiError) -> (u16, Vec<u8>) {
    (
        code,
        serde_json::to_vec(&ErrorOut { error: &msg }).unwrap_or_default(),
    )
}

/// Authenticates, reads the body of a POST and routes.
fn answer_head(
    registry: &Registry,
    tx: &mpsc::Sender<LocalPublish>,
    conn: &mut server::Conn,
    head: &server::Head,
) -> (u16, Vec<u8>) {
    let method = head.method.as_str();
    let url = head.target.as_str();
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    let service = bearer(head).and_then(|t| registry.authenticate(t));
    let answer = match &service {
        None => Err(ApiError::new(401, "missing or unknown token")),
        Some(name) => {
            let body = if method == "POST" {
                conn.read_body(head, MAX_BODY)
            } else {
                Ok(Vec::new())
            };
            body.and_then(|b| route(registry, tx, name, method, path, &b))
        }
    };
    let (code, bytes) = answer.unwrap_or_else(error_body);
    // The path may name a secret key, never a value: safe to log.
    tracing::debug!(
        service = service.as_deref().unwrap_or("-"),
        method,
        path,
        code,
        "local API"
    );
    (code, bytes)
}

fn route(
    registry: &Registry,
    tx: &mpsc::Sender<LocalPublish>,
    name: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Answer {
    let get = method == "GET";
    let post = method == "POST";
    let wrong_method = || Err(ApiError::new(405, "method not allowed"));
    // Reads copy out under the lock; the entry may vanish between
    // authentication and here (unregistered meanwhile): then 401.
    let gone = || ApiError::new(401, "missing or unknown token");
    match path {
        HEALTH if get => {
            let inner = registry.lock();
            let e = inner.services.get(name).ok_or_else(gone)?;
            answer(
                200,
                &HealthOut {
                    service: name,
                    state: &e.state,
                    worker_id: &registry.worker_id,
                },
            )
        }
        CONFIG if get => {
            let inner = registry.lock();
            let e = inner.services.get(name).ok_or_else(gone)?;
            answer(200, &e.config)
        }
        SECRETS if get => {
            let inner = registry.lock();
            let e = inner.services.get(name).ok_or_else(gone)?;
            answer(200, &e.secrets)
        }
        EVENTS if post => publish(registry, tx, name, parse_event(name, body)?),
        METRICS if post => publish(registry, tx, name, parse_metrics(name, body)?),
        HEALTH | CONFIG | SECRETS | EVENTS | METRICS => wrong_method(),
        _ => match path
            .strip_prefix(SECRETS)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            Some(raw) if get => {
                let key =
                    percent_decode(raw).ok_or_else(|| ApiError::new(404, "no such secret"))?;
                let inner = registry.lock();
                let e = inner.services.get(name).ok_or_else(gone)?;
                match e.secrets.get(&key) {
                    Some(v) => answer(
                        200,
                        &SecretOut {
                            key: &key,
                            value: v,
                        },
                    ),
                    None => Err(ApiError::new(404, "no such secret")),
                }
            }
            Some(_) => wrong_method(),
            None => Err(ApiError::new(404, "no such route")),
        },
    }
}

/// Rate-limits, then queues without waiting (full → 503).
fn publish(
    registry: &Registry,
    tx: &mpsc::Sender<LocalPublish>,
    name: &str,
    item: LocalPublish,
) -> Answer {
    {
        let mut inner = registry.lock();
        let e = inner
            .services
            .get_mut(name)
            .ok_or_else(|| ApiError::new(401, "missing or unknown token"))?;
        if !e.take_publish(Instant::now()) {
            return Err(ApiError::new(
                429,
                format!("over {PUBLISH_PER_S} publishes per second"),
            ));
        }
    }
    match tx.try_send(item) {
        Ok(()) => answer(202, &QueuedOut { queued: true }),
        Err(mpsc::error::TrySendError::Full(_)) => {
            Err(ApiError::new(503, "publish queue full; retry later"))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Err(ApiError::new(503, "the worker is shutting down"))
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("expected {shape}: {e}")))
}

fn parse_event(name: &str, body: &[u8]) -> Result<LocalPublish, ApiError> {
    let ev: EventIn = parse_json(body, "{\"text\": \"...\"}")?;
    if ev.text.trim().is_empty() {
        return Err(ApiError::new(400, "empty text"));
    }
    // Cut here already, so the queue never holds more than a frame's worth.
    let text: protocol::frame::Detail = bounded(&ev.text);
    Ok(LocalPublish::Event {
        name: name.to_string(),
        text: text.to_string(),
    })
}

/// `[a-z0-9_]{1,32}`.
pub fn valid_metric_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 32
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn parse_metrics(name: &str, body: &[u8]) -> Result<LocalPublish, ApiError> {
    let m: MetricsIn = parse_json(body, "{\"samples\": {\"key\": int, ...}}")?;
    let map = m.samples;
    if map.is_empty() {
        return Err(ApiError::new(400, "no samples"));
    }
    if map.len() > MAX_SERVICE_SAMPLES {
        return Err(ApiError::new(
            400,
            format!("at most {MAX_SERVICE_SAMPLES} samples"),
        ));
    }
    let mut samples = Vec::with_capacity(map.len());
    for (key, value) in map {
        if !valid_metric_key(&key) {
            return Err(ApiError::new(
                400,
                format!("metric key {key:?} is not [a-z0-9_]{{1,32}}"),
            ));
        }
        samples.push(Sample {
            key: bounded(&key),
            value,
        });
    }
    Ok(LocalPublish::Metrics {
        name: name.to_string(),
        samples,
    })
}

/// Decodes `%XX` escapes; `None` for a bad escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            // Two hex digits only: `from_str_radix` alone also takes a sign
            // (`%+1` decoded to 0x01); the `local_api_request` fuzzer checks this.
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Entry points for the fuzzers in `fuzz/` (not an API: hidden, may change
/// without notice). They run the same parsing code as a live connection,
/// minus the socket.
#[doc(hidden)]
pub mod fuzzing {
    use super::{bearer, parse_event, parse_metrics, percent_decode, server, LocalPublish};

    /// What the local API's head parser made of some bytes.
    #[derive(Debug)]
    pub enum HeadOutcome {
        /// No empty line yet: the server would read more (or answer 431
        /// once [`super::MAX_HEAD`] bytes are buffered).
        Incomplete,
        /// Refused with this status.
        Refused(u16),
        /// Parsed.
        Parsed {
            /// Bytes of the head, including its empty line.
            head_len: usize,
            /// Request method.
            method: String,
            /// Request target.
            target: String,
            /// Header fields kept.
            headers: usize,
            /// `Content-Length`, if sent.
            length: Option<usize>,
            /// The bearer token the routes would authenticate with.
            bearer: Option<String>,
        },
    }

    /// Finds the end of the head in `raw` and parses it, as
    /// `Conn::read_head` does once the bytes have arrived.
    pub fn parse_request_head(raw: &[u8]) -> HeadOutcome {
        let Some(end) = server::head_end(raw, 0) else {
            return HeadOutcome::Incomplete;
        };
        match server::parse_head(&raw[..end]) {
            Err(e) => HeadOutcome::Refused(e.0),
            Ok(head) => HeadOutcome::Parsed {
                head_len: end,
                bearer: bearer(&head).map(str::to_string),
                method: head.method,
                target: head.target,
                headers: head.headers.len(),
                length: head.length,
            },
        }
    }

    /// The `/v1/secrets/{key}` path decoder.
    pub fn decode_secret_key(raw: &str) -> Option<String> {
        percent_decode(raw)
    }

    /// Parses a `POST /v1/events` (`metrics: false`) or `POST /v1/metrics`
    /// body for service `name`: the frame body it would be queued as, or
    /// the status of the refusal.
    pub fn parse_publish_body(
        name: &str,
        metrics: bool,
        body: &[u8],
    ) -> Result<protocol::Body, u16> {
        let parsed = if metrics {
            parse_metrics(name, body)
        } else {
            parse_event(name, body)
        };
        parsed.map(LocalPublish::into_body).map_err(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn percent_decode_takes_two_hex_digits_only() {
        assert_eq!(percent_decode("a%20b%2F").as_deref(), Some("a b/"));
        // `u8::from_str_radix("+1", 16)` is Ok(1): a sign must not pass.
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("%-1"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%c3%a9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%ff"), None);
    }

    fn secret() -> Secret {
        Secret::from_bytes([7; 32])
    }

    #[test]
    fn tokens_are_stable_distinct_and_hex() {
        let a = derive_token(&secret(), "a");
        assert_eq!(a, derive_token(&secret(), "a"));
        assert_ne!(a, derive_token(&secret(), "b"));
        assert_ne!(a, derive_token(&Secret::from_bytes([8; 32]), "a"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn registry_lifecycle() {
        let r = Registry::new(&secret(), "w-1");
        assert!(r
            .register("../x", BTreeMap::new(), BTreeMap::new())
            .is_err());
        let t = r.register("a", BTreeMap::new(), BTreeMap::new()).unwrap();
        assert_eq!(r.authenticate(&t).as_deref(), Some("a"));
        assert_eq!(r.authenticate(&t[..63]), None);
        assert!(r.set_state("a", "running"));
        assert!(!r.set_state("b", "running"));
        assert!(r.env("a").is_empty(), "no server, no env");
        assert!(r.unregister("a"));
        assert_eq!(r.authenticate(&t), None);
        assert!(!r.unregister("a"));
        assert!(!format!("{r:?}").contains(&t));
    }

    #[test]
    fn metric_keys_and_escapes() {
        assert!(valid_metric_key("queue_depth_2"));
        for bad in ["", "Queue", "a-b", "a.b", &"x".repeat(33)] {
            assert!(!valid_metric_key(bad), "{bad}");
        }
        assert_eq!(percent_decode("db%20pass").as_deref(), Some("db pass"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }

    #[test]
    fn publishes_become_frames() {
        let long = "é".repeat(300);
        let body = serde_json::to_vec(&json!({ "text": long })).unwrap();
        let Body::Event(ev) = parse_event("svc", &body).unwrap().into_body() else {
            panic!("not an event")
        };
        assert_eq!(ev.kind, EventKind::ServiceEvent);
        assert!(ev.detail.starts_with("svc: é"));
        assert!(ev.detail.len() > 190 && ev.detail.len() <= 200);
        assert_eq!(
            parse_event("svc", b"{\"text\": \" \"}").err().map(|e| e.0),
            Some(400)
        );
        assert_eq!(parse_event("svc", b"[1]").err().map(|e| e.0), Some(400));

        let body = br#"{"samples": {"b": -2, "a": 1}}"#;
        let Body::ServiceMetrics(m) = parse_metrics("svc", body).unwrap().into_body() else {
            panic!("not metrics")
        };
        assert_eq!(m.name, "svc");
        let got: Vec<_> = m
            .samples
            .iter()
            .map(|s| (s.key.as_str(), s.value))
            .collect();
        assert_eq!(got, [("a", 1), ("b", -2)]);
        for bad in [
            &br#"{"samples": {"a": 1.5}}"#[..],
            br#"{"samples": {}}"#,
            br#"{"samples": {"a": 18446744073709551615}}"#,
            br#"{"samples": [1]}"#,
        ] {
            assert_eq!(parse_metrics("svc", bad).err().map(|e| e.0), Some(400));
        }
        let many: serde_json::Map<String, Value> = (0..=MAX_SERVICE_SAMPLES)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        let body = serde_json::to_vec(&json!({ "samples": many })).unwrap();
        assert_eq!(parse_metrics("svc", &body).err().map(|e| e.0), Some(400));
    }

    #[test]
    fn rate_limit_refills() {
        let now = Instant::now();
        let mut e = Entry {
            token: String::new(),
            config: BTreeMap::new(),
            secrets: BTreeMap::new(),
            state: String::new(),
            allowance: f64::from(PUBLISH_BURST),
            refilled: now,
        };
        for _ in 0..PUBLISH_BURST {
            assert!(e.take_publish(now));
        }
        assert!(!e.take_publish(now));
        assert!(e.take_publish(now + Duration::from_millis(250)));
    }
}
