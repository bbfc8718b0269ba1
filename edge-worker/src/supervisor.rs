//! Hosted services: desired state, process spawning, container services
//! through the Docker Engine API, adoption after a worker restart, restart
//! policy with backoff, health checks, resource limits, stop and remove.
//!
//! The unit is a [`Manifest`]. A legacy
//! [`Action::Deploy`](protocol::Action::Deploy) spec is converted with
//! [`spec_to_manifest`] and takes the same path as a fetched manifest.
//!
//! The [`Supervisor`] is synchronous and never blocks for long: the session
//! calls [`Supervisor::poll`] when [`Supervisor::next_wake`] is due, sends
//! every [`ServiceStatus`] from [`Supervisor::take_changes`] and every event
//! from [`Supervisor::take_events`]. Nothing here depends on the MQTT
//! connection or the conductor, so services keep running (and restarting)
//! while either is unreachable. Downloads happen before
//! [`Supervisor::deploy_manifest`] and [`Supervisor::install_manifest`]
//! (the same manifest installed with desired state "stopped", never
//! started; see [`crate::fetch`]); health probes run
//! on their own threads ([`crate::health`]); container engine calls on the
//! engine thread (`engine.rs`).
//!
//! Files, under `<state_dir>`:
//! * `services.json` — the desired state (whole manifests, secrets
//!   included; run or stopped; being removed), mode 0600, replaced
//!   atomically, written only on a change. Entries written by older workers
//!   (`spec`) are converted when read.
//! * `services/<name>/pid` — pid, process start time (field 22 of
//!   `/proc/<pid>/stat`) and version of the running copy, written
//!   atomically right after a spawn, removed once it is gone.
//! * `services/<name>/spawning` — the instance id of a spawn in progress
//!   (written before it, removed after the pid file): a copy spawned by a
//!   worker killed before it wrote the pid file carries that id in
//!   `AEREKOS_INSTANCE` and is killed by the next start, which then starts
//!   its own (never two copies).
//! * `services/<name>/output.log` — the service's stdout and stderr
//!   (append mode). Not a pipe to the worker: a service must outlive the
//!   worker, and a pipe whose reader is gone kills the writer with SIGPIPE.
//!   Bounded: above [`LOG_MAX`] bytes it is copied to `output.log.1` and
//!   truncated (lines written during the copy may be lost).
//! * `artifacts/<sha256 hex>` — downloaded executables ([`crate::fetch`]);
//!   the ones no manifest references (for this worker's arch) are pruned
//!   after every deploy and removal.
//!
//! Processes: the service inherits the worker's environment minus its
//! `AEREKOS_*` settings, plus the manifest's `env`, plus `AEREKOS_SERVICE`,
//! `AEREKOS_INSTANCE` (unique per spawn) and whatever [`SupervisorOptions::extra_env`] adds (those win); stdin is
//! `/dev/null`. The hook sees the manifest before the spawn, so the local
//! API knows a service before it can call. An artifact service execs the
//! cached file, whose SHA-256 is
//! checked again before every exec (a mismatch deletes it and fails the
//! service). Each service runs in its own process group (so the children it
//! forks are signalled with it) and is never killed when the worker exits;
//! the next worker start **adopts** it if the pid file names a live process
//! with the same start time (a reused pid is never adopted nor signalled).
//! Our own children are reaped with `try_wait`, adopted ones are watched
//! through `/proc/<pid>/stat`; both every [`POLL_INTERVAL`] while anything
//! runs, so an exit is seen within that time. When the group leader exits,
//! what is left of its group is killed (a service must stay in the
//! foreground; a daemonising service is not supported).
//!
//! Containers ([`crate::container`]): deploy and start are
//! [`Engine::ensure`](crate::container::Engine::ensure) (the engine's
//! restart policy is `no`: restarts are ours), a running container is
//! inspected every [`CONTAINER_POLL`] and an exit goes through the same
//! restart policy, backoff and `max_restarts` as a process exit; stop waits
//! [`STOP_TIMEOUT`] before the engine kills; remove deletes the container.
//! A container is found again by name and labels after a worker restart (no
//! pid file), and containers of ours whose service is not desired are
//! removed at load and after every container removal. With no engine the
//! service is `Failed` with `no container engine: <why>` and tried again
//! every [`ENGINE_RETRY`]. The status pid is the container's main pid on
//! the host. Output stays in the engine (`docker logs`); container services
//! get no local API environment (the API listens on the worker's loopback,
//! which a container's own network namespace does not reach).
//!
//! Health: with a check, the state is `Running` until the first probe
//! passes, then `Healthy`. Probes start every `interval_ms` (observed with
//! [`POLL_INTERVAL`] granularity); failures within `start_period_ms` of a
//! (re)start do not count; `retries` consecutive failures make the service
//! `Unhealthy` (plus an `HealthFailed` event), then its group is stopped and
//! the exit is handled like a crash: restart policy, backoff, and
//! `max_restarts` apply. A container's HTTP probe goes to the published host
//! port of the probe's port when it names a container port; a command probe
//! runs on the worker.
//!
//! Limits: stop sends SIGTERM to the group and SIGKILL after
//! [`STOP_TIMEOUT`]; restart delays are `backoff_ms × 2^k` capped at
//! [`BACKOFF_CAP`] where `k` is the number of restarts in the current
//! window; more than `max_restarts` restarts within `restart_window_s`
//! leaves the service `Failed` until a Start, Restart or Deploy. Exit codes
//! of adopted processes are unknown (`None`). Restart counters and a
//! `Failed` verdict live in memory: a worker restart tries a desired-running
//! service again. Resource limits go through cgroups v2 ([`crate::cgroup`])
//! for processes and the engine for containers; where they cannot, the
//! status detail says `limits not applied: <reason>`.
//! Hashing an artifact before exec reads the whole file on the calling
//! thread (bounded by [`crate::fetch::MAX_ARTIFACT_LEN`]). Engine calls are
//! serialised on one thread (see `engine.rs`), so an exit of a container is
//! seen within [`CONTAINER_POLL`] plus whatever engine call runs. Linux only
//! (`/proc`). Under systemd the worker's unit needs `KillMode=process`, or
//! stopping the worker kills its services' cgroups.
//!
//! Layout: this file is the state machine (the [`Supervisor`], what a
//! service is, loading, the poll that reaps exits, finishes stops and
//! applies the restart policy); `desired.rs` the desired state
//! (`services.json`, manifest checks, the artifacts kept);
//! `lifecycle.rs` the commands; `process.rs` the process backend;
//! `container.rs` the container backend over `engine.rs`; `health.rs`
//! health checks; `error.rs` why a command is refused.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::frame::bounded;
use protocol::manifest::Runtime;
use protocol::{EventKind, Manifest, RestartPolicy, ServiceState, ServiceStatus};
use rustix::process::Signal;

