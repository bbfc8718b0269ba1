//! Hosted services: spec versions (`services`), placements (`deployments`),
//! per-worker overrides (`service_overrides`) and the last reported status
//! (`service_status`, written by the batch writer).

use super::sql::{params, Row};

use super::{i, u, Store, StoreError};

/// A stored service spec version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    /// Service name.
    pub name: String,
    /// Version (1, 2, …).
    pub version: u32,
    /// Spec as JSON (see `crate::services::SpecDoc`).
    pub spec_json: String,
    /// Creation time, ms.
    pub created_ms: u64,
}

/// Where and how a service should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRow {
    /// Service name.
    pub name: String,
    /// Desired version.
    pub version: u32,
    /// Explicitly named workers, JSON array.
    pub workers_json: String,
    /// Label selector, JSON object.
    pub labels_json: String,
    /// `running` | `stopped`.
    pub desired: String,
    /// Last change, ms.
    pub updated_ms: u64,
    /// Default rollout policy, JSON (`None`: the built-in default).
    pub rollout_json: Option<String>,
}

/// The last reported state of one service on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatusRow {
    /// Worker.
    pub worker_id: String,
    /// Service name.
    pub name: String,
    /// Version the worker has.
    pub version: u32,
    /// Lower-case state name.
    pub state: String,
    /// Process id (0 when not running).
    pub pid: u32,
    /// Restarts.
    pub restarts: u32,
    /// Last exit code.
    pub exit_code: Option<i32>,
    /// Detail text.
    pub detail: String,
    /// Conductor receive time, ms.
    pub updated_ms: u64,
}

impl Store {
    // ---- services ----

    /// Stores a new version of service `name` (previous + 1) and returns it.
    pub fn insert_service(
        &mut self,
        name: &str,
        spec_json: &str,
        now_ms: u64,
    ) -> Result<u32, StoreError> {
        let tx = self.conn.begin()?;
        let last: Option<u32> = tx.query_row(
            "SELECT MAX(version) FROM services WHERE name = ?1",
            params![name],
            |r| r.get(0),
        )?;
        let version = last.unwrap_or(0).saturating_add(1);
        tx.execute(
            "INSERT INTO services (name, version, spec, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, version, spec_json, i(now_ms)],
        )?;
        tx.commit()?;
        Ok(version)
    }

    /// Every service's latest version, by name.
    pub fn latest_services(&self) -> Result<Vec<ServiceRow>, StoreError> {
        self.conn.query_map(
            "SELECT s.name, s.version, s.spec, s.created_ms FROM services s
             WHERE s.version = (SELECT MAX(version) FROM services WHERE name = s.name)
             ORDER BY s.name",
            params![],
            service_from_row,
        )
    }

    /// All versions of one service, oldest first.
    pub fn service_versions(&self, name: &str) -> Result<Vec<ServiceRow>, StoreError> {
        self.conn.query_map(
            "SELECT name, version, spec, created_ms FROM services WHERE name = ?1 ORDER BY version",
            params![name],
            service_from_row,
        )
    }

    /// One version of a service.
    pub fn service(&self, name: &str, version: u32) -> Result<Option<ServiceRow>, StoreError> {
        self.conn.query_row_opt(
            "SELECT name, version, spec, created_ms FROM services WHERE name = ?1 AND version = ?2",
            params![name, version],
            service_from_row,
        )
    }

    /// Creates or replaces a deployment.
    pub fn put_deployment(&self, d: &DeploymentRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO deployments (name, version, workers, labels, desired, updated_ms, rollout)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version,
                workers = excluded.workers, labels = excluded.labels,
                desired = excluded.desired, updated_ms = excluded.updated_ms,
                rollout = excluded.rollout",
            params![
                d.name,
                d.version,
                d.workers_json,
                d.labels_json,
                d.desired,
                i(d.updated_ms),
                d.rollout_json
            ],
        )?;
        Ok(())
    }

    /// One deployment.
    pub fn deployment(&self, name: &str) -> Result<Option<DeploymentRow>, StoreError> {
        self.conn.query_row_opt(
            "SELECT name, version, workers, labels, desired, updated_ms, rollout
                 FROM deployments WHERE name = ?1",
            params![name],
            deployment_from_row,
        )
    }

    /// Every deployment, by name.
    pub fn deployments(&self) -> Result<Vec<DeploymentRow>, StoreError> {
        self.conn.query_map(
            "SELECT name, version, workers, labels, desired, updated_ms, rollout
             FROM deployments ORDER BY name",
            params![],
            deployment_from_row,
        )
    }

    /// Deletes a deployment; `false` if there was none.
    pub fn delete_deployment(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM deployments WHERE name = ?1", params![name])?
            > 0)
    }

    /// Spec versions whose JSON contains `needle` (a candidate filter; the
    /// caller parses the spec to be sure). `replace`, not `instr`, which
    /// PostgreSQL lacks; an empty needle matches nothing.
    pub fn services_containing(&self, needle: &str) -> Result<Vec<ServiceRow>, StoreError> {
        self.conn.query_map(
            "SELECT name, version, spec, created_ms FROM services
             WHERE replace(spec, ?1, '') <> spec ORDER BY name, version",
            params![needle],
            service_from_row,
        )
    }

    // ---- per-worker overrides ----

    /// Sets (`Some("stopped")`) or clears (`None`) a per-worker override.
    pub fn set_override(
        &self,
        worker_id: &str,
        name: &str,
        desired: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        match desired {
            Some(d) => self.conn.execute(
                "INSERT INTO service_overrides (worker_id, name, desired, updated_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (worker_id, name) DO UPDATE SET desired = excluded.desired,
                    updated_ms = excluded.updated_ms",
                params![worker_id, name, d, i(now_ms)],
            )?,
            None => self.conn.execute(
                "DELETE FROM service_overrides WHERE worker_id = ?1 AND name = ?2",
                params![worker_id, name],
            )?,
        };
        Ok(())
    }

    /// Clears every override of service `name` (it was undeployed).
    pub fn delete_overrides_of(&self, name: &str) -> Result<usize, StoreError> {
        self.conn.execute(
            "DELETE FROM service_overrides WHERE name = ?1",
            params![name],
        )
    }

    /// Every override: `(worker_id, name, desired)`.
    pub fn overrides(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        self.conn.query_map(
            "SELECT worker_id, name, desired FROM service_overrides",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    /// Every stored service status.
    pub fn service_statuses(&self) -> Result<Vec<ServiceStatusRow>, StoreError> {
        self.conn.query_map(
            "SELECT worker_id, name, version, state, pid, restarts, exit_code, detail, updated_ms
             FROM service_status ORDER BY worker_id, name",
            params![],
            |r| {
                Ok(ServiceStatusRow {
                    worker_id: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    state: r.get(3)?,
                    pid: r.get(4)?,
                    restarts: r.get(5)?,
                    exit_code: r.get(6)?,
                    detail: r.get(7)?,
                    updated_ms: u(r.get(8)?),
                })
            },
        )
    }
}

fn service_from_row(r: &Row) -> Result<ServiceRow, StoreError> {
    Ok(ServiceRow {
        name: r.get(0)?,
        version: r.get(1)?,
        spec_json: r.get(2)?,
        created_ms: u(r.get(3)?),
    })
}

fn deployment_from_row(r: &Row) -> Result<DeploymentRow, StoreError> {
    Ok(DeploymentRow {
        name: r.get(0)?,
        version: r.get(1)?,
        workers_json: r.get(2)?,
        labels_json: r.get(3)?,
        desired: r.get(4)?,
        updated_ms: u(r.get(5)?),
        rollout_json: r.get(6)?,
    })
}
