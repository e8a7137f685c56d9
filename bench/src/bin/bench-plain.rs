//! The example service's HTTP and echo servers without shellflip: the baseline of the `idle`
//! benchmark. Same runtime (two workers), same logging, same answers; no restart machinery.
//!
//! ```text
//! bench-plain --http 127.0.0.1:8080 --echo 127.0.0.1:8081
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    /// HTTP listener address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Echo listener address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    echo: SocketAddr,
    /// Configuration file (TOML), parsed like the example's; its keys are not used.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(path) = &args.config {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<toml::Table>(&t).map_err(|e| e.to_string()));
        if let Err(e) = parsed {
            eprintln!("bench-plain: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let runtime = match shellflip_bench::svc::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-plain: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> ExitCode {
    let (http, echo) = match (
        TcpListener::bind(args.http).await,
        TcpListener::bind(args.echo).await,
    ) {
        (Ok(h), Ok(e)) => (h, e),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("bench-plain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bench-plain: {e}");
                return ExitCode::FAILURE;
            }
        };
    eprintln!(
        "bench-plain: pid {} ready: http on {}, echo on {}",
        std::process::id(),
        args.http,
        args.echo
    );
    loop {
        tokio::select! {
            _ = terminate.recv() => return ExitCode::SUCCESS,
            conn = http.accept() => if let Ok((tcp, _)) = conn {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let service = hyper::service::service_fn(|req| shellflip_bench::svc::answer(req, 0));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(io, service)
                        .await;
                });
            },
            conn = echo.accept() => if let Ok((tcp, _)) = conn {
                tokio::spawn(async move {
                    let mut tcp = BufReader::new(tcp);
                    let hello = format!("generation=0 pid={}\n", std::process::id());
                    if tcp.get_mut().write_all(hello.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut line = Vec::new();
                    while let Ok(n) = tcp.read_until(b'\n', &mut line).await {
                        if n == 0 || tcp.get_mut().write_all(&line).await.is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            },
        }
    }
}
