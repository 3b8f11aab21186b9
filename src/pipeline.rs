//! One run of the tool, start to finish: parse and validate everything first, then
//! score, then write.
//!
//! Order matters for users: every input is read and checked (checkpoints agree, the
//! model's initializers match them, the validation and test data fit the model, no
//! output overwrites an input) before the first candidate is scored, so a mistake
//! costs seconds, not a scoring run. Nothing is written until the results are known.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::discovery::{self, DiscoverOptions};
use crate::error::{Error, Result};
use crate::reporting::plot::{self, Bar, StepPoint};
use crate::reporting::{
    self, progress, Gate, InputFile, Report, Skipped, StepReport, StrategyReport,
};
use crate::scoring::data::{self, DataOptions, Filter, Labels, ValidationSet};
use crate::scoring::onnx::{self, Binding, OnnxModel};
use crate::scoring::{runtime, CandidateKey, Metric, OnnxScorer, ScoreCache, SessionOptions};
use crate::storage::writer::{shard_paths, write_safetensors, write_sharded, TensorOut};
use crate::storage::CheckpointSet;
use crate::strategies::{self, Context, Direction, Merged, Outcome, StrategyParams};

/// The baseline a result must beat for `--require-gain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Last,
    Best,
    Swa,
}

impl Baseline {
    /// The strategy that computes the baseline.
    pub fn strategy(self) -> &'static str {
        match self {
            Baseline::Last => "last",
            Baseline::Best => "best",
            Baseline::Swa => "swa",
        }
    }
}

impl std::str::FromStr for Baseline {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "last" => Ok(Baseline::Last),
            "best" => Ok(Baseline::Best),
            "swa" => Ok(Baseline::Swa),
            _ => Err(format!("`{s}`: expected last, best or swa")),
        }
    }
}

/// Where results go.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    /// Write the (single, or picked) result to this file.
    File(PathBuf),
    /// `compare -o DIR`: every strategy's result as `DIR/<strategy>.safetensors`.
    Dir(PathBuf),
    /// Write no weights.
    Nowhere,
}

/// Everything a run needs; the CLI fills it from its flags.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub checkpoints: PathBuf,
    pub model: Option<PathBuf>,
    pub val: PathBuf,
    pub destination: Destination,
    pub report: Option<PathBuf>,
    pub metric: Option<String>,
    /// Overrides the metric's direction (`Some(false)`: lower is better).
    pub higher_is_better: Option<bool>,
    pub labels: Option<String>,
    pub inputs: Vec<(String, String)>,
    pub output_name: Option<String>,
    pub filter: Option<PathBuf>,
    pub batch_size: usize,
    pub glob: Option<String>,
    pub allow_constant: Vec<String>,
    /// ONNX Runtime intra-op threads (0: its default).
    pub threads: usize,
    pub ort_lib: Option<PathBuf>,
    /// No summary or progress on stderr.
    pub quiet: bool,
    /// Strategies to run, in order; the main command runs one.
    pub strategies: Vec<String>,
    pub params: StrategyParams,
    /// `compare`: report every strategy and pick a winner.
    pub compare: bool,
    /// Test set, scored for reporting only.
    pub test: Option<PathBuf>,
    pub test_filter: Option<PathBuf>,
    /// Chart of the run (`.svg` or `.png`).
    pub plot: Option<PathBuf>,
    /// The ONNX model with the result's weights embedded.
    pub export_onnx: Option<PathBuf>,
    /// Shard outputs larger than this many bytes.
    pub shard_size: Option<u64>,
    pub fail_below: Option<f64>,
    pub require_gain: Option<Baseline>,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: Report,
    /// `false` when `--fail-below` or `--require-gain` failed (the outputs are written).
    pub gate_passed: bool,
}

/// Everything read and checked before scoring starts.
struct Prepared {
    names: Vec<String>,
    numbers: Vec<Option<u64>>,
    skipped: Vec<Skipped>,
    set: CheckpointSet,
    model_path: PathBuf,
    model: OnnxModel,
    binding: Binding,
    val: ValidationSet,
    test: Option<(ValidationSet, Option<Filter>)>,
    metric: Metric,
    filter: Option<Filter>,
    direction: Direction,
}

