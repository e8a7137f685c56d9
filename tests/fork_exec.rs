//! The fork/exec lifecycle, end to end: the example service (`examples/restarter.rs`) runs as
//! real processes on real sockets, restarted by real signals, the control socket, the
//! `shellflip` command line and its own admin endpoint.
//!
//! Every test has its own temporary directory and ports, waits only with deadlines, and kills
//! the processes it started (every generation) when it ends, failing or not. Run with
//! `cargo test --all-features --test fork_exec`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------------
// 1. Triggers

#[test]
fn restart_by_signal_control_socket_library_client_and_handle() {
    let s = Service::start("greeting = \"triggers\"\n");
    let g0 = s.hello();
    assert_eq!((g0.generation, g0.greeting.as_str()), (0, "triggers"));

    // SIGUSR1 to the serving process.
    signal(g0.pid, Signal::SIGUSR1);
    let g1 = s.wait_for_other_than(g0.pid);
    assert_eq!(g1.generation, 1, "{g1:?}");
    assert_eq!(g1.greeting, "triggers");
    s.wait_for_control_pid(g1.pid);
    // Generation 0 learned of the handover (it drained and exited): the control socket is
    // generation 1's alone from now on.
    wait_until("generation 0 to exit", DEADLINE, || {
        (!is_running(g0.pid)).then_some(())
    });

    // `restarter restart --socket`.
    let g2 = s.restart();
    assert_ne!(g2.pid, g1.pid);
    assert_eq!(g2.generation, 2);

    // The library's client.
    let rt = runtime();
    let socket = s.socket.clone();
    let pid = rt
        .block_on(try_restart(&socket))
        .expect("restart through RestartCoordinationSocket");
    s.note_pid(pid);
    assert_ne!(pid, g2.pid);
    let g3 = s.wait_for_pid(pid);
    assert_eq!(g3.generation, 3, "{g3:?}");
    let status = rt
        .block_on(async {
            tokio::time::timeout(COMMAND_DEADLINE, async {
                shellflip::RestartCoordinationSocket::connect(&socket)
                    .await?
                    .send_status_request()
                    .await
            })
            .await
        })
        .expect("no answer from the control socket")
        .expect("status");
    assert_eq!((status.pid, status.generation), (g3.pid, 3), "{status:?}");
    assert_eq!(status.lifecycle, shellflip::LifecycleKind::ForkExec);
    assert_eq!(status.lifecycle.to_string(), "fork-exec");

    // The in-app handle: POST /restart answers with the new PID.
    let r = http(s.http, "POST", "/restart").expect("POST /restart");
    assert_eq!(r.status, 200, "{r:?}");
    let pid: u32 = r.body.trim().parse().expect("a PID");
    s.note_pid(pid);
    assert_ne!(pid, g3.pid);
    let g4 = s.wait_for_pid(pid);
    assert_eq!(g4.generation, 4, "{g4:?}");
    assert_eq!(g4.greeting, "triggers");
}

// ---------------------------------------------------------------------------------------------
// 2. State continuity

#[test]
fn state_crosses_ten_chained_restarts() {
    let s = Service::start("");
    let mut seen = vec![s.hello().generation];
    let mut pids = BTreeSet::from([s.hello().pid]);
    for i in 1..=10u64 {
        let h = s.restart();
        assert_eq!(h.generation, i, "{h:?}");
        assert_eq!(s.status_field("generation"), i.to_string());
        assert!(pids.insert(h.pid), "PID {} served twice", h.pid);
        seen.push(h.generation);
    }
    assert_eq!(seen, (0..=10).collect::<Vec<u64>>());
}

// ---------------------------------------------------------------------------------------------
// 3. No refused connection

