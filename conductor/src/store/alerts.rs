//! Alert rules, alerts, webhook receivers and the notification outbox
//! (`crate::alerts` owns what the JSON columns mean).
//!
//! A state change and the notifications that report it are written in one
//! transaction ([`Store::fire_alert`], params![`Store::resolve_alert`]), so a
//! conductor killed at any point has either both or neither: after a
//! restart nothing is notified twice and nothing is lost.

use super::sql::{params, Db, Row};

use super::{i, u, Store, StoreError};

/// One alert rule as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRuleRow {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// The rule, JSON (`crate::alerts::RuleSpec`).
    pub spec_json: String,
    /// Creation time, ms.
    pub created_ms: u64,
}

/// One alert: a rule's condition held for a subject from `fired_ms` to
/// `resolved_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    /// Row id (0 before it is stored).
    pub id: i64,
    /// The rule that fired.
    pub rule_id: i64,
    /// The rule's name then.
    pub rule_name: String,
    /// The rule's kind (`worker_offline`, `metric_above`, …).
    pub kind: String,
    /// What it is about: a worker id, `worker/service` or `rollout/<id>`.
    pub subject: String,
    /// `firing` | `resolved`.
    pub state: String,
    /// One line for people.
    pub summary: String,
    /// The value that crossed the threshold, when there is one.
    pub value: Option<f64>,
    /// When it fired, ms.
    pub fired_ms: u64,
    /// When it resolved, ms.
    pub resolved_ms: Option<u64>,
    /// Why it resolved (`condition cleared`, `rule deleted`, …).
    pub resolved_why: String,
}

/// A webhook receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverRow {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// `http://` or `https://` URL the notifications are POSTed to.
    pub url: String,
    /// HMAC-SHA256 key of the signature header (hex). Never logged.
    pub secret: String,
    /// Creation time, ms.
    pub created_ms: u64,
}

/// One notification of one alert event to one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationRow {
    /// Row id: the delivery id receivers see (`X-Aerekos-Delivery`).
    pub id: i64,
    /// The alert.
    pub alert_id: i64,
    /// The receiver.
    pub receiver_id: i64,
    /// `firing` | `resolved`.
    pub event: String,
    /// The JSON body, fixed when the event happened.
    pub body: String,
    /// When it was queued, ms.
    pub created_ms: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this time, ms.
    pub next_attempt_ms: u64,
    /// When a receiver took it (2xx), ms.
    pub delivered_ms: Option<u64>,
    /// Why the last attempt failed.
    pub last_error: String,
}

impl Store {
    /// Stores a new rule; `None` when the name is taken.
    pub fn insert_alert_rule(
        &self,
        name: &str,
        spec_json: &str,
        now_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        self.conn.query_row_opt(
            "INSERT INTO alert_rules (name, spec, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            params![name, spec_json, i(now_ms)],
            |r| r.get(0),
        )
    }

