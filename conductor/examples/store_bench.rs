//! The ingest writer's ceiling per store engine: how many metrics frames a
//! second `Store::apply_batch` commits, on SQLite (the default, a file under
//! `target/`) and on PostgreSQL (a real server this bench starts, with
//! `fsync` on as in production), in the same run.
//!
//! ```sh
//! cargo run --release -p conductor --example store_bench [-- --frames 40000 --workers 1000]
//! ```
//!
//! Each frame is what the writer commits for an accepted metrics frame: its
//! raw row, its per-minute rollup upsert and its worker's replay window
//! (`WriteOp::Metrics` + `WriteOp::Seen`), in batches of
//! [`conductor::ingest::BATCH_MAX`] writes, one transaction each, as the
//! writer thread does under load. Frames are spread over `--workers`
//! workers and 10 s apart per worker, so the rollup upserts hit existing
//! minute rows as in a live fleet. Prints frames/s per engine and the
//! ratio PostgreSQL / SQLite. Needs PostgreSQL installed
//! (`sh tests/setup.sh`), else reports SQLite only.
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)] // a bench: a panic is its report

use std::time::Instant;

use conductor::store::{Rollup, Store, WorkerRow, WriteOp};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn worker(n: usize) -> WorkerRow {
    WorkerRow {
        id: format!("w-{n:012x}"),
        machine_id: format!("m-{n}"),
        hostname: format!("pi-{n}"),
        secret_hex: "00".repeat(32),
        mqtt_password_sha256: "x".into(),
        labels_json: "{}".into(),
        inventory_json: None,
        board_json: None,
        enrolled_at_ms: 1,
        last_seen_ms: None,
        last_ip: None,
        revoked: false,
        replay_highest: 0,
        replay_bitmap: 0,
        cmd_seq: 0,
        status: "online".into(),
    }
}

/// Frames/s committed into `store`.
fn run(store: &mut Store, frames: usize, workers: usize) -> f64 {
    for n in 0..workers {
        store.insert_worker(&worker(n)).unwrap();
    }
    let per_batch = conductor::ingest::BATCH_MAX / 2;
    let blob = vec![0x5a_u8; 180]; // a typical postcard Metrics frame
    let t0 = 1_800_000_000_000_u64;
    let started = Instant::now();
    let mut done = 0;
    while done < frames {
        let mut ops = Vec::with_capacity(per_batch * 2);
        for k in done..(done + per_batch).min(frames) {
            let w = k % workers;
            let seq = (k / workers) as u64 + 1;
            let id = format!("w-{w:012x}");
            let at = t0 + seq * 10_000 + w as u64;
            ops.push(WriteOp::Metrics {
                worker_id: id.clone(),
                received_at_ms: at,
                seq,
                blob: blob.clone(),
                rollup: Rollup {
                    cpu: 1_234,
                    mem_used: 300 << 20,
                    mem_total: 1 << 30,
                    load1: 42,
                    temp_max: Some(48_000),
                    disk_used: 4 << 30,
                    disk_total: 32 << 30,
                    rx_bps: 1_000,
                    tx_bps: 2_000,
                },
            });
            ops.push(WriteOp::Seen {
                worker_id: id,
                highest: seq,
                bitmap: u64::MAX,
                last_seen_ms: at,
            });
        }
        done += ops.len() / 2;
        store.apply_batch(&ops).unwrap();
    }
    frames as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let frames = arg("--frames", 40_000);
    let workers = arg("--workers", 1_000);
    println!(
        "store_bench: {frames} frames over {workers} workers, {} writes per transaction",
        conductor::ingest::BATCH_MAX
    );
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = tempfile::Builder::new()
        .prefix("store-bench-")
        .tempdir_in(&target)
        .unwrap();
    let sqlite = run(&mut Store::open(dir.path()).unwrap(), frames, workers);
    println!("sqlite      {sqlite:>10.0} frames/s  (WAL, synchronous=NORMAL, on disk)");
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    pg.psql("postgres", "ALTER SYSTEM SET fsync = on");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let url = pg.create_database("bench");
    let postgres = run(&mut Store::open_postgres(&url).unwrap(), frames, workers);
    println!(
        "postgres    {postgres:>10.0} frames/s  (loopback TCP, fsync on, synchronous_commit on)"
    );
    println!("ratio postgres/sqlite: {:.2}", postgres / sqlite);
}
