//! BatchNorm recalibration (`--recalibrate-bn`): running statistics recomputed on
//! calibration data for every candidate, as `torch.optim.swa_utils.update_bn` does.
//!
//! Averaging weights leaves BatchNorm running statistics that belong to none of the
//! averaged models. `update_bn` resets them and runs the model in training mode over
//! the calibration data with `momentum=None`: every BatchNorm normalises with its own
//! batch statistics, and the stored statistics become the plain average over batches
//! of the batch mean and of the unbiased batch variance. Dropout is not touched here:
//! it stays in inference mode, which differs from a torch training-mode pass (where it
//! would be active) unless the model is put in eval mode and only BatchNorm in train
//! mode, which is what the ASWA authors' `bn_update` effectively measures.
//!
//! The pass runs in ONNX Runtime on a second graph derived once from the model: each
//! `BatchNormalization` node is replaced by the same computation with batch statistics
//! (`ReduceMean` over every axis but the channel axis), and each node's batch mean,
//! biased batch variance and input shape become graph outputs. The averaging over
//! batches, and the correction to the unbiased variance, happen here in `f64`.

use std::collections::HashMap;

use prost::Message;

use super::data::ValidationSet;
use super::onnx::{self, proto, Binding, OnnxModel};
use super::runtime::Runtime;
use super::session::{output_f32, Feeder, SessionOptions};
use super::Scorer;
use crate::averaging::{Candidate, Recipe, Weights};
use crate::error::{Error, Result};
use crate::storage::CheckpointSet;

/// One BatchNormalization node and the checkpoint tensors holding its statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormNode {
    /// The node's name (or its output's, when unnamed).
    pub name: String,
    /// Checkpoint tensor of the running mean (e.g. `bn1.running_mean`).
    pub mean_tensor: usize,
    /// Checkpoint tensor of the running variance.
    pub var_tensor: usize,
}

/// Recomputes BatchNorm statistics of candidates on calibration data.
pub struct Recalibrator {
    feeder: Feeder,
    data: ValidationSet,
    nodes: Vec<BatchNormNode>,
}

impl Recalibrator {
    /// The BatchNormalization nodes of `model` whose statistics come from the
    /// checkpoints; an error if a node's statistics are constants of the model.
    pub fn nodes(model: &OnnxModel, binding: &Binding) -> Result<Vec<BatchNormNode>> {
        let by_name: HashMap<&str, usize> = binding
            .bound
            .iter()
            .map(|b| (b.name.as_str(), b.tensor))
            .collect();
        let graph = model.model.graph.as_ref().expect("checked in load");
        let mut nodes = Vec::new();
        for node in graph
            .node
            .iter()
            .filter(|n| n.op_type() == "BatchNormalization")
        {
            let name = node
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .or_else(|| node.output.first().cloned())
                .unwrap_or_default();
            let stat = |i: usize| -> Result<usize> {
                let input = node.input.get(i).map(String::as_str).unwrap_or("");
                by_name.get(input).copied().ok_or_else(|| {
                    Error::model(
                        model.path(),
                        format!(
                            "BatchNormalization `{name}`: its {} `{input}` is not a checkpoint tensor, \
                             so it cannot be recalibrated",
                            if i == 3 { "running mean" } else { "running variance" }
                        ),
                    )
                })
            };
            nodes.push(BatchNormNode {
                mean_tensor: stat(3)?,
                var_tensor: stat(4)?,
                name,
            });
        }
        Ok(nodes)
    }

    /// Builds the calibration session, or `None` when the model has no BatchNormalization.
    pub fn new(
        runtime: &Runtime,
        model: &OnnxModel,
        binding: &Binding,
        data: ValidationSet,
        options: &SessionOptions,
    ) -> Result<Option<Self>> {
        let nodes = Self::nodes(model, binding)?;
        if nodes.is_empty() {
            return Ok(None);
        }
        let bytes = calibration_graph(model, binding)?.encode_to_vec();
        let placement = super::device::place(runtime, options.device)?;
        let mut feeder = Feeder::new(
            runtime,
            model,
            bytes,
            onnx::WeightsAs::Inputs,
            binding.clone(),
            placement,
            options,
        )?;
        if feeder
            .fixed_batch()
            .is_some_and(|n| !data.rows.is_multiple_of(n))
        {
            return Err(Error::data(
                &data.path,
                format!(
                    "the model's batch dimension is fixed to {}: the {} calibration rows would need a \
                     padded last batch, which would distort the batch statistics; use a multiple of {}",
                    feeder.batch_size(),
                    data.rows,
                    feeder.batch_size()
                ),
            ));
        }
        feeder.set_batch_size(options.batch_size);
        Ok(Some(Self {
            feeder,
            data,
            nodes,
        }))
    }

