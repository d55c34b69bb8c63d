//! Probes of the client websocket endpoint `GET /api/ws` at the edge (a helper wrote them from
//! the docs; 6 failed on 618df4e, see the commit that added this file) (docs/PROTOCOL.md
//! sections 3 and 8, 8.1, 8.2; docs/TUNING.md `limits.*`), written from the documents: framing
//! (fragments, control frames, reserved bits, close codes), the fedbus frame a client sends,
//! per-session limits, idle deadlines, the upgrade head (extensions, subprotocols, bodies,
//! methods, head size) and wss on the TLS listener. Every read has a timeout.

use bytes::{Bytes, BytesMut};
use fedbus_proto::{encode_frame, put_meta, tag, Frame, Kind};
use fedbus_router::ws::frame::opcode;
use fedbus_router::ws::handshake::new_key;
use fedbus_testkit::ws::{self, header_of, raw_frame, request_frame, status_of, Io, Msg, FIN};
use fedbus_testkit::*;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

// ---------------------------------------------------------------------------------------------
// A blocking websocket client over plain TCP or TLS, with raw frame control.

type Ws = ws::Ws<Box<dyn Io>>;

/// How an upgrade went: the 101's head and the session, or the refusal's status, head, body.
enum Up {
    Open(Ws, String),
    Refused(u16, String, String),
}

/// A complete upgrade head for `path` with `extra` header lines (each without CRLF).
fn ws_head(path: &str, host: &str, extra: &[String]) -> String {
    let mut h = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
        new_key()
    );
    for e in extra {
        h.push_str(e);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h
}

