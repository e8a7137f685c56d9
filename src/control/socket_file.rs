//! The control socket's file.
//!
//! * It is bound only by a process that holds an exclusive `flock(2)` on `<path>.lock`: two
//!   instances starting at the same moment cannot both pass the check of what is at the path.
//!   The generation serving the socket keeps the lock until it hands over (the kernel releases
//!   it if the process dies); a new generation takes it before it serves.
//! * Only a socket file nobody listens on is ever replaced; anything else at the path is an
//!   error.
//! * The socket is bound at the path itself, with its mode set on the socket first (Linux gives
//!   the file the socket's mode, less the umask): the file never exists with looser permissions
//!   than asked for, and no temporary name makes a legal path too long.
//! * A generation that inherited the socket checks that the path still leads to it, and binds
//!   it again when the file (or its directory) was removed.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, getsockopt, listen, socket, sockopt,
};
use nix::sys::stat::{Mode, fchmod};
use tokio::sync::mpsc;

use super::{Access, Command};
use crate::config::RestartConfig;
use crate::inherit::{self, CONTROL_FD};
use crate::outcome::SetupError;
use crate::registry::{AtPath, Kind, Registry, classify, inspect_socket_path};

/// The size of `sun_path`: a socket path has at most this many bytes, its terminating NUL
/// included.
const SUN_PATH: usize = 108;

/// How often taking the lock is tried again when its file was replaced in between.
const LOCK_ATTEMPTS: usize = 3;

/// Why the control socket's file cannot be bound.
#[derive(Debug, thiserror::Error)]
pub(super) enum SocketFileError {
    /// The path does not fit `sun_path`.
    #[error(
        "the path is {len} bytes long; a Unix socket path has at most {} bytes ({SUN_PATH} \
         including the terminating NUL)",
        SUN_PATH - 1
    )]
    TooLong { len: usize },
    /// Another process holds the lock: the same service runs, or is starting.
    #[error("{} is locked by another process: is the service already running?", .0.display())]
    Locked(PathBuf),
    /// The lock file cannot be opened or locked.
    #[error("lock file {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// What is at the path cannot be replaced, or binding failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<SocketFileError> for io::Error {
    fn from(e: SocketFileError) -> io::Error {
        let kind = match &e {
            SocketFileError::TooLong { .. } => io::ErrorKind::InvalidInput,
            SocketFileError::Locked(_) => io::ErrorKind::AddrInUse,
            SocketFileError::Lock { source, .. } => source.kind(),
            SocketFileError::Io(source) => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// An exclusive `flock(2)` on `<socket path>.lock`: whoever holds it may bind the socket, and
/// serves it. The file is never removed (removing a lock file lets two processes lock two
/// different files).
#[derive(Debug)]
pub(super) struct PathLock {
    _file: Flock<File>,
}

impl PathLock {
    /// Takes the lock of the socket at `socket` now; `None` when another process holds it.
    /// Creates the socket's directory if it is missing (mode from [`dir_mode`]).
    pub(super) fn try_take(socket: &Path, mode: u32) -> Result<Option<PathLock>, SocketFileError> {
        let path = lock_path(socket);
        let failed = |source: io::Error| SocketFileError::Lock {
            path: path.clone(),
            source,
        };
        for _ in 0..LOCK_ATTEMPTS {
            let file = open_lock_file(&path, mode).map_err(failed)?;
            let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, e)) => return Err(failed(e.into())),
            };
            // Removed or replaced between the open and the lock: that lock guards nothing.
            if is_still_at(&locked, &path) {
                return Ok(Some(PathLock { _file: locked }));
            }
        }
        Err(failed(io::Error::other("it keeps being replaced")))
    }
}

/// `<socket path>.lock`.
fn lock_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// The mode of a directory created for the socket: the owner's, and search permission for
/// whoever the socket's mode lets connect.
fn dir_mode(socket_mode: u32) -> u32 {
    let group = if socket_mode & 0o070 != 0 { 0o010 } else { 0 };
    let other = if socket_mode & 0o007 != 0 { 0o001 } else { 0 };
    0o700 | group | other
}

/// Opens (creating it, and its directory, if needed) the lock file at `path`: a regular file,
/// never reached through a symbolic link.
fn open_lock_file(path: &Path, socket_mode: u32) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(dir_mode(socket_mode))
            .create(dir)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        // O_NONBLOCK: a FIFO put there must not hang the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Whether `path` still names the open file `file`.
