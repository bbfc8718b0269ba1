//! # aerekos http-server
//!
//! The tiny_http server wrapper the conductor (`conductor/src/http/mod.rs`)
//! and the fleet services (`service_runtime::listen`) share: it binds,
//! sets `TCP_NODELAY`, builds the tiny_http [`Server`] (HTTPS and plain
//! HTTP on one port with `Options::tls`, feature `tls`), sets the read
//! timeout and runs a fixed pool of request threads that hand every
//! request to one handler. What a request gets (routing, refusals,
//! headers) is the caller's handler; how failures are logged is the
//! caller's [`Options::report`].
//!
//! **`TCP_NODELAY`**: tiny_http writes answers through a 1 KiB buffer and
//! does not set it, so the tail of any answer over 1 KiB would wait for
//! the client's delayed ACK (~40 ms; 23 requests/s with 4 KiB answers).
//! It is set on the listening socket; Linux hands it down to the accepted
//! sockets. Failing to set it is reported ([`Trouble::NoDelay`]), not an
//! error.
//!
//! **Read timeout** ([`Options::read_timeout`]): a connection that sends
//! nothing for that long (an idle keep-alive connection, a request body
//! that stalls, a TLS handshake that never comes) is closed, so a client
//! cannot hold a thread for good (the vendored tiny_http's
//! `set_read_timeout`, see `vendor/README.md`). Per read: a slow but
//! steady upload is not cut.
//!
//! **Threads**: `threads` (at least one) named `<thread_prefix>-<i>`, each
//! waiting up to [`Options::poll`] for a request before it checks whether
//! the server is stopping. A failed accept (EMFILE, ...) is reported
//! ([`Trouble::Accept`]) and the thread waits [`ACCEPT_BACKOFF`] so a
//! persistent failure does not spin.
//!
//! **Stop**: [`HttpServer::stop`] (or drop) sets the stop flag, unblocks
//! the threads and joins them. Limits: a stop takes up to one poll
//! interval; a request already being answered is finished first, so a
//! handler that never returns blocks the stop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use tiny_http::{Request, Server};

/// Pause after a failed accept, so a persistent failure does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// [`Options::poll`] unless set.
pub const DEFAULT_POLL: Duration = Duration::from_millis(100);

/// Something that went wrong without stopping the server, for the
/// caller's log ([`Options::report`]).
#[derive(Debug)]
pub enum Trouble<'a> {
    /// `TCP_NODELAY` could not be set on the listener: answers over 1 KiB
    /// will be slow.
    NoDelay(&'a std::io::Error),
    /// Accepting a request failed; the thread waits [`ACCEPT_BACKOFF`].
    Accept(&'a std::io::Error),
}

impl std::fmt::Display for Trouble<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trouble::NoDelay(e) => {
                write!(
                    f,
                    "TCP_NODELAY not set ({e}): answers over 1 KiB will be slow"
                )
            }
            Trouble::Accept(e) => write!(f, "accepting a request: {e}"),
        }
    }
}

/// Why a server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The address could not be bound (or the server not built on it:
    /// its text says why).
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server is not bound to an IP address.
    NotIp,
    /// A request thread could not be started.
    Thread(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind { addr, reason } => write!(f, "cannot listen on {addr}: {reason}"),
            StartError::NotIp => f.write_str("not bound to an IP address"),
            StartError::Thread(e) => write!(f, "cannot start a request thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Thread(e) => Some(e),
            _ => None,
        }
    }
}

type Report = Arc<dyn Fn(Trouble<'_>) + Send + Sync>;

/// How to run a server. [`Options::new`] gives one thread, no read
/// timeout, [`DEFAULT_POLL`], plain HTTP, and troubles printed on stderr
/// after the thread prefix.
#[derive(Clone)]
pub struct Options {
    thread_prefix: String,
    threads: usize,
    read_timeout: Option<Duration>,
    poll: Duration,
    #[cfg(feature = "tls")]
    tls: Option<Arc<tiny_http::rustls::ServerConfig>>,
    report: Report,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Options");
        d.field("thread_prefix", &self.thread_prefix)
            .field("threads", &self.threads)
            .field("read_timeout", &self.read_timeout)
            .field("poll", &self.poll);
        #[cfg(feature = "tls")]
        d.field("tls", &self.tls.is_some());
        d.finish_non_exhaustive()
    }
}

impl Options {
    /// Request threads named `<thread_prefix>-<i>`.
    pub fn new(thread_prefix: impl Into<String>) -> Options {
        let thread_prefix = thread_prefix.into();
        let prefix = thread_prefix.clone();
        Options {
            thread_prefix,
            threads: 1,
            read_timeout: None,
            poll: DEFAULT_POLL,
            #[cfg(feature = "tls")]
            tls: None,
            report: Arc::new(move |t| eprintln!("{prefix}: {t}")),
        }
    }

    /// Request threads; at least one runs.
    pub fn threads(mut self, threads: usize) -> Options {
        self.threads = threads;
        self
    }

    /// Closes connections that send nothing for this long (`None`: wait
    /// forever, tiny_http's default).
    pub fn read_timeout(mut self, timeout: Option<Duration>) -> Options {
        self.read_timeout = timeout;
        self
    }

    /// How long a request thread waits for a request before it checks
    /// whether the server is stopping (and so how long a stop can take).
    pub fn poll(mut self, poll: Duration) -> Options {
        self.poll = poll;
        self
    }

