//! A websocket connection over any async byte stream: a reader that parses frames out of one
//! read buffer without copying, and a shared outbox drained by one writer task that sends a
//! whole batch with one `sendmsg(2)`. This is on the per-request path; tungstenite is not used
//! here because its `Message` owns one contiguous buffer, which would force a copy of every
//! payload to prepend the fedbus header (the design rule: no copy of a payload in user space).

use super::frame::{self, opcode, FrameHead, HeadError, MAX_HEADER};
use super::stream::{PartsWriter, Stream};
use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::unix::io::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Which end of the connection we are: a server reads masked frames and writes plain ones; a
/// client the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The accepting side: reads masked frames, writes unmasked ones.
    Server,
    /// The dialing side: reads unmasked frames, writes masked ones.
    Client,
}

/// A whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A binary message (a fedbus frame).
    Binary(Bytes),
    /// A text message, checked to be UTF-8 (JSON on task links).
    Text(Bytes),
    /// A ping and its payload.
    Ping(Bytes),
    /// A pong and its payload.
    Pong(Bytes),
    /// A close frame and its code, if any.
    Close(Option<u16>),
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The other side closed the TCP connection.
    #[error("peer closed the connection")]
    Eof,
    /// A frame broke RFC 6455 (or fedbus's masking rule).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A message over the reader's limit.
    #[error("message larger than the limit of {0} bytes")]
    TooBig(usize),
    /// A text message that is not UTF-8.
    #[error("text message is not UTF-8")]
    BadUtf8,
    /// The other side broke a policy limit (control frames over their rate).
    #[error("policy violation: {0}")]
    Policy(&'static str),
    /// A message that arrived in pieces would have gone over the memory budget (see
    /// [`WsReader::charge_arriving`]): it was read and dropped without being buffered; these
    /// are its first bytes (at most [`DROPPED_HEAD`], unmasked), enough to answer it, and
    /// whether it was a Text message (its UTF-8 is never checked). Not fatal: the next call
    /// reads the next message.
    #[error("a message over the memory budget was dropped")]
    Dropped {
        /// Its first bytes.
        head: Bytes,
        /// A Text message (else Binary).
        text: bool,
    },
    /// We closed the connection and the other side did not close its end in time (see
    /// [`until_closed_or_late`]).
    #[error("no close from the other side within {0:?} of ours")]
    CloseTimeout(std::time::Duration),
    /// A message arriving in pieces missed its deadline ([`WsReader::set_min_pace`]).
    #[error("message slower than its minimum pace")]
    Slow,
}

impl WsError {
    /// Close code to send before dropping the connection, if any.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(_) => Some(1002),
            WsError::TooBig(_) => Some(1009),
            WsError::BadUtf8 => Some(1007),
            WsError::Policy(_) | WsError::Slow => Some(1008),
            // Try again later (RFC 6455 7.4.1), for a reader that cannot answer it.
            WsError::Dropped { .. } => Some(1013),
            // The read timeout of a link (3 ping intervals without a frame): going away.
            WsError::Io(e) if e.kind() == io::ErrorKind::TimedOut => Some(1001),
            _ => None,
        }
    }
}

impl From<HeadError> for WsError {
    fn from(e: HeadError) -> Self {
        WsError::Protocol(match e {
            HeadError::Reserved => "reserved bits set",
            HeadError::Opcode(_) => "unknown opcode",
            HeadError::BadControl => "bad control frame",
            HeadError::BadLength => "bad length",
        })
    }
}

/// The part of a read buffer's spare capacity known to be initialized, so that a reader is
/// never handed uninitialized memory (tokio's `ReadBuf` tracks the same by length). Tracked by
/// the spare region's addresses: splitting consumed bytes off the front keeps the region where
/// it is; a `reserve` that reallocates or reclaims moves it, and then it is zeroed again. So a
/// buffer is zero-filled once per allocation, not once per read (zeroing 64 KiB per read would
/// cost more than the read itself for small frames).
///
/// A read is offered [`FIRST_OFFER`] bytes at first, and twice what it was offered after a read
/// that filled its offer, up to [`READ_CHUNK`]: a connection that only ever receives small
/// requests touches (and keeps resident) 4 KiB of its read buffer, not all of it. Zeroing the
/// whole chunk up front made every idle keep-alive connection hold 16 KiB and every `/api/ws`
/// session 64 KiB (`benches/memory-per-connection.sh`); a bulk upload reaches full-size reads
/// after four reads.
#[derive(Debug, Default)]
pub struct ReadSpace {
    start: usize,
    end: usize,
    init: usize,
    /// Bytes the next read is offered (0: [`FIRST_OFFER`]).
    offer: usize,
    /// The connection holds no read buffer: the next read is [`ReadSpace::read_unbuffered`].
    unbuffered: bool,
}

/// What a connection's first read is offered (see [`ReadSpace`]).
pub const FIRST_OFFER: usize = 4 * 1024;

impl ReadSpace {
    /// What the next read is offered at most, when the buffer has room for it.
    pub fn next_offer(&self) -> usize {
        self.offer.max(FIRST_OFFER).max(self.init).min(READ_CHUNK)
    }

    /// Reads once from `io` into the spare capacity of `buf` (which the caller has reserved)
    /// and appends what was read. Ok(0): end of stream, or no spare capacity.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
    ) -> io::Result<usize> {
        let spare = buf.spare_capacity_mut();
        let (start, end) = (
            spare.as_ptr() as usize,
            spare.as_ptr() as usize + spare.len(),
        );
        if (start, end) != (self.start, self.end) {
            (self.start, self.end, self.init) = (start, end, 0);
        }
        // At most one read chunk is zeroed and offered per read: a peer that announces a large
        // frame or body (the caller reserves room for all of it) must not make the router
        // touch megabytes before the bytes arrive. Bytes already zeroed are offered for free.
        let take = spare.len().min(self.next_offer());
        if self.init < take {
            for b in &mut spare[self.init..take] {
                b.write(0);
            }
            self.init = take;
        }
        // SAFETY: the first `take` bytes of `spare` are initialized: zeroed just above, or
        // zeroed or written earlier at the same addresses. The region's start and end are
        // unchanged since then, so it is the same allocation of this buffer: a `reserve` that
        // reallocates allocates the new block while the old one is alive (another address),
        // and one that reclaims in place moves the region's start; nothing de-initializes bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), take) };
        let n = io.read(dst).await?.min(take);
        if n == take {
            // The peer had more to say than it was offered: offer more next time.
            self.offer = self.offer.max(take * 2).min(READ_CHUNK);
        }
        // SAFETY: the first n bytes of the spare capacity are initialized (see above).
        unsafe { buf.set_len(buf.len() + n) };
        self.start += n;
        self.init -= n;
        Ok(n)
    }
}

thread_local! {
    /// The read scratch of a connection that holds no read buffer (see
    /// [`ReadSpace::read_unbuffered`]): borrowed only inside one poll, so every connection of
    /// the shard shares it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; FIRST_OFFER].into_boxed_slice());
}

impl ReadSpace {
    /// For a connection that holds no read buffer yet: its first read is
    /// [`ReadSpace::read_unbuffered`].
    pub fn unbuffered() -> Self {
        ReadSpace {
            unbuffered: true,
            ..ReadSpace::default()
        }
    }

    /// Gives `buf` (empty) back, for a connection idle with nothing buffered: its next read
    /// is [`ReadSpace::read_unbuffered`].
    pub fn give_back(&mut self, buf: &mut BytesMut) {
        debug_assert!(buf.is_empty());
        *buf = BytesMut::new();
        *self = ReadSpace::unbuffered();
    }

    /// The connection holds no read buffer (see [`ReadSpace::give_back`]).
    pub fn is_unbuffered(&self) -> bool {
        self.unbuffered
    }

    /// Reads once for a connection that holds no read buffer ([`ReadSpace::give_back`],
    /// [`ReadSpace::unbuffered`]; `buf` has no capacity): the bytes land in the shard's shared
    /// scratch, and only when some came does `buf` get a buffer of `cap` bytes (at least what
    /// was read) to copy them into. An
    /// idle connection so holds no buffer while it waits, as nginx's keep-alive connections
    /// do, at the cost of one copy of its first read after the wait. This works with any
    /// reader, because a reader uses the buffer it is given only during the poll that gives it
    /// (glommio's socket reads `recv` into it then, or arm a poll and return pending; rustls
    /// copies decrypted bytes into it then). Ok(0): end of stream.
    pub async fn read_unbuffered<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        cap: usize,
    ) -> io::Result<usize> {
        debug_assert_eq!(buf.capacity(), 0);
        std::future::poll_fn(|cx| {
            SCRATCH.with_borrow_mut(|scratch| {
                let n = match Pin::new(&mut *io).poll_read(cx, scratch) {
                    Poll::Ready(Ok(n)) => n.min(scratch.len()),
                    other => return other,
                };
                if n > 0 {
                    buf.reserve(cap.max(n));
                    buf.extend_from_slice(&scratch[..n]);
                    *self = ReadSpace::default();
                    if n == scratch.len() {
                        self.offer = 2 * n;
                    }
                }
                Poll::Ready(Ok(n))
            })
        })
        .await
    }
}

/// Makes room for `additional` more bytes in `buf` without allocating when it can: `buf` is
/// reclaimed in place when nothing cut from it is still alive; else `spare` (the buffer given
/// up last time) takes over, when what was cut from it is gone, with what `buf` holds copied
/// in. Only when both are still in use is a new buffer (at least `min_cap`) allocated. The
/// buffer given up becomes the spare.
pub fn make_room(buf: &mut BytesMut, spare: &mut BytesMut, additional: usize, min_cap: usize) {
    if buf.capacity() - buf.len() >= additional || buf.try_reclaim(additional) {
        return;
    }
    let need = buf.len() + additional;
    let mut next = std::mem::take(spare);
    if !next.try_reclaim(need) {
        next = BytesMut::with_capacity(need.max(min_cap));
    }
    next.extend_from_slice(buf);
    let mut old = std::mem::replace(buf, next);
    old.clear();
    *spare = old;
}

/// Size of each read; the buffer grows only for a frame that is larger.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// Parses frames out of one growing read buffer.
pub struct WsReader<R> {
    io: R,
    buf: BytesMut,
    side: Side,
    max_message: usize,
    /// A fragmented message being assembled: (opcode, bytes so far).
    frag: Option<(u8, BytesMut)>,
    space: ReadSpace,
    /// Read buffers given up while messages cut from them may still be alive (requests in
    /// flight hold slices of them), with the size of each one's allocation; one whose messages
    /// are all gone becomes the read buffer again ([`WsReader::room`]).
    retired: Vec<(Bytes, usize)>,
    /// The size of the read buffer's allocation.
    alloc: usize,
    /// Whether a new read buffer may be made while retired ones are held (see
    /// [`WsReader::limit_pinned`]; None: always).
    may_pin: Option<Box<dyn Fn(PinAsk) -> bool>>,
    /// The reader is waiting for room ([`WsReader::limit_pinned`]).
    paused: bool,
    /// The frame being read needs the buffer to hold this many bytes (0: none).
    frame_total: usize,
    /// Most pings and pongs per second (`u32::MAX`: no limit).
    control_rate: crate::util::Rate,
    /// Messages returned since the reader last waited for the socket.
    turn: u32,
    /// Reads from the socket so far.
    reads: u64,
    /// Charges the bytes of a message still arriving (see [`WsReader::charge_arriving`]), and
    /// what it was last told.
    arriving: Option<Box<dyn FnMut(Hold) -> bool>>,
    charged: usize,
    /// A message being dropped because its charge was refused.
    dropping: Option<Dropping>,
    /// The slowest pace of a message that arrives in pieces (see [`WsReader::set_min_pace`]).
    pace: Option<Pace>,
}

/// What [`WsReader::charge_arriving`]'s hook is told about the message arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// The bytes to charge now: what came of the message and a window ahead of it
    /// ([`crate::shard::charge_ahead`]), the whole message once it is in.
    pub now: usize,
    /// The message's bytes as far as its frames announce them (the fragments so far and the
    /// frame being read).
    pub whole: usize,
    /// A message not charged before: the charge it had before, if any, went with the message
    /// before it, or was given back when that one was dropped.
    pub fresh: bool,
}

/// What [`WsReader::limit_pinned`]'s hook is asked before a new read buffer is made.
#[derive(Debug, Clone, Copy)]
pub struct PinAsk {
    /// The allocations of the retired buffers still held (not the one given up now, which may
    /// be free: it counts from the next time, if it is still held then).
    pub bytes: usize,
    /// The charge of the message arriving (told to [`WsReader::charge_arriving`]'s hook): it
    /// is not in flight yet, and its own buffer is what the new one is made for.
    pub arriving: usize,
    /// The reader is already waiting for room (asked before): count a wait once.
    pub again: bool,
}

