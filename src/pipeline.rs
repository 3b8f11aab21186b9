//! One run of the tool, start to finish: parse and validate everything first, then
//! score, then write.
//!
//! Order matters for users: every input and parameter is read and checked (checkpoints
//! agree, the model's initializers match them, the validation and test data fit the
//! model, the strategies' parameters are valid, no output overwrites an input) before
//! the first candidate is scored, so a mistake costs seconds, not a scoring run. The
//! main command writes once its result is known; `compare -o DIR` writes each
//! strategy's result as soon as it is known, to keep only one model in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::averaging::Candidate;
use crate::discovery::{self, DiscoverOptions};
use crate::error::{Error, Result};
use crate::reporting::plot::{self, Bar, StepPoint};
use crate::reporting::{
    self, progress, Gate, InputFile, Recalibration, Report, Skipped, StepReport, StrategyReport,
};
use crate::scoring::batchnorm::{Recalibrating, Recalibrator};
use crate::scoring::data::{self, DataOptions, Filter, Labels, ValidationSet};
use crate::scoring::folding::{Folded, FoldedLayer, Folding};
use crate::scoring::onnx::{self, Binding, OnnxModel};
use crate::scoring::transposed;
use crate::scoring::{
    runtime, CandidateKey, IoBindingMode, Metric, OnnxScorer, ScoreCache, Scorer, SessionOptions,
    WeightsAs,
};
use crate::storage::writer::{shard_paths, write_safetensors, write_sharded, TensorOut};
use crate::storage::CheckpointSet;
use crate::strategies::{
    self, Context, Direction, Merged, Outcome, Strategy, StrategyParams, SumMode,
};

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
    /// Check and plan only ([`plan`]); [`run`] ignores it.
    pub dry_run: bool,
    /// Where ONNX Runtime runs the model.
    pub device: crate::scoring::Device,
    /// How candidates' weights reach the model (bound once or passed with each batch).
    pub io_binding: crate::scoring::IoBindingMode,
    /// Whether weights are graph inputs (one session) or each candidate's constants.
    pub weights_as: crate::scoring::WeightsMode,
    /// Leave out unreadable or inconsistent checkpoints instead of failing.
    pub skip_invalid: bool,
    /// Recompute BatchNorm statistics of every candidate on this calibration set.
    pub recalibrate_bn: Option<PathBuf>,
    /// Rows per calibration batch.
    pub calib_batch_size: usize,
    /// Also score every result without recalibration (for comparison).
    pub also_without_bn: bool,
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
    /// BatchNorm the exporter folded into the layers, when it did.
    folding: Option<Folding>,
    val: ValidationSet,
    test: Option<(ValidationSet, Option<Filter>)>,
    calib: Option<ValidationSet>,
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
    let mut cfg = cfg.clone();
    cfg.params.aswa_sum = aswa_sum(&cfg, &p.set, &say);
    let cfg = &cfg;
    // The checkpoints are hashed for provenance while they are scored; the hashes are
    // joined before the first file is written.
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| digests(&p.set));
        execute(cfg, &say, &p, hashing)
    })
}

/// `--aswa-sum` resolved for `set` once per run (`auto`: by the memory available now),
/// saying so when `auto` gives up the sum.
fn aswa_sum(cfg: &MergeConfig, set: &CheckpointSet, say: &dyn Fn(&str)) -> SumMode {
    let (mode, sum) = (cfg.params.aswa_sum, SumMode::sum_bytes(set));
    let available = crate::reporting::available_memory_bytes();
    let resolved = mode.resolve(sum, available);
    let switched = mode == SumMode::Auto && resolved == SumMode::Reread;
    if cfg.strategies.iter().any(|s| s == "aswa") && switched {
        if let Some(free) = available {
            say(&format!(
                "note: ASWA re-reads the ensemble's members for each look-ahead: a float64 sum \
                 would take {} of the {} available (--aswa-sum keep keeps it anyway)",
                human(sum),
                human(free)
            ));
        }
    }
    resolved
}

/// Everything after the checks: scoring, strategies, gates, writing.
fn execute(
    cfg: &MergeConfig,
    say: &dyn Fn(&str),
    p: &Prepared,
    hashing: std::thread::ScopedJoinHandle<'_, Result<Vec<InputFile>>>,
) -> Result<RunOutcome> {
    let run = Execution {
        cfg,
        say,
        p,
        format: p.set.checkpoints()[0].metadata().get("format").cloned(),
    };
    let mut provenance = Provenance(Some(hashing));
    let rt = runtime::load(cfg.ort_lib.as_deref())?;
    let scoring = run.scorer(&rt)?;
    let mut report = run.common_report(&rt, &scoring);
    let mut scorer = scoring.scorer;

    // The strategies, the baseline and the report's scores share one score cache.
    let mut scores = Scores {
        cache: ScoreCache::new(&mut *scorer),
        test_index: scoring.test_index,
        test_scores: HashMap::new(),
    };
    let mut results = run.strategies(&mut scores, &mut report, &mut provenance)?;
    let baseline = run.baseline(&mut scores.cache)?;
    run.record_scores(&mut scores, &mut report)?;
    drop(scores);
    report.gate = gate(cfg, p.direction, results.merged.score, baseline);

    run.write_weights(&mut *scorer, &mut results, &mut report, &mut provenance)?;
    run.write_report(&results, &mut report, &mut provenance)?;
    run.summary(&report, &results);
    let gate_passed = report.gate.passed;
    Ok(RunOutcome {
        report,
        gate_passed,
    })
}

