//! The HTTP/JSON API (tiny_http; HTTP/1.1 keep-alive).
//!
//! Every route but `GET /healthz` needs `Authorization: Bearer <client
//! token>` (401 otherwise). Binary values (plaintexts, ciphertexts, aad) are
//! standard padded base64. Request bodies are at most [`MAX_BODY`] bytes
//! (413 beyond, checked against `Content-Length` before reading and while
//! reading a chunked body). Unknown JSON fields are refused (400), so a
//! typo is not silently ignored. Errors are `{"error": "..."}`.

use std::io::Read;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use service_runtime::RequestHandler;

use crate::kms::{KmError, Kms};
use crate::store::Key;

/// Largest request body, bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// A running server; stops and joins its threads on [`HttpServer::stop`]
/// or drop.
pub use service_runtime::listen::HttpServer;

/// The request handler answering with `kms` (served by
/// [`crate::SPEC`]`.serve`, or by `service_runtime::boot`).
pub fn handler(kms: Arc<Kms>) -> RequestHandler {
    Arc::new(move |req| handle(&kms, req))
}

/// A refusal with its status.
#[derive(Debug)]
struct Refusal(u16, String);

impl From<KmError> for Refusal {
    fn from(e: KmError) -> Self {
        let code = e.status();
        if code >= 500 {
            // Store and RNG failures: the details go to the log, which
            // never holds data (errors name paths and keys only).
            eprintln!("key-manager: internal error: {e}");
            return Refusal(code, "internal error; see the key-manager log".into());
        }
        Refusal(code, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> Refusal {
    Refusal(400, msg.into())
}

fn respond(req: tiny_http::Request, code: u16, body: &Value) {
    service_runtime::listen::respond_json(req, code, body, "key-manager");
}

/// Answers one request.
fn handle(kms: &Kms, mut req: tiny_http::Request) {
    let url = req.url().to_string();
    let path = url.split_once('?').map_or(url.as_str(), |(p, _)| p);
    let method = req.method().clone();
    let result = answer(kms, &mut req, &method, path);
    let (code, body) = match result {
        Ok((code, body)) => (code, body),
        Err(Refusal(code, msg)) => {
            if code >= 500 {
                kms.stats
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (code, json!({ "error": msg }))
        }
    };
    respond(req, code, &body);
}

fn read_body(req: &mut tiny_http::Request) -> Result<Vec<u8>, Refusal> {
    let too_big = || Refusal(413, format!("request body over {MAX_BODY} bytes"));
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

fn b64(field: &str, s: Option<&str>) -> Result<Vec<u8>, Refusal> {
    match s {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s.trim())
            .map_err(|_| bad(format!("{field} is not base64 (standard alphabet, padded)"))),
    }
}

fn required<'a>(field: &str, v: &'a Option<String>) -> Result<&'a str, Refusal> {
    v.as_deref()
        .ok_or_else(|| bad(format!("missing field {field:?}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    name: Option<String>,
    clients: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptIn {
    plaintext: Option<String>,
    aad: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecryptIn {
    ciphertext: Option<String>,
    aad: Option<String>,
    /// Re-encrypt only: the target key (default: the same key).
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatakeyIn {
    bytes: Option<usize>,
    aad: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// Key metadata (never material).
pub fn key_json(k: &Key) -> Value {
    json!({
        "name": k.name,
        "enabled": k.enabled,
        "created": k.created,
        "latest_version": k.versions.len(),
        "versions": k.versions.iter().map(|v| json!({"version": v.version, "created": v.created})).collect::<Vec<_>>(),
        "clients": k.clients,
    })
}

type Answer = Result<(u16, Value), Refusal>;

fn answer(
    kms: &Kms,
    req: &mut tiny_http::Request,
    method: &tiny_http::Method,
    path: &str,
) -> Answer {
    use tiny_http::Method::{Get, Post};
    if path == "/healthz" {
        return match method {
            Get => Ok((200, json!({"status": "ok", "keys": kms.store().len()}))),
            _ => Err(Refusal(405, "method not allowed".into())),
        };
    }
    let client = kms.authenticate(service_runtime::listen::bearer_token(req).as_deref())?;
    let body = match method {
        Post => read_body(req)?,
        _ => Vec::new(),
    };
    let segments: Vec<&str> = match path.strip_prefix("/v1/") {
        Some(rest) => rest.trim_end_matches('/').split('/').collect(),
        None => return Err(Refusal(404, "no such route".into())),
    };
    let c = client.as_str();
    match (method, segments.as_slice()) {
        (Get, ["keys"]) => {
            let keys: Vec<Value> = kms.list(c).iter().map(|k| key_json(k)).collect();
            Ok((200, json!({ "keys": keys })))
        }
        (Post, ["keys"]) => {
            let input: CreateIn = parse(&body, r#"{"name": "...", "clients"?: [...]}"#)?;
            let name = required("name", &input.name)?;
            let key = kms.create(c, name, input.clients)?;
            Ok((201, key_json(&key)))
        }
        (Get, ["keys", name]) => Ok((200, key_json(&*kms.key(c, name)?))),
        (Post, ["keys", name, action @ ("rotate" | "disable" | "enable")]) => {
            let _: Empty = parse(&body, "an empty body")?;
            let key = match *action {
                "rotate" => kms.rotate(c, name)?,
                "disable" => kms.set_enabled(c, name, false)?,
                _ => kms.set_enabled(c, name, true)?,
            };
            Ok((200, key_json(&key)))
        }
        (Post, ["keys", name, "encrypt"]) => {
            let input: EncryptIn = parse(&body, r#"{"plaintext": b64, "aad"?: b64}"#)?;
            let mut plaintext = b64("plaintext", Some(required("plaintext", &input.plaintext)?))?;
            let aad = b64("aad", input.aad.as_deref())?;
            let out = kms.encrypt(c, name, &plaintext, &aad);
            plaintext.fill(0);
            let out = out?;
            Ok((
                200,
                json!({"ciphertext": B64.encode(&out.ciphertext), "key": out.key, "version": out.version}),
            ))
        }
        (Post, ["keys", name, "datakey"]) => {
            let input: DatakeyIn = parse(&body, r#"{"bytes"?: 32, "aad"?: b64}"#)?;
            let aad = b64("aad", input.aad.as_deref())?;
            let (mut plain, wrapped) = kms.datakey(c, name, input.bytes.unwrap_or(32), &aad)?;
            let body = json!({
                "plaintext": B64.encode(&plain),
                "ciphertext": B64.encode(&wrapped.ciphertext),
                "key": wrapped.key,
                "version": wrapped.version,
            });
            plain.fill(0);
            Ok((200, body))
        }
        (Post, ["decrypt"]) => {
            let input: DecryptIn = parse(&body, r#"{"ciphertext": b64, "aad"?: b64}"#)?;
            if input.key.is_some() {
                return Err(bad(
                    "unknown field `key` (only re-encrypt takes a target key)",
                ));
            }
            let ct = b64(
                "ciphertext",
                Some(required("ciphertext", &input.ciphertext)?),
            )?;
            let aad = b64("aad", input.aad.as_deref())?;
            let mut d = kms.decrypt(c, &ct, &aad)?;
            let body =
                json!({"plaintext": B64.encode(&d.plaintext), "key": d.key, "version": d.version});
            d.plaintext.fill(0);
            Ok((200, body))
        }
        (Post, ["reencrypt"]) => {
            let input: DecryptIn = parse(
                &body,
                r#"{"ciphertext": b64, "aad"?: b64, "key"?: "target"}"#,
            )?;
            let ct = b64(
                "ciphertext",
                Some(required("ciphertext", &input.ciphertext)?),
            )?;
            let aad = b64("aad", input.aad.as_deref())?;
            let out = kms.reencrypt(c, &ct, &aad, input.key.as_deref())?;
            Ok((
                200,
                json!({"ciphertext": B64.encode(&out.ciphertext), "key": out.key, "version": out.version}),
            ))
        }
        (_, ["keys"] | ["keys", _] | ["decrypt"] | ["reencrypt"])
        | (_, ["keys", _, "rotate" | "disable" | "enable" | "encrypt" | "datakey"]) => {
            Err(Refusal(405, "method not allowed".into()))
        }
        _ => Err(Refusal(404, "no such route".into())),
    }
}
