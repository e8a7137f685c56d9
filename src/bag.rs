//! Descriptor bags: many connections kept in systemd's file descriptor store as one entry.
//!
//! systemd checks each descriptor it is asked to store against every descriptor it holds already
//! (`same_fd`: one `kcmp` system call per pair), so storing n connections costs it n²/2 system
//! calls — about 500,000 and 1.4 s for 1,000 connections on the reference machine, minutes for
//! 10,000 — whether they come one per `FDSTORE=1` message or 253 per message. Its
//! `LISTEN_FDNAMES`, one name per descriptor, must also fit in one environment string (128 KiB).
//!
//! A bag is a Unix datagram socket pair. Descriptors are sent into it (`SCM_RIGHTS`, at most
//! [`PER_MESSAGE`] per message), each with a line giving its name, kind and identity, and wait
//! in its receive queue; only the receiving end goes into systemd's store, so systemd holds one
//! descriptor per bag however many the bag carries. A datagram socket never reports a hang-up when
//! the sending end closes (a stream or seqpacket pair would, and systemd drops a stored descriptor
//! that hangs up; the bag is also stored with `FDPOLL=0`). The next generation reads each bag to
//! its end: every descriptor with its line, in the order it went in.
//!
//! The wire format of one message: `SHFLBAG1\n`, then one line per descriptor, in the order of
//! the descriptors: `<kind> <dev> <ino> <name>\n` (kind one byte, device and inode in decimal).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};

/// Every bag's name in systemd's store starts with this (a reserved name of the library).
pub(crate) const NAME_PREFIX: &str = "shellflip.bag.";
/// Most descriptors in one message (the kernel's `SCM_MAX_FD`).
pub(crate) const PER_MESSAGE: usize = 253;
/// The first line of every message.
const MAGIC: &[u8] = b"SHFLBAG1\n";
/// Longest message: the header and [`PER_MESSAGE`] lines of at most 300 bytes (a name has at
/// most 255).
const MAX_MESSAGE: usize = MAGIC.len() + PER_MESSAGE * 300;
/// The send buffer asked for (the kernel caps it at `net.core.wmem_max`): a bag takes messages
/// until it is full, then the next bag is started.
const SEND_BUFFER: usize = 4 << 20;

/// Which file a descriptor is: two descriptors of one socket have the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl FileId {
    /// The identity of `fd` (`fstat`).
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<FileId> {
        let st = nix::sys::stat::fstat(fd)?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

/// What the line of one descriptor says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Label {
    /// The application's name for it.
    pub(crate) name: String,
    /// Its kind, as the registry codes it (one printable byte).
    pub(crate) kind: u8,
    /// Its identity when it was put in.
    pub(crate) id: FileId,
}

/// One descriptor to put into a bag.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item<'a> {
    pub(crate) label: &'a Label,
    pub(crate) fd: BorrowedFd<'a>,
}

/// A bag made by this process: both ends (the receiving end is also in systemd's store).
#[derive(Debug)]
pub(crate) struct Bag {
    tx: OwnedFd,
    rx: OwnedFd,
}

impl Bag {
    /// A new, empty bag: non-blocking and close-on-exec.
    pub(crate) fn new() -> io::Result<Bag> {
        let (tx, rx) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        // Best effort: a smaller buffer only means more bags.
        let _ = setsockopt(&tx, sockopt::SndBuf, &SEND_BUFFER);
        Ok(Bag { tx, rx })
    }

