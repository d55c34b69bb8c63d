//! The core data plane end to end: real routers and echo tasks on 127.0.0.1.
//! Issue "Core data plane", acceptance: keep-alive and pipelining, every error status, forged
//! tokens, a task killed mid-request, and 2 shards where each request is served over the link
//! of the shard that accepted it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fedbus_auth::{sign_client_jwt, ClientClaims, Keyring};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

fn now() -> u64 {
    fedbus_auth::now_unix()
}

/// A 200 echo of `body` from partition `wsid % 16`.
fn assert_echo(r: &Response, wsid: u64, body: &[u8]) {
    assert_eq!(r.status, 200, "wsid {wsid}: {r:?}");
    assert!(
        r.body == body,
        "wsid {wsid}: body of {} bytes differs from the {} sent",
        r.body.len(),
        body.len()
    );
    assert_eq!(
        r.header("fedbus-partition"),
        Some((wsid % 16).to_string().as_str()),
        "{r:?}"
    );
    assert!(r.header("fedbus-shard").is_some(), "{r:?}");
    assert_eq!(r.header("fedbus-hops"), Some("0"), "{r:?}");
}

#[test]
fn echo_round_trip_is_byte_identical() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    for (i, n) in [0usize, 1, 64 * 1024, 1 << 20].into_iter().enumerate() {
        let body = random_bytes(n, 7 + i as u64);
        let wsid = 1000 + i as u64 * 7;
        let resp = c.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(&body));
        assert_echo(&resp, wsid, &body);
        assert_eq!(
            resp.header("content-type"),
            Some("application/octet-stream")
        );
        // The same on a fresh connection (maybe the other shard).
        let resp = r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(&body));
        assert_echo(&resp, wsid, &body);
    }
    // The client's content type goes through; GET without a body works.
    let resp = c.request(
        &Req::post(&r.path(APP, 3))
            .token(&tok)
            .header("Content-Type", "application/json")
            .body(b"{\"a\":1}"),
    );
    assert_echo(&resp, 3, b"{\"a\":1}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let resp = c.request(&Req::get(&r.path(APP, 17)).token(&tok));
    assert_echo(&resp, 17, b"");
}

#[test]
fn keep_alive_and_pipelining() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");

    // Keep-alive: 100 requests, one connection.
    let mut c = r.conn();
    let mut shards = BTreeSet::new();
    for i in 0..100u64 {
        let body = format!("keep-alive request {i}").into_bytes();
        let resp = c.request(&Req::post(&r.path(APP, i)).token(&tok).body(&body));
        assert_echo(&resp, i, &body);
        assert_eq!(resp.header("connection"), None, "{resp:?}");
        shards.insert(resp.header("fedbus-shard").unwrap().to_string());
    }
    assert_eq!(
        shards.len(),
        1,
        "one connection stays on one shard: {shards:?}"
    );

    // Pipelining: 32 requests in one write, 32 answers in order.
    let mut c = r.conn();
    let mut wire = Vec::new();
    let mut sent = Vec::new();
    for i in 0..32u64 {
        let wsid = 5000 + i * 13;
        let body = random_bytes(100 + i as usize * 97, i);
        wire.extend_from_slice(
            &Req::post(&r.path(APP, wsid))
                .token(&tok)
                .body(&body)
                .bytes(),
        );
        sent.push((wsid, body));
    }
    c.send(&wire);
    for (wsid, body) in &sent {
        let resp = c.read_response().expect("pipelined response");
        assert_echo(&resp, *wsid, body);
    }
    // The connection is still usable afterwards.
    let resp = c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"after"));
    assert_echo(&resp, 1, b"after");
}

