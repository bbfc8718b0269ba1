//! End-to-end on emulated Pis: the release static edge-worker for each Pi
//! target runs under qemu user mode against a native conductor, and goes
//! through what the native fleet test checks: enrol, online with metrics,
//! keep reporting, offline on kill -9, back with the same identity; and it
//! hosts a process service from an artifact built for its own arch.
//!
//! | test prefix | target | emulated CPU | the board |
//! |---|---|---|---|
//! | `aarch64_` | `aarch64-unknown-linux-musl` | qemu's default | Pi 3/4/5, Zero 2 W, 64-bit OS |
//! | `armv7_` | `armv7-unknown-linux-musleabihf` | `cortex-a7` | Pi 2/3/4, 32-bit OS |
//! | `armv6_` | `arm-unknown-linux-musleabihf` | `arm1176` | Pi 1, Zero, Zero W |
//!
//! aarch64 needs `qemu-aarch64-static` (Debian: `qemu-user-static`); without
//! it the test fails, it does not skip. A missing or stale aarch64 binary is
//! built first (`cargo pi`), which takes a few minutes; CI builds it
//! beforehand.
//!
//! The 32-bit agents are built by `deploy/build-pi.sh` (Zig's musl, std
//! from source): their tests skip, saying so, while
//! `target/<triple>/release/{edge-worker,test-service}` are missing, unless
//! `AEREKOS_REQUIRE_ARM32=1` (set by `.ci/run`, which builds them first),
//! which turns a missing binary into a failure. Binaries older than their
//! sources are rebuilt with that script.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// `EM_AARCH64` and `EM_ARM` in an ELF header.
const EM_AARCH64: u16 = 183;
const EM_ARM: u16 = 40;

/// One emulated Pi target.
struct Pi {
    /// Short name (`armv6`), the test prefix and `deploy/build-pi.sh`'s argument.
    name: &'static str,
    /// Rust target triple.
    triple: &'static str,
    /// ELF machine of its binaries.
    machine: u16,
    /// `-cpu` for qemu (`None`: qemu's default).
    cpu: Option<&'static str>,
    /// The arch the agent reports (inventory) and picks artifacts by.
    arch: &'static str,
    /// The artifact key the test uploads its service under.
    artifact_arch: &'static str,
}

const AARCH64: Pi = Pi {
    name: "aarch64",
    triple: PI_TARGET,
    machine: EM_AARCH64,
    cpu: None,
    arch: "aarch64",
    artifact_arch: "aarch64",
};

/// Raspberry Pi 2 (Cortex-A7); also what a Pi 3/4 on a 32-bit kernel runs.
const ARMV7: Pi = Pi {
    name: "armv7",
    triple: "armv7-unknown-linux-musleabihf",
    machine: EM_ARM,
    cpu: Some("cortex-a7"),
    arch: "armv7l",
    artifact_arch: "armv7",
};

/// Raspberry Pi 1 / Zero / Zero W (ARM1176JZF-S).
const ARMV6: Pi = Pi {
    name: "armv6",
    triple: "arm-unknown-linux-musleabihf",
    machine: EM_ARM,
    cpu: Some("arm1176"),
    arch: "armv6l",
    artifact_arch: "armv6",
};

/// What an emulated test runs: qemu, the agent and the test service for one target.
struct Emulated {
    pi: &'static Pi,
    qemu: PathBuf,
    worker: PathBuf,
    service: PathBuf,
}

impl Emulated {
    fn aarch64() -> Emulated {
        Emulated {
            pi: &AARCH64,
            qemu: qemu_aarch64(),
            worker: pi_worker_bin().to_path_buf(),
            service: pi_test_service_bin().to_path_buf(),
        }
    }

