//! Who a request is: its bearer token or session cookie ([`authenticate`],
//! with a same-origin check for cookies), what it may do ([`Role`],
//! [`needed_role`], [`authorize`]), and the session cookie `login` sets.
//!
//! The role table ([`needed_role`], by method and the path under
//! `/api/v1/`):
//!
//! | needs | requests |
//! |---|---|
//! | `admin` | `/tokens…` (any method), `/registration-token…`, `POST /password`, `POST /workers/{id}/exec`, `POST /workers/{id}/shell`, `/shell-sessions…`, `GET /exec-sessions`, `POST /agent-releases`, `DELETE /agent-releases/…` |
//! | `viewer` | every other `GET` or `HEAD` (log streaming included), `POST /workers/{id}/live` (asks for what a `GET` of the worker asks for too: live metrics, [`crate::live`]) |
//! | `operator` | everything else (every other write) |
//!
//! An `admin` token may do everything, an `operator` everything that does
//! not need `admin`, a `viewer` only what needs `viewer`. Login sessions are
//! always `admin`.

use tiny_http::Method;

use super::message::{ApiError, Ctx, Req};
use crate::crypto::sha256_hex;
use crate::state::now_ms;
use crate::store::TokenRow;

/// Name of the session cookie `login` sets.
pub const SESSION_COOKIE: &str = "aerekos_session";

/// What a token may do: every request needs one of these ([`needed_role`]),
/// and a token may make it when its role is at least that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Everything: token management, the registration token, the admin
    /// password, remote exec and shells, agent releases.
    Admin,
    /// Everything but what only `admin` may do: deploys, labels, worker
    /// commands, rollouts, alerts.
    Operator,
    /// Reads: every `GET` but the admin-only ones.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub(crate) const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    /// The name stored in `api_tokens.role` and shown by the API.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// The role named `s` (exactly as [`Role::as_str`] writes it).
    pub(crate) fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Higher is more powerful.
    fn rank(self) -> u8 {
        match self {
            Role::Admin => 2,
            Role::Operator => 1,
            Role::Viewer => 0,
        }
    }

    /// Whether a token with this role may make a request that needs `needed`.
    pub(crate) fn allows(self, needed: Role) -> bool {
        self.rank() >= needed.rank()
    }

    /// The name with its article, for messages (`an admin`).
    fn with_article(self) -> &'static str {
        match self {
            Role::Admin => "an admin",
            Role::Operator => "an operator",
            Role::Viewer => "a viewer",
        }
    }
}

/// `GET` or `HEAD` (a `GET` without the body): what a `viewer` may do.
fn is_read(method: &Method) -> bool {
    matches!(method, Method::Get | Method::Head)
}

/// The role a request needs, from its method and its path segments under
/// `/api/v1/` (`["workers", "w-1", "exec"]`); the table is in the module
/// docs. Unknown paths get the role of their method (a route that does not
/// exist is 404 for whoever may ask).
pub(crate) fn needed_role(method: &Method, segs: &[&str]) -> Role {
    let admin_only = match segs {
        ["tokens", ..]
        | ["registration-token", ..]
        | ["password", ..]
        | ["workers", _, "exec" | "shell", ..]
        | ["shell-sessions", ..]
        | ["exec-sessions", ..] => true,
        ["agent-releases", ..] => !is_read(method),
        _ => false,
    };
    // Looking at a worker (a `GET` of it) asks for live metrics too.
    let viewing = matches!((method, segs), (Method::Post, ["workers", _, "live"]));
    if admin_only {
        Role::Admin
    } else if is_read(method) || viewing {
        Role::Viewer
    } else {
        Role::Operator
    }
}

/// The role `token` acts with: `admin` for a login session, else its
/// stored role (an unknown one, which only a hand-edited database has, is
/// the least powerful).
pub(crate) fn role_of(token: &TokenRow) -> Role {
    if token.kind == "session" {
        return Role::Admin;
    }
    Role::parse(&token.role).unwrap_or(Role::Viewer)
}

