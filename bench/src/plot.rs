//! `--plot FILE.svg`: a comparison drawn as an SVG chart a README can show: IOPS (top) and p50
//! latency (bottom) per workload, a bar per target at its median with a whisker from the least
//! to the greatest round, and under each workload of the IOPS panel vloop's ratios against the
//! better qemu-storage-daemon and raw (or vloop-raw). Drawn with plotters' SVG backend alone:
//! text is SVG `<text>`, laid out by the viewer, so no font file is read here.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::compare::{Report, Row, Summary};
use crate::figures::Stat;
use crate::target::Target;
use crate::text::count;

/// Errors of drawing the chart.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No target has a measured figure to draw.
    #[error("nothing to plot: no run succeeded")]
    NoData,
    /// plotters failed to draw.
    #[error("cannot draw the chart: {0}")]
    Draw(String),
}

/// Chart size in pixels.
const SIZE: (u32, u32) = (1200, 820);

/// Width of one workload's group of bars on the x axis (integer coordinates: plotters formats
/// the labels of custom key points on integer axes only).
const GROUP: i32 = 1000;

fn color(t: Target) -> RGBColor {
    match t {
        Target::Vloop => RGBColor(31, 119, 180),
        Target::Qsd => RGBColor(255, 127, 14),
        Target::QsdIothread => RGBColor(44, 160, 44),
        Target::Raw => RGBColor(127, 127, 127),
        Target::VloopRaw => RGBColor(148, 103, 189),
    }
}

/// The ratio lines under a workload: vloop's IOPS against the better qsd, raw and vloop-raw.
fn ratio_lines(row: &Row) -> Vec<String> {
    let x = &row.ratios;
    [
        x.qsd.best_qsd.map(Target::name).zip(x.qsd.vloop_over_qsd),
        x.vloop_over_raw.map(|v| (Target::Raw.name(), v)),
        x.vloop_over_vloop_raw.map(|v| (Target::VloopRaw.name(), v)),
    ]
    .into_iter()
    .flatten()
    .map(|(t, v)| format!("vs {t} {v:.2}x"))
    .collect()
}

/// Height of one line of ratios under the workload names, in pixels.
const RATIO_LINE: u32 = 15;

/// One panel's figure of a summary.
type Figure = fn(&Summary) -> Option<Stat>;

/// A latency in microseconds: one decimal below 100 (two below 1), none above.
fn micros(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// What one panel shows.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    figure: Figure,
    format: fn(f64) -> String,
    /// Write vloop's IOPS ratios under each workload.
    ratios: bool,
}

