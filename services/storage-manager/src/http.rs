//! The S3 HTTP API (tiny_http, HTTP/1.1 keep-alive, path-style addressing).
//!
//! Every request but `GET /healthz` (unsigned, no query) must be signed
//! with SigV4 ([`crate::sigv4`]): header auth or a presigned URL. Bodies
//! are streamed: a PUT goes from the socket through the payload checks
//! ([`crate::chunked`]) and the encryption into a temp file, a GET from the
//! file through decryption to the socket, in 64 KiB pieces; no object is
//! ever held whole in memory. Answers are S3 XML; errors are
//! `<Error><Code>…</Code><Message>…</Message>…</Error>` with S3 codes.
//!
//! Routes: `GET /` (ListBuckets); `PUT|HEAD|DELETE /b`; `GET /b`
//! (ListObjects v1, or v2 with `list-type=2`; `?location`); `POST /b?delete`
//! (DeleteObjects); `PUT|GET|HEAD|DELETE /b/key` (with `Range` on GET);
//! multipart: `POST /b/key?uploads`, `PUT /b/key?partNumber=N&uploadId=U`,
//! `POST /b/key?uploadId=U`, `DELETE /b/key?uploadId=U`. Other
//! CopyObject is `PUT /b/key` with `x-amz-copy-source`. Virtual-host
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
//! sizes from [`crate::store::Limits`]; listings at most 1000 keys a page.
//! A refused request's unread body is read and discarded (tiny_http would
//! otherwise allocate its whole declared length), so refusing a huge
//! upload still costs its transfer. No TLS: use loopback or a tunnel.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use s3::{timefmt, xml};
use service_runtime::RequestHandler;

use crate::chunked::{AwsChunked, ChecksumCheck, ChecksumMismatch, Sha256Check};
use crate::sigv4::{self, PayloadMode, SigError};
use crate::store::{ListParams, Store, StoreError};

/// Largest XML request body (CreateBucket, CompleteMultipartUpload, Delete).
pub const MAX_XML_BODY: usize = 1024 * 1024;
/// Encrypted GET answers up to this size are decrypted whole before the
/// status line is sent (see the module docs).
pub const VERIFIED_GET: u64 = 1024 * 1024;
/// Most keys a listing page or a DeleteObjects request holds.
pub const MAX_KEYS: usize = 1000;
const NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// Access keys (`AKID → secret`). `Debug` shows ids only.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct AccessKeys(BTreeMap<String, String>);

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

impl AccessKeys {
    /// From the service's secrets: `access_keys` = `AKID:secret,...` and
    /// `access_key.<AKID>` = secret. Returns warnings naming ids, never secrets.
    pub fn from_secrets(secrets: &BTreeMap<String, String>) -> (AccessKeys, Vec<String>) {
        let mut out = BTreeMap::new();
        let mut warnings = Vec::new();
        let mut add = |id: &str, secret: &str, warnings: &mut Vec<String>| {
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
                out.insert(id.to_string(), secret.to_string());
            }
        };
        if let Some(list) = secrets.get("access_keys") {
            for item in list.split(',').filter(|s| !s.trim().is_empty()) {
                match item.split_once(':') {
                    Some((id, secret)) => add(id, secret, &mut warnings),
                    None => {
                        warnings.push("an entry of access_keys is not AKID:secret; skipped".into())
                    }
                }
            }
        }
        for (k, v) in secrets {
            if let Some(id) = k.strip_prefix("access_key.") {
                add(id, v, &mut warnings);
            }
        }
        (AccessKeys(out), warnings)
    }

    /// From explicit pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> AccessKeys {
        AccessKeys(
            pairs
                .into_iter()
                .map(|(a, s)| (a.to_string(), s.to_string()))
                .collect(),
        )
    }

    /// The secret of `id`.
    pub fn secret(&self, id: &str) -> Option<String> {
        self.0.get(id).cloned()
    }

    /// Key ids.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
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
    /// Requests refused for authentication.
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

