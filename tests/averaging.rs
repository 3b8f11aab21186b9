//! Averaging numerics through the library API, against a float64 reference computed
//! here independently (sum in f64, divide, round once with the `half` crate or `as f32`).
//!
//! Tolerances (from the issue): f32 results within 1e-6 relative (max abs error / max
//! abs value) of the float64 mean rounded once; f16/bf16 within one unit in the last
//! place. Results must be bit-identical whatever the thread count.

use std::path::Path;

use aswa_merge::averaging::{Accumulator, Candidate, Weights};
use aswa_merge::storage::{CheckpointSet, CheckpointSource, DType};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A deterministic pseudo-random stream (xorshift), values spread over several binades.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        (u - 0.5) * 8.0
    }
}

const SHAPES: [(&str, &[usize]); 3] = [("a.weight", &[300, 257]), ("b.bias", &[7]), ("c", &[])];

/// Writes `n` checkpoints of `dtype` (plus an int64 step counter) and returns the values.
fn make(dir: &Path, n: usize, dtype: Dtype) -> Vec<Vec<Vec<f64>>> {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut all = Vec::new();
    for c in 0..n {
        let mut values = Vec::new();
        let mut bytes: Vec<Vec<u8>> = Vec::new();
        for (_, shape) in SHAPES {
            let numel: usize = shape.iter().product();
            let v: Vec<f64> = (0..numel).map(|_| rng.next()).collect();
            let (b, stored): (Vec<u8>, Vec<f64>) = match dtype {
                Dtype::F32 => (
                    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
                    v.iter().map(|&x| x as f32 as f64).collect(),
                ),
                Dtype::F16 => (
                    v.iter()
                        .flat_map(|&x| f16::from_f64(x).to_le_bytes())
                        .collect(),
                    v.iter().map(|&x| f16::from_f64(x).to_f64()).collect(),
                ),
                _ => (
                    v.iter()
                        .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
                        .collect(),
                    v.iter().map(|&x| bf16::from_f64(x).to_f64()).collect(),
                ),
            };
            bytes.push(b);
            values.push(stored);
        }
        let step = (c as i64 * 100).to_le_bytes();
        let mut views: Vec<(String, TensorView<'_>)> = SHAPES
            .iter()
            .zip(&bytes)
            .map(|((name, shape), b)| {
                (
                    name.to_string(),
                    TensorView::new(dtype, shape.to_vec(), b).unwrap(),
                )
            })
            .collect();
        views.push((
            "steps".into(),
            TensorView::new(Dtype::I64, vec![], &step).unwrap(),
        ));
        safetensors::serialize_to_file(views, None, &dir.join(format!("ckpt_{c}.safetensors")))
            .unwrap();
        all.push(values);
    }
    all
}

fn open(dir: &Path, n: usize) -> CheckpointSet {
    CheckpointSet::open(
        (0..n)
            .map(|c| CheckpointSource::File(dir.join(format!("ckpt_{c}.safetensors"))))
            .collect(),
    )
    .unwrap()
}

/// Mean of members `m` in f64 (the reference).
fn reference(values: &[Vec<Vec<f64>>], m: &[usize], t: usize) -> Vec<f64> {
    let n = values[0][t].len();
    (0..n)
        .map(|i| m.iter().map(|&c| values[c][t][i]).sum::<f64>() / m.len() as f64)
        .collect()
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        _ => unreachable!(),
    }
}

