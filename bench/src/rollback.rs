//! The `rollback` benchmark (issue 14): probation and rollback of the fork/exec lifecycle under
//! load.
//!
//! The example service runs with `--probation-ms 1000`. It is restarted through its control
//! socket (`shellflip::RestartCoordinationSocket`) 100 times, `pause` apart; before each restart
//! the configuration file is written again: odd restarts get `crash_after_ready_ms = 300` (the
//! new generation exits with status 70 300 ms after it declared itself ready, inside its
//! probation, and must be rolled back), even ones do not (the new generation is confirmed after
//! the probation). Meanwhile:
//!
//! - two loads of [`crate::loadgen`] run for the whole time: `connections` keep-alive connections
//!   and `connections` clients opening a new connection per request;
//! - `probes` threads open a new connection every `probe_every` (blocking sockets, their own OS
//!   threads, so that they do not wait behind the load's tasks), each `GET /`, and note when they
//!   connected, when the answer came and which PID and generation answered;
//! - the first time a probe sees a PID, a thread opens a pidfd on it and notes, on
//!   CLOCK_MONOTONIC, when it became readable: when the process ended (the same event the old
//!   generation's own pidfd wakes on).
//!
//! The crashed process's log line `crash_after_ready_ms = N: exiting with status 70` (written
//! just before `exit(70)`) and the old generation's `...; serving again` give the same story from
//! inside the processes (their wall-clock timestamps are mapped to CLOCK_MONOTONIC with an offset
//! read just before each restart). The service's log is kept in the system's temporary directory
//! (`shellflip-bench-rollback.log`).
//!
//! For the longest gaps the report adds where the CPUs' time went (`/proc/stat`, read every
//! 10 ms) and the service's log lines; with `--watch-threads`, also what every thread of the old
//! and the new generation was doing (`/proc/<pid>/task/*/{stat,wchan,schedstat}` every 4 ms),
//! which perturbs the figures (see [`RollbackOptions::watch_threads`]).
//!
//! Nothing here touches the library but through its control-socket client: only TCP on
//! 127.0.0.1, a Unix socket, pidfds, `/proc` and the service's log.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::env::Bins;
use crate::loadgen::{self, FAILURES, Load, LoadSpec, Mode, Outcome, Sample};
use crate::proc::{self, TempDir};
use crate::sdunit::mono_us;
use crate::stats::{Summary, Table, count, ms};

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct RollbackOptions {
    /// Restarts; the odd ones (1st, 3rd, ...) crash after ready.
    pub restarts: usize,
    /// Connections of each load (keep-alive, and new per request), both at once.
    pub connections: usize,
    /// The service's `--probation-ms`.
    pub probation: Duration,
    /// `crash_after_ready_ms` of the odd restarts.
    pub crash_after: Duration,
    /// Pause after each restart's answer.
    pub pause: Duration,
    /// Probe threads.
    pub probes: usize,
    /// At most one probe connection per thread this often.
    pub probe_every: Duration,
    /// Deadline of one request (load and probes).
    pub timeout: Duration,
    /// Diagnosis: sample every thread of the old and the new generation every 4 ms
    /// (`/proc/<pid>/task/*/{stat,wchan,schedstat}`). It perturbs what it watches: reading a
    /// dying process's `/proc` entries appears to slow down its parent's `waitid`.
    pub watch_threads: bool,
}

/// What the benchmark returns: the text (tables) and the picture.
pub struct Report {
    /// The markdown text.
    pub text: String,
    /// The SVG picture.
    pub svg: io::Result<String>,
}

/// CLOCK_REALTIME in microseconds: the clock of the service's log timestamps.
fn realtime_us() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000
}

/// `/proc/pressure/cpu`'s `some` total: µs during which some runnable task waited for a CPU.
fn cpu_pressure_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The example service with a probation, and every PID it has had.
struct Svc {
    addr: SocketAddr,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pids: Vec<i32>,
}

const GREETING: &str = "greeting = \"hello\"\n";

impl Svc {
    fn start(bins: &Bins, dir: &TempDir, o: &RollbackOptions) -> io::Result<Svc> {
        let addr: SocketAddr = format!("127.0.0.1:{}", proc::free_port())
            .parse()
            .map_err(io::Error::other)?;
        let svc = Svc {
            addr,
            socket: dir.join("rollback.sock"),
            config: dir.join("rollback.toml"),
            log: dir.join("rollback.log"),
            pids: Vec::new(),
        };
        std::fs::write(&svc.config, GREETING)?;
        let a = |s: &str| OsString::from(s);
        let args = vec![
            a("--http"),
            a(&addr.to_string()),
            a("--echo"),
            a(&format!("127.0.0.1:{}", proc::free_port())),
            a("--socket"),
            svc.socket.clone().into(),
            a("--config"),
            svc.config.clone().into(),
            a("--probation-ms"),
            a(&o.probation.as_millis().to_string()),
        ];
        let env = [("RUST_LOG", a("warn")), ("NO_COLOR", a("1"))];
        let pid = proc::spawn(&bins.restarter, &args, &env, &svc.log)?;
        let mut svc = svc;
        svc.pids.push(pid);
        if !proc::wait_for_port(addr, Duration::from_secs(20))
            || !proc::wait_for_path(&svc.socket, Duration::from_secs(5))
        {
            svc.stop();
            return Err(io::Error::other(format!(
                "the example service did not start (see {})",
                svc.log.display()
            )));
        }
        Ok(svc)
    }

    /// The configuration for the next restart: with `crash_after_ready_ms` or without.
    fn write_config(&self, crash_after: Option<Duration>) -> io::Result<()> {
        let mut text = GREETING.to_owned();
        if let Some(d) = crash_after {
            text.push_str(&format!("crash_after_ready_ms = {}\n", d.as_millis()));
        }
        std::fs::write(&self.config, text)
    }

    /// One restart through the control socket, to its final outcome.
    async fn restart(&self) -> Result<u32, String> {
        let work = async {
            shellflip::RestartCoordinationSocket::connect(&self.socket)
                .await
                .map_err(|e| e.to_string())?
                .send_restart_command()
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(60), work).await {
            Ok(r) => r,
            Err(_) => Err("no answer within 60 s".into()),
        }
    }

    /// Ends every generation still running, by PID.
    fn stop(&mut self) {
        for &pid in self.pids.iter().rev() {
            if proc::alive(pid) {
                proc::stop(pid, Duration::from_secs(12));
            }
        }
        self.pids.clear();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One probe connection (µs on CLOCK_MONOTONIC).
#[derive(Debug, Clone, Copy)]
struct Probe {
    sent: i64,
    answered: i64,
    /// The PID that answered (0: none).
    pid: u32,
    /// The generation it reported.
    generation: u64,
    outcome: Outcome,
}

fn io_outcome(e: &io::Error) -> Outcome {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Outcome::Refused,
        ConnectionReset | BrokenPipe | ConnectionAborted => Outcome::Reset,
        WouldBlock | TimedOut => Outcome::TimedOut,
        _ => Outcome::Other,
    }
}

/// `generation=N pid=P` out of an answer to `GET /`.
fn parse_hello(body: &str) -> Option<(u32, u64)> {
    let field = |name: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("pid=")? as u32, field("generation=")?))
}

