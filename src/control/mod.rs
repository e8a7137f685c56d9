//! The control socket: its protocol, the server in the service, the client an operator uses.
//!
//! Frames are a 4-byte big-endian length followed by JSON, compatible with shellflip 2.x:
//! `{"Request":"TryRestart"}` is answered with `{"Response":{"RestartComplete":4242}}` or
//! `{"Response":{"RestartFailed":"why"}}`. `{"Request":"Status"}` is answered with
//! `{"Response":{"Status":{...}}}`.
//!
//! * `socket_file`: the socket's file — bound once under a lock, never over anything but a
//!   stale socket, bound again by a generation that finds it gone.
//! * `server`: the server — peer credentials checked at accept, a bounded number of idle
//!   connections, every connection answered, also across the handover to the next generation.
//! * here: the messages, the client, and what the server hands to the restart loop.

mod server;
mod socket_file;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::outcome::RestartError;

pub(crate) use server::ControlServer;
pub(crate) use socket_file::ControlSocket;

/// Largest frame the client reads (the server reads requests of a few kilobytes at most).
pub(crate) const MAX_FRAME: usize = 64 * 1024;
/// How long the server has to write an answer.
const IO_DEADLINE: Duration = Duration::from_secs(5);

/// Any message on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RestartMessage {
    /// From the client.
    Request(RestartRequest),
    /// From the service.
    Response(RestartResponse),
}

/// A request to the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RestartRequest {
    /// Restart now; answered once the outcome is known.
    TryRestart,
    /// Report the service's status.
    Status,
}

/// The service's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RestartResponse {
    /// The restart succeeded; the new process has this PID.
    RestartComplete(u32),
    /// The restart failed (or was refused); the reason.
    RestartFailed(String),
    /// The status asked for.
    Status(Status),
}

/// What a service reports about itself (`shellflip status`, [`RestartHandle::status`](crate::RestartHandle::status)).
///
/// Serialized as JSON on the control socket and by `shellflip status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// The PID of the process that answered.
    pub pid: u32,
    /// Its generation (0 when started fresh).
    pub generation: u64,
    /// Its lifecycle.
    pub lifecycle: LifecycleKind,
    /// Whether it declared itself ready.
    pub ready: bool,
    /// Whether a restart is running now.
    pub restart_in_progress: bool,
    /// The outcome of the last restart this process attempted, if any (a successful one ends
    /// the process, so only failures are seen here).
    pub last_result: Option<LastRestart>,
    /// What happened to the previous generation's state at start-up.
    pub state_on_start: String,
    /// A probation running now ([`RestartConfig::probation`](crate::RestartConfig::probation)).
    #[serde(default)]
    pub probation: Option<Probation>,
    /// The restart this process began last, with when it began (fork/exec lifecycle; `None`
    /// before the first, and from services older than this field). `shellflip await-restart`
    /// follows it to learn the outcome of a restart begun by a signal (`systemctl reload` of a
    /// `Type=notify-reload` unit).
    #[serde(default)]
    pub last_attempt: Option<Attempt>,
}

/// A probation that runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Probation {
    /// The new generation with this PID is on probation: this one serves again if it fails.
    Successor(u32),
    /// This generation is on probation: it restarts only once confirmed.
    This,
}

impl std::fmt::Display for Probation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probation::Successor(pid) => write!(f, "new process {pid}"),
            Probation::This => f.write_str("this process, until the previous one confirms it"),
        }
    }
}

/// A restart a process began, and how it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Attempt {
    /// When it began: `CLOCK_MONOTONIC` in microseconds, the clock systemd's `MONOTONIC_USEC=`
    /// uses.
    pub began_monotonic_usec: u64,
    /// How it stands.
    pub outcome: AttemptOutcome,
}

/// How a restart stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// Still running.
    InProgress,
    /// The successor took over (its PID, in the fork/exec lifecycle).
    HandedOver {
        /// The new generation's PID.
        pid: Option<u32>,
    },
    /// It failed, or was refused; the process kept serving.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Attempt {
    /// An attempt beginning now.
    pub(crate) fn begin() -> Attempt {
        let began_monotonic_usec = match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(sd_notify::NotifyState::MonotonicUsec(usec)) => usec.try_into().unwrap_or(0),
            _ => 0,
        };
        Attempt {
            began_monotonic_usec,
            outcome: AttemptOutcome::InProgress,
        }
    }
}

