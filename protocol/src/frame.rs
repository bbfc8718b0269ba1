//! Frame types. Every frame is an [`Envelope`] whose [`Body`] is one of the
//! variants below.
//!
//! Compatibility rules (a contract, pinned by golden tests):
//! * enum variants are only ever **appended**, never reordered or removed;
//! * struct fields are never reordered; a new field means a new
//!   [`crate::FORMAT_VERSION`] or a new body variant;
//! * every string and list has a fixed capacity (`heapless`), so the largest
//!   possible frame is known ([`crate::MAX_FRAME_LEN`]).
//!
//! Units are integers chosen to encode small as postcard varints:
//! percentages in hundredths (`1234` = 12.34 %), load averages in hundredths,
//! temperatures in millidegrees Celsius, sizes in bytes, rates in bytes/s.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

/// Capacity of a worker id (`[a-z0-9-]`, see [`crate::topic::is_valid_worker_id`]).
pub const WORKER_ID_LEN: usize = 32;
/// Most CPU cores reported per frame; more are folded into the total only.
pub const MAX_CORES: usize = 64;
/// Most mounted disks per frame (the largest by size are kept).
pub const MAX_DISKS: usize = 8;
/// Most network interfaces per frame.
pub const MAX_NETS: usize = 8;
/// Most temperature sensors per frame.
pub const MAX_TEMPS: usize = 8;
/// Most labels on a worker.
pub const MAX_LABELS: usize = 16;

/// A worker id on the wire.
pub type WorkerId = String<WORKER_ID_LEN>;
/// Short name (interfaces, sensors, label keys).
pub type Name = String<32>;
/// Longer text (hostnames, OS names, mount points, label values).
pub type Text = String<64>;
/// Human-readable detail in events and replies.
pub type Detail = String<200>;

/// The authenticated wrapper around every body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always [`crate::FORMAT_VERSION`] when sent; the first byte on the wire.
    pub version: u8,
    /// Must equal the `<worker_id>` in the topic it arrives on.
    pub worker_id: WorkerId,
    /// Strictly increasing per sender and direction; the only replay
    /// protection (device clocks are not trusted, Pis have no RTC).
    pub seq: u64,
    /// Sender's clock in ms since the Unix epoch; informational only.
    pub sent_at_ms: u64,
    /// The payload.
    pub body: Body,
}

/// Frame payloads. **Append only.**
// Variants are inline (no Box) so a frame is one stack value with no
// allocation; frames are built once per interval, never stored in bulk
// (queues hold sealed bytes), so the ~3 KiB size is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Inventory, sent (retained) after every connect.
    Birth(Birth),
    /// Periodic hardware metrics.
    Metrics(Metrics),
    /// Something happened on the worker.
    Event(Event),
    /// Conductor → worker request.
    Command(Command),
    /// Worker → conductor answer to a [`Command`].
    Reply(Reply),
    /// Worker → conductor: the actual state of one hosted service.
    ServiceStatus(ServiceStatus),
    /// Worker → conductor: part of a service's log, answering [`Action::Logs`].
    LogChunk(LogChunk),
    /// Worker → conductor: metrics a hosted service published through the
    /// worker's local API.
    ServiceMetrics(ServiceMetrics),
    /// Worker → conductor (retained): a Raspberry Pi's board identity and
    /// firmware health flags, after each connect and whenever the flags
    /// change. Never sent by a machine that is not a Pi.
    Board(Board),
    /// Worker → conductor, on the metrics topic: the samples of a batch
    /// period in one frame ([`crate::batch`]), sent only to a conductor
    /// that acknowledges with [`crate::batch::STORED_ACCEPTS_BATCH`].
    MetricsBatch(crate::batch::MetricsBatch),
}

/// Discriminant of [`Body`], for topic checks and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyKind {
    /// [`Body::Birth`]
    Birth,
    /// [`Body::Metrics`]
    Metrics,
    /// [`Body::Event`]
    Event,
    /// [`Body::Command`]
    Command,
    /// [`Body::Reply`]
    Reply,
    /// [`Body::ServiceStatus`]
    ServiceStatus,
    /// [`Body::LogChunk`]
    LogChunk,
    /// [`Body::ServiceMetrics`]
    ServiceMetrics,
    /// [`Body::Board`]
    Board,
    /// [`Body::MetricsBatch`]
    MetricsBatch,
}

