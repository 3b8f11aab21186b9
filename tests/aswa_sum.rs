//! `--aswa-sum keep` and `reread` give the same bits: ASWA over 40 checkpoints of f16,
//! bf16, f32 and f64 tensors (values over 12 binades, and in some checkpoints raw bit
//! patterns: NaN, infinities, subnormals), with hard updates, rejects and an ensemble of
//! more than one group of `Weights::build`; every scored candidate's bytes are compared,
//! with one and two threads. And `Weights::fill` overwrites whatever its buffers held.

use aswa_merge::averaging::{Candidate, Recipe, Weights};
use aswa_merge::scoring::{ScoreCache, Scorer};
use aswa_merge::storage::{CheckpointSet, CheckpointSource};
use aswa_merge::strategies::{aswa, AswaOptions, Decision, Direction, SumMode};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

struct Rng(u64);
impl Rng {
    fn bits(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn val(&mut self) -> f64 {
        let u = (self.bits() >> 11) as f64 / (1u64 << 53) as f64;
        let e = (self.bits() % 12) as i32 - 6;
        (u - 0.5) * 16.0 * 2f64.powi(e)
    }
}

const N: usize = 40;
const HARD: [usize; 2] = [12, 30];
const REJECT: [usize; 2] = [5, 20];

fn make(dir: &std::path::Path, numel: usize) -> CheckpointSet {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut sources = Vec::new();
    for c in 0..N {
        // Every fifth element of every seventh checkpoint: random bit patterns (NaN,
        // infinities, subnormals); otherwise values over 12 binades.
        let wild = c % 7 == 3;
        let mut h = Vec::new();
        let mut b = Vec::new();
        let mut f = Vec::new();
        let mut d = Vec::new();
        for i in 0..numel {
            let r = wild && i % 5 == 0;
            let v = rng.val();
            h.extend_from_slice(&if r {
                (rng.bits() as u16).to_le_bytes()
            } else {
                f16::from_f64(v).to_le_bytes()
            });
            b.extend_from_slice(&if r {
                (rng.bits() as u16).to_le_bytes()
            } else {
                bf16::from_f64(v).to_le_bytes()
            });
            f.extend_from_slice(&if r {
                (rng.bits() as u32).to_le_bytes()
            } else {
                (v as f32).to_le_bytes()
            });
            if i < 5001 {
                d.extend_from_slice(&if r {
                    rng.bits().to_le_bytes()
                } else {
                    (v * 1e10 + 1e-7).to_le_bytes()
                });
            }
        }
        let step = (c as i64).to_le_bytes();
        let views = vec![
            (
                "h".to_string(),
                TensorView::new(Dtype::F16, vec![numel], &h).unwrap(),
            ),
            (
                "b".to_string(),
                TensorView::new(Dtype::BF16, vec![numel], &b).unwrap(),
            ),
            (
                "f".to_string(),
                TensorView::new(Dtype::F32, vec![numel], &f).unwrap(),
            ),
            (
                "d".to_string(),
                TensorView::new(Dtype::F64, vec![5001], &d).unwrap(),
            ),
            (
                "steps".to_string(),
                TensorView::new(Dtype::I64, vec![], &step).unwrap(),
            ),
        ];
        let path = dir.join(format!("epoch_{c:03}.safetensors"));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        sources.push(CheckpointSource::File(path));
    }
    CheckpointSet::open(sources).unwrap()
}

/// Scores by a schedule (hard updates at `HARD`, rejects at `REJECT`, soft updates
/// otherwise) and records every candidate it is given.
struct Rec {
    seen: Vec<(bool, Vec<u8>)>,
}

fn all_bytes(set: &CheckpointSet, c: Candidate<'_>) -> Vec<u8> {
    (0..set.specs().len())
        .flat_map(|t| c.tensor_bytes(set, t).to_vec())
        .collect()
}

impl Scorer for Rec {
    fn score(&mut self, set: &CheckpointSet, c: Candidate<'_>) -> aswa_merge::Result<f64> {
        let steps = set.specs().iter().position(|s| s.name == "steps").unwrap();
        let t = i64::from_le_bytes(c.tensor_bytes(set, steps).try_into().unwrap()) as usize;
        self.seen
            .push((matches!(c, Candidate::Average(_)), all_bytes(set, c)));
        Ok(match c {
            Candidate::Checkpoint(i) if HARD.contains(&i) => 1000.0 * i as f64 + 700.0,
            Candidate::Checkpoint(_) => -1.0,
            Candidate::Average(_) if REJECT.contains(&t) => -1e9,
            Candidate::Average(_) => 1000.0 * t as f64 + 600.0,
        })
    }
}

#[test]
fn keep_and_reread_agree_on_every_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let set = make(dir.path(), 40_001);
    let mut out = Vec::new();
    for (sum, threads) in [(SumMode::Keep, 1), (SumMode::Reread, 2)] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut rec = Rec { seen: Vec::new() };
        let (merged, steps) = pool.install(|| {
            let mut cache = ScoreCache::new(&mut rec);
            aswa(
                &set,
                &mut cache,
                AswaOptions {
                    direction: Direction {
                        higher_is_better: true,
                    },
                    accept_ties: false,
                    sum,
                },
                &mut |_| {},
            )
            .unwrap()
        });
        let d: Vec<Decision> = steps.iter().map(|s| s.decision).collect();
        let max_members = steps.iter().map(|s| s.members).max().unwrap();
        assert!(max_members > 8, "the ensemble spans more than one group");
        let fin = all_bytes(&set, merged.candidate());
        out.push((d, merged.members.clone(), rec.seen, fin));
    }
    for k in 1..out.len() {
        assert_eq!(out[0].0, out[k].0);
        assert_eq!(out[0].1, out[k].1);
        assert_eq!(out[0].2.len(), out[k].2.len());
        for (i, (a, b)) in out[0].2.iter().zip(&out[k].2).enumerate() {
            if a != b {
                let pos = a.1.iter().zip(&b.1).position(|(x, y)| x != y);
                panic!("run {k}: candidate {i} differs at byte {pos:?}");
            }
        }
        assert!(out[0].3 == out[k].3, "final differs");
    }
    assert!(
        out[0].2.iter().filter(|s| s.0).count() > 30,
        "look-aheads compared"
    );
}

#[test]
fn fill_overwrites_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let set = make(dir.path(), 40_000);
    for members in [
        vec![3usize],
        vec![0, 1, 2],
        (0..N).collect::<Vec<_>>(),
        (7..26).collect(),
    ] {
        let want = Weights::build(&set, Recipe::Mean(&members));
        let mut w = Weights::build(&set, Recipe::Mean(&[1, 9, 17]));
        for (t, s) in set.specs().iter().enumerate() {
            if s.dtype.is_float() {
                w.set_values(&set, t, &vec![12345.0; s.numel()]).unwrap();
            }
        }
        w.fill(&set, Recipe::Mean(&members));
        assert!(
            all_bytes(&set, Candidate::Average(&w)) == all_bytes(&set, Candidate::Average(&want)),
            "{members:?}"
        );
    }
}
