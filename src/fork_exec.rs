//! The fork/exec lifecycle: the old process starts its successor, streams its state to it, and
//! waits until it is ready. If anything fails, the successor is killed and reaped and the old
//! process carries on as if nothing happened: its listeners were never closed.
//!
//! Under systemd each restart is a reload: `RELOADING=1` with `MONOTONIC_USEC=` when it begins
//! (what `Type=notify-reload` waits for after its `ReloadSignal=`), then `READY=1` with
//! `MAINPID=` (and `MAINPIDFD=1`) from the successor once it took over, or `READY=1` with the
//! reason in `STATUS=` from this process when it failed, so that the reload always ends.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use sd_notify::NotifyState;

use crate::control::{Attempt, AttemptOutcome, LifecycleKind};
use crate::inherit::{self, Mode, STATE_FD};
use crate::lifecycle::send_state;
use crate::notify::{notify, notify_socket_set, reload_failed, reloading};
use crate::outcome::{Handover, RestartError, SuccessorFailure};
use crate::successor::{Child, Launcher};
use crate::transport::{Context, Transport, Trigger};

/// The state pipe's capacity: one chunk of the state framing.
const STATE_PIPE_SIZE: libc::c_int = 1024 * 1024;

/// `STATUS=` while a restart runs.
const RELOADING_STATUS: &str = "restarting: starting the next generation";

/// How long a successor that stopped reading the state has to report why.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// The restart this process began last, for the status report (`shellflip await-restart`).
static LAST_ATTEMPT: Mutex<Option<Attempt>> = Mutex::new(None);

