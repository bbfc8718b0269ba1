//! Multipart uploads: CreateMultipartUpload fetches the object's data key
//! from key-manager and keeps it wrapped in `upload.json`; each part is an
//! object file in the upload's directory, sealed once under that key with a
//! random nonce prefix of its own ([`crate::crypt`]). Completion assembles
//! the object by reference, without reading the data: it writes a manifest
//! (an `SMO2` object file listing the parts, see `object_file`), and under
//! the index lock, once a condition (`If-None-Match: *`, `If-Match`) holds,
//! renames `uploads/<id>/` to `data/<id>/` (fsyncing both parents), then
//! renames the manifest over `objects/<hash>` (the commit point) and
//! fsyncs; `upload.json` and the parts the completion did not list are
//! removed after. A crash before the manifest's rename is durable leaves
//! `data/<id>/` with its `upload.json` and no object naming it: the next
//! start moves it back to `uploads/`, so the upload is intact; after it, the
//! object is complete, and the next start removes from `data/<id>/` what
//! the manifest does not list (`upload.json`, unlisted parts) if the crash
//! came before that clean-up. Deleting or overwriting the object discards
//! its `data/<id>/` once the change is durable: moved into `tmp/` at once,
//! removed when no read holds it (`pins`; a directory no object names and
//! without `upload.json` is removed at start). A delete or overwrite that
//! finds `upload.json` still there (the completion's clean-up has not run
//! yet) first makes the completion durable and removes it, so a crash
//! cannot make the deleted object's parts an upload again.
//!
//! Uploads created before this format (no data key in `upload.json`, each
//! part under its own key) complete the old way: the parts are decrypted
//! and re-encrypted into one `SMO1` object file.
//!
//! Listings: [`Store::list_uploads`] (ListMultipartUploads) reads the
//! in-memory upload table, ordered by key and then upload id (S3 orders an
//! upload id marker lexicographically; our ids are random, so uploads of
//! one key are not in initiation order); [`Store::list_parts`] (ListParts)
//! reads the upload directory and the trailer of each part it returns.
//!
//! Expiry: [`Store::expire_uploads`] removes the uploads initiated at least
//! a given age before a given time (neither completed nor aborted), parts
//! and all; storage-manager calls it at start and then periodically (the
//! `--multipart-expiry-hours` setting, 7 days by default, as S3's usual
//! `AbortIncompleteMultipartUpload` lifecycle rule). A part being uploaded
//! to an upload that expires meanwhile answers `NoSuchUpload`, as after an
//! abort.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;

use md5::{Digest as _, Md5};
use s3::sigv4::hex;
use s3::timefmt;
use serde::{Deserialize, Serialize};

use super::object_file::Trailer;
use super::object_file::{hex_decode, open_object, EncInfo, ObjectFile, Segment, Segments};
use super::{io_err, random, sync_dir, write_file_synced};
use super::{IndexEntry, PutIf, Store, StoreError, MAX_PARTS};
use crate::crypt::CHUNK;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// An in-progress multipart upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadInfo {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Unix seconds.
    pub created: u64,
    /// `Content-Type` for the final object.
    #[serde(default)]
    pub content_type: Option<String>,
    /// User metadata for the final object.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// The object's data key (wrapped), which seals every part; `None` in
    /// plaintext and in uploads created before parts shared a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<EncInfo>,
}

/// One upload of a [`Store::list_uploads`] page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSummary {
    /// Upload id.
    pub id: String,
    /// Key.
    pub key: String,
    /// Initiated, Unix seconds.
    pub created: u64,
}

/// ListMultipartUploads parameters.
#[derive(Debug, Clone, Default)]
pub struct UploadListParams {
    /// Only keys starting with this.
    pub prefix: String,
    /// Start after this key (`key-marker`): with `upload_id_marker`, after
    /// that upload of this key.
    pub key_marker: Option<String>,
    /// With `key_marker`: uploads of that key with a greater id follow.
    pub upload_id_marker: Option<String>,
    /// Most uploads in the page.
    pub max_uploads: usize,
}

/// A ListMultipartUploads page.
#[derive(Debug, Clone, Default)]
pub struct UploadList {
    /// Uploads, by key and then id.
    pub uploads: Vec<UploadSummary>,
    /// More follow (after the last one).
    pub truncated: bool,
}

/// One part of a [`Store::list_parts`] page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSummary {
    /// Part number.
    pub number: u32,
    /// Size, bytes.
    pub size: u64,
    /// ETag (hex MD5, no quotes).
    pub etag: String,
    /// Uploaded, Unix seconds.
    pub modified: u64,
}

/// What an expiry sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Uploads removed.
    pub uploads: usize,
    /// Bytes of their files on disk.
    pub bytes: u64,
}

/// Total size of the files directly in `dir` (parts and `upload.json`).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

