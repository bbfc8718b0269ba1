//! `POST /api/v1/enroll`.
//!
//! * New enrolment: needs the registration token (its sha256 is re-read from
//!   the store on every request, so `conductor token rotate` run offline takes
//!   effect at once) or the in-memory local token. Always creates a new
//!   record — machines are never merged by hostname, IP or machine id.
//! * Re-enrolment: `worker_id` + `proof` (= `protocol::reenroll_proof(secret,
//!   worker_id)`) keeps the id and secret and issues a new MQTT password. The
//!   proof authenticates on its own (a rotated registration token does not
//!   strand enrolled workers). A bad proof is 401; a revoked worker is 403.
//!   `worker_id` without `proof` is ignored: that is a new enrolment.
//!
//! The answer carries the worker's id, secret and MQTT settings, and
//! `release_key` (64 hex digits) when the conductor has one
//! (`--release-key`): the agent pins it and installs only agent releases
//! signed with it.
//!
//! Rate-limited per client IP (429). A failed request writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::{Birth, Secret};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::labels::validate_labels;
use super::message::{ApiError, Ctx, Req, Resp};
use crate::auth::REG_TOKEN_HASH;
use crate::crypto::{ct_eq, random_bytes, random_hex, sha256_hex};
use crate::net::advertised;
use crate::state::{now_ms, Shared, Status, WorkerEntry};
use crate::store::WorkerRow;

#[derive(Deserialize)]
struct EnrollReq {
    #[serde(default)]
    token: String,
    hostname: String,
    #[serde(default)]
    machine_id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    inventory: Option<Birth>,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    proof: Option<String>,
}

/// The MQTT URL to hand a worker that reached us with `host_header`:
/// `mqtts://` on the TLS listener when `tls` (the worker came over HTTPS)
/// and the broker has one, else plain (loopback, or `--insecure-plain`).
pub(crate) fn mqtt_url_for(s: &Shared, host_header: Option<&str>, tls: bool) -> String {
    if let Some(u) = &s.config.mqtt_public_url {
        return u.clone();
    }
    if !s.embedded_broker {
        return s.external_mqtt.clone();
    }
    let host = host_header
        .and_then(|h| crate::config::split_host_port(h.trim()))
        .map(|(h, _)| h)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| {
            s.config
                .http_listen
                .parse()
                .map(|a| advertised(a).ip().to_string())
                .unwrap_or_else(|_| "127.0.0.1".into())
        });
    match s.mqtts_port {
        Some(port) if tls => format!("mqtts://{host}:{port}"),
        _ => format!("mqtt://{host}:{}", s.mqtt_port),
    }
}

/// Creates (or updates) the worker's own login and ACLs on an external
/// Mosquitto with dynamic security; nothing to do otherwise (the embedded
/// broker's table is set with the store). Fails with 503 so the worker
/// retries; nothing is stored before it succeeds.
fn broker_login(s: &Shared, id: &str, password: &str) -> Result<(), ApiError> {
    if let Some(d) = &s.dynsec {
        d.add_worker_blocking(id, password).map_err(|e| {
            tracing::warn!(worker_id = id, "Mosquitto dynamic security: {e}");
            ApiError::new(503, format!("the broker login could not be created: {e}"))
        })?;
    }
    Ok(())
}

/// The MQTT password worker `id` gets: on NATS in operator mode a login
/// of its own signed with the fleet account's key, else `shared` (a fresh
/// random one, or the configured shared login's).
fn worker_password(s: &Shared, id: &str, shared: &str) -> Result<String, ApiError> {
    match &s.nats_account {
        Some(a) => a
            .worker_jwt(id, Duration::from_millis(s.config.nats_login_ttl_ms()))
            .map_err(ApiError::internal),
        None => Ok(shared.to_string()),
    }
}

