//! The moment of handover and the successor's processes, end to end: when the initiator hears
//! the new PID, what a failed or abandoned successor leaves behind, a wrapper that does not
//! `exec`, and the example's own configuration checks.
//!
//! Each test runs the example service (`examples/restarter.rs`) as real processes in its own
//! temporary directory, waits only with deadlines, and kills what it started.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use nix::sys::signal::Signal;

/// An executable shell script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_string_lossy().into_owned()
}

/// When the initiator hears the new PID, the old generation no longer accepts: a new
/// connection opened right after the answer reaches the new generation, every time.
/// (`SHELLFLIP_HANDOVER_TRIES` sets how many restarts; the default keeps CI short.)
#[test]
fn after_the_answer_new_connections_reach_the_new_generation() {
    let tries: u32 = std::env::var("SHELLFLIP_HANDOVER_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let s = Service::start("drain_secs = 1\n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut old = s.gen0_pid();
    for i in 0..tries {
        // The library's client, then at once a new connection: no process start in between.
        let new = rt
            .block_on(async {
                shellflip::RestartCoordinationSocket::connect(&s.socket)
                    .await?
                    .send_restart_command()
                    .await
            })
            .unwrap_or_else(|e| panic!("restart {i}: {e}"));
        let hello = s
            .try_hello()
            .unwrap_or_else(|e| panic!("restart {i}: GET / right after the answer failed: {e}"));
        s.note_pid(new);
        assert_ne!(new, old, "restart {i}");
        assert_eq!(
            hello.pid, new,
            "restart {i}: GET / right after the answer was served by the old generation {old}"
        );
        old = new;
    }
}

/// A successor that starts a child and is then killed for not being ready is stopped with
/// that child: nothing of it keeps the service's descriptors.
#[test]
fn a_failed_successor_is_stopped_with_everything_it_started() {
    let dir = test_dir();
    let child_pid = dir.path().join("child.pid");
    let wrapper = script(
        dir.path(),
        "starts-a-helper.sh",
        &format!("sleep 600 &\necho $! > {}\nwait\n", child_pid.display()),
    );
    let s = Service::start_with(Options {
        startup_timeout: Some(1.0),
        args: vec!["--executable".into(), wrapper],
        ..Default::default()
    });
    let before = s.hello();
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.all().contains("not ready after 1 s"), "{out:?}");
    let child: u32 = wait_until("the helper's PID", DEADLINE, || {
        std::fs::read_to_string(&child_pid)
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    wait_until("the successor's helper to be stopped", DEADLINE, || {
        (!is_running(child)).then_some(())
    });
    for pid in s.spawned_pids() {
        s.assert_gone(pid);
    }
    assert_eq!(s.hello(), before, "the old generation keeps serving");
}

/// The old generation ends while its successor is starting (fork/exec): the successor is
/// stopped too, so no orphan serves the port without a control socket. Ended by SIGTERM, the
/// old generation stops the successor itself; killed outright, the successor dies with it.
#[test]
fn an_abandoned_restart_leaves_no_successor() {
    for how in [Signal::SIGTERM, Signal::SIGKILL] {
        let s = Service::start("");
        let gen0 = s.gen0_pid();
        s.write_config("startup_delay_ms = 60000\n");
        signal(gen0, Signal::SIGUSR1);
        let successor = wait_until("a successor to be spawned", DEADLINE, || {
            s.spawned_pids().into_iter().find(|&p| p != gen0)
        });
        signal(gen0, how);
        wait_until("generation 0 to exit", DEADLINE, || {
            (!is_running(gen0)).then_some(())
        });
        wait_until(
            &format!("the successor to be stopped after {how}"),
            DEADLINE,
            || (!is_running(successor)).then_some(()),
        );
        assert!(
            s.try_hello().is_err(),
            "after {how}, nothing may serve the port"
        );
    }
}

/// A wrapper that runs the service without `exec`: the restart fails with a message that
/// says so, not only "exited with status 1".
#[test]
fn a_wrapper_without_exec_is_named_in_the_failure() {
    let dir = test_dir();
    let wrapper = script(
        dir.path(),
        "no-exec.sh",
        &format!("{} \"$@\"\n", restarter().display()),
    );
    let s = Service::start_with(Options {
        args: vec!["--executable".into(), wrapper],
        ..Default::default()
    });
    let before = s.hello();
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    let text = out.all();
    assert!(
        text.contains("without `exec`") && text.contains("wrapper"),
        "{out:?}"
    );
    assert_eq!(s.hello(), before, "the old generation keeps serving");
}

/// A generation counter at its maximum stays there; it never wraps (nor panics).
#[test]
fn the_generation_counter_saturates() {
    let s = Service::start_with(Options {
        env: vec![
            ("SHELLFLIP_PPID".into(), std::process::id().to_string()),
            ("SHELLFLIP_FDS".into(), "0".into()),
            ("SHELLFLIP_FDNAMES".into(), String::new()),
            ("SHELLFLIP_GENERATION".into(), u64::MAX.to_string()),
        ],
        ..Default::default()
    });
    assert_eq!(s.status_field("generation"), u64::MAX.to_string());
    s.restart();
    assert_eq!(s.status_field("generation"), u64::MAX.to_string());
}

/// `SHELLFLIP_MODE=validate` with no parent generation waiting says so on stderr.
#[test]
fn a_validation_run_without_a_parent_says_why_it_fails() {
    let dir = test_dir();
    let (http, echo) = free_addrs();
    let mut cmd = Command::new(restarter());
    cmd.arg("--http")
        .arg(http.to_string())
        .arg("--echo")
        .arg(echo.to_string())
        .arg("--socket")
        .arg(dir.path().join("c.sock"))
        .env("SHELLFLIP_PPID", std::process::id().to_string())
        .env("SHELLFLIP_FDS", "0")
        .env("SHELLFLIP_FDNAMES", "")
        .env("SHELLFLIP_MODE", "validate");
    let out = run(cmd, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("validation run"), "{out:?}");
}

/// Configuration values that would fail later are refused before readiness: the restart fails
/// with the reason, and the old generation keeps serving.
#[test]
fn bad_drain_values_fail_the_restart_before_readiness() {
    let s = Service::start("");
    let before = s.hello();
    for bad in ["-1", "nan", "1e300", "inf"] {
        s.write_config(&format!("drain_secs = {bad}\n"));
        let out = s.restart_cmd();
        assert_eq!(out.code(), Some(1), "drain_secs = {bad}: {out:?}");
        assert!(
            out.all().contains("drain_secs"),
            "drain_secs = {bad}: {out:?}"
        );
        assert_eq!(s.hello(), before, "drain_secs = {bad}");
    }
}

/// A bad `--startup-timeout` is a clear error, not a panic.
#[test]
fn a_bad_startup_timeout_is_refused_clearly() {
    for bad in ["-1", "nan", "1e300"] {
        let mut cmd = Command::new(restarter());
        cmd.arg(format!("--startup-timeout={bad}"));
        let out = run(cmd, DEADLINE);
        assert_eq!(out.code(), Some(2), "--startup-timeout {bad}: {out:?}");
        assert!(
            out.stderr.contains("startup-timeout") && !out.stderr.contains("panicked"),
            "--startup-timeout {bad}: {out:?}"
        );
    }
}
