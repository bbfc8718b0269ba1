//! Rollouts: a deployed service moves to a new version in waves, and is
//! reverted automatically when a wave fails.
//!
//! A rollout starts when a deployment that already runs somewhere gets a
//! different version: `PUT /services/{name}/deployment` with a higher
//! `version` (a lower one is a rollback and applies at once), or
//! `POST /services/{name}/rollout {"version": N, …policy}` (any version).
//! The policy is the request's, else the deployment's default (`"rollout"`
//! in the deployment), else [`Policy::default`] (canary 1, settle 10 s).
//!
//! Waves are fixed when the rollout starts: wave 0 (the canaries) is the
//! first `canary` (or `canary_percent` % of the targets, rounded up, at
//! least 1) **online** targets by id; wave 1 is every other target. While a
//! rollout is in progress the deployment keeps the old version
//! (`from_version`) and [`desired_version`] gives each worker its own
//! target: workers in the current or an earlier wave get `to_version`,
//! the others (including workers that start matching the deployment during
//! the rollout) keep `from_version`.
//!
//! [`evaluate`] runs at every reconciliation pass. A wave **passes** when
//! each of its members reports `to_version` `healthy` (or `running` when the
//! new spec has no health check; `stopped` when the member's desired state
//! is `stopped`, see [`crate::services`]: it was installed stopped, and
//! nothing more can be checked), unchanged for `settle_s`. It **fails**
//! when a member reports `to_version` `failed` or `unhealthy`, answers the
//! `DeployManifest` (or `InstallManifest`) with an error (digest or version
//! mismatch, artifact rejected, unsupported) or sends `ArtifactRejected` /
//! `HealthFailed` for the service after the wave started, or when the wave
//! has not passed within `timeout_s` (default `settle_s + 60`). Members of
//! a later wave that are offline when it starts are skipped (they get the
//! new version when they return). A failure reverts: the rollout is marked `reverted`
//! with the reason, and every worker goes back to `from_version`. After the
//! last wave the deployment's version becomes `to_version` (`succeeded`),
//! in the same transaction.
//!
//! A conductor restart resumes a rollout in progress: the current wave's
//! clock (settle and timeout) restarts at the conductor's start, so the
//! time it was down counts neither for nor against the wave.
//!
//! Limits: two waves (canary, rest); at most one rollout in progress per
//! service (a partial unique index); `settle_s` ≤ 3600, `timeout_s` ≤ 86400.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::deployment::{Deployment, Policy, ServiceError};
use crate::state::{now_ms, Shared, Status};
use crate::store::RolloutRow;

/// `in_progress`.
pub const IN_PROGRESS: &str = "in_progress";
/// `succeeded`.
pub const SUCCEEDED: &str = "succeeded";
/// `reverted`.
pub const REVERTED: &str = "reverted";
/// Rollouts `GET /services/{name}/rollouts` returns.
pub const HISTORY: usize = 50;

/// One wave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Members that must pass.
    pub workers: Vec<String>,
    /// Members offline when the wave started: moved, but not waited for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// A rollout with its JSON columns parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The stored row.
    pub row: RolloutRow,
    /// Its policy.
    pub policy: Policy,
    /// Its waves; `row.wave` indexes the current one.
    pub waves: Vec<Wave>,
}

impl Rollout {
    /// Parses a row (unreadable JSON columns read as defaults).
    pub fn from_row(row: RolloutRow) -> Rollout {
        Rollout {
            policy: serde_json::from_str(&row.policy_json).unwrap_or_default(),
            waves: serde_json::from_str(&row.waves_json).unwrap_or_default(),
            row,
        }
    }

    /// `true` once `worker` is in the current or an earlier wave.
    pub fn moved(&self, worker: &str) -> bool {
        let upto = (self.row.wave as usize).min(self.waves.len().saturating_sub(1));
        self.waves
            .iter()
            .take(upto + 1)
            .any(|w| w.workers.iter().chain(&w.skipped).any(|x| x == worker))
    }

    /// JSON for the API.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.row.id,
            "from_version": self.row.from_version,
            "to_version": self.row.to_version,
            "state": self.row.state,
            "wave": self.row.wave,
            "waves": self.waves,
            "policy": self.policy,
            "reason": self.row.reason,
            "started_ms": self.row.started_ms,
            "wave_started_ms": self.row.wave_started_ms,
            "finished_ms": self.row.finished_ms,
        })
    }
}

