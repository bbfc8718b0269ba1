//! `conductor` CLI: parse flags → [`conductor::Config`] → run on a
//! current-thread tokio runtime until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use conductor::config::{Config, Overrides};
use conductor::store::Store;

/// aerekos conductor: MQTT broker, store and HTTP API for a Raspberry Pi fleet.
#[derive(Debug, Parser)]
#[command(name = "conductor", version)]
struct Cli {
    /// TOML config file (defaults < file < AEREKOS_* env < flags).
    #[arg(long, global = true, env = "AEREKOS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    /// Also run an edge-worker in this process, enrolled with this conductor
    /// (state under <data-dir>/local-worker): one command for a working fleet of one.
    #[arg(long)]
    local_worker: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Args)]
struct Flags {
    /// Data directory (SQLite database, runtime.json).
    #[arg(long, global = true)]
    data_dir: Option<String>,
    /// The store: `sqlite` (the default, in the data directory) or a
    /// `postgres://user:pass@host:port/db` URL, which several conductors
    /// can share (TLS: `?sslmode=verify-full&sslrootcert=CA.pem`).
    #[arg(long, global = true)]
    store: Option<String>,
    /// HTTP listen address.
    #[arg(long, global = true)]
    http_listen: Option<String>,
    /// The URL other conductors on a shared store reach this one's API by
    /// (a standby forwards requests there), e.g. https://conductor-a.lan:3000.
    /// Default: https:// (http:// with --no-tls), the listen IP or else
    /// this machine's hostname, the listen port.
    #[arg(long, global = true)]
    advertise_url: Option<String>,
    /// Embedded MQTT broker listen address.
    #[arg(long, global = true)]
    mqtt_listen: Option<String>,
    /// External broker mqtt://user:pass@host:port, or a cluster's nodes
    /// mqtt://user:pass@a:1883,b:1883,c:1883 (no embedded broker).
    #[arg(long, global = true)]
    mqtt_url: Option<String>,
    /// MQTT URL handed to workers.
    #[arg(long, global = true)]
    mqtt_public_url: Option<String>,
    /// Raw metrics retention (e.g. 24h).
    #[arg(long, global = true)]
    raw_retention: Option<String>,
    /// Active conductor on a shared store with an external broker: cut off
    /// from every broker node this long (e.g. 20s), it releases the store
    /// lease and stops, for a standby that reaches the bus.
    #[arg(long, global = true)]
    bus_stepdown: Option<String>,
    /// Minute rollup retention (e.g. 7d).
    #[arg(long, global = true)]
    minute_retention: Option<String>,
    /// Default metrics interval in ms.
    #[arg(long, global = true)]
    default_interval_ms: Option<u32>,
    /// Plain HTTP and MQTT only (no HTTPS, no MQTT over TLS): behind a
    /// TLS-terminating proxy on this host.
    #[arg(long, global = true)]
    no_tls: bool,
    /// Your own certificate chain (PEM) instead of the fleet CA's.
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<String>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<String>,
    /// Another DNS name or IP address workers reach this conductor by
    /// (repeatable; the hostname and local addresses are always in).
    #[arg(long, global = true)]
    tls_san: Vec<String>,
    /// Also accept plain HTTP and MQTT from other hosts (trusted LAN only).
    #[arg(long, global = true)]
    insecure_plain: bool,
    /// Embedded broker's MQTT-over-TLS listen address.
    #[arg(long, global = true)]
    mqtts_listen: Option<String>,
    /// CA certificate (PEM) of an external mqtts:// broker.
    #[arg(long, global = true)]
    mqtt_ca: Option<String>,
    /// Bearer token that /metrics requires (≥ 16 characters).
    #[arg(long, global = true)]
    metrics_token: Option<String>,
    /// The external broker is Mosquitto with the dynamic-security plugin:
    /// manage a login and ACLs per worker there (see `mosquitto-config`).
    #[arg(long, global = true)]
    mqtt_dynsec: bool,
    /// The external broker is a NATS cluster in operator mode: the fleet
    /// account's seed file (`nats-auth` writes it). Every worker gets a
    /// login of its own, signed with it, allowed only its own topics.
    #[arg(long, global = true)]
    nats_account_seed: Option<String>,
    /// How long a worker's NATS login is valid (default 24h): agents ask
    /// for a fresh one when it expires; a revoked worker gets none.
    #[arg(long, global = true)]
    nats_login_ttl: Option<String>,
    /// Public key (64 hex digits) that agent releases must be signed with
    /// (`aerekos release-key generate` prints it); handed to workers at
    /// enrolment, which pin it.
    #[arg(long, global = true)]
    release_key: Option<String>,
    /// Publish retained Home Assistant MQTT discovery configs: every
    /// worker a device with CPU, memory, disk, temperature, load, uptime,
    /// under-voltage and online sensors.
    #[arg(long, global = true)]
    homeassistant_discovery: bool,
    /// The Home Assistant discovery prefix (default `homeassistant`).
    #[arg(long, global = true)]
    homeassistant_prefix: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the conductor (the default).
    Serve,
    /// Print the effective configuration as TOML (secrets redacted).
    Config,
    /// Registration token management (works offline on the store).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Decode a captured postcard frame to JSON.
    Decode {
        /// Worker secret (64 hex) to verify the tag; unverified without it.
        #[arg(long)]
        secret: Option<String>,
        /// The worker id of the frame's topic (a format-2 frame does not carry it).
        #[arg(long)]
        worker: Option<String>,
        /// Frame file, or `-` for stdin.
        file: String,
    },
    /// Print a Mosquitto configuration (dynamic-security plugin) to use
    /// with `--mqtt-url … --mqtt-dynsec`, and how to create its admin.
    MosquittoConfig {
        /// Mosquitto's listener line (`1883`, `8883 0.0.0.0`).
        #[arg(long, default_value = "1883")]
        listener: String,
        /// Where Mosquitto keeps the plugin's state.
        #[arg(long, default_value = "/var/lib/mosquitto/dynamic-security.json")]
        dynsec_file: PathBuf,
        /// The admin login the conductor uses.
        #[arg(long, default_value = "conductor")]
        admin: String,
    },
    /// Make the keys of NATS operator mode: the server configuration every
    /// NATS node includes, and the fleet account's seed for
    /// `--nats-account-seed`. Does nothing when they exist.
    NatsAuth {
        /// The server configuration to write (public: JWTs and public keys).
        #[arg(long)]
        conf: PathBuf,
        /// Where the seeds go (secret: fleet-account.nk, operator.nk).
        #[arg(long)]
        keys: PathBuf,
        /// Several active conductors: the fleet account maps each worker's
        /// frames to `aerekos/v1/part/<n>/<id>/<leaf>`, n the NATS
        /// partition of the worker id among N (1 to 1024; 64 is the usual
        /// choice). Fixed once the files exist. Absent: no mappings.
        #[arg(long, value_name = "N")]
        partitions: Option<u16>,
    },
    /// Admin user management (offline).
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Replace the registration token and print the new one (shown once).
    Rotate,
    /// Show registration token metadata.
    ShowInfo,
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    /// Set a new admin password (from AEREKOS_ADMIN_PASSWORD, or random and printed).
    ResetPassword,
}

