//! Persistence: SQLite by default, PostgreSQL with `--store postgres://…`.
//!
//! SQLite: one database file, `<data_dir>/conductor.db`, in WAL mode with
//! `synchronous=NORMAL` and a busy timeout. The schema is versioned with
//! `PRAGMA user_version`: [`MIGRATIONS`] is an append-only list of SQL steps,
//! each applied in its own transaction together with the version bump, so a
//! crash mid-migration leaves the previous version intact.
//!
//! PostgreSQL ([`Store::open_postgres`]): the same migrations, their column
//! types mapped by [`sql::pg_ddl`], the version in table `aerekos_schema`,
//! each step under an advisory lock so conductors starting together migrate
//! once. A few steps are PostgreSQL's alone (`PG_STEPS`, counted in
//! `aerekos_schema.pg_steps`): since the one after v9 the metrics tables
//! are partitioned by UTC day there, and retention drops whole partitions
//! ([`partitions`]). Every statement is written once for both engines
//! ([`sql`] states the shared dialect); the store tests run on both
//! (`each_engine`) and so does the conductor's integration suite
//! (`AEREKOS_TEST_STORE=postgres`).
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
//!
//! Layout: this file holds the [`Store`] handle, [`Store::open`], the
//! migrations and the shared helpers; each table family has its own
//! `impl Store` under `store/`: `settings.rs` (settings, users, tokens),
//! `workers.rs` (workers, secret rotation), `metrics.rs` (raw and per-minute
//! metrics, retention), `partitions.rs` (PostgreSQL: the metrics tables'
//! hour and day partitions and their retention), `notes.rs` (what workers
//! said that the rollouts read later, schema v10), `worker_partitions.rs`
//! (PostgreSQL: which active conductor owns which workers),
//! `services.rs` (specs, deployments,
//! overrides, status), `artifacts.rs`, `rollouts.rs`, `alerts.rs` (rules, alerts,
//! receivers, the notification outbox), `exec.rs` (the remote exec audit,
//! schema v6), `agent_updates.rs` (agent releases and agent rollouts,
//! schema v7) and `batch.rs` (the ingest writer's [`WriteOp`] batches).
//!
//! Schema v8: `api_tokens.role` (`admin`, `operator` or `viewer`; tokens
//! from before v8 are `admin`) and `exec_sessions.kind` (`exec` or
//! `shell`; rows from before v8 are `exec`). v9: `workers.board`. v10 (the
//! current one): `worker_notes` (`notes.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use sql::{params, Db};

mod agent_updates;
mod alerts;
mod artifacts;
mod batch;
mod exec;
pub mod lease;
mod metrics;
pub mod notes;
pub mod partitions;
pub mod pg_tls;
mod rollouts;
mod services;
mod settings;
pub mod sql;
pub mod worker_partitions;
mod workers;

pub use agent_updates::{AgentReleaseRow, AgentRolloutRow};
pub use alerts::{AlertRow, AlertRuleRow, NotificationRow, ReceiverRow};
pub use artifacts::ArtifactRow;
pub use batch::WriteOp;
pub use exec::ExecSessionRow;
pub use metrics::{LatestSample, MinuteRow, Rollup};
pub use rollouts::RolloutRow;
pub use services::{DeploymentRow, ServiceRow, ServiceStatusRow};
pub use settings::TokenRow;
pub use workers::{SecretRotationRow, WorkerRow};

/// Most rows a metrics query returns.
pub const MAX_QUERY_ROWS: usize = 10_000;

