//! The databases of one db-manager: create, list, drop, credentials,
//! queries, backups and restores, with counters for metrics and audit
//! events.
//!
//! * **Files**: `<data-dir>/catalog.sqlite` ([`crate::catalog`]) and one
//!   `<data-dir>/databases/<name>.sqlite` (plus its `-wal`/`-shm`) per
//!   database; `<data-dir>/tmp/` holds backups being made and restores
//!   being downloaded (emptied at start).
//! * **Create** makes the file, then commits the catalog row; **drop**
//!   commits the catalog removal, then deletes the files. A crash between
//!   the two leaves a file no catalog row names: it is deleted at start
//!   and before a create of the same name, so a new database never sees an
//!   old one's data.
//! * **Backups** ([`Manager::backup`]): SQLite's online backup API copies
//!   one consistent snapshot into `tmp/` while writes continue, `PRAGMA
//!   integrity_check` verifies the copy, and it is uploaded through the
//!   [`BackupStore`] (storage-manager) as `<db>/<UTC timestamp>-<id>.sqlite`.
//! * **Restore** ([`Manager::restore`]): download into `tmp/`, fsync,
//!   integrity check, then with no query running (the database's gate is
//!   held exclusively) checkpoint and close the connections, remove the
//!   `-wal`/`-shm` files and `rename` the download over the database file
//!   (atomic; the old file stays in place until the rename succeeds),
//!   fsync the directory and reopen.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use service_runtime::audit::{sample, Audit, Reported};
use service_runtime::Clients;

use crate::backup::{BackupError, BackupObject, BackupStore};
use crate::catalog::{self, Catalog, CatalogError, Entry, Hashed, Kind};
use crate::engine::{
    self, Access, Database, Limits, OpenError, QueryError, QueryResult, Statement,
};

/// A manager failure. [`ManagerError::status`] maps to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Bad name or request.
    #[error("{0}")]
    BadRequest(String),
    /// No such database.
    #[error("no database named {0}")]
    NotFound(String),
    /// Already exists, or a limit is reached.
    #[error("{0}")]
    Conflict(String),
    /// Missing or unknown credential.
    #[error("{0}")]
    Unauthorized(String),
    /// Backups are not configured.
    #[error("backups are not configured: set the config backup_endpoint and the secrets backup_access_key and backup_secret_key")]
    NoBackupStore,
    /// A query failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A database file failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A backup or restore failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ManagerError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ManagerError::BadRequest(_) => 400,
            ManagerError::NotFound(_) => 404,
            ManagerError::Conflict(_) => 409,
            ManagerError::Unauthorized(_) => 401,
            ManagerError::NoBackupStore => 409,
            ManagerError::Query(q) => q.status(),
            ManagerError::Backup(b) => b.status(),
            ManagerError::Catalog(_) | ManagerError::Open(_) | ManagerError::Io { .. } => 500,
        }
    }
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ManagerError + 'a {
    move |source| ManagerError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Statements run (batch statements count one each).
    pub queries: AtomicU64,
    /// Statements that failed (any reason).
    pub query_errors: AtomicU64,
    /// 5xx answers.
    pub errors: AtomicU64,
    /// Requests refused for a missing or unknown token.
    pub denied: AtomicU64,
    /// Request body bytes.
    pub bytes_in: AtomicU64,
    /// Answer bytes (approximate: JSON cells).
    pub bytes_out: AtomicU64,
    /// Backups made.
    pub backups: AtomicU64,
    /// Backups that failed.
    pub backup_errors: AtomicU64,
    /// Restores done.
    pub restores: AtomicU64,
}

/// A hosted database with its credentials.
#[derive(Debug)]
struct Hosted {
    db: Database,
    created: u64,
    creds: RwLock<(Hashed, Hashed)>,
    /// Serialises backups and restores of this database.
    ops: Mutex<()>,
}

/// A database in a listing.
#[derive(Debug, Clone)]
pub struct DbInfo {
    /// Name.
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// Size of the file and its WAL, bytes.
    pub bytes: u64,
}

/// A made backup.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    /// Object key (`<db>/<timestamp>-<id>.sqlite`).
    pub key: String,
    /// Size, bytes.
    pub bytes: u64,
}