    /// The 32-bit target `pi`: `None` (the test skips) when its binaries
    /// are not built, unless `AEREKOS_REQUIRE_ARM32=1`.
    fn arm32(pi: &'static Pi) -> Option<Emulated> {
        let release = target_dir().join(pi.triple).join("release");
        let worker = release.join("edge-worker");
        let service = release.join("test-service");
        let missing: Vec<String> = [&worker, &service]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            let build = format!(
                "sh deploy/build-pi.sh {} -p edge-worker -p aerekos-test-service",
                pi.name
            );
            assert!(
                std::env::var("AEREKOS_REQUIRE_ARM32").as_deref() != Ok("1"),
                "AEREKOS_REQUIRE_ARM32=1 but {} not built: {build}",
                missing.join(" and ")
            );
            println!(
                "skipped: the {} agent is not built ({} missing); build it with `{build}` \
                 (AEREKOS_REQUIRE_ARM32=1 makes this a failure)",
                pi.name,
                missing.join(", ")
            );
            return None;
        }
        rebuild_if_stale(
            pi,
            &worker,
            "edge-worker",
            &[
                "protocol/src",
                "protocol/Cargo.toml",
                "edge-worker/src",
                "edge-worker/Cargo.toml",
            ],
        );
        rebuild_if_stale(
            pi,
            &service,
            "aerekos-test-service",
            &["tests/test-service/src", "tests/test-service/Cargo.toml"],
        );
        Some(Emulated {
            pi,
            qemu: qemu_user("arm"),
            worker,
            service,
        })
    }

    /// The worker's command line: qemu, its `-cpu`, the agent.
    fn program(&self) -> Vec<String> {
        let mut p = vec![self.qemu.display().to_string()];
        if let Some(cpu) = self.pi.cpu {
            p.extend(["-cpu".to_string(), cpu.to_string()]);
        }
        p.push(self.worker.display().to_string());
        p
    }
}

/// Rebuilds `bin` (TLS, default features) with `deploy/build-pi.sh` when
/// it is older than its sources: the tools are there, it was built before.
fn rebuild_if_stale(pi: &Pi, bin: &Path, package: &str, sources: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = sources
        .iter()
        .chain(&["Cargo.lock"])
        .map(|p| newest_mtime(&root.join(p)))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    if built.is_some_and(|t| t >= newest) {
        return;
    }
    eprintln!(
        "{} is stale: rebuilding it (sh deploy/build-pi.sh {} -p {package})",
        bin.display(),
        pi.name
    );
    let status = Command::new("sh")
        .arg(root.join("deploy/build-pi.sh"))
        .args([pi.name, "-p", package, "--target-dir"])
        .arg(target_dir())
        .current_dir(&root)
        .status()
        .expect("run deploy/build-pi.sh");
    assert!(
        status.success(),
        "rebuilding the {} {package} failed",
        pi.name
    );
}

/// Seqs of the raw history points, in the order the API returns them
/// (receive time, then seq).
fn seqs(c: &Conductor, id: &str) -> Vec<u64> {
    c.raw_history(id)
        .iter()
        .map(|p| p["seq"].as_u64().expect("every point has a seq"))
        .collect()
}

fn online_with_metrics(c: &Conductor, id: &str) -> bool {
    let w = c.worker(id);
    w["status"] == "online" && !w["metrics"].is_null()
}

#[test]
fn aarch64_worker_under_qemu_enrols_reports_and_survives_kill9() {
    enrols_reports_and_survives_kill9(&Emulated::aarch64());
}

#[test]
fn aarch64_worker_under_qemu_hosts_an_aarch64_artifact() {
    let e = Emulated::aarch64();
    ensure_binfmt_aarch64().unwrap_or_else(|err| {
        panic!("the emulated worker must exec aarch64 services through binfmt_misc: {err}")
    });
    hosts_an_artifact_of_its_arch(&e);
}

#[test]
fn armv7_worker_under_qemu_enrols_reports_and_survives_kill9() {
    if let Some(e) = Emulated::arm32(&ARMV7) {
        enrols_reports_and_survives_kill9(&e);
    }
}

#[test]
fn armv7_worker_under_qemu_hosts_an_armv7_artifact() {
    if let Some(e) = Emulated::arm32(&ARMV7) {
        ensure_binfmt_arm().unwrap_or_else(|err| {
            panic!("the emulated worker must exec arm services through binfmt_misc: {err}")
        });
        hosts_an_artifact_of_its_arch(&e);
    }
}

#[test]
fn armv6_worker_under_qemu_enrols_reports_and_survives_kill9() {
    if let Some(e) = Emulated::arm32(&ARMV6) {
        enrols_reports_and_survives_kill9(&e);
    }
}

