//! A one-hop HTTP answerer on raw io_uring, to measure what the receive path of the router's
//! client sockets would save with io_uring features glommio 0.9 does not express. It answers
//! every request itself (the body echoed, like nginx `return 200` answers alone): no task hop,
//! no routing; only the socket work differs between the modes, which is what is measured.
//!
//! ```text
//! uring-proto MODE ADDR
//!   poll            glommio's shape: a one-shot POLL_ADD per read, then recv(2) and send(2)
//!   multishot       one multishot RECV per connection into a provided buffer ring, send(2)
//!   multishot-send  the same, and the answer as an io_uring SEND (no syscall per request)
//! ```
//!
//! One thread; run it pinned (`taskset -c 1`). Prints `ready <addr>` once listening.
//! `benches/cpu-per-request.sh` with `URING_PROTO=1` builds it and adds a row per mode.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};

const ACCEPT: u64 = 1;
const POLL: u64 = 2;
const RECV: u64 = 3;
const SEND: u64 = 4;

const BGID: u16 = 7;
const BUFS: u16 = 1024;
const BUF_SIZE: usize = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Poll,
    Multishot,
    MultishotSend,
}

#[derive(Default)]
struct Conn {
    /// Bytes read and not yet answered.
    input: Vec<u8>,
    /// An answer handed to an io_uring SEND (multishot-send), kept until it completes.
    sending: Vec<u8>,
    /// Answers made while a SEND was in flight.
    queued: Vec<u8>,
}

fn ud(kind: u64, fd: RawFd) -> u64 {
    (kind << 32) | fd as u32 as u64
}

/// The provided buffers and their ring (kernel 5.19+).
struct BufRing {
    ring: *mut types::BufRingEntry,
    mem: Vec<u8>,
    tail: u16,
}

impl BufRing {
    fn new(ring: &IoUring) -> io::Result<BufRing> {
        let bytes = BUFS as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping, page aligned as the kernel wants.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut b = BufRing {
            ring: p.cast(),
            mem: vec![0u8; BUFS as usize * BUF_SIZE],
            tail: 0,
        };
        for bid in 0..BUFS {
            b.give(bid);
        }
        b.publish();
        // SAFETY: the mapping lives as long as the process (never unmapped).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(p as u64, BUFS, BGID, 0)?;
        }
        Ok(b)
    }

    fn buf(&self, bid: u16) -> &[u8] {
        &self.mem[bid as usize * BUF_SIZE..(bid as usize + 1) * BUF_SIZE]
    }

    /// Puts buffer `bid` back at the tail (visible to the kernel after `publish`).
    fn give(&mut self, bid: u16) {
        let addr = self.mem.as_ptr() as u64 + bid as u64 * BUF_SIZE as u64;
        // SAFETY: the index is masked into the ring.
        let e = unsafe { &mut *self.ring.add((self.tail & (BUFS - 1)) as usize) };
        e.set_addr(addr);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field of the ring's first entry, written with release ordering.
        unsafe {
            let t = types::BufRingEntry::tail(self.ring) as *const std::sync::atomic::AtomicU16;
            (*t).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Answers every complete request at the front of `input` into `out`; leaves a partial one.
fn answer(input: &mut Vec<u8>, out: &mut Vec<u8>) {
    let mut at = 0;
    loop {
        let rest = &input[at..];
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            break;
        };
        let head = &rest[..end];
        let cl = content_length(head);
        let total = end + 4 + cl;
        if rest.len() < total {
            break;
        }
        let body = &rest[end + 4..total];
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: ",
        );
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        at += total;
    }
    input.drain(..at);
}

fn content_length(head: &[u8]) -> usize {
    for line in head.split(|&b| b == b'\n') {
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            let v = std::str::from_utf8(&line[15..]).unwrap_or("").trim();
            return v.parse().unwrap_or(0);
        }
    }
    0
}

