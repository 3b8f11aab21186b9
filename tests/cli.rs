//! End-to-end runs of the built binary on the bundled fixtures, checked against the
//! independent Python reference (`scripts/reference_aswa.py`, numpy + onnxruntime).

mod common;

use common::*;
use predicates::prelude::*;
use predicates::str::contains;

/// Scores from ONNX Runtime in Rust and in Python agree within this relative tolerance
/// (float32 forward passes; the reference feeds the whole set as one batch).
const SCORE_TOL: f64 = 1e-5;

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn out(&self) -> std::path::PathBuf {
        self.dir.path().join("merged.safetensors")
    }
    fn report(&self) -> std::path::PathBuf {
        self.dir.path().join("report.json")
    }
    /// Runs on `ckpts` with `args`, expecting success; returns the report.
    fn ok(&self, ckpts: &str, args: &[&str]) -> serde_json::Value {
        cmd()
            .arg(fixture(ckpts))
            .args(args)
            .arg("-o")
            .arg(self.out())
            .arg("--report")
            .arg(self.report())
            .assert()
            .success();
        read_json(&self.report())
    }
}

fn digits_args() -> Vec<String> {
    vec![
        "--model".into(),
        fixture("digits/model.onnx").display().to_string(),
        "--val".into(),
        fixture("digits/val.npz").display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn digits_accuracy_matches_the_python_reference() {
    let run = Run::new();
    let report = run.ok("digits/checkpoints", &strs(&digits_args()));
    let expected = read_json(&fixture("digits/expected/aswa_accuracy.json"));
    assert_matches_reference(&report, &expected, SCORE_TOL);
    // The fixture exercises every decision.
    let decisions: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["decision"].as_str().unwrap())
        .collect();
    for d in ["init", "hard", "soft", "reject"] {
        assert!(decisions.contains(&d), "no {d} step in {decisions:?}");
    }
    assert_weights_match(
        &run.out(),
        &fixture("digits/expected/aswa_accuracy.safetensors"),
    );
    assert_eq!(report["strategy"], "aswa");
    assert_eq!(report["output"], run.out().display().to_string());
    assert_eq!(report["execution_provider"], "CPUExecutionProvider");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(run.out()).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o644,
            "the output is readable by others, as files usually are"
        );
    }
}

