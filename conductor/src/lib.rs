//! The aerekos conductor: an embedded MQTT broker (or an external one), a
//! SQLite store and an HTTP API for a fleet of edge-workers.
//!
//! [`run`] starts everything and runs until the `shutdown` future resolves.
//! Threads: the current-thread tokio runtime that calls [`run`] drives the
//! MQTT client, the liveness ticker, service reconciliation ([`services`]),
//! alert evaluation ([`alerts`]) and the `Stored` acknowledgements
//! ([`ingest::run_acks`]); the alert webhook sender has its own thread and
//! store connection; rumqttd runs on its own thread (and
//! cannot be stopped, see [`broker`]); the ingest writer owns a SQLite
//! connection on its own thread; tiny_http requests are served by
//! [`http::HTTP_THREADS`] threads.
//!
//! On start the conductor writes `<data_dir>/runtime.json` (`http_addr`,
//! `mqtt_addr`, `pid`) atomically once it is ready, and removes it on a
//! clean shutdown.

pub mod agent_rollout;
pub mod alerts;
pub mod artifacts;
pub mod auth;
pub mod broker;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod decode;
pub mod deployment;
pub mod dynsec;
pub mod exec;
pub mod frame_check;
pub mod homeassistant;
pub mod http;
pub mod ingest;
pub mod live;
pub mod liveness;
pub mod mirror;
pub mod mqtt;
pub mod nats_auth;
pub mod net;
pub mod rollout;
pub mod rotation;
pub mod services;
pub mod spec;
pub mod state;
pub mod store;
pub mod subscriber;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

pub use config::Config;

use crate::crypto::random_hex;
use crate::net::advertised;
use crate::state::{Locks, RateLimiter, Shared, WorkerEntry};
use crate::store::Store;

/// What a started conductor reports through the `ready` channel.
#[derive(Clone, PartialEq, Eq)]
pub struct Started {
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// MQTT broker address (embedded: bound; external: resolved).
    pub mqtt_addr: SocketAddr,
    /// Embedded broker's MQTT-over-TLS address (`None`: no TLS listener).
    pub mqtts_addr: Option<SocketAddr>,
    /// SHA-256 of the CA certificate the TLS chain ends in (`None`: no TLS).
    pub ca_fingerprint: Option<protocol::Fingerprint>,
    /// In-memory enrolment token for a local in-process worker; never stored.
    pub local_enroll_token: String,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("http_addr", &self.http_addr)
            .field("mqtt_addr", &self.mqtt_addr)
            .field("mqtts_addr", &self.mqtts_addr)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

/// Top-level errors.
#[derive(Debug, thiserror::Error)]
pub enum ConductorError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Database failure.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Secrets bootstrap failure.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// Embedded broker failure.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// TLS material could not be made or loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Mosquitto's dynamic-security plugin could not be set up.
    #[error("Mosquitto dynamic security: {0}")]
    DynSec(#[from] dynsec::DynSecError),
    /// NATS operator mode's keys.
    #[error("NATS operator mode: {0}")]
    NatsAuth(#[from] nats_auth::NatsAuthError),
    /// HTTP server failure.
    #[error("http: {0}")]
    Http(String),
    /// Other I/O.
    #[error("{what}: {source}")]
    Io {
        /// Context.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An external broker host did not resolve.
    #[error("cannot resolve MQTT broker {0}")]
    Resolve(String),
    /// This conductor lost its lease on the shared store and stopped, so
    /// that the standby taking over is the only active one.
    #[error("lost the store lease, stopping (a standby takes over): {0}")]
    LeaseLost(store::StoreError),
    /// Cut off from every broker node for `--bus-stepdown`: this conductor
    /// released its lease and stopped so one that reaches the bus leads.
    #[error(
        "cut off from the MQTT bus for {0:?}: released the store lease (a standby takes over)"
    )]
    CutOff(Duration),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConductorError {
    let what = what.into();
    move |source| ConductorError::Io { what, source }
}

/// Path of the runtime file.
pub fn runtime_path(data_dir: &Path) -> PathBuf {
    data_dir.join("runtime.json")
}

fn write_runtime(data_dir: &Path, started: &Started) -> Result<(), ConductorError> {
    let body = serde_json::json!({
        "http_addr": started.http_addr.to_string(),
        "mqtt_addr": started.mqtt_addr.to_string(),
        "mqtts_addr": started.mqtts_addr.map(|a| a.to_string()),
        "ca_fingerprint": started.ca_fingerprint.map(|f| f.to_string()),
        "pid": std::process::id(),
    });
    let tmp = data_dir.join("runtime.json.tmp");
    std::fs::write(&tmp, body.to_string()).map_err(io_err("write runtime.json"))?;
    std::fs::rename(&tmp, runtime_path(data_dir)).map_err(io_err("rename runtime.json"))
}

/// Renews or reloads the certificate every [`tls::REFRESH_EVERY`] until
/// `stop` (off the runtime thread: it may write files).
async fn refresh_tls(tls: Option<tls::Tls>, mut stop: watch::Receiver<bool>) {
    let Some(tls) = tls else { return };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(tls::REFRESH_EVERY) => {}
        }
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.refresh()).await {
            Ok(Ok(Some(what))) => info!("TLS: {what}"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!("TLS certificate refresh failed (the current one stays): {e}"),
            Err(e) => warn!("TLS certificate refresh failed: {e}"),
        }
    }
}

