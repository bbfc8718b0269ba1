//! In-memory state shared by the MQTT task, the liveness ticker and the HTTP
//! threads.
//!
//! Invariant: the worker map mirrors the `workers` table; every change to a
//! persisted field (replay window, status, revocation, labels, cmd_seq) is
//! either written synchronously (HTTP paths) or queued to the ingest writer
//! before the in-memory value is relied upon.
//!
//! The locked parts of [`Shared`] are private ([`Locks`]) and reached through
//! its methods; every lock is an [`OrderedMutex`] and the lock order is
//! written at [`Shared`] ([`lock_order`] checks it in debug builds). Locks are
//! `std::sync` and are never held across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use protocol::{Birth, Event, Metrics, ReplayWindow, Reply, Secret};

use crate::broker::Credentials;
use crate::config::Config;
use crate::store::{ServiceStatusRow, Store, WorkerRow, WriteOp};

pub mod lock_order;

pub use lock_order::{LockLevel, OrderedGuard, OrderedMutex};

/// Events kept per worker in memory.
pub const EVENTS_KEPT: usize = 50;

/// Liveness of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// A good frame arrived within one interval (+25 %).
    Online,
    /// No good frame for more than one interval + 25 %.
    Stale,
    /// No good frame for more than three intervals, LWT seen, or never seen.
    Offline,
}

impl Status {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Stale => "stale",
            Status::Offline => "offline",
        }
    }
}

/// Frame counters (accepted, and rejected by reason).
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames accepted.
    pub accepted: AtomicU64,
    /// Rejections indexed like [`crate::frame_check::Reject::ALL`].
    pub rejected: [AtomicU64; 11],
    /// JSON mirror publishes dropped because the MQTT queue was full.
    pub mirror_dropped: AtomicU64,
}

