//! The systemd lifecycle measured from outside, against the example service under a real
//! systemd in a container (scripts/bench-systemd-store.sh boots it and installs the units):
//!
//! - [`gap`]: `systemctl restart` (or `reload`) while a probe on the machine opens a new TCP
//!   connection to the HTTP port every millisecond and notes, for each, when it was made, when
//!   its `GET /` answer came back and which PID answered. Per restart: the time from issuing the
//!   command to the new process's `READY=1` (systemd's `ActiveEnterTimestampMonotonic`, on the
//!   same CLOCK_MONOTONIC as the probe: the container has no time namespace), and the gap
//!   between the old process's last answer and the new one's first.
//! - [`store`]: N echo clients connected, kept in systemd's file descriptor store across each
//!   `systemctl restart`; after each one every client sends a line and must get it back.
//!
//! Nothing here touches the library: only TCP on 127.0.0.1 and `systemctl` in the container.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::proc;
use crate::stats::{Summary, Table, count, ms, ratio};

/// CLOCK_MONOTONIC in microseconds: the clock of systemd's `*TimestampMonotonic` properties.
pub fn mono_us() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000
}

/// How to reach systemctl in the container and which unit.
#[derive(Clone)]
pub struct Unit {
    /// The command that runs systemctl inside, e.g. `nsenter -t PID -a systemctl`.
    pub systemctl: Vec<String>,
    /// The unit's name.
    pub name: String,
}

