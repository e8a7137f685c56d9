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
use std::sync::{Arc, Mutex, Weak};
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
    answer: Arc<Answer>,
}

/// The initiator's answer, held until this generation stopped accepting. Delivered at most
/// once: by [`Handover::accepting_stopped`], by `exit_code`, when the last clone is dropped, or
/// by the restart loop at the latest.
struct Answer {
    pending: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// True once nothing is pending.
    done: watch::Sender<bool>,
}

impl Answer {
    fn deliver(&self) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(answer) = pending {
            answer();
        }
        self.done.send_replace(true);
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.deliver();
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

/// Waits for a handover's answer to be delivered, and delivers it at the latest.
pub(crate) struct Delivery {
    answer: Weak<Answer>,
    done: watch::Receiver<bool>,
}

impl Delivery {
    /// Resolves once the answer was delivered; after `at_latest`, delivers it itself.
    pub(crate) async fn wait(mut self, at_latest: Duration) {
        let delivered = tokio::time::timeout(at_latest, async {
            // Err: every clone was dropped, and dropping the last one delivered the answer.
            let _ = self.done.wait_for(|done| *done).await;
        })
        .await;
        if delivered.is_err() {
            tracing::warn!(
                "the application did not say it stopped accepting (Handover::accepting_stopped); \
                 answering the initiator anyway"
            );
            if let Some(answer) = self.answer.upgrade() {
                let _ = tokio::task::spawn_blocking(move || answer.deliver()).await;
            }
        }
    }
}

impl Handover {
    /// How long the initiator waits at most for [`accepting_stopped`](Self::accepting_stopped).
    pub const ANSWER_AT_THE_LATEST: Duration = Duration::from_secs(2);

    pub(crate) fn new(new_pid: Option<u32>, exit_code: i32) -> Handover {
        Handover {
            new_pid,
            exit_code,
            answer: Arc::new(Answer {
                pending: Mutex::new(None),
                done: watch::channel(true).0,
            }),
        }
    }

    /// Holds `answer` until this generation stopped accepting.
    pub(crate) fn answer_once_accepting_stopped(&self, answer: impl FnOnce() + Send + 'static) {
        *self
            .answer
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(answer));
        self.answer.done.send_replace(false);
    }

    /// What waits for the answer to go out.
    pub(crate) fn delivery(&self) -> Delivery {
        Delivery {
            answer: Arc::downgrade(&self.answer),
            done: self.answer.done.subscribe(),
        }
    }

    /// Says that this generation no longer accepts connections: the restart's initiator is
    /// answered now (on this thread: the answer is written before this returns). Calling it
    /// again does nothing.
    pub fn accepting_stopped(&self) {
        self.answer.deliver();
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
        self.answer.deliver();
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