impl Counters {
    /// Counts a rejection.
    pub fn reject(&self, reason: crate::frame_check::Reject) {
        if let Some(c) = self.rejected.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Current count for `reason`.
    pub fn rejected(&self, reason: crate::frame_check::Reject) -> u64 {
        self.rejected
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Latest accepted metrics of a worker.
#[derive(Debug, Clone)]
pub struct Latest {
    /// Conductor receive time.
    pub received_at_ms: u64,
    /// Frame seq.
    pub seq: u64,
    /// The sample.
    pub metrics: Metrics,
}

/// A worker event with its receive time.
#[derive(Debug, Clone)]
pub struct EventRec {
    /// Conductor receive time.
    pub received_at_ms: u64,
    /// The event.
    pub event: Event,
}

/// In-memory view of one worker.
#[derive(Debug)]
pub struct WorkerEntry {
    /// Worker id.
    pub id: String,
    /// Hostname (enrolment, then Birth).
    pub hostname: String,
    /// Machine id from enrolment.
    pub machine_id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Frame secret. Never logged, never mirrored. Commands and
    /// acknowledgements are sealed with it.
    pub secret: Secret,
    /// Secret rotation in flight: the next secret, sent to the worker in
    /// `Action::RotateSecret` and not yet seen in one of its frames. The
    /// first frame that verifies with it makes it [`WorkerEntry::secret`].
    pub pending_secret: Option<Secret>,
    /// The secret before the last rotation and until when (ms) frames
    /// sealed with it are still accepted (`Config::secret_grace`): the worker
    /// re-sends what it had queued before it switched.
    pub previous_secret: Option<(Secret, u64)>,
    /// Revoked: frames and logins refused.
    pub revoked: bool,
    /// Replay window (persisted by the writer after every accepted frame).
    pub replay: ReplayWindow,
    /// Liveness interval: the last Birth's `interval_ms` (or the default),
    /// or, while [`WorkerEntry::batching`], the last batch's `period_ms`
    /// (the longest it waits between two metrics frames).
    pub interval_ms: u32,
    /// Liveness status.
    pub status: Status,
    /// Monotonic time of the last good frame in this process.
    pub last_good: Option<Instant>,
    /// Wall time of the last good frame (conductor clock).
    pub last_seen_ms: Option<u64>,
    /// IP of the last enrolment.
    pub last_ip: Option<String>,
    /// Enrolment time.
    pub enrolled_at_ms: u64,
    /// Latest Birth.
    pub inventory: Option<Birth>,
    /// A Raspberry Pi's latest board frame (identity, throttling bits);
    /// `None` for any other machine.
    pub board: Option<protocol::Board>,
    /// Latest metrics.
    pub latest: Option<Latest>,
    /// Last [`EVENTS_KEPT`] events.
    pub events: VecDeque<EventRec>,
    /// Last conductor → worker seq (persisted before use).
    pub cmd_seq: u64,
    /// Frames accepted from this worker since start.
    pub accepted: u64,
    /// Frames attributed to this worker and rejected since start.
    pub rejected: u64,
    /// Set by the worker's `online` status text, cleared by its next
    /// accepted frame: while set, a replayed or too-old seq is the worker
    /// re-sending frames it had no `Stored` for, counted as `duplicate`.
    pub resending: bool,
    /// Wire format of this worker's last accepted frame, used for the
    /// frames sent to it: a worker sends format 2 only once it knows this
    /// conductor takes it, and an older worker only ever sends format 1
    /// (which is all it can read). Format 1 until a frame says otherwise.
    pub format: u8,
    /// The worker sends its metrics in `MetricsBatch` frames: set by each
    /// accepted batch, cleared by a plain `Metrics` frame that is not part
    /// of a live period ([`crate::live::in_live`]), which is what a
    /// batching agent sends once it stops batching (its acknowledgements
    /// stopped, `--batch 0`, or an older agent took its place). Only
    /// while set is it sent `Action::Live` ([`crate::live`]): an agent that
    /// never batched does not know that action. In memory only: false after
    /// a restart until its next batch.
    pub batching: bool,
    /// Conductor clock (ms): when the last `Action::Live` sent to it runs
    /// out (sent at + [`crate::live::LIVE_FOR_S`]); `None` when none was
    /// sent by this process. The worker counts from when it got the
    /// command, so its live period ends a little later than this.
    pub live_until_ms: Option<u64>,
}

/// Which of a worker's secrets a frame or request verified with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretUsed {
    /// [`WorkerEntry::secret`].
    Current,
    /// [`WorkerEntry::pending_secret`]: the worker has switched.
    Pending,
    /// [`WorkerEntry::previous_secret`], within its grace.
    Previous,
}

impl WorkerEntry {
    /// The secrets a frame or request from this worker may be sealed with
    /// at `now_ms`, current first, and which is which.
    pub fn accepted_secrets(&self, now_ms: u64) -> Vec<(&Secret, SecretUsed)> {
        let mut out = vec![(&self.secret, SecretUsed::Current)];
        if let Some(p) = &self.pending_secret {
            out.push((p, SecretUsed::Pending));
        }
        if let Some((p, until)) = &self.previous_secret {
            if now_ms <= *until {
                out.push((p, SecretUsed::Previous));
            }
        }
        out
    }

    /// After a frame verified with the pending secret: it becomes the
    /// secret, the old one is accepted for `grace_ms` more. Returns the
    /// write that persists it.
    pub fn promote_secret(&mut self, now_ms: u64, grace_ms: u64) -> Option<WriteOp> {
        let next = self.pending_secret.take()?;
        let old = std::mem::replace(&mut self.secret, next);
        let until = now_ms.saturating_add(grace_ms);
        let op = WriteOp::SecretPromoted {
            worker_id: self.id.clone(),
            secret_hex: self.secret.to_hex(),
            previous_hex: old.to_hex(),
            previous_until_ms: until,
        };
        self.previous_secret = Some((old, until));
        Some(op)
    }

    /// Builds the in-memory entry from a stored row (status starts offline:
    /// nothing has been seen by this process yet).
    pub fn from_row(row: &WorkerRow, default_interval_ms: u32) -> Option<WorkerEntry> {
        let secret = Secret::from_hex(&row.secret_hex).ok()?;
        let inventory: Option<Birth> = row
            .inventory_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok());
        let interval_ms = inventory
            .as_ref()
            .map(|b| b.interval_ms)
            .filter(|i| *i > 0)
            .unwrap_or(default_interval_ms);
        Some(WorkerEntry {
            id: row.id.clone(),
            hostname: row.hostname.clone(),
            machine_id: row.machine_id.clone(),
            labels: serde_json::from_str(&row.labels_json).unwrap_or_default(),
            secret,
            pending_secret: None,
            previous_secret: None,
            revoked: row.revoked,
            replay: ReplayWindow::new(row.replay_highest, row.replay_bitmap),
            interval_ms,
            status: Status::Offline,
            last_good: None,
            last_seen_ms: row.last_seen_ms,
            last_ip: row.last_ip.clone(),
            enrolled_at_ms: row.enrolled_at_ms,
            inventory,
            board: row
                .board_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
            latest: None,
            events: VecDeque::new(),
            cmd_seq: row.cmd_seq,
            accepted: 0,
            rejected: 0,
            resending: false,
            format: protocol::FORMAT_VERSION,
            batching: false,
            live_until_ms: None,
        })
    }
}

/// Per-IP token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    refill_per_s: f64,
    /// Tokens and last refill per IP. Level: leaf.
    buckets: OrderedMutex<HashMap<std::net::IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// `burst` attempts, one more every `refill_s` seconds; `burst == 0` disables.
    pub fn new(burst: u32, refill_s: u32) -> RateLimiter {
        RateLimiter {
            burst: f64::from(burst),
            refill_per_s: 1.0 / f64::from(refill_s.max(1)),
            buckets: OrderedMutex::new(LockLevel::Leaf, "rate_limiter", HashMap::new()),
        }
    }

