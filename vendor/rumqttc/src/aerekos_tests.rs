//! Tests of the aerekos patches (see `vendor/README.md`); included by
//! `lib.rs` under `cfg(test)`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{AsyncClient, MqttOptions, QoS};

/// The length of the first whole MQTT packet in `b`, if there is one.
fn packet_len(b: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let byte = *b.get(i)?;
        len |= usize::from(byte & 0x7f) << (7 * (i - 1));
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    (b.len() >= i + len).then_some(i + len)
}

/// The remaining length of the whole packet `p`.
fn remaining(p: &[u8]) -> usize {
    let mut len = 0usize;
    for (i, byte) in p.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            break;
        }
    }
    len
}

/// A broker that accepts one client for `for_`: answers CONNECT, and (if
/// `answers`) PINGREQ and QoS 1 PUBLISH, and says when each PINGREQ and
/// PUBLISH came (seconds since the CONNECT).
async fn broker(listener: TcpListener, for_: Duration, answers: bool) -> (Vec<f64>, Vec<f64>) {
    let (mut s, _) = listener.accept().await.unwrap();
    let start = tokio::time::Instant::now();
    let end = start + for_;
    let (mut pings, mut publishes) = (Vec::new(), Vec::new());
    let mut buf = Vec::new();
    loop {
        while let Some(n) = packet_len(&buf) {
            let at = start.elapsed().as_secs_f64();
            match buf[0] >> 4 {
                1 => s.write_all(&[0x20, 2, 0, 0]).await.unwrap(),
                3 => {
                    publishes.push(at);
                    // QoS 1: the packet id follows the topic.
                    let start = n - remaining(&buf[..n]);
                    let topic_len = usize::from(u16::from_be_bytes([buf[start], buf[start + 1]]));
                    let pkid = &buf[start + 2 + topic_len..start + 4 + topic_len];
                    if answers && buf[0] & 0x06 == 0x02 {
                        s.write_all(&[0x40, 2, pkid[0], pkid[1]]).await.unwrap();
                    }
                }
                12 => {
                    pings.push(at);
                    if answers {
                        s.write_all(&[0xd0, 0]).await.unwrap();
                    }
                }
                _ => {}
            }
            buf.drain(..n);
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(end, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    (pings, publishes)
}

/// Upstream pinged every keep-alive whatever else the link carried;
/// patched, a link whose publishes are acknowledged within each keep-alive
/// carries no ping, and an idle one is pinged as before.
#[tokio::test]
async fn a_link_that_publishes_within_the_keep_alive_carries_no_ping() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = tokio::spawn(broker(listener, Duration::from_millis(7_500), true));
    let mut opts = MqttOptions::new("pinger", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(2));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let events = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // Busy for 4 s (a publish every 0.5 s), then idle for 3.5 s.
    for _ in 0..8 {
        client
            .publish("t", QoS::AtLeastOnce, false, vec![1u8])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (pings, publishes) = broker.await.unwrap();
    events.abort();
    assert_eq!(publishes.len(), 8, "{publishes:?}");
    let last_publish = publishes[7];
    // Upstream: pings at 2, 4 and 6 s. Patched: none while busy, one a
    // keep-alive after the last publish (≈ 5.5 s).
    assert!(
        pings.iter().all(|p| *p > last_publish + 1.9),
        "a ping while publishing: pings {pings:?}, publishes {publishes:?}"
    );
    assert_eq!(pings.len(), 1, "the idle link is still pinged: {pings:?}");
}

/// A half-open link (the broker reads but answers nothing) is still
/// pinged while the client publishes, and dropped when the ping goes
/// unanswered: within two keep-alives, as upstream.
#[tokio::test]
async fn a_link_that_hears_nothing_back_is_pinged_and_dropped() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = tokio::spawn(broker(listener, Duration::from_secs(8), false));
    let mut opts = MqttOptions::new("half-open", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(2));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let started = tokio::time::Instant::now();
    let publisher = tokio::spawn(async move {
        loop {
            if client
                .publish("t", QoS::AtLeastOnce, false, vec![1u8])
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let error = loop {
        match eventloop.poll().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let dropped_after = started.elapsed();
    publisher.abort();
    let (pings, publishes) = broker.await.unwrap();
    assert!(
        matches!(
            error,
            crate::ConnectionError::MqttState(crate::StateError::AwaitPingResp)
        ),
        "{error:?}"
    );
    assert!(
        dropped_after < Duration::from_millis(4_800),
        "dropped after {dropped_after:?}; pings {pings:?}, publishes {publishes:?}"
    );
    assert!(!pings.is_empty() && publishes.len() >= 3, "{pings:?} {publishes:?}");
}
