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
//! capped at 30 s; reconnect backoff 0.5 s doubling to 30 s with jitter,
//! reset after [`STABLE_AFTER`] connected; a refused login is logged once
//! and retried at the cap. Metrics sampling runs on a blocking thread and
//! is skipped for a tick if the previous sample is still running.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heapless::Vec as HVec;
use protocol::frame::{bounded, Disk, MAX_DISKS};
use protocol::{
    Action, Body, BodyKind, Envelope, Event as WorkerEvent, EventKind, Manifest, ManifestRef,
    Metrics, ReplayWindow, Reply, ReplyStatus, Secret, SeqVerdict, TopicKind, FORMAT_V2,
    FORMAT_VERSION, MAX_FRAME_LEN,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::task::{JoinHandle, JoinSet};

use crate::backoff::Backoff;
use crate::collect::{Collector, Inventory};
use crate::fetch::{Conductor, FetchError};
use crate::local_api::{self, LocalPublish, Registry};
use crate::logs::{self, LogStreams};
use crate::outbox::{Frame, Outbox};
use crate::state::StateStore;
use crate::supervisor::Supervisor;
use crate::WorkerError;

mod container_logs;

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
}

/// Keep-alive for a metrics interval: `max(5 s, 2 × interval)`, at most 30 s.
pub fn keep_alive(interval: Duration) -> Duration {
    (interval * 2)
        .max(Duration::from_secs(5))
        .min(Duration::from_secs(30))
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
    pub flush_interval: Duration,
    pub services: Supervisor,
    pub local: LocalParts,
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
        }
    }

    fn for_kind(&self, kind: BodyKind) -> Option<&str> {
        match kind {
            BodyKind::Birth => Some(&self.birth),
            BodyKind::Metrics => Some(&self.metrics),
            BodyKind::Event => Some(&self.events),
            BodyKind::Reply => Some(&self.reply),
            BodyKind::ServiceStatus => Some(&self.services),
            BodyKind::LogChunk => Some(&self.logs),
            BodyKind::ServiceMetrics => Some(&self.service_metrics),
            BodyKind::Command => None,
        }
    }
}

type PollFuture = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

/// Polls the event loop once, after `delay`; the future owns the loop and
/// hands it back, so it is never dropped mid-poll.
fn poll_after(mut eventloop: EventLoop, delay: Duration) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = eventloop.poll().await;
        (eventloop, result)
    })
}

type SampleTask = JoinHandle<(Collector, Metrics)>;

