//! Routing snapshot: which tasks serve which partition of which role of which app.
//!
//! Owns the immutable [`RoutingTable`] (built by [`build`]), its lookup, the election of
//! emergency partitions ([`elect_emergency`]) and the parsing of client request paths
//! ([`parse_api_path`]).
//!
//! Pure data: nothing here does I/O, spawns threads or reads a clock. A table is built only on
//! the control thread, published behind one atomic pointer, and read by shards without locks;
//! [`RoutingTable::lookup`], [`RoutingTable::partition_of`] and [`parse_api_path`] run on every
//! request and allocate nothing.

mod build;
mod elect;
mod path;
mod table;

pub use build::{build, build_after};
pub use elect::elect_emergency;
pub use path::{parse_api_path, ApiPath, PathError};
pub use table::{AppRoutes, Lookup, RoleRoutes, RoutingTable};

/// A task *instance* id: a random u64 the task picks at start and presents on all its links,
/// so one task seen on many shards and routers is one id.
pub type TaskId = u64;

/// The maps looked up on every request (the routing table's apps and roles, a shard's task
/// links, a link's pending requests): foldhash, not SipHash, which was 1.9% of a shard's CPU at
/// 8x8 pipelined (perf, `fedbus bench --connections 8 --inflight 8`). Their keys are chosen by
/// the router (ids it makes) or by its operator and authenticated tasks (app and role names);
/// a client's string is only looked up, never inserted, so it cannot flood a bucket. The seed
/// is random per process all the same.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The role that receives every request first; other roles are reached only by Redirect.
pub const MAIN_ROLE: &str = "main";

/// What the configuration says about one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    /// `owner/app`, as it appears in the request path.
    pub name: String,
    /// Number of partitions; a request goes to partition `wsid % partitions`.
    pub partitions: u32,
    /// Configured emergency partition. Used while it has a live task in the role; otherwise
    /// one is elected among the live partitions.
    pub emergency_partition: Option<u32>,
}

/// One live task's claim: it serves `partitions` of `role` of `app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The task instance.
    pub task: TaskId,
    /// `owner/app`.
    pub app: String,
    /// The role it serves (`main` or a role reached by Redirect).
    pub role: String,
    /// The partitions it serves.
    pub partitions: Vec<u32>,
}

/// Fixtures shared by the routing tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::{AppSpec, Registration, TaskId};

    pub(crate) fn spec(name: &str, partitions: u32, emergency: Option<u32>) -> AppSpec {
        AppSpec {
            name: name.into(),
            partitions,
            emergency_partition: emergency,
        }
    }

    pub(crate) fn reg(task: TaskId, app: &str, role: &str, partitions: &[u32]) -> Registration {
        Registration {
            task,
            app: app.into(),
            role: role.into(),
            partitions: partitions.to_vec(),
        }
    }
}
