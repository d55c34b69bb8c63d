//! Building a routing snapshot from the configured apps and the live registrations. Runs on the
//! control thread only; it allocates freely so that lookups never have to.

use super::{
    elect_emergency, AppRoutes, AppSpec, FastMap, Registration, RoleRoutes, RoutingTable, MAIN_ROLE,
};

/// Builds the snapshot numbered `generation`.
///
/// - Every app of `apps` appears, even with no live task (404 unknown app vs 503 no live task).
///   Should a name repeat, the last spec wins; config validation rejects that earlier.
/// - Registrations for apps not in `apps`, and partitions `>= partitions`, are ignored.
/// - Role `main` is always present; another role appears once a task serves one of its
///   partitions.
/// - Each role's emergency partition is the configured one while it is live in that role, else
///   [`elect_emergency`] with `election_seed` among the role's live partitions.
///
/// The result depends on the set of registrations, not on their order.
pub fn build(
    apps: &[AppSpec],
    regs: &[Registration],
    generation: u64,
    election_seed: u64,
) -> RoutingTable {
    build_after(None, apps, regs, generation, election_seed)
}

/// [`build`], keeping each role's emergency partition of `previous` while it is still live
/// (and no configured one is live): partitions that come back never move it, only its own
/// death does. This is what the control thread publishes.
pub fn build_after(
    previous: Option<&RoutingTable>,
    apps: &[AppSpec],
    regs: &[Registration],
    generation: u64,
    election_seed: u64,
) -> RoutingTable {
    let mut table: FastMap<String, AppRoutes> = apps
        .iter()
        .map(|spec| {
            let mut roles = FastMap::default();
            roles.insert(MAIN_ROLE.to_owned(), RoleRoutes::empty(spec.partitions));
            let routes = AppRoutes {
                partitions: spec.partitions,
                roles,
                emergency_partition: spec.emergency_partition.filter(|&e| e < spec.partitions),
            };
            (spec.name.clone(), routes)
        })
        .collect();

    for reg in regs {
        let Some(app) = table.get_mut(reg.app.as_str()) else {
            continue;
        };
        let partitions = app.partitions;
        for &p in reg.partitions.iter().filter(|&&p| p < partitions) {
            // get_mut first: the role name is cloned only the first time it is seen.
            let role = match app.roles.get_mut(reg.role.as_str()) {
                Some(role) => role,
                None => app
                    .roles
                    .entry(reg.role.clone())
                    .or_insert_with(|| RoleRoutes::empty(partitions)),
            };
            role.add(p, reg.task);
        }
    }

    for (name, app) in &mut table {
        for (role_name, role) in &mut app.roles {
            role.normalize();
            let kept = previous
                .and_then(|t| t.apps.get(name))
                .and_then(|a| a.roles.get(role_name))
                .and_then(|r| r.emergency)
                .filter(|&e| role.is_live(e));
            role.emergency = match (app.emergency_partition, kept) {
                (Some(e), _) if role.is_live(e) => Some(e),
                (_, Some(e)) => Some(e),
                _ => elect_emergency(name, role_name, election_seed, role.live_partitions()),
            };
        }
    }

    RoutingTable {
        generation,
        apps: table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_coming_back_do_not_move_the_emergency_partition() {
        let specs = [spec("o/a", 16, None)];
        let live = |ps: &[u32]| -> Vec<Registration> {
            ps.iter()
                .map(|&p| reg(u64::from(p) + 1, "o/a", "main", &[p]))
                .collect()
        };
        let emergency = |t: &RoutingTable| t.apps["o/a"].roles["main"].emergency;
        // The partition the election ranks first among all 16, and one ranked below it.
        let all: Vec<u32> = (0..16).collect();
        let best = elect_emergency("o/a", "main", 0, all.iter().copied()).unwrap();
        let other = all.iter().copied().find(|&p| p != best).unwrap();
        let rest: Vec<u32> = all.iter().copied().filter(|&p| p != best).collect();
        let first = elect_emergency("o/a", "main", 0, rest.iter().copied()).unwrap();
        // Start without `best`: the election picks `first`.
        let t1 = build_after(None, &specs, &live(&rest), 1, 0);
        assert_eq!(emergency(&t1), Some(first));
        // `best` comes back: a fresh election would move to it; the kept one stays.
        let t2 = build_after(Some(&t1), &specs, &live(&all), 2, 0);
        assert_eq!(
            build(&specs, &live(&all), 2, 0).apps["o/a"].roles["main"].emergency,
            Some(best)
        );
        assert_eq!(emergency(&t2), Some(first), "moved while alive");
        // `first` dies: a new election among the live ones.
        let without_first: Vec<u32> = all.iter().copied().filter(|&p| p != first).collect();
        let t3 = build_after(Some(&t2), &specs, &live(&without_first), 3, 0);
        assert_eq!(emergency(&t3), Some(best));
        // A configured emergency partition wins whenever it is live.
        let cfg = [spec("o/a", 16, Some(other))];
        let t4 = build_after(Some(&t3), &cfg, &live(&all), 4, 0);
        assert_eq!(emergency(&t4), Some(other));
    }
    use crate::route::test_util::{reg, spec};
    use crate::route::{Lookup, TaskId};

    #[test]
    fn several_tasks_roles_partitions() {
        let t = build(
            &[spec("o/a", 4, None), spec("o/b", 2, None)],
            &[
                reg(3, "o/a", "main", &[0, 1]),
                reg(1, "o/a", "main", &[1, 2]),
                reg(3, "o/a", "main", &[1]), // same task on another link
                reg(5, "o/a", "cmd", &[3]),
                reg(6, "o/b", "main", &[0, 1]),
            ],
            9,
            0,
        );
        assert_eq!(t.generation, 9);
        assert_eq!(t.apps.len(), 2);
        let a = &t.apps["o/a"];
        assert_eq!(a.partitions, 4);
        assert_eq!(a.roles.len(), 2);
        let main = &a.roles["main"];
        assert_eq!(main.tasks(0), &[3]);
        assert_eq!(main.tasks(1), &[1, 3]);
        assert_eq!(main.tasks(2), &[1]);
        assert!(main.tasks(3).is_empty());
        assert_eq!(a.roles["cmd"].tasks(3), &[5]);
        assert_eq!(a.roles["cmd"].emergency, Some(3));
        assert_eq!(t.apps["o/b"].roles["main"].tasks(1), &[6]);
    }

    #[test]
    fn every_app_and_main_present() {
        let t = build(&[spec("o/idle", 3, Some(1))], &[], 1, 0);
        let idle = &t.apps["o/idle"];
        assert_eq!(idle.roles.len(), 1);
        assert_eq!(idle.roles["main"].emergency, None);
        assert_eq!(idle.roles["main"].live_partitions().count(), 0);
        assert_eq!(
            t.lookup("o/idle", "main", 2),
            Lookup::NoLiveTask { partition: 2 }
        );
    }

    #[test]
    fn unknown_apps_and_out_of_range_partitions_ignored() {
        let t = build(
            &[spec("o/a", 2, None)],
            &[
                reg(1, "o/zzz", "main", &[0]),
                reg(2, "o/a", "main", &[0, 2, 99]),
                reg(3, "o/a", "cmd", &[5]), // nothing in range: no role
            ],
            1,
            0,
        );
        assert_eq!(t.apps.len(), 1);
        let main = &t.apps["o/a"].roles["main"];
        assert_eq!(main.live_partitions().collect::<Vec<_>>(), vec![0]);
        assert_eq!(main.tasks(2), &[] as &[TaskId]);
        assert!(!t.apps["o/a"].roles.contains_key("cmd"));
        assert_eq!(t.lookup("o/a", "cmd", 0), Lookup::UnknownRole);
    }

    #[test]
    fn configured_emergency_preferred_over_elected() {
        let apps = [spec("o/a", 8, Some(5))];
        let live_all: Vec<u32> = (0..8).collect();
        let elected = elect_emergency("o/a", "main", 0, live_all.iter().copied());
        // Pick a configured partition that the election would not pick, so the test can fail.
        let configured = if elected == Some(5) { 6 } else { 5 };
        let apps = [AppSpec {
            emergency_partition: Some(configured),
            ..apps[0].clone()
        }];
        let t = build(&apps, &[reg(1, "o/a", "main", &live_all)], 1, 0);
        assert_eq!(t.apps["o/a"].roles["main"].emergency, Some(configured));
        assert_eq!(
            t.lookup("o/a", "main", 1),
            Lookup::Served {
                partition: 1,
                tasks: &[1],
                emergency_for: None
            }
        );

        // Partition 1 dies: served by the configured emergency partition.
        let live: Vec<u32> = live_all.iter().copied().filter(|&p| p != 1).collect();
        let t = build(&apps, &[reg(1, "o/a", "main", &live)], 2, 0);
        assert_eq!(
            t.lookup("o/a", "main", 1),
            Lookup::Served {
                partition: configured,
                tasks: &[1],
                emergency_for: Some(1)
            }
        );
    }

    #[test]
    fn configured_emergency_not_live_falls_back_to_election() {
        let apps = [spec("o/a", 8, Some(7))];
        let live = [0u32, 2, 4];
        let t = build(&apps, &[reg(1, "o/a", "main", &live)], 1, 11);
        let expected = elect_emergency("o/a", "main", 11, live.iter().copied());
        assert_eq!(t.apps["o/a"].roles["main"].emergency, expected);
        assert!(expected.is_some_and(|e| live.contains(&e)));

        // Configured partition out of range: ignored, election used.
        let t = build(
            &[spec("o/a", 8, Some(8))],
            &[reg(1, "o/a", "main", &live)],
            1,
            11,
        );
        assert_eq!(t.apps["o/a"].emergency_partition, None);
        assert_eq!(t.apps["o/a"].roles["main"].emergency, expected);
    }

    #[test]
    fn emergency_is_per_role() {
        // The configured partition is live in `main` but not in `cmd`.
        let t = build(
            &[spec("o/a", 4, Some(0))],
            &[
                reg(1, "o/a", "main", &[0, 1]),
                reg(2, "o/a", "cmd", &[2, 3]),
            ],
            1,
            0,
        );
        assert_eq!(t.apps["o/a"].roles["main"].emergency, Some(0));
        let cmd = t.apps["o/a"].roles["cmd"].emergency;
        assert!(cmd == Some(2) || cmd == Some(3), "{cmd:?}");
    }

    #[test]
    fn two_routers_build_the_same_table() {
        let apps = [spec("o/a", 16, None), spec("o/b", 5, Some(4))];
        let mut regs = vec![
            reg(100, "o/a", "main", &[0, 3, 7, 11]),
            reg(101, "o/a", "main", &[3, 12, 15]),
            reg(102, "o/a", "cmd", &[1, 2]),
            reg(103, "o/b", "main", &[0, 1]),
            reg(104, "o/b", "main", &[1, 2, 3]),
        ];
        let one = build(&apps, &regs, 4, 77);
        regs.reverse();
        for r in &mut regs {
            r.partitions.reverse();
        }
        let other = build(&apps, &regs, 4, 77);
        assert_eq!(one, other);
        assert!(one.apps["o/a"].roles["main"].emergency.is_some());
        assert!(one.apps["o/b"].roles["main"].emergency.is_some());
    }

    #[test]
    fn elected_emergency_moves_only_when_it_dies() {
        let apps = [spec("o/a", 16, None)];
        let all: Vec<u32> = (0..16).collect();
        let t = build(&apps, &[reg(1, "o/a", "main", &all)], 1, 5);
        let e = t.apps["o/a"].roles["main"].emergency.unwrap_or(u32::MAX);
        assert!(e < 16);

        // Another partition dies: the emergency stays.
        let other = (e + 1) % 16;
        let live: Vec<u32> = all.iter().copied().filter(|&p| p != other).collect();
        let t = build(&apps, &[reg(1, "o/a", "main", &live)], 2, 5);
        assert_eq!(t.apps["o/a"].roles["main"].emergency, Some(e));

        // The emergency itself dies: another live partition takes over.
        let live: Vec<u32> = all.iter().copied().filter(|&p| p != e).collect();
        let t = build(&apps, &[reg(1, "o/a", "main", &live)], 3, 5);
        let next = t.apps["o/a"].roles["main"].emergency;
        assert!(next.is_some_and(|n| n != e && n < 16));
        assert_eq!(
            t.lookup("o/a", "main", e),
            Lookup::Served {
                partition: next.unwrap_or(u32::MAX),
                tasks: &[1],
                emergency_for: Some(e)
            }
        );
    }
}