/// SIGTERM while a client keeps about three requests in flight on one connection (a new one
/// every third of the task's delay, whatever the answers do: a busy pipelining client): the
/// draining router reads no new request on it, answers the ones it started (the last with
/// `Connection: close`), and exits long before `readiness.drain_timeout_ms`. It used to read
/// on: no answer was ever the last one in flight, so none said close, and the drain ran to
/// its timeout.
#[test]
fn a_draining_router_closes_a_busy_pipelined_connection() {
    let mut r = Router::new()
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(300).start();
    let tok = r.token(APP, "alice");
    // 64 KiB bodies: with one in flight the connection holds 64 KiB of them and reads ahead
    // into a new buffer (small requests wait for their answers once the read buffer is full,
    // which leaves one answer the last now and then).
    let body = |i: u64| random_bytes(64 * 1024, i);
    let wire: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            Req::post(&r.path(APP, i))
                .token(&tok)
                .body(&body(i))
                .bytes()
        })
        .collect();
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(10));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut w, stop) = (c.writer(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write as _;
            for req in &wire {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || w.write_all(req).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut answered = 0u64;
    let mut termed = None;
    let mut closed = None;
    while answered < 90 {
        let resp = c.read_response().expect("an answer before the close");
        assert_echo(&resp, answered, &body(answered));
        answered += 1;
        if answered == 3 {
            r.sigterm();
            termed = Some(Instant::now());
        }
        if resp.header("connection") == Some("close") {
            closed = Some(Instant::now());
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    let termed = termed.expect("SIGTERM sent");
    let closed = closed.unwrap_or_else(|| {
        panic!("no Connection: close in {answered} answers, 3 of them before the drain")
    });
    assert!(c.is_closed(), "the connection closes after its last answer");
    let exit = r.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "exits 0 once nothing is in flight: {exit:?}"
    );
    eprintln!(
        "close {:?} after SIGTERM, {answered} answered",
        closed - termed
    );
}

/// An unauthenticated upload is refused on its head: no `100 Continue`, no body buffered.
#[test]
fn expect_continue_without_token_is_refused_before_the_body() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let _t = r.task().start();
    let p = r.path(APP, 3);
    let mut c = r.conn();
    c.send(
        format!("POST {p} HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\nExpect: 100-continue\r\n\r\n")
            .as_bytes(),
    );
    let resp = c.read_response().expect("an answer before any body byte");
    resp.assert_error(401, "missing_token");
    // With a token: the head passes, the body follows, the echo comes back (the harness's
    // reader skips the `100 Continue`).
    let mut c = r.conn();
    c.send(
        format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    c.send(b"hello");
    let resp = c.read_response().expect("echo");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"hello");
}

#[test]
fn every_error_status() {
    let r = Router::new()
        .shards(1)
        .limit("max_body_bytes", 1024)
        .start();
    let tok = r.token(APP, "alice");
    let other = r.token("demo/other", "bob");
    let p = r.path(APP, 42);

    // 503 with Retry-After: no task at all.
    let resp = r.request(&Req::post(&p).token(&tok).body(b"x"));
    resp.assert_error(503, "no_live_task");
    assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");

    let _t = r.task().start();
    assert_echo(
        &r.request(&Req::post(&p).token(&tok).body(b"ok")),
        42,
        b"ok",
    );

    // 503: an app whose partitions no task serves (demo/other has none).
    let resp = r.request(&Req::post(&r.path("demo/other", 1)).token(&other));
    resp.assert_error(503, "no_live_task");
    assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");

    // 400: bad path, bad wsid, malformed request line.
    r.request(&Req::post("/api/local/dev/demo/echo/api/42/sys").token(&tok))
        .assert_error(400, "bad_path");
    r.request(&Req::post("/api/local/dev/demo/echo/api/notanumber/sys/echo").token(&tok))
        .assert_error(400, "bad_wsid");
    let mut c = r.conn();
    c.send(b"NOT A REQUEST LINE\r\n\r\n");
    c.read_response()
        .expect("answer")
        .assert_error(400, "bad_request");
    assert!(c.is_closed(), "closed after a malformed request");

    // 401: no token, garbage token, not `Bearer`, expired.
    r.request(&Req::post(&p).body(b"x"))
        .assert_error(401, "missing_token");
    r.request(&Req::post(&p).token("garbage").body(b"x"))
        .assert_error(401, "bad_token");
    r.request(&Req::post(&p).header("Authorization", &format!("Basic {tok}")))
        .assert_error(401, "bad_token");
    let keyring = Keyring::load(&r.keys).expect("keyring");
    let secret = keyring.signing_app_secret(APP).expect("secret");
    let expired = sign_client_jwt(
        secret,
        &ClientClaims {
            sub: "alice".into(),
            app: APP.into(),
            iat: now() - 7200,
            exp: now() - 3600,
            nbf: None,
        },
    )
    .unwrap();
    r.request(&Req::post(&p).token(&expired))
        .assert_error(401, "expired_token");

    // 403 (a valid token of another app): see `token_of_another_app_is_403`.

    // 404: unknown app, unknown cluster.
    r.request(&Req::post(&r.path("demo/nope", 1)).token(&tok))
        .assert_error(404, "unknown_app");
    r.request(&Req::post("/api/other/x/demo/echo/api/42/sys/echo").token(&tok))
        .assert_error(404, "unknown_cluster");

    // 405: a method no task can be asked.
    r.request(&Req::new("TRACE", &p).token(&tok).body(b"x"))
        .assert_error(405, "method_not_allowed");

    // 411: chunked bodies are refused.
    let mut c = r.conn();
    c.send(
        &Req::post(&p)
            .token(&tok)
            .header("Transfer-Encoding", "chunked")
            .no_content_length()
            .body(b"5\r\nhello\r\n0\r\n\r\n")
            .bytes(),
    );
    c.read_response()
        .expect("answer")
        .assert_error(411, "length_required");

    // 413: body over the configured 1024 bytes (refused from the head alone); 1024 is fine.
    let resp = r.request(&Req::post(&p).token(&tok).body(&[b'a'; 1024]));
    assert_echo(&resp, 42, &[b'a'; 1024]);
    let mut c = r.conn();
    c.send_lossy(&Req::post(&p).token(&tok).body(&[b'a'; 1025]).bytes());
    c.read_response()
        .expect("answer")
        .assert_error(413, "body_too_large");

    // 431: a 20 KiB header (default limit 16 KiB).
    let mut c = r.conn();
    c.send_lossy(
        &Req::post(&p)
            .token(&tok)
            .header("X-Big", &"b".repeat(20 * 1024))
            .bytes(),
    );
    c.read_response()
        .expect("answer")
        .assert_error(431, "headers_too_large");

    // 431 also past 100 header fields (fedbus_proto::http::MAX_HEADERS), however small; 90
    // small ones beside the request's own are served.
    let with_headers = |n: usize| {
        (0..n).fold(Req::post(&p).token(&tok).body(b"h"), |q, i| {
            q.header(&format!("x-h{i}"), "v")
        })
    };
    assert_echo(&r.request(&with_headers(90)), 42, b"h");
    let mut c = r.conn();
    c.send_lossy(&with_headers(101).bytes());
    c.read_response()
        .expect("answer")
        .assert_error(431, "headers_too_large");

    // An absolute-form target (RFC 9112 3.2.2: a server must accept it) is routed by its path.
    let absolute = format!("http://{}{p}", r.api);
    assert_echo(
        &r.request(&Req::post(&absolute).token(&tok).body(b"a")),
        42,
        b"a",
    );

    // Errors on a keep-alive connection that stays open: 401 then 200.
    let mut c = r.conn();
    c.request(&Req::post(&p).body(b"x"))
        .assert_error(401, "missing_token");
    assert_echo(&c.request(&Req::post(&p).token(&tok).body(b"y")), 42, b"y");
}

/// With `limits.max_header_bytes` raised past 64 KiB, a request target, bearer token, content
/// type or origin longer than a frame's metadata value holds (65535 bytes) is refused (414,
/// 431) instead of reaching a task or another cluster cut; a field the router does not carry on
/// may be that long, and the longest carried ones are served.
#[test]
fn fields_longer_than_a_metadata_value_are_refused_not_cut() {
    let r = Router::new()
        .shards(1)
        .limit("max_header_bytes", 1 << 20)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 42);
    let refused = |q: Req, status: u16, code: &str| {
        let mut c = r.conn();
        c.send_lossy(&q.bytes());
        c.read_response()
            .expect("answer")
            .assert_error(status, code);
    };
    // The target: a query string (which routing ignores) makes it 65536 bytes; 65535 is
    // served.
    let target = |len: usize| format!("{p}?{}", "q".repeat(len - p.len() - 1));
    refused(Req::post(&target(65_536)).token(&tok), 414, "uri_too_long");
    let long = target(65_535);
    let served = r.request(&Req::post(&long).token(&tok).body(b"t"));
    assert_eq!(served.status, 200, "{served:?}");
    // Carried fields.
    let bearer = "a".repeat(65_536);
    refused(Req::post(&p).token(&bearer), 431, "headers_too_large");
    let ctype = "x".repeat(65_536);
    refused(
        Req::post(&p).token(&tok).header("Content-Type", &ctype),
        431,
        "headers_too_large",
    );
    refused(
        Req::post(&p).token(&tok).header("Origin", &ctype),
        431,
        "headers_too_large",
    );
    // A field the router does not carry on: 200 KiB of it is served.
    let big = "b".repeat(200 * 1024);
    assert_echo(
        &r.request(&Req::post(&p).token(&tok).header("X-Big", &big).body(b"ok")),
        42,
        b"ok",
    );
}

#[test]
fn task_killed_mid_request_is_502_without_hang() {
    let r = Router::new().shards(1).start();
    let mut t = r.task().delay_ms(5000).start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    c.send(&Req::post(&r.path(APP, 7)).token(&tok).body(b"slow").bytes());
    r.wait_pending(1.0);
    let killed = Instant::now();
    t.kill();
    c.set_read_timeout(Duration::from_secs(3));
    let resp = c
        .read_response()
        .expect("an answer after the kill, not a hang");
    let took = killed.elapsed();
    resp.assert_error(502, "task_lost");
    assert!(
        took < Duration::from_secs(2),
        "502 came {took:?} after the kill"
    );
    // The connection still serves (503: no task left).
    let resp = c.request(&Req::post(&r.path(APP, 7)).token(&tok).body(b"again"));
    resp.assert_error(503, "no_live_task");
}

#[test]
fn task_answer_timeout_is_504() {
    let r = Router::new().shards(1).request_timeout_ms(500).start();
    let _t = r.task().delay_ms(3000).start();
    let tok = r.token(APP, "alice");
    let start = Instant::now();
    let resp = r.request(&Req::post(&r.path(APP, 7)).token(&tok).body(b"slow"));
    let took = start.elapsed();
    resp.assert_error(504, "task_timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2000),
        "504 after {took:?}, timeout 500 ms"
    );
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// A JWT from raw header and claims JSON, HS256-signed with `secret` (or `sig` verbatim).
fn hand_jwt(header: &str, claims: &str, secret: Option<&[u8]>) -> String {
    let signing_input = format!("{}.{}", b64(header), b64(claims));
    let sig = match secret {
        Some(s) => {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s);
            URL_SAFE_NO_PAD.encode(ring::hmac::sign(&k, signing_input.as_bytes()).as_ref())
        }
        None => String::new(),
    };
    format!("{signing_input}.{sig}")
}

#[test]
fn forged_tokens_are_refused() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let p = r.path(APP, 9);
    let keyring = Keyring::load(&r.keys).expect("keyring");
    let secret = keyring.signing_app_secret(APP).expect("secret");
    assert_eq!(secret.version, 1);
    let (iat, exp) = (now(), now() + 600);
    let claims = format!(r#"{{"sub":"mallory","app":"{APP}","iat":{iat},"exp":{exp}}}"#);
    let hs256 = r#"{"alg":"HS256","typ":"JWT","kid":"1"}"#;

    // Control: the hand-built token with the right secret passes, so every refusal below is
    // about the one thing forged.
    let good = hand_jwt(hs256, &claims, Some(&secret.secret));
    assert_echo(
        &r.request(&Req::post(&p).token(&good).body(b"ok")),
        9,
        b"ok",
    );

    // Signed with another keyring's secret (same app, same kid).
    let other_keys = r.home().join("keys-other");
    keys_init(r.home(), &other_keys, &[APP]);
    let foreign = fedbus(
        r.home(),
        &[
            "token",
            "client",
            "--app",
            APP,
            "--sub",
            "mallory",
            "--keyring",
            other_keys.to_str().unwrap(),
        ],
    );
    r.request(&Req::post(&p).token(foreign.trim()))
        .assert_error(401, "bad_signature");

    // alg none, with and without a signature.
    let none = r#"{"alg":"none","typ":"JWT","kid":"1"}"#;
    r.request(&Req::post(&p).token(&hand_jwt(none, &claims, None)))
        .assert_error(401, "bad_token");
    r.request(&Req::post(&p).token(&hand_jwt(none, &claims, Some(&secret.secret))))
        .assert_error(401, "bad_token");

    // RS256 header with an HMAC signature made with the app secret.
    let rs = r#"{"alg":"RS256","typ":"JWT","kid":"1"}"#;
    r.request(&Req::post(&p).token(&hand_jwt(rs, &claims, Some(&secret.secret))))
        .assert_error(401, "bad_token");

    // Expired, properly signed.
    let expired = sign_client_jwt(
        secret,
        &ClientClaims {
            sub: "mallory".into(),
            app: APP.into(),
            iat: iat - 1000,
            exp: iat - 100,
            nbf: None,
        },
    )
    .unwrap();
    r.request(&Req::post(&p).token(&expired))
        .assert_error(401, "expired_token");

    // `exp` as a string, correct HS256 signature.
    let str_exp = format!(r#"{{"sub":"mallory","app":"{APP}","iat":{iat},"exp":"{exp}"}}"#);
    r.request(&Req::post(&p).token(&hand_jwt(hs256, &str_exp, Some(&secret.secret))))
        .assert_error(401, "bad_token");

    // Claims naming another app, signed with this app's secret: 403 (the signature is right,
    // the app is not). A real token of another app: `token_of_another_app_is_403`.
    let other_claims = format!(r#"{{"sub":"mallory","app":"demo/other","iat":{iat},"exp":{exp}}}"#);
    r.request(&Req::post(&p).token(&hand_jwt(hs256, &other_claims, Some(&secret.secret))))
        .assert_error(403, "wrong_app");

    // Unknown kid, correct signature with v1's secret.
    let kid99 = r#"{"alg":"HS256","typ":"JWT","kid":"99"}"#;
    r.request(&Req::post(&p).token(&hand_jwt(kid99, &claims, Some(&secret.secret))))
        .assert_error(401, "unknown_key");

    // Tampered claims (sub changed after signing).
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = b64(&claims.replace("mallory", "admin"));
    r.request(&Req::post(&p).token(&parts.join(".")))
        .assert_error(401, "bad_signature");

    // The good token still works afterwards (no state poisoned by the refusals).
    assert_echo(
        &r.request(&Req::post(&p).token(&good).body(b"ok")),
        9,
        b"ok",
    );
}

#[test]
fn two_shards_serve_over_the_accepting_shards_link() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut seen = BTreeSet::new();
    let mut conns = 0;
    while conns < 64 && (conns < 16 || seen.len() < 2) {
        conns += 1;
        let mut c = r.conn();
        for k in 0..2u64 {
            let wsid = conns * 31 + k;
            let body = format!("conn {conns} request {k}").into_bytes();
            let resp = c.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(&body));
            assert_echo(&resp, wsid, &body);
            let shard = resp.header("fedbus-shard").unwrap();
            assert_eq!(
                Some(shard),
                resp.header("echo-link-shard"),
                "request accepted on shard {shard} was served over another shard's link: {resp:?}"
            );
            seen.insert(shard.to_string());
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["0", "1"],
        "{conns} connections did not reach both shards"
    );
}

#[test]
fn lost_task_link_leaves_the_routing_table() {
    let r = Router::new().shards(2).start();
    let mut t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 5);
    assert_echo(&r.request(&Req::post(&p).token(&tok).body(b"a")), 5, b"a");

    let links = r.metrics().get("fedbus_task_links");
    let killed = Instant::now();
    t.kill();
    // Each shard sees its link close when it next runs and reads the EOF; until then a
    // request it takes may still go to the dead task (502). Waiting for the first 503 was not
    // enough: on a loaded machine the other shard had not read its EOF yet. It must be the
    // EOF, not the links' silence timeout (3 ping intervals, 6 s): within 5 s.
    let gone = wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_task_links") <= links - 2.0).then(Instant::now)
    })
    .expect("the router did not see the task's two links close within 5 s of the kill");
    eprintln!("kill -> both links closed: {:?}", gone - killed);
    let resp = r.request(&Req::post(&p).token(&tok).body(b"b"));
    resp.assert_error(503, "no_live_task");
    assert_eq!(resp.header("retry-after"), Some("1"));
    // Stays 503 on both shards (fresh connections).
    for _ in 0..8 {
        r.request(&Req::post(&p).token(&tok))
            .assert_error(503, "no_live_task");
    }

    let _t2 = r.task().start();
    for i in 0..8u64 {
        let resp = r.request(&Req::post(&p).token(&tok).body(&[i as u8; 3]));
        assert_echo(&resp, 5, &[i as u8; 3]);
    }
}

