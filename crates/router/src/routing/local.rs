//! Step 3 of routing, local delivery: the seed rules (role `main` first, Redirect up to the
//! hop limit, `partition = wsid % partitions`, emergency partition), the task link of *this*
//! shard, and the wait for the answer. The request is already admitted.

use super::{answer_status, Answer, Ingress, Request};
use crate::metrics::ShardMetrics;
use crate::proto::{self, put_meta, put_meta_u64, tag};
use crate::route::{Lookup, RoleRoutes, MAIN_ROLE};
use crate::shard::Shard;
use crate::task::link::Reply;
use std::rc::Rc;
use std::time::Duration;

/// A sibling (another router of this cluster) to hand the request to, one hop, when this
/// shard has no live link for its partition in `main` and the sibling's last status says it
/// has a live task for it (docs/EMERGENCY.md, the exact rule). Never for a request that a
/// router already handed on (it came over a peer link), so there is at most one hop.
fn sibling_with_partition(
    shard: &Rc<Shard>,
    req: &Request<'_>,
    table: &crate::route::RoutingTable,
    partition: u32,
) -> Option<Rc<crate::task::link::TaskLink>> {
    // This shard dials siblings only when the federation view lists some: checked first,
    // as it is all a router without siblings does here per request.
    if !may_hand_to_sibling(shard, req) {
        return None;
    }
    let tasks = table
        .apps
        .get(req.target.app_name)?
        .roles
        .get(MAIN_ROLE)?
        .tasks(partition);
    if shard.has_live_link(tasks) {
        return None;
    }
    covering_sibling(shard, req, false)
}

/// `503 task_busy`, counted: every task of the partition is at its pending limit.
fn task_busy(shard: &Shard) -> Answer {
    ShardMetrics::inc(&shard.metrics.busy_refused);
    Answer::error(
        503,
        "task_busy",
        "every task of the partition is at its pending limit",
    )
}

/// Whether `req` may go to a sibling: it did not come over a peer link (at most one hop), and
/// this shard dials siblings (the federation view lists some).
fn may_hand_to_sibling(shard: &Shard, req: &Request<'_>) -> bool {
    req.ingress != Ingress::Peer
        && shard
            .peers
            .borrow()
            .clusters
            .contains_key(&shard.federation.own)
}

/// [`Peers::covering`](crate::peer::Peers::covering) for `req`.
fn covering_sibling(
    shard: &Shard,
    req: &Request<'_>,
    ejected: bool,
) -> Option<Rc<crate::task::link::TaskLink>> {
    shard.peers.borrow().covering(
        &shard.federation.own,
        req.target.app_name,
        req.target.wsid,
        shard.cfg.limits.max_pending_per_link,
        ejected,
    )
}

