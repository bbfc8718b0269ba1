//! Service manifests: everything a worker needs to run one version of a
//! service (process or container, health check, limits, config, secrets).
//!
//! A manifest never travels in an MQTT frame. The conductor sends a small
//! [`crate::Action::DeployManifest`] (or, to install it stopped,
//! [`crate::Action::InstallManifest`]) carrying the name, the version and the
//! SHA-256 of the encoded manifest; the worker fetches the bytes over HTTP
//! with its credentials ([`http_auth`]), checks the digest, and decodes them
//! with [`Manifest::decode`]. So manifests may be large (many env vars,
//! config documents), and secrets stay off the broker, where any observer
//! (MQTT Explorer, the retained JSON mirror) would see them.
//!
//! Encoding: one version byte ([`MANIFEST_FORMAT`]) then the postcard
//! encoding of [`Manifest`]. Compatibility rules are those of frames: enum
//! variants only appended, fields never reordered; a new field means a new
//! [`MANIFEST_FORMAT`].
//!
//! Limits: an encoded manifest is at most [`MAX_MANIFEST_LEN`] bytes (checked
//! before decoding, so decoding allocates at most about that much), and
//! [`Manifest::validate`] bounds every count and string a worker acts on.
//! The same types serialise to JSON for the conductor's API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::RestartPolicy;

/// First byte of an encoded manifest.
pub const MANIFEST_FORMAT: u8 = 1;
/// Upper bound on an encoded manifest, bytes.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;
/// Most arguments, env vars, config or secret entries, ports or volumes.
pub const MAX_MANIFEST_ITEMS: usize = 64;
/// Longest string in a manifest other than config/secret values, bytes.
pub const MAX_MANIFEST_STR: usize = 1024;
/// Longest config or secret value, bytes.
pub const MAX_MANIFEST_VALUE: usize = 16 * 1024;
/// Most artifacts (one per architecture) of a process service.
pub const MAX_ARTIFACTS: usize = 8;

/// One version of a service, as the worker runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Service name, `[a-z0-9-]{1,32}`, unique per worker.
    pub name: String,
    /// Spec version (conductor-assigned, increasing).
    pub version: u32,
    /// What to run.
    pub runtime: Runtime,
    /// When to start it again after it exits.
    pub restart: RestartPolicy,
    /// The service is failed after this many restarts within `restart_window_s`.
    pub max_restarts: u16,
    /// Window for `max_restarts`, seconds.
    pub restart_window_s: u32,
    /// First restart delay in ms; doubles per restart up to 60 s.
    pub backoff_ms: u32,
    /// Health check; `None`: running is healthy.
    pub health: Option<HealthCheck>,
    /// Resource limits.
    pub limits: Limits,
    /// The service's own configuration, served by the worker's local API.
    pub config: BTreeMap<String, String>,
    /// The service's secrets, served by the worker's local API to this
    /// service's token only; never logged, never in a frame.
    pub secrets: BTreeMap<String, String>,
}

/// How a service runs. **Append only.**
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// A supervised child process in its own process group.
    Process(ProcessRuntime),
    /// A container through the Docker Engine API.
    Container(ContainerRuntime),
}

/// A process service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRuntime {
    /// The executable.
    pub program: Program,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (empty: the service's own dir under the state dir).
    pub working_dir: String,
}

/// Where a process service's executable comes from. **Append only.**
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    /// Already on the device: an absolute path or a name looked up in `PATH`.
    Command(String),
    /// Uploaded to the conductor: one binary per architecture; the worker
    /// downloads the one for its arch and checks its SHA-256 before exec.
    Artifacts(Vec<ArtifactRef>),
}

/// One uploaded binary, addressed by its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Architecture as a worker reports it (`aarch64`, `x86_64`, `armv7l`…).
    pub arch: String,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
    /// Size in bytes.
    pub size: u64,
}

/// A container service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRuntime {
    /// Image reference, present in the engine (no pulls are assumed).
    pub image: String,
    /// Command override (empty: the image's own).
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Published ports.
    pub ports: Vec<PortMap>,
    /// Bind mounts.
    pub volumes: Vec<VolumeMount>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// Port on the device.
    pub host: u16,
    /// Port inside the container.
    pub container: u16,
    /// UDP instead of TCP.
    pub udp: bool,
}

/// A bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Absolute path on the device.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A health check, run by the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What to probe.
    pub probe: Probe,
    /// Time between probes, ms.
    pub interval_ms: u32,
    /// A probe slower than this fails, ms.
    pub timeout_ms: u32,
    /// Consecutive failures before the service is unhealthy and restarted.
    pub retries: u16,
    /// Failures during this time after a start do not count, ms.
    pub start_period_ms: u32,
}