use crate::cgroup::Cgroups;
pub use crate::logs::SERVICES_DIR;

mod container;
mod desired;
mod engine;
mod error;
mod health;
mod lifecycle;
mod process;
#[cfg(test)]
mod tests;

pub use desired::{is_valid_name, spec_to_manifest};
use engine::{EngineThread, Op};
pub use error::SupervisorError;
use health::Health;
pub use process::proc_start_time;
use process::{remove_file_logged, rotate_log, signal_group, PID_FILE};

/// File of the desired state inside the state dir.
pub const SERVICES_FILE: &str = "services.json";
/// Status detail of a service installed stopped (`InstallManifest`).
pub const INSTALLED_STOPPED: &str = "installed, not started";
/// How long a stop waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often running processes are checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Longest restart delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Size at which a service's `output.log` is rotated.
pub const LOG_MAX: u64 = 64 * 1024;
/// How often a running container is inspected.
pub const CONTAINER_POLL: Duration = Duration::from_millis(1500);
/// How long a container service waits before trying an unavailable engine
/// again.
pub const ENGINE_RETRY: Duration = Duration::from_secs(15);

/// Extra environment of a service's process: the hook through which the
/// local API learns a service's config and secrets and hands it
/// `AEREKOS_API` and `AEREKOS_TOKEN`. Called with the manifest right
/// before every spawn of a process (so whatever it registers is in place
/// before the process can call); its variables win over the manifest's.
pub type EnvHook = Arc<dyn Fn(&Manifest) -> Vec<(String, String)> + Send + Sync>;

/// How the supervisor runs services on this worker.
#[derive(Clone)]
pub struct SupervisorOptions {
    /// Architecture whose artifact is run: the `arch` of the birth frame.
    pub arch: String,
    /// Where service cgroups go.
    pub cgroups: Cgroups,
    /// Extra environment per service (see [`EnvHook`]).
    pub extra_env: Option<EnvHook>,
    /// The worker id: containers are named and labelled with it
    /// ([`crate::container::container_name`]). Container services fail
    /// while it is not a valid worker id.
    pub worker_id: String,
    /// The container engine's socket; `None`: `DOCKER_HOST`, then the usual
    /// sockets ([`crate::container::default_socket`]).
    pub engine_socket: Option<PathBuf>,
}