    /// Every rule, oldest first.
    pub fn alert_rules(&self) -> Result<Vec<AlertRuleRow>, StoreError> {
        self.conn.query_map(
            "SELECT id, name, spec, created_ms FROM alert_rules ORDER BY id",
            params![],
            |r| {
                Ok(AlertRuleRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    spec_json: r.get(2)?,
                    created_ms: u(r.get(3)?),
                })
            },
        )
    }

    /// Deletes a rule (its firing alerts resolve at the next evaluation).
    pub fn delete_alert_rule(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM alert_rules WHERE id = ?1", params![id])?
            == 1)
    }

    /// Alerts firing now, oldest first.
    pub fn firing_alerts(&self) -> Result<Vec<AlertRow>, StoreError> {
        self.conn.query_map(
            &format!("SELECT {ALERT_COLS} FROM alerts WHERE state = 'firing' ORDER BY id"),
            params![],
            alert_from_row,
        )
    }

    /// Alerts newest first, at most `limit`, optionally in one state.
    pub fn alerts(&self, state: Option<&str>, limit: u32) -> Result<Vec<AlertRow>, StoreError> {
        self.conn.query_map(
            &format!(
                "SELECT {ALERT_COLS} FROM alerts WHERE (CAST(?1 AS TEXT) IS NULL OR state = ?1)
             ORDER BY id DESC LIMIT ?2"
            ),
            params![state, limit],
            alert_from_row,
        )
    }

    /// One alert.
    pub fn alert(&self, id: i64) -> Result<Option<AlertRow>, StoreError> {
        self.conn.query_row_opt(
            &format!("SELECT {ALERT_COLS} FROM alerts WHERE id = ?1"),
            params![id],
            alert_from_row,
        )
    }

    /// Stores a firing alert and, in the same transaction, one `firing`
    /// notification per receiver with the body `body(&stored)` makes.
    /// Returns the stored alert; `None` when the rule already has one
    /// firing for this subject.
    pub fn fire_alert(
        &mut self,
        a: &AlertRow,
        body: &dyn Fn(&AlertRow) -> String,
    ) -> Result<Option<AlertRow>, StoreError> {
        let tx = self.conn.begin()?;
        let id: Option<i64> = tx.query_row_opt(
            "INSERT INTO alerts (rule_id, rule_name, kind, subject, state, summary, value,
                fired_ms) VALUES (?1, ?2, ?3, ?4, 'firing', ?5, ?6, ?7)
             ON CONFLICT DO NOTHING RETURNING id",
            params![
                a.rule_id,
                a.rule_name,
                a.kind,
                a.subject,
                a.summary,
                a.value,
                i(a.fired_ms)
            ],
            |r| r.get(0),
        )?;
        let Some(id) = id else {
            return Ok(None);
        };
        let stored = AlertRow {
            id,
            state: "firing".into(),
            resolved_ms: None,
            resolved_why: String::new(),
            ..a.clone()
        };
        queue(&tx, &stored, "firing", &body(&stored), a.fired_ms)?;
        tx.commit()?;
        Ok(Some(stored))
    }

    /// Resolves a firing alert and, in the same transaction, queues one
    /// `resolved` notification per receiver. Returns the resolved alert;
    /// `None` when it was not firing.
    pub fn resolve_alert(
        &mut self,
        id: i64,
        now_ms: u64,
        why: &str,
        body: &dyn Fn(&AlertRow) -> String,
    ) -> Result<Option<AlertRow>, StoreError> {
        let tx = self.conn.begin()?;
        let n = tx.execute(
            "UPDATE alerts SET state = 'resolved', resolved_ms = ?2, resolved_why = ?3
             WHERE id = ?1 AND state = 'firing'",
            params![id, i(now_ms), why],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let stored = tx.query_row(
            &format!("SELECT {ALERT_COLS} FROM alerts WHERE id = ?1"),
            params![id],
            alert_from_row,
        )?;
        queue(&tx, &stored, "resolved", &body(&stored), now_ms)?;
        tx.commit()?;
        Ok(Some(stored))
    }

    /// Stores a receiver; `None` when the name is taken.
    pub fn insert_receiver(
        &self,
        name: &str,
        url: &str,
        secret: &str,
        now_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        self.conn.query_row_opt(
            "INSERT INTO alert_receivers (name, url, secret, created_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            params![name, url, secret, i(now_ms)],
            |r| r.get(0),
        )
    }

    /// Every receiver, oldest first.
    pub fn receivers(&self) -> Result<Vec<ReceiverRow>, StoreError> {
        self.conn.query_map(
            "SELECT id, name, url, secret, created_ms FROM alert_receivers ORDER BY id",
            params![],
            |r| {
                Ok(ReceiverRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    url: r.get(2)?,
                    secret: r.get(3)?,
                    created_ms: u(r.get(4)?),
                })
            },
        )
    }

    /// Deletes a receiver and what it had not taken yet.
    pub fn delete_receiver(&mut self, id: i64) -> Result<bool, StoreError> {
        let tx = self.conn.begin()?;
        let n = tx.execute("DELETE FROM alert_receivers WHERE id = ?1", params![id])?;
        tx.execute(
            "DELETE FROM alert_notifications WHERE receiver_id = ?1 AND delivered_ms IS NULL",
            params![id],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    /// For each receiver, its oldest undelivered notification if it is due
    /// at `now_ms`: a receiver gets its notifications in order, so a
    /// `resolved` never overtakes its `firing`.
    pub fn due_notifications(&self, now_ms: u64) -> Result<Vec<NotificationRow>, StoreError> {
        self.conn.query_map(
            &format!(
                "SELECT {NOTE_COLS} FROM alert_notifications n
             WHERE delivered_ms IS NULL AND next_attempt_ms <= ?1
               AND id = (SELECT MIN(id) FROM alert_notifications
                         WHERE receiver_id = n.receiver_id AND delivered_ms IS NULL)
             ORDER BY id"
            ),
            params![i(now_ms)],
            note_from_row,
        )
    }

    /// Marks a notification taken by its receiver.
    pub fn notification_delivered(&self, id: i64, now_ms: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE alert_notifications SET delivered_ms = ?2, last_error = '' WHERE id = ?1",
            params![id, i(now_ms)],
        )?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub fn notification_failed(
        &self,
        id: i64,
        attempts: u32,
        next_attempt_ms: u64,
        error: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE alert_notifications SET attempts = ?2, next_attempt_ms = ?3, last_error = ?4
             WHERE id = ?1",
            params![id, attempts, i(next_attempt_ms), error],
        )?;
        Ok(())
    }

    /// An alert's notifications, oldest first.
    pub fn notifications_of(&self, alert_id: i64) -> Result<Vec<NotificationRow>, StoreError> {
        self.conn.query_map(
            &format!("SELECT {NOTE_COLS} FROM alert_notifications WHERE alert_id = ?1 ORDER BY id"),
            params![alert_id],
            note_from_row,
        )
    }

    /// Notifications not delivered yet.
    pub fn undelivered_notifications(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM alert_notifications WHERE delivered_ms IS NULL",
            params![],
            |r| r.get(0),
        )?;
        Ok(u(n))
    }
}

