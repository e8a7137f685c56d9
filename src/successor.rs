//! Starting a successor process and learning whether it took over: the seam between the
//! restart's decisions and the operating system.
//!
//! The lifecycles start successors through a [`Launcher`] and follow each through its
//! [`Child`]: its PID, whether it declared itself ready (or failed, or exited) within a timeout,
//! killing and reaping it. [`Spawner`] and [`Process`] are the real ones; the restart loop's unit
//! tests put scripted ones in their place, as tableflip's `env.go` does.
//!
//! The successor is started with `posix_spawn` (glibc uses `clone(CLONE_VM | CLONE_VFORK)`),
//! so starting it costs the same whatever memory the service holds: no page table is copied.
//! Its descriptors are placed at `3..3+n` by the spawn's file actions, so no descriptor is ever
//! made inheritable in this process, where another thread's `Command` could leak it.
//!
//! The successor answers on a readiness pipe with one [`ReadyLine`].

use std::ffi::{CString, OsString};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{FcntlArg, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::inherit::{self, CONFIRM_FD, FIRST_FD, MAX_REASON, Mode, READY_FD, ReadyLine};
use crate::outcome::{ExitStatus, ProbationFailure, SuccessorFailure};
use crate::registry::{Kind, Registry, classify};

/// Starts successors.
pub(crate) trait Launcher: Send + Sync + 'static {
    /// What follows one started successor.
    type Child: Child;

    /// Starts a successor in `mode`, handing it the registry's descriptors plus `extra`.
    fn launch(
        &self,
        mode: Mode,
        extra: Vec<(String, OwnedFd)>,
    ) -> impl Future<Output = io::Result<Self::Child>> + Send;
}

/// One started successor, until it took over or is gone.
pub(crate) trait Child: Send + 'static {
    /// Its PID.
    fn pid(&self) -> u32;

    /// Waits until it is ready, fails, exits, or `timeout` (from now) passes; in the last case
    /// it is killed and reaped.
    fn wait_ready(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), SuccessorFailure>> + Send;

    /// Kills it and reaps it: no zombie is left behind.
    fn kill_and_reap(&mut self) -> impl Future<Output = ExitStatus> + Send;

    /// After it is ready: waits `probation`, or until it exits or reports itself unhealthy.
    fn watch_probation(
        &mut self,
        probation: Duration,
    ) -> impl Future<Output = Result<(), ProbationFailure>> + Send;

    /// Tells it that it survived its probation: it is the service now.
    fn confirm(&mut self);

    /// After a successful handover: reaps it whenever it exits, so that a generation that
    /// outlives its successor (a long drain) never leaves a zombie.
    fn reap_in_background(self);
}

/// What to start.
pub(crate) struct SpawnRequest {
    pub(crate) program: PathBuf,
    pub(crate) argv: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Placed at `3..3+n` in the successor, in order.
    pub(crate) fds: Vec<OwnedFd>,
}

type Job = (SpawnRequest, oneshot::Sender<io::Result<Pid>>);

/// The real [`Launcher`]: a thread started up front that starts successors, so that starting
/// one keeps working after the service locked its other threads down (seccomp, dropped
/// capabilities).
pub(crate) struct Spawner {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    program: PathBuf,
    environment: Vec<(OsString, OsString)>,
    registry: Registry,
}

