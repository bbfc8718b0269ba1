//! Agent self-update (schema v7): `agent_releases` (one signed release per
//! version and arch; the binary is an artifact) and `agent_rollouts` (at
//! most one `in_progress`, enforced by a partial unique index; JSON columns
//! parsed by `crate::agent_rollout`).

use super::sql::{params, Row};

use super::{i, int, u, Store, StoreError};

/// A signed agent release.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentReleaseRow {
    /// `major.minor.patch[-pre]`.
    pub version: String,
    /// The arch it was built for, as workers report it.
    pub arch: String,
    /// SHA-256 of the binary (an uploaded artifact), 64 lower-case hex digits.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Ed25519 signature over `protocol::release::signed_message`, 128
    /// lower-case hex digits.
    pub signature: String,
    /// When it was registered, ms.
    pub created_ms: u64,
}

/// One agent rollout, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRolloutRow {
    /// Row id (increasing).
    pub id: i64,
    /// The version rolled out.
    pub version: String,
    /// `in_progress` | `succeeded` | `reverted`.
    pub state: String,
    /// Policy, JSON.
    pub policy_json: String,
    /// Label selector, JSON object.
    pub selector_json: String,
    /// Waves of worker ids, JSON.
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
    /// Per-worker outcome, JSON object keyed by worker id.
    pub members_json: String,
}

impl Store {
    /// Stores a release; `Ok(false)` when (version, arch) exists already
    /// (nothing changed).
    pub fn insert_agent_release(&self, r: &AgentReleaseRow) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "INSERT INTO agent_releases (version, arch, sha256, size, signature, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (version, arch) DO NOTHING",
            params![
                r.version,
                r.arch,
                r.sha256,
                i(r.size),
                r.signature,
                i(r.created_ms)
            ],
        )?;
        Ok(n == 1)
    }

    /// Every release, newest first.
    pub fn agent_releases(&self) -> Result<Vec<AgentReleaseRow>, StoreError> {
        self.conn.query_map(
            &format!(
                "SELECT {RELEASE_COLS} FROM agent_releases ORDER BY created_ms DESC, version, arch"
            ),
            params![],
            release_from_row,
        )
    }

    /// The releases of one version (one per arch), by arch.
    pub fn agent_releases_of(&self, version: &str) -> Result<Vec<AgentReleaseRow>, StoreError> {
        self.conn.query_map(
            &format!("SELECT {RELEASE_COLS} FROM agent_releases WHERE version = ?1 ORDER BY arch"),
            params![version],
            release_from_row,
        )
    }

    /// The releases whose binary is artifact `sha256`.
    pub fn agent_releases_with_sha(
        &self,
        sha256: &str,
    ) -> Result<Vec<AgentReleaseRow>, StoreError> {
        self.conn.query_map(
            &format!(
            "SELECT {RELEASE_COLS} FROM agent_releases WHERE sha256 = ?1 ORDER BY version, arch"
        ),
            params![sha256],
            release_from_row,
        )
    }

    /// Deletes a release; `true` when it existed.
    pub fn delete_agent_release(&self, version: &str, arch: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM agent_releases WHERE version = ?1 AND arch = ?2",
            params![version, arch],
        )? == 1)
    }

    /// Stores a new agent rollout and returns its id. Fails (constraint)
    /// when one is in progress.
    pub fn insert_agent_rollout(&self, r: &AgentRolloutRow) -> Result<i64, StoreError> {
        self.conn.query_row(
            "INSERT INTO agent_rollouts (version, state, policy, selector, waves, wave,
                wave_started_ms, reason, started_ms, finished_ms, members)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING id",
            params![
                r.version,
                r.state,
                r.policy_json,
                r.selector_json,
                r.waves_json,
                r.wave,
                i(r.wave_started_ms),
                r.reason,
                i(r.started_ms),
                r.finished_ms.map(i),
                r.members_json
            ],
            |r| r.get(0),
        )
    }

    /// Writes an agent rollout's progress (state, waves, wave and its
    /// clock, reason, end, members) while it is in progress; `false` when
    /// it had ended already (aborted meanwhile: nothing is written).
    pub fn update_agent_rollout(&self, r: &AgentRolloutRow) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE agent_rollouts SET state = ?2, waves = ?3, wave = ?4, wave_started_ms = ?5,
                reason = ?6, finished_ms = ?7, members = ?8
             WHERE id = ?1 AND state = 'in_progress'",
            params![
                r.id,
                r.state,
                r.waves_json,
                r.wave,
                i(r.wave_started_ms),
                r.reason,
                r.finished_ms.map(i),
                r.members_json
            ],
        )?;
        Ok(n == 1)
    }

    /// The agent rollout in progress, if any.
    pub fn active_agent_rollout(&self) -> Result<Option<AgentRolloutRow>, StoreError> {
        self.conn.query_row_opt(
            &format!(
                "SELECT {ROLLOUT_COLS} FROM agent_rollouts WHERE state = 'in_progress'
             ORDER BY id LIMIT 1"
            ),
            params![],
            rollout_from_row,
        )
    }

    /// One agent rollout.
    pub fn agent_rollout(&self, id: i64) -> Result<Option<AgentRolloutRow>, StoreError> {
        self.conn.query_row_opt(
            &format!("SELECT {ROLLOUT_COLS} FROM agent_rollouts WHERE id = ?1"),
            params![id],
            rollout_from_row,
        )
    }

    /// Agent rollouts, newest first, at most `limit`.
    pub fn agent_rollouts(&self, limit: usize) -> Result<Vec<AgentRolloutRow>, StoreError> {
        self.conn.query_map(
            &format!("SELECT {ROLLOUT_COLS} FROM agent_rollouts ORDER BY id DESC LIMIT ?1"),
            params![int(limit)],
            rollout_from_row,
        )
    }

    /// Agent rollouts reverted at or after `since_ms`, oldest first, each
    /// with whether a later agent rollout succeeded.
    pub fn reverted_agent_rollouts(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(AgentRolloutRow, bool)>, StoreError> {
        self.conn.query_map(
            &format!(
                "SELECT {ROLLOUT_COLS}, EXISTS (SELECT 1 FROM agent_rollouts later
                WHERE later.id > agent_rollouts.id AND later.state = 'succeeded')
             FROM agent_rollouts WHERE state = 'reverted' AND finished_ms >= ?1 ORDER BY id"
            ),
            params![i(since_ms)],
            |r| Ok((rollout_from_row(r)?, r.get(12)?)),
        )
    }

    /// Restarts the clock of the agent rollout in progress (conductor
    /// start); returns how many (0 or 1).
    pub fn restart_agent_rollout_clock(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.conn.execute(
            "UPDATE agent_rollouts SET wave_started_ms = ?1 WHERE state = 'in_progress'",
            params![i(now_ms)],
        )
    }
}