/// Queues `event` of `alert` for every receiver (inside the caller's
/// transaction).
fn queue(
    tx: &Db,
    alert: &AlertRow,
    event: &str,
    body: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO alert_notifications (alert_id, receiver_id, event, body, created_ms,
            next_attempt_ms)
         SELECT ?1, id, ?2, ?3, ?4, ?4 FROM alert_receivers WHERE true -- (SQLite: a WHERE before an upsert)
         ON CONFLICT DO NOTHING",
        params![alert.id, event, body, i(now_ms)],
    )?;
    Ok(())
}

fn alert_from_row(r: &Row) -> Result<AlertRow, StoreError> {
    Ok(AlertRow {
        id: r.get(0)?,
        rule_id: r.get(1)?,
        rule_name: r.get(2)?,
        kind: r.get(3)?,
        subject: r.get(4)?,
        state: r.get(5)?,
        summary: r.get(6)?,
        value: r.get(7)?,
        fired_ms: u(r.get(8)?),
        resolved_ms: r.get::<Option<i64>>(9)?.map(u),
        resolved_why: r.get(10)?,
    })
}

const ALERT_COLS: &str = "id, rule_id, rule_name, kind, subject, state, summary, value,
    fired_ms, resolved_ms, resolved_why";

fn note_from_row(r: &Row) -> Result<NotificationRow, StoreError> {
    Ok(NotificationRow {
        id: r.get(0)?,
        alert_id: r.get(1)?,
        receiver_id: r.get(2)?,
        event: r.get(3)?,
        body: r.get(4)?,
        created_ms: u(r.get(5)?),
        attempts: r.get(6)?,
        next_attempt_ms: u(r.get(7)?),
        delivered_ms: r.get::<Option<i64>>(8)?.map(u),
        last_error: r.get(9)?,
    })
}

const NOTE_COLS: &str = "id, alert_id, receiver_id, event, body, created_ms, attempts,
    next_attempt_ms, delivered_ms, last_error";

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(rule_id: i64, subject: &str) -> AlertRow {
        AlertRow {
            id: 0,
            rule_id,
            rule_name: "r".into(),
            kind: "worker_offline".into(),
            subject: subject.into(),
            state: "firing".into(),
            summary: "w offline".into(),
            value: None,
            fired_ms: 1_000,
            resolved_ms: None,
            resolved_why: String::new(),
        }
    }

    #[test]
    fn a_state_change_and_its_notifications_go_together_once_each() {
        crate::store::each_engine(|s| {
            let a = s.insert_receiver("a", "http://a", "k", 1).unwrap().unwrap();
            let b = s.insert_receiver("b", "http://b", "k", 1).unwrap().unwrap();
            assert_eq!(s.insert_receiver("a", "http://x", "k", 1).unwrap(), None);
            let body = |r: &AlertRow| format!("{}:{}", r.id, r.state);
            let fired = s.fire_alert(&alert(7, "w-1"), &body).unwrap().unwrap();
            assert!(
                s.fire_alert(&alert(7, "w-1"), &body).unwrap().is_none(),
                "one firing per rule and subject"
            );
            assert!(s.fire_alert(&alert(7, "w-2"), &body).unwrap().is_some());
            let due = s.due_notifications(1_000).unwrap();
            assert_eq!(due.len(), 2, "the oldest per receiver: {due:?}");
            assert_eq!(
                (due[0].receiver_id, due[1].receiver_id, due[0].alert_id),
                (a, b, fired.id)
            );
            assert_eq!(due[0].body, format!("{}:firing", fired.id));
            assert!(s.due_notifications(999).unwrap().is_empty(), "not due yet");

            let resolved = s
                .resolve_alert(fired.id, 5_000, "condition cleared", &body)
                .unwrap()
                .unwrap();
            assert_eq!(resolved.resolved_ms, Some(5_000));
            assert!(s
                .resolve_alert(fired.id, 6_000, "again", &body)
                .unwrap()
                .is_none());
            // Receiver a fails its first; b takes its own in order.
            s.notification_failed(due[0].id, 1, 10_000, "down").unwrap();
            s.notification_delivered(due[1].id, 5_000).unwrap();
            let next = s.due_notifications(5_000).unwrap();
            assert!(next.iter().all(|n| n.receiver_id == b), "a waits: {next:?}");
            let later = s.due_notifications(10_000).unwrap();
            assert!(later.iter().any(|n| n.id == due[0].id));
            let notes = s.notifications_of(fired.id).unwrap();
            let events: Vec<_> = notes.iter().map(|n| n.event.as_str()).collect();
            assert_eq!(events, ["firing", "firing", "resolved", "resolved"]);
            assert_eq!(s.firing_alerts().unwrap().len(), 1);
            assert!(s.delete_receiver(a).unwrap());
            assert_eq!(s.undelivered_notifications().unwrap(), 2, "b's two");
        });
    }
}