impl Body {
    /// The variant, without its data.
    pub fn kind(&self) -> BodyKind {
        match self {
            Body::Birth(_) => BodyKind::Birth,
            Body::Metrics(_) => BodyKind::Metrics,
            Body::Event(_) => BodyKind::Event,
            Body::Command(_) => BodyKind::Command,
            Body::Reply(_) => BodyKind::Reply,
            Body::ServiceStatus(_) => BodyKind::ServiceStatus,
            Body::LogChunk(_) => BodyKind::LogChunk,
            Body::ServiceMetrics(_) => BodyKind::ServiceMetrics,
            Body::Board(_) => BodyKind::Board,
            Body::MetricsBatch(_) => BodyKind::MetricsBatch,
        }
    }
}

/// A key=value label (`site=shop`, `model=pi5`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// Key, e.g. `site`.
    pub key: Name,
    /// Value, e.g. `shop`.
    pub value: Text,
}

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Mount point, e.g. `/`.
    pub mount: Text,
    /// Bytes used.
    pub used: u64,
    /// Bytes total.
    pub total: u64,
}

/// One network interface's throughput since the previous sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRate {
    /// Interface name, e.g. `eth0`.
    pub name: Name,
    /// Received bytes per second.
    pub rx_bps: u64,
    /// Transmitted bytes per second.
    pub tx_bps: u64,
}

/// One temperature sensor (a thermal zone; `cpu-thermal` on a Pi).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Temperature {
    /// Sensor name (thermal zone type).
    pub name: Name,
    /// Millidegrees Celsius.
    pub millicelsius: i32,
}

/// Inventory of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Birth {
    /// Hostname.
    pub hostname: Text,
    /// OS name and version, e.g. `Debian GNU/Linux 12`.
    pub os: Text,
    /// Kernel release.
    pub kernel: Text,
    /// CPU architecture, e.g. `aarch64`.
    pub arch: Name,
    /// CPU model / brand string.
    pub cpu_model: Text,
    /// Logical cores.
    pub cores: u16,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Mounted filesystems.
    pub disks: Vec<Disk, MAX_DISKS>,
    /// `/proc/device-tree/model` on a Pi, DMI product name elsewhere, or empty.
    pub device_model: Text,
    /// edge-worker version.
    pub agent_version: Name,
    /// Kernel boot id (changes on every boot).
    pub boot_id: String<36>,
    /// Labels set at enrolment or through the API.
    pub labels: Vec<Label, MAX_LABELS>,
    /// Metrics interval in ms: the conductor's liveness clock for this worker.
    pub interval_ms: u32,
}

/// A metrics sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// CPU busy, all cores, hundredths of a percent.
    pub cpu_total: u16,
    /// CPU busy per core, hundredths of a percent.
    pub cpu_per_core: Vec<u16, MAX_CORES>,
    /// Load averages 1/5/15 min, hundredths.
    pub load: [u32; 3],
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Memory available, bytes.
    pub memory_available: u64,
    /// Memory total, bytes.
    pub memory_total: u64,
    /// Swap in use, bytes.
    pub swap_used: u64,
    /// Swap total, bytes.
    pub swap_total: u64,
    /// Mounted filesystems.
    pub disks: Vec<Disk, MAX_DISKS>,
    /// Per-interface throughput.
    pub net: Vec<NetRate, MAX_NETS>,
    /// Temperatures.
    pub temperatures: Vec<Temperature, MAX_TEMPS>,
    /// Seconds since boot.
    pub uptime_s: u64,
    /// Number of processes.
    pub processes: u32,
    /// Frames the worker dropped (queue overflow) since the previous metrics frame.
    pub dropped: u32,
}

/// A Raspberry Pi's identity and firmware health ([`crate::board`] names
/// the bits and decodes the revision). Read from the device tree and sysfs;
/// each field is empty or `None` where the kernel does not expose it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Board {
    /// The firmware's `get_throttled` bits: under-voltage, frequency capped,
    /// throttled, soft temperature limit, now (bits 0–3) and since boot
    /// (bits 16–19). `None` where the kernel does not expose them.
    pub throttled: Option<u32>,
    /// The board's revision code (model, memory, maker), from
    /// `/proc/device-tree/system/linux,revision` or `/proc/cpuinfo`.
    pub revision: Option<u32>,
    /// Board serial number, hex as the firmware prints it.
    pub serial: Name,
    /// The SD card (`mmcblk0`), when there is one.
    pub sd: Option<SdCard>,
}

/// An SD card's identity, from its CID register (`/sys/block/mmcblk0/device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdCard {
    /// Product name, e.g. `SC32G`.
    pub name: Name,
    /// Product serial number, e.g. `0x1a2b3c4d`.
    pub serial: Name,
    /// Manufacturing date, `MM/YYYY`.
    pub date: Name,
    /// Manufacturer id (`0x03` SanDisk, `0x1b` Samsung, …).
    pub manfid: u16,
}

