//! HTTP API on tiny_http: `/api/v1/*` JSON, `/metrics` (Prometheus) and
//! the web dashboard at `/` (static files embedded in the binary, [`ui`]).
//!
//! Requests are served by [`HTTP_THREADS`] blocking threads (a command waits
//! up to 5 s for its reply and holds one thread meanwhile; a log relay holds
//! one for its duration, at most [`logs::MAX_LOG_STREAMS`] at a time; a
//! remote exec two — the caller's answer and the worker's upload
//! `POST /api/v1/agent/exec/{session}`, streamed like an artifact upload —
//! and a remote shell four — those, the worker's input stream and the
//! client's streamed input `POST /api/v1/shell-sessions/{session}/input` —
//! at most [`crate::exec::MAX_EXEC_SESSIONS`] of both at a time).
//! Request bodies are capped at [`MAX_BODY`] bytes (413 beyond), except
//! `POST /api/v1/artifacts`, which streams its body to disk up to
//! `Config::max_artifact_bytes` ([`artifacts`]). The worker download routes
//! `/api/v1/agent/*` authenticate with `Authorization: Aerekos-Worker`
//! ([`agent`]), not with a token. Errors are JSON
//! `{"error": "..."}` with a fitting status code. `HEAD` is answered as
//! `GET` without the body (same status and headers, the same
//! authorisation). Every route except
//! `health`, `openapi.json`, `enroll`, `login`, `logout`, `session` and
//! `/metrics` needs
//! `Authorization: Bearer <session or API token>` or the `aerekos_session`
//! cookie that `login` sets (`HttpOnly; SameSite=Strict`), and a token
//! whose role allows the request ([`auth`]'s `authorize`). A request
//! authenticated by the cookie that carries an `Origin` header must come from
//! this host (`Host` or `X-Forwarded-Host`), else 403. Behind a TLS proxy
//! that sets `X-Forwarded-Proto: https` the cookie is also `Secure`.
//!
//! HTTPS and plain HTTP share the port (the vendored tiny_http tells them
//! apart by the first byte; the certificate is [`crate::tls`]'s and follows
//! its renewals). Plain HTTP is answered only for loopback peers (the local
//! worker, a proxy on this host, the README's `curl`) unless
//! `--insecure-plain`: from other hosts it gets 403 with the HTTPS URL and
//! the CA fingerprint, logged once per peer and minute and counted
//! (`aerekos_plain_refused_total`). HTTPS answers carry HSTS; the session
//! cookie is `Secure` under TLS.
//!
//! Limits: the enrol and login rate limits key on the TCP peer address, so
//! behind a reverse proxy all clients share one bucket.

mod agent;
mod agent_updates;
mod alerts;
mod api;
mod artifacts;
mod auth;
mod commands;
mod enroll;
mod exec;
pub mod forward;
mod labels;
mod logs;
mod message;
mod prom;
mod services;
mod shell;
mod ui;

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_server::{StartError, Trouble};
use rumqttc::AsyncClient;
use serde_json::json;
use tiny_http::{Header, Method, Response};
use tracing::{debug, warn};

use crate::state::Shared;
use crate::ConductorError;

use message::{cookie_value, ApiError, Ctx, RawResp, Req, Resp};

/// Request handler threads: a remote exec holds two for its duration, a
/// remote shell four (at most [`crate::exec::MAX_EXEC_SESSIONS`] of them
/// together), a log relay one (at most [`logs::MAX_LOG_STREAMS`]); at least
/// 8 stay for everything else.
pub const HTTP_THREADS: usize = 32;
/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

