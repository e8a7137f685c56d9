//! What a restart ends in, and what can go wrong before one can run.
//!
//! Three kinds of failure are kept apart, because a caller does different things with each:
//!
//! * [`SetupError`]: the restart machinery could not be set up (no runtime, no systemd, the
//!   control socket). Returned by [`try_into_restart_task`](crate::RestartConfig::try_into_restart_task);
//!   the service cannot restart at all.
//! * [`RestartError`]: one restart failed or was refused; the old process keeps serving.
//! * [`SuccessorFailure`]: why a new process did not take over, inside a [`RestartError`].
//!
//! This module depends on no lifecycle: both share these types.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// A successful restart: what the old process does next.
///
/// Stop accepting, then call [`accepting_stopped`](Self::accepting_stopped): in the fork/exec
/// lifecycle the restart's initiator (`shellflip restart`, `systemctl reload`) hears the new PID
/// only then, so that a deploy script that checks the service right after sees the new
/// generation. An application that does not call it has its initiator answered when the last
/// clone of the `Handover` is dropped, when [`exit_code`](Self::exit_code) is called, or
/// [`ANSWER_AT_THE_LATEST`](Self::ANSWER_AT_THE_LATEST) after the restart task resolved,
/// whichever comes first. (In the systemd lifecycle the new generation answers, once ready.)
///
/// With a probation ([`RestartConfig::probation`](crate::RestartConfig::probation)), keep the
/// listeners until [`confirmed`](Self::confirmed) says the new generation survived it.
///
/// # Examples
///
/// ```no_run
/// # async fn f(restart: shellflip::RestartTask, listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
/// let handover = restart.await?;
/// drop(listener); // the new generation accepts from now on
/// handover.accepting_stopped(); // and the initiator hears its PID
/// // ... drain, then:
/// std::process::exit(handover.exit_code());
/// # }
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Handover {
    new_pid: Option<u32>,
    exit_code: i32,
    /// Held by the application's clones only: dropping the last one counts as having stopped
    /// accepting.
    app: Arc<AppSide>,
    /// The probation's verdict, once there is one.
    verdict: watch::Receiver<Option<Result<(), RestartError>>>,
}

/// What both sides of a handover share: the initiator's answer, held until this generation
/// stopped accepting and the new one is confirmed (or at once, when it was rolled back).
struct Shared {
    state: Mutex<AnswerState>,
    verdict: watch::Sender<Option<Result<(), RestartError>>>,
    /// True once no answer is pending.
    done: watch::Sender<bool>,
}

type PendingAnswer = Box<dyn FnOnce(Result<(), RestartError>) + Send>;

#[derive(Default)]
struct AnswerState {
    pending: Option<PendingAnswer>,
    /// Whether this generation stopped accepting.
    stopped: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, AnswerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers the pending answer if its time has come: stopped accepting and confirmed, or
    /// rolled back.
    fn try_deliver(&self) {
        let verdict = self.verdict.borrow().clone();
        let ready = match &verdict {
            Some(Ok(())) => self.lock().stopped,
            Some(Err(_)) => true,
            None => false,
        };
        let Some(verdict) = verdict.filter(|_| ready) else {
            return;
        };
        let pending = self.lock().pending.take();
        if let Some(answer) = pending {
            answer(verdict);
        }
        self.done.send_replace(true);
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.try_deliver();
    }
}

/// The application's side of a handover.
struct AppSide(Arc<Shared>);

impl Drop for AppSide {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("new_pid", &self.new_pid)
            .field("exit_code", &self.exit_code)
            .finish()
    }
}

impl PartialEq for Handover {
    fn eq(&self, other: &Handover) -> bool {
        (self.new_pid, self.exit_code) == (other.new_pid, other.exit_code)
    }
}

impl Eq for Handover {}

/// The restart loop's side of a handover: it gives the verdict and sees the answer out.
pub(crate) struct Link(Arc<Shared>);

impl Link {
    /// Gives the probation's verdict (or `Ok` at once, without one).
    pub(crate) fn verdict(&self, verdict: Result<(), RestartError>) {
        self.0.verdict.send_replace(Some(verdict));
        self.0.try_deliver();
    }

    /// Resolves once the answer was delivered; after `at_latest`, delivers it itself.
    pub(crate) async fn delivered(self, at_latest: Duration) {
        let mut done = self.0.done.subscribe();
        let delivered = tokio::time::timeout(at_latest, async {
            let _ = done.wait_for(|done| *done).await;
        })
        .await;
        if delivered.is_err() {
            tracing::warn!(
                "the application did not say it stopped accepting (Handover::accepting_stopped); \
                 answering the initiator anyway"
            );
            let shared = self.0;
            let _ = tokio::task::spawn_blocking(move || shared.stop()).await;
        }
    }
}