#[test]
fn armv6_worker_under_qemu_hosts_an_armv6_artifact() {
    if let Some(e) = Emulated::arm32(&ARMV6) {
        ensure_binfmt_arm().unwrap_or_else(|err| {
            panic!("the emulated worker must exec arm services through binfmt_misc: {err}")
        });
        hosts_an_artifact_of_its_arch(&e);
    }
}

fn enrols_reports_and_survives_kill9(e: &Emulated) {
    let pi = e.pi;
    assert_eq!(
        elf_machine(&e.worker),
        Some(pi.machine),
        "{} is not an {} ELF executable",
        e.worker.display(),
        pi.name
    );
    let program = e.program();
    let program: Vec<&str> = program.iter().map(String::as_str).collect();

    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();

    // qemu user mode is several times slower than native (an ARM1176 more
    // so): a 1 s interval and generous timeouts.
    let mut opts = WorkerOpts::named("pi-emulated");
    opts.interval_ms = 1000;
    opts.extra = vec!["--label".into(), "board=qemu".into()];
    let interval = Duration::from_millis(opts.interval_ms);
    let started = Instant::now();
    let mut w = Worker::start_with_program(
        &program,
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        opts,
    );
    let id = w.wait_id();
    wait_for("emulated worker online with metrics", SECS(60), || {
        online_with_metrics(&c, &id).then_some(())
    });
    println!(
        "emulated {} worker online after {:?}",
        pi.name,
        started.elapsed()
    );

    // The inventory is the emulated agent's own.
    let detail = c.worker(&id);
    assert_eq!(detail["inventory"]["arch"], pi.arch, "{detail}");
    assert_eq!(detail["inventory"]["hostname"], "pi-emulated", "{detail}");
    assert_eq!(detail["labels"]["board"], "qemu", "{detail}");
    assert!(
        detail["metrics"]["metrics"]["memory_total"]
            .as_u64()
            .is_some_and(|m| m > 0),
        "{detail}"
    );
    assert_eq!(c.workers().len(), 1);

    // It keeps reporting: several samples, seqs strictly increasing.
    let before_kill = wait_for("4 raw samples", 8 * interval + SECS(15), || {
        let s = seqs(&c, &id);
        (s.len() >= 4).then_some(s)
    });
    assert!(
        before_kill.windows(2).all(|p| p[0] < p[1]),
        "seqs increase: {before_kill:?}"
    );
    assert!(w.proc.alive(), "still running:\n{}", w.proc.tail(20));

    // kill -9: offline within 3 intervals (LWT or missed frames).
    w.proc.kill9();
    let killed = Instant::now();
    wait_for("killed worker offline", 3 * interval + SECS(3), || {
        (c.status_of(&id) == "offline").then_some(())
    });
    println!("offline detected after {:?}", killed.elapsed());
    let last_before = *seqs(&c, &id).iter().max().unwrap();

    // Restart under qemu without a token: same identity, online again, no
    // new record, and its seqs carry on above everything sent before.
    w.restart();
    assert_eq!(w.wait_id(), id);
    wait_for("restarted worker online", SECS(60), || {
        (c.status_of(&id) == "online").then_some(())
    });
    let after = wait_for(
        "a sample after the restart",
        5 * interval + SECS(15),
        || {
            let s = seqs(&c, &id);
            (*s.iter().max().unwrap() > last_before).then_some(s)
        },
    );
    assert!(
        after.windows(2).all(|p| p[0] < p[1]),
        "seqs still increase across the restart: {after:?}"
    );
    assert_eq!(c.workers().len(), 1, "no second record");
    let detail: Value = c.worker(&id);
    assert_eq!(detail["inventory"]["arch"], pi.arch, "{detail}");
    assert!(
        !w.proc.output().contains("panicked"),
        "worker log:\n{}",
        w.proc.tail(30)
    );
}