fn bearer(tok: &str) -> String {
    format!("Authorization: Bearer {tok}")
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let dial = ws::Dial::new(READ_TIMEOUT)
        .write_timeout(READ_TIMEOUT)
        .nodelay();
    ws::dial(addr, &dial).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// Writes `raw` (an upgrade head, maybe followed by more bytes) on `s` and reads the answer.
fn upgrade_on(mut s: Box<dyn Io>, tcp: TcpStream, raw: &[u8]) -> Up {
    s.write_all(raw).expect("write upgrade");
    s.flush().expect("flush");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_retrying(&mut s, &mut chunk).expect("read upgrade answer");
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    if status == 101 {
        let rest = buf[end..].to_vec();
        return Up::Open(
            Ws::on(s, tcp, rest, 0x9E37_79B9_7F4A_7C15).checking_router_frames(),
            head,
        );
    }
    // A refusal: the body by its length (then the router closes).
    let len: usize = header_in(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        match read_retrying(&mut s, &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Up::Refused(status, head, String::from_utf8_lossy(&body).into_owned())
}

fn upgrade_raw(addr: SocketAddr, raw: &[u8]) -> Up {
    let t = tcp(addr);
    upgrade_on(Box::new(t.try_clone().unwrap()), t, raw)
}

/// A header of a response head, by name (case-insensitive).
fn header_in(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn open_path(r: &Router, path: &str, tok: Option<&str>) -> Ws {
    let extra: Vec<String> = tok.map(bearer).into_iter().collect();
    match upgrade_raw(r.api, ws_head(path, "127.0.0.1", &extra).as_bytes()) {
        Up::Open(w, _) => w,
        Up::Refused(st, h, b) => panic!("upgrade refused: {st} {h}{b}"),
    }
}

fn open(r: &Router, tok: &str) -> Ws {
    open_path(r, "/api/ws", Some(tok))
}

fn open_anonymous(r: &Router) -> Ws {
    open_path(r, "/api/ws", None)
}

/// What these tests add to the kit's session.
trait WsEdges {
    fn frame(&mut self, op: u8, payload: &[u8]) -> Vec<u8>;
    fn send(&mut self, bytes: &[u8]);
    fn send_lossy(&mut self, bytes: &[u8]);
    fn binary(&mut self, fedbus_frame: &[u8]);
    fn request(&mut self, id: u64, path: Option<&str>, payload: &[u8]);
    fn response(&mut self) -> Frame;
    fn expect_close(&mut self, code: u16);
}

impl WsEdges for Ws {
    /// One whole (FIN) masked frame of `op`.
    fn frame(&mut self, op: u8, payload: &[u8]) -> Vec<u8> {
        self.raw(FIN | op, payload)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
        self.s.flush().expect("flush");
    }

    fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
        let _ = self.s.flush();
    }

    fn binary(&mut self, fedbus_frame: &[u8]) {
        let b = self.frame(opcode::BINARY, fedbus_frame);
        self.send(&b);
    }

    fn request(&mut self, id: u64, path: Option<&str>, payload: &[u8]) {
        let f = request_frame(id, path, payload);
        self.binary(&f);
    }

    /// The next Response frame (pongs before it skipped); panics on anything else.
    fn response(&mut self) -> Frame {
        loop {
            match self.read_msg() {
                Ok(Msg::Binary(b)) => {
                    let f = Frame::decode(Bytes::from(b)).expect("a valid fedbus frame");
                    assert_eq!(f.header.kind, Kind::Response, "{f:?}");
                    return f;
                }
                Ok(Msg::Pong(_)) => continue,
                other => panic!("expected a Response frame, got {other:?}"),
            }
        }
    }

    /// Expects close `code`, then the router's end of the TCP connection.
    fn expect_close(&mut self, code: u16) {
        assert_eq!(self.close_code(), Ok(Some(code)), "close code");
        let mut b = [0u8; 64];
        match read_retrying(&mut self.s, &mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("TCP connection not closed after close {code}: {other:?}"),
        }
    }
}

// Frame helpers.

fn describe(f: &Frame) -> String {
    ws::describe(f, 200)
}

fn assert_error_frame(f: &Frame, id: u64, status: u64, code: &str) {
    ws::assert_error_basics(f, id, status, code, &describe(f));
}

fn assert_echo(f: &Frame, id: u64, body: &[u8]) {
    let d = describe(f);
    assert_eq!(f.header.request_id, id, "{d}");
    assert_eq!(status_of(f), 200, "{d}");
    assert!(f.payload[..] == *body, "payload differs: {d}");
}

/// Reads a whole HTTP answer on a raw socket until the router closes it: (head, bytes after
/// the head).
fn answer_to_eof(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match read_retrying(s, &mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed after {:?}: {e}", String::from_utf8_lossy(&got)),
        }
    }
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or_else(|| panic!("no answer head in {:?}", String::from_utf8_lossy(&got)));
    (
        String::from_utf8_lossy(&got[..end]).into_owned(),
        got[end..].to_vec(),
    )
}

// =============================================================================================
// Websocket framing (PROTOCOL.md section 3, "Websocket framing"; section 8 close table).

/// "Fragmented messages are reassembled; ping is answered with pong": a Request split over
/// three fragments with a ping between them is answered once, and the ping gets its pong.
#[test]
fn a_fragmented_request_with_a_ping_between_fragments_is_reassembled() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let body = random_bytes(3000, 1);
    let f = request_frame(1, Some(&r.path(APP, 3)), &body);
    let (a, rest) = f.split_at(100);
    let (b, c) = rest.split_at(1500);
    let mut wire = w.raw(opcode::BINARY, a);
    wire.extend(w.frame(opcode::PING, b"between"));
    wire.extend(w.raw(opcode::CONTINUATION, b));
    wire.extend(w.raw(FIN | opcode::CONTINUATION, c));
    w.send(&wire);
    let mut pong = false;
    let answer = loop {
        match w.read_msg().expect("a message") {
            Msg::Pong(p) => {
                assert_eq!(p, b"between");
                pong = true;
            }
            Msg::Binary(m) => break Frame::decode(Bytes::from(m)).expect("frame"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_echo(&answer, 1, &body);
    if !pong {
        assert_eq!(w.read_msg().expect("pong"), Msg::Pong(b"between".to_vec()));
    }
}

/// The message bound (`max_body_bytes + 64 KiB`) holds for a fragmented message as for a
/// whole one: exactly the bound is answered, one byte more is closed 1009.
#[test]
fn a_fragmented_message_exactly_at_the_bound_is_served_and_one_byte_more_is_1009() {
    let r = Router::new()
        .shards(1)
        .limit("max_body_bytes", 1024)
        .start();
    let tok = r.token(APP, "alice");
    let limit = 1024 + 64 * 1024;
    let mut w = open(&r, &tok);
    let send_fragmented = |w: &mut Ws, f: &[u8]| {
        let chunks: Vec<&[u8]> = f.chunks(20_000).collect();
        let mut wire = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let op = if i == 0 {
                opcode::BINARY
            } else {
                opcode::CONTINUATION
            };
            let fin = if i + 1 == chunks.len() { FIN } else { 0 };
            wire.extend(w.raw(fin | op, c));
        }
        w.send_lossy(&wire);
    };
    // No PATH, and a body over max_body_bytes: answered 413 (as on HTTP) without a task.
    let f = request_frame(1, None, &vec![b'z'; limit - 24]);
    assert_eq!(f.len(), limit);
    send_fragmented(&mut w, &f);
    assert_error_frame(&w.response(), 1, 413, "body_too_large");
    let f = request_frame(2, None, &vec![b'z'; limit - 24 + 1]);
    send_fragmented(&mut w, &f);
    w.expect_close(1009);
}

/// A session on a fresh one-shard router (no task) sends the bytes `wire` makes and is closed
/// with `code`, then TCP closed.
fn sent_closes(code: u16, wire: impl FnOnce(&mut Ws) -> Vec<u8>) {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let b = wire(&mut w);
    w.send(&b);
    w.expect_close(code);
}

/// RFC 6455 5.4: a continuation frame with no message begun fails the session with 1002.
#[test]
fn a_continuation_without_a_message_closes_1002() {
    sent_closes(1002, |w| w.raw(FIN | opcode::CONTINUATION, b"orphan"));
}

/// RFC 6455 5.4: a new data frame inside a fragmented message fails the session with 1002.
#[test]
fn a_new_message_inside_a_fragmented_one_closes_1002() {
    sent_closes(1002, |w| {
        let mut wire = w.raw(opcode::BINARY, b"first half");
        wire.extend(w.raw(FIN | opcode::BINARY, b"another message"));
        wire
    });
}

/// A ping of 125 bytes (the most a control frame may carry) gets a pong with the same 125
/// bytes; a ping of 126 bytes is a protocol error (1002).
#[test]
fn a_ping_of_125_bytes_is_ponged_and_126_bytes_closes_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let p125 = random_bytes(125, 3);
    let b = w.frame(opcode::PING, &p125);
    w.send(&b);
    assert_eq!(w.read_msg().expect("pong"), Msg::Pong(p125));
    let b = w.frame(opcode::PING, &random_bytes(126, 4));
    w.send_lossy(&b);
    w.expect_close(1002);
}

/// "The router ... offers no extension": a frame with RSV1 set (a permessage-deflate
/// compressed frame from a client that assumed the extension) is a protocol error, 1002.
#[test]
fn a_frame_with_rsv1_set_closes_1002() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let f = request_frame(1, Some(&r.path(APP, 1)), b"compressed?");
    let b = w.raw(FIN | 0x40 | opcode::BINARY, &f);
    w.send(&b);
    w.expect_close(1002);
}

/// Reserved opcodes (3 for data, 0xB for control) are protocol errors: 1002; such closes are
/// counted by code (`fedbus_ws_bad_input_closed_total`) and logged.
#[test]
fn reserved_opcodes_close_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    for op in [0x3u8, 0xB] {
        let mut w = open(&r, &tok);
        let b = w.raw(FIN | op, b"?");
        w.send(&b);
        assert_eq!(w.close_code(), Ok(Some(1002)), "opcode {op:#x}");
    }
    // Each close for what the client sent is counted by its code and logged, as a refused
    // HTTP request is: a text message (1003), a binary message that is no fedbus frame (1002).
    let mut w = open(&r, &tok);
    let b = w.raw(FIN | opcode::TEXT, b"hello");
    w.send(&b);
    assert_eq!(w.close_code(), Ok(Some(1003)));
    let mut w = open(&r, &tok);
    let b = w.raw(FIN | opcode::BINARY, b"not a frame");
    w.send(&b);
    assert_eq!(w.close_code(), Ok(Some(1002)));
    let closed = |code: u16| {
        r.metrics().get(&format!(
            "fedbus_ws_bad_input_closed_total{{code=\"{code}\"}}"
        ))
    };
    wait_for(Duration::from_secs(5), || {
        (closed(1002) >= 3.0).then_some(())
    })
    .unwrap_or_else(|| panic!("1002 closes counted: {}", closed(1002)));
    assert_eq!((closed(1002), closed(1003)), (3.0, 1.0));
    let log = r.log();
    assert!(
        log.contains("client websocket closed: a text message"),
        "{log}"
    );
    assert!(log.contains("client websocket closed: a binary message that is no fedbus frame"));
}

