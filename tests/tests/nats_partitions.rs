//! Several active conductors on NATS: `conductor nats-auth --partitions 8`
//! gives the fleet account subject mappings that move every frame a worker
//! publishes on `aerekos/v1/<id>/<leaf>` (all but `status`) to
//! `aerekos/v1/part/<n>/<id>/<leaf>`, `n` = `protocol::partition::partition_of`.
//! Against a real three-node NATS cluster in operator mode, with logins
//! signed by `FleetAccount` (workers on two nodes, the readers on the
//! third): the conductor's login reading partition `n` gets worker A's
//! metrics on A's partitioned topic and not worker B's (in another
//! partition), and nothing on the unmapped metrics topics; A's status stays
//! on `aerekos/v1/<A>/status`; A can put nothing on B's topics, neither
//! B's own nor B's partitioned ones; the observer's login reads the
//! partitioned tree.
//!
//! And the bus design for the partitions' owners (docs/scale-out.md): one
//! persistent MQTT session per partition, PubAcked after the owner's
//! commit; the partition's next owner connects with the same client id and
//! the session delivers what the last owner left unacknowledged (after the
//! gateway's `ack_wait`), never what it acknowledged.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::net::SocketAddr;
use std::time::Duration;

use conductor::nats_auth::FleetAccount;
use e2e::nats::NatsCluster;
use e2e::*;
use protocol::partition::partition_of;
use protocol::topic::{
    partition_filter, partitioned_topic, topic, TopicKind, CONDUCTOR_FILTER, PARTITION_ROOT,
};
use rumqttc::SubscribeReasonCode;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const PARTITIONS: u16 = 8;

/// Every message `c` receives until none came for `quiet`.
fn drain(c: &MqttClient, quiet: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some((t, p, _)) = c.recv(quiet) {
        out.push((t, String::from_utf8_lossy(&p).into_owned()));
    }
    out
}

/// Connects `client_id` with `login` to node `node` and subscribes to
/// `filters` (each must be granted).
fn reader(
    nats: &NatsCluster,
    node: usize,
    client_id: &str,
    login: &str,
    filters: &[&str],
) -> MqttClient {
    let addr: SocketAddr = format!("127.0.0.1:{}", nats.mqtt_port(node))
        .parse()
        .unwrap();
    let c = MqttClient::connect(addr, client_id, Some((client_id, login)))
        .unwrap_or_else(|| panic!("{client_id}'s login refused"));
    for f in filters {
        assert!(
            matches!(
                c.subscribe_acked(f).as_slice(),
                [SubscribeReasonCode::Success(_)]
            ),
            "{client_id} may not read {f}"
        );
    }
    c
}

