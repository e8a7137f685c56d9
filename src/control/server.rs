//! The control socket's server.
//!
//! * Peer credentials are checked at accept, before a connection costs anything: a client of
//!   another user is answered "permission denied" at once, without a task or a slot.
//! * A request already sent when its connection is accepted (what an operator's client does) is
//!   served at once. A connection that has not sent a whole request yet is one of the *idle*: at
//!   most [`MAX_IDLE`] of them, each with [`REQUEST_DEADLINE`] to finish its request; a newcomer
//!   beyond that closes the oldest. Idle, trickling or reconnecting clients can thus take
//!   neither the operator's turn nor more than a bounded number of descriptors.
//! * At the descriptor limit a descriptor kept in reserve is let go to accept each queued
//!   connection and tell its client so, at once.
//! * Every connection is answered, also across the handover: [`ControlServer::hand_over`]
//!   stops accepting, answers what is still queued and what is being served, and only then
//!   releases the lock the next generation waits for before it serves.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, getsockopt, recv, sockopt};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::socket_file::{self, ControlSocket, PathCheck, PathLock};
use super::{
    Access, Command, IO_DEADLINE, Initiator, RestartCoordinationSocket, RestartMessage,
    RestartRequest, RestartResponse, Status, answer_now, encode, satisfied_by,
};
use crate::inherit::{self, Origin};
use crate::outcome::RestartError;

/// How long a client has, once connected, to send its whole request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Connections that have not sent a whole request yet, at most.
const MAX_IDLE: usize = 64;
/// The largest request read (a request is a few dozen bytes).
const MAX_REQUEST: usize = 4096;
/// Connections answered at once when they are found queued (at the handover, at the
/// descriptor limit); more wait for the next turn.
const MAX_BATCH: usize = 1024;
/// How long the handover waits for the connections being answered.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(1);
/// How often a new generation tries the lock while the previous one hands over.
const LOCK_RETRY: Duration = Duration::from_millis(10);
/// When a new generation says it is still waiting for the lock.
const LOCK_PATIENCE: Duration = Duration::from_secs(5);
/// A pause after an accept error, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The running server: stops, and hands the socket over, on the restart loop's word.
pub(crate) struct ControlServer {
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// The accept loop; gives back the listener and the lock once stopped.
    accepting: JoinHandle<Option<Serving>>,
}

/// What the accept loop and every connection's task share.
struct Shared {
    commands: mpsc::Sender<Command>,
    access: Access,
    tracker: TaskTracker,
    idle: Arc<Idle>,
    /// Set once this process handed over.
    handed_over: watch::Sender<Option<Successor>>,
}

/// The socket as served: the listener, and the lock this generation holds for it.
struct Serving {
    listener: UnixListener,
    _lock: Option<PathLock>,
}

/// What this process knows once it handed over: who serves the socket now — the new PID
/// (fork/exec), or `None` while systemd starts the next generation — and its own last status.
#[derive(Debug, Clone)]
struct Successor {
    new_pid: Option<u32>,
    status: Status,
}

impl Successor {
    /// The answer to a connection whose request had not arrived when this process handed over.
    fn handed_over(&self) -> RestartMessage {
        failed(&match self.new_pid {
            Some(pid) => format!("this process has handed over to PID {pid}; ask again"),
            None => "this process has handed over; systemd starts the next generation: ask again"
                .to_owned(),
        })
    }

    /// The answer to `request`, sent before this process handed over but not answered by the
    /// restart loop: a restart was satisfied by the one that just succeeded; the status is this
    /// process's last.
    fn answer(&self, request: &RestartRequest) -> RestartMessage {
        RestartMessage::Response(match request {
            RestartRequest::TryRestart => match satisfied_by(self.new_pid) {
                Ok(Some(pid)) => RestartResponse::RestartComplete(pid),
                Ok(None) | Err(_) => {
                    RestartResponse::RestartFailed(RestartError::InProgress.to_string())
                }
            },
            RestartRequest::Status => RestartResponse::Status(self.status.clone()),
        })
    }
}

fn failed(why: &str) -> RestartMessage {
    RestartMessage::Response(RestartResponse::RestartFailed(why.to_owned()))
}

