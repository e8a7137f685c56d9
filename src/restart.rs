//! The restart loop: the one owner of every restart, the task the application polls, and the
//! handle the application can call.
//!
//! One loop owns every restart. A trigger (the restart signal, SIGTERM in the systemd
//! lifecycle, a control-socket request, or a [`RestartHandle`]) starts one; while it runs,
//! another request is answered "restart already in progress" at once, and status requests are
//! answered as usual. When a restart succeeds the loop answers the initiator, hands the control
//! socket over (every request still waiting is answered) and resolves the [`RestartTask`]: the
//! application then stops accepting, drains, and exits with [`Handover::exit_code`].
//!
//! The loop never names a lifecycle: it asks its [`Transport`] for the steps that differ.
//!
//! ```text
//! wait until ready ──> serve the control socket ──> release what was not taken
//!     ──> (next request ──> one restart, answering others "in progress")* ──> finish
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::RestartConfig;
use crate::control::{
    self, Command, ControlError, ControlServer, ControlSocket, Initiator, LastRestart, Probation,
    RestartCoordinationSocket, Status,
};
use crate::fork_exec::ForkExec;
use crate::inherit;
use crate::lifecycle::NullLifecycleHandler;
use crate::outcome::{Handover, Link, RestartError, SetupError};
use crate::readiness;
use crate::successor::Spawner;
use crate::systemd::Systemd;
use crate::transport::{Context, Transport, Trigger};

/// The task that resolves when a restart succeeded (or restarts became impossible).
///
/// Poll it alongside your accept loop. The first poll declares this process ready (see
/// [`startup_complete`](crate::startup_complete)); read the previous generation's state before.
/// After a rollback ([`Handover::confirmed`] returned an error) keep polling it: it resolves
/// again on the next restart.
#[must_use = "the restart task declares readiness when polled, and resolves on a restart"]
pub struct RestartTask {
    outcome: mpsc::Receiver<Result<Handover, RestartError>>,
    handle: RestartHandle,
    declared_ready: bool,
    /// Whether SIGTERM is the library's (a restart, in the systemd lifecycle).
    sigterm_is_a_restart: bool,
}

