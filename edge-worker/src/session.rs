//! The MQTT session: connect with backoff, publish the outbox in seq order,
//! handle acks and commands, sample metrics, drive the service
//! [`Supervisor`] and report its status changes, shut down cleanly (hosted
//! services are left running, to be adopted at the next start).
//!
//! Everything runs on one task. The rumqttc `EventLoop` is moved into a
//! boxed future that is polled to completion and rebuilt after every event,
//! so its `poll()` is never cancelled half-way (a connect attempt slower
//! than the metrics tick would otherwise restart forever), and a connection
//! error is handled before any further publish is handed to the client.
//!
//! Delivery: frames leave the [`Outbox`] front in seq order, QoS 1, at most
//! [`WINDOW`] in flight. rumqttc reports `Outgoing::Publish(pkid)` in the
//! order publishes were handed to it, which maps each pkid to a seq; the
//! PubAck for a pkid marks its frame broker-acked, and the frame is removed
//! only when the conductor's `Stored(n)` (a sealed command on the
//! acknowledgement topic `cmd/stored`, outside the command seq stream,
//! never answered) covers its seq —
//! or, with a conductor that sends no `Stored` for [`STORED_TIMEOUT`] after
//! a PubAck, at the PubAck again, as before `Stored` existed, until one
//! arrives. The session is clean, and rumqttc drops its own un-acked
//! publishes on a reconnect without a session, so after every ConnAck
//! everything queued is published again from the front (at-least-once; the
//! conductor's replay window drops what it already has, counted as
//! `duplicate`).
//!
//! Wire format: frames are sealed in format 1 until the first `Stored`
//! arrives (only conductors that accept format 2 send it), in format 2 (no
//! worker id on the wire) while `Stored` keeps coming, and in format 1 again
//! after the [`STORED_TIMEOUT`] fallback (an older conductor).
//!
//! Commands are applied at most once (the replay window is persisted
//! before a command is applied). `DeployManifest` and `InstallManifest` (the
//! same downloads, then installed with desired state "stopped", never
//! started) are answered when their downloads are done: the manifest and
//! any artifact are fetched on blocking threads ([`crate::fetch`]), never on
//! the runtime thread; a later Deploy, DeployManifest, InstallManifest, Stop
//! or Remove of the same service supersedes a pending one (answered with an
//! error, nothing deployed). A worker that stops while
//! a download runs never answers it (the conductor sends the deploy again).
//!
//! Hosted services talk back through the same outbox: what they publish on
//! the local API ([`crate::local_api`]) becomes `ServiceEvent` and
//! `ServiceMetrics` frames, and a `Logs` command is answered by a task that
//! sends `LogChunk` frames ([`crate::logs`] for processes, the engine's log
//! for containers, see `container_logs.rs`). The local API's registry
//! follows every service status (state for `GET /v1/health`, forgotten
//! once removed).
//!
//! Limits: [`WINDOW`] frames in flight; keep-alive `max(5 s, 2 × interval)`
//! capped at 30 s, or 1.25 × the batch period with `--batch`
//! ([`keep_alive`]; pings only on a link that has not carried packets both
//! ways for that long); reconnect backoff 0.5 s doubling to 30 s with jitter,
//! reset after [`STABLE_AFTER`] connected; a refused login is logged once
//! and retried at the cap. Metrics sampling runs on a blocking thread and
//! is skipped for a tick if the previous sample is still running.
//!
//! Layout: this file is the connection, commands, sampling and shutdown;
//! `publish.rs` the publish pipeline (`Publisher`: sealing, outbox, window,
//! acks, wire format); `deploy.rs` the downloads of deploy commands
//! (`Deployments`); `container_logs.rs` the `Logs` answers of containers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use heapless::Vec as HVec;
use protocol::frame::{bounded, Disk, MAX_DISKS};
use protocol::{
    Action, Board, Body, BodyKind, Event as WorkerEvent, EventKind, Metrics, ReplayWindow, Reply,
    ReplyStatus, Secret, SeqVerdict, TopicKind, MAX_FRAME_LEN,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::collect::{Collector, Inventory};
use crate::conductor_urls::ConductorUrls;
use crate::fetch::Conductor;
use crate::local_api::{self, LocalPublish, Registry};
use crate::logs::{self, LogStreams};
use crate::outbox::Outbox;
use crate::state::StateStore;
use crate::supervisor::{Supervisor, SupervisorError};
use crate::WorkerError;

mod batching;
mod container_logs;
mod deploy;
mod login;
mod publish;

use batching::Batcher;
use deploy::{DeployJob, Deployments};
use publish::Publisher;

/// Most frames published and not yet acknowledged.
pub const WINDOW: usize = 10;
/// A connection that lasted this long resets the reconnect backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Smallest metrics interval accepted (flag or `SetInterval` command).
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// How long a clean shutdown waits for queued frames to be acknowledged.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
/// A frame PubAcked by the broker and not covered by a conductor `Stored`
/// this long after is dropped, as the PubAck alone used to do: a conductor
/// older than `Stored` (or one that cannot commit) must not make the outbox
/// grow. 5 × the conductor's 2 s acknowledgement interval, and below the
/// default 30 s persistence interval, so even then the outbox is not
/// written to the SD card while the link is healthy.
pub const STORED_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_BASE: Duration = Duration::from_millis(500);
const RECONNECT_CAP: Duration = Duration::from_secs(30);

/// A broker URL: `mqtt://host:port`, `tcp://host:port` or `host:port`
/// (port 1883), or `mqtts://host:port` / `ssl://…` (MQTT over TLS, port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    /// Host name or address (`[v6]` in brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT over TLS.
    pub tls: bool,
}

impl MqttUrl {
    /// Parses a broker URL; `None` for other schemes, user info or paths.
    pub fn parse(url: &str) -> Option<MqttUrl> {
        let (tls, rest) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some(("mqtts" | "ssl", rest)) => (true, rest),
            Some(_) => return None,
            None => (false, url),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return None;
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (format!("[{h}]"), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return None;
        }
        Some(MqttUrl { host, port, tls })
    }

