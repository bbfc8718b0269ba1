//! API token roles end to end: a real conductor, edge-worker and `aerekos`
//! CLI. An operator token may read and change the fleet but not manage
//! tokens, run remote exec or read its audit; a viewer token may only read;
//! an admin token and a login session may do everything. A refused request
//! is 403 naming the role it needs; `GET /session` reports the role; the
//! CLI creates, lists and deletes tokens and shows the 403 message. (Tokens
//! from before roles existed becoming admin is the store's migration test.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use e2e::services::{cli, cli_json, conductor_and_worker};
use e2e::{http, read, Conductor};
use serde_json::{json, Value};

/// `method path` with `token` as the bearer (JSON body for writes).
fn call(c: &Conductor, token: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let url = format!("{}/api/v1{path}", c.url());
    let auth = format!("Bearer {token}");
    let agent = http();
    read(match method {
        "GET" => agent.get(url).header("Authorization", auth).call(),
        "DELETE" => agent.delete(url).header("Authorization", auth).call(),
        "PUT" => agent.put(url).header("Authorization", auth).send_json(body),
        _ => agent
            .post(url)
            .header("Authorization", auth)
            .send_json(body),
    })
}

/// Creates an API token named `name` with `role`, asking with `by`.
fn token(c: &Conductor, by: &str, name: &str, role: &str) -> String {
    let (status, v) = call(
        c,
        by,
        "POST",
        "/tokens",
        &json!({"name": name, "role": role}),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["role"], role, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// The error of a role refusal: 403 and the message naming what is needed.
#[track_caller]
fn assert_refused(got: &(u16, Value), needs: &str, name: &str, is: &str) {
    assert_eq!(got.0, 403, "{}", got.1);
    assert_eq!(
        got.1["error"],
        format!("this needs {needs} token (token \"{name}\" is {is})"),
        "{}",
        got.1
    );
}

/// Not refused for its role (any other answer, error or not, is the route's).
#[track_caller]
fn assert_not_refused_for_role(got: &(u16, Value)) {
    let error = got.1["error"].as_str().unwrap_or_default();
    assert!(!error.starts_with("this needs"), "{} {}", got.0, got.1);
}

#[test]
fn each_role_gets_what_it_may_and_403_naming_the_role_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _w, id) = conductor_and_worker(dir.path(), "roles-w");
    let admin = token(&c, &c.admin, "root-ci", "admin");
    let operator = token(&c, &c.admin, "ci", "operator");
    let viewer = token(&c, &c.admin, "grafana", "viewer");

    // Defaults and bad roles.
    let (status, v) = call(&c, &c.admin, "POST", "/tokens", &json!({"name": "plain"}));
    assert_eq!((status, v["role"].as_str()), (201, Some("admin")), "{v}");
    let (status, v) = call(
        &c,
        &c.admin,
        "POST",
        "/tokens",
        &json!({"name": "bad", "role": "root"}),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "role must be one of admin, operator, viewer");

    // The list and the session say who is what.
    let (status, v) = call(&c, &c.admin, "GET", "/tokens", &Value::Null);
    assert_eq!(status, 200, "{v}");
    let roles: Vec<(&str, &str)> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            ("root-ci", "admin"),
            ("ci", "operator"),
            ("grafana", "viewer"),
            ("plain", "admin")
        ]
    );
    for (t, kind, role) in [
        (&c.admin, "session", "admin"),
        (&admin, "api", "admin"),
        (&operator, "api", "operator"),
        (&viewer, "api", "viewer"),
    ] {
        let (status, v) = call(&c, t, "GET", "/session", &Value::Null);
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            (v["kind"].as_str(), v["role"].as_str()),
            (Some(kind), Some(role))
        );
    }

    let exec_body = json!({"argv": ["true"]});
    let exec = format!("/workers/{id}/exec");
    let labels = format!("/workers/{id}/labels");
    let spec = |name: &str| json!({"name": name, "command": "/bin/sleep", "args": ["10"]});

    // Operator: reads and changes the fleet...
    let (status, v) = call(&c, &operator, "GET", "/workers", &Value::Null);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["workers"][0]["id"], id.as_str());
    let (status, v) = call(&c, &operator, "POST", "/services", &spec("op-svc"));
    assert_eq!(status, 201, "{v}");
    let (status, v) = call(&c, &operator, "PUT", &labels, &json!({"site": "shop"}));
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(
        &c,
        &operator,
        "GET",
        &format!("/workers/{id}/services/op-svc/logs?tail=10"),
        &Value::Null,
    );
    assert_not_refused_for_role(&(status, v));
    // ... but nothing admin-only.
    for (method, path) in [
        ("POST", exec.as_str()),
        ("GET", "/tokens"),
        ("POST", "/tokens"),
        ("DELETE", "/tokens/t-000000000000"),
        ("GET", "/exec-sessions"),
        ("GET", "/registration-token"),
        ("POST", "/registration-token/rotate"),
        ("POST", "/password"),
        ("POST", "/agent-releases"),
    ] {
        let body = if path == exec { &exec_body } else { &json!({}) };
        assert_refused(
            &call(&c, &operator, method, path, body),
            "an admin",
            "ci",
            "an operator",
        );
    }
    // A token cannot raise itself: an operator cannot mint an admin token.
    assert_refused(
        &call(
            &c,
            &operator,
            "POST",
            "/tokens",
            &json!({"name": "x", "role": "admin"}),
        ),
        "an admin",
        "ci",
        "an operator",
    );

    // Viewer: reads...
    for path in ["/workers", "/services", "/alerts", "/agent-releases"] {
        let (status, v) = call(&c, &viewer, "GET", path, &Value::Null);
        assert_eq!(status, 200, "GET {path}: {v}");
    }
    let (status, v) = call(&c, &viewer, "GET", &format!("/workers/{id}"), &Value::Null);
    assert_eq!((status, v["labels"]["site"].as_str()), (200, Some("shop")));
    // ... and no writes, nor the admin-only reads.
    for (method, path, body) in [
        ("PUT", labels.as_str(), json!({"site": "x"})),
        ("POST", "/services", spec("viewer-svc")),
        (
            "POST",
            &format!("/workers/{id}/commands"),
            json!({"action": "ping"}),
        ),
        ("DELETE", "/services/op-svc/deployment", Value::Null),
        ("POST", "/alert-rules", json!({})),
    ] {
        assert_refused(
            &call(&c, &viewer, method, path, &body),
            "an operator",
            "grafana",
            "a viewer",
        );
    }
    for (method, path) in [
        ("GET", "/tokens"),
        ("GET", "/exec-sessions"),
        ("GET", "/registration-token"),
        ("POST", exec.as_str()),
    ] {
        assert_refused(
            &call(&c, &viewer, method, path, &exec_body),
            "an admin",
            "grafana",
            "a viewer",
        );
    }
    let (status, v) = call(&c, &viewer, "GET", "/services", &Value::Null);
    assert_eq!(status, 200);
    assert_eq!(v["services"].as_array().unwrap().len(), 1, "{v}");

    // Admin token and login session: everything, exec included (refused
    // here for the worker's missing label, not for the token).
    for (t, name) in [(&admin, "adm"), (&c.admin, "ses")] {
        let (status, v) = call(&c, t, "GET", "/tokens", &Value::Null);
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(&c, t, "GET", "/exec-sessions", &Value::Null);
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(&c, t, "GET", "/registration-token", &Value::Null);
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(&c, t, "GET", "/workers", &Value::Null);
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(&c, t, "PUT", &labels, &json!({"site": "shop"}));
        assert_eq!(status, 200, "{v}");
        let (status, v) = call(&c, t, "POST", "/services", &spec(&format!("{name}-svc")));
        assert_eq!(status, 201, "{v}");
        let got = call(&c, t, "POST", &exec, &exec_body);
        assert_not_refused_for_role(&got);
        assert_eq!(got.0, 403, "{}", got.1);
        assert!(
            got.1["error"]
                .as_str()
                .unwrap()
                .contains("remote-exec=allow"),
            "{}",
            got.1
        );
        let created = token(&c, t, &format!("made-by-{name}"), "viewer");
        assert!(created.starts_with("aek_"));
    }
    // The admin token may delete tokens; a deleted token stops working.
    let (_, v) = call(&c, &admin, "GET", "/tokens", &Value::Null);
    let grafana = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "grafana")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = call(
        &c,
        &admin,
        "DELETE",
        &format!("/tokens/{grafana}"),
        &Value::Null,
    );
    assert_eq!(status, 204, "{v}");
    let (status, _) = call(&c, &viewer, "GET", "/workers", &Value::Null);
    assert_eq!(status, 401);
}

