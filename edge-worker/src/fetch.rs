//! Downloads from the conductor for [`protocol::Action::DeployManifest`]
//! and [`protocol::Action::InstallManifest`]:
//! the manifest itself and, for artifact process services, the binary for
//! this worker's architecture, kept in a content-addressed cache.
//!
//! Every request is a plain HTTP `GET` with the worker's
//! [`protocol::manifest::http_auth`] header (bound to the method and path),
//! made with ureq and therefore **blocking**: call these functions from
//! `spawn_blocking` or a thread, never from the runtime thread.
//!
//! The artifact cache is `<state_dir>/artifacts/<sha256 hex>`. A download
//! goes to `<hex>.part` (mode 0600) while being hashed; only when the size
//! and the SHA-256 both match is it made executable (0700) and renamed to its
//! final name, so a file under a final name has always been verified once.
//! A cached file is hashed again before every exec
//! ([`verify_cached`]), and a mismatch deletes it.
//!
//! Manifests carry the services' secrets, so they are fetched **sealed**:
//! `GET /api/v1/agent/sealed-manifests/{name}/{version}` answers the
//! manifest bytes sealed to this worker ([`protocol::sealed`], context
//! `manifest:<worker_id>:<name>:<version>`); they are opened with the
//! worker's secret, then checked against the command's digest as before.
//! Bytes that do not open are refused ([`FetchError::Sealed`]) and nothing
//! is deployed. On a plain link (the conductor's loopback, an
//! `--insecure-plain` LAN) or behind a TLS proxy that logs bodies, the
//! secrets are therefore never readable.
//!
//! **Older conductors** do not know the sealed route: it falls through to
//! their JSON API, which answers 401 (it wants a bearer token there, not a
//! worker's authorization), and a conductor without that check would answer
//! 404. On either status the worker fetches the plaintext route
//! `GET /api/v1/agent/manifests/{name}/{version}` for that command, and logs
//! once per conductor, at info, that the conductor is older when that
//! succeeds. (A current conductor answers both routes alike, so the second
//! request then fails the same way and its error is reported.)
//! This fallback is only tolerable because (a) a man in the middle cannot
//! forge this worker's HTTP authorization for another path (it is an HMAC of
//! method and path under the worker's secret), so it cannot fetch the
//! plaintext manifest itself, and (b) plain links are loopback-only unless
//! the conductor runs with `--insecure-plain`; otherwise the link is HTTPS
//! to the pinned CA. An *active* attacker on an `--insecure-plain` link can
//! still answer the sealed request 404 and read the plaintext answer to the
//! worker's own retry; to narrow that, once this process has opened a sealed
//! manifest from a conductor URL it never falls back for that URL again (a
//! 404 or 401 there is then the conductor's real answer; a conductor
//! downgraded under a running agent needs the agent restarted).
//!
//! Limits: a manifest is at most [`protocol::manifest::MAX_MANIFEST_LEN`]
//! bytes (read with that limit, plus [`protocol::sealed::OVERHEAD`] when
//! sealed; 30 s per request); an artifact at most [`MAX_ARTIFACT_LEN`] bytes
//! (its advertised size is checked before the download starts), 5 s to
//! connect and 60 s without progress. Redirects are not followed (the
//! authorization header is bound to one path). Artifacts hold no secrets:
//! the digest carried by the authenticated command is what makes their
//! bytes trustworthy, not the transport.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use protocol::manifest::{
    http_auth, valid_service_name, ArtifactRef, Manifest, ManifestError, MAX_MANIFEST_LEN,
};
use protocol::sealed::{manifest_context, SealError, OVERHEAD};
use protocol::{ManifestRef, Secret};
use sha2::{Digest, Sha256};

