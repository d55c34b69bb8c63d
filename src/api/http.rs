//! HTTP/1.1 client ingress: keep-alive, pipelining (requests of one connection are routed
//! concurrently and answered in order), `Expect: 100-continue`, limits from the config. The
//! body is a slice of the read buffer and goes to the task without a copy; the task's payload
//! goes back to the client the same way (one vectored write of head + body).

use crate::api::reason;
use crate::auth::{self, verify_client_jwt};
use crate::metrics::{Listener, ShardMetrics};
use crate::proto::{tag, MetaIter};
use crate::route::{parse_api_path, PathError};
use crate::shard::{dispatch, Answer, RouteReq, Shard};
use crate::ws::conn::write_all_vectored;
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_util::stream::{FuturesOrdered, StreamExt};
use glommio::net::TcpStream;
use std::ops::Range;
use std::os::unix::io::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A parsed request whose head and body are slices of one frozen buffer.
pub struct Req {
    pub head: Bytes,
    pub body: Bytes,
    pub method: Method,
    pub path: Range<usize>,
    pub token: Option<Range<usize>>,
    pub content_type: Option<Range<usize>>,
    pub close: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// Result of looking at the read buffer.
pub enum Parsed {
    /// More bytes needed; `continue_` asks for a `100 Continue`.
    Incomplete {
        continue_: bool,
        /// Bytes of the request head once it is complete (the body is still coming).
        head_len: Option<usize>,
    },
    Request(Req),
    /// Unrecoverable: answer and close.
    Error(u16, &'static str, &'static str),
}

fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Parses one request from the front of `buf`, splitting it off when complete.
pub fn parse_one(buf: &mut BytesMut, max_header: usize, max_body: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_header {
                return Parsed::Error(431, "headers_too_large", "request head over the limit");
            }
            return Parsed::Incomplete {
                continue_: false,
                head_len: None,
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
    let method = match r.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        _ => return Parsed::Error(405, "method_not_allowed", "only GET and POST"),
    };
    let mut close = r.version == Some(0);
    let mut cl: Option<usize> = None;
    let (mut token, mut ctype, mut expect) = (None, None, false);
    for h in r.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Digits only: `+5` parses as a usize but other parsers on the path may disagree.
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok());
            match (v, cl) {
                (Some(v), None) => cl = Some(v),
                (Some(v), Some(old)) if v == old => {}
                _ => return Parsed::Error(400, "bad_request", "bad Content-Length"),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Error(
                411,
                "length_required",
                "send a Content-Length; chunked bodies are not accepted",
            );
        } else if name.eq_ignore_ascii_case("authorization") {
            token = crate::ws::handshake::bearer(h.value).map(|t| range_of(buf, t.as_bytes()));
            if token.is_none() {
                return Parsed::Error(401, "bad_token", "Authorization must be `Bearer <token>`");
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            ctype = Some(range_of(buf, h.value));
        } else if name.eq_ignore_ascii_case("connection") {
            let v = h.value;
            if v.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let path = range_of(buf, r.path.unwrap_or("/").as_bytes());
    let body_len = cl.unwrap_or(0);
    if body_len > max_body {
        return Parsed::Error(413, "body_too_large", "request body over the limit");
    }
    if buf.len() < n + body_len {
        buf.reserve(n + body_len - buf.len());
        return Parsed::Incomplete {
            continue_: expect,
            head_len: Some(n),
        };
    }
    let all = buf.split_to(n + body_len).freeze();
    Parsed::Request(Req {
        head: all.slice(..n),
        body: all.slice(n..),
        method,
        path,
        token,
        content_type: ctype,
        close,
    })
}

/// The last token this connection verified, so keep-alive requests skip the signature check.
struct AuthCache {
    token: Vec<u8>,
    key_generation: u64,
    app: String,
    sub: Rc<str>,
    /// `exp`, or the end of the key version's grace period if sooner.
    until: u64,
}

/// True when `region/cluster` is another cluster of the federation.
pub fn is_remote(shard: &Shard, region: &str, cluster: &str) -> bool {
    if region == shard.cfg.region && cluster == shard.cfg.cluster {
        return false;
    }
    !shard.federation.routers.is_empty() && shard.federation.knows(&format!("{region}/{cluster}"))
}

/// The cluster must be ours and the app known: 404 otherwise (checked before the token, so an
/// unknown app is 404 whatever the token).
pub fn check_target(shard: &Shard, region: &str, cluster: &str, app: &str) -> Option<Answer> {
    if region != shard.cfg.region || cluster != shard.cfg.cluster {
        return Some(Answer::error(
            404,
            "unknown_cluster",
            format!("cluster {region}/{cluster} is not served here"),
        ));
    }
    if !shard.cfg.apps.iter().any(|a| a.name == app) {
        return Some(Answer::error(404, "unknown_app", format!("no app {app}")));
    }
    None
}

/// Authenticates and routes one request. Everything up to the dispatch is synchronous.
// The error is the client's answer itself, built on a cold path and moved once.
#[allow(clippy::result_large_err)]
/// `Ok(None)`: the request is for another cluster of the federation and goes there as it is
/// (the app's home cluster verifies its token).
fn prepare(
    shard: &Rc<Shard>,
    cache: &mut Option<AuthCache>,
    req: &Req,
) -> Result<Option<Rc<str>>, Answer> {
    let path = std::str::from_utf8(&req.head[req.path.clone()]).unwrap_or("");
    let token = req.token.clone().map(|r| &req.head[r]);
    prepare_parts(shard, cache, path, token)
}

/// Checks a request head whose body has not arrived yet, before `100 Continue` and before
/// buffering the body: an unauthenticated client cannot make the router hold its upload.
// The error is the client's answer itself, built on a cold path and moved once.
#[allow(clippy::result_large_err)]
fn check_head(shard: &Rc<Shard>, cache: &mut Option<AuthCache>, head: &[u8]) -> Result<(), Answer> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    if r.parse(head).is_err() {
        return Err(Answer::error(400, "bad_request", "malformed request"));
    }
    let token = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .and_then(|h| crate::ws::handshake::bearer(h.value))
        .map(str::as_bytes);
    prepare_parts(shard, cache, r.path.unwrap_or("/"), token).map(|_| ())
}

#[allow(clippy::result_large_err)]
fn prepare_parts(
    shard: &Rc<Shard>,
    cache: &mut Option<AuthCache>,
    path: &str,
    token: Option<&[u8]>,
) -> Result<Option<Rc<str>>, Answer> {
    let p = parse_api_path(path)
        .map_err(|e: PathError| Answer::error(e.http_status(), e.code(), format!("{e}: {path}")))?;
    if is_remote(shard, p.region, p.cluster) {
        return Ok(None);
    }
    if let Some(a) = check_target(shard, p.region, p.cluster, p.app_name) {
        return Err(a);
    }
    let Some(token) = token else {
        let anonymous =
            shard.cfg.apps.iter().any(|a| {
                a.name == p.app_name && a.anonymous_services.iter().any(|s| s == p.service)
            });
        if anonymous {
            return Ok(Some("".into()));
        }
        return Err(Answer::error(
            401,
            "missing_token",
            "Authorization: Bearer <JWT> required",
        ));
    };
    let keys = shard.snapshots.keys.load();
    let now = auth::now_unix();
    if let Some(c) = cache.as_ref() {
        if c.token == token && c.key_generation == keys.generation && c.until > now {
            if c.app != p.app_name {
                return Err(Answer::error(403, "wrong_app", "token of another app"));
            }
            ShardMetrics::inc(&shard.metrics.auth_cache_hits);
            return Ok(Some(c.sub.clone()));
        }
    }
    let tok = std::str::from_utf8(token).unwrap_or("");
    match verify_client_jwt(
        &keys.keyring,
        p.app_name,
        tok,
        now,
        shard.cfg.auth.grace_secs,
    ) {
        Ok(claims) => {
            let sub: Rc<str> = claims.sub.as_str().into();
            let grace = shard.cfg.auth.grace_secs;
            let until = auth::trusted_until(&keys.keyring, p.app_name, tok, &claims, now, grace);
            *cache = Some(AuthCache {
                token: token.to_vec(),
                key_generation: keys.generation,
                app: claims.app,
                sub: sub.clone(),
                until,
            });
            Ok(Some(sub))
        }
        Err(e) => Err(Answer::error(e.http_status(), e.code(), e.to_string())),
    }
}

async fn route(shard: Rc<Shard>, req: Req, sub: Rc<str>) -> Answer {
    let path = std::str::from_utf8(&req.head[req.path.clone()]).unwrap_or("");
    let Ok(p) = parse_api_path(path) else {
        return Answer::error(400, "bad_path", "bad path");
    };
    let ct = req.content_type.clone().map(|r| &req.head[r]);
    dispatch(
        &shard,
        &RouteReq {
            app: p.app_name,
            service: p.service,
            module: p.module,
            function: p.function,
            wsid: p.wsid,
            method: req.method.as_str(),
            content_type: ct,
            subject: &sub,
            payload: req.body.clone(),
            flags: 0,
        },
    )
    .await
}

async fn forward_http(shard: Rc<Shard>, req: Req) -> Answer {
    let path = std::str::from_utf8(&req.head[req.path.clone()]).unwrap_or("");
    let Ok(p) = parse_api_path(path) else {
        return Answer::error(400, "bad_path", "bad path");
    };
    let cluster = format!("{}/{}", p.region, p.cluster);
    crate::peer::forward(
        &shard,
        &crate::peer::ForwardReq {
            cluster: &cluster,
            app: p.app_name,
            service: p.service,
            module: p.module,
            function: p.function,
            wsid: p.wsid,
            method: req.method.as_str(),
            content_type: req.content_type.clone().map(|r| &req.head[r]),
            token: req.token.clone().map(|r| &req.head[r]),
            payload: req.body.clone(),
        },
    )
    .await
}

/// Writes the response head for `a` into `out`.
pub fn write_head(out: &mut BytesMut, shard: &Shard, a: &Answer, body_len: usize, close: bool) {
    // Plain byte appends and `fmt_u64` instead of `write!`: this runs once per response, and
    // the formatting machinery cost more than the rest of the head.
    let mut tmp = [0u8; 20];
    let mut num = |out: &mut BytesMut, name: &[u8], n: u64| {
        out.put_slice(name);
        out.put_slice(crate::proto::fmt_u64(n, &mut tmp));
        out.put_slice(b"\r\n");
    };
    let mut forwarded = false;
    out.put_slice(b"HTTP/1.1 ");
    let mut st = [0u8; 20];
    out.put_slice(crate::proto::fmt_u64(a.status as u64, &mut st));
    out.put_u8(b' ');
    out.put_slice(reason(a.status).as_bytes());
    out.put_slice(b"\r\n");
    let mut has_ct = false;
    if let Some(f) = &a.frame {
        // An answer relayed by a peer router carries that router's fedbus-* headers.
        let from_router = a.relayed;
        for (t, v) in MetaIter::new(&f.meta).filter_map(Result::ok) {
            if t == tag::HEADER && super::allowed_header(v, from_router) {
                out.put_slice(v);
                out.put_slice(b"\r\n");
            } else if t == tag::SERVED_BY
                && from_router
                && !v.contains(&b'\r')
                && !v.contains(&b'\n')
            {
                forwarded = true;
                out.put_slice(b"fedbus-served-by: ");
                out.put_slice(v);
                out.put_slice(b"\r\n");
            } else if t == tag::CONTENT_TYPE && !v.contains(&b'\r') && !v.contains(&b'\n') {
                has_ct = true;
                out.put_slice(b"content-type: ");
                out.put_slice(v);
                out.put_slice(b"\r\n");
            }
        }
        if !has_ct {
            out.put_slice(b"content-type: application/octet-stream\r\n");
        }
    } else {
        out.put_slice(b"content-type: application/json\r\n");
    }
    num(out, b"content-length: ", body_len as u64);
    num(out, b"fedbus-shard: ", shard.index as u64);
    if !forwarded {
        // (A relayed answer brought the serving router's fedbus-partition/hops.)
        out.put_slice(b"fedbus-served-by: ");
        out.put_slice(shard.router_name.as_bytes());
        out.put_slice(b"\r\n");
        if let Some(p) = a.partition {
            num(out, b"fedbus-partition: ", p as u64);
        }
        if a.frame.is_some() || a.hops > 0 {
            num(out, b"fedbus-hops: ", a.hops as u64);
        }
    }
    if let Some(e) = a.emergency_for {
        num(out, b"fedbus-emergency: ", e as u64);
    }
    if a.status == 503 {
        out.put_slice(b"retry-after: 1\r\n");
    }
    if close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

use bytes::BufMut;

/// Serves one client connection until it closes.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let m = shard.metrics.clone();
    ShardMetrics::inc(&m.connections[Listener::Api as usize]);
    shard.client_conns.set(shard.client_conns.get() + 1);
    match serve_inner(&shard, &mut stream).await {
        Err(e) => tracing::debug!(shard = shard.index, "client connection ended: {e}"),
        Ok(Some((head, leftover))) => super::ws::serve(shard.clone(), stream, head, leftover).await,
        Ok(None) => {}
    }
    shard.client_conns.set(shard.client_conns.get() - 1);
    ShardMetrics::dec(&m.connections[Listener::Api as usize]);
}

/// What one pipelined request needs to be answered: one concrete future type for all of them,
/// so that the in-flight queue holds them without boxing each (one allocation fewer per
/// request).
enum Step {
    Ready(Answer),
    Local(Req, Rc<str>),
    Forward(Req),
}

/// The answer to one request, with (close after it, body bytes in, start time).
async fn answer(
    shard: Rc<Shard>,
    step: Step,
    close: bool,
    n_in: usize,
    start: Instant,
) -> (Answer, bool, usize, Instant) {
    let a = match step {
        Step::Ready(a) => a,
        Step::Local(req, sub) => route(shard, req, sub).await,
        Step::Forward(req) => forward_http(shard, req).await,
    };
    (a, close, n_in, start)
}

/// Bytes of a websocket upgrade request head and what followed it.
type Upgrade = (Bytes, BytesMut);

async fn serve_inner(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
) -> std::io::Result<Option<Upgrade>> {
    let limits = shard.cfg.limits.clone();
    let fd = stream.as_raw_fd();
    let _ = stream.set_nodelay(true);
    // A client that stops reading its answers is dropped instead of holding them forever.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(limits.idle_timeout_ms)));
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(4096);
    let mut parts: Vec<Bytes> = Vec::with_capacity(32);
    let mut inflight = FuturesOrdered::new();
    let mut cache: Option<AuthCache> = None;
    let mut closing = false;
    let mut continued = false;
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    loop {
        // Parse and start every complete request that is buffered.
        while !closing && inflight.len() < limits.max_inflight_per_connection {
            match parse_one(&mut buf, limits.max_header_bytes, limits.max_body_bytes) {
                Parsed::Incomplete {
                    continue_,
                    head_len,
                } => {
                    if let (Some(n), false) = (head_len, continued) {
                        continued = true;
                        if let Err(a) = check_head(shard, &mut cache, &buf[..n]) {
                            closing = true;
                            inflight.push_back(answer(
                                shard.clone(),
                                Step::Ready(a),
                                true,
                                0,
                                Instant::now(),
                            ));
                            break;
                        }
                        if continue_ {
                            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                        }
                    }
                    break;
                }
                Parsed::Error(status, code, msg) => {
                    closing = true;
                    let a = Answer::error(status, code, msg);
                    inflight.push_back(answer(
                        shard.clone(),
                        Step::Ready(a),
                        true,
                        0,
                        Instant::now(),
                    ));
                }
                Parsed::Request(req) if is_ws_upgrade(&req) => {
                    if inflight.is_empty() {
                        return Ok(Some((req.head, buf)));
                    }
                    closing = true;
                    let a = Answer::error(
                        400,
                        "bad_upgrade",
                        "websocket upgrade after pipelined requests",
                    );
                    inflight.push_back(answer(
                        shard.clone(),
                        Step::Ready(a),
                        true,
                        0,
                        Instant::now(),
                    ));
                }
                Parsed::Request(req) => {
                    continued = false;
                    let start = Instant::now();
                    let close = req.close;
                    closing |= close;
                    let n_in = req.body.len();
                    match prepare(shard, &mut cache, &req) {
                        Err(a) => inflight.push_back(answer(
                            shard.clone(),
                            Step::Ready(a),
                            close,
                            n_in,
                            start,
                        )),
                        Ok(None) => inflight.push_back(answer(
                            shard.clone(),
                            Step::Forward(req),
                            close,
                            n_in,
                            start,
                        )),
                        Ok(Some(sub)) => inflight.push_back(answer(
                            shard.clone(),
                            Step::Local(req, sub),
                            close,
                            n_in,
                            start,
                        )),
                    }
                }
            }
        }
        if inflight.is_empty() {
            if closing {
                break;
            }
            let read = fill(stream, &mut buf);
            match glommio::timer::timeout(idle, async { Ok(read.await) }).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
            }
        }
        // Wait for the oldest answer, reading more requests meanwhile.
        let first = if closing || inflight.len() >= limits.max_inflight_per_connection {
            inflight.next().await
        } else {
            let next = std::pin::pin!(inflight.next());
            let read = std::pin::pin!(fill(stream, &mut buf));
            match futures_util::future::select(next, read).await {
                futures_util::future::Either::Left((a, _)) => a,
                futures_util::future::Either::Right((r, _)) => {
                    if r? == 0 {
                        closing = true;
                    }
                    continue;
                }
            }
        };
        // Answer it and every later one that is already done, in one write.
        let mut next = first;
        while let Some((a, close, n_in, start)) = next {
            let body = a.body();
            let close = close || closing && inflight.is_empty();
            write_head(&mut out, shard, &a, body.len(), close);
            parts.push(out.split().freeze());
            shard.metrics.request(
                a.status,
                start.elapsed().as_micros() as u64,
                n_in,
                body.len(),
            );
            if !body.is_empty() {
                parts.push(body);
            }
            if close {
                closing = true;
                inflight.clear();
                break;
            }
            next = futures_util::FutureExt::now_or_never(inflight.next()).flatten();
        }
        write_all_vectored(fd, stream, &parts).await?;
        parts.clear();
        if closing && inflight.is_empty() {
            break;
        }
    }
    let _ = stream.flush().await;
    if closing {
        // Lingering close: the client may still be sending (a body we refused with 413, a
        // pipelined request after `Connection: close`); closing with unread input would make
        // the kernel send RST and could destroy our answer before the client reads it.
        let _ = stream.shutdown(std::net::Shutdown::Write).await;
        let mut sink = [0u8; 16 * 1024];
        let _ = glommio::timer::timeout(Duration::from_secs(1), async {
            let mut left = 1usize << 20;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
            Ok(())
        })
        .await;
    }
    Ok(None)
}

