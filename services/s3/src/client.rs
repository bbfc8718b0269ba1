//! A small blocking S3 client (ureq) for aerekos services, e.g.
//! db-manager storing backups in storage-manager. Path-style addressing,
//! SigV4 header auth, plain HTTP only (storage-manager has no TLS; use it
//! over loopback or a tunnel).
//!
//! * [`S3Client::put_object`] streams from a reader with
//!   `UNSIGNED-PAYLOAD` and checks the returned ETag against the MD5 it
//!   computed while sending (so a corrupted upload is an error);
//!   [`S3Client::put_file`] hashes the file first and signs the SHA-256;
//!   [`S3Client::put_object_bytes`] signs the SHA-256 of a buffer.
//! * [`S3Client::get_object`] streams to a writer (optionally a byte range).
//! * Listing pages through `ListObjectsV2`; [`S3Client::list_all`] follows
//!   continuation tokens.
//! * Errors carry the S3 code and message ([`ClientError::S3`]).
//!
//! Limits: no multipart upload (one PUT up to the server's object size
//! limit), no retries, no virtual-host addressing, no TLS.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use md5::{Digest as _, Md5};
use sha2::Sha256;

use crate::sigv4::{self, CanonicalInput, Credentials};
use crate::{timefmt, xml};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint URL is not `http://host[:port]`.
    #[error("endpoint {0:?} is not http://host[:port]")]
    Endpoint(String),
    /// Connecting or sending failed.
    #[error("S3 request failed: {0}")]
    Transport(String),
    /// The server answered with an S3 error.
    #[error("S3 error {status} {code}: {message}")]
    S3 {
        /// HTTP status.
        status: u16,
        /// S3 error code (`NoSuchKey`, ...), or `Http<status>` without a body.
        code: String,
        /// The server's message.
        message: String,
    },
    /// Reading the source or writing the destination failed.
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The ETag the server returned is not the MD5 of what was sent.
    #[error("upload corrupted: sent MD5 {sent}, server stored ETag {stored}")]
    EtagMismatch {
        /// MD5 of the bytes sent.
        sent: String,
        /// The server's ETag.
        stored: String,
    },
    /// The server's answer could not be read.
    #[error("unreadable S3 answer: {0}")]
    Answer(String),
}

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    /// Key.
    pub key: String,
    /// Size, bytes.
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    /// `LastModified` as sent (ISO 8601).
    pub last_modified: String,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Objects, in key order.
    pub objects: Vec<ObjectSummary>,
    /// Common prefixes (with a delimiter).
    pub common_prefixes: Vec<String>,
    /// Token for the next page, if truncated.
    pub next_token: Option<String>,
}

/// `HEAD` of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size, bytes.
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    /// `Content-Type`.
    pub content_type: Option<String>,
}

/// A blocking S3 client. `Debug` hides the secret.
#[derive(Debug, Clone)]
pub struct S3Client {
    base: String,
    host: String,
    creds: Credentials,
    region: String,
    agent: ureq::Agent,
}

type Resp = ureq::http::Response<ureq::Body>;

struct HashingReader<R> {
    inner: R,
    md5: Md5,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.md5.update(&buf[..n]);
        Ok(n)
    }
}

fn strip_quotes(s: &str) -> String {
    s.trim().trim_matches('"').to_string()
}

