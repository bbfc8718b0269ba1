//! Route table and the JSON handlers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use protocol::Action;
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Method;
use tracing::info;

use super::auth::{authorize, presented, role_of, session_cookie, Role};
use super::commands::send_and_wait;
use super::labels::validate_labels;
use super::message::{ApiError, Ctx, Req, Resp};
use super::{enroll, prom, ui};
use crate::auth;
use crate::crypto::sha256_hex;
use crate::live::LiveError;
use crate::state::{now_ms, Status, WorkerEntry};
use crate::store::{MinuteRow, TokenRow, MAX_QUERY_ROWS};

/// Shortest admin password `POST /password` accepts.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest admin password `POST /password` accepts (argon2 input bound).
pub const MAX_PASSWORD_LEN: usize = 1024;

pub(crate) fn route(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let m = &req.method;
    match (m, segs.as_slice()) {
        (Method::Get, ["api", "v1", "health"]) => return health(ctx),
        (Method::Get, ["api", "v1", "openapi.json"]) => return Ok(openapi()),
        (Method::Post, ["api", "v1", "enroll"]) => return enroll::enroll(ctx, req),
        (Method::Post, ["api", "v1", "login"]) => return login(ctx, req),
        (Method::Post, ["api", "v1", "logout"]) => return logout(ctx, req),
        (Method::Get, ["api", "v1", "session"]) => return session(ctx, req),
        (Method::Get, ["metrics"]) => return metrics(ctx, req),
        (_, ["api", "v1", ..]) => {}
        (Method::Get, _) => {
            return ui::asset(&req.path, req.if_none_match.as_deref())
                .ok_or_else(|| ApiError::not_found("route"))
        }
        _ => return Err(ApiError::not_found("route")),
    }
    let token = authorize(ctx, req)?;
    match (m, &segs[2..]) {
        (Method::Post, ["password"]) => change_password(ctx, req, &token),
        (Method::Get, ["tokens"]) => list_tokens(ctx),
        (Method::Post, ["tokens"]) => create_token(ctx, req),
        (Method::Delete, ["tokens", id]) => delete_token(ctx, id, &token),
        (Method::Get, ["registration-token"]) => registration_info(ctx),
        (Method::Post, ["registration-token", "rotate"]) => rotate_registration(ctx),
        (Method::Get, ["mqtt"]) => mqtt_info(ctx, req),
        (Method::Get, ["workers"]) => list_workers(ctx),
        (Method::Get, ["workers", id]) => get_worker(ctx, req, id),
        (Method::Delete, ["workers", id]) => delete_worker(ctx, id),
        (Method::Put, ["workers", id, "labels"]) => set_labels(ctx, req, id),
        (Method::Post, ["workers", id, "revoke"]) => revoke(ctx, id),
        (Method::Post, ["workers", id, "rotate-secret"]) => rotate_secret(ctx, id),
        (Method::Get, ["workers", id, "metrics"]) => metrics_history(ctx, req, id),
        (Method::Post, ["workers", id, "live"]) => live(ctx, id),
        (Method::Post, ["workers", id, "commands"]) => command(ctx, req, id),
        (Method::Get, ["workers", id, "services"]) => super::services::worker_services(ctx, id),
        (Method::Post, ["workers", id, "services", name, op]) => {
            super::services::worker_op(ctx, id, name, op)
        }
        (Method::Get, ["artifacts"]) => super::artifacts::list(ctx),
        (Method::Delete, ["artifacts", sha]) => super::artifacts::delete(ctx, sha),
        (Method::Get, ["services"]) => super::services::list(ctx),
        (Method::Post, ["services"]) => super::services::create(ctx, req),
        (Method::Get, ["services", name]) => super::services::get(ctx, name),
        (Method::Put, ["services", name, "deployment"]) => {
            super::services::put_deployment(ctx, req, name)
        }
        (Method::Delete, ["services", name, "deployment"]) => {
            super::services::delete_deployment(ctx, name)
        }
        (Method::Post, ["services", name, "rollout"]) => {
            super::services::start_rollout(ctx, req, name)
        }
        (Method::Post, ["services", name, "rollout", "abort"]) => {
            super::services::abort_rollout(ctx, name)
        }
        (Method::Get, ["services", name, "rollouts"]) => super::services::rollouts(ctx, name),
        (Method::Get, ["exec-sessions"]) => super::exec::list(ctx, req),
        (Method::Get, ["agent-releases"]) => super::agent_updates::list_releases(ctx),
        (Method::Post, ["agent-releases"]) => super::agent_updates::create_release(ctx, req),
        (Method::Delete, ["agent-releases", version, arch]) => {
            super::agent_updates::delete_release(ctx, version, arch)
        }
        (Method::Get, ["agent-rollouts"]) => super::agent_updates::list_rollouts(ctx),
        (Method::Post, ["agent-rollouts"]) => super::agent_updates::start_rollout(ctx, req),
        (Method::Get, ["agent-rollouts", id]) => super::agent_updates::get_rollout(ctx, id),
        (Method::Post, ["agent-rollouts", id, "abort"]) => {
            super::agent_updates::abort_rollout(ctx, id)
        }
        (Method::Get, ["alerts"]) => super::alerts::list_alerts(ctx, req),
        (Method::Get, ["alerts", id]) => super::alerts::get_alert(ctx, id),
        (Method::Get, ["alert-rules"]) => super::alerts::list_rules(ctx),
        (Method::Post, ["alert-rules"]) => super::alerts::create_rule(ctx, req),
        (Method::Delete, ["alert-rules", id]) => super::alerts::delete_rule(ctx, id),
        (Method::Get, ["alert-receivers"]) => super::alerts::list_receivers(ctx),
        (Method::Post, ["alert-receivers"]) => super::alerts::create_receiver(ctx, req),
        (Method::Delete, ["alert-receivers", id]) => super::alerts::delete_receiver(ctx, id),
        _ => Err(ApiError::not_found("route")),
    }
}

