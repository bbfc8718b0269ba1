//! The durable key store: one sealed file per key under `<data-dir>/keys/`,
//! plus `<data-dir>/master.check`, a sealed constant that tells at start
//! whether the store belongs to this master key.
//!
//! A key file is the JSON [`KeyFile`] (name, flags, every version's
//! material) sealed under the master key with the label
//! `aerekos-key-manager/key/v1:<name>` (see [`crate::crypto`]). Every change
//! rewrites the key's file atomically — temp file, `fsync`, `rename`,
//! `fsync` of the directory — *before* the change is visible in memory or
//! acknowledged, so a `kill -9` at any point leaves either the old or the
//! new file and never loses an acknowledged change. Stray temp files are
//! removed at start. Files are 0600 in a 0700 directory.
//!
//! Writers are serialised by one mutex; readers (encrypt/decrypt) take a
//! read lock on the in-memory map only for the lookup (`Arc<Key>`), so an
//! `fsync` never stalls them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::XChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use crate::crypto::{self, CryptoError, MasterKey, SecretKey, KEY_LEN};

/// Most keys in a store.
pub const MAX_KEYS: usize = 10_000;
/// Most versions of one key (each rotation adds one).
pub const MAX_VERSIONS: usize = 1_000;
/// Most clients in a key's allow-list.
pub const MAX_KEY_CLIENTS: usize = 32;
/// Longest accepted key file, bytes (a full key is ~100 KiB).
const MAX_FILE: u64 = 1 << 20;
const CHECK_FILE: &str = "master.check";
const CHECK_LABEL: &[u8] = b"aerekos-key-manager/check/v1";
const CHECK_TEXT: &[u8] = b"aerekos key-manager store";
const KEY_LABEL: &str = "aerekos-key-manager/key/v1:";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store was sealed under another master key.
    #[error(
        "the store in {dir} was sealed under a different master key than {source_name}; \
         refusing to start (restore the original master_key secret, or use a new data dir)"
    )]
    WrongMaster {
        /// The data dir.
        dir: PathBuf,
        /// Where this start's master key came from.
        source_name: String,
    },
    /// A key file cannot be used.
    #[error("key file {path} is unusable: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `create` of a name that exists.
    #[error("key {0} already exists")]
    Exists(String),
    /// No such key.
    #[error("key {0} not found")]
    NotFound(String),
    /// Not `[a-z0-9][a-z0-9_-]{{0,63}}`.
    #[error("invalid key name {0:?}: use 1-64 of [a-z0-9_-], starting with a letter or digit")]
    InvalidName(String),
    /// Bad allow-list.
    #[error("invalid clients list: {0}")]
    InvalidClients(String),
    /// Over [`MAX_KEYS`].
    #[error("the store holds the maximum of {MAX_KEYS} keys")]
    TooManyKeys,
    /// Over [`MAX_VERSIONS`].
    #[error("key {0} has the maximum of {MAX_VERSIONS} versions")]
    TooManyVersions(String),
    /// Random generation or sealing failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A durable write failed.
    #[error(transparent)]
    Durable(#[from] service_runtime::DurableError),
}

fn io_err<'p>(
    what: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'p {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Seconds since the Unix epoch (metadata only; nothing depends on it).
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One version of a key: its material and its AEAD.
pub struct KeyVersion {
    /// 1, 2, ...
    pub version: u32,
    /// Unix seconds.
    pub created: u64,
    material: SecretKey,
    cipher: XChaCha20Poly1305,
}

impl KeyVersion {
    fn new(version: u32, created: u64, material: SecretKey) -> KeyVersion {
        let cipher = material.cipher();
        KeyVersion {
            version,
            created,
            material,
            cipher,
        }
    }

    /// The AEAD of this version.
    pub fn cipher(&self) -> &XChaCha20Poly1305 {
        &self.cipher
    }
}

impl std::fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVersion")
            .field("version", &self.version)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// A named key: immutable snapshot (changes replace the `Arc`).
#[derive(Debug, Clone)]
pub struct Key {
    /// The name.
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// Disabled keys refuse encrypt, decrypt, re-encrypt and data keys.
    pub enabled: bool,
    /// Clients allowed to use the key; `None` = every client.
    pub clients: Option<Vec<String>>,
    /// Versions, index `v - 1` holds version `v`. Never empty.
    pub versions: Vec<Arc<KeyVersion>>,
}

impl Key {
    /// The newest version (what encrypt uses).
    pub fn latest(&self) -> Option<&Arc<KeyVersion>> {
        self.versions.last()
    }

    /// Version `v`, if it exists.
    pub fn version(&self, v: u32) -> Option<&Arc<KeyVersion>> {
        let i = usize::try_from(v).ok()?.checked_sub(1)?;
        self.versions.get(i)
    }

    /// May `client` use this key?
    pub fn allows(&self, client: &str) -> bool {
        self.clients
            .as_ref()
            .is_none_or(|list| list.iter().any(|c| c == client))
    }
}

