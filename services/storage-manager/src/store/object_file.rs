//! The object file, the one on-disk format of objects and multipart
//! parts, and its encryption framing.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | p | payload: the plaintext, or the encrypted chunks of [`crate::crypt`] |
//! | p | m | trailer: JSON [`Trailer`] (key, size, ETag, time, content type, user metadata, wrapped data key) |
//! | p+m | 4 | `m`, u32 little-endian (at most [`MAX_TRAILER`]) |
//! | p+m+4 | 4 | magic `"SMO1"` |
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

use super::{io_err, random, IndexEntry, Store, StoreError};
use crate::crypt::{self, ChunkCipher, CHUNK, OBJECT_ID_LEN, TAG};
use crate::kms::KmsError;

/// Largest object trailer, bytes.
pub const MAX_TRAILER: u32 = 64 * 1024;
const MAGIC: &[u8; 4] = b"SMO1";

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

/// A payload being written to a temp file.
pub(super) struct Stager {
    pub(super) path: PathBuf,
    file: File,
    cipher: Option<ChunkCipher>,
    pub(super) enc: Option<EncInfo>,
    buf: Vec<u8>,
    chunk: u64,
    pub(super) size: u64,
    pub(super) md5: Md5,
}

impl Stager {
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

impl Store {
    /// A new temp file in `tmp/` for a payload, sealed under a fresh data
    /// key when encryption is on.
    pub(super) fn stager(&self) -> Result<Stager, StoreError> {
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
}
