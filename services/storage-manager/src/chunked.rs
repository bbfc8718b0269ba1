//! Request body readers that check what SigV4 promised about the payload.
//!
//! * [`Sha256Check`]: the body must hash to the signed `x-amz-content-sha256`;
//!   at the end of the body a mismatch is an error, so the store never
//!   commits it.
//! * [`AwsChunked`]: the `aws-chunked` content encoding
//!   (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]`,
//!   `STREAMING-UNSIGNED-PAYLOAD-TRAILER`): `hex-size[;chunk-signature=sig]
//!   CRLF data CRLF`…, a zero-size chunk, then optional trailer lines and
//!   an empty line. Chunk signatures chain from the request's signature and
//!   are verified at the end of each chunk (data of a bad chunk may already
//!   be staged, but the error comes before the end of the body, so nothing
//!   is committed). Trailer checksums (`x-amz-checksum-*`) are read but not
//!   verified (the signed SHA-256 or chunk signatures and the stored MD5
//!   cover integrity); a signed trailer's `x-amz-trailer-signature` is
//!   verified.
//!
//! Errors are `std::io::Error`s wrapping a [`SigError`] (or `InvalidData`
//! text for framing errors) so the HTTP layer can answer with the right S3
//! code. Limits: a chunk header or trailer line is at most
//! [`MAX_LINE`] bytes, trailers at most [`MAX_TRAILERS`] lines.

use std::io::{BufRead, Read};

use sha2::{Digest, Sha256};

use crate::sigv4::{self, SigError, Verified};

/// Longest chunk header or trailer line.
pub const MAX_LINE: usize = 4096;
/// Most trailer lines.
pub const MAX_TRAILERS: usize = 16;

fn sig_err(e: SigError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

fn framing(msg: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("malformed aws-chunked body: {msg}"),
    )
}

/// Checks the body against a hex SHA-256 at its end.
#[derive(Debug)]
pub struct Sha256Check<R> {
    inner: R,
    hasher: Sha256,
    expected: String,
    done: bool,
}

impl<R> Sha256Check<R> {
    /// Wraps `inner`; `expected` is lower-case hex.
    pub fn new(inner: R, expected: &str) -> Self {
        Sha256Check {
            inner,
            hasher: Sha256::new(),
            expected: expected.to_string(),
            done: false,
        }
    }
}

impl<R: Read> Read for Sha256Check<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.done = true;
            let got = sigv4::hex(&std::mem::take(&mut self.hasher).finalize());
            if !sigv4::ct_eq(got.as_bytes(), self.expected.as_bytes()) {
                return Err(sig_err(SigError::PayloadMismatch));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Decodes an aws-chunked body.
#[derive(Debug)]
pub struct AwsChunked<R> {
    inner: R,
    signing: Option<Verified>,
    trailer: bool,
    previous: String,
    left: u64,
    chunk_sig: Option<String>,
    hasher: Sha256,
    finished: bool,
}

impl<R: BufRead> AwsChunked<R> {
    /// `signing`: the verified request for signed chunks (`None` for
    /// unsigned); `trailer`: trailers follow the last chunk.
    pub fn new(inner: R, signing: Option<Verified>, trailer: bool) -> Self {
        let previous = signing
            .as_ref()
            .map(|v| v.seed_signature.clone())
            .unwrap_or_default();
        AwsChunked {
            inner,
            signing,
            trailer,
            previous,
            left: 0,
            chunk_sig: None,
            hasher: Sha256::new(),
            finished: false,
        }
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        (&mut self.inner)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(framing("a line does not end in CRLF or is too long"));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| framing("a line is not UTF-8"))
    }

    fn end_chunk(&mut self, size_was_zero: bool) -> std::io::Result<()> {
        if let Some(v) = &self.signing {
            let digest = sigv4::hex(&std::mem::take(&mut self.hasher).finalize());
            let expect = sigv4::chunk_signature(v, &self.previous, &digest);
            let got = self.chunk_sig.take().unwrap_or_default();
            if !sigv4::ct_eq(expect.as_bytes(), got.as_bytes()) {
                return Err(sig_err(SigError::Mismatch));
            }
            self.previous = expect;
        }
        if !size_was_zero {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(framing("chunk data not followed by CRLF"));
            }
        }
        Ok(())
    }

    fn next_chunk(&mut self) -> std::io::Result<()> {
        let header = self.line()?;
        let (size, ext) = header.split_once(';').unwrap_or((header.as_str(), ""));
        let size = u64::from_str_radix(size.trim(), 16).map_err(|_| framing("bad chunk size"))?;
        if self.signing.is_some() {
            let sig = ext
                .trim()
                .strip_prefix("chunk-signature=")
                .ok_or_else(|| framing("a signed chunk has no chunk-signature"))?;
            self.chunk_sig = Some(sig.to_ascii_lowercase());
        }
        if size > 0 {
            self.left = size;
            return Ok(());
        }
        self.end_chunk(true)?;
        self.finished = true;
        if self.trailer {
            let mut lines = String::new();
            let mut trailer_sig = None;
            for _ in 0..=MAX_TRAILERS {
                let l = self.line()?;
                if l.is_empty() {
                    if let Some(v) = &self.signing {
                        let expect = sigv4::trailer_signature(v, &self.previous, &lines);
                        let got: String = trailer_sig.unwrap_or_default();
                        if !sigv4::ct_eq(expect.as_bytes(), got.to_ascii_lowercase().as_bytes()) {
                            return Err(sig_err(SigError::Mismatch));
                        }
                    }
                    return Ok(());
                }
                match l.split_once(':') {
                    Some((k, v)) if k.trim() == "x-amz-trailer-signature" => {
                        trailer_sig = Some(v.trim().to_string());
                    }
                    Some((k, v)) => {
                        lines.push_str(&format!("{}:{}\n", k.trim(), v.trim()));
                    }
                    None => return Err(framing("a trailer line is not name:value")),
                }
            }
            return Err(framing("too many trailer lines"));
        }
        // Without trailers the body ends with an empty line.
        let l = self.line()?;
        if !l.is_empty() {
            return Err(framing("data after the last chunk"));
        }
        Ok(())
    }
}

