//! `shellflip run` for real: the supervisor as process 1 of a new PID namespace
//! (`unshare --pid --fork --mount-proc`) in front of the example service, restarted 50 times
//! under HTTP load; then stopped with SIGTERM; and ended by a crash. Processes are inspected
//! from outside the namespace, through the machine's `/proc`.
//!
//! Where `unshare` cannot make a PID namespace, the supervisor runs as a child subreaper
//! instead, and the test says so; it fails, never skips, when neither works.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    ChildGuard, DEADLINE, Hello, KeepAlive, PROTOCOL_VARS, all_pids, describe, free_addrs, http,
    kill_processes_naming, poll_until, proc_stat, restarter, shellflip_at, shellflip_cli, signal,
    test_dir, wait_until,
};
use nix::sys::signal::Signal;

/// How long a zombie may stay before the supervisor has reaped it.
const ZOMBIE_LIMIT: Duration = Duration::from_secs(1);

/// Whether `unshare` can make a PID namespace here (tried once), with the reason when not.
fn namespaces() -> &'static Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let out = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "unshare --pid --fork --mount-proc failed ({}): {}",
                describe(&o.status),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run unshare: {e}")),
        }
    })
}

/// The kernel's version, (major, minor).
fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// `shellflip run -- restarter ...`, in a new PID namespace or as a subreaper.
struct Supervised {
    http: SocketAddr,
    socket: PathBuf,
    log: PathBuf,
    /// `unshare` (namespace) or the supervisor itself (subreaper).
    launcher: ChildGuard,
    /// The supervisor's PID on the machine.
    supervisor: u32,
    namespace: bool,
    exited: Option<ExitStatus>,
    // Last: removed after the processes were killed.
    dir: tempfile::TempDir,
}

impl Supervised {
    /// Starts the supervisor in a PID namespace when `unshare` can make one.
    fn start(config: &str, grace: &str) -> Supervised {
        match namespaces() {
            Ok(()) => Supervised::start_in(true, config, grace),
            Err(why) => {
                eprintln!(
                    "NOTE: {why}\nNOTE: falling back to the subreaper mode (shellflip run is not \
                     process 1)"
                );
                Supervised::start_in(false, config, grace)
            }
        }
    }