/// One probe: a new connection, `GET /`, the whole answer. The PID and generation, or how it
/// failed.
fn probe_once(addr: SocketAddr, timeout: Duration) -> Result<(u32, u64), Outcome> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| io_outcome(&e))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| io_outcome(&e))?;
    let mut buf = Vec::with_capacity(512);
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if buf.is_empty() => return Err(io_outcome(&e)),
        Err(_) => return Err(Outcome::ShortBody),
    }
    if buf.is_empty() {
        return Err(Outcome::Closed);
    }
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(Outcome::ShortBody);
    };
    if head.split(' ').nth(1) != Some("200") {
        return Err(Outcome::BadStatus);
    }
    parse_hello(body).ok_or(Outcome::ShortBody)
}

/// Waits until `pid` ends (its pidfd turns readable), at most `limit`; records when.
fn watch_exit(pid: u32, limit: Duration, exits: &Mutex<HashMap<u32, i64>>) {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return;
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd, which we own, for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            let at = mono_us();
            exits.lock().unwrap().insert(pid, at);
            return;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The probe threads, and the pidfd watchers they start.
struct Prober {
    /// The last PID seen for the first time (a new generation).
    latest: Arc<Mutex<Option<u32>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Probe>>>,
    exits: Arc<Mutex<HashMap<u32, i64>>>,
}

impl Prober {
    fn start(addr: SocketAddr, first_pid: u32, o: &RollbackOptions) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let exits: Arc<Mutex<HashMap<u32, i64>>> = Arc::default();
        let seen: Arc<Mutex<HashSet<u32>>> = Arc::new(Mutex::new(HashSet::from([first_pid])));
        let latest: Arc<Mutex<Option<u32>>> = Arc::default();
        // A generation that crashes does so within its probation of its start.
        let watch_limit = o.probation + Duration::from_secs(5);
        let threads = (0..o.probes)
            .map(|i| {
                let (stop, exits, seen) = (stop.clone(), exits.clone(), seen.clone());
                let latest = latest.clone();
                let (every, timeout, n) = (o.probe_every, o.timeout, o.probes.max(1) as u32);
                std::thread::Builder::new()
                    .name(format!("probe-{i}"))
                    .spawn(move || {
                        // Spread the threads over one period.
                        std::thread::sleep(every * i as u32 / n);
                        let mut out = Vec::with_capacity(1 << 18);
                        let mut next = Instant::now();
                        while !stop.load(Ordering::Relaxed) {
                            let now = Instant::now();
                            if next > now {
                                std::thread::sleep(next - now);
                            }
                            next = Instant::now() + every;
                            let sent = mono_us();
                            let r = probe_once(addr, timeout);
                            let answered = mono_us();
                            let (pid, generation, outcome) = match r {
                                Ok((pid, g)) => (pid, g, Outcome::Ok),
                                Err(o) => (0, 0, o),
                            };
                            if pid != 0 && seen.lock().unwrap().insert(pid) {
                                *latest.lock().unwrap() = Some(pid);
                                let exits = exits.clone();
                                let _ = std::thread::Builder::new()
                                    .name(format!("pidfd-{pid}"))
                                    .spawn(move || watch_exit(pid, watch_limit, &exits));
                            }
                            out.push(Probe {
                                sent,
                                answered,
                                pid,
                                generation,
                                outcome,
                            });
                        }
                        out
                    })
                    .expect("probe thread")
            })
            .collect();
        Prober {
            latest,
            stop,
            threads,
            exits,
        }
    }

    /// Stops the probes; every probe, sorted by the answer, and the exits seen.
    async fn finish(self) -> (Vec<Probe>, HashMap<u32, i64>) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads;
        let mut all = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .filter_map(|t| t.join().ok())
                .flatten()
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        all.sort_by_key(|p| p.answered);
        let exits = self.exits.lock().unwrap().clone();
        (all, exits)
    }
}

/// `/proc/stat` per CPU: user, nice, system, idle, iowait, irq, softirq, steal (in USER_HZ
/// ticks), read every 10 ms for the whole run, to tell afterwards where the CPUs' time went
/// during a long gap.
struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(i64, Vec<[u64; 8]>)>>,
}

fn read_cpu_times() -> Vec<[u64; 8]> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let mut v = [0u64; 8];
            for (slot, w) in v.iter_mut().zip(l.split_whitespace().skip(1)) {
                *slot = w.parse().unwrap_or(0);
            }
            v
        })
        .collect()
}

impl CpuSampler {
    fn start() -> CpuSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cpu-sampler".into())
                .spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        out.push((mono_us(), read_cpu_times()));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    out
                })
                .expect("cpu sampler thread")
        };
        CpuSampler { stop, thread }
    }

    async fn finish(self) -> Vec<(i64, Vec<[u64; 8]>)> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread;
        tokio::task::spawn_blocking(move || t.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

/// One thread of the old or the new generation as `/proc/<pid>/task/<tid>/` showed it, noted
/// when its state or its wait channel changed.
#[derive(Debug, Clone, Default)]
struct ThreadState {
    at: i64,
    pid: u32,
    tid: u32,
    name: String,
    /// R (running or runnable), S (sleeping), D (uninterruptible), Z (zombie), ...; `-` gone.
    state: char,
    /// The CPU it last ran on.
    cpu: u32,
    /// Where in the kernel it waits (`wchan`), when it does.
    wchan: String,
    /// `schedstat`: ns it ran, ns it waited on a run queue (runnable, not running), so far.
    ran_ns: u64,
    waited_ns: u64,
}

/// Every thread of `pid` now (`at` is left for the caller).
fn read_threads(pid: u32) -> Vec<ThreadState> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let state = rest.first().and_then(|s| s.chars().next()).unwrap_or('?');
        // Field 39 of stat, `processor`; `rest` starts at field 3.
        let cpu = rest
            .get(36)
            .and_then(|c| c.parse().ok())
            .unwrap_or(u32::MAX);
        let wchan = if state == 'R' {
            String::new()
        } else {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan"))
                .map(|w| w.trim().to_owned())
                .ok()
                .filter(|w| w != "0")
                .unwrap_or_default()
        };
        let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
            .unwrap_or_default();
        let mut sched = sched
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        let (ran_ns, waited_ns) = (sched.next().unwrap_or(0), sched.next().unwrap_or(0));
        out.push(ThreadState {
            at: 0,
            pid,
            tid,
            name: stat[open + 1..close].to_owned(),
            state,
            cpu,
            wchan,
            ran_ns,
            waited_ns,
        });
    }
    out
}

/// The time a thread spent in one state during a gap.
struct Stints {
    state: char,
    /// µs in all.
    total: i64,
    /// The longest stint: its length, start, wait channel and CPU.
    longest: (i64, i64, String, u32),
}

/// What a [`ThreadWatch`] saw: every change of state, when it did not run itself (from, to),
/// and every sample's `schedstat` (time, tid, ns ran, ns waited for a CPU).
type Watched = (Vec<ThreadState>, Vec<(i64, i64)>, Vec<(i64, u32, u64, u64)>);

/// Watches the threads of the old generation and of the new one (once a probe saw it) every
/// `every` during a restart.
struct ThreadWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Watched>,
}

