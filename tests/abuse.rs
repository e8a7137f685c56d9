//! The control socket under abuse, end to end: the example service (`examples/restarter.rs`)
//! driven the way operators and hostile local programs drive a service — restart storms, floods
//! of idle connections, the descriptor limit, odd socket paths, a removed socket file, clients
//! of another user.
//!
//! Every test has its own temporary directory and ports, is bounded in time and in the number of
//! connections it opens, and kills the processes it started when it ends. Timings are printed
//! for the record, never asserted. Run with `cargo test --all-features --test abuse`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use shellflip::RestartCoordinationSocket;
use shellflip::control::ControlError;

/// How many restarts the service started so far (every generation logs to the same file).
fn restarts_started(s: &Service) -> usize {
    s.spawned_pids().len()
}

/// The status, through `shellflip status`, as `key: value` pairs; asked again while a process
/// in the middle of a handover says to.
fn status_of(s: &Service) -> Vec<(String, String)> {
    let out = wait_until("shellflip status to succeed", DEADLINE, || {
        let out = s.shellflip(&["status"]);
        out.status.success().then_some(out)
    });
    out.stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn status_field_of(s: &Service, key: &str) -> Option<String> {
    status_of(s)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Gives a restart that should not happen the time to show itself, then checks that the
/// service is still `pid` at `generation` and started `restarts` restarts in all.
fn assert_settled(s: &Service, pid: u32, generation: u64, restarts: usize) {
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        restarts_started(s),
        restarts,
        "restarts started: {:?}",
        s.spawned_pids()
    );
    let status = status_of(s);
    let field = |k: &str| status.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(
        (field("pid"), field("generation")),
        (Some(pid.to_string()), Some(generation.to_string())),
        "{status:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 1: a storm of restart requests makes exactly one restart

#[test]
fn a_storm_of_restart_requests_makes_exactly_one_restart() {
    const CLIENTS: usize = 40;
    const ROUNDS: u64 = 3;
    let s = Service::start("");
    let rt = runtime();
    for round in 1..=ROUNDS {
        let restarts_before = restarts_started(&s);
        let started = Instant::now();
        let answers = rt.block_on(async {
            let go = Arc::new(tokio::sync::Barrier::new(CLIENTS));
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let (go, socket) = (go.clone(), s.socket.clone());
                    tokio::spawn(async move {
                        go.wait().await;
                        try_restart(&socket).await
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for c in clients {
                answers.push(c.await.expect("client task"));
            }
            answers
        });
        eprintln!(
            "round {round}: {CLIENTS} clients answered within {:?}",
            started.elapsed()
        );
        let new_pids: BTreeSet<u32> = answers
            .iter()
            .filter_map(|a| a.as_ref().ok())
            .copied()
            .collect();
        assert_eq!(
            new_pids.len(),
            1,
            "round {round}: every PID answered must be the one new generation's: {answers:?}"
        );
        let new_pid = *new_pids.first().unwrap();
        s.note_pid(new_pid);
        for answer in &answers {
            match answer {
                Ok(_) => {}
                Err(ControlError::RestartFailed(why)) if why.contains("in progress") => {}
                other => panic!(
                    "round {round}: every client must hear the new PID or \"in progress\", \
                     not {other:?}; all answers: {answers:?}"
                ),
            }
        }
        s.wait_for_control_pid(new_pid);
        assert_settled(&s, new_pid, round, restarts_before + 1);
    }
}

/// Microseconds since the epoch of an RFC 3339 UTC timestamp as the service logs them
/// (`2026-11-30T12:00:53.463136Z`).
fn log_micros(stamp: &str) -> Option<i64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|v| v.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    let micros: i64 = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000_000 + sec * 1_000_000 + micros)
}

fn now_micros() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    since.as_micros() as i64
}

/// The first restart that succeeded at or after `since` (µs since the epoch), from the log:
/// when the old generation learned it (just before it answers the initiator), and the new PID.
fn first_success_since(s: &Service, since: i64) -> Option<(i64, u32)> {
    // The timestamp is the 27 characters before the level; another generation's output may
    // share the line (`restarter: generation 42026-...Z  INFO ...`).
    const STAMP: usize = "2026-11-30T12:00:53.463136Z".len();
    s.log_text().lines().find_map(|l| {
        let end = l.find("  INFO shellflip::restart: restart succeeded")?;
        let at = log_micros(l.get(end.checked_sub(STAMP)?..end)?)?;
        let pid = l
            .split("new_pid=Some(")
            .nth(1)?
            .split(')')
            .next()?
            .parse()
            .ok()?;
        (at >= since).then_some((at, pid))
    })
}

/// Sends `{"Request":"TryRestart"}` and reads the answer: when the request was written (it
/// is in the socket when `write_all` returns), and the new PID or the reason.
async fn ask_raw(mut stream: tokio::net::UnixStream) -> (i64, Result<u32, String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let json = br#"{"Request":"TryRestart"}"#;
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(json);
    if let Err(e) = stream.write_all(&frame).await {
        return (now_micros(), Err(format!("write: {e}")));
    }
    let written_at = now_micros();
    let mut len = [0u8; 4];
    if let Err(e) = stream.read_exact(&mut len).await {
        return (written_at, Err(format!("read: {e}")));
    }
    let mut body = vec![0u8; u32::from_be_bytes(len).min(1 << 16) as usize];
    if let Err(e) = stream.read_exact(&mut body).await {
        return (written_at, Err(format!("read: {e}")));
    }
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let response = &answer["Response"];
    match (
        response["RestartComplete"].as_u64(),
        response["RestartFailed"].as_str(),
    ) {
        (Some(pid), _) => (written_at, Ok(pid as u32)),
        (None, Some(why)) => (written_at, Err(why.to_owned())),
        _ => (written_at, Err(format!("unexpected answer {answer}"))),
    }
}

/// One request of a retrying client: when its request was written, and the answer.
#[derive(Debug)]
struct Asked {
    written_at: i64,
    answer: Result<u32, String>,
}

/// Asks for a restart until it hears anything but "in progress", or until `done` is set (by
/// whichever client heard a PID first).
async fn retrying_client(socket: PathBuf, done: Arc<AtomicBool>) -> Vec<Asked> {
    let mut asked = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let (written_at, answer) = match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => tokio::time::timeout(COMMAND_DEADLINE, ask_raw(stream))
                .await
                .unwrap_or((now_micros(), Err("no answer in time".into()))),
            Err(e) => (now_micros(), Err(format!("connect: {e}"))),
        };
        let in_progress = matches!(&answer, Err(why) if why.contains("in progress"));
        asked.push(Asked { written_at, answer });
        if !in_progress {
            done.store(true, Ordering::SeqCst);
        }
    }
    asked
}

