//! aerekos patch: end-to-end tests of the aerekos patches (vendor/README.md):
//! authorisation of PUBLISH / SUBSCRIBE / will, the peer filter, TLS with a
//! caller-provided rustls config and handshakes off the accept loop. Each
//! test starts a broker on a free loopback port and speaks MQTT 3.1.1 bytes
//! over a plain (or rustls) socket.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{
    Access, Broker, Config, ConnectionSettings, Identity, RouterConfig, ServerSettings,
};

const LONG: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(400);

fn connection_settings(connection_timeout_ms: u16) -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms,
        max_payload_size: 64 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
        external_authorization: None,
    }
}

/// A v4 server on a free loopback port, not started.
fn server_settings() -> ServerSettings {
    let listen = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    ServerSettings {
        name: "test".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connection_settings(5_000),
        peer_filter: None,
    }
}

/// Starts a broker with this one server; returns once it accepts connections.
fn start(server: ServerSettings) -> SocketAddr {
    start_with_max_connections(server, 100)
}

fn start_with_max_connections(server: ServerSettings, max_connections: usize) -> SocketAddr {
    let listen = server.listen;
    let mut v4 = HashMap::new();
    v4.insert("1".to_string(), server);
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    std::thread::spawn(move || broker.start());
    let deadline = Instant::now() + LONG;
    while TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "broker not listening on {listen}");
        std::thread::sleep(Duration::from_millis(10));
    }
    listen
}

// ---- MQTT 3.1.1 bytes ----

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

struct Will<'a> {
    topic: &'a str,
    payload: &'a [u8],
    retain: bool,
}

fn connect(client_id: &str, username: Option<&str>, will: Option<Will>) -> Vec<u8> {
    let mut flags = 0x02; // clean session
    if let Some(w) = &will {
        flags |= 0x04 | if w.retain { 0x20 } else { 0 };
    }
    if username.is_some() {
        flags |= 0x80 | 0x40;
    }
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[4, flags, 0, 60]);
    string(client_id.as_bytes(), &mut body);
    if let Some(w) = &will {
        string(w.topic.as_bytes(), &mut body);
        string(w.payload, &mut body);
    }
    if let Some(u) = username {
        string(u.as_bytes(), &mut body);
        string(b"password", &mut body);
    }
    packet(0x10, &body)
}

fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (filter, qos) in filters {
        string(filter.as_bytes(), &mut body);
        body.push(*qos);
    }
    packet(0x82, &body)
}

fn publish(topic: &str, payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

/// A received PUBLISH.
#[derive(Debug, PartialEq, Eq)]
struct Message {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

struct Client<S: Read + Write> {
    stream: S,
    /// Sets the read timeout of the socket under `stream`.
    set_timeout: Box<dyn Fn(Duration)>,
}

impl Client<TcpStream> {
    fn plain(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).unwrap())
    }

    fn over(stream: TcpStream) -> Self {
        let socket = stream.try_clone().unwrap();
        let client = Client {
            stream,
            set_timeout: Box::new(move |t| socket.set_read_timeout(Some(t)).unwrap()),
        };
        (client.set_timeout)(LONG);
        client
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// One packet: (first byte, body).
    fn read(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut byte = [0u8; 1];
        self.stream.read_exact(&mut byte)?;
        let header = byte[0];
        let (mut len, mut shift) = (0usize, 0);
        loop {
            self.stream.read_exact(&mut byte)?;
            len |= usize::from(byte[0] & 0x7f) << shift;
            shift += 7;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        Ok((header, body))
    }

    fn expect(&mut self, what: &str) -> (u8, Vec<u8>) {
        match self.read() {
            Ok(p) => p,
            Err(e) => panic!("expected {what}, got {e}"),
        }
    }

    /// Sends CONNECT, returns the CONNACK return code.
    fn connect(&mut self, client_id: &str, username: Option<&str>, will: Option<Will>) -> u8 {
        self.send(&connect(client_id, username, will));
        let (header, body) = self.expect("CONNACK");
        assert_eq!((header, body.len()), (0x20, 2), "CONNACK");
        body[1]
    }

    /// Sends SUBSCRIBE, returns the SUBACK return codes.
    fn subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe(pkid, filters));
        let (header, body) = self.expect("SUBACK");
        assert_eq!(header, 0x90, "SUBACK");
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), pkid);
        body[2..].to_vec()
    }

    fn message(&mut self) -> Message {
        let (header, body) = self.expect("PUBLISH");
        assert_eq!(header & 0xf0, 0x30, "PUBLISH, got {header:#x}");
        let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
        let skip = if header & 0x06 != 0 { 2 } else { 0 };
        Message {
            topic,
            payload: body[2 + len + skip..].to_vec(),
            retain: header & 0x01 != 0,
        }
    }

    /// Nothing arrives for `SHORT` (the connection stays open).
    fn expect_nothing(&mut self) {
        (self.set_timeout)(SHORT);
        match self.read() {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("expected nothing, got {other:?}"),
        }
        (self.set_timeout)(LONG);
    }

    /// The broker closes the connection within `within`; returns the packets
    /// it sent before.
    fn expect_closed(&mut self, within: Duration) -> Vec<(u8, Vec<u8>)> {
        (self.set_timeout)(within);
        let mut before = Vec::new();
        loop {
            match self.read() {
                Ok(p) => before.push(p),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    panic!("connection still open after {within:?}")
                }
                Err(_) => return before, // EOF or reset
            }
        }
    }
}

