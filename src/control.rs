//! The control socket: its protocol, the server in the service, the client an operator uses.
//!
//! Frames are a 4-byte big-endian length followed by JSON, compatible with shellflip 2.x:
//! `{"Request":"TryRestart"}` is answered with `{"Response":{"RestartComplete":4242}}` or
//! `{"Response":{"RestartFailed":"why"}}`. `{"Request":"Status"}` is answered with
//! `{"Response":{"Status":{...}}}`.
//!
//! The server checks the peer's credentials, reads one request per connection within a deadline,
//! caps frame sizes and the number of connections, and never lets a slow or hostile client hold
//! up another client or a restart.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::config::RestartConfig;
use crate::inherit::{self, CONTROL_FD};
use crate::outcome::{RestartError, SetupError};
use crate::registry::{Kind, classify};

/// Largest frame accepted, either way.
pub(crate) const MAX_FRAME: usize = 64 * 1024;
/// How long a client has to send its request, and the server to write an answer.
const IO_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are told to come back later.
const MAX_CONNECTIONS: usize = 64;

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
    /// The restart this process began last, with when it began (fork/exec lifecycle; `None`
    /// before the first, and from services older than this field). `shellflip await-restart`
    /// follows it to learn the outcome of a restart begun by a signal (`systemctl reload` of a
    /// `Type=notify-reload` unit).
    #[serde(default)]
    pub last_attempt: Option<Attempt>,
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
        self.send_message(RestartMessage::Request(RestartRequest::TryRestart))
            .await?;
        match self.receive_message().await? {
            RestartMessage::Response(RestartResponse::RestartComplete(pid)) => Ok(pid),
            RestartMessage::Response(RestartResponse::RestartFailed(why)) => {
                Err(ControlError::RestartFailed(why))
            }
            other => Err(ControlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks for the service's status.
    pub async fn send_status_request(&mut self) -> Result<Status, ControlError> {
        self.send_message(RestartMessage::Request(RestartRequest::Status))
            .await?;
        match self.receive_message().await? {
            RestartMessage::Response(RestartResponse::Status(s)) => Ok(s),
            RestartMessage::Response(RestartResponse::RestartFailed(why)) => {
                Err(ControlError::RestartFailed(why))
            }
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

    /// [`respond`](Self::respond) from synchronous code (any thread): the answer is written
    /// before this returns, within the deadline.
    pub(crate) fn respond_now(self, outcome: Result<Option<u32>, RestartError>) {
        match self {
            Initiator::RestartSignal | Initiator::Terminate => {}
            Initiator::Handle(tx) => {
                let _ = tx.send(outcome);
            }
            Initiator::Socket(socket) => {
                if let Err(e) = write_now(socket, response(outcome)) {
                    tracing::warn!("cannot answer the restart's initiator: {e}");
                }
            }
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

/// The answer to a restart request.
fn response(outcome: Result<Option<u32>, RestartError>) -> RestartMessage {
    RestartMessage::Response(match outcome {
        Ok(pid) => RestartResponse::RestartComplete(pid.unwrap_or_else(std::process::id)),
        Err(why) => RestartResponse::RestartFailed(why.to_string()),
    })
}

/// Writes one frame with a blocking write, within [`IO_DEADLINE`].
fn write_now(socket: RestartCoordinationSocket, msg: RestartMessage) -> io::Result<()> {
    use std::io::Write;
    let json = serde_json::to_vec(&msg)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(&json);
    let mut stream = socket.into_inner().into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_DEADLINE))?;
    stream.write_all(&frame)
}

/// What the server hands to the restart loop.
pub(crate) enum Command {
    Restart(Initiator),
    Status(oneshot::Sender<Status>),
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

/// Binds the control socket at `path` with `mode`: bound under a temporary name, given its
/// mode, then renamed over `path`, so that it never exists with looser permissions. A socket
/// file that something still listens on is not replaced.
pub(crate) fn bind(path: &Path, mode: u32) -> io::Result<std::os::unix::net::UnixListener> {
    crate::registry::remove_stale_socket(path)?;
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "control socket path has no file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let result = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The control socket's listener: inherited from the previous generation, or bound now; either
/// way registered, so that the next generation inherits it.
pub(crate) fn listener(config: &RestartConfig) -> Result<tokio::net::UnixListener, SetupError> {
    let path = &config.coordination_socket_path;
    let err = |source: io::Error| SetupError::ControlSocket {
        path: path.clone(),
        source,
    };
    let fd = match inherit::take(CONTROL_FD).map_err(|e| err(io::Error::other(e)))? {
        Some(fd) if classify(std::os::fd::AsFd::as_fd(&fd)) == Kind::UnixListener => fd,
        Some(_) => {
            return Err(err(io::Error::other(
                "the inherited control socket is not a listening Unix socket",
            )));
        }
        None => bind(path, config.socket_mode).map_err(err)?.into(),
    };
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(err)?;
    let keep = listener.try_clone().map_err(err)?;
    config
        .registry
        .insert_internal(CONTROL_FD, keep.into(), Some(path.clone()))
        .map_err(|e| err(io::Error::other(e)))?;
    tokio::net::UnixListener::from_std(listener).map_err(err)
}

/// Accepts control connections until `stop` is cancelled; each in its own task.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    commands: mpsc::Sender<Command>,
    access: Access,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            conn = listener.accept() => conn,
        };
        let stream = match conn {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                // Out of descriptors and the like: give the system a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut socket = RestartCoordinationSocket::new(stream);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                refuse(&mut socket, "too many control connections; try again").await;
            });
            continue;
        };
        let commands = commands.clone();
        let access = access.clone();
        tokio::spawn(async move {
            handle(socket, commands, access).await;
            drop(permit);
        });
    }
}

async fn refuse(socket: &mut RestartCoordinationSocket, why: &str) {
    let msg = RestartMessage::Response(RestartResponse::RestartFailed(why.into()));
    let _ = tokio::time::timeout(IO_DEADLINE, socket.send_message(msg)).await;
}

async fn handle(
    mut socket: RestartCoordinationSocket,
    commands: mpsc::Sender<Command>,
    access: Access,
) {
    match socket.codec.get_ref().peer_cred() {
        Ok(cred) if access.allows(cred.uid()) => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "control socket: refused a client of another user"
            );
            refuse(&mut socket, "permission denied").await;
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read the peer's credentials: {e}");
            return;
        }
    }
    let request = match tokio::time::timeout(IO_DEADLINE, socket.receive_message()).await {
        Err(_) => {
            refuse(&mut socket, "no request received in time").await;
            return;
        }
        Ok(Err(ControlError::Closed)) => return,
        Ok(Err(e)) => {
            tracing::warn!("{e}");
            refuse(&mut socket, &format!("invalid request: {e}")).await;
            return;
        }
        Ok(Ok(RestartMessage::Request(r))) => r,
        Ok(Ok(other)) => {
            refuse(&mut socket, &format!("invalid request: {other:?}")).await;
            return;
        }
    };
    match request {
        RestartRequest::TryRestart => {
            if let Err(mpsc::error::SendError(Command::Restart(initiator))) = commands
                .send(Command::Restart(Initiator::Socket(socket)))
                .await
            {
                initiator.respond(Err(RestartError::HandedOver)).await;
            }
        }
        RestartRequest::Status => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status(tx)).await.is_err() {
                refuse(&mut socket, "this process is shutting down").await;
                return;
            }
            let msg = match rx.await {
                Ok(status) => RestartMessage::Response(RestartResponse::Status(status)),
                Err(_) => RestartMessage::Response(RestartResponse::RestartFailed(
                    "this process is shutting down".into(),
                )),
            };
            let _ = tokio::time::timeout(IO_DEADLINE, socket.send_message(msg)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

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

    async fn serve_pair() -> (
        tempfile::TempDir,
        PathBuf,
        mpsc::Receiver<Command>,
        CancellationToken,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let l = tokio::net::UnixListener::from_std(bind(&path, 0o600).unwrap()).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            l,
            tx,
            Access {
                allowed_uids: vec![],
            },
            stop.clone(),
        ));
        (dir, path, rx, stop)
    }

    #[tokio::test]
    async fn socket_mode_is_0600() {
        let (_d, path, _rx, stop) = serve_pair().await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        stop.cancel();
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_get_an_error_and_trigger_nothing() {
        let (_d, path, mut rx, stop) = serve_pair().await;
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(&5u32.to_be_bytes()).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut c = RestartCoordinationSocket::new(s);
        let answer = c.receive_message().await.unwrap();
        assert!(
            matches!(answer, RestartMessage::Response(RestartResponse::RestartFailed(ref w)) if w.contains("invalid request")),
            "{answer:?}"
        );

        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let mut c = RestartCoordinationSocket::new(s);
        let answer = c.receive_message().await.unwrap();
        assert!(matches!(
            answer,
            RestartMessage::Response(RestartResponse::RestartFailed(_))
        ));
        assert!(rx.try_recv().is_err(), "nothing reached the restart loop");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_another() {
        let (_d, path, mut rx, stop) = serve_pair().await;
        let _silent = UnixStream::connect(&path).await.unwrap();
        let mut c = RestartCoordinationSocket::connect(&path).await.unwrap();
        c.send_message(RestartMessage::Request(RestartRequest::TryRestart))
            .await
            .unwrap();
        let cmd = rx.recv().await.unwrap();
        let Command::Restart(initiator) = cmd else {
            panic!("expected a restart")
        };
        initiator.respond(Ok(Some(7))).await;
        assert_eq!(
            c.receive_message().await.unwrap(),
            RestartMessage::Response(RestartResponse::RestartComplete(7))
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_live_socket_file_is_not_replaced() {
        let (_d, path, _rx, stop) = serve_pair().await;
        let err = bind(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        stop.cancel();
    }
}