fn check(dtype: Dtype) {
    let dir = tempfile::tempdir().unwrap();
    let values = make(dir.path(), 6, dtype);
    let set = open(dir.path(), 6);
    let mut acc = Accumulator::new(&set);
    let mut out = Weights::new(&set);
    // Members {1, 3, 4} built by reset + add, then the look-ahead with 5.
    acc.reset(&set, 1);
    acc.add(&set, 3);
    acc.add(&set, 4);
    for (extra, members) in [(None, vec![1, 3, 4]), (Some(5), vec![1, 3, 4, 5])] {
        acc.mean_into(&set, extra, &mut out);
        let cand = Candidate::Average(&out);
        for (t, spec) in set.specs().iter().enumerate() {
            let got_bytes = cand.tensor_bytes(&set, t);
            if !spec.dtype.is_float() {
                // Integer tensors come from the newest member, untouched.
                let newest = *members.iter().max().unwrap();
                assert_eq!(got_bytes, set.tensor_bytes(newest, t), "{}", spec.name);
                continue;
            }
            let k = SHAPES.iter().position(|(n, _)| *n == spec.name).unwrap();
            let want = reference(&values, &members, k);
            let got = decode(spec.dtype, got_bytes);
            match spec.dtype {
                DType::F32 => {
                    let max_abs = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        err <= 1e-6 * max_abs,
                        "{}: rel err {}",
                        spec.name,
                        err / max_abs
                    );
                }
                DType::F16 => {
                    for (g, w) in got.iter().zip(&want) {
                        let r = f16::from_f64(*w);
                        let (a, b) = (f16::from_f64(*g).to_bits() as i16, r.to_bits() as i16);
                        assert!(
                            (i32::from(a) - i32::from(b)).abs() <= 1,
                            "{}: {g} vs {w}",
                            spec.name
                        );
                    }
                }
                _ => {
                    for (g, w) in got.iter().zip(&want) {
                        let r = bf16::from_f64(*w);
                        let (a, b) = (bf16::from_f64(*g).to_bits() as i16, r.to_bits() as i16);
                        assert!(
                            (i32::from(a) - i32::from(b)).abs() <= 1,
                            "{}: {g} vs {w}",
                            spec.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn f32_mean_is_within_1e6_relative_of_the_float64_mean() {
    check(Dtype::F32);
}

#[test]
fn f16_mean_is_within_one_ulp_of_the_float64_mean_rounded_once() {
    check(Dtype::F16);
}

#[test]
fn bf16_mean_is_within_one_ulp_of_the_float64_mean_rounded_once() {
    check(Dtype::BF16);
}

#[test]
fn averaging_identical_checkpoints_returns_them_exactly() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 1, Dtype::BF16);
    for c in 1..4 {
        std::fs::copy(
            dir.path().join("ckpt_0.safetensors"),
            dir.path().join(format!("ckpt_{c}.safetensors")),
        )
        .unwrap();
    }
    let set = open(dir.path(), 4);
    let mut acc = Accumulator::new(&set);
    acc.reset(&set, 0);
    acc.add(&set, 1);
    acc.add(&set, 2);
    let mut out = Weights::new(&set);
    acc.mean_into(&set, Some(3), &mut out);
    for t in 0..set.specs().len() {
        assert_eq!(
            Candidate::Average(&out).tensor_bytes(&set, t),
            set.tensor_bytes(0, t)
        );
    }
}

#[test]
fn results_are_bit_identical_for_1_2_and_8_threads() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 5, Dtype::F32);
    let set = open(dir.path(), 5);
    let run = |threads: usize| -> Vec<Vec<u8>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut acc = Accumulator::new(&set);
            acc.reset(&set, 0);
            for c in 1..4 {
                acc.add(&set, c);
            }
            let mut out = Weights::new(&set);
            acc.mean_into(&set, Some(4), &mut out);
            (0..set.specs().len())
                .map(|t| Candidate::Average(&out).tensor_bytes(&set, t).to_vec())
                .collect()
        })
    };
    let one = run(1);
    assert!(one == run(2), "2 threads differ from 1");
    assert!(one == run(8), "8 threads differ from 1");
}

#[test]
fn streamed_builds_equal_the_accumulator_and_the_float64_references() {
    use aswa_merge::averaging::Recipe;
    let dir = tempfile::tempdir().unwrap();
    let values = make(dir.path(), 5, Dtype::F32);
    let set = open(dir.path(), 5);
    let members = [0, 2, 3, 4];
    let mut acc = Accumulator::new(&set);
    acc.reset(&set, 0);
    for &m in &members[1..] {
        acc.add(&set, m);
    }
    let mut via_acc = Weights::new(&set);
    acc.mean_into(&set, None, &mut via_acc);
    let streamed = Weights::build(&set, Recipe::Mean(&members));
    for t in 0..set.specs().len() {
        assert_eq!(
            Candidate::Average(&streamed).tensor_bytes(&set, t),
            Candidate::Average(&via_acc).tensor_bytes(&set, t),
            "{}",
            set.specs()[t].name
        );
    }
    // EMA against an independent float64 recurrence, rounded once.
    let decay = 0.7;
    let ema = Weights::build(&set, Recipe::Ema(&members, decay));
    for (t, spec) in set.specs().iter().enumerate() {
        let Some(k) = SHAPES.iter().position(|(n, _)| *n == spec.name) else {
            continue;
        };
        let n = values[0][k].len();
        let want: Vec<f64> = (0..n)
            .map(|i| {
                let mut e = values[members[0]][k][i];
                for &c in &members[1..] {
                    e = decay * e + (1.0 - decay) * values[c][k][i];
                }
                e as f32 as f64
            })
            .collect();
        let got = decode(spec.dtype, Candidate::Average(&ema).tensor_bytes(&set, t));
        let max_abs = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-6 * max_abs, "{}", spec.name);
    }
}

