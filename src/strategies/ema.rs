//! Exponential moving average over the checkpoints in order:
//! `e = θ₁`, then `e = D·e + (1 − D)·θₜ` for each later checkpoint, in `f64`, rounded
//! once to the checkpoints' dtype at the end (`--ema-decay D`, default 0.9).

use std::collections::BTreeMap;

use super::{Context, Merged, Outcome, Strategy, StrategyParams};
use crate::averaging::{Candidate, Recipe, Weights};
use crate::error::{Error, Result};
use crate::scoring::CandidateKey;

pub struct Ema(pub StrategyParams);

impl Strategy for Ema {
    fn name(&self) -> &'static str {
        "ema"
    }

    fn params(&self) -> BTreeMap<String, String> {
        [("ema_decay".to_string(), self.0.ema_decay.to_string())].into()
    }

    fn validate(&self, _n: usize, _numbers: &[Option<u64>]) -> Result<()> {
        let decay = self.0.ema_decay;
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::Usage(format!(
                "--ema-decay {decay}: must be in [0, 1)"
            )));
        }
        Ok(())
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        self.validate(ctx.set.len(), ctx.numbers)?;
        let decay = self.0.ema_decay;
        let set = ctx.set;
        let members: Vec<usize> = (0..set.len()).collect();
        if members.len() == 1 {
            let score = ctx.cache.checkpoint(set, 0)?;
            let merged = Merged {
                members,
                weights: None,
                score,
            };
            return Ok(Outcome {
                merged,
                steps: Vec::new(),
            });
        }
        let weights = Weights::build(set, Recipe::Ema(&members, decay));
        let key = CandidateKey::Ema(members.clone(), decay.to_bits());
        let score = ctx.cache.score(set, key, || Candidate::Average(&weights))?;
        Ok(Outcome {
            merged: Merged {
                members,
                weights: Some(weights),
                score,
            },
            steps: Vec::new(),
        })
    }
}
