//! storage-manager driven by a real client, the AWS CLI: `aws s3 cp` of one
//! file (256 MiB by default) up and back down, with encryption at rest on
//! (data keys from a key-manager, both in this process over loopback, set
//! up by `sm_harness` as for `sm_bench`), next to a baseline measured in the
//! same run on the same disk: `cp` of the same file plus `fsync` of the copy
//! and of its directory (what a durable PUT must at least do), and `cp` of
//! that copy back (reading it, as the download writes its file).
//!
//! `cargo run --release -p aerekos-e2e --bin sm_client_bench [-- --mib 256 --runs 3 --plain]`
//!
//! The CLI runs with its defaults (8 MiB multipart parts, 10 concurrent
//! requests), signature v4, path-style, from a temp config directory, so
//! above 8 MiB a PUT is a multipart upload and a GET ranged GETs. Each
//! figure is the median of `--runs`; MB/s are MiB/s of the file's size and
//! include the CLI's start (about 0.4 s of Python). `--plain` adds a row
//! with encryption off. Goals: PUT ≥ 0.5 × cp+fsync, GET ≥ 0.8 × cp back.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[path = "../sm_harness.rs"]
mod sm_harness;
use sm_harness::{mbps, open_store, start_key_manager, start_storage_manager, AKID, SECRET};