    /// The BatchNormalization nodes recalibrated.
    pub fn batchnorm_nodes(&self) -> &[BatchNormNode] {
        &self.nodes
    }

    /// Calibration rows.
    pub fn rows(&self) -> usize {
        self.data.rows
    }

    /// Rows per calibration batch.
    pub fn batch_size(&self) -> usize {
        self.feeder.batch_size()
    }

    /// `candidate` with every BatchNorm's running mean and variance recomputed.
    pub fn apply(&mut self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<Weights> {
        let k = self.nodes.len();
        let mut sums: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); k];
        let mut batches = 0usize;
        let nodes = &self.nodes;
        let path = &self.data.path;
        self.feeder.run(set, candidate, &self.data, &mut |b| {
            for (i, node) in nodes.iter().enumerate() {
                let get = |suffix: &str| {
                    let name = stat_name(i, suffix);
                    b.outputs.get(name.as_str()).ok_or_else(|| {
                        Error::Runtime(format!("the calibration graph did not produce `{name}`"))
                    })
                };
                let (_, mean) = output_f32(get("mean")?)?;
                let (_, var) = output_f32(get("var")?)?;
                let (_, shape) = get("shape")?.try_extract_tensor::<i64>()?;
                let channels = mean.len();
                let count: i64 = shape.iter().product::<i64>() / shape.get(1).copied().unwrap_or(1).max(1);
                if count < 2 {
                    return Err(Error::data(
                        path,
                        format!(
                            "BatchNormalization `{}`: a calibration batch of {} row(s) gives {count} value(s) \
                             per channel; the unbiased variance needs at least 2 (use a larger \
                             --calib-batch-size, or more calibration rows)",
                            node.name, b.rows
                        ),
                    ));
                }
                let unbias = count as f64 / (count - 1) as f64;
                let (m, v) = &mut sums[i];
                if m.is_empty() {
                    m.resize(channels, 0.0);
                    v.resize(channels, 0.0);
                }
                for c in 0..channels.min(m.len()) {
                    m[c] += f64::from(mean[c]);
                    v[c] += f64::from(var[c]) * unbias;
                }
            }
            batches += 1;
            Ok(())
        })?;
        let mut weights = match candidate {
            Candidate::Average(w) => w.clone(),
            Candidate::Checkpoint(c) => Weights::build(set, Recipe::Mean(&[c])),
        };
        let n = batches.max(1) as f64;
        for (node, (m, v)) in self.nodes.iter().zip(&sums) {
            let mean: Vec<f64> = m.iter().map(|s| s / n).collect();
            let var: Vec<f64> = v.iter().map(|s| s / n).collect();
            weights.set_values(set, node.mean_tensor, &mean)?;
            weights.set_values(set, node.var_tensor, &var)?;
        }
        Ok(weights)
    }
}

fn stat_name(i: usize, what: &str) -> String {
    format!("aswa_merge.bn{i}.{what}")
}

