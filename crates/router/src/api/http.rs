//! HTTP/1.1 client ingress: keep-alive, pipelining (requests of one connection are routed
//! concurrently and answered in order), `Expect: 100-continue`, limits from the config. The
//! body is a slice of the read buffer and goes to the task without a copy; the task's payload
//! goes back to the client the same way (one vectored write of head + body).

use super::inflight::{Front, Ordered};
use crate::api::reason;
use crate::metrics::{Listener, ShardMetrics};
use crate::proto::http::{cross_origin, is_retry_after, MAX_HEADERS};
use crate::route::{parse_api_path, PathError};
use crate::routing::{self, Answer, Field, Ingress, Request, VerifyCache};
use crate::shard::{charge_ahead, BodyCharge, OutboxCharge, Shard, CHARGE_AHEAD};
use crate::util::Deadline;
use crate::ws::conn::ReadSpace;
use crate::ws::Socket as _;
use crate::ws::Stream;
use bytes::{Bytes, BytesMut};
use futures_lite::AsyncReadExt;
use futures_util::future::Either;
use glommio::net::TcpStream;
use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A parsed request whose head and body are slices of one frozen buffer.
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub struct Req {
    /// The request as read: its head, then its body (one slice of the read buffer, so that a
    /// request takes one reference count on the buffer, not one per part).
    pub(crate) bytes: Bytes,
    /// Length of the head in `bytes`; the body follows it.
    pub(crate) head_len: usize,
    pub(crate) method: Method,
    pub(crate) path: Range<usize>,
    pub(crate) token: Option<Range<usize>>,
    pub(crate) content_type: Option<Range<usize>>,
    /// `Origin` and `Host`, for the CORS check.
    pub(crate) origin: Option<Range<usize>>,
    pub(crate) host: Option<Range<usize>>,
    /// `Access-Control-Request-Method` present: an `OPTIONS` with it is a preflight.
    pub(crate) preflight: bool,
    pub(crate) close: bool,
    /// An HTTP/1.0 request: an answer that keeps the connection says `Connection:
    /// keep-alive` (RFC 9112 9.3), or the client closes after it.
    pub(crate) http10: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl Method {
    /// The method of a request line; None for methods a task cannot be asked (CONNECT, TRACE,
    /// extensions).
    pub(crate) fn parse(m: &str) -> Option<Method> {
        Some(match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            _ => return None,
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        }
    }
}

/// Result of looking at the read buffer.
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub enum Parsed {
    /// More bytes needed; `continue_` asks for a `100 Continue`.
    Incomplete {
        /// The client sent `Expect: 100-continue`.
        continue_: bool,
        /// Bytes of the request head once it is complete (the body is still coming).
        head_len: Option<usize>,
        /// The announced body length, once the head is complete.
        body_len: usize,
    },
    /// A whole request, split off the buffer.
    Request(Req),
    /// Unrecoverable: answer and close.
    Error(u16, &'static str, &'static str),
}

/// The path (and query) of a request target: an absolute-form target
/// (`http://host/api/...`, RFC 9112 3.2.2, which a server must accept) without its scheme
/// and authority, any other as it is.
fn origin_form(target: &str) -> &str {
    let scheme = |s: &str| {
        target
            .get(..s.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(s))
    };
    for s in ["http://", "https://"] {
        if scheme(s) {
            let rest = &target[s.len()..];
            // The authority ends at `/`, `?` or `#` (RFC 3986 3.2). Empty, a slice of
            // `target` still (its range is taken in the buffer).
            return rest
                .find(['/', '?', '#'])
                .map_or(&rest[rest.len()..], |i| &rest[i..]);
        }
    }
    target
}

fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// The longest request target or header field value [`parse_one`] takes: the most a frame's
/// metadata entry holds.
const META_VALUE_MAX: usize = u16::MAX as usize;

/// [`parse_one`] for a connection's read loop, which parses again after each read: what the
/// last parse found decides whether the bytes that came since can change its answer. httparse
/// keeps no state between calls, so a head trickled a byte per read was parsed from its start
/// per byte (`benches/trickled-head.sh`).
/// - A head that was incomplete stays so until a line ends (a head ends with an empty line).
///   New bytes without a [`line_end_or_control`] byte, in a buffer still within `max_header`,
///   give the same [`Parsed::Incomplete`] without a parse. A printable byte that makes the head
///   malformed (a space in a field name) is then refused at its line's end, within the same
///   bounds (`max_header`, the head's deadline), or at the client's end of input
///   ([`HeadScan::flush`]); control bytes, as a binary protocol sends, are refused at once.
/// - A complete head whose body is still arriving is not parsed again until the body is whole.
#[derive(Default)]
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub struct HeadScan {
    /// The buffer's length at the last parse.
    len: usize,
    last: Scanned,
    /// A parse of an incomplete head was skipped since the last parse.
    skipped: bool,
    /// Parses made (the tests count them).
    parses: usize,
}

#[derive(Default, Clone, Copy)]
enum Scanned {
    /// Nothing to go on: parse.
    #[default]
    Nothing,
    /// The head was incomplete.
    PartialHead,
    /// The head was complete, the body not.
    Body {
        continue_: bool,
        head_len: usize,
        body_len: usize,
    },
}

/// Whether `new` bytes of an incomplete head may change what httparse makes of it: a line's
/// end (LF), or a control byte other than HTAB and CR, which no head holds (RFC 9110 5.5). A
/// CR waits for its LF: a line is parsed again once, at its end. It stops at the first such
/// byte: a read that brings more than a trickle has a line end near its start.
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub fn line_end_or_control(new: &[u8]) -> bool {
    new.iter()
        .any(|&b| (b < 0x20 && b != b'\t' && b != b'\r') || b == 0x7f)
}

impl HeadScan {
    /// [`parse_one`] of `buf`, or its answer without a parse when the bytes read since the
    /// last cannot change it.
    #[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
    pub fn parse(&mut self, buf: &mut BytesMut, max_header: usize, max_body: usize) -> Parsed {
        // A buffer shorter than at the last parse was cut or replaced: parse it.
        let same = buf.len() >= self.len;
        match self.last {
            Scanned::PartialHead
                if same && buf.len() <= max_header && !line_end_or_control(&buf[self.len..]) =>
            {
                self.len = buf.len();
                self.skipped = true;
                return Parsed::Incomplete {
                    continue_: false,
                    head_len: None,
                    body_len: 0,
                };
            }
            Scanned::Body {
                continue_,
                head_len,
                body_len,
            } if same && buf.len() < head_len + body_len => {
                // As `parse_one` would: room for the whole body (a buffer reclaimed or grown
                // by a read since may have less).
                buf.reserve(head_len + body_len - buf.len());
                self.len = buf.len();
                return Parsed::Incomplete {
                    continue_,
                    head_len: Some(head_len),
                    body_len,
                };
            }
            _ => {}
        }
        let parsed = parse_one(buf, max_header, max_body);
        self.parses += 1;
        self.len = buf.len();
        self.skipped = false;
        self.last = match parsed {
            // An empty buffer (after a request was cut) has nothing to skip a parse for: the
            // next read, most often a whole request, is parsed without a scan first.
            Parsed::Incomplete { head_len: None, .. } if !buf.is_empty() => Scanned::PartialHead,
            Parsed::Incomplete {
                continue_,
                head_len: Some(head_len),
                body_len,
            } => Scanned::Body {
                continue_,
                head_len,
                body_len,
            },
            _ => Scanned::Nothing,
        };
        parsed
    }

    /// At the client's end of input: whether a parse of the head was skipped since the last,
    /// in which case the next [`HeadScan::parse`] parses (a head made malformed by its last
    /// bytes is answered 400 before the connection closes, as it was when they came).
    #[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
    pub fn flush(&mut self) -> bool {
        if std::mem::take(&mut self.skipped) {
            self.last = Scanned::Nothing;
            return true;
        }
        false
    }
}

/// Parses one request from the front of `buf`, splitting it off when complete.
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub fn parse_one(buf: &mut BytesMut, max_header: usize, max_body: usize) -> Parsed {
    // Uninitialized slots: httparse writes the ones it fills, and zeroed headers were a
    // memset of 32 bytes per slot per request.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let n = match r.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_header {
                return Parsed::Error(431, "headers_too_large", "request head over the limit");
            }
            return Parsed::Incomplete {
                continue_: false,
                head_len: None,
                body_len: 0,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Error(431, "headers_too_large", "too many headers")
        }
        Err(_) => return Parsed::Error(400, "bad_request", "malformed request"),
    };
    if n > max_header {
        return Parsed::Error(431, "headers_too_large", "request head over the limit");
    }
    let Some(method) = r.method.and_then(Method::parse) else {
        // `/api/ws` takes GET only: its 405 says so (`Allow: GET`), whatever the method.
        let ws = r
            .path
            .is_some_and(|p| is_ws_path(origin_form(p).as_bytes()));
        let allowed = if ws {
            WS_NEEDS_GET
        } else {
            "GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS"
        };
        return Parsed::Error(405, "method_not_allowed", allowed);
    };
    let http10 = r.version == Some(0);
    let (mut close, mut keep_alive) = (false, false);
    let mut cl: Option<usize> = None;
    let (mut token, mut ctype, mut expect, mut te) = (None, None, false, false);
    let (mut origin, mut host, mut acrm) = (None, None, false);
    let mut hosts = 0;
    for h in r.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Digits only: `+5` parses as a usize but other parsers on the path may disagree.
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .and_then(crate::proto::parse_decimal::<usize>);
            match (v, cl) {
                (Some(v), None) => cl = Some(v),
                (Some(v), Some(old)) if v == old => {}
                _ => return Parsed::Error(400, "bad_request", "bad Content-Length"),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            token = crate::ws::handshake::bearer(h.value).map(|t| range_of(buf, t.as_bytes()));
            if token.is_none() {
                return Parsed::Error(401, "bad_token", "Authorization must be `Bearer <token>`");
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            ctype = Some(range_of(buf, h.value));
        } else if name.eq_ignore_ascii_case("connection") {
            // A list of options (RFC 9110 7.6.1): `TE, close` closes too.
            for option in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(range_of(buf, h.value));
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(range_of(buf, h.value));
        } else if name.eq_ignore_ascii_case("expect") {
            // An HTTP/1.0 client does not know 100 Continue (RFC 9110 10.1.1: ignored).
            expect = !http10 && h.value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("access-control-request-method") {
            acrm = true;
        }
    }
    // HTTP/1.0 closes after each answer unless it asks to keep the connection.
    let close = close || http10 && !keep_alive;
    if te {
        // RFC 9112 6.3: both framings at once is how requests are smuggled past a proxy that
        // reads the other one: refuse and close (every Parsed::Error closes the connection).
        if cl.is_some() {
            return Parsed::Error(
                400,
                "bad_request",
                "both Content-Length and Transfer-Encoding",
            );
        }
        return Parsed::Error(
            411,
            "length_required",
            "send a Content-Length; chunked bodies are not accepted",
        );
    }
    let target = origin_form(r.path.unwrap_or("/"));
    // RFC 9112 3.2: an HTTP/1.1 request without a Host, or any with more than one, is a 400
    // (the one kept would be a guess, and it decides whether a request is cross-origin). An
    // upgrade's own checks answer these for `/api/ws` (400 bad_upgrade).
    if (hosts > 1 || hosts == 0 && !http10) && !is_ws_path(target.as_bytes()) {
        let why = match hosts {
            0 => "an HTTP/1.1 request needs a Host",
            _ => "more than one Host",
        };
        return Parsed::Error(400, "bad_request", why);
    }
    let path = range_of(buf, target.as_bytes());
    // A frame's metadata value holds at most 64 KiB - 1 (`fedbus_proto::put_meta`): a longer
    // target, token, content type or origin would reach a task or another cluster cut. Only a
    // head over that size can hold one, so the default `limits.max_header_bytes` (16 KiB)
    // never looks. Fields the router does not carry on may be longer.
    if n > META_VALUE_MAX {
        if target.len() > META_VALUE_MAX {
            return Parsed::Error(414, "uri_too_long", "request target over 65535 bytes");
        }
        let carried = [&token, &ctype, &origin];
        if carried
            .iter()
            .any(|f| f.as_ref().is_some_and(|f| f.len() > META_VALUE_MAX))
        {
            let why = "Authorization token, Content-Type or Origin over 65535 bytes";
            return Parsed::Error(431, "headers_too_large", why);
        }
    }
    let body_len = cl.unwrap_or(0);
    if body_len > max_body {
        return Parsed::Error(413, "body_too_large", "request body over the limit");
    }
    if buf.len() < n + body_len {
        buf.reserve(n + body_len - buf.len());
        return Parsed::Incomplete {
            continue_: expect,
            head_len: Some(n),
            body_len,
        };
    }
    let bytes = buf.split_to(n + body_len).freeze();
    if bytes.len() > CHARGE_AHEAD {
        // The buffer was made for this body: let go of it with the request (what follows is
        // copied), rather than read the next body into it. It is all resident, and a body
        // arriving is charged only what came and `CHARGE_AHEAD` (`charge_ahead`).
        *buf = BytesMut::from(&buf[..]);
    }
    Parsed::Request(Req {
        bytes,
        head_len: n,
        method,
        path,
        token,
        content_type: ctype,
        origin,
        host,
        preflight: acrm && method == Method::Options,
        close,
        http10,
    })
}

