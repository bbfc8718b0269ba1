//! `/api/v1/services*` and `/api/v1/workers/{id}/services*`: process
//! service specs, deployments and desired-vs-actual views (see
//! [`crate::services`] for placement and reconciliation).
//!
//! Limits: a deployment names at most [`MAX_DEPLOY_WORKERS`] workers; the
//! per-worker start/stop/restart routes wait up to 5 s for the reply and do
//! not change the deployment's desired state.

use std::collections::{BTreeMap, BTreeSet};

use protocol::Action;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Ctx, Req, Resp};
use crate::services::{valid_name, Deployment, ServiceError, SpecDoc};
use crate::state::{lock, now_ms};
use crate::store::{DeploymentRow, ServiceStatusRow};

/// Most workers a deployment may name explicitly.
pub const MAX_DEPLOY_WORKERS: usize = 1024;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(m) => ApiError::new(400, m),
            other => ApiError::internal(other),
        }
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

fn actual_json(a: &ServiceStatusRow) -> Value {
    json!({
        "version": a.version,
        "state": a.state,
        "pid": a.pid,
        "restarts": a.restarts,
        "exit_code": a.exit_code,
        "detail": a.detail,
        "updated_ms": a.updated_ms,
    })
}

/// Desired version and state are met by the reported status.
fn in_sync(d: &Deployment, a: Option<&ServiceStatusRow>) -> bool {
    a.is_some_and(|a| {
        a.version == d.version
            && match d.desired.as_str() {
                "stopped" => a.state == "stopped",
                _ => a.state == "running",
            }
    })
}

fn load_deployment(ctx: &Ctx, name: &str) -> Result<Option<Deployment>, ApiError> {
    Ok(lock(&ctx.shared.db)
        .deployment(name)?
        .map(|r| Deployment::from_row(&r)))
}

/// `POST /services`: stores a new spec version → 201 `{name, version}`.
pub(crate) fn create(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let doc: SpecDoc = req.json()?;
    doc.validate()?;
    let json = serde_json::to_string(&doc).map_err(ApiError::internal)?;
    let version = lock(&ctx.shared.db).insert_service(&doc.name, &json, now_ms())?;
    tracing::info!(service = %doc.name, version, "service spec stored");
    Ok(Resp::json(
        201,
        &json!({"name": doc.name, "version": version}),
    ))
}

/// `GET /services`: each service's latest version and deployment.
pub(crate) fn list(ctx: &Ctx) -> Result<Resp, ApiError> {
    let (latest, deps) = {
        let db = lock(&ctx.shared.db);
        (db.latest_services()?, db.deployments()?)
    };
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
            })
        })
        .collect();
    Ok(Resp::ok(json!({"services": out})))
}

