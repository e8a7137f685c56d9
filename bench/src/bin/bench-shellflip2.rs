//! An HTTP service on shellflip 2.1.3 as released, written the way its README and example
//! recommend: the restart task from `RestartConfig::try_into_restart_task`, state (the
//! generation) through `send_to_new_process` / `receive_from_old_process`, and a
//! `ShutdownCoordinator` whose signal makes every connection shut down gracefully (hyper's
//! `graceful_shutdown`) once a restart succeeded.
//!
//! shellflip 2 cannot hand a listener to the new process: its example binds a new port in every
//! generation. A service on a fixed port must bind it again while the old process still listens,
//! which only `SO_REUSEPORT` allows; that is what this service does, and what the benchmark
//! measures. (Without `SO_REUSEPORT` the new process's bind fails and so does every restart.)
//!
//! ```text
//! bench-shellflip2 --http 127.0.0.1:8080 --socket /tmp/sf2.sock
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use shellflip2::lifecycle::{LifecycleHandler, PipeWriter};
use shellflip2::{RestartConfig, ShutdownCoordinator, ShutdownHandle, ShutdownSignal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// HTTP listener address.
    #[arg(long)]
    http: SocketAddr,
    /// Restart coordination socket.
    #[arg(long)]
    socket: PathBuf,
    /// Seconds the old process waits for its connections after a restart.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
}

struct Generation(u64);

#[async_trait::async_trait]
impl LifecycleHandler for Generation {
    async fn send_to_new_process(&mut self, mut pipe: PipeWriter) -> std::io::Result<()> {
        pipe.write_u64(self.0).await
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    shellflip_bench::svc::runtime()?.block_on(serve(args))
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(shellflip_bench::svc::BACKLOG)?;
    tokio::net::TcpListener::from_std(s.into())
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let generation = match shellflip2::lifecycle::receive_from_old_process() {
        Some(mut pipe) => pipe.read_u64().await? + 1,
        None => 0,
    };
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: args.socket.clone(),
        lifecycle_handler: Box::new(Generation(generation)),
        ..Default::default()
    };
    let listener = bind_reuseport(args.http)?;
    let restart = config.try_into_restart_task()?;
    tokio::pin!(restart);
    let coordinator = ShutdownCoordinator::new();
    eprintln!(
        "bench-shellflip2: generation {generation} pid {} ready on {}",
        std::process::id(),
        args.http
    );
    loop {
        tokio::select! {
            conn = listener.accept() => if let Ok((tcp, _)) = conn {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(connection(tcp, generation, coordinator.handle()));
            },
            result = &mut restart => {
                if let Err(e) = result {
                    eprintln!("bench-shellflip2: restart task failed: {e}");
                }
                break;
            }
        }
    }
    // The new process listens on the port too (SO_REUSEPORT): stop accepting here and drain.
    drop(listener);
    coordinator.shutdown_with_timeout(args.drain_secs).await;
    Ok(())
}

async fn connection(tcp: tokio::net::TcpStream, generation: u64, handle: Arc<ShutdownHandle>) {
    let mut signal = ShutdownSignal::from(&*handle);
    let io = hyper_util::rt::TokioIo::new(tcp);
    let service =
        hyper::service::service_fn(move |req| shellflip_bench::svc::answer(req, generation));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = signal.on_shutdown() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    drop(handle);
}
