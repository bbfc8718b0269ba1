//! Authorisation on an external Mosquitto through its dynamic-security
//! plugin: the same rules the embedded broker enforces
//! ([`crate::broker::Credentials::authorize`]), written into the plugin by
//! the conductor over the plugin's MQTT control API.
//!
//! # What the conductor keeps in the plugin
//!
//! Every object it owns is named `aerekos-*`, plus one client per worker and
//! the observer client; it touches nothing else (other clients, roles,
//! groups, the default ACL access) except adding [`CONDUCTOR_ROLE`] to its
//! own login.
//!
//! * [`CONDUCTOR_ROLE`] ([`conductor_acls`]): publish, subscribe and receive
//!   anywhere under `aerekos/v1/#` (commands, `Stored` acknowledgements, the
//!   JSON mirror, the single `aerekos/v1/+/+` subscription). The admin role
//!   `mosquitto_ctrl dynsec init` creates may publish nothing outside
//!   `$CONTROL/dynamic-security/#`, so without this role the conductor's
//!   commands would be dropped silently. [`DynSec::ensure_roles`] adds it to
//!   the login the conductor uses.
//! * [`OBSERVER_ROLE`] ([`observer_acls`]): every publish denied. Subscribe:
//!   the literal filter `#` and any filter inside `aerekos/v1/#`; receive:
//!   only topics inside `aerekos/v1/#`. `#` is allowed because MQTT Explorer
//!   subscribes `#` by default (and `$SYS/#`, refused) and a refused `#`
//!   would leave a person looking at an empty tree; the receive rule keeps
//!   what a `#` subscription delivers to the aerekos tree, so the observer
//!   reads no other application's topics on a shared broker.
//! * With Home Assistant discovery on, both roles also cover the discovery
//!   prefix (`homeassistant/#`, [`DynSec::set_extra_trees`]): the conductor
//!   publishes the configs there and Home Assistant reads them with the
//!   observer login. Turned off, the next start takes those ACLs away.
//! * `aerekos-worker-<id>` ([`worker_acls`], one role per worker, username =
//!   client id = worker id): publish exactly its own worker-side topics
//!   ([`protocol::topic::worker_may_publish`]), subscribe to and receive
//!   exactly its own `cmd` and `cmd/stored`
//!   ([`protocol::topic::worker_may_subscribe`]), the lists derived from
//!   [`TopicKind::ALL`].
//!
//! The observer and worker roles end in catch-all denials (`#`,
//! `$CONTROL/#`, `$SYS/#`; priority [`DENY_PRIORITY`] under the allows'
//! [`ALLOW_PRIORITY`]), and their clients carry exactly that one role and no
//! group, so the broker's default ACL access and any group never decide for
//! them. A worker's subscription to another worker's `cmd` gets SUBACK 0x80;
//! a refused publish is dropped by Mosquitto without closing the connection
//! (QoS 1 still gets its PUBACK: MQTT 3.1.1 has no refusal code).
//!
//! # Idempotence and disconnections
//!
//! Each operation reads the objects it owns (one batched request), then
//! sends one batch with only what differs; calling it again changes
//! nothing, with one exception: Mosquitto cannot say whether a password
//! matches, so [`DynSec::add_worker`] on an existing client always sets the
//! password again. The plugin disconnects every session of a username
//! whenever it changes that client (password, client id, roles, deletion):
//!
//! * [`DynSec::add_worker`] on an existing worker closes its live session
//!   (a re-enrolled worker comes back with its new password);
//! * [`DynSec::remove_worker`] deletes the client (Mosquitto closes its live
//!   session, tested) and its role;
//! * the first [`DynSec::ensure_roles`] on a broker adds [`CONDUCTOR_ROLE`]
//!   to the conductor's login, which closes every session of that login,
//!   this module's own included (handled: the operation reconnects and
//!   checks again). Call it before the conductor's main MQTT session starts.
//!   The observer's password is checked by logging in with it (a throwaway
//!   client id), so an unchanged password does not disconnect a connected
//!   MQTT Explorer. (Mosquitto 2.0.11 then logs "Client <unknown>
//!   disconnected due to out of memory": its answer to the disconnected
//!   session, not a real shortage.)
//! * A changed role (`modifyRole`) disconnects nobody on 2.0.11; it applies
//!   from the next check, and since the roles also restrict what a client
//!   is sent (`publishClientReceive`), a subscription made before the
//!   change delivers nothing the new role forbids.
//!
//! A batch is applied by Mosquitto (single-threaded) in one go, so no other
//! admin's command lands in the middle of it; between the read and the
//! write another admin (`mosquitto_ctrl`, Management Center) may change the
//! same objects: a plugin answer such as "Client already exists" or "Role
//! not found" then makes the operation read and try again (3 attempts);
//! any other plugin error is returned with the plugin's message
//! ([`DynSecError::Plugin`]).
//!
//! # Ownership and locking
//!
//! [`DynSec`] is one MQTT connection (its own rumqttc session, client id
//! `conductor-dynsec-<random>`, clean session, the same login and TLS as
//! [`crate::mqtt::client`]) whose event loop is polled only by the method
//! being awaited: methods take `&mut self`, so one owner runs one request at
//! a time and no lock is needed. Between calls nobody polls it: the broker
//! may drop it after 1.5 × the 15 s keep-alive, and the next request then
//! reconnects (the request that finds it dead is retried).
//!
//! To use it from several places, [`DynSec::serve`] moves it into a task
//! (join it with the conductor's other tasks) that keeps the connection
//! alive and runs requests one after another from a queue; the
//! [`DynSecHandle`] it returns is `Clone + Send + Sync`, with `async`
//! methods and `*_blocking` ones for the HTTP threads (not from inside the
//! runtime).
//!
//! # Wiring (external broker only)
//!
//! * Start, before `subscriber::run_loop`: [`DynSec::connect`] with the
//!   conductor's [`crate::mqtt::MqttSettings`], [`DynSec::ensure_roles`]
//!   (with the observer password from the settings table to publish that
//!   login), then optionally [`DynSec::worker_ids`] and
//!   [`DynSec::remove_worker`] for every id that is not an enrolled,
//!   unrevoked worker; then [`DynSec::serve`].
//! * Enrolment: [`DynSecHandle::add_worker_blocking`] with the worker's new
//!   MQTT password before answering it (an error means the worker cannot log
//!   in: answer 503 so it retries).
//! * Revocation: [`DynSecHandle::remove_worker_blocking`].
//!
//! # Limits
//!
//! * The conductor stores only a hash of each worker's MQTT password, and
//!   the plugin accepts only clear passwords: a worker missing from the
//!   plugin (a reset dynamic-security file) cannot be re-created at start;
//!   it has to enrol again.
//! * Answers come on a topic every admin session receives, at QoS 0, one
//!   message per batch; this client matches them by `correlationData`. A
//!   lost answer is a [`DynSecError::Timeout`] after
//!   [`DEFAULT_TIMEOUT`] ([`DynSec::set_timeout`]); whether the commands were
//!   applied is then unknown (calling the operation again converges).
//!   Requests carry passwords in clear text: use `mqtts://` to a broker on
//!   another host. Mosquitto does not route `$CONTROL` messages to other
//!   subscribers.
//! * `$`-topics other than `$SYS` and `$CONTROL` are matched by no
//!   wildcard, so the broker's default ACL access decides for them; the
//!   default (`publishClientSend` and `subscribe` denied) is what
//!   `mosquitto_ctrl dynsec init` writes, and [`DynSec::ensure_roles`] logs
//!   a warning if the broker allows either by default.
//! * Written and tested against Mosquitto 2.0.11 (Debian 12). Mosquitto must
//!   be able to write its dynamic-security file: it saves it on every change.
//!
//! # Why one file (about 1,450 lines without its tests)
//!
//! It is one contract, the plugin's JSON control API, read in one place: the
//! ACL model (roles, priorities, the deny-all tails) and the client that
//! plans and applies the differences share the plugin's vocabulary (command
//! names, object shapes, its error texts) and the retry rules above, and
//! nothing else in the conductor uses either half. Half of the length is
//! the client's reconnect and retry paths, each next to the plugin behaviour
//! it answers.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::topic::{self, TopicKind};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Packet, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::broker::OBSERVER_USER;
use crate::mqtt::MqttSettings;