/// The TLS settings `config` asks for: the operator's pair or the fleet
/// CA, and the names the certificate must carry.
pub fn tls_settings(config: &Config) -> tls::TlsSettings {
    let ip = |a: &str| a.parse::<SocketAddr>().ok().map(|a| a.ip());
    tls::TlsSettings {
        cert: config.tls_cert.as_ref().map(PathBuf::from),
        key: config.tls_key.as_ref().map(PathBuf::from),
        extra_names: config.tls_san.clone(),
        listen: [ip(&config.http_listen), ip(&config.mqtts_listen)]
            .into_iter()
            .flatten()
            .collect(),
    }
}

/// The registration token to show a person: the secret plus, under TLS,
/// the CA fingerprint a worker pins ([`protocol::registration`]). Loads
/// (or on a first run creates) the TLS material.
pub fn registration_token_text(config: &Config, secret: &str) -> Result<String, ConductorError> {
    let ca_fingerprint = if config.tls {
        Some(
            tls::Tls::load_or_create(Path::new(&config.data_dir), tls_settings(config))?
                .ca_fingerprint(),
        )
    } else {
        None
    };
    Ok(protocol::RegistrationToken {
        secret: secret.to_string(),
        ca_fingerprint,
    }
    .to_text())
}

/// Holds the store lease until `shutdown` resolves. A lost lease (its
/// session gone: the server restarted, or cannot be reached) suspends the
/// writer's batches and is taken again; when another conductor holds it by
/// then, this one stops with [`ConductorError::LeaseLost`].
///
/// With `bus` (an external broker: the subscriber's connected-and-subscribed
/// state and `--bus-stepdown`), a conductor cut off from every broker node
/// that long releases the lease and stops with [`ConductorError::CutOff`],
/// so a standby that reaches the bus takes over (one that does not, waits:
/// `Lease::wait`).
async fn hold_lease(
    mut held: store::lease::Lease,
    (url, api_url): (&str, &str),
    fence: &store::lease::Fence,
    mut bus: Option<(watch::Receiver<bool>, Duration)>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), ConductorError> {
    use store::lease::Lease;
    loop {
        let cut_off = async {
            match bus.as_mut() {
                Some((up, after)) => cut_off_for(up, *after).await,
                None => std::future::pending().await,
            }
        };
        let lost = tokio::select! {
            () = shutdown.as_mut() => {
                info!("shutting down");
                return Ok(());
            }
            e = held.lost() => e,
            after = cut_off => {
                tracing::error!(
                    "cut off from every MQTT broker node for {after:?}: releasing the store \
                     lease and stopping, for a conductor that reaches the bus"
                );
                return Err(ConductorError::CutOff(after));
            }
        };
        fence.suspend();
        warn!("store lease lost ({lost}): writes held, taking it again");
        loop {
            match Lease::try_take_async(url, api_url).await {
                Ok(Some(l)) => {
                    fence.hold(l.epoch());
                    info!(epoch = l.epoch(), "store lease taken again");
                    held = l;
                    break;
                }
                Ok(None) => {
                    tracing::error!(
                        "another conductor holds the store lease now: stopping ({lost})"
                    );
                    return Err(ConductorError::LeaseLost(lost));
                }
                Err(e) => {
                    tracing::debug!("lease not taken yet: {e}");
                    tokio::select! {
                        () = shutdown.as_mut() => return Ok(()),
                        () = tokio::time::sleep(store::lease::WAIT_POLL) => {}
                    }
                }
            }
        }
    }
}

