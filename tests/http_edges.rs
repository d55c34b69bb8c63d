//! What real HTTP clients, browsers and hostile clients send at the edges of HTTP/1.1
//! (RFC 9110/9112) and TLS, against a real router, for cases the other test files do not
//! cover. Each test is written from docs/PROTOCOL.md (sections 8 and 8.2), docs/TUNING.md and
//! docs/ARCHITECTURE.md ("TLS"); where they are silent, from what RFC 9110/9112 require and
//! nginx does. Every wait is bounded.
//!
//! `cargo test --release -p fedbus --test integration http_edges::`

use fedbus_testkit::tls::{connect, verifying, Tls, DEFAULT_VERSIONS};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 reader that keeps interim (1xx) answers, duplicate fields and the bytes that
// follow an answer, over a plain or a TLS stream.

/// One answer as read off the wire.
struct Resp {
    status: u16,
    line: String,
    /// Field lines in order, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} body={:?}",
            self.line,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl Resp {
    fn h(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.h("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// A router error: status, JSON content type, `{"status","error","message"}`.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.h("content-type"), Some("application/json"), "{self:?}");
        let j = self.json();
        assert_eq!(j["status"], status, "{self:?}");
        assert_eq!(j["error"], code, "{self:?}");
    }
}

struct Wire<S: Read + Write> {
    s: S,
    buf: Vec<u8>,
}

fn is_eof(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

impl<S: Read + Write> Wire<S> {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
        self.s.flush().expect("flush");
    }

    /// Bytes read; 0 at end of stream (a reset or a TLS EOF without close_notify too).
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read_retrying(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if is_eof(&e) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The next answer, 1xx included; `method` is the request's (HEAD: no body).
    fn response(&mut self, method: &str) -> std::io::Result<Resp> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill()? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "closed before an answer head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or("").to_string();
        let status: u16 = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad field {l:?}"));
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let bodiless =
            (100..200).contains(&status) || method == "HEAD" || status == 204 || status == 304;
        let len = if bodiless {
            0
        } else {
            headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no content-length in {head:?}"))
        };
        while self.buf.len() < len {
            if self.fill()? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed inside a body",
                ));
            }
        }
        let body = self.buf.drain(..len).collect();
        Ok(Resp {
            status,
            line,
            headers,
            body,
        })
    }

    /// The next final answer (interim ones skipped).
    fn final_response(&mut self, method: &str) -> Resp {
        loop {
            let r = self
                .response(method)
                .unwrap_or_else(|e| panic!("no answer: {e}"));
            if r.status >= 200 {
                return r;
            }
        }
    }

    /// Everything until the peer closes (within the read timeout): the bytes that followed the
    /// last answer read. Panics when the connection stays open.
    fn rest_until_eof(&mut self) -> Vec<u8> {
        loop {
            match self.fill() {
                Ok(0) => return std::mem::take(&mut self.buf),
                Ok(_) => {}
                Err(e) => panic!(
                    "connection not closed ({e}); after the answer: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }
}

impl Wire<TcpStream> {
    fn open(addr: SocketAddr) -> Wire<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(READ_TIMEOUT)).expect("timeout");
        let _ = s.set_nodelay(true);
        Wire { s, buf: Vec::new() }
    }

    fn timeout(&mut self, t: Duration) {
        self.s.set_read_timeout(Some(t)).expect("timeout");
    }
}

/// A router with one shard and an echo task, and a client token.
fn setup() -> (Router, Task, String) {
    setup_with(Router::new().shards(1))
}

fn setup_with(b: RouterBuilder) -> (Router, Task, String) {
    let r = b.start();
    let t = r.task().start();
    let tok = r.token(APP, "alice");
    (r, t, tok)
}

/// `raw` on a new connection: the router answers once, with `Connection: close`, and closes;
/// nothing follows the answer (a request pipelined behind it is never answered).
fn one_answer_then_close(r: &Router, raw: &[u8], method: &str) -> Resp {
    let mut w = Wire::open(r.api);
    let _ = w.s.write_all(raw);
    let resp = w
        .response(method)
        .unwrap_or_else(|e| panic!("no answer to {:?}: {e}", String::from_utf8_lossy(raw)));
    assert!(resp.closes(), "no `connection: close`: {resp:?}");
    let rest = w.rest_until_eof();
    assert!(
        rest.is_empty(),
        "bytes after the closing answer to {:?}: {:?}",
        String::from_utf8_lossy(raw),
        String::from_utf8_lossy(&rest)
    );
    resp
}

fn echo_req(r: &Router, tok: &str, wsid: u64, body: &[u8]) -> Vec<u8> {
    Req::post(&r.path(APP, wsid)).token(tok).body(body).bytes()
}

fn assert_echo(resp: &Resp, body: &[u8]) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, body, "{resp:?}");
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue

/// curl sends `Expect: 100-continue` for a body over 1 KiB and waits (1 s) for the `100`
/// before the body. docs/ARCHITECTURE.md: `parse_one` "answers `Expect: 100-continue`"; the
/// interim answer must come before any body byte is sent, then the echo.
#[test]
fn expect_100_continue_comes_before_any_body_byte() {
    let (r, _t, tok) = setup();
    let body = random_bytes(2048, 7);
    let p = r.path(APP, 3);
    let mut w = Wire::open(r.api);
    w.timeout(Duration::from_secs(2));
    w.send(
        format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = w.response("POST").expect("a 100 Continue before the body");
    assert_eq!(interim.line, "HTTP/1.1 100 Continue", "{interim:?}");
    assert!(interim.headers.is_empty(), "{interim:?}");
    w.send(&body);
    let resp = w.final_response("POST");
    assert_echo(&resp, &body);
}

/// A body over `limits.max_body_bytes` with `Expect: 100-continue`: `413 body_too_large` from
/// the head, no `100` first (the client must not start the upload), closed.
#[test]
fn expect_100_continue_over_max_body_is_413_without_a_100() {
    let (r, _t, tok) = setup_with(Router::new().shards(1).limit("max_body_bytes", 1024));
    let p = r.path(APP, 3);
    let raw = format!(
        "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n"
    );
    let mut w = Wire::open(r.api);
    w.send(raw.as_bytes());
    let first = w.response("POST").expect("an answer");
    first.assert_error(413, "body_too_large");
    assert!(first.closes(), "{first:?}");
    assert!(w.rest_until_eof().is_empty());
}

/// RFC 9110 10.1.1: "A server that receives a 100-continue expectation in an HTTP/1.0
/// request MUST ignore that expectation." An HTTP/1.0 client does not know `100`.
#[test]
fn expect_100_continue_in_http10_is_ignored() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 3);
    let mut w = Wire::open(r.api);
    w.send(
        format!(
            "POST {p} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    // Bounded wait: nothing may come before the body.
    w.timeout(Duration::from_millis(800));
    let early = w.fill();
    let got = String::from_utf8_lossy(&w.buf).into_owned();
    assert!(
        matches!(&early, Err(e) if is_timeout(e)),
        "an HTTP/1.0 request got {got:?} before its body ({early:?})"
    );
    w.timeout(READ_TIMEOUT);
    w.send(b"hello");
    let resp = w.final_response("POST");
    assert_echo(&resp, b"hello");
}

/// Pipelining: request A (answered after the task's delay), then the head of B with
/// `Expect: 100-continue`. RFC 9112 9.3.2: answers in request order, so B's `100` may not come
/// before A's final answer (a client reads it as A's interim answer, and B's `100` is lost).
#[test]
fn expect_100_continue_behind_a_pipelined_request_keeps_answer_order() {
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(400).start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 4);
    let mut raw = echo_req(&r, &tok, 4, b"first");
    raw.extend_from_slice(
        format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 6\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    let mut w = Wire::open(r.api);
    w.send(&raw);
    let first = w.response("POST").expect("the first answer");
    assert_eq!(
        first.status, 200,
        "the first thing on the wire must be request A's answer, got {first:?}"
    );
    assert_eq!(first.body, b"first");
    let mut next = w.response("POST").expect("B's 100");
    if next.status == 100 {
        w.send(b"second");
        next = w.final_response("POST");
    }
    assert_echo(&next, b"second");
}

// ---------------------------------------------------------------------------------------------
// Framing: Transfer-Encoding, Content-Length

/// PROTOCOL.md 8.2: `Transfer-Encoding` alone is `411 length_required`, closes. Whatever the
/// chunked body looks like (extensions, trailers, a bad size, another coding, a size over
/// `max_body_bytes`), it is never read as requests: a GET smuggled in the chunk data is not
/// answered.
#[test]
fn chunked_variants_are_411_and_their_data_is_never_read_as_a_request() {
    let (r, _t, tok) = setup_with(Router::new().shards(1).limit("max_body_bytes", 1024));
    let p = r.path(APP, 5);
    let smuggled = format!("GET {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "chunk extension",
            format!("5;name=value\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "trailer",
            format!("5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n{smuggled}"),
        ),
        (
            "bad chunk size",
            format!("zz\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "negative chunk size",
            format!("-5\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "chunk over max_body_bytes",
            format!("ffffffff\r\n{smuggled}"),
        ),
        ("last chunk only", format!("0\r\n\r\n{smuggled}")),
    ];
    for te in ["chunked", "gzip, chunked", "Chunked", "chunked, identity"] {
        for (what, body) in &cases {
            let raw = format!(
                "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nTransfer-Encoding: {te}\r\n\r\n{body}"
            );
            let resp = one_answer_then_close(&r, raw.as_bytes(), "POST");
            assert_eq!(resp.status, 411, "TE {te:?}, {what}: {resp:?}");
            resp.assert_error(411, "length_required");
        }
    }
}

/// RFC 9112 6.3: `Transfer-Encoding` and `Content-Length` together is `400` and closes, in
/// any order or spelling of the coding (PROTOCOL.md 8.2). A field name with whitespace before
/// the colon (`Transfer-Encoding : chunked`) is a malformed head (RFC 9112 5.1: MUST 400).
#[test]
fn transfer_encoding_with_content_length_in_any_spelling_is_400() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 5);
    let smuggled = format!("GET {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let cl = 5 + smuggled.len();
    for fields in [
        format!("Transfer-Encoding: gzip, chunked\r\nContent-Length: {cl}"),
        format!("Content-Length: {cl}\r\ntransfer-encoding: identity"),
        format!("Content-Length: {cl}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
        format!("Content-Length: {cl}\r\nTransfer-Encoding:"),
        format!("Content-Length: {cl}\r\nTransfer-Encoding : chunked"),
        format!("Content-Length: {cl}\r\nContent-Length : 0"),
    ] {
        let raw = format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n{fields}\r\n\r\n0\r\n\r\n{smuggled}"
        );
        let resp = one_answer_then_close(&r, raw.as_bytes(), "POST");
        assert_eq!(resp.status, 400, "{fields:?}: {resp:?}");
        assert_eq!(resp.json()["error"], "bad_request", "{fields:?}");
    }
}

/// Content-Length edge values (ARCHITECTURE.md: "a bad or conflicting `Content-Length`
/// (400)"; TUNING.md: over `max_body_bytes` 413): conflicting duplicates, a list, a negative
/// or overflowing number are 400 and close; a value past the bound is 413; identical duplicates
/// and leading zeros name one length and are served.
#[test]
fn odd_content_lengths() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 6);
    let head = |fields: &str| {
        format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n{fields}\r\n\r\nhello"
        )
    };
    for (fields, status) in [
        ("Content-Length: 5\r\nContent-Length: 6", 400),
        ("Content-Length: 5, 6", 400),
        ("Content-Length: -1", 400),
        ("Content-Length: 0x5", 400),
        ("Content-Length: 5.0", 400),
        ("Content-Length: 99999999999999999999999999999", 400),
        ("Content-Length: 18446744073709551615", 413),
        ("Content-Length: 9223372036854775808", 413),
    ] {
        let resp = one_answer_then_close(&r, head(fields).as_bytes(), "POST");
        assert_eq!(resp.status, status, "{fields:?}: {resp:?}");
    }
    for fields in [
        "Content-Length: 5\r\nContent-Length: 5",
        "Content-Length: 0005",
        "Content-Length:  5  ",
    ] {
        let mut w = Wire::open(r.api);
        w.send(head(fields).as_bytes());
        let resp = w.final_response("POST");
        assert_echo(&resp, b"hello");
        // The connection is still in step: a second request on it.
        w.send(&echo_req(&r, &tok, 6, b"again"));
        assert_echo(&w.final_response("POST"), b"again");
    }
}

