//! Agent self-update: a signed release is checked, staged beside the
//! running binary, run **on trial** by the agent it replaces, and kept only
//! if it proves itself; otherwise the old agent runs on, with no conductor
//! needed for the rollback.
//!
//! The steps, each recorded in `<state dir>/agent-update.json`
//! ([`Record`], written atomically) before it is taken:
//!
//! 1. **check** ([`check`], on the command): the release is signed by the
//!    key pinned at enrolment (or `--release-key`), is for this worker's
//!    arch, and is newer than the running agent (older only with
//!    `allow_downgrade`). Refused: an `Error` reply and an
//!    `AgentUpdateFailed` event, nothing written.
//! 2. **staged** ([`stage`]): the binary is fetched like any artifact
//!    (digest and size checked), copied to `.<name>-<version>.new` beside
//!    the running binary (same filesystem, so the switch is one rename),
//!    hashed again, made executable. The session then ends as for a clean
//!    stop: hosted services are left running (the next agent adopts them),
//!    queued frames are persisted.
//! 3. **trial** ([`run_trial`], in the old agent's process, after its
//!    session ended): the new binary runs as a child with the same
//!    arguments and [`TRIAL_ENV`]. It must start, connect, and have its
//!    `AgentStarted` frame acknowledged by the conductor (`Stored`), then it
//!    writes [`CONFIRM_FILE`]. If it exits, or does not confirm within
//!    `trial_s` (a hang, no route to the broker, a binary that is not an
//!    agent), the old process kills it and goes on as the old agent: it
//!    re-executes its own, untouched binary.
//! 4. **switching → switched**: the confirmed child is stopped (SIGTERM,
//!    services left running), the running binary is hard-linked to
//!    `<name>.previous`, the new one renamed over it, the directory
//!    fsynced; then the process executes the new binary in place. The pid
//!    never changes, so systemd (or a shell, or a container runtime) keeps
//!    supervising the same process throughout.
//!
//! At every start ([`on_start`]) the record is read back and turned into
//! one event: `AgentUpdated` (`<from> -> <to>`) or `AgentUpdateFailed`
//! (`<version>: <why>`), then removed. A kill -9 at any point leaves a
//! phase that says what to do: `staged` or `trial` (the binary was never
//! switched: the old one starts; an orphaned trial child is killed, by pid
//! and start time) → failed; `switching` → whichever binary starts says
//! which side of the rename it is on; `switched` → updated.
//!
//! Limits: Linux only (`/proc`); the binary's directory must be writable by
//! the agent (refused otherwise, with the reason); an agent in a container
//! refuses (the image is the unit of update there: a new image, then
//! `docker compose up -d`); an agent embedded in the conductor
//! (`--local-worker`) refuses. After the switch, a binary that confirmed
//! once is trusted: if it later crashes at every start, its supervisor
//! (systemd) restarts it and `<name>.previous` is there to go back to by
//! hand.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use protocol::release::{AgentUpdate, Version};
use serde::{Deserialize, Serialize};

use crate::fetch::Conductor;
use crate::state;

/// Set (to the version on trial) in the environment of the new binary
/// during its trial.
pub const TRIAL_ENV: &str = "AEREKOS_AGENT_TRIAL";
/// The update in progress (or its outcome not yet reported).
pub const RECORD_FILE: &str = "agent-update.json";
/// Written by the new agent, holding its version, once the conductor has
/// acknowledged its first frame.
pub const CONFIRM_FILE: &str = "agent-update.confirmed";
/// How long a confirmed trial child may take to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Where an update is; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Downloaded and checked, beside the running binary.
    Staged,
    /// The new binary runs as the old one's child.
    Trial,
    /// Confirmed; the binaries are being swapped.
    Switching,
    /// Swapped; the new binary runs (or is about to).
    Switched,
    /// The trial failed; the old binary runs on.
    RolledBack,
}