/// A message read in pieces must keep arriving at `bytes_per_sec` after `allowance`, counted
/// from the read that brought its first bytes: at any moment, `allowance` + the message's bytes
/// received / `bytes_per_sec` must not have passed. The bytes received, not the length its frame
/// heads announce: a peer that announces a large message and trickles it would otherwise hold
/// the message's whole charge (its budget share) for as long as the announced length allows
/// (8 MiB at 1 KiB/s: 2 h 17 min).
struct Pace {
    allowance: std::time::Duration,
    bytes_per_sec: usize,
    /// When the message in progress began arriving (None: none in progress).
    since: Option<std::time::Instant>,
}

/// How far control text may go past an outbox's byte limit ([`WsOut::send_text`]).
pub const CONTROL_SLACK: usize = 64 * 1024;

/// How many of a dropped message's first bytes [`WsError::Dropped`] keeps: a fedbus frame
/// header (24 bytes, with the request id) and some.
pub const DROPPED_HEAD: usize = 64;

/// Where dropping a message stands after what is buffered.
enum Dropped {
    /// Its last byte went by: its first bytes, and whether it was Text.
    Whole(Bytes, bool),
    /// More must be read first.
    NeedMore,
    /// A control frame comes next (between fragments), read as any other.
    Control,
}

/// The state of a message read and dropped (its charge refused).
struct Dropping {
    /// Its first bytes, unmasked.
    head: BytesMut,
    /// Payload bytes of the current frame still to drop, that frame's mask and how much of
    /// its payload went by (the mask's offset).
    frame_left: u64,
    mask: Option<[u8; 4]>,
    pos: usize,
    /// The current frame is the message's last.
    fin: bool,
    /// The message's length so far (still bounded by the reader's limit).
    total: u64,
    /// A Text message (else Binary).
    text: bool,
}

