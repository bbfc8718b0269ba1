//! Object handlers: Put/Get/Head/Delete/CopyObject, with `Range` on GET;
//! the multipart requests (UploadPartCopy and ListParts included) go on to
//! [`super::multipart`]. Both copies take the copy-source preconditions
//! (`x-amz-copy-source-if-match` ..., 412 when one fails).
//!
//! Conditional requests as S3 answers them: GET and HEAD take `If-Match`
//! and `If-Unmodified-Since` (412 `PreconditionFailed` when they fail),
//! `If-None-Match` and `If-Modified-Since` (304 with the object's headers,
//! no body); `If-Match` wins over `If-Unmodified-Since` and `If-None-Match`
//! over `If-Modified-Since` (RFC 9110 §13.2.2). PUT takes
//! `If-None-Match: *` (create only: 412 when the key exists) and
//! `If-Match: <etag>` (412 when the object changed, 404 when it is gone),
//! checked when the object is committed, so of two racing create-only PUTs
//! exactly one wins.

use std::io::Read;
use std::sync::atomic::Ordering;

use s3::timefmt;

use super::error::{s3err, S3Err};
use super::request::Ctx;
use super::{multipart, Body, Reply, NS, VERIFIED_GET};
use crate::sigv4;
use crate::store::{PutIf, StoreError, Trailer};

/// The ETags of an `If-Match`/`If-None-Match` value: `*`, or a list of
/// (possibly weak) quoted tags; compared without quotes.
fn etag_list(h: &str) -> Vec<&str> {
    h.split(',')
        .map(|t| {
            let t = t.trim();
            let t = t.strip_prefix("W/").unwrap_or(t);
            t.trim_matches('"')
        })
        .filter(|t| !t.is_empty())
        .collect()
}

fn etag_matches(h: &str, etag: &str) -> bool {
    etag_list(h).iter().any(|t| *t == "*" || *t == etag)
}

/// GET/HEAD preconditions against the object: `Ok(true)` to answer 304,
/// `Err` 412, `Ok(false)` to answer normally. Unparseable dates are
/// ignored, as S3 does.
fn read_preconditions(ctx: &Ctx<'_>, t: &Trailer) -> Result<bool, S3Err> {
    let failed = |what: &str| {
        s3err(
            412,
            "PreconditionFailed",
            format!("{what} does not hold for the object (ETag \"{}\")", t.etag),
        )
    };
    let date = |name: &str| ctx.header(name).and_then(timefmt::parse_http_date);
    match ctx.header("if-match") {
        Some(h) if !etag_matches(h, &t.etag) => return Err(failed("If-Match")),
        Some(_) => {}
        None => {
            if date("if-unmodified-since").is_some_and(|d| t.modified > d) {
                return Err(failed("If-Unmodified-Since"));
            }
        }
    }
    Ok(match ctx.header("if-none-match") {
        Some(h) => etag_matches(h, &t.etag),
        None => date("if-modified-since").is_some_and(|d| t.modified <= d),
    })
}

/// A PUT's or CompleteMultipartUpload's condition (`If-None-Match: *`,
/// `If-Match`).
pub(super) fn write_condition(ctx: &Ctx<'_>) -> Result<PutIf, S3Err> {
    match (ctx.header("if-none-match"), ctx.header("if-match")) {
        (None, None) => Ok(PutIf::Always),
        (Some(h), None) if h.trim() == "*" => Ok(PutIf::Absent),
        (Some(_), None) => Err(s3err(
            501,
            "NotImplemented",
            "If-None-Match on a write takes only * (create the object only if the key is free)",
        )),
        (None, Some(h)) => match etag_list(h)[..] {
            [one] => Ok(PutIf::Matches(one.to_string())),
            _ => Err(s3err(
                400,
                "InvalidArgument",
                "If-Match on a write takes one ETag",
            )),
        },
        (Some(_), Some(_)) => Err(s3err(
            400,
            "InvalidArgument",
            "If-None-Match and If-Match cannot both be given on a write",
        )),
    }
}

/// Parses a `Range` header against `size`: `Ok(None)` for no (or an
/// unsupported multi-) range, else the inclusive-exclusive range.
fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, S3Err> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let bad = || {
        s3err(
            416,
            "InvalidRange",
            format!("the range {h:?} is not satisfiable for {size} bytes"),
        )
    };
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| bad())?;
        if n == 0 || size == 0 {
            return Err(bad());
        }
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end = if b.is_empty() {
            size
        } else {
            let e: u64 = b.parse().map_err(|_| bad())?;
            if e < start {
                return Err(bad());
            }
            e.saturating_add(1).min(size)
        };
        if start >= size {
            return Err(bad());
        }
        (start, end)
    };
    Ok(Some(range))
}

