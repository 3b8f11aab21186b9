//! Validation metrics, accumulated batch by batch.
//!
//! Each metric is a mean over validation rows, accumulated in `f64` in row order, so
//! the result does not depend on the batch size or thread count. A model output that
//! holds NaN gives a NaN score, which ASWA never accepts.

use rayon::prelude::*;

use super::data::{Filter, Labels};
use crate::error::{Error, Result};
use crate::simd::simd;

/// A metric to score candidates with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metric {
    /// Fraction of rows whose arg-max equals the label (ties go to the lowest index).
    Accuracy,
    /// Fraction of rows whose label is among the K highest outputs (ties to lower indices).
    TopK(usize),
    /// Mean of `logsumexp(z) - z[y]` over rows (from logits; lower is better).
    CrossEntropy,
    /// Mean squared error over all elements (lower is better).
    Mse,
    /// Mean absolute error over all elements (lower is better).
    Mae,
    /// Mean reciprocal rank of the true candidate (realistic rank, optional filtering).
    Mrr,
    /// Fraction of rows whose realistic rank is at most K.
    HitsAt(usize),
    /// Mean of a graph output that is already a per-row or per-batch score.
    Output(String),
}

impl Metric {
    /// Parses `accuracy`, `top-K`, `cross-entropy`, `mse`, `mae`, `mrr`, `hits@K`, `output:NAME`.
    pub fn parse(s: &str) -> Result<Self> {
        let k = |rest: &str| -> Result<usize> {
            rest.parse::<usize>()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| Error::Metric(format!("`{s}`: K must be a positive integer")))
        };
        Ok(match s {
            "accuracy" | "acc" => Metric::Accuracy,
            "cross-entropy" | "cross_entropy" | "ce" => Metric::CrossEntropy,
            "mse" => Metric::Mse,
            "mae" => Metric::Mae,
            "mrr" => Metric::Mrr,
            _ if s.starts_with("top-") => Metric::TopK(k(&s[4..])?),
            _ if s.starts_with("hits@") => Metric::HitsAt(k(&s[5..])?),
            _ if s.starts_with("output:") && s.len() > 7 => Metric::Output(s[7..].to_string()),
            _ => {
                return Err(Error::Metric(format!(
                    "unknown metric `{s}`; choose one of: accuracy, top-K (e.g. top-5), cross-entropy, \
                     mse, mae, mrr, hits@K (e.g. hits@10), output:NAME"
                )))
            }
        })
    }

    /// The canonical name.
    pub fn name(&self) -> String {
        match self {
            Metric::Accuracy => "accuracy".into(),
            Metric::TopK(k) => format!("top-{k}"),
            Metric::CrossEntropy => "cross-entropy".into(),
            Metric::Mse => "mse".into(),
            Metric::Mae => "mae".into(),
            Metric::Mrr => "mrr".into(),
            Metric::HitsAt(k) => format!("hits@{k}"),
            Metric::Output(n) => format!("output:{n}"),
        }
    }

    /// Default direction: `false` for losses and errors.
    pub fn higher_is_better(&self) -> bool {
        !matches!(self, Metric::CrossEntropy | Metric::Mse | Metric::Mae)
    }

    /// Whether the metric compares outputs with labels.
    pub fn needs_labels(&self) -> bool {
        !matches!(self, Metric::Output(_))
    }

    /// Whether the metric needs class (integer) labels.
    pub fn needs_classes(&self) -> bool {
        matches!(
            self,
            Metric::Accuracy
                | Metric::TopK(_)
                | Metric::CrossEntropy
                | Metric::Mrr
                | Metric::HitsAt(_)
        )
    }

    /// The graph output this metric reads, if it names one.
    pub fn output_name(&self) -> Option<&str> {
        match self {
            Metric::Output(n) => Some(n),
            _ => None,
        }
    }
}

/// Running sum of a metric over the rows seen so far.
#[derive(Debug, Clone)]
pub struct Accumulator<'a> {
    metric: &'a Metric,
    labels: Option<&'a Labels>,
    filter: Option<&'a Filter>,
    sum: f64,
    rows: usize,
}

