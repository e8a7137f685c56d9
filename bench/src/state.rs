//! The `state` benchmark: state handover throughput through the library's framing, over the
//! fork/exec pipe and into the systemd lifecycle's memfd, beside a raw pipe, a raw memfd and a
//! copy into freshly allocated memory, all measured in the same run.
//!
//! The framing is private to the library, so it is measured through the public API: `bench-svc
//! state` writes N bytes from its `LifecycleHandler`, led by the time it started writing, and
//! the process that reads the state notes when it has read them all.
//!
//! * Pipe: a fork/exec restart; the successor reads the stream.
//! * memfd: the systemd lifecycle's control-socket restart, which writes the state into a memfd
//!   and runs the new executable in validation mode against it; the validation run reads it. No
//!   systemd runs: the benchmark itself receives (and discards) the service's notifications on a
//!   datagram socket named by `NOTIFY_SOCKET`.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::env::Bins;
use crate::load::Service;
use crate::proc::{self, TempDir};
use crate::stats::{self, Summary, Table};

const MIB: u64 = 1024 * 1024;
const BLOCK: usize = 1 << 20;

/// Options of the state benchmark.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Sizes in MiB, each with its number of repeats.
    pub sizes: Vec<(u64, usize)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Memcpy,
    MemcpyWarm,
    Crc,
    RawPipe,
    RawPipeBig,
    TokioPipe,
    LibPipe,
    LibPipeStream,
    RawMemfd,
    TokioMemfd,
    LibMemfd,
    LibMemfdRead,
}

const PATHS: [(Route, &str); 12] = [
    (Route::Memcpy, "copy into freshly allocated memory"),
    (Route::MemcpyWarm, "copy into memory already touched"),
    (
        Route::Crc,
        "CRC-32 of the bytes, one pass (crc32fast, as the framing)",
    ),
    (
        Route::RawPipe,
        "raw pipe between two threads (1 MiB reads and writes)",
    ),
    (
        Route::RawPipeBig,
        "  same, pipe buffer raised to 1 MiB (F_SETPIPE_SZ)",
    ),
    (
        Route::TokioPipe,
        "tokio pipe between two tasks (async, 1 MiB buffers, no framing)",
    ),
    (
        Route::LibPipe,
        "shellflip fork/exec: handler starts → successor has read all",
    ),
    (
        Route::LibPipeStream,
        "  same, streaming only (first → last byte read)",
    ),
    (Route::RawMemfd, "raw memfd: write all, then read all back"),
    (
        Route::TokioMemfd,
        "tokio::fs::File on a memfd: write all, then read all back",
    ),
    (
        Route::LibMemfd,
        "shellflip systemd memfd: handler starts → validation run has read all",
    ),
    (
        Route::LibMemfdRead,
        "  same, read side only (validation run: verify + read)",
    ),
];

fn raw_pipe(bytes: u64, big: bool) -> std::io::Result<Duration> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    if big {
        nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(BLOCK as i32))?;
    }
    let started = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut w = std::fs::File::from(w);
        let block = vec![0x5Au8; BLOCK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BLOCK as u64) as usize;
            w.write_all(&block[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let mut r = std::fs::File::from(r);
    let got = drain(&mut r)?;
    let elapsed = started.elapsed();
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    if got != bytes {
        return Err(std::io::Error::other("short pipe read"));
    }
    Ok(elapsed)
}

fn raw_memfd(bytes: u64) -> std::io::Result<Duration> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let block = vec![0x5Au8; BLOCK];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.seek(SeekFrom::Start(0))?;
    let got = drain(&mut f)?;
    let elapsed = started.elapsed();
    if got != bytes {
        return Err(std::io::Error::other("short memfd read"));
    }
    Ok(elapsed)
}

async fn tokio_pipe(bytes: u64) -> std::io::Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut tx = tokio::net::unix::pipe::Sender::from_owned_fd(w)?;
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(r)?;
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let block = vec![0x5Au8; BLOCK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BLOCK as u64) as usize;
            tx.write_all(&block[..n]).await?;
            left -= n as u64;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut buf = vec![0u8; BLOCK];
    let mut got = 0u64;
    while got < bytes {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = started.elapsed();
    writer.await.map_err(std::io::Error::other)??;
    if got != bytes {
        return Err(std::io::Error::other("short tokio pipe read"));
    }
    Ok(elapsed)
}

async fn tokio_memfd(bytes: u64) -> std::io::Result<Duration> {
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut f = tokio::fs::File::from_std(f);
    let block = vec![0x5Au8; BLOCK];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        f.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    f.flush().await?;
    f.seek(SeekFrom::Start(0)).await?;
    let got = drain_async(&mut f).await?;
    let elapsed = started.elapsed();
    if got != bytes {
        return Err(std::io::Error::other("short tokio memfd read"));
    }
    Ok(elapsed)
}

