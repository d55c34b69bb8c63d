//! The control thread: owns the registrations of task links and the keyring, and publishes
//! immutable snapshots (routing table, keyring) behind one atomic pointer each. Shards send it
//! events over a crossbeam channel and never wait for it; it is never on the request path.
//! Every decision it makes is a pure function (`route::build`, `route::elect_emergency`,
//! `auth::check_version`), tested without sockets.

use crate::auth::Keyring;
use crate::config::Config;
use crate::route::{self, AppSpec, Registration, RoutingTable, TaskId};
use arc_swap::ArcSwap;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A keyring with the generation it was published at.
pub(crate) struct KeySnapshot {
    pub(crate) generation: u64,
    pub(crate) keyring: Keyring,
}

/// The snapshots shards read on every request.
#[derive(Clone)]
pub(crate) struct Snapshots {
    pub(crate) routes: Arc<ArcSwap<RoutingTable>>,
    pub(crate) keys: Arc<ArcSwap<KeySnapshot>>,
}

/// What shards tell the control thread.
#[derive(Debug)]
pub enum ControlEvent {
    /// A task link registered on `shard`.
    Register {
        /// The shard whose link registered.
        shard: usize,
        /// What the task serves.
        reg: Registration,
    },
    /// The link of `task` on `shard` is gone.
    Unregister {
        /// The shard the link was on.
        shard: usize,
        /// The task instance.
        task: TaskId,
    },
    /// Re-read the keyring and the TLS certificates now (SIGHUP).
    Reload,
    /// Stop the thread.
    Shutdown,
}

/// Registrations of live task instances: the shards each has a link on.
#[derive(Default)]
pub(crate) struct Registry {
    tasks: HashMap<TaskId, (Registration, BTreeSet<usize>)>,
}

impl Registry {
    /// Applies one event; true when the set of live tasks changed.
    pub(crate) fn apply(&mut self, ev: &ControlEvent) -> bool {
        match ev {
            ControlEvent::Register { shard, reg } => {
                let e = self
                    .tasks
                    .entry(reg.task)
                    .or_insert_with(|| (reg.clone(), BTreeSet::new()));
                if !e.1.is_empty() && (e.0.app != reg.app || e.0.role != reg.role) {
                    // Shards refuse this; never let one app's link take another's task id.
                    tracing::warn!(
                        task = reg.task,
                        "registration of a live task id for another app or role ignored"
                    );
                    return false;
                }
                let changed = e.1.is_empty() || e.0 != *reg;
                e.0 = reg.clone();
                e.1.insert(*shard);
                changed
            }
            ControlEvent::Unregister { shard, task } => {
                let Some(e) = self.tasks.get_mut(task) else {
                    return false;
                };
                e.1.remove(shard);
                if e.1.is_empty() {
                    self.tasks.remove(task);
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// Live registrations (a task is live while it has a link on any shard), in a stable order.
    pub(crate) fn live(&self) -> Vec<Registration> {
        let mut v: Vec<Registration> = self.tasks.values().map(|(r, _)| r.clone()).collect();
        v.sort_by_key(|r| r.task);
        v
    }
}

/// App specs from the config.
pub(crate) fn app_specs(cfg: &Config) -> Vec<AppSpec> {
    cfg.apps
        .iter()
        .map(|a| AppSpec {
            name: a.name.clone(),
            partitions: a.partitions,
            emergency_partition: a.emergency_partition,
        })
        .collect()
}

/// Newest modification time among the keyring's files (None if unreadable).
fn keyring_mtime(dir: &std::path::Path) -> Option<SystemTime> {
    let mut newest = std::fs::metadata(dir.join("cluster.toml"))
        .ok()?
        .modified()
        .ok()?;
    if let Ok(rd) = std::fs::read_dir(dir.join("apps")) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(m);
            }
        }
    }
    if let Ok(m) = std::fs::metadata(dir.join("apps")).and_then(|m| m.modified()) {
        newest = newest.max(m);
    }
    Some(newest)
}

/// The control thread's state.
pub(crate) struct Control {
    cfg: Arc<Config>,
    specs: Vec<AppSpec>,
    registry: Registry,
    snapshots: Snapshots,
    keyring_dir: PathBuf,
    keyring_mtime: Option<SystemTime>,
    generation: u64,
    key_generation: u64,
    /// Certificates in use: the api and internal listeners' (`[[tls.certs]]`), the peer
    /// links' (`[tls.peer]`).
    tls: Vec<crate::tls::Reloader>,
}

impl Control {
    /// Loads the keyring and publishes the first (empty) routing table.
    pub(crate) fn new(
        cfg: Arc<Config>,
        keyring: Keyring,
        tls: Vec<crate::tls::Reloader>,
    ) -> Control {
        let specs = app_specs(&cfg);
        let table = route::build(&specs, &[], 1, cfg.routing.election_seed);
        let keyring_dir = cfg.keyring_dir();
        let snapshots = Snapshots {
            routes: Arc::new(ArcSwap::from_pointee(table)),
            keys: Arc::new(ArcSwap::from_pointee(KeySnapshot {
                generation: 1,
                keyring,
            })),
        };
        Control {
            keyring_mtime: keyring_mtime(&keyring_dir),
            cfg,
            specs,
            registry: Registry::default(),
            snapshots,
            keyring_dir,
            generation: 1,
            key_generation: 1,
            tls,
        }
    }

