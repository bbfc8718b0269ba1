//! SQLite persistence.
//!
//! One database file, `<data_dir>/conductor.db`, in WAL mode with
//! `synchronous=NORMAL` and a busy timeout. The schema is versioned with
//! `PRAGMA user_version`: [`MIGRATIONS`] is an append-only list of SQL steps,
//! each applied in its own transaction together with the version bump, so a
//! crash mid-migration leaves the previous version intact.
//!
//! Two kinds of connection exist at run time: the ingest writer thread owns
//! one (batched metrics / replay-window / status writes, see
//! [`Store::apply_batch`]); the HTTP side shares another behind a mutex for
//! reads and low-rate writes (enrolment, labels, tokens). Every multi-row
//! change runs in a transaction, so `kill -9` at any point leaves a
//! consistent database.
//!
//! Hosted services (schema v2): `services` holds immutable spec versions,
//! `deployments` one placement per service name, `service_status` the last
//! state each worker reported per service (written by the ingest writer).
//!
//! Schema v3: `artifacts` (uploaded binaries by SHA-256 and arch; the bytes
//! live in `<data_dir>/artifacts/<sha256>`), `rollouts` (one row per rollout,
//! at most one `in_progress` per service, enforced by a partial unique
//! index), `service_overrides` (a per-worker "stopped" that reconciliation
//! keeps) and `deployments.rollout` (the deployment's default rollout
//! policy, JSON).
//!
//! Limits: metrics queries return at most [`MAX_QUERY_ROWS`] rows.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

/// Most rows a metrics query returns.
pub const MAX_QUERY_ROWS: usize = 10_000;

/// Schema steps; index + 1 is the `user_version` after the step. Append only.
pub const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE settings (k TEXT PRIMARY KEY, v TEXT NOT NULL);
     CREATE TABLE users (
        username TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL);
     CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('session', 'api')),
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER);
     CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        machine_id TEXT NOT NULL,
        hostname TEXT NOT NULL,
        secret_hex TEXT NOT NULL,
        mqtt_password_sha256 TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        inventory TEXT,
        enrolled_at_ms INTEGER NOT NULL,
        last_seen_ms INTEGER,
        last_ip TEXT,
        revoked INTEGER NOT NULL DEFAULT 0,
        replay_highest INTEGER NOT NULL DEFAULT 0,
        replay_bitmap INTEGER NOT NULL DEFAULT 0,
        cmd_seq INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL DEFAULT 'offline');
     CREATE TABLE metrics_raw (
        worker_id TEXT NOT NULL,
        received_at_ms INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        frame BLOB NOT NULL);
     CREATE INDEX metrics_raw_by_worker ON metrics_raw (worker_id, received_at_ms);
     CREATE INDEX metrics_raw_by_time ON metrics_raw (received_at_ms);
     CREATE TABLE metrics_minute (
        worker_id TEXT NOT NULL,
        minute_ms INTEGER NOT NULL,
        n INTEGER NOT NULL,
        cpu_sum INTEGER NOT NULL,
        cpu_max INTEGER NOT NULL,
        mem_used_sum INTEGER NOT NULL,
        mem_total INTEGER NOT NULL,
        load1_sum INTEGER NOT NULL,
        temp_max INTEGER,
        disk_used INTEGER NOT NULL,
        disk_total INTEGER NOT NULL,
        rx_bps_sum INTEGER NOT NULL,
        tx_bps_sum INTEGER NOT NULL,
        PRIMARY KEY (worker_id, minute_ms));
     CREATE INDEX metrics_minute_by_time ON metrics_minute (minute_ms);",
    // v2: hosted services.
    "CREATE TABLE services (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        spec TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (name, version));
     CREATE TABLE deployments (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        workers TEXT NOT NULL DEFAULT '[]',
        labels TEXT NOT NULL DEFAULT '{}',
        desired TEXT NOT NULL DEFAULT 'running' CHECK (desired IN ('running', 'stopped')),
        updated_ms INTEGER NOT NULL);
     CREATE TABLE service_status (
        worker_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER NOT NULL,
        restarts INTEGER NOT NULL,
        exit_code INTEGER,
        detail TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (worker_id, name));",
    // v3: artifacts, rollouts, per-worker overrides, a deployment's rollout policy.
    "CREATE TABLE artifacts (
        sha256 TEXT NOT NULL,
        arch TEXT NOT NULL,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (sha256, arch));
     ALTER TABLE deployments ADD COLUMN rollout TEXT;
     CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service TEXT NOT NULL,
        from_version INTEGER NOT NULL,
        to_version INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('in_progress', 'succeeded', 'reverted')),
        policy TEXT NOT NULL,
        waves TEXT NOT NULL,
        wave INTEGER NOT NULL,
        wave_started_ms INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER);
     CREATE INDEX rollouts_by_service ON rollouts (service, id);
     CREATE UNIQUE INDEX rollouts_one_in_progress ON rollouts (service)
        WHERE state = 'in_progress';
     CREATE TABLE service_overrides (
        worker_id TEXT NOT NULL,
        name TEXT NOT NULL,
        desired TEXT NOT NULL CHECK (desired IN ('stopped')),
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (worker_id, name));",
    // v4: a worker secret being rotated: the next one (sent, not yet seen in
    // a frame) and the previous one (still accepted until previous_until_ms).
    "CREATE TABLE worker_secrets (
        worker_id TEXT PRIMARY KEY,
        pending_hex TEXT,
        previous_hex TEXT,
        previous_until_ms INTEGER NOT NULL DEFAULT 0);",
];

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database was written by a newer conductor.
    #[error("database schema version {0} is newer than this conductor understands")]
    TooNew(i64),
}

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