impl Req {
    /// The request head (fields' ranges index into it).
    pub(crate) fn head(&self) -> &[u8] {
        &self.bytes[..self.head_len]
    }

    /// The body.
    #[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
    pub fn body(&self) -> &[u8] {
        &self.bytes[self.head_len..]
    }

    /// The `Origin` of a cross-origin request (see [`cross_origin`]).
    fn cross_origin(&self) -> Option<&[u8]> {
        let field = |r: &Option<Range<usize>>| r.clone().map(|r| &self.head()[r]);
        cross_origin(field(&self.origin), field(&self.host))
    }
}

/// The protocol-neutral request of a parsed HTTP request, whose body is `payload` (the
/// request's body, a slice of `req.bytes` taken once by the caller).
#[allow(clippy::result_large_err)]
fn request(req: &Req, payload: Bytes, received: Instant) -> Result<Request<'_>, Answer> {
    let head = req.head();
    let path = std::str::from_utf8(&head[req.path.clone()]).unwrap_or("");
    let origin = req.cross_origin();
    Ok(Request {
        target: parse_api_path(path).map_err(|e| path_error(e, path))?,
        method: req.method.as_str(),
        credential: req.token.clone().map(|r| &head[r]),
        content_type: req.content_type.clone().map(|r| &head[r]),
        payload,
        ingress: Ingress::Http,
        preflight: req.preflight && origin.is_some(),
        origin,
        received,
    })
}

fn path_error(e: PathError, path: &str) -> Answer {
    Answer::error(e.http_status(), e.code(), format!("{e}: {path}"))
}

/// Checks a request head whose body has not arrived yet, before `100 Continue` and before
/// buffering the body: the same admission as the whole request, so an unauthenticated client
/// cannot make the router hold an upload for this cluster, and an anonymous service's upload
/// is held to `limits.max_anonymous_body_bytes`. (A request for another cluster is admitted
/// without a token check, which is its home cluster's, so its body is buffered up to
/// `limits.max_body_bytes`, within the body budget, and forwarded.)
#[allow(clippy::result_large_err)]
fn check_head(
    shard: &Shard,
    cache: &mut VerifyCache,
    head: &[u8],
    body_len: usize,
) -> Result<(), Answer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    if r.parse(head).is_err() {
        return Err(Answer::error(400, "bad_request", "malformed request"));
    }
    let path = origin_form(r.path.unwrap_or("/"));
    if is_ws_path(path.as_bytes()) {
        let method = r.method.unwrap_or("");
        return Err(not_an_upgrade(
            method,
            "a websocket upgrade carries no body",
        ));
    }
    let field = |name| crate::ws::handshake::header(r.headers, name);
    let credential = field("authorization")
        .and_then(crate::ws::handshake::bearer)
        .map(str::as_bytes);
    let req = Request {
        target: parse_api_path(path).map_err(|e| path_error(e, path))?,
        method: r.method.unwrap_or("POST"),
        credential,
        content_type: None,
        payload: Bytes::new(),
        ingress: Ingress::Http,
        origin: cross_origin(field("origin"), field("host")),
        preflight: false,
        received: Instant::now(),
    };
    match routing::admit(shard, cache, &req)? {
        routing::Admitted::Local(routing::Principal::Anonymous) => {
            routing::anonymous_body(shard, body_len)
        }
        _ => Ok(()),
    }
}

/// Appends `n` in decimal.
fn put_num(out: &mut BytesMut, n: u64) {
    let mut tmp = [0u8; 20];
    out.put_slice(crate::proto::fmt_u64(n, &mut tmp));
}

/// CORS fields of an answer to a cross-origin request the app allows.
struct CorsAnswer {
    /// The request's `Origin`, a slice of its head.
    origin: Bytes,
    credentials: bool,
}

