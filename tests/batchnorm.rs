//! BatchNorm recalibration (`--recalibrate-bn`) against `torch.optim.swa_utils.update_bn`
//! (scripts/reference_bn.py, cross-checked there with a numpy re-implementation).
//!
//! Statistics are compared within 1e-5 relative (max abs error / max abs value per
//! tensor): they are f32 batch means and variances accumulated in a different order.

mod common;

use std::path::Path;

use common::*;
use predicates::prelude::*;
use predicates::str::contains;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9
}

/// Every tensor of `got` equals `want`: BatchNorm statistics within 1e-5 relative, the
/// rest exactly (they are the candidate's own weights).
fn assert_recalibrated(got: &Path, want: &Path) {
    let (g, _) = read_st(got);
    let (w, _) = read_st(want);
    assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    for (name, wt) in &w {
        let gt = &g[name];
        if wt.dtype == safetensors::Dtype::F32 {
            let stat = name.ends_with("running_mean") || name.ends_with("running_var");
            let tol = if stat { 1e-5 } else { 1e-6 };
            let err = max_rel_err(&gt.values(), &wt.values());
            assert!(err <= tol, "{name}: relative error {err}");
        } else {
            assert_eq!(gt.data, wt.data, "{name}");
        }
    }
}

fn bn_run(args: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    cmd()
        .arg(fixture("bn/checkpoints"))
        .arg("--val")
        .arg(fixture("bn/val.npz"))
        .arg("--recalibrate-bn")
        .arg(fixture("bn/calib.npz"))
        .args(args)
        .arg("-o")
        .arg(dir.path().join("out.safetensors"))
        .arg("--report")
        .arg(dir.path().join("r.json"))
        .assert()
        .success();
    let r = read_json(&dir.path().join("r.json"));
    (dir, r)
}

#[test]
fn aswa_with_recalibration_matches_the_reference() {
    let (dir, report) = bn_run(&[]);
    let expected = &read_json(&fixture("bn/expected/recal.json"))["aswa"];
    assert_matches_reference(&report, expected, 1e-9);
    assert_recalibrated(
        &dir.path().join("out.safetensors"),
        &fixture("bn/expected/aswa_recal.safetensors"),
    );
    let recal = &report["recalibration"];
    assert_eq!(recal["rows"], 200);
    assert_eq!(recal["batch_size"], 64);
    assert_eq!(recal["batchnorm_layers"].as_array().unwrap().len(), 2);
    let (_, meta) = read_st(&dir.path().join("out.safetensors"));
    assert!(meta["aswa_merge.recalibrated_bn"].contains("\"rows\":200"));
}

#[test]
fn a_recalibrated_checkpoint_and_average_equal_update_bn() {
    let want = read_json(&fixture("bn/expected/recal.json"));
    let (dir, r) = bn_run(&["--glob", "epoch_3.safetensors"]);
    assert_recalibrated(
        &dir.path().join("out.safetensors"),
        &fixture("bn/expected/recal_epoch_3.safetensors"),
    );
    assert!(close(
        r["val_score"].as_f64().unwrap(),
        want["val"]["epoch_3"]["recalibrated"].as_f64().unwrap()
    ));

    let (dir, r) = bn_run(&["--glob", "epoch_[456].safetensors", "--strategy", "uniform"]);
    assert_recalibrated(
        &dir.path().join("out.safetensors"),
        &fixture("bn/expected/recal_mean_4_6.safetensors"),
    );
    assert!(close(
        r["val_score"].as_f64().unwrap(),
        want["val"]["mean_4_6"]["recalibrated"].as_f64().unwrap()
    ));
}

