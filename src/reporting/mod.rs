//! What a run tells its user: the stderr summary, the progress bar, the JSON report
//! and the provenance written into the output's `__metadata__`.

pub mod plot;
pub mod progress;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::storage::PRODUCER_KEY;
use crate::strategies::{Decision, Step};

/// The tool's version, as written into reports and metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `--report` JSON. Field by field documentation: `docs/report.md`.
///
/// The main command fills `result` (its fields appear at the top level); `compare`
/// fills `strategies` and `winner`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub metric: String,
    pub higher_is_better: bool,
    /// Checkpoint paths in processing order.
    pub checkpoints: Vec<String>,
    /// Every input checkpoint file with its size and SHA-256.
    pub inputs: Vec<InputFile>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub result: Option<StrategyReport>,
    /// `compare`: every strategy's result, keyed by name, in the order they ran.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "in_run_order"
    )]
    pub strategies: Option<Vec<StrategyReport>>,
    /// `compare`: the strategy with the best validation score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub winner: Option<String>,
    /// Test score of the last checkpoint (with `--test`), for reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_test_score: Option<f64>,
    pub gate: Gate,
    pub model: String,
    pub validation: String,
    pub validation_rows: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    pub batch_size: usize,
    /// Candidates actually scored on the validation set (each at most once).
    pub evaluations: usize,
    pub onnxruntime: String,
    /// The execution provider the model ran on.
    pub execution_provider: String,
    /// Whether each candidate's weights were bound once (`--io-binding`) rather than
    /// passed with every batch.
    pub io_binding: bool,
    /// How candidates' weights reached the model (`--weights-as`): "inputs" (one session,
    /// weights fed with every batch) or "constants" (a session per candidate).
    pub weights_as: String,
    /// How checkpoint tensor names were mapped to the model's initializer names, when
    /// they differ by a leading module path (`module.`, `_orig_mod.`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rename: Option<crate::scoring::onnx::Rename>,
    /// Checkpoints whose validation score is NaN (non-finite outputs: diverged training).
    pub nan_scores: Vec<String>,
    /// BatchNorms the exporter folded into layers, as "BN into LAYER, eps E": every
    /// candidate was folded the same way to be scored (absent when there were none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folded_batchnorm: Vec<String>,
    /// Initializers constant folding computed as a transposed parameter, as
    /// "INIT = TENSORᵀ": fed each candidate's tensor transposed (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transposed: Vec<String>,
    /// BatchNorm recalibration, when it was applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recalibration: Option<Recalibration>,
    /// Paths that looked like checkpoints but were left out, with the reason.
    pub skipped: Vec<Skipped>,
    /// The process's peak resident memory when the report was written, in bytes
    /// (Linux `VmHWM`; absent where the system does not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

/// The process's peak resident memory in bytes (`VmHWM` of `/proc/self/status`), where
/// the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// The memory available for new allocations, in bytes: the system's `MemAvailable`
/// (`/proc/meminfo`), or less where this process's control group (a container's memory
/// limit, v1 or v2) leaves less; `None` where neither says.
pub fn available_memory_bytes() -> Option<u64> {
    let system = proc_kib("/proc/meminfo", "MemAvailable:");
    match (system, cgroup_free_bytes()) {
        (Some(s), Some(c)) => Some(s.min(c)),
        (s, c) => s.or(c),
    }
}

/// What this process's memory control groups leave under their limits.
fn cgroup_free_bytes() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_free_in(std::path::Path::new("/sys/fs/cgroup"), &groups)
}

