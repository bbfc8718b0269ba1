//! Hosted services: placement and reconciliation.
//!
//! A service spec ([`crate::spec::SpecDoc`]) is immutable once stored;
//! every `POST /services` with the same name stores version previous + 1.
//! A deployment (one per service name) says which version runs where: the
//! named workers plus every non-revoked worker whose labels contain all of
//! the deployment's labels (re-evaluated on every pass, so new enrolments
//! and label changes are picked up). Workers report the actual state with
//! `ServiceStatus` frames (see [`crate::ingest`]), kept in memory in
//! [`Shared::service_status`] and persisted through the ingest writer.
//!
//! [`run`] reconciles every [`RECONCILE_EVERY`] and whenever
//! [`Shared::reconcile`] is notified (after an accepted Birth, a service
//! status, and a deployment change). Each pass first advances rollouts
//! ([`crate::rollout::evaluate`]). Then, for each deployment and each
//! **online** target worker whose reported version differs from the
//! worker's desired one ([`crate::rollout::desired_version`]: the
//! deployment's version, or the per-worker target of a rollout in
//! progress), or that reports nothing, it sends
//! `DeployManifest{name, version, digest}`; the digest is the SHA-256 of
//! [`Manifest::encode`](protocol::Manifest::encode) of that version, which
//! the worker fetches from `GET /api/v1/agent/manifests/{name}/{version}`
//! (encoding is deterministic; encoded manifests are cached per version).
//! When the worker's effective desired state is `stopped` (a per-worker
//! stop, persisted in `service_overrides`, or a deployment with desired
//! state `stopped`) it sends `InstallManifest` with the same fields
//! instead: the worker fetches and checks the same way, installs that
//! version stopped and never starts it (a running copy is stopped first),
//! so a service deployed stopped, or given a new version while stopped,
//! never runs. Such a worker that reports the right version in an active
//! state (`starting`, `running`, `backoff`, `healthy`, `unhealthy`) is sent
//! `Stop`; one that reports it `failed` is sent the same `InstallManifest`
//! again at most every [`FAILED_RETRY_AFTER`] (a refused download is tried
//! again; a failed service ends `stopped`). For each service an online
//! worker reports that no deployment targets there it sends `Remove`.
//! Commands are sealed with the worker's secret and published QoS 1 to its
//! `cmd` topic without waiting for the reply; the same command to the same
//! worker and service is repeated at most every [`RESEND_AFTER`] (the
//! throttle for a worker is cleared when it sends a Birth). A reply with an error to a `DeployManifest` or an
//! `InstallManifest` is recorded as a failure of that version (rollouts
//! revert on it).
//!
//! A Birth starts a new session: the worker's reported services are
//! forgotten, because the worker reports every service it has right after
//! its Birth (a worker that lost its state is thus redeployed). Until those
//! reports arrive the worker may be sent a `DeployManifest` (or
//! `InstallManifest`) it already has, which the worker treats as a no-op.
//!
//! A service reported `failed` at the version it should run (desired state
//! `running`) is sent the same `DeployManifest` again at most every
//! [`FAILED_RETRY_AFTER`] (counted from the last one sent): the worker
//! fetches what it needs again (an artifact pruned from its cache comes
//! back) and starts the failed service afresh, like an outer crash-loop
//! backoff.
//!
//! Limits: reconciliation never starts a stopped service (a service whose
//! restart policy let it stop, or one installed stopped, stays stopped when
//! the desired state becomes `running`; use the per-worker `start`).
//! A version whose manifest cannot be built (its spec unreadable) is
//! skipped with a warning. Revoked workers are never sent anything.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{Action, Body, Command, Envelope, ManifestRef, ServiceState};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::rollout::{self, Policy, Rollout};
pub use crate::spec::SpecDoc;
use crate::spec::SpecError;
use crate::state::{lock, now_ms, DeployCmd, FailMark, Intent, Shared, Status, WorkerEntry};
use crate::store::{DeploymentRow, ServiceStatusRow, StoreError};