/// This API described as an OpenAPI 3.1 document (public, like `health`);
/// `conductor/tests/openapi.rs` keeps it in step with the routes.
pub(crate) const OPENAPI: &str = include_str!("../../assets/openapi.json");

/// `GET /openapi.json`: [`OPENAPI`] as it is.
fn openapi() -> Resp {
    Resp {
        status: 200,
        body: OPENAPI.to_string(),
        content_type: "application/json",
        headers: Vec::new(),
    }
}

/// `GET /metrics`: open, or with `--metrics-token` only for that bearer
/// token (the text lists hostnames and addresses).
fn metrics(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    if let Some(expected) = &ctx.shared.config.metrics_token {
        let given = req.bearer.as_deref().unwrap_or("");
        if !crate::crypto::ct_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::new(
                401,
                "/metrics needs Authorization: Bearer <the --metrics-token>",
            ));
        }
    }
    Ok(prom::render(ctx))
}

/// `GET /session`: whether the request carries a valid session or token,
/// and its kind and role. Always 200, so the dashboard can probe without an
/// error in the console.
fn session(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let row = match presented(req) {
        Some((t, _)) => ctx.shared.db().token_by_hash(&sha256_hex(t), now_ms())?,
        None => None,
    };
    Ok(Resp::ok(json!({
        "authenticated": row.is_some(),
        "kind": row.as_ref().map(|r| r.kind.as_str()),
        "role": row.as_ref().map(|r| role_of(r).as_str()),
        "expires_ms": row.as_ref().and_then(|r| r.expires_ms),
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

fn health(ctx: &Ctx) -> Result<Resp, ApiError> {
    let workers = ctx.shared.workers();
    let count = |s: Status| {
        workers
            .values()
            .filter(|w| !w.revoked && w.status == s)
            .count()
    };
    Ok(Resp::ok(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": ctx.shared.started.elapsed().as_secs(),
        "workers_total": workers.len(),
        "workers_online": count(Status::Online),
        "workers_stale": count(Status::Stale),
        "workers_offline": count(Status::Offline),
        "mqtt_embedded": ctx.shared.embedded_broker,
        "tls": ctx.shared.tls.is_some(),
        "frames_accepted": ctx.shared.counters.accepted.load(Ordering::Relaxed),
        "store": ctx.shared.store_engine,
        "lease_epoch": ctx.shared.lease.as_ref().and_then(crate::store::lease::Fence::epoch),
    })))
}

#[derive(Deserialize)]
struct LoginReq {
    username: String,
    password: String,
}

fn login(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    if !ctx.shared.login_limiter.allow(req.ip) {
        return Err(ApiError::new(429, "too many attempts; slow down"));
    }
    let body: LoginReq = req.json()?;
    let hash = ctx.shared.db().user_hash(&body.username)?;
    // Verify against a dummy hash for unknown users so timing does not reveal them.
    let ok = match hash {
        Some(h) => auth::verify_password(&body.password, &h),
        None => {
            static DUMMY: OnceLock<String> = OnceLock::new();
            let dummy = DUMMY.get_or_init(|| auth::hash_password("dummy").unwrap_or_default());
            let _ = auth::verify_password(&body.password, dummy);
            false
        }
    };
    if !ok {
        info!(ip = %req.ip, "login failed");
        return Err(ApiError::new(401, "wrong username or password"));
    }
    let db = ctx.shared.db();
    let _ = db.purge_expired_tokens(now_ms());
    let (token, row) = auth::create_token(
        &db,
        &format!("session {}", body.username),
        "session",
        Role::Admin.as_str(),
    )?;
    let cookie = session_cookie(req, &token, auth::SESSION_MS / 1000);
    Ok(Resp::ok(json!({"token": token, "expires_ms": row.expires_ms})).with("Set-Cookie", cookie))
}

/// Ends the presented session (bearer or cookie) and clears the cookie.
/// Needs no valid token: clearing a stale cookie must always work.
fn logout(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    if let Some((t, _)) = presented(req) {
        ctx.shared.db().delete_token_by_hash(&sha256_hex(t))?;
    }
    Ok(Resp::no_content().with("Set-Cookie", session_cookie(req, "", 0)))
}

#[derive(Deserialize)]
struct PasswordReq {
    current: String,
    new: String,
}

/// `POST /password {current, new}`: changes the admin password and ends
/// every other session (API tokens stay valid).
fn change_password(ctx: &Ctx, req: &Req, caller: &TokenRow) -> Result<Resp, ApiError> {
    if !ctx.shared.login_limiter.allow(req.ip) {
        return Err(ApiError::new(429, "too many attempts; slow down"));
    }
    let body: PasswordReq = req.json()?;
    let n = body.new.chars().count();
    if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&n) {
        return Err(ApiError::new(
            400,
            format!("the new password must be {MIN_PASSWORD_LEN}..={MAX_PASSWORD_LEN} characters"),
        ));
    }
    let hash = ctx.shared.db().user_hash(auth::ADMIN_USER)?;
    if !hash.is_some_and(|h| auth::verify_password(&body.current, &h)) {
        info!(ip = %req.ip, "password change refused: wrong current password");
        return Err(ApiError::new(403, "the current password is wrong"));
    }
    let new_hash = auth::hash_password(&body.new)?;
    let db = ctx.shared.db();
    db.set_user(auth::ADMIN_USER, &new_hash, now_ms())?;
    let mut ended = 0;
    for t in db.list_tokens("session")? {
        if t.id != caller.id && db.delete_token(&t.id)? {
            ended += 1;
        }
    }
    info!(sessions_ended = ended, "admin password changed");
    Ok(Resp::ok(json!({"changed": true, "sessions_ended": ended})))
}

/// `GET /tokens`: the API tokens (never their secret), with their role.
fn list_tokens(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = ctx.shared.db().list_tokens("api")?;
    let tokens: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"id": r.id, "name": r.name, "role": role_of(r).as_str(),
                   "created_ms": r.created_ms})
        })
        .collect();
    Ok(Resp::ok(json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
struct TokenReq {
    name: String,
    /// `admin` (the default), `operator` or `viewer`.
    role: Option<String>,
}

/// `POST /tokens {"name", "role"}`: a new API token, shown once.
fn create_token(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let body: TokenReq = req.json()?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 64 {
        return Err(ApiError::new(400, "name must be 1..=64 characters"));
    }
    let role = match body.role.as_deref() {
        None => Role::Admin,
        Some(r) => Role::parse(r).ok_or_else(|| {
            let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            ApiError::new(400, format!("role must be one of {}", names.join(", ")))
        })?,
    };
    let (token, row) = auth::create_token(&ctx.shared.db(), name, "api", role.as_str())?;
    info!(id = %row.id, name = %row.name, role = role.as_str(), "API token created");
    Ok(Resp::json(
        201,
        &json!({"id": row.id, "name": row.name, "role": row.role,
                "created_ms": row.created_ms, "token": token}),
    ))
}

fn delete_token(ctx: &Ctx, id: &str, _caller: &TokenRow) -> Result<Resp, ApiError> {
    if ctx.shared.db().delete_token(id)? {
        Ok(Resp::no_content())
    } else {
        Err(ApiError::not_found("token"))
    }
}

fn registration_info(ctx: &Ctx) -> Result<Resp, ApiError> {
    let created = ctx.shared.db().setting(auth::REG_TOKEN_CREATED)?;
    Ok(Resp::ok(json!({
        "created_ms": created.and_then(|c| c.parse::<u64>().ok()),
        "stored_as": "sha256",
    })))
}

fn rotate_registration(ctx: &Ctx) -> Result<Resp, ApiError> {
    let secret = auth::rotate_registration_token(&mut ctx.shared.db())?;
    info!("registration token rotated via API");
    let fp = ctx.shared.tls.as_ref().map(crate::tls::Tls::ca_fingerprint);
    let token = protocol::RegistrationToken {
        secret,
        ca_fingerprint: fp,
    }
    .to_text();
    Ok(Resp::ok(json!({
        "token": token,
        "ca_fingerprint": fp.map(|f| f.to_string()),
        "created_ms": now_ms(),
    })))
}

fn mqtt_info(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let s = &ctx.shared;
    let url = enroll::mqtt_url_for(s, req.host.as_deref(), false);
    let tls_url = (s.mqtts_port.is_some() || s.external_tls)
        .then(|| enroll::mqtt_url_for(s, req.host.as_deref(), true));
    let tls = s.tls.as_ref().map(|t| t.current());
    Ok(Resp::ok(json!({
        "url": url,
        "tls_url": tls_url,
        "plain_from": if s.config.insecure_plain { "any address" } else { "loopback only" },
        "ca_fingerprint": tls.as_ref().map(|c| c.ca_fingerprint.to_string()),
        "ca_pem": s.tls.as_ref().map(crate::tls::Tls::ca_pem),
        "certificate_names": tls.as_ref().map(|c| c.names.clone()),
        "certificate_not_after": tls.as_ref().map(|c| c.not_after),
        "embedded": s.embedded_broker,
        "observer_username": s.observer_password.as_ref().map(|_| crate::broker::OBSERVER_USER),
        "observer_password": s.observer_password,
        "topics_root": protocol::topic::ROOT,
        "conductor_filter": protocol::topic::CONDUCTOR_FILTER,
        "json_mirror": format!("{}/+/json/#", protocol::topic::ROOT),
    })))
}

fn summary(w: &WorkerEntry) -> Value {
    match &w.latest {
        None => Value::Null,
        Some(l) => {
            let m = &l.metrics;
            json!({
                "received_at_ms": l.received_at_ms,
                "cpu_percent": f64::from(m.cpu_total) / 100.0,
                "memory_used": m.memory_used,
                "memory_total": m.memory_total,
                "disk_used": m.disks.iter().map(|d| d.used).fold(0u64, u64::saturating_add),
                "disk_total": m.disks.iter().map(|d| d.total).fold(0u64, u64::saturating_add),
                "temp_max_celsius": m.temperatures.iter().map(|t| t.millicelsius).max().map(|t| f64::from(t) / 1000.0),
                "load1": f64::from(m.load[0]) / 100.0,
                "uptime_s": m.uptime_s,
            })
        }
    }
}

fn list_workers(ctx: &Ctx) -> Result<Resp, ApiError> {
    let workers = ctx.shared.workers();
    let mut list: Vec<&WorkerEntry> = workers.values().collect();
    list.sort_by(|a, b| (a.enrolled_at_ms, &a.id).cmp(&(b.enrolled_at_ms, &b.id)));
    let out: Vec<Value> = list
        .iter()
        .map(|w| {
            json!({
                "id": w.id,
                "hostname": w.hostname,
                "labels": w.labels,
                "status": w.status.as_str(),
                "revoked": w.revoked,
                "last_seen_ms": w.last_seen_ms,
                "interval_ms": w.interval_ms,
                "batching": w.batching,
                "live_until_ms": w.live_until_ms,
                "device_model": w.inventory.as_ref().map(|b| b.device_model.as_str()),
                "arch": w.inventory.as_ref().map(|b| b.arch.as_str()),
                "agent_version": w.inventory.as_ref().map(|b| b.agent_version.as_str()),
                "board": w.board.as_ref().map(crate::mirror::board),
                "summary": summary(w),
            })
        })
        .collect();
    Ok(Resp::ok(json!({ "workers": out, "now_ms": now_ms() })))
}

/// `GET /workers/{id}[?live=1]`: the worker; with `live=1` (what the
/// dashboard's worker page polls) someone is looking at it, and a batching
/// worker is asked for live metrics ([`crate::live::look`]). Without it a
/// script polling its workers leaves their batches alone.
fn get_worker(ctx: &Ctx, req: &Req, id: &str) -> Result<Resp, ApiError> {
    let looking = req
        .query
        .get("live")
        .is_some_and(|v| v == "1" || v == "true");
    let look = if looking {
        crate::live::look(&ctx.shared, &ctx.client, id)
    } else {
        Err(LiveError::NotBatching)
    };
    match look {
        // Not batching, offline, … (or unknown: 404 below): nothing to do.
        Ok(_)
        | Err(
            LiveError::NotFound | LiveError::Revoked | LiveError::NotBatching | LiveError::Offline,
        ) => {}
        Err(e @ (LiveError::Seal(_) | LiveError::Queue(_))) => {
            tracing::debug!(worker_id = id, "no live metrics: {e}");
        }
    }
    let workers = ctx.shared.workers();
    let w = workers
        .get(id)
        .ok_or_else(|| ApiError::not_found("worker"))?;
    let events: Vec<Value> = w
        .events
        .iter()
        .map(|e| json!({"received_at_ms": e.received_at_ms, "kind": format!("{:?}", e.event.kind), "detail": e.event.detail.as_str()}))
        .collect();
    Ok(Resp::ok(json!({
        "id": w.id,
        "hostname": w.hostname,
        "machine_id": w.machine_id,
        "labels": w.labels,
        "status": w.status.as_str(),
        "revoked": w.revoked,
        "enrolled_at_ms": w.enrolled_at_ms,
        "last_seen_ms": w.last_seen_ms,
        "last_ip": w.last_ip,
        "interval_ms": w.interval_ms,
        "batching": w.batching,
        "live_until_ms": w.live_until_ms,
        "inventory": w.inventory,
        "board": w.board.as_ref().map(crate::mirror::board),
        "agent_version": w.inventory.as_ref().map(|b| b.agent_version.as_str()),
        "metrics": w.latest.as_ref().map(|l| json!({"received_at_ms": l.received_at_ms, "seq": l.seq, "metrics": l.metrics})),
        "summary": summary(w),
        "events": events,
        "counters": {"accepted": w.accepted, "rejected": w.rejected, "replay_highest": w.replay.highest},
        // The format of its last accepted frame, the one it is sent in.
        "wire_format": w.format,
        "secret_rotation": if w.pending_secret.is_some() { Some("pending") } else { None },
        "previous_secret_accepted_until_ms": w.previous_secret.as_ref().map(|(_, until)| *until),
        "now_ms": now_ms(),
    })))
}

/// `POST /workers/{id}/live`: asks a batching worker for live metrics
/// ([`crate::live::look`]): 202 `{worker_id, live_until_ms, sent}` (`sent`
/// false when the running live period has more than half left), 404 for an
/// unknown worker, 409 when it is revoked, offline or does not batch.
fn live(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    match crate::live::look(&ctx.shared, &ctx.client, id) {
        Ok(state) => Ok(Resp::json(
            202,
            &json!({"worker_id": id, "live_until_ms": state.live_until_ms, "sent": state.sent}),
        )),
        Err(LiveError::NotFound) => Err(ApiError::not_found("worker")),
        Err(e @ (LiveError::Revoked | LiveError::NotBatching | LiveError::Offline)) => {
            Err(ApiError::new(409, e.to_string()))
        }
        Err(e @ LiveError::Queue(_)) => Err(ApiError::new(503, e.to_string())),
        Err(e @ LiveError::Seal(_)) => Err(ApiError::internal(e)),
    }
}

/// Validates a label map against the wire limits.
fn set_labels(ctx: &Ctx, req: &Req, id: &str) -> Result<Resp, ApiError> {
    let labels: BTreeMap<String, String> = req.json()?;
    validate_labels(&labels)?;
    let json = serde_json::to_string(&labels).map_err(ApiError::internal)?;
    let mut workers = ctx.shared.workers();
    let w = workers
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found("worker"))?;
    ctx.shared.db().set_labels(id, &json)?;
    w.labels = labels;
    Ok(Resp::ok(json!({"id": id, "labels": w.labels})))
}

fn revoke(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let mut workers = ctx.shared.workers();
    let w = workers
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found("worker"))?;
    ctx.shared.db().revoke(id)?;
    w.revoked = true;
    w.status = Status::Offline;
    drop(workers);
    ctx.shared.creds.remove_worker(id);
    remove_broker_login(ctx, id)?;
    info!(worker_id = id, "worker revoked");
    Ok(Resp::ok(json!({"id": id, "revoked": true})))
}

