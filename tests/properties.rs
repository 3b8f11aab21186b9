//! Property tests of the averaging numerics, through the public API on real files:
//! random checkpoints are written as safetensors files in a temporary directory
//! (`safetensors::serialize_to_file`), opened with `CheckpointSet::open`, averaged with
//! `Weights::build` and `Accumulator`, and compared with a float64 reference computed
//! here (sum in `f64`, divide, round once with `half` or `as f32`).
//!
//! Properties (each with a modest number of cases so that the suite stays fast):
//!
//! 1. the mean of identical checkpoints is that checkpoint, bit for bit (f32, f16,
//!    bf16; NaN stays NaN), by `Weights::build` and by `Accumulator`;
//! 2. a uniform mean does not depend on the order of its members beyond float rounding:
//!    - when the float64 sum is exact (always for f16; for f32 and bf16 when the
//!      members' exponents span at most 20 and 30 binades), every order gives the same
//!      bits, and they are the float64 mean rounded once to the dtype;
//!    - for any finite values, every order is within one ulp of the dtype (plus the
//!      float64 summation error, which matters only under cancellation) of the float64
//!      mean. The bound is derived in `order_bound`;
//! 3. f16/bf16 values survive write → read → mean of one unchanged; a mean is the
//!    float64 mean rounded to nearest, ties to even (`half::f16::from_f64`), and the
//!    mean of two adjacent values (always a tie) is the one with an even mantissa;
//! 4. the result is bit-identical with 1, 2 and 8 rayon threads, for tensors larger
//!    than one work chunk (32768 elements).

use std::path::{Path, PathBuf};

use aswa_merge::averaging::{Accumulator, Candidate, Recipe, Weights};
use aswa_merge::storage::{CheckpointSet, CheckpointSource};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::sample::SizeRange;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

// ------------------------------------------------------------------ helpers

/// The float dtypes the properties cover.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    F32,
    F16,
    BF16,
}

impl Ty {
    fn st(self) -> Dtype {
        match self {
            Ty::F32 => Dtype::F32,
            Ty::F16 => Dtype::F16,
            Ty::BF16 => Dtype::BF16,
        }
    }
    /// Rounds an `f64` to this dtype (nearest, ties to even) and returns its bits.
    fn round(self, v: f64) -> u32 {
        match self {
            Ty::F32 => (v as f32).to_bits(),
            // `half`'s conversions round through f32 (double rounding, off by one unit
            // at a tie the first rounding creates): take the nearest of their neighbours.
            Ty::F16 => nearest(v, f16::from_f64(v).to_bits(), |b| {
                f16::from_bits(b).to_f64()
            }) as u32,
            Ty::BF16 => nearest(v, bf16::from_f64(v).to_bits(), |b| {
                bf16::from_bits(b).to_f64()
            }) as u32,
        }
    }
    /// The value of these bits as `f64` (exact).
    fn value(self, bits: u32) -> f64 {
        match self {
            Ty::F32 => f32::from_bits(bits) as f64,
            Ty::F16 => f16::from_bits(bits as u16).to_f64(),
            Ty::BF16 => bf16::from_bits(bits as u16).to_f64(),
        }
    }
    fn encode(self, bits: &[u32]) -> Vec<u8> {
        match self {
            Ty::F32 => bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            Ty::F16 | Ty::BF16 => bits
                .iter()
                .flat_map(|&b| (b as u16).to_le_bytes())
                .collect(),
        }
    }
    fn decode(self, bytes: &[u8]) -> Vec<u32> {
        match self {
            Ty::F32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Ty::F16 | Ty::BF16 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
        }
    }
    /// Spacing of this dtype's values at `v`: the distance from |round(v)| to the next
    /// value away from zero (the larger of the two spacings around a power of two).
    fn ulp(self, v: f64) -> f64 {
        let r = self.round(v.abs());
        (self.value(r + 1) - self.value(r)).abs()
    }
    fn is_nan(self, bits: u32) -> bool {
        self.value(bits).is_nan()
    }
}

