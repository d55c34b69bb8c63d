//! The router's HTTP/1.1 request parser (`api::http::parse_one`, public with the `bench`
//! feature) on pipelined requests: never panics, every request it splits off consumes bytes
//! and holds a body within the limit.
#![no_main]

use bytes::BytesMut;
use fedbus_router::api::http::{parse_one, Parsed};
use libfuzzer_sys::fuzz_target;

const MAX_HEADER: usize = 2048;
const MAX_BODY: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match parse_one(&mut buf, MAX_HEADER, MAX_BODY) {
            Parsed::Request(r) => {
                assert!(r.body().len() <= MAX_BODY);
                assert!(buf.len() < before, "a request that consumed nothing");
                assert!(before - buf.len() >= r.body().len());
            }
            Parsed::Incomplete { head_len, .. } => {
                assert_eq!(buf.len(), before);
                if let Some(n) = head_len {
                    assert!(n <= before);
                }
                break;
            }
            Parsed::Error(status, _, _) => {
                assert!((400..600).contains(&status), "{status}");
                break;
            }
        }
    }
});