#[test]
fn no_request_sent_before_a_restart_completed_starts_another() {
    const CLIENTS: usize = 40;
    const ROUNDS: usize = 5;
    let s = Service::start("");
    let rt = runtime();
    for round in 1..=ROUNDS {
        let since = now_micros();
        let done = Arc::new(AtomicBool::new(false));
        let asked: Vec<Asked> = rt.block_on(async {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| tokio::spawn(retrying_client(s.socket.clone(), done.clone())))
                .collect();
            let mut all = Vec::new();
            for c in clients {
                all.extend(c.await.expect("client task"));
            }
            all
        });
        let (completed_at, new_pid) =
            wait_until("the restart's success in the log", DEADLINE, || {
                first_success_since(&s, since)
            });
        s.note_pid(new_pid);
        let before: Vec<&Asked> = asked
            .iter()
            .filter(|a| a.written_at < completed_at)
            .collect();
        eprintln!(
            "round {round}: {} requests, {} written before the restart completed",
            asked.len(),
            before.len()
        );
        for a in &before {
            match &a.answer {
                Ok(pid) if *pid == new_pid => {}
                Err(why) if why.contains("in progress") => {}
                other => panic!(
                    "round {round}: a request written {} µs before restart {new_pid} completed was \
                     answered {other:?}, not that PID or \"in progress\"",
                    completed_at - a.written_at
                ),
            }
        }
        // Requests written after the completion may restart again: let that settle.
        wait_until("the service to settle", DEADLINE, || {
            let n = restarts_started(&s);
            std::thread::sleep(Duration::from_millis(500));
            let quiet = status_field_of(&s, "restart in progress").as_deref() == Some("false");
            (n == restarts_started(&s) && quiet).then_some(())
        });
        for pid in s.spawned_pids() {
            s.note_pid(pid);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Item 2: a connection accepted before the handover is answered

#[test]
fn a_connection_made_before_the_handover_gets_a_clear_answer() {
    let s = Service::start("");
    let rt = runtime();
    let mut waiting = rt
        .block_on(RestartCoordinationSocket::connect(&s.socket))
        .expect("connect");
    // Accepted by generation 0 by now.
    std::thread::sleep(Duration::from_millis(200));
    let g1 = s.restart();
    std::thread::sleep(Duration::from_millis(300));
    let answer = rt
        .block_on(async {
            tokio::time::timeout(COMMAND_DEADLINE, waiting.send_restart_command()).await
        })
        .expect("an answer in time");
    match &answer {
        Err(ControlError::RestartFailed(why))
            if why.contains(&format!("handed over to PID {}", g1.pid)) => {}
        other => panic!("expected \"handed over to PID {}\", got {other:?}", g1.pid),
    }
    assert_settled(&s, g1.pid, 1, 1);
}

// ---------------------------------------------------------------------------------------------
// Item 7: the operator cannot be locked out

/// Opens connections that each send a frame header, then one byte every 100 ms.
fn trickler(path: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut opened = 0;
        while !stop.load(Ordering::SeqCst) {
            let Ok(mut s) = UnixStream::connect(&path) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            opened += 1;
            if s.write_all(&24u32.to_be_bytes()).is_err() {
                continue;
            }
            while !stop.load(Ordering::SeqCst) && s.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        opened
    })
}

/// Opens connections, holds each 20 ms, closes it, and again.
fn reconnecter(path: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut opened = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(s) = UnixStream::connect(&path) {
                opened += 1;
                std::thread::sleep(Duration::from_millis(20));
                drop(s);
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        opened
    })
}

