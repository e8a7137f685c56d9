//! Retrying, on the client, the requests a draining HTTP/2 server never processed (feature
//! `client-retry`).
//!
//! A server that restarts sends GOAWAY on each HTTP/2 connection (RFC 9113 §6.8). A client that
//! keeps opening streams on that connection until the final GOAWAY arrives (hyper's client and
//! so tonic's do; `hyperium/hyper#2500`) sees those streams fail, typically with "connection
//! error received: not a result of an error" (a GOAWAY with `NO_ERROR` whose last stream id is
//! below the request's stream). No server can prevent that race; but RFC 9113 §8.7 says such a
//! request was not processed and may be retried, on another connection. [`RetryLayer`] does
//! exactly that, and nothing else: a request that failed in any other way (reset after the
//! server may have acted on it, a timeout, an error status) is returned as it failed.
//!
//! To be replayed, the request body is buffered, up to [`RetryLayer::max_body`] bytes; the
//! service below the layer receives it as a `Full<Bytes>`.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};

type BoxError = Box<dyn StdError + Send + Sync>;

/// A tower [`Layer`](tower_layer::Layer) that retries requests the server never processed:
/// those refused with `REFUSED_STREAM`, and those above the last stream id of a GOAWAY (RFC 9113
/// §8.7).
///
/// The service it wraps takes `http::Request<Full<Bytes>>` (a hyper-util client built for that
/// body, or a tonic `Channel` behind a `map_request`); the layered service takes any
/// `http::Request<B>` whose body is at most [`max_body`](Self::max_body) bytes. Its error is a
/// `Box<dyn Error + Send + Sync>`: the inner service's error as it was, or a [`BodyError`].
///
/// # Examples
///
/// A hyper-util client over HTTP/2 cleartext:
///
/// ```no_run
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::ServiceExt;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let client = Client::builder(TokioExecutor::new())
///     .http2_only(true)
///     .build_http::<Full<Bytes>>();
/// let client = tower::ServiceBuilder::new()
///     .layer(shellflip::client::RetryLayer::new())
///     .service(client);
/// let request = http::Request::get("http://127.0.0.1:8080/").body(http_body_util::Empty::<Bytes>::new())?;
/// // `oneshot` (or `ServiceExt::<http::Request<_>>::ready`): the layer takes any body type.
/// let response = client.clone().oneshot(request).await?;
/// # Ok(()) }
/// ```
///
/// A tonic `Channel` takes `tonic::body::Body`: convert below the layer with
/// `.map_request(|r: http::Request<Full<Bytes>>| r.map(tonic::body::Body::new))`.
#[derive(Debug, Clone, Copy)]
pub struct RetryLayer {
    max_body: usize,
    attempts: usize,
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new()
    }
}

impl RetryLayer {
    /// Bodies up to 64 KiB, and up to 5 retries of a request.
    ///
    /// ```
    /// let layer = shellflip::client::RetryLayer::new();
    /// ```
    pub fn new() -> RetryLayer {
        RetryLayer {
            max_body: 64 * 1024,
            attempts: 5,
        }
    }

    /// The largest request body buffered for a replay; a larger one fails with
    /// [`BodyError::TooLarge`] before it is sent.
    ///
    /// ```
    /// let layer = shellflip::client::RetryLayer::new().max_body(1 << 20);
    /// ```
    pub fn max_body(mut self, bytes: usize) -> RetryLayer {
        self.max_body = bytes;
        self
    }

    /// How many times one request is retried at most (each time only if it was not processed).
    ///
    /// ```
    /// let layer = shellflip::client::RetryLayer::new().retries(10);
    /// ```
    pub fn retries(mut self, n: usize) -> RetryLayer {
        self.attempts = n;
        self
    }
}

impl<S> tower_layer::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            max_body: self.max_body,
            attempts: self.attempts,
        }
    }
}

/// The service [`RetryLayer`] makes.
///
/// # Examples
///
/// ```
/// use tower_layer::Layer;
///
/// let inner = tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// });
/// let retry: shellflip::client::Retry<_> = shellflip::client::RetryLayer::new().layer(inner);
/// ```
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    max_body: usize,
    attempts: usize,
}