impl Default for SupervisorOptions {
    /// This build's arch, cgroups under `/sys/fs/cgroup`, no extra env.
    fn default() -> Self {
        SupervisorOptions {
            arch: std::env::consts::ARCH.to_string(),
            cgroups: Cgroups::default(),
            extra_env: None,
            worker_id: String::new(),
            engine_socket: None,
        }
    }
}

impl std::fmt::Debug for SupervisorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorOptions")
            .field("arch", &self.arch)
            .field("cgroups", &self.cgroups)
            .field("extra_env", &self.extra_env.is_some())
            .field("worker_id", &self.worker_id)
            .field("engine_socket", &self.engine_socket)
            .finish()
    }
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
    /// Our container, running when last inspected: watched through the
    /// engine. `pid` is its main process on the host (0 if unknown); it is
    /// never signalled by the worker.
    Container {
        pid: u32,
    },
}

impl Proc {
    /// The pid reported in statuses.
    fn pid(&self) -> u32 {
        match self {
            Proc::None => 0,
            Proc::Child(child) => child.id(),
            Proc::Adopted { pid, .. } | Proc::Container { pid } => *pid,
        }
    }

    /// The process group the worker may signal: only processes it runs.
    fn group(&self) -> Option<u32> {
        match self {
            Proc::Child(child) => Some(child.id()),
            Proc::Adopted { pid, .. } => Some(*pid),
            Proc::None | Proc::Container { .. } => None,
        }
    }
}

/// What to do once the current process is gone after a stop.
#[derive(Debug)]
enum AfterStop {
    /// Stay stopped.
    Stay,
    /// Start (the current manifest) again, counters reset.
    Start,
    /// Forget the service.
    Remove,
    /// Treat the exit as a failure (unhealthy): restart policy and backoff.
    Failure(String),
}

/// A stop under way.
#[derive(Debug)]
struct Stopping {
    /// When SIGKILL follows SIGTERM (processes; the engine kills a
    /// container itself).
    deadline: Instant,
    /// SIGKILL was sent.
    killed: bool,
    /// What follows once the copy is gone.
    then: AfterStop,
}

/// One service: its desired state and what runs of it.
#[derive(Debug)]
struct Service {
    /// The desired manifest.
    manifest: Manifest,
    /// Desired running.
    run: bool,
    /// Being removed: forgotten once its copy is gone.
    removing: bool,
    /// What runs of it, if anything.
    proc: Proc,
    /// Version of the running copy (differs from `manifest.version` while
    /// a deploy waits for the old copy to stop).
    proc_version: u32,
    /// The state reported in statuses.
    state: ServiceState,
    /// Restarts by the restart policy since the last reset (a deploy,
    /// start or restart by request).
    restarts: u32,
    /// When those restarts happened within the last `restart_window_s`.
    restart_times: VecDeque<Instant>,
    /// The end of the current restart delay.
    backoff_until: Option<Instant>,
    /// The last copy's exit code (`None`: killed by a signal, or unknown).
    exit_code: Option<i32>,
    /// The status detail.
    detail: String,
    /// `limits not applied: …` for the current process, if so.
    limits_note: Option<String>,
    /// `Some` while a stop is under way.
    stopping: Option<Stopping>,
    /// `Some` while a process of a service with a health check runs.
    health: Option<Health>,
    /// A health failure was reported since the last pass.
    was_unhealthy: bool,
    /// Container services: engine jobs submitted and not answered yet.
    ctr_jobs: u32,
    /// Container services: id of the last job submitted. Invariant: an
    /// inspection answer is applied only if it is the answer to this one
    /// (a later job changes what it would say).
    ctr_last: u64,
    /// Container services: when the running container is inspected next.
    ctr_check_at: Option<Instant>,
}

impl Service {
    fn new(manifest: Manifest, run: bool, removing: bool) -> Service {
        let version = manifest.version;
        Service {
            manifest,
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
            limits_note: None,
            stopping: None,
            health: None,
            was_unhealthy: false,
            ctr_jobs: 0,
            ctr_last: 0,
            ctr_check_at: None,
        }
    }