#[test]
fn output_metadata_records_how_it_was_made() {
    let run = Run::new();
    let report = run.ok("digits/checkpoints", &strs(&digits_args()));
    let (tensors, meta) = read_st(&run.out());
    assert_eq!(meta["aswa_merge.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["aswa_merge.strategy"], "aswa");
    assert_eq!(meta["aswa_merge.metric"], "accuracy");
    assert_eq!(meta["format"], "pt");
    let members: Vec<String> = serde_json::from_str(&meta["aswa_merge.members"]).unwrap();
    assert_eq!(members.len(), 3);
    let score: f64 = meta["aswa_merge.val_score"].parse().unwrap();
    assert!((score - report["val_score"].as_f64().unwrap()).abs() < 1e-6);
    // The integer buffer is carried over from the newest member, not averaged.
    let (newest, _) = read_st(&fixture("digits/checkpoints/epoch_14.safetensors"));
    assert_eq!(
        tensors["bn.num_batches_tracked"],
        newest["bn.num_batches_tracked"]
    );
    assert_eq!(tensors["bn.num_batches_tracked"].shape, Vec::<usize>::new());
}

#[test]
fn digits_cross_entropy_is_minimised() {
    let run = Run::new();
    let mut args = digits_args();
    args.extend(["--metric".into(), "cross-entropy".into()]);
    let report = run.ok("digits/checkpoints", &strs(&args));
    assert_eq!(report["higher_is_better"], false);
    assert_matches_reference(
        &report,
        &read_json(&fixture("digits/expected/aswa_cross_entropy.json")),
        SCORE_TOL,
    );
    assert_weights_match(
        &run.out(),
        &fixture("digits/expected/aswa_cross_entropy.safetensors"),
    );
}

#[test]
fn accept_ties_turns_an_equal_lookahead_into_a_soft_update() {
    let run = Run::new();
    let mut args = digits_args();
    args.push("--accept-ties".into());
    let report = run.ok("digits/checkpoints", &strs(&args));
    assert_eq!(report["params"]["accept_ties"], "true");
    assert_matches_reference(
        &report,
        &read_json(&fixture("digits/expected/aswa_accuracy_ties.json")),
        SCORE_TOL,
    );
}

#[test]
fn half_precision_checkpoints_average_in_wider_precision_and_round_back() {
    for kind in ["f16", "bf16"] {
        let run = Run::new();
        let report = run.ok(&format!("digits_{kind}/checkpoints"), &strs(&digits_args()));
        assert_matches_reference(
            &report,
            &read_json(&fixture(&format!(
                "digits_{kind}/expected/aswa_accuracy.json"
            ))),
            SCORE_TOL,
        );
        assert_weights_match(
            &run.out(),
            &fixture(&format!("digits_{kind}/expected/aswa_accuracy.safetensors")),
        );
        let (t, _) = read_st(&run.out());
        let want = if kind == "f16" {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::BF16
        };
        assert_eq!(
            t["fc1.weight"].dtype, want,
            "{kind}: output keeps the checkpoints' dtype"
        );
    }
}

#[test]
fn knowledge_graph_ranking_with_filter_matches_the_reference() {
    let run = Run::new();
    let val = fixture("kge/val.npz").display().to_string();
    let filter = fixture("kge/filter.npz").display().to_string();
    let report = run.ok(
        "kge/checkpoints",
        &["--val", &val, "--metric", "mrr", "--filter", &filter],
    );
    assert_matches_reference(
        &report,
        &read_json(&fixture("kge/expected/aswa_mrr_filtered.json")),
        SCORE_TOL,
    );
    assert_weights_match(
        &run.out(),
        &fixture("kge/expected/aswa_mrr_filtered.safetensors"),
    );

    let run = Run::new();
    let report = run.ok("kge/checkpoints", &["--val", &val, "--metric", "hits@3"]);
    assert_matches_reference(
        &report,
        &read_json(&fixture("kge/expected/aswa_hits3.json")),
        SCORE_TOL,
    );
}

/// The legacy exporter (`dynamo=False`, constant folding) stores `ent.weight.t()` of
/// DistMult's scoring `@ E.t()` as a new initializer `onnx::MatMul_9`: the tool feeds it
/// each candidate's `ent.weight` transposed, so the run is the reference run of the
/// export that keeps the names, with or without weights bound once, and with the weights
/// as constants.
#[test]
fn a_constant_folded_transpose_is_fed_each_candidates_tensor_transposed() {
    let val = fixture("kge/val.npz").display().to_string();
    let filter = fixture("kge/filter.npz").display().to_string();
    let model = fixture("kge/legacy/model.onnx").display().to_string();
    for (option, binding) in [
        ("--io-binding", "off"),
        ("--io-binding", "on"),
        ("--weights-as", "constants"),
    ] {
        let run = Run::new();
        let report = run.ok(
            "kge/checkpoints",
            &[
                "--model", &model, "--val", &val, "--metric", "mrr", "--filter", &filter, option,
                binding,
            ],
        );
        assert_eq!(
            report["transposed"],
            serde_json::json!(["onnx::MatMul_9 = ent.weightᵀ"]),
            "{binding}"
        );
        assert_matches_reference(
            &report,
            &read_json(&fixture("kge/expected/aswa_mrr_filtered.json")),
            SCORE_TOL,
        );
        // The output keeps the checkpoints' (untransposed) tensors.
        assert_weights_match(
            &run.out(),
            &fixture("kge/expected/aswa_mrr_filtered.safetensors"),
        );
    }
}

/// `--export-onnx` of such a model writes the result's `ent.weight` transposed into the
/// derived initializer: Python onnxruntime scores the file as it scores the export of the
/// same result into the model that keeps the names.
#[test]
fn exporting_a_model_with_a_folded_transpose_embeds_the_transposed_result() {
    let export = |model: &str| -> f64 {
        let run = Run::new();
        let onnx = run.dir.path().join("result.onnx");
        run.ok(
            "kge/checkpoints",
            &[
                "--model",
                fixture(model).to_str().unwrap(),
                "--val",
                fixture("kge/val.npz").to_str().unwrap(),
                "--metric",
                "mrr",
                "--strategy",
                "uniform",
                "--export-onnx",
                onnx.to_str().unwrap(),
            ],
        );
        python_score(&onnx, &fixture("kge/val.npz"), "mrr")
    };
    let (legacy, named) = (export("kge/legacy/model.onnx"), export("kge/model.onnx"));
    assert!(
        (legacy - named).abs() <= 1e-9 * named.abs(),
        "{legacy} vs {named}"
    );
}

#[test]
fn inline_and_external_data_models_compressed_npz_and_batch_sizes_agree() {
    let base = Run::new();
    let report = base.ok("digits/checkpoints", &strs(&digits_args()));
    let variants: Vec<Vec<String>> = vec![
        vec![
            "--model".into(),
            fixture("digits/inline/model.onnx").display().to_string(),
            "--val".into(),
            fixture("digits/val.npz").display().to_string(),
        ],
        vec![
            "--model".into(),
            fixture("digits/model.onnx").display().to_string(),
            "--val".into(),
            fixture("digits/val_compressed.npz").display().to_string(),
        ],
        [digits_args(), vec!["--batch-size".into(), "1".into()]].concat(),
        [digits_args(), vec!["--batch-size".into(), "100000".into()]].concat(),
    ];
    for args in variants {
        let run = Run::new();
        let other = run.ok("digits/checkpoints", &strs(&args));
        assert_matches_reference(&other, &report, SCORE_TOL);
        assert!(
            read_st(&run.out()).0 == read_st(&base.out()).0,
            "{args:?}: same decisions must give the same tensors"
        );
    }
}

#[test]
fn output_is_bit_identical_whatever_the_thread_count() {
    let outputs: Vec<Vec<u8>> = ["1", "2", "8"]
        .iter()
        .map(|t| {
            let run = Run::new();
            let mut args = digits_args();
            args.extend([
                "--threads".into(),
                (*t).into(),
                "--metric".into(),
                "cross-entropy".into(),
            ]);
            run.ok("digits/checkpoints", &strs(&args));
            std::fs::read(run.out()).unwrap()
        })
        .collect();
    assert!(outputs[0] == outputs[1], "1 and 2 threads differ");
    assert!(outputs[0] == outputs[2], "1 and 8 threads differ");
}

/// Copies the digits checkpoints into a fresh directory (with the model beside them).
fn digits_copy(dir: &std::path::Path, epochs: &[usize]) -> std::path::PathBuf {
    let ck = dir.join("checkpoints");
    std::fs::create_dir_all(&ck).unwrap();
    for e in epochs {
        let name = format!("epoch_{e}.safetensors");
        std::fs::copy(fixture("digits/checkpoints").join(&name), ck.join(&name)).unwrap();
    }
    for f in ["model.onnx", "model.onnx.data", "val.npz"] {
        std::fs::copy(fixture("digits").join(f), dir.join(f)).unwrap();
    }
    ck
}

#[test]
fn the_output_is_never_taken_for_a_checkpoint_on_a_second_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = digits_copy(tmp.path(), &(1..=15).collect::<Vec<_>>());
    let out = ck.join("aswa.safetensors");
    let val = tmp.path().join("val.npz");
    for _ in 0..2 {
        cmd()
            .arg(&ck)
            .arg("--val")
            .arg(&val)
            .arg("-o")
            .arg(&out)
            .assert()
            .success();
    }
    // Written under another name, the second run still skips it (its metadata says
    // aswa-merge wrote it).
    let report = tmp.path().join("r.json");
    cmd()
        .arg(&ck)
        .arg("--val")
        .arg(&val)
        .arg("-o")
        .arg(tmp.path().join("other.safetensors"))
        .arg("--report")
        .arg(&report)
        .assert()
        .success()
        .stderr(contains("skipping").and(contains("written by aswa-merge")));
    let r = read_json(&report);
    assert_eq!(r["checkpoints"].as_array().unwrap().len(), 15);
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1);
}