/// `agent-update.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The version being installed.
    pub version: String,
    /// The version that was running.
    pub from: String,
    /// The binary the agent runs from (replaced at the switch).
    pub exe: PathBuf,
    /// The staged new binary (beside `exe`).
    pub staged: PathBuf,
    /// Where the update is.
    pub phase: Phase,
    /// Why it was rolled back.
    #[serde(default)]
    pub reason: String,
    /// Seconds the trial may take.
    pub trial_s: u16,
    /// The trial child's pid and start time (`/proc/<pid>/stat` field 22):
    /// a later start kills an orphaned child only if both match.
    #[serde(default)]
    pub child: Option<(u32, u64)>,
}

/// What [`check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The release is the running version: nothing to do.
    AlreadyRunning,
    /// Stage it.
    Install,
}

/// Checks a release against the pinned key, this worker's arch and the
/// running version. The `Err` is the reason, for the reply and the event.
pub fn check(
    u: &AgentUpdate,
    key: Option<&[u8; 32]>,
    arch: &str,
    running: &str,
) -> Result<Verdict, String> {
    let to = Version::parse(&u.version).map_err(|e| e.to_string())?;
    if u.arch.as_str() != arch {
        return Err(format!(
            "the release is for {}, this worker is {arch}",
            u.arch
        ));
    }
    let Some(key) = key else {
        return Err(
            "no release key is pinned on this worker (the conductor had none at \
                    enrolment: start the agent with --release-key, or re-enrol)"
                .into(),
        );
    };
    let message = protocol::release::signed_message(&u.version, &u.arch, &u.sha256)
        .map_err(|e| e.to_string())?;
    verify(key, &message, &u.signature)?;
    let current = Version::parse(running).map_err(|e| format!("running version: {e}"))?;
    if to == current {
        return Ok(Verdict::AlreadyRunning);
    }
    if to < current && !u.allow_downgrade {
        return Err(format!(
            "{to} is older than the running {current} (a downgrade must be asked for)"
        ));
    }
    Ok(Verdict::Install)
}

#[cfg(feature = "self-update")]
fn verify(key: &[u8; 32], message: &[u8], signature: &[u8]) -> Result<(), String> {
    use ring::signature::{UnparsedPublicKey, ED25519};
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, signature)
        .map_err(|_| "the signature does not verify under the pinned release key".to_string())
}

#[cfg(not(feature = "self-update"))]
fn verify(_key: &[u8; 32], _message: &[u8], _signature: &[u8]) -> Result<(), String> {
    Err(
        "self-update is not in this build of the agent (built without the self-update feature)"
            .into(),
    )
}

/// Why this agent cannot replace itself at all, if it cannot.
pub fn impossible(mode: crate::SelfUpdate) -> Option<String> {
    use crate::SelfUpdate;
    let in_container =
        || Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists();
    match mode {
        SelfUpdate::Embedded => {
            return Some(
                "this agent is embedded in another program (the conductor's \
                 --local-worker): update that program"
                    .into(),
            )
        }
        SelfUpdate::Never => {
            return Some("self-update is off on this agent (--self-update never)".into())
        }
        SelfUpdate::Auto if in_container() => {
            return Some(
                "the agent runs in a container: update its image instead (a new image, then \
                 docker compose up -d), or start it with --self-update always if the \
                 container keeps its filesystem"
                    .into(),
            )
        }
        SelfUpdate::Auto | SelfUpdate::Always => {}
    }
    if !cfg!(feature = "self-update") {
        return Some(
            "self-update is not in this build of the agent (built without the self-update \
             feature)"
                .into(),
        );
    }
    None
}

/// Reads the record, if any.
pub fn read_record(state_dir: &Path) -> Option<Record> {
    let bytes = fs::read(state_dir.join(RECORD_FILE)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("{RECORD_FILE} unreadable ({e}); ignored");
            None
        }
    }
}

fn write_record(state_dir: &Path, r: &Record) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
    state::write_atomic(&state_dir.join(RECORD_FILE), &bytes).map_err(|e| e.to_string())
}

