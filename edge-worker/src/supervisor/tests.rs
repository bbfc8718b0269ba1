//! The supervisor's unit tests: process services through the public API
//! (deploy, stop, adoption, restart policy, logs) and the files it keeps.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use protocol::frame::{EnvVar, MAX_ARGS};
use protocol::manifest::Program;
use protocol::ServiceSpec;
use rustix::process::{kill_process, Pid};

use super::desired::{Desired, DesiredFile};
use super::process::{read_pid_file, write_pid_file, PidFile, INSTANCE_ENV, SPAWNING_FILE};
use super::*;
use crate::fetch;
use crate::logs::{LOG_FILE, LOG_OLD};

/// A `sleep` argument no other process has: `9<n>.<pid><nanos>`.
fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("9{n}.{}{nanos}", std::process::id())
}

/// Pids of live processes whose command line has `needle` in an argument.
fn procs_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let found = cmdline
            .split(|b| *b == 0)
            .any(|a| String::from_utf8_lossy(a).contains(needle));
        if found && proc_start_time(pid).is_some() {
            out.push(pid);
        }
    }
    out
}

/// A process id from `/proc` or a pid file as rustix takes it.
fn as_pid(raw: u32) -> Pid {
    Pid::from_raw(i32::try_from(raw).unwrap()).unwrap()
}

/// Kills every process carrying the marker on drop, even after a failure.
struct Reaper(Vec<String>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for m in &self.0 {
            for pid in procs_with(m) {
                if let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                    let _ = kill_process(p, Signal::KILL);
                }
            }
        }
    }
}

fn spec(name: &str, version: u32, command: &str, args: &[&str]) -> ServiceSpec {
    let mut a: heapless::Vec<heapless::String<64>, MAX_ARGS> = heapless::Vec::new();
    for x in args {
        a.push(bounded(x)).unwrap();
    }
    ServiceSpec {
        name: bounded(name),
        version,
        command: bounded(command),
        args: a,
        env: heapless::Vec::new(),
        working_dir: bounded(""),
        restart: RestartPolicy::Always,
        max_restarts: 5,
        restart_window_s: 60,
        backoff_ms: 100,
    }
}

