//! The conductor's lease on a shared PostgreSQL store: one active conductor
//! per database, the others standing by.
//!
//! Several conductors may be started against one `--store postgres://…`
//! (on different hosts, with a broker they all reach: `--mqtt-url`). The
//! first to take the lease is active: it loads the fleet, serves the API
//! and the dashboard, ingests and runs every loop. The others wait
//! ([`Lease::wait`]), forwarding API requests to the active one meanwhile
//! (`http::forward`), and the first of them to get the lease when the
//! active one goes takes over (loading the fleet from the store as at any
//! start).
//!
//! The lease row also carries the holder's API URL (`api_url`, its
//! `--advertise-url`): written when the lease is taken
//! ([`Lease::record_url`] again once a listen port 0 is bound), read by the
//! waiting standbys on every poll ([`ActiveUrl`]).
//!
//! The lease is a session-level advisory lock (`pg_try_advisory_lock`)
//! held by a connection of its own that never reconnects
//! ([`super::sql::PgConn::connect_pinned`]): the server releases it when
//! that session ends, which is at once when the holder's process dies (its
//! socket closes), and after the session's TCP keepalives fail when the
//! holder's host or network does ([`KEEPALIVE`]: about 11 s).
//!
//! Fencing: the holder checks its lease every [`CHECK_EVERY`] with a query
//! that must answer within [`CHECK_WITHIN`]; when it fails, the conductor
//! stops (`ConductorError::LeaseLost`; a supervisor restarts it, as a
//! standby). A holder cut off from the database therefore stops within
//! `CHECK_EVERY + CHECK_WITHIN` (4 s), before the server gives the lease
//! to another (≥ 11 s). Every write also checks the lease's epoch in its
//! own transaction ([`FENCE_SQL`], through [`Fence`]: the ingest writer's
//! batches and its retention sweeps, the main connection's writes), so a
//! holder whose process was frozen longer than that (a VM paused) writes
//! nothing after its successor took the lease.
//!
//! Limits: one active conductor per database (this is failover, not load
//! sharing); standbys poll every [`WAIT_POLL`], so a takeover takes up to
//! that plus the start-up (measured in the README).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::sql::{PgConn, Value};
use super::StoreError;

/// The advisory lock key of the lease: the ASCII bytes of "aerekosL".
pub const LEASE_LOCK: i64 = 0x6165_7265_6b6f_734c;
/// How often a standby tries to take the lease.
pub const WAIT_POLL: Duration = Duration::from_millis(500);
/// How often the holder checks it still holds the lease.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a check may take before the holder gives up.
pub const CHECK_WITHIN: Duration = Duration::from_secs(3);
/// The lease session's TCP keepalives (idle, interval, count): the server
/// drops a silent holder's session, and its lease, after ~5 + 2 × 3 s.
pub const KEEPALIVE: (u32, u32, u32) = (5, 2, 3);

/// The lease, held while this value lives.
#[derive(Debug)]
pub struct Lease {
    conn: PgConn,
    /// The epoch this holder set when it took the lease (one more than
    /// any earlier holder's).
    epoch: i64,
}

/// The fence check: changes the lease row (taking its lock until the
/// transaction ends) only while its epoch is `?1`, the writer's. A taker
/// bumps the epoch under the same row lock, so a transaction that ran this
/// and saw one row changed commits before any takeover.
pub const FENCE_SQL: &str = "UPDATE aerekos_lease SET epoch = epoch WHERE epoch = ?1";

/// The active conductor's API URL as the lease row last said, shared
/// between [`Lease::wait`] (which reads the row on every poll) and the
/// standby's forwarding threads. `None`: no holder has recorded one.
#[derive(Debug, Clone, Default)]
pub struct ActiveUrl {
    url: Arc<RwLock<Option<String>>>,
    /// Set once [`Lease::wait`] read the row without taking the lease
    /// (another held it, or no broker node was reachable from here; never
    /// cleared): from then on this conductor is a standby until it returns.
    standing_by: Arc<AtomicBool>,
}

