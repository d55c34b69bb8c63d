//! The keyring: cluster public keys and app secrets, versioned, loaded from a directory.
//!
//! Layout of the directory (e.g. `./.fedbus/keys`):
//! ```text
//! cluster.toml              [[versions]] version, public (hex, 32 bytes), created (unix secs)
//! cluster-v<N>.pk8          private Ed25519 key (PKCS#8 v2, ring), mode 0600; read only by
//!                           signing tools (`cluster_signing_key`), never by the router
//! apps/<owner>.<app>.toml   [[versions]] version, secret (hex, 32 bytes), created; mode 0600
//! ```
//! Owns the rotation rule ([`check_version`]): the newest version signs; an older version
//! verifies until `created(next) + grace`; then it is retired. Files are written atomically
//! (temp file + rename) so a reloading router never reads half a file. Never prints secrets.
//!
//! Concurrent writers (several routers or CLIs starting on the same new directory) are safe:
//! a new keyring is built whole in a hidden temporary sibling directory and renamed into place,
//! so exactly one creator wins and the others discard theirs and use the winner's keys; every
//! change to an existing keyring (adding an app, rotating) holds an exclusive `flock` on
//! `<dir>/.keyring.lock` and re-reads under it, so a second writer of the same new app keeps the
//! first one's secret and concurrent rotations are never lost.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use super::AuthError;

/// Length in bytes of a freshly generated app secret.
const APP_SECRET_LEN: usize = 32;
const CLUSTER_FILE: &str = "cluster.toml";
const APPS_DIR: &str = "apps";
/// Lock file taken (exclusive `flock`) by every writer of an existing keyring.
const LOCK_FILE: &str = ".keyring.lock";

/// One version of the cluster key: only the public half (the router never holds the private one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeyVersion {
    /// Version number, > 0; service tokens name it in `kid`.
    pub version: u32,
    /// Ed25519 public key.
    pub public: [u8; 32],
    /// When this version was created (unix seconds); starts the grace of the version before it.
    pub created: u64,
}

/// One version of an app secret (HMAC key of the app's client JWTs).
#[derive(Clone, PartialEq, Eq)]
pub struct AppSecretVersion {
    /// Version number, > 0; client JWTs name it in the header's `kid`.
    pub version: u32,
    /// The HMAC key. Never printed: `Debug` redacts it.
    pub secret: Vec<u8>,
    /// When this version was created (unix seconds).
    pub created: u64,
}

impl fmt::Debug for AppSecretVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSecretVersion")
            .field("version", &self.version)
            .field("secret", &"<redacted>")
            .field("created", &self.created)
            .finish()
    }
}

/// A version of some key: what the rotation rule needs to know.
pub trait KeyVersion {
    /// The version number.
    fn version(&self) -> u32;
    /// When it was created (unix seconds).
    fn created(&self) -> u64;
}

impl KeyVersion for ClusterKeyVersion {
    fn version(&self) -> u32 {
        self.version
    }
    fn created(&self) -> u64 {
        self.created
    }
}

impl KeyVersion for AppSecretVersion {
    fn version(&self) -> u32 {
        self.version
    }
    fn created(&self) -> u64 {
        self.created
    }
}

/// Where a key version stands under the rotation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// The newest version: it signs and verifies.
    Newest,
    /// Replaced, but still verifies until `until` (exclusive).
    Grace {
        /// First second at which it no longer verifies.
        until: u64,
    },
    /// Replaced and its grace is over: refused.
    Retired,
    /// Not in the keyring: refused.
    Unknown,
}

impl VersionState {
    /// Until when (unix seconds, exclusive) a credential signed by this version verifies:
    /// `u64::MAX` for the newest, the end of its grace once replaced, 0 once retired or
    /// unknown. An open link holds this and is closed when the clock passes it.
    pub fn verifies_until(self) -> u64 {
        match self {
            VersionState::Newest => u64::MAX,
            VersionState::Grace { until } => until,
            VersionState::Retired | VersionState::Unknown => 0,
        }
    }
}

/// The rotation rule, one pure function for JWTs and service tokens alike.
///
/// `versions` must be sorted ascending by version (as [`Keyring::load`] leaves them). The newest
/// version is valid; an older version `v` is valid while `now < created(next) + grace_secs`,
/// where `next` is the version that replaced it; the grace counts from the replacement, not from
/// `v`'s own creation, so a long-lived version still gets the full grace after rotation.
pub fn check_version<V: KeyVersion>(
    versions: &[V],
    version: u32,
    now: u64,
    grace_secs: u64,
) -> VersionState {
    let Some(i) = versions.iter().position(|v| v.version() == version) else {
        return VersionState::Unknown;
    };
    match versions.get(i + 1) {
        None => VersionState::Newest,
        Some(next) => {
            let until = next.created().saturating_add(grace_secs);
            if now < until {
                VersionState::Grace { until }
            } else {
                VersionState::Retired
            }
        }
    }
}

/// The version a verifier may use, or the error the rotation rule gives.
pub fn usable_version<V: KeyVersion>(
    versions: &[V],
    version: u32,
    now: u64,
    grace_secs: u64,
) -> Result<&V, AuthError> {
    match check_version(versions, version, now, grace_secs) {
        VersionState::Unknown => Err(AuthError::UnknownKey(version)),
        VersionState::Retired => Err(AuthError::RetiredKey(version)),
        VersionState::Newest | VersionState::Grace { .. } => versions
            .iter()
            .find(|v| v.version() == version)
            .ok_or(AuthError::UnknownKey(version)),
    }
}

