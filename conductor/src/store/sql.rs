//! One SQL surface over two engines: SQLite (the default: one file in the
//! data directory) and PostgreSQL (`--store postgres://…`, a server several
//! conductors can share).
//!
//! The table-family files write each statement once, in the subset both
//! engines run, and call [`Db`]'s methods with [`params!`]:
//! - placeholders are `?1`, `?2`, …; for PostgreSQL [`pg_sql`] rewrites them
//!   to `$1`, `$2`, … (so no `?` may appear inside a string literal);
//! - upserts are `ON CONFLICT (…) DO UPDATE SET c = excluded.c`, and a
//!   reference to the stored row's own column is qualified by the table
//!   name (`n = metrics_minute.n + 1`: unqualified it is ambiguous in
//!   PostgreSQL);
//! - new ids come back with `RETURNING id`, never `last_insert_rowid()`;
//! - `SUM` over integers is `CAST(SUM(x) AS BIGINT)` (PostgreSQL's sum of a
//!   `BIGINT` is a `NUMERIC`); the scalar `max(a, b)` is written as `CASE`
//!   (PostgreSQL calls it `GREATEST`); there is no `rowid`.
//!
//! Migrations are written in SQLite's types; [`pg_ddl`] maps them
//! (`INTEGER` → `BIGINT`, `BLOB` → `BYTEA`, `REAL` → `DOUBLE PRECISION`,
//! `INTEGER PRIMARY KEY AUTOINCREMENT` → an identity column). A test runs
//! every statement of the store against a real PostgreSQL server
//! (`conductor/tests/store_postgres.rs`), which is what keeps this subset
//! honest.
//!
//! Values cross as [`Value`]s: integers are `i64` (the `u64` columns are
//! stored bit-preserving, see `store::i`), text, blobs, reals and NULL.
//!
//! PostgreSQL runs on a thread of its own per connection ([`PgConn`]): it
//! drives the `tokio-postgres` client on a private current-thread runtime,
//! which may not be entered from the conductor's runtime thread, and store
//! calls are made from there (under the store mutex) as from plain threads.
//! Each call is one message to that thread and one reply;
//! [`Db::execute_all`] sends a whole batch of statements as one message and
//! one pipeline (the ingest writer's batches: one round trip, not one per
//! statement). A connection that breaks is
//! re-made on the next call, except inside a transaction: then every call
//! fails until the transaction ends, so no statement of a half-done
//! transaction runs outside it. While the server cannot be reached, a
//! connect is tried at most once per back-off (0.25 s doubling to 8 s, each
//! attempt bounded by [`CONNECT_TIMEOUT`]) and the calls in between fail at
//! once with `StoreError::PgDown`: the conductor's runtime thread, which
//! makes store calls too, is held up by one attempt per back-off, not by
//! every call.
//!
//! TLS: libpq's `sslmode` and `sslrootcert` on the URL ([`super::pg_tls`];
//! `verify-full` for a server on another host). Limits: prepared
//! statements are cached per connection by SQL text: the store's SQL is a
//! finite set of strings.

use std::collections::HashMap;

use super::pg_tls::PgTarget;
use std::sync::mpsc;

use super::StoreError;

/// A value read from a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// Any integer column (and booleans, as 0/1).
    Int(i64),
    /// A floating-point column.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Real(_) => "a real",
            Value::Text(_) => "text",
            Value::Blob(_) => "a blob",
        }
    }
}

/// A statement parameter, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A real.
    Real(f64),
    /// Text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
}

impl Param<'_> {
    fn to_value(self) -> Value {
        match self {
            Param::Null => Value::Null,
            Param::Int(v) => Value::Int(v),
            Param::Real(v) => Value::Real(v),
            Param::Text(s) => Value::Text(s.to_owned()),
            Param::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

/// What can be bound to a placeholder.
pub trait ToParam {
    /// As a parameter.
    fn to_param(&self) -> Param<'_>;
}

impl ToParam for i64 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(*self)
    }
}
impl ToParam for i32 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}
impl ToParam for u32 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}
impl ToParam for bool {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}
impl ToParam for f64 {
    fn to_param(&self) -> Param<'_> {
        Param::Real(*self)
    }
}
impl ToParam for str {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}
impl ToParam for String {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}
impl ToParam for [u8] {
    fn to_param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}