#[test]
fn each_workers_frames_reach_its_partition_only_and_nobody_writes_into_anothers() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, seed)) =
        NatsCluster::start_operator_partitioned(&dir.path().join("nats"), 3, Some(PARTITIONS))
    else {
        return;
    };
    let account = FleetAccount::load(&seed).unwrap();
    // Two workers in different partitions (w-1 → 0, w-2 → 1 of 8).
    let (ia, ib) = ("w-1", "w-2");
    let (pa, pb) = (partition_of(ia, PARTITIONS), partition_of(ib, PARTITIONS));
    assert_ne!(pa, pb);

    // The readers on node 0: the conductor's login, one connection per
    // partition and one on the unmapped tree; the observer's.
    let cjwt = account.conductor_jwt().unwrap();
    let (fa, fb) = (partition_filter(pa), partition_filter(pb));
    let part_a = reader(&nats, 0, "conductor-a", &cjwt, &[&fa]);
    let part_b = reader(&nats, 0, "conductor-b", &cjwt, &[&fb]);
    let flat = reader(&nats, 0, "conductor-flat", &cjwt, &[CONDUCTOR_FILTER]);
    let ojwt = account.observer_jwt().unwrap();
    let observer = reader(&nats, 0, "observer", &ojwt, &["aerekos/v1/#"]);

    // The workers, with logins of their own, on nodes 1 and 2.
    let worker = |id: &str, node: usize| {
        let jwt = account.worker_jwt(id, SECS(3600)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", nats.mqtt_port(node))
            .parse()
            .unwrap();
        MqttClient::connect(addr, &account.client_id(id), Some((id, &jwt)))
            .unwrap_or_else(|| panic!("{id}'s login refused"))
    };
    let (a, b) = (worker(ia, 1), worker(ib, 2));

    // Until the readers' interest has reached the other nodes: each
    // worker's metrics arrive in its partition.
    let (ma, mb) = (
        partitioned_topic(pa, ia, TopicKind::Metrics),
        partitioned_topic(pb, ib, TopicKind::Metrics),
    );
    for (w, id, reader, mapped) in [(&a, ia, &part_a, &ma), (&b, ib, &part_b, &mb)] {
        wait_for(&format!("{id}'s metrics on {mapped}"), SECS(30), || {
            w.publish(&topic(id, TopicKind::Metrics), b"warm-up".to_vec());
            reader
                .recv_until(SECS(1), |t, p| t == mapped.as_str() && p == b"warm-up")
                .map(|_| ())
        });
    }
    for r in [&part_a, &part_b, &flat, &observer] {
        drain(r, Duration::from_millis(500));
    }

    // A's and B's metrics, and A's status.
    a.publish(&topic(ia, TopicKind::Metrics), b"a-metrics".to_vec());
    b.publish(&topic(ib, TopicKind::Metrics), b"b-metrics".to_vec());
    a.publish(&topic(ia, TopicKind::Status), b"online".to_vec());
    let got_a = drain(&part_a, SECS(2));
    assert_eq!(
        got_a,
        [(ma.clone(), "a-metrics".to_string())],
        "partition {pa} (A's) reads A's metrics and nothing else"
    );
    assert_eq!(
        drain(&part_b, SECS(1)),
        [(mb.clone(), "b-metrics".to_string())],
        "partition {pb} (B's) reads B's metrics and nothing else"
    );
    // On the unmapped tree: A's status, and no metrics at all.
    assert_eq!(
        drain(&flat, SECS(1)),
        [(topic(ia, TopicKind::Status), "online".to_string())],
        "the status stays unmapped; the metrics are gone from aerekos/v1/<id>/metrics"
    );
    // The observer reads the partitioned tree (and the status).
    let seen = drain(&observer, SECS(1));
    for expected in [
        (ma.clone(), "a-metrics".to_string()),
        (mb.clone(), "b-metrics".to_string()),
        (topic(ia, TopicKind::Status), "online".to_string()),
    ] {
        assert!(
            seen.contains(&expected),
            "the observer missed {expected:?}: {seen:?}"
        );
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        matches!(
            observer
                .subscribe_acked(&format!("{PARTITION_ROOT}/#"))
                .as_slice(),
            [SubscribeReasonCode::Success(_)]
        ),
        "the observer may read the partitioned tree"
    );

    // A forging B's frames: on B's own topics (mapped to B's partition),
    // straight into B's partitioned topic, and with B's id into A's own
    // partition. Then A's own metrics: once they arrived, so would have any
    // forgery (one connection's publishes stay in order).
    let forged = [
        (topic(ib, TopicKind::Metrics), &mb),
        (topic(ib, TopicKind::Status), &topic(ib, TopicKind::Status)),
        (mb.clone(), &mb),
        (
            partitioned_topic(pa, ib, TopicKind::Metrics),
            &partitioned_topic(pa, ib, TopicKind::Metrics),
        ),
        (
            topic(ib, TopicKind::Birth),
            &partitioned_topic(pb, ib, TopicKind::Birth),
        ),
    ];
    for (t, _) in &forged {
        a.publish(t, b"forged".to_vec());
    }
    wait_for("A's metrics after the forgeries", SECS(30), || {
        a.publish(&topic(ia, TopicKind::Metrics), b"a-after".to_vec());
        part_a
            .recv_until(SECS(1), |t, p| t == ma.as_str() && p == b"a-after")
            .map(|_| ())
    });
    std::thread::sleep(SECS(1));
    for (name, r) in [
        ("partition A", &part_a),
        ("partition B", &part_b),
        ("the unmapped tree", &flat),
        ("the observer", &observer),
    ] {
        let got = drain(r, Duration::from_millis(500));
        assert!(
            !got.iter().any(|(_, p)| p == "forged"),
            "A's forgery reached {name}: {got:?}"
        );
    }
    // NATS saw each forgery and refused it, on the subject after the
    // mapping (B's partitioned one where there is one).
    let log = nats.log(1);
    for (t, checked) in &forged {
        let line = format!(
            "Publish Violation - Subject \"{}\"",
            checked.replace('/', ".")
        );
        assert!(
            log.contains(&line),
            "{t}: no `{line}` in node 1's log:\n{log}"
        );
    }
    // B is untouched: its own metrics still reach its partition.
    b.publish(&topic(ib, TopicKind::Metrics), b"b-after".to_vec());
    assert!(
        part_b
            .recv_until(SECS(10), |t, p| t == mb.as_str() && p == b"b-after")
            .is_some(),
        "B's metrics after A's forgeries"
    );
}

