//! The ingest writer's batches: [`WriteOp`]s applied in one transaction.

use super::sql::{owned, params, Value};

use super::{i, Rollup, ServiceStatusRow, Store, StoreError};

/// A write produced by ingest or liveness, applied in batches.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// An accepted metrics frame.
    Metrics {
        /// Worker.
        worker_id: String,
        /// Conductor receive time.
        received_at_ms: u64,
        /// Frame seq.
        seq: u64,
        /// postcard of `protocol::Metrics`.
        blob: Vec<u8>,
        /// Rollup input.
        rollup: Rollup,
    },
    /// Replay window and last-seen after an accepted frame (coalesced per batch).
    Seen {
        /// Worker.
        worker_id: String,
        /// Window highest.
        highest: u64,
        /// Window bitmap.
        bitmap: u64,
        /// Receive time.
        last_seen_ms: u64,
    },
    /// Liveness status change.
    Status {
        /// Worker.
        worker_id: String,
        /// New status.
        status: &'static str,
    },
    /// New inventory from a Birth.
    Inventory {
        /// Worker.
        worker_id: String,
        /// Birth as JSON.
        json: String,
    },
    /// A Pi's board frame changed.
    Board {
        /// Worker.
        worker_id: String,
        /// [`protocol::Board`] as JSON.
        json: String,
    },
    /// A service status report (upsert).
    ServiceStatus(ServiceStatusRow),
    /// A worker's first frame under its rotated secret: the pending secret
    /// becomes its secret, the old one is kept until `previous_until_ms`.
    SecretPromoted {
        /// Worker.
        worker_id: String,
        /// The secret now in use, hex.
        secret_hex: String,
        /// The one before, hex.
        previous_hex: String,
        /// Frames under `previous_hex` are accepted until then (ms).
        previous_until_ms: u64,
    },
    /// A worker started a new session (Birth): forget its reported services
    /// (it reports the full picture right after).
    ServicesCleared {
        /// Worker.
        worker_id: String,
    },
    /// A service was removed from a worker.
    ServiceRemoved {
        /// Worker.
        worker_id: String,
        /// Service name.
        name: String,
    },
    /// A note for the fleet-wide loops (`notes`), upserted.
    Note(super::notes::NoteRow),
    /// Not a write: the MQTT loop's mark after the ops of its `n`th
    /// received publish (with an external broker). Once a batch holding it
    /// is committed, the loop may PubAck publishes 1..=n to the broker
    /// ([`crate::subscriber`]); until then the broker keeps them for the
    /// conductor's session.
    Received(u64),
}

