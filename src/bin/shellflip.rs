//! `shellflip`: talk to any shellflip service's control socket.
//!
//! ```text
//! shellflip restart --socket PATH [--timeout SECS]
//!     restart; print the new PID (exit 0) or why not (exit 1)
//! shellflip status --socket PATH [--timeout SECS] [--json]
//!     print the service's status (--json: as one line of JSON)
//! shellflip await-restart --socket PATH [--main-pid PID] [--timeout SECS]
//!     wait for the outcome of the restart a signal began (ExecReload= of a Type=notify-reload
//!     unit): print the new PID (exit 0) or why it failed (exit 1)
//! shellflip run [--grace SECS] -- PROGRAM [ARGS...]
//!     supervise PROGRAM as a container's process 1 (or as a subreaper): see `run.rs`
//! shellflip help [restart|status|await-restart|run]   print the help; also --help, -h
//! shellflip --version               print `shellflip <version>`; also -V
//! ```
//!
//! `-s PATH`, `--socket=PATH` and `--timeout=SECS` work too, and options may come before or
//! after the command. Bad arguments: one line naming the offending argument, the usage and a
//! hint to run `--help` on stderr, exit 2.
//!
//! Fits `ExecReload=` in a unit: `systemctl reload` then fails when the restart fails.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use shellflip::control::{AttemptOutcome, ControlError, RestartCoordinationSocket, Status};

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
       shellflip await-restart --socket PATH [--main-pid PID] [--timeout SECS]
       shellflip run [--grace SECS] -- PROGRAM [ARGS...]
       shellflip help [restart|status|await-restart|run]
       shellflip --version

commands:
  restart         ask the service to restart; prints the new PID and exits 0, or
                  prints the reason and exits 1
  status          print the service's status
  await-restart   wait for the restart a signal began (systemctl reload of a
                  Type=notify-reload unit); prints the new PID and exits 0, or
                  prints the reason and exits 1
  run             run PROGRAM under a small supervisor, as a container's entry
                  point: it follows the service across restarts, forwards signals,
                  reaps zombies and exits with the service's status
                  ('shellflip run --help')
  help            print this help, or a command's

options:
  -s, --socket PATH    the service's control socket (also --socket=PATH)
      --timeout SECS   give up waiting for the answer after SECS seconds (default 120)
      --json           status only: print the status as one line of JSON
      --main-pid PID   await-restart only: the process that was signalled
                       (default: $MAINPID, which systemd sets for ExecReload=)
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

const AWAIT_HELP: &str = "shellflip await-restart: wait for the restart a signal began

usage: shellflip await-restart --socket PATH [--main-pid PID] [--timeout SECS]

For ExecReload= in a Type=notify-reload unit whose ReloadSignal= is the service's
restart signal: systemd sends the signal, which begins the restart, and runs this,
whose exit status is the outcome of `systemctl reload` (a notification alone cannot
fail a reload in systemd 257). It follows the restart the signalled process
began (at most a second before this command started, or in progress), and prints the
new generation's PID and exits 0 once another process answers on the socket, or
prints `restart failed: REASON` and exits 1 when the restart failed (the old process
keeps serving), or when no restart began within 5 s.

options:
  -s, --socket PATH    the service's control socket (also --socket=PATH)
      --main-pid PID   the process that was signalled (default: $MAINPID, set by
                       systemd for ExecReload=)
      --timeout SECS   give up after SECS seconds (default 120)
  -h, --help           print this help";

/// A command that talks to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommandName {
    Restart,
    Status,
    /// The supervisor: its arguments are parsed by `run::parse`.
    Run,
    AwaitRestart,
}

impl CommandName {
    fn from_word(word: &OsStr) -> Option<Self> {
        match word.to_str()? {
            "restart" => Some(Self::Restart),
            "status" => Some(Self::Status),
            "run" => Some(Self::Run),
            "await-restart" => Some(Self::AwaitRestart),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Status => "status",
            Self::Run => "run",
            Self::AwaitRestart => "await-restart",
        }
    }

    fn synopsis(self) -> &'static str {
        match self {
            Self::Restart => "usage: shellflip restart --socket PATH [--timeout SECS]",
            Self::Status => "usage: shellflip status --socket PATH [--timeout SECS] [--json]",
            Self::Run => run::SYNOPSIS,
            Self::AwaitRestart => {
                "usage: shellflip await-restart --socket PATH [--main-pid PID] [--timeout SECS]"
            }
        }
    }

    fn help(self) -> &'static str {
        match self {
            Self::Restart => RESTART_HELP,
            Self::Status => STATUS_HELP,
            Self::Run => run::HELP,
            Self::AwaitRestart => AWAIT_HELP,
        }
    }
}