/// Messages one connection's reader hands out from its buffer before it yields to the other
/// tasks of the shard: a connection whose buffer holds thousands of small frames cannot keep
/// the shard to itself.
const MESSAGES_PER_TURN: u32 = 64;

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// `leftover`: bytes already read after the handshake head.
    pub fn new(io: R, leftover: BytesMut, side: Side, max_message: usize) -> Self {
        let leftover_cap = leftover.capacity();
        WsReader {
            io,
            buf: leftover,
            side,
            max_message,
            frag: None,
            space: ReadSpace::default(),
            alloc: leftover_cap,
            retired: Vec::new(),
            may_pin: None,
            paused: false,
            frame_total: 0,
            control_rate: crate::util::Rate::per_second(u32::MAX),
            turn: 0,
            reads: 0,
            arriving: None,
            charged: 0,
            dropping: None,
            pace: None,
        }
    }

    /// Holds a message that arrives in pieces to a slowest pace, as an HTTP body is held
    /// (`limits.min_body_bytes_per_sec`): from the read that brought its first bytes, its
    /// bytes must keep coming at `bytes_per_sec` after `allowance` (the next bytes are due
    /// `allowance` + the bytes received so far / `bytes_per_sec` after that read), or
    /// [`WsReader::next`] fails with [`WsError::Slow`] at that deadline. A message read whole
    /// in one read never reads the clock nor arms a timer.
    pub fn set_min_pace(&mut self, allowance: std::time::Duration, bytes_per_sec: usize) {
        self.pace = Some(Pace {
            allowance,
            bytes_per_sec: bytes_per_sec.max(1),
            since: None,
        });
    }

    /// When the message in progress must be whole ([`WsReader::set_min_pace`]); None when no
    /// message is in progress or no pace is set.
    pub fn message_deadline(&self) -> Option<std::time::Instant> {
        let p = self.pace.as_ref()?;
        let since = p.since?;
        // The message's own bytes: fragments assembled (or dropped) and the frame being read,
        // which is what is buffered while a message is in progress (control frames between
        // its fragments are taken out whole, and do not count).
        let assembled = self.frag.as_ref().map_or(0, |(_, b)| b.len());
        let dropped = self
            .dropping
            .as_ref()
            .map_or(0, |d| d.total.saturating_sub(d.frame_left) as usize);
        let received = assembled + dropped + self.buf.len();
        let secs = received as f64 / p.bytes_per_sec as f64;
        Some(since + p.allowance + std::time::Duration::from_secs_f64(secs))
    }

    /// Has the reader charge a message while it arrives: `charge` is told ([`Hold`]) the
    /// length the message's frames announce and what to charge now, what came and a window
    /// ahead, before the bytes are buffered, again after each read that brings more, and the
    /// whole once it is in; the charge it takes stays with the message, which its reader then
    /// takes over. False refuses the message: it is read and dropped without being buffered,
    /// then [`WsError::Dropped`] hands out its first bytes so that it can be answered. A
    /// message read whole in one read is never charged here, so the common case costs nothing.
    pub fn charge_arriving(&mut self, charge: impl FnMut(Hold) -> bool + 'static) {
        self.arriving = Some(Box::new(charge));
    }

    /// Bounds the read buffers that messages in flight keep alive: a new buffer is made while
    /// earlier ones are still held only when `may` allows it ([`PinAsk`]: what the retired
    /// buffers still held hold, and the charge of the message arriving, which is not in flight
    /// yet); otherwise the reader reads nothing until
    /// messages cut from them are gone, looking again after 1 ms, then twice as long each time
    /// up to 32 ms. The time waited does not count against the pace of a message arriving
    /// ([`WsReader::set_min_pace`]). Without it a client could make each read buffer hold one
    /// small slow request and fill the rest with a message refused at once: every request would
    /// keep a whole buffer (64 KiB) alive while charged for its own bytes. Checked when a
    /// buffer is made: a buffer made for a large message is never read into for small ones
    /// afterwards (it is let go), so the bound holds for what small requests keep.
    pub fn limit_pinned(&mut self, may: impl Fn(PinAsk) -> bool + 'static) {
        self.may_pin = Some(Box::new(may));
    }

    /// Read buffers given up and still held by messages cut from them: how many, and their
    /// bytes.
    pub fn pinned(&self) -> (usize, usize) {
        let held = self.retired.iter().filter(|(b, _)| !b.is_unique());
        held.fold((0, 0), |(n, bytes), (_, size)| (n + 1, bytes + size))
    }

    /// Room for the next read (none for a reader without a buffer): what the next read is
    /// offered, 4 KiB for a session that only ever receives small messages (it keeps that
    /// little), up to a whole chunk once reads fill it; and the whole of a frame that is larger.
    /// A buffer with room for a first offer left is read into as it is: messages in flight
    /// hold slices of it, so a fresh buffer for each small message that comes in a read of its
    /// own would keep a whole chunk alive per message. Free retired buffers are let go but one
    /// (up to a read chunk), to be reused. A wait for room ([`WsReader::limit_pinned`]) moves
    /// the pace's clock on by the time waited.
    async fn make_read_room(&mut self) {
        let frame_left = std::mem::take(&mut self.frame_total).saturating_sub(self.buf.len());
        if self.retired.len() > 1 {
            let mut one_free = false;
            self.retired.retain(|(b, size)| {
                !b.is_unique() || (*size <= READ_CHUNK && !std::mem::replace(&mut one_free, true))
            });
        }
        // A message refused as it arrived, made room for before (it fit from its head on), is
        // read and dropped: not into the buffer made for it, which that would make resident
        // while charged nothing. Let go; the next read takes a small one.
        if self.dropping.is_some() && self.buf.is_empty() && self.alloc > 2 * READ_CHUNK {
            self.space.give_back(&mut self.buf);
            self.alloc = 0;
        }
        if self.space.is_unbuffered() {
            return;
        }
        let want = self.space.next_offer();
        let room = self.buf.capacity() - self.buf.len();
        // A frame in progress needs room for its rest only (a buffer made for it is exactly
        // that large): never a new buffer for its last bytes.
        if frame_left > 0 {
            if frame_left > room {
                self.room(frame_left, want).await;
            }
        } else if room < FIRST_OFFER {
            self.room(want, want).await;
        }
    }

    /// Makes room for `additional` more bytes in the read buffer, a new buffer holding at
    /// least `min_cap` (as [`make_room`], with every buffer given up kept): the buffer is
    /// reclaimed in place when nothing cut from it is alive (unless it is larger than a read
    /// chunk and than what is needed: one made for a large message is let go); else a retired
    /// buffer whose messages are all gone takes over (the others that are free are let go);
    /// else a new one is made, when [`WsReader::limit_pinned`] allows it; else it waits. The
    /// buffer given up is retired while anything cut from it is alive, let go otherwise.
    /// The time it waits moves the pace's clock of a message arriving on.
    async fn room(&mut self, additional: usize, min_cap: usize) {
        let mut nap = std::time::Duration::from_millis(1);
        loop {
            let need = self.buf.len() + additional;
            // Not a buffer more than twice what is needed (at least a read chunk): one made
            // for a large message is let go rather than read into for small ones. Nor, on a
            // reader that charges messages as they arrive (`charge_arriving`: a client's), one
            // over two read chunks for the next large one: it is all resident, and a message
            // arriving is charged only what came and two read chunks ahead
            // (`crate::shard::charge_ahead`). A link's reader charges nothing as it arrives
            // and reuses it.
            let most = match self.arriving {
                Some(_) => 2 * READ_CHUNK,
                None => 2 * READ_CHUNK.max(need),
            };
            let fits = |size: usize| size >= need && size <= most;
            if self.buf.capacity() - self.buf.len() >= additional
                || fits(self.alloc) && self.buf.try_reclaim(additional)
            {
                self.paused = false;
                return;
            }
            let (mut reuse, mut held) = (None, 0);
            self.retired.retain_mut(|(b, size)| {
                if !b.is_unique() {
                    held += *size;
                    return true;
                }
                if reuse.is_none() && fits(*size) {
                    reuse = std::mem::take(b).try_into_mut().ok().map(|b| (b, *size));
                }
                false
            });
            let ask = PinAsk {
                bytes: held,
                arriving: self.charged,
                again: self.paused,
            };
            let (mut next, size) = match reuse {
                Some(r) => r,
                None if ask.bytes == 0 || self.may_pin.as_ref().is_none_or(|may| may(ask)) => {
                    let n = need.max(min_cap);
                    (BytesMut::with_capacity(n), n)
                }
                None => {
                    self.paused = true;
                    let t = std::time::Instant::now();
                    glommio::timer::sleep(nap).await;
                    // The message arriving is not held to its pace for the time the router
                    // kept it waiting: moved on nap by nap (the session may drop this wait
                    // and call again).
                    let slept = t.elapsed();
                    if let Some(since) = self.pace.as_mut().and_then(|p| p.since.as_mut()) {
                        *since += slept;
                    }
                    nap = (nap * 2).min(std::time::Duration::from_millis(32));
                    continue;
                }
            };
            self.paused = false;
            // Unique: reclaims the whole allocation.
            let _ = next.try_reclaim(need);
            next.extend_from_slice(&self.buf);
            let mut old = std::mem::replace(&mut self.buf, next);
            old.clear();
            let old = old.freeze();
            // (An empty `BytesMut::new()`, never allocated, freezes to a static `Bytes`, which
            // never says it is unique.)
            if self.alloc > 0 && !old.is_unique() {
                if self.may_pin.is_none() {
                    // Unbounded (a link): only the last one is kept, to be reused, as
                    // [`make_room`] keeps its spare; the others live as long as their slices.
                    self.retired.clear();
                }
                self.retired.push((old, self.alloc));
            }
            self.alloc = size;
            return;
        }
    }

    /// Tells [`WsReader::charge_arriving`]'s hook that the message in progress is to be
    /// charged `n` bytes of the `whole` its frames announce; false when it refused them.
    fn hold(&mut self, n: usize, whole: usize) -> bool {
        if n == self.charged {
            return true;
        }
        if let Some(charge) = &mut self.arriving {
            let fresh = self.charged == 0;
            if !charge(Hold {
                now: n,
                whole,
                fresh,
            }) {
                self.charged = 0;
                return false;
            }
            self.charged = n;
        }
        true
    }

    /// Starts dropping the message in progress (of opcode `op`): `head` is what of it was
    /// buffered (unmasked), then `h`'s payload (its header already consumed) is dropped as it
    /// arrives.
    fn start_dropping(&mut self, op: u8, head: BytesMut, h: Option<&FrameHead>, total: u64) {
        self.dropping = Some(Dropping {
            // A copy: the buffer the message's first fragments were in is freed now, as its
            // charge was given back.
            head: BytesMut::from(&head[..head.len().min(DROPPED_HEAD)]),
            frame_left: h.map_or(0, |h| h.payload_len),
            mask: h.and_then(|h| h.mask),
            pos: 0,
            fin: h.is_some_and(|h| h.fin),
            total,
            text: op == opcode::TEXT,
        });
    }

    /// Drops what is buffered of a message being dropped.
    fn drop_buffered(&mut self) -> Result<Dropped, WsError> {
        let Some(d) = self.dropping.as_mut() else {
            return Ok(Dropped::Control);
        };
        loop {
            if d.frame_left > 0 {
                let n = (d.frame_left as usize).min(self.buf.len());
                let keep = n.min(DROPPED_HEAD - d.head.len());
                if keep > 0 {
                    let start = d.head.len();
                    d.head.extend_from_slice(&self.buf[..keep]);
                    if let Some(m) = d.mask {
                        frame::unmask(&mut d.head[start..], m, d.pos);
                    }
                }
                self.buf.advance(n);
                (d.frame_left, d.pos) = (d.frame_left - n as u64, d.pos + n);
                if d.frame_left > 0 {
                    return Ok(Dropped::NeedMore);
                }
            }
            if d.fin {
                let d = self.dropping.take().expect("dropping");
                return Ok(Dropped::Whole(d.head.freeze(), d.text));
            }
            // The next frame: a continuation of the dropped message, or a control frame,
            // which the caller reads as any other.
            let Some(h) = frame::parse_head(&self.buf)? else {
                return Ok(Dropped::NeedMore);
            };
            if h.opcode & 0x08 != 0 {
                return Ok(Dropped::Control);
            }
            if h.opcode != opcode::CONTINUATION {
                return Err(WsError::Protocol("new message inside a fragmented one"));
            }
            match (self.side, h.mask.is_some()) {
                (Side::Server, false) => return Err(WsError::Protocol("client frame not masked")),
                (Side::Client, true) => return Err(WsError::Protocol("server frame masked")),
                _ => {}
            }
            d.total += h.payload_len;
            if d.total > self.max_message as u64 {
                return Err(WsError::TooBig(self.max_message));
            }
            self.buf.advance(h.header_len);
            (d.frame_left, d.mask, d.pos, d.fin) = (h.payload_len, h.mask, 0, h.fin);
        }
    }

    /// Reads from the socket so far: a caller that stamps each message with the time of the
    /// read that brought it reads the clock only when this moves, not once per message.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Changes the largest message accepted from now on (a link's handshake messages are held
    /// to a smaller bound than its frames).
    pub fn set_max_message(&mut self, n: usize) {
        self.max_message = n;
    }

    /// Refuses (with [`WsError::Policy`], close 1008) more than `per_sec` pings and pongs per
    /// second from the other side: each ping costs a pong, and a flood of them would take the
    /// shard's time and the outbox's slots.
    pub fn limit_control_rate(&mut self, per_sec: u32) {
        self.control_rate = crate::util::Rate::per_second(per_sec);
    }

    /// Next message, reading as needed.
    pub async fn next(&mut self) -> Result<Message, WsError> {
        loop {
            let got = self.try_buffered();
            if let Some(p) = &mut self.pace {
                // A message (or an error) ends the pace's clock; a control frame between the
                // fragments of a message does not.
                let between = matches!(got, Ok(Some(Message::Ping(_) | Message::Pong(_))))
                    && (self.frag.is_some() || self.dropping.is_some());
                if !matches!(got, Ok(None)) && !between {
                    p.since = None;
                }
            }
            if let Some(m) = got? {
                if matches!(m, Message::Ping(_) | Message::Pong(_)) {
                    self.count_control()?;
                }
                self.turn += 1;
                if self.turn >= MESSAGES_PER_TURN {
                    self.turn = 0;
                    futures_lite::future::yield_now().await;
                }
                return Ok(m);
            }
            self.turn = 0;
            if let Some(p) = &mut self.pace {
                let partial =
                    !self.buf.is_empty() || self.frag.is_some() || self.dropping.is_some();
                if partial && p.since.is_none() {
                    p.since = Some(std::time::Instant::now());
                }
            }
            // Messages larger than the buffer's share of a turn never reach
            // MESSAGES_PER_TURN: a peer that keeps each read full still yields the shard past
            // the executor's time slice (outside a glommio executor this never yields).
            glommio::executor().yield_if_needed().await;
            self.make_read_room().await;
            match self.message_deadline() {
                None => self.fill().await?,
                Some(due) => {
                    let left = due.saturating_duration_since(std::time::Instant::now());
                    let filled = glommio::timer::timeout(left, async { Ok(self.fill().await) });
                    filled.await.map_err(|_| WsError::Slow)??;
                }
            }
        }
    }

    fn count_control(&mut self) -> Result<(), WsError> {
        if self.control_rate.over() {
            return Err(WsError::Policy(
                "control frames over limits.max_control_frames_per_sec",
            ));
        }
        Ok(())
    }

    /// Reads and discards until the peer closes or `limit` passes. Closing a socket that still
    /// has unread input makes the kernel send RST, which can destroy answers (and the close
    /// frame) the peer has not read yet: call this after the writer has finished.
    pub async fn drain(&mut self, limit: std::time::Duration) {
        self.buf.clear();
        // What a message in progress held goes back now, not when the reader is dropped.
        (self.frag, self.dropping, self.arriving) = (None, None, None);
        // On the heap: an array would be part of every session's future, held for its life.
        let mut b = vec![0u8; 16 * 1024];
        let _ = glommio::timer::timeout(limit, async {
            while let Ok(n) = self.io.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
            Ok(())
        })
        .await;
    }

    /// Gives the read buffers back when nothing is buffered (no message in progress), for a
    /// session that has been idle a while; the next read takes a new one
    /// ([`ReadSpace::read_unbuffered`]). False when something is buffered.
    pub fn give_back(&mut self) -> bool {
        if !self.buf.is_empty() || self.frag.is_some() || self.dropping.is_some() {
            return false;
        }
        self.space.give_back(&mut self.buf);
        (self.retired, self.alloc) = (Vec::new(), 0);
        true
    }

    /// The reader holds no read buffer ([`WsReader::give_back`]).
    pub fn is_unbuffered(&self) -> bool {
        self.space.is_unbuffered()
    }

    async fn fill(&mut self) -> Result<(), WsError> {
        let n = if self.space.is_unbuffered() {
            let io = &mut self.io;
            let n = self
                .space
                .read_unbuffered(io, &mut self.buf, FIRST_OFFER)
                .await?;
            self.alloc = self.buf.capacity();
            n
        } else {
            // Room was made before ([`WsReader::make_read_room`]), outside the pace's deadline.
            self.space.read(&mut self.io, &mut self.buf).await?
        };
        if n == 0 {
            return Err(WsError::Eof);
        }
        self.reads += 1;
        Ok(())
    }

    /// Parses one message from what is buffered, without reading.
    pub fn try_buffered(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            if self.dropping.is_some() {
                match self.drop_buffered()? {
                    Dropped::Whole(head, text) => return Err(WsError::Dropped { head, text }),
                    Dropped::NeedMore => return Ok(None),
                    Dropped::Control => {}
                }
            }
            let Some(h) = frame::parse_head(&self.buf)? else {
                return Ok(None);
            };
            self.check(&h)?;
            let total = h.header_len + h.payload_len as usize;
            if self.buf.len() < total {
                // A data frame still arriving is charged before room is made for it; refused,
                // the message is dropped as it arrives.
                if h.opcode & 0x08 == 0 {
                    // A frame that breaks the fragmentation rules fails before it is charged.
                    match (h.opcode == opcode::CONTINUATION, self.frag.is_some()) {
                        (true, false) => {
                            return Err(WsError::Protocol("continuation without a message"))
                        }
                        (false, true) => {
                            return Err(WsError::Protocol("new message inside a fragmented one"))
                        }
                        _ => {}
                    }
                    let sofar = self.frag.as_ref().map_or(0, |(_, b)| b.len());
                    let whole = sofar + h.payload_len as usize;
                    let got = sofar + self.buf.len() - h.header_len;
                    if !self.hold(crate::shard::charge_ahead(got, whole), whole) {
                        let (op, head) = self.frag.take().unwrap_or((h.opcode, BytesMut::new()));
                        self.buf.advance(h.header_len);
                        self.start_dropping(op, head, Some(&h), (sofar as u64) + h.payload_len);
                        continue;
                    }
                }
                // Room for the whole frame is made once by the next read, rather than
                // growing by chunks.
                self.frame_total = total;
                return Ok(None);
            }
            let mut f = self.buf.split_to(total);
            f.advance(h.header_len);
            if let Some(m) = h.mask {
                frame::unmask(&mut f, m, 0);
            }
            if let Some(msg) = self.assemble(&h, f)? {
                return Ok(Some(msg));
            }
        }
    }

    fn check(&self, h: &FrameHead) -> Result<(), WsError> {
        match (self.side, h.mask.is_some()) {
            (Side::Server, false) => return Err(WsError::Protocol("client frame not masked")),
            (Side::Client, true) => return Err(WsError::Protocol("server frame masked")),
            _ => {}
        }
        // A control frame between fragments (RFC 6455 5.4) is not part of the message: it
        // is bounded alone (at most 125 bytes, `parse_head`).
        let control = h.opcode & 0x08 != 0;
        let sofar = match &self.frag {
            Some((_, b)) if !control => b.len() as u64,
            _ => 0,
        };
        if h.payload_len + sofar > self.max_message as u64 {
            return Err(WsError::TooBig(self.max_message));
        }
        Ok(())
    }

    fn assemble(&mut self, h: &FrameHead, f: BytesMut) -> Result<Option<Message>, WsError> {
        let whole = |op: u8, b: BytesMut| -> Result<Message, WsError> {
            if op == opcode::TEXT {
                std::str::from_utf8(&b).map_err(|_| WsError::BadUtf8)?;
                Ok(Message::Text(b.freeze()))
            } else {
                Ok(Message::Binary(b.freeze()))
            }
        };
        Ok(Some(match h.opcode {
            opcode::PING => Message::Ping(f.freeze()),
            opcode::PONG => Message::Pong(f.freeze()),
            // RFC 6455 5.5.1 / 7.4: a 1-byte payload or a code not allowed on the wire fails
            // the connection with 1002, a reason that is not UTF-8 with 1007.
            opcode::CLOSE => match frame::check_close_payload(&f) {
                Ok(code) => Message::Close(code),
                Err(1007) => return Err(WsError::BadUtf8),
                Err(_) => return Err(WsError::Protocol("bad close frame")),
            },
            opcode::TEXT | opcode::BINARY => {
                if self.frag.is_some() {
                    return Err(WsError::Protocol("new message inside a fragmented one"));
                }
                if h.fin {
                    // A message charged as it arrived: the charge grows to the whole, then
                    // goes with the message.
                    if self.charged > 0 && !self.hold(f.len(), f.len()) {
                        return Err(WsError::Dropped {
                            head: Bytes::copy_from_slice(&f[..f.len().min(DROPPED_HEAD)]),
                            text: h.opcode == opcode::TEXT,
                        });
                    }
                    self.charged = 0;
                    whole(h.opcode, f)?
                } else {
                    if !self.hold(f.len(), f.len()) {
                        let n = f.len() as u64;
                        self.start_dropping(h.opcode, f, None, n);
                        return Ok(None);
                    }
                    // A copy of its own: a slice would keep the read buffer alive, and a
                    // retired buffer held by nothing but the message being assembled would
                    // count against [`WsReader::limit_pinned`] while the reader waits for it
                    // to be freed by that very message (which needs the reader to finish).
                    // Its continuations are appended anyway.
                    self.frag = Some((h.opcode, BytesMut::from(&f[..])));
                    return Ok(None);
                }
            }
            _ => {
                // Continuation: rare (fedbus peers never fragment), so a copy is acceptable.
                let Some((op, mut acc)) = self.frag.take() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                acc.extend_from_slice(&f);
                if !h.fin {
                    if !self.hold(acc.len(), acc.len()) {
                        let n = acc.len() as u64;
                        self.start_dropping(op, acc, None, n);
                        return Ok(None);
                    }
                    self.frag = Some((op, acc));
                    return Ok(None);
                }
                // The last fragment may have come whole: the charge grows to the message.
                if !self.hold(acc.len(), acc.len()) {
                    return Err(WsError::Dropped {
                        head: Bytes::copy_from_slice(&acc[..acc.len().min(DROPPED_HEAD)]),
                        text: op == opcode::TEXT,
                    });
                }
                self.charged = 0;
                whole(op, acc)?
            }
        }))
    }
}