fn ty() -> impl Strategy<Value = Ty> {
    prop_oneof![Just(Ty::F32), Just(Ty::F16), Just(Ty::BF16)]
}

/// Tensor names and shapes of a checkpoint (scalars and empty tensors included).
fn schema() -> impl Strategy<Value = Vec<Vec<usize>>> {
    prop::collection::vec(prop::collection::vec(0usize..=5, 0..=3), 1..=3)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Writes one checkpoint: tensor `t{i}` of `shapes[i]` holding `values[i]` (bits).
fn write(path: &Path, ty: Ty, shapes: &[Vec<usize>], values: &[Vec<u32>]) {
    let bytes: Vec<Vec<u8>> = values.iter().map(|v| ty.encode(v)).collect();
    let views: Vec<(String, TensorView<'_>)> = shapes
        .iter()
        .zip(&bytes)
        .enumerate()
        .map(|(i, (s, b))| {
            (
                format!("t{i}"),
                TensorView::new(ty.st(), s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes one checkpoint per entry of `members` and opens them as a set, in that order.
/// `members[c][t]` are the bits of tensor `t` of checkpoint `c`.
fn open(dir: &Path, ty: Ty, shapes: &[Vec<usize>], members: &[Vec<Vec<u32>>]) -> CheckpointSet {
    let paths: Vec<PathBuf> = members
        .iter()
        .enumerate()
        .map(|(c, values)| {
            let p = dir.join(format!("c{c}.safetensors"));
            write(&p, ty, shapes, values);
            p
        })
        .collect();
    CheckpointSet::open(paths.into_iter().map(CheckpointSource::File).collect()).unwrap()
}

/// Bits of tensor `t` of a result.
fn result(set: &CheckpointSet, w: &Weights, ty: Ty, t: usize) -> Vec<u32> {
    ty.decode(Candidate::Average(w).tensor_bytes(set, t))
}

/// Equal bits, except that any NaN equals any NaN (a NaN's payload is not promised).
fn same(ty: Ty, a: &[u32], b: &[u32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(&x, &y)| x == y || (ty.is_nan(x) && ty.is_nan(y)))
}

/// Any bit pattern of the dtype (NaN, infinities, subnormals, -0 included).
fn any_bits(ty: Ty) -> BoxedStrategy<u32> {
    match ty {
        Ty::F32 => any::<u32>().boxed(),
        Ty::F16 | Ty::BF16 => any::<u16>().prop_map(u32::from).boxed(),
    }
}

/// Finite values of the dtype whose exponents lie in `lo..=lo + window` (or zero).
fn windowed(ty: Ty, lo: i32, window: i32) -> BoxedStrategy<u32> {
    prop_oneof![
        1 => Just(0u32),
        20 => (any::<bool>(), 1.0f64..2.0, 0..=window).prop_map(move |(neg, m, e)| {
            let v = m * 2f64.powi(lo + e);
            ty.round(if neg { -v } else { v })
        }),
    ]
    .boxed()
}

/// Finite values of any magnitude (no NaN, no infinity).
fn finite(ty: Ty) -> BoxedStrategy<u32> {
    any_bits(ty)
        .prop_filter("finite", move |&b| ty.value(b).is_finite())
        .boxed()
}

/// `n` checkpoints of `shapes`, elements drawn from `elem`.
fn members(
    shapes: &[Vec<usize>],
    n: impl Into<SizeRange>,
    elem: BoxedStrategy<u32>,
) -> impl Strategy<Value = Vec<Vec<Vec<u32>>>> {
    let tensors: Vec<_> = shapes
        .iter()
        .map(|s| prop::collection::vec(elem.clone(), numel(s)))
        .collect();
    prop::collection::vec(tensors, n)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Every case writes files: shrinking stays bounded.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------ 1. identical checkpoints

proptest! {
    #![proptest_config(config(48))]

    /// The mean of k identical checkpoints is the checkpoint, bit for bit (any NaN is
    /// a NaN). Why it is exact: the float64 sum of k ≤ 8 copies of a value with a p-bit
    /// significand (p ≤ 24) needs at most p + 3 ≤ 53 bits, so the sum and the division
    /// by k are exact and the final rounding finds the value itself.
    #[test]
    fn the_mean_of_identical_checkpoints_is_the_checkpoint(
        (ty, shapes, values, k) in (ty(), schema(), 1usize..=8).prop_flat_map(|(ty, shapes, k)| {
            let values: Vec<_> = shapes
                .iter()
                .map(|s| prop::collection::vec(any_bits(ty), numel(s)))
                .collect();
            (Just(ty), Just(shapes), values, Just(k))
        })
    ) {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), ty, &shapes, &vec![values.clone(); k]);
        let all: Vec<usize> = (0..k).collect();

        let built = Weights::build(&set, Recipe::Mean(&all));

        let mut acc = Accumulator::new(&set);
        acc.reset(&set, 0);
        for c in 1..k {
            acc.add(&set, c);
        }
        let mut from_sum = Weights::new(&set);
        acc.mean_into(&set, None, &mut from_sum);

        // The look-ahead form: the sum of k - 1 members plus one extra.
        let mut look_ahead = Weights::new(&set);
        if k > 1 {
            let mut acc = Accumulator::new(&set);
            acc.reset(&set, 0);
            for c in 1..k - 1 {
                acc.add(&set, c);
            }
            acc.mean_into(&set, Some(k - 1), &mut look_ahead);
        }

        for (t, want) in values.iter().enumerate() {
            // What was written is what is read.
            prop_assert_eq!(&ty.decode(set.tensor_bytes(0, t)), want);
            let got = result(&set, &built, ty, t);
            prop_assert!(same(ty, &got, want), "build, {:?} t{}: {:?} != {:?}", ty, t, got, want);
            let got = result(&set, &from_sum, ty, t);
            prop_assert!(same(ty, &got, want), "accumulator, {:?} t{}: {:?} != {:?}", ty, t, got, want);
            if k > 1 {
                let got = result(&set, &look_ahead, ty, t);
                prop_assert!(same(ty, &got, want), "look-ahead, {:?} t{}", ty, t);
            }
        }
    }
}

// ------------------------------------------------------------------ 2. order

/// Exponent windows within which the float64 sum of up to 8 values is exact: a value
/// with a p-bit significand and exponent e is a multiple of 2^(e − p + 1); the sum of 8
/// values below 2^(E + 1) is below 2^(E + 4). So every partial sum fits in 53 bits when
/// (E + 4) − (e_min − p + 1) ≤ 53, i.e. E − e_min ≤ 50 − p: 26 binades for f32 (p = 24),
/// 42 for bf16 (p = 8). f16 always fits (every f16 is a multiple of 2^-24 below 2^16).
/// The windows used below (20 and 30) leave a margin for the rounding of the generator.
///
/// The window is drawn once per case, so that all the values summed share it.
fn exact_members(ty: Ty, shapes: Vec<Vec<usize>>, n: usize) -> BoxedStrategy<Vec<Vec<Vec<u32>>>> {
    match ty {
        Ty::F32 => (-120i32..=100)
            .prop_flat_map(move |lo| members(&shapes, n, windowed(Ty::F32, lo, 20)))
            .boxed(),
        Ty::BF16 => (-120i32..=90)
            .prop_flat_map(move |lo| members(&shapes, n, windowed(Ty::BF16, lo, 30)))
            .boxed(),
        Ty::F16 => members(&shapes, n, finite(Ty::F16)).boxed(),
    }
}

/// Permutations of 0..n.
fn permutation(n: usize) -> impl Strategy<Value = Vec<usize>> {
    Just((0..n).collect::<Vec<_>>()).prop_shuffle()
}

/// The float64 mean of element `i` of tensor `t` over `members`, summed in index order.
fn mean64(ty: Ty, members: &[Vec<Vec<u32>>], t: usize, i: usize) -> f64 {
    let sum: f64 = members.iter().map(|m| ty.value(m[t][i])).sum();
    sum / members.len() as f64
}

/// How far a mean computed in another member order may be from [`mean64`]:
///
/// - the float64 sum of n values in any order is within γ(n−1)·Σ|x| of the exact sum
///   (γ(k) = k·u/(1 − k·u), u = 2^-53, the standard bound for recursive summation), so
///   two orders differ by at most 2·γ(n−1)·Σ|x|, and by n·2^-53·Σ|x| after dividing
///   by n and rounding (one more u each);
/// - rounding to the dtype then moves each by at most half an ulp of the dtype, so two
///   results differ by at most one ulp plus the above.
///
/// When the float64 sum is exact (see [`exact_members`]) the second term is zero and the
/// results are in fact identical. It only matters under cancellation, e.g. 1e30, 1,
/// −1e30 (f32): float64 cannot hold 1e30 + 1, so one order gives 0 and another 1/3.
fn order_bound(ty: Ty, members: &[Vec<Vec<u32>>], t: usize, i: usize) -> f64 {
    let n = members.len() as f64;
    let abs: f64 = members.iter().map(|m| ty.value(m[t][i]).abs()).sum();
    let gamma = |k: f64| k * 2f64.powi(-53) / (1.0 - k * 2f64.powi(-53));
    let m = mean64(ty, members, t, i);
    ty.ulp(m) + (2.0 * gamma(n - 1.0) * abs + 4.0 * 2f64.powi(-53) * abs) / n
}

proptest! {
    #![proptest_config(config(48))]

    /// Where the float64 sum is exact, the order of the members changes no bit, and the
    /// result is the float64 mean rounded once to the dtype.
    #[test]
    fn the_mean_does_not_depend_on_member_order_when_the_sum_is_exact(
        (ty, shapes, ms, perm) in (ty(), schema(), 2usize..=8).prop_flat_map(|(ty, shapes, n)| {
            let ms = exact_members(ty, shapes.clone(), n);
            (Just(ty), Just(shapes), ms, permutation(n))
        })
    ) {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), ty, &shapes, &ms);
        let ordered: Vec<usize> = (0..ms.len()).collect();
        let a = Weights::build(&set, Recipe::Mean(&ordered));
        let b = Weights::build(&set, Recipe::Mean(&perm));
        let mut acc = Accumulator::new(&set);
        acc.reset(&set, perm[0]);
        for &c in &perm[1..] {
            acc.add(&set, c);
        }
        let mut c = Weights::new(&set);
        acc.mean_into(&set, None, &mut c);
        for (t, shape) in shapes.iter().enumerate() {
            let want: Vec<u32> = (0..numel(shape))
                .map(|i| ty.round(mean64(ty, &ms, t, i)))
                .collect();
            prop_assert_eq!(&result(&set, &a, ty, t), &want, "{:?} t{} in order", ty, t);
            prop_assert_eq!(&result(&set, &b, ty, t), &want, "{:?} t{} permuted {:?}", ty, t, &perm);
            prop_assert_eq!(&result(&set, &c, ty, t), &want, "{:?} t{} accumulator", ty, t);
        }
    }

    /// For any finite values, a permuted mean is within [`order_bound`] (one ulp of the
    /// dtype, plus the float64 summation error) of the float64 mean.
    #[test]
    fn a_permuted_mean_is_within_one_ulp_plus_summation_error(
        (ty, shapes, ms, perm) in (ty(), schema(), 2usize..=8).prop_flat_map(|(ty, shapes, n)| {
            let ms = members(&shapes, n, finite(ty));
            (Just(ty), Just(shapes), ms, permutation(n))
        })
    ) {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), ty, &shapes, &ms);
        let w = Weights::build(&set, Recipe::Mean(&perm));
        for t in 0..shapes.len() {
            let got = result(&set, &w, ty, t);
            for (i, &g) in got.iter().enumerate() {
                let m = mean64(ty, &ms, t, i);
                let bound = order_bound(ty, &ms, t, i);
                let err = (ty.value(g) - m).abs();
                prop_assert!(
                    err <= bound,
                    "{:?} t{}[{}]: {} vs float64 mean {} (error {:e} > bound {:e})",
                    ty, t, i, ty.value(g), m, err, bound
                );
            }
        }
    }
}

/// The bound is needed: with cancellation, orders differ by more than one ulp (and stay
/// within the bound).
#[test]
fn cancellation_is_why_the_order_bound_has_a_second_term() {
    let dir = tempfile::tempdir().unwrap();
    let shapes = vec![vec![1]];
    let ms: Vec<Vec<Vec<u32>>> = [1e30f32, 1.0, -1e30]
        .iter()
        .map(|v| vec![vec![v.to_bits()]])
        .collect();
    let set = open(dir.path(), Ty::F32, &shapes, &ms);
    let a = Weights::build(&set, Recipe::Mean(&[0, 1, 2]));
    let b = Weights::build(&set, Recipe::Mean(&[0, 2, 1]));
    let (a, b) = (
        Ty::F32.value(result(&set, &a, Ty::F32, 0)[0]),
        Ty::F32.value(result(&set, &b, Ty::F32, 0)[0]),
    );
    assert_eq!(a, 0.0); // 1e30 + 1 == 1e30 in float64
    assert_eq!(b, (1.0f64 / 3.0) as f32 as f64);
    let bound = order_bound(Ty::F32, &ms, 0, 0);
    assert!((a - b).abs() <= 2.0 * bound, "{a} {b} {bound}");
}

// ------------------------------------------------------------------ 3. half precision

fn half_ty() -> impl Strategy<Value = Ty> {
    prop_oneof![Just(Ty::F16), Just(Ty::BF16)]
}

proptest! {
    #![proptest_config(config(48))]

    /// Every f16/bf16 value (all bit patterns but NaN, whose payload is not promised)
    /// survives write → read → mean of one unchanged.
    #[test]
    fn half_values_round_trip(
        (ty, values) in half_ty().prop_flat_map(|ty| {
            (Just(ty), prop::collection::vec(any_bits(ty), 1..=300))
        })
    ) {
        let dir = tempfile::tempdir().unwrap();
        let shapes = vec![vec![values.len()]];
        let set = open(dir.path(), ty, &shapes, &[vec![values.clone()]]);
        prop_assert_eq!(&ty.decode(set.tensor_bytes(0, 0)), &values);
        let w = Weights::build(&set, Recipe::Mean(&[0]));
        let got = result(&set, &w, ty, 0);
        prop_assert!(same(ty, &got, &values), "{:?}: {:?} != {:?}", ty, got, values);
        // NaN stays NaN, and every other value keeps its exact bits (-0 included).
        for (g, v) in got.iter().zip(&values) {
            prop_assert_eq!(ty.is_nan(*g), ty.is_nan(*v));
        }
    }

    /// A mean of f16/bf16 checkpoints is the float64 mean rounded once to nearest, ties
    /// to even. The reference ([`Ty::round`]) is the nearest of the neighbours of `half`'s
    /// conversion: `half`'s `bf16::from_f64` rounds through f32 (double rounding), so it
    /// cannot be the reference itself.
    #[test]
    fn half_means_round_to_nearest_even_of_the_float64_mean(
        (ty, ms) in half_ty().prop_flat_map(|ty| {
            (Just(ty), (2usize..=8).prop_flat_map(move |n| {
                exact_members(ty, vec![vec![64]], n)
            }))
        })
    ) {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), ty, &[vec![64]], &ms);
        let all: Vec<usize> = (0..ms.len()).collect();
        let w = Weights::build(&set, Recipe::Mean(&all));
        let got = result(&set, &w, ty, 0);
        for (i, &g) in got.iter().enumerate() {
            let m = mean64(ty, &ms, 0, i);
            let want = ty.round(m);
            prop_assert_eq!(g, want, "{:?}[{}]: mean {}", ty, i, m);
        }
    }

    /// The mean of two adjacent finite values lies exactly halfway between them, a tie:
    /// it rounds to the one whose last significand bit is 0.
    #[test]
    fn the_mean_of_two_adjacent_half_values_is_the_even_one(
        (ty, x) in half_ty().prop_flat_map(|ty| (Just(ty), finite(ty)))
    ) {
        // y: the next value away from zero (x's bits + 1), if finite.
        let y = x + 1;
        prop_assume!(ty.value(y).is_finite() && (x & 0x7fff) != 0x7fff);
        let dir = tempfile::tempdir().unwrap();
        let shapes = vec![vec![1]];
        let ms = vec![vec![vec![x]], vec![vec![y]]];
        let set = open(dir.path(), ty, &shapes, &ms);
        let got = result(&set, &Weights::build(&set, Recipe::Mean(&[0, 1])), ty, 0)[0];
        let even = if x % 2 == 0 { x } else { y };
        prop_assert_eq!(got, even, "{:?}: mean of {} and {}", ty, ty.value(x), ty.value(y));
    }
}

