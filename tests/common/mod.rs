//! Helpers shared by the integration tests: running the built binary with the ONNX
//! Runtime library, reading safetensors outputs, comparing with the Python reference.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path under `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("fixtures").join(rel)
}

/// The ONNX Runtime library the tests run with: `ORT_DYLIB_PATH`, else the one
/// `scripts/setup-ort.sh` puts in `.deps/`.
pub fn ort_lib() -> String {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        if !p.is_empty() {
            return p;
        }
    }
    let local = root().join(".deps/onnxruntime/libonnxruntime.so.1.31.1");
    assert!(
        local.is_file(),
        "ONNX Runtime library not found: run the tests with scripts/test.sh (it fetches it), \
         or set ORT_DYLIB_PATH"
    );
    local.display().to_string()
}

/// The `aswa-merge` binary, with the ONNX Runtime library set.
pub fn cmd() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("aswa-merge").expect("binary built");
    c.env("ORT_DYLIB_PATH", ort_lib());
    c
}

/// A tensor read back from a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Values as f64 (float dtypes only).
    pub fn values(&self) -> Vec<f64> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            other => panic!("not a float dtype: {other:?}"),
        }
    }
}

/// All tensors and the metadata of a safetensors file.
pub fn read_st(path: &Path) -> (BTreeMap<String, Tensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Tensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("valid header");
    let meta = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (tensors, meta)
}

/// The JSON file at `path`.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

/// File name of a path string.
pub fn file_name(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Relative difference of two scores, 0 when both are equal (or both null/NaN).
fn score_close(a: &serde_json::Value, b: &serde_json::Value, tol: f64) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= tol * y.abs().max(1e-12),
        (None, None) => true,
        _ => false,
    }
}

/// Asserts that a `--report` agrees with the Python reference's expected JSON: the same
/// checkpoint order, decisions and member counts at every step, the same final members,
/// and scores equal within `tol` relative (float32 forward passes may differ in the last
/// bits with another batch size or thread count).
pub fn assert_matches_reference(
    report: &serde_json::Value,
    expected: &serde_json::Value,
    tol: f64,
) {
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| file_name(s.as_str().expect("string")))
            .collect()
    };
    assert_eq!(
        names(&report["checkpoints"]),
        names(&expected["checkpoints"]),
        "checkpoint order"
    );
    assert_eq!(report["metric"], expected["metric"]);
    assert_eq!(report["higher_is_better"], expected["higher_is_better"]);
    let got = report["steps"].as_array().expect("steps");
    let want = expected["steps"].as_array().expect("steps");
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g["decision"], w["decision"],
            "step {i}: decision\n got: {g}\nwant: {w}"
        );
        assert_eq!(g["members"], w["members"], "step {i}: members");
        for field in ["running_score", "lookahead_score", "ensemble_score"] {
            assert!(
                score_close(&g[field], &w[field], tol),
                "step {i}: {field}: got {} want {}",
                g[field],
                w[field]
            );
        }
    }
    assert_eq!(
        names(&report["members"]),
        names(&expected["members"]),
        "final members"
    );
    assert!(score_close(
        &report["val_score"],
        &expected["val_score"],
        tol
    ));
}

/// Writes `tensors` to `path` as safetensors (with the reference `safetensors` crate).
pub fn write_st(path: &Path, tensors: &BTreeMap<String, Tensor>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .expect("consistent tensor");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// Copies every checkpoint of `src` into `dst` (created) with `prefix` before each tensor
/// name, as a wrapper (`module.` from DistributedDataParallel) saves them.
pub fn copy_with_prefix(src: &Path, prefix: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for path in walk(src) {
        let (tensors, _) = read_st(&path);
        let prefixed = tensors
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t))
            .collect();
        write_st(&dst.join(path.file_name().unwrap()), &prefixed);
    }
}

