//! The aerekos edge-worker: a small agent for each Raspberry Pi.
//!
//! It enrols once over HTTP ([`enroll`]), keeps its identity in a state dir
//! ([`state`]), samples hardware metrics ([`collect`]) and streams sealed
//! frames to the conductor over MQTT ([`session`]) through a bounded,
//! persisted store-and-forward queue ([`outbox`]). It hosts the process and
//! container services the conductor deploys ([`supervisor`], [`container`]);
//! they keep running while the conductor is unreachable and across worker
//! restarts. Services read their config and secrets and publish events and
//! metrics through a local HTTP API ([`local_api`]); their output is sent on
//! request ([`logs`]).
//!
//! [`run`] is the whole agent; the `edge-worker` binary is a thin CLI around
//! it ([`cli`]), and the conductor embeds it for `--local-worker`.
//!
//! Footprint rules: one `current_thread` runtime, blocking work (HTTP,
//! sysinfo) on `spawn_blocking`, no C dependencies, no regex. Writes to the
//! state dir are batched (see [`state`] and [`outbox`]) to spare SD cards.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tracing::Instrument;

pub mod backoff;
pub mod board;
pub mod cgroup;
pub mod cli;
pub mod collect;
pub mod conductor_urls;
pub mod container;
pub mod enroll;
#[cfg(feature = "remote-exec")]
pub mod exec;
pub mod fetch;
pub mod health;
pub mod local_api;
pub mod logs;
pub mod outbox;
pub mod session;
pub mod state;
pub mod supervisor;
pub mod tls;
pub mod update;

pub use enroll::EnrollError;
pub use outbox::OutboxError;
pub use state::StateError;

/// The agent's version: the package's, or `AEREKOS_AGENT_VERSION` when it
/// was set at build time (a release built from a tag with a build suffix,
/// and the self-update tests' "newer" agent).
pub const VERSION: &str = match option_env!("AEREKOS_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Default metrics interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default metrics batch period (`--batch`): 30 samples a frame at the
/// default interval.
pub const DEFAULT_BATCH: Duration = Duration::from_secs(300);
/// Default outbox capacity: 2 h of metrics at the default interval.
pub const DEFAULT_QUEUE_CAPACITY: usize = 720;
/// Default time queued frames may wait before they are written to disk.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(30);

/// How to run a worker. [`WorkerConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Conductor base URL (`http://host:3000`); required for the first enrolment.
    pub conductor_url: Option<String>,
    /// Registration token; used only when no identity is stored (a token
    /// left in a service's environment must not make every start depend on
    /// the conductor's HTTP API).
    pub token: Option<String>,
    /// Enrol again with the stored identity and its proof (same id, fresh MQTT
    /// login), e.g. after the conductor's data was restored from a backup.
    pub reenroll: bool,
    /// Where `state.json` and `outbox.bin` live.
    pub state_dir: PathBuf,
    /// Metrics interval; at least [`session::MIN_INTERVAL`] (smaller is raised).
    pub interval: Duration,
    /// Metrics batch period: the samples of this long go in one frame, to
    /// a conductor that reads batches; zero: every sample at once
    /// (`session/batching.rs`).
    pub batch: Duration,
    /// `key=value` labels sent at enrolment and in the birth frame.
    pub labels: Vec<(String, String)>,
    /// Outbox capacity in frames (≥ 1); the oldest are dropped beyond it.
    pub queue_capacity: usize,
    /// How long queued, un-acknowledged frames may wait before being written
    /// to `outbox.bin`.
    pub flush_interval: Duration,
    /// Hostname override (several workers on one host in tests).
    pub hostname: Option<String>,
    /// Override of `/etc/machine-id`.
    pub machine_id: Option<String>,
    /// Override of the broker URL the conductor returned.
    pub mqtt_url: Option<String>,
    /// Where the local API for hosted services listens (`ip:port`; port 0:
    /// any free port, the services are told the one bound); `None`: off.
    /// Failing to bind is not fatal: services then run without it.
    pub local_api: Option<String>,
    /// `--allow-remote-exec`: run the conductor's `Exec` commands
    /// ([`exec`]); off by default, and then they are refused.
    pub allow_remote_exec: bool,
    /// `--release-key`: the Ed25519 public key (64 hex) agent releases must
    /// be signed with; pinned in the state (replacing one the conductor
    /// gave at enrolment). `None`: the pinned one, if any.
    pub release_key: Option<String>,
    /// Whether this agent may replace its own binary ([`update`]): the
    /// `edge-worker` binary's `--self-update` ([`SelfUpdate::Auto`] by
    /// default); an agent embedded in another program (the conductor's
    /// `--local-worker`) is [`SelfUpdate::Embedded`] and refuses updates.
    pub self_update: SelfUpdate,
    /// `--host-root`: where the host's `/sys` and `/proc` are seen (`/`;
    /// in a container, where they are mounted). The board reader
    /// ([`board`]) and the device model are read under it.
    pub host_root: PathBuf,
}

