//! Home Assistant MQTT discovery (`--homeassistant-discovery`) against the
//! real embedded broker: the retained configs a conductor publishes for its
//! workers are checked against Home Assistant's MQTT discovery schema for
//! `sensor` and `binary_sensor` (keys, required keys, device and origin
//! blocks, unique ids, device classes with their units, availability), and
//! every `state_topic`'s retained payload is rendered through the config's
//! `value_template` (a small Jinja subset, below). Revoking or deleting a
//! worker empties its config topics; without the flag nothing is published
//! under the prefix; a restarted conductor announces the workers it knows.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use protocol::topic::{topic, TopicKind};
use protocol::Body;
use rumqttc::QoS;
use serde_json::Value;

/// The latest payload seen on each topic (an empty one included).
type Seen = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// An MQTT Explorer-like client with the observer login, subscribed to
/// `filters`, recording what it sees.
fn observer(c: &Conductor, client_id: &str, filters: &[&str]) -> (rumqttc::Client, Seen) {
    let m = c.get("/api/v1/mqtt");
    let password = m["observer_password"].as_str().expect("observer password");
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let (client, _thread) = connect(
        c.started.mqtt_addr,
        client_id,
        "observer",
        password,
        Some(Box::new(move |_, p| {
            s2.lock()
                .unwrap()
                .insert(p.topic.clone(), p.payload.to_vec());
        })),
    )
    .expect("observer connects");
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).unwrap();
    }
    (client, seen)
}

fn snapshot(seen: &Seen) -> BTreeMap<String, Vec<u8>> {
    seen.lock().unwrap().clone()
}

fn json_of(seen: &BTreeMap<String, Vec<u8>>, topic: &str) -> Option<Value> {
    seen.get(topic)
        .filter(|p| !p.is_empty())
        .and_then(|p| serde_json::from_slice(p).ok())
}

/// A worker that says it is online (its retained status, as the agent's
/// session does) and sends a birth, metrics and, for a Pi, its board.
fn start_worker(c: &Conductor, hostname: &str, cpu: u16, board: bool) -> (Enrolled, FakeWorker) {
    let e = c.enroll_new(hostname);
    let w = FakeWorker::connect(c, &e, false).unwrap();
    w.client
        .publish(
            topic(&e.id, TopicKind::Status),
            QoS::AtLeastOnce,
            true,
            protocol::topic::STATUS_ONLINE,
        )
        .unwrap();
    w.send(birth(hostname, 10_000));
    w.send(metrics(cpu));
    if board {
        w.send(Body::Board(protocol::examples::board()));
    }
    (e, w)
}

// ---------------------------------------------------------------------------
// Home Assistant's MQTT discovery schema (www.home-assistant.io/integrations/
// sensor.mqtt, binary_sensor.mqtt, mqtt#discovery-messages), as far as
// aerekos uses it: a key outside these lists is a typo Home Assistant drops.