/// Every float tensor of `got` equals the reference's float64 mean rounded once to the
/// dtype: within 1e-6 relative (max abs error / max abs value) for f32, within one unit
/// in the last place for f16/bf16. Integer tensors are identical.
pub fn assert_weights_match(got: &std::path::Path, want: &std::path::Path) {
    let (g, _) = read_st(got);
    let (w, _) = read_st(want);
    assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    for (name, wt) in &w {
        let gt = &g[name];
        assert_eq!(gt.dtype, wt.dtype, "{name}: dtype");
        assert_eq!(gt.shape, wt.shape, "{name}: shape");
        match wt.dtype {
            safetensors::Dtype::F32 => {
                let err = max_rel_err(&gt.values(), &wt.values());
                assert!(err <= 1e-6, "{name}: relative error {err}");
            }
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {
                for (i, (a, b)) in gt
                    .data
                    .chunks_exact(2)
                    .zip(wt.data.chunks_exact(2))
                    .enumerate()
                {
                    let (a, b) = (
                        u16::from_le_bytes([a[0], a[1]]),
                        u16::from_le_bytes([b[0], b[1]]),
                    );
                    // Same sign: the bit patterns of adjacent values differ by one.
                    let ulps = (i32::from(a as i16) - i32::from(b as i16)).abs();
                    assert!(ulps <= 1, "{name}[{i}]: {a:#06x} vs {b:#06x}");
                }
            }
            _ => assert_eq!(gt.data, wt.data, "{name}: integer tensor differs"),
        }
    }
}

/// The Python with numpy, onnx and onnxruntime that `scripts/setup-python.sh` prepares.
pub fn python() -> PathBuf {
    let venv = root().join(".deps/venv/bin/python");
    assert!(
        venv.is_file(),
        "{} not found: run the tests with scripts/test.sh (it creates it)",
        venv.display()
    );
    venv
}

/// A scratch directory with copies of digits checkpoints `epochs`, the model and val.npz.
pub struct Case {
    pub dir: tempfile::TempDir,
}

impl Case {
    pub fn digits(epochs: &[usize]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        for e in epochs {
            let name = format!("epoch_{e}.safetensors");
            std::fs::copy(fixture("digits/checkpoints").join(&name), ck.join(&name)).unwrap();
        }
        for f in ["model.onnx", "model.onnx.data", "val.npz"] {
            std::fs::copy(fixture("digits").join(f), dir.path().join(f)).unwrap();
        }
        Self { dir }
    }
    pub fn ck(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn out(&self) -> PathBuf {
        self.path("out.safetensors")
    }
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<(PathBuf, Vec<u8>)> = walk(self.dir.path())
            .into_iter()
            .filter(|p| p != &self.out())
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        files.sort();
        files
    }
    pub fn command(&self, args: &[&str]) -> assert_cmd::Command {
        let mut c = cmd();
        c.arg(self.ck()).arg("-o").arg(self.out()).args(args);
        if !args.contains(&"--val") {
            c.arg("--val").arg(self.path("val.npz"));
        }
        c
    }
    /// Exit 2, every needle in stderr, no output, no temporary file, inputs untouched.
    pub fn fails(&self, args: &[&str], needles: &[&str]) {
        let before = self.snapshot();
        let mut a = self.command(args).assert().code(2);
        for n in needles {
            a = a.stderr(predicates::str::contains(*n));
        }
        assert!(!self.out().exists(), "an output was written");
        let after = self.snapshot();
        assert!(before == after, "inputs changed or files were left behind");
    }
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Max abs error over max abs value of `want` (the relative error the tolerances use).
pub fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    let max_abs = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    err / max_abs
}

/// The score of an ONNX model as it is, by the independent Python reference
/// (`scripts/score_onnx.py`, onnxruntime Python).
pub fn python_score(onnx: &Path, val: &Path, metric: &str) -> f64 {
    let out = std::process::Command::new(python())
        .arg(root().join("scripts/score_onnx.py"))
        .arg(onnx)
        .arg(val)
        .args(["--metric", metric])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a float")
}
