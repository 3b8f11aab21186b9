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
//!
//! # Resident memory
//!
//! Pages of a map that have been read count in the process's resident memory (RSS) until
//! the map is dropped, and what watches RSS (`/usr/bin/time`, `ps`, schedulers that kill
//! on RSS) charges them. A run reads each checkpoint a few times and then no longer needs
//! it, so callers hand pages back with [`MappedFile::release`] /
//! [`MappedFile::release_range`] once they are done; that keeps resident memory at a few
//! checkpoints whatever their number. The file's pages stay in the page cache, so reading
//! them again is a minor fault, not disk I/O. (A cgroup's memory limit charges page-cache
//! pages whether they are mapped or not; the kernel reclaims those under pressure.)

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::{Mmap, UncheckedAdvice};

use crate::error::{Error, Result};

/// A read-only memory map of a whole file, with what is needed to notice a change.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
    len: u64,
    modified: Option<SystemTime>,
    /// Device and inode (Unix): a file replaced by another under the same name, size and
    /// modification time (`cp -p`, `rsync -a`) is still noticed.
    identity: Option<(u64, u64)>,
}

/// The device and inode of a file, where the platform has them.
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::checkpoint(path, "not a regular file"));
        }
        // SAFETY: the map is read-only (memmap2 maps the file shared, read-only) and this
        // process never writes through it. The file may still be changed by another
        // process; see the module documentation for how that is detected.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
            identity: identity(&meta),
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

    /// SHA-256 of the file, as lower-case hex. The file is read through a small buffer,
    /// not through the map, so hashing adds nothing to resident memory; a file that is no
    /// longer the one mapped (replaced, resized, rewritten) is reported as changed.
    pub fn sha256(&self) -> Result<String> {
        use sha2::Digest;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if !self.same_file(&meta) {
            return Err(self.changed());
        }
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(&self.path, e)),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        if total != self.len {
            return Err(self.changed());
        }
        self.check_unchanged()?;
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Hands the pages of the whole map back to the kernel (see the module documentation).
    pub fn release(&self) {
        self.release_range(0..self.map.len());
    }

    /// Hands back the pages holding byte range `range` of the map. Pages at its ends may
    /// also hold neighbouring bytes: those are simply faulted in again if read. Purely
    /// advisory: a failure changes nothing but memory use, so it is ignored.
    pub fn release_range(&self, range: std::ops::Range<usize>) {
        let (start, end) = (range.start, range.end.min(self.map.len()));
        if end > start {
            // (memmap2 widens the range to whole pages.)
            // SAFETY: MADV_DONTNEED on a read-only file mapping that this process never
            // writes only unmaps clean page-cache pages; the next read maps them again from
            // the page cache (or the file), so every slice handed out by `bytes` keeps
            // reading the same data as long as the file is not changed in place (the
            // hazard the module documentation describes, which exists without it too).
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    /// Fails when the file's size or modification time differ from when it was mapped.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?;
        if !self.same_file(&meta) {
            return Err(self.changed());
        }
        Ok(())
    }

    /// Whether `meta` describes the file as it was mapped.
    fn same_file(&self, meta: &std::fs::Metadata) -> bool {
        meta.len() == self.len
            && meta.modified().ok() == self.modified
            && identity(meta) == self.identity
    }

    fn changed(&self) -> Error {
        Error::checkpoint(
            &self.path,
            "the file changed while it was being read (was it rewritten by a running job?); \
             rerun when it is complete",
        )
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

    #[cfg(unix)]
    #[test]
    fn a_file_replaced_with_the_same_size_and_time_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        std::fs::write(&p, [1u8; 64]).unwrap();
        let m = MappedFile::open(&p).unwrap();
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        // As `cp -p` or `rsync -a` through a temporary file do: another inode, same
        // size and modification time.
        let tmp = dir.path().join("f.tmp");
        std::fs::write(&tmp, [2u8; 64]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), mtime);
        for err in [m.check_unchanged().unwrap_err(), m.sha256().unwrap_err()] {
            assert!(
                err.to_string().contains("changed while it was being read"),
                "{err}"
            );
        }
        // The map still reads the file as it was.
        assert_eq!(m.bytes(), &[1u8; 64][..]);
    }

    /// Resident bytes of the mapping that starts at `addr`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn resident(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let range = line.split_whitespace().next().unwrap_or("");
            let Some((lo, _)) = range.split_once('-') else {
                continue;
            };
            if usize::from_str_radix(lo, 16) == Ok(addr) {
                let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
                let kib: usize = rss.split_whitespace().nth(1).unwrap().parse().unwrap();
                return kib * 1024;
            }
        }
        panic!("mapping at {addr:#x} not found");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn released_pages_leave_resident_memory_and_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let m = MappedFile::open(&p).unwrap();
        let addr = m.bytes().as_ptr() as usize;
        let sum = |b: &[u8]| b.iter().map(|&x| u64::from(x)).sum::<u64>();
        let want = sum(&data);
        assert_eq!(sum(m.bytes()), want);
        assert_eq!(resident(addr), data.len());

        // A range: at least its pages go (the kernel may drop a whole huge page around it).
        m.release_range(1 << 20..3 << 20);
        assert!(resident(addr) <= data.len() - (2 << 20));
        assert_eq!(
            sum(&m.bytes()[1 << 20..3 << 20]),
            sum(&data[1 << 20..3 << 20])
        );
        // Everything, then read again: same bytes, resident again.
        m.release();
        assert_eq!(resident(addr), 0);
        assert_eq!(m.bytes(), &data[..]);
        assert_eq!(resident(addr), data.len());
    }

    #[test]
    fn hashes_are_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            MappedFile::open(&p).unwrap().sha256().unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