const RELEASE_COLS: &str = "version, arch, sha256, size, signature, created_ms";

fn release_from_row(r: &Row) -> Result<AgentReleaseRow, StoreError> {
    Ok(AgentReleaseRow {
        version: r.get(0)?,
        arch: r.get(1)?,
        sha256: r.get(2)?,
        size: u(r.get(3)?),
        signature: r.get(4)?,
        created_ms: u(r.get(5)?),
    })
}

const ROLLOUT_COLS: &str = "id, version, state, policy, selector, waves, wave, wave_started_ms,
    reason, started_ms, finished_ms, members";

fn rollout_from_row(r: &Row) -> Result<AgentRolloutRow, StoreError> {
    Ok(AgentRolloutRow {
        id: r.get(0)?,
        version: r.get(1)?,
        state: r.get(2)?,
        policy_json: r.get(3)?,
        selector_json: r.get(4)?,
        waves_json: r.get(5)?,
        wave: r.get(6)?,
        wave_started_ms: u(r.get(7)?),
        reason: r.get(8)?,
        started_ms: u(r.get(9)?),
        finished_ms: r.get::<Option<i64>>(10)?.map(u),
        members_json: r.get(11)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn release(version: &str, arch: &str, sha: &str) -> AgentReleaseRow {
        AgentReleaseRow {
            version: version.into(),
            arch: arch.into(),
            sha256: sha.into(),
            size: 42,
            signature: "ab".repeat(64),
            created_ms: 7,
        }
    }

    fn rollout(version: &str) -> AgentRolloutRow {
        AgentRolloutRow {
            id: 0,
            version: version.into(),
            state: "in_progress".into(),
            policy_json: "{}".into(),
            selector_json: "{}".into(),
            waves_json: "[]".into(),
            wave: 0,
            wave_started_ms: 10,
            reason: String::new(),
            started_ms: 10,
            finished_ms: None,
            members_json: "{}".into(),
        }
    }

    #[test]
    fn releases_are_unique_per_version_and_arch() {
        crate::store::each_engine(|s| {
            assert!(s
                .insert_agent_release(&release("0.2.0", "x86_64", "aa"))
                .unwrap());
            assert!(s
                .insert_agent_release(&release("0.2.0", "aarch64", "bb"))
                .unwrap());
            assert!(
                !s.insert_agent_release(&release("0.2.0", "x86_64", "cc"))
                    .unwrap(),
                "taken"
            );
            let of = s.agent_releases_of("0.2.0").unwrap();
            assert_eq!(of.len(), 2);
            assert_eq!(
                (of[0].arch.as_str(), of[0].sha256.as_str()),
                ("aarch64", "bb")
            );
            assert_eq!(of[1].sha256, "aa", "the first one stays");
            assert_eq!(s.agent_releases().unwrap().len(), 2);
            assert_eq!(s.agent_releases_with_sha("bb").unwrap().len(), 1);
            assert!(s.agent_releases_of("0.3.0").unwrap().is_empty());
            assert!(s.delete_agent_release("0.2.0", "aarch64").unwrap());
            assert!(!s.delete_agent_release("0.2.0", "aarch64").unwrap());
            assert_eq!(s.agent_releases().unwrap().len(), 1);
        });
    }

    #[test]
    fn one_agent_rollout_in_progress_and_its_history() {
        crate::store::each_engine(|s| {
            let id = s.insert_agent_rollout(&rollout("0.2.0")).unwrap();
            assert!(
                s.insert_agent_rollout(&rollout("0.3.0")).is_err(),
                "one in progress"
            );
            let mut r = s.active_agent_rollout().unwrap().unwrap();
            assert_eq!((r.id, r.version.as_str()), (id, "0.2.0"));
            assert_eq!(s.restart_agent_rollout_clock(99).unwrap(), 1);
            assert_eq!(s.agent_rollout(id).unwrap().unwrap().wave_started_ms, 99);
            r.state = "reverted".into();
            r.reason = "wave 0 failed".into();
            r.finished_ms = Some(100);
            r.members_json = r#"{"w-1":{"state":"failed"}}"#.into();
            assert!(s.update_agent_rollout(&r).unwrap());
            assert!(s.active_agent_rollout().unwrap().is_none());
            r.state = "succeeded".into();
            assert!(!s.update_agent_rollout(&r).unwrap(), "it had ended");
            let back = s.agent_rollout(id).unwrap().unwrap();
            assert_eq!(back.members_json, r.members_json);
            assert_eq!(back.finished_ms, Some(100));
            let reverted = s.reverted_agent_rollouts(0).unwrap();
            assert_eq!(reverted.len(), 1);
            assert!(!reverted[0].1, "not superseded yet");
            let id2 = s.insert_agent_rollout(&rollout("0.2.1")).unwrap();
            let mut r2 = s.agent_rollout(id2).unwrap().unwrap();
            r2.state = "succeeded".into();
            r2.finished_ms = Some(200);
            assert!(s.update_agent_rollout(&r2).unwrap());
            assert!(s.reverted_agent_rollouts(0).unwrap()[0].1, "superseded");
            assert!(s.reverted_agent_rollouts(101).unwrap().is_empty());
            let list = s.agent_rollouts(50).unwrap();
            assert_eq!(
                list.iter().map(|r| r.id).collect::<Vec<_>>(),
                [id2, id],
                "newest first"
            );
            assert_eq!(s.agent_rollouts(1).unwrap().len(), 1);
            assert!(s.agent_rollout(999).unwrap().is_none());
        });
    }
}