/// Writes the response head for `a` into `out`; `body_len` None: no `content-length` and no
/// default `content-type` (204, 304).
fn write_head(
    out: &mut BytesMut,
    shard: &Shard,
    a: &Answer,
    body_len: Option<usize>,
    close: bool,
    http10: bool,
    cors: Option<&CorsAnswer>,
) {
    // Plain byte appends and `fmt_u64` instead of `write!`: this runs once per response, and
    // the formatting machinery cost more than the rest of the head.
    let status = a.status();
    out.put_slice(b"HTTP/1.1 ");
    put_num(out, u64::from(status));
    out.put_u8(b' ');
    out.put_slice(reason(status).as_bytes());
    out.put_slice(b"\r\n");
    let (mut has_ct, mut served_by, mut has_retry, mut has_auth) = (false, false, false, false);
    a.fields(|f| {
        match f {
            Field::ContentType(v) => {
                has_ct = true;
                out.put_slice(b"content-type: ");
                out.put_slice(v);
            }
            Field::ServedBy(v) => {
                served_by = true;
                out.put_slice(b"fedbus-served-by: ");
                out.put_slice(v);
            }
            Field::Line(v) => {
                has_retry |= is_retry_after(v);
                has_auth |= status == 401 && crate::proto::http::is_www_authenticate(v);
                out.put_slice(v);
            }
            Field::Number(name, n) => {
                out.put_slice(name.as_bytes());
                out.put_slice(b": ");
                put_num(out, n);
            }
        }
        out.put_slice(b"\r\n");
    });
    if !has_ct && body_len.is_some() {
        out.put_slice(b"content-type: application/octet-stream\r\n");
    }
    if let Answer::Error(e) = a {
        if e.status == 405 {
            out.put_slice(allow_line(&e.message));
        }
    }
    if let Some(c) = cors {
        out.put_slice(b"access-control-allow-origin: ");
        out.put_slice(&c.origin);
        out.put_slice(b"\r\nvary: Origin\r\n");
        out.put_slice(routing::cors::EXPOSE_HEADERS);
        out.put_slice(b"\r\n");
        if c.credentials {
            out.put_slice(b"access-control-allow-credentials: true\r\n");
        }
    }
    if let Some(n) = body_len {
        out.put_slice(b"content-length: ");
        put_num(out, n as u64);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"fedbus-shard: ");
    put_num(out, shard.index as u64);
    out.put_slice(b"\r\n");
    if !served_by {
        out.put_slice(b"fedbus-served-by: ");
        out.put_slice(shard.router_name.as_bytes());
        out.put_slice(b"\r\n");
    }
    // A router's own 503 (overloaded, no live task) says when to come back; a task's 503
    // carries its own Retry-After or none, and never gets a second one.
    if status == 503 && !has_retry && a.error_tag().is_some() {
        out.put_slice(b"retry-after: 1\r\n");
    }
    // A router's own 401 (here or relayed from the serving cluster) carries the challenge
    // RFC 9110 11.6.1 requires; a task's 401 keeps its own.
    if status == 401 && !has_auth {
        if let Some(code) = a.error_tag() {
            out.put_slice(crate::proto::http::www_authenticate(code).as_bytes());
        }
    }
    if close {
        out.put_slice(b"connection: close\r\n");
    } else if http10 {
        // An HTTP/1.0 client keeps the connection only when the answer says so (RFC 9112
        // 9.3); without it `ab -k` and the like close after every answer.
        out.put_slice(b"connection: keep-alive\r\n");
    }
    out.put_slice(b"\r\n");
}

use bytes::BufMut;

/// Serves one plaintext client connection until it closes.
pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _open = OpenConn::new(&shard);
    serve_stream(&shard, stream, Instant::now()).await;
}

/// One open client connection, counted in the api gauge and the per-shard limit from accept
/// until it is dropped (a TLS connection counts during its handshake too).
pub(crate) struct OpenConn(Rc<Shard>);

impl OpenConn {
    pub(crate) fn new(shard: &Rc<Shard>) -> OpenConn {
        let m = &shard.metrics;
        let open = &m.connections[Listener::Api as usize];
        ShardMetrics::inc(open);
        let open = open.load(std::sync::atomic::Ordering::Relaxed);
        m.api_open_peak
            .fetch_max(open, std::sync::atomic::Ordering::Relaxed);
        shard.client_conns.set(shard.client_conns.get() + 1);
        OpenConn(shard.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        let shard = &self.0;
        shard.client_conns.set(shard.client_conns.get() - 1);
        ShardMetrics::dec(&shard.metrics.connections[Listener::Api as usize]);
        ShardMetrics::inc(&shard.metrics.api_closed);
    }
}

/// Serves HTTP/1.1 (and a `/api/ws` upgrade) on an accepted stream, plain or TLS.
/// `accepted`: when its connection was accepted (a TLS one before its handshake).
pub(crate) async fn serve_stream<S: Stream>(shard: &Rc<Shard>, mut stream: S, accepted: Instant) {
    match serve_inner(shard, &mut stream, accepted).await {
        Err(e) => tracing::debug!(shard = shard.index, "client connection ended: {e}"),
        Ok(Some((head, leftover))) => super::ws::serve(shard.clone(), stream, head, leftover).await,
        Ok(None) => {}
    }
}

/// One answered request, ready to be written.
struct Done {
    a: Answer,
    /// Close the connection after it.
    close: bool,
    /// The request was HTTP/1.0 (kept alive: the answer says `Connection: keep-alive`).
    http10: bool,
    /// The request was HEAD: no body.
    head: bool,
    /// Request body bytes, for the metrics.
    n_in: usize,
    start: Instant,
    /// CORS fields for a cross-origin request the app allowed.
    cors: Option<CorsAnswer>,
    /// The answer's body, charged to the memory budget and to the connection's share of it
    /// as a queued answer while it waits to be written (behind a slower answer before it, for
    /// up to `limits.request_timeout_ms`).
    _held: Option<HeldAnswer>,
}

/// One HTTP connection's answers that are ready but not written yet: the bodies over
/// [`COPY_BODY_BYTES`] waiting in their in-flight slots, and the batch being written. Its
/// share of the memory budget is `limits.max_connection_outbox_bytes`, checked as an `/api/ws`
/// session's outbox checks it: an answer is let in while what is held is within the share,
/// however large the answer; one that comes while it is over marks the connection, which is
/// then closed as a slow reader (`fedbus_slow_reader_closed_total`). Without it a client that
/// pipelines `limits.max_inflight_per_connection` requests for large answers and reads them
/// slowly (or behind a slow first one) could hold that many answers of up to the task link's
/// message bound each: 2 GiB with the defaults.
struct AnswerShare {
    held: std::cell::Cell<usize>,
    limit: usize,
    over: std::cell::Cell<bool>,
}

impl AnswerShare {
    fn new(limit: usize) -> Rc<AnswerShare> {
        Rc::new(AnswerShare {
            held: std::cell::Cell::new(0),
            limit,
            over: std::cell::Cell::new(false),
        })
    }

    /// Counts an answer of `n` bytes that came; marks the connection when it held more than
    /// its share already.
    fn add(&self, n: usize) {
        if self.held.get() > self.limit {
            self.over.set(true);
        }
        self.count(n);
    }

    /// Counts `n` bytes without the check: a batch about to be written holds the answers that
    /// were already counted as they came (and small ones, counted only while written).
    fn count(&self, n: usize) {
        self.held.set(self.held.get() + n);
    }

    fn sub(&self, n: usize) {
        self.held.set(self.held.get().saturating_sub(n));
    }

    /// The oldest answer is done, or the connection went over its share: polls every request
    /// in flight either way (see [`Ordered::poll_front`]), so answers that come behind a slow
    /// one are counted as they come.
    fn front_or_over<'a, F: std::future::Future>(
        &'a self,
        inflight: &'a mut Ordered<F>,
    ) -> Front<'a, F> {
        inflight.front_or(&self.over, true)
    }

    /// Ready once the connection goes over its share, polling the requests in flight (while a
    /// batch is being written).
    fn over<'a, F: std::future::Future>(&'a self, inflight: &'a mut Ordered<F>) -> Front<'a, F> {
        inflight.front_or(&self.over, false)
    }
}

/// An answer's body held in its in-flight slot: charged to the shard's memory budget (whatever
/// it has left: the task already ran, so it is not refused) and to its connection's
/// [`AnswerShare`] until it leaves the slot to be written.
struct HeldAnswer {
    _charge: OutboxCharge,
    share: Rc<AnswerShare>,
    n: usize,
}

impl HeldAnswer {
    fn new(shard: &Shard, share: Rc<AnswerShare>, n: usize) -> HeldAnswer {
        let mut charge = OutboxCharge::new(shard.budget.clone());
        charge.force_add(n);
        share.add(n);
        HeldAnswer {
            _charge: charge,
            share,
            n,
        }
    }
}

impl Drop for HeldAnswer {
    fn drop(&mut self) {
        self.share.sub(self.n);
    }
}

/// A request's answer in its in-flight slot: made at once (a refusal), or by the routing step.
/// One concrete future type for both, so that the in-flight queue holds them without boxing
/// each (one allocation fewer per request).
type Answering<R> = Either<std::future::Ready<Done>, R>;

/// An answer the connection made itself (a parse error, a timeout, a refusal of the body);
/// `head`: the request was a HEAD (its answer carries no body).
fn ready<R>(a: Answer, head: bool, close: bool, n_in: usize, start: Instant) -> Answering<R> {
    refused(a, head, close, false, n_in, start, None)
}

