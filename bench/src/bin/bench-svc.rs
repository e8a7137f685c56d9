//! Small services on shellflip for the benchmarks that the example service cannot drive.
//!
//! * `bench-svc listeners --count N --socket S`: registers N named TCP listeners (`l0`…) in the
//!   registry and restarts on request, handing all of them over (the `scaling` benchmark).
//! * `bench-svc state --bytes N --socket S --results F [--systemd]`: its state writer sends N
//!   bytes, led by the time the writer started (CLOCK_MONOTONIC); the process that reads the
//!   state notes when it started, when the first and the last byte arrived, in F (the `state`
//!   benchmark). With `--systemd` it runs the systemd lifecycle, where the state is written into
//!   a memfd and read back by the new executable's validation run.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shellflip::lifecycle::{LifecycleHandler, PipeWriter};
use shellflip::{Registry, RestartConfig};
use shellflip_bench::svc::monotonic_ns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Hold N named listeners.
    Listeners {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        socket: PathBuf,
        /// Append "<fresh|restarted> <µs spent getting the listeners from the registry>" here.
        #[arg(long)]
        timing: Option<PathBuf>,
    },
    /// Hand over N bytes of state and time it.
    State {
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        results: PathBuf,
        /// The systemd lifecycle (needs NOTIFY_SOCKET).
        #[arg(long)]
        systemd: bool,
    },
}

struct Payload {
    bytes: u64,
}

#[async_trait::async_trait]
impl LifecycleHandler for Payload {
    async fn send_to_new_process(&mut self, mut w: PipeWriter) -> std::io::Result<()> {
        w.write_u64(monotonic_ns()).await?;
        let block = vec![0x5Au8; self.bytes.min(1 << 20) as usize];
        let mut left = self.bytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            w.write_all(&block[..n]).await?;
            left -= n as u64;
        }
        w.flush().await
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in main: no other thread exists yet.
    let origin = unsafe { shellflip::init_from_env() };
    if let Err(e) = origin {
        eprintln!("bench-svc: inherited descriptors are unusable: {e}");
    }
    let args = Args::parse();
    let runtime = match shellflip_bench::svc::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-svc: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.mode {
            Mode::Listeners {
                count,
                socket,
                timing,
            } => listeners(count, socket, timing).await,
            Mode::State {
                bytes,
                socket,
                results,
                systemd,
            } => state(bytes, socket, results, systemd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shellflip::report_startup_failure(&e);
            eprintln!("bench-svc: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn listeners(count: usize, socket: PathBuf, timing: Option<PathBuf>) -> Result<(), String> {
    let started = std::time::Instant::now();
    let registry = Registry::new();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let l = registry
            .tcp_listener(&format!("l{i}"), "127.0.0.1:0".parse().expect("address"))
            .map_err(|e| e.to_string())?;
        held.push(l);
    }
    if let Some(path) = timing {
        let how = match shellflip::origin() {
            shellflip::Origin::Fresh => "fresh",
            _ => "restarted",
        };
        let line = format!("{how} {}\n", started.elapsed().as_micros());
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| e.to_string())?;
    }
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        registry,
        ..Default::default()
    };
    let task = config.try_into_restart_task().map_err(|e| e.to_string())?;
    let handover = task.await.map_err(|e| e.to_string())?;
    drop(held);
    std::process::exit(handover.exit_code())
}

async fn state(bytes: u64, socket: PathBuf, results: PathBuf, systemd: bool) -> Result<(), String> {
    let started = monotonic_ns();
    if let Some(mut r) = shellflip::try_receive_from_old_process().map_err(|e| e.to_string())? {
        let opened = monotonic_ns();
        let written_at = r.read_u64().await.map_err(|e| e.to_string())?;
        let first = monotonic_ns();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 8u64;
        loop {
            let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let last = monotonic_ns();
        let line = format!("{written_at} {started} {opened} {first} {last} {total}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| e.to_string())?;
    }
    if shellflip::is_validation_run() {
        // Accept the state: this reports to the old process and exits.
        shellflip::startup_complete().map_err(|e| e.to_string())?;
    }
    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        lifecycle_handler: Box::new(Payload { bytes }),
        ..Default::default()
    };
    let task = if systemd {
        config.try_into_systemd_restart_task()
    } else {
        config.try_into_restart_task()
    };
    let handover = task
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    std::process::exit(handover.exit_code())
}