impl Unit {
    /// Runs `systemctl ARGS... UNIT` and returns its standard output, or why it failed.
    async fn run(&self, args: &[&str]) -> Result<String, String> {
        let (program, pre) = self.systemctl.split_first().ok_or("no systemctl command")?;
        let mut cmd = Command::new(program);
        cmd.args(pre)
            .args(args)
            .arg(&self.name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let what = format!("systemctl {} {}", args.join(" "), self.name);
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
            let pid = child.id() as i32;
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            // The driver's reaper takes every child's status.
            match proc::wait_exit(pid, Duration::from_secs(120)).as_deref() {
                Some("exit 0") => Ok(out),
                other => Err(format!("{what}: {other:?}")),
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// `systemctl show -p P...`, as (name, value) pairs in the order asked.
    async fn show(&self, props: &[&str]) -> Result<Vec<i64>, String> {
        let mut args = vec!["show"];
        for p in props {
            args.push("-p");
            args.push(p);
        }
        let out = self.run(&args).await?;
        props
            .iter()
            .map(|p| {
                out.lines()
                    .find_map(|l| l.strip_prefix(&format!("{p}=")))
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .ok_or_else(|| format!("no {p} in `systemctl show`: {out:?}"))
            })
            .collect()
    }
}

/// One probe connection: made at `sent`, answered at `answered` by `pid` (µs, CLOCK_MONOTONIC).
#[derive(Clone, Copy)]
struct Probe {
    sent: i64,
    answered: i64,
    pid: Option<u32>,
}

async fn probe_once(addr: SocketAddr) -> Option<u32> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1)?;
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
}

/// One restart as measured: µs on CLOCK_MONOTONIC.
struct Restart {
    old_pid: u32,
    new_pid: u32,
    issued: i64,
    returned: i64,
    exec_start: Option<i64>,
    ready: Option<i64>,
}

/// Options of [`gap`].
pub struct GapOptions {
    /// The service's HTTP address.
    pub http: SocketAddr,
    /// `restart` (systemd lifecycle) or `reload` (fork/exec lifecycle under systemd).
    pub verb: String,
    /// Restarts.
    pub restarts: usize,
    /// Pause between restarts.
    pub pause: Duration,
    /// Between probe connections.
    pub probe_every: Duration,
    /// The unit.
    pub unit: Unit,
}

/// The accept gap and `READY=1` timing across restarts. See the module's documentation.
pub async fn gap(o: &GapOptions) -> Result<String, String> {
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (probes, stop, addr, every) = (probes.clone(), stop.clone(), o.http, o.probe_every);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut tasks = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let probes = probes.clone();
                tasks.push(tokio::spawn(async move {
                    let sent = mono_us();
                    let pid = tokio::time::timeout(Duration::from_secs(5), probe_once(addr))
                        .await
                        .ok()
                        .flatten();
                    let answered = mono_us();
                    probes.lock().unwrap().push(Probe {
                        sent,
                        answered,
                        pid,
                    });
                }));
                tasks.retain(|t| !t.is_finished());
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut restarts = Vec::new();
    let mut failed = Vec::new();
    let verb = o.verb.as_str();
    for i in 0..o.restarts {
        let old = o.unit.show(&["MainPID"]).await?[0] as u32;
        let issued = mono_us();
        let r = o.unit.run(&[verb]).await;
        let returned = mono_us();
        if let Err(e) = r {
            failed.push(format!("restart {i}: {e}"));
            tokio::time::sleep(o.pause).await;
            continue;
        }
        let v = o
            .unit
            .show(&[
                "MainPID",
                "ExecMainStartTimestampMonotonic",
                "ActiveEnterTimestampMonotonic",
            ])
            .await?;
        // Only `restart` starts a new main process from systemd and enters "active" again.
        let fresh = verb == "restart";
        restarts.push(Restart {
            old_pid: old,
            new_pid: v[0] as u32,
            issued,
            returned,
            exec_start: (fresh && v[1] > issued).then_some(v[1]),
            ready: (fresh && v[2] > issued).then_some(v[2]),
        });
        tokio::time::sleep(o.pause).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = prober.await;
    let probes = probes.lock().unwrap().clone();

    let ms_of = |us: i64| us as f64 / 1e3;
    let mut issue_exec = Vec::new();
    let mut issue_ready = Vec::new();
    let mut exec_ready = Vec::new();
    let mut issue_return = Vec::new();
    let mut gaps = Vec::new();
    let mut worst_wait = Vec::new();
    let mut issue_last_old = Vec::new();
    let mut ready_first_new = Vec::new();
    let mut unmeasured = 0;
    for (k, r) in restarts.iter().enumerate() {
        issue_return.push(ms_of(r.returned - r.issued));
        if let Some(e) = r.exec_start {
            issue_exec.push(ms_of(e - r.issued));
        }
        if let Some(ready) = r.ready {
            issue_ready.push(ms_of(ready - r.issued));
            if let Some(e) = r.exec_start {
                exec_ready.push(ms_of(ready - e));
            }
        }
        // The probes of this restart: from the previous restart's return to the next's issue.
        let lo = if k == 0 {
            i64::MIN
        } else {
            restarts[k - 1].returned
        };
        let hi = restarts.get(k + 1).map_or(i64::MAX, |n| n.issued);
        let mine: Vec<&Probe> = probes
            .iter()
            .filter(|p| p.sent >= lo && p.sent < hi)
            .collect();
        let last_old = mine
            .iter()
            .filter(|p| p.pid == Some(r.old_pid))
            .map(|p| p.answered)
            .max();
        let first_new = mine
            .iter()
            .filter(|p| p.pid == Some(r.new_pid))
            .map(|p| p.answered)
            .min();
        match (last_old, first_new) {
            (Some(a), Some(b)) if r.old_pid != r.new_pid => {
                gaps.push(ms_of(b - a));
                issue_last_old.push(ms_of(a - r.issued));
                if let Some(ready) = r.ready {
                    ready_first_new.push(ms_of(b - ready));
                }
            }
            _ => unmeasured += 1,
        }
        let wait = mine
            .iter()
            .filter(|p| p.sent >= r.issued - 1000 && p.sent <= r.returned)
            .map(|p| ms_of(p.answered - p.sent))
            .fold(f64::NAN, f64::max);
        worst_wait.push(wait);
    }
    let in_windows = |p: &Probe| {
        restarts
            .iter()
            .any(|r| p.sent >= r.issued - 1000 && p.sent <= r.returned + 50_000)
    };
    let quiet: Vec<f64> = probes
        .iter()
        .filter(|p| p.pid.is_some() && !in_windows(p))
        .map(|p| ms_of(p.answered - p.sent))
        .collect();
    let quiet_s = Summary::of(&quiet);
    let unanswered = probes.iter().filter(|p| p.pid.is_none()).count();

    let mut t = Table::new(&[
        "measure (per restart)",
        "n",
        "median ms",
        "p10–p90 ms",
        "max ms",
        "median / quiet probe",
    ]);
    let mut add = |name: &str, v: &[f64]| {
        let s = Summary::of(v);
        t.row(vec![
            name.to_owned(),
            s.n.to_string(),
            ms(s.median),
            format!("{}–{}", ms(s.p10), ms(s.p90)),
            ms(s.max),
            ratio(s.median / quiet_s.median),
        ]);
    };
    add(
        &format!("`systemctl {verb}` issued → command returned (nsenter included)"),
        &issue_return,
    );
    if !issue_ready.is_empty() {
        add(
            &format!("`systemctl {verb}` issued → new process started (ExecMainStart)"),
            &issue_exec,
        );
        add(
            &format!("`systemctl {verb}` issued → new process's READY=1 (ActiveEnter)"),
            &issue_ready,
        );
        add("new process started → its READY=1", &exec_ready);
    }
    add(
        &format!("`systemctl {verb}` issued → old process's last answer"),
        &issue_last_old,
    );
    add(
        "**accept gap**: old process's last answer → new process's first",
        &gaps,
    );
    if !ready_first_new.is_empty() {
        add("READY=1 → new process's first answer", &ready_first_new);
    }
    add(
        "longest wait of a probe made in the restart (connect → answer)",
        &worst_wait,
    );
    add("a probe outside restarts (connect → answer)", &quiet);
    let mut text = t.render();
    text.push_str(&format!(
        "\n{} restarts asked, {} done, {} failed{}; {} with both PIDs seen by the probe. Probes: {} connections ({} per ms asked), {} not answered.\n",
        o.restarts,
        restarts.len(),
        failed.len(),
        failed
            .iter()
            .map(|f| format!(" ({f})"))
            .collect::<String>(),
        restarts.len() - unmeasured,
        count(probes.len() as f64),
        1.0 / o.probe_every.as_secs_f64() / 1e3,
        unanswered,
    ));
    Ok(text)
}

/// Options of [`store`].
pub struct StoreOptions {
    /// The echo address.
    pub echo: SocketAddr,
    /// Client counts to measure.
    pub counts: Vec<usize>,
    /// Restarts per count.
    pub restarts: usize,
    /// The unit.
    pub unit: Unit,
}

/// Raises the soft limit of open descriptors to the hard limit; the new soft limit.
fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit, which we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}

/// Sends one line on every client, then reads every answer; how many came back intact.
async fn echo_all(clients: &mut [BufReader<TcpStream>], tag: &str) -> usize {
    for (i, c) in clients.iter_mut().enumerate() {
        let _ = c
            .get_mut()
            .write_all(format!("{tag} client {i}\n").as_bytes())
            .await;
    }
    let mut ok = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        let mut line = String::new();
        let got = tokio::time::timeout(Duration::from_secs(10), c.read_line(&mut line)).await;
        if matches!(got, Ok(Ok(n)) if n > 0) && line == format!("{tag} client {i}\n") {
            ok += 1;
        }
    }
    ok
}