fn load_config(cli: &Cli) -> Result<Config> {
    let file = match &cli.config {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AEREKOS_"))
        .collect();
    let f = &cli.flags;
    let flags = Overrides {
        data_dir: f.data_dir.clone(),
        store: f.store.clone(),
        http_listen: f.http_listen.clone(),
        advertise_url: f.advertise_url.clone(),
        mqtt_listen: f.mqtt_listen.clone(),
        mqtt_url: f.mqtt_url.clone(),
        mqtt_public_url: f.mqtt_public_url.clone(),
        raw_retention: f.raw_retention.clone(),
        bus_stepdown: f.bus_stepdown.clone(),
        minute_retention: f.minute_retention.clone(),
        default_interval_ms: f.default_interval_ms,
        no_tls: f.no_tls,
        tls_cert: f.tls_cert.clone(),
        tls_key: f.tls_key.clone(),
        tls_san: f.tls_san.clone(),
        insecure_plain: f.insecure_plain,
        mqtts_listen: f.mqtts_listen.clone(),
        mqtt_ca: f.mqtt_ca.clone(),
        metrics_token: f.metrics_token.clone(),
        mqtt_dynsec: f.mqtt_dynsec,
        nats_account_seed: f.nats_account_seed.clone(),
        nats_login_ttl: f.nats_login_ttl.clone(),
        release_key: f.release_key.clone(),
        homeassistant_discovery: f.homeassistant_discovery,
        homeassistant_prefix: f.homeassistant_prefix.clone(),
    };
    Ok(Config::resolve(file.as_deref(), &env, &flags)?)
}

fn init_logging() {
    let filter = std::env::var("AEREKOS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,rumqttd=warn,rumqttd::router::routing=off,rumqttc=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn serve(config: Config, local_worker: bool) -> Result<()> {
    raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let data_dir = PathBuf::from(&config.data_dir);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let conductor = conductor::run(config, shutdown_signal(), ready_tx);
        let worker = async {
            let Ok(started) = ready_rx.await else {
                return;
            };
            if !local_worker {
                return;
            }
            let mut wc = edge_worker::WorkerConfig::new(data_dir.join("local-worker"));
            // The HTTP listener may be 0.0.0.0: the local worker uses loopback.
            wc.conductor_url = Some(format!("http://127.0.0.1:{}", started.http_addr.port()));
            wc.token = Some(started.local_enroll_token);
            // On the conductor's own host the link costs nothing: every
            // sample goes at once, and the dashboard is live without `Live`.
            wc.batch = std::time::Duration::ZERO;
            let mut stop = stop_rx;
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = edge_worker::run(wc, stopped).await {
                tracing::error!("local worker stopped: {e}");
            }
        };
        let conductor = async {
            let r = conductor.await;
            let _ = stop_tx.send(true);
            r
        };
        let (result, ()) = tokio::join!(conductor, worker);
        result
    })?;
    Ok(())
}

