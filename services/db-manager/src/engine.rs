//! One hosted SQLite database: its connections and how client SQL runs on
//! them.
//!
//! * **Connections**: one writer (WAL, `synchronous=FULL`, so a write is on
//!   disk before it is acknowledged and survives `kill -9`) and
//!   [`READERS`] reader connections opened `SQLITE_OPEN_READ_ONLY` with
//!   `query_only=1`. A read-only credential only ever gets a reader, so
//!   SQLite itself refuses its writes. A read-write credential's statement
//!   is prepared on a reader first; if SQLite says it is not read-only
//!   (`sqlite3_stmt_readonly`), it runs on the writer instead. Readers run
//!   in parallel with each other and with the writer (WAL).
//! * **Sandbox** (every client connection): an authorizer callback refuses
//!   `ATTACH`, `DETACH`, `load_extension()`, transaction and savepoint
//!   statements (each request is its own transaction; `/batch` runs
//!   several statements in one), temporary objects (connections are shared
//!   between requests) and every pragma but a read-only allow list
//!   ([`ALLOWED_PRAGMAS`]) and `user_version`. `SQLITE_LIMIT_ATTACHED` is
//!   0, which also makes `VACUUM` and `VACUUM INTO 'file'` impossible, and
//!   `SQLITE_DBCONFIG_DEFENSIVE` is on. A credential for one database
//!   therefore cannot reach another database's file. A refusal names what
//!   was refused and why (`refused: PRAGMA journal_mode (…)`, `refused:
//!   ATTACH (…)`), where SQLite itself says only "not authorized".
//! * **One statement per request**: trailing statements are refused
//!   (`rusqlite` prepares the tail and reports it).
//! * **Timeouts**: a progress handler checks the request's deadline every
//!   [`PROGRESS_OPS`] virtual-machine steps and interrupts the statement;
//!   the request answers 408. The wait for the writer's lock is not part of
//!   the timeout, but it is bounded by the longest timeout
//!   ([`MAX_TIMEOUT`]) of the request holding it.
//! * **Row limits**: at most `max_rows` rows are returned (default
//!   [`DEFAULT_MAX_ROWS`], cap [`MAX_ROWS_CAP`]); `truncated` says whether
//!   more were left. The answer is also bounded to [`MAX_RESULT_BYTES`].
//! * **Value mapping** (JSON ⇄ SQLite): `null` ⇄ NULL, integers ⇄
//!   INTEGER (i64), other numbers ⇄ REAL (non-finite REALs become `null`),
//!   strings ⇄ TEXT, `true`/`false` → 1/0, `{"base64": "..."}` ⇄ BLOB
//!   (standard padded base64). Arrays and other objects are refused.
//!   Parameters are an array (positional `?`, `?NNN`) or an object (named
//!   `:name`, `@name`, `$name`; the key may omit the prefix).
//! * **Exclusive access** for restore and drop: every query holds a shared
//!   gate; [`Database::exclusive`] takes it exclusively (waits for running
//!   queries), closes the connections and reopens them after.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Number, Value};

/// Reader connections per database.
pub const READERS: usize = 4;
/// Rows returned when the request does not say.
pub const DEFAULT_MAX_ROWS: usize = 1000;
/// Most rows a request may ask for.
pub const MAX_ROWS_CAP: usize = 10_000;
/// Timeout when the request does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest timeout a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer (sum of the cells' JSON sizes, roughly); beyond it the
/// rows are truncated.
pub const MAX_RESULT_BYTES: usize = 8 * 1024 * 1024;
/// VM steps between deadline checks.
pub const PROGRESS_OPS: i32 = 1000;
/// How long a writer waits for SQLite's file lock (another process).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pragmas a client may read (no value).
pub const ALLOWED_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
    "user_version",
    "schema_version",
    "page_count",
    "page_size",
    "freelist_count",
    "data_version",
    "collation_list",
    "function_list",
];

