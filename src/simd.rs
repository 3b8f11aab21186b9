//! Which vector instructions the averaging and conversion kernels run with.
//!
//! The kernels are plain Rust loops; `simd` runs one compiled for the widest instruction
//! set the CPU has (AVX-512, AVX2, or the x86-64 baseline), chosen at run time so that one
//! binary runs everywhere. One step is written with an explicit instruction, because no
//! compiler finds it in a loop: widening f16 to f32 with F16C's `vcvtph2ps` (`widen_f16`),
//! exact like the portable code it replaces, which the baseline runs.
//!
//! Every level performs the same IEEE-754 operations in the same order (Rust never fuses
//! a multiply and an add or reassociates on its own), so every level gives the same
//! values; only speed differs. The one exception is which NaN an operation on two NaNs
//! returns, which IEEE 754 leaves open and which differs between scalar and vector code:
//! the kernels write every NaN result as the canonical quiet NaN, so their output is the
//! same bits at every level. [`limit`] caps the level for the whole process, for
//! benchmarks and for the tests that check the levels agree (they differ only in
//! optimised builds).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A vector instruction set the kernels can be compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The architecture's baseline (SSE2 on x86-64; everything on other architectures).
    Baseline,
    /// AVX2, F16C and FMA (256-bit registers; one instruction widens eight f16 values).
    Avx2,
    /// AVX-512 F, BW, DQ and VL, with AVX2, F16C and FMA (512-bit registers; mask registers
    /// make the bf16 and f16 rounding cheap).
    Avx512,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

    /// The widest level this CPU supports.
    pub fn detected() -> Level {
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// The level the kernels use now: [`Level::detected`], capped by [`limit`].
    pub fn active() -> Level {
        let cap = match LIMIT.load(Ordering::Relaxed) {
            0 => Level::Baseline,
            1 => Level::Avx2,
            _ => Level::Avx512,
        };
        Level::detected().min(cap)
    }

    /// Its name, as `ASWA_BENCH_SIMD` and the benchmark's output spell it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// The cap set by [`limit`] (a `Level` as a number; no cap at first).
static LIMIT: AtomicU8 = AtomicU8::new(u8::MAX);

/// Caps the level the kernels use from now on, process-wide (levels the CPU lacks are
/// never used whatever the cap). Results do not depend on it.
pub fn limit(max: Level) {
    LIMIT.store(max as u8, Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    // Every CPU with AVX2 has F16C (it came a generation earlier) and FMA (Intel's came
    // with AVX2, AMD's a generation earlier); checked all the same.
    if !has!("avx2") || !has!("f16c") || !has!("fma") {
        Level::Baseline
    } else if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
        Level::Avx512
    } else {
        Level::Avx2
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Runs `f` compiled for [`Level::active`].
///
/// Callers mark the closure `#[inline(always)]`: it is then compiled inside each
/// `target_feature` function below. Without it the compiler may keep the closure out of
/// line, compiled once for the baseline, and the wider instructions are lost (bf16 means
/// ran at 1.8 instead of 4.0 GB/s that way; docs/performance.md).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match Level::active() {
        // SAFETY: `active` never exceeds what `detect` found this CPU supports.
        Level::Avx512 => return unsafe { with_avx512(f) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { with_avx2(f) },
        Level::Baseline => {}
    }
    f()
}

/// `f()` with AVX-512 enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f()` with AVX2, F16C and FMA enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Widens the first `min(out.len(), bytes.len() / 2)` little-endian f16 values in
/// `bytes` (any alignment) into `out`, exactly, with F16C where [`Level::active`] has it
/// (AVX2 and up), and says whether it did: with `false` nothing was written and the
/// caller widens with portable code. A NaN keeps its sign and payload and comes out
/// quiet, as `vcvtph2ps` makes it.
///
/// Inside `simd`'s AVX2 and AVX-512 functions the F16C loop is inlined; elsewhere it is a
/// call per slice, so callers pass blocks of a few hundred values or more.
#[inline(always)]
pub(crate) fn widen_f16(bytes: &[u8], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if Level::active() >= Level::Avx2 {
        let n = out.len().min(bytes.len() / 2);
        // SAFETY: `active` never exceeds what `detect` found, and `detect` reports AVX2
        // or AVX-512 only where the CPU has AVX2 and F16C.
        unsafe { widen_f16_f16c(&bytes[..2 * n], &mut out[..n]) };
        return true;
    }
    let _ = (bytes, out);
    false
}

/// Widens eight little-endian f16 values (16 bytes, any alignment) exactly to `f64`, in
/// registers: F16C's `vcvtph2ps`, then `vcvtps2pd` (one 512-bit instruction at
/// [`Level::Avx512`], two 256-bit ones at [`Level::Avx2`]); `None` at the baseline, where
/// the caller widens another way.
///
/// Callers check the level once, outside their loop, and call [`F16x8::widen`] inside it:
/// inlined into [`simd`]'s function for that level, the eight values never leave the
/// registers (with `averaging::divide`, the mean of eight f16 checkpoints ran 1.4× faster
/// on 512 MB, 1.6× in the cache, than through an f32 block on the stack and the divider;
/// docs/performance.md).
#[derive(Debug, Clone, Copy)]
pub(crate) struct F16x8 {
    /// Whether the 512-bit instruction may be used (else AVX2's).
    #[cfg(target_arch = "x86_64")]
    wide: bool,
}

impl F16x8 {
    /// The widening [`Level::active`] allows, if any.
    #[inline(always)]
    pub(crate) fn new() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        match Level::active() {
            Level::Avx512 => return Some(Self { wide: true }),
            Level::Avx2 => return Some(Self { wide: false }),
            Level::Baseline => {}
        }
        None
    }

    /// The eight values of `bytes`, exactly.
    #[inline(always)]
    pub(crate) fn widen(self, bytes: &[u8; 16]) -> [f64; 8] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `new` gives `wide` only at the AVX-512 level and this value only at
            // AVX2 or above; `detect` reports those only where the CPU has AVX2 and F16C
            // (and AVX-512 F for the first).
            if self.wide {
                unsafe { f16x8_avx512(bytes) }
            } else {
                unsafe { f16x8_avx2(bytes) }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = bytes;
            unreachable!("F16x8 is only made on x86-64")
        }
    }
}