/// Schema steps; index + 1 is the `user_version` after the step. Append only.
///
/// On PostgreSQL the metrics tables are partitioned by day after v9
/// (`PG_STEPS`, [`partitions`]): a later step on them must be one a
/// partitioned table takes (columns and indexes are; a unique index must
/// include the time column).
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
    // v5: alerts. `alert_rules` (the rule itself as JSON, parsed by
    // `crate::alerts`), `alerts` (one row per firing, at most one firing per
    // rule and subject), `alert_receivers` (webhooks) and
    // `alert_notifications`, the delivery outbox: written in the same
    // transaction as the state change it reports, so a restart neither
    // loses nor repeats one.
    "CREATE TABLE alert_rules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        created_ms INTEGER NOT NULL);
     CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule_id INTEGER NOT NULL,
        rule_name TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('firing', 'resolved')),
        summary TEXT NOT NULL,
        value REAL,
        fired_ms INTEGER NOT NULL,
        resolved_ms INTEGER,
        resolved_why TEXT NOT NULL DEFAULT '');
     CREATE UNIQUE INDEX alerts_one_firing ON alerts (rule_id, subject)
        WHERE state = 'firing';
     CREATE INDEX alerts_by_time ON alerts (fired_ms);
     CREATE TABLE alert_receivers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_ms INTEGER NOT NULL);
     CREATE TABLE alert_notifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id INTEGER NOT NULL,
        receiver_id INTEGER NOT NULL,
        event TEXT NOT NULL CHECK (event IN ('firing', 'resolved')),
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        delivered_ms INTEGER,
        last_error TEXT NOT NULL DEFAULT '',
        UNIQUE (alert_id, receiver_id, event));
     CREATE INDEX alert_notifications_due ON alert_notifications (receiver_id, id)
        WHERE delivered_ms IS NULL;",
    // v6: the remote exec audit (`store/exec.rs`).
    "CREATE TABLE exec_sessions (
        id TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        token_name TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        argv TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER,
        exit_code INTEGER,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        outcome TEXT NOT NULL DEFAULT '');
     CREATE INDEX exec_sessions_by_time ON exec_sessions (started_ms);",
    // v7: agent self-update (`store/agent_updates.rs`): signed agent releases
    // (one per version and arch, the binary an artifact) and agent rollouts
    // (at most one in progress, enforced by a partial unique index; the
    // members' outcomes as JSON).
    "CREATE TABLE agent_releases (
        version TEXT NOT NULL,
        arch TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        signature TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (version, arch));
     CREATE INDEX agent_releases_by_sha ON agent_releases (sha256);
     CREATE TABLE agent_rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        version TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('in_progress', 'succeeded', 'reverted')),
        policy TEXT NOT NULL,
        selector TEXT NOT NULL DEFAULT '{}',
        waves TEXT NOT NULL,
        wave INTEGER NOT NULL,
        wave_started_ms INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        members TEXT NOT NULL DEFAULT '{}');
     CREATE UNIQUE INDEX agent_rollouts_one_in_progress ON agent_rollouts (state)
        WHERE state = 'in_progress';",
    // v8: token roles (`admin`, `operator`, `viewer`; tokens from before are
    // admin, as they could do everything) and the kind of an audited remote
    // session (`exec` or `shell`; rows from before are exec).
    "ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
     ALTER TABLE exec_sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'exec';",
    // v9: a Raspberry Pi's last board frame (revision, serial, SD card,
    // throttling bits) as JSON; NULL for any other machine.
    "ALTER TABLE workers ADD COLUMN board TEXT;",
    // v10: what a worker said that a fleet-wide loop reads later (service
    // failures for rollouts, agent update notes), kept across restarts and
    // takeovers (`notes`).
    "CREATE TABLE worker_notes (
        worker_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        version TEXT,
        ok INTEGER NOT NULL,
        what TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (worker_id, kind, subject));",
];

/// A PostgreSQL-only schema step ([`PG_STEPS`]).
struct PgStep {
    /// Runs right after shared step `after` (the version it leaves).
    after: usize,
    /// Applies it, inside the step's transaction.
    run: fn(&sql::Db) -> Result<(), StoreError>,
}

