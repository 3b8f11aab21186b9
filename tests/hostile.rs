//! Hostile and broken inputs: every case gives a clear message naming the file, exit
//! code 2, no output file and no temporary file, and leaves the inputs unchanged.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use predicates::prelude::*;
use predicates::str::contains;

/// A safetensors file with `header` as its JSON header and `data` after it.
fn raw(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_truncated_checkpoint() {
    let case = Case::digits(&[1, 2, 3]);
    let p = case.ck().join("epoch_3.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    case.fails(
        &[],
        &["epoch_3.safetensors", "not a valid safetensors file"],
    );
    std::fs::write(&p, &bytes[..5]).unwrap();
    case.fails(
        &[],
        &["epoch_3.safetensors", "truncated or still being written"],
    );
    std::fs::write(&p, b"").unwrap();
    case.fails(
        &[],
        &["epoch_3.safetensors", "truncated or still being written"],
    );
}

#[test]
fn garbage_and_oversized_headers() {
    let case = Case::digits(&[1, 2]);
    let p = case.ck().join("epoch_2.safetensors");
    std::fs::write(&p, b"this is not a safetensors file at all").unwrap();
    case.fails(
        &[],
        &["epoch_2.safetensors", "not a valid safetensors file"],
    );
    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(&p, huge).unwrap();
    case.fails(&[], &["epoch_2.safetensors", "header too large"]);
    raw(&p, "{\"w\": [1, 2", &[]);
    case.fails(&[], &["epoch_2.safetensors", "invalid JSON"]);
}

#[test]
fn bad_offsets_lengths_and_duplicate_names() {
    let case = Case::digits(&[1, 2]);
    let p = case.ck().join("epoch_2.safetensors");
    // Overlapping offsets.
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0u8; 12],
    );
    case.fails(&[], &["epoch_2.safetensors", "invalid offset"]);
    // Beyond the end of the file.
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        &[0u8; 8],
    );
    case.fails(
        &[],
        &["epoch_2.safetensors", "not a valid safetensors file"],
    );
    // Byte length that disagrees with shape × dtype.
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0u8; 8],
    );
    case.fails(
        &[],
        &["epoch_2.safetensors", "invalid shape, data type, or offset"],
    );
    // A name given twice.
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0u8; 8],
    );
    case.fails(&[], &["epoch_2.safetensors", "tensor `a` is listed twice"]);
}

#[test]
fn sharded_checkpoints_with_a_missing_shard_or_a_broken_index() {
    let case = Case::digits(&[]);
    let folder = case.ck().join("checkpoint-100");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(
        fixture("digits/checkpoints/epoch_1.safetensors"),
        folder.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let index = folder.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata":{},"weight_map":{"fc1.weight":"model-00001-of-00002.safetensors","fc2.weight":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    case.fails(
        &[],
        &[
            "checkpoint-100",
            "shard `model-00002-of-00002.safetensors` listed in the index is missing",
        ],
    );
    std::fs::write(&index, "{ not json").unwrap();
    case.fails(
        &[],
        &["model.safetensors.index.json", "invalid shard index"],
    );
}

