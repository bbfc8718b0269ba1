use crate::link::local::{LinkError, LinkRx, LinkTx};
use crate::link::network;
use crate::link::network::Network;
use crate::local::LinkBuilder;
use crate::protocol::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, Protocol, SubscribeReasonCode,
};
use crate::router::{Event, Notification};
use crate::{Access, AuthorizationHandler, ConnectionId, ConnectionSettings, Identity};

use bytes::Bytes;
use flume::{RecvError, SendError, Sender, TrySendError};
use std::cmp::min;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::error::Elapsed;
use tokio::{select, time};
use tracing::{debug, trace, Span};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O")]
    Io(#[from] io::Error),
    #[error("Zero keep alive")]
    ZeroKeepAlive,
    #[error("Not connect packet")]
    NotConnectPacket(Packet),
    #[error("Network {0}")]
    Network(#[from] network::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Got new session, disconnecting old one")]
    SessionEnd,
    #[error("Persistent session requires valid client id")]
    InvalidClientId,
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Authentication error")]
    InvalidAuth,
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Link error = {0}")]
    Link(#[from] LinkError),
    /// aerekos patch: the authorisation hook refused a PUBLISH to this topic.
    #[error("Publish to {0:?} not authorized")]
    PublishNotAuthorized(String),
    /// aerekos patch: the authorisation hook refused the will of the CONNECT.
    #[error("Will on {0:?} not authorized")]
    WillNotAuthorized(String),
    /// aerekos patch: the client sent DISCONNECT, which the router has been
    /// handed (it ends the connection there): a clean end, not an error.
    #[error("Client sent DISCONNECT")]
    ClientDisconnected,
}

/// aerekos patch: the authorisation hook of a remote link
/// (`ConnectionSettings::set_authorization_handler`) and what it needs.
struct Authorizer {
    handler: AuthorizationHandler,
    client_id: String,
    username: Option<String>,
    tenant_id: Option<String>,
    /// (pkid, positions in the SUBSCRIBE) of the refused filters of the
    /// SUBSCRIBEs sent to the router whose SUBACK has not come back yet: the
    /// router answers for the other filters only, `0x80` goes in here.
    refused_filters: VecDeque<(u16, Vec<usize>)>,
    /// MQTT 5 topic aliases set by this client, to authorise (and route) a
    /// PUBLISH that carries only an alias as the topic it stands for.
    topic_aliases: HashMap<u16, Bytes>,
}

impl Authorizer {
    fn allows(&self, access: Access<'_>) -> bool {
        let identity = Identity {
            client_id: &self.client_id,
            username: self.username.as_deref(),
            tenant_id: self.tenant_id.as_deref(),
        };
        (self.handler)(&identity, access)
    }

    /// Checks the packets `buffer[first..]` read from the network before the
    /// router can see them (the caller holds the buffer's lock). Refused
    /// SUBSCRIBE filters are taken out (and remembered for the SUBACK). At a
    /// refused PUBLISH that packet and all after it are dropped and its topic
    /// is returned: the caller disconnects the client.
    fn check(&mut self, buffer: &mut VecDeque<Packet>, first: usize) -> Option<String> {
        for i in first..buffer.len() {
            match &mut buffer[i] {
                Packet::Publish(publish, properties) => {
                    let alias = properties.as_ref().and_then(|p| p.topic_alias);
                    if let (true, Some(alias)) = (publish.topic.is_empty(), alias) {
                        // The topic that the router will use for this alias.
                        if let Some(topic) = self.topic_aliases.get(&alias) {
                            publish.topic = topic.clone();
                        }
                    }
                    let allowed = match std::str::from_utf8(&publish.topic) {
                        Ok(topic) => self.allows(Access::Publish {
                            topic,
                            retain: publish.retain,
                        }),
                        // The router would refuse it too.
                        Err(_) => false,
                    };
                    if !allowed {
                        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                        buffer.truncate(i);
                        return Some(topic);
                    }
                    if let Some(alias) = alias {
                        // As the router does (`validate_and_set_topic_alias`);
                        // a copy, not a slice that would keep the read
                        // buffer alive.
                        if (1..=crate::router::TOPIC_ALIAS_MAX).contains(&alias) {
                            let topic = Bytes::copy_from_slice(&publish.topic);
                            self.topic_aliases.insert(alias, topic);
                        }
                    }
                }
                Packet::Subscribe(subscribe, _) => {
                    let mut refused = Vec::new();
                    let mut position = 0;
                    let handler = &self.handler;
                    let identity = Identity {
                        client_id: &self.client_id,
                        username: self.username.as_deref(),
                        tenant_id: self.tenant_id.as_deref(),
                    };
                    subscribe.filters.retain(|filter| {
                        let allowed = handler(
                            &identity,
                            Access::Subscribe {
                                filter: &filter.path,
                            },
                        );
                        if !allowed {
                            debug!(filter = filter.path, "subscribe not authorized");
                            refused.push(position);
                        }
                        position += 1;
                        allowed
                    });
                    if !refused.is_empty() {
                        self.refused_filters.push_back((subscribe.pkid, refused));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Puts `0x80` (failure) back in a SUBACK from the router for the
    /// filters that `check` took out of its SUBSCRIBE.
    fn complete_suback(&mut self, packet: &mut Packet) {
        let Packet::SubAck(suback, _) = packet else {
            return;
        };
        if self.refused_filters.front().map(|(pkid, _)| *pkid) != Some(suback.pkid) {
            return;
        }
        let Some((_, refused)) = self.refused_filters.pop_front() else {
            return;
        };
        for position in refused {
            let position = position.min(suback.return_codes.len());
            suback
                .return_codes
                .insert(position, SubscribeReasonCode::Failure);
        }
    }
}

/// Orchestrates between Router and Network.
pub struct RemoteLink<P> {
    connect: Connect,
    pub(crate) connection_id: ConnectionId,
    network: Network<P>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    notifications: VecDeque<Notification>,
    pub(crate) will_delay_interval: u32,
    /// aerekos patch: set when the server has an authorisation hook.
    authorizer: Option<Authorizer>,
}

impl<P: Protocol> RemoteLink<P> {
    pub async fn new(
        router_tx: Sender<(ConnectionId, Event)>,
        tenant_id: Option<String>,
        mut network: Network<P>,
        connect_packet: Packet,
        dynamic_filters: bool,
        assigned_client_id: Option<String>,
        // aerekos patch: the server's authorisation hook, if any.
        authorization: Option<AuthorizationHandler>,
    ) -> Result<RemoteLink<P>, Error> {
        let Packet::Connect(connect, props, lastwill, lastwill_props, login) = connect_packet
        else {
            return Err(Error::NotConnectPacket(connect_packet));
        };

        // aerekos patch: who the hook is told sent each packet.
        let authorizer = authorization.map(|handler| Authorizer {
            handler,
            client_id: assigned_client_id
                .clone()
                .unwrap_or_else(|| connect.client_id.clone()),
            username: login.map(|l| l.username),
            tenant_id: tenant_id.clone(),
            refused_filters: VecDeque::new(),
            topic_aliases: HashMap::new(),
        });

        // Register this connection with the router. Router replys with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex max connection limit)
        let client_id = assigned_client_id.as_ref().unwrap_or(&connect.client_id);
        let clean_session = connect.clean_session;

        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);

        let delay_interval = lastwill_props
            .as_ref()
            .and_then(|f| f.delay_interval)
            .unwrap_or(0);

        // The Server delays publishing the Client’s Will Message until
        // the Will Delay Interval has passed or the Session ends, whichever happens first
        let will_delay_interval = min(session_expiry, delay_interval);

        let (link_tx, link_rx, notification) = LinkBuilder::new(client_id, router_tx)
            .tenant_id(tenant_id)
            .clean_session(clean_session)
            .last_will(lastwill)
            .last_will_properties(lastwill_props)
            .dynamic_filters(dynamic_filters)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            .build()?;

        let id = link_rx.id();
        Span::current().record("connection_id", id);

        if let Some(mut packet) = notification.into() {
            if let Packet::ConnAck(_ack, props) = &mut packet {
                let mut new_props = props.clone().unwrap_or_default();
                new_props.assigned_client_identifier = assigned_client_id;
                *props = Some(new_props);
                network.write(packet).await?;
            }
        }

        Ok(RemoteLink {
            connect,
            connection_id: id,
            network,
            link_tx,
            link_rx,
            // aerekos patch: grows on demand (was preallocated: ~tens of KiB per idle client).
            notifications: VecDeque::new(),
            will_delay_interval,
            authorizer,
        })
    }

    pub async fn start(&mut self) -> Result<(), Error> {
        self.network.set_keepalive(self.connect.keep_alive);

        // Note:
        // Shouldn't result in bounded queue deadlocks because of blocking n/w send
        loop {
            select! {
                o = self.network.read() => {
                    let packet = o?;
                    let (len, refused, disconnect) = {
                        let mut buffer = self.link_tx.buffer();
                        let first = buffer.len();
                        buffer.push_back(packet);
                        let read = self.network.readv(&mut buffer);
                        // aerekos patch: authorised under the buffer's lock,
                        // before the router can take them, even when `readv`
                        // failed after reading some.
                        let refused = match &mut self.authorizer {
                            Some(authorizer) => authorizer.check(&mut buffer, first),
                            None => None,
                        };
                        read?;
                        // aerekos patch: a DISCONNECT from the client.
                        let disconnect = buffer
                            .iter()
                            .skip(first)
                            .any(|p| matches!(p, Packet::Disconnect(..)));
                        (buffer.len(), refused, disconnect)
                    };

                    trace!("Packets read from network, count = {}", len);
                    self.link_tx.notify().await?;
                    // aerekos patch: the packets before it are routed; the
                    // client is disconnected (MQTT 3.1.1 cannot refuse a
                    // PUBLISH otherwise).
                    if let Some(topic) = refused {
                        return Err(Error::PublishNotAuthorized(topic));
                    }
                    // aerekos patch: the router ends the connection at the
                    // DISCONNECT it was just handed (and drops this link's
                    // channels, which upstream logged as an ERROR
                    // "router-drop"); nothing more is sent to the client.
                    if disconnect {
                        return Err(Error::ClientDisconnected);
                    }
                }
                // Receive from router when previous when state isn't in collision
                // due to previously received data request
                o = self.link_rx.exchange(&mut self.notifications) => {
                    o?;
                    let mut packets = VecDeque::new();
                    let mut unscheduled = false;

                    for notif in self.notifications.drain(..) {
                        if let Some(mut packet) = notif.into() {
                            // aerekos patch: 0x80 for refused filters.
                            if let Some(authorizer) = &mut self.authorizer {
                                authorizer.complete_suback(&mut packet);
                            }
                            packets.push_back(packet);
                        } else {
                            unscheduled = true;
                        }

                    }
                    self.network.writev(packets).await?;
                    if unscheduled {
                        self.link_rx.wake().await?;
                    }
                }
            }
        }
    }
}

/// Read MQTT connect packet from network and verify it.
/// authentication and checks are done here.
pub async fn mqtt_connect<P>(
    config: Arc<ConnectionSettings>,
    network: &mut Network<P>,
) -> Result<Packet, Error>
where
    P: Protocol,
{
    // Wait for MQTT connect packet and error out if it's not received in time to prevent
    // DOS attacks by filling total connections that the server can handle with idle open
    // connections which results in server rejecting new connections
    let connection_timeout_ms = config.connection_timeout_ms.into();
    let packet = time::timeout(Duration::from_millis(connection_timeout_ms), async {
        let packet = network.read().await?;
        Ok::<_, network::Error>(packet)
    })
    .await??;

    let (connect, _props, login) = match packet {
        Packet::Connect(ref connect, ref props, _, _, ref login) => (connect, props, login),
        packet => return Err(Error::NotConnectPacket(packet)),
    };

    Span::current().record("client_id", &connect.client_id);

    handle_auth(config.clone(), login.as_ref(), &connect.client_id).await?;

    // When keep_alive feature is disabled client can live forever, which is not good in
    // distributed broker context so currenlty we don't allow it.
    if connect.keep_alive == 0 {
        return Err(Error::ZeroKeepAlive);
    }

    let empty_client_id = connect.client_id.is_empty();
    let clean_session = connect.clean_session;

    if empty_client_id && !clean_session {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::ClientIdentifierNotValid,
        };

        let packet = Packet::ConnAck(ack, None);
        network.write(packet).await?;

        return Err(Error::InvalidClientId);
    }

    // Ok((connect, props, lastwill, lastwill_props))
    Ok(packet)
}

async fn handle_auth(
    config: Arc<ConnectionSettings>,
    login: Option<&Login>,
    client_id: &str,
) -> Result<(), Error> {
    if config.auth.is_none() && config.external_auth.is_none() {
        return Ok(());
    }

    // if authentication is configured and connect packet doesn't have login details
    // return an error
    let Some(login) = login else {
        return Err(Error::InvalidAuth);
    };

    let username = &login.username;
    let password = &login.password;

    if let Some(auth) = &config.external_auth {
        if !auth(
            client_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        )
        .await
        {
            return Err(Error::InvalidAuth);
        }

        return Ok(());
    }

    if let Some(pairs) = &config.auth {
        if let Some(stored_password) = pairs.get(username) {
            if stored_password.as_bytes().ct_eq(password.as_bytes()).into() {
                return Ok(());
            }
        }

        return Err(Error::InvalidAuth);
    }

    Err(Error::InvalidAuth)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use crate::{protocol::Login, ConnectionSettings};

    use super::handle_auth;

    fn config() -> ConnectionSettings {
        ConnectionSettings {
            connection_timeout_ms: 0,
            max_payload_size: 0,
            max_inflight_count: 0,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
            external_authorization: None,
        }
    }

    fn login() -> Login {
        Login {
            username: "u".to_owned(),
            password: "p".to_owned(),
        }
    }

    #[tokio::test]
    async fn no_login_no_auth() {
        let cfg = Arc::new(config());
        let r = handle_auth(cfg, None, "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn some_login_no_auth() {
        let cfg = Arc::new(config());
        let login = login();
        let r = handle_auth(cfg, Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_matches_static_auth() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert(login.username.clone(), login.password.clone());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_no_external() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn login_fails_static_matches_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { true };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_fails_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { false };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn external_auth_clousre_or_fnptr_type_check_or_fail_compile() {
        let closure = |_: String, _: String, _: String| async { false };
        async fn fnptr(_: String, _: String, _: String) -> bool {
            true
        }

        let mut cfg = config();
        cfg.set_auth_handler(closure);
        cfg.set_auth_handler(fnptr);
    }
}

/// aerekos patch: the authorisation of packets read from the network.
#[cfg(test)]
mod authorization_tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex};

    use super::Authorizer;
    use crate::Identity;
    use crate::protocol::{
        Filter, Packet, Publish, PublishProperties, QoS, RetainForwardRule, SubAck, Subscribe,
        SubscribeReasonCode,
    };
    use crate::Access;

    /// Refuses retained publishes, and filters and topics under `denied/`;
    /// records what it was asked.
    fn authorizer() -> (Authorizer, Arc<Mutex<Vec<String>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let authorizer = Authorizer {
            handler: Arc::new(move |identity: &Identity<'_>, access: Access<'_>| {
                assert_eq!((identity.client_id, identity.username), ("c", Some("u")));
                log.lock().unwrap().push(format!("{access:?}"));
                match access {
                    Access::Publish { topic, retain } => !retain && !topic.starts_with("denied/"),
                    Access::Subscribe { filter } => !filter.starts_with("denied/"),
                }
            }),
            client_id: "c".into(),
            username: Some("u".into()),
            tenant_id: None,
            refused_filters: VecDeque::new(),
            topic_aliases: HashMap::new(),
        };
        (authorizer, asked)
    }

    fn publish(topic: &str, retain: bool, alias: Option<u16>) -> Packet {
        let properties = alias.map(|a| PublishProperties {
            topic_alias: Some(a),
            ..Default::default()
        });
        Packet::Publish(Publish::new(topic.to_string(), "p".into(), retain), properties)
    }

    fn subscribe(pkid: u16, filters: &[&str]) -> Packet {
        let filters = filters
            .iter()
            .map(|f| Filter {
                path: f.to_string(),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        Packet::Subscribe(Subscribe { pkid, filters }, None)
    }

    fn topic(packet: &Packet) -> &[u8] {
        match packet {
            Packet::Publish(p, _) => &p.topic,
            p => panic!("not a publish: {p:?}"),
        }
    }

    #[test]
    fn an_alias_only_publish_is_authorised_and_routed_as_its_topic() {
        let (mut authorizer, asked) = authorizer();
        let mut buffer = VecDeque::from([
            publish("ok/a", false, Some(1)),
            publish("", false, Some(1)),
            // The router sets aliases in the order it appends, which for
            // QoS 2 is at PUBREL: the link fills the topic in instead.
            publish("ok/b", false, Some(1)),
            publish("", false, Some(1)),
        ]);
        assert_eq!(authorizer.check(&mut buffer, 0), None);
        let topics: Vec<&[u8]> = buffer.iter().map(topic).collect();
        assert_eq!(topics, [&b"ok/a"[..], b"ok/a", b"ok/b", b"ok/b"]);

        // A retained publish on an alias is checked as retained.
        let mut buffer = VecDeque::from([publish("", true, Some(1))]);
        assert_eq!(authorizer.check(&mut buffer, 0), Some("ok/b".into()));
        assert!(buffer.is_empty());
        // An unknown alias: the hook is asked about the empty topic (which
        // the router then refuses: unknown alias).
        let mut buffer = VecDeque::from([publish("", false, Some(2))]);
        assert_eq!(authorizer.check(&mut buffer, 0), None);
        let asked = asked.lock().unwrap();
        let empty = Access::Publish {
            topic: "",
            retain: false,
        };
        assert_eq!(asked.len(), 6);
        assert_eq!(asked[5], format!("{empty:?}"));
    }

    #[test]
    fn only_packets_from_first_on_are_checked_and_a_refused_publish_cuts_the_rest() {
        let (mut authorizer, asked) = authorizer();
        let mut buffer = VecDeque::from([
            // Already checked, still waiting for the router.
            publish("denied/old", false, None),
            publish("ok/1", false, None),
            publish("denied/x", false, None),
            publish("ok/2", false, None),
        ]);
        assert_eq!(authorizer.check(&mut buffer, 1), Some("denied/x".into()));
        let topics: Vec<&[u8]> = buffer.iter().map(topic).collect();
        assert_eq!(topics, [&b"denied/old"[..], b"ok/1"]);
        assert_eq!(asked.lock().unwrap().len(), 2);
    }

    #[test]
    fn refused_filters_leave_the_subscribe_and_come_back_as_0x80_in_its_suback() {
        let (mut authorizer, _) = authorizer();
        let mut buffer = VecDeque::from([
            subscribe(1, &["denied/a", "ok/b", "denied/c", "ok/d"]),
            subscribe(2, &["ok/e"]),
            subscribe(3, &["denied/f"]),
        ]);
        assert_eq!(authorizer.check(&mut buffer, 0), None);
        let sent: Vec<Vec<String>> = buffer
            .iter()
            .map(|p| match p {
                Packet::Subscribe(s, _) => s.filters.iter().map(|f| f.path.clone()).collect(),
                p => panic!("{p:?}"),
            })
            .collect();
        assert_eq!(sent, [vec!["ok/b", "ok/d"], vec!["ok/e"], vec![]]);

        // The router's SUBACKs, in order, for what it was sent.
        let qos0 = SubscribeReasonCode::QoS0;
        let fail = SubscribeReasonCode::Failure;
        let acks = [(1, vec![qos0, qos0]), (2, vec![qos0]), (3, vec![])];
        let expected = [vec![fail, qos0, fail, qos0], vec![qos0], vec![fail]];
        for ((pkid, return_codes), expected) in acks.into_iter().zip(expected) {
            let mut ack = Packet::SubAck(SubAck { pkid, return_codes }, None);
            authorizer.complete_suback(&mut ack);
            match ack {
                Packet::SubAck(s, _) => assert_eq!(s.return_codes, expected),
                p => panic!("{p:?}"),
            }
        }
        assert!(authorizer.refused_filters.is_empty());
    }
}
