//! The client websocket endpoint `GET /api/ws`: authenticated once at the upgrade (bearer
//! header or `access_token` query parameter), then many requests in flight on one connection,
//! each a fedbus frame (kind Request, client-chosen id, PATH metadata, payload) answered by a
//! Response frame with the same id, possibly out of order. Same routing and errors as HTTP:
//! every request goes through [`routing::route`] with the session's token as its credential,
//! so a request may target another cluster of the federation (the home cluster verifies the
//! token there), and a token whose key version retires is refused per request with the same
//! 401 as on HTTP.

use super::inflight::Unordered;
use crate::auth::{self, claimed_app};
use crate::metrics::WS_BAD_INPUT_CODES;
use crate::proto::{tag, Frame, Kind};
use crate::route::parse_api_path;
use crate::routing::answer::send_answer;
use crate::routing::{self, verify, Answer, Ingress, Principal, Request, VerifyCache};
use crate::shard::Shard;
use crate::ws::Socket as _;
use crate::ws::Stream;
use crate::ws::{self, handshake, Message, Side};
use bytes::{Bytes, BytesMut};
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
pub(crate) async fn serve<S: Stream>(
    shard: Rc<Shard>,
    mut stream: S,
    head: Bytes,
    leftover: BytesMut,
) {
    let start = Instant::now();
    // The HTTP layer read this head under `limits.max_header_bytes` (a browser's token rides
    // in it, `?access_token=`): the same bound here.
    let up = match handshake::parse_upgrade_within(&head, shard.cfg.limits.max_header_bytes) {
        Ok(Some(up)) => up,
        Ok(None) => return,
        Err(r) => {
            log_refusal(&shard, r.status, r.code, r.message);
            return refuse(&shard, &mut stream, start, r.status, r.code, r.message).await;
        }
    };
    // A slice of the HTTP read buffer: held, it would keep that whole buffer for the session's
    // life (`up` owns what it took from it).
    drop(head);
    // A session opened now would be closed with 1001 at once: the client opens it again
    // elsewhere (this router's listeners are closed), as after a 503 on HTTP.
    if shard.health.draining() {
        tracing::info!(shard = shard.index, "/api/ws upgrade during a drain: 503");
        let why = "this router is draining; open the session again";
        return refuse(&shard, &mut stream, start, 503, "draining", why).await;
    }
    // A page of another origin may open a session only if some app of this cluster allows
    // its origin; each request on the session is then checked against its own app's policy.
    if let Some(o) = up
        .cross_origin
        .as_deref()
        .filter(|o| !routing::cors::any_app_allows(&shard, o.as_bytes()))
    {
        crate::metrics::ShardMetrics::inc(&shard.metrics.origin_refused);
        if let Some(suppressed) = shard.log_gates.origin_refused.pass() {
            let origin = crate::util::clipped(o);
            tracing::info!(
                shard = shard.index,
                ?origin,
                suppressed,
                "/api/ws origin not allowed: 403"
            );
        }
        let why = "no app of this cluster allows this origin";
        return refuse(&shard, &mut stream, start, 403, "origin_not_allowed", why).await;
    }
    // Without a token the session is anonymous: each request is admitted as an HTTP request
    // without `Authorization` is (the app's `anonymous_services` only, else 401).
    let token = up
        .bearer
        .clone()
        .or_else(|| query_token(&up.path).map(str::to_string));
    // A router without federation verifies the token at the upgrade (and caches it for the
    // session's requests). A federated one cannot: the token may belong to an app of another
    // cluster, so each request is authorized where it is served, as an HTTP request would be.
    let mut cache = VerifyCache::new(1);
    let mut exp = None;
    if let Some(token) = token
        .as_ref()
        .filter(|_| shard.federation.routers.is_empty())
    {
        let keys = shard.snapshots.keys.load();
        let app = claimed_app(token).unwrap_or_default();
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
                log_refusal(&shard, e.status, e.code, &e.message);
                return refuse(&shard, &mut stream, start, e.status, e.code, &e.message).await;
            }
            Err(_) => return,
        }
    }
    if stream
        .write_parts(&[Bytes::from(handshake::accept_response(&up.key))])
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.socket().set_nodelay();
    let _ = stream
        .socket()
        .set_write_timeout(Some(std::time::Duration::from_millis(
            shard.cfg.limits.idle_timeout_ms,
        )));
    let limits = &shard.cfg.limits;
    let too_slow = Rc::new(Cell::new(false));
    // The socket's own descriptor, open as long as the writer holds its half of the stream.
    let fd = stream.socket().fd();
    let paced = |inner| Paced {
        inner,
        fd,
        deadline: crate::util::Deadline::new(),
        allowance: std::time::Duration::from_millis(limits.handshake_timeout_ms),
        bytes_per_sec: limits.min_answer_bytes_per_sec as f64,
        too_slow: too_slow.clone(),
    };
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start_with(
        stream,
        leftover,
        Side::Server,
        // An anonymous session can only reach anonymous services, whose bodies are bounded
        // by `limits.max_anonymous_body_bytes` (as on HTTP, refused from the head): 1009.
        match token {
            Some(_) => limits.max_message_bytes(),
            None => limits.max_anonymous_body_bytes + 64 * 1024,
        },
        limits,
        paced,
    );
    // A message that arrives in pieces is held to an HTTP body's slowest pace: otherwise one
    // byte per idle period kept a session (and its share of the body budget) forever.
    reader.set_min_pace(
        std::time::Duration::from_millis(limits.handshake_timeout_ms),
        limits.min_body_bytes_per_sec,
    );
    {
        // The session's answers waiting to be written count against the shard's memory
        // budget, and its share of it bounds them.
        let mut o = out.borrow_mut();
        o.set_soft_limit(limits.max_connection_outbox_bytes);
        o.charge_to(crate::shard::OutboxCharge::new(shard.budget.clone()));
    }
    let session = Rc::new(Session {
        token: token.map(|t| t.into_bytes().into_boxed_slice()),
        origin: up.cross_origin.map(|o| o.into_bytes().into_boxed_slice()),
        cache: RefCell::new(cache),
        exp,
        inflight: Cell::new(0),
        answered_at: Cell::new(None),
        idle_since: Cell::new(Instant::now()),
    });
    // Bytes of request bodies in flight on this session (its share of the body budget).
    let held = Rc::new(Cell::new(0usize));
    // A message is charged from its frame head, as an HTTP body is from its request head: the
    // length its frame announces must fit, and what came and a window ahead are charged as it
    // arrives, so a session that trickles one holds what it sent within the budget.
    // The charge goes with the whole message to its request; one refused drops the message
    // unread, and it is answered `503 overloaded` as one that arrived whole would be.
    let arriving: Rc<RefCell<Option<crate::shard::BodyCharge>>> = Rc::default();
    {
        let (shard, held, arriving) = (shard.clone(), held.clone(), arriving.clone());
        reader.charge_arriving(move |h| {
            let mut arriving = arriving.borrow_mut();
            let ok = match arriving.as_mut() {
                Some(c) if !h.fresh => c.grow_to(h.now, h.whole).is_ok(),
                _ => {
                    // A charge left from before goes back first, then the new one is taken.
                    drop(arriving.take());
                    let charge = shard.charge_arriving(&held, h.now, h.whole);
                    charge.map(|c| *arriving = Some(c)).is_ok()
                }
            };
            if !ok {
                // Refused: the message is dropped, and what it held goes back.
                *arriving = None;
            }
            ok
        });
    }
    // The read buffers that requests in flight keep alive (each holds a slice of one) are held
    // to twice the bytes charged for them, plus two first offers (8 KiB) per request in flight
    // (a client that sends each small request in a write of its own has each read into a
    // small buffer of its own), plus two read chunks. A client that put one small slow request
    // in each read and filled the rest of the buffer with a message refused at once kept 64 KiB
    // alive per request, charged for ~100 bytes (16 MiB per session at 256 in flight); now 8
    // KiB. Past it the session reads nothing until answers come back (as an HTTP connection
    // at its in-flight limit); counted once per wait, logged once per session.
    {
        let (shard, held, session, logged) = (
            shard.clone(),
            held.clone(),
            session.clone(),
            Cell::new(false),
        );
        reader.limit_pinned(move |ask| {
            let charged = held.get().saturating_sub(ask.arriving);
            let per_request = 2 * ws::conn::FIRST_OFFER * session.inflight.get();
            let ok = ask.bytes <= 2 * ws::conn::READ_CHUNK + 2 * charged + per_request;
            if !ok && !ask.again {
                crate::metrics::ShardMetrics::inc(&shard.metrics.ws_reads_paused);
                if !logged.replace(true) {
                    tracing::info!(
                        shard = shard.index,
                        bytes = ask.bytes,
                        charged,
                        inflight = session.inflight.get(),
                        "client websocket: read buffers held by small requests in flight; reading paused until answers come back"
                    );
                }
            }
            ok
        });
    }
    // The requests in flight run in reused slots of this task, and every wait of the session
    // is on one timer: a request allocates nothing here.
    let mut inflight = Unordered::new();
    let mut deadline = crate::util::Deadline::new();
    let idle = std::time::Duration::from_millis(limits.idle_timeout_ms);
    // Quiet this long with nothing in flight: a ping (`limits.client_ping_interval_ms`; the
    // client has the rest of `idle` to answer anything). Whether one is out since the last
    // message read.
    let ping_after = std::time::Duration::from_millis(limits.client_ping_interval_ms);
    let mut pinged = false;
    // How long a quiet session waits before its ping (pings on, none out yet) or its close.
    let quiet = |pinged: bool| match (ping_after.is_zero(), pinged) {
        (true, _) => idle,
        (false, false) => ping_after,
        (false, true) => idle - ping_after,
    };
    // The rest of a wait that began with a request in flight, from its last answer (or that
    // went on after the session gave its buffers back).
    let mut resume: Option<std::time::Duration> = None;
    // Idle this long with nothing in flight, the session gives its buffers back.
    let release_after = std::time::Duration::from_millis(shard.cfg.tuning.idle_buffer_release_ms);
    // What is left of it when a wait that began busy ended before it.
    let mut release_left: Option<std::time::Duration> = None;
    // The time of the last read: every request it brought was received then.
    let (mut read_at, mut reads) = (Instant::now(), reader.reads());
    // A drain: the session reads on until its answers are out, serves the one message that
    // was arriving when the drain began, and answers any new request `503 draining` (none is
    // left unanswered); then 1001.
    let (mut draining, mut finish_arriving) = (false, false);
    let end = loop {
        if out.borrow().is_closing() {
            break Some(1013);
        }
        if draining && session.inflight.get() == 0 && !finish_arriving {
            break Some(1001);
        }
        // Idle is measured from the end of the last activity: a wait that saw a request in
        // flight or bytes of a message arriving does not count, the next starts over.
        let (busy, reads_before) = (session.inflight.get() > 0, reader.reads());
        let unbuffered = reader.is_unbuffered();
        // Wait for the next message, or for the outbox to close (an answer found it over
        // its limit: the client does not read), or for a drain.
        let next = async {
            use futures_util::future::{select, Either};
            let m = std::pin::pin!(reader.next());
            let c = std::pin::pin!(ws::conn::closed(&out));
            let d = std::pin::pin!(async {
                if draining {
                    std::future::pending::<()>().await;
                }
                let _ = shard.drain.acquire(1).await;
            });
            match select(m, select(c, d)).await {
                Either::Left((m, _)) => Next::Message(m),
                Either::Right((Either::Left(_), _)) => Next::Overflow,
                Either::Right((Either::Right(_), _)) => Next::Drain,
            }
        };
        // Draining: a short wait, so that the last answer ends the session promptly.
        let wait = if draining {
            crate::health::POLL
        } else {
            resume.take().unwrap_or(quiet(pinged))
        };
        // Quiet with its buffers: they go back after `tuning.idle_buffer_release_ms`, then
        // the rest of the wait goes on without them.
        let first = release_left.take().unwrap_or(release_after);
        let releasing = !draining && !unbuffered && !release_after.is_zero() && first < wait;
        let (wait, rest) = match releasing {
            true => (first, wait - first),
            false => (wait, std::time::Duration::ZERO),
        };
        let waited = {
            use futures_util::future::{select, Either};
            let timed = std::pin::pin!(deadline.within(wait, next));
            let run = std::pin::pin!(inflight.run(|| session.answered_at.set(None)));
            match select(timed, run).await {
                Either::Left((w, _)) => w,
                Either::Right((never, _)) => match never {},
            }
        };
        let msg = match waited {
            Ok(Next::Message(m)) => m,
            Ok(Next::Overflow) => break Some(1013),
            Ok(Next::Drain) => {
                draining = true;
                finish_arriving = arriving.borrow().is_some();
                continue;
            }
            Err(_) if draining => continue,
            // Idle means nothing read and nothing in flight for the whole wait. Bytes of a
            // message arriving start it over (and answer a ping); after the last answer of a
            // wait that began busy, only the rest of it from that answer is waited.
            Err(_) if session.inflight.get() > 0 => continue,
            Err(_) if reader.reads() != reads_before => {
                pinged = false;
                continue;
            }
            Err(_) if releasing => {
                // Quiet since the last answer (a wait that began busy), or for this whole wait.
                let quiet_for = match busy {
                    true => session.idle_since.get().elapsed(),
                    false => release_after,
                };
                if quiet_for < release_after {
                    release_left = Some(release_after - quiet_for);
                } else if reader.give_back() {
                    out.borrow_mut().give_back();
                    inflight.give_back();
                    crate::metrics::ShardMetrics::inc(&shard.metrics.idle_buffers_released);
                }
                resume = Some(match busy {
                    true => quiet(pinged).saturating_sub(quiet_for),
                    false => rest,
                });
                continue;
            }
            Err(_) if busy => {
                resume = Some(quiet(pinged).saturating_sub(session.idle_since.get().elapsed()));
                continue;
            }
            Err(_) if !ping_after.is_zero() && !pinged => {
                pinged = true;
                out.borrow_mut()
                    .send_control(ws::frame::opcode::PING, b"fedbus");
                continue;
            }
            Err(_) => {
                if pinged {
                    crate::metrics::ShardMetrics::inc(&shard.metrics.client_ping_timeouts);
                    tracing::debug!(
                        shard = shard.index,
                        "client websocket answered no ping: closed"
                    );
                }
                break Some(1001);
            }
        };
        pinged = false;
        match msg {
            Ok(Message::Binary(b)) => {
                // Its charge, when it arrived in pieces.
                let arrived = arriving.borrow_mut().take();
                if reads != reader.reads() {
                    (read_at, reads) = (Instant::now(), reader.reads());
                }
                // With the leeway of the upgrade's check (and of an HTTP request's).
                if session.exp.is_some_and(|e| {
                    crate::auth::client_token_expired(e, crate::util::unix_secs_coarse())
                }) {
                    // This request is not served; the ones before it, still in flight, were
                    // sent with a valid token: their answers go out before the close frame.
                    finish_inflight(&mut inflight, &mut deadline, &session, &out).await;
                    break Some(1008);
                }
                let f = match Frame::decode(b) {
                    Ok(f) if f.header.kind == Kind::Request => f,
                    Ok(_) => break bad_input(&shard, 1002, "a fedbus frame other than a Request"),
                    Err(_) => {
                        break bad_input(&shard, 1002, "a binary message that is no fedbus frame")
                    }
                };
                // Refused before routing: draining, a body over the limit (as on HTTP; the
                // message's own bound, 1009, leaves room for its frame header and metadata),
                // too many in flight, or no room in the memory budget. The whole message is
                // held until answered (the body is a slice of it): its metadata counts with its
                // body, as for one charged while it arrived.
                let refused = if draining && !std::mem::take(&mut finish_arriving) {
                    let why = "this router is draining; send it again on a new session";
                    Err(Answer::error(503, "draining", why))
                } else if f.payload.len() > limits.max_body_bytes {
                    let why = "request body over limits.max_body_bytes";
                    Err(Answer::error(413, "body_too_large", why))
                } else if session.inflight.get() >= limits.max_inflight_per_connection {
                    let why = "over the per-connection in-flight limit";
                    Err(Answer::error(503, "too_many_inflight", why))
                } else {
                    let whole = f.meta.len() + f.payload.len();
                    arrived.map_or_else(|| shard.charge_body(&held, whole), Ok)
                };
                let charge = match refused {
                    Ok(c) => c,
                    Err(a) => {
                        let (id, n_in) = (f.header.request_id, f.payload.len());
                        refuse_request(&shard, &out, id, n_in, &a, read_at);
                        continue;
                    }
                };
                session.inflight.set(session.inflight.get() + 1);
                let (s, o, sess, start) = (shard.clone(), out.clone(), session.clone(), read_at);
                inflight.push(async move {
                    let _charge = charge;
                    let (n_in, id) = (f.payload.len(), f.header.request_id);
                    let a = answer(&s, &sess, f, start).await;
                    let body_len = send_answer(&o, s.index, id, &a, None);
                    s.metrics.request(
                        a.status(),
                        sess.answered_at()
                            .saturating_duration_since(start)
                            .as_micros() as u64,
                        n_in,
                        body_len,
                    );
                    sess.inflight.set(sess.inflight.get() - 1);
                    if sess.inflight.get() == 0 {
                        // The clock read the metrics above took.
                        sess.idle_since.set(sess.answered_at());
                    }
                });
            }
            Ok(Message::Ping(p)) => out.borrow_mut().send_control(ws::frame::opcode::PONG, &p),
            Ok(Message::Pong(_)) => {}
            Ok(Message::Text(_)) => break bad_input(&shard, 1003, "a text message"),
            Ok(Message::Close(_)) => break Some(1000),
            // As a Text message read whole is: fedbus frames are Binary.
            Err(ws::WsError::Dropped { text: true, .. }) => {
                break bad_input(&shard, 1003, "a text message")
            }
            Err(ws::WsError::Slow) => {
                crate::metrics::ShardMetrics::inc(&shard.metrics.slow_messages_closed);
                tracing::info!(
                    shard = shard.index,
                    "client websocket message slower than limits.min_body_bytes_per_sec: closed with 1008"
                );
                // The requests before it were received whole: their answers go out first.
                finish_inflight(&mut inflight, &mut deadline, &session, &out).await;
                break Some(1008);
            }
            Err(ws::WsError::Dropped { head, .. }) => {
                // Over the body budget while it arrived (refused and counted by `charge_body`):
                // dropped unread, answered from its frame header. It may be the message a drain
                // waits for: it is over now.
                finish_arriving = false;
                match crate::proto::Header::decode(&head) {
                    Ok(h) if h.kind == Kind::Request => {
                        let a = Answer::error(
                            503,
                            "overloaded",
                            "this message would go over the router's body budget or this session's share; retry later",
                        );
                        refuse_request(&shard, &out, h.request_id, 0, &a, read_at);
                    }
                    _ => break bad_input(&shard, 1002, "a fedbus frame other than a Request"),
                }
            }
            Err(ws::WsError::Eof) => {
                // The client shut its sending side (a TCP half-close): the requests it sent
                // are answered, as on HTTP, then the close frame (1000) follows them.
                finish_inflight(&mut inflight, &mut deadline, &session, &out).await;
                break Some(1000);
            }
            Err(e) => {
                match (&e, e.close_code()) {
                    (ws::WsError::Policy(_), _) => {
                        crate::metrics::ShardMetrics::inc(&shard.metrics.abusive_closed);
                        if let Some(suppressed) = shard.log_gates.ws_closed.pass() {
                            tracing::info!(
                                shard = shard.index,
                                suppressed,
                                "client websocket closed: {e}"
                            );
                        }
                    }
                    (_, Some(code)) if WS_BAD_INPUT_CODES.contains(&code) => {
                        break bad_input(&shard, code, &e.to_string());
                    }
                    _ => {}
                }
                break e.close_code();
            }
        }
    };
    // Answers still in flight could only follow the close frame: dropped (their pending
    // slots with them), and so is the charge of a message that was arriving.
    drop(inflight);
    drop(arriving.borrow_mut().take());
    // Counted before the lingering close, which a test (and a client) sees end.
    let counted = if too_slow.get() {
        slow_reader(&shard, TOO_SLOW);
        true
    } else if out.borrow().overflowed() {
        slow_reader(
            &shard,
            "client websocket does not read its answers: closed with 1013",
        );
        true
    } else {
        false
    };
    // A write that failed (too slow, or the socket gone) ended the writer: no close frame can
    // follow, so no lingering for one.
    let end = end.filter(|_| !out.borrow().write_failed());
    let lingering = end.is_some();
    match end {
        Some(code) => out.borrow_mut().close(code),
        None => out.borrow_mut().abort(),
    }
    if lingering {
        // The close frame goes out while the reader drains what the client still sends (a
        // client blocked writing to us would never get to read it otherwise); the writer has
        // `limits.handshake_timeout_ms` for it, then the socket is dropped. The drain goes on
        // up to 2 s after the close frame, so the client reads it before the socket goes away.
        let limit = std::time::Duration::from_millis(limits.handshake_timeout_ms);
        let write = async move {
            let _ = glommio::timer::timeout(limit, async move { Ok(writer.await) }).await;
        };
        let after = std::time::Duration::from_secs(2);
        let drain = reader.drain(limit + after);
        match futures_util::future::select(std::pin::pin!(write), std::pin::pin!(drain)).await {
            futures_util::future::Either::Left((_, drain)) => {
                let _ = glommio::timer::timeout(after, async {
                    drain.await;
                    Ok(())
                })
                .await;
            }
            futures_util::future::Either::Right((_, write)) => write.await,
        }
    } else {
        let _ = writer.await;
    }
    // A write paced out during the lingering close (the session ended for another reason
    // first) counts too, once.
    if !counted && too_slow.get() {
        slow_reader(&shard, TOO_SLOW);
    }
}

