//! The process backend: spawning a service in its own process group with
//! its output in `output.log`, the pid file and the spawn marker that let
//! the next worker adopt it (or kill a copy it never recorded), signals to
//! the group, watching adopted copies through `/proc`, and the bounded log.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use protocol::manifest::{ProcessRuntime, Program, Runtime};
use protocol::{EventKind, Manifest, ServiceState};
use rustix::process::{kill_process_group, Pid, Signal};
use serde::{Deserialize, Serialize};

use super::health::Health;
use super::{Proc, Service, Supervisor, LOG_MAX};
use crate::fetch;
use crate::logs::{LOG_FILE, LOG_OLD};
use crate::state::write_atomic;

pub(super) const PID_FILE: &str = "pid";
/// Written before a spawn, removed once the pid file is written: names the
/// instance id the new process carries in [`INSTANCE_ENV`], so a copy
/// spawned by a worker killed before it wrote the pid file is found (and
/// killed) by the next start instead of running twice.
pub(super) const SPAWNING_FILE: &str = "spawning";
/// Environment variable carrying a spawn's unique instance id.
pub(super) const INSTANCE_ENV: &str = "AEREKOS_INSTANCE";

/// Contents of a service's pid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PidFile {
    pub(super) pid: u32,
    pub(super) start_time: u64,
    pub(super) version: u32,
}

impl Proc {
    /// Has the process exited? `Some(code)` once it has (`None` inside:
    /// killed by a signal, or an adopted copy whose code is unknown). Our
    /// own children are reaped; containers are seen through inspections.
    pub(super) fn exited(&mut self, name: &str) -> Option<Option<i32>> {
        match self {
            Proc::None => None,
            Proc::Child(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.code()),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(service = name, "cannot wait for the process: {e}");
                    None
                }
            },
            Proc::Adopted { pid, start_time } => {
                if proc_start_time(*pid) == Some(*start_time) {
                    None
                } else {
                    Some(None)
                }
            }
            // Seen through inspections.
            Proc::Container { .. } => None,
        }
    }
}

/// At load: adopts the live copy named by the pid file in `svc_dir` (same
/// start time: a reused pid is neither adopted nor signalled) or deletes a
/// stale pid file; with nothing adopted, kills a copy the previous run
/// spawned without recording it. The spawn marker goes either way.
pub(super) fn adopt(svc: &mut Service, svc_dir: &Path, now: Instant) {
    let name = svc.manifest.name.as_str();
    if let Some(pf) = read_pid_file(svc_dir) {
        if proc_start_time(pf.pid) == Some(pf.start_time) {
            tracing::info!(service = %name, pid = pf.pid, "adopted the running copy");
            svc.proc = Proc::Adopted {
                pid: pf.pid,
                start_time: pf.start_time,
            };
            svc.proc_version = pf.version;
            svc.state = ServiceState::Running;
            svc.detail = "adopted".into();
            svc.health = svc.manifest.health.as_ref().map(|h| Health::new(h, now));
        } else {
            remove_file_logged(&svc_dir.join(PID_FILE));
        }
    }
    if matches!(svc.proc, Proc::None) {
        kill_unrecorded_copy(name, svc_dir);
    }
    remove_file_logged(&svc_dir.join(SPAWNING_FILE));
}