    /// The receiving end: what systemd keeps, and what [`take_all`] reads.
    pub(crate) fn rx(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Puts `items` (at most [`PER_MESSAGE`]) in as one message. `WouldBlock` when the bag is
    /// full: nothing was put in then.
    pub(crate) fn put(&self, items: &[Item<'_>]) -> io::Result<()> {
        assert!(
            items.len() <= PER_MESSAGE,
            "at most {PER_MESSAGE} per message"
        );
        if items.is_empty() {
            return Ok(());
        }
        let payload = encode(items.iter().map(|i| i.label));
        let fds: Vec<RawFd> = items.iter().map(|i| i.fd.as_raw_fd()).collect();
        let iov = [IoSlice::new(&payload)];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        loop {
            match sendmsg::<()>(
                self.tx.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == payload.len() => return Ok(()),
                Ok(n) => {
                    // A datagram is sent whole or not at all.
                    return Err(io::Error::other(format!(
                        "short datagram into a bag: {n} of {} bytes",
                        payload.len()
                    )));
                }
                Err(Errno::EINTR) => continue,
                // A full bag (EAGAIN), or a message its buffer can never take.
                Err(Errno::EAGAIN | Errno::EMSGSIZE | Errno::ENOBUFS) => {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Everything a bag held.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    /// Each descriptor with its line, in the order they were put in.
    pub(crate) items: Vec<(Label, OwnedFd)>,
    /// What went wrong: messages that did not decode, descriptors that could not be received
    /// (out of descriptors), descriptors without a line. Each of those descriptors is closed.
    pub(crate) problems: Vec<String>,
}

/// Reads every message waiting in the bag whose receiving end is `rx`, without blocking; the
/// descriptors arrive close-on-exec.
pub(crate) fn take_all(rx: BorrowedFd<'_>) -> Contents {
    let mut out = Contents::default();
    match nix::sys::socket::getsockopt(&rx, sockopt::SockType) {
        Ok(SockType::Datagram) => {}
        other => {
            out.problems
                .push(format!("not a bag (a Unix datagram socket): {other:?}"));
            return out;
        }
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; PER_MESSAGE]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            rx.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => break,
            Err(e) => {
                out.problems.push(format!("reading a bag: {e}"));
                break;
            }
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: SCM_RIGHTS just installed these descriptors in this process;
                    // nothing else owns them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        let (bytes, flags) = (msg.bytes, msg.flags);
        if bytes == 0 && fds.is_empty() {
            out.problems.push("an empty message in a bag".into());
            continue;
        }
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            out.problems.push(
                "some descriptors of a bag could not be received (out of descriptors: raise \
                 LimitNOFILE=); they are closed"
                    .into(),
            );
        }
        if flags.contains(MsgFlags::MSG_TRUNC) {
            out.problems.push(format!(
                "a bag's message is longer than {MAX_MESSAGE} bytes"
            ));
            continue;
        }
        match decode(&buf[..bytes]) {
            Ok(labels) => {
                if labels.len() != fds.len() {
                    out.problems.push(format!(
                        "a bag's message names {} descriptors but carries {}",
                        labels.len(),
                        fds.len()
                    ));
                }
                out.items.extend(labels.into_iter().zip(fds));
            }
            Err(why) => out.problems.push(format!("a bag's message: {why}")),
        }
    }
    out
}

/// The payload of a message carrying descriptors labelled `labels`, in order.
fn encode<'a>(labels: impl Iterator<Item = &'a Label>) -> Vec<u8> {
    use std::io::Write;
    let mut out = MAGIC.to_vec();
    for l in labels {
        let _ = write!(out, "{} {} {} ", l.kind as char, l.id.dev, l.id.ino);
        out.extend_from_slice(l.name.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The labels of a message's descriptors, in order.
fn decode(payload: &[u8]) -> Result<Vec<Label>, &'static str> {
    let body = payload.strip_prefix(MAGIC).ok_or("not a bag's message")?;
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8")?;
    let mut labels = Vec::new();
    for line in text.split_terminator('\n') {
        let mut f = line.splitn(4, ' ');
        let (Some(kind), Some(dev), Some(ino), Some(name)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err("a line has fewer than 4 fields");
        };
        let &[kind] = kind.as_bytes() else {
            return Err("a kind is one byte");
        };
        let id = FileId {
            dev: dev.parse().map_err(|_| "a device is not a number")?,
            ino: ino.parse().map_err(|_| "an inode is not a number")?,
        };
        labels.push(Label {
            name: name.to_owned(),
            kind,
            id,
        });
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn label(name: &str, fd: BorrowedFd<'_>) -> Label {
        Label {
            name: name.into(),
            kind: b'u',
            id: FileId::of(fd).unwrap(),
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let labels = vec![
            Label {
                name: "echo.12.0".into(),
                kind: b't',
                id: FileId { dev: 8, ino: 123 },
            },
            Label {
                name: "a#b!c".into(),
                kind: b'u',
                id: FileId {
                    dev: u64::MAX,
                    ino: 0,
                },
            },
        ];
        assert_eq!(decode(&encode(labels.iter())).unwrap(), labels);
        assert_eq!(decode(MAGIC).unwrap(), vec![]);
        assert!(decode(b"SHFLBAG2\nt 1 2 x\n").is_err());
        assert!(decode(b"SHFLBAG1\nt 1 x\n").is_err());
        assert!(decode(b"SHFLBAG1\ntt 1 2 x\n").is_err());
        assert!(decode(b"SHFLBAG1\nt 1 z x\n").is_err());
    }

    #[test]
    fn descriptors_come_back_in_order_with_their_names() {
        let bag = Bag::new().unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..600).map(|_| UnixStream::pair().unwrap()).collect();
        let labels: Vec<Label> = pairs
            .iter()
            .enumerate()
            .map(|(i, (a, _))| label(&format!("c.{i}"), a.as_fd()))
            .collect();
        // One alone, then full messages, then the rest.
        let items: Vec<Item<'_>> = labels
            .iter()
            .zip(&pairs)
            .map(|(label, (a, _))| Item {
                label,
                fd: a.as_fd(),
            })
            .collect();
        bag.put(&items[..1]).unwrap();
        for chunk in items[1..].chunks(PER_MESSAGE) {
            bag.put(chunk).unwrap();
        }
        let got = take_all(bag.rx());
        assert!(got.problems.is_empty(), "{:?}", got.problems);
        assert_eq!(got.items.len(), 600);
        for (i, (l, fd)) in got.items.iter().enumerate() {
            assert_eq!(l, &labels[i]);
            assert_eq!(FileId::of(fd.as_fd()).unwrap(), labels[i].id, "same socket");
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        }
        // Read to its end: empty now.
        assert!(take_all(bag.rx()).items.is_empty());
    }

    #[test]
    fn a_bag_outlives_its_sending_end_without_hanging_up() {
        let Bag { tx, rx } = Bag::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let l = label("x", a.as_fd());
        let bag = Bag { tx, rx };
        bag.put(&[Item {
            label: &l,
            fd: a.as_fd(),
        }])
        .unwrap();
        let Bag { tx, rx } = bag;
        drop(tx);
        drop(a);
        // What systemd would see polling the stored end (events 0: only errors and hang-ups).
        let mut pfd = [nix::poll::PollFd::new(
            rx.as_fd(),
            nix::poll::PollFlags::empty(),
        )];
        assert_eq!(
            nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).unwrap(),
            0,
            "no hang-up"
        );
        let got = take_all(rx.as_fd());
        assert_eq!(got.items.len(), 1);
        assert_eq!(got.items[0].0, l);
    }

    #[test]
    fn a_full_bag_says_would_block() {
        let bag = Bag::new().unwrap();
        let _ = setsockopt(&bag.tx, sockopt::SndBuf, &4096usize);
        let (a, _b) = UnixStream::pair().unwrap();
        let l = label("x", a.as_fd());
        let item = [Item {
            label: &l,
            fd: a.as_fd(),
        }];
        let mut n = 0;
        let err = loop {
            match bag.put(&item) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 100_000, "never full");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(take_all(bag.rx()).items.len(), n);
    }

    #[test]
    fn a_message_without_its_lines_is_a_problem_not_a_panic() {
        let bag = Bag::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let fds = [a.as_raw_fd()];
        sendmsg::<()>(
            bag.tx.as_raw_fd(),
            &[IoSlice::new(b"garbage")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let got = take_all(bag.rx());
        assert!(got.items.is_empty());
        assert_eq!(got.problems.len(), 1, "{:?}", got.problems);
    }
}
