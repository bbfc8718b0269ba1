//! End-to-end TLS: a worker enrols by the CA fingerprint in its token and
//! then talks only TLS (HTTPS API, MQTT over TLS); a man in the middle is
//! refused before the token leaves; plain HTTP and MQTT from another host
//! are refused (unless `--insecure-plain`); the broker confines the
//! observer and each worker to what it may do.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn state_json(w: &Worker) -> Value {
    serde_json::from_str(&std::fs::read_to_string(w.state_dir.join("state.json")).unwrap()).unwrap()
}

fn fingerprint_of_pem(pem: &str) -> String {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    protocol::Fingerprint::of_der(der.as_ref()).to_string()
}

/// A non-loopback address of this host (the one a default route leaves
/// from), or `None` on a host with loopback only.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // No packet is sent: connect only picks the route.
    s.connect("10.255.255.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_worker_enrols_by_the_ca_fingerprint_and_then_talks_only_tls() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let fp = c.ca_fingerprint.clone().expect("TLS is on by default");
    assert!(
        token.ends_with(&format!(".{fp}")),
        "the token pins the CA: {token}"
    );
    assert_eq!(fp, fingerprint_of_pem(&c.ca_pem()));
    let mqtts = c.mqtts.expect("an MQTT-over-TLS listener");

    // Given the plain URL, the worker moves to HTTPS because the token pins a CA.
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("tls-pi"),
    );
    let id = w.wait_id();
    let st = state_json(&w);
    assert_eq!(
        st["conductor_url"],
        c.https_url(),
        "enrolled over HTTPS: {st}"
    );
    assert_eq!(
        st["mqtt_url"],
        format!("mqtts://127.0.0.1:{}", mqtts.port()),
        "{st}"
    );
    let pinned = std::fs::read_to_string(w.state_dir.join("ca.pem")).unwrap();
    assert_eq!(
        fingerprint_of_pem(&pinned),
        fp,
        "the pinned CA is the token's"
    );
    wait_for("worker online with metrics over MQTT/TLS", SECS(30), || {
        let v = c.worker(&id);
        (v["status"] == "online" && !v["metrics"].is_null()).then_some(())
    });

    // A command round trip (conductor → MQTT/TLS → worker → back).
    let (status, reply) = c.post(
        &format!("/api/v1/workers/{id}/commands"),
        &json!({"action": "ping"}),
    );
    assert_eq!(status, 200, "{reply}");

    // The worker's connections to the broker are TLS ones only.
    let peers = tcp_peers_of(w.proc.pid());
    assert!(
        peers.iter().any(|p| p.port() == mqtts.port()),
        "connected to MQTT over TLS: {peers:?}"
    );
    assert!(
        !peers.iter().any(|p| p.port() == c.mqtt.port()),
        "no plain MQTT connection: {peers:?}"
    );

    // HTTPS answers carry HSTS and a Secure session cookie; plain loopback ones neither.
    let agent = https(&c.ca_pem());
    let resp = agent
        .post(format!("{}/api/v1/login", c.https_url()))
        .send_json(json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .unwrap();
    assert_eq!(resp.status(), 200);
    let hsts = resp
        .headers()
        .get("strict-transport-security")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        hsts.is_some_and(|h| h.contains("max-age=")),
        "HSTS on HTTPS"
    );
    let cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    let plain = http()
        .post(format!("{}/api/v1/login", c.url()))
        .send_json(json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .unwrap();
    assert!(plain.headers().get("strict-transport-security").is_none());
    let cookie = plain
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap();
    assert!(!cookie.contains("Secure"), "{cookie}");

    // GET /api/v1/mqtt gives the TLS URL and the CA fingerprint.
    let (_, info) = c.get("/api/v1/mqtt");
    assert_eq!(info["ca_fingerprint"], fp, "{info}");
    assert_eq!(
        info["tls_url"],
        format!("mqtts://127.0.0.1:{}", mqtts.port()),
        "{info}"
    );

    // A restart keeps the CA and the worker reconnects over TLS.
    w.restart();
    wait_for("worker online again after a restart", SECS(30), || {
        let v = c.worker(&id);
        (v["status"] == "online").then_some(())
    });
}