/// Reconciliation period.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Shortest gap between two identical reconciliation commands to one worker.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// A service reported `failed` at its desired version is deployed again
/// (the worker starts it afresh) at most this often.
pub const FAILED_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest service name.
pub const MAX_NAME_LEN: usize = 32;
/// How long a `DeployManifest` or `InstallManifest` waits for its reply to
/// be matched.
const DEPLOY_REPLY_WINDOW: Duration = Duration::from_secs(120);
/// Most `DeployManifest` and `InstallManifest` commands remembered for
/// their replies.
const MAX_DEPLOY_CMDS: usize = 4096;

/// Errors of this module.
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

/// `true` for a valid service name: `[a-z0-9-]`, 1..=32 bytes.
pub fn valid_name(name: &str) -> bool {
    protocol::manifest::valid_service_name(name)
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
            "rollout": self.rollout,
        })
    }
}

/// An encoded manifest and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltManifest {
    /// `Manifest::encode()` bytes, exactly as served to workers.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, as sent in `DeployManifest`.
    pub digest: [u8; 32],
    /// The restart policy is not `never`: a `failed` copy is deployed
    /// again (a `never` service that failed stays failed, as asked).
    pub retry_failed: bool,
}

/// Loads a stored spec.
pub fn load_doc(
    shared: &Shared,
    name: &str,
    version: u32,
) -> Result<Option<SpecDoc>, ServiceError> {
    let Some(row) = lock(&shared.db).service(name, version)? else {
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
    Ok(lock(&shared.db)
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
    if let Some(b) = lock(&shared.manifests).get(&key) {
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
    lock(&shared.manifests).insert(key, built.clone());
    Ok(Some(built))
}

/// `true` when `worker` may download the manifest of `name` v`version`: a
/// deployment of `name` targets it and the version is one it may be told
/// to run (the deployment's, or the from/to version of a rollout in
/// progress). Call without the worker map locked.
pub fn may_fetch(
    shared: &Shared,
    worker: &str,
    name: &str,
    version: u32,
) -> Result<bool, ServiceError> {
    let Some(dep) = lock(&shared.db).deployment(name)? else {
        return Ok(false);
    };
    let dep = Deployment::from_row(&dep);
    if !dep.targets(&lock(&shared.workers)).contains(worker) {
        return Ok(false);
    }
    if version == dep.version {
        return Ok(true);
    }
    Ok(rollout::active(shared)?
        .get(name)
        .is_some_and(|r| version == r.row.from_version || version == r.row.to_version))
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
        version: w.format,
        worker_id: protocol::bounded(&w.id),
        seq,
        sent_at_ms: now_ms(),
        body: Body::Command(Command { id: cmd_id, action }),
    };
    let frame = protocol::seal(&w.secret, &env).map_err(|e| ServiceError::Seal(e.to_string()))?;
    Ok((cmd_id, frame))
}

/// Records an accepted `ServiceStatus` frame (memory + writer queue); a
/// `failed` or `unhealthy` report is also kept as a [`FailMark`] for
/// rollouts. Wakes reconciliation (a rollout may advance).
pub fn record_status(shared: &Shared, worker_id: &str, st: &protocol::ServiceStatus) {
    let name = st.name.to_string();
    let now = now_ms();
    if matches!(st.state, ServiceState::Failed | ServiceState::Unhealthy) {
        record_failure(
            shared,
            worker_id,
            &name,
            Some(st.version),
            format!("{} v{}: {}", state_name(st.state), st.version, st.detail),
        );
    }
    shared.reconcile.notify_one();
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
        updated_ms: now,
    };
    all.entry(worker_id.to_string())
        .or_default()
        .insert(name, row.clone());
    let _ = shared
        .writer
        .send(crate::store::WriteOp::ServiceStatus(row));
}

/// Remembers a failure of `name` on `worker_id` (see [`FailMark`]).
pub fn record_failure(
    shared: &Shared,
    worker_id: &str,
    name: &str,
    version: Option<u32>,
    what: String,
) {
    lock(&shared.service_failures).insert(
        (worker_id.to_string(), name.to_string()),
        FailMark {
            version,
            what,
            at_ms: now_ms(),
        },
    );
}

/// A reply arrived that no HTTP request waits for: if it answers a
/// `DeployManifest` or an `InstallManifest` with an error, record a failure
/// of that version.
pub fn deploy_reply(shared: &Shared, worker_id: &str, reply: &protocol::Reply) {
    let Some(cmd) = lock(&shared.deploy_cmds).remove(&(worker_id.to_string(), reply.cmd_id)) else {
        return;
    };
    if reply.status != protocol::ReplyStatus::Ok {
        warn!(worker_id, service = %cmd.name, version = cmd.version, detail = %reply.detail,
            "deploy refused by the worker");
        record_failure(
            shared,
            worker_id,
            &cmd.name,
            Some(cmd.version),
            format!(
                "deploy v{} refused: {:?} {}",
                cmd.version, reply.status, reply.detail
            ),
        );
        shared.reconcile.notify_one();
    }
}

/// What one reconciliation pass wants sent.
/// (worker, service, what to send, least time since the same was last sent).
type Want = (String, String, Intent, Duration);

/// One reconciliation pass. Returns how many commands were published.
pub fn reconcile(shared: &Shared, client: &AsyncClient) -> Result<usize, ServiceError> {
    if let Err(e) = rollout::evaluate(shared) {
        warn!("rollout evaluation failed: {e}");
    }
    let (deps, overrides) = {
        let db = lock(&shared.db);
        let deps: Vec<Deployment> = db.deployments()?.iter().map(Deployment::from_row).collect();
        let overrides: HashSet<(String, String)> = db
            .overrides()?
            .into_iter()
            .filter(|(_, _, d)| d == "stopped")
            .map(|(w, n, _)| (w, n))
            .collect();
        (deps, overrides)
    };
    let active: HashMap<String, Rollout> = rollout::active(shared)?;
    let mut built: HashMap<(String, u32), Arc<BuiltManifest>> = HashMap::new();
    for d in &deps {
        let mut versions = vec![d.version];
        if let Some(r) = active.get(&d.name) {
            versions.extend([r.row.from_version, r.row.to_version]);
        }
        for v in versions {
            if built.contains_key(&(d.name.clone(), v)) {
                continue;
            }
            match manifest(shared, &d.name, v) {
                Ok(Some(b)) => {
                    built.insert((d.name.clone(), v), b);
                }
                Ok(None) => {
                    warn!(service = %d.name, version = v, "deployment names a missing spec")
                }
                Err(e) => warn!(service = %d.name, version = v, "cannot build manifest: {e}"),
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
                for id in &targets {
                    let online = workers
                        .get(id)
                        .is_some_and(|w| w.status == Status::Online && !w.revoked);
                    if !online {
                        continue;
                    }
                    let desired = rollout::desired_version(d, active.get(&d.name), id);
                    if !built.contains_key(&(d.name.clone(), desired)) {
                        continue;
                    }
                    let actual = status.get(id).and_then(|m| m.get(&d.name));
                    let stop_wanted =
                        d.desired == "stopped" || overrides.contains(&(id.clone(), d.name.clone()));
                    match actual {
                        Some(a) if a.version == desired => {
                            if stop_wanted && is_active_state(&a.state) {
                                wants.push((
                                    id.clone(),
                                    d.name.clone(),
                                    Intent::Stop,
                                    RESEND_AFTER,
                                ));
                            } else if stop_wanted && a.state == ServiceState::Failed.as_str() {
                                // Its install was refused (a download that did
                                // not verify), or it failed before it was to
                                // stop: install it stopped again, which never
                                // starts it; at most every FAILED_RETRY_AFTER.
                                wants.push((
                                    id.clone(),
                                    d.name.clone(),
                                    Intent::Install(desired),
                                    FAILED_RETRY_AFTER,
                                ));
                            } else if !stop_wanted
                                && a.state == ServiceState::Failed.as_str()
                                && built
                                    .get(&(d.name.clone(), desired))
                                    .is_some_and(|b| b.retry_failed)
                            {
                                // Failed at the version it should run (restart
                                // limit, an artifact gone from the cache, no
                                // engine): asked again, the worker starts it
                                // afresh; at most every FAILED_RETRY_AFTER.
                                wants.push((
                                    id.clone(),
                                    d.name.clone(),
                                    Intent::Deploy(desired),
                                    FAILED_RETRY_AFTER,
                                ));
                            }
                        }
                        // Not the desired version (or nothing): a worker that
                        // is to keep it stopped must never start it, not even
                        // until a Stop arrives.
                        _ => wants.push((
                            id.clone(),
                            d.name.clone(),
                            if stop_wanted {
                                Intent::Install(desired)
                            } else {
                                Intent::Deploy(desired)
                            },
                            RESEND_AFTER,
                        )),
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
                        wants.push((wid.clone(), name.clone(), Intent::Remove, RESEND_AFTER));
                    }
                }
            }
        }
        let mut sent = lock(&shared.reconcile_sent);
        let now = Instant::now();
        for (wid, name, intent, every) in wants {
            let key = (wid.clone(), name.clone());
            if let Some((i, at)) = sent.get(&key) {
                if *i == intent && now.duration_since(*at) < every {
                    continue;
                }
            }
            let Some(w) = workers.get_mut(&wid) else {
                continue;
            };
            let n = protocol::frame::bounded(&name);
            let action = match intent {
                Intent::Deploy(v) | Intent::Install(v) => {
                    let Some(b) = built.get(&(name.clone(), v)) else {
                        continue;
                    };
                    let r = ManifestRef {
                        name: n,
                        version: v,
                        digest: b.digest,
                    };
                    if intent == Intent::Deploy(v) {
                        Action::DeployManifest(r)
                    } else {
                        Action::InstallManifest(r)
                    }
                }
                Intent::Remove => Action::Remove(n),
                Intent::Stop => Action::Stop(n),
            };
            let (cmd_id, frame) = seal_command(shared, w, action)?;
            match intent {
                Intent::Deploy(v) | Intent::Install(v) => {
                    if intent == Intent::Deploy(v) {
                        info!(worker_id = %wid, service = %name, version = v, cmd_id, "reconcile: deploy");
                    } else {
                        info!(worker_id = %wid, service = %name, version = v, cmd_id,
                            "reconcile: install stopped");
                    }
                    let mut cmds = lock(&shared.deploy_cmds);
                    cmds.retain(|_, c| now.duration_since(c.at) < DEPLOY_REPLY_WINDOW);
                    if cmds.len() < MAX_DEPLOY_CMDS {
                        cmds.insert(
                            (wid.clone(), cmd_id),
                            DeployCmd {
                                name: name.clone(),
                                version: v,
                                at: now,
                            },
                        );
                    }
                }
                Intent::Remove => {
                    info!(worker_id = %wid, service = %name, cmd_id, "reconcile: remove")
                }
                Intent::Stop => info!(worker_id = %wid, service = %name, cmd_id, "reconcile: stop"),
            }
            sent.insert(key, (intent, now));
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
        let n = crate::rotation::resend_pending(&shared, &client);
        if n > 0 {
            debug!(workers = n, "secret rotations re-sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_states() {
        assert!(valid_name("web-1") && !valid_name("Web") && !valid_name(""));
        assert!(!valid_name(&"a".repeat(33)));
        assert!(is_active_state("healthy") && !is_active_state("stopped"));
        assert_eq!(state_name(ServiceState::Unhealthy), "unhealthy");
    }
}
