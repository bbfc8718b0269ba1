//! The aerekos conductor: an embedded MQTT broker (or an external one), a
//! SQLite store and an HTTP API for a fleet of edge-workers.
//!
//! [`run`] starts everything and runs until the `shutdown` future resolves.
//! Threads: the current-thread tokio runtime that calls [`run`] drives the
//! MQTT client, the liveness ticker, service reconciliation ([`services`])
//! and the `Stored` acknowledgements ([`ingest::run_acks`]); rumqttd runs on its own thread (and
//! cannot be stopped, see [`broker`]); the ingest writer owns a SQLite
//! connection on its own thread; tiny_http requests are served by
//! [`http::HTTP_THREADS`] threads.
//!
//! On start the conductor writes `<data_dir>/runtime.json` (`http_addr`,
//! `mqtt_addr`, `pid`) atomically once it is ready, and removes it on a
//! clean shutdown.

pub mod artifacts;
pub mod auth;
pub mod broker;
pub mod config;
pub mod decode;
pub mod http;
pub mod ingest;
pub mod liveness;
pub mod mqtt;
pub mod rollout;
pub mod services;
pub mod spec;
pub mod state;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

pub use config::Config;

use crate::state::{advertised, lock, random_hex, RateLimiter, Shared, WorkerEntry};
use crate::store::Store;

/// What a started conductor reports through the `ready` channel.
#[derive(Clone, PartialEq, Eq)]
pub struct Started {
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// MQTT broker address (embedded: bound; external: resolved).
    pub mqtt_addr: SocketAddr,
    /// In-memory enrolment token for a local in-process worker; never stored.
    pub local_enroll_token: String,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("http_addr", &self.http_addr)
            .field("mqtt_addr", &self.mqtt_addr)
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
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConductorError {
    let what = what.into();
    move |source| ConductorError::Io { what, source }
}

/// Path of the runtime file.
pub fn runtime_path(data_dir: &Path) -> PathBuf {
    data_dir.join("runtime.json")
}

fn write_runtime(
    data_dir: &Path,
    http: SocketAddr,
    mqtt: SocketAddr,
) -> Result<(), ConductorError> {
    let body = serde_json::json!({
        "http_addr": http.to_string(),
        "mqtt_addr": mqtt.to_string(),
        "pid": std::process::id(),
    });
    let tmp = data_dir.join("runtime.json.tmp");
    std::fs::write(&tmp, body.to_string()).map_err(io_err("write runtime.json"))?;
    std::fs::rename(&tmp, runtime_path(data_dir)).map_err(io_err("rename runtime.json"))
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
    let data_dir = PathBuf::from(&config.data_dir);
    let mut store = Store::open(&data_dir)?;
    let _ = std::fs::remove_file(runtime_path(&data_dir));
    let boot = auth::bootstrap(&mut store, config.admin_password.as_deref())?;
    if let Some(t) = &boot.registration_token {
        println!("aerekos registration token (shown once, store it now): {t}");
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
    info!(workers = workers.len(), "store loaded");
    // A rollout in progress resumes: its current wave starts its clock again
    // (the time the conductor was down counts neither for nor against it).
    let resumed = store.restart_rollout_clocks(state::now_ms())?;
    if resumed > 0 {
        info!(rollouts = resumed, "resuming rollouts in progress");
    }
    artifacts::clean_temp(&data_dir);
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
    let (mqtt_settings, mqtt_addr, embedded) = match &config.mqtt_url {
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
            creds.set_service_logins(&conductor_pw, &observer_pw);
            broker::start(listen, creds.clone(), &conductor_pw)?;
            let addr = advertised(listen);
            info!(%listen, "embedded MQTT broker listening");
            (
                mqtt::MqttSettings {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    username: Some(broker::CONDUCTOR_USER.into()),
                    password: Some(conductor_pw),
                },
                listen,
                true,
            )
        }
        Some(url) => {
            let u = config::BrokerUrl::parse(url)?;
            let host = u
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let addr = (host.as_str(), u.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ConductorError::Resolve(format!("{}:{}", u.host, u.port)))?;
            info!(broker = ?u, "using external MQTT broker");
            (
                mqtt::MqttSettings {
                    host,
                    port: u.port,
                    username: u.username.clone(),
                    password: u.password.clone(),
                },
                addr,
                false,
            )
        }
    };

    let (write_tx, write_rx) = mpsc::channel();
    let stored_marks = state::StoredMarks::default();
    let writer = ingest::Writer::spawn(
        Store::open(&data_dir)?,
        write_rx,
        stored_marks.clone(),
        config.raw_retention_ms(),
        config.minute_retention_ms(),
    )
    .map_err(io_err("start writer thread"))?;

    let local_token = format!("ael_{}", random_hex::<32>().map_err(auth::AuthError::from)?);
    let shared = Arc::new(Shared {
        enroll_limiter: RateLimiter::new(config.rate_limit_burst, config.rate_limit_refill_s),
        login_limiter: RateLimiter::new(config.rate_limit_burst, config.rate_limit_refill_s),
        mqtt_host: if embedded {
            String::new()
        } else {
            mqtt_settings.host.clone()
        },
        mqtt_port: if embedded {
            mqtt_addr.port()
        } else {
            mqtt_settings.port
        },
        config,
        db: Mutex::new(store),
        workers: Mutex::new(workers),
        creds: creds.clone(),
        counters: Default::default(),
        writer: write_tx,
        pending: Mutex::new(HashMap::new()),
        local_token: local_token.clone(),
        embedded_broker: embedded,
        observer_password: embedded.then_some(observer_pw),
        started: Instant::now(),
        reject_log: Mutex::new(HashMap::new()),
        service_status: Mutex::new(service_status),
        reconcile: tokio::sync::Notify::new(),
        reconcile_sent: Mutex::new(HashMap::new()),
        manifests: Mutex::new(HashMap::new()),
        service_failures: Mutex::new(HashMap::new()),
        deploy_cmds: Mutex::new(HashMap::new()),
        log_streams: Mutex::new(HashMap::new()),
        service_metrics: Mutex::new(HashMap::new()),
        stored_marks,
    });

    let (client, eventloop) = mqtt::client(&mqtt_settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sub_tx, mut sub_rx) = watch::channel(false);
    let mqtt_task = mqtt::run_loop(
        shared.clone(),
        client.clone(),
        eventloop,
        sub_tx,
        stop_rx.clone(),
    );
    let live_task = liveness::run(shared.clone(), stop_rx.clone());
    let reconcile_task = services::run(shared.clone(), client.clone(), stop_rx.clone());
    let ack_task = ingest::run_acks(shared.clone(), client.clone(), stop_rx.clone());

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
            *lock(&http_holder) = Some(server);
            write_runtime(&data_dir, http_addr, advertised(mqtt_addr))?;
            info!(%http_addr, mqtt_addr = %advertised(mqtt_addr), "conductor ready");
            let _ = ready.send(Started {
                http_addr,
                mqtt_addr: advertised(mqtt_addr),
                local_enroll_token: local_token.clone(),
            });
            Ok::<(), ConductorError>(())
        }
        .await;
        if result.is_ok() {
            shutdown.await;
            info!("shutting down");
        }
        let _ = stop_tx.send(true);
        result
    };
    let ((), (), (), (), result) =
        tokio::join!(mqtt_task, live_task, reconcile_task, ack_task, control);

    if let Some(server) = lock(&http_holder).take() {
        server.stop();
    }
    creds.close();
    drop(client);
    drop(shared);
    writer.join();
    if result.is_ok() {
        let _ = std::fs::remove_file(runtime_path(&data_dir));
    }
    result
}
