//! The short examples, run as real processes: `examples/counter.rs` restarted by the
//! `shellflip` command and by SIGUSR1 (its count goes on in the new process), and
//! `examples/systemd_clients.rs` restarted under a stand-in for systemd (a client connected
//! before the restart is answered by the new process). `systemd_clients` is not run under a
//! real systemd here; `scripts/systemd-test.sh` does that for the restarter only.
//!
//! Every test has its own temporary directory and port, waits only with deadlines, and kills
//! the processes it started when it ends, failing or not. Run with
//! `cargo test --all-features --test examples`.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use common::cleanup::Cleanup;
use common::fake_systemd::FakeSystemd;
use common::*;
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------------
// counter

/// What the counter answers a connection: `requests=N pid=P`.
fn count(addr: SocketAddr) -> io::Result<(u64, u32)> {
    let mut text = String::new();
    connect(addr)?.read_to_string(&mut text)?;
    let parse = || {
        let (n, pid) = text.trim_end().split_once(' ')?;
        Some((
            n.strip_prefix("requests=")?.parse().ok()?,
            pid.strip_prefix("pid=")?.parse().ok()?,
        ))
    };
    parse().ok_or_else(|| io::Error::other(format!("unexpected answer {text:?}")))
}

/// The `pid: ` line of `shellflip status`.
fn control_pid(socket: &Path) -> Option<u32> {
    let out = shellflip_at(socket, &["status"]);
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid: ")?.parse().ok())
}

#[test]
fn counter_counts_on_across_restarts() {
    let cleanup = Cleanup::new();
    let (addr, _) = free_addrs();
    let socket = cleanup.path().join("counter.sock");
    let mut cmd = Command::new(example("counter"));
    cmd.arg("--addr")
        .arg(addr.to_string())
        .arg("--socket")
        .arg(&socket);
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    let (stdout, stderr) = cleanup.output();
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let mut gen0 = ChildGuard::spawn(&mut cmd);
    let pid0 = gen0.id();

    let first = wait_until("the counter to serve", DEADLINE, || {
        assert!(gen0.try_wait().expect("try_wait").is_none(), "it exited");
        count(addr).ok()
    });
    assert_eq!(first, (1, pid0));
    assert_eq!(count(addr).expect("request 2"), (2, pid0));
    assert_eq!(count(addr).expect("request 3"), (3, pid0));

    // `shellflip restart --socket`: prints the new PID once the new process is ready.
    let out = shellflip_at(&socket, &["restart"]);
    assert!(out.status.success(), "shellflip restart failed: {out:?}");
    let pid1: u32 = out.stdout.trim().parse().expect("a PID");
    assert_ne!(pid1, pid0);
    // Until it drops its listener, the old process may still accept a connection; either way
    // the new process counts on from the state the old one handed over: 3.
    let answer = wait_until("the new process to answer", DEADLINE, || {
        count(addr).ok().filter(|&(_, pid)| pid == pid1)
    });
    assert_eq!(answer, (4, pid1), "the count did not go on");
    // The old process drained and exited with the handover's exit code.
    let status = gen0
        .wait_timeout(DEADLINE)
        .expect("the old process to exit");
    assert_eq!(status.code(), Some(0), "{}", describe(&status));

    // SIGUSR1. No request until the new process owns the control socket, so the state it
    // received holds 4.
    signal(pid1, Signal::SIGUSR1);
    let pid2 = wait_until("a new process on the control socket", DEADLINE, || {
        control_pid(&socket).filter(|&pid| pid != pid1)
    });
    let answer = wait_until("the newest process to answer", DEADLINE, || {
        count(addr).ok().filter(|&(_, pid)| pid == pid2)
    });
    assert_eq!(answer, (5, pid2), "the count did not go on");
    wait_until("the previous process to exit", DEADLINE, || {
        (!is_running(pid1)).then_some(())
    });
}

/// `CLOCK_MONOTONIC` in microseconds, the clock of systemd's `MONOTONIC_USEC=`.
fn clock_monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the one we pass.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The fork/exec lifecycle under a notify socket, as systemd sees it (`Type=notify-reload`):
/// the restart signal makes the running process say `RELOADING=1` with a fresh
/// `MONOTONIC_USEC=` in one message; the new process names itself with `MAINPIDFD=1` and a
/// pidfd of its own, then ends the reload with `READY=1` and `MAINPID=`, before the old
/// process's own `MAINPID=`.
#[test]
fn counter_under_systemd_says_reloading_and_the_new_process_ends_it() {
    let cleanup = Cleanup::new();
    let (addr, _) = free_addrs();
    let socket = cleanup.path().join("counter.sock");
    let mut systemd = FakeSystemd::new(cleanup.path());
    let mut cmd = systemd.command(&example("counter"));
    cmd.arg("--addr")
        .arg(addr.to_string())
        .arg("--socket")
        .arg(&socket);
    let (stdout, stderr) = cleanup.output();
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let gen0 = ChildGuard::spawn(&mut cmd);
    let pid0 = gen0.id();
    systemd.wait_for("READY=1", DEADLINE, &cleanup.log);

    let before = clock_monotonic_usec();
    signal(pid0, Signal::SIGUSR1);
    let reloading = systemd.wait_for("RELOADING=1", DEADLINE, &cleanup.log);
    let after = clock_monotonic_usec();
    let stamp: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= with RELOADING=1: {reloading:?}"))
        .parse()
        .expect("microseconds");
    assert!(
        before <= stamp && stamp <= after,
        "MONOTONIC_USEC={stamp} is not CLOCK_MONOTONIC in µs between {before} and {after}"
    );

    let named = systemd.wait_for("MAINPIDFD=1", DEADLINE, &cleanup.log);
    assert_eq!(systemd.passed.len(), 1, "one pidfd with {named:?}");
    let fdinfo = std::fs::read_to_string(format!(
        "/proc/self/fdinfo/{}",
        std::os::fd::AsRawFd::as_raw_fd(&systemd.passed[0])
    ))
    .expect("fdinfo of the passed descriptor");
    let pidfd_of: u32 = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .unwrap_or_else(|| panic!("not a pidfd: {fdinfo}"))
        .trim()
        .parse()
        .expect("a PID");
    let ready = systemd.wait_for("READY=1", DEADLINE, &cleanup.log);
    let main_pid = format!("MAINPID={pidfd_of}");
    assert!(
        ready.lines().any(|l| l == main_pid),
        "READY=1 from the process the pidfd names ({pidfd_of}): {ready:?}"
    );
    assert_ne!(pidfd_of, pid0, "the pidfd is the new process's");
    assert!(
        ready.lines().any(|l| l == "STATUS=serving, generation 1"),
        "{ready:?}"
    );
    // The old process's MAINPID= of the new one comes after (a no-op for systemd by then),
    // without READY=1.
    let repeated = systemd.wait_for(&main_pid, DEADLINE, &cleanup.log);
    assert!(!repeated.lines().any(|l| l == "READY=1"), "{repeated:?}");
    wait_until("the old process to exit", DEADLINE, || {
        (!is_running(pid0)).then_some(())
    });
    drop(gen0);
}