/// What the steps of [`execute`] share.
struct Execution<'a> {
    cfg: &'a MergeConfig,
    say: &'a dyn Fn(&str),
    p: &'a Prepared,
    /// The checkpoints' `format` metadata, carried into every file written.
    format: Option<String>,
}

/// The checkpoints' hashes for provenance, computed on another thread while they are
/// scored.
struct Provenance<'scope>(Option<std::thread::ScopedJoinHandle<'scope, Result<Vec<InputFile>>>>);

impl Provenance<'_> {
    /// Puts the hashes in `report.inputs`, waiting for them the first time; called
    /// before each file is written.
    fn fill(&mut self, report: &mut Report) -> Result<()> {
        if let Some(h) = self.0.take() {
            report.inputs = h
                .join()
                .map_err(|_| Error::Runtime("hashing the input checkpoints failed".into()))??;
        }
        Ok(())
    }
}

/// The scorer and what the report says about it.
struct Scoring {
    scorer: Box<dyn Scorer>,
    /// The test set's index among the scorer's data sets.
    test_index: Option<usize>,
    batch_size: usize,
    provider: &'static str,
    io_binding: bool,
    weights_as: WeightsAs,
    recalibration: Option<Recalibration>,
}

/// The score cache shared by the strategies, the baseline and the report, and the test
/// scores of the results.
struct Scores<'s> {
    cache: ScoreCache<'s>,
    /// The test set's index among the scorer's data sets.
    test_index: Option<usize>,
    /// Test scores by candidate, so that none is computed twice.
    test_scores: HashMap<CandidateKey, f64>,
}

impl Scores<'_> {
    /// `candidate`'s score on the test set (`None` without one), computed once per `key`.
    fn test_score(
        &mut self,
        set: &CheckpointSet,
        key: CandidateKey,
        candidate: Candidate<'_>,
    ) -> Result<Option<f64>> {
        let Some(which) = self.test_index else {
            return Ok(None);
        };
        if let Some(&s) = self.test_scores.get(&key) {
            return Ok(Some(s));
        }
        let s = self.cache.scorer().score_on(set, candidate, which)?;
        self.test_scores.insert(key, s);
        Ok(Some(s))
    }
}

/// What the strategies produced.
struct Results {
    /// One per strategy, in order.
    reports: Vec<StrategyReport>,
    /// The best result: its index in `reports`, and its weights.
    chosen: usize,
    merged: Merged,
    /// ASWA's steps, for the chart.
    aswa_steps: Vec<strategies::Step>,
    /// The weight files written so far.
    written: Vec<PathBuf>,
}

