//! Charts of a run, as SVG or PNG: ASWA's walk over the checkpoints, and a comparison
//! of strategies. Text uses the embedded DejaVu Sans, so no system font is needed.
//!
//! Files are written atomically (a temporary file in the destination directory,
//! renamed over the path), so a failed plot never leaves a partial file behind.

use std::io::Write;
use std::path::Path;
use std::sync::Once;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::full_palette::{
    BLUE_700, DEEPORANGE_700, GREEN_700, GREY_500, GREY_600, GREY_800, INDIGO_400, ORANGE_300,
    RED_700,
};
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::strategies::Decision;

/// One checkpoint's step of a strategy that walks checkpoints (ASWA).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPoint<'a> {
    pub label: &'a str,
    pub running: f64,
    pub ensemble: f64,
    pub decision: Decision,
}

/// One strategy's result for the comparison chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar<'a> {
    pub label: &'a str,
    pub val: f64,
    pub test: Option<f64>,
}

/// Line chart: x = checkpoint (labels along the axis, thinned if many), y = metric;
/// series 1 "checkpoint score" (the running model's score per checkpoint),
/// series 2 "ensemble score" (after each step) with markers by decision:
/// hard = filled triangle, soft = filled circle, reject = cross, init = square; a legend
/// explaining the series and the markers; axis titles ("checkpoint", the metric name,
/// with "(higher is better)"/"(lower is better)"); a title. NaN points are skipped.
pub fn plot_steps(
    path: &Path,
    metric: &str,
    higher_is_better: bool,
    steps: &[StepPoint<'_>],
) -> Result<()> {
    let chart = Chart {
        metric,
        higher_is_better,
        bars: None,
        steps: Some(steps),
    };
    write_chart(path, STEPS_SIZE, &chart)
}

/// Bar chart of strategies: one bar per strategy (validation score), a second bar per
/// strategy for test when given, value labels on bars, axis titles, legend, title.
/// When `steps` is given, draw the steps chart above the bars in the same image.
pub fn plot_strategies(
    path: &Path,
    metric: &str,
    higher_is_better: bool,
    bars: &[Bar<'_>],
    steps: Option<&[StepPoint<'_>]>,
) -> Result<()> {
    let size = if steps.is_some() {
        BOTH_SIZE
    } else {
        BARS_SIZE
    };
    let chart = Chart {
        metric,
        higher_is_better,
        bars: Some(bars),
        steps,
    };
    write_chart(path, size, &chart)
}

const FAMILY: &str = "sans-serif";
const STEPS_SIZE: (u32, u32) = (1000, 600);
const BARS_SIZE: (u32, u32) = (1000, 600);
const BOTH_SIZE: (u32, u32) = (1000, 1100);
/// Height of the steps chart when it sits above the bars.
const STEPS_HEIGHT_IN_BOTH: u32 = 500;

const TITLE_HEIGHT: u32 = 40;
const LEGEND_HEIGHT: u32 = 30;
const Y_LABEL_AREA: u32 = 80;
const X_LABEL_AREA: u32 = 56;
const MARGIN: u32 = 12;
const MARGIN_RIGHT: u32 = 30;
/// Labels longer than this many characters are shortened in the middle.
const MAX_LABEL_CHARS: usize = 22;
/// Font size of value labels written upwards (bars too narrow for them).
const VERTICAL_VALUE_SIZE: u32 = 12;

const RUNNING_COLOR: RGBColor = GREY_500;
const ENSEMBLE_COLOR: RGBColor = DEEPORANGE_700;
const VAL_COLOR: RGBColor = INDIGO_400;
const TEST_COLOR: RGBColor = ORANGE_300;

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Registers the embedded DejaVu Sans as plotters' "sans-serif" (once per process).
fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        // A failure only means text is missing; drawing then reports a font error.
        let _ = plotters::style::register_font(
            FAMILY,
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font(
            FAMILY,
            plotters::style::FontStyle::Bold,
            dejavu::sans::bold(),
        );
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Svg,
    Png,
}

impl Format {
    fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(Error::Usage(format!(
                "cannot plot to {}: the file name must end in .svg or .png",
                path.display()
            ))),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Format::Svg => ".svg",
            Format::Png => ".png",
        }
    }
}

/// What one image shows: the steps, the bars, or both (steps above bars).
struct Chart<'s, 'a> {
    metric: &'s str,
    higher_is_better: bool,
    bars: Option<&'s [Bar<'a>]>,
    steps: Option<&'s [StepPoint<'a>]>,
}

