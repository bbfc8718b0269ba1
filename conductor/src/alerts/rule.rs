//! What an alert rule says, as the API takes it and the store keeps it
//! (JSON): a kind, its parameters, how long the condition must hold, and
//! which workers it watches.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::parse_duration_ms;

/// Longest rule name.
pub const MAX_NAME: usize = 64;

/// What a rule watches. **Names are API**: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A worker is offline (no good frame for three intervals, or its
    /// last will) for longer than `for`.
    WorkerOffline,
    /// A worker's `metric` is above `threshold` for longer than `for`.
    MetricAbove,
    /// A hosted service is `failed` or `unhealthy` for longer than `for`.
    ServiceFailed,
    /// A rollout was reverted; resolves when a later rollout of the same
    /// service succeeds.
    RolloutReverted,
    /// An agent rollout stopped because a worker's agent update failed
    /// (refused, rolled back on the device, or not back within the wave's
    /// time; not when it was aborted); resolves when a later agent rollout
    /// succeeds.
    AgentUpdateFailed,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [
        Kind::WorkerOffline,
        Kind::MetricAbove,
        Kind::ServiceFailed,
        Kind::RolloutReverted,
        Kind::AgentUpdateFailed,
    ];

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WorkerOffline => "worker_offline",
            Kind::MetricAbove => "metric_above",
            Kind::ServiceFailed => "service_failed",
            Kind::RolloutReverted => "rollout_reverted",
            Kind::AgentUpdateFailed => "agent_update_failed",
        }
    }
}

/// A worker metric a rule can watch. **Names are API**: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// CPU busy, all cores, percent.
    Cpu,
    /// Memory in use, percent of total.
    Memory,
    /// The fullest filesystem, percent used.
    Disk,
    /// The hottest sensor, °C.
    Temperature,
    /// A Raspberry Pi's supply is too weak now (firmware bit 0): 1, else 0.
    /// Other machines have no value (never match).
    UnderVoltage,
    /// A Raspberry Pi is frequency capped, throttled or at its soft
    /// temperature limit now (firmware bits 1–3): 1, else 0.
    Throttling,
}

impl Metric {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
            Metric::Disk => "disk",
            Metric::Temperature => "temperature",
            Metric::UnderVoltage => "under_voltage",
            Metric::Throttling => "throttling",
        }
    }

    /// A 0/1 flag rather than a measure (a rule on it takes threshold 0).
    pub fn is_flag(self) -> bool {
        matches!(self, Metric::UnderVoltage | Metric::Throttling)
    }

    /// The unit shown after a value.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Temperature => "°C",
            Metric::UnderVoltage | Metric::Throttling => "",
            _ => "%",
        }
    }
}

/// A rule as the API takes it (`POST /api/v1/alert-rules`) and the store
/// keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name, 1..=[`MAX_NAME`] bytes.
    pub name: String,
    /// What it watches.
    pub kind: Kind,
    /// `metric_above`: which metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    /// `metric_above`: the value it must exceed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// How long the condition must hold before the alert fires (`30s`,
    /// `5m`; default `0s`: at the first evaluation that sees it).
    #[serde(default = "zero", rename = "for")]
    pub hold: String,
    /// Labels a worker must all have to be watched (empty: every worker).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// `service_failed`, `rollout_reverted`: only this service (default:
    /// every service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

fn zero() -> String {
    "0s".into()
}

impl RuleSpec {
    /// Checks the parameters fit the kind; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return Err(format!("name: 1..={MAX_NAME} bytes"));
        }
        if parse_duration_ms(&self.hold).is_none() {
            return Err(format!(
                "for: not a duration: {:?} (30s, 5m, 1h)",
                self.hold
            ));
        }
        match self.kind {
            Kind::MetricAbove => {
                if self.metric.is_none() {
                    return Err(
                        "metric_above needs metric: cpu, memory, disk or temperature".into(),
                    );
                }
                if !self.threshold.is_some_and(f64::is_finite) {
                    return Err("metric_above needs a numeric threshold".into());
                }
            }
            _ => {
                if self.metric.is_some() || self.threshold.is_some() {
                    return Err(format!(
                        "{} takes no metric or threshold",
                        self.kind.as_str()
                    ));
                }
            }
        }
        if self.service.is_some()
            && !matches!(self.kind, Kind::ServiceFailed | Kind::RolloutReverted)
        {
            return Err(format!("{} takes no service", self.kind.as_str()));
        }
        if !self.selector.is_empty()
            && matches!(self.kind, Kind::RolloutReverted | Kind::AgentUpdateFailed)
        {
            return Err(format!("{} takes no selector", self.kind.as_str()));
        }
        Ok(())
    }

    /// How long the condition must hold, ms (0 if unreadable: validated
    /// before it is stored).
    pub fn hold_ms(&self) -> u64 {
        parse_duration_ms(&self.hold).unwrap_or(0)
    }

    /// Whether a worker with `labels` is watched.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<RuleSpec, String> {
        let r: RuleSpec = serde_json::from_value(v).map_err(|e| e.to_string())?;
        r.validate().map(|()| r)
    }

    #[test]
    fn each_kind_takes_only_its_parameters() {
        let ok = parse(serde_json::json!({
            "name": "hot", "kind": "metric_above", "metric": "temperature",
            "threshold": 70, "for": "30s", "selector": {"site": "shop"}
        }))
        .unwrap();
        assert_eq!(ok.hold_ms(), 30_000);
        assert!(ok.selects(&[("site".into(), "shop".into())].into()));
        assert!(!ok.selects(&BTreeMap::new()));
        let offline = parse(serde_json::json!({"name": "down", "kind": "worker_offline"})).unwrap();
        assert_eq!(offline.hold_ms(), 0);
        for (bad, why) in [
            (
                serde_json::json!({"name": "x", "kind": "metric_above", "threshold": 1}),
                "metric",
            ),
            (
                serde_json::json!({"name": "x", "kind": "metric_above", "metric": "cpu"}),
                "threshold",
            ),
            (
                serde_json::json!({"name": "x", "kind": "worker_offline", "threshold": 1}),
                "takes no",
            ),
            (
                serde_json::json!({"name": "x", "kind": "worker_offline", "service": "s"}),
                "takes no service",
            ),
            (
                serde_json::json!({"name": "x", "kind": "worker_offline", "for": "soon"}),
                "duration",
            ),
            (
                serde_json::json!({"name": "", "kind": "worker_offline"}),
                "name",
            ),
            (
                serde_json::json!({"name": "x", "kind": "agent_update_failed", "selector": {"a": "b"}}),
                "takes no selector",
            ),
            (
                serde_json::json!({"name": "x", "kind": "agent_update_failed", "service": "s"}),
                "takes no service",
            ),
            (
                serde_json::json!({"name": "x", "kind": "worker_gone"}),
                "unknown variant",
            ),
            (
                serde_json::json!({"name": "x", "kind": "worker_offline", "extra": 1}),
                "unknown field",
            ),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