#[test]
fn batchnorm1d_in_an_mlp_is_recalibrated_too() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let report = dir.path().join("r.json");
    cmd()
        .arg(fixture("digits/checkpoints"))
        .arg("--val")
        .arg(fixture("digits/val.npz"))
        .arg("--recalibrate-bn")
        .arg(fixture("digits/calib.npz"))
        .args(["--glob", "epoch_5.safetensors", "-o"])
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .assert()
        .success();
    assert_recalibrated(&out, &fixture("digits/expected/recal_epoch_5.safetensors"));
    let want = read_json(&fixture("digits/expected/recal.json"));
    let got = read_json(&report)["val_score"].as_f64().unwrap();
    assert!(close(
        got,
        want["val"]["epoch_5"]["recalibrated"].as_f64().unwrap()
    ));
}

#[test]
fn compare_shows_scores_with_and_without_recalibration() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    cmd()
        .arg("compare")
        .arg(fixture("bn/checkpoints"))
        .arg("--val")
        .arg(fixture("bn/val.npz"))
        .arg("--recalibrate-bn")
        .arg(fixture("bn/calib.npz"))
        .args([
            "--also-without-bn",
            "--strategies",
            "aswa,best,last",
            "--report",
        ])
        .arg(&report)
        .assert()
        .success()
        .stderr(contains("no-recal"));
    let r = read_json(&report);
    let plain = read_json(&fixture("bn/expected/aswa_accuracy.json"));
    // ASWA's result with recalibration (epochs 3, 4), scored without it; and the last
    // checkpoint as it is: plain ASWA's step 6 scored epoch_6 as it is.
    let last_plain = plain["steps"][5]["running_score"].as_f64().unwrap();
    assert!(close(
        r["strategies"]["last"]["val_score_without_bn"]
            .as_f64()
            .unwrap(),
        last_plain
    ));
    assert!(r["strategies"]["aswa"]["val_score_without_bn"].is_number());
}

#[test]
fn a_model_without_batchnorm_makes_the_flag_a_notice() {
    let dir = tempfile::tempdir().unwrap();
    cmd()
        .arg(fixture("kge/checkpoints"))
        .arg("--val")
        .arg(fixture("kge/val.npz"))
        .args(["--metric", "mrr", "--recalibrate-bn"])
        .arg(fixture("kge/val.npz"))
        .arg("-o")
        .arg(dir.path().join("o.safetensors"))
        .assert()
        .success()
        .stderr(contains("no BatchNormalization").and(contains("nothing to do")));
}

#[test]
fn calibration_data_of_the_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    cmd()
        .arg(fixture("bn/checkpoints"))
        .arg("--val")
        .arg(fixture("bn/val.npz"))
        .arg("--recalibrate-bn")
        .arg(fixture("digits/calib.npz"))
        .arg("-o")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(
            contains("calib.npz").and(contains("has shape [300, 64] but model input `x` expects")),
        );
    assert!(!out.exists());
}

#[test]
fn a_calibration_set_smaller_than_one_batch_is_one_batch() {
    // 200 rows, batches of 512: one batch; with batches of 200 the result is the same.
    let (a, ra) = bn_run(&["--calib-batch-size", "512", "--glob", "epoch_3.safetensors"]);
    let (b, _) = bn_run(&["--calib-batch-size", "200", "--glob", "epoch_3.safetensors"]);
    assert_eq!(ra["recalibration"]["batch_size"], 512);
    let (ta, _) = read_st(&a.path().join("out.safetensors"));
    let (tb, _) = read_st(&b.path().join("out.safetensors"));
    assert!(ta == tb, "one batch of 200 rows either way");
    // ... and differs from batches of 64 (statistics depend on the batch composition).
    let (ref64, _) = read_st(&fixture("bn/expected/recal_epoch_3.safetensors"));
    assert!(ta["bn2.running_var"] != ref64["bn2.running_var"]);
}

