//! Bucket handlers: ListBuckets, Create/Delete/HeadBucket,
//! GetBucketLocation, ListObjects (v1 and v2), DeleteObjects
//! (ListMultipartUploads is in [`super::multipart`]).

use std::sync::atomic::Ordering;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use s3::{timefmt, xml};

use super::error::{s3err, S3Err};
use super::request::Ctx;
use super::{Reply, MAX_KEYS, NS};
use crate::grants::Perm;
use crate::store::{ListParams, StoreError};

/// ListBuckets: the buckets the request's key may read.
pub(super) fn list_buckets(ctx: &Ctx<'_>) -> Result<Reply, S3Err> {
    let mut s = format!("<ListAllMyBucketsResult xmlns=\"{NS}\"><Owner><ID>aerekos</ID><DisplayName>aerekos</DisplayName></Owner><Buckets>");
    for (name, created) in ctx.svc.store.list_buckets() {
        if !ctx.access.allows(&name, Perm::Read) {
            continue;
        }
        s.push_str(&format!(
            "<Bucket><Name>{}</Name><CreationDate>{}</CreationDate></Bucket>",
            xml::escape(&name),
            timefmt::iso8601(created)
        ));
    }
    s.push_str("</Buckets></ListAllMyBucketsResult>");
    Ok(Reply::xml(s))
}

pub(super) fn bucket_op(ctx: &mut Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    let store = &ctx.svc.store;
    match ctx.method {
        "PUT" => {
            // A CreateBucketConfiguration body is read and ignored.
            ctx.xml_body()?;
            store.create_bucket(bucket)?;
            (ctx.svc.audit)(format!("created bucket {bucket}"));
            Ok(Reply::empty(200).header("Location", format!("/{bucket}")))
        }
        "DELETE" => {
            store.delete_bucket(bucket)?;
            (ctx.svc.audit)(format!("deleted bucket {bucket}"));
            Ok(Reply::empty(204))
        }
        "HEAD" => {
            if store.bucket_exists(bucket) {
                Ok(Reply::empty(200))
            } else {
                Err(StoreError::NoSuchBucket(bucket.into()).into())
            }
        }
        "GET" if ctx.has("location") => {
            if !store.bucket_exists(bucket) {
                return Err(StoreError::NoSuchBucket(bucket.into()).into());
            }
            Ok(Reply::xml(format!(
                "<LocationConstraint xmlns=\"{NS}\"></LocationConstraint>"
            )))
        }
        "GET" if ctx.has("uploads") => super::multipart::list_uploads(ctx, bucket),
        "GET" => list_objects(ctx, bucket),
        "POST" if ctx.has("delete") => delete_objects(ctx, bucket),
        _ => Err(s3err(
            405,
            "MethodNotAllowed",
            format!("{} is not allowed on a bucket", ctx.method),
        )),
    }
}

fn list_objects(ctx: &Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    let v2 = ctx.q("list-type") == Some("2");
    let url_enc = ctx.q("encoding-type") == Some("url");
    let enc = ctx.key_encoder();
    let max_keys = match ctx.q("max-keys") {
        None => MAX_KEYS,
        Some(m) => m
            .parse::<usize>()
            .map_err(|_| s3err(400, "InvalidArgument", "max-keys is not a number"))?
            .min(MAX_KEYS),
    };
    let prefix = ctx.q("prefix").unwrap_or("").to_string();
    let delimiter = ctx
        .q("delimiter")
        .filter(|d| !d.is_empty())
        .map(str::to_string);
    let start_after = if v2 {
        match ctx.q("continuation-token") {
            Some(t) => Some(
                B64URL
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        s3err(400, "InvalidArgument", "the continuation token is invalid")
                    })?,
            ),
            None => ctx.q("start-after").map(str::to_string),
        }
    } else {
        ctx.q("marker").map(str::to_string)
    };
    let r = ctx.svc.store.list(
        bucket,
        &ListParams {
            prefix: prefix.clone(),
            delimiter: delimiter.clone(),
            start_after,
            max_keys,
        },
    )?;
    let mut s = format!(
        "<ListBucketResult xmlns=\"{NS}\"><Name>{}</Name><Prefix>{}</Prefix>",
        xml::escape(bucket),
        enc(&prefix)
    );
    if let Some(d) = &delimiter {
        s.push_str(&format!("<Delimiter>{}</Delimiter>", enc(d)));
    }
    s.push_str(&format!(
        "<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{}</IsTruncated>",
        r.truncated
    ));
    if url_enc {
        s.push_str("<EncodingType>url</EncodingType>");
    }
    if v2 {
        s.push_str(&format!(
            "<KeyCount>{}</KeyCount>",
            r.objects.len() + r.prefixes.len()
        ));
        if let Some(t) = ctx.q("continuation-token") {
            s.push_str(&format!(
                "<ContinuationToken>{}</ContinuationToken>",
                xml::escape(t)
            ));
        }
        if let Some(t) = ctx.q("start-after") {
            s.push_str(&format!("<StartAfter>{}</StartAfter>", enc(t)));
        }
        if r.truncated {
            if let Some(last) = &r.last {
                s.push_str(&format!(
                    "<NextContinuationToken>{}</NextContinuationToken>",
                    B64URL.encode(last)
                ));
            }
        }
    } else {
        s.push_str(&format!(
            "<Marker>{}</Marker>",
            enc(ctx.q("marker").unwrap_or(""))
        ));
        if r.truncated {
            if let Some(last) = &r.last {
                s.push_str(&format!("<NextMarker>{}</NextMarker>", enc(last)));
            }
        }
    }
    for (k, e) in &r.objects {
        s.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            enc(k),
            timefmt::iso8601(e.modified),
            e.etag,
            e.size
        ));
    }
    for p in &r.prefixes {
        s.push_str(&format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            enc(p)
        ));
    }
    s.push_str("</ListBucketResult>");
    Ok(Reply::xml(s))
}

fn delete_objects(ctx: &mut Ctx<'_>, bucket: &str) -> Result<Reply, S3Err> {
    let doc = ctx.xml_body()?;
    let objects = xml::elements(&doc, "Object");
    if objects.len() > MAX_KEYS {
        return Err(s3err(
            400,
            "MalformedXML",
            format!("at most {MAX_KEYS} keys per request"),
        ));
    }
    let quiet = xml::text(&doc, "Quiet").as_deref() == Some("true");
    let mut s = format!("<DeleteResult xmlns=\"{NS}\">");
    for o in objects {
        let key = xml::text(o, "Key")
            .ok_or_else(|| s3err(400, "MalformedXML", "an Object has no Key"))?;
        match ctx.svc.store.delete_object(bucket, &key) {
            Ok(()) => {
                ctx.svc.stats.deletes.fetch_add(1, Ordering::Relaxed);
                if !quiet {
                    s.push_str(&format!(
                        "<Deleted><Key>{}</Key></Deleted>",
                        xml::escape(&key)
                    ));
                }
            }
            Err(StoreError::NoSuchBucket(b)) => return Err(StoreError::NoSuchBucket(b).into()),
            Err(e) => s.push_str(&S3Err::from(e).delete_entry(&key)),
        }
    }
    s.push_str("</DeleteResult>");
    Ok(Reply::xml(s))
}