#[test]
fn a_single_checkpoint_is_its_own_result() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = digits_copy(tmp.path(), &[7]);
    let out = tmp.path().join("out.safetensors");
    cmd()
        .arg(&ck)
        .arg("--val")
        .arg(tmp.path().join("val.npz"))
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    let (got, _) = read_st(&out);
    let (want, _) = read_st(&ck.join("epoch_7.safetensors"));
    assert_eq!(got, want);
}

#[test]
fn glob_narrows_the_checkpoints_and_the_order_is_printed() {
    let run = Run::new();
    let mut args = digits_args();
    args.extend(["--glob".into(), "epoch_1*.safetensors".into()]);
    cmd()
        .arg(fixture("digits/checkpoints"))
        .args(&args)
        .arg("-o")
        .arg(run.out())
        .arg("--report")
        .arg(run.report())
        .assert()
        .success()
        .stderr(contains(
            "in this order: epoch_1.safetensors, epoch_10.safetensors, epoch_11.safetensors, \
             epoch_12.safetensors, epoch_13.safetensors, epoch_14.safetensors, epoch_15.safetensors",
        ));
    let r = read_json(&run.report());
    assert_eq!(r["checkpoints"].as_array().unwrap().len(), 7);
}

#[test]
fn hugging_face_folders_and_shards_are_checkpoints() {
    // checkpoint-N/ folders: one with model.safetensors, one sharded with an index.
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("run");
    std::fs::create_dir_all(&ck).unwrap();
    let epochs = [12usize, 13, 14];
    for (i, e) in epochs.iter().enumerate() {
        let folder = ck.join(format!("checkpoint-{}", (i + 1) * 500));
        std::fs::create_dir_all(&folder).unwrap();
        let src = fixture(&format!("digits/checkpoints/epoch_{e}.safetensors"));
        if i == 1 {
            shard(&src, &folder);
        } else {
            std::fs::copy(&src, folder.join("model.safetensors")).unwrap();
        }
    }
    let out = tmp.path().join("out.safetensors");
    let report = tmp.path().join("r.json");
    cmd()
        .arg(&ck)
        .args(strs(&digits_args()))
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .assert()
        .success();
    let r = read_json(&report);
    let names: Vec<String> = r["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        names[0].ends_with("checkpoint-500/model.safetensors"),
        "{names:?}"
    );
    assert!(names[1].ends_with("checkpoint-1000"), "{names:?}");
    // Same three checkpoints as the end of the digits run: the reference says they
    // average into the final ensemble, with the same weights.
    assert_eq!(r["members"].as_array().unwrap().len(), 3);
    assert_weights_match(&out, &fixture("digits/expected/aswa_accuracy.safetensors"));
}