#[test]
fn a_calibration_batch_of_one_row_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    cmd()
        .arg(fixture("digits/checkpoints"))
        .arg("--val")
        .arg(fixture("digits/val.npz"))
        .arg("--recalibrate-bn")
        .arg(fixture("digits/calib.npz"))
        .args([
            "--calib-batch-size",
            "1",
            "--glob",
            "epoch_5.safetensors",
            "-o",
        ])
        .arg(dir.path().join("o.safetensors"))
        .assert()
        .code(2)
        .stderr(contains("unbiased variance needs at least 2"));
}

// ---------------------------------------------------------------- folded BatchNorm

/// Runs `args` on fixtures/bn_folded/checkpoints with the `folded`, `legacy` or `unfolded`
/// export; returns the scratch directory (holding out.safetensors, r.json) and the report.
fn folded_run(model: &str, args: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    run_on(
        &fixture("bn_folded/checkpoints"),
        &format!("bn_folded/{model}.onnx"),
        "bn_folded/val.npz",
        args,
    )
}

/// Runs `args` on checkpoint directory `ck` with fixture `model` and validation `val`
/// (`compare` writes into out/, the others out.safetensors); returns the scratch
/// directory and the report.
fn run_on(
    ck: &Path,
    model: &str,
    val: &str,
    args: &[&str],
) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    cmd()
        .args(args)
        .arg(ck)
        .arg("--model")
        .arg(fixture(model))
        .arg("--val")
        .arg(fixture(val))
        .arg("-o")
        .arg(dir.path().join(if args.first() == Some(&"compare") {
            "out"
        } else {
            "out.safetensors"
        }))
        .arg("--report")
        .arg(dir.path().join("r.json"))
        .assert()
        .success();
    let r = read_json(&dir.path().join("r.json"));
    (dir, r)
}

/// `torch.onnx.export`'s defaults fold BatchNorm into the convolutions (conv1 keeps its
/// bias name, conv2 had no bias and gets a new one). Scoring each candidate folded the
/// same way must give what the unfolded export of the same network gives: the same
/// decisions and scores for every strategy, the same written (unfolded) tensors.
#[test]
fn a_model_exported_with_folded_batchnorm_scores_like_the_unfolded_export() {
    // Cross-entropy, not accuracy: a wrong ε or a slightly wrong fold would leave every
    // accuracy unchanged but not the loss.
    let args = ["compare", "--metric", "cross-entropy"];
    let (_u, unfolded) = folded_run("unfolded", &args);
    assert!(unfolded.get("folded_batchnorm").is_none());
    // legacy.onnx: the legacy exporter also renames the folded weights and biases
    // (`onnx::Conv_27`...), found by their values (scripts/gen_legacy_exports.py).
    for (model, first_fold) in [
        ("folded", "bn1 into conv1.weight, eps 0.00001"),
        (
            "legacy",
            "bn1 into conv1.weight (initializer onnx::Conv_27), eps 0.00001",
        ),
    ] {
        let (_f, folded) = folded_run(model, &args);
        let folds = folded["folded_batchnorm"]
            .as_array()
            .expect("folds reported");
        assert_eq!(folds.len(), 2, "{model}: {folds:?}");
        assert_eq!(folds[0].as_str().unwrap(), first_fold, "{model}");
        assert_scores_like_the_unfolded_export(&folded, &unfolded);
    }

    // An average written from the folded model: the checkpoints' unfolded tensors.
    let (u, _) = folded_run("unfolded", &["--strategy", "uniform"]);
    let (ut, _) = read_st(&u.path().join("out.safetensors"));
    for model in ["folded", "legacy"] {
        let (f, _) = folded_run(model, &["--strategy", "uniform"]);
        let (ft, _) = read_st(&f.path().join("out.safetensors"));
        assert!(ft.contains_key("bn2.running_var") && !ft.contains_key("conv2.weight_bias"));
        assert_eq!(ft, ut, "{model}");
    }
}