impl Execution<'_> {
    fn say(&self, line: &str) {
        (self.say)(line)
    }

    /// The path of checkpoint `i`, as reports show it.
    fn path_of(&self, i: usize) -> String {
        self.p.set.checkpoints()[i].path().display().to_string()
    }

    /// The ONNX Runtime scorer on the validation (and test) data, recalibrating
    /// BatchNorm statistics first with --recalibrate-bn.
    fn scorer(&self, rt: &runtime::Runtime) -> Result<Scoring> {
        let (cfg, p) = (self.cfg, self.p);
        let mut scorer = OnnxScorer::new(
            rt,
            &p.model,
            p.binding.clone(),
            p.val.clone(),
            p.metric.clone(),
            p.filter.clone(),
            &SessionOptions {
                batch_size: cfg.batch_size,
                threads: cfg.threads,
                output: cfg.output_name.clone(),
                device: cfg.device,
                io_binding: cfg.io_binding,
                weights: cfg.weights_as,
            },
        )?;
        if let Some(why) = scorer.device_note() {
            self.say(&format!("note: --device auto uses the CPU: {why}"));
        }
        let test_index = p.test.clone().map(|(d, f)| scorer.add_dataset(d, f));
        let batch_size = scorer.batch_size();
        let provider = scorer.provider();
        let io_binding = scorer.binds_weights();
        let weights_as = scorer.weights_as();
        let output_name = scorer.output_name().to_string();
        let recalibrator = self.recalibrator(rt)?;
        let recalibration = recalibrator.as_ref().map(|r| Recalibration {
            calibration: cfg
                .recalibrate_bn
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            rows: r.rows(),
            batch_size: r.batch_size(),
            batchnorm_layers: r.batchnorm_nodes().iter().map(|n| n.name.clone()).collect(),
        });
        let scorer: Box<dyn Scorer> = match (recalibrator, p.folding.clone()) {
            (Some(recalibrator), _) => Box::new(Recalibrating {
                inner: scorer,
                recalibrator,
            }),
            (None, Some(folding)) => Box::new(Folded {
                inner: scorer,
                folding,
            }),
            (None, None) => Box::new(scorer),
        };
        self.say(&format!(
            "scoring with {} on {} ({} rows, batches of {batch_size}, output `{}`, {}{}), {} is better",
            p.metric.name(),
            cfg.val.display(),
            p.val.rows,
            output_name,
            provider,
            match weights_as {
                WeightsAs::Inputs => "",
                WeightsAs::Constants => ", weights as constants: a session per candidate",
            },
            if p.direction.higher_is_better {
                "higher"
            } else {
                "lower"
            }
        ));
        Ok(Scoring {
            scorer,
            test_index,
            batch_size,
            provider,
            io_binding,
            weights_as,
            recalibration,
        })
    }

    /// The BatchNorm recalibrator for --recalibrate-bn; `None` without the flag or
    /// when the model has no BatchNormalization.
    fn recalibrator(&self, rt: &runtime::Runtime) -> Result<Option<Recalibrator>> {
        let (cfg, p) = (self.cfg, self.p);
        let Some(calib) = &p.calib else {
            return Ok(None);
        };
        let r = Recalibrator::new(
            rt,
            &p.model,
            &p.binding,
            calib.clone(),
            &SessionOptions {
                batch_size: cfg.calib_batch_size,
                threads: cfg.threads,
                output: None,
                device: cfg.device,
                io_binding: cfg.io_binding,
                // Calibration graphs compute batch statistics: nothing there is
                // optimised by constant weights.
                weights: crate::scoring::WeightsMode::Inputs,
            },
        )?;
        match &r {
            Some(r) => self.say(&format!(
                "recalibrating {} BatchNorm layer{} of every candidate on {} ({} rows, batches of {})",
                r.batchnorm_nodes().len(),
                if r.batchnorm_nodes().len() == 1 { "" } else { "s" },
                calib.path.display(),
                r.rows(),
                r.batch_size()
            )),
            None => self.say(
                "notice: the model has no BatchNormalization: --recalibrate-bn has nothing to do",
            ),
        }
        Ok(r)
    }

    /// The report's common part: what the metadata of every written file needs.
    fn common_report(&self, rt: &runtime::Runtime, scoring: &Scoring) -> Report {
        let (cfg, p) = (self.cfg, self.p);
        Report {
            tool: "aswa-merge".into(),
            version: reporting::VERSION.into(),
            metric: p.metric.name(),
            higher_is_better: p.direction.higher_is_better,
            checkpoints: (0..p.set.len()).map(|i| self.path_of(i)).collect(),
            inputs: Vec::new(),
            result: None,
            strategies: None,
            winner: None,
            last_test_score: None,
            gate: Gate::default(),
            model: p.model_path.display().to_string(),
            validation: cfg.val.display().to_string(),
            validation_rows: p.val.rows,
            test: cfg.test.as_ref().map(|t| t.display().to_string()),
            batch_size: scoring.batch_size,
            evaluations: 0,
            onnxruntime: rt.library.display().to_string(),
            execution_provider: scoring.provider.to_string(),
            io_binding: scoring.io_binding,
            weights_as: match scoring.weights_as {
                WeightsAs::Inputs => "inputs",
                WeightsAs::Constants => "constants",
            }
            .into(),
            rename: p.binding.rename.clone(),
            folded_batchnorm: p
                .folding
                .iter()
                .flat_map(|f| &f.layers)
                .map(FoldedLayer::describe)
                .collect(),
            transposed: transposed_names(&p.binding, &p.set),
            recalibration: scoring.recalibration.clone(),
            nan_scores: Vec::new(),
            peak_rss_bytes: None,
            skipped: p.skipped.clone(),
        }
    }

    /// Runs the strategies in order and keeps the best result. Each result is scored on
    /// the test set and, with `compare -o DIR`, written as soon as it is known; only the
    /// best result so far keeps its weights, so memory does not grow with the number of
    /// strategies.
    fn strategies(
        &self,
        scores: &mut Scores<'_>,
        report: &mut Report,
        provenance: &mut Provenance<'_>,
    ) -> Result<Results> {
        let mut reports: Vec<StrategyReport> = Vec::new();
        let mut aswa_steps: Vec<strategies::Step> = Vec::new();
        let mut best: Option<(usize, Merged)> = None;
        let mut written = Vec::new();
        for name in &self.cfg.strategies {
            let (mut result, merged, steps) = self.strategy(name, scores)?;
            if name == "aswa" {
                aswa_steps = steps;
            }
            if let Destination::Dir(d) = &self.cfg.destination {
                let path = d.join(format!("{name}.safetensors"));
                let file = self.write_now(
                    &path,
                    &mut scores.cache,
                    &merged,
                    &result,
                    report,
                    provenance,
                )?;
                result.output = Some(file.display().to_string());
                written.push(file);
            }
            if best
                .as_ref()
                .is_none_or(|(_, b)| self.p.direction.better(merged.score, b.score))
            {
                best = Some((reports.len(), merged));
            }
            reports.push(result);
        }
        let Some((chosen, merged)) = best else {
            return Err(Error::Usage("no strategy to run".into()));
        };
        Ok(Results {
            reports,
            chosen,
            merged,
            aswa_steps,
            written,
        })
    }

    /// Runs strategy `name` and scores its result on the test set and, with
    /// --also-without-bn, without recalibration; returns its report, its result and its
    /// steps.
    fn strategy(
        &self,
        name: &str,
        scores: &mut Scores<'_>,
    ) -> Result<(StrategyReport, Merged, Vec<strategies::Step>)> {
        let (cfg, set) = (self.cfg, &self.p.set);
        let strategy = strategies::by_name(name, &cfg.params)?;
        let started = Instant::now();
        let outcome = self.run_strategy(&*strategy, name == "aswa", &mut scores.cache)?;
        let merged = outcome.merged;
        let key = if name == "ema" && merged.weights.is_some() {
            CandidateKey::Ema(merged.members.clone(), cfg.params.ema_decay.to_bits())
        } else {
            CandidateKey::mean(&merged.members)
        };
        let test_score = scores.test_score(set, key, merged.candidate())?;
        let result = StrategyReport {
            strategy: name.to_string(),
            params: strategy.params(),
            steps: outcome
                .steps
                .iter()
                .map(|s| StepReport::new(s, &self.path_of(s.checkpoint)))
                .collect(),
            members: merged.members.iter().map(|&i| self.path_of(i)).collect(),
            val_score: merged.score,
            val_score_without_bn: if cfg.also_without_bn {
                Some(
                    scores
                        .cache
                        .scorer()
                        .score_plain(set, merged.candidate(), 0)?,
                )
            } else {
                None
            },
            test_score,
            output: None,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((result, merged, outcome.steps))
    }

    /// Runs `strategy` on the checkpoints; one that walks them (`walks`: ASWA) shows
    /// its steps as a table above a progress bar.
    fn run_strategy(
        &self,
        strategy: &dyn Strategy,
        walks: bool,
        cache: &mut ScoreCache<'_>,
    ) -> Result<Outcome> {
        let (cfg, p) = (self.cfg, self.p);
        let pb = progress::bar(
            (2 * p.set.len()).saturating_sub(1) as u64,
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
            set: &p.set,
            cache,
            direction: p.direction,
            numbers: &p.numbers,
            on_step: &mut on_step,
        };
        let outcome = strategy.run(&mut ctx)?;
        pb.finish_and_clear();
        Ok(outcome)
    }

    /// Writes one strategy's result to `path` as soon as it is known (`compare -o
    /// DIR`), recalibrated when the scorer recalibrates; returns the file written.
    fn write_now(
        &self,
        path: &Path,
        cache: &mut ScoreCache<'_>,
        merged: &Merged,
        result: &StrategyReport,
        report: &mut Report,
        provenance: &mut Provenance<'_>,
    ) -> Result<PathBuf> {
        let set = &self.p.set;
        for c in set.checkpoints() {
            c.check_unchanged()?;
        }
        provenance.fill(report)?;
        let meta = report.metadata(result, self.format.as_deref());
        let finished = cache.scorer().finalize(set, merged.candidate())?;
        let candidate = finished
            .as_ref()
            .map_or(merged.candidate(), Candidate::Average);
        write_result(set, candidate, path, &meta, self.cfg.shard_size)
    }

    /// The baseline's validation score, for --require-gain.
    fn baseline(&self, cache: &mut ScoreCache<'_>) -> Result<Option<(Baseline, f64)>> {
        let Some(b) = self.cfg.require_gain else {
            return Ok(None);
        };
        let strategy = strategies::by_name(b.strategy(), &self.cfg.params)?;
        let mut none = |_: &strategies::Step| {};
        let mut ctx = Context {
            set: &self.p.set,
            cache,
            direction: self.p.direction,
            numbers: &self.p.numbers,
            on_step: &mut none,
        };
        Ok(Some((b, strategy.run(&mut ctx)?.merged.score)))
    }

    /// Puts the scoring's facts in the report: the last checkpoint's test score (main
    /// command), the number of evaluations and the checkpoints that score NaN, with a
    /// warning for each.
    fn record_scores(&self, scores: &mut Scores<'_>, report: &mut Report) -> Result<()> {
        let set = &self.p.set;
        if !self.cfg.compare {
            if let Some(which) = scores.test_index {
                let last = set.len() - 1;
                let key = CandidateKey::mean(&[last]);
                report.last_test_score = Some(match scores.test_scores.get(&key) {
                    Some(&s) => s,
                    None => {
                        scores
                            .cache
                            .scorer()
                            .score_on(set, Candidate::Checkpoint(last), which)?
                    }
                });
            }
        }
        report.evaluations = scores.cache.evaluations();
        let diverged: Vec<String> = (0..set.len())
            .filter(|&i| {
                scores
                    .cache
                    .get(&CandidateKey::mean(&[i]))
                    .is_some_and(f64::is_nan)
            })
            .map(|i| self.path_of(i))
            .collect();
        for d in &diverged {
            self.say(&format!(
                "warning: {d} scores NaN (its outputs are not finite: diverged weights?); it was never accepted"
            ));
        }
        report.nan_scores = diverged;
        Ok(())
    }

    /// Writes the chosen result (recalibrated, when the scorer recalibrates) and the
    /// ONNX model with its weights, once the checkpoints are known not to have changed
    /// under us.
    fn write_weights(
        &self,
        scorer: &mut dyn Scorer,
        results: &mut Results,
        report: &mut Report,
        provenance: &mut Provenance<'_>,
    ) -> Result<()> {
        let (cfg, p) = (self.cfg, self.p);
        let set = &p.set;
        // The checkpoints must not have changed under us.
        for c in set.checkpoints() {
            c.check_unchanged()?;
        }

        let finished = scorer.finalize(set, results.merged.candidate())?;
        let final_candidate = finished
            .as_ref()
            .map_or(results.merged.candidate(), Candidate::Average);
        if let Destination::File(path) = &cfg.destination {
            provenance.fill(report)?;
            let chosen = &mut results.reports[results.chosen];
            let meta = report.metadata(chosen, self.format.as_deref());
            let file = write_result(set, final_candidate, path, &meta, cfg.shard_size)?;
            chosen.output = Some(file.display().to_string());
            results.written.push(file);
        }
        if let Some(path) = &cfg.export_onnx {
            // A model with folded BatchNorm takes the candidate folded.
            let folded = p
                .folding
                .as_ref()
                .map(|f| f.apply(set, final_candidate))
                .transpose()?;
            let candidate = folded.as_ref().map_or(final_candidate, Candidate::Average);
            onnx::export(
                &p.model,
                &p.binding,
                set.specs(),
                |t| candidate.tensor_bytes(set, t),
                path,
            )?;
        }
        Ok(())
    }

    /// Completes the report with the result (or every strategy's and the winner) and
    /// writes it and the chart.
    fn write_report(
        &self,
        results: &Results,
        report: &mut Report,
        provenance: &mut Provenance<'_>,
    ) -> Result<()> {
        let cfg = self.cfg;
        let chosen = &results.reports[results.chosen];
        if cfg.compare {
            report.winner = Some(chosen.strategy.clone());
            report.strategies = Some(results.reports.clone());
        } else {
            report.result = Some(chosen.clone());
        }
        provenance.fill(report)?;
        if let Some(r) = &cfg.report {
            report.peak_rss_bytes = crate::reporting::peak_rss_bytes();
            report.write(r)?;
        }
        if let Some(path) = &cfg.plot {
            draw(path, report, &results.reports, &results.aswa_steps, self.p)?;
        }
        Ok(())
    }

    /// The summary on stderr: the result, or the comparison table and the winner; the
    /// files written; why the gate failed.
    fn summary(&self, report: &Report, results: &Results) {
        let (cfg, p) = (self.cfg, self.p);
        let last_test_score = report.last_test_score;
        let evaluations = report.evaluations;
        let chosen = &results.reports[results.chosen];
        if cfg.compare {
            let with_test = cfg.test.is_some();
            self.say(&reporting::compare_header(with_test, cfg.also_without_bn));
            for r in &results.reports {
                self.say(&reporting::compare_row(r, with_test));
            }
            self.say(&format!("winner on validation: {}", chosen.strategy));
        } else {
            let r = chosen;
            let member_names: Vec<&str> = results
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
            self.say(&format!(
                "result ({}): {} member{} ({}), validation {} {}{test}; {} candidate{} scored",
                r.strategy,
                member_names.len(),
                if member_names.len() == 1 { "" } else { "s" },
                member_names.join(", "),
                p.metric.name(),
                reporting::format_score(r.val_score),
                evaluations,
                if evaluations == 1 { "" } else { "s" }
            ));
        }
        for path in &results.written {
            self.say(&format!("wrote {}", path.display()));
        }
        for path in [&cfg.export_onnx, &cfg.report, &cfg.plot]
            .into_iter()
            .flatten()
        {
            self.say(&format!("wrote {}", path.display()));
        }
        if !report.gate.passed {
            for reason in &report.gate.reasons {
                self.say(&format!("gate failed: {reason}"));
            }
        }
    }
}

