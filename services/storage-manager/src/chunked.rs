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
//!   is committed). A signed trailer's `x-amz-trailer-signature` is
//!   verified.
//! * [`BodyDigest`] / [`ChecksumCheck`]: `x-amz-checksum-crc32`,
//!   `-crc32c`, `-sha1` and `-sha256`, sent as a header or as an aws-chunked
//!   trailer, are verified against the decoded body (a mismatch is a
//!   [`ChecksumMismatch`], S3's `BadDigest`). `Content-MD5` on PUT and
//!   UploadPart is checked by the store against the MD5 it computes for the
//!   ETag (`Store::put_object_md5`, the same `ChecksumMismatch`), so the
//!   body is hashed with MD5 once. CRC64NVME is
//!   accepted unverified: the signed SHA-256 or chunk signatures and the
//!   stored MD5 still cover the body, except for
//!   `STREAMING-UNSIGNED-PAYLOAD-TRAILER` with such a checksum.
//!
//! Errors are `std::io::Error`s wrapping a [`SigError`] (or `InvalidData`
//! text for framing errors) so the HTTP layer can answer with the right S3
//! code. Limits: a chunk header or trailer line is at most
//! [`MAX_LINE`] bytes, trailers at most [`MAX_TRAILERS`] lines.

use std::io::{BufRead, Read};

use md5::Digest as _;

use crate::sigv4::{self, SigError, Verified};

