//! The decisions of `shellflip run`, without any I/O: events in (a process ended, a
//! notification arrived, a signal came, time passed), actions out (forward a signal, log a line,
//! exit). The I/O shell (`run.rs`) turns system calls into events and actions into system calls;
//! everything it decides is here, and unit-tested.
//!
//! The rules:
//!
//! * The **main process** is the program at first, then whatever a notification's `MAINPID=`
//!   names, provided the sender and the named process are both descendants of the supervisor
//!   (the library's successor sends `READY=1` + `MAINPID=<itself>`, the old generation
//!   `MAINPID=<new>` after the handover). A `MAINPID=` naming a process that was the main
//!   process before and handed over is stale and ignored. So is one naming a process that is
//!   gone by the time the message is read (as systemd does): a successor that dies within
//!   moments of declaring itself is not seen as the main process.
//! * Forwarded signals (`SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGHUP`, `SIGUSR1`, `SIGUSR2`) go to
//!   the current main process. A stop signal (`SIGTERM`, `SIGINT`, `SIGQUIT`) is remembered: a
//!   process that declares itself the main process afterwards gets it too, so a handover that
//!   raced the stop cannot leave a successor serving after the supervisor was told to stop.
//! * When the main process ends without a successor having declared itself, the supervisor
//!   keeps its status and waits, at most `grace`, for a descendant to declare itself the main
//!   process (a successor that was still starting, or a generation that was still draining).
//!   It exits as soon as no process of the service is left, or when the grace has passed, with
//!   the kept status: the exit code, or 128 + the signal that killed it.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// A process ID, as `waitpid(2)` and `SCM_CREDENTIALS` give it.
pub type Pid = i32;

/// How many former main processes are remembered, to recognize a stale `MAINPID=`.
const SUPERSEDED_KEPT: usize = 64;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It exited with this code.
    Exited(i32),
    /// A signal (this number) killed it.
    Signaled(i32),
    /// It ended, but its parent (a generation that was still draining) collected its status
    /// before the supervisor could read it.
    Unknown,
}

impl Status {
    /// Decodes a status in the form `waitpid(2)` reports (also `/proc/PID/stat`'s `exit_code`
    /// and pidfd's `PIDFD_INFO_EXIT`).
    pub fn from_wait_status(raw: i32) -> Status {
        if libc::WIFEXITED(raw) {
            Status::Exited(libc::WEXITSTATUS(raw))
        } else if libc::WIFSIGNALED(raw) {
            Status::Signaled(libc::WTERMSIG(raw))
        } else {
            Status::Unknown
        }
    }

    /// The supervisor's exit code for this status: the code, 128 + the signal, or 1 when it is
    /// unknown.
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Exited(code) => (code & 0xff) as u8,
            Status::Signaled(sig) => 128u8.saturating_add((sig & 0x7f) as u8),
            Status::Unknown => 1,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Status::Exited(code) => write!(f, "exited with status {code}"),
            Status::Signaled(sig) => match Signal::try_from(sig) {
                Ok(s) => write!(f, "was killed by signal {sig} ({s})"),
                Err(_) => write!(f, "was killed by signal {sig}"),
            },
            Status::Unknown => write!(
                f,
                "ended (its status was collected by its parent generation; unknown)"
            ),
        }
    }
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The supervisor reaped this process (its child, or a descendant reparented to it).
    Reaped { pid: Pid, status: Status },
    /// The main process ended and was reaped by someone else (its parent generation).
    Ended { pid: Pid, status: Status },
    /// `waitpid` says the supervisor has no child left: no process of the service is left.
    NoChildren,
    /// A datagram on the notification socket, from the process `sender` (its credentials).
    Notify { sender: Pid, text: &'a str },
    /// A signal the supervisor forwards.
    Signal(Signal),
    /// Time passed.
    Tick,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `signal` to `pid`.
    Forward { pid: Pid, signal: Signal },
    /// Write this line to stderr.
    Log(String),
    /// Exit with this code; what is left of the service is killed.
    Exit(u8),
}

/// Which processes belong to the service.
pub trait Family {
    /// Whether `pid` is a descendant of the supervisor (alive, a zombie, or reaped just now).
    fn is_descendant(&self, pid: Pid) -> bool;
}