#[test]
fn counter_refuses_bad_arguments() {
    let mut cmd = Command::new(example("counter"));
    cmd.args(["--addr", "not-an-address"]);
    let out = run(cmd, COMMAND_DEADLINE);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("not-an-address"), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// systemd_clients

/// Sends `line` and reads the answer, `PID: line`.
fn ask(client: &mut BufReader<TcpStream>, line: &str) -> String {
    writeln!(client.get_mut(), "{line}").expect("send a line");
    let mut answer = String::new();
    client.read_line(&mut answer).expect("read the answer");
    answer
}

#[test]
fn systemd_clients_keeps_its_clients_across_restarts() {
    let cleanup = Cleanup::new();
    let exe = example("systemd_clients");
    let (addr, _) = free_addrs();
    let mut systemd = FakeSystemd::new(cleanup.path());
    let start = |systemd: &mut FakeSystemd| {
        let mut cmd = systemd.command(&exe);
        let (stdout, stderr) = cleanup.output();
        cmd.arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = ChildGuard::spawn(&mut cmd);
        drop(cmd); // closes the test's copies of the store's descriptors
        systemd.wait_for("READY=1", DEADLINE, &cleanup.log);
        child
    };
    // systemd's `restart`: SIGTERM, the process stores its clients and exits 0.
    let stop = |systemd: &mut FakeSystemd, mut child: ChildGuard| {
        signal(child.id(), Signal::SIGTERM);
        let status = child.wait_timeout(DEADLINE).expect("the process to exit");
        assert_eq!(status.code(), Some(0), "{}", describe(&status));
        systemd.drain();
    };

    let gen0 = start(&mut systemd);
    let mut client = BufReader::new(connect(addr).expect("connect"));
    assert_eq!(ask(&mut client, "one"), format!("{}: one\n", gen0.id()));
    stop(&mut systemd, gen0);
    let kept = systemd.stored("client.");
    assert_eq!(kept.len(), 1, "store: {:?}", systemd.store);

    // A line sent while no process runs waits in the connection, and the next one answers it.
    writeln!(client.get_mut(), "two").expect("send a line");
    let gen1 = start(&mut systemd);
    let mut answer = String::new();
    client.read_line(&mut answer).expect("read the answer");
    assert_eq!(answer, format!("{}: two\n", gen1.id()));
    // A new client is served next to the kept one.
    let mut other = BufReader::new(connect(addr).expect("connect"));
    assert_eq!(ask(&mut other, "hi"), format!("{}: hi\n", gen1.id()));
    drop(other);

    // Across a second restart the kept client stays in the store under the same name, and
    // the one that left is not kept (if it was stored before its end of file was read, the
    // next process drops it).
    stop(&mut systemd, gen1);
    let mut gen2 = start(&mut systemd);
    assert_eq!(ask(&mut client, "three"), format!("{}: three\n", gen2.id()));
    poll_until(DEADLINE, || {
        systemd.receive();
        (systemd.stored("client.") == kept).then_some(())
    });
    assert_eq!(systemd.stored("client."), kept, "{:?}", systemd.messages);

    // SIGUSR1: the new executable is first run against the state, then the process stores its
    // clients and exits with 75 (the unit's RestartForceExitStatus=).
    signal(gen2.id(), Signal::SIGUSR1);
    let status = gen2.wait_timeout(DEADLINE).expect("the process to exit");
    assert_eq!(status.code(), Some(75), "{}", describe(&status));
    drop(gen2);
    systemd.drain();
    let gen3 = start(&mut systemd);
    assert_eq!(ask(&mut client, "four"), format!("{}: four\n", gen3.id()));

    // Once the client leaves, it leaves the store.
    drop(client);
    poll_until(DEADLINE, || {
        systemd.receive();
        systemd.stored("client.").is_empty().then_some(())
    });
    assert_eq!(systemd.stored("client."), Vec::<String>::new());
    drop(gen3);
}
