//! Simulated workers: one rumqttc connection and one tokio task each, with
//! the real wire contract (sealed frames, seq numbers, last will, command
//! replies), but no sampling: the metrics body is the Pi 4 example with a
//! varying CPU figure.
//!
//! The event loop is moved into a boxed future that is polled to completion
//! and rebuilt after every event (as `edge-worker/src/session.rs` does), so
//! `EventLoop::poll` is never cancelled half-way by the `select!`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::frame::bounded;
use protocol::{
    Body, Envelope, Metrics, ReplayWindow, Reply, ReplyStatus, Secret, SeqVerdict, TopicKind,
    FORMAT_V2, FORMAT_VERSION, MAX_FRAME_LEN,
};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions};
use rumqttc::{Outgoing, Packet, QoS, SubscribeFilter};
use tokio::sync::{mpsc, Semaphore};

/// What enrolment returned for one simulated worker.
#[derive(Clone)]
pub struct Identity {
    /// Conductor-issued id (also the MQTT client id and, embedded, username).
    pub id: String,
    /// Frame secret.
    pub secret: Secret,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT login (empty username = anonymous).
    pub username: String,
    /// MQTT password.
    pub password: String,
}

/// Orders from the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctl {
    /// Stop sending metrics; keep the connection (and answer commands).
    StopMetrics,
    /// Vanish by closing the socket without an MQTT DISCONNECT (the
    /// broker sees EOF at once and publishes the last will).
    Drop,
    /// Vanish silently: stop sending and stop reading, keep the socket
    /// open (power loss / network partition: only the broker's keep-alive
    /// timeout or the conductor's liveness clock can notice).
    Silent,
    /// End the task (closes the socket).
    Shutdown,
}

/// Counters shared by every simulated worker.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sealed frames handed to the MQTT client (births, metrics, replies).
    pub handed: AtomicU64,
    /// Sealed frames whose PubAck came back from the broker.
    pub acked: AtomicU64,
    /// Sealed frames the conductor acknowledged as committed (`Stored(n)`
    /// covers every seq up to n; each frame counted once).
    pub stored: AtomicU64,
    /// Frames not handed because the client's request queue was full.
    pub queue_full: AtomicU64,
    /// ConnAcks received (first connects and reconnects).
    pub connects: AtomicU64,
    /// Connection errors after a successful connect (disconnects).
    pub disconnects: AtomicU64,
    /// Failed connection attempts.
    pub connect_errors: AtomicU64,
    /// Commands received and verified.
    pub commands: AtomicU64,
    /// Command frames that failed to open, verify or were replays.
    pub bad_commands: AtomicU64,
    /// Workers connected right now.
    pub connected: AtomicU64,
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Send times of the frames of the sampled workers, for the ingest
/// latency: `(worker id, seq) → sent_at_ms`.
pub type SentLog = Mutex<HashMap<(String, u64), u64>>;

/// Vanish instants, by worker id.
pub type Vanished = Mutex<HashMap<String, Instant>>;

/// Wall clock in ms (the conductor stamps frames with the same clock).
// fits: u64 milliseconds last 584 million years after 1970.
#[allow(clippy::cast_possible_truncation)]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The edge-worker's keep-alive rule: `max(5 s, 2 × interval)`, at most 30 s.
pub fn keep_alive(interval: Duration) -> Duration {
    (interval * 2)
        .max(Duration::from_secs(5))
        .min(Duration::from_secs(30))
}

/// A small xorshift generator (spreads ticks and picks ping targets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; a zero seed is replaced.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next pseudo-random number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

type PollFuture = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

fn poll_after(mut eventloop: EventLoop, delay: Duration) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = eventloop.poll().await;
        (eventloop, result)
    })
}

/// Everything one simulated worker needs.
pub struct WorkerParams {
    /// Identity from enrolment.
    pub ident: Identity,
    /// Metrics interval.
    pub interval: Duration,
    /// Offset of the first metrics tick (spreads the fleet over the interval).
    pub first_tick: Duration,
    /// Log send times (a sampled worker for the latency figures).
    pub sampled: Option<Arc<SentLog>>,
    /// Shared counters.
    pub stats: Arc<Stats>,
    /// Where vanish instants go.
    pub vanished: Arc<Vanished>,
    /// Bounds concurrent connection attempts.
    pub gate: Arc<Semaphore>,
    /// Orders.
    pub ctl: mpsc::UnboundedReceiver<Ctl>,
    /// Set TCP_NODELAY (the edge-worker keeps rumqttc's default: off).
    pub nodelay: bool,
}