    fn start_in(namespace: bool, config: &str, grace: &str) -> Supervised {
        let service = restarter();
        let dir = test_dir();
        let (http, echo) = free_addrs();
        let socket = dir.path().join("control.sock");
        let config_path = dir.path().join("restarter.toml");
        let log = dir.path().join("stderr.log");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = if namespace {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc"])
                .arg(shellflip_cli());
            c
        } else {
            Command::new(shellflip_cli())
        };
        cmd.args(["run", "--grace", grace, "--"])
            .arg(service)
            .arg("--http")
            .arg(http.to_string())
            .arg("--echo")
            .arg(echo.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&config_path);
        for var in PROTOCOL_VARS {
            cmd.env_remove(var);
        }
        // The supervisor's notification directory goes into the test's: removed with it, even
        // when the supervisor is killed.
        cmd.env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env("TMPDIR", dir.path());
        let out = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("log file")))
            .stderr(Stdio::from(out));
        let launcher = ChildGuard::spawn(&mut cmd);
        let supervisor = if namespace {
            let unshare = launcher.id();
            wait_until("the supervisor under unshare", DEADLINE, || {
                all_pids()
                    .into_iter()
                    .find(|&p| matches!(proc_stat(p), Some((_, ppid)) if ppid == unshare))
            })
        } else {
            launcher.id()
        };
        let mut s = Supervised {
            http,
            socket,
            log,
            launcher,
            supervisor,
            namespace,
            exited: None,
            dir,
        };
        let hello = wait_until("generation 0 to serve", DEADLINE, || {
            if let Ok(Some(status)) = s.launcher.try_wait() {
                s.exited = Some(status);
                panic!(
                    "the supervisor exited ({}) before the service served:\n{}",
                    describe(&status),
                    s.log_text()
                );
            }
            s.try_hello()
        });
        assert_eq!(hello.generation, 0, "{hello:?}");
        let mode = if namespace {
            "shellflip run: process 1 of its PID namespace"
        } else {
            "shellflip run: child subreaper"
        };
        assert!(s.log_text().contains(mode), "no {mode:?} in the log");
        eprintln!(
            "supervisor: PID {} on the machine, {}",
            s.supervisor,
            if namespace {
                "process 1 of a new PID namespace"
            } else {
                "child subreaper"
            }
        );
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_hello(&self) -> Option<Hello> {
        let r = http(self.http, "GET", "/").ok()?;
        (r.status == 200).then(|| Hello::parse(&r.body))?
    }

    fn hello(&self) -> Hello {
        wait_until("GET /", DEADLINE, || self.try_hello())
    }

    /// Whether `pid` descends from the supervisor.
    fn descends(&self, pid: u32) -> bool {
        let mut p = pid;
        for _ in 0..4096 {
            match proc_stat(p) {
                Some((_, ppid)) if ppid == self.supervisor => return true,
                Some((_, ppid)) if ppid > 1 => p = ppid,
                _ => return false,
            }
        }
        false
    }

    /// Every process of the service (the supervisor's descendants), on the machine.
    fn descendants(&self) -> Vec<u32> {
        all_pids()
            .into_iter()
            .filter(|&p| self.descends(p))
            .collect()
    }

    /// The machine's PID of the process that calls itself `pid` (in the namespace).
    fn host_pid(&self, pid: u32) -> u32 {
        if !self.namespace {
            return pid;
        }
        wait_until(&format!("process {pid} of the namespace"), DEADLINE, || {
            self.descendants().into_iter().find(|&p| {
                let status = std::fs::read_to_string(format!("/proc/{p}/status"));
                status.ok().is_some_and(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|l| l.split_whitespace().last()?.parse::<u32>().ok())
                        == Some(pid)
                })
            })
        })
    }

    /// Waits for the supervisor's exit (through `unshare`, which exits with its code).
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let status = self.launcher.wait_timeout(limit).unwrap_or_else(|| {
            panic!(
                "the supervisor did not exit within {limit:?}; log:\n{}",
                self.log_text()
            )
        });
        self.exited = Some(status);
        status
    }

    /// Waits until the supervisor has followed a handover to `pid` (it reads the notifications
    /// on its own time).
    fn wait_for_main(&self, pid: u32) {
        let suffix = format!(" -> {pid}");
        wait_until(
            &format!("the supervisor to follow the handover to {pid}"),
            DEADLINE,
            || {
                self.log_text()
                    .lines()
                    .any(|l| l.contains("shellflip run: main process: ") && l.ends_with(&suffix))
                    .then_some(())
            },
        );
    }

    /// Restarts with `shellflip restart`; returns the new generation's greeting.
    fn restart_by_command(&self, before: &Hello) -> Hello {
        let out = shellflip_at(&self.socket, &["restart"]);
        assert!(out.status.success(), "shellflip restart: {out:?}");
        let pid: u32 = out.stdout.trim().parse().expect("a PID");
        let after = wait_until(&format!("pid {pid} to answer"), DEADLINE, || {
            self.try_hello().filter(|h| h.pid == pid)
        });
        assert_eq!(after.generation, before.generation + 1, "{after:?}");
        after
    }

    /// Restarts with SIGUSR1 to the supervisor, which forwards it to the main process.
    fn restart_by_signal(&self, before: &Hello) -> Hello {
        signal(self.supervisor, Signal::SIGUSR1);
        let after = wait_until("the next generation after SIGUSR1", DEADLINE, || {
            self.try_hello()
                .filter(|h| h.generation == before.generation + 1)
        });
        // Nobody was told: wait until the new generation answers on the control socket too.
        wait_until(
            "the control socket to be the new generation's",
            DEADLINE,
            || {
                let out = shellflip_at(&self.socket, &["status"]);
                out.stdout
                    .lines()
                    .any(|l| l == format!("pid: {}", after.pid))
                    .then_some(())
            },
        );
        after
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- supervisor and service log ({}) ----\n{}---- end of log ----",
                self.dir.path().display(),
                self.log_text()
            );
        }
        if self.exited.is_none() {
            // Process 1 of the namespace: its end kills the whole namespace.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.supervisor as i32),
                Signal::SIGKILL,
            );
        }
        self.launcher.kill_and_reap();
        // The subreaper mode leaves the service behind: every process naming our directory.
        kill_processes_naming(self.dir.path());
    }
}

/// Failed requests and how many succeeded, from the load's clients.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
}