fn message(topic: &str, payload: &[u8], retain: bool) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.into(),
        retain,
    }
}

// ---- authorisation ----

type Calls = Arc<Mutex<Vec<(String, Option<String>, String)>>>;

/// A broker whose hook refuses SUBSCRIBE filters under `denied/` and lets
/// only user `admin` publish under `state/`; records every call.
fn start_with_authorization() -> (SocketAddr, Calls) {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let mut server = server_settings();
    server.set_authorization_handler(move |identity: &Identity<'_>, access: Access<'_>| {
        seen.lock().unwrap().push((
            identity.client_id.to_owned(),
            identity.username.map(str::to_owned),
            format!("{access:?}"),
        ));
        match access {
            Access::Subscribe { filter } => !filter.starts_with("denied/"),
            Access::Publish { topic, .. } => {
                identity.username == Some("admin") || !topic.starts_with("state/")
            }
        }
    });
    (start(server), calls)
}

#[test]
fn a_refused_subscribe_filter_gets_0x80_and_receives_nothing_published_there() {
    let (addr, calls) = start_with_authorization();
    let mut sub = Client::plain(addr);
    assert_eq!(sub.connect("sub", Some("alice"), None), 0);
    // Refused, allowed, refused, in one SUBSCRIBE; then one all refused.
    assert_eq!(
        sub.subscribe(7, &[("denied/t", 0), ("ok/t", 1), ("denied/u", 1)]),
        [0x80, 0x01, 0x80]
    );
    assert_eq!(sub.subscribe(8, &[("denied/v", 0)]), [0x80]);
    assert_eq!(sub.subscribe(9, &[("ok/u", 0)]), [0x00]);

    let mut publisher = Client::plain(addr);
    assert_eq!(publisher.connect("pub", Some("bob"), None), 0);
    for topic in ["denied/t", "denied/u", "denied/v", "ok/t", "ok/u"] {
        publisher.send(&publish(topic, b"m", 0, false, 0));
    }
    assert_eq!(sub.message(), message("ok/t", b"m", false));
    assert_eq!(sub.message(), message("ok/u", b"m", false));
    sub.expect_nothing();

    let calls = calls.lock().unwrap();
    let asked = (
        "sub".to_string(),
        Some("alice".to_string()),
        format!("{:?}", Access::Subscribe { filter: "denied/t" }),
    );
    assert!(calls.contains(&asked), "{calls:?}");
}

#[test]
fn a_refused_publish_is_not_routed_and_its_sender_is_disconnected() {
    let (addr, _) = start_with_authorization();
    let mut watcher = Client::plain(addr);
    assert_eq!(watcher.connect("watcher", Some("alice"), None), 0);
    assert_eq!(watcher.subscribe(1, &[("state/#", 1), ("ok/#", 1)]), [1, 1]);

    let mut evil = Client::plain(addr);
    assert_eq!(evil.connect("evil", Some("mallory"), None), 0);
    // Allowed, refused, then one after the refused one: in one write.
    let mut batch = publish("ok/a", b"1", 1, false, 1);
    batch.extend(publish("state/x", b"2", 1, false, 2));
    batch.extend(publish("ok/b", b"3", 1, false, 3));
    evil.send(&batch);
    let before_close = evil.expect_closed(LONG);
    // Never a PUBACK for the refused publish (or the one after it).
    for (header, body) in &before_close {
        assert_eq!((*header, body.as_slice()), (0x40, &[0u8, 1][..]));
    }

    let mut good = Client::plain(addr);
    assert_eq!(good.connect("good", Some("alice"), None), 0);
    good.send(&publish("ok/c", b"4", 0, false, 0));

    assert_eq!(watcher.message(), message("ok/a", b"1", false));
    assert_eq!(watcher.message(), message("ok/c", b"4", false));
    watcher.expect_nothing();
}

