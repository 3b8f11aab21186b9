//! One run of the tool, start to finish: parse and validate everything first, then
//! score, then write.
//!
//! Order matters for users: every input is read and checked (checkpoints agree, the
//! model's initializers match them, the validation data fits the model, the output
//! does not overwrite an input) before the first candidate is scored, so a mistake
//! costs seconds, not a scoring run. Nothing is written until the result is known.

use std::path::{Path, PathBuf};

use crate::discovery::{self, DiscoverOptions};
use crate::error::{Error, Result};
use crate::reporting::{self, progress, Report, Skipped, StepReport};
use crate::scoring::data::{self, DataOptions, Filter, Labels};
use crate::scoring::onnx::{self, OnnxModel};
use crate::scoring::{runtime, Metric, OnnxScorer, ScoreCache, SessionOptions};
use crate::storage::writer::{write_safetensors, TensorOut};
use crate::storage::CheckpointSet;
use crate::strategies::{aswa, AswaOptions, Direction};

/// Everything a run needs; the CLI fills it from its flags.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub checkpoints: PathBuf,
    pub model: Option<PathBuf>,
    pub val: PathBuf,
    pub output: PathBuf,
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
    pub accept_ties: bool,
    pub allow_constant: Vec<String>,
    /// ONNX Runtime intra-op threads (0: its default).
    pub threads: usize,
    pub ort_lib: Option<PathBuf>,
    /// No summary or progress on stderr.
    pub quiet: bool,
}

/// Runs ASWA as configured and writes the output (and report). Returns the report.
pub fn run(cfg: &MergeConfig) -> Result<Report> {
    let say = |line: &str| {
        if !cfg.quiet {
            eprintln!("{line}");
        }
    };

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

    // 2. Model and the correspondence of its weights with the checkpoints.
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
    check_output_is_new(cfg, &set, &model_path)?;
    let model = OnnxModel::load(&model_path)?;
    let binding = onnx::plan_binding(&model, set.specs(), &cfg.allow_constant)?;

    // 3. Validation data, metric, filter.
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
    if metric.needs_classes() && matches!(val.labels, Some(Labels::Values { .. })) {
        return Err(Error::Metric(format!(
            "`{}` needs integer class labels, but the labels in {} are floating point",
            metric.name(),
            cfg.val.display()
        )));
    }
    let filter = match &cfg.filter {
        Some(p) if matches!(metric, Metric::Mrr | Metric::HitsAt(_)) => {
            Some(Filter::load(p, val.rows)?)
        }
        Some(_) => {
            return Err(Error::Usage(format!(
                "--filter applies to ranking metrics (mrr, hits@K), not to `{}`",
                metric.name()
            )))
        }
        None => None,
    };
    let direction = Direction {
        higher_is_better: cfg
            .higher_is_better
            .unwrap_or_else(|| metric.higher_is_better()),
    };

    // 4. ONNX Runtime.
    let rt = runtime::load(cfg.ort_lib.as_deref())?;
    let rows = val.rows;
    let mut scorer = OnnxScorer::new(
        &rt,
        &model,
        binding,
        val,
        metric.clone(),
        filter,
        &SessionOptions {
            batch_size: cfg.batch_size,
            threads: cfg.threads,
            output: cfg.output_name.clone(),
        },
    )?;
    let batch_size = scorer.batch_size();
    say(&format!(
        "scoring with {} on {} ({} rows, batches of {batch_size}, output `{}`), {} is better",
        metric.name(),
        cfg.val.display(),
        rows,
        scorer.output_name(),
        if direction.higher_is_better {
            "higher"
        } else {
            "lower"
        }
    ));

    // 5. ASWA.
    let total = (2 * set.len()).saturating_sub(1) as u64;
    let pb = progress::bar(total, cfg.quiet);
    progress::println(&pb, cfg.quiet, &reporting::table_header());
    let mut cache = ScoreCache::new(&mut scorer);
    let mut on_step = |step: &crate::strategies::Step| {
        pb.set_position(if step.checkpoint == 0 {
            1
        } else {
            2 * step.checkpoint as u64 + 1
        });
        progress::println(
            &pb,
            cfg.quiet,
            &reporting::table_row(step, &names[step.checkpoint]),
        );
    };
    let (merged, steps) = aswa(
        &set,
        &mut cache,
        AswaOptions {
            direction,
            accept_ties: cfg.accept_ties,
        },
        &mut on_step,
    )?;
    let evaluations = cache.evaluations();
    pb.finish_and_clear();

    // 6. The checkpoints must not have changed under us.
    for c in set.checkpoints() {
        c.check_unchanged()?;
    }

    // 7. Write.
    let path_of = |i: usize| set.checkpoints()[i].path().display().to_string();
    let report = Report {
        tool: "aswa-merge".into(),
        version: reporting::VERSION.into(),
        strategy: "aswa".into(),
        metric: metric.name(),
        higher_is_better: direction.higher_is_better,
        accept_ties: cfg.accept_ties,
        checkpoints: (0..set.len()).map(path_of).collect(),
        steps: steps
            .iter()
            .map(|s| StepReport::new(s, &path_of(s.checkpoint)))
            .collect(),
        members: merged.members.iter().map(|&i| path_of(i)).collect(),
        val_score: merged.score,
        output: cfg.output.display().to_string(),
        model: model_path.display().to_string(),
        validation: cfg.val.display().to_string(),
        validation_rows: rows,
        batch_size,
        evaluations,
        onnxruntime: rt.library.display().to_string(),
        skipped: found
            .skipped
            .iter()
            .map(|(p, r)| Skipped {
                path: p.display().to_string(),
                reason: r.clone(),
            })
            .collect(),
    };
    let candidate = merged.candidate();
    let tensors: Vec<TensorOut<'_>> = set
        .specs()
        .iter()
        .enumerate()
        .map(|(t, spec)| TensorOut {
            name: &spec.name,
            dtype: spec.dtype,
            shape: &spec.shape,
            data: candidate.tensor_bytes(&set, t),
        })
        .collect();
    let format = set.checkpoints()[0]
        .metadata()
        .get("format")
        .map(String::as_str);
    write_safetensors(&cfg.output, &tensors, &report.metadata(format))?;
    if let Some(r) = &cfg.report {
        report.write(r)?;
    }

    let member_names: Vec<&str> = merged.members.iter().map(|&i| names[i].as_str()).collect();
    say(&format!(
        "result: {} member{} ({}), validation {} {}; {} candidates scored",
        merged.members.len(),
        if merged.members.len() == 1 { "" } else { "s" },
        member_names.join(", "),
        metric.name(),
        reporting::format_score(merged.score),
        evaluations
    ));
    say(&format!("wrote {}", cfg.output.display()));
    if let Some(r) = &cfg.report {
        say(&format!("wrote {}", r.display()));
    }
    Ok(report)
}