impl ToParam for Vec<u8> {
    fn to_param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}
impl<T: ToParam> ToParam for Option<T> {
    fn to_param(&self) -> Param<'_> {
        match self {
            Some(v) => v.to_param(),
            None => Param::Null,
        }
    }
}
impl<T: ToParam + ?Sized> ToParam for &T {
    fn to_param(&self) -> Param<'_> {
        (**self).to_param()
    }
}

/// The parameters of one statement: `params![a, b, c]`, each borrowed.
macro_rules! params {
    () => {
        &[] as &[$crate::store::sql::Param<'_>]
    };
    ($($p:expr),+ $(,)?) => {
        &[$($crate::store::sql::ToParam::to_param(&$p)),+] as &[$crate::store::sql::Param<'_>]
    };
}
pub(crate) use params;

/// What a column can be read as.
pub trait FromValue: Sized {
    /// Converts, or says what it holds instead.
    fn from_value(v: &Value) -> Option<Self>;
    /// The Rust type, for the error.
    const WANT: &'static str;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }
    const WANT: &'static str = "i64";
}
impl FromValue for i32 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => i32::try_from(*n).ok(),
            _ => None,
        }
    }
    const WANT: &'static str = "i32";
}
impl FromValue for u32 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => u32::try_from(*n).ok(),
            _ => None,
        }
    }
    const WANT: &'static str = "u32";
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => Some(*n != 0),
            _ => None,
        }
    }
    const WANT: &'static str = "bool";
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Real(f) => Some(*f),
            // SQLite hands back an integral REAL as stored; PostgreSQL never.
            #[allow(clippy::cast_precision_loss)]
            Value::Int(n) => Some(*n as f64),
            _ => None,
        }
    }
    const WANT: &'static str = "f64";
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
    const WANT: &'static str = "String";
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
    const WANT: &'static str = "Vec<u8>";
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
    const WANT: &'static str = T::WANT;
}

/// One result row, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `idx` as `T`.
    pub fn get<T: FromValue>(&self, idx: usize) -> Result<T, StoreError> {
        let v = self.0.get(idx).ok_or(StoreError::Column {
            idx,
            want: T::WANT,
            got: "no such column",
        })?;
        T::from_value(v).ok_or(StoreError::Column {
            idx,
            want: T::WANT,
            got: v.kind(),
        })
    }
}

/// A connection to either engine. Methods take `&self`: the store's
/// callers hold it behind a mutex or on one thread.
#[derive(Debug)]
pub enum Db {
    /// SQLite, in-process.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL, through its connection thread.
    Postgres(PgConn),
}