#[test]
fn new_connections_are_never_refused_across_restarts() {
    let s = Service::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let latest = Arc::new(AtomicU64::new(u64::MAX));
    let client = {
        let (stop, latest, addr) = (stop.clone(), latest.clone(), s.http);
        std::thread::spawn(move || {
            let mut ok = 0u64;
            let mut failures = Vec::new();
            let mut generations = BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                match http(addr, "GET", "/") {
                    Ok(r) if r.status == 200 => match Hello::parse(&r.body) {
                        Some(h) => {
                            ok += 1;
                            generations.insert(h.generation);
                            latest.store(h.generation, Ordering::SeqCst);
                        }
                        None => failures.push(format!("unexpected body {r:?}")),
                    },
                    Ok(r) => failures.push(format!("unexpected response {r:?}")),
                    Err(e) => failures.push(format!("{:?}: {e}", e.kind())),
                }
            }
            (ok, failures, generations)
        })
    };
    let seen = |g: u64| {
        wait_until(
            &format!("the client to reach generation {g}"),
            DEADLINE,
            || (latest.load(Ordering::SeqCst) == g).then_some(()),
        )
    };
    seen(0);
    for g in 1..=5 {
        assert_eq!(s.restart().generation, g);
        seen(g);
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failures, generations) = join(client, "the client");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(20)]
    );
    assert_eq!(generations, (0..=5).collect::<BTreeSet<u64>>());
}

// ---------------------------------------------------------------------------------------------
// 4. Keep-alive clients

#[test]
fn keep_alive_clients_lose_no_request_across_restarts() {
    const CLIENTS: usize = 4;
    let s = Service::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let latest: Arc<Vec<AtomicU64>> =
        Arc::new((0..CLIENTS).map(|_| AtomicU64::new(u64::MAX)).collect());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, latest, addr) = (stop.clone(), latest.clone(), s.http);
            std::thread::spawn(move || {
                let mut ok = 0u64;
                let mut connects = 0u64;
                let mut failures: Vec<String> = Vec::new();
                let mut conn: Option<KeepAlive> = None;
                while !stop.load(Ordering::SeqCst) {
                    if conn.is_none() {
                        match KeepAlive::connect(addr) {
                            Ok(c) => {
                                conn = Some(c);
                                connects += 1;
                            }
                            Err(e) => {
                                failures.push(format!("connect: {e}"));
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    match c.request("GET", "/") {
                        Ok(r) if r.status == 200 => {
                            match Hello::parse(&r.body) {
                                Some(h) => {
                                    ok += 1;
                                    latest[i].store(h.generation, Ordering::SeqCst);
                                }
                                None => failures.push(format!("unexpected body {r:?}")),
                            }
                            if r.closes() {
                                conn = None;
                            }
                        }
                        Ok(r) => {
                            failures.push(format!("unexpected response {r:?}"));
                            conn = None;
                        }
                        Err(e) => {
                            failures.push(format!("request #{}: {:?}: {e}", ok + 1, e.kind()));
                            conn = None;
                        }
                    }
                }
                (ok, connects, failures)
            })
        })
        .collect();
    let all_reach = |g: u64| {
        wait_until(
            &format!("every client to reach generation {g}"),
            DEADLINE,
            || {
                latest
                    .iter()
                    .all(|l| l.load(Ordering::SeqCst) == g)
                    .then_some(())
            },
        )
    };
    all_reach(0);
    for g in 1..=5 {
        assert_eq!(s.restart().generation, g);
        all_reach(g);
    }
    stop.store(true, Ordering::SeqCst);
    for (i, c) in clients.into_iter().enumerate() {
        let (ok, connects, failures) = join(c, "a keep-alive client");
        assert!(
            failures.is_empty(),
            "client {i}: {} failed requests (of {}): {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(20)]
        );
        // One connection per generation at least: each was told to reconnect.
        assert!(connects >= 6, "client {i} connected {connects} times");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Failures leave the old generation serving

/// Asserts that a failed restart left `before` serving and every successor gone.
fn assert_unchanged_after_failure(s: &Service, before: &Hello) {
    assert_eq!(&s.hello(), before, "the old generation must keep serving");
    assert_eq!(s.status_field("pid"), before.pid.to_string());
    assert_eq!(s.status_field("generation"), before.generation.to_string());
    let spawned = s.spawned_pids();
    assert!(!spawned.is_empty(), "no successor was spawned");
    for pid in spawned.into_iter().filter(|&p| p != before.pid) {
        s.assert_gone(pid);
    }
}

#[test]
fn failure_by_crash_keeps_the_old_generation() {
    let s = Service::start("greeting = \"old\"\n");
    let before = s.hello();
    s.write_config("greeting = \"new\"\ncrash_on_start = true\n");
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.all().contains("SIGABRT"), "{out:?}");
    assert_unchanged_after_failure(&s, &before);
    assert!(
        s.status_field("last restart").contains("SIGABRT"),
        "{:?}",
        s.status()
    );
    // Fixed: the next restart works, and reads the new configuration.
    s.write_config("greeting = \"new\"\n");
    let after = s.restart();
    assert_eq!((after.generation, after.greeting.as_str()), (1, "new"));
}

#[test]
fn failure_by_bad_config_keeps_the_old_generation() {
    let s = Service::start("greeting = \"old\"\n");
    let before = s.hello();
    s.write_config("greeting = \"new\"\nthis is [not toml\n");
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    let text = out.all();
    // The parse error itself: the file, the line, and what is wrong there.
    assert!(text.contains("bad configuration"), "{out:?}");
    assert!(text.contains("restarter.toml"), "{out:?}");
    assert!(text.contains("line 2"), "{out:?}");
    assert!(text.contains("expected `=`"), "{out:?}");
    assert_unchanged_after_failure(&s, &before);
    s.write_config("greeting = \"new\"\n");
    let after = s.restart();
    assert_eq!((after.generation, after.greeting.as_str()), (1, "new"));
}

/// The same failures, while the old generation is still writing a large state: the successor
/// stops before reading it, so the writer sees a broken pipe. The initiator must still learn
/// the successor's own reason, not the broken pipe that follows from it.
fn failure_during_a_large_state_send(bad_config: &str, expected: &[&str]) {
    let s = Service::start("greeting = \"old\"\nstate_mib = 64\n");
    let before = s.hello();
    s.write_config(bad_config);
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    for text in expected {
        assert!(
            out.all().contains(text),
            "the reason must be the successor's ({text:?}): {out:?}"
        );
    }
    assert_unchanged_after_failure(&s, &before);
}

#[test]
fn failure_by_bad_config_during_a_large_state_send_reports_the_parse_error() {
    failure_during_a_large_state_send(
        "greeting = \"new\"\nthis is [not toml\n",
        &[
            "bad configuration",
            "restarter.toml",
            "line 2",
            "expected `=`",
        ],
    );
}

#[test]
fn failure_by_crash_during_a_large_state_send_reports_the_signal() {
    failure_during_a_large_state_send("greeting = \"new\"\ncrash_on_start = true\n", &["SIGABRT"]);
}

#[test]
fn failure_by_timeout_kills_and_reaps_the_successor() {
    let s = Service::start_with(Options {
        config: "greeting = \"old\"\n".into(),
        startup_timeout: Some(1.0),
        ..Default::default()
    });
    let before = s.hello();
    s.write_config("greeting = \"new\"\nstartup_delay_ms = 30000\n");
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.all().contains("not ready after 1 s"), "{out:?}");
    // The message names the successor: it was killed and reaped.
    let pid: u32 = out
        .stdout
        .split("new process ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PID in {out:?}"));
    s.assert_gone(pid);
    assert_unchanged_after_failure(&s, &before);
    s.write_config("greeting = \"new\"\n");
    let after = s.restart();
    assert_eq!((after.generation, after.greeting.as_str()), (1, "new"));
}