const COMMON_KEYS: &[&str] = &[
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "default_entity_id",
    "device",
    "device_class",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "expire_after",
    "force_update",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "origin",
    "payload_available",
    "payload_not_available",
    "platform",
    "qos",
    "state_topic",
    "unique_id",
    "value_template",
];
const SENSOR_KEYS: &[&str] = &[
    "last_reset_value_template",
    "options",
    "state_class",
    "suggested_display_precision",
    "unit_of_measurement",
];
const BINARY_SENSOR_KEYS: &[&str] = &["off_delay", "payload_off", "payload_on"];
const DEVICE_KEYS: &[&str] = &[
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
];
const ORIGIN_KEYS: &[&str] = &["name", "sw_version", "support_url"];
const STATE_CLASSES: &[&str] = &[
    "measurement",
    "measurement_angle",
    "total",
    "total_increasing",
];
/// Sensor device classes and the units Home Assistant accepts for them
/// (the ones a machine's health could use).
const SENSOR_CLASS_UNITS: &[(&str, &[&str])] = &[
    ("temperature", &["°C", "°F", "K"]),
    ("duration", &["d", "h", "min", "s", "ms", "μs"]),
    ("voltage", &["V", "mV", "μV", "kV", "MV"]),
    ("current", &["A", "mA"]),
    ("power", &["mW", "W", "kW", "MW", "GW", "TW"]),
    ("frequency", &["Hz", "kHz", "MHz", "GHz"]),
    ("power_factor", &["%"]),
    ("battery", &["%"]),
    ("humidity", &["%"]),
    (
        "data_size",
        &[
            "bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB",
            "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB",
        ],
    ),
    (
        "data_rate",
        &[
            "bit/s", "kbit/s", "Mbit/s", "Gbit/s", "B/s", "kB/s", "MB/s", "GB/s", "KiB/s", "MiB/s",
            "GiB/s",
        ],
    ),
];
const BINARY_SENSOR_CLASSES: &[&str] = &[
    "battery",
    "battery_charging",
    "carbon_monoxide",
    "cold",
    "connectivity",
    "door",
    "garage_door",
    "gas",
    "heat",
    "light",
    "lock",
    "moisture",
    "motion",
    "moving",
    "occupancy",
    "opening",
    "plug",
    "power",
    "presence",
    "problem",
    "running",
    "safety",
    "smoke",
    "sound",
    "tamper",
    "update",
    "vibration",
    "window",
];

fn is_slug(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || extra.contains(&b)
        })
}