/// Two clients in a loop: one request per new connection, and one keep-alive connection
/// (reconnecting when the server says `Connection: close`).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Duration::from_millis(2);
        let s = stop.clone();
        let fresh = std::thread::spawn(move || {
            let mut t = Tally::default();
            while !s.load(Ordering::Relaxed) {
                match http(addr, "GET", "/") {
                    Ok(r) if r.status == 200 => t.ok += 1,
                    Ok(r) => t.failed.push(format!("new connection: {r:?}")),
                    Err(e) => t.failed.push(format!("new connection: {e}")),
                }
                std::thread::sleep(pause);
            }
            t
        });
        let s = stop.clone();
        let kept = std::thread::spawn(move || {
            let mut t = Tally::default();
            let mut conn: Option<KeepAlive> = None;
            while !s.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match KeepAlive::connect(addr) {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            t.failed.push(format!("keep-alive connect: {e}"));
                            continue;
                        }
                    },
                };
                match c.request("GET", "/") {
                    Ok(r) if r.status == 200 => {
                        t.ok += 1;
                        if r.closes() {
                            conn = None;
                        }
                    }
                    Ok(r) => {
                        t.failed.push(format!("keep-alive: {r:?}"));
                        conn = None;
                    }
                    Err(e) => {
                        t.failed.push(format!("keep-alive: {e}"));
                        conn = None;
                    }
                }
                std::thread::sleep(pause);
            }
            t
        });
        Load {
            stop,
            threads: vec![fresh, kept],
        }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for t in self.threads {
            let t = t.join().expect("load thread");
            all.ok += t.ok;
            all.failed.extend(t.failed);
        }
        all
    }
}

/// What the zombie watcher saw: zombies whose parent is the supervisor, and zombies anywhere
/// in the service, sampled every 20 ms.
#[derive(Debug, Default)]
struct Zombies {
    samples: u64,
    /// Distinct zombies seen, whose parent was the supervisor.
    of_supervisor: usize,
    /// Distinct zombies seen anywhere in the service.
    anywhere: usize,
    /// The most seen at once.
    most_at_once: usize,
    /// The longest a zombie was seen for (first to last sample).
    longest: Duration,
}

struct ZombieWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Zombies>,
}

impl ZombieWatch {
    fn start(s: &Supervised) -> ZombieWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let supervisor = s.supervisor;
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut z = Zombies::default();
            let mut seen: std::collections::BTreeMap<u32, (Instant, Instant, bool)> =
                Default::default();
            let descends = |pid: u32| {
                let mut p = pid;
                for _ in 0..4096 {
                    match proc_stat(p) {
                        Some((_, ppid)) if ppid == supervisor => return true,
                        Some((_, ppid)) if ppid > 1 => p = ppid,
                        _ => return false,
                    }
                }
                false
            };
            while !st.load(Ordering::Relaxed) {
                let now = Instant::now();
                let mut at_once = 0;
                for pid in all_pids() {
                    if let Some(('Z', ppid)) = proc_stat(pid) {
                        if ppid == supervisor || descends(pid) {
                            at_once += 1;
                            let e = seen.entry(pid).or_insert((now, now, ppid == supervisor));
                            e.1 = now;
                        }
                    }
                }
                z.samples += 1;
                z.most_at_once = z.most_at_once.max(at_once);
                std::thread::sleep(Duration::from_millis(20));
            }
            z.anywhere = seen.len();
            z.of_supervisor = seen.values().filter(|v| v.2).count();
            z.longest = seen
                .values()
                .map(|(first, last, _)| *last - *first)
                .max()
                .unwrap_or_default();
            z
        });
        ZombieWatch { stop, thread }
    }

    fn finish(self) -> Zombies {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("zombie watcher")
    }
}