#[test]
fn failure_by_state_send_kills_the_successor() {
    // The old generation's configuration makes its state send fail.
    let s = Service::start("greeting = \"old\"\nfail_state_send = true\n");
    let before = s.hello();
    s.write_config("greeting = \"new\"\n");
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.all()
            .contains("state send failed on purpose (fail_state_send = true)"),
        "{out:?}"
    );
    assert_unchanged_after_failure(&s, &before);
}

// ---------------------------------------------------------------------------------------------
// 6. One restart at a time

#[test]
fn a_second_restart_is_refused_while_one_runs() {
    let s = Service::start("");
    let before = s.hello();
    // The successor takes its time before it declares itself ready.
    s.write_config("startup_delay_ms = 6000\n");
    let first = {
        let mut cmd = Command::new(restarter());
        cmd.arg("restart").arg("--socket").arg(&s.socket);
        std::thread::spawn(move || run(cmd, COMMAND_DEADLINE))
    };
    wait_until("the first restart to be in progress", DEADLINE, || {
        (s.status_field("restart in progress") == "true").then_some(())
    });

    // Several times: whichever process accepts the connection, the answer must be the same.
    for attempt in 1..=5 {
        let second = s.restart_cmd();
        assert!(
            !first.is_finished(),
            "the second request waited for the first"
        );
        assert_eq!(second.code(), Some(1), "attempt {attempt}: {second:?}");
        assert!(
            second.all().contains("restart already in progress"),
            "attempt {attempt}: a request during a restart must be answered \"restart already \
             in progress\": {second:?}"
        );
        let status = s.status();
        let field = |k: &str| status.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            (field("pid"), field("restart in progress")),
            (Some(before.pid.to_string()), Some("true".to_owned())),
            "attempt {attempt}: the status during a restart must come from the serving \
             process: {status:?}"
        );
    }
    let handle = http(s.http, "POST", "/restart").expect("POST /restart");
    assert!(
        !first.is_finished(),
        "the in-app request waited for the first"
    );
    assert_eq!(handle.status, 500, "{handle:?}");
    assert!(
        handle.body.contains("restart already in progress"),
        "{handle:?}"
    );

    let first = join(first, "the first restart");
    assert!(first.status.success(), "{first:?}");
    let pid: u32 = first.stdout.trim().parse().expect("a PID");
    s.note_pid(pid);
    let after = s.wait_for_pid(pid);
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(s.status_field("restart in progress"), "false");
}