/// An API or session token record (the token itself is only stored hashed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Public id, used to delete it.
    pub id: String,
    /// Human name.
    pub name: String,
    /// `session` or `api`.
    pub kind: String,
    /// Creation time, ms.
    pub created_ms: u64,
    /// Expiry, ms (`None` = never).
    pub expires_ms: Option<u64>,
}

/// One-minute aggregate input derived from a metrics sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollup {
    /// CPU busy, hundredths of a percent.
    pub cpu: u64,
    /// Memory used, bytes.
    pub mem_used: u64,
    /// Memory total, bytes.
    pub mem_total: u64,
    /// Load1, hundredths.
    pub load1: u64,
    /// Highest temperature, millidegrees.
    pub temp_max: Option<i64>,
    /// Sum of disk used, bytes.
    pub disk_used: u64,
    /// Sum of disk total, bytes.
    pub disk_total: u64,
    /// Sum of interface rx rates.
    pub rx_bps: u64,
    /// Sum of interface tx rates.
    pub tx_bps: u64,
}

/// A stored minute aggregate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MinuteRow {
    /// Start of the minute, ms.
    pub minute_ms: u64,
    /// Samples in the minute.
    pub n: u64,
    /// Mean CPU percent.
    pub cpu_avg_percent: f64,
    /// Max CPU percent.
    pub cpu_max_percent: f64,
    /// Mean memory used, bytes.
    pub mem_used_avg: u64,
    /// Memory total, bytes.
    pub mem_total: u64,
    /// Mean load1.
    pub load1_avg: f64,
    /// Max temperature, °C.
    pub temp_max_celsius: Option<f64>,
    /// Disk used (latest), bytes.
    pub disk_used: u64,
    /// Disk total (latest), bytes.
    pub disk_total: u64,
    /// Mean receive rate, bytes/s.
    pub rx_bps_avg: u64,
    /// Mean transmit rate, bytes/s.
    pub tx_bps_avg: u64,
}

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

/// A stored service spec version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    /// Service name.
    pub name: String,
    /// Version (1, 2, …).
    pub version: u32,
    /// Spec as JSON (see `crate::services::SpecDoc`).
    pub spec_json: String,
    /// Creation time, ms.
    pub created_ms: u64,
}

/// Where and how a service should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRow {
    /// Service name.
    pub name: String,
    /// Desired version.
    pub version: u32,
    /// Explicitly named workers, JSON array.
    pub workers_json: String,
    /// Label selector, JSON object.
    pub labels_json: String,
    /// `running` | `stopped`.
    pub desired: String,
    /// Last change, ms.
    pub updated_ms: u64,
    /// Default rollout policy, JSON (`None`: the built-in default).
    pub rollout_json: Option<String>,
}

/// An uploaded artifact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArtifactRow {
    /// SHA-256 of the file, 64 lower-case hex digits (also its file name).
    pub sha256: String,
    /// Architecture it is for, as workers report it.
    pub arch: String,
    /// Free label given at upload.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Upload time, ms.
    pub created_ms: u64,
}

