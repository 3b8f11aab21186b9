//! The command line: flag definitions (clap) and their translation into a
//! [`MergeConfig`]. The binary only calls [`main`].
//!
//! The flags' doc comments are also their `--help` text, which writes placeholders as
//! `<STRATEGY>`; rustdoc would take those for HTML tags.
#![allow(rustdoc::invalid_html_tags)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser};

use crate::pipeline::{self, Baseline, Destination, MergeConfig};
use crate::strategies::{StrategyParams, ALL};

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code when the tool or ONNX Runtime failed on inputs that passed every check.
pub const EXIT_INTERNAL: u8 = 1;
/// Exit code for bad input: usage errors, unreadable or inconsistent files, mismatched model.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code when `--fail-below` or `--require-gain` failed (the outputs are written).
pub const EXIT_GATE: u8 = 3;

/// Merge per-epoch training checkpoints into one model with Adaptive Stochastic Weight
/// Averaging (ASWA), scoring every candidate on a validation set with ONNX Runtime.
///
/// The checkpoints (safetensors, tensor names = PyTorch state_dict keys) are walked in
/// order. The first starts the ensemble. For each next one, the checkpoint and the
/// look-ahead average (ensemble + checkpoint) are scored: if the checkpoint beats both,
/// the ensemble restarts from it (hard update); else if the look-ahead beats the
/// ensemble, the checkpoint joins it (soft update); else it is rejected. The final
/// ensemble is written as safetensors with the checkpoints' names, shapes and dtypes.
/// Other strategies (--strategy) and `aswa-merge compare` are there to compare.
///
/// Example: aswa-merge ./checkpoints --model model.onnx --val val.npz -o merged.safetensors
///
/// Exit codes: 0 success, 1 ONNX Runtime failed, 2 bad input, 3 a CI gate failed.
#[derive(Debug, Parser)]
#[command(
    name = "aswa-merge",
    version,
    about,
    long_about,
    help_expected = true,
    max_term_width = 100,
    after_help = "Compare every strategy on the same checkpoints: aswa-merge compare --help"
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
}

/// Run every strategy (or --strategies) on the same checkpoints and compare them.
///
/// Prints a table (strategy, members, validation score, test score with --test, seconds),
/// writes every result to DIR/<strategy>.safetensors with -o DIR, or only the winner on
/// validation with --pick -o FILE. Scores are shared: no candidate is scored twice.
///
/// Example: aswa-merge compare ./checkpoints --val val.npz --test test.npz -o merged/
/// --report compare.json --plot compare.svg
///
/// Exit codes: 0 success, 1 ONNX Runtime failed, 2 bad input, 3 a CI gate failed.
#[derive(Debug, Parser)]
#[command(
    name = "aswa-merge compare",
    bin_name = "aswa-merge compare",
    version,
    about,
    long_about,
    help_expected = true,
    max_term_width = 100
)]
pub struct CompareCli {
    #[command(flatten)]
    pub args: CompareArgs,
}

/// The main command's own flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where to write the merged weights (safetensors, written atomically).
    ///
    /// Refuses to overwrite any input. Example: -o merged.safetensors
    ///
    /// Default: <STRATEGY>.safetensors in the current directory (aswa.safetensors).
    #[arg(short = 'o', long = "output", value_name = "OUT.safetensors")]
    pub output: Option<PathBuf>,

    /// Averaging strategy: aswa, swa, uniform, ema, top-k, greedy-soup, best, last.
    ///
    /// See docs/strategies.md for each rule. Example: --strategy swa --swa-start 0.5
    #[arg(long, value_name = "NAME", default_value = "aswa")]
    pub strategy: String,
}

/// `compare`'s own flags.
#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Strategies to compare, comma-separated (default: all).
    ///
    /// Example: --strategies aswa,swa,best,last
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub strategies: Vec<String>,

    /// A directory for every result (DIR/<strategy>.safetensors), or with --pick the file
    /// for the winner. Without it no weights are written.
    #[arg(short = 'o', long = "output", value_name = "DIR|FILE")]
    pub output: Option<PathBuf>,

    /// Write only the winner on validation, to -o FILE.
    #[arg(long, requires = "output")]
    pub pick: bool,
}