impl Db {
    /// Which engine: `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Runs one statement; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<usize, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(params.iter()))?)
            }
            Db::Postgres(p) => p.execute(sql, owned(params)),
        }
    }

    /// Runs every statement in order, as one pipeline on PostgreSQL (one
    /// round trip for the lot; see `PgState::execute_all`).
    /// The rows each statement changed, in order.
    pub fn execute_all(
        &self,
        ops: Vec<(&'static str, Vec<Value>)>,
    ) -> Result<Vec<usize>, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut changed = Vec::with_capacity(ops.len());
                for (sql, params) in &ops {
                    let mut st = c.prepare_cached(sql)?;
                    changed.push(st.execute(rusqlite::params_from_iter(params.iter()))?);
                }
                Ok(changed)
            }
            Db::Postgres(p) => p.execute_all(ops),
        }
    }

    /// Every row of a query, each through `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.rows(sql, params)?.iter().map(f).collect()
    }

    /// The first row of a query through `f`, if there is one.
    pub fn query_row_opt<T>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.rows(sql, params)?.first().map(f).transpose()
    }

    /// The first row of a query through `f`; no row is an error.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.query_row_opt(sql, params, f)?.ok_or(StoreError::NoRow)
    }

    /// Statements without parameters, separated by `;` (migrations).
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(p) => p.batch(sql.to_owned()),
        }
    }

    /// The connection's write fence ([`PgConn::fence_writes`]) checked now:
    /// inside a transaction the lease row stays locked until it ends, so no
    /// takeover happens before the commit. [`StoreError::Fenced`] when this
    /// conductor no longer holds the lease; nothing without a fence (and on
    /// SQLite). For writes the connection does not see as such (DDL sent
    /// with [`Db::batch`]).
    pub fn check_write_fence(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(p) => p.check_write_fence(),
        }
    }

    /// Starts a transaction; it rolls back when dropped uncommitted.
    pub fn begin(&self) -> Result<Tx<'_>, StoreError> {
        match self {
            Db::Sqlite(c) => c.execute_batch("BEGIN")?,
            Db::Postgres(p) => p.begin()?,
        }
        Ok(Tx {
            db: self,
            open: true,
        })
    }

    fn rows(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for idx in 0..n {
                        use rusqlite::types::ValueRef;
                        vals.push(match r.get_ref(idx)? {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(v) => Value::Int(v),
                            ValueRef::Real(v) => Value::Real(v),
                            ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                        });
                    }
                    out.push(Row(vals));
                }
                Ok(out)
            }
            Db::Postgres(p) => p.query(sql, owned(params)),
        }
    }

    fn end(&self, commit: bool) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(if commit { "COMMIT" } else { "ROLLBACK" })?),
            Db::Postgres(p) => p.end(commit),
        }
    }
}

/// The parameters as owned values (for [`Db::execute_all`]).
pub fn owned(params: &[Param<'_>]) -> Vec<Value> {
    params.iter().map(|p| p.to_value()).collect()
}

/// An open transaction: statements run through it (it derefs to [`Db`]);
/// [`Tx::commit`] ends it, dropping it rolls back.
#[derive(Debug)]
pub struct Tx<'a> {
    db: &'a Db,
    /// Still to be committed or rolled back (false after `commit`).
    open: bool,
}

impl Tx<'_> {
    /// Commits.
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.open = false;
        self.db.end(true)
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            // Nothing to report to: the error that made us drop it is.
            let _ = self.db.end(false);
        }
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as V, ValueRef};
        Ok(match *self {
            Param::Null => ToSqlOutput::Owned(V::Null),
            Param::Int(v) => ToSqlOutput::Owned(V::Integer(v)),
            Param::Real(v) => ToSqlOutput::Owned(V::Real(v)),
            Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Param::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// `?N` placeholders as PostgreSQL's `$N`.
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A migration written in SQLite's types, in PostgreSQL's.
pub fn pg_ddl(sql: &str) -> String {
    let sql = sql.replace(
        "INTEGER PRIMARY KEY AUTOINCREMENT",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    );
    let sql = replace_word(&sql, "INTEGER", "BIGINT");
    let sql = replace_word(&sql, "BLOB", "BYTEA");
    replace_word(&sql, "REAL", "DOUBLE PRECISION")
}

/// `from` as a whole word (not inside an identifier) replaced by `to`.
fn replace_word(s: &str, from: &str, to: &str) -> String {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(from) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + from.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(ident) || after.is_some_and(ident) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

/// A PostgreSQL connection on a thread of its own (see the module docs).
/// A clone is another handle on the same connection (the thread ends with
/// the last one).
#[derive(Clone)]
pub struct PgConn {
    jobs: mpsc::Sender<Job>,
    /// The URL without its password, for messages.
    shown: String,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn").field("url", &self.shown).finish()
    }
}

type Job = Box<dyn FnOnce(&mut PgState) + Send>;

/// The connection thread's state.
struct PgState {
    /// Where and how to connect (TLS included), read once from the URL.
    target: PgTarget,
    /// Drives the client (inside `block_on` only: this thread's calls).
    rt: tokio::runtime::Runtime,
    /// `None` after a failure made it unusable; re-made on the next call
    /// outside a transaction.
    client: Option<tokio_postgres::Client>,
    /// Prepared statements by the SQL text they were made from (the
    /// `$N` form). Cleared with a new connection.
    statements: HashMap<String, tokio_postgres::Statement>,
    /// A transaction is open on `client`: if the connection is lost, the
    /// calls fail until it ends rather than run on a new connection.
    in_tx: bool,
    /// The connection was lost inside the open transaction.
    tx_broken: bool,
    /// The last failed connect and how long to wait before the next
    /// (doubling from [`RECONNECT_FIRST`] to [`RECONNECT_MAX`]).
    down_since: Option<(std::time::Instant, std::time::Duration)>,
    /// Never connect again: the connection holds session state (the
    /// conductor's lease, `store::lease`) that a new one would not have.
    pinned: bool,
    /// Every write is fenced with this lease epoch ([`PgConn::fence_writes`]).
    fence: Option<super::lease::Fence>,
    /// The open transaction ran a write: its commit checks the fence.
    tx_wrote: bool,
}

/// The wait after a failed connect before the next attempt.
pub const RECONNECT_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest wait between connect attempts.
pub const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(8);
/// How long a connect may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Connects; the connection's I/O task runs on `rt` while it is driven.
fn pg_connect(
    rt: &tokio::runtime::Runtime,
    target: &PgTarget,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = target.config.clone();
    // A server that does not answer fails the connect in seconds, not at
    // the kernel's TCP timeout (minutes); a dead one is noticed by the
    // client's keepalives (the server's are the lease's, `store::lease`).
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
        .keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(10));
    // Each connection task ends when the client is dropped or the server
    // goes away; the client then reports itself closed.
    rt.block_on(async {
        match &target.tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                tokio::spawn(connection);
                Ok(client)
            }
            None => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                Ok(client)
            }
        }
    })
}

