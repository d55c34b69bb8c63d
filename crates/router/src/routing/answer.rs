//! What a client gets back, whatever the ingress: a task's answer, an answer relayed by a
//! router of another cluster, or the router's own error. The ingress modules only turn an
//! [`Answer`] into wire bytes; which response fields reach the client is decided here, once,
//! by [`Answer::fields`].

use crate::proto::http::allowed_header;
use crate::proto::{self, put_meta, put_meta_u64, tag, Frame, Kind, MetaIter};
use crate::ws::WsOut;
use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::cell::RefCell;

/// The outcome of routing one request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// A task of this cluster answered.
    Task {
        /// From the frame's STATUS (200 when absent); never 1xx (204 and 304 carry no body).
        status: u16,
        /// The task's Response frame: headers in its metadata, the body as its payload.
        frame: Frame,
        /// The partition that served it.
        partition: u32,
        /// The partition asked for, when the emergency partition served it.
        emergency_for: Option<u32>,
        /// Redirects taken before the answer.
        hops: u8,
    },
    /// A router of another cluster answered over a peer link: its SERVED_BY and `fedbus-*`
    /// header lines are that router's own (a task cannot make an answer `Relayed`).
    Relayed {
        /// The status the serving router sent.
        status: u16,
        /// Its Response frame.
        frame: Frame,
    },
    /// The router refused or failed the request itself.
    Error(RouterError),
    /// 204 to a CORS preflight the app's policy allows (see [`super::cors`]).
    Preflight {
        /// The whole `access-control-allow-headers: ...` line.
        allow_headers: String,
        /// `Access-Control-Max-Age`, seconds.
        max_age: u32,
    },
}

/// An error the router answers by itself, as the JSON body
/// `{"status":N,"error":"<code>","message":"..."}`.
#[derive(Debug)]
pub(crate) struct RouterError {
    /// HTTP status.
    pub(crate) status: u16,
    /// Stable machine-readable code.
    pub(crate) code: &'static str,
    /// For a human.
    pub(crate) message: Cow<'static, str>,
    /// The partition the request was for, when known.
    pub(crate) partition: Option<u32>,
    /// Redirects taken before the error.
    pub(crate) hops: u8,
    /// The partition asked for, when the error came from the emergency partition serving it
    /// (its task timed out, went away or answered garbage): the client sees
    /// `fedbus-emergency` on the error as on an answer.
    pub(crate) emergency_for: Option<u32>,
}

