//! Hosted process services: spec validation, placement and reconciliation.
//!
//! A service spec is immutable once stored; every `POST /services` with the
//! same name stores version previous + 1. A deployment (one per service
//! name) says which version runs where: the named workers plus every
//! non-revoked worker whose labels contain all of the deployment's labels
//! (re-evaluated on every pass, so new enrolments and label changes are
//! picked up). Workers report the actual state with `ServiceStatus` frames
//! (see [`crate::ingest`]), kept in memory in [`Shared::service_status`] and
//! persisted through the ingest writer.
//!
//! [`run`] reconciles every [`RECONCILE_EVERY`] and whenever
//! [`Shared::reconcile`] is notified (after an accepted Birth and after a
//! deployment change). For each deployment and each **online** target
//! worker whose reported version differs from the desired one (or that
//! reports nothing) it sends `Deploy(spec)`; for each service an online
//! worker reports that no deployment targets there it sends `Remove`.
//! Commands are sealed with the worker's secret and published QoS 1 to its
//! `cmd` topic without waiting for the reply; the same command to the same
//! worker and service is repeated at most every [`RESEND_AFTER`] (the
//! throttle for a worker is cleared when it sends a Birth).
//!
//! A Birth starts a new session: the worker's reported services are
//! forgotten, because the worker reports every service it has right after
//! its Birth (a worker that lost its state is thus redeployed). Until those
//! reports arrive the worker may be sent a `Deploy` it already has, which
//! the worker treats as a no-op.
//!
//! Limits: only the version is reconciled. The deployment's `desired` state
//! (`running` | `stopped`, per deployment, not per worker) is reported and
//! used for `in_sync`, but the per-worker start/stop/restart endpoints do not
//! change it and reconciliation never starts or stops a service whose
//! version is already right. Revoked workers are never sent anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{Action, Body, Command, Envelope, RestartPolicy, ServiceSpec, ServiceState};
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::state::{lock, now_ms, Shared, Status, WorkerEntry};
use crate::store::{DeploymentRow, ServiceStatusRow, StoreError};

/// Reconciliation period.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Shortest gap between two identical reconciliation commands to one worker.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// Longest service name.
pub const MAX_NAME_LEN: usize = 32;
/// Longest command / working directory, bytes.
pub const MAX_PATH_LEN: usize = 128;
/// Longest argument, bytes.
pub const MAX_ARG_LEN: usize = 64;
/// Longest environment variable name, bytes.
pub const MAX_ENV_NAME_LEN: usize = 32;
/// Longest environment variable value, bytes.
pub const MAX_ENV_VALUE_LEN: usize = 64;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A spec or deployment request breaks a limit.
    #[error("{0}")]
    Invalid(String),
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

fn invalid(msg: impl Into<String>) -> ServiceError {
    ServiceError::Invalid(msg.into())
}

fn default_restart() -> String {
    "on-failure".into()
}
fn default_max_restarts() -> u16 {
    5
}
fn default_window() -> u32 {
    60
}
fn default_backoff() -> u32 {
    1000
}

/// A service spec as the API accepts it and as it is stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecDoc {
    /// `[a-z0-9-]`, 1..=32 bytes.
    pub name: String,
    /// Executable, ≤ 128 bytes, not empty.
    pub command: String,
    /// ≤ 16 arguments of ≤ 64 bytes.
    #[serde(default)]
    pub args: Vec<String>,
    /// ≤ 16 variables, names 1..=32 bytes, values ≤ 64 bytes.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// ≤ 128 bytes; empty = the service's own directory on the worker.
    #[serde(default)]
    pub working_dir: String,
    /// `always` | `on-failure` | `never`.
    #[serde(default = "default_restart")]
    pub restart: String,
    /// Restarts within the window before `Failed`.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u16,
    /// Restart window, seconds.
    #[serde(default = "default_window")]
    pub restart_window_s: u32,
    /// First restart delay, ms.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u32,
}