/// What the memory control groups of `groups` (the text of `/proc/self/cgroup`) leave
/// under their limits, in the cgroup file system at `root`: the least of limit − usage
/// over the group and its ancestors (the root alone where a container shows its group as
/// the root), usage not counting inactive file cache, which the kernel reclaims before it
/// fails an allocation. v2: `memory.max`, `memory.current`, `inactive_file`; v1: the
/// `memory` controller's `memory.limit_in_bytes`, `memory.usage_in_bytes`,
/// `total_inactive_file`. `None` without a limit.
fn cgroup_free_in(root: &std::path::Path, groups: &str) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (base, limit, usage, inactive) = if controllers.is_empty() {
            (
                root.to_path_buf(),
                "memory.max",
                "memory.current",
                "inactive_file ",
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let files = ("memory.limit_in_bytes", "memory.usage_in_bytes");
            (
                root.join("memory"),
                files.0,
                files.1,
                "total_inactive_file ",
            )
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            let text = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
            let number = |file: &str| -> Option<u64> { text(file)?.trim().parse().ok() };
            // v2 writes `max` for no limit, which does not parse.
            if let (Some(limit), Some(used)) = (number(limit), number(usage)) {
                let cache: u64 = text("memory.stat")
                    .and_then(|stat| {
                        let line = stat.lines().find_map(|l| l.strip_prefix(inactive))?;
                        line.trim().parse().ok()
                    })
                    .unwrap_or(0);
                let free = limit.saturating_sub(used.saturating_sub(cache));
                least = Some(least.map_or(free, |l| l.min(free)));
            }
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    least
}

/// The value of the line `key … kB` of a Linux `/proc` file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Serialises results as a JSON object keyed by strategy name, keeping their order.
fn in_run_order<S: serde::Serializer>(
    results: &Option<Vec<StrategyReport>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let results = results.as_deref().unwrap_or_default();
    let mut map = serializer.serialize_map(Some(results.len()))?;
    for r in results {
        map.serialize_entry(&r.strategy, r)?;
    }
    map.end()
}

/// One strategy's result.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    pub strategy: String,
    /// The parameters that shaped the result (strings, as in the metadata).
    pub params: BTreeMap<String, String>,
    /// ASWA's steps (empty for other strategies).
    pub steps: Vec<StepReport>,
    /// Paths of the members, in checkpoint order.
    pub members: Vec<String>,
    /// Validation score of the result (null if NaN).
    pub val_score: f64,
    /// With `--also-without-bn`: the validation score without BatchNorm recalibration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_score_without_bn: Option<f64>,
    /// Test score of the result (with `--test`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_score: Option<f64>,
    /// The file the result was written to, if any.
    pub output: Option<String>,
    /// Wall-clock seconds the strategy took (scores it reused from the cache cost nothing).
    pub seconds: f64,
}

/// How BatchNorm statistics were recalibrated (`--recalibrate-bn`).
#[derive(Debug, Clone, Serialize)]
pub struct Recalibration {
    /// The calibration .npz.
    pub calibration: String,
    /// Calibration rows (samples) per recalibration pass.
    pub rows: usize,
    pub batch_size: usize,
    /// The BatchNormalization nodes whose statistics were recomputed.
    pub batchnorm_layers: Vec<String>,
}

/// An input checkpoint file.
#[derive(Debug, Clone, Serialize)]
pub struct InputFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The CI gates (`--fail-below`, `--require-gain`) and their verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Gate {
    pub passed: bool,
    /// Why the gate failed (empty when it passed).
    pub reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_below: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_gain: Option<String>,
    /// The baseline's validation score for `--require-gain`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_score: Option<f64>,
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