#[test]
fn skip_invalid_leaves_out_a_checkpoint_still_being_written() {
    let case = Case::digits(&[1, 2, 3, 4]);
    let p = case.ck().join("epoch_4.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..1000]).unwrap();
    let report = case.path("r.json");
    case.command(&["--skip-invalid", "--report", report.to_str().unwrap()])
        .assert()
        .success()
        .stderr(contains("--skip-invalid: leaving out").and(contains("epoch_4.safetensors")));
    let r = read_json(&report);
    assert_eq!(r["checkpoints"].as_array().unwrap().len(), 3);
    let skipped = r["skipped"].as_array().unwrap();
    assert!(skipped.iter().any(
        |s| s["path"].as_str().unwrap().ends_with("epoch_4.safetensors")
            && s["reason"].as_str().unwrap().starts_with("invalid")
    ));
    // Inconsistent shapes are left out too, relative to the first readable checkpoint.
    std::fs::copy(
        fixture("exports/cnn_checkpoints/epoch_1.safetensors"),
        case.ck().join("epoch_9.safetensors"),
    )
    .unwrap();
    case.command(&["--skip-invalid"])
        .assert()
        .success()
        .stderr(contains("epoch_9.safetensors"));
}

#[test]
fn infinite_weights_are_scored_and_never_accepted() {
    let case = Case::digits(&[1, 2, 3]);
    let p = case.ck().join("epoch_3.safetensors");
    let (mut t, _) = read_st(&p);
    let w = t.get_mut("fc2.bias").unwrap();
    w.data = w
        .data
        .chunks_exact(4)
        .flat_map(|_| f32::INFINITY.to_le_bytes())
        .collect();
    write_st(&p, &t);
    let report = case.path("r.json");
    case.command(&["--report", report.to_str().unwrap()])
        .assert()
        .success();
    let r = read_json(&report);
    assert_eq!(r["steps"][2]["decision"], "reject");
    assert!(r["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| !m.as_str().unwrap().ends_with("epoch_3.safetensors")));
}

#[test]
fn validation_sets_that_do_not_fit() {
    let case = Case::digits(&[1, 2]);
    let npz = |name: &str,
               arrays: &[(&str, ndarray::ArrayD<f32>)],
               labels: Option<ndarray::ArrayD<i64>>|
     -> PathBuf {
        let p = case.path(name);
        let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&p).unwrap());
        for (n, a) in arrays {
            w.add_array(*n, a).unwrap();
        }
        if let Some(y) = labels {
            w.add_array("y", &y).unwrap();
        }
        w.finish().unwrap();
        p
    };
    let x = |rows: usize, cols: usize| ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[rows, cols]));
    let y = |vals: Vec<i64>| {
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[vals.len()]), vals).unwrap()
    };
    let s = |p: PathBuf| p.display().to_string();

    let p = s(npz("rows.npz", &[("x", x(3, 64))], Some(y(vec![0, 1]))));
    case.fails(
        &["--val", &p],
        &["rows.npz", "labels `y` have 2 rows but the inputs have 3"],
    );
    let p = s(npz("zero.npz", &[("x", x(0, 64))], Some(y(vec![]))));
    case.fails(&["--val", &p], &["zero.npz", "zero rows"]);
    let p = s(npz("wide.npz", &[("x", x(4, 63))], Some(y(vec![0; 4]))));
    case.fails(
        &["--val", &p],
        &[
            "wide.npz",
            "array `x` has shape [4, 63] but model input `x` expects [?, 64]",
        ],
    );
    let p = s(npz(
        "range.npz",
        &[("x", x(4, 64))],
        Some(y(vec![0, 1, 10, 2])),
    ));
    case.fails(
        &["--val", &p],
        &["label 10 of row 2 is outside the model's 10 outputs"],
    );
    let p = s(npz("nolabels.npz", &[("x", x(4, 64))], None));
    case.fails(&["--val", &p], &["nolabels.npz", "no labels array `y`"]);
    std::fs::write(case.path("text.npz"), "x,y\n1,2\n").unwrap();
    case.fails(
        &["--val", case.path("text.npz").to_str().unwrap()],
        &["text.npz", "not a numpy .npz archive"],
    );
}

#[test]
fn an_output_in_a_directory_that_cannot_exist() {
    let case = Case::digits(&[1, 2]);
    let out = case.path("val.npz/out.safetensors");
    cmd()
        .arg(case.ck())
        .arg("--val")
        .arg(case.path("val.npz"))
        .arg("-o")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(contains("does not exist"));
}

#[test]
fn a_full_disk_leaves_no_partial_output() {
    // A file-size limit of 8 KiB (the output is 21 KB): the write fails with EFBIG.
    let case = Case::digits(&[1, 2, 3]);
    let before = case.snapshot();
    let bin = assert_cmd::cargo::cargo_bin("aswa-merge");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 16 && exec '{}' '{}' --val '{}' -o '{}'",
            bin.display(),
            case.ck().display(),
            case.path("val.npz").display(),
            case.out().display()
        ))
        .env("ORT_DYLIB_PATH", ort_lib())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("write failed") && stderr.contains("file-size limit"),
        "{stderr}"
    );
    assert!(!case.out().exists());
    assert!(
        before == case.snapshot(),
        "a temporary file was left behind"
    );
}

#[test]
fn an_interrupted_write_leaves_the_previous_output_and_no_temporary_file() {
    let case = Case::digits(&[1, 2, 3]);
    std::fs::write(case.out(), b"previous result").unwrap();
    for signal in ["INT", "TERM"] {
        let bin = assert_cmd::cargo::cargo_bin("aswa-merge");
        let mut child = std::process::Command::new(bin)
            .arg(case.ck())
            .arg("--val")
            .arg(case.path("val.npz"))
            .arg("-o")
            .arg(case.out())
            .arg("-q")
            .env("ORT_DYLIB_PATH", ort_lib())
            .env("ASWA_MERGE_TEST_WRITE_DELAY_MS", "20000")
            .spawn()
            .unwrap();
        // Wait until the finished temporary file is waiting to be renamed.
        let tmp_exists = || {
            walk(case.dir.path())
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".tmp"))
        };
        let start = std::time::Instant::now();
        while !tmp_exists() {
            assert!(start.elapsed().as_secs() < 30, "no temporary file appeared");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        let expected = if signal == "INT" { 130 } else { 143 };
        assert_eq!(status.code(), Some(expected), "{signal}");
        assert_eq!(std::fs::read(case.out()).unwrap(), b"previous result");
        assert!(!tmp_exists(), "{signal}: temporary file left behind");
    }
}