/// An S3 error answer.
#[derive(Debug)]
struct S3Err {
    status: u16,
    code: &'static str,
    message: String,
}

fn s3err(status: u16, code: &'static str, message: impl Into<String>) -> S3Err {
    S3Err {
        status,
        code,
        message: message.into(),
    }
}

impl From<SigError> for S3Err {
    fn from(e: SigError) -> Self {
        let (code, status) = e.s3_code();
        s3err(status, code, e.to_string())
    }
}

impl From<StoreError> for S3Err {
    fn from(e: StoreError) -> Self {
        if let StoreError::Body(io) = &e {
            if let Some(sig) = io.get_ref().and_then(|i| i.downcast_ref::<SigError>()) {
                return sig.clone().into();
            }
            if let Some(m) = io
                .get_ref()
                .and_then(|i| i.downcast_ref::<ChecksumMismatch>())
            {
                return s3err(400, "BadDigest", m.to_string());
            }
        }
        let (code, status) = e.s3_code();
        if status >= 500 && status != 503 {
            eprintln!("storage-manager: internal error: {e}");
            return s3err(status, code, "internal error; see the storage-manager log");
        }
        s3err(status, code, e.to_string())
    }
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

struct Ctx<'a> {
    svc: &'a S3Service,
    req: &'a mut tiny_http::Request,
    method: &'a str,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    verified: Option<sigv4::Verified>,
    body_read: bool,
}

