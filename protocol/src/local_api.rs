//! The local API between a worker and the services it hosts: what both
//! sides must agree on, in one place. The worker serves it
//! (`edge_worker::local_api`); services call it (`service_runtime::local`).
//!
//! A hosted service is started with [`ENV_API`] (`http://127.0.0.1:<port>`),
//! [`ENV_TOKEN`] (its own bearer token) and [`ENV_SERVICE`] (its name), and
//! calls, with `Authorization: Bearer <token>`:
//!
//! | method | path | body / answer |
//! |---|---|---|
//! | GET | [`HEALTH`] | `{"service": name, "state": …}` |
//! | GET | [`CONFIG`] | the manifest's `config` map |
//! | GET | [`SECRETS`], [`SECRETS`]`/<key>` | its secrets (map, or one value as text) |
//! | POST | [`EVENTS`] | `{"text": "…"}` ([`EventBody`]) → an event frame |
//! | POST | [`METRICS`] | `{"samples": {"key": 1}}` ([`MetricsBody`]) → a service-metrics frame |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The local API's base URL, `http://127.0.0.1:<port>`.
pub const ENV_API: &str = "AEREKOS_API";
/// The service's bearer token for the local API.
pub const ENV_TOKEN: &str = "AEREKOS_TOKEN";
/// The service's name.
pub const ENV_SERVICE: &str = "AEREKOS_SERVICE";

/// `GET`: the service's own state.
pub const HEALTH: &str = "/v1/health";
/// `GET`: the manifest's config.
pub const CONFIG: &str = "/v1/config";
/// `GET`: the service's secrets; `/<key>` for one.
pub const SECRETS: &str = "/v1/secrets";
/// `POST` an [`EventBody`].
pub const EVENTS: &str = "/v1/events";
/// `POST` a [`MetricsBody`].
pub const METRICS: &str = "/v1/metrics";

/// Every path the API answers (a secret's path is [`SECRETS`]`/<key>`).
pub const PATHS: [&str; 5] = [HEALTH, CONFIG, SECRETS, EVENTS, METRICS];

/// `POST /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBody {
    /// What happened, free text.
    pub text: String,
}

/// `POST /v1/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsBody {
    /// Key → value (the unit is the service's).
    pub samples: BTreeMap<String, i64>,
}