impl Chart<'_, '_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        match (self.steps, self.bars) {
            (Some(steps), Some(bars)) => {
                let (top, bottom) = root.split_vertically(STEPS_HEIGHT_IN_BOTH);
                draw_steps(&top, self.metric, self.higher_is_better, steps)?;
                draw_bars(&bottom, self.metric, self.higher_is_better, bars)
            }
            (Some(steps), None) => draw_steps(root, self.metric, self.higher_is_better, steps),
            (None, Some(bars)) => draw_bars(root, self.metric, self.higher_is_better, bars),
            (None, None) => Ok(()),
        }
    }
}

/// Renders `chart` into a temporary file next to `path`, then renames it over `path`.
fn write_chart(path: &Path, size: (u32, u32), chart: &Chart<'_, '_>) -> Result<()> {
    let format = Format::of(path)?;
    register_fonts();
    let out_err = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let draw_err = |e: Box<dyn std::error::Error>| out_err(format!("cannot draw the chart: {e}"));
    // plotters picks the image format from the backend, the image crate from the name:
    // keep the extension on the temporary file.
    crate::storage::writer::atomic_write_with(path, format.suffix(), |tmp| {
        match format {
            Format::Svg => {
                let mut svg = String::new();
                {
                    let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                    chart.draw(&root).map_err(draw_err)?;
                    root.present()
                        .map_err(|e| out_err(format!("cannot render the SVG: {e}")))?;
                }
                let mut file = tmp.as_file();
                file.write_all(svg.as_bytes())
                    .and_then(|_| file.flush())
                    .map_err(|e| out_err(format!("write failed: {e}")))?;
            }
            Format::Png => {
                let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
                chart.draw(&root).map_err(draw_err)?;
                root.present()
                    .map_err(|e| out_err(format!("cannot write the PNG: {e}")))?;
            }
        }
        Ok(())
    })
}

/// The y range of a chart: the finite values' span, widened by `below`/`above` times
/// the span (a flat span gets a width of 10% of the value, or 1 around zero). `None`
/// when nothing is finite or the values span more than an `f64` can hold.
fn y_range(values: impl IntoIterator<Item = f64>, below: f64, above: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    let usable = |a: f64, b: f64| b > a && (b - a).is_finite();
    let span = hi - lo;
    if !span.is_finite() {
        // Too wide to map onto pixels.
        return None;
    }
    if span <= hi.abs().max(lo.abs()) * 1e-12 {
        // Flat: pad around the value.
        let mid = lo / 2.0 + hi / 2.0;
        let half = if mid != 0.0 { mid.abs() * 0.05 } else { 0.5 };
        return usable(mid - half, mid + half).then_some((mid - half, mid + half));
    }
    let (a, b) = (lo - span * below, hi + span * above);
    Some(if usable(a, b) { (a, b) } else { (lo, hi) })
}

/// Decimals that tell apart values `span` apart (`extra` more than the span's order).
fn decimals(span: f64, extra: i32) -> usize {
    if !(span.is_finite() && span > 0.0) {
        return 2;
    }
    let d = (-span.log10()).ceil() as i32 + extra;
    d.clamp(0, 8) as usize
}

/// A label as shown: ".safetensors" dropped, long names shortened in the middle.
fn short_label(label: &str) -> String {
    let label = label.strip_suffix(".safetensors").unwrap_or(label);
    let chars: Vec<char> = label.chars().collect();
    if chars.len() <= MAX_LABEL_CHARS {
        return label.to_string();
    }
    let head = (MAX_LABEL_CHARS - 1) / 2;
    let tail = MAX_LABEL_CHARS - 1 - head;
    let mut s: String = chars[..head].iter().collect();
    s.push('…');
    s.extend(&chars[chars.len() - tail..]);
    s
}

