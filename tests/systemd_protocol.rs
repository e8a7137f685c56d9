//! The systemd lifecycle against a notify socket played by the test: the messages, the
//! descriptors and their names in the store, the framing of the stored state, and the next
//! generation started the way systemd starts it (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`).
//!
//! This is the fast protocol test; `scripts/systemd-test.sh` checks the same under a real
//! systemd.

mod common;

use common::fake_systemd::FakeSystemd;

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::{
    ChildGuard, DEADLINE, echo_client, free_addrs, http, poll_until, restarter, shellflip_at,
    signal, test_dir,
};
use nix::sys::signal::Signal;
use nix::sys::socket::{setsockopt, sockopt};

/// One generation of the service, killed and reaped when dropped.
struct Generation {
    child: ChildGuard,
    log: PathBuf,
}

impl Generation {
    /// Waits for it to exit, or panics with its log after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.child.wait_timeout(limit).unwrap_or_else(|| {
            panic!(
                "did not exit within {limit:?}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
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
        let dir = test_dir();
        let (http, echo) = free_addrs();
        let socket = dir.path().join("control.sock");
        let config = dir.path().join("restarter.toml");
        std::fs::write(&config, "greeting = \"fake systemd\"\n").unwrap();
        Setup {
            http,
            echo,
            socket,
            config,
            dir,
        }
    }

    /// Starts a generation the way systemd does: the store's descriptors at 3.., described in
    /// LISTEN_FDS/LISTEN_FDNAMES, LISTEN_PID set to the new process's PID.
    fn start(&self, systemd: &FakeSystemd, n: usize) -> Generation {
        let log = self.dir.path().join(format!("gen{n}.log"));
        let mut cmd = systemd.command(&restarter());
        cmd.args(["--systemd", "--http", &self.http.to_string()])
            .args(["--echo", &self.echo.to_string()])
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = ChildGuard::spawn(&mut cmd);
        drop(cmd);
        Generation { child, log }
    }
}

/// The last line of `GET /`'s answer.
fn get(addr: SocketAddr) -> String {
    let r = http(addr, "GET", "/").expect("GET /");
    r.body.lines().last().unwrap_or_default().to_string()
}

#[test]
fn store_restart_validation_and_torn_state() {
    let setup = Setup::new();
    let mut systemd = FakeSystemd::new(setup.dir.path());

    // Generation 0: binds, stores its listeners, the control socket and a state memfd, READY=1.
    let mut gen0 = setup.start(&systemd, 0);
    systemd.wait_for("READY=1", DEADLINE, &gen0.log);
    for name in ["http", "echo", "shellflip.control", "shellflip.state"] {
        assert!(
            systemd.store.contains_key(name),
            "{name} not stored: {:?}",
            systemd.messages
        );
    }
    assert!(get(setup.http).starts_with("generation=0 "));

    // An echo client, connected before the restart.
    let (mut echo, mut line) = echo_client(setup.echo);
    assert!(line.starts_with("generation=0 "), "{line}");

    // SIGTERM (systemctl restart): STOPPING=1, the state committed in the memfd, the echo
    // client put in the store, exit 0.
    signal(gen0.child.id(), Signal::SIGTERM);
    systemd.wait_for("STOPPING=1", DEADLINE, &gen0.log);
    let status = gen0.wait_exit(DEADLINE);
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
    echo.get_mut().write_all(b"across the gap\n").unwrap();

    // Generation 1, started from the store.
    let mut gen1 = setup.start(&systemd, 1);
    systemd.wait_for("READY=1", DEADLINE, &gen1.log);
    assert!(
        get(setup.http).starts_with("generation=1 "),
        "{}",
        get(setup.http)
    );
    line.clear();
    echo.read_line(&mut line).unwrap();
    assert_eq!(line, "across the gap\n");
    echo.get_mut().write_all(b"still here\n").unwrap();
    line.clear();
    echo.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    let status = shellflip_at(&setup.socket, &["status"]).all();
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
    let out = shellflip_at(&setup.socket, &["restart", "--timeout", "30"]);
    let text = out.all();
    assert!(!out.status.success(), "the restart must fail: {text}");
    assert!(text.contains("rejected the state"), "{text}");
    assert!(text.contains("state format 1"), "{text}");
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
        let socket = setup.socket.clone();
        move || shellflip_at(&socket, &["restart", "--timeout", "30"])
    });
    let status = gen1.wait_exit(DEADLINE);
    assert_eq!(
        status.code(),
        Some(75),
        "{}",
        std::fs::read_to_string(&gen1.log).unwrap()
    );
    systemd.drain();
    assert!(systemd.store.contains_key("shellflip.initiator"));
    // Another restart asked for while systemd starts the next generation waits in the stored
    // listener: the restart under way satisfies it, and it starts no second one.
    let in_the_gap = std::thread::spawn({
        let socket = setup.socket.clone();
        move || shellflip_at(&socket, &["restart", "--timeout", "30"])
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut gen2 = setup.start(&systemd, 2);
    systemd.wait_for("READY=1", DEADLINE, &gen2.log);
    let out = initiator.join().unwrap();
    let text = out.all();
    assert!(out.status.success(), "{text}");
    assert_eq!(text.trim(), gen2.child.id().to_string());
    let out = in_the_gap.join().unwrap();
    assert_eq!(out.all().trim(), gen2.child.id().to_string(), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        gen2.child.try_wait().unwrap().is_none(),
        "no second restart: {}",
        std::fs::read_to_string(&gen2.log).unwrap()
    );
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
    gen2.child.kill_and_reap();
    let torn = std::fs::File::from(systemd.store["shellflip.state"].try_clone().unwrap());
    torn.set_len(0).unwrap();
    torn.write_all_at(&bytes[..bytes.len() / 2], 0).unwrap();
    let gen3 = setup.start(&systemd, 3);
    systemd.wait_for("READY=1", DEADLINE, &gen3.log);
    assert!(get(setup.http).starts_with("generation=0 "));
    let status = shellflip_at(&setup.socket, &["status"]).all();
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
    systemd.wait_for("READY=1", DEADLINE, &gen0.log);

    // Three echo clients: one will reset, one will close normally, one stays.
    let connect = || {
        let (s, greeting) = echo_client(setup.echo);
        assert!(greeting.starts_with("generation=0 "), "{greeting}");
        s
    };
    let reset = connect();
    let closed = connect();
    let mut stays = connect();

    signal(gen0.child.id(), Signal::SIGTERM);
    assert_eq!(gen0.wait_exit(DEADLINE).code(), Some(0));
    systemd.drain();
    let kept = |s: &FakeSystemd| s.store.keys().filter(|k| k.starts_with("echo.")).count();
    assert_eq!(kept(&systemd), 3, "{:?}", systemd.store.keys());

    // While nobody serves: one client resets its connection, one closes it.
    reset_on_close(reset.get_ref());
    drop(reset);
    drop(closed);

    let gen1 = setup.start(&systemd, 1);
    systemd.wait_for("READY=1", DEADLINE, &gen1.log);
    // The one that stayed is served by the new generation.
    stays.get_mut().write_all(b"after\n").unwrap();
    let mut line = String::new();
    stays.read_line(&mut line).unwrap();
    assert_eq!(line, "after\n");
    // The two that left are gone from the store: the reset one when it was taken back, the
    // closed one once its end of file was read.
    poll_until(DEADLINE, || {
        if kept(&systemd) == 1 {
            return Some(());
        }
        systemd.receive();
        None
    });
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
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &linger).expect("SO_LINGER");
}
