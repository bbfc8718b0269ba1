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
//!   issued through the conductor, and are re-read every 30 s ([`clients`]).
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

use service_runtime::options::{listen_address, CommonOptions};

pub use crypto::{MasterKey, MasterSource, SecretKey};
pub use http::HttpServer;
pub use kms::{KmError, Kms};
pub use service_runtime::{Audit, Clients, LocalClient, ReportIntervals};
pub use store::Store;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7300";
/// Env var overriding the listen address.
pub const ENV_LISTEN: &str = "KEY_MANAGER_LISTEN";

/// Why key-manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad command line.
    #[error("{0}")]
    Usage(String),
    /// The local API failed.
    #[error(transparent)]
    Local(#[from] service_runtime::LocalError),
    /// The master key could not be made.
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The HTTP server could not start.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Command-line options: the flags every service takes (see
/// [`service_runtime::options`]).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--listen`, `--data-dir`, `--threads`, `--report-interval-ms`,
    /// `--refresh-interval-ms`.
    pub common: CommonOptions,
}

/// Usage text.
pub const USAGE: &str = "usage: key-manager [--listen ADDR] [--data-dir DIR] [--threads N]
                   [--report-interval-ms MS] [--refresh-interval-ms MS]
Runs under an edge-worker (needs AEREKOS_API and AEREKOS_TOKEN).
  --listen ADDR   default: $KEY_MANAGER_LISTEN, the config value `listen`, 127.0.0.1:7300
  --data-dir DIR  where sealed key files live (default: the working directory)";

impl Options {
    /// Parses `args` (without the program name). `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, StartError> {
        let common = CommonOptions::parse(args, USAGE).map_err(|e| StartError::Usage(e.0))?;
        Ok(common.map(|common| Options { common }))
    }
}

/// Starts key-manager under an edge-worker and serves until killed.
pub fn run(opts: Options) -> Result<(), StartError> {
    let local = LocalClient::from_env()?;
    let secrets = local.secrets_with_retry()?;
    let config = local.config().unwrap_or_default();
    let master = match secrets.get("master_key") {
        Some(hex) => MasterKey::from_hex(hex)?,
        None => MasterKey::derive_from_token(local.token())?,
    };
    let data_dir = opts.common.data_dir_or_cwd()?;
    let store = Store::open(&data_dir, master)?;
    let (clients, warnings) = Clients::from_secrets(&secrets);
    for w in warnings {
        eprintln!("key-manager: {w}");
    }
    if clients.is_empty() {
        eprintln!(
            "key-manager: no client API keys in the secrets (`clients` or `client.<name>`): \
             every request will be refused until some are added"
        );
    }
    let client_names: Vec<&str> = clients.names().collect();
    let client_line = client_names.join(", ");
    let (audit, audit_rx) = Audit::channel("key-manager");
    let kms = Arc::new(Kms::new(store, clients, audit));
    let intervals = ReportIntervals::from_ms(opts.common.report_ms, opts.common.refresh_ms);
    service_runtime::audit::spawn_reporter("key-manager", local, kms.clone(), audit_rx, intervals)?;
    let listen = listen_address(opts.common.listen, ENV_LISTEN, &config, DEFAULT_LISTEN);
    let server = http::serve(
        &listen,
        kms.clone(),
        opts.common.threads.unwrap_or(http::DEFAULT_THREADS),
    )?;
    println!(
        "key-manager: listening on http://{} ({} keys, master key from {}, clients: [{}])",
        server.addr(),
        kms.store().len(),
        kms.store().master_source(),
        client_line
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    server.wait();
    Ok(())
}
