//! The benchmark driver: `cargo run --release -p shellflip-bench -- <benchmark> [options]`.
//!
//! Every benchmark builds what it starts (the example service and the bench services), runs
//! its comparisons inside one run, prints a markdown table and writes it to
//! `bench/results/<benchmark>.md`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shellflip_bench::load::{Flavor, LoadOptions};
use shellflip_bench::{env, h2load, idle, latency, load, rollback, scaling, sdunit, state};

#[derive(Parser)]
#[command(about = "Benchmarks of shellflip (see BENCHMARKS.md)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
    /// Do not build the example service and the bench services first.
    #[arg(long, global = true)]
    no_build: bool,
}

#[derive(Args, Clone, Copy)]
struct LoadArgs {
    /// Concurrent connections of the load.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Restarts per repeat.
    #[arg(long)]
    restarts: Option<usize>,
    /// Repeats per service and mode.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Milliseconds between restart requests.
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
    /// Only keep-alive connections.
    #[arg(long, conflicts_with = "new_only")]
    keepalive_only: bool,
    /// Only a new connection per request.
    #[arg(long)]
    new_only: bool,
    /// Deadline of one request, milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

impl LoadArgs {
    fn options(self, default_restarts: usize) -> LoadOptions {
        LoadOptions {
            connections: self.connections,
            restarts: self.restarts.unwrap_or(default_restarts),
            repeats: self.repeats,
            interval: Duration::from_millis(self.interval_ms),
            keepalive: !self.new_only,
            new_connections: !self.keepalive_only,
            h2c: false,
            h2c_retry: false,
            timeout: Duration::from_millis(self.timeout_ms),
        }
    }
}

#[derive(Subcommand)]
enum Bench {
    /// Failed requests under continuous load while the example service restarts every 250 ms.
    Load(LoadArgs),
    /// The same load against ecdysis 1.1.1 and shellflip 2.1.3, in the same run.
    Peers(LoadArgs),
    /// Frameworks: axum with its documented drain and with `shellflip::axum::serve`, hyper-util
    /// `auto` over HTTP/1.1 and h2c (hyper's client with and without the retry layer), and h2load.
    Frameworks {
        #[command(flatten)]
        load: LoadArgs,
        /// Only these parts, comma-separated: axum, auto, h2load.
        #[arg(long, value_delimiter = ',', default_value = "axum,auto,h2load")]
        only: Vec<String>,
        /// h2load's `-D`: seconds per h2load run.
        #[arg(long, default_value_t = 1)]
        h2load_secs: u64,
    },
    /// The load against a service started elsewhere (the systemd half, in a container: see
    /// scripts/bench-systemd.sh), restarted by a command that exits 0 once the restart is done.
    External {
        #[command(flatten)]
        load: LoadArgs,
        /// The service's HTTP address.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// The restart command, split on whitespace.
        #[arg(long)]
        restart_cmd: String,
        /// The service's label in the tables.
        #[arg(long)]
        label: String,
        /// Results go to bench/results/<name>.md and <name>.svg.
        #[arg(long)]
        name: String,
    },
    /// The systemd lifecycle's accept gap and READY=1 timing, against the example unit in a
    /// container (see scripts/bench-systemd-store.sh): a probe connects every millisecond.
    SystemdGap {
        /// The service's HTTP address.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// The command that runs systemctl in the container, split on whitespace.
        #[arg(long)]
        systemctl: String,
        /// The unit.
        #[arg(long, default_value = "restarter")]
        unit: String,
        /// `restart`, or `reload` for the fork/exec unit.
        #[arg(long, default_value = "restart")]
        verb: String,
        /// Restarts.
        #[arg(long, default_value_t = 60)]
        restarts: usize,
        /// Milliseconds between restarts.
        #[arg(long, default_value_t = 200)]
        pause_ms: u64,
        /// Microseconds between probe connections.
        #[arg(long, default_value_t = 1000)]
        probe_us: u64,
        /// Results go to bench/results/<name>.md.
        #[arg(long, default_value = "systemd-gap")]
        name: String,
        /// Which systemd, for the run's description (`systemctl --version`'s first line).
        #[arg(long, default_value = "")]
        systemd: String,
    },
    /// Echo clients kept in systemd's file descriptor store across `systemctl restart`
    /// (see scripts/bench-systemd-store.sh).
    SystemdStore {
        /// The service's echo address.
        #[arg(long)]
        echo: std::net::SocketAddr,
        /// The command that runs systemctl in the container, split on whitespace.
        #[arg(long)]
        systemctl: String,
        /// The unit.
        #[arg(long, default_value = "restarter")]
        unit: String,
        /// Client counts, comma-separated.
        #[arg(long, default_value = "0,1000,10000", value_delimiter = ',')]
        clients: Vec<usize>,
        /// Restarts per count.
        #[arg(long, default_value_t = 20)]
        restarts: usize,
        /// Results go to bench/results/<name>.md.
        #[arg(long, default_value = "systemd-store")]
        name: String,
        /// Which systemd, for the run's description (`systemctl --version`'s first line).
        #[arg(long, default_value = "")]
        systemd: String,
    },
    /// Restart latency beside the floor (posix_spawn of the same binary until ready).
    Latency {
        /// Restarts (and floor start-ups).
        #[arg(long, default_value_t = 120)]
        restarts: usize,
    },
    /// Restart latency against held memory, listeners and state size.
    Scaling {
        /// Restarts per point.
        #[arg(long, default_value_t = 15)]
        restarts: usize,
        /// Restarts for the 1 GiB state.
        #[arg(long, default_value_t = 6)]
        restarts_big_state: usize,
        /// Only one dimension: memory, listeners or state.
        #[arg(long)]
        only: Option<String>,
    },
    /// State handover throughput beside a raw pipe, a raw memfd and a memory copy.
    State {
        /// Repeats per size (default 10, 7 and 5 for 1 MiB, 64 MiB and 1 GiB).
        #[arg(long)]
        repeats: Option<usize>,
    },
    /// Probation and rollback under load: restarts with a probation, every other one crashing
    /// after it is ready (issue 14).
    Rollback {
        /// Restarts; the odd ones crash.
        #[arg(long, default_value_t = 100)]
        restarts: usize,
        /// Connections of each load (keep-alive, and new per request), both at once.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// The service's --probation-ms.
        #[arg(long, default_value_t = 1000)]
        probation_ms: u64,
        /// crash_after_ready_ms of the odd restarts.
        #[arg(long, default_value_t = 300)]
        crash_after_ms: u64,
        /// Milliseconds between a restart's answer and the next request.
        #[arg(long, default_value_t = 200)]
        pause_ms: u64,
        /// Probe threads.
        #[arg(long, default_value_t = 2)]
        probes: usize,
        /// At most one probe connection per thread this often, microseconds.
        #[arg(long, default_value_t = 250)]
        probe_us: u64,
        /// Deadline of one request, milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Diagnosis: sample the generations' threads every 4 ms (perturbs the figures).
        #[arg(long)]
        watch_threads: bool,
    },
    /// Idle cost: memory, threads, descriptors with and without shellflip.
    Idle {
        /// Fresh starts of each service.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
}

/// " (under systemd N ...)" for a run's description, or nothing.
fn under(systemd: &str) -> String {
    if systemd.is_empty() {
        String::new()
    } else {
        format!(" under {systemd}")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bins = match env::prepare(!cli.no_build) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("shellflip-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let revision = env::revision();
    // From here on this process reaps every generation it starts (and nothing else may wait).
    shellflip_bench::proc::start_reaper();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shellflip-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let machine = env::machine();
    let (name, command, result) = runtime.block_on(async {
        match cli.bench {
            Bench::Load(a) => {
                let o = a.options(70);
                let r = load::compare(&bins, &[Flavor::Ours], o).await.map(|(series, pics)| {
                    let svg = load::picture(&pics, "shellflip 3 example service");
                    let path = env::results_dir().join("latency.svg");
                    write_picture(&path, svg);
                    tables(&series)
                });
                ("load", format!("load: {}", describe(&o)), r)
            }
            Bench::Peers(a) => {
                let o = a.options(25);
                let r = load::compare(
                    &bins,
                    &[Flavor::Ours, Flavor::Ecdysis, Flavor::Shellflip2],
                    o,
                )
                .await
                .map(|(series, _)| {
                    tables(&series)
                });
                ("peers", format!("peers: {}", describe(&o)), r)
            }
            Bench::Frameworks { load: a, only, h2load_secs } => {
                let mut o = a.options(200);
                // One repeat of `--restarts` (200) restarts per row; `--repeats` does not apply.
                o.repeats = 1;
                let mut text = String::new();
                let mut series = Vec::new();
                let mut result = Ok(());
                let groups = [
                    ("axum", Flavor::AxumDocumented, "frameworks-axum-documented", false),
                    ("axum", Flavor::Axum, "frameworks-axum", false),
                    ("auto", Flavor::Auto, "frameworks-auto", true),
                ];
                for (part, flavor, picture, h2) in groups {
                    if !only.iter().any(|p| p == part) {
                        continue;
                    }
                    let mut o = o;
                    if h2 {
                        o.new_connections = false;
                        o.h2c = true;
                        o.h2c_retry = true;
                    }
                    let r = async {
                        let dir = shellflip_bench::proc::TempDir::new("fw")?;
                        let svc = load::Service::start(flavor, &bins, &dir, "fw", load::OURS_CONFIG)?;
                        load::compare_services(vec![(flavor.name().to_owned(), svc)], o).await
                    }
                    .await;
                    match r {
                        Ok((s, pics)) => {
                            let svg = load::picture(&pics, flavor.name());
                            write_picture(&env::results_dir().join(format!("{picture}.svg")), svg);
                            series.extend(s);
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                if !series.is_empty() {
                    text.push_str(&tables(&series));
                }
                if result.is_ok() && only.iter().any(|p| p == "h2load") {
                    let ho = h2load::H2loadOptions {
                        restarts: o.restarts,
                        interval: o.interval,
                        clients: o.connections,
                        streams: shellflip_bench::loadgen::H2_STREAMS,
                        run_secs: h2load_secs,
                    };
                    match h2load::run(&bins, ho).await {
                        Ok(t) => text.push_str(&format!("\n{t}")),
                        Err(e) => result = Err(e),
                    }
                }
                // A partial run does not overwrite the whole one's results.
                let name: &'static str = if only.len() == 3 {
                    "frameworks"
                } else {
                    Box::leak(format!("frameworks-{}", only.join("-")).into_boxed_str())
                };
                (
                    name,
                    format!("frameworks --only {}: {} (HTTP/2: {} streams per connection)", only.join(","), describe(&o), shellflip_bench::loadgen::H2_STREAMS),
                    result.map(|()| text),
                )
            }
            Bench::External {
                load: a,
                addr,
                restart_cmd,
                label,
                name,
            } => {
                let o = a.options(70);
                let cmd: Vec<String> = restart_cmd.split_whitespace().map(str::to_owned).collect();
                let svc = load::Service::external(addr, cmd);
                let r = load::compare_services(vec![(label.clone(), svc)], o)
                    .await
                    .map(|(series, pics)| {
                        let svg = load::picture(&pics, &label);
                        let path = env::results_dir().join(format!("{name}.svg"));
                        write_picture(&path, svg);
                        tables(&series)
                    });
                let name: &'static str = Box::leak(name.into_boxed_str());
                (
                    name,
                    format!("external ({restart_cmd}): {}", describe(&o)),
                    r,
                )
            }
            Bench::SystemdGap {
                addr,
                systemctl,
                unit,
                verb,
                restarts,
                pause_ms,
                probe_us,
                name,
                systemd,
            } => {
                let o = sdunit::GapOptions {
                    http: addr,
                    verb,
                    restarts,
                    pause: Duration::from_millis(pause_ms),
                    probe_every: Duration::from_micros(probe_us),
                    unit: sdunit::Unit {
                        systemctl: systemctl.split_whitespace().map(str::to_owned).collect(),
                        name: unit.clone(),
                    },
                };
                let command = format!(
                    "systemd-gap{}: {restarts} × `systemctl {} {unit}` {pause_ms} ms apart, a new probe connection every {probe_us} µs",
                    under(&systemd),
                    o.verb
                );
                let name: &'static str = Box::leak(name.into_boxed_str());
                (name, command, sdunit::gap(&o).await.map_err(std::io::Error::other))
            }
            Bench::SystemdStore {
                echo,
                systemctl,
                unit,
                clients,
                restarts,
                name,
                systemd,
            } => {
                let command = format!(
                    "systemd-store{}: {restarts} × `systemctl restart {unit}` per count of echo clients ({clients:?})",
                    under(&systemd)
                );
                let o = sdunit::StoreOptions {
                    echo,
                    counts: clients,
                    restarts,
                    unit: sdunit::Unit {
                        systemctl: systemctl.split_whitespace().map(str::to_owned).collect(),
                        name: unit,
                    },
                };
                let name: &'static str = Box::leak(name.into_boxed_str());
                (name, command, sdunit::store(&o).await.map_err(std::io::Error::other))
            }
            Bench::Latency { restarts } => (
                "latency",
                format!("latency: {restarts} restarts interleaved with {restarts} floor start-ups"),
                latency::run(&bins, restarts).await,
            ),
            Bench::Scaling {
                restarts,
                restarts_big_state,
                only,
            } => {
                let pick = |dim: &str, v: Vec<usize>| match &only {
                    Some(o) if o != dim => Vec::new(),
                    _ => v,
                };
                let o = scaling::ScalingOptions {
                    restarts,
                    restarts_big_state,
                    memory_mib: pick("memory", vec![0, 256, 1024]),
                    listeners: pick("listeners", vec![1, 100, 1000]),
                    state_mib: pick("state", vec![1, 64, 1024]),
                };
                (
                    "scaling",
                    format!(
                        "scaling: {restarts} restarts per point ({restarts_big_state} for 1 GiB of state)"
                    ),
                    scaling::run(&bins, &o).await,
                )
            }
            Bench::State { repeats } => {
                let o = state::StateOptions {
                    sizes: vec![
                        (1, repeats.unwrap_or(10)),
                        (64, repeats.unwrap_or(7)),
                        (1024, repeats.unwrap_or(5)),
                    ],
                };
                ("state", "state".to_owned(), state::run(&bins, &o).await)
            }
            Bench::Rollback {
                restarts,
                connections,
                probation_ms,
                crash_after_ms,
                pause_ms,
                probes,
                probe_us,
                timeout_ms,
                watch_threads,
            } => {
                let o = rollback::RollbackOptions {
                    restarts,
                    connections,
                    probation: Duration::from_millis(probation_ms),
                    crash_after: Duration::from_millis(crash_after_ms),
                    pause: Duration::from_millis(pause_ms),
                    probes,
                    probe_every: Duration::from_micros(probe_us),
                    timeout: Duration::from_millis(timeout_ms),
                    watch_threads,
                };
                let command = format!(
                    "rollback: {restarts} restarts with --probation-ms {probation_ms}, the odd ones with \
                     crash_after_ready_ms = {crash_after_ms}, {pause_ms} ms apart; {connections} keep-alive \
                     connections and {connections} new-connection clients at once, {probes} probe threads \
                     (a new connection every ≥ {probe_us} µs each), request deadline {timeout_ms} ms{}",
                    if watch_threads {
                        "; threads sampled every 4 ms (--watch-threads)"
                    } else {
                        ""
                    }
                );
                let r = rollback::run(&bins, &o).await.map(|report| {
                    write_picture(&env::results_dir().join("rollback.svg"), report.svg);
                    report.text
                });
                ("rollback", command, r)
            }
            Bench::Idle { repeats } => (
                "idle",
                format!("idle: {repeats} fresh starts of each service"),
                idle::run(&bins, repeats).await,
            ),
        }
    });
    match result {
        Ok(table) => {
            let text = format!("Machine: {machine}\nCode: {revision}\nRun: {command}\n\n{table}");
            println!("{text}");
            env::save(name, &text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shellflip-bench {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The failure and latency tables of a load run.
fn tables(series: &[load::Series]) -> String {
    format!(
        "{}\n{}",
        load::failure_table(series).render(),
        load::latency_table(series).render()
    )
}

/// Writes a picture into the results directory, saying where (or why not).
fn write_picture(path: &std::path::Path, svg: std::io::Result<String>) {
    match svg.and_then(|svg| {
        std::fs::create_dir_all(env::results_dir())?;
        std::fs::write(path, svg)
    }) {
        Ok(()) => eprintln!("picture written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

fn describe(o: &LoadOptions) -> String {
    format!(
        "{} connections, {} repeats of {} restarts every {} ms per service and mode, request deadline {} ms",
        o.connections,
        o.repeats,
        o.restarts,
        o.interval.as_millis(),
        o.timeout.as_millis()
    )
}