/// The emulated Pi hosts a process service from an artifact of its arch:
/// the same assertions as the native hosting test (runs the cached
/// artifact, answers, restarted after kill -9, removed on undeploy). Decoys
/// under other arch keys check that the worker picks by its arch.
fn hosts_an_artifact_of_its_arch(e: &Emulated) {
    let pi = e.pi;
    assert_eq!(elf_machine(&e.service), Some(pi.machine));
    let program = e.program();
    let program: Vec<&str> = program.iter().map(String::as_str).collect();

    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut opts = WorkerOpts::named("pi-host");
    opts.interval_ms = 1000;
    let mut w = Worker::start_with_program(
        &program,
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        opts,
    );
    let id = w.wait_id();
    wait_for("emulated worker online", SECS(60), || {
        (c.status_of(&id) == "online").then_some(())
    });

    let upload = |path: &Path, arch: &str| -> String {
        let bytes = std::fs::read(path).unwrap();
        let mut resp = http()
            .post(format!(
                "{}/api/v1/artifacts?arch={arch}&name=test-service",
                c.url()
            ))
            .header("Authorization", format!("Bearer {}", c.admin))
            .header("Content-Type", "application/octet-stream")
            .send(&bytes[..])
            .unwrap();
        let text = resp.body_mut().read_to_string().unwrap();
        assert!(resp.status().is_success(), "upload: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["sha256"].as_str().unwrap().to_string()
    };
    let sha_pi = upload(&e.service, pi.artifact_arch);
    // Decoys: the native build under x86_64 and the other Pi arches (it
    // would run natively, and the cmdline check below would see another
    // sha). An armv7 worker would take the armv6 one only if there were no
    // armv7 artifact.
    let native = bin("test-service");
    let mut artifacts = json!({ pi.artifact_arch: sha_pi });
    for other in ["x86_64", "aarch64", "armv7", "armv6"] {
        if other != pi.artifact_arch {
            artifacts[other] = json!(upload(&native, other));
        }
    }
    // The emulated CPU for the service too (qemu reads QEMU_CPU when the
    // kernel runs the artifact through binfmt_misc).
    let env = match pi.cpu {
        Some(cpu) => json!({ "QEMU_CPU": cpu }),
        None => json!({}),
    };
    let port = free_port();
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "pi-svc", "artifacts": artifacts, "env": env,
                "args": ["--port", port.to_string(), "--tag", "on-pi"],
                "restart": "always", "backoff_ms": 500}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.put(
        "/api/v1/services/pi-svc/deployment",
        &json!({"workers": [id]}),
    );
    assert_eq!(status, 200, "{body}");
    let actual = |c: &Conductor| -> Option<Value> {
        let (_, body) = c.get("/api/v1/services/pi-svc");
        body["workers"]
            .as_array()?
            .iter()
            .find(|x| x["worker_id"] == id.as_str())
            .map(|x| x["actual"].clone())
            .filter(|a| !a.is_null())
    };
    let running = wait_for("pi-svc running on the emulated Pi", SECS(120), || {
        actual(&c).filter(|a| a["state"] == "running")
    });
    let pid = running["pid"].as_u64().unwrap();
    // The process is the cached artifact of this arch, run by the kernel
    // through qemu under the service's name: its command line names the
    // service's link (`.exe/pi-svc`), and that link resolves to the
    // artifact (cached under its SHA-256).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let link = cmdline
        .split(|b| *b == 0)
        .map(|a| std::path::PathBuf::from(String::from_utf8_lossy(a).into_owned()))
        .find(|a| a.ends_with(".exe/pi-svc"))
        .unwrap_or_else(|| panic!("runs under the service's name: {shown}"));
    let target = std::fs::read_link(&link).unwrap_or_default();
    assert!(
        target.to_string_lossy().contains(&sha_pi),
        "runs the {} artifact: {shown} -> {}",
        pi.artifact_arch,
        target.display()
    );
    let info = wait_for("pi-svc answers", SECS(30), || {
        let mut r = http()
            .get(format!("http://127.0.0.1:{port}/info"))
            .call()
            .ok()?;
        (r.status() == 200).then(|| r.body_mut().read_to_string().unwrap_or_default())
    });
    assert!(info.contains("tag=on-pi"), "{info}");

    // kill -9 → restarted.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    wait_for("pi-svc restarted", SECS(60), || {
        actual(&c).filter(|a| a["state"] == "running" && a["pid"].as_u64() != Some(pid))
    });

    // Undeploy → gone.
    let (status, body) = c.delete("/api/v1/services/pi-svc/deployment");
    assert!(status == 200 || status == 204, "{status} {body}");
    wait_for("pi-svc removed", SECS(60), || {
        actual(&c).is_none().then_some(())
    });
    assert!(!w.proc.output().contains("panicked"), "{}", w.proc.tail(30));
}