/// [`F16x8::widen`] with AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn f16x8_avx512(bytes: &[u8; 16]) -> [f64; 8] {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm512_cvtps_pd, _mm512_storeu_pd, _mm_loadu_si128,
    };
    let mut out = [0f64; 8];
    // SAFETY: `bytes` is 16 readable bytes and `out` 8 writable f64; both intrinsics take
    // unaligned addresses.
    unsafe {
        let v = _mm_loadu_si128(bytes.as_ptr().cast::<__m128i>());
        _mm512_storeu_pd(out.as_mut_ptr(), _mm512_cvtps_pd(_mm256_cvtph_ps(v)));
    }
    out
}

/// [`F16x8::widen`] with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn f16x8_avx2(bytes: &[u8; 16]) -> [f64; 8] {
    use std::arch::x86_64::{
        __m128i, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_cvtps_pd, _mm256_extractf128_ps,
        _mm256_storeu_pd, _mm_loadu_si128,
    };
    let mut out = [0f64; 8];
    let (lo, hi) = out.split_at_mut(4);
    // SAFETY: `bytes` is 16 readable bytes, `lo` and `hi` 4 writable f64 each; the
    // intrinsics take unaligned addresses.
    unsafe {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(bytes.as_ptr().cast::<__m128i>()));
        _mm256_storeu_pd(lo.as_mut_ptr(), _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        _mm256_storeu_pd(
            hi.as_mut_ptr(),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
        );
    }
    out
}

/// [`widen_f16`]'s F16C loop over `bytes.len() / 2 == out.len()` values: eight per
/// instruction, the last few one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn widen_f16_f16c(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), 2 * out.len());
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32,
        _mm_loadu_si128,
    };
    let mut eights = out.chunks_exact_mut(8);
    let mut halves = bytes.chunks_exact(16);
    for (o, h) in (&mut eights).zip(&mut halves) {
        // SAFETY: `h` is 16 readable bytes and `o` 8 writable f32 (the chunk sizes); both
        // intrinsics take unaligned addresses.
        unsafe {
            let v = _mm_loadu_si128(h.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(v));
        }
    }
    let tail = eights.into_remainder().iter_mut();
    for (o, h) in tail.zip(halves.remainder().chunks_exact(2)) {
        let bits = i32::from(u16::from_le_bytes([h[0], h[1]]));
        *o = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_the_active_one_never_exceeds_the_cpu() {
        assert!(Level::Baseline < Level::Avx2 && Level::Avx2 < Level::Avx512);
        assert!(Level::active() <= Level::detected());
        assert_eq!(Level::ALL.map(Level::name), ["baseline", "avx2", "avx512"]);
    }
}
