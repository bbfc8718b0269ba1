//! Rollouts (`rollouts`; at most one `in_progress` per service).

use super::sql::{params, Row};

use super::{i, int, u, Store, StoreError};

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

impl Store {
    /// Stores a new rollout and returns its id. Fails (constraint) if the
    /// service already has one in progress.
    pub fn insert_rollout(&self, r: &RolloutRow) -> Result<i64, StoreError> {
        self.conn.query_row(
            "INSERT INTO rollouts (service, from_version, to_version, state, policy, waves, wave,
                wave_started_ms, reason, started_ms, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING id",
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
            |r| r.get(0),
        )
    }

    /// Updates a rollout's progress; when `deployment_version` is given the
    /// deployment's version is set in the same transaction.
    pub fn update_rollout(
        &mut self,
        r: &RolloutRow,
        deployment_version: Option<u32>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.begin()?;
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
        self.conn.query_map(
            &format!("SELECT {ROLLOUT_COLS} FROM rollouts WHERE state = 'in_progress' ORDER BY id"),
            params![],
            rollout_from_row,
        )
    }

    /// A service's rollouts, newest first, at most `limit`.
    pub fn rollouts(&self, service: &str, limit: usize) -> Result<Vec<RolloutRow>, StoreError> {
        self.conn.query_map(
            &format!(
                "SELECT {ROLLOUT_COLS} FROM rollouts WHERE service = ?1 ORDER BY id DESC LIMIT ?2"
            ),
            params![service, int(limit)],
            rollout_from_row,
        )
    }

    /// Rollouts reverted at or after `since_ms`, oldest first, each with
    /// whether a later rollout of the same service succeeded.
    pub fn reverted_rollouts(&self, since_ms: u64) -> Result<Vec<(RolloutRow, bool)>, StoreError> {
        self.conn.query_map(
            &format!(
                "SELECT {ROLLOUT_COLS}, EXISTS (SELECT 1 FROM rollouts later
                WHERE later.service = rollouts.service AND later.id > rollouts.id
                  AND later.state = 'succeeded')
             FROM rollouts WHERE state = 'reverted' AND finished_ms >= ?1 ORDER BY id"
            ),
            params![i(since_ms)],
            |r| Ok((rollout_from_row(r)?, r.get(12)?)),
        )
    }

    /// Restarts the clock of every rollout in progress (conductor start).
    pub fn restart_rollout_clocks(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.conn.execute(
            "UPDATE rollouts SET wave_started_ms = ?1 WHERE state = 'in_progress'",
            params![i(now_ms)],
        )
    }
}

fn rollout_from_row(r: &Row) -> Result<RolloutRow, StoreError> {
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
        finished_ms: r.get::<Option<i64>>(11)?.map(u),
    })
}

const ROLLOUT_COLS: &str = "id, service, from_version, to_version, state, policy, waves, wave,
    wave_started_ms, reason, started_ms, finished_ms";
