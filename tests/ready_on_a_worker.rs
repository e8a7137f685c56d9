//! A service whose restart task is first polled on a runtime's worker thread (as axum's
//! `with_graceful_shutdown` and any `tokio::spawn(restart)` do), not on the main thread, must
//! survive its predecessor's exit once it took over. (It used to be killed: the "die with the
//! parent until ready" signal, `PR_SET_PDEATHSIG`, is per thread and was set on the main thread
//! while readiness lifted it on the worker.)
//!
//! `harness = false`: the test binary is the runner, and, started with `SF_ROLE=service`, the
//! service (generation 0 and its successor, which inherits the variable).

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    ChildGuard, DEADLINE, PROTOCOL_VARS, connect, is_running, runtime, try_restart, wait_until,
};

fn main() {
    if std::env::var_os("SF_ROLE").is_some() {
        service();
        return;
    }
    let started = Instant::now();
    runner();
    println!(
        "ready_on_a_worker: successor_ready_on_a_worker_outlives_its_parent ... ok ({:?})",
        started.elapsed()
    );
    println!("1 passed, 0 failed");
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// Generation 0 and its successor: answer each connection with the PID; the restart task runs
/// in a spawned task, so its first poll (readiness) happens on a worker thread.
fn service() {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { shellflip::init_from_env() }.expect("init_from_env");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let code = runtime.block_on(async {
        let config = shellflip::RestartConfig {
            enabled: true,
            coordination_socket_path: PathBuf::from(var("SF_SOCKET")),
            ..Default::default()
        };
        let addr: SocketAddr = var("SF_ADDR").parse().expect("SF_ADDR");
        let listener = config.registry.tcp_listener("tcp", addr).expect("listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let restart = config.try_into_restart_task().expect("restart task");
        let restart = tokio::spawn(restart);
        let serving = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp
                    .write_all(std::process::id().to_string().as_bytes())
                    .await;
            }
        });
        let handover = restart.await.expect("restart task").expect("handover");
        serving.abort();
        let _ = serving.await;
        handover.accepting_stopped();
        handover.exit_code()
    });
    std::process::exit(code);
}

/// The PID the service at `addr` answers with.
fn pid_at(addr: SocketAddr) -> Option<u32> {
    let mut text = String::new();
    connect(addr).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn runner() {
    let dir = common::test_dir();
    let socket = dir.path().join("control.sock");
    let log = dir.path().join("service.log");
    let (addr, _) = common::free_addrs();
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    let out = std::fs::File::create(&log).expect("log");
    cmd.env("SF_ROLE", "service")
        .env("SF_SOCKET", &socket)
        .env("SF_ADDR", addr.to_string())
        .arg(dir.path()) // names the directory: the cleanup finds every generation by it
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    let mut gen0 = ChildGuard::spawn(&mut cmd);
    let cleanup = Cleanup(dir.path().to_owned(), log);
    let pid0 = wait_until("generation 0 to serve", DEADLINE, || {
        assert!(gen0.try_wait().expect("try_wait").is_none(), "it exited");
        pid_at(addr)
    });
    assert_eq!(pid0, gen0.id());
    let pid1 = runtime().block_on(try_restart(&socket)).expect("restart");
    assert_ne!(pid1, pid0);
    let status = gen0.wait_timeout(DEADLINE).expect("generation 0 to exit");
    assert_eq!(status.code(), Some(0), "generation 0: {status:?}");
    // Generation 0 is gone: its successor must still be there, and serving.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        is_running(pid1),
        "the successor {pid1} died with its parent"
    );
    assert_eq!(pid_at(addr), Some(pid1));
    drop(cleanup);
}

/// Kills every generation (found by the directory named in its arguments); prints the log
/// when the test failed.
struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- log ----\n{}---- end of log ----",
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
        common::kill_processes_naming(&self.0);
    }
}