/// Flags shared by the main command and `compare`.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Directory holding the checkpoints.
    ///
    /// Every `*.safetensors` file in it, and every sub-folder holding `model.safetensors`
    /// or a sharded `model.safetensors.index.json` (Hugging Face `checkpoint-500/`), is a
    /// checkpoint. They are processed in the order of the last number in their names
    /// (epoch_2 before epoch_10), ties by name. Files written by aswa-merge are skipped.
    #[arg(value_name = "CHECKPOINTS")]
    pub checkpoints: PathBuf,

    /// Validation set: a numpy .npz (np.savez or np.savez_compressed).
    ///
    /// A model with one input takes array `x` (or the array named like the input);
    /// labels are array `y`. Example: --val data/val.npz
    #[arg(long, value_name = "VAL.npz")]
    pub val: PathBuf,

    /// ONNX model holding the architecture; its weights are replaced by each candidate's.
    ///
    /// Export it with `torch.onnx.export(model, args, "model.onnx", dynamo=True,
    /// optimize=False)` so that initializer names are the state_dict keys. An external
    /// data file (model.onnx.data) beside it is read. Default: the single *.onnx file in
    /// CHECKPOINTS or its parent.
    #[arg(long, value_name = "MODEL.onnx")]
    pub model: Option<PathBuf>,

    /// Also write a JSON report: every step's scores and decision, the members, the score.
    ///
    /// Example: --report aswa-report.json (format in docs/report.md)
    #[arg(long, value_name = "REPORT.json")]
    pub report: Option<PathBuf>,

    /// Validation metric.
    ///
    /// accuracy (default for integer labels; arg-max ties go to the lowest index), top-K
    /// (e.g. top-5), cross-entropy (from logits), mse (default for float labels), mae,
    /// mrr and hits@K (models that score every candidate, e.g. knowledge-graph
    /// embeddings; realistic rank), output:NAME (a graph output that already is a score,
    /// averaged over rows). Losses and errors are better when lower.
    #[arg(long, value_name = "METRIC")]
    pub metric: Option<String>,

    /// Treat lower scores as better (for --metric output:NAME holding a loss).
    #[arg(long, conflicts_with = "higher_is_better")]
    pub lower_is_better: bool,

    /// Treat higher scores as better (the default for accuracy-like metrics).
    #[arg(long)]
    pub higher_is_better: bool,

    /// Name of the labels array in the validation .npz (default: y).
    #[arg(long, value_name = "ARRAY")]
    pub labels: Option<String>,

    /// Feed array ARRAY of the .npz to model input ONNX_INPUT; repeat for several inputs.
    ///
    /// Inputs not mapped take the array of the same name. Example: --input h=heads
    /// --input r=relations
    #[arg(long = "input", value_name = "ONNX_INPUT=ARRAY", value_parser = parse_pair)]
    pub inputs: Vec<(String, String)>,

    /// Graph output the metric reads (default: the model's first output).
    #[arg(long = "output-name", value_name = "NAME")]
    pub output_name: Option<String>,

    /// Filtered ranking for mrr/hits@K: an .npz with CSR arrays `indptr` (rows + 1) and
    /// `indices` listing, per validation row, the other true candidates to leave out.
    #[arg(long, value_name = "FILTER.npz")]
    pub filter: Option<PathBuf>,

    /// Test set (.npz, same arrays as --val): the result and the last checkpoint are
    /// scored on it and reported. Validation decides; test only reports.
    #[arg(long, value_name = "TEST.npz")]
    pub test: Option<PathBuf>,

    /// Filter for ranking metrics on the test set (same format as --filter).
    #[arg(long, value_name = "FILTER.npz")]
    pub test_filter: Option<PathBuf>,

    /// Validation rows per forward pass (a model with a fixed batch size uses its own,
    /// padding the last batch).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,

    /// Keep only checkpoints whose name (file or folder name) matches this pattern.
    ///
    /// Example: --glob 'epoch_*.safetensors' or --glob 'checkpoint-*'
    #[arg(long, value_name = "PATTERN")]
    pub glob: Option<String>,

    /// ASWA: accept a soft update whose look-ahead score equals the ensemble's
    /// (default: strict).
    #[arg(long)]
    pub accept_ties: bool,

    /// ASWA: how look-aheads are formed. keep = a float64 running sum of the ensemble's
    /// members (8 bytes per parameter, 4× an f16 model; each step reads one checkpoint);
    /// reread = no sum: each look-ahead re-reads every member (memory: the ensemble and the
    /// look-ahead in the checkpoints' dtype; time grows with the ensemble); auto = keep
    /// unless the sum and the ensemble's buffers would take more than half of the available
    /// memory (a container's limit counted). Both give the same bits.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub aswa_sum: crate::strategies::SumMode,

    /// SWA: first member at index floor(F · N) of the N checkpoints (default 0.75).
    #[arg(long, value_name = "F", default_value_t = 0.75)]
    pub swa_start: f64,

    /// SWA: first member is the checkpoint with this number in its name (overrides --swa-start).
    #[arg(long, value_name = "NUMBER")]
    pub swa_start_at: Option<u64>,

    /// SWA: take every K-th checkpoint from the start (default 1).
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub swa_every: u64,

    /// uniform: average only the last K checkpoints (default: all).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub last: Option<u64>,

    /// ema: decay D in e = D·e + (1 − D)·θ, the first checkpoint copied (default 0.9).
    #[arg(long, value_name = "D", default_value_t = 0.9)]
    pub ema_decay: f64,

    /// top-k: how many of the best checkpoints to average (default 5).
    #[arg(long, value_name = "K", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub k: u64,

    /// greedy-soup: add a checkpoint only if it strictly improves the soup (default: ≥).
    #[arg(long)]
    pub strict: bool,

    /// Model initializer that is a true constant, not a trained weight; repeatable.
    ///
    /// Without it every non-scalar floating initializer must come from the checkpoints.
    #[arg(long = "allow-constant", value_name = "NAME")]
    pub allow_constant: Vec<String>,

    /// Draw the run: the checkpoint and ensemble scores per step (ASWA), and for compare
    /// a bar chart of the strategies. The format follows the extension: .svg or .png.
    #[arg(long, value_name = "FILE.svg|FILE.png")]
    pub plot: Option<PathBuf>,

    /// Also write the ONNX model with the result's weights embedded as initializers (the
    /// graph unchanged), ready for ONNX Runtime. Models over 2 GB get FILE.onnx.data.
    #[arg(long, value_name = "FILE.onnx")]
    pub export_onnx: Option<PathBuf>,

    /// Split the output into shards of at most SIZE (e.g. 5GB, 500MB, 2GiB) with a
    /// Hugging Face style index (NAME-00001-of-0000N.safetensors + NAME.safetensors.index.json).
    /// An output that fits in one shard stays a single file.
    #[arg(long, value_name = "SIZE", value_parser = crate::storage::writer::parse_size)]
    pub shard_size: Option<u64>,

    /// CI gate: exit 3 when the result's validation score is worse than SCORE (the output
    /// is still written; the report says why).
    #[arg(long, value_name = "SCORE")]
    pub fail_below: Option<f64>,

    /// CI gate: exit 3 unless the result beats this baseline on validation: last, best
    /// or swa.
    #[arg(long, value_name = "BASELINE")]
    pub require_gain: Option<Baseline>,

    /// Threads for averaging and for ONNX Runtime (default: all cores). The output is
    /// bit-identical whatever the thread count. ONNX Runtime's threads sleep between forward
    /// passes, leaving the cores to the tool's own work there; given N at most half the
    /// cores, they spin instead (each pool then has its own cores).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,

    /// Where ONNX Runtime runs the model: cpu, cuda, cuda:N, or auto (CUDA when the
    /// loaded ONNX Runtime can use it, else the CPU, saying why). cuda fails with the
    /// missing pieces named when it is not usable; it never silently runs on the CPU.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: crate::scoring::Device,

    /// How each candidate's weights reach ONNX Runtime: on = bound once per candidate
    /// (an IoBinding; on a GPU they are uploaded once, and only the validation batches
    /// stream), off = passed with every batch (on a GPU: uploaded with every batch), auto =
    /// on for GPUs, off on the CPU, where weights passed with a batch are read in place and
    /// binding would cost a copy per candidate. The scores are the same either way.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub io_binding: crate::scoring::IoBindingMode,

    /// How the model receives each candidate's weights: inputs = the weights become graph
    /// inputs and one ONNX Runtime session scores every candidate; constants = a session
    /// is built per candidate with its weights as the model's constants, which costs a
    /// session build per candidate but lets ONNX Runtime fuse Conv with BatchNormalization
    /// and pre-pack convolution weights (on the CPU, convolutional models' forward passes
    /// take about half as long); auto = constants on the CPU for convolutional models (a
    /// convolution reading checkpoint weights feeds a BatchNormalization, or such
    /// convolutions are at least as many as the matrix products reading checkpoint weights;
    /// not with --io-binding on), inputs otherwise. Scores can differ in the last digits
    /// between the two (fused arithmetic); each is repeatable.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub weights_as: crate::scoring::WeightsMode,

    /// Path of libonnxruntime.so. Default: ORT_DYLIB_PATH, then the onnxruntime package of
    /// python3, then the system library path.
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,

    /// Leave out checkpoints that cannot be read or disagree with the others (a training
    /// job may still be writing the newest one), with a warning and a note in the report,
    /// instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,

    /// Recompute every BatchNorm's running mean and variance of every scored candidate
    /// and of the output on this calibration set (same input arrays as --val, e.g. a
    /// sample of training data), as torch.optim.swa_utils.update_bn does. Needs a model
    /// that kept its BatchNormalization nodes (export with optimize=False).
    #[arg(long, value_name = "CALIB.npz")]
    pub recalibrate_bn: Option<PathBuf>,

    /// Rows per calibration batch for --recalibrate-bn (BatchNorm statistics depend on it;
    /// use the training batch size).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub calib_batch_size: u64,

    /// With --recalibrate-bn: also score every result without recalibration, to see the
    /// difference (a column of compare's table, `val_score_without_bn` in the report).
    #[arg(long)]
    pub also_without_bn: bool,

    /// Check everything and print the plan (checkpoints in order, tensors, bytes to read,
    /// predicted peak memory) without scoring or writing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(format!("expected ONNX_INPUT=ARRAY, got `{s}`")),
    }
}

