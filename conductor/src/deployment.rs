//! What services and rollouts share, below both: a deployment (where a
//! service runs, at which version, its default rollout [`Policy`]), the
//! errors of service operations, the reported states, and stored specs
//! turned into the manifests workers fetch (cached in the shared state).
//!
//! Layering: `deployment` depends on `spec`, `store` and `state`;
//! [`crate::rollout`] and [`crate::services`] (the reconcile loop) build on
//! it, and nothing here calls them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use protocol::ServiceState;
use serde::{Deserialize, Serialize};

use crate::spec::{BuiltManifest, SpecDoc, SpecError};
use crate::state::{Shared, WorkerEntry};
use crate::store::{DeploymentRow, StoreError};

/// Errors of service, deployment and rollout operations.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A spec or deployment request breaks a limit.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state (a rollout in progress,
    /// an artifact in use).
    #[error("{0}")]
    Conflict(String),
    /// Database failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored spec could not be read back.
    #[error("stored spec {name} v{version} is unreadable: {source}")]
    Corrupt {
        /// Service.
        name: String,
        /// Version.
        version: u32,
        /// Cause.
        source: serde_json::Error,
    },
    /// Sealing a command failed.
    #[error("cannot seal command: {0}")]
    Seal(String),
}

impl From<SpecError> for ServiceError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::Invalid(m) => ServiceError::Invalid(m),
            SpecError::Store(s) => ServiceError::Store(s),
        }
    }
}

/// Lower-case name of a reported state.
pub fn state_name(s: ServiceState) -> &'static str {
    s.as_str()
}

/// States in which a service's process (or container) is meant to run.
pub fn is_active_state(s: &str) -> bool {
    matches!(
        s,
        "starting" | "running" | "backoff" | "healthy" | "unhealthy"
    )
}

/// Longest settle time, seconds.
pub const MAX_SETTLE_S: u32 = 3600;
/// Longest wave timeout, seconds.
pub const MAX_TIMEOUT_S: u32 = 86_400;