/// `label` cut (with "…") until it is at most `max_w` pixels wide in `font`.
fn fit_label(font: &FontDesc<'_>, label: &str, max_w: u32) -> String {
    if text_width(font, label) <= max_w {
        return label.to_string();
    }
    let mut chars: Vec<char> = label.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().chain(std::iter::once(&'…')).collect();
        if text_width(font, &s) <= max_w {
            return s;
        }
    }
    String::new()
}

fn text_width(font: &FontDesc<'_>, text: &str) -> u32 {
    font.box_size(text).map(|(w, _)| w).unwrap_or(0)
}

fn font(size: u32) -> FontDesc<'static> {
    font_in(size, FontStyle::Normal)
}

/// A font of the given style (`FontDesc::style` would keep the regular glyphs).
fn font_in(size: u32, style: FontStyle) -> FontDesc<'static> {
    FontDesc::new(FAMILY.into(), size.into(), style)
}

fn direction(higher_is_better: bool) -> &'static str {
    if higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    }
}

/// Splits `points` into runs of consecutive finite values (NaN breaks a line).
fn finite_runs(points: impl IntoIterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut run = Vec::new();
    for (x, y) in points {
        if y.is_finite() {
            run.push((x, y));
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// An x axis of `n` slots centred on 0, 1, …, n-1, labelled only at `keys`.
struct Slots {
    inner: RangedCoordf64,
    keys: Vec<f64>,
}

impl Slots {
    fn new(n: usize, keys: Vec<f64>) -> Self {
        Self {
            inner: (-0.5..n.max(1) as f64 - 0.5).into(),
            keys,
        }
    }
}

impl Ranged for Slots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// Draws the title, centred, on `area`.
fn draw_title<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let style = font_in(22, FontStyle::Bold)
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let title = fit_label(&font_in(22, FontStyle::Bold), title, w.saturating_sub(20));
    area.draw(&Text::new(
        title,
        ((w / 2) as i32, (h / 2 + 4) as i32),
        style,
    ))?;
    Ok(())
}

/// What stands before a legend entry's text.
#[derive(Clone, Copy)]
enum Swatch {
    Line(RGBColor, bool),
    Marker(Decision),
    Block(RGBColor),
}

/// Draws a one-row legend, centred, on `area`.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    items: &[(Swatch, &str)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    const SWATCH: i32 = 26;
    const GAP: i32 = 26;
    let (w, h) = area.dim_in_pixel();
    let f = font(15);
    let widths: Vec<i32> = items
        .iter()
        .map(|(_, t)| text_width(&f, t) as i32)
        .collect();
    let total: i32 = widths.iter().map(|tw| SWATCH + 6 + tw).sum::<i32>()
        + GAP * (items.len() as i32 - 1).max(0);
    let mut x = ((w as i32 - total) / 2).max(4);
    let y = (h / 2) as i32;
    let text_style = f.color(&GREY_800).pos(Pos::new(HPos::Left, VPos::Center));
    for ((swatch, label), tw) in items.iter().zip(&widths) {
        let c = (x + SWATCH / 2, y);
        match *swatch {
            Swatch::Line(color, dots) => {
                area.draw(&PathElement::new(
                    vec![(x, y), (x + SWATCH, y)],
                    color.stroke_width(if dots { 2 } else { 3 }),
                ))?;
                if dots {
                    area.draw(&Circle::new(c, 3, color.filled()))?;
                }
            }
            Swatch::Marker(d) => draw_marker(area, c, d)?,
            Swatch::Block(color) => {
                area.draw(&Rectangle::new(
                    [(x + 3, y - 7), (x + SWATCH - 3, y + 7)],
                    color.filled(),
                ))?;
            }
        }
        area.draw(&Text::new(
            label.to_string(),
            (x + SWATCH + 6, y),
            text_style.clone(),
        ))?;
        x += SWATCH + 6 + tw + GAP;
    }
    Ok(())
}

fn decision_color(d: Decision) -> RGBColor {
    match d {
        Decision::Init => GREY_800,
        Decision::Hard => GREEN_700,
        Decision::Soft => BLUE_700,
        Decision::Reject => RED_700,
    }
}

/// Draws the marker of decision `d` centred at `at` (any coordinate system).
fn draw_marker<DB, CT>(area: &DrawingArea<DB, CT>, at: CT::From, d: Decision) -> DrawResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    CT: CoordTranslate,
    CT::From: Clone,
{
    let color = decision_color(d);
    match d {
        Decision::Hard => {
            area.draw(&(EmptyElement::at(at) + TriangleMarker::new((0, -1), 8, color.filled())))?
        }
        Decision::Soft => {
            area.draw(&(EmptyElement::at(at) + Circle::new((0, 0), 5, color.filled())))?
        }
        Decision::Reject => {
            area.draw(&(EmptyElement::at(at) + Cross::new((0, 0), 5, color.stroke_width(2))))?
        }
        Decision::Init => {
            area.draw(&(EmptyElement::at(at) + Rectangle::new([(-5, -5), (5, 5)], color.filled())))?
        }
    }
    Ok(())
}

/// Draws a centred note on an otherwise empty plot.
fn draw_note<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, note: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let style = font(16)
        .color(&GREY_600)
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(
        note.to_string(),
        ((w / 2) as i32, (h / 2) as i32),
        style,
    ))?;
    Ok(())
}