impl CommonArgs {
    fn config(
        &self,
        strategies: Vec<String>,
        destination: Destination,
        compare: bool,
    ) -> MergeConfig {
        MergeConfig {
            checkpoints: self.checkpoints.clone(),
            model: self.model.clone(),
            val: self.val.clone(),
            destination,
            report: self.report.clone(),
            metric: self.metric.clone(),
            higher_is_better: if self.lower_is_better {
                Some(false)
            } else if self.higher_is_better {
                Some(true)
            } else {
                None
            },
            labels: self.labels.clone(),
            inputs: self.inputs.clone(),
            output_name: self.output_name.clone(),
            filter: self.filter.clone(),
            batch_size: self.batch_size as usize,
            glob: self.glob.clone(),
            allow_constant: self.allow_constant.clone(),
            threads: self.threads,
            ort_lib: self.ort_lib.clone(),
            quiet: self.quiet,
            strategies,
            params: StrategyParams {
                accept_ties: self.accept_ties,
                aswa_sum: self.aswa_sum,
                swa_start: self.swa_start,
                swa_start_at: self.swa_start_at,
                swa_every: self.swa_every as usize,
                last: self.last.map(|k| k as usize),
                ema_decay: self.ema_decay,
                k: self.k as usize,
                strict: self.strict,
            },
            compare,
            test: self.test.clone(),
            test_filter: self.test_filter.clone(),
            plot: self.plot.clone(),
            export_onnx: self.export_onnx.clone(),
            shard_size: self.shard_size,
            dry_run: self.dry_run,
            device: self.device,
            io_binding: self.io_binding,
            weights_as: self.weights_as,
            skip_invalid: self.skip_invalid,
            recalibrate_bn: self.recalibrate_bn.clone(),
            calib_batch_size: self.calib_batch_size as usize,
            also_without_bn: self.also_without_bn,
            fail_below: self.fail_below,
            require_gain: self.require_gain,
        }
    }
}

