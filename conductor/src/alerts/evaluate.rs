//! Rule evaluation as a pure step: given the rules, a snapshot of the fleet
//! and the alerts firing now, which alerts fire and which resolve.
//!
//! A condition must hold for the rule's `for` before its alert fires: the
//! [`Evaluator`] remembers since when it has seen each (rule, subject)
//! hold (like Prometheus' `pending`). That memory is not persisted: after a
//! conductor restart a pending condition starts its wait again, while an
//! alert already firing stays firing (the store holds it) and is not
//! notified again. A worker's offline time is counted from its last good
//! frame, but never from before the conductor started: a conductor that was
//! down does not blame the workers for the frames it did not receive.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::rule::{Kind, Metric, RuleSpec};
use crate::store::AlertRow;

/// A rule with its stored id and creation time.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Row id.
    pub id: i64,
    /// Created, ms (a rollout reverted before the rule existed is not its business).
    pub created_ms: u64,
    /// The rule.
    pub spec: RuleSpec,
}

/// One worker as the rules see it.
#[derive(Debug, Clone, Default)]
pub struct WorkerView {
    /// Worker id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Offline since (ms, conductor clock), when offline.
    pub offline_since_ms: Option<u64>,
    /// Latest metric values, when the worker is not offline.
    pub metrics: Option<MetricValues>,
}

/// A worker's latest metric values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricValues {
    /// CPU busy, percent.
    pub cpu: f64,
    /// Memory in use, percent.
    pub memory: f64,
    /// The fullest filesystem, percent (`None`: no filesystem reported).
    pub disk: Option<f64>,
    /// The hottest sensor, °C (`None`: no sensor).
    pub temperature: Option<f64>,
    /// A Pi's under-voltage bit now, 0 or 1 (`None`: not a Pi, or its
    /// kernel does not expose the bits).
    pub under_voltage: Option<f64>,
    /// A Pi's capped/throttled/soft-limit bits now, 0 or 1.
    pub throttling: Option<f64>,
}

impl MetricValues {
    /// Reads a metrics frame.
    pub fn of(m: &protocol::Metrics) -> MetricValues {
        let pct = |used: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                used as f64 * 100.0 / total as f64
            }
        };
        MetricValues {
            cpu: f64::from(m.cpu_total) / 100.0,
            memory: pct(m.memory_used, m.memory_total),
            disk: m
                .disks
                .iter()
                .filter(|d| d.total > 0)
                .map(|d| pct(d.used, d.total))
                .reduce(f64::max),
            temperature: m
                .temperatures
                .iter()
                .map(|t| f64::from(t.millicelsius) / 1000.0)
                .reduce(f64::max),
            under_voltage: None,
            throttling: None,
        }
    }

    /// Adds a Pi's throttling flags from its board frame.
    pub fn with_board(mut self, board: Option<&protocol::Board>) -> MetricValues {
        use protocol::board::THROTTLING_NOW;
        let bits = board.and_then(|b| b.throttled);
        let flag = |mask: u32| bits.map(|t| if t & mask != 0 { 1.0 } else { 0.0 });
        self.under_voltage = flag(1);
        self.throttling = flag(THROTTLING_NOW);
        self
    }

    fn get(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Cpu => Some(self.cpu),
            Metric::Memory => Some(self.memory),
            Metric::Disk => self.disk,
            Metric::Temperature => self.temperature,
            Metric::UnderVoltage => self.under_voltage,
            Metric::Throttling => self.throttling,
        }
    }
}

/// A hosted service's last reported state on a worker.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// Worker id.
    pub worker_id: String,
    /// Service name.
    pub name: String,
    /// Last state (`failed`, `running`, …).
    pub state: String,
    /// What the worker said about it.
    pub detail: String,
}

/// A reverted rollout.
#[derive(Debug, Clone)]
pub struct RevertView {
    /// Rollout id.
    pub id: i64,
    /// Service.
    pub service: String,
    /// Versions.
    pub from_version: u32,
    /// Versions.
    pub to_version: u32,
    /// Why it was reverted.
    pub reason: String,
    /// When, ms.
    pub finished_ms: u64,
    /// A later rollout of the same service succeeded.
    pub superseded: bool,
}

