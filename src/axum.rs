//! Serving an axum [`Router`] across restarts without a failed request (feature `axum`).
//!
//! `axum::serve(listener, router).with_graceful_shutdown(restart)`, the drain axum documents,
//! loses about one request per keep-alive connection at every restart: it closes idle HTTP/1.1
//! connections at once, under clients that are sending their next request on them (measured in
//! BENCHMARKS.md). [`serve`] is its replacement: the same accept loop over hyper-util's `auto`
//! builder (HTTP/1.1 and HTTP/2 cleartext on one port, upgrades and WebSockets included), which
//! on a restart stops accepting, tells the restart's initiator, answers each HTTP/1.1
//! connection's next request with `Connection: close` for a grace period, sends GOAWAY on each
//! HTTP/2 connection, and waits for them at most [`Drain::timeout`].
//!
//! Handlers can extract the peer's address with
//! `axum::extract::ConnectInfo<std::net::SocketAddr>`, as with
//! `into_make_service_with_connect_info`. A WebSocket, once upgraded, is a task of the
//! application's own: the drain does not wait for it (end it on a `ShutdownSignal` of yours).

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;

use ::axum::Router;
use ::axum::extract::ConnectInfo;
use ::axum::routing::future::RouteFuture;
use hyper::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;

pub use crate::http::{Drain, Stop};

/// Serves `router` on `listener` (HTTP/1.1 and HTTP/2 cleartext) until `stop` resolves, then
/// stops accepting, tells `stop`'s output ([`Stop`]: with the restart task, the initiator hears
/// the new PID now), drains every connection and returns `stop`'s output.
///
/// `stop` is polled at once: with the [`RestartTask`](crate::RestartTask), that first poll
/// declares this generation ready. To stop on SIGTERM as well, pass a future that resolves on
/// either (see `examples/axum.rs`).
///
/// # Examples
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use shellflip::axum::Drain;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let config = shellflip::RestartConfig {
///     enabled: true,
///     coordination_socket_path: "/tmp/app.sock".into(),
///     ..Default::default()
/// };
/// // Inherited from the previous generation, or bound now.
/// let listener = config.registry.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
/// let listener = tokio::net::TcpListener::from_std(listener)?;
/// let restart = config.try_into_restart_task()?;
/// let app = Router::new().route("/", get(|| async { "hello\n" }));
/// let handover = shellflip::axum::serve(listener, app, restart, Drain::default()).await?;
/// std::process::exit(handover.exit_code());
/// # }
/// ```
pub async fn serve<F>(listener: TcpListener, router: Router, stop: F, drain: Drain) -> F::Output
where
    F: IntoFuture,
    F::Output: Stop,
{
    let make = move |peer| RouterService {
        router: router.clone(),
        peer,
    };
    crate::http::serve_with(listener, make, stop, drain).await
}

/// The router as a hyper service of one connection.
struct RouterService {
    router: Router,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for RouterService {
    type Response = ::axum::response::Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let req = req.map(::axum::body::Body::new);
        // A router is always ready.
        tower_service::Service::call(&mut self.router.clone(), req)
    }
}
