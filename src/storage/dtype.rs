//! Element types of checkpoint tensors and the conversions between them.
//!
//! Floating tensors are averaged; integer and boolean tensors (step counters such as
//! BatchNorm's `num_batches_tracked`) never are. Conversions to and from `f64` are
//! exact where the target can hold the value and round to nearest-even otherwise.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::simd::{self, simd};
use safetensors::Dtype;

/// The element types `aswa-merge` accepts in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    /// Maps a safetensors dtype; `None` for the ones we cannot average or copy
    /// faithfully (fp8/fp4/fp6 variants, complex).
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        Some(match dtype {
            Dtype::BOOL => DType::Bool,
            Dtype::U8 => DType::U8,
            Dtype::I8 => DType::I8,
            Dtype::I16 => DType::I16,
            Dtype::U16 => DType::U16,
            Dtype::I32 => DType::I32,
            Dtype::U32 => DType::U32,
            Dtype::I64 => DType::I64,
            Dtype::U64 => DType::U64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            _ => return None,
        })
    }

    /// The name used in safetensors headers (`"F32"`, `"BF16"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Floating tensors are averaged; all others are copied from the newest member.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Reads element `i` of little-endian float bytes of type `dtype` as `f64` (exact).
/// `bytes` needs no alignment. Callers guarantee `dtype.is_float()` and bounds.
#[inline]
pub(crate) fn read_f64(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    match dtype {
        DType::F32 => f32::from_le_bytes(le::<4>(bytes, i)) as f64,
        DType::F64 => f64::from_le_bytes(le::<8>(bytes, i)),
        DType::F16 => f64::from(f32_from_f16_bits(u16::from_le_bytes(le::<2>(bytes, i)))),
        DType::BF16 => bf16::from_bits(u16::from_le_bytes(le::<2>(bytes, i))).to_f64(),
        _ => f64::NAN,
    }
}

#[inline]
fn le<const N: usize>(bytes: &[u8], i: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[i * N..(i + 1) * N]);
    out
}

/// The `f16` with bits `h` as an `f32` (exact for every value; a NaN keeps its sign and
/// payload and comes out quiet, as F16C's `vcvtph2ps` makes it), without branches or
/// lookups so that loops over it vectorise. (`half`'s `f16::to_f32` checks for the F16C
/// instructions on every call, which keeps such loops scalar.)
#[inline(always)]
pub fn f32_from_f16_bits(h: u16) -> f32 {
    let h = u32::from(h);
    // Normal values: the exponent rebiased (15 → 127) and the mantissa moved up. Infinities
    // and NaN get the f32 top exponent instead (mantissa, so NaN payload, kept), NaN the
    // quiet bit.
    let normal = ((h & 0x7fff) << 13) + ((127 - 15) << 23);
    let quiet = if h & 0x3ff != 0 { 0x0040_0000 } else { 0 };
    let special = if h & 0x7c00 == 0x7c00 {
        0x7f80_0000 | quiet
    } else {
        0
    };
    // Zeros and subnormals, 0.m × 2⁻¹⁴: (1.m − 1) × 2⁻¹⁴, one exact subtraction of two
    // normal f32 (an f32 subnormal operand would make the CPU take its slow path for the
    // whole vector).
    let one_m = f32::from_bits(((h & 0x3ff) << 13) | ((127 - 14) << 23));
    let subnormal = one_m - f32::from_bits((127 - 14) << 23);
    let magnitude = if h & 0x7c00 == 0 {
        subnormal.to_bits()
    } else {
        normal | special
    };
    f32::from_bits(magnitude | ((h & 0x8000) << 16))
}

/// `v` rounded once to `f16`, to nearest-even, for every `f64`: subnormals, overflow to
/// infinity, and every NaN to the canonical quiet NaN ([`f16::NAN`]). (`half`'s
/// `f16::from_f64` rounds some values just above a tie down, e.g. 2⁻²⁵ + 2⁻⁷⁷ to 0
/// instead of 2⁻²⁴.)
#[inline(always)]
pub fn f16_from_f64(v: f64) -> f16 {
    f16::from_bits(round16::<10, 15>(v))
}

/// `v` rounded once to `bf16`, to nearest-even, for every `f64`: subnormals, overflow to
/// infinity, and every NaN to the canonical quiet NaN ([`bf16::NAN`]). (`half`'s
/// `bf16::from_f64` rounds through `f32` and can be off by one unit at a tie created by
/// the first rounding.)
#[inline(always)]
pub fn bf16_from_f64(v: f64) -> bf16 {
    bf16::from_bits(round16::<7, 127>(v))
}

/// `values` rounded into `out`, each as [`bf16_from_f64`] rounds it: see [`f16_slice_from_f64`].
#[inline(always)]
pub fn bf16_slice_from_f64(values: &[f64], out: &mut [bf16]) {
    round_slice::<7, 127>(values, bytemuck::cast_slice_mut(out))
}

