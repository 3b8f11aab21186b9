//! Bad inputs: each must give a clear message naming the file and the tensor or array,
//! exit code 2, and no output file; inputs are never modified.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use predicates::prelude::*;
use predicates::str::contains;

/// Rewrites the checkpoint at `path` after `edit` changes its tensors.
fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let (mut tensors, _) = read_st(path);
    edit(&mut tensors);
    write_st(path, &tensors);
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn empty_directory() {
    let case = Case::digits(&[]);
    case.fails(
        &["--model", case.path("model.onnx").to_str().unwrap()],
        &["no checkpoints found in", "*.safetensors"],
    );
}

#[test]
fn a_tensor_with_another_shape_names_the_file_and_the_tensor() {
    let case = Case::digits(&[1, 2, 3]);
    rewrite(&case.ck().join("epoch_2.safetensors"), |t| {
        let w = t.get_mut("fc1.weight").unwrap();
        w.shape = vec![32, 128];
    });
    case.fails(
        &[],
        &[
            "epoch_2.safetensors",
            "tensor `fc1.weight` has shape [32, 128], expected [64, 64]",
        ],
    );
}

#[test]
fn a_missing_tensor_names_the_file_and_the_tensor() {
    let case = Case::digits(&[1, 2, 3]);
    rewrite(&case.ck().join("epoch_3.safetensors"), |t| {
        t.remove("fc2.bias");
    });
    case.fails(
        &[],
        &["epoch_3.safetensors", "tensor `fc2.bias` is missing"],
    );
}

#[test]
fn another_dtype_names_the_file_and_the_tensor() {
    let case = Case::digits(&[1, 2]);
    let (f16, _) = read_st(&fixture("digits_f16/checkpoints/epoch_2.safetensors"));
    rewrite(&case.ck().join("epoch_2.safetensors"), |t| {
        t.insert("fc2.bias".into(), f16["fc2.bias"].clone());
    });
    case.fails(
        &[],
        &[
            "epoch_2.safetensors",
            "tensor `fc2.bias` has dtype F16, expected F32",
        ],
    );
}

#[test]
fn a_checkpoint_tensor_that_is_not_in_the_model() {
    let case = Case::digits(&[1, 2]);
    for e in [1, 2] {
        rewrite(&case.ck().join(format!("epoch_{e}.safetensors")), |t| {
            let mut extra = t["fc2.bias"].clone();
            extra.shape = vec![10];
            t.insert("head.bias".into(), extra);
        });
    }
    case.fails(
        &[],
        &[
            "model.onnx",
            "not initializers of the model (1): `head.bias`",
            "dynamo=True, optimize=False",
        ],
    );
}

#[test]
fn batchnorm_fused_at_export_is_folded_or_refused_with_the_cause() {
    let case = Case::digits(&[]);
    let args = |model: &str| -> Vec<String> {
        vec![
            "--model".into(),
            fixture(&format!("exports/{model}")).display().to_string(),
            "--val".into(),
            fixture("exports/val_images.npz").display().to_string(),
        ]
    };
    let run = |model: &str, needles: &[&str]| {
        let mut c = cmd();
        c.arg(fixture("exports/cnn_checkpoints"))
            .arg("-o")
            .arg(case.out())
            .args(args(model));
        let mut a = c.assert().code(2);
        for n in needles {
            a = a.stderr(contains(*n));
        }
        assert!(!case.out().exists());
    };
    // The legacy exporter renames the folded weights (`onnx::Conv_16`): no layer keeps a
    // checkpoint name to fold into, so the model is refused with the cause.
    run(
        "fused_bn_legacy.onnx",
        &["onnx::Conv_", "BatchNorm was fused", "constant folding"],
    );
    // optimize=True keeps `conv.weight` with the BatchNorm folded in: the fold is found
    // (tests/batchnorm.rs checks its scores) and the model is accepted, as is the same
    // network exported without folding.
    for model in ["fused_bn.onnx", "cnn.onnx"] {
        let assert = cmd()
            .arg(fixture("exports/cnn_checkpoints"))
            .arg("-o")
            .arg(case.out())
            .args(args(model))
            .assert()
            .success();
        let folded = contains("the exporter folded BatchNorm")
            .eval(&String::from_utf8_lossy(&assert.get_output().stderr));
        assert_eq!(folded, model == "fused_bn.onnx", "{model}");
    }
}

#[test]
fn constant_folded_weights_are_refused_with_the_cause() {
    let case = Case::digits(&[]);
    let mut c = cmd();
    c.arg(fixture("exports/folded_checkpoints"))
        .arg("-o")
        .arg(case.out())
        .arg("--model")
        .arg(fixture("exports/folded.onnx"))
        .arg("--val")
        .arg(fixture("exports/val_images.npz"));
    c.assert().code(2).stderr(
        contains("onnx::MatMul_")
            .and(contains("`fc1.weight`"))
            .and(contains("constant folding")),
    );
    assert!(!case.out().exists());
}