impl Supervisor {
    /// Starts the current manifest of process service `name` now.
    pub(super) fn spawn_process(&mut self, name: &str) {
        let dir = self.service_dir(name);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Runtime::Process(p) = &svc.manifest.runtime else {
            // Containers start through `spawn_container`.
            return;
        };
        svc.backoff_until = None;
        svc.state = ServiceState::Starting;
        svc.limits_note = None;
        svc.health = None;
        let (arch, events) = (&self.opts.arch, &mut self.events);
        let program = executable(name, &svc.manifest, p, arch, &self.dir, events);
        let spawned = program.and_then(|program| {
            let mut env: Vec<(String, String)> =
                p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            env.push((protocol::local_api::ENV_SERVICE.into(), name.to_string()));
            if let Some(hook) = &self.opts.extra_env {
                env.extend(hook(&svc.manifest));
            }
            let instance = instance_id();
            env.push((INSTANCE_ENV.into(), instance.clone()));
            note_spawning(&dir, &instance);
            // An artifact's path is its SHA-256: run under the service's
            // name (argv[0], and `comm` through the link) so that `ps` and
            // `top` tell services apart. A command keeps its own argv[0]
            // (a multi-call binary such as busybox dispatches on it).
            let arg0 = matches!(p.program, Program::Artifacts(_)).then_some(name);
            launch(&program, arg0, p, &env, &dir)
                .map_err(|e| format!("cannot start {:?}: {e}", program.display()))
        });
        let cgroups = &self.opts.cgroups;
        match spawned {
            Ok((child, start_time)) => {
                let pid = child.id();
                let pf = PidFile {
                    pid,
                    start_time,
                    version: svc.manifest.version,
                };
                write_pid_file(&dir, &pf);
                remove_file_logged(&dir.join(SPAWNING_FILE));
                match cgroups.apply(name, &svc.manifest.limits) {
                    Ok(Some(cg)) => {
                        if let Err(e) = cgroups.attach(&cg, pid) {
                            svc.limits_note = Some(format!("limits not applied: {e}"));
                        }
                    }
                    Ok(None) => cgroups.remove(name),
                    Err(reason) => svc.limits_note = Some(format!("limits not applied: {reason}")),
                }
                if let Some(note) = &svc.limits_note {
                    tracing::warn!(service = name, "{note}");
                }
                tracing::info!(
                    service = name,
                    pid,
                    version = svc.manifest.version,
                    "started"
                );
                svc.proc = Proc::Child(child);
                svc.proc_version = svc.manifest.version;
                svc.state = ServiceState::Running;
                svc.detail = "running".into();
                let now = Instant::now();
                svc.health = svc.manifest.health.as_ref().map(|h| Health::new(h, now));
            }
            Err(e) => {
                tracing::warn!(service = name, "{e}");
                svc.state = ServiceState::Failed;
                svc.detail = e;
                let detail = format!("{name}: failed: {}", svc.detail);
                self.event(EventKind::ServiceChanged, detail);
            }
        }
        self.emit(name);
    }

    /// The last `tail_lines` lines of a service's output (stdout and stderr
    /// interleaved), `None` for an unknown service. Reads at most
    /// 2 × [`LOG_MAX`] bytes from disk.
    pub fn logs(&self, name: &str, tail_lines: usize) -> Option<String> {
        self.services.get(name)?;
        let dir = self.service_dir(name);
        let mut text = String::new();
        for f in [LOG_OLD, LOG_FILE] {
            if let Ok(bytes) = read_tail(&dir.join(f), LOG_MAX) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(tail_lines);
        let mut out = lines[from..].join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        Some(out)
    }
}

/// The executable of process service `name` on this worker: the command,
/// or the cached artifact for `arch` (under `state_dir`) after checking its
/// hash again; a file that no longer matches is deleted and raises an
/// `ArtifactRejected` event (on `events`). `Err`: why it cannot start.
fn executable(
    name: &str,
    m: &Manifest,
    p: &ProcessRuntime,
    arch: &str,
    state_dir: &Path,
    events: &mut Vec<(EventKind, String)>,
) -> Result<PathBuf, String> {
    match &p.program {
        Program::Command(c) => Ok(PathBuf::from(c)),
        Program::Artifacts(_) => {
            let Some(a) = m.artifact_for(arch) else {
                return Err(format!("no artifact for arch {arch}"));
            };
            let path = fetch::artifact_path(state_dir, &a.sha256);
            match fetch::verify_cached(&path, a) {
                Ok(()) => Ok(path),
                Err(e) => {
                    if let Some(why) = e.rejection() {
                        events.push((EventKind::ArtifactRejected, format!("{name}: {why}")));
                        Err(format!("cached artifact rejected: {e}"))
                    } else {
                        Err(format!(
                            "artifact {} is not in the cache (deploy again): {e}",
                            protocol::hex_string(&a.sha256)
                        ))
                    }
                }
            }
        }
    }
}

/// Directory in a service's dir holding the link named after the service
/// that an artifact service is executed through ([`named_link`]).
const EXE_DIR: &str = ".exe";

/// Spawns `program` with the manifest's args and working dir and `env` in
/// its own process group with output to the service's log; returns the
/// child and its start time (0 if unreadable). With `arg0` (the service's
/// name) the process gets it as `argv[0]` and is executed through
/// [`named_link`], so that its `comm` is that name too.
fn launch(
    program: &Path,
    arg0: Option<&str>,
    p: &ProcessRuntime,
    env: &[(String, String)],
    dir: &Path,
) -> io::Result<(Child, u64)> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let exe = match arg0 {
        Some(name) => named_link(dir, name, program).unwrap_or_else(|e| {
            tracing::debug!(service = name, "no link named after the service: {e}");
            program.to_path_buf()
        }),
        None => program.to_path_buf(),
    };
    let mut cmd = Command::new(&exe);
    if let Some(name) = arg0 {
        cmd.arg0(name);
    }
    // The worker's own settings (the registration token among them) are
    // not the service's business.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AEREKOS_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(&p.args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(if p.working_dir.is_empty() {
            dir
        } else {
            Path::new(p.working_dir.as_str())
        })
        .stdin(Stdio::null())
        .process_group(0);
    match fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(LOG_FILE))
    {
        Ok(log) => {
            let err = log.try_clone()?;
            cmd.stdout(log).stderr(err);
        }
        Err(e) => {
            tracing::warn!("cannot open the service log in {}: {e}", dir.display());
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = cmd.spawn()?;
    let start_time = proc_start_time(child.id()).unwrap_or(0);
    Ok((child, start_time))
}

/// `<dir>/.exe/<name>`, a symlink to `target` (replaced atomically): the
/// kernel names a process (`comm`, what `ps` and `top` show) after the file
/// it executes, and an artifact's file is named by its SHA-256.
/// `/proc/<pid>/exe` still resolves to the artifact.
fn named_link(dir: &Path, name: &str, target: &Path) -> io::Result<PathBuf> {
    if !protocol::manifest::valid_service_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a service name",
        ));
    }
    let exe_dir = dir.join(EXE_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&exe_dir)?;
    let link = exe_dir.join(name);
    let tmp = exe_dir.join(format!(".{name}.new"));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // A relative target would be read relative to the link's directory.
    std::os::unix::fs::symlink(std::path::absolute(target)?, &tmp)?;
    fs::rename(&tmp, &link)?;
    Ok(link)
}

