//! The JSON mirror (`aerekos/v1/<id>/json/…`) is kept in step with its JSON
//! Schemas in `docs/mirror/<kind>.schema.json`: for every mirrored topic the
//! payload the conductor builds ([`conductor::mirror::payload`]) from the
//! example frames and the largest frames the types can express validates
//! against its schema. Every object in a schema says
//! `additionalProperties: false`, so a field added to the mirror without a
//! schema entry fails here; every field carries a description.
//!
//! The validator below implements exactly the subset of JSON Schema 2020-12
//! the schemas use (`type` as a name or a list, `properties`, `required`,
//! `additionalProperties: false`, `items`, `minimum`/`maximum`, `enum`,
//! `minLength`/`maxLength`, `minItems`/`maxItems`, and the annotations
//! `$schema`, `$id`, `title`, `description`); any other keyword in a schema
//! fails the test rather than being silently ignored.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeSet;
use std::path::PathBuf;

use protocol::examples;
use protocol::frame::bounded;
use protocol::{Body, Event, EventKind, Reply, ReplyStatus, TopicKind};
use serde_json::{json, Value};

/// Keywords the validator understands; anything else in a schema is an error.
const KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "enum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
];

/// `docs/mirror/` in the repository.
fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/mirror")
}

/// The mirrored topic kinds: every `json/…` leaf of the topic tree.
fn mirrored_kinds() -> Vec<TopicKind> {
    TopicKind::ALL
        .iter()
        .copied()
        .filter(|k| k.leaf().starts_with("json/"))
        .collect()
}

/// `json/metrics` → `metrics`: the schema file's stem.
fn schema_name(kind: TopicKind) -> String {
    kind.leaf().trim_start_matches("json/").to_string()
}

/// The parsed schema of a mirrored topic kind.
fn schema(kind: TopicKind) -> Value {
    let path = schema_dir().join(format!("{}.schema.json", schema_name(kind)));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (every mirrored topic needs a schema)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn type_matches(name: &str, v: &Value) -> Result<bool, String> {
    Ok(match name {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_u64() || v.is_i64(),
        other => return Err(format!("unknown type {other:?}")),
    })
}

fn number(schema: &Value, key: &str, at: &str) -> Result<Option<f64>, String> {
    match schema.get(key) {
        None => Ok(None),
        Some(n) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("{at}: {key} is not a number")),
    }
}

fn count(schema: &Value, key: &str, at: &str) -> Result<Option<usize>, String> {
    match schema.get(key) {
        None => Ok(None),
        Some(n) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("{at}: {key} is not a count")),
    }
}