/// `POST /workers/{id}/rotate-secret`: a new frame secret for the worker,
/// delivered sealed under its current one ([`crate::rotation`]). 200
/// `rotated` when the worker confirmed within the command timeout, 202
/// `pending` when it is offline (it gets it when it is next online).
fn rotate_secret(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    use crate::rotation::RotationError as E;
    let action = crate::rotation::begin(&ctx.shared, id).map_err(|e| match e {
        E::NotFound => ApiError::not_found("worker"),
        E::Revoked => ApiError::new(409, "worker is revoked"),
        e => ApiError::internal(e),
    })?;
    match send_and_wait(ctx, id, action) {
        Ok(resp) => {
            let v: Value = serde_json::from_str(&resp.body).unwrap_or_default();
            if v["status"] == "ok" {
                Ok(Resp::ok(
                    json!({"worker_id": id, "state": "rotated", "detail": v["detail"]}),
                ))
            } else {
                Err(ApiError::new(
                    502,
                    format!("the worker refused the new secret: {}", v["detail"]),
                ))
            }
        }
        Err(e) if e.status == 504 => Ok(Resp::json(
            202,
            &json!({"worker_id": id, "state": "pending",
                    "detail": "no answer yet: the worker gets the new secret when it is next online"}),
        )),
        Err(e) => Err(e),
    }
}

