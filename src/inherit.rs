//! The wire format of inherited descriptors, in one place.
//!
//! Descriptors reach a process in one of two ways, both described in its environment:
//!
//! * **From a parent generation** (fork/exec handover): `SHELLFLIP_FDS=n`,
//!   `SHELLFLIP_FDNAMES=a:b:…` and `SHELLFLIP_PPID=<pid of the parent>`, with the descriptors at
//!   numbers `3..3+n`, plus `SHELLFLIP_GENERATION` and `SHELLFLIP_MODE` (`serve` or `validate`).
//! * **From systemd** (socket activation or the file descriptor store): `LISTEN_FDS`,
//!   `LISTEN_FDNAMES` and `LISTEN_PID`, with the same layout (see `sd_listen_fds(3)`).
//!
//! Both lists are read once, checked, and kept in one process-wide set from which the
//! [`Registry`](crate::Registry) adopts descriptors by name. The variables are only trusted when
//! they were meant for this process: `LISTEN_PID` must be our PID and `SHELLFLIP_PPID` our
//! parent's, so a program that inherited the environment by accident ignores them. Every
//! descriptor named there must be open; it is made close-on-exec as soon as it is read, so it
//! never leaks into a program the service starts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use crate::bag::{self, Bag, Item, Label};

/// The first descriptor number of an inherited list (after stdin, stdout and stderr).
pub(crate) const FIRST_FD: RawFd = 3;
/// Most descriptors accepted in one inherited list (systemd's own store limit is 4096 by default;
/// connections that come in bags are not counted here).
const MAX_FDS: usize = 65_536;

pub(crate) const ENV_PPID: &str = "SHELLFLIP_PPID";
pub(crate) const ENV_FDS: &str = "SHELLFLIP_FDS";
pub(crate) const ENV_FDNAMES: &str = "SHELLFLIP_FDNAMES";
pub(crate) const ENV_GENERATION: &str = "SHELLFLIP_GENERATION";
pub(crate) const ENV_MODE: &str = "SHELLFLIP_MODE";
const LISTEN_PID: &str = "LISTEN_PID";
const LISTEN_FDS: &str = "LISTEN_FDS";
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// systemd after 257: the inode number of a pidfd of the process the descriptors are for, which
/// names it without the PID-reuse race of `LISTEN_PID`.
const LISTEN_PIDFDID: &str = "LISTEN_PIDFDID";

/// Every variable of the protocol: none of them may reach a program the service starts.
pub(crate) const PROTOCOL_VARS: &[&str] = &[
    ENV_PPID,
    ENV_FDS,
    ENV_FDNAMES,
    ENV_GENERATION,
    ENV_MODE,
    LISTEN_PID,
    LISTEN_FDS,
    LISTEN_FDNAMES,
    LISTEN_PIDFDID,
];

/// Names starting with this prefix are the library's own (state, readiness, control socket).
pub(crate) const RESERVED_PREFIX: &str = "shellflip.";

/// The control socket's listener.
pub(crate) const CONTROL_FD: &str = "shellflip.control";
/// The write end of the readiness pipe, handed to a successor (see [`ReadyLine`]).
pub(crate) const READY_FD: &str = "shellflip.ready";
/// The state: a pipe from the parent generation, or a memfd in systemd's store.
pub(crate) const STATE_FD: &str = "shellflip.state";
/// The read end of the confirmation pipe: the parent generation writes `C` (or closes it) once
/// this generation survived its probation.
pub(crate) const CONFIRM_FD: &str = "shellflip.confirm";
/// The connection of a control-socket client waiting in systemd's store for its answer.
pub(crate) const INITIATOR_FD: &str = "shellflip.initiator";

/// Longest failure reason carried on the readiness pipe.
pub(crate) const MAX_REASON: usize = 4096;

/// The one line a successor writes on its readiness pipe: `R\n` (ready) or `F<reason>\n`
/// (start-up failed, with the application's reason, one line, at most [`MAX_REASON`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadyLine {
    /// The successor has taken over.
    Ready,
    /// The successor's start-up failed, for this reason.
    Failed(String),
}

impl ReadyLine {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            ReadyLine::Ready => b"R\n".to_vec(),
            ReadyLine::Failed(reason) => {
                let mut line = b"F".to_vec();
                let reason = reason.replace('\n', " ");
                let mut end = reason.len().min(MAX_REASON - 2);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                line.extend_from_slice(&reason.as_bytes()[..end]);
                line.push(b'\n');
                line
            }
        }
    }

    /// What the bytes read from the pipe say, or `None` when they say nothing (the successor
    /// closed the pipe without a word, or wrote something that is not ours).
    pub(crate) fn decode(bytes: &[u8]) -> Option<ReadyLine> {
        let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        match line.first() {
            Some(b'R') => Some(ReadyLine::Ready),
            Some(b'F') => Some(ReadyLine::Failed(
                String::from_utf8_lossy(&line[1..]).trim_end().to_owned(),
            )),
            _ => None,
        }
    }
}