fn default_settle() -> u32 {
    10
}

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Canary wave size (workers); exclusive with `canary_percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u32>,
    /// Canary wave size as a percentage of the targets (1..=100, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    /// How long each member must stay healthy, seconds.
    #[serde(default = "default_settle")]
    pub settle_s: u32,
    /// A wave that has not passed after this long fails (default
    /// `settle_s + 60`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            canary: Some(1),
            canary_percent: None,
            settle_s: default_settle(),
            timeout_s: None,
        }
    }
}

impl Policy {
    /// Checks the bounds; the message names the field.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let bad = |m: &str| Err(ServiceError::Invalid(m.into()));
        match (self.canary, self.canary_percent) {
            (Some(_), Some(_)) => return bad("give canary or canary_percent, not both"),
            (Some(0), _) => return bad("canary must be ≥ 1"),
            (_, Some(p)) if p == 0 || p > 100 => return bad("canary_percent must be 1..=100"),
            _ => {}
        }
        if self.settle_s > MAX_SETTLE_S {
            return bad("settle_s must be ≤ 3600");
        }
        if let Some(t) = self.timeout_s {
            if t <= self.settle_s || t > MAX_TIMEOUT_S {
                return bad("timeout_s must be > settle_s and ≤ 86400");
            }
        }
        Ok(())
    }

    /// Wave timeout, ms.
    pub fn timeout_ms(&self) -> u64 {
        u64::from(self.timeout_s.unwrap_or(self.settle_s.saturating_add(60))) * 1000
    }

    /// Canary wave size for `targets` targets, `online` of them online.
    pub(crate) fn canary_count(&self, targets: usize, online: usize) -> usize {
        let n = match (self.canary, self.canary_percent) {
            (Some(c), _) => c as usize,
            (None, Some(p)) => (targets * usize::from(p)).div_ceil(100),
            (None, None) => 1,
        };
        n.clamp(1, online.max(1))
    }
}

/// `true` when `labels` has every `key=value` of `selector` (an empty
/// selector matches every label set).
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A deployment with its JSON columns parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Service name.
    pub name: String,
    /// Desired version.
    pub version: u32,
    /// Named workers.
    pub workers: Vec<String>,
    /// Label selector (all must match; empty selects nobody).
    pub labels: BTreeMap<String, String>,
    /// `running` | `stopped`.
    pub desired: String,
    /// Last change, ms.
    pub updated_ms: u64,
    /// Default rollout policy (`None`: [`Policy::default`]).
    pub rollout: Option<Policy>,
}

impl Deployment {
    /// Parses a stored row (unreadable JSON columns read as empty).
    pub fn from_row(r: &DeploymentRow) -> Deployment {
        Deployment {
            name: r.name.clone(),
            version: r.version,
            workers: serde_json::from_str(&r.workers_json).unwrap_or_default(),
            labels: serde_json::from_str(&r.labels_json).unwrap_or_default(),
            desired: r.desired.clone(),
            updated_ms: r.updated_ms,
            rollout: r
                .rollout_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
        }
    }

    /// Target worker ids: named ∪ label matches, never revoked ones.
    pub fn targets(&self, workers: &HashMap<String, WorkerEntry>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for id in &self.workers {
            if workers.get(id).is_some_and(|w| !w.revoked) {
                out.insert(id.clone());
            }
        }
        if !self.labels.is_empty() {
            for w in workers.values() {
                if !w.revoked && labels_match(&self.labels, &w.labels) {
                    out.insert(w.id.clone());
                }
            }
        }
        out
    }

    /// JSON for the API.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "workers": self.workers,
            "labels": self.labels,
            "desired_state": self.desired,
            "updated_ms": self.updated_ms,
            "rollout": self.rollout,
        })
    }
}

/// Loads a stored spec.
pub fn load_doc(
    shared: &Shared,
    name: &str,
    version: u32,
) -> Result<Option<SpecDoc>, ServiceError> {
    let Some(row) = shared.db().service(name, version)? else {
        return Ok(None);
    };
    serde_json::from_str(&row.spec_json)
        .map(Some)
        .map_err(|source| ServiceError::Corrupt {
            name: name.to_string(),
            version,
            source,
        })
}

/// Size of artifact `sha` for `arch` from the store (`None`: not uploaded
/// for that arch). Call without the db lock held.
pub fn artifact_size(shared: &Shared, arch: &str, sha: &str) -> Result<Option<u64>, SpecError> {
    Ok(shared
        .db()
        .artifact(sha)?
        .into_iter()
        .find(|a| a.arch == arch)
        .map(|a| a.size))
}

/// The encoded manifest of a stored spec version (cached). `None` when the
/// version does not exist. Call without the db lock held.
pub fn manifest(
    shared: &Shared,
    name: &str,
    version: u32,
) -> Result<Option<Arc<BuiltManifest>>, ServiceError> {
    let key = (name.to_string(), version);
    if let Some(b) = shared.manifests().get(&key) {
        return Ok(Some(b.clone()));
    }
    let Some(doc) = load_doc(shared, name, version)? else {
        return Ok(None);
    };
    let m = doc.to_manifest(version, &|arch, sha| artifact_size(shared, arch, sha))?;
    let bytes = m
        .encode()
        .map_err(|e| ServiceError::Invalid(format!("{name} v{version}: {e}")))?;
    let built = Arc::new(BuiltManifest {
        digest: protocol::manifest::digest(&bytes),
        bytes,
        retry_failed: m.restart != protocol::RestartPolicy::Never,
    });
    shared.manifests().insert(key, built.clone());
    Ok(Some(built))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_states() {
        use crate::spec::valid_name;
        assert!(valid_name("web-1") && !valid_name("Web") && !valid_name(""));
        assert!(!valid_name(&"a".repeat(33)));
        assert!(is_active_state("healthy") && !is_active_state("stopped"));
        assert_eq!(state_name(ServiceState::Unhealthy), "unhealthy");
    }
}