/// A running HTTP server.
pub struct HttpServer {
    server: http_server::HttpServer,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `config.http_listen` and starts the handler threads.
    pub fn start(shared: Arc<Shared>, client: AsyncClient) -> Result<HttpServer, ConductorError> {
        let listen = shared.config.http_listen.as_str();
        let read_timeout = shared.config.http_read_timeout_s;
        // The listener gets TCP_NODELAY (tiny_http's 1 KiB write buffer
        // would hold the tail of larger answers until the client's delayed
        // ACK, ~40 ms; see `http_server`).
        let mut options = http_server::Options::new("http")
            .threads(HTTP_THREADS)
            .poll(Duration::from_millis(100))
            .read_timeout((read_timeout > 0).then(|| Duration::from_secs(read_timeout.into())))
            .report(|t| match t {
                Trouble::NoDelay(e) => {
                    warn!("TCP_NODELAY not set on the API listener ({e}): large answers are slower")
                }
                Trouble::Accept(e) => warn!("http accept: {e}"),
            });
        // One port, both protocols: a connection starting with a TLS
        // handshake is HTTPS, anything else plain HTTP (refused from other
        // hosts in `serve`).
        if let Some(tls) = &shared.tls {
            let config = tls
                .server_config(&[b"http/1.1"])
                .map_err(|e| ConductorError::Http(format!("TLS: {e}")))?;
            options = options.tls(config);
        }
        let start_err = |e| {
            ConductorError::Http(match e {
                StartError::Bind { reason, .. } => format!("bind {listen}: {reason}"),
                StartError::NotIp => "not bound to an IP address".into(),
                StartError::Thread(e) => format!("spawn: {e}"),
            })
        };
        let ctx = Ctx {
            shared: shared.clone(),
            client,
            exec: Arc::new(crate::exec::ExecSessions::new()),
        };
        let server = http_server::HttpServer::start(listen, options, move |req| serve(&ctx, req))
            .map_err(start_err)?;
        Ok(HttpServer { server })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        crate::net::advertised(self.server.addr())
    }

    /// Stops accepting, finishes in-flight requests and joins the threads.
    pub fn stop(self) {
        self.server.stop();
    }
}

/// What a handler answers.
enum Out {
    Text(Resp),
    Raw(RawResp),
}

fn header<'a>(req: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

/// The request's method for routing: `HEAD` is routed (and authorised) as
/// `GET`; tiny_http then sends the answer's status and headers without its
/// body (and [`stream_chunked`] stops after the head).
fn routed_method(method: &Method) -> Method {
    match method {
        Method::Head => Method::Get,
        m => m.clone(),
    }
}

fn request_head(raw: &tiny_http::Request, path: &str, query: &str, ip: IpAddr) -> Req {
    Req {
        method: routed_method(raw.method()),
        path: path.to_string(),
        query: parse_query(query),
        bearer: header(raw, "Authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|s| s.trim().to_string()),
        cookie: header(raw, "Cookie")
            .and_then(|c| cookie_value(c, auth::SESSION_COOKIE))
            .filter(|c| !c.is_empty()),
        host: header(raw, "Host").map(str::to_string),
        forwarded_host: header(raw, "X-Forwarded-Host").map(str::to_string),
        behind_tls: header(raw, "X-Forwarded-Proto")
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https")),
        secure: raw.secure(),
        origin: header(raw, "Origin").map(str::to_string),
        if_none_match: header(raw, "If-None-Match").map(str::to_string),
        authorization: header(raw, "Authorization").map(str::to_string),
        ip,
        body: Vec::new(),
    }
}

/// Routes answered with a [`RawResp`]; `None` for the JSON table.
fn raw_route(ctx: &Ctx, req: &Req) -> Option<Result<RawResp, ApiError>> {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    Some(match (&req.method, segs.as_slice()) {
        (Method::Get, ["api", "v1", "agent", "manifests", name, version]) => {
            agent::manifest(ctx, req, name, version)
        }
        (Method::Get, ["api", "v1", "agent", "sealed-manifests", name, version]) => {
            agent::sealed_manifest(ctx, req, name, version)
        }
        (Method::Get, ["api", "v1", "agent", "artifacts", sha]) => agent::artifact(ctx, req, sha),
        (Method::Get, ["api", "v1", "workers", id, "services", name, "logs"]) => {
            auth::authorize(ctx, req).and_then(|_| logs::stream(ctx, req, id, name))
        }
        (Method::Post, ["api", "v1", "workers", id, "exec"]) => {
            auth::authorize(ctx, req).and_then(|t| exec::start(ctx, req, id, &t))
        }
        (Method::Post, ["api", "v1", "workers", id, "shell"]) => {
            auth::authorize(ctx, req).and_then(|t| shell::start(ctx, req, id, &t))
        }
        (Method::Get, ["api", "v1", "agent", "shell", session, "input"]) => {
            shell::agent_input(ctx, req, session)
        }
        _ => return None,
    })
}

/// The session segment of a streamed `POST {prefix}/{session}{suffix}`
/// (the worker's exec or shell output, a client's shell input).
fn streamed_post<'a>(
    method: &Method,
    path: &'a str,
    prefix: &str,
    suffix: &str,
) -> Option<&'a str> {
    let rest = path
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .strip_suffix(suffix)?;
    (*method == Method::Post && !rest.is_empty() && !rest.contains('/')).then_some(rest)
}

