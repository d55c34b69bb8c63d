//! A blocking raw websocket client for `/api/ws` (clients) and `/link` (tasks), built on
//! fedbus's own handshake and frame helpers, with raw frame control (masks, reserved bits,
//! unmasked frames) and read timeouts everywhere, so a hung router fails a test instead of
//! hanging it.
//!
//! ```ignore
//! let s = ws::dial(r.api, &ws::Dial::new(READ_TIMEOUT).nodelay()).expect("connect");
//! let mut w = match ws::upgrade(s, "/api/ws", Some(&tok), None, false).expect("upgrade") {
//!     ws::Upgraded::Open(w) => w,
//!     ws::Upgraded::Refused { status, body } => panic!("refused: {status} {body}"),
//! };
//! w.send_frame(opcode::BINARY, &ws::request_frame(1, Some(&r.path(APP, 1)), b"hi"));
//! let msg = w.read_msg();
//! ```

use crate::read_retrying;
use bytes::{Bytes, BytesMut};
use fedbus_proto::ws::frame::{encode_head, opcode, parse_head, MAX_HEADER};
use fedbus_proto::ws::handshake::{
    client_request, new_key, parse_client_response, ClientHandshake,
};
use fedbus_proto::{encode_frame, put_meta, tag, Frame, Kind};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// FIN bit of a frame's first byte.
pub const FIN: u8 = 0x80;

/// A message from the router (which never fragments and never masks).
#[derive(Debug, PartialEq, Eq)]
pub enum Msg {
    /// A binary message (a fedbus frame).
    Binary(Vec<u8>),
    /// A text message (task link JSON).
    Text(Vec<u8>),
    /// A ping and its payload.
    Ping(Vec<u8>),
    /// A pong and its payload.
    Pong(Vec<u8>),
    /// A close frame: its code (None when it has none) and its whole payload.
    Close(Option<u16>, Vec<u8>),
}

/// What [`Ws::read_answer`] read: a fedbus frame, a close, or another message.
#[derive(Debug)]
pub enum Answer {
    /// A binary message, decoded as a fedbus frame.
    Frame(Frame),
    /// A close frame's code.
    Close(Option<u16>),
    /// Any other message.
    Other(Msg),
}

/// How to connect: timeouts of the socket and `TCP_NODELAY` (the connect itself is bounded by
/// 2 s).
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    read_timeout: Duration,
    write_timeout: Option<Duration>,
    nodelay: bool,
}

impl Dial {
    /// A read timeout of `read`, no write timeout, Nagle left on.
    pub fn new(read: Duration) -> Dial {
        Dial {
            read_timeout: read,
            write_timeout: None,
            nodelay: false,
        }
    }

    /// Writes time out after `t`.
    pub fn write_timeout(mut self, t: Duration) -> Dial {
        self.write_timeout = Some(t);
        self
    }

    /// Sets `TCP_NODELAY` (best effort).
    pub fn nodelay(mut self) -> Dial {
        self.nodelay = true;
        self
    }
}

/// Connects to `addr` (within 2 s) with the timeouts of `d`.
pub fn dial(addr: SocketAddr, d: &Dial) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(d.read_timeout))?;
    if let Some(w) = d.write_timeout {
        s.set_write_timeout(Some(w))?;
    }
    if d.nodelay {
        let _ = s.set_nodelay(true);
    }
    Ok(s)
}

/// How an upgrade went.
pub enum Upgraded<S: Io = TcpStream> {
    /// 101: the session.
    Open(Ws<S>),
    /// Any other status, with the body that came with it.
    Refused {
        /// The status.
        status: u16,
        /// The body (all of it up to the router's close when asked for).
        body: String,
    },
}

/// Sends `GET path` with a websocket upgrade (Host `127.0.0.1`, `Authorization: Bearer` when
/// `bearer`, `Origin` when `origin`) on `s` and reads the answer. A refusal's body is what came
/// with its head, or everything up to the router's close when `refusal_to_eof`. Err says what
/// went wrong (write, read, a close before the answer, an answer that does not parse).
pub fn upgrade(
    s: TcpStream,
    path: &str,
    bearer: Option<&str>,
    origin: Option<&str>,
    refusal_to_eof: bool,
) -> Result<Upgraded, String> {
    let tcp = s
        .try_clone()
        .map_err(|e| format!("clone the socket: {e}"))?;
    let head = Head {
        host: "127.0.0.1",
        path,
        bearer,
        origin,
    };
    upgrade_on(s, tcp, &head, refusal_to_eof)
}