/// Runs the configured strategies and writes what was asked for.
pub fn run(cfg: &MergeConfig) -> Result<RunOutcome> {
    let say = |line: &str| {
        if !cfg.quiet {
            eprintln!("{line}");
        }
    };
    let p = prepare(cfg, &say)?;
    let set = &p.set;
    let inputs = digests(set);

    // ONNX Runtime and the scorer.
    let rt = runtime::load(cfg.ort_lib.as_deref())?;
    let rows = p.val.rows;
    let mut scorer = OnnxScorer::new(
        &rt,
        &p.model,
        p.binding.clone(),
        p.val.clone(),
        p.metric.clone(),
        p.filter.clone(),
        &SessionOptions {
            batch_size: cfg.batch_size,
            threads: cfg.threads,
            output: cfg.output_name.clone(),
        },
    )?;
    let test_index = p.test.clone().map(|(d, f)| scorer.add_dataset(d, f));
    let batch_size = scorer.batch_size();
    say(&format!(
        "scoring with {} on {} ({} rows, batches of {batch_size}, output `{}`), {} is better",
        p.metric.name(),
        cfg.val.display(),
        rows,
        scorer.output_name(),
        if p.direction.higher_is_better {
            "higher"
        } else {
            "lower"
        }
    ));

    // Strategies, sharing one score cache.
    let mut cache = ScoreCache::new(&mut scorer);
    let mut outcomes: Vec<(String, BTreeMap<String, String>, Outcome, f64)> = Vec::new();
    for name in &cfg.strategies {
        let strategy = strategies::by_name(name, &cfg.params)?;
        let started = Instant::now();
        let walks = name == "aswa";
        let pb = progress::bar(
            (2 * set.len()).saturating_sub(1) as u64,
            cfg.quiet || !walks,
        );
        if walks {
            progress::println(&pb, cfg.quiet, &reporting::table_header());
        }
        let mut on_step = |step: &strategies::Step| {
            pb.set_position(if step.checkpoint == 0 {
                1
            } else {
                2 * step.checkpoint as u64 + 1
            });
            progress::println(
                &pb,
                cfg.quiet,
                &reporting::table_row(step, &p.names[step.checkpoint]),
            );
        };
        let mut ctx = Context {
            set,
            cache: &mut cache,
            direction: p.direction,
            numbers: &p.numbers,
            on_step: &mut on_step,
        };
        let outcome = strategy.run(&mut ctx)?;
        pb.finish_and_clear();
        outcomes.push((
            name.clone(),
            strategy.params(),
            outcome,
            started.elapsed().as_secs_f64(),
        ));
    }

    // Baseline for --require-gain.
    let baseline = match cfg.require_gain {
        Some(b) => {
            let strategy = strategies::by_name(b.strategy(), &cfg.params)?;
            let mut none = |_: &strategies::Step| {};
            let mut ctx = Context {
                set,
                cache: &mut cache,
                direction: p.direction,
                numbers: &p.numbers,
                on_step: &mut none,
            };
            Some((b, strategy.run(&mut ctx)?.merged.score))
        }
        None => None,
    };
    let evaluations = cache.evaluations();
    drop(cache);

    // Test scores, for reporting only.
    let mut test_scores: HashMap<CandidateKey, f64> = HashMap::new();
    let mut test_score = |key: CandidateKey, merged: &Merged| -> Result<Option<f64>> {
        let Some(which) = test_index else {
            return Ok(None);
        };
        if let Some(&s) = test_scores.get(&key) {
            return Ok(Some(s));
        }
        let s = scorer.score_on(set, merged.candidate(), which)?;
        test_scores.insert(key, s);
        Ok(Some(s))
    };
    let path_of = |i: usize| set.checkpoints()[i].path().display().to_string();
    let mut results: Vec<StrategyReport> = Vec::new();
    for (name, params, outcome, seconds) in &outcomes {
        let m = &outcome.merged;
        let key = if name == "ema" && m.weights.is_some() {
            CandidateKey::Ema(m.members.clone(), cfg.params.ema_decay.to_bits())
        } else {
            CandidateKey::mean(&m.members)
        };
        results.push(StrategyReport {
            strategy: name.clone(),
            params: params.clone(),
            steps: outcome
                .steps
                .iter()
                .map(|s| StepReport::new(s, &path_of(s.checkpoint)))
                .collect(),
            members: m.members.iter().map(|&i| path_of(i)).collect(),
            val_score: m.score,
            test_score: test_score(key, m)?,
            output: None,
            seconds: *seconds,
        });
    }
    let last = Merged {
        members: vec![set.len() - 1],
        weights: None,
        score: f64::NAN,
    };
    let last_test_score = if cfg.compare {
        None
    } else {
        test_score(CandidateKey::mean(&last.members), &last)?
    };

    // The winner (compare) or the result (main command), and the gates.
    let scores: Vec<f64> = results.iter().map(|r| r.val_score).collect();
    let chosen = p.direction.ranking(&scores)[0];
    let gate = gate(cfg, p.direction, scores[chosen], baseline);

    // The checkpoints must not have changed under us.
    for c in set.checkpoints() {
        c.check_unchanged()?;
    }

    // Write.
    let mut report = Report {
        tool: "aswa-merge".into(),
        version: reporting::VERSION.into(),
        metric: p.metric.name(),
        higher_is_better: p.direction.higher_is_better,
        checkpoints: (0..set.len()).map(path_of).collect(),
        inputs,
        result: None,
        strategies: None,
        winner: None,
        last_test_score,
        gate,
        model: p.model_path.display().to_string(),
        validation: cfg.val.display().to_string(),
        validation_rows: rows,
        test: cfg.test.as_ref().map(|t| t.display().to_string()),
        batch_size,
        evaluations,
        onnxruntime: rt.library.display().to_string(),
        skipped: p.skipped.clone(),
    };
    let format = set.checkpoints()[0].metadata().get("format").cloned();
    let targets: Vec<(usize, PathBuf)> = match &cfg.destination {
        Destination::File(f) => vec![(chosen, f.clone())],
        Destination::Dir(d) => (0..results.len())
            .map(|i| (i, d.join(format!("{}.safetensors", results[i].strategy))))
            .collect(),
        Destination::Nowhere => Vec::new(),
    };
    let mut written = Vec::new();
    for (i, path) in &targets {
        let meta = report.metadata(&results[*i], format.as_deref());
        let file = write_result(set, &outcomes[*i].2.merged, path, &meta, cfg.shard_size)?;
        results[*i].output = Some(file.display().to_string());
        written.push(file);
    }
    if let Some(path) = &cfg.export_onnx {
        let merged = &outcomes[chosen].2.merged;
        let candidate = merged.candidate();
        onnx::export(
            &p.model,
            &p.binding,
            set.specs(),
            |t| candidate.tensor_bytes(set, t),
            path,
        )?;
    }
    if cfg.compare {
        report.winner = Some(results[chosen].strategy.clone());
        report.strategies = Some(
            results
                .iter()
                .map(|r| (r.strategy.clone(), r.clone()))
                .collect(),
        );
    } else {
        report.result = Some(results[chosen].clone());
    }
    if let Some(r) = &cfg.report {
        report.write(r)?;
    }
    if let Some(path) = &cfg.plot {
        draw(path, &report, &results, &outcomes, &p)?;
    }

    // Summary.
    if cfg.compare {
        let with_test = cfg.test.is_some();
        say(&reporting::compare_header(with_test));
        for r in &results {
            say(&reporting::compare_row(r, with_test));
        }
        say(&format!(
            "winner on validation: {}",
            results[chosen].strategy
        ));
    } else {
        let r = &results[chosen];
        let member_names: Vec<&str> = outcomes[chosen]
            .2
            .merged
            .members
            .iter()
            .map(|&i| p.names[i].as_str())
            .collect();
        let test = match (r.test_score, last_test_score) {
            (Some(t), Some(l)) => format!(
                "; test {} (last checkpoint: {})",
                reporting::format_score(t),
                reporting::format_score(l)
            ),
            _ => String::new(),
        };
        say(&format!(
            "result ({}): {} member{} ({}), validation {} {}{test}; {} candidates scored",
            r.strategy,
            member_names.len(),
            if member_names.len() == 1 { "" } else { "s" },
            member_names.join(", "),
            p.metric.name(),
            reporting::format_score(r.val_score),
            evaluations
        ));
    }
    for path in &written {
        say(&format!("wrote {}", path.display()));
    }
    for path in [&cfg.export_onnx, &cfg.report, &cfg.plot]
        .into_iter()
        .flatten()
    {
        say(&format!("wrote {}", path.display()));
    }
    if !report.gate.passed {
        for reason in &report.gate.reasons {
            say(&format!("gate failed: {reason}"));
        }
    }
    let gate_passed = report.gate.passed;
    Ok(RunOutcome {
        report,
        gate_passed,
    })
}

