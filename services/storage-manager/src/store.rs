//! Buckets and objects on disk, with an in-memory index.
//!
//! Layout under the data directory:
//!
//! ```text
//! buckets/<bucket>/bucket.json                 {"created": unix secs}
//! buckets/<bucket>/objects/<hex sha256(key)>   object file (`object_file`)
//! buckets/<bucket>/uploads/<upload id>/upload.json, part-00001, ...
//! buckets/<bucket>/data/<upload id>/part-00001, ...  parts of a completed multipart object
//! tmp/                                         files being written (emptied at start)
//! ```
//!
//! A write goes to a new file in `tmp/`, is fsynced, renamed over the
//! object's path and the directory is fsynced, all before the answer: the
//! rename is the commit point, so `kill -9` or power loss leaves the old
//! object or the new one, never a mix, and an acknowledged write is on disk.
//! Deletes unlink and fsync the directory before answering.
//!
//! **Index**: every object's size, ETag and time live in memory (rebuilt at
//! start by reading each file's trailer), so listings need no disk access.
//! This costs about 100 bytes plus the key per object: budget ~150 MB per
//! million objects; start time grows with the object count.
//!
//! One `impl Store` per role: `object_file` (the object-file format and
//! its encryption framing: staging, trailers, readers), `paths` (bucket
//! names, keys and where they live), `buckets` and `objects` (the bucket
//! and object operations, listings), `multipart` (uploads, parts,
//! completion).
//!
//! Limits ([`Limits`]): object and part sizes, 1..=[`MAX_PARTS`] parts,
//! keys of 1..=[`MAX_KEY_LEN`] bytes, user metadata up to
//! [`MAX_USER_META`] bytes, S3 bucket naming rules ([`valid_bucket_name`]).

mod buckets;
mod multipart;
mod object_file;
mod objects;
mod paths;
mod pins;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::kms::{KeyManager, KmsError};

pub use multipart::{
    Expired, PartSummary, UploadInfo, UploadList, UploadListParams, UploadSummary,
};
pub use object_file::{EncInfo, ObjectFile, Segment, Segments, Trailer, MAX_TRAILER};
pub use objects::{ListParams, ListResult};
pub use paths::valid_bucket_name;

use object_file::read_trailer;

/// Longest key, bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Most parts in a multipart upload.
pub const MAX_PARTS: u32 = 10_000;
/// Largest user metadata (`x-amz-meta-*` names and values), bytes.
pub const MAX_USER_META: usize = 2048;

/// The condition of a write (`If-None-Match: *`, `If-Match` on PUT and
/// CompleteMultipartUpload), checked under the index lock at commit, so two
/// writers racing for a create-only key cannot both win.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PutIf {
    /// Unconditional.
    #[default]
    Always,
    /// Only if no object has the key (`If-None-Match: *`).
    Absent,
    /// Only if the object's ETag is this one (`If-Match`, without quotes;
    /// `*` = any existing object).
    Matches(String),
}

/// Size limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest object (single PUT or completed multipart), bytes.
    pub max_object_size: u64,
    /// Largest part, bytes.
    pub max_part_size: u64,
    /// Smallest part except the last, bytes.
    pub min_part_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_object_size: 5 << 30,
            max_part_size: 512 << 20,
            min_part_size: 5 << 20,
        }
    }
}

