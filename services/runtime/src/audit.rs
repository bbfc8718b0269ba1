//! Audit events and the reporter thread.
//!
//! [`Audit::send`] writes an event to stderr (the service log) and queues
//! it for the conductor without blocking the request that caused it: the
//! queue holds [`AUDIT_QUEUE`] events; beyond that events are dropped and
//! counted ([`Audit::dropped`]). [`spawn_reporter`] starts the thread that
//!
//! * sends queued events through the local API (retrying while it answers
//!   429, its publish rate), best effort;
//! * reports refused requests as one event per report interval at most
//!   ("denied N requests ..."), so a guessing client cannot flood the
//!   worker's outbox;
//! * posts the service's metrics every report interval (10 s by default);
//! * re-reads the client API keys from the secrets every refresh interval
//!   (30 s by default).
//!
//! Audit texts must never contain secrets: names, versions and counts only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clients::Clients;
use crate::local::LocalClient;

/// Audit events waiting to be sent, at most.
pub const AUDIT_QUEUE: usize = 256;

/// The audit sink. See the module docs.
#[derive(Debug)]
pub struct Audit {
    /// The service name, prefixing stderr lines.
    service: &'static str,
    tx: Option<SyncSender<String>>,
    /// Events dropped because the queue was full.
    dropped: AtomicU64,
}

impl Audit {
    /// An audit sink and the receiving end for [`spawn_reporter`].
    pub fn channel(service: &'static str) -> (Audit, Receiver<String>) {
        let (tx, rx) = mpsc::sync_channel(AUDIT_QUEUE);
        (
            Audit {
                service,
                tx: Some(tx),
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// A sink that only writes to stderr (tests, benchmarks).
    pub fn stderr_only(service: &'static str) -> Audit {
        Audit {
            service,
            tx: None,
            dropped: AtomicU64::new(0),
        }
    }

    /// Records `text` (never blocks).
    pub fn send(&self, text: String) {
        eprintln!("{}: audit: {text}", self.service);
        if let Some(tx) = &self.tx {
            if tx.try_send(text).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Intervals of the reporter thread.
#[derive(Debug, Clone, Copy)]
pub struct ReportIntervals {
    /// Metrics and denied-request events.
    pub report: Duration,
    /// Re-reading client keys.
    pub refresh: Duration,
}

impl Default for ReportIntervals {
    fn default() -> Self {
        ReportIntervals {
            report: Duration::from_secs(10),
            refresh: Duration::from_secs(30),
        }
    }
}

impl ReportIntervals {
    /// The defaults, overridden by milliseconds from the command line.
    pub fn from_ms(report_ms: Option<u64>, refresh_ms: Option<u64>) -> ReportIntervals {
        let d = ReportIntervals::default();
        ReportIntervals {
            report: report_ms.map_or(d.report, Duration::from_millis),
            refresh: refresh_ms.map_or(d.refresh, Duration::from_millis),
        }
    }
}

/// What the reporter thread needs from a service.
pub trait Reported: Send + Sync + 'static {
    /// The metric samples to post now.
    fn metrics(&self) -> BTreeMap<&'static str, i64>;
    /// Requests refused for a missing or unknown API key, since start.
    fn denied(&self) -> u64;
    /// Installs a freshly read set of client keys; true if it changed.
    fn set_clients(&self, clients: Clients) -> bool;
}

/// Re-reads the client keys from the secrets and hands them to `target`;
/// logs changes (names only). On failure the current keys are kept.
pub fn refresh_clients(service: &str, local: &LocalClient, target: &dyn Reported) {
    match local.secrets() {
        Ok(secrets) => {
            let (clients, warnings) = Clients::from_secrets(&secrets);
            let line = clients.names().collect::<Vec<_>>().join(", ");
            if target.set_clients(clients) {
                for w in warnings {
                    eprintln!("{service}: {w}");
                }
                eprintln!("{service}: client keys updated: [{line}]");
            }
        }
        Err(e) => eprintln!("{service}: client keys not refreshed (kept): {e}"),
    }
}

/// Saturating u64 → i64 for metric samples.
pub fn sample(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Starts the reporter thread (see the module docs). It ends when every
/// [`Audit`] sender is gone.
pub fn spawn_reporter(
    service: &'static str,
    local: LocalClient,
    target: Arc<dyn Reported>,
    rx: Receiver<String>,
    intervals: ReportIntervals,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("{service}-reporter"))
        .spawn(move || {
            let mut next_report = Instant::now() + intervals.report;
            let mut next_refresh = Instant::now() + intervals.refresh;
            let mut denied_reported = 0u64;
            loop {
                let wait = next_report
                    .min(next_refresh)
                    .saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(text) => local.event_with_retry(service, &text),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                let now = Instant::now();
                if now >= next_report {
                    next_report = now + intervals.report;
                    let denied = target.denied();
                    if denied > denied_reported {
                        let n = denied - denied_reported;
                        denied_reported = denied;
                        let text = format!(
                            "denied {n} requests with a missing or unknown API key in the last {} s",
                            intervals.report.as_secs().max(1)
                        );
                        eprintln!("{service}: audit: {text}");
                        local.event_with_retry(service, &text);
                    }
                    if let Err(e) = local.metrics(&target.metrics()) {
                        eprintln!("{service}: metrics not delivered: {e}");
                    }
                }
                if now >= next_refresh {
                    next_refresh = now + intervals.refresh;
                    refresh_clients(service, &local, target.as_ref());
                }
            }
        })
}