/// Delivers an admitted request for this cluster from `subject` and waits for its answer.
pub(crate) async fn deliver(shard: &Rc<Shard>, req: &Request<'_>, subject: &str) -> Answer {
    let t = &req.target;
    // The shard's copy of the table (no atomic refcount traffic), let go before any await so
    // that a wait sees the tables published meanwhile; the first one also serves the first hop.
    let mut first = Some(shard.snapshots.routes.load());
    let Some(partition) = first
        .as_ref()
        .and_then(|table| table.partition_of(t.app_name, t.wsid))
    else {
        return Answer::error(404, "unknown_app", format!("no app {}", t.app_name));
    };
    if let Some(link) = first
        .as_ref()
        .and_then(|table| sibling_with_partition(shard, req, table, partition))
    {
        // The table is not held across the await.
        first = None;
        ShardMetrics::inc(&shard.metrics.sibling_handoffs);
        let a = super::forward::send(shard, req, &link).await;
        if !super::forward::never_delivered(&a) {
            return a;
        }
    }
    let max_hops = shard.cfg.routing.max_hops;
    let deadline = req.received + Duration::from_millis(shard.cfg.limits.request_timeout_ms);
    let mut role: std::borrow::Cow<'_, str> = MAIN_ROLE.into();
    let mut want = partition;
    let mut hops: u8 = 0;
    // Whether this request waited for a task to link (counted once).
    let mut waited = false;
    loop {
        let table = first
            .take()
            .unwrap_or_else(|| shard.snapshots.routes.load());
        let (served, tasks, emergency_for) = match table.lookup(t.app_name, &role, want) {
            Lookup::Served {
                partition,
                tasks,
                emergency_for,
            } => (partition, Some(tasks), emergency_for),
            Lookup::UnknownApp => {
                return Answer::error(404, "unknown_app", format!("no app {}", t.app_name))
            }
            Lookup::UnknownRole | Lookup::NoLiveTask { .. } => (want, None, None),
        };
        // The snapshot may lag behind this shard's own view of its links by a moment; fall
        // back to the role's emergency partition when no local link serves the partition.
        let picked = match tasks.map(|tasks| shard.pick_link(t.app_name, &role, tasks)) {
            None => None,
            Some(Ok(l)) => Some((l, served, emergency_for)),
            Some(Err(true)) => {
                return task_busy(shard);
            }
            Some(Err(false)) => {
                // No live link here for this partition, and the published snapshot may not
                // know yet (the control thread publishes a moment later): elect on the shard
                // among the partitions that have a live link here. The same pure election the
                // control thread runs, so the choice matches what it will publish.
                let local = table.apps.get(t.app_name).and_then(|a| {
                    let r = a.roles.get(role.as_ref())?;
                    let e = emergency_fallback(
                        t.app_name,
                        &role,
                        shard.cfg.routing.election_seed,
                        // The published choice (kept while it lives), else the configured one.
                        r.emergency.or(a.emergency_partition),
                        want,
                        r,
                        |p| shard.has_live_link(r.tasks(p)),
                    )?;
                    Some((shard.pick_link(t.app_name, &role, r.tasks(e)), e))
                });
                match local {
                    Some((Ok(l), e)) => Some((l, e, Some(want))),
                    // Every task of the emergency partition is at its pending limit: busy, as
                    // for a published one, not "no live task".
                    Some((Err(true), _)) => {
                        return task_busy(shard);
                    }
                    _ => None,
                }
            }
        };
        let Some((link, served, emergency_for)) = picked else {
            drop(table);
            if may_wait_for_task(shard, deadline, &mut waited) {
                // Boxed: this rare wait stays out of every request's future (its size is
                // copied into the in-flight slot; `api::http::tests::answer_state_stays_small`).
                Box::pin(wait_for_task(shard)).await;
                continue;
            }
            // No task here serves the app's `main` role at all (not even an emergency
            // partition): a sibling whose link is ejected for its timeouts but whose status
            // covers the partition is the last resort, as Envoy routes to ejected hosts once
            // none is left. Not past the request's deadline (a takeover wait may have used
            // it up) nor in a drain (which answers waiters 503 at once). Boxed, as the wait
            // above.
            let last_resort = hops == 0
                && std::time::Instant::now() < deadline
                && !shard.health.draining()
                && may_hand_to_sibling(shard, req);
            if let Some(link) = last_resort
                .then(|| covering_sibling(shard, req, true))
                .flatten()
            {
                ShardMetrics::inc(&shard.metrics.sibling_handoffs);
                let a = Box::pin(super::forward::send(shard, req, &link)).await;
                if !super::forward::never_delivered(&a) {
                    return a;
                }
            }
            return no_live_task(t.app_name, &role, want, hops);
        };
        let id = shard.request_id();
        let rx = {
            let mut scratch = shard.scratch.borrow_mut();
            proto::begin_head(&mut scratch);
            put_meta(&mut scratch, tag::APP, t.app_name.as_bytes());
            put_meta(&mut scratch, tag::ROLE, role.as_bytes());
            put_meta(&mut scratch, tag::SERVICE, t.service.as_bytes());
            put_meta(&mut scratch, tag::MODULE, t.module.as_bytes());
            put_meta(&mut scratch, tag::FUNCTION, t.function.as_bytes());
            put_meta_u64(&mut scratch, tag::WSID, t.wsid);
            put_meta(&mut scratch, tag::METHOD, req.method.as_bytes());
            put_meta(&mut scratch, tag::SUBJECT, subject.as_bytes());
            if let Some(ct) = req.content_type {
                put_meta(&mut scratch, tag::CONTENT_TYPE, ct);
            }
            let mut flags = 0;
            if req.ingress == Ingress::Peer {
                flags |= proto::flags::FORWARDED;
            }
            if emergency_for.is_some() {
                flags |= proto::flags::EMERGENCY;
            }
            proto::finish_head(
                &mut scratch,
                proto::Kind::Request,
                flags,
                hops,
                served,
                id,
                req.payload.len(),
            );
            match link.send_request(id, &scratch, &req.payload, deadline) {
                Ok(wait) => wait,
                Err(_) => {
                    ShardMetrics::inc(&shard.metrics.busy_refused);
                    return Answer::error(503, "task_busy", "task link is over its queue limit")
                        .in_emergency(emergency_for);
                }
            }
        };
        drop(table);
        let reply = {
            // Counted while waiting, also when the client goes away and this future is dropped.
            let _pending = PendingGauge::new(&shard.metrics);
            rx.await
        };
        if emergency_for.is_some() {
            ShardMetrics::inc(&shard.metrics.emergency);
        }
        let answer = match reply {
            Reply::Response(f) => {
                match answer_status(&f, 200) {
                    Some(status) => Answer::Task {
                        status,
                        frame: f,
                        partition: served,
                        emergency_for,
                        hops,
                    },
                    None => Answer::error_at(
                        502,
                        "bad_task_status",
                        "the task answered a status outside 200..599 (a 1xx cannot end a request; HTTP has none above 599)",
                        Some(served),
                        hops,
                    ),
                }
            }
            Reply::Redirect {
                role: r,
                partition: p,
            } => {
                ShardMetrics::inc(&shard.metrics.redirects);
                if hops >= max_hops {
                    return Answer::error_at(
                        508,
                        "redirect_limit",
                        format!("more than {max_hops} redirects"),
                        Some(served),
                        hops + 1,
                    )
                    .in_emergency(emergency_for);
                }
                let partitions = shard
                    .snapshots
                    .routes
                    .load()
                    .apps
                    .get(t.app_name)
                    .map_or(0, |a| a.partitions);
                let bad = if r.is_empty() {
                    Some("task redirected to an empty role".to_string())
                } else {
                    match p {
                        Err(()) => {
                            Some("task redirected to a PARTITION that is not a number".into())
                        }
                        Ok(Some(p)) if p >= partitions => Some(format!(
                            "task redirected to partition {p} of an app with {partitions}"
                        )),
                        Ok(_) => None,
                    }
                };
                if let Some(why) = bad {
                    return Answer::error_at(502, "bad_redirect", why, Some(served), hops)
                        .in_emergency(emergency_for);
                }
                hops += 1;
                role = r.into();
                if let Ok(Some(p)) = p {
                    want = p;
                }
                continue;
            }
            Reply::Lost => Answer::error_at(
                502,
                "task_lost",
                "the task's link closed before it answered",
                Some(served),
                hops,
            ),
            Reply::Timeout => Answer::error_at(
                504,
                "task_timeout",
                "the task did not answer in time",
                Some(served),
                hops,
            ),
        };
        // An error of the emergency partition says so, as its answers do.
        return answer.in_emergency(emergency_for);
    }
}

