//! Memory bounds against hostile clients (docs/TUNING.md, limits): the router-wide body budget
//! and each connection's share of it (503 with `Retry-After`, counted), and the small bound on
//! bodies for anonymous services (413 from the head). Each attack runs beside a well-behaved
//! client on the same shard, whose requests are answered throughout.

use fedbus_testkit::attack::{rss_kib, Normal};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use std::io::Write;
use std::time::Duration;

const APP: &str = "demo/echo";

/// Opens a connection and sends a request head announcing `len` body bytes, plus `first`.
fn announce(r: &Router, path: &str, tok: Option<&str>, len: usize, first: &[u8]) -> Conn {
    let mut c = r.conn();
    let auth = tok
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\n\r\n");
    c.send(head.as_bytes());
    c.send(first);
    c
}

#[test]
fn bodies_over_the_budget_get_503_and_the_budget_comes_back() {
    let r = Router::new()
        .shards(1)
        .limit("body_budget_bytes", 1024 * 1024)
        .limit("max_connection_body_bytes", 600 * 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 2);
    // Two uploads in progress hold 1000 KiB of the 1024 KiB budget (400 KiB of each came: what
    // came and 128 KiB ahead is charged, up to the length announced).
    let mut a = announce(&r, &p, Some(&tok), 500 * 1024, &vec![b'a'; 400 * 1024]);
    let _b = announce(&r, &p, Some(&tok), 500 * 1024, &vec![b'b'; 400 * 1024]);
    let held = || r.metrics().get("fedbus_body_bytes_held");
    wait_for(Duration::from_secs(5), || {
        (held() >= 1000.0 * 1024.0).then_some(())
    })
    .unwrap_or_else(|| panic!("two uploads charged: {} bytes held", held()));
    let mut c = announce(&r, &p, Some(&tok), 100 * 1024, b"c");
    let refused = c.read_response().expect("refusal of a third upload");
    refused.assert_error(503, "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    // A small request still fits and is answered meanwhile.
    let small = r.request(&Req::post(&p).token(&tok).body(b"small"));
    assert_eq!((small.status, small.body.as_slice()), (200, &b"small"[..]));
    // One connection cannot take more than its share, even with budget left.
    let mut one = r.conn();
    let big = String::from_utf8(Req::post(&p).token(&tok).body(b"").bytes())
        .expect("ascii")
        .replace(
            "Content-Length: 0",
            &format!("Content-Length: {}", 700 * 1024),
        );
    one.send(big.as_bytes());
    one.read_response()
        .expect("refusal of a body over the share")
        .assert_error(503, "overloaded");
    // The first upload completes: its answer, then its bytes are back in the budget.
    a.send(&vec![b'a'; 100 * 1024]);
    let done = a.read_response().expect("answer to the completed upload");
    assert_eq!((done.status, done.body.len()), (200, 500 * 1024));
    let c = wait_for(Duration::from_secs(5), || {
        let mut c = announce(&r, &p, Some(&tok), 100 * 1024, &vec![b'c'; 100 * 1024]);
        let resp = c.read_response().expect("an answer");
        (resp.status == 200).then_some(resp)
    })
    .expect("the budget comes back when a request is answered");
    assert_eq!(c.body.len(), 100 * 1024);
    assert!(r.metrics().get("fedbus_overload_refused_total") >= 2.0);
    assert!(r.log().contains("over the memory budget"));
}

/// An upload is charged what has come of its body and 128 KiB ahead, not the length it
/// announced (which must fit when its head comes): a client trickling a large body at
/// `limits.min_body_bytes_per_sec` held all it announced for as long as that took (64 uploads of
/// 8 MiB at 1 KiB/s held the default 512 MiB for two hours). An upload that grows past what the
/// others left is refused as it arrives: 503 with `Retry-After`, counted and logged, and the
/// connection closes (its body was not all read); the others go on.
#[test]
fn a_trickled_upload_holds_what_it_sent_and_grows_within_the_budget() {
    const KIB: usize = 1024;
    // The uploads that wait are not cut by the body's pace meanwhile.
    let r = Router::new()
        .shards(1)
        .limit("body_budget_bytes", 1024 * KIB)
        .limit("min_body_bytes_per_sec", 64)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 3);
    let held = || r.metrics().get("fedbus_body_bytes_held") as usize;
    let refused = || r.metrics().get("fedbus_overload_refused_total");
    let held_is = |want: usize| {
        wait_for(Duration::from_secs(5), || (held() == want).then_some(()))
            .unwrap_or_else(|| panic!("{} bytes held, not {want}", held()));
    };
    // a: 500 of 600 KiB came, charged all 600. b and c came 1 KiB each of 400 and 200 KiB: 129
    // KiB each. Charged what they announced, c did not fit (24 KiB were left).
    let mut a = announce(&r, &p, Some(&tok), 600 * KIB, &vec![b'a'; 500 * KIB]);
    held_is(600 * KIB);
    let mut b = announce(&r, &p, Some(&tok), 400 * KIB, &vec![b'b'; KIB]);
    held_is(729 * KIB);
    let c_body: Vec<u8> = (0..200 * KIB).map(|i| (i % 251) as u8).collect();
    let mut c = announce(&r, &p, Some(&tok), 200 * KIB, &c_body[..KIB]);
    held_is(858 * KIB);
    assert_eq!(refused(), 0.0);
    // b sends 250 KiB more: it would hold 379 KiB, and 166 are left. Refused as it arrives.
    b.send(&vec![b'b'; 250 * KIB]);
    let no = b
        .read_response()
        .expect("refusal of the upload that grew past the budget");
    no.assert_error(503, "overloaded");
    assert_eq!(no.header("retry-after"), Some("1"), "{no:?}");
    assert_eq!(no.header("connection"), Some("close"), "{no:?}");
    assert_eq!(refused(), 1.0);
    // Its charge went back; c and a complete and are answered whole.
    held_is(729 * KIB);
    c.send(&c_body[KIB..]);
    let done = c.read_response().expect("answer to c");
    assert_eq!((done.status, &done.body[..]), (200, &c_body[..]));
    a.send(&vec![b'a'; 100 * KIB]);
    let done = a.read_response().expect("answer to a");
    assert_eq!((done.status, done.body.len()), (200, 600 * KIB));
    held_is(0);
    assert!(r.log().contains("over the memory budget"));
}

