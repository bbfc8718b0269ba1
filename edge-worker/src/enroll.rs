//! Enrolment: `POST {conductor}/api/v1/enroll` with a registration token
//! (first run) or with the stored worker id and a proof of its secret
//! (re-enrolment, keeps the identity and refreshes the MQTT login).
//!
//! [`enroll_once`] is blocking (ureq) and must run on a blocking thread;
//! [`classify`] decides which failures are worth retrying. Limits: one
//! request has a 15 s overall timeout; `https://` trusts only the CA pinned
//! in the state dir ([`crate::tls`]).

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::{Birth, Secret};
use serde::{Deserialize, Serialize};

/// Path of the enrolment endpoint under the conductor URL.
pub const ENROLL_PATH: &str = "/api/v1/enroll";

/// The JSON request body.
#[derive(Debug, Clone, Serialize)]
pub struct EnrollRequest {
    /// Registration token; empty on re-enrolment with a proof.
    pub token: String,
    /// Hostname reported by the device (or `--hostname`).
    pub hostname: String,
    /// `/etc/machine-id` (or `--machine-id`).
    pub machine_id: String,
    /// `--label k=v` pairs.
    pub labels: BTreeMap<String, String>,
    /// The inventory the worker will also send as its birth frame.
    pub inventory: Birth,
    /// Only on re-enrolment: the stored id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Only on re-enrolment: [`protocol::reenroll_proof`] of the stored secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// The JSON response body of a successful enrolment. `Debug` redacts the
/// secret and password.
#[derive(Clone, Deserialize)]
pub struct EnrollResponse {
    /// Assigned id.
    pub worker_id: String,
    /// Frame secret, 64 hex chars.
    pub secret: String,
    /// Broker to connect to, `mqtt://host:port`.
    pub mqtt_url: String,
    /// MQTT username.
    #[serde(default)]
    pub mqtt_username: String,
    /// MQTT password.
    #[serde(default)]
    pub mqtt_password: String,
    /// The MQTT client id to use instead of the worker id (on NATS, where
    /// any login may connect with any client id: one other workers cannot
    /// guess).
    #[serde(default)]
    pub mqtt_client_id: Option<String>,
    /// Metrics interval the conductor suggests, ms.
    #[serde(default)]
    pub interval_ms: Option<u32>,
    /// The broker's CA (PEM) when it is not the conductor's (an external
    /// `mqtts://` broker).
    #[serde(default)]
    pub mqtt_ca_pem: Option<String>,
    /// The Ed25519 public key (64 hex) agent releases are signed with, when
    /// the conductor has one (`--release-key`): pinned in the state.
    #[serde(default)]
    pub release_key: Option<String>,
}

impl std::fmt::Debug for EnrollResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollResponse")
            .field("worker_id", &self.worker_id)
            .field("mqtt_url", &self.mqtt_url)
            .field("mqtt_username", &self.mqtt_username)
            .field("interval_ms", &self.interval_ms)
            .finish_non_exhaustive()
    }
}

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// 401: the registration token (or re-enrol proof) was refused.
    #[error("the conductor refused the registration token: {0}")]
    BadToken(String),
    /// 403: this worker was revoked.
    #[error("the conductor refused this worker (revoked): {0}")]
    Revoked(String),
    /// 429: too many attempts; retried.
    #[error("rate limited by the conductor")]
    RateLimited,
    /// Another 4xx: the request itself is wrong; not retried.
    #[error("the conductor rejected the enrolment request (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The `error` field, or the body.
        message: String,
    },
    /// 5xx, connection refused, timeout: retried.
    #[error("conductor unavailable: {0}")]
    Unavailable(String),
    /// 200 with a body that is not a valid enrolment.
    #[error("invalid enrolment response: {0}")]
    BadResponse(String),
    /// The conductor URL cannot be used.
    #[error("invalid conductor URL {0:?} (expected https://host:port or http://host:port)")]
    BadUrl(String),
    /// TLS trust could not be established (retried only for network errors).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl EnrollError {
    /// Whether retrying later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            EnrollError::RateLimited | EnrollError::Unavailable(_) => true,
            EnrollError::Tls(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Maps an HTTP status and body to the enrolment outcome (pure, for tests).
pub fn classify(status: u16, body: &str) -> Result<EnrollResponse, EnrollError> {
    let message = || {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| body.chars().take(200).collect())
    };
    match status {
        200..=299 => {
            let r: EnrollResponse =
                serde_json::from_str(body).map_err(|e| EnrollError::BadResponse(e.to_string()))?;
            if !protocol::topic::is_valid_worker_id(&r.worker_id) {
                return Err(EnrollError::BadResponse(format!(
                    "invalid worker_id {:?}",
                    r.worker_id
                )));
            }
            if Secret::from_hex(&r.secret).is_err() {
                return Err(EnrollError::BadResponse(
                    "secret is not 64 hex characters".into(),
                ));
            }
            if crate::session::MqttUrl::parse_list(&r.mqtt_url).is_none() {
                return Err(EnrollError::BadResponse(format!(
                    "unusable mqtt_url {:?}",
                    r.mqtt_url
                )));
            }
            Ok(r)
        }
        401 => Err(EnrollError::BadToken(message())),
        403 => Err(EnrollError::Revoked(message())),
        429 => Err(EnrollError::RateLimited),
        400..=499 => Err(EnrollError::Rejected {
            status,
            message: message(),
        }),
        _ => Err(EnrollError::Unavailable(format!(
            "HTTP {status}: {}",
            message()
        ))),
    }
}

