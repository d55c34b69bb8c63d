//! Property tests (stable Rust, no nightly fuzzer): every decoder in fedbus-proto takes
//! arbitrary bytes without panicking, and each encoder round-trips through its decoder.
//! Each property runs proptest's default 256 cases (or fewer) so the suite stays fast.

use bytes::{Bytes, BytesMut};
use fedbus_proto::http::allowed_header;
use fedbus_proto::ws::frame::{
    check_close_payload, close_code_allowed, encode_head, opcode, parse_head, unmask, MAX_HEADER,
};
use fedbus_proto::ws::handshake::{client_request, error_response, parse_upgrade};
use fedbus_proto::{encode_frame, put_meta, Frame, Kind, ProtoError, HEADER_LEN, MAGIC};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(vec![
        Kind::Request,
        Kind::Response,
        Kind::Redirect,
        Kind::SecretPush,
    ])
}

fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// A valid upgrade request, as fedbus's own client writes it.
const GOOD_UPGRADE: &str = "GET /api/ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frame_decode_arbitrary_bytes(b in bytes(200)) {
        let _ = Frame::decode(Bytes::from(b));
    }

    /// Past the magic and kind bytes, so the length and metadata checks see the garbage.
    #[test]
    fn frame_decode_arbitrary_body(k in kind(), rest in bytes(300)) {
        let mut b = vec![MAGIC, k as u8];
        b.extend_from_slice(&rest);
        let len = b.len();
        match Frame::decode(Bytes::from(b)) {
            Ok(f) => {
                prop_assert_eq!(HEADER_LEN + f.meta.len() + f.payload.len(), len);
                // Validated metadata iterates without errors.
                prop_assert!(fedbus_proto::MetaIter::new(&f.meta).all(|e| e.is_ok()));
            }
            Err(ProtoError::Short(n)) => prop_assert!(n < HEADER_LEN),
            Err(ProtoError::BadMagic(_) | ProtoError::BadKind(_)) => prop_assert!(false),
            Err(_) => {}
        }
    }

    /// Header lengths that agree with the body, over garbage metadata.
    #[test]
    fn frame_decode_consistent_lengths_garbage_meta(
        k in kind(), meta in bytes(100), payload in bytes(100)
    ) {
        let msg = encode_frame(k, 0, 0, 0, 1, &meta, &payload).freeze();
        if let Ok(f) = Frame::decode(msg) {
            prop_assert_eq!(&f.meta[..], &meta[..]);
            prop_assert_eq!(&f.payload[..], &payload[..]);
        }
    }

    #[test]
    fn frame_round_trip(
        k in kind(),
        flags in any::<u8>(),
        hops in any::<u8>(),
        partition in any::<u32>(),
        id in any::<u64>(),
        entries in prop::collection::vec((any::<u8>(), bytes(64)), 0..8),
        payload in bytes(256),
    ) {
        let mut meta = BytesMut::new();
        for (t, v) in &entries {
            put_meta(&mut meta, *t, v);
        }
        let msg = encode_frame(k, flags, hops, partition, id, &meta, &payload).freeze();
        let f = Frame::decode(msg).unwrap();
        prop_assert_eq!(f.header.kind, k);
        prop_assert_eq!(f.header.flags, flags);
        prop_assert_eq!(f.header.hops, hops);
        prop_assert_eq!(f.header.partition, partition);
        prop_assert_eq!(f.header.request_id, id);
        prop_assert_eq!(&f.payload[..], &payload[..]);
        let got: Vec<(u8, Vec<u8>)> = f.meta_entries().map(|(t, v)| (t, v.to_vec())).collect();
        prop_assert_eq!(got, entries);
    }

    #[test]
    fn ws_parse_head_arbitrary_bytes(b in bytes(20)) {
        if let Ok(Some(h)) = parse_head(&b) {
            prop_assert!([2, 4, 6, 8, 10, 14].contains(&h.header_len));
            prop_assert!(h.header_len <= b.len());
            prop_assert!(h.payload_len >> 63 == 0);
            // The header alone parses the same; one byte less is "need more".
            prop_assert_eq!(parse_head(&b[..h.header_len]), Ok(Some(h)));
            prop_assert_eq!(parse_head(&b[..h.header_len - 1]), Ok(None));
            if h.opcode >= opcode::CLOSE {
                prop_assert!(h.fin && h.payload_len <= 125);
            }
        }
    }

    #[test]
    fn ws_head_round_trip(
        op in prop::sample::select(vec![
            opcode::CONTINUATION, opcode::TEXT, opcode::BINARY,
            opcode::CLOSE, opcode::PING, opcode::PONG,
        ]),
        len in prop_oneof![0usize..=125, 126usize..=65_535, 65_536usize..=(1 << 40)],
        mask in any::<Option<[u8; 4]>>(),
    ) {
        let len = if op >= opcode::CLOSE { len % 126 } else { len };
        let mut out = [0u8; MAX_HEADER];
        let n = encode_head(op, len, mask, &mut out);
        let h = parse_head(&out[..n]).unwrap().unwrap();
        prop_assert!(h.fin);
        prop_assert_eq!(h.opcode, op);
        prop_assert_eq!(h.mask, mask);
        prop_assert_eq!(h.header_len, n);
        prop_assert_eq!(h.payload_len, len as u64);
    }

    #[test]
    fn ws_unmask_twice_is_identity(data in bytes(64), mask in any::<[u8; 4]>(), off in 0usize..8) {
        let mut d = data.clone();
        unmask(&mut d, mask, off);
        if mask != [0; 4] {
            for (i, b) in d.iter().enumerate() {
                prop_assert_eq!(*b, data[i] ^ mask[(off + i) % 4]);
            }
        }
        unmask(&mut d, mask, off);
        prop_assert_eq!(d, data);
    }

    #[test]
    fn ws_parse_upgrade_arbitrary_bytes(b in bytes(300)) {
        match parse_upgrade(&b) {
            Ok(Some(u)) => prop_assert!(u.head_len <= b.len()),
            Ok(None) => {}
            Err(r) => {
                prop_assert!([400, 405, 426, 431].contains(&r.status), "{:?}", r);
                let _ = error_response(r.status, r.code, r.message);
            }
        }
    }

    /// One byte of a good request replaced: never a panic, never an unexpected status.
    #[test]
    fn ws_parse_upgrade_mutated(pos in 0usize..GOOD_UPGRADE.len(), byte in any::<u8>()) {
        let mut b = GOOD_UPGRADE.as_bytes().to_vec();
        b[pos] = byte;
        if let Err(r) = parse_upgrade(&b) {
            prop_assert!([400, 405, 426, 431].contains(&r.status), "{:?}", r);
        }
    }

    #[test]
    fn ws_client_request_round_trips(
        path in prop::collection::vec(prop::sample::select(b"abz09/_-.~".to_vec()), 0..40),
        host in prop::collection::vec(prop::sample::select(b"abz09.:-".to_vec()), 1..30),
        bearer in any::<bool>(),
    ) {
        let path = format!("/{}", String::from_utf8(path).unwrap());
        let host = String::from_utf8(host).unwrap();
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = client_request(&host, &path, key, bearer.then_some("tok"));
        let up = parse_upgrade(req.as_bytes()).unwrap().unwrap();
        prop_assert_eq!(up.path, path);
        prop_assert_eq!(up.key, key);
        prop_assert_eq!(up.bearer.as_deref(), bearer.then_some("tok"));
        prop_assert_eq!(up.head_len, req.len());
    }

    #[test]
    fn ws_close_payload_arbitrary(p in bytes(130)) {
        let r = check_close_payload(&p);
        let expect = match p.len() {
            0 => Ok(None),
            1 => Err(1002),
            _ => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                if !close_code_allowed(code) {
                    Err(1002)
                } else if std::str::from_utf8(&p[2..]).is_err() {
                    Err(1007)
                } else {
                    Ok(Some(code))
                }
            }
        };
        prop_assert_eq!(r, expect);
    }

    #[test]
    fn ws_close_payload_round_trip(
        code in prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999],
        reason in "\\PC{0,30}",
    ) {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        prop_assert_eq!(check_close_payload(&p), Ok(Some(code)));
    }

    #[test]
    fn http_allowed_header_arbitrary(line in bytes(80), from_router in any::<bool>()) {
        if allowed_header(&line, from_router) {
            prop_assert!(!line.iter().any(|b| is_ctl(*b)));
            let colon = line.iter().position(|b| *b == b':').unwrap();
            prop_assert!(colon > 0);
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            prop_assert!(![
                "content-length", "transfer-encoding", "connection", "keep-alive",
                "upgrade", "trailer", "content-type",
            ].contains(&name.as_str()));
            prop_assert!(from_router || !name.starts_with("fedbus-"));
        }
    }

    /// A good name with an arbitrary value: allowed exactly when the value has no CTL.
    #[test]
    fn http_allowed_header_values(value in bytes(60)) {
        let mut line = b"x-user:".to_vec();
        line.extend_from_slice(&value);
        prop_assert_eq!(allowed_header(&line, false), !value.iter().any(|b| is_ctl(*b)));
    }
}