#[test]
fn metrics_are_prometheus_text_and_count_requests() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let before = r.metrics();
    assert!(
        before
            .0
            .contains_key("fedbus_requests_total{status=\"200\"}"),
        "{before:?}"
    );
    let ok0 = before.get("fedbus_requests_total{status=\"200\"}");
    let e401 = before.get("fedbus_requests_total{status=\"401\"}");

    let n = 23;
    for i in 0..n {
        let mut c = r.conn();
        assert_echo(
            &c.request(&Req::post(&r.path(APP, i)).token(&tok).body(b"m")),
            i,
            b"m",
        );
    }
    r.request(&Req::post(&r.path(APP, 1)))
        .assert_error(401, "missing_token");

    let after = r.metrics();
    assert_eq!(
        after.get("fedbus_requests_total{status=\"200\"}") - ok0,
        n as f64,
        "200s counted"
    );
    assert_eq!(
        after.get("fedbus_requests_total{status=\"401\"}") - e401,
        1.0
    );
    assert_eq!(after.get("fedbus_task_links"), 2.0, "one link per shard");

    // The admin listener's other endpoints. demo/other has no task: live, not ready.
    for (path, status, body) in [
        ("/healthz", 200, "ok\n"),
        (
            "/readyz",
            503,
            "not ready: app demo/other: 0 of 4 partitions have a live task\n",
        ),
    ] {
        assert_eq!(admin_get(r.admin, path), (status, body.to_string()));
    }
}

