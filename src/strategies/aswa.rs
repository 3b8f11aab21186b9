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
//!
//! The ensemble is the mean of its members. A look-ahead is formed from a float64 running
//! sum of the members ([`SumMode::Keep`]: 8 bytes per parameter, one checkpoint read per
//! step) or by re-reading every member ([`SumMode::Reread`]: no sum, for models whose sum
//! would not fit in memory). Both add the same values in the same order and divide once,
//! so they give the same bits.

use serde::Serialize;

use super::{Direction, Merged};
use crate::averaging::{Accumulator, Candidate, Recipe, Weights};
use crate::error::Result;
use crate::scoring::{CandidateKey, ScoreCache};
use crate::storage::CheckpointSet;

/// ASWA's options.
#[derive(Debug, Clone, Copy)]
pub struct AswaOptions {
    pub direction: Direction,
    /// Accept a soft update whose look-ahead ties the ensemble.
    pub accept_ties: bool,
    /// How look-aheads are formed ([`SumMode::Auto`] is resolved when the run starts).
    pub sum: SumMode,
}

/// `--aswa-sum`: how ASWA forms its look-aheads (the same bits either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SumMode {
    /// [`SumMode::Keep`] unless the sum and ASWA's buffers would take more than half of
    /// the memory available ([`SumMode::resolve`]), then [`SumMode::Reread`].
    #[default]
    Auto,
    /// A float64 running sum of the members: 8 bytes per float parameter; each step reads
    /// its checkpoint once.
    Keep,
    /// No sum: each look-ahead re-reads every member (time grows with the ensemble).
    Reread,
}

impl std::str::FromStr for SumMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "keep" => Ok(Self::Keep),
            "reread" => Ok(Self::Reread),
            _ => Err(format!("`{s}`: expected auto, keep or reread")),
        }
    }
}

impl SumMode {
    /// [`SumMode::Keep`] or [`SumMode::Reread`] for a float64 sum of `sum_bytes`, given
    /// the memory the system reports available (`None`: unknown, keep). `auto` keeps the
    /// sum while it and ASWA's two model buffers (the ensemble and the look-ahead, together
    /// at most as large as the sum) take at most half of the memory available, leaving the
    /// rest to ONNX Runtime, its copies of the weights and the validation data.
    pub fn resolve(self, sum_bytes: u64, available: Option<u64>) -> SumMode {
        match (self, available) {
            (Self::Auto, Some(free)) if sum_bytes.saturating_mul(2) > free / 2 => Self::Reread,
            (Self::Auto, _) => Self::Keep,
            (mode, _) => mode,
        }
    }

    /// Bytes of the float64 sum for `set`.
    pub fn sum_bytes(set: &CheckpointSet) -> u64 {
        let params: usize = set
            .specs()
            .iter()
            .filter(|s| s.dtype.is_float())
            .map(|s| s.numel())
            .sum();
        8 * params as u64
    }
}

/// ASWA's ensemble: its members, and what forms means of them.
enum Ensemble {
    /// A float64 running sum of the members ([`SumMode::Keep`]).
    Summed(Accumulator),
    /// The members alone ([`SumMode::Reread`]).
    Members(Vec<usize>),
}

impl Ensemble {
    /// The ensemble `mode` asks for; `auto` (already resolved when the pipeline calls)
    /// is resolved here for callers of [`aswa`] that pass it.
    fn new(set: &CheckpointSet, mode: SumMode) -> Self {
        let mode = match mode {
            SumMode::Auto => mode.resolve(
                SumMode::sum_bytes(set),
                crate::reporting::available_memory_bytes(),
            ),
            chosen => chosen,
        };
        match mode {
            SumMode::Reread => Self::Members(Vec::new()),
            _ => Self::Summed(Accumulator::new(set)),
        }
    }

    fn members(&self) -> &[usize] {
        match self {
            Self::Summed(acc) => acc.members(),
            Self::Members(m) => m,
        }
    }

    /// Makes checkpoint `c` the only member.
    fn reset(&mut self, set: &CheckpointSet, c: usize) {
        match self {
            Self::Summed(acc) => acc.reset(set, c),
            Self::Members(m) => *m = vec![c],
        }
    }

    /// Adds checkpoint `c` as a member.
    fn add(&mut self, set: &CheckpointSet, c: usize) {
        match self {
            Self::Summed(acc) => acc.add(set, c),
            Self::Members(m) => m.push(c),
        }
    }

    /// The mean of the members, and of `extra` too if given, into `out`.
    fn mean_into(&self, set: &CheckpointSet, extra: Option<usize>, out: &mut Weights) {
        match self {
            Self::Summed(acc) => acc.mean_into(set, extra, out),
            Self::Members(m) => {
                let all: Vec<usize> = m.iter().copied().chain(extra).collect();
                out.fill(set, Recipe::Mean(&all));
            }
        }
    }
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
    let mut acc = Ensemble::new(set, options.sum);
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
            sum: self.0.aswa_sum,
        };
        let (merged, steps) = aswa(ctx.set, ctx.cache, options, ctx.on_step)?;
        Ok(super::Outcome { merged, steps })
    }
}

#[cfg(test)]
mod tests {
    use super::SumMode;

    #[test]
    fn auto_keeps_the_sum_while_it_and_the_buffers_take_at_most_half_the_memory() {
        let gib = 1u64 << 30;
        // The sum and two buffers at most its size: twice the sum within half of it.
        let auto = |sum, free| SumMode::Auto.resolve(sum, Some(free));
        assert_eq!(auto(2 * gib, 16 * gib), SumMode::Keep);
        assert_eq!(auto(4 * gib, 16 * gib), SumMode::Keep);
        assert_eq!(auto(4 * gib + 1, 16 * gib), SumMode::Reread);
        // Unknown memory: keep, as before there was a choice.
        assert_eq!(SumMode::Auto.resolve(u64::MAX, None), SumMode::Keep);
        // An explicit mode is never overridden.
        assert_eq!(SumMode::Keep.resolve(u64::MAX, Some(gib)), SumMode::Keep);
        assert_eq!(SumMode::Reread.resolve(1, Some(u64::MAX)), SumMode::Reread);
        assert_eq!("reread".parse(), Ok(SumMode::Reread));
        assert!("sum".parse::<SumMode>().is_err());
    }
}