/// [`ready`] with the CORS fields of a refusal a page may read ([`refusal_cors`]).
fn refused<R>(
    a: Answer,
    head: bool,
    close: bool,
    http10: bool,
    n_in: usize,
    start: Instant,
    cors: Option<CorsAnswer>,
) -> Answering<R> {
    Either::Left(std::future::ready(Done {
        a,
        close,
        http10,
        head,
        n_in,
        start,
        cors,
        _held: None,
    }))
}

/// The CORS fields of a refusal made from a complete request head (`head`; what follows it is
/// ignored): a body over the limit, a malformed or refused credential, an upload over the
/// budget. A page reads why its upload was refused as it reads a routed answer
/// ([`routing::cors::readable`]). Parses the head again: refusals only.
fn refusal_cors(shard: &Shard, head: &[u8], a: &Answer) -> Option<CorsAnswer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    if !matches!(r.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let field = |name| crate::ws::handshake::header(r.headers, name);
    let origin = cross_origin(field("origin"), field("host"))?;
    refused_cors(shard, origin_form(r.path?), origin, a)
}

/// The CORS fields of a refusal of a request for `path` from the cross-origin `origin`.
fn refused_cors(shard: &Shard, path: &str, origin: &[u8], a: &Answer) -> Option<CorsAnswer> {
    let target = parse_api_path(path).ok()?;
    routing::cors::readable(shard, &target, origin, a, false).then(|| CorsAnswer {
        origin: Bytes::copy_from_slice(origin),
        credentials: routing::cors::credentials(shard, &target, origin, a),
    })
}

/// The answer to one routed request. `charge` is the body's charge on the memory budget, given
/// back once the answer is made (the body's last use); the answer's body is charged from then
/// until it leaves its in-flight slot to be written.
///
/// A function returning an `async move` block rather than an `async fn`, and the request
/// built before the await rather than in a `match` around it: an `async fn` keeps its
/// arguments twice in its state (as captures and as the locals they are moved into), and a
/// `match` scrutinee lives across an await inside it. The state is copied whole into the
/// request's in-flight slot once per request; it went from 1,656 bytes (with the refusals in
/// the same `async fn`) to 936 (`answer_state_stays_small` holds it under 1 KiB).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in its state (see above)"
)]
fn routed(
    shard: Rc<Shard>,
    req: Req,
    cache: Rc<RefCell<VerifyCache>>,
    charge: BodyCharge,
    share: Rc<AnswerShare>,
    close: bool,
    start: Instant,
) -> impl std::future::Future<Output = Done> {
    async move {
        let n_in = req.body().len();
        let head = req.method == Method::Head;
        let http10 = req.http10;
        let r = match request(&req, req.bytes.slice(req.head_len..), start) {
            Ok(r) => r,
            Err(a) => {
                return Done {
                    a,
                    close,
                    http10,
                    head,
                    n_in,
                    start,
                    cors: None,
                    _held: None,
                }
            }
        };
        let a = routing::route(&shard, &cache, &r).await;
        drop(charge);
        // The answer is in memory until it is written: charged as a queued answer, which a
        // full budget turns into 503s for new uploads, and to the connection's share. Not a
        // small one (copied behind its head when written): at most
        // `limits.max_inflight_per_connection` x 1 KiB per connection wait uncharged, and
        // charging every answer showed in the router's CPU per request at 64 x 1 with 64 B
        // bodies.
        let held =
            (a.held_len() > COPY_BODY_BYTES).then(|| HeldAnswer::new(&shard, share, a.held_len()));
        // Every answer a page may read carries the CORS fields, its errors too (for another
        // cluster's app, its router applied the policy and relayed the answer); not the
        // refusal of the origin, nor a 404 to an origin no app of ours allows. Looked at only
        // for a cross-origin request: a relayed answer's error tag is found by scanning its
        // metadata.
        let readable = |o: &[u8]| routing::cors::readable(&shard, &r.target, o, &a, true);
        let cors = r.origin.filter(|o| readable(o)).map(|o| CorsAnswer {
            origin: req.bytes.slice_ref(o),
            credentials: routing::cors::credentials(&shard, &r.target, o, &a),
        });
        Done {
            a,
            close,
            http10,
            head,
            n_in,
            start,
            cors,
            _held: held,
        }
    }
}

/// Bytes of a websocket upgrade request head and what followed it.
type Upgrade = (Bytes, BytesMut);