    /// Takes one attempt for `ip`; `false` = over the limit.
    pub fn allow(&self, ip: std::net::IpAddr) -> bool {
        if self.burst <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut b = self.buckets.lock();
        if b.len() > 10_000 {
            // Bound memory: forget buckets that have refilled completely.
            let full = self.burst / self.refill_per_s;
            b.retain(|_, (_, t)| now.duration_since(*t).as_secs_f64() < full);
        }
        let (tokens, last) = b.entry(ip).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.refill_per_s;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What reconciliation sends to a (worker, service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// `DeployManifest` of this version.
    Deploy(u32),
    /// `InstallManifest` of this version (installed stopped, never started:
    /// the worker's desired state is `stopped`).
    Install(u32),
    /// `Remove`.
    Remove,
    /// `Stop` (a per-worker override or a deployment desired `stopped`).
    Stop,
}

/// What reconciliation last sent to a (worker, service), and when.
pub type SentMark = (Intent, Instant);

/// A failure a worker reported for a service (a `failed` / `unhealthy`
/// status, an error reply to `DeployManifest`, an `ArtifactRejected` or
/// `HealthFailed` event); rollouts read these so a failure between two
/// evaluations is not missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailMark {
    /// Version concerned (`None`: not known, e.g. from an event).
    pub version: Option<u32>,
    /// What happened (never contains secrets: state names, worker details).
    pub what: String,
    /// Conductor receive time, ms.
    pub at_ms: u64,
}

/// A `DeployManifest` or `InstallManifest` reconciliation sent, remembered
/// until its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployCmd {
    /// Service.
    pub name: String,
    /// Version.
    pub version: u32,
    /// When it was sent.
    pub at: Instant,
}

/// What a worker said about an agent self-update, for the agent rollout
/// ([`crate::agent_rollout`]): a reply to `UpdateAgent`, or an
/// `AgentUpdateFailed` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentNote {
    /// The version concerned.
    pub version: String,
    /// An `Ok` reply (an event is never ok).
    pub ok: bool,
    /// The reply's or event's detail.
    pub detail: String,
    /// Conductor receive time, ms.
    pub at_ms: u64,
}

/// Agent self-update state kept in memory: the `UpdateAgent` commands
/// awaiting a reply and what each worker last said (a leaf lock,
/// `agent_updates`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentUpdates {
    /// `UpdateAgent` commands awaiting a reply: (worker, cmd id) → version.
    pub cmds: HashMap<(String, u32), String>,
    /// The last reply to an `UpdateAgent`, per worker.
    pub replies: HashMap<String, AgentNote>,
    /// The last `AgentUpdateFailed` event, per worker.
    pub failures: HashMap<String, AgentNote>,
    /// The last `AgentUpdated` event (`<from> -> <to>`, noted as `<to>`),
    /// per worker. Only the switched agent sends it, at its first start:
    /// the new binary on trial reports the new version too, so the
    /// version alone does not say the device switched.
    pub switched: HashMap<String, AgentNote>,
}

