//! The routing snapshot and its lookup. Lookups run on every request on every shard: they take
//! `&str` keys and hand back slices of the snapshot, never an owned value.

use super::{FastMap, TaskId, MAIN_ROLE};

/// One immutable routing snapshot. Replaced as a whole, never edited in place after publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    /// Moves forward with every published snapshot, so a shard can drop caches keyed on it.
    pub generation: u64,
    /// Every configured app, keyed by `owner/app`, including apps with no live task.
    pub apps: FastMap<String, AppRoutes>,
}

/// Routes of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRoutes {
    /// Number of partitions of the app.
    pub partitions: u32,
    /// Roles with at least one live task, plus `main` always.
    pub roles: FastMap<String, RoleRoutes>,
    /// The configured emergency partition (already checked to be `< partitions`), if any.
    /// Each role's effective choice is in [`RoleRoutes::emergency`].
    pub emergency_partition: Option<u32>,
}

/// Routes of one role of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRoutes {
    /// Index = partition; each list sorted and without duplicates. A Vec, not a map: the
    /// lookup is one bounds check and partitions are dense.
    tasks: Vec<Vec<TaskId>>,
    /// Partition that serves partitions with no live task: the configured one when it is live
    /// in this role, else the elected one; `None` when no partition of this role is live.
    pub emergency: Option<u32>,
}

/// Result of [`RoutingTable::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Send to one of `tasks` (never empty) of `partition`. `emergency_for` is the partition
    /// that was asked for when `partition` is the emergency partition standing in for it.
    Served {
        /// The partition that serves.
        partition: u32,
        /// Its live tasks in the role.
        tasks: &'a [TaskId],
        /// The partition asked for, when an emergency partition stands in.
        emergency_for: Option<u32>,
    },
    /// No such app in the configuration (404).
    UnknownApp,
    /// No live task was ever registered in this role, and it is not `main` (404).
    UnknownRole,
    /// The role exists but nothing of it is live, not even an emergency partition (503; a
    /// retry later may succeed). Also returned for `partition >= partitions`, which
    /// `routing::local` never asks (a Redirect there is refused 502 `bad_redirect` first).
    NoLiveTask {
        /// The partition asked for.
        partition: u32,
    },
}

impl RoleRoutes {
    pub(crate) fn empty(partitions: u32) -> Self {
        Self {
            tasks: vec![Vec::new(); partitions as usize],
            emergency: None,
        }
    }

    pub(crate) fn add(&mut self, partition: u32, task: TaskId) {
        if let Some(list) = self.tasks.get_mut(partition as usize) {
            list.push(task);
        }
    }

    /// Sorts and dedups each partition's list (a task may be registered on several links).
    pub(crate) fn normalize(&mut self) {
        for list in &mut self.tasks {
            list.sort_unstable();
            list.dedup();
        }
    }

    /// Live tasks of `partition`; empty when none or out of range.
    pub fn tasks(&self, partition: u32) -> &[TaskId] {
        self.tasks
            .get(partition as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Partitions with at least one live task, ascending.
    pub fn live_partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, list)| !list.is_empty())
            // Index < partitions, which is a u32.
            .map(|(p, _)| p as u32)
    }

    /// True when `partition` has a live task in this role.
    pub fn is_live(&self, partition: u32) -> bool {
        !self.tasks(partition).is_empty()
    }
}

