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

/// The request body could not be buffered for a replay.
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
/// request: HTTP/2 `REFUSED_STREAM`, or a stream above the last stream id of a graceful GOAWAY
/// (RFC 9113 §8.7).
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
