//! A TCP service that counts its requests and keeps counting across restarts (fork/exec).
//! Each connection is answered `requests=N pid=P` and closed; on a restart the count crosses
//! to the new process in the state, and the old process drains and exits.
//!
//! ```text
//! cargo run --example counter -- --addr 127.0.0.1:8080 --socket /tmp/counter.sock
//! nc 127.0.0.1 8080                               # requests=1 pid=...
//! shellflip restart --socket /tmp/counter.sock    # or: kill -USR1 <pid>; prints the new PID
//! nc 127.0.0.1 8080                               # requests=2, from the new PID
//! ```

use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};
use std::time::Duration;

use shellflip::{RestartConfig, ShutdownCoordinator, StateWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Counter(Arc<AtomicU64>);

#[shellflip::async_trait]
impl shellflip::LifecycleHandler for Counter {
    // A snapshot: requests this process answers after it are not carried over.
    async fn send_to_new_process(&mut self, mut state: StateWriter) -> std::io::Result<()> {
        state.write_u64(self.0.load(Ordering::SeqCst)).await
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { shellflip::init_from_env() }?;
    let exit_code = tokio::runtime::Runtime::new()?.block_on(serve())?;
    std::process::exit(exit_code)
}

async fn serve() -> Result<i32, Box<dyn std::error::Error>> {
    let (mut addr, mut socket) = ("127.0.0.1:8080".parse()?, "/tmp/counter.sock".into());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--addr", Some(value)) => addr = value.parse().map_err(|e| format!("{value}: {e}"))?,
            ("--socket", Some(value)) => socket = value.into(),
            _ => return Err("usage: counter [--addr ADDR] [--socket PATH]".into()),
        }
    }
    let requests = Arc::new(AtomicU64::new(0));
    if let Some(mut state) = shellflip::receive_from_old_process() {
        requests.store(state.read_u64().await?, Ordering::SeqCst);
        state.read_to_end(&mut Vec::new()).await?; // up to the commit: a torn state fails
    }
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        lifecycle_handler: Box::new(Counter(requests.clone())),
        ..Default::default()
    };
    // Inherited from the previous generation, or bound now.
    let listener = tokio::net::TcpListener::from_std(config.registry.tcp_listener("tcp", addr)?)?;
    let mut restart = config.try_into_restart_task()?; // its first poll declares readiness
    let shutdown = ShutdownCoordinator::new();
    let handover = loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((mut tcp, _)) = conn else { continue }; // EMFILE, ...: try again
                let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                let handle = shutdown.handle(); // held until this connection is answered
                tokio::spawn(async move {
                    let answer = format!("requests={n} pid={}\n", std::process::id());
                    let _ = tcp.write_all(answer.as_bytes()).await;
                    drop(handle);
                });
            }
            handover = &mut restart => break handover?,
        }
    };
    drop(listener); // stop accepting: the new process accepts on the same socket
    handover.accepting_stopped(); // only now does `shellflip restart` hear the new PID
    let drained = Duration::from_secs(10);
    shutdown.shutdown_with_timeout(drained).await;
    Ok(handover.exit_code())
}
