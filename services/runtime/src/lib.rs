//! # aerekos service runtime
//!
//! What a service hosted on an aerekos worker (key-manager,
//! storage-manager, db-manager) needs from the worker that hosts it, in
//! one place so the services do not drift apart:
//!
//! * [`local`]: the worker's local API client (`AEREKOS_API`,
//!   `AEREKOS_TOKEN`): secrets, config, events, metrics;
//! * [`audit`]: audit events that never block a request, and the reporter
//!   thread (events, metrics, denied-request summaries, client key refresh);
//! * [`clients`]: client API keys issued through the conductor as service
//!   secrets, compared in constant time;
//! * [`durable`]: crash-safe file replacement (temp, fsync, rename, fsync
//!   dir);
//! * [`listen`]: a tiny_http server bound with `TCP_NODELAY` and its pool
//!   of request threads;
//! * [`options`]: the command-line flags every service takes, and where
//!   the listen address comes from;
//! * [`boot`](mod@boot): a service's whole start-up — command line, local
//!   API, audit and reporter, HTTP server, exit codes — so its `main` is
//!   `service_runtime::boot::<TheService>()`;
//! * `harness` (feature `test-harness`, for the services' tests only): the
//!   real worker local API with registered services, the service's real
//!   binary started with that environment, sibling binaries built once.
//!
//! Limits: local API calls time out after 3 s; the audit queue holds 256
//! events; client tokens are 16..=256 characters.

pub mod audit;
pub mod boot;
pub mod clients;
pub mod durable;
#[cfg(feature = "test-harness")]
pub mod harness;
pub mod listen;
pub mod local;
pub mod options;

pub use audit::{Audit, ReportIntervals, Reported};
pub use boot::{boot, Context, Options, Service, Spec, StartError, Started};
pub use clients::Clients;
pub use durable::{write_atomic, DurableError};
pub use listen::{bind_nodelay, HttpServer, RequestHandler, ServeError};
pub use local::{LocalClient, LocalError};
pub use options::{listen_address, CommonOptions, UsageError};
