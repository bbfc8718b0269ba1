//! PostgreSQL only: the metrics tables partitioned by time, and their
//! retention by dropping whole partitions. SQLite keeps the plain tables of
//! schema v1 and deletes rows (`metrics.rs`).
//!
//! `metrics_raw` is range-partitioned on `received_at_ms`, `metrics_minute`
//! on `minute_ms`. A partition holds one UTC day, `<table>_pYYYYMMDD`
//! (`[day × 86 400 000, (day + 1) × 86 400 000)`), or one UTC hour,
//! `<table>_pYYYYMMDDHH`; `<table>_default`, the DEFAULT partition, holds
//! rows of a time that has none (a worker whose clock is far off, rows
//! written by a conductor from before partitioning). The statements of
//! `metrics.rs`, `batch.rs` and `workers.rs` are the same on both engines:
//! a history query bounds the time column, so PostgreSQL reads only the
//! partitions of its range.
//!
//! **Widths.** A table's partitions are an hour wide while its retention
//! is at most [`HOURLY_UP_TO_MS`] (2 days), a day wide past that: with the
//! defaults, `metrics_raw` (nearly all the rows, kept 24 h) by hour and
//! `metrics_minute` (7 days) by day. Retention drops whole partitions only
//! (below), so a row is kept until its partition is wholly older than the
//! cut-off: up to an hour, or a day, longer than the retention. Deleting
//! the rest of the cut-off's partition row by row instead would, sweep
//! after sweep, delete every row one by one before its partition is
//! dropped. The width only decides the partitions made from now on: made
//! ones are never split or merged, and a day partly covered already gets
//! hour partitions in its gaps. The retention sweep knows each retention
//! (its cut-offs) and picks the widths; a store being opened does not, and
//! uses the defaults' (hours for raw, days for minute), so after a change
//! of retention the days already made ahead keep their width.
//!
//! - `convert`: the PostgreSQL-only schema step that turns the plain
//!   tables of an existing database into partitioned ones
//!   (`store::PG_STEPS`). Every row is copied: the day partitions of the
//!   days holding rows (from [`CONVERT_DAYS_BACK`] back to
//!   [`AHEAD_DAYS`] ahead) are made before the copy; rows outside that
//!   window go to DEFAULT.
//! - `ensure`: the partitions ahead — day partitions to the end of the
//!   [`AHEAD_DAYS`]th day after today, hour partitions for the next
//!   [`AHEAD_HOURS`] — are made at open ([`Store::open_postgres`]) and by
//!   every retention sweep. A time already covered is skipped. When
//!   DEFAULT already holds rows of a new partition's range (which
//!   PostgreSQL refuses for a new partition), they are moved into it in
//!   the same transaction, with a warning: skipping instead would leave
//!   that range without a partition for good, its rows (a whole day of the
//!   fleet's, after an older conductor ran) deleted row by row, and warn
//!   at every sweep.
//! - `Store::sweep_postgres` (behind [`Store::sweep`]): the partitions
//!   wholly older than the cut-off are dropped (`DROP TABLE`) and DEFAULT's
//!   rows older than it deleted; the partition holding the cut-off is
//!   left whole. It waits [`SWEEP_LOCK_WAIT_S`] at most for a table's lock (a
//!   drop waits for the queries reading the table), then fails; the next
//!   sweep tries again.
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
//! other conductors wait on the lock; a range's rows found in DEFAULT are
//! moved in one statement; each new partition makes PostgreSQL scan DEFAULT
//! (retention keeps it small). Retention is as fine as the width (above).
//! SQLite deletes every row older than the cut-off.

use std::collections::BTreeSet;

use super::sql::{params, Db, Tx};
use super::{i, lease, Store, StoreError, PG_MIGRATION_LOCK};

/// One UTC day in ms.
pub const DAY_MS: i64 = 86_400_000;
/// One hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// Day partitions exist from today to the end of the day this many days
/// after it.
pub const AHEAD_DAYS: i64 = 2;
/// Hour partitions exist from this hour to this many hours after it (each
/// sweep adds the next; a fresh store makes 25, not 72: ~9 ms each).
pub const AHEAD_HOURS: i64 = 24;
/// The conversion makes day partitions for rows at most this many days old.
pub const CONVERT_DAYS_BACK: i64 = 1_000;
/// The longest retention whose table is partitioned by hour (module docs,
/// Widths).
pub const HOURLY_UP_TO_MS: u64 = 2 * 86_400_000;

/// How long a sweep waits for a table's lock, in seconds.
pub const SWEEP_LOCK_WAIT_S: u32 = 10;

