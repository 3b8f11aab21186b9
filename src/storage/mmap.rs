//! The one place where files are memory-mapped.
//!
//! # Safety and the hazard of a file changing underneath
//!
//! A memory map is only sound while nobody truncates or rewrites the file. Training
//! jobs write new checkpoints into the same directory, and a checkpoint rewritten in
//! place while we read it could give a wrong average or a `SIGBUS`. We cannot prevent
//! that from user space; we narrow it: the file's size and modification time are
//! recorded when it is mapped and checked again by [`MappedFile::check_unchanged`]
//! once scoring is done and before anything is written, so a change is reported as an
//! error instead of going unnoticed. Writers that write a temporary file and rename it
//! (as this tool does) leave our mapping of the old file intact; a writer that rewrites
//! the file in place does not.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// A read-only memory map of a whole file, with what is needed to notice a change.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
    len: u64,
    modified: Option<SystemTime>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::checkpoint(path, "not a regular file"));
        }
        // SAFETY: the map is read-only and private to this process. The file may still be
        // changed by another process; see the module documentation for how that is detected.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
            map,
        })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes when it was mapped.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// `true` for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// SHA-256 of the mapped bytes, as lower-case hex. Reads the whole file (once; the
    /// pages are then cached for averaging).
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Fails when the file's size or modification time differ from when it was mapped.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?;
        if meta.len() != self.len || meta.modified().ok() != self.modified {
            return Err(Error::checkpoint(
                &self.path,
                "the file changed while it was being read (was it rewritten by a running job?); \
                 rerun when it is complete",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changed_after_mapping_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        std::fs::write(&p, [1u8; 64]).unwrap();
        let m = MappedFile::open(&p).unwrap();
        assert!(m.check_unchanged().is_ok());
        // Rewritten in place with another length (a replacement by rename keeps our
        // mapping of the old file but changes what the path points to: also detected).
        std::fs::write(&p, [2u8; 32]).unwrap();
        let err = m.check_unchanged().unwrap_err().to_string();
        assert!(err.contains("changed while it was being read"), "{err}");
    }

    #[test]
    fn hashes_are_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            MappedFile::open(&p).unwrap().sha256(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