// ------------------------------------------------------------------ 4. threads

/// Runs `f` on a rayon pool of `n` threads.
/// The representable value nearest to `v` among `guess` and its two neighbours (same
/// sign), ties to the even bit pattern; non-finite `v` keeps `guess`.
fn nearest(v: f64, guess: u16, decode: impl Fn(u16) -> f64) -> u16 {
    if !v.is_finite() {
        return guess;
    }
    let mut best = guess;
    for c in [guess.wrapping_sub(1), guess.wrapping_add(1)] {
        if (c ^ guess) & 0x8000 != 0 || !decode(c).is_finite() {
            continue;
        }
        let (d, db) = ((decode(c) - v).abs(), (decode(best) - v).abs());
        if d < db || (d == db && c & 1 == 0) {
            best = c;
        }
    }
    best
}

fn with_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
        .install(f)
}

/// Every way the tool forms a model, as bytes per tensor.
fn all_results(set: &CheckpointSet, ty: Ty, perm: &[usize]) -> Vec<Vec<u32>> {
    let n = set.len();
    let mut out = Vec::new();
    let mut push = |w: &Weights| {
        for t in 0..set.specs().len() {
            out.push(result(set, w, ty, t));
        }
    };
    push(&Weights::build(set, Recipe::Mean(perm)));
    push(&Weights::build(set, Recipe::Ema(perm, 0.9)));
    let mut acc = Accumulator::new(set);
    acc.reset(set, perm[0]);
    for &c in &perm[1..n - 1] {
        acc.add(set, c);
    }
    let mut w = Weights::new(set);
    acc.mean_into(set, Some(perm[n - 1]), &mut w);
    push(&w);
    acc.mean_into(set, None, &mut w);
    push(&w);
    out
}

