//! The retained JSON mirror (`aerekos/v1/<id>/json/…`) for people browsing
//! the broker (MQTT Explorer and the like).
//!
//! The wire carries fixed-point integers chosen to encode small
//! (`protocol/README.md`, "Units"); the mirror turns them into plain units
//! and puts the unit in every name: `cpu_percent: 12.5` for the wire's
//! `cpu_total: 1250`, `load1: 0.42` for `load[0]: 42`, `celsius: 47.236` for
//! `millicelsius: 47236`, `_bytes`, `_bytes_per_second`, `_seconds`, `_ms`.
//! Each payload is one flat object: the envelope's `worker_id`, `seq` and the
//! conductor's `received_at_ms`, then the frame's fields.
//!
//! Only births (`json/birth`), metrics (`json/metrics`: a metrics frame, or
//! the newest sample of a metrics batch, with the batch's seq and that
//! sample's date) and a Pi's board
//! (`json/board`, also the API's `board`: [`board`]) are mirrored. The
//! JSON Schemas in `docs/mirror/<kind>.schema.json` describe every field with
//! its unit; `conductor/tests/mirror_schema.rs` checks that the payloads built
//! here from the example and the largest frames validate against them
//! (`additionalProperties: false`: a field added here needs its schema entry).

use protocol::topic::TopicKind;
use protocol::{Birth, Board, Body, Disk, Metrics};
use serde_json::{json, Value};

/// The mirror topic kind and JSON payload for an accepted frame from
/// `worker_id` with envelope `seq`, received at `received_at_ms` (the
/// conductor's clock); `None` for bodies that are not mirrored.
pub fn payload(
    worker_id: &str,
    seq: u64,
    received_at_ms: u64,
    body: &Body,
) -> Option<(TopicKind, Value)> {
    let mut received_at_ms = received_at_ms;
    let (kind, mut fields) = match body {
        Body::Birth(b) => (TopicKind::JsonBirth, birth(b)),
        Body::Metrics(m) => (TopicKind::JsonMetrics, metrics(m)),
        // Its newest sample, as a metrics frame, dated as it is stored
        // (`age_ms` before receipt); nothing for an unreadable batch.
        Body::MetricsBatch(b) => {
            let newest = b.decode().ok()?.pop()?;
            received_at_ms = received_at_ms.saturating_sub(u64::from(b.age_ms));
            (TopicKind::JsonMetrics, metrics(&newest))
        }
        Body::Board(b) => (TopicKind::JsonBoard, board(b)),
        Body::Event(_)
        | Body::Command(_)
        | Body::Reply(_)
        | Body::ServiceStatus(_)
        | Body::LogChunk(_)
        | Body::ServiceMetrics(_) => return None,
    };
    if let Value::Object(map) = &mut fields {
        map.insert("worker_id".into(), json!(worker_id));
        map.insert("seq".into(), json!(seq));
        map.insert("received_at_ms".into(), json!(received_at_ms));
    }
    Some((kind, fields))
}

/// Hundredths (the wire's percentages and load averages) as a plain number.
fn hundredths(v: u32) -> f64 {
    f64::from(v) / 100.0
}

/// Millidegrees Celsius as degrees Celsius.
fn celsius(millicelsius: i32) -> f64 {
    f64::from(millicelsius) / 1000.0
}

fn disks(disks: &[Disk]) -> Value {
    disks
        .iter()
        .map(|d| {
            json!({
                "mount": d.mount.as_str(),
                "used_bytes": d.used,
                "total_bytes": d.total,
            })
        })
        .collect()
}

/// The `json/metrics` fields of a metrics frame (`docs/mirror/metrics.schema.json`).
pub fn metrics(m: &Metrics) -> Value {
    let per_core: Vec<f64> = m
        .cpu_per_core
        .iter()
        .map(|&c| hundredths(u32::from(c)))
        .collect();
    let net: Vec<Value> = m
        .net
        .iter()
        .map(|n| {
            json!({
                "interface": n.name.as_str(),
                "rx_bytes_per_second": n.rx_bps,
                "tx_bytes_per_second": n.tx_bps,
            })
        })
        .collect();
    let temps: Vec<Value> = m
        .temperatures
        .iter()
        .map(|t| json!({"sensor": t.name.as_str(), "celsius": celsius(t.millicelsius)}))
        .collect();
    let [load1, load5, load15] = m.load;
    json!({
        "cpu_percent": hundredths(u32::from(m.cpu_total)),
        "cpu_percent_per_core": per_core,
        "load1": hundredths(load1),
        "load5": hundredths(load5),
        "load15": hundredths(load15),
        "memory_used_bytes": m.memory_used,
        "memory_available_bytes": m.memory_available,
        "memory_total_bytes": m.memory_total,
        "swap_used_bytes": m.swap_used,
        "swap_total_bytes": m.swap_total,
        "disk_used_bytes": m.disks.iter().map(|d| d.used).fold(0u64, u64::saturating_add),
        "disk_total_bytes": m.disks.iter().map(|d| d.total).fold(0u64, u64::saturating_add),
        "disks": disks(&m.disks),
        "network": net,
        "temp_celsius": m.temperatures.iter().map(|t| t.millicelsius).max().map(celsius),
        "temperatures": temps,
        "uptime_seconds": m.uptime_s,
        "processes": m.processes,
        "frames_dropped": m.dropped,
    })
}

