//! Steering new client connections to a router that took the addresses over, before a
//! draining router shuts its listeners down.
//!
//! Every api listener is bound with SO_REUSEPORT, and a router started with
//! `listen.takeover` joins the running router's SO_REUSEPORT group on each address. When the
//! old router shuts a listener down, the kernel moves the connections waiting in its accept
//! queue to another listener of the group (`net.ipv4.tcp_migrate_req`). One case is not
//! covered: a handshake whose last ACK the kernel is processing on another CPU while the
//! listener shuts down finds it closed and is answered with a reset (the client's `connect`
//! fails with "connection reset by peer"; one request in about ten CI runs of
//! `federation::takeover_of_a_router_under_load_fails_no_request` did). So a draining router
//! first attaches a classic BPF program to the group (`SO_ATTACH_REUSEPORT_CBPF`) that picks a
//! listener of the other router for every new connection, waits [`SETTLE`] for the
//! handshakes already under way on its own listeners to end (it still accepts and serves
//! them), and only then shuts them down: nothing is arriving on them any more.
//!
//! The program returns an index into the group's array of listening sockets. The kernel
//! appends a socket that starts listening at the end of the array and fills the slot of one
//! that leaves with the last one. So once this router's listeners have been alone on the
//! address (at once when it bound on a free address; after a takeover, when every listener of
//! the router it took over from had left and no other had joined yet), and as long as none of
//! them has left, they hold indexes `0..ours` and every other listener comes after them
//! (`ours..total`). [`Group::bound`] watches for that moment (a thread reading `/proc/net/tcp`
//! every [`ALONE_POLL`] until the listeners there before have all left). A router steers
//! ([`Group::steer_away`]) only when it knows that; otherwise (a router that took over and is
//! stopped while the one before it still runs; a third router that bound before the first had
//! left) it shuts its listeners down at once, as before. The program picks one of
//! `ours..total` at random, so the other listeners share the new connections. It belongs to
//! the group and outlives this router: the router that took over detaches it once the router
//! before it has left, whether or not it then listens alone. While the draining router's
//! listeners leave one by one (microseconds apart), an index past the end of the shrinking
//! array makes the kernel fall back to its hash, which may still pick one of the listeners
//! not yet shut down. `/proc/net/tcp` is not a snapshot (a listener that comes or goes while it
//! is read can make the walk skip a line): it is read twice and the results united, which
//! makes a wrong "alone" unlikely, not impossible.

use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a draining router that steered its new connections away goes on accepting on its
/// own listeners before it shuts them down: a handshake that began on one of them before the
/// steering ends within a round trip (microseconds on loopback, up to a few hundred
/// milliseconds across the internet; one that ends after the shutdown is moved to the new
/// router by the kernel, `net.ipv4.tcp_migrate_req`).
pub(crate) const SETTLE: Duration = Duration::from_millis(200);

/// `SO_ATTACH_REUSEPORT_CBPF` and `SO_DETACH_REUSEPORT_BPF` from `asm-generic/socket.h`
/// (x86-64, arm64, riscv; not mips, sparc, parisc, alpha). The libc crate keeps its copies
/// private on glibc targets.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// The inode of socket `fd` (what `/proc/net/tcp` lists), 0 when unknown.
pub(crate) fn socket_inode(fd: RawFd) -> u64 {
    // SAFETY: fstat fills the zeroed struct it is given; fd is a descriptor we hold.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 {
            st.st_ino
        } else {
            0
        }
    }
}