/// Validates `v` against `schema`, pushing one message per violation onto
/// `errors`; `Err` when the schema itself is outside the supported subset.
fn validate(schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) -> Result<(), String> {
    let obj = schema
        .as_object()
        .ok_or_else(|| format!("{at}: a schema must be an object"))?;
    if let Some(k) = obj.keys().find(|k| !KEYWORDS.contains(&k.as_str())) {
        return Err(format!("{at}: unsupported keyword {k:?}"));
    }
    if let Some(t) = obj.get("type") {
        let names: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(list) => list
                .iter()
                .map(|n| n.as_str().ok_or_else(|| format!("{at}: bad type list")))
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("{at}: bad type")),
        };
        let mut ok = false;
        for n in &names {
            ok |= type_matches(n, v)?;
        }
        if !ok {
            errors.push(format!("{at}: {v} is not of type {names:?}"));
            return Ok(());
        }
    }
    if let Some(allowed) = obj.get("enum") {
        let allowed = allowed
            .as_array()
            .ok_or_else(|| format!("{at}: enum is not a list"))?;
        if !allowed.contains(v) {
            errors.push(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = number(schema, "minimum", at)? {
            if n < min {
                errors.push(format!("{at}: {v} < minimum {min}"));
            }
        }
        if let Some(max) = number(schema, "maximum", at)? {
            if n > max {
                errors.push(format!("{at}: {v} > maximum {max}"));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count();
        if count(schema, "minLength", at)?.is_some_and(|min| len < min) {
            errors.push(format!("{at}: {len} characters, below minLength"));
        }
        if count(schema, "maxLength", at)?.is_some_and(|max| len > max) {
            errors.push(format!("{at}: {len} characters, over maxLength"));
        }
    }
    if let Some(items) = v.as_array() {
        if count(schema, "minItems", at)?.is_some_and(|min| items.len() < min) {
            errors.push(format!("{at}: {} items, below minItems", items.len()));
        }
        if count(schema, "maxItems", at)?.is_some_and(|max| items.len() > max) {
            errors.push(format!("{at}: {} items, over maxItems", items.len()));
        }
        if let Some(item_schema) = obj.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{at}[{i}]"), errors)?;
            }
        }
    }
    if let Some(fields) = v.as_object() {
        let props = match obj.get("properties") {
            None => None,
            Some(p) => Some(
                p.as_object()
                    .ok_or_else(|| format!("{at}: properties is not an object"))?,
            ),
        };
        if let Some(required) = obj.get("required") {
            let required = required
                .as_array()
                .ok_or_else(|| format!("{at}: required is not a list"))?;
            for r in required {
                let r = r
                    .as_str()
                    .ok_or_else(|| format!("{at}: required holds a non-string"))?;
                if !fields.contains_key(r) {
                    errors.push(format!("{at}: required field {r:?} missing"));
                }
            }
        }
        match obj.get("additionalProperties") {
            None => {}
            Some(Value::Bool(false)) => {
                for k in fields.keys() {
                    if !props.is_some_and(|p| p.contains_key(k)) {
                        errors.push(format!("{at}: field {k:?} is not in the schema"));
                    }
                }
            }
            Some(_) => {
                return Err(format!(
                    "{at}: only additionalProperties: false is supported"
                ))
            }
        }
        if let Some(props) = props {
            for (k, sub) in props {
                if let Some(fv) = fields.get(k) {
                    validate(sub, fv, &format!("{at}.{k}"), errors)?;
                }
            }
        }
    }
    Ok(())
}

/// The violations of `v` against `schema` (empty: valid). Panics when the
/// schema leaves the supported subset.
fn violations(schema: &Value, v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate(schema, v, "$", &mut errors).unwrap_or_else(|e| panic!("schema: {e}"));
    errors
}

/// Every frame body the tests know: the examples, the largest, and edge
/// cases (no sensors, no disks, no labels).
fn bodies() -> Vec<(&'static str, Body)> {
    let mut bare_metrics = examples::metrics();
    bare_metrics.temperatures.clear();
    bare_metrics.disks.clear();
    bare_metrics.net.clear();
    bare_metrics.cpu_per_core.clear();
    let mut bare_birth = examples::birth();
    bare_birth.labels.clear();
    bare_birth.disks.clear();
    let bare_board = protocol::Board {
        throttled: None,
        revision: None,
        serial: bounded(""),
        sd: None,
    };
    let mut cold = examples::metrics();
    for t in &mut cold.temperatures {
        t.millicelsius = -40_000;
    }
    vec![
        ("example birth", Body::Birth(examples::birth())),
        ("largest birth", Body::Birth(examples::largest_birth())),
        ("birth without labels or disks", Body::Birth(bare_birth)),
        ("example metrics", Body::Metrics(examples::metrics())),
        (
            "largest metrics",
            Body::Metrics(examples::largest_metrics()),
        ),
        ("metrics with empty lists", Body::Metrics(bare_metrics)),
        ("metrics below freezing", Body::Metrics(cold)),
        ("example board", Body::Board(examples::board())),
        ("largest board", Body::Board(examples::largest_board())),
        (
            "board without throttling bits, revision or SD card",
            Body::Board(bare_board),
        ),
        (
            "event",
            Body::Event(Event {
                kind: EventKind::AgentStarted,
                detail: bounded("0.1.0"),
            }),
        ),
        (
            "reply",
            Body::Reply(Reply {
                cmd_id: 1,
                status: ReplyStatus::Ok,
                detail: bounded(""),
            }),
        ),
        (
            "service status",
            Body::ServiceStatus(examples::service_status()),
        ),
        ("log chunk", Body::LogChunk(examples::log_chunk())),
        (
            "service metrics",
            Body::ServiceMetrics(examples::service_metrics()),
        ),
    ]
}

#[test]
fn every_mirrored_payload_validates_against_its_schema() {
    let largest_id = "w".repeat(protocol::frame::WORKER_ID_LEN);
    let envelopes = [
        (examples::WORKER_ID, 1, 1_764_201_600_123),
        (largest_id.as_str(), u64::MAX, u64::MAX),
    ];
    let mut covered = BTreeSet::new();
    for (what, body) in bodies() {
        for (id, seq, at) in envelopes {
            let Some((kind, v)) = conductor::mirror::payload(id, seq, at, &body) else {
                continue;
            };
            covered.insert(kind.leaf());
            let errors = violations(&schema(kind), &v);
            assert!(
                errors.is_empty(),
                "{what} on {}: {errors:#?}\n{v:#}",
                kind.leaf()
            );
        }
    }
    let mirrored: BTreeSet<&str> = mirrored_kinds().iter().map(|k| k.leaf()).collect();
    assert_eq!(
        covered, mirrored,
        "every mirrored topic is built from some example frame"
    );
}

#[test]
fn docs_mirror_holds_one_schema_per_mirrored_topic() {
    let mut files: Vec<String> = std::fs::read_dir(schema_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".schema.json"))
        .collect();
    files.sort();
    let mut expected: Vec<String> = mirrored_kinds()
        .into_iter()
        .map(|k| format!("{}.schema.json", schema_name(k)))
        .collect();
    expected.sort();
    assert_eq!(files, expected);
}