/// A health probe. **Append only.**
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET http://127.0.0.1:<port><path>` answers 2xx.
    Http {
        /// Local port.
        port: u16,
        /// Path, starting with `/`.
        path: String,
    },
    /// A command exits 0.
    Command {
        /// Executable.
        command: String,
        /// Arguments.
        args: Vec<String>,
    },
}

/// Resource limits. Processes get them through cgroups v2 where the worker
/// may create cgroups (reported "not applied" otherwise), containers through
/// the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// `memory.max`, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time, thousandths of a core (`500` = half a core).
    pub cpu_millicores: Option<u32>,
    /// `pids.max`.
    pub pids: Option<u32>,
}

/// Why manifest bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// More than [`MAX_MANIFEST_LEN`] bytes.
    #[error("manifest is {0} bytes, the limit is {MAX_MANIFEST_LEN}")]
    Oversized(usize),
    /// Missing or unknown format byte.
    #[error("unknown manifest format {0:?}")]
    UnknownFormat(Option<u8>),
    /// Not a postcard manifest.
    #[error("malformed manifest: {0}")]
    Malformed(postcard::Error),
    /// Bytes after the manifest.
    #[error("{0} trailing bytes after the manifest")]
    TrailingBytes(usize),
    /// Decoded but not acceptable.
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// The bytes do not hash to the digest the command carried.
    #[error("manifest digest mismatch")]
    DigestMismatch,
}

impl Manifest {
    /// Validates, then encodes (format byte + postcard).
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let mut out = vec![MANIFEST_FORMAT];
        let body = postcard::to_stdvec(self).map_err(ManifestError::Malformed)?;
        out.extend_from_slice(&body);
        if out.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::Oversized(out.len()));
        }
        Ok(out)
    }

    /// Decodes and validates bytes from [`Manifest::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::Oversized(bytes.len()));
        }
        match bytes.first() {
            Some(&MANIFEST_FORMAT) => {}
            other => return Err(ManifestError::UnknownFormat(other.copied())),
        }
        let (m, rest): (Manifest, &[u8]) =
            postcard::take_from_bytes(&bytes[1..]).map_err(ManifestError::Malformed)?;
        if !rest.is_empty() {
            return Err(ManifestError::TrailingBytes(rest.len()));
        }
        m.validate()?;
        // One encoding per manifest, so a digest names exactly one byte
        // string: postcard also takes overlong varints (`80 00` for 0) and
        // map keys out of order or repeated (the map keeps the last), which
        // `encode` never writes. Found by the `manifest` fuzzer.
        if postcard::to_stdvec(&m).map_err(ManifestError::Malformed)? != bytes[1..] {
            return Err(ManifestError::Invalid(
                "not in canonical encoding (overlong integer or unordered map keys)".into(),
            ));
        }
        Ok(m)
    }

    /// Decodes bytes fetched for a [`crate::Action::DeployManifest`] or
    /// [`crate::Action::InstallManifest`],
    /// checking them against the command's digest, name and version first.
    pub fn decode_verified(
        bytes: &[u8],
        expected: &crate::ManifestRef,
    ) -> Result<Manifest, ManifestError> {
        if digest(bytes) != expected.digest {
            return Err(ManifestError::DigestMismatch);
        }
        let m = Manifest::decode(bytes)?;
        if m.name != expected.name.as_str() || m.version != expected.version {
            return Err(ManifestError::Invalid(format!(
                "manifest is {} v{}, the command named {} v{}",
                m.name, m.version, expected.name, expected.version
            )));
        }
        Ok(m)
    }

    /// The artifact for `arch`, if this is an artifact process service.
    /// `arm` names are matched loosely (`armv7l` takes an `armv7` artifact),
    /// and an armv7 worker takes an armv6 artifact when there is no armv7
    /// one (armv7 CPUs run armv6 code; not the other way round).
    pub fn artifact_for(&self, arch: &str) -> Option<&ArtifactRef> {
        match &self.runtime {
            Runtime::Process(ProcessRuntime {
                program: Program::Artifacts(list),
                ..
            }) => list
                .iter()
                .find(|a| a.arch == arch)
                .or_else(|| list.iter().find(|a| arch.starts_with(a.arch.as_str())))
                .or_else(|| {
                    arch.starts_with("armv7")
                        .then(|| list.iter().find(|a| a.arch.starts_with("armv6")))
                        .flatten()
                }),
            _ => None,
        }
    }

    /// Checks names, counts and lengths; the worker never acts on a manifest
    /// that fails this.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        if !valid_service_name(&self.name) {
            return bad("service name must be 1..=32 characters of [a-z0-9-]".into());
        }
        check_map("config", &self.config, MAX_MANIFEST_VALUE)?;
        check_map("secrets", &self.secrets, MAX_MANIFEST_VALUE)?;
        match &self.runtime {
            Runtime::Process(p) => {
                match &p.program {
                    Program::Command(c) => {
                        check_str("command", c)?;
                        if c.is_empty() {
                            return bad("command is empty".into());
                        }
                    }
                    Program::Artifacts(list) => {
                        if list.is_empty() || list.len() > MAX_ARTIFACTS {
                            return bad(format!("1..={MAX_ARTIFACTS} artifacts required"));
                        }
                        for a in list {
                            if a.arch.is_empty() || a.arch.len() > 32 {
                                return bad("artifact arch must be 1..=32 bytes".into());
                            }
                        }
                    }
                }
                check_list("args", &p.args)?;
                check_map("env", &p.env, MAX_MANIFEST_STR)?;
                check_str("working_dir", &p.working_dir)?;
            }
            Runtime::Container(c) => {
                check_str("image", &c.image)?;
                if c.image.is_empty() {
                    return bad("image is empty".into());
                }
                check_list("command", &c.command)?;
                check_map("env", &c.env, MAX_MANIFEST_STR)?;
                if c.ports.len() > MAX_MANIFEST_ITEMS || c.volumes.len() > MAX_MANIFEST_ITEMS {
                    return bad(format!("at most {MAX_MANIFEST_ITEMS} ports and volumes"));
                }
                for v in &c.volumes {
                    check_str("volume source", &v.source)?;
                    check_str("volume target", &v.target)?;
                    if !v.source.starts_with('/') || !v.target.starts_with('/') {
                        return bad("volume paths must be absolute".into());
                    }
                }
            }
        }
        if let Some(h) = &self.health {
            match &h.probe {
                Probe::Http { path, .. } => {
                    check_str("health path", path)?;
                    if !path.starts_with('/') {
                        return bad("health path must start with /".into());
                    }
                }
                Probe::Command { command, args } => {
                    check_str("health command", command)?;
                    check_list("health args", args)?;
                }
            }
            if h.interval_ms < 100 || h.timeout_ms == 0 || h.retries == 0 {
                return bad("health interval ≥ 100 ms, timeout > 0 and retries > 0".into());
            }
        }
        Ok(())
    }
}