/// A buffer a large body filled is let go with its request: the next body on the connection is
/// read into a new one, resident only as it fills, as its charge assumes
/// ([`a_trickled_upload_holds_what_it_sent_and_grows_within_the_budget`]). Before, the
/// connection kept it (a reclaim in place) and read the next body into it: 30 connections
/// that each sent one 4 MiB upload, then trickled the next, grew the router's RSS by 33-53 MiB
/// while charged 3.8 MiB (9 MiB with the buffers let go).
#[test]
fn a_connection_lets_go_of_the_buffer_a_large_body_filled() {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    // Idle connections keep their buffers (none is given back while it waits): what a
    // connection keeps is what this measures.
    let r = Router::new()
        .shards(1)
        .limit("min_body_bytes_per_sec", 64)
        .tuning("idle_buffer_release_ms", 0)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 4);
    let body = vec![b'u'; 4 * MIB];
    let upload = |c: &mut Conn, i: usize| {
        let done = c.read_response().expect("answer to the upload");
        assert_eq!((done.status, done.body.len()), (200, 4 * MIB), "{i}");
    };
    // The first round trip warms the allocator up (its free blocks are reused after).
    let mut conns = vec![announce(&r, &p, Some(&tok), 4 * MIB, &body)];
    upload(&mut conns[0], 0);
    let before = rss_kib(&r);
    for i in 1..30 {
        let mut c = announce(&r, &p, Some(&tok), 4 * MIB, &body);
        upload(&mut c, i);
        conns.push(c);
    }
    // Each connection starts another 4 MiB upload, 1 KiB of it sent: charged what came and
    // 128 KiB ahead.
    let head = format!(
        "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: {}\r\n\r\n",
        4 * MIB
    );
    for c in &mut conns {
        c.send(head.as_bytes());
        c.send(&[b'v'; KIB]);
    }
    let held = || r.metrics().get("fedbus_body_bytes_held") as usize;
    wait_for(Duration::from_secs(10), || {
        (held() == 30 * 129 * KIB).then_some(())
    })
    .unwrap_or_else(|| panic!("{} bytes held", held()));
    let grown_mib = rss_kib(&r).saturating_sub(before) / 1024;
    println!("router RSS grew by {grown_mib} MiB");
    assert!(
        grown_mib < 24,
        "RSS grew by {grown_mib} MiB: connections kept the buffers their uploads filled"
    );
}

