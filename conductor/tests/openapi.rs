//! `conductor/assets/openapi.json`, served at `GET /api/v1/openapi.json`,
//! kept in step with the router: the routes are read from the router's
//! source (`api.rs`'s `route`, `mod.rs`'s `raw_route` and the streamed
//! uploads in `serve`), both directions are compared, every `$ref` must
//! resolve, each operation's `x-aerekos-role` is checked against a running
//! conductor (a token one role short gets 403), and the answers of a running
//! conductor must match the document's response schemas.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{json, Value};

const DOC: &str = include_str!("../assets/openapi.json");
const API_RS: &str = include_str!("../src/http/api.rs");
const MOD_RS: &str = include_str!("../src/http/mod.rs");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("openapi.json is not JSON")
}

/// The text of `fn <name>(` (or `<`) up to the first line that is a lone `}`.
fn fn_body<'a>(src: &'a str, name: &str) -> &'a str {
    let start = ["(", "<"]
        .iter()
        .find_map(|open| src.find(&format!("fn {name}{open}")))
        .unwrap_or_else(|| panic!("fn {name} not found: has the router changed shape?"));
    let len = src[start..].find("\n}\n").expect("end of fn");
    &src[start..start + len]
}

/// Every `(Method::X, [segments…])` match arm in `body` as
/// `(METHOD, segments)`, a binding `id` becoming `{id}`. Arms on `_` (the
/// fallbacks) have no `[` and are skipped.
fn match_arms(body: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (at, _) in body.match_indices("(Method::") {
        let rest = &body[at + "(Method::".len()..];
        let Some((method, rest)) = rest.split_once(',') else {
            continue;
        };
        let rest = rest.trim_start();
        let Some(rest) = rest.strip_prefix('[') else {
            continue;
        };
        let pattern = &rest[..rest.find(']').expect("] closing the segments")];
        let segs = pattern
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if let Some(lit) = s.strip_prefix('"') {
                    lit.trim_end_matches('"').to_string()
                } else {
                    assert!(
                        s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "cannot read segment {s:?} of arm {method} [{pattern}]"
                    );
                    format!("{{{s}}}")
                }
            })
            .collect();
        out.push((method.trim().to_ascii_uppercase(), segs));
    }
    out
}

/// The value of a path constant `serve` names (the test must learn a new one).
fn path_const(name: &str) -> &'static str {
    match name {
        "protocol::exec::EXEC_PATH" => protocol::exec::EXEC_PATH,
        "protocol::shell::SHELL_PATH" => protocol::shell::SHELL_PATH,
        "protocol::shell::CLIENT_SESSIONS_PATH" => protocol::shell::CLIENT_SESSIONS_PATH,
        other => panic!("serve streams a POST under {other}: add it to path_const"),
    }
}

