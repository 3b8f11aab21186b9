//! Averaging checkpoints: running sums in `f64`, results rounded once to the
//! checkpoints' dtype.
//!
//! Every model `aswa-merge` scores or writes is the uniform mean of a set of member
//! checkpoints. [`Accumulator`] keeps the element-wise sum of the members in `f64`;
//! [`Accumulator::mean_into`] divides (optionally after adding one more checkpoint,
//! which is how ASWA's look-ahead is formed without touching the sum) and rounds once
//! to the tensor's dtype, to nearest-even. Each element is computed independently of
//! every other, so the result does not depend on how the work is split across threads.
//! Integer and boolean tensors are never averaged: they come from the newest member.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::storage::dtype::{bf16_from_f64, f16_from_f64};
use crate::storage::{CheckpointSet, DType};

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
    pub fn zeros(dtype: DType, n: usize) -> Option<Self> {
        Some(match dtype {
            DType::F16 => FloatBuf::F16(vec![f16::ZERO; n]),
            DType::BF16 => FloatBuf::BF16(vec![bf16::ZERO; n]),
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
            Some(FloatBuf::F32(o)) if o.len() == values.len() => {
                o.iter_mut().zip(values).for_each(|(o, v)| *o = *v as f32)
            }
            Some(FloatBuf::F64(o)) if o.len() == values.len() => o.copy_from_slice(values),
            Some(FloatBuf::F16(o)) if o.len() == values.len() => o
                .iter_mut()
                .zip(values)
                .for_each(|(o, v)| *o = f16_from_f64(*v)),
            Some(FloatBuf::BF16(o)) if o.len() == values.len() => o
                .iter_mut()
                .zip(values)
                .for_each(|(o, v)| *o = bf16_from_f64(*v)),
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
    pub fn build(set: &CheckpointSet, recipe: Recipe<'_>) -> Self {
        let mut out = Weights::new(set);
        let members = match recipe {
            Recipe::Mean(m) | Recipe::Ema(m, _) => m,
        };
        assert!(!members.is_empty(), "a model needs at least one checkpoint");
        for (t, buf) in out.bufs.iter_mut().enumerate() {
            let Some(buf) = buf else { continue };
            let dtype = set.specs()[t].dtype;
            let sources: Vec<&[u8]> = members.iter().map(|&c| set.tensor_bytes(c, t)).collect();
            match buf {
                FloatBuf::F16(o) => build_chunks(o, dtype, &sources, recipe, f16_from_f64),
                FloatBuf::BF16(o) => build_chunks(o, dtype, &sources, recipe, bf16_from_f64),
                FloatBuf::F32(o) => build_chunks(o, dtype, &sources, recipe, |v| v as f32),
                FloatBuf::F64(o) => build_chunks(o, dtype, &sources, recipe, |v| v),
            }
        }
        out.int_source = members.iter().copied().max().unwrap_or(0);
        out
    }
}

fn build_chunks<T: Send>(
    out: &mut [T],
    dtype: DType,
    sources: &[&[u8]],
    recipe: Recipe<'_>,
    round: impl Fn(f64) -> T + Sync,
) {
    let size = dtype.size();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
        let range = k * CHUNK * size..(k * CHUNK + o.len()) * size;
        let mut acc = vec![0f64; o.len()];
        for_each_value(dtype, &sources[0][range.clone()], |i, x| acc[i] = x);
        match recipe {
            Recipe::Mean(m) => {
                for src in &sources[1..] {
                    for_each_value(dtype, &src[range.clone()], |i, x| acc[i] += x);
                }
                let n = m.len() as f64;
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = round(a / n);
                }
            }
            Recipe::Ema(_, decay) => {
                for src in &sources[1..] {
                    // As Accumulator::ema_step with a total of 1.
                    for_each_value(dtype, &src[range.clone()], |i, x| {
                        acc[i] = decay * acc[i] + (1.0 - decay) * x
                    });
                }
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = round(*a);
                }
            }
        }
    });
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
                .for_each(|(s, b)| for_each_value(dtype, b, |i, x| f(&mut s[i], x)));
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
                FloatBuf::F16(o) => mean_chunks(o, sum, dtype, extra_bytes, n, f16_from_f64),
                FloatBuf::BF16(o) => mean_chunks(o, sum, dtype, extra_bytes, n, bf16_from_f64),
                FloatBuf::F32(o) => mean_chunks(o, sum, dtype, extra_bytes, n, |v| v as f32),
                FloatBuf::F64(o) => mean_chunks(o, sum, dtype, extra_bytes, n, |v| v),
            }
        }
        out.int_source = extra
            .into_iter()
            .chain(self.members.iter().copied())
            .max()
            .unwrap_or(0);
    }
}

fn mean_chunks<T: Send>(
    out: &mut [T],
    sum: &[f64],
    dtype: DType,
    extra: Option<&[u8]>,
    n: f64,
    round: impl Fn(f64) -> T + Sync,
) {
    match extra {
        None => out
            .par_chunks_mut(CHUNK)
            .zip(sum.par_chunks(CHUNK))
            .for_each(|(o, s)| {
                for (o, s) in o.iter_mut().zip(s) {
                    *o = round(s / n);
                }
            }),
        Some(bytes) => out
            .par_chunks_mut(CHUNK)
            .zip(sum.par_chunks(CHUNK))
            .zip(bytes.par_chunks(CHUNK * dtype.size()))
            .for_each(|((o, s), b)| for_each_value(dtype, b, |i, x| o[i] = round((s[i] + x) / n))),
    }
}

/// Calls `f(i, value)` for every element of little-endian float `bytes` (any alignment).
#[inline]
fn for_each_value(dtype: DType, bytes: &[u8], mut f: impl FnMut(usize, f64)) {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .enumerate()
            .for_each(|(i, c)| f(i, f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)),
        DType::F64 => bytes.chunks_exact(8).enumerate().for_each(|(i, c)| {
            f(
                i,
                f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            )
        }),
        DType::F16 => bytes
            .chunks_exact(2)
            .enumerate()
            .for_each(|(i, c)| f(i, f64::from(f16::from_le_bytes([c[0], c[1]]).to_f32()))),
        // bf16 is the upper half of an f32: widening is a shift, exact for every value.
        DType::BF16 => bytes.chunks_exact(2).enumerate().for_each(|(i, c)| {
            f(
                i,
                f64::from(f32::from_bits(
                    u32::from(u16::from_le_bytes([c[0], c[1]])) << 16,
                )),
            )
        }),
        _ => {}
    }
}