async fn serve_inner<S: Stream>(
    shard: &Rc<Shard>,
    stream: &mut S,
    accepted: Instant,
) -> std::io::Result<Option<Upgrade>> {
    let limits = shard.cfg.limits.clone();
    let _ = stream.socket().set_nodelay();
    // A client that stops reading its answers is dropped instead of holding them forever.
    let _ = stream
        .socket()
        .set_write_timeout(Some(Duration::from_millis(limits.idle_timeout_ms)));
    // No buffer until the first bytes come (`ReadSpace::read_unbuffered`), then 16 KiB: room
    // to read ahead while requests are in flight (a smaller one had to grow, one allocation,
    // on the first request of every connection). Only what reads touch is resident
    // (`ReadSpace` offers 4 KiB at first). Given back after `tuning.idle_buffer_release_ms`
    // idle, with `out`, `parts` and the in-flight slots.
    let mut buf = BytesMut::new();
    let mut space = ReadSpace::unbuffered();
    let mut out = BytesMut::new();
    // Bytes of answer heads (and the small bodies copied behind them) in the largest batch
    // written so far, and in this one.
    let (mut head_room, mut head_bytes) = (4096usize, 0usize);
    // Bytes of answers' metadata kept in memory by the batch being written (see below).
    let mut kept = 0usize;
    let mut parts: Vec<Bytes> = Vec::new();
    let mut inflight = Ordered::new();
    let mut scan = HeadScan::default();
    // Every deadline of this connection (head, body, idle, answer write) on one timer.
    let mut deadline = Deadline::new();
    let cache = Rc::new(RefCell::new(VerifyCache::new(1)));
    let mut closing = false;
    let mut continued = false;
    // A `100 Continue` owed to the request whose body is awaited, written behind the answers
    // of the requests before it (an interim answer ahead of them would be taken for theirs).
    let mut continue_owed = false;
    // Draining (or evicted) while a request's body was arriving: that request is the last.
    let mut finish_current = false;
    // Bytes of request bodies this connection holds (its share of the body budget), and the
    // charge of the body being received.
    let held = Rc::new(std::cell::Cell::new(0usize));
    let mut receiving: Option<BodyCharge> = None;
    let mut outbox = OutboxCharge::new(shard.budget.clone());
    let share = AnswerShare::new(limits.max_connection_outbox_bytes);
    let keepalive = shard.keepalive(accepted);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let release_after = Duration::from_millis(shard.cfg.tuning.idle_buffer_release_ms);
    // What is left of the idle timeout after the buffers were given back.
    let mut idle_rest: Option<Duration> = None;
    let head_limit = Duration::from_millis(limits.handshake_timeout_ms);
    let mut head_since: Option<Instant> = None;
    // A body announced by a complete head must arrive at `limits.min_body_bytes_per_sec` at
    // least (after the head's own allowance), counted from when its head was parsed, or its
    // owed `100 Continue` written (`body_since`), over the bytes received so far: a client that
    // trickles an upload is cut.
    let mut body_deadline: Option<Instant> = None;
    // When the last read completed: the time every request parsed from it was received. One
    // clock read per read, not per request (the clock was 4% of a shard's CPU at 8x8).
    let mut read_at = Instant::now();
    let mut body_since = read_at;
    loop {
        // A client that always has a full read's worth queued and reads its answers at once
        // never makes this loop wait on its socket (glommio's reads and writes return at once
        // when they can): past the executor's time slice, let the shard's other tasks run. Two
        // loads when there is no need.
        glommio::executor().yield_if_needed().await;
        // Parse and start every complete request that is buffered.
        while !closing && inflight.len() < limits.max_inflight_per_connection {
            match scan.parse(&mut buf, limits.max_header_bytes, limits.max_body_bytes) {
                Parsed::Incomplete {
                    continue_,
                    head_len,
                    body_len,
                } => {
                    let Some(n) = head_len else { break };
                    // Charged as it arrives: what came and a window ahead, up to the length
                    // announced (which must fit from the head on).
                    let got = buf.len() - n;
                    let first = !std::mem::replace(&mut continued, true);
                    let checked = if first {
                        // From now, not from the read that brought the head: a head parsed
                        // late (behind `max_inflight_per_connection`) had no time to send.
                        body_since = Instant::now();
                        let ahead = charge_ahead(got, body_len);
                        check_head(shard, &mut cache.borrow_mut(), &buf[..n], body_len)
                            .and_then(|()| shard.charge_arriving(&held, ahead, body_len))
                            .map(|c| receiving = Some(c))
                    } else {
                        let ahead = charge_ahead(got, body_len);
                        receiving
                            .as_mut()
                            .map_or(Ok(()), |c| c.grow_to(ahead, body_len))
                    };
                    if let Err(a) = checked {
                        closing = true;
                        receiving = None;
                        tracing::debug!(
                            shard = shard.index,
                            status = a.status(),
                            first,
                            "request refused before its whole body came"
                        );
                        let head = is_head(&buf);
                        let cors = refusal_cors(shard, &buf[..n], &a);
                        let now = Instant::now();
                        inflight.push_back(refused(a, head, true, false, 0, now, cors));
                        break;
                    }
                    // A connection evicted for room is refused next (503
                    // too_many_connections): no upload invited.
                    if first && !keepalive.slot.is_evicted_for_room() {
                        if continue_ && inflight.is_empty() {
                            stream.write_parts(&[Bytes::from_static(CONTINUE)]).await?;
                        } else {
                            continue_owed = continue_;
                        }
                    }
                    // The next body bytes are due by the head's allowance + what came so far
                    // at the slowest pace: a body announced large and trickled is cut at once,
                    // not after the length it announced would take.
                    let secs = got as f64 / limits.min_body_bytes_per_sec as f64;
                    body_deadline = Some(body_since + head_limit + Duration::from_secs_f64(secs));
                    break;
                }
                Parsed::Error(status, code, msg) => {
                    closing = true;
                    // Counted by status when answered; at debug: a flood of bad heads must not
                    // become a flood of log lines at the default level.
                    tracing::debug!(
                        shard = shard.index,
                        status,
                        code,
                        "request refused from its head: {msg}"
                    );
                    let a = Answer::error(status, code, msg);
                    // A head refused whole (a body over the limit, a malformed credential)
                    // is still readable by the page; a malformed head has no CORS fields.
                    let cors = refusal_cors(shard, &buf, &a);
                    let head = is_head(&buf);
                    inflight.push_back(refused(a, head, true, false, 0, Instant::now(), cors));
                }
                Parsed::Request(req) if is_ws_upgrade(&req) => {
                    // Only a GET with no body is an upgrade, wherever it stands; anything
                    // else is answered here (HEAD with the head alone) and the connection
                    // closes. A body that came with its head is refused as one still to come
                    // is (`check_head`), not dropped.
                    let refusal = if req.method != Method::Get {
                        Some(WS_NEEDS_GET)
                    } else if !req.body().is_empty() {
                        Some("a websocket upgrade carries no body")
                    } else if !inflight.is_empty() {
                        Some("websocket upgrade after pipelined requests")
                    } else {
                        None
                    };
                    if refusal.is_none() && keepalive.slot.is_evicted_for_room() {
                        // An upgrade that raced its connection's eviction: a session would
                        // keep the room the eviction was to give.
                        closing = true;
                        inflight.push_back(ready(evicted_for_room(shard), false, true, 0, read_at));
                        continue;
                    }
                    let Some(why) = refusal else {
                        return Ok(Some((req.bytes.slice(..req.head_len), buf)));
                    };
                    closing = true;
                    let a = not_an_upgrade(req.method.as_str(), why);
                    let head = req.method == Method::Head;
                    inflight.push_back(ready(a, head, true, 0, Instant::now()));
                }
                Parsed::Request(req) => {
                    keepalive.slot.set_served();
                    closing |= std::mem::take(&mut finish_current);
                    continued = false;
                    body_deadline = None;
                    // The next head's clock starts when its bytes are read.
                    head_since = None;
                    let start = read_at;
                    let close = req.close;
                    closing |= close;
                    let n_in = req.body().len();
                    let head = req.method == Method::Head;
                    // A body that arrived with its head is charged now; one received after
                    // its head was charged as it came, and the charge grows to the whole.
                    let charged = match receiving.take() {
                        Some(mut c) => c.grow_to(n_in, n_in).map(|()| c),
                        None => shard.charge_body(&held, n_in),
                    };
                    let answering = match charged {
                        Ok(charge) => Either::Right(routed(
                            shard.clone(),
                            req,
                            cache.clone(),
                            charge,
                            share.clone(),
                            close,
                            start,
                        )),
                        Err(a) => {
                            // The parsed request has its path and origin: no second parse.
                            let path = std::str::from_utf8(&req.head()[req.path.clone()]);
                            let cors = req
                                .cross_origin()
                                .zip(path.ok())
                                .and_then(|(o, p)| refused_cors(shard, p, o, &a));
                            refused(a, head, close, req.http10, n_in, start, cors)
                        }
                    };
                    inflight.push_back(answering);
                }
            }
        }
        if inflight.is_empty() {
            if closing {
                break;
            }
            // Chosen to make room at the connection limit while part of a request came in
            // (the read won the race): that request is refused at once rather than awaited
            // (a slow or hostile client would hold the room it was to give for up to
            // `limits.handshake_timeout_ms`, or the length of its upload). A request that
            // came in whole is answered, with `Connection: close`.
            if keepalive.slot.is_evicted_for_room() && (!buf.is_empty() || continued) {
                closing = true;
                receiving = None;
                let a = evicted_for_room(shard);
                inflight.push_back(ready(a, is_head(&buf), true, 0, Instant::now()));
                continue;
            }
            // A request head must be complete within `limits.handshake_timeout_ms` of its
            // first byte: a client that trickles a head is cut, whatever its pace.
            if buf.is_empty() || continued {
                head_since = None;
            } else {
                // Bytes left after the last request are the start of the next head: they came
                // with the read at `read_at`, and its deadline runs from there.
                head_since.get_or_insert(read_at);
            }
            let wait = match (head_since, body_deadline.filter(|_| continued)) {
                (_, Some(d)) => d.saturating_duration_since(Instant::now()),
                (Some(t), None) => head_limit.saturating_sub(t.elapsed()),
                (None, None) => idle_rest.take().unwrap_or(idle),
            };
            // Waiting for a new request with nothing in flight: this connection may be
            // evicted to make room for a new one at the shard's connection limit. So may one
            // waiting for the rest of a request head (`Shard::evict_for_room`): it is answered
            // 503 at the top of the loop.
            let idle_wait = buf.is_empty() && !continued;
            // (A connection a drain chose while a head raced in is not: it finishes it.)
            let head_wait = !buf.is_empty() && !continued && !keepalive.slot.is_evicted();
            // Idle with its buffers: they go back after `tuning.idle_buffer_release_ms`, then
            // the rest of the idle timeout is waited without them.
            let releasing = idle_wait
                && !space.is_unbuffered()
                && !release_after.is_zero()
                && release_after < wait;
            let wait = match releasing {
                true => release_after,
                false => wait,
            };
            keepalive.set_waiting(idle_wait, head_since.filter(|_| head_wait));
            let read = async {
                let r = std::pin::pin!(fill(stream, &mut buf, &mut space));
                // Only an idle connection or one waiting for a head is evicted: one that has
                // part of a request's body (or whose read raced the eviction) finishes it, and
                // its answer says close.
                let e = std::pin::pin!(async {
                    match idle_wait || head_wait {
                        true => keepalive.slot.evicted().await,
                        false => std::future::pending().await,
                    }
                });
                match futures_util::future::select(r, e).await {
                    futures_util::future::Either::Left((r, _)) => Some(r),
                    futures_util::future::Either::Right(_) => None,
                }
            };
            let got = deadline.within(wait, read).await;
            if !(releasing && got.is_err()) {
                keepalive.slot.set_idle(false);
            }
            keepalive.slot.set_head(None);
            let got = match got {
                Ok(Some(r)) => Ok(r),
                // Evicted while a head was arriving: answered 503 at the top of the loop.
                Ok(None) if head_wait => continue,
                // Evicted: close quietly, as an idle keep-alive connection may be closed.
                Ok(None) => {
                    close_idle(stream).await;
                    break;
                }
                Err(e) => Err(e),
            };
            match got {
                Err(_) if head_since.is_some() || continued => {
                    let what = missed_deadline(continued);
                    if let Some(suppressed) = shard.log_gates.request_timeout.pass() {
                        tracing::info!(shard = shard.index, suppressed, "{what}: 408");
                    }
                    closing = true;
                    let a = Answer::error(408, "request_timeout", what);
                    inflight.push_back(ready(a, is_head(&buf), true, 0, Instant::now()));
                }
                // The client's end of input: a head whose last bytes were not parsed yet
                // (`HeadScan`) is parsed first (a malformed one is answered).
                Ok(Ok(0)) if scan.flush() => continue,
                Ok(Ok(0)) => break,
                Err(_) if releasing => {
                    space.give_back(&mut buf);
                    (out, parts) = (BytesMut::new(), Vec::new());
                    inflight.give_back();
                    ShardMetrics::inc(&shard.metrics.idle_buffers_released);
                    idle_rest = Some(idle - release_after);
                    continue;
                }
                // Idle for `limits.idle_timeout_ms`: closed.
                Err(_) => {
                    close_idle(stream).await;
                    break;
                }
                Ok(Ok(_)) => {
                    read_at = Instant::now();
                    if !continued {
                        head_since.get_or_insert(read_at);
                    }
                    continue;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        // Wait for the oldest answer, reading more requests meanwhile.
        if closing || inflight.len() >= limits.max_inflight_per_connection {
            share.front_or_over(&mut inflight).await;
        } else {
            // The head and body deadlines hold while answers are pending too: a client cannot
            // trickle its next request behind a slow one.
            let due = if continued {
                // A client told to wait for a `100 Continue` owed behind these answers is
                // not late: its body's clock starts when the interim answer is written.
                body_deadline.filter(|_| !continue_owed)
            } else {
                head_since.map(|t| t + head_limit)
            };
            // Reading on would need a new buffer while the requests in flight hold slices of
            // this one: with small requests the read waits for their answers, and the buffer
            // is then reclaimed in place (no allocation). Nothing is read meanwhile, so no
            // deadline runs either. Requests in flight with large bodies (at least
            // READ_AHEAD_BODY_BYTES held) read on into a new buffer: the next heads are
            // checked, charged to the connection's share (503 over it) and pipelined as before.
            let room = has_room(&buf) || held.get() >= READ_AHEAD_BODY_BYTES;
            // Whether the late request (if one is) is a HEAD: its first bytes are read.
            let late_head = due.is_some() && is_head(&buf);
            let next = std::pin::pin!(share.front_or_over(&mut inflight));
            let read = std::pin::pin!(async {
                match room {
                    true => fill(stream, &mut buf, &mut space).await,
                    false => std::future::pending().await,
                }
            });
            let late = std::pin::pin!(async {
                match due.filter(|_| room) {
                    Some(d) => {
                        deadline
                            .sleep(d.saturating_duration_since(Instant::now()))
                            .await
                    }
                    None => std::future::pending().await,
                }
            });
            use futures_util::future::select;
            match select(next, select(read, late)).await {
                Either::Left(_) => {}
                Either::Right((Either::Left((r, _)), _)) => {
                    if r? == 0 {
                        // As above: a head not parsed yet is, then the next end closes.
                        closing = !scan.flush();
                    } else {
                        read_at = Instant::now();
                        if !continued {
                            head_since.get_or_insert(read_at);
                        }
                    }
                    continue;
                }
                Either::Right((Either::Right(_), _)) => {
                    let what = missed_deadline(continued);
                    if let Some(suppressed) = shard.log_gates.request_timeout.pass() {
                        let what = format_args!("{what} (answers pending): 408");
                        tracing::info!(shard = shard.index, suppressed, "{what}");
                    }
                    // The slow body's bytes go back to the budget now; the answers before it
                    // are still written, then the 408, then the connection closes.
                    receiving = None;
                    closing = true;
                    let a = Answer::error(408, "request_timeout", what);
                    inflight.push_back(ready(a, late_head, true, 0, Instant::now()));
                    continue;
                }
            }
        }
        if share.over.get() {
            return Ok(slow_reader(shard, share.held.get(), OVER_SHARE));
        }
        // Answer it and every later one that is already done, in one write. While the router
        // drains, the connection reads no further request (a client that keeps requests in
        // flight would otherwise never leave one answer the last), and the answer that leaves
        // nothing in flight closes it. Requests the client sent behind that answer were never
        // read: after `Connection: close` it sends them again on a new connection (RFC 9112
        // 9.3.1), to another router. The same for a connection chosen for idle eviction
        // while its next request came in (the read won the race): that request is answered,
        // with `Connection: close`, rather than the connection dropped after a keep-alive
        // answer. A request whose head was taken and whose body is still arriving (perhaps
        // after a `100 Continue`) is received and answered first: it is the last one read.
        if shard.health.draining() || keepalive.slot.is_evicted() {
            if continued {
                finish_current = true;
            } else {
                closing = true;
            }
        }
        // The heads of one batch are cut from `out`, which is reclaimed in place (the last
        // batch is written) with room for the largest batch so far: no allocation per answer.
        if !out.try_reclaim(head_room) {
            out.reserve(head_room);
        }
        // One clock read for the latencies of the whole batch.
        let answered = Instant::now();
        // Each answer is written from its in-flight slot and dropped there (not moved out).
        loop {
            let last = inflight.len() == 1;
            let Some(&mut Done {
                ref a,
                close,
                http10,
                head,
                n_in,
                start,
                ref cors,
                ..
            }) = inflight.front_mut()
            else {
                break;
            };
            // 204 and 304 carry no body and no length (RFC 9110 6.4.1); a HEAD answer has the
            // length of the body it does not carry.
            let bodiless = matches!(a.status(), 204 | 304);
            let full = a.body();
            let length = (!bodiless).then_some(full.len());
            let body = if bodiless || head {
                Cow::Owned(Bytes::new())
            } else {
                full
            };
            let close = close || closing && last;
            let before = out.len();
            write_head(&mut out, shard, a, length, close, http10, cors.as_ref());
            shard.metrics.request(
                a.status(),
                answered.saturating_duration_since(start).as_micros() as u64,
                n_in,
                body.len(),
            );
            let small = body.len() <= COPY_BODY_BYTES;
            if small {
                // Copied behind its head: the batch's small answers leave as one slice.
                out.put_slice(&body);
            }
            head_bytes += out.len() - before;
            if !small {
                // The body is a slice of the answer's frame: its metadata stays in memory
                // until the body is written, and is charged with it.
                kept += a.held_len().saturating_sub(body.len());
                parts.push(out.split().freeze());
                parts.push(body.into_owned());
            }
            inflight.pop_front();
            if close {
                closing = true;
                inflight.clear();
                break;
            }
            // The pass that found the first answer done polled every request in flight: the
            // batch takes the ones it found done, with no poll per answer. One that finishes
            // meanwhile goes in the next batch (the next pass polls every request again).
        }
        if continue_owed && inflight.is_empty() {
            continue_owed = false;
            if !closing {
                out.put_slice(CONTINUE);
                // The client was waiting for it (behind the answers before it): the body's
                // clock starts now.
                body_since = answered;
            }
        }
        if !out.is_empty() {
            parts.push(out.split().freeze());
        }
        // The answers being written count against the shard's memory budget and the
        // connection's share until they are out, and the client must take them at
        // `limits.min_answer_bytes_per_sec` at least. Meanwhile the requests in flight are
        // polled, so that answers piling up behind a write the client does not take count
        // against the share as they come (the write comes first: a write that is done at once
        // polls nothing else).
        let n: usize = parts.iter().map(Bytes::len).sum();
        let charged = n + std::mem::take(&mut kept);
        head_room = head_room.max(head_bytes);
        head_bytes = 0;
        outbox.force_add(charged);
        share.count(charged);
        // A write the socket does not take at once may wait behind what the socket still
        // holds to send (a large batch before it): the pace counts the larger of the two (what
        // it holds includes what it took of this batch).
        let fd = stream.socket().fd();
        let pace = || {
            let n = n.max(crate::util::unsent_bytes(fd));
            head_limit + Duration::from_secs_f64(n as f64 / limits.min_answer_bytes_per_sec as f64)
        };
        // Ok(Some(_)): written (or failed); Ok(None): over the share; Err: too slow.
        let written = {
            let write = std::pin::pin!(stream.write_parts(&parts));
            let over = share.over(&mut inflight);
            let both = futures_util::future::select(write, over);
            deadline.within_lazy(pace, both).await.map(|e| match e {
                Either::Left((r, _)) => Some(r),
                Either::Right(_) => None,
            })
        };
        // What the connection held with the batch (not `held`, its request bodies).
        let answers_held = share.held.get();
        outbox.release(charged);
        share.sub(charged);
        parts.clear();
        match written {
            Ok(Some(r)) => {
                match r {
                    // The socket's write timeout (`limits.idle_timeout_ms`) ran out before
                    // the pace did (a batch behind megabytes the socket holds): as slow.
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Ok(slow_reader(shard, n, TOO_SLOW));
                    }
                    r => r?,
                }
                // Answers that came during the write went over the share: no further request
                // is read for a connection that is closed anyway.
                if share.over.get() {
                    return Ok(slow_reader(shard, answers_held, OVER_SHARE));
                }
            }
            Ok(None) => return Ok(slow_reader(shard, answers_held, OVER_SHARE)),
            Err(_) => return Ok(slow_reader(shard, n, TOO_SLOW)),
        }
        if closing && inflight.is_empty() {
            break;
        }
    }
    if closing {
        // Closed for room: a new connection that was sending its first head closes at once,
        // not after its client's own close (up to a second), so that a flood of connections
        // that never close gets its closes at the pace it opens them, not at 16 a second
        // (`shard::MAX_PENDING_EVICTIONS`). Its input was read up to the eviction; a client
        // that sends more after the answer may see a reset. A client that was served here
        // (whose next request raced the eviction) gets a short lingering close, which no
        // longer holds up the accept loop: its room was made when its answer was written
        // (`KeepAlive::room_made`), and with `shard::MAX_ROOM_LINGERING` lingering already it
        // closes at once.
        match keepalive.slot.is_evicted_for_room() {
            true if !keepalive.slot.was_served() => close_idle(stream).await,
            true => match keepalive.room_made() {
                Some(_lingering) => lingering_close(stream, ROOM_LINGER).await,
                None => close_idle(stream).await,
            },
            false => lingering_close(stream, LINGER).await,
        }
    }
    Ok(None)
}

/// Why a connection is closed as a slow reader: it took a batch of answers slower than the
/// pace the limit asks.
const TOO_SLOW: &str =
    "client does not read its answers (slower than limits.min_answer_bytes_per_sec): closed";
/// Why a connection is closed as a slow reader: its answers waiting to be written went over its
/// share ([`AnswerShare`]).
const OVER_SHARE: &str = "client does not read its answers (answers waiting to be written over limits.max_connection_outbox_bytes): closed";

/// Counts and logs a connection closed for not taking its answers; the connection ends without
/// them (the return value of `serve_inner`), and their bytes go back to the budget.
fn slow_reader(shard: &Shard, bytes: usize, why: &str) -> Option<Upgrade> {
    ShardMetrics::inc(&shard.metrics.slow_reader_closed);
    tracing::info!(shard = shard.index, bytes, "{why}");
    None
}

/// Ends an idle keep-alive connection the router closes (idle timeout, eviction): over TLS
/// with `close_notify` first (RFC 8446 6.1; strict clients report a close without it as an
/// error), then the FIN. Nothing is in flight, so nothing needs to be read after it; the
/// write is bounded by 1 s in case the client stopped reading.
async fn close_idle<S: Stream>(stream: &mut S) {
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        Ok(stream.shutdown_write().await)
    })
    .await;
}

