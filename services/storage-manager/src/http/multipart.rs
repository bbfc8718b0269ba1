//! Multipart upload handlers: CreateMultipartUpload, UploadPart,
//! CompleteMultipartUpload, AbortMultipartUpload.

use std::sync::atomic::Ordering;

use s3::xml;

use super::error::{s3err, S3Err};
use super::request::Ctx;
use super::{Reply, NS};
use crate::sigv4;

/// UploadPart: `PUT /b/key?partNumber=N&uploadId=U`.
pub(super) fn upload_part(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let svc = ctx.svc;
    let store = &svc.store;
    let id = ctx.q("uploadId").unwrap_or("").to_string();
    let n: u32 = ctx
        .q("partNumber")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| s3err(400, "InvalidArgument", "partNumber must be 1 to 10000"))?;
    let (mut body, len) = ctx.checked_body()?;
    let etag = store.upload_part(bucket, key, &id, n, &mut body, len)?;
    svc.stats.bytes_in.fetch_add(len, Ordering::Relaxed);
    Ok(Reply::empty(200).header("ETag", format!("\"{etag}\"")))
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

/// CompleteMultipartUpload: `POST /b/key?uploadId=U` with the parts in XML.
pub(super) fn complete_upload(ctx: &mut Ctx<'_>, bucket: &str, key: &str) -> Result<Reply, S3Err> {
    let svc = ctx.svc;
    let store = &svc.store;
    let id = ctx.q("uploadId").unwrap_or("").to_string();
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
    let e = store.complete_upload(bucket, key, &id, &parts)?;
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
