//! HTTP services on this crate written with the frameworks users reach for, for the
//! `frameworks` benchmark. Every one carries its generation in the state and answers `GET /`
//! like the example service; the drain is what differs:
//!
//! * `axum-documented`: `axum::serve(listener, router).with_graceful_shutdown(restart)`, the
//!   drain axum documents;
//! * `auto`: a hyper service on hyper-util's `auto` builder (HTTP/1.1 and h2c on one port)
//!   through `shellflip::http::serve`.
//!
//! (axum through `shellflip::axum::serve` is `examples/axum.rs` itself.)
//!
//! ```text
//! bench-fw --server axum-documented|auto --http 127.0.0.1:8080 --socket /tmp/fw.sock
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use shellflip::{RestartConfig, StateWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Server {
    AxumDocumented,
    Auto,
}

#[derive(Parser)]
struct Args {
    /// Which service.
    #[arg(long, value_enum)]
    server: Server,
    /// HTTP listener address.
    #[arg(long)]
    http: SocketAddr,
    /// Control socket.
    #[arg(long)]
    socket: PathBuf,
}

struct Generation(u64);

#[shellflip::async_trait]
impl shellflip::LifecycleHandler for Generation {
    async fn send_to_new_process(&mut self, mut w: StateWriter) -> std::io::Result<()> {
        w.write_u64(self.0).await
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: no other thread exists yet.
    unsafe { shellflip::init_from_env() }?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let code = shellflip_bench::svc::runtime()?.block_on(serve(args))?;
    std::process::exit(code)
}

async fn serve(args: Args) -> Result<i32, Box<dyn std::error::Error>> {
    let generation = match shellflip::receive_from_old_process() {
        Some(mut r) => {
            let g = r.read_u64().await?;
            r.read_to_end(&mut Vec::new()).await?;
            g + 1
        }
        None => 0,
    };
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: args.socket,
        lifecycle_handler: Box::new(Generation(generation)),
        ..Default::default()
    };
    let listener = config.registry.tcp_listener("http", args.http)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let restart = config.try_into_restart_task()?;
    eprintln!(
        "bench-fw {:?}: generation {generation} pid {} on {}",
        args.server,
        std::process::id(),
        args.http
    );
    let handover = match args.server {
        Server::AxumDocumented => {
            // As axum's documentation shows: the shutdown future is the restart.
            let app = axum::Router::new().route(
                "/",
                axum::routing::get(move || async move {
                    format!(
                        "generation={generation} pid={} greeting=hello\n",
                        std::process::id()
                    )
                }),
            );
            let (tx, rx) = tokio::sync::oneshot::channel();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let handover = restart.await;
                    if let Ok(h) = &handover {
                        // axum stops accepting as this future resolves.
                        h.accepting_stopped();
                    }
                    let _ = tx.send(handover);
                })
                .await?;
            rx.await??
        }
        Server::Auto => {
            let service = hyper::service::service_fn(move |req| {
                shellflip_bench::svc::answer(req, generation)
            });
            shellflip::http::serve(
                listener,
                service,
                restart,
                shellflip::http::Drain::default(),
            )
            .await?
        }
    };
    Ok(handover.exit_code())
}