/// Latest metrics a hosted service published, merged by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvcMetrics {
    /// Conductor receive time of the last frame, ms.
    pub received_at_ms: u64,
    /// Key → latest value (at most [`MAX_SERVICE_METRIC_KEYS`] keys).
    pub values: BTreeMap<String, i64>,
}

/// Most metric keys kept per worker and service.
pub const MAX_SERVICE_METRIC_KEYS: usize = 64;

/// Worker id → highest seq whose frame is processed and committed, not yet
/// acknowledged: raised by the ingest writer thread after each commit, taken
/// by the acknowledgement task ([`crate::ingest::run_acks`]). A leaf lock
/// (`stored_marks`, see [`Shared`]).
#[derive(Debug, Clone)]
pub struct StoredMarks(Arc<OrderedMutex<HashMap<String, u64>>>);

impl Default for StoredMarks {
    fn default() -> StoredMarks {
        StoredMarks(Arc::new(OrderedMutex::new(
            LockLevel::Leaf,
            "stored_marks",
            HashMap::new(),
        )))
    }
}

impl StoredMarks {
    /// Locks the marks (a leaf).
    pub fn lock(&self) -> OrderedGuard<'_, HashMap<String, u64>> {
        self.0.lock()
    }

    /// Takes every mark, leaving none.
    pub fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.lock())
    }
}

/// Everything the conductor's tasks share.
///
/// # Lock order
///
/// The locked state is private ([`Locks`]); each method of `Shared` that
/// returns an [`OrderedGuard`] takes one of its locks, the other methods
/// take one and release it before they return. A thread takes the locks in
/// this order, and never two leaves at once:
///
/// 1. [`Shared::workers`] ([`LockLevel::Workers`]);
/// 2. [`Shared::db`] ([`LockLevel::Db`]);
/// 3. one leaf ([`LockLevel::Leaf`]): [`Shared::pending`],
///    [`Shared::rotation_sent`], [`Shared::reject_log`],
///    [`Shared::service_status`], [`Shared::reconcile_sent`],
///    [`Shared::manifests`], [`Shared::service_failures`],
///    [`Shared::deploy_cmds`], [`Shared::log_streams`],
///    [`Shared::service_metrics`], [`Shared::agent_updates`], the [`StoredMarks`], each
///    [`RateLimiter`]'s buckets and the remote exec sessions
///    ([`crate::exec::ExecSessions`], held by the HTTP side: its methods
///    take and release it, so it is never held with another lock).
///
/// This is the order the paths that nest follow: ingest, reconciliation,
/// commands, rotation, enrolment and the worker routes hold the worker map
/// while they persist to the store or touch a leaf. So a path that needs
/// two leaves copies what it needs out of one before it takes the other
/// (`GET /services/{name}`), and one holding a leaf calls nothing that locks
/// (reconciliation reads its resend throttle and releases it before sealing
/// commands, which persist their seq in the store). Debug builds panic on a
/// violation ([`lock_order`]).
#[derive(Debug)]
pub struct Shared {
    /// Effective config.
    pub config: Config,
    /// The locks (private; see the order above).
    pub(crate) locks: Locks,
    /// Broker credential table (embedded broker only).
    pub creds: Credentials,
    /// Frame counters.
    pub counters: Counters,
    /// Queue to the ingest writer thread.
    pub writer: mpsc::Sender<WriteOp>,
    /// In-memory enrolment token (never stored).
    pub local_token: String,
    /// The external broker's URL(s) as handed to workers
    /// (`mqtt://a:1883,mqtt://b:1883`); empty with the embedded broker.
    pub external_mqtt: String,
    /// The embedded broker's plain MQTT port.
    pub mqtt_port: u16,
    /// `true` when the embedded broker runs (per-worker credentials enforced).
    pub embedded_broker: bool,
    /// The store's engine: `"sqlite"` or `"postgres"`.
    pub store_engine: &'static str,
    /// The store lease's epoch as the ingest writer fences with it (a
    /// shared PostgreSQL store; `None` with SQLite).
    pub lease: Option<crate::store::lease::Fence>,
    /// Observer login for the embedded broker.
    pub observer_password: Option<String>,
    /// The TLS material (HTTPS, MQTT over TLS); `None` with `--no-tls`.
    pub tls: Option<crate::tls::Tls>,
    /// The embedded broker's MQTT-over-TLS port (`None`: no TLS listener).
    pub mqtts_port: Option<u16>,
    /// An external broker's CA (PEM, from `--mqtt-ca`), handed to workers.
    pub mqtt_ca_pem: Option<String>,
    /// The external broker is `mqtts://`.
    pub external_tls: bool,
    /// Plain connections refused from non-loopback peers, by kind, and the
    /// last time each peer was logged (one line per peer and minute).
    pub plain_refused: Arc<crate::net::PlainRefusals>,
    /// Publishes and subscribes the embedded broker refused.
    pub mqtt_denied: crate::broker::DeniedCounters,
    /// NATS in operator mode (`--nats-account-seed`): the key every
    /// worker's login is signed with at enrolment.
    pub nats_account: Option<Arc<crate::nats_auth::FleetAccount>>,
    /// Per-worker logins and ACLs on an external Mosquitto (`--mqtt-dynsec`).
    pub dynsec: Option<crate::dynsec::DynSecHandle>,
    /// Enrolment rate limiter (per IP).
    pub enroll_limiter: RateLimiter,
    /// Login rate limiter (per IP).
    pub login_limiter: RateLimiter,
    /// Start time.
    pub started: Instant,
    /// Since when the workers' notes (service failures, agent update
    /// notes) are complete: the store keeps them since then
    /// (`store::notes`), so a rollout member sent earlier was noted only by
    /// a conductor that may be gone.
    pub notes_since_ms: u64,
    /// Wakes the reconciliation loop at once.
    pub reconcile: tokio::sync::Notify,
}

