//! Averaging checkpoints: running sums in `f64`, results rounded once to the
//! checkpoints' dtype.
//!
//! Every model `aswa-merge` scores or writes is the uniform mean of a set of member
//! checkpoints. [`Accumulator`] keeps the element-wise sum of the members in `f64`;
//! [`Accumulator::mean_into`] divides (optionally after adding one more checkpoint,
//! which is how ASWA's look-ahead is formed without touching the sum) and rounds once
//! to the tensor's dtype, to nearest-even. Each element is computed independently of
//! every other, so the result does not depend on how the work is split across threads,
//! nor on the vector instructions used ([`crate::simd`]). A NaN result is written as the
//! dtype's canonical quiet NaN: which NaN an addition of two NaNs returns is not fixed by
//! IEEE 754 nor by Rust, and differs between scalar and vector code.
//! Integer and boolean tensors are never averaged: they come from the newest member.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::simd::simd;
use crate::storage::dtype::{
    bf16_slice_from_f64, f16_slice_from_f64, f32_slice_from_f64, f64_slice_from_f64, zip_values,
    zip_values4, FromF64,
};
use crate::storage::{CheckpointSet, DType};
use divide::divide;

mod divide;

/// Elements per parallel work item: large enough to amortise scheduling, small enough
/// to spread one big tensor over all cores.
const CHUNK: usize = 1 << 15;

/// A float tensor's values in a checkpoint dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum FloatBuf {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl FloatBuf {
    /// A zeroed buffer of `n` elements of a float `dtype`; `None` for other dtypes.
    ///
    /// The memory comes zeroed from the allocator (fresh pages for large buffers, zeroed
    /// by the kernel when first written), not filled element by element (`vec![f16::ZERO;
    /// n]` is a `memset`: 4–5% of a mean's time).
    pub fn zeros(dtype: DType, n: usize) -> Option<Self> {
        Some(match dtype {
            DType::F16 => FloatBuf::F16(bytemuck::zeroed_vec(n)),
            DType::BF16 => FloatBuf::BF16(bytemuck::zeroed_vec(n)),
            DType::F32 => FloatBuf::F32(vec![0.0; n]),
            DType::F64 => FloatBuf::F64(vec![0.0; n]),
            _ => return None,
        })
    }

    /// The values as little-endian bytes (this crate only targets little-endian hosts).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            FloatBuf::F16(v) => bytemuck::cast_slice(v),
            FloatBuf::BF16(v) => bytemuck::cast_slice(v),
            FloatBuf::F32(v) => bytemuck::cast_slice(v),
            FloatBuf::F64(v) => bytemuck::cast_slice(v),
        }
    }
}

/// A materialised model: one buffer per float tensor, integer tensors taken from a checkpoint.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Indexed like [`CheckpointSet::specs`]; `None` for integer and boolean tensors.
    bufs: Vec<Option<FloatBuf>>,
    /// Checkpoint whose integer tensors this model carries (the newest member).
    int_source: usize,
}

impl Weights {
    /// Buffers shaped for `set`, zeroed.
    pub fn new(set: &CheckpointSet) -> Self {
        Self {
            bufs: set
                .specs()
                .iter()
                .map(|s| FloatBuf::zeros(s.dtype, s.numel()))
                .collect(),
            int_source: 0,
        }
    }
}

impl Weights {
    /// Replaces float tensor `t` with `values` rounded to its dtype (for recalibrated
    /// BatchNorm statistics).
    pub fn set_values(
        &mut self,
        set: &CheckpointSet,
        t: usize,
        values: &[f64],
    ) -> crate::Result<()> {
        let spec = &set.specs()[t];
        let wrong = || {
            crate::Error::Runtime(format!(
                "tensor `{}`: {} values computed for {} elements",
                spec.name,
                values.len(),
                spec.numel()
            ))
        };
        match self.bufs.get_mut(t).and_then(Option::as_mut) {
            Some(FloatBuf::F32(o)) if o.len() == values.len() => f32_slice_from_f64(values, o),
            Some(FloatBuf::F64(o)) if o.len() == values.len() => f64_slice_from_f64(values, o),
            Some(FloatBuf::F16(o)) if o.len() == values.len() => f16_slice_from_f64(values, o),
            Some(FloatBuf::BF16(o)) if o.len() == values.len() => bf16_slice_from_f64(values, o),
            _ => return Err(wrong()),
        }
        Ok(())
    }
}

