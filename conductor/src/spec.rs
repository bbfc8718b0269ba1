//! Service specs as the API accepts and stores them ([`SpecDoc`], JSON), and
//! their conversion to the wire [`Manifest`] a worker fetches.
//!
//! The flat process format of the first services release (`name`,
//! `command`, `args`, `env`, `working_dir`, `restart`, `max_restarts`,
//! `restart_window_s`, `backoff_ms`) is still a valid spec: every newer
//! field is optional. Newer fields: `kind` (`process` | `container`),
//! `artifacts` (`{"<arch>": "<sha256 hex>"}`, instead of `command`),
//! `image`, `ports`, `volumes` (containers; `args` is then the command
//! override), `health`, `limits`, `config` and `secrets`.
//!
//! Limits are the manifest's ([`protocol::manifest`]: 64 items per list or
//! map, 1 KiB strings, 16 KiB config/secret values, 64 KiB encoded): a spec
//! is valid when its manifest passes [`Manifest::validate`] and encodes.
//! Secrets are stored with the spec (in the conductor's database, next to
//! the worker secrets) and leave the conductor only inside the manifest a
//! targeted worker downloads; [`SpecDoc::public_json`] shows their names.

use std::collections::BTreeMap;

use protocol::manifest::{
    ArtifactRef, ContainerRuntime, HealthCheck, Limits, PortMap, Probe, ProcessRuntime, Program,
    Runtime, VolumeMount,
};
use protocol::{Manifest, RestartPolicy};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a spec is refused (or cannot be turned into a manifest).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec breaks a rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Looking up an artifact failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError::Invalid(msg.into()))
}

/// `process` (default) or `container`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A supervised process (a command on the device, or an uploaded artifact).
    #[default]
    Process,
    /// A container through the worker's Docker Engine.
    Container,
}

impl Kind {
    fn is_process(&self) -> bool {
        *self == Kind::Process
    }
}

fn default_restart() -> String {
    "on-failure".into()
}
fn default_max_restarts() -> u16 {
    5
}
fn default_window() -> u32 {
    60
}
fn default_backoff() -> u32 {
    1000
}
fn default_interval() -> u32 {
    2000
}
fn default_timeout() -> u32 {
    1000
}
fn default_retries() -> u16 {
    3
}

/// A published container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDoc {
    /// Port on the device, 1..=65535.
    pub host: u16,
    /// Port in the container, 1..=65535.
    pub container: u16,
    /// UDP instead of TCP.
    #[serde(default)]
    pub udp: bool,
}

/// A bind mount of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDoc {
    /// Absolute path on the device.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Read-only mount.
    #[serde(default)]
    pub read_only: bool,
}

/// `{"port": 8080, "path": "/healthz"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbeDoc {
    /// Local port.
    pub port: u16,
    /// Path, starting with `/`.
    #[serde(default = "root_path")]
    pub path: String,
}

fn root_path() -> String {
    "/".into()
}

/// `{"command": "...", "args": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandProbeDoc {
    /// Executable.
    pub command: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// A health check: exactly one of `http` and `command`, plus timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthDoc {
    /// HTTP probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbeDoc>,
    /// Command probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandProbeDoc>,
    /// Between probes, ms (≥ 100).
    #[serde(default = "default_interval")]
    pub interval_ms: u32,
    /// Probe timeout, ms (> 0).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
    /// Consecutive failures before unhealthy (> 0).
    #[serde(default = "default_retries")]
    pub retries: u16,
    /// Grace after a start, ms.
    #[serde(default)]
    pub start_period_ms: u32,
}

/// Resource limits; absent = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDoc {
    /// Memory, bytes (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU, thousandths of a core (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u32>,
    /// Most processes (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl LimitsDoc {
    fn is_empty(&self) -> bool {
        *self == LimitsDoc::default()
    }
}

/// A service spec as the API accepts it and as it is stored (JSON). Stored
/// specs are immutable; [`SpecDoc::validate`] ran before storing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecDoc {
    /// `[a-z0-9-]`, 1..=32 bytes.
    pub name: String,
    /// Runtime kind.
    #[serde(default, skip_serializing_if = "Kind::is_process")]
    pub kind: Kind,
    /// Process: executable on the device. Exactly one of `command` and
    /// `artifacts` for a process, neither for a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Process: arch → sha256 hex of an uploaded artifact (each must exist
    /// for that arch).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, String>,
    /// Container: image reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Process arguments, or the container's command override.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Process only; empty = the service's own directory on the worker.
    #[serde(default)]
    pub working_dir: String,
    /// Container only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortDoc>,
    /// Container only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeDoc>,
    /// `always` | `on-failure` | `never`.
    #[serde(default = "default_restart")]
    pub restart: String,
    /// Restarts within the window before `failed`.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u16,
    /// Restart window, seconds.
    #[serde(default = "default_window")]
    pub restart_window_s: u32,
    /// First restart delay, ms.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u32,
    /// Health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthDoc>,
    /// Resource limits.
    #[serde(default, skip_serializing_if = "LimitsDoc::is_empty")]
    pub limits: LimitsDoc,
    /// Configuration served to the service; non-string JSON values are
    /// stored as their compact JSON text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, Value>,
    /// Secrets: only ever in the manifest of a targeted worker; the API shows
    /// their names ([`SpecDoc::public_json`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