impl Spawner {
    /// Starts the thread; successors run `program` with this process's arguments, its
    /// environment plus `environment`, and `registry`'s descriptors.
    pub(crate) fn start(
        program: PathBuf,
        environment: Vec<(OsString, OsString)>,
        registry: Registry,
    ) -> io::Result<Spawner> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("shellflip-spawner".into())
            .spawn(move || {
                for (req, reply) in rx {
                    let _ = reply.send(spawn_now(req));
                }
            })?;
        Ok(Spawner {
            jobs: Mutex::new(tx),
            program,
            environment,
            registry,
        })
    }

    /// The registry's descriptors for a successor in `mode`, with their names, copied above
    /// the range the successor's descriptors will occupy (`more` of the library's own follow
    /// them), so that the spawner need not copy them again.
    fn registry_fds(&self, mode: Mode, more: usize) -> io::Result<(Vec<String>, Vec<OwnedFd>)> {
        self.registry.with_fds(|list| {
            // A validation run gets the listeners, never the connections: it must not read
            // from a client the serving generation is still talking to.
            let list: Vec<_> = list
                .iter()
                .filter(|(_, fd)| {
                    mode == Mode::Serve
                        || !matches!(classify(*fd), Kind::TcpStream | Kind::UnixStream)
                })
                .collect();
            let names: Vec<String> = list.iter().map(|(n, _)| (*n).to_owned()).collect();
            let min = FIRST_FD + (list.len() + more) as RawFd;
            let fds = list
                .iter()
                .map(|(_, fd)| {
                    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
                    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it.
                    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
                })
                .collect::<nix::Result<Vec<OwnedFd>>>()?;
            Ok((names, fds))
        })
    }

    async fn spawn(&self, req: SpawnRequest) -> io::Result<Pid> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((req, tx))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in argument or environment",
        )
    })
}

fn spawn_now(req: SpawnRequest) -> io::Result<Pid> {
    let n = req.fds.len() as RawFd;
    // Every descriptor must sit above the target range, so that placing one at 3+i never
    // overwrites another one still to be placed.
    let high: Vec<OwnedFd> = req
        .fds
        .into_iter()
        .map(|fd| dup_above(fd, FIRST_FD + n))
        .collect::<nix::Result<_>>()?;
    let mut actions = PosixSpawnFileActions::init()?;
    for (i, fd) in high.iter().enumerate() {
        // dup2 clears close-on-exec on the target: only these reach the successor.
        actions.add_dup2(fd.as_raw_fd(), FIRST_FD + i as RawFd)?;
    }
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
    )?;
    // Its own process group (numbered by its PID): a successor that fails is stopped together
    // with everything it started (a wrapper's children hold the listeners too).
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_sigmask(&SigSet::empty())?;
    let mut defaults = SigSet::all();
    defaults.remove(Signal::SIGKILL);
    defaults.remove(Signal::SIGSTOP);
    attr.set_sigdefault(&defaults)?;
    let program = cstring(req.program.as_os_str().as_bytes())?;
    let argv = req
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let env = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let pid = posix_spawn(program.as_c_str(), &actions, &attr, &argv, &env).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot start {}: {e}", req.program.display()),
        )
    })?;
    drop(high);
    Ok(pid)
}

/// `fd` itself when its number is at least `min`, else a close-on-exec copy that is.
fn dup_above(fd: OwnedFd, min: RawFd) -> nix::Result<OwnedFd> {
    if fd.as_raw_fd() >= min {
        return Ok(fd);
    }
    let raw = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// How a reaped process ended.
fn exit_status(status: &WaitStatus) -> ExitStatus {
    match status {
        WaitStatus::Exited(_, code) => ExitStatus::Code(*code),
        WaitStatus::Signaled(_, sig, _) => ExitStatus::Signal(*sig),
        _ => ExitStatus::Unknown,
    }
}

impl Launcher for Spawner {
    type Child = Process;

    async fn launch(&self, mode: Mode, extra_fds: Vec<(String, OwnedFd)>) -> io::Result<Process> {
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // The confirmation pipe: its write end stays here, for the end of the probation.
        let (confirm_r, confirm) = match mode {
            Mode::Serve => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                (Some(r), Some(w))
            }
            Mode::Validate => (None, None),
        };
        let mut own = extra_fds;
        own.push((READY_FD.into(), ready_w));
        own.extend(confirm_r.map(|fd| (CONFIRM_FD.to_owned(), fd)));
        let (mut names, mut fds) = self.registry_fds(mode, own.len())?;
        for (name, fd) in own {
            names.push(name);
            fds.push(fd);
        }
        let generation = inherit::generation().saturating_add(1);
        let env = inherit::successor_environment(&self.environment, &names, generation, mode);
        let mut argv: Vec<OsString> = std::env::args_os().collect();
        if argv.is_empty() {
            argv.push(self.program.clone().into_os_string());
        }
        let pid = self
            .spawn(SpawnRequest {
                program: self.program.clone(),
                argv,
                env,
                fds,
            })
            .await?;
        // The write end went to the spawner and is closed: only the successor holds it now.
        let pidfd = pidfd_open(pid)?;
        let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)?;
        Ok(Process {
            pid,
            // SAFETY: the OwnedFd owns the pidfd and keeps it open, unchanged, for as long as
            // the AsyncFd holds it.
            pidfd: unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?,
            ready,
            confirm,
            status: None,
            handed_over: false,
        })
    }
}