// ---------------------------------------------------------------------------------------------
// Connection management

/// HTTP/1.0 without keep-alive: the connection is not persistent (RFC 9112 9.3): the answer
/// says `Connection: close` and the router closes.
#[test]
fn http10_request_is_answered_then_closed() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 7);
    let raw =
        format!("POST {p} HTTP/1.0\r\nAuthorization: Bearer {tok}\r\nContent-Length: 3\r\n\r\nabc");
    let resp = one_answer_then_close(&r, raw.as_bytes(), "POST");
    assert_echo(&resp, b"abc");
}

/// HTTP/1.0 with `Connection: keep-alive` (ab -k, old proxies): the connection persists, and
/// each answer says so with `Connection: keep-alive` (RFC 9112 9.3: an HTTP/1.0 client keeps
/// the connection only when the answer carries that option; nginx sends it). Before, the
/// router kept the connection open but did not say so, so `ab -k` and other HTTP/1.0
/// clients closed after every answer.
#[test]
fn http10_keep_alive_persists() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 7);
    let mut w = Wire::open(r.api);
    for body in ["one", "two"] {
        w.send(
            format!(
                "POST {p} HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer {tok}\r\nContent-Length: 3\r\n\r\n{body}"
            )
            .as_bytes(),
        );
        let resp = w.final_response("POST");
        assert_echo(&resp, body.as_bytes());
        assert!(!resp.closes(), "{resp:?}");
        assert_eq!(
            resp.h("connection").map(str::to_ascii_lowercase).as_deref(),
            Some("keep-alive"),
            "an HTTP/1.0 keep-alive answer must say `Connection: keep-alive`: {resp:?}"
        );
    }
    // A refusal that keeps the connection (401 here) says it too, and an HTTP/1.1 answer
    // never needs it.
    w.send(
        format!("POST {p} HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx")
            .as_bytes(),
    );
    let refused = w.final_response("POST");
    refused.assert_error(401, "missing_token");
    assert_eq!(refused.h("connection"), Some("keep-alive"), "{refused:?}");
    w.send(&echo_req(&r, &tok, 7, b"v11"));
    let v11 = w.final_response("POST");
    assert_echo(&v11, b"v11");
    assert_eq!(v11.h("connection"), None, "{v11:?}");
}

/// `Connection: close` is honoured: that answer says close, the router closes, and a request
/// pipelined behind it is not answered (RFC 9112 9.6).
#[test]
fn connection_close_is_honoured_and_nothing_behind_it_is_read() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 8);
    let mut raw = Req::post(&p)
        .token(&tok)
        .header("Connection", "close")
        .body(b"last")
        .bytes();
    raw.extend_from_slice(&echo_req(&r, &tok, 8, b"never"));
    let resp = one_answer_then_close(&r, &raw, "POST");
    assert_echo(&resp, b"last");
}

/// `Connection` is a list of options (RFC 9110 7.6.1): `close` among others still closes.
/// libwww-perl sends `Connection: TE, close`; some proxies `keep-alive, close`.
#[test]
fn connection_close_inside_an_option_list_is_honoured() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 8);
    let mut kept = Vec::new();
    for value in [
        "TE, close",
        "close, TE",
        "Keep-Alive, Close",
        "close,",
        "CLOSE",
    ] {
        let raw = Req::post(&p)
            .token(&tok)
            .header("TE", "deflate,gzip;q=0.3")
            .header("Connection", value)
            .body(b"x")
            .bytes();
        let mut w = Wire::open(r.api);
        w.send(&raw);
        let resp = w.final_response("POST");
        assert_echo(&resp, b"x");
        if !resp.closes() {
            kept.push(value);
            continue;
        }
        assert!(w.rest_until_eof().is_empty(), "{value}");
    }
    assert!(
        kept.is_empty(),
        "`Connection: <list with close>` not honoured (answer without `connection: close`, connection kept) for {kept:?}"
    );
}

