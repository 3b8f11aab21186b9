//! What a run tells its user: the stderr summary, the progress bar, the JSON report
//! and the provenance written into the output's `__metadata__`.

pub mod progress;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::storage::PRODUCER_KEY;
use crate::strategies::{Decision, Step};

/// The tool's version, as written into reports and metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `--report` JSON. Field by field documentation: `docs/report.md`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub strategy: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub accept_ties: bool,
    /// Checkpoint paths in processing order.
    pub checkpoints: Vec<String>,
    pub steps: Vec<StepReport>,
    /// Paths of the final ensemble's members.
    pub members: Vec<String>,
    /// Validation score of the written model (null if NaN).
    pub val_score: f64,
    /// The written file.
    pub output: String,
    pub model: String,
    pub validation: String,
    pub validation_rows: usize,
    pub batch_size: usize,
    /// Candidates actually scored (each at most once).
    pub evaluations: usize,
    pub onnxruntime: String,
    /// Paths that looked like checkpoints but were left out, with the reason.
    pub skipped: Vec<Skipped>,
}

/// One ASWA step in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub checkpoint: String,
    /// Score of the checkpoint itself (the paper's "running model").
    pub running_score: f64,
    /// Score of the look-ahead average; null for the first checkpoint.
    pub lookahead_score: Option<f64>,
    pub decision: Decision,
    /// Ensemble size after the step.
    pub members: usize,
    /// Ensemble score after the step.
    pub ensemble_score: f64,
}

/// A path discovery skipped.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

impl StepReport {
    pub fn new(step: &Step, name: &str) -> Self {
        Self {
            checkpoint: name.to_string(),
            running_score: step.running_score,
            lookahead_score: step.lookahead_score,
            decision: step.decision,
            members: step.members,
            ensemble_score: step.ensemble_score,
        }
    }
}

impl Report {
    /// Writes the report as pretty JSON to `path` (atomically).
    pub fn write(&self, path: &Path) -> crate::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| crate::Error::Output {
            path: path.to_path_buf(),
            message: format!("cannot encode the report: {e}"),
        })?;
        write_atomic(path, format!("{text}\n").as_bytes())
    }

    /// Provenance for the output's `__metadata__` (string values, as safetensors requires).
    pub fn metadata(&self, format: Option<&str>) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(PRODUCER_KEY.to_string(), self.version.clone());
        m.insert("format".into(), format.unwrap_or("pt").to_string());
        m.insert("aswa_merge.strategy".into(), self.strategy.clone());
        m.insert("aswa_merge.metric".into(), self.metric.clone());
        m.insert(
            "aswa_merge.higher_is_better".into(),
            self.higher_is_better.to_string(),
        );
        m.insert(
            "aswa_merge.accept_ties".into(),
            self.accept_ties.to_string(),
        );
        m.insert("aswa_merge.val_score".into(), format_score(self.val_score));
        m.insert(
            "aswa_merge.members".into(),
            serde_json::to_string(&self.members).unwrap_or_default(),
        );
        m.insert(
            "aswa_merge.checkpoints".into(),
            self.checkpoints.len().to_string(),
        );
        m.insert("aswa_merge.model".into(), self.model.clone());
        m.insert("aswa_merge.validation".into(), self.validation.clone());
        m
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    crate::storage::writer::atomic_write(path, |w| std::io::Write::write_all(w, bytes))
}

/// A score as shown to people: six decimals, `NaN` spelled out.
pub fn format_score(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v:.6}")
    }
}

/// The header of the per-checkpoint table.
pub fn table_header() -> String {
    format!(
        "{:<32} {:>10} {:>10} {:>8} {:>7} {:>10}",
        "checkpoint", "score", "look-ahead", "decision", "members", "ensemble"
    )
}

/// One row of the per-checkpoint table.
pub fn table_row(step: &Step, name: &str) -> String {
    format!(
        "{:<32} {:>10} {:>10} {:>8} {:>7} {:>10}",
        name,
        format_score(step.running_score),
        step.lookahead_score.map_or("-".into(), format_score),
        step.decision.to_string(),
        step.members,
        format_score(step.ensemble_score)
    )
}
