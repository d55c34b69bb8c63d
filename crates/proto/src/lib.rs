//! fedbus-proto: the wire formats of fedbus. Pure (no runtime, no I/O), so the router, SDKs
//! and tools share one codec without pulling in glommio.
//!
//! The crate root holds the frames between router and task, and between routers. A frame is one
//! binary websocket message: a fixed 24-byte header, then metadata (tag, length, value
//! entries), then the payload. Decoding slices the metadata and payload out of the message's
//! `Bytes` without copying; encoding writes only the header and metadata, so the payload can be
//! handed to a vectored write unchanged. docs/PROTOCOL.md (at the repository root) is the
//! byte-level spec.
//!
//! - [`hello`]: the JSON text messages of the link handshake;
//! - [`http`]: the JSON error body, reason phrases and the pass-through header filter;
//! - [`renew`]: a fresh credential on an open link, and its spacing rule;
//! - [`ws`]: the websocket frame header codec and the opening handshake.

#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod hello;
pub mod http;
pub mod link;
pub mod renew;
pub mod ws;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A decimal number of digits only: `str::parse` also takes a leading `+`, which other
/// parsers on a request's path may read otherwise (a Redirect's PARTITION, Content-Length).
pub fn parse_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Size of the fixed header.
pub const HEADER_LEN: usize = 24;
/// First byte of every frame; doubles as the protocol version (1).
pub const MAGIC: u8 = 0xFB;
/// Most redirects a request may take (the seed rule: at most 4 hops).
pub const MAX_HOPS: u8 = 4;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Router -> task (or router -> peer router): a request to serve.
    Request = 1,
    /// Task -> router (or peer -> router): the answer to a request id.
    Response = 2,
    /// Task -> router: "send this request to role R" (seed: Redirect).
    Redirect = 3,
    /// Router -> auth task: the app's current signing secret.
    SecretPush = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::Redirect,
            4 => Kind::SecretPush,
            _ => return None,
        })
    }
}

/// Header flag bits.
pub mod flags {
    /// The request has crossed a cluster boundary; it must never be forwarded again.
    pub const FORWARDED: u8 = 0x01;
    /// The request is served by the emergency partition of its original partition.
    pub const EMERGENCY: u8 = 0x02;
    /// Forwarded requests: a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`),
    /// answered by the serving router from the app's CORS policy, never by a task.
    pub const PREFLIGHT: u8 = 0x04;
}

/// Metadata tags. Values are bytes; numbers are ASCII decimal so that a task in any language
/// reads them without a binary decoder.
pub mod tag {
    /// `owner/app`.
    pub const APP: u8 = 1;
    /// Role the request is for (`main` first).
    pub const ROLE: u8 = 2;
    /// `<service>` path segment.
    pub const SERVICE: u8 = 3;
    /// `<module>` path segment.
    pub const MODULE: u8 = 4;
    /// `<function>` path segment.
    pub const FUNCTION: u8 = 5;
    /// Workspace id, decimal.
    pub const WSID: u8 = 6;
    /// HTTP method of the client request (`GET`, `POST`).
    pub const METHOD: u8 = 7;
    /// Target `region/cluster`.
    pub const CLUSTER: u8 = 8;
    /// Content type of the payload.
    pub const CONTENT_TYPE: u8 = 9;
    /// Subject (`sub`) of the client's verified JWT.
    pub const SUBJECT: u8 = 10;
    /// Response status, decimal (`200`).
    pub const STATUS: u8 = 16;
    /// A response header for the client, `name: value`.
    pub const HEADER: u8 = 17;
    /// Redirect: target partition, decimal (absent: same partition).
    pub const PARTITION: u8 = 18;
    /// Secret push: secret version, decimal.
    pub const VERSION: u8 = 19;
    /// Error code, for responses made by a router (`no_live_task`).
    pub const ERROR: u8 = 20;
    /// Name of the router (`region/cluster/router`) that served a forwarded request.
    pub const SERVED_BY: u8 = 21;
    /// Number of redirect hops taken, decimal (in responses).
    pub const HOPS: u8 = 22;
    /// Emergency: the original partition, decimal (in responses).
    pub const EMERGENCY_FOR: u8 = 23;
    /// Client websocket: the request path `/api/<region>/<cluster>/...`.
    pub const PATH: u8 = 24;
    /// Forwarded requests: the client's JWT, verified by the app's home cluster.
    pub const TOKEN: u8 = 25;
    /// Forwarded requests: the client's `Origin` when it differs from the request's own
    /// origin, checked against the app's CORS policy by the serving cluster.
    pub const ORIGIN: u8 = 26;
    /// Responses on a peer link: present (empty) when the serving cluster's app allows
    /// credentials for the forwarded request's ORIGIN (`allow_credentials`), so the forwarding
    /// router adds `Access-Control-Allow-Credentials` from the app's own policy, not from an app
    /// of the same name in its own cluster.
    pub const CORS_CREDENTIALS: u8 = 27;
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame is (byte 1).
    pub kind: Kind,
    /// Bits of [`flags`]; other bits are reserved (send 0, ignore on receipt).
    pub flags: u8,
    /// Redirects taken so far.
    pub hops: u8,
    /// Partition the request is served on.
    pub partition: u32,
    /// Chosen by the sender of a Request; its answer carries the same id.
    pub request_id: u64,
    /// Bytes of metadata after the header.
    pub meta_len: u32,
    /// Bytes of payload after the metadata.
    pub payload_len: u32,
}

