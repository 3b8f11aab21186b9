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
    let out_err = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let mut order: Vec<&TensorOut<'_>> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(b.name))
    });

    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in &order {
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
        for t in &order {
            w.write_all(t.data)?;
        }
        Ok(())
    })
}

/// Writes a file atomically: `write` fills a temporary file in `path`'s directory,
/// which is flushed, synced, given the usual `rw-r--r--` permissions and renamed over
/// `path`. On any error the temporary file is removed and `path` is untouched.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&std::fs::File>) -> std::io::Result<()>,
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
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| {
            out_err(format!(
                "cannot create a temporary file in {}: {e}",
                dir.display()
            ))
        })?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write(&mut w)
            .and_then(|_| w.flush())
            .map_err(|e| out_err(format!("write failed: {e}")))?;
    }
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
