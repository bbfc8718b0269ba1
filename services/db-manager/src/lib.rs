//! # aerekos db-manager
//!
//! SQLite databases as a service, hosted on an aerekos worker as a process
//! service. See `README.md` beside this crate for the HTTP API with
//! examples and the operations guide.
//!
//! * [`engine`]: one database's connections (one WAL writer with
//!   `synchronous=FULL`, read-only readers), the sandbox (authorizer,
//!   limits), parameters, row limits, timeouts, JSON value mapping.
//! * [`catalog`]: which databases exist and their credentials' salted
//!   hashes (a SQLite file).
//! * [`manager`]: create/list/drop, credentials, queries, backups and
//!   restores, metrics and audit events.
//! * [`backup`]: backups in storage-manager through
//!   `storage_manager::client::S3Client`.
//! * [`http`]: the JSON API.
//! * Worker integration ([`run`]): admin API keys from the service's
//!   secrets (re-read every refresh interval), backup settings from its
//!   config and secrets, metrics and audit events to the conductor through
//!   the worker's local API (`service_runtime`).
//!
//! Limits: bodies ≤ 1 MiB (413); one statement per query request, at most
//! 1000 per batch; rows ≤ 10 000 per statement (default 1000); timeouts ≤
//! 30 s (default 5 s); at most 1000 databases. No TLS.

pub mod backup;
pub mod catalog;
pub mod engine;
pub mod http;
pub mod manager;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use engine::{Access, Database, Limits, Statement};
pub use http::HttpServer;
pub use manager::{Manager, ManagerError};

use service_runtime::audit::{self, Audit, ReportIntervals};
use service_runtime::{Clients, LocalClient};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7500";
/// Env var overriding the listen address.
pub const ENV_LISTEN: &str = "DB_MANAGER_LISTEN";
const SERVICE: &str = "db-manager";

/// Why db-manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad command line or configuration.
    #[error("{0}")]
    Usage(String),
    /// The local API failed.
    #[error(transparent)]
    Local(#[from] service_runtime::LocalError),
    /// The databases could not be opened.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The backup store could not be reached or is misconfigured.
    #[error("backups: {0}")]
    Backup(#[from] backup::BackupError),
    /// The HTTP server could not start.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Command-line options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir` (default: the working directory).
    pub data_dir: Option<PathBuf>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--report-interval-ms`.
    pub report_ms: Option<u64>,
    /// `--refresh-interval-ms`.
    pub refresh_ms: Option<u64>,
    /// `--backup-interval-ms` (overrides the config `backup_interval_s`).
    pub backup_ms: Option<u64>,
}

/// Usage text.
pub const USAGE: &str = "usage: db-manager [--listen ADDR] [--data-dir DIR] [--threads N]
                  [--report-interval-ms MS] [--refresh-interval-ms MS] [--backup-interval-ms MS]
Runs under an edge-worker (needs AEREKOS_API and AEREKOS_TOKEN).
  --listen ADDR   default: $DB_MANAGER_LISTEN, the config value `listen`, 127.0.0.1:7500
  --data-dir DIR  where the catalog and databases live (default: the working directory)
Config: backup_endpoint, backup_bucket, backup_region, backup_interval_s (0 = no schedule),
        backup_keep (backups kept per database; 0 = all).
Secrets: clients (name:token,...) or client.<name> (admin API keys),
         backup_access_key, backup_secret_key.";

impl Options {
    /// Parses `args` (without the program name). `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, StartError> {
        let mut o = Options::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            if flag == "-h" || flag == "--help" {
                return Ok(None);
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| StartError::Usage(format!("{flag} needs a value\n{USAGE}")))
            };
            let number = |v: String| {
                v.parse::<u64>()
                    .map_err(|_| StartError::Usage(format!("{flag}: not a number: {v}")))
            };
            match flag.as_str() {
                "--listen" => o.listen = Some(value()?),
                "--data-dir" => o.data_dir = Some(PathBuf::from(value()?)),
                "--threads" => {
                    let n = number(value()?)?;
                    o.threads = Some(usize::try_from(n.clamp(1, 64)).unwrap_or(1));
                }
                "--report-interval-ms" => o.report_ms = Some(number(value()?)?.max(10)),
                "--refresh-interval-ms" => o.refresh_ms = Some(number(value()?)?.max(10)),
                "--backup-interval-ms" => o.backup_ms = Some(number(value()?)?),
                _ => {
                    return Err(StartError::Usage(format!(
                        "unknown argument {arg}\n{USAGE}"
                    )))
                }
            }
        }
        Ok(Some(o))
    }
}