/// `values` rounded into `out`, each as [`f16_from_f64`] rounds it, faster: 16 values at a
/// time by the finite-range rounding alone, the group again with infinities and NaN when
/// one of them needs it (rare in averaged weights).
#[inline(always)]
pub fn f16_slice_from_f64(values: &[f64], out: &mut [f16]) {
    round_slice::<10, 15>(values, bytemuck::cast_slice_mut(out))
}

/// The loop of [`f16_slice_from_f64`] and [`bf16_slice_from_f64`].
#[inline(always)]
fn round_slice<const MANT: u32, const BIAS: u64>(values: &[f64], out: &mut [u16]) {
    for (o, v) in out.chunks_mut(16).zip(values.chunks(16)) {
        let mut finite = true;
        for (o, &v) in o.iter_mut().zip(v) {
            let (bits, ok) = round_finite::<MANT, BIAS>(v);
            *o = bits;
            finite &= ok;
        }
        if !finite {
            o.iter_mut()
                .zip(v)
                .for_each(|(o, &v)| *o = round16::<MANT, BIAS>(v));
        }
    }
}

/// `v` rounded to nearest-even into the bits of a 16-bit float with `MANT` mantissa bits
/// and exponent bias `BIAS`, for every `f64`, without branches (so that loops over it
/// vectorise): [`round_finite`], and infinity or the canonical quiet NaN where that is
/// not the result.
#[inline(always)]
fn round16<const MANT: u32, const BIAS: u64>(v: f64) -> u16 {
    let (bits, finite) = round_finite::<MANT, BIAS>(v);
    let inf = ((1u16 << (15 - MANT)) - 1) << MANT;
    // (`bits` holds garbage where `finite` is false: the sign comes from `v`.)
    let special = if v.is_nan() {
        inf | (1 << (MANT - 1))
    } else {
        ((v.to_bits() >> 48) as u16 & 0x8000) | inf
    };
    if finite {
        bits
    } else {
        special
    }
}

/// `v` rounded to nearest-even into the bits of a 16-bit float with `MANT` mantissa bits
/// and exponent bias `BIAS`, by integer arithmetic and one addition, and whether that
/// result is right: it is unless `v` rounds to infinity or is infinite or NaN.
#[inline(always)]
fn round_finite<const MANT: u32, const BIAS: u64>(v: f64) -> (u16, bool) {
    let bits = v.to_bits();
    let a = bits & !(1 << 63);
    let shift = 52 - MANT;
    // Normal results: adding just under half a unit of the result, and one more when its
    // last kept bit is odd, carries into the kept bits exactly when rounding to
    // nearest-even rounds up; a carry out of the mantissa raises the exponent, as it should.
    let r = (a + (1 << (shift - 1)) - 1 + ((a >> shift) & 1)) >> shift;
    let normal = r.wrapping_sub((1023 - BIAS) << MANT);
    // Below the smallest normal the format's values are the multiples of its smallest
    // subnormal, 2^(1 − BIAS − MANT), whose count is the result's bits. Adding
    // 2^(53 − BIAS − MANT), where the f64 spacing is that subnormal, rounds |v| to one of
    // them, to nearest-even (one IEEE addition); the count is in the sum's low bits.
    let magic = f64::from_bits((1023 + 53 - BIAS - u64::from(MANT)) << 52);
    let subnormal = (f64::from_bits(a) + magic).to_bits() - magic.to_bits();
    let magnitude = if a < (1024 - BIAS) << 52 {
        subnormal
    } else {
        normal
    };
    let finite = r < (1024 + BIAS) << MANT;
    ((((bits >> 48) & 0x8000) | magnitude) as u16, finite)
}

/// A little-endian f16 as an `f32` (exact).
#[inline(always)]
fn f16_le(b: [u8; 2]) -> f32 {
    f32_from_f16_bits(u16::from_le_bytes(b))
}

/// A little-endian f32 as an `f64` (exact).
#[inline(always)]
fn f32_le_f64(b: [u8; 4]) -> f64 {
    f64::from(f32::from_le_bytes(b))
}