    pub(crate) fn snapshots(&self) -> Snapshots {
        self.snapshots.clone()
    }

    fn publish_routes(&mut self) {
        self.generation += 1;
        let previous = self.snapshots.routes.load_full();
        let t = route::build_after(
            Some(&previous),
            &self.specs,
            &self.registry.live(),
            self.generation,
            self.cfg.routing.election_seed,
        );
        // One atomic store: readers see the old table or the new one, never half of each.
        self.snapshots.routes.store(Arc::new(t));
    }

    /// Re-reads the keyring; a broken one keeps the old in force and logs why.
    pub(crate) fn reload_keys(&mut self, why: &str) {
        self.keyring_mtime = keyring_mtime(&self.keyring_dir);
        match Keyring::load(&self.keyring_dir) {
            Ok(k) => {
                self.key_generation += 1;
                tracing::info!(why, generation = self.key_generation, "keyring reloaded");
                self.snapshots.keys.store(Arc::new(KeySnapshot {
                    generation: self.key_generation,
                    keyring: k,
                }));
            }
            Err(e) => {
                tracing::error!(why, error = %e, "keyring reload failed; keeping the previous keyring")
            }
        }
    }

    /// Runs until `Shutdown` or every sender is gone.
    pub(crate) fn run(mut self, rx: crossbeam_channel::Receiver<ControlEvent>) {
        let poll = Duration::from_millis(self.cfg.auth.reload_poll_ms);
        loop {
            let first = match rx.recv_timeout(poll) {
                Ok(ev) => Some(ev),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            let mut changed = false;
            // Drain what is queued so a burst of registrations publishes one table.
            for ev in first.into_iter().chain(rx.try_iter()) {
                match ev {
                    ControlEvent::Shutdown => return,
                    ControlEvent::Reload => {
                        self.reload_keys("reload event");
                        for t in &mut self.tls {
                            t.reload("reload event");
                        }
                    }
                    ev => changed |= self.registry.apply(&ev),
                }
            }
            if changed {
                self.publish_routes();
            }
            if keyring_mtime(&self.keyring_dir) != self.keyring_mtime {
                self.reload_keys("keyring files changed");
            }
            for t in &mut self.tls {
                t.poll();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_util::TempDir;

    #[test]
    fn a_broken_keyring_keeps_the_old_one_in_force() {
        let dir = TempDir::new("control-reload");
        Keyring::init(dir.path(), &["demo/echo"], 1_000).expect("init");
        let cfg = Config {
            keyring: Some(dir.path().to_path_buf()),
            ..Config::default()
        };
        let mut c = Control::new(
            Arc::new(cfg),
            Keyring::load(dir.path()).expect("load"),
            Vec::new(),
        );
        let snaps = c.snapshots();
        assert_eq!(snaps.keys.load().generation, 1);
        // A rotation on disk is picked up with a new generation.
        Keyring::rotate_app(dir.path(), "demo/echo", 2_000).expect("rotate");
        c.reload_keys("test");
        let k = snaps.keys.load();
        assert_eq!(k.generation, 2);
        assert_eq!(
            k.keyring.signing_app_secret("demo/echo").map(|s| s.version),
            Some(2)
        );
        drop(k);
        // A corrupted file: the reload fails and version 2 stays in force.
        std::fs::write(dir.path().join("cluster.toml"), "versions = 7").expect("corrupt");
        c.reload_keys("test");
        let k = snaps.keys.load();
        assert_eq!(k.generation, 2, "a broken keyring must not be published");
        assert_eq!(
            k.keyring.signing_app_secret("demo/echo").map(|s| s.version),
            Some(2)
        );
    }

    fn reg(task: TaskId, parts: &[u32]) -> Registration {
        Registration {
            task,
            app: "demo/echo".into(),
            role: "main".into(),
            partitions: parts.to_vec(),
        }
    }

    #[test]
    fn task_is_live_while_any_shard_has_its_link() {
        let mut r = Registry::default();
        assert!(r.apply(&ControlEvent::Register {
            shard: 0,
            reg: reg(7, &[1])
        }));
        assert!(!r.apply(&ControlEvent::Register {
            shard: 1,
            reg: reg(7, &[1])
        }));
        assert!(!r.apply(&ControlEvent::Unregister { shard: 0, task: 7 }));
        assert_eq!(r.live().len(), 1);
        assert!(r.apply(&ControlEvent::Unregister { shard: 1, task: 7 }));
        assert!(r.live().is_empty());
        assert!(!r.apply(&ControlEvent::Unregister { shard: 1, task: 7 }));
    }
}