fn is_still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
        _ => false,
    }
}

/// A socket path must fit `sun_path` with its terminating NUL.
fn check_length(path: &Path) -> Result<(), SocketFileError> {
    let len = path.as_os_str().len();
    match len < SUN_PATH {
        true => Ok(()),
        false => Err(SocketFileError::TooLong { len }),
    }
}

/// A control socket bound by this process, and the lock that let it.
#[derive(Debug)]
pub(super) struct Bound {
    pub(super) listener: UnixListener,
    pub(super) lock: PathLock,
}

/// Binds the control socket at `path` with `mode`, under its lock: only a socket file nobody
/// listens on is replaced.
pub(super) fn bind(path: &Path, mode: u32) -> Result<Bound, SocketFileError> {
    check_length(path)?;
    let lock =
        PathLock::try_take(path, mode)?.ok_or_else(|| SocketFileError::Locked(lock_path(path)))?;
    let listener = bind_locked(path, mode)?;
    Ok(Bound { listener, lock })
}

/// Binds at `path` (whose lock the caller holds) with `mode`, listening and non-blocking.
fn bind_locked(path: &Path, mode: u32) -> Result<UnixListener, SocketFileError> {
    check_length(path)?;
    crate::registry::remove_stale_socket(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io::Error::from)?;
    // Linux creates the file with the socket's own mode, less the umask: never looser.
    fchmod(&fd, Mode::from_bits_truncate(mode & 0o777)).map_err(io::Error::from)?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    // Exactly the mode asked for (the umask may have taken bits away), then accept.
    let ready = std::fs::set_permissions(path, Permissions::from_mode(mode))
        .and_then(|()| listen(&fd, Backlog::MAXCONN).map_err(io::Error::from));
    if let Err(e) = ready {
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(UnixListener::from(fd))
}

/// What the path means to a listener this generation inherited.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PathCheck {
    /// It leads to the listener (or nobody can tell, its queue being full): keep it.
    Keep,
    /// Nothing there, or a dead socket: bind again.
    Rebind,
    /// Something else is there, which is never replaced: the listener cannot be reached.
    Unreachable(&'static str),
}

/// Whether `path` still leads to `listener`: a probe connection through the path must reach a
/// listener set up by the same process (`SO_PEERCRED` of a listening socket names the process
/// that called `listen`, and a connection to it gets the same).
pub(super) fn check_path(listener: &UnixListener, path: &Path) -> io::Result<PathCheck> {
    Ok(match inspect_socket_path(path)? {
        AtPath::Nothing | AtPath::Stale { .. } => PathCheck::Rebind,
        AtPath::NotASocket => PathCheck::Unreachable("is not a socket"),
        AtPath::Busy => PathCheck::Keep,
        AtPath::Listening(probe) => {
            let ours = getsockopt(&listener.as_fd(), sockopt::PeerCredentials)?;
            let theirs = getsockopt(&probe.as_fd(), sockopt::PeerCredentials)?;
            match ours.pid() == theirs.pid() {
                true => PathCheck::Keep,
                false => PathCheck::Unreachable("leads to another process's socket"),
            }
        }
    })
}

/// The control socket as set up before this generation is ready: inherited from the previous
/// generation, or bound now (then with its lock). Either way registered, so that the next
/// generation inherits it. [`serve`](ControlSocket::serve) starts the server.
pub(crate) struct ControlSocket {
    pub(super) listener: UnixListener,
    /// Held when this process bound the socket; a generation that inherited it takes the lock
    /// once the previous one has handed over.
    pub(super) lock: Option<PathLock>,
    pub(super) path: PathBuf,
    pub(super) mode: u32,
    pub(super) registry: Registry,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) access: Access,
}

