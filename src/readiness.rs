//! Declaring readiness (or failure) at start-up, to the parent generation and to systemd.

use std::fmt::Display;
use std::io;
use std::sync::OnceLock;

use tokio::sync::watch;

use crate::inherit::{self, Origin};
use crate::successor::tell_parent;
use crate::systemd;

fn ready_flag() -> &'static watch::Sender<bool> {
    static READY: OnceLock<watch::Sender<bool>> = OnceLock::new();
    READY.get_or_init(|| watch::channel(false).0)
}

/// Whether this process declared itself ready.
pub(crate) fn is_ready() -> bool {
    *ready_flag().borrow()
}

/// Resolves once this process declared itself ready.
pub(crate) async fn ready() {
    let mut rx = ready_flag().subscribe();
    let _ = rx.wait_for(|r| *r).await;
}

/// Declares that this process has taken over: the parent generation (fork/exec) learns that it
/// may stop accepting and drain, and systemd gets `READY=1` (with `MAINPID=` when the process
/// was started by its parent generation).
///
/// The restart task calls it the first time it is polled; call it yourself to declare
/// readiness earlier or at a point of your choosing. Calling it again does nothing.
///
/// In a validation run ([`is_validation_run`](crate::is_validation_run)), it reports that the
/// state was accepted and **exits the process** with status 0.
///
/// # Examples
///
/// ```
/// // After the listeners are adopted and the state was read:
/// shellflip::startup_complete()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn startup_complete() -> io::Result<()> {
    if is_ready() {
        return Ok(());
    }
    if inherit::is_validation_run() {
        let told = tell_parent(b"R\n");
        std::process::exit(if matches!(told, Ok(true)) { 0 } else { 1 });
    }
    let told = tell_parent(b"R\n");
    let mut states = vec![sd_notify::NotifyState::Ready];
    let pid = std::process::id();
    if inherit::origin() == Origin::Parent {
        states.push(sd_notify::NotifyState::MainPid(pid));
    }
    systemd::notify(&states);
    ready_flag().send_replace(true);
    tracing::info!(pid, generation = inherit::generation(), "ready");
    told.map(drop)
}

/// Reports that start-up failed, with `reason`, to the generation that started this process:
/// the restart fails with this reason and the old generation keeps serving. Exit afterwards.
///
/// # Examples
///
/// ```
/// let config: Result<u32, String> = Err("line 3: expected a number".into());
/// if let Err(e) = &config {
///     shellflip::report_startup_failure(format!("bad configuration: {e}"));
///     // std::process::exit(1);
/// }
/// ```
pub fn report_startup_failure(reason: impl Display) {
    let reason = reason.to_string().replace('\n', " ");
    tracing::error!("start-up failed: {reason}");
    let _ = tell_parent(format!("F{reason}\n").as_bytes());
    systemd::notify(&[sd_notify::NotifyState::Status(&format!(
        "start-up failed: {reason}"
    ))]);
}
