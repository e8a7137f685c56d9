//! h2load (nghttp2's HTTP/2 load generator) against the hyper-util `auto` service while it is
//! restarted. h2load does not reconnect a connection the server sent GOAWAY on, so it runs in
//! back-to-back runs of `run_secs` each, and the restarts go on across them; the figures are
//! h2load's own counts, summed over the runs.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::env::Bins;
use crate::load::{Flavor, OURS_CONFIG, Service};
use crate::proc::{self, TempDir};
use crate::stats::{self, Table};

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct H2loadOptions {
    /// Restarts in all.
    pub restarts: usize,
    /// Time between restart requests.
    pub interval: Duration,
    /// h2load's `-c`.
    pub clients: usize,
    /// h2load's `-m`.
    pub streams: usize,
    /// h2load's `-D`, seconds.
    pub run_secs: u64,
}

/// h2load's `requests:` line, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    runs: u64,
    total: u64,
    started: u64,
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
}

impl Counts {
    /// Adds the `requests: N total, N started, N done, N succeeded, N failed, N errored, N
    /// timeout` line of one run's output.
    fn add(&mut self, output: &str) -> bool {
        let Some(line) = output.lines().find(|l| l.starts_with("requests:")) else {
            return false;
        };
        let mut fields = [0u64; 7];
        let words: Vec<&str> = line.trim_start_matches("requests:").split(',').collect();
        for (i, w) in words.iter().take(7).enumerate() {
            fields[i] = w
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
        self.runs += 1;
        self.total += fields[0];
        self.started += fields[1];
        self.done += fields[2];
        self.succeeded += fields[3];
        self.failed += fields[4];
        self.errored += fields[5];
        self.timeout += fields[6];
        true
    }
}

/// Runs h2load back to back against the `auto` service while it restarts; the table.
pub async fn run(bins: &Bins, o: H2loadOptions) -> std::io::Result<String> {
    let h2load = Path::new("/usr/bin/h2load");
    if !h2load.exists() {
        return Err(std::io::Error::other(
            "h2load is missing: apt-get install nghttp2-client",
        ));
    }
    let dir = TempDir::new("h2load")?;
    let mut svc = Service::start(Flavor::Auto, bins, &dir, "auto", OURS_CONFIG)?;
    let stop = Arc::new(AtomicBool::new(false));
    let log = dir.join("h2load.log");
    let args: Vec<OsString> = [
        "-c".to_owned(),
        o.clients.to_string(),
        "-m".to_owned(),
        o.streams.to_string(),
        "-D".to_owned(),
        o.run_secs.to_string(),
        format!("http://{}/", svc.addr),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let runs = {
        let (stop, log) = (stop.clone(), log.clone());
        tokio::task::spawn_blocking(move || {
            let mut counts = Counts::default();
            let mut unparsed = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let _ = std::fs::remove_file(&log);
                let Ok(pid) = proc::spawn(h2load, &args, &[], &log) else {
                    unparsed += 1;
                    break;
                };
                let status = proc::wait_exit(pid, Duration::from_secs(o.run_secs + 30));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if status.is_none() || !counts.add(&text) {
                    unparsed += 1;
                    eprintln!("h2load: {status:?}\n{text}");
                }
            }
            (counts, unparsed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut next = tokio::time::Instant::now();
    for i in 0..o.restarts {
        tokio::time::sleep_until(next).await;
        next += o.interval;
        match svc.restart().await {
            Ok(_) => ok += 1,
            Err(e) => errors.push(e),
        }
        if (i + 1) % 50 == 0 {
            eprintln!("h2load: {} restarts", i + 1);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (counts, unparsed) = runs.await.map_err(std::io::Error::other)?;
    let generation = svc.generation();
    svc.stop();
    let mut t = Table::new(&[
        "service",
        "client",
        "h2load runs",
        "requests started",
        "succeeded",
        "failed",
        "errored",
        "timeout",
        "restarts ok / asked",
        "generation reached",
    ]);
    t.row(vec![
        Flavor::Auto.name().to_owned(),
        format!(
            "h2load -c{} -m{} -D{} (h2c)",
            o.clients, o.streams, o.run_secs
        ),
        format!(
            "{}{}",
            counts.runs,
            if unparsed > 0 {
                format!(" ({unparsed} unreadable)")
            } else {
                String::new()
            }
        ),
        stats::count(counts.started as f64),
        stats::count(counts.succeeded as f64),
        stats::count(counts.failed as f64),
        stats::count(counts.errored as f64),
        stats::count(counts.timeout as f64),
        format!("{ok} / {}", o.restarts),
        generation,
    ]);
    let _ = (counts.total, counts.done);
    if let Some(e) = errors.first() {
        eprintln!("first restart error: {e}");
    }
    Ok(t.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_requests_line() {
        let mut c = Counts::default();
        let out = "finished in 1.00s, 1000 req/s\nrequests: 1000 total, 1010 started, 1000 done, 990 succeeded, 10 failed, 10 errored, 0 timeout\n";
        assert!(c.add(out));
        assert_eq!(
            (c.runs, c.total, c.started, c.succeeded, c.failed, c.errored),
            (1, 1000, 1010, 990, 10, 10)
        );
        assert!(!c.add("no such line"));
    }
}