/// `/readyz` means "can serve": not before the apps' partitions have live tasks
/// (`readiness.coverage`, default `all`), ready once they do, not again when the task goes.
#[test]
fn readyz_follows_task_coverage() {
    let r = Router::new().shards(2).apps(&[(APP, 16)]).start();
    let (status, body) = admin_get(r.admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        "not ready: app demo/echo: 0 of 16 partitions have a live task\n"
    );
    assert_eq!(r.metrics().get("fedbus_ready"), 0.0);
    let mut t = r.task().partitions("0-7").start();
    let (_, body) = admin_get(r.admin, "/readyz");
    assert!(
        body.starts_with("not ready: app demo/echo: 8 of 16") || body.contains("0 of 16"),
        "half the partitions: {body}"
    );
    let _t2 = r.task().partitions("8-15").start();
    let ready = wait_for(Duration::from_secs(10), || {
        (admin_get(r.admin, "/readyz") == (200, "ready\n".to_string())).then_some(())
    });
    assert!(ready.is_some(), "{:?}", admin_get(r.admin, "/readyz"));
    assert_eq!(r.metrics().get("fedbus_ready"), 1.0);
    t.kill();
    let gone = wait_for(Duration::from_secs(10), || {
        let (s, b) = admin_get(r.admin, "/readyz");
        (s == 503 && b.contains("8 of 16")).then_some(())
    });
    assert!(gone.is_some(), "{:?}", admin_get(r.admin, "/readyz"));
}

