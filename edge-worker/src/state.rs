//! The worker's identity and counters in the state dir.
//!
//! `state.json` holds the identity returned by enrolment plus two counters
//! that must survive restarts:
//!
//! * `seq_reserved`: frame sequence numbers are reserved in blocks of
//!   [`SEQ_BLOCK`] so the file is written once per block instead of once per
//!   frame (SD-card wear). After a restart (even a `kill -9`) the worker
//!   continues from the stored reservation, so a sequence number is never
//!   reused; at most one block is skipped.
//! * `cmd_highest` / `cmd_bitmap`: the [`ReplayWindow`] over incoming command
//!   sequence numbers, written whenever a command is accepted, so a command
//!   is applied at most once even across restarts.
//!
//! Limits: the file is mode 0600 inside a 0700 dir and is always replaced
//! atomically (temp file, fsync, rename, fsync dir), so a power cut leaves
//! either the old or the new version. Writes are synchronous and small (a
//! few hundred bytes) and happen at most once per [`SEQ_BLOCK`] frames or per
//! command.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use protocol::{ReplayWindow, Secret};
use serde::{Deserialize, Serialize};

/// Name of the identity file inside the state dir.
pub const STATE_FILE: &str = "state.json";
/// Name of the generated machine id used when the OS has none.
pub const MACHINE_ID_FILE: &str = "machine-id";
/// How many sequence numbers one write of `state.json` reserves.
pub const SEQ_BLOCK: u64 = 1000;

/// Errors reading or writing the state dir.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state dir could not be created.
    #[error("cannot create state dir {path}: {source}")]
    CreateDir {
        /// The dir.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `state.json` exists but is not valid.
    #[error("{path} is corrupt ({reason}); move it away to enrol again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Contents of `state.json`. `Debug` redacts the secret and the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Id assigned by the conductor (`[a-z0-9-]`, ≤ 32 chars).
    pub worker_id: String,
    /// Frame-authentication secret, 64 hex chars.
    pub secret: String,
    /// Conductor base URL used at enrolment.
    pub conductor_url: String,
    /// Broker URL returned by the conductor (`mqtt://host:port`).
    pub mqtt_url: String,
    /// MQTT username.
    pub mqtt_username: String,
    /// MQTT password.
    pub mqtt_password: String,
    /// The MQTT client id the conductor handed out; `None`: the worker id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_client_id: Option<String>,
    /// Invariant: every frame seq ever sent is `< seq_reserved`; a restarted
    /// worker starts at `seq_reserved` (see the module docs).
    #[serde(default = "one")]
    pub seq_reserved: u64,
    /// Highest command seq accepted ([`ReplayWindow::highest`]).
    #[serde(default)]
    pub cmd_highest: u64,
    /// Bitmap below `cmd_highest` ([`ReplayWindow::bitmap`]).
    #[serde(default)]
    pub cmd_bitmap: u64,
    /// The frame secret before the last rotation (`Action::RotateSecret`),
    /// 64 hex: commands the conductor sealed before it saw the switch, and
    /// frames queued before it, still verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<String>,
    /// What the local API's per-service tokens are derived from, 64 hex:
    /// the secret at enrolment, kept across rotations so that running
    /// services keep the tokens in their environment. `None`: the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_api_key: Option<String>,
    /// The Ed25519 public key (64 hex) agent releases must be signed with
    /// ([`crate::update`]): the conductor's at enrolment, or
    /// `--release-key`. Invariant: only enrolment and the operator's flag
    /// set it, never a command, so a compromised conductor or broker cannot
    /// swap it for its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_key: Option<String>,
}

fn one() -> u64 {
    1
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("worker_id", &self.worker_id)
            .field("secret", &"<redacted>")
            .field("conductor_url", &self.conductor_url)
            .field("mqtt_url", &self.mqtt_url)
            .field("mqtt_username", &self.mqtt_username)
            .field("mqtt_password", &"<redacted>")
            .field("seq_reserved", &self.seq_reserved)
            .field("cmd_highest", &self.cmd_highest)
            .field("cmd_bitmap", &self.cmd_bitmap)
            .field("rotated", &self.previous_secret.is_some())
            .finish_non_exhaustive()
    }
}

impl State {
    /// The parsed frame secret.
    pub fn secret(&self) -> Result<Secret, protocol::DecodeError> {
        Secret::from_hex(&self.secret)
    }

    /// The secret before the last rotation, if any (unreadable: none).
    pub fn previous_secret(&self) -> Option<Secret> {
        self.previous_secret
            .as_deref()
            .and_then(|h| Secret::from_hex(h).ok())
    }

