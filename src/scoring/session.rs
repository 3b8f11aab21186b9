//! Scoring candidates with ONNX Runtime sessions.
//!
//! The model is rewritten once (see [`super::onnx::rewrite`]) in one of two forms
//! ([`WeightsMode`]):
//!
//! - **inputs**: the checkpoint tensors are graph inputs; one session is built, and each
//!   candidate's tensors are fed as tensor views over their memory (the memory map of a
//!   checkpoint or the buffer of an average), without a copy when the dtype already
//!   matches the model's and the data is aligned, converted into a reused scratch
//!   buffer otherwise.
//! - **constants**: the checkpoint tensors stay initializers, without data; each
//!   candidate gets its own session, built with its tensors as the initializers' values.
//!   That costs a session build and a copy of the weights per candidate, and lets ONNX
//!   Runtime do what it only does for constant weights: fuse Conv and BatchNormalization
//!   and pre-pack convolution weights into its faster layouts (on a small CNN on the
//!   CPU, forward passes take about half as long).
//!
//! Validation rows are fed in batches along axis 0.
//!
//! On a GPU, inputs passed to `Run` are copied to the device on every call, weights
//! included. There the weights are instead bound once per candidate with an
//! [`ort::session::IoBinding`] (ONNX Runtime copies a bound input to the device when it
//! is bound) and only the batches are bound per call, so a candidate's weights are
//! uploaded once ([`IoBindingMode`]). On the CPU a weight passed to `Run` is read in
//! place, so there the plain path is the default. Constant weights are uploaded when
//! the candidate's session is built.

use std::borrow::Cow;
use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{ArrayD, Axis, Slice};
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef};

use super::data::{Array, Filter, ValidationSet};
use super::device::{self, Placement};
use super::metrics::{Accumulator, Metric};
use super::onnx::{self, Binding, Bound, ElemType, OnnxModel, WeightsAs};
use super::runtime::Runtime;
use super::Scorer;
use crate::averaging::Candidate;
use crate::error::{Error, Result};
use crate::storage::{CheckpointSet, DType};

pub use super::device::Device;

/// How batches are formed, where and with how many threads ONNX Runtime runs, and how
/// weights reach it.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Rows per batch (a model with a fixed batch dimension overrides it).
    pub batch_size: usize,
    /// ONNX Runtime intra-op threads; 0 lets it choose.
    pub threads: usize,
    /// Graph output the metric reads (default: the first output, or the metric's own).
    pub output: Option<String>,
    /// Where ONNX Runtime runs the model.
    pub device: Device,
    /// Whether weights are bound once per candidate.
    pub io_binding: IoBindingMode,
    /// Whether weights are graph inputs or each candidate's constants.
    pub weights: WeightsMode,
}

/// `--io-binding`: how a candidate's weights reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBindingMode {
    /// Bound once per candidate on a GPU, passed with every batch on the CPU.
    #[default]
    Auto,
    /// Always bound once per candidate (on the CPU this costs one copy of the weights).
    On,
    /// Always passed with every batch (on a GPU: uploaded with every batch).
    Off,
}

impl std::str::FromStr for IoBindingMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("`{s}`: expected auto, on or off")),
        }
    }
}

/// `--weights-as`: the form of the model that scores candidates (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsMode {
    /// Constants on the CPU for convolutional models ([`OnnxModel::convolves`]: where
    /// ONNX Runtime's constant-only optimisations pay for a session per candidate),
    /// inputs otherwise and with `--io-binding on`. Decided by the model and
    /// the options, never by timing, so runs are repeatable.
    #[default]
    Auto,
    /// One session; weights are graph inputs.
    Inputs,
    /// A session per candidate; weights are its constants.
    Constants,
}

impl std::str::FromStr for WeightsMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "inputs" => Ok(Self::Inputs),
            "constants" => Ok(Self::Constants),
            _ => Err(format!("`{s}`: expected auto, inputs or constants")),
        }
    }
}