/// `n` pseudo-random bit patterns of the dtype (xorshift from `seed`; NaN and
/// infinities included): cheap for tensors of many chunks.
fn noise(ty: Ty, mut seed: u64, n: usize) -> Vec<u32> {
    seed |= 1;
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            match ty {
                Ty::F32 => (seed >> 32) as u32,
                Ty::F16 | Ty::BF16 => (seed >> 48) as u32,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config(24))]

    /// 1, 2 and 8 threads give the same bits, for a tensor of several work chunks.
    #[test]
    fn results_are_bit_identical_for_1_2_and_8_threads(
        ty in ty(),
        big in 32768usize..=100_000,
        seeds in prop::collection::vec(any::<u64>(), 2..=4),
        shuffle in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let shapes = vec![vec![big], vec![3, 5]];
        let ms: Vec<Vec<Vec<u32>>> = seeds
            .iter()
            .map(|&s| shapes.iter().enumerate().map(|(t, sh)| noise(ty, s ^ t as u64, numel(sh))).collect())
            .collect();
        let set = open(dir.path(), ty, &shapes, &ms);
        // A member order derived from `shuffle`.
        let mut perm: Vec<usize> = (0..ms.len()).collect();
        perm.rotate_left(shuffle as usize % ms.len());
        if shuffle & (1 << 32) != 0 {
            perm.reverse();
        }
        let one = with_threads(1, || all_results(&set, ty, &perm));
        for n in [2, 8] {
            let other = with_threads(n, || all_results(&set, ty, &perm));
            prop_assert!(one == other, "{:?}: {} threads differ from 1", ty, n);
        }
    }
}
