//! systemd: notification messages, the file descriptor store, and the systemd lifecycle's
//! restart (state into a stored memfd, validation run, exit).
//!
//! See `sd_notify(3)` for `FDSTORE=1`, `FDNAME=`, `FDSTOREREMOVE=1`, `STOPPING=1` and
//! `EXTEND_TIMEOUT_USEC=`; the unit needs `FileDescriptorStoreMax=` for the store to keep
//! anything.

use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::control::RestartCoordinationSocket;
use crate::inherit::Mode;
use crate::lifecycle::{STATE_FD, send_state};
use crate::registry::{Keeper, Registry};
use crate::restart::{Context, Handover, RestartError};
use crate::successor::{Successor, reopen_readonly};

/// Name under which a control-socket initiator waits in the store for the new generation.
const INITIATOR_FD: &str = "shellflip.initiator";
/// How often `EXTEND_TIMEOUT_USEC=` is sent while the state is written, and by how much.
const EXTEND_EVERY: Duration = Duration::from_secs(1);
const EXTEND_BY: Duration = Duration::from_secs(5);

/// Sends a notification to systemd when `NOTIFY_SOCKET` is set; failures are logged.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Whether systemd is listening for notifications from this process.
pub(crate) fn notify_socket_set() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// systemd's file descriptor store.
pub(crate) struct Store;

impl Keeper for Store {
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) {
        let states = [NotifyState::FdStore, NotifyState::FdName(name)];
        match sd_notify::notify_with_fds(&states, &[fd]) {
            Ok(()) => tracing::debug!(name, "stored in systemd's file descriptor store"),
            Err(e) => tracing::error!(name, "cannot store in systemd's file descriptor store: {e}"),
        }
    }

    fn discard(&self, name: &str) {
        notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
}

/// Says plainly at start-up whether the store can keep anything.
fn check_store_enabled() {
    match std::env::var("FDSTORE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(0) => tracing::error!(
            "systemd's file descriptor store is disabled for this unit (FDSTORE=0): set \
             FileDescriptorStoreMax= in the unit, or listeners and state will not survive a restart"
        ),
        Some(n) => tracing::info!("systemd's file descriptor store holds up to {n} descriptors"),
        // Before 254 systemd does not say; but a previous generation's entries came back.
        None if crate::inherit::origin() == crate::inherit::Origin::Systemd => {
            tracing::debug!(
                "systemd's file descriptor store handed back the previous generation's descriptors"
            )
        }
        None => tracing::warn!(
            "this systemd (before 254) does not tell whether its file descriptor store is \
             enabled: make sure the unit sets FileDescriptorStoreMax=, or listeners and state \
             will not survive a restart"
        ),
    }
}

/// The systemd lifecycle's own resources.
pub(crate) struct SystemdStore {
    /// The memfd the state is written into; it is in the store under [`STATE_FD`].
    memfd: std::fs::File,
}

impl SystemdStore {
    /// Start-up: stores the registry's new descriptors and a fresh state memfd.
    pub(crate) fn start(registry: &Registry) -> Result<SystemdStore, RestartError> {
        if !notify_socket_set() {
            return Err(RestartError::NotUnderSystemd);
        }
        check_store_enabled();
        let memfd = crate::state::create_memfd().map_err(RestartError::Io)?;
        // The previous state memfd (if any) was read already; replace it by an empty one, so
        // that a crash of this generation never hands the old state to the next one.
        Store.discard(STATE_FD);
        Store.keep(STATE_FD, memfd.as_fd());
        registry.attach_keeper(std::sync::Arc::new(Store));
        Ok(SystemdStore { memfd })
    }

    /// After `READY=1`: answers the initiator of the restart that started this process, and
    /// drops store entries that this generation did not take.
    pub(crate) async fn after_ready(&self, unclaimed: Vec<String>) {
        if let Ok(Some(fd)) = Registry::adopt_internal(INITIATOR_FD) {
            Store.discard(INITIATOR_FD);
            answer_stored_initiator(fd).await;
        }
        // The initiator was answered above; the state entry in the store is already this
        // generation's new memfd.
        for name in unclaimed.into_iter().filter(|n| n != INITIATOR_FD) {
            if name != STATE_FD {
                tracing::info!(
                    name,
                    "dropping a stored descriptor this generation did not take"
                );
                Store.discard(&name);
            }
            let _ = Registry::adopt_internal(&name);
        }
    }