/// Why a query failed. [`QueryError::status`] maps to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request itself is malformed (parameters, values, options).
    #[error("{0}")]
    BadRequest(String),
    /// SQLite refused the SQL (syntax, constraint, type, authorizer ...).
    #[error("{0}")]
    Sql(String),
    /// The credential is read-only and the statement writes.
    #[error("this credential is read-only: {0}")]
    ReadOnly(String),
    /// The statement ran past its deadline and was interrupted.
    #[error("the statement ran longer than its timeout of {0} ms and was interrupted")]
    Timeout(u128),
    /// The database is busy (locked by another process) past the busy timeout.
    #[error("the database is locked: {0}")]
    Busy(String),
    /// The database was dropped while the request waited.
    #[error("the database no longer exists")]
    Gone,
    /// Disk, I/O or corruption.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl QueryError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            QueryError::BadRequest(_) | QueryError::Sql(_) => 400,
            QueryError::ReadOnly(_) => 403,
            QueryError::Timeout(_) => 408,
            QueryError::Busy(_) => 503,
            QueryError::Gone => 404,
            QueryError::Storage(_) => 500,
        }
    }
}

/// Why a database could not be opened or switched.
#[derive(Debug, thiserror::Error)]
#[error("database {path}: {reason}")]
pub struct OpenError {
    /// The file.
    pub path: String,
    /// Why.
    pub reason: String,
}

fn classify(e: rusqlite::Error, timeout: Duration) -> QueryError {
    use rusqlite::ErrorCode as C;
    match &e {
        rusqlite::Error::MultipleStatement => QueryError::BadRequest(
            "one statement per request (remove the trailing statement, or use /batch)".into(),
        ),
        rusqlite::Error::SqliteFailure(f, msg) => {
            let text = msg.clone().unwrap_or_else(|| f.to_string());
            match f.code {
                C::OperationInterrupted => QueryError::Timeout(timeout.as_millis()),
                C::ReadOnly => QueryError::ReadOnly(text),
                C::DatabaseBusy | C::DatabaseLocked => QueryError::Busy(text),
                C::SystemIoFailure
                | C::DatabaseCorrupt
                | C::DiskFull
                | C::CannotOpen
                | C::OutOfMemory
                | C::NotADatabase => QueryError::Storage(text),
                _ => QueryError::Sql(text),
            }
        }
        _ => QueryError::Sql(e.to_string()),
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Per-connection state shared with its callbacks.
#[derive(Debug, Default)]
struct Guard {
    /// Deadline in [`now_ms`] units; 0 = none.
    deadline: AtomicU64,
    /// Let transaction statements through (db-manager's own BEGIN/COMMIT).
    allow_txn: AtomicBool,
    /// What the authorizer last refused (`PRAGMA journal_mode`, `ATTACH`,
    /// …): SQLite itself says only "not authorized". Taken by
    /// [`classify_in`]; cleared when a request's deadline is set.
    refused: Mutex<Option<String>>,
}

impl Guard {
    /// Notes what was refused and refuses it.
    fn deny(&self, what: String) -> Authorization {
        *lock(&self.refused) = Some(what);
        Authorization::Deny
    }
}

/// A client connection with its guard.
#[derive(Debug)]
struct Conn {
    conn: Connection,
    guard: Arc<Guard>,
}

fn authorize(guard: &Guard, ctx: AuthContext<'_>) -> Authorization {
    use rusqlite::hooks::TransactionOperation as Op;
    const TXN: &str = "each request is its own transaction; /batch runs several statements in one";
    const TEMP: &str = "connections are shared between requests";
    match ctx.action {
        AuthAction::Attach { .. } => {
            guard.deny("ATTACH (a credential reaches its own database only)".into())
        }
        AuthAction::Detach { .. } => guard.deny("DETACH".into()),
        AuthAction::Function { function_name } => {
            if function_name.eq_ignore_ascii_case("load_extension") {
                guard.deny("load_extension()".into())
            } else {
                Authorization::Allow
            }
        }
        AuthAction::Transaction { operation } => {
            if guard.allow_txn.load(Ordering::Relaxed) {
                Authorization::Allow
            } else {
                let verb = match operation {
                    Op::Begin => "BEGIN",
                    Op::Rollback => "ROLLBACK",
                    // COMMIT and END (SQLite passes "COMMIT").
                    _ => "COMMIT",
                };
                guard.deny(format!("{verb} ({TXN})"))
            }
        }
        AuthAction::Savepoint {
            operation,
            savepoint_name,
        } => {
            if guard.allow_txn.load(Ordering::Relaxed) {
                Authorization::Allow
            } else {
                let verb = match operation {
                    Op::Release => "RELEASE",
                    Op::Rollback => "ROLLBACK TO",
                    _ => "SAVEPOINT",
                };
                guard.deny(format!("{verb} {} ({TXN})", clip(savepoint_name)))
            }
        }
        AuthAction::CreateTempIndex { index_name, .. } => {
            guard.deny(format!("CREATE TEMP INDEX {} ({TEMP})", clip(index_name)))
        }
        AuthAction::CreateTempTable { table_name } => {
            guard.deny(format!("CREATE TEMP TABLE {} ({TEMP})", clip(table_name)))
        }
        AuthAction::CreateTempTrigger { trigger_name, .. } => guard.deny(format!(
            "CREATE TEMP TRIGGER {} ({TEMP})",
            clip(trigger_name)
        )),
        AuthAction::CreateTempView { view_name } => {
            guard.deny(format!("CREATE TEMP VIEW {} ({TEMP})", clip(view_name)))
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            let ok = match pragma_value {
                None => ALLOWED_PRAGMAS.contains(&name.as_str()),
                // table_info(t) and friends pass the table as the value.
                Some(_) => {
                    name == "user_version"
                        || ALLOWED_PRAGMAS.contains(&name.as_str())
                            && !matches!(
                                name.as_str(),
                                "schema_version" | "page_size" | "data_version"
                            )
                }
            };
            if ok {
                Authorization::Allow
            } else {
                let how = if pragma_value.is_some() && ALLOWED_PRAGMAS.contains(&name.as_str()) {
                    "may be read, not set"
                } else {
                    "only read-only pragmas and user_version are allowed"
                };
                guard.deny(format!("PRAGMA {} ({how})", clip(&name)))
            }
        }
        _ => Authorization::Allow,
    }
}

/// A name from the client's SQL, cut to 64 characters for a message.
fn clip(name: &str) -> String {
    const MAX: usize = 64;
    match name.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &name[..i]),
        None => name.to_string(),
    }
}

