//! Readiness and drain: whether this router can serve now. Shared (`Arc`) by the shards, the
//! admin listener (`/readyz`), the peer links (which tell peer routers) and the signal handler
//! (which starts a drain). Written with relaxed atomics off the request path; the verdict is a
//! pure function of these flags and the published routing snapshot.

use crate::config::{Coverage, Readiness};
use crate::route::{RoutingTable, MAIN_ROLE};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a waiting shard task looks at the drain flag. A drain takes at least this long
/// to reach every listener and peer link, which is short next to a peer's reaction time.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Router-wide liveness and drain state.
pub struct Health {
    draining: AtomicBool,
    /// Set by a drain that steered new clients to a router that took over: the api accept
    /// loops leave their listeners to the drain to shut down (`shard::steer`).
    clients_steered: AtomicBool,
    /// Set once the drain is over: shards close what is left (task links with 1001).
    closing: AtomicBool,
    /// Per shard: its executor is running (false once it ended or panicked).
    shards: Vec<AtomicBool>,
    /// Other clusters (`region/cluster`), in the order of `peer_links`' columns.
    clusters: Vec<String>,
    /// `shard * clusters.len() + cluster` -> live peer links from that shard to that cluster.
    peer_links: Vec<AtomicUsize>,
    /// Per cluster: removed from the federation by a reload (`/readyz` no longer waits for it).
    removed: Vec<AtomicBool>,
    /// Since when the times below count.
    epoch: Instant,
    /// When the control thread last began a pass of its loop (ms since `epoch`).
    control_beat: AtomicU64,
}

/// Marks a shard alive while it lives; dropping it (the shard's executor ended or unwound from
/// a panic) marks the shard dead, so `/readyz` reports it.
pub(crate) struct ShardAlive {
    health: Arc<Health>,
    shard: usize,
}

impl Drop for ShardAlive {
    fn drop(&mut self) {
        self.health.shards[self.shard].store(false, Relaxed);
        if std::thread::panicking() {
            tracing::error!(
                shard = self.shard,
                "shard panicked: the router is not ready"
            );
        }
    }
}

impl Health {
    /// `shards` shards, peer links to `clusters` (other clusters, `region/cluster`).
    pub fn new(shards: usize, mut clusters: Vec<String>) -> Health {
        clusters.sort();
        clusters.dedup();
        Health {
            draining: AtomicBool::new(false),
            clients_steered: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            shards: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            peer_links: (0..shards * clusters.len())
                .map(|_| AtomicUsize::new(0))
                .collect(),
            removed: clusters.iter().map(|_| AtomicBool::new(false)).collect(),
            clusters,
            epoch: Instant::now(),
            control_beat: AtomicU64::new(0),
        }
    }

    /// Marks `shard` alive until the guard drops.
    pub(crate) fn shard_alive(self: &Arc<Self>, shard: usize) -> ShardAlive {
        self.shards[shard].store(true, Relaxed);
        ShardAlive {
            health: self.clone(),
            shard,
        }
    }

    /// Starts a drain: `/readyz` answers 503, listeners stop accepting (the api ones once the
    /// drain has steered new clients away, `shard::steer`), peer routers are told.
    pub fn start_drain(&self) {
        // Release: a shard that sees the drain sees `clients_steered` set before it.
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// New clients go to a router that took over (before [`Health::start_drain`]).
    pub(crate) fn steer_clients(&self) {
        self.clients_steered.store(true, Relaxed);
    }

    /// True when [`Health::steer_clients`] was called.
    pub(crate) fn clients_steered(&self) -> bool {
        self.clients_steered.load(Relaxed)
    }

    /// True once a drain started.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// True while every shard runs.
    pub(crate) fn all_shards_running(&self) -> bool {
        self.shards.iter().all(|a| a.load(Relaxed))
    }

    /// The executor thread of `shard` ended (`why`: its error, a panic): the shard is dead
    /// for good and `/readyz` answers 503. Called by the thread that joins it.
    pub(crate) fn shard_ended(&self, shard: usize, why: Option<String>) {
        self.shards[shard].store(false, Relaxed);
        tracing::error!(
            shard,
            why = why.as_deref().unwrap_or("its main future returned"),
            "shard executor ended: the router is not ready"
        );
    }

    /// Whether shard `shard`'s executor runs now.
    pub(crate) fn shard_runs(&self, shard: usize) -> bool {
        self.shards[shard].load(Relaxed)
    }

    /// Shards whose executor runs now (`fedbus_shards_alive`; `fedbus_shards` says how many
    /// were started).
    /// The control thread begins a pass of its loop.
    pub(crate) fn control_beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.control_beat.store(ms, Relaxed);
    }

