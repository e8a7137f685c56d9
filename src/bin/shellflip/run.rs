//! `shellflip run -- PROGRAM [ARGS...]`: a small supervisor for containers, the I/O shell around
//! the decisions in `supervisor.rs`.
//!
//! It is process 1 of its PID namespace, or makes itself the child subreaper, so that every
//! generation of the service is reparented to it when the generation that started it exits. It
//! gives the program an `sd_notify(3)` socket (`NOTIFY_SOCKET`), on which the library's
//! `READY=1`/`MAINPID=` messages say which generation is the service; forwards signals to that
//! main process; reaps every zombie; and exits with the last generation's status.
//!
//! One thread, no runtime: the signals are blocked and read from a signalfd; one `poll` waits
//! on the signalfd, the notification socket and a pidfd of the main process (which may not be
//! a child: a generation's successor is the child of that generation until it exits).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid as NixPid;

use crate::supervisor::{Action, Event, FORWARDED, Family, Pid, Status, Supervisor};

/// How long to wait, after the main process ended without a successor, unless `--grace` says
/// otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Exit codes of the supervisor's own failures (as `env`, `docker run` and shells use them).
const EXIT_SETUP: u8 = 125;
const EXIT_CANNOT_EXECUTE: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

pub const SYNOPSIS: &str = "usage: shellflip run [--grace SECS] -- PROGRAM [ARGS...]";

pub const HELP: &str = "shellflip run: supervise a service as a container's entry point

usage: shellflip run [--grace SECS] -- PROGRAM [ARGS...]

Runs PROGRAM as the service and stays with it across its fork/exec restarts, like
a small init: use it as process 1 of a container (ENTRYPOINT [\"shellflip\", \"run\",
\"--\", \"/usr/local/bin/my-service\"]), or anywhere else (it then makes itself the
child subreaper).

- Every generation of the service is reparented to it when the generation that
  started it exits, and every zombie is reaped.
- PROGRAM gets NOTIFY_SOCKET, a socket in the sd_notify protocol in a private
  directory: the library's READY=1 and MAINPID= messages say which generation is
  the main process. Only processes descended from the supervisor are heard, and
  MAINPID= must name one of them.
- SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to the
  main process (SIGUSR1 restarts a shellflip service). A stop (SIGTERM, SIGINT,
  SIGQUIT) also reaches a successor that declares itself afterwards.
- When the main process ends without a successor having declared itself, it
  waits for one at most SECS seconds, and exits as soon as no process of the
  service is left, with the main process's status: its exit code, or 128 + the
  signal that killed it. Processes left after the grace are killed.

options:
      --grace SECS   how long to wait for a successor or for the processes left
                     after the main process ended (default 10; 0: do not wait)
  -h, --help         print this help

exit status: the main process's (code, or 128 + signal); 1 when its status was
lost; 2 bad arguments; 125 the supervisor could not start; 126 PROGRAM cannot
be executed; 127 PROGRAM was not found";

/// What `shellflip run` was asked.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub grace: Duration,
}

/// `shellflip run`'s arguments: a supervision, or its help.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Options),
    Help,
}

/// A `--grace` value: a finite, non-negative number of seconds.
fn parse_grace(value: &std::ffi::OsStr) -> Result<Duration, String> {
    let text = value
        .to_str()
        .ok_or_else(|| format!("--grace: {value:?} is not a number"))?;
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("--grace: {text:?} is not a number"))?;
    if !(secs >= 0.0 && secs.is_finite()) {
        return Err(format!(
            "--grace must be a number of seconds, 0 or more, not {text:?}"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("--grace: {text:?} is too large"))
}

/// Parses what follows `run`: options up to the program, which takes every argument after it
/// as its own (`--` before it is optional unless it starts with `-`).
pub fn parse(parser: &mut lexopt::Parser) -> Result<Parsed, String> {
    use lexopt::prelude::*;

    let mut grace = DEFAULT_GRACE;
    loop {
        let arg = match parser.next() {
            Ok(Some(arg)) => arg,
            Ok(None) => {
                return Err("run needs a program: shellflip run -- PROGRAM [ARGS...]".into());
            }
            Err(e) => return Err(e.to_string()),
        };
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Long("grace") => {
                let value = parser
                    .value()
                    .map_err(|_| "--grace needs a number of seconds".to_string())?;
                grace = parse_grace(&value)?;
            }
            Value(program) if !program.is_empty() => {
                let args = parser
                    .raw_args()
                    .map_err(|e| e.to_string())?
                    .collect::<Vec<_>>();
                return Ok(Parsed::Run(Options {
                    program,
                    args,
                    grace,
                }));
            }
            Value(_) => return Err("run: the program's name is empty".into()),
            other => return Err(other.unexpected().to_string()),
        }
    }
}