impl Ctx<'_> {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }

    fn q(&self, n: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, n: &str) -> bool {
        self.query.iter().any(|(k, _)| k == n)
    }

    /// The body reader with its payload checks, and the decoded length.
    fn body(&mut self) -> Result<(Box<dyn Read + '_>, u64), S3Err> {
        let mode = self
            .verified
            .as_ref()
            .map(|v| v.payload.clone())
            .unwrap_or(PayloadMode::Unsigned);
        let content_length = self.req.body_length().map(|n| n as u64);
        let need_len = || s3err(411, "MissingContentLength", "Content-Length is required");
        self.body_read = true;
        let declared = |name: &str, ctx: &Self| -> Result<u64, S3Err> {
            ctx.header(name)
                .ok_or_else(|| {
                    s3err(
                        411,
                        "MissingContentLength",
                        format!("{name} is required for aws-chunked bodies"),
                    )
                })?
                .trim()
                .parse()
                .map_err(|_| s3err(400, "InvalidArgument", format!("{name} is not a number")))
        };
        match mode {
            PayloadMode::Sha256(h) => {
                let len = content_length.ok_or_else(need_len)?;
                Ok((Box::new(Sha256Check::new(self.req.as_reader(), &h)), len))
            }
            PayloadMode::Unsigned => {
                let len = content_length.ok_or_else(need_len)?;
                Ok((Box::new(self.req.as_reader()), len))
            }
            PayloadMode::StreamingSigned { trailer } => {
                let len = declared("x-amz-decoded-content-length", self)?;
                let v = self.verified.clone();
                let r = std::io::BufReader::with_capacity(64 * 1024, self.req.as_reader());
                Ok((Box::new(AwsChunked::new(r, v, trailer)), len))
            }
            PayloadMode::StreamingUnsignedTrailer => {
                let len = declared("x-amz-decoded-content-length", self)?;
                let trailer = self.header("x-amz-trailer").map(str::to_string);
                let r = std::io::BufReader::with_capacity(64 * 1024, self.req.as_reader());
                Ok((
                    Box::new(
                        AwsChunked::new(r, None, true).with_trailer_checksum(trailer.as_deref()),
                    ),
                    len,
                ))
            }
        }
    }

    /// The body with its payload checks and, if a `x-amz-checksum-crc32[c]`
    /// header came with it, that checksum verified too.
    fn checked_body(&mut self) -> Result<(Box<dyn Read + '_>, u64), S3Err> {
        let header = self.headers.iter().find_map(|(k, v)| {
            k.strip_prefix("x-amz-checksum-")
                .filter(|a| *a != "mode" && *a != "algorithm" && *a != "type")
                .map(|a| (a.to_string(), v.clone()))
        });
        let (r, len) = self.body()?;
        Ok(match header {
            Some((alg, value)) => match ChecksumCheck::new(r, &alg, &value) {
                Ok(c) => (Box::new(c), len),
                Err(r) => (r, len),
            },
            None => (r, len),
        })
    }

    /// A small XML body, fully read and checked.
    fn xml_body(&mut self) -> Result<String, S3Err> {
        let (mut r, len) = self.body()?;
        if len > MAX_XML_BODY as u64 {
            return Err(s3err(
                400,
                "MaxMessageLengthExceeded",
                format!("XML bodies are at most {MAX_XML_BODY} bytes"),
            ));
        }
        let mut buf = Vec::new();
        r.by_ref()
            .take(MAX_XML_BODY as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| S3Err::from(StoreError::Body(e)))?;
        String::from_utf8(buf).map_err(|_| s3err(400, "MalformedXML", "the body is not UTF-8"))
    }

    fn user_meta(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("x-amz-meta-")
                    .map(|n| (n.to_string(), v.trim().to_string()))
            })
            .collect()
    }

    fn content_type(&self) -> Option<String> {
        self.header("content-type").map(str::to_string)
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
            let body = format!(
                "<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>{request_id}</RequestId></Error>",
                e.code,
                xml::escape(&e.message),
                xml::escape(&resource)
            );
            let mut r = Reply::xml(body);
            r.status = e.status;
            r
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
    ctx.verified = Some(sigv4::verify(&view, timefmt::now(), &|id| keys.secret(id))?);
    let path = sigv4::uri_decode(raw_path).ok_or_else(|| {
        s3err(
            400,
            "InvalidURI",
            "the path is not valid percent-encoded UTF-8",
        )
    })?;
    let path = path.strip_prefix('/').unwrap_or(&path);
    let vhost_bucket = ctx.svc.virtual_host_domain.as_deref().and_then(|domain| {
        let host = ctx.header("host")?.trim().to_ascii_lowercase();
        let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        let bucket = host.strip_suffix(domain)?.strip_suffix('.')?;
        (!bucket.is_empty()).then(|| bucket.to_string())
    });
    let (bucket, key) = match (vhost_bucket, path.split_once('/')) {
        (Some(b), _) => (b, Some(path.to_string()).filter(|k| !k.is_empty())),
        (None, Some((b, k))) => (b.to_string(), Some(k.to_string()).filter(|k| !k.is_empty())),
        (None, None) => (path.to_string(), None),
    };
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
    match (bucket.is_empty(), key) {
        (true, _) => match ctx.method {
            "GET" => list_buckets(ctx),
            _ => Err(s3err(405, "MethodNotAllowed", "only GET / is allowed")),
        },
        (false, None) => bucket_op(ctx, &bucket),
        (false, Some(key)) => object_op(ctx, &bucket, &key),
    }
}

fn list_buckets(ctx: &Ctx<'_>) -> Result<Reply, S3Err> {
    let mut s = format!("<ListAllMyBucketsResult xmlns=\"{NS}\"><Owner><ID>aerekos</ID><DisplayName>aerekos</DisplayName></Owner><Buckets>");
    for (name, created) in ctx.svc.store.list_buckets() {
        s.push_str(&format!(
            "<Bucket><Name>{}</Name><CreationDate>{}</CreationDate></Bucket>",
            xml::escape(&name),
            timefmt::iso8601(created)
        ));
    }
    s.push_str("</Buckets></ListAllMyBucketsResult>");
    Ok(Reply::xml(s))
}