/// Counts and logs a session closed for not reading its answers.
fn slow_reader(shard: &Shard, why: &str) {
    crate::metrics::ShardMetrics::inc(&shard.metrics.slow_reader_closed);
    tracing::info!(shard = shard.index, "{why}");
}

/// A session's writer held to the pace an HTTP client must take its answers at: a write of N
/// bytes (a batch of frames) that the socket does not take at once must be done within
/// `limits.handshake_timeout_ms` + the larger of N and what the socket still holds to send /
/// `limits.min_answer_bytes_per_sec` (a blocked write may wait for bytes before it too).
/// Slower: the write fails and `too_slow` is set, so the session ends without a close frame
/// (the client is not reading), counted once in `fedbus_slow_reader_closed_total` and logged,
/// and its answers' bytes go back to the budget. Without it a client that read a byte now and
/// then kept its outbox (its share of the budget, and one answer more) for as long as each
/// write moved within the socket's write timeout. A write the socket takes at once reads no
/// clock and touches no timer ([`crate::util::Deadline::within_lazy`]).
struct Paced<W> {
    inner: W,
    fd: std::os::fd::RawFd,
    deadline: crate::util::Deadline,
    allowance: std::time::Duration,
    bytes_per_sec: f64,
    too_slow: Rc<Cell<bool>>,
}