/// A descriptor list in the environment that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InheritError {
    /// A variable of the protocol does not parse.
    #[error("environment variable {var}={value:?} is malformed: {why}")]
    Malformed {
        /// The variable.
        var: &'static str,
        /// Its value, as far as it is text.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A descriptor named in the environment is not open in this process.
    #[error("descriptor {fd} ({name:?}) named in {var} is not open in this process")]
    NotOpen {
        /// The variable that names it.
        var: &'static str,
        /// Its number.
        fd: RawFd,
        /// Its name.
        name: String,
    },
}

/// How this process was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// Started fresh: nothing was handed over (systemd socket activation may still have passed
    /// listeners).
    Fresh,
    /// Started by the previous generation through the fork/exec handover.
    Parent,
    /// Started by systemd with descriptors from its file descriptor store.
    Systemd,
}

/// What the parent asked this process to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Take over and serve.
    Serve,
    /// Only check that the state handed over is acceptable, report, and exit (B6).
    Validate,
}

/// What the environment says was handed to this process: the pure result of parsing it,
/// before any descriptor is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Description {
    pub(crate) origin: Origin,
    pub(crate) mode: Mode,
    pub(crate) generation: u64,
    /// The variable that counted the descriptors (for error messages).
    pub(crate) count_var: &'static str,
    /// The names of the descriptors at `FIRST_FD..`, in order.
    pub(crate) names: Vec<String>,
}

/// Who this process is, for the PID checks of the protocol.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    pub(crate) pid: u32,
    pub(crate) parent: u32,
    /// The inode number of a pidfd of this process, where pidfds have their own inodes
    /// (pidfs, Linux 6.9+); `None` where that cannot be known.
    pub(crate) pidfd_id: Option<u64>,
}

impl Identity {
    fn current(get: &dyn Fn(&str) -> Option<OsString>) -> Identity {
        // A pidfd is opened only when systemd sent an id to compare it with.
        let pidfd_id = get(LISTEN_PIDFDID).and_then(|_| match pidfd_id_of_self() {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("{LISTEN_PIDFDID} is set, but no pidfd of this process: {e}");
                None
            }
        });
        Identity {
            pid: std::process::id(),
            parent: std::os::unix::process::parent_id(),
            pidfd_id,
        }
    }
}

/// A pidfd of this process (`pidfd_open(getpid())`, close-on-exec).
pub(crate) fn pidfd_of_self() -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1; it touches
    // no memory of ours.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the call returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// The inode number of a pidfd of this process, as systemd computes `LISTEN_PIDFDID`: `None`
/// when pidfds share one anonymous inode (before pidfs, Linux 6.9), where the number names
/// nothing.
fn pidfd_id_of_self() -> std::io::Result<Option<u64>> {
    let pidfd = pidfd_of_self()?;
    let st = nix::sys::stat::fstat(&pidfd).map_err(std::io::Error::from)?;
    let fs = nix::sys::statfs::fstatfs(&pidfd).map_err(std::io::Error::from)?;
    // PID_FS_MAGIC: each pidfd has an inode of its own, unique to its process.
    const PID_FS_MAGIC: i64 = 0x5049_4446;
    #[allow(clippy::unnecessary_cast)]
    let is_pidfs = fs.filesystem_type().0 as i64 == PID_FS_MAGIC;
    Ok(is_pidfs.then_some(st.st_ino as u64))
}

/// Parses the protocol's variables, read through `get`, for the process `me`. Touches no
/// descriptor: [`open`] does that.
pub(crate) fn parse(
    get: &dyn Fn(&str) -> Option<OsString>,
    me: Identity,
) -> Result<Description, InheritError> {
    let mut d = Description {
        origin: Origin::Fresh,
        mode: Mode::Serve,
        generation: 0,
        count_var: LISTEN_FDS,
        names: Vec::new(),
    };
    if let Some(ppid) = get(ENV_PPID) {
        let ppid = parse_number(ENV_PPID, Some(ppid))?;
        if ppid != u64::from(me.parent) {
            tracing::warn!(
                "{ENV_PPID}={ppid} is not this process's parent: ignoring inherited descriptors"
            );
        } else {
            d.generation = match get(ENV_GENERATION) {
                Some(v) => parse_number(ENV_GENERATION, Some(v))?,
                None => 0,
            };
            d.mode = match get(ENV_MODE) {
                None => Mode::Serve,
                Some(v) => match v.to_str() {
                    Some("serve") => Mode::Serve,
                    Some("validate") => Mode::Validate,
                    _ => {
                        let text = v.to_string_lossy();
                        return Err(malformed(ENV_MODE, &text, "expected serve or validate"));
                    }
                },
            };
            d.origin = Origin::Parent;
            d.count_var = ENV_FDS;
            d.names = parse_names(get, ENV_FDS, ENV_FDNAMES)?;
            return Ok(d);
        }
    }
    if let Some(pid) = get(LISTEN_PID) {
        let pid = parse_number(LISTEN_PID, Some(pid))?;
        let pidfd_id = match get(LISTEN_PIDFDID) {
            Some(v) => Some(parse_number(LISTEN_PIDFDID, Some(v))?),
            None => None,
        };
        if pid != u64::from(me.pid) {
            tracing::debug!("{LISTEN_PID}={pid} is not this process: ignoring {LISTEN_FDS}");
        } else if pidfd_id.zip(me.pidfd_id).is_some_and(|(t, o)| t != o) {
            // The PID is ours, but the process systemd meant is another that had it before.
            tracing::warn!(
                "{LISTEN_PIDFDID}={} is not this process (its pidfd id is {}): ignoring \
                 {LISTEN_FDS}",
                pidfd_id.unwrap_or_default(),
                me.pidfd_id.unwrap_or_default()
            );
        } else {
            d.names = parse_names(get, LISTEN_FDS, LISTEN_FDNAMES)?;
            if d.names.iter().any(|n| n.starts_with(RESERVED_PREFIX)) {
                d.origin = Origin::Systemd;
            }
        }
    }
    Ok(d)
}