/// The partitioned tables, their partition key, and the width of the
/// partitions a store makes at open (its default retention's).
const TABLES: [(&str, &str, Width); 2] = [
    ("metrics_raw", "received_at_ms", Width::Hour),
    ("metrics_minute", "minute_ms", Width::Day),
];

/// The Julian day of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;
/// 0000-01-01 and 10000-01-01 in ms: the times partitions can be named for.
const NAMED_FROM_MS: i64 = -719_528 * DAY_MS;
const NAMED_TO_MS: i64 = 2_932_897 * DAY_MS;

/// How wide the partitions made from now on are (module docs, Widths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// One UTC hour, `<table>_pYYYYMMDDHH`.
    Hour,
    /// One UTC day, `<table>_pYYYYMMDD`.
    Day,
}

impl Width {
    /// The width in ms.
    pub fn ms(self) -> i64 {
        match self {
            Width::Hour => HOUR_MS,
            Width::Day => DAY_MS,
        }
    }

    /// The width for a table kept `retention_ms`: hours up to
    /// [`HOURLY_UP_TO_MS`], days past it.
    pub fn for_retention(retention_ms: u64) -> Width {
        if retention_ms <= HOURLY_UP_TO_MS {
            Width::Hour
        } else {
            Width::Day
        }
    }
}

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

/// The bounds `[lo, hi)` a partition name's suffix (after `<table>_p`)
/// stands for: `YYYYMMDD` a day, `YYYYMMDDHH` an hour.
fn parse_bounds(suffix: &str) -> Option<(i64, i64)> {
    let day = parse_ymd(suffix.get(..8)?)?;
    match suffix.get(8..)? {
        "" => Some((day * DAY_MS, (day + 1) * DAY_MS)),
        hh if hh.len() == 2 && hh.bytes().all(|b| b.is_ascii_digit()) => {
            let hour: i64 = hh.parse().ok()?;
            let lo = day * DAY_MS + hour * HOUR_MS;
            (hour < 24).then_some((lo, lo + HOUR_MS))
        }
        _ => None,
    }
}

/// The name of `table`'s partition of `width` starting at `lo_ms` (a
/// multiple of the width); `None` outside years 0 to 9999.
pub fn partition_name(table: &str, lo_ms: i64, width: Width) -> Option<String> {
    let day = day_of(lo_ms);
    let ymd = ymd(day)?;
    Some(match width {
        Width::Day => format!("{table}_p{ymd}"),
        Width::Hour => format!("{table}_p{ymd}{:02}", (lo_ms - day * DAY_MS) / HOUR_MS),
    })
}

/// A partition attached to a metrics table.
#[derive(Debug)]
struct Partition {
    lo: i64,
    hi: i64,
    name: String,
}

/// `table`'s day and hour partitions, oldest first. DEFAULT, and anything
/// not named `<table>_pYYYYMMDD[HH]`, is left out.
fn attached(db: &Db, table: &str) -> Result<Vec<Partition>, StoreError> {
    let names: Vec<String> = db.query_map(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass(?1)",
        params![table],
        |r| r.get(0),
    )?;
    let prefix = format!("{table}_p");
    let mut parts: Vec<Partition> = names
        .into_iter()
        .filter_map(|name| {
            let (lo, hi) = parse_bounds(name.strip_prefix(&prefix)?)?;
            Some(Partition { lo, hi, name })
        })
        .collect();
    parts.sort_by_key(|p| p.lo);
    Ok(parts)
}

/// Makes `table`'s partitions covering `[from_ms, to_ms]` where none
/// exists: slots of `width` from the one holding `from_ms`, a slot partly
/// covered already filled by the hours it lacks (and the hours up to the
/// next slot's start, so every partition is aligned to its width). Rows of a new partition's
/// range are moved out of DEFAULT (module docs). The names made. Run under
/// the migration lock.
fn ensure(
    db: &Db,
    table: &str,
    col: &str,
    from_ms: i64,
    to_ms: i64,
    width: Width,
) -> Result<Vec<String>, StoreError> {
    let mut have: Vec<(i64, i64)> = attached(db, table)?
        .into_iter()
        .map(|p| (p.lo, p.hi))
        .collect();
    let free = |have: &[(i64, i64)], lo: i64, hi: i64| !have.iter().any(|&(a, b)| a < hi && lo < b);
    let mut made = Vec::new();
    // Names exist for years 0 to 9999 only: no slot is made outside.
    let (from_ms, to_ms) = (from_ms.max(NAMED_FROM_MS), to_ms.min(NAMED_TO_MS - 1));
    let mut at = from_ms.div_euclid(width.ms()) * width.ms();
    while at <= to_ms {
        // A slot of the width only where one starts (after hours that
        // filled a gap, `at` may be mid-day): a day partition is a UTC day.
        let slot = if at.rem_euclid(width.ms()) == 0 && free(&have, at, at + width.ms()) {
            width
        } else if free(&have, at, at + HOUR_MS) {
            Width::Hour
        } else {
            at += HOUR_MS;
            continue;
        };
        let (lo, hi) = (at, at + slot.ms());
        at = hi;
        let Some(name) = partition_name(table, lo, slot) else {
            continue;
        };
        make(db, table, col, &name, lo, hi)?;
        have.push((lo, hi));
        made.push(name);
    }
    Ok(made)
}

