//! Pins: the part directories (`data/<upload id>/`) of multipart objects
//! being read, so a delete or overwrite never cuts a read short.
//!
//! A read of a multipart object ([`super::Store::reader`]) *pins* its
//! part directory: under the pin table's lock it opens the directory
//! itself (one file descriptor) and counts itself as a reader; it then
//! opens each part as it reaches it, relative to that descriptor
//! (`openat`), so it holds at most two descriptors (the directory and the
//! current part) whatever the number of parts (up to
//! [`super::MAX_PARTS`]).
//!
//! A delete or overwrite *discards* the directory once its change is
//! durable: under the same lock it renames the directory into `tmp/`
//! (atomic; `tmp/` is emptied at start, so a crash at any point leaves
//! nothing behind) and removes it at once if no read holds it, else the
//! last read to finish removes it. Invariants:
//!
//! * a pin either opened the directory before the discard's rename (and
//!   the discard sees it counted, so the parts stay until it is dropped;
//!   the descriptor follows the directory into `tmp/`), or after it, and
//!   then the open fails (`NotFound`) before any byte is read: the read
//!   fails cleanly (the object is gone) instead of ending short;
//! * nothing is unlinked while the count of a directory is not zero.
//!
//! The cost: the space of a deleted or replaced multipart object is freed
//! when the last read of it ends (a client stalled mid-body holds it until
//! the request times out).

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Readers of one part directory.
#[derive(Debug, Default)]
struct PinState {
    /// Reads holding the directory.
    readers: usize,
    /// Where the discarded directory now is (under `tmp/`, or in place if
    /// it could not be moved): set once it is discarded; the last reader
    /// removes it. A directory with this set cannot be pinned again.
    doomed: Option<PathBuf>,
}

type Table = Arc<Mutex<HashMap<PathBuf, PinState>>>;

/// The pin table of a store.
#[derive(Debug, Default)]
pub(super) struct Pins {
    table: Table,
}

fn lock(t: &Table) -> MutexGuard<'_, HashMap<PathBuf, PinState>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a discarded directory (logged if it fails: a directory under
/// `tmp/` goes at the next start, one left in `data/` is no object's and
/// goes then too).
fn remove(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("storage-manager: removing {}: {e}", dir.display()),
    }
}

impl Pins {
    /// Pins `dir` for a read: opens it and counts the read until the
    /// returned [`DirPin`] is dropped. `NotFound` if the directory is gone
    /// (discarded: the object was deleted or replaced).
    pub(super) fn pin(&self, dir: &Path) -> std::io::Result<DirPin> {
        let mut t = lock(&self.table);
        if t.get(dir).is_some_and(|s| s.doomed.is_some()) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        // Opened under the lock: a discard renames under it too.
        let fd = File::open(dir)?;
        t.entry(dir.to_path_buf()).or_default().readers += 1;
        Ok(DirPin {
            table: self.table.clone(),
            key: dir.to_path_buf(),
            dir: fd,
        })
    }

    /// Discards `dir` (the parts of an object that is gone, the change
    /// durable): moved to `trash` at once, removed now if no read holds
    /// it, else by the last read. A directory already gone is ignored.
    pub(super) fn discard(&self, dir: &Path, trash: &Path) {
        let mut t = lock(&self.table);
        let at = match fs::rename(dir, trash) {
            Ok(()) => trash.to_path_buf(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                eprintln!(
                    "storage-manager: moving {} to {}: {e}; removing it in place",
                    dir.display(),
                    trash.display()
                );
                dir.to_path_buf()
            }
        };
        let state = t.entry(dir.to_path_buf()).or_default();
        state.doomed = Some(at.clone());
        if state.readers > 0 {
            return;
        }
        // Kept in the table (doomed: no new pin) while it is removed.
        drop(t);
        remove(&at);
        lock(&self.table).remove(dir);
    }

    /// Directories pinned now (for tests and diagnostics).
    #[cfg(test)]
    pub(super) fn pinned(&self) -> usize {
        lock(&self.table).values().filter(|s| s.readers > 0).count()
    }
}

/// A read's hold on a part directory (see the module docs); dropping it
/// releases the hold and removes the directory if it was discarded and
/// this was its last read.
#[derive(Debug)]
pub(super) struct DirPin {
    table: Table,
    key: PathBuf,
    dir: File,
}

impl DirPin {
    /// Opens `name` (a part file) in the pinned directory, wherever the
    /// directory is now.
    pub(super) fn open(&self, name: &str) -> std::io::Result<File> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }
}

impl Drop for DirPin {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        let Some(state) = t.get_mut(&self.key) else {
            return;
        };
        state.readers = state.readers.saturating_sub(1);
        if state.readers > 0 {
            return;
        }
        match state.doomed.clone() {
            None => {
                t.remove(&self.key);
            }
            Some(at) => {
                drop(t);
                remove(&at);
                lock(&self.table).remove(&self.key);
            }
        }
    }
}