impl Cli {
    /// The run configuration these flags describe.
    pub fn config(&self) -> MergeConfig {
        self.run.common.config(
            vec![self.run.strategy.clone()],
            Destination::File(
                self.run
                    .output
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("{}.safetensors", self.run.strategy))),
            ),
            false,
        )
    }
}

impl CompareCli {
    /// The run configuration these flags describe.
    pub fn config(&self) -> MergeConfig {
        let c = &self.args;
        let strategies = if c.strategies.is_empty() {
            ALL.iter().map(|s| s.to_string()).collect()
        } else {
            c.strategies.clone()
        };
        let destination = match (&c.output, c.pick) {
            (Some(f), true) => Destination::File(f.clone()),
            (Some(d), false) => Destination::Dir(d.clone()),
            (None, _) => Destination::Nowhere,
        };
        c.common.config(strategies, destination, true)
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remove the files being written and exit with 128 + the
/// signal number, so an interrupted run leaves every output path as it was.
fn remove_pending_on_interrupt() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
    // A file-size limit (`ulimit -f`) would kill the process with SIGXFSZ in the middle
    // of a write; with a handler installed the write fails with EFBIG instead, and the
    // usual error path removes the temporary file.
    let _ = signal_hook::flag::register(
        SIGXFSZ,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                crate::storage::pending::remove_all();
                eprintln!("interrupted (signal {sig}): the files being written were removed");
                // Exit without running destructors: ONNX Runtime may be mid-run on the
                // main thread, and tearing it down under it only adds noise.
                signal_hook::low_level::exit(128 + sig);
            }
        });
    }
}

