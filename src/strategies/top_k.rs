//! The uniform mean of the K checkpoints with the best validation scores (`--k K`,
//! default 5; ties: the earlier checkpoint first).

use std::collections::BTreeMap;

use super::{checkpoint_scores, uniform_of, Context, Outcome, Strategy, StrategyParams};
use crate::error::Result;

pub struct TopK(pub StrategyParams);

impl Strategy for TopK {
    fn name(&self) -> &'static str {
        "top-k"
    }

    fn params(&self) -> BTreeMap<String, String> {
        [("k".to_string(), self.0.k.to_string())].into()
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        let scores = checkpoint_scores(ctx)?;
        let mut members: Vec<usize> = ctx.direction.ranking(&scores);
        members.truncate(self.0.k.max(1));
        members.sort_unstable();
        Ok(Outcome {
            merged: uniform_of(ctx, &members)?,
            steps: Vec::new(),
        })
    }
}