    /// The key of the local API's service tokens ([`State::local_api_key`]).
    pub fn local_api_key(&self) -> Result<Secret, protocol::DecodeError> {
        match &self.local_api_key {
            Some(h) => Secret::from_hex(h),
            None => self.secret(),
        }
    }

    /// The persisted command replay window.
    pub fn cmd_window(&self) -> ReplayWindow {
        ReplayWindow::new(self.cmd_highest, self.cmd_bitmap)
    }

    fn validate(&self) -> Result<(), String> {
        if !protocol::topic::is_valid_worker_id(&self.worker_id) {
            return Err(format!("invalid worker_id {:?}", self.worker_id));
        }
        if Secret::from_hex(&self.secret).is_err() {
            return Err("secret is not 64 hex characters".into());
        }
        if self.mqtt_url.is_empty() {
            return Err("mqtt_url is empty".into());
        }
        Ok(())
    }
}

/// Creates the state dir (mode 0700) if missing.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Reads `state.json`; `Ok(None)` when there is none yet (first run).
pub fn load(dir: &Path) -> Result<Option<State>, StateError> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    let state: State = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    state
        .validate()
        .map_err(|reason| StateError::Corrupt { path, reason })?;
    Ok(Some(state))
}

/// Writes `state.json` atomically with mode 0600.
pub fn save(dir: &Path, state: &State) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Write {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    write_atomic(&path, &bytes)
}

/// Replaces `path` with `bytes` atomically: write `path.tmp` (mode 0600),
/// fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_os_string();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)?;
    sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(err)
}

/// fsyncs a directory so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The machine id to enrol with: the override, else `/etc/machine-id`
/// (or the D-Bus copy), else a random id generated once into the state dir.
pub fn machine_id(override_id: Option<&str>, dir: &Path) -> Result<String, StateError> {
    if let Some(id) = override_id {
        return Ok(id.to_string());
    }
    for p in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(text) = fs::read_to_string(p) {
            let id = text.trim();
            if !id.is_empty() {
                return Ok(id.to_string());
            }
        }
    }
    let path = dir.join(MACHINE_ID_FILE);
    if let Ok(text) = fs::read_to_string(&path) {
        let id = text.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| StateError::Write {
        path: path.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    let id = protocol::hex_string(&raw);
    write_atomic(&path, id.as_bytes())?;
    Ok(id)
}

/// The loaded identity plus the in-memory sequence counter; owns every write
/// of `state.json` after enrolment.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    state: State,
    /// Next seq to hand out. Invariant: `next_seq >= 1`, and every seq handed
    /// out is `< state.seq_reserved` once the reservation has been persisted
    /// (or attempted; see [`StateStore::next_seq`]).
    next_seq: u64,
}

impl StateStore {
    /// Wraps a loaded or freshly enrolled state; seqs continue from the
    /// stored reservation.
    pub fn new(dir: PathBuf, state: State) -> StateStore {
        let next_seq = state.seq_reserved.max(1);
        StateStore {
            dir,
            state,
            next_seq,
        }
    }