/// Reads and checks every input.
fn prepare(cfg: &MergeConfig, say: &dyn Fn(&str)) -> Result<Prepared> {
    // 1. Checkpoints.
    let found = discovery::discover(
        &cfg.checkpoints,
        &DiscoverOptions {
            glob: cfg.glob.clone(),
        },
    )?;
    for (path, why) in &found.skipped {
        say(&format!("note: skipping {}: {why}", path.display()));
    }
    let names: Vec<String> = found.checkpoints.iter().map(|f| f.name.clone()).collect();
    let unnumbered: Vec<&str> = found
        .checkpoints
        .iter()
        .filter(|f| f.number.is_none())
        .map(|f| f.name.as_str())
        .collect();
    if !unnumbered.is_empty() {
        say(&format!(
            "warning: no number in the name of {}; ordered after the numbered checkpoints",
            unnumbered.join(", ")
        ));
    }
    say(&format!(
        "{} checkpoints in {}, in this order: {}",
        names.len(),
        cfg.checkpoints.display(),
        names.join(", ")
    ));
    let set = CheckpointSet::open(found.checkpoints.iter().map(|f| f.source.clone()).collect())?;

    // 2. Model, outputs, and the correspondence of the model's weights with the checkpoints.
    let model_path = match &cfg.model {
        Some(p) => p.clone(),
        None => {
            let p = discovery::find_model(&cfg.checkpoints)?;
            say(&format!(
                "model: {} (found beside the checkpoints)",
                p.display()
            ));
            p
        }
    };
    check_outputs(cfg, &set, &model_path)?;
    let model = OnnxModel::load(&model_path)?;
    let binding = onnx::plan_binding(&model, set.specs(), &cfg.allow_constant)?;

    // 3. Validation data, metric, filter, test data.
    let requested = cfg.metric.as_deref().map(Metric::parse).transpose()?;
    let data_options = DataOptions {
        input_map: cfg.inputs.clone(),
        labels: cfg.labels.clone(),
    };
    let labels_required = requested.as_ref().is_some_and(Metric::needs_labels);
    let val = data::load_validation(
        &cfg.val,
        &model.data_inputs(),
        &data_options,
        labels_required,
    )?;
    let metric = match requested {
        Some(m) => m,
        None => match &val.labels {
            Some(Labels::Classes(_)) => Metric::Accuracy,
            Some(Labels::Values { .. }) => Metric::Mse,
            None => {
                return Err(Error::data(
                    &cfg.val,
                    "no labels array `y`: name the labels with --labels, or choose --metric output:NAME",
                ))
            }
        },
    };
    let check_labels = |d: &ValidationSet| -> Result<()> {
        if metric.needs_classes() && matches!(d.labels, Some(Labels::Values { .. })) {
            return Err(Error::Metric(format!(
                "`{}` needs integer class labels, but the labels in {} are floating point",
                metric.name(),
                d.path.display()
            )));
        }
        Ok(())
    };
    check_labels(&val)?;
    let ranking = matches!(metric, Metric::Mrr | Metric::HitsAt(_));
    let load_filter = |f: &Option<PathBuf>, rows: usize, flag: &str| -> Result<Option<Filter>> {
        match f {
            Some(p) if ranking => Ok(Some(Filter::load(p, rows)?)),
            Some(_) => Err(Error::Usage(format!(
                "{flag} applies to ranking metrics (mrr, hits@K), not to `{}`",
                metric.name()
            ))),
            None => Ok(None),
        }
    };
    let filter = load_filter(&cfg.filter, val.rows, "--filter")?;
    let test = match &cfg.test {
        Some(t) => {
            let d = data::load_validation(
                t,
                &model.data_inputs(),
                &data_options,
                metric.needs_labels(),
            )?;
            check_labels(&d)?;
            let f = load_filter(&cfg.test_filter, d.rows, "--test-filter")?;
            Some((d, f))
        }
        None if cfg.test_filter.is_some() => {
            return Err(Error::Usage("--test-filter needs --test".into()));
        }
        None => None,
    };
    let direction = Direction {
        higher_is_better: cfg
            .higher_is_better
            .unwrap_or_else(|| metric.higher_is_better()),
    };
    for name in &cfg.strategies {
        strategies::by_name(name, &cfg.params)?;
    }
    if let Some(path) = &cfg.plot {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if !matches!(ext.as_deref(), Some("svg" | "png")) {
            return Err(Error::Usage(format!(
                "--plot {}: the file name must end in .svg or .png",
                path.display()
            )));
        }
    }
    Ok(Prepared {
        numbers: found.checkpoints.iter().map(|f| f.number).collect(),
        skipped: found
            .skipped
            .iter()
            .map(|(p, r)| Skipped {
                path: p.display().to_string(),
                reason: r.clone(),
            })
            .collect(),
        names,
        set,
        model_path,
        model,
        binding,
        val,
        test,
        metric,
        filter,
        direction,
    })
}