/// Splits a safetensors file into two shards plus `model.safetensors.index.json`.
fn shard(src: &std::path::Path, folder: &std::path::Path) {
    let (tensors, _) = read_st(src);
    let names: Vec<&String> = tensors.keys().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|n| {
                let t = &tensors[*n];
                (
                    (*n).clone(),
                    safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &folder.join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
}

#[test]
fn rereading_the_members_gives_the_bits_of_the_running_sum() {
    // `--aswa-sum reread` keeps no float64 sum: each look-ahead is averaged again from
    // its members, in the same order, so the steps and the weights are the reference's.
    for kind in ["digits", "digits_f16", "digits_bf16"] {
        let run = Run::new();
        let mut args = digits_args();
        args.extend(["--aswa-sum".to_string(), "reread".to_string()]);
        let report = run.ok(&format!("{kind}/checkpoints"), &strs(&args));
        let expected = fixture(&format!("{kind}/expected/aswa_accuracy"));
        let json = read_json(&expected.with_extension("json"));
        assert_matches_reference(&report, &json, SCORE_TOL);
        assert_weights_match(&run.out(), &expected.with_extension("safetensors"));
    }
    // The default (auto) keeps the sum for a model this small and says nothing of it; a
    // dry run says which form it plans.
    let dry_run = |extra: &[&str]| {
        let out = cmd()
            .arg(fixture("digits/checkpoints"))
            .args(strs(&digits_args()))
            .arg("--dry-run")
            .args(extra)
            .assert()
            .success()
            .get_output()
            .stderr
            .clone();
        String::from_utf8(out).unwrap()
    };
    let said = dry_run(&[]);
    assert!(!said.contains("re-read"), "{said}");
    assert!(said.contains("aswa: a float64 running sum"), "{said}");
    let said = dry_run(&["--aswa-sum", "reread"]);
    assert!(
        said.contains("each look-ahead re-reads its members"),
        "{said}"
    );
}

#[test]
fn help_explains_every_flag() {
    let out = cmd()
        .arg("--help")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let help = String::from_utf8(out).unwrap();
    for flag in [
        "--val",
        "--model",
        "--output",
        "--report",
        "--metric",
        "--labels",
        "--input",
        "--filter",
        "--batch-size",
        "--glob",
        "--accept-ties",
        "--aswa-sum",
        "--allow-constant",
        "--threads",
        "--ort-lib",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("hard update") && help.contains("soft update"));
}

#[test]
fn a_model_with_a_fixed_batch_dimension_gets_a_padded_last_batch() {
    let run = Run::new();
    let model = fixture("digits/fixed_batch/model.onnx")
        .display()
        .to_string();
    let val = fixture("digits/val.npz").display().to_string();
    cmd()
        .arg(fixture("digits/checkpoints"))
        .args(["--model", &model, "--val", &val, "--batch-size", "64"])
        .arg("-o")
        .arg(run.out())
        .arg("--report")
        .arg(run.report())
        .assert()
        .success()
        .stderr(contains("batches of 100"));
    let report = read_json(&run.report());
    assert_eq!(report["batch_size"], 100);
    assert_matches_reference(
        &report,
        &read_json(&fixture("digits/expected/aswa_accuracy.json")),
        SCORE_TOL,
    );
}

#[test]
fn a_diverged_checkpoint_is_scored_reported_and_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = digits_copy(tmp.path(), &[12, 13, 14]);
    // epoch_15 diverged: NaN weights.
    let (mut tensors, _) = read_st(&fixture("digits/checkpoints/epoch_15.safetensors"));
    let w = tensors.get_mut("fc1.weight").unwrap();
    w.data = w
        .data
        .chunks_exact(4)
        .flat_map(|_| f32::NAN.to_le_bytes())
        .collect();
    write_st(&ck.join("epoch_15.safetensors"), &tensors);
    let out = tmp.path().join("out.safetensors");
    let report = tmp.path().join("r.json");
    cmd()
        .arg(&ck)
        .arg("--val")
        .arg(tmp.path().join("val.npz"))
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .assert()
        .success()
        .stderr(contains("NaN"));
    let r = read_json(&report);
    assert!(r["nan_scores"][0]
        .as_str()
        .unwrap()
        .ends_with("epoch_15.safetensors"));
    let last = &r["steps"][3];
    assert_eq!(last["decision"], "reject");
    assert!(
        last["running_score"].is_null() && last["lookahead_score"].is_null(),
        "{last}"
    );
    assert_eq!(r["members"].as_array().unwrap().len(), 3);
    let (got, _) = read_st(&out);
    assert!(got["fc1.weight"].values().iter().all(|v| v.is_finite()));
}

#[test]
fn shard_size_splits_the_output_into_an_indexed_set_of_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = digits_copy(tmp.path(), &(1..=15).collect::<Vec<_>>());
    let out = ck.join("aswa.safetensors");
    let run = |out: &std::path::Path| {
        cmd()
            .arg(&ck)
            .arg("--val")
            .arg(tmp.path().join("val.npz"))
            .arg("-o")
            .arg(out)
            .args(["--shard-size", "10KB"])
            .assert()
            .success()
    };
    run(&out).stderr(contains("aswa.safetensors.index.json"));
    let index = read_json(&ck.join("aswa.safetensors.index.json"));
    assert!(index["metadata"]["total_size"].as_u64().unwrap() > 20_000);
    assert_eq!(index["metadata"]["aswa_merge.strategy"], "aswa");
    let map = index["weight_map"].as_object().unwrap();
    let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() >= 2, "{shards:?}");
    assert!(shards
        .iter()
        .all(|s| s.starts_with("aswa-0000") && s.contains("-of-0000")));
    // Reassembled, the shards hold exactly the unsharded result.
    let mut all = std::collections::BTreeMap::new();
    for s in &shards {
        let (t, _) = read_st(&ck.join(s));
        for (name, tensor) in t {
            assert_eq!(map[&name], *s, "{name} is in the shard the index names");
            all.insert(name, tensor);
        }
    }
    let single = tmp.path().join("single.safetensors");
    write_st(&single, &all);
    assert_weights_match(
        &single,
        &fixture("digits/expected/aswa_accuracy.safetensors"),
    );
    // A second run in the same directory does not take the sharded output for a checkpoint.
    run(&out).stderr(contains("sharded output of aswa-merge"));
}

