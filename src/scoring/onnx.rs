//! Reading the ONNX model and rewriting it so that each candidate's weights can be fed to it.
//!
//! The model is parsed with types generated at build time from the ONNX schema
//! (`proto/onnx.proto`, compiled by `prost`), never decoded by hand. [`plan_binding`]
//! checks, both ways, that the checkpoint tensors and the model's initializers
//! correspond, because exporters silently rename, fold or fuse weights. [`rewrite`]
//! then turns every bound initializer into a graph input, so that one ONNX Runtime
//! session can score every candidate by feeding its tensors, or into a data-less
//! placeholder that each candidate's session fills ([`WeightsAs`]); the initializers
//! that are not bound get any external data inlined so the model loads from memory.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};
use crate::storage::{DType, TensorSpec};

/// Types generated from `proto/onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::tensor_proto::{DataLocation, DataType};
use proto::tensor_shape_proto::dimension::Value as DimValue;
use proto::type_proto::Value as TypeValue;

/// ONNX element types the tool can feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl ElemType {
    fn from_onnx(code: i32) -> Option<Self> {
        Some(match DataType::try_from(code).ok()? {
            DataType::Float => ElemType::F32,
            DataType::Float16 => ElemType::F16,
            DataType::Bfloat16 => ElemType::BF16,
            DataType::Double => ElemType::F64,
            DataType::Int64 => ElemType::I64,
            DataType::Int32 => ElemType::I32,
            DataType::Int16 => ElemType::I16,
            DataType::Int8 => ElemType::I8,
            DataType::Uint8 => ElemType::U8,
            DataType::Uint16 => ElemType::U16,
            DataType::Uint32 => ElemType::U32,
            DataType::Uint64 => ElemType::U64,
            DataType::Bool => ElemType::Bool,
            _ => return None,
        })
    }

    /// The checkpoint dtype with the same memory layout.
    pub fn dtype(self) -> DType {
        match self {
            ElemType::F32 => DType::F32,
            ElemType::F16 => DType::F16,
            ElemType::BF16 => DType::BF16,
            ElemType::F64 => DType::F64,
            ElemType::I64 => DType::I64,
            ElemType::I32 => DType::I32,
            ElemType::I16 => DType::I16,
            ElemType::I8 => DType::I8,
            ElemType::U8 => DType::U8,
            ElemType::U16 => DType::U16,
            ElemType::U32 => DType::U32,
            ElemType::U64 => DType::U64,
            ElemType::Bool => DType::Bool,
        }
    }

    /// `true` for floating types.
    pub fn is_float(self) -> bool {
        self.dtype().is_float()
    }
}

/// A graph input or output: name, element type and shape (`None` for symbolic dims).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub elem: Option<ElemType>,
    pub shape: Option<Vec<Option<i64>>>,
}

/// A parsed ONNX model and where it came from (for external data).
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    pub(crate) model: proto::ModelProto,
}

/// A Conv or Gemm node: its weight initializer, its bias initializer if any, and the
/// weight's axis of output channels.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WeightedLayer {
    pub weight: String,
    pub bias: Option<String>,
    pub out_axis: usize,
}

/// Names that folding BatchNorm into the preceding layers changes (see
/// [`crate::scoring::folding`]): checkpoint tensors the fold consumes, which have no
/// initializer, and initializers the fold created, fed from a checkpoint tensor's slot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FoldNames {
    /// Checkpoint tensor names with no initializer of their own.
    pub consumed: HashSet<String>,
    /// Checkpoint tensor name → the created initializer it feeds.
    pub created: HashMap<String, String>,
    /// Initializer name → the checkpoint tensor whose transpose it is (constant folding
    /// computed it, e.g. `onnx::MatMul_9` for `x @ emb.weight.t()`); fed transposed.
    pub transposed: HashMap<String, String>,
}

/// An initializer as the model declares it.
#[derive(Debug, Clone)]
pub struct Initializer {
    pub name: String,
    pub elem: Option<ElemType>,
    pub dims: Vec<i64>,
}

impl Initializer {
    /// Element count; `None` for negative or overflowing dims (a malformed model).
    fn numel(&self) -> Option<i64> {
        self.dims
            .iter()
            .try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) })
    }
}

impl OnnxModel {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model = proto::ModelProto::decode(bytes.as_slice()).map_err(|e| {
            Error::model(
                path,
                format!("not a valid ONNX model (protobuf decoding failed: {e})"),
            )
        })?;
        if model.graph.is_none() {
            return Err(Error::model(
                path,
                "not a valid ONNX model (it has no graph)",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            model,
        })
    }

