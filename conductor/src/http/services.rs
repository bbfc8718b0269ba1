//! `/api/v1/services*` and `/api/v1/workers/{id}/services*`: service specs,
//! deployments, rollouts and desired-vs-actual views (see
//! [`crate::services`] for placement and reconciliation, [`crate::rollout`]
//! for rollouts, [`crate::spec`] for the spec format).
//!
//! Secrets never leave through these routes: specs are shown with
//! [`crate::spec::SpecDoc::public_json`] (secret names only).
//!
//! Limits: a deployment names at most [`MAX_DEPLOY_WORKERS`] workers; the
//! per-worker start/stop/restart routes wait up to 5 s for the reply. `stop`
//! is persisted per worker (reconciliation keeps the service stopped there)
//! until `start` or `restart`, or until the service is undeployed.

use std::collections::{BTreeMap, BTreeSet};

use protocol::Action;
use serde::Deserialize;
use serde_json::{json, Value};

use super::message::{ApiError, Ctx, Req, Resp};
use crate::deployment::Policy;
use crate::deployment::{Deployment, ServiceError};
use crate::rollout::{self, Rollout};
use crate::spec::SpecError;
use crate::spec::{valid_name, SpecDoc};
use crate::state::{now_ms, SvcMetrics};
use crate::store::{DeploymentRow, ServiceStatusRow};

/// Most workers a deployment may name explicitly.
pub const MAX_DEPLOY_WORKERS: usize = 1024;
/// Service events `GET /services/{name}` shows.
const EVENTS_SHOWN: usize = 20;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(m) => ApiError::new(400, m),
            ServiceError::Conflict(m) => ApiError::new(409, m),
            other => ApiError::internal(other),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ServiceError::from(e).into()
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            400,
            "service name must be 1..=32 characters of [a-z0-9-]",
        ))
    }
}

fn actual_json(a: &ServiceStatusRow, metrics: Option<&SvcMetrics>) -> Value {
    json!({
        "version": a.version,
        "state": a.state,
        "pid": a.pid,
        "restarts": a.restarts,
        "exit_code": a.exit_code,
        "detail": a.detail,
        "updated_ms": a.updated_ms,
        "metrics": metrics.map(|m| &m.values),
        "metrics_updated_ms": metrics.map(|m| m.received_at_ms),
    })
}

/// Desired version and state are met by the reported status.
fn in_sync(version: u32, desired_state: &str, a: Option<&ServiceStatusRow>) -> bool {
    a.is_some_and(|a| {
        a.version == version
            && match desired_state {
                "stopped" => a.state == "stopped",
                _ => a.state == "running" || a.state == "healthy",
            }
    })
}

fn load_deployment(ctx: &Ctx, name: &str) -> Result<Option<Deployment>, ApiError> {
    Ok(ctx
        .shared
        .db()
        .deployment(name)?
        .map(|r| Deployment::from_row(&r)))
}

/// `(worker, service)` pairs stopped by a per-worker override.
fn stopped_overrides(ctx: &Ctx) -> Result<BTreeSet<(String, String)>, ApiError> {
    Ok(ctx
        .shared
        .db()
        .overrides()?
        .into_iter()
        .filter(|(_, _, d)| d == "stopped")
        .map(|(w, n, _)| (w, n))
        .collect())
}

/// `POST /services`: stores a new spec version → 201 `{name, version}`.
pub(crate) fn create(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let doc: SpecDoc = req.json()?;
    doc.validate(&|arch, sha| crate::deployment::artifact_size(&ctx.shared, arch, sha))?;
    let json = serde_json::to_string(&doc).map_err(ApiError::internal)?;
    let version = {
        let mut db = ctx.shared.db();
        // Checked again under the lock a concurrent artifact DELETE takes.
        for sha in doc.artifact_shas() {
            if db.artifact(sha)?.is_empty() {
                return Err(ApiError::new(400, format!("artifact {sha} was deleted")));
            }
        }
        db.insert_service(&doc.name, &json, now_ms())?
    };
    tracing::info!(service = %doc.name, version, "service spec stored");
    Ok(Resp::json(
        201,
        &json!({"name": doc.name, "version": version}),
    ))
}

/// `GET /services`: each service's latest version, deployment and rollout
/// in progress.
pub(crate) fn list(ctx: &Ctx) -> Result<Resp, ApiError> {
    let (latest, deps) = {
        let db = ctx.shared.db();
        (db.latest_services()?, db.deployments()?)
    };
    let active = rollout::active(&ctx.shared)?;
    let deps: BTreeMap<String, Deployment> = deps
        .iter()
        .map(|r| (r.name.clone(), Deployment::from_row(r)))
        .collect();
    let out: Vec<Value> = latest
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "latest_version": s.version,
                "created_ms": s.created_ms,
                "deployment": deps.get(&s.name).map(Deployment::to_json),
                "rollout": active.get(&s.name).map(Rollout::to_json),
            })
        })
        .collect();
    Ok(Resp::ok(json!({"services": out})))
}

