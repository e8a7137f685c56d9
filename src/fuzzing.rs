//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not part of the API).
//!
//! Each one drives a parser of bytes that another process wrote — the control socket's frames,
//! the inherited-descriptor environment and the readiness line, the state framing — through the
//! library's own code, and checks what it made of them against a reference written from the
//! format's description. A broken invariant panics, which the fuzzer reports as a crash.
//!
//! This module may use any other; nothing uses it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::io::{self, Seek, Write};
use std::os::unix::ffi::OsStringExt;
use std::pin::{Pin, pin};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use crate::control::{
    Command, ControlError, LifecycleKind, MAX_FRAME, RestartCoordinationSocket, RestartMessage,
    RestartRequest, RestartResponse, Status,
};
use crate::inherit::{
    self, Description, ENV_FDNAMES, ENV_FDS, ENV_GENERATION, ENV_MODE, ENV_PPID, Identity,
    InheritError, MAX_REASON, Mode, Origin, PROTOCOL_VARS, RESERVED_PREFIX, ReadyLine,
};
use crate::state::{self, Decoder, PAYLOAD_OFFSET, Record, StateError, StateWriter};

/// `panic!` with the message cut short: an input, and so what the message shows of it, can be
/// large, and the fuzzer prints the message of every crash.
macro_rules! fail {
    ($($msg:tt)+) => {
        panic!("{}", brief(&format!($($msg)+)))
    };
}

/// `assert!` with the message cut short.
macro_rules! check {
    ($cond:expr $(,)?) => {
        if !$cond {
            fail!("check failed: {}", stringify!($cond))
        }
    };
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            fail!("check failed: {}: {}", stringify!($cond), format!($($msg)+))
        }
    };
}

/// `assert_eq!` with the message cut short.
macro_rules! check_eq {
    ($left:expr, $right:expr $(,)?) => {
        check_eq!($left, $right, "")
    };
    ($left:expr, $right:expr, $($msg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    fail!("{}: {:?} != {:?} {}", stringify!($left == $right), left, right, format!($($msg)+))
                }
            }
        }
    };
}

