//! Ownership of the workers' partitions among several active conductors
//! (`store::worker_partitions`), against a real PostgreSQL server: shares
//! even out as conductors join, a conductor that goes leaves its
//! partitions to the others with new fencing epochs, no partition ever has
//! two owners, and a conductor with another partition count is refused.
#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeSet;

use conductor::store::worker_partitions::{WorkerPartitions, FENCE_SQL};
use conductor::store::{Store, StoreError};

const P: u16 = 16;

/// One rebalancing round over `members`, as each conductor will run it:
/// first every one gives back its surplus, then every one claims.
fn rebalance(members: &mut [&mut WorkerPartitions]) {
    for m in members.iter_mut() {
        for p in m.surplus().unwrap() {
            m.release(p).unwrap();
        }
    }
    for m in members.iter_mut() {
        m.claim().unwrap();
    }
}

/// Every partition has exactly one owner among `members`; their shares,
/// sorted.
fn owned_once(members: &[&WorkerPartitions]) -> Vec<usize> {
    let mut all = BTreeSet::new();
    for m in members {
        for p in m.held().keys() {
            assert!(all.insert(*p), "partition {p} owned twice");
        }
    }
    assert_eq!(
        all,
        (0..P).collect::<BTreeSet<u16>>(),
        "every partition owned"
    );
    let mut shares: Vec<usize> = members.iter().map(|m| m.held().len()).collect();
    shares.sort_unstable();
    shares
}

/// The fence check with `(partition, epoch)` on a store connection: 1
/// when the epoch is the partition's current one.
fn fence(pg: &test_support::postgres::Postgres, db: &str, p: u16, epoch: i64) -> String {
    pg.psql(
        db,
        &format!(
            "WITH f AS ({} RETURNING 1) SELECT count(*) FROM f",
            FENCE_SQL
                .replace("?1", &p.to_string())
                .replace("?2", &epoch.to_string())
        ),
    )
}

/// A PostgreSQL server with a migrated store in database `db` (`None`:
/// PostgreSQL is not installed), and the store's URL.
fn store(db: &str) -> Option<(test_support::postgres::Postgres, String)> {
    let pg = test_support::postgres::Postgres::start()?;
    let url = pg.create_database(db);
    drop(Store::open_postgres(&url).unwrap());
    Some((pg, url))
}

#[test]
fn shares_even_out_and_a_conductor_that_goes_leaves_its_partitions_with_new_epochs() {
    let db = "shares";
    let Some((pg, url)) = store(db) else {
        return;
    };

    let mut a = WorkerPartitions::join(&url, P, "https://a.test:3000").unwrap();
    assert_eq!(a.count(), P);
    assert!(a.held().is_empty(), "joining owns nothing");
    let taken = a.claim().unwrap();
    assert_eq!(taken.len(), usize::from(P), "alone, it owns them all");
    assert!(taken.iter().all(|(_, e)| *e == 1), "{taken:?}");
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*) FROM aerekos_partition WHERE owner = 'https://a.test:3000'"
        ),
        P.to_string()
    );

    // A second conductor: nothing is taken from a live owner until it
    // gives its surplus back.
    let mut b = WorkerPartitions::join(&url, P, "https://b.test:3000").unwrap();
    assert!(b.claim().unwrap().is_empty(), "everything is owned");
    assert_eq!(a.surplus().unwrap().len(), usize::from(P / 2));
    rebalance(&mut [&mut a, &mut b]);
    assert_eq!(owned_once(&[&a, &b]), vec![8, 8]);
    assert!(b.held().values().all(|e| *e == 2), "taken a second time");
    // A released partition's row names no one until it is taken.
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*) FROM aerekos_partition WHERE owner = 'https://b.test:3000'"
        ),
        "8"
    );

    // A third: 6, 5 and 5, in one round.
    let mut c = WorkerPartitions::join(&url, P, "https://c.test:3000").unwrap();
    rebalance(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(owned_once(&[&a, &b, &c]), vec![5, 5, 6]);
    // Another round changes nothing: no partition moves back and forth.
    let before: Vec<_> = [&a, &b, &c].iter().map(|m| m.held().clone()).collect();
    rebalance(&mut [&mut a, &mut b, &mut c]);
    let after: Vec<_> = [&a, &b, &c].iter().map(|m| m.held().clone()).collect();
    assert_eq!(before, after, "stable");
    for m in [&a, &b, &c] {
        m.check().unwrap();
    }

    // c goes (its process dies: the server ends its session). Its
    // partitions go to a and b with new epochs; c's epochs no longer fence.
    let (gone, gone_epochs): (Vec<u16>, Vec<i64>) = c.held().iter().map(|(p, e)| (*p, *e)).unzip();
    let (p0, e0) = (gone[0], gone_epochs[0]);
    assert_eq!(
        fence(&pg, db, p0, e0),
        "1",
        "c's epoch fences while c owns it"
    );
    drop(c);
    let mut rounds = 0;
    while a.held().len() + b.held().len() < usize::from(P) {
        rounds += 1;
        assert!(rounds < 50, "c's partitions were never taken over");
        std::thread::sleep(std::time::Duration::from_millis(100));
        rebalance(&mut [&mut a, &mut b]);
    }
    assert_eq!(owned_once(&[&a, &b]), vec![8, 8]);
    for (p, old) in gone.iter().zip(&gone_epochs) {
        let new = a
            .held()
            .get(p)
            .or_else(|| b.held().get(p))
            .copied()
            .unwrap();
        assert_eq!(new, old + 1, "partition {p}");
    }
    assert_eq!(fence(&pg, db, p0, e0), "0", "c's epoch is stale");
    assert_eq!(fence(&pg, db, p0, e0 + 1), "1");
}

#[test]
fn conductors_joining_at_once_share_every_partition_once() {
    let Some((_pg, url)) = store("together") else {
        return;
    };
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut m = WorkerPartitions::join(&url, P, &format!("https://{k}.test")).unwrap();
                barrier.wait();
                // Rounds until every share is met (each member sees all
                // four joined: the barrier), then a few more.
                for _ in 0..30 {
                    for p in m.surplus().unwrap() {
                        m.release(p).unwrap();
                    }
                    m.claim().unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                barrier.wait();
                let held = m.held().clone();
                // Held until all have reported.
                barrier.wait();
                held
            })
        })
        .collect();
    let held: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut all = BTreeSet::new();
    for h in &held {
        for p in h.keys() {
            assert!(all.insert(*p), "partition {p} owned twice: {held:?}");
        }
    }
    assert_eq!(all.len(), usize::from(P), "{held:?}");
    assert!(held.iter().all(|h| h.len() == 4), "{held:?}");
}

#[test]
fn a_conductor_given_another_partition_count_is_refused() {
    let Some((_pg, url)) = store("count") else {
        return;
    };
    let _first = WorkerPartitions::join(&url, P, "https://a.test").unwrap();
    let err = WorkerPartitions::join(&url, 8, "https://b.test").unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::PartitionCount {
                stored: 16,
                given: 8
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("16") && text.contains('8'), "{text}");
    assert!(matches!(
        WorkerPartitions::join(&url, 0, "https://b.test").unwrap_err(),
        StoreError::PartitionCount { given: 0, .. }
    ));
    assert!(matches!(
        WorkerPartitions::join(&url, 1025, "https://b.test").unwrap_err(),
        StoreError::PartitionCount { given: 1025, .. }
    ));
}
