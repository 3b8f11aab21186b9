//! Strategies that decide which checkpoints to average.
//!
//! A strategy walks the ordered checkpoints, asks a [`ScoreCache`] for validation
//! scores, and returns a [`Merged`] model: its members and, when it has more than one,
//! the materialised average.

pub mod aswa;

use crate::averaging::{Candidate, Weights};
use crate::scoring::ScoreCache;

pub use aswa::{aswa, AswaOptions, Decision, Step};

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
}

/// A strategy's result: the members (checkpoint indices) and their average.
#[derive(Debug)]
pub struct Merged {
    pub members: Vec<usize>,
    /// The rounded average when there is more than one member.
    pub weights: Option<Weights>,
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

#[doc(hidden)]
pub type Cache<'a> = ScoreCache<'a>;

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
}