/// send(2) until all of `out` is written (a blocking wait on POLLOUT if the socket is full:
/// answers here are small, so it does not happen at 1 in flight).
fn send_all(fd: RawFd, mut out: &[u8]) -> bool {
    while !out.is_empty() {
        // SAFETY: a valid buffer and length.
        let n = unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                unsafe { libc::poll(&mut p, 1, 1000) };
                continue;
            }
            return false;
        }
        out = &out[n as usize..];
    }
    true
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = match args.get(1).map(String::as_str) {
        Some("poll") => Mode::Poll,
        Some("multishot") => Mode::Multishot,
        Some("multishot-send") => Mode::MultishotSend,
        _ => {
            eprintln!("usage: uring-proto poll|multishot|multishot-send ADDR");
            std::process::exit(2);
        }
    };
    let addr = args.get(2).map(String::as_str).unwrap_or("127.0.0.1:8990");
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let lfd = listener.as_raw_fd();
    let mut ring: IoUring<squeue::Entry, cqueue::Entry> = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)?;
    let mut bufs = if mode == Mode::Poll {
        None
    } else {
        Some(BufRing::new(&ring)?)
    };
    println!("ready {}", listener.local_addr()?);
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut sqes: Vec<squeue::Entry> = vec![accept(lfd)];
    let mut tmp = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        {
            let mut sq = ring.submission();
            for e in sqes.drain(..) {
                // SAFETY: every buffer an entry points to lives in `conns` or `bufs` until its
                // completion.
                unsafe { sq.push(&e).expect("submission queue full") };
            }
        }
        ring.submit_and_wait(1)?;
        let cqes: Vec<cqueue::Entry> = ring.completion().collect();
        let mut republish = false;
        for c in cqes {
            let (kind, fd) = (c.user_data() >> 32, c.user_data() as u32 as RawFd);
            let res = c.result();
            match kind {
                ACCEPT => {
                    if res >= 0 {
                        let cfd = res;
                        // SAFETY: setsockopt on the accepted socket.
                        unsafe {
                            let one: libc::c_int = 1;
                            libc::setsockopt(
                                cfd,
                                libc::IPPROTO_TCP,
                                libc::TCP_NODELAY,
                                (&one as *const libc::c_int).cast(),
                                4,
                            );
                        }
                        conns.insert(cfd, Conn::default());
                        sqes.push(match mode {
                            Mode::Poll => poll(cfd),
                            _ => recv_multi(cfd),
                        });
                    }
                    sqes.push(accept(lfd));
                }
                POLL => {
                    let Some(conn) = conns.get_mut(&fd) else {
                        continue;
                    };
                    // SAFETY: a valid buffer and length.
                    let n = unsafe {
                        libc::recv(fd, tmp.as_mut_ptr().cast(), tmp.len(), libc::MSG_DONTWAIT)
                    };
                    if n == 0
                        || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
                    {
                        close(&mut conns, fd);
                        continue;
                    }
                    if n > 0 {
                        conn.input.extend_from_slice(&tmp[..n as usize]);
                        out.clear();
                        answer(&mut conn.input, &mut out);
                        if !out.is_empty() && !send_all(fd, &out) {
                            close(&mut conns, fd);
                            continue;
                        }
                    }
                    sqes.push(poll(fd));
                }
                RECV => {
                    let b = bufs.as_mut().expect("buffer ring");
                    if res > 0 {
                        let bid = cqueue::buffer_select(c.flags()).expect("a provided buffer");
                        let Some(conn) = conns.get_mut(&fd) else {
                            b.give(bid);
                            republish = true;
                            continue;
                        };
                        conn.input.extend_from_slice(&b.buf(bid)[..res as usize]);
                        b.give(bid);
                        republish = true;
                        out.clear();
                        answer(&mut conn.input, &mut out);
                        if !out.is_empty() {
                            if mode == Mode::MultishotSend {
                                if conn.sending.is_empty() {
                                    conn.sending.extend_from_slice(&out);
                                    sqes.push(send(fd, &conn.sending));
                                } else {
                                    conn.queued.extend_from_slice(&out);
                                }
                            } else if !send_all(fd, &out) {
                                close(&mut conns, fd);
                                continue;
                            }
                        }
                        if !cqueue::more(c.flags()) {
                            sqes.push(recv_multi(fd));
                        }
                    } else if res == -libc::ENOBUFS && conns.contains_key(&fd) {
                        sqes.push(recv_multi(fd));
                    } else if !cqueue::more(c.flags()) {
                        close(&mut conns, fd);
                    }
                }
                SEND => {
                    let Some(conn) = conns.get_mut(&fd) else {
                        continue;
                    };
                    if res < 0 {
                        close(&mut conns, fd);
                        continue;
                    }
                    conn.sending.drain(..res as usize);
                    if conn.sending.is_empty() {
                        std::mem::swap(&mut conn.sending, &mut conn.queued);
                    }
                    if !conn.sending.is_empty() {
                        sqes.push(send(fd, &conn.sending));
                    }
                }
                _ => {}
            }
        }
        if republish {
            bufs.as_ref().expect("buffer ring").publish();
        }
    }
}

fn close(conns: &mut HashMap<RawFd, Conn>, fd: RawFd) {
    if let Some(c) = conns.remove(&fd) {
        // A SEND may still read this buffer: leaked rather than freed under it.
        std::mem::forget(c.sending);
        // SAFETY: our own accepted socket, closed once. A multishot RECV still armed on it
        // ends with an error completion, ignored above.
        unsafe { libc::close(fd) };
    }
}

fn accept(lfd: RawFd) -> squeue::Entry {
    opcode::Accept::new(types::Fd(lfd), std::ptr::null_mut(), std::ptr::null_mut())
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(ACCEPT, lfd))
}

fn poll(fd: RawFd) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
        .build()
        .user_data(ud(POLL, fd))
}

fn recv_multi(fd: RawFd) -> squeue::Entry {
    opcode::RecvMulti::new(types::Fd(fd), BGID)
        .build()
        .user_data(ud(RECV, fd))
}

fn send(fd: RawFd, buf: &[u8]) -> squeue::Entry {
    opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(SEND, fd))
}
