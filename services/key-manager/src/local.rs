//! The worker's local API (`AEREKOS_API`, `AEREKOS_TOKEN`): secrets and
//! config at start, then a background reporter thread that
//!
//! * sends audit events (`POST /v1/events`), queued by [`Audit::send`]
//!   without blocking the request that caused them (a bounded queue; when
//!   full the event is dropped and counted, and still written to stderr);
//! * reports refused requests (401s) as one event per report interval at
//!   most ("denied N requests ..."), so a guessing client cannot flood the
//!   worker's outbox;
//! * posts metrics every report interval (10 s by default);
//! * re-reads the client keys from the secrets every refresh interval
//!   (30 s by default).
//!
//! The local API answers 429 beyond its publish rate; events are retried a
//! few times with a short pause, then dropped (best effort).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::clients::Clients;
use crate::kms::Kms;

/// Env var with the local API URL.
pub const ENV_API: &str = "AEREKOS_API";
/// Env var with the service's local API token.
pub const ENV_TOKEN: &str = "AEREKOS_TOKEN";
/// Env var with the service name.
pub const ENV_SERVICE: &str = "AEREKOS_SERVICE";
/// Audit events waiting to be sent, at most.
pub const AUDIT_QUEUE: usize = 256;
/// Timeout of one local API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A local API failure. Never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The environment does not name a local API.
    #[error("{0} is not set: key-manager runs under an edge-worker, which sets it")]
    Env(&'static str),
    /// The request failed.
    #[error("local API unreachable: {0}")]
    Transport(String),
    /// The API answered with an error.
    #[error("local API answered {0}")]
    Status(u16),
    /// The answer was not what was expected.
    #[error("local API answer unreadable: {0}")]
    Body(String),
}

/// A client of the worker's local API. `Debug` omits the token.
#[derive(Clone)]
pub struct LocalClient {
    api: String,
    token: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Nothing {}

impl LocalClient {
    /// A client for `api` (`http://127.0.0.1:port`) with `token`.
    pub fn new(api: &str, token: &str) -> LocalClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .into();
        LocalClient {
            api: api.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent,
        }
    }

    /// From [`ENV_API`] and [`ENV_TOKEN`].
    pub fn from_env() -> Result<LocalClient, LocalError> {
        let api = std::env::var(ENV_API).map_err(|_| LocalError::Env(ENV_API))?;
        let token = std::env::var(ENV_TOKEN).map_err(|_| LocalError::Env(ENV_TOKEN))?;
        Ok(LocalClient::new(&api, &token))
    }

