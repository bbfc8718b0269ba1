//! Shared by the storage-manager benchmarks (`sm_bench`, `sm_client_bench`,
//! which include it with `#[path]`): a real key-manager and storage-manager
//! in this process, each served over loopback HTTP as in production.

use std::path::Path;
use std::sync::Arc;

use key_manager::crypto::{MasterKey, MasterSource, SecretKey};
use storage_manager::http::{AccessKeys, S3Service};
use storage_manager::kms::KeyManager;
use storage_manager::{Limits, S3Server, Store};

/// The benchmark's access key id.
pub const AKID: &str = "AKIDBENCH";
/// Its secret.
pub const SECRET: &str = "bench-secret-0123456789";
/// storage-manager's key-manager client token.
const KM_TOKEN: &str = "bench-token-0123456789abcdef";

/// MiB/s.
pub fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}

/// A key-manager with a fresh master key and its data in `dir`, serving
/// storage-manager's token; returns the server and its URL.
pub fn start_key_manager(dir: &Path) -> Result<(S3Server, String), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let master = MasterKey::new(
        SecretKey::random().map_err(|x| e(&x))?,
        MasterSource::Explicit,
    );
    let km_store = key_manager::Store::open(dir, master).map_err(|x| e(&x))?;
    let kms = Arc::new(key_manager::Kms::new(
        km_store,
        key_manager::Clients::from_pairs([("storage", KM_TOKEN)]),
        key_manager::Audit::stderr_only("key-manager"),
    ));
    let server = key_manager::SPEC
        .serve("127.0.0.1:0", 2, key_manager::http::handler(kms))
        .map_err(|x| e(&x))?;
    let url = format!("http://{}", server.addr());
    Ok((server, url))
}

/// storage-manager's store in `dir`, encrypting with data keys from the
/// key-manager at `km_url` (key `bench`), or plaintext without one.
pub fn open_store(dir: &Path, km_url: Option<&str>) -> Result<Store, String> {
    let km = km_url.map(|url| Arc::new(KeyManager::new(url, "bench", KM_TOKEN)));
    Store::open(dir, Limits::default(), km).map_err(|e| e.to_string())
}

/// A storage-manager with its data in `dir`, the access key [`AKID`] and
/// `threads` request threads; encrypting with data keys from the
/// key-manager at `km_url` (key `bench`), or plaintext without one.
pub fn start_storage_manager(
    dir: &Path,
    km_url: Option<&str>,
    threads: usize,
) -> Result<S3Server, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let store = open_store(dir, km_url)?;
    let svc = Arc::new(S3Service::new(
        store,
        AccessKeys::from_pairs([(AKID, SECRET)]),
        Arc::new(|_| {}),
    ));
    storage_manager::SPEC
        .serve("127.0.0.1:0", threads, storage_manager::http::handler(svc))
        .map_err(|x| e(&x))
}
