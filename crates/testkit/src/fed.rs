//! Multi-process federation harness: two clusters `ru/spb1` and `ru/spb2`, two routers each,
//! one echo task per cluster linked to both of its routers, on loopback addresses of their
//! own per federation (127.<a>.<b>.11/12/21/22, `a` from the pid, `b` a counter), so tests
//! running in parallel never collide. Every listener has a fixed port on that address, so a
//! router restarted with the same config comes back on the same addresses (its task and the
//! other cluster's dialers find it again). Everything is SIGKILLed on drop.
//!
//! ```ignore
//! let f = Federation::builder().shards(2).start();
//! let tok = f.token("spb2");
//! let resp = f.router("spb1", 0).conn().request(&Req::post(&f.path("spb2", 7)).token(&tok));
//! ```

use super::{bin, fedbus, keys_init, out_file, Conn, Req, Response, TempDir, START_TIMEOUT};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The app every federation serves.
pub const APP: &str = "demo/echo";
/// The two clusters of a federation (region `ru`).
pub const CLUSTERS: [&str; 2] = ["spb1", "spb2"];
const API_PORT: u16 = 8800;
const INTERNAL_PORT: u16 = 8900;
const EXTERNAL_PORT: u16 = 8950;
const ADMIN_PORT: u16 = 8700;

/// A child process killed (SIGKILL) and reaped on drop; prints its log tail on panic.
pub struct FedProc {
    child: Option<Child>,
    /// File the process's stdout and stderr go to.
    pub log: PathBuf,
    /// Label in panic messages.
    pub name: String,
}

impl FedProc {
    /// SIGKILL, then reap; idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then waits up to `within` for the exit; None when it did not exit in time
    /// (then it is still running).
    pub fn term(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.sigterm();
        self.wait_exit(within)
    }

