//! Models whose exporter folded BatchNorm into the preceding layers.
//!
//! `torch.onnx.export` with its defaults (torch 2.9+: `dynamo=True, optimize=True`; the
//! legacy exporter in eval mode) folds a BatchNorm that follows a Conv or Linear layer
//! into it, per output channel c, with s_c = γ_c / √(σ²_c + ε):
//!
//! - W'_c = W_c·s_c (W_c: the weights of output channel c), keeping the layer's weight
//!   name;
//! - b'_c = (b_c − μ_c)·s_c + β_c, keeping the layer's bias name, or under a new name when
//!   the layer had no bias (then b_c = 0);
//! - the BatchNormalization node and its four tensors disappear.
//!
//! Feeding a checkpoint's W where the model expects W' would score another network, so
//! such a model cannot be scored by replacing initializers by name. [`Folding::plan`]
//! finds which BatchNorm went into which layer, and its ε, from the model's own values:
//! the model was exported from some training state, so its W' and b' must be the fold of
//! one checkpoint's tensors, up to float rounding. [`Folded`] then folds every candidate
//! the same way before scoring it. Averaging and the written output stay unfolded, as the
//! checkpoints are: the fold only decides how a candidate is scored.

use std::collections::{HashMap, HashSet};

use super::onnx::{FoldNames, OnnxModel, Rename};
use super::Scorer;
use crate::averaging::{Candidate, Recipe, Weights};
use crate::error::Result;
use crate::storage::dtype::read_f64;
use crate::storage::{CheckpointSet, DType};

/// BatchNorm ε values tried, most common first (torch's default is 1e-5).
const EPSILONS: [f64; 5] = [1e-5, 1e-3, 1e-4, 1e-6, 1e-2];

/// Relative tolerance (of the largest magnitude) between the model's folded values and a
/// checkpoint's fold, by the type of the model's initializers: a few units in the last
/// place of that type (exporters fold in it, or in float32 and round).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
        _ => 1e-5,
    }
}

/// One BatchNorm folded into one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedLayer {
    /// The layer's weight (checkpoint tensor name).
    pub layer: String,
    /// The initializer that holds the folded weight: the layer's name, or a new one
    /// when the exporter renamed it (the legacy exporter's `onnx::Conv_16`).
    pub weight_init: String,
    /// Whether the exporter renamed the layer (beyond a checkpoint name prefix).
    pub renamed: bool,
    /// The BatchNorm's name (its tensors' common prefix).
    pub batchnorm: String,
    pub eps: f64,
    /// The initializer that holds the folded bias.
    pub bias_init: String,
    weight: usize,
    /// The layer's own bias (a checkpoint tensor), if it has one.
    bias: Option<usize>,
    bn: Bn,
    out_axis: usize,
}

/// A BatchNorm's tensors (spec indices) and channel count.
#[derive(Debug, Clone, PartialEq)]
struct Bn {
    prefix: String,
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
    channels: usize,
}

/// How the model's layers fold the checkpoints' BatchNorms.
#[derive(Debug, Clone, PartialEq)]
pub struct Folding {
    pub layers: Vec<FoldedLayer>,
}