fn delete_worker(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let mut workers = ctx.shared.workers();
    if !workers.contains_key(id) {
        return Err(ApiError::not_found("worker"));
    }
    ctx.shared.db().delete_worker(id)?;
    workers.remove(id);
    ctx.shared.service_status().remove(id);
    ctx.shared.service_metrics().remove(id);
    drop(workers);
    ctx.shared.creds.remove_worker(id);
    remove_broker_login(ctx, id)?;
    info!(worker_id = id, "worker deleted");
    Ok(Resp::no_content())
}

/// On an external Mosquitto with dynamic security: deletes the worker's
/// login and role (Mosquitto closes its live session). The store already
/// says revoked/deleted, so a failure here is reported (503) but a retry of
/// the same request finishes the job. On every broker the worker's retained
/// `status` becomes `offline` (Mosquitto sends no last will for a session
/// it closes this way), so MQTT tools do not show it online for good.
/// With Home Assistant discovery on, its discovery configs are cleared
/// first ([`crate::homeassistant::remove`]).
fn remove_broker_login(ctx: &Ctx, id: &str) -> Result<(), ApiError> {
    crate::homeassistant::remove(&ctx.shared, &ctx.client, id);
    if let Some(d) = &ctx.shared.dynsec {
        d.remove_worker_blocking(id).map_err(|e| {
            tracing::warn!(worker_id = id, "Mosquitto dynamic security: {e}");
            ApiError::new(
                503,
                format!("the broker login was not removed yet: {e}; try again"),
            )
        })?;
    }
    if let Err(e) = ctx.client.try_publish(
        protocol::topic::topic(id, protocol::TopicKind::Status),
        QoS::AtLeastOnce,
        true,
        protocol::topic::STATUS_OFFLINE,
    ) {
        tracing::warn!(
            worker_id = id,
            "cannot publish its retained offline status: {e}"
        );
    }
    Ok(())
}

