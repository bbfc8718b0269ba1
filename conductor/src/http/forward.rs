//! A standby's API: while a conductor waits for the store lease
//! (`store::lease::Lease::wait`), it listens on its own HTTP port and
//! forwards every request to the active conductor, whose API URL the lease
//! row records (`--advertise-url`, [`crate::store::lease::ActiveUrl`]). An
//! operator, the dashboard, the CLI or an agent that reaches a standby is
//! served by the active one through it.
//!
//! **What is forwarded**: the method, the path and query, the headers
//! (`Authorization` and `Cookie` included; not the hop-by-hop ones nor
//! `Host`, which names the active one's address; `X-Forwarded-For` gets the
//! client's address appended, `X-Forwarded-Proto` says how the client came
//! in unless a proxy in front already said so, `X-Forwarded-Host` keeps the
//! client's `Host` for the active one's same-origin check) and the body,
//! streamed. The answer's status, headers (`Set-Cookie` included; not the
//! hop-by-hop ones) and body are relayed, the body streamed and flushed as
//! it arrives (artifact downloads, log and exec streams), with
//! `X-Aerekos-Forwarded-By: <this conductor's advertise URL>`.
//!
//! **Not forwarded**: a plain HTTP request the active one's listener would
//! refuse ([`crate::net::plain_refused`], the same rule) is refused here the
//! same way. With no URL recorded, or the active one unreachable (refused,
//! timed out, its certificate not the fleet's), the answer is 503 with
//! `{"error": "…"}` naming why and `Retry-After: 1`.
//!
//! **TLS**: the standby serves HTTPS with the TLS material the active one
//! made ([`crate::tls::Tls::load_existing`]: read-only; a standby never
//! creates any, the data directory may be shared). Until it exists the
//! standby does not listen and looks again every [`TLS_RETRY`]. The
//! forwarding client trusts only the CA that material's chain ends in (the
//! fleet CA, or the operator's) and checks the active one's certificate,
//! its name included, against it.
//!
//! **Timeouts**: the active one's name resolved within [`RESOLVE_TIMEOUT`],
//! a connection within [`CONNECT_TIMEOUT`]; the answer's
//! head within [`HEAD_TIMEOUT`] (the longest route waits 5 s before its
//! head: a command's reply, an exec's start, a log's first chunk); bodies
//! either way within [`LONGEST_STREAM`] (an exec or a shell may last
//! [`super::exec::MAX_TIMEOUT_S`] plus its grace).
//!
//! The URL is read from the lease row every `store::lease::WAIT_POLL`:
//! when another standby takes over, requests go to it from the next poll
//! (until then they get the 503 of an unreachable URL).
//!
//! Limits: no protocol upgrade is forwarded (`Upgrade` is hop-by-hop; the
//! API has none: the remote shell is a plain HTTP stream each way). A
//! standby on the same host and port as the active one cannot listen (it
//! says so once and tries again every [`TLS_RETRY`]). Every answer closes
//! its connection (`Connection: close`: no keep-alive through a standby, so
//! a stop leaves no idle connection behind). The active one sees the
//! standby as the TCP peer, so its per-IP enrolment and login rate limits
//! count every client of this standby as one. Requests are served by
//! [`FORWARD_THREADS`] threads, each held for the whole of a long poll. The
//! certificate served is the active one's, naming its host (and every
//! `--tls-san`): clients that check names and reach the standby by another
//! name need that name in `--tls-san`. [`Standby::stop`] closes the
//! listener and returns; requests being forwarded then go on until their
//! upstream ends (the old active one is usually gone) on threads nobody
//! joins.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use tiny_http::{Header, Method, Response};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::net::{plain_refused, PlainRefusals};
use crate::store::lease::ActiveUrl;
use crate::tls::{Tls, TlsSettings};

/// How long the forwarding client waits for the active one's name to
/// resolve. Without a bound a lookup waits for the resolver's own timeouts
/// (seconds per server when the name's DNS does not answer), and the client
/// with it; a name that does not resolve at once is as good as an active
/// one that cannot be reached.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the forwarding client waits for a connection to the active one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it waits for the head of the active one's answer after the
/// request was sent (the API's longest wait before a head is 5 s).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request or answer body may stream: the longest exec or
/// shell session (`timeout_s` ≤ 24 h, plus its grace), with room.
pub const LONGEST_STREAM: Duration =
    Duration::from_secs(super::exec::MAX_TIMEOUT_S as u64 + 15 * 60);