/// A float16 model (`model.half()`) exported with torch's defaults folds BatchNorm in
/// float16: the fold is found within float16's precision and every strategy gives what
/// the float16 export that kept the BatchNorm gives (scores within 1e-3: the two models
/// round differently in float16).
#[test]
fn a_float16_model_with_batchnorm_folded_scores_like_its_unfolded_export() {
    let run = |model: &str| {
        run_on(
            &fixture("digits_f16/checkpoints"),
            &format!("digits_f16/half/{model}.onnx"),
            "digits/val.npz",
            &["compare", "--metric", "cross-entropy"],
        )
    };
    let (_f, folded) = run("folded");
    let (_u, unfolded) = run("unfolded");
    assert_eq!(
        folded["folded_batchnorm"],
        serde_json::json!(["bn into fc1.weight, eps 0.00001"])
    );
    assert_scores_like_the_unfolded_export_within(&folded, &unfolded, 1e-3);
}

/// Every strategy of `compare` chose the same members with the same scores (1e-5
/// relative), and ASWA made the same decisions on the same checkpoint scores.
fn assert_scores_like_the_unfolded_export(
    folded: &serde_json::Value,
    unfolded: &serde_json::Value,
) {
    assert_scores_like_the_unfolded_export_within(folded, unfolded, 1e-5)
}

/// [`assert_scores_like_the_unfolded_export`] with relative tolerance `tol`.
fn assert_scores_like_the_unfolded_export_within(
    folded: &serde_json::Value,
    unfolded: &serde_json::Value,
    tol: f64,
) {
    for name in aswa_merge::strategies::ALL {
        let (f, u) = (&folded["strategies"][name], &unfolded["strategies"][name]);
        assert_eq!(f["members"], u["members"], "{name}");
        let (fs, us) = (
            f["val_score"].as_f64().unwrap(),
            u["val_score"].as_f64().unwrap(),
        );
        assert!(
            (fs - us).abs() <= tol * us.abs(),
            "{name}: {fs} folded vs {us} unfolded"
        );
    }
    let steps = |r: &serde_json::Value| -> Vec<(String, f64)> {
        r["strategies"]["aswa"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["decision"].as_str().unwrap().to_string(),
                    s["running_score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (fs, us) = (steps(folded), steps(unfolded));
    assert_eq!(fs.len(), us.len());
    for ((fd, fv), (ud, uv)) in fs.iter().zip(&us) {
        assert_eq!(fd, ud, "decisions differ: {fs:?} vs {us:?}");
        assert!((fv - uv).abs() <= tol * uv.abs(), "{fv} vs {uv}");
    }
}

/// Checkpoints saved through DistributedDataParallel (`module.conv1.weight`) with a folded
/// export of the unwrapped model: the fold is found through the prefix mapping, for the
/// names kept (torch's default) and renamed (legacy exporter), and the run is the one of
/// the unprefixed checkpoints; the output keeps the prefixed names.
#[test]
fn folds_are_found_through_a_wrapper_prefix_of_the_checkpoint_names() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoints");
    copy_with_prefix(&fixture("bn_folded/checkpoints"), "module.", &ck);
    let steps = |r: &serde_json::Value| -> Vec<(String, f64)> {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let d = s["decision"].as_str().unwrap().to_string();
                (d, s["running_score"].as_f64().unwrap())
            })
            .collect()
    };
    let args = ["--metric", "cross-entropy"];
    for model in ["folded", "legacy"] {
        let (_d, plain) = folded_run(model, &args);
        let (out, r) = run_on(
            &ck,
            &format!("bn_folded/{model}.onnx"),
            "bn_folded/val.npz",
            &args,
        );
        assert_eq!(r["rename"]["strip"], "module.", "{model}");
        let folds = r["folded_batchnorm"].as_array().unwrap();
        assert_eq!(folds.len(), 2, "{model}: {folds:?}");
        assert!(folds[0]
            .as_str()
            .unwrap()
            .starts_with("module.bn1 into module.conv1.weight"));
        let (got, want) = (steps(&r), steps(&plain));
        assert_eq!(got.len(), want.len());
        for ((gd, gv), (wd, wv)) in got.iter().zip(&want) {
            assert_eq!(gd, wd, "{model}");
            assert!((gv - wv).abs() <= 1e-6 * wv.abs(), "{model}: {gv} vs {wv}");
        }
        let (t, _) = read_st(&out.path().join("out.safetensors"));
        assert!(t.keys().all(|n| n.starts_with("module.")), "{model}");
    }

    // One tensor more than the model has: the message names it, through the prefix and
    // the fold, rather than every prefixed name.
    for path in walk(&ck) {
        let (mut tensors, _) = read_st(&path);
        let extra = tensors["module.fc.bias"].clone();
        tensors.insert("module.extra.bias".into(), extra);
        write_st(&path, &tensors);
    }
    for model in ["folded", "legacy"] {
        cmd()
            .arg(&ck)
            .arg("--model")
            .arg(fixture(&format!("bn_folded/{model}.onnx")))
            .arg("--val")
            .arg(fixture("bn_folded/val.npz"))
            .arg("-o")
            .arg(dir.path().join("never.safetensors"))
            .assert()
            .code(2)
            .stderr(
                contains("not initializers of the model (1): `module.extra.bias`")
                    .and(contains("module.fc.weight").not()),
            );
    }
}