/// "403 token of another app": a token minted by `fedbus token client --app demo/other` (signed
/// with demo/other's secret) used on demo/echo.
#[test]
fn token_of_another_app_is_403() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let other = r.token("demo/other", "bob");
    // The token itself is good for its own app (503: no demo/other task, but past auth).
    r.request(&Req::post(&r.path("demo/other", 1)).token(&other))
        .assert_error(503, "no_live_task");
    let resp = r.request(&Req::post(&r.path(APP, 42)).token(&other).body(b"x"));
    resp.assert_error(403, "wrong_app");
    // The same on a keep-alive connection after a good request (the auth cache).
    let mut c = r.conn();
    let tok = r.token(APP, "alice");
    assert_echo(
        &c.request(&Req::post(&r.path(APP, 42)).token(&tok).body(b"a")),
        42,
        b"a",
    );
    c.request(&Req::post(&r.path(APP, 42)).token(&other))
        .assert_error(403, "wrong_app");
}

/// A task link is authenticated once, at the upgrade: it is closed when its service token
/// expires, and the task cannot come back with the expired token.
#[test]
fn task_link_closes_when_its_service_token_expires() {
    let r = Router::new().shards(1).start();
    // Before the token is made: it expires 3 s after its `iat`, which is whole unix seconds, so
    // more than 2 s after this.
    let minted = Instant::now();
    let out = std::process::Command::new(bin())
        .args([
            "token",
            "service",
            "--task-id",
            "short-lived",
            "--app",
            APP,
            "--ttl",
            "3s",
        ])
        .args(["--keyring", r.keys.to_str().expect("utf-8 path")])
        .output()
        .expect("fedbus token service");
    assert!(out.status.success(), "{out:?}");
    let st = String::from_utf8(out.stdout).expect("utf-8");
    let _t = r.task().service_token(st.trim()).start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 5);
    assert_eq!(r.request(&Req::post(&p).token(&tok).body(b"x")).status, 200);
    // Gone within a few seconds of the expiry (3 s), never to come back with that token.
    let deadline = minted + Duration::from_secs(10);
    loop {
        let resp = r.request(&Req::post(&p).token(&tok).body(b"x"));
        if resp.status == 503 {
            resp.assert_error(503, "no_live_task");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task link outlived its token: {resp:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        minted.elapsed() >= Duration::from_secs(2),
        "closed before the token expired"
    );
    std::thread::sleep(Duration::from_secs(1));
    r.request(&Req::post(&p).token(&tok).body(b"x"))
        .assert_error(503, "no_live_task");
}

/// A validly signed service token with a far-future `exp` (u64::MAX) registers and serves,
/// and the shard keeps answering: its expiry timer once overflowed the timer's deadline and
/// panicked the shard (the process stayed up, `/healthz` said 200, nothing was answered).
#[test]
fn far_future_service_token_does_not_kill_the_shard() {
    let r = Router::new().shards(1).start();
    let (kid, key) = Keyring::cluster_signing_key(&r.keys).expect("cluster key");
    let token = fedbus_auth::sign_service_token(
        &key,
        &fedbus_auth::ServiceClaims {
            kid,
            sub: "forever".into(),
            app: APP.into(),
            cluster: "local/dev".into(),
            iat: now(),
            exp: u64::MAX,
            role: None,
        },
    );
    let _t = r.task().service_token(&token).start();
    let tok = r.token(APP, "alice");
    for wsid in 0..8 {
        let resp = r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(b"far"));
        assert_echo(&resp, wsid, b"far");
    }
    let m = r.metrics();
    assert_eq!(m.get("fedbus_task_links"), 1.0, "the link is registered");
}

