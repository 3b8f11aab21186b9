//! One checkpoint: a single safetensors file, or a folder of shards with an index.
//!
//! Headers are parsed and validated by the `safetensors` crate; the tensor data is
//! never copied here, only located (`shard`, byte range) so that averaging can read
//! it straight from the memory map.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use super::dtype::DType;
use super::mmap::MappedFile;
use crate::error::{Error, Result};

/// Where a checkpoint lives on disk, as found by discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointSource {
    /// A single `.safetensors` file.
    File(PathBuf),
    /// A Hugging Face style folder with `<prefix>.safetensors.index.json` and its shards.
    Sharded { index: PathBuf },
}

impl CheckpointSource {
    /// The path shown to users and written to reports: the file, or the folder of shards.
    pub fn path(&self) -> &Path {
        match self {
            CheckpointSource::File(p) => p,
            CheckpointSource::Sharded { index } => index.parent().unwrap_or(index),
        }
    }
}

/// Location and type of one tensor inside a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index into the checkpoint's shards.
    pub shard: usize,
    /// Absolute byte range within that shard's file.
    pub range: Range<usize>,
}

/// An opened, validated checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    source: CheckpointSource,
    shards: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

/// Key written into the `__metadata__` of every file this tool produces; discovery
/// skips files that carry it, so an output is never taken for a checkpoint.
pub const PRODUCER_KEY: &str = "aswa_merge.version";

impl Checkpoint {
    /// Maps and validates the checkpoint at `source`.
    pub fn open(source: CheckpointSource) -> Result<Self> {
        let mut ckpt = Checkpoint {
            source: source.clone(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: HashMap::new(),
        };
        match &source {
            CheckpointSource::File(path) => {
                let (tensors, metadata) = read_header(path, 0, &mut ckpt.shards)?;
                ckpt.tensors = tensors;
                ckpt.metadata = metadata;
            }
            CheckpointSource::Sharded { index } => ckpt.open_sharded(index)?,
        }
        Ok(ckpt)
    }

    fn open_sharded(&mut self, index: &Path) -> Result<()> {
        let dir = index.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let parsed: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(index, format!("invalid shard index: {e}")))?;
        let mut files: Vec<&String> = parsed.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut by_file: HashMap<&str, BTreeMap<String, TensorEntry>> = HashMap::new();
        for file in files {
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(Error::checkpoint(
                    index,
                    format!("shard `{file}` is not a file name in the checkpoint's folder"),
                ));
            }
            let shard_path = dir.join(file);
            if !shard_path.is_file() {
                return Err(Error::checkpoint(
                    index,
                    format!("shard `{file}` listed in the index is missing"),
                ));
            }
            let shard_no = self.shards.len();
            let (tensors, metadata) = read_header(&shard_path, shard_no, &mut self.shards)?;
            if self.metadata.is_empty() {
                self.metadata = metadata;
            }
            by_file.insert(file.as_str(), tensors);
        }
        for (name, file) in &parsed.weight_map {
            let entry = by_file
                .get_mut(file.as_str())
                .and_then(|t| t.remove(name))
                .ok_or_else(|| {
                    Error::checkpoint(
                        index,
                        format!("tensor `{name}` is listed in shard `{file}` but is not in it"),
                    )
                })?;
            self.tensors.insert(name.clone(), entry);
        }
        for (file, rest) in by_file {
            if let Some(name) = rest.keys().next() {
                return Err(Error::checkpoint(
                    index,
                    format!("shard `{file}` holds tensor `{name}`, which the index does not list"),
                ));
            }
        }
        Ok(())
    }

    /// Where the checkpoint is.
    pub fn source(&self) -> &CheckpointSource {
        &self.source
    }

    /// The path shown to users.
    pub fn path(&self) -> &Path {
        self.source.path()
    }

    /// Tensors by name, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The `__metadata__` map of the (first) file.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The files the checkpoint is read from (one, or every shard).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(MappedFile::path)
    }

    /// The mapped files (one, or every shard).
    pub fn mapped(&self) -> &[MappedFile] {
        &self.shards
    }

    /// Total bytes of the checkpoint's files.
    pub fn size_bytes(&self) -> u64 {
        self.shards.iter().map(MappedFile::len).sum()
    }

    /// The raw little-endian bytes of a tensor located by [`TensorEntry`].
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.shards[entry.shard].bytes()[entry.range.clone()]
    }

    /// Hands the pages of every file of the checkpoint back to the kernel
    /// ([`MappedFile::release`]); the bytes stay readable.
    pub fn release(&self) {
        self.shards.iter().for_each(MappedFile::release);
    }

    /// Hands back the pages of byte range `range` of shard `shard`
    /// ([`MappedFile::release_range`]).
    pub fn release_range(&self, shard: usize, range: Range<usize>) {
        self.shards[shard].release_range(range);
    }

    /// Fails when any of the checkpoint's files changed since it was mapped.
    pub fn check_unchanged(&self) -> Result<()> {
        self.shards.iter().try_for_each(MappedFile::check_unchanged)
    }
}

/// The first key that occurs twice in a JSON object, if any.
fn duplicate_key(json: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de.deserialize_map(Keys).ok().flatten()
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

type Header = (BTreeMap<String, TensorEntry>, HashMap<String, String>);

/// Maps `path`, validates its header, appends the map to `shards` and returns its tensors.
fn read_header(path: &Path, shard: usize, shards: &mut Vec<MappedFile>) -> Result<Header> {
    let file = MappedFile::open(path)?;
    let bytes = file.bytes();
    // A name given twice would silently keep one of the two tensors (or fail with a
    // confusing offset error): look for it first, in a header of plausible length.
    let header = bytes
        .get(..8)
        .map(|n| u64::from_le_bytes([n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]]))
        .filter(|&n| n <= 100_000_000)
        .and_then(|n| bytes.get(8..8 + n as usize));
    if let Some(name) = header.and_then(duplicate_key) {
        return Err(Error::checkpoint(
            path,
            format!("tensor `{name}` is listed twice in the header"),
        ));
    }
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        let hint = if bytes.len() < 8 {
            " (the file is shorter than a safetensors header: truncated or still being written?)"
        } else {
            ""
        };
        Error::checkpoint(path, format!("not a valid safetensors file: {e}{hint}"))
    })?;
    let data_start = 8 + header_len;
    let mut tensors = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}, which is not supported",
                    info.dtype
                ),
            )
        })?;
        let (start, end) = info.data_offsets;
        tensors.insert(
            name,
            TensorEntry {
                dtype,
                shape: info.shape.clone(),
                shard,
                range: data_start + start..data_start + end,
            },
        );
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    shards.push(file);
    Ok((tensors, metadata))
}
