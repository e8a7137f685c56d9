//! The registry of named descriptors: what crosses from one generation to the next.
//!
//! The service asks the registry for "TCP listener `http` on 127.0.0.1:8080". In the first
//! generation the registry binds it; in every later one it adopts the inherited socket of that
//! name, whichever lifecycle handed it over (our fork/exec handover, systemd socket activation,
//! or systemd's file descriptor store). Either way the registry keeps the descriptor, so that the
//! next restart hands it on, and gives the service a duplicate that is **non-blocking and
//! close-on-exec**, ready for `tokio`'s `from_std`.
//!
//! An inherited descriptor is validated before it is adopted (`SO_TYPE`, address family,
//! `SO_ACCEPTCONN`; for a connection that came in a bag, by what the bag says of it, without a
//! system call) and taken out of the inherited set only when that succeeded.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};

use crate::inherit::{self, InheritError, RESERVED_PREFIX};
use crate::listen::ListenOptions;

/// What a registered descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A listening TCP socket.
    TcpListener,
    /// A UDP socket.
    UdpSocket,
    /// A listening Unix stream socket.
    UnixListener,
    /// A Unix datagram socket.
    UnixDatagram,
    /// A connected TCP socket (an accepted connection).
    TcpStream,
    /// A connected Unix stream socket.
    UnixStream,
    /// Any other descriptor (a memfd, a pipe, a file).
    Other,
}

impl Kind {
    /// One byte for the kind, in what a bag says of its descriptors.
    pub(crate) fn code(self) -> u8 {
        match self {
            Kind::TcpListener => b'L',
            Kind::UdpSocket => b'D',
            Kind::UnixListener => b'l',
            Kind::UnixDatagram => b'd',
            Kind::TcpStream => b't',
            Kind::UnixStream => b'u',
            Kind::Other => b'o',
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        [
            Kind::TcpListener,
            Kind::UdpSocket,
            Kind::UnixListener,
            Kind::UnixDatagram,
            Kind::TcpStream,
            Kind::UnixStream,
            Kind::Other,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }
}

/// A descriptor that could not be registered or adopted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The environment describing inherited descriptors is wrong.
    #[error(transparent)]
    Inherit(#[from] InheritError),
    /// The name is not allowed.
    #[error("invalid descriptor name {name:?}: {why}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// The inherited descriptor of that name is not of the kind asked for.
    #[error("inherited descriptor {name:?} is not a {expected:?}: {found}")]
    WrongKind {
        /// The name.
        name: String,
        /// The kind asked for.
        expected: Kind,
        /// What it is.
        found: String,
    },
    /// The inherited socket of that name is bound to another address than the one asked for.
    #[error(
        "inherited listener {name:?} is bound to {inherited}, but {requested} was asked for; \
         use a new name, or `replace_*` to rebind it on purpose"
    )]
    AddressChanged {
        /// The name.
        name: String,
        /// Where the inherited socket is bound.
        inherited: String,
        /// What was asked for.
        requested: String,
    },
    /// A descriptor of that name is already registered in this process.
    #[error("a descriptor named {0:?} is already registered")]
    Duplicate(String),
    /// An inherited connection came back closed (its peer left during the restart). It was
    /// dropped, and removed from systemd's store.
    #[error("inherited connection {0:?} is closed")]
    ConnectionClosed(String),
    /// Binding or another system call failed.
    #[error("{what} {name:?}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// One descriptor for a [`Keeper`] to keep.
pub(crate) struct Keep<'a> {
    pub(crate) name: &'a str,
    pub(crate) kind: Kind,
    pub(crate) fd: BorrowedFd<'a>,
}