/// Schema steps PostgreSQL alone takes, in order, each after the shared
/// step its `after` names: index + 1 is `aerekos_schema.pg_steps` after the
/// step. Append only, `after` never decreasing. SQLite's schema and its
/// numbering are [`MIGRATIONS`]' alone.
const PG_STEPS: &[PgStep] = &[
    // After v9: the metrics tables partitioned by UTC day (`partitions`).
    PgStep {
        after: 9,
        run: partitions::convert,
    },
];

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("postgres: {}", pg_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
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
    /// The PostgreSQL database has taken more PostgreSQL-only schema steps
    /// than this conductor knows (a newer one migrated it).
    #[error("database PostgreSQL schema step {0} is newer than this conductor understands")]
    TooNewPg(i64),
    /// A query that must return a row returned none.
    #[error("the query returned no row")]
    NoRow,
    /// A column held something else than the code reads from it.
    #[error("column {idx}: wanted {want}, found {got}")]
    Column {
        /// Column index.
        idx: usize,
        /// The Rust type read.
        want: &'static str,
        /// What the column held.
        got: &'static str,
    },
    /// A PostgreSQL column type the store does not read.
    #[error("postgres column {column} has type {ty}, which the store does not read")]
    PgType {
        /// Column name.
        column: String,
        /// Its type.
        ty: String,
    },
    /// The PostgreSQL connection broke inside a transaction: the
    /// transaction is lost (the server rolls it back) and nothing of it
    /// was committed.
    #[error("postgres: the connection was lost inside a transaction, which was rolled back")]
    PgLostInTransaction,
    /// A pinned PostgreSQL connection (the lease's) was lost; it is not
    /// made again.
    #[error("postgres: the lease connection was lost")]
    PgPinnedLost,
    /// This conductor no longer holds the store's lease (another took it,
    /// or it is being taken again): its writes are refused
    /// ([`lease`] module docs).
    #[error("fenced: this conductor does not hold the store lease")]
    Fenced,
    /// PostgreSQL could not be reached at the last attempt, which was too
    /// recent to try again (`sql::RECONNECT_FIRST`..`RECONNECT_MAX`).
    #[error("postgres: down (reconnecting)")]
    PgDown,
    /// PostgreSQL did not answer in time.
    #[error("postgres: no answer within {0:?}")]
    PgTimeout(std::time::Duration),
    /// The PostgreSQL connection thread is gone (it panicked).
    #[error("postgres: the connection thread stopped")]
    PgThreadGone,
    /// The `--store` URL's TLS settings (or the URL itself) cannot be used.
    #[error("postgres: {0}")]
    PgSettings(String),
    /// The store's workers are split into another number of partitions than
    /// this conductor was given ([`worker_partitions`]).
    #[error(
        "the store's workers are split into {stored} partitions, this conductor was given \
         {given}: every conductor of a fleet must use the same number"
    )]
    PartitionCount {
        /// The number the store was set up with.
        stored: u16,
        /// This conductor's.
        given: u16,
    },
}

/// The server's own words for a database error (`tokio_postgres::Error`'s
/// Display says only "db error"), else the client's with its causes (a
/// TLS handshake's says why the certificate was refused).
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let more = c.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                cause = c.source();
            }
            text
        }
    }
}

impl StoreError {
    /// The database could not be reached or was busy (PostgreSQL down,
    /// restarting, refusing connections; SQLite locked): retrying later
    /// may succeed, unlike a refused statement.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            // No server error: I/O, a closed connection, a refused connect.
            // Class 08: connection exception; 57: operator intervention
            // (admin shutdown, cannot connect now); 53: insufficient
            // resources (too many connections).
            StoreError::Postgres(e) => e.as_db_error().is_none_or(|db| {
                ["08", "57", "53"]
                    .iter()
                    .any(|class| db.code().code().starts_with(class))
            }),
            StoreError::PgLostInTransaction | StoreError::Fenced | StoreError::PgDown => true,
            _ => false,
        }
    }

    /// A constraint (unique, check, not null) refused the write: a
    /// conflict with another writer, not a broken store.
    pub fn is_constraint_violation(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            // Class 23: integrity constraint violation.
            StoreError::Postgres(e) => e.code().is_some_and(|c| c.code().starts_with("23")),
            _ => false,
        }
    }
}

/// Where the store lives: `--store` (`sqlite` in the data directory, the
/// default, or a `postgres://` URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `<dir>/conductor.db`.
    Sqlite(PathBuf),
    /// A PostgreSQL server (the URL as given, password included).
    Postgres(String),
}

