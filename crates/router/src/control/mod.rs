//! The control thread: owns the registrations of task links and the keyring, and publishes
//! immutable snapshots (routing table, keyring) behind one atomic pointer each. Shards send it
//! events over a crossbeam channel and never wait for it; it is never on the request path.
//! Every decision it makes is a pure function (`route::build`, `route::elect_emergency`,
//! `auth::check_version`, [`restart_needed`], [`merge`]), tested without sockets.
//!
//! Reloads: the keyring and TLS certificates (their files), and from the config file
//! `[[apps]]` (the apps snapshot and the routing table) and `[federation]` (the federation
//! view: peer keys, routers, siblings), on SIGHUP and when a watched file's mtime changes.

use crate::auth::Keyring;
use crate::config::{App, Config};
use crate::peer::FedView;
use crate::route::{self, AppSpec, Registration, RoutingTable, TaskId};
use arc_swap::ArcSwap;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod reload;
pub(crate) use reload::{merge, restart_needed};

/// A keyring with the generation it was published at.
pub(crate) struct KeySnapshot {
    pub(crate) generation: u64,
    pub(crate) keyring: Keyring,
}

/// The apps in force (`[[apps]]`), with the generation they were published at.
pub(crate) struct AppsSnapshot {
    /// Starts at 1; +1 on every reload that changed `[[apps]]`.
    pub(crate) generation: u64,
    pub(crate) apps: Vec<App>,
}

/// The snapshots shards read on every request, and the control thread's reload counter.
#[derive(Clone)]
pub(crate) struct Snapshots {
    pub(crate) routes: Arc<ArcSwap<RoutingTable>>,
    pub(crate) keys: Arc<ArcSwap<KeySnapshot>>,
    /// `[[apps]]` in force.
    pub(crate) apps: Arc<ArcSwap<AppsSnapshot>>,
    /// Peer keys, routers and siblings in force.
    pub(crate) fed: Arc<ArcSwap<FedView>>,
    /// Config reloads refused (`fedbus_config_reload_failed_total`).
    pub(crate) reload_failed: Arc<AtomicU64>,
    /// Reload events (SIGHUP) handled, applied or refused (`fedbus_reloads_total`).
    pub(crate) reloads: Arc<AtomicU64>,
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
    /// Re-read the keyring, the TLS certificates and the config file's `[[apps]]` and
    /// `[federation]` now (SIGHUP).
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

/// Newest change among the keyring's files (None if unreadable): of their contents (mtime) or
/// of their owner and mode (ctime). A key file a `keys rotate` run as another user left
/// unreadable to the router is refused at its reload; the `chown` or `chmod` that fixes it
/// moves its ctime alone, and is a change to look at.
fn keyring_mtime(dir: &std::path::Path) -> Option<SystemTime> {
    let mut newest = std::fs::metadata(dir.join("cluster.toml"))
        .ok()
        .and_then(|m| changed_at(&m))?;
    let apps = dir.join("apps");
    if let Ok(rd) = std::fs::read_dir(&apps) {
        for e in rd.flatten() {
            if let Some(t) = e.metadata().ok().and_then(|m| changed_at(&m)) {
                newest = newest.max(t);
            }
        }
    }
    if let Some(t) = std::fs::metadata(&apps).ok().and_then(|m| changed_at(&m)) {
        newest = newest.max(t);
    }
    Some(newest)
}

/// The later of a file's mtime and ctime.
fn changed_at(m: &std::fs::Metadata) -> Option<SystemTime> {
    use std::os::unix::fs::MetadataExt;
    let modified = m.modified().ok()?;
    let ctime = u64::try_from(m.ctime()).ok().map(|s| {
        SystemTime::UNIX_EPOCH + Duration::new(s, u32::try_from(m.ctime_nsec()).unwrap_or(0))
    });
    Some(ctime.map_or(modified, |c| c.max(modified)))
}

/// Modification time of `path` (None if unreadable).
fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// How long after its mtime a watched config file (or TLS file, `tls::Reloader::poll`) is
/// looked at again (see [`Watched::changed_or_racy`]); a look that finds the bytes last read
/// does nothing.
pub(crate) const RACY: Duration = Duration::from_millis(100);

/// An mtime under [`RACY`] old at `now` (one in the future too; no arithmetic that overflows
/// on a file's odd time).
fn recent(t: SystemTime, now: SystemTime) -> bool {
    now.checked_sub(RACY).is_none_or(|r| t > r)
}

/// Which watched files have an mtime under [`RACY`] old (see [`Control::run`]).
#[derive(Clone, Copy, Default)]
struct Racy {
    keys: bool,
    config: bool,
    token: bool,
}

impl Racy {
    fn all() -> Racy {
        Racy {
            keys: true,
            config: true,
            token: true,
        }
    }

