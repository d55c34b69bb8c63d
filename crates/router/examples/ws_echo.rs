//! A websocket echo server on fedbus's own websocket layer, for the Autobahn|Testsuite server
//! cases (`scripts/autobahn`). Not part of the router: it only wires the pieces the router's
//! websocket endpoints use (`ws::handshake::parse_upgrade` and `accept_response`,
//! `ws::start` with its `WsReader` and `WsOut` writer task), with the router's default message
//! limit, and answers the way `/api/ws` does: pongs for pings, close 1000 for a close, and the
//! reader's own close code (1002, 1007, 1009) for a protocol error. Text and binary messages
//! are sent back as they came.
//!
//! `cargo run -p fedbus-router --example ws_echo -- 127.0.0.1:9002`

#[path = "common/echo.rs"]
mod echo;

use bytes::BytesMut;
use fedbus_router::ws::{handshake, Side};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::LocalExecutorBuilder;

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
    echo::echo_session(stream, leftover, Side::Server).await;
}