/// Frames waiting to be written, shared by everything on the shard that sends on this
/// connection. Bounded by bytes: a full outbox refuses and hands the payload back.
pub struct WsOut {
    /// Whole frames not yet handed to the writer: the writer takes frames whole, so the
    /// queue can be cut at any frame boundary ([`WsOut::close_now`]).
    frames: VecDeque<Queued>,
    /// The copied bytes of the queued frames (headers, small heads, small or masked
    /// payloads), in queue order and nothing else: the writer splits them off when it takes
    /// the frames, so one allocation serves many frames and consecutive copied frames leave
    /// as one slice.
    arena: BytesMut,
    /// The arena given up last, reused once the frames cut from it are written.
    spare_arena: BytesMut,
    /// The writer's list of slices, kept here between writes (taken for each one) so that an
    /// idle connection gives it back with the arenas ([`WsOut::give_back`]).
    batch: Vec<Bytes>,
    queued: usize,
    /// Frames that have left the front of the queue (taken by the writer or dropped) since the
    /// outbox was made: frame number `n` ([`WsOut::last_frame`]) is `frames[n - left]` while
    /// it waits.
    left: u64,
    limit: usize,
    /// The limit bounds what waits behind other frames only: one data message larger than it
    /// is let into an empty outbox ([`WsOut::set_soft_limit`]).
    soft: bool,
    /// Control frames queued since the writer last emptied the queue, and their bound.
    controls: usize,
    max_controls: usize,
    /// The newest pong dropped by that bound or the byte limit (payload, length): sent once
    /// the writer has emptied the queue, so the latest ping is always answered.
    late_pong: Option<([u8; 125], u8)>,
    closing: bool,
    /// Closed because the other side did not read (see [`WsOut::close_now`]).
    overflowed: bool,
    waker: Option<Waker>,
    /// Woken when the outbox starts closing ([`closed`]) and when the writer ends
    /// ([`written`]).
    close_waker: Option<Waker>,
    /// The writer has ended: everything queued (the close frame last) is written, or a write
    /// failed ([`WsOut::abort`]; then `write_failed`).
    writer_done: bool,
    write_failed: bool,
    /// The queued bytes charged to the shard's memory budget (client connections).
    charge: Option<crate::shard::OutboxCharge>,
    /// Masking keys, on the client side only.
    keys: Option<Box<MaskKeys>>,
}

/// Fresh masking keys for a client's frames, drawn from the system's secure random source
/// 256 keys at a time (one `getrandom` per 256 frames).
struct MaskKeys {
    pool: [u8; 1024],
    used: usize,
    rng: ring::rand::SystemRandom,
}

impl MaskKeys {
    fn new() -> Box<MaskKeys> {
        Box::new(MaskKeys {
            pool: [0; 1024],
            used: 1024,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    fn next(&mut self) -> [u8; 4] {
        use ring::rand::SecureRandom;
        loop {
            if self.used == self.pool.len() {
                if self.rng.fill(&mut self.pool).is_err() {
                    // No system randomness (never seen on Linux): still mask, with keys that
                    // change per frame.
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64);
                    for (i, c) in self.pool.chunks_exact_mut(8).enumerate() {
                        let v = (t ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                }
                self.used = 0;
            }
            let k = &self.pool[self.used..self.used + 4];
            self.used += 4;
            let key = [k[0], k[1], k[2], k[3]];
            // Key 0 would send the payload unmasked.
            if key != [0; 4] {
                return key;
            }
        }
    }
}

/// One frame in the outbox: how many of its bytes wait in the arena (its header, its small
/// head, and its payload when that was copied), and its payload when it was not.
struct Queued {
    copied: usize,
    payload: Bytes,
}

impl Queued {
    fn len(&self) -> usize {
        self.copied + self.payload.len()
    }
}

/// A server's payload up to this size is copied into the arena behind its header instead of
/// being queued as a slice of its own: small frames then leave in one slice, and no
/// reference count is held per frame. Larger payloads are written from where they lie.
const COPY_PAYLOAD_BYTES: usize = 1024;

/// A refused send: the outbox is over its limit or closed. The caller still holds the payload
/// (sends borrow it).
#[derive(Debug)]
pub struct Refused;

impl WsOut {
    /// An empty outbox for `side` that refuses data sends past `limit` queued bytes.
    pub fn new(side: Side, limit: usize) -> Rc<RefCell<WsOut>> {
        Rc::new(RefCell::new(WsOut {
            frames: VecDeque::with_capacity(32),
            arena: BytesMut::with_capacity(16 * 1024),
            spare_arena: BytesMut::new(),
            batch: Vec::new(),
            queued: 0,
            left: 0,
            limit,
            soft: false,
            controls: 0,
            max_controls: 16,
            late_pong: None,
            closing: false,
            overflowed: false,
            waker: None,
            close_waker: None,
            writer_done: false,
            write_failed: false,
            charge: None,
            keys: (side == Side::Client).then(MaskKeys::new),
        }))
    }

    /// Most control frames (pongs, pings) queued at once (default 16); more are dropped.
    pub fn limit_controls(&mut self, n: usize) {
        self.max_controls = n;
    }

    /// Changes the byte limit for data sends (a client connection's share).
    pub fn set_limit(&mut self, n: usize) {
        self.limit = n;
    }

    /// Sets the byte limit as a client connection's share, checked before a message is added:
    /// a data message is let in while what is queued is within the share, however large the
    /// message, so a client that reads promptly gets an answer larger than its share (as over
    /// HTTP), also with other answers queued, instead of a close as a slow reader. The outbox
    /// holds at most the share plus one message (itself bounded by the task link's message
    /// size).
    pub fn set_soft_limit(&mut self, n: usize) {
        self.limit = n;
        self.soft = true;
    }

    /// Whether `n` more bytes of data fit.
    fn fits(&self, n: usize) -> bool {
        self.queued + n <= self.limit || (self.soft && self.queued <= self.limit)
    }

    /// Charges what is queued from now on to the shard's memory budget: a data message the
    /// budget cannot take is refused like one over the limit ([`WsOut::send_binary`]; an
    /// answer already made is charged whatever is left: [`WsOut::send_binary_forced`]).
    pub(crate) fn charge_to(&mut self, charge: crate::shard::OutboxCharge) {
        self.charge = Some(charge);
    }

    /// Gives the arenas back when nothing is queued, for a session that has been idle a
    /// while; the next frame takes a new one.
    pub fn give_back(&mut self) {
        if self.frames.is_empty() && self.queued == 0 {
            (self.arena, self.spare_arena) = (BytesMut::new(), BytesMut::new());
            (self.frames, self.batch) = (VecDeque::new(), Vec::new());
        }
    }

    /// The number of the frame queued last (numbers count up from 0 per outbox), for
    /// [`WsOut::own_payload`].
    pub fn last_frame(&self) -> u64 {
        (self.left + self.frames.len() as u64).wrapping_sub(1)
    }

    /// Copies the payload of frame `n` out of the buffer it is a slice of, if the frame still
    /// waits (the writer has not taken it) and its payload was not copied when queued (a
    /// server's payload over [`COPY_PAYLOAD_BYTES`]: a request forwarded from the read buffer
    /// of the client that sent it). For a task or peer link's request answered without it (a
    /// 504 at its deadline, a 502 when the link is lost, or its client gone): as a slice the
    /// waiting frame would keep the client's whole read buffer alive, charged to nothing, for
    /// as long as the link is slow (and an `/api/ws` session holding such buffers pauses its
    /// reads). The copy is bounded by the link's byte limit like the frame itself; a request
    /// still waited for keeps its frame a slice (its client's charge covers it). Call it once
    /// per frame. Returns the bytes copied.
    pub fn own_payload(&mut self, n: u64) -> usize {
        let Some(i) = n.checked_sub(self.left) else {
            return 0;
        };
        match usize::try_from(i).ok().and_then(|i| self.frames.get_mut(i)) {
            Some(q) if !q.payload.is_empty() => {
                q.payload = Bytes::copy_from_slice(&q.payload);
                q.payload.len()
            }
            _ => 0,
        }
    }

    /// Bytes waiting.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// True when a data message of `n` bytes (payload and head) is within this outbox's
    /// limit now.
    pub fn has_room(&self, n: usize) -> bool {
        self.fits(n + MAX_HEADER)
    }

    /// True once a close frame is queued or the connection is aborted.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// True when [`WsOut::close_now`] closed it: the other side did not read.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// True once a write of the writer task failed: nothing more reaches the other side.
    pub fn write_failed(&self) -> bool {
        self.write_failed
    }

    fn push_frame(&mut self, op: u8, head: &[u8], payload: &Bytes) {
        let mut wh = [0u8; MAX_HEADER];
        let len = head.len() + payload.len();
        // A client masks every frame with a fresh key from a strong source (RFC 6455 5.3):
        // its payload is copied into the arena and masked there. A server's payload is sent
        // as it is, without a copy, unless it is small.
        let key = self.keys.as_mut().map(|k| k.next());
        let n = frame::encode_head(op, len, key, &mut wh);
        let copy = key.is_some() || payload.len() <= COPY_PAYLOAD_BYTES;
        let copied = n + head.len() + if copy { payload.len() } else { 0 };
        // The arena keeps what the writer has not taken: a new one is twice what it must
        // hold, so a queue that grows while the writer waits is copied O(1) times per byte.
        let pending = self.arena.len() + copied;
        make_room(
            &mut self.arena,
            &mut self.spare_arena,
            copied,
            (16 * 1024).max(2 * pending),
        );
        let start = self.arena.len();
        self.arena.extend_from_slice(&wh[..n]);
        self.arena.extend_from_slice(head);
        let q = if copy {
            self.arena.extend_from_slice(payload);
            if let Some(k) = key {
                frame::unmask(&mut self.arena[start + n..], k, 0);
            }
            Queued {
                copied,
                payload: Bytes::new(),
            }
        } else {
            Queued {
                copied,
                payload: payload.clone(),
            }
        };
        self.queued += q.len();
        self.frames.push_back(q);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Queues one binary message made of `head` (copied; small) and `payload` (copied when
    /// small or masked, else queued as the slice it is).
    pub fn send_binary(&mut self, head: &[u8], payload: &Bytes) -> Result<(), Refused> {
        let n = head.len() + payload.len();
        if self.closing || !self.fits(n) {
            return Err(Refused);
        }
        if let Some(c) = &mut self.charge {
            if !c.try_add(n + MAX_HEADER) {
                return Err(Refused);
            }
            let before = self.queued;
            self.push_frame(opcode::BINARY, head, payload);
            // Charged a whole header's worth; give back what the header did not use.
            let used = self.queued - before;
            if let Some(c) = &mut self.charge {
                c.release(n + MAX_HEADER - used);
            }
            return Ok(());
        }
        self.push_frame(opcode::BINARY, head, payload);
        Ok(())
    }

    /// [`WsOut::send_binary`] for an answer already made: charged to the shard's budget
    /// whatever it has left (its memory is held already, the payload a slice of the task's
    /// frame; refused, the answer of a request that ran would be lost), still refused over
    /// the connection's limit or once closing.
    pub fn send_binary_forced(&mut self, head: &[u8], payload: &Bytes) -> Result<(), Refused> {
        if self.closing || !self.fits(head.len() + payload.len()) {
            return Err(Refused);
        }
        self.push_forced(opcode::BINARY, head, payload);
        Ok(())
    }

    /// Queues a frame (`head`, then `payload` as [`WsOut::push_frame`] takes it), charged
    /// whatever the budget has left.
    fn push_forced(&mut self, op: u8, head: &[u8], payload: &Bytes) {
        let before = self.queued;
        self.push_frame(op, head, payload);
        let n = self.queued - before;
        if let Some(c) = &mut self.charge {
            c.force_add(n);
        }
    }

    /// Queues a text message (control-plane JSON). It may go past the outbox's byte limit by
    /// [`CONTROL_SLACK`] (a full outbox is a busy link's normal state); past that the other
    /// side does not read what it is sent: the message is refused and the connection closed
    /// with 1013 behind what is queued.
    pub fn send_text(&mut self, text: &str) -> Result<(), Refused> {
        if self.closing {
            return Err(Refused);
        }
        if self.queued + text.len() + MAX_HEADER > self.limit.saturating_add(CONTROL_SLACK) {
            self.overflowed = true;
            self.close(1013);
            return Err(Refused);
        }
        self.push_forced(opcode::TEXT, text.as_bytes(), &Bytes::new());
        Ok(())
    }

    /// Queues a ping or pong. Dropped while the outbox is over its byte limit or holds its
    /// count of control frames: a peer that floods pings and never reads must not grow it.
    /// RFC 6455 (5.5.3) lets a pong answer only the latest ping, so the newest pong dropped is
    /// kept (one, at most 125 bytes) and sent when the writer has emptied the queue: the
    /// latest ping is answered, the ones before it may not be.
    pub fn send_control(&mut self, op: u8, data: &[u8]) {
        let data = &data[..data.len().min(125)];
        if self.closing {
            return;
        }
        if self.queued <= self.limit && self.controls < self.max_controls {
            self.controls += 1;
            self.push_forced(op, data, &Bytes::new());
        } else if op == opcode::PONG {
            let mut p = [0u8; 125];
            p[..data.len()].copy_from_slice(data);
            self.late_pong = Some((p, data.len() as u8));
        }
    }

    /// Queues a close frame; the writer stops once it is written.
    pub fn close(&mut self, code: u16) {
        self.close_with_reason(code, "");
    }

    /// Queues a close frame with a short reason (UTF-8, cut at the 123 bytes a close frame
    /// has room for, RFC 6455 5.5); the writer stops once it is written.
    pub fn close_with_reason(&mut self, code: u16, reason: &str) {
        if !self.closing {
            let mut cut = reason.len().min(123);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut p = [0u8; 125];
            p[..2].copy_from_slice(&code.to_be_bytes());
            p[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
            self.push_forced(opcode::CLOSE, &p[..2 + cut], &Bytes::new());
            self.closing = true;
            if let Some(w) = self.close_waker.take() {
                w.wake();
            }
        }
    }

    /// Closes a connection whose other side does not read: drops the frames the writer has
    /// not started (their bytes go back to the budget at once), and queues the close frame
    /// next, so it does not wait behind answers that will never be read.
    pub fn close_now(&mut self, code: u16) {
        if self.closing {
            return;
        }
        self.left += self.frames.len() as u64;
        let dropped: usize = self.frames.drain(..).map(|q| q.len()).sum();
        self.arena.clear();
        self.queued -= dropped;
        if let Some(c) = &mut self.charge {
            c.release(dropped);
        }
        self.controls = 0;
        self.late_pong = None;
        self.overflowed = true;
        self.close(code);
    }

    /// The writer has ended (see [`written`]).
    fn writer_ended(&mut self) {
        self.writer_done = true;
        if let Some(w) = self.close_waker.take() {
            w.wake();
        }
    }

    /// Stops the writer without a close frame (the socket is gone).
    pub fn abort(&mut self) {
        self.closing = true;
        self.left += self.frames.len() as u64;
        self.frames.clear();
        self.arena.clear();
        if let Some(c) = &mut self.charge {
            c.release(self.queued);
        }
        self.queued = 0;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        if let Some(w) = self.close_waker.take() {
            w.wake();
        }
    }

    /// Accounts `n` bytes the writer has written.
    fn written(&mut self, n: usize) {
        let n = n.min(self.queued);
        self.queued -= n;
        if let Some(c) = &mut self.charge {
            c.release(n);
        }
    }
}

/// A websocket connection over a client stream (plain TCP or TLS) once the handshake is done:
/// the reader, the shared outbox, and the writer task that drains it.
pub struct WsConn<S: Stream = glommio::net::TcpStream> {
    /// Reads whole messages.
    pub reader: WsReader<S::Reader>,
    /// Queues messages for the writer task; shared by everything that answers on it.
    pub out: Rc<RefCell<WsOut>>,
    /// The writer task; ends when the outbox is closed and drained, or the socket fails.
    pub writer: glommio::Task<io::Result<()>>,
}

/// Splits `stream` and starts its writer task. `leftover`: bytes read past the handshake.
pub fn start<S: Stream>(
    stream: S,
    leftover: BytesMut,
    side: Side,
    max_message: usize,
    limits: &crate::config::Limits,
) -> WsConn<S> {
    start_with(stream, leftover, side, max_message, limits, |w| w)
}

/// [`start`], the writer task writing through `wrap` of the stream's writer (a client
/// session's is held to a pace).
pub fn start_with<S: Stream, W: PartsWriter + 'static>(
    stream: S,
    leftover: BytesMut,
    side: Side,
    max_message: usize,
    limits: &crate::config::Limits,
    wrap: impl FnOnce(S::Writer) -> W,
) -> WsConn<S> {
    let (rd, wr) = stream.into_split();
    let out = WsOut::new(side, limits.max_link_outbox_bytes);
    out.borrow_mut()
        .limit_controls(limits.max_queued_control_frames);
    let writer = glommio::spawn_local(write_loop(out.clone(), wrap(wr)));
    let mut reader = WsReader::new(rd, leftover, side, max_message);
    reader.limit_control_rate(limits.max_control_frames_per_sec);
    WsConn {
        reader,
        out,
        writer,
    }
}

/// Sends a ping every `every` until the outbox closes: the keepalive of task and peer links
/// (the other side's read timeout of 3 intervals ends a silent link).
pub fn spawn_pinger(out: Rc<RefCell<WsOut>>, every: std::time::Duration) -> glommio::Task<()> {
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(every).await;
            let mut o = out.borrow_mut();
            if o.is_closing() {
                break;
            }
            o.send_control(opcode::PING, b"");
        }
    })
}

/// Resolves once `done` holds of `out`, woken by the outbox's one close waker (so one waiter
/// per outbox: a task may wait on several of these at once, as its waker is the same).
fn close_event(out: &RefCell<WsOut>, done: fn(&WsOut) -> bool) -> impl Future<Output = ()> + '_ {
    futures_lite::future::poll_fn(move |cx| {
        let mut o = out.borrow_mut();
        if done(&o) {
            Poll::Ready(())
        } else {
            if !o
                .close_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                o.close_waker = Some(cx.waker().clone());
            }
            Poll::Pending
        }
    })
}

/// Resolves once `out` is closing: lets a connection's reader stop waiting for input when
/// something else closed the connection (an outbox over its limit).
pub fn closed(out: &RefCell<WsOut>) -> impl Future<Output = ()> + '_ {
    close_event(out, |o| o.closing)
}