    /// The service token (the master key may be derived from it).
    pub fn token(&self) -> &str {
        &self.token
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn get_map(&self, path: &str) -> Result<BTreeMap<String, String>, LocalError> {
        let mut resp = self
            .agent
            .get(&format!("{}{path}", self.api))
            .header("Authorization", &self.auth())
            .call()
            .map_err(|e| LocalError::Transport(e.to_string()))?;
        let code = resp.status().as_u16();
        if code != 200 {
            return Err(LocalError::Status(code));
        }
        resp.body_mut()
            .read_json()
            .map_err(|e| LocalError::Body(e.to_string()))
    }

    /// `GET /v1/secrets`.
    pub fn secrets(&self) -> Result<BTreeMap<String, String>, LocalError> {
        self.get_map("/v1/secrets")
    }

    /// `GET /v1/config`.
    pub fn config(&self) -> Result<BTreeMap<String, String>, LocalError> {
        self.get_map("/v1/config")
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> Result<(), LocalError> {
        let mut resp = self
            .agent
            .post(&format!("{}{path}", self.api))
            .header("Authorization", &self.auth())
            .send_json(body)
            .map_err(|e| LocalError::Transport(e.to_string()))?;
        let code = resp.status().as_u16();
        // Drain the small answer so the connection closes cleanly.
        let _ = resp.body_mut().read_json::<Nothing>();
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(LocalError::Status(code))
        }
    }

    /// `POST /v1/events {"text"}`.
    pub fn event(&self, text: &str) -> Result<(), LocalError> {
        self.post("/v1/events", &serde_json::json!({ "text": text }))
    }

    /// `POST /v1/metrics {"samples"}`.
    pub fn metrics(&self, samples: &BTreeMap<&str, i64>) -> Result<(), LocalError> {
        self.post("/v1/metrics", &serde_json::json!({ "samples": samples }))
    }
}

/// The audit sink: writes each event to stderr and queues it for the
/// conductor. Audit texts never contain secrets (key names, versions and
/// client names only).
#[derive(Debug)]
pub struct Audit {
    tx: Option<SyncSender<String>>,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl Audit {
    /// An audit sink and the receiving end for [`spawn_reporter`].
    pub fn channel() -> (Audit, Receiver<String>) {
        let (tx, rx) = mpsc::sync_channel(AUDIT_QUEUE);
        (
            Audit {
                tx: Some(tx),
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// A sink that only writes to stderr (tests, the benchmark).
    pub fn stderr_only() -> Audit {
        Audit {
            tx: None,
            dropped: AtomicU64::new(0),
        }
    }

    /// Records `text` (never blocks).
    pub fn send(&self, text: String) {
        eprintln!("key-manager: audit: {text}");
        if let Some(tx) = &self.tx {
            if tx.try_send(text).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
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

/// Sends an event, retrying a few times on 429 (publish rate).
fn send_event(local: &LocalClient, text: &str) {
    for attempt in 0..8u64 {
        match local.event(text) {
            Ok(()) => return,
            Err(LocalError::Status(429 | 503)) => {
                std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
            }
            Err(e) => {
                eprintln!("key-manager: audit event not delivered: {e}");
                return;
            }
        }
    }
    eprintln!("key-manager: audit event not delivered: local API busy");
}

/// Re-reads the client keys; logs changes (names only).
pub fn refresh_clients(local: &LocalClient, kms: &Kms) {
    match local.secrets() {
        Ok(secrets) => {
            let (clients, warnings) = Clients::from_secrets(&secrets);
            let names: Vec<&str> = clients.names().collect();
            let line = names.join(", ");
            if kms.set_clients(clients) {
                for w in warnings {
                    eprintln!("key-manager: {w}");
                }
                eprintln!("key-manager: client keys updated: [{line}]");
            }
        }
        Err(e) => eprintln!("key-manager: client keys not refreshed (kept): {e}"),
    }
}

/// Starts the reporter thread (see the module docs). It runs for the life
/// of the process (it holds the [`Kms`], whose [`Audit`] feeds it).
pub fn spawn_reporter(
    local: LocalClient,
    kms: Arc<Kms>,
    rx: Receiver<String>,
    intervals: ReportIntervals,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("km-reporter".into())
        .spawn(move || {
            let mut next_report = Instant::now() + intervals.report;
            let mut next_refresh = Instant::now() + intervals.refresh;
            let mut denied_reported = 0u64;
            loop {
                let wait = next_report
                    .min(next_refresh)
                    .saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(text) => send_event(&local, &text),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                let now = Instant::now();
                if now >= next_report {
                    next_report = now + intervals.report;
                    let denied = kms.stats.denied.load(Ordering::Relaxed);
                    if denied > denied_reported {
                        let n = denied - denied_reported;
                        denied_reported = denied;
                        let text = format!(
                            "denied {n} requests with a missing or unknown API key in the last {} s",
                            intervals.report.as_secs().max(1)
                        );
                        eprintln!("key-manager: audit: {text}");
                        send_event(&local, &text);
                    }
                    report_metrics(&local, &kms);
                }
                if now >= next_refresh {
                    next_refresh = now + intervals.refresh;
                    refresh_clients(&local, &kms);
                }
            }
        })
}

fn report_metrics(local: &LocalClient, kms: &Kms) {
    let n = |c: &AtomicU64| i64::try_from(c.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    let s = &kms.stats;
    let samples: BTreeMap<&str, i64> = [
        ("keys", i64::try_from(kms.store().len()).unwrap_or(i64::MAX)),
        ("encrypts", n(&s.encrypts)),
        ("decrypts", n(&s.decrypts)),
        ("datakeys", n(&s.datakeys)),
        ("denied", n(&s.denied)),
        ("errors", n(&s.errors)),
        ("audit_dropped", n(&kms.audit().dropped)),
    ]
    .into_iter()
    .collect();
    if let Err(e) = local.metrics(&samples) {
        eprintln!("key-manager: metrics not delivered: {e}");
    }
}