fn serve(ctx: &Ctx, mut raw: tiny_http::Request) {
    let ip = raw
        .remote_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let url = raw.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    if crate::net::plain_refused(raw.secure(), ctx.shared.config.insecure_plain, ip) {
        refuse_plain(&ctx.shared.plain_refused, ctx.shared.tls.as_ref(), raw, ip);
        return;
    }
    let content_length = header(&raw, "Content-Length").and_then(|v| v.trim().parse::<u64>().ok());
    let mut req = request_head(&raw, path, query, ip);
    let result = if req.method == Method::Post && path.trim_end_matches('/') == "/api/v1/artifacts"
    {
        // Streamed to disk: the JSON body limit does not apply.
        artifacts::upload(ctx, &req, content_length, raw.as_reader()).map(Out::Text)
    } else if let Some(session) = streamed_post(&req.method, path, protocol::exec::EXEC_PATH, "") {
        // A worker's exec output, streamed for as long as the command runs.
        exec::upload(ctx, &req, session, raw.as_reader(), false).map(Out::Text)
    } else if let Some(session) = streamed_post(&req.method, path, protocol::shell::SHELL_PATH, "")
    {
        // A worker's terminal output, for as long as the shell runs.
        exec::upload(ctx, &req, session, raw.as_reader(), true).map(Out::Text)
    } else if let Some(session) = streamed_post(
        &req.method,
        path,
        protocol::shell::CLIENT_SESSIONS_PATH,
        "/input",
    ) {
        // A client's keystrokes: one batch, or a stream for the session.
        shell::input(ctx, &req, session, raw.as_reader()).map(Out::Text)
    } else if content_length.is_some_and(|n| n > MAX_BODY as u64) {
        Err(ApiError::new(
            413,
            format!("request body over {MAX_BODY} bytes"),
        ))
    } else {
        let mut body = Vec::new();
        match raw
            .as_reader()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
        {
            Ok(_) if body.len() > MAX_BODY => Err(ApiError::new(
                413,
                format!("request body over {MAX_BODY} bytes"),
            )),
            Ok(_) => {
                req.body = body;
                match raw_route(ctx, &req) {
                    Some(r) => r.map(Out::Raw),
                    None => api::route(ctx, &req).map(Out::Text),
                }
            }
            Err(e) => Err(ApiError::new(400, format!("cannot read body: {e}"))),
        }
    };
    let out =
        result.unwrap_or_else(|e| Out::Text(Resp::json(e.status, &json!({"error": e.message}))));
    match out {
        Out::Text(resp) => respond_text(raw, path, resp),
        Out::Raw(resp) => respond_raw(raw, path, resp),
    }
}

/// Answers a plain HTTP request from another host with 403 and how to
/// connect instead: its password, token or cookie crossed the network in
/// clear text already, but nothing is done with it.
fn refuse_plain(
    refusals: &crate::net::PlainRefusals,
    tls: Option<&crate::tls::Tls>,
    raw: tiny_http::Request,
    ip: IpAddr,
) {
    let host = header(&raw, "Host").unwrap_or("<conductor>").to_string();
    if refusals.refuse("http", ip) {
        warn!(
            peer = %ip,
            "plain HTTP refused from another host (HTTPS on the same port, or --insecure-plain \
             on a trusted network)"
        );
    }
    let message = match tls {
        Some(t) => format!(
            "plain HTTP is refused from {ip}: use https://{host}/ (CA fingerprint sha256:{}; \
             edge-workers given a token that carries it switch to HTTPS by themselves)",
            t.ca_fingerprint()
        ),
        None => format!(
            "plain HTTP is refused from {ip}: this conductor serves other hosts only through a \
             TLS proxy on its own host, or with --insecure-plain"
        ),
    };
    respond_text(
        raw,
        "-",
        Resp::json(403, &json!({ "error": message })).with("Connection", "close"),
    );
}

