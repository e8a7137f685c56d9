//! A stand-in for systemd in the systemd lifecycle: its notify socket, its file descriptor
//! store, and starting a process the way systemd starts one (the store's descriptors at 3..,
//! described in `LISTEN_FDS`/`LISTEN_FDNAMES`, `LISTEN_PID` set to the process's own PID).

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::{PROTOCOL_VARS, poll_until};

/// systemd's notify socket and file descriptor store, played by the test.
pub struct FakeSystemd {
    socket: UnixDatagram,
    pub path: PathBuf,
    /// The store: what `FDSTORE=1` put there, by `FDNAME=`, less what `FDSTOREREMOVE=1` took.
    pub store: BTreeMap<String, OwnedFd>,
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
            store: BTreeMap::new(),
            messages: Vec::new(),
            passed: Vec::new(),
        }
    }

    /// Receives one notification (waiting at most 200 ms), applying `FDSTORE=1` and
    /// `FDSTOREREMOVE=1` to the store.
    pub fn receive(&mut self) -> Option<String> {
        let mut buf = vec![0u8; 8192];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
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
            for fd in fds {
                self.store.insert(name.to_string(), fd);
            }
        } else {
            self.passed = fds;
        }
        if fields.get("FDSTOREREMOVE") == Some(&"1") {
            self.store.remove(name);
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

    /// Names in the store that start with `prefix`.
    pub fn stored(&self, prefix: &str) -> Vec<String> {
        self.store
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// A command that runs `program` the way systemd starts a service with this store: add
    /// arguments and output, then spawn it. The library's variables of the test process are
    /// removed; `NOTIFY_SOCKET` points here.
    pub fn command(&self, program: &Path) -> Command {
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
            .values()
            .map(|fd| {
                let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(above)).expect("F_DUPFD_CLOEXEC");
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