/// The inodes of the sockets listening on exactly `addr` in this network namespace, every
/// process's (the members of its SO_REUSEPORT group), from `/proc/net/tcp` or
/// `/proc/net/tcp6`. Listening sockets come first in the table (the kernel walks its
/// listening hash before the established one): the read stops at the first line in another
/// state, so a router with many connections does not read them all.
pub(crate) fn listening_inodes(addr: SocketAddr) -> std::io::Result<Vec<u64>> {
    // The table is not a snapshot: a socket that comes or goes while it is read can shift
    // the kernel's walk by a line, so a listener may be missed. Two reads, united.
    let mut found = listening_inodes_once(addr)?;
    found.extend(listening_inodes_once(addr)?);
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

fn listening_inodes_once(addr: SocketAddr) -> std::io::Result<Vec<u64>> {
    use std::io::BufRead;
    let path = match addr {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    // Large reads: the kernel walks its tables anew for each read(2).
    let f = std::io::BufReader::with_capacity(64 << 10, std::fs::File::open(path)?);
    let mut found = Vec::new();
    for line in f.lines().skip(1) {
        let line = line?;
        match listener_line(&line, addr) {
            Some(Some(ino)) => found.push(ino),
            Some(None) => {}
            None => break,
        }
    }
    Ok(found)
}

/// One line of `/proc/net/tcp` (or `tcp6`): `sl local_address rem_address st ... inode`, the
/// address as the kernel's 32-bit words in hex, in host order, then `:` and the port in hex;
/// state `0A` is LISTEN. `None` for a line not in LISTEN (or unreadable), `Some(None)` for a
/// listener on another address, `Some(Some(inode))` for one on `addr`.
fn listener_line(line: &str, addr: SocketAddr) -> Option<Option<u64>> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
    if *state != "0A" {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let mut bytes = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let w = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    let want: Vec<u8> = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let ours = u16::from_str_radix(port, 16).ok()? == addr.port() && bytes == want;
    Some(ours.then(|| inode.parse().ok()).flatten())
}

/// Whether `fd` is a listening socket (not yet shut down).
pub(crate) fn is_listening(fd: RawFd) -> bool {
    // SAFETY: borrowed for this call only; never closed here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).is_listener().unwrap_or(false)
}

/// Whether `fd` is a listening socket bound to `addr` (a descriptor number may have been
/// closed and reused by another socket since it was bound).
pub(crate) fn listens_on(fd: RawFd, addr: SocketAddr) -> bool {
    if !is_listening(fd) {
        return false;
    }
    // SAFETY: borrowed for this call only; never closed here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        == Some(addr)
}

/// This router's listening sockets on one client address, and whether they are known to come
/// first in the group's array.
#[derive(Clone)]
pub(crate) struct Group {
    pub(crate) addr: SocketAddr,
    /// This router's listening sockets on `addr`, one per shard.
    pub(crate) ours: Vec<RawFd>,
    /// Their inodes (what `/proc/net/tcp` lists), sorted.
    own: Vec<u64>,
    /// Set once a look at `/proc/net/tcp` found this router's listeners alone on `addr` (at
    /// once when it bound on a free address; after a takeover, once every listener of the
    /// router it took over from has left, before any other joined): from then on they hold
    /// the first indexes of the group's array, whatever joins later.
    first: Arc<AtomicBool>,
    /// Set when the watcher of a takeover's group ended (tests wait on it).
    #[cfg_attr(not(test), allow(dead_code))]
    watched: Arc<AtomicBool>,
}

/// How often a router that took an address over looks whether it listens alone on it yet
/// (one read of the listening part of `/proc/net/tcp`). A router that takes over in the same
/// interval as the one before leaves is not told apart from one that took over earlier: the
/// router in the middle then does not steer at its drain.
const ALONE_POLL: Duration = Duration::from_millis(10);

impl Group {
    /// Right after this router bound `ours` on `addr`. With other listeners there (a
    /// takeover), a thread looks every [`ALONE_POLL`] until this router's are alone (or one of
    /// them stops listening: a drain, a dead shard), then detaches the program the drain of the
    /// router before may have left on the group, which would otherwise keep steering (see the
    /// module documentation), and marks the group `first`.
    pub(crate) fn bound(addr: SocketAddr, ours: Vec<RawFd>) -> Group {
        let mut own: Vec<u64> = ours.iter().map(|&fd| socket_inode(fd)).collect();
        own.sort_unstable();
        let g = Group {
            addr,
            ours,
            own,
            first: Arc::new(AtomicBool::new(false)),
            watched: Arc::new(AtomicBool::new(false)),
        };
        if g.alone() == Some(true) {
            // A program left by a router that drained before this one bound (its group may
            // live on in a listener that was closing) would steer this one's connections.
            g.detach();
            g.first.store(true, Ordering::Release);
            g.watched.store(true, Ordering::Release);
            return g;
        }
        let before: Vec<u64> = listening_inodes(addr)
            .unwrap_or_default()
            .into_iter()
            .filter(|ino| !g.own.contains(ino))
            .collect();
        let w = g.clone();
        let spawned = std::thread::Builder::new()
            .name("fedbus-steer".into())
            .spawn(move || {
                w.watch(&before);
                w.watched.store(true, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(%addr, "no thread to watch the address (new connections will not be steered at the drain): {e}");
        }
        g
    }

    /// The watcher of a takeover's group: looks until the listeners there before ours
    /// (`before`) have all left, or one of ours stops listening (a drain, a dead shard). Every
    /// [`ALONE_POLL`] for the first minute (a drain lasts that long at most by default), then
    /// once a second (a router taken over that is kept running, a rollback).
    fn watch(&self, before: &[u64]) {
        let start = std::time::Instant::now();
        while self.ours.iter().all(|&fd| listens_on(fd, self.addr)) {
            let listening = listening_inodes(self.addr);
            let wait = match &listening {
                Ok(l) if !l.iter().any(|i| before.contains(i)) => {
                    // The router taken over has left: its drain's program goes with it,
                    // steering or not.
                    self.detach();
                    if l.iter().all(|i| self.own.contains(i)) {
                        self.first.store(true, Ordering::Release);
                        tracing::info!(addr = %self.addr, "listening alone on the address: the router taken over has left it");
                    } else {
                        tracing::info!(addr = %self.addr, "another router listened on the address before the one taken over had left: this router will not steer new connections at its drain");
                    }
                    return;
                }
                // Still there, or /proc unreadable for a moment (EMFILE under load): again.
                _ if start.elapsed() < Duration::from_secs(60) => ALONE_POLL,
                _ => Duration::from_secs(1),
            };
            std::thread::sleep(wait);
        }
    }

    /// Whether this router's listeners are the only ones on the address (None: unreadable).
    fn alone(&self) -> Option<bool> {
        // Sorted and without repeats, as `own`.
        Some(listening_inodes(self.addr).ok()? == self.own)
    }

    /// Detaches the group's program, if any (best effort: logged).
    fn detach(&self) {
        let Some(&fd) = self.ours.first() else { return };
        // The kernel wants an int it does not look at (any shorter option is EINVAL).
        let unused: libc::c_int = 0;
        // SAFETY: setsockopt reads `unused`, alive for the call, on a descriptor we hold.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_DETACH_REUSEPORT_BPF,
                std::ptr::addr_of!(unused).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let e = std::io::Error::last_os_error();
        if rc != 0 && e.raw_os_error() != Some(libc::ENOENT) {
            tracing::warn!(addr = %self.addr, "could not detach the steering program a drain left on the address: {e}");
        }
    }

    /// Attaches to the group a program that gives every new connection to one of the other
    /// listeners, picked at random (see the module documentation). `Ok(None)` when no other
    /// socket listens on the address (nothing to steer to) or when the group's array may not
    /// hold this router's listeners first (not yet seen alone on the address, or one of them
    /// left it). Otherwise the number of other listeners.
    pub(crate) fn steer_away(&self) -> std::io::Result<Option<usize>> {
        let n = self.ours.len();
        if n == 0
            || !self.first.load(Ordering::Acquire)
            || !self.ours.iter().all(|&fd| listens_on(fd, self.addr))
        {
            return Ok(None);
        }
        let others = listening_inodes(self.addr)?
            .into_iter()
            .filter(|ino| !self.own.contains(ino))
            .count();
        if others == 0 {
            return Ok(None);
        }
        attach(self.ours[0], n as u32, others as u32)?;
        Ok(Some(others))
    }
}

/// Attaches `A = random % count + base; return A` to `fd`'s SO_REUSEPORT group: every new
/// connection goes to one of the listeners at indexes `base..base + count`, at random.
fn attach(fd: RawFd, base: u32, count: u32) -> std::io::Result<()> {
    // Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const ALU_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
    const ALU_ADD_K: u16 = 0x04; // BPF_ALU | BPF_ADD | BPF_K
    const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    const SKF_AD_RANDOM: u32 = 0xffff_f000 + 56; // SKF_AD_OFF (-0x1000) + SKF_AD_RANDOM
    let op = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog = [
        op(LD_W_ABS, SKF_AD_RANDOM),
        op(ALU_MOD_K, count.max(1)),
        op(ALU_ADD_K, base),
        op(RET_A, 0),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Shuts the listening socket `fd` down (if it still is one, on `addr`): the kernel takes it
/// out of its tables and hands its accept queue to the rest of its SO_REUSEPORT group. The
/// descriptor stays open, its owner's to close. False when it was not listening on `addr`.
pub(crate) fn shut_down(fd: RawFd, addr: SocketAddr) -> std::io::Result<bool> {
    if !listens_on(fd, addr) {
        return Ok(false);
    }
    // SAFETY: as in `listens_on`.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};
    use std::os::unix::io::AsRawFd;
    use std::time::Instant;

    fn listener(addr: SocketAddr) -> Socket {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(128).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// Opens `n` connections to `addr`, then counts how many each listener accepts (waiting
    /// until all `n` are accepted, or 5 s).
    fn spread(addr: SocketAddr, ls: &[&Socket], n: usize) -> Vec<usize> {
        let conns: Vec<_> = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut got = vec![0; ls.len()];
        let start = Instant::now();
        while got.iter().sum::<usize>() < n && start.elapsed() < Duration::from_secs(5) {
            for (i, l) in ls.iter().enumerate() {
                while l.accept().is_ok() {
                    got[i] += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(conns);
        got
    }

    fn port_of(s: &Socket) -> SocketAddr {
        s.local_addr().unwrap().as_socket().unwrap()
    }

    #[test]
    fn listeners_are_found_by_exact_address() {
        let a = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&a);
        let ino = |s: &Socket| socket_inode(s.as_raw_fd());
        assert_eq!(
            listening_inodes(addr).unwrap(),
            vec![ino(&a)],
            "{addr} alone"
        );
        let b = listener(addr);
        let mut both = listening_inodes(addr).unwrap();
        both.sort();
        let mut want = vec![ino(&a), ino(&b)];
        want.sort();
        assert_eq!(both, want, "{addr} twice");
        let mut other = addr;
        other.set_ip("127.0.0.2".parse().unwrap());
        assert_eq!(
            listening_inodes(other).unwrap(),
            Vec::<u64>::new(),
            "{other}"
        );
        if ipv6_loopback() {
            let l6 = listener("[::1]:0".parse().unwrap());
            let six = port_of(&l6);
            assert_eq!(listening_inodes(six).unwrap(), vec![ino(&l6)], "{six}");
        }
    }

    fn ipv6_loopback() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    /// Waits until `g` knows its listeners come first (its watcher saw them alone).
    fn wait_first(g: &Group) {
        let start = Instant::now();
        while !g.first.load(Ordering::Acquire) {
            assert!(start.elapsed() < Duration::from_secs(5), "never alone");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Two old listeners and two new: with the steering every new connection goes to one of
    /// the new ones, picked at random (by the kernel's hash alone, the old ones would take half
    /// of 60: none at all has a chance of 2^-60). Once the old ones are shut down, the new
    /// router detaches the program (its watcher saw it alone): both share again, and so do they
    /// with a third router that takes over later.
    #[test]
    fn new_connections_go_to_the_other_router_and_are_shared_again_after() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let o2 = listener(addr);
        let old = Group::bound(addr, vec![o1.as_raw_fd(), o2.as_raw_fd()]);
        let n1 = listener(addr);
        let n2 = listener(addr);
        let new = Group::bound(addr, vec![n1.as_raw_fd(), n2.as_raw_fd()]);
        assert_eq!(
            new.steer_away().unwrap(),
            None,
            "the old router still listens"
        );
        assert_eq!(old.steer_away().unwrap(), Some(2));
        let got = spread(addr, &[&o1, &o2, &n1, &n2], 60);
        assert_eq!(got[..2], [0, 0], "{got:?}");
        assert!(got[2] > 0 && got[3] > 0, "not spread: {got:?}");
        for &fd in &old.ours {
            assert!(shut_down(fd, addr).unwrap());
        }
        assert!(!shut_down(o1.as_raw_fd(), addr).unwrap(), "already shut");
        wait_first(&new);
        let got = spread(addr, &[&n1, &n2], 64);
        assert_eq!(got.iter().sum::<usize>(), 64, "{got:?}");
        assert!(got.iter().all(|&g| g > 0), "one listener took all: {got:?}");
        let t1 = listener(addr);
        let _third = Group::bound(addr, vec![t1.as_raw_fd()]);
        let got = spread(addr, &[&n1, &n2, &t1], 60);
        assert!(got.iter().all(|&g| g > 0), "pinned: {got:?}");
    }

    /// One old listener, one new: the program (index 1) would send every connection to a
    /// third router's first listener (index 1 once the old one has left) had the new router
    /// not detached it when it found itself alone.
    #[test]
    fn the_program_is_detached_before_the_next_takeover() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let old = Group::bound(addr, vec![o1.as_raw_fd()]);
        let n1 = listener(addr);
        let new = Group::bound(addr, vec![n1.as_raw_fd()]);
        assert_eq!(old.steer_away().unwrap(), Some(1));
        assert_eq!(spread(addr, &[&o1, &n1], 20), vec![0, 20]);
        assert!(shut_down(o1.as_raw_fd(), addr).unwrap());
        wait_first(&new);
        let t1 = listener(addr);
        let got = spread(addr, &[&n1, &t1], 60);
        assert!(got.iter().all(|&g| g > 0), "pinned: {got:?}");
    }

    /// More new listeners than old: all of them get connections during the drain, and share
    /// them after it.
    #[test]
    fn a_new_router_with_more_shards_is_not_pinned_to_one_of_them() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let old = Group::bound(addr, vec![o1.as_raw_fd()]);
        let (n1, n2, n3) = (listener(addr), listener(addr), listener(addr));
        let new = Group::bound(addr, vec![n1.as_raw_fd(), n2.as_raw_fd(), n3.as_raw_fd()]);
        assert_eq!(old.steer_away().unwrap(), Some(3));
        let got = spread(addr, &[&o1, &n1, &n2, &n3], 60);
        assert_eq!(got[0], 0, "{got:?}");
        assert!(got[1..].iter().all(|&g| g > 0), "not spread: {got:?}");
        assert!(shut_down(o1.as_raw_fd(), addr).unwrap());
        wait_first(&new);
        let got = spread(addr, &[&n1, &n2, &n3], 60);
        assert!(got.iter().all(|&g| g > 0), "one listener took all: {got:?}");
    }

    /// A router that took over and is stopped while the one before it still listens (a
    /// rollback) does not steer: its listeners are not first in the group's array, and the
    /// program would name its own. Once it has been alone on the address it may.
    #[test]
    fn no_steering_by_a_router_whose_predecessor_still_listens() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let n1 = listener(addr);
        let new = Group::bound(addr, vec![n1.as_raw_fd()]);
        assert_eq!(new.steer_away().unwrap(), None);
        drop(o1);
        wait_first(&new);
        let t1 = listener(addr);
        assert_eq!(new.steer_away().unwrap(), Some(1));
        assert_eq!(spread(addr, &[&n1, &t1], 20), vec![0, 20]);
    }

    /// A third router took over before the first one left: when the first leaves, the kernel
    /// moves the third's listener ahead of the second's in the array, so the second, never
    /// seen alone, does not steer.
    #[test]
    fn no_steering_when_another_joined_before_the_one_before_left() {
        let a1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&a1);
        let b1 = listener(addr);
        let b = Group::bound(addr, vec![b1.as_raw_fd()]);
        let c1 = listener(addr);
        drop(a1);
        let start = Instant::now();
        while !b.watched.load(Ordering::Acquire) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the watcher never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!b.first.load(Ordering::Acquire));
        assert_eq!(b.steer_away().unwrap(), None);
        assert_eq!(listening_inodes(addr).unwrap().len(), 2);
        drop(c1);
    }

    /// One of the router's own listeners has left (a dead shard): the array may hold another
    /// router's listener in its place, so it does not steer.
    #[test]
    fn no_steering_once_one_of_ours_has_left() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let o2 = listener(addr);
        let old = Group::bound(addr, vec![o1.as_raw_fd(), o2.as_raw_fd()]);
        let _n1 = listener(addr);
        assert!(shut_down(o1.as_raw_fd(), addr).unwrap());
        assert_eq!(old.steer_away().unwrap(), None);
    }

    #[test]
    fn nothing_to_steer_to_without_another_listener() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let old = Group::bound(addr, vec![o1.as_raw_fd()]);
        assert_eq!(old.steer_away().unwrap(), None);
        if ipv6_loopback() {
            let l6 = listener("[::1]:0".parse().unwrap());
            let six = port_of(&l6);
            let g = Group::bound(six, vec![l6.as_raw_fd()]);
            let _n6 = listener(six);
            assert_eq!(g.steer_away().unwrap(), Some(1));
        }
    }
}