/// Starts the scheduled-backup thread (every `every`, all databases).
pub fn spawn_scheduler(mgr: Arc<Manager>, every: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("dbm-backups".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let n = mgr.backup_all();
            eprintln!(
                "{SERVICE}: scheduled backup: {n} of {} databases",
                mgr.len()
            );
        })
        .map(|_| ())
}

/// Starts db-manager under an edge-worker and serves until killed.
pub fn run(opts: Options) -> Result<(), StartError> {
    let local = LocalClient::from_env()?;
    let secrets = local.secrets_with_retry()?;
    let config = local.config().unwrap_or_default();
    let store = backup::S3Store::from_settings(&config, &secrets)?;
    let backup_every = match opts.backup_ms {
        Some(ms) => Duration::from_millis(ms),
        None => match config.get("backup_interval_s") {
            None => Duration::ZERO,
            Some(v) => Duration::from_secs(v.trim().parse::<u64>().map_err(|_| {
                StartError::Usage(format!("config backup_interval_s: not a number: {v:?}"))
            })?),
        },
    };
    if !backup_every.is_zero() && store.is_none() {
        return Err(StartError::Usage(
            "a backup interval is set but backup_endpoint is not".into(),
        ));
    }
    let data_dir = match opts.data_dir {
        Some(d) => d,
        None => std::env::current_dir()?,
    };
    let (clients, warnings) = Clients::from_secrets(&secrets);
    for w in warnings {
        eprintln!("{SERVICE}: {w}");
    }
    if clients.is_empty() {
        eprintln!(
            "{SERVICE}: no admin API keys in the secrets (`clients` or `client.<name>`): \
             admin requests will be refused until some are added"
        );
    }
    let keep = match config.get("backup_keep") {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| StartError::Usage(format!("config backup_keep: not a number: {v:?}")))?,
    };
    let (audit_sink, audit_rx) = Audit::channel(SERVICE);
    let store_line = store
        .as_ref()
        .map_or_else(|| "off".to_string(), |_| "storage-manager".to_string());
    let mgr = Arc::new(
        Manager::open(
            &data_dir,
            clients,
            store.map(|s| Box::new(s) as Box<dyn backup::BackupStore>),
            audit_sink,
        )?
        .with_backup_keep(keep),
    );
    let intervals = ReportIntervals::from_ms(opts.report_ms, opts.refresh_ms);
    audit::spawn_reporter(SERVICE, local, mgr.clone(), audit_rx, intervals)?;
    if !backup_every.is_zero() {
        spawn_scheduler(mgr.clone(), backup_every)?;
    }
    let listen = opts
        .listen
        .or_else(|| std::env::var(ENV_LISTEN).ok())
        .or_else(|| config.get("listen").cloned())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let server = HttpServer::start(
        &listen,
        mgr.clone(),
        opts.threads.unwrap_or(http::DEFAULT_THREADS),
    )?;
    println!(
        "{SERVICE}: listening on http://{} ({} databases, backups {}, schedule {}, admins: [{}])",
        server.addr(),
        mgr.len(),
        store_line,
        if backup_every.is_zero() {
            "off".to_string()
        } else {
            format!("every {} ms", backup_every.as_millis())
        },
        mgr.admin_names().join(", ")
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    server.wait();
    Ok(())
}
