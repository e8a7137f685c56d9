//! Probation and rollback in the fork/exec lifecycle, end to end: a new generation that dies
//! soon after it declared itself ready is rolled back, and the old one serves again.
//!
//! Each test runs the example service (`examples/restarter.rs`) with `--probation-ms` as real
//! processes in its own temporary directory, waits only with deadlines, and kills what it
//! started.

mod common;

use common::*;

fn on_probation(ms: u64) -> Service {
    Service::start_with(Options {
        config: "greeting = \"old\"\n".into(),
        args: vec!["--probation-ms".into(), ms.to_string()],
        ..Default::default()
    })
}

/// The new PID named in a rollback message.
fn rolled_back_pid(text: &str) -> u32 {
    text.split("rolled back: new process ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no rolled-back PID in {text:?}"))
}

#[test]
fn a_generation_that_crashes_during_probation_is_rolled_back() {
    let s = on_probation(3000);
    let before = s.hello();
    s.write_config("greeting = \"new\"\ncrash_after_ready_ms = 300\n");
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    let text = out.all();
    assert!(
        text.contains("exited with status 70") && text.contains("ms after it was ready"),
        "{out:?}"
    );
    let crashed = rolled_back_pid(&text);
    s.assert_gone(crashed);
    // The old generation serves again: same process, same generation, old configuration.
    assert_eq!(s.hello(), before);
    assert!(
        s.status_field("last restart").contains("rolled back"),
        "{:?}",
        s.status()
    );
    assert_eq!(s.status_field("probation"), "none");
    // Fixed: the next restart works, and the generation counts on from the old one.
    s.write_config("greeting = \"new\"\n");
    let after = s.restart();
    assert_eq!((after.generation, after.greeting.as_str()), (1, "new"));
}

#[test]
fn a_generation_that_survives_its_probation_takes_over() {
    let mut s = on_probation(300);
    let before = s.hello();
    s.write_config("greeting = \"new\"\n");
    let after = s.restart();
    assert_ne!(after.pid, before.pid);
    assert_eq!(after.greeting, "new");
    assert!(
        s.wait_gen0_exit().success(),
        "the old generation drains and exits"
    );
}

/// A crash after the probation ended is not a rollback: the restart was reported as a
/// success, the old generation drained and exited, and nothing serves the port any more
/// (the README says what the operator sees then).
#[test]
fn a_crash_after_the_probation_is_not_a_rollback() {
    let mut s = on_probation(200);
    s.write_config("greeting = \"new\"\ncrash_after_ready_ms = 1500\n");
    let out = s.restart_cmd();
    assert!(out.status.success(), "{out:?}");
    let new: u32 = out.stdout.trim().parse().expect("a PID");
    assert!(
        s.wait_gen0_exit().success(),
        "the old generation drains and exits"
    );
    wait_until("the new generation to crash", DEADLINE, || {
        (!is_running(new)).then_some(())
    });
    assert!(
        s.try_hello().is_err(),
        "nothing serves after the new generation crashed"
    );
}

/// The PID file names the serving generation: each one once ready, and the old one again
/// after a rollback.
#[test]
fn the_pid_file_follows_the_serving_generation() {
    let dir = test_dir();
    let pid_file = dir.path().join("service.pid");
    let s = Service::start_with(Options {
        args: vec![
            "--probation-ms".into(),
            "3000".into(),
            "--pid-file".into(),
            pid_file.to_string_lossy().into_owned(),
        ],
        ..Default::default()
    });
    let named = || -> u32 {
        std::fs::read_to_string(&pid_file)
            .expect("the PID file")
            .trim()
            .parse()
            .expect("a PID")
    };
    assert_eq!(named(), s.gen0_pid());
    let gen1 = s.restart();
    assert_eq!(named(), gen1.pid);
    s.write_config("crash_after_ready_ms = 200\n");
    let out = s.restart_cmd();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.all().contains("rolled back"), "{out:?}");
    assert_eq!(named(), gen1.pid, "the old generation names itself again");
}