/// A little-endian bf16 as an `f32`: bf16 is the upper half of an f32, so widening is a
/// shift, exact for every value.
#[inline(always)]
fn bf16_le(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

/// Calls `f(acc[i], value_i)` for the little-endian float values in `bytes` (any
/// alignment), element by element. The loops are over typed slices without indexing, so
/// the compiler can vectorise them.
#[inline(always)]
pub(crate) fn zip_values(dtype: DType, bytes: &[u8], acc: &mut [f64], f: impl Fn(&mut f64, f64)) {
    #[inline(always)]
    fn each<const N: usize>(
        bytes: &[u8],
        acc: &mut [f64],
        decode: impl Fn([u8; N]) -> f64,
        f: impl Fn(&mut f64, f64),
    ) {
        for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(N)) {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            f(a, decode(b));
        }
    }
    match dtype {
        DType::F32 => each(bytes, acc, f32_le_f64, f),
        DType::F64 => each(bytes, acc, f64::from_le_bytes, f),
        DType::F16 => {
            let (acc, [bytes]) = f16_in_registers(acc, [bytes], |s, [x]| f(s, x));
            if acc.is_empty() {
                return;
            }
            let mut wide = [0f32; F16_BLOCK];
            for (acc, bytes) in acc.chunks_mut(F16_BLOCK).zip(bytes.chunks(2 * F16_BLOCK)) {
                let values = f16s_as_f32(bytes, &mut wide);
                each(values, acc, f32_le_f64, &f);
            }
        }
        DType::BF16 => each(bytes, acc, |b| f64::from(bf16_le(b)), f),
        _ => {}
    }
}

/// Calls `f(&mut acc[i], [value_i of each source])` for the little-endian f16 values of
/// `sources`, eight at a time widened in registers ([`simd::F16x8`]), as far as whole
/// groups of eight go where the CPU can; returns the elements left (all of them at the
/// baseline level) and the sources' bytes for them.
#[inline(always)]
fn f16_in_registers<'a, 'b, const K: usize>(
    acc: &'a mut [f64],
    sources: [&'b [u8]; K],
    f: impl Fn(&mut f64, [f64; K]),
) -> (&'a mut [f64], [&'b [u8]; K]) {
    let Some(widen) = simd::F16x8::new() else {
        return (acc, sources);
    };
    let whole = sources.iter().fold(acc.len(), |n, s| n.min(s.len() / 2)) / 8 * 8;
    let (head, rest) = acc.split_at_mut(whole);
    // Each source's first `whole` values as groups of eight (16 bytes).
    let groups = sources.map(|s| s[..2 * whole].as_chunks::<16>().0);
    // Plain loops inside, not `array::map`: its closure would be compiled outside
    // `simd`'s target-feature function, where the widening cannot be inlined.
    let mut x = [[0f64; 8]; K];
    for (i, s) in head.chunks_exact_mut(8).enumerate() {
        for (x, g) in x.iter_mut().zip(&groups) {
            *x = widen.widen(&g[i]);
        }
        for (l, s) in s.iter_mut().enumerate() {
            let mut lane = [0f64; K];
            for (v, x) in lane.iter_mut().zip(&x) {
                *v = x[l];
            }
            f(s, lane);
        }
    }
    (rest, sources.map(|s| &s[2 * whole..]))
}

/// Elements of f16 widened at a time, into an `f32` block on the stack, before they are
/// added (1 KiB a source), where [`f16_in_registers`] cannot.
const F16_BLOCK: usize = 256;

/// The little-endian f16 values in `bytes` (as many as `wide` holds) widened into
/// `wide`, as little-endian f32 bytes (the crate targets little-endian machines only).
#[inline(always)]
fn f16s_as_f32<'a>(bytes: &[u8], wide: &'a mut [f32]) -> &'a [u8] {
    let n = widen_f16s(bytes, wide);
    bytemuck::cast_slice(&wide[..n])
}

/// The first `n = min(out.len(), bytes.len() / 2)` little-endian f16 values of `bytes`
/// widened exactly into `out` ([`simd::widen_f16`]'s F16C instruction, or
/// [`f32_from_f16_bits`]: the same values); returns `n`.
#[inline(always)]
fn widen_f16s(bytes: &[u8], out: &mut [f32]) -> usize {
    let n = out.len().min(bytes.len() / 2);
    let (bytes, out) = (&bytes[..2 * n], &mut out[..n]);
    if !simd::widen_f16(bytes, out) {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = f16_le([c[0], c[1]]);
        }
    }
    n
}