/// How a model is made from checkpoints, for [`Weights::build`].
#[derive(Debug, Clone, Copy)]
pub enum Recipe<'a> {
    /// The uniform mean of these checkpoints.
    Mean(&'a [usize]),
    /// `e = θ₀`, then `e = decay·e + (1 − decay)·θ` over these checkpoints in order.
    Ema(&'a [usize], f64),
}

impl Weights {
    /// Builds the model `recipe` describes, streaming: each block of elements is
    /// accumulated in `f64` across the members and rounded once, so no full-model
    /// `f64` buffer is needed. Gives the same bits as [`Accumulator`] with the same
    /// operations. `recipe` must name at least one checkpoint.
    ///
    /// Resident memory does not grow with the number of members: tensors are processed
    /// in windows, the members of a window in groups of [`GROUP`] in order, and each
    /// group's bytes are released ([`CheckpointSet::release_range`]) once added, so at
    /// most one group's window of checkpoint pages is resident at a time.
    pub fn build(set: &CheckpointSet, recipe: Recipe<'_>) -> Self {
        let mut out = Weights::new(set);
        out.fill(set, recipe);
        out
    }

    /// [`Weights::build`] into these buffers (shaped for `set`), which it overwrites.
    pub fn fill(&mut self, set: &CheckpointSet, recipe: Recipe<'_>) {
        let members = match recipe {
            Recipe::Mean(m) | Recipe::Ema(m, _) => m,
        };
        assert!(!members.is_empty(), "a model needs at least one checkpoint");
        for (t, buf) in self.bufs.iter_mut().enumerate() {
            let Some(buf) = buf else { continue };
            let job = BuildJob {
                set,
                t,
                dtype: set.specs()[t].dtype,
                members,
                recipe,
            };
            match buf {
                FloatBuf::F16(o) => job.run(o),
                FloatBuf::BF16(o) => job.run(o),
                FloatBuf::F32(o) => job.run(o),
                FloatBuf::F64(o) => job.run(o),
            }
        }
        self.int_source = members.iter().copied().max().unwrap_or(0);
    }
}

/// Elements whose `f64` sums fit in the L1 cache (8 KiB).
const L1_BLOCK: usize = 1024;

/// Members [`Weights::build`] reads at once, element block by element block.
pub const GROUP: usize = 8;

/// Bytes of one group's data that one window of [`Weights::build`] covers.
const WINDOW_BYTES: usize = 8 << 20;

/// The largest page-cache folio a fault may map at once (a PMD on x86-64 with 4 KiB
/// pages): a fault can map pages up to this far outside the bytes it touched. On kernels
/// with larger pages (arm64 with 16 or 64 KiB pages) folios can be larger, and resident
/// memory may exceed what docs/performance.md measured on x86-64 (not measured there).
const FOLIO_SLACK: usize = 2 << 20;

/// One tensor of [`Weights::build`].
struct BuildJob<'a> {
    set: &'a CheckpointSet,
    t: usize,
    dtype: DType,
    members: &'a [usize],
    recipe: Recipe<'a>,
}

