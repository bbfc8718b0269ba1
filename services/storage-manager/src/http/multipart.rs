//! Multipart upload handlers: CreateMultipartUpload, UploadPart,
//! UploadPartCopy, CompleteMultipartUpload, AbortMultipartUpload,
//! ListMultipartUploads and ListParts.
//!
//! Limits: listings return at most [`MAX_KEYS`] uploads or parts a page
//! (`max-uploads`, `max-parts` above it are capped, as S3 does);
//! ListMultipartUploads takes no `delimiter` (501) and lists the uploads of
//! one key by upload id, not by initiation time. UploadPartCopy copies at
//! most `max_part_size` bytes per part (S3: 5 GiB), from a bucket the
//! access key may read (checked with the destination's `read-write` before
//! the handler runs, see [`crate::grants`]), not from object versions (501).

use std::sync::atomic::Ordering;

use s3::{timefmt, xml};

use super::error::{s3err, S3Err};
use super::objects::{copy_source, copy_source_preconditions, write_condition, SourceReader};
use super::request::Ctx;
use super::{Reply, MAX_KEYS, NS};
use crate::sigv4;
use crate::store::UploadListParams;

/// Who initiated and owns every upload (there are no per-key owners).
const OWNER: &str = "<ID>aerekos</ID><DisplayName>aerekos</DisplayName>";

/// A page size query parameter (`max-uploads`, `max-parts`): absent is
/// [`MAX_KEYS`], larger is capped to it.
fn page_size(ctx: &Ctx<'_>, name: &str) -> Result<usize, S3Err> {
    match ctx.q(name) {
        None => Ok(MAX_KEYS),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(|n| n.min(MAX_KEYS))
            .map_err(|_| {
                s3err(
                    400,
                    "InvalidArgument",
                    format!("{name} must be a whole number from 0 to {MAX_KEYS}, not {v:?}"),
                )
            }),
    }
}

/// The `partNumber` of an UploadPart or UploadPartCopy.
fn part_number(ctx: &Ctx<'_>) -> Result<u32, S3Err> {
    ctx.q("partNumber")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| s3err(400, "InvalidArgument", "partNumber must be 1 to 10000"))
}

/// UploadPart: `PUT /b/key?partNumber=N&uploadId=U`.
pub(super) fn upload_part(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let svc = ctx.svc;
    let store = &svc.store;
    let id = ctx.q("uploadId").unwrap_or("").to_string();
    let n = part_number(ctx)?;
    let (mut body, len, md5) = ctx.checked_body()?;
    let part = store.upload_part_md5(bucket, key, &id, n, &mut body, len, md5.as_ref())?;
    svc.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
    Ok(Reply::empty(200).header("ETag", format!("\"{}\"", part.etag)))
}

/// The byte range of an `x-amz-copy-source-range: bytes=first-last` (both
/// offsets required, inclusive) against a source of `size` bytes, as an
/// inclusive-exclusive range; the whole source without the header.
fn copy_range(h: Option<&str>, size: u64) -> Result<(u64, u64), S3Err> {
    let Some(h) = h else { return Ok((0, size)) };
    let syntax = || {
        s3err(
            400,
            "InvalidArgument",
            format!(
                "x-amz-copy-source-range must be bytes=first-last (zero-based, inclusive), not {h:?}"
            ),
        )
    };
    let (a, b) = h
        .trim()
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(syntax)?;
    let a: u64 = a.trim().parse().map_err(|_| syntax())?;
    let b: u64 = b.trim().parse().map_err(|_| syntax())?;
    if a > b || b >= size {
        return Err(s3err(
            416,
            "InvalidRange",
            format!("the range {h:?} is not satisfiable for a source object of {size} bytes"),
        ));
    }
    Ok((a, b + 1))
}