    fn status(&self) -> ServiceStatus {
        let running = !matches!(self.proc, Proc::None);
        let detail = match &self.limits_note {
            Some(note) if running && matches!(self.detail.as_str(), "running" | "healthy") => {
                note.clone()
            }
            Some(note) if running => format!("{}; {note}", self.detail),
            _ => self.detail.clone(),
        };
        ServiceStatus {
            name: bounded(&self.manifest.name),
            version: if running {
                self.proc_version
            } else {
                self.manifest.version
            },
            state: self.state,
            pid: self.proc.pid(),
            restarts: self.restarts,
            exit_code: self.exit_code,
            detail: bounded(&detail),
        }
    }

    fn reset_counters(&mut self) {
        self.restarts = 0;
        self.restart_times.clear();
        self.backoff_until = None;
        self.exit_code = None;
    }

    /// Is the desired manifest a container service?
    fn is_container(&self) -> bool {
        matches!(self.manifest.runtime, Runtime::Container(_))
    }
}

/// The services of this worker. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    /// The state dir.
    dir: PathBuf,
    opts: SupervisorOptions,
    /// By name: the desired services, and the ones being removed.
    services: BTreeMap<String, Service>,
    /// Statuses not taken yet ([`Supervisor::take_changes`]).
    changes: Vec<ServiceStatus>,
    /// Events not taken yet ([`Supervisor::take_events`]).
    events: Vec<(EventKind, String)>,
    /// Artifacts being downloaded: never pruned.
    pinned: BTreeMap<[u8; 32], usize>,
    /// The container engine thread, started at the first need.
    engine: Option<EngineThread>,
    /// Id of the last engine job.
    next_job: u64,
    /// Engine jobs submitted and not answered yet (all services).
    engine_jobs: u32,
    /// When [`Supervisor::poll`] last ran: the next periodic poll is due
    /// [`POLL_INTERVAL`] after it.
    polled_at: Instant,
}

impl Supervisor {
    /// [`Supervisor::load_with`] the default options.
    pub fn load(state_dir: &Path) -> Supervisor {
        Supervisor::load_with(state_dir, SupervisorOptions::default())
    }

    /// Reads `services.json` under `state_dir`, adopts the live copies named
    /// by pid files and starts the desired-running services that are not
    /// running. A missing or unreadable file means no services (logged).
    /// Downloads left half-done by a previous run are deleted.
    pub fn load_with(state_dir: &Path, opts: SupervisorOptions) -> Supervisor {
        let mut sup = Supervisor {
            dir: state_dir.to_path_buf(),
            opts,
            services: BTreeMap::new(),
            changes: Vec::new(),
            events: Vec::new(),
            pinned: BTreeMap::new(),
            engine: None,
            next_job: 0,
            engine_jobs: 0,
            polled_at: Instant::now(),
        };
        let now = Instant::now();
        for d in desired::read(state_dir).services {
            let (run, removing) = (d.run, d.removing);
            let Some(manifest) = d.into_manifest() else {
                tracing::warn!("an entry without a manifest skipped");
                continue;
            };
            let name = manifest.name.clone();
            if let Err(e) = manifest.validate() {
                tracing::warn!(service = %name, "invalid entry skipped: {e}");
                continue;
            }
            if !is_valid_name(&name) || sup.services.contains_key(&name) {
                tracing::warn!(service = %name, "invalid or duplicate entry skipped");
                continue;
            }
            let mut svc = Service::new(manifest, run, removing);
            process::adopt(&mut svc, &sup.service_dir(&name), now);
            sup.services.insert(name, svc);
        }
        // Converge only once every entry is loaded: finishing a removal
        // prunes the artifact cache, which must see the manifests of the
        // entries after it too (found by the chaos tests: a worker killed
        // while a removal and a deploy of the same artifact were pending
        // deleted the artifact of the deploy at its next start).
        let names: Vec<String> = sup.services.keys().cloned().collect();
        for name in &names {
            sup.converge(name);
        }
        sup.prune(true);
        // Containers of services removed while the worker was down (or
        // whose removal failed) go now; without any engine socket nothing
        // is started for it.
        let wants_engine = protocol::topic::is_valid_worker_id(&sup.opts.worker_id)
            && (sup.services.values().any(Service::is_container)
                || sup.opts.engine_socket.is_some()
                || crate::container::default_socket().is_ok());
        if wants_engine {
            sup.sweep_orphans();
        }
        sup
    }

