//! Scoring candidates on a validation set.
//!
//! [`Scorer`] is what strategies see; [`OnnxScorer`] implements it with ONNX Runtime.
//! [`ScoreCache`] wraps a scorer so that no candidate is scored twice in a run: every
//! candidate is the uniform mean of a set of checkpoints, so the sorted member list
//! identifies it.

pub mod batchnorm;
pub mod data;
pub mod device;
pub mod folding;
pub mod metrics;
pub mod onnx;
pub mod runtime;
pub mod session;
pub mod transposed;

use std::collections::HashMap;

use crate::averaging::Candidate;
use crate::error::Result;
use crate::storage::CheckpointSet;

pub use metrics::Metric;
pub use onnx::WeightsAs;
pub use session::{Device, IoBindingMode, OnnxScorer, SessionOptions, WeightsMode};

/// Something that gives a candidate model a validation score.
pub trait Scorer {
    /// Scores `candidate` (a checkpoint of `set` or an average of them) on the
    /// validation set.
    fn score(&mut self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<f64>;

    /// Scores `candidate` on data set `dataset` (0 is the validation set; others are
    /// whatever the scorer was given, e.g. a test set).
    fn score_on(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        dataset: usize,
    ) -> Result<f64> {
        match dataset {
            0 => self.score(set, candidate),
            _ => Err(crate::Error::Usage(format!(
                "this scorer has no data set {dataset}"
            ))),
        }
    }

    /// The weights to write for `candidate` when scoring transforms it (BatchNorm
    /// recalibration); `None` when what is scored is the candidate itself.
    fn finalize(
        &mut self,
        _set: &CheckpointSet,
        _candidate: Candidate<'_>,
    ) -> Result<Option<crate::averaging::Weights>> {
        Ok(None)
    }

    /// The score of `candidate` as it is, without any transformation.
    fn score_plain(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        dataset: usize,
    ) -> Result<f64> {
        self.score_on(set, candidate, dataset)
    }
}

/// What identifies a candidate model: its members and how they are weighted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CandidateKey {
    /// The uniform mean of these checkpoints (a single one is the checkpoint itself).
    Mean(Vec<usize>),
    /// The exponential moving average over these checkpoints in order, with this decay
    /// (its `f64` bits).
    Ema(Vec<usize>, u64),
}

impl CandidateKey {
    /// The uniform mean of `members`, in any order.
    pub fn mean(members: &[usize]) -> Self {
        let mut k = members.to_vec();
        k.sort_unstable();
        k.dedup();
        CandidateKey::Mean(k)
    }
}

/// Remembers scores by candidate so that nothing is scored twice in a run.
pub struct ScoreCache<'s> {
    scorer: &'s mut dyn Scorer,
    scores: HashMap<CandidateKey, f64>,
    evaluations: usize,
}

impl<'s> ScoreCache<'s> {
    pub fn new(scorer: &'s mut dyn Scorer) -> Self {
        Self {
            scorer,
            scores: HashMap::new(),
            evaluations: 0,
        }
    }

    /// The cached score of a candidate, if it was scored.
    pub fn get(&self, key: &CandidateKey) -> Option<f64> {
        self.scores.get(key).copied()
    }

    /// The score of the candidate `key`; `make` builds it only when it has not been
    /// scored yet.
    pub fn score<'c>(
        &mut self,
        set: &CheckpointSet,
        key: CandidateKey,
        make: impl FnOnce() -> Candidate<'c>,
    ) -> Result<f64> {
        if let Some(&s) = self.scores.get(&key) {
            return Ok(s);
        }
        let s = self.scorer.score(set, make())?;
        self.evaluations += 1;
        self.scores.insert(key, s);
        Ok(s)
    }

    /// The score of checkpoint `c` itself.
    pub fn checkpoint(&mut self, set: &CheckpointSet, c: usize) -> Result<f64> {
        self.score(set, CandidateKey::Mean(vec![c]), || {
            Candidate::Checkpoint(c)
        })
    }

    /// How many candidates were actually scored.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// The scorer itself (to score on other data).
    pub fn scorer(&mut self) -> &mut dyn Scorer {
        self.scorer
    }
}
