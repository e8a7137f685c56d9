//! The picture of a load run, drawn with [`plotters`] into an SVG document: request latency over
//! time on a log scale (median, p99 and max per bin), the restart windows shaded and the failed
//! requests marked, one strip per [`Panel`] under a common legend.

use std::error::Error;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::loadgen::{Outcome, Sample};
use crate::stats;

/// One strip of the picture.
pub struct Panel<'a> {
    /// Its title.
    pub title: String,
    /// Every request of the run, sorted by start.
    pub samples: &'a [Sample],
    /// Restart windows: (request sent, answer received), in µs since the run's origin.
    pub windows: &'a [(u64, u64)],
    /// The time range shown, in µs.
    pub from_us: u64,
    /// End of the range, in µs.
    pub to_us: u64,
    /// Width of a bin, in µs.
    pub bin_us: u64,
}

/// Width of the picture, in pixels.
const W: u32 = 1000;
/// Height of one panel.
const H: u32 = 230;
/// Height of the legend above the panels.
const LEGEND_H: u32 = 30;
/// Left edge of the plots (room for the latency labels).
const LEFT: u32 = 60;
/// Top edge of the plots in their panel (room for the title).
const TOP: u32 = 28;
/// The bottom of the latency axis, in ms; shorter latencies are drawn there.
const YMIN: f64 = 0.01;
/// At most this many failed requests are marked per panel.
const MAX_FAILURES: usize = 2000;

const FONT: &str = "sans-serif";
/// Font sizes as plotters takes them (its SVG text comes out at 1/1.24 of these: 11 px, 13 px).
const LABEL_SIZE: f64 = 13.6;
const TITLE_SIZE: f64 = 16.1;

const WINDOW: RGBColor = RGBColor(0xfd, 0xe2, 0xc4);
const FAILED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const GRID: RGBColor = RGBColor(0xe5, 0xe5, 0xe5);
const FRAME: RGBColor = RGBColor(0x66, 0x66, 0x66);

/// The lines of each panel, in drawing order: legend, colour, width; the order of
/// [`Bin::latency_ms`].
const LINES: [(&str, RGBColor, u32); 3] = [
    ("max per bin", RGBColor(0x99, 0x99, 0x99), 1),
    ("p99 per bin", RGBColor(0x7b, 0x3f, 0xa0), 1),
    ("median per bin", RGBColor(0x1f, 0x5f, 0xbf), 2),
];

type DrawResult<T> = Result<T, Box<dyn Error>>;

/// Renders the panels stacked under one legend, as one SVG document.
pub fn render(panels: &[Panel<'_>]) -> std::io::Result<String> {
    let mut out = String::new();
    let height = H * panels.len() as u32 + LEGEND_H;
    {
        let root = SVGBackend::with_string(&mut out, (W, height)).into_drawing_area();
        draw(&root, panels).map_err(|e| std::io::Error::other(format!("drawing: {e}")))?;
    }
    Ok(out)
}

fn draw(root: &DrawingArea<SVGBackend<'_>, Shift>, panels: &[Panel<'_>]) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let (legend_area, body) = root.split_vertically(LEGEND_H);
    legend(&legend_area)?;
    if !panels.is_empty() {
        for (area, p) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
            panel(area, p)?;
        }
    }
    root.present()?;
    Ok(())
}