#[test]
fn the_operator_is_answered_under_a_flood_of_idle_trickling_and_reconnecting_connections() {
    const IDLE: usize = 300;
    let s = Service::start("");
    let g0 = s.hello();
    let baseline = fds(g0.pid).len();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let idle: Vec<UnixStream> = (0..IDLE)
        .filter_map(|_| UnixStream::connect(&s.socket).ok())
        .collect();
    let load: Vec<_> = (0..2)
        .flat_map(|_| {
            [
                trickler(s.socket.clone(), stop.clone()),
                reconnecter(s.socket.clone(), stop.clone()),
            ]
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    for attempt in 1..=3 {
        let started = Instant::now();
        let out = s.shellflip(&["status", "--timeout", "20"]);
        eprintln!(
            "status {attempt} under {} idle connections: {:?}",
            idle.len(),
            started.elapsed()
        );
        assert!(
            out.status.success() && out.stdout.contains(&format!("pid: {}", g0.pid)),
            "attempt {attempt}: {out:?}"
        );
    }
    // Descriptors stay bounded: not one per idle connection.
    let held = fds(g0.pid).len();
    assert!(
        held < baseline + IDLE / 2,
        "{held} descriptors held under {IDLE} idle connections (baseline {baseline})"
    );

    let started = Instant::now();
    let out = s.restart_cmd();
    eprintln!("restart under the flood: {:?}", started.elapsed());
    assert!(out.status.success(), "{out:?}");
    let pid: u32 = out.stdout.trim().parse().expect("a PID");
    let g1 = s.wait_for_pid(pid);
    assert_eq!(g1.generation, 1);
    // The next generation answers under the same load.
    s.wait_for_control_pid(g1.pid);

    stop.store(true, Ordering::SeqCst);
    for t in load {
        join(t, "a load thread");
    }
    drop(idle);
}

// ---------------------------------------------------------------------------------------------
// Item 8: the descriptor limit

/// Sets the soft `RLIMIT_NOFILE` of `pid`; returns the previous limits.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid rlimit to write into; a null `new` only reads.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    restore_nofile(
        pid,
        libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        },
    );
    old
}