/// `acc[i] = f(f(f(f(acc[i], a_i), b_i), c_i), d_i)` for the little-endian float values
/// `a_i`, `b_i`, `c_i`, `d_i` of the four `sources` (with `start`, `a_i` stands in for
/// `acc[i]`): four members added with one load and one store of each sum.
#[inline(always)]
pub(crate) fn zip_values4(
    dtype: DType,
    sources: [&[u8]; 4],
    acc: &mut [f64],
    start: bool,
    f: impl Fn(f64, f64) -> f64,
) {
    #[inline(always)]
    fn each<const N: usize>(
        [a, b, c, d]: [&[u8]; 4],
        acc: &mut [f64],
        start: bool,
        decode: impl Fn([u8; N]) -> f64,
        f: impl Fn(f64, f64) -> f64,
    ) {
        let value = |c: &[u8]| {
            let mut e = [0u8; N];
            e.copy_from_slice(c);
            decode(e)
        };
        let rows = acc
            .iter_mut()
            .zip(a.chunks_exact(N))
            .zip(b.chunks_exact(N))
            .zip(c.chunks_exact(N))
            .zip(d.chunks_exact(N));
        if start {
            for ((((s, a), b), c), d) in rows {
                *s = f(f(f(value(a), value(b)), value(c)), value(d));
            }
        } else {
            for ((((s, a), b), c), d) in rows {
                *s = f(f(f(f(*s, value(a)), value(b)), value(c)), value(d));
            }
        }
    }
    match dtype {
        DType::F32 => each(sources, acc, start, f32_le_f64, f),
        DType::F64 => each(sources, acc, start, f64::from_le_bytes, f),
        DType::F16 => {
            let (acc, sources) = f16_in_registers(acc, sources, |s, [a, b, c, d]| {
                let first = if start { a } else { f(*s, a) };
                *s = f(f(f(first, b), c), d);
            });
            if acc.is_empty() {
                return;
            }
            let ([a, b, c, d], [wa, wb, wc, wd]) = (sources, &mut [[0f32; F16_BLOCK]; 4]);
            let blocks = acc
                .chunks_mut(F16_BLOCK)
                .zip(a.chunks(2 * F16_BLOCK))
                .zip(b.chunks(2 * F16_BLOCK))
                .zip(c.chunks(2 * F16_BLOCK))
                .zip(d.chunks(2 * F16_BLOCK));
            for ((((acc, a), b), c), d) in blocks {
                let values = [
                    f16s_as_f32(a, wa),
                    f16s_as_f32(b, wb),
                    f16s_as_f32(c, wc),
                    f16s_as_f32(d, wd),
                ];
                each(values, acc, start, f32_le_f64, &f);
            }
        }
        DType::BF16 => each(sources, acc, start, |b| f64::from(bf16_le(b)), f),
        _ => {}
    }
}

/// `values` rounded to nearest-even into `out`, NaN made canonical ([`f32::NAN`]).
#[inline(always)]
pub fn f32_slice_from_f64(values: &[f64], out: &mut [f32]) {
    out.iter_mut()
        .zip(values)
        .for_each(|(o, v)| *o = if v.is_nan() { f32::NAN } else { *v as f32 });
}

/// A float element type that `f64` values are rounded into, once, to nearest-even, NaN
/// made canonical: the `*_slice_from_f64` functions as one static call for generic
/// kernels (a function passed as a value may be left out of line, compiled for the
/// baseline outside [`simd`]'s target-feature functions).
pub trait FromF64: Sized {
    /// `values` rounded into `out`.
    fn round_from(values: &[f64], out: &mut [Self]);
}

/// `impl FromF64` for each float type by its rounding function.
macro_rules! from_f64 {
    ($($t:ty => $round:ident),*) => {$(
        impl FromF64 for $t {
            #[inline(always)]
            fn round_from(values: &[f64], out: &mut [Self]) {
                $round(values, out)
            }
        }
    )*};
}

from_f64!(
    f16 => f16_slice_from_f64,
    bf16 => bf16_slice_from_f64,
    f32 => f32_slice_from_f64,
    f64 => f64_slice_from_f64
);

/// `values` into `out` (nothing to round), NaN made canonical ([`f64::NAN`]).
#[inline(always)]
pub fn f64_slice_from_f64(values: &[f64], out: &mut [f64]) {
    out.iter_mut()
        .zip(values)
        .for_each(|(o, v)| *o = if v.is_nan() { f64::NAN } else { *v });
}

/// Elements converted per block (its `f64` values stay in the L1 cache).
const BLOCK: usize = 1024;

/// Elements per parallel work item of a conversion.
const PAR_CHUNK: usize = 1 << 15;

/// Converts the little-endian float bytes of `from` (any alignment) into `out`: the values
/// widened exactly to `f64` a block at a time, then `finish`ed (rounded) into `out`; in
/// parallel chunks, vectorised ([`simd`]). `from` must be a float type.
fn convert<T: Send>(
    from: DType,
    bytes: &[u8],
    out: &mut [T],
    finish: impl Fn(&[f64], &mut [T]) + Sync,
) {
    let size = from.size();
    out.par_chunks_mut(PAR_CHUNK)
        .zip(bytes.par_chunks(PAR_CHUNK * size))
        .for_each(|(o, b)| {
            simd(
                #[inline(always)]
                || {
                    let mut block = [0f64; BLOCK];
                    for (o, b) in o.chunks_mut(BLOCK).zip(b.chunks(BLOCK * size)) {
                        let block = &mut block[..o.len()];
                        zip_values(from, b, block, |a, x| *a = x);
                        finish(block, o);
                    }
                },
            )
        });
}

