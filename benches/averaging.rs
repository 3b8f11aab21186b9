//! Averaging throughput against the memory-bandwidth limit.
//!
//! `cargo bench --bench averaging` writes N safetensors checkpoints into a temporary
//! directory, maps them with the library (`CheckpointSet`), warms the page cache, then
//! times, for each dtype and thread count (a rayon pool of that size, used through
//! `ThreadPoolBuilder::install`):
//!
//! - `memcpy`: copying the N checkpoints' bytes (N × model bytes, read from the same
//!   memory maps) into one model-sized, already faulted-in buffer, chunk by chunk in
//!   parallel. This is the memory-bandwidth baseline: the least work that reads the same
//!   bytes and writes something.
//! - `mean`: `Weights::build(&set, Recipe::Mean(&all))`, the streaming uniform average
//!   (`--strategy uniform`). It allocates its output, as the tool does, so first-touch
//!   page faults of the output buffer are included.
//! - `aswa`: ASWA's path, `Accumulator::reset` + `add` × (N − 2) + `mean_into(Some(last))`
//!   into a reused `Weights` (the f64 sum lives in memory: 8 bytes per parameter read
//!   and written per `add`).
//! - `look-ahead` and `add`: one `mean_into(Some(c))` and one `add`, the per-step costs
//!   of ASWA for one checkpoint.
//!
//! - `reference`: a straightforward kernel with the same arithmetic (see `reference_mean`),
//!   not the tool's code, compiled for the baseline instruction set. Its output is compared
//!   bit for bit with `mean` (`check`); it was written to show the headroom, and since the
//!   tool's kernels run at the CPU's vector level it is the slower one.
//! - `to f32`: converting every tensor of one checkpoint to f32 (`storage::dtype::to_f32`),
//!   what binding a bf16 or f16 checkpoint to an f32 ONNX model costs per candidate.
//!
//! Throughput is checkpoint bytes consumed per second (N × model bytes / time), so
//! `mean / memcpy` is the ratio the issue asks for (goal ≥ 0.7). Every figure is the
//! median of ASWA_BENCH_REPS runs (default 3).
//!
//! Environment (all optional):
//! - `ASWA_BENCH_N` checkpoints (default 8);
//! - `ASWA_BENCH_PARAMS` parameters per checkpoint (default 67108864 = 64 Mi, 256 MiB in
//!   F32); the files of one dtype are written, measured and deleted before the next, so
//!   at most N × PARAMS × 4 bytes are on disk at once;
//! - `ASWA_BENCH_DTYPES` (default `f32,bf16`; `f16` too), `ASWA_BENCH_THREADS` (default `1,2`);
//! - `ASWA_BENCH_REPS` (default 3);
//! - `ASWA_BENCH_SIMD` the widest vector level the kernels may use: `baseline`, `avx2` or
//!   `avx512` (default: what the CPU has);
//! - `ASWA_BENCH_DIR` where the temporary directory is made (default: the system's);
//! - `ASWA_BENCH_JSON` also write the results as JSON lines to this file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use aswa_merge::averaging::{Accumulator, Recipe, Weights};
use aswa_merge::simd::{self, Level};
use aswa_merge::storage::{CheckpointSet, CheckpointSource};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Elements per parallel work item in the copy baseline; the same as the averaging code.
const CHUNK_ELEMS: usize = 1 << 15;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Tensor names and shapes of a model with about `params` parameters: 8 blocks, each a
/// [rows, 4096] weight and a [4096] norm vector (a transformer-like mix of one large and
/// one small tensor per block).
fn layout(params: usize) -> Vec<(String, Vec<usize>)> {
    let blocks = 8;
    let width = 4096;
    let per_block = params / blocks;
    let rows = (per_block.saturating_sub(width) / width).max(1);
    let mut out = Vec::new();
    for b in 0..blocks {
        out.push((format!("layers.{b}.mlp.weight"), vec![rows, width]));
        out.push((format!("layers.{b}.norm.weight"), vec![width]));
    }
    out
}

/// Deterministic pseudo-random values in [-1, 1) as little-endian bytes of `dtype`.
fn fill(bytes: &mut [u8], dtype: Dtype, seed: u64) {
    let size = elem_size(dtype);
    bytes
        .par_chunks_mut(CHUNK_ELEMS * size)
        .enumerate()
        .for_each(|(k, chunk)| {
            let mut s = seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for e in chunk.chunks_exact_mut(size) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                match dtype {
                    Dtype::F32 => e.copy_from_slice(&v.to_le_bytes()),
                    Dtype::F16 => e.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    _ => e.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                }
            }
        });
}