/// A conductor's session for one partition: persistent (clean session
/// off), PubAcks by hand, as an owner acknowledges only what it committed.
fn partition_session(
    nats: &NatsCluster,
    client_id: &str,
    jwt: &str,
) -> (rumqttc::Client, rumqttc::Connection) {
    let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", nats.mqtt_port(0));
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_credentials(client_id, jwt);
    o.set_keep_alive(SECS(5));
    rumqttc::Client::new(o, 16)
}

/// The publishes `conn` receives, PubAcking those whose payload `ack`
/// accepts, until `done` says it has what it waits for or `within` ends.
fn take(
    client: &rumqttc::Client,
    conn: &mut rumqttc::Connection,
    within: Duration,
    ack: impl Fn(&str) -> bool,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let end = std::time::Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match conn.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                if ack(&payload) {
                    client.ack(&p).unwrap();
                }
                got.push(payload);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("session: {e}"),
            Err(_) => {}
        }
    }
    got
}

#[test]
fn a_partitions_next_owner_takes_its_session_over_and_gets_what_the_last_left_unacknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, seed)) = NatsCluster::start_operator_with(
        &dir.path().join("nats"),
        1,
        Some(PARTITIONS),
        Some(SECS(2)),
    ) else {
        return;
    };
    let account = FleetAccount::load(&seed).unwrap();
    let id = "w-1";
    let p = partition_of(id, PARTITIONS);
    let jwt = account.conductor_jwt().unwrap();
    // One session per partition, whichever conductor owns it.
    let session = format!("aerekos-p{p}");

    let (first, mut conn) = partition_session(&nats, &session, &jwt);
    first
        .subscribe(partition_filter(p), rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", nats.mqtt_port(0)).parse().unwrap();
    let wjwt = account.worker_jwt(id, SECS(3600)).unwrap();
    let w = MqttClient::connect(addr, &account.client_id(id), Some((id, &wjwt))).unwrap();
    // Until the subscription is in place, then three frames: the owner
    // commits (acknowledges) the first and dies before the other two.
    wait_for("the partition session subscribed", SECS(30), || {
        w.publish(&topic(id, TopicKind::Metrics), b"warm-up".to_vec());
        let got = take(&first, &mut conn, SECS(1), |_| true, |g| !g.is_empty());
        got.contains(&"warm-up".to_string()).then_some(())
    });
    for f in ["f1", "f2", "f3"] {
        w.publish(&topic(id, TopicKind::Metrics), f.as_bytes().to_vec());
    }
    let all_three = |g: &[String]| ["f1", "f2", "f3"].iter().all(|f| g.iter().any(|x| x == f));
    let got = take(&first, &mut conn, SECS(10), |p| p == "f1", all_three);
    assert!(all_three(&got), "{got:?}");
    // Its event loop runs a little longer: the PubAck it queued goes out.
    take(
        &first,
        &mut conn,
        Duration::from_millis(500),
        |_| false,
        |_| false,
    );
    // Killed: its socket closes without a DISCONNECT.
    drop(first);
    drop(conn);

    // The next owner connects with the partition's client id and no
    // subscription of its own: the session's brings f2 and f3 again (after
    // the gateway's ack_wait, 2 s here), never f1.
    let started = std::time::Instant::now();
    let (next, mut conn) = partition_session(&nats, &session, &jwt);
    let both = |g: &[String]| ["f2", "f3"].iter().all(|f| g.iter().any(|x| x == f));
    let got = take(&next, &mut conn, SECS(20), |_| true, both);
    assert!(both(&got), "the unacknowledged frames never came: {got:?}");
    let took = started.elapsed();
    // A little longer, for a redelivered f1 to show.
    let more = take(
        &next,
        &mut conn,
        SECS(4),
        |_| true,
        |_| started.elapsed() > took + SECS(3),
    );
    let all: Vec<&String> = got.iter().chain(&more).collect();
    assert!(
        !all.iter().any(|p| *p == "f1"),
        "f1 was acknowledged: {all:?}"
    );
    eprintln!("the next owner had f2 and f3 {took:?} after connecting");
    // New frames reach the next owner too.
    w.publish(&topic(id, TopicKind::Metrics), b"f4".to_vec());
    let got = take(
        &next,
        &mut conn,
        SECS(10),
        |_| true,
        |g| g.iter().any(|x| x == "f4"),
    );
    assert!(got.iter().any(|x| x == "f4"), "{got:?}");
}
