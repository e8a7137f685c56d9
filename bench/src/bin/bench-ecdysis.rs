//! An HTTP service on ecdysis 1.1.1 (Cloudflare's port of tableflip), written the way its README
//! and example recommend: a `TokioEcdysisBuilder` whose upgrade is triggered on a Unix socket, the
//! listener from `build_listen_tcp` (inherited by every new process), a PID file, `ready()`, and
//! hyper-util's `GracefulShutdown` as the drain once the upgrade succeeded. The generation travels
//! in an environment variable, as in ecdysis's example (`ECDYSIS_RELOADS`).
//!
//! ```text
//! bench-ecdysis --http 127.0.0.1:8080 --socket /tmp/ecdysis.sock --pidfile /tmp/ecdysis.pid
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ecdysis::tokio_ecdysis::{SignalKind, StopOnShutdown, TokioEcdysisBuilder};
use futures_util::StreamExt;

const GENERATION_VAR: &str = "BENCH_ECDYSIS_GENERATION";

#[derive(Parser)]
struct Args {
    /// HTTP listener address.
    #[arg(long)]
    http: SocketAddr,
    /// Unix socket that triggers an upgrade.
    #[arg(long)]
    socket: PathBuf,
    /// PID file, written by every process once it is ready.
    #[arg(long)]
    pidfile: PathBuf,
    /// Seconds the old process waits for its connections after an upgrade.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let generation = match std::env::var(GENERATION_VAR) {
        Ok(g) => g.parse::<u64>().unwrap_or(0) + 1,
        Err(_) => 0,
    };
    // SAFETY: no other thread exists yet (the runtime is built below); the new process started
    // by an upgrade inherits the variable, as in ecdysis's own example.
    unsafe { std::env::set_var(GENERATION_VAR, generation.to_string()) };
    shellflip_bench::svc::runtime()?.block_on(serve(args, generation))
}

async fn serve(args: Args, generation: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = TokioEcdysisBuilder::new(SignalKind::hangup())?;
    builder.upgrade_on_socket(&args.socket)?;
    builder.set_pid_file(&args.pidfile);
    let mut stream = builder.build_listen_tcp(StopOnShutdown::Yes, args.http, |b, addr| {
        b.set_reuse_address(true)?;
        b.bind(&addr.into())?;
        b.listen(shellflip_bench::svc::BACKLOG)?;
        Ok(b.into())
    })?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (_ecdysis, upgraded) = builder.ready()?;
    tokio::pin!(upgraded);
    eprintln!(
        "bench-ecdysis: generation {generation} pid {} ready on {}",
        std::process::id(),
        args.http
    );
    loop {
        tokio::select! {
            conn = stream.next() => match conn {
                Some(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let service = hyper::service::service_fn(move |req| {
                        shellflip_bench::svc::answer(req, generation)
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(io, service);
                    tokio::spawn(graceful.watch(conn));
                }
                Some(Err(_)) => continue,
                None => break,
            },
            exit = &mut upgraded => {
                eprintln!("bench-ecdysis: pid {} stops: {exit:?}", std::process::id());
                break;
            }
        }
    }
    // ecdysis stopped the listener stream: drain the connections with hyper-util.
    drop(stream);
    let _ = tokio::time::timeout(Duration::from_secs(args.drain_secs), graceful.shutdown()).await;
    Ok(())
}
