//! Which conductor handles which workers, when several are active on one
//! PostgreSQL store (issue 19's scale-out; the design is in
//! `docs/scale-out.md`, "Next: several active conductors").
//!
//! The fleet's workers are split into a fixed number of partitions (`P`,
//! [`protocol::partition::partition_of`]: NATS's `partition()` of the
//! worker id, so the bus can route a worker's frames to its partition's
//! subject). Each partition has one owner at a time, which alone ingests
//! its workers' frames and holds their per-worker state (replay windows,
//! command sequence numbers, liveness) in memory. This module only decides
//! ownership; the conductor's ingest by partition is not built yet.
//!
//! - **Ownership is a session-level advisory lock**, as the store lease is
//!   ([`super::lease`]): key `(PARTITION_LOCKS, p)`, held by the member's
//!   pinned connection with the lease's TCP keepalives. The server releases
//!   every lock of a conductor at once when its process dies (its socket
//!   closes), or ~11 s after its host or network goes silent. Two
//!   conductors never hold one partition: the server grants the lock once.
//! - **Members.** Every joined conductor holds a member lock `(MEMBER_LOCKS,
//!   k)` with a random `k`; the live members are read from `pg_locks`, so
//!   a dead one leaves the count when its session ends, with no row to
//!   clean up. Ranked by `k`, the first `P mod n` members' fair share is
//!   `⌈P / n⌉`, the others' `⌊P / n⌋`.
//! - **Moving partitions.** A conductor above its share gives the surplus
//!   back ([`WorkerPartitions::surplus`], then [`WorkerPartitions::release`]
//!   once it stopped handling them); one below it takes free partitions
//!   ([`WorkerPartitions::claim`]), starting from a point that depends on
//!   its rank, so members joining together rarely try the same ones. A
//!   partition is only ever taken when free: nothing is taken from a live
//!   owner.
//! - **Fencing.** Taking partition `p` bumps its epoch in
//!   `aerekos_partition`; a write for `p`'s workers checks it in its own
//!   transaction ([`FENCE_SQL`]), so an owner frozen past its session's end
//!   writes nothing behind its successor, as with the lease's epoch.
//! - **The count `P`** is the store's: the first conductor to join writes
//!   the rows; one given another count is refused
//!   ([`StoreError::PartitionCount`]), since conductors disagreeing on `P`
//!   would each handle workers the other one owns.
//!
//! Limits: one round trip per attempted lock, and a conductor rebalances
//! when its caller calls (no background task here); `P` is fixed for the
//! life of the store (at most [`MAX_PARTITIONS`]).

use std::collections::{BTreeMap, BTreeSet};

use super::lease::{Lease, CHECK_WITHIN};
use super::sql::{PgConn, Value};
use super::StoreError;

/// The first key of partition locks: the ASCII bytes of "aePt".
pub const PARTITION_LOCKS: i64 = 0x6165_5074;
/// The first key of member locks: the ASCII bytes of "aeMb".
pub const MEMBER_LOCKS: i64 = 0x6165_4d62;
/// The most partitions a store may be split into.
pub const MAX_PARTITIONS: u16 = 1024;

/// The fence check of a write for partition `?1`'s workers: changes the
/// partition's row (locking it until the transaction ends) only while its
/// epoch is `?2`, the writer's; a taker bumps the epoch under the same row
/// lock.
pub const FENCE_SQL: &str =
    "UPDATE aerekos_partition SET epoch = epoch WHERE partition = ?1 AND epoch = ?2";

/// The pg_locks rows of this database's advisory locks with first key
/// `?1` (two-key locks: `objsubid = 2`, the second key in `objid`).
const LOCKS_OF: &str = "SELECT objid::bigint FROM pg_locks
     WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = ?1
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
     ORDER BY 1";

/// A conductor's membership and the partitions it owns, held while this
/// value lives (dropping it ends the session, releasing every lock).
#[derive(Debug)]
pub struct WorkerPartitions {
    /// The pinned session holding the member lock and every partition
    /// lock: never made again, since a new session would hold none.
    conn: PgConn,
    /// `P`, checked against the store's at join.
    count: u16,
    /// This member's lock key (`MEMBER_LOCKS`, `member`), unique among the
    /// live members (the lock is granted once); its rank among theirs
    /// decides its share.
    member: i64,
    /// What `aerekos_partition.owner` says while this member owns a
    /// partition (its API URL).
    owner: String,
    /// The partitions held, with the epoch set when each was taken.
    held: BTreeMap<u16, i64>,
}

