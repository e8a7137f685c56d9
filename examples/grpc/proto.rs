//! What tonic-build would generate from `generations.proto`, written by hand and trimmed: the
//! messages, a server and a client. Written by hand so that the example needs neither `protoc`
//! nor a build script; a real service generates this (tonic-prost-build). The server uses one
//! half, the test (`tests/grpc.rs`) the other.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use tonic::codegen::{Body, BoxFuture, BoxStream, Context, Poll, Service, StdError, http};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CountRequest {
    #[prost(uint32, tag = "1")]
    pub count: u32,
    #[prost(uint32, tag = "2")]
    pub interval_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CountReply {
    #[prost(uint32, tag = "1")]
    pub n: u32,
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
}

const HELLO: &str = "/shellflip.example.Generations/Hello";
const COUNT: &str = "/shellflip.example.Generations/Count";

/// The service's methods: what the application implements.
pub trait Generations: Send + Sync + 'static {
    fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> impl Future<Output = Result<Response<HelloReply>, Status>> + Send;

    fn count(
        &self,
        request: Request<CountRequest>,
    ) -> impl Future<Output = Result<Response<BoxStream<CountReply>>, Status>> + Send;
}

/// The service as tonic serves it: routes each call to its method.
pub struct GenerationsServer<T>(Arc<T>);

impl<T> GenerationsServer<T> {
    pub fn from_arc(inner: Arc<T>) -> Self {
        GenerationsServer(inner)
    }
}

impl<T> Clone for GenerationsServer<T> {
    fn clone(&self) -> Self {
        GenerationsServer(self.0.clone())
    }
}

impl<T: Generations> tonic::server::NamedService for GenerationsServer<T> {
    const NAME: &'static str = "shellflip.example.Generations";
}

impl<T, B> Service<http::Request<B>> for GenerationsServer<T>
where
    T: Generations,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.0.clone();
        match req.uri().path() {
            HELLO => Box::pin(async move {
                let method = tower::service_fn(move |r| {
                    let inner = inner.clone();
                    async move { inner.hello(r).await }
                });
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(method, req).await)
            }),
            COUNT => Box::pin(async move {
                let method = tower::service_fn(move |r| {
                    let inner = inner.clone();
                    async move { inner.count(r).await }
                });
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.server_streaming(method, req).await)
            }),
            path => {
                let status = Status::unimplemented(format!("no method {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A client of the service, over a tonic `Channel` (or any service layered over one, such as
/// one behind `shellflip::client::RetryLayer`).
#[derive(Clone)]
pub struct GenerationsClient<T = tonic::transport::Channel>(tonic::client::Grpc<T>);

impl<T> GenerationsClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    pub fn new(inner: T) -> Self {
        GenerationsClient(tonic::client::Grpc::new(inner))
    }

    pub async fn hello(&mut self, request: HelloRequest) -> Result<Response<HelloReply>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static(HELLO);
        (self.0)
            .unary(Request::new(request), path, ProstCodec::default())
            .await
    }

    pub async fn count(
        &mut self,
        request: CountRequest,
    ) -> Result<Response<Streaming<CountReply>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static(COUNT);
        (self.0)
            .server_streaming(Request::new(request), path, ProstCodec::default())
            .await
    }

    async fn ready(&mut self) -> Result<(), Status> {
        (self.0)
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("service was not ready: {}", e.into())))
    }
}