impl ThreadWatch {
    fn start(old: u32, latest: Arc<Mutex<Option<u32>>>, every: Duration) -> ThreadWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("thread-watch".into())
                .spawn(move || {
                    let mut notes: Vec<ThreadState> = Vec::new();
                    let mut last: HashMap<u32, ThreadState> = HashMap::new();
                    // Times when this watcher itself did not run for 5 periods or more.
                    let mut stalls = Vec::new();
                    let mut sched = Vec::new();
                    let mut prev = mono_us();
                    while !stop.load(Ordering::Relaxed) {
                        let at = mono_us();
                        if at - prev > 5 * every.as_micros() as i64 {
                            stalls.push((prev, at));
                        }
                        prev = at;
                        let new = latest.lock().unwrap().filter(|&p| p != old);
                        let mut present = HashSet::new();
                        for pid in std::iter::once(old).chain(new) {
                            for mut t in read_threads(pid) {
                                t.at = at;
                                present.insert(t.tid);
                                sched.push((at, t.tid, t.ran_ns, t.waited_ns));
                                let changed = last
                                    .get(&t.tid)
                                    .is_none_or(|l| (l.state, &l.wchan) != (t.state, &t.wchan));
                                if changed {
                                    last.insert(t.tid, t.clone());
                                    notes.push(t);
                                }
                            }
                        }
                        // Threads that disappeared.
                        for l in last.values_mut() {
                            if !present.contains(&l.tid) && l.state != '-' {
                                l.state = '-';
                                l.at = at;
                                l.wchan.clear();
                                notes.push(l.clone());
                            }
                        }
                        std::thread::sleep(every);
                    }
                    (notes, stalls, sched)
                })
                .expect("thread watch")
        };
        ThreadWatch { stop, thread }
    }

    async fn finish(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread;
        tokio::task::spawn_blocking(move || t.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

/// One restart as the driver saw it (µs on CLOCK_MONOTONIC).
#[derive(Debug, Clone)]
struct Cycle {
    /// 1-based.
    index: usize,
    crash: bool,
    old_pid: u32,
    old_generation: u64,
    asked: i64,
    answered: i64,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC just before the request.
    realtime_offset: i64,
    /// The new PID, or the reason.
    result: Result<u32, String>,
    /// `GET /` right after the answer: PID and generation.
    after: Option<(u32, u64)>,
    /// The PID named by a rollback.
    crashed: Option<u32>,
    /// Whether the crashed PID still existed after the rollback was answered.
    crashed_alive: bool,
    /// The threads of the old and the new generation, and when the watcher itself did not run.
    threads: Vec<ThreadState>,
    watcher_stalls: Vec<(i64, i64)>,
    /// Every sample's `schedstat`: time, tid, ns ran, ns waited for a CPU.
    sched: Vec<(i64, u32, u64, u64)>,
}

/// The PID in "rolled back: new process P ...".
fn rolled_back_pid(text: &str) -> Option<u32> {
    text.split("rolled back: new process ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// "N ms after it was ready" in a rollback message.
fn after_ready_ms(text: &str) -> Option<f64> {
    let before = text.split(" ms after it was ready").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A tracing timestamp (`2026-11-30T12:28:57.859394Z`, UTC) in µs since the epoch.
fn parse_timestamp(ts: &str) -> Option<i64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|v| v.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take(6).collect();
    let us = digits.parse::<i64>().ok()? * 10i64.pow(6 - digits.len() as u32);
    Some(((days_from_civil(y, mo, da) * 24 + h) * 60 + mi) * 60_000_000 + s * 1_000_000 + us)
}

/// What the service's log says about one crash: when the crashed process logged its exit, and
/// when the old generation logged that it serves again (µs on CLOCK_REALTIME).
#[derive(Debug, Clone, Copy, Default)]
struct Logged {
    crash: Option<i64>,
    serving_again: Option<i64>,
}

/// Reads the log of every generation: per crashed PID, its crash line and the rollback line.
fn read_log(text: &str) -> HashMap<u32, Logged> {
    let mut out: HashMap<u32, Logged> = HashMap::new();
    let mut last_ready: Option<u32> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("restarter: generation ") {
            // "restarter: generation N pid P ready: ..."
            last_ready = rest.split_whitespace().nth(2).and_then(|p| p.parse().ok());
            continue;
        }
        let Some(ts) = line.split_whitespace().next().and_then(parse_timestamp) else {
            continue;
        };
        if line.contains("crash_after_ready_ms") && line.contains("exiting with status 70") {
            if let Some(pid) = last_ready {
                out.entry(pid).or_default().crash = Some(ts);
            }
        } else if line.contains("; serving again")
            && let Some(pid) = rolled_back_pid(line)
        {
            out.entry(pid).or_default().serving_again = Some(ts);
        }
    }
    out
}

/// The longest gap between consecutive times of `sorted` from the last one before `from` to the
/// first one at or after `to`: its length and where it starts.
fn longest_gap(sorted: &[i64], from: i64, to: i64) -> Option<(i64, i64)> {
    let lo = sorted.partition_point(|&t| t < from).saturating_sub(1);
    let hi = (sorted.partition_point(|&t| t < to) + 1).min(sorted.len());
    sorted
        .get(lo..hi)?
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
}

/// Nearest-rank quantiles of `v`, exact (negative values allowed): n, median, p10, p90, max.
fn quantiles(v: &[f64]) -> (usize, f64, f64, f64, f64) {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0, f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (v.len(), at(0.5), at(0.1), at(0.9), v[v.len() - 1])
}

/// Milliseconds as [`ms`] does, negative ones too.
fn signed_ms(v: f64) -> String {
    if v < 0.0 {
        format!("-{}", ms(-v))
    } else {
        ms(v)
    }
}

/// The figures of one crash.
#[derive(Debug, Clone, Default)]
struct CrashFigures {
    /// The crashed process's end, seen through its pidfd (µs, monotonic).
    exit_pidfd: Option<i64>,
    /// Its log line just before `exit(70)` (µs, monotonic).
    exit_logged: Option<i64>,
    /// The old generation's "serving again" (µs, monotonic).
    serving_again: Option<i64>,
    /// The crashed process's last answer to a probe.
    new_last: Option<i64>,
    /// The old generation's first answer to a probe sent after the crashed process's last
    /// answered probe was sent (so not one it accepted just before the handover).
    old_first: Option<i64>,
    /// The generation the crashed process reported.
    crashed_generation: Option<u64>,
    /// The longest gap between successful new-connection answers in the cycle, and its start.
    gap: Option<(i64, i64)>,
    /// The same from 50 ms before the crash was logged to 200 ms after.
    gap_at_crash: Option<(i64, i64)>,
    /// Failed requests ending in the cycle: load keep-alive, load new, probes.
    failed: [u64; 3],
    /// Failed requests ending in the cycle, per kind (FAILURES order).
    kinds: [u64; 7],
    /// When the failures ended, relative to the death (µs): min and max.
    failed_span: Option<(i64, i64)>,
}

/// Runs the benchmark.
pub async fn run(bins: &Bins, o: &RollbackOptions) -> io::Result<Report> {
    let dir = TempDir::new("rollback")?;
    let mut svc = Svc::start(bins, &dir, o)?;
    let first = tokio::task::spawn_blocking({
        let addr = svc.addr;
        move || loadgen::get_root(addr)
    })
    .await
    .map_err(io::Error::other)??;
    let (first_pid, first_generation) = parse_hello(&first)
        .ok_or_else(|| io::Error::other(format!("unexpected answer {first:?}")))?;

    let origin = Instant::now();
    let origin_mono = mono_us();
    let spec = |mode| LoadSpec {
        addr: svc.addr,
        connections: o.connections,
        mode,
        timeout: o.timeout,
    };
    let keepalive = Load::start(spec(Mode::KeepAlive), origin);
    let fresh = Load::start(spec(Mode::NewConnection), origin);
    let prober = Prober::start(svc.addr, first_pid, o);
    let cpus = CpuSampler::start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pressure_from = cpu_pressure_us();
    let restarts_from = Instant::now();

    let mut cycles: Vec<Cycle> = Vec::with_capacity(o.restarts);
    let (mut cur_pid, mut cur_gen) = (first_pid, first_generation);
    for index in 1..=o.restarts {
        let crash = index % 2 == 1;
        svc.write_config(crash.then_some(o.crash_after))?;
        *prober.latest.lock().unwrap() = None;
        let watch = o
            .watch_threads
            .then(|| ThreadWatch::start(cur_pid, prober.latest.clone(), Duration::from_millis(4)));
        let realtime_offset = realtime_us() - mono_us();
        let asked = mono_us();
        let result = svc.restart().await;
        let answered = mono_us();
        let addr = svc.addr;
        let after = tokio::task::spawn_blocking(move || loadgen::get_root(addr))
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|b| parse_hello(&b));
        let (threads, watcher_stalls, sched) = match watch {
            Some(w) => w.finish().await,
            None => Default::default(),
        };
        let crashed = result.as_ref().err().and_then(|e| rolled_back_pid(e));
        let crashed_alive = crashed.is_some_and(|p| proc::alive(p as i32));
        if let Ok(pid) = result {
            svc.pids.push(pid as i32);
        }
        let cycle = Cycle {
            index,
            crash,
            old_pid: cur_pid,
            old_generation: cur_gen,
            asked,
            answered,
            realtime_offset,
            result,
            after,
            crashed,
            crashed_alive,
            threads,
            watcher_stalls,
            sched,
        };
        if index % 10 == 0 || cycle.result.is_ok() == crash {
            eprintln!(
                "restart {index}/{}: {} in {} ms; GET / now {:?}",
                o.restarts,
                match &cycle.result {
                    Ok(p) => format!("new PID {p}"),
                    Err(e) => e.clone(),
                },
                ms((answered - asked) as f64 / 1e3),
                after
            );
        }
        if let Some((p, g)) = after {
            (cur_pid, cur_gen) = (p, g);
        }
        cycles.push(cycle);
        tokio::time::sleep(o.pause).await;
    }
    let pressure = match (pressure_from, cpu_pressure_us()) {
        (Some(a), Some(b)) => {
            Some(b.saturating_sub(a) as f64 / restarts_from.elapsed().as_micros() as f64)
        }
        _ => None,
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (probes, exits) = prober.finish().await;
    let cpu_times = cpus.finish().await;
    let keepalive = keepalive.finish().await;
    let fresh = fresh.finish().await;
    let elapsed = origin.elapsed();
    svc.stop();
    let log = std::fs::read_to_string(&svc.log).unwrap_or_default();
    let kept = std::env::temp_dir().join("shellflip-bench-rollback.log");
    match std::fs::write(&kept, &log) {
        Ok(()) => eprintln!("the service's log is kept in {}", kept.display()),
        Err(e) => eprintln!("cannot keep the log in {}: {e}", kept.display()),
    }
    let logged = read_log(&log);
    let leftovers: Vec<u32> = cycles
        .iter()
        .filter_map(|c| c.crashed)
        .filter(|&p| proc::alive(p as i32))
        .collect();

    let a = Analysis {
        o,
        origin_mono,
        cycles: &cycles,
        keepalive: &keepalive,
        fresh: &fresh,
        probes: &probes,
        exits: &exits,
        logged: &logged,
        log: &log,
        cpu_times: &cpu_times,
    };
    let text = a.report(elapsed, &leftovers, pressure);
    let svg = a.picture();
    Ok(Report { text, svg })
}

/// Everything measured, for the tables.
struct Analysis<'a> {
    o: &'a RollbackOptions,
    origin_mono: i64,
    cycles: &'a [Cycle],
    keepalive: &'a [Sample],
    fresh: &'a [Sample],
    probes: &'a [Probe],
    exits: &'a HashMap<u32, i64>,
    logged: &'a HashMap<u32, Logged>,
    /// The service's whole log.
    log: &'a str,
    /// `/proc/stat` per CPU, every 10 ms.
    cpu_times: &'a [(i64, Vec<[u64; 8]>)],
}

impl Analysis<'_> {
    /// Where a load sample ended, on CLOCK_MONOTONIC.
    fn end(&self, s: &Sample) -> i64 {
        self.origin_mono + s.start_us as i64 + i64::from(s.latency_us)
    }

    /// The interval a cycle owns: from its request to the next one's (or the end).
    fn span(&self, k: usize) -> (i64, i64) {
        let from = self.cycles[k].asked;
        let to = self.cycles.get(k + 1).map_or(i64::MAX, |n| n.asked);
        (from, to)
    }

    /// Every successful answer on a new connection (load and probes), sorted.
    fn new_connection_answers(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self
            .fresh
            .iter()
            .filter(|s| s.outcome == Outcome::Ok)
            .map(|s| self.end(s))
            .chain(
                self.probes
                    .iter()
                    .filter(|p| p.outcome == Outcome::Ok)
                    .map(|p| p.answered),
            )
            .collect();
        v.sort_unstable();
        v
    }

    /// Every failed request (load keep-alive: 0, load new: 1, probes: 2), sorted by its end.
    fn failures(&self) -> Vec<(i64, Outcome, usize)> {
        let mut v: Vec<(i64, Outcome, usize)> = self
            .keepalive
            .iter()
            .map(|s| (self.end(s), s.outcome, 0))
            .chain(self.fresh.iter().map(|s| (self.end(s), s.outcome, 1)))
            .chain(self.probes.iter().map(|p| (p.answered, p.outcome, 2)))
            .filter(|(_, o, _)| *o != Outcome::Ok)
            .collect();
        v.sort_by_key(|f| f.0);
        v
    }

    /// The probes answered in a cycle.
    fn probes_in(&self, k: usize) -> &[Probe] {
        let (from, to) = self.span(k);
        let a = self.probes.partition_point(|p| p.answered < from);
        let b = self.probes.partition_point(|p| p.answered < to);
        &self.probes[a..b]
    }

    /// Where each CPU's time went from `start` to `end`, per `/proc/stat`.
    fn cpu_accounting(&self, start: i64, end: i64) -> String {
        let t = self.cpu_times;
        let i0 = t.partition_point(|(at, _)| *at <= start).saturating_sub(1);
        let i1 = t
            .partition_point(|(at, _)| *at < end)
            .min(t.len().saturating_sub(1));
        let (Some((t0, a)), Some((t1, b))) = (t.get(i0), t.get(i1)) else {
            return String::new();
        };
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let tick_ms = 1000.0 / hz;
        let mut parts = Vec::new();
        for (cpu, (x, y)) in a.iter().zip(b).enumerate() {
            let d = |i: usize| y[i].saturating_sub(x[i]) as f64 * tick_ms;
            let total: f64 = (0..8).map(d).sum();
            parts.push(format!(
                "cpu{cpu} user {} + nice {}, system {}, idle {}, iowait {}, irq+softirq {}, steal {} (sum {})",
                ms(d(0)),
                ms(d(1)),
                ms(d(2)),
                ms(d(3)),
                ms(d(4)),
                ms(d(5) + d(6)),
                ms(d(7)),
                ms(total)
            ));
        }
        format!(
            "  - `/proc/stat` over {} ms of wall time around it (ms): {}\n",
            ms((t1 - t0) as f64 / 1e3),
            parts.join("; ")
        )
    }

    /// How each thread of the old and the new generation spent a gap, from the watcher's
    /// samples (every 4 ms: shorter stints are not seen).
    fn thread_summary(&self, c: &Cycle, start: i64, end: i64) -> String {
        let mut tids: Vec<(u32, u32)> = c.threads.iter().map(|n| (n.pid, n.tid)).collect();
        tids.sort_unstable();
        tids.dedup();
        let mut lines = Vec::new();
        for (pid, tid) in tids {
            let notes: Vec<&ThreadState> = c.threads.iter().filter(|n| n.tid == tid).collect();
            let mut per: Vec<Stints> = Vec::new();
            for (i, n) in notes.iter().enumerate() {
                let next = notes.get(i + 1).map_or(end, |m| m.at);
                let (a, b) = (n.at.max(start), next.min(end));
                if b <= a || n.state == '-' {
                    continue;
                }
                let d = b - a;
                let longest = || (d, a, n.wchan.clone(), n.cpu);
                match per.iter_mut().find(|p| p.state == n.state) {
                    Some(p) => {
                        p.total += d;
                        if d > p.longest.0 {
                            p.longest = longest();
                        }
                    }
                    None => per.push(Stints {
                        state: n.state,
                        total: d,
                        longest: longest(),
                    }),
                }
            }
            let Some(first) = notes.first() else {
                continue;
            };
            let role = if pid == c.old_pid { "old" } else { "new" };
            let ended = notes
                .iter()
                .find(|n| n.state == '-' && n.at >= start && n.at <= end)
                .map(|n| format!(", gone at {} ms", signed_ms((n.at - start) as f64 / 1e3)))
                .unwrap_or_default();
            if per.is_empty() && ended.is_empty() {
                continue;
            }
            per.sort_by_key(|p| -p.total);
            let states: Vec<String> = per
                .iter()
                .filter(|p| p.total >= 1_000)
                .map(|p| {
                    let (state, total) = (p.state, p.total);
                    let (len, at, wchan, cpu) = &p.longest;
                    format!(
                        "{state} {} ms (longest {} ms from {} ms{}{})",
                        ms(total as f64 / 1e3),
                        ms(*len as f64 / 1e3),
                        signed_ms((at - start) as f64 / 1e3),
                        if *cpu == u32::MAX {
                            String::new()
                        } else {
                            format!(", cpu{cpu}")
                        },
                        if wchan.is_empty() {
                            String::new()
                        } else {
                            format!(", in {wchan}")
                        }
                    )
                })
                .collect();
            // What schedstat says over the gap: from the last sample before it to the first after.
            let mine: Vec<&(i64, u32, u64, u64)> = c.sched.iter().filter(|x| x.1 == tid).collect();
            let before = mine.iter().rev().find(|x| x.0 <= start);
            let after = mine.iter().find(|x| x.0 >= end).or(mine.last());
            let sched = match (before, after) {
                (Some(a), Some(b)) if b.0 > a.0 => format!(
                    "; over {} ms it ran {} ms and waited {} ms for a CPU (schedstat)",
                    ms((b.0 - a.0) as f64 / 1e3),
                    ms(b.2.saturating_sub(a.2) as f64 / 1e6),
                    ms(b.3.saturating_sub(a.3) as f64 / 1e6)
                ),
                _ => String::new(),
            };
            lines.push(format!(
                "{role} {pid}/{tid} {}: {}{ended}{sched}",
                first.name,
                states.join(", ")
            ));
        }
        let stalls: Vec<i64> = c
            .watcher_stalls
            .iter()
            .filter(|(a, b)| *b > start && *a < end)
            .map(|(a, b)| b - a)
            .collect();
        if !stalls.is_empty() {
            lines.push(format!(
                "the watcher itself did not run {} times for ≥ 20 ms, {} ms in all, longest {} ms",
                stalls.len(),
                ms(stalls.iter().sum::<i64>() as f64 / 1e3),
                ms(stalls.iter().copied().max().unwrap_or(0) as f64 / 1e3)
            ));
        }
        if lines.is_empty() {
            return String::new();
        }
        format!(
            "  - threads during the gap (`/proc/<pid>/task/<tid>/stat` and `wchan` every 4 ms; R is \
             running or waiting for a CPU; times from the gap's start):\n{}",
            lines
                .iter()
                .map(|l| format!("    - {l}\n"))
                .collect::<String>()
        )
    }

    /// The service's log lines written during a gap (their timestamps mapped to the gap).
    fn log_excerpt(&self, c: &Cycle, start: i64, end: i64) -> String {
        let mut lines = Vec::new();
        for line in self.log.lines() {
            let Some(ts) = line.split_whitespace().next().and_then(parse_timestamp) else {
                continue;
            };
            let at = ts - c.realtime_offset;
            if at >= start - 10_000 && at <= end + 10_000 {
                let text = line.split_once(' ').map_or(line, |(_, t)| t).trim();
                lines.push(format!(
                    "{} ms: `{}`",
                    signed_ms((at - start) as f64 / 1e3),
                    text
                ));
            }
        }
        if lines.is_empty() {
            return String::new();
        }
        format!("  - the service's log: {}\n", lines.join("; "))
    }

    fn crash_figures(
        &self,
        k: usize,
        answers: &[i64],
        failures: &[(i64, Outcome, usize)],
    ) -> CrashFigures {
        let c = &self.cycles[k];
        let (from, to) = self.span(k);
        let mut f = CrashFigures::default();
        let probes = self.probes_in(k);
        let crashed = c.crashed.or_else(|| {
            // A rollback that did not name the PID: another PID that answered in the cycle.
            probes
                .iter()
                .find(|p| p.pid != 0 && p.pid != c.old_pid)
                .map(|p| p.pid)
        });
        if let Some(pid) = crashed.filter(|_| c.crash) {
            f.exit_pidfd = self.exits.get(&pid).copied();
            if let Some(l) = self.logged.get(&pid) {
                f.exit_logged = l.crash.map(|t| t - c.realtime_offset);
                f.serving_again = l.serving_again.map(|t| t - c.realtime_offset);
            }
            let mine = || probes.iter().filter(move |p| p.pid == pid);
            let last = mine().max_by_key(|p| p.answered);
            f.new_last = last.map(|p| p.answered);
            f.crashed_generation = mine().map(|p| p.generation).max();
            // The old process may answer, just after the handover, connections it had accepted
            // before it stopped accepting; after the crashed process's last answer it answers
            // only once it serves again.
            let after = last.map(|p| p.sent).or(f.exit_logged);
            f.old_first = after.and_then(|after| {
                probes
                    .iter()
                    .filter(|p| p.sent > after && p.pid == c.old_pid)
                    .map(|p| p.answered)
                    .min()
            });
        }
        f.gap = longest_gap(answers, from, to.min(from.saturating_add(10_000_000)));
        let death = f.exit_pidfd.or(f.exit_logged);
        if let Some(d) = f.exit_logged.or(f.exit_pidfd) {
            f.gap_at_crash = longest_gap(answers, d - 50_000, d + 200_000);
        }
        let a = failures.partition_point(|x| x.0 < from);
        let b = failures.partition_point(|x| x.0 < to);
        for &(end, outcome, source) in &failures[a..b] {
            f.failed[source] += 1;
            if let Some(i) = FAILURES.iter().position(|(o, _)| *o == outcome) {
                f.kinds[i] += 1;
            }
            if let Some(d) = death {
                let rel = end - d;
                f.failed_span = Some(match f.failed_span {
                    Some((lo, hi)) => (lo.min(rel), hi.max(rel)),
                    None => (rel, rel),
                });
            }
        }
        f
    }

    fn report(&self, elapsed: Duration, leftovers: &[u32], pressure: Option<f64>) -> String {
        let o = self.o;
        let answers = self.new_connection_answers();
        let failures = self.failures();
        let figures: Vec<CrashFigures> = (0..self.cycles.len())
            .map(|k| self.crash_figures(k, &answers, &failures))
            .collect();
        let crashes: Vec<(&Cycle, &CrashFigures)> = self
            .cycles
            .iter()
            .zip(&figures)
            .filter(|(c, _)| c.crash)
            .collect();
        let successes: Vec<(&Cycle, &CrashFigures)> = self
            .cycles
            .iter()
            .zip(&figures)
            .filter(|(c, _)| !c.crash)
            .collect();
        let ms_of = |us: i64| us as f64 / 1e3;
        let mut out = String::new();

        // 1. The restarts.
        let mut t = Table::new(&[
            "restarts",
            "asked",
            "outcome",
            "request → answer ms: median [p10–p90]",
            "max ms",
            "\"N ms after it was ready\": median [min–max]",
        ]);
        for (label, set, want) in [
            (
                format!(
                    "odd: `crash_after_ready_ms = {}`",
                    o.crash_after.as_millis()
                ),
                &crashes,
                "rolled back",
            ),
            ("even: no crash".to_owned(), &successes, "new PID"),
        ] {
            let ok = set
                .iter()
                .filter(|(c, _)| match (&c.result, c.crash) {
                    (Err(e), true) => e.contains("rolled back: new process"),
                    (Ok(_), false) => true,
                    _ => false,
                })
                .count();
            let took: Vec<f64> = set
                .iter()
                .map(|(c, _)| ms_of(c.answered - c.asked))
                .collect();
            let after: Vec<f64> = set
                .iter()
                .filter_map(|(c, _)| c.result.as_ref().err().and_then(|e| after_ready_ms(e)))
                .collect();
            let s = Summary::of(&took);
            t.row(vec![
                label,
                set.len().to_string(),
                format!("{ok} × {want}"),
                s.spread(ms),
                ms(s.max),
                if after.is_empty() {
                    "–".into()
                } else {
                    Summary::of(&after).range(ms)
                },
            ]);
        }
        out.push_str(&t.render());
        let unexpected: Vec<String> = self
            .cycles
            .iter()
            .filter(|c| c.result.is_ok() == c.crash)
            .map(|c| format!("restart {}: {:?}", c.index, c.result))
            .collect();
        if !unexpected.is_empty() {
            out.push_str(&format!(
                "\nUnexpected outcomes: {}\n",
                unexpected.join("; ")
            ));
        }

        // 2. The generation counter.
        let rollback_gen_ok = crashes
            .iter()
            .filter(|(c, _)| c.after == Some((c.old_pid, c.old_generation)))
            .count();
        let crashed_gen_ok = crashes
            .iter()
            .filter(|(c, f)| f.crashed_generation == Some(c.old_generation + 1))
            .count();
        let success_gen_ok = successes
            .iter()
            .filter(|(c, _)| match (&c.result, c.after) {
                (Ok(p), Some((ap, ag))) => ap == *p && ag == c.old_generation + 1,
                _ => false,
            })
            .count();
        let first_gen = self.cycles.first().map_or(0, |c| c.old_generation);
        let last = self.cycles.last().and_then(|c| c.after);
        out.push_str(&format!(
            "\nGeneration counter (`GET /` → `generation=N pid=P`): after {rollback_gen_ok} of {} rollbacks \
             the old process answered with its own PID and generation; {crashed_gen_ok} of {} crashed \
             generations had answered generation = old + 1 before they crashed; after {success_gen_ok} of {} \
             successful restarts the new PID answered generation = previous + 1. Generation {first_gen} at \
             the start, {} at the end ({} successful restarts). Crashed processes still present after their \
             rollback was answered: {}; after the run: {}.\n",
            crashes.len(),
            crashes.len(),
            successes.len(),
            last.map_or("?".into(), |(_, g)| g.to_string()),
            successes.iter().filter(|(c, _)| c.result.is_ok()).count(),
            crashes.iter().filter(|(c, _)| c.crashed_alive).count(),
            leftovers.len(),
        ));

        // 3. Requests and failures.
        let mut t = Table::new(&[
            "client",
            "requests",
            "failed",
            "refused",
            "reset",
            "closed",
            "timed out",
            "bad status",
            "short body",
            "other",
            "failed in crash cycles",
            "failed in other cycles",
        ]);
        let probe_samples: Vec<(i64, Outcome)> = self
            .probes
            .iter()
            .map(|p| (p.answered, p.outcome))
            .collect();
        let load_samples = |v: &[Sample]| -> Vec<(i64, Outcome)> {
            v.iter().map(|s| (self.end(s), s.outcome)).collect()
        };
        let rows = [
            (
                format!("load: {} keep-alive connections", o.connections),
                load_samples(self.keepalive),
            ),
            (
                format!(
                    "load: {} clients, new connection per request",
                    o.connections
                ),
                load_samples(self.fresh),
            ),
            (
                format!(
                    "probes: {} threads, new connection every ≥ {} µs",
                    o.probes,
                    o.probe_every.as_micros()
                ),
                probe_samples,
            ),
        ];
        let mut refused_total = 0;
        for (label, samples) in &rows {
            let mut kinds = [0u64; 7];
            let (mut in_crash, mut in_other) = (0u64, 0u64);
            for &(end, outcome) in samples {
                if outcome == Outcome::Ok {
                    continue;
                }
                if let Some(i) = FAILURES.iter().position(|(o, _)| *o == outcome) {
                    kinds[i] += 1;
                }
                match (0..self.cycles.len()).find(|&k| {
                    let (a, b) = self.span(k);
                    end >= a && end < b
                }) {
                    Some(k) if self.cycles[k].crash => in_crash += 1,
                    _ => in_other += 1,
                }
            }
            refused_total += kinds[0];
            let mut row = vec![
                label.clone(),
                count(samples.len() as f64),
                count(kinds.iter().sum::<u64>() as f64),
            ];
            row.extend(kinds.iter().map(|&k| count(k as f64)));
            row.push(count(in_crash as f64));
            row.push(count(in_other as f64));
            t.row(row);
        }
        out.push('\n');
        out.push_str(&t.render());
        let per_crash: Vec<f64> = crashes
            .iter()
            .map(|(_, f)| f.failed.iter().sum::<u64>() as f64)
            .collect();
        let per_crash_load: Vec<f64> = crashes
            .iter()
            .map(|(_, f)| (f.failed[0] + f.failed[1]) as f64)
            .collect();
        let total: f64 = per_crash.iter().sum();
        let total_load: f64 = per_crash_load.iter().sum();
        let (_, s_median, _, _, s_max) = quantiles(&per_crash);
        let (_, sl_median, _, _, sl_max) = quantiles(&per_crash_load);
        let mut kinds = [0u64; 7];
        for (_, f) in &crashes {
            for (i, k) in f.kinds.iter().enumerate() {
                kinds[i] += k;
            }
        }
        let kinds_text: Vec<String> = FAILURES
            .iter()
            .zip(kinds)
            .filter(|(_, k)| *k > 0)
            .map(|((_, n), k)| format!("{k} {n}"))
            .collect();
        let (span_lo, span_hi) = crashes
            .iter()
            .filter_map(|(_, f)| f.failed_span)
            .fold((i64::MAX, i64::MIN), |(lo, hi), (a, b)| {
                (lo.min(a), hi.max(b))
            });
        let keepalive_failed: u64 = crashes.iter().map(|(_, f)| f.failed[0]).sum();
        out.push_str(&format!(
            "\nPer crash ({} crashes): {} failed requests in all, {:.2} per crash on average, median {}, \
             max {} (load only: {} in all, {:.2} per crash, median {}, max {}; keep-alive: {}); by kind: {}. \
             {} clients were connected at once ({} load + {} probes): at most one request each in flight. \
             Every failure of a crash cycle ended between {} ms and {} ms of the crashed process's end \
             (pidfd).\n",
            crashes.len(),
            total,
            total / crashes.len().max(1) as f64,
            s_median,
            s_max,
            total_load,
            total_load / crashes.len().max(1) as f64,
            sl_median,
            sl_max,
            keepalive_failed,
            if kinds_text.is_empty() {
                "none".into()
            } else {
                kinds_text.join(", ")
            },
            2 * o.connections + o.probes,
            2 * o.connections,
            o.probes,
            if span_lo == i64::MAX {
                "–".into()
            } else {
                signed_ms(ms_of(span_lo))
            },
            if span_hi == i64::MIN {
                "–".into()
            } else {
                signed_ms(ms_of(span_hi))
            },
        ));

        // 4. Timing of each rollback.
        let mut t = Table::new(&[
            "measure (per crash)",
            "n",
            "median ms",
            "p10–p90 ms",
            "max ms",
        ]);
        let row = |t: &mut Table, label: &str, v: Vec<f64>| {
            let (n, median, p10, p90, max) = quantiles(&v);
            t.row(vec![
                label.to_owned(),
                n.to_string(),
                signed_ms(median),
                format!("{} – {}", signed_ms(p10), signed_ms(p90)),
                signed_ms(max),
            ]);
        };
        let diff = |a: Option<i64>, b: Option<i64>| Some(ms_of(b? - a?));
        let over = |f: &dyn Fn(&CrashFigures) -> Option<f64>| -> Vec<f64> {
            crashes.iter().filter_map(|(_, x)| f(x)).collect()
        };
        row(
            &mut t,
            "**crashed process ended (pidfd, seen by the bench) → old process's first answer (probe)**",
            over(&|f| diff(f.exit_pidfd, f.old_first)),
        );
        row(
            &mut t,
            "crash logged (just before `exit(70)`) → old process's first answer (probe)",
            over(&|f| diff(f.exit_logged, f.old_first)),
        );
        row(
            &mut t,
            "crash logged → old process logs \"serving again\" (both in-process)",
            over(&|f| diff(f.exit_logged, f.serving_again)),
        );
        row(
            &mut t,
            "crash logged → crashed process ended (pidfd, seen by the bench)",
            over(&|f| diff(f.exit_logged, f.exit_pidfd)),
        );
        row(
            &mut t,
            "crashed process's last answer → old process's first answer (probe)",
            over(&|f| diff(f.new_last, f.old_first)),
        );
        row(
            &mut t,
            "**port unserved**: longest gap between successful new-connection answers from 50 ms before the crash was logged to 200 ms after",
            crashes
                .iter()
                .filter_map(|(_, f)| f.gap_at_crash.map(|(g, _)| ms_of(g)))
                .collect(),
        );
        row(
            &mut t,
            "the same over the whole cycle of a crash (request → rollback → next request)",
            crashes
                .iter()
                .filter_map(|(_, f)| f.gap.map(|(g, _)| ms_of(g)))
                .collect(),
        );
        row(
            &mut t,
            "the same, cycles of a successful restart (request → probation → next request)",
            successes
                .iter()
                .filter_map(|(_, f)| f.gap.map(|(g, _)| ms_of(g)))
                .collect(),
        );
        // Quiet probes: those sent during the pauses between restarts, answered by the service.
        let mut quiet: Vec<f64> = Vec::new();
        for (k, c) in self.cycles.iter().enumerate() {
            let quiet_from = c.answered + 20_000;
            let next = self.cycles.get(k + 1).map_or(i64::MAX, |n| n.asked);
            let a = self.probes.partition_point(|p| p.answered < quiet_from);
            let b = self.probes.partition_point(|p| p.answered < next);
            quiet.extend(
                self.probes[a..b]
                    .iter()
                    .filter(|p| p.outcome == Outcome::Ok && p.sent >= quiet_from)
                    .map(|p| ms_of(p.answered - p.sent)),
            );
        }
        row(
            &mut t,
            "a probe between restarts (connect → answer), for comparison",
            quiet,
        );
        out.push('\n');
        out.push_str(&t.render());

        // 5. The verdicts.
        let worst = self
            .cycles
            .iter()
            .zip(&figures)
            .filter_map(|(c, f)| f.gap.map(|g| (g, c)))
            .max_by_key(|((g, _), _)| *g);
        let run_gap = longest_gap(
            &answers,
            self.cycles.first().map_or(0, |c| c.asked),
            self.cycles
                .last()
                .map_or(0, |c| c.answered + o.pause.as_micros() as i64),
        );
        let pidfd_seen = crashes
            .iter()
            .filter(|(_, f)| f.exit_pidfd.is_some())
            .count();
        let logged_seen = crashes
            .iter()
            .filter(|(_, f)| f.exit_logged.is_some())
            .count();
        let old_seen = crashes
            .iter()
            .filter(|(_, f)| f.old_first.is_some())
            .count();
        out.push_str(&format!(
            "\nRefused connections: {refused_total} (target 0: {}). Longest time without a successful \
             new-connection answer during the restarts: {} ms{} (target ≤ 100 ms: {}). Crashes with the \
             exit seen through a pidfd: {pidfd_seen} of {n}; in the log: {logged_seen} of {n}; with the \
             old process's first answer seen by a probe: {old_seen} of {n}. Run: {:.0} s.\n",
            if refused_total == 0 { "met" } else { "MISSED" },
            run_gap.map_or("–".into(), |(g, _)| ms(ms_of(g))),
            worst
                .map(|((g, at), c)| format!(
                    " (per cycle: worst {} ms in restart {} ({}), starting {} ms after its request)",
                    ms(ms_of(g)),
                    c.index,
                    if c.crash { "a crash" } else { "no crash" },
                    ms(ms_of(at - c.asked))
                ))
                .unwrap_or_default(),
            if run_gap.is_some_and(|(g, _)| g <= 100_000) {
                "met"
            } else {
                "MISSED"
            },
            elapsed.as_secs_f64(),
            n = crashes.len(),
        ));

        // What happened in the longest gaps: which cycle, and whether the keep-alive load (served
        // by the old process during a probation) and the probes were answered meanwhile.
        let (run_from, run_to) = (
            self.cycles.first().map_or(0, |c| c.asked),
            self.cycles
                .last()
                .map_or(0, |c| c.answered + o.pause.as_micros() as i64),
        );
        let a = answers.partition_point(|&t| t < run_from).saturating_sub(1);
        let b = (answers.partition_point(|&t| t < run_to) + 1).min(answers.len());
        let mut gaps: Vec<(i64, i64)> = answers
            .get(a..b)
            .unwrap_or_default()
            .windows(2)
            .map(|w| (w[1] - w[0], w[0]))
            .collect();
        gaps.sort_unstable_by(|x, y| y.cmp(x));
        let mut keepalive_ends: Vec<i64> = self
            .keepalive
            .iter()
            .filter(|s| s.outcome == Outcome::Ok)
            .map(|s| self.end(s))
            .collect();
        keepalive_ends.sort_unstable();
        out.push_str(
            "\nThe longest gaps between successful new-connection answers during the restarts:\n\n",
        );
        let long = gaps.iter().filter(|(g, _)| *g > 100_000).count();
        for &(g, start) in gaps.iter().take(long.clamp(3, 8)) {
            let end = start + g;
            let k = self
                .cycles
                .iter()
                .rposition(|c| c.asked <= start)
                .unwrap_or(0);
            let c = &self.cycles[k];
            let f = &figures[k];
            let ka = keepalive_ends.partition_point(|&t| t < end)
                - keepalive_ends.partition_point(|&t| t <= start);
            let waiting: Vec<String> = self
                .probes
                .iter()
                .filter(|p| p.sent < end && p.answered > start)
                .map(|p| {
                    format!(
                        "sent {} ms, {} {} ms",
                        signed_ms(ms_of(p.sent - start)),
                        if p.pid != 0 {
                            format!("answered by {}", p.pid)
                        } else {
                            format!("{:?}", p.outcome)
                        },
                        signed_ms(ms_of(p.answered - start))
                    )
                })
                .collect();
            out.push_str(&format!(
                "- {} ms in restart {} ({}), from {} ms after its request{}: {} keep-alive answers \
                 meanwhile; probes in flight (times from the gap's start): {}\n",
                ms(ms_of(g)),
                c.index,
                if c.crash { "a crash" } else { "no crash" },
                ms(ms_of(start - c.asked)),
                f.exit_logged
                    .map(|d| format!(", {} ms from the crash logged", signed_ms(ms_of(start - d))))
                    .unwrap_or_default(),
                count(ka as f64),
                if waiting.is_empty() {
                    "none".into()
                } else {
                    waiting.join("; ")
                }
            ));
            out.push_str(&self.cpu_accounting(start, end));
            out.push_str(&self.thread_summary(c, start, end));
            out.push_str(&self.log_excerpt(c, start, end));
        }

        if let Some(p) = pressure {
            out.push_str(&format!(
                "\nCPU pressure during the restarts (`/proc/pressure/cpu`, some): {:.0} % of the time \
                 at least one runnable task on the machine waited for a CPU.\n",
                p * 100.0
            ));
        }

        // 6. Every restart.
        let mut t = Table::new(&[
            "#",
            "old PID (gen)",
            "outcome",
            "ms",
            "GET / after",
            "ended → old's first answer ms",
            "logged → serving again ms",
            "longest gap ms",
            "failed (keep-alive / new / probes)",
        ]);
        for (c, f) in self.cycles.iter().zip(&figures) {
            t.row(vec![
                c.index.to_string(),
                format!("{} ({})", c.old_pid, c.old_generation),
                match &c.result {
                    Ok(p) => format!("new PID {p}"),
                    Err(e) => e.clone(),
                },
                ms(ms_of(c.answered - c.asked)),
                c.after
                    .map_or("?".into(), |(p, g)| format!("generation={g} pid={p}")),
                diff(f.exit_pidfd, f.old_first).map_or("–".into(), signed_ms),
                diff(f.exit_logged, f.serving_again).map_or("–".into(), signed_ms),
                f.gap.map_or("–".into(), |(g, _)| ms(ms_of(g))),
                format!("{} / {} / {}", f.failed[0], f.failed[1], f.failed[2]),
            ]);
        }
        out.push_str("\n<details><summary>Every restart</summary>\n\n");
        out.push_str(&t.render());
        out.push_str("\n</details>\n");
        out
    }

    /// The load over the whole run, and close-ups of the first crash.
    fn picture(&self) -> io::Result<String> {
        let rel = |t: i64| (t - self.origin_mono).max(0) as u64;
        let windows: Vec<(u64, u64)> = self
            .cycles
            .iter()
            .map(|c| (rel(c.asked), rel(c.answered)))
            .collect();
        let end = self
            .fresh
            .last()
            .map_or(0, |s| s.start_us + u64::from(s.latency_us));
        // The close-up: the crash with the most failed new-connection requests, from 250 ms
        // before its rollback was answered to 100 ms after.
        let failed_in = |k: usize| {
            let (a, b) = self.span(k);
            self.fresh
                .iter()
                .filter(|s| s.outcome != Outcome::Ok && (a..b).contains(&self.end(s)))
                .count()
        };
        let crash = (0..self.cycles.len())
            .filter(|&k| self.cycles[k].crash)
            .max_by_key(|&k| (failed_in(k), std::cmp::Reverse(k)));
        let (from, to) = crash.map_or((0, end), |k| {
            let at = rel(self.cycles[k].answered);
            (at.saturating_sub(250_000), (at + 100_000).min(end))
        });
        let which = crash.map_or(String::new(), |k| {
            format!("restart {}, {} failed", self.cycles[k].index, failed_in(k))
        });
        let panels = vec![
            crate::svg::Panel {
                title: format!(
                    "new connection per request: whole run ({} restarts, odd ones crash; bins of 20 ms)",
                    self.cycles.len()
                ),
                samples: self.fresh,
                windows: &windows,
                from_us: 0,
                to_us: end,
                bin_us: 20_000,
            },
            crate::svg::Panel {
                title: format!(
                    "new connection per request: close-up of the crash with the most failures ({which}; 0.35 s, bins of 1 ms)"
                ),
                samples: self.fresh,
                windows: &windows,
                from_us: from,
                to_us: to,
                bin_us: 1_000,
            },
            crate::svg::Panel {
                title: "keep-alive: the same close-up".into(),
                samples: self.keepalive,
                windows: &windows,
                from_us: from,
                to_us: to,
                bin_us: 1_000,
            },
        ];
        crate::svg::render(&panels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_and_messages_parse() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00.000001Z"), Some(1));
        assert_eq!(
            parse_timestamp("2026-11-30T12:28:57.859394Z"),
            Some(1_796_041_737_859_394)
        );
        assert_eq!(
            parse_timestamp("2000-03-01T00:00:00Z"),
            Some(951_868_800_000_000)
        );
        let msg = "rolled back: new process 18257 exited with status 70, 302 ms after it was ready";
        assert_eq!(rolled_back_pid(msg), Some(18257));
        assert_eq!(after_ready_ms(msg), Some(302.0));
        assert_eq!(
            parse_hello("generation=3 pid=42 greeting=hello"),
            Some((42, 3))
        );
        let log = "restarter: generation 1 pid 18257 ready: http on x\n\
            2026-11-30T12:28:57.859394Z ERROR restarter: crash_after_ready_ms = 300: exiting with status 70\n\
            2026-11-30T12:28:57.860255Z  WARN restarter: rolled back: new process 18257 exited with status 70, 302 ms after it was ready; serving again\n";
        let l = read_log(log)[&18257];
        assert_eq!(
            (l.crash, l.serving_again),
            (Some(1_796_041_737_859_394), Some(1_796_041_737_860_255))
        );
    }

    #[test]
    fn gaps_include_the_answers_around_the_span() {
        let t = [0, 10, 20, 70, 75, 200];
        assert_eq!(longest_gap(&t, 15, 72), Some((50, 20)));
        assert_eq!(longest_gap(&t, 76, 1000), Some((125, 75)));
        assert_eq!(longest_gap(&[], 0, 10), None);
    }
}