fn draw_steps<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    metric: &str,
    higher_is_better: bool,
    steps: &[StepPoint<'_>],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (title_area, rest) = area.split_vertically(TITLE_HEIGHT);
    let (legend_area, plot_area) = rest.split_vertically(LEGEND_HEIGHT);
    draw_title(
        &title_area,
        &format!(
            "ASWA over the checkpoints: {metric} ({})",
            direction(higher_is_better)
        ),
    )?;
    draw_legend(
        &legend_area,
        &[
            (Swatch::Line(RUNNING_COLOR, true), "checkpoint score"),
            (Swatch::Line(ENSEMBLE_COLOR, false), "ensemble score"),
            (Swatch::Marker(Decision::Init), "init"),
            (Swatch::Marker(Decision::Hard), "hard update"),
            (Swatch::Marker(Decision::Soft), "soft update"),
            (Swatch::Marker(Decision::Reject), "rejected"),
        ],
    )?;

    let n = steps.len().max(1);
    let range = y_range(
        steps.iter().flat_map(|s| [s.running, s.ensemble]),
        0.05,
        0.05,
    );
    let (ylo, yhi) = range.unwrap_or((0.0, 1.0));
    let y_dec = decimals((yhi - ylo) / 10.0, 0);

    // Thin the checkpoint labels so that they never touch.
    let labels: Vec<String> = steps.iter().map(|s| short_label(s.label)).collect();
    let label_font = font(14);
    let (w, _) = plot_area.dim_in_pixel();
    let plot_w = w
        .saturating_sub(Y_LABEL_AREA + MARGIN + MARGIN_RIGHT)
        .max(1) as f64;
    let widest = labels
        .iter()
        .map(|l| text_width(&label_font, l))
        .max()
        .unwrap_or(0) as f64;
    let every = ((widest + 16.0) * n as f64 / plot_w).ceil().max(1.0) as usize;
    let keys: Vec<f64> = (0..steps.len()).step_by(every).map(|i| i as f64).collect();
    let label_at = |x: &f64| {
        let i = x.round();
        if i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };

    let mut chart = ChartBuilder::on(&plot_area)
        .margin(MARGIN)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(Slots::new(n, keys), ylo..yhi)?;
    chart
        .configure_mesh()
        .x_label_formatter(&label_at)
        .y_label_formatter(&|y| format!("{y:.y_dec$}"))
        .x_desc("checkpoint")
        .y_desc(format!("{metric} ({})", direction(higher_is_better)))
        .label_style(label_font.color(&GREY_800))
        .axis_desc_style(font(15).color(&BLACK))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(242, 242, 242))
        .max_light_lines(1)
        .draw()?;

    if range.is_none() {
        draw_note(
            &chart.plotting_area().strip_coord_spec(),
            "nothing to plot: no finite scores",
        )?;
        return Ok(());
    }

    let xs = || (0..steps.len()).map(|i| i as f64);
    for run in finite_runs(xs().zip(steps.iter().map(|s| s.running))) {
        chart.draw_series(LineSeries::new(run, RUNNING_COLOR.stroke_width(2)))?;
    }
    chart.draw_series(
        xs().zip(steps)
            .filter(|(_, s)| s.running.is_finite())
            .map(|(x, s)| Circle::new((x, s.running), 3, RUNNING_COLOR.filled())),
    )?;
    for run in finite_runs(xs().zip(steps.iter().map(|s| s.ensemble))) {
        chart.draw_series(LineSeries::new(run, ENSEMBLE_COLOR.stroke_width(3)))?;
    }
    let plot = chart.plotting_area();
    for (x, s) in xs().zip(steps) {
        if s.ensemble.is_finite() {
            draw_marker(plot, (x, s.ensemble), s.decision)?;
        }
    }
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    metric: &str,
    higher_is_better: bool,
    bars: &[Bar<'_>],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (title_area, rest) = area.split_vertically(TITLE_HEIGHT);
    let (legend_area, plot_area) = rest.split_vertically(LEGEND_HEIGHT);
    draw_title(
        &title_area,
        &format!(
            "Strategies compared: {metric} ({})",
            direction(higher_is_better)
        ),
    )?;
    let has_test = bars.iter().any(|b| b.test.is_some());
    let mut legend = vec![(Swatch::Block(VAL_COLOR), "validation")];
    if has_test {
        legend.push((Swatch::Block(TEST_COLOR), "test"));
    }
    draw_legend(&legend_area, &legend)?;

    let n = bars.len().max(1);
    let values = || bars.iter().flat_map(|b| [Some(b.val), b.test]).flatten();
    let finite: Vec<f64> = values().filter(|v| v.is_finite()).collect();
    let spread = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        - finite.iter().copied().fold(f64::INFINITY, f64::min);
    let v_dec = if spread > 0.0 {
        decimals(spread, 2).clamp(2, 6)
    } else {
        4
    };
    let best = bars
        .iter()
        .enumerate()
        .filter(|(_, b)| b.val.is_finite())
        .fold(None::<(usize, f64)>, |acc, (i, b)| match acc {
            Some((_, v))
                if (higher_is_better && v >= b.val) || (!higher_is_better && v <= b.val) =>
            {
                acc
            }
            _ => Some((i, b.val)),
        })
        .map(|(i, _)| i);

    // Layout, in pixels, before the y range: the value labels need headroom.
    let (w, h) = plot_area.dim_in_pixel();
    let plot_w = w
        .saturating_sub(Y_LABEL_AREA + MARGIN + MARGIN_RIGHT)
        .max(1) as f64;
    let plot_h = h.saturating_sub(X_LABEL_AREA + 2 * MARGIN).max(1) as f64;
    let slot = plot_w / n as f64;
    // Validation left, test right (or one centred bar when there is no test).
    // (Bars at most 90 px wide, so that a few strategies do not make slabs.)
    let half = if has_test {
        f64::min(0.38, 90.0 / slot)
    } else {
        f64::min(0.3, 45.0 / slot)
    };
    let room = slot * if has_test { half + 0.01 } else { 0.9 };
    let widest_value = |size: u32| {
        values()
            .map(|v| text_width(&font(size), &format_value(v, v_dec)))
            .max()
            .unwrap_or(0) as f64
    };
    // The largest size at which value labels fit over their bars; else written upwards.
    let value_size = [14, 13, 12, 11, 10]
        .into_iter()
        .find(|&s| widest_value(s) + 4.0 <= room);
    let label_px = match value_size {
        Some(size) => size as f64 + 6.0,
        None => widest_value(VERTICAL_VALUE_SIZE) + 8.0,
    };
    let below = 0.25;
    let f = (label_px / plot_h).min(0.6);
    let above = (f * (1.0 + below) / (1.0 - f)).max(0.05);
    let range = y_range(values(), below, above);
    let (mut ylo, yhi) = range.unwrap_or((0.0, 1.0));
    // Non-negative scores: never let the axis dip below zero for nothing.
    if ylo < 0.0 && finite.iter().all(|&v| v >= 0.0) {
        ylo = 0.0;
    }
    let y_dec = decimals((yhi - ylo) / 10.0, 0);

    // Strategy names: the largest size at which they all fit their slot, else cut.
    let names: Vec<String> = bars.iter().map(|b| short_label(b.label)).collect();
    let name_room = (slot - 8.0).max(8.0) as u32;
    let name_size = [14, 13, 12, 11]
        .into_iter()
        .find(|&s| names.iter().all(|l| text_width(&font(s), l) <= name_room))
        .unwrap_or(11);
    let labels: Vec<String> = names
        .iter()
        .map(|l| fit_label(&font(name_size), l, name_room))
        .collect();
    let label_at = |x: &f64| {
        let i = x.round();
        if i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };

    let mut chart = ChartBuilder::on(&plot_area)
        .margin(MARGIN)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(
            Slots::new(n, (0..bars.len()).map(|i| i as f64).collect()),
            ylo..yhi,
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&label_at)
        .y_label_formatter(&|y| format!("{y:.y_dec$}"))
        .x_desc("strategy")
        .y_desc(format!("{metric} ({})", direction(higher_is_better)))
        .label_style(font(14).color(&GREY_800))
        .x_label_style(font(name_size).color(&GREY_800))
        .axis_desc_style(font(15).color(&BLACK))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(242, 242, 242))
        .max_light_lines(1)
        .draw()?;

    if range.is_none() {
        draw_note(
            &chart.plotting_area().strip_coord_spec(),
            "nothing to plot: no finite scores",
        )?;
        return Ok(());
    }

    let plot = chart.plotting_area();
    for (i, b) in bars.iter().enumerate() {
        let x = i as f64;
        let mut cols = vec![(b.val, VAL_COLOR, best == Some(i), (x - half, x + half))];
        if has_test {
            cols[0].3 = (x - half, x - 0.01);
            if let Some(t) = b.test {
                cols.push((t, TEST_COLOR, false, (x + 0.01, x + half)));
            }
        }
        for (v, color, bold, (x0, x1)) in cols {
            let top = if v.is_finite() {
                v.clamp(ylo, yhi)
            } else {
                ylo
            };
            if v.is_finite() {
                plot.draw(&Rectangle::new([(x0, ylo), (x1, top)], color.filled()))?;
            }
            let text = format_value(v, v_dec);
            let at = ((x0 + x1) / 2.0, top);
            let weight = if bold {
                FontStyle::Bold
            } else {
                FontStyle::Normal
            };
            let style = match value_size {
                Some(size) => font_in(size, weight)
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
                // Too narrow: written upwards, from just above the bar.
                None => font_in(VERTICAL_VALUE_SIZE, weight)
                    .transform(FontTransform::Rotate270)
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            };
            let offset = if value_size.is_some() {
                (0, -3)
            } else {
                (0, -4)
            };
            plot.draw(&(EmptyElement::at(at) + Text::new(text, offset, style)))?;
        }
    }
    Ok(())
}

