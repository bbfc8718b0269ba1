//! Frame verification and the batched store writer.
//!
//! [`handle_publish`] is called for every MQTT publish the conductor
//! receives. A frame is accepted only after, in order: size limit, structure
//! (`protocol::open`: version, postcard, trailing bytes), the worker is known
//! and not revoked, the envelope's worker id equals the topic's, the body kind
//! matches the topic, the HMAC tag verifies with that worker's secret, and the
//! replay window says the seq is fresh. Any failure increments exactly one
//! counter (see [`Reject`]) and changes no state. The checks are one pure
//! function ([`check`]), which the fuzzer runs too.
//!
//! Accepted frames are stamped with the conductor's receive time (device
//! clocks are never trusted). Persistence goes through [`Writer`], a thread
//! owning its own connection that commits every ≤ 100 ms or 500 writes; the
//! replay window and last-seen are persisted in the same transaction as the
//! metrics they accompany.
//!
//! No frame is lost by a crash: a worker keeps every frame in its outbox
//! until this conductor acknowledges it with `Action::Stored(n)` ("every
//! frame of yours with seq ≤ n is processed and committed"), not merely
//! until the broker's PubAck (with the embedded broker, that PubAck dies
//! with the process). After each commit the writer raises the worker's mark
//! to the highest seq of the replay window it committed — a frame's writes
//! are queued before its window, so everything up to it is in SQLite, and
//! frames handled without storing (replies, log chunks, service metrics,
//! events) were handled before their window was queued. [`run_acks`] sends
//! each worker with a raised mark at most one `Stored` per [`ACK_INTERVAL`]
//! (on its own phase, checked every [`ACK_TICK`]), QoS 0,
//! on its `cmd/stored` topic; revoked workers get none. Its `Command::id`
//! is [`protocol::STORED_ACCEPTS_BATCH`] (it was 0 before batches; older
//! agents ignore it): this conductor reads `MetricsBatch` frames, so a
//! worker that sees it may send them. Frames accepted but
//! not committed by a crash are not acknowledged: the worker publishes them
//! again after it reconnects, and the restarted conductor (whose window is
//! the committed one) accepts them. Re-sent frames it had committed are
//! refused as `duplicate` when they arrive after the worker's `online`
//! status and before its next fresh frame, `replayed`/`too_old` otherwise.
//! With the embedded broker, worker logins are enabled only once the
//! conductor's subscription is in place (see `lib.rs`), so no frame is
//! PubAcked to nobody at start-up. Not covered: a broker that loses what it
//! queued for the conductor (an external broker killed without
//! persistence) while the conductor goes on acknowledging later frames.
//!
//! A `MetricsBatch` (the samples of a batch period in one frame,
//! [`protocol::batch`]) is stored as its samples would have been one
//! `Metrics` frame each: a raw row and a minute rollup per sample, under
//! seqs `seq - n + 1 ..= seq` and dated back from the receive time by its
//! `age_ms` and `interval_ms`; the newest sample is the worker's latest
//! (API, alerts, `/metrics`) and its `json/metrics` mirror (so Home
//! Assistant's). Its `period_ms` becomes the worker's liveness interval and
//! the worker is marked batching, so it is sent `Action::Live` while someone
//! looks at it ([`crate::live`]); a plain `Metrics` frame outside a live
//! period clears that and puts its Birth's interval back. An unreadable
//! batch is refused as `malformed` before anything changes.
//!
//! Accepted `ServiceStatus` frames update [`crate::state::Shared::service_status`]
//! and are persisted by the writer (`Removed` deletes the row); an accepted
//! Birth clears the worker's reported services and wakes reconciliation
//! (see [`crate::services`]). A `failed`/`unhealthy` status, an error reply
//! to a `DeployManifest` and `ArtifactRejected`/`HealthFailed` events are
//! recorded as failures for rollouts; a reply to an `UpdateAgent` and an
//! `AgentUpdateFailed` event are noted for the agent rollout
//! ([`crate::agent_rollout`]). `LogChunk` frames are handed to the
//! HTTP log relay waiting for their command id (dropped when none waits or
//! it is full); `ServiceMetrics` update the latest values per worker and
//! service (at most 64 keys each), kept in memory only.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::frame_check::{check, Reject, Sender};

