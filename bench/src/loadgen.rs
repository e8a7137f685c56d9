//! The load generator: HTTP/1.1 `GET /` over N connections, closed loop, as fast as the machine
//! answers. Keep-alive connections are reused until the server answers `Connection: close` (then
//! the client reconnects: not a failure); in the other mode every request opens a connection.
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
}

/// Every failure kind, in table order, with its column name.
pub const FAILURES: [(Outcome, &str); 7] = [
    (Outcome::Refused, "refused"),
    (Outcome::Reset, "reset"),
    (Outcome::Closed, "closed"),
    (Outcome::TimedOut, "timed out"),
    (Outcome::BadStatus, "bad status"),
    (Outcome::ShortBody, "short body"),
    (Outcome::Other, "other"),
];

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
    /// Reuse connections (HTTP/1.1 keep-alive) or open one per request.
    pub keepalive: bool,
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
        let tasks = (0..spec.connections)
            .map(|_| tokio::spawn(client(spec, origin, stop.clone())))
            .collect();
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
    let request: &[u8] = if spec.keepalive {
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
                if close || !spec.keepalive {
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