/// Where the service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `main` is the service.
    Serving { main: Pid },
    /// The main process ended with `status` and nobody took over yet.
    Orphaned { status: Status, deadline: Instant },
    /// The supervisor exits.
    Done,
}

/// The fields of a notification that the supervisor acts on (`sd_notify(3)`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Message<'a> {
    /// `MAINPID=`: a number, or the text when it is not one.
    pub main_pid: Option<Result<Pid, &'a str>>,
    pub ready: bool,
    pub stopping: bool,
    pub status: Option<&'a str>,
    /// `FDSTORE=1`: the supervisor keeps no descriptor store.
    pub fdstore: bool,
}

impl<'a> Message<'a> {
    /// Parses the newline-separated `KEY=VALUE` assignments; unknown keys are ignored.
    pub fn parse(text: &'a str) -> Message<'a> {
        let mut m = Message::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "MAINPID" => {
                    m.main_pid = Some(match value.trim().parse::<Pid>() {
                        Ok(pid) if pid > 0 => Ok(pid),
                        _ => Err(value),
                    })
                }
                "READY" => m.ready = value == "1",
                "STOPPING" => m.stopping = value == "1",
                "STATUS" => m.status = Some(value),
                "FDSTORE" => m.fdstore = value == "1",
                _ => {}
            }
        }
        m
    }
}

/// Whether `signal` asks the service to stop (and is remembered for a later main process).
pub fn is_stop_signal(signal: Signal) -> bool {
    matches!(signal, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT)
}

/// The signals the supervisor forwards to the main process.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The supervisor's state.
#[derive(Debug)]
pub struct Supervisor {
    phase: Phase,
    grace: Duration,
    /// The stop signal received, forwarded again to any later main process.
    stop: Option<Signal>,
    /// Former main processes (most recent last): a `MAINPID=` naming one is stale.
    superseded: VecDeque<Pid>,
    /// Whether the current main process said `READY=1`.
    ready: bool,
    /// Whether `FDSTORE=1` was already reported as unsupported.
    fdstore_reported: bool,
}

impl Supervisor {
    /// Supervises `program` (the process the supervisor started), waiting `grace` after the
    /// main process ended without a successor.
    pub fn new(program: Pid, grace: Duration) -> Supervisor {
        Supervisor {
            phase: Phase::Serving { main: program },
            grace,
            stop: None,
            superseded: VecDeque::new(),
            ready: false,
            fdstore_reported: false,
        }
    }

    /// The current main process, while there is one.
    pub fn main(&self) -> Option<Pid> {
        match self.phase {
            Phase::Serving { main } => Some(main),
            _ => None,
        }
    }