fn is_ws_upgrade(req: &Req) -> bool {
    let path = &req.head[req.path.clone()];
    req.method == Method::Get && (path == b"/api/ws" || path.starts_with(b"/api/ws?"))
}

/// Reads more bytes into `buf`; 0 at end of stream.
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let spare = buf.spare_capacity_mut();
    // SAFETY: glommio's read passes the slice to recv(2), which only writes into it; only the
    // bytes it reports are exposed below.
    let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut u8, spare.len()) };
    let n = stream.read(dst).await?;
    // SAFETY: n bytes were written by the read.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Parsed {
        let mut b = BytesMut::from(s);
        parse_one(&mut b, 1024, 100)
    }

    #[test]
    fn parses_pipelined_requests_without_copy() {
        let mut b = BytesMut::from(
            &b"POST /api/a HTTP/1.1\r\nAuthorization: Bearer tok\r\nContent-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\n\r\n"[..],
        );
        let Parsed::Request(r) = parse_one(&mut b, 1024, 100) else {
            panic!("first")
        };
        assert_eq!(&r.body[..], b"abc");
        assert_eq!(&r.head[r.path.clone()], b"/api/a");
        assert_eq!(&r.head[r.token.clone().unwrap()], b"tok");
        let Parsed::Request(r2) = parse_one(&mut b, 1024, 100) else {
            panic!("second")
        };
        assert_eq!(r2.method, Method::Get);
        assert!(r2.body.is_empty());
        assert!(b.is_empty());
    }

    #[test]
    fn limits_and_errors() {
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),
            Parsed::Error(413, ..)
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\n\r\n"),
            Parsed::Error(405, ..)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parsed::Error(411, ..)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Parsed::Error(400, ..)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nabcde"),
            Parsed::Error(400, ..)
        ));
        assert!(matches!(
            parse(b"\x01\x02 nonsense\r\n\r\n"),
            Parsed::Error(400, ..)
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert!(matches!(parse(big.as_bytes()), Parsed::Error(431, ..)));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab"),
            Parsed::Incomplete {
                continue_: true,
                ..
            }
        ));
        assert!(matches!(
            parse(b"GET / HT"),
            Parsed::Incomplete {
                continue_: false,
                head_len: None
            }
        ));
    }
}
