//! The `key-manager` binary: parses the command line and runs
//! [`key_manager::run`]. See the crate docs and `README.md`.

fn main() {
    let opts = match key_manager::Options::parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{}", key_manager::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("key-manager: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = key_manager::run(opts) {
        eprintln!("key-manager: {e}");
        std::process::exit(1);
    }
}
