//! Remote exec and shell sessions in flight: session id → the feed of the
//! API response that relays its output ([`crate::http`]'s `exec.rs` and
//! `shell.rs` open and relay them; the worker's upload,
//! `POST /api/v1/agent/exec/{session}` or `…/agent/shell/{session}`, feeds
//! them). A shell session also holds its input: the client's frames
//! (`POST /api/v1/shell-sessions/{session}/input`, only from the token that
//! opened it) queue for the worker's `GET /api/v1/agent/shell/{session}/input`.
//!
//! [`ExecSessions`] keeps its map behind a private leaf lock
//! (`exec_sessions`, [`LockLevel::Leaf`]): every method takes it and
//! releases it before returning, and calls nothing that locks meanwhile, so
//! it may be called with the worker map (and the store) held, never with
//! another leaf held (the lock order at [`crate::state::Shared`]).
//!
//! Limits: at most [`MAX_EXEC_SESSIONS`] exec and shell sessions together
//! (an exec holds two HTTP threads: the caller's response and the worker's
//! upload; a shell four: those, the worker's input stream and a client's
//! input request); a session accepts one upload and one input stream, from
//! the worker it was sent to; [`INPUT_QUEUE`] input frames wait at most.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use protocol::exec::ExecFrame;
use protocol::shell::ShellInput;

use crate::state::{LockLevel, OrderedMutex};

/// Sessions at once.
pub const MAX_EXEC_SESSIONS: usize = 4;
/// Input frames queued for a shell's worker.
pub const INPUT_QUEUE: usize = 64;

/// What reaches a session's relay.
#[derive(Debug)]
pub enum ExecEvent {
    /// A frame of the worker's upload.
    Frame(ExecFrame),
    /// The upload ended without an exit frame; why.
    Broken(String),
}

/// One open session.
#[derive(Debug)]
struct Live {
    /// The worker the command went to: the only one whose upload is taken.
    worker_id: String,
    /// The relay's feed.
    tx: SyncSender<ExecEvent>,
    /// An upload has attached (a second one is refused).
    attached: bool,
    /// A shell's input side; `None` for an exec.
    shell: Option<ShellSide>,
}

/// The input side of a shell session.
#[derive(Debug)]
struct ShellSide {
    /// The token that opened it: the only one whose input is taken.
    token_id: String,
    /// Queue of the client's input.
    input: SyncSender<ShellInput>,
    /// Its other end, until the worker's input stream takes it (once).
    pending: Option<Receiver<ShellInput>>,
    /// Last keystroke or output, ms since the epoch (the idle timeout).
    activity: Arc<AtomicU64>,
}

/// Why a client's input was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRefused {
    /// No such shell session (ended, or never opened).
    NotFound,
    /// It belongs to another token.
    OtherToken,
}

/// The open sessions (a leaf lock; see the module docs).
#[derive(Debug)]
pub struct ExecSessions {
    /// Session id → its relay. Level: leaf.
    live: OrderedMutex<HashMap<[u8; 16], Live>>,
}

impl Default for ExecSessions {
    fn default() -> Self {
        ExecSessions::new()
    }
}

impl ExecSessions {
    /// No sessions.
    pub fn new() -> ExecSessions {
        ExecSessions {
            live: OrderedMutex::new(LockLevel::Leaf, "exec_sessions", HashMap::new()),
        }
    }

    /// Opens `session` for `worker_id`, fed through `tx`; `false` (nothing
    /// opened) when [`MAX_EXEC_SESSIONS`] are open or the id is taken.
    pub fn open(&self, session: [u8; 16], worker_id: &str, tx: SyncSender<ExecEvent>) -> bool {
        let mut live = self.live.lock();
        if live.len() >= MAX_EXEC_SESSIONS || live.contains_key(&session) {
            return false;
        }
        live.insert(
            session,
            Live {
                worker_id: worker_id.to_string(),
                tx,
                attached: false,
                shell: None,
            },
        );
        true
    }

    /// Opens shell `session` for `worker_id`, its output fed through `tx`,
    /// its input taken only from `token_id`; `activity` is shared with the
    /// relay. `false` as [`ExecSessions::open`].
    pub fn open_shell(
        &self,
        session: [u8; 16],
        worker_id: &str,
        token_id: &str,
        tx: SyncSender<ExecEvent>,
        activity: Arc<AtomicU64>,
    ) -> bool {
        let mut live = self.live.lock();
        if live.len() >= MAX_EXEC_SESSIONS || live.contains_key(&session) {
            return false;
        }
        let (input, pending) = std::sync::mpsc::sync_channel(INPUT_QUEUE);
        live.insert(
            session,
            Live {
                worker_id: worker_id.to_string(),
                tx,
                attached: false,
                shell: Some(ShellSide {
                    token_id: token_id.to_string(),
                    input,
                    pending: Some(pending),
                    activity,
                }),
            },
        );
        true
    }