/// `part-00042` → 42.
pub(super) fn part_number(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix("part-")
        .filter(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

impl Store {
    /// The upload `id` of `bucket`/`key`.
    fn upload(&self, bucket: &str, key: &str, id: &str) -> Result<UploadInfo, StoreError> {
        let u = self
            .uploads
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .filter(|u| u.bucket == bucket && u.key == key)
            .ok_or_else(|| StoreError::NoSuchUpload(id.into()))?;
        Ok(u)
    }

    /// Starts a multipart upload; returns its id.
    pub fn create_upload(
        &self,
        bucket: &str,
        key: &str,
        content_type: Option<String>,
        meta: BTreeMap<String, String>,
    ) -> Result<String, StoreError> {
        Self::check_key(key)?;
        Self::check_meta(&meta)?;
        self.check_bucket(bucket)?;
        let raw_id = random::<16>()?;
        let id = hex(&raw_id);
        // The object's data key, bound to the upload id (its object id).
        let enc = match &self.kms {
            None => None,
            Some(kms) => {
                let dk = kms.datakey(&raw_id)?;
                Some(EncInfo {
                    id: id.clone(),
                    wrapped: B64.encode(&dk.wrapped),
                    kms_key: kms.key_name().to_string(),
                    key_id: None,
                })
            }
        };
        let info = UploadInfo {
            bucket: bucket.into(),
            key: key.into(),
            created: timefmt::now(),
            content_type,
            meta,
            enc,
        };
        let staging = self.root.join("tmp").join(format!("upload-{id}"));
        fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
        let json = serde_json::to_vec(&info).map_err(|e| StoreError::Corrupt {
            path: staging.clone(),
            reason: e.to_string(),
        })?;
        write_file_synced(&staging.join("upload.json"), &json)?;
        sync_dir(&staging)?;
        let dest = self.upload_dir(bucket, &id);
        fs::rename(&staging, &dest).map_err(io_err("renaming into", &dest))?;
        sync_dir(dest.parent().unwrap_or(&self.root))?;
        if let Ok(mut m) = self.uploads.lock() {
            m.insert(id.clone(), info);
        }
        Ok(id)
    }

    /// Stores part `n` of an upload from `len` bytes of `body` (a request
    /// body, or a range of another object for UploadPartCopy); returns its
    /// size, ETag (hex MD5) and time.
    pub fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        n: u32,
        body: &mut dyn Read,
        len: u64,
    ) -> Result<IndexEntry, StoreError> {
        self.upload_part_md5(bucket, key, id, n, body, len, None)
    }

    /// [`Store::upload_part`], and with `content_md5` (the request's
    /// `Content-MD5`) the part must have that MD5, as
    /// [`Store::put_object_md5`].
    #[allow(clippy::too_many_arguments)]
    pub fn upload_part_md5(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        n: u32,
        body: &mut dyn Read,
        len: u64,
        content_md5: Option<&[u8; 16]>,
    ) -> Result<IndexEntry, StoreError> {
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(StoreError::InvalidPartNumber);
        }
        self.check_bucket(bucket)?;
        let info = self.upload(bucket, key, id)?;
        let mut st = self.stage_body(body, len, self.limits.max_part_size, info.enc.as_ref())?;
        let etag = st.md5_hex(content_md5)?;
        let (tmp, entry) = st.finish_as(format!("{key}#part{n}"), etag, None, BTreeMap::new())?;
        let dir = self.upload_dir(bucket, id);
        let dest = dir.join(format!("part-{n:05}"));
        {
            // Under the upload table's lock, and only while the upload is
            // in it: a completion (which takes it out first) sees no part
            // change under it.
            let table = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
            if !table.contains_key(id) {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError::NoSuchUpload(id.into()));
            }
            if let Err(e) = fs::rename(&tmp, &dest) {
                let _ = fs::remove_file(&tmp);
                // The upload was aborted or completed meanwhile.
                if !dir.exists() {
                    return Err(StoreError::NoSuchUpload(id.into()));
                }
                return Err(io_err("renaming into", &dest)(e));
            }
        }
        sync_dir(&dir)?;
        Ok(entry)
    }

    /// Completes an upload from `(part number, ETag)` pairs.
    pub fn complete_upload(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<IndexEntry, StoreError> {
        self.complete_upload_if(bucket, key, id, parts, &PutIf::Always)
    }

    /// [`Store::complete_upload`] if `cond` holds when the object is
    /// committed (`If-None-Match: *`, `If-Match`); if it does not
    /// ([`StoreError::PreconditionFailed`], or `NoSuchKey` for an
    /// `If-Match` on a missing key), nothing changed and the upload is
    /// still there, as after any other refused completion.
    pub fn complete_upload_if(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
        cond: &PutIf,
    ) -> Result<IndexEntry, StoreError> {
        self.check_bucket(bucket)?;
        self.upload(bucket, key, id)?;
        if parts.is_empty() || parts.len() > MAX_PARTS as usize {
            return Err(StoreError::InvalidPart(format!(
                "a completion lists 1 to {MAX_PARTS} parts"
            )));
        }
        if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StoreError::InvalidPartOrder);
        }
        // Claim the upload: a concurrent completion, abort or expiry finds
        // it gone, and no part can be replaced while it is assembled.
        let info = {
            let mut table = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
            match table.remove(id) {
                Some(u) if u.bucket == bucket && u.key == key => u,
                Some(u) => {
                    table.insert(id.to_string(), u);
                    return Err(StoreError::NoSuchUpload(id.into()));
                }
                None => return Err(StoreError::NoSuchUpload(id.into())),
            }
        };
        let result = self.assemble(bucket, key, id, parts, &info, cond);
        if result.is_err() {
            // Refused or failed before the commit: the upload stays.
            if self.upload_dir(bucket, id).is_dir() {
                if let Ok(mut table) = self.uploads.lock() {
                    table.insert(id.to_string(), info);
                }
            }
        }
        result
    }

    /// Checks the listed parts and commits the object (by reference when
    /// the parts are sealed under the upload's key, else by copying).
    fn assemble(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
        info: &UploadInfo,
        cond: &PutIf,
    ) -> Result<IndexEntry, StoreError> {
        let dir = self.upload_dir(bucket, id);
        let mut files = Vec::with_capacity(parts.len());
        let mut total = 0u64;
        let mut md5s = Vec::with_capacity(parts.len() * 16);
        for (i, (n, etag)) in parts.iter().enumerate() {
            let path = dir.join(format!("part-{n:05}"));
            let obj = match open_object(&path) {
                Ok(o) => o,
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(StoreError::InvalidPart(format!(
                        "part {n} was not uploaded"
                    )))
                }
                Err(e) => return Err(e),
            };
            let want = etag.trim().trim_matches('"');
            if obj.trailer.etag != want {
                return Err(StoreError::InvalidPart(format!(
                    "part {n} has ETag {}, not {want}",
                    obj.trailer.etag
                )));
            }
            if i + 1 < parts.len() && obj.trailer.size < self.limits.min_part_size {
                return Err(StoreError::EntityTooSmall(*n, self.limits.min_part_size));
            }
            total += obj.trailer.size;
            md5s.extend(hex_decode(&obj.trailer.etag).unwrap_or_default());
            files.push((*n, obj));
        }
        if total > self.limits.max_object_size {
            return Err(StoreError::EntityTooLarge(self.limits.max_object_size));
        }
        let etag = format!("{}-{}", hex(&Md5::digest(&md5s)), parts.len());
        let by_reference = files.iter().all(|(_, o)| {
            o.trailer.segments.is_none()
                && match (&info.enc, &o.trailer.enc) {
                    (None, None) => true,
                    (Some(u), Some(p)) => {
                        p.key_id.as_deref() == Some(u.id.as_str()) && p.wrapped == u.wrapped
                    }
                    _ => false,
                }
        });
        if !by_reference {
            return self.assemble_by_copy(bucket, key, id, files, total, etag, info, cond);
        }
        let entry = IndexEntry {
            size: total,
            etag: etag.clone(),
            modified: timefmt::now(),
        };
        let trailer = Trailer {
            key: key.into(),
            size: total,
            etag,
            modified: entry.modified,
            content_type: info.content_type.clone(),
            meta: info.meta.clone(),
            enc: info.enc.clone(),
            segments: Some(Segments {
                dir: id.to_string(),
                parts: files
                    .iter()
                    .map(|(n, o)| Segment {
                        n: *n,
                        size: o.trailer.size,
                        id: o.trailer.enc.as_ref().map(|e| e.id.clone()),
                    })
                    .collect(),
            }),
        };
        drop(files);
        let tmp = self.write_manifest(&trailer)?;
        let data = self.data_dir(bucket, id);
        let data_parent = data.parent().unwrap_or(&self.root).to_path_buf();
        let up_parent = dir.parent().unwrap_or(&self.root).to_path_buf();
        let mut moved = false;
        let committed = self.commit_with(bucket, key, &tmp, entry.clone(), cond, &mut || {
            fs::create_dir_all(&data_parent).map_err(io_err("creating", &data_parent))?;
            fs::rename(&dir, &data).map_err(io_err("renaming into", &data))?;
            moved = true;
            sync_dir(&up_parent)?;
            sync_dir(&data_parent)
        });
        if let Err(e) = committed {
            let landed = self
                .data_dir_of(bucket, &self.object_path(bucket, key))
                .is_some_and(|d| d == data);
            if moved && !landed {
                // The manifest never landed: the upload goes back.
                let _ = fs::rename(&data, &dir);
                let _ = sync_dir(&up_parent);
            }
            return Err(e);
        }
        // The object is committed: what is no longer the upload goes.
        let listed: std::collections::HashSet<u32> = parts.iter().map(|p| p.0).collect();
        let _ = fs::remove_file(data.join("upload.json"));
        if let Ok(rd) = fs::read_dir(&data) {
            for e in rd.flatten() {
                if part_number(&e.file_name().to_string_lossy())
                    .is_none_or(|n| !listed.contains(&n))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let _ = sync_dir(&data);
        Ok(entry)
    }

    /// The first format's completion: streams the parts (decrypting each
    /// under its own key, re-encrypting under a new one) into one object
    /// file, commits it, then removes the upload directory. Used for
    /// uploads whose parts were not sealed under the upload's key.
    #[allow(clippy::too_many_arguments)]
    fn assemble_by_copy(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        files: Vec<(u32, ObjectFile)>,
        total: u64,
        etag: String,
        info: &UploadInfo,
        cond: &PutIf,
    ) -> Result<IndexEntry, StoreError> {
        let dir = self.upload_dir(bucket, id);
        let mut st = self.stager()?;
        let copy = (|| {
            let mut buf = vec![0u8; CHUNK];
            for (_, obj) in files {
                let size = obj.trailer.size;
                let mut r = self.reader(obj, 0, size)?;
                loop {
                    let n = r.read(&mut buf).map_err(|e| StoreError::Corrupt {
                        path: dir.clone(),
                        reason: format!("reading a part: {e}"),
                    })?;
                    if n == 0 {
                        break;
                    }
                    st.write(&buf[..n])?;
                }
            }
            Ok(())
        })();
        if let Err(e) = copy {
            let _ = fs::remove_file(&st.path);
            return Err(e);
        }
        debug_assert_eq!(st.size, total);
        let (tmp, entry) = st.finish_as(
            key.into(),
            etag,
            info.content_type.clone(),
            info.meta.clone(),
        )?;
        self.commit(bucket, key, &tmp, entry.clone(), cond)?;
        let _ = fs::remove_dir_all(&dir);
        let _ = sync_dir(dir.parent().unwrap_or(&self.root));
        Ok(entry)
    }

    /// Aborts an upload, removing its parts.
    pub fn abort_upload(&self, bucket: &str, key: &str, id: &str) -> Result<(), StoreError> {
        self.check_bucket(bucket)?;
        self.upload(bucket, key, id)?;
        if let Ok(mut m) = self.uploads.lock() {
            m.remove(id);
        }
        let dir = self.upload_dir(bucket, id);
        fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))?;
        sync_dir(dir.parent().unwrap_or(&self.root))
    }

    /// One ListMultipartUploads page of `bucket`: uploads whose key starts
    /// with the prefix, after the markers, by key and then upload id.
    pub fn list_uploads(
        &self,
        bucket: &str,
        p: &UploadListParams,
    ) -> Result<UploadList, StoreError> {
        self.check_bucket(bucket)?;
        let mut all: Vec<UploadSummary> = self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, u)| u.bucket == bucket && u.key.starts_with(&p.prefix))
            .map(|(id, u)| UploadSummary {
                id: id.clone(),
                key: u.key.clone(),
                created: u.created,
            })
            .collect();
        all.sort_by(|a, b| (&a.key, &a.id).cmp(&(&b.key, &b.id)));
        let after = |u: &UploadSummary| match (&p.key_marker, &p.upload_id_marker) {
            (None, _) => true,
            (Some(k), Some(id)) if !id.is_empty() => {
                u.key > *k || (u.key == *k && u.id.as_str() > id.as_str())
            }
            (Some(k), _) => u.key > *k,
        };
        let mut rest = all.into_iter().filter(after);
        let uploads: Vec<UploadSummary> = rest.by_ref().take(p.max_uploads).collect();
        let truncated = p.max_uploads > 0 && rest.next().is_some();
        Ok(UploadList { uploads, truncated })
    }

    /// One ListParts page of upload `id`: parts numbered above `marker`,
    /// at most `max`, in order, and whether more follow.
    pub fn list_parts(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        marker: u32,
        max: usize,
    ) -> Result<(Vec<PartSummary>, bool), StoreError> {
        self.check_bucket(bucket)?;
        self.upload(bucket, key, id)?;
        let dir = self.upload_dir(bucket, id);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchUpload(id.into()))
            }
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        let mut numbers: Vec<u32> = rd
            .flatten()
            .filter_map(|e| part_number(&e.file_name().to_string_lossy()))
            .filter(|n| *n > marker)
            .collect();
        numbers.sort_unstable();
        let truncated = numbers.len() > max;
        let mut parts = Vec::with_capacity(numbers.len().min(max));
        for n in numbers.into_iter().take(max) {
            let path = dir.join(format!("part-{n:05}"));
            match open_object(&path) {
                Ok(o) => parts.push(PartSummary {
                    number: n,
                    size: o.trailer.size,
                    etag: o.trailer.etag,
                    modified: o.trailer.modified,
                }),
                // Aborted, completed or expired meanwhile.
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(StoreError::NoSuchUpload(id.into()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok((parts, truncated))
    }

    /// Removes every upload initiated `max_age` seconds or more before
    /// `now` (Unix seconds), parts and all; returns what it freed. A
    /// directory that cannot be removed is reported in the log (and, its
    /// upload forgotten, removed at the next start).
    pub fn expire_uploads(&self, now: u64, max_age: u64) -> Expired {
        let expired: Vec<(String, UploadInfo)> = match self.uploads.lock() {
            Ok(mut m) => {
                let ids: Vec<String> = m
                    .iter()
                    .filter(|(_, u)| u.created.saturating_add(max_age) <= now)
                    .map(|(id, _)| id.clone())
                    .collect();
                ids.into_iter()
                    .filter_map(|id| m.remove(&id).map(|u| (id, u)))
                    .collect()
            }
            Err(_) => return Expired::default(),
        };
        let mut out = Expired::default();
        for (id, u) in expired {
            let dir = self.upload_dir(&u.bucket, &id);
            let bytes = dir_bytes(&dir);
            // A part renamed in while the directory is being emptied makes
            // the first removal fail (not empty): once more.
            let removed = fs::remove_dir_all(&dir).or_else(|_| fs::remove_dir_all(&dir));
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    eprintln!(
                        "storage-manager: expired upload {id} of {}/{}: removing {}: {e}",
                        u.bucket,
                        u.key,
                        dir.display()
                    );
                    continue;
                }
            }
            let _ = sync_dir(dir.parent().unwrap_or(&self.root));
            out.uploads += 1;
            out.bytes += bytes;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use crate::store::Limits;

    fn part(s: &Store, b: &str, k: &str, id: &str, n: u32, data: &[u8]) -> IndexEntry {
        s.upload_part(b, k, id, n, &mut &data[..], data.len() as u64)
            .unwrap()
    }

    fn keys_ids(l: &UploadList) -> Vec<(String, String)> {
        l.uploads
            .iter()
            .map(|u| (u.key.clone(), u.id.clone()))
            .collect()
    }

    #[test]
    fn uploads_are_listed_by_key_then_id_and_paged_with_both_markers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        s.create_bucket("ups").unwrap();
        s.create_bucket("other").unwrap();
        s.create_upload("other", "a/1", None, BTreeMap::new())
            .unwrap();
        let mut want = Vec::new();
        for k in ["b/2", "a/1", "a/1", "c", "a/1"] {
            let id = s.create_upload("ups", k, None, BTreeMap::new()).unwrap();
            want.push((k.to_string(), id));
        }
        want.sort();
        let all = s
            .list_uploads(
                "ups",
                &UploadListParams {
                    max_uploads: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(keys_ids(&all), want);
        assert!(!all.truncated);
        // Pages of 2, following NextKeyMarker / NextUploadIdMarker: the
        // page boundary falls between two uploads of the same key.
        let mut got = Vec::new();
        let mut p = UploadListParams {
            max_uploads: 2,
            ..Default::default()
        };
        loop {
            let page = s.list_uploads("ups", &p).unwrap();
            assert!(page.uploads.len() <= 2);
            got.extend(keys_ids(&page));
            if !page.truncated {
                break;
            }
            let last = page.uploads.last().unwrap();
            p.key_marker = Some(last.key.clone());
            p.upload_id_marker = Some(last.id.clone());
        }
        assert_eq!(got, want);
        // A key marker alone skips every upload of that key.
        let r = s
            .list_uploads(
                "ups",
                &UploadListParams {
                    key_marker: Some("a/1".into()),
                    max_uploads: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(keys_ids(&r), want[3..]);
        let r = s
            .list_uploads(
                "ups",
                &UploadListParams {
                    prefix: "a/".into(),
                    max_uploads: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(keys_ids(&r), want[..3]);
        let none = s.list_uploads("ups", &UploadListParams::default()).unwrap();
        assert!(none.uploads.is_empty() && !none.truncated);
        assert!(matches!(
            s.list_uploads("nope", &UploadListParams::default()),
            Err(StoreError::NoSuchBucket(_))
        ));
    }

    #[test]
    fn parts_are_listed_in_order_with_size_etag_and_time_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        s.create_bucket("ups").unwrap();
        let id = s.create_upload("ups", "k", None, BTreeMap::new()).unwrap();
        let mut want = Vec::new();
        for n in [3u32, 1, 12, 2, 10_000] {
            let data = vec![u8::try_from(n % 251).unwrap(); n as usize];
            let e = part(&s, "ups", "k", &id, n, &data);
            assert_eq!(e.etag, hex(&Md5::digest(&data)));
            want.push((n, e.size, e.etag));
        }
        // Uploading a part again replaces it.
        let e = part(&s, "ups", "k", &id, 2, b"again");
        want.retain(|p| p.0 != 2);
        want.push((2, 5, e.etag));
        want.sort();
        let (all, more) = s.list_parts("ups", "k", &id, 0, 1000).unwrap();
        assert!(!more);
        assert_eq!(
            all.iter()
                .map(|p| (p.number, p.size, p.etag.clone()))
                .collect::<Vec<_>>(),
            want
        );
        assert!(all.iter().all(|p| p.modified > 0));
        let (page, more) = s.list_parts("ups", "k", &id, 0, 2).unwrap();
        assert!(more);
        assert_eq!(page.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 2]);
        let (page, more) = s.list_parts("ups", "k", &id, 2, 2).unwrap();
        assert!(more);
        assert_eq!(page.iter().map(|p| p.number).collect::<Vec<_>>(), [3, 12]);
        let (page, more) = s.list_parts("ups", "k", &id, 12, 2).unwrap();
        assert!(!more);
        assert_eq!(page.iter().map(|p| p.number).collect::<Vec<_>>(), [10_000]);
        for (b, k, u) in [("ups", "other", id.as_str()), ("ups", "k", "0123")] {
            assert!(matches!(
                s.list_parts(b, k, u, 0, 10),
                Err(StoreError::NoSuchUpload(_))
            ));
        }
        s.abort_upload("ups", "k", &id).unwrap();
        assert!(matches!(
            s.list_parts("ups", "k", &id, 0, 10),
            Err(StoreError::NoSuchUpload(_))
        ));
    }

    #[test]
    fn uploads_expire_at_their_age_with_their_parts_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        s.create_bucket("ups").unwrap();
        let old = s
            .create_upload("ups", "old", None, BTreeMap::new())
            .unwrap();
        part(&s, "ups", "old", &old, 1, &[7u8; 100_000]);
        part(&s, "ups", "old", &old, 2, &[8u8; 50_000]);
        let young = s
            .create_upload("ups", "young", None, BTreeMap::new())
            .unwrap();
        part(&s, "ups", "young", &young, 1, b"kept");
        let created = |id: &str| s.uploads.lock().unwrap()[id].created;
        // Make `old` a day older than `young`.
        s.uploads.lock().unwrap().get_mut(&old).unwrap().created -= 86_400;
        let (t_old, t_young) = (created(&old), created(&young));
        let age = 3600;
        assert_eq!(s.expire_uploads(t_old + age - 1, age), Expired::default());
        assert_eq!(s.usage().uploads, 2);
        let e = s.expire_uploads(t_old + age, age);
        assert_eq!(e.uploads, 1);
        assert!(e.bytes >= 150_000, "{e:?}");
        assert!(!s.upload_dir("ups", &old).exists());
        assert!(s.upload_dir("ups", &young).exists());
        assert!(matches!(
            s.list_parts("ups", "old", &old, 0, 10),
            Err(StoreError::NoSuchUpload(_))
        ));
        assert!(matches!(
            s.upload_part("ups", "old", &old, 3, &mut &b"late"[..], 4),
            Err(StoreError::NoSuchUpload(_))
        ));
        assert!(matches!(
            s.complete_upload("ups", "old", &old, &[(1, String::new())]),
            Err(StoreError::NoSuchUpload(_))
        ));
        // Not yet for the young one; then it goes too, and a reopened
        // store has no upload left.
        assert_eq!(s.expire_uploads(t_young + age - 1, age).uploads, 0);
        assert_eq!(s.expire_uploads(t_young + age, age).uploads, 1);
        assert_eq!(s.usage().uploads, 0);
        assert_eq!(
            fs::read_dir(s.bucket_dir("ups").join("uploads"))
                .unwrap()
                .count(),
            0
        );
        drop(s);
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        assert_eq!(s.usage().uploads, 0);
    }

    fn small_parts() -> Limits {
        Limits {
            min_part_size: 1,
            ..Limits::default()
        }
    }

    fn read_all(s: &Store, b: &str, k: &str, start: u64, end: u64) -> Vec<u8> {
        let o = s.open_object(b, k).unwrap();
        let mut out = Vec::new();
        s.reader(o, start, end)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn tree_bytes(dir: &std::path::Path) -> u64 {
        let Ok(rd) = fs::read_dir(dir) else { return 0 };
        rd.flatten()
            .map(|e| {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    tree_bytes(&e.path())
                } else {
                    m.len()
                }
            })
            .sum()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| u8::try_from((i * 31 + i / 977 + usize::from(seed)) % 251).unwrap())
            .collect()
    }

    /// An upload of three parts (one more sent and left out): returns its
    /// id, the parts' ETags as a completion lists them, and the object's bytes.
    fn three_parts(s: &Store, b: &str, k: &str) -> (String, Vec<(u32, String)>, Vec<u8>) {
        let id = s.create_upload(b, k, None, BTreeMap::new()).unwrap();
        let sizes = [(1u32, 100_000usize), (2, 70_001), (4, 5_003)];
        let mut listed = Vec::new();
        let mut whole = Vec::new();
        for (n, size) in sizes {
            let data = pattern(size, u8::try_from(n).unwrap());
            listed.push((n, format!("\"{}\"", part(s, b, k, &id, n, &data).etag)));
            whole.extend_from_slice(&data);
        }
        part(s, b, k, &id, 3, &[9u8; 4000]); // uploaded, not listed
        (id, listed, whole)
    }

    #[test]
    fn completion_assembles_the_parts_by_reference_without_a_second_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("mpb").unwrap();
        let (id, listed, whole) = three_parts(&s, "mpb", "obj");
        let md5s: Vec<u8> = listed
            .iter()
            .flat_map(|(_, e)| hex_decode(e.trim_matches('"')).unwrap())
            .collect();
        let e = s.complete_upload("mpb", "obj", &id, &listed).unwrap();
        assert_eq!(e.etag, format!("{}-3", hex(&Md5::digest(&md5s))));
        assert_eq!(e.size, whole.len() as u64);
        // The upload is gone, its listed parts are the object's data, the
        // part that was not listed and upload.json are removed: the bucket
        // holds the object's bytes once (plus trailers).
        assert!(!s.upload_dir("mpb", &id).exists());
        let data = s.data_dir("mpb", &id);
        let mut names: Vec<String> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["part-00001", "part-00002", "part-00004"]);
        let bytes = tree_bytes(&s.bucket_dir("mpb"));
        assert!(
            bytes >= whole.len() as u64 && bytes < whole.len() as u64 + 4096,
            "{bytes} bytes on disk for {} bytes of object",
            whole.len()
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(read_all(&s, "mpb", "obj", 0, u64::MAX), whole);
        // Ranges within a part, across one boundary, across two, at the end.
        for (a, b) in [
            (5usize, 17usize),
            (99_990, 100_010),
            (99_999, 170_002),
            (100_000, 170_001),
            (170_000, 175_004),
            (0, 175_004),
            (175_003, 175_004),
        ] {
            assert_eq!(
                read_all(&s, "mpb", "obj", a as u64, b as u64),
                whole[a..b],
                "{a}..{b}"
            );
        }
        assert!(matches!(
            s.complete_upload("mpb", "obj", &id, &listed),
            Err(StoreError::NoSuchUpload(_))
        ));
        // Still there after a restart; deleting frees the parts.
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert_eq!(s.usage().uploads, 0);
        assert_eq!(
            read_all(&s, "mpb", "obj", 99_999, 100_001),
            whole[99_999..100_001]
        );
        s.delete_object("mpb", "obj").unwrap();
        assert!(!data.exists());
        assert!(tree_bytes(&s.bucket_dir("mpb")) < 1024);
        // Overwriting one frees them too.
        let (id, listed, _) = three_parts(&s, "mpb", "obj");
        s.complete_upload("mpb", "obj", &id, &listed).unwrap();
        let data = s.data_dir("mpb", &id);
        assert!(data.is_dir());
        s.put_object("mpb", "obj", &mut &b"small"[..], 5, None, BTreeMap::new())
            .unwrap();
        assert!(!data.exists());
        assert_eq!(read_all(&s, "mpb", "obj", 0, 100), b"small");
    }

    #[test]
    fn completion_conditions_refuse_and_keep_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("mpb").unwrap();
        // If-Match on a missing key: NoSuchKey, the upload stays.
        let (id, listed, whole) = three_parts(&s, "mpb", "k");
        assert!(matches!(
            s.complete_upload_if("mpb", "k", &id, &listed, &PutIf::Matches("abc".into())),
            Err(StoreError::NoSuchKey(_))
        ));
        // If-None-Match: * on a free key succeeds.
        let first = s
            .complete_upload_if("mpb", "k", &id, &listed, &PutIf::Absent)
            .unwrap();
        // ... and on an existing key is refused, leaving the upload whole.
        let (id2, listed2, whole2) = three_parts(&s, "mpb", "k");
        assert!(matches!(
            s.complete_upload_if("mpb", "k", &id2, &listed2, &PutIf::Absent),
            Err(StoreError::PreconditionFailed(_))
        ));
        assert_eq!(s.list_parts("mpb", "k", &id2, 0, 10).unwrap().0.len(), 4);
        assert!(!s.data_dir("mpb", &id2).exists());
        assert_eq!(read_all(&s, "mpb", "k", 0, u64::MAX), whole);
        // If-Match with another ETag: refused; with the object's: done.
        assert!(matches!(
            s.complete_upload_if("mpb", "k", &id2, &listed2, &PutIf::Matches("0123".into())),
            Err(StoreError::PreconditionFailed(_))
        ));
        s.complete_upload_if(
            "mpb",
            "k",
            &id2,
            &listed2,
            &PutIf::Matches(first.etag.clone()),
        )
        .unwrap();
        assert_eq!(read_all(&s, "mpb", "k", 0, u64::MAX), whole2);
        // The replaced object's parts are gone.
        assert!(!s.data_dir("mpb", &id).exists());
        assert_eq!(s.usage().uploads, 0);
    }

    #[test]
    fn a_completion_cut_short_leaves_the_upload_and_a_finished_one_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("mpb").unwrap();
        let (id, listed, whole) = three_parts(&s, "mpb", "cut");
        // Killed after the parts moved to data/, before the manifest's
        // rename: no object names the directory.
        fs::create_dir_all(s.bucket_dir("mpb").join("data")).unwrap();
        fs::rename(s.upload_dir("mpb", &id), s.data_dir("mpb", &id)).unwrap();
        // Parts of an object deleted by a process killed before removing them.
        let orphan = s.data_dir("mpb", &"ab".repeat(16));
        fs::create_dir_all(&orphan).unwrap();
        fs::write(orphan.join("part-00001"), b"old").unwrap();
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert!(!orphan.exists());
        assert!(matches!(
            s.open_object("mpb", "cut"),
            Err(StoreError::NoSuchKey(_))
        ));
        assert_eq!(s.usage().uploads, 1);
        assert_eq!(s.list_parts("mpb", "cut", &id, 0, 10).unwrap().0.len(), 4);
        s.complete_upload("mpb", "cut", &id, &listed).unwrap();
        // Killed after the commit, before upload.json went: the object
        // stands and the upload does not come back.
        fs::write(s.data_dir("mpb", &id).join("upload.json"), b"{}").unwrap();
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert_eq!(s.usage().uploads, 0);
        assert!(!s.data_dir("mpb", &id).join("upload.json").exists());
        assert_eq!(read_all(&s, "mpb", "cut", 0, u64::MAX), whole);
    }

    #[test]
    fn a_crash_after_the_commit_leaves_no_unlisted_part_behind_once_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("mpb").unwrap();
        let (id, listed, whole) = three_parts(&s, "mpb", "obj");
        // What the completion removes after its commit: upload.json and
        // part 3 (uploaded, not listed).
        let up = s.upload_dir("mpb", &id);
        let upload_json = fs::read(up.join("upload.json")).unwrap();
        let unlisted = fs::read(up.join("part-00003")).unwrap();
        s.complete_upload("mpb", "obj", &id, &listed).unwrap();
        // Killed after the manifest's rename, before that clean-up: the
        // directory as the commit left it (plus a stray file).
        let data = s.data_dir("mpb", &id);
        fs::write(data.join("upload.json"), &upload_json).unwrap();
        fs::write(data.join("part-00003"), &unlisted).unwrap();
        fs::write(data.join("part-00003.tmp"), b"junk").unwrap();
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        let mut names: Vec<String> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["part-00001", "part-00002", "part-00004"]);
        assert_eq!(s.usage().uploads, 0, "the upload does not come back");
        assert_eq!(read_all(&s, "mpb", "obj", 0, u64::MAX), whole);
        assert_eq!(
            read_all(&s, "mpb", "obj", 99_990, 100_010),
            whole[99_990..100_010]
        );
        // Everything on disk is the object's: its parts and its manifest.
        let part_bytes: u64 = ["part-00001", "part-00002", "part-00004"]
            .iter()
            .map(|n| fs::metadata(data.join(n)).unwrap().len())
            .sum();
        let manifest = fs::metadata(s.object_path("mpb", "obj")).unwrap().len();
        assert_eq!(
            tree_bytes(&s.bucket_dir("mpb")),
            part_bytes
                + manifest
                + fs::metadata(s.bucket_dir("mpb").join("bucket.json"))
                    .unwrap()
                    .len()
        );
        // Restarting again changes nothing.
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert_eq!(read_all(&s, "mpb", "obj", 0, u64::MAX), whole);
    }

    #[test]
    fn a_delete_racing_the_end_of_a_completion_cannot_make_the_parts_an_upload_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("mpb").unwrap();
        let (id, listed, _) = three_parts(&s, "mpb", "obj");
        let upload_json = fs::read(s.upload_dir("mpb", &id).join("upload.json")).unwrap();
        s.complete_upload("mpb", "obj", &id, &listed).unwrap();
        // The completion committed but has not removed upload.json yet
        // when a DELETE comes: the delete settles the completion first ...
        let data = s.data_dir("mpb", &id);
        let manifest = s.object_path("mpb", "obj");
        fs::write(data.join("upload.json"), &upload_json).unwrap();
        s.settle_completion(&data, &manifest).unwrap();
        assert!(!data.join("upload.json").exists());
        // ... so a crash after the delete's unlink, before its parts went,
        // leaves a directory that start-up removes, not an upload.
        fs::remove_file(&manifest).unwrap();
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert_eq!(s.usage().uploads, 0);
        assert_eq!(s.usage().objects, 0);
        assert!(!data.exists());
        assert!(!s.upload_dir("mpb", &id).exists());
    }

    #[test]
    fn unnamed_part_directories_are_kept_while_an_object_file_of_the_bucket_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("mpb").unwrap();
        let (id, listed, whole) = three_parts(&s, "mpb", "obj");
        s.complete_upload("mpb", "obj", &id, &listed).unwrap();
        let manifest = s.object_path("mpb", "obj");
        let good = fs::read(&manifest).unwrap();
        drop(s);
        // The manifest unreadable (damaged, or a read error): its parts are
        // not taken for an orphan.
        fs::write(&manifest, b"damaged").unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert!(s.data_dir("mpb", &id).join("part-00001").exists());
        drop(s);
        fs::write(&manifest, &good).unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert_eq!(read_all(&s, "mpb", "obj", 0, u64::MAX), whole);
    }

    /// An upload of `n` parts of 1000 bytes, completed; returns its id and
    /// the object's bytes.
    fn many_parts(s: &Store, b: &str, k: &str, n: u32, seed: u8) -> (String, Vec<u8>) {
        let id = s.create_upload(b, k, None, BTreeMap::new()).unwrap();
        let mut listed = Vec::new();
        let mut whole = Vec::new();
        for i in 1..=n {
            let data = pattern(1000, seed.wrapping_add(u8::try_from(i % 251).unwrap()));
            listed.push((i, part(s, b, k, &id, i, &data).etag));
            whole.extend_from_slice(&data);
        }
        s.complete_upload(b, k, &id, &listed).unwrap();
        (id, whole)
    }

    /// Reads `r` to its end in 4 KiB pieces.
    fn drain(r: &mut dyn Read, out: &mut Vec<u8>) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(()),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn tmp_entries(s: &Store) -> usize {
        fs::read_dir(s.root().join("tmp")).unwrap().count()
    }

    #[test]
    fn a_read_of_an_object_of_many_parts_outlives_a_delete_or_an_overwrite_begun_mid_body() {
        for kms in [None, Some(fake_key_manager())] {
            let encrypted = kms.is_some();
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(dir.path(), small_parts(), kms).unwrap();
            s.create_bucket("race").unwrap();
            // 600 parts: more than were ever opened at a read's start.
            let (id, whole) = many_parts(&s, "race", "obj", 600, 1);
            let data = s.data_dir("race", &id);
            let obj = s.open_object("race", "obj").unwrap();
            let mut r = s.reader(obj, 0, u64::MAX).unwrap();
            let mut got = vec![0u8; 1500];
            r.read_exact(&mut got).unwrap();
            // A second read of the same object, from the middle.
            let obj = s.open_object("race", "obj").unwrap();
            let mut r2 = s.reader(obj, 299_500, 600_000).unwrap();
            // An ObjectFile opened before the delete, read after it.
            let late = s.open_object("race", "obj").unwrap();
            assert_eq!(s.pins.pinned(), 1);
            s.delete_object("race", "obj").unwrap();
            assert!(!data.exists(), "{encrypted}: the parts left data/ at once");
            assert!(matches!(
                s.open_object("race", "obj"),
                Err(StoreError::NoSuchKey(_))
            ));
            // A read that had not started fails cleanly, before any byte.
            assert!(matches!(
                s.reader(late, 0, u64::MAX),
                Err(StoreError::NoSuchKey(_))
            ));
            drain(&mut r, &mut got).unwrap();
            assert!(got == whole, "{encrypted}: the read in flight is whole");
            drop(r);
            assert_eq!(tmp_entries(&s), 1, "{encrypted}: held by the other read");
            let mut rest = Vec::new();
            drain(&mut r2, &mut rest).unwrap();
            assert!(rest == whole[299_500..], "{encrypted}");
            drop(r2);
            assert_eq!(s.pins.pinned(), 0);
            assert_eq!(tmp_entries(&s), 0, "{encrypted}: removed by the last read");
            assert!(tree_bytes(&s.bucket_dir("race")) < 1024);

            // An overwrite (by a PUT, then by another completion).
            let (id, whole) = many_parts(&s, "race", "obj", 300, 2);
            let obj = s.open_object("race", "obj").unwrap();
            let mut r = s.reader(obj, 0, u64::MAX).unwrap();
            let mut got = vec![0u8; 10];
            r.read_exact(&mut got).unwrap();
            s.put_object("race", "obj", &mut &b"new"[..], 3, None, BTreeMap::new())
                .unwrap();
            assert!(!s.data_dir("race", &id).exists());
            drain(&mut r, &mut got).unwrap();
            assert!(
                got == whole,
                "{encrypted}: the overwritten object reads whole"
            );
            drop(r);
            assert_eq!(read_all(&s, "race", "obj", 0, 100), b"new");
            let (id, whole) = many_parts(&s, "race", "obj", 300, 3);
            let obj = s.open_object("race", "obj").unwrap();
            let mut r = s.reader(obj, 0, u64::MAX).unwrap();
            let mut got = vec![0u8; 10];
            r.read_exact(&mut got).unwrap();
            let (id2, whole2) = many_parts(&s, "race", "obj", 3, 4);
            drain(&mut r, &mut got).unwrap();
            assert!(got == whole, "{encrypted}: replaced by a completion");
            drop(r);
            assert!(!s.data_dir("race", &id).exists());
            assert_eq!(tmp_entries(&s), 0);
            assert!(s.data_dir("race", &id2).is_dir());
            assert_eq!(read_all(&s, "race", "obj", 0, u64::MAX), whole2);
        }
    }

    #[test]
    fn a_crash_while_a_read_holds_deleted_parts_leaves_nothing_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("race").unwrap();
        let (_, whole) = many_parts(&s, "race", "gone", 300, 5);
        let (_, kept) = many_parts(&s, "race", "kept", 2, 6);
        let obj = s.open_object("race", "gone").unwrap();
        let r = s.reader(obj, 0, u64::MAX).unwrap();
        s.delete_object("race", "gone").unwrap();
        assert_eq!(tmp_entries(&s), 1);
        assert!(tree_bytes(&s.root().join("tmp")) >= whole.len() as u64);
        // Killed with the read in flight: the discarded parts wait in tmp/.
        std::mem::forget(r);
        drop(s);
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        assert_eq!(tmp_entries(&s), 0);
        assert_eq!(read_all(&s, "race", "kept", 0, u64::MAX), kept);
        assert_eq!(s.usage().objects, 1);
    }

    #[test]
    fn objects_of_the_first_format_still_read() {
        // A multipart object as the first format stored it (one `SMO1`
        // file, the parts copied into its payload), built byte by byte.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        s.create_bucket("old").unwrap();
        let body = pattern(200_000, 3);
        let trailer = br#"{"key":"legacy/mp.bin","size":200000,"etag":"0123456789abcdef0123456789abcdef-2","modified":1764000000,"content_type":"application/x-old"}"#;
        let mut file = body.clone();
        file.extend_from_slice(trailer);
        file.extend_from_slice(&u32::try_from(trailer.len()).unwrap().to_le_bytes());
        file.extend_from_slice(b"SMO1");
        let path = s.object_path("old", "legacy/mp.bin");
        drop(s);
        fs::write(&path, &file).unwrap();
        let s = Store::open(dir.path(), small_parts(), None).unwrap();
        let o = s.open_object("old", "legacy/mp.bin").unwrap();
        assert_eq!(o.trailer.etag, "0123456789abcdef0123456789abcdef-2");
        assert_eq!(o.trailer.content_type.as_deref(), Some("application/x-old"));
        assert!(o.trailer.segments.is_none());
        assert_eq!(read_all(&s, "old", "legacy/mp.bin", 0, u64::MAX), body);
        assert_eq!(
            read_all(&s, "old", "legacy/mp.bin", 65_000, 140_000),
            body[65_000..140_000]
        );
        // The magic must agree with the trailer: an SMO1 file naming
        // segments (or an SMO2 without) is refused, not misread.
        let n = file.len();
        file[n - 4..].copy_from_slice(b"SMO2");
        fs::write(&path, &file).unwrap();
        assert!(matches!(
            s.open_object("old", "legacy/mp.bin"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// A stand-in for key-manager over loopback: a data key's "wrapped"
    /// form is its aad followed by the key, and unwrapping checks the aad.
    fn fake_key_manager() -> std::sync::Arc<crate::kms::KeyManager> {
        use base64::Engine as _;
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        std::thread::spawn(move || {
            for mut req in server.incoming_requests() {
                let mut body = String::new();
                req.as_reader().read_to_string(&mut body).unwrap();
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let b64 = |f: &str| B64.decode(v[f].as_str().unwrap_or("")).unwrap();
                let (status, answer) = if req.url().ends_with("/datakey") {
                    let key = random::<32>().unwrap();
                    let mut wrapped = b64("aad");
                    wrapped.extend_from_slice(&key);
                    (
                        200,
                        serde_json::json!({"plaintext": B64.encode(key), "ciphertext": B64.encode(wrapped)}),
                    )
                } else {
                    let (wrapped, aad) = (b64("ciphertext"), b64("aad"));
                    if wrapped.len() == aad.len() + 32 && wrapped.starts_with(&aad) {
                        (
                            200,
                            serde_json::json!({"plaintext": B64.encode(&wrapped[aad.len()..])}),
                        )
                    } else {
                        (400, serde_json::json!({"error": "wrong aad"}))
                    }
                };
                let _ = req.respond(
                    tiny_http::Response::from_string(answer.to_string()).with_status_code(status),
                );
            }
        });
        std::sync::Arc::new(crate::kms::KeyManager::new(&url, "test", "token"))
    }

    fn trailer_of(path: &std::path::Path) -> crate::store::Trailer {
        open_object(path).unwrap().trailer
    }

    #[test]
    fn encrypted_parts_are_sealed_once_under_the_upload_key_each_with_its_own_nonce_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let kms = fake_key_manager();
        let s = Store::open(dir.path(), small_parts(), Some(kms.clone())).unwrap();
        s.create_bucket("enc").unwrap();
        let (id, listed, whole) = three_parts(&s, "enc", "obj");
        let up = s.uploads.lock().unwrap()[&id].enc.clone().unwrap();
        assert_eq!(up.id, id, "the data key is bound to the upload id");
        let p2 = s.upload_dir("enc", &id).join("part-00002");
        let first = trailer_of(&p2).enc.unwrap();
        assert_eq!(first.key_id.as_deref(), Some(id.as_str()));
        assert_eq!(first.wrapped, up.wrapped, "sealed under the upload's key");
        // Part 2 sent again with the same bytes: same key, a new nonce
        // prefix, so different ciphertext.
        let before = fs::read(&p2).unwrap();
        part(&s, "enc", "obj", &id, 2, &whole[100_000..170_001]);
        let again = trailer_of(&p2).enc.unwrap();
        assert_ne!(again.id, first.id);
        assert_ne!(fs::read(&p2).unwrap()[..1000], before[..1000]);
        let prefixes: std::collections::HashSet<String> = [1u32, 2, 3, 4]
            .iter()
            .map(|n| {
                let p = s.upload_dir("enc", &id).join(format!("part-{n:05}"));
                trailer_of(&p).enc.unwrap().id
            })
            .collect();
        assert_eq!(prefixes.len(), 4, "every part has its own nonce prefix");
        s.complete_upload("enc", "obj", &id, &listed).unwrap();
        let o = s.open_object("enc", "obj").unwrap();
        let segs = o.trailer.segments.clone().unwrap();
        assert_eq!(segs.parts.len(), 3);
        assert_eq!(o.trailer.enc.as_ref().unwrap().wrapped, up.wrapped);
        drop(o);
        assert_eq!(read_all(&s, "enc", "obj", 0, u64::MAX), whole);
        for (a, b) in [
            (99_000usize, 101_000usize),
            (99_999, 170_002),
            (65_530, 65_540),
        ] {
            assert_eq!(
                read_all(&s, "enc", "obj", a as u64, b as u64),
                whole[a..b],
                "{a}..{b}"
            );
        }
        // No plaintext on disk.
        let data = s.data_dir("enc", &id);
        for n in [1, 2, 4] {
            let f = fs::read(data.join(format!("part-{n:05}"))).unwrap();
            assert!(!f.windows(64).any(|w| w == &whole[120_000..120_064]));
        }
        // A key from the cache or from key-manager reads it after a restart.
        kms.clear_cache();
        drop(s);
        let s = Store::open(dir.path(), small_parts(), Some(kms)).unwrap();
        assert_eq!(
            read_all(&s, "enc", "obj", 169_990, 170_010),
            whole[169_990..170_010]
        );
        // A damaged part fails authentication; the others still read.
        let p2 = data.join("part-00002");
        let mut f = fs::read(&p2).unwrap();
        f[10] ^= 1;
        fs::write(&p2, &f).unwrap();
        let o = s.open_object("enc", "obj").unwrap();
        let mut out = Vec::new();
        assert!(s
            .reader(o, 99_000, 101_000)
            .unwrap()
            .read_to_end(&mut out)
            .is_err());
        assert_eq!(read_all(&s, "enc", "obj", 0, 1000), whole[..1000]);
        assert_eq!(
            read_all(&s, "enc", "obj", 170_001, 175_004),
            whole[170_001..]
        );
    }

    #[test]
    fn an_encrypted_object_of_many_parts_has_a_large_manifest_and_reads_whole_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), Some(fake_key_manager())).unwrap();
        s.create_bucket("enc").unwrap();
        let id = s
            .create_upload("enc", "many", None, BTreeMap::new())
            .unwrap();
        let mut listed = Vec::new();
        let mut whole = Vec::new();
        for n in 1..=1200u32 {
            let data = [u8::try_from(n % 251).unwrap(); 7];
            listed.push((n, part(&s, "enc", "many", &id, n, &data).etag));
            whole.extend_from_slice(&data);
        }
        s.complete_upload("enc", "many", &id, &listed).unwrap();
        let path = s.object_path("enc", "many");
        let trailer_len = fs::metadata(&path).unwrap().len();
        assert!(
            trailer_len > u64::from(crate::store::MAX_TRAILER),
            "{trailer_len}"
        );
        drop(s);
        let s = Store::open(dir.path(), small_parts(), Some(fake_key_manager())).unwrap();
        assert_eq!(s.usage().objects, 1);
        assert_eq!(read_all(&s, "enc", "many", 0, u64::MAX), whole);
        assert_eq!(
            read_all(&s, "enc", "many", 7 * 1100 - 3, 7 * 1101 + 2),
            whole[7 * 1100 - 3..7 * 1101 + 2]
        );
    }

    #[test]
    fn uploads_from_before_the_shared_key_complete_by_copying_into_the_first_format() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), small_parts(), Some(fake_key_manager())).unwrap();
        s.create_bucket("enc").unwrap();
        let id = s
            .create_upload("enc", "legacy", None, BTreeMap::new())
            .unwrap();
        // As an upload.json written before this format: no data key.
        s.uploads.lock().unwrap().get_mut(&id).unwrap().enc = None;
        let (a, b) = (pattern(90_000, 1), pattern(30_000, 2));
        let ea = part(&s, "enc", "legacy", &id, 1, &a);
        let eb = part(&s, "enc", "legacy", &id, 2, &b);
        let pa = trailer_of(&s.upload_dir("enc", &id).join("part-00001"))
            .enc
            .unwrap();
        assert!(pa.key_id.is_none(), "a part under its own key, as before");
        let e = s
            .complete_upload("enc", "legacy", &id, &[(1, ea.etag), (2, eb.etag)])
            .unwrap();
        assert!(e.etag.ends_with("-2"));
        let o = s.open_object("enc", "legacy").unwrap();
        assert!(o.trailer.segments.is_none(), "one SMO1 object file");
        drop(o);
        assert!(!s.upload_dir("enc", &id).exists());
        assert!(!s.data_dir("enc", &id).exists());
        let mut whole = a.clone();
        whole.extend_from_slice(&b);
        assert_eq!(read_all(&s, "enc", "legacy", 0, u64::MAX), whole);
        assert_eq!(
            read_all(&s, "enc", "legacy", 89_990, 90_010),
            whole[89_990..90_010]
        );
    }

    #[test]
    fn part_file_names() {
        assert_eq!(part_number("part-00001"), Some(1));
        assert_eq!(part_number("part-10000"), Some(10_000));
        for bad in ["upload.json", "part-1", "part-+0001", "part-000001", "x"] {
            assert_eq!(part_number(bad), None, "{bad}");
        }
    }
}
