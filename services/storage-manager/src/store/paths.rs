//! Bucket names, keys and where they live under the data directory.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{Store, StoreError, MAX_KEY_LEN, MAX_USER_META};

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

impl Store {
    /// `buckets/<bucket>`.
    pub(super) fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join("buckets").join(bucket)
    }

    /// `buckets/<bucket>/objects/<hex sha256(key)>`.
    pub(super) fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.bucket_dir(bucket)
            .join("objects")
            .join(crate::sigv4::sha256_hex(key.as_bytes()))
    }

    /// `buckets/<bucket>/uploads/<upload id>`.
    pub(super) fn upload_dir(&self, bucket: &str, id: &str) -> PathBuf {
        self.bucket_dir(bucket).join("uploads").join(id)
    }

    /// `buckets/<bucket>/data/<upload id>`: the parts of a completed
    /// multipart object.
    pub(super) fn data_dir(&self, bucket: &str, id: &str) -> PathBuf {
        self.bucket_dir(bucket).join("data").join(id)
    }

    /// Keys are 1..=[`MAX_KEY_LEN`] bytes.
    pub(super) fn check_key(key: &str) -> Result<(), StoreError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(StoreError::KeyTooLong);
        }
        Ok(())
    }

    /// User metadata is at most [`MAX_USER_META`] bytes.
    pub(super) fn check_meta(meta: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let n: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        if n > MAX_USER_META {
            return Err(StoreError::MetadataTooLarge);
        }
        Ok(())
    }
}
