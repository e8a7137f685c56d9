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
    fn start(&self, systemd: &mut FakeSystemd, n: usize) -> Generation {
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
    let mut gen0 = setup.start(&mut systemd, 0);
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
    let kept = systemd.stored("echo.");
    assert_eq!(kept.len(), 1, "the echo client kept: {:?}", systemd.store);
    assert_eq!(systemd.bags(), 1, "in a bag: {:?}", systemd.store);

    // A line sent while nobody serves waits in the kernel for the next generation.
    echo.get_mut().write_all(b"across the gap\n").unwrap();

    // Generation 1, started from the store.
    let mut gen1 = setup.start(&mut systemd, 1);
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
    let mut gen2 = setup.start(&mut systemd, 2);
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
    let gen3 = setup.start(&mut systemd, 3);
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
    let mut gen0 = setup.start(&mut systemd, 0);
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
    let kept = |s: &FakeSystemd| s.stored("echo.").len();
    assert_eq!(kept(&systemd), 3, "{:?}", systemd.store);

    // While nobody serves: one client resets its connection, one closes it.
    reset_on_close(reset.get_ref());
    drop(reset);
    drop(closed);

    let gen1 = setup.start(&mut systemd, 1);
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
        systemd.store,
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

/// Many connections kept in the store go into bags of at most 253, each one entry of systemd's
/// store: the next generation gets every connection back under its own name, drops the dead
/// ones, keeps the others (in new bags, the old ones leave the store), and serves them; and a
/// second restart hands on exactly the ones still open.
#[test]
fn many_stored_connections_travel_in_bags_with_their_names() {
    const CLIENTS: usize = 300;
    let setup = Setup::new();
    let mut systemd = FakeSystemd::new(setup.dir.path());
    let mut gen0 = setup.start(&mut systemd, 0);
    systemd.wait_for("READY=1", DEADLINE, &gen0.log);
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| echo_client(setup.echo).0).collect();

    signal(gen0.child.id(), Signal::SIGTERM);
    assert_eq!(gen0.wait_exit(DEADLINE).code(), Some(0));
    systemd.drain();
    let stored = systemd.stored("echo.");
    assert_eq!(stored.len(), CLIENTS, "{stored:?}");
    assert_eq!(systemd.bags(), 2, "253 per bag: {:?}", systemd.store);
    assert!(
        systemd.store.keys().all(|k| !k.starts_with("echo.")),
        "no connection stored on its own: {:?}",
        systemd.store
    );
    assert!(
        systemd.store.len() <= 8,
        "a few entries, not one per connection: {:?}",
        systemd.store
    );

    // While nobody serves: two clients reset, one closes; one sends a line.
    for c in clients.drain(..2) {
        reset_on_close(c.get_ref());
    }
    clients.remove(0);
    clients[0].get_mut().write_all(b"waiting\n").unwrap();
    let alive = CLIENTS - 3;

    let gen1 = setup.start(&mut systemd, 1);
    systemd.wait_for("READY=1", DEADLINE, &gen1.log);
    let mut line = String::new();
    clients[0].read_line(&mut line).unwrap();
    assert_eq!(line, "waiting\n");
    echo_all(&mut clients, "gen1");
    // The old bags left the store; the open connections are in new ones, under the names
    // they had (the closed one left once its end of file was read, the reset ones when taken).
    let settled = poll_until(DEADLINE, || {
        systemd.receive();
        let now = systemd.stored("echo.");
        (now.len() == alive && now.iter().all(|n| stored.contains(n))).then_some(now)
    });
    assert!(
        settled.is_some(),
        "store: {:?} holding {:?}\nlog:\n{}",
        systemd.store,
        systemd.stored("echo."),
        std::fs::read_to_string(&gen1.log).unwrap_or_default()
    );
    assert_eq!(systemd.bags(), 2, "{:?}", systemd.store);
    // One descriptor per connection: the one the application serves (the bags hold the others).
    let open = std::fs::read_dir(format!("/proc/{}/fd", gen1.child.id()))
        .unwrap()
        .count();
    assert!(
        open < alive + 60,
        "{open} descriptors open for {alive} connections"
    );
    let log = std::fs::read_to_string(&gen1.log).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");

    // Once more: exactly the open ones come back, and are served.
    let mut gen1 = gen1;
    signal(gen1.child.id(), Signal::SIGTERM);
    assert_eq!(gen1.wait_exit(DEADLINE).code(), Some(0));
    systemd.drain();
    assert_eq!(systemd.stored("echo.").len(), alive, "{:?}", systemd.store);
    let gen2 = setup.start(&mut systemd, 2);
    systemd.wait_for("READY=1", DEADLINE, &gen2.log);
    echo_all(&mut clients, "gen2");
    assert!(get(setup.http).starts_with("generation=2 "));
}

/// Sends one line on every client, then checks every answer.
fn echo_all(clients: &mut [std::io::BufReader<TcpStream>], tag: &str) {
    for (i, c) in clients.iter_mut().enumerate() {
        writeln!(c.get_mut(), "{tag} {i}").unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut line = String::new();
        c.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{tag} {i}\n"));
    }
}

/// The fake store itself behaves as systemd's: many descriptors per message under one name,
/// repeated names, no duplicates, FDSTOREREMOVE by name, FDPOLL=0, newest first.
#[test]
fn the_fake_store_keeps_batches_and_repeated_names() {
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

    let dir = common::test_dir();
    let mut systemd = FakeSystemd::new(dir.path());
    let client = UnixDatagram::unbound().unwrap();
    let path = systemd.path.clone();
    let send = |text: &str, fds: &[std::os::fd::RawFd]| {
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg(
            client.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            if fds.is_empty() { &[] } else { &cmsg },
            MsgFlags::empty(),
            Some(&nix::sys::socket::UnixAddr::new(&path).unwrap()),
        )
        .unwrap();
    };
    let files: Vec<std::fs::File> = (0..300)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let raw: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
    send("FDSTORE=1\nFDNAME=batch", &raw[..253]);
    send("FDSTORE=1\nFDNAME=batch\nFDPOLL=0", &raw[250..]); // 3 duplicates
    send("FDSTORE=1\nFDNAME=other", &raw[..1]); // a duplicate: not added
    for _ in 0..3 {
        systemd.receive().expect("a message");
    }
    assert_eq!(systemd.store.len(), 300);
    assert_eq!(systemd.store.keys().filter(|k| *k == "batch").count(), 300);
    assert!(!systemd.store.contains_key("other"));
    assert!(!systemd.store.0[0].poll, "newest first, FDPOLL=0 kept");
    let cmd = systemd.command(std::path::Path::new("/bin/true"));
    let names = cmd
        .get_envs()
        .find(|(k, _)| *k == "LISTEN_FDNAMES")
        .and_then(|(_, v)| v)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(names, vec!["batch"; 300].join(":"));
    drop(cmd);
    send("FDSTOREREMOVE=1\nFDNAME=batch", &[]);
    systemd.receive().expect("a message");
    assert_eq!(systemd.store.len(), 0);
}