/// The legend: a swatch of each kind of mark, and what it means.
fn legend(area: &DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult<()> {
    let style =
        TextStyle::from((FONT, LABEL_SIZE).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let y = 16;
    let mut x = LEFT as i32;
    let text = |x: &mut i32, s: &str| -> DrawResult<()> {
        area.draw(&Text::new(s.to_owned(), (*x, y), style.clone()))?;
        *x += area.estimate_text_size(s, &style)?.0 as i32 + 20;
        Ok(())
    };
    area.draw(&Rectangle::new(
        [(x, y - 4), (x + 12, y + 4)],
        WINDOW.filled(),
    ))?;
    x += 16;
    text(&mut x, "restart window (request → new PID)")?;
    for (label, color, width) in LINES {
        area.draw(&PathElement::new(
            [(x, y), (x + 20, y)],
            color.stroke_width(width),
        ))?;
        x += 24;
        text(&mut x, label)?;
    }
    area.draw(&Circle::new((x + 3, y), 3, FAILED.filled()))?;
    x += 10;
    text(&mut x, "failed request")?;
    Ok(())
}

/// What one bin holds: its middle, and latencies of its successful requests.
struct Bin {
    /// The bin's middle, in seconds since the run's origin.
    at_s: f64,
    /// Max, p99 and median latency, in ms.
    latency_ms: [f64; 3],
}

/// The bins of a panel that hold successful requests, the start of each failed request (s), and
/// the longest latency seen (ms).
fn bins(p: &Panel<'_>) -> (Vec<Bin>, Vec<f64>, f64) {
    let bin_us = p.bin_us.max(1);
    let nbins = (p.to_us.saturating_sub(p.from_us) / bin_us) as usize + 1;
    let mut per_bin: Vec<Vec<u32>> = vec![Vec::new(); nbins];
    let mut failures = Vec::new();
    let mut top_us = 0;
    for smp in p.samples {
        if smp.start_us < p.from_us || smp.start_us >= p.to_us {
            continue;
        }
        if smp.outcome != Outcome::Ok {
            failures.push(secs(smp.start_us));
            continue;
        }
        top_us = top_us.max(smp.latency_us);
        per_bin[((smp.start_us - p.from_us) / bin_us) as usize].push(smp.latency_us);
    }
    // One histogram of µs, emptied for each bin.
    let mut h = stats::histogram();
    let mut out = Vec::new();
    for (i, b) in per_bin.iter().enumerate() {
        if b.is_empty() {
            continue;
        }
        h.reset();
        for &us in b {
            stats::record(&mut h, u64::from(us));
        }
        let s = stats::Summary::from_histogram(&h, 1e-3);
        out.push(Bin {
            at_s: secs(p.from_us + i as u64 * bin_us + bin_us / 2),
            latency_ms: [s.max, s.p99, s.median],
        });
    }
    (out, failures, f64::from(top_us) / 1e3)
}

fn panel(area: &DrawingArea<SVGBackend<'_>, Shift>, p: &Panel<'_>) -> DrawResult<()> {
    let (bins, failures, top_ms) = bins(p);
    // Whole decades, from 10 µs to the one above the longest latency (1 ms at least).
    let ymax = 10f64.powf(top_ms.max(1.0).log10().ceil());
    let mut decades = Vec::new();
    let mut decade = YMIN;
    while decade <= ymax * 1.001 {
        decades.push(decade);
        decade *= 10.0;
    }
    let (x0, x1) = (secs(p.from_us), secs(p.to_us.max(p.from_us + 1)));
    let decimals = match (x1 - x0) / 10.0 {
        step if step >= 1.0 => 0,
        step if step >= 0.1 => 1,
        _ => 2,
    };
    let label_font = (FONT, LABEL_SIZE).into_font();
    // The title, left-aligned above the plot.
    area.draw(&Text::new(
        p.title.clone(),
        (LEFT as i32, TOP as i32 - 8),
        TextStyle::from((FONT, TITLE_SIZE).into_font().style(FontStyle::Bold))
            .pos(Pos::new(HPos::Left, VPos::Bottom)),
    ))?;
    let mut chart = ChartBuilder::on(area)
        .margin_top(TOP)
        .margin_right(20)
        .x_label_area_size(36)
        .y_label_area_size(LEFT)
        .build_cartesian_2d(x0..x1, (YMIN..ymax).log_scale().with_key_points(decades))?;

    // The restart windows, at least 0.8 px wide.
    let min_width = (x1 - x0) * 0.8 / f64::from(chart.plotting_area().dim_in_pixel().0.max(1));
    chart.draw_series(
        p.windows
            .iter()
            .filter(|&&(a, b)| b >= p.from_us && a <= p.to_us)
            .map(|&(a, b)| {
                let xa = secs(a.max(p.from_us));
                let xb = secs(b.min(p.to_us)).max(xa + min_width);
                Rectangle::new([(xa, YMIN), (xb, ymax)], WINDOW.filled())
            }),
    )?;

    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .axis_style(FRAME)
        .x_labels(11)
        .x_label_formatter(&|t| format!("{t:.decimals$}"))
        .y_label_formatter(&|v| ms_label(*v))
        .x_desc("time since the load started (s)")
        .label_style(label_font.clone())
        .axis_desc_style(label_font)
        .draw()?;
    chart.plotting_area().draw(&Rectangle::new(
        [(x0, YMIN), (x1, ymax)],
        FRAME.stroke_width(1),
    ))?;

    for (k, (_, color, width)) in LINES.iter().enumerate() {
        chart.draw_series(LineSeries::new(
            bins.iter().map(|b| (b.at_s, b.latency_ms[k].max(YMIN))),
            color.stroke_width(*width),
        ))?;
    }
    // Failed requests: a dot near the top, at the time they were sent.
    chart.draw_series(
        failures
            .iter()
            .take(MAX_FAILURES)
            .map(|&t| EmptyElement::at((t, ymax)) + Circle::new((0, 6), 3, FAILED.filled())),
    )?;
    Ok(())
}

/// Microseconds since the origin, in seconds.
fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// A decade of the latency axis: "0.01 ms", "0.1 ms", "1 ms", "10 ms"…
fn ms_label(v: f64) -> String {
    let decimals = (-v.log10().round()).max(0.0) as usize;
    format!("{v:.decimals$} ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of 2 s: one request every ms, 1 ms each but 30 ms inside the restart window at
    /// 1 s, where 5 requests fail.
    fn fake() -> (Vec<Sample>, Vec<(u64, u64)>) {
        let samples = (0..2000u64)
            .map(|i| {
                let start_us = i * 1000;
                let inside = (1_000_000..1_050_000).contains(&start_us);
                Sample {
                    start_us,
                    latency_us: if inside {
                        30_000
                    } else {
                        1000 + (i % 7) as u32 * 10
                    },
                    outcome: if inside && i % 10 == 0 {
                        Outcome::Reset
                    } else {
                        Outcome::Ok
                    },
                }
            })
            .collect();
        (samples, vec![(1_000_000, 1_040_000)])
    }

    #[test]
    fn bins_hold_max_p99_and_median_latency() {
        let (samples, windows) = fake();
        let p = Panel {
            title: String::new(),
            samples: &samples,
            windows: &windows,
            from_us: 0,
            to_us: 2_000_000,
            bin_us: 20_000,
        };
        let (bins, failures, top_ms) = bins(&p);
        assert_eq!(bins.len(), 100);
        assert_eq!(failures, [1.0, 1.01, 1.02, 1.03, 1.04]);
        assert_eq!(top_ms, 30.0);
        let close = |got: [f64; 3], want: [f64; 3]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= w * 1e-3, "{got:?} is not {want:?}");
            }
        };
        // 0–20 ms: 1.00 to 1.06 ms, in steps of 10 µs.
        assert_eq!(bins[0].at_s, 0.01);
        close(bins[0].latency_ms, [1.06, 1.06, 1.03]);
        // 1.00–1.02 s: inside the window.
        close(bins[50].latency_ms, [30.0, 30.0, 30.0]);
    }

    #[test]
    fn renders_one_svg_with_three_lines_per_panel() {
        let (samples, windows) = fake();
        let panels = [
            Panel {
                title: "fake & small, whole run".into(),
                samples: &samples,
                windows: &windows,
                from_us: 0,
                to_us: 2_000_000,
                bin_us: 20_000,
            },
            Panel {
                title: "fake, close-up".into(),
                samples: &samples,
                windows: &windows,
                from_us: 900_000,
                to_us: 1_200_000,
                bin_us: 1_000,
            },
        ];
        let svg = render(&panels).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("the picture is well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(root.attribute("height"), Some("490"));
        let with = |tag: &str, attr: &str, value: &str| {
            root.descendants()
                .filter(|n| n.has_tag_name(tag) && n.attribute(attr) == Some(value))
                .count()
        };
        // Each line: once in the legend, once per panel.
        for (_, color, _) in LINES {
            let hex = format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2);
            assert_eq!(with("polyline", "stroke", &hex), 1 + panels.len(), "{hex}");
        }
        // The window: a swatch, and one rectangle per panel.
        assert_eq!(with("rect", "fill", "#FDE2C4"), 1 + panels.len());
        // 5 failures, in both panels, and the legend's dot.
        assert_eq!(with("circle", "fill", "#D62728"), 1 + 2 * 5);
        let texts: Vec<&str> = root
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        for want in [
            "fake & small, whole run",
            "fake, close-up",
            "0.01 ms",
            "100 ms",
            "time since the load started (s)",
            "failed request",
        ] {
            assert!(texts.contains(&want), "no text {want:?} in {texts:?}");
        }
    }
}
