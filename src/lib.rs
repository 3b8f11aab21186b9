//! `aswa-merge`: Adaptive Stochastic Weight Averaging over a directory of training
//! checkpoints, scored with ONNX Runtime.
//!
//! The crate is organised by stage:
//! - [`discovery`]: find checkpoints in a directory and order them;
//! - [`storage`]: memory-map and validate safetensors checkpoints; write results;
//! - [`averaging`]: `f64` sums and rounded means of checkpoints, in parallel;
//! - [`scoring`]: the ONNX model, validation data, metrics, ONNX Runtime sessions;
//! - [`strategies`]: which checkpoints to average (ASWA);
//! - [`reporting`]: summary, progress, JSON report, output metadata;
//! - [`pipeline`]: one run, validate-then-act; [`cli`]: the command line over it;
//! - [`simd`]: which vector instructions the numeric kernels are compiled for.

pub mod averaging;
pub mod cli;
pub mod discovery;
pub mod error;
pub mod pipeline;
pub mod reporting;
pub mod scoring;
pub mod simd;
pub mod storage;
pub mod strategies;

pub use error::{Error, Result};
pub use pipeline::{run, MergeConfig};
