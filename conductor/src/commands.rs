//! Commands to a worker: the next seq of its command stream (persisted
//! before use, so the stream stays monotonic across restarts), sealed with
//! its current secret in the wire format it last spoke.

use protocol::{Action, Body, Command, Envelope};

use crate::deployment::ServiceError;
use crate::state::{now_ms, Shared, WorkerEntry};

/// Assigns the next command seq for `w` (persisted first), seals `action`
/// and returns `(cmd_id, frame)`. Call with the worker map locked.
pub fn seal_command(
    shared: &Shared,
    w: &mut WorkerEntry,
    action: Action,
) -> Result<(u32, Vec<u8>), ServiceError> {
    let seq = w.cmd_seq + 1;
    // Persist before publishing so the stream stays monotonic across restarts.
    shared.db().set_cmd_seq(&w.id, seq)?;
    w.cmd_seq = seq;
    // fits: masked to the low 32 bits (command ids wrap).
    #[allow(clippy::cast_possible_truncation)]
    let cmd_id = (seq & u64::from(u32::MAX)) as u32;
    let env = Envelope {
        version: w.format,
        worker_id: protocol::bounded(&w.id),
        seq,
        sent_at_ms: now_ms(),
        body: Body::Command(Command { id: cmd_id, action }),
    };
    let frame = protocol::seal(&w.secret, &env).map_err(|e| ServiceError::Seal(e.to_string()))?;
    Ok((cmd_id, frame))
}
