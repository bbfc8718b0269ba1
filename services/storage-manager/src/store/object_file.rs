//! The object file, the one on-disk format of objects and multipart
//! parts, and its encryption framing.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | p | payload: the plaintext, or the encrypted chunks of [`crate::crypt`] |
//! | p | m | trailer: JSON [`Trailer`] (key, size, ETag, time, content type, user metadata, wrapped data key) |
//! | p+m | 4 | `m`, u32 little-endian (at most [`MAX_TRAILER`]; [`MAX_MANIFEST`] for `SMO2`) |
//! | p+m+4 | 4 | magic `"SMO1"`, or `"SMO2"` for a multipart manifest |
//!
//! **Multipart objects (`SMO2`)** are stored by reference: the object file
//! has no payload (`p` = 0) and its trailer lists the parts
//! ([`Segments`]: the directory `data/<upload id>/` of the bucket and each
//! part's number, plaintext size and nonce prefix). The part files are the
//! object files their UploadPart wrote (payload, then the part's own
//! trailer), sealed once under the upload's data key (fetched at
//! CreateMultipartUpload, wrapped in `upload.json`) with a random
//! per-part nonce prefix ([`crate::crypt`]); completion moves the upload
//! directory to `data/` and commits the manifest, so no byte of data is
//! read or written again. A read pins the part directory and opens each
//! part as it reaches it (`super::pins`): however many parts (up to
//! [`super::MAX_PARTS`]), it holds two file descriptors, and a delete or
//! overwrite meanwhile does not cut it short (the parts are removed when
//! the last read ends). Files of the first format (`SMO1`, every object
//! before this and every single PUT) are read as before: the magic tells
//! the two apart.
//!
//! Written by a `Stager` (a temp file in `tmp/`: the payload in 64 KiB
//! chunks, sealed under a fresh data key from key-manager when encryption
//! is on, then the trailer, then fsync); read through [`ObjectFile`] and
//! [`Store::reader`] (plaintext ranges, every encrypted chunk
//! authenticated before any of its bytes is returned).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use s3::sigv4::hex;
use s3::timefmt;
use serde::{Deserialize, Serialize};

use super::pins::DirPin;
use super::{io_err, random, IndexEntry, Store, StoreError};
use crate::chunked::ChecksumMismatch;
use crate::crypt::{self, ChunkCipher, CHUNK, OBJECT_ID_LEN, TAG};
use crate::kms::KmsError;

/// Largest object trailer, bytes.
pub const MAX_TRAILER: u32 = 64 * 1024;
/// Largest multipart manifest trailer, bytes: 10 000 parts of ~70 bytes each
/// (number, size, nonce prefix) and the object's metadata.
pub const MAX_MANIFEST: u32 = 2 * 1024 * 1024;
const MAGIC: &[u8; 4] = b"SMO1";
/// The magic of a multipart manifest (a trailer with [`Segments`], no payload).
const MAGIC_MANIFEST: &[u8; 4] = b"SMO2";

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
    /// The data key's aad (hex) when it is not `id`: a multipart part sealed
    /// under its upload's data key, `id` being the part's own nonce prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// One part of a multipart object stored by reference.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// Part number (file `part-NNNNN` of the data directory).
    pub n: u32,
    /// Plaintext size.
    pub size: u64,
    /// Nonce prefix (hex) of the part's chunks; `None` in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Where the data of a multipart object is: `buckets/<b>/data/<dir>/part-NNNNN`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Segments {
    /// The directory under the bucket's `data/` (the upload id).
    pub dir: String,
    /// The parts, in object order.
    pub parts: Vec<Segment>,
}

/// Is `dir` an upload id (32 hex digits), so a safe directory name?
pub(super) fn valid_data_dir(dir: &str) -> bool {
    dir.len() == 32 && dir.bytes().all(|b| b.is_ascii_hexdigit())
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
    /// A multipart object stored by reference (magic `SMO2`): its parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Segments>,
}

/// A payload being written to a temp file.
pub(super) struct Stager {
    pub(super) path: PathBuf,
    file: File,
    cipher: Option<ChunkCipher>,
    pub(super) enc: Option<EncInfo>,
    buf: Vec<u8>,
    chunk: u64,
    pub(super) size: u64,
    md5: Md5,
}