impl StoreLocation {
    /// `--store`'s value with the data directory: `None`, empty or
    /// `sqlite` is the SQLite file in `data_dir`; `postgres://…` or
    /// `postgresql://…` a server.
    pub fn parse(store: Option<&str>, data_dir: &Path) -> Result<StoreLocation, String> {
        match store.map(str::trim) {
            None | Some("" | "sqlite") => Ok(StoreLocation::Sqlite(data_dir.to_path_buf())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreLocation::Postgres(url.to_owned()))
            }
            Some(other) => Err(format!(
                "--store {}: expected sqlite or a postgres:// URL",
                crate::config::redact_url(other)
            )),
        }
    }

    /// A config's `store` with its `data_dir`. Checked here when the
    /// conductor starts, not in `Config::validate`: the store module
    /// depends on the config module, not the other way round.
    pub fn of(config: &crate::config::Config) -> Result<StoreLocation, String> {
        StoreLocation::parse(config.store.as_deref(), Path::new(&config.data_dir))
    }

    /// For logs: the path, or the URL without its password.
    pub fn shown(&self) -> String {
        match self {
            StoreLocation::Sqlite(dir) => dir.join("conductor.db").display().to_string(),
            StoreLocation::Postgres(url) => crate::config::redact_url(url),
        }
    }
}

/// Handle to the database.
#[derive(Debug)]
pub struct Store {
    /// SQLite or PostgreSQL; every statement goes through it.
    conn: Db,
    /// The lease epoch the ingest writer's batches are fenced with (shared
    /// PostgreSQL store only; [`lease`]): a batch commits only while the
    /// store's epoch is this one. `None`: unfenced (SQLite, tools).
    fence: Option<lease::Fence>,
}

// Bit-preserving on purpose: u64 columns (bitmaps, sums) round-trip
// through SQLite's i64, so the wrap is undone by `u`.
#[allow(clippy::cast_possible_wrap)]
fn i(v: u64) -> i64 {
    v as i64
}

// Bit-preserving on purpose: the inverse of `i`.
#[allow(clippy::cast_sign_loss)]
fn u(v: i64) -> u64 {
    v as u64
}

