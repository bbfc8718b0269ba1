//! Route table and the JSON handlers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use protocol::{Action, Body, Command, Envelope, ReplyStatus};
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Method;
use tracing::{info, info_span};

use super::{enroll, prom, ApiError, Ctx, Req, Resp};
use crate::auth;
use crate::state::{lock, now_ms, sha256_hex, Status, WorkerEntry};
use crate::store::TokenRow;

/// How long a command waits for its reply.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn route(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let m = &req.method;
    match (m, segs.as_slice()) {
        (Method::Get, ["api", "v1", "health"]) => return health(ctx),
        (Method::Post, ["api", "v1", "enroll"]) => return enroll::enroll(ctx, req),
        (Method::Post, ["api", "v1", "login"]) => return login(ctx, req),
        (Method::Get, ["metrics"]) => return Ok(prom::render(ctx)),
        (_, ["api", "v1", ..]) => {}
        _ => return Err(ApiError::not_found("route")),
    }
    let token = authenticate(ctx, req)?;
    match (m, &segs[2..]) {
        (Method::Post, ["logout"]) => logout(ctx, req),
        (Method::Get, ["tokens"]) => list_tokens(ctx),
        (Method::Post, ["tokens"]) => create_token(ctx, req),
        (Method::Delete, ["tokens", id]) => delete_token(ctx, id, &token),
        (Method::Get, ["registration-token"]) => registration_info(ctx),
        (Method::Post, ["registration-token", "rotate"]) => rotate_registration(ctx),
        (Method::Get, ["mqtt"]) => mqtt_info(ctx, req),
        (Method::Get, ["workers"]) => list_workers(ctx),
        (Method::Get, ["workers", id]) => get_worker(ctx, id),
        (Method::Delete, ["workers", id]) => delete_worker(ctx, id),
        (Method::Put, ["workers", id, "labels"]) => set_labels(ctx, req, id),
        (Method::Post, ["workers", id, "revoke"]) => revoke(ctx, id),
        (Method::Get, ["workers", id, "metrics"]) => metrics_history(ctx, req, id),
        (Method::Post, ["workers", id, "commands"]) => command(ctx, req, id),
        _ => Err(ApiError::not_found("route")),
    }
}

fn authenticate(ctx: &Ctx, req: &Req) -> Result<TokenRow, ApiError> {
    let Some(token) = req.bearer.as_deref() else {
        return Err(ApiError::new(401, "missing bearer token"));
    };
    let db = lock(&ctx.shared.db);
    db.token_by_hash(&sha256_hex(token), now_ms())?
        .ok_or_else(|| ApiError::new(401, "invalid or expired token"))
}

fn health(ctx: &Ctx) -> Result<Resp, ApiError> {
    let workers = lock(&ctx.shared.workers);
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
        "frames_accepted": ctx.shared.counters.accepted.load(Ordering::Relaxed),
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
    let hash = lock(&ctx.shared.db).user_hash(&body.username)?;
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
    let db = lock(&ctx.shared.db);
    let _ = db.purge_expired_tokens(now_ms());
    let (token, row) = auth::create_token(&db, &format!("session {}", body.username), "session")?;
    Ok(Resp::ok(
        json!({"token": token, "expires_ms": row.expires_ms}),
    ))
}

fn logout(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    if let Some(t) = req.bearer.as_deref() {
        lock(&ctx.shared.db).delete_token_by_hash(&sha256_hex(t))?;
    }
    Ok(Resp::no_content())
}

fn list_tokens(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = lock(&ctx.shared.db).list_tokens("api")?;
    let tokens: Vec<Value> = rows
        .iter()
        .map(|r| json!({"id": r.id, "name": r.name, "created_ms": r.created_ms}))
        .collect();
    Ok(Resp::ok(json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
struct TokenReq {
    name: String,
}

fn create_token(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let body: TokenReq = req.json()?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 64 {
        return Err(ApiError::new(400, "name must be 1..=64 characters"));
    }
    let (token, row) = auth::create_token(&lock(&ctx.shared.db), name, "api")?;
    Ok(Resp::json(
        201,
        &json!({"id": row.id, "name": row.name, "created_ms": row.created_ms, "token": token}),
    ))
}

fn delete_token(ctx: &Ctx, id: &str, _caller: &TokenRow) -> Result<Resp, ApiError> {
    if lock(&ctx.shared.db).delete_token(id)? {
        Ok(Resp::no_content())
    } else {
        Err(ApiError::not_found("token"))
    }
}

fn registration_info(ctx: &Ctx) -> Result<Resp, ApiError> {
    let created = lock(&ctx.shared.db).setting(auth::REG_TOKEN_CREATED)?;
    Ok(Resp::ok(json!({
        "created_ms": created.and_then(|c| c.parse::<u64>().ok()),
        "stored_as": "sha256",
    })))
}

fn rotate_registration(ctx: &Ctx) -> Result<Resp, ApiError> {
    let token = auth::rotate_registration_token(&mut lock(&ctx.shared.db))?;
    info!("registration token rotated via API");
    Ok(Resp::ok(json!({"token": token, "created_ms": now_ms()})))
}

fn mqtt_info(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let s = &ctx.shared;
    let url = enroll::mqtt_url_for(s, req.host.as_deref());
    Ok(Resp::ok(json!({
        "url": url,
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
    let workers = lock(&ctx.shared.workers);
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
                "device_model": w.inventory.as_ref().map(|b| b.device_model.as_str()),
                "arch": w.inventory.as_ref().map(|b| b.arch.as_str()),
                "summary": summary(w),
            })
        })
        .collect();
    Ok(Resp::ok(json!({ "workers": out })))
}

fn get_worker(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let workers = lock(&ctx.shared.workers);
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
        "inventory": w.inventory,
        "metrics": w.latest.as_ref().map(|l| json!({"received_at_ms": l.received_at_ms, "seq": l.seq, "metrics": l.metrics})),
        "summary": summary(w),
        "events": events,
        "counters": {"accepted": w.accepted, "rejected": w.rejected, "replay_highest": w.replay.highest},
    })))
}