/// RFC 6455 5.2: a 64-bit length with its most significant bit set is invalid: 1002, at once
/// (not a wait for 2^63 bytes, not a 1009 after buffering).
#[test]
fn a_64_bit_length_with_the_top_bit_set_closes_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let mut b = vec![FIN | opcode::BINARY, 0x80 | 127];
    b.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    b.extend_from_slice(&[1, 2, 3, 4]);
    b.extend_from_slice(b"hello");
    w.send(&b);
    w.set_read_timeout(Duration::from_secs(3));
    w.expect_close(1002);
}

/// A close frame's reason may be up to 123 bytes (125 with the code): answered 1000; a close
/// frame of 126 bytes is a bad control frame: 1002.
#[test]
fn a_close_reason_of_123_bytes_is_answered_and_124_bytes_closes_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    for (reason_len, want) in [(123usize, 1000u16), (124, 1002)] {
        let mut w = open(&r, &tok);
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend(std::iter::repeat_n(b'r', reason_len));
        let b = w.frame(opcode::CLOSE, &p);
        w.send_lossy(&b);
        assert_eq!(
            w.close_code(),
            Ok(Some(want)),
            "reason of {reason_len} bytes"
        );
    }
}

/// Close codes on the wire (PROTOCOL.md section 3: allowed 1000-1003, 1007-1014,
/// 3000-4999): an allowed one is answered 1000 (section 8 table: "1000 the client sent a
/// close frame"); 1015, 5000 and 65535 fail the session with 1002.
#[test]
fn allowed_close_codes_are_answered_1000_and_1015_5000_65535_get_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut got = Vec::new();
    for (code, want) in [
        (1001u16, 1000u16),
        (1003, 1000),
        (1007, 1000),
        (1014, 1000),
        (3000, 1000),
        (4999, 1000),
        (1015, 1002),
        (5000, 1002),
        (65535, 1002),
    ] {
        let mut w = open(&r, &tok);
        let b = w.frame(opcode::CLOSE, &code.to_be_bytes());
        w.send_lossy(&b);
        got.push((code, w.close_code(), want));
    }
    let wrong: Vec<_> = got.iter().filter(|(_, c, w)| *c != Ok(Some(*w))).collect();
    assert!(wrong.is_empty(), "(sent, got, wanted): {wrong:?}");
}

/// Section 8 table: "1007 (from the websocket layer) text that is not UTF-8".
#[test]
fn a_text_message_that_is_not_utf8_closes_1007() {
    sent_closes(1007, |w| w.frame(opcode::TEXT, &[0xff, 0xfe, b'x']));
}

/// Section 8 table: "1003 a text message", also when it came in fragments.
#[test]
fn a_fragmented_text_message_closes_1003() {
    sent_closes(1003, |w| {
        let mut wire = w.raw(opcode::TEXT, b"{\"hel");
        wire.extend(w.raw(FIN | opcode::CONTINUATION, b"lo\":1}"));
        wire
    });
}

// =============================================================================================
// The fedbus frame a client sends (sections 5 and 8).

/// Section 5: "readers ... ignore tags they do not know": a Request with an unknown tag
/// beside PATH is served.
#[test]
fn an_unknown_metadata_tag_is_ignored() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let mut meta = BytesMut::new();
    put_meta(&mut meta, 99, b"from the future");
    put_meta(&mut meta, tag::PATH, r.path(APP, 6).as_bytes());
    put_meta(&mut meta, 200, b"");
    let f = encode_frame(Kind::Request, 0, 0, 0, 11, &meta, b"tags");
    w.binary(&f);
    assert_echo(&w.response(), 11, b"tags");
}

