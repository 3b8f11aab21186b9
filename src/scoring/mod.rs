//! Scoring candidates on a validation set.
//!
//! [`Scorer`] is what strategies see; [`OnnxScorer`] implements it with ONNX Runtime.
//! [`ScoreCache`] wraps a scorer so that no candidate is scored twice in a run: every
//! candidate is the uniform mean of a set of checkpoints, so the sorted member list
//! identifies it.

pub mod data;
pub mod metrics;
pub mod onnx;
pub mod runtime;
pub mod session;

use std::collections::HashMap;

use crate::averaging::Candidate;
use crate::error::Result;
use crate::storage::CheckpointSet;

pub use metrics::Metric;
pub use session::{OnnxScorer, SessionOptions};

/// Something that gives a candidate model a validation score.
pub trait Scorer {
    /// Scores `candidate` (a checkpoint of `set` or an average of them).
    fn score(&mut self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<f64>;
}

/// Remembers scores by member set so that nothing is scored twice.
pub struct ScoreCache<'s> {
    scorer: &'s mut dyn Scorer,
    scores: HashMap<Vec<usize>, f64>,
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

    /// The cached score of the uniform mean of `members`, if it was scored.
    pub fn get(&self, members: &[usize]) -> Option<f64> {
        self.scores.get(&key(members)).copied()
    }

    /// The score of the uniform mean of `members`; `make` builds the candidate only
    /// when it has not been scored yet.
    pub fn score<'c>(
        &mut self,
        set: &CheckpointSet,
        members: &[usize],
        make: impl FnOnce() -> Candidate<'c>,
    ) -> Result<f64> {
        let k = key(members);
        if let Some(&s) = self.scores.get(&k) {
            return Ok(s);
        }
        let s = self.scorer.score(set, make())?;
        self.evaluations += 1;
        self.scores.insert(k, s);
        Ok(s)
    }

    /// How many candidates were actually scored.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }
}

fn key(members: &[usize]) -> Vec<usize> {
    let mut k = members.to_vec();
    k.sort_unstable();
    k
}