/// `--export-onnx` of a folded model embeds the result folded: Python onnxruntime scores
/// the exported file as the tool reported.
#[test]
fn exporting_a_folded_model_embeds_the_folded_result() {
    for model in ["folded", "legacy"] {
        let dir = tempfile::tempdir().unwrap();
        let onnx = dir.path().join("result.onnx");
        let (_d, report) = folded_run(
            model,
            &[
                "--strategy",
                "uniform",
                "--metric",
                "cross-entropy",
                "--export-onnx",
                onnx.to_str().unwrap(),
            ],
        );
        let scored = python_score(&onnx, &fixture("bn_folded/val.npz"), "cross-entropy");
        let reported = report["val_score"].as_f64().unwrap();
        assert!(
            (scored - reported).abs() <= 1e-5 * reported.abs(),
            "{model}: {scored} vs {reported}"
        );
    }
}

/// The folded values must be the fold of some checkpoint (the state the model was
/// exported from). Without it the model is refused as before, with the explanation.
#[test]
fn a_folded_model_from_a_state_that_is_not_a_checkpoint_is_refused() {
    let case = Case::digits(&[]);
    let ck = case.ck();
    for e in 1..=5 {
        let name = format!("epoch_{e}.safetensors");
        std::fs::copy(fixture("bn_folded/checkpoints").join(&name), ck.join(&name)).unwrap();
    }
    let val = fixture("bn_folded/val.npz").display().to_string();
    for (model, named) in [("folded", "bn2.running_var"), ("legacy", "onnx::Conv_27")] {
        let model = fixture(&format!("bn_folded/{model}.onnx"))
            .display()
            .to_string();
        case.fails(
            &["--model", &model, "--val", &val],
            &["BatchNorm was fused", named],
        );
        // Refused by the name check, not after a fold was found.
        case.command(&["--model", &model, "--val", &val])
            .assert()
            .code(2)
            .stderr(contains("the exporter folded").not());
    }
}

/// Recalibrating needs BatchNormalization nodes: with a folded model it is refused
/// rather than silently skipped.
#[test]
fn recalibration_of_a_folded_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    cmd()
        .arg(fixture("bn_folded/checkpoints"))
        .arg("--model")
        .arg(fixture("bn_folded/folded.onnx"))
        .arg("--val")
        .arg(fixture("bn_folded/val.npz"))
        .arg("--recalibrate-bn")
        .arg(fixture("bn_folded/val.npz"))
        .arg("-o")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(contains("--recalibrate-bn").and(contains("optimize=False")));
    assert!(!out.exists());
}
