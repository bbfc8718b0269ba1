//! `aerekos alert …`: alert rules, webhook receivers and the alerts with
//! their delivery history (`/api/v1/alert-rules`, `/alert-receivers`,
//! `/alerts`).

use std::io::Write;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::{parse_pairs, rows, s, CliError, Client, Printer};

/// `aerekos alert …`
#[derive(Debug, Subcommand)]
pub enum AlertCmd {
    /// Alerts, newest first, with their notifications.
    List {
        /// Only the ones firing now.
        #[arg(long)]
        firing: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// List rules.
    Rules,
    /// Add a rule: `aerekos alert add-rule hot --kind metric_above --metric
    /// temperature --above 75 --for 2m --label site=shop`.
    AddRule {
        /// Unique name.
        name: String,
        /// `worker_offline`, `metric_above`, `service_failed`, `rollout_reverted` or
        /// `agent_update_failed`.
        #[arg(long)]
        kind: String,
        /// `metric_above`: `cpu`, `memory`, `disk` (%), `temperature` (°C), or a
        /// Raspberry Pi's `under_voltage` or `throttling` (0/1: `--above 0`).
        #[arg(long)]
        metric: Option<String>,
        /// `metric_above`: the threshold.
        #[arg(long, allow_hyphen_values = true)]
        above: Option<f64>,
        /// How long the condition must hold (`30s`, `5m`).
        #[arg(long = "for", default_value = "0s")]
        hold: String,
        /// Only workers with this label `key=value` (repeatable; all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// `service_failed`, `rollout_reverted`: only this service.
        #[arg(long)]
        service: Option<String>,
    },
    /// Delete a rule (its firing alerts resolve).
    RmRule {
        /// Rule id.
        id: i64,
    },
    /// List webhook receivers.
    Receivers,
    /// Add a webhook receiver; prints the signing secret (shown once).
    AddReceiver {
        /// Unique name.
        name: String,
        /// `https://…` (or `http://…`) URL notifications are POSTed to.
        url: String,
    },
    /// Delete a receiver.
    RmReceiver {
        /// Receiver id.
        id: i64,
    },
}

fn opt_num(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn alerts_table(v: &Value) -> String {
    let mut out =
        String::from("ID\tSTATE\tRULE\tSUBJECT\tFIRED_MS\tRESOLVED_MS\tDELIVERED\tSUMMARY\n");
    for a in rows(v, "alerts") {
        let notes = a
            .get("notifications")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let delivered = notes
            .iter()
            .filter(|n| !n.get("delivered_ms").is_none_or(Value::is_null))
            .count();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{delivered}/{}\t{}\n",
            opt_num(&a, "id"),
            s(&a, "state"),
            s(&a, "rule"),
            s(&a, "subject"),
            opt_num(&a, "fired_ms"),
            opt_num(&a, "resolved_ms"),
            notes.len(),
            s(&a, "summary"),
        ));
    }
    out
}

fn rules_table(v: &Value) -> String {
    let mut out = String::from("ID\tNAME\tKIND\tCONDITION\tFOR\tSELECTOR\n");
    for r in rows(v, "rules") {
        let condition = match (r.get("metric"), r.get("threshold")) {
            (Some(m), Some(t)) => format!("{} > {t}", m.as_str().unwrap_or("?")),
            _ => r
                .get("service")
                .and_then(Value::as_str)
                .map_or("-".into(), |s| format!("service {s}")),
        };
        out.push_str(&format!(
            "{}\t{}\t{}\t{condition}\t{}\t{}\n",
            opt_num(&r, "id"),
            s(&r, "name"),
            s(&r, "kind"),
            s(&r, "for"),
            r.get("selector").map_or("-".into(), Value::to_string),
        ));
    }
    out
}

fn receivers_table(v: &Value) -> String {
    let mut out = String::from("ID\tNAME\tURL\n");
    for r in rows(v, "receivers") {
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            opt_num(&r, "id"),
            s(&r, "name"),
            s(&r, "url")
        ));
    }
    out
}

/// Runs one `alert` command.
pub(crate) fn run(
    client: &Client,
    cmd: AlertCmd,
    out: &mut dyn Write,
    print: &Printer<'_>,
) -> Result<(), CliError> {
    match cmd {
        AlertCmd::List { firing, limit } => {
            let state = if firing { "&state=firing" } else { "" };
            let v = client.get(&format!("/alerts?limit={limit}{state}"))?;
            print(out, &v, &alerts_table)?;
        }
        AlertCmd::Rules => {
            let v = client.get("/alert-rules")?;
            print(out, &v, &rules_table)?;
        }
        AlertCmd::AddRule {
            name,
            kind,
            metric,
            above,
            hold,
            labels,
            service,
        } => {
            let mut body = json!({"name": name, "kind": kind, "for": hold});
            if let Some(m) = metric {
                body["metric"] = json!(m);
            }
            if let Some(t) = above {
                body["threshold"] = json!(t);
            }
            if !labels.is_empty() {
                body["selector"] = json!(parse_pairs(&labels)?);
            }
            if let Some(s) = service {
                body["service"] = json!(s);
            }
            let v = client.send("POST", "/alert-rules", &body)?;
            print(out, &v, &|v| {
                format!("rule {} added (id {})", s(v, "name"), opt_num(v, "id"))
            })?;
        }
        AlertCmd::RmRule { id } => {
            let v = client.delete(&format!("/alert-rules/{id}"))?;
            print(out, &v, &|_| format!("rule {id} deleted"))?;
        }
        AlertCmd::Receivers => {
            let v = client.get("/alert-receivers")?;
            print(out, &v, &receivers_table)?;
        }
        AlertCmd::AddReceiver { name, url } => {
            let v = client.send(
                "POST",
                "/alert-receivers",
                &json!({"name": name, "url": url}),
            )?;
            print(out, &v, &|v| {
                format!(
                    "receiver {} added (id {})\nsigning secret (shown once): {}",
                    s(v, "name"),
                    opt_num(v, "id"),
                    s(v, "secret")
                )
            })?;
        }
        AlertCmd::RmReceiver { id } => {
            let v = client.delete(&format!("/alert-receivers/{id}"))?;
            print(out, &v, &|_| format!("receiver {id} deleted"))?;
        }
    }
    Ok(())
}
