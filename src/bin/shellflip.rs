//! `shellflip`: talk to any shellflip service's control socket.
//!
//! ```text
//! shellflip restart --socket PATH [--timeout SECS]
//!     restart; print the new PID (exit 0) or why not (exit 1)
//! shellflip status --socket PATH [--timeout SECS] [--json]
//!     print the service's status (--json: as one line of JSON)
//! shellflip run [--grace SECS] -- PROGRAM [ARGS...]
//!     supervise PROGRAM as a container's process 1 (or as a subreaper): see `run.rs`
//! shellflip help [restart|status|run]   print the help; also --help, -h, after a command too
//! shellflip --version               print `shellflip <version>`; also -V
//! ```
//!
//! `-s PATH`, `--socket=PATH` and `--timeout=SECS` work too, and options may come before or
//! after the command. Bad arguments: one line naming the offending argument, the usage and a
//! hint to run `--help` on stderr, exit 2.
//!
//! Fits `ExecReload=` in a unit: `systemctl reload` then fails when the restart fails.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shellflip::control::{ControlError, RestartCoordinationSocket};

#[path = "shellflip/run.rs"]
mod run;
#[path = "shellflip/supervisor.rs"]
mod supervisor;

/// How long to wait for the service's answer unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Exit status for arguments that do not parse.
const EXIT_USAGE: u8 = 2;

const HELP: &str = "shellflip: talk to a shellflip service's control socket

usage: shellflip restart --socket PATH [--timeout SECS]
       shellflip status  --socket PATH [--timeout SECS] [--json]
       shellflip run [--grace SECS] -- PROGRAM [ARGS...]
       shellflip help [restart|status|run]
       shellflip --version

commands:
  restart   ask the service to restart; prints the new PID and exits 0, or prints
            the reason and exits 1
  status    print the service's status
  run       run PROGRAM under a small supervisor, as a container's entry point:
            it follows the service across restarts, forwards signals, reaps
            zombies and exits with the service's status ('shellflip run --help')
  help      print this help, or a command's

options:
  -s, --socket PATH    the service's control socket (also --socket=PATH)
      --timeout SECS   give up waiting for the answer after SECS seconds (default 120)
      --json           status only: print the status as one line of JSON
  -h, --help           print this help; after a command, that command's help
  -V, --version        print the version

exit status: 0 done, 1 the command failed, 2 bad arguments (run: the service's)";

const RESTART_HELP: &str = "shellflip restart: ask a service to restart

usage: shellflip restart --socket PATH [--timeout SECS]

Prints the new generation's PID and exits 0, or prints why the restart failed and
exits 1 (the old generation keeps serving). Fits ExecReload= in a systemd unit.

options:
  -s, --socket PATH    the service's control socket (also --socket=PATH)
      --timeout SECS   give up waiting for the answer after SECS seconds (default 120)
  -h, --help           print this help";

const STATUS_HELP: &str = "shellflip status: print a service's status

usage: shellflip status --socket PATH [--timeout SECS] [--json]

Prints the PID, generation, lifecycle, readiness, whether a restart is running, the
last restart's outcome and what happened to the previous generation's state; exits 0,
or 1 when the service cannot be asked.

options:
  -s, --socket PATH    the service's control socket (also --socket=PATH)
      --timeout SECS   give up waiting for the answer after SECS seconds (default 120)
      --json           print the status as one line of JSON
  -h, --help           print this help";

/// A command that talks to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommandName {
    Restart,
    Status,
    /// The supervisor: its arguments are parsed by `run::parse`.
    Run,
}

impl CommandName {
    fn from_word(word: &OsStr) -> Option<Self> {
        match word.to_str()? {
            "restart" => Some(Self::Restart),
            "status" => Some(Self::Status),
            "run" => Some(Self::Run),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Status => "status",
            Self::Run => "run",
        }
    }