/// The version `worker` should run: the rollout's per-worker target while
/// one is in progress, else the deployment's version.
pub fn desired_version(dep: &Deployment, active: Option<&Rollout>, worker: &str) -> u32 {
    match active {
        Some(r) if r.row.state == IN_PROGRESS => {
            if r.moved(worker) {
                r.row.to_version
            } else {
                r.row.from_version
            }
        }
        _ => dep.version,
    }
}

/// Rollouts in progress by service name.
pub fn active(shared: &Shared) -> Result<HashMap<String, Rollout>, ServiceError> {
    Ok(shared
        .db()
        .active_rollouts()?
        .into_iter()
        .map(|r| (r.service.clone(), Rollout::from_row(r)))
        .collect())
}

/// The waves of a rollout over `targets` (in order), `online` of them
/// online (in the same order): wave 0, the canaries, is the first
/// [`Policy::canary_count`] online targets; wave 1 is every other target
/// (absent when there is none). Empty when `targets` is. Shared by service
/// and agent rollouts ([`crate::agent_rollout`]).
pub fn plan_waves(targets: &[String], online: &[String], policy: &Policy) -> Vec<Wave> {
    if targets.is_empty() {
        return Vec::new();
    }
    let k = policy.canary_count(targets.len(), online.len());
    let canaries: Vec<String> = online.iter().take(k).cloned().collect();
    let chosen: BTreeSet<&String> = canaries.iter().collect();
    let rest: Vec<String> = targets
        .iter()
        .filter(|t| !chosen.contains(t))
        .cloned()
        .collect();
    let mut waves = vec![Wave {
        workers: canaries,
        skipped: Vec::new(),
    }];
    if !rest.is_empty() {
        waves.push(Wave {
            workers: rest,
            skipped: Vec::new(),
        });
    }
    waves
}

/// Starts a rollout of `dep` (at its current version) to `to`. Returns
/// `None` when no target is online (nothing to canary: the caller applies
/// the version at once). Call without the worker map locked.
pub fn start(
    shared: &Shared,
    dep: &Deployment,
    to: u32,
    policy: Policy,
) -> Result<Option<Rollout>, ServiceError> {
    policy.validate()?;
    let (targets, online): (Vec<String>, Vec<String>) = {
        let workers = shared.workers();
        let targets: Vec<String> = dep.targets(&workers).into_iter().collect();
        let online = targets
            .iter()
            .filter(|id| workers.get(*id).is_some_and(|w| w.status == Status::Online))
            .cloned()
            .collect();
        (targets, online)
    };
    if online.is_empty() {
        return Ok(None);
    }
    let waves = plan_waves(&targets, &online, &policy);
    let now = now_ms();
    let mut row = RolloutRow {
        id: 0,
        service: dep.name.clone(),
        from_version: dep.version,
        to_version: to,
        state: IN_PROGRESS.into(),
        policy_json: serde_json::to_string(&policy).unwrap_or_default(),
        waves_json: serde_json::to_string(&waves).unwrap_or_default(),
        wave: 0,
        wave_started_ms: now,
        reason: String::new(),
        started_ms: now,
        finished_ms: None,
    };
    row.id = match shared.db().insert_rollout(&row) {
        Ok(id) => id,
        Err(e) if e.is_constraint_violation() => {
            return Err(ServiceError::Conflict(format!(
                "a rollout of {} is already in progress",
                dep.name
            )))
        }
        Err(e) => return Err(e.into()),
    };
    info!(service = %dep.name, from = dep.version, to, waves = waves.len(), "rollout started");
    Ok(Some(Rollout { row, policy, waves }))
}

/// Ends the rollout of `name` in progress (if any) as `reverted` with
/// `reason`; returns it.
pub fn abort(shared: &Shared, name: &str, reason: &str) -> Result<Option<Rollout>, ServiceError> {
    let Some(mut r) = active(shared)?.remove(name) else {
        return Ok(None);
    };
    finish(shared, &mut r, REVERTED, reason)?;
    Ok(Some(r))
}