/// Sends `sig` to the process group `pgid` (a service's pid); errors (the
/// group is gone) are ignored.
pub(super) fn signal_group(pgid: u32, sig: Signal) {
    let Some(pid) = i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = kill_process_group(pid, sig) {
        tracing::debug!(pgid, "signal to the group: {e}");
    }
}

/// Start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`) of
/// a live, non-zombie process; `None` if there is none.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may hold spaces and parentheses: split after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?; // field 3
    if state == "Z" || state == "X" {
        return None;
    }
    // Fields 4..=21 are skipped; the 19th after the state is field 22.
    fields.nth(18)?.parse().ok()
}

pub(super) fn read_pid_file(dir: &Path) -> Option<PidFile> {
    let bytes = fs::read(dir.join(PID_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) fn write_pid_file(dir: &Path, pf: &PidFile) {
    let path = dir.join(PID_FILE);
    let result = serde_json::to_vec(pf)
        .map_err(|e| e.to_string())
        .and_then(|b| write_atomic(&path, &b).map_err(|e| e.to_string()));
    if let Err(e) = result {
        // Without it the copy cannot be adopted after a worker restart.
        tracing::error!("cannot write {}: {e}", path.display());
    }
}

/// A spawn's instance id, unique on this machine.
fn instance_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}-{n}", std::process::id())
}

/// Records `instance` in `dir`'s [`SPAWNING_FILE`] before a spawn.
fn note_spawning(dir: &Path, instance: &str) {
    let result = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            write_atomic(&dir.join(SPAWNING_FILE), instance.as_bytes()).map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::warn!("cannot write {}: {e}", dir.join(SPAWNING_FILE).display());
    }
}

/// At load, with no adoptable pid file: kills the process group of a copy
/// the previous run spawned without recording its pid (killed between the
/// spawn and the pid file), found by the instance id in its environment.
fn kill_unrecorded_copy(name: &str, dir: &Path) {
    let Ok(instance) = fs::read_to_string(dir.join(SPAWNING_FILE)) else {
        return;
    };
    let needle = format!("{INSTANCE_ENV}={}", instance.trim());
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = fs::read(e.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            tracing::warn!(
                service = name,
                pid,
                "killing a copy started by the previous run without a pid file"
            );
            // Services are group leaders (`process_group(0)`).
            signal_group(pid, Signal::KILL);
        }
    }
}

pub(super) fn remove_file_logged(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot delete {}: {e}", path.display());
        }
    }
}

/// The last `max` bytes of a file.
fn read_tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Moves a log above [`LOG_MAX`] to `output.log.1` (copy, then truncate:
/// the service keeps its append-mode descriptor).
pub(super) fn rotate_log(dir: &Path) {
    let path = dir.join(LOG_FILE);
    let Ok(meta) = fs::metadata(&path) else {
        return;
    };
    if meta.len() <= LOG_MAX {
        return;
    }
    let result = read_tail(&path, LOG_MAX)
        .and_then(|tail| fs::write(dir.join(LOG_OLD), tail))
        .and_then(|()| fs::OpenOptions::new().write(true).open(&path))
        .and_then(|f| f.set_len(0));
    if let Err(e) = result {
        tracing::warn!("cannot rotate {}: {e}", path.display());
    }
}