fn bucket_op(ctx: &mut Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    let store = &ctx.svc.store;
    match ctx.method {
        "PUT" => {
            // A CreateBucketConfiguration body is read and ignored.
            ctx.xml_body()?;
            store.create_bucket(bucket)?;
            (ctx.svc.audit)(format!("created bucket {bucket}"));
            Ok(Reply::empty(200).header("Location", format!("/{bucket}")))
        }
        "DELETE" => {
            store.delete_bucket(bucket)?;
            (ctx.svc.audit)(format!("deleted bucket {bucket}"));
            Ok(Reply::empty(204))
        }
        "HEAD" => {
            if store.bucket_exists(bucket) {
                Ok(Reply::empty(200))
            } else {
                Err(StoreError::NoSuchBucket(bucket.into()).into())
            }
        }
        "GET" if ctx.has("location") => {
            if !store.bucket_exists(bucket) {
                return Err(StoreError::NoSuchBucket(bucket.into()).into());
            }
            Ok(Reply::xml(format!(
                "<LocationConstraint xmlns=\"{NS}\"></LocationConstraint>"
            )))
        }
        "GET" if ctx.has("uploads") => Err(s3err(
            501,
            "NotImplemented",
            "listing multipart uploads is not supported",
        )),
        "GET" => list_objects(ctx, bucket),
        "POST" if ctx.has("delete") => delete_objects(ctx, bucket),
        _ => Err(s3err(
            405,
            "MethodNotAllowed",
            format!("{} is not allowed on a bucket", ctx.method),
        )),
    }
}

fn list_objects(ctx: &Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    let v2 = ctx.q("list-type") == Some("2");
    let url_enc = ctx.q("encoding-type") == Some("url");
    let enc = |s: &str| {
        if url_enc {
            sigv4::uri_encode(s, true)
        } else {
            xml::escape(s)
        }
    };
    let max_keys = match ctx.q("max-keys") {
        None => MAX_KEYS,
        Some(m) => m
            .parse::<usize>()
            .map_err(|_| s3err(400, "InvalidArgument", "max-keys is not a number"))?
            .min(MAX_KEYS),
    };
    let prefix = ctx.q("prefix").unwrap_or("").to_string();
    let delimiter = ctx
        .q("delimiter")
        .filter(|d| !d.is_empty())
        .map(str::to_string);
    let start_after = if v2 {
        match ctx.q("continuation-token") {
            Some(t) => Some(
                B64URL
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        s3err(400, "InvalidArgument", "the continuation token is invalid")
                    })?,
            ),
            None => ctx.q("start-after").map(str::to_string),
        }
    } else {
        ctx.q("marker").map(str::to_string)
    };
    let r = ctx.svc.store.list(
        bucket,
        &ListParams {
            prefix: prefix.clone(),
            delimiter: delimiter.clone(),
            start_after,
            max_keys,
        },
    )?;
    let mut s = format!(
        "<ListBucketResult xmlns=\"{NS}\"><Name>{}</Name><Prefix>{}</Prefix>",
        xml::escape(bucket),
        enc(&prefix)
    );
    if let Some(d) = &delimiter {
        s.push_str(&format!("<Delimiter>{}</Delimiter>", enc(d)));
    }
    s.push_str(&format!(
        "<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{}</IsTruncated>",
        r.truncated
    ));
    if url_enc {
        s.push_str("<EncodingType>url</EncodingType>");
    }
    if v2 {
        s.push_str(&format!(
            "<KeyCount>{}</KeyCount>",
            r.objects.len() + r.prefixes.len()
        ));
        if let Some(t) = ctx.q("continuation-token") {
            s.push_str(&format!(
                "<ContinuationToken>{}</ContinuationToken>",
                xml::escape(t)
            ));
        }
        if let Some(t) = ctx.q("start-after") {
            s.push_str(&format!("<StartAfter>{}</StartAfter>", enc(t)));
        }
        if r.truncated {
            if let Some(last) = &r.last {
                s.push_str(&format!(
                    "<NextContinuationToken>{}</NextContinuationToken>",
                    B64URL.encode(last)
                ));
            }
        }
    } else {
        s.push_str(&format!(
            "<Marker>{}</Marker>",
            enc(ctx.q("marker").unwrap_or(""))
        ));
        if r.truncated {
            if let Some(last) = &r.last {
                s.push_str(&format!("<NextMarker>{}</NextMarker>", enc(last)));
            }
        }
    }
    for (k, e) in &r.objects {
        s.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            enc(k),
            timefmt::iso8601(e.modified),
            e.etag,
            e.size
        ));
    }
    for p in &r.prefixes {
        s.push_str(&format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            enc(p)
        ));
    }
    s.push_str("</ListBucketResult>");
    Ok(Reply::xml(s))
}