/// Every `(METHOD, /api/v1/… path)` the router answers, read from its source.
fn router_routes() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    // api.rs: the open arms (full paths) before the token check, the table
    // (paths under /api/v1/) after it.
    let route = fn_body(API_RS, "route");
    let (open, table) = route
        .split_once("let token = authorize(ctx, req)?;")
        .expect("the token check in route");
    let full = |arms: Vec<(String, Vec<String>)>, routes: &mut BTreeSet<_>| {
        let mut n = 0;
        for (m, segs) in arms {
            // `["metrics"]` (Prometheus) is outside /api/v1.
            if segs.len() >= 2 && segs[0] == "api" && segs[1] == "v1" {
                routes.insert((m, format!("/{}", segs.join("/"))));
                n += 1;
            }
        }
        n
    };
    let n_open = full(match_arms(open), &mut routes);
    let mut n_table = 0;
    for (m, segs) in match_arms(table) {
        routes.insert((m, format!("/api/v1/{}", segs.join("/"))));
        n_table += 1;
    }
    let n_raw = full(match_arms(fn_body(MOD_RS, "raw_route")), &mut routes);
    assert!(
        n_open >= 5 && n_table > 40 && n_raw >= 5,
        "only {n_open}/{n_table}/{n_raw} routes read: has the router changed shape?"
    );
    // mod.rs `serve`: the uploads streamed before the body is read.
    let serve: String = fn_body(MOD_RS, "serve")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut n_streamed = 0;
    for (at, _) in serve.match_indices("path.trim_end_matches('/') == \"") {
        let before = &serve[..at];
        let method = before
            .rsplit("Method::")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .expect("the method compared before the path");
        let rest = &serve[at + "path.trim_end_matches('/') == \"".len()..];
        let path = &rest[..rest.find('"').expect("closing quote")];
        routes.insert((method.to_ascii_uppercase(), path.to_string()));
        n_streamed += 1;
    }
    let streamed_method = {
        let body = fn_body(MOD_RS, "streamed_post");
        let rest = body
            .split("*method == Method::")
            .nth(1)
            .expect("streamed_post checks the method");
        rest.split_whitespace().next().unwrap().to_ascii_uppercase()
    };
    for (at, _) in serve.match_indices("if let Some(") {
        let rest = &serve[at + "if let Some(".len()..];
        let Some((binding, rest)) = rest.split_once(") = streamed_post(") else {
            continue;
        };
        if !binding
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let args: Vec<&str> = rest[..rest.find(')').expect("end of streamed_post(…)")]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let [_, _, prefix, suffix] = args.as_slice() else {
            panic!("streamed_post arguments {args:?}");
        };
        let suffix = suffix.trim_matches('"');
        routes.insert((
            streamed_method.clone(),
            format!("{}/{{{binding}}}{suffix}", path_const(prefix)),
        ));
        n_streamed += 1;
    }
    assert!(n_streamed >= 4, "only {n_streamed} streamed routes read");
    routes
}

/// Every `(METHOD, path)` the document describes.
fn doc_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn every_routed_path_is_documented_and_the_reverse() {
    let routed = router_routes();
    let documented = doc_routes(&doc());
    let missing: Vec<_> = routed.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "routed but not in conductor/assets/openapi.json: {missing:?}\n\
         in openapi.json but not routed: {stale:?}"
    );
    assert!(routed.len() > 55, "{}", routed.len());
    for (m, p) in [
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1/artifacts"),
        ("POST", "/api/v1/agent/exec/{session}"),
        ("POST", "/api/v1/shell-sessions/{session}/input"),
        ("POST", "/api/v1/workers/{id}/services/{name}/{op}"),
        ("GET", "/api/v1/agent/shell/{session}/input"),
    ] {
        assert!(routed.contains(&(m.into(), p.into())), "{m} {p} not read");
    }
}

/// Every `$ref` string in `v`, with where it is.
fn refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Some(r) = x.as_str() {
                        out.push((at.to_string(), r.to_string()));
                    }
                } else {
                    refs(x, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                refs(x, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn resolve<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    doc.pointer(r.strip_prefix('#')?)
}

#[test]
fn document_is_openapi_3_1_with_resolving_refs_roles_and_parameters() {
    let doc = doc();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut all = Vec::new();
    refs(&doc, "#", &mut all);
    assert!(all.len() > 100, "{} refs", all.len());
    for (at, r) in &all {
        assert!(
            resolve(&doc, r).is_some(),
            "{at}: $ref {r} does not resolve"
        );
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        assert!(path.starts_with("/api/v1/"), "{path}");
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let what = format!("{m} {path}");
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: operationId"));
            assert!(ids.insert(id.to_string()), "{what}: operationId {id} twice");
            let role = op["x-aerekos-role"].as_str().unwrap_or_default();
            assert!(
                ["public", "worker", "viewer", "operator", "admin"].contains(&role),
                "{what}: x-aerekos-role {role:?}"
            );
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{what}: path parameters are required");
                    p["name"].as_str().unwrap()
                })
                .collect();
            assert_eq!(declared, in_path, "{what}: path parameters");
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{what}: no success response"
            );
            let security = op.get("security").unwrap_or(&doc["security"]);
            let names: Vec<&str> = security
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_object().unwrap().keys().map(String::as_str))
                .collect();
            for n in &names {
                assert!(schemes.contains_key(*n), "{what}: security scheme {n}");
            }
            match role {
                "public" => assert!(names.is_empty(), "{what}: public but secured"),
                "worker" => assert_eq!(names, ["workerAuth"], "{what}"),
                _ => assert_eq!(names, ["bearerAuth", "sessionCookie"], "{what}"),
            }
        }
    }
}