/// A store failure; each maps to an S3 error ([`StoreError::s3_code`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bucket does not exist.
    #[error("the bucket {0:?} does not exist")]
    NoSuchBucket(String),
    /// The key does not exist.
    #[error("the key {0:?} does not exist")]
    NoSuchKey(String),
    /// The bucket exists already.
    #[error("the bucket {0:?} already exists and is yours")]
    BucketExists(String),
    /// The bucket still holds objects.
    #[error("the bucket {0:?} is not empty")]
    BucketNotEmpty(String),
    /// Not a valid bucket name.
    #[error("invalid bucket name {0:?}: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit, not an IP address")]
    InvalidBucketName(String),
    /// Key empty or too long.
    #[error("keys are 1 to {MAX_KEY_LEN} bytes")]
    KeyTooLong,
    /// Over a size limit.
    #[error("the body is over the limit of {0} bytes")]
    EntityTooLarge(u64),
    /// A part other than the last is under the minimum.
    #[error("part {0} is smaller than the minimum part size of {1} bytes")]
    EntityTooSmall(u32, u64),
    /// The body ended early or ran long.
    #[error("the body has {got} bytes, the request declared {expected}")]
    IncompleteBody {
        /// Declared.
        expected: u64,
        /// Read.
        got: u64,
    },
    /// Reading the request body failed (or a body check failed).
    #[error("reading the request body: {0}")]
    Body(std::io::Error),
    /// User metadata over [`MAX_USER_META`].
    #[error("user metadata is over {MAX_USER_META} bytes")]
    MetadataTooLarge,
    /// Unknown upload id.
    #[error("the multipart upload {0:?} does not exist (completed, aborted or never created)")]
    NoSuchUpload(String),
    /// A listed part is missing or has another ETag.
    #[error("{0}")]
    InvalidPart(String),
    /// Parts not in ascending order.
    #[error("the parts are not in ascending order")]
    InvalidPartOrder,
    /// A conditional write's precondition did not hold; nothing changed.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Part number out of range.
    #[error("part numbers are 1 to {MAX_PARTS}")]
    InvalidPartNumber,
    /// key-manager failed: nothing was written.
    #[error("encryption keys unavailable, nothing was stored: {0}")]
    Kms(#[from] KmsError),
    /// A file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A stored file is damaged.
    #[error("stored object {} is damaged: {reason}", path.display())]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Randomness unavailable.
    #[error("no randomness: {0}")]
    Random(String),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What the index keeps per object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Size, bytes.
    pub size: u64,
    /// ETag (no quotes).
    pub etag: String,
    /// Unix seconds.
    pub modified: u64,
}

#[derive(Debug, Default)]
struct BucketEntry {
    created: u64,
    objects: BTreeMap<String, IndexEntry>,
}

#[derive(Debug, Default)]
struct Index {
    buckets: BTreeMap<String, BucketEntry>,
}

/// Totals for the capacity report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Buckets.
    pub buckets: u64,
    /// Objects.
    pub objects: u64,
    /// Plaintext bytes stored.
    pub bytes: u64,
    /// In-progress multipart uploads.
    pub uploads: u64,
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(b)
}

/// `fsync`s a directory (making renames and unlinks in it durable).
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    service_runtime::durable::sync_dir(dir).map_err(|e| StoreError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    })
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(bytes).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

/// What the object files of a bucket name under its `data/`, read at start.
#[derive(Debug, Default)]
struct DataRefs {
    /// Each directory a manifest names, with the part numbers it lists.
    dirs: std::collections::HashMap<String, std::collections::HashSet<u32>>,
    /// Some object file could not be read (it may name a directory): no
    /// directory that might be its parts is removed.
    unreadable: bool,
}

/// Is `name` the file of a part listed in `listed`?
fn is_listed_part(name: &str, listed: &std::collections::HashSet<u32>) -> bool {
    multipart::part_number(name).is_some_and(|n| listed.contains(&n))
}

/// Start-up clean-up of `bucket_dir/data/`, the sweep that completes
/// whatever a crash cut short:
///
/// * a directory a committed manifest names keeps exactly the parts that
///   manifest lists: `upload.json` and the parts the completion did not
///   list (what the completion removes after its commit) go;
/// * one no manifest names that still has `upload.json` (and no upload of
///   its id exists) is a completion cut short before its commit: it moves
///   back to `uploads/`, the upload intact;
/// * any other is the parts of a deleted or replaced object: removed,
///   unless an object file of the bucket could not be read
///   ([`DataRefs::unreadable`]), when it is kept (and logged).
///
/// Never removed: a part a committed manifest lists, anything under
/// `uploads/` with its `upload.json` (a live upload).
fn recover_data_dirs(bucket_dir: &Path, udir: &Path, refs: &DataRefs) {
    let ddir = bucket_dir.join("data");
    let Ok(rd) = fs::read_dir(&ddir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        let upload_json = path.join("upload.json");
        if let Some(listed) = refs.dirs.get(&name) {
            let Ok(files) = fs::read_dir(&path) else {
                continue;
            };
            let mut removed = 0usize;
            for f in files.flatten() {
                let fname = f.file_name().to_string_lossy().to_string();
                if is_listed_part(&fname, listed) {
                    continue;
                }
                let p = f.path();
                let r = if f.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                match r {
                    Ok(()) => removed += 1,
                    Err(e) => eprintln!("storage-manager: removing {}: {e}", p.display()),
                }
            }
            if removed > 0 {
                let _ = sync_dir(&path);
            }
        } else if upload_json.exists() && !udir.join(&name).exists() {
            let _ = fs::create_dir_all(udir);
            match fs::rename(&path, udir.join(&name)) {
                Ok(()) => eprintln!(
                    "storage-manager: multipart upload {name} was being completed when storage-manager stopped: it is an upload again"
                ),
                Err(e) => eprintln!("storage-manager: restoring {}: {e}", path.display()),
            }
        } else if refs.unreadable {
            eprintln!(
                "storage-manager: keeping {}: no object names it, but an object file of the bucket could not be read",
                path.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&path) {
            eprintln!("storage-manager: removing {}: {e}", path.display());
        }
    }
    let _ = sync_dir(&ddir);
    let _ = sync_dir(udir);
}

/// The store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    index: RwLock<Index>,
    uploads: Mutex<HashMap<String, UploadInfo>>,
    limits: Limits,
    kms: Option<Arc<KeyManager>>,
    /// The part directories being read ([`pins`]).
    pins: pins::Pins,
}