/// A count as an SQLite integer, saturating: the counts stored here are far
/// below `i64::MAX`, and a `LIMIT` that does not fit means no limit.
fn int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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
        conn.set_prepared_statement_cache_capacity(128);
        let mut store = Store {
            conn: Db::Sqlite(conn),
            fence: None,
        };
        store.migrate_sqlite()?;
        Ok(store)
    }

    /// Opens the store at `at` and migrates it.
    pub fn open_at(at: &StoreLocation) -> Result<Store, StoreError> {
        match at {
            StoreLocation::Sqlite(dir) => Store::open(dir),
            StoreLocation::Postgres(url) => Store::open_postgres(url),
        }
    }

    /// Connects to a PostgreSQL server and migrates its schema. Several
    /// conductors may do this at once: each step runs under a transaction
    /// -scoped advisory lock, and a step another conductor applied first is
    /// skipped. The PostgreSQL-only steps (`PG_STEPS`) run the same way,
    /// counted in `aerekos_schema.pg_steps`. Then the metrics tables' day
    /// partitions of today and the next days are made ([`partitions`]).
    pub fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let mut store = Store {
            conn: Db::Postgres(sql::PgConn::connect(url)?),
            fence: None,
        };
        {
            let tx = store.conn.begin()?;
            tx.batch(&format!(
                "SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"
            ))?;
            tx.batch("CREATE TABLE IF NOT EXISTS aerekos_schema (version BIGINT NOT NULL)")?;
            tx.execute(
                "INSERT INTO aerekos_schema (version)
                 SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM aerekos_schema)",
                params![],
            )?;
            // The lease's fencing epoch (`store::lease`), one row.
            tx.batch("CREATE TABLE IF NOT EXISTS aerekos_lease (epoch BIGINT NOT NULL)")?;
            tx.execute(
                "INSERT INTO aerekos_lease (epoch)
                 SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM aerekos_lease)",
                params![],
            )?;
            // Since issue 19: the API URL the holder advertises
            // (`--advertise-url`), which standbys forward requests to. The
            // lease table is PostgreSQL's alone, so its columns are added
            // here, idempotently under the migration lock, not in the shared
            // `MIGRATIONS`.
            tx.batch("ALTER TABLE aerekos_lease ADD COLUMN IF NOT EXISTS api_url TEXT")?;
            // Since issue 19: which conductor owns each partition of the
            // workers, and its fencing epoch (`worker_partitions`); rows
            // are made by the first conductor that joins.
            tx.batch(
                "CREATE TABLE IF NOT EXISTS aerekos_partition (
                    partition BIGINT PRIMARY KEY,
                    epoch BIGINT NOT NULL DEFAULT 0,
                    owner TEXT)",
            )?;
            // The PostgreSQL-only steps taken (`PG_STEPS`).
            tx.batch(
                "ALTER TABLE aerekos_schema ADD COLUMN IF NOT EXISTS pg_steps BIGINT NOT NULL DEFAULT 0",
            )?;
            tx.commit()?;
        }
        store.pg_steps_after(0)?;
        for (idx, step) in MIGRATIONS.iter().enumerate() {
            store.migrate_postgres_step(idx, step)?;
            store.pg_steps_after(idx + 1)?;
        }
        store.prepare_partitions_ahead()?;
        Ok(store)
    }

    /// Shared step `idx` on PostgreSQL, unless taken already.
    fn migrate_postgres_step(&self, idx: usize, step: &str) -> Result<(), StoreError> {
        let tx = self.conn.begin()?;
        tx.batch(&format!(
            "SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"
        ))?;
        let version: i64 = tx.query_row("SELECT version FROM aerekos_schema", params![], |r| {
            r.get(0)
        })?;
        if version > int(MIGRATIONS.len()) {
            return Err(StoreError::TooNew(version));
        }
        if version > int(idx) {
            return Ok(());
        }
        tx.batch(&sql::pg_ddl(step))?;
        tx.execute(
            "UPDATE aerekos_schema SET version = ?1",
            params![int(idx + 1)],
        )?;
        tx.commit()
    }

    /// The PostgreSQL-only steps that follow shared version `version`,
    /// each in its own transaction under the migration lock, unless taken
    /// already.
    fn pg_steps_after(&self, version: usize) -> Result<(), StoreError> {
        for (idx, step) in PG_STEPS.iter().enumerate() {
            if step.after != version {
                continue;
            }
            let tx = self.conn.begin()?;
            tx.batch(&format!(
                "SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"
            ))?;
            let done: i64 =
                tx.query_row("SELECT pg_steps FROM aerekos_schema", params![], |r| {
                    r.get(0)
                })?;
            if done > int(PG_STEPS.len()) {
                return Err(StoreError::TooNewPg(done));
            }
            if done > int(idx) {
                continue;
            }
            (step.run)(&tx)?;
            tx.execute(
                "UPDATE aerekos_schema SET pg_steps = ?1",
                params![int(idx + 1)],
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    fn migrate_sqlite(&mut self) -> Result<(), StoreError> {
        let Db::Sqlite(conn) = &mut self.conn else {
            return Ok(());
        };
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > int(MIGRATIONS.len()) {
            return Err(StoreError::TooNew(version));
        }
        // A negative version is 0; a positive one is at most MIGRATIONS.len().
        let done = usize::try_from(version).unwrap_or(0);
        for (idx, sql) in MIGRATIONS.iter().enumerate().skip(done) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", int(idx + 1))?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Current schema version.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        match &self.conn {
            Db::Sqlite(c) => Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?),
            Db::Postgres(_) => {
                self.conn
                    .query_row("SELECT version FROM aerekos_schema", params![], |r| {
                        r.get(0)
                    })
            }
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        self.conn.engine()
    }

    /// Fences this connection's batches with `fence` (the ingest writer's,
    /// on a shared PostgreSQL store).
    pub fn set_fence(&mut self, fence: lease::Fence) {
        self.fence = Some(fence);
    }

    /// Fences every write on this connection with `fence` (shared
    /// PostgreSQL store; SQLite has no lease): each statement that changes
    /// rows outside a transaction runs in one with the fence check, and a
    /// transaction that wrote checks the fence before it commits; either
    /// fails with [`StoreError::Fenced`], writing nothing, once another
    /// conductor took the lease. Not for the ingest writer's connection,
    /// whose batches carry the check themselves ([`Store::set_fence`]).
    pub fn fence_writes(&mut self, fence: lease::Fence) {
        if let Db::Postgres(p) = &self.conn {
            p.fence_writes(fence);
        }
    }

    /// This conductor is stopping for good after losing its lease: held
    /// batches are dropped rather than retried.
    pub fn fence_stopped(&self) -> bool {
        self.fence.as_ref().is_some_and(lease::Fence::stopped)
    }
}

/// The advisory lock key the migrations run under (PostgreSQL): any fixed
/// number other programs sharing the database do not use; these are the
/// ASCII bytes of "aerekos1".
const PG_MIGRATION_LOCK: i64 = 0x6165_7265_6b6f_7331;

/// Runs `f` on a new SQLite store and, where PostgreSQL is installed (CI
/// requires it: `AEREKOS_REQUIRE_POSTGRES=1`), on a real server's, so each
/// store test holds for both engines.
#[cfg(test)]
pub(crate) fn each_engine(f: impl Fn(&mut Store)) {
    let dir = tempfile::tempdir().unwrap();
    f(&mut Store::open(dir.path()).unwrap());
    if let Some(pg) = test_support::postgres::Postgres::start() {
        let mut s = Store::open_postgres(&pg.url()).unwrap();
        assert_eq!(s.engine(), "postgres");
        f(&mut s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v6_database_gains_the_agent_tables_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut conn = Connection::open(dir.path().join("conductor.db")).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..6] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 6).unwrap();
            tx.execute("INSERT INTO settings (k, v) VALUES ('kept', 'yes')", [])
                .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.schema_version().unwrap(),
            i64::try_from(MIGRATIONS.len()).unwrap()
        );
        assert_eq!(s.setting("kept").unwrap().as_deref(), Some("yes"));
        assert!(s.agent_releases().unwrap().is_empty());
        assert!(s.active_agent_rollout().unwrap().is_none());
    }

    #[test]
    fn a_v7_database_keeps_its_rows_its_tokens_become_admin_and_its_sessions_exec() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut conn = Connection::open(dir.path().join("conductor.db")).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..7] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 7).unwrap();
            tx.execute(
                "INSERT INTO api_tokens (id, name, token_sha256, kind, created_ms, expires_ms)
                 VALUES ('t-old', 'ci', 'aa', 'api', 1, NULL),
                        ('t-ses', 'session admin', 'bb', 'session', 2, 99999999999999)",
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO exec_sessions (id, token_id, token_name, worker_id, argv,
                    started_ms, ended_ms, exit_code, bytes_out, outcome)
                 VALUES ('s1', 't-old', 'ci', 'w-1', '[\"ls\"]', 5, 6, 0, 3, 'exited')",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.schema_version().unwrap(),
            i64::try_from(MIGRATIONS.len()).unwrap()
        );
        let api = s.list_tokens("api").unwrap();
        assert_eq!(api.len(), 1);
        assert_eq!(
            (
                api[0].id.as_str(),
                api[0].name.as_str(),
                api[0].role.as_str()
            ),
            ("t-old", "ci", "admin")
        );
        let session = s.token_by_hash("bb", 3).unwrap().unwrap();
        assert_eq!(
            (session.kind.as_str(), session.role.as_str()),
            ("session", "admin")
        );
        let audit = s.exec_sessions(10).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (
                audit[0].id.as_str(),
                audit[0].kind.as_str(),
                audit[0].outcome.as_str()
            ),
            ("s1", "exec", "exited")
        );
    }

    #[test]
    fn postgres_only_steps_follow_shared_steps_in_order() {
        let mut after = 0;
        for step in PG_STEPS {
            assert!(step.after >= after, "PG_STEPS out of order");
            assert!(step.after <= MIGRATIONS.len());
            after = step.after;
        }
    }

    #[test]
    fn migrates_once_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.schema_version().unwrap(),
            i64::try_from(MIGRATIONS.len()).unwrap()
        );
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
            board_json: None,
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
        assert_eq!(back.board_json, None, "not a Pi (yet)");
        assert_eq!(s.raw_metrics(&w.id, 0, 125_000).unwrap().len(), 1);
        assert_eq!(s.sweep(125_000, 0).unwrap(), 1);
        // A board frame is kept; re-enrolment does not touch it.
        s.apply_batch(&[WriteOp::Board {
            worker_id: w.id.clone(),
            json: "{\"throttled\":327685}".into(),
        }])
        .unwrap();
        s.update_reenrol(&w).unwrap();
        let back = s.worker(&w.id).unwrap().unwrap();
        assert_eq!(back.board_json.as_deref(), Some("{\"throttled\":327685}"));
    }
}