async fn join_sample(
    task: &mut Option<SampleTask>,
) -> Result<(Collector, Metrics), tokio::task::JoinError> {
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A QoS 1 publish handed to the client: an outbox frame or a status text.
type Handed = Option<u64>;

struct Session {
    id: String,
    /// Seals every new frame. Replaced by `Action::RotateSecret`.
    secret: Secret,
    /// The secret before the last rotation: commands sealed before the
    /// conductor saw the switch still verify with it.
    previous_secret: Option<Secret>,
    store: StateStore,
    outbox: Outbox,
    cmd_window: ReplayWindow,
    client: AsyncClient,
    topics: Topics,
    mqtt_url: String,
    inventory: Inventory,
    last_disks: HVec<Disk, MAX_DISKS>,
    labels: Vec<(String, String)>,
    interval: Duration,
    /// Set by `SetInterval`; the run loop rebuilds its ticker.
    interval_changed: bool,
    flush_interval: Duration,
    /// `Some(since)` while connected.
    connected_at: Option<Instant>,
    /// Publishes handed to the client whose `Outgoing::Publish(pkid)` has
    /// not been seen yet, in hand-over order.
    handed: VecDeque<Handed>,
    /// pkid → publish, for publishes written to the broker, awaiting PubAck.
    pkids: HashMap<u16, Handed>,
    backoff: Backoff,
    /// Failed connection attempts since the last ConnAck.
    failed_attempts: u32,
    /// A refused login was logged (once per run of refusals).
    auth_error_logged: bool,
    /// Frames dropped by overflow since the connection last dropped.
    outage_dropped: u64,
    /// The overflow event for the current outage (the time since the
    /// connection last dropped) was queued.
    overflow_reported: bool,
    /// Command frames refused (bad tag, replay, …) since start.
    commands_rejected: u64,
    /// A `Stored` arrived since start: the conductor acknowledges.
    stored_seen: bool,
    /// No `Stored` came for [`STORED_TIMEOUT`] after a PubAck (an older
    /// conductor, or none processing): a PubAck frees a frame at once, as
    /// before `Stored` existed, until the next `Stored` arrives.
    pub_ack_final: bool,
    /// The hosted services; independent of the connection.
    services: Supervisor,
    /// Where manifests and artifacts are downloaded from.
    conductor: Conductor,
    /// Downloads for `DeployManifest` and `InstallManifest` commands, on
    /// blocking threads.
    deploys: JoinSet<DeployJob>,
    /// Task id → (command id, service name) of `deploys`, to answer a
    /// command whose task died.
    deploy_tasks: HashMap<tokio::task::Id, (u32, String)>,
    /// Per service: the generation of the latest command that changes its
    /// manifest. Invariant: a download whose generation is not the current
    /// one is never deployed (a later command superseded it).
    deploy_gen: HashMap<String, u64>,
    next_gen: u64,
    /// The local API's services.
    registry: Registry,
    /// Answers `Logs` for process services.
    logs: LogStreams,
    /// Where log tasks send their frames (drained into the outbox).
    log_tx: tokio::sync::mpsc::Sender<Body>,
    /// Container log follows running now (at most [`logs::MAX_FOLLOWS`]).
    container_follows: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// What a `DeployManifest` download step produced.
enum Fetched {
    /// The manifest (or why not).
    Manifest(Result<Manifest, FetchError>),
    /// The manifest and its artifact download (cached path, downloaded now).
    Artifact(Manifest, [u8; 32], Result<(PathBuf, bool), FetchError>),
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

/// A finished download step of one `DeployManifest` or `InstallManifest`
/// command.
struct DeployJob {
    cmd_id: u32,
    gen: u64,
    name: String,
    version: u32,
    /// Run it (`DeployManifest`) or install it stopped (`InstallManifest`).
    run: bool,
    fetched: Fetched,
}

/// Runs the session until `shutdown` completes; then sends `offline`,
/// persists the outbox and disconnects.
pub(crate) async fn run(
    p: SessionParams,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), WorkerError> {
    let id = p.store.state().worker_id.clone();
    let url = MqttUrl::parse(&p.mqtt_url)
        .ok_or_else(|| WorkerError::Config(format!("unusable MQTT URL {:?}", p.mqtt_url)))?;
    let topics = Topics::new(&id);
    let mut opts = MqttOptions::new(id.clone(), url.host.clone(), url.port);
    if url.tls {
        opts.set_transport(mqtt_tls(p.trust.as_ref(), &p.mqtt_url)?);
    }
    opts.set_keep_alive(keep_alive(p.interval))
        .set_clean_session(true)
        .set_inflight(2 * WINDOW as u16)
        .set_max_packet_size(MAX_FRAME_LEN + 1024, MAX_FRAME_LEN + 1024)
        .set_last_will(LastWill::new(
            topics.status.clone(),
            protocol::topic::STATUS_OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    let st = p.store.state();
    if !st.mqtt_username.is_empty() {
        opts.set_credentials(st.mqtt_username.clone(), st.mqtt_password.clone());
    }
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
        url: st.conductor_url.clone(),
        worker_id: id.clone(),
        secret: p.secret.clone(),
        previous_secret: previous_secret.clone(),
        trust: p.trust.clone(),
    };

    let mut s = Session {
        id,
        secret: p.secret,
        previous_secret,
        store: p.store,
        outbox: p.outbox,
        cmd_window,
        client,
        topics,
        mqtt_url: p.mqtt_url,
        inventory: p.inventory,
        last_disks: p.disks,
        labels: p.labels,
        interval: p.interval,
        interval_changed: false,
        flush_interval: p.flush_interval,
        connected_at: None,
        handed: VecDeque::new(),
        pkids: HashMap::new(),
        backoff: Backoff::new(RECONNECT_BASE, RECONNECT_CAP),
        failed_attempts: 0,
        auth_error_logged: false,
        outage_dropped: 0,
        overflow_reported: false,
        commands_rejected: 0,
        stored_seen: false,
        pub_ack_final: false,
        services: p.services,
        conductor,
        deploys: JoinSet::new(),
        deploy_tasks: HashMap::new(),
        deploy_gen: HashMap::new(),
        next_gen: 0,
        registry,
        logs: log_streams,
        log_tx,
        container_follows: Default::default(),
    };
    tracing::info!(
        broker = %s.mqtt_url,
        interval_ms = s.interval.as_millis() as u64,
        queued = s.outbox.len(),
        "starting"
    );
    s.enqueue(Body::Event(WorkerEvent {
        kind: EventKind::AgentStarted,
        detail: bounded(concat!(
            "edge-worker ",
            env!("CARGO_PKG_VERSION"),
            " started"
        )),
    }));

    let mut poll = poll_after(eventloop, Duration::ZERO);
    let mut tick = ticker(s.interval);
    let mut collector = Some(p.collector);
    let mut sample: Option<SampleTask> = None;
    loop {
        let flush_at = s.outbox.flush_due(s.flush_interval);
        let flush_sleep = tokio::time::sleep_until(
            flush_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        let expire_at = s.outbox.expire_due(STORED_TIMEOUT);
        let expire_sleep = tokio::time::sleep_until(
            expire_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        let services_at = s.services.next_wake();
        let services_sleep = tokio::time::sleep_until(
            services_at.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        tokio::select! {
            () = &mut shutdown => break,
            (eventloop, result) = &mut poll => {
                let delay = s.on_poll(result);
                poll = poll_after(eventloop, delay);
            }
            _ = tick.tick() => {
                if sample.is_none() {
                    let c = collector.take();
                    sample = Some(tokio::task::spawn_blocking(move || {
                        let mut c = c.unwrap_or_default();
                        let m = c.sample();
                        (c, m)
                    }));
                } else {
                    tracing::debug!("previous sample still running; tick skipped");
                }
            }
            result = join_sample(&mut sample) => {
                sample = None;
                match result {
                    Ok((c, m)) => {
                        collector = Some(c);
                        s.on_metrics(m);
                    }
                    // The collector is rebuilt on the next tick.
                    Err(e) => tracing::error!("metrics sample failed: {e}"),
                }
            }
            () = flush_sleep, if flush_at.is_some() => s.persist_outbox(),
            () = expire_sleep, if expire_at.is_some() => s.expire(),
            () = services_sleep, if services_at.is_some() => s.services.poll(),
            Some(done) = s.deploys.join_next_with_id(), if !s.deploys.is_empty() => {
                s.on_deploy_done(done);
            }
            Some(p) = local_rx.recv() => s.enqueue(p.into_body()),
            Some(body) = log_rx.recv() => s.enqueue(body),
        }
        s.enqueue_service_changes();
        if s.interval_changed {
            s.interval_changed = false;
            tick = ticker(s.interval);
        }
        s.pump();
        if s.outbox.is_empty() && s.outbox.file_has_frames() {
            s.persist_outbox();
        }
    }

    s.shutdown(poll).await;
    if let Some(task) = sample {
        task.abort();
    }
    Ok(())
}

impl Session {
    /// The wire format for the next frame: [`FORMAT_V2`] (no worker id in
    /// the frame) while the conductor sends `Stored` — only conductors that
    /// accept format 2 do — else format 1, which every conductor takes.
    /// Frames already queued keep the format they were sealed in; the
    /// conductor accepts both.
    fn format(&self) -> u8 {
        if self.stored_seen && !self.pub_ack_final {
            FORMAT_V2
        } else {
            FORMAT_VERSION
        }
    }

    /// Seals `body` with the next seq and queues it.
    fn enqueue(&mut self, body: Body) {
        let kind = body.kind();
        let seq = self.store.next_seq();
        let env = Envelope {
            version: self.format(),
            worker_id: bounded(&self.id),
            seq,
            sent_at_ms: now_ms(),
            body,
        };
        match protocol::seal(&self.secret, &env) {
            Ok(bytes) => {
                let dropped = self.outbox.push(Frame { seq, kind, bytes }, Instant::now());
                if dropped > 0 {
                    self.on_overflow(dropped as u64);
                }
            }
            // Cannot happen with the bounded frame types (protocol tests).
            Err(e) => tracing::error!(seq, "cannot seal a {kind:?} frame: {e}"),
        }
    }

    fn enqueue_birth(&mut self) {
        let interval_ms = u32::try_from(self.interval.as_millis()).unwrap_or(u32::MAX);
        let birth = self
            .inventory
            .birth(&self.last_disks, &self.labels, interval_ms);
        self.enqueue(Body::Birth(birth));
    }

    fn on_overflow(&mut self, dropped: u64) {
        if self.outage_dropped == 0 {
            tracing::warn!(
                capacity = self.outbox.capacity(),
                "outbox full: dropping the oldest frames until the broker is reachable"
            );
        }
        self.outage_dropped += dropped;
        if self.connected_at.is_some() && !self.overflow_reported {
            self.report_overflow();
        }
    }

    fn report_overflow(&mut self) {
        self.overflow_reported = true;
        let detail = format!(
            "dropped {} oldest frames (queue capacity {})",
            self.outage_dropped,
            self.outbox.capacity()
        );
        self.enqueue(Body::Event(WorkerEvent {
            kind: EventKind::QueueOverflow,
            detail: bounded(&detail),
        }));
    }

    fn on_metrics(&mut self, mut m: Metrics) {
        m.dropped = u32::try_from(self.outbox.take_dropped()).unwrap_or(u32::MAX);
        self.last_disks = m.disks.clone();
        self.enqueue(Body::Metrics(m));
    }

    /// Handles one event-loop result; returns how long to wait before the
    /// next poll (non-zero only after a connection error).
    fn on_poll(&mut self, result: Result<Event, ConnectionError>) -> Duration {
        match result {
            Ok(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(Some(seq)) = self.pkids.remove(&ack.pkid) {
                    self.outbox.broker_acked(seq, Instant::now());
                    if self.pub_ack_final {
                        self.outbox.drop_broker_acked();
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == self.topics.cmd {
                    self.on_command(&p.payload, false);
                } else if p.topic == self.topics.stored {
                    self.on_command(&p.payload, true);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    tracing::error!(
                        topic = %self.topics.cmd,
                        "the broker refused the command subscription; commands will not arrive"
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(h) = self.handed.pop_front() {
                    self.pkids.insert(pkid, h);
                }
            }
            Ok(_) => {}
            Err(e) => return self.on_disconnected(e),
        }
        Duration::ZERO
    }

    fn on_connected(&mut self) {
        if self.auth_error_logged {
            tracing::info!("the broker accepted the MQTT login again");
        }
        self.auth_error_logged = false;
        tracing::info!(
            broker = %self.mqtt_url,
            queued = self.outbox.len(),
            attempts = self.failed_attempts + 1,
            "connected"
        );
        self.failed_attempts = 0;
        self.connected_at = Some(Instant::now());
        self.handed.clear();
        self.pkids.clear();
        self.outbox.reset_in_flight();
        match self.client.try_publish(
            self.topics.status.clone(),
            QoS::AtLeastOnce,
            true,
            protocol::topic::STATUS_ONLINE,
        ) {
            Ok(()) => self.handed.push_back(None),
            Err(e) => tracing::warn!("cannot publish the online status: {e}"),
        }
        // One SUBSCRIBE: commands (QoS 1) and `Stored` acknowledgements
        // (sent QoS 0: cumulative, the next one makes up for a lost one).
        if let Err(e) = self.client.try_subscribe_many([
            SubscribeFilter::new(self.topics.cmd.clone(), QoS::AtLeastOnce),
            SubscribeFilter::new(self.topics.stored.clone(), QoS::AtMostOnce),
        ]) {
            tracing::warn!("cannot subscribe to commands: {e}");
        }
        // One event per outage: the drops of the outage that just ended
        // (and of the burst right after it) are reported once.
        if self.outage_dropped > 0 && !self.overflow_reported {
            self.report_overflow();
        }
        self.enqueue_birth();
        // The conductor converges on the full picture after every connect.
        for status in self.services.statuses() {
            self.enqueue(Body::ServiceStatus(status));
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
            self.enqueue(Body::ServiceStatus(status));
        }
        for (kind, detail) in self.services.take_events() {
            self.enqueue(Body::Event(WorkerEvent {
                kind,
                detail: bounded(&detail),
            }));
        }
    }

    /// A new generation for `name`: pending downloads for it are superseded.
    fn supersede(&mut self, name: &str) -> u64 {
        self.next_gen += 1;
        self.deploy_gen.insert(name.to_string(), self.next_gen);
        self.next_gen
    }

    fn reply(&mut self, cmd_id: u32, status: ReplyStatus, detail: &str) {
        self.enqueue(Body::Reply(Reply {
            cmd_id,
            status,
            detail: bounded(detail),
        }));
    }

    /// Starts the manifest download of a `DeployManifest` (`run`) or an
    /// `InstallManifest`; the command is answered by
    /// [`Session::on_deploy_done`].
    fn begin_manifest_deploy(&mut self, cmd_id: u32, r: ManifestRef, run: bool) {
        let name = r.name.to_string();
        let gen = self.supersede(&name);
        let conductor = self.conductor.clone();
        let version = r.version;
        let task_name = name.clone();
        let handle = self.deploys.spawn_blocking(move || DeployJob {
            cmd_id,
            gen,
            name: task_name,
            version,
            run,
            fetched: Fetched::Manifest(conductor.fetch_manifest(&r)),
        });
        self.deploy_tasks.insert(handle.id(), (cmd_id, name));
    }

    fn on_deploy_done(
        &mut self,
        done: Result<(tokio::task::Id, DeployJob), tokio::task::JoinError>,
    ) {
        let job = match done {
            Ok((id, job)) => {
                self.deploy_tasks.remove(&id);
                job
            }
            Err(e) => {
                if let Some((cmd_id, name)) = self.deploy_tasks.remove(&e.id()) {
                    tracing::error!(service = %name, "deploy task failed: {e}");
                    self.reply(cmd_id, ReplyStatus::Error, &format!("internal error: {e}"));
                }
                return;
            }
        };
        let DeployJob {
            cmd_id,
            gen,
            name,
            version,
            run,
            fetched,
        } = job;
        if let Fetched::Artifact(_, sha, _) = &fetched {
            self.services.unpin_artifact(*sha);
        }
        if self.deploy_gen.get(&name) != Some(&gen) {
            let detail = format!("{name} v{version}: superseded by a later command");
            tracing::info!("{detail}");
            return self.reply(cmd_id, ReplyStatus::Error, &detail);
        }
        let manifest = match fetched {
            Fetched::Manifest(Err(e)) | Fetched::Artifact(_, _, Err(e)) => {
                return self.deploy_failed(cmd_id, &name, version, &e)
            }
            Fetched::Artifact(m, _, Ok((path, downloaded))) => {
                tracing::info!(service = %name, path = %path.display(), downloaded, "artifact ready");
                m
            }
            Fetched::Manifest(Ok(m)) => {
                let arch = self.services.arch().to_string();
                let artifact = m.artifact_for(&arch).cloned();
                match (&m.runtime, artifact) {
                    (
                        protocol::manifest::Runtime::Process(protocol::manifest::ProcessRuntime {
                            program: protocol::manifest::Program::Artifacts(_),
                            ..
                        }),
                        None,
                    ) => {
                        let e = FetchError::NoArtifact(arch);
                        return self.deploy_failed(cmd_id, &name, version, &e);
                    }
                    (_, Some(a)) => {
                        // Pinned until deployed: a prune meanwhile must not
                        // delete the fresh download.
                        self.services.pin_artifact(a.sha256);
                        let conductor = self.conductor.clone();
                        let dir = self.services.state_dir().to_path_buf();
                        let task_name = name.clone();
                        let handle = self.deploys.spawn_blocking(move || {
                            let result = conductor.ensure_artifact(&dir, &a);
                            DeployJob {
                                cmd_id,
                                gen,
                                name: task_name,
                                version,
                                run,
                                fetched: Fetched::Artifact(m, a.sha256, result),
                            }
                        });
                        self.deploy_tasks.insert(handle.id(), (cmd_id, name));
                        return;
                    }
                    // Hook for containers: `Runtime::Container` manifests
                    // reach `deploy_manifest`, which refuses them; route them
                    // to the container runtime here.
                    (_, None) => m,
                }
            }
        };
        let result = if run {
            self.services.deploy_manifest(manifest)
        } else {
            self.services.install_manifest(manifest)
        };
        let (status, detail, _) = service_reply(result);
        self.reply(cmd_id, status, &detail);
    }

    /// Answers a `DeployManifest` whose download failed; bytes that did not
    /// match their digest also raise `ArtifactRejected` and a `Failed` status.
    fn deploy_failed(&mut self, cmd_id: u32, name: &str, version: u32, e: &FetchError) {
        tracing::warn!(service = name, version, "deploy failed: {e}");
        let detail = match e.rejection() {
            Some(why) => {
                self.enqueue(Body::Event(WorkerEvent {
                    kind: EventKind::ArtifactRejected,
                    detail: bounded(&format!("{name}: {why}")),
                }));
                let detail = format!("v{version} refused: {e}");
                self.services.report_refused(name, version, &detail);
                detail
            }
            None => format!("v{version} not deployed: {e}"),
        };
        self.reply(cmd_id, ReplyStatus::Error, &detail);
    }

    fn on_disconnected(&mut self, e: ConnectionError) -> Duration {
        let was_connected = self.connected_at.take();
        self.handed.clear();
        self.pkids.clear();
        self.outbox.reset_in_flight();
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        if let ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) = &e
        {
            if !self.auth_error_logged {
                self.auth_error_logged = true;
                tracing::error!(
                    broker = %self.mqtt_url,
                    "the broker refused the MQTT login ({code:?}): the worker may have been \
                     revoked, or its credentials are stale (restart with --reenroll to enrol again); \
                     retrying every ~{}s",
                    RECONNECT_CAP.as_secs()
                );
            }
            return self.backoff.at_cap();
        }
        if let Some(since) = was_connected {
            // A new outage: its drops get their own event.
            self.outage_dropped = 0;
            self.overflow_reported = false;
            if since.elapsed() >= STABLE_AFTER {
                self.backoff.reset();
            }
            tracing::warn!(
                queued = self.outbox.len(),
                "disconnected from the broker: {e}; queueing frames until it is back"
            );
        } else if self.failed_attempts == 1 {
            tracing::warn!(broker = %self.mqtt_url, "cannot connect to the broker: {e}; retrying");
        } else {
            tracing::debug!(attempt = self.failed_attempts, "connect failed: {e}");
        }
        self.backoff.next_delay()
    }

    /// Hands queued frames to the client, oldest first, up to [`WINDOW`].
    fn pump(&mut self) {
        if self.connected_at.is_none() {
            return;
        }
        while let Some(f) = self.outbox.next_to_send(WINDOW) {
            let (seq, kind) = (f.seq, f.kind);
            let Some(topic) = self.topics.for_kind(kind) else {
                // Never queued; drop rather than block the queue.
                self.outbox.discard_next(seq);
                continue;
            };
            let retain = kind == BodyKind::Birth;
            match self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, f.bytes.clone())
            {
                Ok(()) => {
                    self.outbox.mark_sent(seq);
                    self.handed.push_back(Some(seq));
                }
                Err(e) => {
                    // The client's request queue is full; retried on the next event.
                    tracing::debug!("client queue full: {e}");
                    break;
                }
            }
        }
    }

    fn persist_outbox(&mut self) {
        match self.outbox.sync() {
            Ok(()) => tracing::debug!(queued = self.outbox.len(), "outbox persisted"),
            Err(e) => tracing::error!("cannot persist the outbox: {e}"),
        }
    }

    fn reject_command(&mut self, reason: &str, detail: String) {
        self.commands_rejected += 1;
        tracing::warn!(
            reason,
            total = self.commands_rejected,
            "command rejected: {detail}"
        );
        self.enqueue(Body::Event(WorkerEvent {
            kind: EventKind::CommandRejected,
            detail: bounded(&format!("{reason}: {detail}")),
        }));
    }

    /// A frame on the `cmd` topic, or on `cmd/stored` (`stored_topic`),
    /// where only `Stored` belongs.
    fn on_command(&mut self, payload: &[u8], stored_topic: bool) {
        let opened = match protocol::open(payload, &self.id) {
            Ok(o) => o,
            Err(e) => return self.reject_command(e.reason(), e.to_string()),
        };
        if opened.worker_id() != self.id {
            let detail = format!("addressed to {:?}", opened.worker_id());
            return self.reject_command("wrong_worker", detail);
        }
        let secrets: Vec<&Secret> = std::iter::once(&self.secret)
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
            return self.on_stored(upto);
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
        if let Err(e) = self.store.save_cmd_window(self.cmd_window) {
            tracing::error!("cannot persist the command window: {e}");
        }
        tracing::info!(id = cmd.id, seq = env.seq, action = ?cmd.action, "command");
        match &cmd.action {
            Action::Deploy(spec) => {
                self.supersede(&spec.name);
            }
            Action::Stop(name) | Action::Remove(name) => {
                self.supersede(name);
            }
            _ => {}
        }
        let (status, detail, rebirth) = match cmd.action {
            Action::Ping => (ReplyStatus::Ok, "pong".to_string(), false),
            Action::SetInterval(ms) => {
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
                self.enqueue_birth();
                (ReplyStatus::Ok, "birth queued".to_string(), false)
            }
            Action::Deploy(spec) => service_reply(self.services.deploy(spec)),
            Action::Start(name) => service_reply(self.services.start(&name)),
            Action::Stop(name) => service_reply(self.services.stop(&name)),
            Action::Restart(name) => service_reply(self.services.restart(&name)),
            Action::Remove(name) => service_reply(self.services.remove(&name)),
            Action::DeployManifest(r) => return self.begin_manifest_deploy(cmd.id, r, true),
            Action::InstallManifest(r) => return self.begin_manifest_deploy(cmd.id, r, false),
            Action::Logs(req) if self.services.is_container(&req.name) => {
                let target = container_logs::Target {
                    worker_id: self.id.clone(),
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
            // Handled before the window check.
            Action::Stored(_) => return,
        };
        self.enqueue(Body::Reply(Reply {
            cmd_id: cmd.id,
            status,
            detail: bounded(&detail),
        }));
        if rebirth {
            self.enqueue_birth();
        }
    }

    /// `Action::RotateSecret`: opens the new secret (sealed under the
    /// current one, or the previous one when this is a repeat the conductor
    /// sent before it saw the switch), persists it, then seals with it.
    fn rotate_secret(&mut self, sealed: &[u8]) -> (ReplyStatus, String, bool) {
        let opened =
            protocol::sealed::open_rotation(&self.secret, &self.id, sealed).or_else(
                |e| match &self.previous_secret {
                    Some(p) => protocol::sealed::open_rotation(p, &self.id, sealed),
                    None => Err(e),
                },
            );
        let next = match opened {
            Ok(next) => next,
            Err(e) => return (ReplyStatus::Error, format!("rotated secret: {e}"), false),
        };
        if next == self.secret {
            return (ReplyStatus::Ok, "secret already rotated".into(), false);
        }
        if let Err(e) = self.store.rotate_secret(&next) {
            tracing::error!("cannot persist the rotated secret: {e}");
            return (ReplyStatus::Error, format!("not rotated: {e}"), false);
        }
        let previous = std::mem::replace(&mut self.secret, next.clone());
        self.conductor.secret = next;
        self.conductor.previous_secret = Some(previous.clone());
        self.previous_secret = Some(previous);
        tracing::info!("frame secret rotated");
        (ReplyStatus::Ok, "secret rotated".into(), false)
    }

    /// The conductor's acknowledgement: frames with seq ≤ `upto` are
    /// durably processed and leave the outbox.
    fn on_stored(&mut self, upto: u64) {
        let n = self.outbox.stored(upto);
        tracing::debug!(upto, removed = n, queued = self.outbox.len(), "stored");
        self.stored_seen = true;
        if self.pub_ack_final {
            tracing::info!("the conductor acknowledges again: frames stay queued until Stored");
            self.pub_ack_final = false;
        }
    }

    /// Drops frames the broker acknowledged [`STORED_TIMEOUT`] ago and the
    /// conductor never did; from then on a PubAck frees a frame at once
    /// (until a `Stored` arrives), so the queue drains as it used to.
    fn expire(&mut self) {
        let n = self.outbox.expire(Instant::now(), STORED_TIMEOUT);
        if n > 0 && !self.pub_ack_final {
            self.pub_ack_final = true;
            let more = self.outbox.drop_broker_acked();
            tracing::info!(
                dropped = n + more,
                "no Stored acknowledgement from the conductor within {}s of the broker's: \
                 frames leave the outbox at the broker's acknowledgement (an older conductor?)",
                STORED_TIMEOUT.as_secs()
            );
        }
    }

    /// Clean shutdown: queue `AgentStopping`, give queued frames
    /// [`SHUTDOWN_DRAIN`] to be acknowledged (by `Stored`; by the broker
    /// alone if the conductor sent none since start or stopped sending them),
    /// publish the retained `offline`, disconnect, and persist whatever is
    /// still queued.
    async fn shutdown(&mut self, mut poll: PollFuture) {
        tracing::info!(queued = self.outbox.len(), "shutting down");
        self.enqueue(Body::Event(WorkerEvent {
            kind: EventKind::AgentStopping,
            detail: bounded("clean shutdown"),
        }));
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        let acks = self.stored_seen && !self.pub_ack_final;
        while self.connected_at.is_some()
            && !self.outbox.is_empty()
            && (acks || !self.outbox.all_broker_acked())
        {
            self.pump();
            tokio::select! {
                (eventloop, result) = &mut poll => {
                    let _ = self.on_poll(result);
                    poll = poll_after(eventloop, Duration::ZERO);
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if self.connected_at.is_some() {
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
                                Ok(_) => poll = poll_after(eventloop, Duration::ZERO),
                            }
                        }
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
        }
        if !acks {
            // A conductor that does not acknowledge: the broker's PubAck is
            // all there is, as before.
            self.outbox.drop_broker_acked();
        }
        self.outbox.reset_in_flight();
        self.persist_outbox();
        tracing::info!(queued = self.outbox.len(), "stopped");
    }
}

/// A service command's outcome as a reply.
fn service_reply(result: Result<String, String>) -> (ReplyStatus, String, bool) {
    match result {
        Ok(detail) => (ReplyStatus::Ok, detail, false),
        Err(detail) => (ReplyStatus::Error, detail, false),
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
    fn keep_alive_bounds() {
        assert_eq!(
            keep_alive(Duration::from_millis(200)),
            Duration::from_secs(5)
        );
        assert_eq!(keep_alive(Duration::from_secs(10)), Duration::from_secs(20));
        assert_eq!(keep_alive(Duration::from_secs(60)), Duration::from_secs(30));
    }
}
