//! The systemd lifecycle: systemd stops the old process and starts the new one, while the
//! listeners, the state (in a memfd) and chosen connections wait in its file descriptor store.
//! A requested restart is validated first: the new executable must accept the written state.
//!
//! See `sd_notify(3)` for `FDSTORE=1`, `FDNAME=`, `FDSTOREREMOVE=1`, `STOPPING=1` and
//! `EXTEND_TIMEOUT_USEC=`; the unit needs `FileDescriptorStoreMax=` for the store to keep
//! anything.

use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::control::{Initiator, LifecycleKind, RestartCoordinationSocket};
use crate::inherit::{self, INITIATOR_FD, Mode, Origin, STATE_FD};
use crate::lifecycle::send_state;
use crate::notify::{Store, notify, notify_socket_set, remove, store_one};
use crate::outcome::{Handover, RestartError, SetupError};
use crate::registry::{Keeper, Registry};
use crate::successor::{Child, Launcher};
use crate::transport::{Context, Transport, Trigger};

/// How often `EXTEND_TIMEOUT_USEC=` is sent while the state is written, and by how much.
const EXTEND_EVERY: Duration = Duration::from_secs(1);
const EXTEND_BY: Duration = Duration::from_secs(5);

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
        None if inherit::origin() == Origin::Systemd => {
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

/// The systemd lifecycle, running validation runs with `L`.
pub(crate) struct Systemd<L> {
    launcher: L,
    /// The memfd the state is written into; it is in the store under [`STATE_FD`].
    memfd: std::fs::File,
    /// The registry's keeper: what the registry holds goes into systemd's store.
    store: Arc<Store>,
}

impl<L: Launcher> Systemd<L> {
    /// Start-up: stores the registry's new descriptors and a fresh state memfd.
    pub(crate) fn start(registry: &Registry, launcher: L) -> Result<Systemd<L>, SetupError> {
        if !notify_socket_set() {
            return Err(SetupError::NotUnderSystemd);
        }
        check_store_enabled();
        let memfd = crate::state::create_memfd().map_err(|source| SetupError::Os {
            what: "creating the state memfd",
            source,
        })?;
        // The bags of connections were read at start-up: drop them from the store, before this
        // generation stores bags of its own.
        inherit::report_bags();
        for name in inherit::drained_bags() {
            remove(&name);
        }
        let store = Arc::new(Store::new());
        store.take_over(inherit::take_new_bags());
        // The previous state memfd (if any) was read already; replace it by an empty one, so
        // that a crash of this generation never hands the old state to the next one.
        remove(STATE_FD);
        store_one(STATE_FD, memfd.as_fd(), true);
        registry.attach_keeper(store.clone());
        Ok(Systemd {
            launcher,
            memfd,
            store,
        })
    }

    /// The lifecycle without a service manager, for the restart loop's unit tests.
    #[cfg(test)]
    pub(crate) fn detached(launcher: L) -> Systemd<L> {
        let memfd = crate::state::create_memfd().expect("memfd");
        Systemd {
            launcher,
            memfd,
            store: Arc::new(Store::new()),
        }
    }
}

impl<L: Launcher> Transport for Systemd<L> {
    const KIND: LifecycleKind = LifecycleKind::Systemd;
    const RESTARTS_ON_SIGTERM: bool = true;

    /// Settles the store (the connections found closed or not taken leave their bags, each bag
    /// read once), and answers the initiator of the restart that started this process.
    async fn after_ready(&mut self) {
        let unclaimed: Vec<String> = inherit::unclaimed()
            .into_iter()
            .filter(|name| inherit::came_from_bag(name))
            .collect();
        self.store.settle(&unclaimed);
        if let Ok(Some(fd)) = inherit::take(INITIATOR_FD) {
            remove(INITIATOR_FD);
            answer_stored_initiator(fd).await;
        }
    }

    /// Drops a store entry this generation did not take (the state entry in the store is
    /// already this generation's new memfd; a connection from a bag left it in `after_ready`).
    fn release(&mut self, name: &str) {
        if name != STATE_FD && !inherit::came_from_bag(name) {
            self.store.discard(name);
        }
    }

    /// A requested restart (control socket, restart signal) is validated first (B6); a stop
    /// (SIGTERM) only writes the state, since systemd is stopping us anyway.
    async fn restart(
        &mut self,
        ctx: &mut Context,
        trigger: Trigger,
    ) -> Result<Handover, RestartError> {
        let validate = trigger == Trigger::Request;
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
                return Err(RestartError::StateSend(Arc::new(why)));
            }
            tracing::error!("stopping without state: {why}");
        }
        if !validate {
            return Ok(Handover::new(None, 0));
        }
        if let Err(e) = self.validate(ctx.config.startup_timeout).await {
            self.discard_state();
            ctx.handler.new_process_failed().await;
            return Err(e);
        }
        notify(&[NotifyState::Stopping]);
        Ok(Handover::new(None, ctx.config.systemd_restart_exit_code))
    }

    /// A control-socket initiator waits in the store for the new generation's answer, which
    /// comes once that generation is ready: after this one stopped accepting.
    async fn answer(&mut self, initiator: Initiator, _handover: &Handover) {
        match initiator {
            Initiator::Socket(socket) => store_initiator(socket),
            other => other.respond(Ok(None)).await,
        }
    }
}

impl<L: Launcher> Systemd<L> {
    fn discard_state(&mut self) {
        if let Err(e) = self.memfd.set_len(0) {
            tracing::error!("cannot discard the state: {e}");
        }
    }

    async fn write_state(&mut self, ctx: &mut Context) -> std::io::Result<()> {
        self.memfd.set_len(0)?;
        self.memfd.seek(SeekFrom::Start(0))?;
        let file = self.memfd.try_clone()?;
        let sink = tokio::fs::File::from_std(file);
        let send = send_state(&mut *ctx.handler, sink, inherit::generation());
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
    async fn validate(&mut self, timeout: Duration) -> Result<(), RestartError> {
        let copy = reopen_readonly(self.memfd.as_fd())
            .map_err(|e| RestartError::os("reopening the state for the validation run", e))?;
        let mut run = self
            .launcher
            .launch(Mode::Validate, vec![(STATE_FD.to_owned(), copy)])
            .await
            .map_err(|e| RestartError::Spawn(Arc::new(e)))?;
        let pid = run.pid();
        // The timeout is the start-up timeout of a real start: the run reads the whole state.
        let verdict = run.wait_ready(timeout).await;
        let _ = run.kill_and_reap().await;
        verdict.map_err(|failure| RestartError::Rejected { pid, failure })
    }
}

/// Makes `fd` a readable descriptor of its own (a new open file description with its own
/// offset), for handing a memfd to a validation run without sharing our write offset.
fn reopen_readonly(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let f = std::fs::OpenOptions::new().read(true).open(path)?;
    Ok(f.into())
}

/// Keeps the initiator's connection in the store, for the new generation to answer.
fn store_initiator(socket: RestartCoordinationSocket) {
    let stream = socket.into_inner();
    match stream.into_std() {
        Ok(s) => {
            let fd: OwnedFd = s.into();
            store_one(INITIATOR_FD, fd.as_fd(), true);
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
    let initiator = Initiator::Socket(RestartCoordinationSocket::new(stream));
    initiator.respond(Ok(Some(std::process::id()))).await;
}