/// Why a frame was refused. Whose fault: always the sender's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The message is shorter than [`HEADER_LEN`]; carries its length.
    #[error("frame shorter than its header ({0} bytes)")]
    Short(usize),
    /// The first byte is not [`MAGIC`] (another protocol or version); carries the byte.
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    /// The kind byte is none of [`Kind`].
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// `meta_len + payload_len` differs from the bytes after the header.
    #[error("lengths in header ({meta}+{payload}) do not match the frame body ({body})")]
    BadLength {
        /// `meta_len` from the header.
        meta: u32,
        /// `payload_len` from the header.
        payload: u32,
        /// Bytes actually after the header.
        body: usize,
    },
    /// A metadata entry runs past the end of the metadata block.
    #[error("metadata entry truncated")]
    BadMeta,
}

impl Header {
    /// Writes the header into 24 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = self.kind as u8;
        b[2] = self.flags;
        b[3] = self.hops;
        b[4..8].copy_from_slice(&self.partition.to_be_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_be_bytes());
        b[16..20].copy_from_slice(&self.meta_len.to_be_bytes());
        b[20..24].copy_from_slice(&self.payload_len.to_be_bytes());
        b
    }

    /// Reads a header from the start of `b`.
    pub fn decode(b: &[u8]) -> Result<Header, ProtoError> {
        if b.len() < HEADER_LEN {
            return Err(ProtoError::Short(b.len()));
        }
        if b[0] != MAGIC {
            return Err(ProtoError::BadMagic(b[0]));
        }
        let kind = Kind::from_u8(b[1]).ok_or(ProtoError::BadKind(b[1]))?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[8..16]);
        Ok(Header {
            kind,
            flags: b[2],
            hops: b[3],
            partition: u32_at(4),
            request_id: u64::from_be_bytes(id),
            meta_len: u32_at(16),
            payload_len: u32_at(20),
        })
    }
}

/// A decoded frame: `meta` and `payload` are slices of the received message.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The fixed header.
    pub header: Header,
    /// The metadata block, already validated by [`Frame::decode`].
    pub meta: Bytes,
    /// The payload, opaque to the router.
    pub payload: Bytes,
}

impl Frame {
    /// Decodes one whole message. No copy: `meta` and `payload` share `msg`'s buffer (`msg`
    /// becomes the payload and `meta` is split off it: one reference count taken, where two
    /// slices and a drop of `msg` took three atomic operations).
    pub fn decode(mut msg: Bytes) -> Result<Frame, ProtoError> {
        let header = Header::decode(&msg)?;
        let body = msg.len() - HEADER_LEN;
        let (m, p) = (header.meta_len as usize, header.payload_len as usize);
        if m.checked_add(p) != Some(body) {
            return Err(ProtoError::BadLength {
                meta: header.meta_len,
                payload: header.payload_len,
                body,
            });
        }
        // Validate the metadata once here so that readers can iterate without error paths.
        MetaIter::new(&msg[HEADER_LEN..HEADER_LEN + m]).try_for_each(|e| e.map(|_| ()))?;
        msg.advance(HEADER_LEN);
        let meta = msg.split_to(m);
        Ok(Frame {
            header,
            meta,
            payload: msg,
        })
    }