/// UploadPartCopy: `PUT /b/key?partNumber=N&uploadId=U` with
/// `x-amz-copy-source` and optionally `x-amz-copy-source-range`; the part
/// is read from the source object (decrypted, re-encrypted under the
/// part's own data key) and answered with `CopyPartResult`.
pub(super) fn upload_part_copy(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let store = &ctx.svc.store;
    let id = ctx.q("uploadId").unwrap_or("").to_string();
    let n = part_number(ctx)?;
    let (sb, sk) = copy_source(ctx)?;
    let obj = store.open_object(&sb, &sk)?;
    copy_source_preconditions(ctx, &obj.trailer)?;
    let (start, end) = copy_range(ctx.header("x-amz-copy-source-range"), obj.trailer.size)?;
    let mut reader = SourceReader::new(store.reader(obj, start, end)?);
    let part = store
        .upload_part(bucket, key, &id, n, &mut reader, end - start)
        .map_err(|e| reader.blame(e, &sb, &sk))?;
    Ok(Reply::xml(format!(
        "<CopyPartResult xmlns=\"{NS}\"><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag></CopyPartResult>",
        timefmt::iso8601(part.modified),
        part.etag
    )))
}

/// ListMultipartUploads: `GET /b?uploads` with `prefix`, `key-marker`,
/// `upload-id-marker`, `max-uploads` and `encoding-type=url`.
pub(super) fn list_uploads(ctx: &Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    if ctx.q("delimiter").is_some_and(|d| !d.is_empty()) {
        return Err(s3err(
            501,
            "NotImplemented",
            "ListMultipartUploads with a delimiter is not supported; list with a prefix",
        ));
    }
    let url_enc = ctx.q("encoding-type") == Some("url");
    let enc = ctx.key_encoder();
    let p = UploadListParams {
        prefix: ctx.q("prefix").unwrap_or("").to_string(),
        key_marker: ctx
            .q("key-marker")
            .filter(|m| !m.is_empty())
            .map(str::to_string),
        upload_id_marker: ctx
            .q("upload-id-marker")
            .filter(|m| !m.is_empty())
            .map(str::to_string),
        max_uploads: page_size(ctx, "max-uploads")?,
    };
    let r = ctx.svc.store.list_uploads(bucket, &p)?;
    let mut s = format!(
        "<ListMultipartUploadsResult xmlns=\"{NS}\"><Bucket>{}</Bucket><KeyMarker>{}</KeyMarker><UploadIdMarker>{}</UploadIdMarker>",
        xml::escape(bucket),
        enc(p.key_marker.as_deref().unwrap_or("")),
        xml::escape(p.upload_id_marker.as_deref().unwrap_or(""))
    );
    if let Some(last) = r.uploads.last() {
        s.push_str(&format!(
            "<NextKeyMarker>{}</NextKeyMarker><NextUploadIdMarker>{}</NextUploadIdMarker>",
            enc(&last.key),
            last.id
        ));
    }
    s.push_str(&format!(
        "<Prefix>{}</Prefix><MaxUploads>{}</MaxUploads><IsTruncated>{}</IsTruncated>",
        enc(&p.prefix),
        p.max_uploads,
        r.truncated
    ));
    if url_enc {
        s.push_str("<EncodingType>url</EncodingType>");
    }
    for u in &r.uploads {
        s.push_str(&format!(
            "<Upload><Key>{}</Key><UploadId>{}</UploadId><Initiator>{OWNER}</Initiator><Owner>{OWNER}</Owner><StorageClass>STANDARD</StorageClass><Initiated>{}</Initiated></Upload>",
            enc(&u.key),
            u.id,
            timefmt::iso8601(u.created)
        ));
    }
    s.push_str("</ListMultipartUploadsResult>");
    Ok(Reply::xml(s))
}

/// ListParts: `GET /b/key?uploadId=U` with `part-number-marker` and
/// `max-parts`.
pub(super) fn list_parts(ctx: &Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let id = ctx.q("uploadId").unwrap_or("");
    let marker: u32 = match ctx.q("part-number-marker").filter(|m| !m.is_empty()) {
        None => 0,
        Some(m) => m.trim().parse().map_err(|_| {
            s3err(
                400,
                "InvalidArgument",
                format!("part-number-marker must be a part number, not {m:?}"),
            )
        })?,
    };
    let max = page_size(ctx, "max-parts")?;
    let (parts, truncated) = ctx.svc.store.list_parts(bucket, key, id, marker, max)?;
    let mut s = format!(
        "<ListPartsResult xmlns=\"{NS}\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{}</UploadId><Initiator>{OWNER}</Initiator><Owner>{OWNER}</Owner><StorageClass>STANDARD</StorageClass><PartNumberMarker>{marker}</PartNumberMarker>",
        xml::escape(bucket),
        xml::escape(key),
        xml::escape(id)
    );
    if let Some(last) = parts.last() {
        s.push_str(&format!(
            "<NextPartNumberMarker>{}</NextPartNumberMarker>",
            last.number
        ));
    }
    s.push_str(&format!(
        "<MaxParts>{max}</MaxParts><IsTruncated>{truncated}</IsTruncated>"
    ));
    for p in &parts {
        s.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag><Size>{}</Size></Part>",
            p.number,
            timefmt::iso8601(p.modified),
            p.etag,
            p.size
        ));
    }
    s.push_str("</ListPartsResult>");
    Ok(Reply::xml(s))
}