    /// HTTPS and plain HTTP on one port: a connection that starts with a
    /// TLS handshake is HTTPS under `config`, anything else plain HTTP
    /// (`Request::secure()` tells them apart). `config` must offer no
    /// ALPN protocol but `http/1.1` (see `Server::from_listener_tls`).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: Arc<tiny_http::rustls::ServerConfig>) -> Options {
        self.tls = Some(config);
        self
    }

    /// Where [`Trouble`]s go (a log line in the caller's style).
    pub fn report(mut self, report: impl Fn(Trouble<'_>) + Send + Sync + 'static) -> Options {
        self.report = Arc::new(report);
        self
    }

    fn server(&self, listener: std::net::TcpListener) -> Result<Server, String> {
        #[cfg(feature = "tls")]
        if let Some(config) = &self.tls {
            return Server::from_listener_tls(listener, config.clone()).map_err(|e| e.to_string());
        }
        Server::from_listener(listener, None).map_err(|e| e.to_string())
    }
}

/// Binds `listen` (`:0` gives an ephemeral port) with `TCP_NODELAY` and
/// builds the tiny_http server on it with `options`' TLS and read timeout;
/// returns it and the bound address. No request thread is started.
pub fn bind(listen: &str, options: &Options) -> Result<(Server, SocketAddr), StartError> {
    let bind_err = |reason: String| StartError::Bind {
        addr: listen.to_string(),
        reason,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(|e| bind_err(e.to_string()))?;
    if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        (options.report)(Trouble::NoDelay(&e));
    }
    let server = options.server(listener).map_err(bind_err)?;
    server.set_read_timeout(options.read_timeout);
    let addr = server.server_addr().to_ip().ok_or(StartError::NotIp)?;
    Ok((server, addr))
}

/// A running server: a pool of request threads over one [`bind`] socket.
/// Stops and joins its threads on [`HttpServer::stop`] or drop.
pub struct HttpServer {
    server: Arc<Server>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds `listen` ([`bind`]) and answers every request with `handler`
    /// (it must respond to the request, or drop it) on the threads of
    /// `options`.
    pub fn start(
        listen: &str,
        options: Options,
        handler: impl Fn(Request) + Send + Sync + 'static,
    ) -> Result<HttpServer, StartError> {
        let (server, addr) = bind(listen, &options)?;
        let handler = Arc::new(handler);
        let mut running = HttpServer {
            server: Arc::new(server),
            addr,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for i in 0..options.threads.max(1) {
            let (server, stop, handler, report) = (
                running.server.clone(),
                running.stop.clone(),
                handler.clone(),
                options.report.clone(),
            );
            let poll = options.poll;
            // On error, dropping `running` stops the threads already started.
            running.threads.push(
                std::thread::Builder::new()
                    .name(format!("{}-{i}", options.thread_prefix))
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            match server.recv_timeout(poll) {
                                Ok(Some(req)) => handler(req),
                                Ok(None) => {}
                                Err(e) => {
                                    report(Trouble::Accept(&e));
                                    std::thread::sleep(ACCEPT_BACKOFF);
                                }
                            }
                        }
                    })
                    .map_err(StartError::Thread)?,
            );
        }
        Ok(running)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops (never, unless a request thread ends).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting, finishes the requests being answered and joins the
    /// threads.
    pub fn stop(self) {}
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.server.unblock();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    /// Sends `request` and reads the answer until the server closes.
    fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn threads_are_named_after_the_prefix_and_answer() {
        let names = Arc::new(Mutex::new(Vec::new()));
        let seen = names.clone();
        let server = HttpServer::start(
            "127.0.0.1:0",
            Options::new("unit-http")
                .threads(3)
                .poll(Duration::from_millis(20)),
            move |req: Request| {
                let name = std::thread::current().name().unwrap_or("").to_string();
                seen.lock().unwrap().push(name.clone());
                let _ = req.respond(tiny_http::Response::from_string(name));
            },
        )
        .unwrap();
        let answer = exchange(
            server.addr(),
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let names = names.lock().unwrap().clone();
        assert_eq!(names.len(), 1);
        assert!(
            ["unit-http-0", "unit-http-1", "unit-http-2"].contains(&names[0].as_str()),
            "{names:?}"
        );
        assert!(answer.ends_with(&names[0]), "{answer}");
        assert!(format!("{server:?}").contains(&server.addr().to_string()));
        server.stop();
    }

    #[test]
    fn a_silent_connection_is_closed_after_the_read_timeout() {
        let server = HttpServer::start(
            "127.0.0.1:0",
            Options::new("unit-idle").read_timeout(Some(Duration::from_millis(200))),
            |req: Request| drop(req),
        )
        .unwrap();
        let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        // Closed by the server (EOF or reset), well before our own timeout.
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn errors_and_troubles_read_as_log_lines() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let Err(err) = bind(&addr, &Options::new("unit")) else {
            panic!("{addr} bound twice");
        };
        assert!(matches!(&err, StartError::Bind { addr: a, .. } if *a == addr));
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{err}"
        );
        let e = std::io::Error::other("boom");
        assert_eq!(Trouble::Accept(&e).to_string(), "accepting a request: boom");
        assert!(Trouble::NoDelay(&e)
            .to_string()
            .starts_with("TCP_NODELAY not set (boom)"));
        let options = Options::new("unit").threads(4);
        assert!(format!("{options:?}").contains("threads: 4"));
    }
}
