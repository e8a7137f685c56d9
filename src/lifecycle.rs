//! The application's side of a restart: hooks in the old process, the state stream in the new.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::io::AsyncWrite;

use crate::inherit::{self, STATE_FD};
use crate::state::{self, StateError, StateReader, StateWriter};

/// The name shellflip 2.x gave the [`StateReader`].
pub type PipeReader = StateReader;
/// The name shellflip 2.x gave the [`StateWriter`].
pub type PipeWriter = StateWriter;

/// Hooks called in the old process during a restart, in both lifecycles.
///
/// Implement it with [`async_trait`](macro@crate::async_trait), re-exported by this crate:
///
/// ```
/// use shellflip::{LifecycleHandler, StateWriter};
/// use tokio::io::AsyncWriteExt;
///
/// struct Counter(u64);
///
/// #[shellflip::async_trait]
/// impl LifecycleHandler for Counter {
///     async fn send_to_new_process(&mut self, mut state: StateWriter) -> std::io::Result<()> {
///         state.write_u64(self.0).await
///     }
/// }
/// ```
#[async_trait]
pub trait LifecycleHandler: Send {
    /// Writes the state the new process will read with [`receive_from_old_process`].
    ///
    /// The bytes are framed and checksummed by the library, and committed only after this
    /// returns `Ok`: if it returns an error, the new process never sees a complete state, the
    /// restart fails with this error's text and the old process keeps serving (fork/exec), or
    /// the state is discarded (systemd).
    ///
    /// The state is a snapshot taken now: what the application changes after writing it (a
    /// counter it increments while it drains) does not reach the new generation. Carry such
    /// changes in another way (the new generation's own count, a shared store), or stop
    /// changing them once this is called.
    async fn send_to_new_process(&mut self, _write_pipe: StateWriter) -> io::Result<()> {
        Ok(())
    }

    /// Called before the new process is started (fork/exec) or before the state is written
    /// (systemd).
    async fn pre_new_process(&mut self) {}

    /// Called when the restart failed after [`send_to_new_process`](Self::send_to_new_process)
    /// or [`pre_new_process`](Self::pre_new_process): undo what they changed. The old process
    /// carries on serving.
    async fn new_process_failed(&mut self) {}
}

/// A [`LifecycleHandler`] that does nothing: no state crosses.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullLifecycleHandler;

impl LifecycleHandler for NullLifecycleHandler {}

/// What happened to the state at start-up, for the status report.
static STATE_ON_START: Mutex<Option<String>> = Mutex::new(None);

pub(crate) fn state_on_start() -> String {
    STATE_ON_START
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| "none".into())
}

fn note(text: String) {
    *STATE_ON_START.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
}

/// The state the previous generation wrote, or `None` when there is none.
///
/// A state that cannot be used (torn by a process killed while writing it, damaged, written by
/// something else) is reported through `tracing` and treated as no state: the service starts
/// without it. Use [`try_receive_from_old_process`] to refuse to start instead.
///
/// Read the state completely before declaring readiness: a truncated stream ends in an error,
/// never in a clean end of file. Must be called from within a tokio runtime.
pub fn receive_from_old_process() -> Option<StateReader> {
    match try_receive_from_old_process() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("starting without the previous generation's state: {e}");
            None
        }
    }
}

/// Like [`receive_from_old_process`], but a state that exists and cannot be used is an error.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// match shellflip::try_receive_from_old_process() {
///     Ok(Some(_state)) => println!("restarted; reading the state"),
///     Ok(None) => println!("fresh start"),
///     Err(e) => eprintln!("refusing to start: {e}"),
/// }
/// # }
/// ```
pub fn try_receive_from_old_process() -> Result<Option<StateReader>, StateError> {
    receive(None)
}

/// Like [`try_receive_from_old_process`], but a state that waited in systemd's file descriptor
/// store for longer than `max_age` is discarded: the service starts without it, and its status
/// says so (`state on start: discarded: ...`).
///
/// A restart leaves a state a few milliseconds old. One that is older was kept across a
/// `systemctl stop` and `start` (`FileDescriptorStorePreserve=yes`, systemd 254+) or a
/// soft-reboot, and describes the service as it was when it stopped. shellflip's own policy is
/// to resume from it ([`receive_from_old_process`]: the status shows its generation and age);
/// call this instead when a state that old should not be resumed. A state from a parent
/// generation (fork/exec) is streamed, never old, and always received.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// match shellflip::try_receive_from_old_process_within(Duration::from_secs(60)) {
///     Ok(Some(_state)) => println!("restarted (or stopped less than a minute ago)"),
///     Ok(None) => println!("fresh start, or a state too old to resume"),
///     Err(e) => eprintln!("refusing to start: {e}"),
/// }
/// # }
/// ```
pub fn try_receive_from_old_process_within(
    max_age: std::time::Duration,
) -> Result<Option<StateReader>, StateError> {
    receive(Some(max_age))
}

