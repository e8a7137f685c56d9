//! The `latency` benchmark: restart latency (control-socket request to the new PID) beside the
//! floor, the same service binary started by `posix_spawn` until it reports ready over a pipe.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use crate::env::Bins;
use crate::load::{Flavor, OURS_CONFIG, Service};
use crate::proc::{self, TempDir};
use crate::stats::{self, Summary, Table};

/// Restart latencies and floor start-ups, interleaved, `n` of each.
pub async fn run(bins: &Bins, n: usize) -> std::io::Result<String> {
    let dir = TempDir::new("latency")?;
    // Both the restarted service and the floor log at `info` (the example's default), so the
    // library's phase timings can be read back from the log.
    let mut svc = Service::start_logged(Flavor::Ours, bins, &dir, "lat", OURS_CONFIG, "info")?;
    let cfg = dir.join("floor.toml");
    std::fs::write(&cfg, OURS_CONFIG)?;
    let floor_socket = dir.join("floor.sock");
    let floor_log = dir.join("floor.log");
    let floor_args: Vec<OsString> = vec![
        "--http".into(),
        "127.0.0.1:0".into(),
        "--echo".into(),
        "127.0.0.1:0".into(),
        "--socket".into(),
        floor_socket.clone().into(),
        "--config".into(),
        cfg.into(),
    ];
    let mut restarts = Vec::new();
    let mut floors = Vec::new();
    let mut failures = Vec::new();
    // Three of each first, not counted: caches, page cache, the allocator.
    for i in 0..n + 3 {
        let old = svc.pid;
        let t = Instant::now();
        match svc.restart().await {
            Ok(_) => {
                if i >= 3 {
                    restarts.push(stats::as_ms(t.elapsed()));
                }
            }
            Err(e) => failures.push(e),
        }
        let _ = tokio::task::spawn_blocking(move || proc::wait_exit(old, Duration::from_secs(15)))
            .await;
        let restarter = bins.restarter.clone();
        let args = floor_args.clone();
        let log = floor_log.clone();
        let floor = tokio::task::spawn_blocking(move || {
            let r = proc::spawn_until_ready(
                &restarter,
                &args,
                &[("RUST_LOG", "info")],
                &log,
                Duration::from_secs(30),
            );
            if let Ok((pid, _)) = &r {
                proc::stop(*pid, Duration::from_secs(10));
            }
            r
        })
        .await
        .map_err(std::io::Error::other)??;
        let _ = std::fs::remove_file(&floor_socket);
        if i >= 3 {
            floors.push(stats::as_ms(floor.1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    svc.stop();
    let r = Summary::of(&restarts);
    let f = Summary::of(&floors);
    let mut t = Table::new(&[
        "measure",
        "n",
        "median ms",
        "p10–p90 ms",
        "p99 ms",
        "min–max ms",
    ]);
    for (name, s) in [
        (
            "restart: control-socket request → new PID (example service)",
            &r,
        ),
        (
            "floor: posix_spawn of the same binary → ready on a pipe",
            &f,
        ),
    ] {
        t.row(vec![
            name.into(),
            s.n.to_string(),
            stats::ms(s.median),
            format!("{}–{}", stats::ms(s.p10), stats::ms(s.p90)),
            stats::ms(s.p99),
            format!("{}–{}", stats::ms(s.min), stats::ms(s.max)),
        ]);
    }
    t.row(vec![
        "ratio restart / floor".into(),
        String::new(),
        stats::ratio(r.median / f.median),
        String::new(),
        stats::ratio(r.p99 / f.p99),
        format!("min {}", stats::ratio(r.min / f.min)),
    ]);
    let mut out = t.render();
    out.push_str(&phases(svc.log_path()));
    if !failures.is_empty() {
        out.push_str(&format!(
            "\n{} restarts failed; first: {}\n",
            failures.len(),
            failures[0]
        ));
    }
    Ok(out)
}

/// The library's own timings of each restart's phases, read from the service's log (tracing
/// lines `restart: successor spawned … elapsed=…` etc., measured from the restart's start in the
/// old process).
fn phases(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut t = Table::new(&[
        "phase (old process's clock, from the restart's start)",
        "n",
        "median ms",
        "p10–p90 ms",
    ]);
    for (needle, name) in [
        (
            "restart: successor spawned",
            "successor spawned (posix_spawn returned)",
        ),
        ("restart: state sent", "state written and committed"),
        ("restart: successor ready", "successor declared ready"),
    ] {
        let v: Vec<f64> = text
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(elapsed_ms)
            .collect();
        if v.is_empty() {
            continue;
        }
        let s = Summary::of(&v);
        t.row(vec![
            name.into(),
            s.n.to_string(),
            stats::ms(s.median),
            format!("{}–{}", stats::ms(s.p10), stats::ms(s.p90)),
        ]);
    }
    format!("\n{}", t.render())
}

/// The `elapsed=1.23ms` field of a tracing line, in ms.
fn elapsed_ms(line: &str) -> Option<f64> {
    let clean: String = {
        // Drop ANSI colour sequences.
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let v = clean.split("elapsed=").nth(1)?.split_whitespace().next()?;
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let x: f64 = num.parse().ok()?;
    let unit = &v[num.len()..];
    Some(match unit {
        "ns" => x / 1e6,
        "µs" | "us" => x / 1e3,
        "ms" => x,
        "s" => x * 1e3,
        _ => return None,
    })
}
