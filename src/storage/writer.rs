//! Writing safetensors files atomically and deterministically.
//!
//! The file is written to a temporary file in the destination's directory and renamed
//! over the destination only when complete, so the destination holds either its old
//! content or the new one, never a partial file; on any error the temporary file is
//! removed. The header's keys are sorted and the tensors are laid out by decreasing
//! element size, then by name, so that equal inputs give byte-identical files and
//! every tensor is aligned to its element size.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Map, Value};

use super::dtype::DType;
use crate::error::{Error, Result};

/// One tensor to write: its description and its little-endian bytes.
pub struct TensorOut<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Writes `tensors` and `metadata` to `path` atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let order = layout(tensors);
    write_file(path, &order, metadata)
}

/// Tensors in file order: decreasing element size, then name (keeps every tensor aligned).
fn layout<'a, 'b>(tensors: &'b [TensorOut<'a>]) -> Vec<&'b TensorOut<'a>> {
    let mut order: Vec<&TensorOut<'_>> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(b.name))
    });
    order
}

fn write_file(
    path: &Path,
    order: &[&TensorOut<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let out_err = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in order {
        let expected = t.shape.iter().product::<usize>() * t.dtype.size();
        if expected != t.data.len() {
            return Err(out_err(format!(
                "internal error: tensor `{}` has {} bytes, expected {}",
                t.name,
                t.data.len(),
                expected
            )));
        }
        header.insert(
            t.name.to_string(),
            json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + t.data.len()],
            }),
        );
        offset += t.data.len();
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| out_err(format!("cannot encode header: {e}")))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    atomic_write(path, |w| {
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        for t in order {
            w.write_all(t.data)?;
        }
        Ok(())
    })
}

/// The files a sharded output at `path` (`NAME.safetensors`) consists of:
/// `NAME-0000K-of-0000N.safetensors` for K in 1..=N, and `NAME.safetensors.index.json`.
pub fn shard_paths(path: &Path, shards: usize) -> (Vec<std::path::PathBuf>, std::path::PathBuf) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".safetensors")
        .unwrap_or(&name)
        .to_string();
    let files = (1..=shards)
        .map(|k| path.with_file_name(format!("{stem}-{k:05}-of-{shards:05}.safetensors")))
        .collect();
    (
        files,
        path.with_file_name(format!("{stem}.safetensors.index.json")),
    )
}

/// Writes `tensors` as shards of at most `max_bytes` of tensor data each (a larger
/// tensor gets a shard of its own) plus an index, the layout `transformers` and
/// `safetensors` load: `metadata.total_size` and a `weight_map` from tensor name to
/// shard file. Every file is written atomically, the index last; on an error the
/// shards already written are removed. Returns the index path.
pub fn write_sharded(
    path: &Path,
    tensors: &[TensorOut<'_>],
    metadata: &BTreeMap<String, String>,
    max_bytes: u64,
) -> Result<std::path::PathBuf> {
    let order = layout(tensors);
    let mut groups: Vec<Vec<&TensorOut<'_>>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in order {
        let len = t.data.len() as u64;
        if size > 0 && size + len > max_bytes {
            groups.push(Vec::new());
            size = 0;
        }
        groups.last_mut().expect("never empty").push(t);
        size += len;
    }
    let (files, index) = shard_paths(path, groups.len());
    let mut written = Vec::new();
    // Shards in place before the index are removed if the run is interrupted.
    let mut guards = Vec::new();
    let mut weight_map = BTreeMap::new();
    let result = (|| -> Result<()> {
        for (group, file) in groups.iter().zip(&files) {
            guards.push(super::pending::track(file));
            write_file(file, group, metadata)?;
            written.push(file.clone());
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for t in group {
                weight_map.insert(t.name.to_string(), name.clone());
            }
        }
        let total: usize = tensors.iter().map(|t| t.data.len()).sum();
        let mut meta = Map::new();
        meta.insert("total_size".into(), json!(total));
        for (k, v) in metadata {
            meta.insert(k.clone(), json!(v));
        }
        let text =
            serde_json::to_string_pretty(&json!({"metadata": meta, "weight_map": weight_map}))
                .map_err(|e| Error::Output {
                    path: index.clone(),
                    message: format!("cannot encode the index: {e}"),
                })?;
        atomic_write(&index, |w| w.write_all(text.as_bytes()))
    })();
    if result.is_err() {
        for f in &written {
            let _ = std::fs::remove_file(f);
        }
    }
    result.map(|_| index)
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or `1000000` (bytes). Decimal units
/// are powers of 1000 (as Hugging Face's `max_shard_size`), binary ones powers of 1024.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size like 5GB or 500MB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = (value * mult).round();
    if bytes < 1.0 {
        return Err(format!("`{s}`: must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Writes a file atomically: `write` fills a temporary file in `path`'s directory,
/// which is flushed, synced, given the usual `rw-r--r--` permissions and renamed over
/// `path`. On any error the temporary file is removed and `path` is untouched.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    atomic_write_with(path, ".tmp", |tmp| {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write(&mut w).and_then(|_| w.flush()).map_err(|e| {
            let hint = match e.raw_os_error() {
                // ENOSPC, EDQUOT, EFBIG
                Some(28) | Some(122) | Some(27) => " (disk full, quota or file-size limit?)",
                // EFAULT: reading a memory-mapped page that no longer exists
                Some(14) => " (was a checkpoint truncated while it was being read?)",
                _ => "",
            };
            Error::Output {
                path: path.to_path_buf(),
                message: format!("write failed: {e}{hint}; nothing was written"),
            }
        })
    })
}