/// One field of the answer as the client should see it, already filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field<'a> {
    /// The body's content type.
    ContentType(&'a [u8]),
    /// `region/cluster/router` of the router of another cluster that served the request.
    ServedBy(&'a [u8]),
    /// A whole `name: value` header line from the task or the serving peer router.
    Line(&'a [u8]),
    /// A `fedbus-*` header with a number, from this router.
    Number(&'static str, u64),
}

/// The longest message a router error carries: many quote the client's input (a path, an app
/// or cluster name from it), which may be as long as `limits.max_header_bytes`, and a router
/// error is held until written without being charged to the memory budget (`held_len` is 0).
/// A longer one is cut, at a character boundary, and ends with `...`.
pub(crate) const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// `message`, cut to [`MAX_ERROR_MESSAGE_BYTES`].
fn bounded(message: Cow<'static, str>) -> Cow<'static, str> {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE_BYTES - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut m = message.into_owned();
    m.truncate(end);
    m.push_str("...");
    Cow::Owned(m)
}

impl Answer {
    /// A router error.
    pub(crate) fn error(
        status: u16,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Answer {
        Answer::Error(RouterError {
            status,
            code,
            message: bounded(message.into()),
            partition: None,
            hops: 0,
            emergency_for: None,
        })
    }

    /// A router error about `partition`, after `hops` redirects.
    pub(crate) fn error_at(
        status: u16,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
        partition: Option<u32>,
        hops: u8,
    ) -> Answer {
        Answer::Error(RouterError {
            status,
            code,
            message: bounded(message.into()),
            partition,
            hops,
            emergency_for: None,
        })
    }

    /// This answer, marked as served by the emergency partition for `asked` (when `Some`).
    /// Only a router error takes the mark here; a task's answer carries it from the start.
    pub(crate) fn in_emergency(mut self, asked: Option<u32>) -> Answer {
        if let Answer::Error(e) = &mut self {
            e.emergency_for = asked;
        }
        self
    }

    /// The partition asked for, when the emergency partition served (or failed) it.
    fn emergency_for(&self) -> Option<u32> {
        match self {
            Answer::Task { emergency_for, .. } => *emergency_for,
            Answer::Error(e) => e.emergency_for,
            Answer::Relayed { .. } | Answer::Preflight { .. } => None,
        }
    }

    /// Bytes the answer keeps in memory until it is written: its frame's metadata and
    /// payload (one buffer: the payload is a slice of the message the link read), 0 for an
    /// answer the router made. A task or peer router may put most of a message's bound in
    /// the metadata, so the payload alone would undercount what a held answer costs.
    pub(crate) fn held_len(&self) -> usize {
        match self {
            Answer::Task { frame, .. } | Answer::Relayed { frame, .. } => {
                frame.meta.len() + frame.payload.len()
            }
            Answer::Error(_) | Answer::Preflight { .. } => 0,
        }
    }

    /// The status the client gets.
    pub(crate) fn status(&self) -> u16 {
        match self {
            Answer::Task { status, .. } | Answer::Relayed { status, .. } => *status,
            Answer::Error(e) => e.status,
            Answer::Preflight { .. } => 204,
        }
    }

    /// The router's error code, for errors.
    #[cfg(test)]
    pub(crate) fn error_code(&self) -> Option<&'static str> {
        match self {
            Answer::Error(e) => Some(e.code),
            _ => None,
        }
    }

    /// The error code a router put on the answer: ours, or the serving router's for a relayed
    /// error (the ERROR entry of its frame), so websocket clients see the code whichever
    /// router refused.
    pub(crate) fn error_tag(&self) -> Option<&[u8]> {
        match self {
            Answer::Error(e) => Some(e.code.as_bytes()),
            Answer::Relayed { frame, .. } => frame
                .get(tag::ERROR)
                .filter(|v| v.iter().all(|b| b.is_ascii_graphic())),
            Answer::Task { .. } | Answer::Preflight { .. } => None,
        }
    }

    /// The partition that served (or would have served) the request: as this router knows it,
    /// or as the serving router's frame says for a relayed answer.
    pub(crate) fn partition(&self) -> Option<u32> {
        match self {
            Answer::Task { partition, .. } => Some(*partition),
            // The serving router's (0 when it had none).
            Answer::Relayed { frame, .. } => Some(frame.header.partition),
            Answer::Preflight { .. } => None,
            Answer::Error(e) => e.partition,
        }
    }

    /// Redirects taken on this router (on the serving router, for a relayed answer).
    pub(crate) fn hops(&self) -> u8 {
        match self {
            Answer::Task { hops, .. } => *hops,
            // Taken on the serving router.
            Answer::Relayed { frame, .. } => frame.header.hops,
            Answer::Preflight { .. } => 0,
            Answer::Error(e) => e.hops,
        }
    }

    /// The body the client gets: the payload of the answer, or the JSON error.
    pub(crate) fn body(&self) -> Cow<'_, Bytes> {
        match self {
            Answer::Task { frame, .. } | Answer::Relayed { frame, .. } => {
                Cow::Borrowed(&frame.payload)
            }
            Answer::Error(e) => Cow::Owned(Bytes::from(crate::proto::http::error_body(
                e.status, e.code, &e.message,
            ))),
            Answer::Preflight { .. } => Cow::Owned(Bytes::new()),
        }
    }

    /// Calls `f` with every response field the client may see, in order. The one filter for
    /// every ingress: a task cannot set framing headers (it would split or smuggle responses)
    /// nor the router's own `fedbus-*` headers; values never carry a control byte (CR and LF
    /// included; RFC 9110 section 5.5). This router's
    /// `fedbus-partition`, `fedbus-hops` and `fedbus-emergency` come last; a relayed answer
    /// carries the serving router's instead. Nothing here allocates.
    pub(crate) fn fields(&self, mut f: impl FnMut(Field<'_>)) {
        let (frame, from_router) = match self {
            Answer::Task { frame, .. } => (Some(frame), false),
            Answer::Relayed { frame, .. } => (Some(frame), true),
            Answer::Error(_) => (None, false),
            Answer::Preflight {
                allow_headers,
                max_age,
            } => {
                f(Field::Line(super::cors::ALLOW_METHODS));
                f(Field::Line(allow_headers.as_bytes()));
                f(Field::Number("access-control-max-age", u64::from(*max_age)));
                return;
            }
        };
        match frame {
            Some(frame) => {
                for (t, v) in MetaIter::new(&frame.meta).filter_map(Result::ok) {
                    // Looked at only for the entries it decides (`allowed_header` checks a
                    // header line itself; STATUS and the rest are not written).
                    let clean = || !v.iter().copied().any(proto::http::is_ctl);
                    match t {
                        tag::HEADER if allowed_header(v, from_router) => f(Field::Line(v)),
                        tag::CONTENT_TYPE if clean() => f(Field::ContentType(v)),
                        tag::SERVED_BY if from_router && clean() => f(Field::ServedBy(v)),
                        _ => {}
                    }
                }
            }
            None => f(Field::ContentType(b"application/json")),
        }
        if from_router {
            return;
        }
        if let Some(p) = self.partition() {
            f(Field::Number("fedbus-partition", u64::from(p)));
        }
        f(Field::Number("fedbus-hops", u64::from(self.hops())));
        if let Some(e) = self.emergency_for() {
            f(Field::Number("fedbus-emergency", u64::from(e)));
        }
    }
}

/// The status of an answer frame (`default` when it has none). 1xx statuses and statuses out
/// of range are refused (an interim answer would let a task split the client's keep-alive
/// stream); 204 and 304 are allowed and go out without a body or a length.
pub(crate) fn answer_status(f: &Frame, default: u16) -> Option<u16> {
    match f.get(tag::STATUS) {
        None => Some(default),
        Some(_) => f
            .get_u64(tag::STATUS)
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (200..600).contains(s)),
    }
}

/// Queues the Response frame for `a` (client websocket and peer links); returns the body
/// length. `served_by` names this router on answers to peers.
///
/// When the answer does not fit: over the connection's outbox limit, the other side does not
/// read its answers, and the connection is closed with 1013 (try again later); a client
/// session at once, ahead of the answers it has not read ([`WsOut::close_now`]), a peer link
/// after what is queued. Within the limit but over the shard's memory budget, the answer is
/// still queued, charged whatever the budget has left ([`WsOut::send_binary_forced`]).
pub(crate) fn send_answer(
    out: &RefCell<WsOut>,
    shard: usize,
    id: u64,
    a: &Answer,
    served_by: Option<Served<'_>>,
) -> usize {
    let mut m = HEAD.with(|h| h.take());
    answer_head(&mut m, shard, id, a, served_by);
    let n = send_head(out, &m, id, a, served_by);
    HEAD.with(|h| h.set(m));
    n
}

/// What a Response on a peer link says of the router that served it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served<'a> {
    /// Its `region/cluster/router` (SERVED_BY).
    pub(crate) by: &'a str,
    /// The app's policy allows credentials for the request's origin (CORS_CREDENTIALS).
    pub(crate) cors_credentials: bool,
}

thread_local! {
    /// The shard's buffer for Response frame heads: each is copied into its connection's
    /// outbox, so one buffer serves every answer (taken out while in use).
    static HEAD: std::cell::Cell<BytesMut> = std::cell::Cell::new(BytesMut::new());
}

/// [`send_answer`] once the head `m` is made.
fn send_head(
    out: &RefCell<WsOut>,
    m: &[u8],
    id: u64,
    a: &Answer,
    served_by: Option<Served<'_>>,
) -> usize {
    let body = a.body();
    let n = body.len();
    let mut o = out.borrow_mut();
    if o.is_closing() {
        return n;
    }
    if !o.has_room(m.len() + n) {
        // The other side does not read its answers: rather than drop one silently, close the
        // connection with 1013 (try again later) so every request on it gets a clear end.
        tracing::warn!(id, "websocket outbox over its limit: closing with 1013");
        if served_by.is_some() {
            // A peer link: what is queued answers other clients; it goes out before the close.
            o.close(1013);
        } else {
            o.close_now(1013);
        }
        return n;
    }
    // Queued whatever the shard's budget has left, as an HTTP answer is (`HeldAnswer`): its
    // request ran, so a `503 overloaded` in its place would lose the reply. The connection's
    // own limit (above) still bounds what a session that does not read holds.
    let _ = o.send_binary_forced(m, &body);
    n
}

/// The Response frame of `a` without its body (the body goes out as its own slice).
fn answer_head(m: &mut BytesMut, shard: usize, id: u64, a: &Answer, served_by: Option<Served<'_>>) {
    proto::begin_head(m);
    put_meta_u64(m, tag::STATUS, u64::from(a.status()));
    if let Some(r) = served_by {
        put_meta(m, tag::SERVED_BY, r.by.as_bytes());
        if r.cors_credentials {
            put_meta(m, tag::CORS_CREDENTIALS, b"");
        }
    }
    if let Some(code) = a.error_tag() {
        put_meta(m, tag::ERROR, code);
    }
    if served_by.is_none() {
        // Peers add their own fedbus-shard; the serving router is named by SERVED_BY.
        put_line(m, "fedbus-shard", shard as u64);
        // As on HTTP: the router's own 503 says when to come back (a task's 503 keeps its
        // own Retry-After or none).
        if a.status() == 503 && a.error_tag().is_some() {
            put_line(m, "retry-after", 1);
        }
    }
    a.fields(|f| match f {
        Field::ContentType(v) => put_meta(m, tag::CONTENT_TYPE, v),
        Field::ServedBy(v) => put_meta(m, tag::SERVED_BY, v),
        Field::Line(v) => put_meta(m, tag::HEADER, v),
        Field::Number(name, n) => put_line(m, name, n),
    });
    let body = a.body();
    proto::finish_head(
        m,
        Kind::Response,
        0,
        a.hops(),
        a.partition().unwrap_or(0),
        id,
        body.len(),
    );
}

/// Appends a `name: n` HEADER entry without allocating.
fn put_line(m: &mut BytesMut, name: &str, n: u64) {
    let mut tmp = [0u8; 20];
    let mut line = [0u8; 64];
    let digits = proto::fmt_u64(n, &mut tmp);
    let len = name.len() + 2 + digits.len();
    line[..name.len()].copy_from_slice(name.as_bytes());
    line[name.len()..name.len() + 2].copy_from_slice(b": ");
    line[name.len() + 2..len].copy_from_slice(digits);
    put_meta(m, tag::HEADER, &line[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_frame, put_meta, Kind};
    use bytes::BytesMut;

    /// A router error quoting a long input is cut to `MAX_ERROR_MESSAGE_BYTES`, at a
    /// character boundary; a short one is kept as it is.
    #[test]
    fn error_messages_are_bounded() {
        let message = |a: Answer| match a {
            Answer::Error(e) => e.message.into_owned(),
            _ => unreachable!(),
        };
        assert_eq!(message(Answer::error(404, "x", "no app a/b")), "no app a/b");
        for filler in ["a", "\u{e9}", "\u{1f600}"] {
            let long = format!("no app {}", filler.repeat(10_000));
            for a in [
                Answer::error(404, "unknown_app", long.clone()),
                Answer::error_at(404, "unknown_app", long.clone(), Some(1), 0),
            ] {
                let m = message(a);
                assert!(m.len() <= MAX_ERROR_MESSAGE_BYTES, "{} bytes", m.len());
                assert!(m.len() > MAX_ERROR_MESSAGE_BYTES - 8, "{} bytes", m.len());
                assert!(m.ends_with("...") && long.starts_with(&m[..m.len() - 3]));
            }
        }
    }

    fn frame(meta: &[(u8, &[u8])]) -> Frame {
        let mut m = BytesMut::new();
        for (t, v) in meta {
            put_meta(&mut m, *t, v);
        }
        Frame::decode(encode_frame(Kind::Response, 0, 0, 0, 1, &m, b"body").freeze())
            .expect("frame")
    }

    fn fields(a: &Answer) -> Vec<String> {
        let mut out = Vec::new();
        a.fields(|f| {
            out.push(match f {
                Field::ContentType(v) => format!("ct {}", String::from_utf8_lossy(v)),
                Field::ServedBy(v) => format!("by {}", String::from_utf8_lossy(v)),
                Field::Line(v) => format!("line {}", String::from_utf8_lossy(v)),
                Field::Number(n, v) => format!("{n} {v}"),
            })
        });
        out
    }

    #[test]
    fn interim_and_out_of_range_statuses_are_refused() {
        assert_eq!(answer_status(&frame(&[]), 200), Some(200));
        assert_eq!(
            answer_status(&frame(&[(tag::STATUS, b"201")]), 200),
            Some(201)
        );
        assert_eq!(
            answer_status(&frame(&[(tag::STATUS, b"599")]), 200),
            Some(599)
        );
        for bodiless in [204, 304] {
            let st = bodiless.to_string();
            assert_eq!(
                answer_status(&frame(&[(tag::STATUS, st.as_bytes())]), 200),
                Some(bodiless)
            );
        }
        for bad in [&b"100"[..], b"101", b"199", b"600", b"abc", b"-1"] {
            assert_eq!(
                answer_status(&frame(&[(tag::STATUS, bad)]), 200),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_task_cannot_forge_router_fields() {
        let f = frame(&[
            (tag::HEADER, b"x-user: 1"),
            (tag::HEADER, b"fedbus-partition: 9"),
            (tag::HEADER, b"content-length: 0"),
            (tag::SERVED_BY, b"evil/evil/r0"),
            (tag::CONTENT_TYPE, b"text/plain\r\nx: y"),
            (tag::CONTENT_TYPE, b"text/plain"),
        ]);
        let a = Answer::Task {
            status: 200,
            frame: f,
            partition: 3,
            emergency_for: Some(5),
            hops: 1,
        };
        assert_eq!(
            fields(&a),
            [
                "line x-user: 1",
                "ct text/plain",
                "fedbus-partition 3",
                "fedbus-hops 1",
                "fedbus-emergency 5"
            ]
        );
    }

    #[test]
    fn a_relayed_answer_keeps_the_serving_routers_fields_only() {
        let f = frame(&[
            (tag::HEADER, b"fedbus-partition: 9"),
            (tag::HEADER, b"transfer-encoding: chunked"),
            (tag::SERVED_BY, b"ru/spb2/r1"),
        ]);
        let a = Answer::Relayed {
            status: 200,
            frame: f,
        };
        assert_eq!(fields(&a), ["line fedbus-partition: 9", "by ru/spb2/r1"]);
    }

    #[test]
    fn an_error_of_the_emergency_partition_says_so() {
        let a = Answer::error_at(504, "task_timeout", "late", Some(2), 0).in_emergency(Some(9));
        assert_eq!(
            fields(&a),
            [
                "ct application/json",
                "fedbus-partition 2",
                "fedbus-hops 0",
                "fedbus-emergency 9"
            ]
        );
        let a = Answer::error_at(504, "task_timeout", "late", Some(2), 0).in_emergency(None);
        assert!(!fields(&a).iter().any(|f| f.starts_with("fedbus-emergency")));
    }

    #[test]
    fn errors_are_json_and_say_hops() {
        let a = Answer::error_at(508, "redirect_limit", "too many", Some(2), 5);
        assert_eq!(
            fields(&a),
            ["ct application/json", "fedbus-partition 2", "fedbus-hops 5"]
        );
        assert!(std::str::from_utf8(&a.body())
            .expect("utf8")
            .contains("\"redirect_limit\""));
    }
}