impl RoutingTable {
    /// Where a request for `partition` of `role` of `app` goes. The same rule serves `main` and
    /// every role reached by Redirect (same partition): the partition itself if it has a live
    /// task, else the role's emergency partition.
    pub fn lookup(&self, app: &str, role: &str, partition: u32) -> Lookup<'_> {
        let Some(app) = self.apps.get(app) else {
            return Lookup::UnknownApp;
        };
        let Some(routes) = app.roles.get(role) else {
            // A built table always holds `main`; a hand-made one may not.
            return if role == MAIN_ROLE {
                Lookup::NoLiveTask { partition }
            } else {
                Lookup::UnknownRole
            };
        };
        if partition >= app.partitions {
            // Not from `partition_of`: a caller bug, answered as unavailable, not rerouted.
            return Lookup::NoLiveTask { partition };
        }
        let tasks = routes.tasks(partition);
        if !tasks.is_empty() {
            return Lookup::Served {
                partition,
                tasks,
                emergency_for: None,
            };
        }
        if let Some(e) = routes.emergency {
            let tasks = routes.tasks(e);
            if !tasks.is_empty() {
                return Lookup::Served {
                    partition: e,
                    tasks,
                    emergency_for: Some(partition),
                };
            }
        }
        Lookup::NoLiveTask { partition }
    }

    /// Task instances this table routes to (each counted once, whatever its apps, roles and
    /// partitions): the registrations with a live, not ejected link when it was built. Read by
    /// the admin endpoint (`fedbus_routing_tasks`), not on the request path.
    pub fn task_count(&self) -> usize {
        let mut ids: Vec<TaskId> = self
            .apps
            .values()
            .flat_map(|a| a.roles.values())
            .flat_map(|r| r.tasks.iter().flatten().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// `wsid % partitions`; `None` for an unknown app or one with zero partitions.
    pub fn partition_of(&self, app: &str, wsid: u64) -> Option<u32> {
        let app = self.apps.get(app)?;
        if app.partitions == 0 {
            return None;
        }
        // The remainder is < partitions, a u32.
        Some((wsid % u64::from(app.partitions)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::build;
    use crate::route::test_util::{reg, spec};

    fn table() -> RoutingTable {
        build(
            &[spec("o/a", 4, None), spec("o/empty", 2, None)],
            &[
                reg(10, "o/a", "main", &[0, 1]),
                reg(11, "o/a", "main", &[1]),
                reg(20, "o/a", "cmd", &[2]),
            ],
            7,
            1,
        )
    }

    /// Each task once, over its partitions and roles; apps with no task add none.
    #[test]
    fn task_count_counts_each_task_once() {
        assert_eq!(table().task_count(), 3);
        assert_eq!(build(&[spec("o/a", 4, None)], &[], 1, 1).task_count(), 0);
    }

    #[test]
    fn lookup_hits_live_partition() {
        let t = table();
        assert_eq!(
            t.lookup("o/a", "main", 1),
            Lookup::Served {
                partition: 1,
                tasks: &[10, 11],
                emergency_for: None
            }
        );
        assert_eq!(
            t.lookup("o/a", "cmd", 2),
            Lookup::Served {
                partition: 2,
                tasks: &[20],
                emergency_for: None
            }
        );
    }

    #[test]
    fn lookup_dead_partition_served_by_emergency() {
        let t = table();
        let e = t.apps["o/a"].roles["main"].emergency.expect("main is live");
        assert!(e == 0 || e == 1);
        match t.lookup("o/a", "main", 3) {
            Lookup::Served {
                partition,
                tasks,
                emergency_for,
            } => {
                assert_eq!(partition, e);
                assert_eq!(emergency_for, Some(3));
                assert_eq!(tasks, t.apps["o/a"].roles["main"].tasks(e));
            }
            other => panic!("expected emergency, got {other:?}"),
        }
        // A redirect to `cmd` with the same partition: only partition 2 is live there.
        assert_eq!(
            t.lookup("o/a", "cmd", 0),
            Lookup::Served {
                partition: 2,
                tasks: &[20],
                emergency_for: Some(0)
            }
        );
    }

    #[test]
    fn lookup_unknown_app_and_role() {
        let t = table();
        assert_eq!(t.lookup("o/nope", "main", 0), Lookup::UnknownApp);
        assert_eq!(t.lookup("o/a", "query", 0), Lookup::UnknownRole);
        assert_eq!(
            RoutingTable::default().lookup("o/a", "main", 0),
            Lookup::UnknownApp
        );
    }

    #[test]
    fn lookup_no_live_task() {
        let t = table();
        assert_eq!(
            t.lookup("o/empty", "main", 1),
            Lookup::NoLiveTask { partition: 1 }
        );
        // Out of range is not rerouted to the emergency partition.
        assert_eq!(
            t.lookup("o/a", "main", 4),
            Lookup::NoLiveTask { partition: 4 }
        );
    }

    #[test]
    fn partition_of_is_wsid_mod_partitions() {
        let t = table();
        assert_eq!(t.partition_of("o/a", 0), Some(0));
        assert_eq!(t.partition_of("o/a", 13), Some(1));
        assert_eq!(t.partition_of("o/a", u64::MAX), Some(3));
        assert_eq!(t.partition_of("o/nope", 1), None);
        let zero = build(&[spec("o/z", 0, None)], &[], 1, 1);
        assert_eq!(zero.partition_of("o/z", 5), None);
        assert_eq!(
            zero.lookup("o/z", "main", 0),
            Lookup::NoLiveTask { partition: 0 }
        );
    }

    #[test]
    fn role_routes_accessors() {
        let t = table();
        let main = &t.apps["o/a"].roles["main"];
        assert_eq!(main.live_partitions().collect::<Vec<_>>(), vec![0, 1]);
        assert!(main.is_live(0));
        assert!(!main.is_live(2));
        assert!(main.tasks(99).is_empty());
    }
}
