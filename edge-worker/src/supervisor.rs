//! Hosted **process** services: desired state, spawning, adoption after a
//! worker restart, restart policy with backoff, stop and remove.
//!
//! The [`Supervisor`] is synchronous and never blocks for long: the session
//! calls [`Supervisor::poll`] when [`Supervisor::next_wake`] is due and sends
//! every [`ServiceStatus`] from [`Supervisor::take_changes`]. Nothing here
//! depends on the MQTT connection, so services keep running (and
//! restarting) while the broker or the conductor is unreachable.
//!
//! Files, under `<state_dir>`:
//! * `services.json` — the desired state (spec, run or stopped, being
//!   removed), mode 0600, replaced atomically, written only on a change.
//! * `services/<name>/pid` — pid, process start time (field 22 of
//!   `/proc/<pid>/stat`) and spec version of the running copy, written
//!   atomically right after a spawn, removed once it is gone.
//! * `services/<name>/output.log` — the service's stdout and stderr
//!   (append mode). Not a pipe to the worker: a service must outlive the
//!   worker, and a pipe whose reader is gone kills the writer with SIGPIPE.
//!   Bounded: above [`LOG_MAX`] bytes it is copied to `output.log.1` and
//!   truncated (lines written during the copy may be lost).
//!
//! Processes: the service inherits the worker's environment minus its
//! `AEREKOS_*` settings, plus `spec.env`; stdin is `/dev/null`. Each
//! service runs in its own process group (so the children
//! it forks are signalled with it) and is never killed when the worker
//! exits; the next worker start **adopts** it if the pid file names a live
//! process with the same start time (a reused pid is never adopted nor
//! signalled). Our own children are reaped with `try_wait`, adopted ones
//! are watched through `/proc/<pid>/stat`; both every [`POLL_INTERVAL`]
//! while anything runs, so an exit is seen within that time. When the group
//! leader exits, what is left of its group is killed (a service must stay
//! in the foreground; a daemonising service is not supported).
//!
//! Limits: stop sends SIGTERM to the group and SIGKILL after
//! [`STOP_TIMEOUT`]; restart delays are `backoff_ms × 2^k` capped at
//! [`BACKOFF_CAP`] where `k` is the number of restarts in the current
//! window; more than `max_restarts` restarts within `restart_window_s`
//! leaves the service `Failed` until a Start, Restart or Deploy. Exit codes
//! of adopted processes are unknown (`None`). Restart counters and a
//! `Failed` verdict live in memory: a worker restart tries a desired-running
//! service again. Linux only (`/proc`). Under systemd the worker's unit needs
//! `KillMode=process`, or stopping the worker kills its services' cgroup.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocol::frame::bounded;
use protocol::{RestartPolicy, ServiceSpec, ServiceState, ServiceStatus};
use rustix::process::{kill_process_group, Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::state::write_atomic;

/// File of the desired state inside the state dir.
pub const SERVICES_FILE: &str = "services.json";
/// Dir of the per-service dirs inside the state dir.
pub const SERVICES_DIR: &str = "services";
/// How long a stop waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often running processes are checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Longest restart delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Size at which a service's `output.log` is rotated.
pub const LOG_MAX: u64 = 64 * 1024;
const LOG_FILE: &str = "output.log";
const LOG_OLD: &str = "output.log.1";
const PID_FILE: &str = "pid";

/// Is `name` usable as a service name (`[a-z0-9-]`, 1–32 chars, not
/// starting with `-`)? It becomes a directory name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// One entry of `services.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Desired {
    spec: ServiceSpec,
    run: bool,
    #[serde(default)]
    removing: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DesiredFile {
    services: Vec<Desired>,
}

/// Contents of a service's pid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PidFile {
    pid: u32,
    start_time: u64,
    version: u32,
}

/// The process of a service, if any.
#[derive(Debug)]
enum Proc {
    None,
    /// Spawned by this supervisor: reaped with `try_wait`.
    Child(Child),
    /// Found running at load: watched through `/proc`.
    Adopted {
        pid: u32,
        start_time: u64,
    },
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::None => 0,
            Proc::Child(child) => child.id(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }
}

/// What to do once the current process is gone after a stop.
#[derive(Debug)]
enum AfterStop {
    /// Stay stopped.
    Stay,
    /// Start (the current spec) again, counters reset.
    Start,
    /// Forget the service.
    Remove,
}