/// Dir of the artifact cache inside the state dir.
pub const ARTIFACTS_DIR: &str = "artifacts";
/// Largest artifact the worker downloads, bytes.
pub const MAX_ARTIFACT_LEN: u64 = 256 * 1024 * 1024;
/// Path prefix of plaintext manifest downloads (conductors older than
/// [`SEALED_MANIFEST_PATH`]).
pub const MANIFEST_PATH: &str = "/api/v1/agent/manifests";
/// Path prefix of sealed manifest downloads.
pub const SEALED_MANIFEST_PATH: &str = "/api/v1/agent/sealed-manifests";
/// Path prefix of artifact downloads.
pub const ARTIFACT_PATH: &str = "/api/v1/agent/artifacts";
/// Suffix of a download in progress in the cache dir.
const PART_SUFFIX: &str = ".part";

/// Why a download failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The conductor URL cannot be used.
    #[error("invalid conductor URL {0:?} (expected http://host:port)")]
    BadUrl(String),
    /// Connection refused, timeout, broken transfer: retrying may help.
    #[error("conductor unavailable: {0}")]
    Unavailable(String),
    /// The conductor answered with a non-2xx status.
    #[error("the conductor answered HTTP {status} for {path}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Request path.
        path: String,
    },
    /// The manifest bytes were refused (digest, format, validation).
    #[error("manifest refused: {0}")]
    Manifest(#[from] ManifestError),
    /// The sealed manifest did not open with this worker's secret and the
    /// command's name and version.
    #[error("sealed manifest does not open: wrong worker secret or tampered ({0})")]
    Sealed(#[source] SealError),
    /// The artifact's bytes do not hash to the digest of the manifest.
    #[error("sha256 mismatch (expected {expected}, got {actual})")]
    Sha256Mismatch {
        /// Hex digest in the manifest.
        expected: String,
        /// Hex digest of the bytes received (or cached).
        actual: String,
    },
    /// The artifact does not have the size the manifest gives.
    #[error("size mismatch (expected {expected} bytes, got {actual})")]
    SizeMismatch {
        /// Size in the manifest.
        expected: u64,
        /// Bytes received (or cached).
        actual: u64,
    },
    /// The manifest announces an artifact above [`MAX_ARTIFACT_LEN`].
    #[error("artifact is {0} bytes, the limit is {MAX_ARTIFACT_LEN}")]
    TooLarge(u64),
    /// The manifest has no artifact for this worker's architecture.
    #[error("no artifact for arch {0:?}")]
    NoArtifact(String),
    /// The cache dir could not be written.
    #[error("artifact cache: {0}")]
    Cache(#[source] io::Error),
}

impl FetchError {
    /// Bytes arrived but did not match what the authenticated command
    /// promised: reported as an [`protocol::EventKind::ArtifactRejected`].
    /// The short reason (`sha256 mismatch`, …) is the event's detail.
    pub fn rejection(&self) -> Option<&'static str> {
        match self {
            FetchError::Manifest(ManifestError::DigestMismatch) => Some("manifest digest mismatch"),
            FetchError::Sealed(_) => Some("sealed manifest does not open"),
            FetchError::Sha256Mismatch { .. } => Some("sha256 mismatch"),
            FetchError::SizeMismatch { .. } => Some("size mismatch"),
            _ => None,
        }
    }
}

/// Where and as whom to download.
#[derive(Clone)]
pub struct Conductor {
    /// Base URL, `http://host:port`, or several (an active conductor and
    /// its standbys).
    pub urls: crate::conductor_urls::ConductorUrls,
    /// This worker's id.
    pub worker_id: String,
    /// This worker's frame secret (signs the request).
    pub secret: Secret,
    /// The secret before a rotation: a manifest the conductor sealed before
    /// it saw the switch opens with it.
    pub previous_secret: Option<Secret>,
    /// The pinned CA for `https://` (none: plain HTTP only).
    pub trust: Option<crate::tls::Trust>,
}

impl std::fmt::Debug for Conductor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conductor")
            .field("urls", &self.urls)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl Conductor {
    fn get(
        &self,
        path: &str,
        global: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let base = self.urls.reachable();
        let agent = crate::tls::http_agent(
            self.trust.as_ref(),
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_connect(Some(Duration::from_secs(5)))
                .timeout_per_read(Some(Duration::from_secs(60)))
                .timeout_global(global),
        );
        let auth = http_auth(&self.secret, &self.worker_id, "GET", path);
        let resp = match agent
            .get(format!("{base}{path}"))
            .header("Authorization", auth)
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::BadUri(e)) => return Err(FetchError::BadUrl(e)),
            Err(e) => return Err(FetchError::Unavailable(crate::tls::explain(&e.to_string()))),
        };
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(FetchError::Status {
                status,
                path: path.to_string(),
            });
        }
        Ok(resp)
    }

    /// Fetches the manifest `r` names and checks it against the digest,
    /// name and version of the command ([`Manifest::decode_verified`]).
    pub fn fetch_manifest(&self, r: &ManifestRef) -> Result<Manifest, FetchError> {
        if !valid_service_name(&r.name) {
            return Err(
                ManifestError::Invalid(format!("invalid service name {:?}", r.name)).into(),
            );
        }
        let sealed_path = format!("{SEALED_MANIFEST_PATH}/{}/{}", r.name, r.version);
        let bytes = match self.read_manifest(&sealed_path, OVERHEAD) {
            Ok(sealed) => {
                let context = manifest_context(&self.worker_id, &r.name, r.version);
                let bytes = protocol::sealed::open(&self.secret, context.as_bytes(), &sealed)
                    .or_else(|e| match &self.previous_secret {
                        Some(p) => protocol::sealed::open(p, context.as_bytes(), &sealed),
                        None => Err(e),
                    })
                    .map_err(FetchError::Sealed)?;
                remember(&SEALED_SEEN, self.urls.current());
                bytes
            }
            Err(FetchError::Status {
                status: 401 | 404, ..
            }) if !known(&SEALED_SEEN, self.urls.current()) => {
                let path = format!("{MANIFEST_PATH}/{}/{}", r.name, r.version);
                let bytes = self.read_manifest(&path, 0)?;
                if remember(&OLDER_LOGGED, self.urls.current()) {
                    tracing::info!(
                        conductor = %self.urls.current(),
                        "the conductor is older than sealed manifests: fetched {path} in plaintext"
                    );
                }
                bytes
            }
            Err(e) => return Err(e),
        };
        Ok(Manifest::decode_verified(&bytes, r)?)
    }

    /// GETs `path` and reads at most a manifest and `extra` bytes.
    fn read_manifest(&self, path: &str, extra: usize) -> Result<Vec<u8>, FetchError> {
        let limit = MAX_MANIFEST_LEN + extra;
        let mut resp = self.get(path, Some(Duration::from_secs(30)))?;
        resp.body_mut()
            .with_config()
            .limit(limit as u64 + 1)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    FetchError::Manifest(ManifestError::Oversized(limit + 1))
                }
                e => FetchError::Unavailable(format!("reading the manifest: {e}")),
            })
    }

    /// Makes sure the artifact `a` is in the cache under `state_dir`,
    /// downloading it if missing (or if the cached copy no longer matches);
    /// returns its path and whether it was downloaded now.
    pub fn ensure_artifact(
        &self,
        state_dir: &Path,
        a: &ArtifactRef,
    ) -> Result<(PathBuf, bool), FetchError> {
        if a.size > MAX_ARTIFACT_LEN {
            return Err(FetchError::TooLarge(a.size));
        }
        let dir = state_dir.join(ARTIFACTS_DIR);
        let path = artifact_path(state_dir, &a.sha256);
        match verify_cached(&path, a) {
            Ok(()) => return Ok((path, false)),
            Err(FetchError::Cache(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cached {} refused ({e}); downloading again", path.display()),
        }
        fs::create_dir_all(&dir).map_err(FetchError::Cache)?;
        let hex = protocol::hex_string(&a.sha256);
        // Unique per download: two services may fetch the same artifact at once.
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let part = dir.join(format!("{hex}.{}-{n}{PART_SUFFIX}", std::process::id()));
        let result = self.download_to(&part, a, &hex);
        match result {
            Ok(()) => {
                fs::set_permissions(&part, fs::Permissions::from_mode(0o700))
                    .and_then(|()| fs::rename(&part, &path))
                    .and_then(|()| crate::state::sync_dir(&dir))
                    .map_err(FetchError::Cache)?;
                Ok((path, true))
            }
            Err(e) => {
                let _ = fs::remove_file(&part);
                Err(e)
            }
        }
    }

    /// Streams the artifact into `part` while hashing; checks size and
    /// digest. `part` is left behind on error (the caller deletes it).
    fn download_to(&self, part: &Path, a: &ArtifactRef, hex: &str) -> Result<(), FetchError> {
        let path = format!("{ARTIFACT_PATH}/{hex}");
        let mut resp = self.get(&path, None)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(part)
            .map_err(FetchError::Cache)?;
        // One byte more than announced: a longer body is a mismatch, not a
        // truncation.
        let mut reader = resp
            .body_mut()
            .with_config()
            .limit(a.size.saturating_add(1))
            .reader();
        let mut hasher = Sha256::new();
        let mut len: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The limit: more bytes than announced.
                Err(_) if len >= a.size => {
                    return Err(FetchError::SizeMismatch {
                        expected: a.size,
                        actual: len.saturating_add(1),
                    })
                }
                Err(e) => return Err(FetchError::Unavailable(format!("downloading: {e}"))),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            hasher.update(chunk);
            file.write_all(chunk).map_err(FetchError::Cache)?;
            len += n as u64;
        }
        file.sync_all().map_err(FetchError::Cache)?;
        check(a, len, hasher.finalize().into())
    }
}

