//! Draining HTTP connections without losing a request: HTTP/1.1 with hyper (feature `hyper`),
//! HTTP/1.1 and HTTP/2 cleartext on one port with hyper-util's `auto` builder (feature `http2`).
//!
//! The drain that hyper documents (`graceful_shutdown`) closes idle keep-alive connections at
//! once. A client that sends its next request on such a connection at that moment sees it
//! closed under it, and the request fails: with continuous keep-alive load that is tens of
//! requests per restart. [`serve_connection`] does it differently: once shutdown has started,
//! the connection stays open for a grace period and answers its next request with
//! `Connection: close`, then closes. The client learns from the answer itself that it must
//! reconnect, and its next connection reaches the new generation. Only a connection that stays
//! silent for the whole grace period is closed idle.
//!
//! With the `http2` feature, [`serve`] runs the whole accept loop of a hyper service on one
//! port for both protocols: it stops accepting when the restart task resolves, tells the
//! restart's initiator ([`Stop`]), drains every connection ([`serve_connection_auto`]: HTTP/1.1
//! as above, HTTP/2 with GOAWAY) and waits at most [`Drain::timeout`].

use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};

use crate::shutdown::ShutdownSignal;

#[cfg(feature = "http2")]
mod auto;
#[cfg(feature = "axum")]
pub(crate) use auto::serve_with;
#[cfg(feature = "http2")]
pub use auto::{ConnectionError, Drain, Stop, serve, serve_connection_auto};

/// Serves one HTTP/1.1 connection with keep-alive until the client leaves or, once `signal`
/// fires, until its next response (sent with `Connection: close`) or `grace` has passed.
///
/// # Examples
///
/// ```
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use hyper::{Request, Response};
/// use shellflip::ShutdownCoordinator;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let coordinator = ShutdownCoordinator::new();
/// let signal = coordinator.signal();
/// tokio::spawn(async move {
///     while let Ok((tcp, _)) = listener.accept().await {
///         let io = hyper_util::rt::TokioIo::new(tcp);
///         let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
///             Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
///         });
///         let signal = signal.clone();
///         tokio::spawn(shellflip::http::serve_connection(io, service, signal, Duration::from_secs(5)));
///     }
/// });
/// # Ok(()) }
/// ```
pub async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    mut signal: ShutdownSignal,
    grace: Duration,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let closing = signal.clone();
    let service = CloseWhenDraining {
        inner: service,
        closing,
    };
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = signal.on_shutdown() => {}
    }
    // Draining: the next response carries `Connection: close`, after which hyper closes.
    if let Ok(r) = tokio::time::timeout(grace, conn.as_mut()).await {
        return r;
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Adds `Connection: close` to every response once shutdown has started.
struct CloseWhenDraining<S> {
    inner: S,
    closing: ShutdownSignal,
}

impl<S, B> Service<Request<Incoming>> for CloseWhenDraining<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let fut = self.inner.call(req);
        let closing = self.closing.clone();
        Box::pin(async move {
            let mut response = fut.await?;
            if closing.is_shutting_down() {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}