/// Section 8: "flags/hops/partition 0 (ignored)": a client that sets FORWARDED, EMERGENCY and
/// PREFLIGHT, 3 hops and partition 99 gets an ordinary answer (flags 0, its own partition,
/// hops 0, no `fedbus-emergency`), not a preflight or a forwarded request's treatment.
#[test]
fn flags_hops_and_partition_set_by_a_client_are_ignored() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::PATH, r.path(APP, 21).as_bytes());
    let f = encode_frame(Kind::Request, 0x07, 3, 99, 12, &meta, b"flags");
    w.binary(&f);
    let a = w.response();
    let d = describe(&a);
    assert_echo(&a, 12, b"flags");
    assert_eq!(a.header.flags, 0, "{d}");
    assert_eq!(a.header.hops, 0, "{d}");
    assert_eq!(a.header.partition, 21 % 16, "{d}");
    assert_eq!(header_of(&a, "fedbus-hops").as_deref(), Some("0"), "{d}");
    assert_eq!(header_of(&a, "fedbus-emergency"), None, "{d}");
}

/// Section 8: the session's credential is the upgrade's token. A TOKEN entry (tag 25, a
/// peer-link field) in a client's frame must not authenticate an anonymous session.
#[test]
fn a_token_entry_in_a_frame_does_not_authenticate_an_anonymous_session() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open_anonymous(&r);
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::PATH, r.path(APP, 2).as_bytes());
    put_meta(&mut meta, tag::TOKEN, tok.as_bytes());
    let f = encode_frame(Kind::Request, 0, 0, 0, 13, &meta, b"sneaky");
    w.binary(&f);
    assert_error_frame(&w.response(), 13, 401, "missing_token");
}

/// Section 5: "An entry that runs past the end is an error": refused, 1002.
#[test]
fn a_metadata_entry_running_past_its_end_closes_1002() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    // PATH claims 255 bytes, 5 follow.
    let meta = [tag::PATH, 0x00, 0xFF, b'/', b'a', b'p', b'i', b'/'];
    let f = encode_frame(Kind::Request, 0, 0, 0, 14, &meta, b"x");
    w.binary(&f);
    w.expect_close(1002);
}

/// Ids are the client's business ("unique among the client's requests in flight"), but a
/// client that reuses one while in flight still gets every answer: two answers with id 7,
/// no reply lost.
#[test]
fn a_request_id_reused_while_in_flight_gets_both_answers() {
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(300).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    w.request(7, Some(&r.path(APP, 1)), b"first");
    w.request(7, Some(&r.path(APP, 2)), b"second");
    let mut got: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            let f = w.response();
            assert_eq!(
                (f.header.request_id, status_of(&f)),
                (7, 200),
                "{}",
                describe(&f)
            );
            f.payload.to_vec()
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()]);
}

/// Section 8: METHOD is `GET`, `POST`, `PUT`, `PATCH` or `DELETE`; "another METHOD 405
/// method_not_allowed": HEAD, OPTIONS and a lowercase `get` (methods are case-sensitive).
#[test]
fn head_options_and_lowercase_methods_are_405() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    for (i, m) in ["HEAD", "OPTIONS", "get", ""].iter().enumerate() {
        let mut meta = BytesMut::new();
        put_meta(&mut meta, tag::PATH, r.path(APP, 1).as_bytes());
        put_meta(&mut meta, tag::METHOD, m.as_bytes());
        let id = 20 + i as u64;
        w.binary(&encode_frame(Kind::Request, 0, 0, 0, id, &meta, b""));
        let f = w.response();
        assert_eq!(
            (status_of(&f), f.get_str(tag::ERROR)),
            (405, Some("method_not_allowed")),
            "METHOD {m:?}: {}",
            describe(&f)
        );
    }
}

// =============================================================================================
// Limits a session meets (section 8.2, TUNING.md limits.*).