/// What ends this generation's service: see [`RestartTask::restart_or_terminate`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Stop {
    /// A restart: a new generation serves (or, in the systemd lifecycle, is about to).
    Restart(Handover),
    /// SIGTERM (fork/exec lifecycle): the service stops for good.
    Terminate,
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

    /// Resolves on a restart or on SIGTERM, whichever comes first: in both cases the
    /// application stops accepting and drains. This is the future to give a framework's
    /// graceful shutdown (axum's `with_graceful_shutdown`, tonic's
    /// `serve_with_incoming_shutdown`). Like polling the task, it declares readiness.
    ///
    /// In the systemd lifecycle SIGTERM is systemd's restart (or stop), which the library
    /// handles: it resolves as [`Stop::Restart`] once the state is written.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(mut restart: shellflip::RestartTask) -> Result<(), shellflip::RestartError> {
    /// match restart.restart_or_terminate().await? {
    ///     shellflip::Stop::Restart(handover) => { /* stop accepting, drain, exit with handover.exit_code() */ }
    ///     shellflip::Stop::Terminate => { /* stop accepting, drain, exit 0 */ }
    ///     _ => {}
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn restart_or_terminate(&mut self) -> Result<Stop, RestartError> {
        let mut terminate = match self.sigterm_is_a_restart {
            true => None,
            false => Some(
                signal(SignalKind::terminate())
                    .map_err(|e| RestartError::os("installing a SIGTERM handler", e))?,
            ),
        };
        let term = async {
            match &mut terminate {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            outcome = self => outcome.map(Stop::Restart),
            _ = term => Ok(Stop::Terminate),
        }
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
        self.outcome
            .poll_recv(cx)
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
    ///
    /// In a validation run ([`is_validation_run`](crate::is_validation_run)) either call sets up
    /// this lifecycle: such a run exits when it declares itself ready, before any restart.
    pub fn try_into_restart_task(self) -> Result<RestartTask, SetupError> {
        start(self, |_, spawner| Ok(ForkExec::new(spawner)))
    }

    /// Sets up the systemd lifecycle: listeners and state in systemd's file descriptor store,
    /// restarts by SIGTERM (`systemctl restart`), the restart signal or the control socket.
    /// Read the previous state ([`receive_from_old_process`](crate::receive_from_old_process))
    /// before calling it.
    pub fn try_into_systemd_restart_task(self) -> Result<RestartTask, SetupError> {
        if inherit::is_validation_run() {
            return self.try_into_restart_task();
        }
        start(self, |config, spawner| {
            Systemd::start(&config.registry, spawner)
        })
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

/// Sets up the loop over the transport `make` builds, and starts it.
fn start<T: Transport>(
    mut config: RestartConfig,
    make: impl FnOnce(&RestartConfig, Spawner) -> Result<T, SetupError>,
) -> Result<RestartTask, SetupError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(SetupError::NoRuntime);
    }
    let program = config
        .executable
        .clone()
        .or_else(inherit::executable)
        .ok_or(SetupError::UnknownExecutable)?;
    let os = |what| move |source| SetupError::Os { what, source };
    let spawner = Spawner::start(program, config.environment.clone(), config.registry.clone())
        .map_err(os("starting the spawner thread"))?;
    let transport = make(&config, spawner)?;
    let (commands_tx, commands) = mpsc::channel(16);
    forward_signals::<T>(&config, commands_tx.clone())?;
    let control = match config.enabled {
        true => Some(ControlSocket::open(&config, commands_tx.clone())?),
        false => None,
    };
    let handler = std::mem::replace(
        &mut config.lifecycle_handler,
        Box::new(NullLifecycleHandler),
    );
    let restart_loop = Loop {
        ctx: Context { config, handler },
        transport,
        commands,
        ready: readiness::subscribe(),
        control,
        record: Record::new(T::KIND),
    };
    let (outcome_tx, outcome) = mpsc::channel(1);
    tokio::spawn(restart_loop.run(outcome_tx));
    warn_if_never_ready();
    Ok(RestartTask {
        outcome,
        handle: RestartHandle {
            commands: commands_tx,
        },
        declared_ready: false,
        sigterm_is_a_restart: T::RESTARTS_ON_SIGTERM,
    })
}

/// How long after the restart task was created a generation that has not declared itself ready
/// is warned about.
const READY_WARNING: Duration = Duration::from_secs(5);

/// Says loudly when readiness was never declared: a framework that owns the restart task may
/// never poll it (say, inside `async { ctrl_c().await; task.await }`), and then every restart
/// times out in the previous generation without a word here.
fn warn_if_never_ready() {
    let mut ready = readiness::subscribe();
    tokio::spawn(async move {
        if tokio::time::timeout(READY_WARNING, ready.wait_for(|r| *r))
            .await
            .is_err()
        {
            tracing::warn!(
                "this generation has not declared itself ready {READY_WARNING:?} after its \
                 restart task was created: poll the RestartTask (or use \
                 RestartTask::restart_or_terminate), or call shellflip::startup_complete(); until \
                 then the previous generation keeps waiting and restarts are refused"
            );
        }
    });
}

/// Turns the restart signal (and SIGTERM, when the transport restarts on it) into requests.
fn forward_signals<T: Transport>(
    config: &RestartConfig,
    commands: mpsc::Sender<Command>,
) -> Result<(), SetupError> {
    let os = |source| SetupError::Os {
        what: "installing a signal handler",
        source,
    };
    let mut restart = signal(config.restart_signal).map_err(os)?;
    let mut terminate = match T::RESTARTS_ON_SIGTERM {
        true => Some(signal(SignalKind::terminate()).map_err(os)?),
        false => None,
    };
    tokio::spawn(async move {
        loop {
            let term = async {
                match &mut terminate {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let initiator = tokio::select! {
                _ = restart.recv() => Initiator::RestartSignal,
                _ = term => Initiator::Terminate,
            };
            // Closed once the loop handed over: the signal is this process's no more.
            if commands.send(Command::Restart(initiator)).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// What the loop remembers for the status report.
struct Record {
    kind: control::LifecycleKind,
    in_progress: bool,
    last: Option<LastRestart>,
    /// The new generation on probation, while one is.
    probation: Option<u32>,
    /// Whether this generation waits to be confirmed by the one that started it.
    awaiting_confirmation: bool,
}

impl Record {
    fn new(kind: control::LifecycleKind) -> Record {
        Record {
            kind,
            in_progress: false,
            last: None,
            probation: None,
            awaiting_confirmation: false,
        }
    }

    fn status(&self, ready: bool) -> Status {
        Status {
            pid: std::process::id(),
            generation: inherit::generation(),
            lifecycle: self.kind,
            ready,
            restart_in_progress: self.in_progress,
            last_result: self.last.clone(),
            state_on_start: crate::lifecycle::state_on_start(),
            probation: match (self.probation, self.awaiting_confirmation) {
                (Some(pid), _) => Some(Probation::Successor(pid)),
                (None, true) => Some(Probation::This),
                (None, false) => None,
            },
            last_attempt: crate::fork_exec::last_attempt(),
        }
    }
}

/// Answers `initiator` without holding up the loop, and without a task that could die with
/// the process before it wrote (a client may be slow to read, but one small answer fits).
fn respond_at_once(initiator: Initiator, outcome: Result<Option<u32>, RestartError>) {
    initiator.respond_now(outcome);
}

/// A restart whose new generation was confirmed.
struct Success {
    new_pid: Option<u32>,
    /// The loop's side of the handover: the verdict to give, the answer to see out.
    link: Link,
    /// The handover, when the application has not been told of it yet (no probation).
    unsent: Option<Handover>,
}

/// The restart loop and everything it owns.
struct Loop<T> {
    ctx: Context,
    transport: T,
    commands: mpsc::Receiver<Command>,
    /// Whether this process declared itself ready.
    ready: watch::Receiver<bool>,
    /// The control socket, served once this process is ready: until then the generation that
    /// started it (which shares the listening socket) answers.
    control: Option<ControlSocket>,
    record: Record,
}

impl<T: Transport> Loop<T> {
    async fn run(mut self, outcome: mpsc::Sender<Result<Handover, RestartError>>) {
        let mut pending = self.wait_until_ready().await;
        self.write_pid_file();
        let control = self.serve_control();
        self.transport.after_ready().await;
        self.release_unclaimed();
        if let Some(first) = self.await_confirmation().await {
            match pending {
                None => pending = Some(first),
                Some(_) => respond_at_once(first, Err(RestartError::InProgress)),
            }
        }
        loop {
            let initiator = match pending.take() {
                Some(initiator) => initiator,
                None => match self.next_request().await {
                    Some(initiator) => initiator,
                    None => return,
                },
            };
            if initiator.is_gone() {
                tracing::warn!(
                    trigger = initiator.describe(),
                    "restart not started: whoever asked for it is gone"
                );
                continue;
            }
            let started = Instant::now();
            let (result, stop) = self.restart_once(initiator, &outcome).await;
            pending = stop;
            let elapsed = started.elapsed();
            match result {
                Ok(Success {
                    new_pid,
                    link,
                    unsent,
                }) => {
                    tracing::info!(?elapsed, ?new_pid, "restart succeeded; draining");
                    // Every request still waiting is answered before the application may exit
                    // (it learns that it may only now); the next generation then serves the
                    // control socket.
                    if let Some(control) = control {
                        let status = self.record.status(true);
                        control.hand_over(new_pid, status).await;
                    }
                    self.answer_after_handover(new_pid).await;
                    if let Some(handover) = unsent {
                        // A dropped task drops the handover: that counts as having stopped.
                        let _ = outcome.send(Ok(handover)).await;
                    }
                    link.verdict(Ok(()));
                    // The initiator hears once the application stopped accepting.
                    link.delivered(Handover::ANSWER_AT_THE_LATEST).await;
                    return;
                }
                Err(e) => {
                    tracing::error!(?elapsed, "restart failed: {e}");
                    if matches!(e, RestartError::RolledBack { .. }) {
                        self.write_pid_file();
                    }
                    self.record.last = Some(LastRestart::Failed {
                        elapsed_ms: elapsed.as_millis().try_into().unwrap_or(u64::MAX),
                        reason: e.to_string(),
                    });
                    if self.ctx.config.exit_on_error {
                        let _ = outcome.send(Err(e)).await;
                        return;
                    }
                }
            }
        }
    }

    /// Until ready: answers status, refuses restarts (a request racing readiness is served
    /// once ready), keeps a stop for when ready. Returns the restart to run first, if any.
    async fn wait_until_ready(&mut self) -> Option<Initiator> {
        let mut stop = None;
        let mut ready = self.ready.clone();
        loop {
            tokio::select! {
                biased;
                _ = ready.wait_for(|r| *r) => return stop,
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Status(tx) => { let _ = tx.send(self.record.status(false)); }
                    Command::Restart(initiator) if *self.ready.borrow() => return Some(initiator),
                    Command::Restart(Initiator::Terminate) => stop = Some(Initiator::Terminate),
                    Command::Restart(initiator) => respond_at_once(initiator, Err(RestartError::NotReadyYet)),
                },
            }
        }
    }

    /// A generation on probation (its parent generation handed it a confirmation pipe) waits
    /// to be confirmed before it restarts itself: until then a request is "in progress". The
    /// parent confirms before it answers its own initiator, so a request that follows that
    /// answer finds the confirmation already in the pipe. Returns a restart to run first.
    async fn await_confirmation(&mut self) -> Option<Initiator> {
        let fd = inherit::take(inherit::CONFIRM_FD).ok().flatten()?;
        let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return None;
        };
        self.record.awaiting_confirmation = true;
        // `C`, or the end of the pipe (the parent is gone: nothing to roll back to).
        let confirmed_now = |pipe: &tokio::net::unix::pipe::Receiver| !matches!(pipe.try_read(&mut [0u8; 8]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        let mut first = None;
        loop {
            tokio::select! {
                _ = pipe.readable() => if confirmed_now(&pipe) { break },
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Status(tx) => { let _ = tx.send(self.record.status(true)); }
                    Command::Restart(initiator) if confirmed_now(&pipe) => {
                        first = Some(initiator);
                        break;
                    }
                    Command::Restart(initiator) => {
                        tracing::warn!("{}: this generation is still on probation", initiator.describe());
                        respond_at_once(initiator, Err(RestartError::InProgress));
                    }
                },
            }
        }
        self.record.awaiting_confirmation = false;
        readiness::confirmed();
        first
    }

    /// Names this process in the PID file, if there is one: written beside it, then renamed
    /// over it, so that a reader never sees it half-written.
    fn write_pid_file(&self) {
        let Some(path) = &self.ctx.config.pid_file else {
            return;
        };
        let pid = std::process::id();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        let written =
            std::fs::write(&tmp, format!("{pid}\n")).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!("cannot write the PID file {}: {e}", path.display());
        }
    }

    /// Starts serving the control socket.
    fn serve_control(&mut self) -> Option<ControlServer> {
        self.control.take().map(ControlSocket::serve)
    }

    /// Closes the inherited descriptors this generation did not take, and tells the transport.
    fn release_unclaimed(&mut self) {
        for name in inherit::unclaimed() {
            if name == inherit::CONFIRM_FD {
                continue;
            }
            tracing::info!(
                name,
                "releasing an inherited descriptor this generation did not take"
            );
            self.transport.release(&name);
            drop(inherit::take(&name));
        }
    }

    /// Waits for the next restart request, answering status requests meanwhile.
    async fn next_request(&mut self) -> Option<Initiator> {
        loop {
            match self.commands.recv().await? {
                Command::Status(tx) => {
                    let _ = tx.send(self.record.status(*self.ready.borrow()));
                }
                Command::Restart(initiator) => return Some(initiator),
            }
        }
    }

    /// Runs one restart to its final outcome: the new generation ready, the application told
    /// (it stops accepting), the probation over. On success, returns the new PID and what sees
    /// the initiator's answer out; on failure the initiator was answered. Meanwhile other
    /// requests are refused ("in progress") and a stop is kept, to be run if this one fails.
    async fn restart_once(
        &mut self,
        initiator: Initiator,
        outcome: &mpsc::Sender<Result<Handover, RestartError>>,
    ) -> (Result<Success, RestartError>, Option<Initiator>) {
        let trigger = match initiator {
            Initiator::Terminate => Trigger::Stop,
            _ => Trigger::Request,
        };
        tracing::info!(trigger = initiator.describe(), "restart requested");
        self.record.in_progress = true;
        let Loop {
            ctx,
            transport,
            commands,
            record,
            ..
        } = self;
        let (result, stop) = while_busy(commands, record, transport.restart(ctx, trigger)).await;
        let handover = match result {
            Ok(handover) => handover,
            Err(e) => {
                self.record.in_progress = false;
                initiator.respond(Err(e.clone())).await;
                return (Err(e), stop);
            }
        };
        let new_pid = handover.new_pid();
        let link = handover.link();
        self.transport.answer(initiator, &handover).await;
        let probation = self.ctx.config.probation;
        // With a probation the application stops accepting now, and keeps what it needs to
        // take over again until the verdict; without one it learns of the handover once the
        // loop is done with it.
        let unsent = match probation.is_zero() {
            true => Some(handover),
            false => {
                let _ = outcome.send(Ok(handover)).await;
                None
            }
        };
        self.record.probation = new_pid;
        let Loop {
            transport,
            commands,
            record,
            ..
        } = self;
        let (verdict, more) = while_busy(commands, record, transport.probation(probation)).await;
        self.record.in_progress = false;
        self.record.probation = None;
        let result = match verdict {
            Ok(()) => Ok(Success {
                new_pid,
                link,
                unsent,
            }),
            Err(e) => {
                link.verdict(Err(e.clone()));
                Err(e)
            }
        };
        (result, stop.or(more))
    }

    /// After the handover: restart requests still queued were satisfied by the restart that
    /// just succeeded.
    async fn answer_after_handover(&mut self, new_pid: Option<u32>) {
        self.commands.close();
        while let Some(cmd) = self.commands.recv().await {
            match cmd {
                Command::Restart(i) => i.respond(control::satisfied_by(new_pid)).await,
                Command::Status(tx) => {
                    let _ = tx.send(self.record.status(true));
                }
            }
        }
    }
}

/// Runs `work` while this generation is busy (restarting, or on probation): status requests
/// are answered, restart requests refused "in progress", and a stop (SIGTERM under systemd) is
/// kept for when `work` is done.
async fn while_busy<F: Future>(
    commands: &mut mpsc::Receiver<Command>,
    record: &Record,
    work: F,
) -> (F::Output, Option<Initiator>) {
    tokio::pin!(work);
    let mut stop = None;
    loop {
        tokio::select! {
            r = &mut work => return (r, stop),
            Some(cmd) = commands.recv() => match cmd {
                Command::Status(tx) => { let _ = tx.send(record.status(true)); }
                Command::Restart(other) => {
                    tracing::warn!("{}: a restart is already in progress", other.describe());
                    match other {
                        // systemd is stopping us: stop once this is over.
                        Initiator::Terminate => stop = Some(other),
                        other => respond_at_once(other, Err(RestartError::InProgress)),
                    }
                }
            },
        }
    }
}

/// The loop's decisions, with scripted successors: no process is started.
#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::lifecycle::LifecycleHandler;
    use crate::outcome::{ExitStatus, ProbationFailure, SuccessorFailure};
    use crate::state::StateWriter;
    use crate::successor::Launcher;
    use crate::successor::fake::{FakeLauncher, Script};

    /// Writes `state` (or fails with `fail`), and counts the hooks.
    #[derive(Clone, Default)]
    struct Hooks {
        state: Vec<u8>,
        fail: Option<&'static str>,
        pre: Arc<AtomicUsize>,
        failed: Arc<AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl LifecycleHandler for Hooks {
        async fn send_to_new_process(&mut self, mut w: StateWriter) -> io::Result<()> {
            w.write_all(&self.state).await?;
            match self.fail {
                Some(why) => Err(io::Error::other(why)),
                None => Ok(()),
            }
        }
        async fn pre_new_process(&mut self) {
            self.pre.fetch_add(1, Ordering::SeqCst);
        }
        async fn new_process_failed(&mut self) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A running loop, driven the way the control socket, signals and readiness drive it.
    struct Harness {
        commands: mpsc::Sender<Command>,
        handle: RestartHandle,
        ready: watch::Sender<bool>,
        outcome: mpsc::Receiver<Result<Handover, RestartError>>,
        launcher: FakeLauncher,
        hooks: Hooks,
    }

    fn config(startup_timeout: Duration) -> RestartConfig {
        RestartConfig {
            startup_timeout,
            ..Default::default()
        }
    }

    fn start_loop<T: Transport>(
        transport: T,
        launcher: FakeLauncher,
        config: RestartConfig,
        hooks: Hooks,
    ) -> Harness {
        let (commands_tx, commands) = mpsc::channel(16);
        let (ready, ready_rx) = watch::channel(false);
        let (outcome_tx, outcome) = mpsc::channel(1);
        let restart_loop = Loop {
            ctx: Context {
                config,
                handler: Box::new(hooks.clone()),
            },
            transport,
            commands,
            ready: ready_rx,
            control: None,
            record: Record::new(T::KIND),
        };
        tokio::spawn(restart_loop.run(outcome_tx));
        Harness {
            handle: RestartHandle {
                commands: commands_tx.clone(),
            },
            commands: commands_tx,
            ready,
            outcome,
            launcher,
            hooks,
        }
    }

    /// A ready fork/exec loop whose successors follow `scripts`.
    fn fork_exec(scripts: Vec<Script>, config: RestartConfig, hooks: Hooks) -> Harness {
        let launcher = FakeLauncher::new(scripts);
        let h = start_loop(ForkExec::new(launcher.clone()), launcher, config, hooks);
        h.ready.send_replace(true);
        h
    }

    fn systemd(scripts: Vec<Script>, config: RestartConfig, hooks: Hooks) -> Harness {
        let launcher = FakeLauncher::new(scripts);
        let h = start_loop(Systemd::detached(launcher.clone()), launcher, config, hooks);
        h.ready.send_replace(true);
        h
    }

    fn state(bytes: &[u8]) -> Hooks {
        Hooks {
            state: bytes.to_vec(),
            ..Hooks::default()
        }
    }

    impl Harness {
        async fn status(&self) -> Status {
            self.handle.status().await.expect("status")
        }

        async fn send(&self, initiator: Initiator) {
            self.commands
                .send(Command::Restart(initiator))
                .await
                .expect("the loop takes requests");
        }

        /// Starts a restart by the handle without waiting for it.
        fn restart_in_background(
            &self,
        ) -> tokio::task::JoinHandle<Result<Option<u32>, RestartError>> {
            let handle = self.handle.clone();
            tokio::spawn(async move { handle.restart().await })
        }

        /// Waits until the loop reports a restart in progress.
        async fn until_in_progress(&self) {
            while !self.status().await.restart_in_progress {
                tokio::task::yield_now().await;
            }
        }

        /// A restart that succeeds, played the way an application plays it: the task resolves,
        /// the application stops accepting and says so, then the initiator hears.
        async fn restart_and_hand_over(&mut self) -> (Option<u32>, Handover) {
            let restart = self.restart_in_background();
            let handover = self
                .outcome
                .recv()
                .await
                .expect("outcome")
                .expect("a handover");
            handover.accepting_stopped();
            let told = restart.await.expect("join").expect("restart");
            (told, handover)
        }

        fn hooks(&self) -> (usize, usize) {
            (
                self.hooks.pre.load(Ordering::SeqCst),
                self.hooks.failed.load(Ordering::SeqCst),
            )
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_restart_before_ready_is_refused_and_status_answered() {
        let launcher = FakeLauncher::new([]);
        let h = start_loop(
            ForkExec::new(launcher.clone()),
            launcher,
            config(LONG),
            Hooks::default(),
        );
        let status = h.status().await;
        assert!(!status.ready && !status.restart_in_progress, "{status:?}");
        assert_eq!(status.lifecycle, crate::LifecycleKind::ForkExec);
        assert!(matches!(
            h.handle.restart().await,
            Err(RestartError::NotReadyYet)
        ));
        assert!(h.launcher.launched().is_empty(), "nothing was started");
    }

    #[tokio::test]
    async fn a_ready_successor_takes_over_with_the_state() {
        let mut h = fork_exec(vec![Script::Ready], config(LONG), state(b"forty-two"));
        let (pid, handover) = h.restart_and_hand_over().await;
        let pid = pid.expect("a PID");
        assert_eq!(handover.new_pid(), Some(pid));
        assert_eq!(handover.exit_code(), 0);
        let launched = h.launcher.launched();
        assert_eq!(launched.len(), 1);
        assert_eq!(launched[0].pid, pid);
        assert!(!launched[0].validation);
        assert_eq!(launched[0].state.as_deref(), Some(&b"forty-two"[..]));
        assert!(launched[0].reaped_in_background && !launched[0].killed);
        assert_eq!(h.hooks(), (1, 0));
    }

    #[tokio::test]
    async fn a_second_request_while_one_runs_is_refused_at_once() {
        let h = fork_exec(
            vec![Script::Hangs],
            config(Duration::from_millis(300)),
            Hooks::default(),
        );
        let first = h.restart_in_background();
        h.until_in_progress().await;
        assert!(matches!(
            h.handle.restart().await,
            Err(RestartError::InProgress)
        ));
        // The restart signal during a restart is dropped, not queued.
        h.send(Initiator::RestartSignal).await;
        let first = first.await.expect("join");
        assert!(
            matches!(
                first,
                Err(RestartError::Successor {
                    failure: SuccessorFailure::NotReady(_),
                    ..
                })
            ),
            "{first:?}"
        );
        assert_eq!(h.launcher.launched().len(), 1, "one restart ran");
        assert!(!h.status().await.restart_in_progress);
    }

    #[tokio::test]
    async fn a_successor_that_exits_is_reported_and_the_old_one_keeps_going() {
        let mut h = fork_exec(
            vec![Script::Exits(3), Script::Ready],
            config(LONG),
            state(&vec![7u8; 300_000]),
        );
        let err = h.handle.restart().await.unwrap_err();
        assert!(
            matches!(
                err,
                RestartError::Successor {
                    pid: 1000,
                    failure: SuccessorFailure::Exited(ExitStatus::Code(3))
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "new process 1000 exited with status 3 before it was ready"
        );
        assert_eq!(h.hooks(), (1, 1));
        let status = h.status().await;
        let last = status.last_result.expect("a last result").to_string();
        assert!(last.contains("exited with status 3"), "{last}");
        // The next restart works.
        assert_eq!(h.restart_and_hand_over().await.0, Some(1001));
        assert_eq!(
            h.launcher.launched()[1].state.as_ref().map(Vec::len),
            Some(300_000)
        );
    }

    #[tokio::test]
    async fn a_reported_failure_carries_the_successor_reason() {
        let h = fork_exec(
            vec![Script::Reports("bad config: line 3".into())],
            config(LONG),
            Hooks::default(),
        );
        let err = h.handle.restart().await.unwrap_err();
        assert!(
            matches!(&err, RestartError::Successor { failure: SuccessorFailure::Reported { reason, .. }, .. } if reason == "bad config: line 3"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_successor_not_ready_in_time_is_killed() {
        let timeout = Duration::from_millis(100);
        let h = fork_exec(vec![Script::Hangs], config(timeout), Hooks::default());
        let err = h.handle.restart().await.unwrap_err();
        assert!(
            matches!(err, RestartError::Successor { failure: SuccessorFailure::NotReady(t), .. } if t == timeout),
            "{err:?}"
        );
        assert!(h.launcher.launched()[0].killed);
    }

    #[tokio::test]
    async fn a_failed_state_send_kills_the_successor() {
        let hooks = Hooks {
            fail: Some("disk on fire"),
            ..Hooks::default()
        };
        let h = fork_exec(vec![Script::Ready], config(LONG), hooks);
        let err = h.handle.restart().await.unwrap_err();
        assert!(matches!(err, RestartError::StateSend(_)), "{err:?}");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(h.launcher.launched()[0].killed);
        assert_eq!(h.hooks(), (1, 1));
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_reported() {
        let h = fork_exec(vec![Script::FailsToStart], config(LONG), Hooks::default());
        let err = h.handle.restart().await.unwrap_err();
        assert!(matches!(err, RestartError::Spawn(_)), "{err:?}");
        assert!(err.to_string().contains("no such program"), "{err}");
    }

    #[tokio::test]
    async fn exit_on_error_resolves_the_task_with_the_error() {
        let mut cfg = config(LONG);
        cfg.exit_on_error = true;
        let mut h = fork_exec(vec![Script::Exits(1)], cfg, Hooks::default());
        let told = h.handle.restart().await.unwrap_err();
        let outcome = h.outcome.recv().await.expect("outcome").unwrap_err();
        assert_eq!(told.to_string(), outcome.to_string());
        assert!(
            matches!(outcome, RestartError::Successor { .. }),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn without_exit_on_error_the_task_stays_pending() {
        let mut h = fork_exec(vec![Script::Exits(1)], config(LONG), Hooks::default());
        assert!(h.handle.restart().await.is_err());
        assert!(matches!(
            h.outcome.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
    }

    #[tokio::test]
    async fn requests_after_the_handover_start_nothing() {
        let mut h = fork_exec(
            vec![Script::Ready, Script::Ready],
            config(LONG),
            Hooks::default(),
        );
        h.restart_and_hand_over().await;
        assert!(h.handle.restart().await.is_err());
        // A control-socket client whose request was queued is told to ask the new generation.
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Command::Restart(i))) = h
            .commands
            .send(Command::Restart(Initiator::Handle(tx)))
            .await
        {
            i.respond(Err(RestartError::HandedOver)).await;
        }
        assert!(matches!(rx.await, Ok(Err(RestartError::HandedOver))));
        assert_eq!(h.launcher.launched().len(), 1);
    }

    #[tokio::test]
    async fn a_request_whose_client_is_gone_starts_nothing() {
        let h = fork_exec(vec![Script::Ready], config(LONG), Hooks::default());
        let (client, server) = tokio::net::UnixStream::pair().expect("socket pair");
        drop(client);
        h.send(Initiator::Socket(RestartCoordinationSocket::new(server)))
            .await;
        let (tx, rx) = oneshot::channel();
        drop(rx);
        h.send(Initiator::Handle(tx)).await;
        // Status is answered after both: they were looked at, and dropped.
        assert!(!h.status().await.restart_in_progress);
        assert!(h.launcher.launched().is_empty(), "nothing was started");
        assert_eq!(h.hooks(), (0, 0));
    }

    #[tokio::test]
    async fn systemd_validates_a_requested_restart_and_exits_with_the_restart_code() {
        let mut h = systemd(vec![Script::Ready], config(LONG), state(b"stored"));
        let (told, handover) = h.restart_and_hand_over().await;
        assert_eq!(told, None);
        assert_eq!((handover.new_pid(), handover.exit_code()), (None, 75));
        let launched = h.launcher.launched();
        assert!(launched[0].validation, "a validation run");
        assert_eq!(launched[0].state.as_deref(), Some(&b"stored"[..]));
    }

    #[tokio::test]
    async fn systemd_rejected_state_keeps_serving() {
        let mut h = systemd(
            vec![Script::Reports("format 1 is not 2".into())],
            config(LONG),
            state(b"x"),
        );
        let err = h.handle.restart().await.unwrap_err();
        assert!(matches!(err, RestartError::Rejected { .. }), "{err:?}");
        assert!(err.to_string().contains("format 1 is not 2"), "{err}");
        assert_eq!(h.hooks(), (1, 1));
        assert!(matches!(
            h.outcome.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
    }

    #[tokio::test]
    async fn sigterm_during_a_refused_restart_still_stops() {
        let mut h = systemd(
            vec![Script::Hangs],
            config(Duration::from_millis(300)),
            Hooks::default(),
        );
        let first = h.restart_in_background();
        h.until_in_progress().await;
        h.send(Initiator::Terminate).await;
        assert!(matches!(
            first.await.expect("join"),
            Err(RestartError::Rejected { .. })
        ));
        // The stop ran once the refused restart was over: no validation, exit status 0.
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        assert_eq!((handover.new_pid(), handover.exit_code()), (None, 0));
        assert_eq!(
            h.launcher.launched().len(),
            1,
            "a stop starts no validation run"
        );
    }

    #[tokio::test]
    async fn sigterm_before_ready_stops_once_ready() {
        let launcher = FakeLauncher::new([]);
        let mut h = start_loop(
            Systemd::detached(launcher.clone()),
            launcher,
            config(LONG),
            Hooks::default(),
        );
        h.send(Initiator::Terminate).await;
        assert!(h.outcome.try_recv().is_err(), "not before ready");
        h.ready.send_replace(true);
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        assert_eq!(handover.exit_code(), 0);
    }

    #[tokio::test]
    async fn the_initiator_hears_only_once_the_old_generation_stopped_accepting() {
        let mut h = fork_exec(
            vec![Script::Ready, Script::Ready],
            config(LONG),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        // From here on, no I/O is left: virtual time is exact.
        tokio::time::pause();
        tokio::time::sleep(Handover::ANSWER_AT_THE_LATEST / 2).await;
        assert!(!restart.is_finished(), "answered before accepting stopped");
        handover.accepting_stopped();
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
    }

    #[tokio::test]
    async fn an_application_that_never_says_it_stopped_accepting_delays_the_answer_only_so_long() {
        let mut h = fork_exec(vec![Script::Ready], config(LONG), Hooks::default());
        let restart = h.restart_in_background();
        let _handover = h.outcome.recv().await.expect("outcome").expect("handover");
        tokio::time::pause();
        tokio::time::sleep(Handover::ANSWER_AT_THE_LATEST + Duration::from_millis(1)).await;
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
    }

    #[tokio::test]
    async fn dropping_the_handover_counts_as_having_stopped_accepting() {
        let mut h = fork_exec(vec![Script::Ready], config(LONG), Hooks::default());
        let restart = h.restart_in_background();
        drop(h.outcome.recv().await.expect("outcome").expect("handover"));
        tokio::time::pause();
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
    }

    #[tokio::test]
    async fn the_application_hears_of_the_handover_only_after_the_loop_is_done_with_it() {
        let mut h = fork_exec(
            vec![Script::Ready, Script::Ready],
            config(LONG),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        // By now the loop has answered whatever was queued, and takes nothing more: the
        // application may exit as soon as it is drained.
        assert!(h.handle.restart().await.is_err());
        handover.accepting_stopped();
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
        assert_eq!(h.launcher.launched().len(), 1, "no second restart");
    }

    fn on_probation(probation: Duration) -> RestartConfig {
        RestartConfig {
            probation,
            ..config(LONG)
        }
    }

    #[tokio::test]
    async fn a_successor_that_survives_its_probation_is_confirmed() {
        let mut h = fork_exec(
            vec![Script::Ready],
            on_probation(Duration::from_millis(50)),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        handover.accepting_stopped();
        handover.confirmed().await.expect("confirmed");
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
        let launched = h.launcher.launched();
        assert!(launched[0].confirmed && launched[0].reaped_in_background);
    }

    #[tokio::test]
    async fn a_successor_that_dies_during_probation_is_rolled_back() {
        let mut h = fork_exec(
            vec![
                Script::DiesAfterReady(70, Duration::from_millis(30)),
                Script::Ready,
            ],
            on_probation(Duration::from_millis(300)),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        handover.accepting_stopped();
        let verdict = handover.confirmed().await.unwrap_err();
        assert!(
            matches!(
                verdict,
                RestartError::RolledBack {
                    pid: 1000,
                    failure: ProbationFailure::Exited(ExitStatus::Code(70)),
                    ..
                }
            ),
            "{verdict:?}"
        );
        let told = restart.await.expect("join").unwrap_err();
        assert!(
            told.to_string()
                .starts_with("rolled back: new process 1000 exited with status 70, "),
            "{told}"
        );
        assert!(
            told.to_string().ends_with(" ms after it was ready"),
            "{told}"
        );
        let status = h.status().await;
        assert!(
            !status.restart_in_progress && status.probation.is_none(),
            "{status:?}"
        );
        assert!(
            status
                .last_result
                .expect("last")
                .to_string()
                .contains("rolled back")
        );
        assert!(!h.launcher.launched()[0].confirmed);
        // This generation serves again, and the same task resolves on the next restart.
        assert_eq!(h.restart_and_hand_over().await.0, Some(1001));
    }

    #[tokio::test]
    async fn an_unhealthy_report_during_probation_rolls_back_with_its_reason() {
        let mut h = fork_exec(
            vec![Script::UnhealthyAfterReady(
                "database unreachable".into(),
                Duration::from_millis(10),
            )],
            on_probation(Duration::from_secs(30)),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        let verdict = handover.confirmed().await.unwrap_err();
        assert!(
            matches!(&verdict, RestartError::RolledBack { failure: ProbationFailure::Unhealthy(r), .. } if r == "database unreachable"),
            "{verdict:?}"
        );
        // Rolled back: the initiator hears at once, accepting stopped or not.
        assert!(restart.await.expect("join").is_err());
        assert!(h.launcher.launched()[0].killed);
    }

    #[tokio::test]
    async fn during_probation_status_shows_it_and_restarts_are_in_progress() {
        let mut h = fork_exec(
            vec![Script::Ready],
            on_probation(Duration::from_millis(300)),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        handover.accepting_stopped();
        let status = h.status().await;
        assert_eq!(
            status.probation,
            Some(Probation::Successor(1000)),
            "{status:?}"
        );
        assert!(status.restart_in_progress);
        assert!(matches!(
            h.handle.restart().await,
            Err(RestartError::InProgress)
        ));
        handover.confirmed().await.expect("confirmed");
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
    }

    #[tokio::test]
    async fn a_death_after_the_probation_is_not_a_rollback() {
        let mut h = fork_exec(
            vec![Script::DiesAfterReady(70, Duration::from_millis(200))],
            on_probation(Duration::from_millis(50)),
            Hooks::default(),
        );
        let (pid, handover) = h.restart_and_hand_over().await;
        assert_eq!(pid, Some(1000));
        handover.confirmed().await.expect("confirmed");
    }

    #[tokio::test]
    async fn the_initiator_hears_only_after_the_probation() {
        let mut h = fork_exec(
            vec![Script::Ready],
            on_probation(Duration::from_millis(200)),
            Hooks::default(),
        );
        let restart = h.restart_in_background();
        let handover = h.outcome.recv().await.expect("outcome").expect("handover");
        handover.accepting_stopped();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!restart.is_finished(), "answered during the probation");
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
    }

    /// The task the application polls, over the harness's loop.
    fn task(h: &mut Harness, sigterm_is_a_restart: bool) -> RestartTask {
        let (_, unused) = mpsc::channel(1);
        RestartTask {
            outcome: std::mem::replace(&mut h.outcome, unused),
            handle: h.handle.clone(),
            declared_ready: true,
            sigterm_is_a_restart,
        }
    }

    #[tokio::test]
    async fn restart_or_terminate_resolves_on_a_restart() {
        let mut h = fork_exec(vec![Script::Ready], config(LONG), Hooks::default());
        let mut task = task(&mut h, false);
        let restart = h.restart_in_background();
        let stop = task.restart_or_terminate().await.expect("a stop");
        let Stop::Restart(handover) = stop else {
            panic!("expected a restart, got {stop:?}")
        };
        handover.accepting_stopped();
        assert_eq!(restart.await.expect("join").expect("restart"), Some(1000));
    }

    #[tokio::test]
    async fn restart_or_terminate_resolves_on_sigterm_in_fork_exec() {
        use nix::sys::signal::{Signal, raise};
        // A handler first, so that the signal can never end the test process.
        let _keep = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut h = fork_exec(vec![], config(LONG), Hooks::default());
        let mut task = task(&mut h, false);
        let waiter = tokio::spawn(async move { task.restart_or_terminate().await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        raise(Signal::SIGTERM).expect("raise");
        let stop = waiter.await.expect("join").expect("a stop");
        assert!(matches!(stop, Stop::Terminate), "{stop:?}");
        assert!(
            h.launcher.launched().is_empty(),
            "SIGTERM is no restart here"
        );
    }

    /// The seam is the only way the loop reaches a successor.
    #[test]
    fn the_fake_is_a_launcher() {
        fn is_launcher<L: Launcher>() {}
        is_launcher::<FakeLauncher>();
        is_launcher::<Spawner>();
    }
}
