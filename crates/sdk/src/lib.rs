//! Write fedbus service tasks on tokio.
//!
//! A task serves one app in one role for a set of partitions. [`serve`] (or [`Task::spawn`])
//! connects to shard 0 of every router given, follows each router's hello to link to every
//! other shard, registers on every link, and hands each request to an async handler; many
//! requests are in flight on each link at once and answers go back in any order. Links that
//! fail are reopened with a capped, jittered backoff; pings are answered; an `auth` task keeps
//! the app secret the routers push ([`Secrets`]) and can sign client JWTs with it. Links are
//! plaintext `ws://`, or `wss://` to routers with `internal_tls` given the CA that issued their
//! certificates ([`TaskOptions::tls_ca`]).
//!
//! ```no_run
//! use fedbus_sdk::{Outcome, Partitions, Request, TaskOptions};
//!
//! async fn echo(req: Request) -> Outcome {
//!     let ct = req.content_type().map(str::to_string);
//!     Outcome::ok(req.into_payload()).with_content_type(ct)
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), fedbus_sdk::Error> {
//!     let token = std::env::var("FEDBUS_TASK_TOKEN").expect("a service token");
//!     let opts = TaskOptions::new(["127.0.0.1:8900"], "demo/echo", "0-15".parse::<Partitions>()?, token);
//!     fedbus_sdk::serve(opts, echo).await
//! }
//! ```
//!
//! The protocol underneath is docs/PROTOCOL.md; the link state machine is
//! [`fedbus_proto::link`], which this crate drives over tokio-tungstenite.

#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod options;
mod outcome;
mod rand;
mod secrets;
mod task;
mod tls;
mod token;

pub use fedbus_proto as proto;
pub use fedbus_proto::link::Request;
pub use fedbus_proto::tag;
pub use options::{Partitions, TaskOptions};
pub use outcome::Outcome;
pub use rand::{random_task_id, random_u64};
pub use secrets::Secrets;
pub use task::{serve, Stats, Task, SERVE_DRAIN};
pub use token::TokenSource;

/// What can go wrong before a task runs, or ends it. Once running, a task gives up only when a
/// router refuses its token for good ([`Error::Refused`]); other failed links are logged and
/// reopened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The options cannot work (no router, empty app or role, no partition, no token).
    Options(String),
    /// A partition list that does not parse (`0-15`, `0-3,8,10-11`).
    Partitions(String),
    /// A router refused the service token (at the upgrade) or the registration (close 1008
    /// with a reason such as `wrong_token`) for [`TaskOptions::refused_exit_after`] (the
    /// router's error code and message), or the token source gave none at start.
    Refused(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Options(m) => write!(f, "bad task options: {m}"),
            Error::Partitions(m) => write!(f, "bad partition list: {m}"),
            Error::Refused(m) => write!(f, "service token refused: {m}"),
        }
    }
}

impl std::error::Error for Error {}