/// [`authenticate`], then the role check: 403 naming the role needed when
/// the token's is not enough ([`needed_role`] of the request's method and
/// path; a path outside `/api/v1/` needs `admin`).
pub(crate) fn authorize(ctx: &Ctx, req: &Req) -> Result<TokenRow, ApiError> {
    let token = authenticate(ctx, req)?;
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let needed = match segs.as_slice() {
        ["api", "v1", rest @ ..] => needed_role(&req.method, rest),
        _ => Role::Admin,
    };
    let has = role_of(&token);
    if has.allows(needed) {
        Ok(token)
    } else {
        Err(ApiError::new(
            403,
            format!(
                "this needs {} token (token \"{}\" is {})",
                needed.with_article(),
                token.name,
                has.with_article()
            ),
        ))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the API serves to tokens (`api.rs`'s table after the
    /// token check, and `raw_route`'s in `mod.rs`), with the role it needs:
    /// `(method, path under /api/v1 with `*` for a parameter, role)`.
    const ROUTES: &[(&str, &str, Role)] = &[
        // Admin only.
        ("POST", "password", Role::Admin),
        ("GET", "tokens", Role::Admin),
        ("POST", "tokens", Role::Admin),
        ("DELETE", "tokens/*", Role::Admin),
        ("GET", "registration-token", Role::Admin),
        ("POST", "registration-token/rotate", Role::Admin),
        ("POST", "workers/*/exec", Role::Admin),
        ("POST", "workers/*/shell", Role::Admin),
        ("GET", "shell-sessions", Role::Admin),
        ("GET", "shell-sessions/*", Role::Admin),
        ("POST", "shell-sessions/*/input", Role::Admin),
        ("DELETE", "shell-sessions/*", Role::Admin),
        ("GET", "exec-sessions", Role::Admin),
        ("POST", "agent-releases", Role::Admin),
        ("DELETE", "agent-releases/*/*", Role::Admin),
        // Reads.
        ("GET", "mqtt", Role::Viewer),
        ("GET", "workers", Role::Viewer),
        ("GET", "workers/*", Role::Viewer),
        ("GET", "workers/*/metrics", Role::Viewer),
        // A write, but what a `GET` of the worker does too (live metrics).
        ("POST", "workers/*/live", Role::Viewer),
        ("GET", "workers/*/services", Role::Viewer),
        ("GET", "workers/*/services/*/logs", Role::Viewer),
        ("GET", "artifacts", Role::Viewer),
        ("GET", "services", Role::Viewer),
        ("GET", "services/*", Role::Viewer),
        ("GET", "services/*/rollouts", Role::Viewer),
        ("GET", "agent-releases", Role::Viewer),
        ("GET", "agent-rollouts", Role::Viewer),
        ("GET", "agent-rollouts/*", Role::Viewer),
        ("GET", "alerts", Role::Viewer),
        ("GET", "alerts/*", Role::Viewer),
        ("GET", "alert-rules", Role::Viewer),
        ("GET", "alert-receivers", Role::Viewer),
        // Writes.
        ("DELETE", "workers/*", Role::Operator),
        ("PUT", "workers/*/labels", Role::Operator),
        ("POST", "workers/*/revoke", Role::Operator),
        ("POST", "workers/*/rotate-secret", Role::Operator),
        ("POST", "workers/*/commands", Role::Operator),
        ("POST", "workers/*/services/*/*", Role::Operator),
        ("POST", "artifacts", Role::Operator),
        ("DELETE", "artifacts/*", Role::Operator),
        ("POST", "services", Role::Operator),
        ("PUT", "services/*/deployment", Role::Operator),
        ("DELETE", "services/*/deployment", Role::Operator),
        ("POST", "services/*/rollout", Role::Operator),
        ("POST", "services/*/rollout/abort", Role::Operator),
        ("POST", "agent-rollouts", Role::Operator),
        ("POST", "agent-rollouts/*/abort", Role::Operator),
        ("POST", "alert-rules", Role::Operator),
        ("DELETE", "alert-rules/*", Role::Operator),
        ("POST", "alert-receivers", Role::Operator),
        ("DELETE", "alert-receivers/*", Role::Operator),
    ];

    fn method(m: &str) -> Method {
        m.parse().unwrap_or_else(|()| panic!("method {m}"))
    }

    /// A path of [`ROUTES`] as request segments (`*` → a parameter).
    fn segs(path: &str) -> Vec<&str> {
        path.split('/')
            .map(|s| if s == "*" { "w-0123456789ab" } else { s })
            .collect()
    }

    #[test]
    fn every_route_needs_its_pinned_role() {
        for &(m, path, want) in ROUTES {
            assert_eq!(
                needed_role(&method(m), &segs(path)),
                want,
                "{m} /api/v1/{path}"
            );
        }
    }

    #[test]
    fn head_needs_what_get_needs() {
        for &(_, path, want) in ROUTES.iter().filter(|r| r.0 == "GET") {
            assert_eq!(
                needed_role(&Method::Head, &segs(path)),
                want,
                "HEAD /api/v1/{path}"
            );
        }
        assert_eq!(
            needed_role(&Method::Head, &["agent-releases"]),
            Role::Viewer
        );
    }

    #[test]
    fn every_route_of_the_api_table_is_pinned() {
        // The arms after the token check in `api.rs`'s `route`, as
        // `METHOD a/*/b`: a new route fails here until its role is pinned
        // in `ROUTES` above.
        let src = include_str!("api.rs");
        let start = src
            .find("let token = authorize(ctx, req)?;")
            .expect("route table");
        let end = start + src[start..].find("\n}\n").expect("end of route");
        let mut seen = 0;
        for line in src[start..end].lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("(Method::") else {
                continue;
            };
            let (m, rest) = rest.split_once(", [").expect("method, [segments]");
            let (pattern, _) = rest.split_once("])").expect("segments]");
            let path: Vec<&str> = pattern
                .split(", ")
                .map(|s| {
                    if s.starts_with('"') {
                        s.trim_matches('"')
                    } else {
                        "*"
                    }
                })
                .collect();
            let (m, path) = (m.to_ascii_uppercase(), path.join("/"));
            assert!(
                ROUTES.iter().any(|&(rm, rp, _)| rm == m && rp == path),
                "{m} /api/v1/{path} is routed in api.rs but its role is not pinned in ROUTES"
            );
            seen += 1;
        }
        assert!(
            seen > 40,
            "only {seen} routes found: has api.rs changed shape?"
        );
    }

    #[test]
    fn unknown_paths_get_the_role_of_their_method_and_admin_prefixes_stay_admin() {
        assert_eq!(needed_role(&Method::Get, &["nope"]), Role::Viewer);
        assert_eq!(needed_role(&Method::Post, &["nope"]), Role::Operator);
        assert_eq!(
            needed_role(&Method::Patch, &["workers", "w"]),
            Role::Operator
        );
        // Whatever is under an admin-only prefix is admin-only, any method.
        for m in [Method::Get, Method::Put, Method::Patch, Method::Head] {
            for p in [
                "tokens",
                "tokens/t-1",
                "registration-token/x",
                "password",
                "workers/w/exec",
                "workers/w/shell/x",
                "shell-sessions/s/y",
                "exec-sessions",
            ] {
                assert_eq!(needed_role(&m, &segs(p)), Role::Admin, "{m} {p}");
            }
        }
        // Reading agent releases is not.
        assert_eq!(needed_role(&Method::Get, &["agent-releases"]), Role::Viewer);
        assert_eq!(
            needed_role(&Method::Put, &["agent-releases", "1", "x"]),
            Role::Admin
        );
    }

    #[test]
    fn roles_round_trip_and_order() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert!(r.allows(r));
            assert!(Role::Admin.allows(r));
            assert!(r.allows(Role::Viewer));
        }
        assert_eq!(Role::parse("Admin"), None);
        assert_eq!(Role::parse(""), None);
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Operator.allows(Role::Admin));
        assert!(!Role::Viewer.allows(Role::Operator));
    }

    #[test]
    fn sessions_act_as_admin_and_unknown_roles_as_viewer() {
        let row = |kind: &str, role: &str| TokenRow {
            id: "t-1".into(),
            name: "x".into(),
            kind: kind.into(),
            role: role.into(),
            created_ms: 0,
            expires_ms: None,
        };
        assert_eq!(role_of(&row("session", "viewer")), Role::Admin);
        assert_eq!(role_of(&row("api", "operator")), Role::Operator);
        assert_eq!(role_of(&row("api", "root")), Role::Viewer);
    }
}