#[derive(Debug)]
struct Stopping {
    deadline: Instant,
    killed: bool,
    then: AfterStop,
}

#[derive(Debug)]
struct Service {
    spec: ServiceSpec,
    run: bool,
    removing: bool,
    proc: Proc,
    /// Version of the running copy (differs from `spec.version` while a
    /// deploy waits for the old copy to stop).
    proc_version: u32,
    state: ServiceState,
    restarts: u32,
    restart_times: VecDeque<Instant>,
    backoff_until: Option<Instant>,
    exit_code: Option<i32>,
    detail: String,
    stopping: Option<Stopping>,
}

impl Service {
    fn new(spec: ServiceSpec, run: bool, removing: bool) -> Service {
        let version = spec.version;
        Service {
            spec,
            run,
            removing,
            proc: Proc::None,
            proc_version: version,
            state: ServiceState::Stopped,
            restarts: 0,
            restart_times: VecDeque::new(),
            backoff_until: None,
            exit_code: None,
            detail: String::new(),
            stopping: None,
        }
    }

    fn status(&self) -> ServiceStatus {
        let running = !matches!(self.proc, Proc::None);
        ServiceStatus {
            name: self.spec.name.clone(),
            version: if running {
                self.proc_version
            } else {
                self.spec.version
            },
            state: self.state,
            pid: self.proc.pid(),
            restarts: self.restarts,
            exit_code: self.exit_code,
            detail: bounded(&self.detail),
        }
    }

    fn reset_counters(&mut self) {
        self.restarts = 0;
        self.restart_times.clear();
        self.backoff_until = None;
        self.exit_code = None;
    }
}

/// The services of this worker. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    dir: PathBuf,
    services: BTreeMap<String, Service>,
    changes: Vec<ServiceStatus>,
}