impl ControlSocket {
    /// Starts serving: at once when this process bound the socket; a generation that inherited
    /// it first waits until the previous one handed over (its lock), and binds the socket again
    /// if its file is gone.
    pub(crate) fn serve(self) -> ControlServer {
        let shared = Arc::new(Shared {
            commands: self.commands.clone(),
            access: self.access.clone(),
            tracker: TaskTracker::new(),
            idle: Arc::new(Idle::default()),
            handed_over: watch::Sender::new(None),
        });
        let stop = CancellationToken::new();
        let accepting = tokio::spawn(run(self, shared.clone(), stop.clone()));
        ControlServer {
            shared,
            stop,
            accepting,
        }
    }
}

impl ControlServer {
    /// Once a restart succeeded and its initiator was answered: stops accepting, answers every
    /// connection still queued and every one being served, then releases the lock for the next
    /// generation to serve the socket. A request that had arrived is answered as the loop would
    /// have: a restart with the new PID (that restart satisfied it), a status with `status`;
    /// a connection whose request had not arrived yet is told "handed over to PID N; ask
    /// again". Waits at most [`HANDOVER_DEADLINE`] for the answers to be written.
    pub(crate) async fn hand_over(mut self, new_pid: Option<u32>, status: Status) {
        let successor = Successor { new_pid, status };
        self.stop.cancel();
        let serving = (&mut self.accepting).await.ok().flatten();
        self.shared
            .handed_over
            .send_replace(Some(successor.clone()));
        if let Some(serving) = serving {
            answer_queued(&serving.listener, &self.shared.access, &successor);
            // Releases the lock: the next generation serves from now on.
            drop(serving);
        }
        self.shared.tracker.close();
        if tokio::time::timeout(HANDOVER_DEADLINE, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("control socket: some clients were not answered before the handover");
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The accept task: takes the lock if needed, makes sure the path leads to the socket, and
/// accepts until stopped.
async fn run(
    socket: ControlSocket,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Option<Serving> {
    let ControlSocket {
        listener,
        lock,
        path,
        mode,
        registry,
        ..
    } = socket;
    let (listener, lock) = match lock {
        Some(lock) => (listener, Some(lock)),
        None => {
            let lock = tokio::select! {
                _ = stop.cancelled() => return None,
                lock = wait_for_lock(&path, mode) => lock,
            };
            let listener = match lock {
                Some(_) => rebind_if_gone(listener, &path, mode, &registry, &shared),
                None => listener,
            };
            if inherit::origin() == Origin::Systemd {
                answer_queued_restarts(&listener, &shared);
            }
            (listener, lock)
        }
    };
    // SAFETY: the listener owns its descriptor and keeps it open, unchanged, for as long as
    // the AsyncFd holds it (given back by `into_inner`).
    let listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("control socket: cannot serve it: {e}");
            return None;
        }
    };
    accept_loop(&listener, &shared, &stop).await;
    Some(Serving {
        listener: listener.into_inner(),
        _lock: lock,
    })
}

/// Waits until the previous generation lets go of the socket's lock (when it hands over, or
/// dies). `None` when the lock cannot be taken at all: this generation then serves without it.
async fn wait_for_lock(path: &Path, mode: u32) -> Option<PathLock> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match PathLock::try_take(path, mode) {
            Ok(Some(lock)) => return Some(lock),
            Ok(None) => {}
            Err(e) => {
                tracing::error!("control socket: {e}; serving it without the lock");
                return None;
            }
        }
        if !said && started.elapsed() > LOCK_PATIENCE {
            tracing::warn!(
                "control socket: still waiting for the previous generation to hand it over"
            );
            said = true;
        }
        tokio::time::sleep(LOCK_RETRY).await;
    }
}

/// A generation that inherited the socket, holding its lock: if the file at `path` is gone
/// (or a dead socket took its place), binds it again, serves the new socket and answers the
/// clients still queued on the old one; otherwise keeps the inherited one.
fn rebind_if_gone(
    inherited: UnixListener,
    path: &Path,
    mode: u32,
    registry: &crate::registry::Registry,
    shared: &Arc<Shared>,
) -> UnixListener {
    match socket_file::check_path(&inherited, path) {
        Ok(PathCheck::Keep) => inherited,
        Ok(PathCheck::Unreachable(why)) => {
            tracing::error!(
                path = %path.display(),
                "the control socket's path {why}: this generation cannot be reached there"
            );
            inherited
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "control socket: cannot check its path: {e}");
            inherited
        }
        Ok(PathCheck::Rebind) => match socket_file::bind_again(path, mode, registry) {
            Ok(fresh) => {
                tracing::warn!(path = %path.display(), "the control socket was gone: bound again");
                // Clients that reached the old socket before its file went away.
                for stream in accept_queued(&inherited) {
                    admit(stream, shared);
                }
                fresh
            }
            Err(e) => {
                tracing::error!(path = %path.display(), "the control socket is gone: {e}");
                inherited
            }
        },
    }
}

