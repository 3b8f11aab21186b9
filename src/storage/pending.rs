//! Files being written: removed if the process is interrupted.
//!
//! Outputs are written to temporary files and renamed into place when complete (see
//! [`super::writer::atomic_write`]). A `SIGINT`, `SIGTERM` or `SIGBUS` in between would
//! leave the temporary file behind; the CLI's signal handlers call [`remove_all`] so that
//! an interrupted run leaves the output path as it was and no litter beside it.
//!
//! The list is a fixed table of atomic pointers to NUL-terminated paths, so that
//! [`remove_all`] takes no lock and makes only async-signal-safe calls (`unlink(2)`): it
//! may run inside a signal handler. A path's bytes are never freed (a few hundred bytes
//! per file written), so a handler can never read freed memory.

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};

const SLOTS: usize = 64;

static PENDING: [AtomicPtr<libc::c_char>; SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];

/// Keeps a path on the list of files to remove on interruption while it lives.
#[derive(Debug)]
pub struct Guard(Option<usize>);

/// Puts `path` on the list until the returned guard is dropped. With more than 64
/// files in progress at once (never the case in this tool) the extra ones are not
/// tracked.
pub fn track(path: &Path) -> Guard {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Guard(None);
    };
    let ptr = c.into_raw();
    for (i, slot) in PENDING.iter().enumerate() {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                ptr,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            return Guard(Some(i));
        }
    }
    Guard(None)
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            // The path's memory is deliberately leaked: a signal handler may be reading it.
            PENDING[i].store(std::ptr::null_mut(), Ordering::Release);
        }
    }
}

/// Removes every tracked file. Async-signal-safe: no allocation, no lock, only
/// `unlink(2)`; errors are ignored (a file may already have been renamed into place).
pub fn remove_all() {
    for slot in &PENDING {
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: `p` came from `CString::into_raw` and is never freed.
            unsafe {
                libc::unlink(p);
            }
        }
    }
}

// Tested end to end (a unit test calling `remove_all` would delete the temporary files
// of tests running in parallel in the same process): tests/hostile.rs interrupts the
// binary mid-write; fuzz/repro/sigbus_during_write.py truncates a checkpoint under it.