/// All keys a router verifies with: a snapshot, loaded from the key directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keyring {
    /// Cluster key versions (public halves), sorted ascending; never empty once loaded.
    pub cluster: Vec<ClusterKeyVersion>,
    /// App (`owner/app`) -> secret versions, sorted ascending, each list non-empty.
    pub apps: HashMap<String, Vec<AppSecretVersion>>,
}

// ---- on-disk format ----

#[derive(Serialize, Deserialize)]
struct ClusterFile {
    versions: Vec<ClusterEntry>,
}

#[derive(Serialize, Deserialize)]
struct ClusterEntry {
    version: u32,
    public: String,
    created: u64,
}

#[derive(Serialize, Deserialize)]
struct AppFile {
    versions: Vec<AppEntry>,
}

#[derive(Serialize, Deserialize)]
struct AppEntry {
    version: u32,
    secret: String,
    created: u64,
}

impl Keyring {
    /// Reads `cluster.toml` and `apps/*.toml` from `dir` and validates them: hex of the right
    /// length, versions unique and > 0, at least one cluster version. Errors name file and field.
    pub fn load(dir: &Path) -> Result<Keyring, AuthError> {
        let cluster = read_cluster(dir)?;
        let mut apps = HashMap::new();
        let apps_dir = dir.join(APPS_DIR);
        let entries = match fs::read_dir(&apps_dir) {
            Ok(e) => Some(e),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(AuthError::io(&apps_dir, e)),
        };
        for entry in entries.into_iter().flatten() {
            let entry = entry.map_err(|e| AuthError::io(&apps_dir, e))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Skip hidden files (our own temp files) and anything that is not `*.toml`.
            if name.starts_with('.') || !name.ends_with(".toml") {
                continue;
            }
            let app = app_from_file_name(name).ok_or_else(|| {
                AuthError::keyring(&path, "-", "file name must be <owner>.<app>.toml")
            })?;
            let versions = read_app_file(&path)?;
            apps.insert(app, versions);
        }
        Ok(Keyring { cluster, apps })
    }

    /// Creates `dir`, a cluster key v1 and a v1 secret for each app, where absent.
    /// Existing files are left untouched. Returns true if it created anything.
    ///
    /// Safe to race (threads or processes): a missing `dir` is built whole in a temporary
    /// sibling and renamed into place; a loser of that race discards its own keys and uses the
    /// winner's (and returns false unless it then added an app). An existing directory, empty
    /// or not, is filled in place under its lock file (it keeps its owner and mode).
    pub fn init(dir: &Path, apps: &[&str], now: u64) -> Result<bool, AuthError> {
        for app in apps {
            validate_app_name(app)?;
        }
        // A directory that is absent is built beside and renamed into place (readers never see
        // half of it). One that exists, even empty, is the operator's (its owner, mode, ACLs,
        // a mount point; its parent perhaps not writable): filled in place, under the lock.
        if dir_absent(dir) && create_fresh(dir, apps, now)? {
            return Ok(true);
        }
        // Complete already: no lock, no write (the directory may be read-only to a router).
        if dir.join(CLUSTER_FILE).exists()
            && apps
                .iter()
                .all(|app| app_path(dir, app).is_ok_and(|p| p.exists()))
        {
            return Ok(false);
        }
        let _lock = lock_dir(dir)?;
        init_in_place(dir, apps, now)
    }

    /// Adds a v1 secret for each app that has none (and the cluster key if absent).
    pub fn ensure_apps(dir: &Path, apps: &[&str], now: u64) -> Result<(), AuthError> {
        Self::init(dir, apps, now).map(|_| ())
    }

    /// Appends version n+1 with a fresh secret to the app's file (v1 if it has none).
    /// Returns the new version. Routers pick it up on their next reload.
    pub fn rotate_app(dir: &Path, app: &str, now: u64) -> Result<u32, AuthError> {
        let path = app_path(dir, app)?;
        let _lock = lock_dir(dir)?;
        rotate_app_file(dir, &path, now)
    }

    /// Creates cluster key version n+1: writes `cluster-v{n+1}.pk8`, then appends its public
    /// half to `cluster.toml`. Returns the new version.
    pub fn rotate_cluster(dir: &Path, now: u64) -> Result<u32, AuthError> {
        // No keyring directory: nothing to lock, and reading cluster.toml names the problem.
        let _lock = if dir.is_dir() {
            Some(lock_dir(dir)?)
        } else {
            None
        };
        rotate_cluster_in_place(dir, now)
    }

    /// The newest secret of `app`: the one that signs its client JWTs.
    pub fn signing_app_secret(&self, app: &str) -> Option<&AppSecretVersion> {
        self.apps.get(app).and_then(|v| v.last())
    }

    /// The secret of `app` an Auth Service should sign with at `now` when a new version may be
    /// used only `delay` seconds after its creation (`auth.secret_publish_delay_secs`: the
    /// time every router of the cluster needs to load it): the newest version at least that
    /// old, or the oldest one when none is (a keyring whose only version is new). With `delay`
    /// 0, [`Keyring::signing_app_secret`].
    pub fn published_app_secret(
        &self,
        app: &str,
        now: u64,
        delay: u64,
    ) -> Option<&AppSecretVersion> {
        if delay == 0 {
            // A version `created` in the future (the clock of the host that rotated) is
            // pushed at once, as it always was.
            return self.signing_app_secret(app);
        }
        let versions = self.apps.get(app)?;
        versions
            .iter()
            .rev()
            .find(|v| v.created.saturating_add(delay) <= now)
            .or(versions.first())
    }