impl<R: BufRead> Read for AwsChunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.finished {
                return Ok(0);
            }
            if self.left == 0 {
                self.next_chunk()?;
                continue;
            }
            let want = (self.left.min(buf.len() as u64)) as usize;
            let n = self.inner.read(&mut buf[..want])?;
            if n == 0 {
                return Err(framing("the body ended inside a chunk"));
            }
            self.left -= n as u64;
            if self.signing.is_some() {
                self.hasher.update(&buf[..n]);
            }
            if self.left == 0 {
                self.end_chunk(false)?;
            }
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

    use super::*;

    fn decode(body: &[u8], signing: Option<Verified>, trailer: bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        AwsChunked::new(std::io::BufReader::new(body), signing, trailer).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn unsigned_trailer_body() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n";
        assert_eq!(decode(body, None, true).unwrap(), b"hello world");
        assert!(decode(b"5\r\nhel", None, true).is_err());
        assert!(decode(b"zz\r\n", None, true).is_err());
        assert!(decode(b"5\r\nhelloXX0\r\n\r\n", None, true).is_err());
    }

    /// The AWS documented example of a signed chunked upload (64 KiB + 1 KiB
    /// of 'a', chunk signatures chained from the seed signature).
    #[test]
    fn aws_documented_signed_chunks() {
        let key = sigv4::signing_key(
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "20130524",
            "us-east-1",
            "s3",
        );
        let v = Verified {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            payload: sigv4::PayloadMode::StreamingSigned { trailer: false },
            seed_signature: "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
                .into(),
            signing_key: key,
            amz_date: "20130524T000000Z".into(),
            scope: "20130524/us-east-1/s3/aws4_request".into(),
        };
        let mut body = Vec::new();
        body.extend_from_slice(b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n");
        body.extend_from_slice(&[b'a'; 65536]);
        body.extend_from_slice(b"\r\n400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n");
        body.extend_from_slice(&[b'a'; 1024]);
        body.extend_from_slice(b"\r\n0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n");
        let out = decode(&body, Some(v.clone()), false).unwrap();
        assert_eq!(out.len(), 66560);
        let mut bad = body.clone();
        bad[200] = b'b';
        let e = decode(&bad, Some(v), false).unwrap_err();
        assert_eq!(
            e.get_ref().and_then(|i| i.downcast_ref::<SigError>()),
            Some(&SigError::Mismatch)
        );
    }

    #[test]
    fn sha256_check() {
        let mut out = Vec::new();
        Sha256Check::new(&b"abc"[..], &sigv4::sha256_hex(b"abc"))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abc");
        let e = Sha256Check::new(&b"abd"[..], &sigv4::sha256_hex(b"abc"))
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("x-amz-content-sha256"), "{e}");
    }
}