#[test]
fn an_npz_declaring_a_huge_array_is_refused_without_allocating_it() {
    // Found by the npz fuzz target: a 458-byte file whose header declares 4 TB.
    let case = Case::digits(&[1, 2]);
    let huge = root().join("fuzz/artifacts/npz/repro-huge-shape.npz");
    case.fails(
        &["--val", huge.to_str().unwrap()],
        &[
            "repro-huge-shape.npz",
            "array `x`",
            "header declares",
            "damaged or truncated",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    cmd()
        .arg(fixture("kge/checkpoints"))
        .arg("--val")
        .arg(fixture("kge/val.npz"))
        .args(["--metric", "mrr", "--filter"])
        .arg(root().join("fuzz/artifacts/npz/repro-huge-indptr.npz"))
        .arg("-o")
        .arg(dir.path().join("o.safetensors"))
        .assert()
        .code(2)
        .stderr(contains("header declares"));
}

#[test]
fn external_data_outside_the_models_folder_is_refused() {
    use aswa_merge::scoring::onnx::proto;
    use prost::Message;
    let case = Case::digits(&[1, 2]);
    let model_path = case.path("model.onnx");
    let mut model =
        proto::ModelProto::decode(std::fs::read(&model_path).unwrap().as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    // A constant initializer the tool would inline, pointing at a file outside the folder.
    let mut secret = graph.initializer[0].clone();
    secret.name = Some("leak".into());
    secret.dims = vec![1];
    secret.data_type = Some(proto::tensor_proto::DataType::Int64 as i32);
    secret.raw_data = None;
    secret.data_location = Some(proto::tensor_proto::DataLocation::External as i32);
    secret.external_data = vec![proto::StringStringEntryProto {
        key: Some("location".into()),
        value: Some("../../etc/hostname".into()),
    }];
    graph.initializer.push(secret);
    std::fs::write(&model_path, model.encode_to_vec()).unwrap();
    case.fails(&[], &["initializer `leak`", "refusing to read outside it"]);
}

#[test]
fn a_checkpoint_with_an_extra_tensor_names_it() {
    let case = Case::digits(&[1, 2, 3]);
    let p = case.ck().join("epoch_3.safetensors");
    let (mut t, _) = read_st(&p);
    let extra = t["fc2.bias"].clone();
    t.insert("head.extra".into(), extra);
    write_st(&p, &t);
    case.fails(
        &[],
        &[
            "epoch_3.safetensors",
            "tensor `head.extra` is not in",
            "epoch_1.safetensors",
        ],
    );
}

#[test]
fn an_operator_onnx_runtime_does_not_know_is_reported() {
    use aswa_merge::scoring::onnx::proto;
    use prost::Message;
    let case = Case::digits(&[1, 2]);
    let model_path = case.path("model.onnx");
    let mut model =
        proto::ModelProto::decode(std::fs::read(&model_path).unwrap().as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let out = graph.output[0].name().to_string();
    // Route the output through an operator from a domain ONNX Runtime has never heard of.
    for n in &mut graph.node {
        for o in &mut n.output {
            if *o == out {
                *o = "before_custom".into();
            }
        }
    }
    graph.node.push(proto::NodeProto {
        op_type: Some("FancyActivation".into()),
        domain: Some("com.example".into()),
        input: vec!["before_custom".into()],
        output: vec![out],
        ..Default::default()
    });
    model.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("com.example".into()),
        version: Some(1),
    });
    std::fs::write(&model_path, model.encode_to_vec()).unwrap();
    case.fails(
        &[],
        &[
            "model.onnx",
            "ONNX Runtime cannot load the model",
            "FancyActivation",
        ],
    );
}

#[test]
fn floats_are_never_truncated_into_an_integer_model_input() {
    // The knowledge-graph model takes int64 entity and relation ids.
    let dir = tempfile::tempdir().unwrap();
    let val = dir.path().join("val.npz");
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&val).unwrap());
    let h = ndarray::Array1::<f32>::from(vec![0.0, 1.5, 2.0]);
    let r = ndarray::Array1::<i64>::from(vec![0, 1, 2]);
    let y = ndarray::Array1::<i64>::from(vec![1, 2, 3]);
    w.add_array("h", &h).unwrap();
    w.add_array("r", &r).unwrap();
    w.add_array("y", &y).unwrap();
    w.finish().unwrap();
    cmd()
        .arg(fixture("kge/checkpoints"))
        .arg("--val")
        .arg(&val)
        .args(["--metric", "mrr", "-o"])
        .arg(dir.path().join("o.safetensors"))
        .assert()
        .code(2)
        .stderr(
            contains("array `h` is float32 but model input `h` takes I64")
                .and(contains("never truncated")),
        );
}
