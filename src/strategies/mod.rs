//! Strategies that decide which checkpoints to average.
//!
//! A strategy walks the ordered checkpoints, asks a [`ScoreCache`] for validation
//! scores, and returns a [`Merged`] model: its members and, when it has more than one,
//! the materialised average.

pub mod aswa;
pub mod ema;
pub mod greedy_soup;
pub mod single;
pub mod swa;
pub mod top_k;
pub mod uniform;

use std::collections::BTreeMap;

use crate::averaging::{Candidate, Recipe, Weights};
use crate::error::{Error, Result};
use crate::scoring::{CandidateKey, ScoreCache};
use crate::storage::CheckpointSet;

pub use aswa::{aswa, AswaOptions, Decision, Step, SumMode};

/// Every strategy name, in the order `compare` runs and prints them.
pub const ALL: [&str; 8] = [
    "aswa",
    "swa",
    "uniform",
    "ema",
    "top-k",
    "greedy-soup",
    "best",
    "last",
];

/// Whether higher or lower scores are better, and how NaN is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direction {
    pub higher_is_better: bool,
}

impl Direction {
    /// `a` strictly better than `b`. NaN is worse than anything and never better.
    pub fn better(self, a: f64, b: f64) -> bool {
        if a.is_nan() {
            return false;
        }
        if b.is_nan() {
            return true;
        }
        if self.higher_is_better {
            a > b
        } else {
            a < b
        }
    }

    /// `a` better than or equal to `b` (NaN never qualifies).
    pub fn at_least(self, a: f64, b: f64) -> bool {
        !a.is_nan() && (a == b || self.better(a, b))
    }

    /// Indices of `scores` from best to worst; ties keep the earlier index first, NaN last.
    pub fn ranking(self, scores: &[f64]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| {
            if self.better(scores[a], scores[b]) {
                std::cmp::Ordering::Less
            } else if self.better(scores[b], scores[a]) {
                std::cmp::Ordering::Greater
            } else {
                a.cmp(&b)
            }
        });
        order
    }
}

/// A strategy's result: the members (checkpoint indices, ascending) and their average.
#[derive(Debug)]
pub struct Merged {
    pub members: Vec<usize>,
    /// The rounded average when it is not a single checkpoint.
    pub weights: Option<Weights>,
    /// Its validation score.
    pub score: f64,
}

impl Merged {
    /// The model to write or score.
    pub fn candidate(&self) -> Candidate<'_> {
        match &self.weights {
            Some(w) => Candidate::Average(w),
            None => Candidate::Checkpoint(self.members[0]),
        }
    }
}

/// Parameters of all strategies (each reads its own).
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyParams {
    /// ASWA: accept a soft update whose look-ahead ties the ensemble.
    pub accept_ties: bool,
    /// ASWA: how look-aheads are formed.
    pub aswa_sum: SumMode,
    /// SWA: first member at index floor(swa_start · N).
    pub swa_start: f64,
    /// SWA: first member is the checkpoint with this number (overrides `swa_start`).
    pub swa_start_at: Option<u64>,
    /// SWA: every K-th checkpoint from the start.
    pub swa_every: usize,
    /// Uniform: only the last K checkpoints.
    pub last: Option<usize>,
    /// EMA: `e = decay·e + (1 − decay)·θ`.
    pub ema_decay: f64,
    /// Top-k: how many of the best checkpoints.
    pub k: usize,
    /// Greedy soup: add a checkpoint only if it strictly improves the soup.
    pub strict: bool,
}

impl Default for StrategyParams {
    fn default() -> Self {
        Self {
            accept_ties: false,
            aswa_sum: SumMode::Auto,
            swa_start: 0.75,
            swa_start_at: None,
            swa_every: 1,
            last: None,
            ema_decay: 0.9,
            k: 5,
            strict: false,
        }
    }
}

/// What a strategy works with.
pub struct Context<'a, 'c> {
    pub set: &'a CheckpointSet,
    pub cache: &'a mut ScoreCache<'c>,
    pub direction: Direction,
    /// Each checkpoint's ordering number, if its name has one.
    pub numbers: &'a [Option<u64>],
    /// Called after each step of strategies that walk the checkpoints (ASWA).
    pub on_step: &'a mut dyn FnMut(&Step),
}