    /// All secret versions of `app`, ascending.
    pub fn app_versions(&self, app: &str) -> Option<&[AppSecretVersion]> {
        self.apps.get(app).map(Vec::as_slice)
    }

    /// The newest cluster private key from disk, for signing tools (never the router).
    /// Checks that it matches the public half in `cluster.toml`.
    pub fn cluster_signing_key(dir: &Path) -> Result<(u32, Ed25519KeyPair), AuthError> {
        let cluster = read_cluster(dir)?;
        let newest = cluster
            .last()
            .ok_or_else(|| AuthError::keyring(dir.join(CLUSTER_FILE), "versions", "empty"))?;
        let path = dir.join(pk8_name(newest.version));
        let der = fs::read(&path).map_err(|e| AuthError::io(&path, e))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| {
            AuthError::keyring(&path, "-", format!("not an Ed25519 PKCS#8 key: {e}"))
        })?;
        if pair.public_key().as_ref() != newest.public.as_slice() {
            return Err(AuthError::keyring(
                &path,
                "-",
                format!("does not match cluster.toml version {}", newest.version),
            ));
        }
        Ok((newest.version, pair))
    }

    /// Human-readable summary for `fedbus keys show`: versions, created times, public keys.
    /// Never includes a secret.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "cluster key:");
        for (i, v) in self.cluster.iter().enumerate() {
            let mark = if i + 1 == self.cluster.len() {
                " (signing)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  v{} created {} public {}{}",
                v.version,
                v.created,
                hex_encode(&v.public),
                mark
            );
        }
        let mut names: Vec<&String> = self.apps.keys().collect();
        names.sort();
        for name in names {
            let _ = writeln!(out, "app {name}:");
            let versions = &self.apps[name];
            for (i, v) in versions.iter().enumerate() {
                let mark = if i + 1 == versions.len() {
                    " (signing)"
                } else {
                    ""
                };
                let _ = writeln!(out, "  v{} created {}{}", v.version, v.created, mark);
            }
        }
        out
    }
}

/// The in-place part of [`Keyring::init`] (under the lock, or in a fresh temporary
/// directory): creates what is still missing.
fn init_in_place(dir: &Path, apps: &[&str], now: u64) -> Result<bool, AuthError> {
    let mut created = false;
    let cluster_path = dir.join(CLUSTER_FILE);
    if !cluster_path.exists() {
        let pk8_path = dir.join(pk8_name(1));
        let pair = if pk8_path.exists() {
            // A private key without its public file: derive the public half, keep the key.
            let der = fs::read(&pk8_path).map_err(|e| AuthError::io(&pk8_path, e))?;
            Ed25519KeyPair::from_pkcs8(&der)
                .map_err(|e| AuthError::keyring(&pk8_path, "-", e.to_string()))?
        } else {
            let (pair, der) = generate_cluster_key(&pk8_path)?;
            write_atomic(&pk8_path, &der, 0o600)?;
            pair
        };
        let file = ClusterFile {
            versions: vec![ClusterEntry {
                version: 1,
                public: hex_encode(pair.public_key().as_ref()),
                created: now,
            }],
        };
        write_toml(&cluster_path, &file, 0o644)?;
        created = true;
    }
    for app in apps {
        let path = app_path(dir, app)?;
        if !path.exists() {
            rotate_app_file(dir, &path, now)?;
            created = true;
        }
    }
    Ok(created)
}

/// [`Keyring::rotate_cluster`] once locked.
fn rotate_cluster_in_place(dir: &Path, now: u64) -> Result<u32, AuthError> {
    let cluster_path = dir.join(CLUSTER_FILE);
    let current = read_cluster(dir)?;
    let next = next_version(&cluster_path, current.iter().map(|v| v.version))?;
    let pk8_path = dir.join(pk8_name(next));
    let (pair, der) = generate_cluster_key(&pk8_path)?;
    write_atomic(&pk8_path, &der, 0o600)?;
    let mut versions: Vec<ClusterEntry> = current
        .iter()
        .map(|v| ClusterEntry {
            version: v.version,
            public: hex_encode(&v.public),
            created: v.created,
        })
        .collect();
    versions.push(ClusterEntry {
        version: next,
        public: hex_encode(pair.public_key().as_ref()),
        created: now,
    });
    write_toml(&cluster_path, &ClusterFile { versions }, 0o644)?;
    Ok(next)
}

/// Whether `dir` does not exist: then a whole new keyring may be renamed into its place.
fn dir_absent(dir: &Path) -> bool {
    fs::symlink_metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// A hidden name for a temporary file or directory beside `name`: the process id and a
/// counter, and 64 random bits, since two containers sharing a keyring volume may both run as
/// pid 1 (a name taken is an error: files are made with `create_new`).
fn temp_name(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut r = [0u8; 8];
    // Without randomness (never on Linux) the pid and counter are the name, as before.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let r = u64::from_le_bytes(r);
    format!(".{name}.tmp{}-{n}-{r:016x}", std::process::id())
}

/// Builds a complete keyring (cluster key v1 and a v1 secret per app) in a temporary sibling
/// of `dir` and renames it to `dir`. Returns false, having removed its own copy, when another
/// writer got there first (`dir` is no longer empty).
fn create_fresh(dir: &Path, apps: &[&str], now: u64) -> Result<bool, AuthError> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| AuthError::keyring(dir, "-", "bad directory name"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| AuthError::io(parent, e))?;
    let tmp = parent.join(temp_name(name));
    if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&tmp) {
        // Another writer made `dir` meanwhile: the locked in-place path.
        return match dir.is_dir() {
            true => Ok(false),
            false => Err(AuthError::io(&tmp, e)),
        };
    }
    if let Err(e) = init_in_place(&tmp, apps, now) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp.join(APPS_DIR));
    sync_dir(&tmp);
    match fs::rename(&tmp, dir) {
        Ok(()) => {
            sync_dir(parent);
            Ok(true)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            // Lost the race: `dir` now holds another writer's keyring. Any other failure while
            // `dir` is a directory (a mount point, say) falls back to the locked in-place path.
            if e.kind() == std::io::ErrorKind::DirectoryNotEmpty
                || e.kind() == std::io::ErrorKind::AlreadyExists
                || dir.is_dir()
            {
                Ok(false)
            } else {
                Err(AuthError::io(dir, e))
            }
        }
    }
}

