//! Per-worker logins on a NATS cluster (the scale-out bus): NATS's
//! *operator mode*, where a node trusts an operator key and accounts signed
//! by it, and any holder of the account's key can mint user logins the
//! nodes accept without a configuration change or a reload.
//!
//! # The keys and who holds them
//!
//! [`generate`] (`conductor nats-auth`) makes three Ed25519 keys (NATS
//! "nkeys") and writes:
//!
//! * the **server configuration** ([`SERVER_CONF`]): the operator's JWT,
//!   the system account and the fleet account's JWTs in a `resolver: MEMORY`
//!   preload. Only public material: every NATS node includes it;
//! * the **fleet account's seed** ([`ACCOUNT_SEED`], mode 0600): what every
//!   conductor is given (`--nats-account-seed`). With it a conductor signs
//!   its own login ([`FleetAccount::conductor_jwt`]) and one login per
//!   worker at enrolment ([`FleetAccount::worker_jwt`]);
//! * the **operator's seed** ([`OPERATOR_SEED`], 0600): needed only to sign
//!   the accounts again (other limits, revocations); keep it offline.
//!
//! # What a worker's login allows
//!
//! A bearer user JWT (the MQTT password; the server checks the account's
//! signature, no nonce) for MQTT connections only, allowed to publish
//! exactly its own worker-side subjects and to subscribe to exactly its own
//! `cmd` and `cmd/stored` ([`protocol::topic::worker_may_publish`] and
//! `worker_may_subscribe`, derived from [`TopicKind::ALL`]), plus
//! `$MQTT.sub.>`, which NATS requires for a QoS 1 subscription (a worker's
//! MQTT subscription to `$MQTT/sub/#` itself is refused; tested). NATS maps
//! MQTT topic `a/b/c` to subject `a.b.c`; our topics hold no `.`.
//!
//! NATS does not tie an MQTT client id to a login, so a worker that knew
//! another's client id could connect with it and close the other's
//! session. Client ids on NATS are therefore derived from the account seed
//! ([`FleetAccount::client_id`]): stable for a worker (its persistent
//! session survives re-enrolment), and unguessable by other workers.
//!
//! # Partitions (several active conductors)
//!
//! With `--partitions N` ([`generate_with`]) the fleet account carries NATS
//! *subject mappings* ([`mappings`]), one per kind of frame a worker
//! publishes ([`TopicKind::partitioned`]: all but `status`):
//! `aerekos.v1.*.<leaf>` → `aerekos.v1.part.{{partition(N,1)}}.{{wildcard(1)}}.<leaf>`,
//! so the servers move each frame to `aerekos/v1/part/<n>/<id>/<leaf>`
//! ([`topic::partitioned_topic`], `n` = [`protocol::partition::partition_of`])
//! and a conductor reads only the partitions it owns
//! ([`topic::partition_filter`]). Agents publish as before. In the account
//! JWT that is `"mappings": {"<from>": [{"subject": "<to>", "weight": 100}]}`
//! (nats-io/jwt v2 `Account.Mappings`, a map of subject to weighted
//! mappings).
//!
//! NATS checks a publish permission on the subject *after* the mapping
//! (the original is not checked; tried against nats-server 2.15.1). So a
//! worker's login also allows its own mapped subjects,
//! `aerekos.v1.part.*.<id>.<leaf>` for the partitioned kinds, and nothing
//! wider: another worker's frames, mapped or published straight into the
//! partitioned tree, are refused (`tests/tests/nats_partitions.rs`). The
//! `*` is the partition, so the login does not depend on `N`; the price is
//! that a worker may publish its own frames straight into a partition not
//! its own, where another conductor would read them (still only its own
//! id's frames, checked with its own secret). The conductor's login (every
//! subject) and the observer's (`aerekos.v1.>`) read the partitioned tree
//! as they read the rest.
//!
//! # Limits
//!
//! * A worker's login expires after `--nats-login-ttl` (24 h by default);
//!   NATS then closes its connection and refuses the login, and the agent
//!   re-enrols with the proof of its secret for a fresh one
//!   (`edge-worker/src/session/login.rs`). A revoked or removed worker gets
//!   none: that is the revocation, within the TTL. There is no revocation
//!   list (it would mean re-signing the account and reloading every node).
//!   The conductor's own login does not expire.
//! * The partition count is fixed when the files are made: re-running
//!   with another one (or with one when they were made without, or the
//!   reverse) is refused, naming both. Changing it means re-signing the
//!   fleet account with the operator's key and moving every conductor's
//!   partitions at once (not done here).
//! * The account's JetStream use is unlimited (the MQTT gateway keeps
//!   sessions and QoS 1 messages in JetStream); the nodes' own `jetstream`
//!   limits apply.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{json, Value};

