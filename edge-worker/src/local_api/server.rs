//! The local API's HTTP/1.1 server: just enough of RFC 9112 for hosted
//! services (curl, the HTTP client of any language) on loopback to make one
//! request per connection. Hand-written over [`std::net`] because a general
//! server crate costs the agent ~100 KiB it does not have.
//!
//! Limits and behaviour:
//! * One request per connection; every answer says `Connection: close`.
//! * The head (request line, header lines and their line ends) is at most
//!   [`MAX_HEAD`] bytes with at most [`MAX_HEADERS`] fields, else 431. Lines
//!   end in CRLF or a bare LF; folded (obsolete) header lines, malformed
//!   request lines and bad `Content-Length` values are 400; a version other
//!   than HTTP/1.0 or 1.1 is 505.
//! * Bodies only with `Content-Length` ([`Conn::read_body`]): any
//!   `Transfer-Encoding` or no length is 411, over the caller's cap 413.
//!   `Expect: 100-continue` is answered.
//! * The whole request (head and body) must arrive within the server's
//!   timeout of the connection being accepted; each write of the answer has
//!   the same timeout. A client that sends nothing in time is closed without
//!   an answer; one that stalls or closes mid-request gets 400.
//! * `threads` threads accept on the one listener and each serves one
//!   connection at a time, so a stalled client holds a thread for at most
//!   the timeout while the others go on serving.
//! * After an answer given before the request was read to its end (an
//!   error, or a body that was not needed), the write side is shut and up to
//!   [`LINGER_BYTES`] are drained for at most [`LINGER`] so that the client
//!   reads the answer rather than a connection reset.
//! * [`Server::stop`] sets a flag, shuts the read side of every open
//!   connection (a blocked read ends at once; an answer being written still
//!   goes out), wakes each accepting thread by connecting to the listener,
//!   and joins the threads.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{ApiError, MAX_HEAD, MAX_HEADERS};

/// Longest wait for the client to finish sending after an early answer.
const LINGER: Duration = Duration::from_millis(500);
/// Most bytes drained after an early answer.
const LINGER_BYTES: usize = 64 * 1024;
/// Longest wait for a wake-up connection to the listener on stop.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// State the accepting threads share.
struct Shared {
    listener: TcpListener,
    stop: AtomicBool,
    /// Per thread, a handle on the connection it serves (shut on stop).
    open: Mutex<Vec<Option<TcpStream>>>,
    timeout: Duration,
}

