//! The ordered set of checkpoints a run works on, validated to share one schema.

use super::checkpoint::{Checkpoint, CheckpointSource};
use super::dtype::DType;
use crate::error::{Error, Result};

/// Name, type and shape of one tensor, common to every checkpoint of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Checkpoints in processing order, all with the same tensor names, shapes and dtypes.
#[derive(Debug)]
pub struct CheckpointSet {
    checkpoints: Vec<Checkpoint>,
    specs: Vec<TensorSpec>,
    /// `entries[c][t]` locates tensor `t` of checkpoint `c` (avoids name look-ups later).
    entries: Vec<Vec<super::checkpoint::TensorEntry>>,
}

impl CheckpointSet {
    /// Opens every source and checks that they agree with the first one.
    pub fn open(sources: Vec<CheckpointSource>) -> Result<Self> {
        let checkpoints = sources
            .into_iter()
            .map(Checkpoint::open)
            .collect::<Result<Vec<_>>>()?;
        Self::from_checkpoints(checkpoints)
    }

    /// Checks that `checkpoints` agree with the first one and builds the set.
    pub fn from_checkpoints(checkpoints: Vec<Checkpoint>) -> Result<Self> {
        let first = checkpoints
            .first()
            .ok_or_else(|| Error::Discovery("no checkpoints to merge".into()))?;
        if first.tensors().is_empty() {
            return Err(Error::checkpoint(first.path(), "holds no tensors"));
        }
        let specs: Vec<TensorSpec> = first
            .tensors()
            .iter()
            .map(|(name, e)| TensorSpec {
                name: name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            })
            .collect();
        let mut entries = Vec::with_capacity(checkpoints.len());
        for ckpt in &checkpoints {
            let mut row = Vec::with_capacity(specs.len());
            for spec in &specs {
                let entry = ckpt.tensors().get(&spec.name).ok_or_else(|| {
                    Error::checkpoint(
                        ckpt.path(),
                        format!(
                            "tensor `{}` is missing (it is in {})",
                            spec.name,
                            first.path().display()
                        ),
                    )
                })?;
                if entry.shape != spec.shape {
                    return Err(Error::checkpoint(
                        ckpt.path(),
                        format!(
                            "tensor `{}` has shape {:?}, expected {:?} as in {}",
                            spec.name,
                            entry.shape,
                            spec.shape,
                            first.path().display()
                        ),
                    ));
                }
                if entry.dtype != spec.dtype {
                    return Err(Error::checkpoint(
                        ckpt.path(),
                        format!(
                            "tensor `{}` has dtype {}, expected {} as in {}",
                            spec.name,
                            entry.dtype,
                            spec.dtype,
                            first.path().display()
                        ),
                    ));
                }
                row.push(entry.clone());
            }
            if let Some(extra) = ckpt
                .tensors()
                .keys()
                .find(|n| first.tensors().get(*n).is_none())
            {
                return Err(Error::checkpoint(
                    ckpt.path(),
                    format!(
                        "tensor `{extra}` is not in {} (all checkpoints must hold the same tensors)",
                        first.path().display()
                    ),
                ));
            }
            entries.push(row);
        }
        Ok(Self {
            checkpoints,
            specs,
            entries,
        })
    }

    /// Number of checkpoints.
    pub fn len(&self) -> usize {
        self.checkpoints.len()
    }

    /// Never true for a constructed set; present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
    }

    /// The checkpoints in processing order.
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// The common tensor specs, sorted by name.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Bytes of tensor `tensor` in checkpoint `checkpoint`.
    pub fn tensor_bytes(&self, checkpoint: usize, tensor: usize) -> &[u8] {
        self.checkpoints[checkpoint].bytes(&self.entries[checkpoint][tensor])
    }

    /// Bytes of one full model (all tensors of one checkpoint).
    pub fn model_bytes(&self) -> usize {
        self.specs.iter().map(|s| s.numel() * s.dtype.size()).sum()
    }
}