/// Polls until `pred` holds for the service's status (panics after 10 s).
fn wait_for(
    sup: &mut Supervisor,
    name: &str,
    what: &str,
    pred: impl Fn(&ServiceStatus) -> bool,
) -> ServiceStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        sup.poll();
        if let Some(st) = sup.status(name) {
            if pred(&st) {
                return st;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            sup.status(name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn running(st: &ServiceStatus) -> bool {
    st.state == ServiceState::Running && st.pid != 0
}

#[test]
fn an_installed_manifest_is_never_started_and_stays_stopped_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (u1, u2) = (unique(), unique());
    let _r = Reaper(vec![u1.clone(), u2.clone()]);
    let mut sup = Supervisor::load(dir.path());
    let v1 = spec_to_manifest(&spec("idle", 1, "sleep", &[&u1]));
    assert_eq!(
        sup.install_manifest(v1.clone()).unwrap(),
        "installed version 1, not started"
    );
    let changes = sup.take_changes();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        (changes[0].version, changes[0].state, changes[0].pid),
        (1, ServiceState::Stopped, 0)
    );
    assert_eq!(changes[0].detail.as_str(), INSTALLED_STOPPED);
    for _ in 0..5 {
        sup.poll();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(procs_with(&u1).is_empty());
    // The same version again: nothing changes, nothing is written.
    let saved = fs::read(dir.path().join(SERVICES_FILE)).unwrap();
    assert_eq!(sup.install_manifest(v1).unwrap(), "unchanged");
    assert!(sup.take_changes().is_empty());
    assert_eq!(fs::read(dir.path().join(SERVICES_FILE)).unwrap(), saved);

    // Started, then a new version installed: the copy is stopped, the
    // new version is not started.
    sup.start("idle").unwrap();
    let pid = wait_for(&mut sup, "idle", "v1 running", running).pid;
    let v2 = spec_to_manifest(&spec("idle", 2, "sleep", &[&u2]));
    let how = sup.install_manifest(v2).unwrap();
    assert!(how.contains("stopping the running copy"), "{how}");
    let st = wait_for(&mut sup, "idle", "v2 stopped", |s| {
        s.state == ServiceState::Stopped && s.pid == 0
    });
    assert_eq!(st.version, 2);
    assert_eq!(proc_start_time(pid), None, "the old copy is gone");
    drop(sup);

    // A new supervisor (a worker restart) keeps it stopped.
    let mut sup = Supervisor::load(dir.path());
    let st = sup.status("idle").unwrap();
    assert_eq!(
        (st.version, st.state, st.pid),
        (2, ServiceState::Stopped, 0)
    );
    for _ in 0..5 {
        sup.poll();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(procs_with(&u2).is_empty() && procs_with(&u1).is_empty());
    // Installing it stopped again is a no-op; `start` runs version 2.
    assert_eq!(
        sup.install_manifest(spec_to_manifest(&spec("idle", 2, "sleep", &[&u2])))
            .unwrap(),
        "unchanged"
    );
    sup.start("idle").unwrap();
    let st = wait_for(&mut sup, "idle", "v2 running", running);
    assert_eq!(st.version, 2);
    sup.remove("idle").unwrap();
    wait_removed(&mut sup, "idle");
}

#[test]
fn the_poll_deadline_does_not_move_when_asked_again() {
    // The session asks for the next wake after every event; with events
    // more often than POLL_INTERVAL the poll must still come.
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    sup.deploy(spec("web", 1, "sleep", &[&u])).unwrap();
    sup.poll();
    let due = sup.next_wake().expect("a process runs");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        sup.next_wake(),
        Some(due),
        "asking again keeps the deadline"
    );
    assert!(due <= Instant::now() + POLL_INTERVAL);
    sup.remove("web").unwrap();
    wait_removed(&mut sup, "web");
}

#[test]
fn a_copy_spawned_without_a_pid_file_is_killed_at_the_next_start() {
    // The previous run was killed between the spawn and the pid file:
    // the next start must not leave that copy running beside its own.
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let file = DesiredFile {
        services: vec![Desired {
            manifest: Some(spec_to_manifest(&spec("web", 1, "sleep", &[&u]))),
            spec: None,
            run: true,
            removing: false,
        }],
    };
    fs::write(
        dir.path().join(SERVICES_FILE),
        serde_json::to_vec(&file).unwrap(),
    )
    .unwrap();
    let svc_dir = dir.path().join(SERVICES_DIR).join("web");
    fs::create_dir_all(&svc_dir).unwrap();
    fs::write(svc_dir.join(SPAWNING_FILE), "test-instance-1").unwrap();
    let mut orphan = Command::new("sleep")
        .arg(&u)
        .env(INSTANCE_ENV, "test-instance-1")
        .process_group(0)
        .spawn()
        .unwrap();
    let mut sup = Supervisor::load(dir.path());
    let st = wait_for(&mut sup, "web", "running", running);
    assert_ne!(st.pid, orphan.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while orphan.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the unrecorded copy still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(procs_with(&u), vec![st.pid], "one copy");
    assert!(!svc_dir.join(SPAWNING_FILE).exists());
    sup.remove("web").unwrap();
    wait_removed(&mut sup, "web");
}

#[test]
fn loading_a_finished_removal_keeps_the_artifact_of_a_later_entry() {
    // A worker killed while a removal and a deploy of the same artifact
    // were pending: at its next start, finishing the removal must not
    // prune the artifact the deploy needs.
    let dir = tempfile::tempdir().unwrap();
    let sha = [7u8; 32];
    let with_artifact = |name: &str| {
        let mut m = spec_to_manifest(&spec(name, 1, "unused", &[]));
        if let Runtime::Process(p) = &mut m.runtime {
            p.program = Program::Artifacts(vec![protocol::manifest::ArtifactRef {
                arch: std::env::consts::ARCH.to_string(),
                sha256: sha,
                size: 4,
            }]);
        }
        m
    };
    let file = DesiredFile {
        services: vec![
            Desired {
                manifest: Some(with_artifact("a-old")),
                spec: None,
                run: true,
                removing: true,
            },
            Desired {
                manifest: Some(with_artifact("b-new")),
                spec: None,
                run: false,
                removing: false,
            },
        ],
    };
    fs::write(
        dir.path().join(SERVICES_FILE),
        serde_json::to_vec(&file).unwrap(),
    )
    .unwrap();
    let cached = fetch::artifact_path(dir.path(), &sha);
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::write(&cached, b"elf?").unwrap();
    let sup = Supervisor::load(dir.path());
    assert!(sup.status("a-old").is_none(), "the removal finished");
    assert!(sup.status("b-new").is_some());
    assert!(cached.exists(), "b-new's artifact was pruned");
}

/// The first element of a process's command line and its `comm`.
fn argv0_and_comm(pid: u32) -> (String, String) {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    (
        String::from_utf8_lossy(argv0).into_owned(),
        comm.trim_end().to_string(),
    )
}

#[test]
fn an_artifact_service_runs_under_its_name_and_a_command_under_its_own() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let (u1, u2) = (unique(), unique());
    let _r = Reaper(vec![u1.clone(), u2.clone()]);
    // `sleep` as the cached artifact, named by its SHA-256.
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("a sleep binary");
    let bytes = fs::read(sleep).unwrap();
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    // Loaded first: loading prunes the cached artifacts nothing needs.
    let mut sup = Supervisor::load(dir.path());
    let cached = fetch::artifact_path(dir.path(), &sha);
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::write(&cached, &bytes).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&cached, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let mut m = spec_to_manifest(&spec("sensor-reader", 1, "unused", &[&u1]));
    if let Runtime::Process(p) = &mut m.runtime {
        p.program = Program::Artifacts(vec![protocol::manifest::ArtifactRef {
            arch: std::env::consts::ARCH.to_string(),
            sha256: sha,
            size: bytes.len() as u64,
        }]);
    }
    sup.deploy_manifest(m).unwrap();
    let pid = wait_for(&mut sup, "sensor-reader", "running", running).pid;
    assert_eq!(
        argv0_and_comm(pid),
        ("sensor-reader".into(), "sensor-reader".into()),
        "ps and top show the service's name, not the artifact's hash"
    );
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&u1),
        "its arguments follow"
    );
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        fs::canonicalize(&cached).unwrap(),
        "it runs the cached artifact"
    );
    // A command keeps its argv[0] (a multi-call binary dispatches on it).
    sup.deploy(spec("napper", 1, "sleep", &[&u2])).unwrap();
    let pid = wait_for(&mut sup, "napper", "running", running).pid;
    assert_eq!(argv0_and_comm(pid), ("sleep".into(), "sleep".into()));
    for name in ["sensor-reader", "napper"] {
        sup.remove(name).unwrap();
        wait_removed(&mut sup, name);
    }
}

