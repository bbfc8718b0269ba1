//! The `storage-manager` binary: parses the command line and runs
//! [`storage_manager::run`]. See the crate docs and `README.md`.

fn main() {
    let opts = match storage_manager::Options::parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{}", storage_manager::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("storage-manager: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = storage_manager::run(opts) {
        eprintln!("storage-manager: {e}");
        std::process::exit(1);
    }
}