    fn any(self) -> bool {
        self.keys || self.config || self.token
    }
}

/// The control loop passes at least this often (`Health::control_beat`), events or not.
const BEAT: Duration = Duration::from_secs(1);

/// A pass of the control loop slower than this is logged.
const SLOW_PASS: Duration = Duration::from_secs(2);

/// Files whose mtime is watched, with the mtime last seen.
#[derive(Default)]
struct Watched(Vec<(PathBuf, Option<SystemTime>)>);

impl Watched {
    fn new(files: Vec<PathBuf>) -> Watched {
        Watched(files.into_iter().map(|f| (f.clone(), mtime(&f))).collect())
    }

    /// True when any file's mtime moved since the last call (remembers the new ones), or is
    /// less than `RACY` old: file times are only as fine as the kernel's clock tick, so a
    /// second write in the same tick as one already read leaves the mtime as it was.
    fn changed_or_racy(&mut self) -> bool {
        let moved = self.changed();
        moved || self.racy(SystemTime::now())
    }

    /// True when a file's mtime last seen is less than `RACY` old at `now`.
    fn racy(&self, now: SystemTime) -> bool {
        self.0
            .iter()
            .any(|(_, seen)| seen.is_some_and(|t| recent(t, now)))
    }

    /// True when any file's mtime moved since the last call (remembers the new ones).
    fn changed(&mut self) -> bool {
        let mut moved = false;
        for (f, seen) in &mut self.0 {
            let now = mtime(f);
            if now != *seen {
                *seen = now;
                moved = true;
            }
        }
        moved
    }
}

/// The control thread's state.
pub(crate) struct Control {
    /// The config the router started with (listeners, limits... fixed for its life).
    cfg: Arc<Config>,
    /// The config in force: `cfg` with the last reloaded `[[apps]]` and `[federation]`.
    applied: Config,
    /// The config file (when the router was started with one).
    config_file: Watched,
    /// The config file's text as the last reload read it (applied or refused).
    config_read: Option<String>,
    /// Each other cluster's `cluster.toml`.
    peer_key_files: Watched,
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
    /// The peer token the dialers present (`peer::Federation::token`), and its file.
    peer_token: Option<(crate::peer::PeerToken, Watched)>,
    /// Configured apps the keyring had no secret for, as last logged.
    without_secret: Vec<String>,
    /// Told at each pass of the loop (`/readyz` sees a stalled control thread).
    health: Option<Arc<crate::health::Health>>,
    /// The last peer token refused from `federation.peer_token_file` (counted once).
    peer_token_refused: Option<String>,
    /// The config file as last read, parsed, validated and merged, when it was refused only
    /// because a `[federation]` keys directory it names could not be read (a file outside the
    /// text, which the mtime poll does not see fixed), with that error. Tried again each
    /// `auth.reload_poll_ms`, counted and logged once while the error stays the same.
    config_waits_for_keys: Option<(String, Config)>,
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
        // The start already read these files (`peer::Federation::load`); a failure here is a
        // file that changed in between: the next reload reads it again.
        let fed = FedView::load(&cfg).unwrap_or_else(|e| {
            tracing::error!(error = %e, "federation view at start; peer links wait for a reload");
            FedView::default()
        });
        let snapshots = Snapshots {
            routes: Arc::new(ArcSwap::from_pointee(table)),
            keys: Arc::new(ArcSwap::from_pointee(KeySnapshot {
                generation: 1,
                keyring,
            })),
            apps: Arc::new(ArcSwap::from_pointee(AppsSnapshot {
                generation: 1,
                apps: cfg.apps.clone(),
            })),
            fed: Arc::new(ArcSwap::from_pointee(FedView {
                generation: 1,
                ..fed
            })),
            reload_failed: Arc::new(AtomicU64::new(0)),
            reloads: Arc::new(AtomicU64::new(0)),
        };
        let mut control = Control {
            // Not the mtime now: the keyring was loaded before this (the listeners, TLS and
            // the federation were set up in between), and a rotation written meanwhile would
            // pass for the keys loaded. None: the first look reloads it (publishing nothing
            // when it is the keyring loaded).
            keyring_mtime: None,
            applied: (*cfg).clone(),
            config_file: Watched::new(cfg.source.iter().cloned().collect()),
            config_read: None,
            peer_key_files: Watched::new(crate::peer::view::key_files(&cfg)),
            cfg,
            specs,
            registry: Registry::default(),
            snapshots,
            keyring_dir,
            generation: 1,
            key_generation: 1,
            tls,
            peer_token: None,
            without_secret: Default::default(),
            health: None,
            peer_token_refused: None,
            config_waits_for_keys: None,
        };
        control.warn_apps_without_secret("start");
        control
    }

