//! Alert routes: rules (`/alert-rules`), webhook receivers
//! (`/alert-receivers`) and the alerts with their history (`/alerts`).
//! A receiver's secret is shown once, when it is created.

use serde::Deserialize;
use serde_json::{json, Value};

use super::message::{ApiError, Ctx, Req, Resp};
use crate::alerts::RuleSpec;
use crate::crypto::random_hex;
use crate::state::now_ms;
use crate::store::{AlertRow, NotificationRow, ReceiverRow};

/// Most alerts `GET /alerts` returns.
pub const MAX_ALERTS: u32 = 1000;

fn id_of(s: &str, what: &str) -> Result<i64, ApiError> {
    s.parse().map_err(|_| ApiError::not_found(what))
}

/// `GET /alert-rules`.
pub(crate) fn list_rules(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = ctx.shared.db().alert_rules()?;
    let rules: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let mut v: Value = serde_json::from_str(&r.spec_json).unwrap_or_else(|_| json!({}));
            if let Some(o) = v.as_object_mut() {
                o.insert("id".into(), r.id.into());
                o.insert("created_ms".into(), r.created_ms.into());
            }
            v
        })
        .collect();
    Ok(Resp::ok(json!({ "rules": rules })))
}

/// `POST /alert-rules` with a [`RuleSpec`]: 201 with its id, 409 when the
/// name is taken.
pub(crate) fn create_rule(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let spec: RuleSpec = req.json()?;
    spec.validate().map_err(|e| ApiError::new(400, e))?;
    let text = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    let id = ctx
        .shared
        .db()
        .insert_alert_rule(&spec.name, &text, now_ms())?
        .ok_or_else(|| ApiError::new(409, format!("an alert rule named {:?} exists", spec.name)))?;
    let mut v = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), id.into());
    }
    Ok(Resp::json(201, &v))
}

/// `DELETE /alert-rules/{id}`: its firing alerts resolve (`rule deleted`)
/// at the next evaluation.
pub(crate) fn delete_rule(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let id = id_of(id, "alert rule")?;
    if ctx.shared.db().delete_alert_rule(id)? {
        Ok(Resp::no_content())
    } else {
        Err(ApiError::not_found("alert rule"))
    }
}

fn receiver_json(r: &ReceiverRow) -> Value {
    json!({"id": r.id, "name": r.name, "url": r.url, "created_ms": r.created_ms})
}

/// `GET /alert-receivers` (without their secrets).
pub(crate) fn list_receivers(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = ctx.shared.db().receivers()?;
    let out: Vec<Value> = rows.iter().map(receiver_json).collect();
    Ok(Resp::ok(json!({ "receivers": out })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiverReq {
    name: String,
    url: String,
    /// The HMAC key; a random one when not given.
    secret: Option<String>,
}

/// `POST /alert-receivers {name, url, secret?}`: 201 with the secret (the
/// only time it is shown).
pub(crate) fn create_receiver(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let body: ReceiverReq = req.json()?;
    if body.name.is_empty() || body.name.len() > 64 {
        return Err(ApiError::new(400, "name: 1..=64 bytes"));
    }
    let url = body.url.trim();
    let parsed: Result<ureq::http::Uri, _> = url.parse();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok || parsed.map_or(true, |u| u.host().is_none()) || url.len() > 2048 {
        return Err(ApiError::new(
            400,
            "url: an http:// or https:// URL with a host",
        ));
    }
    let secret = match body.secret {
        Some(s) if s.len() >= 16 && s.len() <= 256 => s,
        Some(_) => return Err(ApiError::new(400, "secret: 16..=256 bytes")),
        None => random_hex::<32>().map_err(ApiError::internal)?,
    };
    let now = now_ms();
    let id = ctx
        .shared
        .db()
        .insert_receiver(&body.name, url, &secret, now)?
        .ok_or_else(|| ApiError::new(409, format!("a receiver named {:?} exists", body.name)))?;
    Ok(Resp::json(
        201,
        &json!({"id": id, "name": body.name, "url": url, "secret": secret, "created_ms": now}),
    ))
}

/// `DELETE /alert-receivers/{id}` (and what it had not taken yet).
pub(crate) fn delete_receiver(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let id = id_of(id, "receiver")?;
    if ctx.shared.db().delete_receiver(id)? {
        Ok(Resp::no_content())
    } else {
        Err(ApiError::not_found("receiver"))
    }
}

fn alert_json(a: &AlertRow, notes: &[NotificationRow], receivers: &[ReceiverRow]) -> Value {
    let notifications: Vec<Value> = notes
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "event": n.event,
                "receiver": receivers.iter().find(|r| r.id == n.receiver_id).map(|r| r.name.as_str()),
                "created_ms": n.created_ms,
                "delivered_ms": n.delivered_ms,
                "attempts": n.attempts,
                "next_attempt_ms": n.delivered_ms.is_none().then_some(n.next_attempt_ms),
                "last_error": (!n.last_error.is_empty()).then_some(&n.last_error),
            })
        })
        .collect();
    json!({
        "id": a.id,
        "rule_id": a.rule_id,
        "rule": a.rule_name,
        "kind": a.kind,
        "subject": a.subject,
        "state": a.state,
        "summary": a.summary,
        "value": a.value,
        "fired_ms": a.fired_ms,
        "resolved_ms": a.resolved_ms,
        "resolved_why": (!a.resolved_why.is_empty()).then_some(&a.resolved_why),
        "notifications": notifications,
    })
}

/// `GET /alerts[?state=firing|resolved][&limit=N]`: newest first, each
/// with its notifications.
pub(crate) fn list_alerts(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let state = match req.query.get("state").map(String::as_str) {
        None | Some("") => None,
        Some(s @ ("firing" | "resolved")) => Some(s),
        Some(s) => {
            return Err(ApiError::new(
                400,
                format!("state: firing or resolved, not {s:?}"),
            ))
        }
    };
    let limit = match req.query.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .map_err(|_| ApiError::new(400, "limit: a number"))?
            .clamp(1, MAX_ALERTS),
    };
    let db = ctx.shared.db();
    let receivers = db.receivers()?;
    let rows = db.alerts(state, limit)?;
    let mut out = Vec::with_capacity(rows.len());
    for a in &rows {
        out.push(alert_json(a, &db.notifications_of(a.id)?, &receivers));
    }
    Ok(Resp::ok(json!({ "alerts": out })))
}

/// `GET /alerts/{id}`.
pub(crate) fn get_alert(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let id = id_of(id, "alert")?;
    let db = ctx.shared.db();
    let a = db.alert(id)?.ok_or_else(|| ApiError::not_found("alert"))?;
    Ok(Resp::ok(alert_json(
        &a,
        &db.notifications_of(id)?,
        &db.receivers()?,
    )))
}
