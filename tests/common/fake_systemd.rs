//! A stand-in for systemd in the systemd lifecycle: its notify socket, its file descriptor
//! store, and starting a process the way systemd starts one (the store's descriptors at 3..,
//! described in `LISTEN_FDS`/`LISTEN_FDNAMES`, `LISTEN_PID` set to the process's own PID).
//!
//! The store behaves as systemd 252's: one `FDSTORE=1` message may carry many descriptors (up
//! to 253), all under its one `FDNAME=`; a name may be used by many entries; a descriptor
//! already in the store (the same open file, `kcmp`) is not added twice; the newest entry comes
//! first in `LISTEN_FDNAMES`; `FDSTOREREMOVE=1` drops every entry of the name; an entry stored
//! without `FDPOLL=0` is dropped once it hangs up or fails (checked when the next process is
//! started).

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::{PROTOCOL_VARS, poll_until};

/// One entry of the store.
pub struct Entry {
    pub name: String,
    pub fd: OwnedFd,
    /// Whether systemd watches it for hang-ups (not with `FDPOLL=0`).
    pub poll: bool,
}

/// The store: what `FDSTORE=1` put there, newest first, less what `FDSTOREREMOVE=1` took.
#[derive(Default)]
pub struct Store(pub Vec<Entry>);

impl Store {
    /// Whether an entry has this name.
    pub fn contains_key(&self, name: &str) -> bool {
        self.0.iter().any(|e| e.name == name)
    }

    /// The names of the entries, newest first (a name once per entry).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|e| &e.name)
    }

    /// How many descriptors it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys()).finish()
    }
}

impl std::ops::Index<&str> for Store {
    type Output = OwnedFd;

    /// The newest entry of that name.
    fn index(&self, name: &str) -> &OwnedFd {
        &self
            .0
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name:?} in the store"))
            .fd
    }
}

/// The reserved name prefix of shellflip's bags of connections.
pub const BAG_PREFIX: &str = "shellflip.bag.";

/// Whether two descriptors of this process are the same open file (systemd's `same_fd`).
fn same_fd(a: &OwnedFd, b: &OwnedFd) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id() as i32);
    // SAFETY: kcmp only compares two descriptors of this process; no memory is touched.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    };
    r == 0
}

/// The names of the descriptors waiting in a bag, read without taking anything out (`MSG_PEEK`
/// from offset 0 on, `SO_PEEK_OFF`); the descriptors themselves are not received.
pub fn peek_bag(fd: &OwnedFd) -> Vec<String> {
    let set_peek_off = |off: libc::c_int| {
        // SAFETY: setsockopt reads one c_int, which lives on the stack for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEEK_OFF,
                (&raw const off).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    let mut names = Vec::new();
    if set_peek_off(0) != 0 {
        return names;
    }
    let mut buf = vec![0u8; 1 << 17];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf, which we own.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        let mut lines = text.lines();
        if lines.next() != Some("SHFLBAG1") {
            break;
        }
        names.extend(lines.filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned)));
    }
    set_peek_off(-1);
    names
}

/// systemd's notify socket and file descriptor store, played by the test.
pub struct FakeSystemd {
    socket: UnixDatagram,
    pub path: PathBuf,
    pub store: Store,
    /// Every notification received, in order.
    pub messages: Vec<String>,
    /// The descriptors that came with the last notification that was not `FDSTORE=1` (such
    /// as the pidfd of `MAINPIDFD=1`).
    pub passed: Vec<OwnedFd>,
}

impl FakeSystemd {
    /// Binds the notify socket in `dir`.
    pub fn new(dir: &Path) -> FakeSystemd {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("SO_RCVTIMEO");
        FakeSystemd {
            socket,
            path,
            store: Store::default(),
            messages: Vec::new(),
            passed: Vec::new(),
        }
    }