impl Folding {
    /// The fold of the checkpoints' BatchNorms into `model`'s layers, when the checkpoints
    /// have BatchNorms whose tensors are not initializers and every one of them is found
    /// folded into a Conv or Gemm layer (checked against the model's values). BatchNorms
    /// the exporter left in place (their tensors are initializers) are bound as usual.
    /// `None` otherwise.
    ///
    /// With `rename`, checkpoint names are compared with the model's after that mapping
    /// (checkpoints saved with a wrapper's `module.` prefix).
    pub fn plan(
        model: &OnnxModel,
        set: &CheckpointSet,
        rename: Option<&Rename>,
    ) -> Result<Option<Folding>> {
        let specs = set.specs();
        // Each checkpoint tensor's name as the model would call it.
        let names: Vec<String> = specs.iter().map(|s| model_name(rename, &s.name)).collect();
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let inits: HashSet<String> = model.initializers().into_iter().map(|i| i.name).collect();
        let bns = batchnorms(set, &names, &index, &inits);
        if bns.is_empty() {
            return Ok(None);
        }
        let bn_tensors: HashSet<usize> = bns
            .iter()
            .flat_map(|b| [b.gamma, b.beta, b.mean, b.var])
            .collect();
        let mut used = vec![false; bns.len()];
        let mut layers: Vec<FoldedLayer> = Vec::new();
        for layer in model.weighted_layers() {
            let Some(bias_init) = &layer.bias else {
                continue;
            };
            if layers
                .iter()
                .any(|l| l.weight_init == layer.weight || &l.bias_init == bias_init)
            {
                continue;
            }
            let (Some((w_type, model_w)), Some((b_type, model_b))) = (
                model.initializer_f64(&layer.weight)?,
                model.initializer_f64(bias_init)?,
            ) else {
                continue;
            };
            let tol = tolerance(w_type).max(tolerance(b_type));
            // The checkpoint tensors the layer's weight can be: its own name, or — when the
            // exporter renamed the folded weight — every free float tensor of its shape.
            let weights: Vec<usize> = match index.get(layer.weight.as_str()) {
                Some(&w) => vec![w],
                None if index.contains_key(bias_init.as_str()) => Vec::new(),
                None => {
                    let Some(shape) = model.initializer_shape(&layer.weight) else {
                        continue;
                    };
                    (0..specs.len())
                        .filter(|&t| specs[t].shape == shape && !inits.contains(&names[t]))
                        .filter(|&t| !bn_tensors.contains(&t))
                        .filter(|&t| !layers.iter().any(|l| l.weight == t))
                        .collect()
                }
            };
            let found = weights.iter().find_map(|&weight| {
                let spec = &specs[weight];
                let &channels = spec.shape.get(layer.out_axis)?;
                if !spec.dtype.is_float()
                    || model_w.len() != spec.numel()
                    || model_b.len() != channels
                {
                    return None;
                }
                // The layer's own bias: the bias initializer's name, or beside a renamed
                // weight, the checkpoint's `<layer>.bias`.
                let renamed = layer.weight != names[weight];
                let bias_name = if renamed {
                    format!("{}.bias", names[weight].strip_suffix(".weight")?)
                } else {
                    bias_init.clone()
                };
                let bias = index
                    .get(bias_name.as_str())
                    .copied()
                    .filter(|&b| specs[b].dtype.is_float() && specs[b].shape == [channels])
                    .filter(|&b| names[b] == *bias_init || !inits.contains(&names[b]));
                bns.iter().enumerate().find_map(|(k, bn)| {
                    if used[k] || bn.channels != channels {
                        return None;
                    }
                    let probe = Probe {
                        set,
                        out_axis: layer.out_axis,
                        weight,
                        bias,
                        bn,
                        model_w: &model_w,
                        model_b: &model_b,
                        tol,
                    };
                    probe.eps().map(|eps| (weight, renamed, bias, k, eps))
                })
            });
            if let Some((weight, renamed, bias, k, eps)) = found {
                used[k] = true;
                layers.push(FoldedLayer {
                    layer: specs[weight].name.clone(),
                    weight_init: layer.weight.clone(),
                    renamed,
                    batchnorm: bns[k].prefix.clone(),
                    eps,
                    bias_init: bias_init.clone(),
                    weight,
                    bias,
                    bn: bns[k].clone(),
                    out_axis: layer.out_axis,
                });
            }
        }
        // The probes read parts of many checkpoints: hand their pages back.
        (0..set.len()).for_each(|c| set.release(c));
        if layers.is_empty() || used.iter().any(|u| !u) {
            return Ok(None);
        }
        Ok(Some(Folding { layers }))
    }

    /// The names the fold changes, for [`super::onnx::plan_folded_binding`].
    pub fn names(&self, set: &CheckpointSet) -> FoldNames {
        let specs = set.specs();
        let mut names = FoldNames::default();
        for l in &self.layers {
            for t in [l.bn.gamma, l.bn.mean, l.bn.var] {
                names.consumed.insert(specs[t].name.clone());
            }
            if l.weight_init != l.layer {
                names.created.insert(l.layer.clone(), l.weight_init.clone());
            }
            match l.bias {
                // The layer's bias slot feeds the folded bias; β is consumed.
                Some(b) => {
                    names.consumed.insert(specs[l.bn.beta].name.clone());
                    if specs[b].name != l.bias_init {
                        names
                            .created
                            .insert(specs[b].name.clone(), l.bias_init.clone());
                    }
                }
                // β's slot feeds the bias initializer the fold created.
                None => {
                    names
                        .created
                        .insert(specs[l.bn.beta].name.clone(), l.bias_init.clone());
                }
            }
        }
        names
    }

