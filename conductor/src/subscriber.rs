//! The conductor's MQTT session: drives the event loop of the client
//! [`crate::mqtt::client`] builds, (re)subscribes to
//! [`protocol::topic::CONDUCTOR_FILTER`] on every ConnAck and hands every
//! publish to [`crate::ingest::handle_publish`]; reconnects with exponential
//! backoff (200 ms … 5 s). Kept apart from `mqtt.rs` (settings and client,
//! which the dynamic-security client uses too) so that the low layer does not
//! depend on ingest and the shared state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::state::Shared;
use crate::store::WriteOp;

/// The writer's next committed mark; never, without manual acks.
async fn next_commit(committed: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    match committed {
        Some(rx) => {
            rx.changed().await.ok()?;
            Some(*rx.borrow_and_update())
        }
        None => std::future::pending().await,
    }
}

/// PubAcks, in order, every publish whose mark is at most `upto`. Stops
/// at the first that does not fit in the client's request queue (full of
/// publishes: the event loop drains it when polled), leaving it first for
/// the next call: a PubAck is never skipped, or the broker's in-flight
/// window would shrink for good.
fn ack_committed(client: &AsyncClient, unacked: &mut VecDeque<(u64, rumqttc::Publish)>, upto: u64) {
    while let Some((n, p)) = unacked.front() {
        if *n > upto || client.try_ack(p).is_err() {
            break;
        }
        unacked.pop_front();
    }
}

/// Drives the event loop until `stop` turns true. Sets `subscribed` after the
/// first SubAck. `nodes` are the options for every node of the broker (one
/// for a single broker, the event loop's): after a connection error the
/// next connect goes to the next node — the conductor's persistent session
/// lives in the cluster (NATS keeps it in JetStream), not in one node.
///
/// `committed` (with an external broker, whose client was built with
/// manual acks): the ingest writer's highest committed
/// [`WriteOp::Received`] mark. Each QoS 1 publish is PubAcked only once the
/// writer has committed what it led to, in the order received, so a
/// conductor killed before its commit leaves the frame with the broker,
/// which delivers it again to the conductor's session — its successor's
/// after a takeover. (Acknowledging on receipt, the successor's cumulative
/// `Stored` would have covered a frame nobody stored.)
pub async fn run_loop(
    shared: Arc<Shared>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    nodes: Vec<rumqttc::MqttOptions>,
    mut committed: Option<watch::Receiver<u64>>,
    subscribed: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // Publishes received and not yet PubAcked, with their marks, in order.
    let mut unacked: VecDeque<(u64, rumqttc::Publish)> = VecDeque::new();
    let mut received: u64 = 0;
    // The writer's highest committed mark seen.
    let mut committed_upto: u64 = 0;
    let mut node = 0;
    let mut backoff = Duration::from_millis(200);
    let mut failures: u64 = 0;
    // Set when the broker refused the subscription: a NATS node refuses it
    // while JetStream recovers from a lost node, then accepts it.
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    loop {
        let resubscribe = async {
            match resubscribe_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            upto = next_commit(&mut committed) => {
                match upto {
                    Some(upto) => {
                        committed_upto = upto;
                        ack_committed(&client, &mut unacked, upto);
                    }
                    // The writer is gone (shutting down): nothing more commits.
                    None => committed = None,
                }
                continue;
            }
            () = resubscribe => {
                resubscribe_at = None;
                if let Err(e) =
                    client.try_subscribe(protocol::topic::CONDUCTOR_FILTER, QoS::AtLeastOnce)
                {
                    warn!("cannot queue subscribe: {e}");
                }
                continue;
            }
            _ = stop.changed() => break,
        };
        // PubAcks that did not fit in the request queue last time.
        if unacked.front().is_some_and(|(n, _)| *n <= committed_upto) {
            ack_committed(&client, &mut unacked, committed_upto);
        }
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                crate::ingest::handle_publish(&shared, &client, &p.topic, &p.payload);
                if committed.is_some() && p.qos != QoS::AtMostOnce {
                    received += 1;
                    // After the frame's own writes: committed with them.
                    let _ = shared.writer.send(WriteOp::Received(received));
                    unacked.push_back((received, p));
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // A new connection: the broker sends again whatever the
                // last one did not PubAck; those pkids are void here.
                unacked.clear();
                info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                backoff = Duration::from_millis(200);
                failures = 0;
                if let Err(e) =
                    client.try_subscribe(protocol::topic::CONDUCTOR_FILTER, QoS::AtLeastOnce)
                {
                    warn!("cannot queue subscribe: {e}");
                }
                // No subscription to our own JSON mirror: rumqttd 0.20 matched
                // a topic nobody subscribes to against every filter on each
                // publish, and an "anchor" subscription here worked around
                // it at the price of every mirror publish coming back to
                // this session. The vendored patch matches only wildcard
                // filters by scanning (vendor/README.md).
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .contains(&rumqttc::SubscribeReasonCode::Failure)
                {
                    warn!(
                        "the broker refused the subscription to {}; trying again in 1 s",
                        protocol::topic::CONDUCTOR_FILTER
                    );
                    resubscribe_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                } else {
                    debug!("subscribed to {}", protocol::topic::CONDUCTOR_FILTER);
                    let _ = subscribed.send(true);
                }
            }
            Ok(_) => {}
            Err(e) => {
                resubscribe_at = None;
                // Cut off from the bus until the next SubAck (watched by
                // the lease holder: `--bus-stepdown`).
                subscribed.send_if_modified(|up| std::mem::replace(up, false));
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    warn!(
                        failures,
                        "MQTT connection error: {e}; retrying in {backoff:?}"
                    );
                }
                if nodes.len() > 1 {
                    node = (node + 1) % nodes.len();
                    let (host, port) = nodes[node].broker_address();
                    info!(broker = %format!("{host}:{port}"), "trying the next broker node");
                    eventloop.mqtt_options = nodes[node].clone();
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // Clean disconnect: let the event loop flush the DISCONNECT packet.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}
