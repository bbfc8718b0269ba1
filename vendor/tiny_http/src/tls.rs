//! aerekos patch: HTTPS and plain HTTP on one listener, see
//! `Server::from_listener_tls` (feature `tls`, rustls 0.23 on ring).
//!
//! The accept thread only accepts, sets the read timeout and duplicates the
//! socket (as for plain connections: out of descriptors it drops the
//! connection and waits, see `RefinedTcpStream::new`). Everything that waits
//! for the client runs on the connection's own task-pool thread
//! ([`Pending::establish`]): a peek at the first byte (0x16, a TLS handshake
//! record, means TLS; anything else is handed to the plain HTTP parser) and
//! the TLS handshake, both bounded by the server's read timeout. A client
//! that sends nothing or stalls mid-handshake holds only its own thread, and
//! only until then.
//!
//! # Locking
//!
//! tiny_http reads a connection through one half and writes it through
//! another, from different threads: the connection's thread reads the next
//! request (pipelining, keep-alive) while a handler writes the previous
//! response, and a handler reads a body and writes `100 Continue` and the
//! response. A rustls connection is one state machine, so both halves share
//! it ([`Shared::conn`]), but neither half holds any lock while it waits on
//! the socket for the client:
//!
//! - each half has its own descriptor (`try_clone`) of the socket;
//! - a read takes `conn` only to take plaintext out or to feed it TLS bytes
//!   it already received; the blocking `read` of the socket is done with no
//!   lock held (the bytes wait in the read half's own buffer);
//! - a write takes `sock` (the write descriptor; it orders records on the
//!   wire), then `conn` just long enough to encrypt into a buffer, releases
//!   `conn` and writes the buffer to the socket holding only `sock`;
//! - TLS records a read makes rustls queue (an alert, a key update) go out
//!   the same way, `sock` then `conn`: one lock order, so no cycle.
//!
//! A reader blocked on a silent client therefore never delays a writer, and
//! a writer blocked on a client that does not read its response delays a
//! reader only once the reader has bytes to process (as the kernel's own
//! buffers would). Upstream's `ssl-rustls` (one `Mutex<StreamOwned>` held
//! across the socket read) had to stop reading the next request until the
//! previous one was answered; this design needs no such rule, TLS
//! connections are served like plain ones.

#[cfg(feature = "tls")]
pub(crate) use self::imp::{Acceptor, Pending, TlsHalf};

/// Without the `tls` feature there is no TLS listener: this type has no
/// value and the accept loop's TLS branch is never taken.
#[cfg(not(feature = "tls"))]
pub(crate) enum Acceptor {}

#[cfg(not(feature = "tls"))]
impl Acceptor {
    pub(crate) fn prepare(
        &self,
        _sock: crate::connection::Connection,
        _read_timeout_ms: u64,
    ) -> std::io::Result<Pending> {
        match *self {}
    }
}

#[cfg(not(feature = "tls"))]
pub(crate) enum Pending {}

#[cfg(not(feature = "tls"))]
impl Pending {
    pub(crate) fn establish(self) -> Option<crate::client::ClientConnection> {
        match self {}
    }
}