/// Most pages of [`MAX_QUERY_ROWS`] one history request reads.
const MAX_HISTORY_PAGES: usize = 4;

/// `GET /workers/{id}/metrics?from&to&resolution=raw|minute[&max_points=N]`.
/// `max_points` (2..=10000) thins the answer: raw samples by an even stride
/// (the newest is always kept), minute rows by merging neighbours.
fn metrics_history(ctx: &Ctx, req: &Req, id: &str) -> Result<Resp, ApiError> {
    if !ctx.shared.has_worker(id) {
        return Err(ApiError::not_found("worker"));
    }
    let now = now_ms();
    let num = |k: &str, default: u64| -> Result<u64, ApiError> {
        match req.query.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::new(400, format!("{k} must be ms since epoch"))),
        }
    };
    let from = num("from", now.saturating_sub(3_600_000))?;
    let to = num("to", now)?.min(i64::MAX as u64);
    let max_points = match req.query.get("max_points") {
        None => None,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (2..=MAX_QUERY_ROWS).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::new(
                    400,
                    format!("max_points must be 2..={MAX_QUERY_ROWS}"),
                ))
            }
        },
    };
    let resolution = req.query.get("resolution").map_or("raw", String::as_str);
    let db = ctx.shared.db();
    let points: Vec<Value> = match resolution {
        "raw" => {
            // Thin before decoding: only the kept samples are parsed.
            let mut rows = Vec::new();
            let mut start = from;
            for _ in 0..MAX_HISTORY_PAGES {
                let page = db.raw_metrics(id, start, to)?;
                let full = page.len() >= MAX_QUERY_ROWS;
                start = page.last().map_or(to, |r| r.0.saturating_add(1));
                rows.extend(page);
                if !full || max_points.is_none() {
                    break;
                }
            }
            if let Some(n) = max_points {
                rows = thin(rows, n);
            }
            rows.into_iter()
                .filter_map(|(at, seq, blob)| {
                    let m: protocol::Metrics = postcard::from_bytes(&blob).ok()?;
                    Some(json!({"received_at_ms": at, "seq": seq, "metrics": m}))
                })
                .collect()
        }
        "minute" => {
            let mut rows = Vec::new();
            let mut start = from;
            for _ in 0..MAX_HISTORY_PAGES {
                let page = db.minute_metrics(id, start, to)?;
                let full = page.len() >= MAX_QUERY_ROWS;
                start = page.last().map_or(to, |r| r.minute_ms.saturating_add(1));
                rows.extend(page);
                if !full {
                    break;
                }
            }
            if let Some(n) = max_points {
                rows = merge_minutes(&rows, n);
            }
            rows.into_iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect()
        }
        _ => return Err(ApiError::new(400, "resolution must be raw or minute")),
    };
    Ok(Resp::ok(json!({
        "worker_id": id, "from": from, "to": to, "resolution": resolution, "points": points,
    })))
}

