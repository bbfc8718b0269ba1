//! Buckets and objects on disk, with an in-memory index.
//!
//! Layout under the data directory:
//!
//! ```text
//! buckets/<bucket>/bucket.json                 {"created": unix secs}
//! buckets/<bucket>/objects/<hex sha256(key)>   object file (below)
//! buckets/<bucket>/uploads/<upload id>/upload.json, part-00001, ...
//! tmp/                                         files being written (emptied at start)
//! ```
//!
//! **Object file** (also used for multipart parts):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | p | payload: the plaintext, or the encrypted chunks of [`crate::crypt`] |
//! | p | m | trailer: JSON [`Trailer`] (key, size, ETag, time, content type, user metadata, wrapped data key) |
//! | p+m | 4 | `m`, u32 little-endian (at most [`MAX_TRAILER`]) |
//! | p+m+4 | 4 | magic `"SMO1"` |
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
//! **Multipart**: each part is an object file in the upload's directory
//! (its own data key); completing streams the parts, decrypting and
//! re-encrypting, into one new object file, commits it, then removes the
//! upload directory. A crash between the two leaves a stale upload
//! directory (the object is complete); aborting it is harmless.
//!
//! Limits ([`Limits`]): object and part sizes, 1..=[`MAX_PARTS`] parts,
//! keys of 1..=[`MAX_KEY_LEN`] bytes, user metadata up to
//! [`MAX_USER_META`] bytes, S3 bucket naming rules ([`valid_bucket_name`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use s3::sigv4::hex;
use s3::timefmt;
use serde::{Deserialize, Serialize};

use crate::crypt::{self, ChunkCipher, CHUNK, OBJECT_ID_LEN, TAG};
use crate::kms::{KeyManager, KmsError};

/// Longest key, bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Most parts in a multipart upload.
pub const MAX_PARTS: u32 = 10_000;
/// Largest user metadata (`x-amz-meta-*` names and values), bytes.
pub const MAX_USER_META: usize = 2048;
/// Largest object trailer, bytes.
pub const MAX_TRAILER: u32 = 64 * 1024;
const MAGIC: &[u8; 4] = b"SMO1";

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

impl StoreError {
    /// S3 error code and HTTP status.
    pub fn s3_code(&self) -> (&'static str, u16) {
        match self {
            StoreError::NoSuchBucket(_) => ("NoSuchBucket", 404),
            StoreError::NoSuchKey(_) => ("NoSuchKey", 404),
            StoreError::BucketExists(_) => ("BucketAlreadyOwnedByYou", 409),
            StoreError::BucketNotEmpty(_) => ("BucketNotEmpty", 409),
            StoreError::InvalidBucketName(_) => ("InvalidBucketName", 400),
            StoreError::KeyTooLong => ("KeyTooLongError", 400),
            StoreError::EntityTooLarge(_) => ("EntityTooLarge", 400),
            StoreError::EntityTooSmall(..) => ("EntityTooSmall", 400),
            StoreError::IncompleteBody { .. } => ("IncompleteBody", 400),
            StoreError::Body(_) => ("IncompleteBody", 400),
            StoreError::MetadataTooLarge => ("MetadataTooLarge", 400),
            StoreError::NoSuchUpload(_) => ("NoSuchUpload", 404),
            StoreError::InvalidPart(_) => ("InvalidPart", 400),
            StoreError::InvalidPartOrder => ("InvalidPartOrder", 400),
            StoreError::InvalidPartNumber => ("InvalidArgument", 400),
            StoreError::Kms(_) => ("ServiceUnavailable", 503),
            StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::Random(_) => {
                ("InternalError", 500)
            }
        }
    }
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

/// Encryption details of a stored payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncInfo {
    /// Object id, hex (nonce prefix and the data key's aad).
    pub id: String,
    /// key-manager ciphertext of the data key, base64.
    pub wrapped: String,
    /// key-manager key name.
    pub kms_key: String,
}

/// The trailer of an object file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Trailer {
    /// Object key.
    pub key: String,
    /// Plaintext size.
    pub size: u64,
    /// ETag (no quotes).
    pub etag: String,
    /// Last modified, Unix seconds.
    pub modified: u64,
    /// `Content-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// User metadata (`x-amz-meta-<name>`, name lower-case without the prefix).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Encryption, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<EncInfo>,
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

/// Is `name` a valid bucket name?
pub fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.")
        && name.parse::<std::net::Ipv4Addr>().is_err()
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

/// A payload being written to a temp file.
struct Stager {
    path: PathBuf,
    file: File,
    cipher: Option<ChunkCipher>,
    enc: Option<EncInfo>,
    buf: Vec<u8>,
    chunk: u64,
    size: u64,
    md5: Md5,
}