    /// The input queue of shell `session` for the worker `worker_id`'s
    /// input stream: `None` when it is not an open shell of that worker or
    /// its input was taken already.
    pub fn take_input(&self, session: &[u8; 16], worker_id: &str) -> Option<Receiver<ShellInput>> {
        let mut live = self.live.lock();
        let l = live.get_mut(session)?;
        if l.worker_id != worker_id {
            return None;
        }
        l.shell.as_mut()?.pending.take()
    }

    /// Where `token_id`'s input for shell `session` goes, and its activity
    /// clock.
    pub fn input(
        &self,
        session: &[u8; 16],
        token_id: &str,
    ) -> Result<(SyncSender<ShellInput>, Arc<AtomicU64>), InputRefused> {
        let live = self.live.lock();
        let side = live
            .get(session)
            .and_then(|l| l.shell.as_ref())
            .ok_or(InputRefused::NotFound)?;
        if side.token_id != token_id {
            return Err(InputRefused::OtherToken);
        }
        Ok((side.input.clone(), side.activity.clone()))
    }

    /// The feed of `session` for the upload of `worker_id` (to the shell
    /// path when `shell`): `None` when the session is not open, belongs to
    /// another worker, is of the other kind, or has its upload.
    pub fn attach(
        &self,
        session: &[u8; 16],
        worker_id: &str,
        shell: bool,
    ) -> Option<SyncSender<ExecEvent>> {
        let mut live = self.live.lock();
        let l = live.get_mut(session)?;
        if l.worker_id != worker_id || l.attached || l.shell.is_some() != shell {
            return None;
        }
        l.attached = true;
        Some(l.tx.clone())
    }

    /// `true` while `session` is open.
    pub fn is_open(&self, session: &[u8; 16]) -> bool {
        self.live.lock().contains_key(session)
    }

    /// Closes `session` (an upload still running then finds nobody to feed).
    pub fn close(&self, session: &[u8; 16]) {
        self.live.lock().remove(session);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn sessions_are_bounded_and_attach_once_for_their_worker() {
        let s = ExecSessions::new();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        for i in 0..MAX_EXEC_SESSIONS {
            assert!(s.open([u8::try_from(i).unwrap_or(0); 16], "w-1", tx.clone()));
        }
        assert!(!s.open([99; 16], "w-1", tx.clone()), "over the limit");
        assert!(s.attach(&[0; 16], "w-2", false).is_none(), "another worker");
        assert!(s.attach(&[0; 16], "w-1", true).is_none(), "not a shell");
        assert!(s.attach(&[0; 16], "w-1", false).is_some());
        assert!(
            s.attach(&[0; 16], "w-1", false).is_none(),
            "attached already"
        );
        s.close(&[0; 16]);
        assert!(!s.is_open(&[0; 16]));
        assert!(s.open([99; 16], "w-1", tx), "room again");
    }

    #[test]
    fn a_shell_takes_input_from_its_token_and_gives_it_to_its_worker_once() {
        let s = ExecSessions::new();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let clock = Arc::new(AtomicU64::new(0));
        assert!(s.open_shell([1; 16], "w-1", "t-a", tx, clock));
        assert_eq!(
            s.input(&[1; 16], "t-b").err(),
            Some(InputRefused::OtherToken)
        );
        assert_eq!(s.input(&[2; 16], "t-a").err(), Some(InputRefused::NotFound));
        let (input, _) = s.input(&[1; 16], "t-a").unwrap();
        assert!(s.take_input(&[1; 16], "w-2").is_none(), "another worker");
        let rx = s.take_input(&[1; 16], "w-1").unwrap();
        assert!(s.take_input(&[1; 16], "w-1").is_none(), "taken once");
        input.send(ShellInput::Data(b"ls".to_vec())).unwrap();
        assert_eq!(rx.recv().unwrap(), ShellInput::Data(b"ls".to_vec()));
        assert!(s.attach(&[1; 16], "w-1", false).is_none(), "not an exec");
        assert!(s.attach(&[1; 16], "w-1", true).is_some());
    }
}