/// Looks up the size of artifact (`arch`, `sha256 hex`); `None` = unknown.
pub type ArtifactLookup<'a> = dyn Fn(&str, &str) -> Result<Option<u64>, SpecError> + 'a;

fn restart_policy(s: &str) -> Option<RestartPolicy> {
    match s {
        "always" => Some(RestartPolicy::Always),
        "on-failure" => Some(RestartPolicy::OnFailure),
        "never" => Some(RestartPolicy::Never),
        _ => None,
    }
}

impl SpecDoc {
    /// Builds the manifest of `version`, checking the kind-specific fields
    /// and resolving artifacts through `lookup`, then validates it (the
    /// message of [`protocol::ManifestError::Invalid`] on failure).
    pub fn to_manifest(
        &self,
        version: u32,
        lookup: &ArtifactLookup<'_>,
    ) -> Result<Manifest, SpecError> {
        if !valid_name(&self.name) {
            return invalid("name must be 1..=32 characters of [a-z0-9-]");
        }
        let Some(restart) = restart_policy(&self.restart) else {
            return invalid("restart must be always, on-failure or never");
        };
        let runtime = match self.kind {
            Kind::Process => {
                if self.image.is_some() || !self.ports.is_empty() || !self.volumes.is_empty() {
                    return invalid("image, ports and volumes are for kind container");
                }
                let program = match (&self.command, self.artifacts.is_empty()) {
                    (Some(c), true) => Program::Command(c.clone()),
                    (None, false) => {
                        let mut list = Vec::new();
                        for (arch, sha) in &self.artifacts {
                            let Some(digest) = protocol::manifest::parse_digest(sha)
                                .filter(|_| crate::artifacts::valid_sha(sha))
                            else {
                                return invalid(format!(
                                    "artifacts.{arch} must be 64 lower-case hex digits"
                                ));
                            };
                            let Some(size) = lookup(arch, sha)? else {
                                return invalid(format!(
                                    "artifacts.{arch}: no artifact {sha} uploaded for {arch}"
                                ));
                            };
                            list.push(ArtifactRef {
                                arch: arch.clone(),
                                sha256: digest,
                                size,
                            });
                        }
                        Program::Artifacts(list)
                    }
                    (Some(_), false) => return invalid("give command or artifacts, not both"),
                    (None, true) => return invalid("command (or artifacts) is required"),
                };
                Runtime::Process(ProcessRuntime {
                    program,
                    args: self.args.clone(),
                    env: self.env.clone(),
                    working_dir: self.working_dir.clone(),
                })
            }
            Kind::Container => {
                if self.command.is_some() || !self.artifacts.is_empty() {
                    return invalid(
                        "command and artifacts are for kind process (args overrides the container command)",
                    );
                }
                if !self.working_dir.is_empty() {
                    return invalid("working_dir is for kind process");
                }
                let Some(image) = &self.image else {
                    return invalid("image is required for kind container");
                };
                let mut ports = Vec::new();
                for p in &self.ports {
                    if p.host == 0 || p.container == 0 {
                        return invalid("ports must be 1..=65535");
                    }
                    ports.push(PortMap {
                        host: p.host,
                        container: p.container,
                        udp: p.udp,
                    });
                }
                Runtime::Container(ContainerRuntime {
                    image: image.clone(),
                    command: self.args.clone(),
                    env: self.env.clone(),
                    ports,
                    volumes: self
                        .volumes
                        .iter()
                        .map(|v| VolumeMount {
                            source: v.source.clone(),
                            target: v.target.clone(),
                            read_only: v.read_only,
                        })
                        .collect(),
                })
            }
        };
        let health = match &self.health {
            None => None,
            Some(h) => {
                let probe = match (&h.http, &h.command) {
                    (Some(p), None) => {
                        if p.port == 0 {
                            return invalid("health.http.port must be 1..=65535");
                        }
                        Probe::Http {
                            port: p.port,
                            path: p.path.clone(),
                        }
                    }
                    (None, Some(c)) => {
                        if c.command.is_empty() {
                            return invalid("health.command.command is empty");
                        }
                        Probe::Command {
                            command: c.command.clone(),
                            args: c.args.clone(),
                        }
                    }
                    _ => return invalid("health needs exactly one of http and command"),
                };
                Some(HealthCheck {
                    probe,
                    interval_ms: h.interval_ms,
                    timeout_ms: h.timeout_ms,
                    retries: h.retries,
                    start_period_ms: h.start_period_ms,
                })
            }
        };
        let l = &self.limits;
        if l.memory_bytes == Some(0) || l.cpu_millicores == Some(0) || l.pids == Some(0) {
            return invalid("limits must be > 0 (leave a limit out for none)");
        }
        let config = self
            .config
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        let m = Manifest {
            name: self.name.clone(),
            version,
            runtime,
            restart,
            max_restarts: self.max_restarts,
            restart_window_s: self.restart_window_s,
            backoff_ms: self.backoff_ms,
            health,
            limits: Limits {
                memory_bytes: l.memory_bytes,
                cpu_millicores: l.cpu_millicores,
                pids: l.pids,
            },
            config,
            secrets: self.secrets.clone(),
        };
        if let Err(e) = m.validate() {
            return invalid(match e {
                protocol::ManifestError::Invalid(m) => m,
                other => other.to_string(),
            });
        }
        Ok(m)
    }