impl WeightsMode {
    /// The form this mode takes for `model` bound by `binding`, on a CPU (`on_cpu`) or
    /// a GPU, with weights bound once or not (`io_binding`, which needs them as inputs).
    pub fn resolve(
        self,
        model: &OnnxModel,
        binding: &Binding,
        on_cpu: bool,
        io_binding: IoBindingMode,
    ) -> Result<WeightsAs> {
        Ok(match (self, io_binding) {
            (Self::Constants, IoBindingMode::On) => return Err(Error::Usage(
                "--io-binding on binds weights that are graph inputs, and --weights-as constants \
                     makes them the constants of a session per candidate (uploaded once, when it \
                     is built); choose one"
                    .into(),
            )),
            (Self::Inputs, _) | (Self::Auto, IoBindingMode::On) => WeightsAs::Inputs,
            (Self::Constants, _) => WeightsAs::Constants,
            (Self::Auto, _) if on_cpu && model.convolves(binding) => WeightsAs::Constants,
            (Self::Auto, _) => WeightsAs::Inputs,
        })
    }
}

/// The sessions of a [`Feeder`].
enum Engine {
    /// One session over the model with the weights as graph inputs.
    Shared(Session),
    /// A session per candidate, built from `model` (placeholders for the weights, see
    /// [`WeightsAs::Constants`]) with the candidate's weights as initializers.
    PerCandidate {
        environment: Environment,
        threads: usize,
        model: Vec<u8>,
        path: std::path::PathBuf,
        /// Whether a session was built before (see [`commit`]).
        built: bool,
    },
}

/// ONNX Runtime session(s) over a rewritten model, and the machinery to feed them a
/// candidate's weights and batches of data.
pub(crate) struct Feeder {
    placement: Placement,
    engine: Engine,
    binding: Binding,
    /// Weights bound once per candidate (an `IoBinding`) rather than passed with each batch.
    bind_weights: bool,
    batches: Batches,
    scratch: Vec<Scratch>,
    /// Host copies of the weights for an `IoBinding` (with `bind_weights`): allocated for
    /// the first candidate and refilled for each next one, when no binding holds them.
    bound: Vec<Option<DynValue>>,
}

/// What a [`Feeder`] hands to its caller for each batch.
pub(crate) struct BatchOutputs<'o, 's> {
    pub outputs: &'o ort::session::SessionOutputs<'s>,
    /// First row of the batch in the data set.
    pub start: usize,
    /// Rows of real data in the batch.
    pub rows: usize,
    /// `Some(n)`: the batch was padded to `n` rows (a fixed batch dimension).
    pub padded: Option<usize>,
}

impl Feeder {
    /// Prepares to run the model `bytes` (already rewritten for `binding` in the form
    /// `form`) on `placement`. With [`WeightsAs::Inputs`] the session is built now.
    pub(crate) fn new(
        runtime: &Runtime,
        model: &OnnxModel,
        bytes: Vec<u8>,
        form: WeightsAs,
        binding: Binding,
        placement: Placement,
        options: &SessionOptions,
    ) -> Result<Self> {
        let fixed_batch = model
            .data_inputs()
            .iter()
            .filter_map(|i| i.shape.as_ref().and_then(|s| s.first().copied().flatten()))
            .next()
            .map(|n| n as usize);
        let batch = fixed_batch.unwrap_or(options.batch_size.max(1));
        let engine = match form {
            WeightsAs::Inputs => Engine::Shared(commit(
                device::builder(&runtime.environment, &placement, options.threads)?,
                &bytes,
                model.path(),
                true,
            )?),
            WeightsAs::Constants => Engine::PerCandidate {
                environment: runtime.environment.clone(),
                threads: options.threads,
                model: bytes,
                path: model.path().to_path_buf(),
                built: false,
            },
        };
        let scratch = binding.bound.iter().map(|_| Scratch::default()).collect();
        let bind_weights = form == WeightsAs::Inputs
            && match options.io_binding {
                IoBindingMode::On => true,
                IoBindingMode::Off => false,
                IoBindingMode::Auto => !placement.is_cpu(),
            };
        Ok(Self {
            placement,
            engine,
            binding,
            bind_weights,
            batches: Batches { batch, fixed_batch },
            scratch,
            bound: Vec::new(),
        })
    }

