//! The restart: its configuration, the one loop that owns it, the task the application polls,
//! and the handle the application can call.
//!
//! One loop owns every restart. A trigger (the restart signal, SIGTERM in the systemd
//! lifecycle, a control-socket request, or a [`RestartHandle`]) starts one; while it runs,
//! another request is answered "restart already in progress" at once, and status requests are
//! answered as usual. When a restart succeeds the loop stops accepting control connections,
//! answers the initiator and resolves the [`RestartTask`]: the application then stops accepting,
//! drains, and exits with [`Handover::exit_code`].

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::control::{
    self, Access, Command, ControlError, Initiator, RestartCoordinationSocket, Status,
};
use crate::inherit;
use crate::lifecycle::{LifecycleHandler, NullLifecycleHandler};
use crate::readiness;
use crate::registry::{Kind, Registry};
use crate::successor::{NotReady, Spawner};
use crate::systemd::{self, SystemdStore};

/// Name of the control socket's listener among the handed-over descriptors.
const CONTROL_FD: &str = "shellflip.control";

/// Settings for restarts. Build it with struct update syntax over `Default`:
///
/// ```
/// use shellflip::RestartConfig;
/// use std::time::Duration;
///
/// let config = RestartConfig {
///     enabled: true,
///     coordination_socket_path: "/run/my-service.sock".into(),
///     startup_timeout: Duration::from_secs(10),
///     ..Default::default()
/// };
/// ```
pub struct RestartConfig {
    /// Enables the control socket at [`coordination_socket_path`](Self::coordination_socket_path).
    pub enabled: bool,
    /// Where the control socket is bound (in the first generation; later ones inherit it).
    pub coordination_socket_path: PathBuf,
    /// Mode of the control socket file (default `0o600`).
    pub socket_mode: u32,
    /// Users besides this process's own and root allowed on the control socket.
    pub allowed_uids: Vec<u32>,
    /// Extra environment variables for the new process.
    pub environment: Vec<(OsString, OsString)>,
    /// Hooks and the state writer.
    pub lifecycle_handler: Box<dyn LifecycleHandler>,
    /// When true, a failed restart resolves the restart task with the error instead of
    /// carrying on (default false: the old process keeps serving).
    pub exit_on_error: bool,
    /// The signal that triggers a restart (default SIGUSR1).
    pub restart_signal: SignalKind,
    /// How long a new process has to become ready before it is killed (default 60 s).
    pub startup_timeout: Duration,
    /// The program to start; by default the path this process was started from, made absolute
    /// at start-up (so a binary replaced on disk is the one that starts).
    pub executable: Option<PathBuf>,
    /// The named descriptors that cross to the next generation.
    pub registry: Registry,
    /// Systemd lifecycle: the exit status of a restart asked for on the control socket or by the
    /// restart signal; list it in the unit's `RestartForceExitStatus=` (default 75).
    pub systemd_restart_exit_code: i32,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            enabled: false,
            coordination_socket_path: PathBuf::new(),
            socket_mode: 0o600,
            allowed_uids: Vec::new(),
            environment: Vec::new(),
            lifecycle_handler: Box::new(NullLifecycleHandler),
            exit_on_error: false,
            restart_signal: SignalKind::user_defined1(),
            startup_timeout: Duration::from_secs(60),
            executable: None,
            registry: Registry::new(),
            systemd_restart_exit_code: 75,
        }
    }
}