#[test]
fn validation_data_problems_name_the_array() {
    let case = Case::digits(&[1, 2]);
    case.fails(
        &["--labels", "targets"],
        &["val.npz", "no labels array `targets`", "`x`, `y`"],
    );
    let kge_val = fixture("kge/val.npz").display().to_string();
    case.fails(
        &["--val", &kge_val],
        &["no array for model input `x`", "--input x=ARRAY"],
    );
    case.fails(
        &["--input", "x=y"],
        &["array `y` has shape [437] but model input `x` expects [?, 64]"],
    );
    let model = case.path("model.onnx").display().to_string();
    case.fails(&["--val", &model], &["not a numpy .npz archive"]);
}

#[test]
fn unknown_metric() {
    let case = Case::digits(&[1, 2]);
    case.fails(&["--metric", "f1"], &["unknown metric `f1`", "hits@K"]);
    case.fails(&["--metric", "mse"], &[]);
}

#[test]
fn a_file_that_is_not_onnx() {
    let case = Case::digits(&[1, 2]);
    let val = case.path("val.npz").display().to_string();
    case.fails(&["--model", &val], &["val.npz", "not a valid ONNX model"]);
}

#[test]
fn the_output_may_not_overwrite_an_input() {
    let case = Case::digits(&[1, 2, 3]);
    let target = case.ck().join("epoch_3.safetensors");
    let before = sha(&target);
    cmd()
        .arg(case.ck())
        .arg("--val")
        .arg(case.path("val.npz"))
        .arg("-o")
        .arg(&target)
        .assert()
        .code(2)
        .stderr(contains("epoch_3.safetensors").and(contains("is one of the inputs")));
    assert_eq!(sha(&target), before, "an input was modified");
    let model = case.path("model.onnx");
    let before = sha(&model);
    cmd()
        .arg(case.ck())
        .arg("--val")
        .arg(case.path("val.npz"))
        .arg("-o")
        .arg(&model)
        .assert()
        .code(2);
    assert_eq!(sha(&model), before);
}

#[test]
fn a_missing_onnx_runtime_library_says_where_it_looked() {
    let case = Case::digits(&[1, 2]);
    case.fails(
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
    );
}

#[test]
fn model_discovery_refuses_ambiguity() {
    let case = Case::digits(&[1, 2]);
    std::fs::copy(case.path("model.onnx"), case.path("other.onnx")).unwrap();
    case.fails(&[], &["several ONNX models", "--model"]);
}

#[test]
fn a_missing_output_directory_is_refused_before_scoring() {
    let case = Case::digits(&[1, 2]);
    let out = case.path("no/such/dir/out.safetensors");
    cmd()
        .arg(case.ck())
        .arg("--val")
        .arg(case.path("val.npz"))
        .arg("-o")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(contains("does not exist").and(contains("scoring with").not()));
    assert!(!out.exists());
}

#[test]
fn the_report_may_not_replace_the_output_under_another_spelling() {
    let case = Case::digits(&[1, 2]);
    let report = case.dir.path().join(".").join("out.safetensors");
    case.fails(
        &["--report", report.to_str().unwrap()],
        &["the report and the output are the same file"],
    );
}

#[test]
fn cuda_requested_without_a_usable_provider_is_an_error_not_a_cpu_run() {
    // The test library is the CPU-only wheel: CUDA must be refused, naming what is missing.
    let case = Case::digits(&[1, 2]);
    case.fails(
        &["--device", "cuda"],
        &[
            "--device cuda:0: CUDA is not usable",
            "onnxruntime-gpu",
            "cuDNN 9",
            "--device cpu",
        ],
    );
    case.fails(
        &["--device", "tpu"],
        &["expected cpu, cuda, cuda:N or auto"],
    );
}

#[test]
fn strategy_parameters_are_checked_before_scoring() {
    let case = Case::digits(&[1, 2, 3]);
    case.fails(
        &["--strategy", "swa", "--swa-start-at", "42"],
        &["no checkpoint has the number 42"],
    );
    case.fails(
        &["--strategy", "ema", "--ema-decay", "1.5"],
        &["--ema-decay 1.5: must be in [0, 1)"],
    );
    case.fails(
        &["--require-gain", "swa", "--swa-start", "2"],
        &["--swa-start 2: must be a fraction"],
    );
    case.fails(&["--fail-below", "NaN"], &["must be a finite score"]);
}