/// One slow client cannot block the admin listener: while a connection trickles its request
/// head a byte at a time, scrapes are answered, and the slow one is cut at its head deadline.
#[test]
fn a_slow_admin_client_does_not_block_scrapes() {
    use std::io::{Read, Write};
    let r = Router::new().shards(1).start();
    let mut slow = std::net::TcpStream::connect(r.admin).expect("connect admin");
    slow.write_all(b"GET /met").expect("first bytes");
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        // One byte every 300 ms: each read of the old single-threaded server waited for it.
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(300));
            if slow.write_all(b"r").is_err() {
                break;
            }
            sent += 1;
        }
        let mut rest = Vec::new();
        let _ = slow.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = slow.read_to_end(&mut rest);
        (sent, started.elapsed())
    });
    for _ in 0..3 {
        let m = r.metrics();
        assert!(m.get("fedbus_routing_generation") >= 1.0);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "three scrapes waited behind the slow client: {:?}",
        started.elapsed()
    );
    let (sent, took) = trickle.join().expect("trickle thread");
    assert!(
        took < Duration::from_secs(6),
        "the slow client was never cut ({sent} bytes over {took:?})"
    );
}

/// The head deadline holds for the start of a head that came with the request before it: a
/// client that sends a request and the first bytes of the next in one write, then nothing,
/// gets its answer, then 408 at `limits.handshake_timeout_ms`. Before, those bytes waited
/// `limits.idle_timeout_ms` (60 s) and the connection could not be closed for room.
#[test]
fn the_start_of_a_head_behind_a_request_has_the_head_deadline() {
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 800)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    let mut bytes = Req::post(&r.path(APP, 1)).token(&tok).body(b"one").bytes();
    bytes.extend_from_slice(b"POST /api/");
    let started = Instant::now();
    c.send(&bytes);
    c.set_read_timeout(Duration::from_secs(10));
    let first = c.read_response().expect("the first request's answer");
    assert_eq!((first.status, first.body.as_slice()), (200, &b"one"[..]));
    let second = c
        .read_response()
        .expect("an answer to the head that never came whole");
    second.assert_error(408, "request_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut after {:?}",
        started.elapsed()
    );
}