/// `[a-z0-9-]{1,32}`, not starting with `-`: service names are directory
/// names, path segments and topic-safe, and never read as an option.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_str(what: &str, s: &str) -> Result<(), ManifestError> {
    if s.len() > MAX_MANIFEST_STR || s.contains('\0') {
        return Err(ManifestError::Invalid(format!(
            "{what} longer than {MAX_MANIFEST_STR} bytes or contains NUL"
        )));
    }
    Ok(())
}

fn check_list(what: &str, list: &[String]) -> Result<(), ManifestError> {
    if list.len() > MAX_MANIFEST_ITEMS {
        return Err(ManifestError::Invalid(format!(
            "at most {MAX_MANIFEST_ITEMS} {what}"
        )));
    }
    list.iter().try_for_each(|s| check_str(what, s))
}

fn check_map(
    what: &str,
    map: &BTreeMap<String, String>,
    max_value: usize,
) -> Result<(), ManifestError> {
    if map.len() > MAX_MANIFEST_ITEMS {
        return Err(ManifestError::Invalid(format!(
            "at most {MAX_MANIFEST_ITEMS} {what} entries"
        )));
    }
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !key_ok {
            return Err(ManifestError::Invalid(format!(
                "{what} key {k:?} must be 1..=128 characters of [A-Za-z0-9_.-]"
            )));
        }
        if v.len() > max_value || v.contains('\0') {
            return Err(ManifestError::Invalid(format!(
                "{what} value for {k} longer than {max_value} bytes or contains NUL"
            )));
        }
    }
    Ok(())
}

/// SHA-256 of some bytes (manifests, artifacts).
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parses 64 hex digits.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    // Hex digits only: `from_str_radix` alone also takes a sign, so
    // `+f+f…` parsed (the `text` fuzzer checks a digest has one spelling).
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// The HTTP `Authorization` scheme a worker uses for conductor downloads
/// (manifests, artifacts).
pub const HTTP_AUTH_SCHEME: &str = "Aerekos-Worker";

/// `Authorization` header value proving the worker holds `secret`, bound to
/// one method and path: `Aerekos-Worker <worker_id> <hex tag>`, tag =
/// HMAC-SHA256(secret, "aerekos-http:" method " " path) truncated to 16
/// bytes. It has no timestamp (Pis boot without a clock), so it can be
/// replayed for the same path only: it grants a read of bytes the
/// eavesdropper has already seen.
pub fn http_auth(secret: &crate::Secret, worker_id: &str, method: &str, path: &str) -> String {
    format!(
        "{HTTP_AUTH_SCHEME} {worker_id} {}",
        hex_tag(secret, method, path)
    )
}