/// A failure of the supervisor itself, before the service ran.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn setup(what: &str, e: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_SETUP,
            message: format!("{what}: {e}"),
        }
    }
}

/// Writes `shellflip run: LINE` to stderr in one `write`, so that it is not split by what the
/// service writes to the same file at the same time.
fn log(line: &str) {
    use std::io::Write;
    let text = format!("shellflip run: {line}\n");
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

/// Runs `opts.program` under the supervisor until the service ends; returns the exit code.
pub fn main(opts: Options) -> ExitCode {
    match Shell::start(&opts) {
        Ok(shell) => ExitCode::from(shell.supervise()),
        Err(f) => {
            log(&f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The notification socket's private directory: removed, with the socket, when dropped.
struct NotifyDir {
    dir: PathBuf,
    socket: PathBuf,
}

impl NotifyDir {
    fn create() -> Result<(NotifyDir, UnixDatagram), Failure> {
        let template = std::env::temp_dir().join("shellflip-run.XXXXXX");
        // mkdtemp: a new directory with an unpredictable name, mode 0700.
        let dir = nix::unistd::mkdtemp(&template)
            .map_err(|e| Failure::setup(&format!("creating {}", template.display()), e))?;
        let guard = NotifyDir {
            socket: dir.join("notify.sock"),
            dir,
        };
        let socket = UnixDatagram::bind(&guard.socket)
            .map_err(|e| Failure::setup(&format!("binding {}", guard.socket.display()), e))?;
        // A service that drops its privileges after start must still be able to notify:
        // the directory may be crossed (not listed) and the socket written by anyone, as
        // systemd's own notify socket. Who is heard is decided by the sender's credentials.
        let modes = [(&guard.dir, 0o711), (&guard.socket, 0o666)];
        for (path, mode) in modes {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Failure::setup(&format!("chmod {}", path.display()), e))?;
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| Failure::setup("notification socket", e))?;
        // Every datagram then carries its sender's PID, UID and GID (SCM_CREDENTIALS),
        // checked by the kernel.
        setsockopt(&socket, sockopt::PassCred, &true)
            .map_err(|e| Failure::setup("SO_PASSCRED", e))?;
        Ok((guard, socket))
    }
}

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// How the end of the main process is seen (it may not be a child of the supervisor).
enum Watch {
    /// Its pidfd becomes readable.
    Pidfd(OwnedFd),
    /// It was gone before a pidfd could be opened.
    Gone,
    /// No pidfd (Linux before 5.3): `/proc` is looked at every [`PROC_POLL`].
    Proc,
}

/// How often `/proc` is looked at for the main process's end, without a pidfd.
const PROC_POLL: Duration = Duration::from_millis(500);

struct Shell {
    me: Pid,
    /// Process 1 of its PID namespace (otherwise: the child subreaper).
    pid1: bool,
    /// Whether `/proc` shows this PID namespace (it does in a container, and under
    /// `unshare --mount-proc`): the descendant checks need it.
    proc_ok: bool,
    signals: SignalFd,
    notify: UnixDatagram,
    _dir: NotifyDir,
    /// The main process, and how its end is seen.
    watched: Option<(Pid, Watch)>,
    sup: Supervisor,
}

impl Shell {
    fn start(opts: &Options) -> Result<Shell, Failure> {
        let me = nix::unistd::getpid().as_raw();
        let pid1 = me == 1;
        // Blocked before anything else, so none is lost; read from the signalfd. The program
        // starts with an empty mask and default dispositions (`spawn`).
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        for s in FORWARDED {
            mask.add(s);
        }
        mask.thread_block()
            .map_err(|e| Failure::setup("blocking signals", e))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| Failure::setup("signalfd", e))?;
        if pid1 {
            log("process 1 of its PID namespace");
        } else {
            nix::sys::prctl::set_child_subreaper(true)
                .map_err(|e| Failure::setup("PR_SET_CHILD_SUBREAPER", e))?;
            log(&format!("child subreaper (PID {me}, not process 1)"));
        }
        let proc_ok = proc_shows_this_namespace(me);
        if !proc_ok {
            log(
                "warning: /proc does not show this PID namespace (mount a new /proc): \
                 notifications are accepted from any process of the namespace",
            );
        }
        let (dir, notify) = NotifyDir::create()?;
        let program = spawn(opts, &dir.socket)?;
        log(&format!(
            "started {} (PID {program}), NOTIFY_SOCKET={}",
            Path::new(&opts.program).display(),
            dir.socket.display()
        ));
        let mut shell = Shell {
            me,
            pid1,
            proc_ok,
            signals,
            notify,
            _dir: dir,
            watched: None,
            sup: Supervisor::new(program, opts.grace),
        };
        shell.watch_main();
        Ok(shell)
    }

    /// The loop: wait, turn what happened into events, carry out the actions. Returns the exit
    /// code.
    fn supervise(mut self) -> u8 {
        loop {
            self.wait();
            let now = Instant::now();
            let signals = self.read_signals();
            let (reaped, children_left) = reap();
            // Read after reaping: whatever a reaped process sent before it exited is queued by
            // now, and is applied before its end.
            let messages = self.receive();
            let mut actions = Vec::new();
            {
                let family = ProcFamily {
                    me: self.me,
                    proc_ok: self.proc_ok,
                    reaped: reaped.iter().map(|(pid, _)| *pid).collect(),
                };
                for (sender, text) in &messages {
                    let event = Event::Notify {
                        sender: *sender,
                        text,
                    };
                    actions.extend(self.sup.handle(event, now, &family));
                }
                for &(pid, status) in &reaped {
                    actions.extend(self.sup.handle(Event::Reaped { pid, status }, now, &family));
                }
                if let Some(event) = self.main_ended() {
                    actions.extend(self.sup.handle(event, now, &family));
                }
                if !children_left {
                    actions.extend(self.sup.handle(Event::NoChildren, now, &family));
                }
                for signal in signals {
                    actions.extend(self.sup.handle(Event::Signal(signal), now, &family));
                }
                actions.extend(self.sup.handle(Event::Tick, now, &family));
            }
            if let Some(code) = self.carry_out(actions) {
                self.finish();
                return code;
            }
            self.watch_main();
        }
    }

    /// Sleeps until a signal, a notification, the main process's end or the deadline.
    fn wait(&self) {
        let mut wake = self
            .sup
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        match &self.watched {
            // The main process is gone already: look now.
            Some((_, Watch::Gone)) => wake = Some(Duration::ZERO),
            Some((_, Watch::Proc)) => wake = Some(wake.map_or(PROC_POLL, |w| w.min(PROC_POLL))),
            _ => {}
        }
        let timeout = match wake {
            // Rounded up: never wake just before the deadline and spin.
            Some(left) => {
                PollTimeout::try_from(left.as_micros().div_ceil(1000).min(i32::MAX as u128))
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
        ];
        if let Some((_, Watch::Pidfd(pidfd))) = &self.watched {
            fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                log(&format!("poll: {e}"));
                // Do not spin on a persistent error.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The forwarded signals received (SIGCHLD only wakes the loop, which always reaps).
    fn read_signals(&self) -> Vec<Signal> {
        let mut out = Vec::new();
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => {}
                    Ok(s) => out.push(s),
                    Err(_) => {}
                },
                Ok(None) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log(&format!("reading signals: {e}"));
                    break;
                }
            }
        }
        out
    }

    /// The queued notifications, with their senders' PIDs (0 when unknown: refused).
    fn receive(&self) -> Vec<(Pid, String)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 253]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let (sender, len, truncated) =
                match recvmsg::<()>(self.notify.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                    Ok(msg) => {
                        let mut sender = 0;
                        if let Ok(cmsgs) = msg.cmsgs() {
                            for c in cmsgs {
                                match c {
                                    ControlMessageOwned::ScmCredentials(cred) => {
                                        sender = cred.pid()
                                    }
                                    ControlMessageOwned::ScmRights(fds) => {
                                        for fd in fds {
                                            // SAFETY: SCM_RIGHTS just installed these
                                            // descriptors in this process; nothing else owns
                                            // them. Dropping closes them: no store is kept.
                                            drop(unsafe { OwnedFd::from_raw_fd(fd) });
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                        (sender, msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC))
                    }
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        log(&format!("reading a notification: {e}"));
                        break;
                    }
                };
            if truncated {
                log(&format!(
                    "ignored a notification from process {sender}: longer than {} bytes",
                    buf.len()
                ));
                continue;
            }
            out.push((sender, String::from_utf8_lossy(&buf[..len]).into_owned()));
        }
        out
    }

    /// The main process's end when it was not reaped here: it was the child of a generation
    /// that is still draining, which reaped it; or it is our child and ended after the reaping.
    fn main_ended(&self) -> Option<Event<'static>> {
        let (pid, watch) = self.watched.as_ref()?;
        if self.sup.main() != Some(*pid) {
            return None;
        }
        let pidfd = match watch {
            Watch::Pidfd(pidfd) => {
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
                    return None;
                }
                Some(pidfd)
            }
            Watch::Gone => None,
            Watch::Proc => {
                if proc_stat(*pid).is_some_and(|s| s.state != 'Z' && s.state != 'X') {
                    return None;
                }
                None
            }
        };
        // Ended. Ours to reap?
        let status = match waitpid(NixPid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(Status::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(Status::Signaled(sig as i32)),
            _ => None,
        };
        if let Some(status) = status {
            return Some(Event::Reaped { pid: *pid, status });
        }
        let status = pidfd
            .as_ref()
            .and_then(|fd| exit_status_of_reaped(fd.as_fd()))
            .or_else(|| zombie_exit_status(*pid))
            .or_else(|| {
                pidfd
                    .as_ref()
                    .and_then(|fd| exit_status_of_reaped(fd.as_fd()))
            })
            .unwrap_or(Status::Unknown);
        Some(Event::Ended { pid: *pid, status })
    }

    /// Keeps a pidfd of the current main process.
    fn watch_main(&mut self) {
        let main = self.sup.main();
        if self.watched.as_ref().map(|(pid, _)| *pid) == main {
            return;
        }
        self.watched = main.map(|pid| {
            let watch = match pidfd_open(pid) {
                Ok(fd) => Watch::Pidfd(fd),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Watch::Gone,
                Err(e) => {
                    log(&format!(
                        "no pidfd for main process {pid} ({e}): looking at /proc every {PROC_POLL:?}"
                    ));
                    Watch::Proc
                }
            };
            (pid, watch)
        });
    }

    /// Carries out the actions in order; returns the exit code when one says to exit.
    fn carry_out(&self, actions: Vec<Action>) -> Option<u8> {
        for action in actions {
            match action {
                Action::Log(line) => log(&line),
                Action::Forward { pid, signal } => {
                    if let Err(e) = kill(NixPid::from_raw(pid), signal) {
                        log(&format!("cannot forward {signal} to process {pid}: {e}"));
                    }
                }
                Action::Exit(code) => return Some(code),
            }
        }
        None
    }

    /// Before exiting: as process 1, the kernel kills what is left in the namespace when it
    /// exits; as a subreaper, do the same to what is left of the service.
    fn finish(&self) {
        if self.pid1 || !self.proc_ok {
            return;
        }
        let family = ProcFamily {
            me: self.me,
            proc_ok: true,
            reaped: BTreeSet::new(),
        };
        let left: Vec<Pid> = all_pids()
            .into_iter()
            .filter(|&pid| family.is_descendant(pid))
            .collect();
        for pid in &left {
            let _ = kill(NixPid::from_raw(*pid), Signal::SIGKILL);
        }
        if !left.is_empty() {
            log(&format!("killed {} processes left", left.len()));
            // Reap what was ours; the rest is reparented past us.
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end && !matches!(reap(), (_, false)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Starts the program with `NOTIFY_SOCKET` set, an empty signal mask and every signal's
/// default action (the supervisor's blocked signals must not be inherited: std's `Command`
/// keeps the mask), in the supervisor's process group.
fn spawn(opts: &Options, notify_socket: &Path) -> Result<Pid, Failure> {
    use std::ffi::CString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};

    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawnp};

    let failed =
        |e: &dyn std::fmt::Display| Failure::setup(&format!("starting {:?}", opts.program), e);
    let cstring = |bytes: Vec<u8>| CString::new(bytes).map_err(|e| failed(&e));
    let program = cstring(opts.program.as_bytes().to_vec())?;
    let mut argv = vec![program.clone()];
    for a in &opts.args {
        argv.push(cstring(a.as_bytes().to_vec())?);
    }
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os().filter(|(k, _)| k != "NOTIFY_SOCKET") {
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(cstring(kv)?);
    }
    let mut kv = b"NOTIFY_SOCKET=".to_vec();
    kv.extend_from_slice(notify_socket.as_os_str().as_bytes());
    env.push(cstring(kv)?);

    let actions = PosixSpawnFileActions::init().map_err(|e| failed(&e))?;
    let mut attr = PosixSpawnAttr::init().map_err(|e| failed(&e))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(|e| failed(&e))?;
    attr.set_sigmask(&SigSet::empty()).map_err(|e| failed(&e))?;
    let mut defaults = SigSet::all();
    defaults.remove(Signal::SIGKILL);
    defaults.remove(Signal::SIGSTOP);
    attr.set_sigdefault(&defaults).map_err(|e| failed(&e))?;
    match posix_spawnp(&program, &actions, &attr, &argv, &env) {
        Ok(pid) => Ok(pid.as_raw()),
        Err(e) => Err(Failure {
            code: match e {
                Errno::ENOENT => EXIT_NOT_FOUND,
                Errno::EACCES | Errno::ENOEXEC | Errno::EISDIR | Errno::EPERM => {
                    EXIT_CANNOT_EXECUTE
                }
                _ => EXIT_SETUP,
            },
            message: format!("cannot run {:?}: {e}", opts.program),
        }),
    }
}

/// Reaps every child that ended; returns them, and whether any child is left.
fn reap() -> (Vec<(Pid, Status)>, bool) {
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), Status::Exited(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw(), Status::Signaled(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) => return (out, true),
            // Stopped or continued: not asked for.
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return (out, false),
            Err(e) => {
                log(&format!("waitpid: {e}"));
                return (out, true);
            }
        }
    }
}

/// Descendants, from `/proc`.
struct ProcFamily {
    me: Pid,
    proc_ok: bool,
    /// Reaped in this round: they were children of ours, and `/proc` forgot them.
    reaped: BTreeSet<Pid>,
}

impl Family for ProcFamily {
    fn is_descendant(&self, pid: Pid) -> bool {
        if pid <= 0 || pid == self.me {
            return false;
        }
        if self.reaped.contains(&pid) {
            return true;
        }
        if !self.proc_ok {
            // Visible in our PID namespace (a foreign sender's PID reads as 0): the most that
            // can be checked without /proc.
            return true;
        }
        // An ancestor read on the way may exit and be reaped (by its own parent, a generation
        // still draining) before it is read: its children were reparented to us by then, so
        // the walk is tried again from the start.
        for _ in 0..3 {
            match self.walk(pid) {
                Walk::Descendant => return true,
                Walk::Stranger => return false,
                Walk::Broken => {}
            }
        }
        false
    }
}

enum Walk {
    Descendant,
    /// The chain of parents ends elsewhere (at 0, or at 1 when we are not process 1).
    Stranger,
    /// A process on the chain (`pid` itself included) is gone.
    Broken,
}

impl ProcFamily {
    /// Follows the parents of `pid` up to the supervisor.
    fn walk(&self, pid: Pid) -> Walk {
        let mut p = pid;
        // Bounded: a PID may be reused while we walk.
        for _ in 0..4096 {
            match proc_stat(p) {
                Some(stat) if stat.ppid == self.me => return Walk::Descendant,
                Some(stat) if stat.ppid > 1 => p = stat.ppid,
                Some(_) => return Walk::Stranger,
                None => return Walk::Broken,
            }
        }
        Walk::Broken
    }
}

/// The fields of `/proc/PID/stat` that the supervisor reads.
struct ProcStat {
    state: char,
    ppid: Pid,
    /// The status in `waitpid(2)` form (meaningful for a zombie).
    exit_code: Option<i32>,
}

fn proc_stat(pid: Pid) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`: "pid (comm) state ppid ... exit_code"; comm may hold anything, so
/// the fields are counted from its last ')'.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); exit_code is field 52.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        exit_code: fields.get(49).and_then(|f| f.parse().ok()),
    })
}

/// Whether `/proc` belongs to this PID namespace.
fn proc_shows_this_namespace(me: Pid) -> bool {
    // /proc/self names the reader's PID as that /proc's namespace sees it.
    std::fs::read_link("/proc/self").is_ok_and(|p| p == Path::new(&me.to_string()))
}

fn all_pids() -> Vec<Pid> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The status of a zombie, from `/proc/PID/stat`, while its parent has not reaped it.
fn zombie_exit_status(pid: Pid) -> Option<Status> {
    let stat = proc_stat(pid)?;
    (stat.state == 'Z')
        .then_some(stat.exit_code)?
        .map(Status::from_wait_status)
}

/// A pidfd of `pid` (close-on-exec).
fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes two integers and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the system call just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `struct pidfd_info` of `<linux/pidfd.h>`, its first version (64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: u64 =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as u64) << 16) | (0xFF << 8) | 11;

/// The exit status of a process reaped by someone else, kept by the kernel for holders of a
/// pidfd (`PIDFD_INFO_EXIT`, Linux 6.15 and later; None before, or while it is not reaped).
fn exit_status_of_reaped(pidfd: std::os::fd::BorrowedFd<'_>) -> Option<Status> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: the request's size is that of `info`, a live repr(C) struct laid out as the
    // kernel's first version of `struct pidfd_info`; the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO as _,
            &mut info as *mut PidfdInfo,
        )
    };
    (rc == 0 && info.mask & PIDFD_INFO_EXIT != 0).then(|| Status::from_wait_status(info.exit_code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_list(list: &[&str]) -> Result<Parsed, String> {
        let mut parser = lexopt::Parser::from_args(list.iter().map(OsString::from));
        parse(&mut parser)
    }

    fn options(list: &[&str]) -> Options {
        match parse_list(list) {
            Ok(Parsed::Run(o)) => o,
            other => panic!("{list:?}: {other:?}"),
        }
    }

    #[test]
    fn parses_the_program_and_its_arguments_untouched() {
        let o = options(&["--", "/bin/svc", "--http", "x", "-h", "--", "--grace"]);
        assert_eq!(o.program, "/bin/svc");
        assert_eq!(o.args, ["--http", "x", "-h", "--", "--grace"]);
        assert_eq!(o.grace, DEFAULT_GRACE);
        let o = options(&["--grace", "2.5", "svc"]);
        assert_eq!(o.program, "svc");
        assert!(o.args.is_empty());
        assert_eq!(o.grace, Duration::from_millis(2500));
        assert_eq!(options(&["--grace=0", "--", "svc"]).grace, Duration::ZERO);
        // A program whose name starts with '-' needs the `--`.
        assert_eq!(options(&["--", "-svc"]).program, "-svc");
    }

    #[test]
    fn help_and_errors() {
        assert_eq!(parse_list(&["--help"]), Ok(Parsed::Help));
        assert_eq!(parse_list(&["-h", "--", "svc"]), Ok(Parsed::Help));
        assert!(parse_list(&[]).unwrap_err().contains("needs a program"));
        assert!(parse_list(&["--"]).unwrap_err().contains("needs a program"));
        assert!(
            parse_list(&["--grace"])
                .unwrap_err()
                .contains("--grace needs")
        );
        for bad in ["-1", "nan", "inf", "soon"] {
            let e = parse_list(&["--grace", bad, "svc"]).unwrap_err();
            assert!(e.contains("--grace"), "{bad}: {e}");
        }
        assert!(
            parse_list(&["--frobnicate", "svc"])
                .unwrap_err()
                .contains("--frobnicate")
        );
        assert!(parse_list(&["--", ""]).unwrap_err().contains("empty"));
        assert!(HELP.contains(SYNOPSIS.trim_start_matches("usage: ")));
    }

    #[test]
    fn parses_proc_stat() {
        let mut line = String::from("42 (a) b) c) Z 7");
        // Fields 5 to 51, then exit_code (field 52) = 0x900 (exit 9).
        for _ in 5..=51 {
            line.push_str(" 0");
        }
        line.push_str(" 2304\n");
        let s = parse_stat(&line).expect("parses");
        assert_eq!((s.state, s.ppid), ('Z', 7));
        assert_eq!(
            s.exit_code.map(Status::from_wait_status),
            Some(Status::Exited(9))
        );
        let own = proc_stat(nix::unistd::getpid().as_raw()).expect("own stat");
        assert_eq!(own.ppid, nix::unistd::getppid().as_raw());
    }

    #[test]
    fn pidfd_get_info_matches_the_kernel_header() {
        assert_eq!(std::mem::size_of::<PidfdInfo>(), 64);
        assert_eq!(PIDFD_GET_INFO, 0xC040_FF0B);
    }

    #[test]
    fn the_status_of_a_process_someone_else_reaps() {
        use std::process::Command;
        let mut child = Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("sh");
        let pid = child.id() as Pid;
        let pidfd = pidfd_open(pid).expect("pidfd_open");
        // A zombie: its status is in /proc.
        let zombie = (0..500).find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            zombie_exit_status(pid)
        });
        assert_eq!(zombie, Some(Status::Exited(7)));
        assert_eq!(exit_status_of_reaped(pidfd.as_fd()), None, "not reaped yet");
        // Reaped: the kernel keeps it for pidfd holders from Linux 6.15 on.
        child.wait().expect("wait");
        assert_eq!(zombie_exit_status(pid), None);
        match exit_status_of_reaped(pidfd.as_fd()) {
            Some(status) => assert_eq!(status, Status::Exited(7)),
            None => eprintln!("PIDFD_INFO_EXIT is not supported by this kernel"),
        }
    }

    #[test]
    fn own_children_are_descendants_and_strangers_are_not() {
        use std::process::Command;
        let me = nix::unistd::getpid().as_raw();
        let mut child = Command::new("sleep").arg("5").spawn().expect("sleep");
        let family = ProcFamily {
            me,
            proc_ok: proc_shows_this_namespace(me),
            reaped: BTreeSet::from([123_456_789]),
        };
        if family.proc_ok {
            assert!(family.is_descendant(child.id() as Pid));
            assert!(!family.is_descendant(nix::unistd::getppid().as_raw()));
        }
        assert!(!family.is_descendant(me));
        assert!(!family.is_descendant(0));
        assert!(family.is_descendant(123_456_789));
        let _ = child.kill();
        let _ = child.wait();
    }
}
