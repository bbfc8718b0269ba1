//! Crash-safe file replacement.
//!
//! [`write_atomic`] leaves either the old or the new contents after a
//! `kill -9` or power loss at any point: temp file, `fsync`, `rename`,
//! `fsync` of the directory. The temp file is `.<name>.tmp` in the same
//! directory; a service removes leftovers at start with
//! [`remove_temp_files`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A failed durable write: what was being done, to which path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct DurableError {
    /// What was being done ("creating", "syncing", ...).
    pub action: &'static str,
    /// The path involved.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

fn err<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> DurableError + 'p {
    move |source| DurableError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `dir/name` (mode 0600) so that after a crash it holds either the
/// old or the new contents.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DurableError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err("creating", &tmp))?;
    f.write_all(bytes).map_err(err("writing", &tmp))?;
    f.sync_all().map_err(err("syncing", &tmp))?;
    drop(f);
    fs::rename(&tmp, &dest).map_err(err("renaming into", &dest))?;
    sync_dir(dir)
}

/// `fsync`s a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("syncing", dir))
}

/// Removes `.<name>.tmp` files left in `dir` by a crash during
/// [`write_atomic`]; returns how many were removed.
pub fn remove_temp_files(dir: &Path) -> Result<usize, DurableError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(err("listing", dir))? {
        let entry = entry.map_err(err("listing", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            fs::remove_file(entry.path()).map_err(err("removing", dir))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "a", b"one").unwrap();
        write_atomic(dir.path(), "a", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"two");
        let mode = fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.path().join(".b.tmp"), b"half").unwrap();
        assert_eq!(remove_temp_files(dir.path()).unwrap(), 1);
        assert!(!dir.path().join(".b.tmp").exists());
        assert!(dir.path().join("a").exists());
        let e = write_atomic(&dir.path().join("missing"), "a", b"x").unwrap_err();
        assert!(e.to_string().contains("creating"), "{e}");
    }
}