impl<'a> Accumulator<'a> {
    pub fn new(metric: &'a Metric, labels: Option<&'a Labels>, filter: Option<&'a Filter>) -> Self {
        Self {
            metric,
            labels,
            filter,
            sum: 0.0,
            rows: 0,
        }
    }

    /// Adds a batch: `output` is the model output for rows `start..start + rows`, row-major
    /// with `shape` (whose first dimension is `rows`, unless the output is a scalar).
    pub fn update(
        &mut self,
        output: &[f32],
        shape: &[usize],
        start: usize,
        rows: usize,
    ) -> Result<()> {
        if let Metric::Output(name) = self.metric {
            let n = output.len();
            if n == rows {
                self.sum += output.iter().map(|&v| f64::from(v)).sum::<f64>();
            } else if n == 1 {
                self.sum += f64::from(output[0]) * rows as f64;
            } else {
                return Err(Error::Metric(format!(
                    "output `{name}` has shape {shape:?}; expected one value per row or one per batch"
                )));
            }
            self.rows += rows;
            return Ok(());
        }
        if rows == 0 || !output.len().is_multiple_of(rows) || shape.first() != Some(&rows) {
            return Err(Error::Metric(format!(
                "the model output has shape {shape:?}; expected {rows} rows along axis 0"
            )));
        }
        let width = output.len() / rows;
        if width == 0 {
            return Err(Error::Metric(format!(
                "the model output has shape {shape:?}: no values per row"
            )));
        }
        let labels = self.labels.ok_or_else(|| {
            Error::Metric(format!("metric `{}` needs labels", self.metric.name()))
        })?;
        let metric = self.metric;
        // One value's error term for mse (squared) or mae (absolute).
        let error = |d: f64| {
            if matches!(metric, Metric::Mae) {
                d.abs()
            } else {
                d * d
            }
        };
        let scores = match (metric, labels) {
            (Metric::Mse | Metric::Mae, Labels::Values { values, per_row }) => {
                if *per_row != width {
                    return Err(Error::Metric(format!(
                        "the model output has {width} values per row but the labels have {per_row}"
                    )));
                }
                each_row(output, width, 4, |r, row| {
                    let global = start + r;
                    let target = &values[global * width..(global + 1) * width];
                    row.iter()
                        .zip(target)
                        .map(|(&o, &t)| error(f64::from(o) - t))
                        .sum::<f64>()
                        / width as f64
                })
            }
            (Metric::Mse | Metric::Mae, Labels::Classes(c)) => {
                // Integer targets for a regression metric: compare as numbers.
                if width != 1 {
                    return Err(Error::Metric(format!(
                        "integer labels have one value per row but the model output has {width}"
                    )));
                }
                each_row(output, width, 4, |r, row| {
                    error(f64::from(row[0]) - c[start + r] as f64)
                })
            }
            (_, Labels::Classes(c)) => {
                for (r, &y) in c[start..start + rows].iter().enumerate() {
                    if y < 0 || y as usize >= width {
                        return Err(Error::Metric(format!(
                            "label {y} of row {} is outside the model's {width} outputs",
                            start + r
                        )));
                    }
                }
                let filter = self.filter;
                let cost = if *metric == Metric::CrossEntropy {
                    8
                } else {
                    1
                };
                each_row(output, width, cost, |r, row| {
                    let global = start + r;
                    let filtered = filter.map(|f| f.row(global)).unwrap_or(&[]);
                    row_score(metric, row, c[global] as usize, filtered)
                })
            }
            (m, Labels::Values { .. }) => {
                return Err(Error::Metric(format!(
                    "metric `{}` needs integer class labels, but the labels are floating point",
                    m.name()
                )))
            }
        };
        // In row order, whatever the threads: the same sum every time.
        for score in scores {
            self.sum += score;
        }
        self.rows += rows;
        Ok(())
    }

    /// The mean over all rows seen.
    pub fn finish(&self) -> f64 {
        if self.rows == 0 {
            f64::NAN
        } else {
            self.sum / self.rows as f64
        }
    }
}