/// The names of the `count_var` descriptors, checked, in order.
fn parse_names(
    get: &dyn Fn(&str) -> Option<OsString>,
    count_var: &'static str,
    names_var: &'static str,
) -> Result<Vec<String>, InheritError> {
    let Some(count) = get(count_var) else {
        return Ok(Vec::new());
    };
    let count = parse_number(count_var, Some(count))?;
    if count > MAX_FDS as u64 {
        return Err(malformed(
            count_var,
            &count.to_string(),
            "too many descriptors",
        ));
    }
    let count = count as usize;
    let names = match get(names_var) {
        Some(v) => {
            let text = v
                .to_str()
                .ok_or_else(|| malformed(names_var, &v.to_string_lossy(), "not UTF-8"))?
                .to_owned();
            let names: Vec<String> = if text.is_empty() && count == 0 {
                Vec::new()
            } else {
                text.split(':').map(str::to_owned).collect()
            };
            if names.len() != count {
                return Err(malformed(
                    names_var,
                    &text,
                    "number of names differs from count",
                ));
            }
            names
        }
        // systemd without names: they are all called "unknown"; number them to keep them apart.
        None => (0..count).map(|i| format!("unknown.{i}")).collect(),
    };
    for name in &names {
        if let Err(why) = check_name(name) {
            return Err(malformed(names_var, name, why));
        }
    }
    Ok(names)
}

/// The process-wide set of inherited descriptors, read once from the environment.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub(crate) origin: Origin,
    pub(crate) mode: Mode,
    pub(crate) generation: u64,
    fds: BTreeMap<String, OwnedFd>,
    /// What the bag said of each descriptor that came out of one (see [`bag`]) and went into a
    /// new one, by name.
    bagged: HashMap<String, Label>,
    /// The names of the bags read (in systemd's store, empty now).
    drained_bags: Vec<String>,
    /// The new bags holding what the bags read held, for systemd's store.
    new_bags: Vec<(Bag, Vec<Label>)>,
    /// What came out of a bag but could not be put in a new one.
    loose: HashSet<String>,
    bag_report: Option<BagReport>,
    /// The program to start for a restart: argv\[0\] made absolute when the process started.
    pub(crate) executable: Option<PathBuf>,
}

impl Inherited {
    /// Borrows an inherited descriptor by name, to validate it before taking it.
    pub(crate) fn peek(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.fds.get(name).map(|fd| fd.as_fd())
    }

    /// Takes an inherited descriptor out of the set (only once it was validated).
    pub(crate) fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.remove(name)
    }

    /// The names still in the set, in order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.fds.keys().cloned().collect()
    }

    /// What its bag said of `name`, when it came out of one and is in a new one.
    pub(crate) fn bagged(&self, name: &str) -> Option<&Label> {
        self.bagged.get(name)
    }

    /// Whether `name` came out of a bag but is in no bag now: nothing but this process holds it.
    pub(crate) fn loose(&self, name: &str) -> bool {
        self.loose.contains(name)
    }

    /// Adds `fd` under `name`, or `name#2`, `name#3`... when the name is taken; the key used.
    fn insert(&mut self, name: &str, fd: OwnedFd) -> String {
        let mut key = name.to_owned();
        let mut k = 1;
        while self.fds.contains_key(&key) {
            k += 1;
            key = format!("{name}#{k}");
        }
        self.fds.insert(key.clone(), fd);
        key
    }

    /// Replaces every bag in the set by what it holds (see [`bag`]), and puts all of that in new
    /// bags at once: this process then holds one descriptor per connection (the one the
    /// application takes), not two. A bag that cannot be read whole loses what could not be
    /// read, and says so; start-up goes on.
    ///
    /// This runs before the application's logger exists: what happened is kept in a
    /// [`BagReport`], logged by [`report_bags`].
    fn unpack_bags(&mut self) {
        let bags: Vec<String> = self
            .fds
            .keys()
            .filter(|k| k.starts_with(bag::NAME_PREFIX))
            .cloned()
            .collect();
        if bags.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let mut report = BagReport {
            bags: bags.len(),
            raised: raise_nofile_limit(),
            ..BagReport::default()
        };
        let mut unpacked: Vec<(String, Label)> = Vec::new();
        for key in bags {
            let Some(rx) = self.fds.remove(&key) else {
                continue;
            };
            let contents = bag::take_all(rx.as_fd());
            report
                .problems
                .extend(contents.problems.into_iter().map(|p| format!("{key}: {p}")));
            for (mut label, fd) in contents.items {
                if let Err(why) = check_name(&label.name) {
                    report
                        .problems
                        .push(format!("{key}: {:?} dropped: {why}", label.name));
                    continue;
                }
                report.connections += 1;
                let key = self.insert(&label.name, fd);
                label.name.clone_from(&key);
                unpacked.push((key, label));
            }
            // systemd's name for it (without a `#k` added here).
            let name = key.split('#').next().unwrap_or(&key).to_owned();
            if !self.drained_bags.contains(&name) {
                self.drained_bags.push(name);
            }
        }
        // Into new bags, a full message each.
        for chunk in unpacked.chunks(bag::PER_MESSAGE) {
            let items: Vec<Item<'_>> = chunk
                .iter()
                .filter_map(|(key, label)| {
                    Some(Item {
                        label,
                        fd: self.fds.get(key)?.as_fd(),
                    })
                })
                .collect();
            let bag = Bag::new().and_then(|b| b.put(&items).map(|()| b));
            match bag {
                Ok(bag) => {
                    self.new_bags
                        .push((bag, chunk.iter().map(|(_, l)| l.clone()).collect()));
                    self.bagged.extend(chunk.iter().cloned());
                }
                // Then nothing holds these but this process: the registry keeps them as it
                // keeps anything else it registers.
                Err(e) => {
                    report.problems.push(format!(
                        "cannot put {} connections in a new bag: {e}",
                        chunk.len()
                    ));
                    self.loose.extend(chunk.iter().map(|(k, _)| k.clone()));
                }
            }
        }
        report.elapsed = started.elapsed();
        self.bag_report = Some(report);
    }
}

