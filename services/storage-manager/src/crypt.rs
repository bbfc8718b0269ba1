//! Chunked encryption of object payloads at rest.
//!
//! Each object has its own 256-bit data key, issued by key-manager
//! ([`crate::kms`]) and bound to a random 16-byte object id (the key's aad).
//! A multipart object's key is fetched once, at CreateMultipartUpload (the
//! upload id is its object id), and seals every part.
//! The plaintext is cut into chunks of [`CHUNK`] bytes; the last chunk is
//! always shorter than [`CHUNK`] (possibly empty), so an object of `n` bytes
//! has `n / CHUNK + 1` chunks and takes [`encrypted_len`]`(n)` bytes on disk.
//! Chunk `i` is sealed with XChaCha20-Poly1305:
//!
//! | field | value |
//! |---|---|
//! | nonce (24 B) | object id (16 B) ‖ `i` as u64 big-endian (8 B) |
//! | associated data | `"aerekos-sm/chunk/v1"` ‖ object id ‖ `i` (u64 BE) ‖ last flag (1 B: 1 for the last chunk, else 0) |
//! | stored | ciphertext (same length as the chunk) ‖ Poly1305 tag (16 B) |
//!
//! Chunks therefore cannot be reordered, moved to another object, dropped
//! from the end (the new last chunk would carry flag 0) or extended. A
//! range read decrypts only the chunks it overlaps.
//!
//! **Nonces of multipart parts.** The parts of an upload share one key, so
//! their nonces must differ: each part file (each UploadPart or
//! UploadPartCopy, including a part number sent again) is sealed as an
//! object of its own whose 16-byte "object id" above is a fresh random
//! *nonce prefix*, recorded in the part's trailer and in the completed
//! object's manifest, with chunk indexes counting from 0 in every part.
//! (Disjoint counter ranges per part number were the alternative, but a
//! part number uploaded twice would reuse its range under the same key;
//! a random 128-bit prefix per part file cannot collide in practice, and
//! keeps each part an independently readable object file.) A part sealed
//! this way keeps its own last-chunk flag, so the completed object is a
//! sequence of sealed parts: a part cannot be truncated, swapped with
//! another part (its prefix is in the nonce and the associated data) or
//! taken from another upload (another key) without failing
//! authentication. The part list itself (order, sizes, prefixes) lives in
//! the object's trailer, which, like every trailer, is not authenticated:
//! someone able to rewrite the files could reorder or drop whole parts of
//! an object (as they could swap whole object files), but not alter,
//! truncate or splice the bytes of a part.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// Tag bytes per chunk.
pub const TAG: usize = 16;
/// Object id length.
pub const OBJECT_ID_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"aerekos-sm/chunk/v1";

/// A chunk failed to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunk {0} of the object failed authentication (corrupted, truncated or swapped on disk)")]
pub struct ChunkAuthError(pub u64);

/// On-disk length of an encrypted payload of `size` plaintext bytes.
pub fn encrypted_len(size: u64) -> u64 {
    size + TAG as u64 * (size / CHUNK as u64 + 1)
}

/// Number of chunks of a `size`-byte plaintext.
pub fn chunk_count(size: u64) -> u64 {
    size / CHUNK as u64 + 1
}

/// Plaintext length of chunk `i` of a `size`-byte object.
pub fn chunk_len(size: u64, i: u64) -> usize {
    let start = i * CHUNK as u64;
    usize::try_from(size.saturating_sub(start)).map_or(CHUNK, |n| n.min(CHUNK))
}

/// Seals and opens the chunks of one object.
pub struct ChunkCipher {
    cipher: XChaCha20Poly1305,
    object_id: [u8; OBJECT_ID_LEN],
}

impl std::fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCipher").finish_non_exhaustive()
    }
}

impl ChunkCipher {
    /// A cipher for the object `object_id` under `key`.
    pub fn new(key: &[u8; 32], object_id: [u8; OBJECT_ID_LEN]) -> ChunkCipher {
        ChunkCipher {
            cipher: XChaCha20Poly1305::new(&(*key).into()),
            object_id,
        }
    }

    fn nonce_aad(&self, index: u64, last: bool) -> (XNonce, [u8; 44]) {
        let mut nonce = [0u8; 24];
        nonce[..16].copy_from_slice(&self.object_id);
        nonce[16..].copy_from_slice(&index.to_be_bytes());
        let mut aad = [0u8; 44];
        aad[..19].copy_from_slice(AAD_LABEL);
        aad[19..35].copy_from_slice(&self.object_id);
        aad[35..43].copy_from_slice(&index.to_be_bytes());
        aad[43] = u8::from(last);
        (XNonce::from(nonce), aad)
    }

    /// Encrypts `buf` in place as chunk `index`; returns the tag.
    pub fn seal(&self, index: u64, last: bool, buf: &mut [u8]) -> [u8; TAG] {
        let (nonce, aad) = self.nonce_aad(index, last);
        match self.cipher.encrypt_inout_detached(&nonce, &aad, buf.into()) {
            Ok(tag) => tag.into(),
            // Only fails for messages over 256 GiB; chunks are 64 KiB.
            Err(_) => [0u8; TAG],
        }
    }

    /// Decrypts `buf` in place as chunk `index` with `tag`.
    pub fn open(
        &self,
        index: u64,
        last: bool,
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), ChunkAuthError> {
        let (nonce, aad) = self.nonce_aad(index, last);
        let tag = Tag::try_from(tag).map_err(|_| ChunkAuthError(index))?;
        self.cipher
            .decrypt_inout_detached(&nonce, &aad, buf.into(), &tag)
            .map_err(|_| ChunkAuthError(index))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn chunks_are_bound_to_index_object_and_position() {
        let key = [7u8; 32];
        let c = ChunkCipher::new(&key, [1u8; 16]);
        let mut buf = b"hello chunk".to_vec();
        let tag = c.seal(3, false, &mut buf);
        assert_ne!(&buf[..], b"hello chunk");
        let sealed = buf.clone();
        c.open(3, false, &mut buf, &tag).unwrap();
        assert_eq!(&buf[..], b"hello chunk");
        let mut b = sealed.clone();
        assert_eq!(c.open(4, false, &mut b, &tag), Err(ChunkAuthError(4)));
        let mut b = sealed.clone();
        assert!(c.open(3, true, &mut b, &tag).is_err());
        let other = ChunkCipher::new(&key, [2u8; 16]);
        let mut b = sealed.clone();
        assert!(other.open(3, false, &mut b, &tag).is_err());
        let mut b = sealed;
        b[0] ^= 1;
        assert!(c.open(3, false, &mut b, &tag).is_err());
        assert!(c.open(3, false, &mut [], &tag[..5]).is_err());
    }

    #[test]
    fn lengths() {
        assert_eq!(encrypted_len(0), 16);
        assert_eq!(encrypted_len(CHUNK as u64), CHUNK as u64 + 32);
        assert_eq!(chunk_count(CHUNK as u64 - 1), 1);
        assert_eq!(chunk_len(CHUNK as u64 + 5, 1), 5);
        assert_eq!(chunk_len(CHUNK as u64, 1), 0);
    }
}