fn write_checkpoints(dir: &Path, n: usize, params: usize, dtype: Dtype) -> Vec<CheckpointSource> {
    let tensors = layout(params);
    let mut sources = Vec::new();
    for c in 0..n {
        let datas: Vec<Vec<u8>> = tensors
            .iter()
            .enumerate()
            .map(|(t, (_, shape))| {
                let mut v = vec![0u8; shape.iter().product::<usize>() * elem_size(dtype)];
                fill(&mut v, dtype, (c as u64) << 32 | t as u64);
                v
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&datas)
            .map(|((name, shape), data)| {
                (
                    name.clone(),
                    TensorView::new(dtype, shape.clone(), data).expect("tensor view"),
                )
            })
            .collect();
        let path = dir.join(format!("epoch_{:03}.safetensors", c + 1));
        safetensors::serialize_to_file(views, None, &path).expect("write checkpoint");
        sources.push(CheckpointSource::File(path));
    }
    sources
}

/// Bytes per element.
fn elem_size(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time_reps(reps: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Copies every checkpoint's tensors into one model-sized buffer, in parallel chunks.
fn copy_all(set: &CheckpointSet, dst: &mut [Vec<u8>], chunk_bytes: usize) {
    for c in 0..set.len() {
        for (t, d) in dst.iter_mut().enumerate() {
            let src = set.tensor_bytes(c, t);
            d.par_chunks_mut(chunk_bytes)
                .zip(src.par_chunks(chunk_bytes))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
    }
}

/// Reads every byte once (sums them as u64 words) so the maps are faulted in and cached.
fn touch(set: &CheckpointSet) -> u64 {
    let mut x = 0u64;
    for c in 0..set.len() {
        for t in 0..set.specs().len() {
            x = x.wrapping_add(
                set.tensor_bytes(c, t)
                    .par_chunks(1 << 20)
                    .map(|b| b.iter().step_by(64).map(|&v| v as u64).sum::<u64>())
                    .sum::<u64>(),
            );
        }
    }
    x
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not use.
    let n = env_usize("ASWA_BENCH_N", 8).max(2);
    let params = env_usize("ASWA_BENCH_PARAMS", 64 << 20);
    let reps = env_usize("ASWA_BENCH_REPS", 3).max(1);
    let dtypes = env_list("ASWA_BENCH_DTYPES", "f32,bf16");
    let threads: Vec<usize> = env_list("ASWA_BENCH_THREADS", "1,2")
        .iter()
        .filter_map(|t| t.parse().ok())
        .collect();
    let base = std::env::var_os("ASWA_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("bench dir");
    let mut json = std::env::var_os("ASWA_BENCH_JSON")
        .map(|p| std::fs::File::create(p).expect("ASWA_BENCH_JSON"));
    if let Ok(name) = std::env::var("ASWA_BENCH_SIMD") {
        let level = Level::ALL
            .into_iter()
            .find(|l| l.name() == name.trim())
            .unwrap_or_else(|| {
                panic!("ASWA_BENCH_SIMD: unknown level {name} (baseline, avx2, avx512)")
            });
        simd::limit(level);
    }
    let level = Level::active();

    println!(
        "averaging benchmark: N = {n} checkpoints of {params} parameters, median of {reps}, \
         {} logical CPUs, vector level {} (CPU: {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        level.name(),
        Level::detected().name()
    );
    println!(
        "{:<5} {:>3} {:>9} {:>10} {:>10} {:>10} {:>7} {:>10} {:>7} {:>11} {:>9} {:>11} {:>7} {:<9} {:>9}",
        "dtype",
        "thr",
        "model MB",
        "memcpy",
        "read-only",
        "mean",
        "ratio",
        "aswa path",
        "ratio",
        "look-ahead",
        "add",
        "reference",
        "ratio",
        "check",
        "to f32"
    );
    for name in &dtypes {
        let dtype = match name.as_str() {
            "f32" => Dtype::F32,
            "bf16" => Dtype::BF16,
            "f16" => Dtype::F16,
            other => panic!("ASWA_BENCH_DTYPES: unknown dtype {other} (f32, bf16, f16)"),
        };
        let dir = tempfile::Builder::new()
            .prefix("aswa-bench-")
            .tempdir_in(&base)
            .expect("temp dir");
        let sources = write_checkpoints(dir.path(), n, params, dtype);
        let set = CheckpointSet::open(sources).expect("open checkpoints");
        let model_bytes = set.model_bytes();
        let total = (n * model_bytes) as f64;
        let all: Vec<usize> = (0..n).collect();
        let chunk_bytes = CHUNK_ELEMS * elem_size(dtype);
        std::hint::black_box(touch(&set));

        for &th in &threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(th)
                .build()
                .expect("rayon pool");
            let r = pool.install(|| {
                let mut dst: Vec<Vec<u8>> = set
                    .specs()
                    .iter()
                    .map(|s| vec![1u8; s.numel() * elem_size(dtype)])
                    .collect();
                // Warm-up: one of each.
                copy_all(&set, &mut dst, chunk_bytes);
                std::hint::black_box(Weights::build(&set, Recipe::Mean(&all)));
                let mut acc = Accumulator::new(&set);
                let mut out = Weights::new(&set);
                acc.reset(&set, 0);
                acc.mean_into(&set, Some(1), &mut out);

                let built = Weights::build(&set, Recipe::Mean(&all));
                let mut refbuf: Vec<Vec<u8>> = set
                    .specs()
                    .iter()
                    .map(|s| vec![1u8; s.numel() * elem_size(dtype)])
                    .collect();
                reference_mean(&set, dtype, &mut refbuf);
                let same = refbuf.iter().enumerate().all(|(t, r)| {
                    aswa_merge::averaging::Candidate::Average(&built).tensor_bytes(&set, t)
                        == r.as_slice()
                });
                drop(built);
                let reference = time_reps(reps, || reference_mean(&set, dtype, &mut refbuf));

                let memcpy = time_reps(reps, || copy_all(&set, &mut dst, chunk_bytes));
                let read = time_reps(reps, || {
                    std::hint::black_box(touch_all_words(&set));
                });
                let mean = time_reps(reps, || {
                    std::hint::black_box(Weights::build(&set, Recipe::Mean(&all)));
                });
                let aswa = time_reps(reps, || {
                    acc.reset(&set, 0);
                    for c in 1..n - 1 {
                        acc.add(&set, c);
                    }
                    acc.mean_into(&set, Some(n - 1), &mut out);
                });
                let look = time_reps(reps, || acc.mean_into(&set, Some(n - 1), &mut out));
                // Binding a checkpoint to an f32 model: every tensor converted once.
                let mut f32s: Vec<Vec<f32>> =
                    set.specs().iter().map(|s| vec![0f32; s.numel()]).collect();
                let convert = time_reps(reps, || {
                    for (t, o) in f32s.iter_mut().enumerate() {
                        let spec = &set.specs()[t];
                        aswa_merge::storage::dtype::to_f32(spec.dtype, set.tensor_bytes(1, t), o);
                    }
                });
                std::hint::black_box(&f32s);
                acc.reset(&set, 0);
                let add = time_reps(reps, || acc.add(&set, 1));
                std::hint::black_box(&out);
                std::hint::black_box(&dst);
                (
                    [memcpy, read, mean, aswa, look, add, reference, convert],
                    same,
                )
            });
            let ([memcpy, read, mean, aswa, look, add, reference, convert], same) = r;
            let gbs = |t: f64| total / t / 1e9;
            println!(
                "{:<5} {:>3} {:>9.1} {:>7.2} GB/s {:>6.2} GB/s {:>6.2} GB/s {:>7.2} {:>6.2} GB/s {:>7.2} {:>8.1} ms {:>6.1} ms {:>6.2} GB/s {:>7.2} {:<9} {:>6.1} ms",
                name,
                th,
                model_bytes as f64 / 1e6,
                gbs(memcpy),
                gbs(read),
                gbs(mean),
                memcpy / mean,
                gbs(aswa),
                memcpy / aswa,
                look * 1e3,
                add * 1e3,
                gbs(reference),
                memcpy / reference,
                if same { "same bits" } else { "DIFFERENT" },
                convert * 1e3
            );
            if let Some(f) = json.as_mut() {
                let fields: HashMap<&str, f64> = [
                    ("threads", th as f64),
                    ("n", n as f64),
                    ("params", params as f64),
                    ("model_bytes", model_bytes as f64),
                    ("memcpy_gbs", gbs(memcpy)),
                    ("read_gbs", gbs(read)),
                    ("mean_gbs", gbs(mean)),
                    ("mean_ratio", memcpy / mean),
                    ("aswa_gbs", gbs(aswa)),
                    ("aswa_ratio", memcpy / aswa),
                    ("lookahead_ms", look * 1e3),
                    ("add_ms", add * 1e3),
                    ("reference_gbs", gbs(reference)),
                    ("reference_ratio", memcpy / reference),
                    ("reference_same_bits", if same { 1.0 } else { 0.0 }),
                    ("to_f32_ms", convert * 1e3),
                ]
                .into_iter()
                .collect();
                let mut line = serde_json::to_value(&fields).expect("json");
                line["dtype"] = serde_json::Value::from(name.as_str());
                line["simd"] = serde_json::Value::from(level.name());
                writeln!(f, "{line}").expect("write ASWA_BENCH_JSON");
            }
        }
        drop(set);
        drop(dir);
    }
    println!(
        "throughput = N × model bytes / time; ratio = memcpy time / averaging time (goal ≥ 0.7 for mean)"
    );
}

/// Reads every 8-byte word of every checkpoint (a read-only bandwidth figure).
fn touch_all_words(set: &CheckpointSet) -> u64 {
    let mut x = 0u64;
    for c in 0..set.len() {
        for t in 0..set.specs().len() {
            x = x.wrapping_add(
                set.tensor_bytes(c, t)
                    .par_chunks(1 << 17)
                    .map(|b| {
                        b.chunks_exact(8)
                            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                            .fold(0u64, u64::wrapping_add)
                    })
                    .fold(|| 0u64, u64::wrapping_add)
                    .reduce(|| 0u64, u64::wrapping_add),
            );
        }
    }
    x
}

/// A reference kernel with the tool's semantics (f64 sum in member order, one division,
/// one round-to-nearest-even to the dtype), written so that the compiler vectorises it:
/// aligned typed slices instead of per-element byte decoding, one output buffer reused.
/// It is not used by the tool; it shows how far `Weights::build` is from what the same
/// arithmetic costs, and its output is checked bit for bit against `Weights::build`.
fn reference_mean(set: &CheckpointSet, dtype: Dtype, out: &mut [Vec<u8>]) {
    let n = set.len();
    let inv = n as f64;
    for (t, o) in out.iter_mut().enumerate() {
        let sources: Vec<&[u8]> = (0..n).map(|c| set.tensor_bytes(c, t)).collect();
        let size = elem_size(dtype);
        o.par_chunks_mut(CHUNK_ELEMS * size)
            .enumerate()
            .for_each(|(k, o)| {
                let start = k * CHUNK_ELEMS * size;
                let len = o.len() / size;
                let mut acc = [0f64; 1024];
                for b in (0..len).step_by(1024) {
                    let m = (len - b).min(1024);
                    let acc = &mut acc[..m];
                    for (i, src) in sources.iter().enumerate() {
                        let bytes = &src[start + b * size..start + (b + m) * size];
                        match dtype {
                            Dtype::F32 => {
                                let v: &[f32] = bytemuck::cast_slice(bytes);
                                if i == 0 {
                                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a = x as f64);
                                } else {
                                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a += x as f64);
                                }
                            }
                            Dtype::F16 => {
                                let v: &[half::f16] = bytemuck::cast_slice(bytes);
                                if i == 0 {
                                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a = x.to_f64());
                                } else {
                                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a += x.to_f64());
                                }
                            }
                            _ => {
                                let v: &[u16] = bytemuck::cast_slice(bytes);
                                let f = |x: u16| f32::from_bits((x as u32) << 16) as f64;
                                if i == 0 {
                                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a = f(x));
                                } else {
                                    acc.iter_mut().zip(v).for_each(|(a, &x)| *a += f(x));
                                }
                            }
                        }
                    }
                    let dst = &mut o[b * size..(b + m) * size];
                    match dtype {
                        Dtype::F32 => {
                            let d: &mut [f32] = bytemuck::cast_slice_mut(dst);
                            d.iter_mut()
                                .zip(acc.iter())
                                .for_each(|(d, &a)| *d = (a / inv) as f32);
                        }
                        Dtype::F16 => {
                            let d: &mut [half::f16] = bytemuck::cast_slice_mut(dst);
                            d.iter_mut().zip(acc.iter()).for_each(|(d, &a)| {
                                *d = half::f16::from_f32(f32::from_bits(round_to_odd(a / inv)))
                            });
                        }
                        _ => {
                            let d: &mut [u16] = bytemuck::cast_slice_mut(dst);
                            d.iter_mut()
                                .zip(acc.iter())
                                .for_each(|(d, &a)| *d = f64_to_bf16_rne(a / inv));
                        }
                    }
                }
            });
    }
}

/// f64 to bf16, round to nearest even, by rounding to f32 with round-to-odd first (exact
/// double rounding: f32 keeps 16 more bits than bf16). NaN stays NaN.
#[inline(always)]
fn f64_to_bf16_rne(x: f64) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let bits = round_to_odd(x);
    let round = 0x7FFF + ((bits >> 16) & 1);
    ((bits + round) >> 16) as u16
}

/// `x` rounded to f32 with round-to-odd (truncate toward zero, then set the last bit if
/// inexact), as bits: a second rounding to any format with at least 2 bits fewer (bf16,
/// f16) is then exact.
#[inline(always)]
fn round_to_odd(x: f64) -> u32 {
    let r = x as f32;
    let mut bits = r.to_bits();
    let back = r as f64;
    if back.abs() > x.abs() {
        bits -= 1;
    }
    if back != x && !x.is_nan() {
        bits |= 1;
    }
    bits
}
