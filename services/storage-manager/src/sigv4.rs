//! AWS Signature Version 4 for S3: signing (the [`crate::client`]) and
//! verification (the server), header auth and presigned URLs (query auth).
//!
//! * Canonical URI: the request path decoded and re-encoded with the AWS
//!   rules (everything but `A-Za-z0-9-._~` and `/` percent-encoded,
//!   upper-case hex). S3 does not double-encode or normalise paths.
//! * Canonical query: each name and value decoded and re-encoded the same
//!   way (`/` encoded too), sorted by name then value; `X-Amz-Signature` is
//!   left out for presigned URLs.
//! * Canonical headers: the `SignedHeaders` list (must include `host`),
//!   names lower-cased, values trimmed with inner runs of spaces collapsed,
//!   repeated headers joined with `,`.
//! * The payload hash is the `x-amz-content-sha256` header: a hex SHA-256
//!   (checked by the server against the body it reads), `UNSIGNED-PAYLOAD`,
//!   or one of the `STREAMING-…` aws-chunked modes (see [`PayloadMode`]).
//! * Limits: the region in the credential scope is taken as given (this is
//!   a single-site store; any region name signs); the service must be
//!   `s3`; the request time must be within [`MAX_SKEW_SECS`] of the server
//!   clock; presigned URLs live at most 7 days. Only `x-amz-date` (or
//!   `X-Amz-Date` in the query) is read as the request time, not `Date`.
//!   Signatures are compared in constant time.

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::timefmt;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The algorithm name.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Payload hash for bodies that are not hashed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// aws-chunked body, each chunk signed.
pub const STREAMING_SIGNED: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
/// aws-chunked body, chunks signed, with signed trailers.
pub const STREAMING_SIGNED_TRAILER: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER";
/// aws-chunked body, unsigned, with trailers (checksums).
pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// Hash of the empty body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Largest accepted difference between the request time and the server clock.
pub const MAX_SKEW_SECS: u64 = 15 * 60;
/// Longest presigned URL lifetime (as S3).
pub const MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

/// An access key pair. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// A pair.
    pub fn new(access_key: &str, secret_key: &str) -> Credentials {
        Credentials {
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
        }
    }
}

/// Why a request's signature was not accepted. Each maps to an S3 error
/// code ([`SigError::s3_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// Neither an `Authorization` header nor query auth.
    #[error("the request is not signed (anonymous access is not allowed)")]
    Missing,
    /// Malformed `Authorization` header or query auth.
    #[error("malformed authorization: {0}")]
    Malformed(String),
    /// The access key is unknown.
    #[error("the access key id {0:?} does not exist")]
    UnknownKey(String),
    /// The signature is wrong.
    #[error("the request signature does not match the one calculated with the secret key; check the key and signing method")]
    Mismatch,
    /// The request time is too far from the server clock.
    #[error("the difference between the request time and the server time is too large (over {MAX_SKEW_SECS} s)")]
    Skewed,
    /// A presigned URL expired.
    #[error("the presigned request has expired")]
    Expired,
    /// The body does not match `x-amz-content-sha256`.
    #[error("the body does not match x-amz-content-sha256")]
    PayloadMismatch,
}