/// What reading the bags at start-up found, logged once the application's logger exists.
#[derive(Debug, Default)]
struct BagReport {
    bags: usize,
    connections: usize,
    elapsed: std::time::Duration,
    /// The soft limit of open descriptors, raised from and to.
    raised: Option<(u64, u64)>,
    problems: Vec<String>,
}

/// Logs what reading the bags of connections at start-up found (once).
pub(crate) fn report_bags() {
    let Some(r) = inherited().as_mut().ok().and_then(|i| i.bag_report.take()) else {
        return;
    };
    tracing::info!(
        elapsed = ?r.elapsed,
        "{} stored connections read from {} bags",
        r.connections,
        r.bags
    );
    if let Some((from, to)) = r.raised {
        tracing::info!("raised the soft limit of open descriptors from {from} to {to}");
    }
    for p in &r.problems {
        tracing::error!("stored connections: {p}");
    }
}

/// Lifts the soft limit on open descriptors to the hard one: the connections in the bags are
/// about to arrive, and those beyond the soft limit would be lost. Under systemd the hard limit
/// is the unit's `LimitNOFILE=` (524288 by default since systemd 240). From and to, when raised.
fn raise_nofile_limit() -> Option<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit, which we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            let soft = l.rlim_cur;
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 {
                return Some((soft, l.rlim_max));
            }
        }
    }
    None
}

/// Takes ownership of the descriptors `d` describes, at `FIRST_FD..`: each must be open; each is
/// made close-on-exec at once. Nothing is owned unless every one is open.
fn open(d: Description, executable: Option<PathBuf>) -> Result<Inherited, InheritError> {
    for (i, name) in d.names.iter().enumerate() {
        let fd = FIRST_FD + i as RawFd;
        // SAFETY: F_GETFD only reads the descriptor's flags; on a number that is not open it
        // fails with EBADF. No memory is touched.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(InheritError::NotOpen {
                var: d.count_var,
                fd,
                name: name.clone(),
            });
        }
    }
    let mut set = Inherited {
        origin: d.origin,
        mode: d.mode,
        generation: d.generation,
        fds: BTreeMap::new(),
        bagged: HashMap::new(),
        drained_bags: Vec::new(),
        new_bags: Vec::new(),
        loose: HashSet::new(),
        bag_report: None,
        executable,
    };
    for (i, name) in d.names.into_iter().enumerate() {
        let raw = FIRST_FD + i as RawFd;
        // SAFETY: the environment, addressed to this process (PID check in `parse`), hands us
        // this open descriptor (checked above with F_GETFD); nothing else in the process owns
        // it, and it is taken once, since the environment is read once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_cloexec(&fd);
        // systemd gives every socket of one .socket unit the same name: keep them all apart.
        set.insert(&name, fd);
    }
    set.unpack_bags();
    Ok(set)
}

/// Parses the environment and takes the descriptors it describes.
fn read_environment(get: &dyn Fn(&str) -> Option<OsString>) -> Result<Inherited, InheritError> {
    let me = Identity::current(get);
    let d = parse(get, me)?;
    match d.origin {
        Origin::Parent => die_with_parent(me.parent),
        _ => report_wrapper(get, me),
    }
    open(d, get_executable(get))
}

