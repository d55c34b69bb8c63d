//! Hostile clients against a running router (issue 12, "hostile clients"): a stalled or
//! trickled request head, connections held on the external (peer) and admin listeners,
//! malformed framing and websocket upgrades, and one connection pipelining more bodies than
//! its share of the memory budget. Every router has one shard, so the well-behaved client
//! whose requests are answered during each attack is on the attacked shard. Each test prints
//! its numbers (`cargo test --release -p fedbus --test integration -- hostile_clients:: --nocapture`).

use bytes::{Bytes, BytesMut};
use fedbus_proto::{encode_frame, put_meta, tag, Frame, Kind};
use fedbus_router::ws::frame::{encode_head, opcode, parse_head, MAX_HEADER};
use fedbus_router::ws::handshake::{
    client_request, new_key, parse_client_response, ClientHandshake,
};
use fedbus_testkit::attack::rss_kib;
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";
/// The app of the fast task beside a slow one.
const OTHER: &str = "demo/other";

/// One request of a well-behaved client on a new connection: an echo of `app`, answered 200
/// by shard 0 (the only one). Returns how long it took.
fn normal(r: &Router, app: &str, tok: &str, i: u64) -> Duration {
    let started = Instant::now();
    let body = format!("normal {i}");
    let resp = r.request(&Req::post(&r.path(app, i)).token(tok).body(body.as_bytes()));
    assert_eq!(
        (resp.status, resp.body.as_slice()),
        (200, body.as_bytes()),
        "normal request {i}: {resp:?}"
    );
    assert_eq!(resp.header("fedbus-shard"), Some("0"), "{resp:?}");
    started.elapsed()
}

/// The api connection gauge.
fn api_conns(r: &Router) -> f64 {
    r.metrics().get("fedbus_connections{listener=\"api\"}")
}

