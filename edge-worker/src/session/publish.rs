//! The publish pipeline: every frame the worker sends is sealed here with
//! the next seq, queued in the [`Outbox`] and handed to the MQTT client in
//! seq order, at most [`WINDOW`] in flight; PubAcks and the conductor's
//! `Stored` decide when a frame leaves the queue, and whether the conductor
//! acknowledges at all decides the wire format (see the module docs of
//! `session.rs`). Nothing here reads commands or knows about services.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::frame::bounded;
use protocol::{
    Body, BodyKind, Envelope, Event as WorkerEvent, EventKind, Secret, FORMAT_V2, FORMAT_VERSION,
};
use rumqttc::{AsyncClient, QoS};

use super::{Topics, STORED_TIMEOUT, WINDOW};
use crate::outbox::{Frame, Outbox};
use crate::state::StateStore;

/// A QoS 1 publish handed to the client: an outbox frame (its seq) or the
/// `online` status (`None`), whose PubAck frees nothing.
type Handed = Option<u64>;

/// Frames from sealing to the conductor's acknowledgement.
pub(super) struct Publisher {
    /// The worker id: sealed into format-1 frames, and the id commands
    /// must be addressed to.
    id: String,
    /// Seals every new frame. Replaced by `Action::RotateSecret`
    /// ([`Publisher::set_secret`]); frames already queued keep the tag they
    /// were sealed with.
    secret: Secret,
    /// `state.json`: reserves the seq of every frame (one seq stream per
    /// direction). The session persists the command window and rotated
    /// secrets through it too ([`Publisher::state_store`]).
    store: StateStore,
    /// The only source of truth for unsent frames: a frame leaves it when a
    /// `Stored` covers its seq (or at its PubAck while `pub_ack_final`).
    outbox: Outbox,
    /// How often the outbox is written to disk while frames wait in it.
    flush_interval: Duration,
    /// `Some(since)` while connected: frames are handed to the client only
    /// then, and an overflow is reported at once only then.
    connected_at: Option<Instant>,
    /// Publishes handed to the client whose `Outgoing::Publish(pkid)` has
    /// not been seen yet, in hand-over order. Invariant: the client reports
    /// them in this order, which is what maps a pkid to a seq; cleared with
    /// every connection (the session is clean).
    handed: VecDeque<Handed>,
    /// pkid → publish, for publishes written to the broker, awaiting PubAck.
    pkids: HashMap<u16, Handed>,
    /// Frames dropped by overflow since the connection last dropped.
    outage_dropped: u64,
    /// The overflow event for the current outage (the time since the
    /// connection last dropped) was queued: one event per outage.
    overflow_reported: bool,
    /// A `Stored` arrived since start: the conductor acknowledges (and
    /// reads format 2).
    stored_seen: bool,
    /// No `Stored` came for [`STORED_TIMEOUT`] after a PubAck (an older
    /// conductor, or none processing): a PubAck frees a frame at once, as
    /// before `Stored` existed, until the next `Stored` arrives.
    pub_ack_final: bool,
    /// The last `Stored` carried [`protocol::STORED_ACCEPTS_BATCH`]: the
    /// conductor reads `MetricsBatch` frames. Cleared with the
    /// acknowledgements (`pub_ack_final`), so an older conductor that
    /// takes over is sent plain `Metrics` again.
    accepts_batch: bool,
}