/// A client that half-closes after its request (`shutdown(SHUT_WR)`, `nc -N`, HTTP/1.0
/// tools) still gets its answer, then the close.
#[test]
fn a_half_closed_client_still_gets_its_answer() {
    let (r, _t, tok) = setup();
    let mut w = Wire::open(r.api);
    w.send(&echo_req(&r, &tok, 9, b"half"));
    w.s.shutdown(Shutdown::Write).expect("shutdown");
    let resp = w.final_response("POST");
    assert_echo(&resp, b"half");
    assert!(w.rest_until_eof().is_empty());
}

/// A head parsed after its first read is parsed again only when later reads can change it
/// (`api::http::HeadScan`): a control byte is refused when it comes, not at the head's
/// deadline (408), and a printable byte that makes the head malformed without a line end
/// after it is still answered 400 when the client half-closes, not dropped.
#[test]
fn a_head_made_malformed_by_a_later_read_is_answered_400() {
    let (r, _t, _tok) = setup();
    for (rest, half_close) in [(&b"X-A\x01"[..], false), (&b"Bad Name"[..], true)] {
        let mut w = Wire::open(r.api);
        let port = w.s.local_addr().expect("local").port();
        // Each write its own read: the next is sent once the router took the last in.
        let read = || {
            wait_for(Duration::from_secs(5), || {
                server_read_all(r.api, port).then_some(())
            })
        };
        w.send(b"GET /api/x HTTP/1.1\r\nHost: x\r\n");
        for b in rest {
            read().expect("the router reads");
            w.send(&[*b]);
        }
        if half_close {
            w.s.shutdown(Shutdown::Write).expect("shutdown");
        }
        let resp = w.final_response("GET");
        assert_eq!(resp.status, 400, "{rest:?}: {resp:?}");
        assert!(w.rest_until_eof().is_empty(), "{rest:?}");
    }
}

/// A router error quotes at most 512 bytes of the client's input (the path, an app or cluster
/// name from it): the answer is held until written outside the memory budget, so it must not
/// grow with a target as long as `limits.max_header_bytes`.
#[test]
fn an_error_quoting_a_long_target_is_cut() {
    let (r, _t, tok) = setup();
    let long = "a".repeat(12_000);
    for (path, code) in [
        (format!("/api/{long}"), "bad_path"),
        (
            format!("/api/local/dev/demo/{long}/api/1/sys/echo"),
            "unknown_app",
        ),
        (
            format!("/api/x/{long}/demo/echo/api/1/sys/echo"),
            "unknown_cluster",
        ),
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
        let mut w = Wire::open(r.api);
        w.send(raw.as_bytes());
        let resp = w.final_response("GET");
        let j = resp.json();
        assert_eq!(j["error"], code, "{j}");
        let m = j["message"].as_str().expect("message");
        assert!(
            m.len() <= 512 && m.ends_with("..."),
            "{} bytes: {m}",
            m.len()
        );
    }
}

/// RFC 9112 2.2: "a server that is expecting to receive and parse a request-line SHOULD
/// ignore at least one empty line (CRLF) received prior to the request-line" (old browsers
/// sent a CRLF after a POST body).
#[test]
fn an_empty_line_before_a_request_is_ignored() {
    let (r, _t, tok) = setup();
    let mut w = Wire::open(r.api);
    let mut raw = echo_req(&r, &tok, 1, b"a");
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(&echo_req(&r, &tok, 1, b"b"));
    w.send(&raw);
    assert_echo(&w.final_response("POST"), b"a");
    assert_echo(&w.final_response("POST"), b"b");
}

// ---------------------------------------------------------------------------------------------
// Methods, HEAD, OPTIONS *, CONNECT, TRACE, HTTP/2

/// HEAD: no body in the answer (RFC 9110 9.3.2: "The server SHOULD send the same header fields
/// ... MUST NOT send content"), for router errors too. A routed error keeps the connection in
/// step; an error from the head parser (a `Basic` Authorization, as `curl -I -u` sends) must
/// not put its JSON body on the wire either.
#[test]
fn head_answers_carry_no_body_even_for_router_errors() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 2);
    let mut w = Wire::open(r.api);
    w.send(format!("HEAD {p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let resp = w.response("HEAD").expect("HEAD answer");
    assert_eq!(resp.status, 401, "{resp:?}");
    w.send(&echo_req(&r, &tok, 2, b"after"));
    assert_echo(&w.final_response("POST"), b"after");

    let mut w = Wire::open(r.api);
    w.send(format!("HEAD {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic dTpw\r\n\r\n").as_bytes());
    let resp = w.response("HEAD").expect("HEAD answer");
    assert_eq!(resp.status, 401, "{resp:?}");
    let rest = w.rest_until_eof();
    assert!(
        rest.is_empty(),
        "the answer to HEAD carried a body: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// PROTOCOL.md section 8: methods other than GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS are
/// `405`; methods are case-sensitive (RFC 9110 9.1), so `get` is one of them. The connection
/// closes (every head-parser error does) and nothing behind it is read.
#[test]
fn unknown_lowercase_connect_and_trace_methods_are_405_and_closed() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 2);
    for line in [
        format!("get {p} HTTP/1.1"),
        format!("Post {p} HTTP/1.1"),
        "CONNECT 127.0.0.1:443 HTTP/1.1".to_string(),
        format!("TRACE {p} HTTP/1.1"),
        format!("PROPFIND {p} HTTP/1.1"),
        format!("BREW {p} HTTP/1.1"),
    ] {
        let mut raw =
            format!("{line}\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n").into_bytes();
        raw.extend_from_slice(&echo_req(&r, &tok, 2, b"behind"));
        let resp = one_answer_then_close(&r, &raw, "GET");
        resp.assert_error(405, "method_not_allowed");
    }
}

/// RFC 9110 15.5.6: "The origin server MUST generate an Allow header field in a 405
/// response containing a list of the target resource's currently supported methods."
#[test]
fn a_405_names_the_allowed_methods() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 2);
    let raw = format!("TRACE {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let resp = one_answer_then_close(&r, raw.as_bytes(), "GET");
    resp.assert_error(405, "method_not_allowed");
    let allow = resp
        .h("allow")
        .unwrap_or_else(|| panic!("405 without Allow: {resp:?}"));
    for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }
}

