//! Multipart uploads: each part is an object file in the upload's
//! directory (its own data key); completing streams the parts, decrypting
//! and re-encrypting, into one new object file, commits it, then removes
//! the upload directory. A crash between the two leaves a stale upload
//! directory (the object is complete); aborting it is harmless.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;

use md5::{Digest as _, Md5};
use s3::sigv4::hex;
use s3::timefmt;
use serde::{Deserialize, Serialize};

use super::object_file::{hex_decode, open_object};
use super::{io_err, random, sync_dir, write_file_synced};
use super::{IndexEntry, PutIf, Store, StoreError, MAX_PARTS};
use crate::crypt::CHUNK;

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
        let id = hex(&random::<16>()?);
        let info = UploadInfo {
            bucket: bucket.into(),
            key: key.into(),
            created: timefmt::now(),
            content_type,
            meta,
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

    /// Stores part `n` of an upload; returns its ETag (hex MD5).
    pub fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        n: u32,
        body: &mut dyn Read,
        len: u64,
    ) -> Result<String, StoreError> {
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(StoreError::InvalidPartNumber);
        }
        self.check_bucket(bucket)?;
        self.upload(bucket, key, id)?;
        let mut st = self.stage_body(body, len, self.limits.max_part_size)?;
        let etag = hex(&std::mem::take(&mut st.md5).finalize());
        let (tmp, _) = st.finish_as(
            format!("{key}#part{n}"),
            etag.clone(),
            None,
            BTreeMap::new(),
        )?;
        let dir = self.upload_dir(bucket, id);
        let dest = dir.join(format!("part-{n:05}"));
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            // The upload was aborted or completed meanwhile.
            if !dir.exists() {
                return Err(StoreError::NoSuchUpload(id.into()));
            }
            return Err(io_err("renaming into", &dest)(e));
        }
        sync_dir(&dir)?;
        Ok(etag)
    }

    /// Completes an upload from `(part number, ETag)` pairs.
    pub fn complete_upload(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<IndexEntry, StoreError> {
        self.check_bucket(bucket)?;
        let info = self.upload(bucket, key, id)?;
        if parts.is_empty() || parts.len() > MAX_PARTS as usize {
            return Err(StoreError::InvalidPart(format!(
                "a completion lists 1 to {MAX_PARTS} parts"
            )));
        }
        if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StoreError::InvalidPartOrder);
        }
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
            files.push(obj);
        }
        if total > self.limits.max_object_size {
            return Err(StoreError::EntityTooLarge(self.limits.max_object_size));
        }
        let mut st = self.stager()?;
        let copy = (|| {
            let mut buf = vec![0u8; CHUNK];
            for obj in files {
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
        let etag = format!("{}-{}", hex(&Md5::digest(&md5s)), parts.len());
        let (tmp, entry) = st.finish_as(key.into(), etag, info.content_type, info.meta)?;
        // Claim the upload so a concurrent completion or abort cannot race.
        let claimed = self.uploads.lock().ok().and_then(|mut m| m.remove(id));
        if claimed.is_none() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::NoSuchUpload(id.into()));
        }
        self.commit(bucket, key, &tmp, entry.clone(), &PutIf::Always)?;
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
}