    /// The model file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn graph(&self) -> &proto::GraphProto {
        // `load` refuses models without a graph.
        self.model.graph.as_ref().expect("checked in load")
    }

    /// The graph's initializers.
    pub fn initializers(&self) -> Vec<Initializer> {
        self.graph()
            .initializer
            .iter()
            .map(|t| Initializer {
                name: t.name().to_string(),
                elem: ElemType::from_onnx(t.data_type()),
                dims: t.dims.clone(),
            })
            .collect()
    }

    /// The dims of initializer `name`, if it exists and none is negative.
    pub(crate) fn initializer_shape(&self, name: &str) -> Option<Vec<usize>> {
        let t = self.graph().initializer.iter().find(|t| t.name() == name)?;
        t.dims.iter().map(|&d| usize::try_from(d).ok()).collect()
    }

    /// The type and values (as `f64`, external data read) of float initializer `name`, or
    /// `None` when there is no such float initializer.
    pub(crate) fn initializer_f64(&self, name: &str) -> Result<Option<(DType, Vec<f64>)>> {
        Ok(self.initializer_raw(name)?.map(|(dtype, raw)| {
            let values = (0..raw.len() / dtype.size())
                .map(|i| crate::storage::dtype::read_f64(dtype, &raw, i))
                .collect();
            (dtype, values)
        }))
    }

    /// The values of float initializer `name` as little-endian bytes of its type (external
    /// data read), or `None` when there is no such float initializer or its data does not
    /// fit its dims.
    pub(crate) fn initializer_raw(&self, name: &str) -> Result<Option<(DType, Vec<u8>)>> {
        let Some(t) = self.graph().initializer.iter().find(|t| t.name() == name) else {
            return Ok(None);
        };
        let Some(elem) = ElemType::from_onnx(t.data_type()).filter(|e| e.is_float()) else {
            return Ok(None);
        };
        let mut t = t.clone();
        let base = self.path.parent().unwrap_or(Path::new("."));
        inline_external(&mut t, base, &self.path)?;
        let dtype = elem.dtype();
        let raw = match t.raw_data {
            Some(raw) => raw,
            None if !t.float_data.is_empty() => {
                t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            None if !t.double_data.is_empty() => {
                t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            // 16-bit floats without raw data: one value per int32, in its low bits.
            None if !t.int32_data.is_empty() && dtype.size() == 2 => t
                .int32_data
                .iter()
                .flat_map(|&v| (v as u16).to_le_bytes())
                .collect(),
            None => return Ok(None),
        };
        // Data that does not fit the dims (a damaged file) is no value to compare with;
        // loading the model into ONNX Runtime reports it.
        let bytes = t.dims.iter().try_fold(dtype.size(), |n, &d| {
            n.checked_mul(usize::try_from(d).ok()?)
        });
        Ok((bytes == Some(raw.len())).then_some((dtype, raw)))
    }

    /// The Conv and Gemm nodes whose weight is an initializer: the layers BatchNorm can
    /// be folded into.
    pub(crate) fn weighted_layers(&self) -> Vec<WeightedLayer> {
        let inits: HashSet<&str> = self.graph().initializer.iter().map(|t| t.name()).collect();
        let init = |i: Option<&String>| i.filter(|n| inits.contains(n.as_str())).cloned();
        self.graph()
            .node
            .iter()
            .filter_map(|n| {
                let out_axis = match n.op_type() {
                    "Conv" => 0,
                    "Gemm" => {
                        let trans_b = n
                            .attribute
                            .iter()
                            .find(|a| a.name() == "transB")
                            .is_some_and(|a| a.i() != 0);
                        if trans_b {
                            0
                        } else {
                            1
                        }
                    }
                    _ => return None,
                };
                Some(WeightedLayer {
                    weight: init(n.input.get(1))?,
                    bias: init(n.input.get(2)),
                    out_axis,
                })
            })
            .collect()
    }

    /// The graph inputs that are not initializers: the data the model is fed.
    pub fn data_inputs(&self) -> Vec<ValueInfo> {
        let inits: HashSet<&str> = self.graph().initializer.iter().map(|t| t.name()).collect();
        self.graph()
            .input
            .iter()
            .filter(|v| !inits.contains(v.name()))
            .map(value_info)
            .collect()
    }

    /// The graph outputs.
    pub fn outputs(&self) -> Vec<ValueInfo> {
        self.graph().output.iter().map(value_info).collect()
    }

    /// Whether the model is convolutional: a convolution (`Conv`, `ConvTranspose`) of
    /// the main graph reads a bound initializer as its weight, and either one of them
    /// feeds a `BatchNormalization` (which ONNX Runtime fuses into it when both are
    /// constants) or they are at least as many as the matrix products (`Gemm`, `MatMul`)
    /// reading a bound initializer. Those are where ONNX Runtime's optimisations of
    /// constant weights pay most ([`WeightsAs::Constants`]); a transformer with a
    /// convolutional patch embedding is not counted as one.
    pub fn convolves(&self, binding: &Binding) -> bool {
        let bound: HashSet<&str> = binding.bound.iter().map(|b| b.name.as_str()).collect();
        let nodes = &self.graph().node;
        let mut conv_outputs = HashSet::new();
        let mut products = 0usize;
        for n in nodes {
            match n.op_type() {
                "Conv" | "ConvTranspose"
                    if n.input.get(1).is_some_and(|w| bound.contains(w.as_str())) =>
                {
                    conv_outputs.extend(n.output.iter().map(String::as_str))
                }
                "Gemm" | "MatMul" if n.input.iter().any(|i| bound.contains(i.as_str())) => {
                    products += 1
                }
                _ => {}
            }
        }
        let batchnorm_after = nodes.iter().any(|n| {
            n.op_type() == "BatchNormalization"
                && n.input
                    .first()
                    .is_some_and(|i| conv_outputs.contains(i.as_str()))
        });
        !conv_outputs.is_empty() && (batchnorm_after || conv_outputs.len() >= products)
    }

    /// Operator types used by the main graph (for diagnostics).
    pub(crate) fn op_types(&self) -> HashSet<&str> {
        self.graph().node.iter().map(|n| n.op_type()).collect()
    }
}

fn value_info(v: &proto::ValueInfoProto) -> ValueInfo {
    let tensor = v.r#type.as_ref().and_then(|t| match &t.value {
        Some(TypeValue::TensorType(tt)) => Some(tt),
        _ => None,
    });
    ValueInfo {
        name: v.name().to_string(),
        elem: tensor.and_then(|t| ElemType::from_onnx(t.elem_type())),
        shape: tensor.and_then(|t| t.shape.as_ref()).map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(DimValue::DimValue(n)) if n > 0 => Some(n),
                    _ => None,
                })
                .collect()
        }),
    }
}