/// One rollout, as stored (JSON columns parsed by `crate::rollout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRow {
    /// Row id (increasing).
    pub id: i64,
    /// Service name.
    pub service: String,
    /// Version before the rollout (what a revert returns to).
    pub from_version: u32,
    /// Version being rolled out.
    pub to_version: u32,
    /// `in_progress` | `succeeded` | `reverted`.
    pub state: String,
    /// Policy, JSON.
    pub policy_json: String,
    /// Waves of worker ids, JSON array of arrays.
    pub waves_json: String,
    /// Index of the current (or last) wave.
    pub wave: u32,
    /// When the current wave started, ms.
    pub wave_started_ms: u64,
    /// Why it was reverted (empty otherwise).
    pub reason: String,
    /// Start time, ms.
    pub started_ms: u64,
    /// End time, ms.
    pub finished_ms: Option<u64>,
}

/// The last reported state of one service on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatusRow {
    /// Worker.
    pub worker_id: String,
    /// Service name.
    pub name: String,
    /// Version the worker has.
    pub version: u32,
    /// Lower-case state name.
    pub state: String,
    /// Process id (0 when not running).
    pub pid: u32,
    /// Restarts.
    pub restarts: u32,
    /// Last exit code.
    pub exit_code: Option<i32>,
    /// Detail text.
    pub detail: String,
    /// Conductor receive time, ms.
    pub updated_ms: u64,
}

fn i(v: u64) -> i64 {
    // Bit-preserving: u64 columns (bitmaps, sums) round-trip through i64.
    v as i64
}

fn u(v: i64) -> u64 {
    v as u64
}