/// Everything wrong with the config on `topic` under `prefix`; `retained`
/// holds the retained payloads of the aerekos topics (state, availability).
fn violations(
    prefix: &str,
    topic: &str,
    cfg: &Value,
    retained: &BTreeMap<String, Vec<u8>>,
) -> Vec<String> {
    let mut errs = Vec::new();
    let mut err = |m: String| errs.push(format!("{topic}: {m}"));
    let parts: Vec<&str> = topic
        .strip_prefix(prefix)
        .and_then(|t| t.strip_prefix('/'))
        .unwrap_or("")
        .split('/')
        .collect();
    let [component, node, object, "config"] = parts[..] else {
        err("not <prefix>/<component>/<node_id>/<object_id>/config".into());
        return errs;
    };
    if !is_slug(node, b"-") || !is_slug(object, b"-") {
        err(format!(
            "node id {node:?} / object id {object:?} not [a-z0-9_-]"
        ));
    }
    let Some(c) = cfg.as_object() else {
        err("not a JSON object".into());
        return errs;
    };
    let own: &[&str] = match component {
        "sensor" => SENSOR_KEYS,
        "binary_sensor" => BINARY_SENSOR_KEYS,
        other => {
            err(format!(
                "component {other:?} is not sensor or binary_sensor"
            ));
            return errs;
        }
    };
    for k in c.keys() {
        if !COMMON_KEYS.contains(&k.as_str()) && !own.contains(&k.as_str()) {
            err(format!("key {k:?} is not a {component} discovery key"));
        }
    }
    let text = |k: &str| c.get(k).and_then(Value::as_str);
    // Required: the state topic (the schema's one required key), a unique id
    // (entities with a device need one), a name, a device and an origin.
    for k in ["state_topic", "unique_id", "name"] {
        if text(k).is_none_or(str::is_empty) {
            err(format!("{k} missing or not a string"));
        }
    }
    if let Some(id) = text("default_entity_id") {
        let ok = id
            .strip_prefix(component)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|r| is_slug(r, b""));
        if !ok {
            err(format!(
                "default_entity_id {id:?} is not {component}.<slug>"
            ));
        }
    }
    match c.get("device").and_then(Value::as_object) {
        None => err("no device block".into()),
        Some(d) => {
            for k in d.keys() {
                if !DEVICE_KEYS.contains(&k.as_str()) {
                    err(format!("device key {k:?} unknown"));
                }
            }
            let ids = d.get("identifiers").and_then(Value::as_array);
            if ids.is_none_or(|a| a.is_empty() || a.iter().any(|i| !i.is_string())) {
                err("device.identifiers must be a non-empty list of strings".into());
            }
            for k in ["name", "model", "sw_version", "hw_version", "manufacturer"] {
                if d.get(k).is_some_and(|v| !v.is_string()) {
                    err(format!("device.{k} not a string"));
                }
            }
        }
    }
    match c.get("origin").and_then(Value::as_object) {
        None => err("no origin block".into()),
        Some(o) => {
            if o.keys().any(|k| !ORIGIN_KEYS.contains(&k.as_str())) || !o["name"].is_string() {
                err(format!("origin {o:?}: name required, keys {ORIGIN_KEYS:?}"));
            }
        }
    }
    if let Some(cat) = text("entity_category") {
        // Sensors cannot be `config` entities.
        if cat != "diagnostic" {
            err(format!(
                "entity_category {cat:?} (sensors: diagnostic only)"
            ));
        }
    }
    let class = text("device_class");
    let unit = text("unit_of_measurement");
    if component == "sensor" {
        match text("state_class") {
            Some(s) if STATE_CLASSES.contains(&s) => {}
            s => err(format!("state_class {s:?}")),
        }
        if let Some(cls) = class {
            match SENSOR_CLASS_UNITS.iter().find(|(n, _)| *n == cls) {
                None => err(format!("sensor device_class {cls:?} unknown")),
                Some((_, units)) => {
                    if !unit.is_some_and(|u| units.contains(&u)) {
                        err(format!("device_class {cls} takes {units:?}, not {unit:?}"));
                    }
                }
            }
        }
        if let Some(p) = c.get("suggested_display_precision") {
            if !p.is_u64() {
                err("suggested_display_precision not a non-negative integer".into());
            }
        }
    } else if let Some(cls) = class {
        if !BINARY_SENSOR_CLASSES.contains(&cls) {
            err(format!("binary_sensor device_class {cls:?} unknown"));
        }
    }
    // Availability: the worker's status, whose retained payload is one of
    // the two it names — except on the connectivity sensor, which is that
    // status itself (off, not unavailable, while the worker is away).
    let connectivity = class == Some("connectivity");
    if connectivity {
        if c.contains_key("availability_topic") {
            err("the connectivity sensor must not be unavailable when offline".into());
        }
    } else {
        match text("availability_topic") {
            None => err("no availability_topic".into()),
            Some(t) => {
                let (on, off) = (text("payload_available"), text("payload_not_available"));
                if on != Some("online") || off != Some("offline") {
                    err(format!("availability payloads {on:?}/{off:?}"));
                }
                let got = retained
                    .get(t)
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                if got.as_deref() != on {
                    err(format!("availability topic {t} holds {got:?}"));
                }
            }
        }
    }
    // State: the retained payload renders through the template.
    let Some(st) = text("state_topic") else {
        return errs;
    };
    let Some(payload) = retained.get(st).filter(|p| !p.is_empty()) else {
        err(format!("no retained payload on state_topic {st}"));
        return errs;
    };
    let raw = String::from_utf8_lossy(payload).into_owned();
    let state = match text("value_template") {
        None => Ok(raw.clone()),
        Some(t) => serde_json::from_str::<Value>(&raw)
            .map_err(|e| format!("state payload is not JSON: {e}"))
            .and_then(|json| render(t, &json)),
    };
    match state {
        Err(e) => err(format!("value_template: {e}")),
        Ok(s) if component == "sensor" => {
            if unit.is_some() && s.parse::<f64>().is_err() {
                err(format!(
                    "rendered {s:?}: a sensor with a unit needs a number"
                ));
            }
        }
        Ok(s) => {
            let (on, off) = (text("payload_on"), text("payload_off"));
            if on.is_none() || off.is_none() || (Some(s.as_str()) != on && Some(s.as_str()) != off)
            {
                err(format!("rendered {s:?}, payloads {on:?}/{off:?}"));
            }
        }
    }
    errs
}