/// How often a standby looks for the TLS material again while it is not
/// there, and tries its port again while it is taken.
pub const TLS_RETRY: Duration = Duration::from_secs(1);
/// Request threads of a standby.
pub const FORWARD_THREADS: usize = super::HTTP_THREADS;
/// How long a request thread waits for a request before it checks whether
/// the standby stops.
const POLL: Duration = Duration::from_millis(100);
/// A stop waits this long at most for the port to be free again.
const RELEASE_WITHIN: Duration = Duration::from_secs(3);
/// How often the TLS material is looked at for changes (a renewal by the
/// active one).
const TLS_REFRESH: Duration = Duration::from_secs(60);
/// The forwarding failures logged at most once per this.
const WARN_EVERY_MS: u64 = 10_000;

/// Why a request could not be forwarded: the text of the 503's `error`.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The lease row names no active conductor (none has started since the
    /// column exists, or one is only taking the lease).
    #[error(
        "this conductor is a standby and no active conductor has recorded its API address in \
         the store yet"
    )]
    NoActive,
    /// The active one's URL did not answer (refused, timed out, TLS).
    #[error(
        "this conductor is a standby and the active conductor at {url} cannot be reached: {source}"
    )]
    Unreachable {
        /// The URL the lease row records.
        url: String,
        /// Why.
        source: ureq::Error,
    },
    /// The standby is closing its listener to take over: the request came
    /// after the last one its threads took (the next one is served by this
    /// conductor as the active one).
    #[error("this conductor is taking over as the active one: try again")]
    TakingOver,
    /// The request could not be rebuilt for the client (a header or a
    /// method it cannot carry).
    #[error("this conductor is a standby and cannot forward this request: {0}")]
    Request(#[from] ureq::http::Error),
}