impl SigError {
    /// The S3 error code and HTTP status.
    pub fn s3_code(&self) -> (&'static str, u16) {
        match self {
            SigError::Missing => ("AccessDenied", 403),
            SigError::Malformed(_) => ("AuthorizationHeaderMalformed", 400),
            SigError::UnknownKey(_) => ("InvalidAccessKeyId", 403),
            SigError::Mismatch => ("SignatureDoesNotMatch", 403),
            SigError::Skewed => ("RequestTimeTooSkewed", 403),
            SigError::Expired => ("AccessDenied", 403),
            SigError::PayloadMismatch => ("XAmzContentSHA256Mismatch", 400),
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0u8; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Percent-encodes with the AWS rules (unreserved kept; `/` kept only if
/// `keep_slash`).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decodes (no `+` → space: S3 signs `%20`). `None` if the result is
/// not UTF-8 or an escape is malformed.
pub fn uri_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The canonical URI of a raw (encoded) request path.
pub fn canonical_uri(raw_path: &str) -> Option<String> {
    let decoded = uri_decode(raw_path)?;
    let encoded = uri_encode(&decoded, true);
    Some(if encoded.is_empty() {
        "/".into()
    } else {
        encoded
    })
}

/// Decoded query pairs, in order; `None` if an escape is malformed.
pub fn query_pairs(raw_query: &str) -> Option<Vec<(String, String)>> {
    raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((uri_decode(k)?, uri_decode(v)?))
        })
        .collect()
}

/// The canonical query string of decoded pairs, skipping `X-Amz-Signature`.
pub fn canonical_query(pairs: &[(String, String)]) -> String {
    let mut enc: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    enc.sort();
    enc.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The signing key for a scope date (`YYYYMMDD`), region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

/// A request as the signer sees it.
#[derive(Debug, Clone)]
pub struct CanonicalInput<'a> {
    /// `GET`, `PUT`, ...
    pub method: &'a str,
    /// The raw (encoded) path.
    pub raw_path: &'a str,
    /// Decoded query pairs.
    pub query: &'a [(String, String)],
    /// `(lower-case name, value)` of every signed header, in any order;
    /// repeated names are joined with `,`.
    pub headers: &'a [(String, String)],
    /// The signed header names, sorted, lower case.
    pub signed_headers: &'a [String],
    /// The payload hash (hex, or one of the special values).
    pub payload_hash: &'a str,
}

/// The canonical request text.
pub fn canonical_request(r: &CanonicalInput<'_>) -> Option<String> {
    let mut out = String::with_capacity(256);
    out.push_str(r.method);
    out.push('\n');
    out.push_str(&canonical_uri(r.raw_path)?);
    out.push('\n');
    out.push_str(&canonical_query(r.query));
    out.push('\n');
    for name in r.signed_headers {
        let values: Vec<String> = r
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| canonical_value(v))
            .collect();
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&r.signed_headers.join(";"));
    out.push('\n');
    out.push_str(r.payload_hash);
    Some(out)
}

/// The string to sign.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// `date/region/service/aws4_request`.
pub fn scope(date: &str, region: &str, service: &str) -> String {
    format!("{date}/{region}/{service}/aws4_request")
}

/// Signs `r` for `creds` at `amz_date`: the `Authorization` header value.
/// `r.headers` must include `host` and `x-amz-date` (and usually
/// `x-amz-content-sha256`), all listed in `r.signed_headers`.
pub fn authorization(
    creds: &Credentials,
    region: &str,
    amz_date: &str,
    r: &CanonicalInput<'_>,
) -> Option<String> {
    let date = amz_date.get(..8)?;
    let scope = scope(date, region, "s3");
    let sts = string_to_sign(amz_date, &scope, &canonical_request(r)?);
    let key = signing_key(&creds.secret_key, date, region, "s3");
    Some(format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={}",
        creds.access_key,
        r.signed_headers.join(";"),
        hex(&hmac(&key, sts.as_bytes()))
    ))
}

/// What a presigned URL allows.
#[derive(Debug, Clone, Copy)]
pub struct Presign<'a> {
    /// Method.
    pub method: &'a str,
    /// `host[:port]` as the client will send it.
    pub host: &'a str,
    /// Raw (encoded) path.
    pub raw_path: &'a str,
    /// Extra query pairs (decoded), signed too.
    pub extra_query: &'a [(String, String)],
    /// Lifetime, seconds.
    pub expires: u64,
}