/// Accepts until `stop`, admitting each connection.
async fn accept_loop(
    listener: &AsyncFd<UnixListener>,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) {
    let mut reserve = Reserve::open();
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            ready = listener.readable() => match ready {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!("control socket: cannot wait for connections: {e}");
                    return;
                }
            },
        };
        match ready.try_io(|l| l.get_ref().accept()) {
            Err(_would_block) => {}
            Ok(Ok((stream, _))) => admit(stream, shared),
            Ok(Err(e)) if is_out_of_descriptors(&e) => {
                if !reserve.refuse_queued(listener.get_ref(), &e) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// In a generation systemd started after the previous one exited: the restart requests that
/// queued up while it started were satisfied by the restart that started it; anything else is
/// served as usual.
fn answer_queued_restarts(listener: &UnixListener, shared: &Arc<Shared>) {
    let restarted = RestartMessage::Response(RestartResponse::RestartComplete(std::process::id()));
    for stream in accept_queued(listener) {
        let Some((buf, closed)) = checked_and_read(&stream, &shared.access) else {
            continue;
        };
        match parse_request(&buf) {
            Frame::Request(RestartRequest::TryRestart) => answer_now(stream.as_fd(), &restarted),
            _ => serve_read(stream, buf, closed, shared),
        }
    }
}

/// A new connection: refused at once when its peer may not use the socket; served now when
/// its request is already here; otherwise one of the idle, reading its request.
fn admit(stream: UnixStream, shared: &Arc<Shared>) {
    if let Some((buf, closed)) = checked_and_read(&stream, &shared.access) {
        serve_read(stream, buf, closed, shared);
    }
}

/// Checks the peer of a new connection (refusing it at once) and reads what it sent so far:
/// the bytes, and whether it closed its end. `None` when there is nothing more to do.
fn checked_and_read(stream: &UnixStream, access: &Access) -> Option<(Vec<u8>, bool)> {
    if !allowed(stream, access) {
        answer_now(stream.as_fd(), &failed("permission denied"));
        return None;
    }
    let mut buf = Vec::new();
    let closed = read_now(stream.as_fd(), &mut buf).ok()?;
    Some((buf, closed))
}

/// Serves a connection whose first bytes, `buf`, were read.
fn serve_read(stream: UnixStream, buf: Vec<u8>, closed: bool, shared: &Arc<Shared>) {
    match parse_request(&buf) {
        Frame::Request(request) => spawn(shared, stream, |stream, shared| {
            serve_request(stream, request, shared)
        }),
        Frame::Invalid(why) => answer_now(stream.as_fd(), &invalid(&why)),
        Frame::Incomplete if closed && buf.is_empty() => {}
        Frame::Incomplete if closed => answer_now(stream.as_fd(), &invalid(CUT_SHORT)),
        Frame::Incomplete => {
            let slot = shared.idle.enter();
            spawn(shared, stream, |stream, shared| {
                read_then_serve(stream, buf, slot, shared)
            });
        }
    }
}

/// Runs `task` for `stream` (made a tokio stream) on the tracker.
fn spawn<F, Fut>(shared: &Arc<Shared>, stream: UnixStream, task: F)
where
    F: FnOnce(tokio::net::UnixStream, Arc<Shared>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("control socket: cannot serve a connection: {e}");
            return;
        }
    };
    shared.tracker.spawn(task(stream, shared.clone()));
}

/// Whether the peer of `stream` may use the socket (`SO_PEERCRED`).
fn allowed(stream: &UnixStream, access: &Access) -> bool {
    match getsockopt(&stream.as_fd(), sockopt::PeerCredentials) {
        Ok(cred) if access.allows(cred.uid()) => true,
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "control socket: refused a client of another user"
            );
            false
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read the peer's credentials: {e}");
            false
        }
    }
}

/// Why an idle connection stopped waiting for its request.
enum Interrupted {
    TimedOut,
    /// A newcomer needed its place.
    Evicted,
    HandedOver(Successor),
}

