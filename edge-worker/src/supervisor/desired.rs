//! The desired state: `services.json` (whole manifests, run or stopped,
//! being removed), the checks a manifest passes before it becomes desired,
//! legacy specs as manifests, and the artifacts the desired manifests (and
//! running downloads) keep in the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use protocol::manifest::{Limits, ProcessRuntime, Program, Runtime};
use protocol::{Manifest, ServiceSpec};
use serde::{Deserialize, Serialize};

use super::{Supervisor, SupervisorError, SERVICES_FILE};
use crate::fetch;
use crate::state::write_atomic;

/// One entry of `services.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Desired {
    /// The whole manifest, secrets included (hence mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) manifest: Option<Manifest>,
    /// Written by workers before manifests; only read (upgrades).
    #[serde(default, skip_serializing)]
    pub(super) spec: Option<ServiceSpec>,
    /// Desired running (else installed, stopped).
    pub(super) run: bool,
    /// Being removed: the removal finishes once its copy is gone, also
    /// after a worker restart.
    #[serde(default)]
    pub(super) removing: bool,
}

impl Desired {
    /// The entry's manifest; an old worker's spec converted.
    pub(super) fn into_manifest(self) -> Option<Manifest> {
        self.manifest
            .or_else(|| self.spec.as_ref().map(spec_to_manifest))
    }
}

/// `services.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct DesiredFile {
    pub(super) services: Vec<Desired>,
}

/// Reads `services.json` under `state_dir`: a missing, unreadable or
/// corrupt file means no services (the last two logged).
pub(super) fn read(state_dir: &Path) -> DesiredFile {
    let path = state_dir.join(SERVICES_FILE);
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("{} is corrupt ({e}); no services loaded", path.display());
                DesiredFile::default()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => DesiredFile::default(),
        Err(e) => {
            tracing::error!("cannot read {}: {e}; no services loaded", path.display());
            DesiredFile::default()
        }
    }
}

/// Is `name` usable as a service name (`[a-z0-9-]`, 1–32 chars, not
/// starting with `-`)? It becomes a directory name. Same rule as the
/// conductor's: [`protocol::manifest::valid_service_name`].
pub fn is_valid_name(name: &str) -> bool {
    protocol::manifest::valid_service_name(name)
}

/// The service name of a manifest that is valid and whose name can be a
/// directory name; why not otherwise.
pub(super) fn checked_name(manifest: &Manifest) -> Result<String, SupervisorError> {
    manifest.validate()?;
    if !is_valid_name(&manifest.name) {
        return Err(SupervisorError::InvalidName(manifest.name.clone()));
    }
    Ok(manifest.name.clone())
}

/// The manifest equivalent of a legacy spec: a command, no health check,
/// no limits, no config or secrets. Env entries with the same name: the
/// last wins.
pub fn spec_to_manifest(spec: &ServiceSpec) -> Manifest {
    Manifest {
        name: spec.name.to_string(),
        version: spec.version,
        runtime: Runtime::Process(ProcessRuntime {
            program: Program::Command(spec.command.to_string()),
            args: spec.args.iter().map(|a| a.to_string()).collect(),
            env: spec
                .env
                .iter()
                .map(|e| (e.name.to_string(), e.value.to_string()))
                .collect(),
            working_dir: spec.working_dir.to_string(),
        }),
        restart: spec.restart,
        max_restarts: spec.max_restarts,
        restart_window_s: spec.restart_window_s,
        backoff_ms: spec.backoff_ms,
        health: None,
        limits: Limits::default(),
        config: BTreeMap::new(),
        secrets: BTreeMap::new(),
    }
}

impl Supervisor {
    /// Writes `services.json` (mode 0600, atomically); a failure is logged.
    pub(super) fn save(&self) {
        let file = DesiredFile {
            services: self
                .services
                .values()
                .map(|s| Desired {
                    manifest: Some(s.manifest.clone()),
                    spec: None,
                    run: s.run,
                    removing: s.removing,
                })
                .collect(),
        };
        let path = self.dir.join(SERVICES_FILE);
        let result = serde_json::to_vec_pretty(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::error!("cannot persist the services: {e}");
        }
    }

    /// Keeps the artifact `sha256` out of pruning while it is downloaded
    /// (counted: pin and unpin in pairs).
    pub fn pin_artifact(&mut self, sha256: [u8; 32]) {
        *self.pinned.entry(sha256).or_insert(0) += 1;
    }

    /// Undoes one [`Supervisor::pin_artifact`].
    pub fn unpin_artifact(&mut self, sha256: [u8; 32]) {
        if let Some(n) = self.pinned.get_mut(&sha256) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(&sha256);
            }
        }
    }

    /// Deletes cached artifacts that no manifest (nor a download) needs.
    pub(super) fn prune(&self, parts: bool) {
        let mut keep: BTreeSet<[u8; 32]> = self.pinned.keys().copied().collect();
        for s in self.services.values() {
            if let Some(a) = s.manifest.artifact_for(&self.opts.arch) {
                keep.insert(a.sha256);
            }
        }
        fetch::prune_artifacts(&self.dir, &keep, parts);
    }
}