/// `GET /services/{name}`: versions, deployment, last rollout, desired vs
/// actual per target, recent service events.
pub(crate) fn get(ctx: &Ctx, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let (versions, last_rollout) = {
        let db = ctx.shared.db();
        (db.service_versions(name)?, db.rollouts(name, 1)?)
    };
    if versions.is_empty() {
        return Err(ApiError::not_found("service"));
    }
    let last_rollout = last_rollout.into_iter().next().map(Rollout::from_row);
    let active = last_rollout
        .as_ref()
        .filter(|r| r.row.state == rollout::IN_PROGRESS);
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "created_ms": v.created_ms,
                "spec": serde_json::from_str::<SpecDoc>(&v.spec_json)
                    .map_or(Value::Null, |d| d.public_json()),
            })
        })
        .collect();
    let dep = load_deployment(ctx, name)?;
    let overrides = stopped_overrides(ctx)?;
    let workers = ctx.shared.workers();
    // This service's reports and metrics by worker, copied out of one leaf
    // lock before the other is taken (the lock order at `Shared`); the
    // worker map, held throughout, keeps ingest from changing either.
    let status: BTreeMap<String, ServiceStatusRow> = ctx
        .shared
        .service_status()
        .iter()
        .filter_map(|(id, m)| Some((id.clone(), m.get(name)?.clone())))
        .collect();
    let metrics: BTreeMap<String, SvcMetrics> = ctx
        .shared
        .service_metrics()
        .iter()
        .filter_map(|(id, m)| Some((id.clone(), m.get(name)?.clone())))
        .collect();
    let metrics_of = |id: &str| metrics.get(id);
    let targets = dep
        .as_ref()
        .map(|d| d.targets(&workers))
        .unwrap_or_default();
    let mut rows = Vec::new();
    if let Some(d) = &dep {
        for id in &targets {
            let actual = status.get(id);
            let version = rollout::desired_version(d, active, id);
            let state = if overrides.contains(&(id.clone(), name.to_string())) {
                "stopped"
            } else {
                d.desired.as_str()
            };
            rows.push(json!({
                "worker_id": id,
                "hostname": workers.get(id).map(|w| w.hostname.as_str()),
                "worker_status": workers.get(id).map(|w| w.status.as_str()),
                "desired_version": version,
                "desired_state": state,
                "actual": actual.map(|a| actual_json(a, metrics_of(id))),
                "in_sync": in_sync(version, state, actual),
            }));
        }
    }
    // Workers that report the service without being targeted (being removed).
    let untargeted: Vec<Value> = status
        .iter()
        .filter(|(id, _)| !targets.contains(*id))
        .map(|(id, a)| json!({"worker_id": id, "actual": actual_json(a, metrics_of(id))}))
        .collect();
    // Worker events about this service (`<name>: …`), newest first.
    let prefix = format!("{name}:");
    let mut events: Vec<(u64, Value)> = workers
        .values()
        .flat_map(|w| {
            w.events
                .iter()
                .filter(|e| e.event.detail.starts_with(prefix.as_str()))
                .map(|e| {
                    (
                        e.received_at_ms,
                        json!({"worker_id": w.id, "received_at_ms": e.received_at_ms,
                               "kind": format!("{:?}", e.event.kind),
                               "detail": e.event.detail.as_str()}),
                    )
                })
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(e.0));
    events.truncate(EVENTS_SHOWN);
    Ok(Resp::ok(json!({
        "name": name,
        "versions": versions,
        "deployment": dep.as_ref().map(Deployment::to_json),
        "rollout": last_rollout.as_ref().map(Rollout::to_json),
        "workers": rows,
        "untargeted": untargeted,
        "events": events.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentReq {
    version: Option<u32>,
    #[serde(default)]
    workers: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// `running` (default) | `stopped`.
    desired_state: Option<String>,
    /// Default rollout policy (kept when absent).
    rollout: Option<Policy>,
}

/// `PUT /services/{name}/deployment`: sets placement and version; a higher
/// version of a deployed service starts a rollout. Returns the targets.
pub(crate) fn put_deployment(ctx: &Ctx, req: &Req, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let body: DeploymentReq = req.json()?;
    super::labels::validate_labels(&body.labels)?;
    if body.workers.len() > MAX_DEPLOY_WORKERS {
        return Err(ApiError::new(
            400,
            format!("at most {MAX_DEPLOY_WORKERS} workers"),
        ));
    }
    if let Some(p) = &body.rollout {
        p.validate()?;
    }
    let desired = body.desired_state.unwrap_or_else(|| "running".into());
    if desired != "running" && desired != "stopped" {
        return Err(ApiError::new(
            400,
            "desired_state must be running or stopped",
        ));
    }
    let versions = ctx.shared.db().service_versions(name)?;
    let Some(latest) = versions.last().map(|v| v.version) else {
        return Err(ApiError::not_found("service"));
    };
    let version = body.version.unwrap_or(latest);
    if !versions.iter().any(|v| v.version == version) {
        return Err(ApiError::new(
            400,
            format!("service {name} has no version {version}"),
        ));
    }
    let named: BTreeSet<String> = body.workers.into_iter().collect();
    {
        let workers = ctx.shared.workers();
        for id in &named {
            match workers.get(id) {
                None => return Err(ApiError::new(400, format!("unknown worker {id}"))),
                Some(w) if w.revoked => {
                    return Err(ApiError::new(400, format!("worker {id} is revoked")))
                }
                Some(_) => {}
            }
        }
    }
    let existing = load_deployment(ctx, name)?;
    let active = rollout::active(&ctx.shared)?.remove(name);
    if let Some(r) = &active {
        if version != r.row.to_version {
            return Err(ApiError::new(
                409,
                format!(
                    "a rollout of {name} to v{} is in progress; wait for it or POST /api/v1/services/{name}/rollout/abort",
                    r.row.to_version
                ),
            ));
        }
    }
    let policy = body
        .rollout
        .or_else(|| existing.as_ref().and_then(|d| d.rollout.clone()));
    // A higher version of a deployment that exists rolls out; the
    // deployment keeps its version until the rollout succeeds.
    let current = existing.as_ref().map(|d| d.version);
    let roll = active.is_none() && current.is_some_and(|c| version > c);
    let stored_version = match (&active, roll, current) {
        (Some(r), _, _) => r.row.from_version,
        (None, true, Some(c)) => c,
        _ => version,
    };
    let named: Vec<String> = named.into_iter().collect();
    let mut row = DeploymentRow {
        name: name.to_string(),
        version: stored_version,
        workers_json: serde_json::to_string(&named).map_err(ApiError::internal)?,
        labels_json: serde_json::to_string(&body.labels).map_err(ApiError::internal)?,
        desired,
        updated_ms: now_ms(),
        rollout_json: match &policy {
            Some(p) => Some(serde_json::to_string(p).map_err(ApiError::internal)?),
            None => None,
        },
    };
    ctx.shared.db().put_deployment(&row)?;
    let mut started = active;
    if roll {
        let dep = Deployment::from_row(&row);
        match rollout::start(&ctx.shared, &dep, version, policy.unwrap_or_default())? {
            Some(r) => started = Some(r),
            None => {
                // Nobody online to canary: apply at once.
                row.version = version;
                ctx.shared.db().put_deployment(&row)?;
            }
        }
    }
    let dep = Deployment::from_row(&row);
    let targets: Vec<String> = dep.targets(&ctx.shared.workers()).into_iter().collect();
    tracing::info!(
        service = name,
        version,
        targets = targets.len(),
        rollout = started.is_some(),
        "deployment set"
    );
    ctx.shared.reconcile.notify_one();
    Ok(Resp::ok(json!({
        "name": name,
        "deployment": dep.to_json(),
        "targets": targets,
        "rollout": started.as_ref().map(Rollout::to_json),
    })))
}

/// `POST /services/{name}/rollout {"version", "canary" | "canary_percent",
/// "settle_s", "timeout_s"}` → 202 with the rollout. Without policy fields
/// the deployment's default policy applies.
pub(crate) fn start_rollout(ctx: &Ctx, req: &Req, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let mut body: serde_json::Map<String, Value> = req.json()?;
    let version = body
        .remove("version")
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| ApiError::new(400, "version (a spec version number) is required"))?;
    let dep = load_deployment(ctx, name)?.ok_or_else(|| ApiError::not_found("deployment"))?;
    let policy: Policy = if body.is_empty() {
        dep.rollout.clone().unwrap_or_default()
    } else {
        serde_json::from_value(Value::Object(body))
            .map_err(|e| ApiError::new(400, format!("invalid rollout policy: {e}")))?
    };
    if ctx.shared.db().service(name, version)?.is_none() {
        return Err(ApiError::new(
            400,
            format!("service {name} has no version {version}"),
        ));
    }
    if version == dep.version {
        return Err(ApiError::new(
            400,
            format!("the deployment already runs version {version}"),
        ));
    }
    let r = rollout::start(&ctx.shared, &dep, version, policy)?.ok_or_else(|| {
        ApiError::new(
            409,
            "no target is online to canary; set the version with PUT …/deployment instead",
        )
    })?;
    ctx.shared.reconcile.notify_one();
    Ok(Resp::json(202, &r.to_json()))
}

/// `POST /services/{name}/rollout/abort`: reverts the rollout in progress.
pub(crate) fn abort_rollout(ctx: &Ctx, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let r = rollout::abort(&ctx.shared, name, "aborted by request")?
        .ok_or_else(|| ApiError::not_found("rollout in progress"))?;
    ctx.shared.reconcile.notify_one();
    Ok(Resp::ok(r.to_json()))
}

/// `GET /services/{name}/rollouts`: history, newest first.
pub(crate) fn rollouts(ctx: &Ctx, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let rows = ctx.shared.db().rollouts(name, rollout::HISTORY)?;
    let list: Vec<Value> = rows
        .into_iter()
        .map(|r| Rollout::from_row(r).to_json())
        .collect();
    Ok(Resp::ok(json!({"name": name, "rollouts": list})))
}

/// `DELETE /services/{name}/deployment`: undeploy (Remove is sent by
/// reconciliation to every online worker that reports the service); a
/// rollout in progress ends as reverted, per-worker stops are cleared.
pub(crate) fn delete_deployment(ctx: &Ctx, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    {
        let db = ctx.shared.db();
        if !db.delete_deployment(name)? {
            return Err(ApiError::not_found("deployment"));
        }
        db.delete_overrides_of(name)?;
    }
    rollout::abort(&ctx.shared, name, "deployment removed")?;
    let reporting: Vec<String> = ctx
        .shared
        .service_status()
        .iter()
        .filter(|(_, m)| m.contains_key(name))
        .map(|(id, _)| id.clone())
        .collect();
    tracing::info!(service = name, "deployment removed");
    ctx.shared.reconcile.notify_one();
    Ok(Resp::ok(json!({"name": name, "removing_from": reporting})))
}

/// `POST /workers/{id}/services/{name}/start|stop|restart`. `stop` is
/// persisted for this worker; `start` and `restart` clear it.
pub(crate) fn worker_op(ctx: &Ctx, id: &str, name: &str, op: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let n = protocol::frame::bounded(name);
    let (action, desired) = match op {
        "start" => (Action::Start(n), None),
        "stop" => (Action::Stop(n), Some("stopped")),
        "restart" => (Action::Restart(n), None),
        _ => return Err(ApiError::not_found("route")),
    };
    if !ctx.shared.has_worker(id) {
        return Err(ApiError::not_found("worker"));
    }
    ctx.shared.db().set_override(id, name, desired, now_ms())?;
    super::commands::send_and_wait(ctx, id, action)
}

/// `GET /workers/{id}/services`: actual and desired services on one worker.
pub(crate) fn worker_services(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let deps: Vec<Deployment> = ctx
        .shared
        .db()
        .deployments()?
        .iter()
        .map(Deployment::from_row)
        .collect();
    let active = rollout::active(&ctx.shared)?;
    let overrides = stopped_overrides(ctx)?;
    let workers = ctx.shared.workers();
    if !workers.contains_key(id) {
        return Err(ApiError::not_found("worker"));
    }
    // The worker's reports and metrics, copied out of one leaf lock before
    // the other is taken (as in `get`).
    let status = ctx.shared.service_status().get(id).cloned();
    let metrics = ctx.shared.service_metrics().get(id).cloned();
    let actual = status.as_ref();
    let mut names: BTreeSet<String> = actual
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let desired: BTreeMap<&str, &Deployment> = deps
        .iter()
        .filter(|d| d.targets(&workers).contains(id))
        .map(|d| (d.name.as_str(), d))
        .collect();
    names.extend(desired.keys().map(|k| k.to_string()));
    let out: Vec<Value> = names
        .iter()
        .map(|n| {
            let a = actual.and_then(|m| m.get(n));
            let d = desired.get(n.as_str()).map(|d| {
                let version = rollout::desired_version(d, active.get(n), id);
                let state = if overrides.contains(&(id.to_string(), n.clone())) {
                    "stopped"
                } else {
                    d.desired.as_str()
                };
                (version, state)
            });
            let m = metrics.as_ref().and_then(|m| m.get(n));
            json!({
                "name": n,
                "desired": d.map(|(v, s)| json!({"version": v, "state": s})),
                "actual": a.map(|a| actual_json(a, m)),
                "in_sync": d.is_some_and(|(v, s)| in_sync(v, s, a)),
            })
        })
        .collect();
    Ok(Resp::ok(json!({"worker_id": id, "services": out})))
}
