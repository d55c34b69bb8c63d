//! The websocket opening handshake, both sides: `parse_upgrade` (every upgrade request) and
//! `parse_client_response` (the answer a task, peer or client link gets). Never panic; an
//! accepted request gives the same result from exactly its head, and its 101 answer is
//! accepted by the client side.
#![no_main]

use bytes::BytesMut;
use fedbus_proto::ws::handshake::{
    accept_response, parse_client_response, parse_upgrade, ClientHandshake, MAX_HEAD,
};
use libfuzzer_sys::fuzz_target;

/// The RFC 6455 section 1.3 sample key.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fuzz_target!(|data: &[u8]| {
    match parse_upgrade(data) {
        Ok(Some(up)) => {
            assert!(up.head_len <= data.len() && up.head_len <= MAX_HEAD);
            assert_eq!(up.key.len(), 24);
            assert_eq!(parse_upgrade(&data[..up.head_len]), Ok(Some(up.clone())));
            let resp = BytesMut::from(accept_response(&up.key).as_bytes());
            match parse_client_response(&resp, &up.key) {
                Ok(ClientHandshake::Accepted(n)) => assert_eq!(n, resp.len()),
                other => panic!("our own 101 refused: {other:?}"),
            }
        }
        Ok(None) => assert!(data.len() <= MAX_HEAD),
        Err(r) => assert!(matches!(r.status, 400 | 405 | 426 | 431), "{r:?}"),
    }
    let buf = BytesMut::from(data);
    if let Ok(ClientHandshake::Accepted(n)) = parse_client_response(&buf, KEY) {
        assert!(n <= data.len());
    }
});