// ---------------------------------------------------------------------------
// The Jinja subset the templates use: `{{ expr }}` with numbers, strings,
// None/True/False, `value_json.field`, + - * /, parentheses, filters
// (`| round(n)`, binding tighter than arithmetic as in Jinja) and
// `a if cond else b`. A missing field is an error (Home Assistant would
// render it as nothing).

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Ident(String),
    Sym(char),
}

#[derive(Debug, Clone, PartialEq)]
enum V {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

impl V {
    fn truthy(&self) -> bool {
        match self {
            V::Null => false,
            V::Bool(b) => *b,
            V::Num(n) => *n != 0.0,
            V::Str(s) => !s.is_empty(),
        }
    }
    fn num(&self) -> Result<f64, String> {
        match self {
            V::Num(n) => Ok(*n),
            other => Err(format!("{other:?} is not a number")),
        }
    }
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let ch = b[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == '.') {
                i += 1;
            }
            let t: String = b[start..i].iter().collect();
            out.push(Tok::Num(t.parse().map_err(|_| format!("number {t:?}"))?));
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(b[start..i].iter().collect()));
        } else if ch == '\'' || ch == '"' {
            let end = b[i + 1..]
                .iter()
                .position(|&c| c == ch)
                .ok_or("unterminated string")?;
            out.push(Tok::Str(b[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
        } else if "+-*/().|,".contains(ch) {
            out.push(Tok::Sym(ch));
            i += 1;
        } else {
            return Err(format!("unexpected {ch:?}"));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    at: usize,
    json: &'a Value,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }
    fn eat_sym(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn eat_word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(i)) if i == w) {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn expr(&mut self) -> Result<V, String> {
        let then = self.arith()?;
        if self.eat_word("if") {
            let cond = self.arith()?;
            if !self.eat_word("else") {
                return Err("`if` without `else`".into());
            }
            let otherwise = self.expr()?;
            return Ok(if cond.truthy() { then } else { otherwise });
        }
        Ok(then)
    }
    fn arith(&mut self) -> Result<V, String> {
        let mut v = self.term()?;
        loop {
            if self.eat_sym('+') {
                v = V::Num(v.num()? + self.term()?.num()?);
            } else if self.eat_sym('-') {
                v = V::Num(v.num()? - self.term()?.num()?);
            } else {
                return Ok(v);
            }
        }
    }
    fn term(&mut self) -> Result<V, String> {
        let mut v = self.filtered()?;
        loop {
            if self.eat_sym('*') {
                v = V::Num(v.num()? * self.filtered()?.num()?);
            } else if self.eat_sym('/') {
                let d = self.filtered()?.num()?;
                if d == 0.0 {
                    return Err("division by zero".into());
                }
                v = V::Num(v.num()? / d);
            } else {
                return Ok(v);
            }
        }
    }
    fn filtered(&mut self) -> Result<V, String> {
        let mut v = self.primary()?;
        while self.eat_sym('|') {
            let Some(Tok::Ident(name)) = self.peek().cloned() else {
                return Err("filter name expected".into());
            };
            self.at += 1;
            let mut args = Vec::new();
            if self.eat_sym('(') {
                while !self.eat_sym(')') {
                    args.push(self.expr()?);
                    self.eat_sym(',');
                }
            }
            v = match (name.as_str(), args.as_slice()) {
                ("round", [V::Num(n)]) => {
                    let k = 10f64.powf(n.trunc());
                    V::Num((v.num()? * k).round() / k)
                }
                ("round", []) => V::Num(v.num()?.round()),
                ("float", []) => V::Num(v.num()?),
                other => return Err(format!("filter {other:?} not in the subset")),
            };
        }
        Ok(v)
    }
    fn primary(&mut self) -> Result<V, String> {
        let t = self.peek().cloned().ok_or("unexpected end")?;
        self.at += 1;
        match t {
            Tok::Num(n) => Ok(V::Num(n)),
            Tok::Str(s) => Ok(V::Str(s)),
            Tok::Sym('(') => {
                let v = self.expr()?;
                if !self.eat_sym(')') {
                    return Err("`)` expected".into());
                }
                Ok(v)
            }
            Tok::Ident(i) if i == "None" || i == "none" => Ok(V::Null),
            Tok::Ident(i) if i == "True" || i == "true" => Ok(V::Bool(true)),
            Tok::Ident(i) if i == "False" || i == "false" => Ok(V::Bool(false)),
            Tok::Ident(i) if i == "value_json" => {
                let mut cur = self.json.clone();
                while self.eat_sym('.') {
                    let Some(Tok::Ident(field)) = self.peek().cloned() else {
                        return Err("field name expected".into());
                    };
                    self.at += 1;
                    cur = cur
                        .get(&field)
                        .cloned()
                        .ok_or_else(|| format!("value_json has no field {field:?}"))?;
                }
                Ok(match cur {
                    Value::Null => V::Null,
                    Value::Bool(b) => V::Bool(b),
                    Value::Number(n) => V::Num(n.as_f64().unwrap_or(f64::NAN)),
                    Value::String(s) => V::Str(s),
                    other => return Err(format!("{other} is not a scalar")),
                })
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

/// Renders a one-expression template as Home Assistant would (None as
/// `None`, which its MQTT sensor reads as unknown).
fn render(template: &str, json: &Value) -> Result<String, String> {
    let inner = template
        .trim()
        .strip_prefix("{{")
        .and_then(|t| t.strip_suffix("}}"))
        .ok_or("not a single {{ expression }}")?;
    let mut p = Parser {
        toks: lex(inner)?,
        at: 0,
        json,
    };
    let v = p.expr()?;
    if p.at != p.toks.len() {
        return Err(format!("trailing tokens {:?}", &p.toks[p.at..]));
    }
    Ok(match v {
        V::Null => "None".into(),
        V::Bool(b) => if b { "True" } else { "False" }.into(),
        V::Num(n) => n.to_string(),
        V::Str(s) => s,
    })
}

#[test]
fn the_template_subset_follows_jinja_precedence() {
    let j = serde_json::json!({"a": 10, "b": 64, "z": 0, "n": null, "t": true});
    let r = |t: &str| render(t, &j);
    assert_eq!(
        r("{{ (value_json.a * 100 / value_json.b) | round(1) }}").unwrap(),
        "15.6"
    );
    // A filter binds to its operand, not to the whole product.
    assert_eq!(r("{{ value_json.a * 2.26 | round(1) }}").unwrap(), "23");
    assert_eq!(r("{{ 1 if value_json.z else None }}").unwrap(), "None");
    assert_eq!(r("{{ value_json.n }}").unwrap(), "None");
    assert_eq!(r("{{ 'ON' if value_json.t else 'OFF' }}").unwrap(), "ON");
    assert!(r("{{ value_json.missing }}").is_err());
    assert!(r("{{ value_json.a / value_json.z }}").is_err());
}

// ---------------------------------------------------------------------------

const PREFIX: &str = "homeassistant";

/// The configs (non-empty retained payloads) under `prefix` whose topic
/// names worker `id`.
fn configs_of(seen: &BTreeMap<String, Vec<u8>>, prefix: &str, id: &str) -> BTreeMap<String, Value> {
    let node = format!("/aerekos_{id}/");
    seen.iter()
        .filter(|(t, p)| t.starts_with(&format!("{prefix}/")) && t.contains(&node) && !p.is_empty())
        .filter_map(|(t, p)| Some((t.clone(), serde_json::from_slice(p).ok()?)))
        .collect()
}

#[test]
fn every_worker_is_a_device_whose_configs_follow_the_discovery_schema_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start_with(conductor::Config {
        homeassistant_discovery: true,
        ..test_config(dir.path())
    });
    let (_obs, seen) = observer(
        &c,
        "ha-explorer",
        &[
            &format!("{PREFIX}/#"),
            "aerekos/v1/+/status",
            "aerekos/v1/+/json/+",
        ],
    );
    let (pi, _w1) = start_worker(&c, "pi-kitchen", 1234, true);
    let (other, _w2) = start_worker(&c, "pi-garage", 5000, false);

    // The Pi: 8 sensors, online, and under-voltage and throttling once its
    // board came; the other: no board sensors. Wait for the board's device
    // (serial number) and every state.
    let ready = wait_for("discovery configs and their states", T, || {
        let s = snapshot(&seen);
        let a = configs_of(&s, PREFIX, &pi.id);
        let b = configs_of(&s, PREFIX, &other.id);
        let board_in = a
            .values()
            .all(|v| v["device"].get("serial_number").is_some());
        let states = [
            topic(&pi.id, TopicKind::JsonMetrics),
            topic(&pi.id, TopicKind::JsonBoard),
            topic(&other.id, TopicKind::JsonMetrics),
            topic(&pi.id, TopicKind::Status),
            topic(&other.id, TopicKind::Status),
        ]
        .iter()
        .all(|t| s.contains_key(t));
        (a.len() == 11 && b.len() == 9 && board_in && states).then_some(s)
    });

    let mut unique_ids = BTreeSet::new();
    let mut entity_ids = BTreeSet::new();
    let mut errors = Vec::new();
    let mut rendered = BTreeMap::new();
    for (id, hostname) in [(&pi.id, "pi-kitchen"), (&other.id, "pi-garage")] {
        let configs = configs_of(&ready, PREFIX, id);
        let device = &configs.values().next().expect("configs")["device"];
        for (t, cfg) in &configs {
            errors.extend(violations(PREFIX, t, cfg, &ready));
            if !unique_ids.insert(cfg["unique_id"].to_string()) {
                errors.push(format!("{t}: unique_id {} repeated", cfg["unique_id"]));
            }
            if !entity_ids.insert(cfg["default_entity_id"].to_string()) {
                errors.push(format!("{t}: default_entity_id repeated"));
            }
            if &cfg["device"] != device {
                errors.push(format!("{t}: another device block than its siblings'"));
            }
            // The state each config's template gives, to check the values.
            let object = t.rsplit('/').nth(1).unwrap_or_default();
            let st = cfg["state_topic"].as_str().unwrap_or_default();
            let state = match cfg["value_template"].as_str() {
                Some(tpl) => json_of(&ready, st)
                    .ok_or("no state".to_string())
                    .and_then(|j| render(tpl, &j)),
                None => Ok(String::from_utf8_lossy(&ready[st]).into_owned()),
            };
            rendered.insert((id.clone(), object.to_string()), state);
        }
        assert_eq!(
            device["identifiers"],
            serde_json::json!([format!("aerekos_{id}")])
        );
        assert_eq!(device["name"], hostname);
        assert_eq!(device["model"], "Raspberry Pi 5 Model B Rev 1.0");
        assert_eq!(device["sw_version"], "0.1.0");
        assert_eq!(device["manufacturer"], "Raspberry Pi Ltd");
        let hw = device["hw_version"].as_str().unwrap_or_default();
        assert!(hw.starts_with("aarch64"), "{hw}");
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let pi_device = &configs_of(&ready, PREFIX, &pi.id)
        [&format!("{PREFIX}/sensor/aerekos_{}/cpu/config", pi.id)]["device"];
    assert_eq!(pi_device["hw_version"], "aarch64 rev 9000c1");
    assert_eq!(pi_device["serial_number"], "00000000a1b2c3d4");

    let state = |id: &str, object: &str| -> String {
        match rendered.get(&(id.to_string(), object.to_string())) {
            Some(Ok(s)) => s.clone(),
            other => panic!("{id} {object}: {other:?}"),
        }
    };
    let num = |id: &str, object: &str| -> f64 { state(id, object).parse().unwrap() };
    assert_eq!(num(&pi.id, "cpu"), 12.34);
    assert_eq!(num(&other.id, "cpu"), 50.0);
    assert_eq!(num(&pi.id, "memory"), 25.0); // 2 of 8 GiB
    assert_eq!(num(&pi.id, "disk"), 15.6); // 10 of 64 GiB
    assert_eq!(num(&pi.id, "temperature"), 51.5);
    assert_eq!(num(&pi.id, "load1"), 1.5);
    assert_eq!(num(&pi.id, "load15"), 0.5);
    assert_eq!(num(&pi.id, "uptime"), 1234.0);
    assert_eq!(state(&pi.id, "online"), "online");
    // 0x50005: under-voltage now and since boot, throttled now.
    assert_eq!(state(&pi.id, "under_voltage"), "ON");
    assert_eq!(state(&pi.id, "throttling"), "ON");

    // Revoked and deleted workers leave Home Assistant: an empty retained
    // payload on each of their config topics.
    let (code, v) = call(
        &c,
        "POST",
        &format!("/api/v1/workers/{}/revoke", pi.id),
        None,
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(&c, "DELETE", &format!("/api/v1/workers/{}", other.id), None);
    assert_eq!(code, 204, "{v}");
    let announced: Vec<String> = ready
        .keys()
        .filter(|t| t.starts_with(&format!("{PREFIX}/")))
        .cloned()
        .collect();
    assert_eq!(announced.len(), 20);
    wait_for("every config topic emptied", T, || {
        let s = snapshot(&seen);
        announced
            .iter()
            .all(|t| s.get(t).is_some_and(Vec::is_empty))
            .then_some(())
    });
    // Nothing is retained under the prefix any more: a new subscriber
    // (Home Assistant starting now) gets nothing.
    let (_late, late_seen) = observer(
        &c,
        "ha-late",
        &[&format!("{PREFIX}/#"), "aerekos/v1/+/status"],
    );
    wait_for("the late subscriber's retained status", T, || {
        snapshot(&late_seen)
            .contains_key(&topic(&pi.id, TopicKind::Status))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let late: Vec<String> = snapshot(&late_seen)
        .into_keys()
        .filter(|t| t.starts_with(&format!("{PREFIX}/")))
        .collect();
    assert!(late.is_empty(), "still retained: {late:?}");
    c.stop();
}

#[test]
fn nothing_is_published_without_the_flag_and_a_restart_with_it_announces_known_workers() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let (_obs, seen) = observer(&c, "plain-explorer", &["#"]);
    let (kept, w1) = start_worker(&c, "pi-kept", 1000, true);
    let (gone, _w2) = start_worker(&c, "pi-gone", 1000, false);
    wait_for("the mirror", T, || {
        let s = snapshot(&seen);
        (s.contains_key(&topic(&kept.id, TopicKind::JsonBoard))
            && s.contains_key(&topic(&gone.id, TopicKind::JsonMetrics)))
        .then_some(())
    });
    let (code, v) = call(
        &c,
        "POST",
        &format!("/api/v1/workers/{}/revoke", gone.id),
        None,
    );
    assert_eq!(code, 200, "{v}");
    wait_for("the revoked worker's offline status", T, || {
        (snapshot(&seen)
            .get(&topic(&gone.id, TopicKind::Status))
            .map(Vec::as_slice)
            == Some(b"offline".as_slice()))
        .then_some(())
    });
    let ha: Vec<String> = snapshot(&seen)
        .into_keys()
        .filter(|t| t.starts_with("homeassistant/"))
        .collect();
    assert!(ha.is_empty(), "published without the flag: {ha:?}");
    drop(w1);
    c.stop();

    // On again, under another prefix (environment, as a Pi's service file
    // would set it): the workers in the store are announced at start, the
    // revoked one is not, and no worker had to reconnect.
    let mut env = std::collections::HashMap::new();
    env.insert(
        "AEREKOS_HOMEASSISTANT_DISCOVERY".to_string(),
        "1".to_string(),
    );
    env.insert(
        "AEREKOS_HOMEASSISTANT_PREFIX".to_string(),
        "ha/".to_string(),
    );
    let flags = conductor::config::Overrides::default();
    let from_env = conductor::Config::resolve(None, &env, &flags).unwrap();
    let c = Conductor::start_with(conductor::Config {
        homeassistant_discovery: from_env.homeassistant_discovery,
        homeassistant_prefix: from_env.homeassistant_prefix,
        ..test_config(dir.path())
    });
    let (_obs, seen) = observer(&c, "ha-explorer", &["ha/#", "homeassistant/#"]);
    let got = wait_for("the known worker's configs", T, || {
        let s = snapshot(&seen);
        let a = configs_of(&s, "ha", &kept.id);
        (a.len() == 11).then_some(s)
    });
    assert!(configs_of(&got, "ha", &gone.id).is_empty());
    assert!(got.keys().all(|t| t.starts_with("ha/")), "{:?}", got.keys());
    let cpu = json_of(&got, &format!("ha/sensor/aerekos_{}/cpu/config", kept.id))
        .expect("the cpu config");
    assert_eq!(cpu["device"]["name"], "pi-kept");
    assert_eq!(cpu["device"]["model"], "Raspberry Pi 5 Model B Rev 1.0");
    c.stop();
}

#[test]
fn the_schema_check_catches_what_home_assistant_would_reject() {
    let birth = protocol::examples::birth();
    let board = protocol::examples::board();
    let id = "w-000000000001";
    let all = conductor::homeassistant::configs(PREFIX, id, "pi", Some(&birth), Some(&board));
    let metrics = conductor::mirror::metrics(&protocol::examples::metrics());
    let mut retained = BTreeMap::new();
    retained.insert(
        topic(id, TopicKind::JsonMetrics),
        metrics.to_string().into_bytes(),
    );
    retained.insert(
        topic(id, TopicKind::JsonBoard),
        conductor::mirror::board(&board).to_string().into_bytes(),
    );
    retained.insert(topic(id, TopicKind::Status), b"online".to_vec());
    // As built, every config passes.
    for (t, cfg) in &all {
        let v = violations(PREFIX, t, cfg, &retained);
        assert!(v.is_empty(), "{v:?}");
    }
    let (temp_topic, temp) = all
        .iter()
        .find(|(t, _)| t.ends_with("/temperature/config"))
        .expect("a temperature sensor");
    type Mutation = dyn Fn(&mut serde_json::Map<String, Value>);
    let broken = |f: &Mutation| {
        let mut c = temp.clone();
        if let Some(m) = c.as_object_mut() {
            f(m);
        }
        violations(PREFIX, temp_topic, &c, &retained)
    };
    let cases: [(&str, &Mutation); 8] = [
        ("takes [\"°C\"", &|m| {
            m.insert("unit_of_measurement".into(), "C".into());
        }),
        ("not a sensor discovery key", &|m| {
            m.insert("payload_on".into(), "ON".into());
        }),
        ("unique_id", &|m| {
            m.remove("unique_id");
        }),
        ("entity_category", &|m| {
            m.insert("entity_category".into(), "config".into());
        }),
        ("availability_topic", &|m| {
            m.remove("availability_topic");
        }),
        ("no field", &|m| {
            m.insert("value_template".into(), "{{ value_json.celsius }}".into());
        }),
        ("state_class", &|m| {
            m.insert("state_class".into(), "gauge".into());
        }),
        ("device_class", &|m| {
            m.insert("device_class".into(), "cpu".into());
        }),
    ];
    for (what, f) in cases {
        let v = broken(f);
        assert!(v.iter().any(|e| e.contains(what)), "{what}: {v:?}");
    }
    // No retained state, or the worker's status not online: refused too.
    let mut empty = retained.clone();
    empty.remove(&topic(id, TopicKind::JsonMetrics));
    assert!(!violations(PREFIX, temp_topic, temp, &empty).is_empty());
    let mut offline = retained.clone();
    offline.insert(topic(id, TopicKind::Status), b"offline".to_vec());
    assert!(!violations(PREFIX, temp_topic, temp, &offline).is_empty());
}
