//! The `load` and `peers` benchmarks: continuous HTTP load on a service while it is restarted
//! every 250 ms, counting every failed request and the latency inside the restart windows.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::env::Bins;
use crate::loadgen::{FAILURES, Load, LoadSpec, Mode, Outcome, Sample};
use crate::proc::{self, TempDir};
use crate::stats::{self, Summary, Table};

/// Which restart library serves the HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// This crate, through the example service (fork/exec lifecycle).
    Ours,
    /// ecdysis 1.1.1.
    Ecdysis,
    /// shellflip 2.1.3 as released.
    Shellflip2,
    /// A service this driver did not start, restarted by a command (the systemd half).
    External,
    /// axum on this crate with the drain axum documents (`with_graceful_shutdown`).
    AxumDocumented,
    /// axum on this crate through `shellflip::axum::serve` (`examples/axum.rs`).
    Axum,
    /// hyper-util's `auto` (HTTP/1.1 and h2c) through `shellflip::http::serve`.
    Auto,
}

impl Flavor {
    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Ours => "shellflip 3 (this crate)",
            Flavor::Ecdysis => "ecdysis 1.1.1",
            Flavor::Shellflip2 => "shellflip 2.1.3",
            Flavor::External => "external",
            Flavor::AxumDocumented => "axum, its documented drain",
            Flavor::Axum => "axum, shellflip::axum::serve",
            Flavor::Auto => "hyper-util auto, shellflip::http::serve",
        }
    }
}

/// A running service under test and every PID it has had.
pub struct Service {
    flavor: Flavor,
    /// Its HTTP address.
    pub addr: SocketAddr,
    socket: PathBuf,
    pidfile: PathBuf,
    /// The current generation's PID.
    pub pid: i32,
    pids: Vec<i32>,
    restart_cmd: Vec<String>,
    log: PathBuf,
}

impl Service {
    /// A service started elsewhere (in a container), restarted by running `restart_cmd`, which
    /// must exit 0 once the restart is done.
    pub fn external(addr: SocketAddr, restart_cmd: Vec<String>) -> Service {
        Service {
            flavor: Flavor::External,
            addr,
            socket: PathBuf::new(),
            pidfile: PathBuf::new(),
            pid: 0,
            pids: Vec::new(),
            restart_cmd,
            log: PathBuf::new(),
        }
    }

    /// Starts the first generation and waits until it answers.
    pub fn start(
        flavor: Flavor,
        bins: &Bins,
        dir: &TempDir,
        tag: &str,
        config: &str,
    ) -> std::io::Result<Service> {
        Service::start_logged(flavor, bins, dir, tag, config, "warn")
    }

    /// Like [`start`](Self::start), with the service's `RUST_LOG`.
    pub fn start_logged(
        flavor: Flavor,
        bins: &Bins,
        dir: &TempDir,
        tag: &str,
        config: &str,
        rust_log: &str,
    ) -> std::io::Result<Service> {
        let addr: SocketAddr = format!("127.0.0.1:{}", proc::free_port())
            .parse()
            .map_err(std::io::Error::other)?;
        let socket = dir.join(&format!("{tag}.sock"));
        let pidfile = dir.join(&format!("{tag}.pid"));
        let log = dir.join(&format!("{tag}.log"));
        let a = |s: &str| OsString::from(s);
        let (program, args) = match flavor {
            Flavor::Ours => {
                let cfg = dir.join(&format!("{tag}.toml"));
                std::fs::write(&cfg, config)?;
                (
                    &bins.restarter,
                    vec![
                        a("--http"),
                        a(&addr.to_string()),
                        a("--echo"),
                        a(&format!("127.0.0.1:{}", proc::free_port())),
                        a("--socket"),
                        socket.clone().into(),
                        a("--config"),
                        cfg.into(),
                    ],
                )
            }
            Flavor::Ecdysis => (
                &bins.ecdysis,
                vec![
                    a("--http"),
                    a(&addr.to_string()),
                    a("--socket"),
                    socket.clone().into(),
                    a("--pidfile"),
                    pidfile.clone().into(),
                ],
            ),
            Flavor::External => {
                return Err(std::io::Error::other(
                    "an external service is not started here",
                ));
            }
            Flavor::Axum => (
                &bins.axum,
                vec![
                    a("--http"),
                    a(&addr.to_string()),
                    a("--socket"),
                    socket.clone().into(),
                ],
            ),
            Flavor::AxumDocumented | Flavor::Auto => (
                &bins.fw,
                vec![
                    a("--server"),
                    a(if flavor == Flavor::Auto {
                        "auto"
                    } else {
                        "axum-documented"
                    }),
                    a("--http"),
                    a(&addr.to_string()),
                    a("--socket"),
                    socket.clone().into(),
                ],
            ),
            Flavor::Shellflip2 => (
                &bins.shellflip2,
                vec![
                    a("--http"),
                    a(&addr.to_string()),
                    a("--socket"),
                    socket.clone().into(),
                ],
            ),
        };
        let env = [("RUST_LOG", OsString::from(rust_log))];
        let pid = proc::spawn(program, &args, &env, &log)?;
        let mut svc = Service {
            flavor,
            addr,
            socket,
            pidfile,
            pid,
            pids: vec![pid],
            restart_cmd: Vec::new(),
            log: log.clone(),
        };
        if !proc::wait_for_port(addr, Duration::from_secs(20))
            || !proc::wait_for_path(&svc.socket, Duration::from_secs(5))
        {
            svc.stop();
            return Err(std::io::Error::other(format!(
                "{} did not start (see {})",
                flavor.name(),
                log.display()
            )));
        }
        Ok(svc)
    }

