//! The HTTP pieces the web dashboard relies on: the session cookie (and its
//! cross-origin guard), `GET /session`, `POST /password`, the embedded files.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// (status, Set-Cookie, JSON body) of a request with optional extra headers.
fn call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String, Value) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    let mut resp = agent().run(b.body(body).unwrap()).unwrap();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (resp.status().as_u16(), cookie, v)
}

fn login(c: &Conductor, password: &str) -> (u16, String, Value) {
    call(
        "POST",
        &c.url("/api/v1/login"),
        &[("Content-Type", "application/json")],
        Some(json!({"username": "admin", "password": password})),
    )
}

#[test]
fn session_cookie_authenticates_and_logout_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let (status, set_cookie, body) = login(&c, ADMIN_PW);
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    for part in [
        format!("aerekos_session={token}"),
        "HttpOnly".into(),
        "SameSite=Strict".into(),
        "Path=/".into(),
    ] {
        assert!(set_cookie.contains(&part), "{part} in {set_cookie}");
    }
    let cookie = format!("theme=dark; aerekos_session={token}");
    let host = c.started.http_addr.to_string();
    let same_origin = format!("http://{host}");

    // The cookie alone authenticates, like the bearer header.
    let (status, _, _) = call(
        "GET",
        &c.url("/api/v1/workers"),
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(status, 200);
    let (_, _, s) = call(
        "GET",
        &c.url("/api/v1/session"),
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(s["authenticated"], true, "{s}");
    let (status, _, s) = call("GET", &c.url("/api/v1/session"), &[], None);
    assert_eq!((status, &s["authenticated"]), (200, &json!(false)));
    let (status, _, _) = call(
        "GET",
        &c.url("/api/v1/workers"),
        &[("Cookie", "aerekos_session=aes_forged")],
        None,
    );
    assert_eq!(status, 401);

    // A cookie-authenticated write from another origin is refused.
    let create = |origin: &str| {
        call(
            "POST",
            &c.url("/api/v1/tokens"),
            &[
                ("Cookie", &cookie),
                ("Origin", origin),
                ("Content-Type", "application/json"),
            ],
            Some(json!({"name": "from-browser"})),
        )
        .0
    };
    assert_eq!(create("http://evil.example"), 403);
    assert_eq!(create(&same_origin), 201);

    // Logout ends the session and clears the cookie.
    let (status, cleared, _) = call(
        "POST",
        &c.url("/api/v1/logout"),
        &[("Cookie", &cookie), ("Origin", &same_origin)],
        None,
    );
    assert_eq!(status, 204);
    assert!(
        cleared.starts_with("aerekos_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    let (status, _, _) = call(
        "GET",
        &c.url("/api/v1/workers"),
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(status, 401);
    // Logging out again (stale cookie) still answers 204 and clears it.
    let (status, _, _) = call(
        "POST",
        &c.url("/api/v1/logout"),
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(status, 204);
}

#[test]
fn password_change_checks_and_ends_other_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let me = c.admin();
    let other = login(&c, ADMIN_PW).2["token"].as_str().unwrap().to_string();
    let change = |current: &str, new: &str| {
        c.call(
            "POST",
            "/api/v1/password",
            Some(me.as_str()),
            Some(json!({"current": current, "new": new})),
        )
    };
    assert_eq!(change("wrong-password", "long-enough-1").0, 403);
    assert_eq!(change(ADMIN_PW, "short").0, 400);
    assert_eq!(
        c.call("POST", "/api/v1/password", None, Some(json!({}))).0,
        401
    );
    let (status, v) = change(ADMIN_PW, "long-enough-1");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sessions_ended"], 1, "{v}");

    assert_eq!(login(&c, ADMIN_PW).0, 401, "the old password is gone");
    assert_eq!(login(&c, "long-enough-1").0, 200);
    let probe = |t: &str| c.call("GET", "/api/v1/tokens", Some(t), None).0;
    assert_eq!(probe(&me), 200, "the caller's session stays");
    assert_eq!(probe(&other), 401, "other sessions end");
}

#[test]
fn dashboard_is_served_from_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let mut r = agent().get(c.url("/")).call().unwrap();
    assert_eq!(r.status(), 200);
    let h = |r: &ureq::http::Response<ureq::Body>, k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(h(&r, "content-type"), "text/html; charset=utf-8");
    assert_eq!(h(&r, "cache-control"), "no-cache");
    assert!(h(&r, "content-security-policy").starts_with("default-src 'self'"));
    assert_eq!(h(&r, "x-content-type-options"), "nosniff");
    let etag = h(&r, "etag");
    assert!(r.body_mut().read_to_string().unwrap().contains("app.js"));
    let r304 = agent()
        .get(c.url("/"))
        .header("If-None-Match", &etag)
        .call()
        .unwrap();
    assert_eq!(r304.status(), 304);
    for (path, ty) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let r = agent().get(c.url(path)).call().unwrap();
        assert_eq!(
            (r.status().as_u16(), h(&r, "content-type")),
            (200, ty.into())
        );
    }
    assert_eq!(
        agent().get(c.url("/assets/x.js")).call().unwrap().status(),
        404
    );
    // API answers are never cached.
    let r = agent().get(c.url("/api/v1/health")).call().unwrap();
    assert_eq!(h(&r, "cache-control"), "no-store");
}

/// One request written by hand on its own connection (`Connection: close`)
/// and the answer as sent: (status, headers with lower-case names, the
/// bytes after the head).
fn by_hand(c: &Conductor, method: &str, path: &str, token: Option<&str>) -> Answer {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(c.started.http_addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

/// An answer read by [`by_hand`].
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The headers that describe the body (and must not differ between
    /// `GET` and `HEAD`).
    fn entity(&self) -> Vec<Option<&str>> {
        [
            "content-type",
            "content-length",
            "transfer-encoding",
            "etag",
            "cache-control",
            "www-authenticate",
        ]
        .iter()
        .map(|h| self.header(h))
        .collect()
    }
}

#[test]
fn head_is_answered_like_get_without_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let admin = c.admin();
    for (path, token, status) in [
        ("/", None, 200),
        ("/assets/app.js", None, 200),
        ("/assets/nope.js", None, 404),
        ("/api/v1/health", None, 200),
        ("/metrics", None, 200),
        ("/api/v1/workers", None, 401),
        ("/api/v1/workers", Some(admin.as_str()), 200),
        ("/api/v1/services", Some(admin.as_str()), 200),
        ("/api/v1/nope", Some(admin.as_str()), 404),
    ] {
        let get = by_hand(&c, "GET", path, token);
        let head = by_hand(&c, "HEAD", path, token);
        assert_eq!(
            (get.status, head.status),
            (status, status),
            "GET and HEAD {path}"
        );
        assert!(head.body.is_empty(), "HEAD {path} sent a body");
        assert!(!get.body.is_empty(), "GET {path} has one");
        if path != "/metrics" {
            // The metrics text changes between two requests (their counts).
            assert_eq!(head.entity(), get.entity(), "headers of HEAD {path}");
        }
    }
    let index = by_hand(&c, "HEAD", "/", None);
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let get = by_hand(&c, "GET", "/", None);
    assert_eq!(
        index.header("content-length"),
        Some(get.body.len().to_string().as_str()),
        "HEAD / announces the length of the page"
    );
}