#[test]
fn dry_run_checks_and_plans_without_scoring_or_writing() {
    let run = Run::new();
    cmd()
        .arg(fixture("digits/checkpoints"))
        .args(strs(&digits_args()))
        .arg("-o")
        .arg(run.out())
        .arg("--dry-run")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .assert()
        .success()
        .stderr(
            contains("15 checkpoints")
                .and(contains("9 tensors (5066 float parameters)"))
                .and(contains("weights as inputs (one session)"))
                .and(contains("predicted peak memory"))
                .and(contains("nothing scored or written")),
        );
    assert!(!run.out().exists());
    // A convolutional model: `--weights-as auto` means a session per candidate.
    cmd()
        .arg(fixture("bn/checkpoints"))
        .args(["--val", &fixture("bn/val.npz").display().to_string()])
        .arg("-o")
        .arg(run.out())
        .arg("--dry-run")
        .assert()
        .success()
        .stderr(contains("weights as constants (a session per candidate)"));
    assert!(!run.out().exists());
    // Problems are still found.
    cmd()
        .arg(fixture("exports/cnn_checkpoints"))
        .args(strs(&digits_args()))
        .arg("--dry-run")
        .assert()
        .code(2)
        .stderr(contains("do not match"));
}

/// `--io-binding on` (weights bound once per candidate, as on a GPU) and `off` (weights
/// passed with every batch) must give the same decisions, scores and output, on a plain
/// model, a fixed batch dimension (padded last batch), a two-input ranking model with a
/// filter, and BatchNorm recalibration (a second session with more outputs).
#[test]
fn weights_bound_once_per_candidate_give_the_same_results_as_weights_passed_per_batch() {
    let model_fixed = fixture("digits/fixed_batch/model.onnx")
        .display()
        .to_string();
    let digits_val = fixture("digits/val.npz").display().to_string();
    let kge_val = fixture("kge/val.npz").display().to_string();
    let kge_filter = fixture("kge/filter.npz").display().to_string();
    let bn_val = fixture("bn/val.npz").display().to_string();
    let bn_calib = fixture("bn/calib.npz").display().to_string();
    let half = fixture("digits_f16/half/unfolded.onnx")
        .display()
        .to_string();
    let kge_legacy = fixture("kge/legacy/model.onnx").display().to_string();
    let digits = digits_args();
    // The bound copies are refilled candidate after candidate: weights fed as they are
    // (f32, and f16 to a float16 model), converted (bf16 to f32) and transposed (the
    // legacy export's folded `ent.weight`).
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("digits/checkpoints", strs(&digits)),
        (
            "digits_f16/checkpoints",
            vec!["--model", &half, "--val", &digits_val],
        ),
        ("digits_bf16/checkpoints", strs(&digits)),
        (
            "kge/checkpoints",
            vec!["--model", &kge_legacy, "--val", &kge_val, "--metric", "mrr"],
        ),
        (
            "digits/checkpoints",
            vec!["--model", &model_fixed, "--val", &digits_val],
        ),
        (
            "kge/checkpoints",
            vec![
                "--val",
                &kge_val,
                "--metric",
                "mrr",
                "--filter",
                &kge_filter,
            ],
        ),
        (
            "bn/checkpoints",
            vec!["--val", &bn_val, "--recalibrate-bn", &bn_calib],
        ),
    ];
    for (ckpts, args) in cases {
        let on = Run::new();
        let off = Run::new();
        let with = |mode: &'static str| {
            let mut a = args.clone();
            a.extend([
                "--io-binding",
                mode,
                "--device",
                "cpu",
                "--weights-as",
                "inputs",
            ]);
            a
        };
        let r_on = on.ok(ckpts, &with("on"));
        let r_off = off.ok(ckpts, &with("off"));
        assert_eq!(r_on["io_binding"], true, "{ckpts}");
        assert_eq!(r_off["io_binding"], false, "{ckpts}");
        assert_eq!(
            r_on["steps"], r_off["steps"],
            "{ckpts} {args:?}: steps differ"
        );
        assert_eq!(r_on["val_score"], r_off["val_score"], "{ckpts} {args:?}");
        assert_eq!(
            std::fs::read(on.out()).unwrap(),
            std::fs::read(off.out()).unwrap(),
            "{ckpts} {args:?}: outputs differ"
        );
    }
    // The default on the CPU passes weights with every batch.
    let run = Run::new();
    let report = run.ok("digits/checkpoints", &strs(&digits));
    assert_eq!(report["io_binding"], false);
}

