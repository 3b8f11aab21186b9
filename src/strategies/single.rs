//! Single checkpoints as baselines: `best` (the best validation score, the earliest on
//! ties: early stopping) and `last` (the final checkpoint).

use std::collections::BTreeMap;

use super::{checkpoint_scores, uniform_of, Context, Outcome, Strategy};
use crate::error::Result;

pub struct Best;
pub struct Last;

impl Strategy for Best {
    fn name(&self) -> &'static str {
        "best"
    }

    fn params(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        let scores = checkpoint_scores(ctx)?;
        let best = ctx.direction.ranking(&scores)[0];
        Ok(Outcome {
            merged: uniform_of(ctx, &[best])?,
            steps: Vec::new(),
        })
    }
}

impl Strategy for Last {
    fn name(&self) -> &'static str {
        "last"
    }

    fn params(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        let last = ctx.set.len() - 1;
        Ok(Outcome {
            merged: uniform_of(ctx, &[last])?,
            steps: Vec::new(),
        })
    }
}