/// A checkpoint truncated by another process while it is memory-mapped makes the next
/// read of the missing pages raise SIGBUS. Instead of dying with "Bus error", remove the
/// files being written, say what happened and exit with the bad-input code. (Only
/// async-signal-safe calls here.)
fn explain_sigbus() {
    const MSG: &[u8] =
        b"error: a checkpoint file was truncated or rewritten in place while it was being read \
(SIGBUS); rerun when it is complete. The output path was not written.\n";
    // SAFETY: the handler only calls unlink(2) (through pending::remove_all, which takes
    // no lock and does not allocate), write(2) and _exit(2): all async-signal-safe.
    let _ = unsafe {
        signal_hook::low_level::register(signal_hook::consts::SIGBUS, || {
            crate::storage::pending::remove_all();
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            signal_hook::low_level::exit(i32::from(EXIT_BAD_INPUT));
        })
    };
}

/// Parses the command line, runs, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    remove_pending_on_interrupt();
    explain_sigbus();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config = if args.get(1).is_some_and(|a| a == "compare") {
        args.remove(1);
        CompareCli::parse_from(args).config()
    } else {
        Cli::parse_from(args).config()
    };
    if config.threads > 0 {
        // Only fails if a global pool exists already, which cannot happen this early.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .build_global();
    }
    if config.dry_run {
        return match pipeline::plan(&config) {
            Ok(_) => ExitCode::from(EXIT_OK),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(if e.is_user_error() {
                    EXIT_BAD_INPUT
                } else {
                    EXIT_INTERNAL
                })
            }
        };
    }
    match pipeline::run(&config) {
        Ok(outcome) if outcome.gate_passed => ExitCode::from(EXIT_OK),
        Ok(_) => ExitCode::from(EXIT_GATE),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_user_error() {
                EXIT_BAD_INPUT
            } else {
                EXIT_INTERNAL
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
        CompareCli::command().debug_assert();
    }

    #[test]
    fn input_pairs_parse() {
        assert_eq!(parse_pair("h=heads").unwrap(), ("h".into(), "heads".into()));
        assert!(parse_pair("h").is_err());
        assert!(parse_pair("=x").is_err());
    }
}