impl WorkerPartitions {
    /// Joins the members of the store at `url` as `owner` (its API URL),
    /// with the workers split into `count` partitions; owns none yet.
    pub fn join(url: &str, count: u16, owner: &str) -> Result<WorkerPartitions, StoreError> {
        if count == 0 || count > MAX_PARTITIONS {
            return Err(StoreError::PartitionCount {
                stored: 0,
                given: count,
            });
        }
        let conn = Lease::session(url)?;
        // The rows, by the first to join (two at once: the conflict makes
        // one insert nothing).
        conn.query_one_within::<i64>(
            "WITH made AS (
                INSERT INTO aerekos_partition (partition)
                SELECT generate_series(0, ?1::bigint - 1)
                WHERE NOT EXISTS (SELECT 1 FROM aerekos_partition)
                ON CONFLICT DO NOTHING RETURNING 1)
             SELECT count(*) FROM made",
            vec![Value::Int(i64::from(count))],
            CHECK_WITHIN,
        )?;
        let stored = conn.query_one_within::<i64>(
            "SELECT count(*) FROM aerekos_partition",
            Vec::new(),
            CHECK_WITHIN,
        )?;
        if stored != i64::from(count) {
            return Err(StoreError::PartitionCount {
                stored: u16::try_from(stored).unwrap_or(u16::MAX),
                given: count,
            });
        }
        let member = loop {
            let mut bytes = [0u8; 4];
            getrandom::fill(&mut bytes).map_err(|e| StoreError::PgSettings(e.to_string()))?;
            // A positive int4: pg_locks shows the key as an oid.
            let k = i64::from(u32::from_le_bytes(bytes) & 0x7fff_ffff);
            if lock(&conn, MEMBER_LOCKS, k)? {
                break k;
            }
        };
        Ok(WorkerPartitions {
            conn,
            count,
            member,
            owner: owner.to_owned(),
            held: BTreeMap::new(),
        })
    }

    /// `P`.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// The partitions held and the epoch each was taken with, by number.
    pub fn held(&self) -> &BTreeMap<u16, i64> {
        &self.held
    }

    /// This member's rank among the live members and their number.
    fn rank(&self) -> Result<(usize, usize), StoreError> {
        let members: Vec<i64> = self.conn.query_column_within(
            LOCKS_OF,
            vec![Value::Int(MEMBER_LOCKS)],
            CHECK_WITHIN,
        )?;
        let rank = members
            .iter()
            .position(|m| *m == self.member)
            .ok_or(StoreError::PgPinnedLost)?;
        Ok((rank, members.len()))
    }

    /// This member's fair share of the partitions now (module docs).
    pub fn share(&self) -> Result<u16, StoreError> {
        let (rank, n) = self.rank()?;
        Ok(share(self.count, rank, n))
    }

    /// The partitions held beyond the share, to give back once this
    /// conductor stopped handling them ([`WorkerPartitions::release`]):
    /// the highest-numbered.
    pub fn surplus(&self) -> Result<Vec<u16>, StoreError> {
        let share = usize::from(self.share()?);
        Ok(self
            .held
            .keys()
            .rev()
            .take(self.held.len().saturating_sub(share))
            .copied()
            .collect())
    }

    /// Gives partition `p` back: its row no longer names this conductor,
    /// and its lock is free for another to take.
    pub fn release(&mut self, p: u16) -> Result<(), StoreError> {
        let Some(epoch) = self.held.get(&p).copied() else {
            return Ok(());
        };
        self.conn.query_one_within::<i64>(
            "WITH r AS (UPDATE aerekos_partition SET owner = NULL
                WHERE partition = ?1 AND epoch = ?2 RETURNING 1)
             SELECT count(*) FROM r",
            vec![Value::Int(i64::from(p)), Value::Int(epoch)],
            CHECK_WITHIN,
        )?;
        let freed = self.conn.query_one_within::<bool>(
            "SELECT pg_advisory_unlock(?1::bigint::int4, ?2::bigint::int4)",
            vec![Value::Int(PARTITION_LOCKS), Value::Int(i64::from(p))],
            CHECK_WITHIN,
        )?;
        self.held.remove(&p);
        if freed {
            Ok(())
        } else {
            Err(StoreError::PgPinnedLost)
        }
    }

    /// Takes free partitions until this member holds its share; the ones
    /// taken, with their new epochs.
    pub fn claim(&mut self) -> Result<Vec<(u16, i64)>, StoreError> {
        let (rank, n) = self.rank()?;
        let share = usize::from(share(self.count, rank, n));
        let mut taken = Vec::new();
        if self.held.len() >= share {
            return Ok(taken);
        }
        let busy: BTreeSet<i64> = self
            .conn
            .query_column_within::<i64>(LOCKS_OF, vec![Value::Int(PARTITION_LOCKS)], CHECK_WITHIN)?
            .into_iter()
            .collect();
        let count = usize::from(self.count);
        let start = rank * count / n.max(1);
        for p in (start..start + count).map(|k| k % count) {
            if self.held.len() >= share {
                break;
            }
            // Below MAX_PARTITIONS: fits.
            let p = u16::try_from(p).unwrap_or(u16::MAX);
            if busy.contains(&i64::from(p)) || !lock(&self.conn, PARTITION_LOCKS, i64::from(p))? {
                continue;
            }
            let epoch = self.conn.query_one_within::<i64>(
                "UPDATE aerekos_partition SET epoch = epoch + 1, owner = ?2
                 WHERE partition = ?1 RETURNING epoch",
                vec![Value::Int(i64::from(p)), Value::Text(self.owner.clone())],
                CHECK_WITHIN,
            )?;
            self.held.insert(p, epoch);
            taken.push((p, epoch));
        }
        Ok(taken)
    }

    /// Whether this member's session still holds its member lock and every
    /// partition it owns (answering within [`CHECK_WITHIN`]).
    pub fn check(&self) -> Result<(), StoreError> {
        let mine: BTreeSet<i64> = self
            .conn
            .query_column_within::<i64>(
                "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2
                   AND pid = pg_backend_pid()",
                Vec::new(),
                CHECK_WITHIN,
            )?
            .into_iter()
            .collect();
        let key = |ns: i64, k: i64| (ns << 32) | k;
        let all_held = mine.contains(&key(MEMBER_LOCKS, self.member))
            && self
                .held
                .keys()
                .all(|p| mine.contains(&key(PARTITION_LOCKS, i64::from(*p))));
        if all_held {
            Ok(())
        } else {
            Err(StoreError::PgPinnedLost)
        }
    }
}

