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
        *o = f16::from_f64(read_f64(from, bytes, i));
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
            DType::F16 => out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
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