    /// `candidate` with every BatchNorm folded into its layer, as the model expects.
    pub fn apply(&self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<Weights> {
        let mut w = match candidate {
            Candidate::Average(w) => w.clone(),
            Candidate::Checkpoint(c) => Weights::build(set, Recipe::Mean(&[c])),
        };
        let values = |t: usize| tensor_f64(set, candidate, t);
        for l in &self.layers {
            let s = scales(&values(l.bn.gamma), &values(l.bn.var), l.eps);
            let (mean, beta) = (values(l.bn.mean), values(l.bn.beta));
            let layer_w = values(l.weight);
            let inner = inner_size(set, l.weight, l.out_axis);
            let folded_w: Vec<f64> = layer_w
                .iter()
                .enumerate()
                .map(|(i, x)| x * s[(i / inner) % s.len()])
                .collect();
            w.set_values(set, l.weight, &folded_w)?;
            let bias = l.bias.map(values);
            let folded_b: Vec<f64> = (0..s.len())
                .map(|c| (bias.as_ref().map_or(0.0, |b| b[c]) - mean[c]) * s[c] + beta[c])
                .collect();
            w.set_values(set, l.bias.unwrap_or(l.bn.beta), &folded_b)?;
        }
        Ok(w)
    }
}

/// The BatchNorms of the checkpoints (`P.weight`, `P.bias`, `P.running_mean`,
/// `P.running_var`, float vectors of one length) whose tensors are not initializers.
fn batchnorms(
    set: &CheckpointSet,
    names: &[String],
    index: &HashMap<&str, usize>,
    inits: &HashSet<String>,
) -> Vec<Bn> {
    let specs = set.specs();
    let mut out = Vec::new();
    for (mean, spec) in specs.iter().enumerate() {
        let Some(prefix) = names[mean].strip_suffix(".running_mean") else {
            continue;
        };
        if !spec.dtype.is_float() || spec.shape.len() != 1 {
            continue;
        }
        let get = |suffix: &str| {
            index
                .get(format!("{prefix}.{suffix}").as_str())
                .copied()
                .filter(|&j| specs[j].dtype.is_float() && specs[j].shape == spec.shape)
        };
        let (Some(gamma), Some(beta), Some(var)) = (get("weight"), get("bias"), get("running_var"))
        else {
            continue;
        };
        if [gamma, beta, mean, var]
            .iter()
            .any(|&t| inits.contains(&names[t]))
        {
            continue;
        }
        out.push(Bn {
            prefix: spec
                .name
                .strip_suffix(".running_mean")
                .unwrap_or(prefix)
                .to_string(),
            gamma,
            beta,
            mean,
            var,
            channels: spec.shape[0],
        });
    }
    out
}

impl FoldedLayer {
    /// "BN into LAYER, eps E", with the initializer when the exporter renamed the layer.
    pub fn describe(&self) -> String {
        let renamed = if self.renamed {
            format!(" (initializer {})", self.weight_init)
        } else {
            String::new()
        };
        format!(
            "{} into {}{renamed}, eps {}",
            self.batchnorm, self.layer, self.eps
        )
    }
}

/// Checkpoint tensor `name` as the model calls it under `rename` (unchanged without one,
/// or when the mapping does not apply to it).
pub(crate) fn model_name(rename: Option<&Rename>, name: &str) -> String {
    rename
        .and_then(|r| r.apply(name))
        .unwrap_or_else(|| name.to_string())
}

/// Whether one BatchNorm was folded into one layer, checked against the checkpoints.
struct Probe<'a> {
    set: &'a CheckpointSet,
    /// The layer weight's axis of output channels.
    out_axis: usize,
    weight: usize,
    bias: Option<usize>,
    bn: &'a Bn,
    model_w: &'a [f64],
    model_b: &'a [f64],
    /// See [`tolerance`].
    tol: f64,
}

impl Probe<'_> {
    /// The ε with which some checkpoint's fold gives the model's values, newest
    /// checkpoint first (models are usually exported from the last state). The ε are
    /// tried in [`EPSILONS`]' order, the most common first: in float16 several can fit,
    /// and the closest fit is float16's noise, not evidence (on the digits MLP, 1e-4 fits
    /// its 1e-5 fold more closely).
    fn eps(&self) -> Option<f64> {
        let inner = inner_size(self.set, self.weight, self.out_axis);
        let (b_scale, w_scale) = (max_abs(self.model_b), max_abs(self.model_w));
        (0..self.set.len()).rev().find_map(|c| {
            let v = |t: usize| tensor_f64(self.set, Candidate::Checkpoint(c), t);
            let (gamma, var) = (v(self.bn.gamma), v(self.bn.var));
            // Cheap test on the bias first: it needs only the BatchNorm's vectors.
            let (mean, beta) = (v(self.bn.mean), v(self.bn.beta));
            let bias = self.bias.map(v);
            let fits = EPSILONS.iter().filter_map(|&eps| {
                let s = scales(&gamma, &var, eps);
                let folded_b = (0..s.len())
                    .map(|i| (bias.as_ref().map_or(0.0, |b| b[i]) - mean[i]) * s[i] + beta[i]);
                deviation(folded_b, self.model_b, self.tol * b_scale).map(|_| (eps, s))
            });
            // The weights straight from the checkpoint's bytes: a wrong candidate stops
            // at its first element.
            let dtype = self.set.specs()[self.weight].dtype;
            let bytes = self.set.tensor_bytes(c, self.weight);
            fits.into_iter().find_map(|(eps, s)| {
                let folded_w = (0..self.model_w.len())
                    .map(|i| read_f64(dtype, bytes, i) * s[(i / inner) % s.len()]);
                deviation(folded_w, self.model_w, self.tol * w_scale).map(|_| eps)
            })
        })
    }
}

