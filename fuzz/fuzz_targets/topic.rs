//! The topic parser the conductor runs on every publish it receives
//! (`protocol::topic::Topic::parse`).
//!
//! Invariants: no panic; a parsed topic has a valid worker id and rebuilds
//! to exactly the input (`topic(parse(t)) == t`), so no two spellings reach
//! one worker and no wildcard (`+`, `#`) is ever taken as a worker id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::topic::{is_valid_worker_id, topic, Topic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(t) = Topic::parse(text) else {
        return;
    };
    assert!(is_valid_worker_id(t.worker_id));
    assert!(!t.worker_id.contains(['+', '#', '/']));
    assert_eq!(topic(t.worker_id, t.kind), text);
});