impl S3Client {
    /// A client for `endpoint` (`http://host:port`), region `us-east-1`.
    pub fn new(endpoint: &str, creds: Credentials) -> Result<S3Client, ClientError> {
        let rest = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::Endpoint(endpoint.into()))?
            .trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(ClientError::Endpoint(endpoint.into()));
        }
        let host = rest.strip_suffix(":80").unwrap_or(rest).to_string();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .build()
            .into();
        Ok(S3Client {
            base: format!("http://{rest}"),
            host,
            creds,
            region: "us-east-1".into(),
            agent,
        })
    }

    /// Uses `region` in the signature scope.
    pub fn with_region(mut self, region: &str) -> S3Client {
        self.region = region.into();
        self
    }

    fn path(bucket: &str, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("/{bucket}/{}", sigv4::uri_encode(k, true)),
            None => format!("/{bucket}"),
        }
    }

    /// Signs and builds the URL and headers of a request.
    fn signed(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        payload_hash: &str,
        extra: &[(String, String)],
    ) -> Result<(String, Vec<(String, String)>), ClientError> {
        let amz_date = timefmt::amz_date(timefmt::now());
        let mut headers = vec![
            ("host".to_string(), self.host.clone()),
            ("x-amz-content-sha256".to_string(), payload_hash.to_string()),
            ("x-amz-date".to_string(), amz_date.clone()),
        ];
        headers.extend(extra.iter().cloned());
        let mut signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
        signed.sort();
        let auth = sigv4::authorization(
            &self.creds,
            &self.region,
            &amz_date,
            &CanonicalInput {
                method,
                raw_path: path,
                query,
                headers: &headers,
                signed_headers: &signed,
                payload_hash,
            },
        )
        .ok_or_else(|| ClientError::Answer("cannot sign the request".into()))?;
        headers.retain(|(k, _)| k != "host");
        headers.push(("authorization".into(), auth));
        let qs = sigv4::canonical_query(query);
        let url = if qs.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{qs}", self.base)
        };
        Ok((url, headers))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        extra: &[(String, String)],
    ) -> Result<Resp, ClientError> {
        let (url, headers) = self.signed(method, path, query, sigv4::EMPTY_SHA256, extra)?;
        let req = ureq::http::Request::builder().method(method).uri(&url);
        self.run(req, &headers, ())
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        payload_hash: &str,
        len: u64,
        body: &mut dyn Read,
    ) -> Result<Resp, ClientError> {
        let (url, headers) = self.signed(method, path, query, payload_hash, &[])?;
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-length", len.to_string());
        self.run(req, &headers, ureq::SendBody::from_reader(body))
    }

    /// Adds `headers` to `req`, sends it with `body`; an S3 error answer is
    /// an error.
    fn run(
        &self,
        mut req: ureq::http::request::Builder,
        headers: &[(String, String)],
        body: impl ureq::AsSendBody,
    ) -> Result<Resp, ClientError> {
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let resp = self
            .agent
            .run(req)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        check(resp)
    }

    /// `PUT /bucket`.
    pub fn create_bucket(&self, bucket: &str) -> Result<(), ClientError> {
        self.send(
            "PUT",
            &Self::path(bucket, None),
            &[],
            sigv4::EMPTY_SHA256,
            0,
            &mut std::io::empty(),
        )
        .map(drain)
    }

    /// `DELETE /bucket` (must be empty).
    pub fn delete_bucket(&self, bucket: &str) -> Result<(), ClientError> {
        self.call("DELETE", &Self::path(bucket, None), &[], &[])
            .map(drain)
    }

    /// Bucket names.
    pub fn list_buckets(&self) -> Result<Vec<String>, ClientError> {
        let resp = self.call("GET", "/", &[], &[])?;
        let doc = body_text(resp)?;
        Ok(xml::elements(&doc, "Bucket")
            .iter()
            .filter_map(|b| xml::text(b, "Name"))
            .collect())
    }

    /// Streams `len` bytes of `body` to `bucket/key` (unsigned payload,
    /// MD5 checked against the returned ETag); returns the ETag.
    pub fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: impl Read,
        len: u64,
    ) -> Result<String, ClientError> {
        let mut reader = HashingReader {
            inner: body.take(len),
            md5: Md5::new(),
        };
        let resp = self.send(
            "PUT",
            &Self::path(bucket, Some(key)),
            &[],
            sigv4::UNSIGNED_PAYLOAD,
            len,
            &mut reader,
        )?;
        let etag = etag_of(&resp)?;
        drain(resp);
        let sent = sigv4::hex(&reader.md5.finalize());
        if sent != etag {
            return Err(ClientError::EtagMismatch { sent, stored: etag });
        }
        Ok(etag)
    }

    /// Puts a buffer with its SHA-256 signed; returns the ETag.
    pub fn put_object_bytes(
        &self,
        bucket: &str,
        key: &str,
        data: &[u8],
    ) -> Result<String, ClientError> {
        let hash = sigv4::sha256_hex(data);
        let resp = self.send(
            "PUT",
            &Self::path(bucket, Some(key)),
            &[],
            &hash,
            data.len() as u64,
            &mut &data[..],
        )?;
        let etag = etag_of(&resp)?;
        drain(resp);
        Ok(etag)
    }

    /// Puts a file, hashing it first so the payload is signed; returns the ETag.
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) -> Result<String, ClientError> {
        let mut f = std::fs::File::open(path)?;
        let mut sha = Sha256::new();
        let len = std::io::copy(&mut f, &mut DigestWriter(&mut sha))?;
        let hash = sigv4::hex(&sha.finalize());
        let f = std::fs::File::open(path)?;
        let mut reader = f.take(len);
        let resp = self.send(
            "PUT",
            &Self::path(bucket, Some(key)),
            &[],
            &hash,
            len,
            &mut reader,
        )?;
        let etag = etag_of(&resp)?;
        drain(resp);
        Ok(etag)
    }

    /// Streams `bucket/key` into `out`; returns the number of bytes.
    pub fn get_object(
        &self,
        bucket: &str,
        key: &str,
        out: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        self.get(bucket, key, None, out)
    }

    /// Streams bytes `first..=last` of `bucket/key` into `out`.
    pub fn get_object_range(
        &self,
        bucket: &str,
        key: &str,
        first: u64,
        last: u64,
        out: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        self.get(bucket, key, Some((first, last)), out)
    }

    fn get(
        &self,
        bucket: &str,
        key: &str,
        range: Option<(u64, u64)>,
        out: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let extra: Vec<(String, String)> = range
            .map(|(a, b)| ("range".to_string(), format!("bytes={a}-{b}")))
            .into_iter()
            .collect();
        let mut resp = self.call("GET", &Self::path(bucket, Some(key)), &[], &extra)?;
        let expected = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let n = std::io::copy(&mut resp.body_mut().as_reader(), out)?;
        if expected.is_some_and(|e| e != n) {
            return Err(ClientError::Transport(format!(
                "connection closed after {n} of {} bytes",
                expected.unwrap_or(0)
            )));
        }
        Ok(n)
    }

    /// `HEAD` an object.
    pub fn head_object(&self, bucket: &str, key: &str) -> Result<ObjectInfo, ClientError> {
        let resp = self.call("HEAD", &Self::path(bucket, Some(key)), &[], &[])?;
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(ObjectInfo {
            size: h("content-length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| ClientError::Answer("HEAD without Content-Length".into()))?,
            etag: h("etag").map(|e| strip_quotes(&e)).unwrap_or_default(),
            content_type: h("content-type"),
        })
    }

    /// `DELETE` an object (no error if it does not exist, as S3).
    pub fn delete_object(&self, bucket: &str, key: &str) -> Result<(), ClientError> {
        self.call("DELETE", &Self::path(bucket, Some(key)), &[], &[])
            .map(drain)
    }

    /// One `ListObjectsV2` page.
    pub fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: Option<u32>,
    ) -> Result<ListPage, ClientError> {
        let mut q = vec![("list-type".to_string(), "2".to_string())];
        if !prefix.is_empty() {
            q.push(("prefix".into(), prefix.into()));
        }
        if let Some(d) = delimiter {
            q.push(("delimiter".into(), d.into()));
        }
        if let Some(c) = continuation {
            q.push(("continuation-token".into(), c.into()));
        }
        if let Some(m) = max_keys {
            q.push(("max-keys".into(), m.to_string()));
        }
        let resp = self.call("GET", &Self::path(bucket, None), &q, &[])?;
        let doc = body_text(resp)?;
        let mut page = ListPage::default();
        for c in xml::elements(&doc, "Contents") {
            page.objects.push(ObjectSummary {
                key: xml::text(c, "Key").unwrap_or_default(),
                size: xml::text(c, "Size")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                etag: xml::text(c, "ETag")
                    .map(|e| strip_quotes(&e))
                    .unwrap_or_default(),
                last_modified: xml::text(c, "LastModified").unwrap_or_default(),
            });
        }
        for p in xml::elements(&doc, "CommonPrefixes") {
            if let Some(p) = xml::text(p, "Prefix") {
                page.common_prefixes.push(p);
            }
        }
        if xml::text(&doc, "IsTruncated").as_deref() == Some("true") {
            page.next_token =
                Some(xml::text(&doc, "NextContinuationToken").ok_or_else(|| {
                    ClientError::Answer("truncated listing without a token".into())
                })?);
        }
        Ok(page)
    }

    /// Every object under `prefix`, following continuation tokens.
    pub fn list_all(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectSummary>, ClientError> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self.list_objects(bucket, prefix, None, token.as_deref(), None)?;
            out.extend(page.objects);
            match page.next_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// A presigned `GET` URL for `bucket/key`, valid `expires_secs`.
    pub fn presign_get(
        &self,
        bucket: &str,
        key: &str,
        expires_secs: u64,
    ) -> Result<String, ClientError> {
        let path = Self::path(bucket, Some(key));
        let qs = sigv4::presign_query(
            &self.creds,
            &self.region,
            timefmt::now(),
            &sigv4::Presign {
                method: "GET",
                host: &self.host,
                raw_path: &path,
                extra_query: &[],
                expires: expires_secs,
            },
        )
        .ok_or_else(|| ClientError::Answer("cannot sign the request".into()))?;
        Ok(format!("{}{path}?{qs}", self.base))
    }
}

struct DigestWriter<'a>(&'a mut Sha256);

impl Write for DigestWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn drain(mut resp: Resp) {
    let _ = std::io::copy(&mut resp.body_mut().as_reader(), &mut std::io::sink());
}

fn etag_of(resp: &Resp) -> Result<String, ClientError> {
    resp.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(strip_quotes)
        .ok_or_else(|| ClientError::Answer("no ETag in the answer".into()))
}

fn body_text(mut resp: Resp) -> Result<String, ClientError> {
    resp.body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| ClientError::Transport(e.to_string()))
}

fn check(mut resp: Resp) -> Result<Resp, ClientError> {
    let status = resp.status().as_u16();
    if status < 300 {
        return Ok(resp);
    }
    let doc = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    Err(ClientError::S3 {
        status,
        code: xml::text(&doc, "Code").unwrap_or_else(|| format!("Http{status}")),
        message: xml::text(&doc, "Message").unwrap_or_default(),
    })
}
