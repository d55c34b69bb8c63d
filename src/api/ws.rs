//! The client websocket endpoint `GET /api/ws`: authenticated once at the upgrade (bearer
//! header or `access_token` query parameter), then many requests in flight on one connection,
//! each a fedbus frame (kind Request, client-chosen id, PATH metadata, payload) answered by a
//! Response frame with the same id, possibly out of order. Same routing and errors as HTTP:
//! every request goes through [`routing::route`] with the session's token as its credential,
//! so a request may target another cluster of the federation (the home cluster verifies the
//! token there), and a token whose key version retires is refused per request with the same
//! 401 as on HTTP.

use crate::auth::{self, claimed_app};
use crate::proto::{self, put_meta, put_meta_u64, tag, Frame, Kind};
use crate::route::parse_api_path;
use crate::routing::{self, verify, Answer, Field, Ingress, Principal, Request, VerifyCache};
use crate::shard::Shard;
use crate::ws::{self, handshake, Message, Side, WsOut};
use bytes::{Bytes, BytesMut};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

/// `access_token` from a query string.
fn query_token(path: &str) -> Option<&str> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
        .filter(|t| !t.is_empty())
}

/// Takes over a connection whose first request was `GET /api/ws`. `head` is that request's
/// head; `leftover` what followed it.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, head: Bytes, leftover: BytesMut) {
    let up = match handshake::parse_upgrade(&head) {
        Ok(Some(up)) => up,
        Ok(None) => return,
        Err(r) => {
            let _ = stream
                .write_all(handshake::error_response(r.status, r.code, r.message).as_bytes())
                .await;
            return;
        }
    };
    let token = up
        .bearer
        .clone()
        .or_else(|| query_token(&up.path).map(str::to_string));
    let Some(token) = token else {
        let _ = stream
            .write_all(
                handshake::error_response(
                    401,
                    "missing_token",
                    "Authorization: Bearer <JWT> or ?access_token= required",
                )
                .as_bytes(),
            )
            .await;
        return;
    };
    // A router without federation verifies the token at the upgrade (and caches it for the
    // session's requests). A federated one cannot: the token may belong to an app of another
    // cluster, so each request is authorized where it is served, as an HTTP request would be.
    let mut cache = VerifyCache::new(1);
    let mut exp = None;
    if shard.federation.routers.is_empty() {
        let keys = shard.snapshots.keys.load();
        let app = claimed_app(&token).unwrap_or_default();
        let now = auth::now_unix();
        let verdict = verify::authorize(
            &mut cache,
            &verify::Keys {
                keyring: &keys.keyring,
                generation: keys.generation,
                grace_secs: shard.cfg.auth.grace_secs,
            },
            &app,
            false,
            Some(token.as_bytes()),
            now,
        );
        match verdict {
            Ok(Principal::Client { exp: e, .. }) => exp = Some(e),
            Ok(Principal::Anonymous) => {}
            Err(Answer::Error(e)) => {
                let _ = stream
                    .write_all(handshake::error_response(e.status, e.code, &e.message).as_bytes())
                    .await;
                return;
            }
            Err(_) => return,
        }
    }
    if stream
        .write_all(handshake::accept_response(&up.key).as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(
        shard.cfg.limits.idle_timeout_ms,
    )));
    let limits = &shard.cfg.limits;
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        stream,
        leftover,
        Side::Server,
        limits.max_message_bytes(),
        limits.max_link_outbox_bytes,
    );
    let session = Rc::new(Session {
        token: token.into_bytes().into_boxed_slice(),
        cache: RefCell::new(cache),
        exp,
        inflight: Cell::new(0),
    });
    let end = loop {
        if out.borrow().is_closing() {
            break Some(1013);
        }
        let msg = match glommio::timer::timeout(
            std::time::Duration::from_millis(limits.idle_timeout_ms),
            async { Ok(reader.next().await) },
        )
        .await
        {
            Ok(m) => m,
            // Idle means nothing to read and nothing in flight.
            Err(_) if session.inflight.get() > 0 => continue,
            Err(_) => break Some(1001),
        };
        match msg {
            Ok(Message::Binary(b)) => {
                if session.exp.is_some_and(|e| e <= auth::now_unix()) {
                    break Some(1008);
                }
                let f = match Frame::decode(b) {
                    Ok(f) if f.header.kind == Kind::Request => f,
                    _ => break Some(1002),
                };
                if session.inflight.get() >= limits.max_inflight_per_connection {
                    let a = Answer::error(
                        503,
                        "too_many_inflight",
                        "over the per-connection in-flight limit",
                    );
                    send_answer(&out, shard.index, f.header.request_id, &a, None);
                    continue;
                }
                session.inflight.set(session.inflight.get() + 1);
                let (s, o, sess) = (shard.clone(), out.clone(), session.clone());
                glommio::spawn_local(async move {
                    let start = Instant::now();
                    let n_in = f.payload.len();
                    let a = answer(&s, &sess, &f).await;
                    let body_len = send_answer(&o, s.index, f.header.request_id, &a, None);
                    s.metrics.request(
                        a.status(),
                        start.elapsed().as_micros() as u64,
                        n_in,
                        body_len,
                    );
                    sess.inflight.set(sess.inflight.get() - 1);
                })
                .detach();
            }
            Ok(Message::Ping(p)) => out.borrow_mut().send_control(ws::frame::opcode::PONG, &p),
            Ok(Message::Pong(_)) => {}
            Ok(Message::Text(_)) => break Some(1003),
            Ok(Message::Close(_)) => break Some(1000),
            Err(e) => break e.close_code(),
        }
    };
    let lingering = end.is_some();
    match end {
        Some(code) => out.borrow_mut().close(code),
        None => out.borrow_mut().abort(),
    }
    let _ = writer.await;
    if lingering {
        // Our close frame is out; let the client read it before the socket goes away.
        reader.drain(std::time::Duration::from_secs(2)).await;
    }
}

