//! Workers (`workers`) and their secret rotation state (`worker_secrets`).

use super::sql::{params, Row};

use super::{i, u, Store, StoreError};

/// A worker record as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerRow {
    /// `w-` + 12 hex.
    pub id: String,
    /// Machine id reported at enrolment (informational, never used to merge).
    pub machine_id: String,
    /// Hostname reported at enrolment.
    pub hostname: String,
    /// Frame secret, 64 hex. Never logged or mirrored.
    pub secret_hex: String,
    /// sha256 hex of the worker's current MQTT password.
    pub mqtt_password_sha256: String,
    /// Labels as a JSON object.
    pub labels_json: String,
    /// Latest Birth as JSON.
    pub inventory_json: Option<String>,
    /// Enrolment time, ms since epoch.
    pub enrolled_at_ms: u64,
    /// Last good frame, conductor clock.
    pub last_seen_ms: Option<u64>,
    /// Client IP of the last enrolment.
    pub last_ip: Option<String>,
    /// Revoked workers are refused everywhere.
    pub revoked: bool,
    /// Replay window: highest accepted seq.
    pub replay_highest: u64,
    /// Replay window: bitmap below `replay_highest`.
    pub replay_bitmap: u64,
    /// Last conductor → worker seq used.
    pub cmd_seq: u64,
    /// `online` | `stale` | `offline`.
    pub status: String,
    /// A Pi's last board frame as JSON (written by the batch writer, never
    /// by insert or re-enrolment).
    pub board_json: Option<String>,
}

impl std::fmt::Debug for WorkerRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRow")
            .field("id", &self.id)
            .field("hostname", &self.hostname)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// A worker secret being rotated (`worker_secrets`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRotationRow {
    /// Worker.
    pub worker_id: String,
    /// The next secret, hex: sent, not yet seen in a frame.
    pub pending_hex: Option<String>,
    /// The previous secret, hex.
    pub previous_hex: Option<String>,
    /// Frames under `previous_hex` are accepted until then (ms).
    pub previous_until_ms: u64,
}