/// s_c = γ_c / √(σ²_c + ε).
fn scales(gamma: &[f64], var: &[f64], eps: f64) -> Vec<f64> {
    gamma
        .iter()
        .zip(var)
        .map(|(g, v)| g / (v + eps).sqrt())
        .collect()
}

/// Elements per index of axis `axis` of tensor `t` (the product of the later dims).
fn inner_size(set: &CheckpointSet, t: usize, axis: usize) -> usize {
    set.specs()[t].shape[axis + 1..]
        .iter()
        .product::<usize>()
        .max(1)
}

/// Tensor `t` of `candidate` as `f64`.
fn tensor_f64(set: &CheckpointSet, candidate: Candidate<'_>, t: usize) -> Vec<f64> {
    let dtype = set.specs()[t].dtype;
    let bytes = candidate.tensor_bytes(set, t);
    (0..bytes.len() / dtype.size())
        .map(|i| read_f64(dtype, bytes, i))
        .collect()
}

/// The largest magnitude in `values` (`f64::MIN_POSITIVE` for all zeros; infinite or NaN
/// when a value is).
fn max_abs(values: &[f64]) -> f64 {
    values.iter().fold(f64::MIN_POSITIVE, |m, x| {
        if x.abs() > m || x.is_nan() {
            x.abs()
        } else {
            m
        }
    })
}

/// The largest difference between `got` and `want` when every one is within `tol` (finite)
/// and `got` has `want`'s length; `None` otherwise.
fn deviation(got: impl Iterator<Item = f64>, want: &[f64], tol: f64) -> Option<f64> {
    if !tol.is_finite() {
        return None;
    }
    let mut n = 0;
    let mut worst = 0f64;
    for (g, w) in got.zip(want) {
        let d = (g - w).abs();
        if d.is_nan() || d > tol {
            return None;
        }
        worst = worst.max(d);
        n += 1;
    }
    (n == want.len()).then_some(worst)
}

/// Whether `got` matches `want` within `rel` of `want`'s largest magnitude.
#[cfg(test)]
fn close(got: impl Iterator<Item = f64>, want: &[f64], rel: f64) -> bool {
    deviation(got, want, rel * max_abs(want)).is_some()
}

/// A scorer that folds every candidate's BatchNorms into their layers before scoring it
/// (see the module documentation). What is written stays unfolded.
pub struct Folded<S: Scorer> {
    pub inner: S,
    pub folding: Folding,
}

// `score_plain` keeps the trait's default (`score_on`): a folded model cannot score an
// unfolded candidate.
impl<S: Scorer> Scorer for Folded<S> {
    fn score(&mut self, set: &CheckpointSet, candidate: Candidate<'_>) -> Result<f64> {
        self.score_on(set, candidate, 0)
    }

    fn score_on(
        &mut self,
        set: &CheckpointSet,
        candidate: Candidate<'_>,
        dataset: usize,
    ) -> Result<f64> {
        let w = self.folding.apply(set, candidate)?;
        self.inner.score_on(set, Candidate::Average(&w), dataset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_needs_every_value_within_the_tolerance_and_finite_values() {
        let want = [1.0, -2.0, 0.5];
        let tol = tolerance(DType::F32);
        assert!(close([1.0, -2.0 + 1e-6, 0.5].into_iter(), &want, tol));
        assert!(!close([1.0, -2.0 + 1e-3, 0.5].into_iter(), &want, tol));
        assert!(!close([1.0, f64::NAN, 0.5].into_iter(), &want, tol));
        assert!(
            !close([1.0, -2.0].into_iter(), &want, tol),
            "a value missing"
        );
        // A float16 model's fold is as close as float16 allows.
        let tol = tolerance(DType::F16);
        assert!(close([1.0, -2.0 + 2e-3, 0.5].into_iter(), &want, tol));
        assert!(!close([1.0, -2.0 + 1e-1, 0.5].into_iter(), &want, tol));
        // An infinite reference would make any tolerance infinite: never close.
        assert!(!close([1.0, 2.0].into_iter(), &[1.0, f64::INFINITY], 1e-5));
    }

    #[test]
    fn scales_are_gamma_over_the_standard_deviation() {
        let s = scales(&[2.0, 1.0], &[3.0, 0.0], 1.0);
        assert_eq!(s, vec![1.0, 1.0]);
    }
}
