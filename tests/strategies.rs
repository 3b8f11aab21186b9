//! Every strategy, `compare`, CI gates, ONNX export, plots and provenance, end to end,
//! against the independent Python reference (`scripts/reference_strategies.py`).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use predicates::prelude::*;
use predicates::str::contains;

const SCORE_TOL: f64 = 1e-5;

fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= SCORE_TOL * y.abs().max(1e-12),
        (None, None) => true,
        _ => false,
    }
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| file_name(s.as_str().unwrap()))
        .collect()
}

fn digits(kind: &str) -> Vec<String> {
    vec![
        fixture(&format!("{kind}/checkpoints"))
            .display()
            .to_string(),
        "--model".into(),
        fixture("digits/model.onnx").display().to_string(),
        "--val".into(),
        fixture("digits/val.npz").display().to_string(),
        "--test".into(),
        fixture("digits/test.npz").display().to_string(),
    ]
}

/// Runs `compare` with `extra` args into a fresh directory; returns (dir, report).
fn compare(kind: &str, extra: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    cmd()
        .arg("compare")
        .args(digits(kind))
        .args(extra)
        .arg("-o")
        .arg(dir.path())
        .arg("--report")
        .arg(&report)
        .assert()
        .success();
    let r = read_json(&report);
    (dir, r)
}

/// Each strategy's members, validation and test scores, and weights equal the reference's.
fn assert_strategies_match(
    dir: &Path,
    report: &serde_json::Value,
    expected: &Path,
    weights: &Path,
) {
    let want = read_json(expected);
    let got = &report["strategies"];
    for (name, w) in want["strategies"].as_object().unwrap() {
        let g = &got[name];
        assert!(g.is_object(), "strategy {name} missing from the report");
        assert_eq!(
            names(&g["members"]),
            names(&w["members"]),
            "{name}: members"
        );
        assert!(
            close(&g["val_score"], &w["val_score"]),
            "{name}: val {} vs {}",
            g["val_score"],
            w["val_score"]
        );
        assert!(
            close(&g["test_score"], &w["test_score"]),
            "{name}: test {} vs {}",
            g["test_score"],
            w["test_score"]
        );
        assert_weights_match(
            &dir.join(format!("{name}.safetensors")),
            &weights.join(format!("{name}.safetensors")),
        );
    }
}

#[test]
fn every_strategy_matches_the_reference_f32() {
    let (dir, report) = compare("digits", &[]);
    assert_strategies_match(
        dir.path(),
        &report,
        &fixture("digits/expected/strategies_accuracy.json"),
        &fixture("digits/expected/strategies"),
    );
    assert_eq!(report["strategies"].as_object().unwrap().len(), 8);
    // The report lists the strategies in the order they ran (the winner's tie rule).
    let text = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    let at = |s: &str| {
        text.find(&format!("\"{s}\": {{"))
            .unwrap_or_else(|| panic!("{s}"))
    };
    let names = [
        "aswa",
        "swa",
        "uniform",
        "ema",
        "top-k",
        "greedy-soup",
        "best",
        "last",
    ];
    assert!(
        names.windows(2).all(|w| at(w[0]) < at(w[1])),
        "not in run order"
    );
    // aswa and swa tie at 403/437 on validation; the earlier in the list wins.
    assert_eq!(report["winner"], "aswa");
}

#[test]
fn every_strategy_matches_the_reference_bf16() {
    let (dir, report) = compare("digits_bf16", &[]);
    assert_strategies_match(
        dir.path(),
        &report,
        &fixture("digits_bf16/expected/strategies_accuracy.json"),
        &fixture("digits_bf16/expected/strategies"),
    );
}

#[test]
fn strategy_parameters_match_the_reference() {
    let (dir, report) = compare(
        "digits",
        &[
            "--strategies",
            "swa,uniform,ema,top-k,greedy-soup",
            "--swa-start-at",
            "10",
            "--swa-every",
            "2",
            "--last",
            "4",
            "--ema-decay",
            "0.5",
            "--k",
            "3",
            "--strict",
        ],
    );
    assert_strategies_match(
        dir.path(),
        &report,
        &fixture("digits/expected/strategies_params.json"),
        &fixture("digits/expected/strategies_params"),
    );
    assert_eq!(report["strategies"]["ema"]["params"]["ema_decay"], "0.5");
}

#[test]
fn compare_prints_a_table_and_pick_writes_only_the_winner() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("winner.safetensors");
    cmd()
        .arg("compare")
        .args(digits("digits"))
        .args(["--strategies", "best,last,swa", "--pick", "-o"])
        .arg(&out)
        .assert()
        .success()
        .stderr(
            contains("strategy")
                .and(contains("validation"))
                .and(contains("test"))
                .and(contains("winner on validation: swa")),
        );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the winner is written"
    );
    let (_, meta) = read_st(&out);
    assert_eq!(meta["aswa_merge.strategy"], "swa");
}

#[test]
fn the_main_command_runs_any_strategy_and_reports_test_scores() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let report = dir.path().join("r.json");
    cmd()
        .args(digits("digits"))
        .args(["--strategy", "greedy-soup", "-o"])
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .assert()
        .success()
        .stderr(contains("result (greedy-soup)").and(contains("last checkpoint")));
    let r = read_json(&report);
    let want = &read_json(&fixture("digits/expected/strategies_accuracy.json"))["strategies"];
    assert_eq!(r["strategy"], "greedy-soup");
    assert_eq!(names(&r["members"]), names(&want["greedy-soup"]["members"]));
    assert!(close(&r["test_score"], &want["greedy-soup"]["test_score"]));
    assert!(close(&r["last_test_score"], &want["last"]["test_score"]));
    assert_weights_match(
        &out,
        &fixture("digits/expected/strategies/greedy-soup.safetensors"),
    );
}

