//! The load generator: HTTP/1.1 `GET /` over N connections, closed loop, as fast as the machine
//! answers. Keep-alive connections are reused until the server answers `Connection: close` (then
//! the client reconnects: not a failure); in the other mode every request opens a connection.
//! The HTTP/2 cleartext modes use hyper-util's client (one per connection, each with
//! [`H2_STREAMS`] tasks sending on it), with or without `shellflip::client::RetryLayer`.
//!
//! Every request is recorded: when it started, how long it took, and how it ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// A complete `200` answer.
    Ok = 0,
    /// The connection was refused (nothing listening).
    Refused = 1,
    /// The connection was reset (RST, or a broken pipe while sending).
    Reset = 2,
    /// The server closed the connection before sending any byte of the answer.
    Closed = 3,
    /// No complete answer within the deadline.
    TimedOut = 4,
    /// An answer other than `200`, or one that does not parse.
    BadStatus = 5,
    /// The connection ended in the middle of the answer.
    ShortBody = 6,
    /// Any other error.
    Other = 7,
    /// HTTP/2: the server never processed the request (REFUSED_STREAM, or above the last stream
    /// id of a GOAWAY): safe to retry (RFC 9113 §8.7).
    Unprocessed = 8,
}

/// Every failure kind, in table order, with its column name.
pub const FAILURES: [(Outcome, &str); 8] = [
    (Outcome::Refused, "refused"),
    (Outcome::Reset, "reset"),
    (Outcome::Closed, "closed"),
    (Outcome::TimedOut, "timed out"),
    (Outcome::BadStatus, "bad status"),
    (Outcome::ShortBody, "short body"),
    (Outcome::Other, "other"),
    (Outcome::Unprocessed, "h2 unprocessed"),
];

/// How the load's requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1, connections reused until `Connection: close`.
    KeepAlive,
    /// HTTP/1.1, a new connection per request.
    NewConnection,
    /// HTTP/2 cleartext, hyper-util's client.
    H2c,
    /// HTTP/2 cleartext, hyper-util's client behind `shellflip::client::RetryLayer`.
    H2cRetry,
}

impl Mode {
    /// The name in tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::NewConnection => "new per request",
            Mode::H2c => "h2c, hyper client",
            Mode::H2cRetry => "h2c, hyper client + RetryLayer",
        }
    }
}

/// Concurrent requests on each HTTP/2 connection.
pub const H2_STREAMS: usize = 10;

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Start, in microseconds since the run's origin.
    pub start_us: u64,
    /// Time to the complete answer (or to the failure), in microseconds.
    pub latency_us: u32,
    /// How it ended.
    pub outcome: Outcome,
}

/// What load to send.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// The HTTP server.
    pub addr: SocketAddr,
    /// Concurrent connections (closed loop: one request at a time on each).
    pub connections: usize,
    /// How requests travel.
    pub mode: Mode,
    /// Deadline of one request, connection included.
    pub timeout: Duration,
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// Starts `spec.connections` clients; times are measured from `origin`.
    pub fn start(spec: LoadSpec, origin: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = match spec.mode {
            Mode::KeepAlive | Mode::NewConnection => (0..spec.connections)
                .map(|_| tokio::spawn(client(spec, origin, stop.clone())))
                .collect(),
            Mode::H2c | Mode::H2cRetry => (0..spec.connections)
                .flat_map(|_| {
                    let h2 = H2Client::new(spec.mode == Mode::H2cRetry);
                    (0..H2_STREAMS)
                        .map(|_| tokio::spawn(h2_client(h2.clone(), spec, origin, stop.clone())))
                        .collect::<Vec<_>>()
                })
                .collect(),
        };
        Load { stop, tasks }
    }

    /// Stops the clients (each finishes its request in flight) and returns every request,
    /// sorted by start.
    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            if let Ok(v) = t.await {
                all.extend(v);
            }
        }
        all.sort_by_key(|s| s.start_us);
        all
    }
}

