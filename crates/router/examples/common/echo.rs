//! The echo session both Autobahn examples run (`ws_echo` as the server side, `ws_echo_client`
//! as the client side): `ws::start` with the router's default limits, then every text and
//! binary message sent back as it came, pongs for pings, close 1000 for a close and the
//! reader's own close code (1002, 1007, 1009) for a protocol error.

use bytes::BytesMut;
use fedbus_router::config::Limits;
use fedbus_router::ws::{self, frame::opcode, Message, Side};
use glommio::net::TcpStream;
use std::time::Duration;

/// Echoes on an upgraded connection (`leftover`: bytes read past the handshake) until the
/// peer closes or the reader fails the connection.
pub async fn echo_session(stream: TcpStream, leftover: BytesMut, side: Side) {
    let limits = Limits::default();
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(stream, leftover, side, limits.max_message_bytes(), &limits);
    let end = loop {
        match reader.next().await {
            Ok(Message::Binary(b)) => {
                if out.borrow_mut().send_binary(&[], &b).is_err() {
                    break Some(1013);
                }
            }
            Ok(Message::Text(t)) => {
                // Checked UTF-8 by the reader.
                let s = std::str::from_utf8(&t).unwrap_or_default();
                if out.borrow_mut().send_text(s).is_err() {
                    break Some(1013);
                }
            }
            Ok(Message::Ping(p)) => out.borrow_mut().send_control(opcode::PONG, &p),
            Ok(Message::Pong(_)) => {}
            Ok(Message::Close(_)) => break Some(1000),
            Err(e) => break e.close_code(),
        }
    };
    let lingering = end.is_some();
    match end {
        Some(code) => out.borrow_mut().close(code),
        None => out.borrow_mut().abort(),
    }
    let _ = writer.await;
    if lingering {
        // The server closes the TCP connection after the closing handshake (RFC 6455 7.1.1);
        // either side reads and drops what is left for a bounded time.
        reader.drain(Duration::from_secs(2)).await;
    }
}