/// What to ask the service.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Restart,
    Status {
        json: bool,
    },
    /// The signalled process: given, or `$MAINPID` at run time.
    AwaitRestart {
        main_pid: Option<u32>,
    },
}

impl Command {
    fn name(&self) -> CommandName {
        match self {
            Self::Restart => CommandName::Restart,
            Self::Status { .. } => CommandName::Status,
            Self::AwaitRestart { .. } => CommandName::AwaitRestart,
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
                "usage: shellflip (restart|status|await-restart) --socket PATH [--timeout SECS] \
                 [--json]\n       shellflip run [--grace SECS] -- PROGRAM [ARGS...]",
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
    let mut options = Options::default();
    // `help [COMMAND]`: Some(topic) once the word `help` was seen.
    let mut help: Option<Option<CommandName>> = None;

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
                options.socket = Some(socket_value(&mut parser, command)?);
                options.first.get_or_insert("--socket");
            }
            Long("timeout") => {
                let value = parser
                    .value()
                    .map_err(|_| UsageError::new("--timeout needs a number of seconds", command))?;
                options.timeout = parse_timeout(&value).map_err(|e| UsageError::new(e, command))?;
                options.first.get_or_insert("--timeout");
            }
            Long("json") => {
                options.json = true;
                options.first.get_or_insert("--json");
            }
            Long("main-pid") => {
                options.main_pid = Some(pid_value(&mut parser, command)?);
                options.first.get_or_insert("--main-pid");
            }
            Value(word) if command.is_none() && help.is_none() => {
                if word == "help" {
                    help = Some(None);
                    continue;
                }
                let name = command_word(&word, "")?;
                if name == CommandName::Run {
                    return parse_run(&mut parser, options.first);
                }
                command = Some(name);
            }
            Value(word) if help == Some(None) => help = Some(Some(command_word(&word, "help: ")?)),
            other => return Err(UsageError::new(other.unexpected(), command)),
        }
    }
    if let Some(topic) = help {
        return Ok(Invocation::Help(topic));
    }
    let Some(name) = command else {
        return Err(UsageError::new(
            "missing command: restart, status, await-restart or run",
            None,
        ));
    };
    options.invocation(name)
}

/// The options of a command that talks to the control socket, as they were given.
struct Options {
    socket: Option<PathBuf>,
    timeout: Duration,
    json: bool,
    main_pid: Option<u32>,
    /// The first of them that was given (`run` takes none).
    first: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: None,
            timeout: DEFAULT_TIMEOUT,
            json: false,
            main_pid: None,
            first: None,
        }
    }
}

impl Options {
    /// The command `name` with these options, or why they do not fit it.
    fn invocation(self, name: CommandName) -> Result<Invocation, UsageError> {
        let at = Some(name);
        let socket = self
            .socket
            .ok_or_else(|| UsageError::new("missing --socket PATH", at))?;
        if self.main_pid.is_some() && name != CommandName::AwaitRestart {
            return Err(UsageError::new("--main-pid is only for await-restart", at));
        }
        if self.json && name != CommandName::Status {
            return Err(UsageError::new(
                format!("--json is only for status, not {}", name.as_str()),
                at,
            ));
        }
        let command = match name {
            CommandName::Restart => Command::Restart,
            CommandName::Status => Command::Status { json: self.json },
            CommandName::AwaitRestart => Command::AwaitRestart {
                main_pid: self.main_pid,
            },
            CommandName::Run => return Err(UsageError::new("run takes a program", at)),
        };
        Ok(Invocation::Run(Args {
            command,
            socket,
            timeout: self.timeout,
        }))
    }
}

/// The command a word names; `context` starts the error (`"help: "` after `help`).
fn command_word(word: &OsStr, context: &str) -> Result<CommandName, UsageError> {
    CommandName::from_word(word).ok_or_else(|| {
        UsageError::new(
            format!(
                "{context}unknown command {word:?} (expected restart, status, await-restart or run)"
            ),
            None,
        )
    })
}

/// The value of `--socket`: a path that is not empty.
fn socket_value(
    parser: &mut lexopt::Parser,
    command: Option<CommandName>,
) -> Result<PathBuf, UsageError> {
    parser
        .value()
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| UsageError::new("--socket needs a path", command))
}