#[test]
fn fifty_restarts_under_load_then_sigterm_drains_and_exits_with_the_status() {
    let started = Instant::now();
    let mut s = Supervised::start("drain_secs = 5\n", "5");
    let load = Load::start(s.http);
    let watch = ZombieWatch::start(&s);
    let mut hello = s.hello();
    let (mut by_command, mut by_signal) = (0, 0);
    for i in 1..=50 {
        hello = if i % 5 == 0 {
            by_signal += 1;
            s.restart_by_signal(&hello)
        } else {
            by_command += 1;
            s.restart_by_command(&hello)
        };
    }
    let restarts_took = started.elapsed();
    let tally = load.finish();
    assert_eq!(hello.generation, 50, "{hello:?}");
    // The supervisor followed every handover: its last main process is the one serving.
    s.wait_for_main(hello.pid);
    let log = s.log_text();
    // The supervisor writes each line at once, but the service's lines may be split around
    // one: look for it anywhere in a line.
    let prefix = "shellflip run: main process: ";
    let handovers: Vec<&str> = log
        .lines()
        .filter_map(|l| Some(&l[l.find(prefix)? + prefix.len()..]))
        .collect();
    let last_main = handovers
        .last()
        .and_then(|l| l.split(" -> ").nth(1)?.trim().parse::<u32>().ok());
    let other_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("shellflip run: ") && !l.contains(prefix))
        .collect();
    assert_eq!(
        last_main,
        Some(hello.pid),
        "the supervisor's main process; its other lines: {other_lines:#?}"
    );
    assert_eq!(
        handovers.len(),
        50,
        "one handover line per restart: {handovers:?}; its other lines: {other_lines:#?}"
    );

    // Quiet now: every former generation drains, exits and is reaped; what is left is the
    // supervisor and the serving generation, and no zombie.
    let main = s.host_pid(hello.pid);
    let left = poll_until(Duration::from_secs(15), || {
        let d = s.descendants();
        (d == [main]).then_some(d)
    });
    let zombies = s
        .descendants()
        .into_iter()
        .filter(|&p| matches!(proc_stat(p), Some(('Z', _))))
        .count();
    let z = watch.finish();
    eprintln!(
        "50 restarts ({by_command} by `shellflip restart`, {by_signal} by SIGUSR1 through the \
         supervisor) in {restarts_took:.1?}; load: {} requests answered, {} failed; zombies \
         sampled {} times: {} seen (with the supervisor as parent: {}), at most {} at once, \
         the longest-lived seen for {:?}; {} left at the end",
        tally.ok,
        tally.failed.len(),
        z.samples,
        z.anywhere,
        z.of_supervisor,
        z.most_at_once,
        z.longest,
        zombies
    );
    assert!(
        tally.failed.is_empty(),
        "{} requests failed: {:?}",
        tally.failed.len(),
        &tally.failed[..tally.failed.len().min(10)]
    );
    assert!(tally.ok >= 100, "too little load: {} requests", tally.ok);
    assert!(
        left.is_some(),
        "former generations are left: {:?} (main {main})",
        s.descendants()
            .into_iter()
            .map(|p| (p, proc_stat(p)))
            .collect::<Vec<_>>()
    );
    assert_eq!(zombies, 0, "zombies left");
    assert!(
        z.longest < ZOMBIE_LIMIT,
        "a zombie stayed for {:?}: {z:?}",
        z.longest
    );

    // SIGTERM to the supervisor: forwarded; the service drains (a keep-alive client gets its
    // next answer with `Connection: close`) and exits 0, and so does the supervisor.
    let mut client = KeepAlive::connect(s.http).expect("keep-alive connect");
    let r = client.request("GET", "/").expect("GET / before SIGTERM");
    assert!(r.status == 200 && !r.closes(), "{r:?}");
    signal(s.supervisor, Signal::SIGTERM);
    let drained = wait_until("the drain's Connection: close", DEADLINE, || {
        match client.request("GET", "/") {
            Ok(r) if r.status == 200 && r.closes() => Some(Ok(r)),
            Ok(r) if r.status == 200 => None,
            other => Some(other),
        }
    });
    assert!(drained.is_ok(), "the drain failed the client: {drained:?}");
    drop(client);
    let status = s.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "supervisor: {}", describe(&status));
    let log = s.log_text();
    assert!(
        log.contains(&format!(
            "shellflip run: main process {} exited with status 0",
            hello.pid
        )),
        "{log}"
    );
    // Nothing of the service is left on the machine.
    let marker = s.dir.path().to_string_lossy().into_owned();
    let left: Vec<u32> = all_pids()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        })
        .collect();
    assert!(
        left.is_empty(),
        "processes of the service are left: {left:?}"
    );
    match std::net::TcpStream::connect(s.http) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        Ok(_) => panic!("something still listens on {}", s.http),
    }
    eprintln!(
        "SIGTERM: drained and exited 0; whole test {:.1?}",
        started.elapsed()
    );
}