    /// A service of this crate started by the caller (a `bench-svc`), restarted through its
    /// control socket at `socket`.
    pub fn adopt(pid: i32, socket: PathBuf) -> Service {
        Service {
            flavor: Flavor::Ours,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            socket,
            pidfile: PathBuf::new(),
            pid,
            pids: vec![pid],
            restart_cmd: Vec::new(),
            log: PathBuf::new(),
        }
    }

    /// Where its generations write their output.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// Its control socket.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket
    }

    /// Restarts it once and waits for the outcome: the new PID, or why not.
    pub async fn restart(&mut self) -> Result<u32, String> {
        let work = async {
            match self.flavor {
                Flavor::Ours | Flavor::Axum | Flavor::AxumDocumented | Flavor::Auto => {
                    shellflip::RestartCoordinationSocket::connect(&self.socket)
                        .await
                        .map_err(|e| e.to_string())?
                        .send_restart_command()
                        .await
                        .map_err(|e| e.to_string())
                }
                Flavor::Shellflip2 => shellflip2::RestartConfig {
                    enabled: true,
                    coordination_socket_path: self.socket.clone(),
                    ..Default::default()
                }
                .request_restart()
                .await
                .map_err(|e| e.to_string()),
                Flavor::External => {
                    let Some((program, args)) = self.restart_cmd.split_first() else {
                        return Err("no restart command".to_owned());
                    };
                    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
                    let pid = proc::spawn(
                        std::path::Path::new(program),
                        &args,
                        &[],
                        std::path::Path::new("/dev/null"),
                    )
                    .map_err(|e| format!("{program}: {e}"))?;
                    let status = tokio::task::spawn_blocking(move || {
                        proc::wait_exit(pid, Duration::from_secs(60))
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    match status.as_deref() {
                        Some("exit 0") => Ok(0),
                        other => Err(format!("{}: {other:?}", self.restart_cmd.join(" "))),
                    }
                }
                Flavor::Ecdysis => {
                    // The trigger connection stays open until the upgrade is over; the new
                    // process wrote its PID file once ready.
                    use tokio::io::AsyncReadExt;
                    let mut s = tokio::net::UnixStream::connect(&self.socket)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                    let text = tokio::fs::read_to_string(&self.pidfile)
                        .await
                        .map_err(|e| e.to_string())?;
                    let pid: u32 = text.trim().parse().map_err(|_| "bad PID file".to_owned())?;
                    if pid as i32 == self.pid {
                        Err("upgrade failed: the PID file still names the old process".into())
                    } else {
                        Ok(pid)
                    }
                }
            }
        };
        let result = match tokio::time::timeout(Duration::from_secs(60), work).await {
            Ok(r) => r,
            Err(_) => Err("no answer within 60 s".into()),
        };
        match result {
            // An external service's restart command does not tell the new PID (0).
            Ok(pid) if pid > 0 => {
                // A PID seen before belongs to this new generation now: without this, a stale
                // exit would keep `stop` from ending it.
                proc::forget(pid as i32);
                self.pid = pid as i32;
                self.pids.push(pid as i32);
            }
            _ => {}
        }
        result
    }

    /// The generation the service reports on `GET /`.
    pub fn generation(&self) -> String {
        match crate::loadgen::get_root(self.addr) {
            Ok(body) => body
                .split_whitespace()
                .find_map(|w| w.strip_prefix("generation="))
                .map(str::to_owned)
                .unwrap_or(body),
            Err(e) => format!("({e})"),
        }
    }

    /// Ends every generation that is still running.
    pub fn stop(&mut self) {
        for &pid in self.pids.iter().rev() {
            if proc::alive(pid) {
                proc::stop(pid, Duration::from_secs(12));
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One restart as the initiator saw it.
#[derive(Debug, Clone)]
pub struct RestartRecord {
    /// Request sent, µs since the run's origin.
    pub at_us: u64,
    /// Outcome received, µs since the run's origin.
    pub done_us: u64,
    /// The new PID, or why not.
    pub result: Result<u32, String>,
}

/// One repeat: load for the whole time, `restarts` restarts `interval` apart.
pub struct Repeat {
    /// Every request.
    pub samples: Vec<Sample>,
    /// Every restart.
    pub restarts: Vec<RestartRecord>,
    /// Length of the run.
    pub elapsed: Duration,
}

/// Runs one repeat against `svc`.
pub async fn run_repeat(
    svc: &mut Service,
    spec: LoadSpec,
    restarts: usize,
    interval: Duration,
) -> Repeat {
    let origin = Instant::now();
    let load = Load::start(spec, origin);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut records = Vec::with_capacity(restarts);
    let mut next = tokio::time::Instant::now();
    for _ in 0..restarts {
        tokio::time::sleep_until(next).await;
        let at = Instant::now();
        next = tokio::time::Instant::from_std(at + interval);
        let result = svc.restart().await;
        let done = Instant::now();
        records.push(RestartRecord {
            at_us: (at - origin).as_micros() as u64,
            done_us: (done - origin).as_micros() as u64,
            result,
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let samples = load.finish().await;
    Repeat {
        samples,
        restarts: records,
        elapsed: origin.elapsed(),
    }
}

/// How long after a restart's answer requests still count as inside its window.
pub const WINDOW_TAIL_US: u64 = 50_000;

/// The figures of one repeat.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Requests sent.
    pub requests: u64,
    /// Failures per kind, in [`FAILURES`] order.
    pub failures: [u64; FAILURES.len()],
    /// Failures that started inside a restart window.
    pub failures_in_windows: u64,
    /// Requests per second.
    pub rate: f64,
    /// Latency of successful requests (ms, from a histogram at [`stats::SIGFIG`] significant
    /// figures): p50, p99, max.
    pub all: [f64; 3],
    /// The same inside restart windows.
    pub windows: [f64; 3],
    /// Restarts that succeeded, and that were asked for.
    pub restarts_ok: u64,
    /// Restarts asked for.
    pub restarts: u64,
    /// Restart latencies (ms), successful restarts only.
    pub restart_ms: Vec<f64>,
    /// The first failures' reasons.
    pub restart_errors: Vec<String>,
}

impl Figures {
    /// Computes the figures of a repeat.
    pub fn of(r: &Repeat) -> Figures {
        let mut f = Figures {
            requests: r.samples.len() as u64,
            rate: r.samples.len() as f64 / r.elapsed.as_secs_f64(),
            restarts: r.restarts.len() as u64,
            ..Default::default()
        };
        let windows: Vec<(u64, u64)> = r
            .restarts
            .iter()
            .map(|x| (x.at_us, x.done_us + WINDOW_TAIL_US))
            .collect();
        // Latencies in µs, read back in ms.
        let mut all = stats::histogram();
        let mut inside = stats::histogram();
        let mut w = 0;
        for s in &r.samples {
            while w < windows.len() && windows[w].1 < s.start_us {
                w += 1;
            }
            let in_window = w < windows.len() && windows[w].0 <= s.start_us;
            if s.outcome == Outcome::Ok {
                let us = u64::from(s.latency_us);
                stats::record(&mut all, us);
                if in_window {
                    stats::record(&mut inside, us);
                }
            } else {
                if let Some(i) = FAILURES.iter().position(|(o, _)| *o == s.outcome) {
                    f.failures[i] += 1;
                }
                if in_window {
                    f.failures_in_windows += 1;
                }
            }
        }
        let three = |h| {
            let s = Summary::from_histogram(h, 1e-3);
            [s.median, s.p99, s.max]
        };
        f.all = three(&all);
        f.windows = three(&inside);
        for x in &r.restarts {
            match &x.result {
                Ok(_) => {
                    f.restarts_ok += 1;
                    f.restart_ms.push((x.done_us - x.at_us) as f64 / 1e3);
                }
                Err(e) => {
                    if f.restart_errors.len() < 3 {
                        f.restart_errors.push(e.clone());
                    }
                }
            }
        }
        f
    }
}

/// Every repeat of one service in one mode.
pub struct Series {
    /// Row label.
    pub label: String,
    /// Mode label.
    pub mode: &'static str,
    /// Per repeat.
    pub repeats: Vec<Figures>,
    /// Generation reported by `GET /` after the last repeat.
    pub generation: String,
}

/// The failure table, one row per series.
pub fn failure_table(series: &[Series]) -> Table {
    let mut header = vec!["service", "connections", "requests", "failed"];
    header.extend(FAILURES.iter().map(|(_, n)| *n));
    header.extend([
        "failed in restart windows",
        "restarts ok / asked",
        "generation reached",
    ]);
    let mut t = Table::new(&header);
    for s in series {
        let sum = |f: &dyn Fn(&Figures) -> u64| s.repeats.iter().map(f).sum::<u64>();
        let failed: u64 = s.repeats.iter().flat_map(|f| f.failures).sum();
        let mut row = vec![
            s.label.clone(),
            s.mode.into(),
            stats::count(sum(&|f| f.requests) as f64),
            stats::count(failed as f64),
        ];
        for i in 0..FAILURES.len() {
            row.push(stats::count(sum(&|f| f.failures[i]) as f64));
        }
        row.push(stats::count(sum(&|f| f.failures_in_windows) as f64));
        row.push(format!(
            "{} / {}",
            sum(&|f| f.restarts_ok),
            sum(&|f| f.restarts)
        ));
        row.push(s.generation.clone());
        t.row(row);
    }
    t
}

/// The latency table, one row per series: median [min–max] over repeats.
pub fn latency_table(series: &[Series]) -> Table {
    let mut t = Table::new(&[
        "service",
        "connections",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50 ms in windows",
        "p99 ms in windows",
        "max ms in windows",
        "restart ms: median [p10–p90]",
        "restart ms: p99",
    ]);
    for s in series {
        let per =
            |f: &dyn Fn(&Figures) -> f64| Summary::of(&s.repeats.iter().map(f).collect::<Vec<_>>());
        let restarts: Vec<f64> = s
            .repeats
            .iter()
            .flat_map(|f| f.restart_ms.iter().copied())
            .collect();
        let r = Summary::of(&restarts);
        t.row(vec![
            s.label.clone(),
            s.mode.into(),
            per(&|f| f.rate).range(stats::count),
            per(&|f| f.all[0]).range(stats::ms),
            per(&|f| f.all[1]).range(stats::ms),
            per(&|f| f.all[2]).range(stats::ms),
            per(&|f| f.windows[0]).range(stats::ms),
            per(&|f| f.windows[1]).range(stats::ms),
            per(&|f| f.windows[2]).range(stats::ms),
            r.spread(stats::ms),
            stats::ms(r.p99),
        ]);
    }
    t
}

/// Options shared by `load` and `peers`.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Connections of the load.
    pub connections: usize,
    /// Restarts per repeat.
    pub restarts: usize,
    /// Repeats per service and mode.
    pub repeats: usize,
    /// Time between restart requests.
    pub interval: Duration,
    /// Which modes: keep-alive, new connection per request.
    pub keepalive: bool,
    /// Also run the new-connection-per-request mode.
    pub new_connections: bool,
    /// Also run HTTP/2 cleartext with hyper's client.
    pub h2c: bool,
    /// Also run HTTP/2 cleartext with hyper's client behind the retry layer.
    pub h2c_retry: bool,
    /// Deadline of one request.
    pub timeout: Duration,
}

impl LoadOptions {
    fn modes(&self) -> Vec<Mode> {
        [
            (self.keepalive, Mode::KeepAlive),
            (self.new_connections, Mode::NewConnection),
            (self.h2c, Mode::H2c),
            (self.h2c_retry, Mode::H2cRetry),
        ]
        .into_iter()
        .filter_map(|(on, m)| on.then_some(m))
        .collect()
    }
}

/// The example service's configuration for the load: the defaults (drain 10 s).
pub const OURS_CONFIG: &str = "greeting = \"hello\"\n";

/// Runs `flavors` round-robin, every mode, `repeats` times each, and returns the series plus
/// the first repeat of each mode for the picture (of the first flavor).
pub async fn compare(
    bins: &Bins,
    flavors: &[Flavor],
    o: LoadOptions,
) -> std::io::Result<(Vec<Series>, Vec<(&'static str, Repeat)>)> {
    let dir = TempDir::new("load")?;
    let mut services = Vec::new();
    for (i, f) in flavors.iter().enumerate() {
        let svc = Service::start(*f, bins, &dir, &format!("svc{i}"), OURS_CONFIG)?;
        services.push((f.name().to_owned(), svc));
    }
    compare_services(services, o).await
}

/// Like [`compare`], with services already running, each with its label.
pub async fn compare_services(
    mut services: Vec<(String, Service)>,
    o: LoadOptions,
) -> std::io::Result<(Vec<Series>, Vec<(&'static str, Repeat)>)> {
    let mut series = Vec::new();
    let mut pictures = Vec::new();
    for m in o.modes() {
        let mode = m.label();
        let mut per: Vec<Vec<Figures>> = vec![Vec::new(); services.len()];
        for r in 0..o.repeats {
            for (i, (label, svc)) in services.iter_mut().enumerate() {
                let spec = LoadSpec {
                    addr: svc.addr,
                    connections: o.connections,
                    mode: m,
                    timeout: o.timeout,
                };
                eprintln!(
                    "{label} / {mode} / repeat {} of {}: {} restarts every {} ms under {} connections",
                    r + 1,
                    o.repeats,
                    o.restarts,
                    o.interval.as_millis(),
                    o.connections
                );
                let rep = run_repeat(svc, spec, o.restarts, o.interval).await;
                let fig = Figures::of(&rep);
                let failed: u64 = fig.failures.iter().sum();
                eprintln!(
                    "  {} requests, {failed} failed, {}/{} restarts ok{}",
                    fig.requests,
                    fig.restarts_ok,
                    fig.restarts,
                    fig.restart_errors
                        .first()
                        .map(|e| format!(" (first error: {e})"))
                        .unwrap_or_default()
                );
                per[i].push(fig);
                if i == 0 && r == 0 {
                    pictures.push((mode, rep));
                }
                // Let the old generations finish draining before the next repeat.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        for (i, figs) in per.into_iter().enumerate() {
            series.push(Series {
                label: services[i].0.clone(),
                mode,
                repeats: figs,
                generation: services[i].1.generation(),
            });
        }
    }
    for (_, s) in &mut services {
        s.stop();
    }
    Ok((series, pictures))
}

/// The SVG of the first repeat of each mode: the whole run, and a close-up of its first second
/// of restarts.
pub fn picture(runs: &[(&'static str, Repeat)], who: &str) -> std::io::Result<String> {
    let mut windows = Vec::new();
    for (_, r) in runs {
        windows.push(
            r.restarts
                .iter()
                .map(|x| (x.at_us, x.done_us))
                .collect::<Vec<_>>(),
        );
    }
    let mut panels = Vec::new();
    for ((mode, r), w) in runs.iter().zip(&windows) {
        let end = r.elapsed.as_micros() as u64;
        panels.push(crate::svg::Panel {
            title: format!(
                "{who}, {mode}: whole run ({} restarts; bins of 20 ms)",
                r.restarts.len()
            ),
            samples: &r.samples,
            windows: w,
            from_us: 0,
            to_us: end,
            bin_us: 20_000,
        });
        let from = r.restarts.get(2).map(|x| x.at_us - 20_000).unwrap_or(0);
        panels.push(crate::svg::Panel {
            title: format!("{who}, {mode}: close-up of 1.1 s (bins of 1 ms)"),
            samples: &r.samples,
            windows: w,
            from_us: from,
            to_us: (from + 1_100_000).min(end),
            bin_us: 1_000,
        });
    }
    crate::svg::render(&panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_latencies_in_ms() {
        // 1 to 100 ms, one request every ms; the restart window holds those sent at 40–95 ms
        // (a restart of 5 ms and the window's tail), and the one sent at 50 ms fails.
        let samples = (1..=100u32)
            .map(|i| Sample {
                start_us: u64::from(i) * 1000,
                latency_us: i * 1000,
                outcome: if i == 50 { Outcome::Reset } else { Outcome::Ok },
            })
            .collect();
        let r = Repeat {
            samples,
            restarts: vec![RestartRecord {
                at_us: 40_000,
                done_us: 45_000,
                result: Ok(2),
            }],
            elapsed: Duration::from_millis(100),
        };
        let f = Figures::of(&r);
        assert_eq!(
            (f.requests, f.failures[1], f.failures_in_windows),
            (100, 1, 1)
        );
        let close = |got: [f64; 3], want: [f64; 3]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= w * 1e-3, "{got:?} is not {want:?}");
            }
        };
        // Nearest rank among the 99 answered: the 50th and the 99th.
        close(f.all, [51.0, 100.0, 100.0]);
        // Among the 55 answered in the window: the 28th, the 55th.
        close(f.windows, [68.0, 95.0, 95.0]);
        assert_eq!(f.restart_ms, [5.0]);
    }
}