impl Interrupted {
    fn answer(&self) -> RestartMessage {
        match self {
            Interrupted::TimedOut => failed("no request received in time"),
            Interrupted::Evicted => {
                failed("too many idle control connections: this one was closed to make room")
            }
            Interrupted::HandedOver(successor) => successor.handed_over(),
        }
    }
}

/// An idle connection's task: reads the rest of its request within the deadline, unless it is
/// closed first to make room or this process hands over; then serves it.
async fn read_then_serve(
    mut stream: tokio::net::UnixStream,
    mut buf: Vec<u8>,
    slot: IdleSlot,
    shared: Arc<Shared>,
) {
    let mut handed_over = shared.handed_over.subscribe();
    let read = tokio::select! {
        read = read_request(&stream, &mut buf) => Ok(read),
        _ = tokio::time::sleep(REQUEST_DEADLINE) => Err(Interrupted::TimedOut),
        _ = slot.evicted.cancelled() => Err(Interrupted::Evicted),
        successor = until_handed_over(&mut handed_over) => Err(Interrupted::HandedOver(successor)),
    };
    drop(slot);
    let frame = match read {
        Ok(Ok(frame)) => frame,
        Ok(Err(_)) => return,
        Err(why) => {
            // A request that arrived meanwhile, not read yet, was sent in time.
            let _ = read_now(stream.as_fd(), &mut buf);
            match parse_request(&buf) {
                Frame::Incomplete => return answer(&mut stream, why.answer()).await,
                frame => frame,
            }
        }
    };
    match frame {
        Frame::Request(request) => serve_request(stream, request, shared).await,
        Frame::Invalid(why) => answer(&mut stream, invalid(&why)).await,
        // Closed before asking.
        Frame::Incomplete if buf.is_empty() => {}
        // Closed in the middle of its request: it may still read why.
        Frame::Incomplete => answer(&mut stream, invalid(CUT_SHORT)).await,
    }
}

/// Hands a whole request to the restart loop — a restart request with its connection, for the
/// loop to answer — unless this process hands over first.
async fn serve_request(
    mut stream: tokio::net::UnixStream,
    request: RestartRequest,
    shared: Arc<Shared>,
) {
    let mut handed_over = shared.handed_over.subscribe();
    let permit = tokio::select! {
        biased;
        successor = until_handed_over(&mut handed_over) => {
            return answer(&mut stream, successor.answer(&request)).await;
        }
        permit = shared.commands.reserve() => permit,
    };
    let Ok(permit) = permit else {
        return answer(&mut stream, failed("this process is shutting down")).await;
    };
    match request {
        RestartRequest::TryRestart => permit.send(Command::Restart(Initiator::Socket(
            RestartCoordinationSocket::new(stream),
        ))),
        RestartRequest::Status => {
            let (tx, rx) = oneshot::channel();
            permit.send(Command::Status(tx));
            let msg = tokio::select! {
                status = rx => match status {
                    Ok(status) => RestartMessage::Response(RestartResponse::Status(status)),
                    Err(_) => failed("this process is shutting down"),
                },
                successor = until_handed_over(&mut handed_over) => successor.answer(&request),
            };
            answer(&mut stream, msg).await;
        }
    }
}

/// Resolves once this process handed over.
async fn until_handed_over(rx: &mut watch::Receiver<Option<Successor>>) -> Successor {
    let successor = rx
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|s| s.clone());
    match successor {
        Some(successor) => successor,
        // The server is gone: never.
        None => std::future::pending().await,
    }
}

/// Answers the connections still queued on `listener` at the handover, each at once.
fn answer_queued(listener: &UnixListener, access: &Access, successor: &Successor) {
    for stream in accept_queued(listener) {
        let Some((buf, _)) = checked_and_read(&stream, access) else {
            continue;
        };
        let msg = match parse_request(&buf) {
            Frame::Request(request) => successor.answer(&request),
            Frame::Incomplete => successor.handed_over(),
            Frame::Invalid(why) => invalid(&why),
        };
        answer_now(stream.as_fd(), &msg);
    }
}