impl Stager {
    fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.md5.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                self.flush_chunk(false)?;
            }
        }
        Ok(())
    }

    fn flush_chunk(&mut self, last: bool) -> Result<(), StoreError> {
        if let Some(c) = &self.cipher {
            let tag = c.seal(self.chunk, last, &mut self.buf);
            self.buf.extend_from_slice(&tag);
            self.chunk += 1;
        }
        self.file
            .write_all(&self.buf)
            .map_err(io_err("writing", &self.path))?;
        self.buf.clear();
        Ok(())
    }

    /// Writes the trailer and fsyncs; returns the temp path.
    fn finish(mut self, trailer: &Trailer) -> Result<PathBuf, StoreError> {
        self.flush_chunk(true)?;
        let json = serde_json::to_vec(trailer).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let len = u32::try_from(json.len())
            .ok()
            .filter(|l| *l <= MAX_TRAILER)
            .ok_or(StoreError::MetadataTooLarge)?;
        let mut tail = json;
        tail.extend_from_slice(&len.to_le_bytes());
        tail.extend_from_slice(MAGIC);
        self.file
            .write_all(&tail)
            .map_err(io_err("writing", &self.path))?;
        self.file
            .sync_all()
            .map_err(io_err("syncing", &self.path))?;
        Ok(self.path)
    }
}

/// An object file opened for reading.
#[derive(Debug)]
pub struct ObjectFile {
    file: File,
    path: PathBuf,
    /// Its trailer.
    pub trailer: Trailer,
}

/// Reads the trailer of an object file.
fn read_trailer(file: &File, path: &Path) -> Result<Trailer, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    if len < 8 {
        return Err(corrupt("shorter than its footer"));
    }
    let mut foot = [0u8; 8];
    file.read_exact_at(&mut foot, len - 8)
        .map_err(io_err("reading", path))?;
    if &foot[4..] != MAGIC {
        return Err(corrupt("no SMO1 magic"));
    }
    let m = u32::from_le_bytes([foot[0], foot[1], foot[2], foot[3]]);
    if m > MAX_TRAILER || u64::from(m) > len - 8 {
        return Err(corrupt("trailer length out of range"));
    }
    let mut json = vec![0u8; m as usize];
    file.read_exact_at(&mut json, len - 8 - u64::from(m))
        .map_err(io_err("reading", path))?;
    let t: Trailer =
        serde_json::from_slice(&json).map_err(|e| corrupt(&format!("trailer: {e}")))?;
    let payload = len - 8 - u64::from(m);
    let expect = if t.enc.is_some() {
        crypt::encrypted_len(t.size)
    } else {
        t.size
    };
    if payload != expect {
        return Err(corrupt(&format!(
            "payload is {payload} bytes, expected {expect}"
        )));
    }
    Ok(t)
}

fn open_object(path: &Path) -> Result<ObjectFile, StoreError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let trailer = read_trailer(&file, path)?;
    Ok(ObjectFile {
        file,
        path: path.to_path_buf(),
        trailer,
    })
}

