//! Remote exec sessions in flight: session id → the feed of the API
//! response that relays its output ([`crate::http`]'s `exec.rs` opens and
//! relays them; the worker's upload, `POST /api/v1/agent/exec/{session}`,
//! feeds them).
//!
//! [`ExecSessions`] keeps its map behind a private leaf lock
//! (`exec_sessions`, [`LockLevel::Leaf`]): every method takes it and
//! releases it before returning, and calls nothing that locks meanwhile, so
//! it may be called with the worker map (and the store) held, never with
//! another leaf held (the lock order at [`crate::state::Shared`]).
//!
//! Limits: at most [`MAX_EXEC_SESSIONS`] at once (each holds two HTTP
//! threads: the caller's response and the worker's upload); a session
//! accepts one upload, from the worker it was sent to.

use std::collections::HashMap;
use std::sync::mpsc::SyncSender;

use protocol::exec::ExecFrame;

use crate::state::{LockLevel, OrderedMutex};

/// Sessions at once.
pub const MAX_EXEC_SESSIONS: usize = 4;

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
            },
        );
        true
    }

    /// The feed of `session` for the upload of `worker_id`: `None` when the
    /// session is not open, belongs to another worker, or has its upload.
    pub fn attach(&self, session: &[u8; 16], worker_id: &str) -> Option<SyncSender<ExecEvent>> {
        let mut live = self.live.lock();
        let l = live.get_mut(session)?;
        if l.worker_id != worker_id || l.attached {
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
    use super::*;

    #[test]
    fn sessions_are_bounded_and_attach_once_for_their_worker() {
        let s = ExecSessions::new();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        for i in 0..MAX_EXEC_SESSIONS {
            assert!(s.open([u8::try_from(i).unwrap_or(0); 16], "w-1", tx.clone()));
        }
        assert!(!s.open([99; 16], "w-1", tx.clone()), "over the limit");
        assert!(s.attach(&[0; 16], "w-2").is_none(), "another worker");
        assert!(s.attach(&[0; 16], "w-1").is_some());
        assert!(s.attach(&[0; 16], "w-1").is_none(), "attached already");
        s.close(&[0; 16]);
        assert!(!s.is_open(&[0; 16]));
        assert!(s.open([99; 16], "w-1", tx), "room again");
    }
}
