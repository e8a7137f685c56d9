//! What every HTTP service under test answers, so that the load sees the same bytes whichever
//! restart library serves them: `GET /` answers `generation=N pid=P greeting=hello` like the
//! example service.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

/// The listen backlog the peers' services use: the example service binds with the standard
/// library, whose backlog on Linux is the kernel's maximum (`somaxconn`), so the peers ask for
/// the same.
pub const BACKLOG: i32 = 4096;

/// Answers `GET /` with the generation and PID, anything else with 404.
pub async fn answer(
    req: Request<Incoming>,
    generation: u64,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => (
            StatusCode::OK,
            format!(
                "generation={generation} pid={} greeting=hello\n",
                std::process::id()
            ),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    Ok(r)
}

/// A multi-threaded runtime with two workers, like the example service's.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on one machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