/// PROTOCOL.md section 8: a request for `/api/ws` with another method "gets `405
/// method_not_allowed` (`Allow: GET`) and the connection closes". The same whether its body
/// came with the head or not yet.
#[test]
fn post_to_api_ws_is_405_with_allow_get_whether_or_not_its_body_arrived() {
    let r = Router::new().shards(1).start();
    for (what, raw) in [
        (
            "body with the head",
            "POST /api/ws HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        ),
        (
            "body not sent yet",
            "POST /api/ws HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
        ),
    ] {
        let mut w = Wire::open(r.api);
        w.send(raw.as_bytes());
        let resp = w.response("POST").expect("answer");
        assert_eq!(resp.status, 405, "{what}: {resp:?}");
        assert!(resp.closes(), "{what}: {resp:?}");
        assert_eq!(resp.h("allow"), Some("GET"), "{what}: {resp:?}");
    }
}

/// `OPTIONS *` (RFC 9110 9.3.7: about the server, not a resource) is not an API path: a JSON
/// error (404 `not_found`, PROTOCOL.md "a malformed path"), not a hang, and the connection
/// keeps serving.
#[test]
fn options_asterisk_gets_a_json_error_and_the_connection_serves_on() {
    let (r, _t, tok) = setup();
    let mut w = Wire::open(r.api);
    w.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
    let resp = w.final_response("OPTIONS");
    assert!((400..500).contains(&resp.status), "{resp:?}");
    assert!(resp.json()["error"].is_string(), "{resp:?}");
    if !resp.closes() {
        w.send(&echo_req(&r, &tok, 1, b"next"));
        assert_echo(&w.final_response("POST"), b"next");
    }
}

/// The HTTP/2 prior-knowledge preface on the plaintext port (`curl --http2-prior-knowledge`):
/// a clear HTTP/1.1 error and the close, quickly, not a wait for more.
#[test]
fn http2_prior_knowledge_preface_is_refused_and_closed() {
    let r = Router::new().shards(1).start();
    let mut raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame.
    raw.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let started = Instant::now();
    let mut w = Wire::open(r.api);
    w.send(&raw);
    let resp = w.response("GET").expect("an answer");
    assert!(matches!(resp.status, 400 | 505), "{resp:?}");
    assert!(resp.closes(), "{resp:?}");
    assert!(w.rest_until_eof().is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A request line with `HTTP/2.0` or `HTTP/3`: 400 or 505, closed.
#[test]
fn an_http2_request_line_is_refused_and_closed() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 1);
    for v in ["HTTP/2.0", "HTTP/2", "HTTP/3", "HTTP/0.9", "http/1.1"] {
        let raw = format!("GET {p} {v}\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
        let resp = one_answer_then_close(&r, raw.as_bytes(), "GET");
        assert!(matches!(resp.status, 400 | 505), "{v}: {resp:?}");
    }
}

/// `Upgrade: h2c` (curl --http2 on http://) is a request the server may ignore (RFC 9110
/// 7.8): answered over HTTP/1.1 (no 101), and the connection stays HTTP/1.1.
#[test]
fn upgrade_h2c_is_ignored() {
    let (r, _t, tok) = setup();
    let raw = Req::post(&r.path(APP, 1))
        .token(&tok)
        .header("Connection", "Upgrade, HTTP2-Settings")
        .header("Upgrade", "h2c")
        .header("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(b"h2c?")
        .bytes();
    let mut w = Wire::open(r.api);
    w.send(&raw);
    let resp = w.response("POST").expect("answer");
    assert_echo(&resp, b"h2c?");
    assert_eq!(resp.h("upgrade"), None, "{resp:?}");
    w.send(&echo_req(&r, &tok, 1, b"still 1.1"));
    assert_echo(&w.final_response("POST"), b"still 1.1");
}

// ---------------------------------------------------------------------------------------------
// Request target and field syntax

/// A request target longer than `limits.max_header_bytes` makes the head too large: `431
/// headers_too_large`, closes (PROTOCOL.md 8.2, TUNING.md "request line + headers").
#[test]
fn a_very_long_request_target_is_431_and_closed() {
    let (r, _t, tok) = setup();
    let target = format!("{}?q={}", r.path(APP, 1), "a".repeat(20 * 1024));
    let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let mut w = Wire::open(r.api);
    let _ = w.s.write_all(raw.as_bytes());
    let resp = w.response("GET").expect("an answer");
    resp.assert_error(431, "headers_too_large");
    assert!(resp.closes(), "{resp:?}");
    // A target that fits (12 KiB) is served.
    let ok = format!("{}?q={}", r.path(APP, 1), "a".repeat(12 * 1024));
    let mut w = Wire::open(r.api);
    w.send(&Req::post(&ok).token(&tok).body(b"fits").bytes());
    assert_echo(&w.final_response("POST"), b"fits");
}

/// Malformed field lines, each a way to make two parsers disagree: obs-fold (RFC 9112 5.2:
/// MUST reject or replace), whitespace between the name and the colon (5.1: MUST 400),
/// whitespace before the first field (2.2), a field without a colon. Each is 400, closed, and
/// the request behind it is never read.
#[test]
fn obs_fold_and_whitespace_in_field_names_are_400_and_closed() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 2);
    let behind = echo_req(&r, &tok, 2, b"behind");
    for (what, fields) in [
        ("obs-fold", "X-Folded: a\r\n  b".to_string()),
        ("obs-fold with tab", "X-Folded: a\r\n\tb".to_string()),
        ("space before colon", "Content-Length : 1".to_string()),
        ("tab before colon", "X-A\t: 1".to_string()),
        ("no colon", "X-No-Colon".to_string()),
        ("empty name", ": v".to_string()),
        ("space in name", "X A: 1".to_string()),
    ] {
        let mut raw = format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n{fields}\r\nContent-Length: 1\r\n\r\nx"
        )
        .into_bytes();
        raw.extend_from_slice(&behind);
        let resp = one_answer_then_close(&r, &raw, "POST");
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
    }
    // Whitespace between the request line and the first field.
    let mut raw = format!(
        "POST {p} HTTP/1.1\r\n Host: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 1\r\n\r\nx"
    )
    .into_bytes();
    raw.extend_from_slice(&behind);
    let resp = one_answer_then_close(&r, &raw, "POST");
    assert_eq!(resp.status, 400, "leading whitespace: {resp:?}");
}