/// Validates a label map against the wire limits.
pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > protocol::MAX_LABELS {
        return Err(ApiError::new(
            400,
            format!("at most {} labels", protocol::MAX_LABELS),
        ));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 32 || v.len() > 64 {
            return Err(ApiError::new(
                400,
                "label keys 1..=32 bytes, values ≤ 64 bytes",
            ));
        }
    }
    Ok(())
}

fn set_labels(ctx: &Ctx, req: &Req, id: &str) -> Result<Resp, ApiError> {
    let labels: BTreeMap<String, String> = req.json()?;
    validate_labels(&labels)?;
    let json = serde_json::to_string(&labels).map_err(ApiError::internal)?;
    let mut workers = lock(&ctx.shared.workers);
    let w = workers
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found("worker"))?;
    lock(&ctx.shared.db).set_labels(id, &json)?;
    w.labels = labels;
    Ok(Resp::ok(json!({"id": id, "labels": w.labels})))
}

fn revoke(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let mut workers = lock(&ctx.shared.workers);
    let w = workers
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found("worker"))?;
    lock(&ctx.shared.db).revoke(id)?;
    w.revoked = true;
    w.status = Status::Offline;
    ctx.shared.creds.remove_worker(id);
    info!(worker_id = id, "worker revoked");
    Ok(Resp::ok(json!({"id": id, "revoked": true})))
}

fn delete_worker(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let mut workers = lock(&ctx.shared.workers);
    if !workers.contains_key(id) {
        return Err(ApiError::not_found("worker"));
    }
    lock(&ctx.shared.db).delete_worker(id)?;
    workers.remove(id);
    ctx.shared.creds.remove_worker(id);
    info!(worker_id = id, "worker deleted");
    Ok(Resp::no_content())
}

fn metrics_history(ctx: &Ctx, req: &Req, id: &str) -> Result<Resp, ApiError> {
    if !lock(&ctx.shared.workers).contains_key(id) {
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
    let resolution = req.query.get("resolution").map_or("raw", String::as_str);
    let db = lock(&ctx.shared.db);
    let points: Vec<Value> = match resolution {
        "raw" => db
            .raw_metrics(id, from, to)?
            .into_iter()
            .filter_map(|(at, seq, blob)| {
                let m: protocol::Metrics = postcard::from_bytes(&blob).ok()?;
                Some(json!({"received_at_ms": at, "seq": seq, "metrics": m}))
            })
            .collect(),
        "minute" => db
            .minute_metrics(id, from, to)?
            .into_iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect(),
        _ => return Err(ApiError::new(400, "resolution must be raw or minute")),
    };
    Ok(Resp::ok(json!({
        "worker_id": id, "from": from, "to": to, "resolution": resolution, "points": points,
    })))
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
    let span = info_span!("command", worker_id = id);
    let _g = span.enter();
    let (tx, rx) = mpsc::channel();
    let (cmd_id, frame) = {
        let mut workers = lock(&ctx.shared.workers);
        let w = workers
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found("worker"))?;
        if w.revoked {
            return Err(ApiError::new(409, "worker is revoked"));
        }
        let seq = w.cmd_seq + 1;
        // Persist before publishing so the stream stays monotonic across restarts.
        lock(&ctx.shared.db).set_cmd_seq(id, seq)?;
        w.cmd_seq = seq;
        let cmd_id = (seq & u64::from(u32::MAX)) as u32;
        let env = Envelope {
            version: protocol::FORMAT_VERSION,
            worker_id: protocol::bounded(id),
            seq,
            sent_at_ms: now_ms(),
            body: Body::Command(Command { id: cmd_id, action }),
        };
        let frame = protocol::seal(&w.secret, &env).map_err(ApiError::internal)?;
        lock(&ctx.shared.pending).insert((id.to_string(), cmd_id), tx);
        (cmd_id, frame)
    };
    let started = Instant::now();
    let topic = protocol::topic::topic(id, protocol::TopicKind::Cmd);
    if let Err(e) = ctx
        .client
        .try_publish(topic, QoS::AtLeastOnce, false, frame)
    {
        lock(&ctx.shared.pending).remove(&(id.to_string(), cmd_id));
        return Err(ApiError::new(503, format!("MQTT queue unavailable: {e}")));
    }
    let reply = rx.recv_timeout(COMMAND_TIMEOUT);
    lock(&ctx.shared.pending).remove(&(id.to_string(), cmd_id));
    match reply {
        Ok(r) => {
            let status = match r.status {
                ReplyStatus::Ok => "ok",
                ReplyStatus::Error => "error",
                ReplyStatus::Unsupported => "unsupported",
            };
            Ok(Resp::ok(json!({
                "id": cmd_id,
                "status": status,
                "detail": r.detail.as_str(),
                "round_trip_ms": started.elapsed().as_millis() as u64,
            })))
        }
        Err(_) => Err(ApiError::new(
            504,
            format!("no reply to command {cmd_id} within 5 s"),
        )),
    }
}