/// Batches with at least this much work (output values × their relative cost) are scored
/// on every thread; below it, handing rows to threads costs more than it saves. Costs
/// relative to a comparison (vectorised, well under a nanosecond a value): 4 for an
/// error term (f64 widening, subtraction, square or absolute value, sum; not
/// vectorised), 8 for cross-entropy (a vectorised `exp` and an ordered sum, about a
/// nanosecond a value).
const PARALLEL_WORK: usize = 1 << 18;

/// `score(r, row r)` for each row of the `width`-wide rows of `output`, in row order;
/// the rows of large batches (by `cost`, the work per value relative to a comparison) are
/// scored in parallel (each row's score does not depend on the threads).
fn each_row(
    output: &[f32],
    width: usize,
    cost: usize,
    score: impl Fn(usize, &[f32]) -> f64 + Sync,
) -> Vec<f64> {
    let rows = output.chunks_exact(width);
    if output.len().saturating_mul(cost) >= PARALLEL_WORK {
        let rows = output.par_chunks_exact(width);
        rows.enumerate().map(|(r, row)| score(r, row)).collect()
    } else {
        rows.enumerate().map(|(r, row)| score(r, row)).collect()
    }
}

/// How the other values of a row compare with the true candidate's score.
struct Tally {
    /// Values greater than the true score.
    greater: usize,
    /// Values equal to it (the true candidate not counted).
    equal: usize,
    /// Of those, the ones before the true candidate.
    equal_before: usize,
}

impl Tally {
    /// Compares every value of `row` with `row[y]`, in one pass per side; `None` if the
    /// row holds a NaN.
    fn of(row: &[f32], y: usize) -> Option<Self> {
        let t = row[y];
        let (before, after) = (count(&row[..y], t), count(&row[y + 1..], t));
        (!(t.is_nan() || before.nan || after.nan)).then_some(Tally {
            greater: before.greater + after.greater,
            equal: before.equal + after.equal,
            equal_before: before.equal,
        })
    }
}

/// How a slice of values compares with one value.
struct Counts {
    greater: usize,
    equal: usize,
    /// Whether one of the values is NaN.
    nan: bool,
}

/// How many of `values` are greater than `t`, how many equal, and whether one is NaN:
/// branch-free with 32-bit counters (per block of 2³¹ values), so that the loop
/// vectorises at the widest level ([`simd`]).
fn count(values: &[f32], t: f32) -> Counts {
    simd(
        #[inline(always)]
        || {
            let (mut greater, mut equal, mut nan) = (0usize, 0usize, false);
            for block in values.chunks(1 << 31) {
                let (mut g, mut e, mut n) = (0u32, 0u32, false);
                for &v in block {
                    g += u32::from(v > t);
                    e += u32::from(v == t);
                    n |= v.is_nan();
                }
                (greater, equal, nan) = (greater + g as usize, equal + e as usize, nan | n);
            }
            Counts {
                greater,
                equal,
                nan,
            }
        },
    )
}

/// The per-row contribution of a classification or ranking metric. NaN anywhere in
/// the row makes it NaN.
pub fn row_score(metric: &Metric, row: &[f32], y: usize, filtered: &[i64]) -> f64 {
    let Some(tally) = Tally::of(row, y) else {
        return f64::NAN;
    };
    match metric {
        Metric::Accuracy | Metric::TopK(_) => {
            // Position of y when sorted by decreasing score, ties broken by lower index.
            let pos = tally.greater + tally.equal_before;
            let k = if let Metric::TopK(k) = metric { *k } else { 1 };
            f64::from(u8::from(pos < k))
        }
        Metric::CrossEntropy => {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + sum_exp(row, max).ln();
            lse - f64::from(row[y])
        }
        Metric::Mrr | Metric::HitsAt(_) => {
            let rank = rank_from(tally, row, y, filtered);
            match metric {
                Metric::Mrr => 1.0 / rank,
                Metric::HitsAt(k) => f64::from(u8::from(rank <= *k as f64)),
                _ => unreachable!(),
            }
        }
        Metric::Mse | Metric::Mae | Metric::Output(_) => f64::NAN,
    }
}