/// The request body could not be buffered for a replay: the layered service's error then
/// (boxed), found with `downcast_ref`.
///
/// # Examples
///
/// ```
/// use shellflip::client::BodyError;
///
/// let e: Box<dyn std::error::Error + Send + Sync> = BodyError::TooLarge(65536).into();
/// assert!(matches!(e.downcast_ref::<BodyError>(), Some(BodyError::TooLarge(65536))));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// It is larger than [`RetryLayer::max_body`].
    #[error("request body larger than {0} bytes: not buffered for a retry")]
    TooLarge(usize),
    /// Reading it failed.
    #[error("request body: {0}")]
    Read(#[source] BoxError),
}

impl<S, B, R> tower_service::Service<Request<B>> for Retry<S>
where
    S: tower_service::Service<Request<Full<Bytes>>, Response = Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service that was polled ready takes the first attempt; a clone the retries.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (max_body, attempts) = (self.max_body, self.attempts);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match Limited::new(body, max_body).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(BodyError::TooLarge(max_body).into());
                }
                Err(e) => return Err(BodyError::Read(e).into()),
            };
            let mut retries = 0;
            loop {
                let req = Request::from_parts(parts.clone(), Full::new(body.clone()));
                let result = inner.call(req).await.map_err(Into::into);
                match result {
                    Err(e) if retries < attempts && never_processed(&*e) => {
                        retries += 1;
                        tracing::debug!(
                            retries,
                            "retrying a request the server never processed: {e}"
                        );
                        std::future::poll_fn(|cx| inner.poll_ready(cx))
                            .await
                            .map_err(Into::into)?;
                    }
                    result => return result,
                }
            }
        })
    }
}

/// Whether `error` (or an error it was caused by) says that the server never processed the
/// request: HTTP/2 `REFUSED_STREAM`, a stream above the last stream id of a graceful GOAWAY
/// (RFC 9113 §8.7), or a request hyper dropped from a closing connection's queue before it
/// wrote any of it (`hyper::Error::is_canceled`).
///
/// # Examples
///
/// ```
/// let other = std::io::Error::other("timed out");
/// assert!(!shellflip::client::never_processed(&other));
/// ```
pub fn never_processed(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        // hyper's "canceled": the request was dropped from the connection's queue before a byte
        // of it was written (the connection closed under it: tonic's channel after a GOAWAY).
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    /// An HTTP/2 server that answers each connection's requests in turn with `answers`
    /// (`None`: 200, `Some(reason)`: a reset), counting the requests it received.
    async fn server(answers: Vec<Option<h2::Reason>>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (answers, counter) = (answers.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        match answers.get(n).copied().flatten() {
                            Some(reason) => respond.send_reset(reason),
                            None => {
                                let _ = respond.send_response(Response::new(()), true);
                            }
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    type Client = hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >;

    fn client() -> Client {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http()
    }

    fn get(addr: std::net::SocketAddr, body: &'static [u8]) -> Request<Full<Bytes>> {
        Request::post(format!("http://{addr}/"))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    }

    #[tokio::test]
    async fn a_refused_stream_is_retried_and_answered() {
        let refused = Some(h2::Reason::REFUSED_STREAM);
        let (addr, seen) = server(vec![refused, refused, None]).await;
        // Without the layer, the refusal reaches the caller, and is recognised.
        let e = client().request(get(addr, b"x")).await.unwrap_err();
        assert!(never_processed(&e), "{e:?}");
        // With it, the second refusal is retried too, and the third attempt is answered.
        let retry = RetryLayer::new().layer_over(client());
        let response = retry.oneshot(get(addr, b"body")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_reset_the_server_may_have_acted_on_is_not_retried() {
        let (addr, seen) = server(vec![Some(h2::Reason::INTERNAL_ERROR), None]).await;
        let retry = RetryLayer::new().layer_over(client());
        let e = retry.oneshot(get(addr, b"")).await.unwrap_err();
        assert!(!never_processed(&*e), "{e:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "retried");
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let (addr, seen) = server(vec![Some(h2::Reason::REFUSED_STREAM); 10]).await;
        let retry = RetryLayer::new().retries(2).layer_over(client());
        let e = retry.oneshot(get(addr, b"")).await.unwrap_err();
        assert!(never_processed(&*e), "{e:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_sent() {
        let (addr, seen) = server(vec![]).await;
        let retry = RetryLayer::new().max_body(3).layer_over(client());
        let e = retry.oneshot(get(addr, b"four")).await.unwrap_err();
        assert!(
            matches!(e.downcast_ref::<BodyError>(), Some(BodyError::TooLarge(3))),
            "{e:?}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 0);
    }

    impl RetryLayer {
        fn layer_over<S>(self, inner: S) -> Retry<S> {
            tower_layer::Layer::layer(&self, inner)
        }
    }
}