/// The value of `--main-pid`: a PID above 0.
fn pid_value(parser: &mut lexopt::Parser, command: Option<CommandName>) -> Result<u32, UsageError> {
    let value = parser
        .value()
        .map_err(|_| UsageError::new("--main-pid needs a PID", command))?;
    value
        .to_str()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| UsageError::new(format!("--main-pid: {value:?} is not a PID"), command))
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

/// Why a command failed: the service could not be asked, or a followed restart failed.
#[derive(Debug)]
enum Failure {
    Control(ControlError),
    /// The restart failed (or none began); the reason, as the service or this command says it.
    Restart(String),
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        Failure::Control(e)
    }
}

/// How long before `await-restart` started the followed restart may have begun: systemd sends
/// the signal, then starts the command.
const SIGNAL_SLACK_USEC: u64 = 1_000_000;
/// How long `await-restart` waits for a restart to begin at all.
const NOTHING_BEGAN: Duration = Duration::from_secs(5);
/// How often `await-restart` asks.
const POLL: Duration = Duration::from_millis(20);

/// What one status says about the restart `await-restart` follows.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Handed over: the new generation's PID.
    Done(u32),
    Failed(String),
    /// Not over yet; the attempt followed from now on (its begin), if any.
    Wait(Option<u64>),
}

/// Judges one status: `main_pid` is the signalled process, `started_usec` when the command
/// started (`CLOCK_MONOTONIC`), `followed` the attempt followed so far.
fn judge(status: &Status, main_pid: u32, started_usec: u64, followed: Option<u64>) -> Verdict {
    // Another process answers: the signalled one handed over.
    if status.pid != main_pid {
        return Verdict::Done(status.pid);
    }
    let Some(attempt) = &status.last_attempt else {
        return Verdict::Wait(followed);
    };
    let began = attempt.began_monotonic_usec;
    let ours = followed == Some(began)
        || began.saturating_add(SIGNAL_SLACK_USEC) >= started_usec
        // A restart that was running when the signal came: the signal joined it.
        || attempt.outcome == AttemptOutcome::InProgress;
    if !ours {
        return Verdict::Wait(followed);
    }
    match &attempt.outcome {
        AttemptOutcome::InProgress => Verdict::Wait(Some(began)),
        AttemptOutcome::HandedOver { pid } => Verdict::Done(pid.unwrap_or(status.pid)),
        AttemptOutcome::Failed { reason } => Verdict::Failed(reason.clone()),
        _ => Verdict::Wait(Some(began)),
    }
}