impl std::fmt::Debug for RestartConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartConfig")
            .field("enabled", &self.enabled)
            .field("coordination_socket_path", &self.coordination_socket_path)
            .field("startup_timeout", &self.startup_timeout)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Why a restart failed, or could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestartError {
    /// Another restart is running.
    #[error("restart already in progress")]
    InProgress,
    /// This process has not declared itself ready yet.
    #[error("this process is still starting; try again once it is ready")]
    NotReadyYet,
    /// The new process could not be started at all.
    #[error("cannot start the new process: {0}")]
    Spawn(#[source] io::Error),
    /// The new process exited before it was ready.
    #[error("new process {pid} {status} before it was ready")]
    Exited {
        /// Its PID.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// The new process reported that its start-up failed.
    #[error("new process {pid} failed to start: {reason} ({status})")]
    StartupFailed {
        /// Its PID.
        pid: u32,
        /// The reason it gave.
        reason: String,
        /// How it ended.
        status: String,
    },
    /// The new process was not ready in time; it was killed.
    #[error("new process {pid} not ready after {} s; it was killed", .after.as_secs_f64())]
    NotReady {
        /// Its PID.
        pid: u32,
        /// The start-up timeout.
        after: Duration,
    },
    /// Writing the state failed (the application's own error text); a new process that was
    /// started for it was killed.
    #[error("sending the state failed: {0}")]
    StateSend(String),
    /// The new executable rejected the state in its validation run (systemd lifecycle).
    #[error("the new executable rejected the state: {0}")]
    Rejected(String),
    /// The systemd lifecycle was asked for, but systemd is not listening (`NOTIFY_SOCKET`).
    #[error("not started by systemd: NOTIFY_SOCKET is not set")]
    NotUnderSystemd,
    /// No tokio runtime to run the restart loop on.
    #[error("the restart task must be created inside a tokio runtime")]
    NoRuntime,
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    ControlSocket {
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The program to start is unknown (no argv\[0\]) or the restart machinery failed.
    #[error("restart machinery: {0}")]
    Io(#[source] io::Error),
    /// The restart loop ended without an outcome.
    #[error("the restart loop is gone")]
    LoopGone,
    /// This process already handed over to a new generation: ask the new one.
    #[error("this process has handed over to a new generation; try again")]
    HandedOver,
}

impl RestartError {
    pub(crate) fn from_not_ready(pid: u32, why: NotReady) -> RestartError {
        match why {
            NotReady::Exited(status) => RestartError::Exited { pid, status },
            NotReady::Failed { reason, status } => RestartError::StartupFailed {
                pid,
                reason,
                status,
            },
            NotReady::Timeout(after) => RestartError::NotReady { pid, after },
        }
    }
}

/// A successful restart: what the old process does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Handover {
    /// The new process's PID (fork/exec); `None` in the systemd lifecycle, where systemd starts
    /// it once this process has exited.
    pub new_pid: Option<u32>,
    /// The status to exit with once drained: 0, or (systemd lifecycle, restart asked for on the
    /// control socket or by signal) [`RestartConfig::systemd_restart_exit_code`].
    pub exit_code: i32,
}

impl Handover {
    /// The status to exit with once drained.
    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }
}

/// Which lifecycle the loop runs.
enum Lifecycle {
    ForkExec,
    Systemd(SystemdStore),
    /// A validation run: it only declares readiness (which exits the process).
    Validation,
}

/// What a restart needs, owned by the loop.
pub(crate) struct Context {
    pub(crate) config: RestartConfig,
    pub(crate) handler: Box<dyn LifecycleHandler>,
    pub(crate) spawner: Spawner,
    pub(crate) program: PathBuf,
}

/// The task that resolves when a restart succeeded (or restarts became impossible).
///
/// Poll it alongside your accept loop. The first poll declares this process ready (see
/// [`startup_complete`](crate::startup_complete)); read the previous generation's state before.
#[must_use = "the restart task declares readiness when polled, and resolves on a restart"]
pub struct RestartTask {
    outcome: oneshot::Receiver<Result<Handover, RestartError>>,
    handle: RestartHandle,
    declared_ready: bool,
}

impl std::fmt::Debug for RestartTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartTask").finish_non_exhaustive()
    }
}

impl RestartTask {
    /// A handle to ask for a restart or the status from inside the application.
    pub fn handle(&self) -> RestartHandle {
        self.handle.clone()
    }
}

impl Future for RestartTask {
    type Output = Result<Handover, RestartError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        if !self.declared_ready {
            self.declared_ready = true;
            if let Err(e) = readiness::startup_complete() {
                tracing::error!("cannot tell the parent generation that this one is ready: {e}");
            }
        }
        Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(RestartError::LoopGone)))
    }
}

/// Asks the running process's restart loop for a restart or its status, from inside the
/// application (an admin endpoint, a configuration watcher). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RestartHandle {
    commands: mpsc::Sender<Command>,
}

impl RestartHandle {
    /// Restarts, and waits for the outcome: the new PID (fork/exec) or `None` (systemd, where
    /// this process is about to exit for systemd to start the next one).
    pub async fn restart(&self) -> Result<Option<u32>, RestartError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Restart(Initiator::Handle(tx)))
            .await
            .map_err(|_| RestartError::LoopGone)?;
        rx.await.unwrap_or(Err(RestartError::LoopGone))
    }

    /// The status, as the control socket reports it.
    pub async fn status(&self) -> Result<Status, RestartError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Status(tx))
            .await
            .map_err(|_| RestartError::LoopGone)?;
        rx.await.map_err(|_| RestartError::LoopGone)
    }
}

impl RestartConfig {
    /// Sets up the fork/exec lifecycle: the restart loop, the control socket, the restart
    /// signal. Call it inside a tokio runtime, after the listeners were registered.
    pub fn try_into_restart_task(self) -> Result<RestartTask, RestartError> {
        let lifecycle = if inherit::is_validation_run() {
            Lifecycle::Validation
        } else {
            Lifecycle::ForkExec
        };
        start(self, lifecycle)
    }

