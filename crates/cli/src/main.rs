//! The `fedbus` command: run (the router), task (built-in example tasks), token and keys
//! (credentials), bench (the load generator), tune (host checks).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use fedbus_auth::{self as auth, Keyring};
use fedbus_router::config::{self, Config};
use std::path::{Path, PathBuf};

/// Start of the one machine-readable line `fedbus run` prints when it is up: this prefix, then
/// a JSON object with `router`, `api`, `api_tls`, `internal` (per shard), `internal_unix` (per
/// shard, `unix:<path>`; empty without `listen.internal_unix`), `external`, `admin`,
/// `shards`, `shard_cores`.
const READY_PREFIX: &str = "fedbus-ready ";

mod task;

#[derive(Parser)]
#[command(
    name = "fedbus",
    version,
    about = "A federation bus: thread-per-core io_uring router between clients and service tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the router (embedded dev defaults without --config).
    Run {
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Bind beside a router already running on the same addresses (`listen.takeover`):
        /// start this one, wait for its ready line, then SIGTERM the old one.
        #[arg(long)]
        takeover: bool,
    },
    /// Run a built-in example task.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Mint tokens (signed with the keyring's newest versions).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage the keyring.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The bundled load generator (spawns a router and echo tasks without --target).
    Bench(Box<fedbus_loadgen::BenchArgs>),
    /// Check the host: io_uring, locked memory, cores, socket and file limits.
    Tune {
        /// Config whose cores and io_memory to check (embedded defaults without it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct TaskCommon {
    /// App served, owner/app.
    #[arg(long, default_value = "demo/echo")]
    app: String,
    /// Partitions served: `0-15`, `0-3,8,10-11`.
    #[arg(long, default_value = "0-15")]
    partitions: String,
    /// Role of this task (`main` receives every request first).
    #[arg(long, default_value = "main")]
    role: String,
    /// Internal address of shard 0 of a router (`host:port`, or `unix:<path>` for a router's
    /// `listen.internal_unix` on this host); repeat for every router of the cluster.
    #[arg(long = "router", default_value = "127.0.0.1:8900")]
    routers: Vec<String>,
    /// Service token; without it (dev mode) one is minted from the keyring.
    #[arg(long, env = "FEDBUS_TASK_TOKEN")]
    token: Option<String>,
    /// Read the service token from this file, and again whenever it changes (checked every
    /// second): a new token is sent on every open link (`renew`), so it never expires under
    /// a running task.
    #[arg(long, env = "FEDBUS_TASK_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Exit with status 1 when a router refuses the token (401/403 at the upgrade: expired,
    /// retired or unknown key, bad signature) for this long.
    #[arg(long, default_value = "30s")]
    refused_exit_after: String,
    /// On SIGTERM or SIGINT: tell every router the task is stopping (they route new requests
    /// to other tasks and answer `drained` after the last one they sent here), serve what
    /// arrives until then and the requests in flight, for up to this long in all, close the
    /// links and exit 0; a second signal exits at once with status 1.
    #[arg(long, default_value = "10s")]
    stop_timeout: String,
    /// Cluster the dev token is minted for (`region/cluster`).
    #[arg(long, default_value = "local/dev")]
    cluster: String,
    /// Keyring directory for dev tokens.
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Dial the routers over TLS (routers with `listen.internal_tls`), trusting this CA
    /// certificate (PEM); each router's certificate must be valid for the host dialed.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Answers every request with its own body.
    Echo {
        #[command(flatten)]
        common: TaskCommon,
        /// Redirect every request to this role instead of answering.
        #[arg(long)]
        redirect_to: Option<String>,
        /// Wait this long before answering (to test timeouts and lost tasks).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Example Auth Service (role `auth`): answers a login `{"sub":"alice"}` with a client JWT
    /// signed by the newest app secret the routers pushed to it.
    Auth {
        #[command(flatten)]
        common: TaskCommon,
        /// Lifetime of the tokens it issues.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// A service token for a task (signed by the cluster key).
    Service {
        #[arg(long)]
        task_id: String,
        #[arg(long)]
        app: String,
        #[arg(long, default_value = "local/dev")]
        cluster: String,
        #[arg(long, default_value = "30d")]
        ttl: String,
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Role the task may register in (required for role `auth`, which receives the app
        /// secret); absent: any other role.
        #[arg(long)]
        role: Option<String>,
        /// Create the app's secret when the keyring does not have the app (without it, an app
        /// the keyring does not know is refused: a mistyped name must not mint a new app).
        #[arg(long)]
        create_app: bool,
    },
    /// A peer token for a router (federation: `federation.peer_token_file`), signed by the
    /// cluster key: a service token with no app.
    Peer {
        /// Name of the router presenting it.
        #[arg(long)]
        router: String,
        /// This router's cluster, `region/cluster`.
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "365d")]
        ttl: String,
        #[arg(long)]
        keyring: Option<PathBuf>,
    },
    /// A client JWT (HS256, signed by the app secret's newest version).
    Client {
        #[arg(long)]
        app: String,
        #[arg(long)]
        sub: String,
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Create the app's secret when the keyring does not have the app.
        #[arg(long)]
        create_app: bool,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create the keyring with fresh keys (keeps existing files).
    Init {
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Apps to create secrets for.
        #[arg(long = "app", default_value = "demo/echo")]
        apps: Vec<String>,
    },
    /// Show versions and public keys (never secrets).
    Show {
        #[arg(long)]
        keyring: Option<PathBuf>,
    },
    /// Add a new version: it signs from now on; the old one verifies until its grace ends.
    Rotate {
        #[arg(long, conflicts_with = "cluster", required_unless_present = "cluster")]
        app: Option<String>,
        #[arg(long)]
        cluster: bool,
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Create the app's secret (v1) when the keyring does not have the app (without it, an
        /// app the keyring does not know is refused: a mistyped name must not mint a new app).
        #[arg(long, requires = "app")]
        create_app: bool,
    },
    /// Create a certificate authority, e.g. the federation CA whose router certificates
    /// authenticate peer links (`[tls.peer]`): writes `<out>.pem` and `<out>.key` (mode 0600).
    /// An existing CA is kept.
    Ca {
        /// Output path without extension.
        #[arg(long)]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "fedbus federation CA")]
        name: String,
    },
    /// Issue a router certificate (server and client auth) from a CA: writes `<out>.pem` and
    /// `<out>.key` (mode 0600). Without --ca, the keyring's dev CA (made if absent).
    Cert {
        /// Names the certificate is valid for (DNS names, `*.` wildcards, IP addresses);
        /// repeat for several. The first is also its common name.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Output path without extension.
        #[arg(long)]
        out: PathBuf,
        /// CA certificate (PEM); with --ca-key.
        #[arg(long, requires = "ca_key")]
        ca: Option<PathBuf>,
        /// CA private key (PEM, PKCS#8).
        #[arg(long, requires = "ca")]
        ca_key: Option<PathBuf>,
        #[arg(long)]
        keyring: Option<PathBuf>,
    },
}

/// `--keyring`, or the default keyring directory; an empty path is refused (it names no
/// directory, and a shell variable that expanded to nothing should not fall back silently).
fn keyring_dir(k: &Option<PathBuf>) -> Result<PathBuf> {
    match k {
        Some(p) if p.as_os_str().is_empty() => bail!("--keyring is empty"),
        Some(p) => Ok(p.clone()),
        None => Ok(config::default_keyring_dir()),
    }
}

/// `--cluster`: `region/cluster`, each part non-empty `[A-Za-z0-9_-]` as in the config.
fn check_cluster(cluster: &str) -> Result<()> {
    let ok = cluster
        .split_once('/')
        .is_some_and(|(r, c)| auth::is_name_part(r) && auth::is_name_part(c));
    if !ok {
        bail!("--cluster {cluster:?}: expected region/cluster, each part non-empty [A-Za-z0-9_-]");
    }
    Ok(())
}

/// A free-form identifier put in a token (`--task-id`, `--role`): 1 to `max` bytes, no
/// whitespace or control characters (they end up in logs and metrics).
fn check_id(flag: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{flag} {v:?}: expected 1 to {max} bytes without spaces or control characters");
    }
    Ok(())
}

/// A role (`--role`, `--redirect-to`): the router's rule for a registration, 1 to 64 bytes, and
/// no control characters either (it ends up in logs and metrics).
fn check_role(flag: &str, r: &str) -> Result<()> {
    if r.is_empty() || r.len() > 64 || r.chars().any(char::is_control) {
        bail!("{flag} {r:?}: expected 1 to 64 bytes without control characters");
    }
    Ok(())
}

/// Dev convenience: the keyring exists once any command needs it.
fn ensure_keyring(dir: &Path, apps: &[&str]) -> Result<()> {
    if Keyring::init(dir, apps, auth::now_unix())? {
        eprintln!(
            "fedbus: created dev keys in {} (DEV KEYS: do not use in production)",
            dir.display()
        );
    }
    Ok(())
}

/// The keyring a token command signs with (`keyring`: its `--keyring`). The default keyring
/// is made on first use with the apps of the embedded defaults (dev keys, as `fedbus run`
/// without a config makes it); one named with `--keyring` must exist (`fedbus keys init`
/// makes it), as `nsc` and `vault` want their stores made on purpose: a mistyped path must
/// not silently mint new keys.
fn token_keyring(keyring: &Option<PathBuf>) -> Result<PathBuf> {
    let dir = keyring_dir(keyring)?;
    if !dir.join("cluster.toml").exists() {
        if keyring.is_some() {
            bail!(
                "no keyring in {}: check the path, or create one with `fedbus keys init --keyring {}`",
                dir.display(),
                dir.display()
            );
        }
        ensure_keyring(&dir, &Config::embedded().app_names())?;
    }
    Ok(dir)
}

/// [`token_keyring`], holding `app`: an app the keyring does not have is refused unless
/// `create` (a mistyped app name must not silently mint new keys either).
fn keyring_with_app(keyring: &Option<PathBuf>, app: &str, create: bool) -> Result<PathBuf> {
    let dir = token_keyring(keyring)?;
    let dir = dir.as_path();
    if create {
        Keyring::ensure_apps(dir, &[app], auth::now_unix())?;
    } else if Keyring::load(dir)?.app_versions(app).is_none() {
        bail!(
            "app {app} is not in the keyring {}: check the name, or pass --create-app to create its secret",
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// `path` with `suffix` appended: `--out spb1.ru.heeus.cloud` writes `spb1.ru.heeus.cloud.pem`
/// (`Path::with_extension` would replace `.cloud`, and `r0.spb1` and `r0.spb2` would both
/// write `r0.pem`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Writes a file with `mode`, replacing it atomically (a router watching it never reads half
/// of it).
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A name no one can guess or have made first (a private key is written this way, perhaps
    // in a shared directory): `create_new` never follows a link planted there.
    let tmp = with_suffix(
        path,
        &format!(
            ".tmp{}-{:016x}",
            std::process::id(),
            fedbus_router::util::random_u64()
        ),
    );
    let written = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("{}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn ttl_secs(s: &str) -> Result<u64> {
    // 0 is allowed: a token expired when printed is how a refusal of expired tokens is tried.
    auth::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| anyhow!("--ttl {s}: {e}"))
}

fn parse_partitions(s: &str) -> Result<Vec<u32>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>()?, b.trim().parse::<u32>()?),
            None => {
                let p = part.parse::<u32>()?;
                (p, p)
            }
        };
        if a > b || b - a > 1 << 20 {
            bail!("bad partition range {part}");
        }
        v.extend(a..=b);
    }
    if v.is_empty() {
        bail!("no partitions in {s:?}");
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn service_token(
    dir: &Path,
    sub: &str,
    app: &str,
    cluster: &str,
    ttl: u64,
    role: Option<&str>,
) -> Result<String> {
    let (kid, key) = Keyring::cluster_signing_key(dir)?;
    let now = auth::now_unix();
    Ok(auth::sign_service_token(
        &key,
        &auth::ServiceClaims {
            kid,
            sub: sub.into(),
            app: app.into(),
            cluster: cluster.into(),
            iat: now,
            exp: now.saturating_add(ttl),
            role: role.map(str::to_string),
        },
    ))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEDBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run_router(path: Option<PathBuf>, takeover: bool) -> Result<()> {
    let mut cfg = match &path {
        Some(p) => Config::load(p)?,
        None => Config::embedded(),
    };
    cfg.listen.takeover |= takeover;
    // io_uring and locked memory first: glommio would panic or fail late without them.
    for c in fedbus_router::tune::checks(&cfg) {
        if !c.ok && c.fatal {
            bail!("{}: {}. Fix: {}", c.name, c.detail, c.fix);
        } else if !c.ok {
            tracing::warn!(check = c.name, fix = %c.fix, "{}", c.detail);
        }
    }
    let dir = cfg.keyring_dir();
    if cfg.dev {
        ensure_keyring(&dir, &cfg.app_names())?;
        Keyring::ensure_apps(&dir, &cfg.app_names(), auth::now_unix())?;
    }
    let keyring = Keyring::load(&dir).with_context(|| format!("keyring {}", dir.display()))?;
    // Dev mode with a TLS listener and no certificate: the keyring's dev CA and certificate.
    let mut dev_ca = None;
    let tls_listener = cfg.listen.api_tls.is_some() || cfg.listen.internal_tls;
    if !tls_listener && !cfg.tls.certs.is_empty() {
        tracing::warn!(
            "[[tls.certs]] is set but no TLS listener is (listen.api_tls, listen.internal_tls): the certificates are not read or served"
        );
    }
    if cfg.dev && tls_listener && cfg.tls.certs.is_empty() {
        let (files, created) = fedbus_router::tls::dev::ensure(&dir)?;
        if created {
            eprintln!(
                "fedbus: created a dev CA and a certificate for localhost and 127.0.0.1 in {} (DEV CERTIFICATES: do not use in production)",
                dir.join(fedbus_router::tls::dev::DIR).display()
            );
        }
        cfg.tls.certs = vec![config::CertFiles {
            cert: files.cert,
            key: files.key,
        }];
        dev_ca = Some(files.ca);
    }
    // SIGHUP is caught from before the listeners bind: one during the start (a takeover
    // waits up to readiness.takeover_wait_ms for its peer links, with its listeners already
    // bound) reloads once the router is up, instead of killing it by the default action.
    // SIGTERM and SIGINT keep their default until then: they stop a start at once.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    let r = fedbus_router::shard::listen::start(cfg.clone(), keyring)?;
    signals.add_signal(signal_hook::consts::SIGTERM)?;
    signals.add_signal(signal_hook::consts::SIGINT)?;
    // The banner goes to stdout, and a stdout nobody reads any more (a closed pipe: the
    // supervisor or test that started us stopped reading after the ready line) must not stop
    // the router: `println!` panics on EPIPE, so each line is written and its error ignored.
    macro_rules! outln {
        ($($arg:tt)*) => {{
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, $($arg)*);
            let _ = out.flush();
        }};
    }
    outln!(
        "fedbus router {}/{}/{} up",
        cfg.region,
        cfg.cluster,
        cfg.router
    );
    outln!(
        "  api       http://{}  (HTTP/1.1, websocket /api/ws)",
        r.api
    );
    if let Some(a) = r.api_tls {
        outln!("  api tls   https://{a}  (HTTPS, wss:// /api/ws)");
        if let Some(ca) = &dev_ca {
            outln!("  dev CA    {}  (curl --cacert)", ca.display());
        }
    }
    for (k, a) in r.internal.iter().enumerate() {
        outln!("  internal  {a}  shard {k} on core {}", r.shard_cores[k]);
    }
    for (k, p) in r.internal_unix.iter().enumerate() {
        outln!("  unix      {}  shard {k} (task links)", p.display());
    }
    if let Some(a) = r.external {
        outln!("  external  {a}  (peer links; every shard)");
        for c in cfg.peer_clusters() {
            outln!(
                "  peer      {}/{} via {}",
                c.region,
                c.cluster,
                c.routers.join(", ")
            );
        }
    }
    if let Some(a) = r.admin {
        outln!("  admin     http://{a}/metrics");
    }
    outln!("  control   core {}", cfg.tuning.control_core);
    outln!("  keyring   {}", dir.display());
    if cfg.dev {
        outln!("  WARNING: dev mode: running on dev keys made on first run; set `dev = false` and provision the keyring for production");
    }
    // The machine-readable twin of the lines above, printed once every shard is up (scripts
    // and tests wait on it instead of parsing the human lines).
    let ready = serde_json::json!({
        "router": format!("{}/{}/{}", cfg.region, cfg.cluster, cfg.router),
        "api": r.api.to_string(),
        "api_tls": r.api_tls.map(|a| a.to_string()),
        "internal": r.internal.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "internal_unix": r.internal_unix.iter().map(|p| format!("unix:{}", p.display())).collect::<Vec<_>>(),
        "external": r.external.map(|a| a.to_string()),
        "admin": r.admin.map(|a| a.to_string()),
        "shards": r.internal.len(),
        "shard_cores": r.shard_cores,
    });
    outln!("{READY_PREFIX}{ready}");
    // SIGTERM/SIGINT: drain (docs/ARCHITECTURE.md, "Drain"), then exit 0; a second one
    // exits at once. A dead shard (with `readiness.exit_on_dead_shard`): the same drain, then
    // exit 70 (EX_SOFTWARE), for the supervisor to start a whole router.
    let r = std::sync::Arc::new(r);
    let drain_timeout = std::time::Duration::from_millis(cfg.readiness.drain_timeout_ms);
    // Cloned into the dead-shard thread: one flag says whether a drain is under way.
    let drain_then_exit = {
        let r = r.clone();
        let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        move |code: i32| {
            if draining.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            let r = r.clone();
            std::thread::spawn(move || {
                r.drain(drain_timeout);
                r.stop_control();
                std::process::exit(code);
            });
            true
        }
    };
    if cfg.readiness.exit_on_dead_shard {
        let (dead, drain_then_exit) = (r.dead_shards.clone(), drain_then_exit.clone());
        std::thread::Builder::new()
            .name("fedbus-dead-shard".into())
            .spawn(move || {
                let Ok(shard) = dead.recv() else { return };
                tracing::error!(
                    shard,
                    "a shard died: draining the others, then exiting with status 70 for the supervisor to restart the router (readiness.exit_on_dead_shard)"
                );
                drain_then_exit(EXIT_DEAD_SHARD);
            })?;
    }
    // A second SIGTERM/SIGINT exits at once; the first one during a dead shard's drain (a
    // supervisor stopping the router) lets that drain finish.
    let mut signalled = false;
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            tracing::info!(
                "SIGHUP: reloading the keyring, TLS certificates, [[apps]] and [federation]"
            );
            let _ = r.events.send(fedbus_router::control::ControlEvent::Reload);
        } else if std::mem::replace(&mut signalled, true) {
            tracing::warn!("signal {sig} during the drain: exiting now");
            std::process::exit(1);
        } else if drain_then_exit(0) {
            tracing::info!("signal {sig}: draining, then exiting");
        } else {
            tracing::info!("signal {sig}: the drain under way goes on; a second one exits now");
        }
    }
    Ok(())
}

