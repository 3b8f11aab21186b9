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

    /// Like [`CheckpointSet::open`], but leaves out checkpoints that cannot be read or
    /// that disagree with the first readable one, returning them with the reason (for
    /// `--skip-invalid`: a training job may still be writing the newest checkpoint).
    pub fn open_skipping_invalid(
        sources: Vec<CheckpointSource>,
    ) -> Result<(Self, Vec<(std::path::PathBuf, String)>)> {
        let mut skipped = Vec::new();
        let mut ok = Vec::new();
        for s in sources {
            match Checkpoint::open(s.clone()) {
                Ok(c) => ok.push(c),
                Err(e) => skipped.push((s.path().to_path_buf(), e.to_string())),
            }
        }
        loop {
            if ok.is_empty() {
                return Err(Error::Discovery(format!(
                    "no readable checkpoints ({} skipped as invalid)",
                    skipped.len()
                )));
            }
            let paths: Vec<std::path::PathBuf> =
                ok.iter().map(|c| c.path().to_path_buf()).collect();
            match Self::check(&ok) {
                Ok(()) => return Ok((Self::from_checkpoints(ok)?, skipped)),
                Err(Error::Checkpoint { path, message }) => {
                    let at = paths.iter().position(|p| *p == path).unwrap_or(0);
                    ok.remove(at);
                    skipped.push((
                        path.clone(),
                        format!("checkpoint {}: {message}", path.display()),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn check(checkpoints: &[Checkpoint]) -> Result<()> {
        Self::build(checkpoints).map(|_| ())
    }

    /// Checks that `checkpoints` agree with the first one and builds the set.
    pub fn from_checkpoints(checkpoints: Vec<Checkpoint>) -> Result<Self> {
        let (specs, entries) = Self::build(&checkpoints)?;
        Ok(Self {
            checkpoints,
            specs,
            entries,
        })
    }

    #[allow(clippy::type_complexity)]
    fn build(
        checkpoints: &[Checkpoint],
    ) -> Result<(Vec<TensorSpec>, Vec<Vec<super::checkpoint::TensorEntry>>)> {
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
        for ckpt in checkpoints {
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
        Ok((specs, entries))
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

    /// Tells the kernel that checkpoint `checkpoint` is not needed for now, so that its
    /// pages stop counting in resident memory; reading it again faults them back in
    /// (from the page cache). Callers release each checkpoint once they are done with it,
    /// which keeps resident memory independent of the number of checkpoints.
    pub fn release(&self, checkpoint: usize) {
        self.checkpoints[checkpoint].release();
    }

    /// Like [`CheckpointSet::release`], for byte range `range` of tensor `tensor`'s data
    /// in checkpoint `checkpoint`, widened by `slack` bytes on both sides (streaming
    /// passes: a page fault may map pages around the bytes it touched).
    pub fn release_range(
        &self,
        checkpoint: usize,
        tensor: usize,
        range: std::ops::Range<usize>,
        slack: usize,
    ) {
        let entry = &self.entries[checkpoint][tensor];
        let at = entry.range.start;
        let range = (at + range.start).saturating_sub(slack)..at + range.end + slack;
        self.checkpoints[checkpoint].release_range(entry.shard, range);
    }

    /// Bytes of one full model (all tensors of one checkpoint).
    pub fn model_bytes(&self) -> usize {
        self.specs.iter().map(|s| s.numel() * s.dtype.size()).sum()
    }
}