/// What a run would do, from `--dry-run`: everything is read and checked, nothing is
/// scored or written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub checkpoints: Vec<String>,
    pub tensors: usize,
    pub float_parameters: usize,
    /// Bytes of one model (all tensors of one checkpoint).
    pub model_bytes: u64,
    /// Bytes of all checkpoint files.
    pub bytes_to_read: u64,
    pub validation_rows: usize,
    pub validation_bytes: u64,
    pub strategies: Vec<String>,
    /// Predicted peak of the buffers the tool allocates plus the checkpoint pages resident
    /// at once (about one checkpoint: each is released once read); ONNX Runtime's own
    /// working memory comes on top.
    pub predicted_peak_bytes: u64,
    pub metric: String,
    /// How candidates' weights would reach the model on the CPU (`--weights-as`; with
    /// `--device auto` a usable GPU would make `auto` choose inputs).
    pub weights_as: WeightsAs,
}

/// Reads and checks every input like [`run`], and returns the plan instead of running it.
pub fn plan(cfg: &MergeConfig) -> Result<Plan> {
    let say = |line: &str| {
        if !cfg.quiet {
            eprintln!("{line}");
        }
    };
    let p = prepare(cfg, &say)?;
    let set = &p.set;
    let float_params: usize = set
        .specs()
        .iter()
        .filter(|s| s.dtype.is_float())
        .map(|s| s.numel())
        .sum();
    let float_bytes: u64 = set
        .specs()
        .iter()
        .filter(|s| s.dtype.is_float())
        .map(|s| (s.numel() * s.dtype.size()) as u64)
        .sum();
    // Weights in the model's type (or layout) when they must be converted to be fed.
    let conversion: u64 = p
        .binding
        .bound
        .iter()
        .filter(|b| b.transpose || b.elem.dtype() != set.specs()[b.tensor].dtype)
        .map(|b| (b.shape.iter().product::<usize>() * b.elem.dtype().size()) as u64)
        .sum();
    let data_bytes = |d: &ValidationSet| -> u64 {
        d.inputs
            .iter()
            .map(|(_, a)| (a.shape().iter().product::<usize>() * a.element_size()) as u64)
            .sum()
    };
    let validation_bytes = data_bytes(&p.val) + p.test.as_ref().map_or(0, |(d, _)| data_bytes(d));
    // Weights bound once per candidate are owned copies in the model's type (`auto`
    // binds them when CUDA is used, which `--device auto` may choose: counted then too).
    // Folding BatchNorm into the layers scores a folded copy of each candidate.
    let folded_copy = if p.folding.is_some() { float_bytes } else { 0 };
    let bound_bytes: u64 = p
        .binding
        .bound
        .iter()
        .map(|b| (b.shape.iter().product::<usize>() * b.elem.dtype().size()) as u64)
        .sum();
    let bound_copy: u64 = match (cfg.io_binding, cfg.device) {
        (IoBindingMode::On, _)
        | (IoBindingMode::Auto, crate::scoring::Device::Cuda(_) | crate::scoring::Device::Auto) => {
            bound_bytes
        }
        _ => 0,
    };
    // Weights as constants: the candidate's copy and its session's own (`auto` uses
    // them on the CPU, which `--device auto` may choose).
    let on_cpu = !matches!(cfg.device, crate::scoring::Device::Cuda(_));
    let weights_as = cfg
        .weights_as
        .resolve(&p.model, &p.binding, on_cpu, cfg.io_binding)?;
    let bound_copy = match weights_as {
        WeightsAs::Constants => bound_copy.max(2 * bound_bytes),
        WeightsAs::Inputs => bound_copy,
    };
    // Checkpoint pages: the one being read (streaming averages read a bounded window of
    // several at once, less than one model for all but small models).
    let mapped = set.model_bytes() as u64;
    // ASWA: an f64 sum (unless it re-reads), the ensemble and the look-ahead; the others:
    // their result.
    let (aswa_sum, sum_bytes) = (aswa_sum(cfg, set, &say), SumMode::sum_bytes(set));
    let per_strategy = |name: &str| -> u64 {
        match name {
            "aswa" if aswa_sum == SumMode::Reread => 2 * float_bytes,
            "aswa" => sum_bytes + 2 * float_bytes,
            // The soup and the trial with one more member.
            "greedy-soup" => 2 * float_bytes,
            _ => float_bytes,
        }
    };
    // compare also keeps the best result so far while the next one runs.
    let kept = if cfg.strategies.len() > 1 {
        float_bytes
    } else {
        0
    };
    let strategies_bytes = cfg
        .strategies
        .iter()
        .map(|s| per_strategy(s))
        .max()
        .unwrap_or(0)
        + kept;
    let plan = Plan {
        checkpoints: set
            .checkpoints()
            .iter()
            .map(|c| c.path().display().to_string())
            .collect(),
        tensors: set.specs().len(),
        float_parameters: float_params,
        model_bytes: set.model_bytes() as u64,
        bytes_to_read: set.checkpoints().iter().map(|c| c.size_bytes()).sum(),
        validation_rows: p.val.rows,
        validation_bytes,
        strategies: cfg.strategies.clone(),
        predicted_peak_bytes: strategies_bytes
            + conversion
            + bound_copy
            + folded_copy
            + mapped
            + validation_bytes,
        metric: p.metric.name(),
        weights_as,
    };
    say(&format!(
        "plan: {}strategy {} over {} checkpoints; {} tensors ({} float parameters), {} per model",
        if cfg.compare { "compare: " } else { "" },
        plan.strategies.join(","),
        plan.checkpoints.len(),
        plan.tensors,
        plan.float_parameters,
        human(plan.model_bytes)
    ));
    say(&format!(
        "      read {} of checkpoints; validation {} rows ({}); metric {}; weights as {}",
        human(plan.bytes_to_read),
        plan.validation_rows,
        human(plan.validation_bytes),
        plan.metric,
        match plan.weights_as {
            WeightsAs::Inputs => "inputs (one session)",
            WeightsAs::Constants => "constants (a session per candidate)",
        }
    ));
    if cfg.strategies.iter().any(|s| s == "aswa") {
        say(&match aswa_sum {
            SumMode::Reread => {
                "      aswa: no float64 sum; each look-ahead re-reads its members".into()
            }
            _ => format!(
                "      aswa: a float64 running sum of the members ({})",
                human(sum_bytes)
            ),
        });
    }
    say(&format!(
        "      predicted peak memory {} (plus ONNX Runtime's working memory); nothing scored or written",
        human(plan.predicted_peak_bytes)
    ));
    Ok(plan)
}