/// Kinds of worker event. **Append only.**
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The agent started.
    AgentStarted,
    /// The agent is shutting down cleanly.
    AgentStopping,
    /// The store-and-forward queue overflowed and dropped its oldest frames.
    QueueOverflow,
    /// A command frame was rejected (bad tag, replay, …); detail says why.
    CommandRejected,
    /// A hosted service changed state; detail is `<name>: <what>`.
    ServiceChanged,
    /// A downloaded artifact or manifest did not match its digest and was
    /// refused; detail is `<name>: <why>`.
    ArtifactRejected,
    /// A health check failed `retries` times; the service is restarted.
    /// Detail is `<name>: <last failure>`.
    HealthFailed,
    /// An event a hosted service published through the local API; detail
    /// is `<name>: <text>`.
    ServiceEvent,
    /// The agent now runs a new version after a self-update; detail is
    /// `<from> -> <to>`.
    AgentUpdated,
    /// A self-update was refused or rolled back, and the agent that was
    /// running before runs on; detail is `<version>: <why>`.
    AgentUpdateFailed,
}

/// A worker event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// Free text.
    pub detail: Detail,
}

/// Command actions. **Append only.**
// Inline like `Body` (see there): `Deploy` carries a whole spec.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Reply at once (liveness / round-trip measurement).
    Ping,
    /// Change the metrics interval (ms) until restart.
    SetInterval(u32),
    /// Publish a fresh birth frame.
    Rebirth,
    /// Install (or replace with this version) and run a service. Idempotent:
    /// the same name and version again changes nothing.
    Deploy(ServiceSpec),
    /// Start a stopped or failed service.
    Start(Name),
    /// Stop a service (it stays installed, desired state "stopped").
    Stop(Name),
    /// Stop and start a service.
    Restart(Name),
    /// Stop a service and forget it.
    Remove(Name),
    /// Install (or replace with this version) and run the service whose
    /// [`crate::Manifest`] the worker fetches over HTTP and checks against
    /// the digest. Idempotent like [`Action::Deploy`].
    DeployManifest(ManifestRef),
    /// Send the tail of a service's log as [`LogChunk`] frames, then follow
    /// new output for a while.
    Logs(LogRequest),
    /// Install (or replace with this version) the service whose
    /// [`crate::Manifest`] the worker fetches and checks exactly as for
    /// [`Action::DeployManifest`], with desired state "stopped": it is not
    /// started, and a running copy (of any version) is stopped first.
    /// Persisted like [`Action::Stop`]. Idempotent: the same name and
    /// version again changes nothing.
    InstallManifest(ManifestRef),
    /// Sent on the worker's `cmd/stored` topic ([`crate::TopicKind::Stored`]).
    /// Application-level acknowledgement, no reply expected: every frame of
    /// the worker's with seq ≤ this one has been processed by the conductor
    /// and whatever it stores of them is committed (a conductor crash can no
    /// longer lose them), so the worker may drop them from its outbox.
    /// Cumulative and idempotent: a replayed or late one only repeats a
    /// statement that was already true (worker seqs never repeat), so it is
    /// outside the command seq stream — its envelope repeats the seq of the
    /// last command sent (0 before any) and the worker neither checks nor
    /// advances its command replay window for it. [`Command::id`] is 0.
    Stored(u64),
    /// Replace the worker's frame secret: the new 32-byte secret, sealed
    /// ([`crate::sealed`]) under the current one with the context
    /// [`crate::sealed::rotation_context`]. The worker stores it, replies
    /// `Ok`, seals everything from then on with it, and keeps the old one to
    /// open commands that were sealed before the switch reached it.
    /// Idempotent: the same sealed secret again changes nothing.
    RotateSecret(SealedSecret),
    /// Run a command on the worker (remote exec, off unless the worker was
    /// started with `--allow-remote-exec`). The worker replies `Ok` once it
    /// has started it, or `Error` (disabled, refused, cannot start); the
    /// output does **not** come back as frames: the worker streams it over
    /// HTTPS to `POST /api/v1/agent/exec/{session hex}` in the
    /// [`crate::exec`] stream format, keeping bulk data off the broker.
    Exec(ExecRequest),
    /// Replace the agent with a signed release ([`crate::release`]). The
    /// worker replies `Error` (and nothing changes) when the release is not
    /// signed by its pinned key, is for another arch, is older than what it
    /// runs without `allow_downgrade`, or self-update is not possible there;
    /// `Ok` once the new binary is downloaded and checked and its trial
    /// begins. The outcome comes as an [`EventKind::AgentUpdated`] or
    /// [`EventKind::AgentUpdateFailed`] event, and the birth's
    /// `agent_version`. Idempotent: the running version again is `Ok`,
    /// "already running".
    UpdateAgent(crate::release::AgentUpdate),
    /// Open an interactive shell on a pseudo-terminal (remote shell, off
    /// unless the worker was started with `--allow-remote-exec`). The worker
    /// replies `Ok` once the shell runs, or `Error`; the terminal's bytes do
    /// **not** travel as frames: the worker uploads the output to
    /// `POST /api/v1/agent/shell/{session hex}` and reads keystrokes,
    /// resizes and the hang-up from `GET /api/v1/agent/shell/{session
    /// hex}/input` ([`crate::shell`]).
    Shell(ShellRequest),
    /// Someone is looking (a dashboard page, an API client): sample every
    /// `interval_ms` and send each sample at once as a `Metrics` frame for
    /// `for_s` seconds, then go back to the configured interval and
    /// batching. No reply. A later `Live` replaces the earlier one (so a
    /// viewer renews it before it runs out). Sent only to workers that sent
    /// a [`Body::MetricsBatch`]; workers clamp the interval to their
    /// minimum and `for_s` to [`MAX_LIVE_S`].
    Live(LiveRequest),
}