#[test]
fn a_refused_retained_publish_leaves_the_retained_message_intact() {
    let (addr, _) = start_with_authorization();
    let mut admin = Client::plain(addr);
    assert_eq!(admin.connect("admin", Some("admin"), None), 0);
    admin.send(&publish("state/x", b"good", 1, true, 1));
    assert_eq!(admin.expect("PUBACK"), (0x40, vec![0, 1]));

    // Overwrite, then delete (an empty retained payload): both refused.
    for payload in [&b"bad"[..], b""] {
        let mut evil = Client::plain(addr);
        assert_eq!(evil.connect("evil", Some("mallory"), None), 0);
        evil.send(&publish("state/x", payload, 1, true, 1));
        assert!(evil.expect_closed(LONG).is_empty());
    }

    let mut late = Client::plain(addr);
    assert_eq!(late.connect("late", Some("alice"), None), 0);
    assert_eq!(late.subscribe(1, &[("state/x", 0)]), [0]);
    assert_eq!(late.message(), message("state/x", b"good", true));
    late.expect_nothing();
}

#[test]
fn a_will_on_a_topic_the_client_may_not_publish_to_refuses_the_connection() {
    let (addr, calls) = start_with_authorization();
    let will = || Will {
        topic: "state/x",
        payload: b"dead",
        retain: true,
    };
    // Twice: the second one finds what the first left behind.
    for _ in 0..2 {
        let mut evil = Client::plain(addr);
        assert_eq!(evil.connect("evil", Some("mallory"), Some(will())), 5);
        assert!(evil.expect_closed(LONG).is_empty());
    }
    assert!(calls.lock().unwrap().contains(&(
        "evil".to_string(),
        Some("mallory".to_string()),
        format!(
            "{:?}",
            Access::Publish {
                topic: "state/x",
                retain: true
            }
        ),
    )));

    let mut admin = Client::plain(addr);
    assert_eq!(admin.connect("admin", Some("admin"), Some(will())), 0);
    let mut fine = Client::plain(addr);
    let ok_will = Will {
        topic: "ok/will",
        payload: b"dead",
        retain: false,
    };
    assert_eq!(fine.connect("fine", Some("mallory"), Some(ok_will)), 0);
    // Still served: the broker is not stuck on the refused ones.
    assert_eq!(fine.subscribe(1, &[("ok/x", 0)]), [0]);

    // No retained will was planted.
    let mut late = Client::plain(addr);
    assert_eq!(late.connect("late", Some("alice"), None), 0);
    assert_eq!(late.subscribe(1, &[("state/x", 0)]), [0]);
    late.expect_nothing();
}

#[test]
fn without_an_authorization_hook_everything_is_allowed() {
    let addr = start(server_settings());
    let mut sub = Client::plain(addr);
    assert_eq!(sub.connect("sub", None, None), 0);
    assert_eq!(sub.subscribe(1, &[("denied/t", 0), ("state/x", 0)]), [0, 0]);
    let mut publisher = Client::plain(addr);
    let will = Will {
        topic: "state/x",
        payload: b"dead",
        retain: true,
    };
    assert_eq!(publisher.connect("pub", Some("mallory"), Some(will)), 0);
    publisher.send(&publish("denied/t", b"1", 0, false, 0));
    publisher.send(&publish("state/x", b"2", 0, false, 0));
    assert_eq!(sub.message(), message("denied/t", b"1", false));
    assert_eq!(sub.message(), message("state/x", b"2", false));
}

// ---- will handlers ----