/// A checkpoint tensor fed to the model in place of an initializer.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    /// Index into the checkpoint set's specs.
    pub tensor: usize,
    pub name: String,
    /// The model's element type for it (the checkpoint's values are converted if it differs).
    pub elem: ElemType,
    /// The initializer's shape.
    pub shape: Vec<usize>,
    /// The initializer is the transpose of the (2-D) checkpoint tensor: fed transposed.
    pub transpose: bool,
}

impl Bound {
    /// The checkpoint tensor's bytes (of type `dtype`) laid out as the initializer is:
    /// transposed when [`Bound::transpose`], else as they are.
    pub fn layout<'a>(&self, dtype: DType, bytes: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if !self.transpose {
            return std::borrow::Cow::Borrowed(bytes);
        }
        let mut out = vec![0u8; bytes.len()];
        self.transpose_into(dtype, bytes, &mut out);
        std::borrow::Cow::Owned(out)
    }

    /// Writes the checkpoint tensor's bytes (of type `dtype`) transposed into `out`, as a
    /// [`Bound::transpose`] initializer holds them.
    pub(crate) fn transpose_into(&self, dtype: DType, bytes: &[u8], out: &mut [u8]) {
        // The initializer is [cols, rows] for the checkpoint's [rows, cols].
        let (rows, cols) = (self.shape[1], self.shape[0]);
        crate::storage::dtype::transpose_into(bytes, rows, cols, dtype.size(), out);
    }
}

/// Which checkpoint tensors replace which initializers.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub bound: Vec<Bound>,
    /// Integer checkpoint tensors the graph does not use (copied to the output only).
    pub unused_integer: Vec<String>,
    /// How checkpoint names map to initializer names when they differ by a prefix.
    pub rename: Option<Rename>,
}

/// Checkpoint tensor names that differ from the model's initializer names by a leading
/// module path, as wrappers leave them: `module.` (DistributedDataParallel),
/// `_orig_mod.` (`torch.compile`), `model.` (a Lightning module): the initializer of a
/// checkpoint tensor is its name without `strip`, with `add` in front.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rename {
    pub strip: String,
    pub add: String,
}

impl Rename {
    /// The initializer name for checkpoint tensor `name`.
    pub fn apply(&self, name: &str) -> Option<String> {
        name.strip_prefix(self.strip.as_str())
            .map(|rest| format!("{}{rest}", self.add))
    }
}

impl std::fmt::Display for Rename {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.strip.is_empty(), self.add.is_empty()) {
            (false, true) => write!(f, "checkpoint names without the prefix `{}`", self.strip),
            (true, false) => write!(f, "checkpoint names with `{}` added in front", self.add),
            _ => write!(
                f,
                "checkpoint names with `{}` in front in place of `{}`",
                self.add, self.strip
            ),
        }
    }
}

/// Checks that the checkpoint tensors and the model's initializers correspond, both ways.
///
/// Every floating checkpoint tensor must be an initializer of the same name and shape;
/// every non-scalar floating initializer must come from the checkpoints unless it is
/// named in `allow_constant`. Integer checkpoint tensors are bound when the graph has
/// them and ignored otherwise.
///
/// When the names do not correspond but do after removing a leading module path from the
/// checkpoint names (or adding one), as `module.` from DistributedDataParallel or
/// `_orig_mod.` from `torch.compile` leave them, that mapping is used ([`Binding::rename`]);
/// the names of the output stay the checkpoints'.
pub fn plan_binding(
    model: &OnnxModel,
    specs: &[TensorSpec],
    allow_constant: &[String],
) -> Result<Binding> {
    let exact = bind_names(model, specs, allow_constant, None, &FoldNames::default());
    if exact.is_ok() {
        return exact;
    }
    for rename in prefix_candidates(model, specs) {
        if let Ok(binding) = bind_names(
            model,
            specs,
            allow_constant,
            Some(rename),
            &FoldNames::default(),
        ) {
            return Ok(binding);
        }
    }
    exact
}