/// `message`, cut to its first 500 characters.
fn brief(message: &str) -> String {
    match message.char_indices().nth(500) {
        Some((end, _)) => format!("{}… ({} bytes in all)", &message[..end], message.len()),
        None => message.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The control socket

/// The PID the fuzzed server reports for a restart it was asked for.
const FAKE_PID: u32 = 4242;

/// Feeds `data`, as a client wrote it, to the control socket's reader and to its server.
///
/// * The reader (`RestartCoordinationSocket::receive_message`) must see exactly the frames in
///   the bytes: each frame of at most `MAX_FRAME` bytes whose body is a `RestartMessage` is that
///   message, any other body is a malformed message, a longer frame or bytes that end inside a
///   frame are an error; every message read re-encodes to itself.
/// * The server must act on the first frame only if it is a request (a restart or a status
///   request reaches the restart loop, once), and answer every client that sent anything with
///   exactly one well-formed frame: the outcome, the status, or a refusal ("invalid request")
///   for anything else — a frame above `MAX_FRAME` included.
pub fn control_frames(data: &[u8]) {
    let expected = frames(data);
    let mut harness = control_harness()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let harness = &mut *harness;
    harness.runtime.block_on(async {
        check_reader(data, &expected).await;
        check_server(
            data,
            expected.first(),
            &harness.address,
            &mut harness.commands,
        )
        .await;
    });
}

/// One frame of a control-socket stream, as the protocol defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    /// A complete frame whose body is this message.
    Message(RestartMessage),
    /// A complete frame whose body is not a message.
    Malformed,
    /// A length above `MAX_FRAME`: nothing after it is read.
    TooLarge,
    /// The bytes end inside a length, or inside a body of which at least one byte came.
    Truncated,
    /// The bytes end right after a length, before its body began. tokio-util's
    /// `LengthDelimitedCodec` has consumed the length by then and sees an empty buffer: the
    /// stream ends as if it had been closed between two frames (`ControlError::Closed`), and the
    /// server treats the client as one that sent nothing.
    Cut,
}

/// The frames in `data`, read with the protocol's definition alone.
fn frames(mut data: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !data.is_empty() {
        let Some((len, rest)) = data.split_first_chunk::<4>() else {
            frames.push(Frame::Truncated);
            break;
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_FRAME {
            frames.push(Frame::TooLarge);
            break;
        }
        let Some(body) = rest.get(..len) else {
            frames.push(if rest.is_empty() {
                Frame::Cut
            } else {
                Frame::Truncated
            });
            break;
        };
        frames.push(match serde_json::from_slice::<RestartMessage>(body) {
            Ok(message) => Frame::Message(message),
            Err(_) => Frame::Malformed,
        });
        data = &rest[len..];
    }
    frames
}

/// The client's reader, over a socket pair, against the frames the bytes hold.
async fn check_reader(data: &[u8], expected: &[Frame]) {
    let (ours, theirs) = tokio::net::UnixStream::pair().expect("socket pair");
    let write = async move {
        let mut theirs = theirs;
        // The reader stops at a bad length and drops its end: the rest cannot be written.
        let _ = theirs.write_all(data).await;
    };
    let read = async move {
        let mut socket = RestartCoordinationSocket::new(ours);
        for (i, frame) in expected.iter().enumerate() {
            let got = socket.receive_message().await;
            match (frame, &got) {
                (Frame::Message(want), Ok(message)) => {
                    check_eq!(want, message, "frame {i}");
                    let json = serde_json::to_vec(message).expect("a message encodes");
                    let again: RestartMessage =
                        serde_json::from_slice(&json).expect("an encoded message decodes");
                    check_eq!(&again, message, "frame {i} does not round-trip");
                }
                (Frame::Malformed, Err(ControlError::Malformed(_))) => {}
                (Frame::TooLarge | Frame::Truncated, Err(ControlError::Io(_))) => return,
                (Frame::Cut, Err(ControlError::Closed)) => return,
                _ => fail!("frame {i}: expected {frame:?}, the reader returned {got:?}"),
            }
        }
        let end = socket.receive_message().await;
        check!(
            matches!(end, Err(ControlError::Closed)),
            "after the last frame, the reader returned {end:?}"
        );
    };
    tokio::join!(write, read);
}

/// A control server listening on an abstract socket, and the restart loop's end of its
/// command channel, kept for the whole fuzzing process.
struct ControlHarness {
    runtime: tokio::runtime::Runtime,
    address: std::os::unix::net::SocketAddr,
    commands: mpsc::Receiver<Command>,
    /// The server, kept running.
    _server: crate::control::ControlServer,
}

fn control_harness() -> &'static Mutex<ControlHarness> {
    static HARNESS: OnceLock<Mutex<ControlHarness>> = OnceLock::new();
    HARNESS.get_or_init(|| {
        ignore_sigpipe();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // One directory per fuzzing process (libFuzzer exits without running destructors).
        let dir = std::env::temp_dir().join(format!("shellflip-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the control socket");
        let path = dir.join("control.sock");
        let config = crate::RestartConfig {
            enabled: true,
            coordination_socket_path: path.clone(),
            ..Default::default()
        };
        let (tx, commands) = mpsc::channel(4);
        let server = {
            let _entered = runtime.enter();
            crate::control::ControlSocket::open(&config, tx)
                .expect("the control socket")
                .serve()
        };
        let address =
            std::os::unix::net::SocketAddr::from_pathname(&path).expect("a socket address");
        Mutex::new(ControlHarness {
            runtime,
            address,
            commands,
            _server: server,
        })
    })
}

/// A client that wrote something and closed its end, the server's answer, and the commands it
/// gave the restart loop (answered as a restart loop would).
async fn check_server(
    data: &[u8],
    first: Option<&Frame>,
    address: &std::os::unix::net::SocketAddr,
    commands: &mut mpsc::Receiver<Command>,
) {
    let stream = std::os::unix::net::UnixStream::connect_addr(address).expect("connect");
    stream.set_nonblocking(true).expect("non-blocking");
    let stream = tokio::net::UnixStream::from_std(stream).expect("stream");
    let (mut rd, mut wr) = stream.into_split();
    let write = async move {
        // The server reads one request: past it, writing may fail.
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let read = async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        // A server that closes without reading all that was sent resets the connection after
        // its answer: keep what came before.
        while let Ok(n @ 1..) = rd.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
        }
        answer
    };
    let mut conversation = pin!(async { tokio::join!(write, read).1 });
    let mut given = Vec::new();
    let answer = loop {
        tokio::select! {
            answer = &mut conversation => break answer,
            Some(command) = commands.recv() => match command {
                Command::Restart(initiator) => {
                    given.push(RestartRequest::TryRestart);
                    check_eq!(initiator.describe(), "control socket");
                    initiator.respond(Ok(Some(FAKE_PID))).await;
                }
                Command::Status(tx) => {
                    given.push(RestartRequest::Status);
                    let _ = tx.send(fake_status());
                }
            },
        }
    };
    // The server answers only after it gave its command: nothing can be on its way now.
    check!(
        commands.try_recv().is_err(),
        "a command arrived after the answer"
    );

    // The server reads bytes, not frames: a client that stops after a length, before its
    // body, is refused like any other cut-short request.
    let Some(first) = first else {
        check!(given.is_empty(), "a silent client caused {given:?}");
        check!(answer.is_empty(), "a silent client was answered {answer:?}");
        return;
    };
    let answer = match one_frame(&answer) {
        Ok(message) => message,
        Err(why) => {
            fail!("for {first:?}, the server's answer is not one frame ({why}): {answer:?}")
        }
    };
    match first {
        Frame::Message(RestartMessage::Request(RestartRequest::TryRestart)) => {
            check_eq!(given, [RestartRequest::TryRestart]);
            check_eq!(
                answer,
                RestartMessage::Response(RestartResponse::RestartComplete(FAKE_PID))
            );
        }
        Frame::Message(RestartMessage::Request(RestartRequest::Status)) => {
            check_eq!(given, [RestartRequest::Status]);
            check_eq!(
                answer,
                RestartMessage::Response(RestartResponse::Status(fake_status()))
            );
        }
        refused => {
            check!(given.is_empty(), "{refused:?} caused {given:?}");
            check!(
                matches!(&answer, RestartMessage::Response(RestartResponse::RestartFailed(why)) if why.starts_with("invalid request")),
                "{refused:?} was answered {answer:?}"
            );
        }
    }
}

/// The one frame `bytes` must be, decoded.
fn one_frame(bytes: &[u8]) -> Result<RestartMessage, String> {
    let Some((len, body)) = bytes.split_first_chunk::<4>() else {
        return Err("no length".into());
    };
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_FRAME {
        return Err(format!("length {len} above MAX_FRAME"));
    }
    if body.len() != len {
        return Err(format!("length {len}, {} bytes follow", body.len()));
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn fake_status() -> Status {
    Status {
        pid: FAKE_PID,
        generation: 7,
        lifecycle: LifecycleKind::ForkExec,
        ready: true,
        restart_in_progress: false,
        last_result: None,
        state_on_start: "fuzzing".into(),
        probation: None,
        last_attempt: None,
    }
}

/// libFuzzer's `main` is not Rust's: a write to a closed socket would kill the process.
fn ignore_sigpipe() {
    // SAFETY: setting SIGPIPE's disposition to "ignore" installs no handler and touches no
    // memory of ours; it is what every Rust program starts with.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

// ---------------------------------------------------------------------------------------------
// The inherited-descriptor environment and the readiness line

/// The process the fuzzed environment is addressed to: PID 100, whose parent is 99.
const ME: Identity = Identity {
    pid: 100,
    parent: 99,
    pidfd_id: None,
};

/// Parses an environment built from `data` and decodes `data` as a readiness line.
///
/// `data[0]` says which of the protocol's eight variables are set (bit `i` for
/// `PROTOCOL_VARS[i]`: `SHELLFLIP_PPID`, `SHELLFLIP_FDS`, `SHELLFLIP_FDNAMES`,
/// `SHELLFLIP_GENERATION`, `SHELLFLIP_MODE`, `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`); the
/// rest, split at NUL bytes (which no environment value holds), gives their values in that
/// order. The process is PID 100 and its parent 99. `inherit::parse` must agree with a
/// reference written from the protocol's description, and every name it returns must satisfy
/// `check_name`.
pub fn environment(data: &[u8]) {
    ready_line(data);
    let env = environment_of(data);
    let get = |k: &str| env.get(k).cloned();
    let got = inherit::parse(&get, ME);
    check_eq!(
        got,
        inherit::parse(&get, ME),
        "parsing is not deterministic"
    );
    let want = reference_environment(&env);
    match (&got, &want) {
        (Ok(d), Ok(w)) => {
            check_eq!(
                (d.origin, d.mode, d.generation, &d.names),
                (w.origin, w.mode, w.generation, &w.names),
                "environment {env:?}"
            );
            for name in &d.names {
                check_eq!(inherit::check_name(name), Ok(()), "{name:?}");
            }
            if d.origin == Origin::Parent {
                check_eq!(d.count_var, ENV_FDS);
            }
        }
        (Err(InheritError::Malformed { var, .. }), Err(w)) => {
            check_eq!(var, w, "environment {env:?}: {got:?}");
            check!(env.contains_key(var), "{var} is not set: {got:?}");
            check!(!got.as_ref().unwrap_err().to_string().is_empty());
        }
        _ => fail!("environment {env:?}: parsed as {got:?}, expected {want:?}"),
    }
}

/// The variables `data` sets (see [`environment`]).
fn environment_of(data: &[u8]) -> HashMap<&'static str, OsString> {
    let mut env = HashMap::new();
    if let Some((&set, rest)) = data.split_first() {
        let mut values = rest.split(|b| *b == 0);
        // One bit per variable of the first eight; `LISTEN_PIDFDID`, the ninth, is left to the
        // unit tests (its check needs a pidfd of this process).
        for (i, var) in PROTOCOL_VARS.iter().enumerate().take(8) {
            if set & (1 << i) != 0 {
                let value = values.next().unwrap_or_default();
                env.insert(*var, OsString::from_vec(value.to_vec()));
            }
        }
    }
    env
}

/// The environment as the protocol describes it (`inherit`'s module documentation): the
/// description, or the variable at fault.
fn reference_environment(
    env: &HashMap<&'static str, OsString>,
) -> Result<Description, &'static str> {
    let number = |var: &'static str| -> Result<Option<u64>, &'static str> {
        match env.get(var) {
            None => Ok(None),
            Some(v) => v.to_str().and_then(|s| s.parse().ok()).map(Some).ok_or(var),
        }
    };
    let mut d = Description {
        origin: Origin::Fresh,
        mode: Mode::Serve,
        generation: 0,
        count_var: "LISTEN_FDS",
        names: Vec::new(),
    };
    if number(ENV_PPID)? == Some(u64::from(ME.parent)) {
        d.generation = number(ENV_GENERATION)?.unwrap_or(0);
        d.mode = match env.get(ENV_MODE).map(|v| v.as_encoded_bytes()) {
            None | Some(b"serve") => Mode::Serve,
            Some(b"validate") => Mode::Validate,
            Some(_) => return Err(ENV_MODE),
        };
        d.origin = Origin::Parent;
        d.count_var = ENV_FDS;
        d.names = reference_names(env, ENV_FDS, ENV_FDNAMES)?;
        return Ok(d);
    }
    if number("LISTEN_PID")? == Some(u64::from(ME.pid)) {
        d.names = reference_names(env, "LISTEN_FDS", "LISTEN_FDNAMES")?;
        if d.names.iter().any(|n| n.starts_with(RESERVED_PREFIX)) {
            d.origin = Origin::Systemd;
        }
    }
    Ok(d)
}

fn reference_names(
    env: &HashMap<&'static str, OsString>,
    count_var: &'static str,
    names_var: &'static str,
) -> Result<Vec<String>, &'static str> {
    let Some(count) = env.get(count_var) else {
        return Ok(Vec::new());
    };
    let count: u64 = count
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or(count_var)?;
    // At most 65,536 descriptors in one list.
    if count > 65_536 {
        return Err(count_var);
    }
    let Some(text) = env.get(names_var) else {
        return Ok((0..count).map(|i| format!("unknown.{i}")).collect());
    };
    let text = text.to_str().ok_or(names_var)?;
    let names: Vec<String> = if count == 0 && text.is_empty() {
        Vec::new()
    } else {
        text.split(':').map(str::to_owned).collect()
    };
    // 1 to 255 printable ASCII characters, no ':' (systemd's rule).
    let valid = |n: &String| {
        (1..=255).contains(&n.len()) && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b':')
    };
    if names.len() as u64 != count || !names.iter().all(valid) {
        return Err(names_var);
    }
    Ok(names)
}