/// `Σ e^(v − max)` over the row, in row order: the exponentials of a block at a time
/// computed by a loop that vectorises ([`exp_nonpositive`]), then added one by one (an
/// ordered sum, which no compiler vectorises, so the two are separate loops).
fn sum_exp(row: &[f32], max: f64) -> f64 {
    simd(
        #[inline(always)]
        || {
            let mut terms = [0f64; 512];
            let mut sum = 0.0;
            for block in row.chunks(terms.len()) {
                let terms = &mut terms[..block.len()];
                for (e, &v) in terms.iter_mut().zip(block) {
                    *e = exp_nonpositive(f64::from(v) - max);
                }
                for e in terms.iter() {
                    sum += e;
                }
            }
            sum
        },
    )
}

/// `e^x` for `x ≤ 0` (a value minus the row's maximum), within a few units in the last
/// place, without branches or calls so that loops over it vectorise (`f64::exp` is a libm
/// call per value). Below −708 it returns e^−708 ≈ 3·10⁻³⁰⁸ instead of a smaller or
/// subnormal value: next to the maximum's own term (exactly 1) such terms vanish from the
/// sum either way. NaN gives NaN.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    // ln 2 in two parts (fdlibm's): `k · LN2_HI` is exact for the |k| ≤ 1021 used here.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1.5 · 2⁵²: adding it rounds to an integer, which its low bits then hold.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    // 1/n! for n = 13 down to 2.
    const C: [f64; 12] = [
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
    let x = if x < -708.0 { -708.0 } else { x };
    // e^x = 2^k · e^r with k = round(x / ln 2) in [−1021, 0] and |r| ≤ ln 2 / 2 (about).
    let t = x * std::f64::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // e^r by its Taylor series to degree 13 (the remainder is below 2⁻⁵³ for |r| ≤ 0.35).
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    let p = (p * r + 1.0) * r + 1.0;
    // 2^k: k + 1023 in the exponent field (t's bits less SHIFT's are k).
    let scale = f64::from_bits(t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(1023) << 52);
    p * scale
}

/// `1 + #{scores > true} + ½·#{other scores = true}`, leaving out `filtered` candidates
/// (distinct indices, as [`Filter`] rows are; the true candidate and indices outside the
/// row are ignored); NaN if the row holds a NaN.
pub fn realistic_rank(row: &[f32], y: usize, filtered: &[i64]) -> f64 {
    match Tally::of(row, y) {
        Some(tally) => rank_from(tally, row, y, filtered),
        None => f64::NAN,
    }
}