    /// Whether a candidate's weights are bound once (see [`IoBindingMode`]).
    pub(crate) fn binds_weights(&self) -> bool {
        self.bind_weights
    }

    /// The form of the model the weights are fed to.
    pub(crate) fn weights_as(&self) -> WeightsAs {
        match self.engine {
            Engine::Shared(_) => WeightsAs::Inputs,
            Engine::PerCandidate { .. } => WeightsAs::Constants,
        }
    }

    /// Rows per batch.
    pub(crate) fn batch_size(&self) -> usize {
        self.batches.batch
    }

    /// The model's fixed batch dimension, if it has one.
    pub(crate) fn fixed_batch(&self) -> Option<usize> {
        self.batches.fixed_batch
    }

    /// Sets the rows per batch (a fixed batch dimension keeps its own).
    pub(crate) fn set_batch_size(&mut self, n: usize) {
        self.batches.batch = self.batches.fixed_batch.unwrap_or(n.max(1));
    }

    /// Runs the model with `candidate`'s weights over `data` in batches, in row order,
    /// calling `each` with every batch's outputs.
    pub(crate) fn run(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        data: &ValidationSet,
        each: &mut dyn FnMut(BatchOutputs<'_, '_>) -> Result<()>,
    ) -> Result<()> {
        let Self {
            placement,
            engine,
            binding,
            bind_weights,
            batches,
            scratch,
            bound,
        } = self;
        let specs = set.specs();
        // Pass 1: convert what cannot be fed as it is.
        let mut sources = Vec::with_capacity(binding.bound.len());
        for (b, s) in binding.bound.iter().zip(scratch.iter_mut()) {
            let bytes = candidate.tensor_bytes(set, b.tensor);
            let from = specs[b.tensor].dtype;
            if b.transpose {
                s.transpose(b, from, bytes);
                let t = std::mem::take(&mut s.transposed);
                let n = bytes.len();
                sources.push(prepare(from, b.elem, &bytemuck::cast_slice(&t)[..n], s));
                s.transposed = t;
            } else {
                sources.push(prepare(from, b.elem, bytes, s));
            }
        }
        // Pass 2: the bytes each weight is fed from, the candidate's memory or a scratch
        // buffer.
        let fed: Vec<Fed<'_>> = binding
            .bound
            .iter()
            .zip(scratch.iter())
            .zip(&sources)
            .map(|((b, s), &source)| {
                let bytes = s.weight_bytes(b, candidate.tensor_bytes(set, b.tensor));
                let n = b.shape.iter().product();
                Fed {
                    name: b.name.as_str(),
                    elem: b.elem,
                    shape: b.shape.iter().map(|&d| d as i64).collect(),
                    bytes: fed_bytes(b.elem, n, bytes, s, source),
                }
            })
            .collect();
        match engine {
            Engine::Shared(session) => {
                // Views where ONNX Runtime reads the values during each run; owned copies
                // where it keeps them (bound, see `run_bound`), in buffers kept from one
                // candidate to the next (no binding holds them between candidates).
                let weights = if *bind_weights {
                    bound.resize_with(fed.len(), || None);
                    fed.into_iter()
                        .zip(bound.iter_mut())
                        .map(|(f, slot)| {
                            let name = Cow::Borrowed(f.name);
                            Ok((name, SessionInputValue::from(f.refill(slot)?.view())))
                        })
                        .collect::<Result<Vec<_>>>()?
                } else {
                    fed.into_iter()
                        .map(|f| Ok((Cow::Borrowed(f.name), f.view()?)))
                        .collect::<Result<Vec<_>>>()?
                };
                if *bind_weights {
                    run_bound(session, &weights, data, *batches, each)
                } else {
                    run_plain(session, &weights, data, *batches, each)
                }
            }
            Engine::PerCandidate {
                environment,
                threads,
                model,
                path,
                built,
            } => {
                let mut builder = device::builder(environment, placement, *threads)?;
                if placement.is_cpu() {
                    // The arena `runtime::load` registered: activations' memory stays
                    // mapped from one candidate's session to the next.
                    builder = builder.with_env_allocators().map_err(|e| {
                        Error::Runtime(format!("cannot use the shared CPU arena: {e}"))
                    })?;
                }
                // The session keeps its initializers: owned copies.
                for f in fed {
                    let name = f.name;
                    builder = builder
                        .with_external_initializer(name, Arc::new(f.copy()?))
                        .map_err(|e| {
                            Error::Runtime(format!(
                                "cannot give the model's initializer `{name}` its value: {e}"
                            ))
                        })?;
                }
                let mut session = commit(builder, model, path, !*built)?;
                *built = true;
                run_plain(&mut session, &[], data, *batches, each)
            }
        }
    }
}