/// Makes partition `name` of `table` for `[lo, hi)`, moving DEFAULT's rows
/// of that range into it.
fn make(db: &Db, table: &str, col: &str, name: &str, lo: i64, hi: i64) -> Result<(), StoreError> {
    let in_default: bool = db.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM {table}_default WHERE {col} >= ?1 AND {col} < ?2)"),
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
            "the DEFAULT partition held rows of this range: moved into the new partition"
        );
    } else {
        db.batch(&format!(
            "CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ({lo}) TO ({hi})"
        ))?;
    }
    Ok(())
}

/// Makes both tables' partitions ahead, of `widths` (in [`TABLES`]'
/// order): by day, to the end of the [`AHEAD_DAYS`]th day after today; by
/// hour, to [`AHEAD_HOURS`] after this hour.
fn ensure_ahead(db: &Db, now_ms: i64, widths: [Width; 2]) -> Result<(), StoreError> {
    for ((table, col, _), width) in TABLES.into_iter().zip(widths) {
        let end = match width {
            Width::Day => (day_of(now_ms) + AHEAD_DAYS + 1) * DAY_MS - 1,
            Width::Hour => now_ms + AHEAD_HOURS * HOUR_MS,
        };
        ensure(db, table, col, now_ms, end, width)?;
    }
    Ok(())
}

/// The widths of a store being opened (`TABLES`).
fn opening_widths() -> [Width; 2] {
    TABLES.map(|(_, _, w)| w)
}

/// The PostgreSQL-only schema step after v9 (`store::PG_STEPS`): the plain
/// metrics tables become partitioned ones holding the same rows. Runs in
/// the migration's transaction, under its lock.
pub(super) fn convert(db: &Db) -> Result<(), StoreError> {
    let now = now_ms();
    let today = day_of(now);
    for (table, col, _) in TABLES {
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
        for day in days.into_iter().collect::<BTreeSet<i64>>() {
            ensure(db, table, col, day * DAY_MS, day * DAY_MS, Width::Day)?;
        }
        db.batch(&format!(
            "INSERT INTO {table} SELECT * FROM {old}; DROP TABLE {old}"
        ))?;
    }
    // After the copy: the days with rows have day partitions, the rest of
    // the window ahead those of the default retentions.
    ensure_ahead(db, now, opening_widths())
}

impl Store {
    /// Makes both metrics tables' partitions covering `[from_ms, to_ms]`
    /// where none exists (PostgreSQL; nothing on SQLite), `width` wide
    /// (`ensure`), moving rows of their ranges out of DEFAULT; how many
    /// were made. Fenced as any write. The partitions
    /// ahead are made at open and by [`Store::sweep`]; this is for other
    /// times (a backfill, tests).
    pub fn prepare_metric_partitions(
        &mut self,
        from_ms: u64,
        to_ms: u64,
        width: Width,
    ) -> Result<usize, StoreError> {
        if !matches!(self.conn, Db::Postgres(_)) {
            return Ok(0);
        }
        let tx = self.partition_tx()?;
        let mut made = 0;
        for (table, col, _) in TABLES {
            made += ensure(&tx, table, col, i(from_ms), i(to_ms), width)?.len();
        }
        tx.commit()?;
        Ok(made)
    }