use protocol::topic::{Topic, TopicKind};
use protocol::{Body, Envelope, Metrics};
use rumqttc::{AsyncClient, QoS};
use tracing::{debug, info, warn};

use crate::state::{now_ms, EventRec, Latest, Shared, Status, StoredMarks, EVENTS_KEPT};
use crate::store::{Rollup, Store, StoreError, WriteOp};

/// How long a batch is retried while the database is unavailable
/// (see [`commit`]): a PostgreSQL restart or failover takes seconds; past
/// this the batch is dropped as for any other failure.
pub const UNAVAILABLE_RETRY_FOR: Duration = Duration::from_secs(300);
/// Most writes per transaction.
pub const BATCH_MAX: usize = 500;
/// Longest a write waits before commit.
pub const BATCH_DELAY: Duration = Duration::from_millis(100);
/// Retention sweep period.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often a worker with newly stored frames is sent `Action::Stored`.
/// Long enough that a worker sending every 10 s gets at most one
/// acknowledgement per frame (10,000 workers: ≤ 1,000 small QoS 0
/// publishes a second, as many as the frames they answer), short enough
/// that the outbox holds only a few seconds of frames and empties well
/// within the worker's 30 s persistence interval (so a healthy link never
/// writes `outbox.bin`) and within its `STORED_TIMEOUT` (10 s).
pub const ACK_INTERVAL: Duration = Duration::from_secs(2);
/// How often [`run_acks`] looks for workers due an acknowledgement: a
/// worker's first one follows its commit within this, and a fleet's
/// acknowledgements are spread over [`ACK_INTERVAL`] in slices this long.
pub const ACK_TICK: Duration = Duration::from_millis(100);

/// Handles one publish (any topic under the conductor filter).
pub fn handle_publish(shared: &Shared, client: &AsyncClient, topic: &str, payload: &[u8]) {
    let Some(t) = Topic::parse(topic) else {
        return;
    };
    match t.kind {
        TopicKind::Status => {
            if payload == protocol::topic::STATUS_OFFLINE.as_bytes() {
                mark_offline(shared, t.worker_id);
            } else if payload == protocol::topic::STATUS_ONLINE.as_bytes() {
                // Unauthenticated text: it never makes a worker online (only
                // a good frame does); it only opens the re-send run in which
                // replays are counted as `duplicate` (see `resending`).
                if let Some(w) = shared.workers().get_mut(t.worker_id) {
                    w.resending = true;
                }
            }
        }
        TopicKind::Cmd | TopicKind::Stored | TopicKind::JsonBirth | TopicKind::JsonMetrics => {}
        kind => {
            let _span = tracing::debug_span!("frame", worker_id = t.worker_id).entered();
            if let Err(reason) = ingest_frame(shared, client, t.worker_id, kind, payload) {
                shared.counters.reject(reason);
                log_rejection(shared, t.worker_id, reason);
            }
        }
    }
}

fn mark_offline(shared: &Shared, worker_id: &str) {
    let mut workers = shared.workers();
    if let Some(w) = workers.get_mut(worker_id) {
        if w.status != Status::Offline {
            info!(worker_id, "worker offline (last will)");
            w.status = Status::Offline;
            let _ = shared.writer.send(WriteOp::Status {
                worker_id: worker_id.to_string(),
                status: Status::Offline.as_str(),
            });
        }
    }
}

fn log_rejection(shared: &Shared, worker_id: &str, reject: Reject) {
    let reason = reject.as_str();
    let now = Instant::now();
    let mut last = shared.reject_log();
    let due = last
        .get(reason)
        .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(10));
    if due {
        last.insert(reason, now);
        warn!(
            worker_id,
            reason,
            total = shared.counters.rejected(reject),
            "frame rejected (further rejections for this reason are logged at debug for 10 s)"
        );
    } else {
        debug!(worker_id, reason, "frame rejected");
    }
}

