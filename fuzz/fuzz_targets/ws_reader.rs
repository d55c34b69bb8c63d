//! The router's websocket reader (`ws::conn::WsReader`, the same code that reads every task
//! link, peer link and `/api/ws` session) driven from a byte buffer instead of a socket: the
//! first byte picks the side and the size of each read, the rest is the stream. Never panics,
//! never hands out a message over the limit, a text message that is not UTF-8, or a close code
//! that may not appear on the wire; never charges a message in progress over the limit
//! (`WsReader::charge_arriving`), and with a small budget drops a message over it and reads on.
#![no_main]

use fedbus_proto::ws::frame::close_code_allowed;
use fedbus_router::ws::conn::DROPPED_HEAD;
use fedbus_router::ws::{Message, Side, WsError, WsReader};
use futures_lite::AsyncRead;
use libfuzzer_sys::fuzz_target;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

const MAX_MESSAGE: usize = 4096;

/// Hands out `data` at most `step` bytes per read, then end of stream.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = self.data.len().min(self.step).min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let side = if first & 1 == 0 {
        Side::Server
    } else {
        Side::Client
    };
    let step = usize::from(first >> 1) + 1;
    let mut r = WsReader::new(
        Pieces { data: rest, step },
        Default::default(),
        side,
        MAX_MESSAGE,
    );
    // Half the inputs have a budget of 1024 bytes: a message arriving in pieces over it is
    // read and dropped (`WsError::Dropped`), and the reader goes on.
    let budget = if rest.len() % 2 == 1 {
        1024
    } else {
        usize::MAX
    };
    let charged = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let c = charged.clone();
    r.charge_arriving(move |h| {
        let n = h.now;
        assert!(n <= h.whole, "charged {n} bytes of {}", h.whole);
        assert!(
            h.whole <= MAX_MESSAGE,
            "charged {} bytes for one message",
            h.whole
        );
        c.set(if n <= budget { n } else { 0 });
        n <= budget
    });
    let mut total = 0usize;
    loop {
        match futures_lite::future::block_on(r.next()) {
            Ok(m) => {
                let len = match &m {
                    Message::Binary(b) | Message::Text(b) => b.len(),
                    Message::Ping(b) | Message::Pong(b) => {
                        assert!(b.len() <= 125);
                        b.len()
                    }
                    Message::Close(code) => {
                        assert!(code.is_none_or(close_code_allowed));
                        0
                    }
                };
                assert!(len <= MAX_MESSAGE);
                if let Message::Text(t) = &m {
                    assert!(std::str::from_utf8(t).is_ok());
                }
                if matches!(m, Message::Binary(_) | Message::Text(_)) {
                    // The charge goes with the message to its reader: taken over here.
                    assert!(charged.get() <= len.max(budget), "charged over the message");
                    charged.set(0);
                }
                total += len;
                assert!(total <= rest.len(), "more payload out than bytes in");
            }
            Err(WsError::Eof) => break,
            Err(WsError::Dropped { head, .. }) => {
                assert!(head.len() <= DROPPED_HEAD);
                assert_eq!(charged.get(), 0, "a dropped message is charged");
                total += head.len();
                assert!(total <= rest.len(), "more payload out than bytes in");
            }
            Err(e) => {
                assert!(e.close_code().is_some(), "{e}");
                break;
            }
        }
    }
});