impl Stager {
    /// The hex MD5 of the payload written so far (the ETag of a single PUT
    /// or a part). With `expected` (a request's `Content-MD5`), a payload
    /// whose MD5 differs is a [`ChecksumMismatch`] (S3's `BadDigest`): one
    /// MD5 both checks the body and makes its ETag. The temp file is
    /// removed on failure.
    pub(super) fn md5_hex(&mut self, expected: Option<&[u8; 16]>) -> Result<String, StoreError> {
        let d: [u8; 16] = std::mem::take(&mut self.md5).finalize().into();
        if expected.is_some_and(|e| *e != d) {
            let _ = fs::remove_file(&self.path);
            return Err(StoreError::Body(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                ChecksumMismatch("Content-MD5".into()),
            )));
        }
        Ok(hex(&d))
    }

    pub(super) fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
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
            let tag = c
                .seal(self.chunk, last, &mut self.buf)
                .map_err(|e| io_err("encrypting", &self.path)(e.into()))?;
            self.buf.extend_from_slice(&tag);
            self.chunk += 1;
        }
        self.file
            .write_all(&self.buf)
            .map_err(io_err("writing", &self.path))?;
        self.buf.clear();
        Ok(())
    }

    /// Finishes the file as object `key` with `etag`, modified now: writes
    /// the trailer and fsyncs. Returns the temp path and the object's index
    /// entry; the temp file is removed on failure.
    pub(super) fn finish_as(
        self,
        key: String,
        etag: String,
        content_type: Option<String>,
        meta: BTreeMap<String, String>,
    ) -> Result<(PathBuf, IndexEntry), StoreError> {
        let entry = IndexEntry {
            size: self.size,
            etag: etag.clone(),
            modified: timefmt::now(),
        };
        let trailer = Trailer {
            key,
            size: self.size,
            etag,
            modified: entry.modified,
            content_type,
            meta,
            enc: self.enc.clone(),
            segments: None,
        };
        let path = self.path.clone();
        let tmp = self.finish(&trailer).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })?;
        Ok((tmp, entry))
    }

    /// Writes the trailer and fsyncs; returns the temp path.
    fn finish(mut self, trailer: &Trailer) -> Result<PathBuf, StoreError> {
        self.flush_chunk(true)?;
        let tail = encode_trailer(trailer, &self.path)?;
        self.file
            .write_all(&tail)
            .map_err(io_err("writing", &self.path))?;
        self.file
            .sync_all()
            .map_err(io_err("syncing", &self.path))?;
        Ok(self.path)
    }
}

/// The trailer, its length and the magic, as they end an object file.
fn encode_trailer(trailer: &Trailer, path: &Path) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(trailer).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|l| {
            *l <= if trailer.segments.is_some() {
                MAX_MANIFEST
            } else {
                MAX_TRAILER
            }
        })
        .ok_or(StoreError::MetadataTooLarge)?;
    let mut tail = json;
    tail.extend_from_slice(&len.to_le_bytes());
    tail.extend_from_slice(if trailer.segments.is_some() {
        MAGIC_MANIFEST
    } else {
        MAGIC
    });
    Ok(tail)
}

/// An object file opened for reading.
#[derive(Debug)]
pub struct ObjectFile {
    file: File,
    path: PathBuf,
    /// Its trailer.
    pub trailer: Trailer,
}

/// Reads the trailer of an object file (checked against the file size).
pub(super) fn read_trailer(file: &File, path: &Path) -> Result<Trailer, StoreError> {
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
    let manifest = match &foot[4..] {
        m if m == MAGIC => false,
        m if m == MAGIC_MANIFEST => true,
        _ => return Err(corrupt("no SMO1 or SMO2 magic")),
    };
    let m = u32::from_le_bytes([foot[0], foot[1], foot[2], foot[3]]);
    let max = if manifest { MAX_MANIFEST } else { MAX_TRAILER };
    if m > max || u64::from(m) > len - 8 {
        return Err(corrupt("trailer length out of range"));
    }
    let mut json = vec![0u8; m as usize];
    file.read_exact_at(&mut json, len - 8 - u64::from(m))
        .map_err(io_err("reading", path))?;
    let t: Trailer =
        serde_json::from_slice(&json).map_err(|e| corrupt(&format!("trailer: {e}")))?;
    let payload = len - 8 - u64::from(m);
    if manifest != t.segments.is_some() {
        return Err(corrupt("the magic and the trailer disagree on the format"));
    }
    if let Some(s) = &t.segments {
        let sum = s.parts.iter().try_fold(0u64, |a, p| a.checked_add(p.size));
        if !valid_data_dir(&s.dir) || sum != Some(t.size) || payload != 0 {
            return Err(corrupt("bad multipart manifest"));
        }
        let sealed = t.enc.is_some();
        if s.parts.iter().any(|p| p.id.is_some() != sealed) {
            return Err(corrupt(
                "multipart manifest: nonce prefixes do not match the encryption",
            ));
        }
        return Ok(t);
    }
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

/// Opens the object file at `path` and reads its trailer.
pub(super) fn open_object(path: &Path) -> Result<ObjectFile, StoreError> {
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
        let want = usize::try_from(self.end - self.pos).map_or(buf.len(), |n| n.min(buf.len()));
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
            // fits: pos is inside chunk i, so pos - chunk_start < CHUNK.
            #[allow(clippy::cast_possible_truncation)]
            let off = (self.pos - chunk_start) as usize;
            self.off = off;
            self.valid = usize::try_from(self.end - chunk_start).map_or(clen, |n| n.min(clen));
        }
        let n = (self.valid - self.off).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.off..self.off + n]);
        self.off += n;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Lower- or upper-case hex to bytes; `None` if it is not hex.
