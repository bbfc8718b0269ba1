//! # aerekos key-manager
//!
//! A small key-management service (KMS) hosted on an aerekos worker as a
//! process service. Clients (other services, apps) hold no key material:
//! they ask key-manager to encrypt, decrypt, re-encrypt and to issue data
//! keys for envelope encryption. See `README.md` beside this crate for the
//! HTTP API with examples and the operations guide.
//!
//! ## Design
//!
//! * **Keys** are named (`[a-z0-9][a-z0-9_-]{0,63}`) and versioned: a key
//!   starts at version 1, each rotation adds a version that becomes the one
//!   encrypt uses; older versions stay to decrypt old data (at most
//!   [`store::MAX_VERSIONS`] per key, [`store::MAX_KEYS`] keys). A key can
//!   be disabled (refuses encrypt, decrypt, re-encrypt and data keys with
//!   409) and enabled again. A key may be restricted to a list of clients.
//! * **AEAD**: XChaCha20-Poly1305 with random 192-bit nonces (pure Rust,
//!   fast on Pis without AES instructions). The ciphertext carries the key
//!   name and version, both authenticated, so data encrypted before a
//!   rotation still decrypts and cannot be relabelled; byte table in
//!   [`crypto`].
//! * **Master key**: the service's secret `master_key` (64 hex characters,
//!   set in the service spec on the conductor) if present, else
//!   HKDF-SHA256 of `AEREKOS_TOKEN` (the worker derives that token from
//!   its own secret: unique per worker and service, stable across
//!   restarts). It lives only in memory: never written, never logged. It
//!   seals every key file; a store sealed under another master key refuses
//!   to start with a clear error ([`store::StoreError::WrongMaster`]).
//!   Use an explicit `master_key` when keys must survive re-provisioning of
//!   the worker or move to another worker.
//! * **Durability**: one sealed file per key, rewritten atomically (temp,
//!   fsync, rename, fsync dir) before the change is acknowledged, so
//!   `kill -9` never loses an acknowledged create/rotate/disable ([`store`]).
//! * **Client API keys** come from the service's secrets, i.e. they are
//!   issued through the conductor, and are re-read every 30 s
//!   ([`service_runtime::clients`]).
//! * **Audit**: create/rotate/disable/enable and bursts of refused requests
//!   become events on the conductor via the worker's local API; metrics
//!   every 10 s ([`local`]).
//! * **Never logged**: plaintexts, key material, the master key, client or
//!   service tokens. Errors name keys, clients and paths only.
//! * **Bounds**: bodies ≤ 64 KiB (413), plaintexts ≤ 32 KiB (413), aad ≤ 8
//!   KiB, data keys 16..=64 bytes; malformed input is a 400, never a panic.

pub mod crypto;
pub mod http;
pub mod kms;
pub mod local;
pub mod store;

use std::sync::Arc;

pub use service_runtime::boot::StartError;
use service_runtime::boot::{Context, Service, Spec, Started};

pub use crypto::{MasterKey, MasterSource, SecretKey};
pub use http::HttpServer;
pub use kms::{KmError, Kms};
pub use service_runtime::{Audit, Clients, LocalClient, ReportIntervals};
pub use store::Store;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7300";
/// Env var overriding the listen address.
pub const ENV_LISTEN: &str = "KEY_MANAGER_LISTEN";

/// Usage text.
pub const USAGE: &str = "usage: key-manager [--listen ADDR] [--data-dir DIR] [--threads N]
                   [--report-interval-ms MS] [--refresh-interval-ms MS]
Runs under an edge-worker (needs AEREKOS_API and AEREKOS_TOKEN).
  --listen ADDR   default: $KEY_MANAGER_LISTEN, the config value `listen`, 127.0.0.1:7300
  --data-dir DIR  where sealed key files live (default: the working directory)";

/// How key-manager starts: the flags every service takes (see
/// [`service_runtime::options`]), nothing of its own.
pub const SPEC: Spec = Spec {
    name: "key-manager",
    usage: USAGE,
    extra_flags: &[],
    env_listen: ENV_LISTEN,
    default_listen: DEFAULT_LISTEN,
    thread_prefix: "km-http",
    default_threads: 4,
};

/// key-manager as a service [`service_runtime::boot()`] runs.
#[derive(Debug, Clone, Copy)]
pub struct KeyManager;

impl Service for KeyManager {
    const SPEC: Spec = SPEC;
    type Flags = ();

    /// The master key (the secret `master_key`, else derived from the
    /// service token), the sealed key store in the data directory, client
    /// API keys from the secrets.
    fn start(ctx: Context, (): ()) -> Result<Started, StartError> {
        let master = match ctx.secrets.get("master_key") {
            Some(hex) => MasterKey::from_hex(hex),
            None => MasterKey::derive_from_token(ctx.local.token()),
        }
        .map_err(StartError::service)?;
        let data_dir = ctx.common.data_dir_or_cwd()?;
        let store = Store::open(&data_dir, master).map_err(StartError::service)?;
        let (clients, warnings) = Clients::from_secrets(&ctx.secrets);
        for w in warnings {
            eprintln!("key-manager: {w}");
        }
        if clients.is_empty() {
            eprintln!(
                "key-manager: no client API keys in the secrets (`clients` or `client.<name>`): \
                 every request will be refused until some are added"
            );
        }
        let client_line = clients.names().collect::<Vec<_>>().join(", ");
        let kms = Arc::new(Kms::new(store, clients, ctx.audit));
        let summary_kms = kms.clone();
        Ok(Started {
            handler: http::handler(kms.clone()),
            reported: kms,
            report_intervals: ctx.intervals,
            summary: Box::new(move || {
                format!(
                    "{} keys, master key from {}, clients: [{}]",
                    summary_kms.store().len(),
                    summary_kms.store().master_source(),
                    client_line
                )
            }),
        })
    }
}