/// The log-scale range that holds every value of `figure` with some room: from a power of 10
/// below the least to one above the greatest.
fn range(r: &Report, figure: Figure) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = 0f64;
    for row in &r.rows {
        for &t in &r.targets {
            if let Some(s) = row.get(t).and_then(figure).filter(|s| s.min > 0.0) {
                lo = lo.min(s.min);
                hi = hi.max(s.max);
            }
        }
    }
    (hi > 0.0).then(|| {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf((hi * 1.5).log10().ceil()),
        )
    })
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    r: &Report,
    p: &Panel<'_>,
) -> Result<(), PlotError> {
    let Panel {
        title,
        unit,
        figure,
        format,
        ratios,
    } = *p;
    let ratio_rows: Vec<Vec<String>> = if ratios {
        r.rows.iter().map(ratio_lines).collect()
    } else {
        Vec::new()
    };
    let lines = ratio_rows.iter().map(Vec::len).max().unwrap_or(0);
    let (lo, hi) = range(r, figure).ok_or(PlotError::NoData)?;
    let n = i32::try_from(r.rows.len())
        .ok()
        .filter(|n| n.checked_mul(GROUP).is_some())
        .ok_or_else(|| PlotError::Draw(format!("too many rows: {}", r.rows.len())))?;
    let centers: Vec<i32> = (0..n).map(|i| i * GROUP + GROUP / 2).collect();
    let names: Vec<String> = r.rows.iter().map(|row| row.name.clone()).collect();
    let label = move |x: &i32| {
        if x.rem_euclid(GROUP) == GROUP / 2 {
            let i = usize::try_from(x / GROUP).unwrap_or(usize::MAX);
            names.get(i).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30 + RATIO_LINE * u32::try_from(lines).unwrap_or(0))
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0..n * GROUP).with_key_points(centers),
            (lo..hi).log_scale(),
        )
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 15))
        .y_label_formatter(&|v| format(*v))
        .y_label_style(("sans-serif", 14))
        .y_desc(unit)
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    let targets = &r.targets;
    let slots = i32::try_from(targets.len()).unwrap_or(1).max(1);
    // Bars fill 84% of a group, each bar 90% of its slot.
    let slot = GROUP * 84 / 100 / slots;
    let bar = slot * 9 / 10;
    for (j, &t) in (0..).zip(targets) {
        let c = color(t);
        let bars: Vec<(i32, Stat)> = (0..)
            .zip(&r.rows)
            .filter_map(|(i, row)| {
                let s = row.get(t).and_then(figure).filter(|s| s.median > 0.0)?;
                Some((i * GROUP + GROUP * 8 / 100 + j * slot, s))
            })
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, s)| Rectangle::new([(x, lo), (x + bar, s.median)], c.filled())),
            )
            .map_err(draw_err)?;
        // Whiskers from the least to the greatest round, with caps.
        let (mid, cap) = (bar / 2, bar / 5);
        chart
            .draw_series(
                bars.iter()
                    .filter(|(_, s)| s.max > s.min)
                    .flat_map(|&(x, s)| {
                        [
                            vec![(x + mid, s.min), (x + mid, s.max)],
                            vec![(x + mid - cap, s.min), (x + mid + cap, s.min)],
                            vec![(x + mid - cap, s.max), (x + mid + cap, s.max)],
                        ]
                        .map(|points| PathElement::new(points, BLACK.stroke_width(1)))
                    }),
            )
            .map_err(draw_err)?;
        let above = ("sans-serif", 11)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(bars.iter().map(|&(x, s)| {
                Text::new(format(s.median), (x + bar / 2, s.max * 1.12), above.clone())
            }))
            .map_err(draw_err)?;
    }
    // The ratios, centred under each workload's name (pixels relative to the panel).
    let (bx, by) = area.get_base_pixel();
    let font = ("sans-serif", 12)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, text) in (0..).zip(&ratio_rows) {
        let (x, y) = chart.backend_coord(&(i * GROUP + GROUP / 2, lo));
        for (k, line) in (0..).zip(text) {
            let at = (x - bx, y - by + 24 + k * RATIO_LINE as i32);
            area.draw(&Text::new(line.as_str(), at, font.clone()))
                .map_err(draw_err)?;
        }
    }
    Ok(())
}

/// A row of colour swatches naming the targets, centred in `area`.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    targets: &[Target],
) -> Result<(), PlotError> {
    const ENTRY: i32 = 150;
    let width = i32::try_from(area.dim_in_pixel().0).unwrap_or(i32::MAX);
    let count = i32::try_from(targets.len()).unwrap_or(0);
    let mut x = (width - count * ENTRY) / 2;
    let font = ("sans-serif", 15)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for &t in targets {
        area.draw(&Rectangle::new([(x, 9), (x + 16, 23)], color(t).filled()))
            .map_err(draw_err)?;
        area.draw(&Text::new(t.name(), (x + 22, 16), font.clone()))
            .map_err(draw_err)?;
        x += ENTRY;
    }
    Ok(())
}

/// The chart of `r` as an SVG document.
pub fn svg(r: &Report) -> Result<String, PlotError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let title = format!(
            "vloop-bench --compare, {}, {}{}: {} rounds of {:.1} s; {} CPUs, {}; load {:.2} before, {:.2} after",
            r.started.split('T').next().unwrap_or(""),
            r.mode.name(),
            if r.qcow2.is_some() { ", qcow2" } else { "" },
            r.rounds,
            r.rows
                .first()
                .map_or(0.0, |row| row.workload.runtime.as_secs_f64()),
            r.machine.cpus,
            r.machine
                .kernel
                .as_deref()
                .map_or_else(|| "Linux".to_string(), |k| format!("Linux {k}")),
            r.load.before.one,
            r.load.after.one,
        );
        let root = root.titled(&title, ("sans-serif", 18)).map_err(draw_err)?;
        let (strip, panels) = root.split_vertically(30);
        legend(&strip, &r.targets)?;
        let (top, bottom) = panels.split_vertically((SIZE.1 - 30) / 2 - 20);
        panel(
            &top,
            r,
            &Panel {
                title: "IOPS (median; whiskers: least to greatest round); under each workload: vloop's IOPS over the others'",
                unit: "IOPS",
                figure: |s| s.iops,
                format: count,
                ratios: true,
            },
        )?;
        panel(
            &bottom,
            r,
            &Panel {
                title: "p50 latency (median of rounds; whiskers: least to greatest)",
                unit: "microseconds",
                figure: |s| s.p50_us,
                format: micros,
                ratios: false,
            },
        )?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

