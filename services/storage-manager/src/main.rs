//! The `storage-manager` binary: [`service_runtime::boot()`] runs
//! [`storage_manager::StorageManager`]. See the crate docs and `README.md`.

fn main() {
    service_runtime::boot::<storage_manager::StorageManager>();
}