    /// Provenance for a written result's `__metadata__` (string values, as safetensors
    /// requires).
    pub fn metadata(
        &self,
        result: &StrategyReport,
        format: Option<&str>,
    ) -> BTreeMap<String, String> {
        fn json<T: Serialize>(v: &T) -> String {
            serde_json::to_string(v).unwrap_or_default()
        }
        let mut m = BTreeMap::new();
        m.insert(PRODUCER_KEY.to_string(), self.version.clone());
        m.insert("format".into(), format.unwrap_or("pt").to_string());
        m.insert("aswa_merge.strategy".into(), result.strategy.clone());
        m.insert("aswa_merge.params".into(), json(&result.params));
        m.insert("aswa_merge.metric".into(), self.metric.clone());
        m.insert(
            "aswa_merge.higher_is_better".into(),
            self.higher_is_better.to_string(),
        );
        m.insert(
            "aswa_merge.val_score".into(),
            format_score(result.val_score),
        );
        if let Some(t) = result.test_score {
            m.insert("aswa_merge.test_score".into(), format_score(t));
        }
        m.insert("aswa_merge.members".into(), json(&result.members));
        m.insert(
            "aswa_merge.checkpoints".into(),
            self.checkpoints.len().to_string(),
        );
        m.insert("aswa_merge.inputs".into(), json(&self.inputs));
        m.insert("aswa_merge.model".into(), self.model.clone());
        m.insert("aswa_merge.validation".into(), self.validation.clone());
        if let Some(r) = &self.recalibration {
            m.insert("aswa_merge.recalibrated_bn".into(), json(r));
        }
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

/// The header of the `compare` table.
pub fn compare_header(with_test: bool, without_bn: bool) -> String {
    let mut h = format!("{:<12} {:>7} {:>10}", "strategy", "members", "validation");
    if without_bn {
        h += &format!(" {:>10}", "no-recal");
    }
    if with_test {
        h += &format!(" {:>10}", "test");
    }
    h + &format!(" {:>8}", "seconds")
}

/// One row of the `compare` table.
pub fn compare_row(r: &StrategyReport, with_test: bool) -> String {
    let mut row = format!(
        "{:<12} {:>7} {:>10}",
        r.strategy,
        r.members.len(),
        format_score(r.val_score)
    );
    if let Some(v) = r.val_score_without_bn {
        row += &format!(" {:>10}", format_score(v));
    }
    if with_test {
        row += &format!(" {:>10}", r.test_score.map_or("-".into(), format_score));
    }
    row + &format!(" {:>8.2}", r.seconds)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn linux_says_how_much_memory_there_is_and_was_used() {
        let total = proc_kib("/proc/meminfo", "MemTotal:").expect("MemTotal");
        let available = available_memory_bytes().expect("MemAvailable");
        assert!(available <= total, "{available} of {total}");
        let peak = peak_rss_bytes().expect("VmHWM");
        assert!(0 < peak && peak <= total, "{peak} of {total}");
    }

    /// Writes `files` (name, text) into folder `dir` under `root`.
    fn group(root: &std::path::Path, dir: &str, files: &[(&str, String)]) {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn cgroup_limits_v1_and_v2_ancestors_and_file_cache() {
        let gib = 1u64 << 30;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let n = |v: u64| v.to_string();
        // v2: a 4 GiB limit on the parent, none on the group itself; 3 GiB used, 1 GiB
        // of it inactive file cache: 2 GiB left.
        let stat = format!("anon 5\ninactive_file {gib}\nactive_file 7\n");
        let parent = [
            ("memory.max", n(4 * gib)),
            ("memory.current", n(3 * gib)),
            ("memory.stat", stat),
        ];
        group(root, "slice", &parent);
        let job = [
            ("memory.max", "max\n".to_string()),
            ("memory.current", n(3 * gib)),
        ];
        group(root, "slice/job", &job);
        assert_eq!(cgroup_free_in(root, "0::/slice/job\n"), Some(2 * gib));
        // No limit anywhere on the way: none.
        assert_eq!(cgroup_free_in(root, "0::/elsewhere\n"), None);
        // v1: the memory controller's own hierarchy, in a container that shows "/".
        let v1 = [
            ("memory.limit_in_bytes", n(8 * gib)),
            ("memory.usage_in_bytes", n(gib)),
            ("memory.stat", "total_inactive_file 0\n".to_string()),
        ];
        group(root, "memory", &v1);
        assert_eq!(
            cgroup_free_in(root, "12:pids:/\n4:cpu,memory:/\n"),
            Some(7 * gib)
        );
        // Usage over the limit, garbage and missing files: nothing panics.
        let over = [
            ("memory.limit_in_bytes", "10".to_string()),
            ("memory.usage_in_bytes", "99".to_string()),
        ];
        group(root, "memory/over", &over);
        assert_eq!(cgroup_free_in(root, "4:memory:/over"), Some(0));
        assert_eq!(cgroup_free_in(root, "garbage\n::\n4:memory"), None);
    }
}