    /// The partitions ahead (at open), of the default retentions' widths
    /// (the module docs, Widths).
    pub(super) fn prepare_partitions_ahead(&mut self) -> Result<(), StoreError> {
        if !matches!(self.conn, Db::Postgres(_)) {
            return Ok(());
        }
        let tx = self.partition_tx()?;
        ensure_ahead(&tx, now_ms(), opening_widths())?;
        tx.commit()?;
        Ok(())
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

    /// Retention on PostgreSQL ([`Store::sweep`]): drops the partitions
    /// wholly older than each cut-off, deletes DEFAULT's older rows, and
    /// makes the partitions ahead, each table's as wide as its retention
    /// (the time from its cut-off to now) asks; one fenced transaction. The
    /// rows deleted (a dropped partition's rows are not counted: counting
    /// would read them).
    pub(super) fn sweep_postgres(
        &mut self,
        raw_before_ms: u64,
        minute_before_ms: u64,
    ) -> Result<usize, StoreError> {
        let now = now_ms();
        let cutoffs = [raw_before_ms, minute_before_ms];
        let widths = cutoffs.map(|c| Width::for_retention(super::u(now).saturating_sub(c)));
        let tx = self.partition_tx()?;
        // A drop, or a new partition, waits for the queries reading the
        // table; the writer thread, which runs the sweep, waits this long at
        // most, then the sweep fails and the next one tries again.
        tx.batch(&format!("SET LOCAL lock_timeout = '{SWEEP_LOCK_WAIT_S}s'"))?;
        let mut deleted = 0;
        let mut doomed = Vec::new();
        for ((table, col, _), cutoff) in TABLES.into_iter().zip(cutoffs.map(i)) {
            deleted += tx.execute(
                &format!("DELETE FROM {table}_default WHERE {col} < ?1"),
                params![cutoff],
            )?;
            doomed.extend(
                attached(&tx, table)?
                    .into_iter()
                    .filter(|p| p.hi <= cutoff)
                    .map(|p| p.name),
            );
        }
        ensure_ahead(&tx, now, widths)?;
        // Last: a drop holds the table's exclusive lock until the commit.
        for name in &doomed {
            tx.batch(&format!("DROP TABLE {name}"))?;
        }
        tx.commit()?;
        if !doomed.is_empty() {
            tracing::info!(dropped = ?doomed, "retention: dropped partitions");
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            partition_name("metrics_raw", 0, Width::Day).unwrap(),
            "metrics_raw_p19700101"
        );
        // 2026-12-07
        let day = 1_796_601_600_000 / DAY_MS;
        assert_eq!(ymd(day).unwrap(), "20261207");
        assert_eq!(day_of(1_796_601_600_000 + DAY_MS - 1), day);
        assert_eq!(day_of(-1), -1);
        for d in [-1, 0, 1, day, day + 366, 2_932_896] {
            assert_eq!(parse_ymd(&ymd(d).unwrap()), Some(d), "{d}");
            let lo = d * DAY_MS;
            assert_eq!(parse_bounds(&ymd(d).unwrap()), Some((lo, lo + DAY_MS)));
            for h in [0, 13, 23] {
                let at = lo + h * HOUR_MS;
                let name = partition_name("t", at, Width::Hour).unwrap();
                assert_eq!(name.len(), "t_p".len() + 10, "{name}");
                assert_eq!(
                    parse_bounds(name.strip_prefix("t_p").unwrap()),
                    Some((at, at + HOUR_MS)),
                    "{name}"
                );
            }
        }
        assert_eq!(
            partition_name("metrics_raw", day * DAY_MS + 9 * HOUR_MS, Width::Hour).unwrap(),
            "metrics_raw_p2026120709"
        );
        assert_eq!(ymd(2_932_897), None, "year 10000");
        assert_eq!(ymd(NAMED_TO_MS / DAY_MS), None);
        assert_eq!(ymd(NAMED_TO_MS / DAY_MS - 1).unwrap(), "99991231");
        assert_eq!(ymd(NAMED_FROM_MS / DAY_MS).unwrap(), "00000101");
        assert_eq!(ymd(NAMED_FROM_MS / DAY_MS - 1), None);
        assert_eq!(parse_ymd("2026120"), None);
        assert_eq!(parse_ymd("20261332"), None);
        assert_eq!(parse_ymd("default1"), None);
        assert_eq!(parse_bounds("2026120724"), None, "hour 24");
        assert_eq!(parse_bounds("202612071"), None);
        assert_eq!(parse_bounds("20261207xx"), None);
    }

    #[test]
    fn the_width_follows_the_retention() {
        assert_eq!(Width::for_retention(86_400_000), Width::Hour);
        assert_eq!(Width::for_retention(HOURLY_UP_TO_MS), Width::Hour);
        assert_eq!(Width::for_retention(HOURLY_UP_TO_MS + 1), Width::Day);
        // The defaults (config.rs): raw 24 h, minute 7 days.
        assert_eq!(opening_widths(), [Width::Hour, Width::Day]);
    }
}
