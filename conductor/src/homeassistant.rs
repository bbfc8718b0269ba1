//! Home Assistant MQTT discovery (opt-in: `--homeassistant-discovery`).
//!
//! Every worker becomes a Home Assistant *device* (the hostname; model,
//! arch, board revision and agent version from its birth and board) whose
//! entities read what the conductor already publishes: the retained JSON
//! mirror ([`crate::mirror`]: `json/metrics`, `json/board`) through a
//! `value_template`, and the worker's own retained `status` text
//! (`online` / `offline`, its last will) as the availability of every
//! entity and as the state of the `online` connectivity sensor. Nothing
//! new is published about the worker: only the configs that point at it.
//!
//! Configs are retained, QoS 1, on
//! `<prefix>/<component>/aerekos_<worker>/<object>/config` ([`ENTITIES`]),
//! published when a birth is accepted, when a board frame changes (the
//! model, and the under-voltage and throttling sensors once the board
//! reports its throttling bits), and for every known worker at start
//! ([`run`]). Revoking or deleting a worker publishes an empty retained
//! payload on each of its config topics ([`remove`]), which is how Home
//! Assistant removes a discovered entity. The payloads follow the MQTT
//! discovery documentation: `unique_id` (`aerekos_<worker>_<object>`),
//! `default_entity_id` (`<component>.aerekos_<worker>_<object>`, dashes as
//! underscores), a `device` block shared by a worker's entities, an
//! `origin` block; `conductor/tests/homeassistant.rs` checks them.

use protocol::topic::{topic, TopicKind, STATUS_OFFLINE, STATUS_ONLINE};
use protocol::{Birth, Board};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::state::{Shared, WorkerEntry};

/// The discovery prefix Home Assistant listens on by default.
pub use crate::config::HOMEASSISTANT_PREFIX as DEFAULT_PREFIX;

/// A Home Assistant entity platform aerekos announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `sensor`: a number with a unit.
    Sensor,
    /// `binary_sensor`: on / off.
    BinarySensor,
}

impl Component {
    /// The platform's name in the discovery topic and the entity id.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Sensor => "sensor",
            Component::BinarySensor => "binary_sensor",
        }
    }
}

/// Where an entity's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The retained `json/metrics` mirror.
    Metrics,
    /// The retained `json/board` mirror; announced only once the board
    /// reports its throttling bits.
    Board,
    /// The worker's retained `status` text.
    Status,
}

impl Source {
    /// The aerekos topic kind the entity's `state_topic` is.
    pub fn kind(self) -> TopicKind {
        match self {
            Source::Metrics => TopicKind::JsonMetrics,
            Source::Board => TopicKind::JsonBoard,
            Source::Status => TopicKind::Status,
        }
    }
}

/// One entity every worker gets.
#[derive(Debug, Clone, Copy)]
pub struct Entity {
    /// The platform.
    pub component: Component,
    /// The object id: the discovery topic's last segment and the
    /// `unique_id`'s suffix.
    pub object: &'static str,
    /// The entity's name (Home Assistant shows it after the device's).
    pub name: &'static str,
    /// Where its state comes from.
    pub source: Source,
    /// How the state is read from the source's payload (`None`: the
    /// payload as it is).
    pub value_template: Option<&'static str>,
    /// `unit_of_measurement`.
    pub unit: Option<&'static str>,
    /// `device_class`.
    pub device_class: Option<&'static str>,
    /// `entity_category: diagnostic`.
    pub diagnostic: bool,
    /// `suggested_display_precision`.
    pub precision: Option<u8>,
    /// `icon` (where no device class gives one).
    pub icon: Option<&'static str>,
}

const fn sensor(object: &'static str, name: &'static str, template: &'static str) -> Entity {
    Entity {
        component: Component::Sensor,
        object,
        name,
        source: Source::Metrics,
        value_template: Some(template),
        unit: None,
        device_class: None,
        diagnostic: false,
        precision: None,
        icon: None,
    }
}