fn token_ok(ctx: &Ctx, token: &str) -> Result<bool, ApiError> {
    // A worker sends the secret part; a full token with the CA fingerprint
    // (pasted by hand into a script) is accepted too.
    let Ok(parsed) = protocol::RegistrationToken::parse(token) else {
        return Ok(false);
    };
    let token = parsed.secret.as_str();
    if ct_eq(token.as_bytes(), ctx.shared.local_token.as_bytes()) {
        return Ok(true);
    }
    let stored = ctx.shared.db().setting(REG_TOKEN_HASH)?;
    Ok(stored.is_some_and(|h| ct_eq(h.as_bytes(), sha256_hex(token).as_bytes())))
}

fn validate(body: &EnrollReq) -> Result<(), ApiError> {
    let h = body.hostname.trim();
    if h.is_empty() || h.len() > 64 {
        return Err(ApiError::new(400, "hostname must be 1..=64 bytes"));
    }
    if body.machine_id.len() > 128 {
        return Err(ApiError::new(400, "machine_id must be ≤ 128 bytes"));
    }
    validate_labels(&body.labels)
}

pub(crate) fn enroll(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let s = &ctx.shared;
    if !s.enroll_limiter.allow(req.ip) {
        return Err(ApiError::new(429, "too many enrolment attempts; slow down"));
    }
    let body: EnrollReq = req.json()?;
    validate(&body)?;
    let labels_json = serde_json::to_string(&body.labels).map_err(ApiError::internal)?;
    let inventory_json = match &body.inventory {
        Some(b) => Some(serde_json::to_string(b).map_err(ApiError::internal)?),
        None => None,
    };
    let (mqtt_username, shared_password) = if s.embedded_broker || s.dynsec.is_some() {
        (None, random_hex::<24>()?)
    } else if s.nats_account.is_some() {
        (None, String::new())
    } else {
        (
            s.config.worker_mqtt_username.clone(),
            s.config.worker_mqtt_password.clone().unwrap_or_default(),
        )
    };
    let now = now_ms();
    let ip = req.ip.to_string();

    let (worker_id, secret, mqtt_password) = match (&body.worker_id, &body.proof) {
        (Some(id), Some(proof)) => {
            // The proof is under the worker's current secret, or under the
            // rotated one it already switched to.
            let check = |workers: &std::collections::HashMap<String, WorkerEntry>| {
                let Some(w) = workers.get(id.as_str()) else {
                    return Err(ApiError::new(401, "unknown worker or bad proof"));
                };
                let given = proof.trim().to_ascii_lowercase();
                let proves = |s: &Secret| {
                    ct_eq(protocol::reenroll_proof(s, id).as_bytes(), given.as_bytes())
                };
                let with_pending = w.pending_secret.as_ref().is_some_and(proves);
                if !proves(&w.secret) && !with_pending {
                    return Err(ApiError::new(401, "unknown worker or bad proof"));
                }
                if w.revoked {
                    return Err(ApiError::new(403, "worker is revoked"));
                }
                Ok(with_pending)
            };
            check(&s.workers())?;
            let mqtt_password = worker_password(s, id, &shared_password)?;
            // Outside the lock: a round trip to an external broker.
            broker_login(s, id, &mqtt_password)?;
            let mut workers = s.workers();
            let switched = check(&workers)?;
            let Some(w) = workers.get_mut(id.as_str()) else {
                return Err(ApiError::new(401, "unknown worker or bad proof"));
            };
            if switched {
                if let Some(op) = w.promote_secret(now, s.config.secret_grace_ms()) {
                    let _ = s.writer.send(op);
                }
            }
            let row = WorkerRow {
                id: id.clone(),
                machine_id: body.machine_id.clone(),
                hostname: body.hostname.trim().to_string(),
                secret_hex: String::new(),
                mqtt_password_sha256: sha256_hex(&mqtt_password),
                labels_json: labels_json.clone(),
                inventory_json: inventory_json.clone(),
                board_json: None,
                enrolled_at_ms: w.enrolled_at_ms,
                last_seen_ms: None,
                last_ip: Some(ip.clone()),
                revoked: false,
                replay_highest: 0,
                replay_bitmap: 0,
                cmd_seq: 0,
                status: String::new(),
            };
            s.db().update_reenrol(&row)?;
            if s.embedded_broker {
                s.creds.set_worker(id, &row.mqtt_password_sha256);
            }
            w.hostname = row.hostname;
            w.machine_id = row.machine_id;
            w.labels = body.labels.clone();
            w.last_ip = Some(ip);
            if let Some(b) = body.inventory.clone() {
                w.inventory = Some(b);
            }
            info!(worker_id = %id, "worker re-enrolled");
            (id.clone(), w.secret.clone(), mqtt_password)
        }
        _ => {
            if !token_ok(ctx, &body.token)? {
                info!(ip = %req.ip, "enrolment refused: bad token");
                return Err(ApiError::new(401, "invalid registration token"));
            }
            let secret = Secret::from_bytes(random_bytes::<32>()?);
            let fresh = |workers: &std::collections::HashMap<String, WorkerEntry>| loop {
                let candidate = format!("w-{}", random_hex::<6>()?);
                if !workers.contains_key(&candidate)
                    && protocol::topic::is_valid_worker_id(&candidate)
                {
                    return Ok::<_, ApiError>(candidate);
                }
            };
            let id = fresh(&s.workers())?;
            let mqtt_password = worker_password(s, &id, &shared_password)?;
            // Outside the lock: a round trip to an external broker.
            broker_login(s, &id, &mqtt_password)?;
            let mut workers = s.workers();
            if workers.contains_key(&id) {
                // 48 random bits met twice between two locks: try again.
                return Err(ApiError::new(503, "enrolment collided; try again"));
            }
            let row = WorkerRow {
                id: id.clone(),
                machine_id: body.machine_id.clone(),
                hostname: body.hostname.trim().to_string(),
                secret_hex: secret.to_hex(),
                mqtt_password_sha256: sha256_hex(&mqtt_password),
                labels_json,
                inventory_json,
                board_json: None,
                enrolled_at_ms: now,
                last_seen_ms: None,
                last_ip: Some(ip),
                revoked: false,
                replay_highest: 0,
                replay_bitmap: 0,
                cmd_seq: 0,
                status: Status::Offline.as_str().into(),
            };
            s.db().insert_worker(&row)?;
            if s.embedded_broker {
                s.creds.set_worker(&id, &row.mqtt_password_sha256);
            }
            match WorkerEntry::from_row(&row, s.config.default_interval_ms) {
                Some(mut entry) => {
                    entry.inventory = body.inventory.clone();
                    workers.insert(id.clone(), entry);
                }
                None => return Err(ApiError::internal("fresh secret did not round-trip")),
            }
            info!(worker_id = %id, hostname = %row.hostname, "worker enrolled");
            (id, secret, mqtt_password)
        }
    };
    let mut answer = json!({
        "worker_id": worker_id,
        "secret": secret.to_hex(),
        "mqtt_url": mqtt_url_for(s, req.host.as_deref(), req.secure),
        "mqtt_ca_pem": s.mqtt_ca_pem,
        "mqtt_username": mqtt_username.unwrap_or_else(|| worker_id.clone()),
        "mqtt_password": mqtt_password,
        "interval_ms": s.config.default_interval_ms,
    });
    // On NATS a client id other workers cannot guess (an old agent ignores
    // it and uses its worker id).
    if let Some(a) = &s.nats_account {
        answer["mqtt_client_id"] = json!(a.client_id(&worker_id));
    }
    // The agent pins the release key (agent self-update); absent when none
    // is configured.
    if let Some(k) = &s.config.release_key {
        answer["release_key"] = json!(k);
    }
    Ok(Resp::ok(answer))
}
