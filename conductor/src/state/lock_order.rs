//! A mutex that knows its place in the conductor's lock order.
//!
//! The order ([`LockLevel`]): the worker map, then the store, then at most
//! one of the other ("leaf") locks. A thread may take a lock only while
//! every lock it already holds is of a strictly lower level, so two leaf
//! locks are never held together.
//!
//! Why this order: the paths that hold the worker map do the most under it
//! (ingest applies a whole frame, reconciliation seals every command) and
//! need the store inside it (a command's seq is persisted before it is
//! sent); the leaf maps are small, touched briefly, and their holders call
//! nothing that locks. With one order, two threads can never each wait for
//! the lock the other holds.
//!
//! [`OrderedMutex::lock`] recovers from poisoning (a panicked holder leaves
//! maps and counters that are still structurally valid). In builds with
//! `debug_assertions` it also keeps a thread-local record of the levels the
//! thread holds, and panics, naming both locks, when a lock would be taken
//! out of order; the conductor's tests and the end-to-end tests run debug
//! builds, so a violation on a path they exercise fails them. In release
//! builds it is a plain `Mutex::lock`: no thread-local, no record.
//!
//! Limits: the check is per thread and sees only the paths that run, so it
//! proves nothing about code no test reaches. It relies on guards never being
//! held across an `.await` (none are: the guards are `std` guards, `!Send`,
//! dropped before every `.await` of the async tasks, which share one
//! current-thread runtime): a guard held across one would be on the record
//! while another task on the same thread runs, and that task's locks would be
//! judged against it.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Where a lock sits in the order: a thread takes locks in increasing
/// level, never two of the same level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockLevel {
    /// The worker map: taken first.
    Workers,
    /// The store (the HTTP-side SQLite connection): after the worker map.
    Db,
    /// Everything else: after the worker map and the store, one at a time.
    Leaf,
}

/// A [`Mutex`] with a [`LockLevel`] and a name (for the panic message); in
/// release builds, just the mutex.
#[derive(Debug)]
pub struct OrderedMutex<T> {
    #[cfg(debug_assertions)]
    level: LockLevel,
    #[cfg(debug_assertions)]
    name: &'static str,
    inner: Mutex<T>,
}

impl<T> OrderedMutex<T> {
    /// `value` behind a lock of `level`, called `name` in messages.
    pub fn new(level: LockLevel, name: &'static str, value: T) -> OrderedMutex<T> {
        #[cfg(not(debug_assertions))]
        let _ = (level, name);
        OrderedMutex {
            #[cfg(debug_assertions)]
            level,
            #[cfg(debug_assertions)]
            name,
            inner: Mutex::new(value),
        }
    }

    /// Locks, recovering from poisoning. With `debug_assertions`: panics
    /// when this thread holds a lock of the same or a later level.
    pub fn lock(&self) -> OrderedGuard<'_, T> {
        #[cfg(debug_assertions)]
        let held = held::push(self.level, self.name);
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        OrderedGuard {
            guard,
            #[cfg(debug_assertions)]
            _held: held,
        }
    }
}

/// The guard of an [`OrderedMutex`]: derefs to the data; dropping it
/// unlocks (and takes the lock off the thread's record).
#[derive(Debug)]
pub struct OrderedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    #[cfg(debug_assertions)]
    _held: held::Held,
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// The thread-local record of held locks (debug builds only).
#[cfg(debug_assertions)]
mod held {
    use std::cell::RefCell;

    use super::LockLevel;

    thread_local! {
        /// Level and name of every lock this thread holds, in taking order.
        static HELD: RefCell<Vec<(LockLevel, &'static str)>> = const { RefCell::new(Vec::new()) };
    }

    /// One entry of the record; dropping it removes the entry.
    #[derive(Debug)]
    pub(super) struct Held {
        level: LockLevel,
        name: &'static str,
    }

    /// Checks that `level` comes after every held level, then records it.
    pub(super) fn push(level: LockLevel, name: &'static str) -> Held {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some((l, n)) = h.iter().find(|(l, _)| *l >= level) {
                let (l, n) = (*l, *n);
                drop(h);
                panic!(
                    "lock order violated: taking `{name}` ({level:?}) while holding `{n}` ({l:?}); \
                     the order is workers, then db, then one leaf lock at a time"
                );
            }
            h.push((level, name));
        });
        Held { level, name }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            // `try_with`: a guard dropped while the thread's locals are torn
            // down has nothing to update.
            let _ = HELD.try_with(|h| {
                let mut h = h.borrow_mut();
                if let Some(i) = h.iter().rposition(|e| *e == (self.level, self.name)) {
                    h.remove(i);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn locks() -> (
        OrderedMutex<u32>,
        OrderedMutex<u32>,
        OrderedMutex<u32>,
        OrderedMutex<u32>,
    ) {
        (
            OrderedMutex::new(LockLevel::Workers, "workers", 1),
            OrderedMutex::new(LockLevel::Db, "db", 2),
            OrderedMutex::new(LockLevel::Leaf, "service_status", 3),
            OrderedMutex::new(LockLevel::Leaf, "service_metrics", 4),
        )
    }

    #[test]
    fn in_order_acquisition_works() {
        let (w, d, s, _) = locks();
        let mut gw = w.lock();
        let gd = d.lock();
        let gs = s.lock();
        *gw += *gd + *gs;
        assert_eq!(*gw, 6);
        drop((gs, gd, gw));
        // Any single level, and any suffix of the order, alone.
        assert_eq!(*d.lock() + *s.lock(), 5);
        let _gw = w.lock();
        let _gs = s.lock();
    }

    #[test]
    fn a_dropped_guard_lets_a_lower_level_be_taken_again() {
        let (w, d, s, m) = locks();
        {
            let _gs = s.lock();
        }
        let _gw = w.lock();
        {
            let _gd = d.lock();
        }
        // Released out of taking order: the record follows.
        let gd = d.lock();
        let gs = s.lock();
        drop(gd);
        drop(gs);
        let _gm = m.lock();
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let (w, ..) = locks();
        let w = std::sync::Arc::new(w);
        let w2 = w.clone();
        let r = std::thread::spawn(move || {
            let mut g = w2.lock();
            *g = 7;
            panic!("holder panics");
        })
        .join();
        assert!(r.is_err());
        assert!(w.inner.is_poisoned());
        assert_eq!(*w.lock(), 7);
        // The panicking thread's record died with it; this one holds nothing.
        let _g = w.lock();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "taking `workers` (Workers) while holding `db` (Db)")]
    fn out_of_order_panics() {
        let (w, d, ..) = locks();
        let _gd = d.lock();
        let _gw = w.lock();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "taking `db` (Db) while holding `service_status` (Leaf)")]
    fn a_leaf_before_the_store_panics() {
        let (w, d, s, _) = locks();
        let _gw = w.lock();
        let _gs = s.lock();
        let _gd = d.lock();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(
        expected = "taking `service_metrics` (Leaf) while holding `service_status` (Leaf)"
    )]
    fn leaf_after_leaf_panics() {
        let (_, _, s, m) = locks();
        let _gs = s.lock();
        let _gm = m.lock();
    }

    #[cfg(debug_assertions)]
    #[test]
    fn a_refused_lock_is_not_recorded() {
        let (w, d, ..) = locks();
        let gd = d.lock();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _gw = w.lock();
        }));
        assert!(r.is_err());
        drop(gd);
        // Neither `db` (dropped) nor `workers` (refused) is on the record.
        let _gw = w.lock();
        let _gd = d.lock();
    }
}