fn format_value(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "NaN".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps_fixture(names: &[String]) -> Vec<StepPoint<'_>> {
        // A plausible ASWA run: noisy, improving checkpoint scores; the ensemble
        // improves monotonically, with restarts (hard) and averaging (soft).
        let running = [
            0.712, 0.748, 0.771, 0.765, 0.802, 0.795, 0.781, 0.823, 0.818, 0.809, 0.829, 0.812,
            0.826, 0.831, 0.820,
        ];
        let mut ensemble = Vec::new();
        let mut decisions = Vec::new();
        let mut best = 0.0;
        for (i, &r) in running.iter().enumerate() {
            let (d, e) = if i == 0 {
                (Decision::Init, r)
            } else if r > best + 0.02 {
                (Decision::Hard, r)
            } else if i % 4 == 3 {
                (Decision::Reject, best)
            } else {
                (Decision::Soft, f64::max(best, r) + 0.004)
            };
            best = e;
            decisions.push(d);
            ensemble.push(e);
        }
        names
            .iter()
            .zip(running.iter().zip(ensemble.iter().zip(decisions)))
            .map(|(label, (&running, (&ensemble, decision)))| StepPoint {
                label,
                running,
                ensemble,
                decision,
            })
            .collect()
    }

    fn names() -> Vec<String> {
        (1..=15)
            .map(|i| format!("epoch_{:03}.safetensors", i * 10))
            .collect()
    }

    fn bars_fixture(with_test: bool) -> Vec<Bar<'static>> {
        let rows = [
            ("aswa", 0.8412, 0.8357),
            ("swa", 0.8325, 0.8290),
            ("ema", 0.8301, 0.8312),
            ("last", 0.8203, 0.8154),
            ("best", 0.8310, 0.8221),
            ("uniform soup", 0.8288, 0.8265),
            ("greedy soup", 0.8391, 0.8330),
            ("tail 5", 0.8350, 0.8301),
        ];
        rows.iter()
            .enumerate()
            .map(|(i, &(label, val, test))| Bar {
                label,
                val,
                // Leave one strategy without a test score.
                test: (with_test && i != 4).then_some(test),
            })
            .collect()
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 24);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    fn check_svg(text: &str, legend: &[&str]) {
        let body = text.trim_start();
        let body = if body.starts_with("<?xml") {
            body[body.find("?>").unwrap() + 2..].trim_start()
        } else {
            body
        };
        assert!(body.starts_with("<svg"), "{}", &body[..body.len().min(80)]);
        assert!(text.trim_end().ends_with("</svg>"));
        for l in legend {
            assert!(text.contains(l), "the SVG lacks {l:?}");
        }
    }

    fn no_leftovers(dir: &Path, expected: usize) {
        let n = std::fs::read_dir(dir).unwrap().count();
        assert_eq!(n, expected, "unexpected files in {}", dir.display());
    }

    #[test]
    fn steps_render_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let names = names();
        let steps = steps_fixture(&names);
        assert!([
            Decision::Init,
            Decision::Hard,
            Decision::Soft,
            Decision::Reject
        ]
        .iter()
        .all(|d| steps.iter().any(|s| s.decision == *d)));

        let svg = dir.path().join("steps.svg");
        plot_steps(&svg, "accuracy", true, &steps).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        check_svg(
            &text,
            &[
                "checkpoint score",
                "ensemble score",
                "hard update",
                "soft update",
                "rejected",
                "init",
                "checkpoint",
                "accuracy (higher is better)",
            ],
        );

        let png = dir.path().join("steps.PNG");
        plot_steps(&png, "accuracy", true, &steps).unwrap();
        assert_eq!(png_size(&std::fs::read(&png).unwrap()), STEPS_SIZE);
        no_leftovers(dir.path(), 2);
    }

    #[test]
    fn strategies_render_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let names = names();
        let steps = steps_fixture(&names);
        for with_test in [false, true] {
            let bars = bars_fixture(with_test);
            let svg = dir.path().join(format!("bars_{with_test}.svg"));
            plot_strategies(&svg, "mrr", true, &bars, None).unwrap();
            let text = std::fs::read_to_string(&svg).unwrap();
            let mut legend = vec!["validation", "greedy soup", "mrr (higher is better)"];
            if with_test {
                legend.push("test");
            }
            check_svg(&text, &legend);
            assert_eq!(text.contains("\ntest\n"), with_test);

            let png = dir.path().join(format!("bars_{with_test}.png"));
            plot_strategies(&png, "mrr", true, &bars, None).unwrap();
            assert_eq!(png_size(&std::fs::read(&png).unwrap()), BARS_SIZE);

            let both = dir.path().join(format!("both_{with_test}.png"));
            plot_strategies(&both, "loss", false, &bars, Some(&steps)).unwrap();
            assert_eq!(png_size(&std::fs::read(&both).unwrap()), BOTH_SIZE);
            let both_svg = dir.path().join(format!("both_{with_test}.Svg"));
            plot_strategies(&both_svg, "loss", false, &bars, Some(&steps)).unwrap();
            let text = std::fs::read_to_string(&both_svg).unwrap();
            check_svg(&text, &["ensemble score", "validation", "lower is better"]);
        }
        no_leftovers(dir.path(), 8);
    }

    #[test]
    fn replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        std::fs::write(&path, "old").unwrap();
        plot_strategies(&path, "acc", true, &bars_fixture(true), None).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("</svg>"));
        no_leftovers(dir.path(), 1);
    }

    #[test]
    fn an_unsupported_extension_is_a_usage_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let names = names();
        let steps = steps_fixture(&names);
        for name in ["chart.pdf", "chart", "chart.svg.txt", "png"] {
            let path = dir.path().join(name);
            let err = plot_steps(&path, "acc", true, &steps).unwrap_err();
            match &err {
                Error::Usage(m) => {
                    assert!(
                        m.contains(name) && m.contains(".svg") && m.contains(".png"),
                        "{m}"
                    )
                }
                other => panic!("expected a usage error, got {other:?}"),
            }
            let err = plot_strategies(&path, "acc", true, &bars_fixture(false), None).unwrap_err();
            assert!(matches!(err, Error::Usage(_)));
        }
        no_leftovers(dir.path(), 0);
    }

    #[test]
    fn a_missing_directory_is_an_output_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("chart.png");
        let err = plot_steps(&path, "acc", true, &[]).unwrap_err();
        assert!(matches!(err, Error::Output { .. }), "{err:?}");
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let nan = f64::NAN;
        let step = |label, running, ensemble, decision| StepPoint {
            label,
            running,
            ensemble,
            decision,
        };
        let long = "a_very_long_checkpoint_name_that_goes_on_and_on_epoch_0001.safetensors";
        let cases: Vec<Vec<StepPoint<'_>>> = vec![
            vec![],
            vec![step("a", nan, nan, Decision::Init)],
            vec![step("a", 0.5, 0.5, Decision::Init)],
            vec![step("a", 0.0, 0.0, Decision::Init)],
            vec![
                step("a", 1.0, 1.0, Decision::Init),
                step("b", 1.0, 1.0, Decision::Reject),
            ],
            vec![
                step("", nan, 0.3, Decision::Init),
                step("<&>\"'", 0.2, nan, Decision::Soft),
                step(long, f64::INFINITY, 0.4, Decision::Hard),
            ],
            vec![
                step("x", 1e-300, 2e-300, Decision::Init),
                step("y", 3e-300, 2e-300, Decision::Soft),
            ],
            vec![
                step("x", -f64::MAX, f64::MAX, Decision::Init),
                step("y", 1e308, -1e308, Decision::Hard),
            ],
            (0..200)
                .map(|i| step(long, (i as f64).sin(), (i as f64).cos(), Decision::Soft))
                .collect(),
        ];
        for (i, steps) in cases.iter().enumerate() {
            for ext in ["svg", "png"] {
                plot_steps(&p(&format!("s{i}.{ext}")), "m", i % 2 == 0, steps).unwrap();
            }
        }
        let bar = |label, val, test| Bar { label, val, test };
        let bar_cases: Vec<Vec<Bar<'_>>> = vec![
            vec![],
            vec![bar("a", nan, None)],
            vec![bar("a", nan, Some(nan))],
            vec![bar("a", 0.5, None)],
            vec![bar("a", 0.5, Some(0.5)), bar("b", 0.5, Some(0.5))],
            vec![bar("a", -2.0, Some(3.0)), bar(long, nan, Some(-1.0))],
            vec![bar("a", f64::MAX, Some(-f64::MAX)), bar("b", 1e-300, None)],
            (0..30)
                .map(|i| bar(long, i as f64, Some(i as f64 * 0.5)))
                .collect(),
        ];
        for (i, bars) in bar_cases.iter().enumerate() {
            for ext in ["svg", "png"] {
                plot_strategies(&p(&format!("b{i}.{ext}")), "m", i % 2 == 1, bars, None).unwrap();
            }
            // Both charts in one image: the same drawing code, so SVG suffices.
            let steps = &cases[i % cases.len()];
            plot_strategies(&p(&format!("c{i}.svg")), "m", true, bars, Some(steps)).unwrap();
        }
    }

    /// Writes sample charts for a person to look at:
    /// `ASWA_PLOT_SAMPLES=/tmp cargo test --lib reporting::plot`.
    #[test]
    fn sample_images() {
        let Some(out) = std::env::var_os("ASWA_PLOT_SAMPLES") else {
            return;
        };
        let out = Path::new(&out);
        let names = names();
        let steps = steps_fixture(&names);
        let bars = bars_fixture(true);
        plot_steps(&out.join("plot_steps.png"), "accuracy", true, &steps).unwrap();
        plot_strategies(&out.join("plot_bars.png"), "accuracy", true, &bars, None).unwrap();
        plot_strategies(
            &out.join("plot_compare.png"),
            "accuracy",
            true,
            &bars,
            Some(&steps),
        )
        .unwrap();
        plot_steps(&out.join("plot_steps.svg"), "accuracy", true, &steps).unwrap();
    }
}