pub(super) fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One part of a multipart object being read.
struct SegmentSource {
    /// Its file name in the part directory (`part-NNNNN`).
    name: String,
    /// Its path when the read started (for messages).
    path: PathBuf,
    /// Opened ahead (the first part), else opened when the read reaches it.
    file: Option<File>,
    /// Plaintext offset of the part in the object.
    start: u64,
    size: u64,
    cipher: Option<ChunkCipher>,
}

/// Reads plaintext bytes `pos..end` of a multipart object across its
/// parts, each through a [`PlainReader`] or [`DecryptReader`]. It holds
/// the part directory pinned ([`super::pins`]) until it is dropped, so a
/// delete or overwrite meanwhile cannot remove a part it has yet to read;
/// parts are opened relative to the pinned directory as the read reaches
/// them (two descriptors at most, whatever the number of parts).
struct SegmentsReader {
    segs: Vec<SegmentSource>,
    next: usize,
    cur: Option<Box<dyn Read + Send>>,
    pos: u64,
    end: u64,
    /// Declared last: released after the part files are closed.
    pin: DirPin,
}

impl Read for SegmentsReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos >= self.end || out.is_empty() {
                return Ok(0);
            }
            if let Some(r) = &mut self.cur {
                let n = r.read(out)?;
                if n > 0 {
                    self.pos += n as u64;
                    return Ok(n);
                }
                self.cur = None;
            }
            let seg = loop {
                let Some(s) = self.segs.get_mut(self.next) else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "multipart object shorter than its manifest says",
                    ));
                };
                self.next += 1;
                if s.start + s.size > self.pos {
                    break s;
                }
            };
            let (from, to) = (self.pos - seg.start, (self.end - seg.start).min(seg.size));
            let file = match seg.file.take() {
                Some(f) => f,
                None => self.pin.open(&seg.name).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("opening {}: {e}", seg.path.display()))
                })?,
            };
            self.cur = Some(match seg.cipher.take() {
                None => Box::new(PlainReader {
                    file,
                    pos: from,
                    end: to,
                }),
                Some(cipher) => Box::new(DecryptReader {
                    file,
                    path: seg.path.clone(),
                    cipher,
                    size: seg.size,
                    pos: from,
                    end: to,
                    buf: Vec::with_capacity(CHUNK + TAG),
                    off: 0,
                    valid: 0,
                }),
            });
        }
    }
}

/// Hex to a 16-byte id.
fn id16(hex_id: &str) -> Option<[u8; OBJECT_ID_LEN]> {
    hex_decode(hex_id).and_then(|v| v.try_into().ok())
}

impl Store {
    /// A new temp file in `tmp/` for a payload, sealed under a fresh data
    /// key when encryption is on.
    pub(super) fn stager(&self) -> Result<Stager, StoreError> {
        self.stager_under(None)
    }

    /// [`Store::stager`], or with `upload` (a multipart upload's key): a
    /// part sealed under that data key with a fresh random nonce prefix.
    pub(super) fn stager_under(&self, upload: Option<&EncInfo>) -> Result<Stager, StoreError> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.tmp", hex(&random::<12>()?)));
        let (cipher, enc) = match (&self.kms, upload) {
            (None, _) => (None, None),
            (Some(kms), None) => {
                let id = random::<OBJECT_ID_LEN>()?;
                let dk = kms.datakey(&id)?;
                (
                    Some(
                        ChunkCipher::new(&dk.plain, id)
                            .map_err(|e| io_err("keying", &path)(e.into()))?,
                    ),
                    Some(EncInfo {
                        id: hex(&id),
                        wrapped: B64.encode(&dk.wrapped),
                        kms_key: kms.key_name().to_string(),
                        key_id: None,
                    }),
                )
            }
            (Some(_), Some(up)) => {
                let prefix = random::<OBJECT_ID_LEN>()?;
                let mut key = self.data_key(up, &path)?;
                let cipher = ChunkCipher::new(&key, prefix);
                key.fill(0);
                (
                    Some(cipher.map_err(|e| io_err("keying", &path)(e.into()))?),
                    Some(EncInfo {
                        id: hex(&prefix),
                        wrapped: up.wrapped.clone(),
                        kms_key: up.kms_key.clone(),
                        key_id: Some(up.key_id.clone().unwrap_or_else(|| up.id.clone())),
                    }),
                )
            }
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("creating", &path))?;
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

