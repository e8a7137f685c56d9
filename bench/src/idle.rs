//! The `idle` benchmark: what arming shellflip costs a service that is not restarting: resident
//! memory, threads and open descriptors of the example service, beside the same HTTP and echo
//! servers without shellflip (`bench-plain`), and beside the example after ten restarts.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use crate::env::Bins;
use crate::load::{Flavor, OURS_CONFIG, Service};
use crate::proc::{self, Footprint, TempDir};
use crate::stats::{self, Summary, Table};

fn warm(addr: SocketAddr) {
    for _ in 0..200 {
        let _ = crate::loadgen::get_root(addr);
    }
}

/// Starts each service `reps` times, warms it with 200 requests, and reads its footprint.
pub async fn run(bins: &Bins, reps: usize) -> std::io::Result<String> {
    let dir = TempDir::new("idle")?;
    let mut armed = Vec::new();
    let mut plain = Vec::new();
    let mut after = Vec::new();
    for i in 0..reps {
        eprintln!("idle: repeat {} of {reps}", i + 1);
        // The example service, armed.
        // Both services log at `info`, the example's default.
        let mut svc = Service::start_logged(
            Flavor::Ours,
            bins,
            &dir,
            &format!("armed{i}"),
            OURS_CONFIG,
            "info",
        )?;
        let addr = svc.addr;
        tokio::task::spawn_blocking(move || warm(addr))
            .await
            .map_err(std::io::Error::other)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        armed.push(proc::footprint(svc.pid)?);
        // The same process chain after ten restarts.
        for _ in 0..10 {
            let old = svc.pid;
            if let Err(e) = svc.restart().await {
                eprintln!("  restart failed: {e}");
            }
            let _ =
                tokio::task::spawn_blocking(move || proc::wait_exit(old, Duration::from_secs(15)))
                    .await;
        }
        tokio::task::spawn_blocking(move || warm(addr))
            .await
            .map_err(std::io::Error::other)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        after.push(proc::footprint(svc.pid)?);
        svc.stop();
        // Without shellflip.
        let http: SocketAddr = format!("127.0.0.1:{}", proc::free_port())
            .parse()
            .map_err(std::io::Error::other)?;
        let cfg = dir.join("plain.toml");
        std::fs::write(&cfg, OURS_CONFIG)?;
        let args: Vec<OsString> = vec![
            "--http".into(),
            http.to_string().into(),
            "--echo".into(),
            format!("127.0.0.1:{}", proc::free_port()).into(),
            "--config".into(),
            cfg.into(),
        ];
        let log = dir.join("plain.log");
        let pid = proc::spawn(&bins.plain, &args, &[("RUST_LOG", "info".into())], &log)?;
        if !proc::wait_for_port(http, Duration::from_secs(20)) {
            proc::stop(pid, Duration::from_secs(5));
            return Err(std::io::Error::other("bench-plain did not start"));
        }
        tokio::task::spawn_blocking(move || warm(http))
            .await
            .map_err(std::io::Error::other)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        plain.push(proc::footprint(pid)?);
        proc::stop(pid, Duration::from_secs(5));
    }
    let mut t = Table::new(&[
        "service",
        "n",
        "resident memory KiB: median [min–max]",
        "threads",
        "open descriptors",
    ]);
    let row = |name: &str, v: &[Footprint]| {
        let rss = Summary::of(&v.iter().map(|f| f.rss_kib as f64).collect::<Vec<_>>());
        let thr = Summary::of(&v.iter().map(|f| f.threads as f64).collect::<Vec<_>>());
        let fds = Summary::of(&v.iter().map(|f| f.fds as f64).collect::<Vec<_>>());
        vec![
            name.to_owned(),
            v.len().to_string(),
            rss.range(stats::count),
            thr.range(stats::count),
            fds.range(stats::count),
        ]
    };
    t.row(row(
        "same HTTP + echo without shellflip (bench-plain)",
        &plain,
    ));
    t.row(row(
        "example service, shellflip armed (generation 0)",
        &armed,
    ));
    t.row(row(
        "example service after 10 restarts (generation 10)",
        &after,
    ));
    let med = |v: &[Footprint], f: fn(&Footprint) -> u64| {
        stats::median(&v.iter().map(|x| f(x) as f64).collect::<Vec<_>>())
    };
    t.row(vec![
        "difference armed − without".into(),
        String::new(),
        format!(
            "{:+.0} KiB ({})",
            med(&armed, |f| f.rss_kib) - med(&plain, |f| f.rss_kib),
            stats::ratio(med(&armed, |f| f.rss_kib) / med(&plain, |f| f.rss_kib))
        ),
        format!(
            "{:+.0}",
            med(&armed, |f| f.threads) - med(&plain, |f| f.threads)
        ),
        format!("{:+.0}", med(&armed, |f| f.fds) - med(&plain, |f| f.fds)),
    ]);
    Ok(t.render())
}
