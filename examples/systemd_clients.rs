//! A line-echo TCP server in the systemd lifecycle whose clients stay connected across
//! `systemctl restart`: each open connection waits in systemd's file descriptor store, and the
//! next process takes it back and answers it. Every answer is `PID: line`.
//!
//! ```text
//! systemctl start systemd_clients     # examples/systemd/systemd_clients.service runs
//!                                     # `systemd_clients [ADDR]` (default 127.0.0.1:8080)
//! nc 127.0.0.1 8080                   # type lines: they come back as "PID: line"
//! systemctl restart systemd_clients   # nc stays connected; answers now name the new PID
//! ```

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use shellflip::{Registry, RestartConfig, ShutdownCoordinator, ShutdownHandle, ShutdownSignal};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { shellflip::init_from_env() }?;
    let exit_code = tokio::runtime::Runtime::new()?.block_on(serve())?;
    std::process::exit(exit_code)
}

async fn serve() -> Result<i32, Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:8080".into());
    let config = RestartConfig::default(); // restarts on SIGTERM (systemctl restart), SIGUSR1
    let registry = config.registry.clone();
    let listener = TcpListener::from_std(registry.tcp_listener("echo", addr.parse()?)?)?;
    let shutdown = ShutdownCoordinator::new();
    let spawn =
        |tcp, stored| tokio::spawn(client(tcp, stored, registry.clone(), shutdown.handle()));
    // The clients the previous process left in the store (none after a stop, or when fresh).
    for name in registry.inherited_names()? {
        match registry.take_tcp_stream(&name) {
            Ok(Some(tcp)) => drop(spawn(TcpStream::from_std(tcp)?, Some(name))),
            Ok(None) => {}
            Err(e) => eprintln!("{e}"), // the client left during the restart
        }
    }
    let mut restart = config.try_into_systemd_restart_task()?; // its first poll: READY=1
    let handover = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((tcp, _)) => drop(spawn(tcp, None)),
                Err(e) => eprintln!("accept: {e}"),
            },
            handover = &mut restart => break handover?,
        }
    };
    drop(listener); // new clients wait in its backlog, and it waits in the store
    shutdown.shutdown_with_timeout(Duration::from_secs(1)).await;
    Ok(handover.exit_code())
}

/// Echoes lines until the client leaves or, on a restart, puts the connection in the store
/// between two lines (one taken back from the store is still in it, under its name).
async fn client(tcp: TcpStream, stored: Option<String>, reg: Registry, h: Arc<ShutdownHandle>) {
    let mut signal = ShutdownSignal::from(&*h);
    let (mut tcp, mut line, mut stopping) = (BufReader::new(tcp), Vec::new(), false);
    while !(stopping && line.is_empty() && tcp.buffer().is_empty()) {
        tokio::select! {
            _ = signal.on_shutdown(), if !stopping => stopping = true,
            read = tcp.read_until(b'\n', &mut line) => {
                let answer = [format!("{}: ", std::process::id()).as_bytes(), &line].concat();
                if !matches!(read, Ok(1..)) || tcp.write_all(&answer).await.is_err() {
                    if let Some(name) = &stored { reg.remove(name); } // not to be handed on
                    return;
                }
                line.clear();
            }
        }
    }
    if let (None, Ok(tcp)) = (&stored, tcp.into_inner().into_std()) {
        let name = format!("client.{}.{}", std::process::id(), tcp.as_raw_fd());
        reg.insert(&name, tcp).unwrap_or_else(|e| eprintln!("{e}"));
    }
}