/// The most a link the router closed may take to end, in `limits.handshake_timeout_ms`, from
/// the close (see [`until_closed_or_late`]).
pub const CLOSE_CAP: u32 = 4;

/// Resolves once the writer of `out` has ended: its close frame (and everything queued before
/// it) is written, or a write failed.
pub fn written(out: &RefCell<WsOut>) -> impl Future<Output = ()> + '_ {
    close_event(out, |o| o.writer_done)
}

/// Runs a link's read loop `read` until it ends, or until `limits.handshake_timeout_ms` after
/// our close frame was written, whichever comes first (then [`WsError::CloseTimeout`], logged and
/// counted in `fedbus_close_timeouts_total`). Once we send a close frame the other side should
/// answer with its own and close (RFC 6455 7.1.1); one that does not, and keeps pinging so
/// that the read timeout never ends the link, would otherwise keep its socket and its reader
/// for as long as it likes. The read loop is one future for the whole link, so this costs
/// nothing per message.
pub(crate) async fn until_closed_or_late<T>(
    shard: &crate::shard::Shard,
    out: &RefCell<WsOut>,
    read: impl Future<Output = Result<T, WsError>>,
) -> Result<T, WsError> {
    let limit = std::time::Duration::from_millis(shard.cfg.limits.handshake_timeout_ms);
    // From the write, not from the close: the answers queued before the close frame take
    // what they take (a slow reader of a full outbox is bounded by the write timeout).
    let late = async move {
        let after_write = async {
            written(out).await;
            // A link whose write failed is over at once: nothing more can reach the other side.
            if !out.borrow().write_failed {
                glommio::timer::sleep(limit).await;
            }
        };
        // However slowly the other side reads what was queued before the close frame, the
        // link ends at most `CLOSE_CAP` handshake timeouts after the close.
        let cap = async {
            closed(out).await;
            glommio::timer::sleep(limit * CLOSE_CAP).await;
        };
        futures_util::future::select(std::pin::pin!(after_write), std::pin::pin!(cap)).await;
    };
    match futures_util::future::select(std::pin::pin!(read), std::pin::pin!(late)).await {
        futures_util::future::Either::Left((r, _)) => r,
        futures_util::future::Either::Right(_) if out.borrow().write_failed => Err(WsError::Io(
            io::Error::new(io::ErrorKind::BrokenPipe, "a write to the link failed"),
        )),
        futures_util::future::Either::Right(_) => {
            crate::metrics::ShardMetrics::inc(&shard.metrics.close_timeouts);
            tracing::info!(
                shard = shard.index,
                "link did not answer our close within limits.handshake_timeout_ms: dropped"
            );
            Err(WsError::CloseTimeout(limit))
        }
    }
}

/// Waits until the outbox has something to write or is closing.
struct Ready<'a>(&'a RefCell<WsOut>);