/// Every entity, in the order they are published.
pub const ENTITIES: [Entity; 11] = [
    Entity {
        unit: Some("%"),
        precision: Some(1),
        icon: Some("mdi:cpu-64-bit"),
        ..sensor("cpu", "CPU", "{{ value_json.cpu_percent }}")
    },
    Entity {
        unit: Some("%"),
        precision: Some(1),
        icon: Some("mdi:memory"),
        ..sensor(
            "memory",
            "Memory",
            "{{ (value_json.memory_used_bytes * 100 / value_json.memory_total_bytes) | round(1) \
             if value_json.memory_total_bytes else None }}",
        )
    },
    Entity {
        unit: Some("%"),
        precision: Some(1),
        icon: Some("mdi:harddisk"),
        ..sensor(
            "disk",
            "Disk",
            "{{ (value_json.disk_used_bytes * 100 / value_json.disk_total_bytes) | round(1) \
             if value_json.disk_total_bytes else None }}",
        )
    },
    Entity {
        unit: Some("°C"),
        device_class: Some("temperature"),
        precision: Some(1),
        ..sensor(
            "temperature",
            "SoC temperature",
            "{{ value_json.temp_celsius }}",
        )
    },
    Entity {
        precision: Some(2),
        icon: Some("mdi:gauge"),
        ..sensor("load1", "Load (1 min)", "{{ value_json.load1 }}")
    },
    Entity {
        precision: Some(2),
        icon: Some("mdi:gauge"),
        ..sensor("load5", "Load (5 min)", "{{ value_json.load5 }}")
    },
    Entity {
        precision: Some(2),
        icon: Some("mdi:gauge"),
        ..sensor("load15", "Load (15 min)", "{{ value_json.load15 }}")
    },
    Entity {
        unit: Some("s"),
        device_class: Some("duration"),
        diagnostic: true,
        precision: Some(0),
        ..sensor("uptime", "Uptime", "{{ value_json.uptime_seconds }}")
    },
    Entity {
        component: Component::BinarySensor,
        object: "online",
        name: "Online",
        source: Source::Status,
        value_template: None,
        unit: None,
        device_class: Some("connectivity"),
        diagnostic: true,
        precision: None,
        icon: None,
    },
    Entity {
        component: Component::BinarySensor,
        object: "under_voltage",
        name: "Under-voltage",
        source: Source::Board,
        value_template: Some("{{ 'ON' if value_json.under_voltage else 'OFF' }}"),
        unit: None,
        device_class: Some("problem"),
        diagnostic: false,
        precision: None,
        icon: None,
    },
    Entity {
        component: Component::BinarySensor,
        object: "throttling",
        name: "Throttling",
        source: Source::Board,
        value_template: Some("{{ 'ON' if value_json.throttling else 'OFF' }}"),
        unit: None,
        device_class: Some("problem"),
        diagnostic: false,
        precision: None,
        icon: None,
    },
];

/// `prefix` as topics use it: surrounding whitespace and trailing `/` cut.
pub fn normalize_prefix(prefix: &str) -> &str {
    prefix.trim().trim_end_matches('/')
}

/// The discovery node id of `worker_id` (`[a-z0-9-]` already).
pub fn node_id(worker_id: &str) -> String {
    format!("aerekos_{worker_id}")
}

/// `<prefix>/<component>/aerekos_<worker>/<object>/config`.
pub fn config_topic(prefix: &str, worker_id: &str, e: &Entity) -> String {
    format!(
        "{}/{}/{}/{}/config",
        normalize_prefix(prefix),
        e.component.as_str(),
        node_id(worker_id),
        e.object
    )
}

/// Every config topic a worker can have (what [`remove`] clears).
pub fn config_topics(prefix: &str, worker_id: &str) -> Vec<String> {
    ENTITIES
        .iter()
        .map(|e| config_topic(prefix, worker_id, e))
        .collect()
}

