//! `aerekos` command line; see the library docs for the commands.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = aerekos_cli::Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match aerekos_cli::run(cli, &mut out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(aerekos_cli::CliError::Exited(code)) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("aerekos: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
