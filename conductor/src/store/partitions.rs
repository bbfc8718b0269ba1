//! PostgreSQL only: the metrics tables partitioned by UTC day, and their
//! retention by dropping whole partitions. SQLite keeps the plain tables of
//! schema v1 and deletes rows (`metrics.rs`).
//!
//! `metrics_raw` is range-partitioned on `received_at_ms`, `metrics_minute`
//! on `minute_ms`: one partition per UTC day, `<table>_pYYYYMMDD`, holding
//! `[day × 86 400 000, (day + 1) × 86 400 000)`, and `<table>_default`, the
//! DEFAULT partition, for rows of a day that has none (a worker whose clock
//! is far off, rows written by a conductor from before partitioning). The
//! statements of `metrics.rs`, `batch.rs` and `workers.rs` are the same on
//! both engines: a history query bounds the time column, so PostgreSQL
//! reads only the partitions of its range.
//!
//! - `convert`: the PostgreSQL-only schema step that turns the plain
//!   tables of an existing database into partitioned ones
//!   (`store::PG_STEPS`). Every row is copied: the day partitions of the
//!   days holding rows (from [`CONVERT_DAYS_BACK`] back to
//!   [`AHEAD_DAYS`] ahead) are made before the copy; rows outside that
//!   window go to DEFAULT.
//! - `ensure_days`: the partitions of today and the next [`AHEAD_DAYS`]
//!   are made at open ([`Store::open_postgres`]) and by every retention
//!   sweep. Making one that exists is a no-op. When DEFAULT already holds
//!   rows of the new partition's day (which PostgreSQL refuses for a new
//!   partition), they are moved into it in the same transaction, with a
//!   warning: skipping instead would leave that day without a partition
//!   for good, its rows (a whole day of the fleet's, after an older
//!   conductor ran) deleted row by row, and warn at every sweep.
//! - `Store::sweep_postgres` (behind [`Store::sweep`]): the day partitions
//!   wholly older than the cut-off are dropped (`DROP TABLE`); the rows
//!   older than it in the cut-off's own day and in DEFAULT are deleted. It
//!   waits [`SWEEP_LOCK_WAIT_S`] at most for a table's lock (a drop waits
//!   for the queries reading the table), then fails; the next sweep tries
//!   again.
//!
//! Every change here runs in one transaction under the migration lock
//! (`PG_MIGRATION_LOCK`: conductors starting at once, or one starting while
//! the active one sweeps, take turns) and, on a fenced store, after the
//! fence check (`Store::partition_tx`): a conductor that lost the lease
//! creates, moves and drops nothing. PostgreSQL's DDL is transactional, so
//! a failure anywhere rolls the drops back too.
//!
//! Partition names are the source of truth for their bounds: only the
//! partitions attached to a metrics table and named as above are dropped.
//! Limits: the conversion copies every row once, in one transaction, while
//! other conductors wait on the lock; a day's rows found in DEFAULT are
//! moved in one statement; each new partition makes PostgreSQL scan DEFAULT
//! (retention keeps it small). A partition is a day wide: a retention of
//! hours still deletes most rows one by one.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use super::sql::{params, Db, Tx};
use super::{i, lease, Store, StoreError, PG_MIGRATION_LOCK};

/// One UTC day in ms: the partitions' width.
pub const DAY_MS: i64 = 86_400_000;
/// Partitions exist for today and this many days after it.
pub const AHEAD_DAYS: i64 = 2;
/// The conversion makes day partitions for rows at most this many days old.
pub const CONVERT_DAYS_BACK: i64 = 1_000;

/// How long a sweep waits for a table's lock, in seconds.
pub const SWEEP_LOCK_WAIT_S: u32 = 10;

/// The partitioned tables and their partition key.
const TABLES: [(&str, &str); 2] = [
    ("metrics_raw", "received_at_ms"),
    ("metrics_minute", "minute_ms"),
];