fn ingest_frame(
    shared: &Shared,
    client: &AsyncClient,
    topic_worker: &str,
    kind: TopicKind,
    payload: &[u8],
) -> Result<(), Reject> {
    let received_at_ms = now_ms();
    let mut workers = shared.workers();
    let checked = match workers.get(topic_worker) {
        None => check(payload, topic_worker, kind, None).map(|(env, _)| (env, None)),
        Some(w) => {
            let secrets = w.accepted_secrets(received_at_ms);
            let keys: Vec<&protocol::Secret> = secrets.iter().map(|(s, _)| *s).collect();
            let sender = Sender {
                secrets: &keys,
                revoked: w.revoked,
                replay: &w.replay,
                resending: w.resending,
            };
            check(payload, topic_worker, kind, Some(&sender))
                .map(|(env, which)| (env, secrets.get(which).map(|(_, u)| *u)))
        }
    };
    let Some(w) = workers.get_mut(topic_worker) else {
        return checked.map(|_| ());
    };
    let (env, used) = match checked {
        Ok(r) => r,
        Err(reason) => {
            w.rejected += 1;
            return Err(reason);
        }
    };
    // A batch's samples, oldest first (`check` has read them already: this
    // cannot fail, but if it did, nothing has changed yet).
    let samples = match &env.body {
        Body::MetricsBatch(b) => match b.decode() {
            Ok(samples) if !samples.is_empty() => Some(samples),
            _ => {
                w.rejected += 1;
                return Err(Reject::Malformed);
            }
        },
        _ => None,
    };

    // Accept.
    if used == Some(crate::state::SecretUsed::Pending) {
        // The worker switched to its rotated secret: so does the conductor.
        if let Some(op) = w.promote_secret(received_at_ms, shared.config.secret_grace_ms()) {
            info!(worker_id = %w.id, "worker secret rotated (first frame under the new one)");
            let _ = shared.writer.send(op);
        }
    }
    w.replay.accept(env.seq);
    w.resending = false;
    w.format = env.version;
    w.accepted += 1;
    w.last_good = Some(Instant::now());
    w.last_seen_ms = Some(received_at_ms);
    shared
        .counters
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if w.status != Status::Online {
        info!(worker_id = %w.id, from = w.status.as_str(), "worker online");
        w.status = Status::Online;
        let _ = shared.writer.send(WriteOp::Status {
            worker_id: w.id.clone(),
            status: Status::Online.as_str(),
        });
    }
    let worker_id = w.id.clone();
    let mirror = match (&env.body, samples.as_deref()) {
        // A batch mirrors its newest sample, dated as stored.
        (Body::MetricsBatch(b), Some([.., newest])) => crate::mirror::payload(
            &worker_id,
            env.seq,
            received_at_ms.saturating_sub(u64::from(b.age_ms)),
            &Body::Metrics(newest.clone()),
        ),
        (body, _) => crate::mirror::payload(&worker_id, env.seq, received_at_ms, body),
    };
    let mut reconcile_now = false;
    let mut announce = false;
    match env.body {
        Body::Birth(birth) => {
            if birth.interval_ms >= 50 {
                w.interval_ms = birth.interval_ms;
            }
            if !birth.hostname.is_empty() {
                w.hostname = birth.hostname.to_string();
            }
            if let Ok(j) = serde_json::to_string(&birth) {
                let _ = shared.writer.send(WriteOp::Inventory {
                    worker_id: worker_id.clone(),
                    json: j,
                });
            }
            debug!(worker_id = %worker_id, interval_ms = birth.interval_ms, "birth");
            w.inventory = Some(birth);
            announce = true;
            crate::services::new_session(shared, &worker_id);
            reconcile_now = true;
        }
        Body::Metrics(m) => {
            if let Ok(blob) = postcard::to_stdvec(&m) {
                let _ = shared.writer.send(WriteOp::Metrics {
                    worker_id: worker_id.clone(),
                    received_at_ms,
                    seq: env.seq,
                    blob,
                    rollup: rollup(&m),
                });
            }
            w.latest = Some(Latest {
                received_at_ms,
                seq: env.seq,
                metrics: m,
            });
            if w.batching && !crate::live::in_live(w, received_at_ms) {
                // Plain metrics outside a live period: it stopped batching.
                info!(worker_id = %worker_id, "worker no longer batches its metrics");
                w.batching = false;
                w.interval_ms = w
                    .inventory
                    .as_ref()
                    .map(|b| b.interval_ms)
                    .filter(|i| *i >= 50)
                    .unwrap_or(shared.config.default_interval_ms);
            }
        }
        Body::MetricsBatch(b) => {
            store_batch(
                shared,
                w,
                env.seq,
                received_at_ms,
                &b,
                samples.unwrap_or_default(),
            );
        }
        Body::Event(ev) => {
            info!(worker_id = %worker_id, kind = ?ev.kind, detail = %ev.detail, "worker event");
            if matches!(
                ev.kind,
                protocol::EventKind::ArtifactRejected | protocol::EventKind::HealthFailed
            ) {
                if let Some((name, what)) = ev.detail.split_once(':') {
                    crate::services::record_failure(
                        shared,
                        &worker_id,
                        name.trim(),
                        None,
                        format!("{:?}:{what}", ev.kind),
                    );
                    reconcile_now = true;
                }
            }
            if crate::agent_rollout::note_event(shared, &worker_id, &ev) {
                reconcile_now = true;
            }
            if w.events.len() >= EVENTS_KEPT {
                w.events.pop_front();
            }
            w.events.push_back(EventRec {
                received_at_ms,
                event: ev,
            });
        }
        Body::Reply(reply) => {
            debug!(worker_id = %worker_id, cmd_id = reply.cmd_id, status = ?reply.status, "command reply");
            let waiter = shared.take_waiter(&worker_id, reply.cmd_id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(reply);
                }
                None => {
                    if !crate::agent_rollout::note_reply(shared, &worker_id, &reply) {
                        crate::services::deploy_reply(shared, &worker_id, &reply);
                    }
                }
            }
        }
        // Unreachable: a Command on a worker topic fails the kind check above.
        Body::Command(_) => {}
        Body::ServiceStatus(st) => {
            debug!(worker_id = %worker_id, service = %st.name, state = ?st.state, "service status");
            crate::services::record_status(shared, &worker_id, &st);
        }
        Body::LogChunk(chunk) => {
            debug!(worker_id = %worker_id, service = %chunk.name, index = chunk.index, "log chunk");
            let key = (worker_id.clone(), chunk.cmd_id);
            let mut streams = shared.log_streams();
            if let Some(tx) = streams.get(&key) {
                // Never block ingest: a relay that cannot keep up loses
                // chunks (the reader marks the gap from the index).
                if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = tx.try_send(chunk) {
                    streams.remove(&key);
                }
            }
        }
        Body::Board(board) => {
            debug!(worker_id = %worker_id, throttled = ?board.throttled, "board");
            if w.board.as_ref() != Some(&board) {
                if let Ok(json) = serde_json::to_string(&board) {
                    let _ = shared.writer.send(WriteOp::Board {
                        worker_id: worker_id.clone(),
                        json,
                    });
                }
                w.board = Some(board);
                announce = true;
            }
        }
        Body::ServiceMetrics(sm) => {
            debug!(worker_id = %worker_id, service = %sm.name, samples = sm.samples.len(), "service metrics");
            let mut all = shared.service_metrics();
            let entry = all
                .entry(worker_id.clone())
                .or_default()
                .entry(sm.name.to_string())
                .or_default();
            entry.received_at_ms = received_at_ms;
            for s in &sm.samples {
                if entry.values.len() < crate::state::MAX_SERVICE_METRIC_KEYS
                    || entry.values.contains_key(s.key.as_str())
                {
                    entry.values.insert(s.key.to_string(), s.value);
                }
            }
        }
    }
    let _ = shared.writer.send(WriteOp::Seen {
        worker_id: worker_id.clone(),
        highest: w.replay.highest,
        bitmap: w.replay.bitmap,
        last_seen_ms: received_at_ms,
    });
    let discovery = announce
        .then(|| crate::homeassistant::configs_for(shared, w))
        .flatten();
    drop(workers);
    if reconcile_now {
        shared.reconcile.notify_one();
    }
    if let Some((kind, value)) = mirror {
        let topic = protocol::topic::topic(&worker_id, kind);
        if client
            .try_publish(topic, QoS::AtMostOnce, true, value.to_string())
            .is_err()
        {
            shared
                .counters
                .mirror_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    crate::homeassistant::publish(shared, client, discovery);
    Ok(())
}

/// Stores the `samples` of batch `b` (sealed with seq `seq`, received at
/// `received_at_ms`) as that many metrics frames would be: one
/// [`WriteOp::Metrics`] per sample, oldest first, sample `i` of `n` under
/// seq `seq - (n-1-i)` dated `received_at_ms - age_ms - (n-1-i) *
/// interval_ms` ([`protocol::batch`]); the newest becomes `w.latest`. The
/// worker is marked [`crate::state::WorkerEntry::batching`] and its
/// liveness clock becomes the batch period.
fn store_batch(
    shared: &Shared,
    w: &mut crate::state::WorkerEntry,
    seq: u64,
    received_at_ms: u64,
    b: &protocol::MetricsBatch,
    samples: Vec<Metrics>,
) {
    let newest_at = received_at_ms.saturating_sub(u64::from(b.age_ms));
    let n = u64::try_from(samples.len()).unwrap_or(u64::MAX);
    let mut newest = None;
    for (i, m) in (0u64..).zip(samples) {
        let back = n - 1 - i;
        let at = newest_at.saturating_sub(back.saturating_mul(u64::from(b.interval_ms)));
        if let Ok(blob) = postcard::to_stdvec(&m) {
            let _ = shared.writer.send(WriteOp::Metrics {
                worker_id: w.id.clone(),
                received_at_ms: at,
                seq: seq.saturating_sub(back),
                blob,
                rollup: rollup(&m),
            });
        }
        newest = Some(m);
    }
    if let Some(metrics) = newest {
        w.latest = Some(Latest {
            received_at_ms: newest_at,
            seq,
            metrics,
        });
    }
    if !w.batching {
        info!(worker_id = %w.id, period_ms = b.period_ms, "worker batches its metrics");
    }
    w.batching = true;
    if b.period_ms >= 50 {
        w.interval_ms = b.period_ms;
    }
    debug!(worker_id = %w.id, samples = n, period_ms = b.period_ms, "metrics batch");
}

/// Rollup input for one sample.
pub fn rollup(m: &Metrics) -> Rollup {
    Rollup {
        cpu: u64::from(m.cpu_total),
        mem_used: m.memory_used,
        mem_total: m.memory_total,
        load1: u64::from(m.load[0]),
        temp_max: m
            .temperatures
            .iter()
            .map(|t| i64::from(t.millicelsius))
            .max(),
        disk_used: m.disks.iter().map(|d| d.used).fold(0, u64::saturating_add),
        disk_total: m.disks.iter().map(|d| d.total).fold(0, u64::saturating_add),
        rx_bps: m.net.iter().map(|n| n.rx_bps).fold(0, u64::saturating_add),
        tx_bps: m.net.iter().map(|n| n.tx_bps).fold(0, u64::saturating_add),
    }
}

/// The ingest writer thread.
#[derive(Debug)]
pub struct Writer {
    handle: JoinHandle<()>,
}

impl Writer {
    /// Starts the writer on its own connection; it stops (after a final
    /// commit) when every sender is dropped.
    /// After every successful commit it raises `marks` to the highest seq
    /// per worker whose window it committed (see [`run_acks`]).
    /// After every batch it is done with, it sets `received` to the
    /// highest [`WriteOp::Received`] mark in it: the MQTT loop may then
    /// PubAck those publishes ([`crate::subscriber::run_loop`]). Not after
    /// a batch dropped because the lease is lost: the broker keeps those
    /// publishes for the successor.
    pub fn spawn(
        store: Store,
        rx: mpsc::Receiver<WriteOp>,
        marks: StoredMarks,
        received: tokio::sync::watch::Sender<u64>,
        retention: (u64, u64),
    ) -> std::io::Result<Writer> {
        let handle = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || writer_loop(store, rx, &marks, &received, retention))?;
        Ok(Writer { handle })
    }

    /// Waits for the writer to flush and exit (all senders must be dropped).
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

fn writer_loop(
    mut store: Store,
    rx: mpsc::Receiver<WriteOp>,
    marks: &StoredMarks,
    received: &tokio::sync::watch::Sender<u64>,
    (raw_retention_ms, minute_retention_ms): (u64, u64),
) {
    let mut batch: Vec<WriteOp> = Vec::with_capacity(BATCH_MAX);
    let mut last_sweep = Instant::now();
    let mut first_at: Option<Instant> = None;
    // The batch holds a `Received` mark; the queue was empty at the last drain.
    let (mut marked, mut idle) = (false, false);
    sweep(&mut store, raw_retention_ms, minute_retention_ms);
    loop {
        let timeout = match first_at {
            Some(t) => BATCH_DELAY.saturating_sub(t.elapsed()),
            None => Duration::from_millis(500),
        };
        let disconnected = match rx.recv_timeout(timeout) {
            Ok(op) => {
                if batch.is_empty() {
                    first_at = Some(Instant::now());
                }
                marked |= matches!(op, WriteOp::Received(_));
                batch.push(op);
                // Drain what is already queued without waiting.
                idle = false;
                while batch.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(op) => {
                            marked |= matches!(op, WriteOp::Received(_));
                            batch.push(op);
                        }
                        Err(_) => {
                            idle = true;
                            break;
                        }
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        // Publishes waiting for their PubAck (an external broker) are
        // committed as soon as nothing more is queued, not after
        // BATCH_DELAY: the broker holds back what follows them once its
        // in-flight window (Mosquitto: 20 by default) is full. Under load
        // the batch still grows while the previous commit runs.
        let due = first_at.is_some_and(|t| t.elapsed() >= BATCH_DELAY) || (marked && idle);
        if !batch.is_empty() && (due || batch.len() >= BATCH_MAX || disconnected) {
            // A frame's metrics row must commit with its `Seen` (sent right
            // after it): split, a crash would leave the row without the
            // window, the worker (never sent `Stored` for it) would publish
            // the frame again, and the restarted conductor would store it
            // twice. The tail after the last `Seen` waits for the next batch.
            let keep = if disconnected {
                0
            } else {
                unsealed_tail(&batch)
            };
            let carried = batch.split_off(batch.len() - keep);
            let mark = batch
                .iter()
                .filter_map(|op| match op {
                    WriteOp::Received(n) => Some(*n),
                    _ => None,
                })
                .max();
            if !batch.is_empty() && commit(&mut store, &batch) {
                raise_marks(marks, &mut batch);
            }
            // Committed, or dropped for good (logged): the broker may let
            // those publishes go. Not when the lease is lost.
            if let Some(n) = mark.filter(|_| !store.fence_stopped()) {
                received.send_if_modified(|m| {
                    let raise = n > *m;
                    *m = (*m).max(n);
                    raise
                });
            }
            batch.clear();
            batch.extend(carried);
            marked = batch.iter().any(|op| matches!(op, WriteOp::Received(_)));
            first_at = (!batch.is_empty()).then(Instant::now);
        }
        if disconnected {
            break;
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            sweep(&mut store, raw_retention_ms, minute_retention_ms);
        }
    }
}

/// How many ops at the end of `batch` must wait for the next commit: those
/// after the last `Seen` when they hold a metrics row (its frame's `Seen`
/// has not arrived yet), else none.
fn unsealed_tail(batch: &[WriteOp]) -> usize {
    let start = batch
        .iter()
        .rposition(|op| matches!(op, WriteOp::Seen { .. }))
        .map_or(0, |i| i + 1);
    if batch[start..]
        .iter()
        .any(|op| matches!(op, WriteOp::Metrics { .. }))
    {
        batch.len() - start
    } else {
        0
    }
}

/// Commits `batch`; `false` when it was dropped. A failure is retried 3
/// times; one for want of the database (PostgreSQL down or restarting,
/// SQLite busy: [`StoreError::is_unavailable`]) for up to
/// [`UNAVAILABLE_RETRY_FOR`], backing off to one attempt a second. The
/// batch is held meanwhile (and what arrives queues behind it), so a
/// database restart loses nothing; dropping it instead would let the next
/// commit's marks acknowledge its frames to their workers unstored.
fn commit(store: &mut Store, batch: &[WriteOp]) -> bool {
    let started = Instant::now();
    let mut attempt: u32 = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        if store.fence_stopped() {
            warn!(
                writes = batch.len(),
                "dropping a batch: this conductor lost the store lease and stops"
            );
            return false;
        }
        match store.apply_batch(batch) {
            Ok(()) => {
                if last_log.is_some() {
                    info!(
                        writes = batch.len(),
                        "store back: batch committed after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                return true;
            }
            Err(e) if attempt < 3 => {
                attempt += 1;
                warn!("batch commit failed (retrying): {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.is_unavailable() && started.elapsed() < UNAVAILABLE_RETRY_FOR => {
                attempt += 1;
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    warn!(
                        writes = batch.len(),
                        "store unavailable, holding the batch and retrying: {e}"
                    );
                    last_log = Some(Instant::now());
                }
                let backoff = 50_u64.saturating_mul(1 << (attempt - 3).min(5));
                std::thread::sleep(Duration::from_millis(backoff.min(1_000)));
            }
            Err(e) => {
                log_store_error(&e, batch.len());
                return false;
            }
        }
    }
}

/// After a successful commit of `batch`: every worker whose replay window
/// it committed has every frame up to that window's highest seq processed
/// (a frame's writes are queued before its window, in order) and stored.
/// Drains the `Seen` ops' worker ids into `marks`.
fn raise_marks(marks: &StoredMarks, batch: &mut Vec<WriteOp>) {
    let mut marks = marks.lock();
    for op in batch.drain(..) {
        if let WriteOp::Seen {
            worker_id, highest, ..
        } = op
        {
            let m = marks.entry(worker_id).or_insert(0);
            *m = (*m).max(highest);
        }
    }
}

/// Sends each worker with new durably processed frames one
/// `Action::Stored(highest)` per [`ACK_INTERVAL`], until `stop` turns true.
///
/// QoS 0: an acknowledgement is cumulative, so a lost one (the worker's
/// connection dropped; a live TCP connection does not lose it) is made good
/// by the next, and the worker publishes again whatever it has no `Stored`
/// for after a reconnect. QoS 1 would add a PubAck per ack and count against
/// the conductor's in-flight window (10,000 workers ⇒ thousands per tick)
/// for nothing the worker needs. Revoked workers get none. They go to the
/// worker's `cmd/stored` topic ([`TopicKind::Stored`]): outside the
/// conductor's own filter, so they do not come back to it, and agents older
/// than `Stored` do not subscribe to it. The seal happens under the worker lock, the publishes after it, yielding
/// to the MQTT loop between them so a burst never starves ingest.
pub async fn run_acks(
    shared: std::sync::Arc<Shared>,
    client: AsyncClient,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Every ACK_TICK (not every ACK_INTERVAL): each worker is acknowledged
    // on its own phase (when its frames commit, then at most every
    // ACK_INTERVAL), so the acknowledgements of a fleet whose frames are
    // spread over the interval are spread too, instead of one burst of
    // thousands that held up ingest behind it (fleet_sim, 5,000 workers at
    // 1 s: ingest p99 104 -> 13 ms, command p99 160 -> 24 ms).
    let mut tick = tokio::time::interval(ACK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: HashMap<String, u64> = HashMap::new();
    let mut last_sent: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        for (id, stored) in shared.take_stored_marks() {
            let m = pending.entry(id).or_insert(0);
            *m = (*m).max(stored);
        }
        let now = Instant::now();
        let mut due: HashMap<String, u64> = HashMap::new();
        pending.retain(|id, stored| {
            let is_due = last_sent
                .get(id)
                .is_none_or(|t| now.duration_since(*t) >= ACK_INTERVAL);
            if is_due {
                due.insert(id.clone(), *stored);
            }
            !is_due
        });
        // Forget workers not acknowledged for a while (bounded by the fleet).
        last_sent.retain(|_, t| now.duration_since(*t) < ACK_INTERVAL);
        if due.is_empty() {
            continue;
        }
        for id in due.keys() {
            last_sent.insert(id.clone(), now);
        }
        let acks = seal_acks(&shared, due);
        for (topic, frame) in acks {
            if let Err(e) = client.publish(topic, QoS::AtMostOnce, false, frame).await {
                debug!("cannot queue an acknowledgement: {e}");
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Seals `Stored(n)` for every worker of `marks` that may receive one:
/// `(topic, frame)` pairs.
fn seal_acks(shared: &Shared, marks: HashMap<String, u64>) -> Vec<(String, Vec<u8>)> {
    let workers = shared.workers();
    let mut out = Vec::with_capacity(marks.len());
    for (id, stored) in marks {
        let Some(w) = workers.get(&id) else { continue };
        if w.revoked {
            continue;
        }
        let env = Envelope {
            version: w.format,
            worker_id: protocol::bounded(&w.id),
            // Outside the command seq stream (see `Action::Stored`).
            seq: w.cmd_seq,
            sent_at_ms: now_ms(),
            body: Body::Command(protocol::Command {
                // This conductor reads metrics batches (older agents
                // ignore the id).
                id: protocol::STORED_ACCEPTS_BATCH,
                action: protocol::Action::Stored(stored),
            }),
        };
        match protocol::seal(&w.secret, &env) {
            Ok(frame) => out.push((protocol::topic::topic(&id, TopicKind::Stored), frame)),
            Err(e) => warn!(worker_id = %id, "cannot seal an acknowledgement: {e}"),
        }
    }
    out
}

fn log_store_error(e: &StoreError, n: usize) {
    tracing::error!("dropping {n} writes after repeated commit failures: {e}");
}

fn sweep(store: &mut Store, raw_retention_ms: u64, minute_retention_ms: u64) {
    let now = now_ms();
    match store.sweep(
        now.saturating_sub(raw_retention_ms),
        now.saturating_sub(minute_retention_ms),
    ) {
        Ok(0) => {}
        Ok(n) => debug!(rows = n, "retention sweep"),
        Err(e) => warn!("retention sweep failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(seq: u64) -> WriteOp {
        WriteOp::Metrics {
            worker_id: "w-1".into(),
            received_at_ms: 1,
            seq,
            blob: Vec::new(),
            rollup: Rollup::default(),
        }
    }

    fn seen(highest: u64) -> WriteOp {
        WriteOp::Seen {
            worker_id: "w-1".into(),
            highest,
            bitmap: 0,
            last_seen_ms: 1,
        }
    }

    fn status() -> WriteOp {
        WriteOp::Status {
            worker_id: "w-2".into(),
            status: "offline",
        }
    }

    #[test]
    fn a_metrics_row_never_commits_without_its_seen() {
        // Complete frames, and standalone ops after them: all commit.
        assert_eq!(unsealed_tail(&[metrics(1), seen(1), status()]), 0);
        assert_eq!(unsealed_tail(&[status()]), 0);
        assert_eq!(unsealed_tail(&[]), 0);
        // A frame's row whose `Seen` has not arrived waits, with what follows.
        assert_eq!(unsealed_tail(&[metrics(1), seen(1), metrics(2)]), 1);
        assert_eq!(
            unsealed_tail(&[metrics(1), seen(1), status(), metrics(2), status()]),
            3
        );
        assert_eq!(unsealed_tail(&[status(), metrics(1)]), 2);
    }
}