/// Raises the open-file soft limit to the hard limit. Every worker holds an
/// MQTT connection to the embedded broker and every API client a socket:
/// systemd's default soft limit of 1,024 would stop accepting at about a
/// thousand workers, while the hard limit (524,288 there) is the
/// administrator's real ceiling.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("open-file limit stays at {:?}: {e}", lim.current);
        }
    }
    let lim = getrlimit(Resource::Nofile);
    tracing::info!(
        "open-file limit {} (one per connected worker or API client)",
        lim.current
            .map_or("unlimited".to_string(), |n| n.to_string())
    );
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging();
    match &cli.cmd {
        None | Some(Cmd::Serve) => serve(load_config(&cli)?, cli.local_worker),
        Some(Cmd::Config) => {
            print!("{}", load_config(&cli)?.to_redacted_toml()?);
            Ok(())
        }
        Some(Cmd::Token { cmd }) => {
            let config = load_config(&cli)?;
            let mut store = Store::open_at(
                &conductor::store::StoreLocation::of(&config).map_err(anyhow::Error::msg)?,
            )?;
            match cmd {
                TokenCmd::Rotate => {
                    let t = conductor::auth::rotate_registration_token(&mut store)?;
                    // With the fingerprint of the CA the conductor serves
                    // (made now if this is before the first start).
                    println!("{}", conductor::registration_token_text(&config, &t)?);
                }
                TokenCmd::ShowInfo => match store.setting(conductor::auth::REG_TOKEN_CREATED)? {
                    Some(ms) => println!(
                        "registration token: set (stored as sha256 only), created_ms = {ms}"
                    ),
                    None => println!("registration token: not created yet (start the conductor)"),
                },
            }
            Ok(())
        }
        Some(Cmd::Decode {
            secret,
            worker,
            file,
        }) => {
            let mut bytes = Vec::new();
            if file == "-" {
                std::io::stdin().read_to_end(&mut bytes)?;
            } else {
                bytes = std::fs::read(file).with_context(|| format!("reading {file}"))?;
            }
            let v = conductor::decode::decode_frame(&bytes, secret.as_deref(), worker.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Some(Cmd::MosquittoConfig {
            listener,
            dynsec_file,
            admin,
        }) => {
            let plugin = conductor::dynsec::find_plugin().unwrap_or_else(|| {
                PathBuf::from("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
            });
            print!(
                "{}",
                conductor::dynsec::mosquitto_config(listener, &plugin, dynsec_file, admin)
            );
            Ok(())
        }
        Some(Cmd::NatsAuth {
            conf,
            keys,
            partitions,
        }) => {
            match conductor::nats_auth::generate_with(conf, keys, *partitions)? {
                conductor::nats_auth::Generated::Created => println!(
                    "wrote {} (include it in every NATS node's configuration{}) and {}",
                    conf.display(),
                    partitions.map_or(String::new(), |n| format!(
                        "; worker frames mapped to {n} partitions"
                    )),
                    keys.join(conductor::nats_auth::ACCOUNT_SEED).display()
                ),
                conductor::nats_auth::Generated::Existed => {
                    println!("{} and the keys exist: nothing changed", conf.display())
                }
            }
            Ok(())
        }
        Some(Cmd::Admin {
            cmd: AdminCmd::ResetPassword,
        }) => {
            let config = load_config(&cli)?;
            let store = Store::open_at(
                &conductor::store::StoreLocation::of(&config).map_err(anyhow::Error::msg)?,
            )?;
            let (pw, show) = match config.admin_password {
                Some(p) if !p.is_empty() => (p, false),
                _ => (conductor::crypto::random_hex::<12>()?, true),
            };
            if pw.len() < 8 {
                bail!("admin password must be at least 8 characters");
            }
            store.set_user(
                conductor::auth::ADMIN_USER,
                &conductor::auth::hash_password(&pw)?,
                conductor::state::now_ms(),
            )?;
            if show {
                println!("new admin password: {pw}");
            } else {
                println!("admin password set from AEREKOS_ADMIN_PASSWORD");
            }
            Ok(())
        }
    }
}