// ---------------------------------------------------------------------------------------------
// 7. Hostile control-socket clients

#[test]
fn silent_garbage_and_bare_clients_neither_block_nor_trigger_a_restart() {
    let s = Service::start("");
    let before = s.hello();

    let silent = UnixStream::connect(&s.socket).expect("connect");

    // Junk whose first four bytes announce an enormous frame.
    let mut junk = UnixStream::connect(&s.socket).expect("connect");
    junk.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    junk.write_all(b"this is not a frame\n").unwrap();
    let mut answer = Vec::new();
    let _ = junk.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("RestartFailed"), "{answer:?}");

    // A well-framed message that is not JSON.
    let mut junk = UnixStream::connect(&s.socket).expect("connect");
    junk.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    junk.write_all(&5u32.to_be_bytes()).unwrap();
    junk.write_all(b"hello").unwrap();
    let mut answer = Vec::new();
    let _ = junk.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("invalid request"), "{answer:?}");

    // Connect, then close at once.
    drop(UnixStream::connect(&s.socket).expect("connect"));

    // Nothing restarted.
    assert_eq!(s.hello(), before);
    assert_eq!(s.status_field("pid"), before.pid.to_string());
    assert_eq!(s.status_field("restart in progress"), "false");
    assert_eq!(s.status_field("last restart"), "none");

    // A real restart works while the silent client is still connected.
    let after = s.restart();
    assert_eq!(after.generation, 1);
    drop(silent);
}

// ---------------------------------------------------------------------------------------------
// 8. Control socket permissions

