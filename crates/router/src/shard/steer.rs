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
//! that leaves with the last one. So when this router bound its listeners on an address
//! nobody else listened on (or every listener that was there before has left since) and none
//! of its own has left, its own hold indexes `0..ours` and every other listener comes after
//! them (`ours..total`). Only then does it steer ([`Group::steer_away`]; otherwise, as when a
//! router that took over is itself stopped while the one it took over from still runs, it
//! shuts its listeners down at once, as before). The program returns `max(ours, total -
//! ours)`: another router's listener while this router's listen, and past the end of the
//! array once they have left it (the array shrinks to `total - ours`), where the kernel goes
//! back to its usual hash over the group. The program belongs to the group and outlives this
//! router: a router that takes the address over later would have its first listener land on
//! that index and take every new connection, so a router started with `listen.takeover`
//! detaches whatever program is on the group as soon as it has bound ([`Group::bound`]).

use std::net::SocketAddr;
use std::os::unix::io::RawFd;
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
    use std::io::BufRead;
    let path = match addr {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    // Large reads: the kernel walks its tables anew for each read(2), and a socket that
    // comes or goes between two reads can shift the listing by a line.
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

/// This router's listening sockets on one client address, and what listened there before
/// them.
pub(crate) struct Group {
    pub(crate) addr: SocketAddr,
    /// This router's listening sockets on `addr`, one per shard, in the order they were bound.
    pub(crate) ours: Vec<RawFd>,
    /// The inodes of the other sockets that listened on `addr` when this router had bound its
    /// own (a router it took over from).
    before: Vec<u64>,
}

impl Group {
    /// Right after this router bound `ours` on `addr`: notes who listened there before, and,
    /// when a router did (a takeover), detaches the program its drain may leave on the group
    /// (see the module documentation). Best effort: a failure is logged.
    pub(crate) fn bound(addr: SocketAddr, ours: Vec<RawFd>) -> Group {
        let own: Vec<u64> = ours.iter().map(|&fd| socket_inode(fd)).collect();
        let before: Vec<u64> = listening_inodes(addr)
            .unwrap_or_default()
            .into_iter()
            .filter(|ino| !own.contains(ino))
            .collect();
        if let (Some(&fd), false) = (ours.first(), before.is_empty()) {
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
                tracing::warn!(%addr, "could not detach the steering program a drain left on the address: {e}");
            }
        }
        Group { addr, ours, before }
    }

    /// Attaches to the group a program that gives every new connection to a listener that is
    /// not this router's (see the module documentation). `Ok(None)` when no other socket
    /// listens on the address (nothing to steer to) or when the group's array may not hold
    /// this router's listeners first (one of them left it, or a listener that was there before
    /// them still listens). Otherwise the number of other listeners.
    pub(crate) fn steer_away(&self) -> std::io::Result<Option<usize>> {
        let n = self.ours.len();
        if n == 0 || !self.ours.iter().all(|&fd| listens_on(fd, self.addr)) {
            return Ok(None);
        }
        let own: Vec<u64> = self.ours.iter().map(|&fd| socket_inode(fd)).collect();
        let others: Vec<u64> = listening_inodes(self.addr)?
            .into_iter()
            .filter(|ino| !own.contains(ino))
            .collect();
        if others.is_empty() || others.iter().any(|ino| self.before.contains(ino)) {
            return Ok(None);
        }
        let mut prog = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: n.max(others.len()) as u32,
        }];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies the
        // program.
        let rc = unsafe {
            libc::setsockopt(
                self.ours[0],
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_CBPF,
                std::ptr::addr_of!(fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(others.len()))
    }
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

    /// Two old listeners and one new: with the steering every new connection goes to the new
    /// one (by the kernel's hash alone, each would take a third of 60: all 60 on the new one
    /// has a chance of 3^-60). Once the old ones are shut down the program steers nothing
    /// (its index is past the end of the group). A third router that takes over later (its
    /// first listener lands on the program's index) detaches it: both routers share again.
    #[test]
    fn new_connections_go_to_the_other_router_and_are_shared_again_after() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let o2 = listener(addr);
        let old = Group::bound(addr, vec![o1.as_raw_fd(), o2.as_raw_fd()]);
        let n1 = listener(addr);
        let n2 = listener(addr);
        let new = Group::bound(addr, vec![n1.as_raw_fd(), n2.as_raw_fd()]);
        assert_eq!(old.steer_away().unwrap(), Some(2));
        assert_eq!(spread(addr, &[&o1, &o2, &n1, &n2], 60)[..2], [0, 0]);
        for &fd in &old.ours {
            assert!(shut_down(fd, addr).unwrap());
        }
        assert!(!shut_down(o1.as_raw_fd(), addr).unwrap(), "already shut");
        let got = spread(addr, &[&n1, &n2], 64);
        assert_eq!(got.iter().sum::<usize>(), 64, "{got:?}");
        assert!(got.iter().all(|&g| g > 0), "one listener took all: {got:?}");
        // The next takeover: its first listener is at index 2, the program's.
        let t1 = listener(addr);
        let _third = Group::bound(addr, vec![t1.as_raw_fd()]);
        let got = spread(addr, &[&n1, &n2, &t1], 60);
        assert!(got.iter().all(|&g| g > 0), "pinned: {got:?}");
        drop(new);
    }

    /// More new listeners than old: the program's index is one the group loses when the old
    /// router's listener leaves, so the new router's listeners share connections after it.
    #[test]
    fn a_new_router_with_more_shards_is_not_pinned_to_one_of_them() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let old = Group::bound(addr, vec![o1.as_raw_fd()]);
        let (n1, n2) = (listener(addr), listener(addr));
        assert_eq!(old.steer_away().unwrap(), Some(2));
        assert_eq!(spread(addr, &[&o1, &n1, &n2], 30), vec![0, 0, 30]);
        assert!(shut_down(o1.as_raw_fd(), addr).unwrap());
        let got = spread(addr, &[&n1, &n2], 64);
        assert!(got.iter().all(|&g| g > 0), "one listener took all: {got:?}");
    }

    /// A router that took over and is stopped while the one before it still listens (a
    /// rollback) does not steer: its listeners are not first in the group's array, and the
    /// program's index would name one of its own.
    #[test]
    fn no_steering_by_a_router_whose_predecessor_still_listens() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let n1 = listener(addr);
        let new = Group::bound(addr, vec![n1.as_raw_fd()]);
        assert_eq!(new.steer_away().unwrap(), None);
        drop(o1);
        // Once the one before has gone and a third took over, it may.
        let t1 = listener(addr);
        assert_eq!(new.steer_away().unwrap(), Some(1));
        assert_eq!(spread(addr, &[&n1, &t1], 20), vec![0, 20]);
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