/// Anyone may call an anonymous service: its bodies are bounded by
/// `limits.max_anonymous_body_bytes` (64 KiB), refused from the head. 200 slow 8 MiB uploads
/// once took the router's RSS from 8 to 1,611 MiB.
#[test]
fn anonymous_uploads_are_small_and_refused_from_the_head() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let auth = r.path(APP, 1).replace("/api/1/", "/auth/1/");
    let before = rss_kib(&r);
    // The attackers' connections stay open while a normal client (same, only shard) is
    // answered every 20 uploads.
    let mut attack = Vec::with_capacity(200);
    let mut answered = 0;
    for i in 0..200u64 {
        let mut c = announce(&r, &auth, None, 8 << 20, b"x");
        c.read_response()
            .expect("refusal from the head")
            .assert_error(413, "body_too_large");
        attack.push(c);
        if i % 20 == 19 {
            let ok = r.request(&Req::post(&r.path(APP, i)).token(&tok).body(b"during"));
            assert_eq!(
                (ok.status, ok.body.as_slice()),
                (200, &b"during"[..]),
                "{i}"
            );
            answered += 1;
        }
    }
    assert_eq!(answered, 10);
    let grown_mib = rss_kib(&r).saturating_sub(before) / 1024;
    assert!(grown_mib < 50, "RSS grew by {grown_mib} MiB");
    drop(attack);
    // A whole small body passes; a whole one over the bound is 413 too.
    let ok = r.request(&Req::post(&auth).body(&[b'k'; 1024]));
    assert_ne!(ok.status, 413, "{ok:?}");
    r.request(&Req::post(&auth).body(&vec![b'k'; 64 * 1024 + 1]))
        .assert_error(413, "body_too_large");
    // Authenticated requests keep limits.max_body_bytes.
    let big = r.request(
        &Req::post(&r.path(APP, 1))
            .token(&tok)
            .body(&vec![b'b'; 1 << 20]),
    );
    assert_eq!((big.status, big.body.len()), (200, 1 << 20));
    let _ = std::io::stdout().flush();
}