    /// First metadata value with `tag`.
    pub fn get(&self, tag: u8) -> Option<&[u8]> {
        meta_get(&self.meta, tag)
    }

    /// First metadata value with `tag` as UTF-8.
    pub fn get_str(&self, tag: u8) -> Option<&str> {
        self.get(tag).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// First metadata value with `tag` as a decimal number (digits only: [`parse_decimal`]).
    pub fn get_u64(&self, tag: u8) -> Option<u64> {
        self.get_str(tag).and_then(parse_decimal)
    }

    /// Iterates over all metadata entries.
    pub fn meta_entries(&self) -> impl Iterator<Item = (u8, &[u8])> {
        MetaIter::new(&self.meta).filter_map(Result::ok)
    }
}

/// Iterator over `(tag, value)` entries of a metadata block.
pub struct MetaIter<'a> {
    rest: &'a [u8],
}

impl<'a> MetaIter<'a> {
    /// Iterates over `meta`; yields `Err(BadMeta)` once, then stops, at a truncated entry.
    pub fn new(meta: &'a [u8]) -> Self {
        MetaIter { rest: meta }
    }
}

impl<'a> Iterator for MetaIter<'a> {
    type Item = Result<(u8, &'a [u8]), ProtoError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < 3 {
            self.rest = &[];
            return Some(Err(ProtoError::BadMeta));
        }
        let tag = self.rest[0];
        let len = u16::from_be_bytes([self.rest[1], self.rest[2]]) as usize;
        if self.rest.len() < 3 + len {
            self.rest = &[];
            return Some(Err(ProtoError::BadMeta));
        }
        let v = &self.rest[3..3 + len];
        self.rest = &self.rest[3 + len..];
        Some(Ok((tag, v)))
    }
}

/// First value with `tag` in a metadata block.
pub fn meta_get(meta: &[u8], tag: u8) -> Option<&[u8]> {
    MetaIter::new(meta)
        .filter_map(Result::ok)
        .find(|(t, _)| *t == tag)
        .map(|(_, v)| v)
}

/// Appends one metadata entry. Values longer than 65535 bytes are cut to that length: every
/// value the router writes (names, decimals, header lines) is far shorter.
pub fn put_meta(buf: &mut BytesMut, tag: u8, value: &[u8]) {
    let v = &value[..value.len().min(u16::MAX as usize)];
    let [hi, lo] = (v.len() as u16).to_be_bytes();
    // The entry's 3-byte head is copied inline, not through `put_u8` and `put_u16` (a request's
    // head has eight or nine entries); the room for the whole entry is made once, up front.
    buf.reserve(3 + v.len());
    buf.extend_from_slice(&[tag, hi, lo]);
    buf.extend_from_slice(v);
}

/// Appends a decimal number as a metadata entry without allocating.
pub fn put_meta_u64(buf: &mut BytesMut, tag: u8, n: u64) {
    let mut tmp = [0u8; 20];
    put_meta(buf, tag, fmt_u64(n, &mut tmp));
}

/// Formats `n` in decimal into `tmp`, returning the used tail. Allocation free.
pub fn fmt_u64(mut n: u64, tmp: &mut [u8; 20]) -> &[u8] {
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &tmp[i..]
}

/// Starts the head of a frame in `buf`: clears it and reserves the fixed header, so that the
/// metadata can be appended with [`put_meta`] and the header written by [`finish_head`].
pub fn begin_head(buf: &mut BytesMut) {
    buf.clear();
    buf.resize(HEADER_LEN, 0);
}

/// Writes the fixed header in front of the metadata appended since [`begin_head`]; the payload
/// of `payload_len` bytes is sent after `buf` as a separate slice (never copied into it).
pub fn finish_head(
    buf: &mut BytesMut,
    kind: Kind,
    flags: u8,
    hops: u8,
    partition: u32,
    request_id: u64,
    payload_len: usize,
) {
    let h = Header {
        kind,
        flags,
        hops,
        partition,
        request_id,
        meta_len: (buf.len() - HEADER_LEN) as u32,
        payload_len: payload_len as u32,
    };
    buf[..HEADER_LEN].copy_from_slice(&h.encode());
}