/// Large tensors, few and many members: `Weights::build` then reads them in windows and,
/// beyond 8 members, in groups (releasing what it has read); the result must not depend
/// on that. Mean: bit for bit the accumulator's; EMA: the float64 recurrence rounded once.
#[test]
fn streamed_builds_over_windows_and_groups_equal_the_accumulator() {
    use aswa_merge::averaging::{Recipe, GROUP};
    // (dtype, members, elements): several windows each, the last one partial; three
    // groups (the last partial) or one.
    let cases = [
        (Dtype::F32, 2 * GROUP + 3, 600_001),
        (Dtype::BF16, 2 * GROUP + 3, 1_100_001),
        (Dtype::F32, 3, 1_500_001),
    ];
    for (dtype, n, numel) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(0x2545f4914f6cdd1d);
        let mut values: Vec<Vec<f64>> = Vec::new();
        for c in 0..n {
            let v: Vec<f64> = (0..numel).map(|_| rng.next()).collect();
            let (bytes, stored): (Vec<u8>, Vec<f64>) = if dtype == Dtype::F32 {
                (
                    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
                    v.iter().map(|&x| x as f32 as f64).collect(),
                )
            } else {
                (
                    v.iter()
                        .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
                        .collect(),
                    v.iter().map(|&x| bf16::from_f64(x).to_f64()).collect(),
                )
            };
            let view = TensorView::new(dtype, vec![numel], &bytes).unwrap();
            let path = dir.path().join(format!("ckpt_{c}.safetensors"));
            safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
            values.push(stored);
        }
        let set = open(dir.path(), n);
        let spec_dtype = set.specs()[0].dtype;
        let members: Vec<usize> = (0..n).collect();
        let mut acc = Accumulator::new(&set);
        acc.reset(&set, 0);
        for c in 1..n {
            acc.add(&set, c);
        }
        let mut via_acc = Weights::new(&set);
        acc.mean_into(&set, None, &mut via_acc);
        let decay = 0.8;
        let want_ema: Vec<f64> = (0..numel)
            .map(|i| {
                let mut e = values[0][i];
                for v in &values[1..] {
                    e = decay * e + (1.0 - decay) * v[i];
                }
                e
            })
            .collect();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (mean, ema) = pool.install(|| {
                (
                    Weights::build(&set, Recipe::Mean(&members)),
                    Weights::build(&set, Recipe::Ema(&members, decay)),
                )
            });
            let case = format!("{dtype:?}, {n} members, {numel} elements, {threads} threads");
            assert!(
                Candidate::Average(&mean).tensor_bytes(&set, 0)
                    == Candidate::Average(&via_acc).tensor_bytes(&set, 0),
                "{case}: the streamed mean differs from the accumulator's"
            );
            let got = decode(spec_dtype, Candidate::Average(&ema).tensor_bytes(&set, 0));
            for (i, (g, w)) in got.iter().zip(&want_ema).enumerate() {
                let w = if dtype == Dtype::F32 {
                    *w as f32 as f64
                } else {
                    // One unit in the last place (half's conversion double-rounds).
                    let ulp = w.abs() * 2f64.powi(-7);
                    assert!((g - w).abs() <= ulp, "{case}: EMA element {i}: {g} vs {w}");
                    continue;
                };
                assert_eq!(*g, w, "{case}: EMA element {i}");
            }
        }
    }
}