/// A successor must not outlive the generation that started it before it took over (a restart
/// abandoned half-way, say by a SIGTERM to the old generation): until it declares itself ready,
/// it is killed when its parent dies (`PR_SET_PDEATHSIG`; [`clear_parent_death_signal`]
/// lifts that). A parent that died already ends it now.
///
/// `PR_SET_PDEATHSIG` belongs to the thread that set it, and only that thread can lift it; the
/// readiness is declared on whichever thread first polls the restart task (a runtime's worker,
/// when a framework spawns it). So a thread of its own holds it, and lifts it by ending when
/// the process is ready: set on the main thread, it would stay set, and the new generation
/// would be killed when the old one exits after a successful restart.
fn die_with_parent(parent: u32) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (armed_tx, armed_rx) = std::sync::mpsc::channel();
    let holder = std::thread::Builder::new()
        .name("shellflip-parent".into())
        .spawn(move || {
            let armed = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            let _ = armed_tx.send(armed);
            // Until ready (the sender is dropped); the thread's end lifts the signal.
            let _ = ready_rx.recv();
        });
    match holder.map(|h| (armed_rx.recv(), h)) {
        Ok((Ok(Ok(())), holder)) => {
            *PARENT_DEATH.lock().unwrap_or_else(|p| p.into_inner()) = Some((ready_tx, holder));
        }
        Ok((Ok(Err(e)), _)) => {
            tracing::warn!("cannot ask to be stopped with the parent generation: {e}")
        }
        Ok((Err(_), _)) | Err(_) => {
            tracing::warn!("cannot ask to be stopped with the parent generation: no thread")
        }
    }
    if std::os::unix::process::parent_id() != parent {
        eprintln!(
            "shellflip: the generation that started this process (PID {parent}) is gone before \
             this one was ready: the restart was abandoned; exiting"
        );
        std::process::exit(1);
    }
}

/// The thread that holds `PR_SET_PDEATHSIG` ([`die_with_parent`]), and what ends it.
type Holder = (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>);
static PARENT_DEATH: std::sync::Mutex<Option<Holder>> = std::sync::Mutex::new(None);

/// Once ready, this process is the service: its parent generation may exit. Works from any
/// thread; returns once the thread that held the signal has ended (at once: it only waits).
pub(crate) fn clear_parent_death_signal() {
    let holder = PARENT_DEATH
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some((ready, thread)) = holder {
        drop(ready);
        let _ = thread.join();
    }
}

/// A successor started through a wrapper that did not `exec` it sees the wrapper as its parent
/// and ignores what was handed over; without a word, the old generation would only learn that
/// "it exited with status 1". When the wrapper's parent is the generation that handed over, say
/// why on the readiness pipe, which the wrapper passed on.
fn report_wrapper(get: &dyn Fn(&str) -> Option<OsString>, me: Identity) {
    let Some(handing) = get(ENV_PPID).and_then(|v| v.to_str()?.parse::<u32>().ok()) else {
        return;
    };
    if handing == me.parent || grandparent(me.parent) != Some(handing) {
        return;
    }
    let Ok(names) = parse_names(get, ENV_FDS, ENV_FDNAMES) else {
        return;
    };
    let Some(i) = names.iter().position(|n| n == READY_FD) else {
        return;
    };
    let raw = FIRST_FD + i as RawFd;
    // SAFETY: F_GETFD only reads the descriptor's flags (EBADF when it is not open).
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return;
    }
    // SAFETY: the descriptor is open (checked above); it is only written to below, never
    // closed, and the borrow ends with this function, during which nothing else in this
    // starting process closes it.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    let is_pipe = nix::sys::stat::fstat(fd)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
        .unwrap_or(false);
    if !is_pipe {
        return;
    }
    let reason = format!(
        "process {} was started by process {}, a child of the generation that handed over ({handing}): \
         a wrapper ran the service without `exec`, so the service could not take what was handed \
         over; make the wrapper `exec` the service",
        me.pid, me.parent
    );
    let _ = nix::unistd::write(fd, &ReadyLine::Failed(reason).encode());
}

/// The parent of process `pid`, from `/proc/PID/stat`.
fn grandparent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ')'.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

static INHERITED: OnceLock<Mutex<Result<Inherited, InheritError>>> = OnceLock::new();

/// Reads the environment once; every later call returns the same set.
pub(crate) fn inherited() -> MutexGuard<'static, Result<Inherited, InheritError>> {
    INHERITED
        .get_or_init(|| Mutex::new(read_environment(&|k| std::env::var_os(k))))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes one of the library's own descriptors (a reserved name) out of the inherited set.
pub(crate) fn take(name: &str) -> Result<Option<OwnedFd>, InheritError> {
    let mut set = inherited();
    let set = set.as_mut().map_err(|e| e.clone())?;
    Ok(set.take(name))
}

/// The names of the bags read at start-up: systemd still holds them, empty.
pub(crate) fn drained_bags() -> Vec<String> {
    inherited()
        .as_ref()
        .map(|i| i.drained_bags.clone())
        .unwrap_or_default()
}

/// The new bags that hold the connections read from bags at start-up, with what each holds:
/// for systemd's store (once).
pub(crate) fn take_new_bags() -> Vec<(Bag, Vec<Label>)> {
    inherited()
        .as_mut()
        .map(|i| std::mem::take(&mut i.new_bags))
        .unwrap_or_default()
}

/// Whether the inherited descriptor `name` came out of a bag (systemd does not hold it by name).
pub(crate) fn came_from_bag(name: &str) -> bool {
    inherited()
        .as_ref()
        .is_ok_and(|i| i.bagged.contains_key(name) || i.loose.contains(name))
}

/// The names still in the inherited set: what this generation did not take.
pub(crate) fn unclaimed() -> Vec<String> {
    inherited()
        .as_ref()
        .map(Inherited::names)
        .unwrap_or_default()
}

