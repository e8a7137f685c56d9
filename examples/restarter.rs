//! The example service: an HTTP server and an echo server that restart without refusing a
//! connection and without losing their generation counter.
//!
//! ```text
//! restarter --http 127.0.0.1:8080 --echo 127.0.0.1:8081 --socket /tmp/restarter.sock --config restarter.toml
//! restarter restart --socket /tmp/restarter.sock     # prints the new PID, or the reason (exit 1)
//! restarter status --socket /tmp/restarter.sock
//! restarter --systemd ...                            # the systemd lifecycle (see examples/systemd/)
//! ```
//!
//! * `GET /` answers `generation=N pid=P greeting=G`: N grows by one per restart (it crosses in
//!   the state), G comes from the configuration file, read again by every generation.
//! * The echo port writes `generation=N pid=P` on connect, then echoes every line.
//! * `POST /restart` restarts from inside the application; `GET /child-env` shows the
//!   environment a program started by the service sees; `GET /slow?ms=N` answers after N ms.
//!
//! Configuration (TOML, every key optional):
//!
//! ```toml
//! greeting = "hello"           # shown by GET /
//! startup_delay_ms = 0         # wait this long before declaring readiness
//! crash_after_ready_ms = 300   # exit with status 70 this long after declaring readiness
//! ballast_mib = 0              # hold this much memory, touched, once ready
//! state_format = 1             # the state format this generation writes and accepts
//! state_mib = 0                # extra bytes of state to hand over
//! state_write_delay_ms = 0     # spread the state write over this long (to kill it midway)
//! fail_state_send = false      # make the state send fail
//! crash_on_start = false       # abort before declaring readiness
//! drain_secs = 10              # fork/exec: how long the old generation drains
//! systemd_drain_ms = 500       # systemd: how long the old process drains before exiting
//! max_state_age_secs = 0       # systemd: start fresh when the stored state is older (0: resume
//!                              # whatever its age; FileDescriptorStorePreserve= keeps it across stop)
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use shellflip::{LifecycleHandler, StateReader, StateWriter};
use shellflip::{Registry, RestartConfig, RestartHandle, ShutdownCoordinator, ShutdownSignal};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "An example service that restarts without refusing a connection")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// HTTP listener address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Echo listener address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    echo: SocketAddr,
    /// Control socket path.
    #[arg(long, default_value = "/tmp/restarter.sock")]
    socket: PathBuf,
    /// Configuration file, read again by every generation.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds a new generation has to become ready.
    #[arg(long, default_value_t = 60.0, value_parser = seconds)]
    startup_timeout: f64,
    /// The program a restart starts (default: this binary, as it was started).
    #[arg(long)]
    executable: Option<PathBuf>,
    /// A file that names the serving generation's PID, replaced at each handover.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Fork/exec: milliseconds a new generation stays on probation after it is ready; if it
    /// dies meanwhile, this one serves again (default 0: no probation).
    #[arg(long, default_value_t = 0)]
    probation_ms: u64,
    /// Run in the systemd lifecycle (file descriptor store) instead of fork/exec.
    #[arg(long)]
    systemd: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Restart the running service; prints the new PID.
    Restart {
        /// Control socket path.
        #[arg(long, default_value = "/tmp/restarter.sock")]
        socket: PathBuf,
    },
    /// Print the running service's status.
    Status {
        /// Control socket path.
        #[arg(long, default_value = "/tmp/restarter.sock")]
        socket: PathBuf,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    greeting: String,
    startup_delay_ms: u64,
    ballast_mib: usize,
    state_format: u32,
    state_mib: usize,
    state_write_delay_ms: u64,
    fail_state_send: bool,
    crash_on_start: bool,
    drain_secs: f64,
    systemd_drain_ms: u64,
    crash_after_ready_ms: Option<u64>,
    max_state_age_secs: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            greeting: "hello".into(),
            startup_delay_ms: 0,
            ballast_mib: 0,
            state_format: 1,
            state_mib: 0,
            state_write_delay_ms: 0,
            fail_state_send: false,
            crash_on_start: false,
            drain_secs: 10.0,
            systemd_drain_ms: 500,
            crash_after_ready_ms: None,
            max_state_age_secs: 0.0,
        }
    }
}

/// A number of seconds that a `Duration` can hold: finite, not negative, at most a year.
fn seconds(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    check_seconds(secs)
}

fn check_seconds(secs: f64) -> Result<f64, String> {
    if secs.is_finite() && (0.0..=365.0 * 86400.0).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "{secs} is not a number of seconds between 0 and one year"
        ))
    }
}

