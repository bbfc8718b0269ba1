//! The `db-manager` binary: [`service_runtime::boot()`] runs
//! [`db_manager::DbManager`]. See the crate docs and `README.md`.

fn main() {
    service_runtime::boot::<db_manager::DbManager>();
}