/// [`classify`] of an error preparing a statement on `guard`'s connection,
/// with what the sandbox refused in place of SQLite's bare "not
/// authorized" (a refusal fails the prepare, whatever error SQLite then
/// reports: SQLITE_AUTH, or an input error for a function).
fn classify_in(guard: &Guard, e: rusqlite::Error, timeout: Duration) -> QueryError {
    match lock(&guard.refused).take() {
        Some(what) => QueryError::Sql(format!("refused: {what}")),
        None => classify(e, timeout),
    }
}

fn open_conn(path: &Path, writer: bool) -> Result<Conn, rusqlite::Error> {
    let flags = if writer {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let mut conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    if writer {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
    } else {
        conn.pragma_update(None, "query_only", 1)?;
    }
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA,
        false,
    )?;
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, 64 * 1024 * 1024)?;
    conn.set_prepared_statement_cache_capacity(64);
    let guard = Arc::new(Guard::default());
    let g = guard.clone();
    conn.progress_handler(
        PROGRESS_OPS,
        Some(move || {
            let d = g.deadline.load(Ordering::Relaxed);
            d != 0 && now_ms() > d
        }),
    )?;
    let g = guard.clone();
    conn.authorizer(Some(move |ctx: AuthContext<'_>| authorize(&g, ctx)))?;
    Ok(Conn { conn, guard })
}

/// The open connections of one database.
#[derive(Debug)]
struct Pool {
    writer: Mutex<Conn>,
    readers: Vec<Mutex<Conn>>,
}

impl Pool {
    fn open(path: &Path) -> Result<Pool, OpenError> {
        let err = |e: rusqlite::Error| OpenError {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let writer = open_conn(path, true).map_err(err)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(Mutex::new(open_conn(path, false).map_err(err)?));
        }
        Ok(Pool {
            writer: Mutex::new(writer),
            readers,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Options of one statement or batch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most rows returned per statement.
    pub max_rows: usize,
    /// Deadline for the whole request.
    pub timeout: Duration,
}

impl Limits {
    /// Checks the client's `max_rows` and `timeout_ms`.
    pub fn from_request(
        max_rows: Option<u64>,
        timeout_ms: Option<u64>,
    ) -> Result<Limits, QueryError> {
        let max_rows = match max_rows {
            None => DEFAULT_MAX_ROWS,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_ROWS_CAP).contains(n))
                .ok_or_else(|| {
                    QueryError::BadRequest(format!("max_rows must be 1..={MAX_ROWS_CAP}"))
                })?,
        };
        let timeout = match timeout_ms {
            None => DEFAULT_TIMEOUT,
            Some(ms) if ms == 0 || u128::from(ms) > MAX_TIMEOUT.as_millis() => {
                return Err(QueryError::BadRequest(format!(
                    "timeout_ms must be 1..={}",
                    MAX_TIMEOUT.as_millis()
                )))
            }
            Some(ms) => Duration::from_millis(ms),
        };
        Ok(Limits { max_rows, timeout })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rows: DEFAULT_MAX_ROWS,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One statement of a request.
#[derive(Debug, Clone, Default)]
pub struct Statement {
    /// The SQL (one statement).
    pub sql: String,
    /// `null`, an array or an object (see the module docs).
    pub params: Value,
}

/// The outcome of one statement.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each as JSON values.
    pub rows: Vec<Vec<Value>>,
    /// Rows inserted, updated or deleted (0 for reads).
    pub rows_affected: u64,
    /// More rows were left out (row limit or size bound).
    pub truncated: bool,
    /// The rowid this statement inserted (the last one, for several rows),
    /// else `None`.
    pub last_insert_rowid: Option<i64>,
}

impl QueryResult {
    /// The JSON answer.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("columns".into(), self.columns.clone().into());
        m.insert(
            "rows".into(),
            Value::Array(self.rows.iter().map(|r| Value::Array(r.clone())).collect()),
        );
        m.insert("rows_affected".into(), self.rows_affected.into());
        m.insert("truncated".into(), self.truncated.into());
        if let Some(id) = self.last_insert_rowid {
            m.insert("last_insert_rowid".into(), id.into());
        }
        Value::Object(m)
    }

    /// Approximate JSON size, for metrics.
    pub fn approx_bytes(&self) -> usize {
        self.rows.iter().flatten().map(value_size).sum::<usize>()
    }
}

fn value_size(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len() + 2,
        Value::Object(o) => o.values().map(value_size).sum::<usize>() + 12,
        _ => 8,
    }
}

/// JSON → SQLite value (see the module docs).
pub fn to_sql(v: &Value, what: &dyn Fn() -> String) -> Result<SqlValue, QueryError> {
    Ok(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => match n.as_f64() {
                Some(f) => SqlValue::Real(f),
                None => {
                    return Err(QueryError::BadRequest(format!(
                        "{}: number out of range",
                        what()
                    )))
                }
            },
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Object(o) if o.len() == 1 && o.contains_key("base64") => match o.get("base64") {
            Some(Value::String(s)) => SqlValue::Blob(B64.decode(s.trim()).map_err(|_| {
                QueryError::BadRequest(format!(
                    "{}: base64 is not valid (standard alphabet, padded)",
                    what()
                ))
            })?),
            _ => {
                return Err(QueryError::BadRequest(format!(
                    "{}: base64 must be a string",
                    what()
                )))
            }
        },
        _ => {
            return Err(QueryError::BadRequest(format!(
                "{}: values are null, booleans, numbers, strings or {{\"base64\": \"...\"}}",
                what()
            )))
        }
    })
}

