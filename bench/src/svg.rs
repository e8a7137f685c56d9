//! A hand-written SVG of request latency over time, with the restart windows shaded.

use std::fmt::Write;

use crate::loadgen::{Outcome, Sample};

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

const W: f64 = 1000.0;
const H: f64 = 230.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 36.0;

/// Renders the panels stacked, one SVG document.
pub fn render(panels: &[Panel<'_>]) -> String {
    let total_h = H * panels.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r##"<g transform="translate({LEFT},{})"><rect width="12" height="8" fill="#fde2c4"/><text x="16" y="8">restart window (request → new PID)</text><line x1="220" y1="4" x2="240" y2="4" stroke="#999" stroke-width="1"/><text x="244" y="8">max per bin</text><line x1="320" y1="4" x2="340" y2="4" stroke="#7b3fa0" stroke-width="1.2"/><text x="344" y="8">p99 per bin</text><line x1="420" y1="4" x2="440" y2="4" stroke="#1f5fbf" stroke-width="1.5"/><text x="444" y="8">median per bin</text><circle cx="535" cy="4" r="3" fill="#d62728"/><text x="542" y="8">failed request</text></g>"##,
        12.0
    );
    for (i, p) in panels.iter().enumerate() {
        panel(&mut s, p, 30.0 + H * i as f64);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel<'_>, y0: f64) {
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let span = (p.to_us - p.from_us).max(1) as f64;
    let x = |us: u64| LEFT + (us.saturating_sub(p.from_us) as f64 / span) * pw;
    // Bins.
    let nbins = ((p.to_us - p.from_us) / p.bin_us.max(1)) as usize + 1;
    let mut bins: Vec<Vec<u32>> = vec![Vec::new(); nbins];
    let mut failures = Vec::new();
    for smp in p.samples {
        if smp.start_us < p.from_us || smp.start_us >= p.to_us {
            continue;
        }
        if smp.outcome != Outcome::Ok {
            failures.push(smp.start_us);
            continue;
        }
        bins[((smp.start_us - p.from_us) / p.bin_us) as usize].push(smp.latency_us);
    }
    let mut top_ms = 1.0f64;
    for b in &bins {
        if let Some(m) = b.iter().max() {
            top_ms = top_ms.max(*m as f64 / 1e3);
        }
    }
    let ymax = 10f64.powf(top_ms.log10().ceil().max(0.0));
    let ymin = 0.01f64;
    let y = |ms: f64| {
        let v = ms.max(ymin).log10();
        y0 + TOP + ph - (v - ymin.log10()) / (ymax.log10() - ymin.log10()) * ph
    };
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        y0 + TOP - 8.0,
        escape(&p.title)
    );
    for &(a, b) in p.windows {
        if b < p.from_us || a > p.to_us {
            continue;
        }
        let xa = x(a.max(p.from_us));
        let xb = x(b.min(p.to_us)).max(xa + 0.8);
        let _ = writeln!(
            s,
            r##"<rect x="{xa:.1}" y="{:.1}" width="{:.1}" height="{ph:.1}" fill="#fde2c4"/>"##,
            y0 + TOP,
            xb - xa
        );
    }
    // Axes and grid.
    let mut decade = ymin;
    while decade <= ymax * 1.001 {
        let yy = y(decade);
        let label = if decade >= 1.0 {
            format!("{decade:.0} ms")
        } else {
            format!("{decade} ms")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            LEFT + pw,
            LEFT - 4.0,
            yy + 4.0
        );
        decade *= 10.0;
    }
    let secs = span / 1e6;
    let step = nice_step(secs / 10.0);
    let mut t = (p.from_us as f64 / 1e6 / step).ceil() * step;
    while t <= p.to_us as f64 / 1e6 + 1e-9 {
        let xx = x((t * 1e6) as u64);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#bbb"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y0 + TOP + ph,
            y0 + TOP + ph + 4.0,
            y0 + TOP + ph + 16.0,
            fmt_secs(t, step)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#666"/><text x="{:.1}" y="{:.1}" text-anchor="middle">time since the load started (s)</text>"##,
        y0 + TOP,
        LEFT + pw / 2.0,
        y0 + TOP + ph + 30.0
    );
    // Lines: max, p99, median per bin.
    let mut maxes = String::new();
    let mut p99s = String::new();
    let mut meds = String::new();
    for (i, b) in bins.iter_mut().enumerate() {
        if b.is_empty() {
            continue;
        }
        b.sort_unstable();
        let xx = x(p.from_us + i as u64 * p.bin_us + p.bin_us / 2);
        let at =
            |q: f64| b[((q * b.len() as f64).ceil() as usize).clamp(1, b.len()) - 1] as f64 / 1e3;
        let _ = write!(maxes, "{xx:.1},{:.1} ", y(at(1.0)));
        let _ = write!(p99s, "{xx:.1},{:.1} ", y(at(0.99)));
        let _ = write!(meds, "{xx:.1},{:.1} ", y(at(0.5)));
    }
    for (pts, color, w) in [
        (&maxes, "#999", 1.0),
        (&p99s, "#7b3fa0", 1.2),
        (&meds, "#1f5fbf", 1.5),
    ] {
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{w}" points="{pts}"/>"#
        );
    }
    for f in failures.iter().take(2000) {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##,
            x(*f),
            y0 + TOP + 6.0
        );
    }
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if raw <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_secs(t: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{t:.0}")
    } else if step >= 0.1 {
        format!("{t:.1}")
    } else {
        format!("{t:.2}")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
