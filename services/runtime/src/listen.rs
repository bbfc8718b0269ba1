//! Binding and running a tiny_http server that answers promptly, on the
//! wrapper the conductor shares ([`http_server`]).
//!
//! The listening socket gets `TCP_NODELAY` (why: [`http_server`]'s docs;
//! a service that cannot set it says so on stderr).
//!
//! Connections that send nothing for [`READ_TIMEOUT`] are closed (the
//! vendored tiny_http's `set_read_timeout`, see `vendor/README.md`).
//!
//! [`HttpServer`] runs a fixed pool of request threads over one such
//! socket. Limits: a stop takes up to [`POLL`] (each thread polls the stop
//! flag between requests); a request already being answered is finished
//! first, so a handler that never returns blocks the stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_server::{StartError, Trouble};

/// How long a request thread waits for a request before checking whether
/// the server is stopping.
pub const POLL: Duration = Duration::from_millis(500);
/// How long a connection may go without sending a byte the server waits
/// for (an idle keep-alive connection, a request body that stalls) before
/// it is closed: a client cannot hold a request thread for good. Per read,
/// so a slow but steady upload is not cut.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub struct BindError {
    /// The address asked for.
    pub addr: String,
    /// Why.
    pub reason: String,
}

/// Why an [`HttpServer`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A request thread could not be started.
    #[error("cannot start a request thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// `e`, from [`http_server`] for `listen`, as a [`BindError`] (a failed
/// thread, which binding alone never gives, by its text).
fn bind_error(listen: &str, e: StartError) -> BindError {
    let reason = match e {
        StartError::Bind { reason, .. } => reason,
        StartError::NotIp => "not an IP address".into(),
        StartError::Thread(e) => e.to_string(),
    };
    BindError {
        addr: listen.to_string(),
        reason,
    }
}

/// A service's server options: [`READ_TIMEOUT`], [`POLL`], threads named
/// `<thread_prefix>-<i>`, troubles on stderr prefixed with `service`.
fn options(service: &str, thread_prefix: &str) -> http_server::Options {
    let service = service.to_string();
    http_server::Options::new(thread_prefix)
        .read_timeout(Some(READ_TIMEOUT))
        .poll(POLL)
        .report(move |t| match t {
            Trouble::NoDelay(e) => {
                eprintln!("{service}: TCP_NODELAY not set ({e}): answers over 1 KiB will be slow")
            }
            Trouble::Accept(e) => eprintln!("{service}: accepting a request: {e}"),
        })
}

/// Binds `listen` with `TCP_NODELAY` and wraps it in a tiny_http server;
/// returns the server and the bound address (`:0` gives an ephemeral port).
/// `service` prefixes the warning printed if the option cannot be set.
pub fn bind_nodelay(
    service: &str,
    listen: &str,
) -> Result<(tiny_http::Server, SocketAddr), BindError> {
    http_server::bind(listen, &options(service, service)).map_err(|e| bind_error(listen, e))
}

/// Answers one request (it must respond to it, or drop it).
pub type RequestHandler = Arc<dyn Fn(tiny_http::Request) + Send + Sync>;

/// A running server: `threads` request threads over one
/// [`bind_nodelay`] socket. Stops and joins its threads on
/// [`HttpServer::stop`] or drop.
pub struct HttpServer(http_server::HttpServer);

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.0.addr())
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `listen` and answers requests with `handler` on `threads`
    /// threads (at least one) named `<thread_prefix>-<i>`. `service`
    /// prefixes log lines (failed accepts, see [`bind_nodelay`]).
    pub fn start(
        service: &'static str,
        thread_prefix: &str,
        listen: &str,
        threads: usize,
        handler: RequestHandler,
    ) -> Result<HttpServer, ServeError> {
        let options = options(service, thread_prefix).threads(threads);
        http_server::HttpServer::start(listen, options, move |req| handler(req))
            .map(HttpServer)
            .map_err(|e| match e {
                StartError::Thread(e) => ServeError::Thread(e),
                e => ServeError::Bind(bind_error(listen, e)),
            })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr()
    }

    /// Blocks until the server stops (never, unless a request thread ends).
    pub fn wait(self) {
        self.0.wait();
    }

    /// Stops and joins the threads.
    pub fn stop(self) {
        self.0.stop();
    }
}