/// The running binary's path, refusing one that was deleted or replaced
/// under the running process.
fn running_exe() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the running binary: {e}"))?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(format!(
            "the running binary {} was replaced on disk; restart the agent first",
            exe.display()
        ));
    }
    Ok(exe)
}

/// Step 2: fetches the release, copies it beside the running binary,
/// checks the copy, and records `staged`. Blocking.
pub fn stage(conductor: &Conductor, state_dir: &Path, u: &AgentUpdate) -> Result<Record, String> {
    let exe = running_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?;
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "edge-worker".into());
    let staged = dir.join(format!(".{name}-{}.new", u.version));
    let artifact = protocol::manifest::ArtifactRef {
        arch: u.arch.to_string(),
        sha256: u.sha256,
        size: u.size,
    };
    let (cached, _) = conductor
        .ensure_artifact(state_dir, &artifact)
        .map_err(|e| format!("download: {e}"))?;
    let copied = copy_checked(&cached, &staged, &u.sha256).and_then(|()| {
        let mut head = [0u8; 20];
        let n = fs::File::open(&staged)
            .and_then(|mut f| io::Read::read(&mut f, &mut head))
            .map_err(|e| format!("reading {}: {e}", staged.display()))?;
        match protocol::release::elf_mismatch(&head[..n], std::env::consts::ARCH) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    });
    // The cache copy is not needed again (2 MiB less on the SD card).
    let _ = fs::remove_file(&cached);
    if let Err(e) = copied {
        let _ = fs::remove_file(&staged);
        return Err(e);
    }
    let record = Record {
        version: u.version.to_string(),
        from: crate::VERSION.to_string(),
        exe,
        staged,
        phase: Phase::Staged,
        reason: String::new(),
        trial_s: u.trial_s.max(5),
        child: None,
    };
    write_record(state_dir, &record)?;
    Ok(record)
}

/// Copies `from` to `to` (mode 0755, fsynced) and checks the copy's digest.
fn copy_checked(from: &Path, to: &Path, sha256: &[u8; 32]) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    let what = |e: io::Error| format!("writing {}: {e}", to.display());
    fs::copy(from, to).map_err(what)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).map_err(what)?;
    fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(what)?;
    let bytes = fs::read(to).map_err(what)?;
    if Sha256::digest(&bytes).as_slice() != sha256 {
        return Err(format!(
            "{} does not match the release digest",
            to.display()
        ));
    }
    Ok(())
}

/// What the record says at an agent's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// No update in progress.
    Nothing,
    /// This process is the new binary on trial: confirm once the conductor
    /// has acknowledged its first frame ([`confirm`]).
    Trial,
    /// An update ended: report it (`updated`: `AgentUpdated`, else
    /// `AgentUpdateFailed`), then [`finish`].
    Report {
        /// It succeeded.
        updated: bool,
        /// The event's detail.
        detail: String,
    },
}

/// Reads the record at start (see the module docs). `trial_env`: the value
/// of [`TRIAL_ENV`]. An `Err` means this binary must not run as the trial
/// child (its version is not the release's): exiting fails the trial.
pub fn on_start(state_dir: &Path, trial_env: Option<&str>) -> Result<Startup, String> {
    let Some(mut r) = read_record(state_dir) else {
        let _ = fs::remove_file(state_dir.join(CONFIRM_FILE));
        return Ok(Startup::Nothing);
    };
    if r.phase == Phase::Trial && trial_env == Some(r.version.as_str()) {
        if crate::VERSION != r.version {
            return Err(format!(
                "this binary is edge-worker {}, the release says {}",
                crate::VERSION,
                r.version
            ));
        }
        return Ok(Startup::Trial);
    }
    let failed = |why: &str| Startup::Report {
        updated: false,
        detail: format!("{}: {why}", r.version),
    };
    let report = match r.phase {
        Phase::Staged => failed("the agent stopped before the trial began"),
        Phase::Trial => {
            if let Some((pid, start)) = r.child.take() {
                kill_if_same(pid, start);
            }
            failed("the agent was stopped during the trial; the previous agent runs on")
        }
        Phase::Switching | Phase::Switched if crate::VERSION == r.version => Startup::Report {
            updated: true,
            detail: format!("{} -> {}", r.from, r.version),
        },
        Phase::Switching => failed("the agent was stopped during the switch; it runs on unchanged"),
        Phase::Switched => failed(&format!("the switched binary reports {}", crate::VERSION)),
        Phase::RolledBack => failed(&format!("rolled back: {}", r.reason)),
    };
    if r.staged.exists() {
        let _ = fs::remove_file(&r.staged);
    }
    Ok(report)
}