#[test]
fn a_client_once_refused_by_the_router_can_connect_again() {
    let addr = start_with_max_connections(server_settings(), 1);
    let mut first = Client::plain(addr);
    assert_eq!(first.connect("first", None, None), 0);
    // No room: the router drops it before its link starts.
    let mut second = Client::plain(addr);
    second.send(&connect("second", None, None));
    assert!(second.expect_closed(LONG).is_empty());

    first.send(&[0xe0, 0]); // DISCONNECT
    assert!(first.expect_closed(LONG).is_empty());
    // The router frees the slot soon after; upstream's task panicked here
    // (`try_send(..).unwrap()` on the will channel of the refused one).
    let deadline = Instant::now() + LONG;
    loop {
        let mut again = Client::plain(addr);
        again.send(&connect("second", None, None));
        match again.read() {
            Ok((0x20, body)) => {
                assert_eq!(body, [0, 0]);
                break;
            }
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- peer filter ----

/// A plain TCP connection from `from` (any 127.x.y.z address is local).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

#[test]
fn the_peer_filter_closes_refused_peers_at_once_and_admits_others() {
    let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let mut server = server_settings();
    let log = seen.clone();
    server.set_peer_filter(move |peer: SocketAddr| {
        log.lock().unwrap().push(peer);
        peer.ip() != std::net::Ipv4Addr::new(127, 0, 0, 2)
    });
    let addr = start(server);

    for round in 0..2 {
        let refused = connect_from("127.0.0.2", addr);
        let refused_addr = refused.local_addr().unwrap();
        // Closed without a byte sent by the client.
        let mut refused = Client::over(refused);
        assert!(refused.expect_closed(Duration::from_secs(2)).is_empty());
        assert!(seen.lock().unwrap().contains(&refused_addr));

        let mut admitted = Client::over(connect_from("127.0.0.1", addr));
        assert_eq!(admitted.connect(&format!("admitted-{round}"), None, None), 0);
    }
}

// ---- TLS ----

mod tls {
    use super::*;
    use crate::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
        ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned,
    };
    use crate::TlsConfig;

    /// A TLS server with a provided rustls config for `localhost`, and a
    /// client config that trusts it.
    fn start_tls(connection_timeout_ms: u16) -> (SocketAddr, Arc<ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut server = server_settings();
        server.tls = Some(TlsConfig::Provided(Arc::new(server_config)));
        server.connections = connection_settings(connection_timeout_ms);
        (start(server), Arc::new(client_config))
    }

    fn tls_client(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
    ) -> Client<StreamOwned<ClientConnection, TcpStream>> {
        let socket = TcpStream::connect(addr).unwrap();
        let timeouts = socket.try_clone().unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let connection = ClientConnection::new(config.clone(), name).unwrap();
        let client = Client {
            stream: StreamOwned::new(connection, socket),
            set_timeout: Box::new(move |t| timeouts.set_read_timeout(Some(t)).unwrap()),
        };
        (client.set_timeout)(LONG);
        client
    }

    #[test]
    fn a_tls_server_with_a_provided_rustls_config_speaks_mqtt() {
        let (addr, config) = start_tls(5_000);
        let mut client = tls_client(addr, &config);
        assert_eq!(client.connect("tls-client", None, None), 0);
        assert!(client.stream.conn.peer_certificates().is_some());
        assert_eq!(client.subscribe(1, &[("t", 0)]), [0]);
        client.send(&publish("t", b"over tls", 0, false, 0));
        assert_eq!(client.message(), message("t", b"over tls", false));
    }

    #[test]
    fn the_file_based_rustls_config_still_works_on_rustls_0_23() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let mut server = server_settings();
        let dir = std::env::temp_dir().join(format!(
            "rumqttd-tls-{}-{}",
            std::process::id(),
            server.listen.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (certpath, keypath) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&certpath, certified.cert.pem()).unwrap();
        std::fs::write(&keypath, certified.signing_key.serialize_pem()).unwrap();
        server.tls = Some(TlsConfig::Rustls {
            capath: None,
            certpath: certpath.to_str().unwrap().into(),
            keypath: keypath.to_str().unwrap().into(),
        });
        let addr = start(server);

        let mut roots = RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut client = tls_client(addr, &Arc::new(config));
        assert_eq!(client.connect("file-tls", None, None), 0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_client_stalled_mid_handshake_does_not_stop_others_connecting() {
        // The stalled handshake is cut after 3 s; the others must get in
        // well before (their read timeout is 1 s).
        let (addr, config) = start_tls(3_000);
        let started = Instant::now();
        // Half a TLS record header, then nothing.
        let mut stalled = Client::plain(addr);
        stalled.send(&[0x16, 0x03, 0x01]);
        // Not TLS at all: refused at once, without a panic.
        let mut garbage = Client::plain(addr);
        garbage.send(b"GET / HTTP/1.1\r\n\r\n");
        std::thread::sleep(Duration::from_millis(100));

        for i in 0..2 {
            let mut client = tls_client(addr, &config);
            (client.set_timeout)(Duration::from_secs(1));
            assert_eq!(client.connect(&format!("tls-{i}"), None, None), 0);
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        // Answered with a TLS alert (or nothing) and closed.
        garbage.set_timeout_and_drain(Duration::from_secs(2));
        // The stalled one is closed once connection_timeout_ms has passed.
        stalled.set_timeout_and_drain(Duration::from_secs(6));
        assert!(started.elapsed() >= Duration::from_millis(2_900));
    }

    impl Client<TcpStream> {
        /// Reads raw bytes until the broker closes the connection.
        fn set_timeout_and_drain(&mut self, within: Duration) {
            self.stream.set_read_timeout(Some(within)).unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        panic!("connection still open after {within:?}")
                    }
                    Err(_) => return,
                }
            }
        }
    }
}