/// `limits.max_inflight_per_connection`: exactly the limit is served, the request over it
/// is answered at once with `503 too_many_inflight` and HEADER `retry-after: 1`, counted in
/// `fedbus_requests_total` as every answer is, and once answers are out the slots are free
/// again.
#[test]
fn inflight_limit_exactly_at_it_is_served_one_over_is_503_too_many_inflight() {
    let r = Router::new()
        .shards(1)
        .limit("max_inflight_per_connection", 2)
        .start();
    let _t = r.task().delay_ms(1000).start();
    let tok = r.token(APP, "alice");
    let answered_503 = || r.metrics().get("fedbus_requests_total{status=\"503\"}");
    let before = answered_503();
    let mut w = open(&r, &tok);
    let t0 = Instant::now();
    for id in 1..=3u64 {
        w.request(id, Some(&r.path(APP, id)), b"slot");
    }
    let first = w.response();
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "503 after {:?}",
        t0.elapsed()
    );
    assert_error_frame(&first, 3, 503, "too_many_inflight");
    assert_eq!(answered_503() - before, 1.0, "the refusal is counted");
    assert_eq!(
        header_of(&first, "retry-after").as_deref(),
        Some("1"),
        "{}",
        describe(&first)
    );
    let mut ids: Vec<u64> = (0..2)
        .map(|_| {
            let f = w.response();
            assert_eq!(status_of(&f), 200, "{}", describe(&f));
            f.header.request_id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    w.request(4, Some(&r.path(APP, 4)), b"again");
    assert_echo(&w.response(), 4, b"again");
}

/// An anonymous session's messages are held to `max_anonymous_body_bytes + 64 KiB`: exactly
/// that is read and answered, one byte more is closed 1009 "from the frame head".
#[test]
fn an_anonymous_session_message_exactly_at_its_bound_is_answered_one_more_is_1009() {
    let r = Router::new()
        .shards(1)
        .limit("max_anonymous_body_bytes", 1024)
        .start();
    let limit = 1024 + 64 * 1024;
    let mut w = open_anonymous(&r);
    let f = request_frame(1, None, &vec![b'a'; limit - 24]);
    w.binary(&f);
    assert_error_frame(&w.response(), 1, 400, "bad_request");
    // One more byte: only the frame head is sent; the close must come from it.
    let f = request_frame(2, None, &vec![b'a'; limit - 24 + 1]);
    let wire = w.frame(opcode::BINARY, &f);
    w.send(&wire[..14]);
    w.set_read_timeout(Duration::from_secs(3));
    w.expect_close(1009);
}

/// Section 8: "a payload over limits.max_anonymous_body_bytes for an anonymous service without
/// a token gets 413 body_too_large": exactly the bound is admitted (no task: 503), one byte
/// more is 413, and the session goes on.
#[test]
fn an_anonymous_service_payload_at_the_bound_is_admitted_and_one_more_is_413() {
    let r = Router::new()
        .shards(1)
        .limit("max_anonymous_body_bytes", 1024)
        .start();
    let mut w = open_anonymous(&r);
    let anon = r.path(APP, 3).replace("/api/3/", "/auth/3/");
    w.request(1, Some(&anon), &vec![b'x'; 1024]);
    assert_error_frame(&w.response(), 1, 503, "no_live_task");
    w.request(2, Some(&anon), &vec![b'x'; 1025]);
    assert_error_frame(&w.response(), 2, 413, "body_too_large");
    w.request(3, Some(&anon), b"");
    assert_error_frame(&w.response(), 3, 503, "no_live_task");
}

/// Section 8: the upgrade head "is bounded by limits.max_header_bytes"; TUNING.md raises it
/// "when clients send large tokens". With `max_header_bytes = 32768` a plain HTTP head of
/// 20 KiB is served, and an upgrade head of 16 KiB + 1 byte must open a session too.
#[test]
fn an_upgrade_head_within_a_raised_max_header_bytes_opens_a_session() {
    let r = Router::new()
        .shards(1)
        .limit("max_header_bytes", 32 * 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let resp = r.request(
        &Req::post(&r.path(APP, 1))
            .token(&tok)
            .header("X-Pad", &"p".repeat(20 * 1024))
            .body(b"http"),
    );
    assert_eq!(resp.status, 200, "a 20 KiB HTTP head: {resp:?}");
    // Upgrade heads of exactly `len` bytes (the padding header sized to fit).
    let head_of = |len: usize| {
        let base = ws_head("/api/ws", "127.0.0.1", &[bearer(&tok), "X-Pad: ".into()]).len();
        let h = ws_head(
            "/api/ws",
            "127.0.0.1",
            &[bearer(&tok), format!("X-Pad: {}", "p".repeat(len - base))],
        );
        assert_eq!(h.len(), len);
        h
    };
    let mut got = Vec::new();
    for len in [16 * 1024, 16 * 1024 + 1] {
        got.push(match upgrade_raw(r.api, head_of(len).as_bytes()) {
            Up::Open(mut w, _) => {
                w.request(1, Some(&r.path(APP, 1)), b"big head");
                assert_echo(&w.response(), 1, b"big head");
                (len, "101".to_string())
            }
            Up::Refused(st, _, body) => (len, format!("{st} {body}")),
        });
    }
    assert!(
        got.iter().all(|(_, a)| a == "101"),
        "upgrade heads with max_header_bytes 32768: {got:?}"
    );
}

// =============================================================================================
// Deadlines (section 8 close table, limits.idle_timeout_ms).

/// "1001: nothing arrived for limits.idle_timeout_ms": a quiet session is closed 1001, not
/// before the timeout and not much after.
#[test]
fn a_quiet_session_is_closed_1001_after_the_idle_timeout() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 1000)
        .start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let t0 = Instant::now();
    w.expect_close(1001);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
        "1001 after {took:?}, idle_timeout_ms 1000"
    );
}

/// "a client that is quiet for longer must ping": pings every 300 ms keep a session with a
/// 1 s idle timeout open for 2.4 s, and it still serves.
#[test]
fn pings_keep_a_session_open_past_the_idle_timeout() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 1000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    for i in 0..8u8 {
        std::thread::sleep(Duration::from_millis(300));
        let b = w.frame(opcode::PING, &[i]);
        w.send(&b);
        assert_eq!(w.read_msg().expect("pong"), Msg::Pong(vec![i]));
    }
    w.request(1, Some(&r.path(APP, 1)), b"still here");
    assert_echo(&w.response(), 1, b"still here");
}

/// Idle "means nothing to read and nothing in flight" (TUNING.md: "a client connection with
/// nothing in flight is closed after this"; section 8.2: "nothing sent and nothing in
/// flight"): a request the task takes 1.4 s over, on a session with an 800 ms idle timeout,
/// is answered, and a request sent 300 ms after that answer is served too.
#[test]
fn a_request_sent_300_ms_after_a_slow_answer_is_served_not_closed_1001() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 800)
        .start();
    let _t = r.task().delay_ms(1400).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let t0 = Instant::now();
    w.request(1, Some(&r.path(APP, 1)), b"slow");
    assert_echo(&w.response(), 1, b"slow");
    let answered = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    w.request(2, Some(&r.path(APP, 2)), b"next");
    match w.read_msg() {
        Ok(Msg::Binary(_)) => {}
        other => panic!(
            "answer after {answered:?}; request 2 sent 300 ms later (idle_timeout_ms 800), got \
             {other:?} at {:?}",
            t0.elapsed()
        ),
    }
}

