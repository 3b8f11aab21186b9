//! The progress bar: drawn on stderr when it is a terminal, hidden otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over `total` scoring passes, or a hidden one when `quiet` or when
/// stderr is not a terminal (indicatif hides its stderr target in that case).
pub fn bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} scoring [{bar:30}] {pos}/{len} candidates {elapsed}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Prints a line to stderr without tearing the bar (works whether or not it is drawn).
pub fn println(pb: &ProgressBar, quiet: bool, line: &str) {
    if !quiet {
        pb.suspend(|| eprintln!("{line}"));
    }
}