/// How often the shard looks whether the routing table moved while requests wait for a task
/// ([`wake_task_waiters`]).
const TASK_WAIT_POLL: Duration = Duration::from_millis(2);

/// The waiters are woken at least this often, to look at their deadlines.
const TASK_WAIT_WAKE_ALL: Duration = Duration::from_millis(100);

/// A router that took its addresses over waits, for `readiness.takeover_task_wait_ms` after
/// it starts accepting and within the request's `deadline`, for a task to link to a partition
/// that has none (the tasks of the router it replaces link here once that one drains): true
/// while the window is open, to [`wait_for_task`] once and look up the route again; false
/// once it is over (or there is none), to answer 503 `no_live_task`. Counted once per request
/// in `fedbus_takeover_task_waits_total`.
fn may_wait_for_task(shard: &Shard, deadline: std::time::Instant, waited: &mut bool) -> bool {
    let Some(until) = shard.task_wait_until.get() else {
        return false;
    };
    let now = std::time::Instant::now();
    if now >= until {
        shard.task_wait_until.set(None);
        return false;
    }
    if now >= deadline {
        return false;
    }
    if !std::mem::replace(waited, true) {
        ShardMetrics::inc(&shard.metrics.takeover_held);
    }
    true
}

/// One wait of [`may_wait_for_task`], counted in `fedbus_pending_requests` (a drain waits for
/// it). One shard-wide ticker wakes the waiters ([`wake_task_waiters`]), not a timer per
/// request: the routing table that holds a new link is published by the control thread, and
/// nothing on the shard hears of it.
async fn wait_for_task(shard: &Shard) {
    let _pending = PendingGauge::new(&shard.metrics);
    /// One fewer waiter when the wait ends, woken or dropped (the client went away).
    struct Waiting<'a>(&'a Shard);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.task_waiters.set(self.0.task_waiters.get() - 1);
        }
    }
    shard.task_waiters.set(shard.task_waiters.get() + 1);
    let _waiting = Waiting(shard);
    // A permit left over by a waiter that went away wakes one early: it looks again and waits.
    let _ = shard.task_wake.acquire(1).await;
}