/// Builds the session for the model `bytes` read from `path`. A failure of the `first`
/// session built from them is the model's (exit 2); once one was built, it is not.
fn commit(
    mut builder: ort::session::builder::SessionBuilder,
    bytes: &[u8],
    path: &std::path::Path,
    first: bool,
) -> Result<Session> {
    builder.commit_from_memory(bytes).map_err(|e| {
        if first {
            Error::model(path, format!("ONNX Runtime cannot load the model: {e}"))
        } else {
            Error::Runtime(format!("cannot build the session for a candidate: {e}"))
        }
    })
}

/// How a data set is cut into batches.
#[derive(Debug, Clone, Copy)]
struct Batches {
    /// Rows per batch.
    batch: usize,
    /// `Some(n)` when the model's batch dimension is fixed to `n` (partial batches padded).
    fixed_batch: Option<usize>,
}

impl Batches {
    /// Calls `f(start, end, padded)` for consecutive batches of `rows` rows, in order;
    /// `padded` is the padded size when a fixed batch dimension needs padding.
    fn each(
        self,
        rows: usize,
        mut f: impl FnMut(usize, usize, Option<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut start = 0;
        while start < rows {
            let end = (start + self.batch).min(rows);
            f(start, end, self.fixed_batch.filter(|&n| n > end - start))?;
            start = end;
        }
        Ok(())
    }
}

/// [`Feeder::run`] with `weights` passed with every batch (none when they are the
/// session's constants).
fn run_plain(
    session: &mut Session,
    weights: &[(Cow<'_, str>, SessionInputValue<'_>)],
    data: &ValidationSet,
    batches: Batches,
    each: &mut dyn FnMut(BatchOutputs<'_, '_>) -> Result<()>,
) -> Result<()> {
    batches.each(data.rows, |start, end, pad| {
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(data.inputs.len() + weights.len());
        for (name, arr) in &data.inputs {
            inputs.push((
                Cow::Borrowed(name.as_str()),
                batch_value(arr, start, end, pad)?,
            ));
        }
        for (name, v) in weights {
            inputs.push((name.clone(), reborrow(v)));
        }
        let outputs = session.run(inputs)?;
        each(BatchOutputs {
            outputs: &outputs,
            start,
            rows: end - start,
            padded: pad,
        })
    })
}

/// [`Feeder::run`] with the weights bound once: an `IoBinding` holds them (on a GPU,
/// ONNX Runtime uploads them when they are bound) and every output, bound to host
/// memory; each batch rebinds only the data inputs.
///
/// Every bound value is owned: `ort` 2.0.0-rc.15 clones a bound view of host memory
/// when the session wants it in host memory, and that clone deadlocks (it re-enters the
/// lock of its copy machinery), so `weights` are owned copies and batches are copied.
fn run_bound(
    session: &mut Session,
    weights: &[(Cow<'_, str>, SessionInputValue<'_>)],
    data: &ValidationSet,
    batches: Batches,
    each: &mut dyn FnMut(BatchOutputs<'_, '_>) -> Result<()>,
) -> Result<()> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    let mut io = session.create_binding()?;
    for (name, value) in weights {
        io.bind_input(name.as_ref(), &**value)?;
    }
    let host = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )?;
    let outputs: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    batches.each(data.rows, |start, end, pad| {
        for (name, arr) in &data.inputs {
            io.bind_input(name.as_str(), &owned_value(arr.rows(start, end, pad))?)?;
        }
        // Bound anew for every batch: a bound output keeps its first shape, and the last
        // batch may have fewer rows.
        io.clear_outputs();
        for name in &outputs {
            io.bind_output_to_device(name.as_str(), &host)?;
        }
        let outputs = session.run_binding(&io)?;
        each(BatchOutputs {
            outputs: &outputs,
            start,
            rows: end - start,
            padded: pad,
        })
    })
}