/// A TLS server with a certificate of its own that counts the application
/// bytes it gets: a man in the middle.
struct Mitm {
    addr: SocketAddr,
    decrypted: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
}

impl Mitm {
    fn start() -> Mitm {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let decrypted = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let (d, h) = (decrypted.clone(), handshakes.clone());
        std::thread::spawn(move || {
            for sock in listener.incoming().flatten() {
                let (config, d, h) = (config.clone(), d.clone(), h.clone());
                std::thread::spawn(move || {
                    let mut sock = sock;
                    let _ = sock.set_read_timeout(Some(SECS(10)));
                    let mut conn = rustls::ServerConnection::new(config).unwrap();
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        d.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        Mitm {
            addr,
            decrypted,
            handshakes,
        }
    }
}

#[test]
fn a_man_in_the_middle_is_refused_before_the_token_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mitm = Mitm::start();

    let mut w = Worker::start(
        &dir.path().join("w"),
        &format!("https://{}", mitm.addr),
        Some(&token),
        WorkerOpts::named("mitm-pi"),
    );
    let code = w.proc.wait_exit(SECS(30));
    let log = w.proc.output();
    assert!(
        code.is_some_and(|c| c != 0),
        "the worker gives up (a man in the middle is not retried): {code:?}\n{log}"
    );
    assert!(
        log.contains("man in the middle") && log.contains("Nothing was sent"),
        "{log}"
    );
    assert!(
        mitm.handshakes.load(Ordering::SeqCst) >= 1,
        "it was dialled"
    );
    assert_eq!(
        mitm.decrypted.load(Ordering::SeqCst),
        0,
        "not one byte of the request (nor the token) reached the man in the middle"
    );
    assert!(w.id().is_none(), "no identity");
    assert!(
        !w.state_dir.join("ca.pem").exists(),
        "the wrong CA is not stored"
    );
    assert!(c.workers().is_empty(), "nothing enrolled");

    // A token without the fingerprint cannot use https:// at all.
    let secret_only = token.split('.').next().unwrap().to_string();
    let mut w2 = Worker::start(
        &dir.path().join("w2"),
        &c.https_url(),
        Some(&secret_only),
        WorkerOpts::named("no-pin"),
    );
    assert!(w2.proc.wait_exit(SECS(30)).is_some_and(|c| c != 0));
    assert!(
        w2.proc.output().contains("no CA fingerprint"),
        "{}",
        w2.proc.output()
    );
}

#[test]
fn plain_http_and_mqtt_from_another_host_are_refused_but_tls_is_not() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("SKIP: this host has no non-loopback address");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let listen: Vec<String> = ports.iter().map(|p| format!("0.0.0.0:{p}")).collect();
    let mut c = Conductor::start_on(
        &dir.path().join("conductor"),
        &[],
        [&listen[0], &listen[1], &listen[2]],
    );

    // Plain HTTP to the host's own LAN address: refused with a clear answer.
    let (status, body) = read(
        http()
            .get(format!("http://{ip}:{}/api/v1/health", ports[0]))
            .call(),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("https://"), "{body}");
    // The same over loopback (the README's curl) works.
    let (status, _) = c.get("/api/v1/health");
    assert_eq!(status, 200);
    // HTTPS to the LAN address works: the certificate names it.
    let (status, body) = read(
        https(&c.ca_pem())
            .get(format!("https://{ip}:{}/api/v1/health", ports[0]))
            .call(),
    );
    assert_eq!(status, 200, "{body}");

    // Plain MQTT from the LAN address: closed before a CONNACK.
    assert!(
        MqttClient::connect(SocketAddr::new(ip, ports[1]), "lan-probe", None).is_none(),
        "plain MQTT from another address is refused"
    );
    let mut raw = TcpStream::connect((ip, ports[1])).unwrap();
    raw.set_read_timeout(Some(SECS(5))).unwrap();
    let _ = raw.write_all(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 5, 0, 0]);
    let mut buf = [0u8; 4];
    assert!(
        matches!(raw.read(&mut buf), Ok(0) | Err(_)),
        "the socket is closed without an answer"
    );
    // MQTT over TLS from the LAN address reaches the broker (and its login check).
    let (ou, op) = c.observer();
    assert!(
        MqttClient::connect_tls(
            SocketAddr::new(ip, ports[2]),
            "lan-observer",
            Some((&ou, &op)),
            &c.ca_pem()
        )
        .is_some(),
        "MQTT over TLS works from another address"
    );
    let prom = c.prometheus();
    assert!(metric(&prom, "aerekos_plain_refused_total{protocol=\"http\"}") >= 1.0);
    assert!(metric(&prom, "aerekos_plain_refused_total{protocol=\"mqtt\"}") >= 1.0);
    let log = c.proc.output();
    assert!(log.contains("plain HTTP refused"), "{log}");
    assert!(log.contains("plain MQTT refused"), "{log}");

    // --insecure-plain: the old trusted-LAN behaviour, said loudly.
    c.proc.terminate();
    let c = Conductor::start_on(
        &dir.path().join("conductor"),
        &["--insecure-plain"],
        [&listen[0], &listen[1], &listen[2]],
    );
    let (status, _) = read(
        http()
            .get(format!("http://{ip}:{}/api/v1/health", ports[0]))
            .call(),
    );
    assert_eq!(status, 200);
    let (ou, op) = c.observer();
    assert!(MqttClient::connect(
        SocketAddr::new(ip, ports[1]),
        "lan-probe-2",
        Some((&ou, &op))
    )
    .is_some());
    assert!(c.proc.output().contains("--insecure-plain"));
}

#[test]
fn the_observer_cannot_publish_and_a_worker_is_confined_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut a = Worker::start(
        &dir.path().join("a"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("pi-a"),
    );
    let mut b = Worker::start(
        &dir.path().join("b"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("pi-b"),
    );
    let (a_id, b_id) = (a.wait_id(), b.wait_id());
    for id in [&a_id, &b_id] {
        wait_for("online", SECS(30), || {
            (c.worker(id)["status"] == "online").then_some(())
        });
    }
    let status_topic = format!("aerekos/v1/{a_id}/status");
    let mirror_topic = format!("aerekos/v1/{a_id}/json/metrics");
    let (ou, op) = c.observer();
    let retained = |topic: &str| -> Option<Vec<u8>> {
        let s = MqttClient::connect(
            c.mqtt,
            &format!("check-{}", free_port()),
            Some((ou.as_str(), op.as_str())),
        )?;
        s.subscribe(topic);
        s.recv_until(SECS(3), |t, _| t == topic).map(|(_, p)| p)
    };
    assert_eq!(retained(&status_topic).as_deref(), Some(&b"online"[..]));

    // The observer reads everything but publishes nothing.
    let obs = MqttClient::connect(c.mqtt, "explorer", Some((&ou, &op))).unwrap();
    let codes = obs.subscribe_acked("aerekos/v1/#");
    assert!(
        matches!(codes.as_slice(), [rumqttc::SubscribeReasonCode::Success(_)]),
        "{codes:?}"
    );
    assert!(obs.recv(SECS(5)).is_some(), "the observer reads the tree");
    obs.client
        .publish(
            &status_topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            b"offline".to_vec(),
        )
        .unwrap();
    obs.client
        .publish(
            &mirror_topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            b"{\"forged\":1}".to_vec(),
        )
        .unwrap();
    wait_for("the observer disconnected", SECS(10), || {
        obs.was_dropped().then_some(())
    });
    assert_eq!(
        retained(&status_topic).as_deref(),
        Some(&b"online"[..]),
        "the retained status is the worker's own"
    );
    let mirror = retained(&mirror_topic).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&mirror).contains("forged"),
        "the retained mirror is the conductor's own"
    );
    assert_eq!(c.status_of(&a_id), "online");

    // Worker A's own login (its process stopped, so the session is free)
    // may not read B's commands nor publish on B's topics.
    a.proc.terminate();
    let (au, ap) = a.mqtt_login();
    let ca_pem = c.ca_pem();
    let mqtts = c.mqtts.unwrap();
    let fake_a = MqttClient::connect_tls(mqtts, &a_id, Some((&au, &ap)), &ca_pem)
        .expect("A's login works over TLS");
    let codes = fake_a.subscribe_acked(&format!("aerekos/v1/{b_id}/cmd"));
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Failure],
        "B's commands"
    );
    let codes = fake_a.subscribe_acked("aerekos/v1/+/cmd");
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Failure],
        "wildcards"
    );
    let codes = fake_a.subscribe_acked(&format!("aerekos/v1/{a_id}/cmd"));
    assert!(
        matches!(codes.as_slice(), [rumqttc::SubscribeReasonCode::Success(_)]),
        "its own commands: {codes:?}"
    );
    let (status, _) = c.post(
        &format!("/api/v1/workers/{b_id}/commands"),
        &json!({"action": "ping"}),
    );
    assert_eq!(status, 200, "B still answers commands");
    assert!(
        fake_a
            .recv_until(SECS(2), |t, _| t.contains(&b_id))
            .is_none(),
        "A saw nothing of B's"
    );
    let rejected_before = c.rejected("topic_mismatch") + c.rejected("bad_tag");
    fake_a
        .client
        .publish(
            format!("aerekos/v1/{b_id}/metrics"),
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![1, 2, 3],
        )
        .unwrap();
    wait_for("A's forged publish disconnects it", SECS(10), || {
        fake_a.was_dropped().then_some(())
    });
    std::thread::sleep(SECS(1));
    assert_eq!(
        c.rejected("topic_mismatch") + c.rejected("bad_tag"),
        rejected_before,
        "the forged frame never reached the conductor"
    );
    let prom = c.prometheus();
    assert!(
        metric(
            &prom,
            "aerekos_mqtt_denied_total{who=\"observer\",action=\"publish\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &prom,
            "aerekos_mqtt_denied_total{who=\"worker\",action=\"subscribe\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &prom,
            "aerekos_mqtt_denied_total{who=\"worker\",action=\"publish\"}"
        ) >= 1.0
    );
    assert_eq!(c.status_of(&b_id), "online");
    drop(b);
}