/// The log line of a session closed by [`Paced`].
const TOO_SLOW: &str =
    "client websocket does not read its answers (slower than limits.min_answer_bytes_per_sec): closed";

impl<W: ws::PartsWriter> ws::PartsWriter for Paced<W> {
    async fn write_parts(&mut self, parts: &[Bytes]) -> std::io::Result<()> {
        let (fd, allowance, rate) = (self.fd, self.allowance, self.bytes_per_sec);
        let limit = || {
            // What the socket holds includes what it took of this batch: the larger of the two.
            let n = parts.iter().map(Bytes::len).sum::<usize>();
            let n = n.max(crate::util::unsent_bytes(fd));
            allowance + std::time::Duration::from_secs_f64(n as f64 / rate)
        };
        match self
            .deadline
            .within_lazy(limit, self.inner.write_parts(parts))
            .await
        {
            // The socket's write timeout (`limits.idle_timeout_ms`) ran out before the pace
            // did (a batch behind megabytes the socket holds): as slow.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.too_slow.set(true);
                Err(e)
            }
            Ok(r) => r,
            Err(_) => {
                self.too_slow.set(true);
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, TOO_SLOW))
            }
        }
    }

    async fn close(&mut self) {
        self.inner.close().await
    }
}

/// Logs and counts (`fedbus_ws_bad_input_closed_total`) a session closed with `code` for what
/// the client sent; the code, for the close frame.
fn bad_input(shard: &Shard, code: u16, why: &str) -> Option<u16> {
    if let Some(i) = WS_BAD_INPUT_CODES.iter().position(|&c| c == code) {
        crate::metrics::ShardMetrics::inc(&shard.metrics.ws_bad_input_closed[i]);
    }
    if let Some(suppressed) = shard.log_gates.ws_closed.pass() {
        tracing::info!(
            shard = shard.index,
            code,
            suppressed,
            "client websocket closed: {why}"
        );
    }
    Some(code)
}