/// The exit status of a router that drained after one of its shards died (`EX_SOFTWARE` of
/// sysexits.h): not 0, so that `Restart=on-failure` and the like start it again.
const EXIT_DEAD_SHARD: i32 = 70;

/// SDK options for a built-in task: its service token is `--token`, or in dev mode one minted
/// from the keyring for this instance, app, cluster and role.
fn task_options(common: &TaskCommon, kind: &str) -> Result<task::TaskOptions> {
    // What the router would refuse at registration (1008), refused here with the flag named.
    auth::validate_app_name(&common.app).map_err(|_| {
        anyhow!(
            "--app {:?}: expected owner/app, each part non-empty [A-Za-z0-9_-]",
            common.app
        )
    })?;
    check_role("--role", &common.role)?;
    let partitions = parse_partitions(&common.partitions)?;
    let instance = fedbus_router::util::random_u64();
    let from_file = match &common.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let token = match common.token.clone().or(from_file) {
        Some(t) => t,
        None => {
            check_cluster(&common.cluster)?;
            // A keyring named with `--keyring` must exist, as for the token commands (a typo
            // made a new keyring, whose token every router refused); the default one is made
            // on first use.
            let dir = match &common.keyring {
                Some(_) => token_keyring(&common.keyring)?,
                None => {
                    let dir = config::default_keyring_dir();
                    ensure_keyring(&dir, &[common.app.as_str()])?;
                    dir
                }
            };
            service_token(
                &dir,
                &format!("{kind}-{instance:016x}"),
                &common.app,
                &common.cluster,
                30 * 86400,
                Some(&common.role),
            )?
        }
    };
    let mut opts = task::TaskOptions::new(
        common.routers.clone(),
        &common.app,
        &common.role,
        partitions,
        token,
    );
    opts.instance = instance;
    opts.token_file = common.token_file.clone();
    opts.refused_exit_after = auth::parse_duration(&common.refused_exit_after)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow!(
                "--refused-exit-after {}: expected e.g. 30s",
                common.refused_exit_after
            )
        })?;
    opts.stop_timeout = auth::parse_duration(&common.stop_timeout)
        .map_err(|_| anyhow!("--stop-timeout {}: expected e.g. 10s", common.stop_timeout))?;
    if let Some(ca) = &common.tls_ca {
        opts.tls = Some(fedbus_router::tls::peer::client_config(ca)?);
    }
    Ok(opts)
}

