//! `examples/grpc.rs` as real processes under load: 16 tasks calling `Hello` in a loop on one
//! tonic `Channel`, and a task reading `Count` streams, while the service restarts 30 times
//! (`SHELLFLIP_GRPC_RESTARTS=N` for more).
//!
//! Half the unary callers go through `shellflip::client::RetryLayer`: none of their calls may
//! fail. What the server can guarantee is asserted too: every restart succeeds, every call a generation
//! took is answered (the calls the generations count at exit are exactly the calls the client
//! saw succeed), and every stream that started is read to its end from one process. The calls
//! that fail anyway are printed, classified by status: they are calls the tonic client abandoned
//! before sending them, when the old generation's GOAWAY arrived (no server counted them), which
//! RFC 9113 §8.7 makes safe to retry; only a retry in the client removes them.
//!
//! Run with `cargo test --release --all-features --test grpc -- --nocapture` to see the report.

mod common;

#[path = "../examples/grpc/proto.rs"]
mod proto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cleanup::Cleanup;
use common::*;
use nix::sys::signal::Signal;
use proto::{CountRequest, GenerationsClient, HelloRequest};
use tonic::transport::{Channel, Endpoint};

/// Concurrent unary callers on the one channel.
const CALLERS: usize = 16;
/// Replies per stream, and the time between two.
const STREAM_LEN: u32 = 20;
const STREAM_INTERVAL_MS: u32 = 10;

/// What the client saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// Failed calls, by status code and message.
    failed: BTreeMap<(String, String), u64>,
    /// Calls through the retry layer: succeeded, failed.
    retried_ok: u64,
    retried_failed: BTreeMap<(String, String), u64>,
    streams_ok: u64,
    /// Streams that failed before their first reply, by code and message.
    streams_refused: BTreeMap<(String, String), u64>,
    /// Streams that broke after their first reply (or came back incomplete or mixed).
    streams_broken: Vec<String>,
}

impl Tally {
    fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    fn retried_failures(&self) -> u64 {
        self.retried_failed.values().sum()
    }
}

/// A failure's class: its code, and its message followed by its sources' (which name no
/// request: they classify).
fn key(status: &tonic::Status) -> (String, String) {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        message = format!("{message} <- {e}");
        source = e.source();
    }
    (format!("{:?}", status.code()), message)
}

/// Both kinds of client, plain and behind the retry layer, as one type.
/// (Errors are a concrete type: a boxed `dyn Error` in the bounds trips the compiler's check
/// that the spawned futures are `Send`.)
type Client = tower::util::BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::Status,
>;

/// The channel as it is.
fn plain(channel: Channel) -> GenerationsClient<Client> {
    let service = tower::ServiceExt::map_err(channel, |e| tonic::Status::from_error(Box::new(e)));
    GenerationsClient::new(tower::util::BoxCloneService::new(service))
}

/// The channel behind `shellflip::client::RetryLayer`, which retries the calls that no server
/// processed (RFC 9113 §8.7).
fn retrying(channel: Channel) -> GenerationsClient<Client> {
    let service = tower::ServiceBuilder::new()
        .layer(shellflip::client::RetryLayer::new())
        .map_request(|r: http::Request<http_body_util::Full<bytes::Bytes>>| {
            r.map(tonic::body::Body::new)
        })
        .service(channel);
    let service = tower::ServiceExt::<http::Request<tonic::body::Body>>::map_err(
        service,
        tonic::Status::from_error,
    );
    GenerationsClient::new(tower::util::BoxCloneService::new(service))
}

async fn channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// One `Count` stream, read to its end.
async fn read_stream(
    client: &mut GenerationsClient<Client>,
) -> Result<(), Result<tonic::Status, String>> {
    let request = CountRequest {
        count: STREAM_LEN,
        interval_ms: STREAM_INTERVAL_MS,
    };
    let mut stream = client.count(request).await.map_err(Ok)?.into_inner();
    let mut seen = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(reply)) => seen.push((reply.n, reply.pid)),
            Ok(None) => break,
            Err(status) if seen.is_empty() => return Err(Ok(status)),
            Err(status) => return Err(Err(format!("after {} replies: {status}", seen.len()))),
        }
    }
    let pids: std::collections::BTreeSet<u32> = seen.iter().map(|&(_, pid)| pid).collect();
    let numbers: Vec<u32> = seen.iter().map(|&(n, _)| n).collect();
    if numbers != (1..=STREAM_LEN).collect::<Vec<_>>() || pids.len() != 1 {
        return Err(Err(format!("replies {numbers:?} from {pids:?}")));
    }
    Ok(())
}

/// `pid P served hello=N count=M` lines of the log: what each generation served.
fn served(log: &str) -> BTreeMap<u32, (u64, u64)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("pid ")?;
            let (pid, rest) = rest.split_once(" served hello=")?;
            let (hello, count) = rest.split_once(" count=")?;
            Some((
                pid.parse().ok()?,
                (hello.parse().ok()?, count.parse().ok()?),
            ))
        })
        .collect()
}