/// The longest a lingering close waits for the client's own close.
pub(crate) const LINGER: Duration = Duration::from_secs(1);
/// The same for a served connection closed for room, whose room is made already: at most
/// `shard::MAX_ROOM_LINGERING` linger at once, so this bounds how long each holds its socket.
const ROOM_LINGER: Duration = Duration::from_millis(100);

/// Lingering close, at most `limit`: the client may still be sending (a body we refused with
/// 413, a pipelined request after `Connection: close`); closing with unread input would make
/// the kernel send RST and could destroy our answer before the client reads it.
pub(crate) async fn lingering_close<S: Stream>(stream: &mut S, limit: Duration) {
    // On the heap: an array here would be part of every connection's future (whose size is
    // that of its largest await), 16 KiB more resident per idle keep-alive connection.
    let mut sink = vec![0u8; 16 * 1024];
    let fd = stream.socket().fd();
    let _ = glommio::timer::timeout(limit, async {
        // Inside the limit: over TLS the shutdown writes `close_notify`, which waits for
        // room in the socket when the client stopped reading (up to the socket's write
        // timeout, `limits.idle_timeout_ms`, outside it).
        let _ = stream.shutdown_write().await;
        let mut left = 1usize << 20;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => left = left.saturating_sub(n),
            }
        }
        // The client still sends (a flood of pipelined uploads): stop reading, but keep
        // the socket until the answers have left it. A close with unread input resets
        // the connection, and the kernel drops what it has not sent yet (the answers).
        while crate::util::unsent_bytes(fd) > 0 {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    })
    .await;
}