    fn synopsis(self) -> &'static str {
        match self {
            Self::Restart => "usage: shellflip restart --socket PATH [--timeout SECS]",
            Self::Status => "usage: shellflip status --socket PATH [--timeout SECS] [--json]",
            Self::Run => run::SYNOPSIS,
        }
    }

    fn help(self) -> &'static str {
        match self {
            Self::Restart => RESTART_HELP,
            Self::Status => STATUS_HELP,
            Self::Run => run::HELP,
        }
    }
}

/// What to ask the service.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Restart,
    Status { json: bool },
}

impl Command {
    fn name(&self) -> CommandName {
        match self {
            Self::Restart => CommandName::Restart,
            Self::Status { .. } => CommandName::Status,
        }
    }
}

/// A request to the service, fully parsed.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    command: Command,
    socket: PathBuf,
    timeout: Duration,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    Run(Args),
    /// `shellflip run`: supervise a program.
    Supervise(run::Options),
    /// Print the help: the global one, or a command's.
    Help(Option<CommandName>),
    Version,
}

/// Arguments that do not parse: the reason, and the command they were for when known (its
/// usage is the one shown).
#[derive(Debug, PartialEq, Eq)]
struct UsageError {
    message: String,
    command: Option<CommandName>,
}

impl UsageError {
    fn new(message: impl ToString, command: Option<CommandName>) -> Self {
        Self {
            message: message.to_string(),
            command,
        }
    }

    /// The text for stderr: the reason, the usage and where to read more.
    fn report(&self) -> String {
        let (synopsis, help) = match self.command {
            Some(c) => (c.synopsis(), format!("shellflip {} --help", c.as_str())),
            None => (
                "usage: shellflip (restart|status) --socket PATH [--timeout SECS] [--json]\n       \
                 shellflip run [--grace SECS] -- PROGRAM [ARGS...]",
                "shellflip --help".to_string(),
            ),
        };
        format!(
            "shellflip: {}\n{synopsis}\nrun '{help}' for more",
            self.message
        )
    }
}

/// A `--timeout` value: a positive, finite number of seconds that fits a `Duration`.
fn parse_timeout(value: &OsStr) -> Result<Duration, String> {
    let text = value
        .to_str()
        .ok_or_else(|| format!("--timeout: {value:?} is not a number"))?;
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("--timeout: {text:?} is not a number"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!(
            "--timeout must be a positive number of seconds, not {text:?}"
        ));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("--timeout: {text:?} is too small")),
        Err(_) => Err(format!("--timeout: {text:?} is too large")),
    }
}