impl ActiveUrl {
    /// The URL last read.
    pub fn get(&self) -> Option<String> {
        self.url.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the URL (and marks this conductor a standby).
    pub fn set(&self, url: Option<String>) {
        *self.url.write().unwrap_or_else(|p| p.into_inner()) = url;
        self.standing_by.store(true, Ordering::SeqCst);
    }

    /// Whether [`Lease::wait`] has stood by (see the field).
    pub fn standing_by(&self) -> bool {
        self.standing_by.load(Ordering::SeqCst)
    }
}

/// The epoch the ingest writer fences its batches with, shared between
/// the conductor's lease handling and the writer's store. Positive: the
/// epoch of the lease held; 0: not held now (taking it again); -1: stopped
/// for good.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<AtomicI64>);

impl Fence {
    /// The epoch to write under, if the lease is held.
    pub fn epoch(&self) -> Option<i64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|e| *e > 0)
    }

    /// The lease is held with `epoch`.
    pub fn hold(&self, epoch: i64) {
        self.0.store(epoch, Ordering::SeqCst);
    }

    /// The lease is not held now: writes wait.
    pub fn suspend(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// The conductor stops: writes are dropped.
    pub fn stop(&self) {
        self.0.store(-1, Ordering::SeqCst);
    }

    /// [`Fence::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst) < 0
    }
}