/// "1001: nothing arrived for limits.idle_timeout_ms": a message whose bytes keep arriving
/// (three pieces 600 ms apart) is not cut by a 1 s idle timeout.
#[test]
fn a_message_still_arriving_is_not_cut_by_the_idle_timeout() {
    let r = Router::new()
        .shards(1)
        .limit("idle_timeout_ms", 1000)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let f = request_frame(1, Some(&r.path(APP, 5)), b"slow upload");
    let wire = w.frame(opcode::BINARY, &f);
    let t0 = Instant::now();
    let (a, rest) = wire.split_at(10);
    let (b, c) = rest.split_at(10);
    for (i, piece) in [a, b, c].iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(600));
        }
        w.send_lossy(piece);
    }
    w.set_read_timeout(Duration::from_secs(3));
    match w.read_msg() {
        Ok(Msg::Binary(b)) => {
            assert_echo(&Frame::decode(Bytes::from(b)).unwrap(), 1, b"slow upload")
        }
        other => panic!(
            "pieces at 0, 600, 1200 ms (idle_timeout_ms 1000): {other:?} at {:?}",
            t0.elapsed()
        ),
    }
}

// =============================================================================================
// The upgrade (sections 3 and 8).

/// Section 3: "a client that offers permessage-deflate simply does not get it": a 101
/// without `Sec-WebSocket-Extensions`, and uncompressed frames are served.
#[test]
fn a_permessage_deflate_offer_is_declined() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let head = ws_head(
        "/api/ws",
        "127.0.0.1",
        &[
            bearer(&tok),
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-webkit-deflate-frame".into(),
        ],
    );
    let Up::Open(mut w, h) = upgrade_raw(r.api, head.as_bytes()) else {
        panic!("refused")
    };
    assert_eq!(header_in(&h, "sec-websocket-extensions"), None, "{h}");
    w.request(1, Some(&r.path(APP, 1)), b"plain");
    assert_echo(&w.response(), 1, b"plain");
}

/// Section 3: the router "offers ... no subprotocol": a 101 without
/// `Sec-WebSocket-Protocol` to a client that offered some.
#[test]
fn a_subprotocol_offer_gets_no_protocol() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let head = ws_head(
        "/api/ws",
        "127.0.0.1",
        &[
            bearer(&tok),
            "Sec-WebSocket-Protocol: fedbus.v1, json".into(),
        ],
    );
    match upgrade_raw(r.api, head.as_bytes()) {
        Up::Open(_, h) => assert_eq!(header_in(&h, "sec-websocket-protocol"), None, "{h}"),
        Up::Refused(st, h, b) => panic!("{st} {h}{b}"),
    }
}

/// A browser's upgrade head (Firefox: `Connection: keep-alive, Upgrade`, `Upgrade: WebSocket`)
/// from a same-origin page (`Origin: http://<Host>`, section 8.1: not subject to CORS) opens
/// a session on a router with no CORS policy at all.
#[test]
fn a_same_origin_browser_upgrade_opens_without_any_cors_policy() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let host = r.api.to_string();
    let raw = format!(
        "GET /api/ws?access_token={tok} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0\r\nOrigin: http://{host}\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\nPragma: no-cache\r\n\r\n",
        new_key()
    );
    match upgrade_raw(r.api, raw.as_bytes()) {
        Up::Open(mut w, _) => {
            w.request(1, Some(&r.path(APP, 1)), b"same origin");
            assert_echo(&w.response(), 1, b"same origin");
        }
        Up::Refused(st, h, b) => panic!("{st} {h}{b}"),
    }
}

/// A client that writes its first request in the same packet as the upgrade head (no wait
/// for the 101) is served: what followed the head is the session's first bytes.
#[test]
fn a_request_sent_with_the_upgrade_head_is_served() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut raw = ws_head("/api/ws", "127.0.0.1", &[bearer(&tok)]).into_bytes();
    let f = request_frame(9, Some(&r.path(APP, 9)), b"eager");
    raw.extend(raw_frame(FIN | opcode::BINARY, &f, [1, 2, 3, 4]));
    match upgrade_raw(r.api, &raw) {
        Up::Open(mut w, _) => assert_echo(&w.response(), 9, b"eager"),
        Up::Refused(st, h, b) => panic!("{st} {h}{b}"),
    }
}

/// Section 8: "an upgrade after pipelined requests still in flight is 400 bad_upgrade": the
/// request before it is answered first, then the 400, then the close.
#[test]
fn an_upgrade_behind_a_request_in_flight_is_400_bad_upgrade_after_its_answer() {
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(500).start();
    let tok = r.token(APP, "alice");
    let mut raw = Req::post(&r.path(APP, 1))
        .token(&tok)
        .body(b"first")
        .bytes();
    raw.extend(ws_head("/api/ws", "127.0.0.1", &[bearer(&tok)]).into_bytes());
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(5));
    c.send(&raw);
    let a = c.read_response().expect("first answer");
    assert_eq!((a.status, &a.body[..]), (200, &b"first"[..]), "{a:?}");
    let b = c.read_response().expect("answer to the upgrade");
    b.assert_error(400, "bad_upgrade");
    assert!(c.is_closed(), "closed after the refusal");
}

/// Section 8: "a request arriving when nothing is in flight" on a keep-alive connection may
/// be the upgrade: after an answered request, the same connection becomes a session.
#[test]
fn an_upgrade_on_a_keepalive_connection_after_an_answer_opens_a_session() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let t = tcp(r.api);
    let mut s = t.try_clone().unwrap();
    s.write_all(
        &Req::post(&r.path(APP, 1))
            .token(&tok)
            .body(b"http first")
            .bytes(),
    )
    .unwrap();
    // Read the whole HTTP answer (its length is known: the echo).
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"http first")) {
        let n = read_retrying(&mut s, &mut chunk).expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 "));
    let head = ws_head("/api/ws", "127.0.0.1", &[bearer(&tok)]);
    match upgrade_on(Box::new(s), t, head.as_bytes()) {
        Up::Open(mut w, _) => {
            w.request(2, Some(&r.path(APP, 2)), b"then ws");
            assert_echo(&w.response(), 2, b"then ws");
        }
        Up::Refused(st, h, b) => panic!("{st} {h}{b}"),
    }
}

