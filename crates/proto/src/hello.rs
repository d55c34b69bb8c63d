//! The text messages of the link handshake (JSON), shared by the router and the SDK.

use serde::{Deserialize, Serialize};

/// Router -> task, first message on a link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
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
}

/// Task -> router, answer to the hello.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Register {
    #[serde(rename = "type")]
    pub kind: String,
    /// Task instance id, the same on every link of the task.
    pub task: u64,
    pub app: String,
    pub role: String,
    pub partitions: Vec<u32>,
}

/// Router -> task after a good registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registered {
    #[serde(rename = "type")]
    pub kind: String,
    pub shard: usize,
}
