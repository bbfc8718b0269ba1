//! Uploaded artifacts (service binaries) on disk.
//!
//! Files live in `<data_dir>/artifacts/<sha256 hex>`. An upload is streamed
//! into `<data_dir>/artifacts/tmp-<random>` while it is hashed, flushed to
//! disk, then renamed to its digest, so a file under a digest name is always
//! complete and matches its name (a crash leaves at most a `tmp-` file,
//! removed at the next start by [`clean_temp`]). The SQLite `artifacts`
//! table records (sha256, arch, label, size); see [`crate::store`].
//!
//! Limits: an upload larger than `Config::max_artifact_bytes` is refused
//! ([`ArtifactError::TooLarge`]) after reading at most one byte more than the
//! limit; architectures are 1..=32 characters of `[A-Za-z0-9_-]`, labels at
//! most [`MAX_LABEL_LEN`] bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest artifact label, bytes.
pub const MAX_LABEL_LEN: usize = 128;

/// Upload failures.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The body exceeded the configured limit.
    #[error("artifact larger than {0} bytes")]
    TooLarge(u64),
    /// The body was empty.
    #[error("artifact is empty")]
    Empty,
    /// Disk or network I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// Context.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ArtifactError {
    move |source| ArtifactError::Io { what, source }
}

/// `<data_dir>/artifacts`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("artifacts")
}

/// The file of artifact `sha_hex` (which must be 64 lower-case hex digits).
pub fn path_of(data_dir: &Path, sha_hex: &str) -> PathBuf {
    dir(data_dir).join(sha_hex)
}

/// `true` for 64 lower-case hex digits.
pub fn valid_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `true` for an architecture name: 1..=32 characters of `[A-Za-z0-9_-]`.
pub fn valid_arch(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Removes leftover `tmp-*` files of interrupted uploads.
pub fn clean_temp(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir(data_dir)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Streams `body` to disk while hashing it; returns `(sha256 hex, size)`.
/// Reads at most `limit + 1` bytes.
pub fn receive(
    data_dir: &Path,
    body: &mut dyn Read,
    limit: u64,
) -> Result<(String, u64), ArtifactError> {
    let dir = dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(io("create artifacts dir"))?;
    let suffix = crate::crypto::random_hex::<8>()
        .map_err(|e| io("random")(std::io::Error::other(e.to_string())))?;
    let tmp = dir.join(format!("tmp-{suffix}"));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(io("create temp file"))?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let mut limited = body.take(limit.saturating_add(1));
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read body")(e)),
            };
            size += n as u64;
            if size > limit {
                return Err(ArtifactError::TooLarge(limit));
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io("write temp file"))?;
        }
        if size == 0 {
            return Err(ArtifactError::Empty);
        }
        file.sync_all().map_err(io("sync temp file"))?;
        let sha = protocol::hex_string(&hasher.finalize());
        std::fs::rename(&tmp, dir.join(&sha)).map_err(io("rename artifact"))?;
        Ok((sha, size))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_hashes_renames_and_enforces_the_limit() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let data = b"#!/bin/sh\necho hi\n".to_vec();
        let (sha, size) =
            receive(d.path(), &mut data.as_slice(), 1024).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(size, data.len() as u64);
        assert_eq!(
            sha,
            protocol::hex_string(&protocol::manifest::digest(&data))
        );
        assert!(valid_sha(&sha));
        assert_eq!(
            std::fs::read(path_of(d.path(), &sha)).ok(),
            Some(data.clone())
        );
        assert!(matches!(
            receive(d.path(), &mut [0u8; 1025].as_slice(), 1024),
            Err(ArtifactError::TooLarge(1024))
        ));
        assert!(matches!(
            receive(d.path(), &mut [0u8; 0].as_slice(), 1024),
            Err(ArtifactError::Empty)
        ));
        // Only the one artifact is left: no temp files.
        let names: Vec<_> = std::fs::read_dir(dir(d.path()))
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(valid_arch("aarch64") && valid_arch("armv7l") && !valid_arch("a/b"));
    }
}