/// The `device` block of a worker's entities.
pub fn device(
    worker_id: &str,
    hostname: &str,
    birth: Option<&Birth>,
    board: Option<&Board>,
) -> Value {
    let nonempty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    let name = nonempty(hostname)
        .or_else(|| birth.and_then(|b| nonempty(&b.hostname)))
        .unwrap_or_else(|| worker_id.to_string());
    let board_model = board
        .and_then(|b| b.revision)
        .and_then(protocol::board::revision_model)
        .map(|m| format!("Raspberry Pi {m}"));
    let model = birth
        .and_then(|b| nonempty(&b.device_model))
        .or(board_model)
        .or_else(|| birth.and_then(|b| nonempty(&b.cpu_model)));
    let is_pi = board.is_some() || model.as_deref().is_some_and(|m| m.contains("Raspberry Pi"));
    let arch = birth.and_then(|b| nonempty(&b.arch));
    let revision = board.and_then(|b| b.revision).map(|r| format!("rev {r:x}"));
    let hw = match (arch, revision) {
        (Some(a), Some(r)) => Some(format!("{a} {r}")),
        (a, r) => a.or(r),
    };
    let mut d = Map::new();
    d.insert("identifiers".into(), json!([node_id(worker_id)]));
    d.insert("name".into(), json!(name));
    if let Some(m) = model {
        d.insert("model".into(), json!(m));
    }
    if is_pi {
        d.insert("manufacturer".into(), json!("Raspberry Pi Ltd"));
    }
    if let Some(v) = birth.and_then(|b| nonempty(&b.agent_version)) {
        d.insert("sw_version".into(), json!(v));
    }
    if let Some(h) = hw {
        d.insert("hw_version".into(), json!(h));
    }
    if let Some(s) = board.and_then(|b| nonempty(&b.serial)) {
        d.insert("serial_number".into(), json!(s));
    }
    Value::Object(d)
}

/// The config of entity `e` of `worker_id` with `device`.
pub fn entity_config(worker_id: &str, e: &Entity, device: &Value) -> Value {
    let status = topic(worker_id, TopicKind::Status);
    let slug = format!("aerekos_{}_{}", worker_id.replace('-', "_"), e.object);
    let mut c = Map::new();
    c.insert("name".into(), json!(e.name));
    c.insert(
        "unique_id".into(),
        json!(format!("{}_{}", node_id(worker_id), e.object)),
    );
    c.insert(
        "default_entity_id".into(),
        json!(format!("{}.{slug}", e.component.as_str())),
    );
    c.insert(
        "state_topic".into(),
        json!(topic(worker_id, e.source.kind())),
    );
    if let Some(t) = e.value_template {
        c.insert("value_template".into(), json!(t));
    }
    match e.component {
        Component::Sensor => {
            c.insert("state_class".into(), json!("measurement"));
        }
        Component::BinarySensor => {
            let (on, off) = if e.source == Source::Status {
                (STATUS_ONLINE, STATUS_OFFLINE)
            } else {
                ("ON", "OFF")
            };
            c.insert("payload_on".into(), json!(on));
            c.insert("payload_off".into(), json!(off));
        }
    }
    if let Some(u) = e.unit {
        c.insert("unit_of_measurement".into(), json!(u));
    }
    if let Some(d) = e.device_class {
        c.insert("device_class".into(), json!(d));
    }
    if let Some(p) = e.precision {
        c.insert("suggested_display_precision".into(), json!(p));
    }
    if let Some(i) = e.icon {
        c.insert("icon".into(), json!(i));
    }
    if e.diagnostic {
        c.insert("entity_category".into(), json!("diagnostic"));
    }
    // The connectivity sensor is the status itself: it shows `off` while
    // the worker is away rather than going unavailable with the rest.
    if e.source != Source::Status {
        c.insert("availability_topic".into(), json!(status));
        c.insert("payload_available".into(), json!(STATUS_ONLINE));
        c.insert("payload_not_available".into(), json!(STATUS_OFFLINE));
    }
    c.insert("device".into(), device.clone());
    c.insert(
        "origin".into(),
        json!({"name": "aerekos", "sw_version": env!("CARGO_PKG_VERSION")}),
    );
    Value::Object(c)
}