/// `true` for a valid service name: `[a-z0-9-]`, 1..=32 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn restart_policy(s: &str) -> Option<RestartPolicy> {
    match s {
        "always" => Some(RestartPolicy::Always),
        "on-failure" => Some(RestartPolicy::OnFailure),
        "never" => Some(RestartPolicy::Never),
        _ => None,
    }
}

impl SpecDoc {
    /// Checks every protocol bound; the message names the offending field.
    pub fn validate(&self) -> Result<(), ServiceError> {
        if !valid_name(&self.name) {
            return Err(invalid("name must be 1..=32 characters of [a-z0-9-]"));
        }
        if self.command.is_empty() || self.command.len() > MAX_PATH_LEN {
            return Err(invalid(format!("command must be 1..={MAX_PATH_LEN} bytes")));
        }
        if self.args.len() > protocol::frame::MAX_ARGS {
            return Err(invalid(format!(
                "at most {} args",
                protocol::frame::MAX_ARGS
            )));
        }
        if let Some(i) = self.args.iter().position(|a| a.len() > MAX_ARG_LEN) {
            return Err(invalid(format!("args[{i}] is over {MAX_ARG_LEN} bytes")));
        }
        if self.env.len() > protocol::frame::MAX_ENV {
            return Err(invalid(format!(
                "at most {} env variables",
                protocol::frame::MAX_ENV
            )));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.len() > MAX_ENV_NAME_LEN || k.contains('=') || k.contains('\0') {
                return Err(invalid(format!(
                    "env name {k:?} must be 1..={MAX_ENV_NAME_LEN} bytes without '=' or NUL"
                )));
            }
            if v.len() > MAX_ENV_VALUE_LEN {
                return Err(invalid(format!(
                    "env {k} value is over {MAX_ENV_VALUE_LEN} bytes"
                )));
            }
        }
        if self.working_dir.len() > MAX_PATH_LEN {
            return Err(invalid(format!("working_dir is over {MAX_PATH_LEN} bytes")));
        }
        if restart_policy(&self.restart).is_none() {
            return Err(invalid("restart must be always, on-failure or never"));
        }
        Ok(())
    }

    /// The wire spec for `version` (values are bounded; validated docs fit).
    pub fn to_spec(&self, version: u32) -> ServiceSpec {
        let mut args = heapless::Vec::new();
        for a in &self.args {
            let _ = args.push(protocol::frame::bounded(a));
        }
        let mut env = heapless::Vec::new();
        for (k, v) in &self.env {
            let _ = env.push(protocol::frame::EnvVar {
                name: protocol::frame::bounded(k),
                value: protocol::frame::bounded(v),
            });
        }
        ServiceSpec {
            name: protocol::frame::bounded(&self.name),
            version,
            command: protocol::frame::bounded(&self.command),
            args,
            env,
            working_dir: protocol::frame::bounded(&self.working_dir),
            restart: restart_policy(&self.restart).unwrap_or(RestartPolicy::OnFailure),
            max_restarts: self.max_restarts,
            restart_window_s: self.restart_window_s,
            backoff_ms: self.backoff_ms,
        }
    }
}

/// Lower-case name of a reported state.
pub fn state_name(s: ServiceState) -> &'static str {
    match s {
        ServiceState::Starting => "starting",
        ServiceState::Running => "running",
        ServiceState::Backoff => "backoff",
        ServiceState::Stopped => "stopped",
        ServiceState::Failed => "failed",
        ServiceState::Removed => "removed",
        ServiceState::Healthy => "healthy",
        ServiceState::Unhealthy => "unhealthy",
    }
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
                if !w.revoked && self.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
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
        })
    }
}