/// A presigned URL's query string (without `?`), valid from `now`.
pub fn presign_query(
    creds: &Credentials,
    region: &str,
    now: u64,
    p: &Presign<'_>,
) -> Option<String> {
    let Presign {
        method,
        host,
        raw_path,
        extra_query,
        expires,
    } = *p;
    let amz_date = timefmt::amz_date(now);
    let date = amz_date.get(..8)?;
    let scope = scope(date, region, "s3");
    let mut q: Vec<(String, String)> = extra_query.to_vec();
    q.push(("X-Amz-Algorithm".into(), ALGORITHM.into()));
    q.push((
        "X-Amz-Credential".into(),
        format!("{}/{scope}", creds.access_key),
    ));
    q.push(("X-Amz-Date".into(), amz_date.clone()));
    q.push(("X-Amz-Expires".into(), expires.to_string()));
    q.push(("X-Amz-SignedHeaders".into(), "host".into()));
    let headers = [("host".to_string(), host.to_string())];
    let signed = ["host".to_string()];
    let cr = canonical_request(&CanonicalInput {
        method,
        raw_path,
        query: &q,
        headers: &headers,
        signed_headers: &signed,
        payload_hash: UNSIGNED_PAYLOAD,
    })?;
    let key = signing_key(&creds.secret_key, date, region, "s3");
    let sig = hex(&hmac(
        &key,
        string_to_sign(&amz_date, &scope, &cr).as_bytes(),
    ));
    let mut out = canonical_query(&q);
    out.push_str("&X-Amz-Signature=");
    out.push_str(&sig);
    Some(out)
}

/// How the body of a verified request is to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadMode {
    /// The body's SHA-256 must equal this (lower-case hex).
    Sha256(String),
    /// Not hashed.
    Unsigned,
    /// aws-chunked with per-chunk signatures (and, if `trailer`, signed
    /// trailing headers).
    StreamingSigned {
        /// Trailers follow the last chunk.
        trailer: bool,
    },
    /// aws-chunked without signatures, with trailing headers.
    StreamingUnsignedTrailer,
}

/// What verification established: who signed, and what the body reader
/// needs to check the payload. `Debug` omits the signing key.
#[derive(Clone)]
pub struct Verified {
    /// The access key id.
    pub access_key: String,
    /// How to read the body.
    pub payload: PayloadMode,
    /// The request's signature (seed of chunk signatures).
    pub seed_signature: String,
    /// The signing key (for chunk signatures).
    pub signing_key: [u8; 32],
    /// `x-amz-date`.
    pub amz_date: String,
    /// The credential scope.
    pub scope: String,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("access_key", &self.access_key)
            .field("payload", &self.payload)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A request as the verifier sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a str,
    /// Raw path (encoded, without the query).
    pub raw_path: &'a str,
    /// Decoded query pairs.
    pub query: &'a [(String, String)],
    /// All headers, `(lower-case name, value)`.
    pub headers: &'a [(String, String)],
}

impl RequestView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Constant-time equality (lengths are public).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

struct Cred<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

fn parse_credential(c: &str) -> Result<Cred<'_>, SigError> {
    let parts: Vec<&str> = c.split('/').collect();
    match parts.as_slice() {
        [ak, date, region, service, "aws4_request"] if !ak.is_empty() && date.len() == 8 => {
            if *service != "s3" {
                return Err(SigError::Malformed(format!(
                    "the credential scope names service {service:?}, expected \"s3\""
                )));
            }
            Ok(Cred {
                access_key: ak,
                date,
                region,
                service,
            })
        }
        _ => Err(SigError::Malformed(
            "Credential is not <key>/<yyyymmdd>/<region>/s3/aws4_request".into(),
        )),
    }
}

/// Verifies `req` signed at server time `now`, looking secrets up with
/// `secret_of(access_key)`.
pub fn verify(
    req: &RequestView<'_>,
    now: u64,
    secret_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Verified, SigError> {
    if let Some(auth) = req.header("authorization") {
        verify_header(req, auth, now, secret_of)
    } else if req.query("X-Amz-Signature").is_some() || req.query("X-Amz-Algorithm").is_some() {
        verify_presigned(req, now, secret_of)
    } else {
        Err(SigError::Missing)
    }
}

/// What a request claims, from its `Authorization` header or its query.
struct Claim<'a> {
    cred: Cred<'a>,
    amz_date: &'a str,
    signed_headers: Vec<String>,
    /// As signed (`x-amz-content-sha256` or `UNSIGNED-PAYLOAD`).
    payload_hash: &'a str,
    /// How the body is then checked.
    payload: PayloadMode,
    signature: &'a str,
}