/// All databases. See the module docs.
pub struct Manager {
    dir: PathBuf,
    catalog: Mutex<Catalog>,
    dbs: RwLock<BTreeMap<String, Arc<Hosted>>>,
    admins: RwLock<Clients>,
    store: Option<Box<dyn BackupStore>>,
    /// Backups kept per database (0: all).
    keep: usize,
    /// Counters.
    pub stats: Stats,
    audit: Audit,
}

impl Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("dir", &self.dir)
            .field("backups", &self.store)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn random_hex(bytes: usize) -> Result<String, ManagerError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b)
        .map_err(|e| ManagerError::Catalog(CatalogError::Random(e.to_string())))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn remove_if_exists(path: &Path) -> Result<(), ManagerError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", path)(e)),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_db_files(path: &Path) -> Result<(), ManagerError> {
    for suffix in ["-wal", "-shm", ""] {
        remove_if_exists(&with_suffix(path, suffix))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), ManagerError> {
    service_runtime::durable::sync_dir(dir).map_err(|e| ManagerError::Io {
        action: "syncing",
        path: dir.display().to_string(),
        source: e.source,
    })
}

impl Manager {
    /// Opens the catalog and every database under `dir`; removes files no
    /// catalog row names and leftovers in `tmp/`.
    pub fn open(
        dir: &Path,
        admins: Clients,
        store: Option<Box<dyn BackupStore>>,
        audit: Audit,
    ) -> Result<Manager, ManagerError> {
        for d in [dir.to_path_buf(), dir.join("databases"), dir.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
        }
        let tmp = dir.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io("listing", &tmp))? {
            let e = e.map_err(io("listing", &tmp))?;
            remove_if_exists(&e.path())?;
        }
        let catalog = Catalog::open(dir)?;
        let entries = catalog.entries()?;
        let mut dbs = BTreeMap::new();
        for e in entries {
            let path = dir.join("databases").join(format!("{}.sqlite", e.name));
            let db = Database::open(&e.name, &path)?;
            dbs.insert(
                e.name.clone(),
                Arc::new(Hosted {
                    db,
                    created: e.created,
                    creds: RwLock::new((e.rw, e.ro)),
                    ops: Mutex::new(()),
                }),
            );
        }
        let files = dir.join("databases");
        for f in std::fs::read_dir(&files).map_err(io("listing", &files))? {
            let f = f.map_err(io("listing", &files))?;
            let name = f.file_name().to_string_lossy().into_owned();
            let base = name
                .strip_suffix("-wal")
                .or_else(|| name.strip_suffix("-shm"))
                .unwrap_or(&name);
            let stem = base.strip_suffix(".sqlite").unwrap_or(base);
            if !dbs.contains_key(stem) {
                eprintln!("db-manager: removing {name}: no database of that name in the catalog (a create or drop was interrupted)");
                remove_if_exists(&f.path())?;
            }
        }
        Ok(Manager {
            dir: dir.to_path_buf(),
            catalog: Mutex::new(catalog),
            dbs: RwLock::new(dbs),
            admins: RwLock::new(admins),
            store,
            keep: 0,
            stats: Stats::default(),
            audit,
        })
    }

    /// Keeps at most `keep` backups per database (0: all); older ones are
    /// deleted after each successful backup.
    pub fn with_backup_keep(mut self, keep: usize) -> Manager {
        self.keep = keep;
        self
    }

    fn db_path(&self, name: &str) -> PathBuf {
        self.dir.join("databases").join(format!("{name}.sqlite"))
    }

    fn hosted(&self, name: &str) -> Result<Arc<Hosted>, ManagerError> {
        self.dbs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    /// The backup store, if configured.
    pub fn backup_store(&self) -> Option<&dyn BackupStore> {
        self.store.as_deref()
    }

    /// Number of databases.
    pub fn len(&self) -> usize {
        self.dbs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// No databases?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The admin client owning `token`; counts a refusal.
    pub fn admin(&self, token: Option<&str>) -> Result<String, ManagerError> {
        let found = token.and_then(|t| {
            self.admins
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .authenticate(t)
                .map(str::to_string)
        });
        found.ok_or_else(|| {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            ManagerError::Unauthorized(
                "missing or unknown admin API key (Authorization: Bearer <token>)".into(),
            )
        })
    }

    /// Names of the admin clients.
    pub fn admin_names(&self) -> Vec<String> {
        self.admins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .names()
            .map(str::to_string)
            .collect()
    }

    /// Replaces the admin keys; true if they changed.
    pub fn set_admins(&self, clients: Clients) -> bool {
        let mut a = self
            .admins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *a == clients {
            return false;
        }
        *a = clients;
        true
    }

    /// The access `token` grants on database `name`.
    pub fn authenticate(&self, name: &str, token: Option<&str>) -> Result<Access, ManagerError> {
        let denied = || {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            ManagerError::Unauthorized(format!(
                "missing or unknown credential for database {name} (Authorization: Bearer <token>)"
            ))
        };
        let h = self.hosted(name).map_err(|_| denied())?;
        let token = token.ok_or_else(denied)?;
        let creds = h
            .creds
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Both compared, no early exit.
        let (rw, ro) = (creds.0.matches(token), creds.1.matches(token));
        match (rw, ro) {
            (true, _) => Ok(Access::ReadWrite),
            (false, true) => Ok(Access::ReadOnly),
            _ => Err(denied()),
        }
    }

    /// Creates database `name`; returns its entry and the read-write and
    /// read-only tokens (shown once).
    pub fn create(&self, by: &str, name: &str) -> Result<(DbInfo, String, String), ManagerError> {
        if !catalog::valid_name(name) {
            return Err(ManagerError::BadRequest(format!(
                "invalid database name {name:?}: names are [a-z0-9][a-z0-9_-]{{0,63}}"
            )));
        }
        let mut catalog = lock(&self.catalog);
        if self.hosted(name).is_ok() || catalog.contains(name)? {
            return Err(ManagerError::Conflict(format!(
                "database {name} already exists"
            )));
        }
        if self.len() >= catalog::MAX_DATABASES {
            return Err(ManagerError::Conflict(format!(
                "at most {} databases",
                catalog::MAX_DATABASES
            )));
        }
        let path = self.db_path(name);
        remove_db_files(&path)?;
        let db = Database::open(name, &path)?;
        sync_dir(&self.dir.join("databases"))?;
        let (rw_token, rw) = catalog::new_credential()?;
        let (ro_token, ro) = catalog::new_credential()?;
        let entry = Entry {
            name: name.to_string(),
            created: catalog::unix_now(),
            rw,
            ro,
        };
        catalog.insert(&entry)?;
        self.dbs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                name.to_string(),
                Arc::new(Hosted {
                    db,
                    created: entry.created,
                    creds: RwLock::new((entry.rw, entry.ro)),
                    ops: Mutex::new(()),
                }),
            );
        drop(catalog);
        self.audit.send(format!("created database {name} by {by}"));
        Ok((
            DbInfo {
                name: name.to_string(),
                created: entry.created,
                bytes: 0,
            },
            rw_token,
            ro_token,
        ))
    }

    fn info(&self, h: &Hosted) -> DbInfo {
        let p = h.db.path();
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        DbInfo {
            name: h.db.name().to_string(),
            created: h.created,
            bytes: size(p) + size(&with_suffix(p, "-wal")),
        }
    }

    /// Every database.
    pub fn list(&self) -> Vec<DbInfo> {
        let dbs: Vec<Arc<Hosted>> = self
            .dbs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        dbs.iter().map(|h| self.info(h)).collect()
    }

    /// One database.
    pub fn get(&self, name: &str) -> Result<DbInfo, ManagerError> {
        let h = self.hosted(name)?;
        Ok(self.info(&h))
    }

    /// Drops database `name` (waits for its running queries and for a
    /// backup or restore of it in progress; creates, drops and rotations
    /// of other databases wait meanwhile).
    pub fn drop_db(&self, by: &str, name: &str) -> Result<(), ManagerError> {
        let mut catalog = lock(&self.catalog);
        let h = self.hosted(name)?;
        catalog.remove(name)?;
        self.dbs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        // The catalog lock is held until the files are gone, so a create of
        // the same name cannot start on files this drop is about to delete.
        let _ops = lock(&h.ops);
        h.db.exclusive(|path| {
            remove_db_files(path)?;
            Ok::<_, ManagerError>(false)
        })?;
        drop(catalog);
        self.audit.send(format!("dropped database {name} by {by}"));
        Ok(())
    }

    /// Replaces one credential of `name`; returns the new token. The old
    /// one stops working at once.
    pub fn rotate(&self, by: &str, name: &str, kind: Kind) -> Result<String, ManagerError> {
        let catalog = lock(&self.catalog);
        let h = self.hosted(name)?;
        let (token, hashed) = catalog::new_credential()?;
        catalog.set_credential(name, kind, &hashed)?;
        {
            let mut c = h
                .creds
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match kind {
                Kind::Rw => c.0 = hashed,
                Kind::Ro => c.1 = hashed,
            }
        }
        drop(catalog);
        self.audit.send(format!(
            "rotated the {} credential of database {name} by {by}",
            kind.as_str()
        ));
        Ok(token)
    }

    fn count(&self, n: usize, outcome: Result<usize, u16>) {
        self.stats.queries.fetch_add(n as u64, Ordering::Relaxed);
        match outcome {
            Ok(bytes) => {
                self.stats
                    .bytes_out
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Err(status) => {
                self.stats.query_errors.fetch_add(1, Ordering::Relaxed);
                if status >= 500 {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Runs one statement on `name`.
    pub fn query(
        &self,
        name: &str,
        access: Access,
        st: &Statement,
        limits: Limits,
    ) -> Result<QueryResult, ManagerError> {
        let h = self.hosted(name)?;
        let r = h.db.query(access, st, limits);
        self.count(
            1,
            r.as_ref()
                .map(QueryResult::approx_bytes)
                .map_err(QueryError::status),
        );
        Ok(r?)
    }

    /// Runs `statements` on `name` in one transaction; an error names the
    /// failed statement's index.
    pub fn batch(
        &self,
        name: &str,
        access: Access,
        statements: &[Statement],
        limits: Limits,
    ) -> Result<Vec<QueryResult>, (Option<usize>, ManagerError)> {
        let h = self.hosted(name).map_err(|e| (None, e))?;
        let r = h.db.batch(access, statements, limits);
        self.count(
            statements.len(),
            r.as_ref()
                .map(|rs| rs.iter().map(QueryResult::approx_bytes).sum())
                .map_err(|(_, e)| e.status()),
        );
        r.map_err(|(i, e)| (Some(i), ManagerError::Query(e)))
    }

    fn store(&self) -> Result<&dyn BackupStore, ManagerError> {
        self.store.as_deref().ok_or(ManagerError::NoBackupStore)
    }

    /// Makes a backup of `name` now (see the module docs).
    pub fn backup(&self, by: &str, name: &str) -> Result<BackupInfo, ManagerError> {
        let r = self.backup_inner(name);
        match &r {
            Ok(b) => {
                self.stats.backups.fetch_add(1, Ordering::Relaxed);
                self.audit.send(format!(
                    "backed up database {name} to {} ({} bytes) by {by}",
                    b.key, b.bytes
                ));
                if self.keep > 0 {
                    self.prune(name);
                }
            }
            Err(e) => {
                self.stats.backup_errors.fetch_add(1, Ordering::Relaxed);
                self.audit
                    .send(format!("backup of database {name} by {by} failed: {e}"));
            }
        }
        r
    }

    fn backup_inner(&self, name: &str) -> Result<BackupInfo, ManagerError> {
        let store = self.store()?;
        let h = self.hosted(name)?;
        let _ops = lock(&h.ops);
        let id = random_hex(4)?;
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("backup-{name}-{id}.sqlite"));
        let result = (|| {
            h.db.snapshot_to(&tmp)?;
            engine::integrity_check(&tmp).map_err(|e| {
                BackupError::Corrupt(format!(
                    "the snapshot of {name} failed its integrity check: {e}"
                ))
            })?;
            let bytes = std::fs::metadata(&tmp).map_err(io("reading", &tmp))?.len();
            let stamp = s3::timefmt::amz_date(catalog::unix_now());
            let key = format!("{name}/{stamp}-{id}.sqlite");
            store.put(&key, &tmp)?;
            Ok(BackupInfo { key, bytes })
        })();
        let _ = remove_if_exists(&tmp);
        result
    }

    /// Deletes `name`'s oldest backups beyond [`Manager::with_backup_keep`];
    /// failures become audit events (the backup itself succeeded).
    fn prune(&self, name: &str) {
        let Some(store) = self.store.as_deref() else {
            return;
        };
        let result = (|| {
            let mut own: Vec<String> = store
                .list(&format!("{name}/"))?
                .into_iter()
                .map(|o| o.key)
                .filter(|k| crate::backup::is_own_key(name, k))
                .collect();
            own.sort();
            let excess = own.len().saturating_sub(self.keep);
            for key in &own[..excess] {
                store.delete(key)?;
            }
            Ok::<_, BackupError>(excess)
        })();
        match result {
            Ok(0) => {}
            Ok(n) => self.audit.send(format!(
                "deleted {n} old backups of database {name} (keeping {})",
                self.keep
            )),
            Err(e) => self
                .audit
                .send(format!("old backups of database {name} not deleted: {e}")),
        }
    }

    /// Backups of `name` in the store, oldest first.
    pub fn backups(&self, name: &str) -> Result<Vec<BackupObject>, ManagerError> {
        let store = self.store()?;
        if !catalog::valid_name(name) {
            return Err(ManagerError::NotFound(name.to_string()));
        }
        let mut list = store.list(&format!("{name}/"))?;
        list.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(list)
    }

    /// Replaces `name`'s contents with backup `key` (see the module docs).
    pub fn restore(&self, by: &str, name: &str, key: &str) -> Result<u64, ManagerError> {
        let store = self.store()?;
        let h = self.hosted(name)?;
        let prefix = format!("{name}/");
        let valid_key = key.strip_prefix(&prefix).is_some_and(|rest| {
            !rest.is_empty()
                && rest.ends_with(".sqlite")
                && rest
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        });
        if !valid_key {
            return Err(ManagerError::BadRequest(format!(
                "backup {key:?} is not one of database {name}'s backups (expected {name}/<id>.sqlite; list them with GET /v1/databases/{name}/backups)"
            )));
        }
        let _ops = lock(&h.ops);
        let id = random_hex(4)?;
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("restore-{name}-{id}.sqlite"));
        let result = (|| {
            let bytes = store.get(key, &tmp).map_err(ManagerError::from)?;
            engine::integrity_check(&tmp).map_err(|e| {
                BackupError::Corrupt(format!("backup {key} failed its integrity check: {e}"))
            })?;
            let dir = self.dir.join("databases");
            h.db.exclusive(|path| {
                for suffix in ["-wal", "-shm"] {
                    remove_if_exists(&with_suffix(path, suffix))?;
                }
                std::fs::rename(&tmp, path).map_err(io("renaming into", path))?;
                sync_dir(&dir)?;
                Ok::<_, ManagerError>(true)
            })?;
            Ok(bytes)
        })();
        let _ = remove_if_exists(&tmp);
        match &result {
            Ok(_) => {
                self.stats.restores.fetch_add(1, Ordering::Relaxed);
                self.audit
                    .send(format!("restored database {name} from {key} by {by}"));
            }
            Err(e) => self.audit.send(format!(
                "restore of database {name} from {key} by {by} failed: {e}"
            )),
        }
        result
    }

    /// Backs up every database (the scheduled backup); returns how many
    /// succeeded.
    pub fn backup_all(&self) -> usize {
        let names: Vec<String> = self
            .dbs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names
            .iter()
            .filter(|n| self.backup("schedule", n).is_ok())
            .count()
    }

    /// Events dropped by the audit queue.
    pub fn audit_dropped(&self) -> u64 {
        self.audit.dropped()
    }
}

impl Reported for Manager {
    fn metrics(&self) -> BTreeMap<&'static str, i64> {
        let s = &self.stats;
        let n = |c: &AtomicU64| sample(c.load(Ordering::Relaxed));
        let bytes: u64 = self.list().iter().map(|d| d.bytes).sum();
        [
            ("databases", sample(self.len() as u64)),
            ("bytes_stored", sample(bytes)),
            ("queries", n(&s.queries)),
            ("query_errors", n(&s.query_errors)),
            ("errors", n(&s.errors)),
            ("denied", n(&s.denied)),
            ("bytes_in", n(&s.bytes_in)),
            ("bytes_out", n(&s.bytes_out)),
            ("backups", n(&s.backups)),
            ("backup_errors", n(&s.backup_errors)),
            ("restores", n(&s.restores)),
            ("audit_dropped", sample(self.audit.dropped())),
        ]
        .into_iter()
        .collect()
    }

    fn denied(&self) -> u64 {
        self.stats.denied.load(Ordering::Relaxed)
    }

    fn set_clients(&self, clients: Clients) -> bool {
        self.set_admins(clients)
    }
}