/// The `Authorization: Bearer <token>` token of `req` (scheme matched
/// without regard to case, token trimmed); `None` without one.
pub fn bearer_token(req: &tiny_http::Request) -> Option<String> {
    let v = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .map(|h| h.value.as_str())?
        .trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// Answers `req` with `body` as JSON, status `code`, `Cache-Control:
/// no-store`; a 401 also names the bearer `realm` in `WWW-Authenticate`.
/// A client gone before the answer is not an error here.
pub fn respond_json(req: tiny_http::Request, code: u16, body: &serde_json::Value, realm: &str) {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = tiny_http::Response::from_data(bytes).with_status_code(code);
    for (k, v) in [
        ("Content-Type", "application/json"),
        ("Cache-Control", "no-store"),
    ] {
        if let Ok(h) = tiny_http::Header::from_bytes(k, v) {
            resp.add_header(h);
        }
    }
    if code == 401 {
        let challenge = format!("Bearer realm=\"{realm}\"");
        if let Ok(h) = tiny_http::Header::from_bytes("WWW-Authenticate", challenge) {
            resp.add_header(h);
        }
    }
    let _ = req.respond(resp);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn echo_path(count: Arc<AtomicUsize>) -> RequestHandler {
        Arc::new(move |req: tiny_http::Request| {
            count.fetch_add(1, Ordering::SeqCst);
            let body = format!("path={}", req.url());
            let _ = req.respond(tiny_http::Response::from_string(body).with_status_code(201));
        })
    }

    #[test]
    fn serves_requests_with_the_handler_on_an_ephemeral_port() {
        let count = Arc::new(AtomicUsize::new(0));
        let server = HttpServer::start(
            "test",
            "test-http",
            "127.0.0.1:0",
            2,
            echo_path(count.clone()),
        )
        .unwrap();
        assert_ne!(server.addr().port(), 0);
        for i in 0..5 {
            let answer = get(server.addr(), &format!("/p{i}"));
            assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
            assert!(answer.ends_with(&format!("path=/p{i}")), "{answer}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 5);
        assert!(format!("{server:?}").contains(&server.addr().to_string()));
    }

    #[test]
    fn zero_threads_still_runs_one() {
        let count = Arc::new(AtomicUsize::new(0));
        let server = HttpServer::start(
            "test",
            "test-http",
            "127.0.0.1:0",
            0,
            echo_path(count.clone()),
        )
        .unwrap();
        assert!(get(server.addr(), "/one").ends_with("path=/one"));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn after_stop_no_request_is_answered() {
        let count = Arc::new(AtomicUsize::new(0));
        let server = HttpServer::start(
            "test",
            "test-http",
            "127.0.0.1:0",
            3,
            echo_path(count.clone()),
        )
        .unwrap();
        let addr = server.addr();
        assert!(get(addr, "/before").ends_with("path=/before"));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Returns only once every request thread has been joined.
        server.stop();
        let answered = std::net::TcpStream::connect(addr).ok().and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
                .ok()?;
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                _ => None,
            }
        });
        // No handler count check after the stop: on a shared machine another
        // process's client may reach the freed port; an answer is what
        // would show that the server still serves.
        assert_eq!(answered, None);
    }

    #[test]
    fn a_taken_address_is_a_bind_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = HttpServer::start(
            "test",
            "test-http",
            &addr,
            1,
            echo_path(Arc::new(AtomicUsize::new(0))),
        )
        .unwrap_err();
        assert!(matches!(err, ServeError::Bind(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{err}"
        );
    }

    #[test]
    fn an_unparsable_address_is_a_bind_error() {
        let err = HttpServer::start(
            "test",
            "test-http",
            "not an address",
            1,
            echo_path(Arc::new(AtomicUsize::new(0))),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot listen on not an address: "),
            "{err}"
        );
    }

    fn raw(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn bearer_tokens_and_json_answers() {
        let handler: RequestHandler = Arc::new(|req: tiny_http::Request| {
            let token = bearer_token(&req);
            let code = if token.is_some() { 200 } else { 401 };
            respond_json(
                req,
                code,
                &serde_json::json!({ "token": token }),
                "test-realm",
            );
        });
        let server = HttpServer::start("test", "test-http", "127.0.0.1:0", 1, handler).unwrap();
        let ask = |auth: &str| {
            raw(
                server.addr(),
                &format!("GET / HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
            )
        };
        let ok = ask("Authorization:   bEaReR  tok-1  \r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("Content-Type: application/json"), "{ok}");
        assert!(ok.contains("Cache-Control: no-store"), "{ok}");
        assert!(!ok.contains("WWW-Authenticate"), "{ok}");
        assert!(ok.ends_with(r#"{"token":"tok-1"}"#), "{ok}");
        for auth in [
            "",
            "Authorization: Basic abc\r\n",
            "Authorization: Bearer\r\n",
        ] {
            let refused = ask(auth);
            assert!(refused.starts_with("HTTP/1.1 401"), "{auth:?}: {refused}");
            assert!(
                refused.contains(r#"WWW-Authenticate: Bearer realm="test-realm""#),
                "{refused}"
            );
            assert!(refused.ends_with(r#"{"token":null}"#), "{refused}");
        }
    }
}
