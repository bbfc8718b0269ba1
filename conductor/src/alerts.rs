//! Alerts: rules on the conductor that watch the fleet, fire once when a
//! condition has held long enough, resolve once when it clears, and notify
//! webhook receivers of both.
//!
//! - [`rule`]: what a rule says (kinds `worker_offline`, `metric_above`,
//!   `service_failed`, `rollout_reverted`, `agent_update_failed`).
//! - [`evaluate`]: one evaluation as a pure step over a [`Snapshot`].
//! - [`webhook`]: the sender thread that empties the notification outbox.
//!
//! [`run`] evaluates every `Config::alert_interval` on the runtime thread:
//! it copies what the rules look at out of the shared state (the worker map,
//! then the service states, one lock at a time), and writes each state
//! change together with its notifications in one store transaction
//! ([`crate::store::Store::fire_alert`]), then wakes the sender. An alert is
//! one row from firing to resolved; the store allows one firing alert per
//! rule and subject, so a restart cannot fire it twice.
//!
//! Limits: metric rules look at the latest sample of workers that are not
//! offline (an offline worker's alert resolves; `worker_offline` covers
//! it). The pending time of a condition is kept in memory only
//! ([`evaluate`]). Resolved alerts are kept (the history).

pub mod evaluate;
pub mod rule;
pub mod webhook;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

pub use evaluate::{Evaluator, Rule, Snapshot};
pub use rule::RuleSpec;

use crate::state::{now_ms, Shared, Status};
use crate::store::StoreError;
use evaluate::{AgentRevertView, MetricValues, RevertView, ServiceView, WorkerView};

/// Stored rules, parsed (a row that does not parse is skipped with a warning).
pub fn load_rules(shared: &Shared) -> Result<Vec<Rule>, StoreError> {
    let rows = shared.db().alert_rules()?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match serde_json::from_str::<RuleSpec>(&r.spec_json) {
            Ok(spec) => Some(Rule {
                id: r.id,
                created_ms: r.created_ms,
                spec,
            }),
            Err(e) => {
                warn!(rule = %r.name, "alert rule unreadable, skipped: {e}");
                None
            }
        })
        .collect())
}

/// What the rules look at, copied out of the shared state now.
pub fn snapshot(shared: &Shared, rules: &[Rule]) -> Result<Snapshot, StoreError> {
    let now = now_ms();
    let started_ms =
        now.saturating_sub(u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX));
    let workers = shared
        .workers()
        .values()
        .filter(|w| !w.revoked)
        .map(|w| {
            let offline = w.status == Status::Offline;
            WorkerView {
                id: w.id.clone(),
                hostname: w.hostname.clone(),
                labels: w.labels.clone(),
                offline_since_ms: offline
                    .then(|| w.last_seen_ms.unwrap_or(w.enrolled_at_ms).max(started_ms)),
                metrics: if offline {
                    None
                } else {
                    w.latest
                        .as_ref()
                        .map(|l| MetricValues::of(&l.metrics).with_board(w.board.as_ref()))
                },
            }
        })
        .collect();
    let services = shared
        .service_status()
        .values()
        .flat_map(|by_name| by_name.values())
        .map(|s| ServiceView {
            worker_id: s.worker_id.clone(),
            name: s.name.clone(),
            state: s.state.clone(),
            detail: s.detail.clone(),
        })
        .collect();
    let oldest_revert_rule = rules
        .iter()
        .filter(|r| r.spec.kind == rule::Kind::RolloutReverted)
        .map(|r| r.created_ms)
        .min();
    let reverts = match oldest_revert_rule {
        Some(since) => shared
            .db()
            .reverted_rollouts(since)?
            .into_iter()
            .map(|(r, superseded)| RevertView {
                id: r.id,
                service: r.service,
                from_version: r.from_version,
                to_version: r.to_version,
                reason: r.reason,
                finished_ms: r.finished_ms.unwrap_or(r.wave_started_ms),
                superseded,
            })
            .collect(),
        None => Vec::new(),
    };
    let oldest_agent_rule = rules
        .iter()
        .filter(|r| r.spec.kind == rule::Kind::AgentUpdateFailed)
        .map(|r| r.created_ms)
        .min();
    let agent_reverts = match oldest_agent_rule {
        Some(since) => shared
            .db()
            .reverted_agent_rollouts(since)?
            .into_iter()
            .filter(|(r, _)| r.reason != crate::agent_rollout::ABORTED)
            .map(|(r, superseded)| AgentRevertView {
                id: r.id,
                version: r.version,
                reason: r.reason,
                finished_ms: r.finished_ms.unwrap_or(r.wave_started_ms),
                superseded,
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(Snapshot {
        now_ms: now,
        workers,
        services,
        reverts,
        agent_reverts,
    })
}

/// One evaluation: fires and resolves what it must; returns how many
/// alerts changed state.
pub fn evaluate_once(shared: &Shared, evaluator: &mut Evaluator) -> Result<usize, StoreError> {
    let rules = load_rules(shared)?;
    let snap = snapshot(shared, &rules)?;
    let firing = shared.db().firing_alerts()?;
    let decisions = evaluator.step(&rules, &snap, &firing);
    let mut changed = 0;
    for a in &decisions.fire {
        if let Some(stored) = shared.db().fire_alert(a, &|s| webhook::body(s, "firing"))? {
            warn!(alert = stored.id, rule = %stored.rule_name, subject = %stored.subject, "alert firing: {}", stored.summary);
            changed += 1;
        }
    }
    for (id, why) in &decisions.resolve {
        if let Some(stored) = shared
            .db()
            .resolve_alert(*id, snap.now_ms, why, &|s| webhook::body(s, "resolved"))?
        {
            info!(alert = stored.id, rule = %stored.rule_name, subject = %stored.subject, why, "alert resolved");
            changed += 1;
        }
    }
    Ok(changed)
}

/// Evaluates the rules every `Config::alert_interval` until `stop`,
/// waking the webhook sender after each change.
pub async fn run(
    shared: Arc<Shared>,
    wake_sender: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let period = Duration::from_millis(shared.config.alert_interval_ms().max(10));
    let mut evaluator = Evaluator::default();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(period) => {}
        }
        match evaluate_once(&shared, &mut evaluator) {
            Ok(0) => {}
            Ok(_) => {
                let _ = wake_sender.send(());
            }
            Err(e) => warn!("alert evaluation failed (tried again next time): {e}"),
        }
    }
}