fn restore_nofile(pid: u32, limit: libc::rlimit) {
    // SAFETY: `limit` is a valid rlimit to read from; a null `old` is allowed.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The lowest descriptor number `pid` does not use, once two readings in a row agree (a
/// connection of ours may still be closing): with the limit there, it can open none.
fn lowest_free_fd(pid: u32) -> u64 {
    let lowest = || {
        let used: BTreeSet<i32> = fds(pid).into_iter().map(|(n, _)| n).collect();
        (0..).find(|n| !used.contains(n)).unwrap_or(0) as u64
    };
    let mut last = lowest();
    wait_until("the descriptors to settle", DEADLINE, || {
        std::thread::sleep(Duration::from_millis(200));
        let now = lowest();
        let same = now == last;
        last = now;
        same.then_some(now)
    })
}

#[test]
fn at_the_descriptor_limit_a_restart_is_refused_at_once_and_never_runs_later() {
    let s = Service::start("");
    let pid = s.gen0_pid();
    let old = set_nofile(pid, lowest_free_fd(pid));
    let started = Instant::now();
    let out = s.shellflip(&["restart", "--timeout", "2"]);
    let elapsed = started.elapsed();
    restore_nofile(pid, old);
    eprintln!("answered at the descriptor limit within {elapsed:?}: {out:?}");
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.all().contains("file descriptors"),
        "the client must be told the service is out of descriptors: {out:?}"
    );
    // Descriptors are back: the request must not run now.
    assert_settled(&s, pid, 0, 0);
    // And restarts work again.
    assert_eq!(s.restart().generation, 1);
}

// ---------------------------------------------------------------------------------------------
// Item 9: only a stale socket file is ever replaced

/// The example service on `socket`, not waited for.
fn spawn_restarter(dir: &Path, socket: &Path) -> ChildGuard {
    let (http, echo) = free_addrs();
    let log = std::fs::File::create(dir.join(format!("stderr.{}.log", http.port()))).unwrap();
    let mut cmd = Command::new(restarter());
    cmd.arg("--http")
        .arg(http.to_string())
        .arg("--echo")
        .arg(echo.to_string())
        .arg("--socket")
        .arg(socket);
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    ChildGuard::spawn(&mut cmd)
}

/// Everything the instances started in `dir` wrote.
fn logs(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("stderr.") {
            text += &std::fs::read_to_string(entry.path()).unwrap_or_default();
        }
    }
    text
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_never_replaced() {
    let dir = test_dir();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "do not delete").unwrap();
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "do not delete").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let fifo = dir.path().join("fifo.sock");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    for path in [&file, &link, &fifo] {
        let before = std::fs::symlink_metadata(path).unwrap().file_type();
        let mut child = spawn_restarter(dir.path(), path);
        let status = child.wait_timeout(Duration::from_secs(15));
        child.kill_and_reap();
        let after = std::fs::symlink_metadata(path)
            .unwrap_or_else(|e| panic!("{} was removed: {e}", path.display()));
        assert_eq!(before, after.file_type(), "{} was replaced", path.display());
        let status = status.unwrap_or_else(|| {
            panic!(
                "the service started on {}, which is not a socket:\n{}",
                path.display(),
                logs(dir.path())
            )
        });
        assert!(!status.success());
        assert!(
            logs(dir.path()).contains("not a socket"),
            "{}",
            logs(dir.path())
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "do not delete");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "do not delete");
}