    /// Brings a freshly loaded service towards its desired state.
    fn converge(&mut self, name: &str) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let running = !matches!(svc.proc, Proc::None);
        if svc.is_container() && !running {
            // Whether its container runs is the engine's to say: ensure,
            // stop or remove it (each a no-op when already so).
            match (svc.removing, svc.run) {
                (true, _) => self.begin_stop(name, AfterStop::Remove),
                (false, true) => self.spawn(name),
                (false, false) => self.begin_stop(name, AfterStop::Stay),
            }
            return;
        }
        let stale = svc.proc_version != svc.manifest.version;
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

    fn event(&mut self, kind: EventKind, detail: String) {
        self.events.push((kind, detail));
    }

    /// Status changes since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<ServiceStatus> {
        std::mem::take(&mut self.changes)
    }

    /// Events (`ServiceChanged`, `HealthFailed`, `ArtifactRejected`) since
    /// the last call, oldest first; details are `<name>: <what>`.
    pub fn take_events(&mut self) -> Vec<(EventKind, String)> {
        std::mem::take(&mut self.events)
    }

    /// The current status of every service (sent after each connect).
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.services.values().map(Service::status).collect()
    }

    /// The current status of one service.
    pub fn status(&self, name: &str) -> Option<ServiceStatus> {
        self.services.get(name).map(Service::status)
    }

    /// The desired manifest of a service (config and secrets for the local
    /// API), unless it is being removed.
    pub fn manifest(&self, name: &str) -> Option<&Manifest> {
        self.services
            .get(name)
            .filter(|s| !s.removing)
            .map(|s| &s.manifest)
    }

    /// This worker's architecture (the artifact key).
    pub fn arch(&self) -> &str {
        &self.opts.arch
    }

    /// The state dir (artifacts are cached under it).
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The worker id containers are labelled with.
    pub fn worker_id(&self) -> &str {
        &self.opts.worker_id
    }

    /// The configured container engine socket (`None`: the usual search).
    pub fn engine_socket(&self) -> Option<&Path> {
        self.opts.engine_socket.as_deref()
    }

    /// Is `name` a container service (its desired manifest)?
    pub fn is_container(&self, name: &str) -> bool {
        self.services.get(name).is_some_and(Service::is_container)
    }

    /// When [`Supervisor::poll`] should run next: soon while a process runs
    /// or a stop is pending, at the end of a restart delay, never when idle.
    pub fn next_wake(&self) -> Option<Instant> {
        // Due POLL_INTERVAL after the last poll, not after "now": the
        // session asks again after every event, and with events coming
        // faster than POLL_INTERVAL (a 100 ms metrics interval, acks, local
        // API traffic) a deadline relative to now never came, so exits,
        // stops and restarts were never handled (found by the chaos tests).
        let due = self.polled_at + POLL_INTERVAL;
        // Engine answers are collected by polling.
        let engine = (self.engine_jobs > 0).then_some(due);
        self.services
            .values()
            .filter_map(|s| {
                if !matches!(s.proc, Proc::None) || s.stopping.is_some() {
                    Some(due)
                } else {
                    s.backoff_until
                }
            })
            .chain(engine)
            .min()
    }

    /// Sends SIGTERM to the group, or asks the engine to stop (or, when
    /// the container goes for good, remove) the container;
    /// [`Supervisor::poll`] finishes the stop.
    fn begin_stop(&mut self, name: &str, then: AfterStop) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let pid = svc.proc.pid();
        tracing::info!(service = name, pid, "stopping");
        let group = svc.proc.group();
        if let Some(g) = group {
            signal_group(g, Signal::TERM);
        }
        svc.health = None;
        svc.ctr_check_at = None;
        svc.stopping = Some(Stopping {
            deadline: Instant::now() + STOP_TIMEOUT,
            killed: false,
            then,
        });
        if group.is_some() {
            return;
        }
        // Stopped with the processes' grace period first, also when it is
        // to be deleted (see `ctr_gone`).
        let op = Op::Stop(u32::try_from(STOP_TIMEOUT.as_secs()).unwrap_or(u32::MAX));
        if !self.submit_job(Some(name), op) {
            // No engine thread: nothing can be running through it.
            self.ctr_gone(name, None, true, Instant::now());
        }
    }

    /// Forgets a service whose process is gone: its dir, cgroup, entry and
    /// unused artifacts; reports `Removed`.
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
        self.opts.cgroups.remove(name);
        self.save();
        self.prune(false);
        svc.state = ServiceState::Removed;
        svc.proc = Proc::None;
        svc.detail = "removed".into();
        svc.limits_note = None;
        tracing::info!(service = name, "removed");
        self.changes.push(svc.status());
    }

    /// Starts the current manifest now (a container: asks the engine to).
    fn spawn(&mut self, name: &str) {
        if self.services.get(name).is_some_and(Service::is_container) {
            self.spawn_container(name);
        } else {
            self.spawn_process(name);
        }
    }

    /// Reaps exits, finishes stops, restarts after backoff, runs health
    /// probes, rotates logs.
    pub fn poll(&mut self) {
        self.collect_engine_answers();
        let now = Instant::now();
        self.polled_at = now;
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
        let exit = svc.proc.exited(name);
        if let Some(code) = exit {
            let pid = svc.proc.pid();
            // Whatever the leader left behind in its group goes with it.
            signal_group(pid, Signal::KILL);
            svc.proc = Proc::None;
            svc.exit_code = code;
            svc.health = None;
            remove_file_logged(&dir.join(PID_FILE));
            tracing::info!(service = name, pid, ?code, "exited");
            match svc.stopping.take().map(|st| st.then) {
                None => self.on_exit(name, code, now, None),
                Some(AfterStop::Failure(how)) => self.on_exit(name, code, now, Some(how)),
                Some(then) => {
                    svc.state = ServiceState::Stopped;
                    svc.detail = "stopped".into();
                    match then {
                        AfterStop::Start => {
                            self.emit(name);
                            self.spawn(name);
                        }
                        AfterStop::Remove => self.finish_remove(name),
                        AfterStop::Stay | AfterStop::Failure(_) => self.emit(name),
                    }
                }
            }
            return;
        }
        // 2. A pending stop past its deadline (the engine kills a
        // container itself).
        if let Some(st) = svc.stopping.as_mut() {
            if let Some(g) = svc.proc.group() {
                if !st.killed && now >= st.deadline {
                    st.killed = true;
                    tracing::warn!(service = name, pid = g, "did not stop in time: SIGKILL");
                    signal_group(g, Signal::KILL);
                }
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
        if matches!(svc.proc, Proc::None) {
            return;
        }
        if let Proc::Container { .. } = svc.proc {
            // 4. Is the container still running?
            let due = svc.ctr_jobs == 0 && svc.ctr_check_at.is_none_or(|t| now >= t);
            if due {
                svc.ctr_check_at = Some(now + CONTAINER_POLL);
                self.submit_job(Some(name), Op::Inspect);
            }
        } else {
            // 4. Keep the output bounded.
            rotate_log(&dir);
        }
        // 5. Health.
        self.poll_health(name, now);
    }

    /// An exit nobody asked for (or a stop because the service was
    /// unhealthy: `failure`): apply the restart policy.
    fn on_exit(&mut self, name: &str, code: Option<i32>, now: Instant, failure: Option<String>) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let failed = failure.is_some() || code != Some(0);
        let restart = svc.run
            && match svc.manifest.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => failed,
                RestartPolicy::Never => false,
            };
        let how = match (failure, code) {
            (Some(why), _) => why,
            (None, Some(c)) => format!("exited with code {c}"),
            (None, None) => "killed by a signal".to_string(),
        };
        if !restart {
            svc.state = if !failed || !svc.run {
                ServiceState::Stopped
            } else {
                ServiceState::Failed
            };
            svc.detail = how;
            if svc.state == ServiceState::Failed {
                let detail = format!("{name}: failed: {}", svc.detail);
                self.event(EventKind::ServiceChanged, detail);
            }
            self.emit(name);
            return;
        }
        let window = Duration::from_secs(u64::from(svc.manifest.restart_window_s));
        while svc
            .restart_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            svc.restart_times.pop_front();
        }
        if svc.restart_times.len() >= usize::from(svc.manifest.max_restarts) {
            svc.state = ServiceState::Failed;
            svc.detail = format!(
                "{how}; {} restarts in {} s: gave up",
                svc.restart_times.len(),
                svc.manifest.restart_window_s
            );
            tracing::warn!(service = name, "{}", svc.detail);
            let detail = format!("{name}: failed: {}", svc.detail);
            self.event(EventKind::ServiceChanged, detail);
            self.emit(name);
            return;
        }
        // fits: at most 31.
        #[allow(clippy::cast_possible_truncation)]
        let k = svc.restart_times.len().min(31) as u32;
        let delay = Duration::from_millis(u64::from(svc.manifest.backoff_ms))
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