impl Handover {
    /// How long the initiator waits at most for [`accepting_stopped`](Self::accepting_stopped).
    pub const ANSWER_AT_THE_LATEST: Duration = Duration::from_secs(2);

    pub(crate) fn new(new_pid: Option<u32>, exit_code: i32) -> Handover {
        let (verdict, verdict_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(AnswerState::default()),
            verdict,
            done: watch::channel(true).0,
        });
        Handover {
            new_pid,
            exit_code,
            app: Arc::new(AppSide(shared)),
            verdict: verdict_rx,
        }
    }

    /// The loop's side of this handover.
    pub(crate) fn link(&self) -> Link {
        Link(self.app.0.clone())
    }

    /// Holds `answer` until this generation stopped accepting and the new one is confirmed;
    /// it is called with the verdict.
    pub(crate) fn answer_with_verdict(
        &self,
        answer: impl FnOnce(Result<(), RestartError>) + Send + 'static,
    ) {
        let shared = &self.app.0;
        shared.lock().pending = Some(Box::new(answer));
        shared.done.send_replace(false);
        shared.try_deliver();
    }

    /// Resolves once the new generation is confirmed: at once without a probation
    /// ([`RestartConfig::probation`](crate::RestartConfig::probation)); with one, when the new
    /// generation survived it (`Ok`) or died or reported itself unhealthy during it
    /// ([`RestartError::RolledBack`]).
    ///
    /// After a rollback this process is the service again: resume accepting on the listeners
    /// kept meanwhile, and keep polling the same [`RestartTask`](crate::RestartTask): it
    /// resolves on the next restart.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(mut restart: shellflip::RestartTask, listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
    /// let handover = loop {
    ///     tokio::select! {
    ///         conn = listener.accept() => { let _ = conn?; /* serve it */ }
    ///         handover = &mut restart => {
    ///             let handover = handover?;
    ///             // Not accepting any more (the listener is kept, for a rollback).
    ///             handover.accepting_stopped();
    ///             match handover.confirmed().await {
    ///                 Ok(()) => break handover,
    ///                 Err(e) => eprintln!("{e}; serving again"),
    ///             }
    ///         }
    ///     }
    /// };
    /// drop(listener);
    /// // ... drain, then exit with handover.exit_code()
    /// # Ok(()) }
    /// ```
    pub async fn confirmed(&self) -> Result<(), RestartError> {
        let mut verdict = self.verdict.clone();
        match verdict.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Err(RestartError::LoopGone)),
            Err(_) => Err(RestartError::LoopGone),
        }
    }

    /// Says that this generation no longer accepts connections: the restart's initiator is
    /// answered now (on this thread: the answer is written before this returns), or, with a
    /// probation, as soon as the new generation is confirmed. Calling it again does nothing.
    pub fn accepting_stopped(&self) {
        self.app.0.stop();
    }

    /// The new process's PID (fork/exec); `None` in the systemd lifecycle, where systemd starts
    /// it once this process has exited.
    pub fn new_pid(&self) -> Option<u32> {
        self.new_pid
    }

    /// The status to exit with once drained: 0, or (systemd lifecycle, restart asked for on the
    /// control socket or by signal) [`RestartConfig::systemd_restart_exit_code`](crate::RestartConfig::systemd_restart_exit_code).
    ///
    /// A process asking for it is about to exit: an initiator not answered yet is answered now
    /// (see [`accepting_stopped`](Self::accepting_stopped)).
    pub fn exit_code(&self) -> i32 {
        self.app.0.stop();
        self.exit_code
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(nix::sys::signal::Signal),
    /// It ended, but its status could not be read.
    Unknown,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signal(sig) => write!(f, "was killed by signal {}", sig.as_str()),
            ExitStatus::Unknown => f.write_str("ended (status unknown)"),
        }
    }
}

/// Why a new process did not take over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SuccessorFailure {
    /// It ended before it declared itself ready.
    #[error("{0} before it was ready")]
    Exited(ExitStatus),
    /// It reported that its start-up failed, with its own reason
    /// ([`report_startup_failure`](crate::report_startup_failure)), and then ended.
    #[error("failed to start: {reason} ({status})")]
    Reported {
        /// The reason it gave.
        reason: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// It was not ready within the start-up timeout; it was killed.
    #[error("not ready after {} s; it was killed", .0.as_secs_f64())]
    NotReady(Duration),
}