/// Scores candidates on a validation set with a metric.
pub struct OnnxScorer {
    feeder: Feeder,
    /// Data sets to score on: the validation set first, then any added with
    /// [`OnnxScorer::add_dataset`] (a test set).
    datasets: Vec<(ValidationSet, Option<Filter>)>,
    metric: Metric,
    output: String,
}

/// Per-tensor conversion buffer, reused across candidates.
#[derive(Default)]
struct Scratch {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
    f64: Vec<f64>,
    raw: Vec<u64>,
    /// The candidate's tensor transposed, for a [`Bound::transpose`] initializer (u64
    /// words: aligned for every element type).
    transposed: Vec<u64>,
}

impl Scratch {
    /// Fills [`Scratch::transposed`] with `bytes` (of type `dtype`) laid out as `b` is.
    fn transpose(&mut self, b: &Bound, dtype: DType, bytes: &[u8]) {
        self.transposed.resize(bytes.len().div_ceil(8), 0);
        let out = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.transposed)[..bytes.len()];
        b.transpose_into(dtype, bytes, out);
    }

    /// The bytes fed for `b`: the candidate's `bytes`, or their transposed copy.
    fn weight_bytes<'a>(&'a self, b: &Bound, bytes: &'a [u8]) -> &'a [u8] {
        if b.transpose {
            &bytemuck::cast_slice::<u64, u8>(&self.transposed)[..bytes.len()]
        } else {
            bytes
        }
    }
}

