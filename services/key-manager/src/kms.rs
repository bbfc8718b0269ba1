//! The key-management operations, independent of HTTP: authentication,
//! per-key authorisation, create/rotate/enable/disable, encrypt, decrypt,
//! re-encrypt and data keys, with counters and audit events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::crypto::{self, CryptoError};
use crate::store::{Key, KeyVersion, Store, StoreError};
use service_runtime::{Audit, Clients};

/// Largest plaintext accepted by encrypt, bytes (413 beyond).
pub const MAX_PLAINTEXT: usize = 32 * 1024;
/// Largest caller-supplied associated data, bytes (400 beyond).
pub const MAX_AAD: usize = 8 * 1024;
/// Data key sizes accepted (bytes).
pub const DATAKEY_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Why an operation was refused. The messages are safe to show to the
/// client and to log: they never contain data, keys or tokens.
#[derive(Debug, thiserror::Error)]
pub enum KmError {
    /// No or an unknown client token.
    #[error("missing or unknown API key (Authorization: Bearer <client token>)")]
    Unauthorized,
    /// The client is not on the key's allow-list.
    #[error("client {client} may not use key {key}")]
    Forbidden {
        /// The client.
        client: String,
        /// The key.
        key: String,
    },
    /// The key is disabled.
    #[error("key {0} is disabled")]
    Disabled(String),
    /// A ciphertext names a version the key does not have.
    #[error("the ciphertext names version {version} of key {key}, which does not exist")]
    NoSuchVersion {
        /// The key.
        key: String,
        /// The version.
        version: u32,
    },
    /// Bad input.
    #[error("{0}")]
    BadRequest(String),
    /// Input over a size bound.
    #[error("{0}")]
    TooLarge(String),
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A crypto error.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl KmError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            KmError::Unauthorized => 401,
            KmError::Forbidden { .. } => 403,
            KmError::Disabled(_) => 409,
            KmError::NoSuchVersion { .. } | KmError::BadRequest(_) => 400,
            KmError::TooLarge(_) => 413,
            KmError::Store(e) => match e {
                StoreError::NotFound(_) => 404,
                StoreError::Exists(_)
                | StoreError::TooManyKeys
                | StoreError::TooManyVersions(_) => 409,
                StoreError::InvalidName(_) | StoreError::InvalidClients(_) => 400,
                StoreError::Io { .. }
                | StoreError::WrongMaster { .. }
                | StoreError::Corrupt { .. }
                | StoreError::Crypto(_)
                | StoreError::Durable(_) => 500,
            },
            KmError::Crypto(e) => match e {
                CryptoError::Malformed(_) | CryptoError::Auth => 400,
                CryptoError::Random(_) | CryptoError::MasterKey(_) => 500,
            },
        }
    }
}

/// Operation counters (reported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful encrypts (including data keys and re-encrypts).
    pub encrypts: AtomicU64,
    /// Successful decrypts (including re-encrypts).
    pub decrypts: AtomicU64,
    /// Data keys generated.
    pub datakeys: AtomicU64,
    /// Requests refused with 401.
    pub denied: AtomicU64,
    /// Requests that failed with a 5xx.
    pub errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Result of a decrypt.
#[derive(Debug)]
pub struct Decrypted {
    /// The plaintext.
    pub plaintext: Vec<u8>,
    /// Key name from the ciphertext.
    pub key: String,
    /// Key version from the ciphertext.
    pub version: u32,
}

/// Result of an encrypt.
#[derive(Debug)]
pub struct Encrypted {
    /// The ciphertext (format in [`crate::crypto`]).
    pub ciphertext: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Key version used (the latest).
    pub version: u32,
}

/// The key-management service core.
#[derive(Debug)]
pub struct Kms {
    store: Store,
    clients: RwLock<Arc<Clients>>,
    /// Counters.
    pub stats: Stats,
    audit: Audit,
}

