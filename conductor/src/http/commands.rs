//! Commands to a worker from an HTTP request: sent sealed, QoS 1, and the
//! request waits for the worker's reply.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protocol::{Action, ReplyStatus};
use rumqttc::QoS;
use serde_json::json;
use tracing::info_span;

use super::message::{ApiError, Ctx, Resp};
use crate::state::WorkerEntry;

/// How long a command waits for its reply.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Worker `id` in the (locked) worker map, if a command may go to it:
/// 404 when unknown, 409 when revoked.
pub(crate) fn commandable<'a>(
    workers: &'a mut HashMap<String, WorkerEntry>,
    id: &str,
) -> Result<&'a mut WorkerEntry, ApiError> {
    let w = workers
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found("worker"))?;
    if w.revoked {
        return Err(ApiError::new(409, "worker is revoked"));
    }
    Ok(w)
}

/// Sends `action` to worker `id` (sealed, QoS 1, cmd_seq persisted first)
/// and waits up to [`COMMAND_TIMEOUT`] for the reply.
pub(crate) fn send_and_wait(ctx: &Ctx, id: &str, action: Action) -> Result<Resp, ApiError> {
    let span = info_span!("command", worker_id = id);
    let _g = span.enter();
    let (tx, rx) = mpsc::channel();
    let (cmd_id, frame) = {
        let mut workers = ctx.shared.workers();
        let w = commandable(&mut workers, id)?;
        let (cmd_id, frame) =
            crate::commands::seal_command(&ctx.shared, w, action).map_err(ApiError::internal)?;
        ctx.shared.pending().insert((id.to_string(), cmd_id), tx);
        (cmd_id, frame)
    };
    let started = Instant::now();
    let topic = protocol::topic::topic(id, protocol::TopicKind::Cmd);
    if let Err(e) = ctx
        .client
        .try_publish(topic, QoS::AtLeastOnce, false, frame)
    {
        ctx.shared.take_waiter(id, cmd_id);
        return Err(ApiError::new(503, format!("MQTT queue unavailable: {e}")));
    }
    let reply = rx.recv_timeout(COMMAND_TIMEOUT);
    ctx.shared.take_waiter(id, cmd_id);
    match reply {
        Ok(r) => {
            let status = match r.status {
                ReplyStatus::Ok => "ok",
                ReplyStatus::Error => "error",
                ReplyStatus::Unsupported => "unsupported",
            };
            Ok(Resp::ok(json!({
                "id": cmd_id,
                "status": status,
                "detail": r.detail.as_str(),
                "round_trip_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })))
        }
        Err(_) => Err(ApiError::new(
            504,
            format!("no reply to command {cmd_id} within 5 s"),
        )),
    }
}