/// A strategy's result and, for ASWA, its steps.
#[derive(Debug)]
pub struct Outcome {
    pub merged: Merged,
    pub steps: Vec<Step>,
}

/// A way of choosing and averaging checkpoints. One file per strategy; [`by_name`] is
/// the registry.
pub trait Strategy {
    /// The name used on the command line and in reports.
    fn name(&self) -> &'static str;
    /// The parameters that shaped the result, for reports and metadata.
    fn params(&self) -> BTreeMap<String, String>;
    /// Checks the parameters against `n` checkpoints with ordering `numbers`, before
    /// anything is scored.
    fn validate(&self, _n: usize, _numbers: &[Option<u64>]) -> Result<()> {
        Ok(())
    }
    /// Runs over the checkpoints of `ctx.set` in order.
    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome>;
}

/// The strategy called `name`, configured by `params`.
pub fn by_name(name: &str, params: &StrategyParams) -> Result<Box<dyn Strategy>> {
    let p = params.clone();
    Ok(match name {
        "aswa" => Box::new(aswa::Aswa(p)),
        "swa" => Box::new(swa::Swa(p)),
        "uniform" => Box::new(uniform::Uniform(p)),
        "ema" => Box::new(ema::Ema(p)),
        "top-k" => Box::new(top_k::TopK(p)),
        "greedy-soup" => Box::new(greedy_soup::GreedySoup(p)),
        "best" => Box::new(single::Best),
        "last" => Box::new(single::Last),
        _ => {
            return Err(Error::Usage(format!(
                "unknown strategy `{name}`; choose one of: {}",
                ALL.join(", ")
            )))
        }
    })
}

/// The uniform mean of `members` (ascending, non-empty), materialised and scored.
pub fn uniform_of(ctx: &mut Context<'_, '_>, members: &[usize]) -> Result<Merged> {
    let set = ctx.set;
    if let [only] = members {
        let score = ctx.cache.checkpoint(set, *only)?;
        return Ok(Merged {
            members: vec![*only],
            weights: None,
            score,
        });
    }
    let weights = Weights::build(set, Recipe::Mean(members));
    let score = ctx.cache.score(set, CandidateKey::mean(members), || {
        Candidate::Average(&weights)
    })?;
    Ok(Merged {
        members: members.to_vec(),
        weights: Some(weights),
        score,
    })
}

/// Every checkpoint's own validation score (each checkpoint released once scored).
pub fn checkpoint_scores(ctx: &mut Context<'_, '_>) -> Result<Vec<f64>> {
    (0..ctx.set.len())
        .map(|c| {
            let score = ctx.cache.checkpoint(ctx.set, c);
            ctx.set.release(c);
            score
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Direction;

    #[test]
    fn nan_is_never_better_and_always_beaten() {
        let up = Direction {
            higher_is_better: true,
        };
        let down = Direction {
            higher_is_better: false,
        };
        assert!(up.better(0.6, 0.5) && !up.better(0.5, 0.5) && !up.better(0.4, 0.5));
        assert!(down.better(0.4, 0.5) && !down.better(0.6, 0.5));
        assert!(!up.better(f64::NAN, 0.1) && up.better(0.1, f64::NAN));
        assert!(!up.better(f64::NAN, f64::NAN) && !up.at_least(f64::NAN, f64::NAN));
        assert!(up.at_least(0.5, 0.5) && down.at_least(0.5, 0.5));
    }

    #[test]
    fn ranking_puts_ties_in_order_and_nan_last() {
        let up = Direction {
            higher_is_better: true,
        };
        assert_eq!(up.ranking(&[0.5, f64::NAN, 0.9, 0.5, 0.9]), [2, 4, 0, 3, 1]);
        let down = Direction {
            higher_is_better: false,
        };
        assert_eq!(down.ranking(&[0.5, f64::NAN, 0.9, 0.5]), [0, 3, 2, 1]);
    }
}