impl OnnxScorer {
    /// Rewrites `model` according to `binding` and prepares its session(s).
    pub fn new(
        runtime: &Runtime,
        model: &OnnxModel,
        binding: Binding,
        data: ValidationSet,
        metric: Metric,
        filter: Option<Filter>,
        options: &SessionOptions,
    ) -> Result<Self> {
        let outputs = model.outputs();
        let output = match (metric.output_name(), &options.output) {
            (Some(n), _) => n.to_string(),
            (None, Some(n)) => n.clone(),
            (None, None) => outputs
                .first()
                .map(|o| o.name.clone())
                .ok_or_else(|| Error::model(model.path(), "the model has no outputs"))?,
        };
        if !outputs.iter().any(|o| o.name == output) {
            return Err(Error::model(
                model.path(),
                format!(
                    "the model has no output `{output}` (its outputs: {})",
                    outputs
                        .iter()
                        .map(|o| format!("`{}`", o.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let placement = device::place(runtime, options.device)?;
        let form =
            options
                .weights
                .resolve(model, &binding, placement.is_cpu(), options.io_binding)?;
        let bytes = onnx::rewrite(model, &binding, form)?;
        let feeder = Feeder::new(runtime, model, bytes, form, binding, placement, options)?;
        Ok(Self {
            feeder,
            datasets: vec![(data, filter)],
            metric,
            output,
        })
    }

    /// The execution provider the session runs on (`CPUExecutionProvider`, `CUDAExecutionProvider`).
    pub fn provider(&self) -> &'static str {
        self.feeder.placement.provider
    }

    /// Whether each candidate's weights are bound once (`--io-binding`).
    pub fn binds_weights(&self) -> bool {
        self.feeder.binds_weights()
    }

    /// Whether the weights are graph inputs or each candidate's constants (`--weights-as`).
    pub fn weights_as(&self) -> WeightsAs {
        self.feeder.weights_as()
    }

    /// Why `--device auto` chose the CPU, when CUDA was not usable.
    pub fn device_note(&self) -> Option<&str> {
        self.feeder.placement.note.as_deref()
    }

    /// Rows per batch actually used.
    pub fn batch_size(&self) -> usize {
        self.feeder.batch_size()
    }

    /// The graph output the metric reads.
    pub fn output_name(&self) -> &str {
        &self.output
    }

    /// Adds another data set (same model inputs); returns its index for [`Scorer::score_on`].
    pub fn add_dataset(&mut self, data: ValidationSet, filter: Option<Filter>) -> usize {
        self.datasets.push((data, filter));
        self.datasets.len() - 1
    }

    /// Scores `candidate` on data set `which` (0 is the validation set).
    fn score_dataset(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        which: usize,
    ) -> Result<f64> {
        let Self {
            feeder,
            datasets,
            metric,
            output,
        } = self;
        let (data, filter) = &datasets[which];
        let batch = feeder.batch_size();
        let mut acc = Accumulator::new(metric, data.labels.as_ref(), filter.as_ref());
        feeder.run(set, candidate, data, &mut |b| {
            let value = b.outputs.get(output.as_str()).ok_or_else(|| {
                Error::Runtime(format!("the model did not produce output `{output}`"))
            })?;
            let (mut shape, out) = output_f32(value)?;
            if b.padded.is_some() && out.len() == 1 {
                return Err(Error::Metric(format!(
                    "output `{output}` is one value per batch, but the model's fixed batch size {batch} \
                     does not divide the {} validation rows, so the last batch would be padded and the \
                     score skewed; use a validation set whose size is a multiple of {batch}",
                    data.rows
                )));
            }
            let mut values: &[f32] = &out;
            // A padded batch: only its real rows count.
            if b.padded.is_some() && shape.first().is_some_and(|&d| d > b.rows) {
                values = &values[..b.rows * (values.len() / shape[0])];
                shape[0] = b.rows;
            }
            acc.update(values, &shape, b.start, b.rows)
        })?;
        Ok(acc.finish())
    }
}

impl Scorer for OnnxScorer {
    fn score(&mut self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<f64> {
        self.score_dataset(set, candidate, 0)
    }

    fn score_on(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        dataset: usize,
    ) -> Result<f64> {
        if dataset >= self.datasets.len() {
            return Err(Error::Usage(format!("no data set {dataset}")));
        }
        self.score_dataset(set, candidate, dataset)
    }
}

fn reborrow<'a>(v: &'a SessionInputValue<'_>) -> SessionInputValue<'a> {
    SessionInputValue::from(&**v)
}

/// How a weight is fed: straight from the candidate's memory, from an aligned copy of
/// its bytes, or from a converted buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Direct,
    AlignedCopy,
    Converted,
}

/// Decides how `bytes` are fed and fills the scratch buffer when they cannot be fed as they are.
fn prepare(from: DType, to: ElemType, bytes: &[u8], s: &mut Scratch) -> Source {
    let target = to.dtype();
    if from == target {
        if aligned(bytes, target.size()) {
            return Source::Direct;
        }
        s.raw.resize(bytes.len().div_ceil(8), 0);
        bytemuck::cast_slice_mut::<u64, u8>(&mut s.raw)[..bytes.len()].copy_from_slice(bytes);
        return Source::AlignedCopy;
    }
    // Different types only happen between floats (plan_binding refuses the rest).
    let n = bytes.len() / from.size();
    match to {
        ElemType::F32 => {
            s.f32.resize(n, 0.0);
            crate::storage::dtype::to_f32(from, bytes, &mut s.f32);
        }
        ElemType::F16 => {
            s.f16.resize(n, f16::ZERO);
            crate::storage::dtype::to_f16(from, bytes, &mut s.f16);
        }
        ElemType::BF16 => {
            s.bf16.resize(n, bf16::ZERO);
            crate::storage::dtype::to_bf16(from, bytes, &mut s.bf16);
        }
        _ => {
            s.f64.resize(n, 0.0);
            crate::storage::dtype::to_f64(from, bytes, &mut s.f64);
        }
    }
    Source::Converted
}

fn aligned(bytes: &[u8], align: usize) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(align)
}

/// Where a bound weight's values are fed from (`n` elements of type `elem`): the
/// candidate's own `bytes`, or the scratch buffer that [`prepare`] filled.
fn fed_bytes<'a>(
    elem: ElemType,
    n: usize,
    bytes: &'a [u8],
    s: &'a Scratch,
    source: Source,
) -> &'a [u8] {
    match source {
        Source::Direct => bytes,
        Source::AlignedCopy => &bytemuck::cast_slice::<u64, u8>(&s.raw)[..bytes.len()],
        Source::Converted => match elem {
            ElemType::F32 => bytemuck::cast_slice(&s.f32[..n]),
            ElemType::F16 => bytemuck::cast_slice(&s.f16[..n]),
            ElemType::BF16 => bytemuck::cast_slice(&s.bf16[..n]),
            _ => bytemuck::cast_slice(&s.f64[..n]),
        },
    }
}

/// One bound weight as it is fed to the model: its initializer's name, element type and
/// shape, and its values' bytes (aligned for `elem`).
struct Fed<'a> {
    name: &'a str,
    elem: ElemType,
    shape: Vec<i64>,
    bytes: &'a [u8],
}

/// `$body` with `$t` the Rust type of ONNX element type `$elem` (booleans: an error; no
/// checkpoint dtype binds to them).
macro_rules! with_elem_type {
    ($elem:expr, $t:ident => $body:expr) => {
        with_elem_type!(@arms $elem, $t, $body; F32 f32, F16 f16, BF16 bf16, F64 f64,
            I64 i64, I32 i32, I16 i16, I8 i8, U8 u8, U16 u16, U32 u32, U64 u64)
    };
    (@arms $elem:expr, $t:ident, $body:expr; $($variant:ident $ty:ty),*) => {
        match $elem {
            $(ElemType::$variant => {
                type $t = $ty;
                $body
            })*
            ElemType::Bool => Err(Error::Runtime(
                "boolean checkpoint tensors cannot be fed to the model".into(),
            )),
        }
    };
}

impl<'a> Fed<'a> {
    /// A tensor over the bytes, without a copy.
    fn view(self) -> Result<SessionInputValue<'a>> {
        let (shape, bytes) = (self.shape, self.bytes);
        with_elem_type!(self.elem, T => {
            let values = bytemuck::cast_slice::<u8, T>(bytes);
            Ok(SessionInputValue::from(
                TensorRef::<T>::from_array_view((shape, values))?.into_dyn(),
            ))
        })
    }