#[test]
fn kill_9_restarts_with_a_new_pid() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    assert_eq!(
        sup.deploy(spec("web", 1, "sleep", &[&u])).unwrap(),
        "deployed version 1"
    );
    let first = wait_for(&mut sup, "web", "running", running);
    assert!(proc_start_time(first.pid).is_some());
    assert_eq!(procs_with(&u), vec![first.pid]);
    let pidfile = read_pid_file(&dir.path().join("services/web")).unwrap();
    assert_eq!((pidfile.pid, pidfile.version), (first.pid, 1));

    kill_process(as_pid(first.pid), Signal::KILL).unwrap();
    let second = wait_for(&mut sup, "web", "restart", |s| {
        running(s) && s.pid != first.pid
    });
    assert_eq!(second.restarts, 1);
    assert_eq!(second.exit_code, None, "killed by a signal");
    assert_eq!(procs_with(&u), vec![second.pid]);
    let states: Vec<ServiceState> = sup.take_changes().iter().map(|s| s.state).collect();
    assert!(states.contains(&ServiceState::Backoff), "{states:?}");
    sup.remove("web").unwrap();
    wait_removed(&mut sup, "web");
    assert!(procs_with(&u).is_empty());
    assert!(!dir.path().join("services/web").exists());
}

/// Polls until the service is forgotten; checks `Removed` was reported.
fn wait_removed(sup: &mut Supervisor, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while sup.status(name).is_some() {
        assert!(
            Instant::now() < deadline,
            "not removed: {:?}",
            sup.status(name)
        );
        std::thread::sleep(Duration::from_millis(20));
        sup.poll();
        seen.extend(sup.take_changes());
    }
    seen.extend(sup.take_changes());
    let last = seen
        .iter()
        .rev()
        .find(|s| s.name == name)
        .expect("a status");
    assert_eq!(last.state, ServiceState::Removed);
    assert_eq!(last.pid, 0);
}