/// Which lifecycle a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LifecycleKind {
    /// The fork/exec handover ([`try_into_restart_task`](crate::RestartConfig::try_into_restart_task)).
    ForkExec,
    /// systemd's file descriptor store ([`try_into_systemd_restart_task`](crate::RestartConfig::try_into_systemd_restart_task)).
    Systemd,
}

impl std::fmt::Display for LifecycleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LifecycleKind::ForkExec => "fork-exec",
            LifecycleKind::Systemd => "systemd",
        })
    }
}

/// The outcome of the last restart a service attempted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
#[non_exhaustive]
pub enum LastRestart {
    /// It failed, or was refused; the service kept serving.
    Failed {
        /// How long it took, in milliseconds.
        elapsed_ms: u64,
        /// Why, as the initiator was told.
        reason: String,
    },
}

impl std::fmt::Display for LastRestart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LastRestart::Failed { elapsed_ms, reason } => write!(
                f,
                "failed after {:?}: {reason}",
                Duration::from_millis(*elapsed_ms)
            ),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pid: {}", self.pid)?;
        writeln!(f, "generation: {}", self.generation)?;
        writeln!(f, "lifecycle: {}", self.lifecycle)?;
        writeln!(f, "ready: {}", self.ready)?;
        writeln!(f, "restart in progress: {}", self.restart_in_progress)?;
        match &self.last_result {
            Some(last) => writeln!(f, "last restart: {last}")?,
            None => writeln!(f, "last restart: none")?,
        }
        match &self.probation {
            Some(p) => writeln!(f, "probation: {p}")?,
            None => writeln!(f, "probation: none")?,
        }
        write!(f, "state on start: {}", self.state_on_start)
    }
}

/// A control-socket conversation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Connecting, reading or writing failed.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// A message did not parse.
    #[error("control socket: malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The other side closed the connection before answering.
    #[error("control socket: the service closed the connection without an answer")]
    Closed,
    /// The restart failed; the service's reason.
    #[error("{0}")]
    RestartFailed(String),
    /// An answer that does not fit the request.
    #[error("control socket: unexpected answer {0}")]
    Unexpected(String),
    /// No answer in time.
    #[error("control socket: no answer within {0:?}")]
    Timeout(Duration),
}

/// One side of a control-socket conversation.
pub struct RestartCoordinationSocket {
    codec: Framed<UnixStream, LengthDelimitedCodec>,
}

impl std::fmt::Debug for RestartCoordinationSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartCoordinationSocket")
            .finish_non_exhaustive()
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

impl RestartCoordinationSocket {
    /// Wraps a connected socket.
    pub fn new(socket: UnixStream) -> Self {
        RestartCoordinationSocket {
            codec: Framed::new(socket, codec()),
        }
    }

