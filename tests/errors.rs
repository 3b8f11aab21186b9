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

/// BatchNorm fused at export: `optimize=True` keeps `conv.weight` holding the fused
/// values, the legacy exporter renames it (`onnx::Conv_16`). Either way the fold is found
/// from the values and the run scores like the export that kept the BatchNorm (the
/// positive control, `cnn.onnx`, scored by name).
#[test]
fn batchnorm_fused_at_export_is_folded_and_scores_like_the_unfused_export() {
    let run = |model: &str| -> (String, serde_json::Value) {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("r.json");
        let assert = cmd()
            .arg(fixture("exports/cnn_checkpoints"))
            .arg("-o")
            .arg(dir.path().join("o.safetensors"))
            .args(["--metric", "cross-entropy", "--report"])
            .arg(&report)
            .arg("--model")
            .arg(fixture(&format!("exports/{model}")))
            .arg("--val")
            .arg(fixture("exports/val_images.npz"))
            .assert()
            .success();
        let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
        (stderr, read_json(&report))
    };
    let (stderr, plain) = run("cnn.onnx");
    assert!(!stderr.contains("the exporter folded"), "{stderr}");
    let scores = |r: &serde_json::Value| -> Vec<f64> {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| [s["running_score"].as_f64(), s["ensemble_score"].as_f64()])
            .map(Option::unwrap)
            .collect()
    };
    for (model, fold) in [
        ("fused_bn.onnx", "bn into conv.weight, eps 0.00001"),
        (
            "fused_bn_legacy.onnx",
            "bn into conv.weight (initializer onnx::Conv_16), eps 0.00001",
        ),
    ] {
        let (stderr, folded) = run(model);
        assert!(stderr.contains("the exporter folded BatchNorm"), "{stderr}");
        assert_eq!(folded["folded_batchnorm"], serde_json::json!([fold]));
        assert_eq!(folded["members"], plain["members"], "{model}");
        for (f, p) in scores(&folded).iter().zip(scores(&plain)) {
            assert!((f - p).abs() <= 1e-5 * p.abs(), "{model}: {f} vs {p}");
        }
    }
}

/// The legacy exporter stores `fc1.weight` transposed under `onnx::MatMul_22` (a Linear
/// applied to a 3-D input). It is fed transposed when it is the transpose of one of the
/// checkpoints (the model was exported from epoch 2); without that checkpoint nothing
/// says what it is, and the model is refused with the cause.
#[test]
fn constant_folded_weights_are_refused_with_the_cause_unless_a_checkpoint_explains_them() {
    let case = Case::digits(&[]);
    let ck = case.ck();
    std::fs::copy(
        fixture("exports/folded_checkpoints/epoch_1.safetensors"),
        ck.join("epoch_1.safetensors"),
    )
    .unwrap();
    let model = fixture("exports/folded.onnx").display().to_string();
    let val = fixture("digits/val.npz").display().to_string();
    case.fails(
        &["--model", &model, "--val", &val],
        &["onnx::MatMul_", "`fc1.weight`", "constant folding"],
    );

    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("result.onnx");
    let assert = cmd()
        .arg(fixture("exports/folded_checkpoints"))
        .arg("-o")
        .arg(dir.path().join("o.safetensors"))
        .args([
            "--model",
            &model,
            "--val",
            &val,
            "--metric",
            "cross-entropy",
        ])
        .arg("--report")
        .arg(dir.path().join("r.json"))
        .arg("--export-onnx")
        .arg(&onnx)
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr);
    assert!(stderr.contains("onnx::MatMul_22 = fc1.weightᵀ"), "{stderr}");
    let report = read_json(&dir.path().join("r.json"));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs();
    // The model file holds epoch 2's state: the tool's score of epoch 2 is the
    // independent Python scorer's score of the file as it is.
    let epoch_2 = report["steps"][1]["running_score"].as_f64().unwrap();
    let as_exported = python_score(
        &fixture("exports/folded.onnx"),
        &fixture("digits/val.npz"),
        "cross-entropy",
    );
    assert!(close(epoch_2, as_exported), "{epoch_2} vs {as_exported}");
    // The exported model (the result's fc1.weight transposed into onnx::MatMul_22)
    // scores as reported.
    let reported = report["val_score"].as_f64().unwrap();
    let scored = python_score(&onnx, &fixture("digits/val.npz"), "cross-entropy");
    assert!(close(scored, reported), "{scored} vs {reported}");
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
fn weights_as_constants_cannot_also_be_bound_as_inputs() {
    let case = Case::digits(&[1, 2]);
    case.fails(
        &["--weights-as", "constants", "--io-binding", "on"],
        &["--io-binding on", "--weights-as constants", "choose one"],
    );
    case.fails(
        &["--weights-as", "initializers"],
        &["expected auto, inputs or constants"],
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