impl Store {
    /// Opens (or creates) the store in `root`; `kms: None` stores plaintext.
    pub fn open(
        root: &Path,
        limits: Limits,
        kms: Option<Arc<KeyManager>>,
    ) -> Result<Store, StoreError> {
        for d in ["buckets", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err("listing", &tmp))? {
            let p = e.map_err(io_err("listing", &tmp))?.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(io_err("removing", &p))?;
        }
        let mut index = Index::default();
        let mut uploads = HashMap::new();
        let bdir = root.join("buckets");
        for e in fs::read_dir(&bdir).map_err(io_err("listing", &bdir))? {
            let e = e.map_err(io_err("listing", &bdir))?;
            let name = e.file_name().to_string_lossy().to_string();
            if !valid_bucket_name(&name) {
                continue;
            }
            let dir = e.path();
            let created = fs::read(dir.join("bucket.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["created"].as_u64())
                .unwrap_or(0);
            let mut entry = BucketEntry {
                created,
                objects: BTreeMap::new(),
            };
            let odir = dir.join("objects");
            let mut refs = DataRefs::default();
            for o in fs::read_dir(&odir).map_err(io_err("listing", &odir))? {
                let p = o.map_err(io_err("listing", &odir))?.path();
                match File::open(&p)
                    .map_err(io_err("opening", &p))
                    .and_then(|f| read_trailer(&f, &p))
                {
                    Ok(t) => {
                        if let Some(s) = &t.segments {
                            refs.dirs
                                .entry(s.dir.clone())
                                .or_default()
                                .extend(s.parts.iter().map(|p| p.n));
                        }
                        entry.objects.insert(
                            t.key.clone(),
                            IndexEntry {
                                size: t.size,
                                etag: t.etag,
                                modified: t.modified,
                            },
                        );
                    }
                    Err(e) => {
                        refs.unreadable = true;
                        eprintln!("storage-manager: skipping {}: {e}", p.display());
                    }
                }
            }
            let udir = dir.join("uploads");
            recover_data_dirs(&dir, &udir, &refs);
            if let Ok(rd) = fs::read_dir(&udir) {
                for u in rd.flatten() {
                    let id = u.file_name().to_string_lossy().to_string();
                    match fs::read(u.path().join("upload.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<UploadInfo>(&b).ok())
                    {
                        Some(info) => {
                            uploads.insert(id, info);
                        }
                        None => {
                            let _ = fs::remove_dir_all(u.path());
                        }
                    }
                }
            }
            index.buckets.insert(name, entry);
        }
        Ok(Store {
            root: root.to_path_buf(),
            index: RwLock::new(index),
            uploads: Mutex::new(uploads),
            limits,
            kms,
            pins: pins::Pins::default(),
        })
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Is encryption on?
    pub fn encrypted(&self) -> bool {
        self.kms.is_some()
    }

    /// The key-manager client, if encryption is on.
    pub fn kms(&self) -> Option<&Arc<KeyManager>> {
        self.kms.as_ref()
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Totals.
    pub fn usage(&self) -> Usage {
        let idx = self.read_index();
        let mut u = Usage {
            buckets: idx.buckets.len() as u64,
            ..Usage::default()
        };
        for b in idx.buckets.values() {
            u.objects += b.objects.len() as u64;
            u.bytes += b.objects.values().map(|e| e.size).sum::<u64>();
        }
        u.uploads = self.uploads.lock().map_or(0, |m| m.len() as u64);
        u
    }
}
