//! A minimal blocking HTTP/1.1 client over a unix socket, for the Engine API.
//!
//! One connection per request (`Connection: close`): the engine is local and
//! requests are rare, so keep-alive would only add state. Responses are read
//! with `Content-Length`, `Transfer-Encoding: chunked` or up to EOF; the head
//! is capped at [`MAX_HEAD`] bytes and the body at the caller's cap. The whole
//! exchange (connect, write, read) must finish before one deadline.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::ContainerError;

/// Largest response head (status line and headers), bytes.
pub(super) const MAX_HEAD: usize = 16 * 1024;

/// A response with its body fully read.
#[derive(Debug)]
pub(super) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request to the engine at `socket` and reads the whole answer.
/// A socket that cannot be reached is [`ContainerError::EngineUnavailable`].
pub(super) fn request(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, ContainerError> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|e| ContainerError::EngineUnavailable {
        looked: socket.display().to_string(),
        reason: connect_reason(&e),
    })?;
    let mut conn = Deadlined {
        stream,
        deadline,
        timeout,
    };
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: docker\r\nUser-Agent: aerekos-edge-worker\r\n\
         Connection: close\r\n"
    );
    match body {
        Some(b) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        None if method != "GET" && method != "HEAD" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())
        .map_err(ContainerError::Io)?;
    if let Some(b) = body {
        conn.write_all(b).map_err(ContainerError::Io)?;
    }
    conn.flush().map_err(ContainerError::Io)?;
    read_response(conn, method == "HEAD", max_body)
}

/// Why `connect` failed, in words an operator can act on.
fn connect_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such socket".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied (run the worker as root or in the engine's group, e.g. docker)"
                .into()
        }
        io::ErrorKind::ConnectionRefused => "connection refused (is the engine running?)".into(),
        _ => e.to_string(),
    }
}

/// A stream whose reads and writes all end by one deadline.
struct Deadlined {
    stream: UnixStream,
    deadline: Instant,
    timeout: Duration,
}

