//! Object operations: streaming a body into a staged file and committing
//! it, opening, deleting, listing.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use s3::sigv4::hex;

use super::object_file::{open_object, read_trailer, valid_data_dir, EncInfo, ObjectFile, Stager};
use super::{io_err, random, sync_dir, IndexEntry, PutIf, Store, StoreError};
use crate::crypt::CHUNK;

/// Listing parameters.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// Only keys starting with this.
    pub prefix: String,
    /// Group keys by this (after the prefix) into common prefixes.
    pub delimiter: Option<String>,
    /// Start after this key or common prefix (exclusive).
    pub start_after: Option<String>,
    /// Most entries (objects + common prefixes).
    pub max_keys: usize,
}

/// A listing page.
#[derive(Debug, Clone, Default)]
pub struct ListResult {
    /// Objects.
    pub objects: Vec<(String, IndexEntry)>,
    /// Common prefixes.
    pub prefixes: Vec<String>,
    /// More follow.
    pub truncated: bool,
    /// The last key or common prefix returned (the next page starts after it).
    pub last: Option<String>,
}

impl Store {
    /// Streams `len` bytes of `body` into a staged file; the caller commits it.
    pub(super) fn stage_body(
        &self,
        body: &mut dyn Read,
        len: u64,
        limit: u64,
        under: Option<&EncInfo>,
    ) -> Result<Stager, StoreError> {
        if len > limit {
            return Err(StoreError::EntityTooLarge(limit));
        }
        let mut st = self.stager_under(under)?;
        let result = (|| {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::Body(e)),
                };
                if st.size + n as u64 > len {
                    return Err(StoreError::IncompleteBody {
                        expected: len,
                        got: st.size + n as u64,
                    });
                }
                st.write(&buf[..n])?;
            }
            if st.size != len {
                return Err(StoreError::IncompleteBody {
                    expected: len,
                    got: st.size,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&st.path);
            return Err(e);
        }
        Ok(st)
    }

    /// Renames a finished temp file to the object's path and indexes it.
    pub(super) fn commit(
        &self,
        bucket: &str,
        key: &str,
        tmp: &Path,
        entry: IndexEntry,
        cond: &PutIf,
    ) -> Result<(), StoreError> {
        self.commit_with(bucket, key, tmp, entry, cond, &mut || Ok(()))
    }

    /// The data directory of the multipart object (stored by reference)
    /// at `path`, if it is one.
    pub(super) fn data_dir_of(&self, bucket: &str, path: &Path) -> Option<std::path::PathBuf> {
        let f = fs::File::open(path).ok()?;
        let dir = read_trailer(&f, path).ok()?.segments?.dir;
        valid_data_dir(&dir).then(|| self.data_dir(bucket, &dir))
    }

    /// [`Store::commit`], running `prepare` under the index lock once the
    /// condition holds, just before the rename (a completion moves its
    /// parts there; if `prepare` fails nothing is committed). The data
    /// directory of a multipart object replaced is removed once the rename
    /// is durable.
    pub(super) fn commit_with(
        &self,
        bucket: &str,
        key: &str,
        tmp: &Path,
        entry: IndexEntry,
        cond: &PutIf,
        prepare: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let dest = self.object_path(bucket, key);
        let replaced;
        {
            let mut idx = self.write_index();
            let Some(b) = idx.buckets.get_mut(bucket) else {
                let _ = fs::remove_file(tmp);
                return Err(StoreError::NoSuchBucket(bucket.into()));
            };
            let now = b.objects.get(key).map(|e| e.etag.as_str());
            let refused = match (cond, now) {
                (PutIf::Always, _) => None,
                (PutIf::Absent, Some(_)) => Some(format!(
                    "If-None-Match: * and the key {key:?} exists: nothing was written"
                )),
                (PutIf::Absent, None) => None,
                (PutIf::Matches(_), None) => {
                    let _ = fs::remove_file(tmp);
                    return Err(StoreError::NoSuchKey(key.into()));
                }
                (PutIf::Matches(want), Some(etag)) => (want != "*" && want != etag).then(|| {
                    format!(
                        "If-Match {want:?} and the object's ETag is {etag:?}: nothing was written"
                    )
                }),
            };
            if let Some(why) = refused {
                let _ = fs::remove_file(tmp);
                return Err(StoreError::PreconditionFailed(why));
            }
            replaced = now
                .is_some()
                .then(|| self.data_dir_of(bucket, &dest))
                .flatten();
            if let Some(old) = &replaced {
                if let Err(e) = self.settle_completion(old, &dest) {
                    let _ = fs::remove_file(tmp);
                    return Err(e);
                }
            }
            if let Err(e) = prepare() {
                let _ = fs::remove_file(tmp);
                return Err(e);
            }
            if let Err(e) = fs::rename(tmp, &dest) {
                let _ = fs::remove_file(tmp);
                return Err(io_err("renaming into", &dest)(e));
            }
            b.objects.insert(key.to_string(), entry);
        }
        sync_dir(dest.parent().unwrap_or(&self.root))?;
        if let Some(old) = replaced {
            self.discard_data_dir(&old);
        }
        Ok(())
    }

