//! The axum example (`examples/axum.rs`, served by `shellflip::axum::serve`) under load across
//! real restarts by `shellflip restart`: hyper clients over HTTP/1.1 keep-alive, a new HTTP/1.1
//! connection per request, and HTTP/2 cleartext (h2c) through `shellflip::client::RetryLayer`
//! must lose no request, and every generation must be reached. An h2c client without the layer
//! runs beside them: the requests it loses must all be ones the server never processed (the
//! ones the layer retries).
//!
//! Every test has its own temporary directory and port, waits only with deadlines, and kills the
//! processes it started when it ends, failing or not. Run with
//! `cargo test --all-features --test frameworks`.

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::cleanup::Cleanup;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceExt};

/// Restarts in a test: enough to cross many drains, few enough for CI.
const RESTARTS: u64 = 25;
/// Deadline of one request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// `generation=N pid=P` → (N, P).
fn parse_hello(text: &str) -> Option<(u64, u32)> {
    let (g, p) = text.trim_end().split_once(' ')?;
    Some((
        g.strip_prefix("generation=")?.parse().ok()?,
        p.strip_prefix("pid=")?.parse().ok()?,
    ))
}

/// One kind of client: how it sends `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// HTTP/1.1, connections kept in hyper-util's pool.
    KeepAlive,
    /// HTTP/1.1, a new connection per request.
    NewConnection,
    /// HTTP/2 cleartext through the retry layer.
    H2cRetry,
    /// HTTP/2 cleartext, plain hyper-util client.
    H2cPlain,
}

/// What the clients of one kind saw.
#[derive(Debug, Default)]
struct Seen {
    ok: u64,
    failures: Vec<String>,
    /// Failures that were not of the kind the server never processed.
    processed_failures: Vec<String>,
    max_generation: u64,
}

type Plain = Client<HttpConnector, Full<Bytes>>;

fn client(kind: Kind) -> Plain {
    let mut b = Client::builder(TokioExecutor::new());
    match kind {
        Kind::KeepAlive => {}
        Kind::NewConnection => {
            b.pool_max_idle_per_host(0);
        }
        Kind::H2cRetry | Kind::H2cPlain => {
            b.http2_only(true);
        }
    }
    b.build_http()
}

/// Sends `GET /` in a closed loop from `tasks` tasks until `stop`; publishes the newest
/// generation each task saw in `latest`.
async fn load(
    kind: Kind,
    tasks: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    latest: Arc<Vec<AtomicU64>>,
) -> Seen {
    let plain = client(kind);
    let retry = tower::ServiceBuilder::new()
        .layer(shellflip::client::RetryLayer::new())
        .service(plain.clone());
    let uri: hyper::Uri = format!("http://{addr}/").parse().expect("uri");
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (plain, mut retry, uri, stop, latest) = (
            plain.clone(),
            retry.clone(),
            uri.clone(),
            stop.clone(),
            latest.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            while !stop.load(Ordering::SeqCst) {
                let mut req = hyper::Request::get(uri.clone());
                if kind == Kind::NewConnection {
                    req = req.header("connection", "close");
                }
                let attempt = async {
                    let response = if kind == Kind::H2cRetry {
                        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
                        let svc = ServiceExt::<hyper::Request<Empty<Bytes>>>::ready(&mut retry)
                            .await
                            .map_err(|e| e.to_string())?;
                        svc.call(req).await.map_err(|e| {
                            (shellflip::client::never_processed(&*e), format!("{e:?}"))
                        })
                    } else {
                        let req = req
                            .body(Full::new(Bytes::new()))
                            .map_err(|e| e.to_string())?;
                        plain
                            .request(req)
                            .await
                            .map_err(|e| (shellflip::client::never_processed(&e), format!("{e:?}")))
                    };
                    let response = match response {
                        Ok(r) => r,
                        Err((unprocessed, e)) => {
                            return Err(if unprocessed {
                                format!("unprocessed: {e}")
                            } else {
                                e
                            });
                        }
                    };
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("body: {e:?}"))?
                        .to_bytes();
                    let text = String::from_utf8_lossy(&body).into_owned();
                    match (status.as_u16(), parse_hello(&text)) {
                        (200, Some((generation, _))) => Ok(generation),
                        _ => Err(format!("unexpected answer {status} {text:?}")),
                    }
                };
                match tokio::time::timeout(REQUEST_DEADLINE, attempt).await {
                    Ok(Ok(generation)) => {
                        seen.ok += 1;
                        seen.max_generation = seen.max_generation.max(generation);
                        latest[t].fetch_max(generation, Ordering::SeqCst);
                    }
                    Ok(Err(e)) => {
                        if !e.starts_with("unprocessed: ") {
                            seen.processed_failures.push(e.clone());
                        }
                        seen.failures.push(e);
                    }
                    Err(_) => {
                        let e = "no answer within the deadline".to_owned();
                        seen.processed_failures.push(e.clone());
                        seen.failures.push(e);
                    }
                }
            }
            seen
        }));
    }
    let mut all = Seen::default();
    for h in handles {
        match h.await {
            Ok(s) => {
                all.ok += s.ok;
                all.failures.extend(s.failures);
                all.processed_failures.extend(s.processed_failures);
                all.max_generation = all.max_generation.max(s.max_generation);
            }
            Err(e) => all.processed_failures.push(format!("client task: {e}")),
        }
    }
    all
}

