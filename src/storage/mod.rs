//! Reading checkpoints (memory-mapped safetensors) and writing results.

pub mod checkpoint;
pub mod dtype;
pub mod mmap;
pub mod pending;
pub mod set;
pub mod writer;

pub use checkpoint::{Checkpoint, CheckpointSource, PRODUCER_KEY};
pub use dtype::DType;
pub use set::{CheckpointSet, TensorSpec};
