//! Shared by the fuzz targets: the readers take paths, so every input is written to a
//! file first. One scratch directory per process, `aswa-fuzz-<pid>` on tmpfs when there is
//! one, one file per target, overwritten on every iteration (the previous iteration's maps
//! and file handles are dropped by then). libFuzzer leaves with `exit`, which runs no
//! destructors, so each process first removes the directories of processes that are gone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

const PREFIX: &str = "aswa-fuzz-";

fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix(PREFIX) else {
                    continue;
                };
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = base.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("cannot create a scratch directory");
        d
    })
}

/// Writes `data` to `<scratch>/<name>` and returns its path.
pub fn write_input(name: &str, data: &[u8]) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, data).expect("cannot write the fuzz input");
    p
}
