//! Greedy soup (Wortsman et al., 2022): checkpoints sorted by validation score, best
//! first (ties: the earlier first); the soup starts as the best one, and each next
//! checkpoint is added iff the uniform mean of the soup with it scores at least as well
//! as the soup without it (`--strict`: strictly better). NaN never joins.

use std::collections::BTreeMap;

use super::{checkpoint_scores, uniform_of, Context, Outcome, Strategy, StrategyParams};
use crate::error::Result;

pub struct GreedySoup(pub StrategyParams);

impl Strategy for GreedySoup {
    fn name(&self) -> &'static str {
        "greedy-soup"
    }

    fn params(&self) -> BTreeMap<String, String> {
        [("strict".to_string(), self.0.strict.to_string())].into()
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        let scores = checkpoint_scores(ctx)?;
        let order = ctx.direction.ranking(&scores);
        let mut soup = vec![order[0]];
        let mut merged = uniform_of(ctx, &soup)?;
        for &c in &order[1..] {
            let mut trial = soup.clone();
            trial.push(c);
            trial.sort_unstable();
            let candidate = uniform_of(ctx, &trial)?;
            let keep = if self.0.strict {
                ctx.direction.better(candidate.score, merged.score)
            } else {
                ctx.direction.at_least(candidate.score, merged.score)
            };
            if keep {
                soup = trial;
                merged = candidate;
            }
        }
        Ok(Outcome {
            merged,
            steps: Vec::new(),
        })
    }
}