fn restart(socket: &Path) -> u32 {
    let out = shellflip_at(socket, &["restart"]);
    assert!(out.status.success(), "shellflip restart failed: {out:?}");
    out.stdout.trim().parse().expect("a PID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_across_restarts() {
    let restarts: usize = std::env::var("SHELLFLIP_GRPC_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let cleanup = Cleanup::new();
    let (addr, _) = free_addrs();
    let socket = cleanup.path().join("grpc.sock");
    let mut cmd = Command::new(example("grpc"));
    cmd.arg("--grpc")
        .arg(addr.to_string())
        .arg("--socket")
        .arg(&socket)
        .arg("--drain-secs")
        .arg("30");
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    let (stdout, stderr) = cleanup.output();
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let mut gen0 = ChildGuard::spawn(&mut cmd);

    let channel = wait_until("the service to answer", DEADLINE, || {
        assert!(gen0.try_wait().expect("try_wait").is_none(), "it exited");
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let channel = channel(addr).await.ok()?;
                let mut client = plain(channel.clone());
                let hello = HelloRequest {
                    name: "test".into(),
                };
                client.hello(hello).await.ok().map(|_| channel)
            })
        })
    });

    // The load: bounded by the flag, which the restarts' end sets.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut load = Vec::new();
    // Half the callers as they are, half behind the retry layer, on the same channel.
    for i in 0..CALLERS {
        let retried = i % 2 == 1;
        let mut client = match retried {
            true => retrying(channel.clone()),
            false => plain(channel.clone()),
        };
        let (stop, tally) = (stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = client
                    .hello(HelloRequest {
                        name: format!("caller {i}"),
                    })
                    .await;
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                match (result, retried) {
                    (Ok(_), false) => t.ok += 1,
                    (Ok(_), true) => t.retried_ok += 1,
                    (Err(status), false) => *t.failed.entry(key(&status)).or_default() += 1,
                    (Err(status), true) => *t.retried_failed.entry(key(&status)).or_default() += 1,
                }
            }
        }));
    }
    {
        let (stop, tally, mut client) = (stop.clone(), tally.clone(), plain(channel.clone()));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = read_stream(&mut client).await;
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(()) => t.streams_ok += 1,
                    Err(Ok(status)) => *t.streams_refused.entry(key(&status)).or_default() += 1,
                    Err(Err(broken)) => t.streams_broken.push(broken),
                }
            }
        }));
    }

    // The restarts, from a blocking thread (the command-line client, with its deadline).
    let started = Instant::now();
    let socket_for_restarts = socket.clone();
    let mut pids = vec![gen0.id()];
    let new_pids = tokio::task::spawn_blocking(move || {
        let mut pids = Vec::new();
        for _ in 0..restarts {
            std::thread::sleep(Duration::from_millis(250));
            pids.push(restart(&socket_for_restarts));
        }
        std::thread::sleep(Duration::from_millis(250));
        pids
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("a load task");
    }
    let elapsed = started.elapsed();
    let new_pids = new_pids.expect("the restarts");
    pids.extend(&new_pids);

    // The last generation stops on SIGTERM; every generation drains and says what it served.
    let last = *pids.last().expect("a PID");
    signal(last, Signal::SIGTERM);
    for &pid in &pids {
        wait_until(&format!("process {pid} to exit"), DEADLINE, || {
            (!is_running(pid)).then_some(())
        });
    }
    let status = gen0.wait_timeout(DEADLINE).expect("generation 0 exited");
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
    let served = served(&cleanup.log_text());
    let hello_served: u64 = served.values().map(|&(hello, _)| hello).sum();
    let streams_served: u64 = served.values().map(|&(_, count)| count).sum();

    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    let calls = tally.ok + tally.failures();
    eprintln!(
        "grpc: {restarts} restarts in {elapsed:.1?}; Hello: {calls} calls, {} ok, {} failed; \
         the servers answered {hello_served} (the first call, before the load, included)",
        tally.ok,
        tally.failures()
    );
    for ((code, message), n) in &tally.failed {
        eprintln!("  Hello failed {n:>5} × {code}: {message}");
    }
    eprintln!(
        "grpc: Hello behind shellflip::client::RetryLayer: {} ok, {} failed",
        tally.retried_ok,
        tally.retried_failures()
    );
    for ((code, message), n) in &tally.retried_failed {
        eprintln!("  retried Hello failed {n:>5} × {code}: {message}");
    }
    eprintln!(
        "grpc: Count streams: {} read to the end, {} refused before a reply, {} broken; \
         the servers finished {streams_served}",
        tally.streams_ok,
        tally.streams_refused.values().sum::<u64>(),
        tally.streams_broken.len()
    );
    for ((code, message), n) in &tally.streams_refused {
        eprintln!("  Count failed {n:>5} × {code}: {message}");
    }

    assert_eq!(
        served.len(),
        pids.len(),
        "a generation did not report: {served:?}"
    );
    // The first call (before the load) succeeded and was served too.
    let succeeded = tally.ok + tally.retried_ok + 1;
    assert_eq!(
        hello_served, succeeded,
        "calls a server took and answered ({hello_served}) and calls the client saw succeed \
         ({succeeded}) differ: a call the server processed failed"
    );
    // With the client-side answer, no call fails at all.
    assert_eq!(
        tally.retried_failures(),
        0,
        "calls behind the retry layer failed: {:?}",
        tally.retried_failed
    );
    assert!(
        tally.streams_broken.is_empty(),
        "{:?}",
        tally.streams_broken
    );
    assert_eq!(
        streams_served, tally.streams_ok,
        "a finished stream did not reach the client"
    );
    assert!(
        tally.ok > 0 && tally.retried_ok > 0 && tally.streams_ok > 0,
        "no load ran"
    );
}