/// Checks `claim`'s signature against the request; the verified identity.
fn check_signature(
    req: &RequestView<'_>,
    claim: Claim<'_>,
    secret_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Verified, SigError> {
    let Claim {
        cred,
        amz_date,
        signed_headers,
        payload_hash,
        payload,
        signature,
    } = claim;
    let signed_headers = signed_headers.as_slice();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(SigError::Malformed(
            "SignedHeaders must include host".into(),
        ));
    }
    if amz_date.get(..8) != Some(cred.date) {
        return Err(SigError::Malformed(
            "the credential date is not the request date".into(),
        ));
    }
    let secret = secret_of(cred.access_key)
        .ok_or_else(|| SigError::UnknownKey(cred.access_key.to_string()))?;
    let cr = canonical_request(&CanonicalInput {
        method: req.method,
        raw_path: req.raw_path,
        query: req.query,
        headers: req.headers,
        signed_headers,
        payload_hash,
    })
    .ok_or_else(|| SigError::Malformed("the path is not valid percent-encoded UTF-8".into()))?;
    let scope = scope(cred.date, cred.region, cred.service);
    let key = signing_key(&secret, cred.date, cred.region, cred.service);
    let expect = hex(&hmac(
        &key,
        string_to_sign(amz_date, &scope, &cr).as_bytes(),
    ));
    if !ct_eq(expect.as_bytes(), signature.to_ascii_lowercase().as_bytes()) {
        return Err(SigError::Mismatch);
    }
    Ok(Verified {
        access_key: cred.access_key.to_string(),
        payload,
        seed_signature: signature.to_ascii_lowercase(),
        signing_key: key,
        amz_date: amz_date.to_string(),
        scope,
    })
}

fn verify_header(
    req: &RequestView<'_>,
    auth: &str,
    now: u64,
    secret_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Verified, SigError> {
    let rest = auth
        .trim()
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| SigError::Malformed(format!("only {ALGORITHM} is supported")))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| SigError::Malformed("expected Name=value pairs".into()))?;
        match k.trim() {
            "Credential" => credential = Some(v.trim()),
            "SignedHeaders" => signed = Some(v.trim()),
            "Signature" => signature = Some(v.trim()),
            _ => {}
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(SigError::Malformed(
            "Credential, SignedHeaders and Signature are required".into(),
        ));
    };
    let cred = parse_credential(credential)?;
    let amz_date = req
        .header("x-amz-date")
        .ok_or_else(|| SigError::Malformed("x-amz-date is required".into()))?
        .trim();
    let t = timefmt::parse_amz_date(amz_date)
        .ok_or_else(|| SigError::Malformed("x-amz-date is not YYYYMMDDTHHMMSSZ".into()))?;
    if t.abs_diff(now) > MAX_SKEW_SECS {
        return Err(SigError::Skewed);
    }
    let payload_hash = req
        .header("x-amz-content-sha256")
        .ok_or_else(|| SigError::Malformed("x-amz-content-sha256 is required".into()))?
        .trim();
    let payload = match payload_hash {
        UNSIGNED_PAYLOAD => PayloadMode::Unsigned,
        STREAMING_SIGNED => PayloadMode::StreamingSigned { trailer: false },
        STREAMING_SIGNED_TRAILER => PayloadMode::StreamingSigned { trailer: true },
        STREAMING_UNSIGNED_TRAILER => PayloadMode::StreamingUnsignedTrailer,
        h if h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()) => {
            PayloadMode::Sha256(h.to_ascii_lowercase())
        }
        _ => {
            return Err(SigError::Malformed(
                "x-amz-content-sha256 is not a hex SHA-256 or a known payload mode".into(),
            ))
        }
    };
    let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
    let claim = Claim {
        cred,
        amz_date,
        signed_headers,
        payload_hash,
        payload,
        signature,
    };
    check_signature(req, claim, secret_of)
}

