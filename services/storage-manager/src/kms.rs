//! Data keys from key-manager (envelope encryption).
//!
//! For every object (and multipart part) storage-manager asks key-manager
//! for a fresh 256-bit data key: `POST {url}/v1/keys/{key}/datakey`
//! `{"bytes": 32, "aad": base64(object id)}` with `Authorization: Bearer
//! <token>`. It encrypts with the plaintext key and stores only the
//! wrapped key (`ciphertext`) in the object's metadata. Reading unwraps it
//! with `POST /v1/decrypt` and the same `aad`, so a wrapped key copied to
//! another object does not unwrap. If the key does not exist yet it is
//! created once (`POST /v1/keys`).
//!
//! Unwrapped keys are kept in a small LRU ([`CACHE_ENTRIES`] entries) so
//! repeated reads of hot objects do not call key-manager each time; keys
//! are zeroed when evicted or dropped (best effort: copies inside the JSON
//! and HTTP libraries are not tracked).
//!
//! Any failure (unreachable, refused, malformed answer) is a
//! [`KmsError`]; the HTTP layer answers 503 and nothing is written:
//! storage-manager never falls back to plaintext.

use std::collections::VecDeque;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

/// Unwrapped keys kept in memory.
pub const CACHE_ENTRIES: usize = 256;

/// A key-manager failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KmsError {
    /// key-manager could not be reached.
    #[error("key-manager at {url} is unreachable: {reason}")]
    Unreachable {
        /// Its URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// key-manager refused.
    #[error("key-manager refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
    /// The answer was not what was expected.
    #[error("key-manager answer unreadable: {0}")]
    Answer(String),
}

/// A fresh data key.
pub struct DataKey {
    /// The key (zeroed on drop).
    pub plain: [u8; 32],
    /// key-manager's ciphertext of it.
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey").finish_non_exhaustive()
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.plain.fill(0);
        std::hint::black_box(&self.plain);
    }
}

struct Cached {
    wrapped: Vec<u8>,
    aad: Vec<u8>,
    plain: [u8; 32],
}

impl Drop for Cached {
    fn drop(&mut self) {
        self.plain.fill(0);
        std::hint::black_box(&self.plain);
    }
}

/// A client of key-manager. `Debug` hides the token.
pub struct KeyManager {
    url: String,
    key: String,
    token: RwLock<String>,
    agent: ureq::Agent,
    cache: Mutex<VecDeque<Cached>>,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("url", &self.url)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// A client of key-manager at `url` using key `key` with client `token`.
    pub fn new(url: &str, key: &str, token: &str) -> KeyManager {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        KeyManager {
            url: url.trim_end_matches('/').to_string(),
            key: key.to_string(),
            token: RwLock::new(token.to_string()),
            agent,
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// The key name.
    pub fn key_name(&self) -> &str {
        &self.key
    }

    /// Replaces the client token (secrets refresh).
    pub fn set_token(&self, token: &str) {
        if let Ok(mut t) = self.token.write() {
            if *t != token {
                *t = token.to_string();
            }
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, KmsError> {
        let token = self.token.read().map(|t| t.clone()).unwrap_or_default();
        let url = format!("{}{path}", self.url);
        let mut resp = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .map_err(|e| KmsError::Unreachable {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let v: Value = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_json()
            .map_err(|e| KmsError::Answer(e.to_string()))?;
        if status >= 300 {
            return Err(KmsError::Refused {
                status,
                message: v["error"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(v)
    }

    fn b64_field(v: &Value, field: &str) -> Result<Vec<u8>, KmsError> {
        v[field]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| KmsError::Answer(format!("no base64 {field:?}")))
    }

    fn key32(mut bytes: Vec<u8>) -> Result<[u8; 32], KmsError> {
        let out: Result<[u8; 32], _> = bytes.as_slice().try_into();
        bytes.fill(0);
        out.map_err(|_| KmsError::Answer("the data key is not 32 bytes".into()))
    }

    /// A fresh data key bound to `aad`.
    pub fn datakey(&self, aad: &[u8]) -> Result<DataKey, KmsError> {
        let path = format!("/v1/keys/{}/datakey", self.key);
        let body = json!({"bytes": 32, "aad": B64.encode(aad)});
        let v = match self.post(&path, &body) {
            Err(KmsError::Refused { status: 404, .. }) => {
                match self.post("/v1/keys", &json!({"name": self.key})) {
                    Ok(_) | Err(KmsError::Refused { status: 409, .. }) => {}
                    Err(e) => return Err(e),
                }
                self.post(&path, &body)?
            }
            other => other?,
        };
        let plain = Self::key32(Self::b64_field(&v, "plaintext")?)?;
        let wrapped = Self::b64_field(&v, "ciphertext")?;
        self.remember(&wrapped, aad, plain);
        Ok(DataKey { plain, wrapped })
    }

    fn remember(&self, wrapped: &[u8], aad: &[u8], plain: [u8; 32]) {
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_ENTRIES {
                c.pop_back();
            }
            c.push_front(Cached {
                wrapped: wrapped.to_vec(),
                aad: aad.to_vec(),
                plain,
            });
        }
    }

    /// Unwraps a data key made with `aad`.
    pub fn unwrap_key(&self, wrapped: &[u8], aad: &[u8]) -> Result<[u8; 32], KmsError> {
        if let Ok(mut c) = self.cache.lock() {
            if let Some(i) = c.iter().position(|e| e.wrapped == wrapped && e.aad == aad) {
                if let Some(e) = c.remove(i) {
                    let plain = e.plain;
                    c.push_front(e);
                    return Ok(plain);
                }
            }
        }
        let v = self.post(
            "/v1/decrypt",
            &json!({"ciphertext": B64.encode(wrapped), "aad": B64.encode(aad)}),
        )?;
        let plain = Self::key32(Self::b64_field(&v, "plaintext")?)?;
        self.remember(wrapped, aad, plain);
        Ok(plain)
    }

    /// Empties the cache (tests: force a call to key-manager).
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }
}