    /// Before the manifest at `manifest` (naming the part directory
    /// `data`) is replaced or deleted, under the index lock: if the
    /// completion that committed it has not yet removed `upload.json` (it
    /// does so just after its commit), makes its commit durable (fsync of
    /// `objects/`) and removes `upload.json` durably (fsync of `data`).
    /// Without this, a crash after the delete and before the parts go
    /// would leave a directory no object names *with* `upload.json`, which
    /// the start-up recovery takes for a completion cut short and makes an
    /// upload again. Costs nothing (one `stat`) in the usual case.
    pub(super) fn settle_completion(&self, data: &Path, manifest: &Path) -> Result<(), StoreError> {
        let upload_json = data.join("upload.json");
        if !upload_json.exists() {
            return Ok(());
        }
        sync_dir(manifest.parent().unwrap_or(&self.root))?;
        match fs::remove_file(&upload_json) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("removing", &upload_json)(e)),
        }
        sync_dir(data)
    }

    /// Discards the parts of a multipart object that is gone, its change
    /// durable ([`super::pins`]): the directory moves into `tmp/` now and
    /// is removed once no read holds it (logged if that fails: `tmp/` is
    /// emptied at start, and a directory no object names is removed then).
    fn discard_data_dir(&self, dir: &Path) {
        let name = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().to_string());
        let tag = random::<8>().map_or_else(|_| "0".repeat(16), |r| hex(&r));
        let trash = self
            .root
            .join("tmp")
            .join(format!("discarded-{name}-{tag}"));
        self.pins.discard(dir, &trash);
        let _ = sync_dir(dir.parent().unwrap_or(&self.root));
    }

    /// Stores an object from `len` bytes of `body`; durable on return.
    pub fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: &mut dyn Read,
        len: u64,
        content_type: Option<String>,
        meta: BTreeMap<String, String>,
    ) -> Result<IndexEntry, StoreError> {
        self.put_object_if(bucket, key, body, len, content_type, meta, &PutIf::Always)
    }

    /// [`Store::put_object`] if `cond` holds when it commits
    /// ([`StoreError::PreconditionFailed`], or `NoSuchKey` for an `If-Match`
    /// on a missing key, and nothing changed, if not).
    #[allow(clippy::too_many_arguments)]
    pub fn put_object_if(
        &self,
        bucket: &str,
        key: &str,
        body: &mut dyn Read,
        len: u64,
        content_type: Option<String>,
        meta: BTreeMap<String, String>,
        cond: &PutIf,
    ) -> Result<IndexEntry, StoreError> {
        self.put_object_md5(bucket, key, body, len, content_type, meta, cond, None)
    }

    /// [`Store::put_object_if`], and with `content_md5` (a request's
    /// `Content-MD5`) the body must have that MD5: otherwise a
    /// [`crate::chunked::ChecksumMismatch`] (`BadDigest`) and nothing is
    /// stored. The MD5 computed for the ETag is the one checked.
    #[allow(clippy::too_many_arguments)]
    pub fn put_object_md5(
        &self,
        bucket: &str,
        key: &str,
        body: &mut dyn Read,
        len: u64,
        content_type: Option<String>,
        meta: BTreeMap<String, String>,
        cond: &PutIf,
        content_md5: Option<&[u8; 16]>,
    ) -> Result<IndexEntry, StoreError> {
        Self::check_key(key)?;
        Self::check_meta(&meta)?;
        self.check_bucket(bucket)?;
        let mut st = self.stage_body(body, len, self.limits.max_object_size, None)?;
        let etag = st.md5_hex(content_md5)?;
        let (tmp, entry) = st.finish_as(key.into(), etag, content_type, meta)?;
        self.commit(bucket, key, &tmp, entry.clone(), cond)?;
        Ok(entry)
    }

    /// Opens an object for reading.
    pub fn open_object(&self, bucket: &str, key: &str) -> Result<ObjectFile, StoreError> {
        self.check_bucket(bucket)?;
        Self::check_key(key)?;
        let path = self.object_path(bucket, key);
        let obj = match open_object(&path) {
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchKey(key.into()))
            }
            other => other?,
        };
        if obj.trailer.key != key {
            return Err(StoreError::NoSuchKey(key.into()));
        }
        Ok(obj)
    }

    /// Deletes an object (no error if absent, as S3); durable on return.
    pub fn delete_object(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        Self::check_key(key)?;
        let path = self.object_path(bucket, key);
        let data;
        {
            let mut idx = self.write_index();
            let b = idx
                .buckets
                .get_mut(bucket)
                .ok_or_else(|| StoreError::NoSuchBucket(bucket.into()))?;
            if !b.objects.contains_key(key) {
                return Ok(());
            }
            data = self.data_dir_of(bucket, &path);
            if let Some(d) = &data {
                // Fails before anything changed: the object stays.
                self.settle_completion(d, &path)?;
            }
            b.objects.remove(key);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        sync_dir(path.parent().unwrap_or(&self.root))?;
        if let Some(d) = data {
            self.discard_data_dir(&d);
        }
        Ok(())
    }

    /// One listing page.
    pub fn list(&self, bucket: &str, p: &ListParams) -> Result<ListResult, StoreError> {
        use std::ops::Bound;
        let idx = self.read_index();
        let b = idx
            .buckets
            .get(bucket)
            .ok_or_else(|| StoreError::NoSuchBucket(bucket.into()))?;
        let mut out = ListResult::default();
        if p.max_keys == 0 {
            // As S3: nothing listed, and no token to follow.
            return Ok(out);
        }
        let start = match &p.start_after {
            Some(s) if s.as_str() >= p.prefix.as_str() => Bound::Excluded(s.clone()),
            _ => Bound::Included(p.prefix.clone()),
        };
        let delim = p.delimiter.as_deref().filter(|d| !d.is_empty());
        let mut count = 0usize;
        for (k, e) in b.objects.range((start, Bound::Unbounded)) {
            if !k.starts_with(&p.prefix) {
                break;
            }
            if let Some(d) = delim {
                if let Some(i) = k[p.prefix.len()..].find(d) {
                    let cp = &k[..p.prefix.len() + i + d.len()];
                    if out.prefixes.last().map(String::as_str) == Some(cp)
                        || p.start_after.as_deref() == Some(cp)
                    {
                        continue;
                    }
                    if count == p.max_keys {
                        out.truncated = true;
                        break;
                    }
                    out.prefixes.push(cp.to_string());
                    out.last = Some(cp.to_string());
                    count += 1;
                    continue;
                }
            }
            if count == p.max_keys {
                out.truncated = true;
                break;
            }
            out.objects.push((k.clone(), e.clone()));
            out.last = Some(k.clone());
            count += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use crate::store::Limits;

    fn put(s: &Store, b: &str, k: &str, data: &[u8]) -> IndexEntry {
        s.put_object(
            b,
            k,
            &mut &data[..],
            data.len() as u64,
            None,
            BTreeMap::new(),
        )
        .unwrap()
    }

    fn get(s: &Store, b: &str, k: &str, start: u64, end: u64) -> Vec<u8> {
        let o = s.open_object(b, k).unwrap();
        let mut out = Vec::new();
        s.reader(o, start, end)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn of_racing_create_only_writes_exactly_one_wins_and_compare_and_swap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(dir.path(), Limits::default(), None).unwrap());
        s.create_bucket("locks").unwrap();
        for round in 0..20 {
            let key = format!("lock-{round}");
            let wins: Vec<bool> = (0..4u8)
                .map(|i| {
                    let (s, key) = (s.clone(), key.clone());
                    std::thread::spawn(move || {
                        let data = [i; 64 * 1024];
                        s.put_object_if(
                            "locks",
                            &key,
                            &mut &data[..],
                            data.len() as u64,
                            None,
                            BTreeMap::new(),
                            &PutIf::Absent,
                        )
                        .map_err(|e| assert!(matches!(e, StoreError::PreconditionFailed(_)), "{e}"))
                        .is_ok()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            assert_eq!(
                wins.iter().filter(|w| **w).count(),
                1,
                "round {round}: {wins:?}"
            );
        }
        let first = put(&s, "locks", "cas", b"one");
        let swap = |etag: &str, data: &[u8]| {
            s.put_object_if(
                "locks",
                "cas",
                &mut &data[..],
                data.len() as u64,
                None,
                BTreeMap::new(),
                &PutIf::Matches(etag.into()),
            )
        };
        let second = swap(&first.etag, b"two").unwrap();
        assert!(matches!(
            swap(&first.etag, b"three"),
            Err(StoreError::PreconditionFailed(_))
        ));
        assert_eq!(get(&s, "locks", "cas", 0, 3), b"two");
        assert_eq!(swap(&second.etag, b"four").unwrap().size, 4);
    }

    /// A `Content-MD5` is checked against the MD5 that makes the ETag,
    /// inline (small) and on the MD5 thread (over a MiB): a wrong one
    /// stores nothing and leaves no temp file; a right one stores the
    /// object with that ETag. Parts likewise.
    #[test]
    fn content_md5_is_checked_by_the_etag_md5() {
        use md5::Digest as _;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        s.create_bucket("bkt").unwrap();
        for len in [5usize, 3 << 20] {
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 249).unwrap()).collect();
            let good: [u8; 16] = md5::Md5::digest(&data).into();
            let mut bad = good;
            bad[15] ^= 1;
            let (k, m) = (format!("k{len}"), format!("m{len}"));
            let put_md5 = |k: &str, md5: &[u8; 16]| {
                s.put_object_md5(
                    "bkt",
                    k,
                    &mut &data[..],
                    len as u64,
                    None,
                    BTreeMap::new(),
                    &PutIf::Always,
                    Some(md5),
                )
            };
            match put_md5(&k, &bad) {
                Err(StoreError::Body(e)) => assert!(e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<crate::chunked::ChecksumMismatch>())
                    .is_some()),
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                s.open_object("bkt", &k),
                Err(StoreError::NoSuchKey(_))
            ));
            assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
            let e = put_md5(&k, &good).unwrap();
            assert_eq!(e.etag, hex(&good));
            assert_eq!(get(&s, "bkt", &k, 0, u64::MAX), data);

            let id = s.create_upload("bkt", &m, None, BTreeMap::new()).unwrap();
            let part = |md5: &[u8; 16]| {
                s.upload_part_md5("bkt", &m, &id, 1, &mut &data[..], len as u64, Some(md5))
            };
            assert!(matches!(part(&bad), Err(StoreError::Body(_))));
            assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
            assert_eq!(part(&good).unwrap().etag, hex(&good));
        }
    }

    #[test]
    fn buckets_objects_listing_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        assert!(matches!(
            s.create_bucket("Bad_Name"),
            Err(StoreError::InvalidBucketName(_))
        ));
        s.create_bucket("bk1").unwrap();
        assert!(matches!(
            s.create_bucket("bk1"),
            Err(StoreError::BucketExists(_))
        ));
        let e = put(&s, "bk1", "a/1", b"hello");
        assert_eq!(e.etag, "5d41402abc4b2a76b9719d911017c592");
        for k in ["a/2", "a/b/3", "b/1", "c"] {
            put(&s, "bk1", k, k.as_bytes());
        }
        assert_eq!(get(&s, "bk1", "a/1", 1, 3), b"el");
        assert!(matches!(
            s.open_object("bk1", "zz"),
            Err(StoreError::NoSuchKey(_))
        ));
        assert!(matches!(
            s.put_object("bk1", "x", &mut &b"abc"[..], 4, None, BTreeMap::new()),
            Err(StoreError::IncompleteBody {
                expected: 4,
                got: 3
            })
        ));
        let p = ListParams {
            prefix: String::new(),
            delimiter: Some("/".into()),
            start_after: None,
            max_keys: 2,
        };
        let r = s.list("bk1", &p).unwrap();
        assert_eq!(r.prefixes, ["a/", "b/"]);
        assert!(r.truncated);
        let r = s
            .list(
                "bk1",
                &ListParams {
                    start_after: r.last,
                    ..p.clone()
                },
            )
            .unwrap();
        assert_eq!(
            r.objects.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert!(!r.truncated);
        let r = s
            .list(
                "bk1",
                &ListParams {
                    prefix: "a/".into(),
                    max_keys: 1000,
                    ..p.clone()
                },
            )
            .unwrap();
        assert_eq!(r.objects.len(), 2);
        assert_eq!(r.prefixes, ["a/b/"]);
        let none = s
            .list(
                "bk1",
                &ListParams {
                    max_keys: 0,
                    ..p.clone()
                },
            )
            .unwrap();
        assert!(none.objects.is_empty() && none.prefixes.is_empty() && !none.truncated);
        assert!(matches!(
            s.delete_bucket("bk1"),
            Err(StoreError::BucketNotEmpty(_))
        ));
        s.delete_object("bk1", "c").unwrap();
        s.delete_object("bk1", "c").unwrap();
        drop(s);
        let s = Store::open(dir.path(), Limits::default(), None).unwrap();
        assert_eq!(s.usage().objects, 4);
        assert_eq!(get(&s, "bk1", "a/b/3", 0, 100), b"a/b/3");
    }
}