impl ControlSocket {
    /// Takes the inherited control socket, or binds one at the configured path.
    pub(crate) fn open(
        config: &RestartConfig,
        commands: mpsc::Sender<Command>,
    ) -> Result<ControlSocket, SetupError> {
        let path = &config.coordination_socket_path;
        let err = |source: io::Error| SetupError::ControlSocket {
            path: path.clone(),
            source,
        };
        let (listener, lock) =
            match inherit::take(CONTROL_FD).map_err(|e| err(io::Error::other(e)))? {
                Some(fd) if classify(fd.as_fd()) == Kind::UnixListener => {
                    (UnixListener::from(fd), None)
                }
                Some(_) => {
                    return Err(err(io::Error::other(
                        "the inherited control socket is not a listening Unix socket",
                    )));
                }
                None => {
                    let bound = bind(path, config.socket_mode).map_err(|e| err(e.into()))?;
                    (bound.listener, Some(bound.lock))
                }
            };
        listener.set_nonblocking(true).map_err(err)?;
        register(&config.registry, &listener, path).map_err(err)?;
        Ok(ControlSocket {
            listener,
            lock,
            path: path.clone(),
            mode: config.socket_mode,
            registry: config.registry.clone(),
            commands,
            access: Access {
                allowed_uids: config.allowed_uids.clone(),
            },
        })
    }
}

/// Binds the socket at `path` again (its lock held), in the place of the one registered.
pub(super) fn bind_again(path: &Path, mode: u32, registry: &Registry) -> io::Result<UnixListener> {
    let fresh = bind_locked(path, mode)?;
    registry.remove(CONTROL_FD);
    register(registry, &fresh, path)?;
    Ok(fresh)
}

/// Registers (a duplicate of) `listener` as the control socket, for the next generation.
fn register(registry: &Registry, listener: &UnixListener, path: &Path) -> io::Result<()> {
    let keep = listener.try_clone()?;
    registry
        .insert_internal(CONTROL_FD, keep.into(), Some(path.to_owned()))
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_af_unix_takes_is_bound_and_a_longer_one_names_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let name = |len: usize| "s".repeat(len - dir.path().as_os_str().len() - 1);
        let path = dir.path().join(name(107));
        assert_eq!(path.as_os_str().len(), 107);
        let bound = bind(&path, 0o600);
        assert!(bound.is_ok(), "{bound:?}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(bound);
        let err = bind(&dir.path().join(name(108)), 0o600).unwrap_err();
        assert!(err.to_string().contains("108"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.sock");
        std::fs::write(&file, "precious").unwrap();
        let link = dir.path().join("l.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for path in [&file, &link] {
            let err = bind(path, 0o600).unwrap_err();
            assert!(err.to_string().contains("not a socket"), "{err}");
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }

    #[test]
    fn two_binds_at_the_same_moment_never_both_succeed() {
        for round in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let path = std::sync::Arc::new(dir.path().join("c.sock"));
            let go = std::sync::Arc::new(std::sync::Barrier::new(2));
            let binds: Vec<_> = (0..2)
                .map(|_| {
                    let (go, path) = (go.clone(), path.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        bind(&path, 0o600)
                    })
                })
                .collect();
            let results: Vec<_> = binds.into_iter().map(|t| t.join().unwrap()).collect();
            let bound = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(bound, 1, "round {round}: {results:?}");
        }
    }

    #[test]
    fn a_live_socket_without_the_lock_is_not_replaced_and_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let live = UnixListener::bind(&path).unwrap();
        let err = bind(&path, 0o600).unwrap_err();
        assert!(
            err.to_string().contains("another process is listening"),
            "{err}"
        );
        drop(live);
        let bound = bind(&path, 0o600).expect("a stale socket is replaced");
        // Bound here: the lock keeps a second binder out.
        let err = bind(&path, 0o600).unwrap_err();
        assert!(matches!(err, SocketFileError::Locked(_)), "{err:?}");
        drop(bound);
    }

    #[test]
    fn a_missing_directory_is_created_with_search_permission_for_whom_the_mode_lets_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/app/c.sock");
        let _bound = bind(&path, 0o660).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o660);
        assert_eq!(mode(path.parent().unwrap()), 0o710);
        assert_eq!(dir_mode(0o600), 0o700);
        assert_eq!(dir_mode(0o666), 0o711);
    }

    #[test]
    fn the_path_check_tells_its_own_socket_from_a_gone_one_and_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let bound = bind(&path, 0o600).unwrap();
        assert_eq!(check_path(&bound.listener, &path).unwrap(), PathCheck::Keep);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            check_path(&bound.listener, &path).unwrap(),
            PathCheck::Rebind
        );
        std::fs::write(&path, "x").unwrap();
        assert!(matches!(
            check_path(&bound.listener, &path).unwrap(),
            PathCheck::Unreachable(_)
        ));
    }
}
