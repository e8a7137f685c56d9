//! The `scaling` benchmark: how restart latency grows with the memory the running generation
//! holds, the number of listeners it hands over, and the size of its state.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use crate::env::Bins;
use crate::load::{Flavor, Service};
use crate::proc::{self, TempDir};
use crate::stats::{self, Summary, Table};

/// Options of the scaling benchmark.
#[derive(Debug, Clone)]
pub struct ScalingOptions {
    /// Restarts per point.
    pub restarts: usize,
    /// Restarts for the largest state (1 GiB), which take longest.
    pub restarts_big_state: usize,
    /// Held memory points, MiB.
    pub memory_mib: Vec<usize>,
    /// Listener counts.
    pub listeners: Vec<usize>,
    /// State sizes, MiB.
    pub state_mib: Vec<usize>,
}

fn timings(path: &std::path::Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut fresh = Vec::new();
    let mut restarted = Vec::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        match (w.next(), w.next().and_then(|v| v.parse::<f64>().ok())) {
            (Some("fresh"), Some(us)) => fresh.push(us / 1e3),
            (Some("restarted"), Some(us)) => restarted.push(us / 1e3),
            _ => {}
        }
    }
    (fresh, restarted)
}

struct Point {
    dimension: &'static str,
    value: String,
    ms: Vec<f64>,
    failures: usize,
}