    /// Sets up the systemd lifecycle: listeners and state in systemd's file descriptor store,
    /// restarts by SIGTERM (`systemctl restart`), the restart signal or the control socket.
    /// Read the previous state ([`receive_from_old_process`](crate::receive_from_old_process))
    /// before calling it.
    pub fn try_into_systemd_restart_task(self) -> Result<RestartTask, RestartError> {
        let lifecycle = if inherit::is_validation_run() {
            Lifecycle::Validation
        } else {
            Lifecycle::Systemd(SystemdStore::start(&self.registry)?)
        };
        start(self, lifecycle)
    }

    /// Asks the service listening on [`coordination_socket_path`](Self::coordination_socket_path)
    /// to restart, and returns the new PID.
    pub async fn request_restart(self) -> Result<u32, ControlError> {
        RestartCoordinationSocket::connect(&self.coordination_socket_path)
            .await?
            .send_restart_command()
            .await
    }

    /// [`request_restart`](Self::request_restart) for code without a tokio runtime.
    pub fn request_restart_sync(self) -> Result<u32, ControlError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(self.request_restart())
    }
}

/// The signals that trigger a restart.
struct Signals {
    restart: Signal,
    terminate: Option<Signal>,
}

impl Signals {
    async fn recv(&mut self) -> Initiator {
        let term = async {
            match &mut self.terminate {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.restart.recv() => Initiator::RestartSignal,
            _ = term => Initiator::Terminate,
        }
    }
}

fn start(mut config: RestartConfig, lifecycle: Lifecycle) -> Result<RestartTask, RestartError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(RestartError::NoRuntime);
    }
    let program = match config.executable.clone() {
        Some(p) => p,
        None => inherit::inherited()
            .as_ref()
            .ok()
            .and_then(|i| i.executable.clone())
            .ok_or_else(|| {
                RestartError::Io(io::Error::other("cannot tell which program this is"))
            })?,
    };
    let signals = Signals {
        restart: signal(config.restart_signal).map_err(RestartError::Io)?,
        terminate: match lifecycle {
            Lifecycle::Systemd(_) => {
                Some(signal(SignalKind::terminate()).map_err(RestartError::Io)?)
            }
            _ => None,
        },
    };
    let (commands_tx, commands) = mpsc::channel(16);
    let mut control = None;
    if config.enabled {
        let listener = control_listener(&config)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|source| {
            RestartError::ControlSocket {
                path: config.coordination_socket_path.clone(),
                source,
            }
        })?;
        let access = Access {
            allowed_uids: config.allowed_uids.clone(),
        };
        control = Some(ControlServer {
            listener,
            commands: commands_tx.clone(),
            access,
        });
    }
    let handler = std::mem::replace(
        &mut config.lifecycle_handler,
        Box::new(NullLifecycleHandler),
    );
    let ctx = Context {
        config,
        handler,
        spawner: Spawner::start().map_err(RestartError::Io)?,
        program,
    };
    let (outcome_tx, outcome) = oneshot::channel();
    tokio::spawn(run(ctx, lifecycle, commands, signals, control, outcome_tx));
    Ok(RestartTask {
        outcome,
        handle: RestartHandle {
            commands: commands_tx,
        },
        declared_ready: false,
    })
}

/// The control socket's listener: inherited, or bound now; registered for the next generation.
fn control_listener(
    config: &RestartConfig,
) -> Result<std::os::unix::net::UnixListener, RestartError> {
    let path = &config.coordination_socket_path;
    let err = |source: io::Error| RestartError::ControlSocket {
        path: path.clone(),
        source,
    };
    let fd = match Registry::adopt_internal(CONTROL_FD).map_err(|e| err(io::Error::other(e)))? {
        Some(fd)
            if crate::registry::classify(std::os::fd::AsFd::as_fd(&fd)) == Kind::UnixListener =>
        {
            fd
        }
        Some(_) => {
            return Err(err(io::Error::other(
                "the inherited control socket is not a listening Unix socket",
            )));
        }
        None => control::bind(path, config.socket_mode).map_err(err)?.into(),
    };
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(err)?;
    let keep = listener.try_clone().map_err(err)?;
    config
        .registry
        .insert_internal(CONTROL_FD, keep.into(), Some(path.clone()))
        .map_err(|e| err(io::Error::other(e)))?;
    Ok(listener)
}

/// What the loop remembers for the status report.
struct Record {
    lifecycle: &'static str,
    in_progress: bool,
    last_result: Option<String>,
}

impl Record {
    fn status(&self) -> Status {
        Status {
            pid: std::process::id(),
            generation: inherit::generation(),
            lifecycle: self.lifecycle.into(),
            ready: readiness::is_ready(),
            restart_in_progress: self.in_progress,
            last_result: self.last_result.clone(),
            state_on_start: crate::lifecycle::state_on_start(),
        }
    }
}

