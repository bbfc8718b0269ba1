//! Who a request is: its bearer token or session cookie ([`authenticate`],
//! with a same-origin check for cookies), and the session cookie `login`
//! sets.

use super::message::{ApiError, Ctx, Req};
use crate::crypto::sha256_hex;
use crate::state::now_ms;
use crate::store::TokenRow;

/// Name of the session cookie `login` sets.
pub const SESSION_COOKIE: &str = "aerekos_session";

/// The token a request presents: the bearer header, else the session cookie
/// (`true` when it came from the cookie).
pub(crate) fn presented(req: &Req) -> Option<(&str, bool)> {
    match (req.bearer.as_deref(), req.cookie.as_deref()) {
        (Some(b), _) => Some((b, false)),
        (None, Some(c)) => Some((c, true)),
        (None, None) => None,
    }
}

/// Host part of an `Origin` (`http://host:port` → `host:port`).
fn origin_host(origin: &str) -> &str {
    let rest = origin.split_once("://").map_or(origin, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// The token row of a request's bearer token or session cookie; 401 if
/// it has none or it is unknown or expired, 403 for a cross-origin
/// cookie request.
pub(crate) fn authenticate(ctx: &Ctx, req: &Req) -> Result<TokenRow, ApiError> {
    let Some((token, from_cookie)) = presented(req) else {
        return Err(ApiError::new(401, "missing bearer token or session cookie"));
    };
    if from_cookie {
        // Defence in depth on top of SameSite=Strict: a cookie-authenticated
        // request from a browser page on another origin is refused.
        if let Some(origin) = req.origin.as_deref() {
            let o = origin_host(origin.trim());
            let same = [req.host.as_deref(), req.forwarded_host.as_deref()]
                .into_iter()
                .flatten()
                .any(|h| h.trim().eq_ignore_ascii_case(o));
            if !same {
                return Err(ApiError::new(403, "cross-origin request refused"));
            }
        }
    }
    let db = ctx.shared.db();
    db.token_by_hash(&sha256_hex(token), now_ms())?
        .ok_or_else(|| ApiError::new(401, "invalid or expired token"))
}

/// `Set-Cookie` value holding `token` (empty + `Max-Age=0` clears it).
pub(crate) fn session_cookie(req: &Req, token: &str, max_age_s: u64) -> String {
    let secure = if req.behind_tls || req.secure {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
    )
}