/// Conductor URLs this process has opened a sealed manifest from: no
/// plaintext fallback for them any more. (A list: one URL in practice; a
/// `BTreeSet` cost the agent 2 KB more.)
static SEALED_SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Conductor URLs already logged as older (once each).
static OLDER_LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Adds `url` to `list`; whether it was new.
fn remember(list: &Mutex<Vec<String>>, url: &str) -> bool {
    let mut list = list
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let new = !list.iter().any(|u| u == url);
    if new {
        list.push(url.to_string());
    }
    new
}

fn known(list: &Mutex<Vec<String>>, url: &str) -> bool {
    list.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .any(|u| u == url)
}

fn check(a: &ArtifactRef, len: u64, actual: [u8; 32]) -> Result<(), FetchError> {
    if actual != a.sha256 {
        return Err(FetchError::Sha256Mismatch {
            expected: protocol::hex_string(&a.sha256),
            actual: protocol::hex_string(&actual),
        });
    }
    if len != a.size {
        return Err(FetchError::SizeMismatch {
            expected: a.size,
            actual: len,
        });
    }
    Ok(())
}

/// `<state_dir>/artifacts/<sha256 hex>`.
pub fn artifact_path(state_dir: &Path, sha256: &[u8; 32]) -> PathBuf {
    state_dir
        .join(ARTIFACTS_DIR)
        .join(protocol::hex_string(sha256))
}