struct Worker {
    id: String,
    secret: Secret,
    client: AsyncClient,
    seq: u64,
    cmd_window: ReplayWindow,
    interval_ms: u32,
    metrics: Metrics,
    rng: Rng,
    sampled: Option<Arc<SentLog>>,
    stats: Arc<Stats>,
    status_topic: String,
    cmd_topic: String,
    /// Where the conductor's `Stored` acknowledgements arrive.
    stored_topic: String,
    /// Highest seq a `Stored` covered so far.
    stored_upto: u64,
    birth_topic: String,
    metrics_topic: String,
    reply_topic: String,
    /// Publishes handed to the client, in order: `true` for a sealed frame.
    handed: VecDeque<bool>,
    /// pkid → is a sealed frame, awaiting PubAck.
    pkids: HashMap<u16, bool>,
    connected: bool,
}

impl Worker {
    fn unacked_frames(&self) -> usize {
        self.handed.iter().filter(|f| **f).count() + self.pkids.values().filter(|f| **f).count()
    }

    fn seal(&mut self, body: Body) -> Option<(Vec<u8>, u64, u64)> {
        self.seq += 1;
        let sent_at_ms = now_ms();
        // Like the edge-worker: format 2 once the conductor sent `Stored`.
        let version = if self.stored_upto > 0 {
            FORMAT_V2
        } else {
            FORMAT_VERSION
        };
        let env = Envelope {
            version,
            worker_id: bounded(&self.id),
            seq: self.seq,
            sent_at_ms,
            body,
        };
        protocol::seal(&self.secret, &env)
            .ok()
            .map(|b| (b, self.seq, sent_at_ms))
    }