/// Where commands to the plugin are published.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin publishes its answers (to every subscribed admin).
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The observer's role.
pub const OBSERVER_ROLE: &str = "aerekos-observer";
/// The role added to the conductor's own login.
pub const CONDUCTOR_ROLE: &str = "aerekos-conductor";
/// A worker's role is this followed by its id.
pub const WORKER_ROLE_PREFIX: &str = "aerekos-worker-";
/// Priority of the allowing ACLs in the roles written here.
pub const ALLOW_PRIORITY: i64 = 10;
/// Priority of the catch-all denials (checked after every allow).
pub const DENY_PRIORITY: i64 = 0;
/// How long one request waits for the plugin's answer, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where distributions install the plugin ([`find_plugin`]).
pub const PLUGIN_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto/mosquitto_dynamic_security.so",
];

/// Operations are read-then-write; a change by another admin in between
/// (or this login being disconnected) makes them read again this often.
const ATTEMPTS: usize = 3;
/// Largest answer accepted (`listRoles` of a big fleet).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Errors talking to the dynamic-security plugin.
#[derive(Debug, thiserror::Error)]
pub enum DynSecError {
    /// The broker URL has no username.
    #[error(
        "the broker URL has no username: the conductor must log in as a dynamic-security admin \
         (mosquitto_ctrl dynsec init <file> <user>; --mqtt-url mqtt://<user>:<password>@host:port)"
    )]
    NoLogin,
    /// No MQTT connection could be made.
    #[error("cannot reach the MQTT broker at {addr}: {message}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// The last connection error.
        message: String,
    },
    /// The broker refused the login.
    #[error("the MQTT broker refused the login {username:?}: {code}")]
    Refused {
        /// The login.
        username: String,
        /// CONNACK return code.
        code: String,
    },
    /// The login may not read the plugin's answers.
    #[error(
        "the login {username:?} may not subscribe to {RESPONSE_TOPIC}: it is not a \
         dynamic-security admin, or the plugin is not loaded"
    )]
    NotAdmin {
        /// The login.
        username: String,
    },
    /// No answer in time.
    #[error(
        "no answer from the dynamic-security plugin within {0:?} (is the plugin loaded and the \
         login its admin?); the commands may or may not have been applied"
    )]
    Timeout(Duration),
    /// The connection dropped before the answer came.
    #[error("connection to the broker lost before the plugin answered ({0}); the commands may or may not have been applied")]
    ConnectionLost(String),
    /// The plugin refused a command.
    #[error("dynamic-security plugin, {command}: {message}")]
    Plugin {
        /// The command.
        command: String,
        /// The plugin's message.
        message: String,
    },
    /// An answer this client cannot read.
    #[error("unexpected answer from the dynamic-security plugin: {0}")]
    BadResponse(String),
    /// Not a worker id, or one that names the observer or the conductor.
    #[error("{0:?} cannot be a worker login")]
    InvalidWorker(String),
    /// The plugin refuses empty passwords (a client without one cannot log in).
    #[error("empty MQTT password")]
    EmptyPassword,
    /// The conductor logs in as the observer's username: giving that
    /// client the observer's role would take the admin role away.
    #[error("the conductor's login {0:?} is the observer's username")]
    ObserverIsAdmin(String),
    /// The operating system's random source failed.
    #[error("random source: {0}")]
    Random(String),
    /// The [`DynSec::serve`] task has ended.
    #[error("the dynamic-security task has stopped")]
    Stopped,
}

impl DynSecError {
    /// Whether reading the state again and retrying may succeed.
    fn retryable(&self) -> bool {
        match self {
            DynSecError::ConnectionLost(_) => true,
            DynSecError::Plugin { message, .. } => {
                let m = message.to_ascii_lowercase();
                m.contains("already exists")
                    || m.contains("not found")
                    || m.contains("does not exist")
            }
            _ => false,
        }
    }
}

/// The plugin's ACL types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AclType {
    /// A client publishing.
    PublishClientSend,
    /// A client being sent a message.
    PublishClientReceive,
    /// SUBSCRIBE, the filter compared literally.
    SubscribeLiteral,
    /// SUBSCRIBE, the filter matched against the ACL's wildcards.
    SubscribePattern,
    /// UNSUBSCRIBE, literal.
    UnsubscribeLiteral,
    /// UNSUBSCRIBE, pattern.
    UnsubscribePattern,
}

impl AclType {
    /// Every type.
    pub const ALL: [AclType; 6] = [
        AclType::PublishClientSend,
        AclType::PublishClientReceive,
        AclType::SubscribeLiteral,
        AclType::SubscribePattern,
        AclType::UnsubscribeLiteral,
        AclType::UnsubscribePattern,
    ];

