//! Starting a successor process and learning whether it became ready: both sides of the
//! readiness pipe, the spawner thread, the start-up timeout, and reaping.
//!
//! The successor is started with `posix_spawn` (glibc uses `clone(CLONE_VM | CLONE_VFORK)`),
//! so starting it costs the same whatever memory the service holds: no page table is copied.
//! Its descriptors are placed at `3..3+n` by the spawn's file actions, so no descriptor is ever
//! made inheritable in this process, where another thread's `Command` could leak it.
//!
//! Readiness pipe protocol, one line from the successor: `R\n` (ready) or `F<reason>\n`
//! (start-up failed, with the application's reason).

use std::ffi::{CString, OsString};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{FcntlArg, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::inherit::{self, FIRST_FD, Mode};
use crate::registry::{Kind, Registry, classify};

/// Name of the readiness pipe handed to the successor.
pub(crate) const READY_FD: &str = "shellflip.ready";
/// Longest failure reason read from a successor.
const MAX_REASON: usize = 4096;

/// What to start.
pub(crate) struct SpawnRequest {
    pub(crate) program: PathBuf,
    pub(crate) argv: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Placed at `3..3+n` in the successor, in order.
    pub(crate) fds: Vec<OwnedFd>,
}

type Job = (SpawnRequest, oneshot::Sender<io::Result<Pid>>);

/// A thread started up front that starts successors, so that starting one keeps working after
/// the service locked its other threads down (seccomp, dropped capabilities).
pub(crate) struct Spawner {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Spawner {
    pub(crate) fn start() -> io::Result<Spawner> {
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
        })
    }

    pub(crate) async fn spawn(&self, req: SpawnRequest) -> io::Result<Pid> {
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
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
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

/// How a successor stopped before it was ready.
pub(crate) fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by signal {}", sig.as_str()),
        other => format!("stopped ({other:?})"),
    }
}

/// Why a successor did not become ready.
#[derive(Debug)]
pub(crate) enum NotReady {
    /// It exited before it was ready.
    Exited(String),
    /// It reported a start-up failure.
    Failed { reason: String, status: String },
    /// It was not ready in time, and was killed.
    Timeout(Duration),
}

/// A started successor, until it is ready or gone.
pub(crate) struct Successor {
    pub(crate) pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    ready: tokio::net::unix::pipe::Receiver,
    reaped: bool,
}

impl Successor {
    /// Starts `registry`'s descriptors plus `extra` in a new process running this program.
    pub(crate) async fn start(
        spawner: &Spawner,
        program: PathBuf,
        extra_env: &[(OsString, OsString)],
        registry: &Registry,
        extra_fds: Vec<(String, OwnedFd)>,
        mode: Mode,
    ) -> io::Result<Successor> {
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let extra = extra_fds.len() + 1;
        let (mut names, mut fds) = registry.with_fds(|list| {
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
            // Copied straight above the range the successor's descriptors will occupy, so
            // that the spawner need not copy them again.
            let min = FIRST_FD + (list.len() + extra) as RawFd;
            let fds = list
                .iter()
                .map(|(_, fd)| {
                    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
                    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it.
                    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
                })
                .collect::<nix::Result<Vec<OwnedFd>>>();
            fds.map(|f| (names, f))
        })?;
        for (name, fd) in extra_fds {
            names.push(name);
            fds.push(fd);
        }
        names.push(READY_FD.into());
        fds.push(ready_w);
        let generation = inherit::generation() + 1;
        let env = inherit::successor_environment(extra_env, &names, generation, mode);
        let mut argv: Vec<OsString> = std::env::args_os().collect();
        if argv.is_empty() {
            argv.push(program.clone().into_os_string());
        }
        let pid = spawner
            .spawn(SpawnRequest {
                program,
                argv,
                env,
                fds,
            })
            .await?;
        // The write end went to the spawner and is closed: only the successor holds it now.
        let pidfd = pidfd_open(pid)?;
        let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)?;
        Ok(Successor {
            pid,
            // SAFETY: the OwnedFd owns the pidfd and keeps it open, unchanged, for as long as
            // the AsyncFd holds it.
            pidfd: unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?,
            ready,
            reaped: false,
        })
    }

    /// Waits until the successor is ready, fails, exits, or `timeout` (from now) passes; in the
    /// last case it is killed and reaped.
    pub(crate) async fn wait_ready(&mut self, timeout: Duration) -> Result<(), NotReady> {
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
                return Err(NotReady::Timeout(timeout));
            }
        };
        let _ = outcome;
        match line.first() {
            Some(b'R') => Ok(()),
            Some(b'F') => {
                let reason = String::from_utf8_lossy(&line[1..]).trim_end().to_owned();
                let status = self.exit_status_within(Duration::from_secs(5)).await;
                Err(NotReady::Failed { reason, status })
            }
            _ => Err(NotReady::Exited(
                self.exit_status_within(Duration::from_secs(5)).await,
            )),
        }
    }

    /// The exit status, waiting at most `limit` for the exit (then killing it).
    async fn exit_status_within(&mut self, limit: Duration) -> String {
        if tokio::time::timeout(limit, self.pidfd.readable())
            .await
            .is_err()
        {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        self.reap().await
    }

    /// Kills the successor and reaps it (no zombie is left behind).
    pub(crate) async fn kill_and_reap(&mut self) -> String {
        let _ = kill(self.pid, Signal::SIGKILL);
        self.reap().await
    }

    async fn reap(&mut self) -> String {
        if self.reaped {
            return "was reaped".into();
        }
        let _ = self.pidfd.readable().await;
        match waitid(
            Id::PIDFd(self.pidfd.get_ref().as_fd()),
            WaitPidFlag::WEXITED,
        ) {
            Ok(status) => {
                self.reaped = true;
                describe(&status)
            }
            Err(e) => format!("ended (status unknown: {e})"),
        }
    }

    /// After a successful handover: reaps the successor whenever it exits, so that a
    /// generation that outlives its successor (a long drain) never leaves a zombie.
    pub(crate) fn reap_in_background(mut self) {
        tokio::spawn(async move {
            let status = self.reap().await;
            tracing::debug!(pid = self.pid.as_raw(), "successor {status}");
        });
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

/// The successor's side: tells the parent generation (if any) that this process is ready.
/// Returns false when there is no parent waiting.
pub(crate) fn tell_parent(message: &[u8]) -> io::Result<bool> {
    let Some(fd) = Registry::adopt_internal(READY_FD).map_err(io::Error::other)? else {
        return Ok(false);
    };
    let mut pipe = std::fs::File::from(fd);
    pipe.write_all(message)?;
    Ok(true)
}

/// Makes `fd` a readable descriptor of its own (a new open file description with its own
/// offset), for handing a memfd to a validation run without sharing our write offset.
pub(crate) fn reopen_readonly(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let f = std::fs::OpenOptions::new().read(true).open(path)?;
    Ok(f.into())
}