    /// When the supervisor must be told [`Event::Tick`] at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Orphaned { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// Whether the supervisor decided to exit.
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Applies `event`, which happened at `now`; returns what to do, in order.
    pub fn handle(&mut self, event: Event<'_>, now: Instant, family: &dyn Family) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase == Phase::Done {
            return out;
        }
        match event {
            Event::Reaped { pid, status } | Event::Ended { pid, status } => {
                self.ended(pid, status, now, &mut out)
            }
            Event::NoChildren => self.no_children(&mut out),
            Event::Notify { sender, text } => self.notified(sender, text, family, &mut out),
            Event::Signal(signal) => self.signalled(signal, &mut out),
            Event::Tick => {
                if let Phase::Orphaned { status, deadline } = self.phase {
                    if now >= deadline {
                        out.push(Action::Log(format!(
                            "no successor within {:?}: exiting with {}; the processes left are \
                             killed",
                            self.grace,
                            status.exit_code()
                        )));
                        self.exit(status, &mut out);
                    }
                }
            }
        }
        out
    }

    fn exit(&mut self, status: Status, out: &mut Vec<Action>) {
        self.phase = Phase::Done;
        out.push(Action::Exit(status.exit_code()));
    }

    fn ended(&mut self, pid: Pid, status: Status, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Serving { main } if main == pid => {
                out.push(Action::Log(format!("main process {pid} {status}")));
                self.supersede(pid);
                self.ready = false;
                self.phase = Phase::Orphaned {
                    status,
                    deadline: now + self.grace,
                };
            }
            _ => {
                // A former generation that finished draining, a successor that failed, or
                // anything else the service started: reaped, and worth a line only when it did
                // not end well.
                if status != Status::Exited(0) {
                    out.push(Action::Log(format!("process {pid} {status}")));
                }
            }
        }
    }

    fn no_children(&mut self, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Orphaned { status, .. } => {
                out.push(Action::Log(format!(
                    "no process of the service is left: exiting with {}",
                    status.exit_code()
                )));
                self.exit(status, out);
            }
            Phase::Serving { main } => {
                // Not seen to end (its end is normally seen first): it cannot be alive without a
                // child of ours being alive.
                out.push(Action::Log(format!(
                    "no process of the service is left, main process {main} included: exiting \
                     with {}",
                    Status::Unknown.exit_code()
                )));
                self.exit(Status::Unknown, out);
            }
            Phase::Done => {}
        }
    }

    fn signalled(&mut self, signal: Signal, out: &mut Vec<Action>) {
        if is_stop_signal(signal) {
            self.stop = Some(signal);
        }
        match self.phase {
            Phase::Serving { main } => out.push(Action::Forward { pid: main, signal }),
            Phase::Orphaned { .. } => out.push(Action::Log(format!(
                "{signal}: no main process to forward it to{}",
                if is_stop_signal(signal) {
                    " (a successor that declares itself gets it)"
                } else {
                    ""
                }
            ))),
            Phase::Done => {}
        }
    }

    fn notified(&mut self, sender: Pid, text: &str, family: &dyn Family, out: &mut Vec<Action>) {
        if !family.is_descendant(sender) {
            out.push(Action::Log(format!(
                "ignored a notification from process {sender}: not a live process of the \
                 service (a stranger, or it ended before its message was read)"
            )));
            return;
        }
        let message = Message::parse(text);
        if message.fdstore && !self.fdstore_reported {
            self.fdstore_reported = true;
            out.push(Action::Log(format!(
                "process {sender} sent FDSTORE=1: shellflip run keeps no file descriptor store \
                 (use the fork/exec lifecycle); its descriptors are closed"
            )));
        }
        if let Some(status) = message.status {
            out.push(Action::Log(format!("process {sender}: {status}")));
        }
        match message.main_pid {
            Some(Ok(pid)) => self.declared(sender, pid, family, out),
            Some(Err(text)) => out.push(Action::Log(format!(
                "ignored MAINPID={text} from process {sender}: not a process ID"
            ))),
            None => {}
        }
        if let Phase::Serving { main } = self.phase {
            if message.ready && sender == main && !self.ready {
                self.ready = true;
                out.push(Action::Log(format!("main process {main} is ready")));
            }
            if message.stopping && sender == main {
                out.push(Action::Log(format!("main process {main} is stopping")));
            }
        }
    }

    /// `MAINPID=pid`, sent by `sender`.
    fn declared(&mut self, sender: Pid, pid: Pid, family: &dyn Family, out: &mut Vec<Action>) {
        let previous = match self.phase {
            Phase::Serving { main } if main == pid => return,
            Phase::Serving { main } => Some(main),
            Phase::Orphaned { .. } => None,
            Phase::Done => return,
        };
        if self.superseded.contains(&pid) {
            out.push(Action::Log(format!(
                "ignored MAINPID={pid} from process {sender}: that process handed over already"
            )));
            return;
        }
        if !family.is_descendant(pid) {
            out.push(Action::Log(format!(
                "ignored MAINPID={pid} from process {sender}: not a live process of the service \
                 (a stranger, or it ended before the message was read)"
            )));
            return;
        }
        match previous {
            Some(old) => {
                self.supersede(old);
                out.push(Action::Log(format!("main process: {old} -> {pid}")));
            }
            None => out.push(Action::Log(format!(
                "process {pid} took over after the main process ended: it is the main process"
            ))),
        }
        self.phase = Phase::Serving { main: pid };
        // A process is declared the main process once it is ready (the successor's READY=1
        // comes with its MAINPID=, or after the old generation's MAINPID=): no second line.
        self.ready = true;
        if let Some(signal) = self.stop {
            out.push(Action::Log(format!(
                "forwarding the earlier {signal} to the new main process {pid}"
            )));
            out.push(Action::Forward { pid, signal });
        }
    }

    fn supersede(&mut self, pid: Pid) {
        if self.superseded.len() == SUPERSEDED_KEPT {
            self.superseded.pop_front();
        }
        self.superseded.push_back(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The descendants, as a set.
    struct Set(BTreeSet<Pid>);

    impl Family for Set {
        fn is_descendant(&self, pid: Pid) -> bool {
            self.0.contains(&pid)
        }
    }

    const GRACE: Duration = Duration::from_secs(5);

    struct Harness {
        sup: Supervisor,
        family: Set,
        now: Instant,
    }

    impl Harness {
        fn new(program: Pid, family: &[Pid]) -> Harness {
            Harness {
                sup: Supervisor::new(program, GRACE),
                family: Set(family.iter().copied().collect()),
                now: Instant::now(),
            }
        }

        fn on(&mut self, event: Event<'_>) -> Vec<Action> {
            self.sup.handle(event, self.now, &self.family)
        }

        fn notify(&mut self, sender: Pid, text: &str) -> Vec<Action> {
            self.on(Event::Notify { sender, text })
        }

        fn after(&mut self, d: Duration) -> Vec<Action> {
            self.now += d;
            self.on(Event::Tick)
        }
    }

    fn forwards(actions: &[Action]) -> Vec<(Pid, Signal)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Forward { pid, signal } => Some((*pid, *signal)),
                _ => None,
            })
            .collect()
    }

    fn exit_of(actions: &[Action]) -> Option<u8> {
        actions.iter().find_map(|a| match a {
            Action::Exit(c) => Some(*c),
            _ => None,
        })
    }

    fn logs(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(l) => Some(l.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn statuses_and_exit_codes() {
        assert_eq!(Status::from_wait_status(0), Status::Exited(0));
        assert_eq!(Status::from_wait_status(3 << 8), Status::Exited(3));
        assert_eq!(Status::from_wait_status(9), Status::Signaled(9));
        // Killed with a core dump: the 0x80 bit.
        assert_eq!(Status::from_wait_status(0x80 | 6), Status::Signaled(6));
        assert_eq!(Status::Exited(0).exit_code(), 0);
        assert_eq!(Status::Exited(75).exit_code(), 75);
        assert_eq!(Status::Signaled(9).exit_code(), 137);
        assert_eq!(Status::Signaled(15).exit_code(), 143);
        assert_eq!(Status::Unknown.exit_code(), 1);
        assert!(Status::Signaled(9).to_string().contains("SIGKILL"));
    }

    #[test]
    fn parses_notifications() {
        let m = Message::parse("READY=1\nMAINPID=42\nSTATUS=serving\nUNKNOWN=x\n");
        assert_eq!(m.main_pid, Some(Ok(42)));
        assert!(m.ready && !m.stopping && !m.fdstore);
        assert_eq!(m.status, Some("serving"));
        assert_eq!(Message::parse("MAINPID=0").main_pid, Some(Err("0")));
        assert_eq!(Message::parse("MAINPID=-3").main_pid, Some(Err("-3")));
        assert_eq!(Message::parse("MAINPID=abc").main_pid, Some(Err("abc")));
        assert!(Message::parse("STOPPING=1").stopping);
        assert!(Message::parse("FDSTORE=1\nFDNAME=x").fdstore);
        assert_eq!(Message::parse("READY=0\nnonsense"), Message::default());
    }

    #[test]
    fn forwards_every_signal_to_the_program_first() {
        let mut h = Harness::new(10, &[10]);
        for signal in FORWARDED {
            assert_eq!(forwards(&h.on(Event::Signal(signal))), [(10, signal)]);
        }
        assert_eq!(h.sup.main(), Some(10));
    }

    #[test]
    fn follows_the_handover_and_forwards_to_the_new_main_process() {
        let mut h = Harness::new(10, &[10, 11]);
        // The successor declares itself, then the old generation confirms.
        let a = h.notify(11, "READY=1\nMAINPID=11");
        assert!(logs(&a).contains("main process: 10 -> 11"), "{a:?}");
        assert!(h.notify(10, "MAINPID=11").is_empty());
        assert_eq!(h.sup.main(), Some(11));
        assert_eq!(
            forwards(&h.on(Event::Signal(Signal::SIGUSR1))),
            [(11, Signal::SIGUSR1)]
        );
        // The old generation drains and exits: nothing changes, nothing to say.
        assert!(
            h.on(Event::Reaped {
                pid: 10,
                status: Status::Exited(0)
            })
            .is_empty()
        );
        assert_eq!(h.sup.main(), Some(11));
        assert_eq!(h.sup.deadline(), None);
    }

    #[test]
    fn the_old_generation_may_speak_first() {
        let mut h = Harness::new(10, &[10, 11]);
        h.notify(10, "MAINPID=11");
        assert_eq!(h.sup.main(), Some(11));
        h.notify(11, "READY=1\nMAINPID=11");
        assert_eq!(h.sup.main(), Some(11));
    }

    #[test]
    fn refuses_foreign_senders_and_foreign_main_processes() {
        let mut h = Harness::new(10, &[10, 11]);
        let a = h.notify(99, "MAINPID=11");
        assert!(
            logs(&a).contains("not a live process of the service"),
            "{a:?}"
        );
        assert_eq!(h.sup.main(), Some(10));
        let a = h.notify(11, "MAINPID=99");
        assert!(logs(&a).contains("MAINPID=99"), "{a:?}");
        assert_eq!(h.sup.main(), Some(10));
        let a = h.notify(11, "MAINPID=x1");
        assert!(logs(&a).contains("not a process ID"), "{a:?}");
        // Credentials of a process outside the namespace read as 0.
        h.notify(0, "MAINPID=11");
        assert_eq!(h.sup.main(), Some(10));
    }

    #[test]
    fn a_stale_mainpid_does_not_bring_back_a_former_generation() {
        let mut h = Harness::new(10, &[10, 11, 12]);
        h.notify(11, "READY=1\nMAINPID=11");
        h.notify(12, "READY=1\nMAINPID=12");
        // Generation 10's confirmation, late.
        let a = h.notify(10, "MAINPID=11");
        assert!(logs(&a).contains("handed over already"), "{a:?}");
        assert_eq!(h.sup.main(), Some(12));
    }

    #[test]
    fn a_crash_without_successor_exits_with_its_signal_once_nothing_is_left() {
        let mut h = Harness::new(10, &[10]);
        let a = h.on(Event::Reaped {
            pid: 10,
            status: Status::Signaled(9),
        });
        assert!(logs(&a).contains("SIGKILL"), "{a:?}");
        assert_eq!(exit_of(&a), None);
        assert_eq!(h.sup.main(), None);
        assert_eq!(exit_of(&h.on(Event::NoChildren)), Some(137));
        assert!(h.sup.is_done());
        // Nothing more happens.
        assert!(h.on(Event::Signal(Signal::SIGTERM)).is_empty());
    }

    #[test]
    fn the_status_comes_from_the_last_generation() {
        let mut h = Harness::new(10, &[10, 11]);
        h.notify(11, "READY=1\nMAINPID=11");
        h.on(Event::Reaped {
            pid: 10,
            status: Status::Exited(0),
        });
        h.on(Event::Ended {
            pid: 11,
            status: Status::Exited(3),
        });
        assert_eq!(exit_of(&h.on(Event::NoChildren)), Some(3));
    }

    #[test]
    fn the_grace_bounds_the_wait_for_processes_left() {
        let mut h = Harness::new(10, &[10, 11]);
        h.on(Event::Reaped {
            pid: 10,
            status: Status::Exited(2),
        });
        assert_eq!(h.sup.deadline(), Some(h.now + GRACE));
        assert!(h.after(GRACE - Duration::from_millis(1)).is_empty());
        let a = h.after(Duration::from_millis(1));
        assert_eq!(exit_of(&a), Some(2));
        assert!(logs(&a).contains("no successor"), "{a:?}");
    }

    #[test]
    fn a_successor_still_starting_may_take_over_within_the_grace() {
        // The main process dies while its successor (11) is still starting; 11 then declares
        // itself: the service goes on.
        let mut h = Harness::new(10, &[10, 11]);
        h.on(Event::Reaped {
            pid: 10,
            status: Status::Signaled(9),
        });
        h.now += Duration::from_secs(1);
        let a = h.notify(11, "READY=1\nMAINPID=11");
        assert!(logs(&a).contains("took over"), "{a:?}");
        assert_eq!(h.sup.main(), Some(11));
        assert_eq!(h.sup.deadline(), None);
        assert!(h.after(GRACE * 2).is_empty());
        // Its own end is what counts now.
        h.on(Event::Reaped {
            pid: 11,
            status: Status::Exited(0),
        });
        assert_eq!(exit_of(&h.on(Event::NoChildren)), Some(0));
    }

    #[test]
    fn a_dead_main_process_cannot_come_back() {
        let mut h = Harness::new(10, &[10, 11]);
        h.on(Event::Reaped {
            pid: 10,
            status: Status::Exited(1),
        });
        h.notify(11, "MAINPID=10");
        assert_eq!(h.sup.main(), None);
    }

    #[test]
    fn a_stop_reaches_a_successor_that_declares_itself_later() {
        let mut h = Harness::new(10, &[10, 11]);
        assert_eq!(
            forwards(&h.on(Event::Signal(Signal::SIGTERM))),
            [(10, Signal::SIGTERM)]
        );
        // The handover raced the stop: 11 declares itself after 10 got SIGTERM.
        let a = h.notify(11, "READY=1\nMAINPID=11");
        assert_eq!(forwards(&a), [(11, Signal::SIGTERM)]);
        // Not so for a signal that is not a stop.
        let mut h = Harness::new(10, &[10, 11]);
        h.on(Event::Signal(Signal::SIGHUP));
        assert!(forwards(&h.notify(11, "MAINPID=11")).is_empty());
    }

    #[test]
    fn a_stop_while_orphaned_waits_for_the_grace() {
        let mut h = Harness::new(10, &[10, 11]);
        h.on(Event::Reaped {
            pid: 10,
            status: Status::Exited(0),
        });
        let a = h.on(Event::Signal(Signal::SIGINT));
        assert!(forwards(&a).is_empty());
        assert!(logs(&a).contains("no main process"), "{a:?}");
        let a = h.notify(11, "MAINPID=11");
        assert_eq!(forwards(&a), [(11, Signal::SIGINT)]);
    }

    #[test]
    fn sigterm_then_a_clean_exit_is_status_zero() {
        let mut h = Harness::new(10, &[10]);
        h.on(Event::Signal(Signal::SIGTERM));
        h.notify(10, "STOPPING=1");
        h.on(Event::Reaped {
            pid: 10,
            status: Status::Exited(0),
        });
        assert_eq!(exit_of(&h.on(Event::NoChildren)), Some(0));
    }

    #[test]
    fn readiness_and_status_lines_are_logged_once() {
        let mut h = Harness::new(10, &[10]);
        assert!(logs(&h.notify(10, "READY=1")).contains("10 is ready"));
        assert!(h.notify(10, "READY=1").is_empty());
        assert!(logs(&h.notify(10, "STATUS=start-up failed: x")).contains("start-up failed"));
        let a = h.notify(10, "FDSTORE=1\nFDNAME=x");
        assert!(logs(&a).contains("no file descriptor store"), "{a:?}");
        assert!(h.notify(10, "FDSTORE=1\nFDNAME=y").is_empty());
        // A handover is one line, whichever generation speaks first.
        let mut h = Harness::new(10, &[10, 11]);
        assert_eq!(h.notify(10, "MAINPID=11").len(), 1);
        assert!(h.notify(11, "READY=1\nMAINPID=11").is_empty());
    }

    #[test]
    fn other_processes_are_reaped_quietly_unless_they_failed() {
        let mut h = Harness::new(10, &[10]);
        assert!(
            h.on(Event::Reaped {
                pid: 20,
                status: Status::Exited(0)
            })
            .is_empty()
        );
        let a = h.on(Event::Reaped {
            pid: 21,
            status: Status::Signaled(9),
        });
        assert!(logs(&a).contains("process 21 was killed"), "{a:?}");
        assert_eq!(h.sup.main(), Some(10));
    }

    #[test]
    fn no_children_while_serving_ends_with_an_unknown_status() {
        let mut h = Harness::new(10, &[10]);
        assert_eq!(exit_of(&h.on(Event::NoChildren)), Some(1));
    }

    #[test]
    fn remembers_a_bounded_number_of_former_main_processes() {
        let all: Vec<Pid> = (1..=200).collect();
        let mut h = Harness::new(1, &all);
        for pid in 2..=200 {
            h.notify(pid, &format!("READY=1\nMAINPID={pid}"));
        }
        assert_eq!(h.sup.main(), Some(200));
        assert_eq!(h.sup.superseded.len(), SUPERSEDED_KEPT);
    }
}
