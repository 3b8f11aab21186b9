//! The uniform mean of all checkpoints, or of the last K (`--last K`).

use std::collections::BTreeMap;

use super::{uniform_of, Context, Outcome, Strategy, StrategyParams};
use crate::error::Result;

pub struct Uniform(pub StrategyParams);

impl Strategy for Uniform {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn params(&self) -> BTreeMap<String, String> {
        let last = self.0.last.map_or("all".to_string(), |k| k.to_string());
        [("last".to_string(), last)].into()
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        let n = ctx.set.len();
        let k = self.0.last.unwrap_or(n).clamp(1, n);
        let members: Vec<usize> = (n - k..n).collect();
        Ok(Outcome {
            merged: uniform_of(ctx, &members)?,
            steps: Vec::new(),
        })
    }
}