/// The Julian day of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

/// Now, in ms since the epoch.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The UTC day (days since 1970-01-01) of a time in ms.
pub(super) fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// A day's `YYYYMMDD`; `None` outside years 0 to 9999 (such rows stay in
/// DEFAULT).
fn ymd(day: i64) -> Option<String> {
    let julian = day.checked_add(i64::from(UNIX_EPOCH_JULIAN_DAY))?;
    let date = time::Date::from_julian_day(i32::try_from(julian).ok()?).ok()?;
    (0..=9999).contains(&date.year()).then(|| {
        format!(
            "{:04}{:02}{:02}",
            date.year(),
            u8::from(date.month()),
            date.day()
        )
    })
}

/// The day of a `YYYYMMDD`.
fn parse_ymd(s: &str) -> Option<i64> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = s.get(..4)?.parse().ok()?;
    let month: u8 = s.get(4..6)?.parse().ok()?;
    let day: u8 = s.get(6..)?.parse().ok()?;
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    Some(i64::from(date.to_julian_day()) - i64::from(UNIX_EPOCH_JULIAN_DAY))
}

/// The name of `table`'s partition for `day`.
pub fn partition_name(table: &str, day: i64) -> Option<String> {
    ymd(day).map(|d| format!("{table}_p{d}"))
}

/// `table`'s day partitions: (day, name), oldest first. DEFAULT, and
/// anything not named `<table>_pYYYYMMDD`, is left out.
fn day_partitions(db: &Db, table: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let names: Vec<String> = db.query_map(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass(?1)",
        params![table],
        |r| r.get(0),
    )?;
    let prefix = format!("{table}_p");
    let mut days: Vec<(i64, String)> = names
        .into_iter()
        .filter_map(|n| {
            let day = parse_ymd(n.strip_prefix(&prefix)?)?;
            Some((day, n))
        })
        .collect();
    days.sort();
    Ok(days)
}

/// Makes `table`'s partitions for `days` that do not exist yet, moving
/// rows of those days out of DEFAULT (module docs); the names made. Run
/// under the migration lock.
fn ensure_days(
    db: &Db,
    table: &str,
    col: &str,
    days: impl IntoIterator<Item = i64>,
) -> Result<Vec<String>, StoreError> {
    let have: BTreeSet<i64> = day_partitions(db, table)?
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let mut made = Vec::new();
    for day in days {
        if have.contains(&day) {
            continue;
        }
        let Some(name) = partition_name(table, day) else {
            continue;
        };
        // Within years 0..=9999: no overflow.
        let (lo, hi) = (day * DAY_MS, (day + 1) * DAY_MS);
        let in_default: bool = db.query_row(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {table}_default WHERE {col} >= ?1 AND {col} < ?2)"
            ),
            params![lo, hi],
            |r| r.get(0),
        )?;
        if in_default {
            // Made detached, filled, then attached: PostgreSQL refuses a new
            // partition whose rows DEFAULT still holds.
            db.batch(&format!(
                "CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS);
                 WITH moved AS (
                    DELETE FROM {table}_default WHERE {col} >= {lo} AND {col} < {hi}
                    RETURNING *)
                 INSERT INTO {name} SELECT * FROM moved;
                 ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})"
            ))?;
            tracing::warn!(
                partition = %name,
                "the DEFAULT partition held rows of this day: moved into the new day partition"
            );
        } else {
            db.batch(&format!(
                "CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ({lo}) TO ({hi})"
            ))?;
        }
        made.push(name);
    }
    Ok(made)
}

/// Today and the next [`AHEAD_DAYS`].
fn ahead(now_ms: i64) -> RangeInclusive<i64> {
    let today = day_of(now_ms);
    today..=today + AHEAD_DAYS
}

