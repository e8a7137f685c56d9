//! Medians, percentiles and the way figures are printed.
//!
//! Every percentile, minimum, maximum and mean here is read from an [`hdrhistogram`]
//! [`Histogram`] kept at [`SIGFIG`] significant figures: a recorded value is known to within
//! about 0.1 % of itself, so a figure read back may differ from the exact one in its fourth
//! significant digit (maxima and percentiles round up to the top of their bucket, minima down to
//! its bottom). Recorded integers below 2048 (up to 2 ms for microseconds) are kept exactly.

use std::time::Duration;

use hdrhistogram::Histogram;

/// The significant figures every histogram here keeps: 3, i.e. each value is kept to within one
/// part in a thousand of itself, whatever its size.
pub const SIGFIG: u8 = 3;

/// The step at which [`Summary::of`] records its values: a millionth of their unit (1 ns for
/// values in milliseconds). Values at least 2048 times this are kept at [`SIGFIG`] significant
/// figures.
pub const RESOLUTION: f64 = 1e-6;

/// An empty histogram of non-negative integers (microseconds, say) at [`SIGFIG`] significant
/// figures; it grows to hold any value recorded with [`record`].
pub fn histogram() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("3 significant figures is a valid precision")
}

/// Records `value` into `h`, which grows to hold it (unlike
/// [`Histogram::saturating_record`], which clamps to the current range and never grows).
pub fn record(h: &mut Histogram<u64>, value: u64) {
    h.record(value)
        .expect("a histogram from `histogram()` grows to hold any u64");
}

/// The median of `v`, read from a histogram as in [`Summary::of`].
pub fn median(v: &[f64]) -> f64 {
    Summary::of(v).median
}

/// Summary of repeated measurements: median with min and max, p10 and p90, p99, and the mean,
/// all in the unit of the values summarised. Percentiles are nearest rank (the smallest value
/// with at least that share of the values at or below it), at [`SIGFIG`] significant figures.
/// Every figure is NaN when there are no values.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// How many values.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Summary {
    /// Summarises `v`, recorded into a histogram in steps of [`RESOLUTION`]. The values must
    /// not be negative (those count as 0); NaN and infinite values are left out.
    pub fn of(v: &[f64]) -> Summary {
        let mut h = histogram();
        for &x in v.iter().filter(|x| x.is_finite()) {
            record(&mut h, (x / RESOLUTION).round() as u64);
        }
        Summary::from_histogram(&h, RESOLUTION)
    }

    /// Summarises the values recorded in `h`, each recorded count being worth `unit` of the
    /// unit wanted: `1e-3` reads a histogram of microseconds in milliseconds.
    pub fn from_histogram(h: &Histogram<u64>, unit: f64) -> Summary {
        if h.is_empty() {
            return Summary {
                n: 0,
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
                p10: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
            };
        }
        let at = |q: f64| h.value_at_quantile(q) as f64 * unit;
        Summary {
            n: h.len() as usize,
            median: at(0.5),
            min: h.min() as f64 * unit,
            max: h.max() as f64 * unit,
            mean: h.mean() * unit,
            p10: at(0.1),
            p90: at(0.9),
            p99: at(0.99),
        }
    }

    /// "median [min–max]" with `f` formatting each value.
    pub fn range(&self, f: impl Fn(f64) -> String) -> String {
        format!("{} [{}–{}]", f(self.median), f(self.min), f(self.max))
    }

    /// "median [p10–p90]".
    pub fn spread(&self, f: impl Fn(f64) -> String) -> String {
        format!("{} [{}–{}]", f(self.median), f(self.p10), f(self.p90))
    }
}

/// Milliseconds with a sensible number of digits.
pub fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A duration in milliseconds, as f64.
pub fn as_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A count with thousands separators.
pub fn count(v: f64) -> String {
    if v.is_nan() {
        return "–".into();
    }
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A ratio like "1.23×".
pub fn ratio(v: f64) -> String {
    if v.is_nan() || v.is_infinite() {
        "–".into()
    } else if v >= 10.0 {
        format!("{v:.1}×")
    } else {
        format!("{v:.2}×")
    }
}

/// Bytes per second in GB/s (10^9) or MB/s.
pub fn rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e9 {
        format!("{:.2} GB/s", bytes_per_s / 1e9)
    } else {
        format!("{:.0} MB/s", bytes_per_s / 1e6)
    }
}

/// A markdown table printed to standard output and kept for the results file.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as markdown.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = w - c.chars().count();
                s.push(' ');
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
                s.push_str(" |");
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.header);
        out.push('|');
        for w in &widths {
            out.push_str(&"-".repeat(w + 2));
            out.push('|');
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_recorded_exactly_give_nearest_rank_percentiles() {
        let mut h = histogram();
        for us in (1..=100u64).rev() {
            record(&mut h, us);
        }
        let s = Summary::from_histogram(&h, 1.0);
        assert_eq!(s.n, 100);
        assert_eq!(s.median, 50.0);
        assert_eq!(s.p10, 10.0);
        assert_eq!(s.p90, 90.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!((s.min, s.max), (1.0, 100.0));
        assert_eq!(s.mean, 50.5);
        // Microseconds read in milliseconds.
        assert!((Summary::from_histogram(&h, 1e-3).p99 - 0.099).abs() < 1e-12);
    }

    #[test]
    fn summaries_of_floats_hold_three_significant_figures() {
        let v: Vec<f64> = (1..=100).rev().map(|i| f64::from(i) * 0.37).collect();
        let s = Summary::of(&v);
        let close = |got: f64, want: f64| {
            assert!(
                (got - want).abs() <= want * 1e-3,
                "{got} is not {want} to 3 significant figures"
            );
        };
        assert_eq!(s.n, 100);
        close(s.median, 50.0 * 0.37);
        close(s.p99, 99.0 * 0.37);
        close(s.min, 0.37);
        close(s.max, 37.0);
        close(s.mean, 50.5 * 0.37);
        close(median(&[3.0]), 3.0);
        close(median(&[2.0, f64::NAN, 1.0, 3.0]), 2.0);
        assert!(Summary::of(&[]).median.is_nan());
        // Beyond u64 at this resolution: recorded as u64::MAX, not lost.
        assert_eq!(Summary::of(&[1e30, 1.0]).n, 2);
        assert_eq!(ms(Summary::of(&[]).max), "–");
        assert_eq!(count(1234567.0), "1,234,567");
    }
}