/// The smallest, median (lower middle) and largest of `v`, exactly.
struct Exact {
    min: f64,
    median: f64,
    max: f64,
}

fn exact(v: &[f64]) -> Exact {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    Exact {
        min: at(0),
        median: at(v.len().saturating_sub(1) / 2),
        max: at(v.len().saturating_sub(1)),
    }
}

/// Echo clients kept in systemd's store across restarts. See the module's documentation.
pub async fn store(o: &StoreOptions) -> Result<String, String> {
    let nofile = raise_nofile();
    let limit = o.unit.run(&["show", "-p", "LimitNOFILE"]).await?;
    let mut t = Table::new(&[
        "echo clients",
        "restarts done / asked",
        "restart ms (systemctl, nsenter included): median [min–max]",
        "issued → READY=1 ms: median [min–max]",
        "median / no clients",
        "clients echoing after each restart: min / median",
        "store size after: min–max",
    ]);
    let mut base = f64::NAN;
    let mut problems = Vec::new();
    for &n in &o.counts {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            let s = TcpStream::connect(o.echo)
                .await
                .map_err(|e| format!("echo client: {e}"))?;
            let mut r = BufReader::new(s);
            let mut hello = String::new();
            tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut hello))
                .await
                .map_err(|_| "no greeting from the echo server".to_owned())?
                .map_err(|e| e.to_string())?;
            clients.push(r);
        }
        let before = echo_all(&mut clients, "before").await;
        if before != n {
            problems.push(format!(
                "{n} clients: only {before} echoed before the first restart"
            ));
        }
        let (mut lat, mut ready, mut echoed, mut sizes) = (vec![], vec![], vec![], vec![]);
        let mut done = 0;
        for i in 0..o.restarts {
            let old = o.unit.show(&["MainPID"]).await?[0];
            let issued = mono_us();
            let r = o.unit.run(&["restart"]).await;
            let returned = mono_us();
            if let Err(e) = r {
                problems.push(format!("{n} clients, restart {i}: {e}"));
                continue;
            }
            let v = o
                .unit
                .show(&[
                    "MainPID",
                    "ActiveEnterTimestampMonotonic",
                    "NFileDescriptorStore",
                ])
                .await?;
            if v[0] == old {
                problems.push(format!("{n} clients, restart {i}: MainPID unchanged"));
            }
            done += 1;
            lat.push((returned - issued) as f64 / 1e3);
            if v[1] > issued {
                ready.push((v[1] - issued) as f64 / 1e3);
            }
            let ok = echo_all(&mut clients, &format!("after restart {i}")).await;
            if ok != n {
                problems.push(format!("{n} clients, restart {i}: {ok} echoed"));
            }
            echoed.push(ok as f64);
            sizes.push(v[2] as f64);
        }
        let (l, rd) = (Summary::of(&lat), Summary::of(&ready));
        // Counts exactly (a histogram's 3 significant figures would read 10,000 as 10,008).
        let (e, s) = (exact(&echoed), exact(&sizes));
        if n == o.counts[0] {
            base = rd.median;
        }
        t.row(vec![
            count(n as f64),
            format!("{done} / {}", o.restarts),
            l.range(ms),
            rd.range(ms),
            ratio(rd.median / base),
            format!("{} / {} of {n}", count(e.min), count(e.median)),
            format!("{}–{}", count(s.min), count(s.max)),
        ]);
        drop(clients);
        // The closed clients read EOF in the running generation, which removes them.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut text = t.render();
    text.push_str(&format!(
        "\nThe client's descriptor limit: {nofile}; the service's: {}.\n",
        limit.trim()
    ));
    if problems.is_empty() {
        text.push_str("Every client echoed its line after every restart.\n");
    } else {
        text.push_str(&format!("Problems: {}\n", problems.join("; ")));
    }
    Ok(text)
}