/// Converts little-endian float bytes of `from` into `f32` values (exact for f16,
/// bf16 and f32; rounded to nearest-even for f64).
pub fn to_f32(from: DType, bytes: &[u8], out: &mut [f32]) {
    match from {
        // Exact in f32 directly: no f64 step.
        DType::F16 => widen::<2, _>(bytes, out, |b, o| {
            widen_f16s(b, o);
        }),
        DType::BF16 => widen::<2, _>(bytes, out, |b, o| each_value(b, o, bf16_le)),
        _ => convert(from, bytes, out, f32_slice_from_f64),
    }
}

/// `widen(chunk of bytes, chunk of out)` over parallel chunks of `out` and the `N`-byte
/// elements of `bytes` they correspond to, at the widest vector level.
#[inline(always)]
fn widen<const N: usize, T: Send>(
    bytes: &[u8],
    out: &mut [T],
    widen: impl Fn(&[u8], &mut [T]) + Sync,
) {
    out.par_chunks_mut(PAR_CHUNK)
        .zip(bytes.par_chunks(PAR_CHUNK * N))
        .for_each(|(o, b)| {
            simd(
                #[inline(always)]
                || widen(b, o),
            )
        });
}

/// `out[i] = decode(element i of bytes)` for `N`-byte elements (vectorises).
#[inline(always)]
fn each_value<const N: usize, T>(bytes: &[u8], out: &mut [T], decode: impl Fn([u8; N]) -> T) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        let mut e = [0u8; N];
        e.copy_from_slice(c);
        *o = decode(e);
    }
}

/// Converts little-endian float bytes of `from` into `f16` values (round to nearest-even).
pub fn to_f16(from: DType, bytes: &[u8], out: &mut [f16]) {
    convert(from, bytes, out, f16_slice_from_f64);
}

/// Converts little-endian float bytes of `from` into `bf16` values (round to nearest-even).
pub fn to_bf16(from: DType, bytes: &[u8], out: &mut [bf16]) {
    convert(from, bytes, out, bf16_slice_from_f64);
}

/// Converts little-endian float bytes of `from` into `f64` values (exact).
pub fn to_f64(from: DType, bytes: &[u8], out: &mut [f64]) {
    convert(from, bytes, out, f64_slice_from_f64);
}

/// `v` rounded to float type `to` and widened back (what a tensor of type `to` holds
/// for the value `v`).
pub(crate) fn rounded_to(to: DType, v: f64) -> f64 {
    match to {
        DType::F32 => f64::from(v as f32),
        DType::F16 => f16_from_f64(v).to_f64(),
        DType::BF16 => bf16_from_f64(v).to_f64(),
        _ => v,
    }
}

/// Writes the transpose of the row-major `rows` × `cols` matrix in `bytes` (elements of
/// `size` bytes) into `out` (`cols` × `rows`), in tiles that stay in the cache.
pub fn transpose_into(bytes: &[u8], rows: usize, cols: usize, size: usize, out: &mut [u8]) {
    const TILE: usize = 32;
    debug_assert_eq!(bytes.len(), rows * cols * size);
    debug_assert_eq!(out.len(), bytes.len());
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    let from = (r * cols + c) * size;
                    let to = (c * rows + r) * size;
                    out[to..to + size].copy_from_slice(&bytes[from..from + size]);
                }
            }
        }
    }
}