    /// SIGTERM (a router starts its drain), without waiting.
    pub fn sigterm(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child's pid (not yet reaped).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits up to `within` for the exit, sending nothing; None when it did not exit in time.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        super::wait_child_exit(&mut self.child, within)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FedProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!(
                "---- last lines of {} ({}) ----",
                self.name,
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// One router of the federation.
pub struct FedRouter {
    /// `ru/spb1/r0`.
    pub name: String,
    /// `spb1`.
    pub cluster: String,
    /// Router index within its cluster (0 or 1).
    pub index: usize,
    /// The 127.0.0.x address all its listeners bind.
    pub ip: Ipv4Addr,
    /// Api listener.
    pub api: SocketAddr,
    /// Internal listener (task links).
    pub internal: SocketAddr,
    /// External listener (peer links).
    pub external: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Number of shards.
    pub shards: usize,
    cfg: PathBuf,
    home: PathBuf,
    /// Logs of earlier runs (restarts), oldest first.
    restarts: u32,
    proc: FedProc,
}

impl FedRouter {
    /// A new client connection to its api listener.
    pub fn conn(&self) -> Conn {
        Conn::open(self.api)
    }

    /// Its `/metrics`, parsed.
    pub fn metrics(&self) -> super::Metrics {
        super::Metrics::parse(&super::metrics_text_at(self.admin))
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// SIGHUP: the router reloads its keyring, certificates and config.
    pub fn sighup(&self) {
        let c = self.proc.child.as_ref().expect("router running");
        // SAFETY: kill(2) on our own child's pid (not yet reaped).
        let rc = unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "kill -HUP {}", self.name);
    }

    /// Its config file (edit it, then [`FedRouter::sighup`], to reload).
    pub fn config_path(&self) -> &Path {
        &self.cfg
    }

    /// The router's process id (None once it exited).
    pub fn pid(&self) -> Option<u32> {
        self.proc.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM (a drain), then waits up to `within` for the exit; None when still running.
    pub fn term(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.proc.term(within)
    }

    /// SIGTERM (a drain), without waiting; [`FedRouter::wait_exit`] waits.
    pub fn sigterm(&mut self) {
        self.proc.sigterm()
    }

    /// Waits up to `within` for the exit, sending nothing; None when still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.proc.wait_exit(within)
    }

    /// `GET /readyz`: the status and the body.
    pub fn readyz(&self) -> (u16, String) {
        super::admin_get(self.admin, "/readyz")
    }

    /// The log of the current run.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// Starts the router again with the same config (same addresses).
    pub fn restart(&mut self) {
        self.proc.kill();
        self.restarts += 1;
        self.proc = spawn_router(
            &self.cfg,
            &self.home,
            &self.name,
            self.restarts,
            self.shards,
            false,
        );
    }

    /// Starts a second run of this router with `--takeover`, on the same addresses beside the
    /// running one, and waits for its ready line; returns the old run, still running, for the
    /// caller to SIGTERM ([`FedProc::term`]).
    pub fn takeover(&mut self) -> FedProc {
        self.restarts += 1;
        let new = spawn_router(
            &self.cfg,
            &self.home,
            &self.name,
            self.restarts,
            self.shards,
            true,
        );
        std::mem::replace(&mut self.proc, new)
    }
}

fn spawn_router(
    cfg: &Path,
    home: &Path,
    name: &str,
    run: u32,
    shards: usize,
    takeover: bool,
) -> FedProc {
    let log = home.join(format!("{}-{run}.log", name.replace('/', "-")));
    let args: &[&str] = if takeover { &["--takeover"] } else { &[] };
    let (child, rx) = crate::launch::spawn_run_child(home, cfg, args, &[], &log);
    let mut proc = FedProc {
        child: Some(child),
        log,
        name: format!("router {name} (run {run})"),
    };
    // Up when it printed its ready line.
    let log = proc.log.clone();
    let ready = super::wait_ready_line(&rx, || proc.alive(), &log, &format!("router {name}"));
    assert_eq!(ready.internal.len(), shards, "{name}: shards");
    proc
}

/// Builder: `Federation::builder().shards(2).task_delay_ms("spb2", 3000).start()`.
pub struct FederationBuilder {
    shards: usize,
    delays: [u64; 2],
    request_timeout_ms: u64,
    drain_peer_hold_ms: Option<u64>,
    grace_secs: Option<u64>,
    /// The `[apps.cors]` table of the app in each cluster.
    cors: [Option<String>; 2],
    /// Peer links over mutual TLS (`[tls.peer]`).
    peer_tls: bool,
    /// Partitions of each cluster's echo task (None: all).
    partitions: [Option<String>; 2],
    /// Each cluster reads the other's public key from its own copy
    /// ([`Federation::peer_keys_dir`]) instead of the other's keyring.
    copied_peer_keys: bool,
    /// More `[limits]` lines of each cluster's routers.
    limits: [String; 2],
}

impl FederationBuilder {
    /// Shards per router (default 1).
    pub fn shards(mut self, n: usize) -> Self {
        assert!((1..=2).contains(&n));
        self.shards = n;
        self
    }

    /// The echo task of `cluster` waits this long before answering.
    pub fn task_delay_ms(mut self, cluster: &str, ms: u64) -> Self {
        self.delays[cluster_index(cluster)] = ms;
        self
    }

    /// `readiness.drain_peer_hold_ms` of every router (default: the router's, 5000).
    pub fn drain_peer_hold_ms(mut self, ms: u64) -> Self {
        self.drain_peer_hold_ms = Some(ms);
        self
    }

    /// `limits.request_timeout_ms` of every router (default 10000).
    pub fn request_timeout_ms(mut self, ms: u64) -> Self {
        self.request_timeout_ms = ms;
        self
    }

    /// The `[apps.cors]` table of the app in `cluster`, e.g. `allowed_origins = ["http://a"]`.
    pub fn cors(mut self, cluster: &str, table: &str) -> Self {
        self.cors[cluster_index(cluster)] = Some(table.into());
        self
    }

    /// Peer links over mutual TLS: a federation CA made with `fedbus keys ca`, a certificate
    /// per router for its address (`fedbus keys cert --ca`), `[tls.peer]` in every config.
    /// Default: on when the environment has `FEDBUS_TEST_PEER_TLS=1` (the whole federation
    /// suite then runs over TLS), else off.
    pub fn peer_tls(mut self, on: bool) -> Self {
        self.peer_tls = on;
        self
    }

    /// Partitions the echo task of `cluster` serves (default: all).
    pub fn task_partitions(mut self, cluster: &str, partitions: &str) -> Self {
        self.partitions[cluster_index(cluster)] = Some(partitions.to_string());
        self
    }

    /// Each cluster's config names its own copy of the other cluster's public `cluster.toml`
    /// (`<root>/<cluster>/peers/<other>/`), as separate sites would hold it: a rotation then
    /// reaches the other cluster only when the operator copies the file
    /// ([`Federation::copy_peer_key`]).
    pub fn copied_peer_keys(mut self) -> Self {
        self.copied_peer_keys = true;
        self
    }

    /// `[limits] key = value` of `cluster`'s routers.
    pub fn limit(mut self, cluster: &str, key: &str, value: impl std::fmt::Display) -> Self {
        let _ = writeln!(self.limits[cluster_index(cluster)], "{key} = {value}");
        self
    }

    /// `[auth] grace_secs` of every router.
    pub fn grace_secs(mut self, secs: u64) -> Self {
        self.grace_secs = Some(secs);
        self
    }

    /// Writes the keyrings and configs, starts the four routers and two tasks, then
    /// [`Federation::wait_ready`].
    pub fn start(self) -> Federation {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let a = 100 + (std::process::id() % 150) as u8;
        let b = (n % 250 + 1) as u8;
        let ip = |c: usize, r: usize| Ipv4Addr::new(127, a, b, (c as u8 + 1) * 10 + r as u8 + 1);

        let dir = TempDir::new("fed");
        let root = dir.path().to_path_buf();
        let mut keys = Vec::new();
        for c in CLUSTERS {
            let k = root.join(c).join("keys");
            std::fs::create_dir_all(root.join(c)).expect("mkdir");
            keys_init(&root, &k, &[APP]);
            keys.push(k);
        }
        // The keys each cluster's config names for each cluster.
        let peer_keys = |ci: usize, cj: usize| -> PathBuf {
            if self.copied_peer_keys && ci != cj {
                let d = peer_keys_dir(&root, CLUSTERS[ci], CLUSTERS[cj]);
                std::fs::create_dir_all(&d).expect("mkdir peers");
                std::fs::copy(keys[cj].join("cluster.toml"), d.join("cluster.toml"))
                    .expect("copy cluster.toml");
                d
            } else {
                keys[cj].clone()
            }
        };
        let cores = if self.shards == 2 { "[0, 1]" } else { "[0]" };
        let peer_tls = self.peer_tls.then(|| PeerCerts::make(&root));
        let mut routers = Vec::new();
        for (ci, c) in CLUSTERS.iter().enumerate() {
            for r in 0..2 {
                let home = root.join(c);
                let name = format!("ru/{c}/r{r}");
                let my = ip(ci, r);
                let mut cfg = String::new();
                let _ = writeln!(
                    cfg,
                    "region = \"ru\"\ncluster = {c:?}\nrouter = \"r{r}\"\ndev = true"
                );
                let _ = writeln!(cfg, "keyring = {:?}", keys[ci].to_str().expect("utf-8"));
                let _ = writeln!(
                    cfg,
                    "[listen]\napi = \"{my}:{API_PORT}\"\ninternal = \"{my}:{INTERNAL_PORT}\"\nexternal = \"{my}:{EXTERNAL_PORT}\"\nadmin = \"{my}:{ADMIN_PORT}\""
                );
                let _ = writeln!(cfg, "[tuning]\nshard_cores = {cores}\npin = false");
                let _ = writeln!(
                    cfg,
                    "[limits]\nrequest_timeout_ms = {}\n{}",
                    self.request_timeout_ms, self.limits[ci]
                );
                if let Some(h) = self.drain_peer_hold_ms {
                    let _ = writeln!(cfg, "[readiness]\ndrain_peer_hold_ms = {h}");
                }
                if let Some(g) = self.grace_secs {
                    let _ = writeln!(cfg, "[auth]\ngrace_secs = {g}");
                }
                if let Some(pc) = &peer_tls {
                    let (cert, key) = pc.issue(&root, &format!("{c}-r{r}"), &my.to_string());
                    let _ = writeln!(
                        cfg,
                        "[tls.peer]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}",
                        pc.ca
                    );
                }
                let _ = writeln!(cfg, "[[apps]]\nname = {APP:?}\npartitions = 16");
                if let Some(t) = &self.cors[ci] {
                    let _ = writeln!(cfg, "[apps.cors]\n{t}");
                }
                let _ = writeln!(cfg, "[federation]\nentry_point = \"heeus.cloud\"");
                for (cj, c2) in CLUSTERS.iter().enumerate() {
                    let _ = writeln!(
                        cfg,
                        "[[federation.clusters]]\nregion = \"ru\"\ncluster = {c2:?}\nrouters = [\"{}:{EXTERNAL_PORT}\", \"{}:{EXTERNAL_PORT}\"]\nkeys = {:?}",
                        ip(cj, 0),
                        ip(cj, 1),
                        peer_keys(ci, cj).to_str().expect("utf-8")
                    );
                }
                let cfg_path = home.join(format!("r{r}.toml"));
                std::fs::write(&cfg_path, &cfg).expect("write config");
                let proc = spawn_router(&cfg_path, &home, &name, 0, self.shards, false);
                routers.push(FedRouter {
                    name,
                    cluster: c.to_string(),
                    index: r,
                    ip: my,
                    api: SocketAddr::new(my.into(), API_PORT),
                    internal: SocketAddr::new(my.into(), INTERNAL_PORT),
                    external: SocketAddr::new(my.into(), EXTERNAL_PORT),
                    admin: SocketAddr::new(my.into(), ADMIN_PORT),
                    shards: self.shards,
                    cfg: cfg_path,
                    home,
                    restarts: 0,
                    proc,
                });
            }
        }
        let mut tokens = Vec::new();
        for k in &keys {
            let t = fedbus(
                &root,
                &[
                    "token",
                    "client",
                    "--app",
                    APP,
                    "--sub",
                    "alice",
                    "--keyring",
                    k.to_str().expect("utf-8"),
                ],
            )
            .trim()
            .to_string();
            assert_eq!(t.split('.').count(), 3, "not a JWT: {t:?}");
            tokens.push(t);
        }
        let mut f = Federation {
            peer_tls,
            routers,
            tasks: Vec::new(),
            keys,
            tokens,
            delays: self.delays,
            partitions: self.partitions,
            root: root.clone(),
            dir,
        };
        for ci in 0..2 {
            f.start_task(ci);
        }
        f.wait_ready(START_TIMEOUT);
        f
    }
}

/// The federation CA of a federation with TLS peer links, made by `fedbus keys ca`.
pub struct PeerCerts {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// CA private key (PEM).
    pub ca_key: PathBuf,
}

impl PeerCerts {
    /// Creates the federation CA under `root/tls/`.
    pub fn make(root: &Path) -> PeerCerts {
        let dir = root.join("tls");
        std::fs::create_dir_all(&dir).expect("mkdir tls");
        let out = dir.join("federation-ca");
        fedbus(root, &["keys", "ca", "--out", out.to_str().expect("utf-8")]);
        PeerCerts {
            ca: out_file(&out, ".pem"),
            ca_key: out_file(&out, ".key"),
        }
    }

    /// Issues a router certificate for `names` (comma-free list, the first its common name)
    /// as `root/tls/<file>.pem|key` with `fedbus keys cert --ca`; returns (cert, key).
    pub fn issue(&self, root: &Path, file: &str, name: &str) -> (PathBuf, PathBuf) {
        issue_cert(root, &self.ca, &self.ca_key, file, &[name])
    }
}

/// `fedbus keys cert` from the CA `ca`/`ca_key` for `names`, written to `root/tls/<file>.*`.
pub fn issue_cert(
    root: &Path,
    ca: &Path,
    ca_key: &Path,
    file: &str,
    names: &[&str],
) -> (PathBuf, PathBuf) {
    let dir = root.join("tls");
    std::fs::create_dir_all(&dir).expect("mkdir tls");
    let out = dir.join(file);
    let mut args = vec![
        "keys",
        "cert",
        "--ca",
        ca.to_str().expect("utf-8"),
        "--ca-key",
        ca_key.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ];
    for n in names {
        args.push("--name");
        args.push(n);
    }
    fedbus(root, &args);
    (out_file(&out, ".pem"), out_file(&out, ".key"))
}

/// Where `cluster` keeps its copy of `other`'s public keys (with `copied_peer_keys`).
fn peer_keys_dir(root: &Path, cluster: &str, other: &str) -> PathBuf {
    root.join(cluster).join("peers").join(other)
}

fn cluster_index(c: &str) -> usize {
    CLUSTERS
        .iter()
        .position(|x| *x == c)
        .unwrap_or_else(|| panic!("no cluster {c}"))
}

/// Two clusters of two routers each, one echo task per cluster.
pub struct Federation {
    /// spb1 r0, spb1 r1, spb2 r0, spb2 r1.
    pub routers: Vec<FedRouter>,
    /// The echo task of each cluster.
    pub tasks: Vec<FedProc>,
    /// Keyring of each cluster.
    pub keys: Vec<PathBuf>,
    /// Client JWT (demo/echo, alice) of each cluster.
    pub tokens: Vec<String>,
    delays: [u64; 2],
    partitions: [Option<String>; 2],
    /// Root directory of the federation (configs, keyrings, logs).
    pub root: PathBuf,
    /// The federation CA, when peer links run over TLS.
    pub peer_tls: Option<PeerCerts>,
    // Last: removed after the processes are gone.
    dir: TempDir,
}

impl Federation {
    /// A builder with the defaults.
    pub fn builder() -> FederationBuilder {
        FederationBuilder {
            shards: 1,
            delays: [0, 0],
            request_timeout_ms: 10_000,
            drain_peer_hold_ms: None,
            grace_secs: None,
            cors: [None, None],
            peer_tls: std::env::var("FEDBUS_TEST_PEER_TLS").is_ok_and(|v| v == "1"),
            partitions: [None, None],
            copied_peer_keys: false,
            limits: Default::default(),
        }
    }

    /// Starts a federation with the defaults.
    pub fn start() -> Federation {
        Federation::builder().start()
    }

    /// The temp dir holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Router `r` (0 or 1) of `cluster`.
    pub fn router(&self, cluster: &str, r: usize) -> &FedRouter {
        &self.routers[cluster_index(cluster) * 2 + r]
    }

    /// Router `r` (0 or 1) of `cluster`, mutably (to kill it).
    pub fn router_mut(&mut self, cluster: &str, r: usize) -> &mut FedRouter {
        &mut self.routers[cluster_index(cluster) * 2 + r]
    }

    /// The client JWT for `cluster`'s demo/echo.
    pub fn token(&self, cluster: &str) -> &str {
        &self.tokens[cluster_index(cluster)]
    }

    /// Keyring directory of `cluster`.
    pub fn keyring(&self, cluster: &str) -> &Path {
        &self.keys[cluster_index(cluster)]
    }

    /// `cluster`'s copy of `other`'s public keys (built with `copied_peer_keys`).
    pub fn peer_keys_dir(&self, cluster: &str, other: &str) -> PathBuf {
        peer_keys_dir(&self.root, cluster, other)
    }

    /// The operator's step of a rotation: copies `from`'s public `cluster.toml` into `to`'s
    /// copy (a temporary file renamed into place, so a reload never reads half a file).
    pub fn copy_peer_key(&self, from: &str, to: &str) {
        let dir = self.peer_keys_dir(to, from);
        let tmp = dir.join(".cluster.toml.new");
        std::fs::copy(self.keyring(from).join("cluster.toml"), &tmp).expect("copy cluster.toml");
        std::fs::rename(&tmp, dir.join("cluster.toml")).expect("rename cluster.toml");
    }

    /// `/api/ru/<cluster>/demo/echo/api/<wsid>/sys/echo`.
    pub fn path(&self, cluster: &str, wsid: u64) -> String {
        format!("/api/ru/{cluster}/{APP}/api/{wsid}/sys/echo")
    }

    /// An echo request for `cluster` (with its client token).
    pub fn req(&self, cluster: &str, wsid: u64, body: &[u8]) -> Req {
        Req::post(&self.path(cluster, wsid))
            .token(self.token(cluster))
            .body(body)
    }

    /// A peer token from `fedbus token peer` for router `r0` of `cluster` (`region/cluster`),
    /// signed by `keyring`'s cluster key, living `ttl` (`None`: the command's default).
    pub fn peer_token(&self, cluster: &str, keyring: &Path, ttl: Option<&str>) -> String {
        let k = keyring.to_str().expect("utf-8");
        let mut args = vec![
            "token",
            "peer",
            "--router",
            "r0",
            "--cluster",
            cluster,
            "--keyring",
            k,
        ];
        if let Some(t) = ttl {
            args.extend(["--ttl", t]);
        }
        self.fedbus(&args)
    }

    /// Runs `fedbus ARGS` (FEDBUS_HOME = the federation's root); returns stdout trimmed.
    pub fn fedbus(&self, args: &[&str]) -> String {
        fedbus(&self.root, args).trim().to_string()
    }

    fn start_task(&mut self, ci: usize) {
        let parts = self.partitions[ci].clone();
        self.spawn_task(ci, &[0, 1], parts.as_deref());
    }

    /// Starts another echo task in `cluster`, linked only to the routers of index `routers`,
    /// serving `partitions` (`"13"`, `"0-7"`); returns its index in [`Federation::tasks`].
    pub fn start_task_on(&mut self, cluster: &str, routers: &[usize], partitions: &str) -> usize {
        self.spawn_task(cluster_index(cluster), routers, Some(partitions));
        self.tasks.len() - 1
    }

    fn spawn_task(&mut self, ci: usize, routers: &[usize], partitions: Option<&str>) {
        let c = CLUSTERS[ci];
        let log = self
            .root
            .join(c)
            .join(format!("task-{}.log", self.tasks.len()));
        let mut cmd = Command::new(bin());
        cmd.args(["task", "echo", "--cluster", &format!("ru/{c}")])
            .args(["--keyring", self.keys[ci].to_str().expect("utf-8")])
            .args(["--delay-ms", &self.delays[ci].to_string()]);
        if let Some(p) = partitions {
            cmd.args(["--partitions", p]);
        }
        for &r in routers {
            cmd.args(["--router", &self.routers[ci * 2 + r].internal.to_string()]);
        }
        let child = cmd
            .env("FEDBUS_HOME", &self.root)
            .env("FEDBUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("task log"))
            .spawn()
            .expect("spawn fedbus task echo");
        self.tasks.push(FedProc {
            child: Some(child),
            log,
            name: format!("task of {c}"),
        });
    }

    /// Waits until every router routes local requests to its cluster's task and has a
    /// peer link to each router of the other cluster (on every shard, by its log).
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // Linked: every shard has the cluster's task and a peer link to both routers of the
        // other cluster and to its sibling (the routers' own gauges count both kinds: waiting
        // for two would let a sibling link stand in for a missing one to the other cluster).
        // Ready peers: a dialed link is preferred once its router said ready, so until then
        // a request may go to the other router of a cluster. Routers of a cluster whose task
        // serves only some partitions never say ready (`readiness.coverage = "all"`).
        let ready = |c: &str| match self.partitions[cluster_index(c)] {
            None => 1.0,
            Some(_) => 0.0,
        };
        for r in &self.routers {
            let (links, peers) = (r.shards as f64, 3.0 * r.shards as f64);
            let other = if r.cluster == "spb1" { "spb2" } else { "spb1" };
            // The sibling, and both routers of the other cluster.
            let ready_peers = r.shards as f64 * (ready(&r.cluster) + 2.0 * ready(other));
            loop {
                let m = r.metrics();
                let (t, p) = (m.get("fedbus_task_links"), m.get("fedbus_peer_links"));
                let ready = m.get("fedbus_peer_links_ready");
                if t >= links && p >= peers && ready >= ready_peers {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} not ready within {timeout:?}: task links {t}/{links}, peer links {p}/{peers}, ready peer links {ready}/{ready_peers}",
                    r.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Routed: a local request is not 503 (with a delayed task, no answer in 300 ms counts).
        for r in &self.routers {
            let delay = self.delays[cluster_index(&r.cluster)];
            loop {
                let mut c = r.conn();
                c.set_read_timeout(Duration::from_millis(if delay > 0 { 300 } else { 2000 }));
                c.send(&self.req(&r.cluster, 0, b"probe").bytes());
                match c.read_response() {
                    Ok(resp) if resp.status == 503 => {}
                    Ok(resp) => {
                        assert_eq!(resp.status, 200, "probe of {}: {resp:?}", r.name);
                        break;
                    }
                    Err(e) if delay > 0 && super::is_timeout(&e) => break,
                    Err(e) => panic!("probe of {}: {e}", r.name),
                }
                assert!(
                    Instant::now() < deadline,
                    "{} not routed within {timeout:?}",
                    r.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Peer links answer: an unknown app of the other cluster is 404 from its router.
        for r in &self.routers {
            let other = if r.cluster == "spb1" { "spb2" } else { "spb1" };
            for wsid in 0..2u64 {
                let resp = self.wait_served(r, other, wsid, deadline);
                assert_eq!(resp.status, 404, "{resp:?}");
            }
        }
    }

    /// A request for an app the other cluster does not have, answered by that cluster.
    fn wait_served(&self, r: &FedRouter, other: &str, wsid: u64, deadline: Instant) -> Response {
        loop {
            let mut c = r.conn();
            c.set_read_timeout(Duration::from_secs(2));
            let resp = c.request(&Req::get(&format!(
                "/api/ru/{other}/demo/nope/api/{wsid}/sys/echo"
            )));
            let ok = resp.status == 404
                && resp
                    .header("fedbus-served-by")
                    .is_some_and(|s| s.starts_with(&format!("ru/{other}/")));
            if ok {
                return resp;
            }
            assert!(
                Instant::now() < deadline,
                "{} -> {other} not forwarded in time: {resp:?}",
                r.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Connects to `addr` and sends a websocket upgrade `GET /peer` with an optional bearer
/// token; returns the stream and the response head (status line and headers) read up to the
/// blank line, plus any bytes read past it.
pub fn peer_upgrade(
    addr: SocketAddr,
    token: Option<&str>,
) -> (std::net::TcpStream, u16, String, Vec<u8>) {
    ws_upgrade(addr, "/peer", token)
}

/// The status and JSON error code of a refused upgrade whose head [`peer_upgrade`] (or
/// [`ws_upgrade`]) returned: reads the rest of its body from `s`.
pub fn upgrade_refusal(
    status: u16,
    head: &str,
    rest: &[u8],
    s: &mut std::net::TcpStream,
) -> (u16, String) {
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = rest.to_vec();
    while body.len() < len {
        let mut b = [0u8; 1024];
        match super::read_retrying(s, &mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&b[..n]),
        }
    }
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (status, j["error"].as_str().unwrap_or("").to_string())
}

/// Like [`peer_upgrade`], for any websocket endpoint (`/peer`, `/api/ws`).
pub fn ws_upgrade(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (std::net::TcpStream, u16, String, Vec<u8>) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write upgrade");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = crate::read_retrying(&mut s, &mut chunk)
            .unwrap_or_else(|e| panic!("upgrade answer: {e}"));
        assert!(
            n > 0,
            "connection closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let rest = buf[end..].to_vec();
    (s, status, head, rest)
}
