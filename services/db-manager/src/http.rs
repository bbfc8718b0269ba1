//! The HTTP/JSON API (tiny_http; HTTP/1.1 keep-alive; `TCP_NODELAY`).
//!
//! Two kinds of bearer tokens: **admin API keys** (from the service's
//! secrets, see `service_runtime::clients`) for creating, listing and
//! dropping databases, rotating credentials, backups and restores; and
//! **database credentials** (made by create or rotate) for
//! `/v1/databases/{db}/query` and `/batch`. Either kind on the other's
//! routes is a 401. Request bodies are at most [`MAX_BODY`] bytes (413,
//! checked against `Content-Length` before reading and while reading a
//! chunked body). Unknown JSON fields are refused (400). Errors are
//! `{"error": "..."}`; a failed batch statement adds `"statement": i`.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use service_runtime::RequestHandler;

use crate::catalog::Kind;
use crate::engine::{Limits, Statement};
use crate::manager::{DbInfo, Manager, ManagerError};

/// Largest request body, bytes.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most statements in one batch.
pub const MAX_BATCH: usize = 1000;

/// A running server; stops and joins its threads on drop.
pub use service_runtime::listen::HttpServer;

/// The request handler answering with `mgr` (served by
/// [`crate::SPEC`]`.serve`, or by `service_runtime::boot`).
pub fn handler(mgr: Arc<Manager>) -> RequestHandler {
    Arc::new(move |req| handle(&mgr, req))
}

/// A refusal with its status and extra fields.
#[derive(Debug)]
struct Refusal(u16, String, Option<usize>);

impl From<ManagerError> for Refusal {
    fn from(e: ManagerError) -> Self {
        let code = e.status();
        if code >= 500 && code != 502 {
            // Details (paths, SQLite messages) go to the log; never data.
            eprintln!("db-manager: internal error: {e}");
            return Refusal(code, "internal error; see the db-manager log".into(), None);
        }
        Refusal(code, e.to_string(), None)
    }
}

fn bad(msg: impl Into<String>) -> Refusal {
    Refusal(400, msg.into(), None)
}

fn respond(req: tiny_http::Request, code: u16, body: &Value) {
    service_runtime::listen::respond_json(req, code, body, "db-manager");
}