/// Removes the record once its outcome is queued (and persisted).
pub fn finish(state_dir: &Path) {
    for f in [RECORD_FILE, CONFIRM_FILE] {
        match fs::remove_file(state_dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {f}: {e}"),
        }
    }
}

/// The trial child: the conductor has acknowledged its first frame.
pub fn confirm(state_dir: &Path) {
    match state::write_atomic(&state_dir.join(CONFIRM_FILE), crate::VERSION.as_bytes()) {
        Ok(()) => tracing::info!(version = crate::VERSION, "trial confirmed"),
        Err(e) => tracing::error!("cannot confirm the trial: {e}"),
    }
}

fn kill_if_same(pid: u32, start: u64) {
    if crate::supervisor::proc_start_time(pid) != Some(start) {
        return;
    }
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        tracing::warn!(pid, "killed the orphaned trial agent");
    }
}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrialEnd {
    /// The new binary confirmed.
    Confirmed,
    /// It did not; why.
    Failed(String),
}

/// Step 3 and 4, in the old agent's process once its session has ended
/// with a staged update: runs the new binary on trial, then switches to it
/// or stays. Returns only on an error that leaves nothing to exec (the
/// caller exits non-zero and its supervisor restarts it); otherwise this
/// process becomes the new agent or the old one again.
pub async fn run_trial(
    state_dir: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> String {
    let Some(mut r) = read_record(state_dir) else {
        return format!("{RECORD_FILE} is missing: no update to try");
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let _ = fs::remove_file(state_dir.join(CONFIRM_FILE));
    r.phase = Phase::Trial;
    if let Err(e) = write_record(state_dir, &r) {
        return format!("cannot record the trial: {e}");
    }
    let end = trial(state_dir, &mut r, &args, shutdown).await;
    match end {
        TrialEnd::Confirmed => {
            r.phase = Phase::Switching;
            if let Err(e) = write_record(state_dir, &r) {
                return rollback(
                    state_dir,
                    r,
                    &args,
                    &format!("cannot record the switch: {e}"),
                );
            }
            if let Err(e) = switch(&r.exe, &r.staged) {
                return rollback(state_dir, r, &args, &format!("switch: {e}"));
            }
            r.phase = Phase::Switched;
            if let Err(e) = write_record(state_dir, &r) {
                // The binary is switched: the next start reads `switching`
                // and reports from the version it finds.
                tracing::warn!("cannot record the switch: {e}");
            }
            tracing::info!(version = %r.version, "switched: executing the new agent");
            exec(&r.exe, &args)
        }
        TrialEnd::Failed(why) => rollback(state_dir, r, &args, &why),
    }
}

/// Runs the child until it confirms, fails, or the deadline.
async fn trial(
    state_dir: &Path,
    r: &mut Record,
    args: &[std::ffi::OsString],
    shutdown: impl std::future::Future<Output = ()>,
) -> TrialEnd {
    tokio::pin!(shutdown);
    tracing::info!(version = %r.version, trial_s = r.trial_s, "starting the new agent on trial");
    let mut child = match std::process::Command::new(&r.staged)
        .args(args)
        .env(TRIAL_ENV, &r.version)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return TrialEnd::Failed(format!("cannot start it: {e}")),
    };
    let pid = child.id();
    r.child = crate::supervisor::proc_start_time(pid).map(|s| (pid, s));
    if let Err(e) = write_record(state_dir, r) {
        tracing::warn!("cannot record the trial child: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(u64::from(r.trial_s));
    let confirm_path = state_dir.join(CONFIRM_FILE);
    let end = loop {
        if fs::read(&confirm_path).is_ok_and(|v| v == r.version.as_bytes()) {
            break TrialEnd::Confirmed;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                break TrialEnd::Failed(format!("the new agent exited ({status}) during the trial"))
            }
            Ok(None) => {}
            Err(e) => break TrialEnd::Failed(format!("cannot watch the new agent: {e}")),
        }
        if Instant::now() >= deadline {
            break TrialEnd::Failed(format!(
                "the new agent did not start, reach the conductor and have a frame \
                 acknowledged within {} s",
                r.trial_s
            ));
        }
        tokio::select! {
            () = &mut shutdown => break TrialEnd::Failed("the agent was asked to stop during the trial".into()),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    match &end {
        // Stopped like a clean shutdown: services stay, frames persisted.
        TrialEnd::Confirmed => stop(&mut child, STOP_GRACE),
        TrialEnd::Failed(_) => {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    end
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(child: &mut std::process::Child, grace: Duration) {
    if let Some(p) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!("the new agent did not stop within {grace:?}; killed");
    let _ = child.kill();
    let _ = child.wait();
}

/// Keeps the running binary as `<name>.previous` (a hard link, else a
/// copy), then renames the staged one over it: at every instant the path
/// holds a complete binary.
fn switch(exe: &Path, staged: &Path) -> io::Result<()> {
    let mut prev = exe.as_os_str().to_os_string();
    prev.push(".previous");
    let prev = PathBuf::from(prev);
    let mut tmp = prev.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(exe, &tmp).is_err() {
        fs::copy(exe, &tmp)?;
    }
    fs::rename(&tmp, &prev)?;
    fs::rename(staged, exe)?;
    state::sync_dir(exe.parent().unwrap_or(Path::new(".")))
}

/// Records the rollback and executes the (untouched) old binary.
fn rollback(state_dir: &Path, mut r: Record, args: &[std::ffi::OsString], why: &str) -> String {
    tracing::warn!(version = %r.version, "update rolled back: {why}");
    r.phase = Phase::RolledBack;
    r.reason = why.to_string();
    r.child = None;
    if let Err(e) = write_record(state_dir, &r) {
        tracing::error!("cannot record the rollback: {e}");
    }
    let _ = fs::remove_file(&r.staged);
    exec(&r.exe, args)
}

/// Replaces this process with `exe args` (same pid); returns only on error.
fn exec(exe: &Path, args: &[std::ffi::OsString]) -> String {
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(exe)
        .args(args)
        .env_remove(TRIAL_ENV)
        .exec();
    format!("cannot execute {}: {e}", exe.display())
}

#[cfg(all(test, feature = "self-update"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn keypair() -> ring::signature::Ed25519KeyPair {
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap()
    }

    fn release(version: &str, arch: &str, kp: &ring::signature::Ed25519KeyPair) -> AgentUpdate {
        let sha = [5; 32];
        let msg = protocol::release::signed_message(version, arch, &sha).unwrap();
        AgentUpdate {
            version: protocol::frame::bounded(version),
            arch: protocol::frame::bounded(arch),
            sha256: sha,
            size: 10,
            signature: kp.sign(&msg).as_ref().iter().copied().collect(),
            allow_downgrade: false,
            trial_s: 30,
        }
    }

    #[test]
    fn check_refuses_what_it_must_and_says_why() {
        let kp = keypair();
        let key: [u8; 32] = kp.public_key().as_ref().try_into().unwrap();
        let ok = release("0.2.0", "aarch64", &kp);
        assert_eq!(
            check(&ok, Some(&key), "aarch64", "0.1.0"),
            Ok(Verdict::Install)
        );
        assert_eq!(
            check(&ok, Some(&key), "aarch64", "0.2.0"),
            Ok(Verdict::AlreadyRunning)
        );
        let err = |r| check(&r, Some(&key), "aarch64", "0.1.0").unwrap_err();
        assert!(err(release("0.2.0", "armv7l", &kp)).contains("for armv7l"));
        let other = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[8; 32]).unwrap();
        assert!(err(release("0.2.0", "aarch64", &other)).contains("does not verify"));
        let mut tampered = ok.clone();
        tampered.sha256[0] ^= 1;
        assert!(err(tampered).contains("does not verify"));
        let mut relabelled = ok.clone();
        relabelled.version = protocol::frame::bounded("0.3.0");
        assert!(err(relabelled).contains("does not verify"));
        let old = release("0.0.9", "aarch64", &kp);
        assert!(err(old.clone()).contains("older than the running 0.1.0"));
        let mut down = old;
        down.allow_downgrade = true;
        assert_eq!(
            check(&down, Some(&key), "aarch64", "0.1.0"),
            Ok(Verdict::Install)
        );
        assert!(check(&ok, None, "aarch64", "0.1.0")
            .unwrap_err()
            .contains("no release key"));
        let mut short = ok;
        short.signature.truncate(10);
        assert!(err(short).contains("does not verify"));
    }

    fn record(dir: &Path, phase: Phase, version: &str) -> Record {
        let staged = dir.join(".edge-worker-x.new");
        fs::write(&staged, b"x").unwrap();
        let r = Record {
            version: version.into(),
            from: "0.0.1".into(),
            exe: dir.join("edge-worker"),
            staged,
            phase,
            reason: "it hung".into(),
            trial_s: 30,
            child: None,
        };
        write_record(dir, &r).unwrap();
        r
    }

    #[test]
    fn every_phase_found_at_start_ends_in_one_report() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(on_start(d, None), Ok(Startup::Nothing));
        let me = crate::VERSION;
        let cases = [
            (Phase::Staged, "9.9.9", false, "before the trial"),
            (Phase::Trial, "9.9.9", false, "during the trial"),
            (Phase::Switching, "9.9.9", false, "during the switch"),
            (Phase::Switching, me, true, "0.0.1 -> "),
            (Phase::Switched, me, true, "0.0.1 -> "),
            (Phase::Switched, "9.9.9", false, "reports"),
            (Phase::RolledBack, "9.9.9", false, "rolled back: it hung"),
        ];
        for (phase, version, updated, needle) in cases {
            let r = record(d, phase, version);
            match on_start(d, None).unwrap() {
                Startup::Report { updated: u, detail } => {
                    assert_eq!(u, updated, "{phase:?}: {detail}");
                    assert!(detail.contains(needle), "{phase:?}: {detail}");
                }
                other => panic!("{phase:?}: {other:?}"),
            }
            assert!(!r.staged.exists(), "{phase:?}: the staged binary is left");
            finish(d);
            assert_eq!(on_start(d, None), Ok(Startup::Nothing));
        }
        // The trial child of its own version confirms; another refuses.
        record(d, Phase::Trial, me);
        assert_eq!(on_start(d, Some(me)), Ok(Startup::Trial));
        record(d, Phase::Trial, "9.9.9");
        assert!(on_start(d, Some("9.9.9"))
            .unwrap_err()
            .contains("release says 9.9.9"));
    }

    #[test]
    fn the_switch_keeps_the_previous_binary_and_replaces_in_one_rename() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("edge-worker");
        let staged = dir.path().join(".edge-worker-2.new");
        fs::write(&exe, b"old").unwrap();
        fs::write(&staged, b"new").unwrap();
        switch(&exe, &staged).unwrap();
        assert_eq!(fs::read(&exe).unwrap(), b"new");
        assert_eq!(
            fs::read(dir.path().join("edge-worker.previous")).unwrap(),
            b"old"
        );
        assert!(!staged.exists());
    }
}
