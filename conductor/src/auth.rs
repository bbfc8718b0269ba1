//! Secrets at rest: admin passwords (argon2id), bearer tokens and the
//! registration token (sha256 only — the plaintext is shown once and never
//! stored), plus the MQTT service passwords.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;

use crate::crypto::{random_bytes, random_hex, sha256_hex};
use crate::state::now_ms;
use crate::store::{Store, StoreError, TokenRow};

/// Settings key: sha256 hex of the registration token.
pub const REG_TOKEN_HASH: &str = "registration_token_sha256";
/// Settings key: when the registration token was created (ms).
pub const REG_TOKEN_CREATED: &str = "registration_token_created_ms";
/// Settings key: the conductor's MQTT password (embedded broker).
pub const CONDUCTOR_MQTT_PASSWORD: &str = "conductor_mqtt_password";
/// Settings key: the observer's MQTT password (embedded broker).
pub const OBSERVER_MQTT_PASSWORD: &str = "observer_mqtt_password";
/// The one admin user.
pub const ADMIN_USER: &str = "admin";
/// Session lifetime.
pub const SESSION_MS: u64 = 24 * 3_600_000;

/// Auth errors.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The OS random source failed.
    #[error("random source: {0}")]
    Random(#[from] getrandom::Error),
    /// Hashing failed.
    #[error("password hashing failed")]
    Hash,
    /// Store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// argon2id PHC string for `password`, with a random salt.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = random_bytes::<16>()?;
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| AuthError::Hash)
}

/// Checks `password` against a PHC string (constant time inside argon2).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A fresh high-entropy token with a readable prefix (`aek_…`).
pub fn new_token(prefix: &str) -> Result<String, AuthError> {
    Ok(format!("{prefix}_{}", random_hex::<32>()?))
}

/// Generates, stores (hash only) and returns a new registration token.
pub fn rotate_registration_token(store: &mut Store) -> Result<String, AuthError> {
    let token = new_token("aer")?;
    let now = now_ms().to_string();
    store.set_settings(&[
        (REG_TOKEN_HASH, &sha256_hex(&token)),
        (REG_TOKEN_CREATED, &now),
    ])?;
    Ok(token)
}

/// Creates a session or API token with `role` (`admin`, `operator` or
/// `viewer`, see [`TokenRow::role`]; sessions are created `admin`); returns
/// (plaintext, record).
pub fn create_token(
    store: &Store,
    name: &str,
    kind: &str,
    role: &str,
) -> Result<(String, TokenRow), AuthError> {
    let token = new_token(if kind == "session" { "aes" } else { "aek" })?;
    let now = now_ms();
    let row = TokenRow {
        id: format!("t-{}", random_hex::<6>()?),
        name: name.to_string(),
        kind: kind.to_string(),
        role: role.to_string(),
        created_ms: now,
        expires_ms: (kind == "session").then_some(now + SESSION_MS),
    };
    store.insert_token(&row, &sha256_hex(&token))?;
    Ok((token, row))
}

/// What first start created and must show once.
#[derive(Debug, Default)]
pub struct Bootstrap {
    /// New registration token (first start only).
    pub registration_token: Option<String>,
    /// New random admin password (first start without `AEREKOS_ADMIN_PASSWORD`).
    pub admin_password: Option<String>,
}

/// Creates whatever secrets are missing: registration token, MQTT service
/// passwords, the admin user. Idempotent.
pub fn bootstrap(store: &mut Store, admin_password: Option<&str>) -> Result<Bootstrap, AuthError> {
    let mut out = Bootstrap::default();
    if store.setting(REG_TOKEN_HASH)?.is_none() {
        out.registration_token = Some(rotate_registration_token(store)?);
    }
    if store.setting(CONDUCTOR_MQTT_PASSWORD)?.is_none() {
        let c = random_hex::<24>()?;
        store.set_settings(&[(CONDUCTOR_MQTT_PASSWORD, &c)])?;
    }
    if store.setting(OBSERVER_MQTT_PASSWORD)?.is_none() {
        let o = random_hex::<16>()?;
        store.set_settings(&[(OBSERVER_MQTT_PASSWORD, &o)])?;
    }
    if store.user_hash(ADMIN_USER)?.is_none() {
        let pw = match admin_password {
            Some(p) if !p.is_empty() => p.to_string(),
            _ => {
                let p = random_hex::<12>()?;
                out.admin_password = Some(p.clone());
                p
            }
        };
        store.set_user(ADMIN_USER, &hash_password(&pw)?, now_ms())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a phc"));
    }
}
