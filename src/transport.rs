//! The seam between the restart loop and a lifecycle.
//!
//! Both lifecycles do the same thing in the same order; only where the descriptors and the
//! state travel differs. The loop (`restart.rs`) owns the order — wait until ready, release what
//! was not taken, run one restart at a time, answer, finish — and asks a [`Transport`] for the
//! steps that differ. It never names a lifecycle. The two transports are
//! `fork_exec::ForkExec` and `systemd::Systemd`.

use std::future::Future;
use std::time::Duration;

use crate::config::RestartConfig;
use crate::control::{Initiator, LifecycleKind};
use crate::lifecycle::LifecycleHandler;
use crate::outcome::{Handover, RestartError};

/// What one restart needs from the application, owned by the loop.
pub(crate) struct Context {
    pub(crate) config: RestartConfig,
    pub(crate) handler: Box<dyn LifecycleHandler>,
}

/// Why this restart runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// Someone asked for it (the restart signal, the control socket, a handle): it may be
    /// refused, and the old process keeps serving when it fails.
    Request,
    /// The service manager is stopping this process (SIGTERM under systemd): it cannot be
    /// refused, only prepared for.
    Stop,
}

/// How a lifecycle hands a generation over to the next.
pub(crate) trait Transport: Send + 'static {
    /// How the status report names the lifecycle.
    const KIND: LifecycleKind;

    /// Whether SIGTERM is a [`Trigger::Stop`] (systemd stops us and starts the next
    /// generation) rather than the application's business.
    const RESTARTS_ON_SIGTERM: bool;

    /// Once this generation declared itself ready: whatever the lifecycle finishes then (the
    /// systemd lifecycle answers the initiator of the restart that started this process).
    fn after_ready(&mut self) -> impl Future<Output = ()> + Send;

    /// Lets go of an inherited descriptor this generation did not take (the loop closes it).
    fn release(&mut self, name: &str);

    /// One restart, from the hooks to a confirmed successor (or the reason there is none).
    fn restart(
        &mut self,
        ctx: &mut Context,
        trigger: Trigger,
    ) -> impl Future<Output = Result<Handover, RestartError>> + Send;

    /// Arranges the answer to the initiator of a successful restart: by default the new PID
    /// once this generation stopped accepting and the new one is confirmed (see
    /// [`Handover::accepting_stopped`]), or the rollback's reason.
    fn answer(
        &mut self,
        initiator: Initiator,
        handover: &Handover,
    ) -> impl Future<Output = ()> + Send {
        let new_pid = handover.new_pid();
        handover.answer_with_verdict(move |verdict| {
            initiator.respond_now(verdict.map(|()| new_pid));
        });
        std::future::ready(())
    }

    /// After a successful restart, while this generation no longer accepts: whether the new
    /// generation survives a probation of this long (`Err` is a rollback: this generation
    /// serves again). By default there is none.
    fn probation(
        &mut self,
        _probation: Duration,
    ) -> impl Future<Output = Result<(), RestartError>> + Send {
        std::future::ready(Ok(()))
    }
}