/// Refuses an upgrade with an HTTP error answer, then closes as every refusal does (a
/// lingering close); counted in `fedbus_requests_total` by its status, with its latency from
/// `start`, as an HTTP request's answer is.
/// Logs an upgrade refused for what the client sent (counted by status in [`refuse`]): at
/// debug, as an HTTP request refused from its head.
fn log_refusal(shard: &Shard, status: u16, code: &str, message: &str) {
    tracing::debug!(
        shard = shard.index,
        status,
        code,
        "/api/ws upgrade refused: {message}"
    );
}

async fn refuse<S: Stream>(
    shard: &Shard,
    stream: &mut S,
    start: Instant,
    status: u16,
    code: &str,
    message: &str,
) {
    let took = start.elapsed().as_micros() as u64;
    shard.metrics.request(status, took, 0, 0);
    let answer = handshake::error_response(status, code, message);
    if stream.write_parts(&[Bytes::from(answer)]).await.is_ok() {
        // As every refusal closes: what the client sent behind its head is read and
        // dropped, so that the answer is not reset away (and `close_notify` ends a TLS one).
        crate::api::http::lingering_close(stream, crate::api::http::LINGER).await;
    }
}

/// Runs the session's requests in flight until each answer is queued (each has its request
/// deadline) or the outbox closes: their answers go out before a close frame.
async fn finish_inflight<F: std::future::Future<Output = ()>>(
    inflight: &mut Unordered<F>,
    deadline: &mut crate::util::Deadline,
    session: &Session,
    out: &RefCell<ws::conn::WsOut>,
) {
    while session.inflight.get() > 0 && !out.borrow().is_closing() {
        let run = std::pin::pin!(inflight.run(|| session.answered_at.set(None)));
        let nap = std::pin::pin!(deadline.sleep(crate::health::POLL));
        let _ = futures_util::future::select(run, nap).await;
    }
}