fn handle(mgr: &Manager, mut req: tiny_http::Request) {
    let url = req.url().to_string();
    let path = url.split_once('?').map_or(url.as_str(), |(p, _)| p);
    let method = req.method().clone();
    let (code, body) = match answer(mgr, &mut req, &method, path) {
        Ok((code, body)) => (code, body),
        Err(Refusal(code, msg, statement)) => {
            if code >= 500 {
                mgr.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            let mut body = json!({ "error": msg });
            if let (Some(i), Some(o)) = (statement, body.as_object_mut()) {
                o.insert("statement".into(), i.into());
            }
            (code, body)
        }
    };
    respond(req, code, &body);
}

fn read_body(mgr: &Manager, req: &mut tiny_http::Request) -> Result<Vec<u8>, Refusal> {
    let too_big = || Refusal(413, format!("request body over {MAX_BODY} bytes"), None);
    if req.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| bad(format!("reading the body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_big());
    }
    mgr.stats
        .bytes_in
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    Ok(body)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, Refusal> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad(format!("expected {shape}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryIn {
    sql: Option<String>,
    #[serde(default)]
    params: Value,
    max_rows: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementIn {
    sql: Option<String>,
    #[serde(default)]
    params: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn {
    statements: Option<Vec<StatementIn>>,
    max_rows: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreIn {
    backup: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn db_json(d: &DbInfo) -> Value {
    json!({"name": d.name, "created": d.created, "bytes": d.bytes})
}

const QUERY_SHAPE: &str =
    r#"{"sql": "...", "params"?: [..] or {..}, "max_rows"?: n, "timeout_ms"?: n}"#;

type Answer = Result<(u16, Value), Refusal>;

fn answer(
    mgr: &Manager,
    req: &mut tiny_http::Request,
    method: &tiny_http::Method,
    path: &str,
) -> Answer {
    use tiny_http::Method::{Delete, Get, Post};
    if path == "/healthz" {
        return match method {
            Get => Ok((200, json!({"status": "ok", "databases": mgr.len()}))),
            _ => Err(Refusal(405, "method not allowed".into(), None)),
        };
    }
    let segments: Vec<&str> = match path.strip_prefix("/v1/") {
        Some(rest) => rest.trim_end_matches('/').split('/').collect(),
        None => return Err(Refusal(404, "no such route".into(), None)),
    };
    let token = service_runtime::listen::bearer_token(req);
    // Database credentials: query and batch.
    if let ["databases", db, op @ ("query" | "batch")] = segments.as_slice() {
        if *method != Post {
            return Err(Refusal(405, "method not allowed".into(), None));
        }
        let access = mgr.authenticate(db, token.as_deref())?;
        let body = read_body(mgr, req)?;
        if *op == "query" {
            let input: QueryIn = parse(&body, QUERY_SHAPE)?;
            let sql = input.sql.ok_or_else(|| bad("missing field \"sql\""))?;
            let limits = Limits::from_request(input.max_rows, input.timeout_ms)
                .map_err(|e| bad(e.to_string()))?;
            let st = Statement {
                sql,
                params: input.params,
            };
            let r = mgr.query(db, access, &st, limits)?;
            return Ok((200, r.to_json()));
        }
        let input: BatchIn = parse(
            &body,
            r#"{"statements": [{"sql", "params"?}...], "max_rows"?: n, "timeout_ms"?: n}"#,
        )?;
        let statements = input
            .statements
            .ok_or_else(|| bad("missing field \"statements\""))?;
        if statements.is_empty() || statements.len() > MAX_BATCH {
            return Err(bad(format!("a batch has 1..={MAX_BATCH} statements")));
        }
        let mut list = Vec::with_capacity(statements.len());
        for (i, s) in statements.into_iter().enumerate() {
            let sql = s.sql.ok_or_else(|| {
                Refusal(
                    400,
                    format!("statement {i}: missing field \"sql\""),
                    Some(i),
                )
            })?;
            list.push(Statement {
                sql,
                params: s.params,
            });
        }
        let limits = Limits::from_request(input.max_rows, input.timeout_ms)
            .map_err(|e| bad(e.to_string()))?;
        return match mgr.batch(db, access, &list, limits) {
            Ok(results) => Ok((
                200,
                json!({"results": results.iter().map(|r| r.to_json()).collect::<Vec<_>>()}),
            )),
            Err((i, e)) => {
                let mut r = Refusal::from(e);
                if let Some(i) = i {
                    r.1 = format!("statement {i} failed, nothing was committed: {}", r.1);
                    r.2 = Some(i);
                }
                Err(r)
            }
        };
    }
    // Everything else: admin API keys.
    let admin = mgr.admin(token.as_deref())?;
    let by = admin.as_str();
    let body = match method {
        Post => read_body(mgr, req)?,
        _ => Vec::new(),
    };
    match (method, segments.as_slice()) {
        (Get, ["databases"]) => {
            let list: Vec<Value> = mgr.list().iter().map(db_json).collect();
            Ok((200, json!({ "databases": list })))
        }
        (Post, ["databases"]) => {
            let input: CreateIn = parse(&body, r#"{"name": "..."}"#)?;
            let name = input.name.ok_or_else(|| bad("missing field \"name\""))?;
            let (info, rw, ro) = mgr.create(by, &name)?;
            let mut v = db_json(&info);
            if let Some(o) = v.as_object_mut() {
                o.insert("credentials".into(), json!({"rw": rw, "ro": ro}));
            }
            Ok((201, v))
        }
        (Get, ["databases", db]) => Ok((200, db_json(&mgr.get(db)?))),
        (Delete, ["databases", db]) => {
            mgr.drop_db(by, db)?;
            Ok((200, json!({"dropped": db})))
        }
        (Post, ["databases", db, "credentials", kind, "rotate"]) => {
            let _: Empty = parse(&body, "an empty body")?;
            let kind = Kind::parse(kind)
                .ok_or_else(|| Refusal(404, "credentials are rw or ro".into(), None))?;
            let token = mgr.rotate(by, db, kind)?;
            Ok((
                200,
                json!({"name": db, "access": kind.as_str(), "token": token}),
            ))
        }
        (Post, ["databases", db, "backups"]) => {
            let _: Empty = parse(&body, "an empty body")?;
            let b = mgr.backup(by, db)?;
            Ok((201, json!({"backup": b.key, "bytes": b.bytes})))
        }
        (Get, ["databases", db, "backups"]) => {
            let list: Vec<Value> = mgr
                .backups(db)?
                .iter()
                .map(|b| json!({"backup": b.key, "bytes": b.bytes, "stored": b.last_modified}))
                .collect();
            Ok((200, json!({ "backups": list })))
        }
        (Post, ["databases", db, "restore"]) => {
            let input: RestoreIn = parse(&body, r#"{"backup": "<db>/<id>.sqlite"}"#)?;
            let key = input
                .backup
                .ok_or_else(|| bad("missing field \"backup\""))?;
            let bytes = mgr.restore(by, db, &key)?;
            Ok((200, json!({"restored": db, "backup": key, "bytes": bytes})))
        }
        (_, ["databases"] | ["databases", _])
        | (_, ["databases", _, "backups" | "restore"])
        | (_, ["databases", _, "credentials", _, "rotate"]) => {
            Err(Refusal(405, "method not allowed".into(), None))
        }
        _ => Err(Refusal(404, "no such route".into(), None)),
    }
}