#[test]
fn cli_creates_lists_and_deletes_tokens_and_shows_the_role_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _w, id) = conductor_and_worker(dir.path(), "roles-cli");

    // `token create` prints just the token (for `export AEREKOS_TOKEN=$(…)`).
    let (ok, out, err) = cli(&c, &["token", "create", "x", "--role", "viewer"]);
    assert!(ok, "{err}");
    let viewer = out.trim().to_string();
    assert!(
        viewer.starts_with("aek_") && !viewer.contains('\n'),
        "{out}"
    );
    let made = cli_json(&c, &["token", "create", "ops", "--role", "operator"]);
    assert_eq!(
        (made["name"].as_str(), made["role"].as_str()),
        (Some("ops"), Some("operator"))
    );
    let made = cli_json(&c, &["token", "create", "dflt"]);
    assert_eq!(made["role"], "admin");

    let listed = cli_json(&c, &["token", "list"]);
    let roles: Vec<(&str, &str)> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [("x", "viewer"), ("ops", "operator"), ("dflt", "admin")]
    );
    let (ok, table, err) = cli(&c, &["token", "list"]);
    assert!(ok, "{err}");
    assert!(table.contains("\tx\tviewer\t"), "{table}");

    // The viewer token reads the fleet but may not label a worker.
    let (ok, out, err) = cli(&c, &["--token", &viewer, "workers"]);
    assert!(ok, "{err}");
    assert!(out.contains(&id), "{out}");
    let (ok, out, err) = cli(&c, &["--token", &viewer, "labels", &id, "site=shop"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("403: this needs an operator token (token \"x\" is a viewer)"),
        "{err}"
    );
    let (ok, _, err) = cli(&c, &["--token", &viewer, "token", "list"]);
    assert!(!ok);
    assert!(
        err.contains("403: this needs an admin token (token \"x\" is a viewer)"),
        "{err}"
    );

    // Deleting it ends it.
    let id_of_x = listed["tokens"][0]["id"].as_str().unwrap();
    let (ok, out, err) = cli(&c, &["token", "delete", id_of_x]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (ok, _, err) = cli(&c, &["--token", &viewer, "workers"]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
}