#[test]
fn instances_started_at_once_never_share_the_socket() {
    const INSTANCES: usize = 4;
    for round in 1..=3 {
        let dir = test_dir();
        let socket = dir.path().join("control.sock");
        let mut instances: Vec<ChildGuard> = (0..INSTANCES)
            .map(|_| spawn_restarter(dir.path(), &socket))
            .collect();
        // All but one give up; the one left serves.
        let running = wait_until("all instances but one to give up", DEADLINE, || {
            let running: Vec<usize> = (0..INSTANCES)
                .filter(|&i| matches!(instances[i].try_wait(), Ok(None)))
                .collect();
            (running.len() <= 1).then_some(running)
        });
        assert_eq!(running.len(), 1, "round {round}: {}", logs(dir.path()));
        let winner = instances[running[0]].id();
        for (i, child) in instances.iter_mut().enumerate() {
            if i != running[0] {
                let status = child.try_wait().ok().flatten();
                assert!(
                    status.is_some_and(|s| !s.success()),
                    "round {round}: {status:?}"
                );
            }
        }
        let out = wait_until("the remaining instance to answer", DEADLINE, || {
            let out = shellflip_at(&socket, &["status", "--timeout", "5"]);
            out.status.success().then_some(out)
        });
        assert!(
            out.stdout.contains(&format!("pid: {winner}")),
            "round {round}: the control socket must lead to the instance that runs: {out:?}"
        );
        let text = logs(dir.path());
        assert!(
            text.contains("locked by another process")
                || text.contains("another process is listening"),
            "round {round}: {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Item 10: every path AF_UNIX accepts

/// The length of a path in a directory made by [`test_dir`].
fn test_dir_len() -> usize {
    std::env::temp_dir()
        .join("shellflip-test-XXXXXX")
        .as_os_str()
        .len()
}

#[test]
fn socket_paths_up_to_107_bytes_work_and_longer_ones_name_the_limit() {
    let name = "s".repeat(107 - test_dir_len() - 1);
    let s = Service::start_with(Options {
        socket: Some(name.into()),
        ..Default::default()
    });
    assert_eq!(s.socket.as_os_str().len(), 107);
    s.wait_for_control_pid(s.gen0_pid());
    let g1 = s.restart();
    s.wait_for_control_pid(g1.pid);

    let dir = test_dir();
    let socket = dir
        .path()
        .join("s".repeat(108 - dir.path().as_os_str().len() - 1));
    assert_eq!(socket.as_os_str().len(), 108);
    let mut child = spawn_restarter(dir.path(), &socket);
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .expect("a 108-byte socket path must be refused");
    assert!(!status.success());
    assert!(logs(dir.path()).contains("108"), "{}", logs(dir.path()));
}

// ---------------------------------------------------------------------------------------------
// Item 11: a removed socket file is bound again

fn assert_control_socket_leads_to(s: &Service, pid: u32) {
    wait_until(
        &format!("{} to be a socket of mode 0600", s.socket.display()),
        DEADLINE,
        || {
            let meta = std::fs::symlink_metadata(&s.socket).ok()?;
            (meta.file_type().is_socket() && meta.permissions().mode() & 0o777 == 0o600)
                .then_some(())
        },
    );
    s.wait_for_control_pid(pid);
}

#[test]
fn a_removed_control_socket_file_or_directory_is_bound_again_by_the_next_generation() {
    let s = Service::start_with(Options {
        socket: Some("run/control.sock".into()),
        ..Default::default()
    });
    let g0 = s.hello();

    std::fs::remove_file(&s.socket).unwrap();
    signal(g0.pid, Signal::SIGUSR1);
    let g1 = s.wait_for_other_than(g0.pid);
    assert_control_socket_leads_to(&s, g1.pid);

    std::fs::remove_dir_all(s.socket.parent().unwrap()).unwrap();
    signal(g1.pid, Signal::SIGUSR1);
    let g2 = s.wait_for_other_than(g1.pid);
    assert_control_socket_leads_to(&s, g2.pid);

    // The file is the generations' own again: the next restart inherits it.
    let g3 = s.restart();
    assert_control_socket_leads_to(&s, g3.pid);
}

// ---------------------------------------------------------------------------------------------
// Item 12: a refused client reads why

/// Run as another user by the test below: connects, waits until the service has answered and
/// closed, then asks for a restart and prints what the library's client returns.
#[test]
fn helper_for_a_client_of_another_user() {
    let Some(socket) = std::env::var_os("SHELLFLIP_TEST_REFUSED_CLIENT") else {
        return;
    };
    let stream = UnixStream::connect(&socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The refusal is there before the request is written.
    let _ = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        &mut [0u8; 1],
        nix::sys::socket::MsgFlags::MSG_PEEK,
    );
    std::thread::sleep(Duration::from_millis(200));
    stream.set_nonblocking(true).unwrap();
    let answer = runtime().block_on(async {
        let stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
        RestartCoordinationSocket::new(stream)
            .send_restart_command()
            .await
    });
    println!("answer: {answer:?}");
}

#[test]
fn a_client_of_another_user_reads_permission_denied() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let s = Service::start("");
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "helper_for_a_client_of_another_user",
        "--nocapture",
    ])
    .env("SHELLFLIP_TEST_REFUSED_CLIENT", &s.socket)
    .uid(NOBODY)
    .gid(NOBODY);
    let out = run(cmd, COMMAND_DEADLINE);
    assert!(
        out.stdout.contains("permission denied"),
        "the refused client must read why: {out:?}"
    );

    let mut cmd = Command::new(shellflip_cli());
    cmd.args(["restart", "--timeout", "10", "--socket"])
        .arg(&s.socket)
        .uid(NOBODY)
        .gid(NOBODY);
    let out = run(cmd, COMMAND_DEADLINE);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.all().contains("permission denied"), "{out:?}");
    assert_settled(&s, s.gen0_pid(), 0, 0);
}
