//! fedbus: a federation bus. See docs/ARCHITECTURE.md.

pub mod auth;
