//! End-to-end on an emulated Pi: the release aarch64-unknown-linux-musl
//! edge-worker (the binary that ships to a Pi 3/4/5) runs under
//! `qemu-aarch64-static` against a native conductor, and goes through what
//! the native fleet test checks: enrol, online with metrics, keep reporting,
//! offline on kill -9, back with the same identity.
//!
//! Needs `qemu-aarch64-static` (Debian: `qemu-user-static`); without it the
//! test fails, it does not skip. A missing or stale aarch64 binary is built
//! first (`cargo pi`), which takes a few minutes; CI builds it beforehand.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::time::{Duration, Instant};

use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// `EM_AARCH64` in an ELF header.
const EM_AARCH64: u16 = 183;

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
    let qemu = qemu_aarch64();
    let pi_bin = pi_worker_bin();
    assert_eq!(
        elf_machine(pi_bin),
        Some(EM_AARCH64),
        "{} is not an aarch64 ELF executable",
        pi_bin.display()
    );
    let program = [qemu.to_str().unwrap(), pi_bin.to_str().unwrap()];

    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();

    // qemu user mode is several times slower than native: a 1 s interval
    // and generous timeouts.
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
    wait_for("emulated worker online with metrics", SECS(45), || {
        online_with_metrics(&c, &id).then_some(())
    });
    println!("emulated worker online after {:?}", started.elapsed());

    // The inventory is the aarch64 agent's own.
    let detail = c.worker(&id);
    assert_eq!(detail["inventory"]["arch"], "aarch64", "{detail}");
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
    wait_for("restarted worker online", SECS(45), || {
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
    assert_eq!(detail["inventory"]["arch"], "aarch64", "{detail}");
    assert!(
        !w.proc.output().contains("panicked"),
        "worker log:\n{}",
        w.proc.tail(30)
    );
}

/// The emulated Pi hosts a process service from an aarch64 artifact: the
/// same assertions as the native hosting test (runs the cached artifact,
/// answers, restarted after kill -9, removed on undeploy).
#[test]
fn aarch64_worker_under_qemu_hosts_an_aarch64_artifact() {
    let qemu = qemu_aarch64();
    ensure_binfmt_aarch64().unwrap_or_else(|e| {
        panic!("the emulated worker must exec aarch64 services through binfmt_misc: {e}")
    });
    let pi_bin = pi_worker_bin();
    let service = pi_test_service_bin();
    assert_eq!(elf_machine(service), Some(EM_AARCH64));
    let program = [qemu.to_str().unwrap(), pi_bin.to_str().unwrap()];

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
    wait_for("emulated worker online", SECS(45), || {
        (c.status_of(&id) == "online").then_some(())
    });

    // Upload the aarch64 build (and a decoy for x86_64: the worker must pick by arch).
    let upload = |path: &std::path::Path, arch: &str| -> String {
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
    let sha_arm = upload(service, "aarch64");
    let sha_x86 = upload(&bin("test-service"), "x86_64");
    let port = free_port();
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "pi-svc", "artifacts": {"aarch64": sha_arm, "x86_64": sha_x86},
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
    let running = wait_for("pi-svc running on the emulated Pi", SECS(90), || {
        actual(&c).filter(|a| a["state"] == "running")
    });
    let pid = running["pid"].as_u64().unwrap();
    // The process is the cached aarch64 artifact (run by the kernel through qemu).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&sha_arm),
        "runs the aarch64 artifact: {}",
        String::from_utf8_lossy(&cmdline)
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
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
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