/// Hashes a cached artifact and checks it against `a`. A file that exists
/// but does not match is deleted (`Sha256Mismatch` / `SizeMismatch`); a
/// missing file is `Cache(NotFound)`. Blocking: reads the whole file.
pub fn verify_cached(path: &Path, a: &ArtifactRef) -> Result<(), FetchError> {
    let mut file = fs::File::open(path).map_err(FetchError::Cache)?;
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FetchError::Cache(e)),
        };
        hasher.update(buf.get(..n).unwrap_or_default());
        len += n as u64;
        if len > MAX_ARTIFACT_LEN {
            break;
        }
    }
    let result = check(a, len, hasher.finalize().into());
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// Deletes cached artifacts whose digest is not in `keep`, and downloads
/// left half-done (`*.part`) when `parts` is true (only safe when no
/// download runs). Returns how many files were deleted.
pub fn prune_artifacts(state_dir: &Path, keep: &BTreeSet<[u8; 32]>, parts: bool) -> usize {
    let dir = state_dir.join(ARTIFACTS_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut deleted = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let delete = if name.ends_with(PART_SUFFIX) {
            parts
                && name
                    .get(..64)
                    .and_then(protocol::manifest::parse_digest)
                    .is_some()
        } else {
            protocol::manifest::parse_digest(&name).is_some_and(|d| !keep.contains(&d))
        };
        if delete {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(artifact = %name, "pruned from the cache");
                    deleted += 1;
                }
                Err(e) => tracing::warn!(artifact = %name, "cannot prune: {e}"),
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn art(bytes: &[u8]) -> ArtifactRef {
        ArtifactRef {
            arch: "x86_64".into(),
            sha256: protocol::manifest::digest(bytes),
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn cached_files_are_verified_and_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let a = art(b"hello");
        let path = artifact_path(tmp.path(), &a.sha256);
        assert!(matches!(
            verify_cached(&path, &a),
            Err(FetchError::Cache(e)) if e.kind() == io::ErrorKind::NotFound
        ));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"hello").unwrap();
        verify_cached(&path, &a).unwrap();
        fs::write(&path, b"hellO").unwrap();
        let e = verify_cached(&path, &a).unwrap_err();
        assert_eq!(e.rejection(), Some("sha256 mismatch"), "{e}");
        assert!(!path.exists(), "a corrupt cached file is deleted");

        let b = art(b"other");
        let keep_path = artifact_path(tmp.path(), &b.sha256);
        fs::write(&path, b"hello").unwrap();
        fs::write(&keep_path, b"other").unwrap();
        let part = tmp.path().join(ARTIFACTS_DIR).join(format!(
            "{}.1-0{PART_SUFFIX}",
            protocol::hex_string(&a.sha256)
        ));
        fs::write(&part, b"half").unwrap();
        fs::write(tmp.path().join(ARTIFACTS_DIR).join("notes.txt"), b"x").unwrap();
        let keep = BTreeSet::from([b.sha256]);
        assert_eq!(prune_artifacts(tmp.path(), &keep, false), 1);
        assert!(!path.exists() && keep_path.exists() && part.exists());
        assert_eq!(prune_artifacts(tmp.path(), &keep, true), 1);
        assert!(!part.exists());
        assert!(tmp.path().join(ARTIFACTS_DIR).join("notes.txt").exists());
    }

    #[test]
    fn refused_before_connecting() {
        let c = Conductor {
            urls: crate::conductor_urls::ConductorUrls::parse("http://127.0.0.1:1").unwrap(),
            worker_id: "w-1".into(),
            secret: Secret::from_bytes([1; 32]),
            previous_secret: None,
            trust: None,
        };
        let r = ManifestRef {
            name: protocol::frame::bounded("web"),
            version: 1,
            digest: [0; 32],
        };
        let bad = ManifestRef {
            name: protocol::frame::bounded("../x"),
            ..r
        };
        assert!(matches!(
            c.fetch_manifest(&bad),
            Err(FetchError::Manifest(_))
        ));
        let tmp = tempfile::tempdir().unwrap();
        let mut big = art(b"x");
        big.size = MAX_ARTIFACT_LEN + 1;
        assert!(matches!(
            c.ensure_artifact(tmp.path(), &big),
            Err(FetchError::TooLarge(_))
        ));
        assert!(!format!("{c:?}").contains("secret"));
    }
}