/// What ended a session's wait.
enum Next<M> {
    Message(M),
    /// The outbox closed: the client does not read its answers.
    Overflow,
    /// The router drains.
    Drain,
}

struct Session {
    /// The bearer token of the upgrade: the credential of every request on the session (none:
    /// an anonymous session).
    token: Option<Box<[u8]>>,
    /// The page's origin when the upgrade was cross-origin: checked per request.
    origin: Option<Box<[u8]>>,
    cache: RefCell<VerifyCache>,
    /// The token's `exp` when this router verified it at the upgrade: a request after it (and
    /// its 5 s leeway) closes the session with 1008.
    exp: Option<u64>,
    inflight: Cell<usize>,
    /// When the requests answered in this pass over the requests in flight were answered:
    /// one clock read per pass, not per answer (`clock_gettime` was 4% of a shard's user
    /// samples at 8x8 under `perf record --all-user`). Cleared before each pass.
    answered_at: Cell<Option<Instant>>,
    /// When the last request in flight was answered (the session's start before any): the
    /// idle clock runs from there.
    idle_since: Cell<Instant>,
}

impl Session {
    /// The time of this pass's answers (read from the clock by the first of them).
    fn answered_at(&self) -> Instant {
        match self.answered_at.get() {
            Some(t) => t,
            None => {
                let t = Instant::now();
                self.answered_at.set(Some(t));
                t
            }
        }
    }
}

