//! Client ingress on the api listener: HTTP/1.1 with keep-alive and pipelining, and (with the
//! metrics issue) the multiplexed websocket endpoint. Errors are JSON
//! `{"status":N,"error":"<code>","message":"..."}`.

pub mod http;
pub mod ws;

pub use fedbus_proto::http::{allowed_header, error_body, reason};