    /// One restart in the systemd lifecycle. `validate` is true for a control-socket or
    /// restart-signal trigger (B6), false for SIGTERM (systemd is stopping us anyway).
    pub(crate) async fn restart(
        &mut self,
        ctx: &mut Context,
        validate: bool,
    ) -> Result<Handover, RestartError> {
        ctx.handler.pre_new_process().await;
        if !validate {
            notify(&[NotifyState::Stopping]);
        }
        let started = std::time::Instant::now();
        let written = self.write_state(ctx).await;
        tracing::info!(elapsed = ?started.elapsed(), ok = written.is_ok(), "state written to the store");
        if let Err(why) = written {
            self.discard_state();
            if validate {
                ctx.handler.new_process_failed().await;
                return Err(RestartError::StateSend(why));
            }
            tracing::error!("stopping without state: {why}");
        }
        if !validate {
            return Ok(Handover {
                new_pid: None,
                exit_code: 0,
            });
        }
        if let Err(e) = self.validate(ctx).await {
            self.discard_state();
            ctx.handler.new_process_failed().await;
            return Err(e);
        }
        notify(&[NotifyState::Stopping]);
        Ok(Handover {
            new_pid: None,
            exit_code: ctx.config.systemd_restart_exit_code,
        })
    }

    fn discard_state(&mut self) {
        if let Err(e) = self.memfd.set_len(0) {
            tracing::error!("cannot discard the state: {e}");
        }
    }

    async fn write_state(&mut self, ctx: &mut Context) -> Result<(), String> {
        self.memfd.set_len(0).map_err(|e| e.to_string())?;
        self.memfd
            .seek(SeekFrom::Start(0))
            .map_err(|e| e.to_string())?;
        let file = self.memfd.try_clone().map_err(|e| e.to_string())?;
        let sink = tokio::fs::File::from_std(file);
        let send = send_state(&mut *ctx.handler, sink, crate::inherit::generation());
        tokio::pin!(send);
        let mut tick = tokio::time::interval(EXTEND_EVERY);
        let extend = format!("EXTEND_TIMEOUT_USEC={}", EXTEND_BY.as_micros());
        loop {
            tokio::select! {
                r = &mut send => return r.map_err(|failure| failure.why),
                _ = tick.tick() => notify(&[NotifyState::Custom(&extend)]),
            }
        }
    }

    /// Runs the new executable against the written state; Ok when it accepted it.
    async fn validate(&mut self, ctx: &mut Context) -> Result<(), RestartError> {
        let copy = reopen_readonly(self.memfd.as_fd()).map_err(RestartError::Io)?;
        let mut successor = Successor::start(
            &ctx.spawner,
            ctx.program.clone(),
            &ctx.config.environment,
            &ctx.config.registry,
            vec![(STATE_FD.to_owned(), copy)],
            Mode::Validate,
        )
        .await
        .map_err(RestartError::Spawn)?;
        let pid = successor.pid.as_raw() as u32;
        let verdict = successor.wait_ready(ctx.config.startup_timeout).await;
        let _ = successor.kill_and_reap().await;
        verdict.map_err(|why| {
            RestartError::Rejected(RestartError::from_not_ready(pid, why).to_string())
        })
    }
}

/// Keeps the initiator's connection in the store, for the new generation to answer.
pub(crate) fn store_initiator(socket: RestartCoordinationSocket) {
    let stream = socket.into_inner();
    match stream.into_std() {
        Ok(s) => {
            let fd: OwnedFd = s.into();
            Store.keep(INITIATOR_FD, fd.as_fd());
        }
        Err(e) => tracing::warn!("cannot keep the restart's initiator: {e}"),
    }
}

async fn answer_stored_initiator(fd: OwnedFd) {
    let std = std::os::unix::net::UnixStream::from(fd);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(stream) = tokio::net::UnixStream::from_std(std) else {
        return;
    };
    let initiator = crate::control::Initiator::Socket(RestartCoordinationSocket::new(stream));
    initiator.respond(Ok(Some(std::process::id()))).await;
}