/// Parses the arguments (without the program name). Pure: no I/O, no exit.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, UsageError> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_args(args);
    let mut command: Option<CommandName> = None;
    let mut socket: Option<PathBuf> = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut json = false;
    // `help [COMMAND]`: Some(topic) once the word `help` was seen.
    let mut help: Option<Option<CommandName>> = None;
    // The first control-socket option seen before a command (`run` takes none).
    let mut control_option: Option<&'static str> = None;

    loop {
        let arg = match parser.next() {
            Ok(Some(arg)) => arg,
            Ok(None) => break,
            Err(e) => return Err(UsageError::new(e, command)),
        };
        match arg {
            Short('h') | Long("help") => return Ok(Invocation::Help(command.or(help.flatten()))),
            Short('V') | Long("version") => return Ok(Invocation::Version),
            Short('s') | Long("socket") => {
                let path = parser
                    .value()
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| UsageError::new("--socket needs a path", command))?;
                socket = Some(PathBuf::from(path));
                control_option.get_or_insert("--socket");
            }
            Long("timeout") => {
                let value = parser
                    .value()
                    .map_err(|_| UsageError::new("--timeout needs a number of seconds", command))?;
                timeout = parse_timeout(&value).map_err(|e| UsageError::new(e, command))?;
                control_option.get_or_insert("--timeout");
            }
            Long("json") => {
                json = true;
                control_option.get_or_insert("--json");
            }
            Value(word) if command.is_none() && help.is_none() => {
                if word == "help" {
                    help = Some(None);
                } else {
                    let name = CommandName::from_word(&word).ok_or_else(|| {
                        UsageError::new(
                            format!("unknown command {word:?} (expected restart, status or run)"),
                            None,
                        )
                    })?;
                    if name == CommandName::Run {
                        return parse_run(&mut parser, control_option);
                    }
                    command = Some(name);
                }
            }
            Value(word) if help == Some(None) => {
                let topic = CommandName::from_word(&word).ok_or_else(|| {
                    UsageError::new(
                        format!("help: unknown command {word:?} (expected restart, status or run)"),
                        None,
                    )
                })?;
                help = Some(Some(topic));
            }
            other => return Err(UsageError::new(other.unexpected(), command)),
        }
    }

    if let Some(topic) = help {
        return Ok(Invocation::Help(topic));
    }
    let Some(name) = command else {
        return Err(UsageError::new("missing command: restart or status", None));
    };
    let socket = socket.ok_or_else(|| UsageError::new("missing --socket PATH", command))?;
    let command = match name {
        CommandName::Restart if json => {
            return Err(UsageError::new(
                "--json is only for status, not restart",
                command,
            ));
        }
        CommandName::Restart => Command::Restart,
        CommandName::Status => Command::Status { json },
        CommandName::Run => unreachable!("`run` is parsed by parse_run"),
    };
    Ok(Invocation::Run(Args {
        command,
        socket,
        timeout,
    }))
}

/// Parses what follows `run`; `control_option` is a control-socket option given before it.
fn parse_run(
    parser: &mut lexopt::Parser,
    control_option: Option<&'static str>,
) -> Result<Invocation, UsageError> {
    let run = Some(CommandName::Run);
    if let Some(option) = control_option {
        return Err(UsageError::new(
            format!("{option} is not an option of run"),
            run,
        ));
    }
    match run::parse(parser).map_err(|e| UsageError::new(e, run))? {
        run::Parsed::Run(options) => Ok(Invocation::Supervise(options)),
        run::Parsed::Help => Ok(Invocation::Help(run)),
    }
}

