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
//! keeps that array packed in the order the sockets started listening: this router bound its
//! own first (indexes `0..ours`), the router that took over appended its own after them
//! (`ours..total`). The program returns `max(ours, total - ours)`: a listener of the new
//! router while both listen, and past the end of the array once this router's have left it
//! (the array shrinks to the new router's `total - ours`), where the kernel goes back to its
//! usual hash over the group. So the program, which stays attached to the group after this
//! router is gone, steers nothing afterwards: the new router's shards share connections as
//! before. An index past the end during the drain (an array not laid out as assumed) only
//! means the kernel's hash picks, as it did without steering.

use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::time::Duration;

/// How long a draining router that steered its new connections away goes on accepting on its
/// own listeners before it shuts them down: a handshake that began on one of them before the
/// steering ends within a round trip (microseconds on loopback, up to a few hundred
/// milliseconds across the internet; one that ends after the shutdown is moved to the new
/// router by the kernel, `net.ipv4.tcp_migrate_req`).
pub(crate) const SETTLE: Duration = Duration::from_millis(200);

/// `SO_ATTACH_REUSEPORT_CBPF` from `asm-generic/socket.h` (x86-64, arm64, riscv; the libc
/// crate exports it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

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

/// Whether `fd` is a listening socket bound to `addr` (a descriptor number may have been
/// closed and reused by another socket since it was bound).
pub(crate) fn listens_on(fd: RawFd, addr: SocketAddr) -> bool {
    // SAFETY: borrowed for these calls only; never closed here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    sock.is_listener().unwrap_or(false)
        && sock.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr)
}

/// Attaches to the SO_REUSEPORT group of `addr` a program that gives every new connection to
/// a listener that is not one of `ours` (this router's listening sockets on `addr`; see the
/// module documentation). `Ok(None)` when no other socket listens on `addr` (no router took
/// it over): nothing to steer to. Otherwise the number of other listeners.
pub(crate) fn steer_away(ours: &[RawFd], addr: SocketAddr) -> std::io::Result<Option<usize>> {
    let live: Vec<RawFd> = ours
        .iter()
        .copied()
        .filter(|&fd| listens_on(fd, addr))
        .collect();
    let Some(&first) = live.first() else {
        return Ok(None);
    };
    let own: Vec<u64> = live.iter().map(|&fd| socket_inode(fd)).collect();
    let others = listening_inodes(addr)?
        .into_iter()
        .filter(|ino| !own.contains(ino))
        .count();
    if others == 0 {
        return Ok(None);
    }
    let index = live.len().max(others) as u32;
    let mut prog = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            first,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(others))
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
        let l6 = listener("[::1]:0".parse().unwrap());
        let six = port_of(&l6);
        assert_eq!(listening_inodes(six).unwrap(), vec![ino(&l6)], "{six}");
    }

    /// Two old listeners and one new: with the steering every new connection goes to the new
    /// one (by the kernel's hash alone, each would take a third of 60: all 60 on the new one
    /// has a chance of 3^-60). Once the old ones are shut down the program steers nothing
    /// (its index is past the end of the group).
    #[test]
    fn new_connections_go_to_the_other_router_and_are_shared_again_after() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let o2 = listener(addr);
        let n1 = listener(addr);
        let ours = [o1.as_raw_fd(), o2.as_raw_fd()];
        assert_eq!(steer_away(&ours, addr).unwrap(), Some(1));
        assert_eq!(spread(addr, &[&o1, &o2, &n1], 60), vec![0, 0, 60]);
        // A second listener of the new router joins; the old ones leave.
        let n2 = listener(addr);
        for fd in ours {
            assert!(shut_down(fd, addr).unwrap());
        }
        assert!(!shut_down(o1.as_raw_fd(), addr).unwrap(), "already shut");
        let got = spread(addr, &[&n1, &n2], 64);
        assert_eq!(got.iter().sum::<usize>(), 64, "{got:?}");
        assert!(got.iter().all(|&g| g > 0), "one listener took all: {got:?}");
    }

    /// More new listeners than old: the program's index is one the group loses when the old
    /// router's listener leaves, so the new router's listeners share connections after it.
    #[test]
    fn a_new_router_with_more_shards_is_not_pinned_to_one_of_them() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        let (n1, n2) = (listener(addr), listener(addr));
        assert_eq!(steer_away(&[o1.as_raw_fd()], addr).unwrap(), Some(2));
        assert_eq!(spread(addr, &[&o1, &n1, &n2], 30)[0], 0);
        assert!(shut_down(o1.as_raw_fd(), addr).unwrap());
        let got = spread(addr, &[&n1, &n2], 64);
        assert!(got.iter().all(|&g| g > 0), "one listener took all: {got:?}");
    }

    #[test]
    fn nothing_to_steer_to_without_another_listener() {
        let o1 = listener("127.0.0.1:0".parse().unwrap());
        let addr = port_of(&o1);
        assert_eq!(steer_away(&[o1.as_raw_fd()], addr).unwrap(), None);
        assert!(shut_down(o1.as_raw_fd(), addr).unwrap());
        assert_eq!(steer_away(&[o1.as_raw_fd()], addr).unwrap(), None);
    }
}
