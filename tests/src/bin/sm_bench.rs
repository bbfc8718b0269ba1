//! PUT/GET throughput of storage-manager over loopback with our S3 client,
//! for 1 MiB and 32 MiB objects, with encryption at rest on (data keys from
//! an in-process key-manager over loopback HTTP) and off, against a
//! baseline measured in the same run on the same disk: writing the same
//! bytes to a file with `fsync` + rename + directory `fsync` (what a PUT
//! must do to be durable), and reading the file back.
//!
//! `cargo run --release -p aerekos-e2e --bin sm_bench [-- --mib 256]`
//!
//! `--mib` is the data moved per cell (default 128 MiB). PUTs stream with
//! `UNSIGNED-PAYLOAD` and an MD5 check ([`S3Client::put_object`]); GETs read
//! what the page cache holds, like the baseline's read-back.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use storage_manager::{Credentials, S3Client};

#[path = "../sm_harness.rs"]
mod sm_harness;
use sm_harness::{mbps, start_key_manager, start_storage_manager, AKID, SECRET};

/// Baseline: write+fsync+rename+dir fsync `count` files of `data`, then read them back.
fn baseline(dir: &Path, data: &[u8], count: usize) -> std::io::Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    for i in 0..count {
        let tmp = dir.join(format!(".{i}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(format!("{i}")))?;
        std::fs::File::open(dir)?.sync_all()?;
    }
    let put = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..count {
        let mut f = std::fs::File::open(dir.join(format!("{i}")))?;
        while f.read(&mut buf)? > 0 {}
    }
    let get = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok((put, get))
}

fn run_cell(
    client: &S3Client,
    bucket: &str,
    data: &[u8],
    count: usize,
) -> Result<(f64, f64), String> {
    let t = Instant::now();
    for i in 0..count {
        client
            .put_object(bucket, &format!("o{i}"), data, data.len() as u64)
            .map_err(|e| e.to_string())?;
    }
    let put = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut sink = std::io::sink();
    for i in 0..count {
        let n = client
            .get_object(bucket, &format!("o{i}"), &mut sink)
            .map_err(|e| e.to_string())?;
        if n != data.len() as u64 {
            return Err(format!("GET returned {n} bytes"));
        }
    }
    let get = t.elapsed().as_secs_f64();
    for i in 0..count {
        client
            .delete_object(bucket, &format!("o{i}"))
            .map_err(|e| e.to_string())?;
    }
    Ok((put, get))
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("sm_bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let root = std::env::temp_dir().join(format!("sm-bench-{}", std::process::id()));
    let e = |e: &dyn std::fmt::Display| e.to_string();

    // key-manager in process, served over loopback HTTP like in production.
    let (km_server, km_url) = start_key_manager(&root.join("km"))?;

    println!(
        "storage-manager bench: {mib} MiB per cell, loopback, {} cores, data in {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        root.display()
    );
    println!(
        "{:<8} {:<10} {:>10} {:>10} {:>12} {:>12} {:>9} {:>9}",
        "object",
        "mode",
        "PUT MB/s",
        "GET MB/s",
        "base W MB/s",
        "base R MB/s",
        "PUT/base",
        "GET/base"
    );
    for size_mib in [1usize, 32] {
        let size = size_mib << 20;
        let count = (mib / size_mib).max(2);
        // Truncation intended: a byte pattern from the index's low bits.
        #[allow(clippy::cast_possible_truncation)]
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4099) as u8).collect();
        let (bw, br) = baseline(&root.join("baseline"), &data, count).map_err(|x| e(&x))?;
        let total = (size * count) as u64;
        for encrypted in [false, true] {
            let dir = root.join(if encrypted { "enc" } else { "plain" });
            let server = start_storage_manager(&dir, encrypted.then_some(km_url.as_str()), 4)?;
            let client = S3Client::new(
                &format!("http://{}", server.addr()),
                Credentials::new(AKID, SECRET),
            )
            .map_err(|x| e(&x))?;
            client.create_bucket("bench").map_err(|x| e(&x))?;
            let (put, get) = run_cell(&client, "bench", &data, count)?;
            println!(
                "{:<8} {:<10} {:>10.0} {:>10.0} {:>12.0} {:>12.0} {:>9.2} {:>9.2}",
                format!("{size_mib} MiB"),
                if encrypted { "encrypted" } else { "plain" },
                mbps(total, put),
                mbps(total, get),
                mbps(total, bw),
                mbps(total, br),
                bw / put,
                br / get
            );
            drop(server);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    drop(km_server);
    let _ = std::fs::remove_dir_all(&root);
    println!("PUT/base and GET/base: storage-manager throughput divided by the baseline's (1.00 = as fast as the bare file system).");
    Ok(())
}