/// Size and SHA-256 of every checkpoint file, hashed in parallel.
fn digests(set: &CheckpointSet) -> Vec<InputFile> {
    let files: Vec<&crate::storage::mmap::MappedFile> =
        set.checkpoints().iter().flat_map(|c| c.mapped()).collect();
    files
        .par_iter()
        .map(|f| InputFile {
            path: f.path().display().to_string(),
            bytes: f.len(),
            sha256: f.sha256(),
        })
        .collect()
}

/// The gates' verdict on the chosen result's validation score.
fn gate(cfg: &MergeConfig, dir: Direction, score: f64, baseline: Option<(Baseline, f64)>) -> Gate {
    let mut g = Gate {
        passed: true,
        reasons: Vec::new(),
        fail_below: cfg.fail_below,
        require_gain: cfg.require_gain.map(|b| b.strategy().to_string()),
        baseline_score: baseline.map(|(_, s)| s),
    };
    let shown = reporting::format_score;
    if let Some(threshold) = cfg.fail_below {
        if !dir.at_least(score, threshold) {
            g.reasons.push(format!(
                "validation score {} is worse than --fail-below {}",
                shown(score),
                shown(threshold)
            ));
        }
    }
    if let Some((b, base)) = baseline {
        if !dir.better(score, base) {
            g.reasons.push(format!(
                "validation score {} does not beat the `{}` baseline ({})",
                shown(score),
                b.strategy(),
                shown(base)
            ));
        }
    }
    g.passed = g.reasons.is_empty();
    g
}