/// Bytes in the largest fitting binary unit.
fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Which checkpoint tensors feed which initializers of `model`: by name (or a common
/// prefix), else accounting for what the exporter derived from the parameters —
/// BatchNorm folded into the layers ([`Folding`]), transposes stored by constant folding
/// ([`transposed::find`]). The original mismatch when neither explains it.
fn bind(
    cfg: &MergeConfig,
    model: &OnnxModel,
    set: &CheckpointSet,
    say: &dyn Fn(&str),
) -> Result<(onnx::Binding, Option<Folding>)> {
    let mismatch = match onnx::plan_binding(model, set.specs(), &cfg.allow_constant) {
        Ok(binding) => return Ok((binding, None)),
        Err(mismatch) => mismatch,
    };
    // With a wrapper's prefix mapped first, when one fits (else the search by value would
    // take every prefixed tensor for a renamed one), then the checkpoints' own names.
    let renames = onnx::prefix_candidates(model, set.specs())
        .into_iter()
        .map(Some)
        .chain(std::iter::once(None));
    let mut derived = None;
    for rename in renames {
        let folding = Folding::plan(model, set, rename.as_ref())?;
        let mut transposed = transposed::find(model, set, rename.as_ref())?;
        // What the user named a constant stays one.
        transposed.retain(|init, _| !cfg.allow_constant.contains(init));
        if folding.is_some() || !transposed.is_empty() {
            let mut names = folding.as_ref().map(|f| f.names(set)).unwrap_or_default();
            names.transposed = transposed;
            // What still does not match once the derived initializers are accounted for.
            let binding =
                onnx::plan_folded_binding(model, set.specs(), &cfg.allow_constant, &names, rename);
            let done = binding.is_ok();
            // The first explanation's verdict is kept unless a later one binds.
            if done || derived.is_none() {
                derived = Some((binding, folding));
            }
            if done {
                break;
            }
        }
    }
    let Some((binding, folding)) = derived else {
        return Err(mismatch);
    };
    let binding = binding?;
    if let Some(folding) = &folding {
        if cfg.recalibrate_bn.is_some() {
            return Err(Error::Usage(format!(
                "--recalibrate-bn: the exporter folded BatchNorm into the layers of {} \
                 ({} folded), so its statistics cannot be recalibrated in this model; \
                 export it with `torch.onnx.export(..., dynamo=True, optimize=False)` \
                 to recalibrate",
                model.path().display(),
                folding.layers.len()
            )));
        }
        say(&format!(
            "note: the exporter folded BatchNorm into the preceding layers ({}); every \
             candidate is folded the same way to be scored, and the output keeps the \
             checkpoints' unfolded tensors",
            folding
                .layers
                .iter()
                .map(FoldedLayer::describe)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let transposes = transposed_names(&binding, set);
    if !transposes.is_empty() {
        say(&format!(
            "note: constant folding stored transposed parameters in the model ({}); each \
             candidate's tensor is fed transposed",
            transposes.join("; ")
        ));
    }
    Ok((binding, folding))
}

/// "INIT = TENSORᵀ" for the initializers fed a transposed checkpoint tensor.
fn transposed_names(binding: &onnx::Binding, set: &CheckpointSet) -> Vec<String> {
    binding
        .bound
        .iter()
        .filter(|b| b.transpose)
        .map(|b| format!("{} = {}ᵀ", b.name, set.specs()[b.tensor].name))
        .collect()
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
    let sources: Vec<_> = found.checkpoints.iter().map(|f| f.source.clone()).collect();
    let mut skipped: Vec<Skipped> = found
        .skipped
        .iter()
        .map(|(p, r)| Skipped {
            path: p.display().to_string(),
            reason: r.clone(),
        })
        .collect();
    let (set, invalid) = if cfg.skip_invalid {
        CheckpointSet::open_skipping_invalid(sources)?
    } else {
        (CheckpointSet::open(sources)?, Vec::new())
    };
    for (path, why) in invalid {
        say(&format!(
            "warning: --skip-invalid: leaving out {}: {why}",
            path.display()
        ));
        skipped.push(Skipped {
            path: path.display().to_string(),
            reason: format!("invalid: {why}"),
        });
    }
    let kept: Vec<&discovery::Found> = found
        .checkpoints
        .iter()
        .filter(|f| set.checkpoints().iter().any(|c| c.source() == &f.source))
        .collect();
    let names: Vec<String> = kept.iter().map(|f| f.name.clone()).collect();
    let unnumbered: Vec<&str> = kept
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
    let (binding, folding) = bind(cfg, &model, &set, say)?;
    if let Some(rename) = &binding.rename {
        say(&format!(
            "note: the model's initializers match the {rename} (the output keeps the checkpoints' names)"
        ));
    }

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
    let calib = match &cfg.recalibrate_bn {
        Some(path) => {
            let options = DataOptions {
                input_map: cfg.inputs.clone(),
                labels: None,
            };
            Some(data::load_validation(
                path,
                &model.data_inputs(),
                &options,
                false,
            )?)
        }
        None if cfg.also_without_bn => {
            return Err(Error::Usage(
                "--also-without-bn needs --recalibrate-bn".into(),
            ));
        }
        None => None,
    };
    let numbers: Vec<Option<u64>> = kept.iter().map(|f| f.number).collect();
    let baseline = cfg.require_gain.map(|b| b.strategy().to_string());
    for name in cfg.strategies.iter().chain(baseline.iter()) {
        strategies::by_name(name, &cfg.params)?.validate(set.len(), &numbers)?;
    }
    if let Some(t) = cfg.fail_below {
        if !t.is_finite() {
            return Err(Error::Usage(format!(
                "--fail-below {t}: must be a finite score"
            )));
        }
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
        numbers,
        skipped,
        names,
        set,
        model_path,
        model,
        binding,
        folding,
        val,
        test,
        calib,
        metric,
        filter,
        direction,
    })
}

/// Size and SHA-256 of every checkpoint file, hashed in parallel.
fn digests(set: &CheckpointSet) -> Result<Vec<InputFile>> {
    let files: Vec<&crate::storage::mmap::MappedFile> =
        set.checkpoints().iter().flat_map(|c| c.mapped()).collect();
    files
        .par_iter()
        .map(|f| {
            Ok(InputFile {
                path: f.path().display().to_string(),
                bytes: f.len(),
                sha256: f.sha256()?,
            })
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
    candidate: Candidate<'_>,
    path: &Path,
    meta: &BTreeMap<String, String>,
    shard_size: Option<u64>,
) -> Result<PathBuf> {
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
    aswa_steps: &[strategies::Step],
    p: &Prepared,
) -> Result<()> {
    let steps: Vec<StepPoint<'_>> = aswa_steps
        .iter()
        .map(|s| StepPoint {
            label: &p.names[s.checkpoint],
            running: s.running_score,
            ensemble: s.ensemble_score,
            decision: s.decision,
        })
        .collect();
    let steps = (!steps.is_empty()).then_some(steps);
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
    inputs.extend(cfg.recalibrate_bn.clone());
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
    if let Some(p) = &cfg.export_onnx {
        let mut data = p.clone().into_os_string();
        data.push(".data");
        outputs.push(("exported model's data", PathBuf::from(data)));
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