fn delete_objects(ctx: &mut Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    let doc = ctx.xml_body()?;
    let objects = xml::elements(&doc, "Object");
    if objects.len() > MAX_KEYS {
        return Err(s3err(
            400,
            "MalformedXML",
            format!("at most {MAX_KEYS} keys per request"),
        ));
    }
    let quiet = xml::text(&doc, "Quiet").as_deref() == Some("true");
    let mut s = format!("<DeleteResult xmlns=\"{NS}\">");
    for o in objects {
        let key = xml::text(o, "Key")
            .ok_or_else(|| s3err(400, "MalformedXML", "an Object has no Key"))?;
        match ctx.svc.store.delete_object(bucket, &key) {
            Ok(()) => {
                ctx.svc.stats.deletes.fetch_add(1, Ordering::Relaxed);
                if !quiet {
                    s.push_str(&format!(
                        "<Deleted><Key>{}</Key></Deleted>",
                        xml::escape(&key)
                    ));
                }
            }
            Err(StoreError::NoSuchBucket(b)) => return Err(StoreError::NoSuchBucket(b).into()),
            Err(e) => {
                let e = S3Err::from(e);
                s.push_str(&format!(
                    "<Error><Key>{}</Key><Code>{}</Code><Message>{}</Message></Error>",
                    xml::escape(&key),
                    e.code,
                    xml::escape(&e.message)
                ));
            }
        }
    }
    s.push_str("</DeleteResult>");
    Ok(Reply::xml(s))
}

/// Parses a `Range` header against `size`: `Ok(None)` for no (or an
/// unsupported multi-) range, else the inclusive-exclusive range.
fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, S3Err> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let bad = || {
        s3err(
            416,
            "InvalidRange",
            format!("the range {h:?} is not satisfiable for {size} bytes"),
        )
    };
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| bad())?;
        if n == 0 || size == 0 {
            return Err(bad());
        }
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end = if b.is_empty() {
            size
        } else {
            let e: u64 = b.parse().map_err(|_| bad())?;
            if e < start {
                return Err(bad());
            }
            e.saturating_add(1).min(size)
        };
        if start >= size {
            return Err(bad());
        }
        (start, end)
    };
    Ok(Some(range))
}

fn object_headers(r: Reply, t: &crate::store::Trailer) -> Reply {
    let mut r = r
        .header("ETag", format!("\"{}\"", t.etag))
        .header("Last-Modified", timefmt::http_date(t.modified))
        .header("Accept-Ranges", "bytes")
        .header(
            "Content-Type",
            t.content_type
                .clone()
                .unwrap_or_else(|| "binary/octet-stream".into()),
        );
    for (k, v) in &t.meta {
        r = r.header(&format!("x-amz-meta-{k}"), v.clone());
    }
    r
}

