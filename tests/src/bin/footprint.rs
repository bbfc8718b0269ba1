//! Footprint benchmark: the edge-worker side by side with Debian's
//! prometheus-node-exporter, measured in the same run on the same machine,
//! plus the metrics frame size against the same data as JSON.
//!
//! ```sh
//! cargo run --release -p aerekos-e2e --bin footprint
//! ```
//!
//! The aarch64 sizes are of the builds CI budgets, `sh deploy/build-pi.sh
//! aarch64` (into `target/tuned*/`, a few minutes the first time); a
//! `cargo pi` binary, when there is one, is shown beside them.
//!
//! Both agent builds side by side: the default one with TLS (rustls,
//! `ring`; pinned enrolment, HTTPS, MQTT over TLS) and the smallest one
//! (`--no-default-features`, plain links only), which this benchmark builds
//! itself into `target/no-tls/` (aarch64 for the size, this host for RSS).
//!
//! Prints: stripped binary sizes; idle RSS after warm-up; CPU time per
//! sample (edge-worker, measured over many samples at a short interval)
//! against CPU time per scrape (node_exporter, many scrapes); bytes per
//! metrics frame vs JSON. Ratios are what to read: the machine is shared.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is a failure report

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;

/// CPU time (user + system) consumed so far by `pid`.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux ABI we target.
    Duration::from_millis(ticks * 10)
}

/// Resident set size of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

fn size(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.len())
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn node_exporter_bin() -> Option<&'static str> {
    [
        "/usr/bin/prometheus-node-exporter",
        "/usr/sbin/prometheus-node-exporter",
    ]
    .into_iter()
    .find(|p| Path::new(p).is_file())
}

/// Builds the agent without TLS (`--no-default-features`) into
/// `<target>/no-tls`, for `triple` (`None`: this host); its path.
fn build_without_tls(target: &Path, triple: Option<&str>) -> Option<std::path::PathBuf> {
    let out = target.join("no-tls");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--release",
        "-p",
        "edge-worker",
        "--no-default-features",
    ])
    .arg("--target-dir")
    .arg(&out)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(t) = triple {
        cmd.args(["--target", t]);
    }
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    let bin = match triple {
        Some(t) => out.join(t).join("release/edge-worker"),
        None => out.join("release/edge-worker"),
    };
    (ok && bin.is_file()).then_some(bin)
}

