//! The systemd lifecycle against a notify socket played by the test: the messages, the
//! descriptors and their names in the store, the framing of the stored state, and the next
//! generation started the way systemd starts it (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`).
//!
//! This is the fast protocol test; `scripts/systemd-test.sh` checks the same under a real
//! systemd.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// A stand-in for systemd: its notify socket and its file descriptor store.
struct FakeSystemd {
    socket: UnixDatagram,
    path: PathBuf,
    store: BTreeMap<String, OwnedFd>,
    messages: Vec<String>,
}

impl FakeSystemd {
    fn new(dir: &Path) -> FakeSystemd {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        FakeSystemd {
            socket,
            path,
            store: BTreeMap::new(),
            messages: Vec::new(),
        }
    }

    /// Receives one notification, applying FDSTORE/FDSTOREREMOVE to the store.
    fn receive(&mut self) -> Option<String> {
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
        for c in msg.cmsgs().unwrap() {
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
        }
        if fields.get("FDSTOREREMOVE") == Some(&"1") {
            self.store.remove(name);
        }
        self.messages.push(text.clone());
        Some(text)
    }

    /// Receives until a message contains `what`, or panics after `limit`.
    fn wait_for(&mut self, what: &str, limit: Duration, log: &Path) -> String {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(m) = self.receive() {
                if m.lines().any(|l| l == what) {
                    return m;
                }
            }
        }
        panic!(
            "no {what} within {limit:?}; messages: {:?}\nlog:\n{}",
            self.messages,
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// Drains what is queued now.
    fn drain(&mut self) {
        while self.receive().is_some() {}
    }
}

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/restarter")
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Service {
    child: Child,
    log: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    http: SocketAddr,
    echo: SocketAddr,
    socket: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let config = dir.path().join("restarter.toml");
        std::fs::write(&config, "greeting = \"fake systemd\"\n").unwrap();
        Setup {
            http: free_addr(),
            echo: free_addr(),
            socket,
            config,
            dir,
        }
    }

    /// Starts a generation the way systemd does: the store's descriptors at 3.., described in
    /// LISTEN_FDS/LISTEN_FDNAMES, LISTEN_PID set to the new process's PID.
    fn start(&self, systemd: &FakeSystemd, n: usize) -> Service {
        let log = self.dir.path().join(format!("gen{n}.log"));
        let names: Vec<&String> = systemd.store.keys().collect();
        let raw: Vec<RawFd> = systemd.store.values().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            // $$ is the shell's PID, which exec keeps: the PID of the service.
            .arg("LISTEN_PID=$$ exec \"$@\"")
            .arg("sh")
            .arg(example())
            .args(["--systemd", "--http", &self.http.to_string()])
            .args(["--echo", &self.echo.to_string()])
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &systemd.path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if !raw.is_empty() {
            cmd.env("LISTEN_FDS", raw.len().to_string()).env(
                "LISTEN_FDNAMES",
                names
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(":"),
            );
        }
        // Place the descriptors at 3.. in the child: first above the range, then down.
        let high_base = 3 + raw.len() as RawFd + 64;
        // SAFETY: between fork and exec only dup2 and fcntl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, high_base + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..raw.len() {
                    if libc::dup2(high_base + i as RawFd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(high_base + i as RawFd);
                }
                Ok(())
            });
        }
        Service {
            child: cmd.spawn().unwrap(),
            log,
        }
    }
}

