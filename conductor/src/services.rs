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
//! ([`crate::rollout::evaluate`]) and the agent rollout
//! ([`crate::agent_rollout::evaluate`], which sends its own `UpdateAgent`
//! commands). Then, for each deployment and each
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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{Action, ManifestRef, ServiceState};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::commands::seal_command;
use crate::deployment::{is_active_state, manifest, state_name, Deployment, ServiceError};
use crate::rollout::{self, Rollout};
use crate::spec::BuiltManifest;
use crate::state::{now_ms, DeployCmd, FailMark, Intent, SentMark, Shared, Status};
use crate::store::notes::{NoteKind, NoteRow};
use crate::store::ServiceStatusRow;

/// Reconciliation period.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Shortest gap between two identical reconciliation commands to one worker.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// A service reported `failed` at its desired version is deployed again
/// (the worker starts it afresh) at most this often.
pub const FAILED_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long a `DeployManifest` or `InstallManifest` waits for its reply to
/// be matched.
const DEPLOY_REPLY_WINDOW: Duration = Duration::from_secs(120);
/// Most `DeployManifest` and `InstallManifest` commands remembered for
/// their replies.
const MAX_DEPLOY_CMDS: usize = 4096;

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
    let Some(dep) = shared.db().deployment(name)? else {
        return Ok(false);
    };
    let dep = Deployment::from_row(&dep);
    if !dep.targets(&shared.workers()).contains(worker) {
        return Ok(false);
    }
    if version == dep.version {
        return Ok(true);
    }
    Ok(rollout::active(shared)?
        .get(name)
        .is_some_and(|r| version == r.row.from_version || version == r.row.to_version))
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
    let mut all = shared.service_status();
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
    let at_ms = now_ms();
    // Kept across a restart or takeover (`store::notes`).
    let _ = shared.writer.send(crate::store::WriteOp::Note(NoteRow {
        worker_id: worker_id.to_string(),
        kind: NoteKind::ServiceFailure,
        subject: name.to_string(),
        version: version.map(|v| v.to_string()),
        ok: false,
        what: what.clone(),
        at_ms,
    }));
    shared.service_failures().insert(
        (worker_id.to_string(), name.to_string()),
        FailMark {
            version,
            what,
            at_ms,
        },
    );
}

/// A reply arrived that no HTTP request waits for: if it answers a
/// `DeployManifest` or an `InstallManifest` with an error, record a failure
/// of that version.
pub fn deploy_reply(shared: &Shared, worker_id: &str, reply: &protocol::Reply) {
    let Some(cmd) = shared
        .deploy_cmds()
        .remove(&(worker_id.to_string(), reply.cmd_id))
    else {
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
    if let Err(e) = crate::agent_rollout::evaluate(shared, client) {
        warn!("agent rollout evaluation failed: {e}");
    }
    let (deps, overrides) = {
        let db = shared.db();
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
        let mut workers = shared.workers();
        let mut wants: Vec<Want> = Vec::new();
        {
            let status = shared.service_status();
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
        let now = Instant::now();
        // The resend throttle is read and released before sealing, which
        // takes the store (the lock order at `Shared`); what is sent is
        // recorded below, still under the worker map.
        {
            let sent = shared.reconcile_sent();
            wants.retain(|(wid, name, intent, every)| {
                !sent
                    .get(&(wid.clone(), name.clone()))
                    .is_some_and(|(i, at)| i == intent && now.duration_since(*at) < *every)
            });
        }
        let mut sent: Vec<((String, String), SentMark)> = Vec::new();
        let mut awaited: Vec<((String, u32), DeployCmd)> = Vec::new();
        let mut failed = None;
        for (wid, name, intent, _) in wants {
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
            let (cmd_id, frame) = match seal_command(shared, w, action) {
                Ok(sealed) => sealed,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            match intent {
                Intent::Deploy(v) | Intent::Install(v) => {
                    if intent == Intent::Deploy(v) {
                        info!(worker_id = %wid, service = %name, version = v, cmd_id, "reconcile: deploy");
                    } else {
                        info!(worker_id = %wid, service = %name, version = v, cmd_id,
                            "reconcile: install stopped");
                    }
                    awaited.push((
                        (wid.clone(), cmd_id),
                        DeployCmd {
                            name: name.clone(),
                            version: v,
                            at: now,
                        },
                    ));
                }
                Intent::Remove => {
                    info!(worker_id = %wid, service = %name, cmd_id, "reconcile: remove")
                }
                Intent::Stop => info!(worker_id = %wid, service = %name, cmd_id, "reconcile: stop"),
            }
            sent.push(((wid.clone(), name), (intent, now)));
            frames.push((wid, frame));
        }
        // Recorded before the worker map is released (no reply can come
        // before the publishes below), one leaf at a time, also when a seal
        // failed part-way.
        if !awaited.is_empty() {
            let mut cmds = shared.deploy_cmds();
            cmds.retain(|_, c| now.duration_since(c.at) < DEPLOY_REPLY_WINDOW);
            for (key, cmd) in awaited {
                if cmds.len() < MAX_DEPLOY_CMDS {
                    cmds.insert(key, cmd);
                }
            }
        }
        shared.reconcile_sent().extend(sent);
        if let Some(e) = failed {
            return Err(e);
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
    if shared.service_status().remove(worker_id).is_some() {
        let _ = shared.writer.send(crate::store::WriteOp::ServicesCleared {
            worker_id: worker_id.to_string(),
        });
    }
    forget_sent(shared, worker_id);
}

/// Forgets the resend throttle for a worker (it reconnected: send at once).
pub fn forget_sent(shared: &Shared, worker_id: &str) {
    shared.reconcile_sent().retain(|(w, _), _| w != worker_id);
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