/// The ticker of [`wait_for_task`], started with the window: every [`TASK_WAIT_POLL`] it looks
/// at the routing table's generation, and wakes every waiter when it moved, every
/// [`TASK_WAIT_WAKE_ALL`], and once the window is over (then it ends).
pub(crate) async fn wake_task_waiters(shard: Rc<Shard>) {
    let mut timer = crate::util::Deadline::new();
    let mut seen = shard.snapshots.routes.load().generation;
    let mut woke = std::time::Instant::now();
    loop {
        timer.sleep(TASK_WAIT_POLL).await;
        let now = std::time::Instant::now();
        let over = shard.task_wait_until.get().is_none_or(|u| now >= u);
        if over {
            shard.task_wait_until.set(None);
        }
        let generation = shard.snapshots.routes.load().generation;
        let moved = std::mem::replace(&mut seen, generation) != generation;
        if moved || over || now >= woke + TASK_WAIT_WAKE_ALL {
            woke = now;
            wake_all_waiters(&shard);
        }
        if over {
            return;
        }
    }
}

/// Ends the hold of [`may_wait_for_task`] early, once this draining shard's task listeners
/// are closed: no task can link here any more, so a held request waiting out the rest of the
/// window would only make the drain last as long (a takeover router stopped during its
/// window, as in a rollback). Each waiter looks once more and, with no task, is answered 503
/// `no_live_task` now; its client retries on the router that still has the address.
pub(crate) fn end_task_wait(shard: &Shard) {
    if shard.task_wait_until.take().is_some() {
        wake_all_waiters(shard);
    }
}

/// Wakes every request in [`wait_for_task`]: each looks up its route again.
fn wake_all_waiters(shard: &Shard) {
    let n = shard.task_waiters.get();
    if n > 0 {
        shard.task_wake.signal(n as u64);
    }
}

/// `fedbus_pending_requests` up while alive.
struct PendingGauge<'a>(&'a ShardMetrics);

impl<'a> PendingGauge<'a> {
    fn new(m: &'a ShardMetrics) -> Self {
        ShardMetrics::inc(&m.pending);
        PendingGauge(m)
    }
}

impl Drop for PendingGauge<'_> {
    fn drop(&mut self) {
        ShardMetrics::dec(&self.0.pending);
    }
}

fn no_live_task(app: &str, role: &str, partition: u32, hops: u8) -> Answer {
    Answer::error_at(
        503,
        "no_live_task",
        format!("no live task serves {app} role {role} partition {partition}"),
        Some(partition),
        hops,
    )
}

/// Where a request for partition `want` of `role` goes when no link of this shard serves it
/// and the published snapshot may not know yet (the control thread publishes a moment
/// later): the published emergency partition if this shard has a live link for it, else the
/// same pure election the control thread runs, among the partitions live on this shard, so
/// the choice matches what it will publish. `None`: nothing live here.
pub(crate) fn emergency_fallback(
    app: &str,
    role: &str,
    seed: u64,
    published: Option<u32>,
    want: u32,
    routes: &RoleRoutes,
    live_here: impl Fn(u32) -> bool,
) -> Option<u32> {
    let usable = |p: &u32| *p != want && live_here(*p);
    match published.filter(usable) {
        Some(e) => Some(e),
        None => {
            crate::route::elect_emergency(app, role, seed, routes.live_partitions().filter(usable))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::emergency_fallback;
    use crate::route::{build, elect_emergency, AppSpec, Registration};

    fn routes(live: &[u32]) -> crate::route::RoutingTable {
        let apps = [AppSpec {
            name: "demo/echo".into(),
            partitions: 8,
            emergency_partition: None,
        }];
        let regs: Vec<Registration> = live
            .iter()
            .map(|p| Registration {
                task: u64::from(*p) + 1,
                app: "demo/echo".into(),
                role: "main".into(),
                partitions: vec![*p],
            })
            .collect();
        build(&apps, &regs, 1, 7)
    }

    #[test]
    fn published_emergency_partition_wins_while_live_here() {
        let t = routes(&[1, 2, 3]);
        let r = &t.apps["demo/echo"].roles["main"];
        let got = emergency_fallback("demo/echo", "main", 7, Some(2), 5, r, |_| true);
        assert_eq!(got, Some(2));
    }

    #[test]
    fn without_a_live_published_one_the_shard_elects_like_the_control_thread() {
        let t = routes(&[1, 2, 3]);
        let r = &t.apps["demo/echo"].roles["main"];
        // The published partition 2 has no live link on this shard, nor has 3.
        let live_here = |p: u32| p != 2 && p != 3;
        let got = emergency_fallback("demo/echo", "main", 7, Some(2), 5, r, live_here);
        assert_eq!(
            got,
            elect_emergency("demo/echo", "main", 7, [1].into_iter())
        );
        assert_eq!(got, Some(1));
        // The partition asked for is never its own emergency partition.
        let got = emergency_fallback("demo/echo", "main", 7, Some(1), 1, r, |p| p == 1);
        assert_eq!(got, None);
        // Nothing live on this shard.
        assert_eq!(
            emergency_fallback("demo/echo", "main", 7, None, 5, r, |_| false),
            None
        );
    }
}