/// Answers request `id` (`n_in` payload bytes), refused before it was routed (draining, a body
/// over the limit, too many in flight, the memory budget), counted by its status as every
/// answer is (`fedbus_requests_total`), and logged at debug level as HTTP's refusals are (a
/// flood of refusals must not become a flood of lines at the default level; a budget refusal
/// is logged by `Shard::refuse_body` through its gate).
fn refuse_request(
    shard: &Shard,
    out: &RefCell<ws::WsOut>,
    id: u64,
    n_in: usize,
    a: &Answer,
    since: Instant,
) {
    let status = a.status();
    tracing::debug!(
        shard = shard.index,
        status,
        "/api/ws request refused before routing"
    );
    let body_len = send_answer(out, shard.index, id, a, None);
    let latency_us = since.elapsed().as_micros() as u64;
    shard.metrics.request(status, latency_us, n_in, body_len);
}

async fn answer(shard: &Rc<Shard>, sess: &Session, mut f: Frame, received: Instant) -> Answer {
    // Moved to the request, not cloned: no reference count taken and given back.
    let payload = std::mem::take(&mut f.payload);
    let Some(path) = f.get_str(tag::PATH) else {
        return Answer::error(400, "bad_request", "request frame without PATH");
    };
    let target = match parse_api_path(path) {
        Ok(p) => p,
        Err(e) => return Answer::error(e.http_status(), e.code(), format!("{e}: {path}")),
    };
    // The client's METHOD, parsed as an HTTP request's method (absent: POST); HEAD and
    // OPTIONS (no body, a preflight) have no meaning on a session.
    use super::http::Method;
    let parsed = |m: &[u8]| std::str::from_utf8(m).ok().and_then(Method::parse);
    let method = match f.get(tag::METHOD).map(parsed) {
        None => "POST",
        Some(Some(m)) if !matches!(m, Method::Head | Method::Options) => m.as_str(),
        Some(_) => {
            let allowed = "METHOD must be GET, POST, PUT, PATCH or DELETE";
            return Answer::error(405, "method_not_allowed", allowed);
        }
    };
    let req = Request {
        target,
        method,
        credential: sess.token.as_deref(),
        content_type: f.get(tag::CONTENT_TYPE),
        payload,
        ingress: Ingress::Websocket,
        origin: sess.origin.as_deref(),
        preflight: false,
        received,
    };
    routing::route(shard, &sess.cache, &req).await
}
