//! Decoding a request: headers, query, and bodies with their payload
//! checks (signed SHA-256, aws-chunked, trailing checksums).

use std::collections::BTreeMap;
use std::io::Read;

use super::error::{s3err, S3Err};
use super::{S3Service, MAX_XML_BODY};
use crate::chunked::{AwsChunked, ChecksumCheck, Sha256Check};
use crate::grants::{Access, Perm};
use crate::sigv4::{self, PayloadMode};
use crate::store::StoreError;

/// A request being answered.
pub(super) struct Ctx<'a> {
    pub(super) svc: &'a S3Service,
    pub(super) req: &'a mut tiny_http::Request,
    pub(super) method: &'a str,
    /// Names in lower case.
    pub(super) headers: Vec<(String, String)>,
    pub(super) query: Vec<(String, String)>,
    pub(super) verified: Option<sigv4::Verified>,
    /// What the request's access key may touch ([`Access::nothing`] until
    /// its signature is verified).
    pub(super) access: Access,
    /// Whether a handler took the body.
    pub(super) body_read: bool,
}

impl Ctx<'_> {
    pub(super) fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn q(&self, n: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }

    /// How a listing writes keys and prefixes into its XML: URL-encoded
    /// with `encoding-type=url`, else XML-escaped.
    pub(super) fn key_encoder(&self) -> impl Fn(&str) -> String {
        let url = self.q("encoding-type") == Some("url");
        move |s: &str| {
            if url {
                sigv4::uri_encode(s, true)
            } else {
                s3::xml::escape(s)
            }
        }
    }

    pub(super) fn has(&self, n: &str) -> bool {
        self.query.iter().any(|(k, _)| k == n)
    }

    /// The bucket (empty for `/`) and key (`None` for a bucket request) the
    /// request addresses: path-style, or virtual-host style when the
    /// service has a domain and `Host` is `<bucket>.<domain>[:port]`.
    pub(super) fn bucket_and_key(&self, raw_path: &str) -> Result<(String, Option<String>), S3Err> {
        let path = sigv4::uri_decode(raw_path).ok_or_else(|| {
            s3err(
                400,
                "InvalidURI",
                "the path is not valid percent-encoded UTF-8",
            )
        })?;
        let path = path.strip_prefix('/').unwrap_or(&path);
        let vhost_bucket = self.svc.virtual_host_domain.as_deref().and_then(|domain| {
            let host = self.header("host")?.trim().to_ascii_lowercase();
            let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            let bucket = host.strip_suffix(domain)?.strip_suffix('.')?;
            (!bucket.is_empty()).then(|| bucket.to_string())
        });
        Ok(match (vhost_bucket, path.split_once('/')) {
            (Some(b), _) => (b, Some(path.to_string()).filter(|k| !k.is_empty())),
            (None, Some((b, k))) => (b.to_string(), Some(k.to_string()).filter(|k| !k.is_empty())),
            (None, None) => (path.to_string(), None),
        })
    }

    /// `Ok` if the request's key may `need` on `bucket`, else S3's
    /// `AccessDenied` (403) naming the bucket and the permission.
    pub(super) fn require(&self, bucket: &str, need: Perm) -> Result<(), S3Err> {
        if self.access.allows(bucket, need) {
            return Ok(());
        }
        let key = self.verified.as_ref().map_or("", |v| v.access_key.as_str());
        Err(s3err(
            403,
            "AccessDenied",
            format!(
                "Access Denied: access key {key} needs {need} permission on bucket {bucket:?}, \
                 which its grants (the buckets of access_keys) do not give"
            ),
        ))
    }

    /// The body reader with its payload checks, and the decoded length.
    pub(super) fn body(&mut self) -> Result<(Box<dyn Read + '_>, u64), S3Err> {
        let mode = self
            .verified
            .as_ref()
            .map(|v| v.payload.clone())
            .unwrap_or(PayloadMode::Unsigned);
        let content_length = self.req.body_length().map(|n| n as u64);
        let need_len = || s3err(411, "MissingContentLength", "Content-Length is required");
        self.body_read = true;
        let declared = |name: &str, ctx: &Self| -> Result<u64, S3Err> {
            ctx.header(name)
                .ok_or_else(|| {
                    s3err(
                        411,
                        "MissingContentLength",
                        format!("{name} is required for aws-chunked bodies"),
                    )
                })?
                .trim()
                .parse()
                .map_err(|_| s3err(400, "InvalidArgument", format!("{name} is not a number")))
        };
        match mode {
            PayloadMode::Sha256(h) => {
                let len = content_length.ok_or_else(need_len)?;
                Ok((Box::new(Sha256Check::new(self.req.as_reader(), &h)), len))
            }
            PayloadMode::Unsigned => {
                let len = content_length.ok_or_else(need_len)?;
                Ok((Box::new(self.req.as_reader()), len))
            }
            PayloadMode::StreamingSigned { trailer } => {
                let len = declared("x-amz-decoded-content-length", self)?;
                let v = self.verified.clone();
                let r = std::io::BufReader::with_capacity(64 * 1024, self.req.as_reader());
                Ok((Box::new(AwsChunked::new(r, v, trailer)), len))
            }
            PayloadMode::StreamingUnsignedTrailer => {
                let len = declared("x-amz-decoded-content-length", self)?;
                let trailer = self.header("x-amz-trailer").map(str::to_string);
                let r = std::io::BufReader::with_capacity(64 * 1024, self.req.as_reader());
                Ok((
                    Box::new(
                        AwsChunked::new(r, None, true).with_trailer_checksum(trailer.as_deref()),
                    ),
                    len,
                ))
            }
        }
    }

    /// The body with its payload checks and, if a `x-amz-checksum-crc32[c]`
    /// header came with it, that checksum verified too; and the
    /// `Content-MD5` digest, if one came, for the store to check against
    /// the MD5 it computes for the ETag ([`crate::store::Store::put_object_md5`]),
    /// so that the body is hashed with MD5 once.
    pub(super) fn checked_body(&mut self) -> Result<CheckedBody<'_>, S3Err> {
        let header = self.headers.iter().find_map(|(k, v)| {
            k.strip_prefix("x-amz-checksum-")
                .filter(|a| *a != "mode" && *a != "algorithm" && *a != "type")
                .map(|a| (a.to_string(), v.clone()))
        });
        let md5 = match self.header("content-md5").map(str::trim) {
            Some(v) => Some(content_md5(v)?),
            None => None,
        };
        let (r, len) = self.body()?;
        let r = match header {
            Some((alg, value)) => match ChecksumCheck::new(r, &alg, &value) {
                Ok(c) => Box::new(c),
                Err(r) => r,
            },
            None => r,
        };
        Ok((r, len, md5))
    }

    /// A small XML body, fully read and checked.
    pub(super) fn xml_body(&mut self) -> Result<String, S3Err> {
        let (mut r, len) = self.body()?;
        if len > MAX_XML_BODY as u64 {
            return Err(s3err(
                400,
                "MaxMessageLengthExceeded",
                format!("XML bodies are at most {MAX_XML_BODY} bytes"),
            ));
        }
        let mut buf = Vec::new();
        r.by_ref()
            .take(MAX_XML_BODY as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| S3Err::from(StoreError::Body(e)))?;
        String::from_utf8(buf).map_err(|_| s3err(400, "MalformedXML", "the body is not UTF-8"))
    }

    pub(super) fn user_meta(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("x-amz-meta-")
                    .map(|n| (n.to_string(), v.trim().to_string()))
            })
            .collect()
    }

    pub(super) fn content_type(&self) -> Option<String> {
        self.header("content-type").map(str::to_string)
    }
}

/// A request body with its checks, its decoded length and its
/// `Content-MD5` digest ([`Ctx::checked_body`]).
pub(super) type CheckedBody<'a> = (Box<dyn Read + 'a>, u64, Option<[u8; 16]>);

/// The digest of a `Content-MD5` value (base64 of the 16 digest bytes);
/// S3's `InvalidDigest` when it is not one.
fn content_md5(v: &str) -> Result<[u8; 16], S3Err> {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD
        .decode(v)
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
    {
        Some(d) => Ok(d),
        None => Err(s3err(
            400,
            "InvalidDigest",
            "the Content-MD5 you specified is not valid (base64 of a 16-byte MD5)",
        )),
    }
}