/// A request head must be complete within `limits.handshake_timeout_ms` of its first byte: a
/// client that trickles one byte at a time (each read resetting any idle timer) gets 408 and
/// the connection closes, instead of holding it forever.
#[test]
fn a_trickled_request_head_gets_408() {
    use std::io::Write;
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 800)
        .start();
    let mut s = std::net::TcpStream::connect(r.api).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .expect("timeout");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
        r.path(APP, 1)
    );
    let started = Instant::now();
    let mut got = Vec::new();
    for b in head.bytes() {
        if s.write_all(&[b]).is_err() {
            break;
        }
        let mut chunk = [0u8; 1024];
        match s.read_retrying(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        if !got.is_empty() || started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "got {text:?} after {:?}",
        started.elapsed()
    );
    assert!(text.contains("request_timeout"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut only after {:?}",
        started.elapsed()
    );
}

/// `limits.max_link_connections_per_shard` holds for a burst too: connections that arrive
/// together, before any of them is served, are counted as they are accepted, so no more than
/// the limit are held open once the burst is in; each of the rest was closed at accept or,
/// for a newer one, in its handshake (each counted).
#[test]
fn a_burst_of_connections_does_not_pass_the_internal_limit() {
    let r = Router::new()
        .shards(1)
        .limit("max_link_connections_per_shard", 2)
        .limit("handshake_timeout_ms", 20000)
        .start();
    let gauge = |r: &Router| r.metrics().get("fedbus_connections{listener=\"internal\"}");
    let closed = |r: &Router| {
        let m = r.metrics();
        m.get("fedbus_connections_refused_total")
            + m.get("fedbus_link_handshakes_evicted_total{listener=\"internal\"}")
    };
    let closed_before = closed(&r);
    const BURST: usize = 40;
    // All connected (in the kernel's backlog) before the router accepts the first.
    let held: Vec<std::net::TcpStream> = (0..BURST)
        .map(|_| std::net::TcpStream::connect(r.internal[0]).expect("connect internal"))
        .collect();
    let settled = wait_for(Duration::from_secs(10), || {
        let (c, g) = (closed(&r) - closed_before, gauge(&r));
        (c + g == BURST as f64 && g <= 2.0).then_some(())
    });
    assert!(
        settled.is_some(),
        "burst not settled: {} closed, {} open",
        closed(&r) - closed_before,
        gauge(&r)
    );
    assert_eq!(
        gauge(&r),
        2.0,
        "internal connections held open after a burst of {BURST}"
    );
    assert_eq!(closed(&r) - closed_before, (BURST - 2) as f64);
    drop(held);
}

/// The internal listener has its own per-shard connection limit: connections that never
/// finish a handshake cannot use up the router's descriptors, nor lock task links out. At the
/// limit a new connection takes the slot of the oldest one that has not shown a service token
/// yet (closed, `fedbus_link_handshakes_evicted_total`), never a registered link's; with every
/// slot held by links, it is closed at accept (`fedbus_connections_refused_total`). Clients
/// are served throughout.
#[test]
fn the_internal_listener_has_a_connection_limit() {
    let r = Router::new()
        .shards(1)
        .limit("max_link_connections_per_shard", 2)
        .limit("handshake_timeout_ms", 30000)
        .start();
    let _t = r.task().start();
    let m = |r: &Router, s: &str| r.metrics().get(s);
    let gauge = |r: &Router| m(r, "fedbus_connections{listener=\"internal\"}");
    let evicted = |r: &Router| {
        m(
            r,
            "fedbus_link_handshakes_evicted_total{listener=\"internal\"}",
        )
    };
    let refused = |r: &Router| m(r, "fedbus_connections_refused_total");
    // The task holds one; one more silent connection fills the listener.
    let mut idle = std::net::TcpStream::connect(r.internal[0]).expect("connect internal");
    assert!(
        wait_for(Duration::from_secs(5), || (gauge(&r) >= 2.0).then_some(())).is_some(),
        "internal connections: {}",
        gauge(&r)
    );
    let refused_before = refused(&r);
    // A third: the silent one is closed for it (long before its 30 s handshake deadline), the
    // task's link is not.
    let mut over = std::net::TcpStream::connect(r.internal[0]).expect("connect internal");
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)),
        "the oldest connection in its handshake was not closed for a new one"
    );
    assert!(
        !closed_within(&mut over, Duration::from_millis(300)),
        "the new connection was closed instead"
    );
    assert_eq!(evicted(&r), 1.0);
    assert_eq!(refused(&r), refused_before);
    assert!(
        r.log()
            .contains("closed the oldest connection still in its handshake"),
        "{}",
        r.log()
    );
    // Clients are still served (the api listener has its own limit), through the task's link.
    let tok = r.token(APP, "alice");
    assert_echo(
        &r.request(&Req::post(&r.path(APP, 2)).token(&tok).body(b"ok")),
        2,
        b"ok",
    );
    // A new task links at once: its connection takes the silent one's slot.
    let _other = r.task().app("demo/other").partitions("0-3").start();
    assert!(
        closed_within(&mut over, Duration::from_secs(5)),
        "the silent connection kept its slot from a task"
    );
    let otok = r.token("demo/other", "bob");
    let resp = r.request(
        &Req::post(&r.path("demo/other", 1))
            .token(&otok)
            .body(b"back"),
    );
    assert_eq!(
        (resp.status, resp.body.as_slice()),
        (200, &b"back"[..]),
        "{resp:?}"
    );
    assert_eq!(evicted(&r), 2.0);
    // Every slot is a registered link now: a new connection is closed at accept and both
    // links keep serving.
    let mut late = std::net::TcpStream::connect(r.internal[0]).expect("connect internal");
    assert!(
        closed_within(&mut late, Duration::from_secs(5)),
        "a connection over a limit full of links was not closed"
    );
    assert_eq!(refused(&r), refused_before + 1.0);
    assert_eq!(evicted(&r), 2.0);
    assert_eq!(gauge(&r), 2.0);
    assert_echo(
        &r.request(&Req::post(&r.path(APP, 3)).token(&tok).body(b"ok")),
        3,
        b"ok",
    );
}

/// Every method a REST client uses reaches the task as METHOD (the echo task names it back);
/// the answer to HEAD carries the length of the body it does not carry; a task may answer 204
/// or 304, which go out with no body and no length, and the connection stays usable.
#[test]
fn every_method_head_and_bodiless_statuses() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 6);
    for m in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let resp = r.request(&Req::new(m, &p).token(&tok).body(b"payload"));
        assert_eq!(resp.status, 200, "{m}: {resp:?}");
        assert_eq!(resp.body, b"payload", "{m}");
        let named = if m == "POST" { None } else { Some(m) };
        assert_eq!(resp.header("echo-method"), named, "{m}: {resp:?}");
    }
    let mut c = r.conn();
    c.send(&Req::new("HEAD", &p).token(&tok).body(b"12345").bytes());
    let head = c.read_response_for("HEAD").expect("HEAD answer");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("5"), "{head:?}");
    assert_eq!(head.header("echo-method"), Some("HEAD"));
    assert!(head.body.is_empty());
    // Same connection: nothing of a body was sent after the HEAD answer.
    for status in ["204", "304"] {
        let path = p.replace("/sys/echo", &format!("/status/{status}"));
        c.send(&Req::post(&path).token(&tok).body(b"ignored").bytes());
        let resp = c.read_response().expect("bodiless answer");
        assert_eq!(resp.status.to_string(), status, "{resp:?}");
        assert_eq!(resp.header("content-length"), None, "{resp:?}");
        assert!(resp.body.is_empty());
    }
    c.send(&Req::post(&p).token(&tok).body(b"after").bytes());
    let after = c.read_response().expect("answer after the bodiless ones");
    assert_eq!((after.status, after.body.as_slice()), (200, &b"after"[..]));
}