impl BuildJob<'_> {
    fn run<T: FromF64 + Send>(&self, out: &mut [T]) {
        let size = self.dtype.size();
        let group = self.members.len().min(GROUP);
        // Whole chunks, at least two per thread so that a window keeps every core busy.
        let window = (WINDOW_BYTES / (group * size)).max(2 * rayon::current_num_threads() * CHUNK)
            / CHUNK
            * CHUNK;
        // With more than one group, the f64 sums of a window wait for the next group.
        let mut sums = if self.members.len() > GROUP {
            vec![0f64; window.min(out.len())]
        } else {
            Vec::new()
        };
        let mut start = 0;
        for o in out.chunks_mut(window) {
            let bytes = start * size..(start + o.len()) * size;
            if sums.is_empty() {
                // One group: sum and round block by block, the sums never leave the cache.
                // Sub-blocks of L1_BLOCK elements keep the sums in the L1 cache while
                // every member is added.
                let sources = self.sources(self.members, &bytes);
                o.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                    simd(
                        #[inline(always)]
                        || {
                            let mut acc = [0f64; L1_BLOCK];
                            for (j, o) in o.chunks_mut(L1_BLOCK).enumerate() {
                                let acc = &mut acc[..o.len()];
                                self.accumulate(acc, &sources, k * CHUNK + j * L1_BLOCK, true);
                                self.round(o, acc);
                            }
                        },
                    )
                });
                self.release(self.members, &bytes);
            } else {
                let sums = &mut sums[..o.len()];
                for (g, members) in self.members.chunks(GROUP).enumerate() {
                    let sources = self.sources(members, &bytes);
                    sums.par_chunks_mut(CHUNK).enumerate().for_each(|(k, acc)| {
                        simd(
                            #[inline(always)]
                            || self.accumulate(acc, &sources, k * CHUNK, g == 0),
                        )
                    });
                    self.release(members, &bytes);
                }
                o.par_chunks_mut(CHUNK)
                    .zip(sums.par_chunks_mut(CHUNK))
                    .for_each(|(o, acc)| {
                        simd(
                            #[inline(always)]
                            || self.round(o, acc),
                        )
                    });
            }
            start += o.len();
        }
    }

    /// Byte range `bytes` of the tensor in each of `members`.
    fn sources(&self, members: &[usize], bytes: &std::ops::Range<usize>) -> Vec<&[u8]> {
        members
            .iter()
            .map(|&c| &self.set.tensor_bytes(c, self.t)[bytes.clone()])
            .collect()
    }

    /// Adds the elements of `sources` (in order) from element `at` on into `acc`;
    /// `first`: `sources[0]` starts it.
    ///
    /// Members are added four at a time where they can be: each sum is loaded and stored
    /// once per four members instead of once per member, with the same additions in the
    /// same order.
    // Inlined into `simd`'s target-feature functions, so that its loops are compiled there.
    #[inline(always)]
    fn accumulate(&self, acc: &mut [f64], sources: &[&[u8]], at: usize, first: bool) {
        match self.recipe {
            Recipe::Mean(_) => self.fold(acc, sources, at, first, |a, x| a + x),
            // e = decay·e + (1 − decay)·θ, the members in order.
            Recipe::Ema(_, decay) => self.fold(acc, sources, at, first, |e, x| {
                decay * e + (1.0 - decay) * x
            }),
        }
    }

    /// `acc = f(…f(f(acc, x₀), x₁)…, xₖ)` over the elements of `sources` from element `at`
    /// on; with `first`, `x₀` stands in for `acc`.
    #[inline(always)]
    fn fold(
        &self,
        acc: &mut [f64],
        sources: &[&[u8]],
        at: usize,
        first: bool,
        f: impl Fn(f64, f64) -> f64 + Copy,
    ) {
        let size = self.dtype.size();
        let range = at * size..(at + acc.len()) * size;
        let mut rest = sources;
        let mut start = first;
        while let [a, b, c, d, more @ ..] = rest {
            let four = [a, b, c, d].map(|s| &s[range.clone()]);
            zip_values4(self.dtype, four, acc, start, f);
            (rest, start) = (more, false);
        }
        for src in rest {
            let src = &src[range.clone()];
            if std::mem::take(&mut start) {
                zip_values(self.dtype, src, acc, |a, x| *a = x);
            } else {
                zip_values(self.dtype, src, acc, |a, x| *a = f(*a, x));
            }
        }
    }

    /// The model's values from the sums (which it overwrites with the unrounded values).
    #[inline(always)]
    fn round<T: FromF64>(&self, out: &mut [T], acc: &mut [f64]) {
        if let Recipe::Mean(m) = self.recipe {
            divide(acc, m.len() as f64);
        }
        T::round_from(acc, out);
    }

    /// Releases byte range `bytes` of the tensor in `members`, with the folio slack
    /// around it.
    fn release(&self, members: &[usize], bytes: &std::ops::Range<usize>) {
        for &c in members {
            self.set
                .release_range(c, self.t, bytes.clone(), FOLIO_SLACK);
        }
    }
}

/// A model to score or write: a checkpoint as it is on disk, or a materialised average.
#[derive(Debug, Clone, Copy)]
pub enum Candidate<'a> {
    Checkpoint(usize),
    Average(&'a Weights),
}