/// SQLite value → JSON (see the module docs).
pub fn to_json(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            let mut m = Map::new();
            m.insert("base64".into(), Value::String(B64.encode(b)));
            Value::Object(m)
        }
    }
}

fn bind(stmt: &mut rusqlite::Statement<'_>, params: &Value) -> Result<(), QueryError> {
    let count = stmt.parameter_count();
    let bind_err = |e: rusqlite::Error| QueryError::BadRequest(format!("binding parameters: {e}"));
    match params {
        Value::Null => {
            if count > 0 {
                return Err(QueryError::BadRequest(format!(
                    "the statement has {count} parameters and the request gives none"
                )));
            }
        }
        Value::Array(items) => {
            if items.len() != count {
                return Err(QueryError::BadRequest(format!(
                    "the statement has {count} parameters and the request gives {}",
                    items.len()
                )));
            }
            for (i, v) in items.iter().enumerate() {
                let value = to_sql(v, &|| format!("params[{i}]"))?;
                stmt.raw_bind_parameter(i + 1, value).map_err(bind_err)?;
            }
        }
        Value::Object(map) => {
            let mut used = 0usize;
            for i in 1..=count {
                let Some(name) = stmt.parameter_name(i).map(str::to_string) else {
                    return Err(QueryError::BadRequest(format!(
                        "parameter {i} is positional; pass params as an array"
                    )));
                };
                let bare = name.get(1..).unwrap_or("");
                let v = map
                    .get(&name)
                    .or_else(|| map.get(bare))
                    .ok_or_else(|| QueryError::BadRequest(format!("missing parameter {name}")))?;
                used += 1;
                let value = to_sql(v, &|| format!("params.{bare}"))?;
                stmt.raw_bind_parameter(i, value).map_err(bind_err)?;
            }
            if used != map.len() {
                return Err(QueryError::BadRequest(format!(
                    "params has {} entries and the statement uses {used}",
                    map.len()
                )));
            }
        }
        _ => {
            return Err(QueryError::BadRequest(
                "params must be an array or an object".into(),
            ))
        }
    }
    Ok(())
}