/// `fedbus token client|service` refuse an app the keyring does not have (a mistyped name used
/// to mint a new app secret and exit 0); `--create-app` creates it on purpose.
#[test]
fn token_commands_refuse_an_unknown_app() {
    let r = Router::new().shards(1).start();
    let keys = r.keys.to_str().expect("utf-8 path").to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .args(["--keyring", &keys])
            .output()
            .expect("run fedbus")
    };
    let typo = run(&["token", "client", "--app", "demo/ecoh", "--sub", "a"]);
    assert!(!typo.status.success(), "{typo:?}");
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("not in the keyring"),
        "{typo:?}"
    );
    let svc = run(&["token", "service", "--task-id", "t", "--app", "demo/ecoh"]);
    assert!(!svc.status.success(), "{svc:?}");
    assert!(
        Keyring::load(&r.keys)
            .expect("keyring")
            .app_versions("demo/ecoh")
            .is_none(),
        "no secret was created for the mistyped app"
    );
    let made = run(&[
        "token",
        "client",
        "--app",
        "demo/new",
        "--sub",
        "a",
        "--create-app",
    ]);
    assert!(made.status.success(), "{made:?}");
    assert!(Keyring::load(&r.keys)
        .expect("keyring")
        .app_versions("demo/new")
        .is_some());
    let known = run(&["token", "client", "--app", APP, "--sub", "a"]);
    assert!(known.status.success(), "{known:?}");
}

/// A `--keyring` that names no keyring (a typo, a path not provisioned yet) is an error that
/// says how to make one, and nothing is created there: only the default keyring is made on
/// first use. `fedbus keys init` makes it on purpose, then the same token command works. The
/// same for a dev task (`fedbus task` without a token), which made a keyring of its own there,
/// and then every router refused its token.
#[test]
fn token_commands_refuse_a_keyring_path_with_no_keyring() {
    let tmp = TempDir::new("token-no-keyring");
    let typo = tmp.path().join("kyes");
    let k = typo.to_str().expect("utf-8 path");
    // `fedbus <words> --keyring <typo>`.
    let run = |words: &str| {
        std::process::Command::new(bin())
            .args(words.split_whitespace())
            .args(["--keyring", k])
            .output()
            .expect("run fedbus")
    };
    for args in [
        format!("token client --app {APP} --sub a"),
        format!("token service --task-id t --app {APP}"),
        format!("token client --app {APP} --sub a --create-app"),
        "token peer --router r1 --cluster eu/one".to_string(),
        // A dev task mints its token from the keyring before it dials (a bad --stop-timeout
        // makes it exit, not dial, should it get past the keyring).
        format!("task echo --app {APP} --router 127.0.0.1:9 --stop-timeout never"),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args}: {out:?}");
        assert!(out.stdout.is_empty(), "{args}: {out:?}");
        assert!(
            err.contains("no keyring in") && err.contains("fedbus keys init --keyring"),
            "{args}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!typo.exists(), "{args} created {}", typo.display());
    }
    let init = run(&format!("keys init --app {APP}"));
    assert!(init.status.success(), "{init:?}");
    let ok = run(&format!("token client --app {APP} --sub a"));
    assert!(ok.status.success(), "{ok:?}");
    let jwt = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(jwt.trim().split('.').count(), 3, "not a JWT: {ok:?}");
}

/// A client that announces a large body and sends one byte makes the router reserve room for
/// the body, but not touch it: each read zeroes and offers at most 64 KiB. 40 such uploads to
/// an anonymous service (no token needed) keep the router's RSS far below 40 x 8 MiB.
#[test]
fn announced_bodies_do_not_cost_resident_memory() {
    use std::io::Write;
    let r = Router::new().shards(1).start();
    let rss_kib = || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", fedbus_testkit::seed::pid(&r)))
                .expect("router status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
    };
    let before = rss_kib();
    // Authenticated: an anonymous service's bodies are bounded far below 8 MiB.
    let path = r.path(APP, 1);
    let tok = r.token(APP, "alice");
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = std::net::TcpStream::connect(r.api).expect("connect");
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 8388608\r\n\r\nx"
        )
        .expect("head");
        held.push(s);
    }
    let open = |r: &Router| r.metrics().get("fedbus_connections{listener=\"api\"}");
    assert!(
        wait_for(Duration::from_secs(10), || (open(&r) >= 40.0).then_some(())).is_some(),
        "api connections: {}",
        open(&r)
    );
    // Let the shard read every head and its byte.
    std::thread::sleep(Duration::from_millis(500));
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 100,
        "RSS grew by {grown_mib} MiB for 40 announced 8 MiB bodies"
    );
    drop(held);
}
