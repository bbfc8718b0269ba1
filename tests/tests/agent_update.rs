//! Agent self-update end to end (issue 15 §1): real conductor, real
//! edge-worker processes, the real `aerekos` CLI signing and rolling out a
//! release. Each worker runs from its own copy of the agent binary
//! (`<state dir>/bin/edge-worker`, which the update replaces), the "newer"
//! agent is the workspace's edge-worker built again as 0.99.0
//! ([`e2e::agent_with_version`], and [`e2e::pi_agent_with_version`] for the
//! emulated Pi).
//!
//! - A good release replaces every agent in place, two native workers and
//!   an aarch64 one under qemu: same pid, the new version reported,
//!   `edge-worker.previous` kept, hosted services never restarted.
//! - A new binary that exits, hangs, or cannot reach the broker fails its
//!   trial: the device goes back to the old agent by itself (same pid, same
//!   bytes on disk), the rollout stops `reverted` with the device's reason,
//!   and the `agent_update_failed` event is recorded.
//! - A worker whose pinned release key is not the signer's refuses and
//!   changes nothing; a binary for another arch is not even signed by the
//!   CLI, and one signed anyway (by a tool without that check) is refused
//!   by the agent from its ELF header, before anything is switched.
//! - `kill -9` of the agent during the trial: the next start kills the
//!   orphaned trial child and reports the failed update.
//! - The conductor killed during the update: the device finishes it alone,
//!   and the restarted conductor's rollout resumes and succeeds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::agent_release::{release_for, release_key, worker_from};
use e2e::services::{cli, create_service, deploy, pid_of, upload_artifact, upload_artifact_for};
use e2e::{
    agent_with_version, bin, ensure_binfmt_aarch64, free_port, pi_agent_with_version,
    pi_test_service_bin, pi_worker_bin, wait_for, Conductor, Worker,
};
use serde_json::{json, Value};

const NEXT: &str = "0.99.0";
const ARCH: &str = std::env::consts::ARCH;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A worker running from its own copy of the workspace's agent, in
/// `dir/<name>`; `extra` are added to its arguments.
fn worker(dir: &Path, name: &str, c: &Conductor, token: &str, extra: &[&str]) -> Worker {
    worker_from(dir, name, c, token, &bin("edge-worker"), extra)
}

/// Starts `n` workers and waits until each is online; their ids.
fn fleet(dir: &Path, c: &Conductor, n: usize) -> (Vec<Worker>, Vec<String>) {
    let token = c.registration_token();
    let mut ws: Vec<Worker> = (0..n)
        .map(|i| worker(dir, &format!("upd-{i}"), c, &token, &[]))
        .collect();
    let ids: Vec<String> = ws.iter_mut().map(Worker::wait_id).collect();
    for id in &ids {
        wait_for("worker online", secs(30), || {
            (c.status_of(id) == "online").then_some(())
        });
    }
    (ws, ids)
}

fn exe_of(w: &Worker) -> PathBuf {
    w.state_dir.join("bin/edge-worker")
}

/// `aerekos agent release` of `binary` as `version` for this machine's arch.
#[track_caller]
fn release(c: &Conductor, key: &Path, version: &str, binary: &Path) {
    release_for(c, key, version, ARCH, binary);
}

/// `aerekos --json agent rollout --version V --wait …`: whether it exited 0,
/// and the rollout as JSON.
fn rollout(c: &Conductor, version: &str, extra: &[&str]) -> (bool, Value) {
    let mut args = vec![
        "--json",
        "agent",
        "rollout",
        "--version",
        version,
        "--settle",
        "1",
        "--wait",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = cli(c, &args);
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("agent rollout {version}: {e}: {out}\n{err}"));
    (ok, v)
}