/// Runs one prepared statement, reading at most `max_rows` rows.
fn run_stmt(
    conn: &Connection,
    stmt: &mut rusqlite::Statement<'_>,
    params: &Value,
    limits: Limits,
) -> Result<QueryResult, QueryError> {
    bind(stmt, params)?;
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let ncol = columns.len();
    let writes = !stmt.readonly();
    let before = conn.total_changes();
    let rowid_before = conn.last_insert_rowid();
    let mut rows = Vec::new();
    let mut truncated = false;
    let mut bytes = 0usize;
    {
        let mut cursor = stmt.raw_query();
        loop {
            let row = match cursor.next() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => return Err(classify(e, limits.timeout)),
            };
            if rows.len() >= limits.max_rows || bytes > MAX_RESULT_BYTES {
                truncated = true;
                break;
            }
            let mut out = Vec::with_capacity(ncol);
            for i in 0..ncol {
                let v = row.get_ref(i).map_err(|e| QueryError::Sql(e.to_string()))?;
                let j = to_json(v);
                bytes += value_size(&j);
                out.push(j);
            }
            rows.push(out);
        }
        // A write with RETURNING runs to completion before its first row,
        // so stopping early loses no change.
    }
    let rows_affected = if writes {
        conn.total_changes().saturating_sub(before)
    } else {
        0
    };
    Ok(QueryResult {
        columns,
        rows,
        rows_affected,
        truncated,
        // Only when this statement inserted: the connection is shared, so
        // an older value may be another request's.
        last_insert_rowid: (writes && conn.last_insert_rowid() != rowid_before)
            .then(|| conn.last_insert_rowid()),
    })
}

/// Sets the deadline for the request, clears it on drop.
struct Deadline<'a>(&'a Guard);

impl<'a> Deadline<'a> {
    fn set(guard: &'a Guard, timeout: Duration) -> Deadline<'a> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        guard
            .deadline
            .store(now_ms().saturating_add(ms), Ordering::Relaxed);
        *lock(&guard.refused) = None;
        Deadline(guard)
    }
}

impl Drop for Deadline<'_> {
    fn drop(&mut self) {
        self.0.deadline.store(0, Ordering::Relaxed);
    }
}

/// Access a credential grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads and writes.
    ReadWrite,
    /// Reads only (enforced by SQLite: read-only connection, `query_only`).
    ReadOnly,
}

/// A hosted database. See the module docs.
#[derive(Debug)]
pub struct Database {
    name: String,
    path: PathBuf,
    gate: RwLock<Option<Pool>>,
    next_reader: AtomicUsize,
}

