//! The fedbus router: thread-per-core glommio shards between clients and service tasks. See
//! docs/ARCHITECTURE.md for the module map.
//!
//! Layers, top to bottom (a module uses only its own layer and those below it):
//! ingress ([`api`], the serving side of [`peer`]) -> [`routing`] -> links ([`task::link`],
//! peer dialers, pending tables) -> io ([`ws`]) -> `fedbus-proto`. [`shard`] starts a router
//! and holds the per-shard state; [`control`] is the control thread; [`route`] is the pure
//! routing snapshot.

#![warn(unreachable_pub)]
#![deny(missing_docs)]

/// Client ingress. Public only with the `bench` feature (benches/micro.rs and
/// tests/alloc_count.rs time and count `api::http::parse_one`).
#[cfg(feature = "bench")]
pub mod api;
#[cfg(not(feature = "bench"))]
pub(crate) mod api;
pub mod config;
pub mod control;
/// Test-only fault injection (`fault-injection` feature; never in a normal build).
#[cfg(feature = "fault-injection")]
pub(crate) mod fault;
pub mod health;
pub(crate) mod metrics;
pub(crate) mod peer;
pub mod route;
pub(crate) mod routing;
pub mod shard;
pub(crate) mod task;
pub mod tls;
pub mod tune;
pub mod util;
pub mod ws;

pub use fedbus_auth as auth;
pub use fedbus_proto as proto;
