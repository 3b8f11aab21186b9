//! Dividing sums by the member count: the same bits as IEEE division, without the
//! divider.
//!
//! A mean is `sum / n`, one correctly rounded `f64` division per parameter. The divider
//! is the slowest unit of a core (on Sapphire Rapids one 8-lane `vdivpd` per 16 cycles):
//! it took a fifth of the kernel's time in a uniform mean of eight f16 checkpoints
//! (docs/performance.md). With a fused multiply-add the correctly rounded quotient comes
//! from multiplications instead (Markstein's theorem; Muller et al., *Handbook of
//! Floating-Point Arithmetic*, "Newton–Raphson-based division with an FMA"):
//!
//! - `y = RN(1/n)`, once; its relative error is below 2⁻⁵³;
//! - `q₀ = RN(s·y)`, within two units in the last place (ulps) of `s/n`;
//! - `q₁ = RN(q₀ + RN(s − n·q₀)·y)`, a faithful quotient (one of the two `f64` next to
//!   `s/n`): its error is half an ulp plus `(s − n·q₀)/n` times `y`'s relative error;
//! - `q₂ = RN(q₁ + (s − n·q₁)·y)`, where `s − n·q₁` is exact (an FMA), is then `RN(s/n)`
//!   by the theorem: `y` within half an ulp of `1/n`, `q₁` faithful, no underflow nor
//!   overflow.
//!
//! Four FMAs and a multiplication, two of them per cycle, instead of the divider. The
//! theorem needs normal intermediate values: sums of magnitude outside
//! [`TINY`, `HUGE`], and infinities and NaN, go through the divider (a block of 64
//! values at a time; weights never come near those bounds), and a zero sum is its own quotient (the FMAs would lose the sign of
//! `-0`). Without hardware FMA (the baseline vector level) `mul_add` would be a library
//! call, so that level divides; every level gives the same bits.
//! `tests::matches_division` checks the bits against division on sums of every dtype's
//! range, on quotients at and next to rounding ties of the 16-bit floats, and on the
//! special values.

use crate::simd::Level;

/// Sums below this magnitude (2⁻⁸⁰⁰) go through the divider: with a divisor up to
/// [`MAX_N`] the quotients and the non-zero residuals (at least an ulp of the quotient)
/// stay far above where `f64` becomes subnormal (2⁻¹⁰²²); no weight comes near it.
const TINY: f64 = f64::from_bits((1023 - 800) << 52);

/// Sums above this magnitude (2¹⁰⁰⁰) go through the divider (`f64` overflows at 2¹⁰²⁴).
const HUGE: f64 = f64::from_bits((1023 + 1000) << 52);

/// Counts up to this (2⁵⁰) divide by multiplication; larger ones use the divider.
const MAX_N: f64 = (1u64 << 50) as f64;

/// Values per block: a block with a value outside the fast path's range is divided.
const LANES: usize = 64;