/// Prefix mappings that would give the first float checkpoint tensor without an
/// initializer of its name (that some mapping fits) one: checkpoint name = STRIP +
/// initializer name, or initializer name = ADD + checkpoint name, the prefix ending with
/// a `.`.
pub(crate) fn prefix_candidates(model: &OnnxModel, specs: &[TensorSpec]) -> Vec<Rename> {
    let inits: Vec<String> = model.initializers().into_iter().map(|i| i.name).collect();
    let names: HashSet<&str> = inits.iter().map(String::as_str).collect();
    specs
        .iter()
        .filter(|s| s.dtype.is_float() && !names.contains(s.name.as_str()))
        .map(|s| prefixes_for(&s.name, &inits))
        .find(|c| !c.is_empty())
        .unwrap_or_default()
}

/// The prefix mappings that make checkpoint tensor `name` one of `inits`, shortest first.
fn prefixes_for(name: &str, inits: &[String]) -> Vec<Rename> {
    let mut out: Vec<Rename> = Vec::new();
    for init in inits {
        let rename = if let Some(p) = name.strip_suffix(init.as_str()) {
            Rename {
                strip: p.to_string(),
                add: String::new(),
            }
        } else if let Some(p) = init.strip_suffix(name) {
            Rename {
                strip: String::new(),
                add: p.to_string(),
            }
        } else {
            continue;
        };
        let prefix = if rename.add.is_empty() {
            &rename.strip
        } else {
            &rename.add
        };
        if prefix.ends_with('.') && !out.contains(&rename) {
            out.push(rename);
        }
    }
    // Shortest prefix first.
    out.sort_by_key(|r| (r.strip.len() + r.add.len(), r.strip.clone(), r.add.clone()));
    out
}

/// [`plan_binding`] for a model whose BatchNorm was folded into the preceding layers:
/// the tensors `fold` consumes are not bound, and the initializers it created are fed
/// from the checkpoint tensor slots it names.
pub fn plan_folded_binding(
    model: &OnnxModel,
    specs: &[TensorSpec],
    allow_constant: &[String],
    fold: &FoldNames,
    rename: Option<Rename>,
) -> Result<Binding> {
    bind_names(model, specs, allow_constant, rename, fold)
}

/// [`plan_binding`] with checkpoint names mapped by `rename` (every float checkpoint
/// tensor must carry its `strip` prefix).
fn bind_names(
    model: &OnnxModel,
    specs: &[TensorSpec],
    allow_constant: &[String],
    rename: Option<Rename>,
    fold: &FoldNames,
) -> Result<Binding> {
    let onnx_name = |name: &str| -> Option<String> {
        if let Some(created) = fold.created.get(name) {
            return Some(created.clone());
        }
        match &rename {
            None => Some(name.to_string()),
            Some(r) => r.apply(name),
        }
    };
    let inits: HashMap<String, Initializer> = model
        .initializers()
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    let mut bound = Vec::new();
    let mut unused_integer = Vec::new();
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    let fed_transposed: HashSet<&str> = fold.transposed.values().map(String::as_str).collect();
    for (t, spec) in specs.iter().enumerate() {
        if fold.consumed.contains(&spec.name) {
            continue;
        }
        let init = onnx_name(&spec.name)
            .and_then(|n| inits.get(&n))
            // Boolean buffers are never fed: the graph keeps its own constant.
            .filter(|_| spec.dtype != DType::Bool);
        let Some(init) = init else {
            if fed_transposed.contains(spec.name.as_str()) {
                continue;
            }
            if spec.dtype.is_float() {
                missing.push(spec.name.clone());
            } else {
                unused_integer.push(spec.name.clone());
            }
            continue;
        };
        let dims: Vec<usize> = init.dims.iter().map(|&d| d.max(0) as usize).collect();
        if dims != spec.shape {
            problems.push(format!(
                "`{}` has shape {:?} in the checkpoints but {:?} in the model",
                spec.name, spec.shape, dims
            ));
            continue;
        }
        let Some(elem) = init.elem else {
            problems.push(format!(
                "`{}` has an element type the tool cannot feed",
                spec.name
            ));
            continue;
        };
        let compatible = if spec.dtype.is_float() {
            elem.is_float()
        } else {
            elem.dtype() == spec.dtype
        };
        if !compatible {
            problems.push(format!(
                "`{}` is {} in the checkpoints but {:?} in the model",
                spec.name, spec.dtype, elem
            ));
            continue;
        }
        bound.push(Bound {
            tensor: t,
            name: init.name.clone(),
            elem,
            shape: spec.shape.clone(),
            transpose: false,
        });
    }
    // Initializers that are transposed checkpoint tensors, in name order.
    let mut transposed: Vec<(&String, &String)> = fold.transposed.iter().collect();
    transposed.sort();
    for (name, source) in transposed {
        let t = specs.iter().position(|s| &s.name == source);
        let init = inits
            .get(name)
            .filter(|i| i.elem.is_some_and(ElemType::is_float));
        let (Some(t), Some(init), Some(elem)) = (t, init, init.and_then(|i| i.elem)) else {
            problems.push(format!(
                "`{name}` is not a float initializer the checkpoints' `{source}` can feed"
            ));
            continue;
        };
        let dims: Vec<usize> = init.dims.iter().map(|&d| d.max(0) as usize).collect();
        let spec = &specs[t];
        if spec.shape.len() != 2 || dims != [spec.shape[1], spec.shape[0]] || !spec.dtype.is_float()
        {
            problems.push(format!(
                "`{name}` has shape {dims:?}, not the transpose of `{source}` {:?}",
                spec.shape
            ));
            continue;
        }
        bound.push(Bound {
            tensor: t,
            name: name.clone(),
            elem,
            shape: dims,
            transpose: true,
        });
    }
    let from_checkpoints: HashSet<String> = specs
        .iter()
        .filter(|s| !fold.consumed.contains(&s.name))
        .filter_map(|s| onnx_name(&s.name))
        .chain(fold.transposed.keys().cloned())
        .collect();
    let mut constants: Vec<String> = inits
        .values()
        .filter(|i| i.elem.is_some_and(ElemType::is_float))
        .filter(|i| i.numel().is_none_or(|n| n > 1))
        .filter(|i| !from_checkpoints.contains(&i.name))
        .filter(|i| !allow_constant.contains(&i.name))
        .map(|i| i.name.clone())
        .collect();
    constants.sort();

    if missing.is_empty() && constants.is_empty() && problems.is_empty() {
        return Ok(Binding {
            bound,
            unused_integer,
            rename,
        });
    }
    Err(Error::model(
        model.path(),
        mismatch_message(model, &missing, &constants, &problems),
    ))
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s: Vec<String> = names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect();
    if names.len() > SHOWN {
        s.push(format!("and {} more", names.len() - SHOWN));
    }
    s.join(", ")
}