fn finish(shared: &Shared, r: &mut Rollout, state: &str, reason: &str) -> Result<(), ServiceError> {
    r.row.state = state.into();
    r.row.reason = reason.into();
    r.row.finished_ms = Some(now_ms());
    let dep_version = (state == SUCCEEDED).then_some(r.row.to_version);
    shared.db().update_rollout(&r.row, dep_version)?;
    // The manifest cache and throttles are keyed by version: nothing to drop.
    if state == SUCCEEDED {
        info!(service = %r.row.service, version = r.row.to_version, "rollout succeeded");
    } else {
        warn!(service = %r.row.service, from = r.row.to_version, to = r.row.from_version,
            reason, "rollout reverted");
    }
    Ok(())
}

/// What one member's reports say about the current wave.
enum Verdict {
    Passed,
    Waiting(String),
    Failed(String),
}

/// `stop_wanted`: the member's desired state is `stopped` (the deployment's
/// or a per-worker override), so `stopped` at `to_version` is what passes.
fn member_verdict(
    shared: &Shared,
    r: &Rollout,
    worker: &str,
    has_health: bool,
    stop_wanted: bool,
    now: u64,
) -> Verdict {
    let name = &r.row.service;
    let to = r.row.to_version;
    let since = r.row.wave_started_ms;
    if let Some(f) = shared
        .service_failures()
        .get(&(worker.to_string(), name.clone()))
    {
        if f.at_ms >= since && f.version.is_none_or(|v| v == to) {
            return Verdict::Failed(format!("{worker}: {}", f.what));
        }
    }
    let status = shared.service_status();
    let Some(a) = status.get(worker).and_then(|m| m.get(name)) else {
        return Verdict::Waiting(format!("{worker} has not reported {name}"));
    };
    if a.version == to && (a.state == "failed" || a.state == "unhealthy") {
        return Verdict::Failed(format!(
            "{worker}: {} v{}: {}",
            a.state, a.version, a.detail
        ));
    }
    let good = if stop_wanted {
        a.state == "stopped"
    } else {
        a.state == "healthy" || (!has_health && a.state == "running")
    };
    let settle = u64::from(r.policy.settle_s) * 1000;
    if a.version == to && good && now.saturating_sub(a.updated_ms.max(since)) >= settle {
        Verdict::Passed
    } else {
        Verdict::Waiting(format!("{worker} reports {} v{}", a.state, a.version))
    }
}

