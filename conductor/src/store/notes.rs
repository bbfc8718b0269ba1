//! `worker_notes` (schema v10): what a worker said that a fleet-wide loop
//! reads later — a service failure for service rollouts
//! ([`crate::state::FailMark`]), an agent update's reply, failure and
//! switch for the agent rollout ([`crate::state::AgentNote`]). Written by
//! the ingest writer with the frame that said it (so as durable as the
//! frame: a frame whose note was not committed is delivered or re-sent
//! again), loaded at start. Before v10 they lived in memory only, and a
//! restart or a standby's takeover in the middle of a rollout lost them:
//! a failure noted just before was never seen by the wave's verdict, and
//! an agent still on trial passed on its version alone.
//!
//! One row per (worker, kind, subject): the last note of its kind.

use super::sql::params;
use super::{i, u, Store, StoreError};

/// The settings key of the time from which this store keeps notes
/// ([`Store::notes_since_ms`]).
pub const NOTES_SINCE: &str = "worker_notes_since_ms";

/// What a note is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// A service failed (subject: the service name).
    ServiceFailure,
    /// The reply to an `UpdateAgent` (subject empty).
    AgentReply,
    /// An `AgentUpdateFailed` event.
    AgentFailure,
    /// An `AgentUpdated` event: the agent switched for good.
    AgentSwitched,
}

impl NoteKind {
    /// Every kind.
    pub const ALL: [NoteKind; 4] = [
        NoteKind::ServiceFailure,
        NoteKind::AgentReply,
        NoteKind::AgentFailure,
        NoteKind::AgentSwitched,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            NoteKind::ServiceFailure => "service_failure",
            NoteKind::AgentReply => "agent_reply",
            NoteKind::AgentFailure => "agent_failure",
            NoteKind::AgentSwitched => "agent_switched",
        }
    }

    /// The kind of a stored name (`None`: a newer conductor's).
    pub fn parse(s: &str) -> Option<NoteKind> {
        NoteKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteRow {
    /// The worker that said it.
    pub worker_id: String,
    /// What it is about.
    pub kind: NoteKind,
    /// The service name for a service failure, else empty.
    pub subject: String,
    /// The version concerned, when known.
    pub version: Option<String>,
    /// An `Ok` reply (nothing else is ok).
    pub ok: bool,
    /// What was said (never a secret).
    pub what: String,
    /// Conductor receive time, ms.
    pub at_ms: u64,
}

/// The writer's upsert of a [`NoteRow`] (`batch.rs`).
pub(super) const UPSERT: &str =
    "INSERT INTO worker_notes (worker_id, kind, subject, version, ok, what, at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
     ON CONFLICT (worker_id, kind, subject) DO UPDATE SET
        version = excluded.version, ok = excluded.ok, what = excluded.what,
        at_ms = excluded.at_ms";

impl Store {
    /// Every note, by worker (rows of kinds this conductor does not know
    /// are skipped).
    pub fn worker_notes(&self) -> Result<Vec<NoteRow>, StoreError> {
        let rows = self.conn.query_map(
            "SELECT worker_id, kind, subject, version, ok, what, at_ms FROM worker_notes
             ORDER BY worker_id, kind, subject",
            params![],
            |r| {
                Ok((
                    r.get::<String>(1)?,
                    NoteRow {
                        worker_id: r.get(0)?,
                        kind: NoteKind::ServiceFailure,
                        subject: r.get(2)?,
                        version: r.get(3)?,
                        ok: r.get::<i64>(4)? != 0,
                        what: r.get(5)?,
                        at_ms: u(r.get(6)?),
                    },
                ))
            },
        )?;
        Ok(rows
            .into_iter()
            .filter_map(|(kind, row)| {
                Some(NoteRow {
                    kind: NoteKind::parse(&kind)?,
                    ..row
                })
            })
            .collect())
    }

    /// Since when this store keeps notes (ms): set to `now_ms` the first
    /// time it is asked. Notes from before (in a conductor's memory only)
    /// are lost, so what was sent before then has incomplete notes.
    pub fn notes_since_ms(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        if let Some(v) = self.setting(NOTES_SINCE)?.and_then(|v| v.parse().ok()) {
            return Ok(v);
        }
        self.set_settings(&[(NOTES_SINCE, &now_ms.to_string())])?;
        Ok(now_ms)
    }
}

/// The upsert's parameters for `n`.
pub(super) fn upsert_params(n: &NoteRow) -> Vec<super::sql::Value> {
    super::sql::owned(params![
        n.worker_id,
        n.kind.as_str(),
        n.subject,
        n.version,
        i64::from(n.ok),
        n.what,
        i(n.at_ms)
    ])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report
    use super::*;
    use crate::store::WriteOp;

    fn note(worker: &str, kind: NoteKind, subject: &str, what: &str, at_ms: u64) -> NoteRow {
        NoteRow {
            worker_id: worker.into(),
            kind,
            subject: subject.into(),
            version: Some("2".into()),
            ok: kind == NoteKind::AgentReply,
            what: what.into(),
            at_ms,
        }
    }

    #[test]
    fn notes_are_the_last_of_their_kind_and_go_with_their_worker() {
        crate::store::each_engine(|s| {
            let notes = [
                note(
                    "w-1",
                    NoteKind::ServiceFailure,
                    "web",
                    "failed v2: exit 1",
                    10,
                ),
                note("w-1", NoteKind::ServiceFailure, "db", "unhealthy v2", 11),
                note("w-1", NoteKind::AgentReply, "", "ok", 12),
                note("w-2", NoteKind::AgentSwitched, "", "0.1.0 -> 0.2.0", 13),
                note("w-2", NoteKind::AgentFailure, "", "0.2.0: bad", 14),
            ];
            let ops: Vec<WriteOp> = notes.iter().cloned().map(WriteOp::Note).collect();
            s.apply_batch(&ops).unwrap();
            assert_eq!(s.worker_notes().unwrap().len(), 5);
            // A later note of the same kind and subject replaces it.
            let later = NoteRow {
                version: None,
                ..note("w-1", NoteKind::ServiceFailure, "web", "deploy refused", 20)
            };
            s.apply_batch(&[WriteOp::Note(later.clone())]).unwrap();
            let back = s.worker_notes().unwrap();
            assert_eq!(back.len(), 5);
            assert!(back.contains(&later), "{back:?}");
            assert!(back.contains(&notes[2]), "an Ok reply: {back:?}");
            assert!(back.contains(&notes[4]));
            // A kind from a newer conductor is skipped, not an error.
            s.conn
                .execute(
                    "INSERT INTO worker_notes (worker_id, kind, subject, ok, what, at_ms)
                     VALUES ('w-3', 'from_the_future', '', 0, 'x', 1)",
                    super::params![],
                )
                .unwrap();
            assert_eq!(s.worker_notes().unwrap().len(), 5);
            // Deleting a worker deletes its notes (here it has no row).
            assert!(!s.delete_worker("w-1").unwrap());
            let left: Vec<String> = s
                .worker_notes()
                .unwrap()
                .into_iter()
                .map(|n| n.worker_id)
                .collect();
            assert!(!left.contains(&"w-1".to_string()), "{left:?}");
            // Since when notes are kept: the first answer, then the same.
            assert_eq!(s.notes_since_ms(1_000).unwrap(), 1_000);
            assert_eq!(s.notes_since_ms(2_000).unwrap(), 1_000);
        });
    }
}