/// Writes a result, sharded when `shard_size` is given and the model exceeds it;
/// returns the file written (the index for a sharded output).
fn write_result(
    set: &CheckpointSet,
    merged: &Merged,
    path: &Path,
    meta: &BTreeMap<String, String>,
    shard_size: Option<u64>,
) -> Result<PathBuf> {
    let candidate = merged.candidate();
    let tensors: Vec<TensorOut<'_>> = set
        .specs()
        .iter()
        .enumerate()
        .map(|(t, spec)| TensorOut {
            name: &spec.name,
            dtype: spec.dtype,
            shape: &spec.shape,
            data: candidate.tensor_bytes(set, t),
        })
        .collect();
    match shard_size {
        Some(max) if set.model_bytes() as u64 > max => write_sharded(path, &tensors, meta, max),
        _ => write_safetensors(path, &tensors, meta).map(|_| path.to_path_buf()),
    }
}

fn draw(
    path: &Path,
    report: &Report,
    results: &[StrategyReport],
    outcomes: &[(String, BTreeMap<String, String>, Outcome, f64)],
    p: &Prepared,
) -> Result<()> {
    let steps: Option<Vec<StepPoint<'_>>> =
        outcomes.iter().find(|o| !o.2.steps.is_empty()).map(|o| {
            o.2.steps
                .iter()
                .map(|s| StepPoint {
                    label: &p.names[s.checkpoint],
                    running: s.running_score,
                    ensemble: s.ensemble_score,
                    decision: s.decision,
                })
                .collect()
        });
    let hib = report.higher_is_better;
    if results.len() == 1 {
        if let Some(steps) = &steps {
            return plot::plot_steps(path, &report.metric, hib, steps);
        }
    }
    let bars: Vec<Bar<'_>> = results
        .iter()
        .map(|r| Bar {
            label: &r.strategy,
            val: r.val_score,
            test: r.test_score,
        })
        .collect();
    plot::plot_strategies(path, &report.metric, hib, &bars, steps.as_deref())
}