/// Why a new generation was rolled back during its probation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbationFailure {
    /// It ended.
    #[error("{0}")]
    Exited(ExitStatus),
    /// It reported itself unhealthy ([`report_unhealthy`](crate::report_unhealthy)), with this
    /// reason.
    #[error("reported itself unhealthy: {0}")]
    Unhealthy(String),
}

/// Why a restart failed or was refused. The old process keeps serving after every one of
/// these (unless [`RestartConfig::exit_on_error`](crate::RestartConfig::exit_on_error) is set).
///
/// Cheap to clone: the initiator and the restart task can both be told.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RestartError {
    /// Another restart is running.
    #[error("restart already in progress")]
    InProgress,
    /// This process has not declared itself ready yet.
    #[error("this process is still starting; try again once it is ready")]
    NotReadyYet,
    /// This process already handed over to a new generation: ask the new one.
    #[error("this process has handed over to a new generation; try again")]
    HandedOver,
    /// The new process could not be started at all.
    #[error("cannot start the new process: {0}")]
    Spawn(#[source] Arc<io::Error>),
    /// The new process started but did not take over.
    #[error("new process {pid} {failure}")]
    Successor {
        /// Its PID.
        pid: u32,
        /// What happened to it.
        #[source]
        failure: SuccessorFailure,
    },
    /// Writing the state failed (the application's own error, or the commit); a new process
    /// that was started for it was killed.
    #[error("sending the state failed: {0}")]
    StateSend(#[source] Arc<io::Error>),
    /// The new executable rejected the state in its validation run (systemd lifecycle).
    #[error("the new executable rejected the state: new process {pid} {failure}")]
    Rejected {
        /// The PID of the validation run.
        pid: u32,
        /// What it did.
        #[source]
        failure: SuccessorFailure,
    },
    /// The new process took over, then died or reported itself unhealthy during its probation
    /// ([`RestartConfig::probation`](crate::RestartConfig::probation)): this process serves
    /// again, and the new one was stopped.
    #[error("rolled back: new process {pid} {failure}, {} ms after it was ready", .after_ready.as_millis())]
    RolledBack {
        /// The new process's PID.
        pid: u32,
        /// What it did.
        #[source]
        failure: ProbationFailure,
        /// How long after its readiness.
        after_ready: Duration,
    },
    /// A system call of the restart itself failed (creating the state pipe, for instance).
    #[error("restart: {what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The restart loop ended without an outcome.
    #[error("the restart loop is gone")]
    LoopGone,
}

impl RestartError {
    pub(crate) fn os(what: &'static str, source: impl Into<io::Error>) -> RestartError {
        RestartError::Os {
            what,
            source: Arc::new(source.into()),
        }
    }
}

/// The restart machinery could not be set up: the service cannot restart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The systemd lifecycle was asked for, but systemd is not listening (`NOTIFY_SOCKET`).
    #[error("not started by systemd: NOTIFY_SOCKET is not set")]
    NotUnderSystemd,
    /// No tokio runtime to run the restart loop on.
    #[error("the restart task must be created inside a tokio runtime")]
    NoRuntime,
    /// The program to start for a restart is unknown (no argv\[0\]): set
    /// [`RestartConfig::executable`](crate::RestartConfig::executable).
    #[error("cannot tell which program this is; set RestartConfig::executable")]
    UnknownExecutable,
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    ControlSocket {
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another resource of the restart machinery (a signal handler, the spawner thread, the
    /// state memfd) could not be created.
    #[error("restart machinery: {what}: {source}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_process_and_the_reason() {
        let e = RestartError::Successor {
            pid: 42,
            failure: SuccessorFailure::Exited(ExitStatus::Code(1)),
        };
        assert_eq!(
            e.to_string(),
            "new process 42 exited with status 1 before it was ready"
        );
        let e = RestartError::Successor {
            pid: 42,
            failure: SuccessorFailure::Reported {
                reason: "bad config".into(),
                status: ExitStatus::Signal(nix::sys::signal::Signal::SIGABRT),
            },
        };
        assert_eq!(
            e.to_string(),
            "new process 42 failed to start: bad config (was killed by signal SIGABRT)"
        );
        let e = RestartError::Rejected {
            pid: 7,
            failure: SuccessorFailure::NotReady(Duration::from_millis(1500)),
        };
        assert_eq!(
            e.to_string(),
            "the new executable rejected the state: new process 7 not ready after 1.5 s; it was killed"
        );
    }
}