/// The program a restart starts: argv\[0\] as resolved at start-up.
pub(crate) fn executable() -> Option<PathBuf> {
    inherited().as_ref().ok().and_then(|i| i.executable.clone())
}

/// Reads the inherited descriptors from the environment and removes the library's variables
/// from it, so that no program the service starts later sees them.
///
/// Call it first thing in `main`, before any thread exists (before a tokio runtime is built).
/// Without it the library still reads the environment on first use and never passes its
/// variables to a process it starts itself, but programs the service starts with
/// [`std::process::Command`] would inherit them (they are harmless there: their PID checks fail
/// and the descriptors are close-on-exec, but they are noise).
///
/// Returns how the process was started.
///
/// # Safety
///
/// This calls [`std::env::remove_var`]: no other thread may read or write the environment at
/// the same time. Calling it before any other thread is started is sound.
///
/// # Examples
///
/// ```
/// // First thing in main, before any thread exists.
/// // SAFETY: no other thread exists yet.
/// let origin = unsafe { shellflip::init_from_env() };
/// println!("started as {origin:?}");
/// // ... build the tokio runtime afterwards.
/// ```
pub unsafe fn init_from_env() -> Result<Origin, InheritError> {
    let origin = inherited().as_ref().map(|i| i.origin).map_err(Clone::clone);
    for var in PROTOCOL_VARS {
        // SAFETY: the caller promises that no other thread touches the environment now.
        unsafe { std::env::remove_var(var) };
    }
    origin
}

/// How this process was started: fresh, by its parent generation, or by systemd from its store.
///
/// An environment that describes descriptors wrongly counts as [`Origin::Fresh`]; the error is
/// returned by the [`Registry`](crate::Registry) calls that would have adopted them.
pub fn origin() -> Origin {
    inherited()
        .as_ref()
        .map(|i| i.origin)
        .unwrap_or(Origin::Fresh)
}

/// The generation of this process: 0 when started fresh, one more than its predecessor's after
/// a restart. In the systemd lifecycle the generation travels with the state, so it is known
/// once [`receive_from_old_process`](crate::receive_from_old_process) has read it.
pub fn generation() -> u64 {
    inherited().as_ref().map(|i| i.generation).unwrap_or(0)
}

/// True when this process was started only to check a state handed over by the running
/// generation (the systemd lifecycle's validation run, B6). Such a run exits as soon as it
/// declares itself ready, and must not do anything lasting before that.
pub fn is_validation_run() -> bool {
    inherited()
        .as_ref()
        .map(|i| i.mode == Mode::Validate)
        .unwrap_or(false)
}

pub(crate) fn set_generation(generation: u64) {
    if let Ok(i) = inherited().as_mut() {
        i.generation = generation;
    }
}