/// The locked part of [`Shared`], one [`OrderedMutex`] per map, in the lock
/// order written at [`Shared`]. Its fields are private: [`Shared`]'s methods
/// lock them.
#[derive(Debug)]
pub struct Locks {
    /// Workers by id. Level: workers (taken first).
    workers: OrderedMutex<HashMap<String, WorkerEntry>>,
    /// The connection for HTTP-side reads and low-rate writes. Level: db
    /// (after the workers).
    db: OrderedMutex<Store>,
    /// Command reply waiters, keyed by (worker id, command id). Level: leaf.
    pending: OrderedMutex<HashMap<(String, u32), mpsc::Sender<Reply>>>,
    /// When each pending secret rotation was last sent, and whether the
    /// worker was online then ([`crate::rotation`]). Level: leaf.
    rotation_sent: OrderedMutex<HashMap<String, (Instant, bool)>>,
    /// Last time a rejection of each reason was logged (rate-limits
    /// warnings). Level: leaf.
    reject_log: OrderedMutex<HashMap<&'static str, Instant>>,
    /// Last reported service states: worker id → service name → status.
    /// Level: leaf.
    service_status: OrderedMutex<HashMap<String, BTreeMap<String, ServiceStatusRow>>>,
    /// Reconciliation resend throttle: (worker, service) → what was sent
    /// and when. Level: leaf.
    reconcile_sent: OrderedMutex<HashMap<(String, String), SentMark>>,
    /// Encoded manifests by (service, version); specs and artifacts are
    /// immutable, so entries never go stale. Level: leaf.
    manifests: OrderedMutex<HashMap<(String, u32), Arc<crate::spec::BuiltManifest>>>,
    /// Last failure per (worker, service), for rollouts. Level: leaf.
    service_failures: OrderedMutex<HashMap<(String, String), FailMark>>,
    /// `DeployManifest` and `InstallManifest` commands awaiting a reply:
    /// (worker, cmd id) → what. Level: leaf.
    deploy_cmds: OrderedMutex<HashMap<(String, u32), DeployCmd>>,
    /// Highest durably processed seq per worker, raised by the ingest writer
    /// after each commit and taken by the acknowledgement task
    /// ([`crate::ingest::run_acks`]). Level: leaf.
    stored_marks: StoredMarks,
    /// Open log relays: (worker, `Logs` cmd id) → the HTTP response's feed.
    /// Level: leaf.
    log_streams: OrderedMutex<HashMap<(String, u32), mpsc::SyncSender<protocol::LogChunk>>>,
    /// Latest service metrics: worker id → service → values. Level: leaf.
    service_metrics: OrderedMutex<HashMap<String, BTreeMap<String, SvcMetrics>>>,
    /// Agent self-update commands and what workers said about them. Level: leaf.
    agent_updates: OrderedMutex<AgentUpdates>,
}