/// Longest an [`Action::Live`] lasts, in seconds.
pub const MAX_LIVE_S: u32 = 600;

/// What [`Action::Live`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRequest {
    /// Sample (and send) every this many milliseconds.
    pub interval_ms: u32,
    /// For this many seconds from when the worker gets the command.
    pub for_s: u32,
}

/// Most argv elements (the program and its arguments) of an
/// [`Action::Exec`]: with [`EXEC_ARG_LEN`], the largest `Exec` command stays
/// well under [`crate::MAX_FRAME_LEN`] (`tests/limits.rs`).
pub const MAX_EXEC_ARGS: usize = 16;
/// Most bytes of UTF-8 in one argv element of an [`Action::Exec`].
pub const EXEC_ARG_LEN: usize = 192;

/// What [`Action::Exec`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Random id the conductor chose; names the upload
    /// (`/api/v1/agent/exec/{hex}`) and is accepted there only from the
    /// worker the command went to.
    pub session: [u8; 16],
    /// The program (looked up in `PATH` unless it contains a `/`) and its
    /// arguments, run directly (no shell); at least one element.
    pub argv: Vec<String<EXEC_ARG_LEN>, MAX_EXEC_ARGS>,
    /// The worker kills the command's process group after this many seconds.
    pub timeout_s: u32,
    /// The worker sends at most this many bytes of stdout and stderr
    /// together, then kills the process group and reports the cut.
    pub max_output: u32,
}

/// What [`Action::Shell`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellRequest {
    /// Random id the conductor chose; names both HTTP streams
    /// ([`crate::shell`]) and is accepted there only from the worker the
    /// command went to.
    pub session: [u8; 16],
    /// The program and its arguments; empty = the worker's default login
    /// shell (`$SHELL`, else `/bin/bash` or `/bin/sh`).
    pub argv: Vec<String<EXEC_ARG_LEN>, MAX_EXEC_ARGS>,
    /// Terminal width in columns at the start (0 is taken as 80).
    pub cols: u16,
    /// Terminal height in rows at the start (0 is taken as 24).
    pub rows: u16,
}

/// A secret sealed for [`Action::RotateSecret`]: 61 bytes
/// ([`crate::sealed::OVERHEAD`] + 32).
pub type SealedSecret = Vec<u8, 64>;

/// Names one manifest version; see [`crate::manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRef {
    /// Service name.
    pub name: Name,
    /// Spec version.
    pub version: u32,
    /// SHA-256 of the encoded manifest.
    pub digest: [u8; 32],
}

/// What [`Action::Logs`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    /// Service name.
    pub name: Name,
    /// Send at most this many bytes from the end of the log (whole lines).
    pub tail_bytes: u32,
    /// Then keep sending new output for this many seconds (0: don't follow).
    pub follow_s: u16,
}

/// Most log bytes in one [`LogChunk`].
pub const LOG_CHUNK_LEN: usize = 2048;