/// Divides every value by `n` (a count: at least 1), each result the correctly rounded
/// `f64` quotient, exactly as `*v /= n`.
///
/// Inlined into `simd`'s target-feature functions, where `mul_add` is one instruction.
#[inline(always)]
pub(crate) fn divide(values: &mut [f64], n: f64) {
    if Level::active() < Level::Avx2 || !(1.0..=MAX_N).contains(&n) {
        values.iter_mut().for_each(|v| *v /= n);
        return;
    }
    let y = 1.0 / n;
    for block in values.chunks_mut(LANES) {
        // Two passes over the block (in the L1 cache): a check, then the quotients in
        // place; both vectorise, where quotients into a temporary and a copy back
        // stalled on the stores.
        let in_range = block.iter().fold(true, |ok, &s| {
            let a = s.abs();
            // False for NaN, as for ±∞ and magnitudes out of range.
            ok & (a <= HUGE && (a >= TINY || s == 0.0))
        });
        if in_range {
            for v in block.iter_mut() {
                let s = *v;
                let q0 = s * y;
                let q1 = (-q0).mul_add(n, s).mul_add(y, q0);
                let q2 = (-q1).mul_add(n, s).mul_add(y, q1);
                *v = if s == 0.0 { s } else { q2 };
            }
        } else {
            block.iter_mut().for_each(|v| *v /= n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::simd;

    /// `divide` at the active level, compiled as the averaging kernels compile it.
    fn divided(values: &[f64], n: f64) -> Vec<f64> {
        let mut v = values.to_vec();
        simd(
            #[inline(always)]
            || divide(&mut v, n),
        );
        v
    }

    /// xorshift64: deterministic pseudo-random bits.
    fn next(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    fn assert_same(values: &[f64], n: f64) {
        let got = divided(values, n);
        for (&s, g) in values.iter().zip(got) {
            let want = s / n;
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{s:e} / {n}: got {g:e} ({:#x}), division gives {want:e} ({:#x})",
                g.to_bits(),
                want.to_bits()
            );
        }
    }

    #[test]
    fn matches_division() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let counts: Vec<f64> = (1..=100u64)
            .chain([
                127,
                255,
                257,
                1000,
                1023,
                4097,
                65535,
                1 << 20,
                (1 << 50) + 1,
            ])
            .map(|n| n as f64)
            .collect();
        for &n in &counts {
            let mut values = Vec::new();
            // Arbitrary significands over every exponent the sums of f16, bf16 and f32
            // values reach, and far past them (f64 checkpoints), inside the fast path's
            // range.
            for _ in 0..4000 {
                let bits = next(&mut seed);
                let exponent = (bits >> 52) % 1500 + 200; // 2^-699 .. 2^800
                let sign = bits & (1 << 63);
                let mantissa = next(&mut seed) & ((1 << 52) - 1);
                let v = f64::from_bits(sign | ((exponent + 1023 - 899) << 52) | mantissa);
                values.push(v);
            }
            // Sums whose quotient is at or next to a rounding tie of f16 and bf16 (an
            // 11- or 8-bit significand plus a half), and exact multiples of n.
            for _ in 0..2000 {
                let bits = next(&mut seed);
                let tie = ((bits & 0x7ff) as f64 + 0.5 + 2048.0)
                    * 2f64.powi((bits >> 11) as i32 % 40 - 30);
                let tie_bf16 = ((bits >> 20 & 0xff) as f64 + 0.5 + 256.0)
                    * 2f64.powi((bits >> 30) as i32 % 60 - 30);
                for t in [tie, tie_bf16] {
                    let s = t * n;
                    values.extend([
                        s,
                        -s,
                        f64::from_bits(s.to_bits() + 1),
                        f64::from_bits(s.to_bits() - 1),
                    ]);
                }
                values.push(((bits >> 40) as f64) * n);
            }
            // Zeros, subnormals, the range bounds and past them, infinities and NaN,
            // in blocks with ordinary values.
            values.extend([
                0.0,
                -0.0,
                f64::MIN_POSITIVE,
                -5e-324,
                TINY,
                TINY * 0.5,
                HUGE,
                HUGE * 2.0,
                f64::MAX,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::NAN,
                1.0,
                -3.0,
                0.1,
            ]);
            assert_same(&values, n);
        }
    }

    #[test]
    fn a_zero_sum_keeps_its_sign_and_special_values_divide_as_ieee_says() {
        for n in [1.0, 3.0, 7.0, 8.0] {
            // Zeros among ordinary values (the fast path), then among out-of-range ones.
            let mut values = vec![0.5; 2 * LANES];
            values[..2].copy_from_slice(&[-0.0, 0.0]);
            let special = [-0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN];
            values[LANES..LANES + 5].copy_from_slice(&special);
            let got = divided(&values, n);
            for at in [0, LANES] {
                assert_eq!(got[at].to_bits(), (-0.0f64).to_bits(), "-0 / {n}");
                assert_eq!(got[at + 1].to_bits(), 0.0f64.to_bits(), "0 / {n}");
            }
            assert_eq!(got[LANES + 2], f64::INFINITY);
            assert_eq!(got[LANES + 3], f64::NEG_INFINITY);
            assert!(got[LANES + 4].is_nan());
        }
    }
}