    /// Connects to a service's control socket.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), shellflip::control::ControlError> {
    /// let mut socket = shellflip::control::RestartCoordinationSocket::connect("/run/my.sock").await?;
    /// let new_pid = socket.send_restart_command().await?;
    /// println!("restarted: {new_pid}");
    /// # Ok(()) }
    /// ```
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        Ok(Self::new(UnixStream::connect(path).await?))
    }

    /// Asks for a restart and waits for its outcome: the new PID, or why it failed.
    pub async fn send_restart_command(&mut self) -> Result<u32, ControlError> {
        match self.ask(RestartRequest::TryRestart).await? {
            RestartResponse::RestartComplete(pid) => Ok(pid),
            RestartResponse::RestartFailed(why) => Err(ControlError::RestartFailed(why)),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks for the service's status.
    pub async fn send_status_request(&mut self) -> Result<Status, ControlError> {
        match self.ask(RestartRequest::Status).await? {
            RestartResponse::Status(s) => Ok(s),
            RestartResponse::RestartFailed(why) => Err(ControlError::RestartFailed(why)),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends `request` and reads the answer. A service that answers and closes without reading
    /// (a refusal) makes the write fail with a broken pipe: its answer is read all the same.
    async fn ask(&mut self, request: RestartRequest) -> Result<RestartResponse, ControlError> {
        match self.send_message(RestartMessage::Request(request)).await {
            Ok(()) => {}
            Err(ControlError::Io(e)) if peer_closed(&e) => {
                return match self.receive_message().await {
                    Ok(RestartMessage::Response(answer)) => Ok(answer),
                    _ => Err(ControlError::Io(e)),
                };
            }
            Err(e) => return Err(e),
        }
        match self.receive_message().await? {
            RestartMessage::Response(answer) => Ok(answer),
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one message.
    pub(crate) async fn send_message(&mut self, msg: RestartMessage) -> Result<(), ControlError> {
        let bytes = serde_json::to_vec(&msg)?;
        self.codec
            .send(tokio_util::bytes::Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// Receives one message.
    pub(crate) async fn receive_message(&mut self) -> Result<RestartMessage, ControlError> {
        use futures_util::StreamExt;
        let frame = self.codec.next().await.ok_or(ControlError::Closed)??;
        Ok(serde_json::from_slice(&frame)?)
    }

    /// Gives back the socket (to keep it across a systemd restart).
    pub(crate) fn into_inner(self) -> UnixStream {
        self.codec.into_inner()
    }
}

/// The answer to a restart request: `Ok(None)` means "this process is exiting for systemd to
/// start the next one", answered with this PID.
fn response(outcome: Result<Option<u32>, RestartError>) -> RestartMessage {
    RestartMessage::Response(match outcome {
        Ok(pid) => RestartResponse::RestartComplete(pid.unwrap_or_else(std::process::id)),
        Err(why) => RestartResponse::RestartFailed(why.to_string()),
    })
}

/// The bytes of `msg` on the wire: length, then JSON.
fn encode(msg: &RestartMessage) -> Option<Vec<u8>> {
    let json = serde_json::to_vec(msg).ok()?;
    let mut frame = u32::try_from(json.len()).ok()?.to_be_bytes().to_vec();
    frame.extend_from_slice(&json);
    Some(frame)
}

/// Writes `msg` without waiting (a small answer on a connection nothing else was written to
/// always fits), for connections answered without a task.
fn answer_now(fd: BorrowedFd<'_>, msg: &RestartMessage) {
    use nix::sys::socket::{MsgFlags, send};
    if let Some(frame) = encode(msg) {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        if let Err(e) = send(fd.as_raw_fd(), &frame, flags) {
            tracing::debug!("control socket: cannot answer a client: {e}");
        }
    }
}

/// Whether a write failed because the other side closed its end.
fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// Whether the peer of `stream` closed its end (`POLLHUP`), seen without waiting. A client
/// that only shut down its writing side still waits for its answer, and is not gone.
fn hung_up(stream: &UnixStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Who asked for a restart, and how to tell them the outcome.
pub(crate) enum Initiator {
    /// The restart signal: nobody to answer.
    RestartSignal,
    /// SIGTERM in the systemd lifecycle (`systemctl restart` or `stop`): nobody to answer, and
    /// no way to refuse.
    Terminate,
    /// A client of the control socket.
    Socket(RestartCoordinationSocket),
    /// The application, through a [`RestartHandle`](crate::RestartHandle).
    Handle(oneshot::Sender<Result<Option<u32>, RestartError>>),
}

impl Initiator {
    /// Answers the initiator, within a deadline; an initiator that left is only logged.
    /// `Ok(None)` means "this process is exiting for systemd to start the next one".
    pub(crate) async fn respond(self, outcome: Result<Option<u32>, RestartError>) {
        match self {
            Initiator::RestartSignal | Initiator::Terminate => {}
            Initiator::Handle(tx) => {
                let _ = tx.send(outcome);
            }
            Initiator::Socket(mut socket) => {
                let msg = response(outcome);
                match tokio::time::timeout(IO_DEADLINE, socket.send_message(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("cannot answer the restart's initiator: {e}"),
                    Err(_) => tracing::warn!("the restart's initiator does not read its answer"),
                }
            }
        }
    }

    /// Answers at once, without waiting and without a task that could die with the process:
    /// the one small answer on a connection always fits in its buffer.
    pub(crate) fn respond_now(self, outcome: Result<Option<u32>, RestartError>) {
        match self {
            Initiator::RestartSignal | Initiator::Terminate => {}
            Initiator::Handle(tx) => {
                let _ = tx.send(outcome);
            }
            Initiator::Socket(socket) => {
                answer_now(socket.codec.get_ref().as_fd(), &response(outcome))
            }
        }
    }

    /// Whether whoever asked has gone away (closed its connection, dropped its handle): its
    /// restart is not carried out then. A signal never goes away.
    pub(crate) fn is_gone(&self) -> bool {
        match self {
            Initiator::RestartSignal | Initiator::Terminate => false,
            Initiator::Handle(tx) => tx.is_closed(),
            Initiator::Socket(socket) => hung_up(socket.codec.get_ref()),
        }
    }

    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Initiator::RestartSignal => "restart signal",
            Initiator::Terminate => "SIGTERM",
            Initiator::Socket(_) => "control socket",
            Initiator::Handle(_) => "restart handle",
        }
    }
}

/// What the server hands to the restart loop.
pub(crate) enum Command {
    Restart(Initiator),
    Status(oneshot::Sender<Status>),
}

/// What answers a restart request that was still waiting when a restart succeeded: that
/// restart's new PID (fork/exec), or "in progress" while systemd starts the next generation.
pub(crate) fn satisfied_by(new_pid: Option<u32>) -> Result<Option<u32>, RestartError> {
    match new_pid {
        Some(pid) => Ok(Some(pid)),
        None => Err(RestartError::InProgress),
    }
}

/// Access rules for the control socket.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    pub(crate) allowed_uids: Vec<u32>,
}

impl Access {
    fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == nix::unistd::geteuid().as_raw() || self.allowed_uids.contains(&uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_compatible_with_shellflip_2() {
        let req =
            serde_json::to_string(&RestartMessage::Request(RestartRequest::TryRestart)).unwrap();
        assert_eq!(req, r#"{"Request":"TryRestart"}"#);
        let ok = serde_json::to_string(&RestartMessage::Response(
            RestartResponse::RestartComplete(42),
        ))
        .unwrap();
        assert_eq!(ok, r#"{"Response":{"RestartComplete":42}}"#);
        let failed = serde_json::to_string(&RestartMessage::Response(
            RestartResponse::RestartFailed("x".into()),
        ))
        .unwrap();
        assert_eq!(failed, r#"{"Response":{"RestartFailed":"x"}}"#);
    }

    #[tokio::test]
    async fn frames_are_big_endian_length_prefixed() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut client = RestartCoordinationSocket::new(a);
        client
            .send_message(RestartMessage::Request(RestartRequest::TryRestart))
            .await
            .unwrap();
        let mut buf = vec![0u8; 4 + 24];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf[..4], &24u32.to_be_bytes());
        assert_eq!(&buf[4..], br#"{"Request":"TryRestart"}"#);
    }

    #[tokio::test]
    async fn a_client_reads_the_answer_written_before_the_server_closed() {
        for ask_status in [false, true] {
            let (a, b) = UnixStream::pair().unwrap();
            let mut server = RestartCoordinationSocket::new(b);
            server
                .send_message(RestartMessage::Response(RestartResponse::RestartFailed(
                    "permission denied".into(),
                )))
                .await
                .unwrap();
            drop(server);
            let mut client = RestartCoordinationSocket::new(a);
            let err = match ask_status {
                false => client.send_restart_command().await.map(drop).unwrap_err(),
                true => client.send_status_request().await.map(drop).unwrap_err(),
            };
            assert!(
                matches!(err, ControlError::RestartFailed(ref why) if why == "permission denied"),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_initiator_is_gone_once_its_client_closed_but_not_when_it_only_stopped_writing() {
        let (a, b) = UnixStream::pair().unwrap();
        let initiator = Initiator::Socket(RestartCoordinationSocket::new(b));
        assert!(!initiator.is_gone());
        let a = a.into_std().unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(!initiator.is_gone(), "a half-closed client still waits");
        drop(a);
        assert!(initiator.is_gone());

        let (tx, rx) = oneshot::channel();
        let initiator = Initiator::Handle(tx);
        assert!(!initiator.is_gone());
        drop(rx);
        assert!(initiator.is_gone());
        assert!(!Initiator::RestartSignal.is_gone());
    }
}