/// The PostgreSQL-only schema step after v9 (`store::PG_STEPS`): the plain
/// metrics tables become partitioned ones holding the same rows. Runs in
/// the migration's transaction, under its lock.
pub(super) fn convert(db: &Db) -> Result<(), StoreError> {
    let now = now_ms();
    let today = day_of(now);
    for (table, col) in TABLES {
        let old = format!("{table}_unpartitioned");
        db.batch(&format!("ALTER TABLE {table} RENAME TO {old}"))?;
        // The days holding rows, within the window; the rest go to DEFAULT.
        let days: Vec<i64> = db.query_map(
            &format!(
                "SELECT DISTINCT {col} / {DAY_MS} FROM {old} WHERE {col} >= ?1 AND {col} < ?2"
            ),
            params![
                (today - CONVERT_DAYS_BACK) * DAY_MS,
                (today + AHEAD_DAYS + 1) * DAY_MS
            ],
            |r| r.get(0),
        )?;
        // The indexes keep their names (schema-wide, so the old ones go);
        // v1's definitions.
        db.batch(&match table {
            "metrics_raw" => "DROP INDEX metrics_raw_by_worker;
                 DROP INDEX metrics_raw_by_time;
                 CREATE TABLE metrics_raw (LIKE metrics_raw_unpartitioned INCLUDING DEFAULTS)
                    PARTITION BY RANGE (received_at_ms);
                 CREATE INDEX metrics_raw_by_worker ON metrics_raw (worker_id, received_at_ms);
                 CREATE INDEX metrics_raw_by_time ON metrics_raw (received_at_ms);
                 CREATE TABLE metrics_raw_default PARTITION OF metrics_raw DEFAULT"
                .to_owned(),
            _ => "ALTER TABLE metrics_minute_unpartitioned DROP CONSTRAINT metrics_minute_pkey;
                 DROP INDEX metrics_minute_by_time;
                 CREATE TABLE metrics_minute (
                    LIKE metrics_minute_unpartitioned INCLUDING DEFAULTS,
                    PRIMARY KEY (worker_id, minute_ms))
                    PARTITION BY RANGE (minute_ms);
                 CREATE INDEX metrics_minute_by_time ON metrics_minute (minute_ms);
                 CREATE TABLE metrics_minute_default PARTITION OF metrics_minute DEFAULT"
                .to_owned(),
        })?;
        let wanted: BTreeSet<i64> = days.into_iter().chain(ahead(now)).collect();
        ensure_days(db, table, col, wanted)?;
        db.batch(&format!(
            "INSERT INTO {table} SELECT * FROM {old}; DROP TABLE {old}"
        ))?;
    }
    Ok(())
}

impl Store {
    /// Makes the day partitions of both metrics tables covering `[from_ms,
    /// to_ms]` that do not exist yet (PostgreSQL; nothing on SQLite),
    /// moving rows of those days out of DEFAULT; how many were made.
    /// Fenced as any write. Today's and the next days' are made at open
    /// and by [`Store::sweep`]; this is for other days (a backfill, tests).
    pub fn prepare_metric_partitions(
        &mut self,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<usize, StoreError> {
        if !matches!(self.conn, Db::Postgres(_)) {
            return Ok(0);
        }
        let tx = self.partition_tx()?;
        let mut made = 0;
        for (table, col) in TABLES {
            made += ensure_days(&tx, table, col, day_of(i(from_ms))..=day_of(i(to_ms)))?.len();
        }
        tx.commit()?;
        Ok(made)
    }

    /// Today's and the next [`AHEAD_DAYS`] days' partitions (at open).
    pub(super) fn prepare_partitions_ahead(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        let to = now + AHEAD_DAYS * DAY_MS;
        self.prepare_metric_partitions(super::u(now), super::u(to))
            .map(drop)
    }

    /// A transaction for partition changes (PostgreSQL): under the
    /// migration lock, then fenced: with the ingest writer's fence
    /// ([`Store::set_fence`]) and the connection's
    /// ([`Store::fence_writes`]), each checked now, so the lease row stays
    /// locked until the end and a conductor that lost the lease changes
    /// nothing (DDL through `batch` is not seen as a write by the
    /// connection's own fencing).
    fn partition_tx(&self) -> Result<Tx<'_>, StoreError> {
        let epoch = match &self.fence {
            Some(f) => Some(f.epoch().ok_or(StoreError::Fenced)?),
            None => None,
        };
        let tx = self.conn.begin()?;
        // The lock before the lease row, in the order open_postgres takes
        // them (it alters the lease table under the lock).
        tx.batch(&format!(
            "SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"
        ))?;
        if let Some(epoch) = epoch {
            if tx.execute(lease::FENCE_SQL, params![epoch])? != 1 {
                return Err(StoreError::Fenced);
            }
        }
        tx.check_write_fence()?;
        Ok(tx)
    }