fn object_headers(r: Reply, t: &Trailer) -> Reply {
    let mut r = r
        .header("ETag", format!("\"{}\"", t.etag))
        .header("Last-Modified", timefmt::http_date(t.modified))
        .header("Accept-Ranges", "bytes")
        .header(
            "Content-Type",
            t.content_type
                .clone()
                .unwrap_or_else(|| "binary/octet-stream".into()),
        );
    for (k, v) in &t.meta {
        r = r.header(&format!("x-amz-meta-{k}"), v.clone());
    }
    r
}

/// The source of a copy: `x-amz-copy-source: [/]bucket/key`
/// (URL-encoded; a `?versionId` is refused).
pub(super) fn copy_source(ctx: &Ctx<'_>) -> Result<(String, String), S3Err> {
    let raw = ctx.header("x-amz-copy-source").unwrap_or("").trim();
    if raw.contains('?') {
        return Err(s3err(
            501,
            "NotImplemented",
            "versioned copy sources are not supported",
        ));
    }
    let src = sigv4::uri_decode(raw).ok_or_else(|| {
        s3err(
            400,
            "InvalidArgument",
            "x-amz-copy-source is not valid percent-encoding",
        )
    })?;
    let src = src.strip_prefix('/').unwrap_or(&src);
    let (sb, sk) = src
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| {
            s3err(
                400,
                "InvalidArgument",
                "x-amz-copy-source must be bucket/key",
            )
        })?;
    Ok((sb.to_string(), sk.to_string()))
}

/// The copy-source preconditions (`x-amz-copy-source-if-match`,
/// `-if-none-match`, `-if-unmodified-since`, `-if-modified-since`) against
/// the source object: 412 `PreconditionFailed` when one fails, with
/// `if-match` winning over `if-unmodified-since` and `if-none-match` over
/// `if-modified-since`, as S3 decides them.
pub(super) fn copy_source_preconditions(ctx: &Ctx<'_>, t: &Trailer) -> Result<(), S3Err> {
    let failed = |what: &str| {
        s3err(
            412,
            "PreconditionFailed",
            format!(
                "x-amz-copy-source-{what} does not hold for the source object (ETag \"{}\")",
                t.etag
            ),
        )
    };
    let h = |name: &str| ctx.header(&format!("x-amz-copy-source-{name}"));
    let date = |name: &str| h(name).and_then(timefmt::parse_http_date);
    match h("if-match") {
        Some(v) if !etag_matches(v, &t.etag) => return Err(failed("if-match")),
        Some(_) => {}
        None => {
            if date("if-unmodified-since").is_some_and(|d| t.modified > d) {
                return Err(failed("if-unmodified-since"));
            }
        }
    }
    match h("if-none-match") {
        Some(v) if etag_matches(v, &t.etag) => Err(failed("if-none-match")),
        Some(_) => Ok(()),
        None if date("if-modified-since").is_some_and(|d| t.modified <= d) => {
            Err(failed("if-modified-since"))
        }
        None => Ok(()),
    }
}

/// CopyObject: `x-amz-copy-source: [/]bucket/key` (see [`copy_source`]);
/// metadata copied unless `x-amz-metadata-directive: REPLACE`. The data is
/// streamed (decrypted and re-encrypted under a new data key).
fn copy_object(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let (sb, sk) = copy_source(ctx)?;
    let store = &ctx.svc.store;
    let obj = store.open_object(&sb, &sk)?;
    let t = obj.trailer.clone();
    copy_source_preconditions(ctx, &t)?;
    let (ct, meta) = if ctx.header("x-amz-metadata-directive").map(str::trim) == Some("REPLACE") {
        (ctx.content_type(), ctx.user_meta())
    } else {
        (t.content_type.clone(), t.meta.clone())
    };
    let mut reader = SourceReader::new(store.reader(obj, 0, t.size)?);
    let e = store
        .put_object(bucket, key, &mut reader, t.size, ct, meta)
        .map_err(|e| reader.blame(e, &sb, &sk))?;
    ctx.svc.stats.puts.fetch_add(1, Ordering::Relaxed);
    Ok(Reply::xml(format!(
        "<CopyObjectResult xmlns=\"{NS}\"><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag></CopyObjectResult>",
        timefmt::iso8601(e.modified),
        e.etag
    )))
}

/// The reader of a copy's source object, remembering whether reading it
/// failed: the store reports any read failure as a bad request body, but a
/// source that cannot be read (damaged) is the server's fault.
pub(super) struct SourceReader {
    inner: Box<dyn Read + Send>,
    failed: bool,
}

impl SourceReader {
    pub(super) fn new(inner: Box<dyn Read + Send>) -> SourceReader {
        SourceReader {
            inner,
            failed: false,
        }
    }