/// A readiness line: what it says follows from its first byte; a failure's reason is one
/// line, and survives encoding and decoding (cut to `MAX_REASON` at most).
fn ready_line(data: &[u8]) {
    let decoded = ReadyLine::decode(data);
    match (data.first(), &decoded) {
        (Some(b'R'), Some(ReadyLine::Ready)) => {}
        (Some(b'F'), Some(ReadyLine::Failed(reason))) => {
            check!(!reason.contains('\n'), "{reason:?}");
            check_eq!(reason.trim_end(), reason);
            let again = ReadyLine::decode(&ReadyLine::Failed(reason.clone()).encode());
            let Some(ReadyLine::Failed(again)) = again else {
                fail!("{reason:?} re-decoded as {again:?}");
            };
            check!(reason.starts_with(&again));
            if reason.len() <= MAX_REASON - 2 {
                check_eq!(&again, reason);
            }
        }
        (Some(b'R' | b'F'), _) | (_, Some(_)) => fail!("{data:?} decoded as {decoded:?}"),
        _ => {}
    }
    // Any reason, once encoded, is one line of at most MAX_REASON bytes that decodes to it.
    let reason = String::from_utf8_lossy(data).into_owned();
    let line = ReadyLine::Failed(reason.clone()).encode();
    check!(line.len() <= MAX_REASON, "{} bytes", line.len());
    check_eq!(line.iter().position(|b| *b == b'\n'), Some(line.len() - 1));
    let Some(ReadyLine::Failed(back)) = ReadyLine::decode(&line) else {
        fail!("{line:?} does not decode as a failure");
    };
    let flat = reason.replace('\n', " ");
    check!(
        flat.starts_with(&back),
        "{back:?} is not a prefix of {flat:?}"
    );
    if flat.len() <= MAX_REASON - 2 {
        check_eq!(back, flat.trim_end());
    }
    check_eq!(
        ReadyLine::decode(&ReadyLine::Ready.encode()),
        Some(ReadyLine::Ready)
    );
}