impl Shared {
    /// A poisoned lock only means a thread panicked; the slots stay valid.
    fn open(&self) -> MutexGuard<'_, Vec<Option<TcpStream>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running server. Stops on [`Server::stop`] or drop.
pub(super) struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` on `threads` threads (at least one), calling
    /// `handler` once per accepted connection with `timeout` as the request
    /// deadline.
    pub(super) fn start<F>(
        listener: TcpListener,
        threads: usize,
        timeout: Duration,
        handler: F,
    ) -> io::Result<Server>
    where
        F: Fn(&mut Conn) + Send + Sync + 'static,
    {
        let addr = listener.local_addr()?;
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            listener,
            stop: AtomicBool::new(false),
            open: Mutex::new((0..threads).map(|_| None).collect()),
            timeout,
        });
        let handler = Arc::new(handler);
        let mut server = Server {
            shared,
            addr,
            threads: Vec::with_capacity(threads),
        };
        for slot in 0..threads {
            let (shared, handler) = (server.shared.clone(), handler.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("local-api-{slot}"))
                .stack_size(256 * 1024)
                .spawn(move || accept_loop(&shared, slot, &*handler));
            match spawned {
                Ok(t) => server.threads.push(t),
                Err(e) => {
                    server.stop();
                    return Err(e);
                }
            }
        }
        Ok(server)
    }

    /// The bound address.
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends reads in progress and joins the threads;
    /// `false` if already stopped. If a thread cannot be woken (connecting
    /// to the listener fails), the threads are left to end on their own.
    pub(super) fn stop(&mut self) -> bool {
        if self.threads.is_empty() {
            return false;
        }
        {
            // Under the lock the threads register under: a connection is
            // either seen here or sees the flag.
            let open = self.shared.open();
            self.shared.stop.store(true, Ordering::SeqCst);
            for s in open.iter().flatten() {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        let wake = wake_addr(self.addr);
        let mut woken = true;
        for _ in 0..self.threads.len() {
            if let Err(e) = TcpStream::connect_timeout(&wake, WAKE_TIMEOUT) {
                tracing::warn!("local API stop: cannot wake the accepting threads: {e}");
                woken = false;
                break;
            }
        }
        let threads = std::mem::take(&mut self.threads);
        if woken {
            for t in threads {
                let _ = t.join();
            }
        }
        true
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where to connect to wake a thread blocked in `accept`.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn accept_loop(shared: &Shared, slot: usize, handler: &dyn Fn(&mut Conn)) {
    while !shared.stop.load(Ordering::SeqCst) {
        let stream = match shared.listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, an aborted handshake: wait, go on.
                tracing::warn!("local API accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        {
            let mut open = shared.open();
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            if let Some(s) = open.get_mut(slot) {
                *s = stream.try_clone().ok();
            }
        }
        let mut conn = Conn::new(stream, shared.timeout);
        handler(&mut conn);
        conn.finish();
        if let Some(s) = shared.open().get_mut(slot) {
            *s = None;
        }
    }
}

/// One accepted connection: read the head, maybe the body, answer once.
pub(super) struct Conn {
    stream: TcpStream,
    /// Bytes read so far: the head, then possibly (part of) the body.
    buf: Vec<u8>,
    /// Of `buf`, the bytes consumed (the head, a body taken).
    used: usize,
    deadline: Instant,
    timeout: Duration,
    /// The request was read to its end: closing needs no linger.
    complete: bool,
}

/// A parsed request head. No `Debug`: headers carry the bearer token.
pub(super) struct Head {
    /// As sent (case-sensitive), e.g. `GET`.
    pub method: String,
    /// The request target as sent, e.g. `/v1/secrets/a%20b?x=1`.
    pub target: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) length: Option<usize>,
    /// A `Transfer-Encoding` header was sent.
    encoded: bool,
    expect_continue: bool,
}

impl Head {
    /// The first header named `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Conn {
    fn new(stream: TcpStream, timeout: Duration) -> Conn {
        // Without a write timeout a client that never reads could hold the
        // thread; failure here only loses that bound.
        let _ = stream.set_write_timeout(Some(timeout));
        Conn {
            stream,
            buf: Vec::new(),
            used: 0,
            deadline: Instant::now() + timeout,
            timeout,
            complete: false,
        }
    }

    /// Reads and parses the request head. `Ok(None)`: the client closed or
    /// timed out without sending a byte (nothing to answer).
    pub fn read_head(&mut self) -> Result<Option<Head>, ApiError> {
        let mut scanned = 0;
        let end = loop {
            if let Some(end) = head_end(&self.buf, scanned) {
                break end;
            }
            scanned = self.buf.len().saturating_sub(2);
            if self.buf.len() >= MAX_HEAD {
                return Err(ApiError::new(
                    431,
                    format!("request head over {MAX_HEAD} bytes"),
                ));
            }
            match self.fill(MAX_HEAD) {
                Ok(n) if n > 0 => {}
                Ok(_) if self.buf.is_empty() => {
                    self.complete = true;
                    return Ok(None);
                }
                Err(e) if self.buf.is_empty() && e.kind() == io::ErrorKind::TimedOut => {
                    self.complete = true;
                    return Ok(None);
                }
                other => return Err(self.read_error("reading the request head", other)),
            }
        };
        let head = parse_head(&self.buf[..end])?;
        self.used = end;
        self.complete =
            !head.encoded && head.length.unwrap_or(0) == 0 && self.buf.len() == self.used;
        Ok(Some(head))
    }

    /// Reads the body `head` announces: `Content-Length` only (else 411),
    /// at most `max` bytes (else 413), within the request deadline (else
    /// 400, as for a connection closed early).
    pub fn read_body(&mut self, head: &Head, max: usize) -> Result<Vec<u8>, ApiError> {
        if head.encoded {
            return Err(ApiError::new(
                411,
                "Transfer-Encoding is not supported: send the body with Content-Length",
            ));
        }
        let Some(len) = head.length else {
            return Err(ApiError::new(411, "Content-Length required"));
        };
        if len > max {
            return Err(ApiError::new(413, format!("request body over {max} bytes")));
        }
        if head.expect_continue && len > 0 && self.buf.len() == self.used {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|e| ApiError::new(400, format!("writing 100 Continue: {e}")))?;
        }
        let end = self.used + len;
        while self.buf.len() < end {
            let got = self.buf.len() - self.used;
            match self.fill(end) {
                Ok(n) if n > 0 => {}
                Ok(_) => {
                    return Err(ApiError::new(
                        400,
                        format!(
                            "reading the body: the connection closed after {got} of {len} bytes"
                        ),
                    ))
                }
                other => return Err(self.read_error("reading the body", other)),
            }
        }
        let body = self.buf[self.used..end].to_vec();
        self.used = end;
        self.complete = self.buf.len() == end;
        Ok(body)
    }