/// The model rewritten for the checkpoint tensors (see [`onnx::rewrite`]) with every
/// BatchNormalization computed from batch statistics, whose mean, biased variance and
/// input shape are the graph's outputs.
pub(crate) fn calibration_graph(model: &OnnxModel, binding: &Binding) -> Result<proto::ModelProto> {
    let mut m = onnx::rewritten(model, binding, onnx::WeightsAs::Inputs)?;
    let opset = m
        .opset_import
        .iter()
        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
        .map_or(1, |o| o.version());
    if opset < 18 {
        return Err(Error::model(
            model.path(),
            format!(
                "--recalibrate-bn needs a model of ONNX opset 18 or later (this one is opset {opset}); \
                 export with torch.onnx.export(..., dynamo=True, opset_version=18 or later)"
            ),
        ));
    }
    let graph = m.graph.as_mut().expect("checked in load");
    let elem_of: HashMap<&str, i32> = binding
        .bound
        .iter()
        .map(|b| (b.name.as_str(), onnx::elem_code(b.elem)))
        .collect();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut outputs = Vec::new();
    let mut constants = Vec::new();
    let mut k = 0usize;
    for node in std::mem::take(&mut graph.node) {
        if node.op_type() != "BatchNormalization" {
            nodes.push(node);
            continue;
        }
        let input = |i: usize| node.input.get(i).cloned().unwrap_or_default();
        let (x, scale, bias) = (input(0), input(1), input(2));
        let y = node.output.first().cloned().unwrap_or_default();
        let eps = node
            .attribute
            .iter()
            .find(|a| a.name() == "epsilon")
            .map_or(1e-5, |a| a.f());
        let elem = elem_of.get(scale.as_str()).copied().unwrap_or(1);
        let t = |s: &str| format!("aswa_merge.bn{k}.{s}");
        let mut op =
            |op: &str, ins: Vec<String>, out: String, attrs: Vec<proto::AttributeProto>| {
                nodes.push(proto::NodeProto {
                    op_type: Some(op.to_string()),
                    input: ins,
                    output: vec![out],
                    name: Some(format!("aswa_merge.bn{k}.{op}.{}", nodes.len())),
                    attribute: attrs,
                    ..Default::default()
                });
            };
        let int_attr = |name: &str, v: i64| proto::AttributeProto {
            name: Some(name.to_string()),
            i: Some(v),
            r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        };
        // axes = [0] ++ [2 .. rank)
        op("Shape", vec![x.clone()], stat_name(k, "shape"), vec![]);
        op("Size", vec![stat_name(k, "shape")], t("rank"), vec![]);
        op(
            "Range",
            vec![t("two"), t("rank"), t("one")],
            t("spatial"),
            vec![],
        );
        op(
            "Concat",
            vec![t("zero"), t("spatial")],
            t("axes"),
            vec![int_attr("axis", 0)],
        );
        op(
            "ReduceMean",
            vec![x.clone(), t("axes")],
            stat_name(k, "mean"),
            vec![int_attr("keepdims", 1)],
        );
        op(
            "Sub",
            vec![x.clone(), stat_name(k, "mean")],
            t("centered"),
            vec![],
        );
        op(
            "Mul",
            vec![t("centered"), t("centered")],
            t("squared"),
            vec![],
        );
        op(
            "ReduceMean",
            vec![t("squared"), t("axes")],
            stat_name(k, "var"),
            vec![int_attr("keepdims", 1)],
        );
        op(
            "Add",
            vec![stat_name(k, "var"), t("eps")],
            t("var_eps"),
            vec![],
        );
        op("Sqrt", vec![t("var_eps")], t("std"), vec![]);
        op("Div", vec![t("centered"), t("std")], t("normed"), vec![]);
        op("Shape", vec![stat_name(k, "mean")], t("stat_shape"), vec![]);
        op("Reshape", vec![scale, t("stat_shape")], t("scale"), vec![]);
        op("Reshape", vec![bias, t("stat_shape")], t("bias"), vec![]);
        op("Mul", vec![t("normed"), t("scale")], t("scaled"), vec![]);
        op("Add", vec![t("scaled"), t("bias")], y, vec![]);
        let int64 = |name: String, dims: Vec<i64>, v: i64| proto::TensorProto {
            name: Some(name),
            dims,
            data_type: Some(proto::tensor_proto::DataType::Int64 as i32),
            int64_data: vec![v],
            ..Default::default()
        };
        constants.push(int64(t("two"), vec![], 2));
        constants.push(int64(t("one"), vec![], 1));
        constants.push(int64(t("zero"), vec![1], 0));
        constants.push(float_scalar(t("eps"), elem, eps));
        for what in ["mean", "var", "shape"] {
            outputs.push(proto::ValueInfoProto {
                name: Some(stat_name(k, what)),
                ..Default::default()
            });
        }
        k += 1;
    }
    graph.node = nodes;
    graph.initializer.extend(constants);
    graph.output = outputs;
    Ok(m)
}

/// A scalar initializer of floating type `elem` (an ONNX type code).
fn float_scalar(name: String, elem: i32, v: f32) -> proto::TensorProto {
    use proto::tensor_proto::DataType;
    let raw = match DataType::try_from(elem) {
        Ok(DataType::Float16) => half::f16::from_f32(v).to_le_bytes().to_vec(),
        Ok(DataType::Bfloat16) => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        Ok(DataType::Double) => f64::from(v).to_le_bytes().to_vec(),
        _ => v.to_le_bytes().to_vec(),
    };
    let elem = match DataType::try_from(elem) {
        Ok(DataType::Float16 | DataType::Bfloat16 | DataType::Double) => elem,
        _ => DataType::Float as i32,
    };
    proto::TensorProto {
        name: Some(name),
        dims: vec![],
        data_type: Some(elem),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// A scorer that recalibrates every candidate's BatchNorm statistics before scoring it,
/// and hands out the recalibrated weights for writing.
pub struct Recalibrating<S: Scorer> {
    pub inner: S,
    pub recalibrator: Recalibrator,
}

impl<S: Scorer> Scorer for Recalibrating<S> {
    fn score(&mut self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<f64> {
        self.score_on(set, candidate, 0)
    }

    fn score_on(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        dataset: usize,
    ) -> Result<f64> {
        let w = self.recalibrator.apply(set, candidate)?;
        self.inner.score_on(set, Candidate::Average(&w), dataset)
    }

    fn finalize(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
    ) -> Result<Option<Weights>> {
        self.recalibrator.apply(set, candidate).map(Some)
    }

    fn score_plain(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        dataset: usize,
    ) -> Result<f64> {
        self.inner.score_on(set, candidate, dataset)
    }
}
