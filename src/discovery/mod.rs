//! Finding checkpoints in a directory, ordering them, and finding the ONNX model.
//!
//! A checkpoint is either a `*.safetensors` file directly in the directory, or a
//! Hugging Face style sub-folder (`checkpoint-500/`) holding `model.safetensors` or a
//! `*.safetensors.index.json` with its shards. Checkpoints are ordered by the last
//! integer in their name (`epoch_2` before `epoch_10`), ties by name. Files written by
//! this tool carry a marker in their metadata and are never taken as checkpoints.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::storage::{CheckpointSource, PRODUCER_KEY};

/// A checkpoint found by discovery, with the name used for ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The name relative to the checkpoint directory (`epoch_3.safetensors`, `checkpoint-500`).
    pub name: String,
    /// The number used for ordering, if the name holds one.
    pub number: Option<u64>,
    pub source: CheckpointSource,
}

/// What discovery found, in processing order, and what it left out and why.
#[derive(Debug, Default)]
pub struct Discovery {
    pub checkpoints: Vec<Found>,
    /// Paths that looked like checkpoints but were skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Options for [`discover`].
#[derive(Debug, Default, Clone)]
pub struct DiscoverOptions {
    /// Keep only checkpoints whose name (relative to the directory) matches.
    pub glob: Option<String>,
}

/// Finds and orders the checkpoints in `dir`.
pub fn discover(dir: &Path, options: &DiscoverOptions) -> Result<Discovery> {
    if !dir.is_dir() {
        return Err(Error::Discovery(format!(
            "{}: not a directory (give the directory that holds the checkpoints)",
            dir.display()
        )));
    }
    let pattern = match &options.glob {
        Some(g) => {
            Some(glob::Pattern::new(g).map_err(|e| Error::Usage(format!("--glob `{g}`: {e}")))?)
        }
        None => None,
    };
    let mut out = Discovery::default();

    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();

    // Shards listed by an index directly in `dir` belong to that index's checkpoint.
    let mut shard_files = Vec::new();
    for p in &entries {
        if is_index(p) {
            shard_files.extend(index_files(p).into_iter().map(|f| dir.join(f)));
        }
    }

    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let source = if path.is_dir() {
            match folder_checkpoint(&path) {
                Some(s) => s,
                None => continue,
            }
        } else if is_index(&path) {
            if index_written_by_us(&path) {
                out.skipped.push((
                    path.clone(),
                    "it is a sharded output of aswa-merge (its index says so)".into(),
                ));
                continue;
            }
            CheckpointSource::Sharded {
                index: path.clone(),
            }
        } else if name.ends_with(".safetensors") && !shard_files.contains(&path) {
            CheckpointSource::File(path.clone())
        } else {
            continue;
        };
        if let Some(p) = &pattern {
            if !p.matches(&name) {
                continue;
            }
        }
        if let CheckpointSource::File(f) = &source {
            if written_by_us(f) {
                out.skipped.push((
                    f.clone(),
                    "it was written by aswa-merge (its metadata says so)".into(),
                ));
                continue;
            }
        }
        let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
        out.checkpoints.push(Found {
            number: last_number(stem),
            name,
            source,
        });
    }
    out.checkpoints
        .sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    if out.checkpoints.is_empty() {
        let what = match &options.glob {
            Some(g) => format!("matching --glob `{g}` "),
            None => String::new(),
        };
        return Err(Error::Discovery(format!(
            "no checkpoints {what}found in {}: expected `*.safetensors` files, or sub-folders \
             holding `model.safetensors` or `model.safetensors.index.json`",
            dir.display()
        )));
    }
    Ok(out)
}

fn order_key(f: &Found) -> (bool, u64, &str) {
    (f.number.is_none(), f.number.unwrap_or(0), &f.name)
}

/// The last run of decimal digits in `name`, saturating at `u64::MAX`.
pub fn last_number(name: &str) -> Option<u64> {
    let bytes = name.as_bytes();
    let end = bytes.iter().rposition(u8::is_ascii_digit)? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    Some(name[start..end].parse().unwrap_or(u64::MAX))
}

fn is_index(p: &Path) -> bool {
    p.is_file()
        && p.file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".safetensors.index.json"))
}

/// The shard file names an index lists (empty when it cannot be read: opening the
/// checkpoint reports that properly).
fn index_files(index: &Path) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    fs::read_to_string(index)
        .ok()
        .and_then(|t| serde_json::from_str::<Index>(&t).ok())
        .map(|i| i.weight_map.into_values().collect())
        .unwrap_or_default()
}

