//! What every protocol of the load generator provides: requests into a write batch, answers
//! out of a read buffer. Pure (no I/O), so each protocol is tested on byte strings.

use bytes::{Bytes, BytesMut};

/// Status recorded for a request that got no protocol answer: the connection failed.
pub(crate) const STATUS_TRANSPORT: u16 = 0;
/// Status recorded for a request still unanswered when the run's drain time ran out.
pub(crate) const STATUS_TIMEOUT: u16 = 1;
/// Status recorded for an answer that is neither a response nor an error (a websocket
/// Redirect frame reaching the client).
pub(crate) const STATUS_UNEXPECTED: u16 = 2;

/// Name of a status in reports: the HTTP code, or what went wrong.
pub(crate) fn status_name(status: u16) -> String {
    match status {
        STATUS_TRANSPORT => "transport".into(),
        STATUS_TIMEOUT => "timeout".into(),
        STATUS_UNEXPECTED => "unexpected".into(),
        s => s.to_string(),
    }
}

/// Something the decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Request `id` was answered with `status`.
    Done { id: u64, status: u16 },
    /// Bytes to send back unprompted (PONG to a PING).
    Reply(Bytes),
    /// The start of the first error answer's body on a connection (after its `Done`), so a
    /// run that failed says why: the router's JSON error code, not only a status.
    ErrorBody { status: u16, body: String },
}

/// Most bytes of an error answer's body kept by [`Event::ErrorBody`].
pub(crate) const ERROR_BODY_BYTES: usize = 200;

/// The [`Event::ErrorBody`] of an answer, the first time a connection gets a status other than
/// 200 (`sampled` remembers it): one per connection, so an error storm costs nothing more.
pub(crate) fn error_body(sampled: &mut bool, status: u16, body: &[u8]) -> Option<Event> {
    if status == 200 || *sampled {
        return None;
    }
    *sampled = true;
    let body = &body[..body.len().min(ERROR_BODY_BYTES)];
    Some(Event::ErrorBody {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// Bodies up to this size are copied next to their request head: one contiguous slice is
/// cheaper than an extra iovec. Larger ones go out as a shared `Bytes`, never copied.
const COPY_BELOW: usize = 2048;

/// Requests built for one `sendmsg`: small pieces are appended to one arena, large bodies are
/// separate slices that share the run's payload buffer.
#[derive(Default)]
pub(crate) struct Batch {
    arena: BytesMut,
    parts: Vec<Bytes>,
    /// Requests in the batch.
    pub(crate) count: usize,
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch {
            arena: BytesMut::with_capacity(64 * 1024),
            parts: Vec::with_capacity(64),
            count: 0,
        }
    }

    /// Appends a copy of `b`.
    pub(crate) fn put(&mut self, b: &[u8]) {
        self.arena.extend_from_slice(b);
    }

    /// Appends `b`, copying it only when it is small.
    pub(crate) fn put_shared(&mut self, b: &Bytes) {
        if b.len() < COPY_BELOW {
            self.put(b);
        } else {
            self.seal();
            self.parts.push(b.clone());
        }
    }

    fn seal(&mut self) {
        if !self.arena.is_empty() {
            if self.arena.capacity() < 16 * 1024 {
                self.arena.reserve(64 * 1024);
            }
            self.parts.push(self.arena.split().freeze());
        }
    }

    /// The slices to write, in order.
    pub(crate) fn parts(&mut self) -> &[Bytes] {
        self.seal();
        &self.parts
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.arena.is_empty() && self.parts.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.parts.clear();
        self.arena.clear();
        self.count = 0;
    }
}

/// One requester connection's protocol.
pub(crate) trait Codec {
    /// Appends request `id` for workspace `wsid` to `batch`.
    fn encode(&mut self, id: u64, wsid: u32, batch: &mut Batch);
    /// Takes every complete answer out of the front of `buf`, leaving a partial one there (and
    /// room reserved for it). Err: the peer broke the protocol; the connection is dropped.
    fn decode(&mut self, buf: &mut BytesMut, ev: &mut Vec<Event>) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_copies_small_and_shares_large() {
        let mut b = Batch::new();
        let small = Bytes::from_static(b"tiny");
        let big = Bytes::from(vec![7u8; 10_000]);
        b.put(b"h1");
        b.put_shared(&small);
        b.put(b"h2");
        b.put_shared(&big);
        b.put(b"\r\n");
        let parts = b.parts();
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[0][..], b"h1tinyh2");
        assert_eq!(parts[1].as_ptr(), big.as_ptr());
        assert_eq!(&parts[2][..], b"\r\n");
        b.clear();
        assert!(b.is_empty());
    }
}