/// Keeps at most `n` of `rows` at an even stride, always the newest.
fn thin<T>(rows: Vec<T>, n: usize) -> Vec<T> {
    let len = rows.len();
    if len <= n || n < 2 {
        return rows;
    }
    let stride = len.div_ceil(n);
    // Anchor the stride at the newest row so the latest sample is kept.
    let offset = (len - 1) % stride;
    rows.into_iter()
        .enumerate()
        .filter(|(i, _)| *i >= offset && (i - offset) % stride == 0)
        .map(|(_, r)| r)
        .collect()
}

/// Merges neighbouring minute rows into at most `n` buckets (sample-weighted
/// means, maxima of maxima, latest disk and totals).
fn merge_minutes(rows: &[MinuteRow], n: usize) -> Vec<MinuteRow> {
    if rows.len() <= n || n == 0 {
        return rows.to_vec();
    }
    let size = rows.len().div_ceil(n);
    rows.chunks(size)
        .filter_map(|chunk| {
            let first = chunk.first()?;
            let last = chunk.last()?;
            let total: u64 = chunk.iter().map(|r| r.n).sum::<u64>().max(1);
            let wf = |f: fn(&MinuteRow) -> f64| {
                chunk.iter().map(|r| f(r) * r.n as f64).sum::<f64>() / total as f64
            };
            // fits: a weighted mean of u64 values is at most their maximum.
            #[allow(clippy::cast_possible_truncation)]
            let wu = |f: fn(&MinuteRow) -> u64| {
                (chunk
                    .iter()
                    .map(|r| u128::from(f(r)) * u128::from(r.n))
                    .sum::<u128>()
                    / u128::from(total)) as u64
            };
            Some(MinuteRow {
                minute_ms: first.minute_ms,
                n: total,
                cpu_avg_percent: wf(|r| r.cpu_avg_percent),
                cpu_max_percent: chunk.iter().map(|r| r.cpu_max_percent).fold(0.0, f64::max),
                mem_used_avg: wu(|r| r.mem_used_avg),
                mem_total: last.mem_total,
                load1_avg: wf(|r| r.load1_avg),
                temp_max_celsius: chunk
                    .iter()
                    .filter_map(|r| r.temp_max_celsius)
                    .reduce(f64::max),
                disk_used: last.disk_used,
                disk_total: last.disk_total,
                rx_bps_avg: wu(|r| r.rx_bps_avg),
                tx_bps_avg: wu(|r| r.tx_bps_avg),
            })
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActionReq {
    Ping,
    Rebirth,
    SetIntervalMs(u32),
}

#[derive(Deserialize)]
struct CommandReq {
    action: ActionReq,
}

fn command(ctx: &Ctx, req: &Req, id: &str) -> Result<Resp, ApiError> {
    let body: CommandReq = req.json()?;
    let action = match body.action {
        ActionReq::Ping => Action::Ping,
        ActionReq::Rebirth => Action::Rebirth,
        ActionReq::SetIntervalMs(n) if (100..=86_400_000).contains(&n) => Action::SetInterval(n),
        ActionReq::SetIntervalMs(_) => {
            return Err(ApiError::new(400, "set_interval_ms must be 100..=86400000"))
        }
    };
    send_and_wait(ctx, id, action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_keeps_at_most_n_and_the_newest() {
        let rows: Vec<u32> = (0..1000).collect();
        let t = thin(rows.clone(), 60);
        assert!(t.len() <= 60 && t.len() >= 50, "{}", t.len());
        assert_eq!(t.last(), Some(&999));
        assert_eq!(thin(rows[..10].to_vec(), 60).len(), 10);
        assert_eq!(thin(rows[..3].to_vec(), 2), vec![0, 2]);
    }

    #[test]
    fn merge_minutes_weights_means_and_keeps_maxima() {
        let row = |m: u64, n: u64, cpu: f64, temp: Option<f64>| MinuteRow {
            minute_ms: m * 60_000,
            n,
            cpu_avg_percent: cpu,
            cpu_max_percent: cpu + 10.0,
            mem_used_avg: 100 * n,
            mem_total: 1000,
            load1_avg: 1.0,
            temp_max_celsius: temp,
            disk_used: m,
            disk_total: 50,
            rx_bps_avg: 10,
            tx_bps_avg: 20,
        };
        let rows = vec![
            row(0, 1, 10.0, Some(40.0)),
            row(1, 3, 50.0, None),
            row(2, 2, 20.0, Some(45.0)),
        ];
        let merged = merge_minutes(&rows, 2);
        assert_eq!(merged.len(), 2);
        let a = &merged[0];
        assert_eq!((a.minute_ms, a.n), (0, 4));
        assert!((a.cpu_avg_percent - 40.0).abs() < 1e-9, "{a:?}");
        assert_eq!(a.cpu_max_percent, 60.0);
        assert_eq!(a.mem_used_avg, 250);
        assert_eq!(a.temp_max_celsius, Some(40.0));
        assert_eq!(a.disk_used, 1);
        assert_eq!(merged[1], rows[2]);
        assert_eq!(merge_minutes(&rows, 5), rows);
    }
}