// fits: u64 milliseconds last 584 million years after 1970.
#[allow(clippy::cast_possible_truncation)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Publisher {
    /// A pipeline for worker `id`, disconnected, with `outbox` as loaded.
    pub(super) fn new(
        id: String,
        secret: Secret,
        store: StateStore,
        outbox: Outbox,
        flush_interval: Duration,
    ) -> Publisher {
        Publisher {
            id,
            secret,
            store,
            outbox,
            flush_interval,
            connected_at: None,
            handed: VecDeque::new(),
            pkids: HashMap::new(),
            outage_dropped: 0,
            overflow_reported: false,
            stored_seen: false,
            pub_ack_final: false,
            accepts_batch: false,
        }
    }

    /// The worker id.
    pub(super) fn worker_id(&self) -> &str {
        &self.id
    }

    /// The secret new frames are sealed with.
    pub(super) fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Seals new frames with `next` from now on; returns the secret before.
    pub(super) fn set_secret(&mut self, next: Secret) -> Secret {
        std::mem::replace(&mut self.secret, next)
    }

    /// The worker's state file (for the command window and rotations).
    pub(super) fn state_store(&mut self) -> &mut StateStore {
        &mut self.store
    }

    /// Frames queued (sent or not).
    pub(super) fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Is the session connected?
    pub(super) fn is_connected(&self) -> bool {
        self.connected_at.is_some()
    }

    /// Does the conductor acknowledge with `Stored` (seen, and not given up
    /// on)? Then a frame stays queued until one covers it.
    pub(super) fn conductor_acks(&self) -> bool {
        self.stored_seen && !self.pub_ack_final
    }

    /// Does the conductor read `MetricsBatch` frames (and `Live`)?
    pub(super) fn accepts_batch(&self) -> bool {
        self.accepts_batch && self.conductor_acks()
    }

    /// The wire format for the next frame: [`FORMAT_V2`] (no worker id in
    /// the frame) while the conductor sends `Stored` — only conductors that
    /// accept format 2 do — else format 1, which every conductor takes.
    /// Frames already queued keep the format they were sealed in; the
    /// conductor accepts both.
    fn format(&self) -> u8 {
        if self.conductor_acks() {
            FORMAT_V2
        } else {
            FORMAT_VERSION
        }
    }

    /// Seals `body` with the next seq and queues it; returns the seq. A
    /// batch of n samples takes n seqs, its own the last
    /// ([`protocol::batch`]: each sample is stored under one).
    pub(super) fn enqueue(&mut self, body: Body) -> u64 {
        let kind = body.kind();
        if let Body::MetricsBatch(b) = &body {
            for _ in 1..b.count {
                self.store.next_seq();
            }
        }
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
        seq
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

    /// Frames dropped by overflow since the last call (for `Metrics`).
    pub(super) fn take_dropped(&mut self) -> u32 {
        u32::try_from(self.outbox.take_dropped()).unwrap_or(u32::MAX)
    }

    /// A ConnAck: nothing is in flight on the new connection, so every
    /// queued frame goes again from the front.
    pub(super) fn on_connected(&mut self) {
        self.connected_at = Some(Instant::now());
        self.handed.clear();
        self.pkids.clear();
        self.outbox.reset_in_flight();
    }

    /// Publishes the retained `online` status (QoS 1, outside the outbox).
    pub(super) fn publish_online(&mut self, client: &AsyncClient, topics: &Topics) {
        match client.try_publish(
            topics.status.clone(),
            QoS::AtLeastOnce,
            true,
            protocol::topic::STATUS_ONLINE,
        ) {
            Ok(()) => self.handed.push_back(None),
            Err(e) => tracing::warn!("cannot publish the online status: {e}"),
        }
    }

    /// Right after a connect: the drops of the outage that just ended (and
    /// of the burst right after it) are reported once.
    pub(super) fn report_outage(&mut self) {
        if self.outage_dropped > 0 && !self.overflow_reported {
            self.report_overflow();
        }
    }

    /// The connection (or a connect attempt) failed: nothing is in flight
    /// any more. Returns since when it was connected, if it was; a new
    /// outage then starts (its drops get their own event).
    pub(super) fn on_disconnected(&mut self) -> Option<Instant> {
        let was_connected = self.connected_at.take();
        self.handed.clear();
        self.pkids.clear();
        self.outbox.reset_in_flight();
        if was_connected.is_some() {
            self.outage_dropped = 0;
            self.overflow_reported = false;
        }
        was_connected
    }

    /// The client wrote the next handed publish as `pkid`.
    pub(super) fn on_outgoing(&mut self, pkid: u16) {
        if let Some(h) = self.handed.pop_front() {
            self.pkids.insert(pkid, h);
        }
    }

    /// The broker acknowledged `pkid`.
    pub(super) fn on_pub_ack(&mut self, pkid: u16) {
        if let Some(Some(seq)) = self.pkids.remove(&pkid) {
            self.outbox.broker_acked(seq, Instant::now());
            if self.pub_ack_final {
                self.outbox.drop_broker_acked();
            }
        }
    }

    /// Hands queued frames to the client, oldest first, up to [`WINDOW`].
    pub(super) fn pump(&mut self, client: &AsyncClient, topics: &Topics) {
        if self.connected_at.is_none() {
            return;
        }
        while let Some(f) = self.outbox.next_to_send(WINDOW) {
            let (seq, kind) = (f.seq, f.kind);
            let Some(topic) = topics.for_kind(kind) else {
                // Never queued; drop rather than block the queue.
                self.outbox.discard_next(seq);
                continue;
            };
            // Birth and board describe the worker now: retained, so a
            // subscriber sees them at once (and the conductor after a restart).
            let retain = matches!(kind, BodyKind::Birth | BodyKind::Board);
            match client.try_publish(topic, QoS::AtLeastOnce, retain, f.bytes.clone()) {
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

    /// When the outbox should be written next (`None`: nothing to write).
    pub(super) fn flush_due(&self) -> Option<Instant> {
        self.outbox.flush_due(self.flush_interval)
    }

    /// When a broker-acked frame waits [`STORED_TIMEOUT`] for its `Stored`.
    pub(super) fn expire_due(&self) -> Option<Instant> {
        self.outbox.expire_due(STORED_TIMEOUT)
    }

    /// Writes the outbox to disk (a failure is logged).
    pub(super) fn persist(&mut self) {
        match self.outbox.sync() {
            Ok(()) => tracing::debug!(queued = self.outbox.len(), "outbox persisted"),
            Err(e) => tracing::error!("cannot persist the outbox: {e}"),
        }
    }

    /// Writes the outbox once it is empty while its file still holds
    /// frames (so they are not sent again after a restart).
    pub(super) fn persist_if_drained(&mut self) {
        if self.outbox.is_empty() && self.outbox.file_has_frames() {
            self.persist();
        }
    }

    /// The conductor's acknowledgement: frames with seq ≤ `upto` are
    /// durably processed and leave the outbox; `flags` is the `Stored`
    /// command's id ([`protocol::STORED_ACCEPTS_BATCH`]).
    pub(super) fn on_stored(&mut self, upto: u64, flags: u32) {
        let n = self.outbox.stored(upto);
        tracing::debug!(upto, removed = n, queued = self.outbox.len(), "stored");
        self.stored_seen = true;
        let batches = flags & protocol::STORED_ACCEPTS_BATCH != 0;
        if batches != self.accepts_batch {
            tracing::info!(
                batches,
                "the conductor {} metrics batches",
                if batches { "reads" } else { "does not read" }
            );
            self.accepts_batch = batches;
        }
        if self.pub_ack_final {
            tracing::info!("the conductor acknowledges again: frames stay queued until Stored");
            self.pub_ack_final = false;
        }
    }

    /// Drops frames the broker acknowledged [`STORED_TIMEOUT`] ago and the
    /// conductor never did; from then on a PubAck frees a frame at once
    /// (until a `Stored` arrives), so the queue drains as it used to.
    pub(super) fn expire(&mut self) {
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

    /// Nothing left to wait for at shutdown: the outbox is empty, or
    /// (without conductor acknowledgements, `acks` false) the broker has
    /// every frame.
    pub(super) fn settled(&self, acks: bool) -> bool {
        self.outbox.is_empty() || (!acks && self.outbox.all_broker_acked())
    }

    /// The end of a shutdown: without conductor acknowledgements (`acks`
    /// false) the broker's PubAck is all there is, as before `Stored`;
    /// whatever is still queued is persisted.
    pub(super) fn close(&mut self, acks: bool) {
        if !acks {
            self.outbox.drop_broker_acked();
        }
        self.outbox.reset_in_flight();
        self.persist();
    }
}
