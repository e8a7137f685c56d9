//! Messages to the service manager (`sd_notify(3)`) and its file descriptor store.
//!
//! Every message is sent only when `NOTIFY_SOCKET` is set; a failure to send is logged, never
//! fatal. The store keeps anything only when the unit sets `FileDescriptorStoreMax=`.
//!
//! What each systemd version understands, and what is sent for it:
//!
//! | message | since | sent |
//! |---|---|---|
//! | `READY=1`, `MAINPID=`, `STOPPING=1`, `STATUS=`, `FDSTORE=1` | always | as the lifecycle needs |
//! | `RELOADING=1` with `MONOTONIC_USEC=` | 253 (`Type=notify-reload`) | when a fork/exec restart begins, in one message |
//! | `MAINPIDFD=1` with a pidfd | 257 | by a successor naming itself, next to `MAINPID=` |
//!
//! An older systemd ignores a field it does not know, so every message is sent to every version.

use std::os::fd::{AsFd, BorrowedFd};

use sd_notify::NotifyState;

use crate::registry::Keeper;

/// Sends a notification to the service manager when `NOTIFY_SOCKET` is set; failures are
/// logged.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Whether a service manager is listening for notifications from this process.
pub(crate) fn notify_socket_set() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The message that starts a reload: `RELOADING=1` and `MONOTONIC_USEC=` (`CLOCK_MONOTONIC`
/// now, in microseconds), one datagram. systemd 253+ compares the timestamp with its own
/// `CLOCK_MONOTONIC` reading taken when it sent the reload signal, and ignores a `RELOADING=1`
/// without a timestamp at or after it. sd-notify 0.5 computes the timestamp right
/// (`tv_sec * 1_000_000 + tv_nsec / 1_000`; the mistake of sd-notify#11 was elsewhere) and sends
/// all the states of one call in one datagram.
pub(crate) fn reloading_states(status: &str) -> std::io::Result<[NotifyState<'_>; 3]> {
    Ok([
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now()?,
        NotifyState::Status(status),
    ])
}

/// Tells systemd a reload (a fork/exec restart) began now.
pub(crate) fn reloading(status: &str) {
    if !notify_socket_set() {
        return;
    }
    match reloading_states(status) {
        Ok(states) => notify(&states),
        Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
}

/// Ends a reload that did not hand over: `READY=1`, with why in `STATUS=`. Without it systemd
/// 253+ would keep the unit "reloading" (and `systemctl reload` waiting) for good.
pub(crate) fn reload_failed(reason: &str) {
    let status = format!("restart failed, still serving: {reason}").replace('\n', " ");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A successor's readiness: `READY=1` and `MAINPID=`, and, where a pidfd of this process can
/// be had, `MAINPIDFD=1` with it (systemd 257+ then follows this very process, whatever happens
/// to its PID; older ones ignore the field and close the descriptor). `extra` goes along.
pub(crate) fn ready_as_main_process(extra: &[NotifyState<'_>]) {
    let pid = std::process::id();
    let mut states = vec![NotifyState::Ready, NotifyState::MainPid(pid)];
    states.extend_from_slice(extra);
    match crate::inherit::pidfd_of_self() {
        Ok(pidfd) => {
            // MAINPIDFD=1 first, in its own message: systemd 257 takes the main process from
            // the pidfd; the next message's MAINPID= then names the same process (no change),
            // and READY=1 comes after it either way.
            let fd_states = [NotifyState::Custom("MAINPIDFD=1")];
            if let Err(e) = sd_notify::notify_with_fds(&fd_states, &[pidfd.as_fd()]) {
                tracing::debug!("cannot send MAINPIDFD=1: {e}");
            }
        }
        Err(e) => tracing::debug!("no pidfd of this process ({e}): MAINPID= only"),
    }
    notify(&states);
}

/// systemd's file descriptor store: `FDSTORE=1` to keep a descriptor under a name,
/// `FDSTOREREMOVE=1` to drop it.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn clock_monotonic_usec() -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the one we pass.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
            0
        );
        i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1_000
    }

    #[test]
    fn reloading_is_one_message_with_a_fresh_monotonic_timestamp_in_microseconds() {
        let before = clock_monotonic_usec();
        let states = reloading_states("restarting").unwrap();
        let after = clock_monotonic_usec();
        // What sd_notify::notify puts in its one datagram: each state on its own line.
        let message: String = states.iter().map(|s| format!("{s}\n")).collect();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let stamp: i128 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC= in the same message")
            .parse()
            .expect("a whole number of microseconds");
        // Microseconds of CLOCK_MONOTONIC: not nanoseconds, not milliseconds, not wall time.
        assert!(
            before <= stamp && stamp <= after,
            "{before} <= {stamp} <= {after}"
        );
        assert_eq!(lines[2], "STATUS=restarting");
    }
}