/// Refuses outputs that are inputs or whose directory does not exist.
fn check_outputs(cfg: &MergeConfig, set: &CheckpointSet, model: &Path) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let mut inputs: Vec<PathBuf> = vec![model.to_path_buf(), cfg.val.clone()];
    inputs.extend(cfg.filter.clone());
    inputs.extend(cfg.test.clone());
    inputs.extend(cfg.test_filter.clone());
    inputs.push(model.with_extension("onnx.data"));
    for c in set.checkpoints() {
        inputs.push(c.path().to_path_buf());
        inputs.extend(c.files().map(Path::to_path_buf));
        if let crate::storage::CheckpointSource::Sharded { index } = c.source() {
            inputs.push(index.clone());
        }
    }
    let input_canon: Vec<PathBuf> = inputs.iter().filter_map(|p| canon(p)).collect();
    let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
    match &cfg.destination {
        Destination::File(f) => {
            outputs.push(("output", f.clone()));
            if cfg.shard_size.is_some() {
                outputs.push(("output's shard index", shard_paths(f, 1).1));
            }
        }
        Destination::Dir(d) => {
            if !d.is_dir() {
                return Err(Error::Output {
                    path: d.clone(),
                    message: "compare -o takes an existing directory (or use --pick -o FILE)"
                        .into(),
                });
            }
            for s in &cfg.strategies {
                outputs.push(("output", d.join(format!("{s}.safetensors"))));
            }
        }
        Destination::Nowhere => {}
    }
    for (what, p) in [
        ("report", &cfg.report),
        ("plot", &cfg.plot),
        ("exported model", &cfg.export_onnx),
    ] {
        if let Some(p) = p {
            outputs.push((what, p.clone()));
        }
    }
    let mut seen: Vec<(PathBuf, &str)> = Vec::new();
    for (what, out) in &outputs {
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(Error::Output {
                path: out.clone(),
                message: format!("the {what}'s directory {} does not exist", dir.display()),
            });
        }
        let resolved = canon(out).or_else(|| normalized(out));
        if let Some(c) = &resolved {
            if input_canon.contains(c) {
                return Err(Error::Output {
                    path: out.clone(),
                    message: format!(
                        "the {what} path is one of the inputs; refusing to overwrite it"
                    ),
                });
            }
            if c.is_dir() {
                return Err(Error::Output {
                    path: out.clone(),
                    message: "is a directory; give a file name".into(),
                });
            }
            if let Some((_, other)) = seen.iter().find(|(p, _)| p == c) {
                return Err(Error::Usage(format!(
                    "the {what} and the {other} are the same file: {}",
                    out.display()
                )));
            }
            seen.push((c.clone(), what));
        }
    }
    Ok(())
}

/// `path` with its directory resolved (the file itself need not exist yet).
fn normalized(path: &Path) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
}
