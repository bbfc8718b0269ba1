//! `edge-worker`: parse the command line, set up logging and a
//! single-threaded runtime, run the agent until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use edge_worker::cli::{self, Cli};

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let (config, warnings) = match cli::parse(
        std::env::args().skip(1).collect(),
        env,
        cli::default_state_dir,
    ) {
        Ok(Cli::Run(config, warnings)) => (*config, warnings),
        Ok(Cli::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Version) => {
            println!(
                "edge-worker {} (wire formats {} and {})",
                edge_worker::VERSION,
                protocol::FORMAT_VERSION,
                protocol::FORMAT_V2
            );
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Decode {
            secret,
            worker,
            input,
        }) => {
            return match cli::decode_input(&input, secret.as_deref(), worker.as_deref()) {
                Ok((json, verified)) => {
                    println!("{json}");
                    eprintln!(
                        "{}",
                        if verified {
                            "tag verified"
                        } else {
                            "unverified (no --secret)"
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edge-worker: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => {
            eprintln!("edge-worker: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(cli::log_level(env))
        .with_writer(std::io::stderr)
        // No colours: the ANSI support costs the agent ~KiBs and its logs
        // mostly go to journald.
        .with_ansi(false)
        .with_target(false)
        .init();
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state_dir = config.state_dir.clone();
    let result = runtime.block_on(edge_worker::run_until(config, shutdown_signal()));
    if let (true, Ok(edge_worker::Ended::UpdateStaged)) = (cfg!(feature = "self-update"), &result) {
        // This process runs the new agent on trial, then becomes it (or
        // this agent again): `run_trial` returns only if it cannot.
        let why = runtime.block_on(edge_worker::update::run_trial(
            &state_dir,
            shutdown_signal(),
        ));
        tracing::error!("self-update: {why}");
        return ExitCode::FAILURE;
    }
    // Do not wait for a blocking HTTP call or sample still in flight.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