/// The 408 reason of a missed deadline: the body's minimum rate once its head is in
/// (`continued`), else the head's own deadline.
fn missed_deadline(continued: bool) -> &'static str {
    if continued {
        "request body slower than limits.min_body_bytes_per_sec"
    } else {
        "request head not complete within limits.handshake_timeout_ms"
    }
}

/// The request at the front of `buf` (complete or not) is a HEAD: its answer, a refusal
/// included, carries no body (RFC 9110 9.3.2). Empty lines before a request are skipped, as
/// the parser skips them.
fn is_head(buf: &[u8]) -> bool {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n');
    start.is_some_and(|i| buf[i..].starts_with(b"HEAD "))
}

/// A request for `/api/ws`, whatever its method: the endpoint only takes upgrades, so the
/// upgrade's checks answer every one (another method than GET gets 405 with `Allow: GET`).
fn is_ws_upgrade(req: &Req) -> bool {
    is_ws_path(&req.head()[req.path.clone()])
}

fn is_ws_path(path: &[u8]) -> bool {
    path == b"/api/ws" || path.starts_with(b"/api/ws?")
}

/// The answer to a request for `/api/ws` that cannot be an upgrade where it stands.
fn not_an_upgrade(method: &str, why: &'static str) -> Answer {
    if method == "GET" {
        Answer::error(400, "bad_upgrade", why)
    } else {
        Answer::error(405, "method_not_allowed", WS_NEEDS_GET)
    }
}

/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The message of a 405 for `/api/ws`, which takes GET only.
const WS_NEEDS_GET: &str = "websocket upgrade needs GET";

/// The `Allow` line of a router's own 405 (a 405 must carry one, RFC 9110 15.5.6): GET for
/// `/api/ws`, else every method [`Method`] knows.
fn allow_line(message: &str) -> &'static [u8] {
    if message == WS_NEEDS_GET {
        b"allow: GET\r\n"
    } else {
        b"allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
    }
}

/// Body bytes held by a connection's requests in flight from which it reads on into a new
/// buffer instead of waiting for their answers (one allocation against a large body's).
const READ_AHEAD_BODY_BYTES: usize = 64 * 1024;

/// An answer body up to this size is copied into the batch's head buffer, behind its head,
/// instead of being written as a slice of its own: a batch of small answers leaves as one
/// slice, with no reference count taken per answer (docs/ARCHITECTURE.md, "Small answers
/// copied": what it saved per request at 8x8).
const COPY_BODY_BYTES: usize = 1024;

/// The answer to a request that raced its connection's eviction at
/// `limits.max_connections_per_shard` (it came in as the connection was chosen to make room):
/// refused at once, so that the eviction frees its room now; logged.
fn evicted_for_room(shard: &Shard) -> Answer {
    // A flood of partial heads is answered this way, one per new connection.
    if let Some(suppressed) = shard.log_gates.evicted_answered.pass() {
        tracing::info!(
            shard = shard.index,
            suppressed,
            "closed to make room at limits.max_connections_per_shard while a request was arriving: 503"
        );
    }
    Answer::error(
        503,
        "too_many_connections",
        "the router is at limits.max_connections_per_shard; retry on a new connection",
    )
}

/// Spare capacity below which the read buffer is grown (or reclaimed) before a read.
const MIN_READ_ROOM: usize = 4096;

/// `buf` can be read into without growing it.
fn has_room(buf: &BytesMut) -> bool {
    buf.capacity() - buf.len() >= MIN_READ_ROOM
}