/// Like [`atomic_write`], for writers that need the temporary file itself (a path to
/// render to): `fill` writes it, `suffix` ends its name (some writers choose the
/// format by extension). The temporary file is removed if the process is interrupted.
pub fn atomic_write_with(
    path: &Path,
    suffix: &str,
    fill: impl FnOnce(&tempfile::NamedTempFile) -> Result<()>,
) -> Result<()> {
    let out_err = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(suffix)
        .tempfile_in(dir)
        .map_err(|e| {
            out_err(format!(
                "cannot create a temporary file in {}: {e}",
                dir.display()
            ))
        })?;
    let _pending = super::pending::track(tmp.path());
    fill(&tmp)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| out_err(format!("cannot set permissions: {e}")))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| out_err(format!("sync failed: {e}")))?;
    // Fault injection for the interruption tests: hold the finished temporary file
    // before the rename.
    if let Some(ms) = std::env::var("ASWA_MERGE_TEST_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    tmp.persist(path).map_err(|e| {
        out_err(format!(
            "cannot move the finished file into place: {}",
            e.error
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn round_trips_through_the_safetensors_crate_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = 7i64.to_le_bytes().to_vec();
        let c: Vec<u8> = vec![0x3c, 0x00];
        let tensors = [
            TensorOut {
                name: "w",
                dtype: DType::F32,
                shape: &[3],
                data: &a,
            },
            TensorOut {
                name: "n",
                dtype: DType::I64,
                shape: &[],
                data: &b,
            },
            TensorOut {
                name: "h",
                dtype: DType::F16,
                shape: &[1],
                data: &c,
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        meta.insert("a".to_string(), "b".to_string());
        let p1 = dir.path().join("one.safetensors");
        let p2 = dir.path().join("two.safetensors");
        write_safetensors(&p1, &tensors, &meta).unwrap();
        write_safetensors(&p2, &tensors, &meta).unwrap();
        let bytes = std::fs::read(&p1).unwrap();
        assert_eq!(bytes, std::fs::read(&p2).unwrap());
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("w").unwrap().data(), &a[..]);
        assert_eq!(st.tensor("n").unwrap().data(), &b[..]);
        assert_eq!(st.tensor("h").unwrap().data(), &c[..]);
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["k"], "v");
        // Nothing but the two outputs is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn sharded_output_has_an_index_and_respects_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![1u8; 400];
        let b = vec![2u8; 400];
        let c = vec![3u8; 40];
        let tensors = [
            TensorOut {
                name: "a",
                dtype: DType::F32,
                shape: &[100],
                data: &a,
            },
            TensorOut {
                name: "b",
                dtype: DType::F32,
                shape: &[100],
                data: &b,
            },
            TensorOut {
                name: "c",
                dtype: DType::F32,
                shape: &[10],
                data: &c,
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let index = write_sharded(&dir.path().join("m.safetensors"), &tensors, &meta, 500).unwrap();
        assert_eq!(index.file_name().unwrap(), "m.safetensors.index.json");
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        assert_eq!(idx["metadata"]["total_size"], 840);
        assert_eq!(idx["weight_map"]["a"], "m-00001-of-00002.safetensors");
        assert_eq!(idx["weight_map"]["b"], "m-00002-of-00002.safetensors");
        assert_eq!(idx["weight_map"]["c"], "m-00002-of-00002.safetensors");
        let bytes = std::fs::read(dir.path().join("m-00002-of-00002.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("c").unwrap().data(), &c[..]);
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5kb").unwrap(), 1500);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.safetensors");
        let bad = [TensorOut {
            name: "w",
            dtype: DType::F32,
            shape: &[2],
            data: &[0u8; 4],
        }];
        assert!(write_safetensors(&p, &bad, &BTreeMap::new()).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
