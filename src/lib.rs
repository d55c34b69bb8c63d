//! fedbus: a federation bus. See docs/ARCHITECTURE.md.

pub mod api;
pub mod config;
pub mod control;
pub mod loadgen;
pub mod metrics;
pub mod peer;
pub mod route;
pub mod routing;
pub mod sdk;
pub mod shard;
pub mod task;
pub mod tune;
pub mod ws;

pub use fedbus_auth as auth;
pub use fedbus_proto as proto;