    /// How long since the control thread last began a pass of its loop.
    pub(crate) fn control_age(&self) -> Duration {
        let beat = Duration::from_millis(self.control_beat.load(Relaxed));
        self.epoch.elapsed().saturating_sub(beat)
    }

    pub(crate) fn shards_alive(&self) -> usize {
        self.shards.iter().filter(|a| a.load(Relaxed)).count()
    }

    /// Ends a drain: shards close their remaining links.
    pub fn start_closing(&self) {
        self.closing.store(true, Relaxed);
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    fn peer_slot(&self, shard: usize, cluster: &str) -> Option<&AtomicUsize> {
        let c = self.clusters.iter().position(|k| k == cluster)?;
        self.peer_links.get(shard * self.clusters.len() + c)
    }

    /// A peer link from `shard` to `cluster` came up (`up`) or went down.
    pub(crate) fn peer_link(&self, shard: usize, cluster: &str, up: bool) {
        if let Some(n) = self.peer_slot(shard, cluster) {
            if up {
                n.fetch_add(1, Relaxed);
            } else {
                n.fetch_sub(1, Relaxed);
            }
        }
    }

    /// The other clusters of the federation now (after a reload): those known at start and
    /// missing here stop counting for `/readyz`. A cluster added by a reload is not waited for
    /// (its columns are fixed at start).
    pub(crate) fn watch_clusters(&self, now: &[String]) {
        for (c, r) in self.clusters.iter().zip(&self.removed) {
            r.store(!now.contains(c), Relaxed);
        }
    }

    /// Why this router cannot serve requests for its own cluster now (`None`: it can): a
    /// drain, a dead shard, or task coverage below `policy`. This is what peer routers learn.
    pub(crate) fn serving_refusal(&self, table: &RoutingTable, policy: Coverage) -> Option<String> {
        if self.draining() {
            return Some("draining".into());
        }
        if let Some(i) = self.shards.iter().position(|a| !a.load(Relaxed)) {
            return Some(format!("shard {i} is not running"));
        }
        coverage_refusal(table, policy)
    }

    /// `/readyz`: [`Health::serving_refusal`], and with `cfg.peers` a live peer link to every
    /// other cluster from every shard.
    pub(crate) fn readiness(&self, table: &RoutingTable, cfg: &Readiness) -> Result<(), String> {
        if let Some(why) = self.serving_refusal(table, cfg.coverage) {
            return Err(why);
        }
        // Task registrations and reloads wait on that thread: the routing table this router
        // serves from no longer follows its tasks.
        let age = self.control_age();
        if age >= Duration::from_millis(cfg.control_stall_ms) {
            return Err(format!(
                "control thread stalled: no pass of its loop for {} ms (task registrations and reloads wait)",
                age.as_millis()
            ));
        }
        if cfg.peers {
            let n = self.clusters.len();
            for (i, links) in self.peer_links.iter().enumerate() {
                if links.load(Relaxed) == 0 && !self.removed[i % n].load(Relaxed) {
                    return Err(format!(
                        "no peer link to {} on shard {}",
                        self.clusters[i % n],
                        i / n
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The first app whose `main` role falls short of `policy`, as a reason.
fn coverage_refusal(table: &RoutingTable, policy: Coverage) -> Option<String> {
    if policy == Coverage::None {
        return None;
    }
    let mut names: Vec<&String> = table.apps.keys().collect();
    names.sort();
    for name in names {
        let app = &table.apps[name];
        let live = app
            .roles
            .get(MAIN_ROLE)
            .map_or(0, |r| r.live_partitions().count());
        let short = match policy {
            Coverage::All => live < app.partitions as usize,
            Coverage::Any => live == 0,
            Coverage::None => false,
        };
        if short {
            return Some(format!(
                "app {name}: {live} of {} partitions have a live task",
                app.partitions
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{build, AppSpec, Registration};

    fn table(live: &[u32]) -> RoutingTable {
        let spec = AppSpec {
            name: "demo/echo".into(),
            partitions: 4,
            emergency_partition: None,
        };
        let regs: Vec<Registration> = live
            .iter()
            .map(|&p| Registration {
                task: u64::from(p) + 1,
                app: "demo/echo".into(),
                role: "main".into(),
                partitions: vec![p],
            })
            .collect();
        build(&[spec], &regs, 2, 0)
    }

    #[test]
    fn coverage_policies() {
        let h = Arc::new(Health::new(1, vec![]));
        let _alive = h.shard_alive(0);
        let some = table(&[0, 2]);
        let full = table(&[0, 1, 2, 3]);
        assert!(h.serving_refusal(&some, Coverage::All).is_some());
        assert!(h.serving_refusal(&full, Coverage::All).is_none());
        assert!(h.serving_refusal(&some, Coverage::Any).is_none());
        assert!(h.serving_refusal(&table(&[]), Coverage::Any).is_some());
        assert!(h.serving_refusal(&table(&[]), Coverage::None).is_none());
    }

    #[test]
    fn a_dead_shard_or_a_drain_is_not_ready() {
        let h = Arc::new(Health::new(2, vec![]));
        let full = table(&[0, 1, 2, 3]);
        let a = h.shard_alive(0);
        assert!(
            h.serving_refusal(&full, Coverage::All).is_some(),
            "shard 1 never started"
        );
        let b = h.shard_alive(1);
        assert!(h.serving_refusal(&full, Coverage::All).is_none());
        drop(a);
        let why = h
            .serving_refusal(&full, Coverage::All)
            .expect("shard 0 ended");
        assert!(why.contains("shard 0"), "{why}");
        let _a = h.shard_alive(0);
        h.start_drain();
        assert_eq!(
            h.serving_refusal(&full, Coverage::All).as_deref(),
            Some("draining")
        );
        drop(b);
    }

    #[test]
    fn readiness_wants_a_peer_link_to_every_cluster_from_every_shard() {
        let h = Arc::new(Health::new(2, vec!["ru/b".into(), "ru/a".into()]));
        let (_a, _b) = (h.shard_alive(0), h.shard_alive(1));
        let cfg = Readiness::default();
        let full = table(&[0, 1, 2, 3]);
        for s in 0..2 {
            h.peer_link(s, "ru/a", true);
        }
        h.peer_link(0, "ru/b", true);
        let why = h.readiness(&full, &cfg).unwrap_err();
        assert_eq!(why, "no peer link to ru/b on shard 1");
        h.peer_link(1, "ru/b", true);
        assert_eq!(h.readiness(&full, &cfg), Ok(()));
        h.peer_link(0, "ru/a", false);
        assert!(h.readiness(&full, &cfg).is_err());
        let relaxed = Readiness {
            peers: false,
            ..Readiness::default()
        };
        assert_eq!(h.readiness(&full, &relaxed), Ok(()));
    }

    #[test]
    fn a_cluster_removed_by_a_reload_stops_counting_for_readiness() {
        let h = Arc::new(Health::new(1, vec!["ru/a".into(), "ru/b".into()]));
        let _a = h.shard_alive(0);
        let cfg = Readiness::default();
        let full = table(&[0, 1, 2, 3]);
        h.peer_link(0, "ru/a", true);
        assert_eq!(
            h.readiness(&full, &cfg).unwrap_err(),
            "no peer link to ru/b on shard 0"
        );
        h.watch_clusters(&["ru/a".into()]);
        assert_eq!(h.readiness(&full, &cfg), Ok(()));
        // Listed again: waited for again.
        h.watch_clusters(&["ru/a".into(), "ru/b".into()]);
        assert!(h.readiness(&full, &cfg).is_err());
    }
}