    /// Logs each configured app the keyring has no secret for: its client tokens are refused
    /// (401 `unknown_app`) and its Auth Service gets no secret to sign with. Dev mode makes
    /// the secrets itself; otherwise `fedbus keys init --app` (or `keys rotate --app ...
    /// --create-app`) does. Run at start, after each keyring reload and each `[[apps]]` reload.
    /// Each app is logged once while it stays without a secret (a SIGHUP reloads the keyring
    /// and the config: one line, not two).
    fn warn_apps_without_secret(&mut self, why: &str) {
        let keys = self.snapshots.keys.load();
        let missing: Vec<String> = self
            .applied
            .app_names()
            .into_iter()
            .filter(|app| keys.keyring.app_versions(app).is_none())
            .map(str::to_string)
            .collect();
        for app in missing.iter().filter(|a| !self.without_secret.contains(a)) {
            tracing::warn!(
                why,
                %app,
                keyring = %self.keyring_dir.display(),
                "app has no secret in the keyring: its client tokens are refused 401 unknown_app; create it with `fedbus keys init --app {app}`"
            );
        }
        self.without_secret = missing;
    }

    /// Keeps `slot` (the dialers' peer token) fresh: `federation.peer_token_file` is looked at
    /// every `auth.reload_poll_ms` and on SIGHUP; in dev mode the token is minted again when
    /// the keyring's cluster key is rotated. Open peer links send a new one as a `renew`.
    pub(crate) fn with_peer_token(mut self, slot: crate::peer::PeerToken) -> Control {
        let file = self
            .cfg
            .federation
            .peer_token_file
            .iter()
            .cloned()
            .collect();
        self.peer_token = Some((slot, Watched::new(file)));
        self
    }

    /// Tells `health` at each pass of the loop, at least every [`BEAT`].
    pub(crate) fn with_health(mut self, health: Arc<crate::health::Health>) -> Control {
        health.control_beat();
        self.health = Some(health);
        self
    }

    /// Replaces the peer token when its source has a new one; a source that fails keeps the
    /// one in force (logged).
    fn reload_peer_token(&mut self, why: &str) {
        let Some(slot) = self.peer_token.as_ref().map(|(slot, _)| slot.clone()) else {
            return;
        };
        let current = slot.load_full();
        match crate::peer::reloaded_peer_token(&self.cfg, current.as_deref().map(String::as_str)) {
            Ok(Some(t))
                if self.cfg.federation.peer_token_file.is_some()
                    && !self.own_token_verifies(&t, why) => {}
            Ok(Some(t)) => {
                self.peer_token_refused = None;
                let claims = crate::auth::service_token::peek_claims(&t);
                let field = |k: &str| claims.as_ref().and_then(|c| c.get(k)?.as_u64());
                tracing::info!(why, kid = ?field("kid"), exp = ?field("exp"), "peer token reloaded; open peer links renew with it");
                slot.store(Some(Arc::new(t)));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(
                    why,
                    "peer token not reloaded, the one in force stays: {e:#}"
                )
            }
        }
    }

