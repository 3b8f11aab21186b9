//! Dividing sums by the member count: the same bits as IEEE division, without the
//! divider.
//!
//! A mean is `sum / n`, one correctly rounded `f64` division per parameter. The divider
//! is the slowest unit of a core (on Sapphire Rapids one 8-lane `vdivpd` per 16 cycles):
//! it took a fifth of the kernel's time in a uniform mean of eight f16 checkpoints
//! (docs/performance.md). For an integer count `n ≤ 2⁵⁰` one multiplication and one
//! correction with fused multiply-adds give the correctly rounded quotient `RN(s/n)`:
//!
//! - `y = RN(1/n)`, once: `|y − 1/n| < 2⁻⁵³/n`.
//! - `q₀ = RN(s·y)`: `|s·y − s/n| < 2⁻⁵³|s/n| < u`, where `u` is the ulp of `s/n`, and
//!   the rounding adds at most another `u` (a crossing into the next binade included), so
//!   `|q₀ − s/n| < 2u`.
//! - `ρ = s − n·q₀`, one FMA, is exact: `s` and `n·q₀` are multiples of `u` (`|s| ≥ |s/n|`,
//!   `n` an integer), and `|ρ| = n·|q₀ − s/n| < 2n·u ≤ 2⁵¹u` fits in 53 bits.
//! - `q₁ = RN(q₀ + ρ·y)`, one FMA, rounds the exact value `q₀ + ρ·y`, which differs from
//!   `s/n = q₀ + ρ/n` by `|ρ|·|y − 1/n| < 2n·u·2⁻⁵³/n = 2⁻⁵²u`. A quotient `s/n` is never
//!   closer than `u/(2n) ≥ 2⁻⁵¹u` to a rounding midpoint `m` (`s − n·m` is a non-zero
//!   multiple of `u/2`: zero would make `s` need more bits than it has), so `q₀ + ρ·y`
//!   lies on the same side of every midpoint as `s/n`, and `q₁ = RN(s/n)`.
//!
//! (Markstein's theorem, Muller et al., *Handbook of Floating-Point Arithmetic*, would
//! need a second correction; the bound on how close a quotient by a small integer comes
//! to a midpoint makes it unnecessary.) A multiplication and two FMAs instead of the
//! divider; the argument needs normal intermediate values, so sums of magnitude outside
//! [`TINY`, `HUGE`], infinities and NaN go through the divider, a block of 64 values at a
//! time (weights never come near those bounds), and a zero sum is its own quotient (the
//! FMAs would lose the sign of `-0`). Without hardware FMA (the baseline vector level)
//! `mul_add` would be a library call, so that level divides; every level gives the same
//! bits. The tests check the bits against division on sums over every exponent in reach,
//! on quotients within a few units of 2⁻⁵³ of a rounding midpoint, for counts up to 2⁵⁰,
//! on subnormal sums (which the divider must take) and on the special values.

use crate::simd::Level;

/// Sums below this magnitude (2⁻⁸⁰⁰) go through the divider: with a divisor up to
/// [`MAX_N`] the quotients and the non-zero residuals (at least an ulp of the quotient)
/// stay far above where `f64` becomes subnormal (2⁻¹⁰²²); no weight comes near it.
const TINY: f64 = f64::from_bits((1023 - 800) << 52);

/// Sums above this magnitude (2¹⁰⁰⁰) go through the divider (`f64` overflows at 2¹⁰²⁴).
const HUGE: f64 = f64::from_bits((1023 + 1000) << 52);

/// Integer counts up to this (2⁵⁰) divide by multiplication; others use the divider.
const MAX_N: f64 = (1u64 << 50) as f64;

/// Values per block: a block with a value outside the fast path's range is divided.
const LANES: usize = 64;

/// Divides every value by `n` (a count: at least 1), each result the correctly rounded
/// `f64` quotient, exactly as `*v /= n`.
///
/// Inlined into `simd`'s target-feature functions, where `mul_add` is one instruction.
#[inline(always)]
pub(crate) fn divide(values: &mut [f64], n: f64) {
    if Level::active() < Level::Avx2 || !(1.0..=MAX_N).contains(&n) || n.fract() != 0.0 {
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
                // Computed for zeros too and dropped (a select, so the loop vectorises).
                *v = if s == 0.0 { s } else { q1 };
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

    /// The float `f64` spacing above `q` (a positive normal).
    fn ulp(q: f64) -> f64 {
        f64::from_bits(q.to_bits() + 1) - q
    }

    #[test]
    fn matches_division() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut counts: Vec<u64> = (1..=100).collect();
        counts.extend([127, 255, 257, 1000, 1023, 4097, 65535, 1 << 20]);
        // The largest counts the fast path takes, and random ones of 40 to 50 bits.
        counts.extend([(1 << 50) - 1, 1 << 50, (1 << 50) + 1]);
        for _ in 0..20 {
            let bits = next(&mut seed);
            counts.push((bits >> 14) >> (bits % 11)); // 40..=50 bits
        }
        for n in counts.into_iter().map(|n| n as f64) {
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
            // The hard cases: sums whose quotient lies next to a rounding midpoint of
            // f64, `s = RN(n·(q + ulp/2))` (one rounding: an FMA), and its neighbours.
            for _ in 0..3000 {
                let bits = next(&mut seed);
                let q =
                    f64::from_bits(((bits >> 52) % 1200 + 423) << 52 | (bits & ((1 << 52) - 1)));
                let s = n.mul_add(q, n * (ulp(q) / 2.0));
                let up = f64::from_bits(s.to_bits() + 1);
                let down = f64::from_bits(s.to_bits() - 1);
                values.extend([s, -s, up, down, f64::from_bits(up.to_bits() + 1)]);
            }
            // Quotients at and next to a rounding tie of f16 and bf16 (an 11- or 8-bit
            // significand plus a half), and exact multiples of n.
            for _ in 0..2000 {
                let bits = next(&mut seed);
                let tie = ((1024 + (bits & 0x3ff)) as f64 + 0.5)
                    * 2f64.powi(((bits >> 11) % 40) as i32 - 30);
                let tie_bf16 = ((128 + (bits >> 20 & 0x7f)) as f64 + 0.5)
                    * 2f64.powi(((bits >> 30) % 60) as i32 - 30);
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
    fn tiny_sums_take_the_divider() {
        // Blocks of nothing but subnormal and barely normal sums: the multiplications
        // would round some of these quotients wrongly (their residuals are subnormal).
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let values: Vec<f64> = (0..8 * LANES)
            .map(|i| {
                let bits = next(&mut seed);
                let exponent = if i % 2 == 0 { 0 } else { bits >> 58 }; // subnormal, 2^-1022..2^-959
                let sign = bits & (1 << 63);
                f64::from_bits(sign | exponent << 52 | (bits & ((1 << 52) - 1)) | 1)
            })
            .collect();
        for n in [3.0, 6.0, 7.0, 10.0, 12.0, 1000.0] {
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