/// The real [`Child`]: a process followed through its pidfd and its readiness pipe.
///
/// It leads its own process group. Whenever it fails (and when it is dropped before it took
/// over: an abandoned restart), the whole group is killed, so that nothing it started keeps the
/// service's descriptors.
pub(crate) struct Process {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    ready: tokio::net::unix::pipe::Receiver,
    /// The write end of its confirmation pipe.
    confirm: Option<OwnedFd>,
    /// How it ended, once reaped.
    status: Option<ExitStatus>,
    /// Whether it took over (then it is the service, and nothing here may stop it).
    handed_over: bool,
}

impl Child for Process {
    fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), SuccessorFailure> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut line = Vec::new();
        let outcome = tokio::select! {
            biased;
            msg = read_line(&mut self.ready, &mut line) => msg,
            _ = self.pidfd.readable() => {
                // Exited. Take what it may have written just before.
                let _ = tokio::time::timeout(Duration::from_millis(50), read_line(&mut self.ready, &mut line)).await;
                false
            }
            _ = tokio::time::sleep_until(deadline) => {
                self.kill_and_reap().await;
                return Err(SuccessorFailure::NotReady(timeout));
            }
        };
        let _ = outcome;
        match ReadyLine::decode(&line) {
            Some(ReadyLine::Ready) => Ok(()),
            Some(ReadyLine::Failed(reason)) => {
                let status = self.exit_status_within(Duration::from_secs(5)).await;
                Err(SuccessorFailure::Reported { reason, status })
            }
            None => Err(SuccessorFailure::Exited(
                self.exit_status_within(Duration::from_secs(5)).await,
            )),
        }
    }

    async fn kill_and_reap(&mut self) -> ExitStatus {
        self.stop_group();
        self.reap().await
    }

    async fn watch_probation(&mut self, probation: Duration) -> Result<(), ProbationFailure> {
        let mut line = Vec::new();
        let mut ready_open = true;
        let deadline = tokio::time::sleep(probation);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                _ = self.pidfd.readable() => {
                    let status = self.kill_and_reap().await;
                    return Err(ProbationFailure::Exited(status));
                }
                more = read_line(&mut self.ready, &mut line), if ready_open => {
                    if let Some(ReadyLine::Failed(reason)) = ReadyLine::decode(&line) {
                        self.kill_and_reap().await;
                        return Err(ProbationFailure::Unhealthy(reason));
                    }
                    // End of file without a word: only its exit (above) says more.
                    ready_open = more;
                    line.clear();
                }
                _ = &mut deadline => return Ok(()),
            }
        }
    }

    fn confirm(&mut self) {
        if let Some(fd) = self.confirm.take() {
            let _ = nix::unistd::write(&fd, b"C\n");
        }
    }

    fn reap_in_background(mut self) {
        self.handed_over = true;
        tokio::spawn(async move {
            let status = self.reap().await;
            tracing::debug!(pid = self.pid.as_raw(), "successor {status}");
        });
    }
}