struct Session {
    /// The bearer token of the upgrade: the credential of every request on the session.
    token: Box<[u8]>,
    cache: RefCell<VerifyCache>,
    /// The token's `exp` when this router verified it at the upgrade: then close 1008.
    exp: Option<u64>,
    inflight: Cell<usize>,
}

async fn answer(shard: &Rc<Shard>, sess: &Session, f: &Frame) -> Answer {
    let Some(path) = f.get_str(tag::PATH) else {
        return Answer::error(400, "bad_request", "request frame without PATH");
    };
    let target = match parse_api_path(path) {
        Ok(p) => p,
        Err(e) => return Answer::error(e.http_status(), e.code(), format!("{e}: {path}")),
    };
    let req = Request {
        target,
        method: "POST",
        credential: Some(&sess.token),
        content_type: f.get(tag::CONTENT_TYPE),
        payload: f.payload.clone(),
        ingress: Ingress::Websocket,
    };
    routing::route(shard, &sess.cache, &req).await
}

/// Queues the Response frame for `a` (client websocket and peer links); returns the body
/// length. `served_by` names this router on answers to peers.
pub fn send_answer(
    out: &RefCell<WsOut>,
    shard: usize,
    id: u64,
    a: &Answer,
    served_by: Option<&str>,
) -> usize {
    let mut m = BytesMut::with_capacity(128);
    proto::begin_head(&mut m);
    put_meta_u64(&mut m, tag::STATUS, u64::from(a.status()));
    if let Some(r) = served_by {
        put_meta(&mut m, tag::SERVED_BY, r.as_bytes());
    }
    if let Some(code) = a.error_tag() {
        put_meta(&mut m, tag::ERROR, code);
    }
    if served_by.is_none() {
        // Peers add their own fedbus-shard; the serving router is named by SERVED_BY.
        put_line(&mut m, "fedbus-shard", shard as u64);
    }
    a.fields(|f| match f {
        Field::ContentType(v) => put_meta(&mut m, tag::CONTENT_TYPE, v),
        Field::ServedBy(v) => put_meta(&mut m, tag::SERVED_BY, v),
        Field::Line(v) => put_meta(&mut m, tag::HEADER, v),
        Field::Number(name, n) => put_line(&mut m, name, n),
    });
    let body = a.body();
    proto::finish_head(
        &mut m,
        Kind::Response,
        0,
        a.hops(),
        a.partition().unwrap_or(0),
        id,
        body.len(),
    );
    let n = body.len();
    let mut o = out.borrow_mut();
    if o.send_binary(&m, body).is_err() && !o.is_closing() {
        // The other side does not read its answers: rather than drop one silently, close the
        // connection with 1013 (try again later) so every request on it gets a clear end.
        tracing::warn!(id, "websocket outbox over its limit: closing with 1013");
        o.close(1013);
    }
    n
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
