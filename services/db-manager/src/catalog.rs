//! The catalog: which databases exist and their credentials' hashes.
//!
//! A small SQLite database `<data-dir>/catalog.sqlite` (WAL,
//! `synchronous=FULL`) with two tables, `databases(name, created)` and
//! `credentials(db, access, salt, hash, created)`. Each database has one
//! read-write and one read-only credential. A credential is a random
//! 256-bit token (64 hex characters) shown once, when it is made; the
//! catalog keeps only `SHA-256(salt ‖ token)` with a random 16-byte salt.
//! A fast hash is enough because tokens are random and long, not
//! passwords. Tokens are compared as hashes, in constant time.
//!
//! Names are `[a-z0-9][a-z0-9_-]{0,63}`; a catalog holds at most
//! [`MAX_DATABASES`] databases.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// Most databases in one catalog.
pub const MAX_DATABASES: usize = 1000;

/// A catalog failure.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite failed on the catalog.
    #[error("catalog {path}: {source}")]
    Sql {
        /// The catalog file.
        path: String,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
    /// The system RNG failed.
    #[error("no randomness: {0}")]
    Random(String),
}

/// Is `name` a valid database name?
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Which credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Read-write.
    Rw,
    /// Read-only.
    Ro,
}

impl Kind {
    /// `"rw"` or `"ro"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rw => "rw",
            Kind::Ro => "ro",
        }
    }

    /// Parses `"rw"`/`"ro"` (also `read_write`/`read_only`).
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "rw" | "read_write" => Some(Kind::Rw),
            "ro" | "read_only" => Some(Kind::Ro),
            _ => None,
        }
    }
}

/// A stored credential: salt and hash, never the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Hashed {
    salt: [u8; 16],
    hash: [u8; 32],
}

impl std::fmt::Debug for Hashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hashed(..)")
    }
}

fn digest(salt: &[u8], token: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(token.as_bytes());
    h.finalize().into()
}

impl Hashed {
    /// Does `token` match, compared in constant time?
    pub fn matches(&self, token: &str) -> bool {
        service_runtime::clients::ct_eq(&digest(&self.salt, token), &self.hash)
    }
}

/// A new token and its stored form.
pub fn new_credential() -> Result<(String, Hashed), CatalogError> {
    let mut raw = [0u8; 48];
    getrandom::fill(&mut raw).map_err(|e| CatalogError::Random(e.to_string()))?;
    let token: String = raw[..32].iter().map(|b| format!("{b:02x}")).collect();
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&raw[32..48]);
    let hash = digest(&salt, &token);
    raw.fill(0);
    Ok((token, Hashed { salt, hash }))
}

/// One database in the catalog.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Name.
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// Read-write credential.
    pub rw: Hashed,
    /// Read-only credential.
    pub ro: Hashed,
}

/// The catalog. See the module docs.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
    path: String,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds as an SQLite integer (saturating: i64 seconds outlast the sun).