/// Relative score difference allowed between weights as inputs and as constants: the
/// same float32 model, but ONNX Runtime fuses and re-lays-out constant weights, which
/// changes the order of float32 operations (seen: up to 5e-8).
const FORM_TOL: f64 = 1e-6;

/// `--weights-as constants` (a session per candidate, its weights the model's
/// constants) scores every candidate as `--weights-as inputs` does, so ASWA takes the
/// same decisions and writes the same bytes: on a CNN whose BatchNorms ONNX Runtime fuses
/// into the convolutions only when the weights are constants, on a model whose BatchNorms
/// the exporter folded (each candidate folded by the tool), on an MLP, on a model with
/// a fixed batch dimension, and on a knowledge-graph model scored with filtered MRR.
/// `auto` uses constants where a convolution reads checkpoint weights.
#[test]
fn weights_as_constants_score_like_weights_as_inputs() {
    let bn_val = fixture("bn/val.npz").display().to_string();
    let folded = fixture("bn_folded/folded.onnx").display().to_string();
    let folded_val = fixture("bn_folded/val.npz").display().to_string();
    let model_fixed = fixture("digits/fixed_batch/model.onnx")
        .display()
        .to_string();
    let digits_val = fixture("digits/val.npz").display().to_string();
    let kge_val = fixture("kge/val.npz").display().to_string();
    let kge_filter = fixture("kge/filter.npz").display().to_string();
    let digits = digits_args();
    // (checkpoints, arguments, what auto chooses)
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "bn/checkpoints",
            vec!["--val", &bn_val, "--metric", "cross-entropy"],
            "constants",
        ),
        (
            "bn_folded/checkpoints",
            vec![
                "--model",
                &folded,
                "--val",
                &folded_val,
                "--metric",
                "cross-entropy",
            ],
            "constants",
        ),
        ("digits/checkpoints", strs(&digits), "inputs"),
        (
            "digits/checkpoints",
            vec!["--model", &model_fixed, "--val", &digits_val],
            "inputs",
        ),
        (
            "kge/checkpoints",
            vec![
                "--val",
                &kge_val,
                "--metric",
                "mrr",
                "--filter",
                &kge_filter,
            ],
            "inputs",
        ),
    ];
    for (ckpts, args, auto) in cases {
        let runs: Vec<(Run, serde_json::Value)> = ["inputs", "constants", "auto"]
            .into_iter()
            .map(|form| {
                let run = Run::new();
                let mut a = args.clone();
                a.extend(["--weights-as", form, "--device", "cpu"]);
                let report = run.ok(ckpts, &a);
                (run, report)
            })
            .collect();
        let [(inputs, r_in), (constants, r_const), (_, r_auto)] = &runs[..] else {
            unreachable!()
        };
        assert_eq!(r_in["weights_as"], "inputs", "{ckpts}");
        assert_eq!(r_const["weights_as"], "constants", "{ckpts}");
        assert_eq!(r_auto["weights_as"], auto, "{ckpts} {args:?}: auto");
        let steps_in = r_in["steps"].as_array().unwrap();
        let steps_const = r_const["steps"].as_array().unwrap();
        assert_eq!(steps_in.len(), steps_const.len(), "{ckpts}");
        let mut scores = 0;
        for (a, b) in steps_in.iter().zip(steps_const) {
            assert_eq!(a["decision"], b["decision"], "{ckpts} {args:?}");
            for key in ["running_score", "lookahead_score", "ensemble_score"] {
                if let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) {
                    let rel = (x - y).abs() / x.abs().max(1e-12);
                    assert!(rel <= FORM_TOL, "{ckpts} {args:?} {key}: {x} vs {y}");
                    scores += 1;
                }
            }
        }
        assert!(scores >= steps_in.len(), "{ckpts}: no scores compared");
        assert_eq!(r_in["members"], r_const["members"], "{ckpts} {args:?}");
        // The same members give the same tensors, bit for bit (the metadata records
        // the form and the scores, which may differ).
        let (a, _) = read_st(&inputs.out());
        let (b, _) = read_st(&constants.out());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert_eq!(t.data, b[name].data, "{ckpts} {args:?}: {name} differs");
        }
    }
}