/// The `json/board` fields of a Pi's board frame
/// (`docs/mirror/board.schema.json`), also the worker JSON's `board` in the
/// API: the throttling bits named ([`protocol::board::THROTTLE_FLAGS`]), the
/// revision code decoded. `under_voltage` is now or since boot (the supply
/// is not good enough), `throttling` is capped, throttled or at the soft
/// temperature limit now.
pub fn board(b: &Board) -> Value {
    use protocol::board::{
        revision_memory, revision_model, throttle_names, THROTTLING_NOW, UNDER_VOLTAGE_ANY,
    };
    json!({
        "throttled": b.throttled.map(|t| format!("{t:#x}")),
        "flags": b.throttled.map(|t| throttle_names(t).collect::<Vec<_>>()).unwrap_or_default(),
        "under_voltage": b.throttled.map(|t| t & UNDER_VOLTAGE_ANY != 0),
        "throttling": b.throttled.map(|t| t & THROTTLING_NOW != 0),
        "revision": b.revision.map(|r| format!("{r:x}")),
        "model": b.revision.and_then(revision_model),
        "memory_bytes": b.revision.and_then(revision_memory),
        "serial": b.serial.as_str(),
        "sd": b.sd.as_ref().map(|s| json!({
            "name": s.name.as_str(),
            "serial": s.serial.as_str(),
            "date": s.date.as_str(),
            "manfid": s.manfid,
        })),
    })
}

/// The `json/birth` fields of a birth frame (`docs/mirror/birth.schema.json`).
pub fn birth(b: &Birth) -> Value {
    let labels: Vec<Value> = b
        .labels
        .iter()
        .map(|l| json!({"key": l.key.as_str(), "value": l.value.as_str()}))
        .collect();
    json!({
        "hostname": b.hostname.as_str(),
        "os": b.os.as_str(),
        "kernel": b.kernel.as_str(),
        "arch": b.arch.as_str(),
        "cpu_model": b.cpu_model.as_str(),
        "cpu_cores": b.cores,
        "memory_total_bytes": b.memory_total,
        "disks": disks(&b.disks),
        "device_model": b.device_model.as_str(),
        "agent_version": b.agent_version.as_str(),
        "boot_id": b.boot_id.as_str(),
        "labels": labels,
        "metrics_interval_ms": b.interval_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_metrics_read_in_plain_units() {
        let body = Body::Metrics(protocol::examples::metrics());
        let Some((kind, v)) = payload("w-1", 7, 1_000, &body) else {
            panic!("metrics are mirrored");
        };
        assert_eq!(kind, TopicKind::JsonMetrics);
        assert_eq!(v["worker_id"], "w-1");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["received_at_ms"], 1_000);
        assert_eq!(v["cpu_percent"], 12.5);
        assert_eq!(v["cpu_percent_per_core"], json!([10.0, 15.0, 9.0, 16.0]));
        assert_eq!(v["load1"], 0.42);
        assert_eq!(v["load5"], 0.35);
        assert_eq!(v["load15"], 0.3);
        assert_eq!(v["temp_celsius"], 47.236);
        assert_eq!(v["temperatures"][0]["celsius"], 47.236);
        assert_eq!(v["memory_total_bytes"], 3_981_000_000u64);
        assert_eq!(v["disk_used_bytes"], 5_900_000_000u64);
        assert_eq!(v["network"][0]["rx_bytes_per_second"], 1_520);
        assert_eq!(v["uptime_seconds"], 86_400);
        // The raw form is gone.
        let text = v.to_string();
        for raw in [
            "cpu_total",
            "millicelsius",
            "\"load\"",
            "rx_bps",
            "uptime_s\"",
        ] {
            assert!(!text.contains(raw), "{raw} in {text}");
        }
    }

    #[test]
    fn a_batch_mirrors_its_newest_sample_like_a_metrics_frame() {
        let batch = protocol::examples::metrics_batch();
        let Ok(samples) = batch.decode() else {
            panic!("the example batch decodes");
        };
        let Some(newest) = samples.last() else {
            panic!("the example batch has samples");
        };
        let from_batch = payload("w-1", 9, 10_000, &Body::MetricsBatch(batch.clone()));
        let as_frame = payload(
            "w-1",
            9,
            10_000 - u64::from(batch.age_ms),
            &Body::Metrics(newest.clone()),
        );
        assert!(from_batch.is_some());
        assert_eq!(from_batch, as_frame);
        let mut broken = batch;
        broken.count += 1;
        assert!(payload("w-1", 9, 1, &Body::MetricsBatch(broken)).is_none());
    }

    #[test]
    fn no_temperature_sensor_is_null_and_only_births_and_metrics_are_mirrored() {
        let mut m = protocol::examples::metrics();
        m.temperatures.clear();
        let Some((_, v)) = payload("w-1", 1, 1, &Body::Metrics(m)) else {
            panic!("metrics are mirrored");
        };
        assert!(v["temp_celsius"].is_null());
        let Some((kind, b)) = payload("w-1", 1, 1, &Body::Birth(protocol::examples::birth()))
        else {
            panic!("births are mirrored");
        };
        assert_eq!(kind, TopicKind::JsonBirth);
        assert_eq!(b["cpu_cores"], 4);
        assert_eq!(b["metrics_interval_ms"], 10_000);
        let status = Body::ServiceStatus(protocol::examples::service_status());
        assert!(payload("w-1", 1, 1, &status).is_none());
    }
}