/// Loads a stored spec and builds the wire spec.
pub fn load_spec(
    shared: &Shared,
    name: &str,
    version: u32,
) -> Result<Option<ServiceSpec>, ServiceError> {
    let Some(row) = lock(&shared.db).service(name, version)? else {
        return Ok(None);
    };
    let doc: SpecDoc =
        serde_json::from_str(&row.spec_json).map_err(|source| ServiceError::Corrupt {
            name: name.to_string(),
            version,
            source,
        })?;
    Ok(Some(doc.to_spec(version)))
}

/// Assigns the next command seq for `w` (persisted first), seals `action`
/// and returns `(cmd_id, frame)`. Call with the worker map locked.
pub fn seal_command(
    shared: &Shared,
    w: &mut WorkerEntry,
    action: Action,
) -> Result<(u32, Vec<u8>), ServiceError> {
    let seq = w.cmd_seq + 1;
    // Persist before publishing so the stream stays monotonic across restarts.
    lock(&shared.db).set_cmd_seq(&w.id, seq)?;
    w.cmd_seq = seq;
    let cmd_id = (seq & u64::from(u32::MAX)) as u32;
    let env = Envelope {
        version: protocol::FORMAT_VERSION,
        worker_id: protocol::bounded(&w.id),
        seq,
        sent_at_ms: now_ms(),
        body: Body::Command(Command { id: cmd_id, action }),
    };
    let frame = protocol::seal(&w.secret, &env).map_err(|e| ServiceError::Seal(e.to_string()))?;
    Ok((cmd_id, frame))
}

/// Records an accepted `ServiceStatus` frame (memory + writer queue).
pub fn record_status(shared: &Shared, worker_id: &str, st: &protocol::ServiceStatus) {
    let name = st.name.to_string();
    let mut all = lock(&shared.service_status);
    if st.state == ServiceState::Removed {
        if let Some(m) = all.get_mut(worker_id) {
            m.remove(&name);
        }
        let _ = shared.writer.send(crate::store::WriteOp::ServiceRemoved {
            worker_id: worker_id.to_string(),
            name,
        });
        return;
    }
    let row = ServiceStatusRow {
        worker_id: worker_id.to_string(),
        name: name.clone(),
        version: st.version,
        state: state_name(st.state).to_string(),
        pid: st.pid,
        restarts: st.restarts,
        exit_code: st.exit_code,
        detail: st.detail.to_string(),
        updated_ms: now_ms(),
    };
    all.entry(worker_id.to_string())
        .or_default()
        .insert(name, row.clone());
    let _ = shared
        .writer
        .send(crate::store::WriteOp::ServiceStatus(row));
}

/// What one reconciliation pass wants sent: `(worker, service, Some(version)
/// = Deploy | None = Remove)`.
type Want = (String, String, Option<u32>);

