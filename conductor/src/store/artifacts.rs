//! Uploaded artifacts (`artifacts`; the bytes live in
//! `<data_dir>/artifacts/<sha256>`).

use super::sql::{params, Row};

use super::{i, u, Store, StoreError};

/// An uploaded artifact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArtifactRow {
    /// SHA-256 of the file, 64 lower-case hex digits (also its file name).
    pub sha256: String,
    /// Architecture it is for, as workers report it.
    pub arch: String,
    /// Free label given at upload.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Upload time, ms.
    pub created_ms: u64,
}

impl Store {
    /// Records an uploaded artifact (same sha and arch again: new label).
    pub fn put_artifact(&self, a: &ArtifactRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO artifacts (sha256, arch, name, size, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (sha256, arch) DO UPDATE SET name = excluded.name",
            params![a.sha256, a.arch, a.name, i(a.size), i(a.created_ms)],
        )?;
        Ok(())
    }

    /// Every artifact, newest first.
    pub fn artifacts(&self) -> Result<Vec<ArtifactRow>, StoreError> {
        self.conn.query_map(
            "SELECT sha256, arch, name, size, created_ms FROM artifacts
             ORDER BY created_ms DESC, sha256, arch",
            params![],
            artifact_from_row,
        )
    }

    /// The rows of one artifact (one per arch it was uploaded for).
    pub fn artifact(&self, sha256: &str) -> Result<Vec<ArtifactRow>, StoreError> {
        self.conn.query_map(
            "SELECT sha256, arch, name, size, created_ms FROM artifacts WHERE sha256 = ?1
             ORDER BY arch",
            params![sha256],
            artifact_from_row,
        )
    }

    /// Deletes every row of an artifact; returns how many.
    pub fn delete_artifact(&self, sha256: &str) -> Result<usize, StoreError> {
        self.conn
            .execute("DELETE FROM artifacts WHERE sha256 = ?1", params![sha256])
    }
}

fn artifact_from_row(r: &Row) -> Result<ArtifactRow, StoreError> {
    Ok(ArtifactRow {
        sha256: r.get(0)?,
        arch: r.get(1)?,
        name: r.get(2)?,
        size: u(r.get(3)?),
        created_ms: u(r.get(4)?),
    })
}
