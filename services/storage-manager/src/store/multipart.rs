//! Multipart uploads: each part is an object file in the upload's
//! directory (its own data key); completing streams the parts, decrypting
//! and re-encrypting, into one new object file, commits it, then removes
//! the upload directory. A crash between the two leaves a stale upload
//! directory (the object is complete); aborting it is harmless, and so is
//! its expiry.
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
fn part_number(file_name: &str) -> Option<u32> {
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
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(StoreError::InvalidPartNumber);
        }
        self.check_bucket(bucket)?;
        self.upload(bucket, key, id)?;
        let mut st = self.stage_body(body, len, self.limits.max_part_size)?;
        let etag = hex(&std::mem::take(&mut st.md5).finalize());
        let (tmp, entry) = st.finish_as(format!("{key}#part{n}"), etag, None, BTreeMap::new())?;
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

    #[test]
    fn part_file_names() {
        assert_eq!(part_number("part-00001"), Some(1));
        assert_eq!(part_number("part-10000"), Some(10_000));
        for bad in ["upload.json", "part-1", "part-+0001", "part-000001", "x"] {
            assert_eq!(part_number(bad), None, "{bad}");
        }
    }
}