/// A shell script as a "release" (the agent runs whatever was signed).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The worker's events of `kind` (`AgentUpdated`, `AgentUpdateFailed`).
fn events(c: &Conductor, id: &str, kind: &str) -> Vec<String> {
    c.worker(id)["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn agent_version(c: &Conductor, id: &str) -> String {
    c.worker(id)["agent_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The `agent-update.json` record, if any.
fn record(w: &Worker) -> Option<Value> {
    let text = fs::read_to_string(w.state_dir.join("agent-update.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The files in the worker's `bin/` (a staged `.edge-worker-*.new` must
/// not be left behind).
fn bin_files(w: &Worker) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(w.state_dir.join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_signed_release_replaces_every_agent_in_place_and_hosted_services_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    ensure_binfmt_aarch64().unwrap_or_else(|err| {
        panic!("the emulated worker must exec its successor through binfmt_misc: {err}")
    });
    let next = agent_with_version(NEXT);
    let pi_next = pi_agent_with_version(NEXT);
    let (key, public) = release_key(dir.path(), "release.key");
    let c = Conductor::start_with(&dir.path().join("conductor"), &["--release-key", &public]);
    // Two native workers and an emulated Pi (aarch64 under qemu).
    let token = c.registration_token();
    let mut ws = [
        worker(dir.path(), "upd-0", &c, &token, &[]),
        worker(dir.path(), "upd-1", &c, &token, &[]),
        worker_from(dir.path(), "upd-pi", &c, &token, pi_worker_bin(), &[]),
    ];
    let ids: Vec<String> = ws.iter_mut().map(Worker::wait_id).collect();
    for id in &ids {
        wait_for("worker online", secs(60), || {
            (c.status_of(id) == "online").then_some(())
        });
    }
    let running = agent_version(&c, &ids[0]);
    assert_ne!(running, NEXT);
    assert_eq!(agent_version(&c, &ids[2]), running);

    // A hosted service on every worker: the update must not touch it.
    let sha = upload_artifact(&c, &bin("test-service"));
    let pi_sha = upload_artifact_for(&c, pi_test_service_bin(), "aarch64");
    create_service(
        &c,
        &json!({"name": "keeper", "artifacts": {ARCH: sha, "aarch64": pi_sha},
                "args": ["--port", "0", "--tag", "keeper"], "restart": "always"}),
    );
    deploy(&c, "keeper", &json!({"workers": ids}));
    let service_pids: Vec<u32> = ids
        .iter()
        .map(|id| {
            wait_for("keeper running", secs(30), || {
                Some(pid_of(&c, "keeper", id)).filter(|p| *p != 0)
            })
        })
        .collect();
    let agent_pids: Vec<u32> = ws.iter().map(|w| w.proc.pid()).collect();
    let old_bytes: Vec<Vec<u8>> = ws.iter().map(|w| fs::read(exe_of(w)).unwrap()).collect();
    let next_bytes = [fs::read(&next).unwrap(), fs::read(&pi_next).unwrap()];

    release(&c, &key, NEXT, &next);
    release_for(&c, &key, NEXT, "aarch64", &pi_next);
    let (ok, r) = rollout(&c, NEXT, &["--canary", "1", "--trial", "60"]);
    assert!(ok, "{r:#}");
    assert_eq!(r["state"], "succeeded", "{r:#}");
    let members = r["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{r:#}");
    assert!(members.iter().all(|m| m["state"] == "updated"), "{r:#}");

    for (i, (w, id)) in ws.iter_mut().zip(&ids).enumerate() {
        let emulated = i == 2;
        assert!(w.proc.alive(), "agent {i} exited:\n{}", w.proc.tail(30));
        assert_eq!(w.proc.pid(), agent_pids[i], "the agent keeps its pid");
        assert_eq!(agent_version(&c, id), NEXT);
        // The pid runs the new binary, which replaced the old on disk (an
        // emulated one is qemu running it: binfmt_misc puts the path
        // after the interpreter's).
        if emulated {
            let cmdline = fs::read(format!("/proc/{}/cmdline", w.proc.pid())).unwrap();
            let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            assert!(
                argv.get(1) == Some(&exe_of(w).as_os_str().as_encoded_bytes()),
                "{:?}",
                String::from_utf8_lossy(&cmdline)
            );
        } else {
            let exe = fs::read_link(format!("/proc/{}/exe", w.proc.pid())).unwrap();
            assert_eq!(exe, exe_of(w));
        }
        let on_disk = fs::read(exe_of(w)).unwrap();
        assert!(
            on_disk == next_bytes[usize::from(emulated)],
            "bin/edge-worker of {id} (worker {i}) is the release: {} bytes, the release {} bytes, \
             the old agent {} bytes",
            on_disk.len(),
            next_bytes[usize::from(emulated)].len(),
            old_bytes[i].len()
        );
        let previous = w.state_dir.join("bin/edge-worker.previous");
        assert!(
            fs::read(&previous).unwrap() == old_bytes[i],
            "the old agent of {id} is kept"
        );
        assert_eq!(bin_files(w), ["edge-worker", "edge-worker.previous"]);
        let updated = wait_for("AgentUpdated event", secs(20), || {
            Some(events(&c, id, "AgentUpdated")).filter(|e| !e.is_empty())
        });
        assert_eq!(updated, [format!("{running} -> {NEXT}")]);
        assert!(events(&c, id, "AgentUpdateFailed").is_empty());
        assert!(
            record(w).is_none(),
            "the update record is removed once reported"
        );
        assert_eq!(
            pid_of(&c, "keeper", id),
            service_pids[i],
            "the hosted service was not restarted"
        );
    }
    let prom = c.prometheus();
    assert_eq!(
        e2e::metric(
            &prom,
            &format!("aerekos_workers_by_agent_version{{version=\"{NEXT}\"}}")
        ),
        3.0,
        "{prom}"
    );

    // The same release again: nothing to do, every member is updated at once.
    let (ok, again) = rollout(&c, NEXT, &[]);
    assert!(ok, "{again:#}");
    assert!(again["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["state"] == "updated"));
    assert!(ws.iter_mut().all(|w| w.proc.alive()));
}

/// Rolls `binary` out as `version` to the one worker and checks that the
/// device went back to the old agent by itself; the failure's reason.
fn fails_its_trial(
    c: &Conductor,
    w: &mut Worker,
    id: &str,
    key: &Path,
    version: &str,
    binary: &Path,
) -> String {
    let pid = w.proc.pid();
    let before = fs::read(exe_of(w)).unwrap();
    let running = agent_version(c, id);
    release(c, key, version, binary);
    let (ok, r) = rollout(c, version, &["--trial", "5", "--timeout", "90"]);
    assert!(
        !ok,
        "a failed update must fail `agent rollout --wait`: {r:#}"
    );
    assert_eq!(r["state"], "reverted", "{r:#}");
    let member = &r["members"][0];
    assert_eq!(member["state"], "failed", "{r:#}");
    let reason = r["reason"].as_str().unwrap().to_string();
    assert!(reason.contains(version), "{reason}");

    assert!(w.proc.alive(), "the agent went away:\n{}", w.proc.tail(40));
    assert_eq!(
        w.proc.pid(),
        pid,
        "the old agent runs on in the same process"
    );
    assert!(
        fs::read(exe_of(w)).unwrap() == before,
        "the binary is untouched"
    );
    assert_eq!(bin_files(w), ["edge-worker"], "nothing staged is left");
    wait_for("the old agent back online", secs(30), || {
        (c.status_of(id) == "online" && agent_version(c, id) == running).then_some(())
    });
    let failed = wait_for("AgentUpdateFailed event", secs(20), || {
        events(c, id, "AgentUpdateFailed")
            .into_iter()
            .find(|e| e.starts_with(&format!("{version}: ")))
    });
    wait_for("the record removed", secs(10), || {
        record(w).is_none().then_some(())
    });
    failed
}

#[test]
fn a_new_agent_that_exits_hangs_or_cannot_connect_is_rolled_back_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let next = agent_with_version(NEXT);
    let (key, public) = release_key(dir.path(), "release.key");
    let c = Conductor::start_with_env(
        &dir.path().join("conductor"),
        &["--release-key", &public],
        &[("AEREKOS_ALERT_INTERVAL", "200ms")],
    );
    let (status, rule) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "agent", "kind": "agent_update_failed"}),
    );
    assert_eq!(status, 201, "{rule}");
    let (mut ws, ids) = fleet(dir.path(), &c, 1);
    let (w, id) = (&mut ws[0], &ids[0]);

    // The real new agent, pointed at a broker that is not there.
    let dead = free_port();
    let unreachable = script(
        dir.path(),
        "unreachable",
        &format!(
            "AEREKOS_MQTT_URL=mqtt://127.0.0.1:{dead} exec {} \"$@\"",
            next.display()
        ),
    );
    let why = fails_its_trial(&c, w, id, &key, NEXT, &unreachable);
    assert!(why.contains("within 5 s"), "{why}");

    let exits = script(dir.path(), "exits", "exit 3");
    let why = fails_its_trial(&c, w, id, &key, "0.99.1", &exits);
    assert!(why.contains("exited") && why.contains('3'), "{why}");

    let hangs = script(dir.path(), "hangs", "exec sleep 600");
    let why = fails_its_trial(&c, w, id, &key, "0.99.2", &hangs);
    assert!(why.contains("within 5 s"), "{why}");
    // The hung child was killed, not left behind.
    let left = e2e::chaos::pids_with(".edge-worker-0.99.2.new");
    assert!(left.is_empty(), "{}", e2e::chaos::describe(&left));

    // The failures raised the agent_update_failed alert for the worker.
    wait_for("agent_update_failed alert", secs(20), || {
        let (_, a) = c.get("/api/v1/alerts");
        a["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["rule"] == "agent" && a.to_string().contains(id.as_str()))
            .map(|_| ())
    });
}

#[test]
fn a_release_signed_by_another_key_or_built_for_another_arch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let next = agent_with_version(NEXT);
    let (key, public) = release_key(dir.path(), "release.key");
    let (_, other) = release_key(dir.path(), "other.key");
    let c = Conductor::start_with(&dir.path().join("conductor"), &["--release-key", &public]);

    // This machine's build released for another arch: the CLI reads the
    // ELF header and refuses to sign it (the agent checks it again).
    let other_arch = if ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let k = key.to_str().unwrap();
    let (ok, out, err) = cli(
        &c,
        &[
            "agent",
            "release",
            "--key",
            k,
            "--version",
            NEXT,
            "--arch",
            other_arch,
            next.to_str().unwrap(),
        ],
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("refusing to sign") && err.contains(other_arch),
        "{err}"
    );
    let (_, releases, _) = cli(&c, &["--json", "agent", "releases"]);
    assert!(!releases.contains(NEXT), "nothing registered: {releases}");
    // The operator pinned another key on this device.
    let token = c.registration_token();
    let mut w = worker(dir.path(), "pinned", &c, &token, &["--release-key", &other]);
    let id = w.wait_id();
    wait_for("online", secs(30), || {
        (c.status_of(&id) == "online").then_some(())
    });
    let pid = w.proc.pid();
    let before = fs::read(exe_of(&w)).unwrap();

    release(&c, &key, NEXT, &next);
    let (ok, r) = rollout(&c, NEXT, &["--trial", "5"]);
    assert!(!ok, "{r:#}");
    assert_eq!(r["state"], "reverted", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("does not verify"), "{reason}");
    assert_eq!(w.proc.pid(), pid);
    assert!(w.proc.alive());
    assert!(fs::read(exe_of(&w)).unwrap() == before);
    assert_eq!(bin_files(&w), ["edge-worker"]);
    assert!(record(&w).is_none(), "a refused update writes nothing");
    assert_ne!(agent_version(&c, &id), NEXT);
}

/// A release signed without the CLI's ELF check (another signing tool, or
/// a key holder's script) whose binary is for another arch: the agent reads
/// the staged copy's ELF header, refuses, and changes nothing.
#[test]
fn a_binary_for_another_arch_signed_anyway_is_refused_by_the_agent() {
    use aerekos_cli::agent::{read_key, sha256_file, sign_release};
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = release_key(dir.path(), "release.key");
    let c = Conductor::start_with(&dir.path().join("conductor"), &["--release-key", &public]);
    let token = c.registration_token();
    let mut w = worker(dir.path(), "arch", &c, &token, &[]);
    let id = w.wait_id();
    wait_for("online", secs(30), || {
        (c.status_of(&id) == "online").then_some(())
    });
    let pid = w.proc.pid();
    let before = fs::read(exe_of(&w)).unwrap();

    // An ELF executable of another machine, signed for this one.
    let foreign = if ARCH == "aarch64" {
        bin("test-service")
    } else {
        pi_test_service_bin().to_path_buf()
    };
    let pair = read_key(&key).unwrap();
    let sha = sha256_file(&foreign).unwrap();
    let signature = sign_release(&pair, NEXT, ARCH, &sha).unwrap();
    let api = aerekos_cli::Client::new(&c.url(), Some(c.admin.clone()));
    api.upload(fs::File::open(&foreign).unwrap(), ARCH, "foreign")
        .unwrap();
    api.send(
        "POST",
        "/agent-releases",
        &json!({"version": NEXT, "arch": ARCH, "sha256": protocol::hex_string(&sha),
                "signature": signature}),
    )
    .unwrap();

    let (ok, r) = rollout(&c, NEXT, &["--trial", "5"]);
    assert!(!ok, "{r:#}");
    assert_eq!(r["state"], "reverted", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("ELF executable for") && reason.contains(ARCH),
        "{reason}"
    );
    wait_for("the AgentUpdateFailed event", secs(20), || {
        let failed = events(&c, &id, "AgentUpdateFailed");
        failed
            .iter()
            .any(|d| d.contains("ELF executable for"))
            .then_some(())
    });
    assert_eq!(w.proc.pid(), pid);
    assert!(w.proc.alive(), "{}", w.proc.tail(30));
    assert!(fs::read(exe_of(&w)).unwrap() == before);
    assert_eq!(bin_files(&w), ["edge-worker"], "nothing staged is left");
    assert!(record(&w).is_none(), "a refused update writes nothing");
    assert_ne!(agent_version(&c, &id), NEXT);
    assert_eq!(c.status_of(&id), "online");
}

#[test]
fn an_agent_killed_during_the_trial_reports_the_failed_update_and_kills_the_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = release_key(dir.path(), "release.key");
    let c = Conductor::start_with(&dir.path().join("conductor"), &["--release-key", &public]);
    let (mut ws, ids) = fleet(dir.path(), &c, 1);
    let (w, id) = (&mut ws[0], &ids[0]);
    let running = agent_version(&c, id);

    let hangs = script(dir.path(), "hangs", "exec sleep 600");
    release(&c, &key, "0.99.5", &hangs);
    let (ok, out, err) = cli(
        &c,
        &["agent", "rollout", "--version", "0.99.5", "--trial", "300"],
    );
    assert!(ok, "{err}{out}");
    let child = wait_for("the trial child recorded", secs(60), || {
        let r = record(w)?;
        (r["phase"] == "trial").then(|| r["child"][0].as_u64())?
    });
    let child = u32::try_from(child).unwrap();
    assert!(Path::new(&format!("/proc/{child}")).exists());

    w.restart(); // kill -9, then the same (old) binary again
    wait_for("the orphaned trial child killed", secs(30), || {
        let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init to reap it.
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
    let failed = wait_for("AgentUpdateFailed event", secs(30), || {
        events(&c, id, "AgentUpdateFailed").into_iter().next()
    });
    assert!(failed.contains("during the trial"), "{failed}");
    assert_eq!(agent_version(&c, id), running);
    assert_eq!(bin_files(w), ["edge-worker"]);
    let r = wait_for("rollout reverted", secs(30), || {
        let (_, r) = c.get("/api/v1/agent-rollouts");
        let r = r["rollouts"].as_array()?.first()?.clone();
        (r["state"] == "reverted").then_some(r)
    });
    assert!(r["reason"].as_str().unwrap().contains("0.99.5"), "{r:#}");
}

#[test]
fn the_conductor_killed_during_the_update_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let next = agent_with_version(NEXT);
    let (key, public) = release_key(dir.path(), "release.key");
    let mut c = Conductor::start_with(&dir.path().join("conductor"), &["--release-key", &public]);
    let (mut ws, ids) = fleet(dir.path(), &c, 1);
    let (w, id) = (&mut ws[0], &ids[0]);
    let pid = w.proc.pid();

    release(&c, &key, NEXT, &next);
    let (ok, out, err) = cli(
        &c,
        &[
            "agent",
            "rollout",
            "--version",
            NEXT,
            "--trial",
            "120",
            "--settle",
            "1",
        ],
    );
    assert!(ok, "{err}{out}");
    // Once the device has the release staged (or is already trying it),
    // the conductor goes away for a while.
    wait_for("the update under way", secs(60), || record(w).map(|_| ()));
    c.proc.kill9();
    std::thread::sleep(secs(3));
    c.restart_after_kill9();

    wait_for("the new agent online", secs(90), || {
        (c.status_of(id) == "online" && agent_version(&c, id) == NEXT).then_some(())
    });
    let r = wait_for("rollout succeeded", secs(60), || {
        let (_, r) = c.get("/api/v1/agent-rollouts");
        let r = r["rollouts"].as_array()?.first()?.clone();
        (r["state"] != "in_progress").then_some(r)
    });
    assert_eq!(r["state"], "succeeded", "{r:#}");
    assert!(w.proc.alive(), "{}", w.proc.tail(40));
    assert_eq!(w.proc.pid(), pid);
    assert!(fs::read(exe_of(w)).unwrap() == fs::read(&next).unwrap());
    wait_for("AgentUpdated event", secs(30), || {
        Some(events(&c, id, "AgentUpdated")).filter(|e| !e.is_empty())
    });
}
