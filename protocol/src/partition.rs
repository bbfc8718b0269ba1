//! Which partition a worker's frames belong to, when several active
//! conductors share a fleet on a NATS cluster (each handles the frames of
//! the partitions it owns).
//!
//! The partition is not computed by the conductors or the agents but by
//! the NATS servers: the fleet account carries *subject mappings*
//! (`conductor nats-auth --partitions N`) that move every frame a worker
//! publishes on `aerekos/v1/<id>/<leaf>` to
//! `aerekos/v1/part/<n>/<id>/<leaf>` ([`crate::topic::partitioned_topic`]),
//! with `n` NATS's `{{partition(N,1)}}` of the worker id. [`partition_of`]
//! is that same function, so a conductor (and the tests) can tell which
//! partition, and thus which conductor, a worker's frames go to without
//! asking the bus. If the two ever disagreed, a conductor would subscribe
//! to a partition its workers' frames never reach: the golden values in
//! the tests below were read off nats-server 2.15.1.
//!
//! Limits: a partition count is `1..=`[`MAX_PARTITIONS`] (0 is not one:
//! [`partition_of`] answers 0 for it rather than dividing by zero); a
//! worker's partition depends on its id and the count only, so changing
//! the count moves most workers to another partition (re-sign the account
//! and restart the conductors together).

/// The partition count a fleet is set up with unless told otherwise: a
/// few conductors each own several partitions, and ownership moves in
/// small steps when one joins or leaves.
pub const DEFAULT_PARTITIONS: u16 = 64;

/// The largest partition count: each partition is one subscription per
/// conductor that owns it, and one mapping evaluation per frame on every
/// NATS node.
pub const MAX_PARTITIONS: u16 = 1024;

/// FNV-1a, 32 bits: offset basis.
const FNV_OFFSET: u32 = 0x811c_9dc5;
/// FNV-1a, 32 bits: prime.
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a 32-bit hash of `bytes` (Go's `hash/fnv` `New32a`).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition of `worker_id` among `partitions`: FNV-1a 32-bit of the
/// id's bytes modulo `partitions`, which is NATS's subject-mapping
/// function `{{partition(partitions,1)}}` applied to a topic whose worker
/// id is the first wildcard (the module docs say why it must be the same).
///
/// `partitions` 0 is no partition count: the answer is 0 (never a panic).
/// Otherwise the answer is below `partitions`.
pub fn partition_of(worker_id: &str, partitions: u16) -> u16 {
    if partitions == 0 {
        return 0;
    }
    let rem = fnv1a32(worker_id.as_bytes()) % u32::from(partitions);
    // The remainder is below `partitions`, a u16.
    u16::try_from(rem).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read off nats-server 2.15.1: a mapping `{{partition(64,1)}}` moved
    /// each id's MQTT publish to these partitions.
    #[test]
    fn partitions_are_those_nats_computes() {
        for (id, n) in [
            ("w-1", 16),
            ("w-2", 9),
            ("alpha", 43),
            ("pi-0042", 19),
            ("abc", 11),
        ] {
            assert_eq!(partition_of(id, 64), n, "{id}");
        }
        // At 8 partitions (a divisor of 64): the same modulo 8, as NATS
        // mapped w-1 at partition(8,1).
        assert_eq!(partition_of("w-1", 8), 0);
        assert_eq!(partition_of("w-2", 8), 1);
    }

    #[test]
    fn fnv1a32_check_values() {
        // The published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn every_count_answers_below_itself_and_zero_does_not_panic() {
        assert_eq!(partition_of("w-1", 0), 0);
        assert_eq!(partition_of("", 0), 0);
        for p in [1, 2, 7, DEFAULT_PARTITIONS, MAX_PARTITIONS, u16::MAX] {
            for id in [
                "",
                "w-1",
                "w-0123456789ab",
                "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
            ] {
                assert!(partition_of(id, p) < p, "{id} {p}");
            }
        }
        assert_eq!(partition_of("w-1", 1), 0);
    }
}