impl Kms {
    /// A service over `store`, accepting `clients`, auditing to `audit`.
    pub fn new(store: Store, clients: Clients, audit: Audit) -> Kms {
        Kms {
            store,
            clients: RwLock::new(Arc::new(clients)),
            stats: Stats::default(),
            audit,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The current client set.
    pub fn clients(&self) -> Arc<Clients> {
        self.clients
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the client set; `true` if it changed.
    pub fn set_clients(&self, clients: Clients) -> bool {
        let mut cur = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        if **cur == clients {
            return false;
        }
        *cur = Arc::new(clients);
        true
    }

    /// The audit sink.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The client owning `token` (counts refusals).
    pub fn authenticate(&self, token: Option<&str>) -> Result<String, KmError> {
        let clients = self.clients();
        match token.and_then(|t| clients.authenticate(t)) {
            Some(name) => Ok(name.to_string()),
            None => {
                bump(&self.stats.denied);
                Err(KmError::Unauthorized)
            }
        }
    }

    /// Key `name`, if `client` may use it.
    pub fn key(&self, client: &str, name: &str) -> Result<Arc<Key>, KmError> {
        if !crypto::valid_key_name(name) {
            return Err(StoreError::InvalidName(name.to_string()).into());
        }
        let key = self
            .store
            .get(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        if !key.allows(client) {
            return Err(KmError::Forbidden {
                client: client.to_string(),
                key: name.to_string(),
            });
        }
        Ok(key)
    }

    fn usable(&self, client: &str, name: &str) -> Result<Arc<Key>, KmError> {
        let key = self.key(client, name)?;
        if !key.enabled {
            return Err(KmError::Disabled(name.to_string()));
        }
        Ok(key)
    }

    /// The keys `client` may use.
    pub fn list(&self, client: &str) -> Vec<Arc<Key>> {
        let mut keys = self.store.list();
        keys.retain(|k| k.allows(client));
        keys
    }

    /// Creates a key (audited).
    pub fn create(
        &self,
        client: &str,
        name: &str,
        clients: Option<Vec<String>>,
    ) -> Result<Arc<Key>, KmError> {
        let key = self.store.create(name, clients)?;
        self.audit.send(format!("created key {name} by {client}"));
        Ok(key)
    }

    /// Rotates a key (audited).
    pub fn rotate(&self, client: &str, name: &str) -> Result<Arc<Key>, KmError> {
        self.key(client, name)?;
        let key = self.store.rotate(name)?;
        let v = key.versions.len();
        self.audit
            .send(format!("rotated key {name} to v{v} by {client}"));
        Ok(key)
    }

    /// Enables or disables a key (audited).
    pub fn set_enabled(
        &self,
        client: &str,
        name: &str,
        enabled: bool,
    ) -> Result<Arc<Key>, KmError> {
        self.key(client, name)?;
        let key = self.store.set_enabled(name, enabled)?;
        let what = if enabled { "enabled" } else { "disabled" };
        self.audit.send(format!("{what} key {name} by {client}"));
        Ok(key)
    }

    fn check_aad(aad: &[u8]) -> Result<(), KmError> {
        if aad.len() > MAX_AAD {
            return Err(KmError::BadRequest(format!("aad over {MAX_AAD} bytes")));
        }
        Ok(())
    }

    fn seal_with(key: &Key, plaintext: &[u8], aad: &[u8]) -> Result<Encrypted, KmError> {
        let v: &KeyVersion = key
            .latest()
            .ok_or_else(|| StoreError::NotFound(key.name.clone()))?;
        let ciphertext = crypto::encrypt(v.cipher(), &key.name, v.version, plaintext, aad)?;
        Ok(Encrypted {
            ciphertext,
            key: key.name.clone(),
            version: v.version,
        })
    }

    /// Encrypts `plaintext` under the latest version of `name`.
    pub fn encrypt(
        &self,
        client: &str,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Encrypted, KmError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(KmError::TooLarge(format!(
                "plaintext over {MAX_PLAINTEXT} bytes"
            )));
        }
        Self::check_aad(aad)?;
        let key = self.usable(client, name)?;
        let out = Self::seal_with(&key, plaintext, aad)?;
        bump(&self.stats.encrypts);
        Ok(out)
    }

    /// Decrypts a ciphertext; the key and version come from it.
    pub fn decrypt(
        &self,
        client: &str,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Decrypted, KmError> {
        Self::check_aad(aad)?;
        let parsed = crypto::parse(ciphertext)?;
        let key = self.usable(client, parsed.name)?;
        let v = key
            .version(parsed.version)
            .ok_or_else(|| KmError::NoSuchVersion {
                key: parsed.name.to_string(),
                version: parsed.version,
            })?;
        let plaintext = crypto::decrypt(v.cipher(), &parsed, aad)?;
        bump(&self.stats.decrypts);
        Ok(Decrypted {
            plaintext,
            key: parsed.name.to_string(),
            version: parsed.version,
        })
    }

    /// Decrypts and encrypts again under the latest version of `target`
    /// (default: the same key). The plaintext never leaves the service.
    pub fn reencrypt(
        &self,
        client: &str,
        ciphertext: &[u8],
        aad: &[u8],
        target: Option<&str>,
    ) -> Result<Encrypted, KmError> {
        let mut d = self.decrypt(client, ciphertext, aad)?;
        let key = self.usable(client, target.unwrap_or(&d.key))?;
        let out = Self::seal_with(&key, &d.plaintext, aad);
        d.plaintext.fill(0);
        let out = out?;
        bump(&self.stats.encrypts);
        Ok(out)
    }

    /// A fresh random data key of `bytes` bytes: the plaintext and its copy
    /// encrypted under `name` (envelope encryption).
    pub fn datakey(
        &self,
        client: &str,
        name: &str,
        bytes: usize,
        aad: &[u8],
    ) -> Result<(Vec<u8>, Encrypted), KmError> {
        if !DATAKEY_BYTES.contains(&bytes) {
            return Err(KmError::BadRequest(format!(
                "bytes must be {}..={}",
                DATAKEY_BYTES.start(),
                DATAKEY_BYTES.end()
            )));
        }
        Self::check_aad(aad)?;
        let key = self.usable(client, name)?;
        let mut plain = vec![0u8; bytes];
        crypto::random_bytes(&mut plain)?;
        let wrapped = Self::seal_with(&key, &plain, aad)?;
        bump(&self.stats.datakeys);
        bump(&self.stats.encrypts);
        Ok((plain, wrapped))
    }
}
