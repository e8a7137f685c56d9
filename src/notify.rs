//! Messages to the service manager (`sd_notify(3)`) and its file descriptor store.
//!
//! Every message is sent only when `NOTIFY_SOCKET` is set; a failure to send is logged, never
//! fatal. The store keeps anything only when the unit sets `FileDescriptorStoreMax=`.

use std::os::fd::BorrowedFd;

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