impl Deadlined {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        Ok(left)
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the engine did not answer within {} s",
                self.timeout.as_secs_f32()
            ),
        )
    }

    fn map(&self, e: io::Error) -> io::Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(),
            _ => e,
        }
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf).map_err(|e| self.map(e))
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf).map_err(|e| self.map(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A small buffered reader that knows lines, exact lengths and EOF.
struct Input<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> Input<R> {
    fn new(inner: R) -> Self {
        Input {
            inner,
            buf: Vec::with_capacity(8 * 1024),
            pos: 0,
        }
    }

    /// Reads more bytes; `Ok(0)` at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + 8 * 1024, 0);
        let n = loop {
            match self.inner.read(&mut self.buf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(start + *n.as_ref().unwrap_or(&0));
        n
    }

    /// One line without its CRLF (or LF); at most `max` bytes.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, ContainerError> {
        let mut out = Vec::new();
        loop {
            let avail = &self.buf[self.pos..];
            if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                out.extend_from_slice(&avail[..i]);
                self.pos += i + 1;
                if out.last() == Some(&b'\r') {
                    out.pop();
                }
                if out.len() > max {
                    return Err(too_long_line(max));
                }
                return Ok(out);
            }
            out.extend_from_slice(avail);
            self.pos = self.buf.len();
            // `+ 1`: the CR of a CRLF split across reads.
            if out.len() > max.saturating_add(1) {
                return Err(too_long_line(max));
            }
            if self.fill().map_err(ContainerError::Io)? == 0 {
                return Err(ContainerError::Protocol(
                    "the engine closed the connection mid-line".into(),
                ));
            }
        }
    }

    /// Appends exactly `n` bytes to `out`.
    fn exact(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), ContainerError> {
        while n > 0 {
            if self.pos == self.buf.len() && self.fill().map_err(ContainerError::Io)? == 0 {
                return Err(ContainerError::Protocol(
                    "the engine closed the connection before the end of the body".into(),
                ));
            }
            let take = n.min(self.buf.len() - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            n -= take;
        }
        Ok(())
    }

    /// Appends everything up to EOF, failing beyond `max` bytes in `out`.
    fn until_eof(&mut self, out: &mut Vec<u8>, max: usize) -> Result<(), ContainerError> {
        loop {
            out.extend_from_slice(&self.buf[self.pos..]);
            self.pos = self.buf.len();
            if out.len() > max {
                return Err(too_big(max));
            }
            if self.fill().map_err(ContainerError::Io)? == 0 {
                return Ok(());
            }
        }
    }
}

fn too_long_line(max: usize) -> ContainerError {
    ContainerError::Protocol(format!("response line longer than {max} bytes"))
}

fn too_big(max: usize) -> ContainerError {
    ContainerError::Protocol(format!("response body larger than {max} bytes"))
}

/// Parses a whole response from `r`.
pub(super) fn read_response<R: Read>(
    r: R,
    head_only: bool,
    max_body: usize,
) -> Result<Response, ContainerError> {
    let mut input = Input::new(r);
    let mut head_len = 0usize;
    // Informational (1xx) answers precede the real one.
    let (status, chunked, length) = loop {
        let line = input.line(MAX_HEAD)?;
        head_len += line.len() + 2;
        let status = parse_status_line(&line)?;
        let mut chunked = false;
        let mut length: Option<usize> = None;
        loop {
            let h = input.line(MAX_HEAD)?;
            head_len += h.len() + 2;
            if head_len > MAX_HEAD {
                return Err(ContainerError::Protocol(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
            if h.is_empty() {
                break;
            }
            let Some(colon) = h.iter().position(|&b| b == b':') else {
                return Err(ContainerError::Protocol("malformed response header".into()));
            };
            let name = String::from_utf8_lossy(&h[..colon])
                .trim()
                .to_ascii_lowercase();
            let value = String::from_utf8_lossy(&h[colon + 1..]).trim().to_string();
            match name.as_str() {
                "transfer-encoding" => {
                    chunked = value.to_ascii_lowercase().contains("chunked");
                }
                "content-length" => {
                    let n = value.parse::<usize>().map_err(|_| {
                        ContainerError::Protocol(format!("bad Content-Length {value:?}"))
                    })?;
                    length = Some(n);
                }
                _ => {}
            }
        }
        if !(100..200).contains(&status) {
            break (status, chunked, length);
        }
    };
    let mut body = Vec::new();
    if head_only || status == 204 || status == 304 {
        return Ok(Response { status, body });
    }
    if chunked {
        read_chunked(&mut input, &mut body, max_body)?;
    } else if let Some(n) = length {
        if n > max_body {
            return Err(too_big(max_body));
        }
        body.reserve(n);
        input.exact(n, &mut body)?;
    } else {
        input.until_eof(&mut body, max_body)?;
    }
    Ok(Response { status, body })
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &[u8]) -> Result<u16, ContainerError> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split(' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(ContainerError::Protocol(format!(
            "not an HTTP/1.x status line: {:?}",
            text.chars().take(80).collect::<String>()
        )));
    }
    code.parse::<u16>()
        .map_err(|_| ContainerError::Protocol(format!("bad status code {code:?}")))
}

/// Decodes a chunked body into `out`.
fn read_chunked<R: Read>(
    input: &mut Input<R>,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), ContainerError> {
    loop {
        let line = input.line(1024)?;
        let text = String::from_utf8_lossy(&line);
        let size_hex = text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| ContainerError::Protocol(format!("bad chunk size {size_hex:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            let mut trailer_len = 0usize;
            loop {
                let t = input.line(MAX_HEAD)?;
                if t.is_empty() {
                    return Ok(());
                }
                trailer_len += t.len();
                if trailer_len > MAX_HEAD {
                    return Err(ContainerError::Protocol("chunk trailers too large".into()));
                }
            }
        }
        if out.len().saturating_add(size) > max {
            return Err(too_big(max));
        }
        input.exact(size, out)?;
        if !input.line(0)?.is_empty() {
            return Err(ContainerError::Protocol(
                "chunk not followed by CRLF".into(),
            ));
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub(super) fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(raw: &[u8]) -> Result<Response, ContainerError> {
        read_response(raw, false, 64)
    }

    #[test]
    fn content_length_body() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n";
        let r = parse(raw).unwrap();
        assert_eq!(r.body, b"abcdefg");
    }

    #[test]
    fn chunks_split_across_reads() {
        // A reader handing out one byte at a time.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((&b, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = b;
                self.0 = rest;
                Ok(1)
            }
        }
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: Chunked\r\n\r\n\
                    a\r\n0123456789\r\n0\r\n\r\n";
        let r = read_response(Slow(raw), false, 64).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"0123456789"[..]));
    }

    #[test]
    fn body_to_eof_and_no_body_statuses() {
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, b"all of it");
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
    }

    #[test]
    fn oversized_or_broken_responses_are_errors() {
        let big = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n");
        assert!(matches!(big, Err(ContainerError::Protocol(m)) if m.contains("larger")));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n";
        assert!(matches!(parse(raw), Err(ContainerError::Protocol(_))));
        let eof: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";
        let mut long = eof.to_vec();
        long.extend(std::iter::repeat_n(b'x', 65));
        assert!(parse(&long).is_err());
        let short = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        assert!(matches!(short, Err(ContainerError::Protocol(_))));
        assert!(parse(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse(b"").is_err());
        let mut huge_head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..2000 {
            huge_head.extend_from_slice(b"X-Filler: 0123456789\r\n");
        }
        assert!(read_response(huge_head.as_slice(), false, 64).is_err());
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape(r#"{"label":["a=b"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"
        );
        assert_eq!(query_escape("abc-1.2_~"), "abc-1.2_~");
    }
}
