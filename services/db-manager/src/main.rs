//! The `db-manager` binary: parses the command line and runs
//! [`db_manager::run`]. See the crate docs and `README.md`.

fn main() {
    let opts = match db_manager::Options::parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{}", db_manager::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("db-manager: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = db_manager::run(opts) {
        eprintln!("db-manager: {e}");
        std::process::exit(1);
    }
}