#[cfg(feature = "tls")]
mod imp {
    use std::io::{self, ErrorKind, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use rustls::{ServerConfig, ServerConnection};

    use crate::client::ClientConnection;
    use crate::connection::Connection;
    use crate::util::refined_tcp_stream::Stream;
    use crate::util::RefinedTcpStream;

    /// The first byte of a TLS record carrying a handshake message (a
    /// ClientHello). An HTTP request starts with a method's ASCII letter.
    const TLS_HANDSHAKE_RECORD: u8 = 0x16;

    /// Size of a read half's buffer of received TLS bytes: one full record
    /// (16 KiB of payload plus header and tag).
    const READ_BUF: usize = 16 * 1024 + 512;

    /// How long the write half waits to send its `close_notify` when the
    /// connection ends (the client may have stopped reading).
    const CLOSE_NOTIFY_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

    /// Locks, ignoring poisoning: a panic elsewhere must not turn into one
    /// here (the conductor aborts on panic anyway; tests do not).
    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TLS side of a listener that also takes plain HTTP.
    pub(crate) struct Acceptor {
        config: Arc<ServerConfig>,
    }

    impl Acceptor {
        pub(crate) fn new(config: Arc<ServerConfig>) -> Acceptor {
            Acceptor { config }
        }

        /// On the accept thread: no I/O, only the duplicate of the socket
        /// (the error is the accept loop's to handle, as for plain
        /// connections). `read_timeout_ms` is the timeout already set on
        /// the socket, 0 for none.
        pub(crate) fn prepare(&self, sock: Connection, read_timeout_ms: u64) -> io::Result<Pending> {
            let sock = match sock {
                Connection::Tcp(s) => s,
                // `from_listener_tls` takes a TcpListener only.
                #[cfg(unix)]
                Connection::Unix(_) => {
                    return Err(io::Error::new(ErrorKind::Unsupported, "TLS over a Unix socket"))
                }
            };
            let clone = sock.try_clone()?;
            Ok(Pending {
                config: self.config.clone(),
                sock,
                clone,
                accepted: Instant::now(),
                read_timeout: if read_timeout_ms > 0 {
                    Some(Duration::from_millis(read_timeout_ms))
                } else {
                    None
                },
            })
        }
    }

    /// An accepted connection not yet known to be TLS or plain.
    pub(crate) struct Pending {
        config: Arc<ServerConfig>,
        sock: TcpStream,
        clone: TcpStream,
        accepted: Instant,
        read_timeout: Option<Duration>,
    }

    impl Pending {
        /// On the connection's own thread: sniffs the first byte and, for
        /// TLS, completes the handshake, all within the read timeout from
        /// the accept. `None` (logged at debug) closes this connection:
        /// nothing received, a failed handshake, a timeout.
        pub(crate) fn establish(self) -> Option<ClientConnection> {
            // Every request carries its TCP peer (the conductor refuses plain
            // HTTP from non-loopback peers): without one, no request.
            let peer = match self.sock.peer_addr() {
                Ok(peer) => Some(peer),
                Err(e) => {
                    log::debug!("accepted connection without a peer address: {}", e);
                    return None;
                }
            };
            let mut first = [0u8; 1];
            // The accept thread set the read timeout: the peek waits at most
            // that long.
            match self.sock.peek(&mut first) {
                Ok(0) => {
                    log::debug!("{:?} closed before sending anything", peer);
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    log::debug!("{:?} sent nothing: {}", peer, e);
                    return None;
                }
            }

            if first[0] != TLS_HANDSHAKE_RECORD {
                // Plain HTTP, or garbage the HTTP parser answers (400) or
                // drops.
                let (read, write) = RefinedTcpStream::from_halves(
                    Stream::Http(Connection::Tcp(self.clone)),
                    Stream::Http(Connection::Tcp(self.sock)),
                );
                return Some(ClientConnection::new(write, read));
            }

            let Pending {
                config,
                mut sock,
                clone,
                accepted,
                read_timeout,
            } = self;
            let mut conn = match ServerConnection::new(config) {
                Ok(c) => c,
                Err(e) => {
                    log::debug!("{:?}: TLS connection not created: {}", peer, e);
                    return None;
                }
            };
            let deadline = read_timeout.map(|t| accepted + t);
            let res = handshake(&mut conn, &mut sock, deadline);
            // Back to the per-read timeout the handshake shortened.
            let _ = sock.set_read_timeout(read_timeout);
            if let Err(e) = res {
                log::debug!("{:?}: TLS handshake failed: {}", peer, e);
                return None;
            }

            let shared = Arc::new(Shared {
                sock: Mutex::new(sock),
                conn: Mutex::new(conn),
                peer,
            });
            let (read, write) = RefinedTcpStream::from_halves(
                Stream::Tls(TlsHalf {
                    shared: shared.clone(),
                    reader: Some(ReadState {
                        sock: clone,
                        buf: vec![0; READ_BUF].into_boxed_slice(),
                        start: 0,
                        end: 0,
                        eof: false,
                    }),
                }),
                Stream::Tls(TlsHalf {
                    shared,
                    reader: None,
                }),
            );
            Some(ClientConnection::new(write, read))
        }
    }

    /// Runs the handshake to its end on this thread. Each read waits at most
    /// until `deadline`: a client trickling its handshake a byte at a time
    /// cannot stretch it past the read timeout either.
    fn handshake(
        conn: &mut ServerConnection,
        sock: &mut TcpStream,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left < Duration::from_millis(1) {
                    return Err(io::Error::new(ErrorKind::TimedOut, "handshake timed out"));
                }
                sock.set_read_timeout(Some(left))?;
            }
            if conn.read_tls(sock)? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "client closed during the handshake",
                ));
            }
            if let Err(e) = conn.process_new_packets() {
                // Last gasp: the alert rustls queued for this error.
                while conn.wants_write() {
                    if conn.write_tls(sock).is_err() {
                        break;
                    }
                }
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
        }
        // The server's last flight (session tickets).
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        Ok(())
    }

    /// One TLS connection, shared by its read and write halves. Lock order:
    /// `sock`, then `conn`; see the module's doc.
    struct Shared {
        /// The write half's descriptor; held while records go out, so they
        /// go out in the order rustls made them.
        sock: Mutex<TcpStream>,
        /// Never held across a read or write of the socket.
        conn: Mutex<ServerConnection>,
        peer: Option<SocketAddr>,
    }

    impl Shared {
        /// Sends whatever TLS records rustls has queued.
        fn send_pending(&self) -> io::Result<()> {
            let mut sock = lock(&self.sock);
            let out = drain(&mut lock(&self.conn))?;
            sock.write_all(&out)
        }
    }

    /// Takes the queued TLS records out of `conn`.
    fn drain(conn: &mut ServerConnection) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    /// The read half's own socket and the TLS bytes received but not yet
    /// handed to rustls.
    struct ReadState {
        sock: TcpStream,
        buf: Box<[u8]>,
        start: usize,
        end: usize,
        eof: bool,
    }

    /// One half of a TLS connection, as `RefinedTcpStream` splits it: the
    /// read half (with `reader`) only reads, the write half only writes.
    pub(crate) struct TlsHalf {
        shared: Arc<Shared>,
        reader: Option<ReadState>,
    }

    impl TlsHalf {
        pub(crate) fn peer_addr(&self) -> io::Result<Option<SocketAddr>> {
            Ok(self.shared.peer)
        }

        pub(crate) fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
            if let Some(r) = &self.reader {
                return r.sock.shutdown(how);
            }
            // The write half: tell the client the response is complete
            // (best effort, briefly), then half-close.
            let mut sock = lock(&self.shared.sock);
            let out = {
                let mut conn = lock(&self.shared.conn);
                conn.send_close_notify();
                drain(&mut conn)
            };
            if let Ok(out) = out {
                let _ = sock.set_write_timeout(Some(CLOSE_NOTIFY_WRITE_TIMEOUT));
                let _ = sock.write_all(&out);
            }
            sock.shutdown(how)
        }
    }

    impl Read for TlsHalf {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rs = match self.reader.as_mut() {
                Some(rs) => rs,
                None => return Err(io::Error::new(ErrorKind::Unsupported, "write half")),
            };
            loop {
                {
                    let mut conn = lock(&self.shared.conn);
                    match conn.reader().read(buf) {
                        // Plaintext, or the end: `Ok(0)` after the
                        // client's close_notify, `UnexpectedEof` after a
                        // bare TCP close.
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if rs.start < rs.end || rs.eof {
                        // Hand rustls TLS bytes already received (at the
                        // end, an empty slice: the EOF).
                        let mut pending = &rs.buf[rs.start..rs.end];
                        let before = pending.len();
                        let fed = conn.read_tls(&mut pending);
                        rs.start += before - pending.len();
                        fed?;
                        let processed = conn.process_new_packets();
                        let reply = conn.wants_write();
                        drop(conn);
                        if reply {
                            // An alert, a key update: `sock` then `conn`.
                            let sent = self.shared.send_pending();
                            if processed.is_ok() {
                                sent?;
                            }
                        }
                        if let Err(e) = processed {
                            return Err(io::Error::new(ErrorKind::InvalidData, e));
                        }
                        continue;
                    }
                }
                // No lock held while waiting for the client: the write half
                // stays free (see the module's doc).
                let n = rs.sock.read(&mut rs.buf)?;
                rs.start = 0;
                rs.end = n;
                rs.eof = n == 0;
            }
        }
    }

    impl Write for TlsHalf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut sock = lock(&self.shared.sock);
            let (n, out) = {
                let mut conn = lock(&self.shared.conn);
                let n = conn.writer().write(buf)?;
                (n, drain(&mut conn)?)
            };
            sock.write_all(&out)?;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            let mut sock = lock(&self.shared.sock);
            let out = drain(&mut lock(&self.shared.conn))?;
            sock.write_all(&out)?;
            sock.flush()
        }
    }
}

