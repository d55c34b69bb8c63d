//! The router's websocket reader (`ws::conn::WsReader`, the same code that reads every task
//! link, peer link and `/api/ws` session) driven from a byte buffer instead of a socket: the
//! first byte picks the side and the size of each read, the rest is the stream. Never panics,
//! never hands out a message over the limit, a text message that is not UTF-8, or a close code
//! that may not appear on the wire.
#![no_main]

use fedbus_proto::ws::frame::close_code_allowed;
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
                total += len;
                assert!(total <= rest.len(), "more payload out than bytes in");
            }
            Err(WsError::Eof) => break,
            Err(e) => {
                assert!(e.close_code().is_some(), "{e}");
                break;
            }
        }
    }
});