// ---- a small JSON Schema validator (what the document uses) ----

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        other => panic!("schema type {other}"),
    }
}

/// Where `v` does not match `schema` (empty: it matches).
fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(r) = schema["$ref"].as_str() {
        let target = resolve(doc, r).unwrap_or_else(|| panic!("$ref {r}"));
        return check(doc, target, v, at);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            errs.extend(check(doc, s, v, at));
        }
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(alts) = schema[key].as_array() {
            let n = alts
                .iter()
                .filter(|s| check(doc, s, v, at).is_empty())
                .count();
            if n == 0 || (exactly_one && n > 1) {
                errs.push(format!("{at}: {n} of the {key} alternatives match {v}"));
            }
        }
    }
    match &schema["type"] {
        Value::String(t) if !type_ok(t, v) => {
            errs.push(format!("{at}: {v} is not {t}"));
            return errs;
        }
        Value::Array(ts) if !ts.iter().any(|t| type_ok(t.as_str().unwrap(), v)) => {
            errs.push(format!("{at}: {v} is none of {ts:?}"));
            return errs;
        }
        _ => {}
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64()) {
        if n < min {
            errs.push(format!("{at}: {n} < minimum {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), v.as_f64()) {
        if n > max {
            errs.push(format!("{at}: {n} > maximum {max}"));
        }
    }
    if let Value::Object(o) = v {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !o.contains_key(r) {
                errs.push(format!("{at}: required property {r} missing"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, x) in o {
            let here = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => errs.extend(check(doc, s, x, &here)),
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => errs.push(format!("{here}: not allowed")),
                    s @ Value::Object(_) => errs.extend(check(doc, s, x, &here)),
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(a), Some(items)) = (v, schema.get("items")) {
        for (i, x) in a.iter().enumerate() {
            errs.extend(check(doc, items, x, &format!("{at}[{i}]")));
        }
    }
    errs
}

#[test]
fn the_validator_catches_what_it_should() {
    let doc = doc();
    let s = json!({"$ref": "#/components/schemas/Token"});
    let good = json!({"id": "t-1", "name": "x", "role": "viewer", "created_ms": 1});
    assert!(check(&doc, &s, &good, "$").is_empty());
    for bad in [
        json!({"id": "t-1", "name": "x", "role": "viewer"}),
        json!({"id": "t-1", "name": "x", "role": "root", "created_ms": 1}),
        json!({"id": 1, "name": "x", "role": "viewer", "created_ms": 1}),
        json!({"id": "t-1", "name": "x", "role": "viewer", "created_ms": -1}),
        json!([]),
    ] {
        assert!(!check(&doc, &s, &bad, "$").is_empty(), "{bad}");
    }
    let cmd = json!({"$ref": "#/components/schemas/CommandRequest"});
    assert!(check(
        &doc,
        &cmd,
        &json!({"action": {"set_interval_ms": 1000}}),
        "$"
    )
    .is_empty());
    assert!(!check(&doc, &cmd, &json!({"action": {"reboot": 1}}), "$").is_empty());
}

// ---- against a running conductor ----

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(15)))
        .build()
        .into()
}

/// The operation for `method` on the document path `template`.
fn operation<'a>(doc: &'a Value, method: &str, template: &str) -> &'a Value {
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {template} is not in the document");
    op
}