fn mismatch_message(
    model: &OnnxModel,
    missing: &[String],
    constants: &[String],
    problems: &[String],
) -> String {
    let mut msg = String::from("the model's weights do not match the checkpoints' tensors");
    if !missing.is_empty() {
        msg += &format!(
            "\n  checkpoint tensors that are not initializers of the model ({}): {}",
            missing.len(),
            list(missing)
        );
    }
    if !constants.is_empty() {
        msg += &format!(
            "\n  model initializers that no checkpoint provides ({}): {}",
            constants.len(),
            list(constants)
        );
    }
    for p in problems {
        msg += &format!("\n  {p}");
    }
    let folded = constants
        .iter()
        .any(|c| c.starts_with("onnx::") || c.contains("::"));
    let bn_missing = missing
        .iter()
        .any(|m| m.ends_with("running_mean") || m.ends_with("running_var"));
    let has_bn = model.op_types().contains("BatchNormalization");
    msg += "\n  likely cause: the exporter changed the weights, so replacing them by name would score a different model:";
    let fused = bn_missing;
    if fused {
        let detail = if has_bn {
            "some of the checkpoints' running statistics are not in the model"
        } else {
            "the model has no BatchNormalization node, but the checkpoints have running statistics"
        };
        msg += &format!("\n  - BatchNorm was fused into the preceding layers ({detail}): \
                 `torch.onnx.export(..., optimize=True)` does this. \
                 The tool folds candidates the same way when the fused layers' values are the fold of one of \
                 the checkpoints (the state the model was exported from); here they are not");
    }
    if folded {
        msg += "\n  - constant folding produced new weights (names like `onnx::MatMul_123` are computed from the \
                 parameters). The tool accounts for transposed copies and folded BatchNorm when their values are \
                 those of one of the checkpoints (the state the model was exported from); here they are not";
    }
    if !folded && !fused {
        msg += "\n  - the model and the checkpoints come from different architectures or versions of the code, \
                 or the exporter renamed or merged parameters";
    }
    msg += "\n  fix: export with `torch.onnx.export(model, args, path, dynamo=True, optimize=False)` \
            (legacy exporter: `dynamo=False, do_constant_folding=False`), from the same architecture as the \
            checkpoints; if an initializer really is a constant that training did not change, name it with \
            --allow-constant NAME";
    msg
}

/// How a rewritten model receives a candidate's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsAs {
    /// Every bound initializer becomes a graph input: one session scores every
    /// candidate, its weights fed with each run.
    Inputs,
    /// Every bound initializer stays an initializer whose data is left out (an external
    /// data reference to nothing): a session is built per candidate with its weights
    /// supplied as external initializers, so ONNX Runtime sees constants and applies
    /// what it only does to constants (Conv+BatchNorm fusion, pre-packed and re-laid-out
    /// convolution weights). Bound initializers no node reads are dropped.
    Constants,
}

/// The reference a [`WeightsAs::Constants`] placeholder carries instead of its data.
/// ONNX Runtime replaces it with the supplied value before it reads any data.
const PLACEHOLDER_LOCATION: &str = "aswa-merge-candidate-weights";