/// Reads more bytes into `buf`; 0 at end of stream.
async fn fill<S: Stream>(
    stream: &mut S,
    buf: &mut BytesMut,
    space: &mut ReadSpace,
) -> std::io::Result<usize> {
    if space.is_unbuffered() {
        return space.read_unbuffered(stream, buf, 16 * 1024).await;
    }
    // Reclaimed in place when no request holds a slice of it: with room for a whole read
    // chunk, or failing that (a partial request at the end) for the minimum. Grown otherwise.
    if !has_room(buf) && !buf.try_reclaim(16 * 1024) && !buf.try_reclaim(MIN_READ_ROOM) {
        buf.reserve(16 * 1024);
    }
    space.read(stream, buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Parsed {
        let mut b = BytesMut::from(s);
        parse_one(&mut b, 1024, 100)
    }

    /// What a read loop makes of `input` arriving in `chunks`-byte reads, parsing after each
    /// read until a parse is incomplete: each request (head and body) and the status of an
    /// error, and how many parses [`HeadScan`] made.
    fn read_loop(input: &[u8], chunk: usize, gated: bool) -> (Vec<String>, usize) {
        let (mut buf, mut scan, mut seen) = (BytesMut::new(), HeadScan::default(), Vec::new());
        let mut parses = 0;
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                let p = if gated {
                    scan.parse(&mut buf, 1024, 100)
                } else {
                    parses += 1;
                    parse_one(&mut buf, 1024, 100)
                };
                match p {
                    Parsed::Incomplete { .. } => break,
                    Parsed::Request(r) => {
                        seen.push(format!("{:?}", String::from_utf8_lossy(&r.bytes)));
                    }
                    Parsed::Error(status, ..) => {
                        seen.push(format!("error {status}"));
                        return (seen, scan.parses.max(parses));
                    }
                }
            }
        }
        (seen, scan.parses.max(parses))
    }

    #[test]
    fn a_trickled_request_is_parsed_again_only_when_a_line_ends() {
        let long = "x".repeat(600);
        let cases = [
            "GET /a HTTP/1.1\r\nHost: h\r\n\r\n".to_string(),
            format!("GET /a HTTP/1.1\r\nHost: h\r\nX-Long: {long}\r\n\r\n"),
            // Pipelined, bodies among them, one owed a 100 Continue.
            "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: h\r\n\r\n".into(),
            "POST /c HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc".into(),
            // Bare LF line ends.
            "GET /d HTTP/1.1\nHost: h\n\n".into(),
            // Malformed in the middle of a line, then more lines.
            "GET /e HTTP/1.1\r\nHost: h\r\nBad Name: v\r\nX: y\r\n\r\n".into(),
            // A body over the limit; a head over the limit without a line end.
            "POST /f HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n".into(),
            format!("GET /g HTTP/1.1\r\nX: {}", "y".repeat(2000)),
            // A request, then a malformed one.
            "GET /h HTTP/1.1\r\nHost: h\r\n\r\nGE\x01T / HTTP/1.1\r\n\r\n".into(),
        ];
        for case in &cases {
            let whole = read_loop(case.as_bytes(), case.len(), false).0;
            for chunk in [1, 2, 7, 64] {
                let (plain, _) = read_loop(case.as_bytes(), chunk, false);
                let (gated, _) = read_loop(case.as_bytes(), chunk, true);
                assert_eq!(plain, whole, "{case:?} in {chunk}-byte reads");
                assert_eq!(gated, whole, "{case:?} in {chunk}-byte reads, gated");
            }
        }
        // A byte per read: a parse per line ended, one for each request's first byte, one for
        // the body's last byte and one of the empty buffer after each request; not one per
        // byte.
        let (seen, parses) = read_loop(cases[1].as_bytes(), 1, true);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(parses <= 6, "{parses} parses of a 4-line head");
        let (_, parses) = read_loop(cases[2].as_bytes(), 1, true);
        assert!(
            parses <= 13,
            "{parses} parses of two requests, 7 lines and a 5-byte body"
        );
        let (_, plain) = read_loop(cases[1].as_bytes(), 1, false);
        assert!(plain > 600, "{plain}");

        // A byte per read: a control byte is refused when it comes; a printable one that
        // makes the head malformed at its line's end, or at the end of input (`flush`).
        let (mut buf, mut scan) = (BytesMut::new(), HeadScan::default());
        for (i, &b) in b"GET / HTTP/1.1\r\nHost: h\r\nBad Name\x01"
            .iter()
            .enumerate()
        {
            buf.extend_from_slice(&[b]);
            let p = scan.parse(&mut buf, 1024, 100);
            match b {
                0x01 => assert!(matches!(p, Parsed::Error(400, ..)), "at byte {i}"),
                _ => assert!(matches!(p, Parsed::Incomplete { .. }), "at byte {i}"),
            }
        }
        let (mut buf, mut scan) = (BytesMut::new(), HeadScan::default());
        for &b in b"GET / HTTP/1.1\r\nHost: h\r\nBad Name" {
            buf.extend_from_slice(&[b]);
            assert!(matches!(
                scan.parse(&mut buf, 1024, 100),
                Parsed::Incomplete { .. }
            ));
        }
        assert!(scan.flush(), "a parse was skipped");
        assert!(matches!(
            scan.parse(&mut buf, 1024, 100),
            Parsed::Error(400, ..)
        ));
        assert!(!scan.flush(), "nothing skipped since");
    }

    /// The state of a routed request's future is copied whole into its in-flight slot, once
    /// per request (see [`routed`]): it must not grow back toward the 1,656 bytes it had.
    #[test]
    fn answer_state_stays_small() {
        fn output_size<A, B, C, D, E, G, H, R>(_: fn(A, B, C, D, E, G, H) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        let n = output_size(routed);
        println!("routed() state: {n} bytes");
        // The answer the batch loop writes from its in-flight slot.
        println!("Done: {} bytes", std::mem::size_of::<Done>());
        assert!(n <= 1024, "routed() state is {n} bytes");
    }

    #[test]
    fn an_absolute_form_target_is_read_as_its_path() {
        for (target, path) in [
            ("http://h:80/api/a?x=1", "/api/a?x=1"),
            ("HTTPS://h/api/b", "/api/b"),
            ("http://h", ""),
            ("http://h?x=/api/a", "?x=/api/a"),
            ("/api/c", "/api/c"),
            ("*", "*"),
            ("httpx://h/api/d", "httpx://h/api/d"),
        ] {
            assert_eq!(origin_form(target), path, "{target}");
            let req = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let Parsed::Request(r) = parse(req.as_bytes()) else {
                panic!("{target}")
            };
            assert_eq!(&r.head()[r.path.clone()], path.as_bytes(), "{target}");
        }
    }

    #[test]
    fn parses_pipelined_requests_without_copy() {
        let mut b = BytesMut::from(
            &b"POST /api/a HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok\r\nContent-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\nHost: h\r\n\r\n"[..],
        );
        let Parsed::Request(r) = parse_one(&mut b, 1024, 100) else {
            panic!("first")
        };
        assert_eq!(r.body(), b"abc");
        assert_eq!(&r.head()[r.path.clone()], b"/api/a");
        assert_eq!(&r.head()[r.token.clone().unwrap()], b"tok");
        let Parsed::Request(r2) = parse_one(&mut b, 1024, 100) else {
            panic!("second")
        };
        assert_eq!(r2.method, Method::Get);
        assert!(r2.body().is_empty());
        assert!(b.is_empty());
    }

    #[test]
    fn connection_is_a_list_of_options() {
        for (fields, close) in [
            ("HTTP/1.1\r\nHost: h", false),
            ("HTTP/1.1\r\nHost: h\r\nConnection: close", true),
            ("HTTP/1.1\r\nHost: h\r\nConnection: TE, close", true),
            ("HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive ,CLOSE", true),
            (
                "HTTP/1.1\r\nHost: h\r\nConnection: TE\r\nConnection: close,",
                true,
            ),
            ("HTTP/1.1\r\nHost: h\r\nConnection: closed", false),
            ("HTTP/1.0", true),
            ("HTTP/1.0\r\nConnection: keep-alive", false),
            ("HTTP/1.0\r\nConnection: keep-alive, close", true),
        ] {
            let req = format!("GET / {fields}\r\n\r\n");
            let Parsed::Request(r) = parse(req.as_bytes()) else {
                panic!("{fields}")
            };
            assert_eq!(r.close, close, "{fields}");
        }
    }

    #[test]
    fn a_head_request_is_known_before_it_parses() {
        assert!(is_head(b"HEAD /api/x HTTP/1.1\r\n"));
        assert!(is_head(b"\r\nHEAD /"));
        assert!(!is_head(b"HEADER / HTTP/1.1\r\n"));
        assert!(!is_head(b"GET / HTTP/1.1\r\n"));
        assert!(!is_head(b""));
        assert_eq!(allow_line(WS_NEEDS_GET), b"allow: GET\r\n");
        // Every method the parser knows is allowed, and nothing else.
        let all = std::str::from_utf8(allow_line("")).unwrap();
        let listed: Vec<&str> = all
            .trim_start_matches("allow: ")
            .trim_end()
            .split(", ")
            .collect();
        assert!(
            listed.iter().all(|m| Method::parse(m).is_some()),
            "{listed:?}"
        );
        for m in [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
        ] {
            assert_eq!(Method::parse(m).is_some(), listed.contains(&m), "{m}");
        }
    }

    #[test]
    fn limits_and_errors() {
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n"),
            Parsed::Error(413, ..)
        ));
        assert!(matches!(
            parse(b"TRACE / HTTP/1.1\r\nHost: h\r\n\r\n"),
            Parsed::Error(405, ..)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parsed::Error(411, ..)
        ));
        for both in [
            &b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        ] {
            assert!(
                matches!(parse(both), Parsed::Error(400, ..)),
                "CL + TE is 400"
            );
        }
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n"),
            Parsed::Error(400, ..)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nabcde"),
            Parsed::Error(400, ..)
        ));
        assert!(matches!(
            parse(b"\x01\x02 nonsense\r\n\r\n"),
            Parsed::Error(400, ..)
        ));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(2000)
        );
        assert!(matches!(parse(big.as_bytes()), Parsed::Error(431, ..)));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab"),
            Parsed::Incomplete {
                continue_: true,
                ..
            }
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab"),
            Parsed::Incomplete {
                continue_: false,
                ..
            }
        ));
        for hosts in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert!(matches!(parse(hosts), Parsed::Error(400, ..)), "Host");
        }
        assert!(matches!(
            parse(b"GET / HTTP/1.0\r\n\r\n"),
            Parsed::Request(_)
        ));
        assert!(matches!(
            parse(b"GET / HT"),
            Parsed::Incomplete {
                continue_: false,
                head_len: None,
                body_len: 0
            }
        ));
    }
}
