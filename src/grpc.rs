//! Serving a tonic (gRPC) server across restarts (feature `grpc`).
//!
//! tonic's `serve_with_incoming_shutdown(incoming, signal)` already drains the way HTTP/2 asks
//! (RFC 9113 §6.8): once `signal` resolves it stops accepting, sends every connection a GOAWAY
//! announcing the largest stream id, then, a round trip later, the final GOAWAY, and waits until
//! every request in flight was answered. What it lacks is the rest of a restart: telling the
//! restart's initiator that this generation stopped accepting
//! ([`Handover::accepting_stopped`](crate::Handover::accepting_stopped)), a bound on the drain
//! (tonic waits without one, for as long as a server stream runs), and the outcome to exit with.
//! [`serve`] adds them around tonic's own call, which the application still writes itself, so
//! that this crate is not tied to a tonic version (any server that takes a stream of
//! connections and a shutdown future fits).
//!
//! What no server can do: a tonic client ([`Channel`]) abandons the requests it had queued for
//! a connection when the GOAWAY arrives, before sending them, and reports them as failed
//! (`Cancelled`, "operation was canceled"). The server never saw them, so RFC 9113 §8.7 makes
//! them safe to retry; only a retry on the client's side avoids them.
//!
//! [`Channel`]: https://docs.rs/tonic/0.14/tonic/transport/struct.Channel.html
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = shellflip::RestartConfig::default();
//! let listener = config.registry.tcp_listener("grpc", "127.0.0.1:50051".parse()?)?;
//! let listener = tokio::net::TcpListener::from_std(listener)?;
//! let mut restart = config.try_into_restart_task()?;
//! let routes = tonic::service::Routes::default(); // .add_service(MyServer::new(...))
//! let stop = shellflip::grpc::serve(&listener, &mut restart, Duration::from_secs(30), |incoming, shutdown| {
//!     tonic::transport::Server::builder()
//!         .add_routes(routes)
//!         .serve_with_incoming_shutdown(incoming, shutdown)
//! })
//! .await?;
//! drop(listener);
//! std::process::exit(match stop {
//!     shellflip::Stop::Restart(handover) => handover.exit_code(),
//!     _ => 0, // SIGTERM
//! });
//! # }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::stream::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::outcome::RestartError;
use crate::restart::{RestartTask, Stop};

/// How long [`Incoming`] waits after a failed accept (`EMFILE`, ...) before the next one, so
/// that a server that polls again at once does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why [`serve`] ended without a restart or SIGTERM to drain for.
///
/// # Examples
///
/// ```no_run
/// # async fn f(listener: tokio::net::TcpListener, mut restart: shellflip::RestartTask, routes: tonic::service::Routes) {
/// use shellflip::grpc::ServeError;
///
/// let served = shellflip::grpc::serve(&listener, &mut restart, std::time::Duration::from_secs(30), |incoming, shutdown| {
///     tonic::transport::Server::builder()
///         .add_routes(routes)
///         .serve_with_incoming_shutdown(incoming, shutdown)
/// })
/// .await;
/// match served {
///     Ok(_stop) => { /* drained: exit */ }
///     Err(ServeError::Restart(e)) => eprintln!("no more restarts: {e}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The restart task failed: restarts are no longer possible. The server was stopped and
    /// drained.
    #[error(transparent)]
    Restart(#[from] RestartError),
    /// The server failed before a restart or SIGTERM.
    #[error("the server failed: {0}")]
    Server(Box<dyn std::error::Error + Send + Sync>),
    /// The server returned on its own, before a restart or SIGTERM.
    #[error("the server returned before a restart or SIGTERM")]
    ServerReturned,
}