/// Checks an [`http_auth`] header for `method` and `path` against the
/// secret looked up by worker id; returns the worker id on success.
pub fn verify_http_auth<'a>(
    header: &'a str,
    method: &str,
    path: &str,
    secret_of: impl FnOnce(&str) -> Option<crate::Secret>,
) -> Option<&'a str> {
    let mut parts = header.split(' ');
    if parts.next()? != HTTP_AUTH_SCHEME {
        return None;
    }
    let id = parts.next()?;
    let tag = parts.next()?;
    if parts.next().is_some() || !crate::topic::is_valid_worker_id(id) {
        return None;
    }
    let secret = secret_of(id)?;
    let expected = hex_tag(&secret, method, path);
    // Constant-time comparison of equal-length ASCII strings.
    if tag.len() != expected.len() {
        return None;
    }
    let diff = tag
        .bytes()
        .zip(expected.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (diff == 0).then_some(id)
}

fn hex_tag(secret: &crate::Secret, method: &str, path: &str) -> String {
    use hmac::Mac;
    let mut mac = secret.mac();
    mac.update(b"aerekos-http:");
    mac.update(method.as_bytes());
    mac.update(b" ");
    mac.update(path.as_bytes());
    crate::hex_string(&mac.finalize().into_bytes()[..crate::TAG_LEN])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn parse_digest_takes_hex_digits_only() {
        let d = [0xab; 32];
        assert_eq!(parse_digest(&crate::hex_string(&d)), Some(d));
        assert_eq!(parse_digest(&"AB".repeat(32)), Some(d));
        // `u8::from_str_radix("+f", 16)` is Ok(15): a sign must not pass.
        assert_eq!(parse_digest(&"+f".repeat(32)), None);
        assert_eq!(parse_digest(&"0g".repeat(32)), None);
        assert_eq!(parse_digest("ab"), None);
    }

    /// The `manifest` fuzzer's first find: a manifest with an overlong
    /// varint (`80 00`) decoded, so two byte strings (two digests) named
    /// one manifest.
    #[test]
    fn non_canonical_manifest_bytes_are_refused() {
        const OVERLONG: [u8; 84] = [
            0x01, 0x0c, 0x73, 0x65, 0x6e, 0x73, 0x6f, 0x72, 0x2d, 0x72, 0x65, 0x6c, 0x61, 0x79,
            0x0f, 0x01, 0x16, 0x72, 0x65, 0x67, 0x69, 0x73, 0x74, 0x05, 0x73, 0x65, 0x72, 0x76,
            0x65, 0x01, 0x04, 0x4d, 0x4f, 0x44, 0x45, 0x04, 0x70, 0x72, 0x6f, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x01, 0x80, 0x80, 0x20, 0x01, 0xf4, 0x03,
            0x00, 0x01, 0x04, 0x73, 0x69, 0x74, 0x65, 0x04, 0x73, 0x68, 0x6f, 0x70, 0x01, 0x07,
            0x61, 0x70, 0x69, 0x5f, 0x6b, 0x65, 0x79, 0x06, 0x73, 0x33, 0x63, 0x72, 0x33, 0x74,
        ];
        assert!(matches!(
            Manifest::decode(&OVERLONG),
            Err(ManifestError::Invalid(m)) if m.contains("canonical")
        ));
        // Its canonical spelling decodes, and is what `encode` writes.
        let canonical = [&[MANIFEST_FORMAT][..], &{
            let (m, _): (Manifest, _) = postcard::take_from_bytes(&OVERLONG[1..]).unwrap();
            postcard::to_stdvec(&m).unwrap()
        }]
        .concat();
        assert_ne!(canonical.as_slice(), &OVERLONG[..]);
        let m = Manifest::decode(&canonical).unwrap();
        assert_eq!(m.encode().unwrap(), canonical);

        // Map keys out of order (a hand-made encoding): refused.
        let mut two = crate::examples::manifest();
        two.config = [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]
        .into();
        let good = two.encode().unwrap();
        let a = good
            .windows(4)
            .position(|w| w == [1, b'a', 1, b'1'])
            .unwrap();
        let mut swapped = good.clone();
        swapped[a..a + 8].copy_from_slice(&[1, b'b', 1, b'2', 1, b'a', 1, b'1']);
        assert!(Manifest::decode(&good).is_ok());
        assert!(matches!(
            Manifest::decode(&swapped),
            Err(ManifestError::Invalid(_))
        ));
    }
}