// ---------------------------------------------------------------------------------------------
// The state framing

/// The format's limit on one chunk (`state`'s module documentation: 1 to 16 MiB).
const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// Reads `data` as a state with every reader the library has — the `Decoder` record by record,
/// the stream reader (`read_stream`) fed in uneven pieces, the stored-state verifier on a memfd
/// — and writes `data` as a state's payload.
///
/// Each reader must agree with a reference written from the format's description: a state is
/// committed (and its payload handed out whole) only when the bytes really are a complete
/// committed state; otherwise the same error, and only checksummed payload handed out before
/// it. What the writer writes must read back as a committed state of that payload.
pub fn state(data: &[u8]) {
    let want = reference_state(data);
    check_decoder(data, &want);
    check_stream(data, &want);
    check_stored(data, &want);
    check_writer(data);
}

/// What a state's bytes are, by the format's description.
#[derive(Debug)]
enum Verdict {
    /// A complete committed state ending at `end` (bytes after it are not read).
    Committed {
        end: usize,
        generation: u64,
        payload: Vec<u8>,
    },
    /// The bytes stop before the commit record; `verified` is the payload of the chunks that
    /// came whole and matched their checksum.
    Torn { verified: Vec<u8> },
    /// Not a shellflip state.
    Foreign,
    /// Another version of the format.
    Version(u32),
    /// Damaged after `verified`.
    Corrupt { verified: Vec<u8> },
}