fn memcpy_warm(src: &[u8], dst: &mut [u8]) -> Duration {
    let started = Instant::now();
    dst.copy_from_slice(src);
    std::hint::black_box(&dst);
    started.elapsed()
}

fn memcpy(src: &[u8]) -> Duration {
    let started = Instant::now();
    let mut dst: Vec<u8> = Vec::with_capacity(src.len());
    dst.extend_from_slice(src);
    let dst = std::hint::black_box(dst);
    let elapsed = started.elapsed();
    drop(dst);
    elapsed
}

/// One line written by the process that read a state.
#[derive(Debug, Clone, Copy)]
struct Reading {
    written_at: u64,
    started: u64,
    first: u64,
    last: u64,
    total: u64,
}

fn last_reading(results: &Path) -> Option<Reading> {
    let text = std::fs::read_to_string(results).ok()?;
    let line = text.lines().last()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() != 6 {
        return None;
    }
    Some(Reading {
        written_at: v[0],
        started: v[1],
        first: v[3],
        last: v[4],
        total: v[5],
    })
}

/// A stand-in for systemd's notification socket: receives and discards (descriptors sent with
/// `FDSTORE=1` are closed by the kernel as they are not taken).
struct FakeNotify {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeNotify {
    fn start(path: PathBuf) -> std::io::Result<FakeNotify> {
        let sock = UnixDatagram::bind(&path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                let _ = sock.recv(&mut buf);
            }
        });
        Ok(FakeNotify {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FakeNotify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One restart of a systemd-lifecycle `bench-svc state`: the reading of its validation run.
async fn memfd_once(
    bins: &Bins,
    dir: &TempDir,
    notify: &Path,
    bytes: u64,
    i: usize,
) -> std::io::Result<Reading> {
    let socket = dir.join(&format!("memfd{i}.sock"));
    let results = dir.join("memfd.results");
    let log = dir.join("memfd.log");
    let args: Vec<OsString> = vec![
        "state".into(),
        "--bytes".into(),
        bytes.to_string().into(),
        "--socket".into(),
        socket.clone().into(),
        "--results".into(),
        results.clone().into(),
        "--systemd".into(),
    ];
    let pid = proc::spawn(
        &bins.svc,
        &args,
        &[("NOTIFY_SOCKET", notify.as_os_str().to_owned())],
        &log,
    )?;
    if !proc::wait_for_path(&socket, Duration::from_secs(20)) {
        proc::stop(pid, Duration::from_secs(5));
        return Err(std::io::Error::other(format!(
            "bench-svc --systemd did not start (see {})",
            log.display()
        )));
    }
    let before = last_reading(&results).map(|r| r.written_at);
    // The answer never comes (it would come from the next generation, which systemd starts):
    // the old process exits once the validation run accepted the state.
    for _ in 0..500 {
        let r = async {
            shellflip::RestartCoordinationSocket::connect(&socket)
                .await?
                .send_restart_command()
                .await
        };
        match tokio::time::timeout(Duration::from_secs(300), r).await {
            Ok(Err(e)) if e.to_string().contains("still starting") => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => break,
        }
    }
    let exited =
        tokio::task::spawn_blocking(move || proc::wait_exit(pid, Duration::from_secs(300)))
            .await
            .map_err(std::io::Error::other)?;
    let _ = std::fs::remove_file(&socket);
    match (exited, last_reading(&results)) {
        (Some(_), Some(r)) if Some(r.written_at) != before => Ok(r),
        (status, _) => Err(std::io::Error::other(format!(
            "no reading from the validation run (service {status:?}; see {})",
            log.display()
        ))),
    }
}

/// Runs every size and path and returns the table.
pub async fn run(bins: &Bins, o: &StateOptions) -> std::io::Result<String> {
    let dir = TempDir::new("state")?;
    let notify = FakeNotify::start(dir.join("notify.sock"))?;
    let mut t = Table::new(&[
        "state",
        "path",
        "n",
        "time ms: median [min–max]",
        "throughput (median)",
        "÷ copy into fresh memory",
        "÷ copy into touched memory",
        "÷ raw (threads, blocking)",
        "÷ tokio, no framing",
    ]);
    for &(mib, reps) in &o.sizes {
        let bytes = mib * MIB;
        eprintln!("state of {mib} MiB: {reps} repeats of every path");
        let src = vec![0xA5u8; bytes as usize];
        let mut warm_dst = vec![0u8; bytes as usize];
        warm_dst.fill(1);
        // The pipe: one fork/exec service, restarted `reps` times.
        let socket = dir.join(&format!("pipe{mib}.sock"));
        let results = dir.join(&format!("pipe{mib}.results"));
        let log = dir.join(&format!("pipe{mib}.log"));
        let args: Vec<OsString> = vec![
            "state".into(),
            "--bytes".into(),
            bytes.to_string().into(),
            "--socket".into(),
            socket.clone().into(),
            "--results".into(),
            results.clone().into(),
        ];
        let pid = proc::spawn(&bins.svc, &args, &[], &log)?;
        let mut svc = Service::adopt(pid, socket.clone());
        if !proc::wait_for_path(&socket, Duration::from_secs(20)) {
            return Err(std::io::Error::other(format!(
                "bench-svc state did not start (see {})",
                log.display()
            )));
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); PATHS.len()];
        let mut push = |p: Route, ms: f64| {
            let i = PATHS.iter().position(|(q, _)| *q == p).unwrap_or(0);
            times[i].push(ms);
        };
        for i in 0..reps {
            push(Route::Memcpy, stats::as_ms(memcpy(&src)));
            push(
                Route::MemcpyWarm,
                stats::as_ms(memcpy_warm(&src, &mut warm_dst)),
            );
            let started = Instant::now();
            std::hint::black_box(crc32fast::hash(std::hint::black_box(&src)));
            push(Route::Crc, stats::as_ms(started.elapsed()));
            push(Route::RawPipe, stats::as_ms(raw_pipe(bytes, false)?));
            push(Route::RawPipeBig, stats::as_ms(raw_pipe(bytes, true)?));
            push(Route::TokioPipe, stats::as_ms(tokio_pipe(bytes).await?));
            push(Route::RawMemfd, stats::as_ms(raw_memfd(bytes)?));
            push(Route::TokioMemfd, stats::as_ms(tokio_memfd(bytes).await?));
            let old = svc.pid;
            match svc.restart().await {
                Ok(_) => match last_reading(&results) {
                    Some(r) if r.total == bytes + 8 => {
                        push(Route::LibPipe, (r.last - r.written_at) as f64 / 1e6);
                        push(Route::LibPipeStream, (r.last - r.first) as f64 / 1e6);
                    }
                    other => eprintln!("  pipe: unexpected reading {other:?}"),
                },
                Err(e) => eprintln!("  pipe restart failed: {e}"),
            }
            let _ =
                tokio::task::spawn_blocking(move || proc::wait_exit(old, Duration::from_secs(30)))
                    .await;
            match memfd_once(bins, &dir, &notify.path, bytes, i).await {
                Ok(r) if r.total == bytes + 8 => {
                    push(Route::LibMemfd, (r.last - r.written_at) as f64 / 1e6);
                    push(Route::LibMemfdRead, (r.last - r.started) as f64 / 1e6);
                }
                Ok(r) => eprintln!("  memfd: unexpected reading {r:?}"),
                Err(e) => eprintln!("  memfd: {e}"),
            }
        }
        svc.stop();
        drop(src);
        drop(warm_dst);
        let med = |p: Route| {
            let i = PATHS.iter().position(|(q, _)| *q == p).unwrap_or(0);
            stats::median(&times[i])
        };
        let memcpy_ms = med(Route::Memcpy);
        let warm_ms = med(Route::MemcpyWarm);
        for (i, (p, name)) in PATHS.iter().enumerate() {
            let s = Summary::of(&times[i]);
            let (raw, tokio) = match p {
                Route::TokioPipe => (Some(med(Route::RawPipe)), None),
                Route::TokioMemfd => (Some(med(Route::RawMemfd)), None),
                Route::LibPipe | Route::LibPipeStream => {
                    (Some(med(Route::RawPipe)), Some(med(Route::TokioPipe)))
                }
                Route::LibMemfd | Route::LibMemfdRead => {
                    (Some(med(Route::RawMemfd)), Some(med(Route::TokioMemfd)))
                }
                _ => (None, None),
            };
            let tput = bytes as f64 / (s.median / 1e3);
            t.row(vec![
                format!("{mib} MiB"),
                (*name).into(),
                s.n.to_string(),
                s.range(stats::ms),
                stats::rate(tput),
                stats::ratio(memcpy_ms / s.median),
                stats::ratio(warm_ms / s.median),
                raw.map(|r| stats::ratio(r / s.median)).unwrap_or_default(),
                tokio
                    .map(|r| stats::ratio(r / s.median))
                    .unwrap_or_default(),
            ]);
        }
    }
    Ok(t.render())
}

/// Reads `r` to its end in `BLOCK`-sized reads, keeping nothing; returns how many bytes came.
fn drain(r: &mut impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got += n as u64;
    }
}

/// [`drain`] for an async reader.
async fn drain_async(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<u64> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; BLOCK];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got += n as u64;
    }
}