impl PgState {
    /// The client, connected anew if it was lost (not inside a transaction).
    fn ensure(&mut self) -> Result<(), StoreError> {
        if self
            .client
            .as_ref()
            .is_some_and(tokio_postgres::Client::is_closed)
        {
            self.client = None;
        }
        if self.client.is_none() {
            if self.pinned {
                return Err(StoreError::PgPinnedLost);
            }
            if self.in_tx {
                self.tx_broken = true;
                return Err(StoreError::PgLostInTransaction);
            }
            // While the server is down, calls fail at once between
            // attempts (each may wait out the connect timeout), so callers
            // on the conductor's runtime thread are not held up each time.
            if let Some((at, wait)) = self.down_since {
                if at.elapsed() < wait {
                    return Err(StoreError::PgDown);
                }
            }
            self.statements.clear();
            match pg_connect(&self.rt, &self.target) {
                Ok(c) => {
                    self.client = Some(c);
                    self.down_since = None;
                }
                Err(e) => {
                    let wait = self
                        .down_since
                        .map_or(RECONNECT_FIRST, |(_, w)| (w * 2).min(RECONNECT_MAX));
                    self.down_since = Some((std::time::Instant::now(), wait));
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        let sql = pg_sql(sql);
        if let Some(st) = self.statements.get(&sql) {
            return Ok(st.clone());
        }
        self.ensure()?;
        let r = match &self.client {
            Some(c) => self.rt.block_on(c.prepare(&sql)),
            None => return Err(StoreError::PgLostInTransaction),
        };
        let st = self.check(r)?;
        self.statements.insert(sql, st.clone());
        Ok(st)
    }

    /// Passes a result on; an error that closed the connection drops it.
    fn check<T>(&mut self, r: Result<T, tokio_postgres::Error>) -> Result<T, StoreError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_closed()
                    || self
                        .client
                        .as_ref()
                        .is_some_and(tokio_postgres::Client::is_closed)
                {
                    self.client = None;
                    if self.in_tx {
                        self.tx_broken = true;
                    }
                }
                Err(e.into())
            }
        }
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        self.ensure()?;
        let st = self.statement(sql)?;
        let refs = pg_refs(params);
        let r = match &self.client {
            Some(c) => self.rt.block_on(c.execute(&st, &refs)),
            None => return Err(StoreError::PgLostInTransaction),
        };
        let n = self.check(r)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Every statement sent at once, then every answer read: one round
    /// trip for the lot instead of one each (tokio-postgres pipelines
    /// requests polled together). The first failure is returned; inside a
    /// transaction the server refuses the ones after it.
    fn execute_all(&mut self, ops: &[(&str, Vec<Value>)]) -> Result<Vec<usize>, StoreError> {
        self.ensure()?;
        let mut prepared = Vec::with_capacity(ops.len());
        for (sql, _) in ops {
            prepared.push(self.statement(sql)?);
        }
        let r = match &self.client {
            Some(c) => self.rt.block_on(futures_util::future::try_join_all(
                prepared
                    .iter()
                    .zip(ops)
                    .map(|(st, (_, params))| async move { c.execute(st, &pg_refs(params)).await }),
            )),
            None => return Err(StoreError::PgLostInTransaction),
        };
        let changed = self.check(r)?;
        Ok(changed
            .into_iter()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .collect())
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        self.ensure()?;
        let st = self.statement(sql)?;
        let refs = pg_refs(params);
        let r = match &self.client {
            Some(c) => self.rt.block_on(c.query(&st, &refs)),
            None => return Err(StoreError::PgLostInTransaction),
        };
        let rows = self.check(r)?;
        rows.iter().map(pg_row).collect()
    }

    fn begin(&mut self) -> Result<(), StoreError> {
        self.batch("BEGIN")?;
        self.in_tx = true;
        self.tx_broken = false;
        self.tx_wrote = false;
        Ok(())
    }

    /// Commits (after the fence check, when the transaction wrote on a
    /// fenced connection: failed, it rolls back) or rolls back.
    fn end(&mut self, commit: bool) -> Result<(), StoreError> {
        let r = if self.tx_broken {
            Err(StoreError::PgLostInTransaction)
        } else if commit && self.tx_wrote && self.fence.is_some() {
            match self.fence_check() {
                Ok(()) => self.batch("COMMIT"),
                Err(e) => {
                    let _ = self.batch("ROLLBACK");
                    Err(e)
                }
            }
        } else {
            self.batch(if commit { "COMMIT" } else { "ROLLBACK" })
        };
        self.in_tx = false;
        self.tx_broken = false;
        self.tx_wrote = false;
        r
    }

    /// The lease row still has this connection's fence epoch (taking its
    /// lock until the transaction ends: see [`super::lease::FENCE_SQL`]).
    fn fence_check(&mut self) -> Result<(), StoreError> {
        let epoch = self
            .fence
            .as_ref()
            .and_then(super::lease::Fence::epoch)
            .ok_or(StoreError::Fenced)?;
        match self.execute(super::lease::FENCE_SQL, &[Value::Int(epoch)])? {
            1 => Ok(()),
            _ => Err(StoreError::Fenced),
        }
    }

    /// Runs the write `f` fenced: unfenced without a fence; marked for the
    /// commit's check inside a transaction; else in a transaction of its
    /// own with the check first.
    fn fenced<T>(
        &mut self,
        f: impl FnOnce(&mut PgState) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.fence.is_none() {
            return f(self);
        }
        if self.in_tx {
            self.tx_wrote = true;
            return f(self);
        }
        self.begin()?;
        match self.fence_check().and_then(|()| f(self)) {
            Ok(v) => {
                // Checked in this transaction, the lease row locked until
                // it ends: the commit needs no second check.
                self.tx_wrote = false;
                self.end(true).map(|()| v)
            }
            Err(e) => {
                let _ = self.end(false);
                Err(e)
            }
        }
    }

    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.ensure()?;
        let r = match &self.client {
            Some(c) => self.rt.block_on(c.batch_execute(sql)),
            None => return Err(StoreError::PgLostInTransaction),
        };
        self.check(r)
    }
}

