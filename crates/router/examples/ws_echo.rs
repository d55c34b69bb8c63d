//! A websocket echo server on fedbus's own websocket layer, for the Autobahn|Testsuite server
//! cases (`scripts/autobahn`). Not part of the router: it only wires the pieces the router's
//! websocket endpoints use (`ws::handshake::parse_upgrade` and `accept_response`,
//! `ws::start` with its `WsReader` and `WsOut` writer task), with the router's default message
//! limit, and answers the way `/api/ws` does: pongs for pings, close 1000 for a close, and the
//! reader's own close code (1002, 1007, 1009) for a protocol error. Text and binary messages
//! are sent back as they came.
//!
//! `cargo run -p fedbus-router --example ws_echo -- 127.0.0.1:9002`

use bytes::BytesMut;
use fedbus_router::config::Limits;
use fedbus_router::ws::{self, frame::opcode, handshake, Message, Side};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::LocalExecutorBuilder;
use std::time::Duration;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9002".to_string());
    LocalExecutorBuilder::default()
        .spawn(move || async move {
            let l = TcpListener::bind(&addr).expect("bind");
            println!("ws_echo listening on {}", l.local_addr().expect("addr"));
            loop {
                match l.accept().await {
                    Ok(s) => {
                        glommio::spawn_local(serve(s)).detach();
                    }
                    Err(e) => eprintln!("accept: {e}"),
                }
            }
        })
        .expect("executor")
        .join()
        .expect("join");
}

/// Reads the upgrade head as the router's links do: parse what is buffered, read more.
async fn upgrade(stream: &mut TcpStream) -> Option<BytesMut> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match handshake::parse_upgrade(&buf) {
            Ok(Some(up)) => {
                let _ = buf.split_to(up.head_len);
                let accept = handshake::accept_response(&up.key);
                stream.write_all(accept.as_bytes()).await.ok()?;
                return Some(buf);
            }
            Ok(None) => {}
            Err(r) => {
                let resp = handshake::error_response(r.status, r.code, r.message);
                let _ = stream.write_all(resp.as_bytes()).await;
                return None;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve(mut stream: TcpStream) {
    let Some(leftover) = upgrade(&mut stream).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let limits = Limits::default();
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        stream,
        leftover,
        Side::Server,
        limits.max_message_bytes(),
        &limits,
    );
    let end = loop {
        match reader.next().await {
            Ok(Message::Binary(b)) => {
                if out.borrow_mut().send_binary(&[], b).is_err() {
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
        reader.drain(Duration::from_secs(2)).await;
    }
}