    /// A tensor holding a copy of the values.
    fn copy(self) -> Result<DynValue> {
        let shape = self.shape;
        with_elem_type!(self.elem, T => {
            let values = bytemuck::cast_slice::<u8, T>(self.bytes).to_vec();
            Ok(Tensor::<T>::from_array((shape, values))?.into_dyn())
        })
    }

    /// [`Fed::copy`] into `slot`: the tensor there, overwritten, when it has this type
    /// and shape (the same weight of the previous candidate), else a new one.
    fn refill(self, slot: &mut Option<DynValue>) -> Result<&DynValue> {
        let written = match slot.as_mut() {
            Some(v) => with_elem_type!(self.elem, T => {
                let values = bytemuck::cast_slice::<u8, T>(self.bytes);
                Ok(v.try_extract_tensor_mut::<T>()
                    .ok()
                    .filter(|(s, d)| ***s == *self.shape && d.len() == values.len())
                    .map(|(_, d)| d.copy_from_slice(values))
                    .is_some())
            })?,
            None => false,
        };
        if !written {
            *slot = Some(self.copy()?);
        }
        slot.as_ref()
            .ok_or_else(|| Error::Runtime("a bound weight has no buffer".into()))
    }
}

/// The rows `start..end` of a validation array as a session input (a view when no padding is needed).
fn batch_value<'a>(
    arr: &'a Array,
    start: usize,
    end: usize,
    pad: Option<usize>,
) -> Result<SessionInputValue<'a>> {
    fn rows<T: Clone + 'static + ort::value::PrimitiveTensorElementType + std::fmt::Debug>(
        a: &ArrayD<T>,
        start: usize,
        end: usize,
    ) -> Result<SessionInputValue<'_>> {
        let v = a.slice_axis(Axis(0), Slice::from(start..end));
        Ok(SessionInputValue::from(
            TensorRef::from_array_view(v)?.into_dyn(),
        ))
    }
    if pad.is_some() {
        let owned = arr.rows(start, end, pad);
        return Ok(SessionInputValue::from(owned_value(owned)?));
    }
    match arr {
        Array::F32(a) => rows(a, start, end),
        Array::F64(a) => rows(a, start, end),
        Array::F16(a) => rows(a, start, end),
        Array::BF16(a) => rows(a, start, end),
        Array::I64(a) => rows(a, start, end),
        Array::I32(a) => rows(a, start, end),
        Array::I16(a) => rows(a, start, end),
        Array::I8(a) => rows(a, start, end),
        Array::U8(a) => rows(a, start, end),
        Array::Bool(a) => rows(a, start, end),
    }
}

