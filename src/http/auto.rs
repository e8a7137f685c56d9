//! HTTP/1.1 and HTTP/2 cleartext on one port (hyper-util's `auto` builder), drained without a
//! failed request (feature `http2`).

use std::error::Error as StdError;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::outcome::Handover;
use crate::shutdown::{ShutdownCoordinator, ShutdownSignal};

type BoxError = Box<dyn StdError + Send + Sync>;

/// How the old generation drains its connections once it stopped accepting.
///
/// # Examples
///
/// ```
/// use shellflip::http::Drain;
/// use std::time::Duration;
///
/// let drain = Drain::default()
///     .grace(Duration::from_secs(2))
///     .timeout(Duration::from_secs(20));
/// assert_eq!(drain.grace_period(), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    grace: Duration,
    timeout: Duration,
}

impl Default for Drain {
    /// A grace period of 5 s and a drain timeout of 30 s.
    fn default() -> Self {
        Drain {
            grace: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Drain {
    /// How long an HTTP/1.1 keep-alive connection stays open once draining started, to answer
    /// its next request with `Connection: close` (after which the client reconnects, to the new
    /// generation). A connection silent for that long is closed idle. HTTP/2 connections are
    /// sent GOAWAY at once and do not wait for it.
    ///
    /// ```
    /// let drain = shellflip::http::Drain::default().grace(std::time::Duration::from_secs(1));
    /// assert_eq!(drain.grace_period(), std::time::Duration::from_secs(1));
    /// ```
    pub fn grace(mut self, grace: Duration) -> Drain {
        self.grace = grace;
        self
    }

    /// How long the drain waits, at most, for every connection to finish; connections still
    /// open then are closed.
    ///
    /// ```
    /// let drain = shellflip::http::Drain::default().timeout(std::time::Duration::from_secs(9));
    /// assert_eq!(drain.timeout_period(), std::time::Duration::from_secs(9));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Drain {
        self.timeout = timeout;
        self
    }

    /// The grace period (see [`grace`](Self::grace)).
    ///
    /// ```
    /// assert_eq!(shellflip::http::Drain::default().grace_period().as_secs(), 5);
    /// ```
    pub fn grace_period(&self) -> Duration {
        self.grace
    }

    /// The drain timeout (see [`timeout`](Self::timeout)).
    ///
    /// ```
    /// assert_eq!(shellflip::http::Drain::default().timeout_period().as_secs(), 30);
    /// ```
    pub fn timeout_period(&self) -> Duration {
        self.timeout
    }
}

/// What the future that ends serving resolves to, told once the listener was closed.
///
/// [`serve`] (and `shellflip::axum::serve`) stop accepting when their `stop` future resolves,
/// then call [`accepting_stopped`](Self::accepting_stopped) on its output before draining: for
/// the restart task's output (`Result<Handover, RestartError>`) that answers the restart's
/// initiator with the new PID ([`Handover::accepting_stopped`]). Implemented for [`Handover`],
/// `()`, and `Result` and `Option` of those.
///
/// # Examples
///
/// ```
/// use shellflip::http::Stop;
///
/// // A SIGTERM or Ctrl-C is a `()`: nobody to tell.
/// ().accepting_stopped();
/// let failed: Result<shellflip::Handover, shellflip::RestartError> =
///     Err(shellflip::RestartError::LoopGone);
/// failed.accepting_stopped(); // nothing to tell either
/// ```
pub trait Stop {
    /// Called once the listener is closed, before the drain.
    fn accepting_stopped(&self);
}

impl Stop for Handover {
    fn accepting_stopped(&self) {
        Handover::accepting_stopped(self);
    }
}

impl Stop for () {
    fn accepting_stopped(&self) {}
}

impl<T: Stop, E> Stop for Result<T, E> {
    fn accepting_stopped(&self) {
        if let Ok(t) = self {
            t.accepting_stopped();
        }
    }
}

impl<T: Stop> Stop for Option<T> {
    fn accepting_stopped(&self) {
        if let Some(t) = self {
            t.accepting_stopped();
        }
    }
}

/// An HTTP connection failed (a protocol error, or the client went away mid-request): what
/// [`serve_connection_auto`] returns then. Its source is hyper's error.
///
/// # Examples
///
/// ```
/// # async fn f(io: hyper_util::rt::TokioIo<tokio::net::TcpStream>, signal: shellflip::ShutdownSignal) {
/// let service = hyper::service::service_fn(|_req| async {
///     Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("hello\n")))
/// });
/// let grace = std::time::Duration::from_secs(5);
/// if let Err(e) = shellflip::http::serve_connection_auto(io, service, signal, grace).await {
///     let _cause = std::error::Error::source(&e); // hyper's error
///     eprintln!("{e}");
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[error("HTTP connection: {0}")]
pub struct ConnectionError(#[source] BoxError);

/// Serves every connection `listener` accepts with `service`, over HTTP/1.1 or HTTP/2
/// cleartext (whichever the client speaks), until `stop` resolves; then stops accepting, tells
/// `stop`'s output ([`Stop`]: the restart's initiator hears the new PID), drains every
/// connection as [`serve_connection_auto`] does, waits at most [`Drain::timeout`] for them, and
/// returns `stop`'s output.
///
/// `stop` is polled at once: when it is the [`RestartTask`](crate::RestartTask), that first
/// poll declares this generation ready. To stop on SIGTERM too, give a future that resolves on
/// either (with an output such as `Option<Handover>`). Accepted sockets get `TCP_NODELAY`; an
/// accept that fails (out of descriptors) is retried after 100 ms.
///
/// With the restart task, an HTTP/1.1 client loses no request across restarts; a client of
/// HTTP/2 may still see a request refused on a connection that was going away, if it does not
/// stop opening streams on the first GOAWAY (hyper's client does not): see
/// `shellflip::client::RetryLayer` (feature `client-retry`) and BENCHMARKS.md.
///
/// # Examples
///
/// ```no_run
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use shellflip::http::Drain;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let config = shellflip::RestartConfig {
///     enabled: true,
///     coordination_socket_path: "/tmp/hello.sock".into(),
///     ..Default::default()
/// };
/// let listener = config.registry.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
/// let listener = tokio::net::TcpListener::from_std(listener)?;
/// let restart = config.try_into_restart_task()?;
/// let service = hyper::service::service_fn(|_req| async {
///     Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from("hello\n"))))
/// });
/// let handover = shellflip::http::serve(listener, service, restart, Drain::default()).await?;
/// std::process::exit(handover.exit_code());
/// # }
/// ```
pub async fn serve<S, B, F>(listener: TcpListener, service: S, stop: F, drain: Drain) -> F::Output
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    F: IntoFuture,
    F::Output: Stop,
{
    serve_with(listener, move |_| service.clone(), stop, drain).await
}

/// [`serve`] with a service made for each connection from the peer's address.
pub(crate) async fn serve_with<M, S, B, F>(
    listener: TcpListener,
    make_service: M,
    stop: F,
    drain: Drain,
) -> F::Output
where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    F: IntoFuture,
    F::Output: Stop,
{
    let coordinator = ShutdownCoordinator::new();
    let mut connections = JoinSet::new();
    let stop = stop.into_future();
    tokio::pin!(stop);
    let stopped = loop {
        tokio::select! {
            // The stop future first: its first poll may be the restart task declaring
            // readiness, and a restart is never delayed by a stream of connections.
            biased;
            stopped = &mut stop => break stopped,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let service = make_service(peer);
                    let signal = coordinator.signal();
                    let grace = drain.grace;
                    connections.spawn(async move {
                        if let Err(e) = serve_connection_auto(TokioIo::new(tcp), service, signal, grace).await {
                            tracing::debug!("{e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    // Stop accepting: from now on the next generation accepts on the same socket.
    drop(listener);
    stopped.accepting_stopped();
    let started = std::time::Instant::now();
    let open = connections.len();
    // Every connection's signal fires now; nothing holds a handle, so this does not wait.
    coordinator.shutdown().await;
    let drained = tokio::time::timeout(drain.timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if drained {
        tracing::info!(open, elapsed = ?started.elapsed(), "HTTP connections drained");
    } else {
        tracing::warn!(
            left = connections.len(),
            timeout = ?drain.timeout,
            "HTTP drain timeout passed: closing the connections left"
        );
        connections.shutdown().await;
    }
    stopped
}

/// The protocol a connection turned out to speak, as seen in its requests (0: none yet).
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// What the service wrapper tells the connection's driver.
#[derive(Default)]
struct Seen {
    protocol: AtomicU8,
    /// Notified when the first HTTP/2 request is seen.
    http2: Notify,
}

/// Serves one connection over HTTP/1.1 or HTTP/2 cleartext (hyper-util's `auto` builder, with
/// upgrades) until the client leaves or, once `signal` fired, until it is drained:
///
/// * HTTP/1.1: the connection stays open for `grace` and answers its next request with
///   `Connection: close`, after which it closes; the client reconnects, to the next generation
///   (an idle connection is closed when `grace` has passed);
/// * HTTP/2: GOAWAY at once, the way RFC 9113 §6.8 asks (hyper and h2: a first GOAWAY announcing
///   the highest stream id, a PING, and on its answer the final GOAWAY with the last stream
///   processed); streams in flight are answered, then the connection closes.
///
/// The future may run long after `signal` (a slow response, a stream): bound it with the drain's
/// timeout, as [`serve`] does.
///
/// # Examples
///
/// ```
/// use http_body_util::Full;
/// use hyper::body::Bytes;
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
///         let service = hyper::service::service_fn(|_req| async {
///             Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from("hello\n"))))
///         });
///         let conn = shellflip::http::serve_connection_auto(io, service, signal.clone(), Duration::from_secs(5));
///         tokio::spawn(conn);
///     }
/// });
/// # Ok(()) }
/// ```
pub async fn serve_connection_auto<I, S, B>(
    io: I,
    service: S,
    mut signal: ShutdownSignal,
    grace: Duration,
) -> Result<(), ConnectionError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let seen = Arc::new(Seen::default());
    let service = Draining {
        inner: service,
        closing: signal.clone(),
        seen: seen.clone(),
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    // As axum does: the extended CONNECT protocol, for WebSockets over HTTP/2.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.map_err(ConnectionError),
        _ = signal.on_shutdown() => {}
    }
    if seen.protocol.load(Ordering::SeqCst) != HTTP2 {
        // HTTP/1.1, or nothing asked yet: the next response says `Connection: close`. A
        // connection that turns out to speak HTTP/2 meanwhile gets its GOAWAY then.
        let first_http2 = seen.http2.notified();
        tokio::select! {
            r = conn.as_mut() => return r.map_err(ConnectionError),
            _ = first_http2 => {}
            _ = tokio::time::sleep(grace) => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    conn.await.map_err(ConnectionError)
}

/// Notes the protocol of each request and adds `Connection: close` to HTTP/1.x responses once
/// draining started.
struct Draining<S> {
    inner: S,
    closing: ShutdownSignal,
    seen: Arc<Seen>,
}

impl<S, B> Service<Request<Incoming>> for Draining<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() < Version::HTTP_2;
        let protocol = if http1 { HTTP1 } else { HTTP2 };
        if self.seen.protocol.swap(protocol, Ordering::SeqCst) != protocol && !http1 {
            self.seen.http2.notify_one();
        }
        let fut = self.inner.call(req);
        let closing = self.closing.clone();
        Box::pin(async move {
            let mut response = fut.await?;
            if http1 && closing.is_shutting_down() {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Bytes;

    fn hello() -> impl Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = std::convert::Infallible,
        Future = impl Future + Send + 'static,
    > + Clone
    + Send
    + 'static {
        hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello"))))
        })
    }

    /// What stopped serving, told when accepting stopped.
    #[derive(Debug)]
    struct Told(Arc<std::sync::atomic::AtomicBool>);

    impl Stop for Told {
        fn accepting_stopped(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Keep-alive HTTP/1.1 and HTTP/2 clients, connected before the stop: the HTTP/1.1 one is
    /// answered with `Connection: close` after it, the HTTP/2 one is sent GOAWAY, and `serve`
    /// returns what stopped it, told, once both are done.
    #[tokio::test]
    async fn after_the_stop_http1_is_told_to_close_and_http2_goes_away() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Told>();
        let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drain = Drain::default().grace(Duration::from_secs(30));
        let served = tokio::spawn(serve(listener, hello(), stop_rx, drain));

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let h2_conn = tokio::spawn(conn);
        let get = || Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        let r = h1.send_request(get()).await.unwrap();
        assert!(r.headers().get(CONNECTION).is_none());
        let r = h2.send_request(get()).await.unwrap();
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "hello");

        stop_tx.send(Told(told.clone())).unwrap();
        // The HTTP/2 connection ends (GOAWAY) without the client doing anything.
        tokio::time::timeout(Duration::from_secs(10), h2_conn)
            .await
            .expect("the HTTP/2 connection to end")
            .unwrap()
            .unwrap();
        assert!(
            told.load(Ordering::SeqCst),
            "accepting_stopped was not called"
        );
        // The HTTP/1.1 connection is still served, and told to close.
        let r = h1.send_request(get()).await.unwrap();
        assert_eq!(r.headers().get(CONNECTION).unwrap(), "close");
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "hello");
        let stopped = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serve to return once drained")
            .unwrap();
        assert!(stopped.is_ok_and(|t| Arc::ptr_eq(&t.0, &told)));
        // Not accepting any more.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    /// A connection that stays busy is closed when the drain timeout passes.
    #[tokio::test]
    async fn the_drain_is_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slow = hyper::service::service_fn(|_req| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let drain = Drain::default()
            .grace(Duration::from_millis(50))
            .timeout(Duration::from_millis(200));
        let served = tokio::spawn(serve(listener, slow, stop_rx, drain));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let pending = h1.send_request(Request::get("/").body(Empty::<Bytes>::new()).unwrap());
        let pending = tokio::spawn(pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serve to return at the drain timeout")
            .unwrap()
            .unwrap();
        // The request in flight was cut off.
        assert!(pending.await.unwrap().is_err());
    }
}