    /// The plugin's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            AclType::PublishClientSend => "publishClientSend",
            AclType::PublishClientReceive => "publishClientReceive",
            AclType::SubscribeLiteral => "subscribeLiteral",
            AclType::SubscribePattern => "subscribePattern",
            AclType::UnsubscribeLiteral => "unsubscribeLiteral",
            AclType::UnsubscribePattern => "unsubscribePattern",
        }
    }

    /// Parses the plugin's name (case-insensitively, as the plugin does).
    pub fn parse(s: &str) -> Option<AclType> {
        AclType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

/// One ACL of a role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Acl {
    /// Which check it answers.
    pub acltype: AclType,
    /// Topic or filter.
    pub topic: String,
    /// Higher is checked first.
    pub priority: i64,
    /// Allow or deny.
    pub allow: bool,
}

impl Acl {
    fn allow(acltype: AclType, topic: impl Into<String>) -> Acl {
        Acl {
            acltype,
            topic: topic.into(),
            priority: ALLOW_PRIORITY,
            allow: true,
        }
    }

    fn deny(acltype: AclType, topic: impl Into<String>) -> Acl {
        Acl {
            acltype,
            topic: topic.into(),
            priority: DENY_PRIORITY,
            allow: false,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "acltype": self.acltype.as_str(),
            "topic": self.topic,
            "priority": self.priority,
            "allow": self.allow,
        })
    }

    fn from_json(v: &Value) -> Option<Acl> {
        Some(Acl {
            acltype: AclType::parse(v.get("acltype")?.as_str()?)?,
            topic: v.get("topic")?.as_str()?.to_string(),
            priority: v.get("priority").and_then(Value::as_i64).unwrap_or(0),
            allow: v.get("allow").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// `aerekos/v1/#`.
fn tree() -> String {
    format!("{}/#", topic::ROOT)
}

/// Denies for the given types on `#`, `$CONTROL/#` and `$SYS/#` (a
/// wildcard never matches a `$` topic, so those are named).
fn deny_all(types: &[AclType]) -> Vec<Acl> {
    let mut v = Vec::new();
    for &t in types {
        v.push(Acl::deny(t, "#"));
        if matches!(
            t,
            AclType::PublishClientSend | AclType::PublishClientReceive
        ) {
            v.push(Acl::deny(t, "$CONTROL/#"));
            v.push(Acl::deny(t, "$SYS/#"));
        }
    }
    v
}

/// A worker's role name.
pub fn worker_role(worker_id: &str) -> String {
    format!("{WORKER_ROLE_PREFIX}{worker_id}")
}

/// The ACLs of worker `worker_id`'s role: publish its worker-side topics,
/// subscribe to, receive and unsubscribe from its `cmd` and `cmd/stored`;
/// everything else denied (module docs).
pub fn worker_acls(worker_id: &str) -> Vec<Acl> {
    let own = || {
        TopicKind::ALL
            .into_iter()
            .map(|k| topic::topic(worker_id, k))
    };
    let mut acls: Vec<Acl> = own()
        .filter(|t| topic::worker_may_publish(worker_id, t))
        .map(|t| Acl::allow(AclType::PublishClientSend, t))
        .collect();
    for t in own().filter(|t| topic::worker_may_subscribe(worker_id, t)) {
        for ty in [
            AclType::SubscribeLiteral,
            AclType::PublishClientReceive,
            AclType::UnsubscribeLiteral,
        ] {
            acls.push(Acl::allow(ty, t.clone()));
        }
    }
    acls.extend(deny_all(&[
        AclType::PublishClientSend,
        AclType::PublishClientReceive,
        AclType::SubscribePattern,
        AclType::UnsubscribePattern,
    ]));
    acls
}

/// The observer's ACLs: subscribe to `#` (literally) or anything inside
/// `aerekos/v1/#` and the `extra` trees (`homeassistant/#` with Home
/// Assistant discovery on), receive only inside those, publish nothing
/// (module docs).
pub fn observer_acls(extra: &[String]) -> Vec<Acl> {
    let mut acls = vec![
        Acl::allow(AclType::SubscribeLiteral, "#"),
        Acl::allow(AclType::SubscribePattern, tree()),
        Acl::allow(AclType::PublishClientReceive, tree()),
        Acl::allow(AclType::UnsubscribePattern, "#"),
    ];
    for t in extra {
        acls.push(Acl::allow(AclType::SubscribePattern, t.clone()));
        acls.push(Acl::allow(AclType::PublishClientReceive, t.clone()));
    }
    acls.extend(deny_all(&[
        AclType::PublishClientSend,
        AclType::PublishClientReceive,
        AclType::SubscribePattern,
    ]));
    acls
}

/// The conductor's ACLs: everything inside `aerekos/v1/#` and the `extra`
/// trees (`homeassistant/#` with Home Assistant discovery on).
pub fn conductor_acls(extra: &[String]) -> Vec<Acl> {
    std::iter::once(tree())
        .chain(extra.iter().cloned())
        .flat_map(|topic| {
            [
                AclType::PublishClientSend,
                AclType::PublishClientReceive,
                AclType::SubscribePattern,
                AclType::UnsubscribePattern,
            ]
            .into_iter()
            .map(move |t| Acl::allow(t, topic.clone()))
        })
        .collect()
}

/// The first of [`PLUGIN_PATHS`] that exists.
pub fn find_plugin() -> Option<PathBuf> {
    PLUGIN_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// `s` quoted for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@=,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command that creates the dynamic-security file with the admin the
/// conductor logs in with (`mosquitto_ctrl` asks for the password).
pub fn init_command(dynsec_file: &Path, admin_user: &str) -> String {
    format!(
        "mosquitto_ctrl dynsec init {} {}",
        shell_quote(&dynsec_file.display().to_string()),
        shell_quote(admin_user)
    )
}

/// A Mosquitto configuration to start from: `listener` as Mosquitto writes
/// it (`1883`, `1883 127.0.0.1`), the plugin at `plugin`, its state in
/// `dynsec_file`, and in comments the [`init_command`] for `admin_user` and
/// the conductor's `--mqtt-url`.
pub fn mosquitto_config(
    listener: &str,
    plugin: &Path,
    dynsec_file: &Path,
    admin_user: &str,
) -> String {
    let port = listener.split_whitespace().next().unwrap_or("1883");
    format!(
        "# Mosquitto for aerekos: logins and ACLs come from the dynamic-security plugin,\n\
         # which the conductor manages (roles aerekos-*, one client per worker, `{observer}`).\n\
         #\n\
         # Once, before the first start: create the admin the conductor logs in with\n\
         # (mosquitto_ctrl asks for its password), and let Mosquitto write the file\n\
         # (it saves it on every change):\n\
         #   {init}\n\
         #   chown mosquitto: {file}\n\
         # Then: conductor serve --mqtt-url mqtt://{user}:<password>@<this host>:{port}\n\
         # (mqtts:// with a TLS listener when the conductor runs on another host).\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         plugin {plugin}\n\
         plugin_opt_config_file {file}\n\
         listener {listener}\n\
         set_tcp_nodelay true\n",
        observer = OBSERVER_USER,
        init = init_command(dynsec_file, admin_user),
        file = dynsec_file.display(),
        user = admin_user,
        plugin = plugin.display(),
    )
}

/// One answer of the plugin.
#[derive(Debug)]
struct Answer {
    command: String,
    error: Option<String>,
    data: Value,
}

impl Answer {
    /// The data, or the plugin's error.
    fn check(self) -> Result<Value, DynSecError> {
        match self.error {
            Some(message) => Err(DynSecError::Plugin {
                command: self.command,
                message,
            }),
            None => Ok(self.data),
        }
    }

    /// Like [`Answer::check`], with "… not found" as `None`.
    fn found(self) -> Result<Option<Value>, DynSecError> {
        if self
            .error
            .as_deref()
            .is_some_and(|e| e.to_ascii_lowercase().contains("not found"))
        {
            return Ok(None);
        }
        self.check().map(Some)
    }
}

/// What `getClient` says about a client.
#[derive(Debug, Default)]
struct ClientState {
    clientid: Option<String>,
    disabled: bool,
    roles: Vec<String>,
    groups: Vec<String>,
}

impl ClientState {
    fn parse(data: &Value) -> Result<ClientState, DynSecError> {
        let c = data
            .get("client")
            .ok_or_else(|| DynSecError::BadResponse(format!("getClient without client: {data}")))?;
        let names = |key: &str, field: &str| -> Vec<String> {
            c.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.get(field).and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(ClientState {
            clientid: c
                .get("clientid")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            disabled: c.get("disabled").and_then(Value::as_bool).unwrap_or(false),
            roles: names("roles", "rolename"),
            groups: names("groups", "groupname"),
        })
    }

    /// Carries exactly `role`, no group, the given client id, enabled.
    fn is_exactly(&self, role: &str, clientid: Option<&str>) -> bool {
        self.roles == [role] && self.groups.is_empty() && self.clientid.as_deref() == clientid
    }
}

/// The ACLs of a `getRole` answer (sorted); an unreadable one stays as a
/// sentinel so the comparison fails and the role is rewritten.
fn role_acls(data: &Value) -> Vec<Acl> {
    let mut acls: Vec<Acl> = data
        .get("role")
        .and_then(|r| r.get("acls"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| {
                    Acl::from_json(v).unwrap_or(Acl {
                        acltype: AclType::PublishClientSend,
                        topic: format!("\u{0}unreadable {v}"),
                        priority: 0,
                        allow: false,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    acls.sort();
    acls
}

fn cmd_get_role(name: &str) -> Value {
    json!({"command": "getRole", "rolename": name})
}

fn cmd_get_client(username: &str) -> Value {
    json!({"command": "getClient", "username": username})
}

fn role_list(role: &str) -> Value {
    json!([{ "rolename": role }])
}

/// Appends to `cmds` what makes role `name` hold exactly `want`.
fn plan_role(
    cmds: &mut Vec<Value>,
    changes: &mut Vec<String>,
    name: &str,
    current: Option<&Value>,
    mut want: Vec<Acl>,
    textname: &str,
) {
    want.sort();
    let acls: Vec<Value> = want.iter().map(Acl::to_json).collect();
    match current {
        None => {
            cmds.push(json!({
                "command": "createRole",
                "rolename": name,
                "textname": textname,
                "acls": acls,
            }));
            changes.push(format!("createRole {name}"));
        }
        Some(data) if role_acls(data) != want => {
            cmds.push(json!({"command": "modifyRole", "rolename": name, "acls": acls}));
            changes.push(format!("modifyRole {name}"));
        }
        Some(_) => {}
    }
}

fn note(changes: &mut Vec<String>, change: String) {
    if !changes.contains(&change) {
        changes.push(change);
    }
}

/// Builds a client for `settings`' broker the way [`crate::mqtt::client`]
/// does (same TLS, keep-alive, no Nagle), with its own id and login.
fn connection(
    settings: &MqttSettings,
    client_id: &str,
    username: &str,
    password: &str,
) -> (AsyncClient, EventLoop) {
    let mut opts = crate::mqtt::options(settings, client_id);
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_ANSWER, 1024 * 1024);
    opts.set_credentials(username, password);
    crate::mqtt::connect(opts, 16)
}

fn random_suffix() -> Result<String, DynSecError> {
    crate::crypto::random_hex::<6>().map_err(|e| DynSecError::Random(e.to_string()))
}

/// A connection to the dynamic-security plugin, logged in as one of its
/// admins (module docs).
pub struct DynSec {
    settings: MqttSettings,
    admin: String,
    client: AsyncClient,
    eventloop: EventLoop,
    /// Connected and subscribed to [`RESPONSE_TOPIC`] on this connection.
    ready: bool,
    timeout: Duration,
    nonce: String,
    seq: u64,
    /// Topic trees beyond `aerekos/v1/#` the conductor publishes to and the
    /// observer reads ([`DynSec::set_extra_trees`]).
    extra_trees: Vec<String>,
}

impl std::fmt::Debug for DynSec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynSec")
            .field("settings", &self.settings)
            .field("ready", &self.ready)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl DynSec {
    /// Connects with `settings` (host, port, login, TLS) and subscribes to
    /// the plugin's answers; fails if the login is refused or is not an admin.
    pub async fn connect(settings: &MqttSettings) -> Result<DynSec, DynSecError> {
        let admin = settings
            .username
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or(DynSecError::NoLogin)?;
        let nonce = random_suffix()?;
        let (client, eventloop) = connection(
            settings,
            &format!("{}-dynsec-{nonce}", crate::mqtt::CLIENT_ID),
            &admin,
            settings.password.as_deref().unwrap_or_default(),
        );
        let mut ds = DynSec {
            settings: settings.clone(),
            admin,
            client,
            eventloop,
            ready: false,
            timeout: DEFAULT_TIMEOUT,
            nonce,
            seq: 0,
            extra_trees: Vec::new(),
        };
        let deadline = Instant::now() + ds.timeout;
        ds.ensure_ready(deadline).await?;
        Ok(ds)
    }

    /// Topic filters (`homeassistant/#`) that [`DynSec::ensure_roles`] adds to
    /// the conductor's role (publish, subscribe, receive) and the observer's
    /// (subscribe, receive) beside `aerekos/v1/#`.
    pub fn set_extra_trees(&mut self, trees: Vec<String>) {
        self.extra_trees = trees;
    }

    /// How long each request waits for its answer ([`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The login this connection uses (the one given [`CONDUCTOR_ROLE`]).
    pub fn admin_username(&self) -> &str {
        &self.admin
    }

    /// Drops the network connection; the next poll reconnects.
    fn reset(&mut self) {
        self.eventloop.clean();
        self.ready = false;
    }

    /// Polls until connected and subscribed to [`RESPONSE_TOPIC`].
    async fn ensure_ready(&mut self, deadline: Instant) -> Result<(), DynSecError> {
        let mut last_error = None;
        while !self.ready {
            let Ok(ev) = tokio::time::timeout_at(deadline, self.eventloop.poll()).await else {
                self.reset();
                return Err(match last_error {
                    Some(message) => DynSecError::Unreachable {
                        addr: format!("{}:{}", self.settings.host, self.settings.port),
                        message,
                    },
                    None => DynSecError::Timeout(self.timeout),
                });
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    self.client
                        .try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce)
                        .map_err(|e| DynSecError::ConnectionLost(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                    {
                        self.ready = true;
                    } else {
                        self.reset();
                        return Err(DynSecError::NotAdmin {
                            username: self.admin.clone(),
                        });
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(DynSecError::Refused {
                        username: self.admin.clone(),
                        code: format!("{code:?}"),
                    });
                }
                Err(e) => {
                    debug!("dynsec connection: {e}");
                    last_error = Some(e.to_string());
                    let pause = Instant::now() + Duration::from_millis(200);
                    tokio::time::sleep_until(pause.min(deadline)).await;
                }
            }
        }
        Ok(())
    }

    /// Sends `commands` as one message and returns the answers in order.
    async fn exec(&mut self, commands: Vec<Value>) -> Result<Vec<Answer>, DynSecError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + self.timeout;
        self.ensure_ready(deadline).await?;
        let mut ids = Vec::with_capacity(commands.len());
        let commands: Vec<Value> = commands
            .into_iter()
            .map(|mut c| {
                self.seq += 1;
                let id = format!("{}-{}", self.nonce, self.seq);
                c["correlationData"] = Value::String(id.clone());
                ids.push(id);
                c
            })
            .collect();
        let names: Vec<&str> = commands
            .iter()
            .filter_map(|c| c["command"].as_str())
            .collect();
        debug!(commands = ?names, "dynsec request");
        let payload = json!({ "commands": commands }).to_string();
        self.client
            .try_publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload)
            .map_err(|e| DynSecError::ConnectionLost(e.to_string()))?;
        let mut answers: Vec<Option<Answer>> = ids.iter().map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            let Ok(ev) = tokio::time::timeout_at(deadline, self.eventloop.poll()).await else {
                self.reset();
                return Err(DynSecError::Timeout(self.timeout));
            };
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE_TOPIC => {
                    absorb(&p.payload, &ids, &mut answers);
                }
                Ok(_) => {}
                Err(e) => {
                    self.ready = false;
                    return Err(DynSecError::ConnectionLost(e.to_string()));
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Whether `username`/`password` can log in (a throwaway client id).
    async fn login_works(&self, username: &str, password: &str) -> Result<bool, DynSecError> {
        let id = format!("{}-probe-{}", crate::mqtt::CLIENT_ID, random_suffix()?);
        let (client, mut eventloop) = connection(&self.settings, &id, username, password);
        let deadline = Instant::now() + self.timeout;
        let result = loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) => break Err(DynSecError::Timeout(self.timeout)),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break Ok(true),
                Ok(Ok(_)) => {}
                Ok(Err(ConnectionError::ConnectionRefused(_))) => break Ok(false),
                Ok(Err(e)) => {
                    break Err(DynSecError::Unreachable {
                        addr: format!("{}:{}", self.settings.host, self.settings.port),
                        message: e.to_string(),
                    })
                }
            }
        };
        if matches!(result, Ok(true)) && client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(ev) = eventloop.poll().await {
                    if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        result
    }

    /// Makes [`OBSERVER_ROLE`] and [`CONDUCTOR_ROLE`] hold exactly their
    /// ACLs and gives this login [`CONDUCTOR_ROLE`]; with
    /// `observer_password`, also makes the client [`OBSERVER_USER`] exist
    /// with that password, exactly that role, no group and no fixed client
    /// id (without it, the observer client is left as it is). Returns the
    /// changes made (empty when everything was in place). The first run on
    /// a broker disconnects every session of this login (module docs).
    pub async fn ensure_roles(
        &mut self,
        observer_password: Option<&str>,
    ) -> Result<Vec<String>, DynSecError> {
        if let Some(p) = observer_password {
            if self.admin == OBSERVER_USER {
                return Err(DynSecError::ObserverIsAdmin(self.admin.clone()));
            }
            if p.is_empty() {
                return Err(DynSecError::EmptyPassword);
            }
        }
        let mut changes = Vec::new();
        let mut attempt = 1;
        loop {
            match self
                .ensure_roles_once(observer_password, &mut changes)
                .await
            {
                Err(e) if attempt < ATTEMPTS && e.retryable() => {
                    debug!("dynsec ensure_roles, trying again: {e}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    if !changes.is_empty() {
                        info!(?changes, "dynamic-security roles updated");
                    }
                    return Ok(changes);
                }
            }
        }
    }

    async fn ensure_roles_once(
        &mut self,
        observer_password: Option<&str>,
        changes: &mut Vec<String>,
    ) -> Result<(), DynSecError> {
        let mut reads = vec![
            cmd_get_role(OBSERVER_ROLE),
            cmd_get_role(CONDUCTOR_ROLE),
            cmd_get_client(&self.admin),
            json!({"command": "getDefaultACLAccess"}),
        ];
        if observer_password.is_some() {
            reads.push(cmd_get_client(OBSERVER_USER));
        }
        let mut answers = self.exec(reads).await?.into_iter();
        let mut next = || {
            answers
                .next()
                .ok_or_else(|| DynSecError::BadResponse("missing answer".into()))
        };
        let observer_role = next()?.found()?;
        let conductor_role = next()?.found()?;
        let admin = match next()?.found()? {
            Some(data) => ClientState::parse(&data)?,
            None => {
                return Err(DynSecError::BadResponse(format!(
                    "the login {:?} is not a dynamic-security client",
                    self.admin
                )))
            }
        };
        warn_on_defaults(&next()?.check()?);
        let observer = match observer_password {
            Some(_) => next()?
                .found()?
                .map(|d| ClientState::parse(&d))
                .transpose()?,
            None => None,
        };

        let mut cmds = Vec::new();
        let mut planned = Vec::new();
        plan_role(
            &mut cmds,
            &mut planned,
            OBSERVER_ROLE,
            observer_role.as_ref(),
            observer_acls(&self.extra_trees),
            "aerekos observer (MQTT Explorer): reads aerekos/v1/#, publishes nothing",
        );
        plan_role(
            &mut cmds,
            &mut planned,
            CONDUCTOR_ROLE,
            conductor_role.as_ref(),
            conductor_acls(&self.extra_trees),
            "aerekos conductor: commands, acknowledgements, JSON mirror",
        );
        if let Some(password) = observer_password {
            match observer {
                None => {
                    cmds.push(json!({
                        "command": "createClient",
                        "username": OBSERVER_USER,
                        "password": password,
                        "textname": "aerekos observer",
                        "roles": role_list(OBSERVER_ROLE),
                    }));
                    planned.push(format!("createClient {OBSERVER_USER}"));
                }
                Some(st) => {
                    if st.disabled {
                        cmds.push(json!({"command": "enableClient", "username": OBSERVER_USER}));
                        planned.push(format!("enableClient {OBSERVER_USER}"));
                    }
                    let in_place = st.is_exactly(OBSERVER_ROLE, None)
                        && !st.disabled
                        && self.login_works(OBSERVER_USER, password).await?;
                    if !in_place {
                        cmds.push(json!({
                            "command": "modifyClient",
                            "username": OBSERVER_USER,
                            "password": password,
                            "clientid": "",
                            "roles": role_list(OBSERVER_ROLE),
                            "groups": [],
                        }));
                        planned.push(format!("modifyClient {OBSERVER_USER}"));
                    }
                }
            }
        }
        // Last: Mosquitto disconnects every session of this login, this
        // one included, so its answer may never arrive (the caller reads
        // again).
        if !admin.roles.iter().any(|r| r == CONDUCTOR_ROLE) {
            cmds.push(json!({
                "command": "addClientRole",
                "username": self.admin,
                "rolename": CONDUCTOR_ROLE,
            }));
            planned.push(format!("addClientRole {} {CONDUCTOR_ROLE}", self.admin));
        }
        for c in planned {
            note(changes, c);
        }
        for a in self.exec(cmds).await? {
            a.check()?;
        }
        Ok(())
    }

    /// Creates or updates the client for worker `worker_id` (username and
    /// client id = the worker id) with `password` and exactly the role
    /// `aerekos-worker-<id>` ([`worker_acls`]). Returns the changes made.
    /// An existing client always gets the password again, and Mosquitto
    /// then closes its live session (module docs).
    pub async fn add_worker(
        &mut self,
        worker_id: &str,
        password: &str,
    ) -> Result<Vec<String>, DynSecError> {
        self.check_worker_id(worker_id)?;
        if password.is_empty() {
            return Err(DynSecError::EmptyPassword);
        }
        let mut changes = Vec::new();
        let mut attempt = 1;
        loop {
            match self
                .add_worker_once(worker_id, password, &mut changes)
                .await
            {
                Err(e) if attempt < ATTEMPTS && e.retryable() => {
                    debug!(worker_id, "dynsec add_worker, trying again: {e}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(changes),
            }
        }
    }

    async fn add_worker_once(
        &mut self,
        worker_id: &str,
        password: &str,
        changes: &mut Vec<String>,
    ) -> Result<(), DynSecError> {
        let role = worker_role(worker_id);
        let mut answers = self
            .exec(vec![cmd_get_role(&role), cmd_get_client(worker_id)])
            .await?
            .into_iter();
        let mut next = || {
            answers
                .next()
                .ok_or_else(|| DynSecError::BadResponse("missing answer".into()))
        };
        let current_role = next()?.found()?;
        let client = next()?
            .found()?
            .map(|d| ClientState::parse(&d))
            .transpose()?;
        let mut cmds = Vec::new();
        let mut planned = Vec::new();
        plan_role(
            &mut cmds,
            &mut planned,
            &role,
            current_role.as_ref(),
            worker_acls(worker_id),
            "aerekos worker",
        );
        match client {
            None => {
                cmds.push(json!({
                    "command": "createClient",
                    "username": worker_id,
                    "password": password,
                    "clientid": worker_id,
                    "textname": "aerekos worker",
                    "roles": role_list(&role),
                }));
                planned.push(format!("createClient {worker_id}"));
            }
            Some(st) => {
                if st.disabled {
                    cmds.push(json!({"command": "enableClient", "username": worker_id}));
                    planned.push(format!("enableClient {worker_id}"));
                }
                cmds.push(json!({
                    "command": "modifyClient",
                    "username": worker_id,
                    "password": password,
                    "clientid": worker_id,
                    "roles": role_list(&role),
                    "groups": [],
                }));
                planned.push(format!("modifyClient {worker_id}"));
            }
        }
        for c in planned {
            note(changes, c);
        }
        for a in self.exec(cmds).await? {
            a.check()?;
        }
        Ok(())
    }

    /// Deletes worker `worker_id`'s client (Mosquitto closes its live
    /// session) and role; either being absent already is fine. Returns the
    /// changes made.
    pub async fn remove_worker(&mut self, worker_id: &str) -> Result<Vec<String>, DynSecError> {
        self.check_worker_id(worker_id)?;
        let mut attempt = 1;
        loop {
            match self.remove_worker_once(worker_id).await {
                Err(e) if attempt < ATTEMPTS && e.retryable() => {
                    debug!(worker_id, "dynsec remove_worker, trying again: {e}");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn remove_worker_once(&mut self, worker_id: &str) -> Result<Vec<String>, DynSecError> {
        let role = worker_role(worker_id);
        let answers = self
            .exec(vec![
                json!({"command": "deleteClient", "username": worker_id}),
                json!({"command": "deleteRole", "rolename": role}),
            ])
            .await?;
        let mut changes = Vec::new();
        for (a, what) in answers.into_iter().zip([
            format!("deleteClient {worker_id}"),
            format!("deleteRole {role}"),
        ]) {
            if a.found()?.is_some() {
                changes.push(what);
            }
        }
        Ok(changes)
    }

    /// The worker ids that have a role in the plugin (for a clean-up of
    /// revoked or unknown workers at start).
    pub async fn worker_ids(&mut self) -> Result<Vec<String>, DynSecError> {
        let mut attempt = 1;
        let data = loop {
            let r = self
                .exec(vec![json!({"command": "listRoles", "verbose": false})])
                .await
                .and_then(|a| {
                    a.into_iter()
                        .next()
                        .ok_or_else(|| DynSecError::BadResponse("missing answer".into()))?
                        .check()
                });
            match r {
                Err(e) if attempt < ATTEMPTS && e.retryable() => attempt += 1,
                r => break r?,
            }
        };
        let roles = data
            .get("roles")
            .and_then(Value::as_array)
            .ok_or_else(|| DynSecError::BadResponse(format!("listRoles: {data}")))?;
        Ok(roles
            .iter()
            .filter_map(|r| {
                // Non-verbose lists are names; verbose ones objects.
                r.as_str()
                    .or_else(|| r.get("rolename").and_then(Value::as_str))
            })
            .filter_map(|r| r.strip_prefix(WORKER_ROLE_PREFIX))
            .filter(|id| topic::is_valid_worker_id(id))
            .map(str::to_string)
            .collect())
    }

    fn check_worker_id(&self, worker_id: &str) -> Result<(), DynSecError> {
        if !topic::is_valid_worker_id(worker_id)
            || worker_id == OBSERVER_USER
            || worker_id == self.admin
        {
            return Err(DynSecError::InvalidWorker(worker_id.to_string()));
        }
        Ok(())
    }

    /// Moves the connection into a task that keeps it alive and runs the
    /// [`DynSecHandle`]'s requests one at a time. The task ends when `stop`
    /// turns true (or its sender is dropped) or every handle is dropped;
    /// requests queued then fail with [`DynSecError::Stopped`].
    pub fn serve(
        mut self,
        mut stop: watch::Receiver<bool>,
    ) -> (DynSecHandle, impl Future<Output = ()>) {
        let (tx, mut rx) = mpsc::channel::<Job>(64);
        let task = async move {
            enum Wake {
                Job(Option<Job>),
                Net(Result<Event, ConnectionError>),
                Retry,
                Stop,
            }
            let mut backoff = Duration::from_millis(200);
            let mut retry_at: Option<Instant> = None;
            let mut failures: u64 = 0;
            loop {
                let wake = match retry_at {
                    Some(at) => tokio::select! {
                        job = rx.recv() => Wake::Job(job),
                        _ = tokio::time::sleep_until(at) => Wake::Retry,
                        _ = stop.changed() => Wake::Stop,
                    },
                    None => tokio::select! {
                        job = rx.recv() => Wake::Job(job),
                        ev = self.eventloop.poll() => Wake::Net(ev),
                        _ = stop.changed() => Wake::Stop,
                    },
                };
                match wake {
                    Wake::Job(None) | Wake::Stop => break,
                    Wake::Job(Some(job)) => {
                        retry_at = None;
                        self.run(job).await;
                    }
                    Wake::Retry => retry_at = None,
                    Wake::Net(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        backoff = Duration::from_millis(200);
                        failures = 0;
                        let _ = self.client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce);
                    }
                    Wake::Net(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                        self.ready = ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                        if !self.ready {
                            warn!(
                                "{}",
                                DynSecError::NotAdmin {
                                    username: self.admin.clone()
                                }
                            );
                        }
                    }
                    Wake::Net(Ok(_)) => {}
                    Wake::Net(Err(e)) => {
                        self.ready = false;
                        failures += 1;
                        if failures == 1 || failures.is_power_of_two() {
                            warn!(
                                failures,
                                "dynamic-security connection: {e}; retrying in {backoff:?}"
                            );
                        }
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            drop(rx);
            if self.client.try_disconnect().is_ok() {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Ok(ev) = self.eventloop.poll().await {
                        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                            break;
                        }
                    }
                })
                .await;
            }
        };
        (DynSecHandle { tx }, task)
    }

    async fn run(&mut self, job: Job) {
        match job {
            Job::AddWorker {
                id,
                password,
                reply,
            } => {
                let _ = reply.send(self.add_worker(&id, &password).await);
            }
            Job::RemoveWorker { id, reply } => {
                let _ = reply.send(self.remove_worker(&id).await);
            }
        }
    }
}

/// Logs when the broker's default ACL access lets a client publish or
/// subscribe where no ACL matches (module docs, limits).
fn warn_on_defaults(data: &Value) {
    let allowed: Vec<&str> = data
        .get("acls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| a.get("allow").and_then(Value::as_bool) == Some(true))
        .filter_map(|a| a.get("acltype").and_then(Value::as_str))
        .filter(|t| matches!(*t, "publishClientSend" | "subscribe"))
        .collect();
    if !allowed.is_empty() {
        warn!(
            ?allowed,
            "the broker's dynamic-security default ACL access allows {allowed:?}: aerekos roles \
             deny everything outside their topics, but $-topics other than $SYS and $CONTROL \
             fall to that default"
        );
    }
}

/// Stores the answers in `payload` whose correlation data is one of `ids`.
fn absorb(payload: &[u8], ids: &[String], answers: &mut [Option<Answer>]) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        debug!("dynsec: unreadable answer ignored");
        return;
    };
    let Some(responses) = v.get("responses").and_then(Value::as_array) else {
        return;
    };
    for r in responses {
        let Some(corr) = r.get("correlationData").and_then(Value::as_str) else {
            continue;
        };
        let Some(i) = ids.iter().position(|id| id == corr) else {
            continue;
        };
        if let Some(slot) = answers.get_mut(i) {
            *slot = Some(Answer {
                command: r
                    .get("command")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                error: r.get("error").and_then(Value::as_str).map(str::to_string),
                data: r.get("data").cloned().unwrap_or(Value::Null),
            });
        }
    }
}

enum Job {
    AddWorker {
        id: String,
        password: String,
        reply: oneshot::Sender<Result<Vec<String>, DynSecError>>,
    },
    RemoveWorker {
        id: String,
        reply: oneshot::Sender<Result<Vec<String>, DynSecError>>,
    },
}

/// Queues requests for the task [`DynSec::serve`] returned.
#[derive(Debug, Clone)]
pub struct DynSecHandle {
    tx: mpsc::Sender<Job>,
}

impl DynSecHandle {
    /// [`DynSec::add_worker`].
    pub async fn add_worker(
        &self,
        worker_id: &str,
        password: &str,
    ) -> Result<Vec<String>, DynSecError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::AddWorker {
                id: worker_id.to_string(),
                password: password.to_string(),
                reply,
            })
            .await
            .map_err(|_| DynSecError::Stopped)?;
        rx.await.map_err(|_| DynSecError::Stopped)?
    }

    /// [`DynSec::remove_worker`].
    pub async fn remove_worker(&self, worker_id: &str) -> Result<Vec<String>, DynSecError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::RemoveWorker {
                id: worker_id.to_string(),
                reply,
            })
            .await
            .map_err(|_| DynSecError::Stopped)?;
        rx.await.map_err(|_| DynSecError::Stopped)?
    }

    /// [`DynSec::add_worker`] from a thread outside the runtime (an HTTP
    /// thread); panics if called from async code.
    pub fn add_worker_blocking(
        &self,
        worker_id: &str,
        password: &str,
    ) -> Result<Vec<String>, DynSecError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Job::AddWorker {
                id: worker_id.to_string(),
                password: password.to_string(),
                reply,
            })
            .map_err(|_| DynSecError::Stopped)?;
        rx.blocking_recv().map_err(|_| DynSecError::Stopped)?
    }

    /// [`DynSec::remove_worker`] from a thread outside the runtime; panics
    /// if called from async code.
    pub fn remove_worker_blocking(&self, worker_id: &str) -> Result<Vec<String>, DynSecError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Job::RemoveWorker {
                id: worker_id.to_string(),
                reply,
            })
            .map_err(|_| DynSecError::Stopped)?;
        rx.blocking_recv().map_err(|_| DynSecError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::topic::{topic, Publisher};

    #[test]
    fn worker_role_is_derived_from_the_topic_rules() {
        let me = "w-000000000001";
        let acls = worker_acls(me);
        let allowed = |ty: AclType| -> Vec<String> {
            let mut v: Vec<String> = acls
                .iter()
                .filter(|a| a.acltype == ty && a.allow)
                .map(|a| a.topic.clone())
                .collect();
            v.sort();
            v
        };
        let mut publish: Vec<String> = TopicKind::ALL
            .into_iter()
            .filter(|k| k.publisher() == Publisher::Worker)
            .map(|k| topic(me, k))
            .collect();
        publish.sort();
        assert_eq!(allowed(AclType::PublishClientSend), publish);
        let mut read = vec![topic(me, TopicKind::Cmd), topic(me, TopicKind::Stored)];
        read.sort();
        assert_eq!(allowed(AclType::SubscribeLiteral), read);
        assert_eq!(allowed(AclType::PublishClientReceive), read);
        assert!(allowed(AclType::SubscribePattern).is_empty());
        // Every allow outranks every deny, and every type that can allow
        // anything (or match by pattern) ends in a catch-all denial.
        for a in &acls {
            assert_eq!(
                a.priority,
                if a.allow {
                    ALLOW_PRIORITY
                } else {
                    DENY_PRIORITY
                }
            );
        }
        for ty in [
            AclType::PublishClientSend,
            AclType::PublishClientReceive,
            AclType::SubscribePattern,
            AclType::UnsubscribePattern,
        ] {
            assert!(
                acls.iter()
                    .any(|a| a.acltype == ty && a.topic == "#" && !a.allow),
                "{ty:?}"
            );
        }
        // No (type, topic) twice: the plugin keys a role's ACLs by topic.
        let mut keys: Vec<_> = acls.iter().map(|a| (a.acltype, a.topic.clone())).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), acls.len());
    }

    #[test]
    fn observer_publishes_nothing_and_reads_the_tree() {
        let acls = observer_acls(&[]);
        assert!(acls
            .iter()
            .filter(|a| a.acltype == AclType::PublishClientSend)
            .all(|a| !a.allow));
        assert!(acls.contains(&Acl::allow(AclType::SubscribeLiteral, "#")));
        assert!(acls.contains(&Acl::allow(AclType::PublishClientReceive, "aerekos/v1/#")));
        assert!(acls.contains(&Acl::deny(AclType::PublishClientReceive, "#")));
    }

    #[test]
    fn acl_json_round_trips() {
        for a in worker_acls("w-1")
            .into_iter()
            .chain(observer_acls(&[]))
            .chain(conductor_acls(&[]))
        {
            assert_eq!(Acl::from_json(&a.to_json()), Some(a));
        }
        assert_eq!(
            AclType::parse("SUBSCRIBEliteral"),
            Some(AclType::SubscribeLiteral)
        );
        assert_eq!(AclType::parse("subscribe"), None);
    }

    #[test]
    fn answers_are_matched_by_correlation_data() {
        let ids = vec!["n-1".to_string(), "n-2".to_string()];
        let mut answers = vec![None, None];
        absorb(
            br#"{"responses":[{"command":"getRole","correlationData":"other-1"},
                {"command":"getClient","error":"Client not found","correlationData":"n-2"}]}"#,
            &ids,
            &mut answers,
        );
        assert!(answers[0].is_none());
        absorb(
            br#"{"responses":[{"command":"getRole","data":{"role":{}},"correlationData":"n-1"}]}"#,
            &ids,
            &mut answers,
        );
        let [Some(a), Some(b)] = [answers[0].take(), answers[1].take()] else {
            panic!("both answered")
        };
        assert!(a.check().is_ok());
        assert!(b.found().expect("not found is fine").is_none());
    }

    #[test]
    fn config_snippet_has_what_mosquitto_needs() {
        let c = mosquitto_config(
            "1883",
            Path::new("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
            Path::new("/var/lib/mosquitto/dynamic-security.json"),
            "conductor",
        );
        for line in [
            "listener 1883",
            "allow_anonymous false",
            "set_tcp_nodelay true",
            "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
            "plugin_opt_config_file /var/lib/mosquitto/dynamic-security.json",
            "#   mosquitto_ctrl dynsec init /var/lib/mosquitto/dynamic-security.json conductor",
        ] {
            assert!(c.lines().any(|l| l == line), "{line}\n{c}");
        }
        assert_eq!(
            init_command(Path::new("/tmp/a b/d.json"), "it's"),
            r"mosquitto_ctrl dynsec init '/tmp/a b/d.json' 'it'\''s'"
        );
    }
}
