//! Element types of checkpoint tensors and the conversions between them.
//!
//! Floating tensors are averaged; integer and boolean tensors (step counters such as
//! BatchNorm's `num_batches_tracked`) never are. Conversions to and from `f64` are
//! exact where the target can hold the value and round to nearest-even otherwise.

use half::{bf16, f16};
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
        DType::F16 => f16::from_bits(u16::from_le_bytes(le::<2>(bytes, i))).to_f64(),
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

/// `v` rounded once to `f16`, to nearest-even, with a fast path for values in the normal
/// range (the averaging hot loop) and `half`'s conversion for the rest.
#[inline]
pub fn f16_from_f64(v: f64) -> f16 {
    f16::from_bits(round_f64(v, 15, 10, 0x7c00).unwrap_or_else(|| f16::from_f64(v).to_bits()))
}

/// `v` rounded once to `bf16`, to nearest-even, for every `f64` (subnormals, overflow to
/// infinity and NaN included). `half`'s `bf16::from_f64` rounds through `f32` and can be
/// off by one unit at a tie created by the first rounding; here the `f32` step rounds to
/// odd (truncate, then set the last bit when inexact), which keeps the final rounding
/// exact because `f32` carries 16 more bits than `bf16`.
#[inline]
pub fn bf16_from_f64(v: f64) -> bf16 {
    // Written without branches (comparisons become 0/1) so that loops over it vectorise.
    let r = v as f32;
    let back = f64::from(r);
    let mut bits = r.to_bits();
    bits = bits.wrapping_sub(u32::from(back.abs() > v.abs()));
    bits |= u32::from(back != v);
    let round = 0x7fff + ((bits >> 16) & 1);
    let rounded = (bits.wrapping_add(round) >> 16) as u16;
    // NaN: the f32 NaN's upper half, made quiet (sign kept).
    let nan = ((r.to_bits() >> 16) | 0x0040) as u16;
    bf16::from_bits(if v.is_nan() { nan } else { rounded })
}

/// Rounds `v` to nearest-even into a 16-bit float with exponent `bias` and `mant`
/// mantissa bits (`inf` is its infinity's bit pattern); `None` outside the normal range
/// (zeros, subnormals, infinities, NaN), which the caller converts the slow way.
#[inline]
fn round_f64(v: f64, bias: i32, mant: u32, inf: u16) -> Option<u16> {
    let bits = v.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1023;
    if !(1 - bias..=bias).contains(&exp) {
        return None;
    }
    let sign = ((bits >> 63) as u16) << 15;
    let shift = 52 - mant;
    let fraction = bits & ((1u64 << 52) - 1);
    let mut m = (fraction >> shift) as u32;
    let rest = fraction & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    let mut e = (exp + bias) as u32;
    if rest > half || (rest == half && m & 1 == 1) {
        m += 1;
        if m == 1 << mant {
            m = 0;
            e += 1;
        }
    }
    if e >= (2 * bias + 1) as u32 {
        return Some(sign | inf);
    }
    Some(sign | (e << mant) as u16 | m as u16)
}

/// Converts little-endian float bytes of `from` into `f32` values (exact for f16,
/// bf16 and f32; rounded to nearest-even for f64).
pub fn to_f32(from: DType, bytes: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = read_f64(from, bytes, i) as f32;
    }
}

/// Converts little-endian float bytes of `from` into `f16` values (round to nearest-even).
pub fn to_f16(from: DType, bytes: &[u8], out: &mut [f16]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f16_from_f64(read_f64(from, bytes, i));
    }
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
    if from == to {
        return bytes.to_vec();
    }
    let n = bytes.len() / from.size();
    let mut out = Vec::with_capacity(n * to.size());
    for i in 0..n {
        let v = read_f64(from, bytes, i);
        match to {
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16_from_f64(v).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16_from_f64(v).to_le_bytes()),
            // Integer tensors are only ever bound to their own type.
            _ => return bytes.to_vec(),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Out of the normal range the slow path of `half` is used.
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