/// Float bytes of type `from` as bytes of float type `to` (a copy when they match;
/// rounded to nearest-even when `to` is narrower).
pub fn convert_bytes(from: DType, to: DType, bytes: &[u8]) -> Vec<u8> {
    if from == to || !from.is_float() {
        return bytes.to_vec();
    }
    let n = bytes.len() / from.size();
    match to {
        DType::F32 => {
            let mut out = vec![0f32; n];
            to_f32(from, bytes, &mut out);
            bytemuck::cast_slice(&out).to_vec()
        }
        DType::F64 => {
            let mut out = vec![0f64; n];
            to_f64(from, bytes, &mut out);
            bytemuck::cast_slice(&out).to_vec()
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; n];
            to_f16(from, bytes, &mut out);
            bytemuck::cast_slice(&out).to_vec()
        }
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; n];
            to_bf16(from, bytes, &mut out);
            bytemuck::cast_slice(&out).to_vec()
        }
        // Integer tensors are only ever bound to their own type.
        _ => bytes.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_each_value_as_the_scalar_functions_do() {
        // Unaligned input (offset 1) longer than one parallel chunk, every kind of value.
        let values = around_every_value(|b| f16::from_bits(b).to_f64());
        for from in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let mut bytes = vec![0u8];
            for &v in &values {
                match from {
                    DType::F16 => bytes.extend(f16_from_f64(v).to_le_bytes()),
                    DType::BF16 => bytes.extend(bf16_from_f64(v).to_le_bytes()),
                    DType::F32 => bytes.extend((v as f32).to_le_bytes()),
                    _ => bytes.extend(v.to_le_bytes()),
                }
            }
            let bytes = &bytes[1..];
            let n = values.len();
            assert!(n > PAR_CHUNK);
            let exact: Vec<f64> = (0..n).map(|i| read_f64(from, bytes, i)).collect();
            let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            let mut f32s = vec![0f32; n];
            to_f32(from, bytes, &mut f32s);
            let mut f16s = vec![f16::ZERO; n];
            to_f16(from, bytes, &mut f16s);
            let mut bf16s = vec![bf16::ZERO; n];
            to_bf16(from, bytes, &mut bf16s);
            let mut f64s = vec![0f64; n];
            to_f64(from, bytes, &mut f64s);
            for (i, &v) in exact.iter().enumerate() {
                assert!(
                    same(f64::from(f32s[i]), f64::from(v as f32)),
                    "{from:?} {v:e} to f32"
                );
                assert!(
                    same(f16s[i].to_f64(), f16_from_f64(v).to_f64()),
                    "{from:?} {v:e} to f16"
                );
                assert!(
                    same(bf16s[i].to_f64(), bf16_from_f64(v).to_f64()),
                    "{from:?} {v:e} to bf16"
                );
                assert!(same(f64s[i], v), "{from:?} {v:e} to f64");
            }
        }
    }

    #[test]
    fn f16_widening_is_exact_for_every_bit_pattern() {
        for h in 0..=u16::MAX {
            let (ours, reference) = (f32_from_f16_bits(h), f16::from_bits(h).to_f32());
            if reference.is_nan() {
                // A NaN stays a NaN, with its sign and payload, and comes out quiet.
                assert_eq!(ours.to_bits(), reference.to_bits() | 0x0040_0000, "{h:#x}");
            } else {
                assert_eq!(ours.to_bits(), reference.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn f16c_widening_gives_the_portable_bits_for_every_pattern() {
        // Every pattern, from an odd byte offset (unaligned) and with a tail of fewer than
        // eight values.
        let mut bytes = vec![0u8];
        bytes.extend((0..=u16::MAX).flat_map(u16::to_le_bytes));
        bytes.extend([0x01, 0x7c, 0x00, 0x3c, 0xff, 0x03]);
        let bytes = &bytes[1..];
        let portable: Vec<u32> = bytes
            .chunks_exact(2)
            .map(|c| f32_from_f16_bits(u16::from_le_bytes([c[0], c[1]])).to_bits())
            .collect();
        let mut out = vec![0f32; portable.len()];
        let used = simd::widen_f16(bytes, &mut out);
        assert_eq!(used, simd::Level::active() >= simd::Level::Avx2);
        if used {
            for (i, (o, p)) in out.iter().zip(&portable).enumerate() {
                assert_eq!(o.to_bits(), *p, "f16 {i:#x}");
            }
        }
        let mut via = vec![0f32; portable.len()];
        to_f32(DType::F16, bytes, &mut via);
        assert!(via.iter().zip(&portable).all(|(v, p)| v.to_bits() == *p));
    }

    #[test]
    fn f16_values_update_only_the_sums_they_cover() {
        // Five f16 ones against eight sums (the kernels' contract for any float type:
        // the shorter side decides), at the current vector level.
        let bytes: Vec<u8> = (0..5)
            .flat_map(|_| f16::ONE.to_bits().to_le_bytes())
            .collect();
        let mut acc = [7.0f64; 8];
        zip_values(DType::F16, &bytes, &mut acc, |a, x| *a += x);
        assert_eq!(acc, [8.0, 8.0, 8.0, 8.0, 8.0, 7.0, 7.0, 7.0]);
        let mut acc = [7.0f64; 8];
        zip_values4(DType::F16, [&bytes; 4], &mut acc, false, |a, x| a + x);
        assert_eq!(acc, [11.0, 11.0, 11.0, 11.0, 11.0, 7.0, 7.0, 7.0]);

        // Past one group of eight (widened in registers where the CPU can, the rest on
        // the stack), sources of different lengths, each value in its own lane.
        let counting = |n: usize| -> Vec<u8> {
            (1..=n)
                .flat_map(|i| f16::from_f64(i as f64).to_bits().to_le_bytes())
                .collect()
        };
        let mut acc = [100.0f64; 16];
        zip_values(DType::F16, &counting(13), &mut acc, |a, x| *a += x);
        let want: Vec<f64> = (1..=16)
            .map(|i| if i <= 13 { 100.0 + i as f64 } else { 100.0 })
            .collect();
        assert_eq!(acc.to_vec(), want);
        let (a, b, c, d) = (counting(13), counting(16), counting(20), counting(9));
        let mut acc = [100.0f64; 16];
        zip_values4(DType::F16, [&a, &b, &c, &d], &mut acc, false, |s, x| s + x);
        let want: Vec<f64> = (1..=16)
            .map(|i| {
                if i <= 9 {
                    100.0 + 4.0 * i as f64
                } else {
                    100.0
                }
            })
            .collect();
        assert_eq!(acc.to_vec(), want);
    }

    /// Values on, between and next to every 16-bit float: each one itself, the midpoint to
    /// the next (a tie), one f64 unit either side of the midpoint, and a quarter of the
    /// way; plus zeros, the f64 extremes and NaNs.
    fn around_every_value(decode: impl Fn(u16) -> f64) -> Vec<f64> {
        let mut v = vec![
            0.0,
            -0.0,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::INFINITY,
            f64::NAN,
        ];
        v.push(-f64::NAN);
        for bits in 0..=u16::MAX {
            let (x, y) = (decode(bits), decode(bits.wrapping_add(1)));
            v.push(x);
            if x.is_finite() && y.is_finite() && (bits & 0x7fff) != 0x7fff {
                let mid = (x + y) / 2.0;
                v.push(mid);
                v.push(f64::from_bits(mid.to_bits() + 1));
                v.push(f64::from_bits(mid.to_bits() - 1));
                v.push(x + (y - x) / 4.0);
            }
        }
        v
    }

    #[test]
    fn slice_rounding_gives_the_bits_of_rounding_each_value() {
        let values = around_every_value(|b| bf16::from_bits(b).to_f64());
        let mut out = vec![bf16::ZERO; values.len()];
        bf16_slice_from_f64(&values, &mut out);
        for (v, o) in values.iter().zip(&out) {
            assert_eq!(o.to_bits(), bf16_from_f64(*v).to_bits(), "bf16 of {v:e}");
        }
        let values = around_every_value(|b| f16::from_bits(b).to_f64());
        let mut out = vec![f16::ZERO; values.len()];
        f16_slice_from_f64(&values, &mut out);
        for (v, o) in values.iter().zip(&out) {
            assert_eq!(o.to_bits(), f16_from_f64(*v).to_bits(), "f16 of {v:e}");
        }
    }

    /// Checks `round` against the nearest value of the format found by distance in f64
    /// (ties to the even bit pattern), for every finite value below the format's largest.
    fn check_nearest(round: impl Fn(f64) -> u16, decode: impl Fn(u16) -> f64, max: f64) {
        for v in around_every_value(&decode) {
            if !v.is_finite() || v.abs() >= max {
                continue;
            }
            let guess = round(v);
            let dist = |b: u16| (decode(b) - v).abs();
            let best = [guess.wrapping_sub(1), guess, guess.wrapping_add(1)]
                .into_iter()
                .filter(|b| decode(*b).is_finite())
                .min_by(|a, b| dist(*a).total_cmp(&dist(*b)).then((a & 1).cmp(&(b & 1))))
                .expect("a finite neighbour");
            let tie_to_even = dist(guess) != dist(best) || guess & 1 == 0 || dist(best) == 0.0;
            assert!(
                dist(guess) == dist(best) && (tie_to_even || best == guess),
                "{v:e}: {guess:#x}, nearest {best:#x}"
            );
        }
    }

    #[test]
    fn rounding_gives_the_nearest_value_ties_to_even() {
        // Independent of how the functions compute it: a search among the neighbours.
        check_nearest(
            |v| bf16_from_f64(v).to_bits(),
            |b| bf16::from_bits(b).to_f64(),
            bf16::MAX.to_f64(),
        );
        check_nearest(
            |v| f16_from_f64(v).to_bits(),
            |b| f16::from_bits(b).to_f64(),
            f16::MAX.to_f64(),
        );
    }

    #[test]
    fn transpose_moves_every_element_to_its_mirrored_place() {
        // A 37 × 70 matrix of u16 (crosses tile edges both ways): out[c][r] = in[r][c].
        let (rows, cols) = (37, 70);
        let vals: Vec<u16> = (0..rows * cols).map(|i| i as u16).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0u8; bytes.len()];
        transpose_into(&bytes, rows, cols, 2, &mut out);
        for r in 0..rows {
            for c in 0..cols {
                let at = (c * rows + r) * 2;
                assert_eq!(
                    u16::from_le_bytes([out[at], out[at + 1]]),
                    (r * cols + c) as u16
                );
            }
        }
    }

    #[test]
    fn sizes_match_safetensors() {
        for (st, ours) in [
            (Dtype::F32, DType::F32),
            (Dtype::F16, DType::F16),
            (Dtype::BF16, DType::BF16),
            (Dtype::I64, DType::I64),
            (Dtype::BOOL, DType::Bool),
        ] {
            assert_eq!(DType::from_safetensors(st), Some(ours));
            assert_eq!(ours.size() * 8, st.bitsize());
        }
        assert_eq!(DType::from_safetensors(Dtype::F8_E4M3), None);
    }

    #[test]
    fn reads_unaligned_little_endian() {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.25f32).to_le_bytes());
        assert_eq!(read_f64(DType::F32, &bytes[1..], 0), 1.5);
        assert_eq!(read_f64(DType::F32, &bytes[1..], 1), -2.25);
        let h = f16::from_f32(0.333).to_bits().to_le_bytes();
        assert_eq!(read_f64(DType::F16, &h, 0), f16::from_f32(0.333).to_f64());
    }

    #[test]
    fn converts_between_float_types() {
        let f16_one = f16::ONE.to_le_bytes();
        assert_eq!(
            convert_bytes(DType::F16, DType::F32, &f16_one),
            1f32.to_le_bytes()
        );
        let x = 0.1f32.to_le_bytes();
        assert_eq!(
            convert_bytes(DType::F32, DType::BF16, &x),
            bf16::from_f32(0.1).to_le_bytes()
        );
        assert_eq!(convert_bytes(DType::F32, DType::F32, &x), x);
    }

    /// The representable value nearest to `v` among the neighbours of `guess` (ties to
    /// the even bit pattern): an exact reference for finite, in-range `v`.
    fn nearest(v: f64, guess: u16, decode: impl Fn(u16) -> f64) -> u16 {
        let mut best = guess;
        for c in [guess.wrapping_sub(1), guess, guess.wrapping_add(1)] {
            let (d, db) = ((decode(c) - v).abs(), (decode(best) - v).abs());
            if !decode(c).is_finite() || (c ^ guess) & 0x8000 != 0 {
                continue;
            }
            if d < db || (d == db && c & 1 == 0) {
                best = c;
            }
        }
        best
    }

    #[test]
    fn fast_half_rounding_is_exact_round_to_nearest_even() {
        // Every finite f16/bf16 value, the midpoints between neighbours, and points just
        // off them. `half`'s bf16::from_f64 rounds through f32 (double rounding), so the
        // reference is the nearest neighbour computed here.
        let mut values = vec![65504.0, 65519.99, 65520.0, 3.38e38, 1.0, -1.0, 0.1, -3.0e-3];
        for b in 0..=u16::MAX {
            for (x, next) in [
                (
                    f16::from_bits(b).to_f64(),
                    f16::from_bits(b.wrapping_add(1)).to_f64(),
                ),
                (
                    bf16::from_bits(b).to_f64(),
                    bf16::from_bits(b.wrapping_add(1)).to_f64(),
                ),
            ] {
                if x.is_finite() && next.is_finite() {
                    values.extend([x, x * (1.0 + 1e-9), x * (1.0 - 1e-9), (x + next) / 2.0]);
                }
            }
        }
        for v in values {
            let a = f16_from_f64(v);
            if v.abs() >= 6.103515625e-5 && v.abs() < 65520.0 {
                let want = nearest(v, a.to_bits(), |b| f16::from_bits(b).to_f64());
                assert_eq!(a.to_bits(), want, "f16 {v:e}");
            }
            if v.abs() < 3.3895313892515355e38 {
                let a = bf16_from_f64(v);
                let want = nearest(v, a.to_bits(), |b| bf16::from_bits(b).to_f64());
                assert_eq!(a.to_bits(), want, "bf16 {v:e}");
            }
        }
        // Out of the finite range: infinities of the right sign, the canonical NaN.
        assert!(f16_from_f64(f64::NAN).is_nan() && bf16_from_f64(f64::NAN).is_nan());
        assert_eq!(f16_from_f64(1e6), f16::INFINITY);
        assert_eq!(bf16_from_f64(-1e300), bf16::NEG_INFINITY);
        assert_eq!(f16_from_f64(0.0).to_bits(), 0);
        assert_eq!(f16_from_f64(65520.0), f16::INFINITY);
        assert_eq!(f16_from_f64(65519.99).to_f64(), 65504.0);
    }

    #[test]
    fn half_conversion_rounds_to_nearest_even() {
        // 1 + 2^-11 lies exactly between two f16 values (1 and 1 + 2^-10): ties to even (1).
        assert_eq!(f16::from_f64(1.0 + 2f64.powi(-11)), f16::from_f64(1.0));
        // 1 + 3*2^-11 lies between 1+2^-10 and 1+2^-9: ties to even (1 + 2^-9).
        assert_eq!(
            f16::from_f64(1.0 + 3.0 * 2f64.powi(-11)).to_f64(),
            1.0 + 2f64.powi(-9)
        );
        // bf16 has 8 mantissa bits: 1 + 2^-8 is a tie, rounds to 1.
        assert_eq!(bf16::from_f64(1.0 + 2f64.powi(-8)).to_f64(), 1.0);
        assert_eq!(
            bf16::from_f64(1.0 + 3.0 * 2f64.powi(-8)).to_f64(),
            1.0 + 2f64.powi(-6)
        );
    }
}