/// Calls `method path` (the document's `template` filled in) and checks
/// the status is one the operation documents and, for a JSON answer, that
/// the body matches its schema. The status and body.
fn call_checked(
    c: &Conductor,
    doc: &Value,
    method: &str,
    template: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, v) = c.call(method, path, token, body);
    let op = operation(doc, method, template);
    let what = format!("{method} {path} → {status} {v}");
    let mut resp = &op["responses"][status.to_string()];
    assert!(resp.is_object(), "{what}: status not documented");
    if let Some(r) = resp["$ref"].as_str() {
        resp = resolve(doc, r).unwrap();
    }
    match resp["content"]["application/json"].get("schema") {
        Some(schema) => {
            let errs = check(doc, schema, &v, "$");
            assert!(errs.is_empty(), "{what}: {errs:#?}");
        }
        None if status == 204 => assert!(v.is_null(), "{what}: 204 with a body"),
        None => {}
    }
    (status, v)
}

/// `template` with each `{param}` filled in from `values` (else `nope`).
fn fill(template: &str, values: &BTreeMap<&str, String>) -> String {
    template
        .split('/')
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(p) => values.get(p).cloned().unwrap_or_else(|| "nope".into()),
                None => s.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn served_document_is_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    for method in ["GET", "HEAD"] {
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(c.url("/api/v1/openapi.json"))
            .body(())
            .unwrap();
        let mut resp = agent().run(req).unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{method} without a token");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(ct.starts_with("application/json"), "{method}: {ct}");
        let body = resp.body_mut().read_to_string().unwrap();
        if method == "GET" {
            assert!(body == DOC, "the served document differs from the file");
        } else {
            assert!(body.is_empty());
        }
    }
    c.stop();
}

