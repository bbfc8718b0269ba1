//! AWS Signature Version 4 for S3, the part both sides compute: canonical
//! requests, signing keys and signatures; the `Authorization` header
//! ([`authorization`], used by [`crate::client`]) and presigned URLs
//! ([`presign_query`]). storage-manager's verifier recomputes signatures
//! with [`canonical_request`] and [`sign`], so a signer and the verifier
//! cannot drift apart.
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
//! * The payload hash is the `x-amz-content-sha256` header: a hex SHA-256,
//!   [`UNSIGNED_PAYLOAD`], or one of the `STREAMING-…` aws-chunked modes.
//! * Limits: the region in the credential scope is taken as given (any
//!   region name signs); the service is `s3`; the scope date is the first
//!   eight characters of the request time (`YYYYMMDD`).

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

/// The signature (lower-case hex HMAC-SHA256) of `string_to_sign` under
/// `signing_key`: of a request, an aws-chunked chunk or its trailer.
pub fn signature(signing_key: &[u8; 32], string_to_sign: &str) -> String {
    hex(&hmac(signing_key, string_to_sign.as_bytes()))
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

/// A request's signature and what signing it took. `Debug` omits the
/// signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct Signed {
    /// The credential scope (`date/region/service/aws4_request`).
    pub scope: String,
    /// The signing key (aws-chunked chunk signatures use it too).
    pub signing_key: [u8; 32],
    /// The signature, lower-case hex.
    pub signature: String,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("scope", &self.scope)
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

/// Signs `canonical_request` made at `amz_date` (`YYYYMMDDTHHMMSSZ`, whose
/// date is the scope's) with `secret` for `region` and `service`; `None`
/// if `amz_date` has no date.
pub fn sign(
    secret: &str,
    region: &str,
    service: &str,
    amz_date: &str,
    canonical_request: &str,
) -> Option<Signed> {
    let date = amz_date.get(..8)?;
    let scope = scope(date, region, service);
    let signing_key = signing_key(secret, date, region, service);
    let signature = signature(
        &signing_key,
        &string_to_sign(amz_date, &scope, canonical_request),
    );
    Some(Signed {
        scope,
        signing_key,
        signature,
    })
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
    let s = sign(
        &creds.secret_key,
        region,
        "s3",
        amz_date,
        &canonical_request(r)?,
    )?;
    Some(format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={}",
        creds.access_key,
        s.scope,
        r.signed_headers.join(";"),
        s.signature
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
    let mut q: Vec<(String, String)> = extra_query.to_vec();
    q.push(("X-Amz-Algorithm".into(), ALGORITHM.into()));
    q.push((
        "X-Amz-Credential".into(),
        format!("{}/{}", creds.access_key, scope(date, region, "s3")),
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
    let s = sign(&creds.secret_key, region, "s3", &amz_date, &cr)?;
    let mut out = canonical_query(&q);
    out.push_str("&X-Amz-Signature=");
    out.push_str(&s.signature);
    Some(out)
}

/// The "GET Object" example of the AWS SigV4 documentation for S3: a
/// request, its key pair and the `Authorization` header AWS gives for it.
/// The test vector of [`authorization`] here and of storage-manager's
/// verifier.
pub mod aws_example {
    use super::EMPTY_SHA256;

    /// Access key id.
    pub const ACCESS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
    /// Secret access key.
    pub const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    /// Region.
    pub const REGION: &str = "us-east-1";
    /// Request time.
    pub const AMZ_DATE: &str = "20130524T000000Z";
    /// Method.
    pub const METHOD: &str = "GET";
    /// Raw path.
    pub const PATH: &str = "/test.txt";
    /// The headers, all signed: `(lower-case name, value)`, sorted.
    pub const HEADERS: [(&str, &str); 4] = [
        ("host", "examplebucket.s3.amazonaws.com"),
        ("range", "bytes=0-9"),
        ("x-amz-content-sha256", EMPTY_SHA256),
        ("x-amz-date", AMZ_DATE),
    ];
    /// The `Authorization` header AWS documents.
    pub const AUTHORIZATION: &str =
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
         SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
         Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41";
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    /// [`aws_example`]: our signature is the one AWS documents.
    #[test]
    fn aws_documented_get_object_example() {
        use aws_example as x;
        let headers: Vec<(String, String)> = x::HEADERS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
        let input = CanonicalInput {
            method: x::METHOD,
            raw_path: x::PATH,
            query: &[],
            headers: &headers,
            signed_headers: &signed,
            payload_hash: EMPTY_SHA256,
        };
        let creds = Credentials::new(x::ACCESS_KEY, x::SECRET_KEY);
        let auth = authorization(&creds, x::REGION, x::AMZ_DATE, &input).unwrap();
        assert_eq!(auth, x::AUTHORIZATION);
    }

    /// The presigned-URL example of the same documentation.
    #[test]
    fn aws_documented_presigned_url_example() {
        let qs = presign_query(
            &Credentials::new(aws_example::ACCESS_KEY, aws_example::SECRET_KEY),
            aws_example::REGION,
            timefmt::parse_amz_date(aws_example::AMZ_DATE).unwrap(),
            &Presign {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                raw_path: "/test.txt",
                extra_query: &[],
                expires: 86_400,
            },
        )
        .unwrap();
        assert_eq!(
            qs,
            "X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
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