#[test]
fn metrics_can_require_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "metrics-token-0123456789";
    let c = Conductor::start_with(&dir.path().join("conductor"), &["--metrics-token", token]);
    let (status, _) = read(http().get(format!("{}/metrics", c.url())).call());
    assert_eq!(status, 401);
    let (status, _) = read(
        http()
            .get(format!("{}/metrics", c.url()))
            .header("Authorization", "Bearer wrong-token-0123456789")
            .call(),
    );
    assert_eq!(status, 401);
    let (status, body) = read(
        http()
            .get(format!("{}/metrics", c.url()))
            .header("Authorization", format!("Bearer {token}"))
            .call(),
    );
    assert_eq!(status, 200);
    assert!(body.to_string().contains("aerekos_frames_accepted_total"));
}

#[test]
fn the_cli_talks_https_trusting_only_the_conductor_ca() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let ca_file = c.data_dir.join("tls").join("ca.pem");
    let run = |extra: &[&str]| {
        std::process::Command::new(bin("aerekos"))
            .args(["--url", &c.https_url(), "--json"])
            .args(extra)
            .args(["workers"])
            .env("AEREKOS_TOKEN", &c.admin)
            .env_remove("AEREKOS_CACERT")
            .output()
            .unwrap()
    };
    let ok = run(&["--cacert", ca_file.to_str().unwrap()]);
    assert!(ok.status.success(), "{ok:?}");
    let out: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("JSON");
    assert!(out.is_array() || out["workers"].is_array(), "{out}");
    // The public roots do not know the fleet CA: refused, with a reason.
    let refused = run(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );
}