impl Store {
    /// Opens (creating if needed) `<dir>/conductor.db` and migrates it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let conn = Connection::open(dir.join("conductor.db"))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew(version));
        }
        for (idx, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (idx + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Current schema version.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    // ---- settings ----

    /// Reads a setting.
    pub fn setting(&self, k: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT v FROM settings WHERE k = ?1", [k], |r| r.get(0))
            .optional()?)
    }

    /// Writes settings atomically.
    pub fn set_settings(&mut self, kv: &[(&str, &str)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for (k, v) in kv {
            tx.execute(
                "INSERT INTO settings (k, v) VALUES (?1, ?2)
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                params![k, v],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    // ---- users ----

    /// The argon2 PHC hash of `username`.
    pub fn user_hash(&self, username: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT password_hash FROM users WHERE username = ?1",
                [username],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Creates or replaces a user.
    pub fn set_user(&self, username: &str, hash: &str, now_ms: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO users (username, password_hash, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash",
            params![username, hash, i(now_ms)],
        )?;
        Ok(())
    }

    // ---- tokens ----

    /// Stores a token record with its sha256 hex.
    pub fn insert_token(&self, row: &TokenRow, sha256_hex: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO api_tokens (id, name, token_sha256, kind, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.id,
                row.name,
                sha256_hex,
                row.kind,
                i(row.created_ms),
                row.expires_ms.map(i)
            ],
        )?;
        Ok(())
    }

    /// The unexpired token with this hash.
    pub fn token_by_hash(
        &self,
        sha256_hex: &str,
        now_ms: u64,
    ) -> Result<Option<TokenRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, kind, created_ms, expires_ms FROM api_tokens
                 WHERE token_sha256 = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
                params![sha256_hex, i(now_ms)],
                token_from_row,
            )
            .optional()?)
    }

    /// All tokens of `kind`.
    pub fn list_tokens(&self, kind: &str) -> Result<Vec<TokenRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, name, kind, created_ms, expires_ms FROM api_tokens
             WHERE kind = ?1 ORDER BY created_ms",
        )?;
        let rows = st.query_map([kind], token_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a token by id; `true` if one existed.
    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE id = ?1", [id])?
            > 0)
    }

    /// Deletes a token by hash (logout).
    pub fn delete_token_by_hash(&self, sha256_hex: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM api_tokens WHERE token_sha256 = ?1",
            [sha256_hex],
        )? > 0)
    }

    /// Drops expired tokens.
    pub fn purge_expired_tokens(&self, now_ms: u64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM api_tokens WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
            [i(now_ms)],
        )?)
    }

    // ---- workers ----

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
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {WORKER_COLS} FROM workers WHERE id = ?1"),
                [id],
                worker_from_row,
            )
            .optional()?)
    }

    /// Every worker.
    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {WORKER_COLS} FROM workers ORDER BY enrolled_at_ms, id"
        ))?;
        let rows = st.query_map([], worker_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
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
            [id],
        )? > 0)
    }

    /// Deletes a worker and its history.
    pub fn delete_worker(&mut self, id: &str) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM metrics_raw WHERE worker_id = ?1", [id])?;
        tx.execute("DELETE FROM metrics_minute WHERE worker_id = ?1", [id])?;
        tx.execute("DELETE FROM service_status WHERE worker_id = ?1", [id])?;
        tx.execute("DELETE FROM service_overrides WHERE worker_id = ?1", [id])?;
        tx.execute("DELETE FROM worker_secrets WHERE worker_id = ?1", [id])?;
        let n = tx.execute("DELETE FROM workers WHERE id = ?1", [id])?;
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
        let mut st = self.conn.prepare_cached(
            "SELECT worker_id, pending_hex, previous_hex, previous_until_ms FROM worker_secrets",
        )?;
        let rows = st.query_map([], |r| {
            Ok(SecretRotationRow {
                worker_id: r.get(0)?,
                pending_hex: r.get(1)?,
                previous_hex: r.get(2)?,
                previous_until_ms: u(r.get(3)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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
            .execute("UPDATE workers SET status = ?1", [status])?;
        Ok(())
    }

    // ---- services ----

    /// Stores a new version of service `name` (previous + 1) and returns it.
    pub fn insert_service(
        &mut self,
        name: &str,
        spec_json: &str,
        now_ms: u64,
    ) -> Result<u32, StoreError> {
        let tx = self.conn.transaction()?;
        let last: Option<u32> = tx.query_row(
            "SELECT MAX(version) FROM services WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        let version = last.unwrap_or(0).saturating_add(1);
        tx.execute(
            "INSERT INTO services (name, version, spec, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, version, spec_json, i(now_ms)],
        )?;
        tx.commit()?;
        Ok(version)
    }

    /// Every service's latest version, by name.
    pub fn latest_services(&self) -> Result<Vec<ServiceRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT s.name, s.version, s.spec, s.created_ms FROM services s
             WHERE s.version = (SELECT MAX(version) FROM services WHERE name = s.name)
             ORDER BY s.name",
        )?;
        let rows = st.query_map([], service_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// All versions of one service, oldest first.
    pub fn service_versions(&self, name: &str) -> Result<Vec<ServiceRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT name, version, spec, created_ms FROM services WHERE name = ?1 ORDER BY version",
        )?;
        let rows = st.query_map([name], service_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One version of a service.
    pub fn service(&self, name: &str, version: u32) -> Result<Option<ServiceRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, version, spec, created_ms FROM services WHERE name = ?1 AND version = ?2",
                params![name, version],
                service_from_row,
            )
            .optional()?)
    }

    /// Creates or replaces a deployment.
    pub fn put_deployment(&self, d: &DeploymentRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO deployments (name, version, workers, labels, desired, updated_ms, rollout)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version,
                workers = excluded.workers, labels = excluded.labels,
                desired = excluded.desired, updated_ms = excluded.updated_ms,
                rollout = excluded.rollout",
            params![
                d.name,
                d.version,
                d.workers_json,
                d.labels_json,
                d.desired,
                i(d.updated_ms),
                d.rollout_json
            ],
        )?;
        Ok(())
    }

    /// One deployment.
    pub fn deployment(&self, name: &str) -> Result<Option<DeploymentRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, version, workers, labels, desired, updated_ms, rollout
                 FROM deployments WHERE name = ?1",
                [name],
                deployment_from_row,
            )
            .optional()?)
    }

    /// Every deployment, by name.
    pub fn deployments(&self) -> Result<Vec<DeploymentRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT name, version, workers, labels, desired, updated_ms, rollout
             FROM deployments ORDER BY name",
        )?;
        let rows = st.query_map([], deployment_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a deployment; `false` if there was none.
    pub fn delete_deployment(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM deployments WHERE name = ?1", [name])?
            > 0)
    }

    // ---- artifacts ----

    /// Records an uploaded artifact (same sha and arch again: new label).
    pub fn put_artifact(&self, a: &ArtifactRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO artifacts (sha256, arch, name, size, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (sha256, arch) DO UPDATE SET name = excluded.name",
            params![a.sha256, a.arch, a.name, i(a.size), i(a.created_ms)],
        )?;
        Ok(())
    }

    /// Every artifact, newest first.
    pub fn artifacts(&self) -> Result<Vec<ArtifactRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT sha256, arch, name, size, created_ms FROM artifacts
             ORDER BY created_ms DESC, sha256, arch",
        )?;
        let rows = st.query_map([], artifact_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The rows of one artifact (one per arch it was uploaded for).
    pub fn artifact(&self, sha256: &str) -> Result<Vec<ArtifactRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT sha256, arch, name, size, created_ms FROM artifacts WHERE sha256 = ?1
             ORDER BY arch",
        )?;
        let rows = st.query_map([sha256], artifact_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes every row of an artifact; returns how many.
    pub fn delete_artifact(&self, sha256: &str) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM artifacts WHERE sha256 = ?1", [sha256])?)
    }

    /// Spec versions whose JSON contains `needle` (a candidate filter; the
    /// caller parses the spec to be sure).
    pub fn services_containing(&self, needle: &str) -> Result<Vec<ServiceRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT name, version, spec, created_ms FROM services
             WHERE instr(spec, ?1) > 0 ORDER BY name, version",
        )?;
        let rows = st.query_map([needle], service_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- rollouts ----

    /// Stores a new rollout and returns its id. Fails (constraint) if the
    /// service already has one in progress.
    pub fn insert_rollout(&self, r: &RolloutRow) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO rollouts (service, from_version, to_version, state, policy, waves, wave,
                wave_started_ms, reason, started_ms, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                r.service,
                r.from_version,
                r.to_version,
                r.state,
                r.policy_json,
                r.waves_json,
                r.wave,
                i(r.wave_started_ms),
                r.reason,
                i(r.started_ms),
                r.finished_ms.map(i)
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Updates a rollout's progress; when `deployment_version` is given the
    /// deployment's version is set in the same transaction.
    pub fn update_rollout(
        &mut self,
        r: &RolloutRow,
        deployment_version: Option<u32>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE rollouts SET state = ?2, waves = ?3, wave = ?4, wave_started_ms = ?5,
                reason = ?6, finished_ms = ?7 WHERE id = ?1",
            params![
                r.id,
                r.state,
                r.waves_json,
                r.wave,
                i(r.wave_started_ms),
                r.reason,
                r.finished_ms.map(i)
            ],
        )?;
        if let Some(v) = deployment_version {
            tx.execute(
                "UPDATE deployments SET version = ?2, updated_ms = ?3 WHERE name = ?1",
                params![r.service, v, i(r.finished_ms.unwrap_or(r.wave_started_ms))],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Rollouts in progress, every service.
    pub fn active_rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {ROLLOUT_COLS} FROM rollouts WHERE state = 'in_progress' ORDER BY id"
        ))?;
        let rows = st.query_map([], rollout_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A service's rollouts, newest first, at most `limit`.
    pub fn rollouts(&self, service: &str, limit: usize) -> Result<Vec<RolloutRow>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {ROLLOUT_COLS} FROM rollouts WHERE service = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![service, limit as i64], rollout_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Restarts the clock of every rollout in progress (conductor start).
    pub fn restart_rollout_clocks(&self, now_ms: u64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE rollouts SET wave_started_ms = ?1 WHERE state = 'in_progress'",
            [i(now_ms)],
        )?)
    }

    // ---- per-worker overrides ----

    /// Sets (`Some("stopped")`) or clears (`None`) a per-worker override.
    pub fn set_override(
        &self,
        worker_id: &str,
        name: &str,
        desired: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        match desired {
            Some(d) => self.conn.execute(
                "INSERT INTO service_overrides (worker_id, name, desired, updated_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (worker_id, name) DO UPDATE SET desired = excluded.desired,
                    updated_ms = excluded.updated_ms",
                params![worker_id, name, d, i(now_ms)],
            )?,
            None => self.conn.execute(
                "DELETE FROM service_overrides WHERE worker_id = ?1 AND name = ?2",
                params![worker_id, name],
            )?,
        };
        Ok(())
    }

    /// Clears every override of service `name` (it was undeployed).
    pub fn delete_overrides_of(&self, name: &str) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM service_overrides WHERE name = ?1", [name])?)
    }

    /// Every override: `(worker_id, name, desired)`.
    pub fn overrides(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT worker_id, name, desired FROM service_overrides")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every stored service status.
    pub fn service_statuses(&self) -> Result<Vec<ServiceStatusRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT worker_id, name, version, state, pid, restarts, exit_code, detail, updated_ms
             FROM service_status ORDER BY worker_id, name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ServiceStatusRow {
                worker_id: r.get(0)?,
                name: r.get(1)?,
                version: r.get(2)?,
                state: r.get(3)?,
                pid: r.get(4)?,
                restarts: r.get(5)?,
                exit_code: r.get(6)?,
                detail: r.get(7)?,
                updated_ms: u(r.get(8)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- metrics ----

    /// Applies a batch of writes in one transaction.
    pub fn apply_batch(&mut self, ops: &[WriteOp]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut raw = tx.prepare_cached(
                "INSERT INTO metrics_raw (worker_id, received_at_ms, seq, frame) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut minute = tx.prepare_cached(
                "INSERT INTO metrics_minute (worker_id, minute_ms, n, cpu_sum, cpu_max, mem_used_sum,
                    mem_total, load1_sum, temp_max, disk_used, disk_total, rx_bps_sum, tx_bps_sum)
                 VALUES (?1, ?2, 1, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (worker_id, minute_ms) DO UPDATE SET
                    n = n + 1,
                    cpu_sum = cpu_sum + excluded.cpu_sum,
                    cpu_max = max(cpu_max, excluded.cpu_max),
                    mem_used_sum = mem_used_sum + excluded.mem_used_sum,
                    mem_total = excluded.mem_total,
                    load1_sum = load1_sum + excluded.load1_sum,
                    temp_max = CASE WHEN temp_max IS NULL THEN excluded.temp_max
                                    WHEN excluded.temp_max IS NULL THEN temp_max
                                    ELSE max(temp_max, excluded.temp_max) END,
                    disk_used = excluded.disk_used,
                    disk_total = excluded.disk_total,
                    rx_bps_sum = rx_bps_sum + excluded.rx_bps_sum,
                    tx_bps_sum = tx_bps_sum + excluded.tx_bps_sum",
            )?;
            let mut seen = tx.prepare_cached(
                "UPDATE workers SET replay_highest = ?2, replay_bitmap = ?3, last_seen_ms = ?4 WHERE id = ?1",
            )?;
            let mut status = tx.prepare_cached("UPDATE workers SET status = ?2 WHERE id = ?1")?;
            let mut inventory =
                tx.prepare_cached("UPDATE workers SET inventory = ?2 WHERE id = ?1")?;
            let mut svc = tx.prepare_cached(
                "INSERT INTO service_status (worker_id, name, version, state, pid, restarts,
                    exit_code, detail, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (worker_id, name) DO UPDATE SET
                    version = excluded.version, state = excluded.state, pid = excluded.pid,
                    restarts = excluded.restarts, exit_code = excluded.exit_code,
                    detail = excluded.detail, updated_ms = excluded.updated_ms",
            )?;
            let mut svc_clear =
                tx.prepare_cached("DELETE FROM service_status WHERE worker_id = ?1")?;
            let mut svc_del =
                tx.prepare_cached("DELETE FROM service_status WHERE worker_id = ?1 AND name = ?2")?;
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
                        raw.execute(params![worker_id, i(*received_at_ms), i(*seq), blob])?;
                        let minute_ms = received_at_ms - received_at_ms % 60_000;
                        minute.execute(params![
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
                        ])?;
                    }
                    WriteOp::Seen {
                        worker_id,
                        highest,
                        bitmap,
                        last_seen_ms,
                    } => {
                        if last_seen.get(worker_id.as_str()) == Some(&idx) {
                            seen.execute(params![
                                worker_id,
                                i(*highest),
                                i(*bitmap),
                                i(*last_seen_ms)
                            ])?;
                        }
                    }
                    WriteOp::Status {
                        worker_id,
                        status: s,
                    } => {
                        status.execute(params![worker_id, s])?;
                    }
                    WriteOp::Inventory { worker_id, json } => {
                        inventory.execute(params![worker_id, json])?;
                    }
                    WriteOp::ServiceStatus(r) => {
                        svc.execute(params![
                            r.worker_id,
                            r.name,
                            r.version,
                            r.state,
                            r.pid,
                            r.restarts,
                            r.exit_code,
                            r.detail,
                            i(r.updated_ms)
                        ])?;
                    }
                    WriteOp::ServiceRemoved { worker_id, name } => {
                        svc_del.execute(params![worker_id, name])?;
                    }
                    WriteOp::ServicesCleared { worker_id } => {
                        svc_clear.execute(params![worker_id])?;
                    }
                    WriteOp::SecretPromoted {
                        worker_id,
                        secret_hex,
                        previous_hex,
                        previous_until_ms,
                    } => {
                        tx.execute(
                            "UPDATE workers SET secret_hex = ?2 WHERE id = ?1",
                            params![worker_id, secret_hex],
                        )?;
                        tx.execute(
                            "INSERT INTO worker_secrets
                                (worker_id, pending_hex, previous_hex, previous_until_ms)
                             VALUES (?1, NULL, ?2, ?3)
                             ON CONFLICT (worker_id) DO UPDATE SET pending_hex = NULL,
                                previous_hex = excluded.previous_hex,
                                previous_until_ms = excluded.previous_until_ms",
                            params![worker_id, previous_hex, i(*previous_until_ms)],
                        )?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Raw samples `(received_at_ms, seq, postcard)` in `[from, to]`, oldest first.
    pub fn raw_metrics(
        &self,
        worker_id: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT received_at_ms, seq, frame FROM metrics_raw
             WHERE worker_id = ?1 AND received_at_ms >= ?2 AND received_at_ms <= ?3
             ORDER BY received_at_ms, seq LIMIT ?4",
        )?;
        let rows = st.query_map(
            params![worker_id, i(from_ms), i(to_ms), MAX_QUERY_ROWS as i64],
            |r| Ok((u(r.get(0)?), u(r.get(1)?), r.get(2)?)),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Minute aggregates in `[from, to]`, oldest first.
    pub fn minute_metrics(
        &self,
        worker_id: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<MinuteRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT minute_ms, n, cpu_sum, cpu_max, mem_used_sum, mem_total, load1_sum, temp_max,
                    disk_used, disk_total, rx_bps_sum, tx_bps_sum
             FROM metrics_minute
             WHERE worker_id = ?1 AND minute_ms >= ?2 AND minute_ms <= ?3
             ORDER BY minute_ms LIMIT ?4",
        )?;
        let rows = st.query_map(
            params![worker_id, i(from_ms), i(to_ms), MAX_QUERY_ROWS as i64],
            |r| {
                let n = u(r.get(1)?).max(1);
                let temp: Option<i64> = r.get(7)?;
                Ok(MinuteRow {
                    minute_ms: u(r.get(0)?),
                    n,
                    cpu_avg_percent: u(r.get(2)?) as f64 / n as f64 / 100.0,
                    cpu_max_percent: u(r.get(3)?) as f64 / 100.0,
                    mem_used_avg: u(r.get(4)?) / n,
                    mem_total: u(r.get(5)?),
                    load1_avg: u(r.get(6)?) as f64 / n as f64 / 100.0,
                    temp_max_celsius: temp.map(|t| t as f64 / 1000.0),
                    disk_used: u(r.get(8)?),
                    disk_total: u(r.get(9)?),
                    rx_bps_avg: u(r.get(10)?) / n,
                    tx_bps_avg: u(r.get(11)?) / n,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes history older than the cut-offs; returns rows removed.
    pub fn sweep(
        &mut self,
        raw_before_ms: u64,
        minute_before_ms: u64,
    ) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let a = tx.execute(
            "DELETE FROM metrics_raw WHERE received_at_ms < ?1",
            [i(raw_before_ms)],
        )?;
        let b = tx.execute(
            "DELETE FROM metrics_minute WHERE minute_ms < ?1",
            [i(minute_before_ms)],
        )?;
        tx.commit()?;
        Ok(a + b)
    }
}

/// Handle to the database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

const WORKER_COLS: &str = "id, machine_id, hostname, secret_hex, mqtt_password_sha256, labels,
    inventory, enrolled_at_ms, last_seen_ms, last_ip, revoked, replay_highest, replay_bitmap,
    cmd_seq, status";

fn worker_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkerRow> {
    Ok(WorkerRow {
        id: r.get(0)?,
        machine_id: r.get(1)?,
        hostname: r.get(2)?,
        secret_hex: r.get(3)?,
        mqtt_password_sha256: r.get(4)?,
        labels_json: r.get(5)?,
        inventory_json: r.get(6)?,
        enrolled_at_ms: u(r.get(7)?),
        last_seen_ms: r.get::<_, Option<i64>>(8)?.map(u),
        last_ip: r.get(9)?,
        revoked: r.get(10)?,
        replay_highest: u(r.get(11)?),
        replay_bitmap: u(r.get(12)?),
        cmd_seq: u(r.get(13)?),
        status: r.get(14)?,
    })
}

fn service_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServiceRow> {
    Ok(ServiceRow {
        name: r.get(0)?,
        version: r.get(1)?,
        spec_json: r.get(2)?,
        created_ms: u(r.get(3)?),
    })
}

fn deployment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRow> {
    Ok(DeploymentRow {
        name: r.get(0)?,
        version: r.get(1)?,
        workers_json: r.get(2)?,
        labels_json: r.get(3)?,
        desired: r.get(4)?,
        updated_ms: u(r.get(5)?),
        rollout_json: r.get(6)?,
    })
}

fn rollout_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.get(0)?,
        service: r.get(1)?,
        from_version: r.get(2)?,
        to_version: r.get(3)?,
        state: r.get(4)?,
        policy_json: r.get(5)?,
        waves_json: r.get(6)?,
        wave: r.get(7)?,
        wave_started_ms: u(r.get(8)?),
        reason: r.get(9)?,
        started_ms: u(r.get(10)?),
        finished_ms: r.get::<_, Option<i64>>(11)?.map(u),
    })
}

const ROLLOUT_COLS: &str = "id, service, from_version, to_version, state, policy, waves, wave,
    wave_started_ms, reason, started_ms, finished_ms";

fn artifact_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactRow> {
    Ok(ArtifactRow {
        sha256: r.get(0)?,
        arch: r.get(1)?,
        name: r.get(2)?,
        size: u(r.get(3)?),
        created_ms: u(r.get(4)?),
    })
}

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: r.get(2)?,
        created_ms: u(r.get(3)?),
        expires_ms: r.get::<_, Option<i64>>(4)?.map(u),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(s);
        s = Store::open(dir.path()).unwrap();
        let w = WorkerRow {
            id: "w-000000000001".into(),
            machine_id: "m".into(),
            hostname: "h".into(),
            secret_hex: "00".repeat(32),
            mqtt_password_sha256: "x".into(),
            labels_json: "{}".into(),
            inventory_json: None,
            enrolled_at_ms: 1,
            last_seen_ms: None,
            last_ip: None,
            revoked: false,
            replay_highest: 0,
            replay_bitmap: 0,
            cmd_seq: 0,
            status: "offline".into(),
        };
        s.insert_worker(&w).unwrap();
        let r = Rollup {
            cpu: 1000,
            temp_max: Some(50_000),
            ..Rollup::default()
        };
        let ops = vec![
            WriteOp::Metrics {
                worker_id: w.id.clone(),
                received_at_ms: 120_000,
                seq: 1,
                blob: vec![1, 2],
                rollup: r,
            },
            WriteOp::Metrics {
                worker_id: w.id.clone(),
                received_at_ms: 130_000,
                seq: 2,
                blob: vec![3],
                rollup: Rollup { cpu: 3000, ..r },
            },
            WriteOp::Seen {
                worker_id: w.id.clone(),
                highest: 2,
                bitmap: u64::MAX,
                last_seen_ms: 130_000,
            },
        ];
        s.apply_batch(&ops).unwrap();
        let m = s.minute_metrics(&w.id, 0, u64::MAX >> 1).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].n, 2);
        assert!((m[0].cpu_avg_percent - 20.0).abs() < 1e-9);
        assert!((m[0].cpu_max_percent - 30.0).abs() < 1e-9);
        let back = s.worker(&w.id).unwrap().unwrap();
        assert_eq!(back.replay_bitmap, u64::MAX);
        assert_eq!(s.raw_metrics(&w.id, 0, 125_000).unwrap().len(), 1);
        assert_eq!(s.sweep(125_000, 0).unwrap(), 1);
    }
}
