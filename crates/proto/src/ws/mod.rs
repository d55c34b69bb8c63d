//! The websocket pieces that need no socket: the frame header codec and the opening handshake.
//! The connection that drives them over glommio streams stays in the router (`fedbus::ws::conn`).

pub mod frame;
pub mod handshake;