fn reference_state(data: &[u8]) -> Verdict {
    let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    if data.len() < 20 {
        return Verdict::Torn { verified: vec![] };
    }
    if &data[..8] != b"SHFLSTA1" {
        return Verdict::Foreign;
    }
    if be32(8) != 1 {
        return Verdict::Version(be32(8));
    }
    let generation = be64(12);
    let mut verified = Vec::new();
    let mut at = 20;
    loop {
        if data.len() < at + 4 {
            return Verdict::Torn { verified };
        }
        let len = be32(at) as usize;
        at += 4;
        if len == 0 {
            if data.len() < at + 20 {
                return Verdict::Torn { verified };
            }
            let good = &data[at + 12..at + 20] == b"SHFLEND1"
                && be64(at) == verified.len() as u64
                && be32(at + 8) == crc32fast::hash(&verified);
            return if good {
                Verdict::Committed {
                    end: at + 20,
                    generation,
                    payload: verified,
                }
            } else {
                Verdict::Corrupt { verified }
            };
        }
        if len > MAX_CHUNK {
            return Verdict::Corrupt { verified };
        }
        if data.len() < at + 4 + len {
            return Verdict::Torn { verified };
        }
        let chunk = &data[at + 4..at + 4 + len];
        if crc32fast::hash(chunk) != be32(at) {
            return Verdict::Corrupt { verified };
        }
        verified.extend_from_slice(chunk);
        at += 4 + len;
    }
}

