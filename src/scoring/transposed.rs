//! Initializers that constant folding computed as the transpose of a checkpoint tensor.
//!
//! The legacy `torch.onnx.export` (`dynamo=False` with `do_constant_folding=True`, the
//! defaults before torch 2.9) folds the transpose of a parameter that a MatMul uses into
//! a new initializer: `x @ self.ent.weight.t()` in a knowledge-graph scorer, or
//! `nn.Linear` applied to inputs of three or more dimensions, leave `onnx::MatMul_9`
//! holding `ent.weight` transposed, under a name no checkpoint has. Such a model scores
//! correctly when the initializer is fed each candidate's tensor transposed
//! ([`super::onnx::Bound::transpose`]).
//!
//! [`find`] identifies them from the values: the model was exported from some training
//! state, so the initializer must be exactly the transpose of that state's tensor, once
//! both are in the initializer's type. A 2-D float initializer no checkpoint tensor is
//! named after is compared with every checkpoint tensor of the transposed shape, newest
//! checkpoint first. Matrices of one repeated value are not matched.

use std::collections::{HashMap, HashSet};

use super::folding::model_name;
use super::onnx::{OnnxModel, Rename};
use crate::error::Result;
use crate::storage::dtype::{read_f64, rounded_to};
use crate::storage::{CheckpointSet, DType};

/// Initializer name → the checkpoint tensor it is the transpose of (see the module
/// documentation); empty when there is none.
///
/// With `rename`, checkpoint names are compared with the model's after that mapping.
pub fn find(
    model: &OnnxModel,
    set: &CheckpointSet,
    rename: Option<&Rename>,
) -> Result<HashMap<String, String>> {
    let specs = set.specs();
    let names: HashSet<String> = specs.iter().map(|s| model_name(rename, &s.name)).collect();
    let mut found = HashMap::new();
    for init in model.initializers() {
        let is_float = init.elem.is_some_and(|e| e.is_float());
        if !is_float || init.dims.len() != 2 || names.contains(&init.name) {
            continue;
        }
        let (Ok(rows), Ok(cols)) = (usize::try_from(init.dims[1]), usize::try_from(init.dims[0]))
        else {
            continue;
        };
        // Checkpoint tensors of shape [rows, cols]: the initializer is [cols, rows].
        let candidates: Vec<usize> = (0..specs.len())
            .filter(|&t| specs[t].dtype.is_float() && specs[t].shape == [rows, cols])
            .collect();
        if candidates.is_empty() || rows.checked_mul(cols).is_none_or(|n| n < 2) {
            continue;
        }
        let Some((dtype, raw)) = model.initializer_raw(&init.name)? else {
            continue;
        };
        // A matrix of one repeated value (zeros, a fill) says nothing about where it
        // came from: it would match any tensor that held that value once.
        let first = read_f64(dtype, &raw, 0);
        if (1..rows * cols).all(|i| read_f64(dtype, &raw, i) == first) {
            continue;
        }
        let want = Matrix {
            dtype,
            bytes: &raw,
            rows: cols,
            cols: rows,
        };
        let source = (0..set.len()).rev().find_map(|c| {
            let hit = candidates.iter().copied().find(|&t| {
                let have = Matrix {
                    dtype: specs[t].dtype,
                    bytes: set.tensor_bytes(c, t),
                    rows,
                    cols,
                };
                want.is_transpose_of(&have)
            });
            set.release(c);
            hit
        });
        if let Some(t) = source {
            found.insert(init.name, specs[t].name.clone());
        }
    }
    Ok(found)
}

/// A row-major matrix of little-endian floats.
struct Matrix<'a> {
    dtype: DType,
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
}

impl Matrix<'_> {
    /// Whether `self` is `other` transposed, element for element once `other`'s values
    /// are rounded to `self`'s type (NaN matching NaN). Walks `other` in row tiles so
    /// that both sides stay in the cache; stops at the first difference.
    fn is_transpose_of(&self, other: &Matrix<'_>) -> bool {
        const TILE: usize = 64;
        let size = |m: &Matrix<'_>| {
            m.rows
                .checked_mul(m.cols)
                .and_then(|n| n.checked_mul(m.dtype.size()))
        };
        if self.rows != other.cols
            || self.cols != other.rows
            || size(self) != Some(self.bytes.len())
            || size(other) != Some(other.bytes.len())
        {
            return false;
        }
        for r0 in (0..other.rows).step_by(TILE) {
            for c in 0..other.cols {
                for r in r0..(r0 + TILE).min(other.rows) {
                    let have = rounded_to(
                        self.dtype,
                        read_f64(other.dtype, other.bytes, r * other.cols + c),
                    );
                    let want = read_f64(self.dtype, self.bytes, c * self.cols + r);
                    if have != want && !(have.is_nan() && want.is_nan()) {
                        return false;
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn a_transpose_matches_and_anything_else_does_not() {
        // other: 2 × 3; self: 3 × 2 = otherᵀ.
        let other = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let other = Matrix {
            dtype: DType::F32,
            bytes: &other,
            rows: 2,
            cols: 3,
        };
        let t = f32_bytes(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let mat = |bytes| Matrix {
            dtype: DType::F32,
            bytes,
            rows: 3,
            cols: 2,
        };
        assert!(mat(&t).is_transpose_of(&other));
        // The same values not transposed (a reshape), and one value off.
        let reshaped = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(!mat(&reshaped).is_transpose_of(&other));
        let off = f32_bytes(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.000001]);
        assert!(!mat(&off).is_transpose_of(&other));
    }

    #[test]
    fn values_compare_in_the_initializers_type() {
        // An f16 initializer holding f32 checkpoint values rounded: a match; an f32
        // initializer must hold them exactly.
        let x = 0.1f32;
        let other = f32_bytes(&[x, 1.0]);
        let other = Matrix {
            dtype: DType::F32,
            bytes: &other,
            rows: 1,
            cols: 2,
        };
        let h: Vec<u8> = [half::f16::from_f32(x), half::f16::ONE]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let half = Matrix {
            dtype: DType::F16,
            bytes: &h,
            rows: 2,
            cols: 1,
        };
        assert!(half.is_transpose_of(&other));
        let rounded = f32_bytes(&[half::f16::from_f32(x).to_f32(), 1.0]);
        let single = Matrix {
            dtype: DType::F32,
            bytes: &rounded,
            rows: 2,
            cols: 1,
        };
        assert!(!single.is_transpose_of(&other));
    }
}