use protocol::partition::MAX_PARTITIONS;
use protocol::topic::{self, Publisher, TopicKind};

/// The server configuration file [`generate`] writes: include it in every
/// NATS node's configuration.
pub const SERVER_CONF: &str = "nats-auth.conf";
/// The fleet account's seed, which conductors are given.
pub const ACCOUNT_SEED: &str = "fleet-account.nk";
/// The operator's seed.
pub const OPERATOR_SEED: &str = "operator.nk";

/// What can go wrong with keys and their files.
#[derive(Debug, thiserror::Error)]
pub enum NatsAuthError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A seed that is not one.
    #[error("{0}")]
    BadSeed(&'static str),
    /// The system's random source failed.
    #[error("no randomness: {0}")]
    Random(#[from] getrandom::Error),
    /// Some of [`generate`]'s files exist and others do not.
    #[error("{0}")]
    Partial(String),
    /// A partition count out of range, or other than the existing files'.
    #[error("{0}")]
    Partitions(String),
}

/// An nkey's role, its first letter: the prefix byte of its encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `O…`: trusted by the servers; signs accounts.
    Operator,
    /// `A…`: signs its users.
    Account,
    /// `U…`: a login.
    User,
}

impl Role {
    /// The prefix byte of a public key (the letter's base32 value << 3).
    fn prefix(self) -> u8 {
        match self {
            Role::Operator => 14 << 3,
            Role::Account => 0,
            Role::User => 20 << 3,
        }
    }
}

/// The seed prefix `S` (18 << 3).
const SEED_PREFIX: u8 = 18 << 3;

