//! Rotating a worker's frame secret without re-enrolment
//! (`POST /api/v1/workers/{id}/rotate-secret`).
//!
//! 1. [`begin`] draws the next secret (or keeps the one already pending, so
//!    a repeated request never strands a worker between two new secrets),
//!    stores it as the worker's *pending* secret and builds
//!    `Action::RotateSecret`: the next secret sealed under the current one
//!    ([`protocol::sealed::seal_rotation`]), inside a command frame sealed
//!    like every other.
//! 2. The worker stores it, replies `Ok` and seals everything from then on
//!    with it. The conductor accepts frames under the current **or** the
//!    pending secret; the first that verifies under the pending one
//!    promotes it ([`crate::state::WorkerEntry::promote_secret`]): the old
//!    secret is then accepted for `Config::secret_grace` (24 h) more, for
//!    frames the worker had queued before it switched.
//! 3. A worker that was offline gets the command again as soon as it is
//!    online, and a worker that did not answer every [`RESEND_EVERY`]
//!    ([`resend_pending`], from the reconcile loop).
//!
//! Invariant: the conductor seals commands with the worker's *current*
//! secret until it has seen the switch; the worker verifies commands with
//! its current and previous secrets, so whichever side is ahead, both
//! understand each other. Limits: one rotation at a time per worker (a new
//! request while one is pending re-sends it); the worker's local API
//! tokens stay derived from its enrolment secret (services keep theirs).

use std::time::{Duration, Instant};

use protocol::{Action, Secret};
use rumqttc::{AsyncClient, QoS};
use tracing::{info, warn};

use crate::crypto::random_bytes;
use crate::state::{Shared, Status};

/// A pending rotation is sent again at most this often.
pub const RESEND_EVERY: Duration = Duration::from_secs(30);

/// Why a rotation could not start.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// No such worker.
    #[error("worker not found")]
    NotFound,
    /// A revoked worker is not given a secret.
    #[error("worker is revoked")]
    Revoked,
    /// The random source failed.
    #[error("random source: {0}")]
    Random(#[from] getrandom::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Sealing failed.
    #[error("sealing the secret: {0}")]
    Seal(#[from] protocol::sealed::SealError),
    /// The command frame could not be built.
    #[error(transparent)]
    Command(#[from] crate::deployment::ServiceError),
}

/// Starts (or repeats) the rotation of `id`'s secret: the `RotateSecret`
/// action to send.
pub fn begin(shared: &Shared, id: &str) -> Result<Action, RotationError> {
    let mut workers = shared.workers();
    let w = workers.get_mut(id).ok_or(RotationError::NotFound)?;
    if w.revoked {
        return Err(RotationError::Revoked);
    }
    let next = match &w.pending_secret {
        Some(p) => p.clone(),
        None => {
            let next = Secret::from_bytes(random_bytes::<32>()?);
            shared.db().set_pending_secret(id, &next.to_hex())?;
            w.pending_secret = Some(next.clone());
            info!(worker_id = id, "worker secret rotation started");
            next
        }
    };
    let sealed = protocol::sealed::seal_rotation(&w.secret, id, &next, random_bytes::<12>()?)?;
    let online = w.status == Status::Online;
    shared
        .rotation_sent()
        .insert(id.to_string(), (Instant::now(), online));
    Ok(Action::RotateSecret(sealed))
}

/// Sends `RotateSecret` again to online workers whose rotation is still
/// pending (they were offline, or the command was lost) at most every
/// [`RESEND_EVERY`]. Returns how many were sent.
pub fn resend_pending(shared: &Shared, client: &AsyncClient) -> usize {
    let due: Vec<String> = {
        let workers = shared.workers();
        let sent = shared.rotation_sent();
        workers
            .values()
            .filter(|w| w.pending_secret.is_some() && !w.revoked && w.status == Status::Online)
            // Sent while it was offline (lost), or long enough ago.
            .filter(|w| {
                sent.get(&w.id)
                    .is_none_or(|(t, online)| !online || t.elapsed() >= RESEND_EVERY)
            })
            .map(|w| w.id.clone())
            .collect()
    };
    let mut n = 0;
    for id in due {
        let frame = begin(shared, &id).and_then(|action| {
            let mut workers = shared.workers();
            let w = workers.get_mut(&id).ok_or(RotationError::NotFound)?;
            Ok(crate::commands::seal_command(shared, w, action)?)
        });
        match frame {
            Ok((_, frame)) => {
                let topic = protocol::topic::topic(&id, protocol::TopicKind::Cmd);
                if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, frame) {
                    warn!(worker_id = %id, "cannot queue the secret rotation: {e}");
                } else {
                    n += 1;
                }
            }
            Err(e) => warn!(worker_id = %id, "secret rotation not re-sent: {e}"),
        }
    }
    n
}