    /// Writes the one answer: `code`, a JSON `body`, `Connection: close`.
    /// A client gone meanwhile is only logged.
    pub fn respond(&mut self, code: u16, body: &[u8]) {
        let mut out = format!(
            "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\n\
             Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            reason(code),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        if let Err(e) = self.stream.write_all(&out) {
            tracing::debug!("local API response: {e}");
        }
    }

    /// Reads more into `buf`, up to `cap` bytes in all (`cap > buf.len()`),
    /// within the deadline; `Ok(0)` at EOF.
    fn fill(&mut self, cap: usize) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let start = self.buf.len();
        self.buf.resize(cap.max(start + 1), 0);
        let read = loop {
            match self.stream.read(&mut self.buf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(start + *read.as_ref().unwrap_or(&0));
        read.map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }

    /// 400 for a read that ended the request early.
    fn read_error(&self, what: &str, r: io::Result<usize>) -> ApiError {
        let why = match r {
            Ok(_) => "the connection closed".to_string(),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => format!(
                "the request did not arrive within {} s",
                self.timeout.as_secs_f32()
            ),
            Err(e) => e.to_string(),
        };
        ApiError::new(400, format!("{what}: {why}"))
    }

    /// Closes; after an early answer, first lets the client finish sending
    /// (bounded) so the answer is not lost to a reset.
    fn finish(mut self) {
        if self.complete || self.stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        self.deadline = Instant::now() + LINGER;
        let mut drained = 0;
        while drained < LINGER_BYTES {
            self.buf.clear();
            match self.fill(16 * 1024) {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

/// The end of the head (just past its empty line) if `buf` holds it;
/// `from` skips bytes already scanned.
pub(super) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a complete head (ending in its empty line).
pub(super) fn parse_head(raw: &[u8]) -> Result<Head, ApiError> {
    let bad = |msg: &str| ApiError::new(400, msg);
    let mut lines = raw
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if method.is_empty()
        || !method.iter().all(|&b| is_tchar(b))
        || target.is_empty()
        || !target.iter().all(u8::is_ascii_graphic)
    {
        return Err(bad("malformed request line"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(if version.starts_with(b"HTTP/") {
            ApiError::new(505, "only HTTP/1.0 and HTTP/1.1 are served")
        } else {
            bad("malformed request line")
        });
    }
    let mut head = Head {
        // Checked ASCII above.
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        headers: Vec::new(),
        length: None,
        encoded: false,
        expect_continue: false,
    };
    for line in lines {
        if line.is_empty() {
            break;
        }
        if head.headers.len() == MAX_HEADERS {
            return Err(ApiError::new(
                431,
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad("folded header lines are not supported"));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(bad("malformed header line"));
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(bad("malformed header name"));
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        if name.eq_ignore_ascii_case("content-length") {
            // Digits only; a number too big for usize is simply too big.
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("bad Content-Length"));
            }
            let n = value.parse().unwrap_or(usize::MAX);
            if head.length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            head.length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.encoded = true;
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
        head.headers.push((name, value));
    }
    Ok(head)
}

/// Reason phrases of the statuses the local API answers with.
fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn head(raw: &[u8]) -> Result<Head, u16> {
        let end = head_end(raw, 0).ok_or(0u16)?;
        parse_head(&raw[..end]).map_err(|e| e.0)
    }

    #[test]
    fn heads_parse_with_crlf_or_lf() {
        let h = head(b"POST /v1/events?x=1 HTTP/1.1\r\nHost: a\r\ncontent-length:  12 \r\nAuthorization: Bearer t\r\n\r\nbody").unwrap();
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("POST", "/v1/events?x=1")
        );
        assert_eq!(h.length, Some(12));
        assert_eq!(h.header("authorization"), Some("Bearer t"));
        assert!(!h.encoded && !h.expect_continue);
        let h =
            head(b"GET / HTTP/1.0\nExpect: 100-Continue\nTransfer-Encoding: chunked\n\n").unwrap();
        assert!(h.encoded && h.expect_continue);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nxyz", 0), Some(18));
    }

    #[test]
    fn bad_heads_are_refused() {
        for (raw, code) in [
            (&b"GET /  HTTP/1.1\r\n\r\n"[..], 400),
            (b"GET / HTTP/1.1 x\r\n\r\n", 400),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
            (b"G(T / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2\r\n\r\n", 505),
            (b"\x16\x03\x01 / x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nA b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nA : b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", 400),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
        ] {
            assert_eq!(
                head(raw).err(),
                Some(code),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let huge = head(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert_eq!(huge.unwrap().length, Some(usize::MAX));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(head(&many).err(), Some(431));
    }

    /// A server with a short timeout echoing what it read, or the error.
    fn echo(timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Server::start(listener, 1, timeout, |conn: &mut Conn| {
            let out = match conn.read_head() {
                Ok(None) => return,
                Ok(Some(h)) if h.method == "POST" => conn.read_body(&h, 64),
                Ok(Some(h)) => Ok(h.target.into_bytes()),
                Err(e) => Err(e),
            };
            match out {
                Ok(b) => conn.respond(200, &b),
                Err(e) => conn.respond(e.0, e.1.as_bytes()),
            }
        })
        .unwrap()
    }

    fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        if half_close {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn bodies_by_length_with_continue_and_early_answers() {
        let mut server = echo(Duration::from_secs(5));
        let addr = server.addr();
        let out = exchange(
            addr,
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            false,
        );
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"));
        assert!(out.ends_with("\r\n\r\nhello"), "{out}");

        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 25];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"ok").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 ") && out.ends_with("ok"),
            "{out}"
        );

        for (req, code) in [
            (&b"POST / HTTP/1.1\r\n\r\n"[..], "411"),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                "411",
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n", "413"),
            (b"GET / HTTP/2\r\n\r\n", "505"),
        ] {
            let out = exchange(addr, req, false);
            assert!(out.starts_with(&format!("HTTP/1.1 {code} ")), "{out}");
        }
        // An early answer while the client is still sending: the client
        // reads the answer, not a reset.
        let mut big = b"POST / HTTP/1.1\r\nContent-Length: 40000\r\n\r\n".to_vec();
        big.resize(big.len() + 40_000, b'x');
        let out = exchange(addr, &big, false);
        assert!(out.starts_with("HTTP/1.1 413 "), "{out}");
        assert!(server.stop());
        assert!(!server.stop());
    }

    #[test]
    fn short_bodies_are_400_on_eof_or_after_the_timeout() {
        let server = echo(Duration::from_millis(300));
        let started = Instant::now();
        let out = exchange(
            server.addr(),
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            true,
        );
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains("closed after 3 of 10 bytes"), "{out}");
        assert!(started.elapsed() < Duration::from_millis(300));

        let started = Instant::now();
        let out = exchange(
            server.addr(),
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            false,
        );
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains("did not arrive within"), "{out}");
        assert!(started.elapsed() >= Duration::from_millis(250));

        // Half a head, then silence: 400 too; nothing at all: closed quietly.
        let out = exchange(server.addr(), b"GET / HTTP/1.1\r\nHost:", false);
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert_eq!(exchange(server.addr(), b"", false), "");
        let out = exchange(server.addr(), b"GET /still-serving HTTP/1.1\r\n\r\n", false);
        assert!(out.ends_with("/still-serving"), "{out}");
    }

    #[test]
    fn stop_wakes_an_idle_connection_and_the_acceptor() {
        let mut server = echo(Duration::from_secs(30));
        let addr = server.addr();
        // The only thread is blocked reading this silent client.
        let mut idle = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        assert!(server.stop());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        // Closed without an answer (EOF, or a reset on some kernels).
        let _ = idle.read_to_end(&mut out);
        assert!(out.is_empty());
        drop(server);
        assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
        assert_eq!(
            wake_addr("0.0.0.0:9".parse().unwrap()),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(
            wake_addr("[::]:9".parse().unwrap()),
            "[::1]:9".parse().unwrap()
        );
    }
}