fn read_config(path: Option<&Path>) -> Result<Config, String> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config: Config = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
            .unwrap_or(1);
        format!("{} line {line}: {}", path.display(), e.message())
    })?;
    // Every value is checked now, before readiness: a value used later must not fail then.
    check_seconds(config.drain_secs).map_err(|e| format!("{}: drain_secs: {e}", path.display()))?;
    check_seconds(config.max_state_age_secs)
        .map_err(|e| format!("{}: max_state_age_secs: {e}", path.display()))?;
    Ok(config)
}

/// What crosses to the next generation: the state format, the generation, optional padding.
struct AppState {
    config: Config,
    generation: u64,
}

#[shellflip::async_trait]
impl LifecycleHandler for AppState {
    async fn send_to_new_process(&mut self, mut w: StateWriter) -> std::io::Result<()> {
        if self.config.fail_state_send {
            return Err(std::io::Error::other(
                "state send failed on purpose (fail_state_send = true)",
            ));
        }
        w.write_u32(self.config.state_format).await?;
        w.write_u64(self.generation).await?;
        let padding = self.config.state_mib as u64 * 1024 * 1024;
        w.write_u64(padding).await?;
        let steps = 10u64;
        let pause = Duration::from_millis(self.config.state_write_delay_ms / steps);
        let block = vec![0xA5u8; (padding as usize).min(1 << 20)];
        let mut left = padding;
        for step in 0..steps {
            let share = if step + 1 == steps {
                left
            } else {
                padding / steps
            };
            let mut n = share;
            while n > 0 {
                let k = n.min(block.len() as u64) as usize;
                w.write_all(&block[..k]).await?;
                n -= k as u64;
            }
            left -= share;
            w.flush().await?;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        w.flush().await
    }
}

/// Reads the previous generation's state: its generation, checked against our state format.
async fn read_state(mut r: StateReader, expected_format: u32) -> Result<u64, String> {
    let format = r
        .read_u32()
        .await
        .map_err(|e| format!("cannot read the state: {e}"))?;
    if format != expected_format {
        return Err(format!(
            "state format {format} is not the format {expected_format} this generation reads"
        ));
    }
    let generation = r
        .read_u64()
        .await
        .map_err(|e| format!("cannot read the state: {e}"))?;
    // Read to the end: the library reports a torn or damaged state there.
    let mut sink = tokio::io::sink();
    tokio::io::copy(&mut r, &mut sink)
        .await
        .map_err(|e| format!("cannot read the state: {e}"))?;
    Ok(generation)
}

fn main() -> ExitCode {
    // SAFETY: first thing in main: no other thread exists yet.
    let origin = unsafe { shellflip::init_from_env() };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = &origin {
        tracing::error!("inherited descriptors are unusable: {e}");
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("restarter: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.command {
        Some(Command::Restart { ref socket }) => runtime.block_on(async {
            let config = RestartConfig {
                enabled: true,
                coordination_socket_path: socket.clone(),
                ..Default::default()
            };
            match config.request_restart().await {
                Ok(pid) => {
                    println!("{pid}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("restart failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Some(Command::Status { ref socket }) => runtime.block_on(async {
            let status = async {
                shellflip::RestartCoordinationSocket::connect(socket)
                    .await?
                    .send_status_request()
                    .await
            };
            match status.await {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("status failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        None => runtime.block_on(serve(args)),
    }
}

/// An accept that failed (out of descriptors, most often): say so, and give the system a
/// moment instead of spinning on the same error.
async fn accept_failed(listener: &str, e: std::io::Error) {
    tracing::warn!("{listener} accept: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Shared by every connection.
struct Shared {
    generation: u64,
    greeting: String,
    restart: RestartHandle,
}

async fn serve(args: Args) -> ExitCode {
    // 1. The configuration: a bad one fails this generation before it is ready.
    let config = match read_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            shellflip::report_startup_failure(format!("bad configuration: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if config.crash_on_start {
        tracing::error!("crash_on_start = true: aborting");
        std::process::abort();
    }
    // 2. The state, only after the configuration parsed.
    let state = if config.max_state_age_secs > 0.0 {
        let max_age = Duration::from_secs_f64(config.max_state_age_secs);
        shellflip::try_receive_from_old_process_within(max_age).unwrap_or_else(|e| {
            tracing::error!("starting without the previous generation's state: {e}");
            None
        })
    } else {
        shellflip::receive_from_old_process()
    };
    let generation = match state {
        Some(r) => match read_state(r, config.state_format).await {
            Ok(g) => g + 1,
            Err(e) => {
                shellflip::report_startup_failure(format!("state rejected: {e}"));
                return ExitCode::FAILURE;
            }
        },
        None => 0,
    };
    // 3. The listeners: inherited, or bound now.
    let registry = Registry::new();
    let listeners = registry
        .tcp_listener("http", args.http)
        .and_then(|h| Ok((h, registry.tcp_listener("echo", args.echo)?)));
    let (http, echo) = match listeners {
        Ok((h, e)) => match (TcpListener::from_std(h), TcpListener::from_std(e)) {
            (Ok(h), Ok(e)) => (h, e),
            (Err(e), _) | (_, Err(e)) => {
                shellflip::report_startup_failure(format!("listeners: {e}"));
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            shellflip::report_startup_failure(format!("listeners: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let restart_config = RestartConfig {
        enabled: true,
        coordination_socket_path: args.socket.clone(),
        lifecycle_handler: Box::new(AppState {
            config: config.clone(),
            generation,
        }),
        startup_timeout: Duration::from_secs_f64(args.startup_timeout),
        executable: args.executable.clone(),
        probation: Duration::from_millis(args.probation_ms),
        pid_file: args.pid_file.clone(),
        registry: registry.clone(),
        ..Default::default()
    };
    let task = if args.systemd {
        restart_config.try_into_systemd_restart_task()
    } else {
        restart_config.try_into_restart_task()
    };
    let mut restart = match task {
        Ok(t) => t,
        Err(e) => {
            shellflip::report_startup_failure(format!("restart task: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        generation,
        greeting: config.greeting.clone(),
        restart: restart.handle(),
    });
    let coordinator = ShutdownCoordinator::new();
    // Echo connections handed back for the next generation (systemd lifecycle).
    let (parked_tx, mut parked_rx) = mpsc::unbounded_channel::<TcpStream>();
    let park = args.systemd.then(|| parked_tx.clone());
    if args.systemd {
        resume_stored_echo_clients(&registry, &coordinator, &parked_tx);
    }
    if config.startup_delay_ms > 0 {
        tracing::info!("startup_delay_ms = {}: waiting", config.startup_delay_ms);
        tokio::time::sleep(Duration::from_millis(config.startup_delay_ms)).await;
    }
    if let Err(e) = shellflip::startup_complete() {
        tracing::error!("cannot declare readiness: {e}");
    }
    if let Some(ms) = config.crash_after_ready_ms {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            tracing::error!("crash_after_ready_ms = {ms}: exiting with status 70");
            std::process::exit(70);
        });
    }
    eprintln!(
        "restarter: generation {generation} pid {} ready: http on {}, echo on {}, greeting {:?}",
        std::process::id(),
        args.http,
        args.echo,
        config.greeting
    );
    let _ballast = hold_ballast(config.ballast_mib);

    let http_grace = if args.systemd {
        Duration::from_millis(config.systemd_drain_ms)
    } else {
        Duration::from_secs_f64(config.drain_secs)
    };
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            // In the systemd lifecycle, SIGTERM belongs to the library: it is systemd's restart.
            Ok(s) if !args.systemd => Some(s),
            _ => None,
        };
    let handover = loop {
        let sigterm = async {
            match &mut terminate {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm => {
                // Stopping for good (not a restart): drain, and remove the socket files.
                tracing::info!("SIGTERM: stopping");
                drop(http);
                drop(echo);
                coordinator.shutdown_with_timeout(Duration::from_secs_f64(config.drain_secs)).await;
                registry.remove_socket_files();
                return ExitCode::SUCCESS;
            }
            conn = http.accept() => match conn {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let shared = shared.clone();
                    let handle = coordinator.handle();
                    tokio::spawn(async move {
                        let signal = ShutdownSignal::from(&*handle);
                        let io = hyper_util::rt::TokioIo::new(tcp);
                        let service = hyper::service::service_fn(move |req| answer(req, shared.clone()));
                        let _ = shellflip::http::serve_connection(io, service, signal, http_grace).await;
                        drop(handle);
                    });
                }
                Err(e) => accept_failed("http", e).await,
            },
            conn = echo.accept() => match conn {
                Ok((tcp, _)) => spawn_echo(tcp, None, Some(generation), &coordinator, park.clone(), &registry),
                Err(e) => accept_failed("echo", e).await,
            },
            outcome = &mut restart => match outcome {
                Ok(handover) => {
                    // Not accepting any more, but the listeners are kept until the new
                    // generation is confirmed (after its probation, if there is one).
                    handover.accepting_stopped();
                    match handover.confirmed().await {
                        Ok(()) => break Ok(handover),
                        Err(e) => tracing::warn!("{e}; serving again"),
                    }
                }
                Err(e) => break Err(e),
            },
        }
    };
    // Stop accepting: the next generation accepts on the same sockets from now on.
    drop(http);
    drop(echo);
    let handover = match handover {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("restarts are no longer possible: {e}");
            return ExitCode::FAILURE;
        }
    };
    let deadline = if args.systemd {
        Duration::from_millis(config.systemd_drain_ms)
    } else {
        Duration::from_secs_f64(config.drain_secs)
    };
    drop(parked_tx);
    drop(park);
    let drained = coordinator.shutdown_with_timeout(deadline).await;
    if args.systemd {
        // Echo clients that were handed back go into systemd's store for the next generation
        // (those taken from the store are still in it, under their names).
        let mut n = 0;
        while let Ok(tcp) = parked_rx.try_recv() {
            if let Ok(std) = tcp.into_std() {
                let name = format!("echo.{}.{n}", std::process::id());
                if let Err(e) = registry.insert(&name, std) {
                    tracing::warn!("cannot keep an echo client: {e}");
                }
                n += 1;
            }
        }
        tracing::info!("{n} new echo clients put in systemd's store");
    }
    tracing::info!(drained, "generation {generation} exits");
    ExitCode::from(handover.exit_code() as u8)
}

/// Echo clients a previous generation left in systemd's store: take them back and serve them.
fn resume_stored_echo_clients(
    registry: &Registry,
    coordinator: &ShutdownCoordinator,
    parked: &mpsc::UnboundedSender<TcpStream>,
) {
    let names = registry.inherited_names().unwrap_or_default();
    for name in names.into_iter().filter(|n| n.starts_with("echo.")) {
        match registry.take_tcp_stream(&name) {
            Ok(Some(std)) => match TcpStream::from_std(std) {
                Ok(tcp) => spawn_echo(
                    tcp,
                    Some(name),
                    None,
                    coordinator,
                    Some(parked.clone()),
                    registry,
                ),
                Err(e) => tracing::warn!("echo client {name}: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::info!("echo client {name} is gone: {e}"),
        }
    }
}

/// Serves one echo client, greeting it first when `greet` holds a generation. With `park` (the
/// systemd lifecycle), on shutdown it stops at a line boundary and hands the connection back,
/// to be kept in the store (one taken from the store is still in it: it is only let go);
/// without, it goes on echoing until the drain deadline.
fn spawn_echo(
    tcp: TcpStream,
    stored_as: Option<String>,
    greet: Option<u64>,
    coordinator: &ShutdownCoordinator,
    park: Option<mpsc::UnboundedSender<TcpStream>>,
    registry: &Registry,
) {
    let handle = coordinator.handle();
    let registry = registry.clone();
    tokio::spawn(async move {
        let mut signal = ShutdownSignal::from(&*handle);
        let mut tcp = BufReader::new(tcp);
        if let Some(generation) = greet {
            let hello = format!("generation={generation} pid={}\n", std::process::id());
            if tcp.get_mut().write_all(hello.as_bytes()).await.is_err() {
                return;
            }
        }
        let mut line = Vec::new();
        let keep = loop {
            tokio::select! {
                // Only between lines: a line read is always echoed before handing over.
                biased;
                _ = signal.on_shutdown(), if park.is_some() && tcp.buffer().is_empty() => break true,
                n = tcp.read_until(b'\n', &mut line) => match n {
                    Ok(0) | Err(_) => break false,
                    Ok(_) => {
                        if tcp.get_mut().write_all(&line).await.is_err() {
                            break false;
                        }
                        line.clear();
                    }
                },
            }
        };
        if let (true, Some(park)) = (keep, &park) {
            if stored_as.is_none() {
                let _ = park.send(tcp.into_inner());
            }
        } else if let Some(name) = stored_as {
            // The client left: it no longer needs a place in the store.
            registry.remove(&name);
        }
        drop(handle);
    });
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let hello = || {
        format!(
            "generation={} pid={} greeting={}\n",
            shared.generation,
            std::process::id(),
            shared.greeting
        )
    };
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        Ok(r)
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => reply(StatusCode::OK, hello()),
        (&Method::GET, "/slow") => {
            let query: HashMap<&str, &str> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let ms = query.get("ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(StatusCode::OK, hello())
        }
        (&Method::GET, "/child-env") => match tokio::process::Command::new("env").output().await {
            Ok(out) => reply(
                StatusCode::OK,
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (&Method::POST, "/restart") => match shared.restart.restart().await {
            Ok(pid) => reply(StatusCode::OK, format!("{}\n", pid.unwrap_or(0))),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("restart failed: {e}\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Holds `mib` MiB, every page touched, for as long as the value lives.
fn hold_ballast(mib: usize) -> Vec<u8> {
    if mib == 0 {
        return Vec::new();
    }
    let mut v = vec![0u8; mib * 1024 * 1024];
    for page in v.chunks_mut(4096) {
        page[0] = 1;
    }
    tracing::info!("holding {mib} MiB of ballast");
    v
}