#[test]
fn a_crash_without_successor_ends_the_supervisor_with_its_signal() {
    // Generation 0, the supervisor's own child, killed.
    let mut s = Supervised::start("", "10");
    let gen0 = s.host_pid(s.hello().pid);
    signal(gen0, Signal::SIGKILL);
    let status = s.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(137),
        "supervisor: {}",
        describe(&status)
    );
    assert!(s.log_text().contains("was killed by signal 9 (SIGKILL)"));

    // After a restart: the main process is generation 1. With Linux 6.15 or later it is killed
    // while generation 0 still drains (a keep-alive client holds it) and so is generation 1's
    // parent, which reaps it: the supervisor reads the status from its pidfd. Before 6.15, it
    // is killed once generation 0 is gone and generation 1 was reparented to the supervisor.
    let pidfd_exit = kernel() >= (6, 15);
    let mut s = Supervised::start("drain_secs = 20\n", "10");
    let before = s.hello();
    let mut holder = KeepAlive::connect(s.http).expect("keep-alive connect");
    holder.request("GET", "/").expect("GET /");
    let gen1 = s.restart_by_command(&before);
    let gen1_host = s.host_pid(gen1.pid);
    // A generation the supervisor knows as its main process.
    s.wait_for_main(gen1.pid);
    if pidfd_exit {
        let parent = proc_stat(gen1_host).map(|(_, p)| p);
        assert_ne!(
            parent,
            Some(s.supervisor),
            "generation 0 should still be draining"
        );
    } else {
        drop(holder);
        holder = KeepAlive::connect(s.http).expect("keep-alive connect");
        wait_until(
            "generation 1 reparented to the supervisor",
            DEADLINE,
            || (proc_stat(gen1_host).map(|(_, p)| p) == Some(s.supervisor)).then_some(()),
        );
    }
    let killed_at = Instant::now();
    signal(gen1_host, Signal::SIGKILL);
    // Let generation 0 finish its drain: then no process is left and the supervisor exits
    // without waiting for its grace.
    drop(holder);
    let status = s.wait_exit(Duration::from_secs(15));
    let took = killed_at.elapsed();
    assert_eq!(
        status.code(),
        Some(137),
        "supervisor: {}",
        describe(&status)
    );
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    let log = s.log_text();
    assert!(
        log.contains(&format!(
            "main process {} was killed by signal 9 (SIGKILL)",
            gen1.pid
        )),
        "{log}"
    );
    eprintln!(
        "crash after a restart ({}): exit 137 {took:.1?} after the kill",
        if pidfd_exit {
            "killed while its parent generation drained"
        } else {
            "killed after it was reparented"
        }
    );
}

#[test]
fn subreaper_mode_follows_restarts_and_reaps() {
    // Not process 1: the supervisor makes itself the child subreaper.
    let mut s = Supervised::start_in(false, "drain_secs = 5\n", "5");
    let mut hello = s.hello();
    for _ in 0..3 {
        hello = s.restart_by_command(&hello);
    }
    hello = s.restart_by_signal(&hello);
    assert_eq!(hello.generation, 4);
    // Former generations were reparented to the supervisor and reaped: only the main is left.
    let main = hello.pid;
    wait_until(
        "former generations to be reaped",
        Duration::from_secs(15),
        || (s.descendants() == [main]).then_some(()),
    );
    assert_eq!(proc_stat(main).map(|(_, p)| p), Some(s.supervisor));
    s.wait_for_main(main);
    signal(main, Signal::SIGKILL);
    let status = s.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(137),
        "supervisor: {}",
        describe(&status)
    );
}

#[test]
fn exit_codes_of_plain_programs() {
    let run = |args: &[&str]| {
        let mut cmd = Command::new(shellflip_cli());
        cmd.args(["run", "--grace", "1", "--"]).args(args);
        for var in PROTOCOL_VARS {
            cmd.env_remove(var);
        }
        common::run(cmd, DEADLINE)
    };
    let out = run(&["sh", "-c", "exit 3"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    let out = run(&["sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.code(), Some(143), "{out:?}");
    // The program starts clean: no standard signal blocked or ignored (the supervisor blocks
    // those it forwards; 32 and 33 belong to the C library).
    let out = run(&["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 2, "{out:?}");
    for line in out.stdout.lines() {
        let mask = line
            .split_whitespace()
            .nth(1)
            .and_then(|m| u64::from_str_radix(m, 16).ok());
        assert_eq!(mask.map(|m| m & 0x7fff_ffff), Some(0), "{line}: {out:?}");
    }
    // The program sees the notification socket, and a notification from it is heard.
    let out = run(&[
        "sh",
        "-c",
        "test -S \"$NOTIFY_SOCKET\" && exec python3 -c 'import os,socket; \
         s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
         s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"])'",
    ]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("is ready"), "{out:?}");
    // A program that leaves a child behind: the supervisor exits once the grace has passed.
    let started = Instant::now();
    let out = run(&["sh", "-c", "sleep 30 & exit 4"]);
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{out:?}");
    assert!(out.stderr.contains("no successor within"), "{out:?}");
    let out = run(&["/nonexistent/program"]);
    assert_eq!(out.code(), Some(127), "{out:?}");
    let out = run(&["/"]);
    assert_eq!(out.code(), Some(126), "{out:?}");
}