/// An agent rollout that a failed update stopped.
#[derive(Debug, Clone)]
pub struct AgentRevertView {
    /// Agent rollout id.
    pub id: i64,
    /// The version it rolled out.
    pub version: String,
    /// Why it stopped (which worker, what it said).
    pub reason: String,
    /// When, ms.
    pub finished_ms: u64,
    /// A later agent rollout succeeded.
    pub superseded: bool,
}

/// What the rules look at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Now, ms.
    pub now_ms: u64,
    /// Workers (revoked ones left out).
    pub workers: Vec<WorkerView>,
    /// Service states.
    pub services: Vec<ServiceView>,
    /// Reverted rollouts (recent enough for the oldest rule).
    pub reverts: Vec<RevertView>,
    /// Agent rollouts stopped by a failed update (recent enough for the
    /// oldest rule; aborted ones left out).
    pub agent_reverts: Vec<AgentRevertView>,
}

/// A condition that holds now for one subject.
#[derive(Debug, Clone, PartialEq)]
struct Hit {
    subject: String,
    summary: String,
    value: Option<f64>,
    /// Since when it holds, when the snapshot knows (else: first seen).
    since_ms: Option<u64>,
}

fn fmt_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn hits(rule: &Rule, snap: &Snapshot) -> Vec<Hit> {
    let spec = &rule.spec;
    let hold = fmt_ms(spec.hold_ms());
    let watched = || snap.workers.iter().filter(|w| spec.selects(&w.labels));
    match spec.kind {
        Kind::WorkerOffline => watched()
            .filter_map(|w| {
                let since = w.offline_since_ms?;
                Some(Hit {
                    subject: w.id.clone(),
                    summary: format!("worker {} ({}) is offline", w.hostname, w.id),
                    value: None,
                    since_ms: Some(since),
                })
            })
            .collect(),
        Kind::MetricAbove => {
            let (Some(metric), Some(threshold)) = (spec.metric, spec.threshold) else {
                return Vec::new();
            };
            watched()
                .filter_map(|w| {
                    let v = w.metrics?.get(metric)?;
                    (v > threshold).then(|| Hit {
                        subject: w.id.clone(),
                        summary: if metric.is_flag() {
                            format!(
                                "{} on {} ({}) for {hold}",
                                metric.as_str(),
                                w.hostname,
                                w.id
                            )
                        } else {
                            format!(
                                "{} {v:.1} {} on {} ({}), above {threshold} for {hold}",
                                metric.as_str(),
                                metric.unit(),
                                w.hostname,
                                w.id
                            )
                        },
                        value: Some(v),
                        since_ms: None,
                    })
                })
                .collect()
        }
        Kind::ServiceFailed => {
            let selected: HashMap<&str, &WorkerView> =
                watched().map(|w| (w.id.as_str(), w)).collect();
            snap.services
                .iter()
                .filter(|s| matches!(s.state.as_str(), "failed" | "unhealthy"))
                .filter(|s| spec.service.as_ref().is_none_or(|n| *n == s.name))
                .filter_map(|s| {
                    let w = selected.get(s.worker_id.as_str())?;
                    Some(Hit {
                        subject: format!("{}/{}", s.worker_id, s.name),
                        summary: format!(
                            "service {} is {} on {} ({}){}",
                            s.name,
                            s.state,
                            w.hostname,
                            w.id,
                            if s.detail.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", s.detail)
                            }
                        ),
                        value: None,
                        since_ms: None,
                    })
                })
                .collect()
        }
        Kind::RolloutReverted => snap
            .reverts
            .iter()
            .filter(|r| !r.superseded && r.finished_ms >= rule.created_ms)
            .filter(|r| spec.service.as_ref().is_none_or(|n| *n == r.service))
            .map(|r| Hit {
                subject: format!("rollout/{}", r.id),
                summary: format!(
                    "rollout {} of {} v{} → v{} was reverted: {}",
                    r.id, r.service, r.from_version, r.to_version, r.reason
                ),
                value: None,
                since_ms: Some(r.finished_ms),
            })
            .collect(),
        Kind::AgentUpdateFailed => snap
            .agent_reverts
            .iter()
            .filter(|r| !r.superseded && r.finished_ms >= rule.created_ms)
            .map(|r| Hit {
                subject: format!("agent-rollout/{}", r.id),
                summary: format!(
                    "agent rollout {} to {} stopped: {}",
                    r.id, r.version, r.reason
                ),
                value: None,
                since_ms: Some(r.finished_ms),
            })
            .collect(),
    }
}