fn owned_value(arr: Array) -> Result<DynValue> {
    Ok(match arr {
        Array::F32(a) => Tensor::from_array(a)?.into_dyn(),
        Array::F64(a) => Tensor::from_array(a)?.into_dyn(),
        Array::F16(a) => Tensor::from_array(a)?.into_dyn(),
        Array::BF16(a) => Tensor::from_array(a)?.into_dyn(),
        Array::I64(a) => Tensor::from_array(a)?.into_dyn(),
        Array::I32(a) => Tensor::from_array(a)?.into_dyn(),
        Array::I16(a) => Tensor::from_array(a)?.into_dyn(),
        Array::I8(a) => Tensor::from_array(a)?.into_dyn(),
        Array::U8(a) => Tensor::from_array(a)?.into_dyn(),
        Array::Bool(a) => Tensor::from_array(a)?.into_dyn(),
    })
}

/// The output as `f32` values with its shape: an f32 output as it is, f16, bf16 and f64
/// outputs converted.
pub(crate) fn output_f32(value: &DynValue) -> Result<(Vec<usize>, Cow<'_, [f32]>)> {
    fn shape_of(s: &[i64]) -> Vec<usize> {
        s.iter().map(|&d| d.max(0) as usize).collect()
    }
    if let Ok((s, v)) = value.try_extract_tensor::<f32>() {
        return Ok((shape_of(s), Cow::Borrowed(v)));
    }
    if let Ok((s, v)) = value.try_extract_tensor::<f64>() {
        return Ok((shape_of(s), v.iter().map(|&x| x as f32).collect()));
    }
    // Half-precision outputs widened by the vectorised conversions (exact).
    let widened = |dtype: DType, bytes: &[u8]| {
        let mut out = vec![0f32; bytes.len() / 2];
        crate::storage::dtype::to_f32(dtype, bytes, &mut out);
        Cow::Owned(out)
    };
    if let Ok((s, v)) = value.try_extract_tensor::<f16>() {
        return Ok((shape_of(s), widened(DType::F16, bytemuck::cast_slice(v))));
    }
    if let Ok((s, v)) = value.try_extract_tensor::<bf16>() {
        return Ok((shape_of(s), widened(DType::BF16, bytemuck::cast_slice(v))));
    }
    Err(Error::Metric(format!(
        "the metric's output has type {:?}; expected a floating-point tensor",
        value.dtype()
    )))
}
