//! The text messages of the link handshake (JSON), shared by the router and the SDK.

use serde::{Deserialize, Serialize};

/// Router -> task, first message on a link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// JSON `type`: `"hello"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `region/cluster/router`.
    pub router: String,
    /// `region/cluster`.
    pub cluster: String,
    /// This link's shard.
    pub shard: usize,
    /// Number of shards of the router.
    pub shards: usize,
    /// Internal address of every shard, index = shard.
    pub internal: Vec<String>,
    /// Unix socket path of every shard's task-link listener, index = shard, when the router
    /// has one (`listen.internal_unix`): a task that reached the router over a unix socket
    /// links to the other shards the same way. Absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub internal_unix: Vec<String>,
    /// The largest message the router takes from the task, in bytes (`limits.max_body_bytes +
    /// 64 KiB`): a larger answer closes the link with 1009, failing every request on it, so a
    /// task answers such a request with an error instead. Absent from an older router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message: Option<u64>,
}

/// The prefix of a router address that names a unix socket (`unix:/run/fedbus/link.sock`, a
/// router's `listen.internal_unix`) instead of `host:port`.
pub const UNIX_PREFIX: &str = "unix:";

impl Hello {
    /// The address of every shard to dial, index = shard: the unix socket paths (as
    /// `unix:<path>`) when this link was dialed over one and the router lists them, else the
    /// TCP addresses.
    pub fn shard_addrs(&self, over_unix: bool) -> Vec<String> {
        if over_unix && !self.internal_unix.is_empty() {
            self.internal_unix
                .iter()
                .map(|p| format!("{UNIX_PREFIX}{p}"))
                .collect()
        } else {
            self.internal.clone()
        }
    }
}

/// The largest hello a task accepts from a router: a router name, a cluster id and one
/// `host:port` per shard fit many times over (a router of 1024 shards with 60-byte addresses
/// sends ~64 KiB).
pub const MAX_HELLO_BYTES: usize = 256 * 1024;

/// Task -> router, answer to the hello.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Register {
    /// JSON `type`: `"register"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Task instance id, the same on every link of the task.
    pub task: u64,
    /// `owner/app`; must match the service token's app.
    pub app: String,
    /// Role served, 1 to 64 bytes; `main` receives every request first, other roles only
    /// redirects.
    pub role: String,
    /// Partitions this task serves on the link.
    pub partitions: Vec<u32>,
}

/// Router -> task after a good registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registered {
    /// JSON `type`: `"registered"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The shard that accepted the registration.
    pub shard: usize,
}
