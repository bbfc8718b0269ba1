//! Test-only helpers shared by the edge-worker's integration tests and the
//! end-to-end suite (`tests/`). std only.
//!
//! # Ports for processes that must be told one
//!
//! Mosquitto, a conductor's `--listen`, a container's host port or a
//! Python `http.server` are given a port before they bind it. The usual
//! trick (bind `:0`, read the port, close it) races with every other
//! `bind(:0)` and outgoing connection: the kernel may hand the released
//! port to the next one. Tests run in parallel, so that happened: a health
//! probe aimed at a port reserved for a Python server reached another
//! test's HTTP stand-in, which counted four unauthorised requests and
//! failed (CI, `install_manifest_fetches_verifies_and_never_starts`).
//!
//! [`free_port`] draws from below the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), which `bind(:0)` and
//! outgoing connections never use. What is left:
//! - another `free_port` caller drawing the same port before either binds
//!   it: ports handed out in this process are never handed out again, and
//!   each process starts at a random place in the ~22,000 candidates;
//! - a port some other program on the machine holds: checked by binding it
//!   (on `0.0.0.0` and `127.0.0.1`) before it is handed out.
//!
//! Limits: if the ephemeral range starts too low to leave
//! [`MIN_CANDIDATES`] ports above [`LOWEST`], or every candidate is taken,
//! it falls back to the bind `:0` trick (and its race).

pub mod leaks;
/// A real PostgreSQL server as a local process, for one test.
pub mod postgres;
pub mod reap;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The lowest port drawn: stays clear of the well-known and registered
/// ports most daemons use (node_exporter 9100, Prometheus 9090, …).
pub const LOWEST: u16 = 10_000;
/// Fewer candidates than this below the ephemeral range: use `bind(:0)`.
pub const MIN_CANDIDATES: u16 = 1_000;
/// Where Linux's ephemeral range starts by default, when `/proc` says nothing.
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;

/// A loopback TCP port that is free now and that no `bind(:0)` will be
/// given (module docs). UDP on the same number is not checked.
pub fn free_port() -> u16 {
    let high = ephemeral_low();
    if high < LOWEST.saturating_add(MIN_CANDIDATES) {
        return ephemeral_port();
    }
    let span = u64::from(high - LOWEST);
    let handed = handed_out();
    for _ in 0..span.min(4_096) {
        // `% span` keeps it below `high - LOWEST`, so the sum fits in u16.
        let port = LOWEST + u16::try_from(next_random() % span).unwrap_or(0);
        // A poisoned lock only means another test panicked mid-insert: the
        // set is still a valid set.
        let mut taken = handed.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&port) || !bindable(port) {
            continue;
        }
        taken.insert(port);
        return port;
    }
    ephemeral_port()
}

/// Both the wildcard and the loopback address can be bound on `port`.
fn bindable(port: u16) -> bool {
    TcpListener::bind(("0.0.0.0", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

/// The bind `:0` trick; 0 if even that fails (the caller's bind then fails
/// with a clear error of its own).
fn ephemeral_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static HANDED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    HANDED.get_or_init(Default::default)
}

/// A fresh pseudo-random number: std's per-process random hasher keys,
/// over a counter (no `rand` dependency for a test helper).
fn next_random() -> u64 {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = SEED.get_or_init(RandomState::new).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_bindable_and_never_repeated() {
        let high = ephemeral_low();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        for &p in &ports {
            assert!((LOWEST..high).contains(&p), "{p} not in {LOWEST}..{high}");
        }
        // Bindable on loopback right after it is handed out.
        let p = free_port();
        TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn a_held_port_is_never_handed_out() {
        // Hold 300 ports of the drawable range; none comes back.
        let held: Vec<TcpListener> = (0..300)
            .filter_map(|i| TcpListener::bind(("127.0.0.1", LOWEST + 7 * i)).ok())
            .collect();
        let held_ports: HashSet<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        for _ in 0..500 {
            let p = free_port();
            assert!(!held_ports.contains(&p), "{p} is held");
        }
    }

    #[test]
    fn bind_zero_never_gets_a_drawn_port() {
        let high = ephemeral_low();
        for _ in 0..200 {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            assert!(l.local_addr().unwrap().port() >= high);
        }
    }
}
