//! Where ONNX Runtime runs the model (`--device`), and session builders for it.
//!
//! `place` resolves the requested device once: `cuda` either registers the CUDA
//! execution provider or fails with what is missing; `auto` falls back to the CPU and
//! says why. `builder` then makes session builders for that placement, as many as
//! needed (one per candidate when weights are constants).

use ort::environment::Environment;
use ort::session::builder::SessionBuilder;
use ort::session::Session;

use super::runtime::Runtime;
use crate::error::{Error, Result};

/// `--device`: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU execution provider.
    Cpu,
    /// The CUDA execution provider on this GPU; an error if it is not usable.
    Cuda(u32),
    /// CUDA on GPU 0 when the loaded ONNX Runtime can use it, else the CPU.
    #[default]
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}`: expected cpu, cuda, cuda:N or auto")),
        }
    }
}

/// The resolved device: what every session of a scorer is built for.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// The execution provider's name as ONNX Runtime spells it.
    pub provider: &'static str,
    /// The GPU, when the CUDA execution provider is used.
    pub cuda: Option<u32>,
    /// Why `--device auto` fell back to the CPU, if it did.
    pub note: Option<String>,
}

impl Placement {
    /// Whether the model runs on the CPU.
    pub fn is_cpu(&self) -> bool {
        self.cuda.is_none()
    }
}

const CPU: &str = "CPUExecutionProvider";
const CUDA: &str = "CUDAExecutionProvider";

/// Resolves `device` for the loaded ONNX Runtime (see the module documentation).
pub(crate) fn place(runtime: &Runtime, device: Device) -> Result<Placement> {
    let id = match device {
        Device::Cpu => {
            return Ok(Placement {
                provider: CPU,
                cuda: None,
                note: None,
            })
        }
        Device::Cuda(n) => n,
        Device::Auto => 0,
    };
    let compiled = <ort::ep::CUDA as ort::ep::ExecutionProvider>::is_available().unwrap_or(false);
    let usable = if compiled {
        with_cuda(new_builder(&runtime.environment, 0)?, id)
            .map(drop)
            .map_err(|e| e.to_string())
    } else {
        Err(format!(
            "the ONNX Runtime library {} has no CUDA execution provider",
            runtime.library.display()
        ))
    };
    match (usable, device) {
        (Ok(()), _) => Ok(Placement {
            provider: CUDA,
            cuda: Some(id),
            note: None,
        }),
        (Err(why), Device::Cuda(_)) => Err(Error::Usage(format!(
            "--device cuda:{id}: CUDA is not usable: {why}. Use onnxruntime-gpu==1.31.1 \
             (pip install onnxruntime-gpu==1.31.1, then --ort-lib or ORT_DYLIB_PATH \
             pointing at its capi/libonnxruntime.so.*), which needs the CUDA 13 \
             (cudart, cublas/cublasLt, curand, cufft, nvrtc) and cuDNN 9 libraries \
             on the library path; or run with --device cpu"
        ))),
        (Err(why), _) => Ok(Placement {
            provider: CPU,
            cuda: None,
            note: Some(why),
        }),
    }
}

/// A session builder for `placement` with `threads` intra-op threads (0: ONNX Runtime
/// chooses).
pub(crate) fn builder(
    environment: &Environment,
    placement: &Placement,
    threads: usize,
) -> Result<SessionBuilder> {
    let b = new_builder(environment, threads)?;
    match placement.cuda {
        None => Ok(b),
        Some(id) => with_cuda(b, id).map_err(|e| {
            Error::Runtime(format!(
                "cannot register the CUDA execution provider on GPU {id}: {e}"
            ))
        }),
    }
}

fn new_builder(environment: &Environment, threads: usize) -> Result<SessionBuilder> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spin = spins(threads, rayon::current_num_threads(), cores);
    let b = Session::builder(environment)
        .map_err(|e| Error::Runtime(format!("cannot create a session builder: {e}")))?
        .with_intra_op_spinning(spin)
        .map_err(|e| Error::Runtime(format!("cannot set ONNX Runtime's spinning: {e}")))?;
    if threads == 0 {
        return Ok(b);
    }
    b.with_intra_threads(threads)
        .map_err(|e| Error::Runtime(format!("cannot set {threads} intra-op threads: {e}")))
}

/// Whether ONNX Runtime's `threads` intra-op threads (0: its choice, all physical cores)
/// may spin between runs: only when they and the tool's `workers` (rayon's pool) fit on
/// separate `cores`.
///
/// After a run, ONNX Runtime's idle threads spin for a while waiting for the next one,
/// while the tool's threads build the next candidate and score the outputs. When both
/// pools span every core (the default) the spinning threads take the cores from the
/// tool's: on 16 cores, 1.5–1.7 s of a 6.7–7.8 s run passed between forward passes with
/// spinning and 0.1 s without, for the same forward-pass time (docs/performance.md,
/// "Many cores"). With half the cores each, spinning costs nothing and saves the wake-up
/// of ONNX Runtime's threads (6–18% of the forward passes' time there).
fn spins(threads: usize, workers: usize, cores: usize) -> bool {
    threads > 0 && threads.saturating_add(workers) <= cores
}

fn with_cuda(b: SessionBuilder, id: u32) -> std::result::Result<SessionBuilder, String> {
    b.with_execution_providers([ort::ep::CUDA::default()
        .with_device_id(id as i32)
        .build()
        .error_on_failure()])
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::spins;

    #[test]
    fn onnx_runtime_spins_only_beside_the_tools_threads() {
        // The default (all cores for both pools) and any overlap: no spinning.
        assert!(!spins(0, 16, 16));
        assert!(!spins(0, 1, 16));
        assert!(!spins(16, 16, 16));
        assert!(!spins(9, 9, 16));
        assert!(!spins(4, 16, 16));
        assert!(!spins(1, 1, 1));
        // Separate cores for both pools.
        assert!(spins(8, 8, 16));
        assert!(spins(4, 4, 16));
        assert!(spins(1, 1, 2));
        // No overflow.
        assert!(!spins(usize::MAX, 16, 16));
    }
}
