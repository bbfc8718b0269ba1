//! `GET /metrics`: Prometheus text exposition. It carries no secrets, only
//! hostnames, ids and hardware numbers; it is open unless `--metrics-token`
//! is set, which the caller (`api::metrics`) checks before rendering.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::message::{Ctx, Resp};
use crate::ingest::Reject;
use crate::state::{now_ms, Status};

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) fn render(ctx: &Ctx) -> Resp {
    let mut out = String::with_capacity(4096);
    let now = now_ms();
    let workers = ctx.shared.workers();
    let mut list: Vec<_> = workers.values().filter(|w| !w.revoked).collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));

    let mut gauge = |name: &str, help: &str, rows: &mut dyn Iterator<Item = (String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let lbl = |w: &crate::state::WorkerEntry| {
        format!(
            "worker_id=\"{}\",hostname=\"{}\"",
            esc(&w.id),
            esc(&w.hostname)
        )
    };
    gauge(
        "aerekos_worker_up",
        "1 if the worker is online.",
        &mut list
            .iter()
            .map(|w| (lbl(w), u8::from(w.status == Status::Online).to_string())),
    );
    gauge(
        "aerekos_worker_cpu_percent",
        "CPU busy, all cores, percent.",
        &mut list.iter().filter_map(|w| {
            w.latest
                .as_ref()
                .map(|l| (lbl(w), (f64::from(l.metrics.cpu_total) / 100.0).to_string()))
        }),
    );
    gauge(
        "aerekos_worker_memory_used_bytes",
        "Memory in use.",
        &mut list.iter().filter_map(|w| {
            w.latest
                .as_ref()
                .map(|l| (lbl(w), l.metrics.memory_used.to_string()))
        }),
    );
    gauge(
        "aerekos_worker_memory_total_bytes",
        "Memory total.",
        &mut list.iter().filter_map(|w| {
            w.latest
                .as_ref()
                .map(|l| (lbl(w), l.metrics.memory_total.to_string()))
        }),
    );
    gauge(
        "aerekos_worker_load1",
        "1-minute load average.",
        &mut list.iter().filter_map(|w| {
            w.latest
                .as_ref()
                .map(|l| (lbl(w), (f64::from(l.metrics.load[0]) / 100.0).to_string()))
        }),
    );
    gauge(
        "aerekos_worker_temperature_max_celsius",
        "Hottest sensor.",
        &mut list.iter().filter_map(|w| {
            let l = w.latest.as_ref()?;
            let t = l
                .metrics
                .temperatures
                .iter()
                .map(|t| t.millicelsius)
                .max()?;
            Some((lbl(w), (f64::from(t) / 1000.0).to_string()))
        }),
    );
    gauge(
        "aerekos_worker_pi_throttled",
        "1 if the Raspberry Pi's firmware reports the flag (vcgencmd get_throttled bits).",
        &mut list.iter().flat_map(|w| {
            let bits = w.board.as_ref().and_then(|b| b.throttled);
            protocol::board::THROTTLE_FLAGS.iter().filter_map(move |f| {
                let t = bits?;
                Some((
                    format!("{},flag=\"{}\"", lbl(w), f.name),
                    u8::from(t & f.mask != 0).to_string(),
                ))
            })
        }),
    );
    gauge(
        "aerekos_worker_uptime_seconds",
        "Seconds since the worker booted.",
        &mut list.iter().filter_map(|w| {
            w.latest
                .as_ref()
                .map(|l| (lbl(w), l.metrics.uptime_s.to_string()))
        }),
    );
    {
        let status = ctx.shared.service_status();
        let mut rows: Vec<(String, String)> = Vec::new();
        for w in &list {
            if let Some(m) = status.get(&w.id) {
                for (name, s) in m {
                    rows.push((
                        format!("worker_id=\"{}\",service=\"{}\"", esc(&w.id), esc(name)),
                        u8::from(matches!(
                            s.state.as_str(),
                            "running" | "healthy" | "unhealthy"
                        ))
                        .to_string(),
                    ));
                }
            }
        }
        gauge(
            "aerekos_service_running",
            "1 if the hosted service's process runs on the worker (last report).",
            &mut rows.into_iter(),
        );
    }
    {
        let metrics = ctx.shared.service_metrics();
        let mut rows: Vec<(String, String)> = Vec::new();
        for w in &list {
            if let Some(m) = metrics.get(&w.id) {
                for (service, values) in m {
                    for (key, value) in &values.values {
                        rows.push((
                            format!(
                                "worker_id=\"{}\",service=\"{}\",key=\"{}\"",
                                esc(&w.id),
                                esc(service),
                                esc(key)
                            ),
                            value.to_string(),
                        ));
                    }
                }
            }
        }
        gauge(
            "aerekos_service_metric",
            "Latest value a hosted service published (unit chosen by the service).",
            &mut rows.into_iter(),
        );
    }
    gauge(
        "aerekos_worker_last_seen_age_seconds",
        "Seconds since the last good frame (conductor clock).",
        &mut list.iter().filter_map(|w| {
            w.last_seen_ms
                .map(|t| (lbl(w), (now.saturating_sub(t) as f64 / 1000.0).to_string()))
        }),
    );
    let count = |s: Status| list.iter().filter(|w| w.status == s).count();
    let _ = writeln!(
        out,
        "# HELP aerekos_workers Workers by status.\n# TYPE aerekos_workers gauge"
    );
    for s in [Status::Online, Status::Stale, Status::Offline] {
        let _ = writeln!(
            out,
            "aerekos_workers{{status=\"{}\"}} {}",
            s.as_str(),
            count(s)
        );
    }
    let _ = writeln!(
        out,
        "aerekos_workers{{status=\"revoked\"}} {}",
        workers.values().filter(|w| w.revoked).count()
    );
    // Non-revoked workers by the agent version of their last Birth (an
    // agent rollout's progress; `unknown` before the first Birth).
    let mut by_version: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for w in &list {
        let v = w
            .inventory
            .as_ref()
            .map_or("unknown", |b| b.agent_version.as_str());
        *by_version.entry(v).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP aerekos_workers_by_agent_version Workers (not revoked) by the agent version they report.\n# TYPE aerekos_workers_by_agent_version gauge"
    );
    for (v, n) in by_version {
        let _ = writeln!(
            out,
            "aerekos_workers_by_agent_version{{version=\"{}\"}} {n}",
            esc(v)
        );
    }
    drop(workers);
    if let Some(epoch) = ctx.shared.lease.as_ref().map(|f| f.epoch().unwrap_or(0)) {
        let _ = writeln!(
            out,
            "# HELP aerekos_store_lease_epoch The shared store's lease epoch this conductor holds (one more per takeover; 0 while it is being taken again).\n# TYPE aerekos_store_lease_epoch gauge\naerekos_store_lease_epoch {epoch}"
        );
    }
    let c = &ctx.shared.counters;
    let _ = writeln!(
        out,
        "# HELP aerekos_frames_accepted_total Frames accepted.\n# TYPE aerekos_frames_accepted_total counter\naerekos_frames_accepted_total {}",
        c.accepted.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP aerekos_frames_rejected_total Frames rejected, by reason.\n# TYPE aerekos_frames_rejected_total counter"
    );
    for r in Reject::ALL {
        let _ = writeln!(
            out,
            "aerekos_frames_rejected_total{{reason=\"{}\"}} {}",
            r.as_str(),
            c.rejected(r)
        );
    }
    let _ = writeln!(
        out,
        "# HELP aerekos_mirror_dropped_total JSON mirror publishes dropped (MQTT queue full).\n# TYPE aerekos_mirror_dropped_total counter\naerekos_mirror_dropped_total {}",
        c.mirror_dropped.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP aerekos_mqtt_denied_total MQTT publishes and subscribes the embedded broker refused.\n# TYPE aerekos_mqtt_denied_total counter"
    );
    let denied = &ctx.shared.mqtt_denied;
    for (w, who) in crate::broker::DENIED_WHO.iter().enumerate() {
        for (a, action) in crate::broker::DENIED_ACTION.iter().enumerate() {
            let _ = writeln!(
                out,
                "aerekos_mqtt_denied_total{{who=\"{who}\",action=\"{action}\"}} {}",
                denied.get(w, a)
            );
        }
    }
    let refused = &ctx.shared.plain_refused;
    let _ = writeln!(
        out,
        "# HELP aerekos_plain_refused_total Plain (non-TLS) connections refused from other hosts.\n# TYPE aerekos_plain_refused_total counter\naerekos_plain_refused_total{{protocol=\"http\"}} {}\naerekos_plain_refused_total{{protocol=\"mqtt\"}} {}",
        refused.http.load(Ordering::Relaxed),
        refused.mqtt.load(Ordering::Relaxed)
    );
    if let Some(tls) = &ctx.shared.tls {
        let _ = writeln!(
            out,
            "# HELP aerekos_tls_certificate_expiry_seconds When the served certificate expires (Unix time).\n# TYPE aerekos_tls_certificate_expiry_seconds gauge\naerekos_tls_certificate_expiry_seconds {}",
            tls.current().not_after
        );
    }
    // Alerts (the store; the worker map is released above).
    let db = ctx.shared.db();
    if let (Ok(rules), Ok(firing), Ok(undelivered)) = (
        db.alert_rules(),
        db.firing_alerts(),
        db.undelivered_notifications(),
    ) {
        drop(db);
        let _ = writeln!(
            out,
            "# HELP aerekos_alerts_firing Alerts firing now, by rule.\n# TYPE aerekos_alerts_firing gauge"
        );
        for r in &rules {
            let n = firing.iter().filter(|a| a.rule_id == r.id).count();
            let _ = writeln!(
                out,
                "aerekos_alerts_firing{{rule=\"{}\"}} {n}",
                esc(&r.name)
            );
        }
        let _ = writeln!(
            out,
            "# HELP aerekos_alert_notifications_undelivered Webhook notifications no receiver has taken yet.\n# TYPE aerekos_alert_notifications_undelivered gauge\naerekos_alert_notifications_undelivered {undelivered}"
        );
    }
    Resp {
        status: 200,
        body: out,
        content_type: "text/plain; version=0.0.4",
        headers: Vec::new(),
    }
}