/// Asks the service; returns the line(s) to print.
async fn run(args: &Args) -> Result<String, ControlError> {
    let work = async {
        let mut socket = RestartCoordinationSocket::connect(&args.socket).await?;
        match args.command {
            Command::Restart => socket
                .send_restart_command()
                .await
                .map(|pid| pid.to_string()),
            Command::Status { json: false } => {
                socket.send_status_request().await.map(|s| s.to_string())
            }
            Command::Status { json: true } => {
                let status = socket.send_status_request().await?;
                Ok(serde_json::to_string(&status)?)
            }
        }
    };
    tokio::time::timeout(args.timeout, work)
        .await
        .map_err(|_| ControlError::Timeout(args.timeout))?
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Run(args)) => args,
        // No runtime: the supervisor is one thread around one poll.
        Ok(Invocation::Supervise(options)) => return run::main(options),
        Ok(Invocation::Help(topic)) => {
            println!("{}", topic.map_or(HELP, CommandName::help));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("shellflip {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", e.report());
            return ExitCode::from(EXIT_USAGE);
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
            eprintln!("shellflip: {} failed: {e}", args.command.name().as_str());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_list(list: &[&str]) -> Result<Invocation, UsageError> {
        parse(list.iter().map(OsString::from))
    }

    fn args(list: &[&str]) -> Args {
        match parse_list(list) {
            Ok(Invocation::Run(a)) => a,
            other => panic!("{list:?}: {other:?}"),
        }
    }

    fn error(list: &[&str]) -> String {
        match parse_list(list) {
            Err(e) => e.message,
            other => panic!("{list:?} must be refused: {other:?}"),
        }
    }

    #[test]
    fn parses_both_commands() {
        let a = args(&["restart", "--socket", "/run/x.sock", "--timeout", "2.5"]);
        assert_eq!(a.command, Command::Restart);
        assert_eq!(a.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(a.timeout, Duration::from_millis(2500));
        let a = args(&["--socket", "/s", "status"]);
        assert_eq!(a.command, Command::Status { json: false });
        assert_eq!(a.socket, PathBuf::from("/s"));
        assert_eq!(a.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn socket_and_timeout_in_every_form() {
        for form in [
            &["restart", "--socket", "/s"][..],
            &["restart", "--socket=/s"][..],
            &["restart", "-s", "/s"][..],
            &["restart", "-s/s"][..],
            &["-s", "/s", "restart"][..],
            &["--socket=/s", "restart"][..],
        ] {
            let a = args(form);
            assert_eq!(a.command, Command::Restart, "{form:?}");
            assert_eq!(a.socket, PathBuf::from("/s"), "{form:?}");
        }
        let a = args(&["status", "--socket=/s", "--timeout=0.25"]);
        assert_eq!(a.timeout, Duration::from_millis(250));
        let a = args(&["status", "--timeout", "3", "-s", "/s"]);
        assert_eq!(a.timeout, Duration::from_secs(3));
        // The last one wins.
        let a = args(&["status", "-s", "/a", "--socket", "/b"]);
        assert_eq!(a.socket, PathBuf::from("/b"));
    }

    #[test]
    fn socket_path_need_not_be_unicode() {
        use std::os::unix::ffi::OsStringExt;
        let path = OsString::from_vec(b"/run/\xff.sock".to_vec());
        let parsed = parse([
            OsString::from("status"),
            OsString::from("--socket"),
            path.clone(),
        ]);
        match parsed {
            Ok(Invocation::Run(a)) => assert_eq!(a.socket, PathBuf::from(path)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_only_for_status() {
        let a = args(&["status", "--socket", "/s", "--json"]);
        assert_eq!(a.command, Command::Status { json: true });
        let a = args(&["--json", "status", "-s", "/s"]);
        assert_eq!(a.command, Command::Status { json: true });
        let e = error(&["restart", "--socket", "/s", "--json"]);
        assert!(e.contains("--json"), "{e}");
        assert!(error(&["status", "--socket", "/s", "--json=yes"]).contains("--json"));
    }

    #[test]
    fn help_and_version() {
        for form in [&["--help"][..], &["-h"][..], &["help"][..]] {
            assert_eq!(parse_list(form), Ok(Invocation::Help(None)), "{form:?}");
        }
        for (form, topic) in [
            (&["restart", "--help"][..], CommandName::Restart),
            (&["restart", "-h", "--socket"][..], CommandName::Restart),
            (&["status", "--socket", "/s", "-h"][..], CommandName::Status),
            (&["help", "restart"][..], CommandName::Restart),
            (&["help", "status"][..], CommandName::Status),
            (&["help", "status", "--help"][..], CommandName::Status),
        ] {
            assert_eq!(
                parse_list(form),
                Ok(Invocation::Help(Some(topic))),
                "{form:?}"
            );
        }
        assert!(error(&["help", "reboot"]).contains("reboot"));
        assert!(error(&["help", "status", "restart"]).contains("restart"));
        for form in [
            &["--version"][..],
            &["-V"][..],
            &["status", "--version"][..],
        ] {
            assert_eq!(parse_list(form), Ok(Invocation::Version), "{form:?}");
        }
        // Every text names what it documents.
        assert!(HELP.contains("--json") && HELP.contains("--version"));
        assert!(RESTART_HELP.contains("usage: shellflip restart"));
        assert!(STATUS_HELP.contains("--json"));
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert!(error(&["restart"]).contains("--socket"));
        assert!(error(&["--socket", "/s"]).contains("missing command"));
        assert!(error(&[]).contains("missing command"));
        assert!(error(&["reboot", "--socket", "/s"]).contains("\"reboot\""));
        assert!(error(&["restart", "status", "--socket", "/s"]).contains("\"status\""));
        assert!(error(&["restart", "--socket", "/s", "--frobnicate"]).contains("'--frobnicate'"));
        assert!(error(&["restart", "--socket", "/s", "-x"]).contains("'-x'"));
    }

    #[test]
    fn refuses_missing_values() {
        assert_eq!(error(&["status", "--socket"]), "--socket needs a path");
        assert_eq!(error(&["status", "-s"]), "--socket needs a path");
        assert_eq!(error(&["status", "--socket="]), "--socket needs a path");
        assert!(error(&["status", "-s", "/s", "--timeout"]).contains("--timeout needs"));
    }

    #[test]
    fn refuses_bad_timeouts() {
        for bad in ["-1", "0", "0.0", "-0", "nan", "inf", "-inf"] {
            let e = error(&["restart", "--socket", "/s", "--timeout", bad]);
            assert!(
                e.contains("--timeout must be a positive number"),
                "{bad}: {e}"
            );
        }
        assert!(error(&["restart", "-s", "/s", "--timeout=-1"]).contains("positive"));
        assert!(error(&["restart", "-s", "/s", "--timeout", "1e-300"]).contains("too small"));
        assert!(error(&["restart", "-s", "/s", "--timeout", "soon"]).contains("not a number"));
        assert!(error(&["restart", "-s", "/s", "--timeout=soon"]).contains("not a number"));
        assert!(error(&["restart", "-s", "/s", "--timeout", "1e300"]).contains("too large"));
    }

    #[test]
    fn error_report_names_usage_and_help() {
        let e = parse_list(&["restart", "--frobnicate"]).unwrap_err();
        let report = e.report();
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines[0], "shellflip: invalid option '--frobnicate'");
        assert!(lines[1].starts_with("usage: shellflip restart"), "{report}");
        assert!(lines[2].contains("shellflip restart --help"), "{report}");
        let report = parse_list(&["frobnicate"]).unwrap_err().report();
        assert!(
            report.contains("usage: shellflip (restart|status)"),
            "{report}"
        );
        assert!(report.contains("'shellflip --help'"), "{report}");
    }

    #[test]
    fn run_takes_a_program_and_leaves_its_arguments_alone() {
        match parse_list(&[
            "run", "--grace", "3", "--", "/bin/svc", "--socket", "/s", "-h",
        ]) {
            Ok(Invocation::Supervise(o)) => {
                assert_eq!(o.program, "/bin/svc");
                assert_eq!(o.args, ["--socket", "/s", "-h"]);
                assert_eq!(o.grace, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
        match parse_list(&["run", "svc"]) {
            Ok(Invocation::Supervise(o)) => assert_eq!(o.grace, run::DEFAULT_GRACE),
            other => panic!("{other:?}"),
        }
        for form in [
            &["run", "--help"][..],
            &["help", "run"][..],
            &["run", "-h"][..],
        ] {
            assert_eq!(
                parse_list(form),
                Ok(Invocation::Help(Some(CommandName::Run))),
                "{form:?}"
            );
        }
        assert!(HELP.contains("shellflip run") && run::HELP.contains("--grace"));
        assert!(error(&["run"]).contains("needs a program"));
        assert_eq!(
            error(&["--socket", "/s", "run", "--", "svc"]),
            "--socket is not an option of run"
        );
        assert!(error(&["--json", "run", "svc"]).contains("--json"));
        let report = parse_list(&["run", "--grace", "x", "svc"])
            .unwrap_err()
            .report();
        assert!(report.contains("usage: shellflip run"), "{report}");
        assert!(report.contains("shellflip run --help"), "{report}");
        let report = parse_list(&[]).unwrap_err().report();
        assert!(report.contains("shellflip run [--grace"), "{report}");
    }
}