/// The plaintext inside a sealed key file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    created: u64,
    enabled: bool,
    clients: Option<Vec<String>>,
    versions: Vec<VersionFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    version: u32,
    created: u64,
    /// Hex of the 32-byte key (only ever inside the sealed file).
    material: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != 2 * KEY_LEN {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub use service_runtime::clients::valid_client_name;

/// The durable store. See the module docs.
#[derive(Debug)]
pub struct Store {
    data_dir: PathBuf,
    keys_dir: PathBuf,
    master: MasterKey,
    keys: RwLock<BTreeMap<String, Arc<Key>>>,
    writer: Mutex<()>,
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir` and loads every
    /// key. Fails with [`StoreError::WrongMaster`] when the store was sealed
    /// under another master key, and on any unusable key file (a KMS must
    /// not silently start without a key it had).
    pub fn open(data_dir: &Path, master: MasterKey) -> Result<Store, StoreError> {
        let keys_dir = data_dir.join("keys");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&keys_dir)
            .map_err(io_err("creating", &keys_dir))?;
        let store = Store {
            data_dir: data_dir.to_path_buf(),
            keys_dir,
            master,
            keys: RwLock::new(BTreeMap::new()),
            writer: Mutex::new(()),
        };
        let check = data_dir.join(CHECK_FILE);
        let check_exists = check.exists();
        if check_exists {
            let sealed = read_bounded(&check)?;
            match store.master.open(CHECK_LABEL, &sealed) {
                Ok(t) if t == CHECK_TEXT => {}
                _ => return Err(store.wrong_master()),
            }
        }
        let mut loaded = BTreeMap::new();
        let entries = fs::read_dir(&store.keys_dir).map_err(io_err("listing", &store.keys_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &store.keys_dir))?;
            let path = entry.path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file_name.starts_with('.') && file_name.ends_with(".tmp") {
                // A write that never got renamed: never acknowledged.
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                continue;
            }
            let Some(name) = file_name.strip_suffix(".key") else {
                continue;
            };
            match store.load_key(name, &path) {
                Ok(k) => {
                    loaded.insert(name.to_string(), Arc::new(k));
                }
                // Without a check file (older store, or deleted), a key that
                // does not open under this master is the same diagnosis.
                Err(StoreError::Crypto(CryptoError::Auth)) if !check_exists => {
                    return Err(store.wrong_master())
                }
                Err(e) => return Err(e),
            }
        }
        if !check_exists {
            let sealed = store.master.seal(CHECK_LABEL, CHECK_TEXT)?;
            service_runtime::write_atomic(data_dir, CHECK_FILE, &sealed)?;
        }
        *store.keys.write().unwrap_or_else(PoisonError::into_inner) = loaded;
        Ok(store)
    }

    fn wrong_master(&self) -> StoreError {
        StoreError::WrongMaster {
            dir: self.data_dir.clone(),
            source_name: self.master.source().to_string(),
        }
    }

    fn load_key(&self, name: &str, path: &Path) -> Result<Key, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if !crypto::valid_key_name(name) {
            return Err(corrupt("not a valid key name".into()));
        }
        let sealed = read_bounded(path)?;
        let label = format!("{KEY_LABEL}{name}");
        let plain = self
            .master
            .open(label.as_bytes(), &sealed)
            .map_err(|e| match e {
                CryptoError::Auth => StoreError::Crypto(CryptoError::Auth),
                other => corrupt(other.to_string()),
            })?;
        let file: KeyFile =
            serde_json::from_slice(&plain).map_err(|e| corrupt(format!("bad contents: {e}")))?;
        if file.name != name {
            return Err(corrupt("holds another key".into()));
        }
        if file.versions.is_empty() || file.versions.len() > MAX_VERSIONS {
            return Err(corrupt("bad number of versions".into()));
        }
        let mut versions = Vec::with_capacity(file.versions.len());
        for (i, v) in file.versions.iter().enumerate() {
            let material = unhex32(&v.material).ok_or_else(|| corrupt("bad material".into()))?;
            if usize::try_from(v.version).ok() != Some(i + 1) {
                return Err(corrupt("versions out of order".into()));
            }
            versions.push(Arc::new(KeyVersion::new(
                v.version,
                v.created,
                SecretKey::from_bytes(material),
            )));
        }
        Ok(Key {
            name: file.name,
            created: file.created,
            enabled: file.enabled,
            clients: file.clients,
            versions,
        })
    }

    /// Seals and atomically writes `key`'s file.
    fn persist(&self, key: &Key) -> Result<(), StoreError> {
        let file = KeyFile {
            name: key.name.clone(),
            created: key.created,
            enabled: key.enabled,
            clients: key.clients.clone(),
            versions: key
                .versions
                .iter()
                .map(|v| VersionFile {
                    version: v.version,
                    created: v.created,
                    material: hex(v.material.as_bytes()),
                })
                .collect(),
        };
        let mut plain = serde_json::to_vec(&file).map_err(|e| StoreError::Corrupt {
            path: self.keys_dir.clone(),
            reason: format!("encoding: {e}"),
        })?;
        let label = format!("{KEY_LABEL}{}", key.name);
        let sealed = self.master.seal(label.as_bytes(), &plain);
        plain.fill(0);
        std::hint::black_box(&plain);
        drop(file);
        service_runtime::write_atomic(&self.keys_dir, &format!("{}.key", key.name), &sealed?)?;
        Ok(())
    }

    /// Where the master key came from.
    pub fn master_source(&self) -> crate::crypto::MasterSource {
        self.master.source()
    }

    /// The key `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Key>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every key, by name.
    pub fn list(&self) -> Vec<Arc<Key>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No keys?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `change` under the writer lock: persist, then publish.
    fn update(
        &self,
        name: &str,
        change: impl FnOnce(Option<&Key>) -> Result<Key, StoreError>,
    ) -> Result<Arc<Key>, StoreError> {
        let _w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.get(name);
        let next = Arc::new(change(current.as_deref())?);
        self.persist(&next)?;
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), next.clone());
        Ok(next)
    }

    /// Creates key `name` with a first version; `clients` restricts it.
    pub fn create(&self, name: &str, clients: Option<Vec<String>>) -> Result<Arc<Key>, StoreError> {
        if !crypto::valid_key_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        if let Some(list) = &clients {
            if list.len() > MAX_KEY_CLIENTS {
                return Err(StoreError::InvalidClients(format!(
                    "at most {MAX_KEY_CLIENTS} clients"
                )));
            }
            if let Some(bad) = list.iter().find(|c| !valid_client_name(c)) {
                return Err(StoreError::InvalidClients(format!(
                    "{bad:?} is not [a-z0-9_-]{{1,32}}"
                )));
            }
        }
        let count = self.len();
        self.update(name, |current| {
            if current.is_some() {
                return Err(StoreError::Exists(name.to_string()));
            }
            if count >= MAX_KEYS {
                return Err(StoreError::TooManyKeys);
            }
            let now = now_s();
            Ok(Key {
                name: name.to_string(),
                created: now,
                enabled: true,
                clients,
                versions: vec![Arc::new(KeyVersion::new(1, now, SecretKey::random()?))],
            })
        })
    }

    /// Adds a new version to `name`; it becomes the one encrypt uses.
    pub fn rotate(&self, name: &str) -> Result<Arc<Key>, StoreError> {
        self.update(name, |current| {
            let mut key = current
                .cloned()
                .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
            if key.versions.len() >= MAX_VERSIONS {
                return Err(StoreError::TooManyVersions(name.to_string()));
            }
            let next = u32::try_from(key.versions.len() + 1)
                .map_err(|_| StoreError::TooManyVersions(name.to_string()))?;
            key.versions.push(Arc::new(KeyVersion::new(
                next,
                now_s(),
                SecretKey::random()?,
            )));
            Ok(key)
        })
    }

    /// Enables or disables `name`.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<Arc<Key>, StoreError> {
        self.update(name, |current| {
            let mut key = current
                .cloned()
                .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
            key.enabled = enabled;
            Ok(key)
        })
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, StoreError> {
    let meta = fs::metadata(path).map_err(io_err("reading", path))?;
    if meta.len() > MAX_FILE {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_FILE} bytes"),
        });
    }
    fs::read(path).map_err(io_err("reading", path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use crate::crypto::MasterSource;

    fn master(b: u8) -> MasterKey {
        MasterKey::new(SecretKey::from_bytes([b; 32]), MasterSource::Explicit)
    }

    #[test]
    fn create_rotate_reload() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), master(1)).unwrap();
        s.create("orders", None).unwrap();
        assert!(matches!(
            s.create("orders", None),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            s.create("../x", None),
            Err(StoreError::InvalidName(_))
        ));
        s.rotate("orders").unwrap();
        s.set_enabled("orders", false).unwrap();
        s.create("b", Some(vec!["app1".into()])).unwrap();
        drop(s);
        let s = Store::open(dir.path(), master(1)).unwrap();
        let k = s.get("orders").unwrap();
        assert_eq!(k.versions.len(), 2);
        assert!(!k.enabled);
        assert!(s.get("b").unwrap().allows("app1"));
        assert!(!s.get("b").unwrap().allows("app2"));
        // No plaintext material or names inside files.
        let raw = fs::read(dir.path().join("keys/orders.key")).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("orders"));
        assert!(matches!(
            Store::open(dir.path(), master(2)),
            Err(StoreError::WrongMaster { .. })
        ));
        fs::remove_file(dir.path().join(CHECK_FILE)).unwrap();
        assert!(matches!(
            Store::open(dir.path(), master(2)),
            Err(StoreError::WrongMaster { .. })
        ));
    }
}