/// A bare CR (RFC 9112 2.2: MUST treat as invalid or replace with SP) in a field value or the
/// request line, and NUL in a field name or the target: 400, closed.
#[test]
fn bare_cr_and_nul_in_the_head_are_400_and_closed() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 2);
    let base = |head: &[u8]| {
        let mut v = head.to_vec();
        v.extend_from_slice(
            format!("Authorization: Bearer {tok}\r\nContent-Length: 1\r\n\r\nx").as_bytes(),
        );
        v.extend_from_slice(&echo_req(&r, &tok, 2, b"behind"));
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "bare CR in a value",
            format!("POST {p} HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n").into_bytes(),
        ),
        (
            "bare CR ending a field",
            format!("POST {p} HTTP/1.1\r\nHost: x\r\nX-A: a\r\r\n").into_bytes(),
        ),
        (
            "bare CR in the request line",
            format!("POST {p}\r HTTP/1.1\r\nHost: x\r\n").into_bytes(),
        ),
        (
            "NUL in a name",
            format!("POST {p} HTTP/1.1\r\nHost: x\r\nX-\0A: a\r\n").into_bytes(),
        ),
        (
            "NUL in the target",
            format!("POST {p}\0 HTTP/1.1\r\nHost: x\r\n").into_bytes(),
        ),
        (
            "NUL in the method",
            format!("PO\0ST {p} HTTP/1.1\r\nHost: x\r\n").into_bytes(),
        ),
    ];
    for (what, head) in cases {
        let resp = one_answer_then_close(&r, &base(&head), "POST");
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
        assert_eq!(resp.json()["error"], "bad_request", "{what}");
    }
}

/// Bytes that are not UTF-8 in the target: 400 (malformed), closed. A UTF-8 but non-ASCII
/// segment is a malformed `/api/` path: `400 bad_path` (PROTOCOL.md section 8), and the
/// connection serves on.
#[test]
fn non_utf8_and_non_ascii_targets_are_refused() {
    let (r, _t, tok) = setup();
    let mut raw =
        b"POST /api/local/dev/demo/echo/api/1/sys/\xff\xfe HTTP/1.1\r\nHost: x\r\n".to_vec();
    raw.extend_from_slice(
        format!("Authorization: Bearer {tok}\r\nContent-Length: 1\r\n\r\nx").as_bytes(),
    );
    let resp = one_answer_then_close(&r, &raw, "POST");
    assert_eq!(resp.status, 400, "{resp:?}");

    let mut w = Wire::open(r.api);
    let p = "/api/local/dev/demo/echo/api/1/sys/\u{e9}cho";
    w.send(&Req::post(p).token(&tok).body(b"x").bytes());
    let resp = w.final_response("POST");
    resp.assert_error(400, "bad_path");
    w.send(&echo_req(&r, &tok, 1, b"next"));
    assert_echo(&w.final_response("POST"), b"next");
}

/// Percent-encoded slashes and dot-segments (raw or encoded) never address another app or
/// cluster: the path has one spelling, anything else is `400 bad_path`, on a connection that
/// serves on (PROTOCOL.md section 8).
#[test]
fn percent_encoded_slashes_and_dot_segments_are_bad_path() {
    let (r, _t, tok) = setup();
    let mut w = Wire::open(r.api);
    for p in [
        "/api/local/dev/demo%2Fecho/api/1/sys/echo",
        "/api/local/dev/demo/echo/api/1/sys%2fecho",
        "/api/local/dev/demo/other/../echo/api/1/sys/echo",
        "/api/local/dev/demo/echo/api/1/sys/../sys/echo",
        "/api/local/dev/demo/echo/api/1/./sys/echo",
        "/api/local/dev/demo/echo/api/1/sys/%2e%2e",
        "/api/local/dev/demo/echo/api/1/sys/..",
        "/api/local/dev/demo/echo/api/1/sys/echo%00",
        "/api/local/dev/demo/echo/api/1/sys/echo#frag",
        "/api/local//dev/demo/echo/api/1/sys/echo",
    ] {
        w.send(&Req::post(p).token(&tok).body(b"x").bytes());
        let resp = w.final_response("POST");
        assert_eq!(resp.status, 400, "{p}: {resp:?}");
        assert!(
            matches!(
                resp.json()["error"].as_str(),
                Some("bad_path") | Some("bad_request")
            ),
            "{p}: {resp:?}"
        );
        assert!(!resp.closes(), "{p}: {resp:?}");
    }
    w.send(&echo_req(&r, &tok, 1, b"next"));
    assert_echo(&w.final_response("POST"), b"next");
}

