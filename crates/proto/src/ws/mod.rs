//! Websocket pieces that need no runtime: the frame header codec and the opening handshake.

pub mod frame;
pub mod handshake;