/// The restart this process began last, and how it stands.
pub(crate) fn last_attempt() -> Option<Attempt> {
    LAST_ATTEMPT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn record_attempt(update: impl FnOnce(&mut Option<Attempt>)) {
    update(&mut LAST_ATTEMPT.lock().unwrap_or_else(|p| p.into_inner()));
}

/// The fork/exec lifecycle, starting successors with `L`.
pub(crate) struct ForkExec<L: Launcher> {
    launcher: L,
    /// A successor that is ready, until it is confirmed (or rolled back), and when it was ready.
    ready: Option<(L::Child, Instant)>,
}

impl<L: Launcher> ForkExec<L> {
    pub(crate) fn new(launcher: L) -> ForkExec<L> {
        ForkExec {
            launcher,
            ready: None,
        }
    }
}

impl<L: Launcher> Transport for ForkExec<L> {
    const KIND: LifecycleKind = LifecycleKind::ForkExec;
    const RESTARTS_ON_SIGTERM: bool = false;

    async fn after_ready(&mut self) {}

    fn release(&mut self, _name: &str) {}

    async fn restart(
        &mut self,
        ctx: &mut Context,
        _trigger: Trigger,
    ) -> Result<Handover, RestartError> {
        record_attempt(|a| *a = Some(Attempt::begin()));
        reloading(RELOADING_STATUS);
        // A reload signal that reaches this process while the restart runs joins it (the loop
        // refuses it as "in progress"): systemd waits for a RELOADING=1 stamped after its
        // signal, so say it again. (Once our RELOADING=1 reached systemd the unit is
        // "reloading" and systemd holds a `systemctl reload` until it ends; the signal can only
        // cross it when both begin at the same moment.)
        let mut reload_signals = match notify_socket_set() {
            true => tokio::signal::unix::signal(ctx.config.restart_signal).ok(),
            false => None,
        };
        ctx.handler.pre_new_process().await;
        let result = {
            let work = self.start_and_confirm(ctx, Instant::now());
            tokio::pin!(work);
            loop {
                let joined = async {
                    match &mut reload_signals {
                        Some(signals) => signals.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut work => break r,
                    Some(()) = joined => {
                        tracing::info!("restart signal during the restart: the reload joins it");
                        reloading(RELOADING_STATUS);
                    }
                }
            }
        };
        let outcome = match &result {
            Ok(handover) => AttemptOutcome::HandedOver {
                pid: handover.new_pid(),
            },
            Err(e) => {
                // Ends the reload (systemd would wait for READY=1 for good) and says why.
                reload_failed(&e.to_string());
                AttemptOutcome::Failed {
                    reason: e.to_string(),
                }
            }
        };
        record_attempt(|a| {
            if let Some(a) = a {
                a.outcome = outcome;
            }
        });
        if result.is_err() {
            ctx.handler.new_process_failed().await;
        }
        result
    }

    /// Watches the ready successor for [`RestartConfig::probation`]: if it exits or reports
    /// itself unhealthy meanwhile, it is stopped (with its group), systemd's `MAINPID=` comes
    /// back here, and the restart is rolled back.
    ///
    /// [`RestartConfig::probation`]: crate::RestartConfig::probation
    async fn probation(&mut self, probation: Duration) -> Result<(), RestartError> {
        let Some((mut successor, ready_at)) = self.ready.take() else {
            return Ok(());
        };
        let pid = successor.pid();
        let verdict = match probation {
            p if p.is_zero() => Ok(()),
            p => successor.watch_probation(p).await,
        };
        match verdict {
            Ok(()) => {
                successor.confirm();
                successor.reap_in_background();
                Ok(())
            }
            Err(failure) => {
                let after_ready = ready_at.elapsed();
                tracing::warn!(
                    pid,
                    ?after_ready,
                    "restart rolled back: the new process {failure}"
                );
                notify(&[NotifyState::MainPid(std::process::id())]);
                Err(RestartError::RolledBack {
                    pid,
                    failure,
                    after_ready,
                })
            }
        }
    }
}

impl<L: Launcher> ForkExec<L> {
    async fn start_and_confirm(
        &mut self,
        ctx: &mut Context,
        started: Instant,
    ) -> Result<Handover, RestartError> {
        let timeout = ctx.config.startup_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // Tokio makes our end non-blocking; the successor's end is its own open file description.
        let (state_r, state_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| RestartError::os("creating the state pipe", e))?;
        // A larger pipe means fewer wake-ups per MiB of state (best effort: the system's
        // pipe-max-size may refuse it, and then the default is as correct, only slower).
        let _ = nix::fcntl::fcntl(
            &state_w,
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(STATE_PIPE_SIZE),
        );
        let mut successor = self
            .launcher
            .launch(Mode::Serve, vec![(STATE_FD.to_owned(), state_r)])
            .await
            .map_err(|e| RestartError::Spawn(Arc::new(e)))?;
        let pid = successor.pid();
        tracing::info!(pid, elapsed = ?started.elapsed(), "restart: successor spawned");
        let failed = |failure| RestartError::Successor { pid, failure };

        let sink = tokio::net::unix::pipe::Sender::from_owned_fd(state_w)
            .map_err(|e| RestartError::os("registering the state pipe", e))?;
        let sent = tokio::select! {
            r = send_state(&mut *ctx.handler, sink, inherit::generation()) => r,
            _ = tokio::time::sleep_until(deadline) => {
                successor.kill_and_reap().await;
                return Err(failed(SuccessorFailure::NotReady(timeout)));
            }
        };
        if let Err(failure) = sent {
            if failure.reader_gone {
                // The successor closed its end: most likely it failed or exited, and its own
                // report (a reason, an exit status, a signal) says why better than EPIPE.
                match successor.wait_ready(REPORT_WAIT).await {
                    Err(
                        why @ (SuccessorFailure::Exited(_) | SuccessorFailure::Reported { .. }),
                    ) => {
                        return Err(failed(why));
                    }
                    // It declared itself ready without reading the whole state (it closes an
                    // unread state at readiness): its choice, and it may be serving already.
                    Ok(()) => {
                        tracing::warn!(
                            pid,
                            "restart: the successor is ready without reading the whole state"
                        );
                        return Ok(self.succeeded(successor, started));
                    }
                    Err(_) => {}
                }
            }
            let status = successor.kill_and_reap().await;
            tracing::warn!(
                pid,
                "restart: sending the state failed ({}); successor {status}",
                failure.why
            );
            return Err(RestartError::StateSend(Arc::new(failure.why)));
        }
        tracing::info!(pid, elapsed = ?started.elapsed(), "restart: state sent");

        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match successor.wait_ready(remaining).await {
            Ok(()) => Ok(self.succeeded(successor, started)),
            // Report the whole start-up timeout, not what was left of it.
            Err(SuccessorFailure::NotReady(_)) => Err(failed(SuccessorFailure::NotReady(timeout))),
            Err(other) => Err(failed(other)),
        }
    }

    /// The successor is ready: it is systemd's main process now, and on probation until
    /// [`probation`](Transport::probation) confirms it.
    fn succeeded(&mut self, successor: L::Child, started: Instant) -> Handover {
        let pid = successor.pid();
        tracing::info!(pid, elapsed = ?started.elapsed(), "restart: successor ready");
        // The successor said READY=1 with MAINPID= (and MAINPIDFD=1) itself, before it told
        // us, which ended the reload. MAINPID= again, for a successor that does not say it;
        // not READY=1, which could end the next reload early if this message were late.
        notify(&[NotifyState::MainPid(pid)]);
        self.ready = Some((successor, Instant::now()));
        Handover::new(Some(pid), 0)
    }
}
