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

use std::sync::Arc;
use std::time::Duration;

pub use engine::{Access, Database, Limits, Statement};
pub use http::HttpServer;
pub use manager::{Manager, ManagerError};

use service_runtime::audit::{self, Audit, ReportIntervals};
use service_runtime::options::{self, listen_address, CommonOptions};
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
    /// `--listen`, `--data-dir`, `--threads`, `--report-interval-ms`,
    /// `--refresh-interval-ms` (see [`service_runtime::options`]).
    pub common: CommonOptions,
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
        let mut backup_ms = None;
        let common =
            CommonOptions::parse_with(args, USAGE, &["--backup-interval-ms"], |flag, value| {
                backup_ms = Some(options::number(flag, &value)?);
                Ok(())
            })
            .map_err(|e| StartError::Usage(e.0))?;
        Ok(common.map(|common| Options { common, backup_ms }))
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
    let data_dir = opts.common.data_dir_or_cwd()?;
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
    let intervals = ReportIntervals::from_ms(opts.common.report_ms, opts.common.refresh_ms);
    audit::spawn_reporter(SERVICE, local, mgr.clone(), audit_rx, intervals)?;
    if !backup_every.is_zero() {
        spawn_scheduler(mgr.clone(), backup_every)?;
    }
    let listen = listen_address(opts.common.listen, ENV_LISTEN, &config, DEFAULT_LISTEN);
    let server = http::serve(
        &listen,
        mgr.clone(),
        opts.common.threads.unwrap_or(http::DEFAULT_THREADS),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(a: &[&str]) -> Result<Option<Options>, StartError> {
        Options::parse(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn backup_interval_beside_the_common_flags() {
        let o = parse(&["--backup-interval-ms=0", "--threads", "2", "--listen=a:1"])
            .unwrap()
            .unwrap();
        assert_eq!(o.backup_ms, Some(0));
        assert_eq!(o.common.threads, Some(2));
        assert_eq!(o.common.listen.as_deref(), Some("a:1"));
        assert_eq!(
            parse(&["--backup-interval-ms", "250"])
                .unwrap()
                .unwrap()
                .backup_ms,
            Some(250)
        );
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn bad_command_lines_are_usage_errors_with_the_db_manager_usage() {
        let msg = |a: &[&str]| match parse(a) {
            Err(StartError::Usage(m)) => m,
            other => panic!("{a:?}: {other:?}"),
        };
        assert_eq!(
            msg(&["--backup-interval-ms=soon"]),
            "--backup-interval-ms: not a number: soon"
        );
        assert_eq!(
            msg(&["--backup-interval-ms"]),
            format!("--backup-interval-ms needs a value\n{USAGE}")
        );
        assert_eq!(
            msg(&["--backup-every=1"]),
            format!("unknown argument --backup-every=1\n{USAGE}")
        );
    }
}