    /// Retention on PostgreSQL ([`Store::sweep`]): drops the day partitions
    /// wholly older than each cut-off, deletes the older rows of the
    /// cut-off's day and of DEFAULT, and makes the partitions ahead; one
    /// fenced transaction. The rows deleted (a dropped partition's rows are
    /// not counted: counting would read them).
    pub(super) fn sweep_postgres(
        &mut self,
        raw_before_ms: u64,
        minute_before_ms: u64,
    ) -> Result<usize, StoreError> {
        let tx = self.partition_tx()?;
        // A drop, or a new partition, waits for the queries reading the
        // table; the writer thread, which runs the sweep, waits this long at
        // most, then the sweep fails and the next one tries again.
        tx.batch(&format!("SET LOCAL lock_timeout = '{SWEEP_LOCK_WAIT_S}s'"))?;
        let mut deleted = 0;
        let cutoffs = [i(raw_before_ms), i(minute_before_ms)];
        for ((table, col), cutoff) in TABLES.into_iter().zip(cutoffs) {
            // Pruned to the cut-off's day (or DEFAULT, when it has none).
            deleted += tx.execute(
                &format!("DELETE FROM {table} WHERE {col} >= ?1 AND {col} < ?2"),
                params![day_of(cutoff) * DAY_MS, cutoff],
            )?;
            deleted += tx.execute(
                &format!("DELETE FROM {table}_default WHERE {col} < ?1"),
                params![cutoff],
            )?;
        }
        for (table, col) in TABLES {
            ensure_days(&tx, table, col, ahead(now_ms()))?;
        }
        // Last: a drop holds the table's exclusive lock until the commit.
        let mut dropped = Vec::new();
        for ((table, _), cutoff) in TABLES.into_iter().zip(cutoffs) {
            for (day, name) in day_partitions(&tx, table)? {
                if (day + 1) * DAY_MS <= cutoff {
                    tx.batch(&format!("DROP TABLE {name}"))?;
                    dropped.push(name);
                }
            }
        }
        tx.commit()?;
        if !dropped.is_empty() {
            tracing::info!(?dropped, "retention: dropped day partitions");
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_names_round_trip() {
        assert_eq!(
            partition_name("metrics_raw", 0).unwrap(),
            "metrics_raw_p19700101"
        );
        // 2026-12-07
        let day = 1_796_601_600_000 / DAY_MS;
        assert_eq!(ymd(day).unwrap(), "20261207");
        assert_eq!(day_of(1_796_601_600_000 + DAY_MS - 1), day);
        assert_eq!(day_of(-1), -1);
        for d in [-1, 0, 1, day, day + 366, 2_932_896] {
            assert_eq!(parse_ymd(&ymd(d).unwrap()), Some(d), "{d}");
        }
        assert_eq!(ymd(2_932_897), None, "year 10000");
        assert_eq!(parse_ymd("2026120"), None);
        assert_eq!(parse_ymd("20261332"), None);
        assert_eq!(parse_ymd("default1"), None);
    }
}
