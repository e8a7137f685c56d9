//! How a listening socket is made: the options a service sets on it before it binds, applied
//! in the first generation and kept by every later one (they belong to the socket, which
//! crosses the restarts).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

/// A callback that sets anything else on the socket before it is bound.
pub type Configure = Arc<dyn Fn(&Socket) -> io::Result<()> + Send + Sync>;

/// Options of a socket the [`Registry`](crate::Registry) binds
/// ([`tcp_listener_with`](crate::Registry::tcp_listener_with),
/// [`udp_socket_with`](crate::Registry::udp_socket_with)). Build it with struct update syntax
/// over `Default`, as below, so that fields added later do not break your code.
///
/// They are set when the socket is created, in the first generation; later generations
/// inherit the socket with its options. The backlog is the exception: it is applied again to
/// an inherited listener, so a changed backlog takes effect at the next restart. A socket the
/// application made itself can be handed over too: register it with
/// [`Registry::insert`](crate::Registry::insert), and take it back in the next generation with
/// `tcp_listener` under the same name.
///
/// # Examples
///
/// ```
/// use shellflip::{ListenOptions, Registry};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let options = ListenOptions {
///     backlog: Some(1024),
///     reuse_port: true,
///     nodelay: true,
///     ..ListenOptions::default()
/// };
/// let registry = Registry::new();
/// let listener = registry.tcp_listener_with("http", "127.0.0.1:0".parse()?, &options)?;
/// # drop(listener); Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct ListenOptions {
    /// The listen backlog; by default the system's maximum (`net.core.somaxconn`), not 128.
    pub backlog: Option<i32>,
    /// `SO_REUSEPORT`: other sockets may bind the same address (load spread by the kernel).
    pub reuse_port: bool,
    /// `IPV6_V6ONLY` for an IPv6 address: `Some(true)` keeps `[::]` from also taking IPv4.
    /// `None` leaves the system's default (`net.ipv6.bindv6only`, usually dual-stack).
    pub v6_only: Option<bool>,
    /// `TCP_NODELAY`, which Linux passes on to the connections the listener accepts.
    pub nodelay: bool,
    /// `TCP_FASTOPEN` with this queue length.
    pub fast_open: Option<u32>,
    /// `IP_FREEBIND`: bind an address that is not (yet) configured on the machine.
    pub freebind: bool,
    /// `SO_BINDTODEVICE`: only this network interface.
    pub bind_device: Option<String>,
    /// `SO_RCVBUF`, in bytes (UDP sockets, most of all).
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF`, in bytes.
    pub send_buffer: Option<usize>,
    /// Anything else, set last, before the socket is bound.
    pub configure: Option<Configure>,
}

impl fmt::Debug for ListenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenOptions")
            .field("backlog", &self.backlog)
            .field("reuse_port", &self.reuse_port)
            .field("v6_only", &self.v6_only)
            .field("nodelay", &self.nodelay)
            .field("fast_open", &self.fast_open)
            .field("freebind", &self.freebind)
            .field("bind_device", &self.bind_device)
            .field("recv_buffer", &self.recv_buffer)
            .field("send_buffer", &self.send_buffer)
            .field("configure", &self.configure.as_ref().map(|_| ".."))
            .finish()
    }
}

impl ListenOptions {
    /// The backlog to listen with: the one asked for, or the system's maximum.
    fn backlog(&self) -> i32 {
        self.backlog.unwrap_or_else(somaxconn)
    }

    /// Creates, configures and binds a socket of `ty` for `addr`.
    fn socket(&self, addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), ty.cloexec(), Some(protocol))?;
        if ty == Type::STREAM {
            // Like the standard library's bind: a restarted service rebinds at once.
            socket.set_reuse_address(true)?;
        }
        if self.reuse_port {
            socket.set_reuse_port(true)?;
        }
        if let (Some(v6_only), SocketAddr::V6(_)) = (self.v6_only, addr) {
            socket.set_only_v6(v6_only)?;
        }
        if self.freebind {
            match addr {
                SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
                SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
            }
        }
        if let Some(device) = &self.bind_device {
            socket.bind_device(Some(device.as_bytes()))?;
        }
        if let Some(size) = self.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(size) = self.send_buffer {
            socket.set_send_buffer_size(size)?;
        }
        if ty == Type::STREAM {
            if self.nodelay {
                socket.set_tcp_nodelay(true)?;
            }
            if let Some(queue) = self.fast_open {
                set_fast_open(socket.as_fd(), queue)?;
            }
        }
        if let Some(configure) = &self.configure {
            configure(&socket)?;
        }
        socket.bind(&addr.into())?;
        Ok(socket)
    }

    /// A TCP listener on `addr`, with these options.
    pub(crate) fn bind_tcp(&self, addr: SocketAddr) -> io::Result<OwnedFd> {
        let socket = self.socket(addr, Type::STREAM, Protocol::TCP)?;
        socket.listen(self.backlog())?;
        Ok(socket.into())
    }

    /// A UDP socket on `addr`, with these options.
    pub(crate) fn bind_udp(&self, addr: SocketAddr) -> io::Result<OwnedFd> {
        Ok(self.socket(addr, Type::DGRAM, Protocol::UDP)?.into())
    }

    /// Applies the backlog again to an inherited listener (`listen` on a listening socket only
    /// changes its backlog).
    pub(crate) fn relisten(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let backlog = nix::sys::socket::Backlog::new(self.backlog()).map_err(io::Error::from)?;
        nix::sys::socket::listen(&fd, backlog).map_err(io::Error::from)
    }
}

/// The system's maximum listen backlog (`net.core.somaxconn`), or 4096 when it cannot be read.
fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4096)
}

fn set_fast_open(fd: BorrowedFd<'_>, queue: u32) -> io::Result<()> {
    let queue = libc::c_int::try_from(queue).map_err(io::Error::other)?;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid, live c_int; the
    // descriptor is borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&queue as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[test]
    fn options_are_set_before_bind() {
        let opts = ListenOptions {
            reuse_port: true,
            nodelay: true,
            recv_buffer: Some(256 * 1024),
            ..ListenOptions::default()
        };
        let fd = opts.bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(getsockopt(&fd, sockopt::ReusePort).unwrap());
        assert!(getsockopt(&fd, sockopt::TcpNoDelay).unwrap());
        assert!(getsockopt(&fd, sockopt::AcceptConn).unwrap());
        assert!(getsockopt(&fd, sockopt::RcvBuf).unwrap() >= 256 * 1024);
    }

    #[test]
    fn v6_only_keeps_ipv4_out() {
        let opts = ListenOptions {
            v6_only: Some(true),
            ..ListenOptions::default()
        };
        // No IPv6 on the machine is no failure of ours.
        if let Ok(fd) = opts.bind_tcp("[::]:0".parse().unwrap()) {
            assert!(getsockopt(&fd, sockopt::Ipv6V6Only).unwrap());
        }
    }

    #[test]
    fn the_callback_runs_and_its_error_stops_the_bind() {
        let opts = ListenOptions {
            configure: Some(Arc::new(|_| {
                Err(io::Error::other("refused by the callback"))
            })),
            ..ListenOptions::default()
        };
        let err = opts.bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "refused by the callback");
    }

    #[test]
    fn the_default_backlog_is_the_system_maximum() {
        let max: i32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(ListenOptions::default().backlog(), max);
        let seven = ListenOptions {
            backlog: Some(7),
            ..ListenOptions::default()
        };
        assert_eq!(seven.backlog(), 7);
    }
}
