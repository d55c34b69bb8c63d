//! The client websocket endpoint `GET /api/ws` (docs/PROTOCOL.md section 8) and `/metrics`,
//! end to end against a real router and echo tasks, with a small blocking websocket client
//! built on fedbus's own handshake and frame helpers (read timeouts everywhere: a hung router
//! fails a test instead of hanging it).

use bytes::{Bytes, BytesMut};
use fedbus_auth::{sign_client_jwt, ClientClaims, Keyring};
use fedbus_proto::{encode_frame, put_meta, tag, Frame, Kind};
use fedbus_router::ws::frame::opcode;
use fedbus_router::ws::handshake::{client_request, new_key};
use fedbus_testkit::ws::{self, header_lines, header_of, status_of, Msg, Upgraded};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

fn now() -> u64 {
    fedbus_auth::now_unix()
}

// ---------------------------------------------------------------------------------------------
// A blocking websocket client.

type Ws = ws::Ws;

fn upgrade(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Upgraded {
    upgrade_from(addr, path, bearer, None)
}

/// An upgrade with an `Origin` header, as a browser page of that origin sends it. A refusal is
/// read to the router's close (for its whole body).
fn upgrade_from(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    origin: Option<&str>,
) -> Upgraded {
    let dial = ws::Dial::new(READ_TIMEOUT)
        .write_timeout(READ_TIMEOUT)
        .nodelay();
    let s = ws::dial(addr, &dial).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    match ws::upgrade(s, path, bearer, origin, true).unwrap_or_else(|e| panic!("{e}")) {
        Upgraded::Open(w) => Upgraded::Open(w.checking_router_frames()),
        refused => refused,
    }
}

/// Opens `/api/ws` with a bearer token; panics unless it is a 101.
/// A request that comes after the session's token expired closes the session with 1008, but
/// the answers to earlier requests, still in flight then, go out before the close frame (as
/// on a drain): they were dropped, though their task may have run them.
#[test]
fn answers_in_flight_go_out_before_an_expired_tokens_1008() {
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(9000).start();
    let short = expired_token(&r, APP, now() + 1);
    let mut w = open(&r, &short);
    w.set_read_timeout(Duration::from_secs(15));
    w.send_request(1, Some(&r.path(APP, 1)), b"in flight");
    // The task still holds request 1 (9 s), sent at most 2 s before `exp` (+ 5 s leeway).
    wait_past_exp(&short);
    w.send_request(2, Some(&r.path(APP, 1)), b"after exp");
    assert_echo_frame(&w.read_response(), 1, 1, b"in flight");
    w.expect_close(1008);
}

fn open(r: &Router, tok: &str) -> Ws {
    match upgrade(r.api, "/api/ws", Some(tok)) {
        Upgraded::Open(w) => w,
        Upgraded::Refused { status: st, body } => panic!("upgrade refused: {st} {body}"),
    }
}

/// What these tests add to the kit's session.
trait WsApi {
    fn send_raw_lossy(&mut self, b: &[u8]);
    fn send_request(&mut self, id: u64, path: Option<&str>, payload: &[u8]);
    fn read_response(&mut self) -> Frame;
    fn expect_close(&mut self, code: u16);
}

impl WsApi for Ws {
    /// Writes raw bytes, ignoring a router that already closed.
    fn send_raw_lossy(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    fn send_request(&mut self, id: u64, path: Option<&str>, payload: &[u8]) {
        let b = self.request_bytes(id, path, payload);
        self.s.write_all(&b).expect("write request");
    }

    /// Next Response frame; panics on anything else.
    fn read_response(&mut self) -> Frame {
        match self.read_msg() {
            Ok(Msg::Binary(b)) => {
                let f = Frame::decode(Bytes::from(b)).expect("a valid fedbus frame");
                assert_eq!(f.header.kind, Kind::Response, "{f:?}");
                assert_eq!(f.header.flags, 0, "{f:?}");
                f
            }
            other => panic!("expected a Response frame, got {other:?}"),
        }
    }

    /// Expects a close frame with `code`, then EOF (skips answers still queued before it).
    fn expect_close(&mut self, code: u16) {
        loop {
            match self.read_msg() {
                Ok(Msg::Close(c, _)) => {
                    assert_eq!(c, Some(code), "close code");
                    break;
                }
                Ok(Msg::Binary(_)) | Ok(Msg::Pong(_)) => continue,
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
        let mut b = [0u8; 64];
        match self.s.read_retrying(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => {
                panic!("router did not close the TCP connection after close {code}: {other:?}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame helpers.

fn describe(f: &Frame) -> String {
    ws::describe(f, 300)
}

/// A router-made error as a frame: STATUS, ERROR meta, JSON body `{status,error,message}`.
fn assert_error_frame(f: &Frame, id: u64, status: u64, code: &str) {
    let d = describe(f);
    let j = ws::assert_error_basics(f, id, status, code, &d);
    assert_eq!(j["status"], status, "{d}");
    assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");
    assert_eq!(j.as_object().map(|o| o.len()), Some(3), "{d}");
    assert!(header_of(f, "fedbus-shard").is_some(), "{d}");
}

/// A 200 echo of `body` from partition `wsid % 16`, served over the accepting shard's link.
fn assert_echo_frame(f: &Frame, id: u64, wsid: u64, body: &[u8]) {
    let d = describe(f);
    assert_eq!(f.header.request_id, id, "{d}");
    assert_eq!(status_of(f), 200, "{d}");
    assert_eq!(f.get(tag::ERROR), None, "{d}");
    assert!(f.payload[..] == *body, "id {id}: payload differs: {d}");
    let part = (wsid % 16).to_string();
    assert!(
        header_lines(f).contains(&format!("fedbus-partition: {part}")),
        "{d}"
    );
    assert_eq!(f.header.partition as u64, wsid % 16, "{d}");
    assert_eq!(header_of(f, "fedbus-hops").as_deref(), Some("0"), "{d}");
    let shard = header_of(f, "fedbus-shard").expect("fedbus-shard");
    assert_eq!(
        header_of(f, "echo-link-shard"),
        Some(shard),
        "crossed shards: {d}"
    );
}

fn expired_token(r: &Router, app: &str, exp: u64) -> String {
    let keyring = Keyring::load(&r.keys).expect("keyring");
    let secret = keyring.signing_app_secret(app).expect("secret");
    sign_client_jwt(
        secret,
        &ClientClaims {
            sub: "alice".into(),
            app: app.into(),
            iat: now().saturating_sub(7200),
            exp,
            nbf: None,
        },
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// 200 requests written back to back on one connection, then 200 answers matched by id.
#[test]
fn many_requests_in_flight_on_one_connection() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    // Two connections: with 2 shards they may land on either; each must work on its own.
    for round in 0..2u64 {
        let mut w = open(&r, &tok);
        let n = 200u64;
        let mut sent: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
        let mut all = Vec::new();
        for i in 0..n {
            let id = 1_000_000 * (round + 1) + i * 7919; // client-chosen, not a counter
            let wsid = i * 31 + round;
            let len = (random_bytes(2, i + 17 * round)[0] as usize * 16 + i as usize) % 4097;
            let body = random_bytes(len, 1000 + i + round);
            all.extend_from_slice(&w.request_bytes(id, Some(&r.path(APP, wsid)), &body));
            sent.insert(id, (wsid, body));
        }
        // Back to back: all 200 in one write.
        w.s.write_all(&all).expect("write 200 requests");
        for _ in 0..n {
            let f = w.read_response();
            let id = f.header.request_id;
            let (wsid, body) = sent
                .remove(&id)
                .unwrap_or_else(|| panic!("answer to an unknown or repeated id: {}", describe(&f)));
            assert_echo_frame(&f, id, wsid, &body);
        }
        assert!(sent.is_empty());
        // A ping is answered with a pong carrying the same payload.
        w.send_frame(opcode::PING, b"are you there");
        assert_eq!(w.read_msg().unwrap(), Msg::Pong(b"are you there".to_vec()));
        // A close frame is answered with close 1000.
        w.send_frame(opcode::CLOSE, &1000u16.to_be_bytes());
        w.expect_close(1000);
    }
}

/// Answers come in completion order, not request order.
#[test]
fn answers_come_out_of_order() {
    let r = Router::new().shards(1).start();
    let _slow = r.task().partitions("0-7").delay_ms(500).start();
    let _fast = r.task().partitions("8-15").start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    w.fixed_mask = Some([0; 4]); // fedbus's own clients' mask
    let start = Instant::now();
    w.send_request(1, Some(&r.path(APP, 1)), b"slow");
    w.send_request(2, Some(&r.path(APP, 9)), b"fast");
    let first = w.read_response();
    let second = w.read_response();
    let t_second = start.elapsed();
    // The order is the proof that the fast answer did not wait behind the slow one; an upper
    // bound on its time would only measure how loaded the machine is.
    assert_echo_frame(&first, 2, 9, b"fast");
    assert_echo_frame(&second, 1, 1, b"slow");
    assert!(
        t_second >= Duration::from_millis(450),
        "slow answer after {t_second:?}"
    );
}

/// Every router-made error is a Response frame; the connection stays usable after each.
#[test]
fn every_error_is_a_frame() {
    let r = Router::new()
        .shards(1)
        .apps(&[(APP, 16), ("demo/other", 4)])
        .start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let p = r.path(APP, 42);

    // 503: no task at all.
    w.send_request(1, Some(&p), b"x");
    let f = w.read_response();
    assert_error_frame(&f, 1, 503, "no_live_task");
    assert_eq!(
        header_of(&f, "fedbus-partition").as_deref(),
        Some("10"),
        "{}",
        describe(&f)
    );

    let cases: &[(&str, u64, &str)] = &[
        ("/api/local/dev/demo/echo/api/42/sys", 400, "bad_path"),
        (
            "/api/local/dev/demo/echo/api/notanumber/sys/echo",
            400,
            "bad_wsid",
        ),
        ("/api/x/y/demo/echo/api/42/sys/echo", 404, "unknown_cluster"),
        (
            "/api/local/dev/demo/nope/api/42/sys/echo",
            404,
            "unknown_app",
        ),
        ("/api/local/dev/demo/other/api/1/sys/echo", 403, "wrong_app"),
        ("/nope", 404, "not_found"),
    ];
    for (i, (path, status, code)) in cases.iter().enumerate() {
        let id = 100 + i as u64;
        w.send_request(id, Some(path), b"x");
        let f = w.read_response();
        assert_error_frame(&f, id, *status, code);
    }
    // No PATH at all.
    w.send_request(200, None, b"x");
    assert_error_frame(&w.read_response(), 200, 400, "bad_request");

    // The connection still serves once a task is up.
    let mut t = r.task().delay_ms(5000).start();
    // 502: the task is killed with the request pending.
    w.send_request(300, Some(&p), b"slow");
    r.wait_pending(1.0);
    let killed = Instant::now();
    t.kill();
    w.set_read_timeout(Duration::from_secs(3));
    let f = w.read_response();
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "502 after {:?}",
        killed.elapsed()
    );
    assert_error_frame(&f, 300, 502, "task_lost");
    // And 503 again: no task left.
    w.send_request(301, Some(&p), b"again");
    assert_error_frame(&w.read_response(), 301, 503, "no_live_task");
}

#[test]
fn task_timeout_is_504_frame() {
    let r = Router::new().shards(1).request_timeout_ms(500).start();
    let _t = r.task().delay_ms(3000).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let start = Instant::now();
    w.send_request(7, Some(&r.path(APP, 7)), b"slow");
    let f = w.read_response();
    let took = start.elapsed();
    assert_error_frame(&f, 7, 504, "task_timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2000),
        "504 after {took:?}, timeout 500 ms"
    );
}

/// Refusals at the upgrade are HTTP answers with a JSON body; a query token works.
#[test]
fn bad_jwt_at_upgrade_is_401() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");

    let expect_401 =
        |path: &str, bearer: Option<&str>, code: &str| match upgrade(r.api, path, bearer) {
            Upgraded::Open(_) => panic!("{path} {bearer:?}: upgraded, expected 401 {code}"),
            Upgraded::Refused { status: st, body } => {
                assert_eq!(st, 401, "{path} {bearer:?}: {body}");
                let j: serde_json::Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("JSON body ({e}): {body}"));
                assert_eq!(j["status"], 401, "{body}");
                assert_eq!(j["error"], code, "{body}");
            }
        };
    // (Without a token the session is anonymous: `anonymous_sessions_reach_anonymous_services`.)
    expect_401("/api/ws", Some("garbage"), "bad_token");
    expect_401("/api/ws?access_token=garbage", None, "bad_token");
    let expired = expired_token(&r, APP, now() - 3600);
    expect_401("/api/ws", Some(&expired), "expired_token");
    expect_401(
        &format!("/api/ws?access_token={expired}"),
        None,
        "expired_token",
    );
    // The header wins over the query.
    expect_401(
        &format!("/api/ws?access_token={tok}"),
        Some("garbage"),
        "bad_token",
    );

    // A valid token in the query: 101, and requests are served.
    for path in [
        format!("/api/ws?access_token={tok}"),
        format!("/api/ws?x=1&access_token={tok}&y=2"),
    ] {
        let mut w = match upgrade(r.api, &path, None) {
            Upgraded::Open(w) => w,
            Upgraded::Refused { status: st, body } => panic!("{path}: {st} {body}"),
        };
        w.send_request(5, Some(&r.path(APP, 5)), b"q");
        assert_echo_frame(&w.read_response(), 5, 5, b"q");
    }

    // A token that expires while the connection is open: the next request closes with 1008.
    let short = expired_token(&r, APP, now() + 2);
    let mut w = open(&r, &short);
    w.send_request(1, Some(&r.path(APP, 1)), b"a");
    assert_echo_frame(&w.read_response(), 1, 1, b"a");
    wait_past_exp(&short);
    w.send_request(2, Some(&r.path(APP, 1)), b"b");
    w.expect_close(1008);
}

/// Waits until the router counts the token `jwt` expired: `now > exp + 5` in whole seconds,
/// plus 50 ms. The router reads whole seconds from
/// CLOCK_REALTIME_COARSE (`util::unix_secs_coarse`), which lags the fine clock by up to one
/// tick (1-10 ms): a request sent in the first milliseconds of that second may still be served.
fn wait_past_exp(jwt: &str) {
    // `exp` is checked with 5 s of leeway, per message as at the upgrade (and on HTTP).
    let exp_ms = (u128::from(now_exp(jwt)) + 5) * 1000 + 1050;
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
        < exp_ms
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `exp` of a JWT (no verification).
fn now_exp(jwt: &str) -> u64 {
    use base64::Engine as _;
    let claims = jwt.split('.').nth(1).expect("claims part");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .expect("base64url");
    let j: serde_json::Value = serde_json::from_slice(&raw).expect("claims JSON");
    j["exp"].as_u64().expect("exp")
}

#[test]
fn unmasked_frame_closes_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let f = encode_frame(Kind::Request, 0, 0, 0, 1, b"", b"x");
    w.send_unmasked_frame(opcode::BINARY, &f);
    w.expect_close(1002);

    // Also 1002: a binary message that is not a fedbus frame, and a frame of another kind.
    let mut w = open(&r, &tok);
    w.send_frame(opcode::BINARY, b"not a fedbus frame");
    w.expect_close(1002);
    let mut w = open(&r, &tok);
    let f = encode_frame(Kind::Response, 0, 0, 0, 1, b"", b"x");
    w.send_frame(opcode::BINARY, &f);
    w.expect_close(1002);
}

#[test]
fn text_message_closes_1003() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    w.send_frame(opcode::TEXT, b"{\"hello\":1}");
    w.expect_close(1003);
}

/// The message limit is `max_body_bytes + 64 KiB`: exactly that is served, one byte more is 1009.
#[test]
fn oversized_message_closes_1009() {
    let r = Router::new()
        .shards(1)
        .limit("max_body_bytes", 1024)
        .start();
    let tok = r.token(APP, "alice");
    let limit = 1024 + 64 * 1024;
    // A frame of exactly `limit` bytes, its body over max_body_bytes: answered 413 (as on
    // HTTP) without a task.
    let mut w = open(&r, &tok);
    let payload = vec![b'z'; limit - 24];
    w.send_request(1, None, &payload);
    assert_error_frame(&w.read_response(), 1, 413, "body_too_large");
    // One byte more.
    let payload = vec![b'z'; limit - 24 + 1];
    let b = w.request_bytes(2, None, &payload);
    w.send_raw_lossy(&b);
    w.expect_close(1009);
}

/// Checks the Prometheus text strictly (on top of `Metrics::parse`): HELP/TYPE lines, every
/// sample in a declared family, histograms cumulative and ending with `+Inf` = `_count`.
fn check_prometheus(text: &str) -> Metrics {
    let m = Metrics::parse(text);
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut buckets: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
            assert!(!help.trim().is_empty(), "empty help: {line:?}");
            assert!(helped.insert(name.to_string()), "HELP twice: {line:?}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                "bad type: {line:?}"
            );
            assert!(helped.contains(name), "TYPE before HELP: {line:?}");
            assert!(
                types.insert(name.into(), ty.into()).is_none(),
                "TYPE twice: {line:?}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "bad comment: {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let family = types.get(name).map(|_| name).or_else(|| {
            ["_bucket", "_sum", "_count"].iter().find_map(|s| {
                let base = name.strip_suffix(s)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
        });
        let family = family.unwrap_or_else(|| panic!("sample of an undeclared family: {line:?}"));
        if types[family] == "counter" || types[family] == "histogram" {
            let v: f64 = value.parse().unwrap();
            assert!(v >= 0.0 && v.is_finite(), "negative counter: {line:?}");
        }
        if let Some(base) = name.strip_suffix("_bucket") {
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or_else(|| panic!("bucket without le: {line:?}"));
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            buckets
                .entry(base.to_string())
                .or_default()
                .push((le, value.parse().unwrap()));
        }
    }
    let hists: Vec<&String> = types
        .iter()
        .filter(|(_, t)| *t == "histogram")
        .map(|(n, _)| n)
        .collect();
    assert!(!hists.is_empty(), "no histogram");
    for h in hists {
        let b = buckets
            .get(h.as_str())
            .unwrap_or_else(|| panic!("{h}: no buckets"));
        for w in b.windows(2) {
            assert!(w[0].0 < w[1].0, "{h}: le not increasing: {b:?}");
            assert!(w[0].1 <= w[1].1, "{h}: buckets not cumulative: {b:?}");
        }
        let last = b.last().unwrap();
        assert!(last.0.is_infinite(), "{h}: last bucket is not +Inf: {b:?}");
        assert_eq!(last.1, m.get(&format!("{h}_count")), "{h}: +Inf != _count");
        assert!(m.0.contains_key(&format!("{h}_sum")), "{h}: no _sum");
    }
    m
}

#[test]
fn metrics_count_websocket_requests() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let before = check_prometheus(&r.metrics_text());
    let ok0 = before.get("fedbus_requests_total{status=\"200\"}");
    let e400 = before.get("fedbus_requests_total{status=\"400\"}");
    let count0 = before.get("fedbus_request_duration_seconds_count");
    let conns0 = before.get("fedbus_connections{listener=\"api\"}");

    let mut w = open(&r, &tok);
    let n = 37u64;
    for i in 0..n {
        w.send_request(i, Some(&r.path(APP, i)), b"m");
    }
    for _ in 0..n {
        assert_eq!(status_of(&w.read_response()), 200);
    }
    w.send_request(999, None, b"");
    assert_error_frame(&w.read_response(), 999, 400, "bad_request");

    let during = check_prometheus(&r.metrics_text());
    assert_eq!(
        during.get("fedbus_requests_total{status=\"200\"}") - ok0,
        n as f64,
        "200s over the websocket counted"
    );
    assert_eq!(
        during.get("fedbus_requests_total{status=\"400\"}") - e400,
        1.0
    );
    assert_eq!(
        during.get("fedbus_request_duration_seconds_count") - count0,
        n as f64 + 1.0,
        "every answer in the latency histogram"
    );
    assert!(
        during.get("fedbus_connections{listener=\"api\"}") >= 1.0,
        "websocket open: {:?}",
        during.get("fedbus_connections{listener=\"api\"}")
    );
    assert_eq!(during.get("fedbus_task_links"), 2.0);

    // Closing the websocket takes the gauge back down.
    w.send_frame(opcode::CLOSE, &1000u16.to_be_bytes());
    w.expect_close(1000);
    let back = wait_for(Duration::from_secs(3), || {
        let m = r.metrics();
        (m.get("fedbus_connections{listener=\"api\"}") <= conns0).then_some(())
    });
    assert!(back.is_some(), "api connection gauge not back to {conns0}");
}

/// A client that sends and never reads: once its answers overflow the connection's share
/// (`limits.max_connection_outbox_bytes`) the router closes with 1013 instead of dropping
/// answers silently or growing without bound. The close frame goes ahead of the answers not
/// yet written (their bytes go back to the budget at once), and the router keeps reading
/// while it closes, so a client blocked writing gets to read it. Counted; another session on
/// the same shard is served throughout.
#[test]
fn client_that_never_reads_is_closed_1013() {
    let r = Router::new()
        .shards(1)
        .limit("max_connection_outbox_bytes", 256 * 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut normal = open(&r, &tok);
    let mut w = open(&r, &tok);
    let payload = vec![b'q'; 60 * 1024];
    let path = format!("/api/local/dev/{APP}/api/3/sys/echo");
    // About 24 MB of requests: more than the kernel's socket buffers can hide.
    for id in 0..400u64 {
        let b = w.request_bytes(id, Some(&path), &payload);
        w.send_raw_lossy(&b);
    }
    for id in 0..5u64 {
        normal.send_request(id, Some(&r.path(APP, id)), b"during");
        let f = normal.read_response();
        assert_eq!((status_of(&f), &f.payload[..]), (200, &b"during"[..]));
    }
    w.set_read_timeout(Duration::from_secs(10));
    w.expect_close(1013);
    assert_eq!(r.metrics().get("fedbus_slow_reader_closed_total"), 1.0);
    let held = || r.metrics().get("fedbus_outbox_bytes_held");
    assert!(
        wait_for(Duration::from_secs(5), || (held() < 1024.0).then_some(())).is_some(),
        "outbox bytes still held: {}",
        held()
    );
}

/// Holds `w`'s receive buffer to 64 KiB and sends 200 echo requests of 60 KiB without reading:
/// 12 MiB of answers, within the session's 16 MiB share, more than the socket buffers hold.
fn send_answers_it_will_not_read(r: &Router, w: &mut Ws) {
    limit_receive_buffer(&w.s, 64 * 1024);
    let payload = vec![b'q'; 60 * 1024];
    for id in 0..200u64 {
        let b = w.request_bytes(id, Some(&r.path(APP, 3)), &payload);
        w.send_raw_lossy(&b);
    }
}

/// A client that sends and never reads, with its answers within its share: each write of the
/// session's answers must be done at `limits.min_answer_bytes_per_sec` (as over HTTP), or the
/// session ends (no close frame: the client reads nothing), counted in
/// `fedbus_slow_reader_closed_total` and logged, and the answers' bytes go back to the budget.
/// Before, such a session kept its answers for as long as each write moved within the
/// socket's write timeout (`limits.idle_timeout_ms`, 60 s), however slowly.
#[test]
fn a_session_slower_than_the_answer_pace_is_closed() {
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 500)
        .limit("min_answer_bytes_per_sec", 1 << 20)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    send_answers_it_will_not_read(&r, &mut w);
    let closed = wait_for(Duration::from_secs(20), || {
        (r.metrics().get("fedbus_slow_reader_closed_total") >= 1.0).then_some(())
    });
    assert!(closed.is_some(), "the session that does not read was kept");
    w.set_read_timeout(Duration::from_secs(5));
    let mut b = vec![0u8; 1 << 20];
    let end = loop {
        match w.s.read_retrying(&mut b) {
            Ok(0) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    assert!(
        end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection is closed: {end:?}"
    );
    let held = || r.metrics().get("fedbus_outbox_bytes_held");
    assert!(
        wait_for(Duration::from_secs(5), || (held() == 0.0).then_some(())).is_some(),
        "outbox bytes still held: {}",
        held()
    );
    assert_eq!(r.metrics().get("fedbus_slow_reader_closed_total"), 1.0);
    assert!(r
        .log()
        .contains("client websocket does not read its answers (slower than"));
}

/// With the default pace (1 KiB/s) a blocked write behind the megabytes the socket holds is
/// allowed more than the socket's write timeout (`limits.idle_timeout_ms`): that timeout
/// ends the session first, and it is counted and logged as a slow reader all the same.
#[test]
fn a_session_cut_by_the_write_timeout_is_counted_as_a_slow_reader() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 2000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    send_answers_it_will_not_read(&r, &mut w);
    let closed = wait_for(Duration::from_secs(20), || {
        (r.metrics().get("fedbus_slow_reader_closed_total") >= 1.0).then_some(())
    });
    assert!(
        closed.is_some(),
        "a session cut by its write timeout was not counted"
    );
    assert!(r
        .log()
        .contains("client websocket does not read its answers (slower than"));
}

/// One answer larger than the session's share of the outbox budget reaches a client that
/// reads promptly (as it does over HTTP); the session is not closed as a slow reader. Before,
/// a 150 KB echo on a 100 KB share closed the session with 1013.
#[test]
fn one_answer_larger_than_the_outbox_share_reaches_a_prompt_reader() {
    let r = Router::new()
        .shards(1)
        .limit("max_connection_outbox_bytes", 100_000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let big = vec![b'b'; 150_000];
    for id in 0..3u64 {
        w.send_request(id, Some(&r.path(APP, 2)), &big);
        assert_echo_frame(&w.read_response(), id, 2, &big);
    }
    assert_eq!(r.metrics().get("fedbus_slow_reader_closed_total"), 0.0);
}

/// A session's token is authorized per request with the same rule as HTTP: once its key
/// version is retired (rotation, then the grace period), the next request on the open session
/// gets 401 `retired_key`, and the session stays open for a client that reconnects with a
/// fresh token at its own pace.
#[test]
fn retired_key_version_is_401_on_an_open_session() {
    let r = seed::start_with(Router::new().shards(1), &seed::grace_config());
    let _t = r.task().start();
    let t1 = r.token(APP, "alice");
    let mut w = open(&r, &t1);
    w.send_request(1, Some(&r.path(APP, 4)), b"a");
    assert_eq!(status_of(&w.read_response()), 200);
    let before = seed::reloads(&r);
    let (valid_until, retired_from) = seed::rotate_app_timed(&r, APP);
    seed::sighup(&r);
    assert!(
        wait_for(Duration::from_secs(3), || (seed::reloads(&r) > before)
            .then_some(()))
        .is_some(),
        "no keyring reload within 3 s of SIGHUP"
    );
    // Inside the grace period the old version still verifies.
    w.send_request(2, Some(&r.path(APP, 4)), b"b");
    let inside = w.read_response();
    assert!(
        Instant::now() < valid_until,
        "the reload took the whole grace: nothing was asked inside it"
    );
    assert_eq!(status_of(&inside), 200);
    std::thread::sleep(retired_from.saturating_duration_since(Instant::now()));
    w.send_request(3, Some(&r.path(APP, 4)), b"c");
    assert_error_frame(&w.read_response(), 3, 401, "retired_key");
}

/// CORS at the upgrade (docs/PROTOCOL.md section 8.1): a page of an origin no app allows gets
/// 403 before the 101; a session of an allowed origin has each request checked against its
/// own app's policy.
#[test]
fn origin_is_checked_at_the_upgrade_and_per_request() {
    let r = Router::new()
        .shards(1)
        .cors(APP, "allowed_origins = [\"http://page.example\"]")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    match upgrade_from(r.api, "/api/ws", Some(&tok), Some("http://evil.example")) {
        Upgraded::Refused { status: st, body } => {
            assert_eq!(st, 403, "{body}");
            assert!(body.contains("origin_not_allowed"), "{body}");
        }
        Upgraded::Open(_) => panic!("upgrade from a disallowed origin was accepted"),
    }
    let query = format!("/api/ws?access_token={tok}");
    let Upgraded::Open(mut w) = upgrade_from(r.api, &query, None, Some("http://page.example"))
    else {
        panic!("upgrade from the allowed origin was refused")
    };
    w.send_request(1, Some(&r.path(APP, 5)), b"ok");
    let f = w.read_response();
    assert_eq!(
        (status_of(&f), &f.payload[..]),
        (200, &b"ok"[..]),
        "{}",
        describe(&f)
    );
    // demo/other has no [apps.cors]: refused for this origin before its token is looked at.
    w.send_request(2, Some(&r.path("demo/other", 5)), b"no");
    assert_error_frame(&w.read_response(), 2, 403, "origin_not_allowed");
    w.send_request(3, Some(&r.path(APP, 6)), b"still");
    assert_eq!(status_of(&w.read_response()), 200);
    assert_eq!(r.metrics().get("fedbus_origin_refused_total"), 2.0);
}

/// RFC 6455 5.5.1 and 7.4 on the router's own `/api/ws` (the shared reader; Autobahn checks
/// the same on the example server): a close frame with a 1-byte payload, or with a code no
/// endpoint may send (0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999), fails the session
/// with 1002; a reason that is not UTF-8 with 1007; a valid close is answered with 1000. Each on
/// a session that first had an answer, and the router closes the TCP connection after.
#[test]
fn bad_close_frames_fail_the_session_with_1002_or_1007() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut cases: Vec<(Vec<u8>, u16)> = vec![(vec![0x03], 1002)];
    for code in [0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999] {
        cases.push((code.to_be_bytes().to_vec(), 1002));
    }
    cases.push((vec![0x03, 0xe8, 0xff, 0xfe, 0xfd], 1007));
    cases.push((1000u16.to_be_bytes().to_vec(), 1000));
    cases.push((vec![0x0b, 0xb8, b'o', b'k'], 1000));
    for (payload, want) in cases {
        let mut w = open(&r, &tok);
        w.send_request(1, Some(&r.path(APP, 1)), b"first");
        assert_eq!(status_of(&w.read_response()), 200);
        w.send_frame(opcode::CLOSE, &payload);
        w.set_read_timeout(Duration::from_secs(5));
        w.expect_close(want);
    }
}

/// A ping flood (pings never read back as pongs while it lasts) closes the flooding session
/// with 1008 after `limits.max_control_frames_per_sec`, counted; another session on the same
/// shard is answered throughout, and the router's RSS stays flat, sampled during the attack
/// (each pong once cost a queue slot: 1.1 GiB). Sustained as in [`control_flood`].
#[test]
fn a_ping_flood_is_closed_1008_and_others_are_served() {
    control_flood("ping", opcode::PING, b"");
}

/// Opens `/api/ws` at `addr` (for a thread that has no `Router`); panics unless it is a 101.
fn open_at(addr: SocketAddr, tok: &str) -> Ws {
    match upgrade(addr, "/api/ws", Some(tok)) {
        Upgraded::Open(w) => w,
        Upgraded::Refused { status: st, body } => panic!("upgrade refused: {st} {body}"),
    }
}

/// An unsolicited pong flood (RFC 6455 5.5.3 allows unsolicited pongs, not 20,000 of them)
/// closes the flooding session with 1008 once it passes `limits.max_control_frames_per_sec`,
/// counted in `fedbus_abusive_closed_total`. Sustained as in [`control_flood`].
#[test]
fn a_pong_flood_is_closed_1008_and_others_are_served() {
    control_flood("pong", opcode::PONG, b"unsolicited");
}

/// A sustained flood of control frames `op`: 2 attackers, each opening a session, writing
/// 20,000 frames without reading anything until the write ended, then reading to the close
/// frame, and flooding again on a new session as soon as it is closed, until another session
/// on the same, only shard has been answered 20 times, each within 2 s, and 4 more floods
/// began meanwhile. Every flood is closed 1008 and counted; the router's RSS, sampled before
/// each normal request, grows less than 50 MiB.
fn control_flood(name: &str, op: u8, payload: &[u8]) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut normal = open(&r, &tok);
    let rss_before = fedbus_testkit::attack::rss_kib(&r);
    let stop = Arc::new(AtomicBool::new(false));
    let floods = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..2)
        .map(|_| {
            let (addr, tok, stop, floods) = (r.api, tok.clone(), stop.clone(), floods.clone());
            let payload = payload.to_vec();
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut flood = open_at(addr, &tok);
                    flood.set_read_timeout(Duration::from_secs(10));
                    let burst = flood.frame_bytes(op, &payload).repeat(20_000);
                    floods.fetch_add(1, Ordering::Relaxed);
                    // Nothing is read (no pong, no close frame) until the whole burst is
                    // written or the router closed the connection under it.
                    flood.send_raw_lossy(&burst);
                    codes.push(flood.close_code());
                    let _ = flood.s.shutdown(std::net::Shutdown::Both);
                }
                codes
            })
        })
        .collect();
    wait_for(Duration::from_secs(10), || {
        (floods.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .expect("the floods started");
    // At least 20 answers, and until 4 more floods were closed meanwhile (at most 10 s).
    let (t, floods_before) = (Instant::now(), floods.load(Ordering::Relaxed));
    let (mut slowest, mut answered, mut peak) = (Duration::ZERO, 0u64, rss_before);
    while answered < 20
        || (floods.load(Ordering::Relaxed) < floods_before + 4
            && t.elapsed() < Duration::from_secs(10))
    {
        peak = peak.max(fedbus_testkit::attack::rss_kib(&r));
        let sent = Instant::now();
        normal.send_request(answered, Some(&r.path(APP, answered)), b"during");
        let f = normal.read_response();
        assert_eq!((status_of(&f), &f.payload[..]), (200, &b"during"[..]));
        slowest = slowest.max(sent.elapsed());
        answered += 1;
    }
    let attack = t.elapsed();
    let floods_during = floods.load(Ordering::Relaxed) - floods_before;
    stop.store(true, Ordering::Relaxed);
    let codes: Vec<_> = attackers
        .into_iter()
        .flat_map(|a| a.join().expect("attacker"))
        .collect();
    let abusive = r.metrics().get("fedbus_abusive_closed_total");
    let grown_mib = peak.saturating_sub(rss_before) / 1024;
    println!(
        "{name} flood: {} sessions of 20000 {name}s, close codes {:?}; fedbus_abusive_closed_total \
         {abusive}; {answered} normal requests answered in {attack:?} while {floods_during} \
         floods began (slowest {slowest:?}); peak RSS {grown_mib} MiB over the start",
        codes.len(),
        codes
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(codes.iter().all(|c| *c == Ok(Some(1008))), "{codes:?}");
    assert_eq!(abusive, codes.len() as f64);
    assert!(
        floods_during >= 4,
        "{floods_during} floods during {attack:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?}"
    );
    assert!(
        grown_mib < 50,
        "RSS grew by {grown_mib} MiB during the {name} flood"
    );
    assert!(r
        .log()
        .contains("control frames over limits.max_control_frames_per_sec"));
}

/// The per-turn fairness budget: one session floods valid requests (batches of 2,000
/// pipelined, without end, reading its answers only between batches) while another session on
/// the same, only shard asks one request at a time: each of its 50 answers comes within 2 s
/// (a starved session waits for the whole flood), and the flood goes on answering meanwhile.
#[test]
fn a_request_flood_on_one_session_does_not_starve_another() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut normal = open(&r, &tok);
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let path = r.path(APP, 7);
    let flooder = {
        let (addr, tok, stop, answers, sent) = (
            r.api,
            tok.clone(),
            stop.clone(),
            answers.clone(),
            sent.clone(),
        );
        std::thread::spawn(move || {
            let mut w = open_at(addr, &tok);
            let mut batch = Vec::new();
            for id in 0..2000u64 {
                batch.extend(w.request_bytes(id, Some(&path), b"flood"));
            }
            let mut statuses = std::collections::BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                w.s.write_all(&batch).expect("flood batch");
                sent.fetch_add(2000, Ordering::Relaxed);
                for _ in 0..2000 {
                    let f = w.read_response();
                    *statuses.entry(status_of(&f)).or_insert(0u64) += 1;
                    answers.fetch_add(1, Ordering::Relaxed);
                }
            }
            statuses
        })
    };
    wait_for(Duration::from_secs(10), || {
        (answers.load(Ordering::Relaxed) >= 1000).then_some(())
    })
    .expect("the flood is answered");
    let (t, at_start) = (Instant::now(), answers.load(Ordering::Relaxed));
    let mut slowest = Duration::ZERO;
    // At least 50 normal requests, and on until the flood got 1000 answers beside them: on a
    // loaded machine the flooding thread may be off the CPU through the first 50.
    let mut id = 0u64;
    while id < 50 || answers.load(Ordering::Relaxed) - at_start < 1000 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the flood was not going on: {} answers in {:?}",
            answers.load(Ordering::Relaxed) - at_start,
            t.elapsed()
        );
        let asked = Instant::now();
        normal.send_request(id, Some(&r.path(APP, id % 16)), b"during");
        let f = normal.read_response();
        assert_eq!((status_of(&f), &f.payload[..]), (200, &b"during"[..]));
        slowest = slowest.max(asked.elapsed());
        id += 1;
    }
    let took = t.elapsed();
    let flood_during = answers.load(Ordering::Relaxed) - at_start;
    stop.store(true, Ordering::Relaxed);
    let statuses = flooder.join().expect("flooder");
    println!(
        "request flood: {} sent, answered by status {statuses:?}; {flood_during} flood answers \
         during the {id} normal requests ({took:?}, slowest {slowest:?})",
        sent.load(Ordering::Relaxed)
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?} beside the flood"
    );
}

/// An `/api/ws` upgrade that reaches a draining router (on a keep-alive connection opened
/// before the drain; the listeners are closed by then) gets `503 draining` and the connection
/// closes, counted as a 503: the client opens its session elsewhere. Before, it got a 101 and
/// a session closed with 1001 at once.
#[test]
fn an_upgrade_during_a_drain_gets_503_draining() {
    let mut r = Router::new()
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 20000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    c.send(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x").bytes());
    assert_eq!(c.read_response().expect("an answer").status, 200);
    r.sigterm();
    let draining = || r.metrics().get("fedbus_draining");
    wait_for(Duration::from_secs(5), || (draining() == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("fedbus_draining still {} after SIGTERM", draining()));
    let metric = "fedbus_requests_total{status=\"503\"}";
    let before = r.metrics().get(metric);
    c.send(client_request("127.0.0.1", "/api/ws", &new_key(), Some(&tok)).as_bytes());
    let resp = c.read_response().expect("an answer to the upgrade");
    resp.assert_error(503, "draining");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.is_closed(), "the connection closes after the refusal");
    assert_eq!(r.metrics().get(metric), before + 1.0);
    assert!(r.log().contains("/api/ws upgrade during a drain"));
}

/// An answer the task made while the shard's memory budget is spent still reaches its
/// session, charged whatever the budget has left, as an HTTP answer is: the request ran, and a
/// `503 overloaded` in its place (as before) would have lost its reply.
#[test]
fn an_answer_made_while_the_budget_is_spent_reaches_its_session() {
    const BUDGET: usize = 1024 * 1024;
    // Within the read timeout (5 s) of the wait for its answer.
    const DELAY: Duration = Duration::from_secs(4);
    let r = Router::new()
        .shards(1)
        .limit("body_budget_bytes", BUDGET as u64)
        .start();
    let _t = r.task().delay_ms(DELAY.as_millis() as u64).start();
    let tok = r.token(APP, "alice");
    let held = || r.metrics().get("fedbus_body_bytes_held") as usize;
    // Both sessions open, and b's message made, before a's request starts the task's clock.
    let (mut a, mut b) = (open(&r, &tok), open(&r, &tok));
    let filler = random_bytes(BUDGET, 6);
    // Session a: one request, answered after the task's delay.
    let body = random_bytes(2048, 5);
    let sent = Instant::now();
    a.send_request(1, Some(&r.path(APP, 1)), &body);
    let held_a = wait_for(Duration::from_secs(5), || {
        let h = held();
        (h >= 2048).then_some(h)
    })
    .expect("a's request is charged");
    // Session b: a message that leaves a few hundred bytes of the budget (its metadata takes
    // about 100 bytes beside its payload), all but its last 100 bytes sent: charged whole.
    let size = BUDGET - held_a - 400;
    let wire = b.request_bytes(2, Some(&r.path(APP, 2)), &filler[..size]);
    b.s.write_all(&wire[..wire.len() - 100]).expect("write");
    let full = wait_for(Duration::from_secs(5), || {
        let h = held();
        (h > held_a + size).then_some(h)
    })
    .unwrap_or_else(|| panic!("b is not charged whole: {} bytes held", held()));
    let left = BUDGET.saturating_sub(full);
    assert!(
        left < 1024,
        "{left} bytes of the budget left: the answer would fit"
    );
    assert!(
        sent.elapsed() < DELAY - Duration::from_millis(500),
        "the budget was spent only {:?} after the request: its answer may have come first",
        sent.elapsed()
    );
    assert_echo_frame(&a.read_response(), 1, 1, &body);
}

/// An `/api/ws` message is charged to `limits.body_budget_bytes` from its frame head, as an
/// HTTP body is from its request head: a session that trickles a large message holds it
/// within the budget (`fedbus_body_bytes_held`), and a message that would go over it is
/// refused from its head (counted in `fedbus_overload_refused_total`), dropped as it arrives
/// and answered `503 overloaded`, as one that arrived whole is. Before, a message was charged
/// only once whole.
#[test]
fn a_message_is_charged_to_the_budget_while_it_arrives() {
    let r = Router::new()
        .shards(1)
        .limit("body_budget_bytes", 1024 * 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let held = || r.metrics().get("fedbus_body_bytes_held");
    let refused = || r.metrics().get("fedbus_overload_refused_total");
    // Session a: a 500 KiB request, all but its last 1000 bytes sent.
    let mut a = open(&r, &tok);
    let body = random_bytes(500 * 1024, 7);
    let wire = a.request_bytes(11, Some(&r.path(APP, 1)), &body);
    let (first, rest) = wire.split_at(wire.len() - 1000);
    a.s.write_all(first).expect("write");
    wait_for(Duration::from_secs(5), || {
        (held() >= 500.0 * 1024.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the arriving message is not charged: {} bytes held", held()));
    // Session b: a 600 KiB message would go over the 1 MiB budget: refused from its frame
    // head, read and dropped as it arrives (not buffered), then answered 503; the session
    // goes on.
    let mut b = open(&r, &tok);
    let big = b.request_bytes(12, Some(&r.path(APP, 2)), &random_bytes(600 * 1024, 8));
    b.s.write_all(&big[..4096]).expect("write");
    wait_for(Duration::from_secs(5), || (refused() == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("not refused from its head: {} refused", refused()));
    assert!(held() < 600.0 * 1024.0, "{} bytes held", held());
    b.s.write_all(&big[4096..]).expect("write");
    assert_error_frame(&b.read_response(), 12, 503, "overloaded");
    // Counted by its status as every answer is.
    let answered_503 = r.metrics().get("fedbus_requests_total{status=\"503\"}");
    assert_eq!(answered_503, 1.0);
    b.send_request(13, Some(&r.path(APP, 2)), b"small");
    assert_echo_frame(&b.read_response(), 13, 2, b"small");
    // Session a finishes its message: answered, and the budget is whole again.
    a.s.write_all(rest).expect("write");
    let f = a.read_response();
    assert_echo_frame(&f, 11, 1, &body);
    wait_for(Duration::from_secs(5), || (held() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("{} bytes still held after the answer", held()));
}

/// A message still arriving is charged what came and 128 KiB ahead, not the length its frame
/// announces (which must fit when its head comes), and the charge grows as it arrives: a
/// session trickling a large message held all of it for as long as that took. One that grows
/// past what the others left is refused as it arrives: dropped, then answered `503
/// overloaded`, and the session goes on.
#[test]
fn a_trickled_message_holds_what_it_sent_and_grows_within_the_budget() {
    const KIB: usize = 1024;
    let r = Router::new()
        .shards(1)
        .limit("body_budget_bytes", 1024 * KIB)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let held = || r.metrics().get("fedbus_body_bytes_held") as usize;
    let refused = || r.metrics().get("fedbus_overload_refused_total");
    // a: the first 4 KiB of a 900 KiB message: charged what came and 128 KiB, not 900 KiB.
    let mut a = open(&r, &tok);
    let big = a.request_bytes(21, Some(&r.path(APP, 1)), &random_bytes(900 * KIB, 9));
    a.s.write_all(&big[..4 * KIB]).expect("write");
    wait_for(Duration::from_secs(5), || {
        (held() > 128 * KIB).then_some(())
    })
    .unwrap_or_else(|| panic!("the arriving message is not charged: {} bytes held", held()));
    assert!(held() <= 132 * KIB, "{} bytes held", held());
    // b: a 450 KiB message fits beside it (had a been charged the 900 KiB its frame announces,
    // 124 KiB would be left), all but its last 1000 bytes sent: charged whole. (Its answer is
    // charged too, once made.)
    let mut b = open(&r, &tok);
    let body = random_bytes(450 * KIB, 10);
    let wire = b.request_bytes(22, Some(&r.path(APP, 2)), &body);
    let (first, rest) = wire.split_at(wire.len() - 1000);
    b.s.write_all(first).expect("write");
    wait_for(Duration::from_secs(5), || {
        (held() > 578 * KIB).then_some(())
    })
    .unwrap_or_else(|| panic!("b is not charged: {} bytes held", held()));
    assert_eq!(refused(), 0.0);
    // a sends 600 KiB more: it would hold about 732 KiB, and about 442 are left. Dropped as it
    // arrives, answered 503 once it is in; what it held goes back.
    a.s.write_all(&big[4 * KIB..604 * KIB]).expect("write");
    wait_for(Duration::from_secs(5), || (refused() == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("not refused as it grew: {} refused", refused()));
    a.s.write_all(&big[604 * KIB..]).expect("write");
    assert_error_frame(&a.read_response(), 21, 503, "overloaded");
    assert!(held() < 600 * KIB, "{} bytes held", held());
    a.send_request(23, Some(&r.path(APP, 1)), b"small");
    assert_echo_frame(&a.read_response(), 23, 1, b"small");
    // b finishes: answered whole, and the budget is whole again.
    b.s.write_all(rest).expect("write");
    assert_echo_frame(&b.read_response(), 22, 2, &body);
    wait_for(Duration::from_secs(5), || (held() == 0).then_some(()))
        .unwrap_or_else(|| panic!("{} bytes still held after the answers", held()));
}

/// A Text message is closed with 1003 (fedbus frames are Binary) when it is refused by the
/// body budget while it arrives, as when it arrives whole. Before, the dropped message's first
/// bytes were read as a fedbus frame header: 1002.
#[test]
fn a_text_message_dropped_over_the_budget_is_closed_1003() {
    let r = Router::new()
        .shards(1)
        .limit("body_budget_bytes", 256 * 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let refused = || r.metrics().get("fedbus_overload_refused_total");
    let mut w = open(&r, &tok);
    let text = "x".repeat(300 * 1024);
    let wire = w.frame_bytes(opcode::TEXT, text.as_bytes());
    w.s.write_all(&wire[..4096]).expect("write");
    wait_for(Duration::from_secs(5), || (refused() == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("not refused from its head: {} refused", refused()));
    w.s.write_all(&wire[4096..]).expect("write");
    w.expect_close(1003);
}

/// `/api/ws` takes only upgrades (PROTOCOL.md section 3): another method gets 405 with
/// `Allow: GET`, and a `Sec-WebSocket-Key` that is not base64 of 16 bytes, or comes twice, gets
/// 400 `bad_upgrade`; each answer closes the connection. Before, a POST upgrade was routed as an
/// API call (400 `bad_path`, kept open) and any 24 characters, or two keys, got a 101.
#[test]
fn only_a_well_formed_get_opens_a_session() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let head = |method: &str, keys: &[&str]| {
        let mut h = format!(
            "{method} /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok}\r\n"
        );
        for k in keys {
            h.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
        }
        h + "Content-Length: 0\r\n\r\n"
    };
    let answer = |head: String| -> String {
        let mut s = TcpStream::connect(r.api).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s.write_all(head.as_bytes()).expect("write");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read_retrying(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("not closed after {:?}: {e}", String::from_utf8_lossy(&got)),
            }
        }
        String::from_utf8(got).expect("utf-8")
    };
    let good = "dGhlIHNhbXBsZSBub25jZQ==";
    for method in ["POST", "PUT", "DELETE"] {
        let a = answer(head(method, &[good]));
        assert!(a.starts_with("HTTP/1.1 405 "), "{method}: {a}");
        // Header names are case-insensitive (the HTTP layer writes `allow`).
        assert!(
            a.to_ascii_lowercase().contains("\r\nallow: get\r\n"),
            "{method}: {a}"
        );
        assert!(a.contains("method_not_allowed"), "{method}: {a}");
    }
    // A body still to come, and a request pipelined behind another: 405 all the same.
    let upload = format!(
        "POST /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tok}\r\nContent-Length: 5\r\n\r\n"
    );
    let pipelined = format!(
        "GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n{}",
        head("PUT", &[good])
    );
    for (what, raw) in [("upload", upload), ("pipelined", pipelined)] {
        let a = answer(raw);
        let last = a.rfind("HTTP/1.1 ").expect("an answer");
        assert!(a[last..].starts_with("HTTP/1.1 405 "), "{what}: {a}");
    }
    for keys in [
        &["!!!!!!!!!!!!!!!!!!!!!!!!"][..],
        &["dGhlIHNhbXBsZSBub25jZSE/"],
        &[good, good],
    ] {
        let a = answer(head("GET", keys));
        assert!(a.starts_with("HTTP/1.1 400 "), "{keys:?}: {a}");
        assert!(a.contains("bad_upgrade"), "{keys:?}: {a}");
    }
    // The same head with one good key opens a session.
    let mut s = TcpStream::connect(r.api).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.write_all(head("GET", &[good]).as_bytes()).expect("write");
    let mut chunk = [0u8; 4096];
    let n = s.read_retrying(&mut chunk).expect("read");
    let a = String::from_utf8_lossy(&chunk[..n]);
    assert!(a.starts_with("HTTP/1.1 101 "), "{a}");
}

/// A session opened without a token is anonymous, as an HTTP request without `Authorization`
/// is: the app's anonymous services answer (here `auth`, reached through role `main`'s
/// Redirect), any other service gets `401 missing_token` and the session goes on. A request's
/// METHOD reaches the task as an HTTP method does (absent: POST); one a task cannot be asked
/// is `405 method_not_allowed`. Before, the upgrade needed a token and every request was POST.
#[test]
fn anonymous_sessions_reach_anonymous_services() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let _auth = r.task().role("auth").start();
    let mut w = match upgrade(r.api, "/api/ws?access_token=", None) {
        Upgraded::Open(w) => w,
        Upgraded::Refused { status: st, body } => panic!("anonymous upgrade refused: {st} {body}"),
    };
    let anonymous = r.path(APP, 3).replace("/api/3/", "/auth/3/");
    assert_ne!(anonymous, r.path(APP, 3));
    let served = wait_for(Duration::from_secs(10), || {
        w.send_request(1, Some(&anonymous), b"hello");
        let f = w.read_response();
        (status_of(&f) == 200).then_some(f)
    })
    .expect("the anonymous service answers");
    assert_eq!(&served.payload[..], b"hello", "{}", describe(&served));
    w.send_request(2, Some(&r.path(APP, 3)), b"x");
    assert_error_frame(&w.read_response(), 2, 401, "missing_token");
    let with_method = |w: &mut Ws, id: u64, method: &[u8]| {
        let mut meta = BytesMut::new();
        put_meta(&mut meta, tag::PATH, anonymous.as_bytes());
        put_meta(&mut meta, tag::METHOD, method);
        let f = encode_frame(Kind::Request, 0, 0, 0, id, &meta, b"m");
        w.send_frame(opcode::BINARY, &f);
        w.read_response()
    };
    let put = with_method(&mut w, 3, b"PUT");
    assert_eq!(status_of(&put), 200, "{}", describe(&put));
    assert_eq!(header_of(&put, "echo-method").as_deref(), Some("PUT"));
    let post = with_method(&mut w, 4, b"POST");
    assert_eq!(header_of(&post, "echo-method"), None, "{}", describe(&post));
    assert_error_frame(
        &with_method(&mut w, 5, b"TRACE"),
        5,
        405,
        "method_not_allowed",
    );
}

/// `limits.client_ping_interval_ms`: a session quiet that long with nothing in flight gets a
/// ping. One that answers it (as a browser does by itself) stays open past
/// `limits.idle_timeout_ms` and still serves; one that answers nothing is closed with 1001 at
/// `idle_timeout_ms`, counted in `fedbus_client_ping_timeouts_total`. Before, the router never
/// pinged: every quiet session closed at `idle_timeout_ms`, answered pings or not.
#[test]
fn quiet_sessions_are_pinged_and_kept_while_they_answer() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 1500)
        .limit("client_ping_interval_ms", 500)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let timeouts = || r.metrics().get("fedbus_client_ping_timeouts_total");
    assert_eq!(timeouts(), 0.0);

    // Answers every ping: open for 4 s (over 2x the idle timeout), then serves a request.
    let mut live = open(&r, &tok);
    live.set_read_timeout(Duration::from_secs(3));
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(4) {
        match live.read_msg() {
            Ok(Msg::Ping(p)) => {
                pings += 1;
                live.send_frame(opcode::PONG, &p);
            }
            other => panic!(
                "after {:?}: expected a ping, got {other:?}",
                start.elapsed()
            ),
        }
    }
    assert!(pings >= 4, "{pings} pings in 4 s at a 500 ms interval");
    live.send_request(1, Some(&r.path(APP, 1)), b"still here");
    assert_echo_frame(&live.read_response(), 1, 1, b"still here");
    // Closed by the client: not a ping timeout (and it would be one, left unread).
    live.send_frame(opcode::CLOSE, &1000u16.to_be_bytes());
    live.expect_close(1000);
    assert_eq!(timeouts(), 0.0);

    // Answers nothing: closed with 1001 once idle_timeout_ms passed, not before.
    let mut dead = open(&r, &tok);
    dead.set_read_timeout(Duration::from_secs(5));
    let start = Instant::now();
    assert_eq!(
        dead.read_msg().expect("a ping"),
        Msg::Ping(b"fedbus".to_vec())
    );
    dead.expect_close(1001);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "closed after {took:?}, idle timeout 1.5 s"
    );
    wait_for(Duration::from_secs(5), || (timeouts() == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("fedbus_client_ping_timeouts_total {}", timeouts()));
}

/// Without `client_ping_interval_ms` (the default) a quiet session gets no ping and closes
/// with 1001 at `idle_timeout_ms`, not counted as a ping timeout.
#[test]
fn without_client_pings_a_quiet_session_closes_at_the_idle_timeout() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 1000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    w.set_read_timeout(Duration::from_secs(5));
    let start = Instant::now();
    w.expect_close(1001);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    assert_eq!(r.metrics().get("fedbus_client_ping_timeouts_total"), 0.0);
}

/// A token inside the 5 s leeway after its `exp` is served on `/api/ws` as on HTTP (ROTATION.md
/// "Client JWTs"): the upgrade accepted it, and so does each request. Before, the upgrade took it
/// and its first request closed the session with 1008 (the per-message check had no leeway).
#[test]
fn a_token_inside_the_exp_leeway_is_served_like_on_http() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = expired_token(&r, APP, now() - 1);
    let mut c = r.conn();
    c.send(&Req::post(&r.path(APP, 1)).token(&tok).body(b"h").bytes());
    assert_eq!(c.read_response().expect("an answer").status, 200);
    let mut w = open(&r, &tok);
    w.send_request(1, Some(&r.path(APP, 1)), b"w");
    assert_echo_frame(&w.read_response(), 1, 1, b"w");
    // Past the leeway: the next request closes the session, as HTTP refuses it (401).
    wait_past_exp(&tok);
    w.send_request(2, Some(&r.path(APP, 1)), b"late");
    w.expect_close(1008);
    let mut c = r.conn();
    c.send(&Req::post(&r.path(APP, 1)).token(&tok).body(b"h").bytes());
    assert_eq!(c.read_response().expect("an answer").status, 401);
}

/// The idle clock of a session runs from its last answer: with `idle_timeout_ms` 1000 and an
/// answer 300 ms after the request, the session closes 1001 about 1.3 s after the request,
/// not a whole idle period after the wait that saw the request (2 s).
#[test]
fn the_idle_clock_runs_from_the_last_answer() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 1000)
        .start();
    let _t = r.task().delay_ms(300).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    w.set_read_timeout(Duration::from_secs(5));
    let sent = Instant::now();
    w.send_request(1, Some(&r.path(APP, 1)), b"x");
    assert_echo_frame(&w.read_response(), 1, 1, b"x");
    w.expect_close(1001);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1250) && took < Duration::from_millis(1800),
        "closed {took:?} after the request (answer after 300 ms, idle 1 s)"
    );
}

/// REDIRECT.md: "the websocket endpoint puts the same lines in HEADER entries" as HTTP. A
/// request redirected main -> cmd answers with HEADER `fedbus-hops: 1` and the frame's `hops`
/// 1; a loop (cmd back to main) is 508 `redirect_limit` with `fedbus-hops: 5`; a role nobody
/// serves is 503 `no_live_task` with `retry-after: 1` and the partition asked for; an
/// emergency hop carries `fedbus-emergency`. Locally served answers carry no
/// `fedbus-served-by` (PROTOCOL.md section 8: SERVED_BY only on answers relayed from another
/// cluster).
#[test]
fn redirects_on_api_ws_carry_the_hop_headers() {
    let r = Router::new().shards(1).start();
    let _main = r.task().redirect_to("cmd").start();
    let mut cmd = r.task().role("cmd").partitions("0-7").start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);

    // 42 % 16 = 10: main redirects, cmd serves 10 on its emergency partition.
    let e = fedbus_router::route::elect_emergency(APP, "cmd", 0, 0..8).expect("elected");
    w.send_request(1, Some(&r.path(APP, 42)), b"hello");
    let f = w.read_response();
    let d = describe(&f);
    assert_eq!(status_of(&f), 200, "{d}");
    assert_eq!(&f.payload[..], b"hello", "{d}");
    assert_eq!(f.header.hops, 1, "{d}");
    assert_eq!(header_of(&f, "fedbus-hops").as_deref(), Some("1"), "{d}");
    assert_eq!(
        header_of(&f, "fedbus-partition"),
        Some(e.to_string()),
        "{d}"
    );
    assert_eq!(
        header_of(&f, "fedbus-emergency").as_deref(),
        Some("10"),
        "{d}"
    );
    assert_eq!(header_of(&f, "fedbus-served-by"), None, "{d}");
    // 3: cmd serves it itself, no emergency line.
    w.send_request(2, Some(&r.path(APP, 3)), b"three");
    let f = w.read_response();
    let d = describe(&f);
    assert_eq!(status_of(&f), 200, "{d}");
    assert_eq!(
        header_of(&f, "fedbus-partition").as_deref(),
        Some("3"),
        "{d}"
    );
    assert_eq!(header_of(&f, "fedbus-emergency"), None, "{d}");

    // A loop: cmd sends everything back to main.
    cmd.kill();
    let looping = r.task().role("cmd").redirect_to("main").start();
    w.send_request(3, Some(&r.path(APP, 42)), b"loop");
    let f = w.read_response();
    let d = describe(&f);
    assert_error_frame(&f, 3, 508, "redirect_limit");
    assert_eq!(header_of(&f, "fedbus-hops").as_deref(), Some("5"), "{d}");
    assert_eq!(f.header.hops, 5, "{d}");
    let j: serde_json::Value = serde_json::from_slice(&f.payload).expect("json");
    assert_eq!(j["message"], "more than 4 redirects", "{d}");
    drop(looping);
    // cmd served by nobody: 503 after one hop, for the partition asked.
    let gone = wait_for(Duration::from_secs(5), || {
        w.send_request(4, Some(&r.path(APP, 42)), b"gone");
        let f = w.read_response();
        (status_of(&f) == 503).then_some(f)
    })
    .expect("503 once the cmd task is gone");
    let d = describe(&gone);
    assert_error_frame(&gone, 4, 503, "no_live_task");
    assert_eq!(header_of(&gone, "retry-after").as_deref(), Some("1"), "{d}");
    assert_eq!(
        header_of(&gone, "fedbus-partition").as_deref(),
        Some("10"),
        "{d}"
    );
    assert_eq!(header_of(&gone, "fedbus-hops").as_deref(), Some("1"), "{d}");
    let j: serde_json::Value = serde_json::from_slice(&gone.payload).expect("json");
    assert_eq!(
        j["message"], "no live task serves demo/echo role cmd partition 10",
        "{d}"
    );
}