/// CopyObject: `x-amz-copy-source: [/]bucket/key` (URL-encoded; a
/// `?versionId` is refused); metadata copied unless
/// `x-amz-metadata-directive: REPLACE`. The data is streamed (decrypted and
/// re-encrypted under a new data key).
fn copy_object(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let raw = ctx
        .header("x-amz-copy-source")
        .unwrap_or("")
        .trim()
        .to_string();
    if raw.contains('?') {
        return Err(s3err(
            501,
            "NotImplemented",
            "versioned copy sources are not supported",
        ));
    }
    let src = sigv4::uri_decode(&raw).ok_or_else(|| {
        s3err(
            400,
            "InvalidArgument",
            "x-amz-copy-source is not valid percent-encoding",
        )
    })?;
    let src = src.strip_prefix('/').unwrap_or(&src);
    let (sb, sk) = src
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| {
            s3err(
                400,
                "InvalidArgument",
                "x-amz-copy-source must be bucket/key",
            )
        })?;
    let store = &ctx.svc.store;
    let obj = store.open_object(sb, sk)?;
    let t = obj.trailer.clone();
    let (ct, meta) = if ctx.header("x-amz-metadata-directive").map(str::trim) == Some("REPLACE") {
        (ctx.content_type(), ctx.user_meta())
    } else {
        (t.content_type.clone(), t.meta.clone())
    };
    let mut reader = store.reader(obj, 0, t.size)?;
    let e = store.put_object(bucket, key, &mut reader, t.size, ct, meta)?;
    ctx.svc.stats.puts.fetch_add(1, Ordering::Relaxed);
    Ok(Reply::xml(format!(
        "<CopyObjectResult xmlns=\"{NS}\"><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag></CopyObjectResult>",
        timefmt::iso8601(e.modified),
        e.etag
    )))
}

