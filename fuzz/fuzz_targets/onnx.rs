//! Arbitrary bytes as an ONNX model: parsing, listing, binding it to checkpoint specs
//! made from its own initializers and rewriting it must never panic.
#![no_main]

use std::hint::black_box;

use aswa_merge::scoring::onnx::{plan_binding, rewrite, OnnxModel};
use aswa_merge::storage::{DType, TensorSpec};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// External data beside the model, so that seeds which reference `model.onnx.data`
/// (the digits export) reach the code that reads it in.
static EXTERNAL: &[u8] = include_bytes!("../../fixtures/digits/model.onnx.data");

fuzz_target!(|data: &[u8]| {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        common::write_input("model.onnx.data", EXTERNAL);
    });
    let path = common::write_input("model.onnx", data);
    let Ok(model) = OnnxModel::load(&path) else {
        return;
    };
    let inits = model.initializers();
    black_box(model.data_inputs());
    black_box(model.outputs());
    // Checkpoint specs that claim every initializer, F32, with its dims (clamped to
    // 0..=64, so a spec never stands for a huge tensor).
    let specs: Vec<TensorSpec> = inits
        .iter()
        .map(|i| TensorSpec {
            name: i.name.clone(),
            dtype: DType::F32,
            shape: i.dims.iter().map(|&d| d.clamp(0, 64) as usize).collect(),
        })
        .collect();
    for s in [&specs[..], &[]] {
        match plan_binding(&model, s, &[]) {
            Ok(binding) => {
                if let Ok(bytes) = rewrite(&model, &binding) {
                    black_box(bytes.len());
                }
            }
            Err(e) => {
                black_box(e.to_string());
            }
        }
    }
    // Every name allowed as a constant: whatever is left must bind or be refused.
    let names: Vec<String> = inits.iter().map(|i| i.name.clone()).collect();
    if let Ok(binding) = plan_binding(&model, &[], &names) {
        black_box(rewrite(&model, &binding).map(|b| b.len()).ok());
    }
});
