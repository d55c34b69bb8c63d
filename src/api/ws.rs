//! The client websocket endpoint `GET /api/ws`: authenticated once at the upgrade (bearer
//! header or `access_token` query parameter), then many requests in flight on one connection,
//! each a fedbus frame (kind Request, client-chosen id, PATH metadata, payload) answered by a
//! Response frame with the same id, possibly out of order. Same routing and errors as HTTP.

use crate::auth::{self, claimed_app, verify_client_jwt};
use crate::proto::{self, put_meta, put_meta_u64, tag, Frame, Header, Kind, MetaIter};
use crate::route::parse_api_path;
use crate::shard::{dispatch, Answer, RouteReq, Shard};
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
    let keys = shard.snapshots.keys.load();
    let app = claimed_app(&token).unwrap_or_default();
    let claims = match verify_client_jwt(
        &keys.keyring,
        &app,
        &token,
        auth::now_unix(),
        shard.cfg.auth.grace_secs,
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = stream
                .write_all(
                    handshake::error_response(e.http_status(), e.code(), &e.to_string()).as_bytes(),
                )
                .await;
            return;
        }
    };
    drop(keys);
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
    let until = auth::trusted_until(
        &shard.snapshots.keys.load().keyring,
        &app,
        &token,
        &claims,
        auth::now_unix(),
        shard.cfg.auth.grace_secs,
    );
    let session = Rc::new(Session {
        app: claims.app,
        sub: claims.sub.into(),
        exp: until,
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
                if session.exp <= auth::now_unix() {
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
                    s.metrics
                        .request(a.status, start.elapsed().as_micros() as u64, n_in, body_len);
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
    app: String,
    sub: Rc<str>,
    /// `exp`, or the end of the key version's grace period if sooner: then close 1008.
    exp: u64,
    inflight: Cell<usize>,
}

async fn answer(shard: &Rc<Shard>, sess: &Session, f: &Frame) -> Answer {
    let Some(path) = f.get_str(tag::PATH) else {
        return Answer::error(400, "bad_request", "request frame without PATH");
    };
    let p = match parse_api_path(path) {
        Ok(p) => p,
        Err(e) => return Answer::error(e.http_status(), e.code(), format!("{e}: {path}")),
    };
    if let Some(a) = super::http::check_target(shard, p.region, p.cluster, p.app_name) {
        return a;
    }
    if p.app_name != sess.app {
        return Answer::error(403, "wrong_app", "token of another app");
    }
    dispatch(
        shard,
        &RouteReq {
            app: p.app_name,
            service: p.service,
            module: p.module,
            function: p.function,
            wsid: p.wsid,
            method: "POST",
            content_type: f.get(tag::CONTENT_TYPE),
            subject: &sess.sub,
            payload: f.payload.clone(),
            flags: 0,
        },
    )
    .await
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
    m.resize(proto::HEADER_LEN, 0);
    put_meta_u64(&mut m, tag::STATUS, a.status as u64);
    if let Some(r) = served_by {
        put_meta(&mut m, tag::SERVED_BY, r.as_bytes());
    }
    if let Some((code, _)) = &a.error {
        put_meta(&mut m, tag::ERROR, code.as_bytes());
        put_meta(&mut m, tag::CONTENT_TYPE, b"application/json");
    }
    let mut line = |name: &str, v: u64| {
        let mut tmp = [0u8; 20];
        let mut l = Vec::with_capacity(40);
        l.extend_from_slice(name.as_bytes());
        l.extend_from_slice(b": ");
        l.extend_from_slice(proto::fmt_u64(v, &mut tmp));
        put_meta(&mut m, tag::HEADER, &l);
    };
    if served_by.is_none() {
        // Peers add their own fedbus-shard; the serving router is named by SERVED_BY.
        line("fedbus-shard", shard as u64);
    }
    if let Some(p) = a.partition {
        line("fedbus-partition", p as u64);
    }
    line("fedbus-hops", a.hops as u64);
    if let Some(e) = a.emergency_for {
        line("fedbus-emergency", e as u64);
    }
    if let Some(f) = &a.frame {
        let from_router = a.relayed;
        for (t, v) in MetaIter::new(&f.meta).filter_map(Result::ok) {
            let keep = match t {
                tag::HEADER => super::allowed_header(v, from_router),
                tag::CONTENT_TYPE => !v.contains(&b'\r') && !v.contains(&b'\n'),
                tag::SERVED_BY => from_router && !v.contains(&b'\r') && !v.contains(&b'\n'),
                _ => false,
            };
            if keep {
                put_meta(&mut m, t, v);
            }
        }
    }
    let body = a.body();
    let h = Header {
        kind: Kind::Response,
        flags: 0,
        hops: a.hops,
        partition: a.partition.unwrap_or(0),
        request_id: id,
        meta_len: (m.len() - proto::HEADER_LEN) as u32,
        payload_len: body.len() as u32,
    };
    m[..proto::HEADER_LEN].copy_from_slice(&h.encode());
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