/// Exclusive lock on the keyring directory (created if absent), released when the returned
/// file is dropped. `flock` locks an open file description, so it serializes threads of one
/// process as well as processes.
fn lock_dir(dir: &Path) -> Result<fs::File, AuthError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| AuthError::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    // Read-write (made if absent, readable to all: it holds nothing); a lock file another
    // user made (a `keys rotate` run under sudo) is opened read-only instead, which flock
    // allows on a local filesystem (NFS's emulation of flock needs write access: there the
    // owner's runs keep working).
    let rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path);
    let f = match rw {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            fs::File::open(&path).map_err(|_| AuthError::io(&path, e))?
        }
        Err(e) => return Err(AuthError::io(&path, e)),
    };
    f.lock().map_err(|e| AuthError::io(&path, e))?;
    Ok(f)
}

/// fsync of a directory, best effort: makes renames in it durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Checks `owner/app`: two non-empty parts of `[A-Za-z0-9_-]`.
pub fn validate_app_name(app: &str) -> Result<(), AuthError> {
    let ok = app
        .split_once('/')
        .is_some_and(|(owner, name)| is_name_part(owner) && is_name_part(name));
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadAppName(app.to_owned()))
    }
}

/// One part of a name (an app's owner or name, a region, a cluster, a router): non-empty
/// `[A-Za-z0-9_-]`. The config and the CLI check their names with it too.
pub fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn app_path(dir: &Path, app: &str) -> Result<PathBuf, AuthError> {
    validate_app_name(app)?;
    Ok(dir
        .join(APPS_DIR)
        .join(format!("{}.toml", app.replace('/', "."))))
}

fn app_from_file_name(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".toml")?;
    let (owner, app) = stem.split_once('.')?;
    (is_name_part(owner) && is_name_part(app)).then(|| format!("{owner}/{app}"))
}

fn pk8_name(version: u32) -> String {
    format!("cluster-v{version}.pk8")
}

fn generate_cluster_key(path: &Path) -> Result<(Ed25519KeyPair, Vec<u8>), AuthError> {
    let rng = SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| AuthError::keyring(path, "-", "random generator failed"))?;
    let der = doc.as_ref().to_vec();
    let pair = Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|e| AuthError::keyring(path, "-", e.to_string()))?;
    Ok((pair, der))
}

fn next_version(file: &Path, versions: impl Iterator<Item = u32>) -> Result<u32, AuthError> {
    versions
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| AuthError::keyring(file, "versions", "version number overflow"))
}

fn rotate_app_file(dir: &Path, path: &Path, now: u64) -> Result<u32, AuthError> {
    let mut versions = if path.exists() {
        read_app_file(path)?
    } else {
        Vec::new()
    };
    let next = next_version(path, versions.iter().map(|v| v.version))?;
    let mut secret = vec![0u8; APP_SECRET_LEN];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| AuthError::keyring(path, "-", "random generator failed"))?;
    versions.push(AppSecretVersion {
        version: next,
        secret,
        created: now,
    });
    let apps_dir = dir.join(APPS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&apps_dir)
        .map_err(|e| AuthError::io(&apps_dir, e))?;
    let file = AppFile {
        versions: versions
            .iter()
            .map(|v| AppEntry {
                version: v.version,
                secret: hex_encode(&v.secret),
                created: v.created,
            })
            .collect(),
    };
    write_toml(path, &file, 0o600)?;
    Ok(next)
}

/// Public cluster key versions from `dir/cluster.toml`: another cluster's keys, for peer links.
pub fn read_cluster_keys(dir: &Path) -> Result<Vec<ClusterKeyVersion>, AuthError> {
    read_cluster(dir)
}

fn read_cluster(dir: &Path) -> Result<Vec<ClusterKeyVersion>, AuthError> {
    let path = dir.join(CLUSTER_FILE);
    let text = fs::read_to_string(&path).map_err(|e| AuthError::io(&path, e))?;
    let file: ClusterFile =
        toml::from_str(&text).map_err(|e| AuthError::keyring(&path, "-", e.to_string()))?;
    let mut out = Vec::with_capacity(file.versions.len());
    for (i, e) in file.versions.iter().enumerate() {
        let bytes = hex_decode(&e.public)
            .ok_or_else(|| AuthError::keyring(&path, format!("versions[{i}].public"), "not hex"))?;
        let public: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            AuthError::keyring(
                &path,
                format!("versions[{i}].public"),
                "must be 32 bytes (64 hex digits)",
            )
        })?;
        out.push(ClusterKeyVersion {
            version: e.version,
            public,
            created: e.created,
        });
    }
    if out.is_empty() {
        return Err(AuthError::keyring(
            &path,
            "versions",
            "no cluster key version",
        ));
    }
    sort_and_check(&path, &mut out)?;
    Ok(out)
}