fn verify_presigned(
    req: &RequestView<'_>,
    now: u64,
    secret_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Verified, SigError> {
    let q = |n: &str| {
        req.query(n)
            .ok_or_else(|| SigError::Malformed(format!("query auth needs {n}")))
    };
    if q("X-Amz-Algorithm")? != ALGORITHM {
        return Err(SigError::Malformed(format!(
            "only {ALGORITHM} is supported"
        )));
    }
    let cred = parse_credential(q("X-Amz-Credential")?)?;
    let amz_date = q("X-Amz-Date")?;
    let t = timefmt::parse_amz_date(amz_date)
        .ok_or_else(|| SigError::Malformed("X-Amz-Date is not YYYYMMDDTHHMMSSZ".into()))?;
    let expires: u64 = q("X-Amz-Expires")?
        .parse()
        .map_err(|_| SigError::Malformed("X-Amz-Expires is not a number".into()))?;
    if expires > MAX_PRESIGN_SECS {
        return Err(SigError::Malformed(format!(
            "X-Amz-Expires is over {MAX_PRESIGN_SECS} s"
        )));
    }
    if t > now + MAX_SKEW_SECS {
        return Err(SigError::Skewed);
    }
    if now > t + expires {
        return Err(SigError::Expired);
    }
    let signed_headers: Vec<String> = q("X-Amz-SignedHeaders")?
        .split(';')
        .map(str::to_string)
        .collect();
    let signature = q("X-Amz-Signature")?;
    let payload_hash = req
        .header("x-amz-content-sha256")
        .unwrap_or(UNSIGNED_PAYLOAD);
    let payload = if payload_hash == UNSIGNED_PAYLOAD {
        PayloadMode::Unsigned
    } else {
        PayloadMode::Sha256(payload_hash.to_ascii_lowercase())
    };
    let claim = Claim {
        cred,
        amz_date,
        signed_headers,
        payload_hash,
        payload,
        signature,
    };
    check_signature(req, claim, secret_of)
}

/// The expected signature of one aws-chunked chunk whose data hashes to
/// `chunk_sha256_hex`, following `previous` (the seed signature for the
/// first chunk).
pub fn chunk_signature(v: &Verified, previous: &str, chunk_sha256_hex: &str) -> String {
    let sts = format!(
        "AWS4-HMAC-SHA256-PAYLOAD\n{}\n{}\n{previous}\n{EMPTY_SHA256}\n{chunk_sha256_hex}",
        v.amz_date, v.scope
    );
    hex(&hmac(&v.signing_key, sts.as_bytes()))
}

/// The expected signature of the trailing headers (`trailer_text` is the
/// trailer lines, each ending in `\n`).
pub fn trailer_signature(v: &Verified, previous: &str, trailer_text: &str) -> String {
    let sts = format!(
        "AWS4-HMAC-SHA256-TRAILER\n{}\n{}\n{previous}\n{}",
        v.amz_date,
        v.scope,
        sha256_hex(trailer_text.as_bytes())
    );
    hex(&hmac(&v.signing_key, sts.as_bytes()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

    use super::*;

    const AK: &str = "AKIAIOSFODNN7EXAMPLE";
    const SK: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The "GET Object" example of the AWS SigV4 documentation for S3.
    #[test]
    fn aws_documented_get_object_example() {
        let headers = h(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let signed: Vec<String> = ["host", "range", "x-amz-content-sha256", "x-amz-date"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let input = CanonicalInput {
            method: "GET",
            raw_path: "/test.txt",
            query: &[],
            headers: &headers,
            signed_headers: &signed,
            payload_hash: EMPTY_SHA256,
        };
        let auth = authorization(
            &Credentials::new(AK, SK),
            "us-east-1",
            "20130524T000000Z",
            &input,
        )
        .unwrap();
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );

        // The verifier accepts it near that time and refuses variations.
        let mut all = headers.clone();
        all.push(("authorization".into(), auth.clone()));
        let view = RequestView {
            method: "GET",
            raw_path: "/test.txt",
            query: &[],
            headers: &all,
        };
        let secret = |k: &str| (k == AK).then(|| SK.to_string());
        let t = timefmt::parse_amz_date("20130524T000000Z").unwrap();
        let v = verify(&view, t + 60, &secret).unwrap();
        assert_eq!(v.access_key, AK);
        assert_eq!(v.payload, PayloadMode::Sha256(EMPTY_SHA256.into()));
        assert_eq!(
            verify(&view, t + 16 * 60, &secret).unwrap_err(),
            SigError::Skewed
        );
        let wrong = |k: &str| (k == AK).then(|| "other".to_string());
        assert_eq!(verify(&view, t, &wrong).unwrap_err(), SigError::Mismatch);
        assert!(matches!(
            verify(&view, t, &|_| None).unwrap_err(),
            SigError::UnknownKey(_)
        ));
        let other_path = RequestView {
            raw_path: "/test2.txt",
            ..view
        };
        assert_eq!(
            verify(&other_path, t, &secret).unwrap_err(),
            SigError::Mismatch
        );
        let mut tampered = all.clone();
        tampered[1].1 = "bytes=0-10".into();
        let view2 = RequestView {
            headers: &tampered,
            ..view
        };
        assert_eq!(verify(&view2, t, &secret).unwrap_err(), SigError::Mismatch);
        let anon = RequestView {
            headers: &headers,
            ..view
        };
        assert_eq!(verify(&anon, t, &secret).unwrap_err(), SigError::Missing);
        for bad in [
            "AWS4-HMAC-SHA256 garbage",
            "Basic abc",
            "AWS4-HMAC-SHA256 Credential=x/y, SignedHeaders=host, Signature=00",
        ] {
            let mut b = headers.clone();
            b.push(("authorization".into(), bad.into()));
            let view3 = RequestView {
                headers: &b,
                ..view
            };
            assert!(
                matches!(
                    verify(&view3, t, &secret).unwrap_err(),
                    SigError::Malformed(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn presigned_round_trip_and_expiry() {
        let creds = Credentials::new(AK, SK);
        let now = 1_700_000_000;
        let qs = presign_query(
            &creds,
            "us-east-1",
            now,
            &Presign {
                method: "GET",
                host: "127.0.0.1:9000",
                raw_path: "/b/a%20key",
                extra_query: &[],
                expires: 600,
            },
        )
        .unwrap();
        let query = query_pairs(&qs).unwrap();
        let headers = h(&[("host", "127.0.0.1:9000")]);
        let view = RequestView {
            method: "GET",
            raw_path: "/b/a%20key",
            query: &query,
            headers: &headers,
        };
        let secret = |k: &str| (k == AK).then(|| SK.to_string());
        assert_eq!(
            verify(&view, now + 10, &secret).unwrap().payload,
            PayloadMode::Unsigned
        );
        assert_eq!(
            verify(&view, now + 601, &secret).unwrap_err(),
            SigError::Expired
        );
        let put = RequestView {
            method: "PUT",
            ..view
        };
        assert_eq!(verify(&put, now, &secret).unwrap_err(), SigError::Mismatch);
    }

    #[test]
    fn encoding_rules() {
        assert_eq!(uri_encode("a b/c~d*é", true), "a%20b/c~d%2A%C3%A9");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(canonical_uri("/b/a%20b+c").unwrap(), "/b/a%20b%2Bc");
        assert_eq!(uri_decode("%zz"), None);
        assert_eq!(uri_decode("%C3"), None);
        let q = query_pairs("prefix=a%2Fb&list-type=2&delimiter=%2F&uploads").unwrap();
        assert_eq!(
            canonical_query(&q),
            "delimiter=%2F&list-type=2&prefix=a%2Fb&uploads="
        );
    }
}
