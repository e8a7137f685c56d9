//! Declaring readiness (or failure) at start-up, to the parent generation and to systemd.

use std::fmt::Display;
use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};

use tokio::sync::watch;

use crate::inherit::{self, Origin, READY_FD, ReadyLine};
use crate::notify::{notify, ready_as_main_process};

fn ready_flag() -> &'static watch::Sender<bool> {
    static READY: OnceLock<watch::Sender<bool>> = OnceLock::new();
    READY.get_or_init(|| watch::channel(false).0)
}

/// Whether this process declared itself ready.
pub(crate) fn is_ready() -> bool {
    *ready_flag().borrow()
}

/// Follows whether this process declared itself ready.
pub(crate) fn subscribe() -> watch::Receiver<bool> {
    ready_flag().subscribe()
}

/// The readiness pipe, kept after `R` while this generation is on probation, for
/// [`report_unhealthy`].
static PARENT: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Tells the parent generation (if any) `line` on the readiness pipe, which is taken out of the
/// inherited set. After `R` it is kept until this generation is confirmed; after `F` it is
/// closed. Returns false when there is no parent waiting.
fn tell_parent(line: ReadyLine) -> io::Result<bool> {
    let mut parent = PARENT.lock().unwrap_or_else(|p| p.into_inner());
    let mut pipe = match parent.take() {
        Some(pipe) => pipe,
        None => match inherit::take(READY_FD).map_err(io::Error::other)? {
            Some(fd) => std::fs::File::from(fd),
            None => return Ok(false),
        },
    };
    pipe.write_all(&line.encode())?;
    if line == ReadyLine::Ready {
        *parent = Some(pipe);
    }
    Ok(true)
}

/// This generation was confirmed (or never on probation): the readiness pipe is closed.
pub(crate) fn confirmed() {
    PARENT.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// During this generation's probation
/// ([`RestartConfig::probation`](crate::RestartConfig::probation), set in the generation that
/// started this one), reports that it is unhealthy: the previous generation resumes serving and
/// stops this one. Returns false when there is nobody to tell (no probation runs).
///
/// # Examples
///
/// ```
/// let database_reachable = true;
/// if !database_reachable {
///     shellflip::report_unhealthy("cannot reach the database");
/// }
/// ```
pub fn report_unhealthy(reason: impl Display) -> bool {
    let reason = reason.to_string();
    tracing::error!("reporting this generation unhealthy: {reason}");
    let mut parent = PARENT.lock().unwrap_or_else(|p| p.into_inner());
    match parent.take() {
        Some(mut pipe) => pipe.write_all(&ReadyLine::Failed(reason).encode()).is_ok(),
        None => false,
    }
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
        let code = match tell_parent(ReadyLine::Ready) {
            Ok(true) => 0,
            Ok(false) => {
                eprintln!(
                    "shellflip: validation run (SHELLFLIP_MODE=validate) without a parent \
                     generation waiting for its verdict: nothing to report to"
                );
                1
            }
            Err(e) => {
                eprintln!("shellflip: validation run: cannot report to the parent generation: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    if inherit::origin() == Origin::Parent {
        // From now on this process is the service, whatever happens to its parent.
        inherit::clear_parent_death_signal();
    }
    let pid = std::process::id();
    let status = format!("serving, generation {}", inherit::generation());
    if inherit::origin() == Origin::Parent {
        // The service's main process from now on: MAINPID= (and MAINPIDFD=1 with a pidfd,
        // systemd 257+) with READY=1, which also ends a reload (RELOADING=1) in progress.
        // Before the parent hears it: the parent then sends MAINPID= of this process too (for
        // a successor that does not say it), which must find the change made by the pidfd.
        ready_as_main_process(&[sd_notify::NotifyState::Status(&status)]);
    } else {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }
    let told = tell_parent(ReadyLine::Ready);
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
    let _ = tell_parent(ReadyLine::Failed(reason.clone()));
    notify(&[sd_notify::NotifyState::Status(&format!(
        "start-up failed: {reason}"
    ))]);
}