impl Locks {
    /// The locks, holding the loaded workers and service states, the store
    /// connection and the marks shared with the ingest writer; the other
    /// maps start empty.
    pub fn new(
        db: Store,
        workers: HashMap<String, WorkerEntry>,
        service_status: HashMap<String, BTreeMap<String, ServiceStatusRow>>,
        stored_marks: StoredMarks,
    ) -> Locks {
        use LockLevel::Leaf;
        Locks {
            workers: OrderedMutex::new(LockLevel::Workers, "workers", workers),
            db: OrderedMutex::new(LockLevel::Db, "db", db),
            pending: OrderedMutex::new(Leaf, "pending", HashMap::new()),
            rotation_sent: OrderedMutex::new(Leaf, "rotation_sent", HashMap::new()),
            reject_log: OrderedMutex::new(Leaf, "reject_log", HashMap::new()),
            service_status: OrderedMutex::new(Leaf, "service_status", service_status),
            reconcile_sent: OrderedMutex::new(Leaf, "reconcile_sent", HashMap::new()),
            manifests: OrderedMutex::new(Leaf, "manifests", HashMap::new()),
            service_failures: OrderedMutex::new(Leaf, "service_failures", HashMap::new()),
            deploy_cmds: OrderedMutex::new(Leaf, "deploy_cmds", HashMap::new()),
            stored_marks,
            log_streams: OrderedMutex::new(Leaf, "log_streams", HashMap::new()),
            service_metrics: OrderedMutex::new(Leaf, "service_metrics", HashMap::new()),
            agent_updates: OrderedMutex::new(Leaf, "agent_updates", AgentUpdates::default()),
        }
    }
}

impl Shared {
    /// Workers by id ([`LockLevel::Workers`]: taken before any other lock).
    pub fn workers(&self) -> OrderedGuard<'_, HashMap<String, WorkerEntry>> {
        self.locks.workers.lock()
    }

    /// The store connection for HTTP-side reads and low-rate writes
    /// ([`LockLevel::Db`]: after the workers, before any leaf).
    pub fn db(&self) -> OrderedGuard<'_, Store> {
        self.locks.db.lock()
    }

    /// Command reply waiters by (worker id, command id) (a leaf).
    pub fn pending(&self) -> OrderedGuard<'_, HashMap<(String, u32), mpsc::Sender<Reply>>> {
        self.locks.pending.lock()
    }

    /// When each pending secret rotation was last sent, and whether the
    /// worker was online then (a leaf).
    pub fn rotation_sent(&self) -> OrderedGuard<'_, HashMap<String, (Instant, bool)>> {
        self.locks.rotation_sent.lock()
    }

    /// Last time a rejection of each reason was logged (a leaf).
    pub fn reject_log(&self) -> OrderedGuard<'_, HashMap<&'static str, Instant>> {
        self.locks.reject_log.lock()
    }

    /// Last reported service states: worker id → service → status (a leaf).
    pub fn service_status(
        &self,
    ) -> OrderedGuard<'_, HashMap<String, BTreeMap<String, ServiceStatusRow>>> {
        self.locks.service_status.lock()
    }

    /// Reconciliation resend throttle: (worker, service) → what was sent
    /// and when (a leaf).
    pub fn reconcile_sent(&self) -> OrderedGuard<'_, HashMap<(String, String), SentMark>> {
        self.locks.reconcile_sent.lock()
    }

    /// Encoded manifests by (service, version) (a leaf).
    pub fn manifests(
        &self,
    ) -> OrderedGuard<'_, HashMap<(String, u32), Arc<crate::spec::BuiltManifest>>> {
        self.locks.manifests.lock()
    }

    /// Last failure per (worker, service), for rollouts (a leaf).
    pub fn service_failures(&self) -> OrderedGuard<'_, HashMap<(String, String), FailMark>> {
        self.locks.service_failures.lock()
    }

    /// `DeployManifest` and `InstallManifest` commands awaiting a reply
    /// (a leaf).
    pub fn deploy_cmds(&self) -> OrderedGuard<'_, HashMap<(String, u32), DeployCmd>> {
        self.locks.deploy_cmds.lock()
    }

    /// Open log relays: (worker, `Logs` cmd id) → the response's feed (a leaf).
    pub fn log_streams(
        &self,
    ) -> OrderedGuard<'_, HashMap<(String, u32), mpsc::SyncSender<protocol::LogChunk>>> {
        self.locks.log_streams.lock()
    }

    /// Latest service metrics: worker id → service → values (a leaf).
    pub fn service_metrics(
        &self,
    ) -> OrderedGuard<'_, HashMap<String, BTreeMap<String, SvcMetrics>>> {
        self.locks.service_metrics.lock()
    }

    /// Agent self-update commands awaiting a reply and what each worker
    /// last said about an update (a leaf).
    pub fn agent_updates(&self) -> OrderedGuard<'_, AgentUpdates> {
        self.locks.agent_updates.lock()
    }

    /// Takes the stored marks raised since the last call (locks them, a leaf).
    pub fn take_stored_marks(&self) -> HashMap<String, u64> {
        self.locks.stored_marks.take()
    }

    /// `true` when worker `id` exists (locks the workers).
    pub fn has_worker(&self, id: &str) -> bool {
        self.workers().contains_key(id)
    }

    /// Removes and returns the waiter for `worker_id`'s reply to `cmd_id`
    /// (locks the waiters, a leaf).
    pub fn take_waiter(&self, worker_id: &str, cmd_id: u32) -> Option<mpsc::Sender<Reply>> {
        self.pending().remove(&(worker_id.to_string(), cmd_id))
    }
}

