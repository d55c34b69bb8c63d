//! A websocket echo client on fedbus's own websocket layer, for the Autobahn|Testsuite client
//! cases (`scripts/autobahn` runs kosoku's fuzzing server against it). Not part of the router:
//! it dials as the router's peer dialers do (`ws::connect`, the client handshake), then runs
//! `ws::start` on the client side (frames masked with fresh random keys, the shared reader
//! and its checks) with the router's default limits, and answers as the server side does:
//! pongs for pings, close 1000 for a close, the reader's own close code (1002, 1007, 1009)
//! for a protocol error; text and binary messages are sent back as they came.
//!
//! The fuzzing server's protocol: `/getCaseCount` sends the number of cases as a text
//! message, `/runCase?case=N&agent=A` runs case N (1-based), `/updateReports?agent=A` ends
//! the run.
//!
//! `cargo run -p fedbus-router --example ws_echo_client -- 127.0.0.1:9001`

#[path = "common/echo.rs"]
mod echo;

use fedbus_router::config::Limits;
use fedbus_router::ws::{self, frame::opcode, Message, Side};
use glommio::LocalExecutorBuilder;

/// The name the report lists this client under.
const AGENT: &str = "fedbus";

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_string());
    LocalExecutorBuilder::default()
        .spawn(move || async move {
            let n = case_count(&addr).await;
            println!("ws_echo_client: {n} cases from {addr}");
            for case in 1..=n {
                echo(&addr, &format!("/runCase?case={case}&agent={AGENT}")).await;
            }
            echo(&addr, &format!("/updateReports?agent={AGENT}")).await;
        })
        .expect("executor")
        .join()
        .expect("join");
}

/// Opens `path` and returns the first text message (the case count), then closes.
async fn case_count(addr: &str) -> usize {
    let (stream, leftover) = ws::connect(addr, "/getCaseCount", None)
        .await
        .unwrap_or_else(|e| panic!("getCaseCount: {e}"));
    let limits = Limits::default();
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        stream,
        leftover,
        Side::Client,
        limits.max_message_bytes(),
        &limits,
    );
    let n = loop {
        match reader.next().await {
            Ok(Message::Text(t)) => {
                break std::str::from_utf8(&t)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or_else(|| panic!("case count {t:?}"))
            }
            Ok(Message::Ping(p)) => out.borrow_mut().send_control(opcode::PONG, &p),
            Ok(_) => {}
            Err(e) => panic!("getCaseCount: {e}"),
        }
    };
    out.borrow_mut().close(1000);
    let _ = writer.await;
    n
}

/// Runs one session on `path`: echoes every message until the server closes or the reader
/// fails the connection.
async fn echo(addr: &str, path: &str) {
    let (stream, leftover) = match ws::connect(addr, path, None).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ws_echo_client: {path}: {e}");
            return;
        }
    };
    echo::echo_session(stream, leftover, Side::Client).await;
}