fn sql_secs(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl Catalog {
    /// Opens or creates `<dir>/catalog.sqlite`.
    pub fn open(dir: &Path) -> Result<Catalog, CatalogError> {
        let path = dir.join("catalog.sqlite");
        let p = path.display().to_string();
        let err = |source| CatalogError::Sql {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS databases(name TEXT PRIMARY KEY, created INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS credentials(db TEXT NOT NULL, access TEXT NOT NULL,
                 salt BLOB NOT NULL, hash BLOB NOT NULL, created INTEGER NOT NULL,
                 PRIMARY KEY(db, access));",
        )
        .map_err(err)?;
        Ok(Catalog { conn, path: p })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> CatalogError + '_ {
        move |source| CatalogError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// Every database with its credentials.
    pub fn entries(&self) -> Result<Vec<Entry>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.name, d.created, rw.salt, rw.hash, ro.salt, ro.hash FROM databases d
                 JOIN credentials rw ON rw.db = d.name AND rw.access = 'rw'
                 JOIN credentials ro ON ro.db = d.name AND ro.access = 'ro' ORDER BY d.name",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                let hashed = |s: Vec<u8>, h: Vec<u8>| {
                    let mut out = Hashed {
                        salt: [0; 16],
                        hash: [0; 32],
                    };
                    if s.len() == 16 && h.len() == 32 {
                        out.salt.copy_from_slice(&s);
                        out.hash.copy_from_slice(&h);
                    }
                    out
                };
                Ok(Entry {
                    name: r.get(0)?,
                    created: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    rw: hashed(r.get(2)?, r.get(3)?),
                    ro: hashed(r.get(4)?, r.get(5)?),
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Is `name` in the catalog?
    pub fn contains(&self, name: &str) -> Result<bool, CatalogError> {
        self.conn
            .query_row("SELECT 1 FROM databases WHERE name = ?", [name], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
            .map_err(self.err())
    }

    /// Adds a database with both credentials (one transaction, on disk
    /// before it returns).
    pub fn insert(&mut self, e: &Entry) -> Result<(), CatalogError> {
        let path = self.path.clone();
        let err = |source| CatalogError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO databases(name, created) VALUES (?, ?)",
            params![e.name, sql_secs(e.created)],
        )
        .map_err(err)?;
        for (kind, h) in [(Kind::Rw, &e.rw), (Kind::Ro, &e.ro)] {
            tx.execute(
                "INSERT INTO credentials(db, access, salt, hash, created) VALUES (?, ?, ?, ?, ?)",
                params![
                    e.name,
                    kind.as_str(),
                    &h.salt[..],
                    &h.hash[..],
                    sql_secs(e.created)
                ],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Replaces one credential.
    pub fn set_credential(&self, db: &str, kind: Kind, h: &Hashed) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE credentials SET salt = ?, hash = ?, created = ? WHERE db = ? AND access = ?",
                params![&h.salt[..], &h.hash[..], sql_secs(unix_now()), db, kind.as_str()],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Removes a database and its credentials.
    pub fn remove(&mut self, name: &str) -> Result<(), CatalogError> {
        let path = self.path.clone();
        let err = |source| CatalogError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute("DELETE FROM credentials WHERE db = ?", [name])
            .map_err(err)?;
        tx.execute("DELETE FROM databases WHERE name = ?", [name])
            .map_err(err)?;
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "orders", "0x_1-b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "A", "-a", "a/b", "../x", "a.b", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn credentials_persist_as_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let (rw_token, rw) = new_credential().unwrap();
        let (ro_token, ro) = new_credential().unwrap();
        assert_eq!(rw_token.len(), 64);
        assert!(rw.matches(&rw_token) && !rw.matches(&ro_token));
        {
            let mut c = Catalog::open(dir.path()).unwrap();
            c.insert(&Entry {
                name: "orders".into(),
                created: 1,
                rw,
                ro,
            })
            .unwrap();
        }
        let raw = std::fs::read(dir.path().join("catalog.sqlite")).unwrap();
        let wal = std::fs::read(dir.path().join("catalog.sqlite-wal")).unwrap_or_default();
        for bytes in [raw, wal] {
            assert!(!bytes
                .windows(rw_token.len())
                .any(|w| w == rw_token.as_bytes()));
        }
        let mut c = Catalog::open(dir.path()).unwrap();
        let e = c.entries().unwrap();
        assert_eq!(e.len(), 1);
        assert!(e[0].ro.matches(&ro_token));
        let (new_ro, h) = new_credential().unwrap();
        c.set_credential("orders", Kind::Ro, &h).unwrap();
        let e = c.entries().unwrap();
        assert!(e[0].ro.matches(&new_ro) && !e[0].ro.matches(&ro_token));
        c.remove("orders").unwrap();
        assert!(c.entries().unwrap().is_empty());
        assert!(!c.contains("orders").unwrap());
    }
}