/// CRC-16/XMODEM (polynomial 0x1021, initial 0), nkeys' checksum.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// base32 of `body` followed by its CRC-16, little-endian.
fn with_crc(mut body: Vec<u8>) -> String {
    let crc = crc16(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    BASE32_NOPAD.encode(&body)
}

/// An Ed25519 key in one role.
struct Nkey {
    role: Role,
    /// The 32-byte Ed25519 seed: the key, kept to write it out.
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl fmt::Debug for Nkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nkey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl Nkey {
    fn from_seed(role: Role, seed: [u8; 32]) -> Result<Nkey, NatsAuthError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| NatsAuthError::BadSeed("not an Ed25519 seed"))?;
        Ok(Nkey { role, seed, pair })
    }

    fn generate(role: Role) -> Result<Nkey, NatsAuthError> {
        Nkey::from_seed(role, crate::crypto::random_bytes::<32>()?)
    }

    /// Parses `S<role letter>…` (58 characters, what `nsc` and [`Nkey::seed_text`] write).
    fn parse_seed(text: &str, role: Role) -> Result<Nkey, NatsAuthError> {
        let raw = BASE32_NOPAD
            .decode(text.trim().as_bytes())
            .map_err(|_| NatsAuthError::BadSeed("a seed is base32"))?;
        let [b0, b1, rest @ ..] = raw.as_slice() else {
            return Err(NatsAuthError::BadSeed("seed too short"));
        };
        if rest.len() != 34 {
            return Err(NatsAuthError::BadSeed("seed of the wrong length"));
        }
        let (key, crc) = rest.split_at(32);
        let body_len = raw.len() - 2;
        if crc16(&raw[..body_len]).to_le_bytes() != [crc[0], crc[1]] {
            return Err(NatsAuthError::BadSeed("seed checksum mismatch"));
        }
        if b0 & 0xf8 != SEED_PREFIX {
            return Err(NatsAuthError::BadSeed("not a seed (it must start with S)"));
        }
        let prefix = ((b0 & 0x07) << 5) | (b1 >> 3);
        if prefix != role.prefix() {
            return Err(NatsAuthError::BadSeed("a seed of another role"));
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(key);
        Nkey::from_seed(role, seed)
    }

    fn seed_text(&self) -> String {
        let p = self.role.prefix();
        let mut body = vec![SEED_PREFIX | (p >> 5), (p & 0x1f) << 3];
        body.extend_from_slice(&self.seed);
        with_crc(body)
    }

    /// The public key, `O…`/`A…`/`U…` (56 characters).
    fn public(&self) -> String {
        let mut body = vec![self.role.prefix()];
        body.extend_from_slice(self.pair.public_key().as_ref());
        with_crc(body)
    }

    /// A JWT for `subject` with `nats` claims, signed by this key.
    fn sign_jwt(&self, subject: &str, name: &str, nats: Value) -> Result<String, NatsAuthError> {
        self.sign_jwt_expiring(subject, name, nats, None)
    }

    /// [`Nkey::sign_jwt`], valid until `exp` (seconds since the epoch).
    fn sign_jwt_expiring(
        &self,
        subject: &str,
        name: &str,
        nats: Value,
        exp: Option<u64>,
    ) -> Result<String, NatsAuthError> {
        let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let jti = BASE32_NOPAD.encode(&crate::crypto::random_bytes::<20>()?);
        let mut claims = json!({
            "jti": jti,
            "iat": unix_now(),
            "iss": self.public(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        if let Some(exp) = exp {
            claims["exp"] = json!(exp);
        }
        let payload = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
        let signed = format!("{header}.{payload}");
        let sig = BASE64URL_NOPAD.encode(self.pair.sign(signed.as_bytes()).as_ref());
        Ok(format!("{signed}.{sig}"))
    }
}

/// Seconds since the epoch (0 before 1970: a broken clock).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `aerekos/v1/w/metrics` → `aerekos.v1.w.metrics`, NATS's subject for an MQTT topic.
fn subject(mqtt_topic: &str) -> String {
    mqtt_topic.replace('/', ".")
}

/// The fleet account's subject mappings for `partitions` partitions: for
/// every [`TopicKind::partitioned`] kind, its topic under any worker
/// (`aerekos.v1.*.<leaf>`) to the partitioned topic NATS computes
/// (`aerekos.v1.part.{{partition(N,1)}}.{{wildcard(1)}}.<leaf>`), as the
/// account JWT's `mappings` claim: `{from: [{"subject": to, "weight": 100}]}`.
pub fn mappings(partitions: u16) -> Value {
    let mut out = serde_json::Map::new();
    for kind in TopicKind::ALL.into_iter().filter(|k| k.partitioned()) {
        let from = subject(&topic::topic("*", kind));
        let to = format!(
            "{}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{}",
            subject(topic::PARTITION_ROOT),
            subject(kind.leaf()),
        );
        out.insert(from, json!([{ "subject": to, "weight": 100 }]));
    }
    Value::Object(out)
}

/// The partition count of [`mappings`] (`None`: no mappings); an error
/// for mappings [`mappings`] did not make.
fn partitions_of_mappings(found: Option<&Value>) -> Result<Option<u16>, String> {
    let Some(found) = found.filter(|m| m.as_object().is_some_and(|o| !o.is_empty())) else {
        return Ok(None);
    };
    let to = found
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|v| v.as_array().into_iter().flatten())
        .find_map(|m| m["subject"].as_str())
        .ok_or("a mapping without a subject")?;
    let n = to
        .split_once("{{partition(")
        .and_then(|(_, rest)| rest.split_once(','))
        .and_then(|(n, _)| n.trim().parse::<u16>().ok())
        .ok_or_else(|| format!("a mapping to {to}, not to a partition"))?;
    if *found != mappings(n) {
        return Err(format!(
            "mappings other than those of `--partitions {n}` (edited by hand?)"
        ));
    }
    Ok(Some(n))
}

/// The claims of a JWT, without checking its signature (our own files).
fn jwt_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let raw = BASE64URL_NOPAD.decode(payload.as_bytes()).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// The partition count the server configuration `conf` was made with:
/// that of the mappings in the account JWT whose subject is `account`.
fn partitions_in_conf(conf: &Path, account: &str) -> Result<Option<u16>, NatsAuthError> {
    let text = std::fs::read_to_string(conf).map_err(|source| NatsAuthError::Io {
        path: conf.to_path_buf(),
        source,
    })?;
    let claims = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(account)?.strip_prefix(':'))
        .find_map(|jwt| jwt_claims(jwt.trim()))
        .ok_or_else(|| {
            NatsAuthError::Partitions(format!(
                "{}: no JWT for the fleet account {account}",
                conf.display()
            ))
        })?;
    partitions_of_mappings(claims["nats"].get("mappings"))
        .map_err(|why| NatsAuthError::Partitions(format!("{}: {why}", conf.display())))
}

/// `--partitions 8`, or `no --partitions`.
fn describe(partitions: Option<u16>) -> String {
    partitions.map_or("no --partitions".to_string(), |n| {
        format!("--partitions {n}")
    })
}

/// A user JWT's claims: a bearer login for MQTT connections with these
/// publish and subscribe allowances (none: everything).
fn user_claims(publish: Option<Vec<String>>, subscribe: Option<Vec<String>>) -> Value {
    let mut nats = json!({
        "subs": -1, "data": -1, "payload": -1,
        "bearer_token": true,
        "allowed_connection_types": ["MQTT"],
        "type": "user", "version": 2,
    });
    if let Some(p) = publish {
        nats["pub"] = json!({ "allow": p });
    }
    if let Some(s) = subscribe {
        nats["sub"] = json!({ "allow": s });
    }
    nats
}

/// The fleet account's key, which conductors sign logins with.
pub struct FleetAccount {
    key: Nkey,
}

impl fmt::Debug for FleetAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetAccount")
            .field("public", &self.key.public())
            .finish_non_exhaustive()
    }
}