impl Database {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(name: &str, path: &Path) -> Result<Database, OpenError> {
        let pool = Pool::open(path)?;
        Ok(Database {
            name: name.to_string(),
            path: path.to_path_buf(),
            gate: RwLock::new(Some(pool)),
            next_reader: AtomicUsize::new(0),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn reader<'p>(&self, pool: &'p Pool) -> MutexGuard<'p, Conn> {
        for r in &pool.readers {
            if let Ok(g) = r.try_lock() {
                return g;
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % pool.readers.len().max(1);
        match pool.readers.get(i) {
            Some(r) => lock(r),
            None => lock(&pool.writer),
        }
    }

    /// Runs one statement with `access`.
    pub fn query(
        &self,
        access: Access,
        st: &Statement,
        limits: Limits,
    ) -> Result<QueryResult, QueryError> {
        let gate = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pool = gate.as_ref().ok_or(QueryError::Gone)?;
        {
            let reader = self.reader(pool);
            let _deadline = Deadline::set(&reader.guard, limits.timeout);
            let mut stmt = reader
                .conn
                .prepare_cached(&st.sql)
                .map_err(|e| classify_in(&reader.guard, e, limits.timeout))?;
            if stmt.readonly() || access == Access::ReadOnly {
                if !stmt.readonly() {
                    return Err(QueryError::ReadOnly(
                        "the statement writes to the database".into(),
                    ));
                }
                return run_stmt(&reader.conn, &mut stmt, &st.params, limits);
            }
        }
        let writer = lock(&pool.writer);
        let _deadline = Deadline::set(&writer.guard, limits.timeout);
        let result = (|| {
            let mut stmt = writer
                .conn
                .prepare_cached(&st.sql)
                .map_err(|e| classify_in(&writer.guard, e, limits.timeout))?;
            run_stmt(&writer.conn, &mut stmt, &st.params, limits)
        })();
        if !writer.conn.is_autocommit() {
            // Cannot happen (transaction statements are refused); never leave
            // a transaction open on a shared connection.
            let _ = writer.conn.execute_batch("ROLLBACK");
        }
        result
    }

    /// Runs `statements` in one transaction (all or nothing). Read-only
    /// access runs them in one read transaction on a reader (a consistent
    /// snapshot). An error names the statement's index.
    pub fn batch(
        &self,
        access: Access,
        statements: &[Statement],
        limits: Limits,
    ) -> Result<Vec<QueryResult>, (usize, QueryError)> {
        let gate = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pool = gate.as_ref().ok_or((0, QueryError::Gone))?;
        let (conn, begin) = match access {
            Access::ReadOnly => (self.reader(pool), "BEGIN DEFERRED"),
            Access::ReadWrite => (lock(&pool.writer), "BEGIN IMMEDIATE"),
        };
        let _deadline = Deadline::set(&conn.guard, limits.timeout);
        let txn = |sql: &str| {
            conn.guard.allow_txn.store(true, Ordering::Relaxed);
            let r = conn.conn.execute_batch(sql);
            conn.guard.allow_txn.store(false, Ordering::Relaxed);
            r
        };
        txn(begin).map_err(|e| (0, classify(e, limits.timeout)))?;
        let mut results = Vec::with_capacity(statements.len());
        for (i, st) in statements.iter().enumerate() {
            let r = conn
                .conn
                .prepare_cached(&st.sql)
                .map_err(|e| classify_in(&conn.guard, e, limits.timeout))
                .and_then(|mut stmt| {
                    if access == Access::ReadOnly && !stmt.readonly() {
                        return Err(QueryError::ReadOnly(
                            "the statement writes to the database".into(),
                        ));
                    }
                    run_stmt(&conn.conn, &mut stmt, &st.params, limits)
                });
            match r {
                Ok(r) => results.push(r),
                Err(e) => {
                    let _ = txn("ROLLBACK");
                    return Err((i, e));
                }
            }
        }
        if let Err(e) = txn("COMMIT") {
            let _ = txn("ROLLBACK");
            return Err((
                statements.len().saturating_sub(1),
                classify(e, limits.timeout),
            ));
        }
        Ok(results)
    }

    /// Runs `f` with every connection closed and no query running (waits
    /// for running queries); reopens the connections after, unless `f`
    /// returns `Ok(false)` (the database is being dropped).
    pub fn exclusive<E: From<OpenError>>(
        &self,
        f: impl FnOnce(&Path) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut gate = self
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pool) = gate.take() {
            // Fold the WAL into the main file so the file alone is the database.
            let w = lock(&pool.writer);
            let _ = w.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
            drop(w);
            drop(pool);
        }
        let reopen = match f(&self.path) {
            Ok(reopen) => reopen,
            Err(e) => {
                *gate = Pool::open(&self.path).ok();
                return Err(e);
            }
        };
        if reopen {
            *gate = Some(Pool::open(&self.path)?);
        }
        Ok(())
    }

    /// Copies a consistent snapshot of the database into a new file `dest`
    /// with SQLite's online backup API (writers continue meanwhile).
    pub fn snapshot_to(&self, dest: &Path) -> Result<(), OpenError> {
        let err = |e: rusqlite::Error| OpenError {
            path: self.path.display().to_string(),
            reason: format!("backup: {e}"),
        };
        let gate = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if gate.is_none() {
            return Err(OpenError {
                path: self.path.display().to_string(),
                reason: "dropped".into(),
            });
        }
        let src = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        src.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        let mut dst = Connection::open(dest).map_err(err)?;
        {
            let backup = rusqlite::backup::Backup::new(&src, &mut dst).map_err(err)?;
            // All pages in one step: one read transaction, so the copy is
            // one consistent snapshot whatever the writers do.
            loop {
                match backup.step(-1).map_err(err)? {
                    rusqlite::backup::StepResult::Done => break,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        dst.pragma_update(None, "journal_mode", "DELETE")
            .map_err(err)?;
        drop(dst);
        drop(gate);
        Ok(())
    }
}

/// Runs `PRAGMA integrity_check` on the file at `path` (opened read-only);
/// `Err` says what is wrong.
pub fn integrity_check(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| e.to_string())?;
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if lines.len() == 1 && lines.first().is_some_and(|l| l == "ok") {
        Ok(())
    } else {
        Err(lines.join("; "))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use serde_json::json;

    fn st(sql: &str, params: Value) -> Statement {
        Statement {
            sql: sql.into(),
            params,
        }
    }

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open("t", &dir.path().join("t.sqlite")).unwrap();
        (dir, db)
    }

    #[test]
    fn params_values_and_limits() {
        let (_d, db) = db();
        let rw = Access::ReadWrite;
        let l = Limits::default();
        db.query(
            rw,
            &st(
                "CREATE TABLE t(a INTEGER, b TEXT, c BLOB, d REAL)",
                Value::Null,
            ),
            l,
        )
        .unwrap();
        let r = db
            .query(
                rw,
                &st(
                    "INSERT INTO t VALUES (?, ?, ?, ?)",
                    json!([1, "x", {"base64": "AAEC"}, 1.5]),
                ),
                l,
            )
            .unwrap();
        assert_eq!(r.rows_affected, 1);
        db.query(
            rw,
            &st(
                "INSERT INTO t(a, b) VALUES (:a, @b)",
                json!({"a": 2, "@b": true}),
            ),
            l,
        )
        .unwrap();
        let r = db
            .query(
                Access::ReadOnly,
                &st("SELECT * FROM t ORDER BY a", Value::Null),
                l,
            )
            .unwrap();
        assert_eq!(r.columns, ["a", "b", "c", "d"]);
        assert_eq!(
            r.rows[0],
            vec![json!(1), json!("x"), json!({"base64": "AAEC"}), json!(1.5)]
        );
        assert_eq!(
            r.rows[1],
            vec![json!(2), json!("1"), Value::Null, Value::Null]
        );
        let r = db
            .query(
                rw,
                &st("SELECT * FROM t", Value::Null),
                Limits { max_rows: 1, ..l },
            )
            .unwrap();
        assert!(r.truncated);
        assert_eq!(r.rows.len(), 1);
        for (sql, params) in [
            ("SELECT ?", json!([])),
            ("SELECT ?", json!([[1]])),
            ("SELECT :a", json!({"a": 1, "b": 2})),
            ("SELECT 1; SELECT 2", Value::Null),
        ] {
            let e = db.query(rw, &st(sql, params), l).unwrap_err();
            assert_eq!(e.status(), 400, "{sql}: {e}");
        }
    }

    #[test]
    fn sandbox_and_read_only() {
        let (dir, db) = db();
        let l = Limits::default();
        db.query(Access::ReadWrite, &st("CREATE TABLE t(a)", Value::Null), l)
            .unwrap();
        let e = db
            .query(
                Access::ReadOnly,
                &st("INSERT INTO t VALUES (1)", Value::Null),
                l,
            )
            .unwrap_err();
        assert_eq!(e.status(), 403, "{e}");
        let other = dir.path().join("other.sqlite");
        for sql in [
            format!("ATTACH '{}' AS o", other.display()),
            format!("VACUUM INTO '{}'", other.display()),
            "SELECT load_extension('x')".into(),
            "BEGIN".into(),
            "PRAGMA query_only=0".into(),
            "PRAGMA journal_mode=DELETE".into(),
            "PRAGMA synchronous=OFF".into(),
            "CREATE TEMP TABLE x(a)".into(),
        ] {
            let e = db
                .query(Access::ReadWrite, &st(&sql, Value::Null), l)
                .unwrap_err();
            assert!(matches!(e.status(), 400 | 403), "{sql}: {e}");
        }
        assert!(!other.exists());
        db.query(
            Access::ReadOnly,
            &st("PRAGMA table_info(t)", Value::Null),
            l,
        )
        .unwrap();
    }

    #[test]
    fn sandbox_refusals_name_what_was_refused() {
        let (dir, db) = db();
        let l = Limits::default();
        db.query(Access::ReadWrite, &st("CREATE TABLE t(a)", Value::Null), l)
            .unwrap();
        let other = dir.path().join("other.sqlite");
        for (sql, want) in [
            (
                "PRAGMA journal_mode=DELETE".to_string(),
                "refused: PRAGMA journal_mode (",
            ),
            ("PRAGMA synchronous".into(), "refused: PRAGMA synchronous ("),
            (
                "PRAGMA page_size=512".into(),
                "refused: PRAGMA page_size (may be read, not set)",
            ),
            (
                format!("ATTACH '{}' AS o", other.display()),
                "refused: ATTACH (",
            ),
            (
                "SELECT load_extension('x')".into(),
                "refused: load_extension()",
            ),
            ("BEGIN".into(), "refused: BEGIN ("),
            ("COMMIT".into(), "refused: COMMIT ("),
            ("SAVEPOINT sp".into(), "refused: SAVEPOINT sp ("),
            (
                "CREATE TEMP TABLE x(a)".into(),
                "refused: CREATE TEMP TABLE x (",
            ),
            (
                "CREATE TEMP VIEW v AS SELECT 1".into(),
                "refused: CREATE TEMP VIEW v (",
            ),
        ] {
            for access in [Access::ReadWrite, Access::ReadOnly] {
                let e = db.query(access, &st(&sql, Value::Null), l).unwrap_err();
                let text = e.to_string();
                assert!(text.starts_with(want), "{sql}: {text}");
                assert_eq!(e.status(), 400, "{sql}: {text}");
            }
            // In a batch too, and the next request is not told of it.
            let (i, e) = db
                .batch(
                    Access::ReadWrite,
                    &[st("SELECT 1", Value::Null), st(&sql, Value::Null)],
                    l,
                )
                .unwrap_err();
            assert_eq!(i, 1);
            assert!(e.to_string().starts_with(want), "batch {sql}: {e}");
        }
        assert!(!other.exists());
        // Other SQL errors keep SQLite's own words.
        let e = db
            .query(Access::ReadWrite, &st("SELECT * FROM nope", Value::Null), l)
            .unwrap_err();
        assert!(e.to_string().contains("no such table"), "{e}");
    }

    #[test]
    fn runaway_query_times_out() {
        let (_d, db) = db();
        let t0 = Instant::now();
        let e = db
            .query(
                Access::ReadOnly,
                &st(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c",
                    Value::Null,
                ),
                Limits {
                    max_rows: 10,
                    timeout: Duration::from_millis(200),
                },
            )
            .unwrap_err();
        assert_eq!(e.status(), 408, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // The connection is usable afterwards.
        db.query(
            Access::ReadOnly,
            &st("SELECT 1", Value::Null),
            Limits::default(),
        )
        .unwrap();
    }

    #[test]
    fn batch_is_atomic() {
        let (_d, db) = db();
        let l = Limits::default();
        db.query(
            Access::ReadWrite,
            &st("CREATE TABLE t(a UNIQUE)", Value::Null),
            l,
        )
        .unwrap();
        let (i, _) = db
            .batch(
                Access::ReadWrite,
                &[
                    st("INSERT INTO t VALUES (1)", Value::Null),
                    st("INSERT INTO t VALUES (1)", Value::Null),
                ],
                l,
            )
            .unwrap_err();
        assert_eq!(i, 1);
        let r = db
            .query(
                Access::ReadOnly,
                &st("SELECT count(*) FROM t", Value::Null),
                l,
            )
            .unwrap();
        assert_eq!(r.rows[0][0], json!(0));
        let r = db
            .batch(
                Access::ReadWrite,
                &[
                    st("INSERT INTO t VALUES (1)", Value::Null),
                    st("INSERT INTO t VALUES (2)", Value::Null),
                    st("SELECT count(*) FROM t", Value::Null),
                ],
                l,
            )
            .unwrap();
        assert_eq!(r[2].rows[0][0], json!(2));
    }

    #[test]
    fn snapshot_and_integrity() {
        let (dir, db) = db();
        let l = Limits::default();
        db.query(Access::ReadWrite, &st("CREATE TABLE t(a)", Value::Null), l)
            .unwrap();
        db.query(
            Access::ReadWrite,
            &st("INSERT INTO t VALUES (42)", Value::Null),
            l,
        )
        .unwrap();
        let copy = dir.path().join("copy.sqlite");
        db.snapshot_to(&copy).unwrap();
        integrity_check(&copy).unwrap();
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        assert!(integrity_check(&garbage).is_err());
    }
}