    /// `e`, or a 500 `InternalError` if it came from reading the source.
    pub(super) fn blame(&self, e: StoreError, bucket: &str, key: &str) -> S3Err {
        if self.failed {
            eprintln!("storage-manager: copy source {bucket}/{key}: {e}");
            return s3err(
                500,
                "InternalError",
                "the copy source is damaged; see the storage-manager log",
            );
        }
        e.into()
    }
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed = true)
    }
}

pub(super) fn object_op(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let svc = ctx.svc;
    let store = &svc.store;
    match ctx.method {
        "PUT"
            if (ctx.has("uploadId") || ctx.has("partNumber"))
                && ctx.header("x-amz-copy-source").is_some() =>
        {
            multipart::upload_part_copy(ctx, bucket, key)
        }
        "PUT" if ctx.has("uploadId") || ctx.has("partNumber") => {
            multipart::upload_part(ctx, bucket, key)
        }
        "PUT" if ctx.header("x-amz-copy-source").is_some() => copy_object(ctx, bucket, key),
        "PUT" => {
            let (ct, meta) = (ctx.content_type(), ctx.user_meta());
            let cond = write_condition(ctx)?;
            let (mut body, len, md5) = ctx.checked_body()?;
            let e =
                store.put_object_md5(bucket, key, &mut body, len, ct, meta, &cond, md5.as_ref())?;
            svc.stats.puts.fetch_add(1, Ordering::Relaxed);
            svc.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
            Ok(Reply::empty(200).header("ETag", format!("\"{}\"", e.etag)))
        }
        "POST" if ctx.has("uploads") => multipart::create_upload(ctx, bucket, key),
        "POST" if ctx.has("uploadId") => multipart::complete_upload(ctx, bucket, key),
        "DELETE" if ctx.has("uploadId") => multipart::abort_upload(ctx, bucket, key),
        "DELETE" => {
            store.delete_object(bucket, key)?;
            svc.stats.deletes.fetch_add(1, Ordering::Relaxed);
            Ok(Reply::empty(204))
        }
        "GET" if ctx.has("uploadId") => multipart::list_parts(ctx, bucket, key),
        "GET" | "HEAD" => {
            let obj = store.open_object(bucket, key)?;
            let t = obj.trailer.clone();
            if read_preconditions(ctx, &t)? {
                let mut r = object_headers(Reply::empty(304), &t);
                r.body = Body::Length(0);
                return Ok(r);
            }
            let range = parse_range(ctx.header("range"), t.size)?;
            let (start, end) = range.unwrap_or((0, t.size));
            let mut r = object_headers(Reply::empty(if range.is_some() { 206 } else { 200 }), &t);
            if range.is_some() {
                r = r.header(
                    "Content-Range",
                    format!("bytes {start}-{}/{}", end.saturating_sub(1), t.size),
                );
            }
            if ctx.method == "HEAD" {
                r.body = Body::Length(end - start);
                return Ok(r);
            }
            let encrypted = obj.trailer.enc.is_some();
            let mut reader = store.reader(obj, start, end)?;
            if encrypted && end - start <= VERIFIED_GET {
                // Small answers are decrypted (and so authenticated) before
                // the status line: a damaged object is a clean 500.
                // fits: end - start <= VERIFIED_GET (checked above).
                #[allow(clippy::cast_possible_truncation)]
                let mut buf = Vec::with_capacity((end - start) as usize);
                if let Err(e) = reader.read_to_end(&mut buf) {
                    eprintln!("storage-manager: {bucket}/{key}: {e}");
                    svc.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(s3err(
                        500,
                        "InternalError",
                        "the stored object is damaged; see the storage-manager log",
                    ));
                }
                reader = Box::new(std::io::Cursor::new(buf));
            }
            svc.stats.gets.fetch_add(1, Ordering::Relaxed);
            svc.stats
                .bytes_out
                .fetch_add(end - start, Ordering::Relaxed);
            r.body = Body::Stream(reader, end - start);
            Ok(r)
        }
        _ => Err(s3err(
            405,
            "MethodNotAllowed",
            format!("{} is not allowed on an object", ctx.method),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn etag_lists() {
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("W/\"x\", \"abc\"", "abc"));
        assert!(etag_matches("*", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
        assert!(!etag_matches("", "abc"));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100).unwrap(), Some((0, 10)));
        assert_eq!(
            parse_range(Some("bytes=90-"), 100).unwrap(),
            Some((90, 100))
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), 100).unwrap(),
            Some((90, 100))
        );
        assert_eq!(
            parse_range(Some("bytes=50-500"), 100).unwrap(),
            Some((50, 100))
        );
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100).unwrap(), None);
        assert_eq!(parse_range(None, 100).unwrap(), None);
        for bad in ["bytes=100-", "bytes=5-2", "bytes=x-1", "bytes=-0"] {
            assert_eq!(
                parse_range(Some(bad), 100).unwrap_err().code,
                "InvalidRange",
                "{bad}"
            );
        }
    }
}
