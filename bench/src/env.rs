//! Where the programs under test are, building them first, and the machine they run on.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The programs the benchmarks start.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The example service (`examples/restarter.rs`).
    pub restarter: PathBuf,
    /// The example's HTTP without shellflip.
    pub plain: PathBuf,
    /// The HTTP service on ecdysis 1.1.1.
    pub ecdysis: PathBuf,
    /// The HTTP service on shellflip 2.1.3.
    pub shellflip2: PathBuf,
    /// The small services on this crate (`bench-svc`).
    pub svc: PathBuf,
    /// The axum example (`examples/axum.rs`).
    pub axum: PathBuf,
    /// The framework services (`bench-fw`).
    pub fw: PathBuf,
}

/// The bench crate's directory (`bench/`).
pub fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where results (tables, the SVG) are written: `bench/results/`.
pub fn results_dir() -> PathBuf {
    bench_dir().join("results")
}

/// Builds the example service and the bench services with the profile this driver was built
/// with (unless `build` is false), and returns their paths.
pub fn prepare(build: bool) -> io::Result<Bins> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| io::Error::other("cannot tell where this program is"))?
        .to_owned();
    let release = dir.file_name().is_some_and(|n| n == "release");
    if build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = bench_dir()
            .parent()
            .map(Path::to_owned)
            .ok_or_else(|| io::Error::other("no workspace"))?;
        for args in [
            &[
                "build",
                "-p",
                "shellflip",
                "--example",
                "restarter",
                "--example",
                "axum",
                "--features",
                "hyper,axum",
            ][..],
            &["build", "-p", "shellflip-bench", "--bins"][..],
        ] {
            let mut cmd = Command::new(&cargo);
            cmd.current_dir(&workspace).args(args);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status()?;
            if !status.success() {
                return Err(io::Error::other(format!("cargo {} failed", args.join(" "))));
            }
        }
    }
    let bins = Bins {
        restarter: dir.join("examples").join("restarter"),
        plain: dir.join("bench-plain"),
        ecdysis: dir.join("bench-ecdysis"),
        shellflip2: dir.join("bench-shellflip2"),
        svc: dir.join("bench-svc"),
        axum: dir.join("examples").join("axum"),
        fw: dir.join("bench-fw"),
    };
    for p in [
        &bins.restarter,
        &bins.plain,
        &bins.ecdysis,
        &bins.shellflip2,
        &bins.svc,
        &bins.axum,
        &bins.fw,
    ] {
        if !p.exists() {
            return Err(io::Error::other(format!(
                "{} is missing (run without --no-build)",
                p.display()
            )));
        }
    }
    Ok(bins)
}

/// One line about the machine: CPU model, cores, kernel, memory.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!(
        "{model}, {cores} cores, Linux {kernel}, {mem_gib:.0} GiB; load average at start {load}"
    )
}

/// The library's revision: the commit, and whether `src/` or `examples/` differ from it.
/// Call it before the reaper starts (it waits for `git`).
pub fn revision() -> String {
    let Some(workspace) = bench_dir().parent().map(Path::to_owned) else {
        return "unknown revision".into();
    };
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(&workspace)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--", "src", "examples"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("shellflip at {commit} with uncommitted changes in src/ or examples/")
            } else {
                format!("shellflip at {commit}")
            }
        }
        None => "unknown revision (not a git checkout)".into(),
    }
}

/// Writes `text` to `bench/results/<name>.md` and says so on standard error.
pub fn save(name: &str, text: &str) {
    let dir = results_dir();
    let path = dir.join(format!("{name}.md"));
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, text)) {
        Ok(()) => eprintln!("results written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
