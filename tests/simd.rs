//! The averaging and conversion kernels give the same bits at every vector instruction
//! level the CPU supports (baseline, AVX2, AVX-512): means, EMAs and ASWA's running sum,
//! and the conversions that bind a checkpoint to a model of another float type, for every
//! float dtype, on ordinary values and on the edge cases (zeros, subnormals, ties,
//! infinities, NaN, values near overflow); and the ranking metrics' and cross-entropy's
//! per-row scores, whose counting and `exp` loops run at the vector level. On a CPU without AVX2 only the baseline runs.
//!
//! The levels differ only in optimised builds (without optimisation nothing is
//! vectorised): `scripts/test.sh` runs this test with `--release` too.
//!
//! One test function: the level cap is process-wide.

use std::path::Path;

use aswa_merge::averaging::{Accumulator, Candidate, Recipe, Weights};
use aswa_merge::scoring::{metrics, Metric};
use aswa_merge::simd::{limit, Level};
use aswa_merge::storage::{dtype, CheckpointSet, CheckpointSource};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Checkpoints per set: more than one group of `Weights::build`, so both of its paths run.
const N: usize = 11;
/// Elements of the big tensor: over one parallel chunk, not a multiple of any block.
const BIG: usize = 40_000 + 37;
/// Elements per kind of value.
const RUN: usize = 2048;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Bits of element `i` of checkpoint `c` for a float of `width` bits with `mant`
/// mantissa bits: runs of ordinary values, arbitrary bits, zeros and subnormals, values one
/// unit apart (means on ties), and values near the largest finite one.
fn bits(rng: &mut Rng, i: usize, c: usize, width: u32, mant: u32) -> u64 {
    let r = rng.next();
    let exp_bits = width - 1 - mant;
    let bias = (1u64 << (exp_bits - 1)) - 1;
    let sign = (r >> 63) << (width - 1);
    let m = r & ((1u64 << mant) - 1);
    match (i / RUN) % 5 {
        // Ordinary weights: exponents within a few binades of 1 / 16.
        0 => sign | ((bias - 4 + (r >> 40) % 6) << mant) | m,
        // Anything, infinities and NaN included.
        1 => r >> (64 - width),
        // Zeros and subnormals, and the smallest normals.
        2 => sign | ((r >> 32) % 4 * (m & ((1 << (mant - 1)) - 1))),
        // The same value or one unit above it: means of two land on ties.
        3 => ((bias - 2) << mant) | ((i as u64 * 2) & ((1 << mant) - 1)) | (c as u64 & 1),
        // Near the largest finite value.
        _ => sign | (((1u64 << exp_bits) - 2) << mant) | m,
    }
}

