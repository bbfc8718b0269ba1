//! A client of the worker's local API (`AEREKOS_API`, `AEREKOS_TOKEN`): the
//! service's secrets and config, events and metrics.
//!
//! Every call has a 3 s timeout. The token is never part of an error or of
//! `Debug` output.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use protocol::local_api::{EventBody, MetricsBody, CONFIG, EVENTS, METRICS, SECRETS};
/// The environment names, paths and bodies both sides agree on
/// ([`protocol::local_api`]).
pub use protocol::local_api::{ENV_API, ENV_SERVICE, ENV_TOKEN};
/// Timeout of one local API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A local API failure. Never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The environment does not name a local API.
    #[error("{0} is not set: the service runs under an edge-worker, which sets it")]
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

    /// The service token (a service may derive a master key from it).
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
        self.get_map(SECRETS)
    }

    /// `GET /v1/config`.
    pub fn config(&self) -> Result<BTreeMap<String, String>, LocalError> {
        self.get_map(CONFIG)
    }

    /// `GET /v1/secrets`, retrying for a few seconds (the worker may still
    /// be starting when the service starts).
    pub fn secrets_with_retry(&self) -> Result<BTreeMap<String, String>, LocalError> {
        let mut last = LocalError::Status(0);
        for attempt in 0..10u64 {
            match self.secrets() {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
        }
        Err(last)
    }

    fn post(&self, path: &str, body: &impl serde::Serialize) -> Result<(), LocalError> {
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
        self.post(
            EVENTS,
            &EventBody {
                text: text.to_string(),
            },
        )
    }

    /// `POST /v1/metrics {"samples"}`.
    pub fn metrics(&self, samples: &BTreeMap<&str, i64>) -> Result<(), LocalError> {
        self.post(
            METRICS,
            &MetricsBody {
                samples: samples.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            },
        )
    }

    /// Sends an event, retrying a few times while the local API answers
    /// 429 (its publish rate) or 503; gives up (and says so on stderr)
    /// otherwise. `service` prefixes the stderr lines.
    pub fn event_with_retry(&self, service: &str, text: &str) {
        for attempt in 0..8u64 {
            match self.event(text) {
                Ok(()) => return,
                Err(LocalError::Status(429 | 503)) => {
                    std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
                }
                Err(e) => {
                    eprintln!("{service}: audit event not delivered: {e}");
                    return;
                }
            }
        }
        eprintln!("{service}: audit event not delivered: local API busy");
    }
}