impl FleetAccount {
    /// Reads the account seed written by [`generate`] (or `nsc`'s, `SA…`).
    pub fn load(path: &Path) -> Result<FleetAccount, NatsAuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| NatsAuthError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FleetAccount {
            key: Nkey::parse_seed(&text, Role::Account)?,
        })
    }

    /// The account's public key (`A…`).
    pub fn public(&self) -> String {
        self.key.public()
    }

    /// The MQTT client id for `who` on NATS (a worker id, or `conductor`):
    /// `<who>-<16 hex of HMAC-SHA256(account seed, who)>`. Stable, so
    /// persistent sessions carry across restarts and re-enrolment, and
    /// shared by every conductor holding the seed; unguessable by workers.
    pub fn client_id(&self, who: &str) -> String {
        use hmac::{Hmac, KeyInit, Mac};
        let tag = match <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.key.seed) {
            Ok(mut mac) => {
                mac.update(b"aerekos mqtt client id\0");
                mac.update(who.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            // HMAC takes a key of any length: this arm is never taken.
            Err(_) => vec![0; 8],
        };
        let hex: String = tag[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{who}-{hex}")
    }

    /// A login for worker `worker_id`, valid for `ttl` (NATS refuses it
    /// after, and closes a connection made with it): publish its own
    /// worker-side topics (and, for an account with partitions, the
    /// subjects NATS maps its frames to, in any partition: the module docs
    /// say why), subscribe to its own commands and `Stored`
    /// acknowledgements.
    pub fn worker_jwt(&self, worker_id: &str, ttl: Duration) -> Result<String, NatsAuthError> {
        let own = TopicKind::ALL
            .into_iter()
            .filter(|k| k.publisher() == Publisher::Worker)
            .map(|k| subject(&topic::topic(worker_id, k)));
        let mapped = TopicKind::ALL
            .into_iter()
            .filter(|k| k.partitioned())
            .map(|k| {
                format!(
                    "{}.*.{worker_id}.{}",
                    subject(topic::PARTITION_ROOT),
                    subject(k.leaf())
                )
            });
        let publish = own.chain(mapped).collect();
        let subscribe = [TopicKind::Cmd, TopicKind::Stored]
            .iter()
            .map(|k| subject(&topic::topic(worker_id, *k)))
            .chain(["$MQTT.sub.>".to_string()])
            .collect();
        let user = Nkey::generate(Role::User)?;
        let exp = unix_now().saturating_add(ttl.as_secs().max(1));
        self.key.sign_jwt_expiring(
            &user.public(),
            worker_id,
            user_claims(Some(publish), Some(subscribe)),
            Some(exp),
        )
    }

    /// The observer's login (MQTT Explorer, Home Assistant): read the
    /// aerekos tree (the partitioned tree too), publish nothing.
    pub fn observer_jwt(&self) -> Result<String, NatsAuthError> {
        let user = Nkey::generate(Role::User)?;
        let mut claims = user_claims(
            None,
            // `aerekos/v1/#` is two NATS subscriptions: `aerekos.v1.>` and
            // `aerekos.v1` (`#` also matches its parent level).
            Some(vec![
                subject(topic::ROOT),
                format!("{}.>", subject(topic::ROOT)),
                "$MQTT.sub.>".to_string(),
            ]),
        );
        claims["pub"] = json!({ "deny": [">"] });
        self.key
            .sign_jwt(&user.public(), "aerekos-observer", claims)
    }

    /// The conductors' login: anything, over MQTT (the partitioned tree
    /// included).
    pub fn conductor_jwt(&self) -> Result<String, NatsAuthError> {
        let user = Nkey::generate(Role::User)?;
        self.key
            .sign_jwt(&user.public(), "aerekos-conductor", user_claims(None, None))
    }
}

/// What [`generate`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Generated {
    /// Made the keys and wrote the files.
    Created,
    /// Every file was there: nothing changed.
    Existed,
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), NatsAuthError> {
    let io = |source| NatsAuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = open.open(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Makes the operator, the system account and the fleet account, and
/// writes the server configuration to `conf` and the two seeds into
/// `keys` (created if missing). Idempotent: when every file exists it
/// changes nothing; when only some do it fails (delete them all to start
/// over: every worker then needs new logins, i.e. to enrol again).
/// [`generate_with`] without partitions.
pub fn generate(conf: &Path, keys: &Path) -> Result<Generated, NatsAuthError> {
    generate_with(conf, keys, None)
}

/// [`generate`], the fleet account carrying the subject mappings of
/// `partitions` partitions (`1..=`[`MAX_PARTITIONS`]; `None`: none). When
/// every file exists, the count they were made with must be `partitions`
/// (nothing changes), else it is refused, naming both.
pub fn generate_with(
    conf: &Path,
    keys: &Path,
    partitions: Option<u16>,
) -> Result<Generated, NatsAuthError> {
    if let Some(n) = partitions.filter(|n| !(1..=MAX_PARTITIONS).contains(n)) {
        return Err(NatsAuthError::Partitions(format!(
            "--partitions {n}: a partition count is 1 to {MAX_PARTITIONS}"
        )));
    }
    let files = [
        conf.to_path_buf(),
        keys.join(ACCOUNT_SEED),
        keys.join(OPERATOR_SEED),
    ];
    let present: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    if present.len() == files.len() {
        let account = FleetAccount::load(&keys.join(ACCOUNT_SEED))?.public();
        let made = partitions_in_conf(conf, &account)?;
        if made != partitions {
            return Err(NatsAuthError::Partitions(format!(
                "{} was made with {}; this run gives {}: the partition count cannot change \
                 (remove the files to start over; every worker then enrols again)",
                conf.display(),
                describe(made),
                describe(partitions),
            )));
        }
        return Ok(Generated::Existed);
    }
    if !present.is_empty() {
        let list: Vec<String> = present.iter().map(|p| p.display().to_string()).collect();
        return Err(NatsAuthError::Partial(format!(
            "only some of the NATS auth files exist ({}): remove them to make new ones",
            list.join(", ")
        )));
    }
    for dir in [conf.parent(), Some(keys)].into_iter().flatten() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| NatsAuthError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    let operator = Nkey::generate(Role::Operator)?;
    let system = Nkey::generate(Role::Account)?;
    let fleet = Nkey::generate(Role::Account)?;
    let operator_jwt = operator.sign_jwt(
        &operator.public(),
        "aerekos",
        json!({ "system_account": system.public(), "type": "operator", "version": 2 }),
    )?;
    let limits = |jetstream: bool| {
        let mut l = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        if jetstream {
            for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
                l[k] = json!(-1);
            }
        }
        l
    };
    let system_jwt = operator.sign_jwt(
        &system.public(),
        "SYS",
        json!({ "limits": limits(false), "type": "account", "version": 2 }),
    )?;
    let mut fleet_claims = json!({ "limits": limits(true), "type": "account", "version": 2 });
    if let Some(n) = partitions {
        fleet_claims["mappings"] = mappings(n);
    }
    let fleet_jwt = operator.sign_jwt(&fleet.public(), "aerekos-fleet", fleet_claims)?;
    let text = format!(
        "# NATS operator mode for an aerekos fleet (conductor nats-auth): include\n\
         # this file in every node's configuration, with no `authorization` or\n\
         # `accounts` block. Public keys and signed JWTs only: no secret here.\n\
         # Conductors sign one login per worker with the fleet account's seed.\n\
         operator: {operator_jwt}\n\
         system_account: {sys}\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n  {sys}: {system_jwt}\n  {fleet_pub}: {fleet_jwt}\n}}\n",
        sys = system.public(),
        fleet_pub = fleet.public(),
    );
    write_file(&keys.join(OPERATOR_SEED), &operator.seed_text(), true)?;
    write_file(&keys.join(ACCOUNT_SEED), &fleet.seed_text(), true)?;
    write_file(conf, &text, false)?;
    Ok(Generated::Created)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn crc16_is_xmodem() {
        // The check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn keys_start_with_their_role_letter_and_seeds_round_trip() {
        for (role, public, seed) in [
            (Role::Operator, 'O', "SO"),
            (Role::Account, 'A', "SA"),
            (Role::User, 'U', "SU"),
        ] {
            let k = Nkey::generate(role).unwrap();
            assert!(k.public().starts_with(public), "{}", k.public());
            assert_eq!(k.public().len(), 56);
            let text = k.seed_text();
            assert!(text.starts_with(seed), "{text}");
            assert_eq!(text.len(), 58);
            let back = Nkey::parse_seed(&text, role).unwrap();
            assert_eq!(back.public(), k.public());
        }
    }

    #[test]
    fn a_seed_that_is_damaged_or_of_another_role_is_refused() {
        let k = Nkey::generate(Role::Account).unwrap();
        let text = k.seed_text();
        let mut damaged = text.clone().into_bytes();
        damaged[20] = if damaged[20] == b'A' { b'B' } else { b'A' };
        let damaged = String::from_utf8(damaged).unwrap();
        assert!(matches!(
            Nkey::parse_seed(&damaged, Role::Account),
            Err(NatsAuthError::BadSeed(_))
        ));
        assert!(Nkey::parse_seed(&text, Role::Operator).is_err());
        assert!(Nkey::parse_seed(&k.public(), Role::Account).is_err());
        assert!(Nkey::parse_seed("", Role::Account).is_err());
        assert!(Nkey::parse_seed("not base32!", Role::Account).is_err());
    }

    #[test]
    fn a_worker_jwt_is_signed_by_the_account_and_allows_only_its_own_topics() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats").join(SERVER_CONF);
        assert_eq!(
            generate(&conf, &dir.path().join("keys")).unwrap(),
            Generated::Created
        );
        let account = FleetAccount::load(&dir.path().join("keys").join(ACCOUNT_SEED)).unwrap();
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(text.contains(&account.public()), "{text}");
        for seed in [ACCOUNT_SEED, OPERATOR_SEED] {
            let seed = std::fs::read_to_string(dir.path().join("keys").join(seed)).unwrap();
            assert!(
                !text.contains(seed.trim()),
                "a seed in the server configuration"
            );
        }

        let jwt = account
            .worker_jwt("w-1", Duration::from_secs(3600))
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&BASE64URL_NOPAD.decode(parts[1].as_bytes()).unwrap()).unwrap();
        assert_eq!(claims["iss"], account.public());
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 3600, "valid for the ttl");
        assert!(claims["sub"].as_str().unwrap().starts_with('U'));
        let nats = &claims["nats"];
        assert_eq!(nats["bearer_token"], true);
        assert_eq!(nats["allowed_connection_types"], json!(["MQTT"]));
        let publish: Vec<&str> = nats["pub"]["allow"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(publish.contains(&"aerekos.v1.w-1.metrics"));
        assert!(!publish.iter().any(|s| s.ends_with(".cmd")));
        // Its own topics, and its own mapped ones in any partition.
        assert!(
            publish.iter().all(
                |s| s.starts_with("aerekos.v1.w-1.") || s.starts_with("aerekos.v1.part.*.w-1.")
            ),
            "{publish:?}"
        );
        assert!(publish.contains(&"aerekos.v1.part.*.w-1.metrics"));
        assert!(!publish.contains(&"aerekos.v1.part.*.w-1.status"));
        assert_eq!(
            nats["sub"]["allow"],
            json!([
                "aerekos.v1.w-1.cmd",
                "aerekos.v1.w-1.cmd.stored",
                "$MQTT.sub.>"
            ])
        );
        // The signature verifies with the account's public key.
        let raw = BASE32_NOPAD.decode(account.public().as_bytes()).unwrap();
        let public =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &raw[1..33]);
        let sig = BASE64URL_NOPAD.decode(parts[2].as_bytes()).unwrap();
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();

        // Client ids: stable per name, different between names.
        assert_eq!(account.client_id("w-1"), account.client_id("w-1"));
        assert_ne!(account.client_id("w-1"), account.client_id("w-2"));
        assert!(account.client_id("w-1").starts_with("w-1-"));

        // Again: nothing changes. One file gone: refused.
        assert_eq!(
            generate(&conf, &dir.path().join("keys")).unwrap(),
            Generated::Existed
        );
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
        std::fs::remove_file(dir.path().join("keys").join(OPERATOR_SEED)).unwrap();
        assert!(matches!(
            generate(&conf, &dir.path().join("keys")),
            Err(NatsAuthError::Partial(_))
        ));
    }

    #[test]
    fn the_mappings_move_every_partitioned_kind_where_protocol_says() {
        use protocol::partition::partition_of;
        let m = mappings(8);
        let map = m.as_object().unwrap();
        let partitioned: Vec<TopicKind> = TopicKind::ALL
            .into_iter()
            .filter(|k| k.partitioned())
            .collect();
        assert_eq!(map.len(), partitioned.len(), "{m}");
        assert_eq!(
            m["aerekos.v1.*.metrics"],
            json!([{
                "subject": "aerekos.v1.part.{{partition(8,1)}}.{{wildcard(1)}}.metrics",
                "weight": 100
            }])
        );
        assert!(m.get("aerekos.v1.*.status").is_none(), "status stays");
        for kind in partitioned {
            let from = format!("aerekos.v1.*.{}", kind.leaf());
            let to = m[&from][0]["subject"].as_str().unwrap();
            // What NATS computes for two workers is the protocol's topic.
            for id in ["w-1", "w-2", "w-0123456789ab"] {
                let n = partition_of(id, 8);
                let mapped = to
                    .replace("{{partition(8,1)}}", &n.to_string())
                    .replace("{{wildcard(1)}}", id);
                assert_eq!(mapped, subject(&topic::partitioned_topic(n, id, kind)));
            }
        }
        assert_eq!(partitions_of_mappings(Some(&m)), Ok(Some(8)));
        assert_eq!(partitions_of_mappings(None), Ok(None));
        assert_eq!(partitions_of_mappings(Some(&json!({}))), Ok(None));
        let mut edited = m.clone();
        edited["aerekos.v1.*.metrics"][0]["weight"] = json!(50);
        assert!(partitions_of_mappings(Some(&edited)).is_err());
    }

    #[test]
    fn the_partition_count_is_fixed_when_the_files_are_made() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, keys) = (dir.path().join("p.conf"), dir.path().join("p-keys"));
        for bad in [0, MAX_PARTITIONS + 1] {
            let e = generate_with(&conf, &keys, Some(bad)).unwrap_err();
            assert!(matches!(e, NatsAuthError::Partitions(_)), "{e}");
            assert!(!conf.exists());
        }
        assert_eq!(
            generate_with(&conf, &keys, Some(8)).unwrap(),
            Generated::Created
        );
        let text = std::fs::read_to_string(&conf).unwrap();
        let account = FleetAccount::load(&keys.join(ACCOUNT_SEED)).unwrap();
        let claims = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&account.public()))
            .find_map(|l| jwt_claims(l.trim_start_matches(':').trim()))
            .unwrap();
        assert_eq!(claims["name"], "aerekos-fleet");
        assert_eq!(claims["nats"]["mappings"], mappings(8));
        // The system account carries none.
        assert_eq!(text.matches("partition(").count(), 0, "JWTs are base64");

        // Same count: nothing changes.
        assert_eq!(
            generate_with(&conf, &keys, Some(8)).unwrap(),
            Generated::Existed
        );
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
        // Another count, or none: refused, naming both.
        for (asked, words) in [
            (Some(16), ["with --partitions 8;", "gives --partitions 16"]),
            (None, ["with --partitions 8;", "gives no --partitions"]),
        ] {
            let e = generate_with(&conf, &keys, asked).unwrap_err().to_string();
            for w in words {
                assert!(e.contains(w), "{e}");
            }
        }
        assert!(generate(&conf, &keys).is_err());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);

        // Made without: asking for partitions is refused too.
        let (plain, plain_keys) = (dir.path().join("n.conf"), dir.path().join("n-keys"));
        generate(&plain, &plain_keys).unwrap();
        let e = generate_with(&plain, &plain_keys, Some(8))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("with no --partitions;") && e.contains("gives --partitions 8"),
            "{e}"
        );
        assert_eq!(
            generate_with(&plain, &plain_keys, None).unwrap(),
            Generated::Existed
        );
    }
}