impl Process {
    /// The exit status of a successor that failed, waiting at most `limit` for the exit (then
    /// killing it); what it started is stopped with it.
    async fn exit_status_within(&mut self, limit: Duration) -> ExitStatus {
        if tokio::time::timeout(limit, self.pidfd.readable())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "a failed successor does not exit; killing it"
            );
        }
        self.kill_and_reap().await
    }

    /// Kills the successor's process group: the successor and everything it started that did
    /// not leave the group. The group's number cannot be reused while any member is alive, so
    /// this never reaches a stranger, even after the successor itself was reaped.
    fn stop_group(&self) {
        match killpg(self.pid, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(
                pid = self.pid.as_raw(),
                "cannot stop the successor's process group: {e}"
            ),
        }
    }

    async fn reap(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let _ = self.pidfd.readable().await;
        // Never a blocking wait on a runtime's thread: the pidfd is readable as soon as the
        // process exits, but it can take a moment more to become a zombie (longer while
        // another program reads its /proc entries).
        loop {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
            match waitid(Id::PIDFd(self.pidfd.get_ref().as_fd()), flags) {
                Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(1)).await,
                Ok(status) => {
                    let status = exit_status(&status);
                    self.status = Some(status);
                    return status;
                }
                Err(e) => {
                    tracing::warn!(pid = self.pid.as_raw(), "cannot read the exit status: {e}");
                    return ExitStatus::Unknown;
                }
            }
        }
    }
}

impl Drop for Process {
    /// A successor dropped before it took over belongs to a restart that was abandoned (the
    /// loop's task was cancelled): it is stopped with its group, and reaped by a thread.
    fn drop(&mut self) {
        if self.handed_over || self.status.is_some() {
            return;
        }
        tracing::warn!(
            pid = self.pid.as_raw(),
            "stopping the successor of an abandoned restart"
        );
        self.stop_group();
        let pid = self.pid;
        let _ = std::thread::Builder::new()
            .name("shellflip-reaper".into())
            .spawn(move || nix::sys::wait::waitpid(pid, None));
    }
}

/// Reads one line (at most [`MAX_REASON`] bytes) or until end of file.
async fn read_line(pipe: &mut tokio::net::unix::pipe::Receiver, line: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if line.contains(&b'\n') || line.len() >= MAX_REASON {
                    return true;
                }
            }
        }
    }
}

fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1; it touches no
    // memory of ours. The PID is our unreaped child, so it cannot have been reused.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor (pidfds are close-on-exec) that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Scripted successors for the restart loop's unit tests: no process is started.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncReadExt;

    use super::*;

    /// What a fake successor does.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Script {
        /// Reads the whole state, then declares itself ready.
        Ready,
        /// Exits with this status before it is ready, without reading the state.
        Exits(i32),
        /// Reports this start-up failure, then exits with status 1.
        Reports(String),
        /// Reads the state, then never answers.
        Hangs,
        /// Cannot be started at all.
        FailsToStart,
        /// Ready, then exits with this status this long after.
        DiesAfterReady(i32, Duration),
        /// Ready, then reports itself unhealthy this long after.
        UnhealthyAfterReady(String, Duration),
    }

    /// One successor the fake started, as the test sees it afterwards.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Launched {
        pub(crate) pid: u32,
        pub(crate) validation: bool,
        /// The state it read, verified, when it read one.
        pub(crate) state: Option<Vec<u8>>,
        pub(crate) killed: bool,
        pub(crate) reaped_in_background: bool,
        pub(crate) confirmed: bool,
    }

    #[derive(Default)]
    struct Inner {
        scripts: VecDeque<Script>,
        launched: Vec<Launched>,
    }

    /// Starts one scripted successor per launch, in order. Cheap to clone: clones share it.
    #[derive(Clone, Default)]
    pub(crate) struct FakeLauncher {
        inner: Arc<Mutex<Inner>>,
    }

    impl FakeLauncher {
        pub(crate) fn new(scripts: impl IntoIterator<Item = Script>) -> FakeLauncher {
            let launcher = FakeLauncher::default();
            launcher.lock().scripts = scripts.into_iter().collect();
            launcher
        }

        /// Every successor started so far.
        pub(crate) fn launched(&self) -> Vec<Launched> {
            self.lock().launched.clone()
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
            self.inner.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    /// Reads a state descriptor (a pipe, or a memfd for a validation run) to its end, verified.
    async fn read_state(fd: OwnedFd) -> io::Result<Vec<u8>> {
        let file = std::fs::File::from(fd);
        let mut bytes = Vec::new();
        if file.metadata()?.is_file() {
            crate::state::read_stream(tokio::fs::File::from_std(file))
                .read_to_end(&mut bytes)
                .await?;
        } else {
            let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(file.into())?;
            crate::state::read_stream(pipe)
                .read_to_end(&mut bytes)
                .await?;
        }
        Ok(bytes)
    }

    impl Launcher for FakeLauncher {
        type Child = FakeChild;

        async fn launch(&self, mode: Mode, extra: Vec<(String, OwnedFd)>) -> io::Result<FakeChild> {
            let mut inner = self.lock();
            let script = inner.scripts.pop_front().unwrap_or(Script::Ready);
            if script == Script::FailsToStart {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such program"));
            }
            let index = inner.launched.len();
            let pid = 1000 + index as u32;
            inner.launched.push(Launched {
                pid,
                validation: mode == Mode::Validate,
                ..Launched::default()
            });
            let state_fd = extra
                .into_iter()
                .find(|(name, _)| name == inherit::STATE_FD)
                .map(|(_, fd)| fd);
            // A successor that exits closes its end of the state; one that lives reads it.
            let state = match (&script, state_fd) {
                (
                    Script::Ready
                    | Script::Hangs
                    | Script::DiesAfterReady(..)
                    | Script::UnhealthyAfterReady(..),
                    Some(fd),
                ) => Some(tokio::spawn(read_state(fd))),
                _ => None,
            };
            Ok(FakeChild {
                launcher: self.clone(),
                index,
                pid,
                script,
                state,
            })
        }
    }

    /// A scripted successor.
    pub(crate) struct FakeChild {
        launcher: FakeLauncher,
        index: usize,
        pid: u32,
        script: Script,
        state: Option<tokio::task::JoinHandle<io::Result<Vec<u8>>>>,
    }

    impl FakeChild {
        fn update(&self, f: impl FnOnce(&mut Launched)) {
            f(&mut self.launcher.lock().launched[self.index]);
        }

        async fn take_state(&mut self) {
            if let Some(task) = self.state.take() {
                if let Ok(Ok(bytes)) = task.await {
                    self.update(|l| l.state = Some(bytes));
                }
            }
        }
    }

    impl Child for FakeChild {
        fn pid(&self) -> u32 {
            self.pid
        }

        async fn wait_ready(&mut self, timeout: Duration) -> Result<(), SuccessorFailure> {
            match self.script.clone() {
                Script::Ready | Script::DiesAfterReady(..) | Script::UnhealthyAfterReady(..) => {
                    self.take_state().await;
                    Ok(())
                }
                Script::Hangs => {
                    tokio::time::sleep(timeout).await;
                    self.kill_and_reap().await;
                    Err(SuccessorFailure::NotReady(timeout))
                }
                Script::Exits(code) => Err(SuccessorFailure::Exited(ExitStatus::Code(code))),
                Script::Reports(reason) => Err(SuccessorFailure::Reported {
                    reason,
                    status: ExitStatus::Code(1),
                }),
                Script::FailsToStart => unreachable!("never started"),
            }
        }

        async fn kill_and_reap(&mut self) -> ExitStatus {
            if let Some(task) = self.state.take() {
                task.abort();
            }
            self.update(|l| l.killed = true);
            ExitStatus::Signal(Signal::SIGKILL)
        }

        async fn watch_probation(&mut self, probation: Duration) -> Result<(), ProbationFailure> {
            match self.script.clone() {
                Script::DiesAfterReady(code, after) if after < probation => {
                    tokio::time::sleep(after).await;
                    self.update(|l| l.killed = true);
                    Err(ProbationFailure::Exited(ExitStatus::Code(code)))
                }
                Script::UnhealthyAfterReady(reason, after) if after < probation => {
                    tokio::time::sleep(after).await;
                    self.kill_and_reap().await;
                    Err(ProbationFailure::Unhealthy(reason))
                }
                _ => {
                    tokio::time::sleep(probation).await;
                    Ok(())
                }
            }
        }

        fn confirm(&mut self) {
            self.update(|l| l.confirmed = true);
        }

        fn reap_in_background(self) {
            self.update(|l| l.reaped_in_background = true);
        }
    }
}