fn main() {
    if let Err(e) = bench() {
        eprintln!("sm_client_bench: {e}");
        std::process::exit(1);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{name} takes a number")),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs `cmd`, failing with its output if it fails; returns the seconds taken.
fn timed(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(secs)
}

fn fsync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Baseline: `cp` + fsync of the copy and its directory; then `cp` of the
/// copy back. Seconds of each.
fn baseline(src: &Path, dir: &Path) -> Result<(f64, f64), String> {
    let e = |e: std::io::Error| e.to_string();
    std::fs::create_dir_all(dir).map_err(e)?;
    let copy = dir.join("copy.bin");
    let back = dir.join("back.bin");
    let t = Instant::now();
    timed(Command::new("cp").arg(src).arg(&copy))?;
    fsync(&copy).map_err(e)?;
    fsync(dir).map_err(e)?;
    let put = t.elapsed().as_secs_f64();
    let get = timed(Command::new("cp").arg(&copy).arg(&back))?;
    std::fs::remove_dir_all(dir).map_err(e)?;
    Ok((put, get))
}

/// Seconds of `Store::complete_upload` (no HTTP) for an encrypted object of
/// `mib` MiB in 8 MiB parts, as the CLI sends it: the part of a multipart
/// PUT that the format stores by reference.
fn completion(dir: &Path, km_url: &str, mib: usize) -> Result<f64, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let store = open_store(dir, Some(km_url))?;
    store.create_bucket("complete").map_err(|x| e(&x))?;
    let id = store
        .create_upload("complete", "k", None, Default::default())
        .map_err(|x| e(&x))?;
    let part: Vec<u8> = (0..8usize << 20)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let mut parts = Vec::new();
    for n in 1..=u32::try_from(mib.div_ceil(8)).map_err(|x| e(&x))? {
        let p = store
            .upload_part("complete", "k", &id, n, &mut &part[..], part.len() as u64)
            .map_err(|x| e(&x))?;
        parts.push((n, p.etag));
    }
    let t = Instant::now();
    store
        .complete_upload("complete", "k", &id, &parts)
        .map_err(|x| e(&x))?;
    let secs = t.elapsed().as_secs_f64();
    drop(store);
    std::fs::remove_dir_all(dir).map_err(|x| e(&x))?;
    Ok(secs)
}

/// Are the two files equal?
fn same_file(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The AWS CLI against `url`, configured by a file in `cfg_dir`.
struct Aws {
    url: String,
    config: PathBuf,
}

impl Aws {
    fn new(url: String, cfg_dir: &Path) -> Result<Aws, String> {
        let config = cfg_dir.join("config");
        std::fs::write(
            &config,
            "[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n    signature_version = s3v4\n",
        )
        .map_err(|e| e.to_string())?;
        Ok(Aws { url, config })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("aws");
        c.args(["--endpoint-url", self.url.as_str()])
            .args(args)
            .env("AWS_CONFIG_FILE", &self.config)
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.config.with_file_name("none"),
            )
            .env("AWS_ACCESS_KEY_ID", AKID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN");
        c
    }
}

fn bench() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = arg(&args, "--mib", 256)?;
    let runs: usize = arg(&args, "--runs", 3)?.max(1);
    let plain = args.iter().any(|a| a == "--plain");
    let e = |e: std::io::Error| e.to_string();
    if Command::new("aws")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        return Err("the AWS CLI (`aws`) is not installed: pip install awscli".into());
    }
    let root = std::env::temp_dir().join(format!("sm-client-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(e)?;
    let src = root.join("file.bin");
    {
        // Incompressible-looking bytes, written once.
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).map_err(e)?);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&block).map_err(e)?;
        }
        f.flush().map_err(e)?;
    }
    fsync(&src).map_err(e)?;
    let total = (mib as u64) << 20;
    let (km_server, km_url) = start_key_manager(&root.join("km"))?;
    println!(
        "storage-manager with the AWS CLI: {mib} MiB file, median of {runs}, loopback, {} cores, data in {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        root.display()
    );
    println!(
        "{:<10} {:>9} {:>9} {:>12} {:>12} {:>9} {:>9}",
        "mode", "PUT MB/s", "GET MB/s", "cp+fsync", "cp back", "PUT/cp", "GET/cp"
    );
    let modes: &[bool] = if plain { &[true, false] } else { &[true] };
    for &encrypted in modes {
        let dir = root.join(if encrypted { "enc" } else { "plain" });
        let server = start_storage_manager(&dir, encrypted.then_some(km_url.as_str()), 8)?;
        let aws = Aws::new(format!("http://{}", server.addr()), &root)?;
        timed(&mut aws.cmd(&["s3", "mb", "s3://bench"]))?;
        let (mut puts, mut gets, mut bputs, mut bgets) = (vec![], vec![], vec![], vec![]);
        let back = root.join("download.bin");
        let src_s = src.to_string_lossy().to_string();
        let back_s = back.to_string_lossy().to_string();
        for _ in 0..runs {
            let (bp, bg) = baseline(&src, &root.join("baseline"))?;
            bputs.push(bp);
            bgets.push(bg);
            puts.push(timed(&mut aws.cmd(&[
                "s3",
                "cp",
                &src_s,
                "s3://bench/file.bin",
            ]))?);
            gets.push(timed(&mut aws.cmd(&[
                "s3",
                "cp",
                "s3://bench/file.bin",
                &back_s,
            ]))?);
            if !same_file(&src, &back).map_err(e)? {
                return Err("the downloaded file differs from the uploaded one".into());
            }
            std::fs::remove_file(&back).map_err(e)?;
        }
        let (put, get, bput, bget) = (median(puts), median(gets), median(bputs), median(bgets));
        println!(
            "{:<10} {:>9.0} {:>9.0} {:>12.0} {:>12.0} {:>9.2} {:>9.2}",
            if encrypted { "encrypted" } else { "plain" },
            mbps(total, put),
            mbps(total, get),
            mbps(total, bput),
            mbps(total, bget),
            bput / put,
            bget / get
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let c = median(
        (0..runs)
            .map(|_| completion(&root.join("complete"), &km_url, mib))
            .collect::<Result<Vec<_>, _>>()?,
    );
    println!(
        "CompleteMultipartUpload of {mib} MiB in 8 MiB parts, encrypted (Store call, no HTTP): {:.0} ms",
        c * 1000.0
    );
    drop(km_server);
    let _ = std::fs::remove_dir_all(&root);
    println!("PUT/cp and GET/cp: storage-manager through the AWS CLI divided by the baseline's (goals: PUT >= 0.50, GET >= 0.80).");
    Ok(())
}