/// Resolves once `up` has been false for `after` without a break; never
/// when its sender is gone.
async fn cut_off_for(up: &mut watch::Receiver<bool>, after: Duration) -> Duration {
    loop {
        if up.wait_for(|u| !*u).await.is_err() {
            return std::future::pending().await;
        }
        tokio::select! {
            () = tokio::time::sleep(after) => return after,
            r = up.wait_for(|u| *u) => {
                if r.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Runs the conductor until `shutdown` resolves. `ready` receives the bound
/// addresses once the broker accepts connections, the conductor's MQTT
/// subscription is in place (or 5 s passed trying) and HTTP is listening.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    ready: oneshot::Sender<Started>,
) -> Result<(), ConductorError> {
    config.validate()?;
    tokio::pin!(shutdown);
    let data_dir = PathBuf::from(&config.data_dir);
    let store_at = crate::store::StoreLocation::of(&config).map_err(|message| {
        config::ConfigError::Invalid {
            name: "store".into(),
            message,
        }
    })?;
    // Opened (and migrated) first: the lease's epoch lives in the store.
    let mut store = Store::open_at(&store_at)?;
    // On a shared PostgreSQL store one conductor is active at a time: wait
    // for the lease before anything else. Meanwhile a standby forwards its
    // HTTP port's requests to the active one (`http::forward`), and closes
    // that listener before it starts as the active one.
    // With an external broker, the lease is taken only while some broker
    // node accepts connections from here: a conductor cut off from the bus
    // stands by (and the active one steps down: `hold_lease`).
    let bus_nodes: Vec<String> = match &config.mqtt_url {
        Some(u) => config::BrokerUrl::parse_list(u)?
            .iter()
            .map(|n| format!("{}:{}", n.host, n.port))
            .collect(),
        None => Vec::new(),
    };
    let bus_reachable = || bus_nodes.is_empty() || bus_nodes.iter().any(|n| net::accepts(n));
    let bus_stepdown = Duration::from_millis(config.bus_stepdown_ms());
    let lease = match &store_at {
        store::StoreLocation::Postgres(url) => {
            let active = store::lease::ActiveUrl::default();
            let standby = http::forward::Standby::start(&config, active.clone())
                .map_err(io_err("start the standby's forwarding thread"))?;
            let waited = store::lease::Lease::wait(
                url,
                &config.advertise_url(),
                &active,
                bus_reachable,
                shutdown.as_mut(),
            )
            .await;
            tokio::task::spawn_blocking(move || standby.stop())
                .await
                .map_err(|e| ConductorError::Io {
                    what: "stop the standby's forwarding".into(),
                    source: std::io::Error::other(e),
                })?;
            match waited? {
                Some(l) => Some(l),
                None => return Ok(()),
            }
        }
        store::StoreLocation::Sqlite(_) => None,
    };
    info!(engine = store.engine(), at = %store_at.shown(), "store open");
    // Every write is fenced with the lease's epoch (store::lease): the
    // writer's batches, and this connection's (the API's, reconcile's),
    // so a conductor that lost the lease cannot write behind its
    // successor's back.
    let fence = store::lease::Fence::default();
    if let Some(l) = &lease {
        fence.hold(l.epoch());
        store.fence_writes(fence.clone());
    }
    let _ = std::fs::remove_file(runtime_path(&data_dir));
    let boot = auth::bootstrap(&mut store, config.admin_password.as_deref())?;
    let tls = if config.tls {
        let t = tls::Tls::load_or_create(&data_dir, tls_settings(&config))?;
        let c = t.current();
        info!(
            ca_fingerprint = %c.ca_fingerprint,
            names = ?c.names,
            "TLS: HTTPS on the HTTP port, MQTT over TLS on {}",
            if config.mqtt_url.is_none() { config.mqtts_listen.as_str() } else { "the external broker" }
        );
        Some(t)
    } else {
        warn!("TLS off (--no-tls): HTTP and MQTT are plain; put a TLS proxy on this host in front");
        None
    };
    if config.insecure_plain {
        warn!(
            "--insecure-plain: plain HTTP and MQTT are accepted from every address; passwords, \
             tokens and frames cross the network in clear text"
        );
    } else {
        info!("plain HTTP and MQTT are accepted from loopback only (--insecure-plain to allow other hosts)");
    }
    if let Some(t) = &boot.registration_token {
        let text = protocol::RegistrationToken {
            secret: t.clone(),
            ca_fingerprint: tls.as_ref().map(tls::Tls::ca_fingerprint),
        }
        .to_text();
        println!("aerekos registration token (shown once, store it now): {text}");
    }
    if let Some(p) = &boot.admin_password {
        println!("aerekos admin password for user 'admin' (shown once): {p}");
    }

    // Workers: everyone starts offline until a good frame arrives.
    store.set_all_status("offline")?;
    let mut workers = HashMap::new();
    let creds = broker::Credentials::default();
    // Worker logins are allowed only once the conductor's own subscription
    // is in place (below): on the embedded broker a frame published before
    // it would be PubAcked and routed to nobody, and the worker, told later
    // that newer seqs are `Stored`, would drop it for good.
    let mut worker_logins = Vec::new();
    for row in store.workers()? {
        match WorkerEntry::from_row(&row, config.default_interval_ms) {
            Some(w) => {
                if !w.revoked {
                    worker_logins.push((w.id.clone(), row.mqtt_password_sha256.clone()));
                }
                workers.insert(w.id.clone(), w);
            }
            None => warn!(worker_id = %row.id, "skipping worker with an unreadable secret"),
        }
    }
    for r in store.secret_rotations()? {
        let Some(w) = workers.get_mut(&r.worker_id) else {
            continue;
        };
        w.pending_secret = r
            .pending_hex
            .as_deref()
            .and_then(|h| protocol::Secret::from_hex(h).ok());
        w.previous_secret = r
            .previous_hex
            .as_deref()
            .and_then(|h| protocol::Secret::from_hex(h).ok())
            .map(|s| (s, r.previous_until_ms));
    }
    // Each worker's latest metrics, as before the restart (or takeover):
    // the API, the dashboard and /metrics show them until its next frame
    // (a batching worker's may be minutes away).
    let since = state::now_ms().saturating_sub(config.raw_retention_ms());
    for l in store.latest_metrics(since)? {
        let (Some(w), Ok(metrics)) = (
            workers.get_mut(&l.worker_id),
            postcard::from_bytes(&l.frame),
        ) else {
            continue;
        };
        w.latest = Some(state::Latest {
            received_at_ms: l.received_at_ms,
            seq: l.seq,
            metrics,
        });
    }
    info!(workers = workers.len(), "store loaded");
    // A rollout in progress resumes: its current wave starts its clock again
    // (the time the conductor was down counts neither for nor against it).
    let resumed = store.restart_rollout_clocks(state::now_ms())?
        + store.restart_agent_rollout_clock(state::now_ms())?;
    if resumed > 0 {
        info!(rollouts = resumed, "resuming rollouts in progress");
    }
    artifacts::clean_temp(&data_dir);
    // What workers said that the rollouts read (`store::notes`).
    let notes = store.worker_notes()?;
    let notes_since_ms = store.notes_since_ms(state::now_ms())?;
    let mut service_status: HashMap<String, std::collections::BTreeMap<String, _>> = HashMap::new();
    for row in store.service_statuses()? {
        service_status
            .entry(row.worker_id.clone())
            .or_default()
            .insert(row.name.clone(), row);
    }
    let conductor_pw = store
        .setting(auth::CONDUCTOR_MQTT_PASSWORD)?
        .unwrap_or_default();
    let observer_pw = store
        .setting(auth::OBSERVER_MQTT_PASSWORD)?
        .unwrap_or_default();

    // Broker.
    let refusals = Arc::new(net::PlainRefusals::default());
    let denied = broker::DeniedCounters::default();
    let mut mqtts_addr = None;
    let mut mqtt_ca_pem = None;
    let mut external_tls = false;
    let (mut mqtt_settings, mqtt_addr, embedded) = match &config.mqtt_url {
        None => {
            let listen: SocketAddr =
                config
                    .mqtt_listen
                    .parse()
                    .map_err(|e| config::ConfigError::Invalid {
                        name: "mqtt_listen".into(),
                        message: format!("{e}"),
                    })?;
            let listen = broker::pick_port(listen)?;
            let tls_listener =
                match &tls {
                    Some(t) => {
                        let at: SocketAddr = config.mqtts_listen.parse().map_err(|e| {
                            config::ConfigError::Invalid {
                                name: "mqtts_listen".into(),
                                message: format!("{e}"),
                            }
                        })?;
                        let at = broker::pick_port(at)?;
                        mqtts_addr = Some(at);
                        Some((at, t.server_config(&[])?))
                    }
                    None => None,
                };
            creds.set_service_logins(&conductor_pw, &observer_pw);
            broker::start(
                broker::Listeners {
                    plain: listen,
                    tls: tls_listener,
                    insecure_plain: config.insecure_plain,
                    refusals: refusals.clone(),
                    denied: denied.clone(),
                },
                creds.clone(),
                &conductor_pw,
            )?;
            let addr = advertised(listen);
            info!(%listen, mqtts = ?mqtts_addr, "embedded MQTT broker listening");
            (
                mqtt::MqttSettings {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    more: Vec::new(),
                    username: Some(broker::CONDUCTOR_USER.into()),
                    password: Some(conductor_pw),
                    client_id: mqtt::CLIENT_ID.into(),
                    tls: None,
                },
                listen,
                true,
            )
        }
        Some(url) => {
            let nodes = config::BrokerUrl::parse_list(url)?;
            let unbracket = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_string();
            let u = nodes[0].clone();
            let host = unbracket(&u.host);
            let addr = (host.as_str(), u.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ConductorError::Resolve(format!("{}:{}", u.host, u.port)))?;
            info!(broker = ?nodes, "using external MQTT broker");
            let client_tls = if u.tls {
                external_tls = true;
                let pem = match &config.mqtt_ca {
                    Some(path) => Some(
                        std::fs::read_to_string(path)
                            .map_err(io_err(format!("read --mqtt-ca {path}")))?,
                    ),
                    None => None,
                };
                let c =
                    mqtt::tls_client_config(pem.as_deref()).map_err(|e| ConductorError::Io {
                        what: "--mqtt-ca".into(),
                        source: std::io::Error::other(e),
                    })?;
                mqtt_ca_pem = pem;
                Some(c)
            } else {
                None
            };
            (
                mqtt::MqttSettings {
                    host,
                    port: u.port,
                    more: nodes[1..]
                        .iter()
                        .map(|n| (unbracket(&n.host), n.port))
                        .collect(),
                    username: u.username.clone(),
                    password: u.password.clone(),
                    client_id: mqtt::CLIENT_ID.into(),
                    tls: client_tls,
                },
                addr,
                false,
            )
        }
    };

    // NATS in operator mode: the conductor's login and client id are made
    // with the fleet account's key, and so is every worker's login.
    let nats_account = match &config.nats_account_seed {
        Some(path) => {
            let account = nats_auth::FleetAccount::load(Path::new(path))?;
            mqtt_settings.username = Some("aerekos-conductor".into());
            mqtt_settings.password = Some(account.conductor_jwt()?);
            mqtt_settings.client_id = account.client_id(mqtt::CLIENT_ID);
            info!(account = %account.public(), "NATS operator mode: a login per worker");
            Some(Arc::new(account))
        }
        None => None,
    };

    // Mosquitto's dynamic-security plugin, before the conductor's own
    // session: its first run adds the conductor's role to the login, which
    // closes that login's sessions.
    let dynsec = if config.mqtt_dynsec {
        let mut d = dynsec::DynSec::connect(&mqtt_settings).await?;
        if config.homeassistant_discovery {
            d.set_extra_trees(vec![format!("{}/#", config.homeassistant_prefix)]);
        }
        let changed = d.ensure_roles(Some(&observer_pw)).await?;
        if !changed.is_empty() {
            info!(?changed, "Mosquitto dynamic security: roles set up");
        }
        Some(d)
    } else {
        None
    };
    let (write_tx, write_rx) = mpsc::channel();
    let stored_marks = state::StoredMarks::default();
    let mut writer_store = Store::open_at(&store_at)?;
    if lease.is_some() {
        writer_store.set_fence(fence.clone());
    }
    let store_engine = writer_store.engine();
    let lease_fence = lease.is_some().then(|| fence.clone());
    // With an external broker the conductor PubAcks a frame only once it
    // is committed (the broker keeps it for a successor until then); the
    // embedded broker dies with the conductor, and its workers re-send
    // what has no `Stored` when they reconnect.
    let (received_tx, received_rx) = watch::channel(0u64);
    let writer = ingest::Writer::spawn(
        writer_store,
        write_rx,
        stored_marks.clone(),
        received_tx,
        (config.raw_retention_ms(), config.minute_retention_ms()),
    )
    .map_err(io_err("start writer thread"))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (dynsec_handle, dynsec_task) = match dynsec {
        Some(d) => {
            let (h, task) = d.serve(stop_rx.clone());
            (Some(h), Some(task))
        }
        None => (None, None),
    };
    // The external broker's nodes as workers reach them: the same list, no login.
    let external_mqtt = match (&config.mqtt_url, embedded) {
        (Some(url), false) => {
            let scheme = if external_tls { "mqtts" } else { "mqtt" };
            config::BrokerUrl::parse_list(url)?
                .iter()
                .map(|n| format!("{scheme}://{}:{}", n.host, n.port))
                .collect::<Vec<_>>()
                .join(",")
        }
        _ => String::new(),
    };
    let local_token = format!("ael_{}", random_hex::<32>().map_err(auth::AuthError::from)?);
    let shared = Arc::new(Shared {
        enroll_limiter: RateLimiter::new(config.rate_limit_burst, config.rate_limit_refill_s),
        login_limiter: RateLimiter::new(config.rate_limit_burst, config.rate_limit_refill_s),
        external_mqtt,
        mqtt_port: if embedded {
            mqtt_addr.port()
        } else {
            mqtt_settings.port
        },
        config,
        locks: Locks::new(store, workers, service_status, stored_marks),
        creds: creds.clone(),
        counters: Default::default(),
        writer: write_tx,
        local_token: local_token.clone(),
        embedded_broker: embedded,
        store_engine,
        lease: lease_fence,
        observer_password: match &nats_account {
            Some(a) => Some(a.observer_jwt()?),
            None => (embedded || dynsec_handle.is_some()).then_some(observer_pw),
        },
        nats_account,
        tls: tls.clone(),
        mqtts_port: mqtts_addr.map(|a| a.port()),
        mqtt_ca_pem,
        external_tls,
        plain_refused: refusals,
        mqtt_denied: denied,
        dynsec: dynsec_handle,
        started: Instant::now(),
        notes_since_ms,
        reconcile: tokio::sync::Notify::new(),
    });
    agent_rollout::restore_notes(&shared, notes);

    let (client, eventloop, nodes) = mqtt::client(&mqtt_settings, !embedded);
    let (sub_tx, mut sub_rx) = watch::channel(false);
    let bus_rx = sub_rx.clone();
    let mqtt_task = subscriber::run_loop(
        shared.clone(),
        client.clone(),
        eventloop,
        nodes,
        (!embedded).then_some(received_rx),
        sub_tx,
        stop_rx.clone(),
    );
    let live_task = liveness::run(shared.clone(), stop_rx.clone());
    let reconcile_task = services::run(shared.clone(), client.clone(), stop_rx.clone());
    let alert_sender =
        alerts::webhook::Sender::spawn(&store_at, lease.is_some().then(|| fence.clone()))
            .map_err(io_err("start alert sender"))?;
    let alert_task = alerts::run(shared.clone(), alert_sender.waker(), stop_rx.clone());
    let ack_task = ingest::run_acks(shared.clone(), client.clone(), stop_rx.clone());
    let tls_task = refresh_tls(tls.clone(), stop_rx.clone());
    let ha_task = homeassistant::run(shared.clone(), client.clone(), stop_rx.clone());
    let dynsec_task = async {
        if let Some(t) = dynsec_task {
            t.await;
        }
    };

    let http_holder: Mutex<Option<http::HttpServer>> = Mutex::new(None);
    let control = async {
        // `wait_for` yields a read guard on the watch: drop it at once, or the
        // MQTT loop's next `send` (after a reconnect) blocks the runtime forever.
        let subscribed = tokio::time::timeout(Duration::from_secs(5), sub_rx.wait_for(|s| *s))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if !subscribed {
            warn!("MQTT subscription not confirmed within 5 s; starting anyway");
        }
        for (id, hash) in &worker_logins {
            creds.set_worker(id, hash);
        }
        let result = async {
            let server = http::HttpServer::start(shared.clone(), client.clone())?;
            let http_addr = server.addr();
            *http_holder.lock().unwrap_or_else(PoisonError::into_inner) = Some(server);
            let api_url = shared.config.advertise_url_at(http_addr.port());
            if let (Some(l), true) = (&lease, shared.config.advertise_port_unknown()) {
                // Taken with port 0 in the URL: the standbys forward to the bound one.
                l.record_url(&api_url)?;
            }
            let started = Started {
                http_addr,
                mqtt_addr: advertised(mqtt_addr),
                mqtts_addr: mqtts_addr.map(advertised),
                ca_fingerprint: tls.as_ref().map(tls::Tls::ca_fingerprint),
                local_enroll_token: local_token.clone(),
            };
            write_runtime(&data_dir, &started)?;
            info!(%http_addr, mqtt_addr = %advertised(mqtt_addr), mqtts_addr = ?started.mqtts_addr, "conductor ready");
            let _ = ready.send(started);
            Ok::<String, ConductorError>(api_url)
        }
        .await;
        let result = match (result, lease, &store_at) {
            (Ok(api_url), Some(held), store::StoreLocation::Postgres(url)) => {
                let bus = (!bus_nodes.is_empty()).then(|| (bus_rx.clone(), bus_stepdown));
                hold_lease(held, (url, &api_url), &fence, bus, shutdown.as_mut()).await
            }
            (Ok(_), _, _) => {
                shutdown.as_mut().await;
                info!("shutting down");
                Ok(())
            }
            (Err(e), _, _) => Err(e),
        };
        if result.is_err() {
            // Held batches are dropped, not retried: this conductor stops.
            fence.stop();
        }
        let _ = stop_tx.send(true);
        result
    };
    let ((), (), (), (), (), (), (), (), result) = tokio::join!(
        mqtt_task,
        live_task,
        reconcile_task,
        alert_task,
        ack_task,
        tls_task,
        dynsec_task,
        ha_task,
        control
    );

    if let Some(server) = http_holder
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        server.stop();
    }
    creds.close();
    alert_sender.stop();
    drop(client);
    drop(shared);
    writer.join();
    if result.is_ok() {
        let _ = std::fs::remove_file(runtime_path(&data_dir));
    }
    result
}