/// Serves until a restart or SIGTERM, then drains for at most `drain`.
///
/// `server` is called once with the connections to serve ([`Incoming`], accepted from
/// `listener`) and the future that tells it to stop ([`Shutdown`]); give them to tonic's
/// `serve_with_incoming_shutdown`. When a restart succeeds (or SIGTERM arrives), `Shutdown`
/// resolves: the server stops accepting, this generation tells the restart's initiator so
/// ([`Handover::accepting_stopped`](crate::Handover::accepting_stopped)), and the server drains
/// its connections (tonic: GOAWAY, then every request in flight answered). `serve` returns once
/// the server returned, or `drain` passed (the connections left are cut when the process
/// exits); then drop the listener and exit with
/// [`Handover::exit_code`](crate::Handover::exit_code).
///
/// With a probation ([`RestartConfig::probation`](crate::RestartConfig::probation)), the
/// listener is kept: await [`Handover::confirmed`](crate::Handover::confirmed) after `serve`
/// returned, and on a rollback call `serve` again with the same listener and task (connections
/// that arrived meanwhile waited in the listen queue).
///
/// # Examples
///
/// ```no_run
/// # async fn f(listener: tokio::net::TcpListener, mut restart: shellflip::RestartTask, routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// let stop = shellflip::grpc::serve(&listener, &mut restart, Duration::from_secs(30), |incoming, shutdown| {
///     tonic::transport::Server::builder()
///         .add_routes(routes)
///         .serve_with_incoming_shutdown(incoming, shutdown)
/// })
/// .await?;
/// if let shellflip::Stop::Restart(handover) = stop {
///     drop(listener);
///     std::process::exit(handover.exit_code());
/// }
/// # Ok(()) }
/// ```
pub async fn serve<'a, F, Fut, E>(
    listener: &'a TcpListener,
    restart: &'a mut RestartTask,
    drain: Duration,
    server: F,
) -> Result<Stop, ServeError>
where
    F: FnOnce(Incoming<'a>, Shutdown<'a>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stopping = Arc::new(AtomicBool::new(false));
    let incoming = Incoming {
        listener,
        stopping: stopping.clone(),
        backoff: None,
    };
    let (outcome_tx, mut outcome) = oneshot::channel();
    let shutdown = Shutdown(Box::pin(async move {
        let stop = restart.restart_or_terminate().await;
        // The server stops accepting as this future resolves: it polls `incoming` no more.
        stopping.store(true, Ordering::SeqCst);
        if let Ok(Stop::Restart(handover)) = &stop {
            handover.accepting_stopped();
        }
        let _ = outcome_tx.send(stop);
    }));
    let serving = server(incoming, shutdown);
    tokio::pin!(serving);
    let stop = tokio::select! {
        biased;
        stop = &mut outcome => stop,
        returned = &mut serving => {
            // It may have drained already, in the same poll as the shutdown.
            return match (returned, outcome.try_recv()) {
                (_, Ok(stop)) => Ok(stop?),
                (Err(e), Err(_)) => Err(ServeError::Server(e.into())),
                (Ok(()), Err(_)) => Err(ServeError::ServerReturned),
            };
        }
    };
    // The shutdown future was dropped unresolved only with `serving`, which is still here.
    let Ok(stop) = stop else {
        return Err(ServeError::ServerReturned);
    };
    let started = std::time::Instant::now();
    tracing::info!("draining the server's connections");
    match tokio::time::timeout(drain, serving).await {
        Ok(Ok(())) => tracing::info!(elapsed = ?started.elapsed(), "drained"),
        Ok(Err(e)) => tracing::warn!("the server failed while draining: {}", e.into()),
        Err(_) => tracing::warn!(?drain, "drain deadline passed with connections still open"),
    }
    Ok(stop?)
}

/// The connections [`serve`] hands the server: accepted from the listener, with `TCP_NODELAY`
/// set, until the restart or SIGTERM. A failed accept is yielded (tonic logs it and goes on)
/// and the next one waits 50 ms.
///
/// # Examples
///
/// ```no_run
/// # async fn f(listener: tokio::net::TcpListener, mut restart: shellflip::RestartTask) -> Result<(), shellflip::grpc::ServeError> {
/// use futures_util::StreamExt;
///
/// shellflip::grpc::serve(&listener, &mut restart, std::time::Duration::from_secs(5), |mut incoming, shutdown| async move {
///     tokio::pin!(shutdown);
///     loop {
///         tokio::select! {
///             Some(conn) = incoming.next() => { let _ = conn?; /* serve it */ }
///             _ = &mut shutdown => return Ok::<_, std::io::Error>(()),
///         }
///     }
/// })
/// .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a TcpListener,
    stopping: Arc<AtomicBool>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Incoming<'_> {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stopping.load(Ordering::SeqCst) {
            return Poll::Ready(None);
        }
        if let Some(backoff) = &mut self.backoff {
            ready!(backoff.as_mut().poll(cx));
            self.backoff = None;
        }
        match ready!(self.listener.poll_accept(cx)) {
            Ok((tcp, _)) => {
                // gRPC's small frames: do not wait to fill segments. Failing to set it only
                // costs latency.
                let _ = tcp.set_nodelay(true);
                Poll::Ready(Some(Ok(tcp)))
            }
            Err(e) => {
                self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// The future [`serve`] hands the server as its shutdown signal: it resolves on a restart or
/// SIGTERM, once this generation no longer accepts.
///
/// # Examples
///
/// ```no_run
/// # async fn f(listener: tokio::net::TcpListener, mut restart: shellflip::RestartTask) -> Result<(), shellflip::grpc::ServeError> {
/// shellflip::grpc::serve(&listener, &mut restart, std::time::Duration::from_secs(5), |_incoming, shutdown| async move {
///     shutdown.await; // a server that accepts nothing
///     Ok::<_, std::io::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub struct Shutdown<'a>(Pin<Box<dyn Future<Output = ()> + Send + 'a>>);

impl std::fmt::Debug for Shutdown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown").finish_non_exhaustive()
    }
}

impl Future for Shutdown<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}