/// Returns the model rewritten for `binding` (see [`WeightsAs`]), with any external
/// data of the initializers that are not bound read in, encoded as protobuf bytes.
pub fn rewrite(model: &OnnxModel, binding: &Binding, to: WeightsAs) -> Result<Vec<u8>> {
    Ok(rewritten(model, binding, to)?.encode_to_vec())
}

/// The model rewritten for `binding` (see [`rewrite`]).
pub(crate) fn rewritten(
    model: &OnnxModel,
    binding: &Binding,
    to: WeightsAs,
) -> Result<proto::ModelProto> {
    let mut m = model.model.clone();
    let graph = m.graph.as_mut().expect("checked in load");
    let bound: HashMap<&str, &Bound> = binding.bound.iter().map(|b| (b.name.as_str(), b)).collect();
    let base = model.path.parent().unwrap_or(Path::new("."));
    match to {
        WeightsAs::Inputs => graph.initializer.retain(|t| !bound.contains_key(t.name())),
        WeightsAs::Constants => {
            let read = names_read(graph);
            graph
                .initializer
                .retain(|t| !bound.contains_key(t.name()) || read.contains(t.name()));
            // An initializer also declared as a graph input could be overridden at run
            // time, so ONNX Runtime would not treat it as a constant.
            graph.input.retain(|i| !bound.contains_key(i.name()));
        }
    }
    for t in &mut graph.initializer {
        match bound.get(t.name()) {
            Some(b) => placeholder(t, b),
            None => inline_external(t, base, &model.path)?,
        }
    }
    if to == WeightsAs::Constants {
        return Ok(m);
    }
    let existing: HashSet<String> = graph.input.iter().map(|v| v.name().to_string()).collect();
    for b in &binding.bound {
        if existing.contains(&b.name) {
            continue;
        }
        graph.input.push(proto::ValueInfoProto {
            name: Some(b.name.clone()),
            r#type: Some(proto::TypeProto {
                value: Some(TypeValue::TensorType(proto::type_proto::Tensor {
                    elem_type: Some(elem_code(b.elem)),
                    shape: Some(proto::TensorShapeProto {
                        dim: b
                            .shape
                            .iter()
                            .map(|&d| proto::tensor_shape_proto::Dimension {
                                value: Some(DimValue::DimValue(d as i64)),
                                denotation: None,
                            })
                            .collect(),
                    }),
                })),
                denotation: None,
            }),
            ..Default::default()
        });
    }
    Ok(m)
}

/// Makes `t` a data-less initializer of `b`'s type and shape (see [`WeightsAs::Constants`]).
fn placeholder(t: &mut proto::TensorProto, b: &Bound) {
    let bytes = b.shape.iter().product::<usize>() * b.elem.dtype().size();
    let entry = |k: &str, v: String| proto::StringStringEntryProto {
        key: Some(k.to_string()),
        value: Some(v),
    };
    *t = proto::TensorProto {
        name: t.name.take(),
        dims: b.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(elem_code(b.elem)),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            entry("location", PLACEHOLDER_LOCATION.to_string()),
            entry("offset", "0".to_string()),
            entry("length", bytes.to_string()),
        ],
        ..Default::default()
    };
}

/// Every value name a node of `graph` (or of a subgraph in its attributes) reads, and
/// the graph's outputs.
fn names_read(graph: &proto::GraphProto) -> HashSet<String> {
    fn walk(g: &proto::GraphProto, out: &mut HashSet<String>) {
        out.extend(g.output.iter().map(|o| o.name().to_string()));
        for n in &g.node {
            out.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    walk(sub, out);
                }
            }
        }
    }
    let mut out = HashSet::new();
    walk(graph, &mut out);
    out
}

/// The 2 GB protobuf limit, less a margin for the graph itself: above it, `export`
/// writes the weights to an external data file.
const INLINE_LIMIT: usize = (2 << 30) - (64 << 20);

/// Writes `model` with the bound initializers replaced by `tensor(t)` (the bytes of
/// checkpoint tensor `t`, converted to the initializer's type), the graph otherwise
/// unchanged. Models whose weights exceed 2 GB get an external data file
/// `<path>.data` beside `path`, as ONNX requires. Both files are written atomically.
pub fn export<'a>(
    model: &OnnxModel,
    binding: &Binding,
    specs: &[TensorSpec],
    tensor: impl Fn(usize) -> &'a [u8],
    path: &Path,
) -> Result<()> {
    export_with_limit(model, binding, specs, tensor, path, INLINE_LIMIT)
}