impl<'a> Candidate<'a> {
    /// The bytes of tensor `t` (in the checkpoints' dtype).
    pub fn tensor_bytes(&self, set: &'a CheckpointSet, t: usize) -> &'a [u8] {
        match self {
            Candidate::Checkpoint(c) => set.tensor_bytes(*c, t),
            Candidate::Average(w) => match &w.bufs[t] {
                Some(buf) => buf.as_bytes(),
                None => set.tensor_bytes(w.int_source, t),
            },
        }
    }
}

/// The `f64` sum of member checkpoints and their count: the model it stands for is
/// `sum / count`. ASWA keeps one to form look-aheads without re-reading the members;
/// strategies that only need their result use [`Weights::build`], which streams.
#[derive(Debug)]
pub struct Accumulator {
    sums: Vec<Option<Vec<f64>>>,
    members: Vec<usize>,
    total: f64,
}

impl Accumulator {
    /// An empty accumulator shaped for `set` (allocates one `f64` per float parameter).
    pub fn new(set: &CheckpointSet) -> Self {
        Self {
            sums: set
                .specs()
                .iter()
                .map(|s| s.dtype.is_float().then(|| vec![0.0; s.numel()]))
                .collect(),
            members: Vec::new(),
            total: 0.0,
        }
    }

    /// Member checkpoints, in the order they were added.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Makes checkpoint `c` the only member.
    pub fn reset(&mut self, set: &CheckpointSet, c: usize) {
        self.apply(set, c, |s, x| *s = x);
        self.members.clear();
        self.members.push(c);
        self.total = 1.0;
    }

    /// Adds checkpoint `c` as a member with weight 1.
    pub fn add(&mut self, set: &CheckpointSet, c: usize) {
        self.apply(set, c, |s, x| *s += x);
        self.members.push(c);
        self.total += 1.0;
    }

    fn apply(&mut self, set: &CheckpointSet, c: usize, f: impl Fn(&mut f64, f64) + Sync) {
        for (t, sum) in self.sums.iter_mut().enumerate() {
            let Some(sum) = sum else { continue };
            let dtype = set.specs()[t].dtype;
            let bytes = set.tensor_bytes(c, t);
            sum.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * dtype.size()))
                .for_each(|(s, b)| {
                    simd(
                        #[inline(always)]
                        || zip_values(dtype, b, s, &f),
                    )
                });
        }
    }

    /// Writes the model (`sum / total`), or the mean with `extra` added with weight 1 if
    /// given, rounded to each tensor's dtype, into `out`. With no members and no `extra`
    /// this is a programming error.
    pub fn mean_into(&self, set: &CheckpointSet, extra: Option<usize>, out: &mut Weights) {
        let n = self.total + if extra.is_some() { 1.0 } else { 0.0 };
        assert!(n > 0.0, "mean of an empty set");
        for (t, (sum, buf)) in self.sums.iter().zip(out.bufs.iter_mut()).enumerate() {
            let (Some(sum), Some(buf)) = (sum, buf) else {
                continue;
            };
            let dtype = set.specs()[t].dtype;
            let extra_bytes = extra.map(|c| set.tensor_bytes(c, t));
            match buf {
                FloatBuf::F16(o) => mean_chunks(o, sum, dtype, extra_bytes, n),
                FloatBuf::BF16(o) => mean_chunks(o, sum, dtype, extra_bytes, n),
                FloatBuf::F32(o) => mean_chunks(o, sum, dtype, extra_bytes, n),
                FloatBuf::F64(o) => mean_chunks(o, sum, dtype, extra_bytes, n),
            }
        }
        out.int_source = extra
            .into_iter()
            .chain(self.members.iter().copied())
            .max()
            .unwrap_or(0);
    }
}

fn mean_chunks<T: FromF64 + Send>(
    out: &mut [T],
    sum: &[f64],
    dtype: DType,
    extra: Option<&[u8]>,
    n: f64,
) {
    let size = dtype.size();
    out.par_chunks_mut(CHUNK)
        .zip(sum.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(k, (o, s))| {
            simd(
                #[inline(always)]
                || {
                    // Block by block, so that the values stay in the L1 cache until rounded.
                    let mut acc = [0f64; L1_BLOCK];
                    let blocks = o.chunks_mut(L1_BLOCK).zip(s.chunks(L1_BLOCK));
                    for (j, (o, s)) in blocks.enumerate() {
                        let acc = &mut acc[..o.len()];
                        acc.copy_from_slice(s);
                        if let Some(bytes) = extra {
                            let at = (k * CHUNK + j * L1_BLOCK) * size;
                            let b = &bytes[at..at + o.len() * size];
                            zip_values(dtype, b, acc, |a, x| *a += x);
                        }
                        divide(acc, n);
                        T::round_from(acc, o);
                    }
                },
            )
        });
}