fn pg_refs(params: &[Value]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    use tokio_postgres::types::Type;
    let mut vals = Vec::with_capacity(r.len());
    for (idx, col) in r.columns().iter().enumerate() {
        let ty = col.type_();
        let v = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(idx)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(idx)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(idx)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(idx)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *ty == Type::FLOAT8 {
            r.try_get::<_, Option<f64>>(idx)?.map(Value::Real)
        } else if *ty == Type::FLOAT4 {
            r.try_get::<_, Option<f32>>(idx)?
                .map(|v| Value::Real(f64::from(v)))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(idx)?.map(Value::Blob)
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            r.try_get::<_, Option<String>>(idx)?.map(Value::Text)
        } else {
            return Err(StoreError::PgType {
                column: col.name().to_owned(),
                ty: ty.name().to_owned(),
            });
        };
        vals.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(vals))
}

impl tokio_postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => {
                if *ty == Type::INT8 {
                    v.to_sql(ty, out)
                } else if *ty == Type::INT4 {
                    i32::try_from(*v)?.to_sql(ty, out)
                } else if *ty == Type::INT2 {
                    i16::try_from(*v)?.to_sql(ty, out)
                } else if *ty == Type::BOOL {
                    (*v != 0).to_sql(ty, out)
                } else if *ty == Type::FLOAT8 {
                    // Only ever a small count or a duration in ms.
                    #[allow(clippy::cast_precision_loss)]
                    (*v as f64).to_sql(ty, out)
                } else {
                    Err(format!("an integer cannot be bound to a {ty} parameter").into())
                }
            }
            Value::Real(v) => v.to_sql(ty, out),
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        // Checked per value in `to_sql`, which names the mismatch.
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