#[test]
fn a_command_failing_repeatedly_ends_failed() {
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::load(dir.path());
    let mut s = spec("bad", 1, "sh", &["-c", "exit 1"]);
    s.max_restarts = 3;
    sup.deploy(s).unwrap();
    let st = wait_for(&mut sup, "bad", "failed", |s| {
        s.state == ServiceState::Failed
    });
    assert_eq!(st.restarts, 3);
    assert_eq!(st.exit_code, Some(1));
    assert!(st.detail.contains("3 restarts in 60 s"), "{}", st.detail);
    assert_eq!(sup.next_wake(), None, "nothing more to do");
    // A start by request tries again, counters reset.
    assert_eq!(sup.start("bad").unwrap(), "starting");
    assert_eq!(sup.status("bad").unwrap().restarts, 0);
    // Failed again, the same manifest deployed again (the conductor's
    // retry) starts it afresh too; while it runs, it is unchanged.
    wait_for(&mut sup, "bad", "failed again", |s| {
        s.state == ServiceState::Failed
    });
    let mut same = spec("bad", 1, "sh", &["-c", "exit 1"]);
    same.max_restarts = 3;
    assert_eq!(sup.deploy(same.clone()).unwrap(), "starting");
    assert_ne!(sup.status("bad").unwrap().state, ServiceState::Failed);
    let mut sleepy = spec("nap", 1, "sleep", &["30"]);
    sleepy.max_restarts = 3;
    sup.deploy(sleepy.clone()).unwrap();
    assert_eq!(sup.deploy(sleepy).unwrap(), "unchanged");
}

#[test]
fn never_policy_exit_0_is_stopped_and_spawn_errors_fail() {
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::load(dir.path());
    let mut s = spec("once", 1, "true", &[]);
    s.restart = RestartPolicy::Never;
    sup.deploy(s).unwrap();
    let st = wait_for(&mut sup, "once", "stopped", |s| {
        s.state == ServiceState::Stopped
    });
    assert_eq!((st.exit_code, st.restarts, st.pid), (Some(0), 0, 0));

    sup.deploy(spec("nope", 1, "/nonexistent/aerekos-cmd", &[]))
        .unwrap();
    let st = sup.status("nope").unwrap();
    assert_eq!(st.state, ServiceState::Failed);
    assert!(st.detail.contains("cannot start"), "{}", st.detail);
    assert_eq!(sup.next_wake(), None);
    // A `never` service that failed stays failed when deployed again.
    let mut never = spec("never", 1, "sh", &["-c", "exit 3"]);
    never.restart = RestartPolicy::Never;
    sup.deploy(never.clone()).unwrap();
    wait_for(&mut sup, "never", "failed", |s| {
        s.state == ServiceState::Failed
    });
    assert_eq!(sup.deploy(never).unwrap(), "unchanged");

    assert!(sup.start("ghost").is_err());
    assert!(sup.restart("ghost").is_err());
    assert!(sup.stop("ghost").is_err());
    assert!(sup.remove("ghost").is_err());
    assert!(sup.deploy(spec("../x", 1, "true", &[])).is_err());
}

#[test]
fn stop_and_remove_kill_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    let script = format!("sleep {u} & wait");
    sup.deploy(spec("tree", 1, "sh", &["-c", &script])).unwrap();
    let st = wait_for(&mut sup, "tree", "running", running);
    // The forked sleep shows up.
    let t0 = Instant::now();
    while procs_with(&u).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{:?}",
            procs_with(&u)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(procs_with(&u).contains(&st.pid));

    assert_eq!(sup.stop("tree").unwrap(), "stopping");
    let st = wait_for(&mut sup, "tree", "stopped", |s| {
        s.state == ServiceState::Stopped
    });
    assert_eq!(st.pid, 0);
    assert!(procs_with(&u).is_empty(), "{:?}", procs_with(&u));
    assert!(!dir.path().join("services/tree/pid").exists());
    let saved = fs::read_to_string(dir.path().join(SERVICES_FILE)).unwrap();
    assert!(saved.contains("\"run\": false"), "{saved}");

    // Start again, then remove while running.
    sup.start("tree").unwrap();
    wait_for(&mut sup, "tree", "running", running);
    sup.remove("tree").unwrap();
    wait_removed(&mut sup, "tree");
    assert!(procs_with(&u).is_empty(), "{:?}", procs_with(&u));
    let saved = fs::read_to_string(dir.path().join(SERVICES_FILE)).unwrap();
    assert!(!saved.contains("tree"), "{saved}");
}

