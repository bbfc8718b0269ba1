//! AWS Signature Version 4 for S3, the server's side: verifying header
//! auth and presigned URLs (query auth), and the expected signatures of
//! aws-chunked chunks and trailers. The canonical requests and signatures
//! a signer computes are [`s3::sigv4`]'s (re-exported here): verification
//! recomputes them with the same code, so the client and the server cannot
//! drift apart.
//!
//! * The canonical URI, query and headers are built as [`s3::sigv4`]
//!   documents.
//! * The payload hash is the `x-amz-content-sha256` header: a hex SHA-256
//!   (checked by the server against the body it reads), `UNSIGNED-PAYLOAD`,
//!   or one of the `STREAMING-…` aws-chunked modes (see [`PayloadMode`]).
//! * Limits: the region in the credential scope is taken as given (this is
//!   a single-site store; any region name signs); the service must be
//!   `s3`; the request time must be within [`MAX_SKEW_SECS`] of the server
//!   clock; presigned URLs live at most 7 days. Only `x-amz-date` (or
//!   `X-Amz-Date` in the query) is read as the request time, not `Date`.
//!   Signatures are compared in constant time.

use s3::timefmt;

/// The signer's half, in one place: what both sides compute.
pub use s3::sigv4::{
    authorization, canonical_query, canonical_request, canonical_uri, hex, presign_query,
    query_pairs, scope, sha256_hex, sign, signature, signing_key, string_to_sign, uri_decode,
    uri_encode, CanonicalInput, Credentials, Presign, Signed, ALGORITHM, EMPTY_SHA256,
    STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER, UNSIGNED_PAYLOAD,
};
/// Constant-time equality (lengths are public).
pub use service_runtime::clients::ct_eq;

/// Largest accepted difference between the request time and the server clock.
pub const MAX_SKEW_SECS: u64 = 15 * 60;
/// Longest presigned URL lifetime (as S3).
pub const MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

/// Why a request's signature was not accepted. Each maps to an S3 error
/// code ([`SigError::s3_code`], with the other S3 errors in `http`).
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
    /// Signed with Signature Version 2 (`Authorization: AWS key:sig`, or a
    /// presigned URL with `AWSAccessKeyId` and `Signature`).
    #[error("Signature Version 2 is not supported: sign with Signature Version 4 (AWS4-HMAC-SHA256), e.g. `aws configure set default.s3.signature_version s3v4`, boto3 Config(signature_version=\"s3v4\"), `mc` and rclone use it by default")]
    V2,
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
        if auth.trim_start().starts_with("AWS ") {
            return Err(SigError::V2);
        }
        verify_header(req, auth, now, secret_of)
    } else if req.query("AWSAccessKeyId").is_some() && req.query("Signature").is_some() {
        Err(SigError::V2)
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
    // The scope date is the request date (checked above).
    let expect = sign(&secret, cred.region, cred.service, amz_date, &cr)
        .ok_or_else(|| SigError::Malformed("the credential date is not the request date".into()))?;
    if !ct_eq(
        expect.signature.as_bytes(),
        signature.to_ascii_lowercase().as_bytes(),
    ) {
        return Err(SigError::Mismatch);
    }
    Ok(Verified {
        access_key: cred.access_key.to_string(),
        payload,
        seed_signature: signature.to_ascii_lowercase(),
        signing_key: expect.signing_key,
        amz_date: amz_date.to_string(),
        scope: expect.scope,
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
    signature(&v.signing_key, &sts)
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
    signature(&v.signing_key, &sts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    const AK: &str = s3::sigv4::aws_example::ACCESS_KEY;
    const SK: &str = s3::sigv4::aws_example::SECRET_KEY;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The "GET Object" example of the AWS SigV4 documentation for S3
    /// ([`s3::sigv4::aws_example`], whose signature `s3::sigv4` checks it
    /// computes), as a client sends it.
    #[test]
    fn aws_documented_get_object_example() {
        use s3::sigv4::aws_example as x;
        let headers = h(&x::HEADERS);
        let auth = x::AUTHORIZATION;

        // The verifier accepts it near that time and refuses variations.
        let mut all = headers.clone();
        all.push(("authorization".into(), auth.into()));
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
        let v2 = [(
            "authorization".to_string(),
            "AWS AKIDEXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg=".to_string(),
        )];
        let view_v2 = RequestView {
            headers: &v2,
            ..view
        };
        assert_eq!(verify(&view_v2, t, &secret).unwrap_err(), SigError::V2);
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
}