/// SHA-256 of a body (`x-amz-content-sha256`, aws-chunked chunk
/// signatures, `x-amz-checksum-sha256`): `ring`'s, in assembly with the
/// SHA extensions where the CPU has them, about twice the speed of the
/// `sha2` crate at the workspace's size-optimised release profile (every
/// byte of a signed PUT goes through it).
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    /// An empty hash.
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Hashes `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The 32-byte digest.
    pub fn finalize(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

/// Longest chunk header or trailer line.
pub const MAX_LINE: usize = 4096;
/// Most trailer lines.
pub const MAX_TRAILERS: usize = 16;

/// A body did not match its `x-amz-checksum-*` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the body does not match its {0} checksum")]
pub struct ChecksumMismatch(pub String);

/// CRC-32 (IEEE, `crc32`) or CRC-32C (Castagnoli, `crc32c`). The AWS CLI
/// and boto3 send `x-amz-checksum-crc32` with every part, so this runs over
/// every byte: CRC-32 is `crc32fast`'s (carry-less multiplication,
/// `pclmulqdq` on x86_64, the CRC instructions on aarch64, found at run
/// time: about 10x the table), CRC-32C table driven, eight bytes a step
/// ("slicing-by-8": eight 256-entry tables, 8 KiB a checksum), about 5x
/// the byte-at-a-time loop.
#[derive(Debug, Clone)]
pub struct Crc32(CrcState);

#[derive(Debug, Clone)]
enum CrcState {
    Ieee(crc32fast::Hasher),
    Table(Box<[[u32; 256]; 8]>, u32),
}

impl Crc32 {
    /// For an `x-amz-checksum-<name>` algorithm name; `None` if unsupported.
    pub fn for_algorithm(name: &str) -> Option<Crc32> {
        let poly = match name {
            "crc32" => return Some(Crc32(CrcState::Ieee(crc32fast::Hasher::new()))),
            "crc32c" => 0x82F6_3B78u32,
            _ => return None,
        };
        let mut tables = Box::new([[0u32; 256]; 8]);
        for (i, slot) in (0u32..).zip(tables[0].iter_mut()) {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
            }
            *slot = c;
        }
        for k in 1..8 {
            for i in 0..256 {
                let prev = tables[k - 1][i];
                tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            }
        }
        Some(Crc32(CrcState::Table(tables, !0)))
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let (t, crc) = match &mut self.0 {
            CrcState::Ieee(h) => return h.update(data),
            CrcState::Table(t, crc) => (&**t, crc),
        };
        let mut c = *crc;
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let lo = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
            c = t[7][(lo & 0xFF) as usize]
                ^ t[6][((lo >> 8) & 0xFF) as usize]
                ^ t[5][((lo >> 16) & 0xFF) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xFF) as usize]
                ^ t[2][((hi >> 8) & 0xFF) as usize]
                ^ t[1][((hi >> 16) & 0xFF) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in words.remainder() {
            c = t[0][((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        *crc = c;
    }

    /// The checksum as S3 sends it: base64 of the big-endian value.
    pub fn base64(&self) -> String {
        use base64::Engine as _;
        let value = match &self.0 {
            CrcState::Ieee(h) => h.clone().finalize(),
            CrcState::Table(_, crc) => !crc,
        };
        base64::engine::general_purpose::STANDARD.encode(value.to_be_bytes())
    }
}

/// A digest of the body, for an `x-amz-checksum-<name>` algorithm or
/// `Content-MD5`.
pub enum BodyDigest {
    /// `crc32`, `crc32c`.
    Crc(Crc32),
    /// `Content-MD5`.
    Md5(md5::Md5),
    /// `sha1`.
    Sha1(sha1::Sha1),
    /// `sha256`.
    Sha256(Sha256),
}

impl std::fmt::Debug for BodyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyDigest::Crc(_) => "BodyDigest::Crc",
            BodyDigest::Md5(_) => "BodyDigest::Md5",
            BodyDigest::Sha1(_) => "BodyDigest::Sha1",
            BodyDigest::Sha256(_) => "BodyDigest::Sha256",
        })
    }
}

impl BodyDigest {
    /// For an `x-amz-checksum-<name>` algorithm name, or `md5` for
    /// `Content-MD5`; `None` if unsupported.
    pub fn for_algorithm(name: &str) -> Option<BodyDigest> {
        Some(match name {
            "md5" | "Content-MD5" => BodyDigest::Md5(md5::Md5::new()),
            "sha1" => BodyDigest::Sha1(sha1::Sha1::new()),
            "sha256" => BodyDigest::Sha256(Sha256::new()),
            _ => BodyDigest::Crc(Crc32::for_algorithm(name)?),
        })
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            BodyDigest::Crc(c) => c.update(data),
            BodyDigest::Md5(d) => d.update(data),
            BodyDigest::Sha1(d) => d.update(data),
            BodyDigest::Sha256(d) => d.update(data),
        }
    }

    /// The digest as S3 sends it: base64 of the raw bytes (big-endian for
    /// a CRC).
    pub fn base64(&self) -> String {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        match self {
            BodyDigest::Crc(c) => c.base64(),
            BodyDigest::Md5(d) => b64(&d.clone().finalize()),
            BodyDigest::Sha1(d) => b64(&d.clone().finalize()),
            BodyDigest::Sha256(d) => b64(&d.clone().finalize()),
        }
    }
}

/// Verifies a header checksum (`x-amz-checksum-*`, `Content-MD5`) at the
/// end of the body.
#[derive(Debug)]
pub struct ChecksumCheck<R> {
    inner: R,
    name: String,
    crc: BodyDigest,
    expected: String,
    done: bool,
}

impl<R> ChecksumCheck<R> {
    /// Wraps `inner`; `None` if the algorithm is not verified.
    pub fn new(inner: R, name: &str, expected: &str) -> Result<Self, R> {
        match BodyDigest::for_algorithm(name) {
            Some(crc) => Ok(ChecksumCheck {
                inner,
                name: name.to_string(),
                crc,
                expected: expected.trim().to_string(),
                done: false,
            }),
            None => Err(inner),
        }
    }
}

impl<R: Read> Read for ChecksumCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.done = true;
            if self.crc.base64() != self.expected {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    ChecksumMismatch(self.name.clone()),
                ));
            }
            return Ok(0);
        }
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

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
    checksum: Option<(String, BodyDigest)>,
}

impl<R: BufRead> AwsChunked<R> {
    /// Verifies the trailer `x-amz-checksum-<name>` (from the request's
    /// `x-amz-trailer` header) if the algorithm is supported.
    pub fn with_trailer_checksum(mut self, trailer_header: Option<&str>) -> Self {
        if let Some(name) = trailer_header
            .map(|h| h.trim().to_ascii_lowercase())
            .and_then(|h| h.strip_prefix("x-amz-checksum-").map(str::to_string))
        {
            self.checksum = BodyDigest::for_algorithm(&name).map(|c| (name, c));
        }
        self
    }

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
            checksum: None,
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
                    if let Some((name, _)) = &self.checksum {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            ChecksumMismatch(format!("{name} (missing from the trailer)")),
                        ));
                    }
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
                        let (k, v) = (k.trim(), v.trim());
                        lines.push_str(&format!("{k}:{v}\n"));
                        let matches = self.checksum.as_ref().map(|(name, crc)| {
                            (
                                k.eq_ignore_ascii_case(&format!("x-amz-checksum-{name}")),
                                crc.base64() == v,
                                name.clone(),
                            )
                        });
                        if let Some((true, ok, name)) = matches {
                            if !ok {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::InvalidData,
                                    ChecksumMismatch(name),
                                ));
                            }
                            self.checksum = None;
                        }
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
            let want = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
            let n = self.inner.read(&mut buf[..want])?;
            if n == 0 {
                return Err(framing("the body ended inside a chunk"));
            }
            self.left -= n as u64;
            if self.signing.is_some() {
                self.hasher.update(&buf[..n]);
            }
            if let Some((_, crc)) = &mut self.checksum {
                crc.update(&buf[..n]);
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
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;

    fn decode(body: &[u8], signing: Option<Verified>, trailer: bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        AwsChunked::new(std::io::BufReader::new(body), signing, trailer).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn md5_sha1_and_sha256_are_verified() {
        // Known digests of "abc" (RFC 1321, FIPS 180), base64 as S3 sends them.
        for (name, hex) in [
            ("md5", "900150983cd24fb0d6963f7d28e17f72"),
            ("sha1", "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                "sha256",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
        ] {
            let raw: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let want = B64.encode(raw);
            let mut d = BodyDigest::for_algorithm(name).unwrap();
            d.update(b"a");
            d.update(b"bc");
            assert_eq!(d.base64(), want, "{name}");
            let ok = ChecksumCheck::new(&b"abc"[..], name, &want).unwrap();
            assert_eq!(std::io::read_to_string(ok).unwrap(), "abc");
            let bad = ChecksumCheck::new(&b"abd"[..], name, &want).unwrap();
            let e = std::io::read_to_string(bad).unwrap_err();
            assert!(
                e.get_ref()
                    .and_then(|i| i.downcast_ref::<ChecksumMismatch>())
                    .is_some(),
                "{name}"
            );
        }
    }

    #[test]
    fn crc_vectors() {
        // The standard check values of "123456789".
        let mut c = Crc32::for_algorithm("crc32").unwrap();
        c.update(b"123456789");
        assert_eq!(c.base64(), B64.encode(0xCBF4_3926u32.to_be_bytes()));
        let mut c = Crc32::for_algorithm("crc32c").unwrap();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.base64(), B64.encode(0xE306_9283u32.to_be_bytes()));
        assert!(Crc32::for_algorithm("sha1").is_none());
        assert!(BodyDigest::for_algorithm("crc64nvme").is_none());
        // Eight bytes a step agree with the bit-at-a-time definition over
        // lengths and split points that leave every remainder.
        let data: Vec<u8> = (0..4099u32)
            .map(|i| u8::try_from(i * 131 % 251).unwrap())
            .collect();
        for (name, poly) in [("crc32", 0xEDB8_8320u32), ("crc32c", 0x82F6_3B78)] {
            for len in [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099] {
                let mut want = !0u32;
                for &b in &data[..len] {
                    want ^= u32::from(b);
                    for _ in 0..8 {
                        want = if want & 1 != 0 {
                            poly ^ (want >> 1)
                        } else {
                            want >> 1
                        };
                    }
                }
                for split in [0, 3, len / 2, len] {
                    let mut c = Crc32::for_algorithm(name).unwrap();
                    c.update(&data[..split.min(len)]);
                    c.update(&data[split.min(len)..len]);
                    assert_eq!(
                        c.base64(),
                        B64.encode((!want).to_be_bytes()),
                        "{name} {len} {split}"
                    );
                }
            }
        }
        let ok = ChecksumCheck::new(&b"123456789"[..], "crc32", "y/Q5Jg==").unwrap();
        assert_eq!(std::io::read_to_string(ok).unwrap(), "123456789");
        let bad = ChecksumCheck::new(&b"123456780"[..], "crc32", "y/Q5Jg==").unwrap();
        let e = std::io::read_to_string(bad).unwrap_err();
        assert!(e
            .get_ref()
            .and_then(|i| i.downcast_ref::<ChecksumMismatch>())
            .is_some());
    }

    #[test]
    fn unsigned_trailer_body() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n";
        assert_eq!(decode(body, None, true).unwrap(), b"hello world");
        let mut out = Vec::new();
        AwsChunked::new(std::io::BufReader::new(&body[..]), None, true)
            .with_trailer_checksum(Some("x-amz-checksum-crc32"))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hello world");
        let wrong = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n";
        let e = AwsChunked::new(std::io::BufReader::new(&wrong[..]), None, true)
            .with_trailer_checksum(Some("x-amz-checksum-crc32"))
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(
            e.get_ref()
                .and_then(|i| i.downcast_ref::<ChecksumMismatch>())
                .is_some(),
            "{e}"
        );
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