    /// Parses a comma-separated list of broker URLs: the nodes of one
    /// broker cluster (say NATS's MQTT gateways), tried in turn. An element
    /// without a scheme takes the first element's (`mqtts://a:8883,b:8883`).
    /// `None` if any element is unusable, or for more than
    /// [`MAX_BROKERS`] elements.
    pub fn parse_list(urls: &str) -> Option<Vec<MqttUrl>> {
        let mut out: Vec<MqttUrl> = Vec::new();
        for part in urls.split(',').map(str::trim) {
            let mut url = MqttUrl::parse(part)?;
            if let Some(first) = out.first() {
                if !part.contains("://") {
                    url = MqttUrl::parse(&format!(
                        "{}://{part}",
                        if first.tls { "mqtts" } else { "mqtt" }
                    ))?;
                }
            }
            out.push(url);
        }
        (!out.is_empty() && out.len() <= MAX_BROKERS).then_some(out)
    }
}

impl std::fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// At most this many brokers in a worker's list: a cluster's nodes, not a
/// directory.
pub const MAX_BROKERS: usize = 16;

/// Longest keep-alive: with batches, the broker sees a dead worker (and
/// publishes its last will) within 1.5 × this.
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(900);

/// Keep-alive for a metrics interval and batch period (zero: no batches):
/// `max(5 s, 2 × interval)` capped at 30 s, as without batches; with them
/// 1.25 × the batch period, at most [`MAX_KEEP_ALIVE`]. The MQTT client
/// (`vendor/rumqttc`, patched) pings only a keep-alive after the link last
/// carried packets both ways, so batches acknowledged every period keep the
/// link free of pings, and a worker that dies is offline within 1.5 ×
/// this (its last will): 9.4 min at the default 5 min batches.
pub fn keep_alive(interval: Duration, batch_period: Duration) -> Duration {
    let plain = (interval * 2)
        .max(Duration::from_secs(5))
        .min(Duration::from_secs(30));
    plain.max((batch_period + batch_period / 4).min(MAX_KEEP_ALIVE))
}

/// Everything the session needs, prepared by [`crate::run`].
pub(crate) struct SessionParams {
    pub store: StateStore,
    pub secret: Secret,
    pub mqtt_url: String,
    /// The pinned CA(s), for `mqtts://` and HTTPS downloads.
    pub trust: Option<crate::tls::Trust>,
    pub outbox: Outbox,
    pub inventory: Inventory,
    pub disks: HVec<Disk, MAX_DISKS>,
    pub collector: Collector,
    pub labels: Vec<(String, String)>,
    pub interval: Duration,
    /// `--batch`: the metrics batch period; zero = every sample at once.
    pub batch: Duration,
    pub flush_interval: Duration,
    pub services: Supervisor,
    pub local: LocalParts,
    /// `--allow-remote-exec`: `Exec` commands run (else they are refused).
    pub allow_exec: bool,
    /// Self-update.
    pub update: UpdateParts,
    /// The re-enrolment request for a fresh MQTT login (no id, no proof:
    /// set when one is asked for; [`login`]).
    pub login_template: crate::enroll::EnrollRequest,
}

/// The session's side of self-update ([`crate::update`]).
pub(crate) struct UpdateParts {
    /// What the update record said at start.
    pub startup: crate::update::Startup,
    /// The pinned release key.
    pub release_key: Option<[u8; 32]>,
    /// Why `UpdateAgent` is refused whatever the release (container,
    /// embedded agent, a build without it); `None`: it can be tried.
    pub refused: Option<String>,
}

/// The session's side of the local API.
pub(crate) struct LocalParts {
    /// The services the API answers for; follows every status.
    pub registry: Registry,
    /// What services publish.
    pub rx: tokio::sync::mpsc::Receiver<LocalPublish>,
    /// Kept so that `rx` stays open (and idle) when no server runs.
    pub tx: tokio::sync::mpsc::Sender<LocalPublish>,
}

/// This worker's topics, built once.
struct Topics {
    status: String,
    cmd: String,
    stored: String,
    birth: String,
    metrics: String,
    events: String,
    reply: String,
    services: String,
    logs: String,
    service_metrics: String,
    board: String,
}

impl Topics {
    fn new(id: &str) -> Topics {
        let t = |k| protocol::topic::topic(id, k);
        Topics {
            status: t(TopicKind::Status),
            cmd: t(TopicKind::Cmd),
            stored: t(TopicKind::Stored),
            birth: t(TopicKind::Birth),
            metrics: t(TopicKind::Metrics),
            events: t(TopicKind::Events),
            reply: t(TopicKind::Reply),
            services: t(TopicKind::Services),
            logs: t(TopicKind::Logs),
            service_metrics: t(TopicKind::ServiceMetrics),
            board: t(TopicKind::Board),
        }
    }

    fn for_kind(&self, kind: BodyKind) -> Option<&str> {
        match kind {
            BodyKind::Birth => Some(&self.birth),
            BodyKind::Metrics | BodyKind::MetricsBatch => Some(&self.metrics),
            BodyKind::Event => Some(&self.events),
            BodyKind::Reply => Some(&self.reply),
            BodyKind::ServiceStatus => Some(&self.services),
            BodyKind::LogChunk => Some(&self.logs),
            BodyKind::ServiceMetrics => Some(&self.service_metrics),
            BodyKind::Board => Some(&self.board),
            BodyKind::Command => None,
        }
    }
}

type PollFuture = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

/// Polls the event loop once, after `delay`; the future owns the loop and
/// hands it back, so it is never dropped mid-poll.
/// Polls `eventloop` after `delay`, cut short when a fresh login is
/// handed over (taken before the connect).
fn poll_after(
    mut eventloop: EventLoop,
    delay: Duration,
    handoff: Arc<login::Handoff>,
) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = handoff.handed() => {}
            }
        }
        if let Some((username, password)) = handoff.take() {
            eventloop.mqtt_options.set_credentials(username, password);
        }
        let result = eventloop.poll().await;
        (eventloop, result)
    })
}

/// A sample: the collector back, the metrics and the Pi's board frame.
type Sample = (Collector, Metrics, Option<Board>);
type SampleTask = JoinHandle<Sample>;

async fn join_sample(task: &mut Option<SampleTask>) -> Result<Sample, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

