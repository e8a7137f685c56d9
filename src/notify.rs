//! Messages to the service manager (`sd_notify(3)`) and its file descriptor store.
//!
//! Every message is sent only when `NOTIFY_SOCKET` is set; a failure to send is logged, never
//! fatal. The store keeps anything only when the unit sets `FileDescriptorStoreMax=`.
//!
//! What each systemd version understands, and what is sent for it:
//!
//! | message | since | sent |
//! |---|---|---|
//! | `READY=1`, `MAINPID=`, `STOPPING=1`, `STATUS=`, `FDSTORE=1` | always | as the lifecycle needs |
//! | `RELOADING=1` with `MONOTONIC_USEC=` | 253 (`Type=notify-reload`) | when a fork/exec restart begins, in one message |
//! | `MAINPIDFD=1` with a pidfd | 257 | by a successor naming itself, next to `MAINPID=` |
//!
//! An older systemd ignores a field it does not know, so every message is sent to every version.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use sd_notify::NotifyState;

use crate::bag::{self, Bag, FileId, Item, Label, PER_MESSAGE};
use crate::registry::{Keep, Keeper, Kind};

/// Sends a notification to the service manager when `NOTIFY_SOCKET` is set; failures are
/// logged.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Whether a service manager is listening for notifications from this process.
pub(crate) fn notify_socket_set() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The message that starts a reload: `RELOADING=1` and `MONOTONIC_USEC=` (`CLOCK_MONOTONIC`
/// now, in microseconds), one datagram. systemd 253+ compares the timestamp with its own
/// `CLOCK_MONOTONIC` reading taken when it sent the reload signal, and ignores a `RELOADING=1`
/// without a timestamp at or after it. sd-notify 0.5 computes the timestamp right
/// (`tv_sec * 1_000_000 + tv_nsec / 1_000`; the mistake of sd-notify#11 was elsewhere) and sends
/// all the states of one call in one datagram.
pub(crate) fn reloading_states(status: &str) -> std::io::Result<[NotifyState<'_>; 3]> {
    Ok([
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now()?,
        NotifyState::Status(status),
    ])
}

/// Tells systemd a reload (a fork/exec restart) began now.
pub(crate) fn reloading(status: &str) {
    if !notify_socket_set() {
        return;
    }
    match reloading_states(status) {
        Ok(states) => notify(&states),
        Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
}

/// Ends a reload that did not hand over: `READY=1`, with why in `STATUS=`. Without it systemd
/// 253+ would keep the unit "reloading" (and `systemctl reload` waiting) for good.
pub(crate) fn reload_failed(reason: &str) {
    let status = format!("restart failed, still serving: {reason}").replace('\n', " ");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A successor's readiness: `READY=1` and `MAINPID=`, and, where a pidfd of this process can
/// be had, `MAINPIDFD=1` with it (systemd 257+ then follows this very process, whatever happens
/// to its PID; older ones ignore the field and close the descriptor). `extra` goes along.
pub(crate) fn ready_as_main_process(extra: &[NotifyState<'_>]) {
    let pid = std::process::id();
    let mut states = vec![NotifyState::Ready, NotifyState::MainPid(pid)];
    states.extend_from_slice(extra);
    match crate::inherit::pidfd_of_self() {
        Ok(pidfd) => {
            // MAINPIDFD=1 first, in its own message: systemd 257 takes the main process from
            // the pidfd; the next message's MAINPID= then names the same process (no change),
            // and READY=1 comes after it either way.
            let fd_states = [NotifyState::Custom("MAINPIDFD=1")];
            if let Err(e) = sd_notify::notify_with_fds(&fd_states, &[pidfd.as_fd()]) {
                tracing::debug!("cannot send MAINPIDFD=1: {e}");
            }
        }
        Err(e) => tracing::debug!("no pidfd of this process ({e}): MAINPID= only"),
    }
    notify(&states);
}

/// Puts one descriptor in systemd's store under `name` (`FDSTORE=1`); with `poll` false, systemd
/// does not drop it when it hangs up (`FDPOLL=0`). Whether the message was sent.
pub(crate) fn store_one(name: &str, fd: BorrowedFd<'_>, poll: bool) -> bool {
    let mut states = vec![NotifyState::FdStore, NotifyState::FdName(name)];
    if !poll {
        states.push(NotifyState::Custom("FDPOLL=0"));
    }
    match sd_notify::notify_with_fds(&states, &[fd]) {
        Ok(()) => {
            tracing::debug!(name, "stored in systemd's file descriptor store");
            true
        }
        Err(e) => {
            tracing::error!(name, "cannot store in systemd's file descriptor store: {e}");
            false
        }
    }
}

/// Drops every descriptor stored under `name` from systemd's store (`FDSTOREREMOVE=1`).
pub(crate) fn remove(name: &str) {
    notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}

/// Most descriptors in one bag: a message's worth, so that taking one out (which reads the bag
/// and puts the rest back) costs at most one message each way.
const BAG_CAPACITY: usize = PER_MESSAGE;

/// Connections go into bags; everything else is stored one descriptor per `FDSTORE=1` message.
fn goes_in_a_bag(kind: Kind) -> bool {
    matches!(kind, Kind::TcpStream | Kind::UnixStream)
}

/// systemd's file descriptor store, as the registry's keeper.
///
/// Listeners and other descriptors are stored by name, one per `FDSTORE=1` message, and
/// dropped with `FDSTOREREMOVE=1`. Connections (TCP and Unix stream sockets) go into bags
/// (see [`bag`]), at most [`BAG_CAPACITY`] per bag, so that systemd holds one descriptor per bag
/// instead of one per connection. Storing a socket that is already kept, under any name, adds
/// nothing (as in systemd's store). Discarding a connection reads its bag, closes the
/// connection, and puts the others back; during start-up (from [`Store::take_over`] to
/// [`Store::settle`]) that waits, so that each bag is read once for all the connections found
/// closed or not taken.
#[derive(Default)]
pub(crate) struct Store {
    bags: Mutex<Bags>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.lock();
        f.debug_struct("Store")
            .field("bags", &b.held.len())
            .field("connections", &b.member.len())
            .finish()
    }
}

#[derive(Default)]
struct Bags {
    /// The bags this process made, each in systemd's store.
    held: Vec<Held>,
    /// Start-up: discarded connections leave their bags at [`Store::settle`].
    deferring: bool,
    /// Bags (by serial number) holding connections discarded while deferring.
    dirty: std::collections::BTreeSet<u64>,
    /// Where each kept connection is: its bag's serial number, and its identity.
    member: HashMap<String, (u64, FileId)>,
    /// The kept connections by identity.
    ids: HashMap<FileId, String>,
    next_serial: u64,
}

struct Held {
    serial: u64,
    /// Its name in systemd's store.
    name: String,
    bag: Bag,
    /// Descriptors in its queue.
    count: usize,
    /// It refused a message: the next ones go into a new bag.
    full: bool,
}

impl Store {
    pub(crate) fn new() -> Store {
        Store::default()
    }

    fn lock(&self) -> MutexGuard<'_, Bags> {
        self.bags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names and bags of what this process keeps in bags (for tests).
    #[cfg(test)]
    fn kept(&self) -> (Vec<String>, usize) {
        let b = self.lock();
        let mut names: Vec<String> = b.member.keys().cloned().collect();
        names.sort();
        (names, b.held.len())
    }
}

impl Store {
    /// Takes over bags made at start-up (holding what the previous generation's bags held):
    /// stores each, and keeps its connections as if they had been put in here. Until
    /// [`settle`](Self::settle), a discarded connection stays in its bag.
    pub(crate) fn take_over(&self, made: Vec<(Bag, Vec<Label>)>) {
        let mut bags = self.lock();
        bags.deferring = true;
        for (bag, labels) in made {
            let Some(held) = bags.store_bag(bag) else {
                continue;
            };
            let serial = bags.held[held].serial;
            bags.held[held].count = labels.len();
            for label in labels {
                bags.ids.insert(label.id, label.name.clone());
                bags.member.insert(label.name, (serial, label.id));
            }
        }
    }
}

impl Store {
    /// Start-up is over: `unclaimed` connections (taken out of bags but not by the application)
    /// are discarded too, and every bag holding discarded connections is read once, closing
    /// them and putting the others back. From now on a discard does that at once.
    pub(crate) fn settle(&self, unclaimed: &[String]) {
        let mut bags = self.lock();
        for name in unclaimed {
            bags.remove(name);
        }
        bags.deferring = false;
        for serial in std::mem::take(&mut bags.dirty) {
            bags.compact(serial);
        }
    }
}

impl Keeper for Store {
    fn keep(&self, items: &[Keep<'_>]) -> Vec<bool> {
        let mut bags = self.lock();
        let mut held = vec![false; items.len()];
        let mut batch: Vec<(Label, BorrowedFd<'_>)> = Vec::new();
        let mut in_batch = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if !goes_in_a_bag(item.kind) {
                store_one(item.name, item.fd, true);
                continue;
            }
            let id = match FileId::of(item.fd) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(name = item.name, "cannot identify a connection: {e}");
                    store_one(item.name, item.fd, true);
                    continue;
                }
            };
            if let Some(already) = bags.ids.get(&id) {
                tracing::debug!(
                    name = item.name,
                    already = already.as_str(),
                    "already kept in systemd's file descriptor store"
                );
                held[i] = true;
                continue;
            }
            if bags.member.contains_key(item.name) {
                bags.remove(item.name);
            }
            bags.ids.insert(id, item.name.to_owned());
            batch.push((
                Label {
                    name: item.name.to_owned(),
                    kind: item.kind.code(),
                    id,
                },
                item.fd,
            ));
            in_batch.push(i);
        }
        let added = bags.add(&batch);
        for (i, added) in in_batch.into_iter().zip(added) {
            held[i] = added;
        }
        held
    }

    fn discard(&self, name: &str) {
        let mut bags = self.lock();
        if bags.member.contains_key(name) {
            bags.remove(name);
        } else {
            drop(bags);
            remove(name);
        }
    }
}

impl Bags {
    /// Puts `items` (not kept yet; their identities already in `ids`) into bags. For each,
    /// whether it went into a bag (else it was stored on its own).
    fn add(&mut self, items: &[(Label, BorrowedFd<'_>)]) -> Vec<bool> {
        let mut added = Vec::with_capacity(items.len());
        let mut rest = items;
        while !rest.is_empty() {
            let Some(i) = self.open_bag() else {
                // No bag can be made (out of descriptors?): store them one by one instead.
                for (label, fd) in rest {
                    self.ids.remove(&label.id);
                    store_one(&label.name, *fd, true);
                    added.push(false);
                }
                return added;
            };
            let held = &mut self.held[i];
            let n = rest.len().min(BAG_CAPACITY - held.count);
            let chunk: Vec<Item<'_>> = rest[..n]
                .iter()
                .map(|(label, fd)| Item { label, fd: *fd })
                .collect();
            match held.bag.put(&chunk) {
                Ok(()) => {
                    held.count += n;
                    let serial = held.serial;
                    for (label, _) in &rest[..n] {
                        self.member.insert(label.name.clone(), (serial, label.id));
                    }
                    tracing::debug!(bag = held.name, n, "connections put in a bag");
                    added.extend(std::iter::repeat_n(true, n));
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && held.count > 0 => {
                    held.full = true;
                }
                Err(e) => {
                    tracing::error!(
                        bag = held.name,
                        "cannot put {n} connections in a bag ({e}): storing them one by one"
                    );
                    held.full = true;
                    for (label, fd) in &rest[..n] {
                        self.ids.remove(&label.id);
                        store_one(&label.name, *fd, true);
                        added.push(false);
                    }
                    rest = &rest[n..];
                }
            }
        }
        added
    }

    /// A bag with room, made (and stored) if there is none.
    fn open_bag(&mut self) -> Option<usize> {
        if let Some(i) = self
            .held
            .iter()
            .rposition(|h| !h.full && h.count < BAG_CAPACITY)
        {
            return Some(i);
        }
        match Bag::new() {
            Ok(b) => self.store_bag(b),
            Err(e) => {
                tracing::error!("cannot make a bag for connections: {e}");
                None
            }
        }
    }

    /// Names `bag`, puts it in systemd's store and holds it; its index.
    fn store_bag(&mut self, bag: Bag) -> Option<usize> {
        let serial = self.next_serial;
        self.next_serial += 1;
        let name = format!("{}{}.{serial}", bag::NAME_PREFIX, std::process::id());
        // A datagram socket never hangs up; FDPOLL=0 tells systemd not to watch it anyway.
        if !store_one(&name, bag.rx(), false) {
            return None;
        }
        self.held.push(Held {
            serial,
            name,
            bag,
            count: 0,
            full: false,
        });
        Some(self.held.len() - 1)
    }

    /// Takes the connection `name` out of its bag (see [`compact`](Self::compact); while
    /// deferring, later).
    fn remove(&mut self, name: &str) {
        let Some((serial, id)) = self.member.remove(name) else {
            return;
        };
        if self.ids.get(&id).is_some_and(|n| n == name) {
            self.ids.remove(&id);
        }
        if self.deferring {
            self.dirty.insert(serial);
        } else {
            self.compact(serial);
        }
    }

    /// Reads the bag `serial`, closes every connection in it that is no longer kept, and puts
    /// the others back. An emptied bag leaves the store.
    fn compact(&mut self, serial: u64) {
        let Some(i) = self.held.iter().position(|h| h.serial == serial) else {
            return;
        };
        let contents = bag::take_all(self.held[i].bag.rx());
        for p in &contents.problems {
            tracing::error!(bag = self.held[i].name, "{p}");
        }
        let mut seen = std::collections::HashSet::new();
        let (live, gone): (Vec<(Label, OwnedFd)>, Vec<_>) =
            contents.items.into_iter().partition(|(label, _)| {
                self.member.get(&label.name) == Some(&(serial, label.id))
                    && seen.insert(label.name.clone())
            });
        drop(gone); // closed now: the peer of a discarded connection sees it end
        let held = &mut self.held[i];
        held.count = 0;
        held.full = false;
        if live.is_empty() {
            remove(&held.name);
            self.held.remove(i);
            return;
        }
        for chunk in live.chunks(PER_MESSAGE) {
            let items: Vec<Item<'_>> = chunk
                .iter()
                .map(|(label, fd)| Item {
                    label,
                    fd: fd.as_fd(),
                })
                .collect();
            match held.bag.put(&items) {
                Ok(()) => held.count += items.len(),
                Err(e) => {
                    // Not expected: the bag was just emptied. These leave the store.
                    tracing::error!(
                        bag = held.name,
                        "cannot put {} connections back in their bag ({e}): they are no longer kept",
                        items.len()
                    );
                    for (label, _) in chunk {
                        self.member.remove(&label.name);
                        self.ids.remove(&label.id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn keep(store: &Store, name: &str, s: &UnixStream) {
        assert_eq!(
            store.keep(&[Keep {
                name,
                kind: Kind::UnixStream,
                fd: s.as_fd(),
            }]),
            [true],
            "held by a bag"
        );
    }

    /// Without NOTIFY_SOCKET nothing reaches systemd, but the bags are made and filled.
    #[test]
    fn connections_fill_bags_and_leave_them_one_by_one() {
        let store = Store::new();
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..300).map(|_| UnixStream::pair().unwrap()).collect();
        let items: Vec<String> = (0..300).map(|i| format!("c.{i}")).collect();
        let keeps: Vec<Keep<'_>> = items
            .iter()
            .zip(&pairs)
            .map(|(name, (a, _))| Keep {
                name,
                kind: Kind::UnixStream,
                fd: a.as_fd(),
            })
            .collect();
        store.keep(&keeps);
        let (names, bags) = store.kept();
        assert_eq!(names.len(), 300);
        assert_eq!(bags, 2, "253 per bag");
        // The same socket under another name: not kept twice.
        keep(&store, "other", &pairs[7].0);
        assert_eq!(store.kept().0.len(), 300);

        // Discarding one closes it (the bag held the last copy) and keeps the others.
        let (a, mut b) = UnixStream::pair().unwrap();
        keep(&store, "leaving", &a);
        drop(a);
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        let open = b.read(&mut buf).unwrap_err();
        assert_eq!(
            open.kind(),
            std::io::ErrorKind::WouldBlock,
            "the bag holds it open"
        );
        store.discard("leaving");
        assert_eq!(b.read(&mut buf).unwrap(), 0, "the peer sees the end");
        assert_eq!(store.kept().0.len(), 300);

        for name in &items[..253] {
            store.discard(name);
        }
        let (names, bags) = store.kept();
        assert_eq!(names.len(), 47);
        assert_eq!(bags, 1, "the emptied bag is gone");
    }

    /// What a bag holds, read and put back (for tests).
    fn bag_names(store: &Store, i: usize) -> Vec<String> {
        let b = store.lock();
        let contents = bag::take_all(b.held[i].bag.rx());
        let items: Vec<Item<'_>> = contents
            .items
            .iter()
            .map(|(label, fd)| Item {
                label,
                fd: fd.as_fd(),
            })
            .collect();
        b.held[i].bag.put(&items).unwrap();
        let mut names: Vec<String> = contents.items.iter().map(|(l, _)| l.name.clone()).collect();
        names.sort();
        names
    }

    /// During start-up discarded connections stay in their bags, until `settle` reads each bag
    /// once (closing them, and those not taken).
    #[test]
    fn start_up_discards_wait_for_settle() {
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..10).map(|_| UnixStream::pair().unwrap()).collect();
        let labels: Vec<Label> = pairs
            .iter()
            .enumerate()
            .map(|(i, (a, _))| Label {
                name: format!("c.{i}"),
                kind: Kind::UnixStream.code(),
                id: FileId::of(a.as_fd()).unwrap(),
            })
            .collect();
        let made = Bag::new().unwrap();
        let items: Vec<Item<'_>> = labels
            .iter()
            .zip(&pairs)
            .map(|(label, (a, _))| Item {
                label,
                fd: a.as_fd(),
            })
            .collect();
        made.put(&items).unwrap();
        drop(items);
        let (held, peers): (Vec<UnixStream>, Vec<UnixStream>) = pairs.into_iter().unzip();
        drop(held); // the bag holds them now
        let store = Store::new();
        store.take_over(vec![(made, labels)]);
        store.discard("c.0");
        store.discard("c.1");
        assert_eq!(store.kept().0.len(), 8);
        assert_eq!(bag_names(&store, 0).len(), 10, "still in the bag");
        store.settle(&["c.2".to_owned(), "not-a-member".to_owned()]);
        assert_eq!(bag_names(&store, 0).len(), 7);
        let mut buf = [0u8; 1];
        for (i, mut p) in peers.into_iter().enumerate() {
            p.set_nonblocking(true).unwrap();
            let closed = matches!(p.read(&mut buf), Ok(0));
            assert_eq!(closed, i < 3, "client {i}");
        }
        // After start-up a discard takes effect at once.
        store.discard("c.3");
        assert_eq!(bag_names(&store, 0).len(), 6);
    }
}

#[cfg(test)]
mod reloading_tests {
    use super::*;

    fn clock_monotonic_usec() -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the one we pass.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
            0
        );
        i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1_000
    }

    #[test]
    fn reloading_is_one_message_with_a_fresh_monotonic_timestamp_in_microseconds() {
        let before = clock_monotonic_usec();
        let states = reloading_states("restarting").unwrap();
        let after = clock_monotonic_usec();
        // What sd_notify::notify puts in its one datagram: each state on its own line.
        let message: String = states.iter().map(|s| format!("{s}\n")).collect();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let stamp: i128 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC= in the same message")
            .parse()
            .expect("a whole number of microseconds");
        // Microseconds of CLOCK_MONOTONIC: not nanoseconds, not milliseconds, not wall time.
        assert!(
            before <= stamp && stamp <= after,
            "{before} <= {stamp} <= {after}"
        );
        assert_eq!(lines[2], "STATUS=restarting");
    }
}