/// Reads until EOF (or a reset) within `limit`; panics when the peer keeps the connection open.
fn read_to_eof(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read_retrying(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!(
                "not closed within {limit:?} ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Sends `raw` on a new api connection and reads the answer and then EOF: the router must
/// answer and close. Returns the status line and header block, and the body.
fn answered_and_closed(addr: SocketAddr, raw: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(raw).expect("write");
    let got = read_to_eof(&mut s, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {text:?}"));
    (head.to_string(), body.to_string())
}

// ---------------------------------------------------------------------------------------------
// A small blocking websocket client on fedbus's own handshake and frame helpers.

struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
    seed: u64,
}

impl Ws {
    /// Opens `/api/ws` with a bearer token; panics unless it is a 101.
    fn open(addr: SocketAddr, tok: &str) -> Ws {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
        let _ = s.set_nodelay(true);
        let key = new_key();
        s.write_all(client_request("127.0.0.1", "/api/ws", &key, Some(tok)).as_bytes())
            .expect("write upgrade");
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match parse_client_response(&buf, &key).expect("upgrade answer parses") {
                ClientHandshake::Incomplete => {}
                ClientHandshake::Accepted(n) => {
                    return Ws {
                        s,
                        buf: buf[n..].to_vec(),
                        seed: 0x9E37_79B9_7F4A_7C15,
                    }
                }
                ClientHandshake::Refused { status, body, .. } => {
                    panic!("upgrade refused: {status} {body}")
                }
            }
            let n = s.read_retrying(&mut chunk).expect("read upgrade answer");
            assert!(n > 0, "router closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A fedbus Request frame with `payload` as one masked binary message.
    fn request_bytes(&mut self, id: u64, path: &str, payload: &[u8]) -> Vec<u8> {
        let mut meta = BytesMut::new();
        put_meta(&mut meta, tag::PATH, path.as_bytes());
        let f = encode_frame(Kind::Request, 0, 0, 0, id, &meta, payload);
        let x = &mut self.seed;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let mask = (*x as u32).to_le_bytes();
        let mut h = [0u8; MAX_HEADER];
        let n = encode_head(opcode::BINARY, f.len(), Some(mask), &mut h);
        let mut v = Vec::with_capacity(n + f.len());
        v.extend_from_slice(&h[..n]);
        v.extend(f.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    fn send_request(&mut self, id: u64, path: &str, payload: &[u8]) {
        let b = self.request_bytes(id, path, payload);
        self.s.write_all(&b).expect("write request");
    }

    /// The next Response frame (the router never fragments nor masks); panics on anything else.
    fn read_response(&mut self) -> Frame {
        loop {
            if let Some(h) = parse_head(&self.buf).expect("frame head") {
                let total = h.header_len + h.payload_len as usize;
                if self.buf.len() >= total {
                    assert_eq!(h.opcode, opcode::BINARY, "expected an answer");
                    let p = Bytes::copy_from_slice(&self.buf[h.header_len..total]);
                    self.buf.drain(..total);
                    let f = Frame::decode(p).expect("a fedbus frame");
                    assert_eq!(f.header.kind, Kind::Response, "{f:?}");
                    return f;
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.s.read_retrying(&mut chunk).expect("read answer");
            assert!(n > 0, "router closed the session");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The HEADER lines of an answer frame, as `name: value`.
fn header_lines(f: &Frame) -> Vec<String> {
    f.meta_entries()
        .filter(|(t, _)| *t == tag::HEADER)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn status_of(f: &Frame) -> u64 {
    f.get_u64(tag::STATUS).expect("STATUS")
}

// ---------------------------------------------------------------------------------------------
// Deadlines.

/// Half a websocket upgrade head on `/api/ws`, then nothing: each stalled upgrade is cut at
/// `limits.handshake_timeout_ms` (5 s here, room for the attack on a loaded machine) from its
/// first byte with `408 request_timeout` and closed (counted as a 408), while an HTTP client
/// and a websocket session on the same shard are answered and RSS stays flat.
#[test]
fn a_stalled_websocket_upgrade_gets_408() {
    const STALLED: usize = 50;
    const LIMIT: Duration = Duration::from_secs(5);
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", LIMIT.as_millis())
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let before_408 = r.metrics().get("fedbus_requests_total{status=\"408\"}");
    let before = rss_kib(&r);
    let half = "GET /api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let started = Instant::now();
    let mut stalled: Vec<Conn> = (0..STALLED)
        .map(|_| {
            let mut c = r.conn();
            c.send(half.as_bytes());
            c
        })
        .collect();
    wait_for(Duration::from_secs(5), || {
        (api_conns(&r) >= STALLED as f64).then_some(())
    })
    .unwrap_or_else(|| panic!("stalled upgrades open: {}", api_conns(&r)));
    // During the attack: HTTP requests and a websocket session on the same shard.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        slowest = slowest.max(normal(&r, APP, &tok, i));
    }
    let mut ws = Ws::open(r.api, &tok);
    ws.send_request(7, &r.path(APP, 3), b"ws during");
    let f = ws.read_response();
    assert_eq!((status_of(&f), &f.payload[..]), (200, &b"ws during"[..]));
    // Still during: every stalled upgrade is still open.
    let open = api_conns(&r);
    let during = started.elapsed();
    assert!(
        during < LIMIT - Duration::from_millis(100),
        "the normal requests took {during:?}: the attack was over"
    );
    assert!(
        open >= (STALLED + 1) as f64,
        "stalled upgrades cut early: {open} open after {during:?}"
    );
    // Then each gets its 408 and the connection closes.
    let mut cut = Duration::ZERO;
    for (i, c) in stalled.iter_mut().enumerate() {
        c.set_read_timeout(LIMIT + Duration::from_secs(5));
        c.read_response()
            .unwrap_or_else(|e| panic!("stalled upgrade {i}: {e}"))
            .assert_error(408, "request_timeout");
        assert!(c.is_closed(), "stalled upgrade {i} left open after its 408");
        cut = started.elapsed();
    }
    assert!(
        cut >= LIMIT - Duration::from_millis(100) && cut < LIMIT + Duration::from_secs(5),
        "cut after {cut:?}"
    );
    let grown_kib = rss_kib(&r).saturating_sub(before);
    assert!(grown_kib < 20 * 1024, "RSS grew by {grown_kib} KiB");
    assert_eq!(
        r.metrics().get("fedbus_requests_total{status=\"408\"}") - before_408,
        STALLED as f64
    );
    assert!(r
        .log()
        .contains("request head not complete within limits.handshake_timeout_ms: 408"));
    println!(
        "stalled /api/ws upgrades: {STALLED} cut with 408 after {cut:?} (handshake_timeout_ms {}); \
         during the attack ({during:?}) 10 HTTP + 1 websocket requests answered (slowest HTTP {slowest:?}); \
         RSS grew {grown_kib} KiB",
        LIMIT.as_millis()
    );
}

/// Many request heads trickled one byte every 100 ms (each byte would reset an idle timer)
/// are all cut with 408 at `limits.handshake_timeout_ms` (3 s here) from their first byte,
/// while normal requests on the same shard are answered throughout (for 1 s at least, until 5
/// were answered, at most 2 s: a second before the deadline for a loaded machine).
#[test]
fn trickled_request_heads_get_408_while_others_are_answered() {
    const TRICKLERS: usize = 20;
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 3000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 1\r\n\r\nx",
        r.path(APP, 1)
    );
    let started = Instant::now();
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|_| {
            let (addr, head) = (r.api, head.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                let t0 = Instant::now();
                let mut got = Vec::new();
                for b in head.bytes() {
                    if s.write_all(&[b]).is_err() {
                        break;
                    }
                    let mut chunk = [0u8; 1024];
                    match s.read_retrying(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                        Err(e) if is_timeout(&e) => {}
                        Err(_) => break,
                    }
                    if !got.is_empty() || t0.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                }
                (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
            })
        })
        .collect();
    wait_for(Duration::from_secs(5), || {
        (api_conns(&r) >= TRICKLERS as f64).then_some(())
    })
    .unwrap_or_else(|| panic!("tricklers connected: {}", api_conns(&r)));
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(1000)
        || (answered < 5 && started.elapsed() < Duration::from_millis(2000))
    {
        slowest = slowest.max(normal(&r, APP, &tok, answered));
        answered += 1;
    }
    let still_open = api_conns(&r);
    let during = started.elapsed();
    assert!(
        still_open >= TRICKLERS as f64,
        "tricklers cut before the deadline: {still_open} open after {during:?}"
    );
    assert!(
        answered >= 5,
        "only {answered} normal requests in {during:?}"
    );
    let mut longest = Duration::ZERO;
    for t in tricklers {
        let (text, took) = t.join().expect("trickler");
        assert!(
            text.starts_with("HTTP/1.1 408") && text.contains("request_timeout"),
            "got {text:?} after {took:?}"
        );
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(8),
            "{took:?}"
        );
        longest = longest.max(took);
    }
    println!(
        "trickled heads: {TRICKLERS} cut with 408 within {longest:?} (handshake_timeout_ms 3000); \
         {answered} normal requests answered during the attack, in {during:?} (slowest {slowest:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Listener limits.

/// The external (peer) listener has its own per-shard connection limit
/// (`limits.max_link_connections_per_shard`): connections that never finish a handshake fill
/// it, and the next one takes the slot of the oldest of them, which is closed long before its
/// handshake deadline (counted, logged); clients are served meanwhile, and a peer upgrade
/// that comes while silent connections fill the listener is answered at once (without a
/// token: its 401).
#[test]
fn the_external_listener_has_a_connection_limit() {
    // Another cluster for the federation: a keyring of its own, routers that are never up.
    let far = TempDir::new("far-cluster");
    let far_keys = far.path().join("keys");
    keys_init(far.path(), &far_keys, &[APP]);
    let fed = format!(
        "[federation]\nentry_point = \"test.local\"\n[[federation.clusters]]\nregion = \"local\"\ncluster = \"far\"\nrouters = [\"127.0.0.1:1\"]\nkeys = {:?}",
        far_keys.to_str().expect("utf-8")
    );
    let r = Router::new()
        .shards(1)
        .dev()
        .listen("external", "\"127.0.0.1:0\"")
        .limit("max_link_connections_per_shard", 2)
        .limit("handshake_timeout_ms", 20000)
        .tail(&fed)
        .start();
    let external = r
        .external
        .expect("an external listener with another cluster");
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let gauge = |r: &Router| r.metrics().get("fedbus_connections{listener=\"external\"}");
    let evicted = |r: &Router| {
        r.metrics()
            .get("fedbus_link_handshakes_evicted_total{listener=\"external\"}")
    };
    let started = Instant::now();
    let mut holders: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(external).expect("connect external"))
        .collect();
    wait_for(Duration::from_secs(5), || (gauge(&r) >= 2.0).then_some(()))
        .unwrap_or_else(|| panic!("external connections: {}", gauge(&r)));
    let refused_before = r.metrics().get("fedbus_connections_refused_total");
    let mut over = TcpStream::connect(external).expect("connect external");
    let got = read_to_eof(&mut holders[0], Duration::from_secs(5));
    assert!(got.is_empty(), "an answer instead of a close");
    let cut_at = started.elapsed();
    assert!(
        !closed_within(&mut over, Duration::from_millis(300)),
        "the new connection was closed instead of the oldest"
    );
    assert_eq!(evicted(&r), 1.0);
    assert_eq!(
        r.metrics().get("fedbus_connections_refused_total"),
        refused_before
    );
    assert!(
        r.log()
            .contains("closed the oldest connection still in its handshake"),
        "{}",
        r.log()
    );
    // Clients on the same shard are served meanwhile.
    for i in 0..5 {
        normal(&r, APP, &tok, i);
    }
    // A peer upgrade is answered now, not after the silent ones' 20 s deadline.
    let t = Instant::now();
    let (_s, status, head, _) = fed::peer_upgrade(external, None);
    assert_eq!(status, 401, "{head}");
    assert_eq!(r.metrics().get("fedbus_peer_token_refused_total"), 1.0);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        t.elapsed()
    );
    assert!(closed_within(&mut holders[1], Duration::from_secs(5)));
    assert_eq!(evicted(&r), 2.0);
    println!(
        "external listener at max_link_connections_per_shard 2: the oldest silent connection closed for a third after {cut_at:?} \
         (handshake_timeout_ms 20000); a peer upgrade then was answered {status} in {:?}",
        t.elapsed()
    );
}

/// Connects to the admin listener and sends half a request head. `Some` when the router holds
/// it (no answer, no close within 300 ms), `None` when it was closed at accept.
fn admin_hold(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut b = [0u8; 64];
    match s.read_retrying(&mut b) {
        Err(e) if is_timeout(&e) => Some(s),
        Ok(0) | Err(_) => None,
        Ok(n) => panic!(
            "an answer to half a head: {:?}",
            String::from_utf8_lossy(&b[..n])
        ),
    }
}

/// A scrape of `/metrics`: `None` when the connection was closed at accept (every slot busy).
fn try_scrape(addr: SocketAddr) -> Option<Metrics> {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let got = read_to_eof(&mut s, Duration::from_secs(5));
    if got.is_empty() {
        return None;
    }
    let text = String::from_utf8(got).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("answer head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Some(Metrics::parse(body))
}

/// `listen.admin_max_connections`: slow clients (half a request head) hold admin slots; a
/// connection over the limit takes the slot of the oldest one still waiting for its head,
/// which is closed at once (counted in `fedbus_admin_connections_evicted_total`, logged at most
/// once a second). So a health probe is answered however fast idle connections are opened;
/// before, it was closed at accept while they held every slot, and again each time they were
/// reopened within the 2 s head deadline. The api is served throughout.
#[test]
fn idle_admin_connections_give_their_slots_to_newer_ones() {
    let r = Router::new()
        .shards(1)
        .listen("admin_max_connections", 2)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let started = Instant::now();
    // Idle clients kept open (the router closes them: evicted, or at their 2 s deadline).
    let mut holders = Vec::new();
    for round in 0..12 {
        // Two idle clients take both slots, each the oldest idle one's when none is free
        // (before: closed at accept while the earlier ones held the slots).
        for _ in 0..2 {
            holders.push(admin_hold(r.admin).unwrap_or_else(|| {
                panic!(
                    "round {round}: an idle client closed at accept\n{}",
                    r.log()
                )
            }));
        }
        // Both slots held by idle clients: a probe is answered all the same.
        let probe = try_scrape(r.admin)
            .unwrap_or_else(|| panic!("round {round}: a probe closed at accept\n{}", r.log()));
        assert_eq!(probe.get("fedbus_admin_connections_refused_total"), 0.0);
    }
    // The first idle client was closed by the router (evicted, or at its deadline).
    read_to_eof(&mut holders[0], Duration::from_secs(5));
    // The api listener is apart.
    for i in 0..5 {
        normal(&r, APP, &tok, i);
    }
    let m = r.metrics();
    assert_eq!(m.get("fedbus_admin_connections_refused_total"), 0.0);
    let evicted = m.get("fedbus_admin_connections_evicted_total");
    assert!(evicted >= 12.0, "{evicted}");
    let lines = r
        .log()
        .matches("admin connection closed while waiting for its request head")
        .count();
    let secs = started.elapsed().as_secs() as usize;
    assert!(
        (1..=secs + 2).contains(&lines),
        "{lines} eviction log lines in {secs} s for {evicted} evictions"
    );
    println!(
        "admin listener at admin_max_connections 2 held by idle clients: 12 probes answered in {:?}, {evicted} evictions, {lines} log lines",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Framing and upgrades (RFC 9112, RFC 6455).

/// RFC 9112 6.3: a request with both `Content-Length` and `Transfer-Encoding` is `400
/// bad_request` and the connection closes: a request smuggled behind it is never answered.
#[test]
fn content_length_with_transfer_encoding_is_400_and_closed() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let path = r.path(APP, 2);
    let smuggled = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        5 + smuggled.len()
    );
    let (head, body) = answered_and_closed(r.api, raw.as_bytes());
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let j: serde_json::Value = serde_json::from_str(&body).expect("one JSON body, nothing after");
    assert_eq!(j["error"], "bad_request", "{body}");
    assert!(
        j["message"]
            .as_str()
            .is_some_and(|m| m.contains("Transfer-Encoding")),
        "{body}"
    );
    normal(&r, APP, &tok, 3);
    println!(
        "Content-Length + Transfer-Encoding: {}; closed, the smuggled request unanswered",
        head.lines().next().unwrap_or_default()
    );
}

/// RFC 9110 5.5: control bytes (0x00, 0x04, 0x0b, 0x7f) in a client's header value are
/// refused by the head parser: `400 bad_request`, counted as a 400, and the connection closes
/// (a request pipelined behind it is never answered). Tab is allowed, and a clean request on a
/// new connection is answered.
#[test]
fn control_bytes_in_a_client_header_value_are_400_and_closed() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let path = r.path(APP, 2);
    let before = r.metrics().get("fedbus_requests_total{status=\"400\"}");
    let next = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    for ctl in [0x00u8, 0x04, 0x0b, 0x7f] {
        let mut raw =
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nX-Bad: a")
                .into_bytes();
        raw.push(ctl);
        raw.extend_from_slice(b"b\r\nContent-Length: 1\r\n\r\nx");
        raw.extend_from_slice(next.as_bytes());
        let (head, body) = answered_and_closed(r.api, &raw);
        assert!(head.starts_with("HTTP/1.1 400 "), "{ctl:#04x}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{ctl:#04x}: {head}"
        );
        let j: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{ctl:#04x}: one JSON body, nothing after ({e}): {body}"));
        assert_eq!(j["error"], "bad_request", "{ctl:#04x}: {body}");
        println!(
            "header value with {ctl:#04x}: {}, closed, the pipelined request unanswered",
            head.lines().next().unwrap_or_default()
        );
    }
    assert_eq!(
        r.metrics().get("fedbus_requests_total{status=\"400\"}") - before,
        4.0
    );
    let tab = r.request(
        &Req::post(&path)
            .token(&tok)
            .header("x-tab", "a\tb")
            .body(b"tab"),
    );
    assert_eq!(
        (tab.status, tab.body.as_slice()),
        (200, &b"tab"[..]),
        "{tab:?}"
    );
    normal(&r, APP, &tok, 3);
}

/// The `/api/ws` upgrade checks of RFC 6455 4.2.1/4.2.2 on a running router: no `Host` and an
/// HTTP/1.0 upgrade are `400 bad_upgrade`, a `Sec-WebSocket-Version` other than 13 is `426`
/// with `Sec-WebSocket-Version: 13`; each answer closes the connection, and a correct upgrade
/// still gets its 101.
#[test]
fn bad_websocket_upgrades_are_refused() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let good = format!(
        "GET /api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok}\r\n\r\n"
    );
    let cases = [
        (
            "no Host",
            good.replace("Host: x\r\n", ""),
            400,
            "bad_upgrade",
        ),
        (
            "HTTP/1.0",
            good.replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "bad_upgrade",
        ),
        (
            "version 8",
            good.replace("Version: 13", "Version: 8"),
            426,
            "unsupported_version",
        ),
    ];
    for (what, raw, status, code) in cases {
        let (head, body) = answered_and_closed(r.api, raw.as_bytes());
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {head}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert_eq!(j["error"], code, "{what}: {body}");
        let version = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Version:"))
            .map(str::trim);
        assert_eq!(version, (status == 426).then_some("13"), "{what}: {head}");
        println!(
            "/api/ws upgrade, {what}: {} {code}{}, closed",
            head.lines().next().unwrap_or_default(),
            version.map_or(String::new(), |v| format!(", Sec-WebSocket-Version: {v}"))
        );
    }
    let mut ws = Ws::open(r.api, &tok);
    ws.send_request(1, &r.path(APP, 1), b"fine");
    assert_eq!(status_of(&ws.read_response()), 200);
}

// ---------------------------------------------------------------------------------------------
// The memory budget per connection.

/// A minimal HTTP answer reader on a raw stream: status, headers (lowercase), body.
fn read_answer(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(u16, HashMap<String, String>, Vec<u8>)> {
    let fill = |s: &mut TcpStream, buf: &mut Vec<u8>| {
        let mut chunk = [0u8; 64 * 1024];
        match s.read_retrying(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read answer: {e}"),
        }
    };
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(s, buf) {
            assert!(buf.is_empty(), "closed inside an answer head");
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    buf.drain(..end);
    while buf.len() < len {
        assert!(fill(s, buf), "closed inside an answer body");
    }
    let body: Vec<u8> = buf.drain(..len).collect();
    Some((status, headers, body))
}

/// One HTTP connection pipelines 256 requests of 8 MiB (2 GiB) to a slow task: the bodies it
/// holds are bounded by its share of the budget (`limits.max_connection_body_bytes`, 16 MiB
/// by default), the first body over the share gets `503 overloaded` with `Retry-After: 1`
/// from its head and the connection closes after the answers before it. RSS grows by about
/// the share, not 2 GiB; other connections on the same shard are answered meanwhile.
#[test]
fn pipelined_uploads_are_bounded_by_the_connection_share() {
    const BODY: usize = 8 << 20;
    let r = Router::new().shards(1).start();
    // The slow task holds the two bodies 5 s: the normal requests are answered meanwhile,
    // even on a loaded machine.
    let _slow = r.task().delay_ms(5000).start();
    let _fast = r.task().app(OTHER).partitions("0-3").start();
    let tok = r.token(APP, "alice");
    let other = r.token(OTHER, "bob");
    let before = rss_kib(&r);
    let held = || r.metrics().get("fedbus_body_bytes_held");
    let refused_before = r.metrics().get("fedbus_overload_refused_total");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: {BODY}\r\n\r\n",
        r.path(APP, 4)
    );
    let mut s = TcpStream::connect(r.api).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let body = vec![b'p'; BODY];
        let mut sent = 0usize;
        for _ in 0..256 {
            if w.write_all(head.as_bytes()).is_err() || w.write_all(&body).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    // The connection holds its share: two bodies of 8 MiB.
    wait_for(Duration::from_secs(10), || {
        (held() >= (2 * BODY) as f64).then_some(())
    })
    .unwrap_or_else(|| panic!("body bytes held: {}", held()));
    // During the attack: other connections on the same shard are answered.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        slowest = slowest.max(normal(&r, OTHER, &other, i));
    }
    let peak_held = held();
    assert!(
        peak_held >= (2 * BODY) as f64,
        "the attack was over before the normal requests: {peak_held} bytes held"
    );
    let during_kib = rss_kib(&r).saturating_sub(before);
    // The attacker's answers: the two bodies it holds, then the 503 that closes.
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    while let Some(a) = read_answer(&mut s, &mut buf) {
        answers.push(a);
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(
        statuses,
        [200, 200, 503],
        "answers on the flooding connection"
    );
    for (st, _, body) in &answers[..2] {
        assert_eq!((*st, body.len()), (200, BODY));
    }
    let (_, h, body) = &answers[2];
    let j: serde_json::Value = serde_json::from_slice(body).expect("JSON error");
    assert_eq!(j["error"], "overloaded", "{j}");
    assert_eq!(h.get("retry-after").map(String::as_str), Some("1"), "{h:?}");
    assert_eq!(
        h.get("connection").map(String::as_str),
        Some("close"),
        "{h:?}"
    );
    let sent = writer.join().expect("writer");
    assert!(sent < 256, "the router read all {sent} bodies");
    wait_for(Duration::from_secs(5), || (held() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("{} body bytes still held", held()));
    assert_eq!(
        r.metrics().get("fedbus_overload_refused_total"),
        refused_before + 1.0
    );
    let grown_kib = rss_kib(&r).saturating_sub(before);
    assert!(
        during_kib < 64 * 1024 && grown_kib < 64 * 1024,
        "RSS grew by {during_kib} KiB during, {grown_kib} KiB after"
    );
    println!(
        "pipelined 256 x 8 MiB on one connection: {sent} written whole before the close; held at most {:.1} MiB \
         (max_connection_body_bytes 16 MiB); answers {statuses:?}; RSS +{} MiB during, +{} MiB after; \
         10 normal requests answered during (slowest {slowest:?})",
        peak_held / 1048576.0,
        during_kib / 1024,
        grown_kib / 1024
    );
}

/// An `/api/ws` session sending request payloads past its connection's share of the body
/// budget gets a `503 overloaded` answer (with `retry-after: 1`) for each request over it, at
/// once, while the requests within the share are answered later by the slow task; the session
/// stays open, and another session on the same shard is answered meanwhile.
#[test]
fn websocket_payloads_over_the_connection_share_get_503() {
    const PAYLOAD: usize = 7 << 20;
    let r = Router::new().shards(1).start();
    // 5 s: the refusals and the normal requests fit before the slow answers, even on a
    // loaded machine.
    let _slow = r.task().delay_ms(5000).start();
    let _fast = r.task().app(OTHER).partitions("0-3").start();
    let tok = r.token(APP, "alice");
    let other = r.token(OTHER, "bob");
    let before = rss_kib(&r);
    let refused_before = r.metrics().get("fedbus_overload_refused_total");
    let mut ws = Ws::open(r.api, &tok);
    let payload = vec![b'w'; PAYLOAD];
    let path = r.path(APP, 6);
    let started = Instant::now();
    // 2 x 7 MiB fit the 16 MiB share; the next 4 do not.
    for id in 1..=6u64 {
        ws.send_request(id, &path, &payload);
    }
    let mut refused = Vec::new();
    for _ in 0..4 {
        let f = ws.read_response();
        assert_eq!(status_of(&f), 503, "{f:?}");
        assert_eq!(f.get_str(tag::ERROR), Some("overloaded"));
        assert!(
            header_lines(&f).contains(&"retry-after: 1".to_string()),
            "{:?}",
            header_lines(&f)
        );
        refused.push(f.header.request_id);
    }
    let refused_after = started.elapsed();
    refused.sort_unstable();
    assert_eq!(refused, [3, 4, 5, 6]);
    assert!(
        refused_after < Duration::from_millis(4500),
        "the refusals waited for the slow answers: {refused_after:?}"
    );
    // Meanwhile: another session and HTTP clients on the same shard.
    let mut normal_ws = Ws::open(r.api, &other);
    for id in 0..5u64 {
        normal_ws.send_request(id, &r.path(OTHER, id), b"during");
        let f = normal_ws.read_response();
        assert_eq!((status_of(&f), &f.payload[..]), (200, &b"during"[..]));
    }
    normal(&r, OTHER, &other, 1);
    let held = r.metrics().get("fedbus_body_bytes_held");
    assert!(
        held >= (2 * PAYLOAD) as f64,
        "the slow requests were answered before the normal ones: {held} bytes held"
    );
    let during_kib = rss_kib(&r).saturating_sub(before);
    // The slow answers come 5 s after their requests: nothing arrives on the session until then.
    ws.s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut ok = Vec::new();
    for _ in 0..2 {
        let f = ws.read_response();
        assert_eq!((status_of(&f), f.payload.len()), (200, PAYLOAD));
        ok.push(f.header.request_id);
    }
    ok.sort_unstable();
    assert_eq!(ok, [1, 2]);
    // The share is back: the session goes on.
    ws.send_request(7, &path, b"after");
    let f = ws.read_response();
    assert_eq!((status_of(&f), &f.payload[..]), (200, &b"after"[..]));
    assert_eq!(
        r.metrics().get("fedbus_overload_refused_total"),
        refused_before + 4.0
    );
    assert!(during_kib < 96 * 1024, "RSS grew by {during_kib} KiB");
    println!(
        "/api/ws 6 x 7 MiB in flight: ids {refused:?} refused 503 after {refused_after:?}, ids {ok:?} answered 200; \
         RSS +{} MiB during; 5 websocket + 1 HTTP normal requests answered during",
        during_kib / 1024
    );
}

/// One connection pipelining requests the router answers by itself (`GET /`: 404), as fast as
/// it can write them, while it reads every answer: each read of the router then comes back
/// full and each write goes out at once, so the connection never waits on its socket. It must
/// still yield the shard (glommio's time slice): a well-behaved client on the same shard is
/// answered meanwhile. Before, the connection's task never returned and the shard served
/// nothing else for as long as the flood lasted.
#[test]
fn a_pipelining_flood_does_not_hold_the_shard() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    normal(&r, APP, &tok, 0);
    let flood = TcpStream::connect(r.api).expect("connect");
    let _ = flood.set_nodelay(true);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // A token whose signature does not verify (its last character changed).
    let mut forged = r.token(APP, "mallory");
    let last = if forged.ends_with('A') { "B" } else { "A" };
    forged.replace_range(forged.len() - 1.., last);
    let path = r.path(APP, 1);
    let writer = {
        let mut s = flood.try_clone().expect("clone");
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Each request costs the router a signature check (401 bad_signature), so it
            // parses slower than this thread writes: its reads come back full, and its small
            // answers never fill the socket.
            let one = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {forged}\r\nContent-Length: 0\r\n\r\n"
            );
            let burst = one.repeat(256).into_bytes();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if s.write_all(&burst).is_err() {
                    break;
                }
            }
        })
    };
    let reader = {
        let mut s = flood.try_clone().expect("clone");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let (stop, answered) = (stop.clone(), answered.clone());
        std::thread::spawn(move || {
            let mut chunk = vec![0u8; 256 * 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        answered.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        })
    };
    // The flood is under way: answers are coming back.
    wait_for(Duration::from_secs(5), || {
        (answered.load(std::sync::atomic::Ordering::Relaxed) > 1 << 20).then_some(())
    })
    .expect("the flood is answered");
    let mut worst = Duration::ZERO;
    for i in 1..=10 {
        // Each `normal` has the client's read timeout: a shard held by the flood fails it.
        worst = worst.max(normal(&r, APP, &tok, i));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded = answered.load(std::sync::atomic::Ordering::Relaxed);
    let _ = flood.shutdown(std::net::Shutdown::Both);
    writer.join().expect("writer");
    reader.join().expect("reader");
    eprintln!("pipelining flood: {flooded} answer bytes; slowest normal request {worst:?}");
}

/// Answers that wait on a connection behind a slower one are charged to the memory budget as
/// queued answers until they are written: here a slow request, then 8 requests of 200 KiB to
/// a fast echo pipelined behind it; while the slow one is pending the 8 answers (1.6 MB) are
/// counted in `fedbus_outbox_bytes_held`, then all 9 go out in order and the bytes come back.
/// Before, a request's charge ended when its answer was made, so a client could park up to
/// `limits.max_inflight_per_connection` answers of any size behind a slow request, uncharged.
#[test]
fn answers_waiting_behind_a_slow_one_stay_charged() {
    const BODY: usize = 200 * 1024;
    let r = Router::new().shards(1).start();
    // Slow, but well inside limits.request_timeout_ms (10 s).
    let _slow = r.task().delay_ms(6_000).start();
    let _fast = r.task().app(OTHER).partitions("0-3").start();
    let (tok, other) = (r.token(APP, "alice"), r.token(OTHER, "bob"));
    normal(&r, OTHER, &other, 0);
    let held = || r.metrics().get("fedbus_outbox_bytes_held");
    let mut wire = Req::post(&r.path(APP, 4)).token(&tok).body(b"slow").bytes();
    for i in 0..8 {
        let body = vec![b'0' + i as u8; BODY];
        wire.extend(
            Req::post(&r.path(OTHER, i % 4))
                .token(&other)
                .body(&body)
                .bytes(),
        );
    }
    let mut s = TcpStream::connect(r.api).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(&wire).expect("write");
    // The 8 answers are held while the slow one is pending (nothing else is being written:
    // an answer's bytes come back when it leaves its slot to be written).
    wait_for(Duration::from_secs(5), || {
        (held() >= (8 * BODY) as f64).then_some(())
    })
    .unwrap_or_else(|| panic!("answer bytes held {} (want at least {})", held(), 8 * BODY));
    let mut buf = Vec::new();
    let slow = read_answer(&mut s, &mut buf).expect("the slow answer");
    assert_eq!((slow.0, slow.2.as_slice()), (200, &b"slow"[..]));
    for i in 0..8u8 {
        let a = read_answer(&mut s, &mut buf).expect("an echo");
        assert_eq!(a.0, 200, "answer {i}");
        assert!(
            a.2.len() == BODY && a.2.iter().all(|&b| b == b'0' + i),
            "answer {i}"
        );
    }
    wait_for(Duration::from_secs(5), || (held() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("{} bytes still held after the answers", held()));
}

/// A router with one shard and a 512 KiB answer share per connection.
fn share_router() -> Router {
    Router::new()
        .shards(1)
        .limit("max_connection_outbox_bytes", 512 * 1024)
        .start()
}

/// The wire bytes of `first` followed by 8 requests of 200 KiB to the other app's task
/// (`OTHER`, wsids 0-3).
fn first_then_eight_behind(r: &Router, first: Vec<u8>) -> Vec<u8> {
    let other = r.token(OTHER, "bob");
    let mut wire = first;
    for i in 0..8 {
        let body = vec![b'0' + i as u8; 200 * 1024];
        wire.extend(
            Req::post(&r.path(OTHER, i % 4))
                .token(&other)
                .body(&body)
                .bytes(),
        );
    }
    wire
}

/// After a connection closed over its answer share: the close was logged and counted once,
/// and every answer byte went back to the budget.
fn closed_over_the_share(r: &Router) {
    let metric = |m: &str| r.metrics().get(m);
    assert_eq!(metric("fedbus_slow_reader_closed_total"), 1.0);
    assert!(
        r.log().contains("over limits.max_connection_outbox_bytes"),
        "no log line for the close"
    );
    wait_for(Duration::from_secs(5), || {
        (metric("fedbus_outbox_bytes_held") == 0.0).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{} answer bytes still held",
            metric("fedbus_outbox_bytes_held")
        )
    });
}

/// An HTTP connection's answers waiting to be written are held to its share
/// (`limits.max_connection_outbox_bytes`, here 512 KiB), as an `/api/ws` session's outbox is:
/// 8 answers of 200 KiB pile up behind a slow request; once the connection holds more than its
/// share and another answer comes, it is closed as a slow reader (counted, logged), before the
/// slow answer, and the held bytes go back to the budget. Before, a connection held every
/// answer behind the slow one: up to `limits.max_inflight_per_connection` answers of up to the
/// task link's message bound each (2 GiB with the defaults).
#[test]
fn answers_piling_up_behind_a_slow_one_past_the_share_close_the_connection() {
    let r = share_router();
    let _slow = r.task().delay_ms(6_000).start();
    let _fast = r.task().app(OTHER).partitions("0-3").start();
    let (tok, other) = (r.token(APP, "alice"), r.token(OTHER, "bob"));
    normal(&r, OTHER, &other, 0);
    let slow = Req::post(&r.path(APP, 4)).token(&tok).body(b"slow").bytes();
    let mut s = TcpStream::connect(r.api).expect("connect");
    s.write_all(&first_then_eight_behind(&r, slow))
        .expect("write");
    // Closed before the slow answer (6 s away) could be written: not one byte comes.
    let got = read_to_eof(&mut s, Duration::from_secs(5));
    assert!(got.is_empty(), "{} bytes came before the close", got.len());
    closed_over_the_share(&r);
    normal(&r, OTHER, &other, 1);
}

/// The same share while a batch is being written to a client that does not read: a 7 MB
/// answer (more than loopback's socket buffers take) is being written when 8 answers of 200
/// KiB come behind it; the connection holds more than its share, so it is closed as a slow
/// reader, well before `limits.min_answer_bytes_per_sec` (1 KiB/s: 2 hours for the batch)
/// would close it.
#[test]
fn answers_coming_while_a_client_does_not_read_past_the_share_close_the_connection() {
    let r = share_router();
    // The large answer comes after 2 s, the others after 4 s: every request is read (8.6 MB
    // over loopback) before the large answer's write stops reading.
    let _first = r.task().delay_ms(2_000).start();
    let _behind = r
        .task()
        .app(OTHER)
        .partitions("0-3")
        .delay_ms(4_000)
        .start();
    let tok = r.token(APP, "alice");
    normal(&r, APP, &tok, 0);
    let large = vec![b'L'; 7 * 1024 * 1024];
    let first = Req::post(&r.path(APP, 4)).token(&tok).body(&large).bytes();
    let mut s = TcpStream::connect(r.api).expect("connect");
    s.write_all(&first_then_eight_behind(&r, first))
        .expect("write");
    wait_for(Duration::from_secs(20), || {
        (r.metrics().get("fedbus_slow_reader_closed_total") == 1.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the connection was not closed as a slow reader"));
    let got = read_to_eof(&mut s, Duration::from_secs(5));
    assert!(
        got.len() < large.len(),
        "the whole large answer came ({} bytes)",
        got.len()
    );
    closed_over_the_share(&r);
    normal(&r, APP, &tok, 1);
}

/// A drain serves the `/api/ws` message that was arriving when it began, then ends the session
/// with 1001: also when that message ends by being dropped over the session's share of the body
/// budget (answered `503 overloaded`). Before, the drain went on waiting for the dropped
/// message, and the session stayed open until the drain closed it as idle
/// (`readiness.drain_idle_close_ms`, 20 s here).
#[test]
fn a_drain_does_not_wait_for_a_websocket_message_dropped_over_the_share() {
    let mut r = Router::new()
        .shards(1)
        .limit("max_body_bytes", 256 * 1024)
        .limit("max_connection_body_bytes", 100 * 1024)
        .tail("[readiness]\ndrain_timeout_ms = 30000\ndrain_idle_close_ms = 20000")
        .start();
    let _echo = r.task().start();
    let tok = r.token(APP, "alice");
    let mut ws = Ws::open(r.api, &tok);
    let held = || r.metrics().get("fedbus_body_bytes_held");
    // A 120 KiB message in two fragments: the first (64 KiB) is charged as it arrives, the
    // second would take the message over the 100 KiB share.
    let parts = fragments(5, &r.path(APP, 5), &vec![b'd'; 120 * 1024], 64 * 1024);
    assert_eq!(parts.len(), 2);
    ws.s.write_all(&parts[0]).expect("first fragment");
    wait_for(Duration::from_secs(5), || {
        (held() >= 64.0 * 1024.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the first fragment is not charged ({} held)", held()));
    r.sigterm();
    // The shard has begun its drain (its listeners close when the sessions are told).
    wait_for(Duration::from_secs(5), || {
        r.log().contains("draining: listener closed").then_some(())
    })
    .expect("the shard drains");
    ws.s.write_all(&parts[1]).expect("second fragment");
    let f = ws.read_response();
    assert_eq!(
        (f.header.request_id, status_of(&f)),
        (5, 503),
        "the dropped message is answered"
    );
    assert_eq!(read_close_code(&mut ws), Some(1001));
    let exit = r.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

/// Reads `ws` until the router's close frame; its code, or None when the socket ends (or
/// stays silent for the read timeout) without one. Answers before it are skipped.
fn read_close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        if let Some(h) = parse_head(&ws.buf).expect("frame head") {
            let total = h.header_len + h.payload_len as usize;
            if ws.buf.len() >= total {
                let p = ws.buf[h.header_len..total].to_vec();
                ws.buf.drain(..total);
                if h.opcode == opcode::CLOSE {
                    return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                }
                continue;
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match ws.s.read_retrying(&mut chunk) {
            Ok(n) if n > 0 => ws.buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A fedbus Request frame for `path` as masked websocket fragments of `size` bytes each.
fn fragments(id: u64, path: &str, payload: &[u8], size: usize) -> Vec<Vec<u8>> {
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::PATH, path.as_bytes());
    let f = encode_frame(Kind::Request, 0, 0, 0, id, &meta, payload);
    let chunks: Vec<&[u8]> = f.chunks(size).collect();
    let mask = [7u8, 1, 2, 3];
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let op = if i == 0 {
                opcode::BINARY
            } else {
                opcode::CONTINUATION
            };
            let mut h = [0u8; MAX_HEADER];
            let n = encode_head(op, c.len(), Some(mask), &mut h);
            if i + 1 < chunks.len() {
                h[0] &= 0x7f; // not the last fragment
            }
            let mut v = h[..n].to_vec();
            v.extend(c.iter().enumerate().map(|(j, b)| b ^ mask[j % 4]));
            v
        })
        .collect()
}

/// An `/api/ws` message trickled in pieces is held to the slowest pace of an HTTP body
/// (TUNING.md, `limits.min_body_bytes_per_sec`): whole within `handshake_timeout_ms` + its
/// length / `min_body_bytes_per_sec`, or the session closes 1008, logged and counted in
/// `fedbus_slow_messages_closed_total`, at that deadline (well before the idle timeout). A
/// large message sent in pieces at a normal pace, one sent as whole fragments (their length
/// counts), and another session meanwhile, are served. Before, each byte counted as activity:
/// one byte every 300 ms kept the session (and its share of the body budget) open for as long
/// as the client liked.
#[test]
fn a_trickled_websocket_message_is_closed_1008() {
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 1000)
        .limit("idle_timeout_ms", 10_000)
        .start();
    let _echo = r.task().start();
    let tok = r.token(APP, "alice");
    let mut ws = Ws::open(r.api, &tok);
    // 64 KiB as 32 whole fragments 50 ms apart (1.6 s): within 1 s + 64 s, counting the
    // fragments read, not only the frame head being read.
    let big = vec![b'f'; 64 * 1024];
    for piece in fragments(9, &r.path(APP, 9), &big, 2048 + 1) {
        ws.s.write_all(&piece).expect("write a fragment");
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = ws.read_response();
    assert_eq!((status_of(&f), f.payload.len()), (200, big.len()));
    // 64 KiB in 8 pieces 100 ms apart: far within 1 s + 64 s.
    let big = vec![b'b'; 64 * 1024];
    let bytes = ws.request_bytes(1, &r.path(APP, 1), &big);
    for piece in bytes.chunks(bytes.len() / 8 + 1) {
        ws.s.write_all(piece).expect("write a piece");
        std::thread::sleep(Duration::from_millis(100));
    }
    let f = ws.read_response();
    assert_eq!((status_of(&f), f.payload.len()), (200, big.len()));
    // 2 KiB, one byte every 300 ms after the first 64: due within 1 s + 2 s.
    let slow = ws.request_bytes(2, &r.path(APP, 2), &[b's'; 2048]);
    ws.s.write_all(&slow[..64]).expect("write the head");
    let started = Instant::now();
    let mut sent = 64;
    ws.s.set_nonblocking(true).expect("nonblocking");
    let mut other = Ws::open(r.api, &tok);
    let mut closed = false;
    while sent < slow.len() && started.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(300));
        if ws.s.write_all(&slow[sent..sent + 1]).is_err() {
            closed = true;
            break;
        }
        sent += 1;
        // The other session is served meanwhile.
        other.send_request(sent as u64, &r.path(APP, 3), b"meanwhile");
        let f = other.read_response();
        assert_eq!((status_of(&f), &f.payload[..]), (200, &b"meanwhile"[..]));
        let mut peek = [0u8; 1];
        if ws.s.peek(&mut peek).is_ok() {
            closed = true;
            break;
        }
    }
    let after = started.elapsed();
    ws.s.set_nonblocking(false).expect("blocking");
    assert!(
        closed,
        "a message trickled for {after:?} ({sent} bytes) kept its session"
    );
    assert_eq!(read_close_code(&mut ws), Some(1008), "after {after:?}");
    // Due at about 3 s, not at the end of a 10 s idle wait.
    assert!(
        after < Duration::from_secs(7),
        "closed only after {after:?}"
    );
    assert_eq!(r.metrics().get("fedbus_slow_messages_closed_total"), 1.0);
    assert!(
        r.log()
            .contains("client websocket message slower than limits.min_body_bytes_per_sec"),
        "{}",
        r.log()
    );
    println!("a 2 KiB message trickled at 1 byte / 300 ms: closed 1008 after {after:?}");
}

/// An `/api/ws` request whose body is over `limits.max_body_bytes` is answered `413
/// body_too_large`, as on HTTP, and the session goes on; the message's own bound (1009) leaves
/// 64 KiB for the frame header and metadata. Before, such a body reached the task.
#[test]
fn websocket_bodies_over_max_body_bytes_get_413() {
    let r = Router::new()
        .shards(1)
        .limit("max_body_bytes", 4096)
        .start();
    let _echo = r.task().start();
    let tok = r.token(APP, "alice");
    let mut ws = Ws::open(r.api, &tok);
    ws.send_request(1, &r.path(APP, 1), &[b'x'; 4097]);
    let f = ws.read_response();
    assert_eq!(status_of(&f), 413, "{f:?}");
    assert_eq!(f.get_str(tag::ERROR), Some("body_too_large"));
    ws.send_request(2, &r.path(APP, 2), &[b'y'; 4096]);
    let f = ws.read_response();
    assert_eq!((status_of(&f), f.payload.len()), (200, 4096));
}

/// An `/api/ws` session's small requests in flight hold slices of its read buffer. After one
/// large message its reads are offered 64 KiB; small messages that then arrive one per read
/// must share read buffers, not take a fresh 64 KiB one each (they did: 200 empty requests
/// held 12.5 MiB per session, none of it charged to the body budget).
#[test]
fn small_websocket_messages_in_flight_share_their_read_buffers() {
    const SESSIONS: usize = 4;
    const SMALL: u64 = 200;
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(4000).start();
    let tok = r.token(APP, "alice");
    let before = rss_kib(&r);
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let (api, path, tok) = (r.api, r.path(APP, i as u64), tok.clone());
            std::thread::spawn(move || {
                let mut ws = Ws::open(api, &tok);
                ws.send_request(1, &path, &vec![b'b'; 64 * 1024]);
                for id in 2..2 + SMALL {
                    ws.send_request(id, &path, b"");
                    std::thread::sleep(Duration::from_millis(1));
                }
                ws
            })
        })
        .collect();
    let mut held: Vec<Ws> = sessions
        .into_iter()
        .map(|t| t.join().expect("session"))
        .collect();
    r.wait_pending((SESSIONS as u64 * (SMALL + 1)) as f64);
    let grown_kib = rss_kib(&r).saturating_sub(before);
    println!(
        "{SESSIONS} sessions, each one 64 KiB request then {SMALL} empty ones, all in flight: \
         router RSS +{grown_kib} KiB"
    );
    assert!(grown_kib < 8 * 1024, "RSS grew by {grown_kib} KiB");
    // Every request is answered.
    for ws in held.iter_mut() {
        for _ in 0..=SMALL {
            assert_eq!(status_of(&ws.read_response()), 200);
        }
    }
}

/// An `/api/ws` session that puts one small slow request in each read and fills the rest of the
/// read buffer with a message refused at once (for an app nobody serves) would keep a whole
/// read buffer (~60 KiB here) alive per request, charged for ~100 bytes. The reader holds the
/// buffers that requests in flight keep alive to twice their charged bytes plus two read
/// chunks; past that the session reads nothing until answers come back
/// (`fedbus_ws_reads_paused_total`). Every request is still answered.
#[test]
fn small_slow_requests_cannot_keep_a_read_buffer_each() {
    const ROUNDS: u64 = 24;
    let r = Router::new().shards(1).start();
    let _slow = r.task().delay_ms(400).start();
    let tok = r.token(APP, "alice");
    let paused_before = r.metrics().get("fedbus_ws_reads_paused_total");
    let mut ws = Ws::open(r.api, &tok);
    let (slow, nobody) = (r.path(APP, 6), r.path("nobody/none", 1));
    let big = vec![b'b'; 60 * 1024];
    let mut status: HashMap<u64, u64> = HashMap::new();
    for k in 0..ROUNDS {
        let mut wire = ws.request_bytes(2 * k, &slow, b"small");
        wire.extend(ws.request_bytes(2 * k + 1, &nobody, &big));
        ws.s.write_all(&wire).expect("write round");
        // The refusal of this round's large message: the router has read all of it.
        while !status.contains_key(&(2 * k + 1)) {
            let f = ws.read_response();
            status.insert(f.header.request_id, status_of(&f));
        }
    }
    while status.len() < 2 * ROUNDS as usize {
        let f = ws.read_response();
        status.insert(f.header.request_id, status_of(&f));
    }
    for k in 0..ROUNDS {
        assert_eq!(status[&(2 * k)], 200, "slow request {}", 2 * k);
        assert_eq!(status[&(2 * k + 1)], 404, "refused request {}", 2 * k + 1);
    }
    let paused = r.metrics().get("fedbus_ws_reads_paused_total") - paused_before;
    assert!(
        paused >= 1.0,
        "{ROUNDS} read buffers kept alive by one small request each, and the session never paused"
    );
    let logged = wait_for(Duration::from_secs(5), || {
        r.log()
            .contains("reading paused until answers come back")
            .then_some(())
    });
    assert!(logged.is_some(), "the pause is logged");
}

/// A task link that stops reading keeps the requests routed to it waiting in its outbox; one
/// over 1 KiB waits as a slice of the read buffer of the client that sent it. At the request's
/// 504 the router copies its payload out of the client's buffer (bounded by the link's
/// `limits.max_link_outbox_bytes`, as the frame was): the session that sent 200 requests of
/// 4 KiB (~13 read buffers) is not left holding those buffers, and is not paused when it next
/// needs a new one. Before, its reads stayed paused for as long as the link did not read (the
/// link's write timeout: 3 ping intervals), with those buffers charged to nothing. (Another
/// session's 15 MiB go first: they fill the link's socket and the batch the router's writer is
/// blocked on, which keeps its frames as they are until written.)
#[test]
fn a_stuck_task_link_does_not_keep_a_clients_read_buffers_past_the_504() {
    use crate::hostile_tasks::{service_token, Link, RawLink};
    const SMALL: u64 = 200;
    let r = Router::new()
        .shards(1)
        .request_timeout_ms(3000)
        // No pings: the link stays in routing (never ejected for an unanswered pong) and is
        // not cut by its write timeout during the test; nor ejected for its timeouts.
        .limit("ping_interval_ms", 60_000)
        .limit("task_eject_after_timeouts", 0)
        .start();
    let all: Vec<u32> = (0..16).collect();
    let stuck = RawLink::registered(r.internal[0], &service_token(&r), 4242, "main", &all);
    limit_receive_buffer(&stuck.s, 64 * 1024);
    let tok = r.token(APP, "alice");
    // Another session fills the link's socket (one that does not read takes the router's
    // send buffer, `net.ipv4.tcp_wmem`'s most: 4 MiB by default, and the 128 KiB it receives)
    // and the batch the router's writer is blocked on, so the small requests after it wait in
    // the outbox.
    const FILLER: u64 = 15;
    let mut filler = Ws::open(r.api, &tok);
    for id in 0..FILLER {
        filler.send_request(id, &r.path(APP, id), &vec![b'f'; 1 << 20]);
    }
    r.wait_pending(FILLER as f64);
    let mut ws = Ws::open(r.api, &tok);
    let mut wire = Vec::new();
    for id in 0..SMALL {
        wire.extend(ws.request_bytes(id, &r.path(APP, id), &[b's'; 4096]));
    }
    ws.s.write_all(&wire).expect("write the small requests");
    r.wait_pending((FILLER + SMALL) as f64);
    for _ in 0..SMALL {
        let f = ws.read_response();
        assert_eq!(status_of(&f), 504, "{f:?}");
    }
    let paused_before = r.metrics().get("fedbus_ws_reads_paused_total");
    // A message that needs a new read buffer (refused at once: nobody serves that app).
    let asked = Instant::now();
    ws.send_request(SMALL, &r.path("nobody/none", 1), &vec![b'n'; 100 * 1024]);
    let f = ws.read_response();
    assert_eq!((f.header.request_id, status_of(&f)), (SMALL, 404), "{f:?}");
    println!("answered {:?} after it was sent", asked.elapsed());
    assert_eq!(
        r.metrics().get("fedbus_ws_reads_paused_total"),
        paused_before,
        "the session was paused by buffers its timed-out requests no longer need"
    );
}

/// The bound on read buffers held by requests in flight does not stop a well-behaved session:
/// 200 small requests for a slow task, each written once the one before was read (so each is
/// read, and kept alive, in a 4 KiB buffer of its own), are all taken in: a request sent after them
/// (for an app nobody serves: answered at once) is answered before any of them, and no pause is
/// counted.
#[test]
fn small_requests_each_in_a_write_of_its_own_are_not_paused() {
    const SLOW: u64 = 200;
    let r = Router::new().shards(1).start();
    // Long enough for the 200 sends with a scrape after each, on a loaded machine.
    let _slow = r.task().delay_ms(8000).start();
    let tok = r.token(APP, "alice");
    let paused_before = r.metrics().get("fedbus_ws_reads_paused_total");
    let mut ws = Ws::open(r.api, &tok);
    let path = r.path(APP, 6);
    for id in 0..SLOW {
        ws.send_request(id, &path, b"small");
        // Read by the router (sent to the task) before the next one is written: a read each.
        let pending = wait_for(Duration::from_secs(10), || {
            (r.metrics().get("fedbus_pending_requests") >= (id + 1) as f64).then_some(())
        });
        assert!(pending.is_some(), "request {id} was not taken in");
    }
    ws.send_request(SLOW, &r.path("nobody/none", 1), b"last");
    let first = ws.read_response();
    assert_eq!(
        (first.header.request_id, status_of(&first)),
        (SLOW, 404),
        "the request after the slow ones waited for them: {first:?}"
    );
    assert_eq!(
        r.metrics().get("fedbus_ws_reads_paused_total"),
        paused_before,
        "a well-behaved session was paused"
    );
    // The slow answers come 8 s after their requests.
    ws.s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    for _ in 0..SLOW {
        assert_eq!(status_of(&ws.read_response()), 200);
    }
}