fn gate_run(extra: &[&str]) -> (PathBuf, serde_json::Value, i32, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let report = dir.path().join("r.json");
    let code = cmd()
        .args(digits("digits"))
        .args(extra)
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap()
        .status
        .code()
        .unwrap();
    let r = read_json(&report);
    (out, r, code, dir)
}

#[test]
fn gates_fail_with_exit_code_3_and_still_write_the_output() {
    // ASWA scores 403/437 = 0.922.
    let (out, r, code, _d) = gate_run(&["--fail-below", "0.95"]);
    assert_eq!(code, 3);
    assert!(
        out.is_file(),
        "the output is written so the failure can be inspected"
    );
    assert_eq!(r["gate"]["passed"], false);
    assert!(r["gate"]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("--fail-below"));

    let (_, r, code, _d) = gate_run(&["--fail-below", "0.9", "--require-gain", "last"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["gate"]["passed"], true);
    assert!(close(
        &r["gate"]["baseline_score"],
        &serde_json::json!(386.0 / 437.0)
    ));

    // SWA also scores 403/437: ASWA does not beat it.
    let (_, r, code, _d) = gate_run(&["--require-gain", "swa"]);
    assert_eq!(code, 3);
    assert!(r["gate"]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("`swa` baseline"));
}

#[test]
fn the_exported_onnx_gives_the_reported_score_in_python_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("merged.onnx");
    let report = dir.path().join("r.json");
    cmd()
        .args(digits("digits"))
        .arg("-o")
        .arg(dir.path().join("m.safetensors"))
        .arg("--export-onnx")
        .arg(&onnx)
        .arg("--report")
        .arg(&report)
        .assert()
        .success();
    let reported = read_json(&report)["val_score"].as_f64().unwrap();
    let scored = python_score(&onnx, &fixture("digits/val.npz"), "accuracy");
    assert!(
        (scored - reported).abs() < 1e-9,
        "python {scored} vs reported {reported}"
    );
    // The graph is the original one: same nodes, inputs and outputs, weights inline.
    assert!(!dir.path().join("merged.onnx.data").exists());
}

#[test]
fn plots_are_valid_svg_and_png_of_the_expected_size() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("run.svg");
    cmd()
        .args(digits("digits"))
        .arg("-o")
        .arg(dir.path().join("a.safetensors"))
        .arg("--plot")
        .arg(&svg)
        .assert()
        .success();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.trim_start().starts_with("<svg") || text.starts_with("<?xml"),
        "not SVG"
    );
    assert!(text.trim_end().ends_with("</svg>") && text.contains("ensemble"));

    let png = dir.path().join("compare.png");
    cmd()
        .arg("compare")
        .args(digits("digits"))
        .arg("--plot")
        .arg(&png)
        .assert()
        .success();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (1000, 1100), "bars with the ASWA steps above them");

    let bad = dir.path().join("run.jpg");
    cmd()
        .args(digits("digits"))
        .arg("--plot")
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(contains(".svg or .png"));
}

#[test]
fn provenance_lists_every_input_with_its_sha256() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    cmd()
        .args(digits("digits"))
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    let (_, meta) = read_st(&out);
    let inputs: serde_json::Value = serde_json::from_str(&meta["aswa_merge.inputs"]).unwrap();
    let inputs = inputs.as_array().unwrap();
    assert_eq!(inputs.len(), 15);
    for i in inputs {
        let path = Path::new(i["path"].as_str().unwrap());
        let bytes = std::fs::read(path).unwrap();
        let hex: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(i["sha256"], hex.as_str(), "{}", path.display());
        assert_eq!(i["bytes"], bytes.len());
    }
    assert_eq!(meta["aswa_merge.params"], r#"{"accept_ties":"false"}"#);
}

#[test]
fn an_unknown_strategy_is_refused_before_scoring() {
    cmd()
        .args(digits("digits"))
        .args(["--strategy", "median"])
        .assert()
        .code(2)
        .stderr(contains("unknown strategy `median`").and(contains("greedy-soup")));
}

#[test]
fn an_export_over_the_inline_limit_uses_external_data_and_still_scores_the_same() {
    // The > 2 GB layout, exercised with a limit of 0 bytes: every initializer of 1 KiB or
    // more goes to `merged.onnx.data`, and Python onnxruntime loads it from there.
    use aswa_merge::averaging::Candidate;
    use aswa_merge::scoring::onnx::{export_with_limit, plan_binding, OnnxModel};
    use aswa_merge::storage::{CheckpointSet, CheckpointSource};
    let dir = tempfile::tempdir().unwrap();
    let set = CheckpointSet::open(vec![CheckpointSource::File(fixture(
        "digits/checkpoints/epoch_12.safetensors",
    ))])
    .unwrap();
    let model = OnnxModel::load(&fixture("digits/model.onnx")).unwrap();
    let binding = plan_binding(&model, set.specs(), &[]).unwrap();
    let onnx = dir.path().join("merged.onnx");
    let candidate = Candidate::Checkpoint(0);
    export_with_limit(
        &model,
        &binding,
        set.specs(),
        |t| candidate.tensor_bytes(&set, t),
        &onnx,
        0,
    )
    .unwrap();
    let data = dir.path().join("merged.onnx.data");
    assert!(data.is_file() && std::fs::metadata(&data).unwrap().len() > 16_000);
    let scored = python_score(&onnx, &fixture("digits/val.npz"), "accuracy");
    let want = read_json(&fixture("digits/expected/aswa_accuracy.json"))["steps"][11]
        ["running_score"]
        .as_f64()
        .unwrap();
    assert!(
        (scored - want).abs() < 1e-12,
        "{scored} vs epoch_12's {want}"
    );
}