fn ticker(interval: Duration) -> tokio::time::Interval {
    // The first sample comes after at most a second (CPU usage needs two
    // readings), so a fresh worker shows live data at once; then every interval.
    let first = interval.min(Duration::from_secs(1));
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// The MQTT session: the connection, commands, metrics sampling and the
/// hosted services, around the publish pipeline ([`Publisher`]) and the
/// deploy downloads ([`Deployments`]).
struct Session {
    /// The previous secret after a rotation: commands sealed before the
    /// conductor saw the switch still verify with it.
    previous_secret: Option<Secret>,
    /// Seqs of commands applied. Invariant: persisted before a command is
    /// applied, so a command is applied at most once.
    cmd_window: ReplayWindow,
    /// Hands publishes and subscriptions to the event loop.
    client: AsyncClient,
    /// This worker's topics.
    topics: Topics,
    /// The broker connected to (or tried), for logs.
    mqtt_url: String,
    /// Every broker node the worker may use, with its client options: one
    /// for a single broker; a cluster's nodes (NATS) fail over in turn.
    /// Never empty.
    brokers: Vec<(String, MqttOptions)>,
    /// Index into `brokers` of the one in use.
    broker: usize,
    /// Set by a connection error when there is another broker to try: the
    /// run loop swaps the event loop's options before the next poll.
    switch_broker: bool,
    /// What the birth frame says about the machine.
    inventory: Inventory,
    /// The disks of the last sample, repeated in every birth.
    last_disks: HVec<Disk, MAX_DISKS>,
    /// The Pi's last board frame, repeated after every connect; `None`
    /// until the first sample, and on any machine that is not a Pi.
    board: Option<Board>,
    /// The worker's labels, sent in every birth.
    labels: Vec<(String, String)>,
    /// The metrics interval (the birth carries it: the conductor's
    /// liveness depends on it).
    interval: Duration,
    /// Set by `SetInterval` and `Live`; the run loop rebuilds its ticker.
    interval_changed: bool,
    /// The batch being filled and the live period.
    batcher: Batcher,
    /// What the last birth told the conductor: batches go (its
    /// `interval_ms` is the batch period). A birth is queued again when
    /// that changes, so the conductor's liveness clock follows.
    birth_batching: bool,
    /// Reconnect delays.
    backoff: Backoff,
    /// The broker's last SubAck refused the command subscription.
    subscription_refused: bool,
    /// Failed connection attempts since the last ConnAck.
    failed_attempts: u32,
    /// A refused login was logged (once per run of refusals).
    auth_error_logged: bool,
    /// Command frames refused (bad tag, replay, …) since start.
    commands_rejected: u64,
    /// Every frame the worker sends, from sealing to acknowledgement.
    out: Publisher,
    /// A fresh MQTT login when the broker refuses this one ([`login`]).
    login: login::LoginRefresh,
    /// The downloads of `DeployManifest` and `InstallManifest` commands.
    deploys: Deployments,
    /// The hosted services; independent of the connection.
    services: Supervisor,
    /// The local API's services.
    registry: Registry,
    /// Answers `Logs` for process services.
    logs: LogStreams,
    /// Where log tasks send their frames (drained into the outbox).
    log_tx: tokio::sync::mpsc::Sender<Body>,
    /// Container log follows running now (at most [`logs::MAX_FOLLOWS`]).
    container_follows: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// `--allow-remote-exec`; fixed for the run (unread in a build
    /// without the `remote-exec` feature, which refuses every `Exec`).
    #[cfg_attr(not(feature = "remote-exec"), allow(dead_code))]
    allow_exec: bool,
    /// The pinned release key.
    release_key: Option<[u8; 32]>,
    /// Why `UpdateAgent` is refused whatever the release.
    update_refused: Option<String>,
    /// On trial: the seq of this run's `AgentStarted`; a `Stored` covering
    /// it confirms the trial ([`crate::update::confirm`]), once.
    trial_seq: Option<u64>,
    /// A release being fetched and staged: the command id and the version.
    staging: Option<StagingTask>,
    /// Set when a release is staged: the run loop ends and hands over.
    update_staged: bool,
}

type StagingTask = JoinHandle<(u32, String, Result<crate::update::Record, String>)>;

async fn join_staging(
    task: &mut Option<StagingTask>,
) -> Result<(u32, String, Result<crate::update::Record, String>), tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// The transport for `mqtts://`: TLS trusting only the pinned CA(s).
fn mqtt_tls(
    trust: Option<&crate::tls::Trust>,
    url: &str,
) -> Result<rumqttc::Transport, WorkerError> {
    #[cfg(feature = "tls")]
    {
        let Some(t) = trust else {
            return Err(WorkerError::Config(format!(
                "{url}: MQTT over TLS needs the conductor's CA, pinned at enrolment: enrol again \
                 (--reenroll) with a token that carries its fingerprint"
            )));
        };
        let config = t
            .mqtt_client_config()
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        Ok(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = trust;
        Err(WorkerError::Config(
            crate::tls::TlsError::NotBuilt(url.into()).to_string(),
        ))
    }
}

/// Runs the session until `shutdown` completes; then sends `offline`,
/// persists the outbox and disconnects.
pub(crate) async fn run(
    p: SessionParams,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Result<crate::Ended, WorkerError> {
    let id = p.store.state().worker_id.clone();
    let urls = MqttUrl::parse_list(&p.mqtt_url)
        .ok_or_else(|| WorkerError::Config(format!("unusable MQTT URL {:?}", p.mqtt_url)))?;
    let topics = Topics::new(&id);
    let st = p.store.state();
    let brokers = urls
        .iter()
        .map(|url| {
            let client_id = st.mqtt_client_id.clone().unwrap_or_else(|| id.clone());
            let mut opts = MqttOptions::new(client_id, url.host.clone(), url.port);
            if url.tls {
                opts.set_transport(mqtt_tls(p.trust.as_ref(), &url.to_string())?);
            }
            // fits: WINDOW is 10.
            #[allow(clippy::cast_possible_truncation)]
            let inflight = 2 * WINDOW as u16;
            opts.set_keep_alive(keep_alive(
                p.interval,
                Batcher::new(p.batch).period(p.interval),
            ))
            .set_clean_session(true)
            .set_inflight(inflight)
            .set_max_packet_size(MAX_FRAME_LEN + 1024, MAX_FRAME_LEN + 1024)
            .set_last_will(LastWill::new(
                topics.status.clone(),
                protocol::topic::STATUS_OFFLINE,
                QoS::AtLeastOnce,
                true,
            ));
            if !st.mqtt_username.is_empty() {
                opts.set_credentials(st.mqtt_username.clone(), st.mqtt_password.clone());
            }
            Ok((url.to_string(), opts))
        })
        .collect::<Result<Vec<_>, WorkerError>>()?;
    let opts = brokers[0].1.clone();
    let (client, mut eventloop) = AsyncClient::new(opts, 4 * WINDOW);
    // Frames are small and latency matters (command round trips): without
    // TCP_NODELAY, Nagle plus delayed ACKs add ~40 ms per exchange.
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (log_tx, mut log_rx) = tokio::sync::mpsc::channel::<Body>(logs::CHANNEL_LEN);
    let LocalParts {
        registry,
        rx: mut local_rx,
        tx: _local_tx,
    } = p.local;
    let log_streams = LogStreams::new(p.services.state_dir(), logs::MAX_FOLLOWS);
    let cmd_window = st.cmd_window();
    let previous_secret = st.previous_secret();
    let conductor = Conductor {
        urls: ConductorUrls::parse(&st.conductor_url).ok_or_else(|| {
            WorkerError::Config(format!("invalid conductor URL {:?}", st.conductor_url))
        })?,
        worker_id: id.clone(),
        secret: p.secret.clone(),
        previous_secret: previous_secret.clone(),
        trust: p.trust.clone(),
    };

    let mut s = Session {
        previous_secret,
        cmd_window,
        client,
        topics,
        mqtt_url: brokers[0].0.clone(),
        brokers,
        broker: 0,
        switch_broker: false,
        inventory: p.inventory,
        last_disks: p.disks,
        board: None,
        labels: p.labels,
        interval: p.interval,
        interval_changed: false,
        batcher: Batcher::new(p.batch),
        birth_batching: false,
        backoff: Backoff::new(RECONNECT_BASE, RECONNECT_CAP),
        failed_attempts: 0,
        subscription_refused: false,
        auth_error_logged: false,
        commands_rejected: 0,
        out: Publisher::new(id, p.secret, p.store, p.outbox, p.flush_interval),
        login: login::LoginRefresh::new(conductor.clone(), p.login_template),
        deploys: Deployments::new(conductor),
        services: p.services,
        registry,
        logs: log_streams,
        log_tx,
        container_follows: Default::default(),
        allow_exec: p.allow_exec,
        release_key: p.update.release_key,
        update_refused: p.update.refused,
        trial_seq: None,
        staging: None,
        update_staged: false,
    };
    tracing::info!(
        broker = %s.mqtt_url,
        interval_ms = u64::try_from(s.interval.as_millis()).unwrap_or(u64::MAX),
        queued = s.out.queued(),
        "starting"
    );
    let started = s.out.enqueue(Body::Event(WorkerEvent {
        kind: EventKind::AgentStarted,
        detail: bounded(&format!("edge-worker {} started", crate::VERSION)),
    }));
    match p.update.startup {
        crate::update::Startup::Nothing => {}
        crate::update::Startup::Trial => {
            tracing::info!(
                version = crate::VERSION,
                "on trial: confirming once the conductor acknowledges this start"
            );
            s.trial_seq = Some(started);
        }
        crate::update::Startup::Report { updated, detail } => {
            if updated {
                tracing::info!("agent updated: {detail}");
            } else {
                tracing::warn!("agent update failed: {detail}");
            }
            let kind = if updated {
                EventKind::AgentUpdated
            } else {
                EventKind::AgentUpdateFailed
            };
            s.out.enqueue(Body::Event(WorkerEvent {
                kind,
                detail: bounded(&detail),
            }));
            // Queued and on disk before the record goes: reported once.
            s.out.persist();
            crate::update::finish(s.services.state_dir());
        }
    }

    let mut poll = poll_after(eventloop, Duration::ZERO, s.login.handoff.clone());
    let mut tick = ticker(s.interval);
    let mut collector = Some(p.collector);
    let mut sample: Option<SampleTask> = None;
    loop {
        let flush_at = s.out.flush_due();
        let flush_sleep = tokio::time::sleep_until(
            flush_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        let expire_at = s.out.expire_due();
        let expire_sleep = tokio::time::sleep_until(
            expire_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        let services_at = s.services.next_wake();
        let services_sleep = tokio::time::sleep_until(
            services_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        tokio::select! {
            () = &mut shutdown => break,
            r = s.login.done() => s.on_login(r),
            (eventloop, result) = &mut poll => {
                let delay = s.on_poll(result);
                let mut eventloop = eventloop;
                if let Some(opts) = s.next_broker() {
                    eventloop.mqtt_options = opts;
                }
                poll = poll_after(eventloop, delay, s.login.handoff.clone());
            }
            _ = tick.tick() => {
                s.retry_subscription();
                if sample.is_none() {
                    let c = collector.take();
                    sample = Some(tokio::task::spawn_blocking(move || {
                        let mut c = c.unwrap_or_default();
                        let m = c.sample();
                        let b = c.board();
                        (c, m, b)
                    }));
                } else {
                    tracing::debug!("previous sample still running; tick skipped");
                }
            }
            result = join_sample(&mut sample) => {
                sample = None;
                match result {
                    Ok((c, m, b)) => {
                        collector = Some(c);
                        s.on_metrics(m);
                        s.on_board(b);
                    }
                    // The collector is rebuilt on the next tick.
                    Err(e) => tracing::error!("metrics sample failed: {e}"),
                }
            }
            () = flush_sleep, if flush_at.is_some() => s.out.persist(),
            () = expire_sleep, if expire_at.is_some() => s.out.expire(),
            () = services_sleep, if services_at.is_some() => s.services.poll(),
            Some(done) = s.deploys.next_done(), if s.deploys.running() => {
                s.on_deploy_done(done);
            }
            Some(p) = local_rx.recv() => {
                s.out.enqueue(p.into_body());
            }
            Some(body) = log_rx.recv() => {
                s.out.enqueue(body);
            }
            result = join_staging(&mut s.staging) => {
                s.staging = None;
                match result {
                    Ok((cmd_id, version, r)) => s.on_staged(cmd_id, &version, r),
                    Err(e) => tracing::error!("staging the update failed: {e}"),
                }
            }
        }
        s.enqueue_service_changes();
        if s.out.accepts_batch() != s.birth_batching && s.out.is_connected() {
            // The liveness clock the birth carries changed.
            s.enqueue_picture();
        }
        if s.interval_changed {
            s.interval_changed = false;
            tick = ticker(
                s.batcher
                    .tick_interval(s.interval, std::time::Instant::now()),
            );
        }
        s.out.pump(&s.client, &s.topics);
        s.out.persist_if_drained();
        if s.update_staged {
            break;
        }
    }

    s.shutdown(poll).await;
    if let Some(task) = sample {
        task.abort();
    }
    Ok(if s.update_staged {
        crate::Ended::UpdateStaged
    } else {
        crate::Ended::Shutdown
    })
}

impl Session {
    fn enqueue_birth(&mut self) {
        self.birth_batching = self.out.accepts_batch();
        let liveness = self.batcher.liveness(self.interval, self.birth_batching);
        let interval_ms = u32::try_from(liveness.as_millis()).unwrap_or(u32::MAX);
        let birth = self
            .inventory
            .birth(&self.last_disks, &self.labels, interval_ms);
        self.out.enqueue(Body::Birth(birth));
    }

    /// Queues the board frame when it changed (the throttling bits; the
    /// first one after start). [`Session::on_connected`] repeats the last.
    fn on_board(&mut self, board: Option<Board>) {
        if board.is_some() && board != self.board {
            self.board = board;
            self.enqueue_board();
        }
    }

    fn enqueue_board(&mut self) {
        if let Some(b) = &self.board {
            self.out.enqueue(Body::Board(b.clone()));
        }
    }

    fn on_metrics(&mut self, mut m: Metrics) {
        m.dropped = self.out.take_dropped();
        self.last_disks = m.disks.clone();
        let now = std::time::Instant::now();
        let batching = self.out.accepts_batch();
        for body in self.batcher.on_sample(m, self.interval, batching, now) {
            self.out.enqueue(body);
        }
        if self.batcher.end_live_if_over(now) {
            self.interval_changed = true;
        }
    }

    /// Queues the batch being filled (before an interval change, a live
    /// period or a shutdown).
    fn flush_batch(&mut self) {
        if let Some(body) = self.batcher.flush(self.interval, std::time::Instant::now()) {
            self.out.enqueue(body);
        }
    }

    /// Handles one event-loop result; returns how long to wait before the
    /// next poll (non-zero only after a connection error).
    fn on_poll(&mut self, result: Result<Event, ConnectionError>) -> Duration {
        match result {
            Ok(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(),
            Ok(Event::Incoming(Packet::PubAck(ack))) => self.out.on_pub_ack(ack.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == self.topics.cmd {
                    self.on_command(&p.payload, false);
                } else if p.topic == self.topics.stored {
                    self.on_command(&p.payload, true);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack.return_codes.contains(&SubscribeReasonCode::Failure);
                if refused && !self.subscription_refused {
                    tracing::error!(
                        topic = %self.topics.cmd,
                        "the broker refused the command subscription; commands will not arrive \
                         until it accepts it (tried again every metrics interval)"
                    );
                } else if !refused && self.subscription_refused {
                    tracing::info!("the broker accepted the command subscription");
                }
                self.subscription_refused = refused;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.out.on_outgoing(pkid),
            Ok(_) => {}
            Err(e) => return self.on_disconnected(e),
        }
        Duration::ZERO
    }

    fn on_connected(&mut self) {
        self.login.connected();
        if self.auth_error_logged {
            tracing::info!("the broker accepted the MQTT login again");
        }
        self.auth_error_logged = false;
        tracing::info!(
            broker = %self.mqtt_url,
            queued = self.out.queued(),
            attempts = self.failed_attempts + 1,
            "connected"
        );
        self.failed_attempts = 0;
        self.out.on_connected();
        self.out.publish_online(&self.client, &self.topics);
        self.subscribe();
        // One event per outage.
        self.out.report_outage();
        self.enqueue_picture();
    }

    /// The birth, the board and every service's status: the conductor
    /// takes a birth as a new session and forgets the services reported
    /// before it, so the statuses always follow a birth.
    fn enqueue_picture(&mut self) {
        self.enqueue_birth();
        self.enqueue_board();
        for status in self.services.statuses() {
            self.out.enqueue(Body::ServiceStatus(status));
        }
    }

    /// One SUBSCRIBE: commands (QoS 1) and `Stored` acknowledgements (sent
    /// QoS 0: cumulative, the next one makes up for a lost one).
    fn subscribe(&mut self) {
        if let Err(e) = self.client.try_subscribe_many([
            SubscribeFilter::new(self.topics.cmd.clone(), QoS::AtLeastOnce),
            SubscribeFilter::new(self.topics.stored.clone(), QoS::AtMostOnce),
        ]) {
            tracing::warn!("cannot subscribe to commands: {e}");
        }
    }

    /// Subscribes again while the broker refuses the subscription: a NATS
    /// node refuses it while JetStream recovers from a lost node, then
    /// accepts it; an ACL that forbids it stays an error, logged once.
    fn retry_subscription(&mut self) {
        if self.subscription_refused && self.out.is_connected() {
            tracing::debug!("subscribing to commands again");
            self.subscribe();
        }
    }

    /// Queues a status frame for every service state change and an event
    /// frame for every service event.
    fn enqueue_service_changes(&mut self) {
        for status in self.services.take_changes() {
            tracing::debug!(service = %status.name, state = ?status.state, pid = status.pid, "service");
            // A Removed status may be followed by a new deploy of the name
            // in the same batch: only what is gone for good is forgotten.
            if self.services.status(&status.name).is_none() {
                self.registry.unregister(&status.name);
            } else {
                self.registry
                    .set_state(&status.name, local_api::state_str(status.state));
            }
            self.out.enqueue(Body::ServiceStatus(status));
        }
        for (kind, detail) in self.services.take_events() {
            self.out.enqueue(Body::Event(WorkerEvent {
                kind,
                detail: bounded(&detail),
            }));
        }
    }

    fn reply(&mut self, cmd_id: u32, status: ReplyStatus, detail: &str) {
        self.out.enqueue(Body::Reply(Reply {
            cmd_id,
            status,
            detail: bounded(detail),
        }));
    }

    /// A deploy download step finished: the next one starts, or the command
    /// is answered.
    fn on_deploy_done(
        &mut self,
        done: Result<(tokio::task::Id, DeployJob), tokio::task::JoinError>,
    ) {
        let Some(a) = self.deploys.on_done(done, &mut self.services) else {
            return;
        };
        if let Some(detail) = a.rejected {
            self.out.enqueue(Body::Event(WorkerEvent {
                kind: EventKind::ArtifactRejected,
                detail: bounded(&detail),
            }));
        }
        self.reply(a.cmd_id, a.status, &a.detail);
    }

    /// A re-enrolment for a fresh login ended ([`login`]).
    fn on_login(&mut self, r: Result<crate::enroll::EnrollResponse, crate::enroll::EnrollError>) {
        match r {
            Ok(resp) if resp.worker_id == self.out.worker_id() => {
                let (user, pass) = (resp.mqtt_username, resp.mqtt_password);
                if let Err(e) = self.out.state_store().set_mqtt_login(
                    user.clone(),
                    pass.clone(),
                    resp.mqtt_client_id,
                ) {
                    tracing::warn!("the fresh MQTT login is used but not saved: {e}");
                }
                for (_, opts) in &mut self.brokers {
                    opts.set_credentials(user.clone(), pass.clone());
                }
                self.login.hand_over(user, pass);
                tracing::info!("the conductor gave a fresh MQTT login: connecting with it");
            }
            Ok(resp) => tracing::warn!(
                answered = %resp.worker_id,
                "the re-enrolment answered for another worker id: login unchanged"
            ),
            Err(e) => tracing::warn!(
                "no fresh MQTT login: {e} (revoked or removed, if the conductor says so); \
                 asked again at most every {}s while the broker refuses the login",
                login::REFRESH_EVERY.as_secs()
            ),
        }
    }

    /// After a connection error with more than one broker: the next
    /// broker's options, for the event loop's next connect.
    fn next_broker(&mut self) -> Option<MqttOptions> {
        if !std::mem::take(&mut self.switch_broker) {
            return None;
        }
        self.broker = (self.broker + 1) % self.brokers.len();
        let (url, opts) = &self.brokers[self.broker];
        tracing::info!(broker = %url, "trying the next broker");
        self.mqtt_url.clone_from(url);
        Some(opts.clone())
    }

    fn on_disconnected(&mut self, e: ConnectionError) -> Duration {
        // Any node of a broker cluster will do: the next connect tries the
        // next one (a refused login too: it may be one node's stale view).
        self.switch_broker = self.brokers.len() > 1;
        // A refused login comes at connect time, never while connected.
        let was_connected = self.out.on_disconnected();
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        if let ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) = &e
        {
            if !self.auth_error_logged {
                self.auth_error_logged = true;
                tracing::error!(
                    broker = %self.mqtt_url,
                    "the broker refused the MQTT login ({code:?}): the login expired or is \
                     stale, or the worker was revoked; retrying every ~{}s",
                    RECONNECT_CAP.as_secs()
                );
            }
            let (id, secret) = (self.out.worker_id().to_string(), self.out.secret().clone());
            if self.login.start(&id, &secret) {
                tracing::info!("asking the conductor for a fresh MQTT login (re-enrolment)");
            }
            return self.backoff.at_cap();
        }
        if let Some(since) = was_connected {
            if since.elapsed() >= STABLE_AFTER {
                self.backoff.reset();
            }
            tracing::warn!(
                queued = self.out.queued(),
                "disconnected from the broker: {e}; queueing frames until it is back"
            );
        } else if self.failed_attempts == 1 {
            tracing::warn!(broker = %self.mqtt_url, "cannot connect to the broker: {e}; retrying");
        } else {
            tracing::debug!(attempt = self.failed_attempts, "connect failed: {e}");
        }
        self.backoff.next_delay()
    }

    fn reject_command(&mut self, reason: &str, detail: String) {
        self.commands_rejected += 1;
        tracing::warn!(
            reason,
            total = self.commands_rejected,
            "command rejected: {detail}"
        );
        self.out.enqueue(Body::Event(WorkerEvent {
            kind: EventKind::CommandRejected,
            detail: bounded(&format!("{reason}: {detail}")),
        }));
    }

    /// A frame on the `cmd` topic, or on `cmd/stored` (`stored_topic`),
    /// where only `Stored` belongs.
    fn on_command(&mut self, payload: &[u8], stored_topic: bool) {
        let opened = match protocol::open(payload, self.out.worker_id()) {
            Ok(o) => o,
            Err(e) => return self.reject_command(e.reason(), e.to_string()),
        };
        if opened.worker_id() != self.out.worker_id() {
            let detail = format!("addressed to {:?}", opened.worker_id());
            return self.reject_command("wrong_worker", detail);
        }
        let secrets: Vec<&Secret> = std::iter::once(self.out.secret())
            .chain(self.previous_secret.as_ref())
            .collect();
        let env = match opened.verify_any(&secrets) {
            Ok((env, _)) => env,
            Err(e) => return self.reject_command(e.reason(), e.to_string()),
        };
        let Body::Command(cmd) = env.body else {
            let detail = format!("{:?} frame on the command topic", env.body.kind());
            return self.reject_command("topic_mismatch", detail);
        };
        if let Action::Stored(upto) = cmd.action {
            // Outside the command seq stream: not checked against the
            // window (a replayed one repeats a true statement) and nothing
            // is persisted (no SD card write per acknowledgement).
            if self.trial_seq.is_some_and(|started| upto >= started) {
                self.trial_seq = None;
                crate::update::confirm(self.services.state_dir());
            }
            return self.out.on_stored(upto, cmd.id);
        }
        if stored_topic {
            let detail = format!("command {} on the acknowledgement topic", cmd.id);
            return self.reject_command("topic_mismatch", detail);
        }
        match self.cmd_window.check(env.seq) {
            SeqVerdict::Fresh => {}
            SeqVerdict::Replayed => {
                let detail = format!("command {} seq {} already applied", cmd.id, env.seq);
                return self.reject_command("replayed", detail);
            }
            SeqVerdict::TooOld => {
                let detail = format!("command {} seq {} is too old", cmd.id, env.seq);
                return self.reject_command("too_old", detail);
            }
        }
        // Persist before applying: a command is applied at most once, even
        // if the worker dies right after.
        self.cmd_window.accept(env.seq);
        if let Err(e) = self.out.state_store().save_cmd_window(self.cmd_window) {
            tracing::error!("cannot persist the command window: {e}");
        }
        tracing::info!(id = cmd.id, seq = env.seq, action = ?cmd.action, "command");
        match &cmd.action {
            Action::Deploy(spec) => {
                self.deploys.supersede(&spec.name);
            }
            Action::Stop(name) | Action::Remove(name) => {
                self.deploys.supersede(name);
            }
            _ => {}
        }
        let (status, detail, rebirth) = match cmd.action {
            Action::Ping => (ReplyStatus::Ok, "pong".to_string(), false),
            Action::SetInterval(ms) => {
                // Its samples were taken at the old interval.
                self.flush_batch();
                let requested = Duration::from_millis(u64::from(ms));
                self.interval = requested.max(MIN_INTERVAL);
                self.interval_changed = true;
                let applied = self.interval.as_millis();
                // The birth carries the interval the conductor's liveness uses.
                (
                    ReplyStatus::Ok,
                    format!("interval set to {applied} ms"),
                    true,
                )
            }
            Action::Rebirth => {
                self.enqueue_picture();
                (ReplyStatus::Ok, "birth queued".to_string(), false)
            }
            // No reply: renewed every minute or two while someone looks.
            Action::Live(req) => {
                let now = std::time::Instant::now();
                if let Some(body) = self.batcher.start_live(&req, self.interval, now) {
                    self.out.enqueue(body);
                }
                self.interval_changed = true;
                return;
            }
            Action::Deploy(spec) => service_reply(self.services.deploy(spec)),
            Action::Start(name) => service_reply(self.services.start(&name)),
            Action::Stop(name) => service_reply(self.services.stop(&name)),
            Action::Restart(name) => service_reply(self.services.restart(&name)),
            Action::Remove(name) => service_reply(self.services.remove(&name)),
            // Answered once the downloads are over (`on_deploy_done`).
            Action::DeployManifest(r) => return self.deploys.begin(cmd.id, r, true),
            Action::InstallManifest(r) => return self.deploys.begin(cmd.id, r, false),
            Action::Logs(req) if self.services.is_container(&req.name) => {
                let target = container_logs::Target {
                    worker_id: self.out.worker_id().to_string(),
                    socket: self.services.engine_socket().map(Into::into),
                };
                let follows = self.container_follows.clone();
                match container_logs::start(target, cmd.id, req, self.log_tx.clone(), follows) {
                    Some(refused) => (ReplyStatus::Error, refused, false),
                    // The task replies once the engine has answered.
                    None => return,
                }
            }
            Action::Logs(req) => match self.logs.start(cmd.id, req, self.log_tx.clone()) {
                Ok(detail) => (ReplyStatus::Ok, detail, false),
                Err(e) => (ReplyStatus::Error, e.to_string(), false),
            },
            Action::RotateSecret(sealed) => self.rotate_secret(&sealed),
            #[cfg(feature = "remote-exec")]
            Action::Exec(req) => {
                let (status, detail) =
                    crate::exec::on_command(self.allow_exec, self.deploys.conductor(), req);
                (status, detail, false)
            }
            #[cfg(feature = "remote-exec")]
            Action::Shell(req) => {
                let (status, detail) =
                    crate::exec::shell::on_command(self.allow_exec, self.deploys.conductor(), req);
                (status, detail, false)
            }
            #[cfg(not(feature = "remote-exec"))]
            Action::Exec(_) | Action::Shell(_) => (
                ReplyStatus::Error,
                "remote exec is not in this build of the agent (built without the remote-exec feature)"
                    .to_string(),
                false,
            ),
            Action::UpdateAgent(u) => match self.on_update(cmd.id, u) {
                Some((status, detail)) => (status, detail, false),
                // Answered once staged (`on_staged`).
                None => return,
            },
            // Handled before the window check.
            Action::Stored(_) => return,
        };
        self.reply(cmd.id, status, &detail);
        if rebirth {
            self.enqueue_picture();
        }
    }

    /// `Action::UpdateAgent`: refuses at once, or starts staging the
    /// release (`None`: answered by [`Session::on_staged`]).
    fn on_update(
        &mut self,
        cmd_id: u32,
        u: protocol::release::AgentUpdate,
    ) -> Option<(ReplyStatus, String)> {
        let version = u.version.to_string();
        if !cfg!(feature = "self-update") {
            // A constant: the smallest build links none of the update code.
            let why = crate::update::impossible(crate::SelfUpdate::Always).unwrap_or_default();
            self.update_failed(&version, &why);
            return Some((ReplyStatus::Error, why));
        }
        let checked = match &self.update_refused {
            Some(why) => Err(why.clone()),
            None if self.staging.is_some() => Err("another update is being staged".into()),
            None => crate::update::check(
                &u,
                self.release_key.as_ref(),
                &self.inventory.arch,
                crate::VERSION,
            ),
        };
        match checked {
            Ok(crate::update::Verdict::AlreadyRunning) => {
                Some((ReplyStatus::Ok, format!("already running {version}")))
            }
            Ok(crate::update::Verdict::Install) => {
                tracing::info!(version = %version, "fetching the agent release");
                let conductor = self.deploys.conductor().clone();
                let dir = self.services.state_dir().to_path_buf();
                self.staging = Some(tokio::task::spawn_blocking(move || {
                    let r = crate::update::stage(&conductor, &dir, &u);
                    (cmd_id, version, r)
                }));
                None
            }
            Err(why) => {
                self.update_failed(&version, &why);
                Some((ReplyStatus::Error, why))
            }
        }
    }

    /// A release is staged (or could not be): reply, and on success end
    /// the run loop so the caller runs it on trial.
    fn on_staged(&mut self, cmd_id: u32, version: &str, r: Result<crate::update::Record, String>) {
        match r {
            Ok(record) => {
                tracing::info!(version, staged = %record.staged.display(), "release staged");
                self.reply(
                    cmd_id,
                    ReplyStatus::Ok,
                    &format!("{version} staged: the trial begins"),
                );
                self.update_staged = true;
            }
            Err(why) => {
                self.update_failed(version, &why);
                self.reply(cmd_id, ReplyStatus::Error, &why);
            }
        }
    }

    fn update_failed(&mut self, version: &str, why: &str) {
        tracing::warn!(version, "agent update refused: {why}");
        self.out.enqueue(Body::Event(WorkerEvent {
            kind: EventKind::AgentUpdateFailed,
            detail: bounded(&format!("{version}: {why}")),
        }));
    }

    /// `Action::RotateSecret`: opens the new secret (sealed under the
    /// current one, or the previous one when this is a repeat the conductor
    /// sent before it saw the switch), persists it, then seals with it.
    fn rotate_secret(&mut self, sealed: &[u8]) -> (ReplyStatus, String, bool) {
        let id = self.out.worker_id();
        let opened =
            protocol::sealed::open_rotation(self.out.secret(), id, sealed).or_else(|e| match &self
                .previous_secret
            {
                Some(p) => protocol::sealed::open_rotation(p, id, sealed),
                None => Err(e),
            });
        let next = match opened {
            Ok(next) => next,
            Err(e) => return (ReplyStatus::Error, format!("rotated secret: {e}"), false),
        };
        if next == *self.out.secret() {
            return (ReplyStatus::Ok, "secret already rotated".into(), false);
        }
        if let Err(e) = self.out.state_store().rotate_secret(&next) {
            tracing::error!("cannot persist the rotated secret: {e}");
            return (ReplyStatus::Error, format!("not rotated: {e}"), false);
        }
        let previous = self.out.set_secret(next.clone());
        self.deploys.set_secrets(next, previous.clone());
        self.previous_secret = Some(previous);
        tracing::info!("frame secret rotated");
        (ReplyStatus::Ok, "secret rotated".into(), false)
    }

    /// Clean shutdown: queue `AgentStopping`, give queued frames
    /// [`SHUTDOWN_DRAIN`] to be acknowledged (by `Stored`; by the broker
    /// alone if the conductor sent none since start or stopped sending them),
    /// publish the retained `offline`, disconnect, and persist whatever is
    /// still queued.
    async fn shutdown(&mut self, mut poll: PollFuture) {
        tracing::info!(queued = self.out.queued(), "shutting down");
        self.flush_batch();
        self.out.enqueue(Body::Event(WorkerEvent {
            kind: EventKind::AgentStopping,
            detail: bounded("clean shutdown"),
        }));
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        let acks = self.out.conductor_acks();
        while self.out.is_connected() && !self.out.settled(acks) {
            self.out.pump(&self.client, &self.topics);
            tokio::select! {
                (eventloop, result) = &mut poll => {
                    let _ = self.on_poll(result);
                    poll = poll_after(eventloop, Duration::ZERO, self.login.handoff.clone());
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if self.out.is_connected() {
            let offline = self.client.try_publish(
                self.topics.status.clone(),
                QoS::AtLeastOnce,
                true,
                protocol::topic::STATUS_OFFLINE,
            );
            if offline.is_ok() && self.client.try_disconnect().is_ok() {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                loop {
                    tokio::select! {
                        (eventloop, result) = &mut poll => {
                            match result {
                                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                                Ok(_) => {
                                    poll = poll_after(
                                        eventloop,
                                        Duration::ZERO,
                                        self.login.handoff.clone(),
                                    )
                                }
                            }
                        }
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
        }
        self.out.close(acks);
        tracing::info!(queued = self.out.queued(), "stopped");
    }
}

/// A service command's outcome as a reply.
fn service_reply(result: Result<String, SupervisorError>) -> (ReplyStatus, String, bool) {
    match result {
        Ok(detail) => (ReplyStatus::Ok, detail, false),
        Err(e) => (ReplyStatus::Error, e.to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        let parse_mqtt_url = |u: &str| {
            MqttUrl::parse(u)
                .filter(|u| !u.tls)
                .map(|u| (u.host, u.port))
        };
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884"),
            Some(("127.0.0.1".into(), 1884))
        );
        assert_eq!(
            parse_mqtt_url("tcp://broker"),
            Some(("broker".into(), 1883))
        );
        assert_eq!(parse_mqtt_url("broker:99"), Some(("broker".into(), 99)));
        assert_eq!(parse_mqtt_url("mqtt://[::1]:7"), Some(("[::1]".into(), 7)));
        assert_eq!(parse_mqtt_url("mqtt://[::1]"), Some(("[::1]".into(), 1883)));
        assert_eq!(parse_mqtt_url("mqtts://x:8883"), None);
        assert_eq!(
            MqttUrl::parse("mqtts://x"),
            Some(MqttUrl {
                host: "x".into(),
                port: 8883,
                tls: true
            })
        );
        assert_eq!(MqttUrl::parse("ssl://x:1").map(|u| u.tls), Some(true));
        assert_eq!(parse_mqtt_url("ws://x"), None);
        assert_eq!(parse_mqtt_url("mqtt://"), None);
        assert_eq!(parse_mqtt_url("mqtt://x:notaport"), None);
        assert_eq!(parse_mqtt_url("mqtt://x:0"), None);
        assert_eq!(parse_mqtt_url("mqtt://u:p@x:1"), None);
    }

    #[test]
    fn broker_lists() {
        let list = |u: &str| {
            MqttUrl::parse_list(u).map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(list("mqtt://a:1"), Some(vec!["mqtt://a:1".into()]));
        assert_eq!(
            list("mqtt://a:1, mqtt://b:2,c:3"),
            Some(vec![
                "mqtt://a:1".into(),
                "mqtt://b:2".into(),
                "mqtt://c:3".into()
            ])
        );
        // A bare element takes the first one's scheme.
        assert_eq!(
            list("mqtts://a,b:8884"),
            Some(vec!["mqtts://a:8883".into(), "mqtts://b:8884".into()])
        );
        assert_eq!(list("mqtt://a:1,"), None, "an empty element");
        assert_eq!(list("mqtt://a:1,ws://b"), None);
        assert_eq!(list(""), None);
        let many = vec!["mqtt://a:1"; MAX_BROKERS + 1].join(",");
        assert_eq!(list(&many), None, "more than MAX_BROKERS");
        assert!(list(&many[..many.rfind(',').unwrap()]).is_some());
    }

    #[test]
    fn keep_alive_bounds() {
        let none = Duration::ZERO;
        assert_eq!(
            keep_alive(Duration::from_millis(200), none),
            Duration::from_secs(5)
        );
        assert_eq!(
            keep_alive(Duration::from_secs(10), none),
            Duration::from_secs(20)
        );
        assert_eq!(
            keep_alive(Duration::from_secs(60), none),
            Duration::from_secs(30)
        );
        // With batches: 1.25 × the batch period, at most MAX_KEEP_ALIVE.
        let ten = Duration::from_secs(10);
        assert_eq!(
            keep_alive(ten, Duration::from_secs(300)),
            Duration::from_secs(375)
        );
        assert_eq!(keep_alive(ten, Duration::from_secs(800)), MAX_KEEP_ALIVE);
        assert_eq!(
            keep_alive(Duration::from_millis(200), Duration::from_secs(2)),
            Duration::from_secs(5)
        );
    }
}