/// Encodes a whole frame into one buffer (header, meta, payload). For control frames and tests;
/// the data path writes header+meta and the payload as separate slices instead.
pub fn encode_frame(
    kind: Kind,
    flags: u8,
    hops: u8,
    partition: u32,
    request_id: u64,
    meta: &[u8],
    payload: &[u8],
) -> BytesMut {
    let mut b = BytesMut::with_capacity(HEADER_LEN + meta.len() + payload.len());
    let h = Header {
        kind,
        flags,
        hops,
        partition,
        request_id,
        meta_len: meta.len() as u32,
        payload_len: payload.len() as u32,
    };
    b.put_slice(&h.encode());
    b.put_slice(meta);
    b.put_slice(payload);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_meta() -> BytesMut {
        let mut m = BytesMut::new();
        put_meta(&mut m, tag::APP, b"demo/echo");
        put_meta(&mut m, tag::ROLE, b"main");
        put_meta_u64(&mut m, tag::WSID, 42);
        m
    }

    #[test]
    fn round_trip_keeps_payload_in_place() {
        let meta = sample_meta();
        let msg = encode_frame(Kind::Request, flags::FORWARDED, 2, 10, 7, &meta, b"hello").freeze();
        let base = msg.as_ptr() as usize;
        let f = Frame::decode(msg.clone()).expect("decodes");
        assert_eq!(f.header.kind, Kind::Request);
        assert_eq!(f.header.flags, flags::FORWARDED);
        assert_eq!(f.header.hops, 2);
        assert_eq!(f.header.partition, 10);
        assert_eq!(f.header.request_id, 7);
        assert_eq!(&f.payload[..], b"hello");
        // Zero copy: the payload is a view into the message buffer.
        assert_eq!(f.payload.as_ptr() as usize, base + HEADER_LEN + meta.len());
        assert_eq!(f.get_str(tag::APP), Some("demo/echo"));
        assert_eq!(f.get_u64(tag::WSID), Some(42));
        assert_eq!(f.get(tag::STATUS), None);
        assert_eq!(f.meta_entries().count(), 3);
    }

    #[test]
    fn header_layout_matches_protocol_doc() {
        let h = Header {
            kind: Kind::Response,
            flags: 0,
            hops: 1,
            partition: 0x0102_0304,
            request_id: 0x1122_3344_5566_7788,
            meta_len: 5,
            payload_len: 0x0A0B_0C0D,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [
                0xFB, 2, 0, 1, 1, 2, 3, 4, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0,
                5, 0x0A, 0x0B, 0x0C, 0x0D
            ]
        );
        assert_eq!(Header::decode(&b), Ok(h));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(
            Frame::decode(Bytes::from_static(b"abc")).unwrap_err(),
            ProtoError::Short(3)
        );
        let mut f = encode_frame(Kind::Request, 0, 0, 0, 1, b"", b"xy");
        f[0] = 0;
        assert!(matches!(
            Frame::decode(f.freeze()),
            Err(ProtoError::BadMagic(0))
        ));
        let mut f = encode_frame(Kind::Request, 0, 0, 0, 1, b"", b"xy");
        f[1] = 99;
        assert!(matches!(
            Frame::decode(f.freeze()),
            Err(ProtoError::BadKind(99))
        ));
        let mut f = encode_frame(Kind::Request, 0, 0, 0, 1, b"", b"xy");
        f[23] = 9; // payload length lies
        assert!(matches!(
            Frame::decode(f.freeze()),
            Err(ProtoError::BadLength { .. })
        ));
        // meta entry that claims more bytes than there are
        let f = encode_frame(Kind::Request, 0, 0, 0, 1, &[1, 0, 9, b'a'], b"");
        assert_eq!(Frame::decode(f.freeze()).unwrap_err(), ProtoError::BadMeta);
    }

    #[test]
    fn decimal_formatting() {
        let mut t = [0u8; 20];
        assert_eq!(fmt_u64(0, &mut t), b"0");
        assert_eq!(fmt_u64(u64::MAX, &mut t), b"18446744073709551615");
    }
}
