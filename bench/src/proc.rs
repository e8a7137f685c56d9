//! Processes: starting the services under test, reaping every generation, measuring them.
//!
//! The driver makes itself a child subreaper, so every generation of a service (started by its
//! predecessor, which then exits) is reparented to the driver and reaped here. One thread owns
//! every `waitpid`: nothing else in the driver may wait for a child once it runs.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, posix_spawn};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

struct Reaper {
    exited: Mutex<HashMap<i32, String>>,
    changed: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers only and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(|| {
                loop {
                    match waitpid(Pid::from_raw(-1), None) {
                        Ok(status) => {
                            let (pid, text) = match status {
                                WaitStatus::Exited(p, c) => (p, format!("exit {c}")),
                                WaitStatus::Signaled(p, s, _) => (p, format!("signal {s}")),
                                _ => continue,
                            };
                            let r = reaper();
                            r.exited.lock().unwrap().insert(pid.as_raw(), text);
                            r.changed.notify_all();
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .expect("reaper thread");
        Reaper {
            exited: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    })
}

/// Makes this process the reaper of every generation it starts. Call it once, after any
/// `Command::status()` the driver needs (the reaper takes every child's exit status).
pub fn start_reaper() {
    let _ = reaper();
}

/// Waits until `pid` (a child or an orphaned descendant) has exited; its status, or `None`.
pub fn wait_exit(pid: i32, timeout: Duration) -> Option<String> {
    let r = reaper();
    let deadline = Instant::now() + timeout;
    let mut exited = r.exited.lock().unwrap();
    loop {
        if let Some(s) = exited.remove(&pid) {
            return Some(s);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        exited = r.changed.wait_timeout(exited, deadline - now).unwrap().0;
    }
}

/// Forgets the recorded exit of an earlier process that had `pid`: call it when a new process
/// is known to have that PID (a generation started by its predecessor), or [`alive`] and
/// [`wait_exit`] would take the old exit for the new process's.
pub fn forget(pid: i32) {
    reaper()
        .exited
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&pid);
}

/// True while `pid` exists and was not reaped yet.
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    if reaper().exited.lock().unwrap().contains_key(&pid) {
        return false;
    }
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Ends one process we started: SIGTERM, then SIGKILL after `grace`.
pub fn stop(pid: i32, grace: Duration) {
    // Never a process group (0 or negative): only the one process named.
    if pid <= 0 {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_exit(pid, grace).is_none() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = wait_exit(pid, Duration::from_secs(5));
    }
}

/// Starts `program` with `args`, standard output and error appended to `log`. The driver
/// reaps it (and its successors) with [`wait_exit`].
pub fn spawn(
    program: &Path,
    args: &[OsString],
    env: &[(&str, OsString)],
    log: &Path,
) -> io::Result<i32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    // The reaper may hold the status of an earlier process that had the same PID (a generation
    // nobody waited for): forget it, holding the lock so that the new process's own exit cannot
    // be recorded, and then forgotten, in between.
    let mut exited = reaper().exited.lock().unwrap_or_else(|p| p.into_inner());
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let pid = child.id() as i32;
    exited.remove(&pid);
    Ok(pid)
}

/// The floor of a start: `program` started by `posix_spawn` with a readiness pipe at
/// descriptor 3, described the way shellflip describes it to a successor. Returns the PID and
/// the time until the process wrote `R` on the pipe.
pub fn spawn_until_ready(
    program: &Path,
    args: &[OsString],
    extra_env: &[(&str, &str)],
    log: &Path,
    timeout: Duration,
) -> io::Result<(i32, Duration)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Keep the write end away from 3, so that dup2 onto 3 always clears close-on-exec.
    let high = fcntl(&w, FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor, which nothing else owns.
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    drop(w);
    let mut actions = PosixSpawnFileActions::init()?;
    let logc = CString::new(log.as_os_str().as_bytes())?;
    actions.add_open(0, c"/dev/null", OFlag::O_RDONLY, Mode::empty())?;
    actions.add_open(
        1,
        logc.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT,
        Mode::from_bits_truncate(0o644),
    )?;
    actions.add_dup2(1, 2)?;
    actions.add_dup2(high.as_raw_fd(), 3)?;
    let attr = PosixSpawnAttr::init()?;
    let mut argv = vec![CString::new(program.as_os_str().as_bytes())?];
    for a in args {
        argv.push(CString::new(a.as_bytes())?);
    }
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !k.as_bytes().starts_with(b"SHELLFLIP_"))
        .filter(|(k, _)| !extra_env.iter().any(|(e, _)| k.as_bytes() == e.as_bytes()))
        .map(|(k, v)| kv(&k, &v))
        .collect::<io::Result<_>>()?;
    for (k, v) in extra_env {
        env.push(kv(OsStr::new(k), OsStr::new(v))?);
    }
    for (k, v) in [
        ("SHELLFLIP_PPID", std::process::id().to_string()),
        ("SHELLFLIP_FDS", "1".into()),
        ("SHELLFLIP_FDNAMES", "shellflip.ready".into()),
        ("SHELLFLIP_GENERATION", "0".into()),
        ("SHELLFLIP_MODE", "serve".into()),
    ] {
        env.push(kv(OsStr::new(k), OsStr::new(&v))?);
    }
    let prog = CString::new(program.as_os_str().as_bytes())?;
    let started = Instant::now();
    let pid = posix_spawn(prog.as_c_str(), &actions, &attr, &argv, &env)?;
    drop(high);
    let pid = pid.as_raw();
    let mut pipe = std::fs::File::from(r);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 2];
        let ok = pipe.read_exact(&mut b).is_ok() && b[0] == b'R';
        let _ = tx.send((ok, Instant::now()));
    });
    match rx.recv_timeout(timeout) {
        Ok((true, at)) => Ok((pid, at - started)),
        Ok((false, _)) => Err(io::Error::other(format!(
            "floor process {pid} ended before it was ready (see {})",
            log.display()
        ))),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            Err(io::Error::other(format!(
                "floor process {pid} not ready in time"
            )))
        }
    }
}

fn kv(k: &OsStr, v: &OsStr) -> io::Result<CString> {
    let mut b = k.as_bytes().to_vec();
    b.push(b'=');
    b.extend_from_slice(v.as_bytes());
    Ok(CString::new(b)?)
}

/// What a process holds: resident memory (KiB), threads, open descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    /// VmRSS in KiB.
    pub rss_kib: u64,
    /// Threads.
    pub threads: u64,
    /// Open descriptors.
    pub fds: u64,
}

/// Reads `/proc/<pid>` for the process's footprint.
pub fn footprint(pid: i32) -> io::Result<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Footprint {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        fds,
    })
}

/// A temporary directory for one benchmark run, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/shellflip-bench-<pid>-<tag>`.
    pub fn new(tag: &str) -> io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("shellflip-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// A path inside.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the service binds it again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Waits until `path` exists (a control socket being bound).
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Waits until a TCP connection to `addr` succeeds.
pub fn wait_for_port(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