    /// Validates by building and encoding the manifest (version 1: the
    /// version does not change validity or, materially, the size).
    pub fn validate(&self, lookup: &ArtifactLookup<'_>) -> Result<(), SpecError> {
        let m = self.to_manifest(1, lookup)?;
        m.encode().map_err(|e| SpecError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// `true` when the spec has a health check (a rollout then waits for
    /// `healthy`, not just `running`).
    pub fn has_health(&self) -> bool {
        self.health.is_some()
    }

    /// The spec as the API shows it: secrets replaced by their names.
    pub fn public_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(obj) = v.as_object_mut() {
            if obj.contains_key("secrets") {
                let names: Vec<&String> = self.secrets.keys().collect();
                obj.insert("secrets".into(), serde_json::json!(names));
            }
        }
        v
    }

    /// The sha256 hex of every artifact the spec references.
    pub fn artifact_shas(&self) -> impl Iterator<Item = &str> {
        self.artifacts.values().map(String::as_str)
    }
}

/// Longest service name.
pub const MAX_NAME_LEN: usize = 32;

/// `true` for a valid service name: `[a-z0-9-]`, 1..=32 bytes.
pub fn valid_name(name: &str) -> bool {
    protocol::manifest::valid_service_name(name)
}

/// An encoded manifest and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltManifest {
    /// `Manifest::encode()` bytes, exactly as served to workers.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, as sent in `DeployManifest`.
    pub digest: [u8; 32],
    /// The restart policy is not `never`: a `failed` copy is deployed
    /// again (a `never` service that failed stays failed, as asked).
    pub retry_failed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHA: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

    fn doc(v: Value) -> SpecDoc {
        serde_json::from_value(v).unwrap()
    }

    fn lookup(arch: &str, sha: &str) -> Result<Option<u64>, SpecError> {
        Ok((arch == "aarch64" && sha == SHA).then_some(4096))
    }