#[test]
fn axum_example_loses_no_request_across_restarts() {
    let cleanup = Cleanup::new();
    let (addr, _) = free_addrs();
    let socket = cleanup.path().join("axum.sock");
    let mut cmd = Command::new(example("axum"));
    cmd.arg("--http")
        .arg(addr.to_string())
        .arg("--socket")
        .arg(&socket);
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    let log = File::create(&cleanup.log).expect("log file");
    let log2 = log.try_clone().expect("log file");
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    let mut gen0 = ChildGuard::spawn(&mut cmd);
    let first = wait_until("the axum example to serve", DEADLINE, || {
        assert!(gen0.try_wait().expect("try_wait").is_none(), "it exited");
        http(addr, "GET", "/").ok()
    });
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(parse_hello(&first.body), Some((0, gen0.id())), "{first:?}");

    let kinds = [
        (Kind::KeepAlive, 4),
        (Kind::NewConnection, 2),
        (Kind::H2cRetry, 6),
        (Kind::H2cPlain, 4),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let latest: Vec<Arc<Vec<AtomicU64>>> = kinds
        .iter()
        .map(|(_, n)| Arc::new((0..*n).map(|_| AtomicU64::new(0)).collect()))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let loads: Vec<_> = kinds
        .iter()
        .zip(&latest)
        .map(|(&(kind, tasks), latest)| {
            runtime.spawn(load(kind, tasks, addr, stop.clone(), latest.clone()))
        })
        .collect();
    // Stops the load even when an assertion below fails.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop = StopOnDrop(stop.clone());

    let mut pid = gen0.id();
    for g in 1..=RESTARTS {
        let out = shellflip_at(&socket, &["restart"]);
        assert!(out.status.success(), "restart {g} failed: {out:?}");
        let new: u32 = out.stdout.trim().parse().expect("a PID");
        assert_ne!(new, pid, "restart {g} reported the old PID");
        pid = new;
        // Every client task reaches the new generation before the next restart: each restart
        // drains connections that are busy.
        wait_until(
            &format!("every client to reach generation {g}"),
            DEADLINE,
            || {
                latest
                    .iter()
                    .all(|l| l.iter().all(|t| t.load(Ordering::SeqCst) >= g))
                    .then_some(())
            },
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut results = Vec::new();
    for ((kind, _), handle) in kinds.iter().zip(loads) {
        let seen = runtime
            .block_on(async { tokio::time::timeout(DEADLINE, handle).await })
            .expect("the clients to finish")
            .expect("a client panicked");
        eprintln!(
            "{kind:?}: {} answered, {} failed ({} of them possibly processed), generation {}",
            seen.ok,
            seen.failures.len(),
            seen.processed_failures.len(),
            seen.max_generation
        );
        results.push((*kind, seen));
    }
    for (kind, seen) in &results {
        assert_eq!(seen.max_generation, RESTARTS, "{kind:?}");
        assert!(seen.ok > 0, "{kind:?} got no answer");
        // Whatever a client lost was never processed by the server: safe to retry.
        assert!(
            seen.processed_failures.is_empty(),
            "{kind:?}: {} requests failed after the server may have processed them: {:?}",
            seen.processed_failures.len(),
            &seen.processed_failures[..seen.processed_failures.len().min(10)]
        );
        if *kind != Kind::H2cPlain {
            assert!(
                seen.failures.is_empty(),
                "{kind:?}: {} of {} requests failed: {:?}",
                seen.failures.len(),
                seen.ok + seen.failures.len() as u64,
                &seen.failures[..seen.failures.len().min(10)]
            );
        }
    }
    // The old generations drained and exited: only the newest one is left.
    let final_hello = http(addr, "GET", "/").expect("GET / after the restarts");
    assert_eq!(parse_hello(&final_hello.body), Some((RESTARTS, pid)));
    let status = gen0.wait_timeout(DEADLINE).expect("generation 0 to exit");
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
}