/// Section 8: another method on `/api/ws` gets 405 (`Allow: GET`); section 8 (HTTP): "no
/// answer to HEAD, a router's refusal included, carries a body".
#[test]
fn head_of_api_ws_is_405_allow_get_without_a_body() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let raw = ws_head("/api/ws", "127.0.0.1", &[bearer(&tok)]).replacen("GET ", "HEAD ", 1);
    let mut s = tcp(r.api);
    s.write_all(raw.as_bytes()).unwrap();
    let (h, body) = answer_to_eof(&mut s);
    assert!(h.starts_with("HTTP/1.1 405 "), "{h}");
    assert_eq!(header_in(&h, "allow").as_deref(), Some("GET"), "{h}");
    assert!(
        body.is_empty(),
        "HEAD answered with a {}-byte body: {h}{}",
        body.len(),
        String::from_utf8_lossy(&body)
    );
}

/// Section 8.2 table: a method other than GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS is
/// "405 method_not_allowed with Allow: GET, HEAD, ... (`Allow: GET` for `/api/ws`), closes".
#[test]
fn an_unknown_method_on_api_ws_is_405_with_allow_get() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    for m in ["PROPFIND", "TRACE"] {
        let raw =
            ws_head("/api/ws", "127.0.0.1", &[bearer(&tok)]).replacen("GET ", &format!("{m} "), 1);
        let mut s = tcp(r.api);
        s.write_all(raw.as_bytes()).unwrap();
        let (h, body) = answer_to_eof(&mut s);
        assert!(h.starts_with("HTTP/1.1 405 "), "{m}: {h}");
        assert!(
            String::from_utf8_lossy(&body).contains("method_not_allowed"),
            "{m}"
        );
        assert_eq!(header_in(&h, "allow").as_deref(), Some("GET"), "{m}: {h}");
    }
}

/// A GET upgrade announcing a body is refused (`400 bad_upgrade`, "a websocket upgrade
/// carries no body") when the body is still to come; the answer must not depend on whether
/// the 4 body bytes came in the same packet as the head.
#[test]
fn an_upgrade_with_a_body_gets_the_same_answer_whether_or_not_the_body_arrived() {
    let r = Router::new().shards(1).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let head = ws_head(
        "/api/ws",
        "127.0.0.1",
        &[bearer(&tok), "Content-Length: 4".into()],
    );
    let status_of_answer = |raw: &[u8]| -> u16 {
        let mut s = tcp(r.api);
        s.write_all(raw).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = read_retrying(&mut s, &mut chunk).expect("read");
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&got);
        line.split(' ')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("status")
    };
    let later = status_of_answer(head.as_bytes());
    let mut with = head.clone().into_bytes();
    with.extend_from_slice(b"body");
    let together = status_of_answer(&with);
    assert_eq!(
        (later, together),
        (400, 400),
        "(body not sent yet, body in the same packet)"
    );
}

/// Section 8.2 table: `Transfer-Encoding` alone is "411 length_required, closes", also on an
/// upgrade head (no session opened on a chunked request).
#[test]
fn an_upgrade_with_transfer_encoding_is_411_and_closed() {
    let r = Router::new().shards(1).start();
    let tok = r.token(APP, "alice");
    let head = ws_head(
        "/api/ws",
        "127.0.0.1",
        &[bearer(&tok), "Transfer-Encoding: chunked".into()],
    );
    let mut s = tcp(r.api);
    s.write_all(head.as_bytes()).unwrap();
    let (h, body) = answer_to_eof(&mut s);
    assert!(h.starts_with("HTTP/1.1 411 "), "{h}");
    assert!(String::from_utf8_lossy(&body).contains("length_required"));
}

/// Section 8.1: a preflight from an allowed origin "is answered by the router: 204, no body,
/// access-control-allow-methods: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS,
/// access-control-allow-headers: <allowed_headers>, access-control-max-age", whatever method
/// and headers it asks about, and never reaches a task (there is none here).
#[test]
fn a_preflight_asking_for_odd_methods_and_headers_gets_the_policy() {
    let r = Router::new()
        .shards(1)
        .cors(
            APP,
            "allowed_origins = [\"https://page.example\"]\nmax_age_secs = 77",
        )
        .start();
    let mut c = r.conn();
    c.send(
        &Req::new("OPTIONS", &r.path(APP, 1))
            .header("Origin", "https://PAGE.example")
            .header("Access-Control-Request-Method", "PROPFIND")
            .header("Access-Control-Request-Headers", "x-weird, authorization")
            .bytes(),
    );
    let resp = c.read_response_for("OPTIONS").expect("preflight answer");
    assert_eq!(resp.status, 204, "{resp:?}");
    assert!(resp.body.is_empty(), "{resp:?}");
    assert_eq!(
        resp.header("access-control-allow-methods"),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        "{resp:?}"
    );
    assert_eq!(
        resp.header("access-control-allow-headers"),
        Some("authorization, content-type"),
        "{resp:?}"
    );
    assert_eq!(
        resp.header("access-control-max-age"),
        Some("77"),
        "{resp:?}"
    );
}

// =============================================================================================
// wss on the TLS listener, and sessions that end early.