/// Whether `got` is the error the verdict calls for.
fn same_error(got: &StateError, want: &Verdict) -> bool {
    match (got, want) {
        (StateError::Torn { received }, Verdict::Torn { verified }) => {
            *received == verified.len() as u64
        }
        (StateError::Foreign, Verdict::Foreign) => true,
        (StateError::UnsupportedVersion(v), Verdict::Version(w)) => v == w,
        (StateError::Corrupt(_), Verdict::Corrupt { .. }) => true,
        _ => false,
    }
}

/// The `Decoder`, given exactly `want()` bytes at a time.
fn check_decoder(data: &[u8], want: &Verdict) {
    let mut decoder = Decoder::new();
    let mut at = 0;
    let mut generation = None;
    let mut payload = Vec::new();
    let outcome = loop {
        if decoder.is_done() {
            check_eq!(decoder.want(), 0);
            break Ok(at);
        }
        let n = decoder.want();
        check!(
            (1..=PAYLOAD_OFFSET + MAX_CHUNK).contains(&n),
            "want() = {n}"
        );
        let Some(record) = data.get(at..at + n) else {
            break Err(decoder.torn());
        };
        at += n;
        match decoder.push(record) {
            Ok(Record::Header(h)) => generation = Some(h.generation),
            Ok(Record::Length) => {}
            Ok(Record::Chunk) => payload.extend_from_slice(&record[PAYLOAD_OFFSET..]),
            Ok(Record::Committed) => check!(decoder.is_done()),
            Err(e) => break Err(e),
        }
    };
    match (outcome, want) {
        (
            Ok(end),
            Verdict::Committed {
                end: e,
                generation: g,
                payload: p,
            },
        ) => {
            check_eq!(end, *e);
            check_eq!(generation, Some(*g));
            check_eq!(&payload, p);
        }
        (Ok(end), _) => fail!("the decoder committed {end} bytes of {want:?}"),
        (Err(e), want) => check!(same_error(&e, want), "decoder: {e:?} for {want:?}"),
    }
}