/// One reconciliation pass. Returns how many commands were published.
pub fn reconcile(shared: &Shared, client: &AsyncClient) -> Result<usize, ServiceError> {
    let deps: Vec<Deployment> = lock(&shared.db)
        .deployments()?
        .iter()
        .map(Deployment::from_row)
        .collect();
    let mut specs: HashMap<String, ServiceSpec> = HashMap::new();
    for d in &deps {
        match load_spec(shared, &d.name, d.version)? {
            Some(s) => {
                specs.insert(d.name.clone(), s);
            }
            None => {
                warn!(service = %d.name, version = d.version, "deployment names a missing spec")
            }
        }
    }
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    {
        let mut workers = lock(&shared.workers);
        let mut wants: Vec<Want> = Vec::new();
        {
            let status = lock(&shared.service_status);
            let mut targeted: HashMap<&str, BTreeSet<String>> = HashMap::new();
            for d in &deps {
                let targets = d.targets(&workers);
                if specs.contains_key(&d.name) {
                    for id in &targets {
                        let online = workers
                            .get(id)
                            .is_some_and(|w| w.status == Status::Online && !w.revoked);
                        let actual = status.get(id).and_then(|m| m.get(&d.name));
                        if online && actual.is_none_or(|a| a.version != d.version) {
                            wants.push((id.clone(), d.name.clone(), Some(d.version)));
                        }
                    }
                }
                targeted.insert(&d.name, targets);
            }
            for (wid, services) in status.iter() {
                let online = workers
                    .get(wid)
                    .is_some_and(|w| w.status == Status::Online && !w.revoked);
                if !online {
                    continue;
                }
                for name in services.keys() {
                    if !targeted.get(name.as_str()).is_some_and(|t| t.contains(wid)) {
                        wants.push((wid.clone(), name.clone(), None));
                    }
                }
            }
        }
        let mut sent = lock(&shared.reconcile_sent);
        let now = Instant::now();
        for (wid, name, version) in wants {
            let key = (wid.clone(), name.clone());
            if let Some((v, at)) = sent.get(&key) {
                if *v == version && now.duration_since(*at) < RESEND_AFTER {
                    continue;
                }
            }
            let Some(w) = workers.get_mut(&wid) else {
                continue;
            };
            let action = match version {
                Some(_) => match specs.get(&name) {
                    Some(s) => Action::Deploy(s.clone()),
                    None => continue,
                },
                None => Action::Remove(protocol::frame::bounded(&name)),
            };
            let (cmd_id, frame) = seal_command(shared, w, action)?;
            match version {
                Some(v) => {
                    info!(worker_id = %wid, service = %name, version = v, cmd_id, "reconcile: deploy")
                }
                None => info!(worker_id = %wid, service = %name, cmd_id, "reconcile: remove"),
            }
            sent.insert(key, (version, now));
            frames.push((wid, frame));
        }
    }
    let n = frames.len();
    for (wid, frame) in frames {
        let topic = protocol::topic::topic(&wid, protocol::TopicKind::Cmd);
        if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, frame) {
            warn!(worker_id = %wid, "reconcile: MQTT queue unavailable: {e}");
        }
    }
    Ok(n)
}

/// A worker sent a Birth (new session): forget its reported services — the
/// worker sends a `ServiceStatus` for every service it has right after its
/// Birth — and its resend throttle, so it is reconciled at once.
pub fn new_session(shared: &Shared, worker_id: &str) {
    if lock(&shared.service_status).remove(worker_id).is_some() {
        let _ = shared.writer.send(crate::store::WriteOp::ServicesCleared {
            worker_id: worker_id.to_string(),
        });
    }
    forget_sent(shared, worker_id);
}

/// Forgets the resend throttle for a worker (it reconnected: send at once).
pub fn forget_sent(shared: &Shared, worker_id: &str) {
    lock(&shared.reconcile_sent).retain(|(w, _), _| w != worker_id);
}

/// Runs reconciliation until `stop` turns true.
pub async fn run(shared: Arc<Shared>, client: AsyncClient, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = shared.reconcile.notified() => {}
            _ = stop.changed() => break,
        }
        match reconcile(&shared, &client) {
            Ok(0) => {}
            Ok(n) => debug!(commands = n, "reconcile pass"),
            Err(e) => warn!("reconcile failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> SpecDoc {
        serde_json::from_value(serde_json::json!({"name": "web", "command": "/bin/sleep"}))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn validation_and_wire_spec() {
        let d = doc();
        assert!(d.validate().is_ok());
        let s = d.to_spec(3);
        assert_eq!(
            (s.version, s.restart, s.max_restarts),
            (3, RestartPolicy::OnFailure, 5)
        );
        for bad in [
            SpecDoc {
                name: "Web".into(),
                ..doc()
            },
            SpecDoc {
                name: "a".repeat(33),
                ..doc()
            },
            SpecDoc {
                command: String::new(),
                ..doc()
            },
            SpecDoc {
                args: vec!["x".into(); 17],
                ..doc()
            },
            SpecDoc {
                args: vec!["x".repeat(65)],
                ..doc()
            },
            SpecDoc {
                restart: "sometimes".into(),
                ..doc()
            },
            SpecDoc {
                working_dir: "/".repeat(129),
                ..doc()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