/// aerekos patch: `Server::from_listener` (plain only) as the fleet services
/// use it, with or without the `tls` feature.
#[cfg(test)]
mod plain_tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    #[test]
    fn from_listener_still_serves_plain_http() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = crate::Server::from_listener(listener, None).unwrap();
        let client = thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        });
        let rq = server.recv().unwrap();
        assert!(!rq.secure());
        assert_eq!(rq.url(), "/x");
        rq.respond(crate::Response::from_string("plain")).unwrap();
        let out = client.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{}", out);
        assert!(out.ends_with("plain"), "{}", out);
    }

    /// aerekos patch: `drain_if_closed`. Upstream left the request queued
    /// and the client waiting until its own timeout.
    #[test]
    fn a_request_queued_when_the_server_is_dropped_is_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = crate::Server::from_listener(listener, None).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"GET /queued HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        // Read and queued by its connection thread, never taken by `recv`.
        thread::sleep(std::time::Duration::from_millis(300));
        drop(server);
        let mut out = [0u8; 64];
        let n = s.read(&mut out).expect("an answer, not the client's timeout");
        let head = String::from_utf8_lossy(&out[..n]);
        assert!(head.starts_with("HTTP/1.1 500"), "{}", head);
    }
}

/// aerekos patch: `Server::from_listener_tls`.
#[cfg(all(test, feature = "tls"))]
mod tests {
    use std::convert::TryFrom;
    use std::io::{self, ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned};