/// Trickles a 100,000-byte body one byte about every 100 ms on a new connection until the
/// router answers or closes; returns what it answered and when, from the head.
fn trickle_body(r: &Router, p: &str, tok: &str) -> (String, Duration) {
    let mut s = std::net::TcpStream::connect(r.api).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    write!(
        s,
        "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 100000\r\n\r\n"
    )
    .expect("head");
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && started.elapsed() < Duration::from_secs(20) {
        if s.write_all(b"t").is_err() {
            break;
        }
        let mut chunk = [0u8; 1024];
        match s.read_retrying(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    // The rest of the answer, if it came in pieces.
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut chunk = [0u8; 1024];
    while let Ok(n) = s.read_retrying(&mut chunk) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

/// A body trickled below `limits.min_body_bytes_per_sec` is cut with 408 once the head's
/// allowance plus the bytes received / rate has passed (0.5 s + a few bytes / 1000 per
/// second), whatever the idle timeout and whatever length the head announced (100,000 bytes:
/// before, the deadline was the allowance + that length / rate, 100.5 s, and the body's whole
/// charge was held that long); a body sent at a normal pace is answered. A client on its own thread
/// asks the same (only) shard throughout: the trickle is repeated (at most 5 rounds) until it
/// was answered 3 times during the attack.
#[test]
fn a_trickled_body_gets_408() {
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 500)
        .limit("min_body_bytes_per_sec", 1000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 4);
    let ok = r.request(&Req::post(&p).token(&tok).body(&vec![b'f'; 200_000]));
    assert_eq!((ok.status, ok.body.len()), (200, 200_000));
    let normal = Normal::start(&r, APP, 5);
    let (mut rounds, mut during, mut cuts) = (0, 0, Vec::new());
    while rounds < 5 && during < 3 {
        rounds += 1;
        let before = normal.answered();
        let (text, took) = trickle_body(&r, &p, &tok);
        during += normal.answered() - before;
        assert!(
            text.starts_with("HTTP/1.1 408") && text.contains("min_body_bytes_per_sec"),
            "round {rounds}: got {text:?} after {took:?}"
        );
        cuts.push(took);
    }
    let (ok, failed, _) = normal.stop();
    println!(
        "trickled bodies cut with 408 after {cuts:?} (allowance 0.5 s); normal client: {during} \
         answered during the trickles, {ok} in all, {failed} failed"
    );
    for took in &cuts {
        assert!(
            *took >= Duration::from_millis(450) && *took < Duration::from_secs(8),
            "cut after {took:?}"
        );
    }
    assert!(
        during >= 3 && failed == 0,
        "{during} normal requests answered during {rounds} trickles, {failed} failed"
    );
    assert!(r.log().contains("request body slower than"));
}

/// An HTTP client that pipelines requests and never reads its answers: the answers being
/// written count against the memory budget (`fedbus_outbox_bytes_held`), the connection is
/// closed once a write is slower than `limits.min_answer_bytes_per_sec` allows, counted in
/// `fedbus_slow_reader_closed_total`, and the bytes come back. A client on the same shard is
/// answered throughout, and RSS stays bounded.
#[test]
fn an_http_client_that_never_reads_is_closed() {
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 500)
        .limit("min_answer_bytes_per_sec", 1 << 20)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 3);
    let before = rss_kib(&r);
    // 300 echo requests of 64 KiB: about 19 MiB of answers, more than the socket buffers of
    // both ends hold.
    let one = Req::post(&p)
        .token(&tok)
        .body(&vec![b'n'; 64 * 1024])
        .bytes();
    let mut all = Vec::with_capacity(one.len() * 300);
    for _ in 0..300 {
        all.extend_from_slice(&one);
    }
    let mut flood = r.conn();
    let writer = std::thread::spawn(move || {
        flood.send_lossy(&all);
        flood
    });
    let held = || r.metrics().get("fedbus_outbox_bytes_held");
    wait_for(Duration::from_secs(10), || (held() > 0.0).then_some(()))
        .expect("answers waiting for the client are charged to the budget");
    // Served meanwhile on the same (only) shard.
    for i in 0..5 {
        let ok = r.request(&Req::post(&p).token(&tok).body(b"normal"));
        assert_eq!(
            (ok.status, ok.body.as_slice()),
            (200, &b"normal"[..]),
            "{i}"
        );
    }
    wait_for(Duration::from_secs(20), || {
        (r.metrics().get("fedbus_slow_reader_closed_total") >= 1.0).then_some(())
    })
    .expect("the client that never reads is closed");
    let mut flood = writer.join().expect("writer");
    flood.set_read_timeout(Duration::from_secs(5));
    let closed = loop {
        match flood.read_response() {
            Ok(_) => continue,
            Err(e) => {
                break !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    };
    assert!(closed, "the connection is closed");
    wait_for(Duration::from_secs(5), || (held() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("{} outbox bytes still held", held()));
    assert_eq!(r.metrics().get("fedbus_slow_reader_closed_total"), 1.0);
    let grown_mib = rss_kib(&r).saturating_sub(before) / 1024;
    assert!(grown_mib < 100, "RSS grew by {grown_mib} MiB");
    assert!(r.log().contains("does not read its answers"));
}

/// Each idle connection closed for room is counted, and logged at most 10 times a second
/// (`util::LogGate`, the suppressed ones counted in the next line): a client opening
/// connections as fast as it can must not turn each into a line on the stderr every shard
/// shares, which blocks a shard when its reader falls behind.
#[test]
fn idle_evictions_are_counted_each_and_logged_at_a_bounded_rate() {
    let r = Router::new()
        .shards(1)
        .limit("max_connections_per_shard", 4)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 5);
    let started = std::time::Instant::now();
    let mut kept = Vec::new();
    for i in 0..64 {
        let mut c = r.conn();
        let ok = c.request(&Req::post(&p).token(&tok).body(b"x"));
        assert_eq!(ok.status, 200, "client {i}");
        kept.push(c);
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(r.metrics().get("fedbus_idle_evicted_total"), 60.0);
    let lines = r
        .log()
        .matches("closed the longest-idle keep-alive connection")
        .count();
    let bound = 10.0 * (secs.ceil() + 1.0);
    assert!(
        (1..=bound as usize).contains(&lines),
        "{lines} lines for 60 evictions in {secs:.2} s"
    );
}

/// At `limits.max_connections_per_shard`, idle keep-alive connections no longer lock new
/// clients out: the one idle the longest is closed to make room (counted, logged). So is the
/// connection whose request head has been arriving the longest, when it waited longer than
/// any idle one (`503 too_many_connections`,
/// `fedbus_unfinished_evicted_total{stage="request_head"}`): a client that trickles heads
/// locked every new client out before. Connections with a body on its way
/// are never evicted: with all of them uploading, a new connection is refused at accept.
#[test]
fn idle_connections_make_room_at_the_connection_limit() {
    let r = Router::new()
        .shards(1)
        .limit("max_connections_per_shard", 8)
        .limit("handshake_timeout_ms", 20_000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 5);
    let mut idle: Vec<Conn> = (0..8)
        .map(|i| {
            let mut c = r.conn();
            let ok = c.request(&Req::post(&p).token(&tok).body(b"first"));
            assert_eq!(ok.status, 200, "connection {i}");
            c
        })
        .collect();
    let gauge = || r.metrics().get("fedbus_connections{listener=\"api\"}");
    // The admin listener is apart: its scrapes do not count here.
    assert_eq!(gauge(), 8.0);
    // Ten more clients, each answered and kept open, each making room by evicting the
    // longest idle.
    let mut new = Vec::new();
    for i in 0..10 {
        let mut c = r.conn();
        let ok = c.request(&Req::post(&p).token(&tok).body(b"new"));
        assert_eq!(
            (ok.status, ok.body.as_slice()),
            (200, &b"new"[..]),
            "new client {i}"
        );
        new.push(c);
    }
    assert_eq!(r.metrics().get("fedbus_idle_evicted_total"), 10.0);
    assert_eq!(r.metrics().get("fedbus_connections_refused_total"), 0.0);
    assert!(r
        .log()
        .contains("closed the longest-idle keep-alive connection"));
    // The oldest idle connection was the first to go.
    idle[0].set_read_timeout(Duration::from_secs(2));
    assert!(
        idle[0].is_closed(),
        "the longest-idle connection was evicted"
    );
    // Fill the shard with connections whose heads are arriving (half of each sent, read by
    // the router): the oldest makes room.
    drop(idle);
    drop(new);
    wait_for(Duration::from_secs(5), || (gauge() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("connections left: {}", gauge()));
    let half = |c: &mut Conn| {
        c.send(format!("POST {p} HTTP/1.1\r\nHost: x\r\n").as_bytes());
        let port = c.local_port();
        wait_for(Duration::from_secs(5), || {
            server_read_all(r.api, port).then_some(())
        })
        .expect("the router reads the half head");
    };
    let mut heads: Vec<Conn> = (0..8)
        .map(|_| {
            let mut c = r.conn();
            half(&mut c);
            c
        })
        .collect();
    wait_for(Duration::from_secs(5), || (gauge() == 8.0).then_some(()))
        .unwrap_or_else(|| panic!("connections with a head arriving: {}", gauge()));
    let evicted = r.metrics().get("fedbus_idle_evicted_total");
    let head_evicted = || {
        r.metrics()
            .get("fedbus_unfinished_evicted_total{stage=\"request_head\"}")
    };
    let ok = r.conn().request(&Req::post(&p).token(&tok).body(b"in"));
    assert_eq!((ok.status, ok.body.as_slice()), (200, &b"in"[..]));
    heads[0].set_read_timeout(Duration::from_secs(3));
    heads[0]
        .read_response()
        .expect("an answer to the head that was arriving")
        .assert_error(503, "too_many_connections");
    assert_eq!(head_evicted(), 1.0);
    assert_eq!(r.metrics().get("fedbus_idle_evicted_total"), evicted);
    assert_eq!(r.metrics().get("fedbus_connections_refused_total"), 0.0);
    // Fill the shard with uploads under way (a head in, part of its body): nothing to evict.
    drop(heads);
    wait_for(Duration::from_secs(5), || (gauge() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("connections left: {}", gauge()));
    let busy: Vec<Conn> = (0..8)
        .map(|_| {
            let mut c = r.conn();
            c.send(
                format!(
                    "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 1000\r\n\r\n0123456789"
                )
                .as_bytes(),
            );
            let port = c.local_port();
            wait_for(Duration::from_secs(5), || {
                server_read_all(r.api, port).then_some(())
            })
            .expect("the router reads the head and the first bytes");
            c
        })
        .collect();
    wait_for(Duration::from_secs(5), || (gauge() == 8.0).then_some(()))
        .unwrap_or_else(|| panic!("busy connections: {}", gauge()));
    let mut over = r.conn();
    over.set_read_timeout(Duration::from_secs(3));
    assert!(over.is_closed(), "refused at accept: nothing idle to evict");
    assert_eq!(r.metrics().get("fedbus_connections_refused_total"), 1.0);
    assert_eq!(r.metrics().get("fedbus_idle_evicted_total"), evicted);
    assert_eq!(head_evicted(), 1.0);
    drop(busy);
}

/// One shard at `limit` client connections whose heads may take 20 s (only an eviction ends
/// one), an echo task, and a client token.
fn router_at_limit(limit: impl std::fmt::Display) -> (Router, Task, String) {
    let r = Router::new()
        .shards(1)
        .limit("max_connections_per_shard", limit)
        .limit("handshake_timeout_ms", 20_000)
        .start();
    let t = r.task().start();
    let tok = r.token(APP, "alice");
    (r, t, tok)
}

/// A burst of connections that each send part of a request head at once stays within the
/// connection limit, plus the few evictions still closing (`shard::MAX_PENDING_EVICTIONS`,
/// 16): a connection evicted while its next request was arriving gets `503
/// too_many_connections` at once instead of holding its room until its head completes. Before,
/// 80 to 259 of 600 such connections were let in and served with a limit of 50. While 16
/// closes are under way, the accept loop waits for one to end rather than refuse the new
/// connection.
#[test]
fn a_burst_of_partial_heads_stays_within_the_connection_limit() {
    const LIMIT: f64 = 20.0;
    const PENDING: f64 = 16.0;
    let (r, _t, tok) = router_at_limit(LIMIT);
    let p = r.path(APP, 3);
    let gauge = || r.metrics().get("fedbus_connections{listener=\"api\"}");
    let mut conns = Vec::new();
    let mut peak: f64 = 0.0;
    // Each connection's first bytes go out after the next connection is opened: the accept
    // of the next one finds it idle (its task waits for a request) as its bytes arrive.
    let head = format!("POST {p} HTTP/1.1\r\nHost: x\r\n");
    for i in 0..600 {
        conns.push(r.conn());
        if i > 0 {
            conns[i - 1].send_lossy(head.as_bytes());
        }
        if i % 50 == 49 {
            peak = peak.max(gauge());
        }
    }
    conns[599].send_lossy(head.as_bytes());
    assert!(peak <= LIMIT + PENDING, "peak {peak} connections");
    // The evicted ones close: within the limit, not after the 20 s head deadline.
    wait_for(Duration::from_secs(5), || (gauge() <= LIMIT).then_some(()))
        .unwrap_or_else(|| panic!("{} connections open, limit {LIMIT}", gauge()));
    // Every request completes now: at most LIMIT are served; the others were refused with
    // 503 too_many_connections or closed.
    let rest = format!("Authorization: Bearer {tok}\r\nContent-Length: 2\r\n\r\nok");
    let mut served = 0;
    for c in &mut conns {
        c.send_lossy(rest.as_bytes());
        c.set_read_timeout(Duration::from_secs(3));
        match c.read_response() {
            Ok(a) if a.status == 200 => served += 1,
            Ok(a) => a.assert_error(503, "too_many_connections"),
            Err(_) => {}
        }
    }
    assert!(served as f64 <= LIMIT, "{served} served, limit {LIMIT}");
    // The accept loop waits for the closes under way (at most 16 at once) instead of refusing:
    // 100 to 350 of the 600 were refused without the wait, none with it (a stalled shard may
    // refuse a few after 100 ms).
    let refused = r.metrics().get("fedbus_connections_refused_total");
    assert!(refused <= 60.0, "{refused} refused at accept");
    assert!(served > 0, "the connections let in are served");
}

/// A flood of connections that each send part of a request head and never close nor read
/// does not lock clients out at the connection limit: each new connection closes the one that
/// has waited the longest for its request, at once (not after its client's close, which never
/// comes), and a client's new connection, which has not sent its request yet when it is
/// accepted, goes after every older one. Before, a head closed for room lingered up to a
/// second for its client to close; with 16 such closes under way
/// (`shard::MAX_PENDING_EVICTIONS`) every new connection was refused at accept, so a flood of a
/// few dozen connections a second locked every client out.
#[test]
fn a_flood_of_partial_heads_does_not_lock_clients_out() {
    clients_get_through_a_flood(|p| format!("POST {p} HTTP/1.1\r\nHost: x\r\n"));
}

/// The same flood, with each connection served once first (a request without a token, answered
/// 401 on a connection kept open), so that its partial head is a served connection's next
/// head. One closed for room answers 503 and lingers for its client's close (at most 100 ms),
/// which the flood never sends. Before, each counted against the 16 closes for room under way
/// (`shard::MAX_PENDING_EVICTIONS`) until its linger ended, so the shard made room for at most
/// 160 new connections a second and the rest of the flood, clients included, queued in the
/// backlog. Now its room counts as made once its answer is written, and at most 64 linger at
/// once (`shard::MAX_ROOM_LINGERING`; the others close at once, counted until they have).
#[test]
fn a_flood_of_served_connections_does_not_lock_clients_out() {
    clients_get_through_a_flood(|p| {
        format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\nPOST {p} HTTP/1.1\r\nHost: x\r\n")
    });
}

/// A flood paced at about 2 000 connections a second, each of which writes `flood(path)` once
/// and is held open 1.5 s, against a shard at a limit of 500: 1 500 of them must be closed for
/// room within 8 s (at most 1 280 can be at 160 closes a second, and 128 at 16), and then 20
/// clients, each after 20 more flood connections, must each be answered 200.
fn clients_get_through_a_flood(flood: impl Fn(&str) -> String) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    // A client's connection is closed for room once LIMIT newer ones have come before its
    // request was read: a small limit would test how fast the shard reads, not the rule.
    const LIMIT: usize = 500;
    /// Stops the flood when the test ends, passed or not.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let (r, _t, tok) = router_at_limit(LIMIT);
    let p = r.path(APP, 4);
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = std::thread::spawn({
        let (api, stop, opened) = (r.api, stop.0.clone(), opened.clone());
        let bytes = flood(&p);
        move || {
            let start = std::time::Instant::now();
            let mut held = std::collections::VecDeque::new();
            let mut tries = 0u64;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                // At most 2 connections a millisecond.
                if tries >= 2 * start.elapsed().as_millis() as u64 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                tries += 1;
                let Ok(mut s) = std::net::TcpStream::connect_timeout(&api, Duration::from_secs(1))
                else {
                    continue;
                };
                let _ = s.write_all(bytes.as_bytes());
                held.push_back(s);
                // Each held 1.5 s: longer than the old lingering close.
                if held.len() > 3000 {
                    held.pop_front();
                }
                opened.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let head_evicted = || {
        r.metrics()
            .get("fedbus_unfinished_evicted_total{stage=\"request_head\"}")
    };
    wait_for(Duration::from_secs(8), || {
        (head_evicted() >= 1500.0).then_some(())
    })
    .unwrap_or_else(|| panic!("heads closed for room: {}", head_evicted()));
    // Each client comes after 20 more flood connections: the flood goes on throughout.
    for i in 0..20 {
        let at = opened.load(Ordering::Relaxed) + 20;
        wait_for(Duration::from_secs(10), || {
            (opened.load(Ordering::Relaxed) >= at).then_some(())
        })
        .unwrap_or_else(|| panic!("the flood stalled before client {i}"));
        let mut c = r.conn();
        c.send(&Req::post(&p).token(&tok).body(b"in").bytes());
        let ok = c.read_response().unwrap_or_else(|e| {
            let m = r.metrics();
            let refused = m.get("fedbus_connections_refused_total");
            panic!("client {i} during the flood: {e} ({refused} connections refused)")
        });
        assert_eq!(
            (ok.status, ok.body.as_slice()),
            (200, &b"in"[..]),
            "client {i} during the flood"
        );
    }
    drop(stop);
    flood.join().expect("flood thread");
}

/// The minimum body rate holds while an earlier answer is pending on the same connection: a
/// body trickled behind a slow request is cut at its deadline (its bytes go back to the
/// budget then, not when the slow answer comes), the pending answer is still written, then
/// the 408, then the connection closes.
#[test]
fn a_body_trickled_behind_a_pending_answer_gets_408() {
    let r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 2000)
        .limit("min_body_bytes_per_sec", 100_000)
        .start();
    let _t = r.task().delay_ms(4000).start();
    // A fast task of another app for the normal client on the same shard.
    let _fast = r.task().app("demo/other").partitions("0-3").start();
    let other = r.token("demo/other", "bob");
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 7);
    let mut c = r.conn();
    let started = std::time::Instant::now();
    c.send(&Req::post(&p).token(&tok).body(b"slow").bytes());
    // The next request announces 100 KB and sends 10 bytes: due at the allowance (2 s) + 10
    // bytes at 100 KB/s.
    c.send(
        format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 100000\r\n\r\n0123456789"
        )
        .as_bytes(),
    );
    let held = || r.metrics().get("fedbus_body_bytes_held");
    wait_for(Duration::from_secs(3), || {
        (held() >= 100_000.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the trickled body is charged: {}", held()));
    // During the attack a normal client on the same shard is answered.
    for i in 0..5 {
        let ok = r.request(
            &Req::post(&r.path("demo/other", i))
                .token(&other)
                .body(b"during"),
        );
        assert_eq!(
            (ok.status, ok.body.as_slice()),
            (200, &b"during"[..]),
            "{i}"
        );
    }
    assert!(
        held() >= 100_000.0,
        "the trickled body was cut before the normal requests"
    );
    // Only the slow request's own 4 bytes stay held until its answer.
    wait_for(Duration::from_secs(3), || {
        (held() < 100_000.0).then_some(())
    })
    .unwrap_or_else(|| panic!("{} body bytes still held", held()));
    let cut = started.elapsed();
    assert!(cut < Duration::from_millis(3500), "cut after {cut:?}");
    c.set_read_timeout(Duration::from_secs(10));
    let first = c.read_response().expect("the pending answer");
    assert_eq!((first.status, first.body.as_slice()), (200, &b"slow"[..]));
    c.read_response()
        .expect("then the 408")
        .assert_error(408, "request_timeout");
    assert!(c.is_closed());
    assert!(r.log().contains("(answers pending): 408"));
}

/// `limits.max_pending_per_link`: with the only task link of a partition holding as many
/// requests as it may (a slow task), the next request gets `503 task_busy` with `Retry-After`
/// at once, counted in `fedbus_busy_refused_total`; the requests held are answered.
#[test]
fn a_task_link_at_its_pending_limit_refuses_with_503_task_busy() {
    let r = Router::new()
        .shards(1)
        .limit("max_pending_per_link", 2)
        .start();
    let _t = r.task().delay_ms(1500).start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 6);
    let pending = || r.metrics().get("fedbus_pending_requests");
    // The task's start is checked with a request of its own: answered first.
    wait_for(Duration::from_secs(5), || (pending() == 0.0).then_some(()))
        .unwrap_or_else(|| panic!("pending: {}", pending()));
    let mut held: Vec<Conn> = (0..2)
        .map(|_| {
            let mut c = r.conn();
            c.send(&Req::post(&p).token(&tok).body(b"held").bytes());
            c
        })
        .collect();
    wait_for(Duration::from_secs(5), || (pending() >= 2.0).then_some(()))
        .unwrap_or_else(|| panic!("pending: {}", pending()));
    let busy = r.request(&Req::post(&p).token(&tok).body(b"over"));
    busy.assert_error(503, "task_busy");
    assert_eq!(busy.header("retry-after"), Some("1"), "{busy:?}");
    assert_eq!(r.metrics().get("fedbus_busy_refused_total"), 1.0);
    for c in &mut held {
        let a = c.read_response().expect("the held request is answered");
        assert_eq!((a.status, a.body.as_slice()), (200, &b"held"[..]));
    }
}