#[test]
fn control_socket_has_mode_0600() {
    let s = Service::start("");
    let check = || {
        let meta = std::fs::metadata(&s.socket).expect("control socket");
        assert!(meta.file_type().is_socket(), "{meta:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    };
    check();
    s.restart();
    // Inherited, not bound again: still the same file, still 0600.
    check();
}

// ---------------------------------------------------------------------------------------------
// 9. No descriptor growth

/// The descriptors of `pid`, once two readings in a row agree (an HTTP connection of ours may
/// still be closing).
fn settled_fds(pid: u32) -> Vec<(i32, String)> {
    let mut last = fds(pid);
    wait_until("the descriptors to settle", DEADLINE, || {
        std::thread::sleep(Duration::from_millis(100));
        let now = fds(pid);
        let same = now == last;
        last = now;
        same.then(|| last.clone())
    })
}

fn shape(fds: &[(i32, String)]) -> (usize, i32) {
    (fds.len(), fds.iter().map(|(n, _)| *n).max().unwrap_or(-1))
}

#[test]
fn descriptors_do_not_grow_over_twenty_generations() {
    let s = Service::start("");
    let first = s.restart();
    let baseline = settled_fds(first.pid);
    assert!(!baseline.is_empty(), "cannot read /proc/{}/fd", first.pid);
    let mut last = first;
    for g in 2..=20 {
        last = s.restart();
        assert_eq!(last.generation, g);
    }
    // Allow the last reading to settle to the baseline (a connection of ours closing).
    let mut now = settled_fds(last.pid);
    for _ in 0..20 {
        if shape(&now) == shape(&baseline) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        now = settled_fds(last.pid);
    }
    assert_eq!(
        shape(&now),
        shape(&baseline),
        "(count, highest) after 20 generations differs from after the first restart\n\
         generation 1: {baseline:?}\ngeneration 20: {now:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Inherited descriptors are non-blocking

#[test]
fn inherited_listeners_are_non_blocking_and_close_on_exec() {
    let s = Service::start("");
    let h = s.restart();
    let mut wanted = tcp_listener_inodes(s.http.port());
    wanted.extend(tcp_listener_inodes(s.echo.port()));
    wanted.extend(unix_listener_inodes(s.dir.path()));
    assert_eq!(
        wanted.len(),
        3,
        "http, echo and control listeners: {wanted:?}"
    );
    let mut found = BTreeSet::new();
    for (fd, link) in fds(h.pid) {
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|i| i.parse::<u64>().ok())
        else {
            continue;
        };
        if !wanted.contains(&inode) {
            continue;
        }
        found.insert(inode);
        let flags = fd_flags(h.pid, fd).expect("fdinfo");
        assert!(
            flags & O_NONBLOCK != 0,
            "descriptor {fd} ({link}) of generation 1 is blocking: flags {flags:o}"
        );
        assert!(
            flags & O_CLOEXEC != 0,
            "descriptor {fd} ({link}) of generation 1 is not close-on-exec: flags {flags:o}"
        );
    }
    assert_eq!(found, wanted, "listeners not found among the descriptors");
}

// ---------------------------------------------------------------------------------------------
// 11. Environment hygiene

#[test]
fn library_variables_do_not_reach_child_programs() {
    // Variables meant for another process: ignored, and removed all the same.
    let s = Service::start_with(Options {
        env: vec![
            ("LISTEN_PID".into(), "1".into()),
            ("LISTEN_FDS".into(), "2".into()),
            ("LISTEN_FDNAMES".into(), "a:b".into()),
        ],
        ..Default::default()
    });
    let child_env = |generation: u64| {
        let r = http(s.http, "GET", "/child-env").expect("GET /child-env");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains("PATH="), "not an environment: {r:?}");
        let leaked = protocol_vars_in(&r.body);
        assert!(
            leaked.is_empty(),
            "generation {generation} leaks {leaked:?} to its children"
        );
    };
    child_env(0);
    s.restart();
    child_env(1);
    s.restart();
    child_env(2);
}

// ---------------------------------------------------------------------------------------------
// 12. Restart while the previous generation drains

#[test]
fn restart_while_the_previous_generation_still_drains() {
    let s = Service::start("drain_secs = 30\n");
    let g0 = s.hello();
    let (mut echo, mut line) = echo_client(s.echo);
    assert_eq!(line, format!("generation=0 pid={}\n", g0.pid));

    let g1 = s.restart();
    assert!(is_running(g0.pid), "generation 0 should still be draining");
    let g2 = s.restart();
    assert_eq!(g2.generation, 2);
    assert!(
        is_running(g0.pid),
        "generation 0 should still be draining after the second restart"
    );
    assert!(is_running(g2.pid));
    let _ = g1;

    // Generation 0 still serves the held connection.
    for word in ["ping", "still here"] {
        echo.get_mut()
            .write_all(format!("{word}\n").as_bytes())
            .unwrap();
        line.clear();
        echo.read_line(&mut line).expect("echo");
        assert_eq!(line, format!("{word}\n"));
    }
    // A new echo client reaches generation 2.
    let (_fresh, line) = echo_client(s.echo);
    assert_eq!(line, format!("generation=2 pid={}\n", g2.pid));
}

// ---------------------------------------------------------------------------------------------
// 13. No zombie

#[test]
fn no_zombie_after_restarts_and_failures() {
    let s = Service::start_with(Options {
        startup_timeout: Some(1.0),
        ..Default::default()
    });
    s.restart();
    s.restart();
    for bad in [
        "crash_on_start = true\n",
        "not [toml\n",
        "startup_delay_ms = 30000\n",
    ] {
        s.write_config(bad);
        let out = s.restart_cmd();
        assert_eq!(out.code(), Some(1), "{bad}: {out:?}");
    }
    s.write_config("");
    let last = s.restart();
    assert_eq!(last.generation, 3);
    for pid in s.spawned_pids() {
        s.note_pid(pid);
    }
    let zombies = s.zombie_children();
    assert!(
        zombies.is_empty(),
        "zombies (pid, parent) left by the service: {zombies:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 14. The `shellflip` command line

#[test]
fn shellflip_cli_restarts_reports_and_rejects_bad_arguments() {
    let s = Service::start("greeting = \"cli\"\n");
    let g0 = s.hello();

    let out = s.shellflip(&["restart"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let pid: u32 = out.stdout.trim().parse().expect("the new PID alone");
    assert_ne!(pid, g0.pid);
    assert_eq!(s.wait_for_pid(pid).generation, 1);

    let out = s.shellflip(&["status"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains(&format!("pid: {pid}")), "{out:?}");
    assert!(out.stdout.contains("generation: 1"), "{out:?}");

    // The same status as one line of JSON, with the socket given as `--socket=PATH`.
    let mut cmd = Command::new(shellflip_cli());
    cmd.args(["status", "--json"])
        .arg(format!("--socket={}", s.socket.display()));
    let out = run(cmd, COMMAND_DEADLINE);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 1, "{out:?}");
    let status: shellflip::Status = serde_json::from_str(&out.stdout).expect("a JSON status");
    assert_eq!((status.pid, status.generation), (pid, 1));

    // --version and --help answer on stdout, exit 0, and ask nothing of the service.
    for (args, expected) in [
        (
            &["--version"][..],
            format!("shellflip {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            &["restart", "--help"][..],
            "usage: shellflip restart".to_string(),
        ),
    ] {
        let mut cmd = Command::new(shellflip_cli());
        cmd.args(args);
        let out = run(cmd, COMMAND_DEADLINE);
        assert_eq!(out.code(), Some(0), "{args:?}: {out:?}");
        assert!(out.stdout.contains(&expected), "{args:?}: {out:?}");
    }

    s.write_config("crash_on_start = true\n");
    let out = s.shellflip(&["restart"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.all().contains("SIGABRT"), "{out:?}");
    assert_eq!(s.hello().pid, pid);

    // No service there.
    let mut cmd = Command::new(shellflip_cli());
    cmd.args(["restart", "--socket"])
        .arg(s.dir.path().join("nobody.sock"));
    let out = run(cmd, COMMAND_DEADLINE);
    assert_eq!(out.code(), Some(1), "{out:?}");

    for args in [
        &[][..],
        &["restart"][..],
        &["frobnicate", "--socket", "x"][..],
        &["status", "--socket"][..],
        &["restart", "--socket", "x", "--timeout", "soon"][..],
        &["restart", "status", "--socket", "x"][..],
    ] {
        let mut cmd = Command::new(shellflip_cli());
        cmd.args(args);
        let out = run(cmd, COMMAND_DEADLINE);
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stderr.contains("usage"), "{args:?}: {out:?}");
    }
    // Nothing of this reached the service.
    assert_eq!(s.hello().pid, pid);
}

// ---------------------------------------------------------------------------------------------
// 15. A malformed inherited environment

#[test]
fn malformed_shellflip_fds_fails_cleanly_at_start() {
    let dir = test_dir();
    let (http_addr, echo_addr) = free_addrs();
    let mut cmd = Command::new(restarter());
    cmd.arg("--http")
        .arg(http_addr.to_string())
        .arg("--echo")
        .arg(echo_addr.to_string())
        .arg("--socket")
        .arg(dir.path().join("control.sock"));
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    // This test process is the parent: the variables are addressed to the child.
    cmd.env("SHELLFLIP_PPID", std::process::id().to_string())
        .env("SHELLFLIP_FDS", "abc")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let out = run(cmd, DEADLINE);
    assert!(
        !out.status.success(),
        "it must not start: {}\n{out:?}",
        describe(&out.status)
    );
    assert!(
        out.status.code().is_some_and(|c| c != 101),
        "it must exit with an error, not panic or die by a signal: {}\n{out:?}",
        describe(&out.status)
    );
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    assert!(out.stderr.contains("SHELLFLIP_FDS"), "{out:?}");
}