/// [`export`] with the size above which weights go to an external data file (tests use
/// a small one to exercise the > 2 GB layout).
pub fn export_with_limit<'a>(
    model: &OnnxModel,
    binding: &Binding,
    specs: &[TensorSpec],
    tensor: impl Fn(usize) -> &'a [u8],
    path: &Path,
    inline_limit: usize,
) -> Result<()> {
    let mut m = model.model.clone();
    let graph = m.graph.as_mut().expect("checked in load");
    let bound: HashMap<&str, &Bound> = binding.bound.iter().map(|b| (b.name.as_str(), b)).collect();
    let base = model.path.parent().unwrap_or(Path::new("."));
    let mut total = 0usize;
    for t in &mut graph.initializer {
        if let Some(b) = bound.get(t.name()) {
            let from = specs[b.tensor].dtype;
            let bytes = crate::storage::dtype::convert_bytes(
                from,
                b.elem.dtype(),
                &b.layout(from, tensor(b.tensor)),
            );
            t.float_data.clear();
            t.double_data.clear();
            t.int32_data.clear();
            t.int64_data.clear();
            t.uint64_data.clear();
            t.external_data.clear();
            t.data_location = Some(DataLocation::Default as i32);
            t.raw_data = Some(bytes);
        } else {
            inline_external(t, base, &model.path)?;
        }
        total += t.raw_data.as_ref().map_or(0, Vec::len);
    }
    if total > inline_limit {
        let data_name = format!(
            "{}.data",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let data_path = path.with_file_name(&data_name);
        let mut offset = 0usize;
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        for t in &mut graph.initializer {
            let Some(raw) = t.raw_data.take_if(|r| r.len() >= 1024) else {
                continue;
            };
            let entry = |k: &str, v: String| proto::StringStringEntryProto {
                key: Some(k.to_string()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", data_name.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            offset += raw.len();
            chunks.push(raw);
        }
        crate::storage::writer::atomic_write(&data_path, |w| {
            use std::io::Write;
            chunks.iter().try_for_each(|c| w.write_all(c))
        })?;
    }
    let bytes = m.encode_to_vec();
    crate::storage::writer::atomic_write(path, |w| std::io::Write::write_all(w, &bytes))
}

pub(crate) fn elem_code(e: ElemType) -> i32 {
    (match e {
        ElemType::F32 => DataType::Float,
        ElemType::F16 => DataType::Float16,
        ElemType::BF16 => DataType::Bfloat16,
        ElemType::F64 => DataType::Double,
        ElemType::I64 => DataType::Int64,
        ElemType::I32 => DataType::Int32,
        ElemType::I16 => DataType::Int16,
        ElemType::I8 => DataType::Int8,
        ElemType::U8 => DataType::Uint8,
        ElemType::U16 => DataType::Uint16,
        ElemType::U32 => DataType::Uint32,
        ElemType::U64 => DataType::Uint64,
        ElemType::Bool => DataType::Bool,
    }) as i32
}

/// Reads a tensor's external data (`location`, `offset`, `length`, relative to the
/// model's folder) into `raw_data`.
fn inline_external(t: &mut proto::TensorProto, base: &Path, model_path: &Path) -> Result<()> {
    if t.data_location() != DataLocation::External {
        return Ok(());
    }
    let bad = |msg: String| Error::model(model_path, format!("initializer `{}`: {msg}", t.name()));
    let number = |key: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| bad(format!("external data `{key}` is `{v}`, not a byte count")))
    };
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        match kv.key() {
            "location" => location = Some(kv.value().to_string()),
            "offset" => offset = number("offset", kv.value())?,
            "length" => length = Some(number("length", kv.value())?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| bad("external data without a location".into()))?;
    let relative = Path::new(&location);
    if relative.is_absolute()
        || relative.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    {
        return Err(bad(format!(
            "external data location `{location}` is not a file name inside the model's folder; \
             refusing to read outside it"
        )));
    }
    let file_path = base.join(relative);
    let mut f = std::fs::File::open(&file_path).map_err(|e| {
        bad(format!(
            "cannot open its external data file {}: {e} (keep the `.data` file beside the model)",
            file_path.display()
        ))
    })?;
    let file_len = f.metadata().map_err(|e| Error::io(&file_path, e))?.len();
    let length = length.unwrap_or(file_len.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > file_len) {
        return Err(bad(format!(
            "external data range {offset}+{length} is beyond the end of {} ({file_len} bytes)",
            file_path.display()
        )));
    }
    let mut buf = vec![0u8; length as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| Error::io(&file_path, e))?;
    t.raw_data = Some(buf);
    t.external_data.clear();
    t.data_location = Some(DataLocation::Default as i32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dims: &[i64]) -> proto::TensorProto {
        let n = dims.iter().product::<i64>() as usize;
        proto::TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(vec![0u8; 4 * n]),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> proto::NodeProto {
        proto::NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn named(name: &str) -> proto::ValueInfoProto {
        proto::ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    /// `h = x @ W`; `y = If(c) then B (read by the branch, an outer-scope name) else h`;
    /// `z = h + C`. `W` is also declared a graph input; `U` is read by nothing.
    /// `W`, `B` and `U` are bound; `C` is a constant of the model.
    fn model() -> (OnnxModel, Binding) {
        let branch = proto::GraphProto {
            node: vec![node("Identity", &["B"], "b_out")],
            output: vec![named("b_out")],
            ..Default::default()
        };
        let mut cond = node("If", &["c"], "y");
        cond.attribute.push(proto::AttributeProto {
            name: Some("then_branch".into()),
            g: Some(branch.clone()),
            ..Default::default()
        });
        let graph = proto::GraphProto {
            node: vec![
                node("MatMul", &["x", "W"], "h"),
                cond,
                node("Add", &["h", "C"], "z"),
            ],
            initializer: vec![
                tensor("W", &[4, 3]),
                tensor("B", &[3]),
                tensor("U", &[2]),
                tensor("C", &[3]),
            ],
            input: vec![named("x"), named("c"), named("W")],
            output: vec![named("y"), named("z")],
            ..Default::default()
        };
        let model = OnnxModel {
            path: PathBuf::from("model.onnx"),
            model: proto::ModelProto {
                graph: Some(graph),
                ..Default::default()
            },
        };
        let bound = |tensor: usize, name: &str, shape: &[usize]| Bound {
            tensor,
            name: name.into(),
            elem: ElemType::F32,
            shape: shape.to_vec(),
            transpose: false,
        };
        let binding = Binding {
            bound: vec![
                bound(0, "W", &[4, 3]),
                bound(1, "B", &[3]),
                bound(2, "U", &[2]),
            ],
            unused_integer: Vec::new(),
            rename: None,
        };
        (model, binding)
    }

    fn names<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        it.collect()
    }

    #[test]
    fn a_model_is_convolutional_with_batchnorm_or_when_its_convolutions_are_not_outnumbered() {
        let bound = |names: &[&str]| Binding {
            bound: names
                .iter()
                .enumerate()
                .map(|(i, n)| Bound {
                    tensor: i,
                    name: n.to_string(),
                    elem: ElemType::F32,
                    shape: vec![1],
                    transpose: false,
                })
                .collect(),
            unused_integer: Vec::new(),
            rename: None,
        };
        let model = |nodes: Vec<proto::NodeProto>| OnnxModel {
            path: PathBuf::from("model.onnx"),
            model: proto::ModelProto {
                graph: Some(proto::GraphProto {
                    node: nodes,
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        // A CNN: two convolutions and a classifier.
        let cnn = model(vec![
            node("Conv", &["x", "c1.w"], "a"),
            node("Conv", &["a", "c2.w"], "b"),
            node("Gemm", &["b", "fc.w", "fc.b"], "y"),
        ]);
        assert!(cnn.convolves(&bound(&["c1.w", "c2.w", "fc.w", "fc.b"])));
        // A patch embedding before matrix products: a transformer.
        let vit = model(vec![
            node("Conv", &["x", "patch.w"], "a"),
            node("MatMul", &["a", "q.w"], "b"),
            node("MatMul", &["b", "o.w"], "y"),
        ]);
        assert!(!vit.convolves(&bound(&["patch.w", "q.w", "o.w"])));
        // A convolution whose weight is not a checkpoint tensor does not count.
        assert!(!cnn.convolves(&bound(&["fc.w"])));
        // One convolution with a BatchNorm before a two-layer classifier: ONNX Runtime
        // fuses the pair when both are constants.
        let conv_bn = model(vec![
            node("Conv", &["x", "c.w"], "a"),
            node("BatchNormalization", &["a", "g", "b", "m", "v"], "n"),
            node("Gemm", &["n", "fc1.w"], "h"),
            node("Gemm", &["h", "fc2.w"], "y"),
        ]);
        assert!(conv_bn.convolves(&bound(&["c.w", "g", "b", "m", "v", "fc1.w", "fc2.w"])));
    }

    #[test]
    fn weights_as_inputs_become_graph_inputs() {
        let (model, binding) = model();
        let m = rewritten(&model, &binding, WeightsAs::Inputs).unwrap();
        let g = m.graph.unwrap();
        assert_eq!(names(g.initializer.iter().map(|t| t.name())), ["C"]);
        assert_eq!(
            names(g.input.iter().map(|i| i.name())),
            ["x", "c", "W", "B", "U"]
        );
    }

    #[test]
    fn weights_as_constants_are_data_less_placeholders_of_the_initializers_read() {
        let (model, binding) = model();
        let m = rewritten(&model, &binding, WeightsAs::Constants).unwrap();
        let g = m.graph.unwrap();
        // U is read by no node: ONNX Runtime drops such initializers before it takes the
        // supplied values, and a value for a missing initializer is an error.
        assert_eq!(
            names(g.initializer.iter().map(|t| t.name())),
            ["W", "B", "C"]
        );
        // A bound initializer declared as a graph input would not be a constant.
        assert_eq!(names(g.input.iter().map(|i| i.name())), ["x", "c"]);
        for (t, dims) in g.initializer.iter().zip([&[4i64, 3][..], &[3]]) {
            assert_eq!(t.dims, dims, "{}", t.name());
            assert_eq!(t.data_type, Some(DataType::Float as i32));
            assert_eq!(t.data_location(), DataLocation::External);
            assert_eq!(
                t.raw_data,
                None,
                "{}: the candidate supplies the data",
                t.name()
            );
            let length = t.external_data.iter().find(|e| e.key() == "length");
            let bytes = 4 * dims.iter().product::<i64>();
            assert_eq!(length.map(|e| e.value()), Some(bytes.to_string().as_str()));
        }
        // The model's own constant keeps its data.
        assert_eq!(g.initializer[2].raw_data.as_ref().map(Vec::len), Some(12));
    }
}
