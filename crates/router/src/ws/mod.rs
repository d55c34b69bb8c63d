//! Websocket for task links, peer links and the client websocket endpoint: handshake,
//! frame codec and a batched, zero-copy connection over glommio streams.

pub mod client;
pub mod conn;
pub mod stream;
pub use fedbus_proto::ws::{frame, handshake};

pub use client::{connect, connect_tls, DialError, TlsDial};
pub use conn::{
    spawn_pinger, start, start_with, write_loop, Message, Refused, Side, WsConn, WsError, WsOut,
    WsReader,
};
pub use stream::{ClientTlsStream, PartsWriter, Socket, Stream, TlsStream};