impl std::fmt::Debug for SecretRotationRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRotationRow")
            .field("worker_id", &self.worker_id)
            .field("pending", &self.pending_hex.is_some())
            .field("previous_until_ms", &self.previous_until_ms)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Inserts a new worker.
    pub fn insert_worker(&self, w: &WorkerRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO workers (id, machine_id, hostname, secret_hex, mqtt_password_sha256,
                labels, inventory, enrolled_at_ms, last_seen_ms, last_ip, revoked,
                replay_highest, replay_bitmap, cmd_seq, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                w.id,
                w.machine_id,
                w.hostname,
                w.secret_hex,
                w.mqtt_password_sha256,
                w.labels_json,
                w.inventory_json,
                i(w.enrolled_at_ms),
                w.last_seen_ms.map(i),
                w.last_ip,
                w.revoked,
                i(w.replay_highest),
                i(w.replay_bitmap),
                i(w.cmd_seq),
                w.status
            ],
        )?;
        Ok(())
    }

    /// Updates a re-enrolled worker (same id and secret, new MQTT password).
    pub fn update_reenrol(&self, w: &WorkerRow) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE workers SET machine_id = ?2, hostname = ?3, mqtt_password_sha256 = ?4,
                labels = ?5, inventory = COALESCE(?6, inventory), last_ip = ?7
             WHERE id = ?1",
            params![
                w.id,
                w.machine_id,
                w.hostname,
                w.mqtt_password_sha256,
                w.labels_json,
                w.inventory_json,
                w.last_ip
            ],
        )?;
        Ok(())
    }

    /// One worker.
    pub fn worker(&self, id: &str) -> Result<Option<WorkerRow>, StoreError> {
        self.conn.query_row_opt(
            &format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?1"),
            params![id],
            worker_from_row,
        )
    }

    /// Every worker.
    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.conn.query_map(
            &format!("SELECT {WORKER_COLS} FROM workers ORDER BY enrolled_at_ms, id"),
            params![],
            worker_from_row,
        )
    }

    /// Replaces a worker's labels.
    pub fn set_labels(&self, id: &str, labels_json: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE workers SET labels = ?2 WHERE id = ?1",
            params![id, labels_json],
        )? > 0)
    }

    /// Marks a worker revoked.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "UPDATE workers SET revoked = 1, status = 'offline' WHERE id = ?1",
            params![id],
        )? > 0)
    }

    /// Deletes a worker and its history.
    pub fn delete_worker(&mut self, id: &str) -> Result<bool, StoreError> {
        let tx = self.conn.begin()?;
        tx.execute("DELETE FROM metrics_raw WHERE worker_id = ?1", params![id])?;
        tx.execute(
            "DELETE FROM metrics_minute WHERE worker_id = ?1",
            params![id],
        )?;
        tx.execute(
            "DELETE FROM service_status WHERE worker_id = ?1",
            params![id],
        )?;
        tx.execute(
            "DELETE FROM service_overrides WHERE worker_id = ?1",
            params![id],
        )?;
        tx.execute(
            "DELETE FROM worker_secrets WHERE worker_id = ?1",
            params![id],
        )?;
        tx.execute("DELETE FROM worker_notes WHERE worker_id = ?1", params![id])?;
        let n = tx.execute("DELETE FROM workers WHERE id = ?1", params![id])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Records the next secret of a worker whose secret is being rotated.
    pub fn set_pending_secret(&self, id: &str, pending_hex: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO worker_secrets (worker_id, pending_hex) VALUES (?1, ?2)
             ON CONFLICT (worker_id) DO UPDATE SET pending_hex = excluded.pending_hex",
            params![id, pending_hex],
        )?;
        Ok(())
    }

    /// Every worker's secret rotation state.
    pub fn secret_rotations(&self) -> Result<Vec<SecretRotationRow>, StoreError> {
        self.conn.query_map(
            "SELECT worker_id, pending_hex, previous_hex, previous_until_ms FROM worker_secrets",
            params![],
            |r| {
                Ok(SecretRotationRow {
                    worker_id: r.get(0)?,
                    pending_hex: r.get(1)?,
                    previous_hex: r.get(2)?,
                    previous_until_ms: u(r.get(3)?),
                })
            },
        )
    }

    /// Persists the conductor → worker sequence number.
    pub fn set_cmd_seq(&self, id: &str, seq: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE workers SET cmd_seq = ?2 WHERE id = ?1",
            params![id, i(seq)],
        )?;
        Ok(())
    }

    /// Sets every worker's status (used at start: nobody has been seen yet).
    pub fn set_all_status(&self, status: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE workers SET status = ?1", params![status])?;
        Ok(())
    }
}

const WORKER_COLS: &str = "id, machine_id, hostname, secret_hex, mqtt_password_sha256, labels,
    inventory, enrolled_at_ms, last_seen_ms, last_ip, revoked, replay_highest, replay_bitmap,
    cmd_seq, status, board";

fn worker_from_row(r: &Row) -> Result<WorkerRow, StoreError> {
    Ok(WorkerRow {
        id: r.get(0)?,
        machine_id: r.get(1)?,
        hostname: r.get(2)?,
        secret_hex: r.get(3)?,
        mqtt_password_sha256: r.get(4)?,
        labels_json: r.get(5)?,
        inventory_json: r.get(6)?,
        enrolled_at_ms: u(r.get(7)?),
        last_seen_ms: r.get::<Option<i64>>(8)?.map(u),
        last_ip: r.get(9)?,
        revoked: r.get(10)?,
        replay_highest: u(r.get(11)?),
        replay_bitmap: u(r.get(12)?),
        cmd_seq: u(r.get(13)?),
        status: r.get(14)?,
        board_json: r.get(15)?,
    })
}