    /// The plaintext data key of `enc` (from the cache or key-manager);
    /// the caller zeroes it.
    fn data_key(&self, enc: &EncInfo, path: &Path) -> Result<[u8; 32], StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let aad =
            id16(enc.key_id.as_deref().unwrap_or(&enc.id)).ok_or_else(|| corrupt("bad key id"))?;
        let wrapped = B64
            .decode(&enc.wrapped)
            .map_err(|_| corrupt("bad wrapped key"))?;
        let kms = self.kms.as_ref().ok_or_else(|| {
            StoreError::Kms(KmsError::Answer(
                "the object is encrypted but encryption is off".into(),
            ))
        })?;
        Ok(kms.unwrap_key(&wrapped, &aad)?)
    }

    /// Writes a multipart manifest (no payload, `trailer` with segments)
    /// to a temp file, fsynced; returns its path.
    pub(super) fn write_manifest(&self, trailer: &Trailer) -> Result<PathBuf, StoreError> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.tmp", hex(&random::<12>()?)));
        let tail = encode_trailer(trailer, &path)?;
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&tail)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(io_err("writing", &path)(e));
        }
        Ok(path)
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
        if let Some(segs) = &obj.trailer.segments {
            return self.segments_reader(&obj, segs, start, end);
        }
        match &obj.trailer.enc {
            None => Ok(Box::new(PlainReader {
                file: obj.file,
                pos: start,
                end,
            })),
            Some(enc) => {
                let id = id16(&enc.id).ok_or_else(|| StoreError::Corrupt {
                    path: obj.path.clone(),
                    reason: "bad object id".into(),
                })?;
                let mut key = self.data_key(enc, &obj.path)?;
                let cipher = ChunkCipher::new(&key, id);
                key.fill(0);
                let cipher = cipher.map_err(|e| io_err("keying", &obj.path)(e.into()))?;
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

    /// The reader of a multipart object stored by reference: the parts
    /// overlapping `start..end`, decrypted each with its nonce prefix under
    /// the object's key. The part directory is pinned first
    /// ([`super::pins`]): if it is gone (the object was deleted or replaced
    /// since `obj` was opened) this fails with `NoSuchKey`, before any byte
    /// is read; once pinned, every part stays readable until the reader is
    /// dropped. The first part is opened here, the others as the read
    /// reaches them.
    fn segments_reader(
        &self,
        obj: &ObjectFile,
        segs: &Segments,
        start: u64,
        end: u64,
    ) -> Result<Box<dyn Read + Send>, StoreError> {
        // objects/<hash> -> the bucket directory.
        let bucket_dir =
            obj.path
                .parent()
                .and_then(Path::parent)
                .ok_or_else(|| StoreError::Corrupt {
                    path: obj.path.clone(),
                    reason: "not in a bucket".into(),
                })?;
        let dir = bucket_dir.join("data").join(&segs.dir);
        let pin = match self.pins.pin(&dir) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchKey(obj.trailer.key.clone()))
            }
            Err(e) => return Err(io_err("opening", &dir)(e)),
        };
        let mut key = match &obj.trailer.enc {
            Some(enc) => Some(self.data_key(enc, &obj.path)?),
            None => None,
        };
        let mut out: Vec<SegmentSource> = Vec::new();
        let mut offset = 0u64;
        let mut failed = None;
        for p in &segs.parts {
            let (s, e) = (offset, offset + p.size);
            offset = e;
            if e <= start || s >= end || p.size == 0 {
                continue;
            }
            let name = format!("part-{:05}", p.n);
            let path = dir.join(&name);
            let cipher = match (&key, p.id.as_deref().and_then(id16)) {
                (Some(k), Some(prefix)) => match ChunkCipher::new(k, prefix) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        failed = Some(io_err("keying", &path)(e.into()));
                        break;
                    }
                },
                (None, None) => None,
                _ => {
                    failed = Some(StoreError::Corrupt {
                        path: obj.path.clone(),
                        reason: format!("part {} has no valid nonce prefix", p.n),
                    });
                    break;
                }
            };
            let file = if out.is_empty() {
                match pin.open(&name) {
                    Ok(f) => Some(f),
                    Err(err) => {
                        failed = Some(io_err("opening", &path)(err));
                        break;
                    }
                }
            } else {
                None
            };
            out.push(SegmentSource {
                name,
                path,
                file,
                start: s,
                size: p.size,
                cipher,
            });
        }
        if let Some(k) = &mut key {
            k.fill(0);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Box::new(SegmentsReader {
            segs: out,
            next: 0,
            cur: None,
            pos: start,
            end,
            pin,
        }))
    }
}