fn read_app_file(path: &Path) -> Result<Vec<AppSecretVersion>, AuthError> {
    let text = fs::read_to_string(path).map_err(|e| AuthError::io(path, e))?;
    let file: AppFile =
        toml::from_str(&text).map_err(|e| AuthError::keyring(path, "-", e.to_string()))?;
    let mut out = Vec::with_capacity(file.versions.len());
    for (i, e) in file.versions.iter().enumerate() {
        let secret = hex_decode(&e.secret)
            .ok_or_else(|| AuthError::keyring(path, format!("versions[{i}].secret"), "not hex"))?;
        if secret.len() != APP_SECRET_LEN {
            return Err(AuthError::keyring(
                path,
                format!("versions[{i}].secret"),
                "must be 32 bytes (64 hex digits)",
            ));
        }
        out.push(AppSecretVersion {
            version: e.version,
            secret,
            created: e.created,
        });
    }
    if out.is_empty() {
        return Err(AuthError::keyring(path, "versions", "no secret version"));
    }
    sort_and_check(path, &mut out)?;
    Ok(out)
}

fn sort_and_check<V: KeyVersion>(path: &Path, versions: &mut [V]) -> Result<(), AuthError> {
    versions.sort_by_key(|v| v.version());
    if versions.first().is_some_and(|v| v.version() == 0) {
        return Err(AuthError::keyring(
            path,
            "versions[].version",
            "must be > 0",
        ));
    }
    for w in versions.windows(2) {
        if w[0].version() == w[1].version() {
            return Err(AuthError::keyring(
                path,
                "versions[].version",
                format!("version {} appears twice", w[0].version()),
            ));
        }
    }
    Ok(())
}

fn write_toml<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), AuthError> {
    let text = toml::to_string(value).map_err(|e| AuthError::keyring(path, "-", e.to_string()))?;
    write_atomic(path, text.as_bytes(), mode)
}

/// Writes a temp file beside `path` with `mode`, syncs it, and renames it over `path`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AuthError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| AuthError::keyring(path, "-", "bad file name"))?;
    let tmp = dir.join(temp_name(name));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename durable; failure to sync a directory is not worth failing for.
        sync_dir(dir);
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        AuthError::io(path, e)
    })
}

pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