impl Store {
    /// Applies a batch of writes in one transaction.
    pub fn apply_batch(&mut self, ops: &[WriteOp]) -> Result<(), StoreError> {
        const RAW: &str = "INSERT INTO metrics_raw (worker_id, received_at_ms, seq, frame)
            VALUES (?1, ?2, ?3, ?4)";
        // The stored row's columns are qualified (PostgreSQL reads a bare
        // name as ambiguous with `excluded`); the larger of two is a CASE
        // (SQLite's max(a, b) is PostgreSQL's GREATEST).
        const MINUTE: &str = "INSERT INTO metrics_minute (worker_id, minute_ms, n, cpu_sum,
                cpu_max, mem_used_sum, mem_total, load1_sum, temp_max, disk_used, disk_total,
                rx_bps_sum, tx_bps_sum)
             VALUES (?1, ?2, 1, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (worker_id, minute_ms) DO UPDATE SET
                n = metrics_minute.n + 1,
                cpu_sum = metrics_minute.cpu_sum + excluded.cpu_sum,
                cpu_max = CASE WHEN excluded.cpu_max > metrics_minute.cpu_max
                               THEN excluded.cpu_max ELSE metrics_minute.cpu_max END,
                mem_used_sum = metrics_minute.mem_used_sum + excluded.mem_used_sum,
                mem_total = excluded.mem_total,
                load1_sum = metrics_minute.load1_sum + excluded.load1_sum,
                temp_max = CASE WHEN metrics_minute.temp_max IS NULL THEN excluded.temp_max
                                WHEN excluded.temp_max IS NULL THEN metrics_minute.temp_max
                                WHEN excluded.temp_max > metrics_minute.temp_max
                                THEN excluded.temp_max
                                ELSE metrics_minute.temp_max END,
                disk_used = excluded.disk_used,
                disk_total = excluded.disk_total,
                rx_bps_sum = metrics_minute.rx_bps_sum + excluded.rx_bps_sum,
                tx_bps_sum = metrics_minute.tx_bps_sum + excluded.tx_bps_sum";
        const SEEN: &str = "UPDATE workers SET replay_highest = ?2, replay_bitmap = ?3,
            last_seen_ms = ?4 WHERE id = ?1";
        const SVC: &str = "INSERT INTO service_status (worker_id, name, version, state, pid,
                restarts, exit_code, detail, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (worker_id, name) DO UPDATE SET
                version = excluded.version, state = excluded.state, pid = excluded.pid,
                restarts = excluded.restarts, exit_code = excluded.exit_code,
                detail = excluded.detail, updated_ms = excluded.updated_ms";
        let mut writes: Vec<(&'static str, Vec<Value>)> = Vec::with_capacity(ops.len() * 2);
        {
            // Only the last window per worker matters.
            let mut last_seen: std::collections::HashMap<&str, usize> = Default::default();
            for (idx, op) in ops.iter().enumerate() {
                if let WriteOp::Seen { worker_id, .. } = op {
                    last_seen.insert(worker_id, idx);
                }
            }
            for (idx, op) in ops.iter().enumerate() {
                match op {
                    WriteOp::Metrics {
                        worker_id,
                        received_at_ms,
                        seq,
                        blob,
                        rollup: r,
                    } => {
                        writes.push((
                            RAW,
                            owned(params![worker_id, i(*received_at_ms), i(*seq), blob]),
                        ));
                        let minute_ms = received_at_ms - received_at_ms % 60_000;
                        writes.push((
                            MINUTE,
                            owned(params![
                                worker_id,
                                i(minute_ms),
                                i(r.cpu),
                                i(r.mem_used),
                                i(r.mem_total),
                                i(r.load1),
                                r.temp_max,
                                i(r.disk_used),
                                i(r.disk_total),
                                i(r.rx_bps),
                                i(r.tx_bps)
                            ]),
                        ));
                    }
                    WriteOp::Seen {
                        worker_id,
                        highest,
                        bitmap,
                        last_seen_ms,
                    } => {
                        if last_seen.get(worker_id.as_str()) == Some(&idx) {
                            writes.push((
                                SEEN,
                                owned(params![
                                    worker_id,
                                    i(*highest),
                                    i(*bitmap),
                                    i(*last_seen_ms)
                                ]),
                            ));
                        }
                    }
                    WriteOp::Status {
                        worker_id,
                        status: s,
                    } => {
                        writes.push((
                            "UPDATE workers SET status = ?2 WHERE id = ?1",
                            owned(params![worker_id, s]),
                        ));
                    }
                    WriteOp::Inventory { worker_id, json } => {
                        writes.push((
                            "UPDATE workers SET inventory = ?2 WHERE id = ?1",
                            owned(params![worker_id, json]),
                        ));
                    }
                    WriteOp::Board { worker_id, json } => {
                        writes.push((
                            "UPDATE workers SET board = ?2 WHERE id = ?1",
                            owned(params![worker_id, json]),
                        ));
                    }
                    WriteOp::ServiceStatus(r) => {
                        writes.push((
                            SVC,
                            owned(params![
                                r.worker_id,
                                r.name,
                                r.version,
                                r.state,
                                r.pid,
                                r.restarts,
                                r.exit_code,
                                r.detail,
                                i(r.updated_ms)
                            ]),
                        ));
                    }
                    WriteOp::ServiceRemoved { worker_id, name } => {
                        writes.push((
                            "DELETE FROM service_status WHERE worker_id = ?1 AND name = ?2",
                            owned(params![worker_id, name]),
                        ));
                    }
                    WriteOp::ServicesCleared { worker_id } => {
                        writes.push((
                            "DELETE FROM service_status WHERE worker_id = ?1",
                            owned(params![worker_id]),
                        ));
                    }
                    WriteOp::Note(n) => {
                        writes.push((super::notes::UPSERT, super::notes::upsert_params(n)));
                    }
                    WriteOp::Received(_) => {}
                    WriteOp::SecretPromoted {
                        worker_id,
                        secret_hex,
                        previous_hex,
                        previous_until_ms,
                    } => {
                        writes.push((
                            "UPDATE workers SET secret_hex = ?2 WHERE id = ?1",
                            owned(params![worker_id, secret_hex]),
                        ));
                        writes.push((
                            "INSERT INTO worker_secrets
                                (worker_id, pending_hex, previous_hex, previous_until_ms)
                             VALUES (?1, NULL, ?2, ?3)
                             ON CONFLICT (worker_id) DO UPDATE SET pending_hex = NULL,
                                previous_hex = excluded.previous_hex,
                                previous_until_ms = excluded.previous_until_ms",
                            owned(params![worker_id, previous_hex, i(*previous_until_ms)]),
                        ));
                    }
                }
            }
        }
        // Fenced: the batch's first statement touches the lease row only
        // while its epoch is ours. A conductor taking the lease bumps the
        // epoch under the same row lock, so this batch either commits
        // before the takeover (and the new holder loads it) or changes
        // nothing and rolls back.
        let fenced = match &self.fence {
            Some(f) => {
                let epoch = f.epoch().ok_or(StoreError::Fenced)?;
                writes.insert(0, (super::lease::FENCE_SQL, vec![Value::Int(epoch)]));
                true
            }
            None => false,
        };
        let tx = self.conn.begin()?;
        let changed = tx.execute_all(writes)?;
        if fenced && changed.first() != Some(&1) {
            return Err(StoreError::Fenced);
        }
        tx.commit()?;
        Ok(())
    }
}
