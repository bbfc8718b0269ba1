//! The S3 HTTP API (tiny_http, HTTP/1.1 keep-alive, path-style addressing).
//!
//! Every request but `GET /healthz` (unsigned, no query) must be signed
//! with SigV4 ([`crate::sigv4`]): header auth or a presigned URL. Then the
//! signing key's bucket grants ([`crate::grants`]) are checked in one place,
//! `route` (see `needed`), before any handler runs or the bucket's
//! existence is looked at: `read` or `read-write` on the addressed bucket,
//! and `read` on a copy source; ListBuckets lists only readable buckets.
//! A refusal is `403 AccessDenied` naming the bucket and the permission. Bodies
//! are streamed: a PUT goes from the socket through the payload checks
//! ([`crate::chunked`]) and the encryption into a temp file, a GET from the
//! file through decryption to the socket, in 64 KiB pieces; no object is
//! ever held whole in memory. Answers are S3 XML; errors are
//! `<Error><Code>…</Code><Message>…</Message>…</Error>` with S3 codes.
//!
//! Routes: `GET /` (ListBuckets); `PUT|HEAD|DELETE /b`; `GET /b`
//! (ListObjects v1, or v2 with `list-type=2`; `?location`); `POST /b?delete`
//! (DeleteObjects); `PUT|GET|HEAD|DELETE /b/key` (with `Range` on GET);
//! multipart: `POST /b/key?uploads`, `PUT /b/key?partNumber=N&uploadId=U`
//! (UploadPartCopy with `x-amz-copy-source`), `POST /b/key?uploadId=U`,
//! `DELETE /b/key?uploadId=U`, `GET /b/key?uploadId=U` (ListParts),
//! `GET /b?uploads` (ListMultipartUploads). CopyObject is `PUT /b/key`
//! with `x-amz-copy-source`. Virtual-host
//! addressing (`Host: <bucket>.<domain>`) works when a domain is configured
//! ([`S3Service::with_virtual_host_domain`]). Other sub-resources (`?acl`,
//! `?versioning`, ...) answer `NotImplemented` (501).
//!
//! Damaged data: every chunk is authenticated before any of its bytes is
//! sent. Encrypted answers up to [`VERIFIED_GET`] are decrypted before the
//! status line, so a damaged object is a clean `500 InternalError`. Larger
//! answers stream: a damaged chunk stops the body before its bytes, and
//! since tiny_http cannot close the connection from the handler, the client
//! sees a short body only when its read timeout fires.
//!
//! Limits: XML request bodies at most [`MAX_XML_BODY`]; object and part
//! sizes from [`crate::store::Limits`]; listings at most 1000 keys,
//! uploads or parts a page.
//! A refused request's unread body is read and discarded (tiny_http would
//! otherwise allocate its whole declared length), so refusing a huge
//! upload still costs its transfer. No TLS: use loopback or a tunnel.
//!
//! Here: the service, its access keys and counters, and dispatch
//! ([`handler`]); under `http/`: `request` (decoding a request: query,
//! headers, bodies with their payload checks), `buckets`, `objects` and
//! `multipart` (the handlers), `error` (every failure's S3 code, HTTP
//! status and `<Error>` XML).

mod buckets;
mod error;
mod multipart;
mod objects;
mod request;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use s3::timefmt;
use service_runtime::RequestHandler;

use crate::grants::{Access, Grants, Perm};
use crate::sigv4;
use crate::store::Store;
use error::{s3err, S3Err};
use request::Ctx;

/// Largest XML request body (CreateBucket, CompleteMultipartUpload, Delete).
pub const MAX_XML_BODY: usize = 1024 * 1024;
/// Encrypted GET answers up to this size are decrypted whole before the
/// status line is sent (see the module docs).
pub const VERIFIED_GET: u64 = 1024 * 1024;
/// Most keys a listing page or a DeleteObjects request holds.
pub const MAX_KEYS: usize = 1000;
const NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// Access keys (`AKID → secret` and what the key may touch). `Debug` shows
/// ids only.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct AccessKeys(BTreeMap<String, KeyEntry>);

#[derive(Clone, PartialEq, Eq)]
struct KeyEntry {
    secret: String,
    access: Access,
}

