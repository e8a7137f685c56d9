//! An axum service that restarts without failing a request, over HTTP/1.1 and HTTP/2 cleartext.
//! `GET /` answers `generation=N pid=P`; N crosses to the next generation in the state.
//!
//! ```text
//! cargo run --release --features axum --example axum -- --http 127.0.0.1:8080 --socket /tmp/axum.sock
//! curl http://127.0.0.1:8080/                     # generation=0 pid=...
//! shellflip restart --socket /tmp/axum.sock       # prints the new PID
//! curl --http2-prior-knowledge http://127.0.0.1:8080/   # generation=1, from the new PID
//! ```
//!
//! SIGTERM stops it for good: it stops accepting, drains the same way, and exits.

use std::time::Duration;

use axum::{Router, extract::State, routing::get};
use shellflip::axum::Drain;
use shellflip::{RestartConfig, StateWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

struct Generation(u64);

#[shellflip::async_trait]
impl shellflip::LifecycleHandler for Generation {
    async fn send_to_new_process(&mut self, mut state: StateWriter) -> std::io::Result<()> {
        state.write_u64(self.0).await
    }
}

async fn hello(State(generation): State<u64>) -> String {
    format!("generation={generation} pid={}\n", std::process::id())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { shellflip::init_from_env() }?;
    let exit_code = tokio::runtime::Runtime::new()?.block_on(serve())?;
    std::process::exit(exit_code)
}

async fn serve() -> Result<i32, Box<dyn std::error::Error>> {
    let (mut addr, mut socket) = ("127.0.0.1:8080".parse()?, "/tmp/axum.sock".into());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--http", Some(value)) => addr = value.parse().map_err(|e| format!("{value}: {e}"))?,
            ("--socket", Some(value)) => socket = value.into(),
            _ => return Err("usage: axum [--http ADDR] [--socket PATH]".into()),
        }
    }
    let generation = match shellflip::receive_from_old_process() {
        Some(mut state) => {
            let previous = state.read_u64().await?;
            state.read_to_end(&mut Vec::new()).await?; // up to the commit: a torn state fails
            previous + 1
        }
        None => 0,
    };
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        lifecycle_handler: Box::new(Generation(generation)),
        ..Default::default()
    };
    // Inherited from the previous generation, or bound now.
    let listener = tokio::net::TcpListener::from_std(config.registry.tcp_listener("http", addr)?)?;
    let restart = config.try_into_restart_task()?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Serving ends on a restart (Some: the handover) or on SIGTERM (None).
    let stop = async {
        tokio::select! {
            handover = restart => Some(handover),
            _ = sigterm.recv() => None,
        }
    };
    let app = Router::new().route("/", get(hello)).with_state(generation);
    let drain = Drain::default().timeout(Duration::from_secs(10));
    match shellflip::axum::serve(listener, app, stop, drain).await {
        Some(handover) => Ok(handover?.exit_code()),
        None => Ok(0),
    }
}
