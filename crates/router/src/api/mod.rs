//! Client ingress on the api listener: HTTP/1.1 with keep-alive and pipelining, and (with the
//! metrics issue) the multiplexed websocket endpoint. Errors are JSON
//! `{"status":N,"error":"<code>","message":"..."}`.

#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub mod http;
mod inflight;
pub(crate) mod tls;
pub(crate) mod ws;

pub(crate) use fedbus_proto::http::reason;