/// Every config to publish for a worker: (topic, payload). The board's
/// entities only once it reports its throttling bits.
pub fn configs(
    prefix: &str,
    worker_id: &str,
    hostname: &str,
    birth: Option<&Birth>,
    board: Option<&Board>,
) -> Vec<(String, Value)> {
    let device = device(worker_id, hostname, birth, board);
    let throttling_known = board.is_some_and(|b| b.throttled.is_some());
    ENTITIES
        .iter()
        .filter(|e| e.source != Source::Board || throttling_known)
        .map(|e| {
            (
                config_topic(prefix, worker_id, e),
                entity_config(worker_id, e, &device),
            )
        })
        .collect()
}

/// The configs of worker `w` when discovery is on and it is not revoked
/// (called under the workers lock; publish them with [`publish`] after).
pub fn configs_for(shared: &Shared, w: &WorkerEntry) -> Option<Vec<(String, Value)>> {
    if !shared.config.homeassistant_discovery || w.revoked {
        return None;
    }
    Some(configs(
        &shared.config.homeassistant_prefix,
        &w.id,
        &w.hostname,
        w.inventory.as_ref(),
        w.board.as_ref(),
    ))
}

/// Publishes `configs` (retained, QoS 1) without waiting: a full MQTT
/// queue drops them (counted with the mirror's drops; the next birth
/// publishes them again).
pub fn publish(shared: &Shared, client: &AsyncClient, configs: Option<Vec<(String, Value)>>) {
    for (t, payload) in configs.into_iter().flatten() {
        if client
            .try_publish(t, QoS::AtLeastOnce, true, payload.to_string())
            .is_err()
        {
            shared
                .counters
                .mirror_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Removes worker `worker_id`'s entities from Home Assistant (revoked or
/// deleted): an empty retained payload on each of its config topics.
pub fn remove(shared: &Shared, client: &AsyncClient, worker_id: &str) {
    if !shared.config.homeassistant_discovery {
        return;
    }
    for t in config_topics(&shared.config.homeassistant_prefix, worker_id) {
        if let Err(e) = client.try_publish(t, QoS::AtLeastOnce, true, Vec::<u8>::new()) {
            warn!(
                worker_id,
                "cannot remove its Home Assistant discovery config: {e}"
            );
        }
    }
    debug!(worker_id, "Home Assistant discovery configs removed");
}

/// At start: publishes the configs of every known, not revoked worker
/// (an external broker may have lost them, or discovery was just turned
/// on), waiting for room in the MQTT queue; returns early on `stop`.
pub async fn run(
    shared: std::sync::Arc<Shared>,
    client: AsyncClient,
    mut stop: watch::Receiver<bool>,
) {
    if !shared.config.homeassistant_discovery {
        return;
    }
    let ids: Vec<String> = shared.workers().keys().cloned().collect();
    let mut announced = 0usize;
    for id in ids {
        let configs = {
            let workers = shared.workers();
            workers.get(&id).and_then(|w| configs_for(&shared, w))
        };
        let Some(configs) = configs else { continue };
        for (t, payload) in configs {
            // The MQTT loop stops polling at `stop`: never wait on its
            // queue past it.
            tokio::select! {
                r = client.publish(t, QoS::AtLeastOnce, true, payload.to_string()) => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = stop.changed() => return,
            }
        }
        announced += 1;
    }
    if announced > 0 {
        info!(
            workers = announced,
            prefix = normalize_prefix(&shared.config.homeassistant_prefix),
            "Home Assistant discovery configs published"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain_topic_levels() {
        use crate::config::{Config, Overrides};
        assert_eq!(normalize_prefix("homeassistant/"), "homeassistant");
        let check = |p: &str| {
            let mut env = std::collections::HashMap::new();
            env.insert("AEREKOS_HOMEASSISTANT_PREFIX".to_string(), p.to_string());
            Config::resolve(None, &env, &Overrides::default()).map(|c| c.homeassistant_prefix)
        };
        assert!(check("home/ha/").is_ok_and(|p| normalize_prefix(&p) == "home/ha"));
        for bad in ["/", "ha/+", "ha/#", "$SYS", "a//b", "/ha", "aerekos/v1"] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_flag_and_prefix_come_from_file_env_or_flags() {
        use crate::config::{Config, Overrides};
        use std::collections::HashMap;
        let d = Config::default();
        assert!(!d.homeassistant_discovery);
        assert_eq!(d.homeassistant_prefix, DEFAULT_PREFIX);
        let file = "homeassistant_discovery = true\nhomeassistant_prefix = \"file\"";
        let mut env = HashMap::new();
        let c = Config::resolve(Some(file), &env, &Overrides::default());
        assert!(c.is_ok_and(|c| c.homeassistant_discovery && c.homeassistant_prefix == "file"));
        env.insert(
            "AEREKOS_HOMEASSISTANT_PREFIX".to_string(),
            "env/".to_string(),
        );
        let flags = Overrides {
            homeassistant_discovery: true,
            homeassistant_prefix: Some("flag".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(None, &env, &Overrides::default());
        assert!(c.is_ok_and(|c| !c.homeassistant_discovery && c.homeassistant_prefix == "env/"));
        let c = Config::resolve(None, &env, &flags);
        assert!(c.is_ok_and(|c| c.homeassistant_discovery && c.homeassistant_prefix == "flag"));
        env.insert(
            "AEREKOS_HOMEASSISTANT_PREFIX".to_string(),
            "ha/#".to_string(),
        );
        let e = Config::resolve(None, &env, &Overrides::default());
        assert!(e.is_err_and(|e| e.to_string().contains("homeassistant_prefix")));
    }

    #[test]
    fn a_pi_is_a_device_with_its_model_arch_revision_and_agent_version() {
        let birth = protocol::examples::birth();
        let board = protocol::examples::board();
        let all = configs("ha/", "w-1", "pi-kitchen", Some(&birth), Some(&board));
        assert_eq!(all.len(), ENTITIES.len());
        let topics: Vec<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
        assert!(topics.contains(&"ha/sensor/aerekos_w-1/cpu/config"));
        assert!(topics.contains(&"ha/binary_sensor/aerekos_w-1/under_voltage/config"));
        for t in &topics {
            assert!(config_topics("ha", "w-1").iter().any(|c| c == t), "{t}");
        }
        let d = &all[0].1["device"];
        assert_eq!(d["name"], "pi-kitchen");
        assert_eq!(d["identifiers"], json!(["aerekos_w-1"]));
        assert_eq!(d["sw_version"], birth.agent_version.as_str());
        assert_eq!(d["manufacturer"], "Raspberry Pi Ltd");
        let hw = d["hw_version"].as_str().unwrap_or_default();
        assert!(
            hw.starts_with(birth.arch.as_str()) && hw.ends_with("rev 9000c1"),
            "{hw}"
        );
        assert_eq!(all[0].1["default_entity_id"], "sensor.aerekos_w_1_cpu");
    }

    #[test]
    fn board_sensors_wait_for_the_throttling_bits_and_other_machines_have_no_maker() {
        let mut birth = protocol::examples::birth();
        birth.device_model = protocol::bounded("");
        birth.hostname = protocol::bounded("box");
        let mut board = protocol::examples::board();
        board.throttled = None;
        let n = configs("ha", "w-2", "", Some(&birth), Some(&board)).len();
        assert_eq!(n, ENTITIES.len() - 2);
        let none = configs("ha", "w-2", "", Some(&birth), None);
        assert_eq!(none.len(), ENTITIES.len() - 2);
        let d = &none[0].1["device"];
        assert_eq!(d["name"], "box");
        assert!(d.get("manufacturer").is_none());
        assert_eq!(d["model"], birth.cpu_model.as_str());
        let bare = device("w-3", "", None, None);
        assert_eq!(bare, json!({"identifiers": ["aerekos_w-3"], "name": "w-3"}));
    }
}