    /// Whether a peer token read from `federation.peer_token_file` verifies as ours, as a
    /// sibling (and a peer holding our keys) will check it: signed by a version of our keyring's
    /// cluster key within its grace, for our cluster, no app, not expired. One that does not
    /// is refused (logged and counted once per token): presented, it would fail every new
    /// peer link and every renew. A token of a key version our keyring does not hold yet is
    /// looked at again when the keyring changes.
    fn own_token_verifies(&mut self, token: &str, why: &str) -> bool {
        let keys = self.snapshots.keys.load();
        let (now, grace) = (crate::auth::now_unix(), self.cfg.auth.grace_secs);
        let checked = crate::auth::service_token::verify_service_token(
            &keys.keyring.cluster,
            token,
            now,
            grace,
        )
        .map_err(|e| e.to_string())
        .and_then(|c| {
            if !crate::peer::is_peer_token_of(&c, &self.cfg.cluster_id()) {
                Err(format!(
                    "a token for cluster {:?}, app {:?}: no peer token of this cluster",
                    c.cluster, c.app
                ))
            } else {
                Ok(())
            }
        });
        let Err(e) = checked else {
            return true;
        };
        if self.peer_token_refused.as_deref() != Some(token) {
            self.peer_token_refused = Some(token.to_string());
            self.snapshots.reload_failed.fetch_add(1, Relaxed);
            tracing::error!(why, error = %e, "peer token refused: it does not verify against this cluster's keys; the one in force stays");
        }
        false
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
            self.applied.routing.election_seed,
        );
        // One atomic store: readers see the old table or the new one, never half of each.
        self.snapshots.routes.store(Arc::new(t));
    }

    /// Re-reads the keyring and publishes it, with a new generation, when it differs from the
    /// one in force; returns whether it did. A broken one keeps the old in force, logged and,
    /// when `count`, counted in `fedbus_config_reload_failed_total` (not for a second look at
    /// the same write, [`Control::keyring_due`]).
    pub(crate) fn reload_keys(&mut self, why: &str, count: bool) -> bool {
        self.keyring_mtime = keyring_mtime(&self.keyring_dir);
        match Keyring::load(&self.keyring_dir) {
            // The same keys (a SIGHUP for the config alone, a second look): nothing new, and
            // caches keyed by the generation stay valid.
            Ok(k) if k == self.snapshots.keys.load().keyring => false,
            Ok(k) => {
                self.key_generation += 1;
                tracing::info!(why, generation = self.key_generation, "keyring reloaded");
                self.snapshots.keys.store(Arc::new(KeySnapshot {
                    generation: self.key_generation,
                    keyring: k,
                }));
                self.warn_apps_without_secret(why);
                true
            }
            Err(e) => {
                if count {
                    self.snapshots.reload_failed.fetch_add(1, Relaxed);
                    tracing::error!(why, error = %e, "keyring reload failed; keeping the previous keyring");
                }
                false
            }
        }
    }

    /// Whether the keyring's files are due for a look, and whether their newest mtime moved
    /// since the last: moved, or less than [`RACY`] old at `now` (file times are as fine as
    /// the kernel's clock tick, so a second write in the tick of one already read leaves
    /// the mtime as it was; before, such a write was not loaded until the next change).
    fn keyring_due(
        seen: Option<SystemTime>,
        current: Option<SystemTime>,
        now: SystemTime,
    ) -> (bool, bool) {
        let moved = current != seen;
        let racy = current.is_some_and(|t| recent(t, now));
        (moved || racy, moved)
    }

    /// Counts and logs a refused config reload; the config in force stays.
    fn refuse(&self, why: &str, error: &dyn std::fmt::Display) {
        self.snapshots.reload_failed.fetch_add(1, Relaxed);
        tracing::error!(why, %error, "config reload refused; keeping the config in force");
    }

    /// Re-reads the config file: `[[apps]]` and `[federation]` take effect, every other
    /// change is logged as needing a restart. A file that does not parse or validate, or
    /// whose federation keys cannot be read, is refused as a whole (counted in
    /// `fedbus_config_reload_failed_total`).
    pub(crate) fn reload_config(&mut self, why: &str) {
        // The file as read now is the one seen: the mtime poll after a SIGHUP must not load
        // (and refuse, and count) the same write a second time.
        self.config_file.changed();
        if let Some(text) = self.read_config(why) {
            self.reload_config_text(why, text);
        }
    }

    /// The config file's text; None (a refusal, counted) when it cannot be read, or when the
    /// router was started without a file.
    fn read_config(&self, why: &str) -> Option<String> {
        let path = self.cfg.source.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(err) => {
                let path = path.display().to_string();
                self.refuse(why, &crate::config::ConfigError::Read { path, err });
                None
            }
        }
    }

    /// [`Control::reload_config`] of `text`, just read from the config file. A `retry` of a
    /// text refused for its federation keys alone (`config_waits_for_keys`) that fails the
    /// same way again is neither counted nor logged.
    fn reload_config_text(&mut self, why: &str, text: String) {
        let Some(path) = self.cfg.source.clone() else {
            return;
        };
        // A new text replaces a refused one that waited for its keys.
        self.config_waits_for_keys = None;
        let parsed = Config::from_file_text(&text, &path);
        self.config_read = Some(text);
        let new = match parsed {
            Ok(c) => c,
            Err(e) => return self.refuse(why, &e),
        };
        // `[federation]` lists this router's cluster and its siblings by this identity: merged
        // under the old one, the new lists would make its own cluster's routers peers and
        // drop its siblings. The whole file waits for the restart that applies it.
        let c = &self.cfg;
        if (&c.region, &c.cluster, &c.router) != (&new.region, &new.cluster, &new.router) {
            let e = crate::config::ConfigError::Invalid {
                field: "region, cluster, router".into(),
                why: "differ from the running router's; they change only with a restart, and the rest of the file with them".into(),
            };
            return self.refuse(why, &e);
        }
        for section in restart_needed(&self.cfg, &new) {
            tracing::warn!(why, section, "config change needs a restart; left as it is");
        }
        let merged = merge(&self.cfg, &new);
        if let Err(e) = merged.validate() {
            return self.refuse(why, &e);
        }
        let fed = match FedView::load(&merged) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(why, &e);
                self.config_waits_for_keys = Some((e.to_string(), merged));
                return;
            }
        };
        self.apply_config(why, merged, fed);
    }

    /// Puts `merged` (a config file's text, parsed, validated and merged) in force, with its
    /// federation view `fed`.
    fn apply_config(&mut self, why: &str, merged: Config, fed: FedView) {
        let apps_changed = merged.apps != self.applied.apps;
        self.peer_key_files = Watched::new(crate::peer::view::key_files(&merged));
        self.applied = merged;
        if apps_changed {
            self.apply_apps(why);
        }
        self.publish_fed(why, fed);
    }

    /// The mtime poll saw the config file change (or change recently): reloads it unless its
    /// text is what the last reload read (a SIGHUP's reload may have read this write).
    fn poll_config(&mut self) {
        let why = "config file changed";
        let Some(text) = self.read_config(why) else {
            return;
        };
        if self.config_read.as_ref() != Some(&text) {
            self.reload_config_text(why, text);
        }
    }

    /// Tries again the config refused because a `[federation]` keys directory could not be
    /// read (`config_waits_for_keys`, kept parsed and merged: nothing else is checked or
    /// logged again): the directory may be readable now. A failure with the same error is
    /// neither counted nor logged again.
    fn retry_config_for_keys(&mut self) {
        let Some((error, merged)) = self.config_waits_for_keys.take() else {
            return;
        };
        let why = "federation keys of a refused config file";
        match FedView::load(&merged) {
            Ok(fed) => {
                tracing::info!(why, "the federation keys of the config file refused before are readable now: applying it");
                self.apply_config(why, merged, fed);
            }
            Err(e) => {
                let now = e.to_string();
                if now != error {
                    self.refuse(why, &e);
                }
                self.config_waits_for_keys = Some((now, merged));
            }
        }
    }

    /// Publishes the applied `[[apps]]` and a routing table built for them (tasks of
    /// unchanged apps keep their place; a resized app's partitions follow its new size).
    fn apply_apps(&mut self, why: &str) {
        if self.applied.dev {
            // As at start: dev mode makes the secrets of apps it has none for.
            let names = self.applied.app_names();
            if let Err(e) = Keyring::ensure_apps(&self.keyring_dir, &names, crate::auth::now_unix())
            {
                tracing::error!(why, error = %e, "dev keyring: app secrets for new apps");
            }
            self.reload_keys(why, true);
        }
        let generation = self.snapshots.apps.load().generation + 1;
        self.specs = app_specs(&self.applied);
        self.snapshots.apps.store(Arc::new(AppsSnapshot {
            generation,
            apps: self.applied.apps.clone(),
        }));
        self.publish_routes();
        let names = self.applied.app_names().join(", ");
        tracing::info!(why, generation, apps = %names, "apps reloaded");
        if !self.applied.dev {
            // (dev mode reloaded the keyring above, which warned)
            self.warn_apps_without_secret(why);
        }
    }

    /// Publishes `fed` when it differs from the view in force.
    fn publish_fed(&mut self, why: &str, fed: FedView) {
        let old = self.snapshots.fed.load_full();
        if old.same_as(&fed) {
            return;
        }
        let generation = old.generation + 1;
        let clusters = fed.routers.len();
        self.snapshots
            .fed
            .store(Arc::new(FedView { generation, ..fed }));
        tracing::info!(why, generation, clusters, "federation reloaded");
    }

    /// Re-reads the federation's key files (the config as applied): a peer cluster's rotated
    /// key, or our own (siblings), verifies at once.
    pub(crate) fn reload_federation(&mut self, why: &str) {
        match FedView::load(&self.applied) {
            Ok(f) => self.publish_fed(why, f),
            Err(e) => self.refuse(why, &e),
        }
    }

    /// Runs until `Shutdown` or every sender is gone.
    pub(crate) fn run(mut self, rx: crossbeam_channel::Receiver<ControlEvent>) {
        let poll = Duration::from_millis(self.cfg.auth.reload_poll_ms);
        // Watched files whose mtime is under `RACY` old: each is looked at again within
        // `RACY` (alone, not the others), or the second look that catches a write in the same
        // clock tick would come a poll later, when the mtime is no longer recent: never.
        let mut racy = Racy::default();
        // When every file was last looked at (a pass for events looks at all of them, as does
        // one each `poll`), and when the racy ones were; a wake for the beat alone looks at
        // nothing.
        let (mut polled, mut looked) = (Instant::now(), Instant::now());
        // When a refused config was last tried again (`retry_config_for_keys`): once a poll,
        // not at each pass that events bring.
        let mut retried = Instant::now();
        loop {
            let mut sleep = poll.saturating_sub(polled.elapsed()).min(BEAT);
            if racy.any() {
                sleep = sleep.min((RACY / 2).saturating_sub(looked.elapsed()));
            }
            let first = match rx.recv_timeout(sleep) {
                Ok(ev) => Some(ev),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            let pass = Instant::now();
            if let Some(h) = &self.health {
                h.control_beat();
            }
            // Test builds only (the `fault-injection` feature): see `crate::fault`.
            #[cfg(feature = "fault-injection")]
            crate::fault::stall_control();
            let all = first.is_some() || polled.elapsed() >= poll;
            let racy_due = racy.any() && looked.elapsed() >= RACY / 2;
            if !all && !racy_due {
                continue;
            }
            // What this pass looks at: everything, or the racy files alone.
            let look = if all {
                polled = pass;
                Racy::all()
            } else {
                racy
            };
            looked = pass;
            let mut changed = false;
            // Drain what is queued so a burst of registrations publishes one table.
            for ev in first.into_iter().chain(rx.try_iter()) {
                match ev {
                    ControlEvent::Shutdown => return,
                    ControlEvent::Reload => {
                        self.reload_keys("reload event", true);
                        self.reload_peer_token("reload event");
                        self.reload_config("reload event");
                        for t in &mut self.tls {
                            t.reload("reload event");
                        }
                        // Once all of it is done: a fact to wait for after a SIGHUP that
                        // changed nothing (no generation moves then).
                        self.snapshots.reloads.fetch_add(1, Relaxed);
                    }
                    ev => changed |= self.registry.apply(&ev),
                }
            }
            if changed {
                self.publish_routes();
            }
            let now = SystemTime::now();
            if look.keys {
                let current = keyring_mtime(&self.keyring_dir);
                let (due, moved) = Control::keyring_due(self.keyring_mtime, current, now);
                if due && (self.reload_keys("keyring files changed", moved) || moved) {
                    // Our own cluster key verifies siblings' peer tokens (and, in dev mode,
                    // signs ours).
                    self.reload_federation("keyring files changed");
                    self.reload_peer_token("keyring files changed");
                }
                racy.keys = current.is_some_and(|t| recent(t, now));
            }
            if look.config {
                if self.config_file.changed_or_racy() {
                    self.poll_config();
                }
                racy.config = self.config_file.racy(now);
            }
            if look.token {
                if self
                    .peer_token
                    .as_mut()
                    .is_some_and(|(_, file)| file.changed_or_racy())
                {
                    self.reload_peer_token("peer token file changed");
                }
                racy.token = self
                    .peer_token
                    .as_ref()
                    .is_some_and(|(_, file)| file.racy(now));
            }
            if all {
                if retried.elapsed() >= poll {
                    retried = pass;
                    self.retry_config_for_keys();
                }
                if self.peer_key_files.changed() {
                    self.reload_federation("federation key files changed");
                }
                for t in &mut self.tls {
                    t.poll();
                }
            }
            let took = pass.elapsed();
            if took >= SLOW_PASS {
                tracing::warn!(ms = took.as_millis() as u64, "a pass of the control loop was slow (a file read that hangs?); /readyz answers 503 past readiness.control_stall_ms");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_util::TempDir;

    /// A control thread's state on a new keyring (app `demo/echo`) in a temporary directory.
    fn on_new_keyring(name: &str) -> (TempDir, Control) {
        let dir = TempDir::new(name);
        Keyring::init(dir.path(), &["demo/echo"], 1_000).expect("init");
        let cfg = Config {
            keyring: Some(dir.path().to_path_buf()),
            ..Config::default()
        };
        let keyring = Keyring::load(dir.path()).expect("load");
        let c = Control::new(Arc::new(cfg), keyring, Vec::new());
        (dir, c)
    }

    #[test]
    fn a_broken_keyring_keeps_the_old_one_in_force() {
        let (dir, mut c) = on_new_keyring("control-reload");
        let snaps = c.snapshots();
        assert_eq!(snaps.keys.load().generation, 1);
        // A rotation on disk is picked up with a new generation.
        Keyring::rotate_app(dir.path(), "demo/echo", 2_000).expect("rotate");
        c.reload_keys("test", true);
        let k = snaps.keys.load();
        assert_eq!(k.generation, 2);
        assert_eq!(
            k.keyring.signing_app_secret("demo/echo").map(|s| s.version),
            Some(2)
        );
        drop(k);
        // A corrupted file: the reload fails and version 2 stays in force.
        std::fs::write(dir.path().join("cluster.toml"), "versions = 7").expect("corrupt");
        c.reload_keys("test", true);
        let k = snaps.keys.load();
        assert_eq!(k.generation, 2, "a broken keyring must not be published");
        assert_eq!(
            k.keyring.signing_app_secret("demo/echo").map(|s| s.version),
            Some(2)
        );
        drop(k);
        // ... and counted (before, a keyring refused at reload was only logged).
        assert_eq!(snaps.reload_failed.load(Relaxed), 1);
        // A second look at the same write counts nothing more.
        assert!(!c.reload_keys("test", false));
        assert_eq!(snaps.reload_failed.load(Relaxed), 1);
    }

    #[test]
    fn a_keyring_reloaded_unchanged_keeps_its_generation() {
        let (dir, mut c) = on_new_keyring("control-same-keys");
        let snaps = c.snapshots();
        // Every SIGHUP reloads the keyring: one that did not change publishes nothing (before,
        // each bumped the generation).
        assert!(!c.reload_keys("test", true));
        assert!(!c.reload_keys("test", true));
        assert_eq!(snaps.keys.load().generation, 1);
        assert_eq!(snaps.reload_failed.load(Relaxed), 0);
        Keyring::rotate_app(dir.path(), "demo/echo", 2_000).expect("rotate");
        assert!(c.reload_keys("test", true));
        assert_eq!(snaps.keys.load().generation, 2);
    }

    #[test]
    fn the_keyring_is_looked_at_again_while_its_mtime_is_racy() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let due = Control::keyring_due;
        // Moved.
        assert_eq!(due(Some(t), Some(t + RACY), t + RACY * 10), (true, true));
        assert_eq!(due(None, Some(t), t + RACY * 10), (true, true));
        assert_eq!(due(Some(t), None, t), (true, true));
        // The same mtime, still recent: a write in the same clock tick may have followed.
        assert_eq!(due(Some(t), Some(t), t + RACY / 2), (true, false));
        // The same mtime, old: nothing to look at.
        assert_eq!(due(Some(t), Some(t), t + RACY * 2), (false, false));
        assert_eq!(due(None, None, t), (false, false));
    }

    /// A rotation written between the keyring's load at start and the control thread's
    /// start (binds, TLS, the federation in between) is seen at the first look: before, the
    /// mtime remembered was read after that write, so the new keys waited for a SIGHUP.
    #[test]
    fn a_rotation_during_the_start_is_loaded_at_the_first_look() {
        let dir = TempDir::new("control-start-rotation");
        Keyring::init(dir.path(), &["demo/echo"], 1_000).expect("init");
        let loaded = Keyring::load(dir.path()).expect("load");
        Keyring::rotate_app(dir.path(), "demo/echo", 2_000).expect("rotate");
        // Mtimes old enough not to be racy (their ctimes are now: only the start's `None`
        // makes this look due).
        let old = SystemTime::now() - Duration::from_secs(10);
        for e in walk(dir.path()) {
            let _ = std::fs::File::open(&e).and_then(|f| f.set_modified(old));
        }
        let cfg = Config {
            keyring: Some(dir.path().to_path_buf()),
            ..Config::default()
        };
        let mut c = Control::new(Arc::new(cfg), loaded, Vec::new());
        let now = SystemTime::now();
        let (due, moved) =
            Control::keyring_due(c.keyring_mtime, keyring_mtime(&c.keyring_dir), now);
        assert!(due && moved, "the rotation would wait for a SIGHUP");
        assert!(c.reload_keys("test", moved));
        let keys = c.snapshots().keys.load();
        assert_eq!(
            keys.keyring.app_versions("demo/echo").map(<[_]>::len),
            Some(2)
        );
    }

    /// A key file's mode or owner fixed (`chmod`, `chown`: its ctime moves, its mtime does
    /// not) is a change of the keyring to look at: a file left unreadable by a rotation run
    /// as another user was refused, and the fix went unnoticed until a SIGHUP.
    #[test]
    fn a_key_files_mode_changed_moves_the_keyrings_time() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("control-ctime");
        Keyring::init(dir.path(), &["demo/echo"], 1_000).expect("init");
        let app = dir.path().join("apps").join("demo.echo.toml");
        let old = SystemTime::now() - Duration::from_secs(10);
        for e in walk(dir.path()) {
            let _ = std::fs::File::open(&e).and_then(|f| f.set_modified(old));
        }
        let before = keyring_mtime(dir.path()).expect("time");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(mtime(&app), Some(old), "chmod moved the mtime");
        let after = keyring_mtime(dir.path()).expect("time");
        assert!(after > before, "{after:?} <= {before:?}");
    }

    /// Every file under `dir`.
    fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn a_config_refused_for_unreadable_federation_keys_is_applied_once_they_are_readable() {
        let dir = TempDir::new("control-fed-keys");
        Keyring::init(dir.path(), &["demo/echo"], 1_000).expect("init");
        let path = dir.path().join("router.toml");
        let base = format!("keyring = {:?}\n", dir.path());
        std::fs::write(&path, &base).expect("write");
        let cfg = Config::load(&path).expect("load");
        let keyring = Keyring::load(dir.path()).expect("keyring");
        let mut c = Control::new(Arc::new(cfg), keyring, Vec::new());
        let snaps = c.snapshots();
        // A cluster whose keys directory does not exist yet (a mount not there, a copy still
        // to come): refused whole, counted once.
        let keys = dir.path().join("spb2-keys");
        let text = format!("{base}[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb2\"\nrouters = [\"127.0.0.1:9\"]\nkeys = {keys:?}\n");
        std::fs::write(&path, text).expect("write");
        c.reload_config("test");
        assert_eq!(snaps.reload_failed.load(Relaxed), 1);
        assert_eq!(snaps.fed.load().generation, 1);
        // Each poll tries again, silently while the error stays the same.
        c.retry_config_for_keys();
        c.retry_config_for_keys();
        assert_eq!(
            snaps.reload_failed.load(Relaxed),
            1,
            "counted at each retry"
        );
        assert!(!snaps.fed.load().knows("ru", "spb2"));
        // The directory appears: the next poll applies the file, with no SIGHUP and no new
        // write to the file itself.
        Keyring::init(&keys, &[], 1_000).expect("peer keys");
        c.retry_config_for_keys();
        let fed = snaps.fed.load();
        assert_eq!(fed.generation, 2);
        assert!(fed.knows("ru", "spb2"));
        assert_eq!(snaps.reload_failed.load(Relaxed), 1);
        assert!(c.config_waits_for_keys.is_none());
    }

    #[test]
    fn a_config_reload_applies_apps_and_refuses_a_broken_file() {
        let dir = TempDir::new("control-config");
        Keyring::init(dir.path(), &["demo/echo"], 1_000).expect("init");
        let path = dir.path().join("router.toml");
        let text = format!(
            "keyring = {:?}\n[[apps]]\nname = \"demo/echo\"\npartitions = 16\n",
            dir.path()
        );
        std::fs::write(&path, &text).expect("write");
        let cfg = Config::load(&path).expect("load");
        let keyring = Keyring::load(dir.path()).expect("keyring");
        let mut c = Control::new(Arc::new(cfg), keyring, Vec::new());
        let snaps = c.snapshots();
        // Broken: refused, counted, nothing published.
        std::fs::write(&path, "listen = 7").expect("write");
        c.reload_config("test");
        assert_eq!(snaps.reload_failed.load(Relaxed), 1);
        assert_eq!(snaps.apps.load().generation, 1);
        // The write that reload read is not loaded again by the mtime poll (one refusal per
        // write, whether a SIGHUP or the poll found it first).
        assert!(
            !c.config_file.changed(),
            "the same write would be loaded twice"
        );
        c.poll_config();
        assert_eq!(snaps.reload_failed.load(Relaxed), 1, "refused twice");
        // demo/echo shrinks to 8 partitions, o/new appears, written in the same clock tick as
        // the broken file (the mtime does not move): the poll still finds it, since the mtime
        // is recent.
        let broken_mtime = mtime(&path).expect("mtime");
        let edited = text.replace("16", "8") + "[[apps]]\nname = \"o/new\"\npartitions = 2\n";
        std::fs::write(&path, edited).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(broken_mtime))
            .expect("set mtime");
        assert!(!c.config_file.changed(), "mtime moved");
        assert!(c.config_file.changed_or_racy());
        c.poll_config();
        assert_eq!(snaps.apps.load().generation, 2);
        assert_eq!(snaps.apps.load().apps.len(), 2);
        let table = snaps.routes.load();
        assert_eq!(table.apps["demo/echo"].partitions, 8);
        assert_eq!(table.apps["o/new"].partitions, 2);
        drop(table);
        // Dev mode made the new app's secret, as at start.
        assert!(snaps
            .keys
            .load()
            .keyring
            .signing_app_secret("o/new")
            .is_some());
        // The same file again: nothing new is published.
        c.reload_config("test");
        assert_eq!(snaps.apps.load().generation, 2);
        assert_eq!(snaps.reload_failed.load(Relaxed), 1);
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
