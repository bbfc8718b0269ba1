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
//! against CPU time per scrape (node_exporter, many scrapes); the bytes the
//! agent writes to storage per day (flash wear: `/proc/<pid>/io`, over the
//! whole run, an idle worker and one hosting a service that logs every
//! second, against node_exporter's); bytes per metrics frame vs JSON.
//! Ratios are what to read: the machine is shared. RSS and CPU are measured
//! in 3 rounds with fresh workers, each ratio against the exporter in the
//! same round, and the median is the figure.

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

fn mib_f(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Rounds of the RSS and CPU measurements; the medians are the figures.
const ROUNDS: usize = 3;
/// The agent's default `--batch` (`edge_worker::DEFAULT_BATCH`), given to
/// the idle workers, which run at the default settings.
const DEFAULT_BATCH_MS: u64 = 300_000;
/// The CPU round's batch period at 100 ms: 30 samples a batch, the
/// default's shape (5 min at 10 s).
const BATCHED_CPU_PERIOD_MS: u64 = 3_000;

/// The median of `v` (`None` when empty).
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Storage writes of a process at one moment: `/proc/<pid>/io`'s
/// `write_bytes` (pages it dirtied, counted when dirtied) less
/// `cancelled_write_bytes` (dirty pages truncated before writeback), and
/// the size of its stderr log, which the process wrote too but which goes
/// to journald under systemd.
struct Wear {
    at: Instant,
    written: u64,
    log: u64,
}

impl Wear {
    fn now(p: &Proc) -> Wear {
        let io = fs::read_to_string(format!("/proc/{}/io", p.pid())).unwrap_or_default();
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Wear {
            at: Instant::now(),
            written: field("write_bytes:").saturating_sub(field("cancelled_write_bytes:")),
            log: size(&p.log).unwrap_or(0),
        }
    }

    /// Bytes written since `earlier`, the log excluded.
    fn state_bytes_since(&self, earlier: &Wear) -> u64 {
        (self.written.saturating_sub(earlier.written)).saturating_sub(self.log_bytes_since(earlier))
    }

    /// Bytes the process logged since `earlier`.
    fn log_bytes_since(&self, earlier: &Wear) -> u64 {
        self.log.saturating_sub(earlier.log)
    }
}

/// The first file named `name` under `dir`, depth first.
fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

/// Whether `write_bytes` counts writes to files under `dir` (not on a
/// tmpfs, and the kernel's task I/O accounting on): this process writes
/// and syncs 1 MiB there and looks.
fn write_accounting_works(dir: &Path) -> bool {
    let read = || {
        fs::read_to_string("/proc/self/io")
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("write_bytes:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let before = read();
    let path = dir.join("accounting-probe");
    let ok = fs::File::create(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &vec![1u8; 1 << 20])?;
            f.sync_all()
        })
        .is_ok();
    let after = read();
    let _ = fs::remove_file(&path);
    ok && after.saturating_sub(before) >= 1 << 20
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

    // A conductor to report to. Two workers run through the whole
    // benchmark for the flash wear figures (state dirs on a disk-backed
    // filesystem: `target/`, where write accounting works), one of them
    // hosting a service that logs every second.
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let wear_dir = tempfile::tempdir_in(&target).unwrap();
    let accounting = write_accounting_works(wear_dir.path());
    let mut wear_idle_opts = WorkerOpts::named("wear-idle");
    wear_idle_opts.interval_ms = 10_000;
    wear_idle_opts.batch_ms = Some(DEFAULT_BATCH_MS);
    let mut wear_idle = Worker::start(
        &wear_dir.path().join("wear-idle"),
        &c.url(),
        Some(&token),
        wear_idle_opts,
    );
    wear_idle.wait_id();
    let mut wear_svc_opts = WorkerOpts::named("wear-service");
    wear_svc_opts.interval_ms = 10_000;
    wear_svc_opts.batch_ms = Some(DEFAULT_BATCH_MS);
    let mut wear_svc = Worker::start(
        &wear_dir.path().join("wear-service"),
        &c.url(),
        Some(&token),
        wear_svc_opts,
    );
    let wear_svc_id = wear_svc.wait_id();
    // Sample-driven writes (the sequence reservation in state.json, one per
    // 1,000 frames) are rare at 10 s: a worker at the 100 ms minimum
    // interval crosses a few reservations in this run, per sample.
    let mut wear_fast_opts = WorkerOpts::named("wear-fast");
    wear_fast_opts.interval_ms = 100;
    let mut wear_fast = Worker::start(
        &wear_dir.path().join("wear-fast"),
        &c.url(),
        Some(&token),
        wear_fast_opts,
    );
    let wear_fast_id = wear_fast.wait_id();
    e2e::services::create_service(
        &c,
        &serde_json::json!({"name": "ticker", "command": bin("test-service").to_str().unwrap(),
            "args": ["--tag", "wear", "--tick-ms", "1000"], "restart": "always"}),
    );
    e2e::services::deploy(&c, "ticker", &serde_json::json!({"workers": [wear_svc_id]}));
    wait_for(
        "the logging service running",
        Duration::from_secs(30),
        || (e2e::services::state_of(&c, "ticker", &wear_svc_id) == "running").then_some(()),
    );
    // Enrolment and the first deploy write once; the figure is what
    // follows, from here to the end of the benchmark.
    std::thread::sleep(Duration::from_secs(5));
    let wear_start = [Wear::now(&wear_idle.proc), Wear::now(&wear_svc.proc)];
    let fast_start = (
        Wear::now(&wear_fast.proc),
        c.raw_history(&wear_fast_id).len(),
    );
    let service_log = e2e::services::actual(&c, "ticker", &wear_svc_id)
        .and_then(|_| find_file(&wear_dir.path().join("wear-service"), "output.log"));
    let service_log_start = service_log.as_deref().and_then(size).unwrap_or(0);

    let ne_port = free_port();
    let mut ne_proc = ne.map(|p| {
        let mut cmd = Command::new(p);
        cmd.arg(format!("--web.listen-address=127.0.0.1:{ne_port}"));
        Proc::spawn(cmd, dir.path().join("node_exporter.log"))
    });
    let ne_url = format!("http://127.0.0.1:{ne_port}/metrics");
    let agent = http();
    let scrape = || {
        let _ = agent
            .get(&ne_url)
            .call()
            .map(|mut r| r.body_mut().read_to_string());
    };
    if ne_proc.is_some() {
        wait_for("node_exporter to serve", Duration::from_secs(20), || {
            agent.get(&ne_url).call().ok().map(|_| ())
        });
        // Prometheus scrapes periodically: warm it up like a scraped exporter.
        for _ in 0..3 {
            scrape();
        }
    }
    let ne_wear_start = ne_proc.as_ref().map(Wear::now);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };

    println!("\n== idle RSS (after 25 s; workers at a 10 s interval, exporter scraped; {ROUNDS} rounds, fresh workers each) ==");
    let mut tls_ratios = Vec::new();
    let mut plain_ratios = Vec::new();
    let mut tls_rss = Vec::new();
    let mut plain_rss = Vec::new();
    let mut idle_id = String::new();
    for round in 1..=ROUNDS {
        let mut idle_opts = WorkerOpts::named(&format!("idle-{round}"));
        idle_opts.interval_ms = 10_000;
        idle_opts.batch_ms = Some(DEFAULT_BATCH_MS);
        let mut idle = Worker::start(
            &dir.path().join(format!("idle-{round}")),
            &c.url(),
            Some(&token),
            idle_opts,
        );
        idle_id = idle.wait_id();
        let mut plain = native_plain.as_ref().map(|bin| {
            let mut opts = WorkerOpts::named(&format!("idle-plain-{round}"));
            opts.interval_ms = 10_000;
            opts.batch_ms = Some(DEFAULT_BATCH_MS);
            let secret_only = token.split('.').next().unwrap_or_default().to_string();
            let program = bin.display().to_string();
            let mut w = Worker::start_with_program(
                &[&program],
                &dir.path().join(format!("idle-plain-{round}")),
                &c.url(),
                Some(&secret_only),
                opts,
            );
            w.wait_id();
            w
        });
        std::thread::sleep(Duration::from_secs(25));
        let w = rss(idle.proc.pid());
        let p = plain.as_mut().map(|w| rss(w.proc.pid()));
        let n = ne_proc.as_ref().map(|p| rss(p.pid()));
        print!("round {round}: edge-worker TLS {}", mib(w));
        if let Some(p) = p {
            print!(", without TLS {}", mib(p));
        }
        if let Some(n) = n {
            print!(", node_exporter {}", mib(n));
            tls_ratios.push(w as f64 / n as f64);
            if let Some(p) = p {
                plain_ratios.push(p as f64 / n as f64);
            }
        }
        println!();
        tls_rss.push(w as f64);
        if let Some(p) = p {
            plain_rss.push(p as f64);
        }
        if round < ROUNDS {
            c.delete(&format!("/api/v1/workers/{idle_id}"));
        }
    }
    if let Some(w) = median(&tls_rss) {
        println!(
            "median edge-worker, TLS session  {:>10.0} B  {}  (target <= 5 MiB: {})",
            w,
            mib_f(w),
            verdict(w <= f64::from(5u32 << 20))
        );
    }
    if let Some(p) = median(&plain_rss) {
        println!(
            "median edge-worker without TLS   {:>10.0} B  {}  (target <= 4 MiB: {})",
            p,
            mib_f(p),
            verdict(p <= f64::from(4u32 << 20))
        );
    }
    if let Some(r) = median(&tls_ratios) {
        println!(
            "median ratio TLS worker/exporter     {r:.3}  (target <= 0.250: {})",
            verdict(r <= 0.25)
        );
    }
    if let Some(r) = median(&plain_ratios) {
        println!(
            "median ratio plain worker/exporter   {r:.3}  (target <= 0.200: {})",
            verdict(r <= 0.2)
        );
    }

    println!("\n== CPU per sample ({ROUNDS} rounds: a worker at the 100 ms minimum interval for 30 s, then 200 scrapes) ==");
    let mut cpu_ratios = Vec::new();
    let mut per_sample_ms = Vec::new();
    let mut batched_per_sample_ms = Vec::new();
    for round in 1..=ROUNDS {
        let mut busy_opts = WorkerOpts::named(&format!("busy-{round}"));
        busy_opts.interval_ms = 100; // the agent's minimum interval
        let mut busy = Worker::start(
            &wear_dir.path().join(format!("busy-{round}")),
            &c.url(),
            Some(&token),
            busy_opts,
        );
        let busy_id = busy.wait_id();
        wait_for("busy worker reporting", Duration::from_secs(20), || {
            (c.raw_history(&busy_id).len() > 20).then_some(())
        });
        let pid = busy.proc.pid();
        let count = |c: &Conductor| c.raw_history(&busy_id).len();
        let (n0, t0) = (count(&c), cpu_time(pid));
        std::thread::sleep(Duration::from_secs(30));
        let (n1, t1) = (count(&c), cpu_time(pid));
        busy.proc.kill9();
        let samples = (n1 - n0) as f64;
        let worker_per_sample = (t1 - t0).as_secs_f64() / samples;
        per_sample_ms.push(worker_per_sample * 1e3);
        print!(
            "round {round}: edge-worker {samples} samples, {:?} CPU => {:.3} ms per sample",
            t1 - t0,
            worker_per_sample * 1e3
        );
        if let Some(p) = &ne_proc {
            let scrapes = 200;
            let t0 = cpu_time(p.pid());
            for _ in 0..scrapes {
                scrape();
            }
            let per_scrape =
                cpu_time(p.pid()).saturating_sub(t0).as_secs_f64() / f64::from(scrapes);
            print!(
                "; node_exporter {:.3} ms per scrape; ratio {:.3}",
                per_scrape * 1e3,
                worker_per_sample / per_scrape
            );
            cpu_ratios.push(worker_per_sample / per_scrape);
        }
        println!();
        c.delete(&format!("/api/v1/workers/{busy_id}"));

        // The same at the default batching shape: 30 samples a batch (the
        // default 5 min at 10 s, here 3 s at 100 ms), one frame, PubAck and
        // `Stored` a batch. Samples arrive a batch at a time, so the window
        // runs from one batch's arrival to a later one's: the CPU between is
        // exactly the work of the samples those later batches carry.
        let mut batched_opts = WorkerOpts::named(&format!("batched-{round}"));
        batched_opts.interval_ms = 100;
        batched_opts.batch_ms = Some(BATCHED_CPU_PERIOD_MS);
        let mut batched = Worker::start(
            &wear_dir.path().join(format!("batched-{round}")),
            &c.url(),
            Some(&token),
            batched_opts,
        );
        let batched_id = batched.wait_id();
        wait_for("batched worker batching", Duration::from_secs(30), || {
            (c.worker(&batched_id)["batching"] == serde_json::json!(true)).then_some(())
        });
        let pid = batched.proc.pid();
        let count = |c: &Conductor| c.raw_history(&batched_id).len();
        // The moment a batch has arrived: the count changed since `from`.
        let arrival = |c: &Conductor, from: usize| {
            wait_for("a batch arrives", Duration::from_secs(30), || {
                let n = count(c);
                (n != from).then(|| (n, cpu_time(pid)))
            })
        };
        let (n0, t0) = arrival(&c, count(&c));
        std::thread::sleep(Duration::from_secs(30));
        let (n1, t1) = arrival(&c, count(&c));
        batched.proc.kill9();
        let samples = (n1 - n0) as f64;
        let per = (t1 - t0).as_secs_f64() / samples;
        batched_per_sample_ms.push(per * 1e3);
        println!(
            "round {round}: batched edge-worker ({} ms batches) {samples} samples, {:?} CPU => {:.3} ms per sample",
            BATCHED_CPU_PERIOD_MS,
            t1 - t0,
            per * 1e3
        );
        c.delete(&format!("/api/v1/workers/{batched_id}"));
    }
    if let Some(ms) = median(&per_sample_ms) {
        println!(
            "median edge-worker CPU per sample  {ms:.3} ms  ({:.1} s per 1,000 samples)",
            ms
        );
    }
    if let Some(r) = median(&cpu_ratios) {
        println!(
            "median ratio worker sample / exporter scrape  {r:.3}  (target <= 0.100: {})",
            verdict(r <= 0.1)
        );
    }
    if let Some(ms) = median(&batched_per_sample_ms) {
        println!(
            "median batched edge-worker CPU per sample  {ms:.3} ms  (moonshot <= 0.250 ms: {})",
            verdict(ms <= 0.25)
        );
    }

    println!("\n== flash wear (bytes the process writes to storage, /proc/<pid>/io write_bytes, scaled to a day) ==");
    let wear_end = [Wear::now(&wear_idle.proc), Wear::now(&wear_svc.proc)];
    if !accounting {
        println!("write accounting does not work on this filesystem: no figures");
    } else {
        for (name, (a, b)) in [
            "idle worker, 10 s interval",
            "worker + a service logging every second",
        ]
        .iter()
        .zip(wear_start.iter().zip(wear_end.iter()))
        {
            let secs = b.at.duration_since(a.at).as_secs_f64();
            let day = 86_400.0 / secs;
            let state = b.state_bytes_since(a) as f64 * day;
            let log = b.log_bytes_since(a) as f64 * day;
            println!(
                "{name:<42} {:>9.0} B/day ({:.3} MB/day; target idle < 1 MB/day: {}) over {secs:.0} s; its own log on stderr {:.3} MB/day (journald's in production)",
                state,
                state / 1e6,
                verdict(state < 1e6),
                log / 1e6
            );
        }
        let fast_end = (
            Wear::now(&wear_fast.proc),
            c.raw_history(&wear_fast_id).len(),
        );
        let samples = fast_end.1.saturating_sub(fast_start.1).max(1) as f64;
        let per_sample = fast_end.0.state_bytes_since(&fast_start.0) as f64 / samples;
        println!(
            "per sample (a worker at 100 ms, {samples} samples): {per_sample:.1} B => {:.3} MB/day at 10 s (8,640 samples)",
            per_sample * 8_640.0 / 1e6
        );
        if let (Some(log), Some(a), Some(b)) = (&service_log, wear_start.get(1), wear_end.get(1)) {
            let secs = b.at.duration_since(a.at).as_secs_f64();
            let logged = size(log).unwrap_or(0).saturating_sub(service_log_start) as f64;
            let per_day = logged * 86_400.0 / secs;
            println!(
                "the service's own output: {:.3} MB/day into its log, written by the service; the agent's rotation \
                 (copy of the last 64 KiB to output.log.1, then truncate) rewrites at most as much again: {:.3} MB/day",
                per_day / 1e6,
                per_day / 1e6
            );
        }
        if let (Some(p), Some(a)) = (&ne_proc, &ne_wear_start) {
            let b = Wear::now(p);
            let secs = b.at.duration_since(a.at).as_secs_f64();
            println!(
                "node_exporter (scraped above)              {:>9.0} B/day",
                b.state_bytes_since(a) as f64 * 86_400.0 / secs
            );
        }
    }
    drop(wear_idle);
    drop(wear_svc);
    drop(wear_fast);
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