fn run_task(common: TaskCommon, redirect_to: Option<String>, delay_ms: u64) -> Result<()> {
    if let Some(r) = &redirect_to {
        check_role("--redirect-to", r)?;
    }
    let mut opts = task_options(&common, "echo")?;
    // Which router shard's link carried each request: lets tests prove that requests never
    // cross shards. Added by the SDK from a line made once per link.
    opts.report_link_shard = true;
    eprintln!(
        "fedbus task echo: app {} role {} partitions {} -> routers {:?}{}",
        common.app,
        common.role,
        common.partitions,
        common.routers,
        redirect_to
            .as_ref()
            .map(|r| format!(" (redirects to {r})"))
            .unwrap_or_default()
    );
    task::serve(opts, move |req| {
        let redirect = redirect_to.clone();
        async move {
            if delay_ms > 0 {
                glommio::timer::sleep(std::time::Duration::from_millis(delay_ms)).await;
            }
            // The app's Auth Service is reached as service `auth` through role main.
            let redirect = redirect.or_else(|| {
                (req.meta(fedbus_proto::tag::SERVICE) == Some("auth")
                    && req.meta(fedbus_proto::tag::ROLE) != Some("auth"))
                .then(|| "auth".to_string())
            });
            // Module `status`: answer the status named by the function, with no body
            // (`.../<wsid>/status/204`), so clients can try bodiless answers.
            let status = (req.meta(fedbus_proto::tag::MODULE) == Some("status"))
                .then(|| req.meta(fedbus_proto::tag::FUNCTION)?.parse::<u16>().ok())
                .flatten();
            // Any method but POST is named back, so clients see what reached the task.
            let method = req.meta(fedbus_proto::tag::METHOD).unwrap_or("POST");
            let headers = if method == "POST" {
                Vec::new()
            } else {
                vec![("echo-method".to_string(), method.to_string())]
            };
            match (redirect, status) {
                (Some(r), _) => task::Outcome::redirect(&r),
                (None, Some(status)) => task::Outcome::Response {
                    status,
                    headers,
                    content_type: None,
                    body: bytes::Bytes::new(),
                },
                (None, None) => task::Outcome::Response {
                    status: 200,
                    headers,
                    content_type: req
                        .meta(fedbus_proto::tag::CONTENT_TYPE)
                        .map(str::to_string),
                    body: req.payload().clone(),
                },
            }
        }
    })
}