impl PgConn {
    /// Connects to `url` (a libpq-style `postgres://` URL or key=value
    /// string) on a new thread; fails if the first connection does.
    pub fn connect(url: &str) -> Result<PgConn, StoreError> {
        PgConn::connect_with(url, false)
    }

    /// As [`PgConn::connect`], but a lost connection stays lost: every
    /// call fails with [`StoreError::PgPinnedLost`] (for session state such
    /// as an advisory lock, which a new connection would not hold).
    pub fn connect_pinned(url: &str) -> Result<PgConn, StoreError> {
        PgConn::connect_with(url, true)
    }

    fn connect_with(url: &str, pinned: bool) -> Result<PgConn, StoreError> {
        let shown = crate::config::redact_url(url);
        let target = PgTarget::parse(url).map_err(StoreError::PgSettings)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (first_tx, first_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                // Connected here, not on the caller's thread: this thread
                // drives the client's runtime, which may not be entered
                // from the conductor's.
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(source) => {
                        let _ = first_tx.send(Err(StoreError::DataDir {
                            path: "store-postgres runtime".into(),
                            source,
                        }));
                        return;
                    }
                };
                let client = match pg_connect(&rt, &target) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = first_tx.send(Err(StoreError::from(e)));
                        return;
                    }
                };
                let _ = first_tx.send(Ok(()));
                let mut state = PgState {
                    target,
                    rt,
                    client: Some(client),
                    statements: HashMap::new(),
                    in_tx: false,
                    tx_broken: false,
                    down_since: None,
                    pinned,
                    fence: None,
                    tx_wrote: false,
                };
                // Ends when the PgConn (the only sender) is dropped.
                while let Ok(job) = rx.recv() {
                    job(&mut state);
                }
            })
            .map_err(|source| StoreError::DataDir {
                path: "store-postgres thread".into(),
                source,
            })?;
        first_rx.recv().map_err(|_| StoreError::PgThreadGone)??;
        Ok(PgConn { jobs, shown })
    }

    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PgState) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.call_within(f, None)
    }

    /// As `call`, giving up after `limit` (the job may still run later).
    fn call_within<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PgState) -> Result<R, StoreError> + Send + 'static,
        limit: Option<std::time::Duration>,
    ) -> Result<R, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move |st| {
                let _ = tx.send(f(st));
            }))
            .map_err(|_| StoreError::PgThreadGone)?;
        match limit {
            None => rx.recv().map_err(|_| StoreError::PgThreadGone)?,
            Some(d) => match rx.recv_timeout(d) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => Err(StoreError::PgTimeout(d)),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::PgThreadGone),
            },
        }
    }

    /// A query's first column of its first row (`SELECT
    /// pg_try_advisory_lock(…)`), within `limit`.
    pub fn query_one_within<T: FromValue + Send + 'static>(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        limit: std::time::Duration,
    ) -> Result<T, StoreError> {
        self.call_within(
            move |st| {
                st.query(sql, &params)?
                    .first()
                    .ok_or(StoreError::NoRow)?
                    .get::<T>(0)
            },
            Some(limit),
        )
    }

    /// A query's first column of every row, within `limit`.
    pub fn query_column_within<T: FromValue + Send + 'static>(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        limit: std::time::Duration,
    ) -> Result<Vec<T>, StoreError> {
        self.call_within(
            move |st| {
                st.query(sql, &params)?
                    .iter()
                    .map(|r| r.get::<T>(0))
                    .collect()
            },
            Some(limit),
        )
    }

    /// Fences every write from now on ([`super::Store::fence_writes`]).
    pub fn fence_writes(&self, fence: super::lease::Fence) {
        // Only fails when the connection thread is gone, which every later
        // call reports.
        let _ = self.call(move |st| {
            st.fence = Some(fence);
            Ok(())
        });
    }

    fn check_write_fence(&self) -> Result<(), StoreError> {
        self.call(|st| {
            if st.fence.is_none() {
                return Ok(());
            }
            if st.in_tx {
                st.tx_wrote = true;
            }
            st.fence_check()
        })
    }

    fn execute(&self, sql: &str, params: Vec<Value>) -> Result<usize, StoreError> {
        let sql = sql.to_owned();
        self.call(move |st| st.fenced(|st| st.execute(&sql, &params)))
    }

    fn execute_all(&self, ops: Vec<(&'static str, Vec<Value>)>) -> Result<Vec<usize>, StoreError> {
        self.call(move |st| st.fenced(|st| st.execute_all(&ops)))
    }

    fn query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let sql = sql.to_owned();
        self.call(move |st| st.query(&sql, &params))
    }

    fn batch(&self, sql: String) -> Result<(), StoreError> {
        self.call(move |st| st.batch(&sql))
    }

    fn begin(&self) -> Result<(), StoreError> {
        self.call(PgState::begin)
    }

    fn end(&self, commit: bool) -> Result<(), StoreError> {
        self.call(move |st| st.end(commit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_types_for_postgres() {
        assert_eq!(
            pg_sql("SELECT a FROM t WHERE b = ?1 AND c > ?12 LIMIT ?2"),
            "SELECT a FROM t WHERE b = $1 AND c > $12 LIMIT $2"
        );
        assert_eq!(
            pg_ddl("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, v REAL, b BLOB, realm TEXT, x_INTEGER TEXT)"),
            "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL, v DOUBLE PRECISION, b BYTEA, realm TEXT, x_INTEGER TEXT)"
        );
    }

    #[test]
    fn sqlite_round_trips_every_kind_and_rolls_back_a_dropped_transaction() {
        let db = Db::Sqlite(rusqlite::Connection::open_in_memory().unwrap());
        db.batch("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB)")
            .unwrap();
        let none: Option<String> = None;
        db.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4)",
            params![-5_i64, 1.5_f64, "x", vec![0_u8, 255]],
        )
        .unwrap();
        db.execute(
            "INSERT INTO t VALUES (?1, NULL, ?2, NULL)",
            params![u32::MAX, none],
        )
        .unwrap();
        {
            let tx = db.begin().unwrap();
            tx.execute("DELETE FROM t", params![]).unwrap();
        }
        let rows = db
            .query_map("SELECT i, r, s, b FROM t ORDER BY i", params![], |r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<Option<f64>>(1)?,
                    r.get::<Option<String>>(2)?,
                    r.get::<Option<Vec<u8>>>(3)?,
                ))
            })
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (-5, Some(1.5), Some("x".into()), Some(vec![0, 255])),
                (i64::from(u32::MAX), None, None, None)
            ]
        );
        let e = db
            .query_row("SELECT s FROM t WHERE i = -5", params![], |r| {
                r.get::<i64>(0)
            })
            .unwrap_err();
        assert!(e.to_string().contains("column 0"), "{e}");
        assert!(matches!(
            db.query_row("SELECT i FROM t WHERE i = 7", params![], |r| r
                .get::<i64>(0)),
            Err(StoreError::NoRow)
        ));
    }
}
