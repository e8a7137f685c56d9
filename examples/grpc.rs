//! A gRPC service (tonic) restarted without failing a call it took: unary `Hello` and
//! server-streaming `Count` (`grpc/generations.proto`), each answer naming the generation and
//! process that served it. On a restart the old generation stops accepting, tells
//! `shellflip restart` so, and drains: tonic sends its connections a GOAWAY and finishes every
//! call in flight, streams included, for at most `--drain-secs` (default 30).
//!
//! ```text
//! cargo run --release --features grpc --example grpc -- --grpc 127.0.0.1:50051 --socket /tmp/grpc.sock
//! shellflip restart --socket /tmp/grpc.sock    # or: kill -USR1 <pid>; prints the new PID
//! ```
//!
//! At exit each generation prints what it served (`served hello=N count=M`).

#[path = "grpc/proto.rs"]
mod proto;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use proto::{CountReply, CountRequest, HelloReply, HelloRequest};
use shellflip::{RestartConfig, Stop};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Generations {
    hello: AtomicU64,
    /// Streams sent to the end.
    count: Arc<AtomicU64>,
}

impl proto::Generations for Generations {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        self.hello.fetch_add(1, Relaxed);
        Ok(Response::new(HelloReply {
            message: format!("hello {}", request.into_inner().name),
            generation: shellflip::generation(),
            pid: std::process::id(),
        }))
    }

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<BoxStream<CountReply>>, Status> {
        let CountRequest { count, interval_ms } = request.into_inner();
        if count > 10_000 || interval_ms > 10_000 {
            return Err(Status::invalid_argument(
                "count and interval_ms: at most 10000",
            ));
        }
        let (sent, interval) = (
            self.count.clone(),
            Duration::from_millis(interval_ms.into()),
        );
        let replies = futures_util::stream::unfold(1, move |n| {
            let sent = sent.clone();
            async move {
                if n > count {
                    sent.fetch_add(1, Relaxed);
                    return None;
                }
                if n > 1 {
                    tokio::time::sleep(interval).await;
                }
                let (generation, pid) = (shellflip::generation(), std::process::id());
                Some((Ok(CountReply { n, generation, pid }), n + 1))
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { shellflip::init_from_env() }?;
    let exit_code = tokio::runtime::Runtime::new()?.block_on(serve())?;
    std::process::exit(exit_code)
}

async fn serve() -> Result<i32, Box<dyn std::error::Error>> {
    let (mut addr, mut socket) = ("127.0.0.1:50051".parse()?, "/tmp/grpc.sock".into());
    let mut drain = Duration::from_secs(30);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--grpc", Some(v)) => addr = v.parse().map_err(|e| format!("{v}: {e}"))?,
            ("--socket", Some(v)) => socket = v.into(),
            ("--drain-secs", Some(v)) => drain = Duration::from_secs(v.parse()?),
            _ => return Err("usage: grpc [--grpc ADDR] [--socket PATH] [--drain-secs N]".into()),
        }
    }
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        ..Default::default()
    };
    // Inherited from the previous generation, or bound now.
    let listener = tokio::net::TcpListener::from_std(config.registry.tcp_listener("grpc", addr)?)?;
    let mut restart = config.try_into_restart_task()?; // its first poll declares readiness
    let service = Arc::new(Generations::default());
    let server = proto::GenerationsServer::from_arc(service.clone());
    // Serves until a restart or SIGTERM, then stops accepting and drains for at most `drain`.
    let stop = shellflip::grpc::serve(&listener, &mut restart, drain, |incoming, shutdown| {
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming_shutdown(incoming, shutdown)
    })
    .await?;
    drop(listener);
    let (hello, count) = (service.hello.load(Relaxed), service.count.load(Relaxed));
    eprintln!(
        "pid {} served hello={hello} count={count}",
        std::process::id()
    );
    Ok(match stop {
        Stop::Restart(handover) => handover.exit_code(),
        _ => 0, // SIGTERM
    })
}