    /// The identity.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The next frame sequence number. Writes `state.json` when the current
    /// block is exhausted. If that write fails the error is logged and the
    /// worker carries on (refusing to send would take a device with a full
    /// or read-only disk offline); a later restart may then reuse seqs from
    /// the unpersisted block, which the conductor refuses as replays.
    pub fn next_seq(&mut self) -> u64 {
        if self.next_seq >= self.state.seq_reserved {
            self.state.seq_reserved = self.next_seq.saturating_add(SEQ_BLOCK);
            if let Err(e) = save(&self.dir, &self.state) {
                tracing::error!("cannot persist the sequence reservation: {e}");
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Makes sure future seqs are above `seq` (frames loaded from the outbox
    /// must stay older than new ones even if `state.json` was rolled back).
    pub fn ensure_above(&mut self, seq: u64) {
        if seq >= self.next_seq {
            self.next_seq = seq.saturating_add(1);
        }
    }

    /// Switches to the rotated secret `next` and persists it (the current
    /// one becomes the previous; the local API key stays what it was).
    /// Nothing changes in memory if the write fails.
    pub fn rotate_secret(&mut self, next: &Secret) -> Result<(), StateError> {
        let mut state = self.state.clone();
        if state.local_api_key.is_none() {
            state.local_api_key = Some(state.secret.clone());
        }
        state.previous_secret = Some(std::mem::replace(&mut state.secret, next.to_hex()));
        save(&self.dir, &state)?;
        self.state = state;
        Ok(())
    }

    /// Persists a fresh MQTT login from the conductor (the broker refused
    /// the stored one: [`crate::session`]'s login refresh).
    pub fn set_mqtt_login(
        &mut self,
        username: String,
        password: String,
        client_id: Option<String>,
    ) -> Result<(), StateError> {
        let mut state = self.state.clone();
        state.mqtt_username = username;
        state.mqtt_password = password;
        if client_id.is_some() {
            state.mqtt_client_id = client_id;
        }
        save(&self.dir, &state)?;
        self.state = state;
        Ok(())
    }

    /// Persists an updated command replay window.
    pub fn save_cmd_window(&mut self, window: ReplayWindow) -> Result<(), StateError> {
        self.state.cmd_highest = window.highest;
        self.state.cmd_bitmap = window.bitmap;
        save(&self.dir, &self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> State {
        State {
            worker_id: "w-abc".into(),
            secret: "11".repeat(32),
            conductor_url: "http://127.0.0.1:3000".into(),
            mqtt_url: "mqtt://127.0.0.1:1883".into(),
            mqtt_username: "w-abc".into(),
            mqtt_password: "hunter2".into(),
            mqtt_client_id: None,
            seq_reserved: 1,
            cmd_highest: 0,
            cmd_bitmap: 0,
            previous_secret: None,
            local_api_key: None,
            release_key: None,
        }
    }

    #[test]
    fn save_is_atomic_0600_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        ensure_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(load(&dir).unwrap().is_none());
        let s = sample();
        save(&dir, &s).unwrap();
        let meta = fs::metadata(dir.join(STATE_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            !dir.join("state.json.tmp").exists(),
            "temp file renamed away"
        );
        assert_eq!(load(&dir).unwrap(), Some(s.clone()));
        // Overwrite keeps the mode and the content is the new one.
        let mut s2 = s;
        s2.seq_reserved = 5000;
        save(&dir, &s2).unwrap();
        assert_eq!(load(&dir).unwrap().unwrap().seq_reserved, 5000);
    }

    #[test]
    fn debug_redacts_secrets() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("hunter2"));
        assert!(!text.contains(&"11".repeat(32)));
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(load(tmp.path()), Err(StateError::Corrupt { .. })));
        let mut bad = sample();
        bad.worker_id = "BAD/ID".into();
        fs::write(
            tmp.path().join(STATE_FILE),
            serde_json::to_vec(&bad).unwrap(),
        )
        .unwrap();
        assert!(matches!(load(tmp.path()), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn seq_reservation_never_reuses_a_seq_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        save(&dir, &sample()).unwrap();
        let mut highest = 0;
        // Several "runs", each killed (dropped without any shutdown write)
        // after a different number of frames.
        for frames in [1u64, 999, 1000, 1001, 2500, 3] {
            let state = load(&dir).unwrap().unwrap();
            let mut store = StateStore::new(dir.clone(), state);
            for _ in 0..frames {
                let seq = store.next_seq();
                assert!(seq > highest, "seq {seq} after {highest}");
                highest = seq;
                // The invariant behind it: whatever was handed out is below
                // the persisted reservation.
                assert!(load(&dir).unwrap().unwrap().seq_reserved > seq);
            }
        }
        // The first seq ever is 1.
        save(&dir, &sample()).unwrap();
        let mut store = StateStore::new(dir.clone(), load(&dir).unwrap().unwrap());
        assert_eq!(store.next_seq(), 1);
        assert_eq!(store.next_seq(), 2);
        store.ensure_above(10);
        assert_eq!(store.next_seq(), 11);
    }

    #[test]
    fn only_one_write_per_block() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        save(&dir, &sample()).unwrap();
        let mut store = StateStore::new(dir.clone(), load(&dir).unwrap().unwrap());
        store.next_seq();
        // Remove the file: if the store wrote again within the block it
        // would reappear.
        fs::remove_file(dir.join(STATE_FILE)).unwrap();
        for _ in 1..SEQ_BLOCK {
            store.next_seq();
        }
        assert!(!dir.join(STATE_FILE).exists(), "no write inside a block");
        store.next_seq();
        assert!(
            dir.join(STATE_FILE).exists(),
            "one write for the next block"
        );
    }

    #[test]
    fn cmd_window_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        save(&dir, &sample()).unwrap();
        let mut store = StateStore::new(dir.clone(), load(&dir).unwrap().unwrap());
        let mut w = store.state().cmd_window();
        w.accept(7);
        store.save_cmd_window(w).unwrap();
        let again = load(&dir).unwrap().unwrap().cmd_window();
        assert_eq!(again.check(7), protocol::SeqVerdict::Replayed);
    }

    #[test]
    fn machine_id_override_wins() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(machine_id(Some("m-1"), tmp.path()).unwrap(), "m-1");
        let id = machine_id(None, tmp.path()).unwrap();
        assert!(!id.is_empty());
    }
}