    fn err(v: Value) -> String {
        match serde_json::from_value::<SpecDoc>(v.clone()) {
            Err(e) => e.to_string(),
            Ok(d) => match d.validate(&lookup) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("accepted: {v}"),
            },
        }
    }

    #[test]
    fn flat_process_spec_still_works() {
        let d = doc(
            json!({"name": "web", "command": "/bin/sleep", "args": ["10"],
            "env": {"A": "1"}, "restart": "always"}),
        );
        let m = d.to_manifest(3, &lookup).unwrap();
        assert_eq!(
            (m.version, m.restart, m.max_restarts),
            (3, RestartPolicy::Always, 5)
        );
        match &m.runtime {
            Runtime::Process(p) => {
                assert_eq!(p.program, Program::Command("/bin/sleep".into()));
                assert_eq!(p.args, vec!["10".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert!(m.health.is_none() && m.secrets.is_empty());
        // Round trip through the stored JSON; encoding is deterministic.
        let stored = serde_json::to_string(&d).unwrap();
        let back: SpecDoc = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, d);
        assert_eq!(
            back.to_manifest(3, &lookup).unwrap().encode().unwrap(),
            m.encode().unwrap()
        );
        assert!(!stored.contains("kind"), "{stored}");
    }

    #[test]
    fn artifacts_container_health_limits_config_secrets() {
        let d = doc(json!({"name": "relay", "artifacts": {"aarch64": SHA},
            "health": {"http": {"port": 8080, "path": "/healthz"}, "retries": 5},
            "limits": {"memory_bytes": 1_000_000, "cpu_millicores": 500},
            "config": {"threshold": 5, "mode": "fast"}, "secrets": {"API_KEY": "hunter2"}}));
        let m = d.to_manifest(1, &lookup).unwrap();
        assert_eq!(m.artifact_for("aarch64").map(|a| a.size), Some(4096));
        let h = m.health.as_ref().unwrap();
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms),
            (2000, 1000, 5, 0)
        );
        assert_eq!(m.config.get("threshold").map(String::as_str), Some("5"));
        assert_eq!(m.limits.pids, None);
        assert!(d.has_health());
        let public = d.public_json();
        assert_eq!(public["secrets"], json!(["API_KEY"]));
        assert!(!public.to_string().contains("hunter2"));

        let c = doc(
            json!({"name": "nginx", "kind": "container", "image": "nginx:alpine",
            "args": ["nginx", "-g", "daemon off;"],
            "ports": [{"host": 8080, "container": 80}],
            "volumes": [{"source": "/srv/www", "target": "/usr/share/nginx/html", "read_only": true}],
            "health": {"command": {"command": "true"}}}),
        );
        match c.to_manifest(2, &lookup).unwrap().runtime {
            Runtime::Container(r) => {
                assert_eq!(r.image, "nginx:alpine");
                assert_eq!(r.command.len(), 3);
                assert_eq!(
                    r.ports[0],
                    PortMap {
                        host: 8080,
                        container: 80,
                        udp: false
                    }
                );
                assert!(r.volumes[0].read_only);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validation_errors_name_the_problem() {
        for (v, word) in [
            (json!({"name": "Web", "command": "x"}), "name"),
            (json!({"name": "ok"}), "command"),
            (json!({"name": "ok", "command": ""}), "command"),
            (
                json!({"name": "ok", "command": "x", "artifacts": {"aarch64": SHA}}),
                "not both",
            ),
            (
                json!({"name": "ok", "artifacts": {"x86_64": SHA}}),
                "no artifact",
            ),
            (
                json!({"name": "ok", "artifacts": {"aarch64": "abc"}}),
                "hex",
            ),
            (
                json!({"name": "ok", "command": "x", "restart": "sometimes"}),
                "restart",
            ),
            (
                json!({"name": "ok", "command": "x", "args": vec!["a"; 65]}),
                "args",
            ),
            (
                json!({"name": "ok", "command": "x", "args": ["a".repeat(1025)]}),
                "args",
            ),
            (
                json!({"name": "ok", "command": "x", "env": {"A B": "v"}}),
                "env",
            ),
            (
                json!({"name": "ok", "command": "x", "image": "i"}),
                "container",
            ),
            (json!({"name": "ok", "kind": "container"}), "image"),
            (
                json!({"name": "ok", "kind": "container", "image": "i", "command": "x"}),
                "process",
            ),
            (
                json!({"name": "ok", "kind": "container", "image": "i",
                "volumes": [{"source": "rel", "target": "/x"}]}),
                "absolute",
            ),
            (
                json!({"name": "ok", "kind": "container", "image": "i",
                "ports": [{"host": 0, "container": 80}]}),
                "ports",
            ),
            (
                json!({"name": "ok", "kind": "vm", "image": "i"}),
                "unknown variant",
            ),
            (
                json!({"name": "ok", "command": "x", "health": {"interval_ms": 500}}),
                "exactly one",
            ),
            (
                json!({"name": "ok", "command": "x",
                "health": {"http": {"port": 80}, "interval_ms": 10}}),
                "interval",
            ),
            (
                json!({"name": "ok", "command": "x",
                "health": {"http": {"port": 80, "path": "healthz"}}}),
                "path",
            ),
            (
                json!({"name": "ok", "command": "x", "limits": {"pids": 0}}),
                "limits",
            ),
            (
                json!({"name": "ok", "command": "x", "limits": {"swap": 1}}),
                "unknown field",
            ),
            (
                json!({"name": "ok", "command": "x", "secrets": {"K": "v".repeat(16 * 1024 + 1)}}),
                "secrets",
            ),
            (
                json!({"name": "ok", "command": "x", "surprise": 1}),
                "surprise",
            ),
        ] {
            let msg = err(v.clone());
            assert!(msg.contains(word), "{v}: {msg}");
        }
        // Bigger than the 64 KiB manifest: many large config values.
        let big: serde_json::Map<String, Value> = (0..5)
            .map(|i| (format!("k{i}"), json!("x".repeat(16 * 1024))))
            .collect();
        let msg = err(json!({"name": "ok", "command": "x", "config": big}));
        assert!(msg.contains("limit"), "{msg}");
    }
}
