//! The request and answer types every handler speaks ([`Req`], [`Resp`],
//! [`RawResp`], [`ApiError`]) and the per-thread [`Ctx`]: below the router
//! and the handlers, so neither depends on the server module.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::sync::Arc;

use rumqttc::AsyncClient;
use serde::Serialize;
use serde_json::Value;
use tiny_http::Method;

use crate::state::Shared;

/// What every request handler needs, shared by all the request threads.
pub(crate) struct Ctx {
    pub shared: Arc<Shared>,
    pub client: AsyncClient,
    /// Remote exec sessions in flight (a leaf lock inside, like `Shared`'s).
    pub exec: Arc<crate::exec::ExecSessions>,
}

/// A parsed request.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub bearer: Option<String>,
    /// Session token from the `aerekos_session` cookie.
    pub cookie: Option<String>,
    pub host: Option<String>,
    /// `X-Forwarded-Host` (set by a reverse proxy).
    pub forwarded_host: Option<String>,
    /// `X-Forwarded-Proto` = `https`: a TLS proxy in front (cookie gets `Secure`).
    pub behind_tls: bool,
    /// The request came over TLS to this server (HTTPS).
    pub secure: bool,
    /// `Origin` (browsers send it on every non-GET fetch).
    pub origin: Option<String>,
    /// `If-None-Match`, for the dashboard's static files.
    pub if_none_match: Option<String>,
    /// The raw `Authorization` header (worker downloads use their own scheme).
    pub authorization: Option<String>,
    pub ip: IpAddr,
    pub body: Vec<u8>,
}

impl Req {
    /// Parses the body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::new(400, format!("invalid JSON body: {e}")))
    }
}

/// A response.
pub(crate) struct Resp {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    /// Extra headers (`Set-Cookie`, caching, CSP).
    pub headers: Vec<(&'static str, String)>,
}

impl Resp {
    pub fn json(status: u16, v: &impl Serialize) -> Resp {
        Resp {
            status,
            body: serde_json::to_string(v).unwrap_or_else(|_| "{}".into()),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }
    /// Adds a header.
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Resp {
        self.headers.push((name, value.into()));
        self
    }
    pub fn ok(v: Value) -> Resp {
        Resp::json(200, &v)
    }
    pub fn no_content() -> Resp {
        Resp {
            status: 204,
            body: String::new(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }
}

/// A response whose body is bytes, a file or a stream rather than text.
pub(crate) struct RawResp {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Box<dyn Read + Send>,
    /// `Content-Length`; `None` streams with chunked encoding.
    pub len: Option<usize>,
    pub headers: Vec<(&'static str, String)>,
}

impl RawResp {
    /// An in-memory binary body.
    pub fn bytes(content_type: &'static str, bytes: Vec<u8>) -> RawResp {
        RawResp {
            status: 200,
            content_type,
            len: Some(bytes.len()),
            body: Box::new(std::io::Cursor::new(bytes)),
            headers: Vec::new(),
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!("internal error: {e}");
        ApiError::new(500, "internal error")
    }
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(404, format!("{what} not found"))
    }
}

impl From<crate::store::StoreError> for ApiError {
    /// A store that cannot be reached (PostgreSQL restarting, SQLite
    /// locked) is a 503 the client may retry, not an internal error.
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!("store unavailable: {e}");
            return ApiError::new(503, "the store is unavailable; try again shortly");
        }
        ApiError::internal(e)
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        ApiError::internal(e)
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub(crate) fn cookie_value(header: &str, name: &str) -> Option<String> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    })
}

impl From<getrandom::Error> for ApiError {
    fn from(e: getrandom::Error) -> Self {
        ApiError::internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_store_is_a_503_and_a_refused_statement_a_500() {
        let down = ApiError::from(crate::store::StoreError::PgDown);
        assert_eq!(down.status, 503, "{}", down.message);
        let refused = ApiError::from(crate::store::StoreError::Sqlite(
            rusqlite::Error::InvalidQuery,
        ));
        assert_eq!(refused.status, 500);
        assert_eq!(refused.message, "internal error");
    }
}
