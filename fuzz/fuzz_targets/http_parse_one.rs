//! The router's HTTP/1.1 request parser (`api::http::parse_one`, public with the `bench`
//! feature) on pipelined requests: never panics, every request it splits off consumes bytes
//! and holds a body within the limit. The same bytes read in pieces give the same requests at
//! the same reads through `api::http::HeadScan` (which skips the parses that cannot change the
//! answer) as through `parse_one` after each read, and the same error: at the same read, or at
//! the first later one that brings a line end or a control byte or passes the head's limit, or
//! at the end of input.
#![no_main]

use bytes::BytesMut;
use fedbus_router::api::http::{line_end_or_control, parse_one, HeadScan, Parsed};
use libfuzzer_sys::fuzz_target;

const MAX_HEADER: usize = 2048;
const MAX_BODY: usize = 4096;

/// A read loop: the bytes read so far, parsed after each read through `HeadScan` (`gated`)
/// or `parse_one`; each request's length and body, and the error that ended it.
struct ReadLoop {
    gated: bool,
    buf: BytesMut,
    scan: HeadScan,
    seen: Vec<(usize, Vec<u8>)>,
    error: Option<u16>,
}

impl ReadLoop {
    fn new(gated: bool) -> ReadLoop {
        let (buf, scan) = (BytesMut::new(), HeadScan::default());
        let (seen, error) = (Vec::new(), None);
        ReadLoop {
            gated,
            buf,
            scan,
            seen,
            error,
        }
    }

    fn read(&mut self, piece: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.buf.extend_from_slice(piece);
        loop {
            let before = self.buf.len();
            let parsed = match self.gated {
                true => self.scan.parse(&mut self.buf, MAX_HEADER, MAX_BODY),
                false => parse_one(&mut self.buf, MAX_HEADER, MAX_BODY),
            };
            match parsed {
                // The bytes it took (head and body), and its body.
                Parsed::Request(r) => self.seen.push((before - self.buf.len(), r.body().to_vec())),
                Parsed::Incomplete { .. } => return,
                Parsed::Error(status, _, _) => return self.error = Some(status),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The same reads through both: `HeadScan` may leave a malformed head for later only while
    // no read brings a line end or a control byte and the head is within the limit; at the
    // end of input (`HeadScan::flush`) the two agree.
    if let Some((&first, rest)) = data.split_first() {
        let chunk = usize::from(first % 32) + 1;
        let (mut gated, mut plain) = (ReadLoop::new(true), ReadLoop::new(false));
        for piece in rest.chunks(chunk) {
            gated.read(piece);
            plain.read(piece);
            assert_eq!(gated.seen, plain.seen, "{chunk}-byte reads");
            match (gated.error, plain.error) {
                (Some(_), None) => panic!("HeadScan refused what parse_one takes"),
                (None, Some(_)) => {
                    let deferrable = !line_end_or_control(piece) && gated.buf.len() <= MAX_HEADER;
                    assert!(deferrable, "a malformed head not refused at its line end");
                }
                (g, p) => assert_eq!(g, p, "{chunk}-byte reads"),
            }
        }
        if gated.scan.flush() {
            gated.read(&[]);
        }
        assert_eq!(gated.error, plain.error, "{chunk}-byte reads, at the end");
    }
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