fn headers_of(list: Vec<(&'static str, String)>, content_type: &str) -> Vec<Header> {
    let mut out = Vec::new();
    if let Ok(h) = Header::from_bytes("Content-Type", content_type) {
        out.push(h);
    }
    for (name, value) in list {
        if let Ok(h) = Header::from_bytes(name, value) {
            out.push(h);
        }
    }
    out
}

/// Tells browsers to use HTTPS for this host from now on (HTTPS answers only).
const HSTS: &str = "max-age=31536000";

fn respond_text(raw: tiny_http::Request, path: &str, resp: Resp) {
    debug!(method = %raw.method(), path, status = resp.status, "http");
    let mut headers = resp.headers;
    if raw.secure() {
        headers.push(("Strict-Transport-Security", HSTS.into()));
    }
    if resp.content_type == "application/json" {
        headers.push(("Cache-Control", "no-store".into()));
    }
    headers.push(("X-Content-Type-Options", "nosniff".into()));
    let mut r = Response::from_string(resp.body).with_status_code(resp.status);
    for h in headers_of(headers, resp.content_type) {
        r = r.with_header(h);
    }
    if let Err(e) = raw.respond(r) {
        debug!("http respond: {e}");
    }
}

fn respond_raw(raw: tiny_http::Request, path: &str, resp: RawResp) {
    debug!(method = %raw.method(), path, status = resp.status, streamed = resp.len.is_none(), "http");
    let mut headers = resp.headers;
    headers.push(("Cache-Control", "no-store".into()));
    headers.push(("X-Content-Type-Options", "nosniff".into()));
    if raw.secure() {
        headers.push(("Strict-Transport-Security", HSTS.into()));
    }
    let Some(len) = resp.len else {
        stream_chunked(raw, resp.status, resp.content_type, headers, resp.body);
        return;
    };
    let r = Response::new(
        tiny_http::StatusCode(resp.status),
        headers_of(headers, resp.content_type),
        resp.body,
        Some(len),
        None,
    )
    // A known length is always sent as Content-Length (tiny_http would
    // switch to chunked above 32 KiB).
    .with_chunked_threshold(usize::MAX);
    if let Err(e) = raw.respond(r) {
        debug!("http respond: {e}");
    }
}

/// Writes a chunked response by hand, flushing after every read of `body`
/// (tiny_http's own chunked writer buffers 8 KiB before sending anything,
/// which would hold back a slow log stream). The connection is closed
/// afterwards.
fn stream_chunked(
    raw: tiny_http::Request,
    status: u16,
    content_type: &str,
    headers: Vec<(&'static str, String)>,
    mut body: Box<dyn Read + Send>,
) {
    use std::io::Write;
    let reason = tiny_http::StatusCode(status).default_reason_phrase();
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        if !v.contains(['\r', '\n']) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    let head_only = *raw.method() == Method::Head;
    let mut w = raw.into_writer();
    let result = (|| -> std::io::Result<()> {
        w.write_all(head.as_bytes())?;
        w.flush()?;
        if head_only {
            return Ok(());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            let n = body.read(&mut buf)?;
            if n == 0 {
                w.write_all(b"0\r\n\r\n")?;
                return w.flush();
            }
            w.write_all(format!("{n:x}\r\n").as_bytes())?;
            w.write_all(&buf[..n])?;
            w.write_all(b"\r\n")?;
            w.flush()?;
        }
    })();
    if let Err(e) = result {
        debug!("http stream ended: {e}");
    }
}
