//! Every kind of descriptor crosses a real fork/exec handover: TCP and UDP sockets, Unix
//! stream and datagram sockets, and a memfd. The test binary is its own successor (like
//! tableflip's tests): run fresh, it is the parent; started by the library, it is the child,
//! adopts everything, checks it, and writes a report the parent reads.
//!
//! `harness = false`: a plain `main`, so that the successor, started with the same arguments,
//! runs this same code and nothing else.

mod common;

use std::io::{Read, Seek, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{O_CLOEXEC, O_NONBLOCK, fd_flags, proc_stat};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shellflip::{ListenOptions, Origin, Registry, RegistryError, RestartConfig};

const REPORT: &str = "child-report.txt";
/// The UDP receive buffer the first generation asks for (the kernel doubles it).
const UDP_BUFFER: usize = 200_000;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if shellflip::origin() == Origin::Parent {
        runtime.block_on(child());
        return;
    }
    let started = Instant::now();
    runtime.block_on(parent());
    println!(
        "registry_handover: every_kind_crosses_a_handover ... ok ({:?})",
        started.elapsed()
    );
    println!("1 passed, 0 failed");
}

fn dir() -> PathBuf {
    PathBuf::from(std::env::var_os("SF_TEST_DIR").expect("SF_TEST_DIR"))
}

async fn parent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let registry = Registry::new();
    // Options set in this generation stay with the sockets in the next one.
    let tcp_options = ListenOptions {
        reuse_port: true,
        nodelay: true,
        ..ListenOptions::default()
    };
    let tcp = registry
        .tcp_listener_with("tcp", "127.0.0.1:0".parse().unwrap(), &tcp_options)
        .unwrap();
    let udp_options = ListenOptions {
        recv_buffer: Some(UDP_BUFFER),
        ..ListenOptions::default()
    };
    let udp = registry
        .udp_socket_with("udp", "127.0.0.1:0".parse().unwrap(), &udp_options)
        .unwrap();
    let unix_path = tmp.path().join("stream.sock");
    let _unix = registry.unix_listener("unix", &unix_path).unwrap();
    let dgram_path = tmp.path().join("dgram.sock");
    let _dgram = registry.unix_datagram("dgram", &dgram_path).unwrap();
    let mut memfd = memfd();
    memfd.write_all(b"kept in a memfd").unwrap();
    registry.insert("memfd", OwnedFd::from(memfd)).unwrap();

    let tcp_addr = tcp.local_addr().unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let config = RestartConfig {
        registry: registry.clone(),
        executable: Some(std::env::current_exe().unwrap()),
        environment: vec![
            ("SF_TEST_DIR".into(), tmp.path().into()),
            ("SF_TCP".into(), tcp_addr.to_string().into()),
            ("SF_UDP".into(), udp_addr.to_string().into()),
        ],
        startup_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let task = config.try_into_restart_task().unwrap();
    shellflip::startup_complete().unwrap();
    let handle = task.handle();
    tokio::spawn(task);
    let child_pid = tokio::time::timeout(Duration::from_secs(60), handle.restart())
        .await
        .expect("restart within 60 s")
        .expect("restart succeeded")
        .expect("a new PID");
    let _guard = KillOnDrop(child_pid);

    let report = std::fs::read_to_string(tmp.path().join(REPORT)).expect("the child's report");
    assert_eq!(report.trim(), "ok", "the child found problems:\n{report}");

    // The child serves on the inherited sockets: the same port, the same paths.
    let mut s = TcpStream::connect(tcp_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "tcp from the child\n");

    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    probe.send_to(b"ping", udp_addr).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = probe.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"udp from the child");

    let mut u = std::os::unix::net::UnixStream::connect(&unix_path).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    u.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "unix from the child\n");
    assert!(
        unix_path.exists(),
        "a handover never unlinks an inherited socket path"
    );
}

async fn child() {
    let mut problems = Vec::new();
    let registry = Registry::new();

    // A descriptor of another kind is refused and stays available: taken on success only.
    match registry.udp_socket("tcp", "127.0.0.1:0".parse().unwrap()) {
        Err(RegistryError::WrongKind { .. }) => {}
        other => problems.push(format!("udp_socket(\"tcp\") gave {other:?}")),
    }
    let tcp_addr = std::env::var("SF_TCP").unwrap().parse().unwrap();
    let tcp = registry.tcp_listener("tcp", tcp_addr).unwrap();
    let udp_addr = std::env::var("SF_UDP").unwrap().parse().unwrap();
    let udp = registry.udp_socket("udp", udp_addr).unwrap();
    let unix = registry
        .unix_listener("unix", &dir().join("stream.sock"))
        .unwrap();
    let _dgram = registry
        .unix_datagram("dgram", &dir().join("dgram.sock"))
        .unwrap();
    let memfd = registry.take_fd("memfd").unwrap().expect("memfd inherited");
    let mut memfd = std::fs::File::from(memfd);
    let mut text = String::new();
    memfd.rewind().unwrap();
    memfd.read_to_string(&mut text).unwrap();
    if text != "kept in a memfd" {
        problems.push(format!("memfd holds {text:?}"));
    }
    for (name, fd) in [
        ("tcp", tcp.as_raw_fd()),
        ("udp", udp.as_raw_fd()),
        ("unix", unix.as_raw_fd()),
    ] {
        let flags = fd_flags(std::process::id(), fd).expect("fdinfo");
        if flags & O_NONBLOCK == 0 {
            problems.push(format!("{name} is blocking"));
        }
        if flags & O_CLOEXEC == 0 {
            problems.push(format!("{name} is not close-on-exec"));
        }
    }
    use nix::sys::socket::{getsockopt, sockopt};
    if !getsockopt(&tcp, sockopt::ReusePort).unwrap_or(false) {
        problems.push("tcp lost SO_REUSEPORT".into());
    }
    if !getsockopt(&tcp, sockopt::TcpNoDelay).unwrap_or(false) {
        problems.push("tcp lost TCP_NODELAY".into());
    }
    if getsockopt(&udp, sockopt::RcvBuf).unwrap_or(0) < UDP_BUFFER {
        problems.push("udp lost its SO_RCVBUF".into());
    }
    let leftover = registry.inherited_names().unwrap();
    if !leftover.is_empty() {
        problems.push(format!("not adopted: {leftover:?}"));
    }
    let report = if problems.is_empty() {
        "ok".to_string()
    } else {
        problems.join("\n")
    };
    write_file(&dir().join(REPORT), &report);

    // Ready, then answer once on each socket and exit (the parent kills us otherwise).
    shellflip::startup_complete().unwrap();
    let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
    let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
    let unix = tokio::net::UnixListener::from_std(unix).unwrap();
    let serve = async {
        use tokio::io::AsyncWriteExt;
        let (mut s, _) = tcp.accept().await.unwrap();
        s.write_all(b"tcp from the child\n").await.unwrap();
        drop(s);
        let mut buf = [0u8; 64];
        let (_, from) = udp.recv_from(&mut buf).await.unwrap();
        udp.send_to(b"udp from the child", from).await.unwrap();
        let (mut u, _) = unix.accept().await.unwrap();
        u.write_all(b"unix from the child\n").await.unwrap();
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), serve).await;
}

fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn memfd() -> std::fs::File {
    let fd = memfd_create(c"test", MFdFlags::MFD_CLOEXEC)
        .unwrap_or_else(|e| panic!("memfd_create: {e}"));
    std::fs::File::from(fd)
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Only while it is still our child (not exited, reaped and its PID reused).
        if proc_stat(self.0).is_some_and(|(_, ppid)| ppid == std::process::id()) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
        }
    }
}
