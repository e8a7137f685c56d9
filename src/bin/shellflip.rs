//! `shellflip`: talk to any shellflip service's control socket.
//!
//! ```text
//! shellflip restart --socket PATH [--timeout SECS]   restart; print the new PID (exit 0) or why not (exit 1)
//! shellflip status  --socket PATH                    print the service's status
//! ```
//!
//! Fits `ExecReload=` in a unit: `systemctl reload` then fails when the restart fails.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shellflip::control::{ControlError, RestartCoordinationSocket};

const USAGE: &str = "usage: shellflip (restart|status) --socket PATH [--timeout SECS]

  restart   ask the service to restart; prints the new PID and exits 0, or prints
            the reason and exits 1
  status    print the service's status

  --socket PATH    the service's control socket
  --timeout SECS   give up waiting for the answer after SECS seconds (default 120)";

#[derive(Debug)]
struct Args {
    command: String,
    socket: PathBuf,
    timeout: Duration,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut command = None;
    let mut socket = None;
    let mut timeout = Duration::from_secs(120);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" | "-s" => {
                socket = Some(PathBuf::from(args.next().ok_or("--socket needs a path")?))
            }
            "--timeout" => {
                let v = args.next().ok_or("--timeout needs a number of seconds")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("--timeout: {v:?} is not a number"))?;
                if !(secs > 0.0 && secs.is_finite()) {
                    return Err("--timeout must be positive".into());
                }
                timeout = Duration::from_secs_f64(secs);
            }
            "-h" | "--help" => return Err(String::new()),
            "restart" | "status" if command.is_none() => command = Some(arg),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Args {
        command: command.ok_or("missing command: restart or status")?,
        socket: socket.ok_or("missing --socket PATH")?,
        timeout,
    })
}

async fn run(args: &Args) -> Result<String, ControlError> {
    let work = async {
        let mut socket = RestartCoordinationSocket::connect(&args.socket).await?;
        if args.command == "restart" {
            socket
                .send_restart_command()
                .await
                .map(|pid| pid.to_string())
        } else {
            socket.send_status_request().await.map(|s| s.to_string())
        }
    };
    tokio::time::timeout(args.timeout, work)
        .await
        .map_err(|_| ControlError::Timeout(args.timeout))?
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("shellflip: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shellflip: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shellflip: {} failed: {e}", args.command);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_both_commands() {
        let a = args(&["restart", "--socket", "/run/x.sock", "--timeout", "2.5"]).unwrap();
        assert_eq!(a.command, "restart");
        assert_eq!(a.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(a.timeout, Duration::from_millis(2500));
        let a = args(&["--socket", "/s", "status"]).unwrap();
        assert_eq!(a.command, "status");
        assert_eq!(a.timeout, Duration::from_secs(120));
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert!(args(&["restart"]).unwrap_err().contains("--socket"));
        assert!(
            args(&["--socket", "/s"])
                .unwrap_err()
                .contains("missing command")
        );
        assert!(args(&["reboot", "--socket", "/s"]).is_err());
        assert!(args(&["restart", "--socket", "/s", "--timeout", "-1"]).is_err());
        assert!(args(&["restart", "--socket", "/s", "--timeout", "soon"]).is_err());
        assert!(args(&["restart", "status", "--socket", "/s"]).is_err());
    }
}