/// Where descriptors are kept between generations, besides this process (systemd's store).
pub(crate) trait Keeper: Send + Sync {
    /// Keeps each descriptor under its name. For each, whether the keeper holds a copy of its
    /// own that needs nothing from this process (a connection in a bag): the registry then
    /// closes its own.
    fn keep(&self, items: &[Keep<'_>]) -> Vec<bool>;
    fn discard(&self, name: &str);
}

struct Entry {
    kind: Kind,
    /// `None` when a bag holds it and this process need not (see [`Keeper::keep`]).
    fd: Option<OwnedFd>,
    /// For a Unix socket bound here: its path, removed when the service stops for good.
    path: Option<PathBuf>,
    /// Whether it is kept outside this process already: by the keeper, by systemd when it came
    /// from its store by name, or by a bag when it came out of one.
    kept: bool,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    keeper: Option<Arc<dyn Keeper>>,
    /// Names forgotten before a keeper was attached: it discards them when it is.
    forgotten: Vec<String>,
}

/// The registry of named descriptors. Cheap to clone: clones share one registry.
///
/// Put the registry in [`RestartConfig::registry`](crate::RestartConfig::registry) so that
/// the restart hands everything in it to the next generation.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = shellflip::Registry::new();
/// // Bound now, inherited in every later generation.
/// let listener = registry.tcp_listener("http", "127.0.0.1:0".parse()?)?;
/// let listener = tokio::net::TcpListener::from_std(listener)?;
/// println!("serving on {}", listener.local_addr()?);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_map()
            .entries(inner.entries.iter().map(|(k, e)| (k, e.kind)))
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TCP listener called `name`: inherited if a previous generation had it, else bound
    /// to `addr` now, with a backlog of the system's maximum. Port 0 matches whatever port the
    /// inherited listener has.
    pub fn tcp_listener(&self, name: &str, addr: SocketAddr) -> Result<TcpListener, RegistryError> {
        self.tcp_listener_with(name, addr, &ListenOptions::default())
    }

    /// Like [`tcp_listener`](Self::tcp_listener), with socket options (`SO_REUSEPORT`,
    /// `IPV6_V6ONLY`, the backlog, ...): set when the socket is bound, kept by every later
    /// generation; the backlog is applied again to an inherited listener.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let registry = shellflip::Registry::new();
    /// let options = shellflip::ListenOptions { reuse_port: true, ..Default::default() };
    /// let listener = registry.tcp_listener_with("http", "127.0.0.1:0".parse()?, &options)?;
    /// # drop(listener); Ok(()) }
    /// ```
    pub fn tcp_listener_with(
        &self,
        name: &str,
        addr: SocketAddr,
        options: &ListenOptions,
    ) -> Result<TcpListener, RegistryError> {
        let fd = self.named(name, Kind::TcpListener, None, || options.bind_tcp(addr))?;
        options
            .relisten(fd.as_fd())
            .map_err(|e| io_err("listen", name, e))?;
        let l = TcpListener::from(fd);
        let bound = l.local_addr().map_err(|e| io_err("inspect", name, e))?;
        if !same_address(bound, addr) {
            self.forget(name);
            return Err(RegistryError::AddressChanged {
                name: name.into(),
                inherited: bound.to_string(),
                requested: addr.to_string(),
            });
        }
        Ok(l)
    }

    /// Like [`tcp_listener`](Self::tcp_listener), but an inherited listener of that name on
    /// another address is dropped and `addr` bound instead: a changed address, by choice.
    pub fn replace_tcp_listener(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<TcpListener, RegistryError> {
        match self.tcp_listener(name, addr) {
            Err(RegistryError::AddressChanged { .. }) => self.tcp_listener(name, addr),
            other => other,
        }
    }

    /// The UDP socket called `name`: inherited, or bound to `addr` now.
    pub fn udp_socket(&self, name: &str, addr: SocketAddr) -> Result<UdpSocket, RegistryError> {
        self.udp_socket_with(name, addr, &ListenOptions::default())
    }

    /// Like [`udp_socket`](Self::udp_socket), with socket options (buffer sizes,
    /// `SO_REUSEPORT`, ...), set when the socket is bound and kept by every later generation.
    pub fn udp_socket_with(
        &self,
        name: &str,
        addr: SocketAddr,
        options: &ListenOptions,
    ) -> Result<UdpSocket, RegistryError> {
        self.named(name, Kind::UdpSocket, None, || options.bind_udp(addr))
            .map(UdpSocket::from)
    }

    /// The Unix stream listener called `name`: inherited (its path is never unlinked by a
    /// restart), or bound at `path` now. A stale socket file at `path` that nothing listens on
    /// is replaced; one that something listens on, or a file that is not a socket, is an error.
    pub fn unix_listener(&self, name: &str, path: &Path) -> Result<UnixListener, RegistryError> {
        self.named(name, Kind::UnixListener, Some(path), || {
            remove_stale_socket(path)?;
            UnixListener::bind(path).map(OwnedFd::from)
        })
        .map(UnixListener::from)
    }

    /// The Unix datagram socket called `name`: inherited, or bound at `path` now (a stale
    /// socket file there is replaced; a live one, or a file that is not a socket, is an error).
    pub fn unix_datagram(&self, name: &str, path: &Path) -> Result<UnixDatagram, RegistryError> {
        self.named(name, Kind::UnixDatagram, Some(path), || {
            remove_stale_socket(path)?;
            UnixDatagram::bind(path).map(OwnedFd::from)
        })
        .map(UnixDatagram::from)
    }

    /// The socket called `name`: adopted if inherited, else created by `bind` and registered.
    /// Returns a non-blocking, close-on-exec duplicate. `path` is the socket file, if any,
    /// removed by [`remove_socket_files`](Self::remove_socket_files).
    fn named(
        &self,
        name: &str,
        kind: Kind,
        path: Option<&Path>,
        bind: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> Result<OwnedFd, RegistryError> {
        let fd = match self.adopt(name, kind)? {
            Some(fd) => {
                if let Some(e) = self.lock().entries.get_mut(name) {
                    e.path = path.map(Path::to_owned);
                }
                fd
            }
            None => {
                let fd = bind().map_err(|e| io_err("bind", name, e))?;
                self.register(name, kind, fd, path.map(Path::to_owned))?
            }
        };
        set_nonblocking(&fd).map_err(|e| io_err("set non-blocking", name, e))?;
        Ok(fd)
    }

    /// Registers any descriptor under `name` (an accepted connection, a memfd), so that the
    /// next generation can take it back with [`take_tcp_stream`](Self::take_tcp_stream) or
    /// [`take_fd`](Self::take_fd). In the systemd lifecycle it goes into the store at once (a
    /// connection into a bag of up to 253: see the README); a socket already in the store,
    /// under any name, is not stored twice.
    ///
    /// The registry takes `fd` (and closes it once a bag holds the connection); keep using a
    /// duplicate if you still need it.
    pub fn insert(&self, name: &str, fd: impl Into<OwnedFd>) -> Result<(), RegistryError> {
        let fd = fd.into();
        let kind = classify(fd.as_fd());
        check_user_name(name)?;
        self.register_any(name, kind, fd, None, false).map(drop)
    }

    /// Takes back an inherited TCP connection called `name`, non-blocking. `Ok(None)` when there
    /// is none. A connection whose peer left meanwhile is dropped (and removed from systemd's
    /// store) and reported as [`RegistryError::ConnectionClosed`].
    pub fn take_tcp_stream(&self, name: &str) -> Result<Option<TcpStream>, RegistryError> {
        let Some(fd) = self.adopt(name, Kind::TcpStream)? else {
            return Ok(None);
        };
        let s = TcpStream::from(fd);
        if s.peer_addr().is_err() || s.take_error().ok().flatten().is_some() {
            self.forget(name);
            return Err(RegistryError::ConnectionClosed(name.into()));
        }
        s.set_nonblocking(true)
            .map_err(|e| io_err("set non-blocking", name, e))?;
        Ok(Some(s))
    }

    /// Takes back an inherited Unix stream connection called `name`, non-blocking.
    pub fn take_unix_stream(&self, name: &str) -> Result<Option<UnixStream>, RegistryError> {
        let Some(fd) = self.adopt(name, Kind::UnixStream)? else {
            return Ok(None);
        };
        let s = UnixStream::from(fd);
        s.set_nonblocking(true)
            .map_err(|e| io_err("set non-blocking", name, e))?;
        Ok(Some(s))
    }

    /// Takes back any inherited descriptor called `name` (close-on-exec), without checking its
    /// kind. It stays registered, so it is handed on again at the next restart.
    pub fn take_fd(&self, name: &str) -> Result<Option<OwnedFd>, RegistryError> {
        self.adopt(name, Kind::Other)
    }

    /// The names of inherited descriptors that no one has adopted yet, for instance the
    /// connections a previous generation put aside.
    pub fn inherited_names(&self) -> Result<Vec<String>, RegistryError> {
        let set = inherit::inherited();
        let set = set
            .as_ref()
            .map_err(|e| RegistryError::Inherit(e.clone()))?;
        Ok(set
            .names()
            .into_iter()
            .filter(|n| !n.starts_with(RESERVED_PREFIX))
            .collect())
    }

    /// The names registered in this process.
    pub fn names(&self) -> Vec<String> {
        self.lock().entries.keys().cloned().collect()
    }

    /// Forgets `name`: it is not handed to the next generation, and leaves systemd's store.
    /// Returns whether it was registered.
    pub fn remove(&self, name: &str) -> bool {
        self.forget(name)
    }

    /// Removes the socket files of the Unix sockets in the registry, the control socket's
    /// included. Call it when the service stops for good, never when it hands over to a new
    /// generation (whose sockets they are).
    pub fn remove_socket_files(&self) {
        for e in self.lock().entries.values() {
            if let Some(path) = &e.path {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn forget(&self, name: &str) -> bool {
        let (found, keeper) = {
            let mut inner = self.lock();
            let removed = inner.entries.remove(name);
            // One that nobody keeps has nothing to discard.
            let kept = removed.as_ref().is_none_or(|e| e.kept);
            if kept && inner.keeper.is_none() {
                inner.forgotten.push(name.to_owned());
            }
            let keeper = if kept { inner.keeper.clone() } else { None };
            (removed.is_some(), keeper)
        };
        if let Some(k) = keeper {
            k.discard(name);
        }
        found
    }

    /// Adopts the inherited descriptor `name` if there is one of the right kind: registers it
    /// and returns a close-on-exec duplicate (or the descriptor itself, when a bag holds it).
    fn adopt(&self, name: &str, kind: Kind) -> Result<Option<OwnedFd>, RegistryError> {
        check_user_name(name)?;
        if self.lock().entries.contains_key(name) {
            return Err(RegistryError::Duplicate(name.into()));
        }
        let (fd, bagged, loose) = {
            let mut set = inherit::inherited();
            let set = set
                .as_mut()
                .map_err(|e| RegistryError::Inherit(e.clone()))?;
            let Some(borrowed) = set.peek(name) else {
                return Ok(None);
            };
            let bagged = set.bagged(name).map(|label| label.kind);
            let loose = set.loose(name);
            // What a bag says of a descriptor was checked when it went in: no system call.
            let checked = match bagged {
                Some(code) if kind != Kind::Other => match Kind::from_code(code) {
                    Some(found) if found == kind => Ok(()),
                    found => Err(format!("it is a {found:?}")),
                },
                _ => check_kind(borrowed, kind),
            };
            checked.map_err(|found| RegistryError::WrongKind {
                name: name.into(),
                expected: kind,
                found,
            })?;
            match set.take(name) {
                Some(fd) => (fd, bagged, loose),
                None => return Ok(None),
            }
        };
        tracing::debug!(
            name,
            ?kind,
            fd = fd.as_raw_fd(),
            "adopted inherited descriptor"
        );
        // One that came out of a bag is in a new bag already: this process needs no copy.
        if bagged.is_some() {
            self.lock().entries.insert(
                name.into(),
                Entry {
                    kind,
                    fd: None,
                    path: None,
                    kept: true,
                },
            );
            return Ok(Some(fd));
        }
        // One that came out of a bag but is in none is kept as if it were created here.
        if loose {
            return self.register_any(name, kind, fd, None, true);
        }
        let dup = fd.try_clone().map_err(|e| io_err("duplicate", name, e))?;
        self.lock().entries.insert(
            name.into(),
            Entry {
                kind,
                fd: Some(fd),
                path: None,
                kept: true,
            },
        );
        Ok(Some(dup))
    }

    /// Registers a descriptor created in this process; returns a close-on-exec duplicate.
    fn register(
        &self,
        name: &str,
        kind: Kind,
        fd: OwnedFd,
        path: Option<PathBuf>,
    ) -> Result<OwnedFd, RegistryError> {
        check_user_name(name)?;
        self.register_any(name, kind, fd, path, true)
            .map(|dup| dup.expect("a duplicate was asked for"))
    }

    /// Registers `fd`; returns a close-on-exec duplicate when `dup` asks for one.
    fn register_any(
        &self,
        name: &str,
        kind: Kind,
        fd: OwnedFd,
        path: Option<PathBuf>,
        dup: bool,
    ) -> Result<Option<OwnedFd>, RegistryError> {
        inherit::set_cloexec(&fd);
        let dup = match dup {
            true => Some(fd.try_clone().map_err(|e| io_err("duplicate", name, e))?),
            false => None,
        };
        let mut inner = self.lock();
        if inner.entries.contains_key(name) {
            return Err(RegistryError::Duplicate(name.into()));
        }
        let (kept, held) = match &inner.keeper {
            Some(k) => {
                let held = k.keep(&[Keep {
                    name,
                    kind,
                    fd: fd.as_fd(),
                }]);
                (true, held.first().copied().unwrap_or(false))
            }
            None => (false, false),
        };
        inner.entries.insert(
            name.into(),
            Entry {
                kind,
                fd: (!held).then_some(fd),
                path,
                kept,
            },
        );
        Ok(dup)
    }

    /// Registers one of the library's own descriptors (control socket) under a reserved name.
    pub(crate) fn insert_internal(
        &self,
        name: &str,
        fd: OwnedFd,
        path: Option<PathBuf>,
    ) -> Result<(), RegistryError> {
        let kind = classify(fd.as_fd());
        self.register_any(name, kind, fd, path, false).map(drop)
    }

    /// Calls `f` with every registered descriptor this process holds, in name order (what
    /// crosses at a fork/exec handover; those only a bag holds are in the store already).
    pub(crate) fn with_fds<R>(&self, f: impl FnOnce(&[(&str, BorrowedFd<'_>)]) -> R) -> R {
        let inner = self.lock();
        let list: Vec<(&str, BorrowedFd<'_>)> = inner
            .entries
            .iter()
            .filter_map(|(n, e)| Some((n.as_str(), e.fd.as_ref()?.as_fd())))
            .collect();
        f(&list)
    }

    /// From now on, every descriptor registered is also kept by `keeper`; those not kept yet
    /// (created in this process) are handed to it now, together, and those forgotten so far are
    /// discarded from it.
    pub(crate) fn attach_keeper(&self, keeper: Arc<dyn Keeper>) {
        let mut inner = self.lock();
        for name in std::mem::take(&mut inner.forgotten) {
            keeper.discard(&name);
        }
        let items: Vec<Keep<'_>> = inner
            .entries
            .iter()
            .filter(|(_, e)| !e.kept)
            .filter_map(|(name, e)| {
                Some(Keep {
                    name,
                    kind: e.kind,
                    fd: e.fd.as_ref()?.as_fd(),
                })
            })
            .collect();
        let names: Vec<String> = items.iter().map(|k| k.name.to_owned()).collect();
        let held = if items.is_empty() {
            Vec::new()
        } else {
            keeper.keep(&items)
        };
        drop(items);
        for (name, held) in names
            .iter()
            .zip(held.into_iter().chain(std::iter::repeat(false)))
        {
            if let Some(e) = inner.entries.get_mut(name) {
                e.kept = true;
                if held {
                    e.fd = None;
                }
            }
        }
        inner.keeper = Some(keeper);
    }
}

fn check_user_name(name: &str) -> Result<(), RegistryError> {
    inherit::check_name(name).map_err(|why| RegistryError::InvalidName {
        name: name.into(),
        why,
    })?;
    if name.starts_with(RESERVED_PREFIX) {
        return Err(RegistryError::InvalidName {
            name: name.into(),
            why: "names starting with \"shellflip.\" are reserved for the library",
        });
    }
    Ok(())
}

fn io_err(what: &'static str, name: &str, source: io::Error) -> RegistryError {
    RegistryError::Io {
        what,
        name: name.into(),
        source,
    }
}

/// Checks that `fd` is of `kind`; on mismatch says what it is.
fn check_kind(fd: BorrowedFd<'_>, kind: Kind) -> Result<(), String> {
    if kind == Kind::Other {
        return nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
            .map(drop)
            .map_err(|e| e.to_string());
    }
    let found = classify(fd);
    if found == kind {
        Ok(())
    } else {
        Err(format!("it is a {found:?}"))
    }
}

/// What a descriptor is, by `SO_TYPE`, its address family and `SO_ACCEPTCONN`.
pub(crate) fn classify(fd: BorrowedFd<'_>) -> Kind {
    let Ok(ty) = getsockopt(&fd, sockopt::SockType) else {
        return Kind::Other;
    };
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    match (family, ty, listening) {
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Stream, true) => {
            Kind::TcpListener
        }
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Stream, false) => {
            Kind::TcpStream
        }
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Datagram, _) => {
            Kind::UdpSocket
        }
        (Some(AddressFamily::Unix), SockType::Stream, true) => Kind::UnixListener,
        (Some(AddressFamily::Unix), SockType::Stream, false) => Kind::UnixStream,
        (Some(AddressFamily::Unix), SockType::Datagram, _) => Kind::UnixDatagram,
        _ => Kind::Other,
    }
}

/// An inherited address matches a requested one when they are equal, or when the requested
/// port is 0 ("any port") and the IP matches.
fn same_address(inherited: SocketAddr, requested: SocketAddr) -> bool {
    inherited == requested || (requested.port() == 0 && inherited.ip() == requested.ip())
}

/// Sets `O_NONBLOCK` on the open file description of `fd`.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// What a socket path holds, seen without following a symbolic link and without waiting.
#[derive(Debug)]
pub(crate) enum AtPath {
    /// Nothing.
    Nothing,
    /// Something that is not a socket (a regular file, a directory, a symbolic link, a FIFO).
    NotASocket,
    /// A socket file nobody listens on; its device and inode, to remove only that file.
    Stale { dev: u64, ino: u64 },
    /// A socket something listens on, and the probe connection that reached it.
    Listening(UnixStream),
    /// A socket something has open but no probe connection got in: its queue is full, or it is
    /// a socket of another type (a datagram socket).
    Busy,
}

/// Looks at what `path` holds: its type (never following a symbolic link), then, for a socket,
/// whether a non-blocking probe connection reaches a listener. Linux answers "connection
/// refused" for any file that is not a socket, hence the type first.
pub(crate) fn inspect_socket_path(path: &Path) -> io::Result<AtPath> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(AtPath::Nothing),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Ok(AtPath::NotASocket);
    }
    match connect_nonblocking(path) {
        Ok(probe) => Ok(AtPath::Listening(probe)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(AtPath::Stale {
            dev: meta.dev(),
            ino: meta.ino(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AtPath::Nothing),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EPROTOTYPE)) => {
            Ok(AtPath::Busy)
        }
        Err(e) => Err(e),
    }
}

/// Connects to the stream socket at `path` without waiting for room in its queue.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{SockFlag, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// Makes room to bind a socket at `path`: removes a socket file nobody listens on. Anything
/// else is left alone and reported: a live socket (`AddrInUse`), a file that is not a socket
/// (`AlreadyExists`).
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match inspect_socket_path(path)? {
        AtPath::Nothing => Ok(()),
        AtPath::NotASocket => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        AtPath::Listening(_) | AtPath::Busy => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        )),
        AtPath::Stale { dev, ino } => {
            // Only the dead socket that was looked at: not whatever took its place since.
            match std::fs::symlink_metadata(path) {
                Ok(m) if (m.dev(), m.ino()) == (dev, ino) => std::fs::remove_file(path),
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} was replaced while it was checked", path.display()),
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_kinds() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(classify(l.as_fd()), Kind::TcpListener);
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(classify(c.as_fd()), Kind::TcpStream);
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(classify(u.as_fd()), Kind::UdpSocket);
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(classify(a.as_fd()), Kind::UnixStream);
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(classify(f.as_fd()), Kind::Other);
    }

    #[test]
    fn fresh_listener_is_nonblocking_and_cloexec() {
        let r = Registry::new();
        let l = r
            .tcp_listener("http", "127.0.0.1:0".parse().unwrap())
            .unwrap();
        let fl = nix::fcntl::fcntl(&l, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let fd = nix::fcntl::fcntl(&l, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fd & libc::FD_CLOEXEC, 0);
        assert_eq!(r.names(), vec!["http".to_string()]);
        assert!(matches!(
            r.tcp_listener("http", "127.0.0.1:0".parse().unwrap()),
            Err(RegistryError::Duplicate(_))
        ));
    }

    #[test]
    fn reserved_and_bad_names_are_refused() {
        let r = Registry::new();
        let addr = "127.0.0.1:0".parse().unwrap();
        assert!(matches!(
            r.tcp_listener("shellflip.x", addr),
            Err(RegistryError::InvalidName { .. })
        ));
        assert!(matches!(
            r.tcp_listener("a:b", addr),
            Err(RegistryError::InvalidName { .. })
        ));
    }

    #[test]
    fn live_socket_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _live = UnixListener::bind(&path).unwrap();
        let r = Registry::new();
        let err = r.unix_listener("u", &path).unwrap_err();
        assert!(
            err.to_string().contains("another process is listening"),
            "{err}"
        );
        drop(_live);
        // Now stale: replaced.
        r.unix_listener("u", &path).unwrap();
    }

    #[test]
    fn port_zero_matches_any_port() {
        let a: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert!(same_address(a, "127.0.0.1:0".parse().unwrap()));
        assert!(!same_address(a, "127.0.0.2:0".parse().unwrap()));
        assert!(!same_address(a, "127.0.0.1:4243".parse().unwrap()));
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, "precious").unwrap();
        let r = Registry::new();
        let err = r.unix_listener("u", &path).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        let err = r.unix_datagram("d", &path).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
