//! The `key-manager` binary: [`service_runtime::boot()`] runs
//! [`key_manager::KeyManager`]. See the crate docs and `README.md`.

fn main() {
    service_runtime::boot::<key_manager::KeyManager>();
}