impl std::fmt::Debug for AccessKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AccessKeys")
            .field(&self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_akid(s: &str) -> bool {
    (3..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_secret(s: &str) -> bool {
    (8..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

/// The keys of the JSON form of `access_keys`: `{"AKID": "secret", "AKID":
/// {"secret": "...", "buckets": {"<bucket or prefix*>": "read" |
/// "read-write", ...}}}`, as (id, secret, access); an error naming the key
/// (never a secret) when its shape is wrong.
fn json_keys(text: &str) -> Result<Vec<(String, String, Access)>, String> {
    use serde_json::Value;
    let doc: Value = serde_json::from_str(text).map_err(|e| {
        format!("access_keys is not valid JSON ({e}); expected {{\"AKID\": {{\"secret\": \"...\", \"buckets\": {{...}}}}, ...}}")
    })?;
    let Value::Object(map) = doc else {
        return Err(
            "access_keys is JSON but not an object {\"AKID\": {\"secret\": \"...\", \"buckets\": {...}}, ...}"
                .into(),
        );
    };
    let mut out = Vec::with_capacity(map.len());
    for (id, entry) in map {
        let who = format!("access_keys: access key {id}");
        match entry {
            Value::String(secret) => out.push((id, secret, Access::Full)),
            Value::Object(fields) => {
                if let Some(other) = fields.keys().find(|k| *k != "secret" && *k != "buckets") {
                    return Err(format!(
                        "{who}: unknown field {other:?} (an entry has \"secret\" and optionally \"buckets\")"
                    ));
                }
                let secret = match fields.get("secret") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(format!("{who}: \"secret\" (a string) is missing")),
                };
                let access = match fields.get("buckets") {
                    None => Access::Full,
                    Some(b) => Access::Buckets(Grants::from_json(&who, b)?),
                };
                out.push((id, secret, access));
            }
            _ => {
                return Err(format!(
                    "{who}: must be its secret (a string) or {{\"secret\": \"...\", \"buckets\": {{...}}}}"
                ))
            }
        }
    }
    Ok(out)
}

impl AccessKeys {
    /// From the service's secrets: `access_keys` = `AKID:secret,...` (full
    /// access) or its JSON form (see [`crate::grants`] and the README: per
    /// key a secret and optionally the buckets it may touch), and
    /// `access_key.<AKID>` = secret (full access). Returns warnings naming
    /// ids, never secrets, for skipped keys (bad id or secret), and an error
    /// when grants are malformed or a key with grants is also given as
    /// `access_key.<AKID>`: then no key set is built, so a typo never
    /// widens what a key may do.
    pub fn from_secrets(
        secrets: &BTreeMap<String, String>,
    ) -> Result<(AccessKeys, Vec<String>), String> {
        let mut out = BTreeMap::new();
        let mut warnings = Vec::new();
        let mut add = |id: &str, secret: &str, access: Access, warnings: &mut Vec<String>| {
            let (id, secret) = (id.trim(), secret.trim());
            if !valid_akid(id) {
                warnings.push(format!(
                    "access key {id:?} skipped: ids are [A-Za-z0-9_-]{{3,128}}"
                ));
            } else if !valid_secret(secret) {
                warnings.push(format!(
                    "access key {id} skipped: secrets are 8..=256 printable characters without ','"
                ));
            } else {
                out.insert(
                    id.to_string(),
                    KeyEntry {
                        secret: secret.to_string(),
                        access,
                    },
                );
            }
        };
        let mut entries = Vec::new();
        if let Some(list) = secrets.get("access_keys") {
            if list.trim_start().starts_with(['{', '[']) {
                entries = json_keys(list)?;
            } else {
                for item in list.split(',').filter(|s| !s.trim().is_empty()) {
                    match item.split_once(':') {
                        Some((id, secret)) => {
                            entries.push((id.to_string(), secret.to_string(), Access::Full));
                        }
                        None => warnings
                            .push("an entry of access_keys is not AKID:secret; skipped".into()),
                    }
                }
            }
        }
        for (k, v) in secrets {
            if let Some(id) = k.strip_prefix("access_key.") {
                let id = id.trim();
                if entries
                    .iter()
                    .any(|(i, _, a)| i.trim() == id && *a != Access::Full)
                {
                    return Err(format!(
                        "access key {id} has buckets in access_keys and is also the secret {k}, \
                         which would give it every bucket; define it once"
                    ));
                }
                entries.push((id.to_string(), v.clone(), Access::Full));
            }
        }
        for (id, secret, access) in entries {
            add(&id, &secret, access, &mut warnings);
        }
        Ok((AccessKeys(out), warnings))
    }

    /// From explicit pairs, each with full access.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> AccessKeys {
        AccessKeys(
            pairs
                .into_iter()
                .map(|(a, s)| {
                    (
                        a.to_string(),
                        KeyEntry {
                            secret: s.to_string(),
                            access: Access::Full,
                        },
                    )
                })
                .collect(),
        )
    }

    /// The secret of `id`.
    pub fn secret(&self, id: &str) -> Option<String> {
        self.0.get(id).map(|e| e.secret.clone())
    }

    /// What `id` may touch.
    pub fn access(&self, id: &str) -> Option<&Access> {
        self.0.get(id).map(|e| &e.access)
    }

    /// Key ids.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The ids, each restricted one followed by its grants:
    /// `AKID1, AKID2 (backups: read-write, public-*: read)`.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(id, e)| match &e.access {
                Access::Full => id.clone(),
                Access::Buckets(g) => format!("{id} ({g})"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Request counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Objects written (PUT, completed multipart).
    pub puts: AtomicU64,
    /// Object reads.
    pub gets: AtomicU64,
    /// Object deletes.
    pub deletes: AtomicU64,
    /// Bytes received into objects and parts.
    pub bytes_in: AtomicU64,
    /// Bytes of object data sent.
    pub bytes_out: AtomicU64,
    /// Requests refused for authentication or for the key's grants.
    pub denied: AtomicU64,
    /// 5xx answers.
    pub errors: AtomicU64,
    /// 503s because key-manager failed.
    pub kms_errors: AtomicU64,
}

/// Audit sink: bucket creation and deletion events.
pub type AuditFn = Arc<dyn Fn(String) + Send + Sync>;

/// Everything a request handler needs.
pub struct S3Service {
    /// The store.
    pub store: Store,
    /// Access keys (replaced on refresh).
    pub keys: RwLock<AccessKeys>,
    /// Counters.
    pub stats: Stats,
    audit: AuditFn,
    next_id: AtomicU64,
    virtual_host_domain: Option<String>,
}

impl std::fmt::Debug for S3Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Service")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl S3Service {
    /// A service over `store` with `keys`; `audit` receives event texts.
    pub fn new(store: Store, keys: AccessKeys, audit: AuditFn) -> S3Service {
        S3Service {
            store,
            keys: RwLock::new(keys),
            stats: Stats::default(),
            audit,
            next_id: AtomicU64::new(1),
            virtual_host_domain: None,
        }
    }

    /// Also accepts virtual-host style requests: a `Host` of
    /// `<bucket>.<domain>[:port]` addresses `bucket`, and the path is the key.
    pub fn with_virtual_host_domain(mut self, domain: Option<String>) -> S3Service {
        self.virtual_host_domain = domain
            .map(|d| d.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty());
        self
    }

    /// Replaces the access keys; true if they changed.
    pub fn set_keys(&self, keys: AccessKeys) -> bool {
        match self.keys.write() {
            Ok(mut k) if *k != keys => {
                *k = keys;
                true
            }
            _ => false,
        }
    }
}

/// A running server; stops on drop.
pub use service_runtime::listen::HttpServer as S3Server;

/// The request handler answering with `svc` (served by
/// [`crate::SPEC`]`.serve`, or by `service_runtime::boot`).
pub fn handler(svc: Arc<S3Service>) -> RequestHandler {
    Arc::new(move |req| handle(&svc, req))
}

enum Body {
    Empty,
    Xml(String),
    Stream(Box<dyn Read + Send>, u64),
    /// HEAD: the length only.
    Length(u64),
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Reply {
    fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    fn xml(body: String) -> Reply {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), "application/xml".into())],
            body: Body::Xml(format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"
            )),
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

fn handle(svc: &S3Service, mut req: tiny_http::Request) {
    let method = req.method().as_str().to_string();
    let url = req.url().to_string();
    let (raw_path, raw_query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let request_id = format!("{:016X}", svc.next_id.fetch_add(1, Ordering::Relaxed));
    let resource = raw_path.to_string();
    let mut body_read = false;
    let result = match sigv4::query_pairs(raw_query) {
        None => Err(s3err(
            400,
            "InvalidArgument",
            "the query string is not valid percent-encoding",
        )),
        Some(query) => {
            let mut ctx = Ctx {
                svc,
                req: &mut req,
                method: &method,
                headers,
                query,
                verified: None,
                access: Access::nothing(),
                body_read: false,
            };
            let r = route(&mut ctx, raw_path);
            body_read = ctx.body_read;
            r
        }
    };
    let reply = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status >= 500 {
                svc.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            if e.code == "ServiceUnavailable" {
                svc.stats.kms_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("storage-manager: {}", e.message);
            }
            if e.status == 403 {
                svc.stats.denied.fetch_add(1, Ordering::Relaxed);
            }
            e.reply(&resource, &request_id)
        }
    };
    // Read what is left of the body in small pieces: tiny_http would
    // allocate the whole remaining length to drain it.
    if !body_read || reply.status >= 300 {
        let _ = std::io::copy(&mut req.as_reader(), &mut std::io::sink());
    }
    send(req, reply, &request_id);
}

fn send(req: tiny_http::Request, reply: Reply, request_id: &str) {
    let mut headers = Vec::new();
    let mut push = |k: &str, v: &str| {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            headers.push(h);
        }
    };
    push("x-amz-request-id", request_id);
    push("Server", "aerekos-storage-manager");
    for (k, v) in &reply.headers {
        push(k, v);
    }
    let status = tiny_http::StatusCode(reply.status);
    let (reader, len): (Box<dyn Read + Send>, usize) = match reply.body {
        Body::Empty => (Box::new(std::io::empty()), 0),
        Body::Xml(s) => {
            let n = s.len();
            (Box::new(std::io::Cursor::new(s.into_bytes())), n)
        }
        Body::Stream(r, n) => (r, usize::try_from(n).unwrap_or(usize::MAX)),
        Body::Length(n) => (
            Box::new(std::io::empty()),
            usize::try_from(n).unwrap_or(usize::MAX),
        ),
    };
    let resp = tiny_http::Response::new(status, headers, reader, Some(len), None)
        .with_chunked_threshold(usize::MAX);
    if let Err(e) = req.respond(resp) {
        if e.kind() == std::io::ErrorKind::InvalidData {
            eprintln!("storage-manager: answer cut short: {e}");
        }
    }
}

fn route(ctx: &mut Ctx<'_>, raw_path: &str) -> Result<Reply, S3Err> {
    if raw_path == "/healthz"
        && ctx.method == "GET"
        && ctx.query.is_empty()
        && ctx.header("authorization").is_none()
    {
        let u = ctx.svc.store.usage();
        let mut r = Reply::xml(String::new());
        r.headers = vec![("Content-Type".into(), "application/json".into())];
        r.body = Body::Xml(format!(
            "{{\"status\":\"ok\",\"buckets\":{},\"objects\":{},\"encrypted\":{}}}",
            u.buckets,
            u.objects,
            ctx.svc.store.encrypted()
        ));
        return Ok(r);
    }
    let keys = ctx.svc.keys.read().map(|k| k.clone()).unwrap_or_default();
    let view = sigv4::RequestView {
        method: ctx.method,
        raw_path,
        query: &ctx.query,
        headers: &ctx.headers,
    };
    let verified = sigv4::verify(&view, timefmt::now(), &|id| keys.secret(id))?;
    ctx.access = keys
        .access(&verified.access_key)
        .cloned()
        .unwrap_or_else(Access::nothing);
    ctx.verified = Some(verified);
    let (bucket, key) = ctx.bucket_and_key(raw_path)?;
    for sub in [
        "acl",
        "policy",
        "versioning",
        "tagging",
        "cors",
        "lifecycle",
        "versions",
        "website",
        "encryption",
        "notification",
        "replication",
        "object-lock",
        "retention",
        "legal-hold",
        "torrent",
        "select",
        "restore",
        "attributes",
    ] {
        if ctx.has(sub) {
            return Err(s3err(
                501,
                "NotImplemented",
                format!("?{sub} is not supported"),
            ));
        }
    }
    if !bucket.is_empty() {
        ctx.require(&bucket, needed(ctx))?;
        if key.is_some() && ctx.method == "PUT" && ctx.header("x-amz-copy-source").is_some() {
            // CopyObject and UploadPartCopy also read their source.
            let (source_bucket, _) = objects::copy_source(ctx)?;
            ctx.require(&source_bucket, Perm::Read)?;
        }
    }
    match (bucket.is_empty(), key) {
        (true, _) => match ctx.method {
            "GET" => buckets::list_buckets(ctx),
            _ => Err(s3err(405, "MethodNotAllowed", "only GET / is allowed")),
        },
        (false, None) => buckets::bucket_op(ctx, &bucket),
        (false, Some(key)) => objects::object_op(ctx, &bucket, &key),
    }
}

/// The permission a request needs on the bucket it addresses: `read` for
/// GET and HEAD (objects, listings, HeadBucket, GetBucketLocation) but the
/// multipart listings, `read-write` for everything else (writes, deletes,
/// copies into the bucket, multipart uploads, Create/DeleteBucket).
fn needed(ctx: &Ctx<'_>) -> Perm {
    let reads = matches!(ctx.method, "GET" | "HEAD");
    if reads && !ctx.has("uploads") && !ctx.has("uploadId") {
        Perm::Read
    } else {
        Perm::ReadWrite
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn access_keys_from_secrets() {
        let s: BTreeMap<String, String> = [
            (
                "access_keys",
                "AKIDONE:secret/with+chars1, bad entry ,X:short",
            ),
            ("access_key.AKIDTWO", "another-secret-2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (k, w) = AccessKeys::from_secrets(&s).unwrap();
        assert_eq!(k.ids().collect::<Vec<_>>(), ["AKIDONE", "AKIDTWO"]);
        assert_eq!(k.secret("AKIDONE").unwrap(), "secret/with+chars1");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(!format!("{k:?}").contains("secret"));
        assert_eq!(
            k.access("AKIDONE"),
            Some(&Access::Full),
            "no grants: every bucket"
        );
        assert_eq!(k.access("AKIDTWO"), Some(&Access::Full));
    }

    fn secrets(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn access_keys_with_bucket_grants() {
        let s = secrets(&[
            (
                "access_keys",
                r#" {"AKIDAPP1": {"secret": "app1-secret/+x", "buckets": {"backups": "read-write", "public-*": "read"}},
                    "AKIDADMIN": "admin-secret-1",
                    "AKIDFULL": {"secret": "full-secret-1"},
                    "AKIDNONE": {"secret": "none-secret-1", "buckets": {}},
                    "X": "short"} "#,
            ),
            ("access_key.AKIDTWO", "another-secret-2"),
        ]);
        let (k, w) = AccessKeys::from_secrets(&s).unwrap();
        assert_eq!(
            k.ids().collect::<Vec<_>>(),
            ["AKIDADMIN", "AKIDAPP1", "AKIDFULL", "AKIDNONE", "AKIDTWO"]
        );
        assert_eq!(w.len(), 1, "the short id is skipped: {w:?}");
        assert_eq!(k.secret("AKIDAPP1").unwrap(), "app1-secret/+x");
        let app = k.access("AKIDAPP1").unwrap();
        assert!(app.allows("backups", Perm::ReadWrite));
        assert!(app.allows("public-web", Perm::Read));
        assert!(!app.allows("public-web", Perm::ReadWrite));
        assert!(!app.allows("db-backups", Perm::Read));
        for full in ["AKIDADMIN", "AKIDFULL", "AKIDTWO"] {
            assert_eq!(k.access(full), Some(&Access::Full), "{full}");
        }
        assert!(!k.access("AKIDNONE").unwrap().allows("backups", Perm::Read));
        assert_eq!(
            k.describe(),
            "AKIDADMIN, AKIDAPP1 (backups: read-write, public-*: read), AKIDFULL, \
             AKIDNONE (no bucket), AKIDTWO"
        );
        assert!(!k.describe().contains("secret"));
    }

    #[test]
    fn malformed_grants_are_an_error_naming_the_key_never_its_secret() {
        for (value, says) in [
            (r#"{"AKIDAPP1": {"secret": "app1-secret", "buckets": {"backups": "rw"}}}"#,
             "access_keys: access key AKIDAPP1: the permission on \"backups\" must be \"read\" or \"read-write\""),
            (r#"{"AKIDAPP1": {"secret": "app1-secret", "buckets": ["backups"]}}"#,
             "access key AKIDAPP1: \"buckets\" must be an object"),
            (r#"{"AKIDAPP1": {"secret": "app1-secret", "bucket": {"backups": "read"}}}"#,
             "access key AKIDAPP1: unknown field \"bucket\""),
            (r#"{"AKIDAPP1": {"buckets": {"backups": "read"}}}"#,
             "access key AKIDAPP1: \"secret\" (a string) is missing"),
            (r#"{"AKIDAPP1": 5}"#, "access key AKIDAPP1: must be its secret"),
            (r#"{"AKIDAPP1": "app1-secret",}"#, "not valid JSON"),
            (r#"["AKIDAPP1"]"#, "is JSON but not an object"),
        ] {
            let e = AccessKeys::from_secrets(&secrets(&[("access_keys", value)])).unwrap_err();
            assert!(e.contains(says), "{value}: {e}");
            assert!(!e.contains("app1-secret"), "{e}");
        }
        // A restricted key given again as access_key.<AKID> (full access) is refused.
        let e = AccessKeys::from_secrets(&secrets(&[
            (
                "access_keys",
                r#"{"AKIDAPP1": {"secret": "app1-secret", "buckets": {"backups": "read"}}}"#,
            ),
            ("access_key.AKIDAPP1", "app1-secret"),
        ]))
        .unwrap_err();
        assert!(e.contains("define it once"), "{e}");
    }
}