/// Shared handle.
pub type SharedRef = Arc<Shared>;

/// Milliseconds since the Unix epoch on the conductor's clock.
// fits: u64 milliseconds last 584 million years after 1970.
#[allow(clippy::cast_possible_truncation)]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A worker entry for tests (offline, never seen), here and in other
/// modules' tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a fixed, valid row
pub(crate) fn test_entry() -> WorkerEntry {
    let row = WorkerRow {
        id: "w-1".into(),
        machine_id: String::new(),
        hostname: "pi".into(),
        secret_hex: Secret::from_bytes([1; 32]).to_hex(),
        mqtt_password_sha256: String::new(),
        labels_json: "{}".into(),
        inventory_json: None,
        board_json: None,
        enrolled_at_ms: 0,
        last_seen_ms: None,
        last_ip: None,
        revoked: false,
        replay_highest: 0,
        replay_bitmap: 0,
        cmd_seq: 0,
        status: "offline".into(),
    };
    WorkerEntry::from_row(&row, 10_000).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> WorkerEntry {
        test_entry()
    }

    #[test]
    fn a_rotation_accepts_the_next_secret_then_the_old_one_only_within_its_grace() {
        let (one, two) = (Secret::from_bytes([1; 32]), Secret::from_bytes([2; 32]));
        let mut w = entry();
        let used = |w: &WorkerEntry, now| -> Vec<SecretUsed> {
            w.accepted_secrets(now).iter().map(|(_, u)| *u).collect()
        };
        assert_eq!(used(&w, 0), [SecretUsed::Current]);
        assert!(w.promote_secret(0, 1000).is_none(), "nothing pending");
        w.pending_secret = Some(two.clone());
        assert_eq!(used(&w, 0), [SecretUsed::Current, SecretUsed::Pending]);
        let op = w.promote_secret(5_000, 1000).expect("promoted");
        assert!(matches!(
            op,
            WriteOp::SecretPromoted { previous_until_ms: 6_000, ref secret_hex, .. } if *secret_hex == two.to_hex()
        ));
        assert_eq!(w.secret, two);
        assert!(w.pending_secret.is_none());
        assert_eq!(used(&w, 6_000), [SecretUsed::Current, SecretUsed::Previous]);
        assert_eq!(w.accepted_secrets(6_000)[1].0, &one);
        assert_eq!(used(&w, 6_001), [SecretUsed::Current], "grace over");
    }
}
