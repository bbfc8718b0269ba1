//! Webhook delivery: the notification outbox in the store, POSTed to each
//! receiver in order, retried with backoff until the receiver takes it.
//!
//! A request carries the JSON body ([`body`]) and
//! - `X-Aerekos-Event: firing | resolved`,
//! - `X-Aerekos-Delivery: <notification id>` (the same on every retry:
//!   receivers drop what they have seen — a conductor killed between a
//!   receiver's 2xx and recording it sends that one again),
//! - `X-Aerekos-Timestamp: <ms>` and
//!   `X-Aerekos-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`,
//!   the receiver's secret as the key (its UTF-8 bytes).
//!
//! Any 2xx is taken; anything else, or no answer within [`TIMEOUT`], is
//! retried after [`backoff`] (1 s doubling to [`MAX_BACKOFF`]), for as long
//! as it takes. A receiver's next notification waits for the one before
//! it, so `resolved` never arrives before its `firing`.
//!
//! The sender is one thread with its own store connection; the HTTP and
//! evaluation paths never wait for a receiver.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use tracing::{info, warn};

use crate::state::now_ms;
use crate::store::{AlertRow, NotificationRow, ReceiverRow, Store};

/// How long a receiver has to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the outbox is looked at when nothing wakes the sender.
const POLL: Duration = Duration::from_millis(500);
/// Longest error text kept per notification.
const MAX_ERROR: usize = 200;

/// The JSON body of `event` for `alert`: the alert, plus `text` and
/// `content` lines that Slack- and Discord-style receivers show as is.
pub fn body(alert: &AlertRow, event: &str) -> String {
    let line = format!(
        "[{}] {}: {}",
        event.to_ascii_uppercase(),
        alert.rule_name,
        alert.summary
    );
    json!({
        "event": event,
        "alert": {
            "id": alert.id,
            "rule_id": alert.rule_id,
            "rule": alert.rule_name,
            "kind": alert.kind,
            "subject": alert.subject,
            "state": alert.state,
            "summary": alert.summary,
            "value": alert.value,
            "fired_ms": alert.fired_ms,
            "resolved_ms": alert.resolved_ms,
            "resolved_why": (!alert.resolved_why.is_empty()).then_some(&alert.resolved_why),
        },
        "text": line,
        "content": line,
    })
    .to_string()
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `"<timestamp>.<body>"`).
pub fn signature(secret: &str, timestamp_ms: u64, body: &str) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "sha256={}",
        protocol::hex_string(&mac.finalize().into_bytes())
    )
}

/// Wait before attempt `attempts + 1`: 1 s, 2 s, 4 s, … at most [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(16)).min(MAX_BACKOFF)
}

/// The running sender.
#[derive(Debug)]
pub struct Sender {
    wake: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    /// Starts the sender thread on its own connection to the store, its
    /// writes fenced with `fence` (on a shared store: see `store::lease`).
    pub fn spawn(
        at: &crate::store::StoreLocation,
        fence: Option<crate::store::lease::Fence>,
    ) -> std::io::Result<Sender> {
        let mut store = Store::open_at(at).map_err(std::io::Error::other)?;
        if let Some(f) = fence {
            store.fence_writes(f);
        }
        let (wake, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("alert-webhooks".into())
            .spawn(move || run(store, &rx))?;
        Ok(Sender {
            wake,
            thread: Some(thread),
        })
    }

    /// A handle that makes the sender look at the outbox now.
    pub fn waker(&self) -> mpsc::Sender<()> {
        self.wake.clone()
    }

    /// Stops the thread (after the request in flight, if any) and joins it.
    pub fn stop(mut self) {
        let (dead, _) = mpsc::channel();
        self.wake = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .user_agent(concat!("aerekos-conductor/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn run(store: Store, wake: &mpsc::Receiver<()>) {
    let agent = agent();
    loop {
        if let Err(e) = deliver_due(&store, &agent) {
            warn!("alert notifications: {e}");
        }
        match wake.recv_timeout(POLL) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every waker is gone: the conductor is stopping.
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Sends every notification that is due; returns how many were taken.
pub fn deliver_due(store: &Store, agent: &ureq::Agent) -> Result<usize, crate::store::StoreError> {
    let due = store.due_notifications(now_ms())?;
    if due.is_empty() {
        return Ok(0);
    }
    let receivers = store.receivers()?;
    let mut taken = 0;
    for n in due {
        let Some(r) = receivers.iter().find(|r| r.id == n.receiver_id) else {
            continue;
        };
        match send(agent, r, &n) {
            Ok(()) => {
                store.notification_delivered(n.id, now_ms())?;
                info!(receiver = %r.name, delivery = n.id, event = %n.event, alert = n.alert_id, "alert notification delivered");
                taken += 1;
            }
            Err(e) => {
                let attempts = n.attempts.saturating_add(1);
                let wait = backoff(n.attempts);
                let next =
                    now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
                let e: String = e.chars().take(MAX_ERROR).collect();
                warn!(receiver = %r.name, delivery = n.id, attempts, retry_in_s = wait.as_secs(), "alert notification not taken: {e}");
                store.notification_failed(n.id, attempts, next, &e)?;
            }
        }
    }
    Ok(taken)
}

fn send(agent: &ureq::Agent, r: &ReceiverRow, n: &NotificationRow) -> Result<(), String> {
    let ts = now_ms();
    let resp = agent
        .post(&r.url)
        .header("Content-Type", "application/json")
        .header("X-Aerekos-Event", &n.event)
        .header("X-Aerekos-Delivery", n.id.to_string())
        .header("X-Aerekos-Timestamp", ts.to_string())
        .header("X-Aerekos-Signature", signature(&r.secret, ts, &n.body))
        .send(n.body.as_str())
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Against the MAC of the whole message computed in one piece.
        let sig = signature("Jefe", 12, "what do ya want for nothing?");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"12.what do ya want for nothing?");
        let hex = protocol::hex_string(&mac.finalize().into_bytes());
        assert_eq!(sig, format!("sha256={hex}"));
        assert_ne!(sig, signature("Jefe", 13, "what do ya want for nothing?"));
        assert_ne!(sig, signature("jefe", 12, "what do ya want for nothing?"));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let s: Vec<u64> = (0..12).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