/// Every node of a schema: described, and objects closed.
fn check_described(schema: &Value, at: &str, problems: &mut Vec<String>) {
    if schema.get("description").and_then(Value::as_str).is_none() {
        problems.push(format!("{at}: no description"));
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        if schema.get("additionalProperties") != Some(&Value::Bool(false)) {
            problems.push(format!("{at}: not additionalProperties: false"));
        }
        let required: BTreeSet<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (k, sub) in props {
            if !required.contains(k.as_str()) {
                problems.push(format!(
                    "{at}.{k}: not required (the mirror always sends it)"
                ));
            }
            check_described(sub, &format!("{at}.{k}"), problems);
        }
    }
    if let Some(items) = schema.get("items") {
        check_described(items, &format!("{at}[]"), problems);
    }
}

#[test]
fn the_schemas_are_2020_12_closed_and_describe_every_field() {
    for kind in mirrored_kinds() {
        let s = schema(kind);
        assert_eq!(
            s["$schema"],
            "https://json-schema.org/draft/2020-12/schema",
            "{}",
            kind.leaf()
        );
        assert_eq!(s["title"], format!("aerekos/v1/<id>/{}", kind.leaf()));
        let mut problems = Vec::new();
        check_described(&s, kind.leaf(), &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

#[test]
fn the_validator_refuses_what_the_schemas_forbid() {
    let s = schema(TopicKind::JsonMetrics);
    let body = Body::Metrics(examples::metrics());
    let (_, good) = conductor::mirror::payload("w-1", 1, 2, &body).unwrap();
    assert_eq!(violations(&s, &good), Vec::<String>::new());
    let broken = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = good.clone();
        f(v.as_object_mut().unwrap());
        violations(&s, &v)
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "an unknown field",
            broken(&|m| {
                m.insert("cpu_total".into(), json!(1250));
            }),
        ),
        (
            "a missing field",
            broken(&|m| {
                m.remove("load1");
            }),
        ),
        (
            "a string for a number",
            broken(&|m| {
                m.insert("cpu_percent".into(), json!("12.5"));
            }),
        ),
        (
            "a float for an integer",
            broken(&|m| {
                m.insert("memory_used_bytes".into(), json!(1.5));
            }),
        ),
        (
            "a negative size",
            broken(&|m| {
                m.insert("swap_used_bytes".into(), json!(-1));
            }),
        ),
        (
            "null where not nullable",
            broken(&|m| {
                m.insert("load5".into(), Value::Null);
            }),
        ),
        (
            "too many disks",
            broken(&|m| {
                let disk = m["disks"][0].clone();
                m.insert("disks".into(), Value::Array(vec![disk; 9]));
            }),
        ),
        (
            "an unknown nested field",
            broken(&|m| {
                m["disks"][0]
                    .as_object_mut()
                    .unwrap()
                    .insert("used".into(), json!(1));
            }),
        ),
        (
            "over the maximum",
            broken(&|m| {
                m.insert("cpu_percent".into(), json!(655.36));
            }),
        ),
    ];
    for (what, errors) in cases {
        assert!(!errors.is_empty(), "{what} passed");
    }
    // A nullable field takes null.
    assert!(broken(&|m| {
        m.insert("temp_celsius".into(), Value::Null);
    })
    .is_empty());
    // `enum`, `minLength` and unsupported keywords.
    let e = json!({"description": "d", "type": "string", "enum": ["a", "b"], "minLength": 1});
    assert!(violations(&e, &json!("a")).is_empty());
    assert!(!violations(&e, &json!("c")).is_empty());
    let mut errors = Vec::new();
    assert!(validate(&json!({"pattern": "x"}), &json!("x"), "$", &mut errors).is_err());
}

/// The ```` ```json ```` block of the repository README that shows a
/// `json/metrics` payload.
fn readme_example() -> Value {
    let readme = include_str!("../../README.md");
    let block = readme
        .split("```json\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(b, _)| b))
        .find(|b| b.contains("\"cpu_percent\""))
        .expect("README.md shows a json/metrics payload");
    serde_json::from_str(block).unwrap()
}

#[test]
fn the_readme_example_is_what_the_conductor_publishes_and_validates() {
    let shown = readme_example();
    let errors = violations(&schema(TopicKind::JsonMetrics), &shown);
    assert!(errors.is_empty(), "{errors:#?}");
    let body = Body::Metrics(examples::metrics());
    let (kind, built) =
        conductor::mirror::payload(examples::WORKER_ID, 1, 1_764_201_600_123, &body).unwrap();
    assert_eq!(kind, TopicKind::JsonMetrics);
    assert_eq!(
        shown, built,
        "README.md's example vs the example metrics frame"
    );
}