/// A Hugging Face style checkpoint folder: `model.safetensors`, else an index.
fn folder_checkpoint(dir: &Path) -> Option<CheckpointSource> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Some(CheckpointSource::File(single));
    }
    let preferred = dir.join("model.safetensors.index.json");
    if preferred.is_file() {
        return Some(CheckpointSource::Sharded { index: preferred });
    }
    let mut indexes: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_index(p))
        .collect();
    indexes.sort();
    indexes
        .into_iter()
        .next()
        .map(|index| CheckpointSource::Sharded { index })
}

/// `true` when a shard index's `metadata` carries this tool's marker.
fn index_written_by_us(path: &Path) -> bool {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["metadata"].get(PRODUCER_KEY).is_some())
}

/// `true` when the file's safetensors metadata carries this tool's marker.
fn written_by_us(path: &Path) -> bool {
    let read = || -> Option<bool> {
        let mut f = fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            return None;
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
        Some(v.get("__metadata__")?.get(PRODUCER_KEY).is_some())
    };
    read().unwrap_or(false)
}

/// Finds the ONNX model when `--model` is not given: the single `*.onnx` file in `dir`,
/// else in its parent.
pub fn find_model(dir: &Path) -> Result<PathBuf> {
    let mut looked = Vec::new();
    let parent = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf));
    for place in std::iter::once(dir.to_path_buf()).chain(parent) {
        let mut models: Vec<PathBuf> = fs::read_dir(&place)
            .map_err(|e| Error::io(&place, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        models.sort();
        match models.len() {
            0 => looked.push(place.display().to_string()),
            1 => return Ok(models.remove(0)),
            _ => {
                let names: Vec<String> = models.iter().map(|m| m.display().to_string()).collect();
                return Err(Error::Discovery(format!(
                    "several ONNX models in {}: {}; choose one with --model",
                    place.display(),
                    names.join(", ")
                )));
            }
        }
    }
    Err(Error::Discovery(format!(
        "no ONNX model given and no `*.onnx` file in {}; pass --model MODEL.onnx",
        looked.join(" or ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_number_takes_the_last_run_of_digits() {
        assert_eq!(last_number("epoch_2"), Some(2));
        assert_eq!(last_number("epoch_010"), Some(10));
        assert_eq!(last_number("run3-checkpoint-1500"), Some(1500));
        assert_eq!(last_number("model-v2-step7x"), Some(7));
        assert_eq!(last_number("last"), None);
        assert_eq!(last_number("99999999999999999999999"), Some(u64::MAX));
    }

    fn touch_st(path: &Path, metadata: &str) {
        let header = format!("{{\"__metadata__\":{metadata},\"w\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}}}");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&1f32.to_le_bytes());
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn orders_numerically_then_by_name_and_skips_own_outputs() {
        let d = tempfile::tempdir().unwrap();
        for n in ["epoch_10", "epoch_2", "epoch_1", "best"] {
            touch_st(&d.path().join(format!("{n}.safetensors")), "{}");
        }
        touch_st(
            &d.path().join("aswa.safetensors"),
            &format!("{{\"{PRODUCER_KEY}\":\"0.1.0\"}}"),
        );
        fs::create_dir(d.path().join("checkpoint-500")).unwrap();
        touch_st(&d.path().join("checkpoint-500/model.safetensors"), "{}");
        fs::create_dir(d.path().join("logs")).unwrap();
        fs::write(d.path().join("notes.txt"), "x").unwrap();

        let found = discover(d.path(), &DiscoverOptions::default()).unwrap();
        let names: Vec<&str> = found.checkpoints.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "epoch_1.safetensors",
                "epoch_2.safetensors",
                "epoch_10.safetensors",
                "checkpoint-500",
                "best.safetensors"
            ]
        );
        assert_eq!(found.skipped.len(), 1);

        let only = discover(
            d.path(),
            &DiscoverOptions {
                glob: Some("epoch_*".into()),
            },
        )
        .unwrap();
        assert_eq!(only.checkpoints.len(), 3);
    }

    #[test]
    fn empty_directory_is_an_error_that_says_what_was_expected() {
        let d = tempfile::tempdir().unwrap();
        let err = discover(d.path(), &DiscoverOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no checkpoints"), "{err}");
    }

    #[test]
    fn model_is_found_in_dir_or_parent_and_ambiguity_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("ck");
        fs::create_dir(&ck).unwrap();
        assert!(find_model(&ck).is_err());
        fs::write(d.path().join("m.onnx"), b"").unwrap();
        assert_eq!(find_model(&ck).unwrap().file_name().unwrap(), "m.onnx");
        fs::write(d.path().join("n.onnx"), b"").unwrap();
        let err = find_model(&ck).unwrap_err().to_string();
        assert!(err.contains("several ONNX models"), "{err}");
    }
}