impl Supervisor {
    /// Reads `services.json` under `state_dir`, adopts the live copies named
    /// by pid files and starts the desired-running services that are not
    /// running. A missing or unreadable file means no services (logged).
    pub fn load(state_dir: &Path) -> Supervisor {
        let mut sup = Supervisor {
            dir: state_dir.to_path_buf(),
            services: BTreeMap::new(),
            changes: Vec::new(),
        };
        let path = state_dir.join(SERVICES_FILE);
        let desired: DesiredFile = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("{} is corrupt ({e}); no services loaded", path.display());
                    DesiredFile::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => DesiredFile::default(),
            Err(e) => {
                tracing::error!("cannot read {}: {e}; no services loaded", path.display());
                DesiredFile::default()
            }
        };
        for d in desired.services {
            let name = d.spec.name.to_string();
            if !is_valid_name(&name) || sup.services.contains_key(&name) {
                tracing::warn!(service = %name, "invalid or duplicate entry skipped");
                continue;
            }
            let mut svc = Service::new(d.spec, d.run, d.removing);
            let svc_dir = sup.service_dir(&name);
            if let Some(pf) = read_pid_file(&svc_dir) {
                if proc_start_time(pf.pid) == Some(pf.start_time) {
                    tracing::info!(service = %name, pid = pf.pid, "adopted the running copy");
                    svc.proc = Proc::Adopted {
                        pid: pf.pid,
                        start_time: pf.start_time,
                    };
                    svc.proc_version = pf.version;
                    svc.state = ServiceState::Running;
                    svc.detail = "adopted".into();
                } else {
                    remove_file_logged(&svc_dir.join(PID_FILE));
                }
            }
            sup.services.insert(name.clone(), svc);
            sup.converge(&name);
        }
        sup
    }

    /// Brings a freshly loaded service towards its desired state.
    fn converge(&mut self, name: &str) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let running = !matches!(svc.proc, Proc::None);
        let stale = svc.proc_version != svc.spec.version;
        match (svc.removing, svc.run, running) {
            (true, _, true) => self.begin_stop(name, AfterStop::Remove),
            (true, _, false) => self.finish_remove(name),
            (false, true, true) if stale => self.begin_stop(name, AfterStop::Start),
            (false, true, true) => self.emit(name),
            (false, true, false) => self.spawn(name),
            (false, false, true) => self.begin_stop(name, AfterStop::Stay),
            (false, false, false) => self.emit(name),
        }
    }

    fn service_dir(&self, name: &str) -> PathBuf {
        self.dir.join(SERVICES_DIR).join(name)
    }

    fn emit(&mut self, name: &str) {
        if let Some(svc) = self.services.get(name) {
            self.changes.push(svc.status());
        }
    }

    /// Status changes since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<ServiceStatus> {
        std::mem::take(&mut self.changes)
    }

    /// The current status of every service (sent after each connect).
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.services.values().map(Service::status).collect()
    }

    /// The current status of one service.
    pub fn status(&self, name: &str) -> Option<ServiceStatus> {
        self.services.get(name).map(Service::status)
    }

    /// When [`Supervisor::poll`] should run next: soon while a process runs
    /// or a stop is pending, at the end of a restart delay, never when idle.
    pub fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        self.services
            .values()
            .filter_map(|s| {
                if !matches!(s.proc, Proc::None) || s.stopping.is_some() {
                    Some(now + POLL_INTERVAL)
                } else {
                    s.backoff_until
                }
            })
            .min()
    }

    fn save(&self) {
        let file = DesiredFile {
            services: self
                .services
                .values()
                .map(|s| Desired {
                    spec: s.spec.clone(),
                    run: s.run,
                    removing: s.removing,
                })
                .collect(),
        };
        let path = self.dir.join(SERVICES_FILE);
        let result = serde_json::to_vec_pretty(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::error!("cannot persist the services: {e}");
        }
    }

    /// Installs `spec` and runs it. The same name and version again is a
    /// no-op (`Ok("unchanged")`); a new version stops the old copy first.
    pub fn deploy(&mut self, spec: ServiceSpec) -> Result<String, String> {
        let name = spec.name.to_string();
        if !is_valid_name(&name) {
            return Err(format!("invalid service name {name:?} (use [a-z0-9-])"));
        }
        if spec.command.is_empty() {
            return Err("empty command".into());
        }
        match self.services.get_mut(&name) {
            // Specs are versioned by the conductor: same version, same spec.
            Some(svc) if svc.spec.version == spec.version && !svc.removing => {
                Ok("unchanged".into())
            }
            Some(svc) => {
                let old = svc.spec.version;
                svc.spec = spec;
                svc.run = true;
                svc.removing = false;
                svc.reset_counters();
                self.save();
                self.restart_now(&name);
                Ok(format!(
                    "deployed version {} (was {old})",
                    self.version(&name)
                ))
            }
            None => {
                let version = spec.version;
                self.services
                    .insert(name.clone(), Service::new(spec, true, false));
                self.save();
                self.spawn(&name);
                Ok(format!("deployed version {version}"))
            }
        }
    }

    fn version(&self, name: &str) -> u32 {
        self.services.get(name).map_or(0, |s| s.spec.version)
    }

    /// Stops the current copy if any (and whatever stop is pending), then
    /// starts the current spec.
    fn restart_now(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.backoff_until = None;
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Start;
        } else if matches!(svc.proc, Proc::None) {
            self.spawn(name);
        } else {
            self.begin_stop(name, AfterStop::Start);
        }
    }

    fn known(&mut self, name: &str) -> Result<&mut Service, String> {
        match self.services.get_mut(name) {
            Some(s) if !s.removing => Ok(s),
            _ => Err(format!("no service {name:?} on this worker")),
        }
    }

    /// Starts a stopped or failed service (counters reset). Running: no-op.
    pub fn start(&mut self, name: &str) -> Result<String, String> {
        let svc = self.known(name)?;
        let changed = !svc.run;
        svc.run = true;
        let running = !matches!(svc.proc, Proc::None) && svc.stopping.is_none();
        if changed {
            self.save();
        }
        if running {
            return Ok("already running".into());
        }
        if let Some(svc) = self.services.get_mut(name) {
            svc.reset_counters();
        }
        self.restart_now(name);
        Ok("starting".into())
    }

    /// Stops a service; it stays installed with desired state "stopped".
    pub fn stop(&mut self, name: &str) -> Result<String, String> {
        let svc = self.known(name)?;
        let changed = svc.run;
        svc.run = false;
        svc.backoff_until = None;
        if changed {
            self.save();
        }
        let Some(svc) = self.services.get_mut(name) else {
            return Err(format!("no service {name:?} on this worker"));
        };
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Stay;
            return Ok("stopping".into());
        }
        if matches!(svc.proc, Proc::None) {
            if svc.state != ServiceState::Stopped {
                svc.state = ServiceState::Stopped;
                svc.detail = "stopped by request".into();
                self.emit(name);
            }
            return Ok("already stopped".into());
        }
        self.begin_stop(name, AfterStop::Stay);
        Ok("stopping".into())
    }

    /// Stops and starts a service (counters reset).
    pub fn restart(&mut self, name: &str) -> Result<String, String> {
        let svc = self.known(name)?;
        let changed = !svc.run;
        svc.run = true;
        svc.reset_counters();
        if changed {
            self.save();
        }
        self.restart_now(name);
        Ok("restarting".into())
    }

    /// Stops a service and forgets it (dir, pid file, entry); reports
    /// `Removed` once its process is gone.
    pub fn remove(&mut self, name: &str) -> Result<String, String> {
        let svc = self.known(name)?;
        svc.run = false;
        svc.removing = true;
        svc.backoff_until = None;
        self.save();
        let Some(svc) = self.services.get_mut(name) else {
            return Err(format!("no service {name:?} on this worker"));
        };
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Remove;
        } else if matches!(svc.proc, Proc::None) {
            self.finish_remove(name);
        } else {
            self.begin_stop(name, AfterStop::Remove);
        }
        Ok("removing".into())
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

    fn finish_remove(&mut self, name: &str) {
        let Some(mut svc) = self.services.remove(name) else {
            return;
        };
        let dir = self.service_dir(name);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(service = name, "cannot delete {}: {e}", dir.display());
            }
        }
        self.save();
        svc.state = ServiceState::Removed;
        svc.proc = Proc::None;
        svc.detail = "removed".into();
        tracing::info!(service = name, "removed");
        self.changes.push(svc.status());
    }

    /// Sends SIGTERM to the group; [`Supervisor::poll`] finishes the stop.
    fn begin_stop(&mut self, name: &str, then: AfterStop) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let pid = svc.proc.pid();
        tracing::info!(service = name, pid, "stopping");
        signal_group(pid, Signal::TERM);
        svc.stopping = Some(Stopping {
            deadline: Instant::now() + STOP_TIMEOUT,
            killed: false,
            then,
        });
    }

    /// Starts the current spec now.
    fn spawn(&mut self, name: &str) {
        let dir = self.service_dir(name);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.backoff_until = None;
        svc.state = ServiceState::Starting;
        match spawn_process(&svc.spec, &dir) {
            Ok((child, start_time)) => {
                let pid = child.id();
                let pf = PidFile {
                    pid,
                    start_time,
                    version: svc.spec.version,
                };
                write_pid_file(&dir, &pf);
                tracing::info!(service = name, pid, version = svc.spec.version, "started");
                svc.proc = Proc::Child(child);
                svc.proc_version = svc.spec.version;
                svc.state = ServiceState::Running;
                svc.detail = "running".into();
            }
            Err(e) => {
                tracing::warn!(service = name, "cannot start: {e}");
                svc.state = ServiceState::Failed;
                svc.detail = format!("cannot start {:?}: {e}", svc.spec.command.as_str());
            }
        }
        self.emit(name);
    }

    /// Reaps exits, finishes stops, restarts after backoff, rotates logs.
    pub fn poll(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            self.poll_one(&name, now);
        }
    }

    fn poll_one(&mut self, name: &str, now: Instant) {
        let dir = self.service_dir(name);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        // 1. Has the process exited?
        let exit = match &mut svc.proc {
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
        };
        if let Some(code) = exit {
            let pid = svc.proc.pid();
            // Whatever the leader left behind in its group goes with it.
            signal_group(pid, Signal::KILL);
            svc.proc = Proc::None;
            svc.exit_code = code;
            remove_file_logged(&dir.join(PID_FILE));
            tracing::info!(service = name, pid, ?code, "exited");
            if let Some(st) = svc.stopping.take() {
                svc.state = ServiceState::Stopped;
                svc.detail = "stopped".into();
                match st.then {
                    AfterStop::Stay => self.emit(name),
                    AfterStop::Start => {
                        self.emit(name);
                        self.spawn(name);
                    }
                    AfterStop::Remove => self.finish_remove(name),
                }
            } else {
                self.on_exit(name, code, now);
            }
            return;
        }
        // 2. A pending stop past its deadline.
        if let Some(st) = svc.stopping.as_mut() {
            if !st.killed && now >= st.deadline {
                st.killed = true;
                let pid = svc.proc.pid();
                tracing::warn!(service = name, pid, "did not stop in time: SIGKILL");
                signal_group(pid, Signal::KILL);
            }
            return;
        }
        // 3. A restart delay that ended.
        if let Some(at) = svc.backoff_until {
            if now >= at && svc.run && matches!(svc.proc, Proc::None) {
                self.spawn(name);
            }
            return;
        }
        // 4. Keep the output bounded.
        if !matches!(svc.proc, Proc::None) {
            rotate_log(&dir);
        }
    }

    /// An unrequested exit: apply the restart policy.
    fn on_exit(&mut self, name: &str, code: Option<i32>, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let restart = svc.run
            && match svc.spec.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => code != Some(0),
                RestartPolicy::Never => false,
            };
        let how = match code {
            Some(c) => format!("exited with code {c}"),
            None => "killed by a signal".to_string(),
        };
        if !restart {
            svc.state = if code == Some(0) || !svc.run {
                ServiceState::Stopped
            } else {
                ServiceState::Failed
            };
            svc.detail = how;
            self.emit(name);
            return;
        }
        let window = Duration::from_secs(u64::from(svc.spec.restart_window_s));
        while svc
            .restart_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            svc.restart_times.pop_front();
        }
        if svc.restart_times.len() >= usize::from(svc.spec.max_restarts) {
            svc.state = ServiceState::Failed;
            svc.detail = format!(
                "{how}; {} restarts in {} s: gave up",
                svc.restart_times.len(),
                svc.spec.restart_window_s
            );
            tracing::warn!(service = name, "{}", svc.detail);
            self.emit(name);
            return;
        }
        let k = svc.restart_times.len().min(31) as u32;
        let delay = Duration::from_millis(u64::from(svc.spec.backoff_ms))
            .saturating_mul(1u32 << k)
            .min(BACKOFF_CAP);
        svc.restart_times.push_back(now);
        svc.restarts = svc.restarts.saturating_add(1);
        svc.backoff_until = Some(now + delay);
        svc.state = ServiceState::Backoff;
        svc.detail = format!("{how}; restarting in {} ms", delay.as_millis());
        self.emit(name);
    }
}