pub(crate) fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.trim().as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn v(version: u32, created: u64) -> AppSecretVersion {
        AppSecretVersion {
            version,
            secret: vec![version as u8; 32],
            created,
        }
    }

    /// A new version is published for signing only once it is `delay` seconds old; until then
    /// the newest older one signs, and a keyring with only a new version signs with it.
    #[test]
    fn a_new_app_secret_is_published_after_the_delay() {
        let k = Keyring {
            cluster: Vec::new(),
            apps: [
                ("a/b".to_string(), vec![v(1, 100), v(2, 1000), v(3, 2000)]),
                ("c/d".to_string(), vec![v(1, 5000)]),
            ]
            .into_iter()
            .collect(),
        };
        let at = |app, now, delay| k.published_app_secret(app, now, delay).map(|s| s.version);
        assert_eq!(at("a/b", 2000, 0), Some(3));
        assert_eq!(at("a/b", 2059, 60), Some(2));
        assert_eq!(at("a/b", 2060, 60), Some(3));
        assert_eq!(at("a/b", 1059, 60), Some(1));
        assert_eq!(at("a/b", 0, 60), Some(1), "none old enough: the oldest");
        assert_eq!(at("c/d", 5001, 60), Some(1), "the only version");
        assert_eq!(at("c/d", 5001, u64::MAX), Some(1));
        assert_eq!(at("x/y", 5001, 0), None);
    }

    #[test]
    fn rotation_rule_newest_grace_retired_unknown() {
        let vs = [v(1, 100), v(2, 1000), v(3, 2000)];
        let grace = 500;
        assert_eq!(check_version(&vs, 3, 5000, grace), VersionState::Newest);
        assert_eq!(
            check_version(&vs, 2, 2499, grace),
            VersionState::Grace { until: 2500 }
        );
        assert_eq!(check_version(&vs, 2, 2500, grace), VersionState::Retired);
        // v1's grace counts from v2's creation, even while v2 itself is still in grace.
        assert_eq!(
            check_version(&vs, 1, 1499, grace),
            VersionState::Grace { until: 1500 }
        );
        assert_eq!(check_version(&vs, 1, 1500, grace), VersionState::Retired);
        assert_eq!(check_version(&vs, 9, 0, grace), VersionState::Unknown);
        assert_eq!(check_version(&vs, 0, 0, grace), VersionState::Unknown);
        let empty: [AppSecretVersion; 0] = [];
        assert_eq!(check_version(&empty, 1, 0, grace), VersionState::Unknown);
    }

    #[test]
    fn rotation_grace_counts_from_replacement_not_own_creation() {
        // v1 is old, but was replaced only recently: it keeps its full grace.
        let vs = [v(1, 0), v(2, 10_000)];
        assert!(matches!(
            check_version(&vs, 1, 10_050, 100),
            VersionState::Grace { until: 10_100 }
        ));
        assert_eq!(check_version(&vs, 1, 10_100, 100), VersionState::Retired);
        // A huge grace does not overflow.
        assert!(matches!(
            check_version(&vs, 1, u64::MAX - 1, u64::MAX),
            VersionState::Grace { until: u64::MAX }
        ));
    }

    #[test]
    fn usable_version_maps_states_to_errors() {
        let vs = [v(1, 0), v(2, 1000)];
        assert_eq!(
            usable_version(&vs, 2, 5000, 10).map(|k| k.version).ok(),
            Some(2)
        );
        assert_eq!(
            usable_version(&vs, 1, 1005, 10).map(|k| k.version).ok(),
            Some(1)
        );
        assert!(matches!(
            usable_version(&vs, 1, 1010, 10),
            Err(AuthError::RetiredKey(1))
        ));
        assert!(matches!(
            usable_version(&vs, 7, 0, 10),
            Err(AuthError::UnknownKey(7))
        ));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[test]
    fn keyring_init_load_rotate() {
        let tmp = TempDir::new("init");
        let dir = tmp.path().join("keys");
        assert!(Keyring::init(&dir, &["acme/shop", "acme/blog"], 1000).unwrap());
        assert!(!Keyring::init(&dir, &["acme/shop"], 2000).unwrap());
        assert_eq!(mode(&dir.join("cluster-v1.pk8")), 0o600);
        assert_eq!(mode(&dir.join("apps/acme.shop.toml")), 0o600);

        let k = Keyring::load(&dir).unwrap();
        assert_eq!(k.cluster.len(), 1);
        assert_eq!(k.cluster[0].version, 1);
        assert_eq!(k.cluster[0].created, 1000);
        assert_eq!(k.apps.len(), 2);
        let shop_v1 = k.signing_app_secret("acme/shop").unwrap().clone();
        assert_eq!(shop_v1.version, 1);
        assert_eq!(shop_v1.secret.len(), 32);
        assert_ne!(
            shop_v1.secret,
            k.signing_app_secret("acme/blog").unwrap().secret
        );

        // Existing files untouched; a new app gets its v1.
        Keyring::ensure_apps(&dir, &["acme/shop", "other/app"], 3000).unwrap();
        let k = Keyring::load(&dir).unwrap();
        assert_eq!(k.signing_app_secret("acme/shop"), Some(&shop_v1));
        assert_eq!(k.signing_app_secret("other/app").unwrap().created, 3000);

        assert_eq!(Keyring::rotate_app(&dir, "acme/shop", 4000).unwrap(), 2);
        assert_eq!(Keyring::rotate_app(&dir, "acme/shop", 5000).unwrap(), 3);
        let k = Keyring::load(&dir).unwrap();
        let shop = k.app_versions("acme/shop").unwrap();
        assert_eq!(
            shop.iter()
                .map(|v| (v.version, v.created))
                .collect::<Vec<_>>(),
            vec![(1, 1000), (2, 4000), (3, 5000)]
        );
        assert_eq!(shop[0], shop_v1);
        assert_eq!(k.signing_app_secret("acme/shop").unwrap().version, 3);
        assert_eq!(mode(&dir.join("apps/acme.shop.toml")), 0o600);

        let (ver, pair) = Keyring::cluster_signing_key(&dir).unwrap();
        assert_eq!(ver, 1);
        assert_eq!(pair.public_key().as_ref(), &k.cluster[0].public);
        assert_eq!(Keyring::rotate_cluster(&dir, 6000).unwrap(), 2);
        assert_eq!(mode(&dir.join("cluster-v2.pk8")), 0o600);
        let k = Keyring::load(&dir).unwrap();
        assert_eq!(k.cluster.len(), 2);
        assert_eq!(k.cluster[1].created, 6000);
        let (ver, pair) = Keyring::cluster_signing_key(&dir).unwrap();
        assert_eq!(ver, 2);
        assert_eq!(pair.public_key().as_ref(), &k.cluster[1].public);
        assert_ne!(k.cluster[0].public, k.cluster[1].public);

        // No temp files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.join("apps"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn keyring_describe_never_prints_secrets() {
        let tmp = TempDir::new("describe");
        Keyring::init(tmp.path(), &["acme/shop"], 42).unwrap();
        let k = Keyring::load(tmp.path()).unwrap();
        let text = k.describe();
        assert!(text.contains("acme/shop"));
        assert!(text.contains(&hex_encode(&k.cluster[0].public)));
        assert!(text.contains("created 42"));
        let secret = &k.apps["acme/shop"][0].secret;
        assert!(!text.contains(&hex_encode(secret)));
        assert!(!format!("{k:?}").contains(&hex_encode(secret)));
        assert!(!format!("{:?}", k.apps["acme/shop"][0]).contains(&format!("{secret:?}")));
    }

    fn load_err(dir: &Path) -> String {
        match Keyring::load(dir) {
            Ok(_) => panic!("load accepted a bad keyring in {}", dir.display()),
            Err(e) => {
                assert_eq!(e.http_status(), 500);
                e.to_string()
            }
        }
    }

    #[test]
    fn keyring_corrupted_files_name_file_and_field() {
        let tmp = TempDir::new("corrupt");
        let dir = tmp.path();
        Keyring::init(dir, &["acme/shop"], 1).unwrap();
        let cluster = dir.join("cluster.toml");
        let good_cluster = fs::read_to_string(&cluster).unwrap();

        fs::write(&cluster, "this is = = not toml").unwrap();
        assert!(load_err(dir).contains("cluster.toml"));

        fs::write(
            &cluster,
            "[[versions]]\nversion = 1\npublic = \"abcd\"\ncreated = 1\n",
        )
        .unwrap();
        let e = load_err(dir);
        assert!(
            e.contains("cluster.toml") && e.contains("versions[0].public"),
            "{e}"
        );

        fs::write(
            &cluster,
            "[[versions]]\nversion = 1\npublic = \"zz\"\ncreated = 1\n",
        )
        .unwrap();
        assert!(load_err(dir).contains("versions[0].public"));

        fs::write(&cluster, "versions = []\n").unwrap();
        assert!(load_err(dir).contains("cluster.toml"));

        let pk = hex_encode(&[7u8; 32]);
        fs::write(
            &cluster,
            format!("[[versions]]\nversion = 0\npublic = \"{pk}\"\ncreated = 1\n"),
        )
        .unwrap();
        assert!(load_err(dir).contains("> 0"));

        fs::write(&cluster, good_cluster.clone() + &good_cluster).unwrap();
        assert!(load_err(dir).contains("cluster.toml"));

        fs::remove_file(&cluster).unwrap();
        assert!(load_err(dir).contains("cluster.toml"));
        fs::write(&cluster, &good_cluster).unwrap();
        assert!(Keyring::load(dir).is_ok());

        let app = dir.join("apps/acme.shop.toml");
        fs::write(
            &app,
            "[[versions]]\nversion = 1\nsecret = \"00ff\"\ncreated = 1\n",
        )
        .unwrap();
        let e = load_err(dir);
        assert!(
            e.contains("acme.shop.toml") && e.contains("versions[0].secret"),
            "{e}"
        );
        fs::write(&app, [0xffu8, 0xfe, 0x00]).unwrap();
        assert!(load_err(dir).contains("acme.shop.toml"));
        fs::remove_file(&app).unwrap();

        fs::write(dir.join("apps/noapp.toml"), "").unwrap();
        assert!(load_err(dir).contains("noapp.toml"));
        fs::remove_file(dir.join("apps/noapp.toml")).unwrap();
        // Editor backups and hidden temp files are ignored.
        fs::write(dir.join("apps/.acme.shop.toml.tmp1"), "junk").unwrap();
        fs::write(dir.join("apps/acme.shop.toml~"), "junk").unwrap();
        assert!(Keyring::load(dir).is_ok());
    }

    #[test]
    fn keyring_signing_key_must_match_public() {
        let tmp = TempDir::new("mismatch");
        let dir = tmp.path();
        Keyring::init(dir, &[], 1).unwrap();
        let other = TempDir::new("mismatch-other");
        Keyring::init(other.path(), &[], 1).unwrap();
        fs::copy(
            other.path().join("cluster-v1.pk8"),
            dir.join("cluster-v1.pk8"),
        )
        .unwrap();
        let e = Keyring::cluster_signing_key(dir)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("cluster-v1.pk8")));
        fs::write(dir.join("cluster-v1.pk8"), b"garbage").unwrap();
        assert!(Keyring::cluster_signing_key(dir).is_err());
    }

    /// What a writer ended up with: the cluster public key, the private key's public half, and
    /// each app's secrets.
    type Seen = ([u8; 32], Vec<u8>, Vec<(String, Vec<Vec<u8>>)>);

    fn seen(dir: &Path) -> Seen {
        let k = Keyring::load(dir).unwrap_or_else(|e| panic!("load after init: {e}"));
        let (_, pair) = Keyring::cluster_signing_key(dir).unwrap_or_else(|e| panic!("{e}"));
        let mut apps: Vec<_> = k
            .apps
            .iter()
            .map(|(a, v)| (a.clone(), v.iter().map(|s| s.secret.clone()).collect()))
            .collect();
        apps.sort();
        (
            k.cluster[0].public,
            pair.public_key().as_ref().to_vec(),
            apps,
        )
    }

    /// 8 threads initialize the same fresh directory at once, 20 rounds: one creates, all
    /// see the same keys, the private key matches cluster.toml, no temp dirs are left.
    #[test]
    fn keyring_init_race_threads_agree() {
        const THREADS: usize = 8;
        let apps = ["acme/shop", "acme/blog"];
        for round in 0..20 {
            let tmp = TempDir::new("race");
            // Odd rounds: the directory already exists, empty (as a config tool might leave it).
            let dir = tmp.path().join("keys");
            if round % 2 == 1 {
                fs::create_dir_all(&dir).unwrap();
            }
            let barrier = std::sync::Barrier::new(THREADS);
            let results: Vec<(bool, Seen)> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..THREADS)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            let created = Keyring::init(&dir, &apps, 1000).unwrap();
                            (created, seen(&dir))
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let creators = results.iter().filter(|(c, _)| *c).count();
            assert_eq!(creators, 1, "round {round}: {creators} threads created");
            let first = &results[0].1;
            assert_eq!(
                first.0.as_slice(),
                first.1.as_slice(),
                "pk8 matches cluster.toml"
            );
            assert_eq!(first.2.len(), 2);
            for (_, r) in &results {
                assert_eq!(r, first, "round {round}: threads saw different keys");
            }
            assert_eq!(seen(&dir), *first);
            let leftovers: Vec<_> = fs::read_dir(tmp.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n != "keys")
                .collect();
            assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
            // A directory the keyring made is 0700; one that was there keeps its mode.
            if round % 2 == 0 {
                assert_eq!(mode(&dir), 0o700);
            }
            assert_eq!(mode(&dir.join("cluster-v1.pk8")), 0o600);
            assert_eq!(mode(&dir.join("apps/acme.shop.toml")), 0o600);
        }
    }

    /// Adding the same new app from 8 threads keeps one secret; 8 concurrent rotations give 8
    /// distinct new versions (none lost).
    #[test]
    fn keyring_concurrent_add_and_rotate_lose_nothing() {
        const THREADS: usize = 8;
        let tmp = TempDir::new("race-add");
        let dir = tmp.path();
        Keyring::init(dir, &["acme/shop"], 1).unwrap();
        let barrier = std::sync::Barrier::new(THREADS);
        let results: Vec<(bool, Seen)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let created = Keyring::init(dir, &["acme/shop", "new/app"], 2).unwrap();
                        (created, seen(dir))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|(c, _)| *c).count(), 1);
        for (_, r) in &results {
            assert_eq!(r, &results[0].1);
        }
        let mut versions: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..THREADS)
                .map(|_| s.spawn(|| Keyring::rotate_app(dir, "new/app", 3).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        versions.sort();
        assert_eq!(versions, (2..=THREADS as u32 + 1).collect::<Vec<_>>());
        let k = Keyring::load(dir).unwrap();
        assert_eq!(k.app_versions("new/app").unwrap().len(), THREADS + 1);
        assert_eq!(
            k.app_versions("new/app").unwrap()[0].secret,
            results[0].1 .2[1].1[0]
        );
        // Rotating the cluster key concurrently also loses nothing.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| Keyring::rotate_cluster(dir, 4).unwrap());
            }
        });
        assert_eq!(Keyring::load(dir).unwrap().cluster.len(), 5);
        assert_eq!(Keyring::cluster_signing_key(dir).unwrap().0, 5);
    }

    /// Environment variable that turns [`keyring_init_race_child`] into a worker.
    const CHILD_DIR: &str = "FEDBUS_AUTH_KEYRING_RACE_DIR";

    /// Not a test on its own: run by [`keyring_init_race_processes`] as a child process with
    /// `CHILD_DIR` set; initializes that directory and prints the cluster public key.
    #[test]
    fn keyring_init_race_child() {
        let Some(dir) = std::env::var_os(CHILD_DIR) else {
            return;
        };
        let dir = PathBuf::from(dir);
        Keyring::init(&dir, &["acme/shop"], 1000).unwrap();
        let (pk, pair_pk, _) = seen(&dir);
        assert_eq!(pk.as_slice(), pair_pk.as_slice());
        println!("cluster-public={}", hex_encode(&pk));
    }

    /// Two processes (this test binary, run as [`keyring_init_race_child`]) initialize the same
    /// fresh directory at once, and this one joins in too: all agree on the cluster key.
    #[test]
    fn keyring_init_race_processes() {
        let exe = std::env::current_exe().unwrap();
        for _ in 0..5 {
            let tmp = TempDir::new("race-proc");
            let dir = tmp.path().join("keys");
            let children: Vec<_> = (0..2)
                .map(|_| {
                    std::process::Command::new(&exe)
                        .args([
                            "--exact",
                            "keyring::tests::keyring_init_race_child",
                            "--nocapture",
                            "--test-threads=1",
                        ])
                        .env(CHILD_DIR, &dir)
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            Keyring::init(&dir, &["acme/shop"], 1000).unwrap();
            let mine = seen(&dir);
            for c in children {
                let out = c.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "child failed: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let expect = format!("cluster-public={}", hex_encode(&mine.0));
                assert!(stdout.contains(&expect), "child saw other keys: {stdout}");
            }
            assert_eq!(seen(&dir), mine);
        }
    }

    /// An empty keyring directory made beforehand (by an operator, a volume mount) is filled
    /// where it is: before, a keyring built beside it was renamed over it, so the directory
    /// lost its owner, mode and ACLs, and a parent the user may not write failed the init.
    #[test]
    fn keyring_init_fills_an_existing_empty_directory_in_place() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = TempDir::new("in-place");
        let dir = tmp.path().join("keys");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        let before = fs::metadata(&dir).unwrap();
        assert!(Keyring::init(&dir, &["acme/shop"], 1).unwrap());
        let after = fs::metadata(&dir).unwrap();
        assert_eq!(after.ino(), before.ino(), "the directory was replaced");
        assert_eq!(after.mode() & 0o777, 0o750);
        let k = Keyring::load(&dir).unwrap();
        assert!(k.signing_app_secret("acme/shop").is_some());
    }

    #[test]
    fn keyring_init_on_complete_read_only_dir_writes_nothing() {
        let tmp = TempDir::new("ro");
        let dir = tmp.path();
        Keyring::init(dir, &["acme/shop"], 1).unwrap();
        let before: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!Keyring::init(dir, &["acme/shop"], 2).unwrap());
        let after: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            before, after,
            "a complete keyring is not touched (no lock file either)"
        );
    }

    #[test]
    fn app_names_are_validated() {
        for good in ["acme/shop", "a-b/c_d", "A1/z9"] {
            assert!(validate_app_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "a", "a/", "/b", "a/b/c", "a.b/c", "a/b c", "../x", "a/..", "é/b", "a/b\n",
        ] {
            assert!(
                matches!(validate_app_name(bad), Err(AuthError::BadAppName(_))),
                "{bad:?}"
            );
        }
        let tmp = TempDir::new("badname");
        assert!(Keyring::init(tmp.path(), &["../etc"], 1).is_err());
        assert!(!tmp.path().exists());
        assert!(Keyring::rotate_app(tmp.path(), "a/../b", 1).is_err());
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)), Some(bytes));
        assert_eq!(hex_decode("ABcd"), Some(vec![0xab, 0xcd]));
        for bad in ["a", "zz", "0g", "é1"] {
            assert_eq!(hex_decode(bad), None, "{bad}");
        }
    }
}