/// CreateMultipartUpload: `POST /b/key?uploads`.
pub(super) fn create_upload(ctx: &Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let store = &ctx.svc.store;
    let id = store.create_upload(bucket, key, ctx.content_type(), ctx.user_meta())?;
    Ok(Reply::xml(format!(
        "<InitiateMultipartUploadResult xmlns=\"{NS}\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
        xml::escape(bucket),
        xml::escape(key)
    )))
}

/// CompleteMultipartUpload: `POST /b/key?uploadId=U` with the parts in
/// XML; conditional as a PUT (`If-None-Match: *`: 412 when the key exists;
/// `If-Match: "<etag>"`: 412 when the object's ETag differs, 404 when there
/// is none), decided at the commit, the upload left intact when refused.
pub(super) fn complete_upload(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let svc = ctx.svc;
    let store = &svc.store;
    let id = ctx.q("uploadId").unwrap_or("").to_string();
    let cond = write_condition(ctx)?;
    let doc = ctx.xml_body()?;
    let mut parts = Vec::new();
    for p in xml::elements(&doc, "Part") {
        let n = xml::text(p, "PartNumber")
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| s3err(400, "MalformedXML", "a Part has no valid PartNumber"))?;
        let etag =
            xml::text(p, "ETag").ok_or_else(|| s3err(400, "MalformedXML", "a Part has no ETag"))?;
        parts.push((n, etag));
    }
    if parts.is_empty() {
        return Err(s3err(400, "MalformedXML", "the body lists no parts"));
    }
    let e = store.complete_upload_if(bucket, key, &id, &parts, &cond)?;
    svc.stats.puts.fetch_add(1, Ordering::Relaxed);
    Ok(Reply::xml(format!(
        "<CompleteMultipartUploadResult xmlns=\"{NS}\"><Location>/{}/{}</Location><Bucket>{}</Bucket><Key>{}</Key><ETag>&quot;{}&quot;</ETag></CompleteMultipartUploadResult>",
        xml::escape(bucket),
        xml::escape(&sigv4::uri_encode(key, true)),
        xml::escape(bucket),
        xml::escape(key),
        e.etag
    )))
}

/// AbortMultipartUpload: `DELETE /b/key?uploadId=U`.
pub(super) fn abort_upload(ctx: &Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let store = &ctx.svc.store;
    store.abort_upload(bucket, key, ctx.q("uploadId").unwrap_or(""))?;
    Ok(Reply::empty(204))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn copy_source_ranges() {
        assert_eq!(copy_range(None, 10).unwrap(), (0, 10));
        assert_eq!(copy_range(Some("bytes=0-9"), 10).unwrap(), (0, 10));
        assert_eq!(copy_range(Some("bytes=3-3"), 10).unwrap(), (3, 4));
        for (bad, code) in [
            ("bytes=0-10", "InvalidRange"),
            ("bytes=5-4", "InvalidRange"),
            ("bytes=10-10", "InvalidRange"),
            ("bytes=0-", "InvalidArgument"),
            ("bytes=-5", "InvalidArgument"),
            ("0-5", "InvalidArgument"),
            ("bytes=a-b", "InvalidArgument"),
        ] {
            assert_eq!(copy_range(Some(bad), 10).unwrap_err().code, code, "{bad}");
        }
        assert_eq!(copy_range(Some("bytes=0-0"), 0).unwrap_err().status, 416);
    }
}