/// `GET /services/{name}`: versions, deployment, desired vs actual per target.
pub(crate) fn get(ctx: &Ctx, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let versions = lock(&ctx.shared.db).service_versions(name)?;
    if versions.is_empty() {
        return Err(ApiError::not_found("service"));
    }
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "created_ms": v.created_ms,
                "spec": serde_json::from_str::<Value>(&v.spec_json).unwrap_or(Value::Null),
            })
        })
        .collect();
    let dep = load_deployment(ctx, name)?;
    let workers = lock(&ctx.shared.workers);
    let status = lock(&ctx.shared.service_status);
    let targets = dep
        .as_ref()
        .map(|d| d.targets(&workers))
        .unwrap_or_default();
    let mut rows = Vec::new();
    if let Some(d) = &dep {
        for id in &targets {
            let actual = status.get(id).and_then(|m| m.get(name));
            rows.push(json!({
                "worker_id": id,
                "hostname": workers.get(id).map(|w| w.hostname.as_str()),
                "worker_status": workers.get(id).map(|w| w.status.as_str()),
                "desired_version": d.version,
                "desired_state": d.desired,
                "actual": actual.map(actual_json),
                "in_sync": in_sync(d, actual),
            }));
        }
    }
    // Workers that report the service without being targeted (being removed).
    let untargeted: Vec<Value> = status
        .iter()
        .filter(|(id, m)| m.contains_key(name) && !targets.contains(*id))
        .filter_map(|(id, m)| {
            m.get(name)
                .map(|a| json!({"worker_id": id, "actual": actual_json(a)}))
        })
        .collect();
    Ok(Resp::ok(json!({
        "name": name,
        "versions": versions,
        "deployment": dep.as_ref().map(Deployment::to_json),
        "workers": rows,
        "untargeted": untargeted,
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
}

/// `PUT /services/{name}/deployment`: sets placement; returns the targets.
pub(crate) fn put_deployment(ctx: &Ctx, req: &Req, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let body: DeploymentReq = req.json()?;
    super::api::validate_labels(&body.labels)?;
    if body.workers.len() > MAX_DEPLOY_WORKERS {
        return Err(ApiError::new(
            400,
            format!("at most {MAX_DEPLOY_WORKERS} workers"),
        ));
    }
    let desired = body.desired_state.unwrap_or_else(|| "running".into());
    if desired != "running" && desired != "stopped" {
        return Err(ApiError::new(
            400,
            "desired_state must be running or stopped",
        ));
    }
    let versions = lock(&ctx.shared.db).service_versions(name)?;
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
        let workers = lock(&ctx.shared.workers);
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
    let named: Vec<String> = named.into_iter().collect();
    let row = DeploymentRow {
        name: name.to_string(),
        version,
        workers_json: serde_json::to_string(&named).map_err(ApiError::internal)?,
        labels_json: serde_json::to_string(&body.labels).map_err(ApiError::internal)?,
        desired,
        updated_ms: now_ms(),
    };
    lock(&ctx.shared.db).put_deployment(&row)?;
    let dep = Deployment::from_row(&row);
    let targets: Vec<String> = dep
        .targets(&lock(&ctx.shared.workers))
        .into_iter()
        .collect();
    tracing::info!(
        service = name,
        version,
        targets = targets.len(),
        "deployment set"
    );
    ctx.shared.reconcile.notify_one();
    Ok(Resp::ok(json!({
        "name": name,
        "deployment": dep.to_json(),
        "targets": targets,
    })))
}

/// `DELETE /services/{name}/deployment`: undeploy (Remove is sent by
/// reconciliation to every online worker that reports the service).
pub(crate) fn delete_deployment(ctx: &Ctx, name: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    if !lock(&ctx.shared.db).delete_deployment(name)? {
        return Err(ApiError::not_found("deployment"));
    }
    let reporting: Vec<String> = lock(&ctx.shared.service_status)
        .iter()
        .filter(|(_, m)| m.contains_key(name))
        .map(|(id, _)| id.clone())
        .collect();
    tracing::info!(service = name, "deployment removed");
    ctx.shared.reconcile.notify_one();
    Ok(Resp::ok(json!({"name": name, "removing_from": reporting})))
}

/// `POST /workers/{id}/services/{name}/start|stop|restart`.
pub(crate) fn worker_op(ctx: &Ctx, id: &str, name: &str, op: &str) -> Result<Resp, ApiError> {
    check_name(name)?;
    let n = protocol::frame::bounded(name);
    let action = match op {
        "start" => Action::Start(n),
        "stop" => Action::Stop(n),
        "restart" => Action::Restart(n),
        _ => return Err(ApiError::not_found("route")),
    };
    super::api::send_and_wait(ctx, id, action)
}

/// `GET /workers/{id}/services`: actual and desired services on one worker.
pub(crate) fn worker_services(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let deps: Vec<Deployment> = lock(&ctx.shared.db)
        .deployments()?
        .iter()
        .map(Deployment::from_row)
        .collect();
    let workers = lock(&ctx.shared.workers);
    if !workers.contains_key(id) {
        return Err(ApiError::not_found("worker"));
    }
    let status = lock(&ctx.shared.service_status);
    let actual = status.get(id);
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
            let d = desired.get(n.as_str());
            json!({
                "name": n,
                "desired": d.map(|d| json!({"version": d.version, "state": d.desired})),
                "actual": a.map(actual_json),
                "in_sync": d.is_some_and(|d| in_sync(d, a)),
            })
        })
        .collect();
    Ok(Resp::ok(json!({"worker_id": id, "services": out})))
}