/// Checkpoints saved through a wrapper carry a module path before every name
/// (`module.` from DistributedDataParallel, `_orig_mod.` from `torch.compile`) that a
/// model exported from the bare module does not have: matched without it, with a note,
/// and the output keeps the checkpoints' names.
#[test]
fn checkpoints_saved_through_a_wrapper_match_the_model_without_their_prefix() {
    let expected = read_json(&fixture("digits/expected/aswa_accuracy.json"));
    for prefix in ["module.", "_orig_mod."] {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("checkpoints");
        copy_with_prefix(&fixture("digits/checkpoints"), prefix, &ck);
        let out = tmp.path().join("merged.safetensors");
        let report = tmp.path().join("report.json");
        cmd()
            .arg(&ck)
            .args(digits_args())
            .arg("-o")
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .assert()
            .success()
            .stderr(contains(format!("without the prefix `{prefix}`")));
        let r = read_json(&report);
        assert_matches_reference(&r, &expected, SCORE_TOL);
        assert_eq!(r["rename"]["strip"], prefix);
        // The output has the checkpoints' (prefixed) names and the reference's values.
        let (got, _) = read_st(&out);
        assert!(
            got.keys().all(|n| n.starts_with(prefix)),
            "{:?}",
            got.keys()
        );
        let stripped = got
            .into_iter()
            .map(|(n, t)| (n[prefix.len()..].to_string(), t))
            .collect();
        let back = tmp.path().join("stripped.safetensors");
        write_st(&back, &stripped);
        assert_weights_match(&back, &fixture("digits/expected/aswa_accuracy.safetensors"));
    }

    // A prefix on some tensors only is not a wrapper's: the names do not match.
    let case = Case::digits(&[1, 2]);
    for e in [1, 2] {
        let path = case.ck().join(format!("epoch_{e}.safetensors"));
        let (tensors, _) = read_st(&path);
        let renamed = tensors
            .into_iter()
            .map(|(n, t)| {
                let n = if n.starts_with("fc1.") {
                    format!("module.{n}")
                } else {
                    n
                };
                (n, t)
            })
            .collect();
        write_st(&path, &renamed);
    }
    case.fails(&[], &["do not match", "module.fc1.weight"]);
}