/// Refuses an output (or report) path that is one of the inputs.
fn check_output_is_new(cfg: &MergeConfig, set: &CheckpointSet, model: &Path) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let mut inputs: Vec<PathBuf> = vec![model.to_path_buf(), cfg.val.clone()];
    inputs.extend(cfg.filter.clone());
    let data_file = model.with_extension("onnx.data");
    inputs.push(data_file);
    for c in set.checkpoints() {
        inputs.push(c.path().to_path_buf());
        inputs.extend(c.files().map(Path::to_path_buf));
        if let crate::storage::CheckpointSource::Sharded { index } = c.source() {
            inputs.push(index.clone());
        }
    }
    let input_canon: Vec<PathBuf> = inputs.iter().filter_map(|p| canon(p)).collect();
    let mut outputs = vec![("output", &cfg.output)];
    if let Some(r) = &cfg.report {
        outputs.push(("report", r));
    }
    for (what, out) in outputs {
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
        if let Some(c) = canon(out).or_else(|| normalized(out)) {
            if input_canon.contains(&c) {
                return Err(Error::Output {
                    path: out.clone(),
                    message: format!(
                        "the {what} path is one of the inputs; refusing to overwrite it"
                    ),
                });
            }
            if what == "output" && c.is_dir() {
                return Err(Error::Output {
                    path: out.clone(),
                    message: "is a directory; give a file name such as merged.safetensors".into(),
                });
            }
        }
    }
    if let Some(r) = &cfg.report {
        if normalized(r) == normalized(&cfg.output) {
            return Err(Error::Usage("--report and -o name the same file".into()));
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