/// The connections queued on `listener` now, accepted without waiting (at most [`MAX_BATCH`]).
fn accept_queued(listener: &UnixListener) -> Vec<UnixStream> {
    std::iter::from_fn(|| listener.accept().ok().map(|(stream, _)| stream))
        .take(MAX_BATCH)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The idle connections

/// The connections that have not sent a whole request yet, oldest first.
#[derive(Default)]
struct Idle {
    queue: Mutex<VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

/// A place among the idle; given up when dropped.
struct IdleSlot {
    id: u64,
    /// Cancelled when a newcomer needed the place.
    evicted: CancellationToken,
    idle: Arc<Idle>,
}

impl Idle {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(u64, CancellationToken)>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place; when there are more than [`MAX_IDLE`], the oldest is told to leave.
    fn enter(self: &Arc<Self>) -> IdleSlot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        let mut queue = self.lock();
        queue.push_back((id, evicted.clone()));
        if queue.len() > MAX_IDLE {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.cancel();
            }
        }
        IdleSlot {
            id,
            evicted,
            idle: self.clone(),
        }
    }
}

impl Drop for IdleSlot {
    fn drop(&mut self) {
        let mut queue = self.idle.lock();
        if let Some(i) = queue.iter().position(|(id, _)| *id == self.id) {
            queue.remove(i);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The descriptor limit

/// A descriptor kept in reserve: at the descriptor limit it is closed to accept each queued
/// connection and tell its client why it cannot be served, then taken again.
struct Reserve(Option<File>);

impl Reserve {
    fn open() -> Reserve {
        Reserve(File::open("/dev/null").ok())
    }

    /// Answers each connection queued on `listener` that `limit` (EMFILE, ENFILE) keeps out:
    /// the reserve makes room for it. False when they could not all be answered.
    fn refuse_queued(&mut self, listener: &UnixListener, limit: &io::Error) -> bool {
        let why = format!(
            "the service is out of file descriptors ({limit}); it cannot serve this request now"
        );
        tracing::warn!("control socket: {why}");
        for _ in 0..MAX_BATCH {
            // Frees a descriptor for the next queued connection.
            if self.0.take().is_none() {
                *self = Reserve::open();
                return false;
            }
            let done = match listener.accept() {
                // Answered, and closed: its descriptor is the reserve's again.
                Ok((stream, _)) => {
                    answer_now(stream.as_fd(), &failed(&why));
                    None
                }
                Err(e) => Some(e.kind() == io::ErrorKind::WouldBlock),
            };
            *self = Reserve::open();
            if let Some(all_answered) = done {
                return all_answered;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a request, writing an answer

/// A request frame read so far.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// Not all of it yet.
    Incomplete,
    Request(RestartRequest),
    /// Not a request: why.
    Invalid(String),
}

/// Parses the frame at the start of `buf`: a 4-byte big-endian length and that much JSON.
fn parse_request(buf: &[u8]) -> Frame {
    let Some(header) = buf.first_chunk::<4>() else {
        return Frame::Incomplete;
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > MAX_REQUEST {
        return Frame::Invalid(format!(
            "a frame of {len} bytes; a request has at most {MAX_REQUEST}"
        ));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Frame::Incomplete;
    };
    match serde_json::from_slice(body) {
        Ok(RestartMessage::Request(request)) => Frame::Request(request),
        // Never echoed back: a client's bytes could make the refusal too large to send.
        Ok(RestartMessage::Response(_)) => Frame::Invalid("a response, not a request".into()),
        Err(e) => Frame::Invalid(format!("malformed message: {}", shortened(&e.to_string()))),
    }
}

/// At most 200 bytes of `text` (a parser's message can quote the client's bytes).
fn shortened(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match end < text.len() {
        true => format!("{}...", &text[..end]),
        false => text.to_owned(),
    }
}

/// Why a request that its client ended in the middle is refused.
const CUT_SHORT: &str = "the request ends before the length it announced";

fn invalid(why: &str) -> RestartMessage {
    failed(&format!("invalid request: {why}"))
}

/// One `recv` without waiting, appended to `buf`: the bytes read (0 at the end of the stream),
/// or `WouldBlock`.
fn recv_some(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 512];
    let want = (4 + MAX_REQUEST).saturating_sub(buf.len()).min(chunk.len());
    loop {
        match recv(fd.as_raw_fd(), &mut chunk[..want], MsgFlags::MSG_DONTWAIT) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads what the client sent so far, without waiting, until a whole frame is in: whether the
/// client closed its end.
fn read_now(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<bool> {
    while parse_request(buf) == Frame::Incomplete && buf.len() < 4 + MAX_REQUEST {
        match recv_some(fd, buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Reads until a whole frame is in; `Incomplete` when the client closed first.
async fn read_request(stream: &tokio::net::UnixStream, buf: &mut Vec<u8>) -> io::Result<Frame> {
    loop {
        let frame = parse_request(buf);
        if frame != Frame::Incomplete {
            return Ok(frame);
        }
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || recv_some(stream.as_fd(), buf)) {
            Ok(0) => return Ok(Frame::Incomplete),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `msg`, within [`IO_DEADLINE`].
async fn answer(stream: &mut tokio::net::UnixStream, msg: RestartMessage) {
    if let Some(frame) = encode(&msg) {
        let _ = tokio::time::timeout(IO_DEADLINE, stream.write_all(&frame)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    use super::*;
    use crate::control::socket_file::bind;
    use crate::control::{LifecycleKind, MAX_FRAME, Status};
    use crate::registry::Registry;

    /// The control socket of a fresh temporary directory, not served yet.
    fn control_socket() -> (
        tempfile::TempDir,
        PathBuf,
        mpsc::Receiver<Command>,
        ControlSocket,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let bound = bind(&path, 0o600).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let socket = ControlSocket {
            listener: bound.listener,
            lock: Some(bound.lock),
            path: path.clone(),
            mode: 0o600,
            registry: Registry::new(),
            commands: tx,
            access: Access {
                allowed_uids: vec![],
            },
        };
        (dir, path, rx, socket)
    }

    /// A served control socket: the directory, its path, what reaches the loop, the server.
    fn serve_pair() -> (
        tempfile::TempDir,
        PathBuf,
        mpsc::Receiver<Command>,
        ControlServer,
    ) {
        let (dir, path, rx, socket) = control_socket();
        (dir, path, rx, socket.serve())
    }

    fn status() -> Status {
        Status {
            pid: 1,
            generation: 0,
            lifecycle: LifecycleKind::ForkExec,
            ready: true,
            restart_in_progress: false,
            last_result: None,
            state_on_start: "none".into(),
            probation: None,
            last_attempt: None,
        }
    }

    /// Answers every status request the way the restart loop does.
    fn answer_status_requests(mut rx: mpsc::Receiver<Command>) {
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                if let Command::Status(tx) = cmd {
                    let _ = tx.send(status());
                }
            }
        });
    }

    fn is_failure(answer: &RestartMessage, containing: &str) -> bool {
        matches!(answer, RestartMessage::Response(RestartResponse::RestartFailed(why)) if why.contains(containing))
    }

    /// A client that sent `request` (framed) and waits for its answer.
    async fn sent(path: &Path, request: RestartRequest) -> RestartCoordinationSocket {
        let mut c = RestartCoordinationSocket::connect(path).await.unwrap();
        c.send_message(RestartMessage::Request(request))
            .await
            .unwrap();
        c
    }

    #[test]
    fn frames_parse_whole_or_not_at_all() {
        let whole = encode(&RestartMessage::Request(RestartRequest::Status)).unwrap();
        for cut in 0..whole.len() {
            assert_eq!(parse_request(&whole[..cut]), Frame::Incomplete, "{cut}");
        }
        assert_eq!(
            parse_request(&whole),
            Frame::Request(RestartRequest::Status)
        );
        let huge = (MAX_REQUEST as u32 + 1).to_be_bytes();
        assert!(matches!(parse_request(&huge), Frame::Invalid(_)));
        let answer = encode(&RestartMessage::Response(RestartResponse::RestartComplete(
            1,
        )))
        .unwrap();
        assert!(matches!(parse_request(&answer), Frame::Invalid(_)));
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_get_an_error_and_trigger_nothing() {
        let (_d, path, mut rx, server) = serve_pair();
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(&5u32.to_be_bytes()).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let answer = RestartCoordinationSocket::new(s)
            .receive_message()
            .await
            .unwrap();
        assert!(is_failure(&answer, "invalid request"), "{answer:?}");

        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let answer = RestartCoordinationSocket::new(s)
            .receive_message()
            .await
            .unwrap();
        assert!(is_failure(&answer, "invalid request"), "{answer:?}");
        assert!(rx.try_recv().is_err(), "nothing reached the restart loop");
        drop(server);
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_another() {
        let (_d, path, mut rx, server) = serve_pair();
        let _silent = UnixStream::connect(&path).await.unwrap();
        let mut c = sent(&path, RestartRequest::TryRestart).await;
        let Some(Command::Restart(initiator)) = rx.recv().await else {
            panic!("expected a restart")
        };
        initiator.respond(Ok(Some(7))).await;
        assert_eq!(
            c.receive_message().await.unwrap(),
            RestartMessage::Response(RestartResponse::RestartComplete(7))
        );
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_is_answered_under_hundreds_of_idle_and_trickling_connections() {
        let (_d, path, rx, server) = serve_pair();
        answer_status_requests(rx);
        let mut idle = Vec::new();
        for i in 0..300 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            if i % 3 == 0 {
                // A frame header, then nothing more: a trickle that stopped.
                let _ = s.write_all(&24u32.to_be_bytes()).await;
            }
            idle.push(s);
        }
        let mut operator = RestartCoordinationSocket::connect(&path).await.unwrap();
        let status =
            tokio::time::timeout(Duration::from_secs(10), operator.send_status_request()).await;
        assert!(matches!(status, Ok(Ok(_))), "{status:?}");
        // The oldest idle connections were closed to make room, with a word why.
        let answer = RestartCoordinationSocket::new(idle.remove(0))
            .receive_message()
            .await
            .unwrap();
        assert!(is_failure(&answer, "too many idle"), "{answer:?}");
        drop(server);
    }

    #[tokio::test]
    async fn the_handover_answers_what_is_queued_and_what_is_being_served() {
        let (_d, path, mut rx, server) = serve_pair();
        // Being served: connected without a request, and a status the loop does not answer.
        let idle = UnixStream::connect(&path).await.unwrap();
        let mut waiting = sent(&path, RestartRequest::Status).await;
        let Some(Command::Status(_pending)) = rx.recv().await else {
            panic!("expected a status request")
        };
        // Queued: the accept loop does not run before the handover (one thread, no await).
        let mut queued_restart = {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            std::io::Write::write_all(
                &mut s,
                &encode(&RestartMessage::Request(RestartRequest::TryRestart)).unwrap(),
            )
            .unwrap();
            s.set_nonblocking(true).unwrap();
            RestartCoordinationSocket::new(UnixStream::from_std(s).unwrap())
        };
        let queued_idle = std::os::unix::net::UnixStream::connect(&path).unwrap();
        queued_idle.set_nonblocking(true).unwrap();

        server.hand_over(Some(42), status()).await;

        assert_eq!(
            queued_restart.receive_message().await.unwrap(),
            RestartMessage::Response(RestartResponse::RestartComplete(42)),
            "a restart request sent before the handover was satisfied by that restart"
        );
        assert_eq!(
            waiting.receive_message().await.unwrap(),
            RestartMessage::Response(RestartResponse::Status(status())),
            "a status asked before the handover gets this process's status"
        );
        for late in [idle, UnixStream::from_std(queued_idle).unwrap()] {
            // They ask only now, after the process closed their connection.
            let err = RestartCoordinationSocket::new(late)
                .send_restart_command()
                .await
                .unwrap_err();
            assert!(
                matches!(&err, crate::control::ControlError::RestartFailed(why) if why.contains("handed over to PID 42")),
                "{err:?}"
            );
        }
        // The lock is free for the next generation.
        assert!(PathLock::try_take(&path, 0o600).unwrap().is_some());
    }

    #[tokio::test]
    async fn an_inherited_socket_whose_file_is_gone_is_bound_again() {
        let (_d, path, rx, socket) = control_socket();
        answer_status_requests(rx);
        // As a generation that inherited it: the lock is the previous generation's, until it
        // hands over.
        let previous = socket.lock;
        let socket = ControlSocket {
            lock: None,
            ..socket
        };
        let queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let server = socket.serve();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !path.exists(),
            "nothing is bound before the previous generation let go"
        );
        drop(previous);
        let mut c = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(c) = RestartCoordinationSocket::connect(&path).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("bound again");
        assert_eq!(c.send_status_request().await.unwrap(), status());
        // A client that reached the old socket before its file went away is served too.
        queued.set_nonblocking(true).unwrap();
        let answered = RestartCoordinationSocket::new(UnixStream::from_std(queued).unwrap())
            .send_status_request()
            .await
            .unwrap();
        assert_eq!(answered, status());
        drop(server);
    }
}