/// The control socket, served once this process is ready: until then the generation that
/// started it (which shares the listening socket) answers.
struct ControlServer {
    listener: tokio::net::UnixListener,
    commands: mpsc::Sender<Command>,
    access: Access,
}

async fn run(
    mut ctx: Context,
    mut lifecycle: Lifecycle,
    mut commands: mpsc::Receiver<Command>,
    mut signals: Signals,
    control: Option<ControlServer>,
    outcome: oneshot::Sender<Result<Handover, RestartError>>,
) {
    let mut record = Record {
        lifecycle: match lifecycle {
            Lifecycle::Systemd(_) => "systemd",
            _ => "fork-exec",
        },
        in_progress: false,
        last_result: None,
    };
    // A restart to run before waiting for the next trigger.
    let mut pending: Option<Initiator> = None;
    // Until ready: answer status, refuse restarts.
    loop {
        tokio::select! {
            biased;
            _ = readiness::ready() => break,
            Some(cmd) = commands.recv() => match cmd {
                Command::Status(tx) => { let _ = tx.send(record.status()); }
                // Ready in the meantime: this request is the first restart.
                Command::Restart(initiator) if readiness::is_ready() => {
                    pending = Some(initiator);
                    break;
                }
                Command::Restart(initiator) => initiator.respond(Err(RestartError::NotReadyYet)).await,
            },
        }
    }
    let stop_control = CancellationToken::new();
    if let Some(c) = control {
        tokio::spawn(control::serve(
            c.listener,
            c.commands,
            c.access,
            stop_control.clone(),
        ));
    }
    let unclaimed = inherit::inherited()
        .as_ref()
        .map(|i| i.names())
        .unwrap_or_default();
    match &lifecycle {
        Lifecycle::Systemd(store) => store.after_ready(unclaimed).await,
        _ => {
            for name in unclaimed {
                tracing::info!(
                    name,
                    "closing an inherited descriptor this generation did not take"
                );
                let _ = Registry::adopt_internal(&name);
            }
        }
    }
    loop {
        let initiator = if let Some(initiator) = pending.take() {
            initiator
        } else {
            tokio::select! {
                Some(cmd) = commands.recv() => match cmd {
                    Command::Status(tx) => { let _ = tx.send(record.status()); continue; }
                    Command::Restart(initiator) => initiator,
                },
                initiator = signals.recv() => initiator,
            }
        };
        let trigger = initiator.describe();
        let refusable = !matches!(initiator, Initiator::Terminate);
        tracing::info!(trigger, "restart requested");
        record.in_progress = true;
        let started = Instant::now();
        let result = {
            let restart = async {
                match &mut lifecycle {
                    Lifecycle::ForkExec => crate::handover::restart(&mut ctx).await,
                    Lifecycle::Systemd(store) => store.restart(&mut ctx, refusable).await,
                    Lifecycle::Validation => Err(RestartError::NotReadyYet),
                }
            };
            tokio::pin!(restart);
            loop {
                tokio::select! {
                    r = &mut restart => break r,
                    Some(cmd) = commands.recv() => match cmd {
                        Command::Status(tx) => { let _ = tx.send(record.status()); }
                        Command::Restart(other) => other.respond(Err(RestartError::InProgress)).await,
                    },
                    other = signals.recv() => {
                        // systemd is stopping us: stop once this restart is over, if it failed.
                        tracing::warn!("{}: a restart is already in progress", other.describe());
                        if matches!(other, Initiator::Terminate) {
                            pending = Some(other);
                        }
                    }
                }
            }
        };
        record.in_progress = false;
        let elapsed = started.elapsed();
        match result {
            Ok(handover) => {
                tracing::info!(?elapsed, new_pid = ?handover.new_pid, "restart succeeded; draining");
                stop_control.cancel();
                match (initiator, handover.new_pid) {
                    (Initiator::Socket(socket), None) => systemd::store_initiator(socket),
                    (initiator, pid) => initiator.respond(Ok(pid)).await,
                }
                let _ = outcome.send(Ok(handover));
                // Requests that arrive now: this process has handed over.
                commands.close();
                while let Some(cmd) = commands.recv().await {
                    if let Command::Restart(i) = cmd {
                        i.respond(Err(RestartError::HandedOver)).await;
                    }
                }
                return;
            }
            Err(e) => {
                tracing::error!(?elapsed, "restart failed: {e}");
                record.last_result = Some(format!("failed after {elapsed:?}: {e}"));
                if ctx.config.exit_on_error {
                    initiator
                        .respond(Err(RestartError::Io(io::Error::other(e.to_string()))))
                        .await;
                    let _ = outcome.send(Err(e));
                    return;
                }
                initiator.respond(Err(e)).await;
            }
        }
    }
}