/// The share of member `rank` of `n`: `⌈P / n⌉` for the first `P mod n`,
/// `⌊P / n⌋` for the others (all `P` for a lone member).
fn share(count: u16, rank: usize, n: usize) -> u16 {
    let n = u16::try_from(n.max(1)).unwrap_or(u16::MAX);
    let extra = usize::from(count % n);
    count / n + u16::from(rank < extra)
}

/// `pg_try_advisory_lock(ns, k)` on the session.
fn lock(conn: &PgConn, ns: i64, k: i64) -> Result<bool, StoreError> {
    conn.query_one_within::<bool>(
        "SELECT pg_try_advisory_lock(?1::bigint::int4, ?2::bigint::int4)",
        vec![Value::Int(ns), Value::Int(k)],
        CHECK_WITHIN,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_one_at_most() {
        for count in [1u16, 7, 16, 64, MAX_PARTITIONS] {
            for n in 1..=9usize {
                let shares: Vec<u16> = (0..n).map(|r| share(count, r, n)).collect();
                assert_eq!(
                    shares.iter().map(|s| usize::from(*s)).sum::<usize>(),
                    usize::from(count),
                    "{count} over {n}"
                );
                let (lo, hi) = (shares.iter().min(), shares.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{shares:?}");
            }
        }
        assert_eq!(share(16, 0, 3), 6);
        assert_eq!(share(16, 2, 3), 5);
    }
}
