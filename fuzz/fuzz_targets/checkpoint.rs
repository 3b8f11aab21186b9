//! Arbitrary bytes as a safetensors checkpoint: opening it, reading every tensor and
//! averaging it with itself must give a value or an error, never a panic.
#![no_main]

use std::hint::black_box;

use aswa_merge::averaging::{Accumulator, Candidate, Recipe, Weights};
use aswa_merge::storage::{Checkpoint, CheckpointSet, CheckpointSource};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::write_input("checkpoint.safetensors", data);
    let source = CheckpointSource::File(path);
    let Ok(ckpt) = Checkpoint::open(source.clone()) else {
        return;
    };
    for entry in ckpt.tensors().values() {
        black_box(ckpt.bytes(entry));
    }
    black_box(ckpt.metadata());
    drop(ckpt);

    let Ok(set) = CheckpointSet::open(vec![source.clone(), source]) else {
        return;
    };
    let mut total = 0usize;
    for t in 0..set.specs().len() {
        let b0 = set.tensor_bytes(0, t);
        let b1 = set.tensor_bytes(1, t);
        let spec = &set.specs()[t];
        // The located bytes are exactly what the spec says.
        assert_eq!(b0.len(), spec.numel() * spec.dtype.size(), "{}", spec.name);
        assert_eq!(b0, b1);
        total = total.wrapping_add(b0.iter().map(|&b| b as usize).sum::<usize>());
    }
    black_box(total);
    black_box(set.model_bytes());

    // The mean of a checkpoint with itself, streamed and through the accumulator.
    let w = Weights::build(&set, Recipe::Mean(&[0, 1]));
    let mut acc = Accumulator::new(&set);
    acc.reset(&set, 0);
    let mut w2 = Weights::new(&set);
    acc.mean_into(&set, Some(1), &mut w2);
    for t in 0..set.specs().len() {
        let a = Candidate::Average(&w).tensor_bytes(&set, t);
        let b = Candidate::Average(&w2).tensor_bytes(&set, t);
        assert_eq!(a.len(), set.tensor_bytes(0, t).len());
        // Same member set, same bits (NaN payloads included).
        assert_eq!(a, b, "tensor {}", set.specs()[t].name);
    }
    black_box(Weights::build(&set, Recipe::Ema(&[0, 1], 0.5)));
});
