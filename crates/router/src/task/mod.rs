//! Task links on the internal listener (seed: Internal Address): the upgrade with its service
//! token, the hello and registration, and the pending table of each link.

pub(crate) use fedbus_proto::hello;
pub(crate) mod link;