/// Waits until `pid` holds its `mib` MiB of ballast completely: resident memory at least that
/// and no longer growing (so that no page fault of the fill overlaps the next restart).
fn wait_rss(pid: i32, mib: usize, timeout: Duration) {
    if mib == 0 {
        return;
    }
    let deadline = Instant::now() + timeout;
    let want = mib as u64 * 1024;
    let mut last = 0;
    while Instant::now() < deadline {
        match proc::footprint(pid) {
            Ok(f) if f.rss_kib >= want && f.rss_kib == last => return,
            Ok(f) => last = f.rss_kib,
            Err(_) => return,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn restarts_of(svc: &mut Service, n: usize, ballast_mib: usize) -> (Vec<f64>, usize) {
    let mut ms = Vec::new();
    let mut failures = 0;
    // One restart first, not counted.
    for i in 0..n + 1 {
        let old = svc.pid;
        let t = Instant::now();
        match svc.restart().await {
            Ok(pid) => {
                if i > 0 {
                    ms.push(stats::as_ms(t.elapsed()));
                }
                let pid = pid as i32;
                let _ = tokio::task::spawn_blocking(move || {
                    proc::wait_exit(old, Duration::from_secs(30));
                    wait_rss(pid, ballast_mib, Duration::from_secs(30));
                })
                .await;
            }
            Err(e) => {
                eprintln!("  restart failed: {e}");
                failures += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ms, failures)
}

/// Runs every point and returns the table.
pub async fn run(bins: &Bins, o: &ScalingOptions) -> std::io::Result<String> {
    let dir = TempDir::new("scaling")?;
    let mut points = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for &mib in &o.memory_mib {
        eprintln!("held memory {mib} MiB: {} restarts", o.restarts);
        let cfg = format!("ballast_mib = {mib}\n");
        let mut svc = Service::start(Flavor::Ours, bins, &dir, &format!("mem{mib}"), &cfg)?;
        let pid = svc.pid;
        tokio::task::spawn_blocking(move || wait_rss(pid, mib, Duration::from_secs(30)))
            .await
            .map_err(std::io::Error::other)?;
        let (ms, failures) = restarts_of(&mut svc, o.restarts, mib).await;
        svc.stop();
        points.push(Point {
            dimension: "held memory (ballast_mib)",
            value: format!("{mib} MiB"),
            ms,
            failures,
        });
    }
    for &n in &o.listeners {
        eprintln!("{n} listeners: {} restarts", o.restarts);
        let socket = dir.join(&format!("listeners{n}.sock"));
        let args: Vec<OsString> = vec![
            "listeners".into(),
            "--count".into(),
            n.to_string().into(),
            "--socket".into(),
            socket.clone().into(),
        ];
        let log = dir.join(&format!("listeners{n}.log"));
        let timing = dir.join(&format!("listeners{n}.timing"));
        let mut args = args;
        args.push("--timing".into());
        args.push(timing.clone().into());
        // The first start, several times, for the cost of binding them fresh.
        for _ in 0..3 {
            let pid = proc::spawn(&bins.svc, &args, &[], &log)?;
            proc::wait_for_path(&socket, Duration::from_secs(20));
            proc::stop(pid, Duration::from_secs(5));
            let _ = std::fs::remove_file(&socket);
        }
        let pid = proc::spawn(&bins.svc, &args, &[], &log)?;
        let mut svc = Service::adopt(pid, socket);
        if !proc::wait_for_path(svc.socket_path(), Duration::from_secs(20)) {
            return Err(std::io::Error::other(format!(
                "bench-svc listeners did not start (see {})",
                log.display()
            )));
        }
        let (ms, failures) = restarts_of(&mut svc, o.restarts, 0).await;
        svc.stop();
        let (fresh, restarted) = timings(&timing);
        notes.push(format!(
            "{n} listeners: the successor takes them from the registry in {} ms (median of {}); a first start binds them in {} ms (median of {}).",
            stats::ms(stats::median(&restarted)),
            restarted.len(),
            stats::ms(stats::median(&fresh)),
            fresh.len()
        ));
        points.push(Point {
            dimension: "named listeners",
            value: n.to_string(),
            ms,
            failures,
        });
    }
    for &mib in &o.state_mib {
        let n = if mib >= 1024 {
            o.restarts_big_state
        } else {
            o.restarts
        };
        eprintln!("state {mib} MiB: {n} restarts");
        let cfg = format!("state_mib = {mib}\n");
        let mut svc = Service::start(Flavor::Ours, bins, &dir, &format!("state{mib}"), &cfg)?;
        let (ms, failures) = restarts_of(&mut svc, n, 0).await;
        svc.stop();
        points.push(Point {
            dimension: "state (state_mib)",
            value: format!("{mib} MiB"),
            ms,
            failures,
        });
    }
    let mut t = Table::new(&[
        "dimension",
        "value",
        "restarts",
        "restart ms: median [p10–p90]",
        "p99 ms",
        "median / first value's",
    ]);
    let mut firsts: Vec<(&str, f64)> = Vec::new();
    for p in &points {
        let s = Summary::of(&p.ms);
        let first = match firsts.iter().find(|(d, _)| *d == p.dimension) {
            Some((_, m)) => *m,
            None => {
                firsts.push((p.dimension, s.median));
                s.median
            }
        };
        t.row(vec![
            p.dimension.into(),
            p.value.clone(),
            if p.failures > 0 {
                format!("{} ({} failed)", p.ms.len(), p.failures)
            } else {
                p.ms.len().to_string()
            },
            s.spread(stats::ms),
            stats::ms(s.p99),
            stats::ratio(s.median / first),
        ]);
    }
    let mut out = t.render();
    if !notes.is_empty() {
        out.push('\n');
        for n in &notes {
            out.push_str(n);
            out.push('\n');
        }
    }
    // The marginal cost of state: the slope between the smallest and the largest state.
    let states: Vec<&Point> = points
        .iter()
        .filter(|p| p.dimension.starts_with("state"))
        .collect();
    if let (Some(a), Some(b), true) = (states.first(), states.last(), o.state_mib.len() >= 2) {
        let (ma, mb) = (stats::median(&a.ms), stats::median(&b.ms));
        let (sa, sb) = (
            o.state_mib[0] as f64,
            o.state_mib[o.state_mib.len() - 1] as f64,
        );
        let slope = (mb - ma) / (sb - sa);
        out.push_str(&format!(
            "\nMarginal cost of state between {sa} and {sb} MiB: {:.3} ms per MiB, i.e. {} of state per second of restart.\n",
            slope,
            stats::rate(1024.0 * 1024.0 / (slope / 1e3))
        ));
    }
    Ok(out)
}