#[test]
fn a_new_supervisor_adopts_the_running_copy() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    // The marker reaches `sleep` through the environment only, so just
    // the forked child carries it in its command line.
    let mut s = spec("keep", 1, "sh", &["-c", "sleep $MARK & wait"]);
    s.env
        .push(EnvVar {
            name: bounded("MARK"),
            value: bounded(&u),
        })
        .unwrap();
    sup.deploy(s).unwrap();
    let first = wait_for(&mut sup, "keep", "running", running);
    drop(sup); // the worker exits: the service keeps running

    let mut sup = Supervisor::load(dir.path());
    let st = sup.status("keep").unwrap();
    assert_eq!((st.state, st.pid), (ServiceState::Running, first.pid));
    let changes = sup.take_changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].pid, first.pid);
    for _ in 0..5 {
        sup.poll();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sup.status("keep").unwrap().pid, first.pid);
    let t0 = Instant::now();
    while procs_with(&u).len() != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{:?}",
            procs_with(&u)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Stopping an adopted copy goes through its process group.
    sup.stop("keep").unwrap();
    wait_for(&mut sup, "keep", "stopped", |s| {
        s.state == ServiceState::Stopped
    });
    assert!(procs_with(&u).is_empty(), "{:?}", procs_with(&u));
    // Stopped stays stopped across a reload.
    drop(sup);
    let sup = Supervisor::load(dir.path());
    assert_eq!(sup.status("keep").unwrap().state, ServiceState::Stopped);
    assert!(procs_with(&u).is_empty());
}

#[test]
fn a_dead_pid_is_started_fresh_and_a_reused_pid_is_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    sup.deploy(spec("fresh", 1, "sleep", &[&u])).unwrap();
    let first = wait_for(&mut sup, "fresh", "running", running);
    drop(sup);
    kill_process(as_pid(first.pid), Signal::KILL).unwrap();
    let t0 = Instant::now();
    while !procs_with(&u).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let sup = Supervisor::load(dir.path());
    let st = sup.status("fresh").unwrap();
    assert!(running(&st) && st.pid != first.pid, "{st:?}");
    assert_eq!(procs_with(&u), vec![st.pid]);
    drop(sup);

    // A pid file naming a live process with another start time (our
    // own pid, "reused"): not adopted, not signalled, started fresh.
    let svc_dir = dir.path().join("services/fresh");
    let own = PidFile {
        pid: std::process::id(),
        start_time: 1,
        version: 1,
    };
    kill_process(as_pid(st.pid), Signal::KILL).unwrap();
    write_pid_file(&svc_dir, &own);
    let mut sup = Supervisor::load(dir.path());
    let again = wait_for(&mut sup, "fresh", "running", running);
    assert_ne!(again.pid, std::process::id());
    let t0 = Instant::now();
    while procs_with(&u) != vec![again.pid] {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{:?}",
            procs_with(&u)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sup.remove("fresh").unwrap();
    wait_removed(&mut sup, "fresh");
}

