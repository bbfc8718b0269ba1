//! The conductor's MQTT session: drives the event loop of the client
//! [`crate::mqtt::client`] builds, (re)subscribes to
//! [`protocol::topic::CONDUCTOR_FILTER`] on every ConnAck and hands every
//! publish to [`crate::ingest::handle_publish`]; reconnects with exponential
//! backoff (200 ms … 5 s). Kept apart from `mqtt.rs` (settings and client,
//! which the dynamic-security client uses too) so that the low layer does not
//! depend on ingest and the shared state.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::state::Shared;

/// Drives the event loop until `stop` turns true. Sets `subscribed` after the
/// first SubAck. `nodes` are the options for every node of the broker (one
/// for a single broker, the event loop's): after a connection error the
/// next connect goes to the next node — the conductor's persistent session
/// lives in the cluster (NATS keeps it in JetStream), not in one node.
pub async fn run_loop(
    shared: Arc<Shared>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    nodes: Vec<rumqttc::MqttOptions>,
    subscribed: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
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
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                crate::ingest::handle_publish(&shared, &client, &p.topic, &p.payload);
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
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