/// Spawns `spec` in its own process group with output to the service's
/// log; returns the child and its start time (0 if unreadable).
fn spawn_process(spec: &ServiceSpec, dir: &Path) -> io::Result<(Child, u64)> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut cmd = Command::new(spec.command.as_str());
    // The worker's own settings (the registration token among them) are
    // not the service's business.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AEREKOS_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(spec.args.iter().map(|a| a.as_str()))
        .envs(spec.env.iter().map(|e| (e.name.as_str(), e.value.as_str())))
        .current_dir(if spec.working_dir.is_empty() {
            dir
        } else {
            Path::new(spec.working_dir.as_str())
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

/// Sends `sig` to the process group `pgid` (a service's pid); errors (the
/// group is gone) are ignored.
fn signal_group(pgid: u32, sig: Signal) {
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

fn read_pid_file(dir: &Path) -> Option<PidFile> {
    let bytes = fs::read(dir.join(PID_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_pid_file(dir: &Path, pf: &PidFile) {
    let path = dir.join(PID_FILE);
    let result = serde_json::to_vec(pf)
        .map_err(|e| e.to_string())
        .and_then(|b| write_atomic(&path, &b).map_err(|e| e.to_string()));
    if let Err(e) = result {
        // Without it the copy cannot be adopted after a worker restart.
        tracing::error!("cannot write {}: {e}", path.display());
    }
}

fn remove_file_logged(path: &Path) {
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
fn rotate_log(dir: &Path) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use protocol::frame::{EnvVar, MAX_ARGS};
    use rustix::process::kill_process;

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

    /// Kills every process carrying the marker on drop, even after a failure.
    struct Reaper(Vec<String>);

    impl Drop for Reaper {
        fn drop(&mut self) {
            for m in &self.0 {
                for pid in procs_with(m) {
                    if let Some(p) = Pid::from_raw(pid as i32) {
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

        kill_process(Pid::from_raw(first.pid as i32).unwrap(), Signal::KILL).unwrap();
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
        kill_process(Pid::from_raw(first.pid as i32).unwrap(), Signal::KILL).unwrap();
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
        kill_process(Pid::from_raw(st.pid as i32).unwrap(), Signal::KILL).unwrap();
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
        fs::write(svc_dir.join(LOG_FILE), vec![b'x'; LOG_MAX as usize + 10]).unwrap();
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
    fn start_time_of_this_process() {
        assert!(proc_start_time(std::process::id()).is_some());
        assert_eq!(proc_start_time(u32::MAX), None);
    }
}
