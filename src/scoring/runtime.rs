//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time and the library
//! is opened at run time. We always resolve a path first and call `ort::init_from`,
//! which reports a failed `dlopen` as an error (`ort`'s path-less default panics).
//! Order: `--ort-lib`, `ORT_DYLIB_PATH`, the `onnxruntime` (or `onnxruntime-gpu`)
//! package of the `python3` on `PATH`, then the system library path.

use std::path::{Path, PathBuf};
use std::process::Command;

use ort::environment::Environment;

use crate::error::{Error, Result};

const PIP_HINT: &str = "install it with `python3 -m pip install onnxruntime==1.31.1` \
    (or `onnxruntime-gpu` for CUDA), or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so";

/// The loaded ONNX Runtime and where it came from.
#[derive(Debug)]
pub struct Runtime {
    pub environment: Environment,
    pub library: PathBuf,
}

/// Loads ONNX Runtime, trying the places listed in the module documentation in order.
pub fn load(explicit: Option<&Path>) -> Result<Runtime> {
    let mut looked = Vec::new();
    if let Some(path) = explicit {
        return init(path).map_err(|e| Error::RuntimeNotFound(format!("--ort-lib: {e}")));
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return init(Path::new(&path))
            .map_err(|e| Error::RuntimeNotFound(format!("ORT_DYLIB_PATH: {e}")));
    }
    match python_package_library() {
        Ok(path) => match init(&path) {
            Ok(rt) => return Ok(rt),
            Err(e) => looked.push(format!("python3's onnxruntime package: {e}")),
        },
        Err(why) => looked.push(format!("python3's onnxruntime package: {why}")),
    }
    let system = format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    match init(Path::new(&system)) {
        Ok(rt) => Ok(rt),
        Err(e) => {
            looked.push(format!("system library path ({system}): {e}"));
            Err(Error::RuntimeNotFound(format!(
                "ONNX Runtime library not found. Looked in:\n  - --ort-lib: not given\n  \
                 - ORT_DYLIB_PATH: not set\n  - {}\nFix: {PIP_HINT}",
                looked.join("\n  - ")
            )))
        }
    }
}

fn init(path: &Path) -> std::result::Result<Runtime, String> {
    let builder = ort::init_from(path).map_err(|e| e.to_string())?;
    let environment = builder
        .with_name("aswa-merge")
        .build()
        .map_err(|e| e.to_string())?;
    // Best effort: without it, sessions that ask for the shared arena use their own.
    let _ = share_cpu_arena(&environment);
    Ok(Runtime {
        environment,
        library: path.to_path_buf(),
    })
}

/// Registers a CPU arena allocator with the environment (`CreateAndRegisterAllocator`),
/// which sessions built with `session.use_env_allocators` share instead of each making
/// its own. With a session per candidate ([`super::WeightsAs::Constants`]) that keeps the
/// activations' memory allocated, and its pages mapped, from one candidate to the next:
/// a fresh arena per session has every page of it faulted in again (a quarter of the CPU
/// time on the benchmark's CNN). Fails if the process's environment already has one (a
/// second [`load`] in the same process), which is as good.
fn share_cpu_arena(environment: &Environment) -> std::result::Result<(), String> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    use ort::AsPointer;
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|e| e.to_string())?;
    let api = ort::api();
    // SAFETY: both pointers come from live `ort` objects that outlive the call; a null
    // arena configuration asks for the default one (ONNX Runtime's C API documents it).
    let status = unsafe {
        (api.CreateAndRegisterAllocator)(environment.ptr().cast_mut(), info.ptr(), std::ptr::null())
    };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is an error object we own: its message is read while it
    // lives, and it is released once.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(message)
}

/// `onnxruntime/capi/libonnxruntime.so*` of the `python3` on `PATH`, located without
/// importing the package.
fn python_package_library() -> std::result::Result<PathBuf, String> {
    let script = "import importlib.util as u\n\
                  s = u.find_spec('onnxruntime')\n\
                  print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')";
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .map_err(|e| format!("cannot run python3 ({e})"))?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || dir.is_empty() {
        return Err("not installed".into());
    }
    let capi = Path::new(&dir).join("capi");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
        .map_err(|e| format!("{}: {e}", capi.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
        })
        .collect();
    // The versioned name (`libonnxruntime.so.1.31.1`) sorts last.
    libs.sort();
    libs.pop()
        .ok_or_else(|| format!("no libonnxruntime.so in {}", capi.display()))
}