impl Future for Ready<'_> {
    type Output = bool;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut o = self.0.borrow_mut();
        if !o.frames.is_empty() {
            Poll::Ready(true)
        } else if o.closing {
            Poll::Ready(false)
        } else {
            o.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Most slices in one `sendmsg`.
const MAX_IOV: usize = 64;

/// The writer stops taking frames for a batch once it holds this many copied bytes: copied
/// frames need no slice of their own, so `MAX_IOV` alone would not bound them, and frames
/// left in the queue can still be dropped whole ([`WsOut::close_now`]). Frames with a payload
/// of their own are bounded by `MAX_IOV`, as before copying.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// The write side of a socket together with that socket's own descriptor, for `sendmsg(2)`:
/// built only from the stream itself ([`SocketWriter::new`], [`split`]), so the descriptor is
/// never an unrelated one, and it stays open as long as the writer holds the stream.
pub struct SocketWriter<W> {
    fd: RawFd,
    io: W,
}

impl<'a, S: std::os::unix::io::AsRawFd> SocketWriter<&'a mut S> {
    /// A writer over a borrowed socket stream (TCP or unix).
    pub fn new(stream: &'a mut S) -> Self {
        SocketWriter {
            fd: stream.as_raw_fd(),
            io: stream,
        }
    }
}

/// The read half of a split stream.
pub type ReadHalf<S = glommio::net::TcpStream> = super::stream::Half<S>;
/// The writer of a split stream.
pub type WriteHalf<S = glommio::net::TcpStream> = SocketWriter<super::stream::Half<S>>;

/// Splits `stream` (TCP or unix) into its read half and a [`SocketWriter`] over its write half.
pub fn split<S>(stream: S) -> (ReadHalf<S>, WriteHalf<S>)
where
    S: std::os::unix::io::AsRawFd + AsyncRead + AsyncWrite + Unpin,
{
    let fd = stream.as_raw_fd();
    let (r, w) = super::stream::Half::pair(stream);
    (r, SocketWriter { fd, io: w })
}

impl<W: AsyncWrite + Unpin> SocketWriter<W> {
    /// Writes all of `parts` in order: `sendmsg(2)` with MSG_DONTWAIT for as much as the
    /// socket takes at once, then the async stream (which waits for room) for the rest of one
    /// slice.
    pub async fn write_all_vectored(&mut self, parts: &[Bytes]) -> io::Result<()> {
        write_all_vectored(self.fd, &mut self.io, parts).await
    }

    /// Shuts the socket down both ways: wakes a reader blocked on the other half.
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on this writer's own socket, open while `self.io` holds it.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }

    /// Flushes and closes the write side.
    pub async fn close(&mut self) {
        let _ = self.io.flush().await;
        let _ = self.io.close().await;
    }
}

/// The writer task of a connection: drains the outbox in batches until it closes.
pub async fn write_loop<W: PartsWriter>(out: Rc<RefCell<WsOut>>, mut w: W) -> io::Result<()> {
    while Ready(&out).await {
        let mut batch = {
            let mut o = out.borrow_mut();
            let mut batch = std::mem::take(&mut o.batch);
            batch.reserve(MAX_IOV);
            // Whole frames only: what is left in the queue can be dropped at a frame boundary.
            // The copied bytes of consecutive frames leave as one slice of the arena.
            let (mut copied, mut taken, frames) = (0, 0, o.frames.len());
            while batch.len() + 2 <= MAX_IOV && taken < MAX_BATCH_BYTES {
                let Some(q) = o.frames.pop_front() else { break };
                taken += q.copied;
                copied += q.copied;
                if !q.payload.is_empty() {
                    batch.push(o.arena.split_to(copied).freeze());
                    batch.push(q.payload);
                    copied = 0;
                }
            }
            if copied > 0 {
                batch.push(o.arena.split_to(copied).freeze());
            }
            let waiting = o.frames.len();
            o.left += (frames - waiting) as u64;
            if waiting == 0 {
                o.controls = 0;
            }
            batch
        };
        let n: usize = batch.iter().map(Bytes::len).sum();
        let r = w.write_parts(&batch).await;
        batch.clear();
        let mut o = out.borrow_mut();
        o.batch = batch;
        o.written(n);
        if let Err(e) = r {
            o.abort();
            o.write_failed = true;
            o.writer_ended();
            return Err(e);
        }
        if o.frames.is_empty() {
            if let Some((p, n)) = o.late_pong.take() {
                o.send_control(opcode::PONG, &p[..usize::from(n)]);
            }
        }
    }
    w.close().await;
    out.borrow_mut().writer_ended();
    Ok(())
}

/// See [`SocketWriter::write_all_vectored`]; `fd` must be the socket `w` writes to.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    fd: RawFd,
    w: &mut W,
    parts: &[Bytes],
) -> io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    while i < parts.len() {
        let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut cnt = 0;
        for (k, p) in parts[i..].iter().take(MAX_IOV).enumerate() {
            let s = if k == 0 { &p[off..] } else { &p[..] };
            iov[cnt] = libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            };
            cnt += 1;
        }
        // SAFETY: msghdr is zeroed and points at `cnt` iovecs that borrow `parts`, alive for
        // the call.
        let r = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = cnt as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        let mut adv = if r >= 0 {
            r as usize
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => {
                    // Socket full: let the reactor wait for room, writing part of one slice.
                    let n = w.write(&parts[i][off..]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    n
                }
                Some(libc::EINTR) => 0,
                _ => return Err(e),
            }
        };
        while adv > 0 && i < parts.len() {
            let left = parts[i].len() - off;
            if adv >= left {
                adv -= left;
                i += 1;
                off = 0;
            } else {
                off += adv;
                adv = 0;
            }
        }
        // Skip empty slices so the loop ends.
        while i < parts.len() && parts[i].len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// A reader that hands out `data` in small pieces and checks that every buffer it is given
    /// holds only zeros past what it already wrote (never stale or uninitialized bytes).
    struct Trickle<'a> {
        data: &'a [u8],
        piece: usize,
    }

    impl futures_lite::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            assert!(
                buf.iter().all(|b| *b == 0),
                "a reader was handed non-zeroed bytes"
            );
            let n = self.piece.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn read_space_zeroes_once_per_allocation_and_keeps_every_byte() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut r = Trickle {
            data: &data,
            piece: 777,
        };
        let (mut buf, mut space, mut got) = (
            BytesMut::with_capacity(4096),
            ReadSpace::default(),
            Vec::new(),
        );
        futures_lite::future::block_on(async {
            loop {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                let n = space.read(&mut r, &mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                // Consume some of it, as a parser splits frames off the front.
                let take = buf.len() / 2;
                got.extend_from_slice(&buf.split_to(take));
            }
        });
        got.extend_from_slice(&buf);
        assert_eq!(got, data);
    }
    use super::*;
    use futures_lite::future::block_on;

    fn masked(op: u8, payload: &[u8], mask: [u8; 4], fin: bool) -> Vec<u8> {
        let mut h = [0u8; MAX_HEADER];
        let n = frame::encode_head(op, payload.len(), Some(mask), &mut h);
        if !fin {
            h[0] &= 0x7F;
        }
        let mut v = h[..n].to_vec();
        let mut p = payload.to_vec();
        frame::unmask(&mut p, mask, 0);
        v.extend_from_slice(&p);
        v
    }

    #[test]
    fn reader_parses_masked_frames_and_fragments() {
        let mut wire = masked(opcode::BINARY, b"hello", [9, 8, 7, 6], true);
        wire.extend(masked(opcode::PING, b"p", [1, 1, 1, 1], true));
        wire.extend(masked(opcode::TEXT, b"ab", [1, 2, 3, 4], false));
        wire.extend(masked(opcode::CONTINUATION, b"cd", [4, 3, 2, 1], true));
        wire.extend(masked(opcode::CLOSE, &1000u16.to_be_bytes(), [0; 4], true));
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Server, 1024);
        block_on(async {
            assert_eq!(
                r.next().await.unwrap(),
                Message::Binary(Bytes::from_static(b"hello"))
            );
            assert_eq!(
                r.next().await.unwrap(),
                Message::Ping(Bytes::from_static(b"p"))
            );
            assert_eq!(
                r.next().await.unwrap(),
                Message::Text(Bytes::from_static(b"abcd"))
            );
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1000)));
            assert!(matches!(r.next().await, Err(WsError::Eof)));
        });
    }

    /// Control frames between the fragments of a message at its size limit are read, not
    /// counted in the message (they used to close the connection with 1009).
    #[test]
    fn control_frames_between_fragments_do_not_count_toward_the_message() {
        let mut wire = masked(opcode::TEXT, &[b'a'; 1000], [1, 2, 3, 4], false);
        wire.extend(masked(opcode::PING, &[b'p'; 100], [5, 6, 7, 8], true));
        wire.extend(masked(
            opcode::CONTINUATION,
            &[b'b'; 24],
            [4, 3, 2, 1],
            true,
        ));
        wire.extend(masked(opcode::TEXT, &[b'c'; 1000], [1, 2, 3, 4], false));
        wire.extend(masked(opcode::CLOSE, &1000u16.to_be_bytes(), [0; 4], true));
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Server, 1024);
        block_on(async {
            assert_eq!(
                r.next().await.unwrap(),
                Message::Ping(Bytes::from(vec![b'p'; 100]))
            );
            let mut text = vec![b'a'; 1000];
            text.extend([b'b'; 24]);
            assert_eq!(r.next().await.unwrap(), Message::Text(Bytes::from(text)));
            // A close in the middle of a message ends the connection cleanly.
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1000)));
        });
        // The message itself is still bounded: one byte more is 1009.
        let mut wire = masked(opcode::TEXT, &[b'a'; 1000], [1, 2, 3, 4], false);
        wire.extend(masked(
            opcode::CONTINUATION,
            &[b'b'; 25],
            [4, 3, 2, 1],
            true,
        ));
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Server, 1024);
        assert_eq!(block_on(r.next()).unwrap_err().close_code(), Some(1009));
    }

    /// What each read is offered: 4 KiB while the peer sends little (so an idle connection
    /// touches 4 KiB of its buffer, not the whole chunk), doubling after each read that filled
    /// its offer, up to `READ_CHUNK`, and never more than the buffer's spare room.
    #[test]
    fn read_space_offers_more_only_after_full_reads() {
        struct Offered(Vec<usize>, Vec<usize>);
        impl AsyncRead for Offered {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                let n = self.0.remove(0).min(buf.len());
                self.1.push(buf.len());
                Poll::Ready(Ok(n))
            }
        }
        // Small reads, then a bulk transfer, then small again.
        let mut r = Offered(
            vec![
                300,
                200,
                usize::MAX,
                usize::MAX,
                usize::MAX,
                usize::MAX,
                usize::MAX,
                usize::MAX,
                10,
            ],
            Vec::new(),
        );
        let mut buf = BytesMut::with_capacity(1 << 20);
        let mut space = ReadSpace::default();
        futures_lite::future::block_on(async {
            for _ in 0..9 {
                space.read(&mut r, &mut buf).await.expect("read");
                buf.clear();
            }
        });
        let k = 1024;
        assert_eq!(
            r.1,
            [
                4 * k,
                4 * k,
                4 * k,
                8 * k,
                16 * k,
                32 * k,
                64 * k,
                64 * k,
                64 * k
            ],
            "offers"
        );
        // A buffer with less spare room than the offer gets what it has.
        let mut r = Offered(vec![usize::MAX], Vec::new());
        let mut small = BytesMut::with_capacity(1000);
        futures_lite::future::block_on(ReadSpace::default().read(&mut r, &mut small))
            .expect("read");
        assert_eq!(r.1, [small.capacity()]);
    }

    /// A reader that hands out at most `.1` bytes per read.
    struct Chunks<'a>(&'a [u8], usize);

    impl AsyncRead for Chunks<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Poll::Ready(Ok(n))
        }
    }

    /// A large message arriving in pieces is charged what came and a window ahead
    /// ([`crate::shard::charge_ahead`]), growing after each read, then the whole once it is in:
    /// not the length its frame announces from its head on.
    #[test]
    fn a_large_message_is_charged_as_it_arrives_not_as_announced() {
        let len = 600 * 1024;
        let wire = masked(opcode::BINARY, &vec![b'x'; len], [1, 2, 3, 4], true);
        let told = Rc::new(RefCell::new(Vec::new()));
        let mut r = WsReader::new(
            Chunks(&wire, 32 * 1024),
            BytesMut::new(),
            Side::Server,
            1 << 20,
        );
        let t = told.clone();
        r.charge_arriving(move |h| {
            t.borrow_mut().push(h);
            true
        });
        let m = block_on(r.next()).unwrap();
        assert_eq!(m, Message::Binary(Bytes::from(vec![b'x'; len])));
        let told = told.borrow();
        assert!(told.len() > 3, "{told:?}");
        // The first read (4 KiB, the first offer) brought the head and 4 KiB less the header.
        let header = wire.len() - len;
        let first = Hold {
            now: FIRST_OFFER - header + crate::shard::CHARGE_AHEAD,
            whole: len,
            fresh: true,
        };
        assert_eq!(told[0], first);
        for w in told.windows(2) {
            assert!(w[0].now < w[1].now && !w[1].fresh, "{told:?}");
            assert_eq!(w[1].whole, len);
        }
        assert_eq!(told.last().map(|h| h.now), Some(len));
    }

    /// A large message refused as it grows (its head fit, so room was made for all of it) is
    /// read and dropped in small buffers: the one made for it is let go, not filled while
    /// charged nothing. The next message is read as usual.
    #[test]
    fn a_message_refused_as_it_grows_is_not_read_into_the_room_made_for_it() {
        let len = 600 * 1024;
        let mut wire = masked(opcode::BINARY, &vec![b'x'; len], [1, 2, 3, 4], true);
        wire.extend(masked(opcode::BINARY, b"next", [1, 2, 3, 4], true));
        let mut r = WsReader::new(
            Chunks(&wire, 32 * 1024),
            BytesMut::new(),
            Side::Server,
            1 << 20,
        );
        r.charge_arriving(|h| h.now < 300 * 1024);
        let mut most = 0;
        block_on(async {
            let e = loop {
                match r.try_buffered() {
                    Ok(Some(m)) => panic!("{m:?}"),
                    Err(e) => break e,
                    Ok(None) => {}
                }
                r.make_read_room().await;
                // The buffer the next read goes into.
                if r.dropping.is_some() {
                    most = most.max(r.buf.capacity());
                }
                r.fill().await.unwrap();
            };
            assert!(matches!(e, WsError::Dropped { text: false, .. }), "{e:?}");
            assert_eq!(
                r.next().await.unwrap(),
                Message::Binary(Bytes::from_static(b"next"))
            );
        });
        assert!(most <= 2 * READ_CHUNK, "dropped into a buffer of {most}");
    }

    #[test]
    fn a_message_is_charged_while_it_arrives() {
        // A fragmented message read 100 bytes at a time: each fragment and the frame being
        // read are charged before they are buffered, and the charge ends with the message.
        let mut wire = masked(opcode::BINARY, &[b'a'; 300], [1, 2, 3, 4], false);
        wire.extend(masked(opcode::PING, b"p", [5, 6, 7, 8], true));
        wire.extend(masked(
            opcode::CONTINUATION,
            &[b'b'; 500],
            [4, 3, 2, 1],
            true,
        ));
        wire.extend(masked(opcode::BINARY, &[b'c'; 10], [1, 2, 3, 4], true));
        // Read 100 bytes at a time, or all at once (each fragment arrives whole: the charge
        // still grows to the whole message).
        for step in [100, 1 << 16] {
            let told = Rc::new(RefCell::new(Vec::new()));
            let mut r = WsReader::new(Chunks(&wire, step), BytesMut::new(), Side::Server, 1 << 20);
            let t = told.clone();
            r.charge_arriving(move |h| {
                t.borrow_mut().push(h.now);
                true
            });
            block_on(async {
                assert_eq!(
                    r.next().await.unwrap(),
                    Message::Ping(Bytes::from_static(b"p"))
                );
                let mut whole = vec![b'a'; 300];
                whole.extend([b'b'; 500]);
                assert_eq!(r.next().await.unwrap(), Message::Binary(Bytes::from(whole)));
                // A small message read whole in one read is not charged here.
                assert_eq!(
                    r.next().await.unwrap(),
                    Message::Binary(Bytes::from(vec![b'c'; 10]))
                );
            });
            // The charge stays with the whole message (its reader takes it over): no 0.
            assert_eq!(*told.borrow(), vec![300, 800], "step {step}");
        }
        // A new message inside a fragmented one fails (1002) before it is charged, not dropped.
        let mut wire = masked(opcode::BINARY, &[b'a'; 10], [1, 2, 3, 4], false);
        wire.extend(masked(opcode::TEXT, &[b'b'; 5000], [1, 2, 3, 4], true));
        let mut r = WsReader::new(Chunks(&wire, 100), BytesMut::new(), Side::Server, 1 << 20);
        r.charge_arriving(|h| h.now < 1000);
        let e = block_on(r.next()).unwrap_err();
        assert!(matches!(e, WsError::Protocol(_)), "{e:?}");
        // Refused: the message is dropped as it arrives (its first bytes handed out, unmasked),
        // a control frame between its fragments is read as usual, and the next message after
        // it is read as if nothing happened. Whole frames and a frame split across reads alike;
        // a dropped Text message says so (its UTF-8 is never checked).
        let mut head = vec![b'a'; 10];
        head.extend((0..90u8).collect::<Vec<_>>());
        for first in [opcode::BINARY, opcode::TEXT] {
            let mut wire = masked(first, &head, [1, 2, 3, 4], false);
            wire.extend(masked(opcode::PING, b"p", [5, 6, 7, 8], true));
            wire.extend(masked(
                opcode::CONTINUATION,
                &[b'b'; 3000],
                [9, 9, 9, 9],
                false,
            ));
            wire.extend(masked(
                opcode::CONTINUATION,
                &[b'c'; 2000],
                [4, 3, 2, 1],
                true,
            ));
            wire.extend(masked(opcode::TEXT, b"next", [1, 2, 3, 4], true));
            for step in [7, 100, 1 << 16] {
                let mut r =
                    WsReader::new(Chunks(&wire, step), BytesMut::new(), Side::Server, 1 << 20);
                r.charge_arriving(|h| h.now < 1000);
                block_on(async {
                    let mut got = Vec::new();
                    loop {
                        match r.next().await {
                            Ok(Message::Text(t)) => {
                                got.push(format!("text {}", String::from_utf8_lossy(&t)));
                                break;
                            }
                            Ok(m) => got.push(format!("{m:?}")),
                            Err(WsError::Dropped { head: h, text }) => {
                                assert_eq!(&h[..], &head[..DROPPED_HEAD], "step {step}");
                                assert_eq!(text, first == opcode::TEXT, "step {step}");
                                got.push("dropped".into());
                            }
                            Err(e) => panic!("step {step}: {e}"),
                        }
                    }
                    assert_eq!(got, ["Ping(b\"p\")", "dropped", "text next"], "step {step}");
                });
            }
        }
        let dropped = WsError::Dropped {
            head: Bytes::new(),
            text: false,
        };
        assert_eq!(dropped.close_code(), Some(1013));
    }

    /// A request in flight keeps the read buffer it was cut from: the buffer is retired, not
    /// dropped, and is free again once the request is gone. With [`WsReader::limit_pinned`]
    /// refusing, a new buffer is not made while retired ones are held (the first is: nothing
    /// was held before it): the reader waits until a message is gone, then reads on.
    #[test]
    fn read_buffers_held_by_messages_are_retired_and_bounded() {
        use std::cell::Cell;
        use std::time::Duration;
        glommio::LocalExecutor::default().run(async {
            let mut wire = masked(opcode::BINARY, b"small", [1, 2, 3, 4], true);
            wire.extend(masked(opcode::BINARY, &[b'b'; 60_000], [5, 6, 7, 8], true));
            wire.extend(masked(opcode::BINARY, b"after", [1, 2, 3, 4], true));
            let binary = |m: Result<Message, WsError>| match m {
                Ok(Message::Binary(b)) => b,
                m => panic!("{m:?}"),
            };
            for limit in [false, true] {
                let mut r = WsReader::new(
                    Chunks(&wire, 1 << 16),
                    BytesMut::new(),
                    Side::Server,
                    1 << 20,
                );
                let asked: Rc<Cell<Option<PinAsk>>> = Rc::default();
                if limit {
                    let asked = asked.clone();
                    r.limit_pinned(move |ask| {
                        asked.set(Some(ask));
                        // Asked only while a retired buffer is held: never.
                        false
                    });
                }
                let small = binary(r.next().await);
                assert_eq!(&small[..], b"small");
                // Needs a new buffer while `small` holds the first: nothing was held before.
                let big = binary(r.next().await);
                assert_eq!(big.len(), 60_000);
                assert_eq!(r.pinned().0, 1, "the buffer `small` holds is retired");
                if !limit {
                    drop(small);
                    assert_eq!(r.pinned(), (0, 0), "free once its message is gone");
                    assert_eq!(&binary(r.next().await)[..], b"after");
                    continue;
                }
                // Both buffers held: the next read waits for one to be free.
                let mut next = std::pin::pin!(r.next());
                let early = futures_lite::future::or(async { Some((&mut next).await) }, async {
                    glommio::timer::sleep(Duration::from_millis(30)).await;
                    None
                })
                .await;
                assert!(
                    early.is_none(),
                    "read on while both buffers are held: {early:?}"
                );
                // Asked with the retired first buffer (4 KiB) held by `small`.
                let ask = asked.get().expect("asked");
                assert_eq!(ask.bytes, FIRST_OFFER, "{ask:?}");
                assert!(ask.again, "asked again while it waits: {ask:?}");
                drop(small);
                let after =
                    glommio::timer::timeout(Duration::from_secs(5), async { Ok(next.await) });
                assert_eq!(
                    &binary(after.await.expect("read on once a buffer is free"))[..],
                    b"after"
                );
                drop(big);
            }
        });
    }

    /// A fragmented message keeps no read buffer alive while it is assembled: a reader whose
    /// [`WsReader::limit_pinned`] refuses every wait still reads a large one whole (it waited
    /// for ever when the first fragment was a slice of its read buffer).
    #[test]
    fn a_fragmented_message_does_not_wait_on_itself() {
        glommio::LocalExecutor::default().run(async {
            let mut wire = masked(opcode::BINARY, &[b'a'; 200_000], [1, 2, 3, 4], false);
            wire.extend(masked(
                opcode::CONTINUATION,
                &[b'b'; 100_000],
                [5, 6, 7, 8],
                true,
            ));
            let mut r = WsReader::new(
                Chunks(&wire, 1 << 16),
                BytesMut::new(),
                Side::Server,
                1 << 20,
            );
            r.limit_pinned(|_| false);
            let got = glommio::timer::timeout(std::time::Duration::from_secs(5), async {
                Ok(r.next().await)
            })
            .await
            .expect("read whole without waiting");
            assert!(matches!(got, Ok(Message::Binary(b)) if b.len() == 300_000));
        });
    }

    #[test]
    fn reader_refuses_bad_input() {
        let unmasked = [0x82u8, 1, b'x'];
        let mut r = WsReader::new(&unmasked[..], BytesMut::new(), Side::Server, 1024);
        let e = block_on(r.next()).unwrap_err();
        assert_eq!(e.close_code(), Some(1002));
        let big = masked(opcode::BINARY, &[0u8; 100], [0; 4], true);
        let mut r = WsReader::new(&big[..], BytesMut::new(), Side::Server, 99);
        assert_eq!(block_on(r.next()).unwrap_err().close_code(), Some(1009));
        let bad = masked(opcode::TEXT, &[0xff, 0xfe], [0; 4], true);
        let mut r = WsReader::new(&bad[..], BytesMut::new(), Side::Server, 99);
        assert_eq!(block_on(r.next()).unwrap_err().close_code(), Some(1007));
    }

    #[test]
    fn text_over_the_outbox_limit_and_its_slack_closes_1013() {
        let out = WsOut::new(Side::Server, 100);
        let mut o = out.borrow_mut();
        // A full outbox still takes control text, up to the slack.
        assert!(o
            .send_binary(b"head", &Bytes::from_static(&[1; 80]))
            .is_ok());
        assert!(o.send_text(&"t".repeat(CONTROL_SLACK / 2)).is_ok());
        assert!(!o.is_closing());
        assert!(o.send_text(&"t".repeat(CONTROL_SLACK / 2)).is_err());
        assert!(o.is_closing() && o.overflowed());
        // What was queued stays, the close frame behind it.
        assert_eq!(o.frames.len(), 3);
    }

    #[test]
    fn outbox_is_bounded_and_copies_only_small_payloads() {
        let out = WsOut::new(Side::Server, 100);
        let mut o = out.borrow_mut();
        assert!(o
            .send_binary(b"head", &Bytes::from_static(&[1; 50]))
            .is_ok());
        let Err(Refused) = o.send_binary(b"head", &Bytes::from_static(&[2; 50])) else {
            panic!("over the limit must be refused");
        };
        // a small payload is copied behind its header
        assert_eq!(o.frames.len(), 1);
        assert_eq!(o.frames[0].payload.len(), 0);
        assert_eq!(o.frames[0].copied, 2 + 4 + 50);
        drop(o);
        // a large one is queued apart from its header: it is not copied
        let out = WsOut::new(Side::Server, 1 << 20);
        let mut o = out.borrow_mut();
        let big = Bytes::from(vec![3u8; COPY_PAYLOAD_BYTES + 1]);
        assert!(o.send_binary(b"head", &big).is_ok());
        assert_eq!(o.frames[0].payload.len(), COPY_PAYLOAD_BYTES + 1);
        assert_eq!(o.frames[0].copied, 4 + 4);
    }

    /// What the writer task wrote, and (slices, bytes) of each write.
    type Written = Rc<RefCell<(Vec<u8>, Vec<(usize, usize)>)>>;

    /// Collects what the writer task writes.
    struct Collect(Written);

    /// Runs the writer task over `out` until it closes: the bytes written, and (slices,
    /// bytes) of each write.
    fn drain(out: &Rc<RefCell<WsOut>>) -> (Vec<u8>, Vec<(usize, usize)>) {
        let seen = Rc::new(RefCell::new((Vec::new(), Vec::new())));
        block_on(write_loop(out.clone(), Collect(seen.clone()))).unwrap();
        let r = seen.borrow().clone();
        r
    }

    impl crate::ws::stream::PartsWriter for Collect {
        async fn write_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
            let mut c = self.0.borrow_mut();
            c.1.push((parts.len(), parts.iter().map(Bytes::len).sum()));
            for p in parts {
                c.0.extend_from_slice(p);
            }
            Ok(())
        }
        async fn close(&mut self) {}
    }

    #[test]
    fn the_writer_sends_copied_and_large_frames_in_queue_order() {
        let out = WsOut::new(Side::Server, 1 << 20);
        let big = vec![7u8; COPY_PAYLOAD_BYTES + 100];
        {
            let mut o = out.borrow_mut();
            o.send_binary(b"h1", &Bytes::from_static(b"small one"))
                .unwrap();
            o.send_binary(b"h2", &Bytes::from(big.clone())).unwrap();
            o.send_control(opcode::PONG, b"p");
            o.send_binary(b"", &Bytes::from_static(b"small two"))
                .unwrap();
            o.close(1000);
        }
        let (wire, writes) = drain(&out);
        // The first small frame and the large frame's header in one slice, the large payload
        // as it lies, the rest (pong, small frame, close) in one slice.
        assert_eq!(writes.iter().map(|w| w.0).collect::<Vec<_>>(), vec![3]);
        assert_eq!(out.borrow().queued(), 0);
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Client, 1 << 20);
        block_on(async {
            let m = |b: &[u8]| Message::Binary(Bytes::copy_from_slice(b));
            assert_eq!(r.next().await.unwrap(), m(b"h1small one"));
            let mut b2 = b"h2".to_vec();
            b2.extend_from_slice(&big);
            assert_eq!(r.next().await.unwrap(), m(&b2));
            assert_eq!(
                r.next().await.unwrap(),
                Message::Pong(Bytes::from_static(b"p"))
            );
            assert_eq!(r.next().await.unwrap(), m(b"small two"));
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1000)));
        });
    }

    #[test]
    fn a_batch_stops_at_max_batch_bytes_and_keeps_the_order() {
        let out = WsOut::new(Side::Server, 1 << 20);
        let n = 200;
        {
            let mut o = out.borrow_mut();
            for i in 0..n {
                o.send_binary(&[i as u8], &Bytes::from(vec![i as u8; 1000]))
                    .unwrap();
            }
            o.close(1000);
        }
        let (wire, writes) = drain(&out);
        // 200 copied frames of about 1 KB: several batches, none past the bound by more than
        // the one frame that crossed it.
        assert!(writes.len() > 2, "{writes:?}");
        assert!(
            writes
                .iter()
                .all(|w| w.0 == 1 && w.1 < MAX_BATCH_BYTES + 1100),
            "{writes:?}"
        );
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Client, 1 << 20);
        block_on(async {
            for i in 0..n {
                let mut want = vec![i as u8];
                want.extend_from_slice(&[i as u8; 1000]);
                assert_eq!(r.next().await.unwrap(), Message::Binary(want.into()));
            }
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1000)));
        });
    }

    #[test]
    fn a_client_masks_every_pending_frame_in_the_arena() {
        let out = WsOut::new(Side::Client, 1 << 20);
        let big = vec![9u8; COPY_PAYLOAD_BYTES * 3];
        {
            let mut o = out.borrow_mut();
            o.send_binary(b"a", &Bytes::from_static(b"first")).unwrap();
            o.send_binary(b"b", &Bytes::from(big.clone())).unwrap();
            o.send_binary(b"c", &Bytes::from_static(b"third")).unwrap();
            o.close(1000);
        }
        let (wire, _) = drain(&out);
        // A server refuses unmasked frames: every frame arrives masked and unmasks right.
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Server, 1 << 20);
        block_on(async {
            let m = |b: &[u8]| Message::Binary(Bytes::copy_from_slice(b));
            assert_eq!(r.next().await.unwrap(), m(b"afirst"));
            let mut b2 = b"b".to_vec();
            b2.extend_from_slice(&big);
            assert_eq!(r.next().await.unwrap(), m(&b2));
            assert_eq!(r.next().await.unwrap(), m(b"cthird"));
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1000)));
        });
    }

    /// A writer that, during each write, queues one more large frame and then copies the
    /// payloads of the frames its script names for that write ([`WsOut::own_payload`], as a
    /// request's 504 does while the writer waits on a slow link): the bytes each copy took.
    struct Midway {
        out: Rc<RefCell<WsOut>>,
        buf: Bytes,
        script: std::collections::VecDeque<Vec<u64>>,
        copies: Rc<RefCell<Vec<Vec<usize>>>>,
        seen: Written,
    }

    impl crate::ws::stream::PartsWriter for Midway {
        async fn write_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
            if let Some(frames) = self.script.pop_front() {
                let mut o = self.out.borrow_mut();
                let i = (o.last_frame() + 1) as usize;
                o.send_binary(&[i as u8], &self.buf.slice(i * 2000..(i + 1) * 2000))
                    .unwrap();
                assert_eq!(o.last_frame(), i as u64);
                let copied = frames.iter().map(|&n| o.own_payload(n)).collect();
                self.copies.borrow_mut().push(copied);
                if self.script.is_empty() {
                    o.close(1000);
                }
            }
            Collect(self.seen.clone()).write_parts(parts).await
        }
        async fn close(&mut self) {}
    }

    /// Payloads over [`COPY_PAYLOAD_BYTES`] wait as slices of the buffer they came from:
    /// [`WsOut::own_payload`] copies the one frame named if the writer has not taken it (also
    /// after the writer took others), and what is written is unchanged.
    #[test]
    fn own_payload_copies_the_frame_named_while_it_waits() {
        let out = WsOut::new(Side::Server, 1 << 24);
        let buf = Bytes::from(vec![5u8; 100_000]);
        {
            let mut o = out.borrow_mut();
            for i in 0..3 {
                o.send_binary(&[i as u8], &buf.slice(i * 2000..(i + 1) * 2000))
                    .unwrap();
                assert_eq!(o.last_frame(), i as u64);
            }
            assert_eq!(o.own_payload(1), 2000);
            assert!(!buf.is_unique(), "frames 0 and 2 are still slices");
            assert_eq!(o.own_payload(0) + o.own_payload(2), 4000);
            assert!(buf.is_unique(), "the buffer is let go");
            assert_eq!(o.own_payload(3), 0, "no such frame");
            for i in 3..40 {
                o.send_binary(&[i as u8], &buf.slice(i * 2000..(i + 1) * 2000))
                    .unwrap();
            }
        }
        let copies = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::new(RefCell::new((Vec::new(), Vec::new())));
        // First batch: frames 0-31 (64 parts); 32-39 wait, 40 is queued during the write.
        // Second batch: 32-40, 41 queued during it. Third: 41, and 42.
        let script = vec![vec![31, 35, 40], vec![40, 41], vec![42]];
        let w = Midway {
            out: out.clone(),
            buf: buf.clone(),
            script: script.into(),
            copies: copies.clone(),
            seen: seen.clone(),
        };
        block_on(write_loop(out.clone(), w)).unwrap();
        let taken = 0;
        assert_eq!(
            *copies.borrow(),
            vec![vec![taken, 2000, 2000], vec![taken, 2000], vec![2000]]
        );
        assert!(buf.is_unique(), "nothing written holds the buffer");
        let wire = seen.borrow().0.clone();
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Client, 1 << 20);
        block_on(async {
            for i in 0..43u8 {
                let mut want = vec![i];
                want.extend_from_slice(&[5u8; 2000]);
                assert_eq!(r.next().await.unwrap(), Message::Binary(want.into()));
            }
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1000)));
        });
    }

    /// Frames dropped by [`WsOut::close_now`] count as gone: the numbers of those queued after
    /// stay right.
    #[test]
    fn frame_numbers_stay_right_after_frames_are_dropped() {
        let out = WsOut::new(Side::Server, 1 << 24);
        let mut o = out.borrow_mut();
        let buf = Bytes::from(vec![6u8; 10_000]);
        for _ in 0..3 {
            o.send_binary(b"h", &buf.slice(..2000)).unwrap();
        }
        o.close_now(1008);
        assert_eq!(o.last_frame(), 3, "the close frame is number 3");
        assert_eq!(o.own_payload(2), 0, "dropped");
    }

    #[test]
    fn close_now_drops_the_copied_bytes_of_unwritten_frames() {
        let out = WsOut::new(Side::Server, 1 << 20);
        {
            let mut o = out.borrow_mut();
            o.send_binary(b"h", &Bytes::from_static(b"never read"))
                .unwrap();
            o.close_now(1008);
        }
        let (wire, _) = drain(&out);
        let mut r = WsReader::new(&wire[..], BytesMut::new(), Side::Client, 1 << 20);
        block_on(async {
            assert_eq!(r.next().await.unwrap(), Message::Close(Some(1008)));
            assert!(matches!(r.next().await, Err(WsError::Eof)));
        });
    }

    #[test]
    fn a_silent_link_closes_with_1001_and_a_failed_socket_without_a_frame() {
        let silent = WsError::Io(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        assert_eq!(silent.close_code(), Some(1001));
        let reset = WsError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(reset.close_code(), None);
        assert_eq!(WsError::Eof.close_code(), None);
    }

    #[test]
    fn pongs_are_dropped_while_the_outbox_is_full() {
        let out = WsOut::new(Side::Server, 100);
        let mut o = out.borrow_mut();
        o.send_binary(b"", &Bytes::from_static(&[0; 100]))
            .expect("fits");
        o.send_control(opcode::PONG, b"x");
        let before = o.queued();
        for _ in 0..1000 {
            o.send_control(opcode::PONG, b"flood");
        }
        assert_eq!(
            o.queued(),
            before,
            "a ping flood must not grow a full outbox"
        );
    }

    #[test]
    fn queued_control_frames_are_bounded_by_count() {
        let out = WsOut::new(Side::Server, 1 << 20);
        let mut o = out.borrow_mut();
        o.limit_controls(4);
        for _ in 0..1000 {
            o.send_control(opcode::PONG, b"");
        }
        assert_eq!(
            o.frames.len(),
            4,
            "empty pongs cost a slot each: bounded by count"
        );
    }

    /// A strict outbox (a link's) refuses a message larger than its limit even when empty; a
    /// soft one (a client connection's share) lets a message in while what is queued is within
    /// the limit, and refuses the next once the queue is over it. Before, a prompt `/api/ws`
    /// client was closed 1013 as a slow reader for one answer larger than its share, which
    /// HTTP delivered.
    #[test]
    fn a_soft_limit_lets_a_large_message_in_while_the_queue_is_within_it() {
        let big = Bytes::from(vec![7u8; 5000]);
        let strict = WsOut::new(Side::Server, 1000);
        assert!(strict.borrow_mut().send_binary(b"h", &big).is_err());
        assert!(!strict.borrow().has_room(5000));
        let soft = WsOut::new(Side::Server, 1000);
        let mut o = soft.borrow_mut();
        o.set_soft_limit(1000);
        assert!(o.has_room(5000));
        o.send_binary(b"h", &Bytes::from_static(&[1; 600]))
            .expect("within the limit");
        o.send_binary(b"h", &big)
            .expect("a large message while the queue is within the limit");
        assert!(!o.has_room(10), "nothing more while the queue is over it");
        assert!(o.send_binary(b"h", &Bytes::from_static(b"x")).is_err());
    }

    /// A ping flood against a queue that holds 4 control frames: the pongs past the bound are
    /// dropped, except the newest, which goes out once the writer has emptied the queue (the
    /// latest ping is answered; before, pongs 0 to 3 went out and the latest never did).
    #[test]
    fn the_latest_ping_is_answered_when_pongs_are_dropped() {
        let out = WsOut::new(Side::Server, 1 << 20);
        {
            let mut o = out.borrow_mut();
            o.limit_controls(4);
            for i in 0..300 {
                o.send_control(opcode::PONG, i.to_string().as_bytes());
            }
            assert_eq!(o.frames.len(), 4);
        }
        let seen = Rc::new(RefCell::new((Vec::new(), Vec::new())));
        block_on(futures_lite::future::zip(
            write_loop(out.clone(), Collect(seen.clone())),
            async {
                while seen.borrow().1.len() < 2 {
                    futures_lite::future::yield_now().await;
                }
                out.borrow_mut().close(1000);
            },
        ))
        .0
        .unwrap();
        // Server frames are unmasked: FIN|opcode, length, payload.
        let wire = seen.borrow().0.clone();
        let (mut pongs, mut i) = (Vec::new(), 0);
        while i < wire.len() {
            let (op, n) = (wire[i] & 0x0f, usize::from(wire[i + 1]));
            if op == opcode::PONG {
                pongs.push(String::from_utf8(wire[i + 2..i + 2 + n].to_vec()).unwrap());
            }
            i += 2 + n;
        }
        assert_eq!(pongs, ["0", "1", "2", "3", "299"]);
    }

    /// Hands out its bytes, then never anything more (a client that stopped sending).
    struct ThenSilent<'a>(&'a [u8]);

    impl AsyncRead for ThenSilent<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            if self.0.is_empty() {
                return Poll::Pending;
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_message_in_pieces_is_held_to_its_pace() {
        use std::time::{Duration, Instant};
        glommio::LocalExecutor::default().run(async {
            let allowance = Duration::from_millis(50);
            // Read whole, in one read or in many, fragments and a ping between them: no
            // deadline is left once the message is out.
            let mut wire = masked(opcode::BINARY, &[b'a'; 300], [1, 2, 3, 4], false);
            wire.extend(masked(opcode::PING, b"p", [5, 6, 7, 8], true));
            wire.extend(masked(
                opcode::CONTINUATION,
                &[b'b'; 500],
                [4, 3, 2, 1],
                true,
            ));
            for step in [7, 1 << 16] {
                let mut r =
                    WsReader::new(Chunks(&wire, step), BytesMut::new(), Side::Server, 1 << 20);
                r.set_min_pace(allowance, 1000);
                assert!(matches!(r.next().await.unwrap(), Message::Ping(_)));
                assert!(matches!(r.next().await.unwrap(), Message::Binary(_)));
                assert_eq!(r.message_deadline(), None, "step {step}");
            }
            // A whole first fragment of 4000 bytes, then silence: the deadline counts those
            // bytes (50 ms + 4000 / 1000 s), not only the frame being read.
            let wire = masked(opcode::BINARY, &[b'a'; 4000], [1, 2, 3, 4], false);
            let mut r = WsReader::new(ThenSilent(&wire), BytesMut::new(), Side::Server, 1 << 20);
            r.set_min_pace(allowance, 1000);
            let start = Instant::now();
            let quick =
                glommio::timer::timeout(Duration::from_millis(200), async { Ok(r.next().await) })
                    .await;
            assert!(quick.is_err(), "no message, no error yet");
            let due = r.message_deadline().expect("a message in progress");
            assert!(
                due >= start + Duration::from_millis(4000),
                "{:?}",
                due - start
            );
            // Half a frame, then silence, at 1 MB/s: Slow at the allowance (a 1008 close).
            let wire = masked(opcode::BINARY, &[b'a'; 4000], [1, 2, 3, 4], true);
            let mut r = WsReader::new(
                ThenSilent(&wire[..2000]),
                BytesMut::new(),
                Side::Server,
                1 << 20,
            );
            r.set_min_pace(allowance, 1_000_000);
            let start = Instant::now();
            let e = r.next().await.unwrap_err();
            assert!(matches!(e, WsError::Slow), "{e:?}");
            assert_eq!(e.close_code(), Some(1008));
            assert!(start.elapsed() >= allowance, "{:?}", start.elapsed());
            // A fragment of 10 bytes, then 100 pings of 125 bytes: the pings are not the
            // message's bytes, and buy it no time (before, a ping flood under the control
            // rate held a message, and its charge, for good).
            let mut wire = masked(opcode::BINARY, &[b'a'; 10], [1, 2, 3, 4], false);
            for _ in 0..100 {
                wire.extend(masked(opcode::PING, &[b'p'; 125], [5, 6, 7, 8], true));
            }
            let mut r = WsReader::new(ThenSilent(&wire), BytesMut::new(), Side::Server, 1 << 20);
            r.set_min_pace(allowance, 1000);
            let start = Instant::now();
            for _ in 0..100 {
                assert!(matches!(r.next().await.unwrap(), Message::Ping(_)));
            }
            let due = r.message_deadline().expect("a message in progress");
            assert!(
                due < start + Duration::from_secs(1),
                "pings bought {:?}",
                due - start
            );
            // A frame announcing 1 MB, 10 bytes of it, then silence, at 1000 B/s: Slow at the
            // allowance + 10 ms, not after the 1,000 s its announced length would allow (the
            // message's whole charge was held that long).
            let wire = masked(opcode::BINARY, &vec![b'a'; 1_000_000], [1, 2, 3, 4], true);
            let mut r = WsReader::new(
                ThenSilent(&wire[..14 + 10]),
                BytesMut::new(),
                Side::Server,
                1 << 21,
            );
            r.set_min_pace(allowance, 1000);
            let start = Instant::now();
            let slow =
                glommio::timer::timeout(Duration::from_secs(5), async { Ok(r.next().await) })
                    .await
                    .expect("not cut within 5 s");
            assert!(matches!(slow, Err(WsError::Slow)), "{slow:?}");
            assert!(start.elapsed() >= allowance, "{:?}", start.elapsed());
        });
    }
}