/// argv\[0\] as an absolute path, resolved against `$PATH` or the current directory now, at
/// start-up: a binary replaced on disk at that path is the one a restart starts. Symbolic links
/// are kept, so a deployment that switches a link is followed.
fn get_executable(get: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.is_absolute() {
        return Some(argv0);
    }
    if argv0.components().count() > 1 {
        return std::env::current_dir().ok().map(|d| d.join(argv0));
    }
    let path = get("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(&argv0))
        .find(|candidate| is_executable(candidate))
        .and_then(|p| {
            if p.is_absolute() {
                Some(p)
            } else {
                std::env::current_dir().ok().map(|d| d.join(p))
            }
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Checks a descriptor name: 1 to 255 printable ASCII characters, no `:` (systemd's rule).
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        return Err("a name has 1 to 255 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err("a name is printable ASCII without ':' or spaces");
    }
    Ok(())
}

pub(crate) fn set_cloexec(fd: &impl AsFd) {
    if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        tracing::warn!(
            "cannot set close-on-exec on descriptor {}: {e}",
            fd.as_fd().as_raw_fd()
        );
    }
}

fn parse_number(var: &'static str, value: Option<OsString>) -> Result<u64, InheritError> {
    let value = value.unwrap_or_default();
    let text = value.to_string_lossy();
    text.parse::<u64>()
        .map_err(|_| malformed(var, &text, "not a number"))
}

fn malformed(var: &'static str, value: &str, why: &'static str) -> InheritError {
    InheritError::Malformed {
        var,
        value: value.to_owned(),
        why,
    }
}

/// The environment of a successor: ours without the protocol's variables, plus `extra`, plus
/// the description of `names` (placed at `3..`) for a child of this process.
pub(crate) fn successor_environment(
    extra: &[(OsString, OsString)],
    names: &[String],
    generation: u64,
    mode: Mode,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !PROTOCOL_VARS.iter().any(|v| OsStr::new(v) == k))
        .filter(|(k, _)| mode == Mode::Serve || k != "NOTIFY_SOCKET")
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .collect();
    env.extend(extra.iter().cloned());
    let mode = match mode {
        Mode::Serve => "serve",
        Mode::Validate => "validate",
    };
    for (k, v) in [
        (ENV_PPID, std::process::id().to_string()),
        (ENV_FDS, names.len().to_string()),
        (ENV_FDNAMES, names.join(":")),
        (ENV_GENERATION, generation.to_string()),
        (ENV_MODE, mode.to_owned()),
    ] {
        env.push((k.into(), v.into()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// A process with PID 100 whose parent is 99, on a kernel without pidfs.
    const ME: Identity = Identity {
        pid: 100,
        parent: 99,
        pidfd_id: None,
    };

    fn parse_env(pairs: &[(&str, String)]) -> Result<Description, InheritError> {
        parse(&env(pairs), ME)
    }

    #[test]
    fn empty_environment_is_fresh() {
        let d = parse_env(&[]).unwrap();
        assert_eq!(d.origin, Origin::Fresh);
        assert!(d.names.is_empty());
    }

    #[test]
    fn foreign_listen_pid_is_ignored() {
        let d = parse_env(&[
            ("LISTEN_PID", "1".into()),
            ("LISTEN_FDS", "3".into()),
            ("LISTEN_FDNAMES", "a:b:c".into()),
        ])
        .unwrap();
        assert!(d.names.is_empty());
    }

    #[test]
    fn foreign_parent_pid_is_ignored() {
        let d = parse_env(&[
            (ENV_PPID, "1".into()),
            (ENV_FDS, "1".into()),
            (ENV_FDNAMES, "x".into()),
        ])
        .unwrap();
        assert_eq!(d.origin, Origin::Fresh);
    }

    #[test]
    fn a_parent_generation_is_described() {
        let d = parse_env(&[
            (ENV_PPID, "99".into()),
            (ENV_FDS, "2".into()),
            (ENV_FDNAMES, "http:shellflip.state".into()),
            (ENV_GENERATION, "4".into()),
            (ENV_MODE, "validate".into()),
        ])
        .unwrap();
        assert_eq!(d.origin, Origin::Parent);
        assert_eq!(d.mode, Mode::Validate);
        assert_eq!(d.generation, 4);
        assert_eq!(d.names, ["http", "shellflip.state"]);
    }

    #[test]
    fn systemd_store_is_told_apart_from_socket_activation() {
        let store = parse_env(&[
            ("LISTEN_PID", "100".into()),
            ("LISTEN_FDS", "2".into()),
            ("LISTEN_FDNAMES", "http:shellflip.state".into()),
        ])
        .unwrap();
        assert_eq!(store.origin, Origin::Systemd);
        let activation =
            parse_env(&[("LISTEN_PID", "100".into()), ("LISTEN_FDS", "2".into())]).unwrap();
        assert_eq!(activation.origin, Origin::Fresh);
        assert_eq!(activation.names, ["unknown.0", "unknown.1"]);
    }

    #[test]
    fn listen_pidfdid_must_name_this_process_when_both_are_known() {
        let store = |id: &str| {
            vec![
                ("LISTEN_PID", "100".to_owned()),
                ("LISTEN_PIDFDID", id.to_owned()),
                ("LISTEN_FDS", "1".to_owned()),
                ("LISTEN_FDNAMES", "http".to_owned()),
            ]
        };
        let pidfs = Identity {
            pidfd_id: Some(4242),
            ..ME
        };
        // Ours: adopted.
        let d = parse(&env(&store("4242")), pidfs).unwrap();
        assert_eq!(d.names, ["http"]);
        // The same PID, but another process (the PID was reused): ignored, like a foreign PID.
        let d = parse(&env(&store("4243")), pidfs).unwrap();
        assert!(d.names.is_empty(), "{d:?}");
        // Our id unknown (no pidfs): LISTEN_PID alone decides, as before.
        let d = parse(&env(&store("4243")), ME).unwrap();
        assert_eq!(d.names, ["http"]);
        // Not a number: a clear error.
        let err = parse(&env(&store("x")), pidfs).unwrap_err();
        assert!(err.to_string().contains("LISTEN_PIDFDID"), "{err}");
    }

    #[test]
    fn adoption_checks_listen_pidfdid_against_this_process() {
        // 4000 descriptors that are certainly not open: adopting them fails with NotOpen, so
        // the outcome tells whether the environment was taken as meant for this process.
        let pid = std::process::id().to_string();
        let names: Vec<String> = (0..4000).map(|i| format!("n{i}")).collect();
        let with_id = |id: String| {
            read_environment(&env(&[
                ("LISTEN_PID", pid.clone()),
                ("LISTEN_PIDFDID", id),
                ("LISTEN_FDS", "4000".into()),
                ("LISTEN_FDNAMES", names.join(":")),
            ]))
        };
        match pidfd_id_of_self().unwrap() {
            Some(ours) => {
                // pidfs (Linux 6.9+): our own id is adopted, another process's is ignored.
                let err = with_id(ours.to_string()).unwrap_err();
                assert!(matches!(err, InheritError::NotOpen { .. }), "{err}");
                let other = with_id((ours + 1).to_string()).expect("ignored, not an error");
                assert!(other.names().is_empty());
            }
            None => {
                // No pidfs: the id cannot be compared, LISTEN_PID decides.
                let err = with_id("1".into()).unwrap_err();
                assert!(matches!(err, InheritError::NotOpen { .. }), "{err}");
            }
        }
    }

    #[test]
    fn this_process_has_a_pidfd_and_its_id_is_stable() {
        let fd = pidfd_of_self().expect("pidfd_open (Linux 5.3+)");
        assert!(fd.as_raw_fd() >= 0);
        // Where pidfs exists, two pidfds of one process share one inode: the id systemd sends.
        let a = pidfd_id_of_self().unwrap();
        let b = pidfd_id_of_self().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn malformed_count_is_a_clear_error() {
        let err =
            parse_env(&[("LISTEN_PID", "100".into()), ("LISTEN_FDS", "two".into())]).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDS"), "{err}");
        assert!(err.to_string().contains("not a number"), "{err}");
    }

    #[test]
    fn names_must_match_count() {
        let err = parse_env(&[
            ("LISTEN_PID", "100".into()),
            ("LISTEN_FDS", "2".into()),
            ("LISTEN_FDNAMES", "only-one".into()),
        ])
        .unwrap_err();
        assert!(matches!(err, InheritError::Malformed { why, .. } if why.contains("differs")));
    }

    #[test]
    fn bad_mode_and_huge_counts_are_refused() {
        let err = parse_env(&[(ENV_PPID, "99".into()), (ENV_MODE, "x".into())]).unwrap_err();
        assert!(err.to_string().contains(ENV_MODE), "{err}");
        let err = parse_env(&[
            ("LISTEN_PID", "100".into()),
            ("LISTEN_FDS", "99999999999".into()),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("too many"), "{err}");
    }

    #[test]
    fn a_mode_that_is_not_text_is_malformed() {
        use std::os::unix::ffi::OsStringExt;
        let get = |k: &str| match k {
            ENV_PPID => Some(OsString::from("99")),
            ENV_MODE => Some(OsString::from_vec(vec![0x8a])),
            _ => None,
        };
        let err = parse(&get, ME).unwrap_err();
        assert!(err.to_string().contains(ENV_MODE), "{err}");
    }

    #[test]
    fn readiness_lines_round_trip() {
        assert_eq!(
            ReadyLine::decode(&ReadyLine::Ready.encode()),
            Some(ReadyLine::Ready)
        );
        let failed = ReadyLine::Failed("line 3:\nbad".into());
        assert_eq!(
            ReadyLine::decode(&failed.encode()),
            Some(ReadyLine::Failed("line 3: bad".into()))
        );
        let long = ReadyLine::Failed("é".repeat(MAX_REASON));
        assert!(long.encode().len() <= MAX_REASON);
        assert_eq!(ReadyLine::decode(b""), None);
        assert_eq!(ReadyLine::decode(b"?what"), None);
    }

    #[test]
    fn closed_descriptor_is_a_clear_error() {
        // A count large enough to reach numbers that are certainly not open in the test process.
        let pid = std::process::id().to_string();
        let names: Vec<String> = (0..4000).map(|i| format!("n{i}")).collect();
        let err = read_environment(&env(&[
            ("LISTEN_PID", pid),
            ("LISTEN_FDS", "4000".into()),
            ("LISTEN_FDNAMES", names.join(":")),
        ]))
        .unwrap_err();
        // The parser alone accepts it: only the adoption step touches descriptors.
        assert!(matches!(err, InheritError::NotOpen { .. }), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(check_name("http").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn successor_environment_replaces_protocol_variables() {
        let env = successor_environment(
            &[("EXTRA".into(), "1".into())],
            &["http".into(), "shellflip.ready".into()],
            7,
            Mode::Validate,
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(ENV_FDS).unwrap(), "2");
        assert_eq!(get(ENV_FDNAMES).unwrap(), "http:shellflip.ready");
        assert_eq!(get(ENV_GENERATION).unwrap(), "7");
        assert_eq!(get(ENV_MODE).unwrap(), "validate");
        assert_eq!(get("EXTRA").unwrap(), "1");
        assert!(get("NOTIFY_SOCKET").is_none());
        assert_eq!(env.iter().filter(|(k, _)| k == ENV_FDS).count(), 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_environment_parses_or_is_a_clear_error(
                ppid in proptest::option::of(prop_oneof![Just("99".to_owned()), "[0-9a-z]{0,12}"]),
                listen_pid in proptest::option::of(prop_oneof![Just("100".to_owned()), "[0-9a-z]{0,12}"]),
                count in proptest::option::of("[0-9]{0,6}|[a-z]{1,3}"),
                names in proptest::option::of("[ -~]{0,64}"),
                mode in proptest::option::of("serve|validate|[a-z]{0,8}"),
            ) {
                let mut pairs = Vec::new();
                if let Some(v) = ppid { pairs.push((ENV_PPID, v)); }
                if let Some(v) = listen_pid { pairs.push(("LISTEN_PID", v)); }
                if let Some(v) = count.clone() { pairs.push((ENV_FDS, v.clone())); pairs.push(("LISTEN_FDS", v)); }
                if let Some(v) = names { pairs.push((ENV_FDNAMES, v.clone())); pairs.push(("LISTEN_FDNAMES", v)); }
                if let Some(v) = mode { pairs.push((ENV_MODE, v)); }
                match parse_env(&pairs) {
                    Ok(d) => {
                        for name in &d.names {
                            prop_assert!(check_name(name).is_ok(), "{name:?}");
                        }
                        if !d.names.is_empty() {
                            let n: usize = count.as_deref().unwrap_or("").parse().unwrap_or(usize::MAX);
                            prop_assert_eq!(d.names.len(), n);
                        }
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
}