/// [`realistic_rank`] from the row's tally.
fn rank_from(tally: Tally, row: &[f32], y: usize, filtered: &[i64]) -> f64 {
    let t = row[y];
    let Tally {
        mut greater,
        mut equal,
        ..
    } = tally;
    debug_assert!(
        filtered.windows(2).all(|w| w[0] < w[1]),
        "filtered candidates must be sorted and distinct"
    );
    for &f in filtered {
        let Ok(j) = usize::try_from(f) else { continue };
        if j == y || j >= row.len() {
            continue;
        }
        // Saturating: a repeated index (against the contract) cannot wrap the count.
        if row[j] > t {
            greater = greater.saturating_sub(1);
        } else if row[j] == t {
            equal = equal.saturating_sub(1);
        }
    }
    1.0 + greater as f64 + 0.5 * equal as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_directions() {
        assert_eq!(Metric::parse("top-5").unwrap(), Metric::TopK(5));
        assert_eq!(Metric::parse("hits@10").unwrap(), Metric::HitsAt(10));
        assert_eq!(
            Metric::parse("output:loss").unwrap(),
            Metric::Output("loss".into())
        );
        assert!(Metric::parse("hits@0").is_err());
        let err = Metric::parse("f1").unwrap_err().to_string();
        assert!(
            err.contains("unknown metric `f1`") && err.contains("hits@K"),
            "{err}"
        );
        assert!(!Metric::CrossEntropy.higher_is_better());
        assert!(Metric::Mrr.higher_is_better());
    }

    #[test]
    fn accuracy_ties_go_to_the_lowest_index() {
        let row = [0.5, 0.9, 0.9, 0.1];
        assert_eq!(row_score(&Metric::Accuracy, &row, 1, &[]), 1.0);
        assert_eq!(row_score(&Metric::Accuracy, &row, 2, &[]), 0.0);
        assert_eq!(row_score(&Metric::TopK(2), &row, 2, &[]), 1.0);
        assert_eq!(row_score(&Metric::TopK(2), &row, 0, &[]), 0.0);
        assert!(row_score(&Metric::Accuracy, &[f32::NAN, 1.0], 1, &[]).is_nan());
    }

    #[test]
    fn the_vectorised_exp_is_within_a_few_ulp_of_libm() {
        // Dense over [−708, 0], plus the edges; relative error against f64::exp.
        let mut worst = 0f64;
        let n = 2_000_000;
        for i in 0..=n {
            let x = -708.0 * (i as f64 / n as f64).powf(1.7);
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        for x in [0.0, -0.0, -1e-300, -0.5 * std::f64::consts::LN_2, -707.9] {
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(
            worst <= 2.0 * f64::EPSILON,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f64::NAN).is_nan());
        // Far below: tiny and positive, never negative, NaN or infinite.
        for x in [-709.0, -1e6, f64::NEG_INFINITY] {
            let e = exp_nonpositive(x);
            assert!(e > 0.0 && e < 1e-307, "{x}: {e}");
        }
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        // logits [1, 2, 3], y = 0: log(e + e^2 + e^3) - 1
        let expected = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 1.0;
        let got = row_score(&Metric::CrossEntropy, &[1.0, 2.0, 3.0], 0, &[]);
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // Large logits do not overflow.
        let got = row_score(&Metric::CrossEntropy, &[1000.0, 0.0], 0, &[]);
        assert!(got.abs() < 1e-12);
    }

    #[test]
    fn realistic_rank_counts_half_the_ties_and_honours_the_filter() {
        // true score 0.5 at index 2; one greater (0.9), two equal (0.5, 0.5).
        let row = [0.9, 0.5, 0.5, 0.5, 0.1];
        assert_eq!(realistic_rank(&row, 2, &[]), 1.0 + 1.0 + 1.0);
        // Filtering the greater one and one equal: 1 + 0 + 0.5.
        assert_eq!(realistic_rank(&row, 2, &[0, 3]), 1.5);
        // The true candidate itself in the filter list changes nothing.
        assert_eq!(realistic_rank(&row, 2, &[2]), 3.0);
        assert_eq!(row_score(&Metric::Mrr, &row, 2, &[0, 3]), 1.0 / 1.5);
        assert_eq!(row_score(&Metric::HitsAt(1), &row, 2, &[0, 3]), 0.0);
        assert_eq!(row_score(&Metric::HitsAt(2), &row, 2, &[0, 3]), 1.0);
    }

    /// Rows of `width` values from a few levels (many ties), a NaN in some rows, and
    /// their labels.
    fn tied_rows(rows: usize, width: usize) -> (Vec<f32>, Vec<i64>) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut values: Vec<f32> = (0..rows * width)
            .map(|_| (next() % 7) as f32 * 0.25 - 0.5)
            .collect();
        for r in (0..rows).step_by(37) {
            values[r * width + (next() as usize % width)] = f32::NAN;
        }
        let labels = (0..rows)
            .map(|_| (next() as usize % width) as i64)
            .collect();
        (values, labels)
    }

    #[test]
    fn ranks_match_a_direct_count_over_the_row() {
        let width = 61;
        let (values, labels) = tied_rows(200, width);
        for (row, &y) in values.chunks(width).zip(&labels) {
            let y = y as usize;
            let t = row[y];
            let nan = row.iter().any(|v| v.is_nan());
            // The definitions, one comparison at a time.
            let position = (0..width)
                .filter(|&j| row[j] > t || (row[j] == t && j < y))
                .count();
            let greater = (0..width).filter(|&j| j != y && row[j] > t).count();
            let equal = (0..width).filter(|&j| j != y && row[j] == t).count();
            let rank = 1.0 + greater as f64 + 0.5 * equal as f64;
            let top3 = row_score(&Metric::TopK(3), row, y, &[]);
            let mrr = row_score(&Metric::Mrr, row, y, &[]);
            if nan {
                assert!(top3.is_nan() && mrr.is_nan());
            } else {
                assert_eq!(top3, f64::from(u8::from(position < 3)));
                assert_eq!(mrr, 1.0 / rank);
            }
        }
    }

    #[test]
    fn one_large_batch_scores_like_single_rows() {
        // 1000 × 450 values: well over PARALLEL_WORK, so the large batch's rows are
        // scored in parallel, and single rows (even for cross-entropy) are not.
        let (rows, width) = (1000, 450);
        assert!(rows * width >= PARALLEL_WORK && width * 8 < PARALLEL_WORK);
        let (values, classes) = tied_rows(rows, width);
        let clean: Vec<f32> = values
            .iter()
            .map(|v| if v.is_nan() { 0.0 } else { *v })
            .collect();
        let classes = Labels::Classes(classes);
        let targets = Labels::Values {
            values: clean.iter().rev().map(|&v| f64::from(v) * 0.5).collect(),
            per_row: width,
        };
        // Every row filters a few other candidates (sorted, distinct, some past the row).
        let indices: Vec<i64> = (0..rows)
            .flat_map(|r| [(r % 7) as i64, (r % 7 + 9) as i64, width as i64 + 3])
            .collect();
        let filter = Filter {
            indptr: (0..=rows).map(|r| 3 * r).collect(),
            indices,
        };
        let cases = [
            (Metric::Accuracy, &classes, None),
            (Metric::TopK(5), &classes, None),
            (Metric::Mrr, &classes, None),
            (Metric::Mrr, &classes, Some(&filter)),
            (Metric::HitsAt(3), &classes, Some(&filter)),
            (Metric::CrossEntropy, &classes, None),
            (Metric::Mse, &targets, None),
            (Metric::Mae, &targets, None),
        ];
        for (metric, labels, filter) in cases {
            // With NaN rows (both NaN) and without (finite): the same bits either way.
            for (data, finite) in [(&values, false), (&clean, true)] {
                let mut whole = Accumulator::new(&metric, Some(labels), filter);
                whole.update(data, &[rows, width], 0, rows).unwrap();
                let mut single = Accumulator::new(&metric, Some(labels), filter);
                for (r, row) in data.chunks(width).enumerate() {
                    single.update(row, &[1, width], r, 1).unwrap();
                }
                let (w, s) = (whole.finish(), single.finish());
                assert_eq!(w.is_finite(), finite, "{metric:?} {filter:?}");
                assert_eq!(w.to_bits(), s.to_bits(), "{metric:?} {filter:?}");
            }
        }
    }

    #[test]
    fn accumulates_mse_mae_and_output_means() {
        let labels = Labels::Values {
            values: vec![1.0, 2.0, 3.0, 4.0],
            per_row: 2,
        };
        let mut mse = Accumulator::new(&Metric::Mse, Some(&labels), None);
        mse.update(&[1.0, 2.0], &[1, 2], 0, 1).unwrap();
        mse.update(&[5.0, 2.0], &[1, 2], 1, 1).unwrap();
        // row 0: 0; row 1: ((5-3)^2 + (2-4)^2)/2 = 4 → mean 2
        assert_eq!(mse.finish(), 2.0);
        let metric = Metric::Mae;
        let mut mae = Accumulator::new(&metric, Some(&labels), None);
        mae.update(&[1.0, 2.0, 5.0, 2.0], &[2, 2], 0, 2).unwrap();
        assert_eq!(mae.finish(), 1.0);
        let out = Metric::Output("loss".into());
        let mut o = Accumulator::new(&out, None, None);
        o.update(&[2.0], &[], 0, 3).unwrap();
        o.update(&[4.0], &[], 3, 1).unwrap();
        assert_eq!(o.finish(), (2.0 * 3.0 + 4.0) / 4.0);
    }

    #[test]
    fn out_of_range_labels_are_an_error() {
        let labels = Labels::Classes(vec![3]);
        let mut acc = Accumulator::new(&Metric::Accuracy, Some(&labels), None);
        let err = acc
            .update(&[0.1, 0.2, 0.3], &[1, 3], 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 3 of row 0"), "{err}");
        // An output with no values per row is an error, not a panic.
        let err = acc.update(&[], &[1, 0], 0, 1).unwrap_err().to_string();
        assert!(err.contains("no values per row"), "{err}");
    }
}
