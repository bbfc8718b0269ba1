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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::frame::bounded;
use protocol::manifest::{HealthCheck, Limits, Probe, ProcessRuntime, Program, Runtime};
use protocol::{EventKind, Manifest, RestartPolicy, ServiceSpec, ServiceState, ServiceStatus};
use rustix::process::{kill_process_group, Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroups;
use crate::container::{ContainerError, EnsureAction, Ensured};
use crate::fetch;
use crate::health::ProbeTask;
pub use crate::logs::SERVICES_DIR;
use crate::logs::{LOG_FILE, LOG_OLD};
use crate::state::write_atomic;

mod engine;

use engine::{Done, EngineThread, Job, Kind, Op, Outcome};

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
/// Start of the detail of a container service failed for want of an engine.
const NO_ENGINE: &str = "no container engine";
const PID_FILE: &str = "pid";
/// Written before a spawn, removed once the pid file is written: names the
/// instance id the new process carries in [`INSTANCE_ENV`], so a copy
/// spawned by a worker killed before it wrote the pid file is found (and
/// killed) by the next start instead of running twice.
const SPAWNING_FILE: &str = "spawning";
/// Environment variable carrying a spawn's unique instance id.
const INSTANCE_ENV: &str = "AEREKOS_INSTANCE";

/// Is `name` usable as a service name (`[a-z0-9-]`, 1–32 chars, not
/// starting with `-`)? It becomes a directory name. Same rule as the
/// conductor's: [`protocol::manifest::valid_service_name`].
pub fn is_valid_name(name: &str) -> bool {
    protocol::manifest::valid_service_name(name)
}

/// The service name of a manifest that is valid and whose name can be a
/// directory name; why not otherwise.
fn checked_name(manifest: &Manifest) -> Result<String, String> {
    manifest.validate().map_err(|e| e.to_string())?;
    if !is_valid_name(&manifest.name) {
        return Err(format!(
            "invalid service name {:?} (use [a-z0-9-])",
            manifest.name
        ));
    }
    Ok(manifest.name.clone())
}

/// The manifest equivalent of a legacy spec: a command, no health check,
/// no limits, no config or secrets. Env entries with the same name: the
/// last wins.
pub fn spec_to_manifest(spec: &ServiceSpec) -> Manifest {
    Manifest {
        name: spec.name.to_string(),
        version: spec.version,
        runtime: Runtime::Process(ProcessRuntime {
            program: Program::Command(spec.command.to_string()),
            args: spec.args.iter().map(|a| a.to_string()).collect(),
            env: spec
                .env
                .iter()
                .map(|e| (e.name.to_string(), e.value.to_string()))
                .collect(),
            working_dir: spec.working_dir.to_string(),
        }),
        restart: spec.restart,
        max_restarts: spec.max_restarts,
        restart_window_s: spec.restart_window_s,
        backoff_ms: spec.backoff_ms,
        health: None,
        limits: Limits::default(),
        config: BTreeMap::new(),
        secrets: BTreeMap::new(),
    }
}

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

/// One entry of `services.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Desired {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manifest: Option<Manifest>,
    /// Written by workers before manifests; only read (upgrades).
    #[serde(default, skip_serializing)]
    spec: Option<ServiceSpec>,
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

#[derive(Debug)]
struct Stopping {
    deadline: Instant,
    killed: bool,
    then: AfterStop,
}

/// Health-check progress of the current process.
#[derive(Debug)]
struct Health {
    /// When the current process started (or was adopted).
    started: Instant,
    /// When the next probe starts (if none runs).
    next_at: Instant,
    /// Consecutive counted failures.
    failures: u16,
    /// The probe in flight.
    task: Option<ProbeTask>,
}

impl Health {
    fn new(check: &HealthCheck, now: Instant) -> Health {
        Health {
            started: now,
            next_at: now + Duration::from_millis(u64::from(check.interval_ms)),
            failures: 0,
            task: None,
        }
    }
}

#[derive(Debug)]
struct Service {
    manifest: Manifest,
    run: bool,
    removing: bool,
    proc: Proc,
    /// Version of the running copy (differs from `manifest.version` while
    /// a deploy waits for the old copy to stop).
    proc_version: u32,
    state: ServiceState,
    restarts: u32,
    restart_times: VecDeque<Instant>,
    backoff_until: Option<Instant>,
    exit_code: Option<i32>,
    detail: String,
    /// `limits not applied: …` for the current process, if so.
    limits_note: Option<String>,
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

    fn process(&self) -> Option<&ProcessRuntime> {
        match &self.manifest.runtime {
            Runtime::Process(p) => Some(p),
            Runtime::Container(_) => None,
        }
    }

    /// Is the desired manifest a container service?
    fn is_container(&self) -> bool {
        matches!(self.manifest.runtime, Runtime::Container(_))
    }
}

/// The services of this worker. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    dir: PathBuf,
    opts: SupervisorOptions,
    services: BTreeMap<String, Service>,
    changes: Vec<ServiceStatus>,
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
        let now = Instant::now();
        for d in desired.services {
            let Some(manifest) = d.manifest.or_else(|| d.spec.as_ref().map(spec_to_manifest))
            else {
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
            let mut svc = Service::new(manifest, d.run, d.removing);
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
                    svc.health = svc.manifest.health.as_ref().map(|h| Health::new(h, now));
                } else {
                    remove_file_logged(&svc_dir.join(PID_FILE));
                }
            }
            if matches!(svc.proc, Proc::None) {
                kill_unrecorded_copy(&name, &svc_dir);
            }
            remove_file_logged(&svc_dir.join(SPAWNING_FILE));
            sup.services.insert(name.clone(), svc);
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

    /// Queues the removal of our containers whose service is not a desired
    /// container service.
    fn sweep_orphans(&mut self) {
        let keep: Vec<String> = self
            .services
            .values()
            .filter(|s| s.is_container() && !s.removing)
            .map(|s| s.manifest.name.clone())
            .collect();
        self.submit_job(None, Op::Orphans(keep));
    }

    /// Queues an engine job for `service` (`None`: not a service's job),
    /// starting the engine thread first if needed. `false` (logged, and the
    /// service failed) if the thread cannot run.
    fn submit_job(&mut self, service: Option<&str>, op: Op) -> bool {
        if self.engine.is_none() {
            match EngineThread::spawn(self.opts.worker_id.clone(), self.opts.engine_socket.clone())
            {
                Ok(t) => self.engine = Some(t),
                Err(e) => {
                    tracing::error!("cannot start the container engine thread: {e}");
                    if let Some(name) = service {
                        self.ctr_failed(name, format!("cannot start the engine thread: {e}"));
                    }
                    return false;
                }
            }
        }
        self.next_job += 1;
        let id = self.next_job;
        let job = Job {
            id,
            service: service.unwrap_or_default().to_string(),
            op,
        };
        if !self.engine.as_ref().is_some_and(|t| t.submit(job)) {
            // The thread died (it never panics on engine answers): start a
            // new one at the next job.
            self.engine = None;
            tracing::error!("the container engine thread is gone");
            if let Some(name) = service {
                self.ctr_failed(name, "the container engine thread is gone".into());
            }
            return false;
        }
        self.engine_jobs += 1;
        if let Some(svc) = service.and_then(|n| self.services.get_mut(n)) {
            svc.ctr_jobs += 1;
            svc.ctr_last = id;
        }
        true
    }

    /// A container service that cannot run: `Failed` with `detail`.
    fn ctr_failed(&mut self, name: &str, detail: String) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.proc = Proc::None;
        svc.health = None;
        svc.ctr_check_at = None;
        let again = svc.state == ServiceState::Failed && svc.detail == detail;
        svc.state = ServiceState::Failed;
        svc.detail = detail;
        if !again {
            tracing::warn!(service = name, "{}", svc.detail);
            let detail = format!("{name}: failed: {}", svc.detail);
            self.event(EventKind::ServiceChanged, detail);
            self.emit(name);
        }
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

    fn save(&self) {
        let file = DesiredFile {
            services: self
                .services
                .values()
                .map(|s| Desired {
                    manifest: Some(s.manifest.clone()),
                    spec: None,
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

    /// Keeps the artifact `sha256` out of pruning while it is downloaded
    /// (counted: pin and unpin in pairs).
    pub fn pin_artifact(&mut self, sha256: [u8; 32]) {
        *self.pinned.entry(sha256).or_insert(0) += 1;
    }

    /// Undoes one [`Supervisor::pin_artifact`].
    pub fn unpin_artifact(&mut self, sha256: [u8; 32]) {
        if let Some(n) = self.pinned.get_mut(&sha256) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(&sha256);
            }
        }
    }

    /// Deletes cached artifacts that no manifest (nor a download) needs.
    fn prune(&self, parts: bool) {
        let mut keep: BTreeSet<[u8; 32]> = self.pinned.keys().copied().collect();
        for s in self.services.values() {
            if let Some(a) = s.manifest.artifact_for(&self.opts.arch) {
                keep.insert(a.sha256);
            }
        }
        fetch::prune_artifacts(&self.dir, &keep, parts);
    }

    /// Installs a legacy `spec` and runs it ([`spec_to_manifest`], then
    /// [`Supervisor::deploy_manifest`]).
    pub fn deploy(&mut self, spec: ServiceSpec) -> Result<String, String> {
        self.deploy_manifest(spec_to_manifest(&spec))
    }

    /// Installs `manifest` and runs it. The same manifest again is a no-op
    /// (`Ok("unchanged")`) unless the service failed (restart policy not
    /// `never`): then it starts afresh; another one stops the old copy first. An
    /// artifact service's file must already be in the cache
    /// ([`fetch::Conductor::ensure_artifact`]).
    pub fn deploy_manifest(&mut self, manifest: Manifest) -> Result<String, String> {
        let name = checked_name(&manifest)?;
        let version = manifest.version;
        let result = match self.services.get_mut(&name) {
            Some(svc) if svc.manifest == manifest && !svc.removing => {
                // The conductor deploys a service that failed at this
                // version again (at most every minute): start it afresh,
                // unless its policy says never or it was stopped on purpose.
                let retry = svc.run
                    && svc.state == ServiceState::Failed
                    && svc.manifest.restart != RestartPolicy::Never
                    && matches!(svc.proc, Proc::None)
                    && svc.stopping.is_none();
                if retry {
                    tracing::info!(service = %name, "failed service deployed again: starting it");
                    return self.start(&name);
                }
                return Ok("unchanged".into());
            }
            Some(svc) => {
                let old = svc.manifest.version;
                svc.manifest = manifest;
                svc.run = true;
                svc.removing = false;
                svc.reset_counters();
                self.save();
                self.restart_now(&name);
                format!("deployed version {version} (was {old})")
            }
            None => {
                self.services
                    .insert(name.clone(), Service::new(manifest, true, false));
                self.save();
                self.spawn(&name);
                format!("deployed version {version}")
            }
        };
        self.prune(false);
        Ok(result)
    }

    /// Installs `manifest` with desired state "stopped" (persisted, as by
    /// [`Supervisor::stop`]): it is not started, and a running copy of any
    /// version is stopped first. The same manifest again, already desired
    /// stopped, changes nothing (`Ok("unchanged")`). An artifact service's
    /// file must already be in the cache, as for
    /// [`Supervisor::deploy_manifest`]; a container's image is pulled only
    /// when it is started.
    pub fn install_manifest(&mut self, manifest: Manifest) -> Result<String, String> {
        let name = checked_name(&manifest)?;
        let version = manifest.version;
        let result = match self.services.get_mut(&name) {
            Some(svc) if svc.manifest == manifest && !svc.removing => {
                if !svc.run {
                    return Ok("unchanged".into());
                }
                svc.run = false;
                self.save();
                let how = self.hold_stopped(&name, "stopped by request", false);
                format!("version {version} unchanged, {how}")
            }
            Some(svc) => {
                let old = svc.manifest.version;
                svc.manifest = manifest;
                svc.run = false;
                svc.removing = false;
                svc.reset_counters();
                self.save();
                match self.hold_stopped(&name, INSTALLED_STOPPED, true) {
                    "stopping" => format!(
                        "installed version {version} (was {old}), not started; stopping the running copy"
                    ),
                    _ => format!("installed version {version} (was {old}), not started"),
                }
            }
            None => {
                self.services
                    .insert(name.clone(), Service::new(manifest, false, false));
                self.save();
                self.hold_stopped(&name, INSTALLED_STOPPED, true);
                format!("installed version {version}, not started")
            }
        };
        self.prune(false);
        Ok(result)
    }

    /// Reports a deploy refused before it reached the supervisor (e.g. a
    /// downloaded artifact that did not match): a `Failed` status for
    /// `name` at `version`. A running older version is left alone.
    pub fn report_refused(&mut self, name: &str, version: u32, detail: &str) {
        let running = self.services.get(name).filter(|s| !s.removing);
        let detail = match running {
            Some(s) if !matches!(s.proc, Proc::None) => {
                format!("{detail}; version {} keeps running", s.proc_version)
            }
            _ => detail.to_string(),
        };
        self.changes.push(ServiceStatus {
            name: bounded(name),
            version,
            state: ServiceState::Failed,
            pid: 0,
            restarts: 0,
            exit_code: None,
            detail: bounded(&detail),
        });
    }

    /// Stops the current copy if any (and whatever stop is pending), then
    /// starts the current manifest.
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
        if changed {
            self.save();
        }
        Ok(self.hold_stopped(name, "stopped by request", false).into())
    }

    /// Brings a service whose desired state is now "stopped" there: a
    /// pending stop stays stopped, a running copy (or a container being
    /// started) is stopped, and one without a process is reported `Stopped`
    /// with `detail` — also when it already was, if `report` (its version
    /// changed). Returns what happens.
    fn hold_stopped(&mut self, name: &str, detail: &str, report: bool) -> &'static str {
        let Some(svc) = self.services.get_mut(name) else {
            return "unknown";
        };
        svc.backoff_until = None;
        if let Some(st) = svc.stopping.as_mut() {
            st.then = AfterStop::Stay;
            return "stopping";
        }
        // A container being started may run by the time the engine gets
        // to this stop: it is stopped in the engine's order.
        let starting = svc.is_container() && svc.ctr_jobs > 0;
        if matches!(svc.proc, Proc::None) && !starting {
            if report || svc.state != ServiceState::Stopped {
                svc.state = ServiceState::Stopped;
                svc.detail = detail.into();
                self.emit(name);
            }
            return "already stopped";
        }
        self.begin_stop(name, AfterStop::Stay);
        "stopping"
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

    /// Stops a service and forgets it (dir, pid file, cgroup, entry, unused
    /// artifacts); reports `Removed` once its process is gone.
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
        } else if matches!(svc.proc, Proc::None) && !svc.is_container() {
            self.finish_remove(name);
        } else {
            // A container is deleted in the engine even when it is stopped.
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

    /// The executable of `svc` on this worker: the command, or the cached
    /// artifact for this arch after checking its hash again.
    fn program(&mut self, name: &str) -> Result<PathBuf, String> {
        let Some(svc) = self.services.get(name) else {
            return Err("unknown service".into());
        };
        let Some(p) = svc.process() else {
            return Err("not a process service".into());
        };
        match &p.program {
            Program::Command(c) => Ok(PathBuf::from(c)),
            Program::Artifacts(_) => {
                let Some(a) = svc.manifest.artifact_for(&self.opts.arch).cloned() else {
                    return Err(format!("no artifact for arch {}", self.opts.arch));
                };
                let path = fetch::artifact_path(&self.dir, &a.sha256);
                match fetch::verify_cached(&path, &a) {
                    Ok(()) => Ok(path),
                    Err(e) => {
                        if let Some(why) = e.rejection() {
                            self.event(EventKind::ArtifactRejected, format!("{name}: {why}"));
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

    /// Starts the current manifest now (a container: asks the engine to).
    fn spawn(&mut self, name: &str) {
        if self.services.get(name).is_some_and(Service::is_container) {
            return self.spawn_container(name);
        }
        let dir = self.service_dir(name);
        let program = self.program(name);
        let extra = self.opts.extra_env.clone();
        let cgroups = self.opts.cgroups.clone();
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.backoff_until = None;
        svc.state = ServiceState::Starting;
        svc.limits_note = None;
        svc.health = None;
        let spawned = program.and_then(|program| {
            let Some(p) = svc.process() else {
                return Err("not a process service".to_string());
            };
            let mut env: Vec<(String, String)> =
                p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            env.push((protocol::local_api::ENV_SERVICE.into(), name.to_string()));
            if let Some(hook) = &extra {
                env.extend(hook(&svc.manifest));
            }
            let instance = instance_id();
            env.push((INSTANCE_ENV.into(), instance.clone()));
            note_spawning(&dir, &instance);
            spawn_process(&program, p, &env, &dir)
                .map_err(|e| format!("cannot start {:?}: {e}", program.display()))
        });
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
            // Seen through inspections (below).
            Proc::Container { .. } => None,
        };
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

    /// Starts a due probe or handles a finished one.
    fn poll_health(&mut self, name: &str, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(check) = svc.manifest.health.clone() else {
            return;
        };
        let Some(h) = svc.health.as_mut() else {
            return;
        };
        let interval = Duration::from_millis(u64::from(check.interval_ms));
        let result = match h.task.as_mut() {
            Some(task) => match task.try_finish() {
                Some(r) => r,
                None => return,
            },
            None => {
                if now >= h.next_at {
                    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
                    let probe = probe_for(&svc.manifest, &check.probe);
                    match ProbeTask::start(probe, timeout, name.to_string()) {
                        Ok(task) => h.task = Some(task),
                        Err(e) => {
                            tracing::warn!(service = name, "cannot start a health probe: {e}");
                            h.next_at = now + interval;
                        }
                    }
                }
                return;
            }
        };
        h.task = None;
        h.next_at = now + interval;
        match result {
            Ok(()) => {
                h.failures = 0;
                if svc.state != ServiceState::Healthy {
                    svc.state = ServiceState::Healthy;
                    svc.detail = "healthy".into();
                    if std::mem::take(&mut svc.was_unhealthy) {
                        self.event(EventKind::ServiceChanged, format!("{name}: healthy again"));
                    }
                    self.emit(name);
                }
            }
            Err(why) => {
                let grace = Duration::from_millis(u64::from(check.start_period_ms));
                if now < h.started + grace {
                    tracing::debug!(
                        service = name,
                        "health probe failed in the start period: {why}"
                    );
                    return;
                }
                h.failures = h.failures.saturating_add(1);
                tracing::info!(
                    service = name,
                    failures = h.failures,
                    retries = check.retries,
                    "health probe failed: {why}"
                );
                if h.failures < check.retries {
                    return;
                }
                svc.state = ServiceState::Unhealthy;
                svc.detail = format!("unhealthy: {why}");
                svc.was_unhealthy = true;
                tracing::warn!(service = name, "{}; restarting", svc.detail);
                self.emit(name);
                self.event(EventKind::HealthFailed, format!("{name}: {why}"));
                self.begin_stop(name, AfterStop::Failure(format!("unhealthy: {why}")));
            }
        }
    }

    /// Asks the engine to run the current manifest's container; the
    /// answer arrives in [`Supervisor::poll`].
    fn spawn_container(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.backoff_until = None;
        svc.limits_note = None;
        svc.health = None;
        let m = Box::new(svc.manifest.clone());
        // Waiting for an engine: tried again quietly, still `Failed`
        // (one status and event per outage, not one per retry).
        let waiting = svc.state == ServiceState::Failed && svc.detail.starts_with(NO_ENGINE);
        if !waiting {
            svc.state = ServiceState::Starting;
            svc.detail = "starting container".into();
            self.emit(name);
        }
        self.submit_job(Some(name), Op::Ensure(m));
    }

    /// Applies every answer the engine thread has sent.
    fn collect_engine_answers(&mut self) {
        while let Some(done) = self.engine.as_ref().and_then(EngineThread::try_recv) {
            self.engine_jobs = self.engine_jobs.saturating_sub(1);
            self.on_engine_answer(done);
        }
    }

    fn on_engine_answer(&mut self, done: Done) {
        let Done {
            id,
            kind,
            service: name,
            result,
        } = done;
        let now = Instant::now();
        if kind == Kind::Orphans {
            match result {
                Ok(Outcome::Orphans(removed)) => {
                    for service in removed {
                        tracing::info!(
                            service,
                            "removed the container of a service not deployed here"
                        );
                    }
                }
                Err(e) if e.is_unavailable() => tracing::debug!("orphan sweep: {e}"),
                Err(e) => tracing::warn!("orphan container sweep failed: {e}"),
                Ok(_) => {}
            }
            return;
        }
        let Some(svc) = self.services.get_mut(&name) else {
            tracing::debug!(
                service = name,
                ?kind,
                "engine answer for a forgotten service"
            );
            return;
        };
        svc.ctr_jobs = svc.ctr_jobs.saturating_sub(1);
        let latest = svc.ctr_last == id;
        match (kind, result) {
            (Kind::Ensure, Ok(Outcome::Ensured(e))) => self.ctr_ensured(&name, e, now),
            (Kind::Ensure, Err(e)) => {
                let detail = match &e {
                    ContainerError::EngineUnavailable { .. } => e.to_string(),
                    e if e.is_unavailable() => format!("{NO_ENGINE}: {e}"),
                    e => format!("cannot run the container: {e}"),
                };
                let retry = e.is_unavailable();
                self.ctr_failed(&name, detail);
                if let Some(svc) = self.services.get_mut(&name) {
                    if retry && svc.run && svc.stopping.is_none() {
                        svc.backoff_until = Some(now + ENGINE_RETRY);
                    }
                }
            }
            (Kind::Inspect, result) => {
                // Only the answer to the last job says how things are now,
                // and only while nothing else is under way.
                let watching = matches!(svc.proc, Proc::Container { .. }) && svc.stopping.is_none();
                if !latest || !watching {
                    return;
                }
                match result {
                    Ok(Outcome::State(Some(st))) if st.running => {
                        let pid = st.pid.unwrap_or(0);
                        if svc.proc.pid() != pid {
                            svc.proc = Proc::Container { pid };
                            self.emit(&name);
                        }
                    }
                    Ok(Outcome::State(Some(st))) => {
                        let how = st.oom_killed.then(|| "killed: out of memory".to_string());
                        self.ctr_exited(&name, st.exit_code, how, now);
                    }
                    Ok(_) => {
                        let how = "the container was removed outside the worker".to_string();
                        self.ctr_exited(&name, None, Some(how), now);
                    }
                    Err(e) => self.ctr_exited(&name, None, Some(format!("lost: {e}")), now),
                }
            }
            (Kind::Stop, result) => {
                let code = match result {
                    Ok(Outcome::State(Some(st))) => {
                        if st.running {
                            tracing::warn!(service = name, "the container still runs after a stop");
                        }
                        st.exit_code
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(service = name, "stopping the container: {e}");
                        None
                    }
                };
                self.ctr_gone(&name, code, false, now);
            }
            (Kind::Remove, result) => {
                if let Err(e) = result {
                    tracing::warn!(
                        service = name,
                        "removing the container: {e}; the orphan sweep will try again"
                    );
                }
                self.ctr_gone(&name, None, true, now);
            }
            (kind, result) => {
                tracing::warn!(
                    service = name,
                    ?kind,
                    "unexpected engine answer: {result:?}"
                );
            }
        }
    }

    /// The engine runs the container of `name` (or could not keep it up).
    fn ctr_ensured(&mut self, name: &str, e: Ensured, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if !e.state.running {
            // Started, and already gone again.
            let how = e.state.error.clone().filter(|s| !s.is_empty());
            if svc.stopping.is_none() {
                svc.proc = Proc::Container { pid: 0 };
                self.ctr_exited(name, e.state.exit_code, how, now);
            }
            return;
        }
        svc.proc = Proc::Container {
            pid: e.state.pid.unwrap_or(0),
        };
        svc.proc_version = e.state.version.unwrap_or(svc.manifest.version);
        svc.ctr_check_at = Some(now + CONTAINER_POLL);
        if svc.stopping.is_some() {
            // The stop queued behind this decides.
            return;
        }
        svc.state = ServiceState::Running;
        svc.detail = if e.action == EnsureAction::AlreadyRunning {
            "adopted".into()
        } else {
            "running".into()
        };
        svc.limits_note = container_limits_note(&svc.manifest.limits, &e);
        if let Some(note) = &svc.limits_note {
            tracing::warn!(service = name, "{note}");
        }
        svc.health = svc.manifest.health.as_ref().map(|h| Health::new(h, now));
        tracing::info!(
            service = name,
            pid = svc.proc.pid(),
            version = svc.proc_version,
            action = ?e.action,
            "container running"
        );
        self.emit(name);
    }

    /// The running container of `name` stopped by itself: the restart policy.
    fn ctr_exited(&mut self, name: &str, code: Option<i64>, how: Option<String>, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let code = code.and_then(|c| i32::try_from(c).ok());
        tracing::info!(service = name, ?code, "container exited");
        svc.proc = Proc::None;
        svc.exit_code = code;
        svc.health = None;
        svc.ctr_check_at = None;
        self.on_exit(name, code, now, how);
    }

    /// The engine answered a stop (`deleted`: a removal) of `name`'s
    /// container: finish what the stop was for.
    fn ctr_gone(&mut self, name: &str, code: Option<i64>, deleted: bool, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.proc = Proc::None;
        svc.health = None;
        svc.ctr_check_at = None;
        if let Some(c) = code.and_then(|c| i32::try_from(c).ok()) {
            svc.exit_code = Some(c);
        }
        let Some(st) = svc.stopping.take() else {
            return;
        };
        // The stopped container is deleted when the service goes, or when
        // its next copy is a process (it would be an orphan).
        let delete = matches!(st.then, AfterStop::Remove) || !svc.is_container();
        if delete && !deleted {
            svc.stopping = Some(st);
            if !self.submit_job(Some(name), Op::Remove) {
                self.ctr_gone(name, None, true, now);
            }
            return;
        }
        match st.then {
            AfterStop::Remove => {
                self.finish_remove(name);
                self.sweep_orphans();
            }
            AfterStop::Failure(how) => {
                let code = svc.exit_code;
                self.on_exit(name, code, now, Some(how));
            }
            then => {
                svc.state = ServiceState::Stopped;
                svc.detail = "stopped".into();
                self.emit(name);
                if matches!(then, AfterStop::Start) {
                    self.spawn(name);
                }
            }
        }
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

/// Spawns `program` with the manifest's args and working dir and `env` in
/// its own process group with output to the service's log; returns the
/// child and its start time (0 if unreadable).
fn spawn_process(
    program: &Path,
    p: &ProcessRuntime,
    env: &[(String, String)],
    dir: &Path,
) -> io::Result<(Child, u64)> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut cmd = Command::new(program);
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

/// The probe as the worker runs it: a container's HTTP probe of a port it
/// publishes under another host port goes to that host port.
fn probe_for(m: &Manifest, probe: &Probe) -> Probe {
    if let (Runtime::Container(c), Probe::Http { port, path }) = (&m.runtime, probe) {
        let tcp = || c.ports.iter().filter(|p| !p.udp);
        if !tcp().any(|p| p.host == *port) {
            if let Some(p) = tcp().find(|p| p.container == *port) {
                return Probe::Http {
                    port: p.host,
                    path: path.clone(),
                };
            }
        }
    }
    probe.clone()
}

/// `limits not applied: …` when the engine dropped a limit the manifest
/// asks for, with the engine's warnings; just the warnings otherwise.
fn container_limits_note(want: &Limits, e: &Ensured) -> Option<String> {
    let got = &e.state.limits;
    let mut missing = Vec::new();
    if want.memory_bytes.is_some() && got.memory_bytes.is_none() {
        missing.push("memory");
    }
    if want.cpu_millicores.is_some() && got.cpu_millicores.is_none() {
        missing.push("cpu");
    }
    if want.pids.is_some() && got.pids.is_none() {
        missing.push("pids");
    }
    let warnings = e.warnings.join("; ");
    match (missing.is_empty(), warnings.is_empty()) {
        (true, true) => None,
        (true, false) => Some(format!("engine warning: {warnings}")),
        (false, true) => Some(format!("limits not applied: {}", missing.join(", "))),
        (false, false) => Some(format!(
            "limits not applied: {} (engine: {warnings})",
            missing.join(", ")
        )),
    }
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
}