fn object_op(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let svc = ctx.svc;
    let store = &svc.store;
    match ctx.method {
        "PUT"
            if (ctx.has("uploadId") || ctx.has("partNumber"))
                && ctx.header("x-amz-copy-source").is_some() =>
        {
            Err(s3err(
                501,
                "NotImplemented",
                "UploadPartCopy is not supported",
            ))
        }
        "PUT" if ctx.has("uploadId") || ctx.has("partNumber") => {
            let id = ctx.q("uploadId").unwrap_or("").to_string();
            let n: u32 = ctx
                .q("partNumber")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| s3err(400, "InvalidArgument", "partNumber must be 1 to 10000"))?;
            let (mut body, len) = ctx.checked_body()?;
            let etag = store.upload_part(bucket, key, &id, n, &mut body, len)?;
            svc.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
            Ok(Reply::empty(200).header("ETag", format!("\"{etag}\"")))
        }
        "PUT" if ctx.header("x-amz-copy-source").is_some() => copy_object(ctx, bucket, key),
        "PUT" => {
            let (ct, meta) = (ctx.content_type(), ctx.user_meta());
            let (mut body, len) = ctx.checked_body()?;
            let e = store.put_object(bucket, key, &mut body, len, ct, meta)?;
            svc.stats.puts.fetch_add(1, Ordering::Relaxed);
            svc.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
            Ok(Reply::empty(200).header("ETag", format!("\"{}\"", e.etag)))
        }
        "POST" if ctx.has("uploads") => {
            let id = store.create_upload(bucket, key, ctx.content_type(), ctx.user_meta())?;
            Ok(Reply::xml(format!(
                "<InitiateMultipartUploadResult xmlns=\"{NS}\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
                xml::escape(bucket),
                xml::escape(key)
            )))
        }
        "POST" if ctx.has("uploadId") => {
            let id = ctx.q("uploadId").unwrap_or("").to_string();
            let doc = ctx.xml_body()?;
            let mut parts = Vec::new();
            for p in xml::elements(&doc, "Part") {
                let n = xml::text(p, "PartNumber")
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| s3err(400, "MalformedXML", "a Part has no valid PartNumber"))?;
                let etag = xml::text(p, "ETag")
                    .ok_or_else(|| s3err(400, "MalformedXML", "a Part has no ETag"))?;
                parts.push((n, etag));
            }
            if parts.is_empty() {
                return Err(s3err(400, "MalformedXML", "the body lists no parts"));
            }
            let e = store.complete_upload(bucket, key, &id, &parts)?;
            svc.stats.puts.fetch_add(1, Ordering::Relaxed);
            Ok(Reply::xml(format!(
                "<CompleteMultipartUploadResult xmlns=\"{NS}\"><Location>/{}/{}</Location><Bucket>{}</Bucket><Key>{}</Key><ETag>&quot;{}&quot;</ETag></CompleteMultipartUploadResult>",
                xml::escape(bucket),
                xml::escape(&sigv4::uri_encode(key, true)),
                xml::escape(bucket),
                xml::escape(key),
                e.etag
            )))
        }
        "DELETE" if ctx.has("uploadId") => {
            store.abort_upload(bucket, key, ctx.q("uploadId").unwrap_or(""))?;
            Ok(Reply::empty(204))
        }
        "DELETE" => {
            store.delete_object(bucket, key)?;
            svc.stats.deletes.fetch_add(1, Ordering::Relaxed);
            Ok(Reply::empty(204))
        }
        "GET" if ctx.has("uploadId") => Err(s3err(
            501,
            "NotImplemented",
            "listing parts is not supported",
        )),
        "GET" | "HEAD" => {
            let obj = store.open_object(bucket, key)?;
            let t = obj.trailer.clone();
            let range = parse_range(ctx.header("range"), t.size)?;
            let (start, end) = range.unwrap_or((0, t.size));
            let mut r = object_headers(Reply::empty(if range.is_some() { 206 } else { 200 }), &t);
            if range.is_some() {
                r = r.header(
                    "Content-Range",
                    format!("bytes {start}-{}/{}", end.saturating_sub(1), t.size),
                );
            }
            if ctx.method == "HEAD" {
                r.body = Body::Length(end - start);
                return Ok(r);
            }
            let encrypted = obj.trailer.enc.is_some();
            let mut reader = store.reader(obj, start, end)?;
            if encrypted && end - start <= VERIFIED_GET {
                // Small answers are decrypted (and so authenticated) before
                // the status line: a damaged object is a clean 500.
                let mut buf = Vec::with_capacity((end - start) as usize);
                if let Err(e) = reader.read_to_end(&mut buf) {
                    eprintln!("storage-manager: {bucket}/{key}: {e}");
                    svc.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(s3err(
                        500,
                        "InternalError",
                        "the stored object is damaged; see the storage-manager log",
                    ));
                }
                reader = Box::new(std::io::Cursor::new(buf));
            }
            svc.stats.gets.fetch_add(1, Ordering::Relaxed);
            svc.stats
                .bytes_out
                .fetch_add(end - start, Ordering::Relaxed);
            r.body = Body::Stream(reader, end - start);
            Ok(r)
        }
        _ => Err(s3err(
            405,
            "MethodNotAllowed",
            format!("{} is not allowed on an object", ctx.method),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100).unwrap(), Some((0, 10)));
        assert_eq!(
            parse_range(Some("bytes=90-"), 100).unwrap(),
            Some((90, 100))
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), 100).unwrap(),
            Some((90, 100))
        );
        assert_eq!(
            parse_range(Some("bytes=50-500"), 100).unwrap(),
            Some((50, 100))
        );
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100).unwrap(), None);
        assert_eq!(parse_range(None, 100).unwrap(), None);
        for bad in ["bytes=100-", "bytes=5-2", "bytes=x-1", "bytes=-0"] {
            assert_eq!(
                parse_range(Some(bad), 100).unwrap_err().code,
                "InvalidRange",
                "{bad}"
            );
        }
    }

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
        let (k, w) = AccessKeys::from_secrets(&s);
        assert_eq!(k.ids().collect::<Vec<_>>(), ["AKIDONE", "AKIDTWO"]);
        assert_eq!(k.secret("AKIDONE").unwrap(), "secret/with+chars1");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(!format!("{k:?}").contains("secret"));
    }
}