#[test]
fn a_new_version_replaces_the_old_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (u1, u2) = (unique(), unique());
    let _r = Reaper(vec![u1.clone(), u2.clone()]);
    let mut sup = Supervisor::load(dir.path());
    sup.deploy(spec("app", 1, "sleep", &[&u1])).unwrap();
    let v1 = wait_for(&mut sup, "app", "v1 running", running);
    assert_eq!(
        sup.deploy(spec("app", 1, "sleep", &[&u1])).unwrap(),
        "unchanged"
    );
    assert_eq!(sup.status("app").unwrap().pid, v1.pid);

    sup.deploy(spec("app", 2, "sleep", &[&u2])).unwrap();
    // Never both: while v1 stops, v2 is not started.
    assert!(procs_with(&u2).is_empty());
    let v2 = wait_for(&mut sup, "app", "v2 running", |s| {
        running(s) && s.version == 2
    });
    assert_ne!(v2.pid, v1.pid);
    assert!(procs_with(&u1).is_empty());
    assert_eq!(procs_with(&u2), vec![v2.pid]);
    assert_eq!(v2.restarts, 0);

    // Restart by request: a new pid, one copy.
    sup.restart("app").unwrap();
    let v2b = wait_for(&mut sup, "app", "restarted", |s| {
        running(s) && s.pid != v2.pid
    });
    assert_eq!(procs_with(&u2), vec![v2b.pid]);
    sup.remove("app").unwrap();
    wait_removed(&mut sup, "app");
}

#[test]
fn output_goes_to_a_bounded_log() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    let script = format!("echo hello; echo oops >&2; sleep {u}");
    sup.deploy(spec("log", 1, "sh", &["-c", &script])).unwrap();
    wait_for(&mut sup, "log", "running", running);
    let t0 = Instant::now();
    while sup.logs("log", 10).unwrap() != "hello\noops\n" {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{:?}",
            sup.logs("log", 10)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sup.logs("log", 1).unwrap(), "oops\n");
    assert_eq!(sup.logs("nope", 1), None);
    let svc_dir = dir.path().join("services/log");
    fs::write(
        svc_dir.join(LOG_FILE),
        vec![b'x'; usize::try_from(LOG_MAX).unwrap() + 10],
    )
    .unwrap();
    rotate_log(&svc_dir);
    assert_eq!(fs::metadata(svc_dir.join(LOG_FILE)).unwrap().len(), 0);
    assert_eq!(fs::metadata(svc_dir.join(LOG_OLD)).unwrap().len(), LOG_MAX);
    sup.remove("log").unwrap();
    wait_removed(&mut sup, "log");
}

#[test]
fn a_group_ignoring_sigterm_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    let mut sup = Supervisor::load(dir.path());
    // An ignored signal stays ignored in the forked sleep too.
    let script = format!("trap '' TERM; sleep {u} & wait");
    sup.deploy(spec("stubborn", 1, "sh", &["-c", &script]))
        .unwrap();
    wait_for(&mut sup, "stubborn", "running", running);
    let t0 = Instant::now();
    while procs_with(&u).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    sup.stop("stubborn").unwrap();
    wait_for(&mut sup, "stubborn", "stopped", |s| {
        s.state == ServiceState::Stopped
    });
    assert!(t0.elapsed() >= STOP_TIMEOUT, "{:?}", t0.elapsed());
    assert!(procs_with(&u).is_empty(), "{:?}", procs_with(&u));
}

#[test]
fn a_services_file_of_an_older_worker_is_converted() {
    let dir = tempfile::tempdir().unwrap();
    let u = unique();
    let _r = Reaper(vec![u.clone()]);
    // The format written before manifests: the spec itself.
    let old = serde_json::json!({
        "services": [{ "spec": spec("legacy", 3, "sleep", &[&u]), "run": true }]
    });
    fs::write(dir.path().join(SERVICES_FILE), old.to_string()).unwrap();
    let mut sup = Supervisor::load(dir.path());
    let st = wait_for(&mut sup, "legacy", "running", running);
    assert_eq!(st.version, 3);
    assert_eq!(procs_with(&u), vec![st.pid]);
    let m = sup.manifest("legacy").unwrap();
    assert_eq!(
        m.runtime,
        spec_to_manifest(&spec("legacy", 3, "sleep", &[&u])).runtime
    );
    // Rewritten as a manifest at the next change.
    sup.stop("legacy").unwrap();
    let saved = fs::read_to_string(dir.path().join(SERVICES_FILE)).unwrap();
    assert!(
        saved.contains("\"manifest\"") && !saved.contains("\"spec\""),
        "{saved}"
    );
    wait_for(&mut sup, "legacy", "stopped", |s| {
        s.state == ServiceState::Stopped
    });
}

#[test]
fn start_time_of_this_process() {
    assert!(proc_start_time(std::process::id()).is_some());
    assert_eq!(proc_start_time(u32::MAX), None);
}
