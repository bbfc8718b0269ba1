//! Settings, the admin user and API/session tokens (`settings`, `users`,
//! `api_tokens`).

use super::sql::{params, Row};

use super::{i, u, Store, StoreError};

/// An API or session token record (the token itself is only stored hashed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Public id, used to delete it.
    pub id: String,
    /// Human name.
    pub name: String,
    /// `session` or `api`.
    pub kind: String,
    /// What it may do: `admin`, `operator` or `viewer` (`crate::http`'s
    /// role table). A `session` token (from login) is always `admin`; an
    /// `api` token is what it was created as (tokens from before schema v8
    /// are `admin`). Another value is treated as `viewer`.
    pub role: String,
    /// Creation time, ms.
    pub created_ms: u64,
    /// Expiry, ms (`None` = never).
    pub expires_ms: Option<u64>,
}

impl Store {
    // ---- settings ----

    /// Reads a setting.
    pub fn setting(&self, k: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row_opt("SELECT v FROM settings WHERE k = ?1", params![k], |r| {
                r.get(0)
            })
    }

    /// Writes settings atomically.
    pub fn set_settings(&mut self, kv: &[(&str, &str)]) -> Result<(), StoreError> {
        let tx = self.conn.begin()?;
        for (k, v) in kv {
            tx.execute(
                "INSERT INTO settings (k, v) VALUES (?1, ?2)
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                params![k, v],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    // ---- users ----

    /// The argon2 PHC hash of `username`.
    pub fn user_hash(&self, username: &str) -> Result<Option<String>, StoreError> {
        self.conn.query_row_opt(
            "SELECT password_hash FROM users WHERE username = ?1",
            params![username],
            |r| r.get(0),
        )
    }

    /// Creates or replaces a user.
    pub fn set_user(&self, username: &str, hash: &str, now_ms: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO users (username, password_hash, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash",
            params![username, hash, i(now_ms)],
        )?;
        Ok(())
    }

    // ---- tokens ----

    /// Stores a token record with its sha256 hex.
    pub fn insert_token(&self, row: &TokenRow, sha256_hex: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO api_tokens (id, name, token_sha256, kind, created_ms, expires_ms, role)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.id,
                row.name,
                sha256_hex,
                row.kind,
                i(row.created_ms),
                row.expires_ms.map(i),
                row.role
            ],
        )?;
        Ok(())
    }

    /// The unexpired token with this hash.
    pub fn token_by_hash(
        &self,
        sha256_hex: &str,
        now_ms: u64,
    ) -> Result<Option<TokenRow>, StoreError> {
        self.conn.query_row_opt(
            "SELECT id, name, kind, created_ms, expires_ms, role FROM api_tokens
                 WHERE token_sha256 = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
            params![sha256_hex, i(now_ms)],
            token_from_row,
        )
    }

    /// All tokens of `kind`.
    pub fn list_tokens(&self, kind: &str) -> Result<Vec<TokenRow>, StoreError> {
        self.conn.query_map(
            "SELECT id, name, kind, created_ms, expires_ms, role FROM api_tokens
             WHERE kind = ?1 ORDER BY created_ms",
            params![kind],
            token_from_row,
        )
    }

    /// Deletes a token by id; `true` if one existed.
    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE id = ?1", params![id])?
            > 0)
    }

    /// Deletes a token by hash (logout).
    pub fn delete_token_by_hash(&self, sha256_hex: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM api_tokens WHERE token_sha256 = ?1",
            params![sha256_hex],
        )? > 0)
    }

    /// Drops expired tokens.
    pub fn purge_expired_tokens(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.conn.execute(
            "DELETE FROM api_tokens WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
            params![i(now_ms)],
        )
    }
}

fn token_from_row(r: &Row) -> Result<TokenRow, StoreError> {
    Ok(TokenRow {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: r.get(2)?,
        created_ms: u(r.get(3)?),
        expires_ms: r.get::<Option<i64>>(4)?.map(u),
        role: r.get(5)?,
    })
}
