//! The fork/exec handover: the old process starts its successor, streams its state to it, and
//! waits until it is ready. If anything fails, the successor is killed and reaped and the old
//! process carries on as if nothing happened: its listeners were never closed.

use std::os::fd::OwnedFd;
use std::time::Instant;

use nix::fcntl::OFlag;

use crate::inherit::{self, Mode};
use crate::lifecycle::{STATE_FD, send_state};
use crate::restart::{Context, Handover, RestartError};
use crate::successor::{NotReady, Successor};

/// The state pipe's capacity: one chunk of the state framing.
const STATE_PIPE_SIZE: libc::c_int = 1024 * 1024;

/// How long a successor that stopped reading the state has to report why.
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
use crate::systemd;

/// One restart in the fork/exec lifecycle.
pub(crate) async fn restart(ctx: &mut Context) -> Result<Handover, RestartError> {
    ctx.handler.pre_new_process().await;
    let started = Instant::now();
    let result = start_and_confirm(ctx, started).await;
    if result.is_err() {
        ctx.handler.new_process_failed().await;
    }
    result
}

async fn start_and_confirm(ctx: &mut Context, started: Instant) -> Result<Handover, RestartError> {
    let timeout = ctx.config.startup_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    // Tokio makes our end non-blocking; the successor's end is its own open file description.
    let (state_r, state_w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| RestartError::Spawn(e.into()))?;
    // A larger pipe means fewer wake-ups per MiB of state (best effort: the system's
    // pipe-max-size may refuse it, and then the default is as correct, only slower).
    let _ = nix::fcntl::fcntl(
        &state_w,
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(STATE_PIPE_SIZE),
    );
    let mut successor = Successor::start(
        &ctx.spawner,
        ctx.program.clone(),
        &ctx.config.environment,
        &ctx.config.registry,
        vec![(STATE_FD.to_owned(), state_r)],
        Mode::Serve,
    )
    .await
    .map_err(RestartError::Spawn)?;
    let pid = successor.pid.as_raw() as u32;
    tracing::info!(pid, elapsed = ?started.elapsed(), "restart: successor spawned");

    let sink = tokio::net::unix::pipe::Sender::from_owned_fd(state_w).map_err(RestartError::Io)?;
    let sent = tokio::select! {
        r = send_state(&mut *ctx.handler, sink, inherit::generation()) => r,
        _ = tokio::time::sleep_until(deadline) => {
            successor.kill_and_reap().await;
            return Err(RestartError::NotReady { pid, after: timeout });
        }
    };
    if let Err(failure) = sent {
        if failure.reader_gone {
            // The successor closed its end: most likely it failed or exited, and its own
            // report (a reason, an exit status, a signal) says why better than EPIPE.
            match successor.wait_ready(REPORT_WAIT).await {
                Err(why @ (NotReady::Exited(_) | NotReady::Failed { .. })) => {
                    return Err(RestartError::from_not_ready(pid, why));
                }
                // It declared itself ready without reading the whole state (it closes an
                // unread state at readiness): its choice, and it may be serving already.
                Ok(()) => {
                    tracing::warn!(
                        pid,
                        "restart: the successor is ready without reading the whole state"
                    );
                    return Ok(succeeded(successor, pid, started));
                }
                Err(NotReady::Timeout(_)) => {}
            }
        }
        let status = successor.kill_and_reap().await;
        tracing::warn!(
            pid,
            "restart: sending the state failed ({}); successor {status}",
            failure.why
        );
        return Err(RestartError::StateSend(failure.why));
    }
    tracing::info!(pid, elapsed = ?started.elapsed(), "restart: state sent");

    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Err(why) = successor.wait_ready(remaining).await {
        let why = match why {
            // Report the whole start-up timeout, not what was left of it.
            NotReady::Timeout(_) => NotReady::Timeout(timeout),
            other => other,
        };
        return Err(RestartError::from_not_ready(pid, why));
    }
    Ok(succeeded(successor, pid, started))
}

/// The successor is ready: it is systemd's main process now, and reaped whenever it exits.
fn succeeded(successor: Successor, pid: u32, started: Instant) -> Handover {
    tracing::info!(pid, elapsed = ?started.elapsed(), "restart: successor ready");
    systemd::notify(&[sd_notify::NotifyState::MainPid(pid)]);
    successor.reap_in_background();
    Handover {
        new_pid: Some(pid),
        exit_code: 0,
    }
}
