//! Where backups go: storage-manager (or any S3-compatible store) through
//! `s3::client::S3Client`.
//!
//! Configuration (the service's config and secrets on the conductor):
//!
//! * config `backup_endpoint` = `http://host:port` of storage-manager
//!   (no backups without it);
//! * config `backup_bucket` (default [`DEFAULT_BUCKET`]), created at start
//!   if it does not exist;
//! * config `backup_region` (default `us-east-1`);
//! * config `backup_keep`: after each backup of a database, delete its
//!   oldest backups beyond this many (default 0: keep all). Only keys
//!   db-manager made (`<db>/<YYYYMMDDTHHMMSSZ>-<8 hex>.sqlite`) count;
//!   other objects under the prefix are left alone;
//! * secrets `backup_access_key` and `backup_secret_key`: an access key of
//!   storage-manager.
//!
//! Uploads hash the file first so the payload is signed (SigV4); downloads
//! are written to a file that is fsynced before use. Limits: one PUT per
//! backup (storage-manager's object size limit applies), no retries (a
//! failed scheduled backup is retried at the next interval).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write;
use std::path::Path;

use s3::client::{ClientError, S3Client};
use s3::sigv4::Credentials;

/// Default bucket.
pub const DEFAULT_BUCKET: &str = "db-backups";

/// A backup store failure.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store refused or failed.
    #[error("backup store: {0}")]
    Store(String),
    /// The object does not exist.
    #[error("no backup {0}")]
    NotFound(String),
    /// The snapshot or the download is not a sound database.
    #[error("{0}")]
    Corrupt(String),
    /// Local file I/O.
    #[error("backup file {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is incomplete or wrong.
    #[error("{0}")]
    Config(String),
}

impl BackupError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            BackupError::NotFound(_) => 404,
            BackupError::Corrupt(_) => 422,
            BackupError::Store(_) => 502,
            BackupError::Config(_) => 409,
            BackupError::Io { .. } => 500,
        }
    }
}

/// One stored backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupObject {
    /// Object key.
    pub key: String,
    /// Size, bytes.
    pub bytes: u64,
    /// When it was stored (ISO 8601, as the store says).
    pub last_modified: String,
}

/// Where backups are kept.
pub trait BackupStore: Send + Sync + Debug {
    /// Uploads the file at `path` as `key`.
    fn put(&self, key: &str, path: &Path) -> Result<(), BackupError>;
    /// Downloads `key` into a new file `dest` (fsynced); returns its size.
    fn get(&self, key: &str, dest: &Path) -> Result<u64, BackupError>;
    /// Objects whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<BackupObject>, BackupError>;
    /// Deletes `key` (no error if it does not exist).
    fn delete(&self, key: &str) -> Result<(), BackupError>;
}

/// Backups in an S3 bucket (storage-manager).
#[derive(Debug)]
pub struct S3Store {
    client: S3Client,
    bucket: String,
}

fn store_err(e: ClientError) -> BackupError {
    BackupError::Store(e.to_string())
}

impl S3Store {
    /// A store for `bucket` at `endpoint`; creates the bucket if needed.
    pub fn connect(
        endpoint: &str,
        region: Option<&str>,
        bucket: &str,
        access_key: &str,
        secret_key: &str,
    ) -> Result<S3Store, BackupError> {
        let mut client = S3Client::new(
            endpoint,
            Credentials {
                access_key: access_key.to_string(),
                secret_key: secret_key.to_string(),
            },
        )
        .map_err(|e| BackupError::Config(format!("config backup_endpoint: {e}")))?;
        if let Some(r) = region {
            client = client.with_region(r);
        }
        match client.create_bucket(bucket) {
            Ok(()) => {}
            Err(ClientError::S3 { code, .. })
                if code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" => {}
            Err(e) => return Err(store_err(e)),
        }
        Ok(S3Store {
            client,
            bucket: bucket.to_string(),
        })
    }

    /// From the service's config and secrets; `Ok(None)` when
    /// `backup_endpoint` is not set.
    pub fn from_settings(
        config: &BTreeMap<String, String>,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Option<S3Store>, BackupError> {
        let Some(endpoint) = config.get("backup_endpoint") else {
            return Ok(None);
        };
        let secret = |k: &str| {
            secrets.get(k).ok_or_else(|| {
                BackupError::Config(format!(
                    "config backup_endpoint is set but the secret {k} is not"
                ))
            })
        };
        let bucket = config
            .get("backup_bucket")
            .map_or(DEFAULT_BUCKET, String::as_str);
        S3Store::connect(
            endpoint.trim(),
            config.get("backup_region").map(String::as_str),
            bucket,
            secret("backup_access_key")?,
            secret("backup_secret_key")?,
        )
        .map(Some)
    }
}

impl BackupStore for S3Store {
    fn put(&self, key: &str, path: &Path) -> Result<(), BackupError> {
        self.client
            .put_file(&self.bucket, key, path)
            .map(|_| ())
            .map_err(store_err)
    }

    fn get(&self, key: &str, dest: &Path) -> Result<u64, BackupError> {
        let ioe = |source| BackupError::Io {
            path: dest.display().to_string(),
            source,
        };
        let mut f = std::fs::File::create(dest).map_err(ioe)?;
        let n = match self.client.get_object(&self.bucket, key, &mut f) {
            Ok(n) => n,
            Err(ClientError::S3 { status: 404, .. }) => {
                return Err(BackupError::NotFound(key.to_string()))
            }
            Err(e) => return Err(store_err(e)),
        };
        f.flush().map_err(ioe)?;
        f.sync_all().map_err(ioe)?;
        Ok(n)
    }

    fn delete(&self, key: &str) -> Result<(), BackupError> {
        self.client
            .delete_object(&self.bucket, key)
            .map_err(store_err)
    }

    fn list(&self, prefix: &str) -> Result<Vec<BackupObject>, BackupError> {
        Ok(self
            .client
            .list_all(&self.bucket, prefix)
            .map_err(store_err)?
            .into_iter()
            .map(|o| BackupObject {
                key: o.key,
                bytes: o.size,
                last_modified: o.last_modified,
            })
            .collect())
    }
}

/// Is `key` a backup db-manager made for `db`
/// (`<db>/<YYYYMMDDTHHMMSSZ>-<8 hex>.sqlite`)?
pub fn is_own_key(db: &str, key: &str) -> bool {
    let Some(rest) = key
        .strip_prefix(db)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_suffix(".sqlite"))
    else {
        return false;
    };
    let Some((stamp, id)) = rest.split_once('-') else {
        return false;
    };
    let b = stamp.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
        && id.len() == 8
        && id.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_keys() {
        assert!(is_own_key("shop", "shop/20261127T074401Z-1a2b3c4d.sqlite"));
        for k in [
            "shop/garbage.sqlite",
            "shopx/20261127T074401Z-1a2b3c4d.sqlite",
            "shop/20261127T074401Z-1a2b3c4.sqlite",
            "shop/20261127X074401Z-1a2b3c4d.sqlite",
            "shop/20261127T074401Z-1a2b3c4d.sqlite.bak",
        ] {
            assert!(!is_own_key("shop", k), "{k}");
        }
    }
}