struct PlainReader {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for PlainReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "object file shorter than its trailer says",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

struct DecryptReader {
    file: File,
    path: PathBuf,
    cipher: ChunkCipher,
    size: u64,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    off: usize,
    valid: usize,
}

impl Read for DecryptReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.off == self.valid {
            if self.pos >= self.end {
                return Ok(0);
            }
            let i = self.pos / CHUNK as u64;
            let clen = crypt::chunk_len(self.size, i);
            let last = i + 1 == crypt::chunk_count(self.size);
            self.buf.resize(clen + TAG, 0);
            self.file
                .read_exact_at(&mut self.buf, i * (CHUNK + TAG) as u64)?;
            let (data, tag) = self.buf.split_at_mut(clen);
            if let Err(e) = self.cipher.open(i, last, data, tag) {
                eprintln!("storage-manager: {}: {e}", self.path.display());
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
            let chunk_start = i * CHUNK as u64;
            self.off = (self.pos - chunk_start) as usize;
            self.valid = ((self.end - chunk_start) as usize).min(clen);
        }
        let n = (self.valid - self.off).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.off..self.off + n]);
        self.off += n;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    index: RwLock<Index>,
    uploads: Mutex<HashMap<String, UploadInfo>>,
    limits: Limits,
    kms: Option<Arc<KeyManager>>,
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
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
            for o in fs::read_dir(&odir).map_err(io_err("listing", &odir))? {
                let p = o.map_err(io_err("listing", &odir))?.path();
                match File::open(&p)
                    .map_err(io_err("opening", &p))
                    .and_then(|f| read_trailer(&f, &p))
                {
                    Ok(t) => {
                        entry.objects.insert(
                            t.key.clone(),
                            IndexEntry {
                                size: t.size,
                                etag: t.etag,
                                modified: t.modified,
                            },
                        );
                    }
                    Err(e) => eprintln!("storage-manager: skipping {}: {e}", p.display()),
                }
            }
            let udir = dir.join("uploads");
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

    fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join("buckets").join(bucket)
    }

    fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.bucket_dir(bucket)
            .join("objects")
            .join(crate::sigv4::sha256_hex(key.as_bytes()))
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

    /// Buckets with their creation times.
    pub fn list_buckets(&self) -> Vec<(String, u64)> {
        self.read_index()
            .buckets
            .iter()
            .map(|(n, b)| (n.clone(), b.created))
            .collect()
    }

    /// Does `bucket` exist?
    pub fn bucket_exists(&self, bucket: &str) -> bool {
        self.read_index().buckets.contains_key(bucket)
    }

    /// Creates a bucket (durably).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        if !valid_bucket_name(bucket) {
            return Err(StoreError::InvalidBucketName(bucket.into()));
        }
        let mut idx = self.write_index();
        if idx.buckets.contains_key(bucket) {
            return Err(StoreError::BucketExists(bucket.into()));
        }
        let staging = self
            .root
            .join("tmp")
            .join(format!("bucket-{}", hex(&random::<8>()?)));
        for d in ["objects", "uploads"] {
            let p = staging.join(d);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let created = timefmt::now();
        write_file_synced(
            &staging.join("bucket.json"),
            serde_json::json!({ "created": created })
                .to_string()
                .as_bytes(),
        )?;
        sync_dir(&staging)?;
        let dest = self.bucket_dir(bucket);
        fs::rename(&staging, &dest).map_err(io_err("renaming into", &dest))?;
        sync_dir(&self.root.join("buckets"))?;
        idx.buckets.insert(
            bucket.into(),
            BucketEntry {
                created,
                objects: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Deletes an empty bucket (aborting its multipart uploads).
    pub fn delete_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        let mut idx = self.write_index();
        match idx.buckets.get(bucket) {
            None => return Err(StoreError::NoSuchBucket(bucket.into())),
            Some(b) if !b.objects.is_empty() => {
                return Err(StoreError::BucketNotEmpty(bucket.into()))
            }
            Some(_) => {}
        }
        let dir = self.bucket_dir(bucket);
        let grave = self
            .root
            .join("tmp")
            .join(format!("deleted-{}", hex(&random::<8>()?)));
        fs::rename(&dir, &grave).map_err(io_err("renaming", &dir))?;
        sync_dir(&self.root.join("buckets"))?;
        idx.buckets.remove(bucket);
        drop(idx);
        if let Ok(mut u) = self.uploads.lock() {
            u.retain(|_, info| info.bucket != bucket);
        }
        let _ = fs::remove_dir_all(&grave);
        Ok(())
    }

    fn check_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        if self.bucket_exists(bucket) {
            Ok(())
        } else {
            Err(StoreError::NoSuchBucket(bucket.into()))
        }
    }

    fn check_key(key: &str) -> Result<(), StoreError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(StoreError::KeyTooLong);
        }
        Ok(())
    }

    fn stager(&self) -> Result<Stager, StoreError> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.tmp", hex(&random::<12>()?)));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("creating", &path))?;
        let (cipher, enc) = match &self.kms {
            None => (None, None),
            Some(kms) => {
                let id = random::<OBJECT_ID_LEN>()?;
                let dk = match kms.datakey(&id) {
                    Ok(dk) => dk,
                    Err(e) => {
                        let _ = fs::remove_file(&path);
                        return Err(e.into());
                    }
                };
                (
                    Some(ChunkCipher::new(&dk.plain, id)),
                    Some(EncInfo {
                        id: hex(&id),
                        wrapped: B64.encode(&dk.wrapped),
                        kms_key: kms.key_name().to_string(),
                    }),
                )
            }
        };
        Ok(Stager {
            path,
            file,
            cipher,
            enc,
            buf: Vec::with_capacity(CHUNK + TAG),
            chunk: 0,
            size: 0,
            md5: Md5::new(),
        })
    }

    /// Streams `len` bytes of `body` into a staged file; the caller commits it.
    fn stage_body(&self, body: &mut dyn Read, len: u64, limit: u64) -> Result<Stager, StoreError> {
        if len > limit {
            return Err(StoreError::EntityTooLarge(limit));
        }
        let mut st = self.stager()?;
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

    fn check_meta(meta: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let n: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        if n > MAX_USER_META {
            return Err(StoreError::MetadataTooLarge);
        }
        Ok(())
    }

    fn finish(st: Stager, trailer: Trailer) -> Result<PathBuf, StoreError> {
        let path = st.path.clone();
        st.finish(&trailer).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })
    }

    /// Renames a finished temp file to the object's path and indexes it.
    fn commit(
        &self,
        bucket: &str,
        key: &str,
        tmp: &Path,
        entry: IndexEntry,
    ) -> Result<(), StoreError> {
        let dest = self.object_path(bucket, key);
        {
            let mut idx = self.write_index();
            let Some(b) = idx.buckets.get_mut(bucket) else {
                let _ = fs::remove_file(tmp);
                return Err(StoreError::NoSuchBucket(bucket.into()));
            };
            if let Err(e) = fs::rename(tmp, &dest) {
                let _ = fs::remove_file(tmp);
                return Err(io_err("renaming into", &dest)(e));
            }
            b.objects.insert(key.to_string(), entry);
        }
        sync_dir(dest.parent().unwrap_or(&self.root))
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
        Self::check_key(key)?;
        Self::check_meta(&meta)?;
        self.check_bucket(bucket)?;
        let mut st = self.stage_body(body, len, self.limits.max_object_size)?;
        let etag = hex(&std::mem::take(&mut st.md5).finalize());
        let entry = IndexEntry {
            size: st.size,
            etag: etag.clone(),
            modified: timefmt::now(),
        };
        let trailer = Trailer {
            key: key.into(),
            size: st.size,
            etag,
            modified: entry.modified,
            content_type,
            meta,
            enc: st.enc.clone(),
        };
        let tmp = Self::finish(st, trailer)?;
        self.commit(bucket, key, &tmp, entry.clone())?;
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

    /// A reader of plaintext bytes `start..end` of `obj`.
    pub fn reader(
        &self,
        obj: ObjectFile,
        start: u64,
        end: u64,
    ) -> Result<Box<dyn Read + Send>, StoreError> {
        let end = end.min(obj.trailer.size);
        let start = start.min(end);
        match &obj.trailer.enc {
            None => Ok(Box::new(PlainReader {
                file: obj.file,
                pos: start,
                end,
            })),
            Some(enc) => {
                let corrupt = |reason: &str| StoreError::Corrupt {
                    path: obj.path.clone(),
                    reason: reason.into(),
                };
                let id: [u8; OBJECT_ID_LEN] = hex_decode(&enc.id)
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| corrupt("bad object id"))?;
                let wrapped = B64
                    .decode(&enc.wrapped)
                    .map_err(|_| corrupt("bad wrapped key"))?;
                let kms = self.kms.as_ref().ok_or_else(|| {
                    StoreError::Kms(KmsError::Answer(
                        "the object is encrypted but encryption is off".into(),
                    ))
                })?;
                let mut key = kms.unwrap_key(&wrapped, &id)?;
                let cipher = ChunkCipher::new(&key, id);
                key.fill(0);
                Ok(Box::new(DecryptReader {
                    file: obj.file,
                    path: obj.path,
                    cipher,
                    size: obj.trailer.size,
                    pos: start,
                    end,
                    buf: Vec::with_capacity(CHUNK + TAG),
                    off: 0,
                    valid: 0,
                }))
            }
        }
    }

    /// Deletes an object (no error if absent, as S3); durable on return.
    pub fn delete_object(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        Self::check_key(key)?;
        let path = self.object_path(bucket, key);
        {
            let mut idx = self.write_index();
            let b = idx
                .buckets
                .get_mut(bucket)
                .ok_or_else(|| StoreError::NoSuchBucket(bucket.into()))?;
            if b.objects.remove(key).is_none() {
                return Ok(());
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        sync_dir(path.parent().unwrap_or(&self.root))
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

    fn upload_dir(&self, bucket: &str, id: &str) -> PathBuf {
        self.bucket_dir(bucket).join("uploads").join(id)
    }

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
        let trailer = Trailer {
            key: format!("{key}#part{n}"),
            size: st.size,
            etag: etag.clone(),
            modified: timefmt::now(),
            content_type: None,
            meta: BTreeMap::new(),
            enc: st.enc.clone(),
        };
        let tmp = Self::finish(st, trailer)?;
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
        let entry = IndexEntry {
            size: st.size,
            etag: etag.clone(),
            modified: timefmt::now(),
        };
        let trailer = Trailer {
            key: key.into(),
            size: st.size,
            etag,
            modified: entry.modified,
            content_type: info.content_type,
            meta: info.meta,
            enc: st.enc.clone(),
        };
        let tmp = Self::finish(st, trailer)?;
        // Claim the upload so a concurrent completion or abort cannot race.
        let claimed = self.uploads.lock().ok().and_then(|mut m| m.remove(id));
        if claimed.is_none() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::NoSuchUpload(id.into()));
        }
        self.commit(bucket, key, &tmp, entry.clone())?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

    use super::*;

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