/// Follows the restart that a signal to `main_pid` began, until it is over.
async fn await_restart(socket: &Path, main_pid: u32) -> Result<String, Failure> {
    let started_usec = monotonic_usec();
    let started = tokio::time::Instant::now();
    let mut followed = None;
    let mut last_error = None;
    loop {
        let status = async {
            RestartCoordinationSocket::connect(socket)
                .await?
                .send_status_request()
                .await
        };
        match status.await {
            // Between generations the socket may not answer for a moment: ask again.
            Err(e) => last_error = Some(e),
            Ok(status) => match judge(&status, main_pid, started_usec, followed) {
                Verdict::Done(pid) => return Ok(pid.to_string()),
                Verdict::Failed(reason) => return Err(Failure::Restart(reason)),
                Verdict::Wait(f) => followed = f,
            },
        }
        if followed.is_none() && started.elapsed() > NOTHING_BEGAN {
            return Err(match last_error {
                Some(e) => Failure::Control(e),
                None => Failure::Restart(format!(
                    "no restart began within {NOTHING_BEGAN:?} (is the unit's ReloadSignal= \
                     the service's restart signal?)"
                )),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn monotonic_usec() -> u64 {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(sd_notify::NotifyState::MonotonicUsec(usec)) => usec.try_into().unwrap_or(0),
        _ => 0,
    }
}

/// Asks the service; returns the line(s) to print.
async fn run(args: &Args) -> Result<String, Failure> {
    let work = async {
        if let Command::AwaitRestart { main_pid } = args.command {
            let main_pid = match main_pid {
                Some(pid) => pid,
                None => std::env::var("MAINPID")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        Failure::Restart(
                            "no --main-pid, and no $MAINPID (systemd sets it for ExecReload=)"
                                .into(),
                        )
                    })?,
            };
            return await_restart(&args.socket, main_pid).await;
        }
        let mut socket = RestartCoordinationSocket::connect(&args.socket).await?;
        let out: Result<String, ControlError> = match args.command {
            Command::Restart => socket
                .send_restart_command()
                .await
                .map(|pid| pid.to_string()),
            Command::Status { json: false } => {
                socket.send_status_request().await.map(|s| s.to_string())
            }
            Command::Status { json: true } => {
                async {
                    let status = socket.send_status_request().await?;
                    Ok(serde_json::to_string(&status)?)
                }
                .await
            }
            Command::AwaitRestart { .. } => unreachable!("handled above"),
        };
        out.map_err(Failure::from)
    };
    tokio::time::timeout(args.timeout, work)
        .await
        .map_err(|_| Failure::Control(ControlError::Timeout(args.timeout)))?
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
        Err(Failure::Control(e)) => {
            eprintln!("shellflip: {} failed: {e}", args.command.name().as_str());
            ExitCode::FAILURE
        }
        Err(Failure::Restart(reason)) => {
            eprintln!("shellflip: restart failed: {reason}");
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
            report.contains("usage: shellflip (restart|status|await-restart)"),
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

    #[test]
    fn parses_await_restart() {
        let a = args(&["await-restart", "--socket", "/s", "--main-pid", "42"]);
        assert_eq!(a.command, Command::AwaitRestart { main_pid: Some(42) });
        let a = args(&["await-restart", "-s", "/s"]);
        assert_eq!(a.command, Command::AwaitRestart { main_pid: None });
        assert!(error(&["restart", "-s", "/s", "--main-pid", "4"]).contains("only for await"));
        assert!(error(&["await-restart", "-s", "/s", "--main-pid", "x"]).contains("not a PID"));
        assert!(error(&["await-restart", "-s", "/s", "--main-pid", "0"]).contains("not a PID"));
        assert!(error(&["await-restart", "-s", "/s", "--json"]).contains("--json"));
        assert_eq!(
            parse_list(&["help", "await-restart"]),
            Ok(Invocation::Help(Some(CommandName::AwaitRestart)))
        );
    }

    /// A status as the service sends it, from PID 10, with this last attempt.
    fn status(pid: u32, attempt: &str) -> Status {
        serde_json::from_str(&format!(
            r#"{{"pid":{pid},"generation":3,"lifecycle":"fork-exec","ready":true,
                "restart_in_progress":false,"last_result":null,"state_on_start":"none",
                "last_attempt":{attempt}}}"#
        ))
        .expect("a status")
    }

    #[test]
    fn await_restart_follows_the_restart_the_signal_began() {
        let t0 = 50_000_000; // the command started at 50 s
        let in_progress = |began: u64| {
            status(
                10,
                &format!(
                    r#"{{"began_monotonic_usec":{began},"outcome":{{"state":"in_progress"}}}}"#
                ),
            )
        };
        let failed = |began: u64| {
            status(
                10,
                &format!(
                    r#"{{"began_monotonic_usec":{began},"outcome":{{"state":"failed","reason":"state refused"}}}}"#
                ),
            )
        };
        // Nothing began yet: wait.
        assert_eq!(
            judge(&status(10, "null"), 10, t0, None),
            Verdict::Wait(None)
        );
        // An old failure, long before the signal: not ours, wait.
        assert_eq!(
            judge(&failed(10_000_000), 10, t0, None),
            Verdict::Wait(None)
        );
        // Begun just before the command started (the signal came first): followed.
        assert_eq!(
            judge(&in_progress(49_900_000), 10, t0, None),
            Verdict::Wait(Some(49_900_000))
        );
        // Already running long before (the signal joined it): followed too.
        assert_eq!(
            judge(&in_progress(1_000_000), 10, t0, None),
            Verdict::Wait(Some(1_000_000))
        );
        // ... and its failure is ours.
        assert_eq!(
            judge(&failed(1_000_000), 10, t0, Some(1_000_000)),
            Verdict::Failed("state refused".into())
        );
        // A fast failure, over before the first look: ours by its begin.
        assert_eq!(
            judge(&failed(49_950_000), 10, t0, None),
            Verdict::Failed("state refused".into())
        );
        // Another process answers: handed over.
        assert_eq!(judge(&failed(10_000_000), 11, t0, None), Verdict::Done(10));
        let handed = status(
            10,
            r#"{"began_monotonic_usec":50000100,"outcome":{"state":"handed_over","pid":77}}"#,
        );
        assert_eq!(judge(&handed, 10, t0, None), Verdict::Done(77));
    }

    #[test]
    fn a_status_without_last_attempt_still_parses() {
        // From a service built before the field existed.
        let old: Status = serde_json::from_str(
            r#"{"pid":1,"generation":0,"lifecycle":"systemd","ready":true,
                "restart_in_progress":false,"last_result":null,"state_on_start":"none"}"#,
        )
        .unwrap();
        assert_eq!(old.last_attempt, None);
    }
}