fn get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines().last().unwrap_or_default().to_string()
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shellflip"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn wait_exit(service: &mut Service, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "did not exit within {limit:?}:\n{}",
            std::fs::read_to_string(&service.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn store_restart_validation_and_torn_state() {
    let setup = Setup::new();
    let mut systemd = FakeSystemd::new(setup.dir.path());

    // Generation 0: binds, stores its listeners, the control socket and a state memfd, READY=1.
    let mut gen0 = setup.start(&systemd, 0);
    systemd.wait_for("READY=1", LIMIT, &gen0.log);
    for name in ["http", "echo", "shellflip.control", "shellflip.state"] {
        assert!(
            systemd.store.contains_key(name),
            "{name} not stored: {:?}",
            systemd.messages
        );
    }
    assert!(get(setup.http).starts_with("generation=0 "));

    // An echo client, connected before the restart.
    let echo = TcpStream::connect(setup.echo).unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut echo_in = BufReader::new(echo.try_clone().unwrap());
    let mut echo_out = echo;
    let mut line = String::new();
    echo_in.read_line(&mut line).unwrap();
    assert!(line.starts_with("generation=0 "), "{line}");

    // SIGTERM (systemctl restart): STOPPING=1, the state committed in the memfd, the echo
    // client put in the store, exit 0.
    // SAFETY: kill with the PID of a child this test started.
    unsafe { libc::kill(gen0.child.id() as i32, libc::SIGTERM) };
    systemd.wait_for("STOPPING=1", LIMIT, &gen0.log);
    let status = wait_exit(&mut gen0, LIMIT);
    systemd.drain();
    assert_eq!(status.code(), Some(0));
    let state = std::fs::File::from(systemd.store["shellflip.state"].try_clone().unwrap());
    let len = state.metadata().unwrap().len() as usize;
    let mut bytes = vec![0u8; len];
    state.read_exact_at(&mut bytes, 0).unwrap();
    assert!(bytes.starts_with(b"SHFLSTA1"), "state header");
    assert!(bytes.ends_with(b"SHFLEND1"), "state committed");
    let kept: Vec<&String> = systemd
        .store
        .keys()
        .filter(|k| k.starts_with("echo."))
        .collect();
    assert_eq!(
        kept.len(),
        1,
        "the echo client kept: {:?}",
        systemd.store.keys()
    );

    // A line sent while nobody serves waits in the kernel for the next generation.
    echo_out.write_all(b"across the gap\n").unwrap();

    // Generation 1, started from the store.
    let gen1 = setup.start(&systemd, 1);
    systemd.wait_for("READY=1", LIMIT, &gen1.log);
    assert!(
        get(setup.http).starts_with("generation=1 "),
        "{}",
        get(setup.http)
    );
    line.clear();
    echo_in.read_line(&mut line).unwrap();
    assert_eq!(line, "across the gap\n");
    echo_out.write_all(b"still here\n").unwrap();
    line.clear();
    echo_in.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    let socket = setup.socket.to_str().unwrap();
    let (_, status) = cli(&["status", "--socket", socket]);
    assert!(status.contains("lifecycle: systemd"), "{status}");
    assert!(status.contains("received from generation 0"), "{status}");

    // A restart on the control socket whose new executable rejects the state: refused, and
    // generation 1 keeps serving.
    let stopping = |s: &FakeSystemd| {
        s.messages
            .iter()
            .filter(|m| m.contains("STOPPING=1"))
            .count()
    };
    systemd.drain();
    let stopped_before = stopping(&systemd);
    std::fs::write(&setup.config, "state_format = 2\n").unwrap();
    let (ok, out) = cli(&["restart", "--socket", socket, "--timeout", "30"]);
    assert!(!ok, "the restart must fail: {out}");
    assert!(out.contains("rejected the state"), "{out}");
    assert!(out.contains("state format 1"), "{out}");
    assert!(get(setup.http).starts_with("generation=1 "));
    systemd.drain();
    assert_eq!(
        stopping(&systemd),
        stopped_before,
        "a refused restart does not tell systemd it is stopping"
    );

    // A restart on the control socket that is accepted: exit 75, the initiator waits in the
    // store and is answered by the next generation with its PID.
    std::fs::write(&setup.config, "greeting = \"second\"\n").unwrap();
    let initiator = std::thread::spawn({
        let socket = socket.to_string();
        move || cli(&["restart", "--socket", &socket, "--timeout", "30"])
    });
    let mut gen1 = gen1;
    let status = wait_exit(&mut gen1, LIMIT);
    assert_eq!(
        status.code(),
        Some(75),
        "{}",
        std::fs::read_to_string(&gen1.log).unwrap()
    );
    systemd.drain();
    assert!(systemd.store.contains_key("shellflip.initiator"));
    let gen2 = setup.start(&systemd, 2);
    systemd.wait_for("READY=1", LIMIT, &gen2.log);
    let (ok, out) = initiator.join().unwrap();
    assert!(ok, "{out}");
    assert_eq!(out.trim(), gen2.child.id().to_string());
    assert_eq!(
        get(setup.http),
        format!("generation=2 pid={} greeting=second", gen2.child.id())
    );
    systemd.drain();
    assert!(
        !systemd.store.contains_key("shellflip.initiator"),
        "answered initiator removed from the store"
    );

    // A torn state (the writer killed midway): the next generation starts fresh and says so.
    let mut gen2 = gen2;
    let _ = gen2.child.kill();
    let _ = gen2.child.wait();
    let torn = std::fs::File::from(systemd.store["shellflip.state"].try_clone().unwrap());
    torn.set_len(0).unwrap();
    torn.write_all_at(&bytes[..bytes.len() / 2], 0).unwrap();
    let gen3 = setup.start(&systemd, 3);
    systemd.wait_for("READY=1", LIMIT, &gen3.log);
    assert!(get(setup.http).starts_with("generation=0 "));
    let (_, status) = cli(&["status", "--socket", socket]);
    assert!(status.contains("torn"), "{status}");
    drop(gen3);
}

/// Connections kept in the store can come back dead (the client left during the restart): the
/// next generation drops them from the store and starts anyway (B5).
#[test]
fn dead_stored_connections_are_dropped_and_start_up_goes_on() {
    let setup = Setup::new();
    let mut systemd = FakeSystemd::new(setup.dir.path());
    let mut gen0 = setup.start(&systemd, 0);
    systemd.wait_for("READY=1", LIMIT, &gen0.log);

    // Three echo clients: one will reset, one will close normally, one stays.
    let connect = || {
        let s = TcpStream::connect(setup.echo).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut greeting)
            .unwrap();
        assert!(greeting.starts_with("generation=0 "), "{greeting}");
        s
    };
    let reset = connect();
    let closed = connect();
    let mut stays = connect();

    // SAFETY: kill with the PID of a child this test started.
    unsafe { libc::kill(gen0.child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut gen0, LIMIT).code(), Some(0));
    systemd.drain();
    let kept = |s: &FakeSystemd| s.store.keys().filter(|k| k.starts_with("echo.")).count();
    assert_eq!(kept(&systemd), 3, "{:?}", systemd.store.keys());

    // While nobody serves: one client resets its connection, one closes it.
    reset_on_close(&reset);
    drop(reset);
    drop(closed);

    let gen1 = setup.start(&systemd, 1);
    systemd.wait_for("READY=1", LIMIT, &gen1.log);
    // The one that stayed is served by the new generation.
    stays.write_all(b"after\n").unwrap();
    let mut line = String::new();
    BufReader::new(stays.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "after\n");
    // The two that left are gone from the store: the reset one when it was taken back, the
    // closed one once its end of file was read.
    let start = Instant::now();
    while kept(&systemd) != 1 && start.elapsed() < LIMIT {
        systemd.receive();
    }
    assert_eq!(
        kept(&systemd),
        1,
        "store: {:?}\nlog:\n{}",
        systemd.store.keys(),
        std::fs::read_to_string(&gen1.log).unwrap_or_default()
    );
    assert!(get(setup.http).starts_with("generation=1 "));
}

/// Makes `close` send a reset instead of a normal end of stream.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a pointer to a properly sized linger value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}