    use crate::{Response, Server};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A self-signed certificate for "localhost": the server's config and a
    /// client config that trusts it.
    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Answers each request on its own thread:
    /// - `/big?n=N`: N bytes of a pattern (chunked, tiny_http's default);
    /// - `/echo`: the body's length and byte sum;
    /// - anything else: `secure=… peer=… url=…`.
    fn handle(mut rq: crate::Request) {
        let url = rq.url().to_string();
        if let Some(n) = url.strip_prefix("/big?n=") {
            let n: usize = n.parse().unwrap();
            let _ = rq.respond(Response::from_data(pattern(n)));
        } else if url == "/echo" {
            let mut body = Vec::new();
            rq.as_reader().read_to_end(&mut body).unwrap();
            let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
            let _ = rq.respond(Response::from_string(format!("len={} sum={}", body.len(), sum)));
        } else {
            let text = format!(
                "secure={} peer={} url={}",
                rq.secure(),
                rq.remote_addr().unwrap(),
                url
            );
            let _ = rq.respond(Response::from_string(text));
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    struct TestServer {
        server: Arc<Server>,
        addr: SocketAddr,
        client: Arc<ClientConfig>,
    }

    impl TestServer {
        fn start(read_timeout: Duration) -> TestServer {
            let (server_config, client) = configs();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = Arc::new(Server::from_listener_tls(listener, server_config).unwrap());
            server.set_read_timeout(Some(read_timeout));
            let s = server.clone();
            thread::spawn(move || {
                while let Ok(rq) = s.recv() {
                    thread::spawn(move || handle(rq));
                }
            });
            TestServer {
                server,
                addr,
                client,
            }
        }

        fn tls(&self) -> StreamOwned<ClientConnection, TcpStream> {
            let sock = TcpStream::connect(self.addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let conn = ClientConnection::new(self.client.clone(), name).unwrap();
            StreamOwned::new(conn, sock)
        }

        fn plain(&self) -> TcpStream {
            let sock = TcpStream::connect(self.addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            sock
        }

        /// The first bytes a TLS client sends (its ClientHello record).
        fn client_hello(&self) -> Vec<u8> {
            let name = ServerName::try_from("localhost").unwrap();
            let mut conn = ClientConnection::new(self.client.clone(), name).unwrap();
            let mut hello = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut hello).unwrap();
            }
            assert_eq!(hello[0], 0x16);
            hello
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.server.unblock();
        }
    }

    fn get(url: &str) -> Vec<u8> {
        format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", url).into_bytes()
    }

    /// Reads one response: status and body (Content-Length or chunked).
    fn read_response<R: Read>(r: &mut R) -> io::Result<(u16, Vec<u8>)> {
        let mut head = Vec::new();
        let mut b = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            if r.read(&mut b)? == 0 {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "eof in the head"));
            }
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let status: u16 = head[9..12].parse().unwrap();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                if k.eq_ignore_ascii_case(name) {
                    Some(v.trim().to_string())
                } else {
                    None
                }
            })
        };
        let mut body = Vec::new();
        if header("Transfer-Encoding").map_or(false, |v| v.contains("chunked")) {
            chunked_transfer::Decoder::new(r).read_to_end(&mut body)?;
        } else if let Some(len) = header("Content-Length") {
            body.resize(len.parse().unwrap(), 0);
            r.read_exact(&mut body)?;
        }
        Ok((status, body))
    }

    fn text(body: Vec<u8>) -> String {
        String::from_utf8(body).unwrap()
    }

    /// Waits for the server to close `sock` (EOF or reset); returns what it
    /// had sent before.
    fn read_until_closed(sock: &mut TcpStream) -> Vec<u8> {
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match sock.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("not closed: {}", e),
            }
        }
    }

    #[test]
    fn an_https_get_is_answered_and_secure() {
        let t = TestServer::start(Duration::from_secs(10));
        let mut s = t.tls();
        let local = s.sock.local_addr().unwrap();
        s.write_all(&get("/a")).unwrap();
        let (status, body) = read_response(&mut s).unwrap();
        assert_eq!(status, 200);
        assert_eq!(text(body), format!("secure=true peer={} url=/a", local));
    }

    #[test]
    fn a_plain_get_on_the_same_port_is_answered_and_not_secure() {
        let t = TestServer::start(Duration::from_secs(10));
        let mut s = t.plain();
        let local = s.local_addr().unwrap();
        s.write_all(&get("/p")).unwrap();
        let (status, body) = read_response(&mut s).unwrap();
        assert_eq!(status, 200);
        assert_eq!(text(body), format!("secure=false peer={} url=/p", local));
    }

    #[test]
    fn silent_and_stalled_clients_do_not_delay_others() {
        let t = TestServer::start(Duration::from_secs(30));
        let hello = t.client_hello();
        let mut idle = Vec::new();
        for i in 0..12 {
            let mut s = TcpStream::connect(t.addr).unwrap();
            match i % 3 {
                0 => {}                                            // nothing at all
                1 => s.write_all(&hello[..1]).unwrap(),            // one byte: TLS
                _ => s.write_all(&hello[..hello.len() / 2]).unwrap(), // half a ClientHello
            }
            idle.push(s);
        }
        let started = Instant::now();
        let mut s = t.tls();
        s.write_all(&get("/after")).unwrap();
        let (status, body) = read_response(&mut s).unwrap();
        assert_eq!(status, 200);
        assert!(text(body).starts_with("secure=true"));
        let mut p = t.plain();
        p.write_all(&get("/after")).unwrap();
        assert_eq!(read_response(&mut p).unwrap().0, 200);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "delayed {:?} by idle clients",
            started.elapsed()
        );
    }

    #[test]
    fn a_client_stalled_mid_handshake_is_dropped_after_the_read_timeout() {
        let t = TestServer::start(Duration::from_millis(500));
        let hello = t.client_hello();
        let mut s = TcpStream::connect(t.addr).unwrap();
        let started = Instant::now();
        s.write_all(&hello[..hello.len() / 2]).unwrap();
        read_until_closed(&mut s);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400), "closed after {:?}", took);
        assert!(took < Duration::from_secs(5), "closed after {:?}", took);

        // A client that sends nothing at all is dropped too.
        let mut s = TcpStream::connect(t.addr).unwrap();
        let started = Instant::now();
        assert!(read_until_closed(&mut s).is_empty());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_handshake_trickled_byte_by_byte_is_still_cut_at_the_read_timeout() {
        // Each byte comes well within the per-read timeout; the handshake
        // as a whole may not take longer than it.
        let t = TestServer::start(Duration::from_millis(600));
        let hello = t.client_hello();
        let mut s = TcpStream::connect(t.addr).unwrap();
        let mut w = s.try_clone().unwrap();
        let trickle = thread::spawn(move || {
            for b in hello.iter().take(100) {
                if w.write_all(std::slice::from_ref(b)).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        read_until_closed(&mut s);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "closed after {:?}", took);
        drop(s);
        trickle.join().unwrap();
    }

    #[test]
    fn garbage_is_closed_without_affecting_others() {
        let t = TestServer::start(Duration::from_secs(30));
        let started = Instant::now();

        // Not ASCII: the HTTP parser drops the connection.
        let mut s = t.plain();
        s.write_all(b"\x00\x01\xfe\xff\r\n\r\n").unwrap();
        let out = read_until_closed(&mut s);
        assert!(!out.starts_with(b"HTTP/1.1 200"));

        // ASCII, not HTTP: 400.
        let mut s = t.plain();
        s.write_all(b"HELLO THERE\r\n\r\n").unwrap();
        let out = read_until_closed(&mut s);
        assert!(out.starts_with(b"HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&out));

        // A TLS record type, then garbage: the handshake fails.
        let mut s = t.plain();
        s.write_all(b"\x16\x03\x01\x00\x10garbage-garbage!").unwrap();
        read_until_closed(&mut s);

        // A TLS record that is not a handshake at all.
        let mut s = t.plain();
        s.write_all(&[0x16; 64]).unwrap();
        read_until_closed(&mut s);

        assert!(started.elapsed() < Duration::from_secs(10), "closed only at the timeout");

        let mut s = t.tls();
        s.write_all(&get("/still")).unwrap();
        assert_eq!(text(read_response(&mut s).unwrap().1).split(' ').next(), Some("secure=true"));
        let mut p = t.plain();
        p.write_all(&get("/still")).unwrap();
        assert_eq!(read_response(&mut p).unwrap().0, 200);
    }

    #[test]
    fn keep_alive_serves_two_requests_on_one_tls_connection() {
        let t = TestServer::start(Duration::from_secs(10));
        let mut s = t.tls();
        let local = s.sock.local_addr().unwrap();
        for url in ["/one", "/two"] {
            s.write_all(&get(url)).unwrap();
            let (status, body) = read_response(&mut s).unwrap();
            assert_eq!(status, 200);
            assert_eq!(text(body), format!("secure=true peer={} url={}", local, url));
        }
    }

    #[test]
    fn pipelined_tls_requests_are_answered_in_order() {
        let t = TestServer::start(Duration::from_secs(10));
        let mut s = t.tls();
        let mut all = Vec::new();
        for url in ["/1", "/2", "/3"] {
            all.extend_from_slice(&get(url));
        }
        s.write_all(&all).unwrap();
        for url in ["/1", "/2", "/3"] {
            let body = text(read_response(&mut s).unwrap().1);
            assert!(body.ends_with(&format!(" url={}", url)), "{}", body);
        }
    }

    #[test]
    fn a_response_larger_than_one_mib_arrives_intact_over_tls() {
        // A long read timeout: the connection's thread waits in a read for
        // the next request (keep-alive) while the handler writes. A lock
        // held across that read would stall the response until it expired.
        let t = TestServer::start(Duration::from_secs(60));
        let started = Instant::now();
        let mut s = t.tls();
        let n = 3 * 1024 * 1024 + 17;
        s.write_all(&get(&format!("/big?n={}", n))).unwrap();
        let (status, body) = read_response(&mut s).unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.len(), n);
        assert!(body == pattern(n), "body corrupted");
        // The same connection still serves.
        s.write_all(&get("/next")).unwrap();
        assert_eq!(read_response(&mut s).unwrap().0, 200);
        assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    }

    #[test]
    fn a_large_upload_with_100_continue_over_tls() {
        let t = TestServer::start(Duration::from_secs(60));
        let mut s = t.tls();
        let body = pattern(2 * 1024 * 1024 + 5);
        let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
        s.write_all(
            format!(
                "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let (status, _) = read_response(&mut s).unwrap();
        assert_eq!(status, 100);
        s.write_all(&body).unwrap();
        let (status, reply) = read_response(&mut s).unwrap();
        assert_eq!(status, 200);
        assert_eq!(text(reply), format!("len={} sum={}", body.len(), sum));
    }

    #[test]
    fn unblock_and_drop_stop_a_tls_server() {
        let (server_config, _) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Server::from_listener_tls(listener, server_config).unwrap());
        let s = server.clone();
        let waiter = thread::spawn(move || s.recv().is_err());
        thread::sleep(Duration::from_millis(100));
        server.unblock();
        assert!(waiter.join().unwrap(), "recv() was not unblocked");

        drop(Arc::try_unwrap(server).ok().unwrap());
        let started = Instant::now();
        loop {
            if TcpStream::connect(addr).is_err() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "still listening");
            thread::sleep(Duration::from_millis(50));
        }
    }
}
