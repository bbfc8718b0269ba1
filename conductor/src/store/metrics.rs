//! Metrics history: raw samples (`metrics_raw`), per-minute aggregates
//! (`metrics_minute`) and retention. Both are written by
//! [`Store::apply_batch`].

use super::sql::params;

use super::{i, int, u, Store, StoreError, MAX_QUERY_ROWS};

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

/// A worker's newest raw sample ([`Store::latest_metrics`]).
#[derive(Debug, Clone)]
pub struct LatestSample {
    /// The worker.
    pub worker_id: String,
    /// When the conductor received it (for a batch, the sample's own time).
    pub received_at_ms: u64,
    /// Its frame's seq.
    pub seq: u64,
    /// The sample, postcard (`protocol::Metrics`), as stored.
    pub frame: Vec<u8>,
}

impl Store {
    /// Raw samples `(received_at_ms, seq, postcard)` in `[from, to]`, oldest first.
    pub fn raw_metrics(
        &self,
        worker_id: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        self.conn.query_map(
            "SELECT received_at_ms, seq, frame FROM metrics_raw
             WHERE worker_id = ?1 AND received_at_ms >= ?2 AND received_at_ms <= ?3
             ORDER BY received_at_ms, seq LIMIT ?4",
            params![worker_id, i(from_ms), i(to_ms), int(MAX_QUERY_ROWS)],
            |r| Ok((u(r.get(0)?), u(r.get(1)?), r.get(2)?)),
        )
    }

    /// Each worker's newest raw sample received at or after `since_ms`:
    /// (worker, received at, seq, frame), one row per worker (its highest
    /// seq when several share that time). One index probe per worker (the
    /// `max` subquery on `(worker_id, received_at_ms)`), not a scan of the
    /// samples: what a conductor shows as each worker's latest metrics
    /// when it starts or takes over, before the worker's next frame.
    pub fn latest_metrics(&self, since_ms: u64) -> Result<Vec<LatestSample>, StoreError> {
        let rows = self.conn.query_map(
            "SELECT m.worker_id, m.received_at_ms, m.seq, m.frame
             FROM workers w JOIN metrics_raw m ON m.worker_id = w.id
              AND m.received_at_ms = (SELECT max(x.received_at_ms) FROM metrics_raw x
                                      WHERE x.worker_id = w.id AND x.received_at_ms >= ?1)
             ORDER BY m.worker_id, m.seq",
            params![i(since_ms)],
            |r| {
                Ok(LatestSample {
                    worker_id: r.get(0)?,
                    received_at_ms: u(r.get(1)?),
                    seq: u(r.get(2)?),
                    frame: r.get(3)?,
                })
            },
        )?;
        // Ordered by seq within a worker: the last row of each is kept.
        let mut latest: Vec<LatestSample> = Vec::with_capacity(rows.len());
        for row in rows {
            match latest.last_mut() {
                Some(last) if last.worker_id == row.worker_id => *last = row,
                _ => latest.push(row),
            }
        }
        Ok(latest)
    }

    /// Minute aggregates in `[from, to]`, oldest first.
    pub fn minute_metrics(
        &self,
        worker_id: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<MinuteRow>, StoreError> {
        self.conn.query_map(
            "SELECT minute_ms, n, cpu_sum, cpu_max, mem_used_sum, mem_total, load1_sum, temp_max,
                    disk_used, disk_total, rx_bps_sum, tx_bps_sum
             FROM metrics_minute
             WHERE worker_id = ?1 AND minute_ms >= ?2 AND minute_ms <= ?3
             ORDER BY minute_ms LIMIT ?4",
            params![worker_id, i(from_ms), i(to_ms), int(MAX_QUERY_ROWS)],
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
        )
    }

    /// Deletes history older than the cut-offs; returns rows removed.
    ///
    /// On PostgreSQL ([`super::partitions`]): drops the partitions wholly
    /// older than a cut-off (their rows are not counted; the cut-off's own
    /// partition is kept whole, so a row may outlive its cut-off by up to a
    /// partition's width), deletes DEFAULT's older rows and makes the
    /// partitions ahead; fenced, so a conductor that lost the lease drops
    /// and deletes nothing ([`StoreError::Fenced`]).
    pub fn sweep(
        &mut self,
        raw_before_ms: u64,
        minute_before_ms: u64,
    ) -> Result<usize, StoreError> {
        if matches!(self.conn, super::sql::Db::Postgres(_)) {
            return self.sweep_postgres(raw_before_ms, minute_before_ms);
        }
        let tx = self.conn.begin()?;
        let a = tx.execute(
            "DELETE FROM metrics_raw WHERE received_at_ms < ?1",
            params![i(raw_before_ms)],
        )?;
        let b = tx.execute(
            "DELETE FROM metrics_minute WHERE minute_ms < ?1",
            params![i(minute_before_ms)],
        )?;
        tx.commit()?;
        Ok(a + b)
    }
}