/// What one evaluation decided.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Alerts to fire (id 0: not stored yet).
    pub fire: Vec<AlertRow>,
    /// Firing alerts to resolve, with why.
    pub resolve: Vec<(i64, &'static str)>,
}

/// Remembers since when each (rule, subject) condition has held.
#[derive(Debug, Default)]
pub struct Evaluator {
    /// (rule id, subject) → first evaluation that saw the condition hold,
    /// ms. Entries leave when the condition stops holding.
    pending: HashMap<(i64, String), u64>,
}

impl Evaluator {
    /// One evaluation: `firing` are the alerts firing now (from the store).
    pub fn step(&mut self, rules: &[Rule], snap: &Snapshot, firing: &[AlertRow]) -> Decisions {
        let now = snap.now_ms;
        let mut out = Decisions::default();
        let mut holding: HashSet<(i64, String)> = HashSet::new();
        let is_firing: HashSet<(i64, &str)> = firing
            .iter()
            .map(|a| (a.rule_id, a.subject.as_str()))
            .collect();
        for rule in rules {
            for hit in hits(rule, snap) {
                let key = (rule.id, hit.subject.clone());
                let first = *self.pending.entry(key.clone()).or_insert(now);
                holding.insert(key);
                let since = hit.since_ms.unwrap_or(first);
                if is_firing.contains(&(rule.id, hit.subject.as_str()))
                    || now.saturating_sub(since) < rule.spec.hold_ms()
                {
                    continue;
                }
                out.fire.push(AlertRow {
                    id: 0,
                    rule_id: rule.id,
                    rule_name: rule.spec.name.clone(),
                    kind: rule.spec.kind.as_str().into(),
                    subject: hit.subject,
                    state: "firing".into(),
                    summary: hit.summary,
                    value: hit.value,
                    fired_ms: now,
                    resolved_ms: None,
                    resolved_why: String::new(),
                });
            }
        }
        self.pending.retain(|k, _| holding.contains(k));
        let rule_ids: HashSet<i64> = rules.iter().map(|r| r.id).collect();
        for a in firing {
            if !rule_ids.contains(&a.rule_id) {
                out.resolve.push((a.id, "rule deleted"));
            } else if !holding.contains(&(a.rule_id, a.subject.clone())) {
                out.resolve.push((a.id, "condition cleared"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: i64, v: serde_json::Value) -> Rule {
        let spec: RuleSpec = serde_json::from_value(v).unwrap();
        spec.validate().unwrap();
        Rule {
            id,
            created_ms: 0,
            spec,
        }
    }

    fn worker(id: &str) -> WorkerView {
        WorkerView {
            id: id.into(),
            hostname: format!("host-{id}"),
            metrics: Some(MetricValues::default()),
            ..WorkerView::default()
        }
    }

    /// Runs one step and applies it to `firing` the way the store would.
    fn apply(
        e: &mut Evaluator,
        rules: &[Rule],
        snap: &Snapshot,
        firing: &mut Vec<AlertRow>,
    ) -> (usize, usize) {
        let d = e.step(rules, snap, firing);
        let (f, r) = (d.fire.len(), d.resolve.len());
        firing.retain(|a| !d.resolve.iter().any(|(id, _)| *id == a.id));
        for (n, mut a) in d.fire.into_iter().enumerate() {
            a.id = snap.now_ms.try_into().unwrap_or(0) + i64::try_from(n).unwrap();
            firing.push(a);
        }
        (f, r)
    }

    #[test]
    fn a_metric_fires_once_after_its_hold_and_resolves_once() {
        let rules = [rule(
            1,
            serde_json::json!({
                "name": "cpu", "kind": "metric_above", "metric": "cpu", "threshold": 90, "for": "10s",
                "selector": {"site": "shop"}
            }),
        )];
        let mut hot = worker("w-1");
        hot.labels.insert("site".into(), "shop".into());
        hot.metrics = Some(MetricValues {
            cpu: 95.0,
            ..MetricValues::default()
        });
        let mut other = hot.clone();
        other.id = "w-2".into();
        other.labels.clear();
        let mut snap = Snapshot {
            now_ms: 1_000,
            workers: vec![hot, other],
            ..Snapshot::default()
        };
        let (mut e, mut firing) = (Evaluator::default(), Vec::new());
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (0, 0), "pending");
        snap.now_ms = 10_999;
        assert_eq!(
            apply(&mut e, &rules, &snap, &mut firing),
            (0, 0),
            "still pending"
        );
        snap.now_ms = 11_000;
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (1, 0));
        assert_eq!(firing[0].subject, "w-1", "w-2 is not selected");
        assert_eq!(firing[0].value, Some(95.0));
        assert!(
            firing[0].summary.contains("cpu 95.0 %"),
            "{}",
            firing[0].summary
        );
        snap.now_ms = 20_000;
        assert_eq!(
            apply(&mut e, &rules, &snap, &mut firing),
            (0, 0),
            "fires once"
        );
        snap.workers[0].metrics = Some(MetricValues {
            cpu: 50.0,
            ..MetricValues::default()
        });
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (0, 1));
        assert_eq!(
            apply(&mut e, &rules, &snap, &mut firing),
            (0, 0),
            "resolves once"
        );
        // A dip resets the hold.
        snap.workers[0].metrics = Some(MetricValues {
            cpu: 99.0,
            ..MetricValues::default()
        });
        snap.now_ms = 30_000;
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (0, 0));
        snap.workers[0].metrics = Some(MetricValues::default());
        snap.now_ms = 35_000;
        apply(&mut e, &rules, &snap, &mut firing);
        snap.workers[0].metrics = Some(MetricValues {
            cpu: 99.0,
            ..MetricValues::default()
        });
        snap.now_ms = 41_000;
        assert_eq!(
            apply(&mut e, &rules, &snap, &mut firing),
            (0, 0),
            "hold restarted at 41 s"
        );
    }