#[test]
fn each_role_is_what_the_conductor_enforces_and_answers_match_the_schemas() {
    let doc = doc();
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let admin = c.admin();
    let token = |role: &str| {
        let (_, v) = call_checked(
            &c,
            &doc,
            "POST",
            "/api/v1/tokens",
            "/api/v1/tokens",
            Some(&admin),
            Some(json!({"name": format!("openapi-{role}"), "role": role})),
        );
        assert_eq!(v["role"], role, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let (operator, viewer) = (token("operator"), token("viewer"));

    // Each operation probed one role short of what the document says it
    // needs (403 naming the role), and viewer routes with a viewer token
    // (allowed) and none (401); public routes without a token, worker
    // routes with a bearer token (401: they need Aerekos-Worker).
    let values: BTreeMap<&str, String> = [("op", "restart".to_string())].into();
    let mut probed = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let method = m.to_ascii_uppercase();
            let url = fill(path, &values);
            let role = op["x-aerekos-role"].as_str().unwrap();
            let body = (method != "GET" && method != "DELETE").then(|| json!({}));
            let call = |token: Option<&str>| {
                call_checked(&c, &doc, &method, path, &url, token, body.clone())
            };
            let what = format!("{method} {path} ({role})");
            match role {
                "admin" => {
                    let (s, v) = call(Some(&operator));
                    assert_eq!(s, 403, "{what} with an operator token: {v}");
                    let e = v["error"].as_str().unwrap();
                    assert!(e.contains("needs an admin token"), "{what}: {e}");
                }
                "operator" => {
                    let (s, v) = call(Some(&viewer));
                    assert_eq!(s, 403, "{what} with a viewer token: {v}");
                    let e = v["error"].as_str().unwrap();
                    assert!(e.contains("needs an operator token"), "{what}: {e}");
                }
                "viewer" => {
                    assert_eq!(call(None).0, 401, "{what} without a token");
                    let (s, v) = call(Some(&viewer));
                    assert!(s != 401 && s != 403, "{what} with a viewer token: {s} {v}");
                }
                "public" => {
                    let (s, v) = call(None);
                    assert!(s != 401 && s != 403, "{what} without a token: {s} {v}");
                }
                "worker" => {
                    let (s, v) = call(Some(&admin));
                    assert_eq!(s, 401, "{what} with a bearer token: {v}");
                }
                other => panic!("{what}: role {other}"),
            }
            probed += 1;
        }
    }
    assert!(probed > 55, "{probed}");

    // Some state, then the answers of the read routes against the schemas.
    // A worker online with a birth and metrics, so the worker answers
    // carry an inventory, a board, a summary and history.
    let e = c.enroll_new("pi-openapi");
    let worker = e.id.clone();
    let w = FakeWorker::connect(&c, &e, true).unwrap();
    w.send(birth("pi-openapi", 10_000));
    w.send(metrics(1234));
    let t = std::time::Duration::from_secs(10);
    wait_for("raw history", t, || {
        let v = c.get(&format!("/api/v1/workers/{worker}/metrics?from=0"));
        (v["points"].as_array().unwrap().len() == 1).then_some(())
    });
    assert!(c.worker(&worker)["summary"].is_object());
    let (s, v) = call_checked(
        &c,
        &doc,
        "PUT",
        "/api/v1/workers/{id}/labels",
        &format!("/api/v1/workers/{worker}/labels"),
        Some(&admin),
        Some(json!({"site": "lab"})),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = call_checked(
        &c,
        &doc,
        "POST",
        "/api/v1/workers/{id}/commands",
        &format!("/api/v1/workers/{worker}/commands"),
        Some(&admin),
        Some(json!({"action": "ping"})),
    );
    assert_eq!((s, &v["status"]), (200, &json!("ok")), "{v}");
    let post = |template: &str, body: Value| {
        call_checked(
            &c,
            &doc,
            "POST",
            template,
            template,
            Some(&admin),
            Some(body),
        )
    };
    assert_eq!(
        post(
            "/api/v1/alert-rules",
            json!({"name": "hot", "kind": "metric_above", "metric": "cpu",
                   "threshold": 90.0, "for": "1m"})
        )
        .0,
        201
    );
    assert_eq!(
        post(
            "/api/v1/alert-rules",
            json!({"name": "hot", "kind": "worker_offline"})
        )
        .0,
        409
    );
    assert_eq!(
        post(
            "/api/v1/alert-receivers",
            json!({"name": "hook", "url": "http://127.0.0.1:9/hook"})
        )
        .0,
        201
    );
    let values: BTreeMap<&str, String> = [("id", worker.clone())].into();
    for template in [
        "/api/v1/health",
        "/api/v1/session",
        "/api/v1/mqtt",
        "/api/v1/workers",
        "/api/v1/workers/{id}",
        "/api/v1/workers/{id}/metrics",
        "/api/v1/workers/{id}/services",
        "/api/v1/tokens",
        "/api/v1/registration-token",
        "/api/v1/artifacts",
        "/api/v1/services",
        "/api/v1/exec-sessions",
        "/api/v1/agent-releases",
        "/api/v1/agent-rollouts",
        "/api/v1/alerts",
        "/api/v1/alert-rules",
        "/api/v1/alert-receivers",
    ] {
        let path = fill(template, &values);
        let (s, v) = call_checked(&c, &doc, "GET", template, &path, Some(&admin), None);
        assert_eq!(s, 200, "GET {path}: {v}");
    }
    let (s, v) = call_checked(
        &c,
        &doc,
        "GET",
        "/api/v1/workers/{id}/metrics",
        &format!("/api/v1/workers/{worker}/metrics?resolution=minute"),
        Some(&admin),
        None,
    );
    assert_eq!((s, &v["resolution"]), (200, &json!("minute")), "{v}");
    let (s, v) = call_checked(
        &c,
        &doc,
        "GET",
        "/api/v1/workers/{id}/metrics",
        &format!("/api/v1/workers/{worker}/metrics?from=0&resolution=raw"),
        Some(&admin),
        None,
    );
    assert_eq!((s, v["points"].as_array().unwrap().len()), (200, 1), "{v}");
    let (s, v) = call_checked(
        &c,
        &doc,
        "GET",
        "/api/v1/workers/{id}",
        "/api/v1/workers/nope",
        Some(&admin),
        None,
    );
    assert_eq!(s, 404, "{v}");
    let (s, v) = call_checked(
        &c,
        &doc,
        "GET",
        "/api/v1/session",
        "/api/v1/session",
        Some(&viewer),
        None,
    );
    assert_eq!((s, &v["role"]), (200, &json!("viewer")), "{v}");
    c.stop();
}
