//! Files being written: removed if the process is interrupted.
//!
//! Outputs are written to temporary files and renamed into place when complete (see
//! [`super::writer::atomic_write`]). A `SIGINT` or `SIGTERM` in between would leave the
//! temporary file behind; the CLI's signal handler calls [`remove_all`] so that an
//! interrupted run leaves the output path as it was and no litter beside it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Keeps `path` on the list of files to remove on interruption while it lives.
#[derive(Debug)]
pub struct Guard(PathBuf);

/// Puts `path` on the list until the returned guard is dropped.
pub fn track(path: &Path) -> Guard {
    if let Ok(mut list) = PENDING.lock() {
        list.push(path.to_path_buf());
    }
    Guard(path.to_path_buf())
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut list) = PENDING.lock() {
            if let Some(i) = list.iter().rposition(|p| *p == self.0) {
                list.swap_remove(i);
            }
        }
    }
}

/// Removes every tracked file (for the signal handler; errors are ignored, a file may
/// already have been renamed into place).
pub fn remove_all() {
    let list = match PENDING.lock() {
        Ok(list) => list.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for p in list {
        let _ = std::fs::remove_file(p);
    }
}