/// The texts of an SVG document, as the integration tests read the chart back.
#[cfg(test)]
#[path = "../tests/common/svg.rs"]
mod svg_texts;

#[cfg(test)]
mod tests {
    use super::svg_texts::texts;
    use super::*;
    use crate::compare::fixtures::{qcow2_report, report, summary};

    #[test]
    fn the_chart_is_svg_with_text_bars_and_a_legend() {
        let r = report(vec![
            Target::Vloop,
            Target::Qsd,
            Target::QsdIothread,
            Target::Raw,
        ]);
        let text = svg(&r).unwrap();
        let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(root.attribute("width"), Some("1200"));
        let texts = texts(&text);
        for want in [
            "4k randread QD1",
            "4k randread QD32 x2q",
            "vloop",
            "qsd",
            "raw",
            "IOPS",
        ] {
            assert!(
                texts.iter().any(|t| t == want),
                "no text '{want}' in {texts:?}"
            );
        }
        // Values above the bars: vloop's median of the first row, raw's of the second.
        for want in ["17.0k", "18.00M"] {
            assert!(texts.iter().any(|t| t == want), "{texts:?}");
        }
        assert!(texts
            .iter()
            .any(|t| t.contains("2026-12-01, page cache") && t.contains("load 0.25 before")));
        // Text is laid out by the viewer: every label names a generic family, no font file.
        assert!(doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .all(|n| n.attribute("font-family") == Some("sans-serif")));
        assert!(!text.contains(".ttf") && !text.contains("@font-face"));
        // Bars: per panel, vloop, qsd and raw on both rows (qsd-iothread has no figure), plus
        // the legend's 4 swatches... at least 12 filled rectangles in the targets' colours.
        let vloop_fill = "#1F77B4";
        let bars = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect"))
            .filter(|n| n.attribute("fill") == Some(vloop_fill))
            .count();
        assert_eq!(
            bars,
            2 * 2 + 1,
            "vloop bars in both panels plus its legend swatch"
        );
        // Whiskers (a line and two caps): vloop's three rounds and qsd's two differ, raw has
        // one round; the same chart with one round everywhere has none.
        let polylines = |svg: &str| svg.matches("<polyline").count();
        let mut flat = r.clone();
        for row in &mut flat.rows {
            row.vloop = summary(&row.vloop.iops_rounds[..1]);
            row.qsd = Some(summary(&row.qsd.as_ref().unwrap().iops_rounds[..1]));
        }
        let whiskers = polylines(&text) - polylines(&svg(&flat).unwrap());
        assert_eq!(
            whiskers,
            2 * 2 * 2 * 3,
            "2 targets x 2 rows x 2 panels x 3 lines"
        );
    }

    #[test]
    fn the_chart_writes_vloops_ratios_under_each_workload() {
        let q = texts(&svg(&qcow2_report()).unwrap());
        for want in [
            "vloop-raw",
            "1M write QD8 overlay",
            "vs qsd 1.41x",
            "vs vloop-raw 0.90x",
        ] {
            assert!(q.iter().any(|t| t == want), "no '{want}' in {q:?}");
        }
        assert!(!q.iter().any(|t| t.starts_with("vs raw")), "{q:?}");
        assert!(
            q.iter()
                .any(|t| t.contains("2026-12-01, page cache, qcow2: 3 rounds")),
            "{q:?}"
        );
        let p = texts(&svg(&report(vec![Target::Vloop, Target::Qsd, Target::Raw])).unwrap());
        assert!(p.iter().any(|t| t == "vs raw 0.05x"), "{p:?}");
        assert!(!p.iter().any(|t| t.contains("vloop-raw")), "{p:?}");
    }

    #[test]
    fn latency_labels_keep_small_values_readable() {
        assert_eq!(micros(0.5), "0.50");
        assert_eq!(micros(52.94), "52.9");
        assert_eq!(micros(1234.4), "1234");
    }

    #[test]
    fn a_report_with_no_figures_is_an_error() {
        let mut r = report(vec![Target::Vloop]);
        for row in &mut r.rows {
            row.vloop = Summary::default();
        }
        assert!(matches!(svg(&r), Err(PlotError::NoData)));
    }
}