    /// Receives one notification (waiting at most 200 ms), applying `FDSTORE=1` and
    /// `FDSTOREREMOVE=1` to the store.
    pub fn receive(&mut self) -> Option<String> {
        let mut buf = vec![0u8; 8192];
        let mut cmsg = nix::cmsg_space!([RawFd; 253]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg: {e}"),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().expect("control messages") {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS just gave us these new descriptors; we own them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let name = fields.get("FDNAME").copied().unwrap_or("stored");
        if fields.get("FDSTORE") == Some(&"1") {
            let poll = fields.get("FDPOLL") != Some(&"0");
            for fd in fds {
                if self.store.0.iter().any(|e| same_fd(&e.fd, &fd)) {
                    continue; // systemd: "fd already included"
                }
                self.store.0.insert(
                    0,
                    Entry {
                        name: name.to_string(),
                        fd,
                        poll,
                    },
                );
            }
        } else {
            self.passed = fds;
        }
        if fields.get("FDSTOREREMOVE") == Some(&"1") {
            self.store.0.retain(|e| e.name != name);
        }
        self.messages.push(text.clone());
        Some(text)
    }

    /// Receives until a message has the line `what`, or panics after `limit` with the messages
    /// and the service's log.
    pub fn wait_for(&mut self, what: &str, limit: Duration, log: &Path) -> String {
        poll_until(limit, || {
            self.receive().filter(|m| m.lines().any(|l| l == what))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {what} within {limit:?}; messages: {:?}\nlog:\n{}",
                self.messages,
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
    }

    /// Receives what is queued now.
    pub fn drain(&mut self) {
        while self.receive().is_some() {}
    }

    /// Names that start with `prefix` of what the store holds, sorted: its entries, and the
    /// connections waiting in shellflip's bags.
    pub fn stored(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .store
            .0
            .iter()
            .flat_map(|e| {
                if e.name.starts_with(BAG_PREFIX) {
                    peek_bag(&e.fd)
                } else {
                    vec![e.name.clone()]
                }
            })
            .filter(|k| k.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    /// The store's entries that are bags.
    pub fn bags(&self) -> usize {
        self.store
            .keys()
            .filter(|k| k.starts_with(BAG_PREFIX))
            .count()
    }

    /// Drops the entries systemd would have dropped by now: those it watches that hung up or
    /// failed.
    pub fn poll_store(&mut self) {
        self.store.0.retain(|e| {
            if !e.poll {
                return true;
            }
            let mut pfd = [nix::poll::PollFd::new(
                e.fd.as_fd(),
                nix::poll::PollFlags::empty(),
            )];
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO) {
                Ok(0) => true,
                Ok(_) => !pfd[0].revents().is_some_and(|r| {
                    r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR)
                }),
                Err(_) => true,
            }
        });
    }

    /// A command that runs `program` the way systemd starts a service with this store: add
    /// arguments and output, then spawn it. The library's variables of the test process are
    /// removed; `NOTIFY_SOCKET` points here.
    pub fn command(&mut self, program: &Path) -> Command {
        self.poll_store();
        let names: Vec<&str> = self.store.keys().map(String::as_str).collect();
        let mut cmd = Command::new("/bin/sh");
        // $$ is the shell's PID, which exec keeps: the PID of the service.
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$@\"")
            .arg("sh")
            .arg(program);
        for var in PROTOCOL_VARS {
            cmd.env_remove(var);
        }
        cmd.env("NOTIFY_SOCKET", &self.path);
        if !names.is_empty() {
            cmd.env("LISTEN_FDS", names.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        // Copies above the range 3.. (close-on-exec, owned by the command, so closed here when
        // it is dropped), each put on its place in the child.
        let above = 3 + names.len() as RawFd;
        let copies: Vec<OwnedFd> = self
            .store
            .0
            .iter()
            .map(|e| {
                let raw = fcntl(&e.fd, FcntlArg::F_DUPFD_CLOEXEC(above)).expect("F_DUPFD_CLOEXEC");
                // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it.
                unsafe { OwnedFd::from_raw_fd(raw) }
            })
            .collect();
        // SAFETY: between fork and exec only dup2, which is async-signal-safe, on descriptors
        // the closure owns (so they are open until the command is dropped).
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in copies.iter().enumerate() {
                    // dup2 clears close-on-exec on the target: only these reach the service.
                    if libc::dup2(fd.as_raw_fd(), 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }
}
