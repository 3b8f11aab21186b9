//! Stochastic Weight Averaging, offline: the uniform mean of the checkpoints from a
//! start on, optionally every K-th.
//!
//! Of N checkpoints in order, the first member has 0-based index `floor(swa_start · N)`
//! (default 0.75), or is the checkpoint whose number (as used for ordering) equals
//! `swa_start_at`; members are then every `swa_every`-th checkpoint up to the last.

use std::collections::BTreeMap;

use super::{uniform_of, Context, Outcome, Strategy, StrategyParams};
use crate::error::{Error, Result};

pub struct Swa(pub StrategyParams);

impl Swa {
    /// Member indices for `n` checkpoints with ordering `numbers`.
    pub fn members(&self, n: usize, numbers: &[Option<u64>]) -> Result<Vec<usize>> {
        let p = &self.0;
        let start = match p.swa_start_at {
            Some(at) => numbers.iter().position(|&x| x == Some(at)).ok_or_else(|| {
                Error::Usage(format!(
                    "--swa-start-at {at}: no checkpoint has the number {at} in its name"
                ))
            })?,
            None => {
                if !(0.0..1.0).contains(&p.swa_start) {
                    return Err(Error::Usage(format!(
                        "--swa-start {}: must be a fraction in [0, 1)",
                        p.swa_start
                    )));
                }
                (p.swa_start * n as f64).floor() as usize
            }
        };
        let every = p.swa_every.max(1);
        Ok((start.min(n - 1)..n).step_by(every).collect())
    }
}

impl Strategy for Swa {
    fn name(&self) -> &'static str {
        "swa"
    }

    fn params(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        match self.0.swa_start_at {
            Some(at) => m.insert("swa_start_at".into(), at.to_string()),
            None => m.insert("swa_start".into(), self.0.swa_start.to_string()),
        };
        m.insert("swa_every".into(), self.0.swa_every.to_string());
        m
    }

    fn validate(&self, n: usize, numbers: &[Option<u64>]) -> Result<()> {
        self.members(n, numbers).map(|_| ())
    }

    fn run(&self, ctx: &mut Context<'_, '_>) -> Result<Outcome> {
        let members = self.members(ctx.set.len(), ctx.numbers)?;
        Ok(Outcome {
            merged: uniform_of(ctx, &members)?,
            steps: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_fraction_start_number_and_stride() {
        let numbers: Vec<Option<u64>> = (1..=10).map(Some).collect();
        let swa = |f: StrategyParams| Swa(f).members(10, &numbers).unwrap();
        assert_eq!(swa(StrategyParams::default()), [7, 8, 9]);
        let p = StrategyParams {
            swa_start: 0.0,
            swa_every: 3,
            ..Default::default()
        };
        assert_eq!(swa(p), [0, 3, 6, 9]);
        let p = StrategyParams {
            swa_start_at: Some(5),
            ..Default::default()
        };
        assert_eq!(swa(p), [4, 5, 6, 7, 8, 9]);
        let p = StrategyParams {
            swa_start_at: Some(42),
            ..Default::default()
        };
        assert!(Swa(p).members(10, &numbers).is_err());
        // One checkpoint: it is the average.
        assert_eq!(
            Swa(StrategyParams::default())
                .members(1, &[Some(1)])
                .unwrap(),
            [0]
        );
    }
}