fn write(dir: &Path, dtype: Dtype) -> CheckpointSet {
    let (width, mant) = match dtype {
        Dtype::F16 => (16, 10),
        Dtype::BF16 => (16, 7),
        Dtype::F32 => (32, 23),
        _ => (64, 52),
    };
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let shapes: [(&str, Vec<usize>); 3] = [
        ("big.weight", vec![BIG]),
        ("small.bias", vec![5]),
        ("scale", vec![]),
    ];
    let mut paths = Vec::new();
    for c in 0..N {
        let data: Vec<Vec<u8>> = shapes
            .iter()
            .map(|(_, shape)| {
                let numel: usize = shape.iter().product();
                (0..numel)
                    .flat_map(|i| {
                        let b = bits(&mut rng, i, c, width, mant).to_le_bytes();
                        b[..width as usize / 8].to_vec()
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = shapes
            .iter()
            .zip(&data)
            .map(|((name, shape), b)| {
                let view = TensorView::new(dtype, shape.clone(), b).expect("view");
                (name.to_string(), view)
            })
            .collect();
        let path = dir.join(format!("ckpt_{c}.safetensors"));
        safetensors::serialize_to_file(views, None, &path).expect("write checkpoint");
        paths.push(CheckpointSource::File(path));
    }
    CheckpointSet::open(paths).expect("open checkpoints")
}

/// Every tensor of the models this level computes, and the conversions of every tensor
/// of one checkpoint to each float type, as bytes.
fn results_at(set: &CheckpointSet) -> Vec<Vec<u8>> {
    let all: Vec<usize> = (0..N).collect();
    let mut models = vec![
        Weights::build(set, Recipe::Mean(&all)),
        Weights::build(set, Recipe::Mean(&all[2..7])),
        Weights::build(set, Recipe::Ema(&all, 0.9)),
    ];
    let mut acc = Accumulator::new(set);
    acc.reset(set, 1);
    for c in [3, 4, 8] {
        acc.add(set, c);
    }
    for extra in [None, Some(10)] {
        let mut w = Weights::new(set);
        acc.mean_into(set, extra, &mut w);
        models.push(w);
    }
    let specs = set.specs();
    let mut out: Vec<Vec<u8>> = models
        .iter()
        .flat_map(|w| (0..specs.len()).map(|t| Candidate::Average(w).tensor_bytes(set, t).to_vec()))
        .collect();
    for (t, spec) in specs.iter().enumerate() {
        let (bytes, n) = (set.tensor_bytes(4, t), spec.numel());
        let mut f32s = vec![0f32; n];
        dtype::to_f32(spec.dtype, bytes, &mut f32s);
        let mut f16s = vec![f16::ZERO; n];
        dtype::to_f16(spec.dtype, bytes, &mut f16s);
        let mut bf16s = vec![bf16::ZERO; n];
        dtype::to_bf16(spec.dtype, bytes, &mut bf16s);
        let mut f64s = vec![0f64; n];
        dtype::to_f64(spec.dtype, bytes, &mut f64s);
        out.push(bytemuck::cast_slice(&f32s).to_vec());
        out.push(bytemuck::cast_slice(&f16s).to_vec());
        out.push(bytemuck::cast_slice(&bf16s).to_vec());
        out.push(bytemuck::cast_slice(&f64s).to_vec());
    }
    out.push(metric_scores());
    out
}

/// The ranking metrics' per-row scores (their counting loops run at the vector level) on
/// rows of ties, signed zeros, infinities and some NaN, of widths that are not a multiple
/// of any vector width.
fn metric_scores() -> Vec<u8> {
    const VALUES: [f32; 7] = [f32::NEG_INFINITY, -1.0, -0.0, 0.0, 0.5, 1.0, f32::INFINITY];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut scores = Vec::new();
    for width in [1usize, 7, 37, 1000, 4099] {
        for _ in 0..40 {
            // NaN rarely: most rows must give a rank.
            let row: Vec<f32> = (0..width)
                .map(|_| match rng.next() % 512 {
                    0 => f32::NAN,
                    r => VALUES[(r % 7) as usize],
                })
                .collect();
            let y = (rng.next() % width as u64) as usize;
            // Sorted and distinct, as filter rows are; the true candidate is ignored.
            let filtered: Vec<i64> = [0, width / 2].map(|j| j as i64).into_iter().collect();
            let filtered = if width > 1 {
                &filtered[..]
            } else {
                &filtered[..1]
            };
            for metric in [
                Metric::Accuracy,
                Metric::TopK(3),
                Metric::Mrr,
                Metric::HitsAt(10),
                Metric::CrossEntropy,
            ] {
                let score = metrics::row_score(&metric, &row, y, filtered);
                // Which NaN comes out is not specified (see simd.rs); that one does is.
                let score = if score.is_nan() { f64::NAN } else { score };
                scores.extend(score.to_bits().to_le_bytes());
            }
        }
    }
    // Finite logits (no infinity to make the row's score infinite or NaN), widths around
    // the 512-value block of cross-entropy's `exp` loop, spreads that reach its clamp.
    for width in [511usize, 512, 513, 4099] {
        for spread in [0.5f32, 20.0, 900.0] {
            let row: Vec<f32> = (0..width)
                .map(|_| 100.0 + spread * ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5))
                .collect();
            let y = (rng.next() % width as u64) as usize;
            let score = metrics::row_score(&Metric::CrossEntropy, &row, y, &[]);
            assert!(score.is_finite(), "{width} {spread}: {score}");
            scores.extend(score.to_bits().to_le_bytes());
        }
    }
    scores
}

#[test]
fn every_vector_level_gives_the_same_bits() {
    let levels: Vec<Level> = Level::ALL
        .into_iter()
        .filter(|&l| l <= Level::detected())
        .collect();
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = write(dir.path(), dtype);
        let mut results = Vec::new();
        for &level in &levels {
            limit(level);
            assert_eq!(Level::active(), level);
            results.push(results_at(&set));
        }
        limit(Level::Avx512);
        for (level, result) in levels.iter().zip(&results).skip(1) {
            for (t, (a, b)) in results[0].iter().zip(result).enumerate() {
                let first = a.iter().zip(b).position(|(x, y)| x != y);
                assert!(
                    first.is_none(),
                    "{dtype:?}: result {t} differs between {} and {} at byte {first:?}",
                    levels[0].name(),
                    level.name(),
                );
            }
        }
    }
}