fn run_auth_task(mut common: TaskCommon, ttl: String) -> Result<()> {
    let ttl = ttl_secs(&ttl)?;
    if common.role == "main" {
        common.role = "auth".into();
    }
    let opts = task_options(&common, "auth")?;
    eprintln!(
        "fedbus task auth: Auth Service of {} (role {})",
        common.app, common.role
    );
    let app = common.app.clone();
    task::serve(opts, move |req| {
        let app = app.clone();
        async move {
            let json = |status: u16, v: serde_json::Value| task::Outcome::Response {
                status,
                headers: Vec::new(),
                content_type: Some("application/json".into()),
                body: bytes::Bytes::from(v.to_string()),
            };
            // A demo: any `sub` logs in. A real Auth Service checks credentials here.
            let sub = serde_json::from_slice::<serde_json::Value>(req.payload())
                .ok()
                .and_then(|v| v.get("sub").and_then(|s| s.as_str()).map(str::to_string))
                .filter(|s| !s.is_empty() && s.len() <= 256);
            let Some(sub) = sub else {
                return json(
                    400,
                    serde_json::json!({"error": "bad_login", "message": "body must be {\"sub\": \"<user>\"}"}),
                );
            };
            match task::sign_client_jwt(&app, &sub, ttl) {
                Some(t) => json(
                    200,
                    serde_json::json!({"token": t, "kid": task::secret_version(&app)}),
                ),
                None => json(
                    503,
                    serde_json::json!({"error": "no_secret", "message": "no app secret pushed yet"}),
                ),
            }
        }
    })
}