/// Advances, completes or reverts every rollout in progress; returns how
/// many changed state or wave. Called by each reconciliation pass.
pub fn evaluate(shared: &Shared) -> Result<usize, ServiceError> {
    let mut changed = 0;
    for (name, mut r) in active(shared)? {
        let (dep, stopped_on) = {
            let db = shared.db();
            let dep = db.deployment(&name)?;
            let stopped_on: BTreeSet<String> = db
                .overrides()?
                .into_iter()
                .filter(|(_, n, d)| *n == name && d == "stopped")
                .map(|(w, _, _)| w)
                .collect();
            (dep, stopped_on)
        };
        let Some(dep) = dep else {
            finish(shared, &mut r, REVERTED, "deployment removed")?;
            changed += 1;
            continue;
        };
        let all_stopped = dep.desired == "stopped";
        let has_health = match crate::deployment::load_doc(shared, &name, r.row.to_version)? {
            Some(doc) => doc.has_health(),
            None => {
                let why = format!("version {} no longer exists", r.row.to_version);
                finish(shared, &mut r, REVERTED, &why)?;
                changed += 1;
                continue;
            }
        };
        let now = now_ms();
        let idx = r.row.wave as usize;
        let Some(wave) = r.waves.get(idx).cloned() else {
            finish(shared, &mut r, SUCCEEDED, "")?;
            changed += 1;
            continue;
        };
        let mut failed = None;
        let mut waiting = None;
        for m in &wave.workers {
            let stop_wanted = all_stopped || stopped_on.contains(m);
            match member_verdict(shared, &r, m, has_health, stop_wanted, now) {
                Verdict::Passed => {}
                Verdict::Waiting(w) => {
                    waiting.get_or_insert(w);
                }
                Verdict::Failed(f) => {
                    failed = Some(f);
                    break;
                }
            }
        }
        if let Some(f) = failed {
            let why = format!("wave {idx} failed: {f}");
            finish(shared, &mut r, REVERTED, &why)?;
            changed += 1;
        } else if let Some(w) = waiting {
            if now.saturating_sub(r.row.wave_started_ms) >= r.policy.timeout_ms() {
                let why = format!(
                    "wave {idx} did not pass within {} s: {w}",
                    r.policy.timeout_ms() / 1000
                );
                finish(shared, &mut r, REVERTED, &why)?;
                changed += 1;
            }
        } else if idx + 1 >= r.waves.len() {
            finish(shared, &mut r, SUCCEEDED, "")?;
            changed += 1;
        } else {
            // Next wave: its offline members are skipped.
            let next = idx + 1;
            {
                let workers = shared.workers();
                if let Some(w) = r.waves.get_mut(next) {
                    let (on, off): (Vec<String>, Vec<String>) =
                        w.workers.drain(..).partition(|id| {
                            workers
                                .get(id)
                                .is_some_and(|e| e.status == Status::Online && !e.revoked)
                        });
                    w.workers = on;
                    w.skipped.extend(off);
                }
            }
            // fits: next < waves.len(), and a rollout has at most two waves
            // (the canaries, then the rest).
            #[allow(clippy::cast_possible_truncation)]
            let wave = next as u32;
            r.row.wave = wave;
            r.row.wave_started_ms = now;
            r.row.waves_json = serde_json::to_string(&r.waves).unwrap_or_default();
            shared.db().update_rollout(&r.row, None)?;
            info!(service = %name, wave = next, "rollout: canary wave passed, next wave");
            changed += 1;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_bounds_and_canary_counts() {
        assert!(Policy::default().validate().is_ok());
        let p = |v: Value| serde_json::from_value::<Policy>(v).unwrap();
        assert!(p(json!({"canary": 1, "canary_percent": 10}))
            .validate()
            .is_err());
        assert!(p(json!({"canary": 0})).validate().is_err());
        assert!(p(json!({"canary_percent": 101})).validate().is_err());
        assert!(p(json!({"settle_s": 5, "timeout_s": 5}))
            .validate()
            .is_err());
        assert!(serde_json::from_value::<Policy>(json!({"waves": 3})).is_err());
        assert_eq!(p(json!({"settle_s": 1})).timeout_ms(), 61_000);
        assert_eq!(p(json!({"canary_percent": 25})).canary_count(10, 10), 3);
        assert_eq!(p(json!({"canary_percent": 1})).canary_count(10, 10), 1);
        assert_eq!(p(json!({"canary": 5})).canary_count(10, 2), 2);
    }

    #[test]
    fn waves_put_online_canaries_first_then_the_rest() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let targets = ids(&["a", "b", "c", "d"]);
        let waves = plan_waves(&targets, &ids(&["c", "d"]), &Policy::default());
        assert_eq!(waves.len(), 2);
        assert_eq!(waves[0].workers, ids(&["c"]));
        assert_eq!(waves[1].workers, ids(&["a", "b", "d"]));
        let all = Policy {
            canary: None,
            canary_percent: Some(100),
            ..Policy::default()
        };
        let waves = plan_waves(&targets, &targets, &all);
        assert_eq!(
            waves.len(),
            1,
            "no second wave when every target is a canary"
        );
        assert!(plan_waves(&[], &[], &Policy::default()).is_empty());
    }

    #[test]
    fn moved_follows_the_wave_index() {
        let row = RolloutRow {
            id: 1,
            service: "web".into(),
            from_version: 1,
            to_version: 2,
            state: IN_PROGRESS.into(),
            policy_json: "{}".into(),
            waves_json: json!([{"workers": ["a"]}, {"workers": ["b"], "skipped": ["c"]}])
                .to_string(),
            wave: 0,
            wave_started_ms: 0,
            reason: String::new(),
            started_ms: 0,
            finished_ms: None,
        };
        let mut r = Rollout::from_row(row);
        assert!(r.moved("a") && !r.moved("b") && !r.moved("c"));
        r.row.wave = 1;
        assert!(r.moved("b") && r.moved("c") && !r.moved("d"));
    }
}