/// Builds the aarch64 agent the way the size budgets hold it
/// (`sh deploy/build-pi.sh aarch64`: std without backtrace symbolization)
/// into `<target>/<dir>`, with `args` (`--no-default-features`); its path.
fn build_pi(target: &Path, dir: &str, args: &[&str]) -> Option<std::path::PathBuf> {
    let out = target.join(dir);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ok = Command::new("sh")
        .arg(root.join("deploy/build-pi.sh"))
        .arg("aarch64")
        .args(args)
        .arg("--target-dir")
        .arg(&out)
        .current_dir(&root)
        .status()
        .is_ok_and(|s| s.success());
    let bin = out.join("aarch64-unknown-linux-musl/release/edge-worker");
    (ok && bin.is_file()).then_some(bin)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let target = bin_dir().parent().unwrap().to_path_buf();
    // `cargo pi`'s binary (rustup's prebuilt std): shown, not budgeted.
    let cargo_pi = target.join("aarch64-unknown-linux-musl/release/edge-worker");
    let native = bin("edge-worker");
    let ne = node_exporter_bin();
    let aarch64 = build_pi(&target, "tuned", &[]);
    let aarch64_plain = build_pi(&target, "tuned-no-tls", &["--no-default-features"]);
    let native_plain = build_without_tls(&target, None);

    println!("== binary size (stripped; aarch64 by deploy/build-pi.sh, as CI budgets it) ==");
    match aarch64.as_deref().and_then(size) {
        Some(s) => println!(
            "edge-worker aarch64-unknown-linux-musl, TLS     {s:>10} B  {}  (target <= 2.25 MiB: {})",
            mib(s),
            if s <= 2_359_296 { "met" } else { "MISSED" }
        ),
        None => println!("edge-worker aarch64: could not be built (sh deploy/build-pi.sh aarch64)"),
    }
    if let Some(s) = size(&cargo_pi) {
        println!(
            "  the same with `cargo pi` (prebuilt std)      {s:>10} B  {}  (not budgeted)",
            mib(s)
        );
    }
    match aarch64_plain.as_deref().and_then(size) {
        Some(s) => println!(
            "edge-worker aarch64-unknown-linux-musl, no TLS  {s:>10} B  {}  (target <= 1.5 MiB: {})",
            mib(s),
            if s <= 1_572_864 { "met" } else { "MISSED" }
        ),
        None => println!("edge-worker aarch64 without TLS: could not be built"),
    }
    if let Some(s) = size(&native) {
        println!(
            "edge-worker {} (this host)         {s:>10} B  {}",
            std::env::consts::ARCH,
            mib(s)
        );
    }
    let ne_size = ne.and_then(|p| size(Path::new(p)));
    if let Some(s) = ne_size {
        println!(
            "prometheus-node-exporter (Debian)      {s:>10} B  {}",
            mib(s)
        );
    }

    // A conductor to report to, and two idle workers at the default 10 s
    // interval: the default agent over TLS (its token pins the CA), and the
    // agent built without TLS on the conductor's plain loopback.
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut idle_opts = WorkerOpts::named("idle");
    idle_opts.interval_ms = 10_000;
    let mut idle = Worker::start(&dir.path().join("idle"), &c.url(), Some(&token), idle_opts);
    let idle_id = idle.wait_id();
    let mut plain = native_plain.as_ref().map(|bin| {
        let mut opts = WorkerOpts::named("idle-plain");
        opts.interval_ms = 10_000;
        let secret_only = token.split('.').next().unwrap_or_default().to_string();
        let program = bin.display().to_string();
        let mut w = Worker::start_with_program(
            &[&program],
            &dir.path().join("idle-plain"),
            &c.url(),
            Some(&secret_only),
            opts,
        );
        w.wait_id();
        w
    });

    let ne_port = free_port();
    let mut ne_proc = ne.map(|p| {
        let mut cmd = Command::new(p);
        cmd.arg(format!("--web.listen-address=127.0.0.1:{ne_port}"));
        Proc::spawn(cmd, dir.path().join("node_exporter.log"))
    });
    let ne_url = format!("http://127.0.0.1:{ne_port}/metrics");
    let agent = http();
    if ne_proc.is_some() {
        wait_for("node_exporter to serve", Duration::from_secs(20), || {
            agent.get(&ne_url).call().ok().map(|_| ())
        });
        // Prometheus scrapes periodically: warm it up like a scraped exporter.
        for _ in 0..3 {
            let _ = agent
                .get(&ne_url)
                .call()
                .map(|mut r| r.body_mut().read_to_string());
        }
    }

    println!("\n== idle RSS (after 25 s; workers at a 10 s interval, exporter scraped) ==");
    std::thread::sleep(Duration::from_secs(25));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let worker_rss = rss(idle.proc.pid());
    println!(
        "edge-worker, TLS session      {:>10} B  {}  (target <= 5 MiB: {})",
        worker_rss,
        mib(worker_rss),
        verdict(worker_rss <= 5 << 20)
    );
    let plain_rss = plain.as_mut().map(|w| rss(w.proc.pid()));
    if let Some(r) = plain_rss {
        println!(
            "edge-worker without TLS       {:>10} B  {}  (target <= 4 MiB: {})",
            r,
            mib(r),
            verdict(r <= 4 << 20)
        );
    }
    if let Some(p) = &ne_proc {
        let r = rss(p.pid());
        println!("node_exporter                 {:>10} B  {}", r, mib(r));
        println!(
            "ratio TLS worker/exporter     {:.3}  (target <= 0.250: {})",
            worker_rss as f64 / r as f64,
            verdict((worker_rss as f64) <= 0.25 * r as f64)
        );
        if let Some(pr) = plain_rss {
            println!(
                "ratio plain worker/exporter   {:.3}  (target <= 0.200: {})",
                pr as f64 / r as f64,
                verdict((pr as f64) <= 0.2 * r as f64)
            );
        }
    }
    drop(idle);
    drop(plain);

    println!("\n== CPU per sample ==");
    let mut busy_opts = WorkerOpts::named("busy");
    busy_opts.interval_ms = 100; // the agent's minimum interval
    let mut busy = Worker::start(&dir.path().join("busy"), &c.url(), Some(&token), busy_opts);
    let busy_id = busy.wait_id();
    wait_for("busy worker reporting", Duration::from_secs(20), || {
        (c.raw_history(&busy_id).len() > 20).then_some(())
    });
    let pid = busy.proc.pid();
    let count = |c: &Conductor| c.raw_history(&busy_id).len();
    let (n0, t0, w0) = (count(&c), cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let (n1, t1, wall) = (count(&c), cpu_time(pid), w0.elapsed());
    busy.proc.kill9();
    let samples = (n1 - n0) as f64;
    let worker_per_sample = (t1 - t0).as_secs_f64() / samples;
    println!(
        "edge-worker: {samples} samples in {wall:.1?}, {:?} CPU  => {:.3} ms per sample, {:.1} s per 1,000 samples",
        t1 - t0,
        worker_per_sample * 1e3,
        worker_per_sample * 1e3
    );
    if let Some(p) = &ne_proc {
        let scrapes = 200;
        let t0 = cpu_time(p.pid());
        for _ in 0..scrapes {
            let _ = agent
                .get(&ne_url)
                .call()
                .map(|mut r| r.body_mut().read_to_string());
        }
        let t1 = cpu_time(p.pid());
        let per_scrape = (t1 - t0).as_secs_f64() / f64::from(scrapes);
        println!(
            "node_exporter: {scrapes} scrapes, {:?} CPU  => {:.3} ms per scrape",
            t1 - t0,
            per_scrape * 1e3
        );
        println!(
            "ratio worker sample / exporter scrape  {:.3}  (target <= 0.100: {})",
            worker_per_sample / per_scrape,
            if worker_per_sample <= 0.1 * per_scrape {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    if let Some(p) = ne_proc.as_mut() {
        p.kill9();
    }

    println!("\n== metrics frame size ==");
    let detail = c.worker(&idle_id);
    let metrics: protocol::Metrics = serde_json::from_value(detail["metrics"]["metrics"].clone())
        .expect("metrics JSON is protocol::Metrics");
    let mut env = protocol::examples::envelope(1, protocol::Body::Metrics(metrics.clone()));
    env.worker_id = protocol::frame::bounded(&idle_id);
    let sealed = protocol::seal(&protocol::examples::secret(), &env).unwrap();
    let json = serde_json::to_vec(&env).unwrap();
    // Format 2, what a worker sends once its conductor acknowledges: the
    // worker id is in the topic only. Its JSON counterpart leaves it out too.
    let mut env2 = env.clone();
    env2.version = protocol::FORMAT_V2;
    let sealed2 = protocol::seal(&protocol::examples::secret(), &env2).unwrap();
    let mut json2: serde_json::Value = serde_json::to_value(&env2).unwrap();
    if let Some(o) = json2.as_object_mut() {
        o.remove("worker_id");
    }
    let json2 = serde_json::to_vec(&json2).unwrap();
    println!(
        "this machine's sample: {} disks, {} interfaces, {} sensors, {} cores",
        metrics.disks.len(),
        metrics.net.len(),
        metrics.temperatures.len(),
        metrics.cpu_per_core.len()
    );
    let verdict = |frame: usize, json: usize| if frame * 5 <= json { "met" } else { "MISSED" };
    println!(
        "format 1 frame {:>5} B (incl. 16 B tag) vs the envelope as JSON {:>5} B: ratio {:.3}  (target <= 0.200: {})",
        sealed.len(),
        json.len(),
        sealed.len() as f64 / json.len() as f64,
        verdict(sealed.len(), json.len())
    );
    println!(
        "format 2 frame {:>5} B (no worker id) vs the same data as JSON {:>5} B: ratio {:.3}  (target <= 0.200: {})",
        sealed2.len(),
        json2.len(),
        sealed2.len() as f64 / json2.len() as f64,
        verdict(sealed2.len(), json2.len())
    );
    println!(
        "format 2 frame {:>5} B vs the format-1 JSON baseline {:>5} B: ratio {:.3}",
        sealed2.len(),
        json.len(),
        sealed2.len() as f64 / json.len() as f64
    );
    let body = postcard::to_stdvec(&metrics).unwrap();
    let body_json = serde_json::to_vec(&metrics).unwrap();
    println!(
        "metrics body alone     {:>5} B vs {} B JSON, ratio {:.3} (the envelope adds version, worker id, seq, time and tag)",
        body.len(),
        body_json.len(),
        body.len() as f64 / body_json.len() as f64
    );
    let pi = protocol::seal(
        &protocol::examples::secret(),
        &protocol::examples::envelope(1, protocol::Body::Metrics(protocol::examples::metrics())),
    )
    .unwrap();
    let pi_json = serde_json::to_vec(&protocol::examples::envelope(
        1,
        protocol::Body::Metrics(protocol::examples::metrics()),
    ))
    .unwrap();
    println!(
        "Pi 4 example (protocol/README.md): {} B vs {} B JSON, ratio {:.3}",
        pi.len(),
        pi_json.len(),
        pi.len() as f64 / pi_json.len() as f64
    );
}
