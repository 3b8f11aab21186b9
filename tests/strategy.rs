//! The ASWA rule, step by step, with a scorer whose scores are a known function of the
//! candidate's weights, so that every expected decision can be worked out by hand.

use std::path::Path;

use aswa_merge::averaging::Candidate;
use aswa_merge::scoring::{ScoreCache, Scorer};
use aswa_merge::storage::{CheckpointSet, CheckpointSource};
use aswa_merge::strategies::{aswa, AswaOptions, Decision, Direction, SumMode};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Scores a candidate by `f(w)`, where `w` is its one f64 weight; counts calls.
struct ByWeight<F: Fn(f64) -> f64> {
    f: F,
    calls: usize,
}

impl<F: Fn(f64) -> f64> Scorer for ByWeight<F> {
    fn score(&mut self, set: &CheckpointSet, c: Candidate<'_>) -> aswa_merge::Result<f64> {
        self.calls += 1;
        let b = c.tensor_bytes(set, 0);
        let w = f64::from_le_bytes(b.try_into().expect("8 bytes"));
        Ok((self.f)(w))
    }
}

fn checkpoints(dir: &Path, weights: &[f64]) -> CheckpointSet {
    let sources = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let bytes = w.to_le_bytes();
            let path = dir.join(format!("epoch_{i}.safetensors"));
            let view = TensorView::new(Dtype::F64, vec![], &bytes).unwrap();
            safetensors::serialize_to_file([("w".to_string(), view)], None, &path).unwrap();
            CheckpointSource::File(path)
        })
        .collect();
    CheckpointSet::open(sources).unwrap()
}

/// ASWA over checkpoints with these weights, with the running sum and by re-reading the
/// members: both must give the same steps, scores, calls and weights (compared here);
/// returns the decisions, the members, the score and the scorer's calls.
fn run(
    weights: &[f64],
    f: impl Fn(f64) -> f64,
    higher_is_better: bool,
    accept_ties: bool,
) -> (Vec<Decision>, Vec<usize>, f64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let set = checkpoints(dir.path(), weights);
    let mut outcomes = Vec::new();
    for sum in [SumMode::Keep, SumMode::Reread] {
        let mut scorer = ByWeight { f: &f, calls: 0 };
        let (merged, steps) = {
            let mut cache = ScoreCache::new(&mut scorer);
            aswa(
                &set,
                &mut cache,
                AswaOptions {
                    direction: Direction { higher_is_better },
                    accept_ties,
                    sum,
                },
                &mut |_| {},
            )
            .unwrap()
        };
        let bytes = merged.candidate().tensor_bytes(&set, 0).to_vec();
        outcomes.push((
            steps.iter().map(|s| s.decision).collect::<Vec<_>>(),
            merged.members,
            merged.score.to_bits(),
            scorer.calls,
            bytes,
        ));
    }
    assert_eq!(outcomes[0], outcomes[1], "keep and reread disagree");
    let (decisions, members, score, calls, _) = outcomes.swap_remove(0);
    (decisions, members, f64::from_bits(score), calls)
}

use Decision::*;

#[test]
fn hard_soft_and_reject_follow_the_rule() {
    // Score = -(w - 3)^2, higher is better.
    //  θ0 = 0: init, A = {0} (mean 0, score -9).
    //  θ1 = 4: v_t = -1, P = mean(0, 4) = 2 → -1. v_t > v_P fails (tie) → soft since -1 > -9. A = {0, 1} (mean 2).
    //  θ2 = 3.5: v_t = -0.25, P = mean(0, 4, 3.5) = 2.5 → -0.25: tie again → soft (-0.25 > -1). A = {0,1,2}.
    //  θ3 = 3.1: v_t = -0.01, P = mean(0,4,3.5,3.1) = 2.65 → -0.1225. v_t beats both → hard, A = {3}.
    //  θ4 = 10: v_t = -49, P = 6.55 → -12.6: reject.
    //  θ5 = 2.9: v_t = -0.01, P = 3.0 → 0: soft (0 > -0.01). A = {3, 5}.
    let (d, members, score, calls) = run(
        &[0.0, 4.0, 3.5, 3.1, 10.0, 2.9],
        |w| -(w - 3.0).powi(2),
        true,
        false,
    );
    assert_eq!(d, [Init, Soft, Soft, Hard, Reject, Soft]);
    assert_eq!(members, [3, 5]);
    assert!(score.abs() < 1e-12);
    // 1 + 2 per later checkpoint, nothing twice.
    assert_eq!(calls, 11);
}

#[test]
fn lower_is_better_turns_the_comparisons_around() {
    // Score = (w - 3)^2, lower is better: the same run as above.
    let (d, members, _, _) = run(
        &[0.0, 4.0, 3.5, 3.1, 10.0, 2.9],
        |w| (w - 3.0).powi(2),
        false,
        false,
    );
    assert_eq!(d, [Init, Soft, Soft, Hard, Reject, Soft]);
    assert_eq!(members, [3, 5]);
}

#[test]
fn ties_reject_by_default_and_soft_update_with_accept_ties() {
    // Constant score: every look-ahead ties the ensemble.
    let (d, members, _, _) = run(&[1.0, 2.0, 3.0], |_| 0.5, true, false);
    assert_eq!(d, [Init, Reject, Reject]);
    assert_eq!(members, [0]);
    let (d, members, _, _) = run(&[1.0, 2.0, 3.0], |_| 0.5, true, true);
    assert_eq!(d, [Init, Soft, Soft]);
    assert_eq!(members, [0, 1, 2]);
}

#[test]
fn a_diverged_checkpoint_is_never_accepted() {
    // θ1 holds NaN: its score and its look-ahead's are NaN: rejected, and the ensemble
    // keeps its members and score.
    let (d, members, score, _) = run(&[1.0, f64::NAN, 1.5], |w| -(w - 2.0).powi(2), true, true);
    assert_eq!(d, [Init, Reject, Hard]);
    assert_eq!(members, [2]);
    assert_eq!(score, -0.25);
}

#[test]
fn a_diverged_first_checkpoint_is_replaced_by_the_first_finite_one() {
    let (d, members, _, _) = run(&[f64::NAN, 1.0, 1.2], |w| -(w - 2.0).powi(2), true, false);
    // θ1: v_t = -1 beats the NaN look-ahead and the NaN ensemble: hard.
    assert_eq!(d[..2], [Init, Hard]);
    assert!(members.iter().all(|&m| m != 0));
}