/// The upgrade request [`upgrade_on`] sends.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// `Host`.
    pub host: &'a str,
    /// The target.
    pub path: &'a str,
    /// `Authorization: Bearer` when given.
    pub bearer: Option<&'a str>,
    /// `Origin` when given.
    pub origin: Option<&'a str>,
}

/// [`upgrade`] on any stream `s` (TLS, say) over the socket `tcp`, with the request `head`.
pub fn upgrade_on<S: Io>(
    mut s: S,
    tcp: TcpStream,
    head: &Head<'_>,
    refusal_to_eof: bool,
) -> Result<Upgraded<S>, String> {
    let key = new_key();
    let mut text = client_request(head.host, head.path, &key, head.bearer);
    if let Some(o) = head.origin {
        text = text.replacen("\r\n", &format!("\r\nOrigin: {o}\r\n"), 1);
    }
    s.write_all(text.as_bytes())
        .and_then(|()| s.flush())
        .map_err(|e| format!("write upgrade: {e}"))?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match parse_client_response(&buf, &key).map_err(|e| format!("upgrade answer: {e:?}"))? {
            ClientHandshake::Incomplete => {}
            ClientHandshake::Accepted(n) => {
                let rest = buf[n..].to_vec();
                return Ok(Upgraded::Open(Ws::on(
                    s,
                    tcp,
                    rest,
                    0x9E37_79B9_7F4A_7C15 ^ n as u64,
                )));
            }
            ClientHandshake::Refused { status, body } => {
                if !refusal_to_eof {
                    return Ok(Upgraded::Refused { status, body });
                }
                // The router answers with `Connection: close`: read to EOF for the whole body.
                loop {
                    match read_retrying(&mut s, &mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(e) => {
                            return Err(format!("refusal {status} not followed by a close: {e}"))
                        }
                    }
                }
                let Ok(ClientHandshake::Refused { body, .. }) = parse_client_response(&buf, &key)
                else {
                    unreachable!()
                };
                return Ok(Upgraded::Refused { status, body });
            }
        }
        let n = read_retrying(&mut s, &mut chunk).map_err(|e| format!("read upgrade: {e}"))?;
        if n == 0 {
            return Err(format!("router closed during the upgrade: {buf:?}"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// [`upgrade`] that panics unless the answer is a 101.
pub fn open(s: TcpStream, path: &str, bearer: Option<&str>) -> Ws {
    match upgrade(s, path, bearer, None, false) {
        Ok(Upgraded::Open(w)) => w,
        Ok(Upgraded::Refused { status, body }) => panic!("upgrade refused: {status} {body}"),
        Err(e) => panic!("upgrade: {e}"),
    }
}

/// Opens `/api/ws` at `addr` with bearer `tok` as a minimal client: read timeout `read`, no
/// write timeout, every frame masked with `[1, 2, 3, 4]`. Err says why not (`connect: ..`,
/// `upgrade refused: <status>`, ..).
pub fn open_api(addr: SocketAddr, tok: &str, read: Duration) -> Result<Ws, String> {
    let s = dial(addr, &Dial::new(read)).map_err(|e| format!("connect: {e}"))?;
    match upgrade(s, "/api/ws", Some(tok), None, false)? {
        Upgraded::Open(w) => Ok(w.with_fixed_mask([1, 2, 3, 4])),
        Upgraded::Refused { status, .. } => Err(format!("upgrade refused: {status}")),
    }
}

/// A byte stream a session runs on (plain TCP, TLS).
pub trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// An open websocket session (client side): every frame it sends is masked unless asked
/// otherwise.
pub struct Ws<S: Io = TcpStream> {
    /// The stream (writes to it go out unframed).
    pub s: S,
    /// The TCP socket under `s` (timeouts, shutdown); a clone of `s` on plain TCP.
    pub tcp: TcpStream,
    /// Bytes read past the last message.
    pub buf: Vec<u8>,
    /// Masking: `None` random keys (xorshift state in `seed`), `Some(k)` always `k`.
    pub fixed_mask: Option<[u8; 4]>,
    seed: u64,
    check_router_frames: bool,
}

impl Ws<TcpStream> {
    /// A session on plain TCP `s`, `buf` the bytes read past the 101, masks from `seed`.
    pub fn new(s: TcpStream, buf: Vec<u8>, seed: u64) -> Ws {
        let tcp = s.try_clone().expect("clone the socket");
        Ws::on(s, tcp, buf, seed)
    }
}

impl<S: Io> Ws<S> {
    /// A session on `s` (over the socket `tcp`), `buf` the bytes read past the 101, masks from
    /// `seed`.
    pub fn on(s: S, tcp: TcpStream, buf: Vec<u8>, seed: u64) -> Ws<S> {
        Ws {
            s,
            tcp,
            buf,
            fixed_mask: None,
            seed,
            check_router_frames: false,
        }
    }

    /// [`Ws::read_msg`] also asserts that each router frame is unmasked and final.
    pub fn checking_router_frames(mut self) -> Ws<S> {
        self.check_router_frames = true;
        self
    }

    /// Every frame from now on is masked with `m`.
    pub fn with_fixed_mask(mut self, m: [u8; 4]) -> Ws<S> {
        self.fixed_mask = Some(m);
        self
    }

    /// The read timeout of the socket.
    pub fn set_read_timeout(&mut self, t: Duration) {
        self.tcp.set_read_timeout(Some(t)).unwrap();
    }

    /// The next masking key.
    pub fn next_mask(&mut self) -> [u8; 4] {
        if let Some(m) = self.fixed_mask {
            return m;
        }
        let x = &mut self.seed;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x as u32).to_le_bytes()
    }

    /// One whole (FIN) masked frame of `op`.
    pub fn frame_bytes(&mut self, op: u8, payload: &[u8]) -> Vec<u8> {
        let m = self.next_mask();
        frame(op, payload, Some(m))
    }

    /// A masked frame whose first byte is `b0` (FIN, RSV, opcode) as given.
    pub fn raw(&mut self, b0: u8, payload: &[u8]) -> Vec<u8> {
        let m = self.next_mask();
        raw_frame(b0, payload, m)
    }

    /// Writes one whole masked frame of `op`; panics when the write fails.
    pub fn send_frame(&mut self, op: u8, payload: &[u8]) {
        let b = self.frame_bytes(op, payload);
        self.s.write_all(&b).expect("write frame");
    }

    /// Writes one whole frame of `op` without a mask (a protocol error from a client).
    pub fn send_unmasked_frame(&mut self, op: u8, payload: &[u8]) {
        self.s
            .write_all(&frame(op, payload, None))
            .expect("write frame");
    }

    /// A fedbus Request frame as one masked binary message (bytes only).
    pub fn request_bytes(&mut self, id: u64, path: Option<&str>, payload: &[u8]) -> Vec<u8> {
        let f = request_frame(id, path, payload);
        self.frame_bytes(opcode::BINARY, &f)
    }

    /// Writes a fedbus Request for `path` as one masked binary message.
    pub fn write_request(&mut self, id: u64, path: &str, body: &[u8]) -> std::io::Result<()> {
        let b = self.request_bytes(id, Some(path), body);
        self.s.write_all(&b)
    }

    /// Reads more bytes into the buffer; UnexpectedEof when the router closed.
    pub fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = read_retrying(&mut self.s, &mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("router closed ({} bytes buffered)", self.buf.len()),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next message; panics on a bad frame head or an opcode a router never sends (and,
    /// when [`Ws::checking_router_frames`], on a masked or fragmented frame).
    pub fn read_msg(&mut self) -> std::io::Result<Msg> {
        loop {
            let h = parse_head(&self.buf).unwrap_or_else(|e| panic!("bad router frame: {e:?}"));
            if let Some(h) = h {
                let total = h.header_len + h.payload_len as usize;
                if self.buf.len() >= total {
                    if self.check_router_frames {
                        assert!(h.mask.is_none(), "router frames are never masked");
                        assert!(h.fin, "the router does not fragment");
                    }
                    let p: Vec<u8> = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    return Ok(match h.opcode {
                        opcode::BINARY => Msg::Binary(p),
                        opcode::TEXT => Msg::Text(p),
                        opcode::PING => Msg::Ping(p),
                        opcode::PONG => Msg::Pong(p),
                        opcode::CLOSE => {
                            Msg::Close((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])), p)
                        }
                        op => panic!("unexpected opcode {op}"),
                    });
                }
            }
            self.fill()?;
        }
    }

    /// [`Ws::read_msg`] with a binary message decoded as a fedbus frame (panics when it is
    /// not one).
    pub fn read_answer(&mut self) -> std::io::Result<Answer> {
        Ok(match self.read_msg()? {
            Msg::Binary(p) => Answer::Frame(Frame::decode(Bytes::from(p)).expect("frame")),
            Msg::Close(c, _) => Answer::Close(c),
            m => Answer::Other(m),
        })
    }

    /// Reads up to the close frame (anything before it is skipped): its code, or why none
    /// came.
    pub fn close_code(&mut self) -> Result<Option<u16>, String> {
        loop {
            match self.read_msg() {
                Ok(Msg::Close(c, _)) => return Ok(c),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// A client frame of `op` with FIN set, masked with `mask` when given (by `encode_head`).
pub fn frame(op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut h = [0u8; MAX_HEADER];
    let n = encode_head(op, payload.len(), mask, &mut h);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&h[..n]);
    let start = v.len();
    v.extend_from_slice(payload);
    if let Some(m) = mask {
        for (i, b) in v[start..].iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    v
}

/// A client frame written byte by byte: `b0` is the whole first byte (FIN, RSV, opcode), always
/// masked with `mask`, the shortest length encoding.
pub fn raw_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = vec![b0];
    let n = payload.len();
    if n < 126 {
        v.push(0x80 | n as u8);
    } else if n <= 65535 {
        v.push(0x80 | 126);
        v.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&(n as u64).to_be_bytes());
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

/// A fedbus Request frame (no websocket framing) for request `id`, with a PATH entry when
/// `path` is given.
pub fn request_frame(id: u64, path: Option<&str>, payload: &[u8]) -> Vec<u8> {
    let mut meta = BytesMut::new();
    if let Some(p) = path {
        put_meta(&mut meta, tag::PATH, p.as_bytes());
    }
    encode_frame(Kind::Request, 0, 0, 0, id, &meta, payload).to_vec()
}

// ---------------------------------------------------------------------------------------------
// Reading fedbus answer frames.

/// The HEADER entries of `f`, as `name: value` lines.
pub fn header_lines(f: &Frame) -> Vec<String> {
    f.meta_entries()
        .filter(|(t, _)| *t == tag::HEADER)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// The value of header `name` (case-insensitive) among the HEADER entries of `f`.
pub fn header_of(f: &Frame, name: &str) -> Option<String> {
    header_lines(f).into_iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The STATUS of an answer frame; panics when it has none.
pub fn status_of(f: &Frame) -> u64 {
    f.get_u64(tag::STATUS).expect("STATUS in every answer")
}

/// Asserts that `f` is a router-made error answer to request `id`: STATUS `status`, ERROR
/// meta `code`, a JSON body whose `error` is `code` (`d` describes `f` in the messages);
/// returns the body.
pub fn assert_error_basics(
    f: &Frame,
    id: u64,
    status: u64,
    code: &str,
    d: &str,
) -> serde_json::Value {
    assert_eq!(f.header.request_id, id, "{d}");
    assert_eq!(status_of(f), status, "{d}");
    assert_eq!(f.get_str(tag::ERROR), Some(code), "ERROR meta: {d}");
    let j: serde_json::Value =
        serde_json::from_slice(&f.payload).unwrap_or_else(|e| panic!("JSON body ({e}): {d}"));
    assert_eq!(j["error"], code, "{d}");
    j
}

/// `f` for an assertion message: id, header, meta entries, and the body (as `<N bytes>` when it
/// is longer than `max_body`).
pub fn describe(f: &Frame, max_body: usize) -> String {
    let meta: Vec<String> = f
        .meta_entries()
        .map(|(t, v)| format!("{t}={}", String::from_utf8_lossy(v)))
        .collect();
    let body = if f.payload.len() > max_body {
        format!("<{} bytes>", f.payload.len())
    } else {
        String::from_utf8_lossy(&f.payload).into_owned()
    };
    format!(
        "id {} {:?} meta [{}] body {body}",
        f.header.request_id,
        f.header,
        meta.join(", ")
    )
}