async fn client(spec: LoadSpec, origin: Instant, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let keepalive = spec.mode == Mode::KeepAlive;
    let request: &[u8] = if keepalive {
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    };
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = tokio::time::timeout(
            spec.timeout,
            one_request(&mut conn, &mut buf, request, spec.addr),
        )
        .await;
        let latency = started.elapsed();
        let outcome = match result {
            Err(_) => Outcome::TimedOut,
            Ok(Ok(close)) => {
                if close || !keepalive {
                    conn = None;
                }
                Outcome::Ok
            }
            Ok(Err(kind)) => kind,
        };
        out.push(Sample {
            start_us: (started - origin).as_micros() as u64,
            latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
            outcome,
        });
        if outcome != Outcome::Ok {
            conn = None;
            // Do not spin on a refused port.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    out
}

type Body = http_body_util::Full<bytes::Bytes>;
type Plain =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// One HTTP/2 connection's client (hyper-util's pool keeps one connection per host), with the
/// retry layer or without.
#[derive(Clone)]
struct H2Client {
    plain: Plain,
    retry: Option<shellflip::client::Retry<Plain>>,
}

impl H2Client {
    fn new(retry: bool) -> H2Client {
        let plain: Plain =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let retry = retry
            .then(|| tower::Layer::layer(&shellflip::client::RetryLayer::new(), plain.clone()));
        H2Client { plain, retry }
    }

    /// `GET /` once: the outcome.
    async fn get(&mut self, uri: &hyper::Uri) -> Outcome {
        use http_body_util::BodyExt;
        use tower::{Service, ServiceExt};
        let req = hyper::Request::get(uri.clone()).body(Body::default());
        let Ok(req) = req else {
            return Outcome::Other;
        };
        let response = match &mut self.retry {
            Some(retry) => match ServiceExt::<hyper::Request<Body>>::ready(retry).await {
                Ok(svc) => svc.call(req).await,
                Err(e) => Err(e),
            },
            None => self.plain.request(req).await.map_err(Into::into),
        };
        match response {
            Ok(r) => {
                let ok = r.status() == hyper::StatusCode::OK;
                match r.into_body().collect().await {
                    Ok(_) if ok => Outcome::Ok,
                    Ok(_) => Outcome::BadStatus,
                    Err(_) => Outcome::ShortBody,
                }
            }
            Err(e) => error_outcome(&*e),
        }
    }
}

/// How many failures were described on standard error so far.
static DESCRIBED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Classifies a client error, describing the first few on standard error.
fn error_outcome(e: &(dyn std::error::Error + 'static)) -> Outcome {
    let outcome = if shellflip::client::never_processed(e) {
        Outcome::Unprocessed
    } else {
        let mut next = Some(e);
        let mut found = Outcome::Other;
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                found = io_outcome(io);
                break;
            }
            next = e.source();
        }
        found
    };
    if DESCRIBED.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("  a request failed ({outcome:?}): {e:?}");
    }
    outcome
}

async fn h2_client(
    mut h2: H2Client,
    spec: LoadSpec,
    origin: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let uri: hyper::Uri = match format!("http://{}/", spec.addr).parse() {
        Ok(u) => u,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let outcome = tokio::time::timeout(spec.timeout, h2.get(&uri))
            .await
            .unwrap_or(Outcome::TimedOut);
        out.push(Sample {
            start_us: (started - origin).as_micros() as u64,
            latency_us: started.elapsed().as_micros().min(u32::MAX as u128) as u32,
            outcome,
        });
        if outcome != Outcome::Ok {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    out
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Outcome::Refused,
        ConnectionReset | BrokenPipe | ConnectionAborted => Outcome::Reset,
        _ => Outcome::Other,
    }
}

/// One request on `conn` (connecting first when there is none). Ok(true) when the answer
/// said `Connection: close`.
async fn one_request(
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
    request: &[u8],
    addr: SocketAddr,
) -> Result<bool, Outcome> {
    if conn.is_none() {
        let s = TcpStream::connect(addr).await.map_err(|e| io_outcome(&e))?;
        let _ = s.set_nodelay(true);
        *conn = Some(s);
    }
    let Some(s) = conn.as_mut() else {
        return Err(Outcome::Other);
    };
    s.write_all(request).await.map_err(|e| io_outcome(&e))?;
    buf.clear();
    let header_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(Outcome::BadStatus);
        }
        buf.reserve(4096);
        let n = s.read_buf(buf).await.map_err(|e| io_outcome(&e))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                Outcome::Closed
            } else {
                Outcome::ShortBody
            });
        }
    };
    let (ok, length, close) = parse_head(&buf[..header_end]).ok_or(Outcome::BadStatus)?;
    while buf.len() < header_end + length {
        buf.reserve(4096);
        let n = s.read_buf(buf).await.map_err(|e| io_outcome(&e))?;
        if n == 0 {
            return Err(Outcome::ShortBody);
        }
    }
    if !ok {
        return Err(Outcome::BadStatus);
    }
    Ok(close)
}

/// Status 200 or not, `Content-Length`, `Connection: close`.
fn parse_head(head: &[u8]) -> Option<(bool, usize, bool)> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?;
    let mut length = None;
    let mut close = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    Some((status == "200", length?, close))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `GET /` once, blocking, with a fresh connection: the body, or why not.
pub fn get_root(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or(text))
}