/// A standby's forwarding listener (and, before it listens, its wait for
/// the TLS material), running on threads of its own until [`Standby::stop`].
#[derive(Debug)]
pub struct Standby {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the forwarding threads share.
struct Forwarder {
    agent: ureq::Agent,
    active: ActiveUrl,
    /// The TLS material served (`None`: plain only, `--no-tls`).
    tls: Option<Tls>,
    insecure_plain: bool,
    refusals: PlainRefusals,
    /// `X-Aerekos-Forwarded-By`: this conductor's advertise URL (with the
    /// bound port when it listens on port 0).
    forwarded_by: String,
    /// When a forwarding failure was last logged (ms since `started`).
    warned: AtomicU64,
    /// Set when the standby stops: request threads take no more requests
    /// (and so release the server, whose drop closes the listener).
    closing: AtomicBool,
    started: Instant,
}

/// Where and how the standby listens.
struct Listen {
    addr: String,
    read_timeout: Option<Duration>,
    /// `Some`: TLS is on, with these settings for the read-only load.
    tls: Option<TlsSettings>,
    data_dir: PathBuf,
    insecure_plain: bool,
    config: Config,
}

impl Standby {
    /// Starts the standby's thread: it waits until `active` says this
    /// conductor stands by (the lease is held by another), then, with TLS,
    /// for the TLS material, then listens on `config.http_listen` and
    /// forwards to the URL in `active`.
    pub fn start(config: &Config, active: ActiveUrl) -> std::io::Result<Standby> {
        let stop = Arc::new(AtomicBool::new(false));
        let listen = Listen {
            addr: config.http_listen.clone(),
            read_timeout: (config.http_read_timeout_s > 0)
                .then(|| Duration::from_secs(config.http_read_timeout_s.into())),
            tls: config.tls.then(|| crate::tls_settings(config)),
            data_dir: PathBuf::from(&config.data_dir),
            insecure_plain: config.insecure_plain,
            config: config.clone(),
        };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || run(&listen, &active, &s))?;
        Ok(Standby {
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener (once this returns the port can be bound again)
    /// and stops the idle request threads; requests being forwarded are
    /// not waited for. Blocking.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Sleeps `d` in short steps; `false` when `stop` was set meanwhile.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::SeqCst)
}

/// The standby's thread: the waits, the listener, the stop.
fn run(listen: &Listen, active: &ActiveUrl, stop: &AtomicBool) {
    while !active.standing_by() {
        if !pause(POLL, stop) {
            return;
        }
    }
    let tls = match &listen.tls {
        None => None,
        Some(settings) => match wait_for_tls(listen, settings, stop) {
            Some(t) => Some(t),
            None => return,
        },
    };
    let mut options = http_server::Options::new("standby")
        .read_timeout(listen.read_timeout)
        .report(|t| warn!("standby listener: {t}"));
    if let Some(t) = &tls {
        match t.server_config(&[b"http/1.1"]) {
            Ok(c) => options = options.tls(c),
            Err(e) => {
                warn!("standby: TLS unusable, not forwarding the API: {e}");
                return;
            }
        }
    }
    let mut said_busy = false;
    let (server, addr) = loop {
        match http_server::bind(&listen.addr, &options) {
            Ok(bound) => break bound,
            Err(e) => {
                if !said_busy {
                    warn!(
                        "standby: cannot listen on {} ({e:?}); trying again",
                        listen.addr
                    );
                    said_busy = true;
                }
                if !pause(TLS_RETRY, stop) {
                    return;
                }
            }
        }
    };
    let forwarded_by = listen.config.advertise_url_at(addr.port());
    let fwd = Arc::new(Forwarder {
        agent: agent(tls.as_ref()),
        active: active.clone(),
        tls: tls.clone(),
        insecure_plain: listen.insecure_plain,
        refusals: PlainRefusals::default(),
        forwarded_by,
        warned: AtomicU64::new(0),
        closing: AtomicBool::new(false),
        started: Instant::now(),
    });
    info!(%addr, "standby: forwarding the API and the dashboard to the active conductor");
    let server = Arc::new(server);
    for i in 0..FORWARD_THREADS {
        let (weak, fwd) = (Arc::downgrade(&server), fwd.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("standby-{i}"))
            .spawn(move || serve_requests(&weak, &fwd));
        if let Err(e) = spawned {
            warn!("standby: request thread not started: {e}");
        }
    }
    let mut refreshed = Instant::now();
    while pause(POLL, stop) {
        if let Some(t) = tls.as_ref().filter(|_| refreshed.elapsed() >= TLS_REFRESH) {
            refreshed = Instant::now();
            match t.refresh() {
                Ok(Some(what)) => info!("standby TLS: {what}"),
                Ok(None) => {}
                Err(e) => warn!("standby TLS: reload failed (the current one stays): {e}"),
            }
        }
    }
    fwd.closing.store(true, Ordering::SeqCst);
    close(server, addr, &fwd);
}

/// Loads the TLS material read-only, every [`TLS_RETRY`] until it is
/// there; `None` when stopped first.
fn wait_for_tls(listen: &Listen, settings: &TlsSettings, stop: &AtomicBool) -> Option<Tls> {
    let mut said = false;
    loop {
        match Tls::load_existing(&listen.data_dir, settings.clone()) {
            Ok(Some(t)) => {
                if said {
                    info!("standby: TLS material found");
                }
                return Some(t);
            }
            Ok(None) if !said => {
                info!(
                    "standby: no TLS material in {} yet; not listening until the active \
                     conductor has created it",
                    listen.data_dir.join(crate::tls::TLS_DIR).display()
                );
                said = true;
            }
            Ok(None) => {}
            Err(e) if !said => {
                warn!("standby: TLS material not usable yet ({e}); trying again");
                said = true;
            }
            Err(e) => debug!("standby: TLS material not usable yet: {e}"),
        }
        if !pause(TLS_RETRY, stop) {
            return None;
        }
    }
}

/// Drops the server once no request thread holds it (they hold it only
/// while they wait for a request, and take none once `closing` is set),
/// which closes the listener, and waits
/// until `addr` can be bound again. Requests queued meanwhile are answered
/// 503 ([`ForwardError::TakingOver`], `Retry-After: 1`); any queued after
/// that get tiny_http's 500 as the server drops (vendor/README.md): none is
/// left waiting for an answer.
fn close(mut server: Arc<tiny_http::Server>, addr: SocketAddr, fwd: &Forwarder) {
    server.unblock();
    loop {
        while let Ok(Some(rq)) = server.try_recv() {
            unavailable(fwd, rq, &ForwardError::TakingOver);
        }
        match Arc::try_unwrap(server) {
            Ok(s) => {
                drop(s);
                break;
            }
            Err(s) => {
                server = s;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    // tiny_http's accept thread closes the socket as it ends, just after.
    let until = Instant::now() + RELEASE_WITHIN;
    while std::net::TcpListener::bind(addr).is_err() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    info!(%addr, "standby: forwarding listener closed");
}

/// A request thread: takes requests while the server lives.
fn serve_requests(server: &Weak<tiny_http::Server>, fwd: &Forwarder) {
    while !fwd.closing.load(Ordering::SeqCst) {
        let Some(s) = server.upgrade() else { return };
        let next = s.recv_timeout(POLL);
        drop(s);
        match next {
            Ok(Some(req)) => handle(fwd, req),
            Ok(None) => {}
            Err(e) => {
                debug!("standby accept: {e}");
                std::thread::sleep(http_server::ACCEPT_BACKOFF);
            }
        }
    }
}

/// The forwarding client: no redirects followed, statuses relayed, the
/// CA of `tls` as its only root (none without TLS: `https://` fails).
fn agent(tls: Option<&Tls>) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let roots = tls.map_or_else(Vec::new, |t| {
        vec![Certificate::from_der(t.current().ca_der.as_ref()).to_owned()]
    });
    let tls_config = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_resolve(Some(RESOLVE_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(HEAD_TIMEOUT))
        .timeout_send_body(Some(LONGEST_STREAM))
        .timeout_recv_body(Some(LONGEST_STREAM))
        .tls_config(tls_config)
        .build()
        .into()
}

/// Headers that concern one connection, not the request (RFC 9110 §7.6.1),
/// plus those the forwarding sets itself.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .contains(&name)
}

/// The header names a `Connection` header lists (lower case).
fn connection_tokens<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn handle(fwd: &Forwarder, mut raw: tiny_http::Request) {
    let ip = raw
        .remote_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    if plain_refused(raw.secure(), fwd.insecure_plain, ip) {
        super::refuse_plain(&fwd.refusals, fwd.tls.as_ref(), raw, ip);
        return;
    }
    match forward(fwd, &mut raw, ip) {
        Ok(resp) => relay(fwd, raw, resp),
        Err(e) => {
            let now = u64::try_from(fwd.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let last = fwd.warned.load(Ordering::Relaxed);
            if last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS {
                fwd.warned.store(now.max(1), Ordering::Relaxed);
                warn!("standby: {e}");
            } else {
                debug!("standby: {e}");
            }
            unavailable(fwd, raw, &e);
        }
    }
}

/// Sends `raw` on to the active conductor; its answer's head.
fn forward(
    fwd: &Forwarder,
    raw: &mut tiny_http::Request,
    ip: IpAddr,
) -> Result<ureq::http::Response<ureq::Body>, ForwardError> {
    let base = fwd.active.get().ok_or(ForwardError::NoActive)?;
    let url = format!("{}{}", base.trim_end_matches('/'), raw.url());
    let mut b = ureq::http::Request::builder()
        .method(raw.method().as_str())
        .uri(&url);
    let named = connection_tokens(
        raw.headers()
            .iter()
            .filter(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str()),
    );
    let (mut has_body, mut forwarded_for, mut proto, mut host, mut forwarded_host) =
        (false, None, None, None, false);
    for h in raw.headers() {
        let name = h.field.as_str().as_str();
        let lower = name.to_ascii_lowercase();
        let value = h.value.as_str();
        match lower.as_str() {
            "content-length" => has_body |= value.trim() != "0",
            "transfer-encoding" => has_body = true,
            "x-forwarded-for" => {
                forwarded_for = Some(value.to_string());
                continue;
            }
            "x-forwarded-proto" => proto = Some(value.to_string()),
            "x-forwarded-host" => forwarded_host = true,
            "host" => {
                host = Some(value.to_string());
                continue;
            }
            _ => {}
        }
        // `Expect: 100-continue` was answered by tiny_http already.
        if hop_by_hop(&lower) || named.contains(&lower) || lower == "expect" {
            continue;
        }
        b = b.header(name, value);
    }
    b = b.header(
        "X-Forwarded-For",
        forwarded_for.map_or_else(|| ip.to_string(), |f| format!("{f}, {ip}")),
    );
    if proto.is_none() {
        b = b.header(
            "X-Forwarded-Proto",
            if raw.secure() { "https" } else { "http" },
        );
    }
    if let (Some(h), false) = (host, forwarded_host) {
        b = b.header("X-Forwarded-Host", h);
    }
    // Two calls: `SendBody`'s lifetime is invariant (a `&mut dyn Read`).
    let answer = if has_body {
        fwd.agent
            .run(b.body(ureq::SendBody::from_reader(raw.as_reader()))?)
    } else {
        fwd.agent.run(b.body(ureq::SendBody::none())?)
    };
    answer.map_err(|source| ForwardError::Unreachable { url: base, source })
}

/// Writes the active one's answer to the client: its status and headers,
/// then its body as it arrives (with its length when it has one, else
/// chunked), flushed after every read; the connection closes after it.
fn relay(fwd: &Forwarder, raw: tiny_http::Request, resp: ureq::http::Response<ureq::Body>) {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let named = connection_tokens(
        parts
            .headers
            .get_all("connection")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let length = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let no_body = *raw.method() == Method::Head
        || status.is_informational()
        || status == ureq::http::StatusCode::NO_CONTENT
        || status == ureq::http::StatusCode::NOT_MODIFIED;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        let lower = name.as_str();
        if hop_by_hop(lower)
            || named.iter().any(|n| n == lower)
            || lower == "content-length"
            || lower == "x-aerekos-forwarded-by"
        {
            continue;
        }
        match value.to_str() {
            Ok(v) if !v.contains(['\r', '\n']) => head.push_str(&format!("{name}: {v}\r\n")),
            _ => debug!(header = %name, "standby: header not relayed (not text)"),
        }
    }
    head.push_str(&format!(
        "X-Aerekos-Forwarded-By: {}\r\nConnection: close\r\n",
        fwd.forwarded_by
    ));
    let chunked = match length {
        Some(n) => {
            head.push_str(&format!("Content-Length: {n}\r\n"));
            false
        }
        None => !no_body,
    };
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    }
    head.push_str("\r\n");
    debug!(method = %raw.method(), url = raw.url(), status = status.as_u16(), "forwarded");
    let mut w = raw.into_writer();
    let result = (|| -> std::io::Result<()> {
        w.write_all(head.as_bytes())?;
        w.flush()?;
        if no_body {
            return Ok(());
        }
        let mut reader = body.into_reader();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                if chunked {
                    w.write_all(b"0\r\n\r\n")?;
                }
                return w.flush();
            }
            if chunked {
                w.write_all(format!("{n:x}\r\n").as_bytes())?;
                w.write_all(&buf[..n])?;
                w.write_all(b"\r\n")?;
            } else {
                w.write_all(&buf[..n])?;
            }
            w.flush()?;
        }
    })();
    if let Err(e) = result {
        debug!("standby: relay ended: {e}");
    }
}

/// 503 with the reason, `Retry-After: 1` and who answered.
fn unavailable(fwd: &Forwarder, raw: tiny_http::Request, e: &ForwardError) {
    let body = json!({ "error": e.to_string() }).to_string();
    let mut r = Response::from_string(body).with_status_code(503);
    for (k, v) in [
        ("Content-Type", "application/json"),
        ("Retry-After", "1"),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
        ("X-Aerekos-Forwarded-By", fwd.forwarded_by.as_str()),
    ] {
        if let Ok(h) = Header::from_bytes(k, v) {
            r = r.with_header(h);
        }
    }
    if let Err(e) = raw.respond(r) {
        debug!("standby respond: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_hop_by_hop() {
        let t = connection_tokens(["close, X-Private", " keep-alive"].into_iter());
        assert_eq!(t, vec!["close", "x-private", "keep-alive"]);
        assert!(hop_by_hop("transfer-encoding") && hop_by_hop("upgrade"));
        assert!(!hop_by_hop("set-cookie") && !hop_by_hop("authorization"));
    }

    #[test]
    fn the_longest_stream_outlasts_the_longest_exec() {
        let exec = Duration::from_secs(u64::from(super::super::exec::MAX_TIMEOUT_S))
            + super::super::exec::GRACE;
        assert!(LONGEST_STREAM > exec);
        assert!(HEAD_TIMEOUT > super::super::commands::COMMAND_TIMEOUT);
        assert!(HEAD_TIMEOUT > super::super::logs::FIRST_CHUNK_TIMEOUT);
    }

    #[test]
    fn a_stop_before_standing_by_returns_at_once() {
        let config = Config {
            http_listen: "127.0.0.1:0".into(),
            ..Config::default()
        };
        let s = Standby::start(&config, ActiveUrl::default()).unwrap();
        let t = Instant::now();
        s.stop();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
