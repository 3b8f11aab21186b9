//! Adaptive Stochastic Weight Averaging (Demir, Sharma, Ngonga Ngomo, arXiv 2406.19092),
//! run offline over saved checkpoints, as in the authors' code.
//!
//! The first checkpoint initialises the ensemble A (n = 1, v_A = score(θ₁), `init`).
//! For each later checkpoint θₜ:
//! 1. vₜ = score(θₜ); look-ahead P = (n·A + θₜ)/(n+1), v_P = score(P).
//! 2. Hard update iff vₜ better than v_P and than v_A: A := θₜ, n := 1, v_A := vₜ.
//! 3. Else soft update iff v_P better than v_A (or equal with `accept_ties`):
//!    A := P, n := n+1, v_A := v_P.
//! 4. Else reject.
//!
//! "Better" follows the metric's direction; NaN is never better (see [`Direction`]).

use serde::Serialize;

use super::{Direction, Merged};
use crate::averaging::{Accumulator, Candidate, Weights};
use crate::error::Result;
use crate::scoring::{CandidateKey, ScoreCache};
use crate::storage::CheckpointSet;

/// ASWA's options.
#[derive(Debug, Clone, Copy)]
pub struct AswaOptions {
    pub direction: Direction,
    /// Accept a soft update whose look-ahead ties the ensemble.
    pub accept_ties: bool,
}

/// What ASWA did with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Init,
    Hard,
    Soft,
    Reject,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Init => "init",
            Decision::Hard => "hard",
            Decision::Soft => "soft",
            Decision::Reject => "reject",
        })
    }
}

/// One checkpoint's step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub checkpoint: usize,
    /// Score of the checkpoint itself (the "running model").
    pub running_score: f64,
    /// Score of the look-ahead average (`None` for the first checkpoint).
    pub lookahead_score: Option<f64>,
    pub decision: Decision,
    /// Ensemble members after the step.
    pub members: usize,
    /// Ensemble score after the step.
    pub ensemble_score: f64,
}

/// Runs ASWA over every checkpoint of `set` in order, calling `on_step` after each.
pub fn aswa(
    set: &CheckpointSet,
    cache: &mut ScoreCache<'_>,
    options: AswaOptions,
    on_step: &mut dyn FnMut(&Step),
) -> Result<(Merged, Vec<Step>)> {
    let dir = options.direction;
    let mut acc = Accumulator::new(set);
    let mut ensemble = Weights::new(set);
    let mut lookahead = Weights::new(set);
    let mut steps = Vec::with_capacity(set.len());

    acc.reset(set, 0);
    let mut v_a = cache.checkpoint(set, 0)?;
    let first = Step {
        checkpoint: 0,
        running_score: v_a,
        lookahead_score: None,
        decision: Decision::Init,
        members: 1,
        ensemble_score: v_a,
    };
    on_step(&first);
    steps.push(first);
    // Each checkpoint is read by its own scoring, the look-ahead and the update of its
    // step, then no more (its integer tensors, if it is the newest member, are read
    // again when the result is written): hand its pages back.
    set.release(0);

    for t in 1..set.len() {
        let v_t = cache.checkpoint(set, t)?;
        let mut look_members = acc.members().to_vec();
        look_members.push(t);
        let mut fresh = false;
        let v_p = cache.score(set, CandidateKey::mean(&look_members), || {
            acc.mean_into(set, Some(t), &mut lookahead);
            fresh = true;
            Candidate::Average(&lookahead)
        })?;
        let decision = if dir.better(v_t, v_p) && dir.better(v_t, v_a) {
            acc.reset(set, t);
            v_a = v_t;
            Decision::Hard
        } else if dir.better(v_p, v_a) || (options.accept_ties && dir.at_least(v_p, v_a)) {
            acc.add(set, t);
            if fresh {
                std::mem::swap(&mut ensemble, &mut lookahead);
            } else {
                acc.mean_into(set, None, &mut ensemble);
            }
            v_a = v_p;
            Decision::Soft
        } else {
            Decision::Reject
        };
        let step = Step {
            checkpoint: t,
            running_score: v_t,
            lookahead_score: Some(v_p),
            decision,
            members: acc.members().len(),
            ensemble_score: v_a,
        };
        on_step(&step);
        steps.push(step);
        set.release(t);
    }

    let members = acc.members().to_vec();
    let weights = (members.len() > 1).then_some(ensemble);
    Ok((
        Merged {
            members,
            weights,
            score: v_a,
        },
        steps,
    ))
}

/// ASWA as a [`super::Strategy`].
pub struct Aswa(pub super::StrategyParams);

impl super::Strategy for Aswa {
    fn name(&self) -> &'static str {
        "aswa"
    }

    fn params(&self) -> std::collections::BTreeMap<String, String> {
        [("accept_ties".to_string(), self.0.accept_ties.to_string())].into()
    }

    fn run(&self, ctx: &mut super::Context<'_, '_>) -> Result<super::Outcome> {
        let options = AswaOptions {
            direction: ctx.direction,
            accept_ties: self.0.accept_ties,
        };
        let (merged, steps) = aswa(ctx.set, ctx.cache, options, ctx.on_step)?;
        Ok(super::Outcome { merged, steps })
    }
}
