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
//!   `s3::client::S3Client`.
//! * [`http`]: the JSON API.
//! * Worker integration ([`DbManager`], run by [`service_runtime::boot()`]):
//!   admin API keys from the service's secrets (re-read every refresh
//!   interval), backup settings from its config and secrets, metrics and
//!   audit events to the conductor through the worker's local API
//!   (`service_runtime`).
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

pub use service_runtime::boot::StartError;
use service_runtime::boot::{Context, Service, Spec, Started};
use service_runtime::options::{self, UsageError};
use service_runtime::Clients;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7500";
/// Env var overriding the listen address.
pub const ENV_LISTEN: &str = "DB_MANAGER_LISTEN";
const SERVICE: &str = SPEC.name;

/// db-manager's own flags, besides the ones every service takes (see
/// [`service_runtime::options`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `--backup-interval-ms` (overrides the config `backup_interval_s`).
    pub backup_ms: Option<u64>,
}

/// db-manager's command line.
pub type Options = service_runtime::Options<Flags>;

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

/// How db-manager starts: the flags every service takes and
/// `--backup-interval-ms`.
pub const SPEC: Spec = Spec {
    name: "db-manager",
    usage: USAGE,
    extra_flags: &["--backup-interval-ms"],
    env_listen: ENV_LISTEN,
    default_listen: DEFAULT_LISTEN,
    thread_prefix: "dbm-http",
    default_threads: 8,
};

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

/// db-manager as a service [`service_runtime::boot()`] runs.
#[derive(Debug, Clone, Copy)]
pub struct DbManager;

impl Service for DbManager {
    const SPEC: Spec = SPEC;
    type Flags = Flags;

    fn flag(flags: &mut Flags, flag: &str, value: String) -> Result<(), UsageError> {
        // `--backup-interval-ms`, the only extra flag.
        flags.backup_ms = Some(options::number(flag, &value)?);
        Ok(())
    }

    /// The backup store and schedule from the config and secrets, the
    /// catalog and databases in the data directory, admin API keys from
    /// the secrets.
    fn start(ctx: Context, flags: Flags) -> Result<Started, StartError> {
        let (secrets, config) = (&ctx.secrets, &ctx.config);
        let store = backup::S3Store::from_settings(config, secrets)
            .map_err(|e| StartError::service(format!("backups: {e}")))?;
        let backup_every = match flags.backup_ms {
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
        let data_dir = ctx.common.data_dir_or_cwd()?;
        let (clients, warnings) = Clients::from_secrets(secrets);
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
            Some(v) => v.trim().parse::<usize>().map_err(|_| {
                StartError::Usage(format!("config backup_keep: not a number: {v:?}"))
            })?,
        };
        let store_line = store
            .as_ref()
            .map_or_else(|| "off".to_string(), |_| "storage-manager".to_string());
        let mgr = Arc::new(
            Manager::open(
                &data_dir,
                clients,
                store.map(|s| Box::new(s) as Box<dyn backup::BackupStore>),
                ctx.audit,
            )
            .map_err(StartError::service)?
            .with_backup_keep(keep),
        );
        if !backup_every.is_zero() {
            spawn_scheduler(mgr.clone(), backup_every)?;
        }
        let summary_mgr = mgr.clone();
        Ok(Started {
            handler: http::handler(mgr.clone()),
            reported: mgr,
            report_intervals: ctx.intervals,
            summary: Box::new(move || {
                format!(
                    "{} databases, backups {}, schedule {}, admins: [{}]",
                    summary_mgr.len(),
                    store_line,
                    if backup_every.is_zero() {
                        "off".to_string()
                    } else {
                        format!("every {} ms", backup_every.as_millis())
                    },
                    summary_mgr.admin_names().join(", ")
                )
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(a: &[&str]) -> Result<Option<Options>, StartError> {
        service_runtime::boot::parse::<DbManager>(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn backup_interval_beside_the_common_flags() {
        let o = parse(&["--backup-interval-ms=0", "--threads", "2", "--listen=a:1"])
            .unwrap()
            .unwrap();
        assert_eq!(o.flags.backup_ms, Some(0));
        assert_eq!(o.common.threads, Some(2));
        assert_eq!(o.common.listen.as_deref(), Some("a:1"));
        assert_eq!(
            parse(&["--backup-interval-ms", "250"])
                .unwrap()
                .unwrap()
                .flags
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