    #[test]
    fn offline_counts_from_its_own_clock_and_a_deleted_rule_resolves() {
        let rules = vec![rule(
            2,
            serde_json::json!({"name": "down", "kind": "worker_offline", "for": "1m"}),
        )];
        let mut w = worker("w-1");
        w.offline_since_ms = Some(0);
        let snap = Snapshot {
            now_ms: 60_000,
            workers: vec![w],
            ..Snapshot::default()
        };
        let (mut e, mut firing) = (Evaluator::default(), Vec::new());
        assert_eq!(
            apply(&mut e, &rules, &snap, &mut firing),
            (1, 0),
            "offline since 0, seen now"
        );
        let d = e.step(&[], &snap, &firing);
        assert_eq!(d.resolve, [(firing[0].id, "rule deleted")]);
    }

    #[test]
    fn services_and_reverts() {
        let rules = vec![
            rule(
                3,
                serde_json::json!({"name": "svc", "kind": "service_failed", "service": "web"}),
            ),
            rule(
                4,
                serde_json::json!({"name": "rv", "kind": "rollout_reverted"}),
            ),
        ];
        let svc = |name: &str, state: &str| ServiceView {
            worker_id: "w-1".into(),
            name: name.into(),
            state: state.into(),
            detail: "exit 3".into(),
        };
        let revert = RevertView {
            id: 9,
            service: "web".into(),
            from_version: 1,
            to_version: 2,
            reason: "w-1 failed".into(),
            finished_ms: 500,
            superseded: false,
        };
        let mut snap = Snapshot {
            now_ms: 1_000,
            workers: vec![worker("w-1")],
            services: vec![svc("web", "failed"), svc("db", "failed")],
            reverts: vec![revert],
            agent_reverts: Vec::new(),
        };
        let (mut e, mut firing) = (Evaluator::default(), Vec::new());
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (2, 0));
        let subjects: Vec<_> = firing.iter().map(|a| a.subject.as_str()).collect();
        assert_eq!(subjects, ["w-1/web", "rollout/9"], "db is not watched");
        assert!(firing[0].summary.contains("exit 3"));
        snap.services[0].state = "healthy".into();
        snap.reverts[0].superseded = true;
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (0, 2));
        // A revert from before the rule existed is not reported.
        snap.reverts[0].superseded = false;
        let late = vec![Rule {
            created_ms: 600,
            ..rules[1].clone()
        }];
        assert_eq!(apply(&mut e, &late, &snap, &mut firing), (0, 0));
    }

    #[test]
    fn a_failed_agent_update_fires_until_a_later_agent_rollout_succeeds() {
        let rules = vec![rule(
            5,
            serde_json::json!({"name": "agent", "kind": "agent_update_failed"}),
        )];
        let mut snap = Snapshot {
            now_ms: 1_000,
            agent_reverts: vec![AgentRevertView {
                id: 3,
                version: "0.2.0".into(),
                reason: "wave 0 failed: w-1: 0.2.0: rolled back: exited".into(),
                finished_ms: 900,
                superseded: false,
            }],
            ..Snapshot::default()
        };
        let (mut e, mut firing) = (Evaluator::default(), Vec::new());
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (1, 0));
        assert_eq!(firing[0].subject, "agent-rollout/3");
        assert!(
            firing[0].summary.contains("rolled back"),
            "{}",
            firing[0].summary
        );
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (0, 0), "once");
        snap.agent_reverts[0].superseded = true;
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (0, 1));
    }

    #[test]
    fn metric_values_read_a_frame() {
        let mut m = protocol::examples::metrics();
        m.cpu_total = 4_250;
        let v = MetricValues::of(&m);
        assert!((v.cpu - 42.5).abs() < 1e-9);
        assert!(v.memory > 0.0 && v.memory <= 100.0);
        assert_eq!((v.under_voltage, v.throttling), (None, None), "not a Pi");
        let mut board = protocol::examples::board();
        board.throttled = Some(0x50005);
        let v = v.with_board(Some(&board));
        assert_eq!((v.under_voltage, v.throttling), (Some(1.0), Some(1.0)));
        // Since-boot bits alone do not hold an alert open.
        board.throttled = Some(0x50000);
        let v = v.with_board(Some(&board));
        assert_eq!((v.under_voltage, v.throttling), (Some(0.0), Some(0.0)));
        board.throttled = None;
        assert_eq!(v.with_board(Some(&board)).under_voltage, None);
    }

    #[test]
    fn an_under_voltage_rule_fires_on_the_pi_and_says_so_plainly() {
        let rules = [rule(
            1,
            serde_json::json!({
                "name": "psu", "kind": "metric_above", "metric": "under_voltage", "threshold": 0
            }),
        )];
        let mut pi = worker("w-1");
        let mut board = protocol::examples::board();
        board.throttled = Some(0x1);
        pi.metrics = Some(MetricValues::default().with_board(Some(&board)));
        let mut other = worker("w-2");
        other.metrics = Some(MetricValues::default());
        let snap = Snapshot {
            now_ms: 1_000,
            workers: vec![pi, other],
            ..Snapshot::default()
        };
        let (mut e, mut firing) = (Evaluator::default(), Vec::new());
        assert_eq!(apply(&mut e, &rules, &snap, &mut firing), (1, 0));
        assert_eq!(firing[0].subject, "w-1", "w-2 is no Pi: no value, no alert");
        assert!(
            firing[0].summary.starts_with("under_voltage on "),
            "{}",
            firing[0].summary
        );
    }
}