/// The stream reader, its source giving `data` in uneven pieces and sometimes nothing yet, and
/// read into uneven buffers: it hands out the verified payload and ends, or fails after handing
/// out only verified chunks.
fn check_stream(data: &[u8], want: &Verdict) {
    let mut reader = state::read_stream(Pieces {
        data: data.to_vec(),
        at: 0,
        polls: 0,
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut polls = 0usize;
    let mut buf = [0u8; 97];
    let result = loop {
        polls += 1;
        check!(
            polls < 10 * data.len() + 1000,
            "the reader does not progress"
        );
        let size = 1 + (polls * 31 + data.len()) % buf.len();
        let mut rb = ReadBuf::new(&mut buf[..size]);
        match Pin::new(&mut reader).poll_read(&mut cx, &mut rb) {
            Poll::Pending => continue,
            Poll::Ready(Err(e)) => break Err(e),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => break Ok(()),
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
        }
    };
    match (result, want) {
        (Ok(()), Verdict::Committed { payload, .. }) => {
            check_eq!(&out, payload);
            // Still the end.
            let mut rb = ReadBuf::new(&mut buf);
            let again = Pin::new(&mut reader).poll_read(&mut cx, &mut rb);
            check!(matches!(again, Poll::Ready(Ok(()))) && rb.filled().is_empty());
        }
        (Ok(()), _) => fail!("the stream reader ended cleanly on {want:?}"),
        (Err(e), Verdict::Committed { .. }) => fail!("the stream reader failed ({e}) on {want:?}"),
        (Err(e), Verdict::Torn { verified }) => {
            check_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            check_eq!(&out, verified);
        }
        (Err(e), Verdict::Corrupt { verified }) => {
            check_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            check_eq!(&out, verified);
        }
        (Err(e), Verdict::Foreign | Verdict::Version(_)) => {
            check_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            check!(out.is_empty());
        }
    }
}

/// A source that returns its bytes in uneven pieces, and every third poll nothing yet.
struct Pieces {
    data: Vec<u8>,
    at: usize,
    polls: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.polls += 1;
        if self.polls % 3 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let piece = 1 + (self.polls * 7 + self.at) % 61;
        let n = piece.min(buf.remaining()).min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// The stored-state verifier, on a memfd holding `data`.
fn check_stored(data: &[u8], want: &Verdict) {
    let mut file = state::create_memfd().expect("memfd");
    file.write_all(data).expect("write the memfd");
    match (state::verify_file(&mut file), want) {
        (Ok(None), _) => check!(
            data.is_empty(),
            "a state of {} bytes is no state",
            data.len()
        ),
        (Ok(Some(header)), Verdict::Committed { generation, .. }) => {
            check_eq!(header.generation, *generation);
            check_eq!(file.stream_position().expect("position"), 0, "not rewound");
        }
        (Ok(Some(_)), _) => fail!("the verifier accepted {want:?}"),
        (Err(e), want) => {
            check!(!data.is_empty(), "an empty file is {e:?}");
            check!(same_error(&e, want), "verifier: {e:?} for {want:?}");
        }
    }
}

/// The writer, given `data` in uneven pieces by a sink that takes uneven pieces: what it wrote
/// is a committed state of exactly `data`.
fn check_writer(data: &[u8]) {
    let sink = Sink::default();
    let written = sink.bytes.clone();
    let generation = (u64::from(data.first().copied().unwrap_or(0)) << 40) | data.len() as u64;
    let writer = StateWriter::new(sink, generation);
    let mut app = writer.clone();
    let mut cx = Context::from_waker(Waker::noop());
    let mut at = 0;
    let mut polls = 0usize;
    while at < data.len() {
        polls += 1;
        check!(
            polls < 10 * data.len() + 1000,
            "the writer does not progress"
        );
        let end = data.len().min(at + 1 + (polls * 13 + at) % 89);
        match Pin::new(&mut app).poll_write(&mut cx, &data[at..end]) {
            Poll::Pending => {}
            Poll::Ready(Ok(n)) => {
                check!(n > 0 && n <= end - at, "wrote {n} of {}", end - at);
                at += n;
            }
            Poll::Ready(Err(e)) => fail!("writing the state failed: {e}"),
        }
    }
    drop(app);
    let mut commit = pin!(writer.commit());
    loop {
        polls += 1;
        check!(
            polls < 10 * data.len() + 2000,
            "the commit does not progress"
        );
        match commit.as_mut().poll(&mut cx) {
            Poll::Pending => {}
            Poll::Ready(r) => break r.expect("commit"),
        }
    }
    let bytes = written.lock().unwrap().clone();
    match reference_state(&bytes) {
        Verdict::Committed {
            end,
            generation: g,
            payload,
        } => {
            check_eq!(end, bytes.len(), "bytes after the commit record");
            check_eq!(g, generation);
            check!(payload == data, "the payload read back differs");
        }
        other => fail!("the writer wrote {other:?}"),
    }
}

/// A sink that takes uneven pieces, and every fourth call nothing yet.
#[derive(Default)]
struct Sink {
    bytes: std::sync::Arc<Mutex<Vec<u8>>>,
    calls: usize,
}

impl AsyncWrite for Sink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.calls += 1;
        if self.calls % 4 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = buf.len().min(1 + (self.calls * 37) % 211);
        self.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpora under `fuzz/corpus/<target>/`: a valid input of each kind, and a few
    /// that take the other branches.
    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        fn frame(json: &str) -> Vec<u8> {
            let mut f = (json.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(json.as_bytes());
            f
        }
        fn env(set: &[usize], values: &[&str]) -> Vec<u8> {
            let mut v = vec![set.iter().map(|i| 1u8 << i).sum()];
            v.extend_from_slice(values.join("\0").as_bytes());
            v
        }
        fn written(payload: &[u8], generation: u64, commit: bool) -> Vec<u8> {
            let sink = Sink::default();
            let bytes = sink.bytes.clone();
            let writer = StateWriter::new(sink, generation);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut app = writer.clone();
                app.write_all(payload).await.unwrap();
                app.flush().await.unwrap();
                if commit {
                    writer.commit().await.unwrap();
                }
            });
            bytes.lock().unwrap().clone()
        }
        let restart = frame(r#"{"Request":"TryRestart"}"#);
        let status = frame(r#"{"Request":"Status"}"#);
        let mut two = restart.clone();
        two.extend_from_slice(&status);
        vec![
            ("control_frames", "seed-restart", restart),
            ("control_frames", "seed-status", status),
            ("control_frames", "seed-two-frames", two),
            (
                "control_frames",
                "seed-response",
                frame(r#"{"Response":{"RestartFailed":"why"}}"#),
            ),
            (
                "control_frames",
                "seed-status-response",
                frame(
                    r#"{"Response":{"Status":{"pid":1,"generation":2,"lifecycle":"systemd","ready":true,"restart_in_progress":false,"last_result":{"outcome":"failed","elapsed_ms":3,"reason":"x"},"state_on_start":"none"}}}"#,
                ),
            ),
            (
                "control_frames",
                "seed-too-large",
                (MAX_FRAME as u32 + 1).to_be_bytes().to_vec(),
            ),
            (
                "environment",
                "seed-parent",
                env(
                    &[0, 1, 2, 3, 4],
                    &["99", "2", "http:shellflip.state", "4", "validate"],
                ),
            ),
            (
                "environment",
                "seed-systemd-store",
                env(&[5, 6, 7], &["100", "2", "http:shellflip.state"]),
            ),
            (
                "environment",
                "seed-socket-activation",
                env(&[5, 6], &["100", "2"]),
            ),
            ("environment", "seed-ready", b"R\n".to_vec()),
            (
                "environment",
                "seed-failed",
                b"Fbad configuration: line 3\n".to_vec(),
            ),
            (
                "state",
                "seed-committed",
                written(b"hello, next generation", 3, true),
            ),
            ("state", "seed-committed-empty", written(b"", 0, true)),
            ("state", "seed-torn", written(b"half a state", 1, false)),
        ]
    }

    /// Every seed runs through its target, takes the branch it stands for, and is on disk as
    /// generated (`SHELLFLIP_WRITE_SEEDS=1 cargo test --features fuzzing --lib seeds` writes
    /// them).
    #[test]
    fn seeds_are_valid_and_on_disk() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let write = std::env::var_os("SHELLFLIP_WRITE_SEEDS").is_some();
        for (target, name, bytes) in seeds() {
            match target {
                "control_frames" => control_frames(&bytes),
                "environment" => environment(&bytes),
                "state" => state(&bytes),
                _ => unreachable!(),
            }
            let path = root.join(target).join(name);
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (write the seeds again)", path.display()));
            assert_eq!(
                on_disk,
                bytes,
                "{} differs (write the seeds again)",
                path.display()
            );
        }
    }

    #[test]
    fn the_seeds_take_their_branches() {
        assert!(matches!(
            frames(&seeds()[2].2)[..],
            [
                Frame::Message(RestartMessage::Request(RestartRequest::TryRestart)),
                Frame::Message(RestartMessage::Request(RestartRequest::Status))
            ]
        ));
        for (target, name, bytes) in seeds() {
            match (target, name) {
                ("state", "seed-torn") => {
                    assert!(matches!(reference_state(&bytes), Verdict::Torn { .. }))
                }
                ("state", _) => {
                    assert!(matches!(reference_state(&bytes), Verdict::Committed { .. }))
                }
                ("environment", "seed-parent") => {
                    let d =
                        inherit::parse(&|k| environment_of(&bytes).get(k).cloned(), ME).unwrap();
                    assert_eq!(
                        (d.origin, d.mode, d.generation),
                        (Origin::Parent, Mode::Validate, 4)
                    );
                }
                ("environment", "seed-systemd-store") => {
                    let d =
                        inherit::parse(&|k| environment_of(&bytes).get(k).cloned(), ME).unwrap();
                    assert_eq!(d.origin, Origin::Systemd);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn odd_inputs_hold_the_invariants() {
        for data in [
            &b""[..],
            b"\0",
            b"\0\0\0",
            b"\0\0\0\x05hello",
            b"\0\0\0\x02{}",
            b"\xff\xff\xff\xff",
            b"\0\x01\0\x01",
        ] {
            control_frames(data);
            environment(data);
            state(data);
        }
    }
}