impl Lease {
    /// Takes the lease, waiting while another conductor holds it, until
    /// `shutdown` resolves (then `None`). A database that cannot be reached
    /// is waited for too (logged every minute). One connection serves the
    /// whole wait; it is made again only after it failed.
    ///
    /// The lease is only taken while `ready()` (the bus reachable from
    /// here): a conductor cut off from the broker would lead a fleet it
    /// cannot hear.
    ///
    /// `api_url` goes into the lease row when it is taken; while this one
    /// stands by (another holds the lease, or the bus is unreachable), the
    /// recorded URL is read into `active` on every poll.
    pub async fn wait(
        url: &str,
        api_url: &str,
        active: &ActiveUrl,
        ready: impl Fn() -> bool,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Lease>, StoreError> {
        let mut said_standby = false;
        let mut said_cut_off = false;
        let mut said_down: Option<std::time::Instant> = None;
        let mut conn: Option<PgConn> = None;
        loop {
            if !ready() {
                if !said_cut_off {
                    tracing::warn!(
                        "standby: no MQTT broker node accepts a connection from here; not \
                         taking the store lease until one does"
                    );
                    said_cut_off = true;
                }
                // Standing by all the same: the API is forwarded to the
                // active one, if any.
                let c = match conn.take() {
                    Some(c) => Ok(c),
                    None => Lease::session(url),
                };
                match c.and_then(|c| active_url(&c).map(|u| (c, u))) {
                    Ok((c, u)) => {
                        active.set(u);
                        conn = Some(c);
                    }
                    Err(e) => tracing::debug!("reading the active conductor's URL: {e}"),
                }
                tokio::select! {
                    () = shutdown.as_mut() => return Ok(None),
                    () = tokio::time::sleep(WAIT_POLL) => {}
                }
                continue;
            }
            if said_cut_off {
                tracing::info!("a broker node accepts connections again");
                said_cut_off = false;
            }
            let attempt = match conn.take() {
                Some(c) => Ok(c),
                None => Lease::session(url),
            }
            .and_then(|c| Lease::take(c, api_url));
            match attempt {
                Ok(Ok(lease)) => {
                    if said_standby {
                        tracing::info!("lease taken: this conductor is now the active one");
                    }
                    return Ok(Some(lease));
                }
                Ok(Err(c)) => {
                    match active_url(&c) {
                        Ok(u) => {
                            active.set(u);
                            conn = Some(c);
                        }
                        // The connection is made again on the next poll.
                        Err(e) => tracing::debug!("reading the active conductor's URL: {e}"),
                    }
                    if !said_standby {
                        tracing::info!(
                            "standby: another conductor holds this store's lease; \
                             taking over when it goes"
                        );
                        said_standby = true;
                    }
                }
                Err(e)
                    if e.is_unavailable()
                        || matches!(e, StoreError::PgTimeout(_) | StoreError::PgPinnedLost) =>
                {
                    if said_down.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!("store unreachable while waiting for the lease: {e}");
                        said_down = Some(std::time::Instant::now());
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                () = shutdown.as_mut() => return Ok(None),
                () = tokio::time::sleep(WAIT_POLL) => {}
            }
        }
    }

    /// One attempt on a new connection: the lease, or `None` when another
    /// session holds it. `api_url` is recorded in the lease row as the
    /// holder's.
    pub fn try_take(url: &str, api_url: &str) -> Result<Option<Lease>, StoreError> {
        Ok(Lease::take(Lease::session(url)?, api_url)?.ok())
    }

    /// A pinned connection with the lease's keepalives (a partition
    /// owner's too: `worker_partitions`).
    pub(super) fn session(url: &str) -> Result<PgConn, StoreError> {
        let conn = PgConn::connect_pinned(url)?;
        let (idle, interval, count) = KEEPALIVE;
        conn.query_one_within::<bool>(
            "SELECT set_config('tcp_keepalives_idle', ?1, false) IS NOT NULL
                AND set_config('tcp_keepalives_interval', ?2, false) IS NOT NULL
                AND set_config('tcp_keepalives_count', ?3, false) IS NOT NULL",
            vec![
                Value::Text(idle.to_string()),
                Value::Text(interval.to_string()),
                Value::Text(count.to_string()),
            ],
            CHECK_WITHIN,
        )?;
        Ok(conn)
    }

    /// The lock on `conn`: the lease, or the connection back when another
    /// session holds it.
    fn take(conn: PgConn, api_url: &str) -> Result<Result<Lease, PgConn>, StoreError> {
        let got = conn.query_one_within::<bool>(
            "SELECT pg_try_advisory_lock(?1)",
            vec![Value::Int(LEASE_LOCK)],
            CHECK_WITHIN,
        )?;
        if !got {
            return Ok(Err(conn));
        }
        let epoch = conn.query_one_within::<i64>(
            "UPDATE aerekos_lease SET epoch = epoch + 1, api_url = ?1 RETURNING epoch",
            vec![Value::Text(api_url.to_owned())],
            CHECK_WITHIN,
        )?;
        Ok(Ok(Lease { conn, epoch }))
    }

    /// Records `api_url` as the holder's in the lease row (the URL taken
    /// with a listen port 0, once the port is bound). Blocks the caller.
    pub fn record_url(&self, api_url: &str) -> Result<(), StoreError> {
        self.conn.query_one_within::<i64>(
            "UPDATE aerekos_lease SET api_url = ?1 WHERE epoch = ?2 RETURNING epoch",
            vec![Value::Text(api_url.to_owned()), Value::Int(self.epoch)],
            CHECK_WITHIN,
        )?;
        Ok(())
    }

    /// The epoch this holder writes under.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Whether the lease is still held: its session answers, within
    /// [`CHECK_WITHIN`], that it holds the lock. Blocks the caller.
    pub fn check(&self) -> Result<(), StoreError> {
        check(&self.conn)
    }

    /// Resolves with the reason when the lease is lost (checked every
    /// [`CHECK_EVERY`], on the blocking pool: a database that does not
    /// answer holds up no task).
    pub async fn lost(&self) -> StoreError {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let conn = self.conn.clone();
            let r = tokio::task::spawn_blocking(move || check(&conn))
                .await
                .unwrap_or(Err(StoreError::PgThreadGone));
            if let Err(e) = r {
                return e;
            }
        }
    }

    /// [`Lease::try_take`] on the blocking pool.
    pub async fn try_take_async(url: &str, api_url: &str) -> Result<Option<Lease>, StoreError> {
        let (url, api_url) = (url.to_owned(), api_url.to_owned());
        tokio::task::spawn_blocking(move || Lease::try_take(&url, &api_url))
            .await
            .unwrap_or(Err(StoreError::PgThreadGone))
    }
}

/// The API URL the lease row records (`None`: none, or empty).
fn active_url(conn: &PgConn) -> Result<Option<String>, StoreError> {
    let u = conn.query_one_within::<String>(
        "SELECT COALESCE(api_url, '') FROM aerekos_lease",
        Vec::new(),
        CHECK_WITHIN,
    )?;
    Ok(Some(u).filter(|u| !u.is_empty()))
}

/// The session of `conn` holds the lease lock.
fn check(conn: &PgConn) -> Result<(), StoreError> {
    let held = conn.query_one_within::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
            AND pid = pg_backend_pid() AND granted
            AND ((classid::bigint << 32) | objid::bigint) = ?1)",
        vec![Value::Int(LEASE_LOCK)],
        CHECK_WITHIN,
    )?;
    if held {
        Ok(())
    } else {
        Err(StoreError::PgPinnedLost)
    }
}
