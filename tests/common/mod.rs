//! Helpers for the integration tests that drive the example service (`examples/restarter.rs`)
//! as real processes: a guard that starts generation 0 in its own temporary directory on its own
//! ports and kills every generation at drop, a small HTTP/1.1 client, process inspection
//! through `/proc`, and command runners with deadlines. Also: building the other examples
//! ([`example`]) and a stand-in for systemd's notify socket and store ([`fake_systemd`]).
//!
//! Nothing here ever waits without a deadline.

#![allow(dead_code)]

pub mod cleanup;
pub mod fake_systemd;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How long a service has to come up, or a condition to become true.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How long a command-line client may run.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// Socket timeouts of the HTTP client.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Variables of the library's protocol: never passed on from the test process by accident.
pub const PROTOCOL_VARS: &[&str] = &[
    "SHELLFLIP_PPID",
    "SHELLFLIP_FDS",
    "SHELLFLIP_FDNAMES",
    "SHELLFLIP_GENERATION",
    "SHELLFLIP_MODE",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
];

static BUILD: Once = Once::new();

/// `<target>/debug`, from the test executable `<target>/debug/deps/fork_exec-HASH`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// The example binary, built if needed.
///
/// `cargo test --all-features` builds examples, but `cargo test --all-features --test fork_exec`
/// does not, and a stale binary would test old code: so it is built once per test process
/// (a no-op when it is up to date; cargo does not hold its lock while tests run).
pub fn restarter() -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--all-features", "--example", "restarter"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let out = run(cmd, Duration::from_secs(900));
        assert!(
            out.status.success(),
            "cannot build the example restarter:\n{}",
            out.stderr
        );
    });
    let path = target_dir().join("examples").join("restarter");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --all-features`",
        path.display()
    );
    path
}

/// The example `name` (`examples/NAME.rs`), built if needed, like [`restarter`]: once per test
/// process and name, with `--all-features`.
pub fn example(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    // Held during the build: one cargo at a time from this test process.
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.contains(name) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--all-features", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let out = run(cmd, Duration::from_secs(900));
        assert!(
            out.status.success(),
            "cannot build the example {name}:\n{}",
            out.stderr
        );
        built.insert(name.to_owned());
    }
    let path = target_dir().join("examples").join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// The `shellflip` command-line client.
pub fn shellflip_cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shellflip"))
}

/// `shellflip <args...> --socket S`, with a deadline.
pub fn shellflip_at(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(shellflip_cli());
    cmd.args(args).arg("--socket").arg(socket);
    run(cmd, COMMAND_DEADLINE)
}

/// Two free ports on 127.0.0.1 (bound together, then released).
pub fn free_addrs() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

/// Polls `f` until it returns `Some`; `None` when `deadline` passed first.
pub fn poll_until<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_until<T>(what: &str, deadline: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(deadline, f).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// A temporary directory named so that [`Service::kill_all`] finds the processes started in it.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shellflip-test-")
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------------------------------------
// Commands

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Exit code (None when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Both streams, for looking for a message wherever it was printed.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A child process that is killed and reaped when dropped (a test that fails leaves nothing
/// behind). It derefs to the [`Child`].
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}")),
        )
    }

    /// Waits for it to exit, for at most `deadline`: `None` while it still runs.
    pub fn wait_timeout(&mut self, deadline: Duration) -> Option<ExitStatus> {
        poll_until(deadline, || self.0.try_wait().expect("try_wait"))
    }

    /// Kills and reaps it (nothing when it was reaped already).
    pub fn kill_and_reap(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Runs `cmd` to completion, killing it and panicking after `deadline`.
pub fn run(mut cmd: Command, deadline: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    // On the panic, the guard kills and reaps it.
    let status = child
        .wait_timeout(deadline)
        .unwrap_or_else(|| panic!("{cmd:?} did not finish within {deadline:?}"));
    // The pipes may be held open by a grandchild; do not wait for them forever.
    let join = |t: std::thread::JoinHandle<Vec<u8>>| {
        if poll_until(Duration::from_secs(5), || t.is_finished().then_some(())).is_some() {
            String::from_utf8_lossy(&t.join().unwrap_or_default()).into_owned()
        } else {
            String::from("<output still open>")
        }
    };
    Output {
        status,
        stdout: join(out_t),
        stderr: join(err_t),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the server closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A TCP connection with timeouts on every operation.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A client of the echo port: the connection and the greeting it wrote first
/// (`generation=N pid=P\n`).
pub fn echo_client(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let mut echo = BufReader::new(connect(addr).expect("echo connect"));
    let mut greeting = String::new();
    echo.read_line(&mut greeting).expect("echo greeting");
    (echo, greeting)
}

/// Reads one response (with a `Content-Length`, or up to end of file).
fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a new connection (`Connection: close`).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> io::Result<Response> {
    let stream = connect(addr)?;
    let mut w = stream.try_clone()?;
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    w.flush()?;
    read_response(&mut BufReader::new(stream))
}

/// A persistent HTTP/1.1 connection.
pub struct KeepAlive {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> io::Result<KeepAlive> {
        Ok(KeepAlive {
            addr,
            reader: BufReader::new(connect(addr)?),
        })
    }

    /// Sends a request on this connection and reads its response.
    pub fn request(&mut self, method: &str, path: &str) -> io::Result<Response> {
        let addr = self.addr;
        let w = self.reader.get_mut();
        write!(
            w,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
        )?;
        w.flush()?;
        read_response(&mut self.reader)
    }
}

/// What `GET /` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub generation: u64,
    pub pid: u32,
    pub greeting: String,
}

impl Hello {
    /// Parses `generation=N pid=P greeting=G` (the echo greeting has no greeting).
    pub fn parse(text: &str) -> Option<Hello> {
        let text = text.trim_end();
        let mut generation = None;
        let mut pid = None;
        let mut greeting = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(g) = rest.strip_prefix("greeting=") {
                greeting = g.to_owned();
                break;
            }
            let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(v) = word.strip_prefix("generation=") {
                generation = v.parse().ok();
            } else if let Some(v) = word.strip_prefix("pid=") {
                pid = v.parse().ok();
            }
            rest = tail;
        }
        Some(Hello {
            generation: generation?,
            pid: pid?,
            greeting,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// State letter and parent of a process, if it exists.
pub fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold anything, so split after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// Every PID on the system.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline_contains(pid: u32, marker: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.windows(marker.len()).any(|w| w == marker))
        .unwrap_or(false)
}

/// Descriptors of a process: number and link target.
pub fn fds(pid: u32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let n = e.file_name().to_str()?.parse().ok()?;
                let link = std::fs::read_link(e.path()).ok()?;
                Some((n, link.to_string_lossy().into_owned()))
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `O_NONBLOCK` and `O_CLOEXEC` in the `flags:` of `/proc/PID/fdinfo/FD` ([`fd_flags`]).
pub const O_NONBLOCK: u32 = OFlag::O_NONBLOCK.bits() as u32;
pub const O_CLOEXEC: u32 = OFlag::O_CLOEXEC.bits() as u32;

/// The `flags:` of `/proc/PID/fdinfo/FD` (octal).
pub fn fd_flags(pid: u32, fd: i32) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// Inodes of TCP sockets listening on `port` (IPv4, from `/proc/net/tcp`).
pub fn tcp_listener_inodes(port: u16) -> BTreeSet<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// Inodes of listening Unix sockets whose bound path lies under `dir` (`/proc/net/unix`).
pub fn unix_listener_inodes(dir: &Path) -> BTreeSet<u64> {
    let dir = dir.to_string_lossy();
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
            let listening = u32::from_str_radix(f.get(3)?, 16).ok()? & 0x10000 != 0;
            let path = f.get(7)?;
            (listening && path.starts_with(dir.as_ref())).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The service

/// How to start generation 0.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The configuration file's text.
    pub config: String,
    /// `--startup-timeout`, in seconds.
    pub startup_timeout: Option<f64>,
    /// Extra environment variables for generation 0.
    pub env: Vec<(String, String)>,
    /// Extra arguments for generation 0 (and so every later one).
    pub args: Vec<String>,
    /// The control socket's path inside the service's directory (default `control.sock`).
    pub socket: Option<PathBuf>,
}

/// The example service, started in its own temporary directory on its own ports. Drop kills
/// every process it started (generation 0 and every later one), by PID.
pub struct Service {
    pub http: SocketAddr,
    pub echo: SocketAddr,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    gen0: ChildGuard,
    pids: Mutex<BTreeSet<u32>>,
    // Last: removed after the processes were killed.
    pub dir: tempfile::TempDir,
}

impl Service {
    /// Starts generation 0 with this configuration and waits until it serves.
    pub fn start(config: &str) -> Service {
        Service::start_with(Options {
            config: config.into(),
            ..Default::default()
        })
    }

    pub fn start_with(opts: Options) -> Service {
        let exe = restarter();
        let dir = test_dir();
        let (http, echo) = free_addrs();
        let socket = dir
            .path()
            .join(opts.socket.as_deref().unwrap_or(Path::new("control.sock")));
        let config = dir.path().join("restarter.toml");
        let log = dir.path().join("stderr.log");
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent).expect("the control socket's directory");
        }
        std::fs::write(&config, &opts.config).expect("write config");
        let mut cmd = Command::new(exe);
        cmd.arg("--http")
            .arg(http.to_string())
            .arg("--echo")
            .arg(echo.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&config);
        if let Some(t) = opts.startup_timeout {
            cmd.arg("--startup-timeout").arg(t.to_string());
        }
        cmd.args(&opts.args);
        for var in PROTOCOL_VARS {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let stderr = File::create(&log).expect("log file");
        let stdout = stderr.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let gen0 = ChildGuard::spawn(&mut cmd);
        let service = Service {
            http,
            echo,
            socket,
            config,
            log,
            pids: Mutex::new(BTreeSet::from([gen0.id()])),
            gen0,
            dir,
        };
        let hello = wait_until("generation 0 to serve", DEADLINE, || {
            service.check_gen0_alive();
            service.try_hello().ok()
        });
        assert_eq!(hello.generation, 0, "{hello:?}");
        assert_eq!(hello.pid, service.gen0_pid(), "{hello:?}");
        service
    }

    /// Panics with the log if generation 0 exited before it served.
    fn check_gen0_alive(&self) {
        if matches!(proc_stat(self.gen0.id()), Some(('Z', _)) | None) {
            panic!(
                "generation 0 exited before serving; its stderr:\n{}",
                self.log_text()
            );
        }
    }

    pub fn gen0_pid(&self) -> u32 {
        self.gen0.id()
    }

    /// Waits for generation 0 (a child of the test) to exit, and reaps it.
    pub fn wait_gen0_exit(&mut self) -> ExitStatus {
        self.gen0
            .wait_timeout(DEADLINE)
            .unwrap_or_else(|| panic!("generation 0 did not exit:\n{}", self.log_text()))
    }

    /// The stderr (and stdout) of every generation.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Remembers a PID of this service (to kill at drop, and for the zombie check).
    pub fn note_pid(&self, pid: u32) {
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid);
    }

    /// Every PID of this service seen so far.
    pub fn known_pids(&self) -> BTreeSet<u32> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// PIDs of every successor the service spawned, from its log.
    pub fn spawned_pids(&self) -> Vec<u32> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("successor spawned"))
            .filter_map(|l| {
                let p = &l[l.find("pid=")? + 4..];
                p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
            })
            .collect()
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn try_hello(&self) -> io::Result<Hello> {
        let r = http(self.http, "GET", "/")?;
        if r.status != 200 {
            return Err(io::Error::other(format!("GET / answered {r:?}")));
        }
        Hello::parse(&r.body).ok_or_else(|| io::Error::other(format!("GET / answered {r:?}")))
    }

    pub fn hello(&self) -> Hello {
        self.try_hello()
            .unwrap_or_else(|e| panic!("GET / failed: {e}"))
    }

    /// Waits until `GET /` is answered by `pid`; returns what it said.
    pub fn wait_for_pid(&self, pid: u32) -> Hello {
        wait_until(&format!("pid {pid} to answer GET /"), DEADLINE, || {
            self.try_hello().ok().filter(|h| h.pid == pid)
        })
    }

    /// Waits until `GET /` is answered by a process other than `old`; returns what it said.
    pub fn wait_for_other_than(&self, old: u32) -> Hello {
        let h = wait_until(
            &format!("a process other than {old} to answer GET /"),
            DEADLINE,
            || self.try_hello().ok().filter(|h| h.pid != old),
        );
        self.note_pid(h.pid);
        h
    }

    /// `restarter restart --socket S`.
    pub fn restart_cmd(&self) -> Output {
        let mut cmd = Command::new(restarter());
        cmd.arg("restart").arg("--socket").arg(&self.socket);
        for var in PROTOCOL_VARS {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "warn").env("NO_COLOR", "1");
        let out = run(cmd, COMMAND_DEADLINE);
        if out.status.success() {
            if let Ok(pid) = out.stdout.trim().parse() {
                self.note_pid(pid);
            }
        }
        out
    }

    /// `shellflip <args...> --socket S`.
    pub fn shellflip(&self, args: &[&str]) -> Output {
        let out = shellflip_at(&self.socket, args);
        if out.status.success() && args == ["restart"] {
            if let Ok(pid) = out.stdout.trim().parse() {
                self.note_pid(pid);
            }
        }
        out
    }

    /// Restarts with `restarter restart`, which must succeed; waits until the new process
    /// answers, on HTTP and on the control socket (the old one answers what reached it before
    /// it handed over), and returns what it says.
    pub fn restart(&self) -> Hello {
        let before = self.hello();
        let out = self.restart_cmd();
        assert!(
            out.status.success(),
            "restart failed: {out:?}\nservice log:\n{}",
            self.log_text()
        );
        let pid: u32 = out
            .stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("restart printed no PID: {out:?}"));
        assert_ne!(pid, before.pid, "the restart reported the old PID");
        let after = self.wait_for_pid(pid);
        assert_eq!(
            after.generation,
            before.generation + 1,
            "{before:?} -> {after:?}"
        );
        self.wait_for_control_pid(pid);
        after
    }

    /// The status, through `shellflip status`, as `key: value` pairs.
    pub fn status(&self) -> Vec<(String, String)> {
        let out = self.shellflip(&["status"]);
        assert!(out.status.success(), "shellflip status failed: {out:?}");
        out.stdout
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn status_field(&self, key: &str) -> String {
        let status = self.status();
        status
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {key:?} in status {status:?}"))
    }

    /// Waits until the control socket is answered by `pid` (after a restart that nobody was
    /// told about, such as one by signal). A process in the middle of handing over may tell
    /// a client to ask again: it is asked again.
    pub fn wait_for_control_pid(&self, pid: u32) {
        wait_until(
            &format!("pid {pid} to answer on the control socket"),
            DEADLINE,
            || {
                let out = self.shellflip(&["status"]);
                (out.status.success() && out.stdout.lines().any(|l| l == format!("pid: {pid}")))
                    .then_some(())
            },
        );
    }

    /// Asserts that a successor which failed is gone: not running, and not left a zombie.
    pub fn assert_gone(&self, pid: u32) {
        if let Some((state, ppid)) = proc_stat(pid) {
            let marker = self.dir.path().as_os_str().as_bytes();
            assert!(
                state != 'Z'
                    && !self.known_pids().contains(&ppid)
                    && !cmdline_contains(pid, marker),
                "process {pid} is still there (state {state}, parent {ppid})"
            );
        }
    }

    /// Zombies whose parent is one of this service's processes.
    pub fn zombie_children(&self) -> Vec<(u32, u32)> {
        let ours = self.known_pids();
        all_pids()
            .into_iter()
            .filter_map(|pid| match proc_stat(pid) {
                Some(('Z', ppid)) if ours.contains(&ppid) => Some((pid, ppid)),
                _ => None,
            })
            .collect()
    }

    /// Kills every process of this service: the known PIDs and any process whose command line
    /// names this service's temporary directory (later generations, clients), by PID.
    pub fn kill_all(&mut self) {
        let marker = self.dir.path().as_os_str().as_bytes().to_vec();
        for _ in 0..50 {
            let mut candidates = self.known_pids();
            candidates.extend(all_pids());
            let ours: Vec<u32> = candidates
                .into_iter()
                .filter(|&pid| pid != std::process::id() && cmdline_contains(pid, &marker))
                .filter(|&pid| is_running(pid))
                .collect();
            if ours.is_empty() {
                break;
            }
            for pid in ours {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.gen0.kill_and_reap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- service log ({}) ----\n{}---- end of service log ----",
                self.dir.path().display(),
                self.log_text()
            );
        }
        self.kill_all();
    }
}

/// Kills (SIGKILL), by PID, every process whose command line contains `marker` (a test's
/// temporary directory, named in the arguments of every process the test started), until none
/// is left or a second has passed.
pub fn kill_processes_naming(marker: &Path) {
    let marker = marker.as_os_str().as_bytes();
    for _ in 0..50 {
        let ours: Vec<u32> = all_pids()
            .into_iter()
            .filter(|&pid| pid != std::process::id() && cmdline_contains(pid, marker))
            .filter(|&pid| is_running(pid))
            .collect();
        if ours.is_empty() {
            return;
        }
        for pid in ours {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// The exit status described for a message.
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

/// The lines of an `env` dump that set one of the library's variables.
pub fn protocol_vars_in(env_dump: &str) -> Vec<String> {
    env_dump
        .lines()
        .filter(|l| {
            let name = l.split('=').next().unwrap_or("");
            name.starts_with("SHELLFLIP_") || name.starts_with("LISTEN_")
        })
        .map(str::to_owned)
        .collect()
}

/// A current-thread runtime for a test's async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sets the flag when dropped, so that a failing assertion also stops the load threads.
pub struct StopOnDrop(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Joins a thread, with a deadline.
pub fn join<T>(t: std::thread::JoinHandle<T>, what: &str) -> T {
    wait_until(&format!("{what} to finish"), DEADLINE, || {
        t.is_finished().then_some(())
    });
    t.join().unwrap_or_else(|_| panic!("{what} panicked"))
}

/// A restart asked for with the library's client, within [`COMMAND_DEADLINE`].
pub async fn try_restart(socket: &Path) -> Result<u32, shellflip::control::ControlError> {
    let ask = async {
        shellflip::RestartCoordinationSocket::connect(socket)
            .await?
            .send_restart_command()
            .await
    };
    tokio::time::timeout(COMMAND_DEADLINE, ask)
        .await
        .unwrap_or(Err(shellflip::control::ControlError::Timeout(
            COMMAND_DEADLINE,
        )))
}