fn receive(max_age: Option<std::time::Duration>) -> Result<Option<StateReader>, StateError> {
    let fd = match inherit::take(STATE_FD) {
        Ok(Some(fd)) => fd,
        Ok(None) => return Ok(None),
        Err(e) => return Err(StateError::Inherit(e)),
    };
    let result = open_state(fd, max_age);
    match &result {
        Ok(Some(_)) => {}
        Ok(None) => {
            if STATE_ON_START
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
            {
                note("no state was left by the previous generation".into());
            }
        }
        Err(e) => note(format!("unusable: {e}")),
    }
    result
}

/// How long ago a stored state was written: the memfd's modification time.
fn stored_age(meta: &std::fs::Metadata) -> Option<std::time::Duration> {
    let written = meta.modified().ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(written)
            .unwrap_or_default(),
    )
}

/// "written 1.2 s before this start" / "kept by systemd for 3 min 20 s": for the status.
fn describe_age(age: std::time::Duration) -> String {
    let secs = age.as_secs_f64();
    if secs < 60.0 {
        format!("written {secs:.1} s before this start")
    } else if secs < 3600.0 {
        format!(
            "written {:.0} min {:.0} s before this start",
            (secs / 60.0).floor(),
            secs % 60.0
        )
    } else {
        format!("written {:.1} h before this start", secs / 3600.0)
    }
}

fn open_state(
    fd: OwnedFd,
    max_age: Option<std::time::Duration>,
) -> Result<Option<StateReader>, StateError> {
    let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
    if meta.file_type().is_file() {
        // A stored state (memfd): verify it whole before handing out a byte.
        let mut file = std::fs::File::from(fd);
        let Some(header) = state::verify_file(&mut file)? else {
            return Ok(None);
        };
        let age = stored_age(&meta);
        let age_text = age
            .map(describe_age)
            .unwrap_or_else(|| "of unknown age".into());
        if let (Some(age), Some(max)) = (age, max_age) {
            if age > max {
                // Started fresh: generation 0, as if no state had been kept.
                let text = format!(
                    "discarded: the state of generation {} was {age_text}, longer than the \
                     {:.1} s allowed (kept by systemd's store across a stop?)",
                    header.generation,
                    max.as_secs_f64()
                );
                tracing::warn!("{text}");
                note(text);
                return Ok(None);
            }
        }
        let generation = header.generation.saturating_add(1);
        inherit::set_generation(generation);
        tracing::info!(
            "resuming from the state of generation {}, {age_text}",
            header.generation
        );
        note(format!(
            "received from generation {}, {age_text}",
            header.generation
        ));
        return Ok(Some(state::read_stream(tokio::fs::File::from_std(file))));
    }
    // A pipe from the parent: verified chunk by chunk as it streams.
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    note("streamed from the parent generation".into());
    Ok(Some(state::read_stream(pipe)))
}

/// Why the state could not be sent.
#[derive(Debug)]
pub(crate) struct SendFailure {
    /// The handler's own error, or why the commit failed.
    pub(crate) why: io::Error,
    /// Whether the reader went away (a write to the pipe failed), rather than the handler
    /// failing on its own: then the successor's own report says more.
    pub(crate) reader_gone: bool,
}

/// Runs the handler's state writer over `sink` and commits the state when it succeeded.
pub(crate) async fn send_state(
    handler: &mut dyn LifecycleHandler,
    sink: impl AsyncWrite + Send + 'static,
    generation: u64,
) -> Result<(), SendFailure> {
    let writer = state::StateWriter::new(sink, generation);
    let sent = match handler.send_to_new_process(writer.clone()).await {
        Ok(()) => writer
            .commit()
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot commit the state: {e}"))),
        Err(e) => Err(e),
    };
    sent.map_err(|why| SendFailure {
        why,
        reader_gone: writer.sink_failed(),
    })
}