    fn publish_frame(&mut self, topic_kind: TopicKind, body: Body, retain: bool) {
        let Some((bytes, seq, sent_at_ms)) = self.seal(body) else {
            return;
        };
        let topic = match topic_kind {
            TopicKind::Birth => self.birth_topic.clone(),
            TopicKind::Reply => self.reply_topic.clone(),
            _ => self.metrics_topic.clone(),
        };
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, bytes)
        {
            Ok(()) => {
                Stats::inc(&self.stats.handed);
                self.handed.push_back(true);
                if let Some(log) = &self.sampled {
                    if topic_kind == TopicKind::Metrics {
                        if let Ok(mut l) = log.lock() {
                            l.insert((self.id.clone(), seq), sent_at_ms);
                        }
                    }
                }
            }
            Err(_) => Stats::inc(&self.stats.queue_full),
        }
    }

    fn on_connected(&mut self) {
        Stats::inc(&self.stats.connects);
        if !self.connected {
            self.connected = true;
            self.stats.connected.fetch_add(1, Ordering::Relaxed);
        }
        self.handed.clear();
        self.pkids.clear();
        if self
            .client
            .try_publish(
                self.status_topic.clone(),
                QoS::AtLeastOnce,
                true,
                protocol::topic::STATUS_ONLINE,
            )
            .is_ok()
        {
            self.handed.push_back(false);
        }
        // Like the edge-worker: commands (QoS 1) and `Stored` (QoS 0).
        let _ = self.client.try_subscribe_many([
            SubscribeFilter::new(self.cmd_topic.clone(), QoS::AtLeastOnce),
            SubscribeFilter::new(self.stored_topic.clone(), QoS::AtMostOnce),
        ]);
        let mut birth = protocol::examples::birth();
        birth.hostname = bounded(&format!("sim-{}", self.id));
        birth.device_model = bounded("fleet_sim");
        birth.interval_ms = self.interval_ms;
        self.publish_frame(TopicKind::Birth, Body::Birth(birth), true);
    }

    fn on_disconnected(&mut self) {
        if self.connected {
            self.connected = false;
            self.stats.connected.fetch_sub(1, Ordering::Relaxed);
            Stats::inc(&self.stats.disconnects);
        } else {
            Stats::inc(&self.stats.connect_errors);
        }
        self.handed.clear();
        self.pkids.clear();
    }

    fn on_event(&mut self, result: Result<Event, ConnectionError>) -> Duration {
        match result {
            Ok(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if self.pkids.remove(&ack.pkid) == Some(true) {
                    Stats::inc(&self.stats.acked);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == self.cmd_topic || p.topic == self.stored_topic {
                    self.on_command(&p.payload);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(is_frame) = self.handed.pop_front() {
                    self.pkids.insert(pkid, is_frame);
                }
            }
            Ok(_) => {}
            Err(_) => {
                self.on_disconnected();
                return Duration::from_millis(500 + self.rng.below(1000));
            }
        }
        Duration::ZERO
    }

    fn on_command(&mut self, payload: &[u8]) {
        let env = match protocol::open(payload, &self.id).and_then(|o| o.verify(&self.secret)) {
            Ok(env) => env,
            Err(_) => return Stats::inc(&self.stats.bad_commands),
        };
        let Body::Command(cmd) = env.body else {
            return Stats::inc(&self.stats.bad_commands);
        };
        if let protocol::Action::Stored(upto) = cmd.action {
            // Outside the command seq stream, like on the edge-worker.
            if upto > self.stored_upto && upto <= self.seq {
                self.stats
                    .stored
                    .fetch_add(upto - self.stored_upto, Ordering::Relaxed);
                self.stored_upto = upto;
            }
            return;
        }
        if self.cmd_window.check(env.seq) != SeqVerdict::Fresh {
            return Stats::inc(&self.stats.bad_commands);
        }
        self.cmd_window.accept(env.seq);
        Stats::inc(&self.stats.commands);
        let (status, detail) = match cmd.action {
            protocol::Action::Ping => (ReplyStatus::Ok, "pong"),
            _ => (ReplyStatus::Unsupported, "fleet_sim answers ping only"),
        };
        let reply = Reply {
            cmd_id: cmd.id,
            status,
            detail: bounded(detail),
        };
        self.publish_frame(TopicKind::Reply, Body::Reply(reply), false);
    }

    fn on_tick(&mut self) {
        let mut m = self.metrics.clone();
        // fits: below 10 000.
        #[allow(clippy::cast_possible_truncation)]
        let cpu = self.rng.below(10_000) as u16;
        m.cpu_total = cpu;
        m.uptime_s += self.seq;
        self.publish_frame(TopicKind::Metrics, Body::Metrics(m), false);
    }
}

/// Runs one simulated worker until it is told to vanish or shut down.
pub async fn run(p: WorkerParams) {
    let WorkerParams {
        ident,
        interval,
        first_tick,
        sampled,
        stats,
        vanished,
        gate,
        mut ctl,
        nodelay,
    } = p;
    let t = |k| protocol::topic::topic(&ident.id, k);
    let mut opts = MqttOptions::new(ident.id.clone(), ident.host.clone(), ident.port);
    opts.set_keep_alive(keep_alive(interval))
        .set_clean_session(true)
        .set_inflight(20)
        .set_max_packet_size(MAX_FRAME_LEN + 1024, MAX_FRAME_LEN + 1024)
        .set_last_will(LastWill::new(
            t(TopicKind::Status),
            protocol::topic::STATUS_OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    if !ident.username.is_empty() {
        opts.set_credentials(ident.username.clone(), ident.password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(30);
    net.set_tcp_nodelay(nodelay);
    eventloop.set_network_options(net);
    let seed = ident.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut w = Worker {
        id: ident.id.clone(),
        secret: ident.secret.clone(),
        client,
        seq: 0,
        cmd_window: ReplayWindow::default(),
        interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        metrics: protocol::examples::metrics(),
        rng: Rng::new(seed),
        sampled,
        stats,
        status_topic: t(TopicKind::Status),
        cmd_topic: t(TopicKind::Cmd),
        stored_topic: t(TopicKind::Stored),
        stored_upto: 0,
        birth_topic: t(TopicKind::Birth),
        metrics_topic: t(TopicKind::Metrics),
        reply_topic: t(TopicKind::Reply),
        handed: VecDeque::new(),
        pkids: HashMap::new(),
        connected: false,
    };

    // First connect under the gate, so thousands of handshakes queue here
    // rather than time out in the broker's accept backlog.
    let permit = gate.acquire_owned().await;
    loop {
        let result = tokio::select! {
            r = eventloop.poll() => r,
            c = ctl.recv() => match c {
                Some(Ctl::StopMetrics) => continue,
                _ => return,
            },
        };
        let connected = matches!(result, Ok(Event::Incoming(Packet::ConnAck(_))));
        let delay = w.on_event(result);
        if connected {
            break;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    drop(permit);

    let mut poll = poll_after(eventloop, Duration::ZERO);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first_tick, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics_on = true;
    // Set when told to vanish: drain what is in flight first (at most 2 s).
    let mut vanish: Option<(Ctl, Instant)> = None;
    loop {
        if let Some((how, since)) = vanish {
            if w.unacked_frames() == 0 || since.elapsed() > Duration::from_secs(2) || !w.connected {
                if let Ok(mut v) = vanished.lock() {
                    v.insert(w.id.clone(), Instant::now());
                }
                if w.connected {
                    w.stats.connected.fetch_sub(1, Ordering::Relaxed);
                }
                if how == Ctl::Silent {
                    // Keep the socket (inside `poll`) open, unread, until shutdown.
                    let _hold = poll;
                    while let Some(c) = ctl.recv().await {
                        if c == Ctl::Shutdown {
                            break;
                        }
                    }
                }
                return;
            }
        }
        tokio::select! {
            (eventloop, result) = &mut poll => {
                let delay = w.on_event(result);
                poll = poll_after(eventloop, delay);
            }
            _ = tick.tick(), if metrics_on => w.on_tick(),
            c = ctl.recv() => match c {
                Some(Ctl::StopMetrics) => metrics_on = false,
                Some(how @ (Ctl::Drop | Ctl::Silent)) => {
                    metrics_on = false;
                    vanish = Some((how, Instant::now()));
                }
                Some(Ctl::Shutdown) | None => return,
            },
            // Re-check the vanish drain condition now and then.
            () = tokio::time::sleep(Duration::from_millis(20)), if vanish.is_some() => {}
        }
    }
}