fn main() {
    let cli = Cli::parse();
    init_tracing();
    if let Err(e) = real_main(cli) {
        eprintln!("fedbus: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run { config, takeover } => run_router(config, takeover),
        Cmd::Bench(args) => fedbus_loadgen::run(*args),
        Cmd::Tune { config } => {
            let cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::embedded(),
            };
            std::process::exit(if fedbus_router::tune::report(&cfg) {
                0
            } else {
                1
            });
        }
        Cmd::Task(TaskCmd::Echo {
            common,
            redirect_to,
            delay_ms,
        }) => run_task(common, redirect_to, delay_ms),
        Cmd::Task(TaskCmd::Auth { common, ttl }) => run_auth_task(common, ttl),
        Cmd::Token(TokenCmd::Service {
            task_id,
            app,
            cluster,
            ttl,
            keyring,
            role,
            create_app,
        }) => {
            check_id("--task-id", &task_id, 256)?;
            check_cluster(&cluster)?;
            if let Some(r) = &role {
                check_role("--role", r)?;
            }
            let dir = keyring_with_app(&keyring, &app, create_app)?;
            println!(
                "{}",
                service_token(
                    &dir,
                    &task_id,
                    &app,
                    &cluster,
                    ttl_secs(&ttl)?,
                    role.as_deref()
                )?
            );
            Ok(())
        }
        Cmd::Token(TokenCmd::Peer {
            router,
            cluster,
            ttl,
            keyring,
        }) => {
            if !auth::is_name_part(&router) {
                bail!("--router {router:?}: expected the router's name, non-empty [A-Za-z0-9_-]");
            }
            check_cluster(&cluster)?;
            let dir = token_keyring(&keyring)?;
            println!(
                "{}",
                service_token(&dir, &router, "", &cluster, ttl_secs(&ttl)?, None)?
            );
            Ok(())
        }
        Cmd::Token(TokenCmd::Client {
            app,
            sub,
            ttl,
            keyring,
            create_app,
        }) => {
            check_id("--sub", &sub, 256)?;
            let dir = keyring_with_app(&keyring, &app, create_app)?;
            let k = Keyring::load(&dir)?;
            let secret = k
                .signing_app_secret(&app)
                .ok_or_else(|| anyhow!("no secret for app {app} in {}", dir.display()))?;
            let now = auth::now_unix();
            let t = auth::sign_client_jwt(
                secret,
                &auth::ClientClaims {
                    sub,
                    app,
                    iat: now,
                    exp: now.saturating_add(ttl_secs(&ttl)?),
                    nbf: None,
                },
            )?;
            println!("{t}");
            Ok(())
        }
        Cmd::Keys(KeysCmd::Init { keyring, apps }) => {
            let dir = keyring_dir(&keyring)?;
            let refs: Vec<&str> = apps.iter().map(String::as_str).collect();
            let created = Keyring::init(&dir, &refs, auth::now_unix())?;
            Keyring::ensure_apps(&dir, &refs, auth::now_unix())?;
            println!(
                "{} {}",
                if created { "created" } else { "kept" },
                dir.display()
            );
            Ok(())
        }
        Cmd::Keys(KeysCmd::Ca { out, name }) => {
            let (cert_path, key_path) = (with_suffix(&out, ".pem"), with_suffix(&out, ".key"));
            if cert_path.exists() && key_path.exists() {
                fedbus_router::tls::dev::Ca::load(&cert_path, &key_path)?;
                println!("kept {}", cert_path.display());
                return Ok(());
            }
            let ca = fedbus_router::tls::dev::Ca::generate_named(&name)?;
            write_atomic(&key_path, &ca.key_pem(), 0o600)?;
            write_atomic(&cert_path, ca.cert_pem(), 0o644)?;
            println!(
                "created {} and {} ({name})",
                cert_path.display(),
                key_path.display()
            );
            Ok(())
        }
        Cmd::Keys(KeysCmd::Cert {
            names,
            out,
            ca,
            ca_key,
            keyring,
        }) => {
            use fedbus_router::tls::dev;
            // Before anything is made (the dev CA below).
            if let Some(n) = names
                .iter()
                .find(|n| n.is_empty() || n.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                bail!("--name {n:?}: expected a DNS name or an IP address");
            }
            let (ca_cert, ca_key) = match (ca, ca_key) {
                (Some(c), Some(k)) => (c, k),
                _ => {
                    let dir = keyring_dir(&keyring)?;
                    let (files, _) = dev::ensure(&dir)?;
                    let key = files.ca.with_file_name(dev::CA_KEY);
                    (files.ca, key)
                }
            };
            let ca = dev::Ca::load(&ca_cert, &ca_key)?;
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let (cert, key) = ca.issue(refs[0], &refs)?;
            let (cert_path, key_path) = (with_suffix(&out, ".pem"), with_suffix(&out, ".key"));
            write_atomic(&key_path, &key, 0o600)?;
            write_atomic(&cert_path, &cert, 0o644)?;
            println!(
                "{} and {} issued by {} for {}",
                cert_path.display(),
                key_path.display(),
                ca_cert.display(),
                names.join(", ")
            );
            Ok(())
        }
        Cmd::Keys(KeysCmd::Show { keyring }) => {
            let dir = keyring_dir(&keyring)?;
            print!("{}", Keyring::load(&dir)?.describe());
            Ok(())
        }
        Cmd::Keys(KeysCmd::Rotate {
            app,
            cluster,
            keyring,
            create_app,
        }) => {
            let dir = keyring_dir(&keyring)?;
            let now = auth::now_unix();
            if cluster {
                let v = Keyring::rotate_cluster(&dir, now)?;
                println!(
                    "cluster key v{v} created; it signs from now on (reload routers with SIGHUP)"
                );
            } else if let Some(app) = app {
                if !create_app && Keyring::load(&dir)?.app_versions(&app).is_none() {
                    bail!(
                        "app {app} is not in the keyring {}: check the name, or pass --create-app to create its secret",
                        dir.display()
                    );
                }
                let v = Keyring::rotate_app(&dir, &app, now)?;
                println!("app {app} secret v{v} created; it signs from now on (reload routers with SIGHUP)");
            }
            Ok(())
        }
    }
}