/// Validation arrays as numpy writes them in the wild: float16 inputs (half-precision
/// pipelines), Fortran order (`np.asfortranarray`, a transposed view), and unsigned label
/// types. All give the reference's decisions and scores (the digits inputs are small
/// integers, exact in float16); a uint64 label beyond int64 is refused.
#[test]
fn float16_fortran_order_and_unsigned_validation_arrays_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
import sys, numpy as np
d = np.load(sys.argv[1]); out = sys.argv[2]
x, y = d["x"], d["y"]
np.savez(out + "/f16.npz", x=x.astype(np.float16), y=y.astype(np.uint16))
np.savez(out + "/fortran.npz", x=np.asfortranarray(x), y=y.astype(np.uint32))
np.savez(out + "/f16_fortran.npz", x=np.asfortranarray(x.astype(np.float16)), y=y.astype(np.uint64))
big = y.astype(np.uint64); big[3] = 2**63 + 5
np.savez(out + "/u64_big.npz", x=x, y=big)
"#;
    let status = std::process::Command::new(python())
        .args(["-c", script])
        .arg(fixture("digits/val.npz"))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    let model = fixture("digits/model.onnx").display().to_string();
    let expected = read_json(&fixture("digits/expected/aswa_accuracy.json"));
    for name in ["f16.npz", "fortran.npz", "f16_fortran.npz"] {
        let val = tmp.path().join(name).display().to_string();
        let run = Run::new();
        let report = run.ok("digits/checkpoints", &["--model", &model, "--val", &val]);
        assert_matches_reference(&report, &expected, SCORE_TOL);
    }
    let val = tmp.path().join("u64_big.npz").display().to_string();
    cmd()
        .arg(fixture("digits/checkpoints"))
        .args(["--model", &model, "--val", &val])
        .arg("-o")
        .arg(tmp.path().join("out.safetensors"))
        .assert()
        .code(2)
        .stderr(contains("does not fit an int64"));
    assert!(!tmp.path().join("out.safetensors").exists());
}