/// `--self-update`: may the agent replace its own binary?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfUpdate {
    /// Yes, unless it runs in a container (`/.dockerenv`,
    /// `/run/.containerenv`), where the image is the unit of update.
    Auto,
    /// Yes, also in a container (one whose filesystem the operator keeps).
    Always,
    /// No (`--self-update never`).
    Never,
    /// No: the agent is a library inside another program.
    Embedded,
}

impl std::str::FromStr for SelfUpdate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SelfUpdate::Auto),
            "always" => Ok(SelfUpdate::Always),
            "never" => Ok(SelfUpdate::Never),
            _ => Err("expected auto, always or never".into()),
        }
    }
}

impl WorkerConfig {
    /// Defaults (10 s interval, 720 frames, 30 s flush) for `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> WorkerConfig {
        WorkerConfig {
            conductor_url: None,
            token: None,
            reenroll: false,
            state_dir: state_dir.into(),
            interval: DEFAULT_INTERVAL,
            batch: DEFAULT_BATCH,
            labels: Vec::new(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            hostname: None,
            machine_id: None,
            mqtt_url: None,
            local_api: Some(local_api::DEFAULT_LISTEN.to_string()),
            allow_remote_exec: false,
            release_key: None,
            self_update: SelfUpdate::Embedded,
            host_root: PathBuf::from("/"),
        }
    }
}

impl Default for WorkerConfig {
    /// The defaults with the state dir `./aerekos-worker`.
    fn default() -> Self {
        WorkerConfig::new("aerekos-worker")
    }
}

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration cannot work (missing token on first run, bad URL, …).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The state dir could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// Enrolment failed for good (bad token, revoked, rejected request).
    #[error("enrolment failed: {0}")]
    Enroll(#[from] EnrollError),
    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),
    /// This binary was started as the trial of an update it is not.
    #[error("self-update: {0}")]
    Update(String),
}

/// How [`run_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `shutdown` completed (or enrolment was interrupted by it).
    Shutdown,
    /// A signed release is staged ([`update::Phase::Staged`]): the caller
    /// runs it on trial ([`update::run_trial`]).
    UpdateStaged,
}

/// Runs the worker until `shutdown` completes (then sends `offline`,
/// persists queued frames and returns `Ok`). Errors only for conditions a
/// retry cannot fix: bad configuration, unusable state dir, refused
/// enrolment. A conductor or broker that is down is waited for.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    run_until(config, shutdown).await.map(|_| ())
}