/// RFC 9112 3.2: "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1
/// request message that lacks a Host header field and to any request message that contains
/// more than one Host header field line". (nginx: "client sent HTTP/1.1 request without
/// Host header" / "client sent duplicate host header", 400.) The Host also decides whether a
/// request is cross-origin (PROTOCOL.md 8.1), so two of them are two answers to that.
#[test]
fn http11_without_host_is_400() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 3);
    let raw =
        format!("POST {p} HTTP/1.1\r\nAuthorization: Bearer {tok}\r\nContent-Length: 1\r\n\r\nx");
    let mut w = Wire::open(r.api);
    w.send(raw.as_bytes());
    let resp = w.final_response("POST");
    assert_eq!(resp.status, 400, "HTTP/1.1 request without Host: {resp:?}");
}

#[test]
fn duplicate_host_is_400() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 3);
    let raw = format!(
        "POST {p} HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nAuthorization: Bearer {tok}\r\nContent-Length: 1\r\n\r\nx"
    );
    let mut w = Wire::open(r.api);
    w.send(raw.as_bytes());
    let resp = w.final_response("POST");
    assert_eq!(resp.status, 400, "two Host fields: {resp:?}");
}

/// RFC 9110 11.6.1: "A server generating a 401 (Unauthorized) response MUST send a
/// WWW-Authenticate header field containing at least one challenge"; the scheme is `Bearer`
/// (RFC 6750 section 3: no error attribute when no token came, `error="invalid_token"` for a
/// token that does not verify), as Envoy's jwt_authn sends. Every router-made 401 carries it:
/// HTTP without a token, with a forged token, with `Authorization: Basic`, and the `/api/ws`
/// upgrade refused for its token. Before, none did.
#[test]
fn router_made_401s_carry_a_bearer_challenge() {
    let (r, _t, tok) = setup();
    let p = r.path(APP, 3);
    let forged = format!("{}x", &tok[..tok.len() - 1]);
    let cases = [
        ("no token", String::new(), Some("missing_token"), "Bearer"),
        (
            "forged token",
            format!("Authorization: Bearer {forged}\r\n"),
            None,
            "Bearer error=\"invalid_token\"",
        ),
        (
            "Basic",
            "Authorization: Basic YWxpY2U6eA==\r\n".to_string(),
            Some("bad_token"),
            "Bearer error=\"invalid_token\"",
        ),
    ];
    let mut w = Wire::open(r.api);
    for (what, auth, code, challenge) in cases {
        let raw = format!("POST {p} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1\r\n\r\nx");
        w.send(raw.as_bytes());
        let resp = w.final_response("POST");
        assert_eq!(resp.status, 401, "{what}: {resp:?}");
        if let Some(code) = code {
            assert_eq!(resp.json()["error"], code, "{what}: {resp:?}");
        }
        assert_eq!(
            resp.h("www-authenticate"),
            Some(challenge),
            "{what}: a 401 without its challenge: {resp:?}"
        );
        if resp.closes() {
            w = Wire::open(r.api);
        }
    }
    // The /api/ws upgrade refused for its token (a router without [federation] verifies it
    // at the upgrade): the same challenge, then the close.
    let raw = format!(
        "GET /api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {forged}\r\n\r\n"
    );
    let resp = one_answer_then_close(&r, raw.as_bytes(), "GET");
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(
        resp.h("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{resp:?}"
    );
    // A good token still passes, and a 200 carries no challenge.
    w.send(&echo_req(&r, &tok, 3, b"ok"));
    let ok = w.final_response("POST");
    assert_echo(&ok, b"ok");
    assert_eq!(ok.h("www-authenticate"), None, "{ok:?}");
}

// ---------------------------------------------------------------------------------------------
// TLS

/// Certificates from a fresh dev CA for `a.test` and 127.0.0.1.
struct Certs {
    _dir: TempDir,
    ca: PathBuf,
    a: (PathBuf, PathBuf),
}

fn certs() -> Certs {
    let dir = TempDir::new("http-edges-tls");
    Certs {
        ca: dev_ca(dir.path()),
        a: dev_cert(dir.path(), "a", &["a.test", "127.0.0.1"]),
        _dir: dir,
    }
}

fn tls_config(ca: &Path, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    verifying(ca, DEFAULT_VERSIONS, alpn, false)
}

fn tls_connect(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<Wire<Tls>> {
    Ok(Wire {
        s: connect(addr, cfg, name)?,
        buf: Vec::new(),
    })
}

fn tls_router() -> (Router, Task, String, Certs) {
    let c = certs();
    let (r, t, tok) = setup_with(Router::new().shards(1).tls(std::slice::from_ref(&c.a)));
    (r, t, tok, c)
}

/// Browsers and curl offer `h2, http/1.1`: the router picks `http/1.1` (ARCHITECTURE.md
/// "TLS": ALPN `http/1.1`) and serves.
#[test]
fn tls_alpn_h2_and_http11_negotiates_http11() {
    let (r, _t, tok, c) = tls_router();
    let cfg = tls_config(&c.ca, &[b"h2", b"http/1.1"]);
    let mut w = tls_connect(r.api_tls.expect("tls"), &cfg, "a.test").expect("handshake");
    assert_eq!(w.s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    w.send(&echo_req(&r, &tok, 1, b"alpn"));
    assert_echo(&w.final_response("POST"), b"alpn");
}

/// A client without ALPN (older tools, `openssl s_client`) is served over HTTP/1.1.
#[test]
fn tls_without_alpn_is_served() {
    let (r, _t, tok, c) = tls_router();
    let cfg = tls_config(&c.ca, &[]);
    let mut w = tls_connect(r.api_tls.expect("tls"), &cfg, "a.test").expect("handshake");
    assert_eq!(w.s.conn.alpn_protocol(), None);
    w.send(&echo_req(&r, &tok, 1, b"no alpn"));
    assert_echo(&w.final_response("POST"), b"no alpn");
}

/// `Expect: 100-continue` over TLS: the interim answer is flushed through the TLS layer
/// before the body (curl over https waits for it up to 1 s).
#[test]
fn tls_expect_100_continue_comes_before_the_body() {
    let (r, _t, tok, c) = tls_router();
    let cfg = tls_config(&c.ca, &[b"http/1.1"]);
    let mut w = tls_connect(r.api_tls.expect("tls"), &cfg, "a.test").expect("handshake");
    w.s.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let body = random_bytes(4096, 3);
    let p = r.path(APP, 2);
    w.send(
        format!(
            "POST {p} HTTP/1.1\r\nHost: a.test\r\nAuthorization: Bearer {tok}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = w
        .response("POST")
        .expect("100 Continue over TLS before the body");
    assert_eq!(interim.line, "HTTP/1.1 100 Continue");
    w.send(&body);
    assert_echo(&w.final_response("POST"), &body);
}

/// A request written one byte per TLS record (a client that flushes every byte): the router
/// reassembles it and answers.
#[test]
fn tls_request_in_one_byte_records_is_served() {
    let (r, _t, tok, c) = tls_router();
    let cfg = tls_config(&c.ca, &[b"http/1.1"]);
    let mut w = tls_connect(r.api_tls.expect("tls"), &cfg, "a.test").expect("handshake");
    let raw = echo_req(&r, &tok, 2, b"tiny records");
    for b in &raw {
        w.s.write_all(std::slice::from_ref(b)).expect("write");
        w.s.flush().expect("flush");
    }
    assert_echo(&w.final_response("POST"), b"tiny records");
    // And the connection goes on.
    w.send(&echo_req(&r, &tok, 2, b"again"));
    assert_echo(&w.final_response("POST"), b"again");
}

/// A client that sends its request and then `close_notify` (TLS's half-close): the answer
/// still comes, then the router ends the connection.
#[test]
fn tls_close_notify_after_a_request_still_gets_the_answer() {
    let (r, _t, tok, c) = tls_router();
    let cfg = tls_config(&c.ca, &[b"http/1.1"]);
    let mut w = tls_connect(r.api_tls.expect("tls"), &cfg, "a.test").expect("handshake");
    w.send(&echo_req(&r, &tok, 2, b"bye"));
    w.s.conn.send_close_notify();
    w.s.flush().expect("flush close_notify");
    assert_echo(&w.final_response("POST"), b"bye");
    assert!(w.rest_until_eof().is_empty());
    // The listener serves on.
    let mut w = tls_connect(r.api_tls.expect("tls"), &cfg, "a.test").expect("handshake");
    w.send(&echo_req(&r, &tok, 2, b"next"));
    assert_echo(&w.final_response("POST"), b"next");
}

/// A client that stops half way through its ClientHello is cut after
/// `limits.handshake_timeout_ms` (PROTOCOL.md 8.2) and counted in
/// `fedbus_tls_handshake_failures_total`.
#[test]
fn tls_client_stalled_mid_client_hello_is_cut_and_counted() {
    let c = certs();
    let r = Router::new()
        .shards(1)
        .tls(std::slice::from_ref(&c.a))
        .limit("handshake_timeout_ms", 600)
        .start();
    let before = r.metrics().get("fedbus_tls_handshake_failures_total");
    let cfg = tls_config(&c.ca, &[b"http/1.1"]);
    let mut conn =
        ClientConnection::new(cfg, ServerName::try_from("a.test").expect("name")).expect("conn");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("client hello");
    }
    assert!(hello.len() > 40, "{} bytes", hello.len());
    let mut s = TcpStream::connect(r.api_tls.expect("tls")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    s.write_all(&hello[..hello.len() / 2])
        .expect("half a hello");
    let mut w = Wire { s, buf: Vec::new() };
    let rest = w.rest_until_eof();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(10),
        "cut after {took:?} (limit 600 ms)"
    );
    assert!(
        rest.is_empty() || rest[0] == 0x15,
        "only an alert may come: {rest:?}"
    );
    let counted = wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_tls_handshake_failures_total") > before).then_some(())
    });
    assert!(counted.is_some(), "{}", r.metrics_text());
}

/// Bytes on the TLS port that are neither a TLS record nor an HTTP method in capitals
/// (`get`, a leading CRLF): TUNING.md "TLS": "other bytes get rustls's alert", then the close,
/// counted.
#[test]
fn non_tls_bytes_on_the_tls_port_get_an_alert_and_close() {
    let c = certs();
    let r = Router::new()
        .shards(1)
        .tls(std::slice::from_ref(&c.a))
        .start();
    let before = r.metrics().get("fedbus_tls_handshake_failures_total");
    for raw in [
        &b"get / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut w = Wire::open(r.api_tls.expect("tls"));
        w.send(raw);
        let got = w.rest_until_eof();
        assert!(
            got.is_empty() || got[0] == 0x15,
            "{:?}: not a TLS alert: {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&got)
        );
    }
    let counted = wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_tls_handshake_failures_total") >= before + 2.0).then_some(())
    });
    assert!(counted.is_some(), "{}", r.metrics_text());
}