/// Section 8.2: the limits hold on "the TLS listener" too: over `wss://` (a certificate from
/// `fedbus keys cert`, verified with the dev CA) a request is served, and a message one byte
/// over `max_body_bytes + 64 KiB` is closed 1009.
#[test]
fn over_wss_a_request_is_served_and_an_oversized_message_is_1009() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::Arc;
    let certs = TempDir::new("probe-wss");
    let cert = dev_cert(certs.path(), "r", &["localhost", "127.0.0.1"]);
    let r = Router::new()
        .shards(1)
        .tls(&[cert])
        .limit("max_body_bytes", 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dev_ca(certs.path())).expect("CA") {
        roots.add(c.expect("CA PEM")).expect("CA cert");
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let t = tcp(r.api_tls.expect("TLS listener"));
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap())
        .expect("client");
    let s = rustls::StreamOwned::new(conn, t.try_clone().unwrap());
    let head = ws_head("/api/ws", "localhost", &[bearer(&tok)]);
    let mut w = match upgrade_on(Box::new(s), t, head.as_bytes()) {
        Up::Open(w, _) => w,
        Up::Refused(st, h, b) => panic!("{st} {h}{b}"),
    };
    w.request(1, Some(&r.path(APP, 1)), b"over tls");
    assert_echo(&w.response(), 1, b"over tls");
    let limit = 1024 + 64 * 1024;
    let f = request_frame(2, None, &vec![b'z'; limit - 24 + 1]);
    let wire = w.frame(opcode::BINARY, &f);
    w.send_lossy(&wire);
    assert_eq!(w.close_code(), Ok(Some(1009)));
}

/// A client that vanishes (TCP reset) with requests in flight: no panic, the session's
/// connection and body bytes come back once the task has answered into the void, and the
/// shard serves a new session.
#[test]
fn a_client_vanishing_with_requests_in_flight_gives_everything_back() {
    let r = Router::new().shards(1).start();
    // Long enough that the first request is still unanswered when the fourth is pending and
    // the charge is read, on a loaded machine too (700 ms was not: one CI run read three
    // bodies held, the first answered meanwhile).
    let _t = r.task().delay_ms(2500).start();
    let tok = r.token(APP, "alice");
    let conns = || r.metrics().get("fedbus_connections{listener=\"api\"}");
    let held = || r.metrics().get("fedbus_body_bytes_held");
    let mut w = open(&r, &tok);
    for id in 0..4u64 {
        w.request(id, Some(&r.path(APP, id)), &random_bytes(100 * 1024, id));
    }
    r.wait_pending(4.0);
    assert!(
        held() >= 400.0 * 1024.0,
        "bodies in flight not charged: {}",
        held()
    );
    // RST: linger 0 is not in std; shut down both directions and drop.
    let _ = w.tcp.shutdown(std::net::Shutdown::Both);
    drop(w);
    let back = wait_for(Duration::from_secs(10), || {
        (held() == 0.0 && conns() == 0.0 && r.metrics().get("fedbus_pending_requests") == 0.0)
            .then_some(())
    });
    assert!(
        back.is_some(),
        "after the client vanished: body bytes held {}, api connections {}, pending {}",
        held(),
        conns(),
        r.metrics().get("fedbus_pending_requests")
    );
    let mut w = open(&r, &tok);
    w.request(9, Some(&r.path(APP, 9)), b"after");
    assert_echo(&w.response(), 9, b"after");
    assert!(!r.log().contains("panicked"), "{}", r.log());
}

/// Section 8 table: "1000 the client sent a close frame": answered at once, even with a
/// request in flight at a slow task (its answer could only follow the close).
#[test]
fn a_close_with_a_request_in_flight_is_answered_1000_at_once() {
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(3000).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    w.request(1, Some(&r.path(APP, 1)), b"slow");
    r.wait_pending(1.0);
    let t0 = Instant::now();
    let b = w.frame(opcode::CLOSE, &1000u16.to_be_bytes());
    w.send(&b);
    w.expect_close(1000);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "close after {:?}",
        t0.elapsed()
    );
}

/// PROTOCOL.md section 8: a refused upgrade "closes" as every refusal does, with a lingering
/// close: bytes the client sent after its head (256 KiB here) are read and dropped, so the
/// refusal (401 for a bad token) arrives whole and the connection ends with a clean EOF, not
/// a reset that can destroy the answer before the client reads it.
#[test]
fn a_refused_upgrade_with_bytes_behind_it_ends_in_a_clean_close() {
    let r = Router::new().shards(1).start();
    let mut s = tcp(r.api);
    let mut raw = ws_head("/api/ws", "127.0.0.1", &[bearer("not.a.token")]).into_bytes();
    raw.extend(std::iter::repeat_n(b'j', 256 * 1024));
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&raw);
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        match read_retrying(&mut s, &mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e),
        }
    };
    let _ = writer.join();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("bad_token"), "{text}");
    assert!(
        end.is_ok(),
        "the refusal ended in {end:?}, not a clean close"
    );
}

/// A client that shuts its sending side after its requests (a TCP half-close) still gets their
/// answers, as an HTTP client does, and then the session's close frame; before, the answers
/// in flight were dropped and the connection cut.
#[test]
fn a_half_closed_session_still_gets_the_answers_in_flight() {
    let r = Router::new().shards(1).start();
    let _t = r.task().delay_ms(300).start();
    let tok = r.token(APP, "alice");
    let mut w = open(&r, &tok);
    let path = r.path(APP, 5);
    w.request(1, Some(&path), b"one");
    w.request(2, Some(&path), b"two");
    w.tcp
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut answers = Vec::new();
    let close = loop {
        match w.read_msg() {
            Ok(Msg::Binary(b)) => {
                let f = Frame::decode(Bytes::from(b)).expect("frame");
                answers.push((f.header.request_id, status_of(&f), f.payload.to_vec()));
            }
            Ok(Msg::Close(c, _)) => break c,
            Ok(_) => continue,
            Err(e) => panic!("after {answers:?}: {e}"),
        }
    };
    answers.sort();
    assert_eq!(
        answers,
        vec![(1, 200, b"one".to_vec()), (2, 200, b"two".to_vec())]
    );
    assert_eq!(close, Some(1000));
}