/// [`run`], saying why it ended: the `edge-worker` binary also ends for a
/// staged self-update, which it then runs on trial.
pub async fn run_until(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, WorkerError> {
    tokio::pin!(shutdown);
    let mut config = config;
    if config.interval < session::MIN_INTERVAL {
        tracing::warn!(
            "interval {:?} raised to the minimum {:?}",
            config.interval,
            session::MIN_INTERVAL
        );
        config.interval = session::MIN_INTERVAL;
    }
    if config.queue_capacity == 0 {
        return Err(WorkerError::Config(
            "queue capacity must be at least 1".into(),
        ));
    }
    let capacity = u32::try_from(config.queue_capacity).unwrap_or(u32::MAX);
    let covered = config.interval.saturating_mul(capacity);
    if covered < Duration::from_secs(3600) {
        tracing::warn!(
            "the outbox holds only {} min of metrics ({} frames at {:?}); an outage longer than that loses the oldest",
            covered.as_secs() / 60,
            config.queue_capacity,
            config.interval
        );
    }
    let labels = config.labels.clone();
    if labels.len() > protocol::frame::MAX_LABELS {
        tracing::warn!(
            "only the first {} of {} labels are sent",
            protocol::frame::MAX_LABELS,
            labels.len()
        );
    }

    state::ensure_dir(&config.state_dir)?;
    let stored = state::load(&config.state_dir)?;

    // Sysinfo setup reads /proc and /sys: off the runtime thread.
    let hostname = config.hostname.clone();
    let host_root = config.host_root.clone();
    let (collector, inventory, disks) = tokio::task::spawn_blocking(move || {
        let mut c = collect::Collector::with_host_root(&host_root);
        let inv = c.inventory(hostname.as_deref());
        let disks = c.disks();
        (c, inv, disks)
    })
    .await
    .map_err(|e| WorkerError::Task(e.to_string()))?;

    let state = match (stored, config.token.clone()) {
        (Some(s), token) if !config.reenroll => {
            if token.is_some() {
                tracing::info!(
                    worker_id = %s.worker_id,
                    "identity stored: --token ignored (--reenroll enrols again)"
                );
            }
            s
        }
        (None, None) => {
            return Err(WorkerError::Config(format!(
                "no identity in {}: a registration token (--token or \
                 AEREKOS_REGISTRATION_TOKEN) and the conductor URL (--conductor) are \
                 required for the first enrolment",
                config.state_dir.display()
            )))
        }
        (stored, token) => {
            // Re-enrolment rests on the proof of the stored secret; a token is
            // sent too when one is configured.
            let token = match token.as_deref().map(protocol::RegistrationToken::parse) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => return Err(WorkerError::Config(e.to_string())),
                None => None,
            };
            let Some(text) = config
                .conductor_url
                .clone()
                .or_else(|| stored.as_ref().map(|s| s.conductor_url.clone()))
            else {
                return Err(WorkerError::Config(
                    "--conductor is required to enrol".into(),
                ));
            };
            let Some(mut urls) = conductor_urls::ConductorUrls::parse(&text) else {
                return Err(WorkerError::Config(format!(
                    "invalid conductor URL {text:?}: expected https://host:port, or a \
                     comma-separated list of them"
                )));
            };
            let pin = token.as_ref().and_then(|t| t.ca_fingerprint);
            if pin.is_some() && urls.all().iter().any(|u| u.starts_with("http://")) {
                // The conductor serves HTTPS and HTTP on one port.
                urls = urls.upgraded_to_https();
                tracing::info!("the token pins the conductor's CA: enrolling over {urls}");
            }
            let trust = tls::Trust::load(&config.state_dir).map_err(tls_config)?;
            // A stored CA is kept unless the token pins another (a new CA
            // on the conductor: pinned afresh, by the new fingerprint).
            let pin = match (&trust, pin) {
                (Some(t), Some(fp)) if t.fingerprint() == fp => None,
                (_, pin) => pin,
            };
            if urls.any_https() && trust.is_none() && pin.is_none() {
                return Err(WorkerError::Config(format!(
                    "{urls} is HTTPS but the token carries no CA fingerprint \
                     (aer_….<64 hex>) and no CA is pinned in {}: use the token the conductor \
                     printed, or the conductor's loopback address over http://",
                    config.state_dir.display()
                )));
            }
            let token = token.map(|t| t.secret).unwrap_or_default();
            let machine_id = state::machine_id(config.machine_id.as_deref(), &config.state_dir)?;
            let interval_ms = u32::try_from(config.interval.as_millis()).unwrap_or(u32::MAX);
            let (worker_id, proof) = match &stored {
                Some(s) => {
                    let secret = s.secret().map_err(|e| StateError::Corrupt {
                        path: config.state_dir.join(state::STATE_FILE),
                        reason: e.to_string(),
                    })?;
                    (
                        Some(s.worker_id.clone()),
                        Some(protocol::reenroll_proof(&secret, &s.worker_id)),
                    )
                }
                None => (None, None),
            };
            let request = enroll::EnrollRequest {
                token,
                hostname: inventory.hostname.to_string(),
                machine_id,
                labels: labels.iter().cloned().collect(),
                inventory: inventory.birth(&disks, &labels, interval_ms),
                worker_id,
                proof,
            };
            let span = tracing::info_span!("enrol", conductor = %urls);
            let first = FirstContact {
                urls: urls.clone(),
                state_dir: config.state_dir.clone(),
                trust,
                pin,
            };
            let Some(resp) = enroll_with_retry(first, request, shutdown.as_mut())
                .instrument(span)
                .await?
            else {
                return Ok(Ended::Shutdown);
            };
            if let Some(pem) = &resp.mqtt_ca_pem {
                let saved = tls::der_of_pem(pem)
                    .and_then(|der| tls::save_ca(&config.state_dir, tls::BROKER_CA_FILE, &der));
                saved.map_err(tls_config)?;
            }
            if let Some(ms) = resp.interval_ms {
                if u128::from(ms) != config.interval.as_millis() {
                    tracing::info!(
                        "the conductor suggests a {ms} ms interval; using the configured {} ms",
                        config.interval.as_millis()
                    );
                }
            }
            // Seqs only ever grow, whatever the id; the command window belongs
            // to the identity and restarts with a new one.
            // So do the local API tokens of the services it runs.
            let (seq_reserved, cmd_highest, cmd_bitmap, local_api_key) = match &stored {
                Some(old) if old.worker_id == resp.worker_id => (
                    old.seq_reserved,
                    old.cmd_highest,
                    old.cmd_bitmap,
                    Some(
                        old.local_api_key
                            .clone()
                            .unwrap_or_else(|| old.secret.clone()),
                    ),
                ),
                Some(old) => (old.seq_reserved, 0, 0, None),
                None => (1, 0, 0, None),
            };
            let resp_secret_hex = resp.secret.clone();
            let new = state::State {
                worker_id: resp.worker_id,
                secret: resp.secret,
                conductor_url: urls.to_string(),
                mqtt_url: resp.mqtt_url,
                mqtt_username: resp.mqtt_username,
                mqtt_password: resp.mqtt_password,
                mqtt_client_id: resp.mqtt_client_id,
                seq_reserved,
                cmd_highest,
                cmd_bitmap,
                previous_secret: None,
                local_api_key: local_api_key.filter(|k| *k != resp_secret_hex),
                // The conductor's key is pinned at enrolment; a re-enrolment
                // with a conductor that has none keeps the pinned one.
                release_key: resp
                    .release_key
                    .clone()
                    .or_else(|| stored.as_ref().and_then(|s| s.release_key.clone())),
            };
            state::save(&config.state_dir, &new)?;
            tracing::info!(worker_id = %new.worker_id, "enrolled");
            new
        }
    };

    let mut state = state;
    if let Some(key) = &config.release_key {
        protocol::release::parse_public_key(key)
            .map_err(|e| WorkerError::Config(format!("--release-key: {e}")))?;
        if state.release_key.as_deref() != Some(key.trim()) {
            state.release_key = Some(key.trim().to_string());
            state::save(&config.state_dir, &state)?;
            tracing::info!("release key pinned from --release-key");
        }
    }
    let release_key = state
        .release_key
        .as_deref()
        .and_then(|k| protocol::release::parse_public_key(k).ok());
    let trial_env = std::env::var(update::TRIAL_ENV).ok();
    let startup = if cfg!(feature = "self-update") {
        update::on_start(&config.state_dir, trial_env.as_deref()).map_err(WorkerError::Update)?
    } else {
        update::Startup::Nothing
    };

    let secret = state.secret().map_err(|e| StateError::Corrupt {
        path: config.state_dir.join(state::STATE_FILE),
        reason: e.to_string(),
    })?;
    let trust = tls::Trust::load(&config.state_dir).map_err(tls_config)?;
    // A `--conductor` given at start replaces the one stored at enrolment,
    // as `--mqtt-url` does: a standby added to the list later reaches an
    // enrolled agent by a restart with the new list. With a pinned CA its
    // `http://` URLs are taken as `https://`, as at enrolment (the
    // conductor serves both on one port): a restart never downgrades.
    let configured = config
        .conductor_url
        .as_deref()
        .and_then(conductor_urls::ConductorUrls::parse)
        .map(|u| match &trust {
            Some(_) => u.upgraded_to_https().to_string(),
            None => u.to_string(),
        })
        .filter(|u| *u != state.conductor_url);
    if let Some(text) = configured {
        tracing::info!(
            conductor = %text,
            enrolled_with = %state.conductor_url,
            "using the configured conductor URL"
        );
        state.conductor_url = text;
    }
    let worker_id = state.worker_id.clone();
    let mqtt_url = config
        .mqtt_url
        .clone()
        .unwrap_or_else(|| state.mqtt_url.clone());
    // Keyed by the enrolment secret even after rotations: running services
    // keep the tokens in their environment.
    let local_key = state.local_api_key().map_err(|e| StateError::Corrupt {
        path: config.state_dir.join(state::STATE_FILE),
        reason: e.to_string(),
    })?;
    let previous_secret = state.previous_secret();
    let (outbox, report) = outbox::Outbox::load_any(
        &config.state_dir,
        config.queue_capacity,
        &worker_id,
        &[Some(&secret), previous_secret.as_ref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
    );
    if report.loaded > 0 {
        tracing::info!(
            frames = report.loaded,
            "restored queued frames from the outbox file"
        );
    }
    if let Some(problem) = &report.problem {
        tracing::warn!(
            skipped_bytes = report.skipped_bytes,
            "outbox file partly unusable ({problem}); kept {} frames",
            report.loaded
        );
    }
    let mut store = state::StateStore::new(config.state_dir.clone(), state);
    if let Some(last) = outbox.last_seq() {
        store.ensure_above(last);
    }
    // The local API first: services spawned below are told its address.
    let registry = local_api::Registry::new(&local_key, &worker_id);
    let (local_tx, local_rx) = local_api::channel(local_api::DEFAULT_QUEUE_LEN);
    let api = match config.local_api.as_deref() {
        None => {
            tracing::info!("local API off (--local-api off)");
            None
        }
        // Not fatal: several workers on one host, or the port taken.
        Some(listen) => {
            match local_api::LocalApi::start(listen, registry.clone(), local_tx.clone()) {
                Ok(api) => Some(api),
                Err(e) => {
                    tracing::warn!("{e}; services run without a local API");
                    None
                }
            }
        }
    };
    // Registered before every spawn: a service that calls at once is known.
    let hook_registry = registry.clone();
    let extra_env: supervisor::EnvHook = std::sync::Arc::new(move |m: &protocol::Manifest| {
        if let Err(e) = hook_registry.register_manifest(m) {
            tracing::warn!(service = %m.name, "local API: {e}");
        }
        hook_registry.env(&m.name)
    });
    // Services run whatever the connection does: adopt or start them now.
    // The arch is the birth's, so the conductor's artifact keys match it.
    let services = supervisor::Supervisor::load_with(
        &config.state_dir,
        supervisor::SupervisorOptions {
            arch: inventory.arch.to_string(),
            extra_env: Some(extra_env),
            worker_id: worker_id.clone(),
            ..supervisor::SupervisorOptions::default()
        },
    );
    // Adopted processes and containers were not spawned: register them too.
    for st in services.statuses() {
        if let Some(m) = services.manifest(&st.name) {
            if let Err(e) = registry.register_manifest(m) {
                tracing::warn!(service = %st.name, "local API: {e}");
            }
            registry.set_state(&st.name, local_api::state_str(st.state));
        }
    }
    // For a fresh MQTT login when the broker refuses this one.
    let login_template = enroll::EnrollRequest {
        token: String::new(),
        hostname: inventory.hostname.to_string(),
        machine_id: state::machine_id(config.machine_id.as_deref(), &config.state_dir)?,
        labels: labels.iter().cloned().collect(),
        inventory: inventory.birth(
            &disks,
            &labels,
            u32::try_from(config.interval.as_millis()).unwrap_or(u32::MAX),
        ),
        worker_id: None,
        proof: None,
    };
    let params = session::SessionParams {
        login_template,
        store,
        secret,
        mqtt_url,
        trust,
        outbox,
        inventory,
        disks,
        collector,
        labels,
        interval: config.interval,
        batch: config.batch,
        flush_interval: config.flush_interval,
        services,
        local: session::LocalParts {
            registry,
            rx: local_rx,
            tx: local_tx,
        },
        allow_exec: config.allow_remote_exec,
        update: session::UpdateParts {
            startup,
            release_key,
            refused: update::impossible(config.self_update),
        },
    };
    if config.allow_remote_exec {
        #[cfg(feature = "remote-exec")]
        tracing::warn!(
            "remote exec is enabled (--allow-remote-exec): the conductor may run commands here"
        );
        #[cfg(not(feature = "remote-exec"))]
        tracing::warn!("--allow-remote-exec ignored: this agent was built without remote exec");
    }
    let span = tracing::info_span!("worker", id = %worker_id);
    let result = session::run(params, shutdown.as_mut())
        .instrument(span)
        .await;
    if let Some(api) = api {
        // Joins its threads: off the runtime thread.
        let _ = tokio::task::spawn_blocking(move || api.stop()).await;
    }
    result
}

fn tls_config(e: tls::TlsError) -> WorkerError {
    WorkerError::Config(e.to_string())
}

/// How to reach the conductor for enrolment.
struct FirstContact {
    /// The conductor, or an active one and its standbys.
    urls: conductor_urls::ConductorUrls,
    state_dir: PathBuf,
    /// The CA pinned earlier, if any.
    trust: Option<tls::Trust>,
    /// A fingerprint to pin (and store) before enrolling.
    pin: Option<protocol::Fingerprint>,
}

impl FirstContact {
    /// Pins the CA if asked to, then enrols. Blocking.
    fn enroll(
        &self,
        request: &enroll::EnrollRequest,
    ) -> Result<enroll::EnrollResponse, EnrollError> {
        let url = self.urls.reachable();
        let trust = match &self.pin {
            Some(fp) if url.starts_with("https://") => {
                let der = tls::pin_conductor_ca(url, fp)?;
                tls::save_ca(&self.state_dir, tls::CA_FILE, &der)?;
                tracing::info!(ca_fingerprint = %fp, "pinned the conductor's CA");
                tls::Trust::load(&self.state_dir)?
            }
            _ => self.trust.clone(),
        };
        enroll::enroll_once(url, request, trust.as_ref())
    }
}

/// Enrols, retrying what can be retried (conductor down, 5xx, 429) with
/// backoff 1 s → 60 s plus jitter. `Ok(None)` if `shutdown` fired first.
async fn enroll_with_retry(
    first: FirstContact,
    request: enroll::EnrollRequest,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<enroll::EnrollResponse>, WorkerError> {
    let mut backoff = backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut attempt: u32 = 0;
    let first = std::sync::Arc::new(first);
    loop {
        attempt += 1;
        let (f, r) = (first.clone(), request.clone());
        let call = tokio::task::spawn_blocking(move || f.enroll(&r));
        let result = tokio::select! {
            () = &mut shutdown => return Ok(None),
            r = call => r.map_err(|e| WorkerError::Task(e.to_string()))?,
        };
        let err = match result {
            Ok(resp) => return Ok(Some(resp)),
            Err(e) if e.is_retryable() => e,
            // Logged by the caller (main.rs prints the error).
            Err(e) => return Err(e.into()),
        };
        let delay = backoff.next_delay();
        if attempt == 1 || matches!(err, EnrollError::RateLimited) {
            tracing::warn!("enrolment failed: {err}; retrying in {delay:?}");
        } else {
            tracing::info!(attempt, "enrolment failed: {err}; retrying in {delay:?}");
        }
        tokio::select! {
            () = &mut shutdown => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let fut = run(WorkerConfig::new("/nonexistent"), async {});
        assert_send(&fut);
    }

    #[tokio::test]
    async fn first_run_without_token_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(WorkerConfig::new(dir.path()), async {})
            .await
            .unwrap_err();
        assert!(matches!(err, WorkerError::Config(_)), "{err}");
        assert!(err.to_string().contains("--token"));
    }

    #[tokio::test]
    async fn shutdown_while_waiting_for_the_conductor_returns_ok() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody listens there: bind(:0) is never given it.
        let port = test_support::free_port();
        let mut cfg = WorkerConfig::new(dir.path());
        cfg.conductor_url = Some(format!("http://127.0.0.1:{port}"));
        cfg.token = Some("t".into());
        cfg.machine_id = Some("m".into());
        let res = run(cfg, tokio::time::sleep(Duration::from_millis(1500))).await;
        assert!(res.is_ok(), "{res:?}");
        assert!(
            state::load(dir.path()).unwrap().is_none(),
            "no identity stored"
        );
    }
}
