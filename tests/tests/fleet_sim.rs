//! Smoke test of the fleet simulator bench (`src/bin/fleet_sim.rs`): 50
//! simulated workers at a 1 s interval against a real conductor with its
//! embedded broker, for an 8 s window. Every frame sent must be accepted,
//! all 50 must be online, Ping commands must be answered, and vanished
//! workers must be seen offline.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn fifty_simulated_workers_lose_no_frame_and_answer_pings() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fleet_sim.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet_sim"))
        .args([
            "--workers",
            "50",
            "--interval-s",
            "1",
            "--duration-s",
            "8",
            "--broker",
            "embedded",
            "--vanish",
            "5",
            "--enrol-threads",
            "8",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run fleet_sim");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}\nfleet_sim ran {took:.1?}");
    assert!(out.status.success(), "fleet_sim failed: {}", out.status);

    let results: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &results[0];
    assert_eq!(r["workers"], 50, "{r:#}");
    assert_eq!(r["enrol_failed"], 0, "{r:#}");
    assert!(r["online_s"].is_number(), "all 50 online: {r:#}");
    assert_eq!(r["online_at_window_end"], 50, "{r:#}");
    assert!(
        r["sent"].as_u64().unwrap() >= 50 * 8,
        "births + metrics: {r:#}"
    );
    assert_eq!(r["lost"], 0, "frames lost: {r:#}");
    assert_eq!(r["rejected"], 0, "{r:#}");
    assert!(
        r["cmd_rtt_ms"]["n"].as_u64().unwrap() >= 1,
        "a ping answered: {r:#}"
    );
    assert_eq!(
        r["cmd_rtt_ms"]["n"], r["cmd_sent"],
        "every ping answered: {r:#}"
    );
    assert!(
        r["ingest_ms"]["n"].as_u64().unwrap() > 0,
        "latency sampled: {r:#}"
    );
    assert_eq!(
        r["offline_drop_s"]["n"], 5,
        "dropped workers offline: {r:#}"
    );
    assert_eq!(
        r["offline_silent_s"]["n"], 5,
        "silent workers offline: {r:#}"
    );
    assert!(
        took < Duration::from_secs(90),
        "the smoke run should take well under a minute, took {took:?}"
    );
}