/// Part of a service's output, answering an [`Action::Logs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// The [`Command::id`] of the `Logs` request.
    pub cmd_id: u32,
    /// Service name.
    pub name: Name,
    /// 0, 1, 2… per request, so the receiver can spot a gap.
    pub index: u32,
    /// Output bytes (stdout and stderr interleaved, as written).
    pub data: Vec<u8, LOG_CHUNK_LEN>,
    /// The last chunk of this request (tail sent and follow time over).
    pub last: bool,
}

/// Most samples in one [`ServiceMetrics`] frame.
pub const MAX_SERVICE_SAMPLES: usize = 32;

/// One named value a service published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Metric name, `[a-z0-9_]`.
    pub key: Name,
    /// Value (the service chooses the unit; an integer like every wire value).
    pub value: i64,
}

/// Metrics a hosted service published through the local API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMetrics {
    /// Service name.
    pub name: Name,
    /// Samples.
    pub samples: Vec<Sample, MAX_SERVICE_SAMPLES>,
}

/// Most arguments of a service command.
pub const MAX_ARGS: usize = 16;
/// Most environment variables of a service.
pub const MAX_ENV: usize = 16;

/// A path or command line element.
pub type PathText = String<128>;

/// One environment variable of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Variable name.
    pub name: Name,
    /// Value.
    pub value: Text,
}

/// When a service's process is started again after it exits. **Append only.**
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// Only after a non-zero exit or a signal.
    OnFailure,
    /// Never: an exit leaves the service stopped (or failed).
    Never,
}

/// What a worker needs to run a process service. The conductor versions
/// specs; a worker runs one version of each service name at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Service name, `[a-z0-9-]`, unique per worker.
    pub name: Name,
    /// Spec version (conductor-assigned, increasing).
    pub version: u32,
    /// Executable: an absolute path or a name looked up in `PATH`.
    pub command: PathText,
    /// Arguments.
    pub args: Vec<String<64>, MAX_ARGS>,
    /// Extra environment.
    pub env: Vec<EnvVar, MAX_ENV>,
    /// Working directory (empty: the service's own dir under the state dir).
    pub working_dir: PathText,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// The service is `Failed` after this many restarts within `restart_window_s`.
    pub max_restarts: u16,
    /// Window for `max_restarts`, seconds.
    pub restart_window_s: u32,
    /// First restart delay in ms; doubles per restart up to 60 s.
    pub backoff_ms: u32,
}

/// Lifecycle of a hosted service on a worker. **Append only.**
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceState {
    /// Being started.
    Starting,
    /// Its process runs.
    Running,
    /// Exited; waiting out the restart delay.
    Backoff,
    /// Not running, by request or by its restart policy.
    Stopped,
    /// Gave up: too many restarts in the window, or it cannot be started.
    Failed,
    /// Removed from the worker.
    Removed,
    /// Running, and its health check passes.
    Healthy,
    /// Running, but its health check fails (it is about to be restarted).
    Unhealthy,
}

impl ServiceState {
    /// Lower-case name, as the APIs and the dashboard show it.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopped => "stopped",
            ServiceState::Failed => "failed",
            ServiceState::Removed => "removed",
            ServiceState::Healthy => "healthy",
            ServiceState::Unhealthy => "unhealthy",
        }
    }
}

/// The actual state of one service on a worker, sent on every change and
/// after every (re)connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: Name,
    /// Spec version the worker has.
    pub version: u32,
    /// State.
    pub state: ServiceState,
    /// Process id while running (0 otherwise).
    pub pid: u32,
    /// Restarts since the service was deployed or last started by request.
    pub restarts: u32,
    /// Last exit code (`None`: never exited, or killed by a signal).
    pub exit_code: Option<i32>,
    /// Why (e.g. the spawn error, "5 restarts in 60 s").
    pub detail: Detail,
}

/// A conductor → worker command. Applied at most once per `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Conductor-assigned id, echoed in the [`Reply`].
    pub id: u32,
    /// What to do.
    pub action: Action,
}

/// Outcome of a command. **Append only.**
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyStatus {
    /// Done.
    Ok,
    /// Failed; detail says why.
    Error,
    /// This worker does not know the action.
    Unsupported,
}

/// A worker's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The [`Command::id`] answered.
    pub cmd_id: u32,
    /// Outcome.
    pub status: ReplyStatus,
    /// Free text.
    pub detail: Detail,
}

/// Copies `s` into a bounded string, truncating at a char boundary if needed.
/// Used wherever device-provided text (hostnames, mount points) goes on the wire.
pub fn bounded<const N: usize>(s: &str) -> String<N> {
    let mut out = String::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}