/// Sends one enrolment request (over `https://` trusting only `trust`).
/// Blocking: call from `spawn_blocking`.
pub fn enroll_once(
    conductor_url: &str,
    req: &EnrollRequest,
    trust: Option<&crate::tls::Trust>,
) -> Result<EnrollResponse, EnrollError> {
    let base = conductor_url.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        return Err(EnrollError::BadUrl(conductor_url.to_string()));
    }
    let url = format!("{base}{ENROLL_PATH}");
    let agent = crate::tls::http_agent(
        trust,
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(15))),
    );
    let mut resp = match agent.post(&url).send_json(req) {
        Ok(r) => r,
        Err(ureq::Error::BadUri(e)) => return Err(EnrollError::BadUrl(e)),
        Err(ureq::Error::Tls(e)) => {
            return Err(crate::tls::TlsError::Handshake {
                host: base.to_string(),
                message: crate::tls::explain(e),
            }
            .into())
        }
        #[cfg(feature = "tls")]
        Err(ureq::Error::Rustls(e)) => {
            return Err(crate::tls::TlsError::Handshake {
                host: base.to_string(),
                message: crate::tls::explain(&e.to_string()),
            }
            .into())
        }
        Err(e) => {
            return Err(EnrollError::Unavailable(crate::tls::explain(
                &e.to_string(),
            )))
        }
    };
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .map_err(|e| EnrollError::Unavailable(format!("reading the response: {e}")))?;
    classify(status, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_body() -> String {
        serde_json::json!({
            "worker_id": "w-0123",
            "secret": "ab".repeat(32),
            "mqtt_url": "mqtt://127.0.0.1:1883",
            "mqtt_username": "w-0123",
            "mqtt_password": "pw",
            "interval_ms": 5000
        })
        .to_string()
    }

    #[test]
    fn classifies_statuses() {
        let r = classify(200, &ok_body()).unwrap();
        assert_eq!(r.worker_id, "w-0123");
        assert_eq!(r.interval_ms, Some(5000));
        assert!(!format!("{r:?}").contains("pw"), "password redacted");

        let e = classify(401, r#"{"error":"invalid registration token"}"#).unwrap_err();
        assert!(matches!(&e, EnrollError::BadToken(m) if m == "invalid registration token"));
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("token"));
        assert!(matches!(classify(403, "{}"), Err(EnrollError::Revoked(_))));
        assert!(classify(429, "").unwrap_err().is_retryable());
        assert!(classify(503, "busy").unwrap_err().is_retryable());
        assert!(!classify(400, "bad").unwrap_err().is_retryable());
    }

    #[test]
    fn rejects_invalid_success_bodies() {
        assert!(matches!(
            classify(200, "nope"),
            Err(EnrollError::BadResponse(_))
        ));
        let bad_id = ok_body().replace("w-0123", "W/1");
        assert!(matches!(
            classify(200, &bad_id),
            Err(EnrollError::BadResponse(_))
        ));
        let bad_secret = ok_body().replace(&"ab".repeat(32), "xyz");
        assert!(matches!(
            classify(200, &bad_secret),
            Err(EnrollError::BadResponse(_))
        ));
        let bad_url = ok_body().replace("mqtt://127.0.0.1:1883", "ftp://x");
        assert!(matches!(
            classify(200, &bad_url),
            Err(EnrollError::BadResponse(_))
        ));
    }

    #[test]
    fn request_json_shape() {
        let inv = crate::collect::Inventory {
            hostname: protocol::frame::bounded("pi"),
            os: protocol::frame::bounded("Debian"),
            kernel: protocol::frame::bounded("6.1"),
            arch: protocol::frame::bounded("aarch64"),
            cpu_model: protocol::frame::bounded("Cortex-A72"),
            cores: 4,
            memory_total: 1,
            device_model: protocol::frame::bounded(""),
            boot_id: protocol::frame::bounded(""),
        };
        let mut req = EnrollRequest {
            token: "t".into(),
            hostname: "pi".into(),
            machine_id: "m".into(),
            labels: [("site".to_string(), "lab".to_string())].into(),
            inventory: inv.birth(&heapless::Vec::new(), &[], 10_000),
            worker_id: None,
            proof: None,
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["labels"]["site"], "lab");
        assert_eq!(v["inventory"]["cores"], 4);
        assert!(v.get("worker_id").is_none() && v.get("proof").is_none());
        req.worker_id = Some("w-1".into());
        req.proof = Some("00".into());
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["worker_id"], "w-1");
        assert_eq!(v["proof"], "00");
    }

    #[test]
    fn connection_refused_is_retryable() {
        // Nobody listens there: bind(:0) is never given it.
        let port = test_support::free_port();
        let req = EnrollRequest {
            token: "t".into(),
            hostname: "h".into(),
            machine_id: "m".into(),
            labels: BTreeMap::new(),
            inventory: crate::collect::Collector::new().inventory(None).birth(
                &heapless::Vec::new(),
                &[],
                1,
            ),
            worker_id: None,
            proof: None,
        };
        let e = enroll_once(&format!("http://127.0.0.1:{port}"), &req, None).unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(matches!(
            enroll_once("ftp://x", &req, None),
            Err(EnrollError::BadUrl(_))
        ));
    }
}
