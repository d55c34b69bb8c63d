//! Integration-test harness: real `fedbus` routers and echo tasks on 127.0.0.1 (port 0
//! everywhere), each test in its own temp dir and keyring, processes killed on drop (also when
//! a test panics), and a tiny blocking HTTP/1.1 client with read timeouts so a hung router
//! fails a test instead of hanging it.
//!
//! ```ignore
//! let r = Router::new().shards(2).start();
//! let _t = r.task().partitions("0-15").start();
//! let tok = r.token("demo/echo", "alice");
//! let resp = r.conn().request(&Req::post(&r.path("demo/echo", 42)).token(&tok).body(b"hi"));
//! ```

#![warn(unreachable_pub)]
#![deny(missing_docs)]

pub mod fed;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

pub mod attack;
pub mod launch;
pub mod seed;
pub mod tls;
pub mod ws;

/// The `fedbus` binary under test: `$FEDBUS_BIN` when set, else `fedbus` in the profile
/// directory of the running test executable (`target/<profile>/deps/<test>` ->
/// `target/<profile>/fedbus`, where `cargo test` builds it for the tests of the `fedbus`
/// package). Panics with what to do when it is missing.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FEDBUS_BIN") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "FEDBUS_BIN={} is not a file: build fedbus or unset FEDBUS_BIN",
                p.display()
            );
            return p;
        }
        let exe = std::env::current_exe().expect("path of the test executable");
        let found = exe
            .ancestors()
            .skip(1)
            .take(3)
            .map(|d| d.join(format!("fedbus{}", std::env::consts::EXE_SUFFIX)))
            .find(|p| p.is_file());
        found.unwrap_or_else(|| {
            panic!(
                "the fedbus binary was not found next to {} (looked in its directory and the two \
                 above): run the tests with `cargo test -p fedbus`, build it with \
                 `cargo build -p fedbus` (same profile), or set FEDBUS_BIN=/path/to/fedbus",
                exe.display()
            )
        })
    })
}
/// Longest wait for a router or a task to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default read timeout of client connections.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A unique temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, empty dir named after `tag`.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "fedbus-it-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `fedbus ARGS` to completion with `FEDBUS_HOME=home`; panics on failure; returns stdout.
pub fn fedbus(home: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("FEDBUS_HOME", home)
        .stdin(Stdio::null())
        .output()
        .expect("run fedbus");
    assert!(
        out.status.success(),
        "fedbus {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// `out` with `suffix` appended, as `fedbus keys cert|ca --out` names its files
/// (`out.pem`, `out.key`, whatever dots `out` has).
pub fn out_file(out: &Path, suffix: &str) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// `fedbus keys cert` from the dev CA of `<dir>/keys` (made on first use) for `names`, written
/// to `<dir>/<out>.pem` and `.key`; returns (cert, key). The CA is [`dev_ca`]`(dir)`.
pub fn dev_cert(dir: &Path, out: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    let o = dir.join(out);
    let mut args = vec![
        "keys",
        "cert",
        "--keyring",
        keys.to_str().expect("utf-8"),
        "--out",
        o.to_str().expect("utf-8"),
    ];
    for n in names {
        args.extend(["--name", n]);
    }
    fedbus(dir, &args);
    (out_file(&o, ".pem"), out_file(&o, ".key"))
}

/// The dev CA certificate that [`dev_cert`] issues from, under `dir`.
pub fn dev_ca(dir: &Path) -> PathBuf {
    dir.join("keys/tls/dev-ca.pem")
}

/// Waits (at most 5 s) until every file of the keyring at `dir` is over 300 ms old. A router
/// looks again at a keyring written in the last 100 ms (a second write in the same clock tick
/// keeps the mtime): a test that changes the keyring and wants the router to see it only on
/// SIGHUP makes its change once this returns.
pub fn wait_keyring_settled(dir: &Path) {
    let newest = || {
        std::fs::read_dir(dir.join("apps"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([dir.join("cluster.toml"), dir.join("apps")])
            .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .max()
    };
    wait_for(Duration::from_secs(5), || {
        let t = newest()?;
        let age = std::time::SystemTime::now().duration_since(t).ok()?;
        (age > Duration::from_millis(300)).then_some(())
    })
    .unwrap_or_else(|| panic!("keyring {} still written to after 5 s", dir.display()));
}

/// Creates a keyring in `dir` with secrets for `apps`.
pub fn keys_init(home: &Path, dir: &Path, apps: &[&str]) {
    let d = dir.to_str().expect("utf-8 path");
    let mut args = vec!["keys", "init", "--keyring", d];
    for a in apps {
        args.push("--app");
        args.push(a);
    }
    fedbus(home, &args);
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&mut self, sig: libc::c_int) {
        let c = self.child.as_ref().expect("process running");
        let pid = libc::pid_t::try_from(c.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// Waits up to `within` for `child` to exit, sending nothing; reaps it (`child` becomes None).
/// None when it did not exit in time (then it is still running) or was already reaped.
pub(crate) fn wait_child_exit(
    child: &mut Option<Child>,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let c = child.as_mut()?;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = c.try_wait() {
            *child = None;
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
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

/// Builder of a router: `Router::new().shards(2).apps(..).limit(..).start()`.
pub struct RouterBuilder {
    shards: usize,
    apps: Vec<(String, u32)>,
    limits: Vec<(String, String)>,
    tuning: Vec<(String, String)>,
    tls: Vec<(PathBuf, PathBuf)>,
    /// `listen.internal_tls`: task links over TLS with the `tls` certificates.
    internal_tls: bool,
    /// `(app, body of its [apps.cors] table)`.
    cors: Vec<(String, String)>,
    /// Extra `[listen]` entries, e.g. `("admin_max_connections", "2")`.
    listen: Vec<(String, String)>,
    /// `dev = true` at the top of the config.
    dev: bool,
    /// `tuning.pin`.
    pin: bool,
    /// Whole sections appended at the end of the config (e.g. `[federation]`).
    tail: String,
    /// Extra environment variables of `fedbus run`.
    envs: Vec<(String, String)>,
}

impl Default for RouterBuilder {
    fn default() -> Self {
        RouterBuilder {
            shards: 1,
            apps: vec![("demo/echo".into(), 16), ("demo/other".into(), 4)],
            limits: Vec::new(),
            tuning: Vec::new(),
            tls: Vec::new(),
            internal_tls: false,
            cors: Vec::new(),
            listen: Vec::new(),
            dev: false,
            pin: false,
            tail: String::new(),
            envs: Vec::new(),
        }
    }
}

impl RouterBuilder {
    /// `tuning.pin`: shards and the control thread pinned to their cores (default false: the
    /// kernel places them, as tests share the machine).
    pub fn pin(mut self, on: bool) -> Self {
        self.pin = on;
        self
    }

    /// Number of shards (1 or 2 on a 2-core machine).
    pub fn shards(mut self, n: usize) -> Self {
        assert!((1..=2).contains(&n), "tests run 1 or 2 shards");
        self.shards = n;
        self
    }

    /// Apps served: `(name, partitions)`.
    pub fn apps(mut self, apps: &[(&str, u32)]) -> Self {
        self.apps = apps.iter().map(|(a, p)| (a.to_string(), *p)).collect();
        self
    }

    /// A `[limits]` override, e.g. `limit("max_body_bytes", 1024)`.
    pub fn limit(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.limits.push((key.into(), value.to_string()));
        self
    }

    /// A `[tuning]` override, e.g. `tuning("memory_trim_ms", 1000)`.
    pub fn tuning(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.tuning.push((key.into(), value.to_string()));
        self
    }

    /// A TLS api listener (`listen.api_tls` on a free port) with these `(cert, key)` PEM files
    /// as `[[tls.certs]]`, the first the default.
    pub fn tls(mut self, certs: &[(PathBuf, PathBuf)]) -> Self {
        self.tls = certs.to_vec();
        self
    }

    /// Task links over TLS (`listen.internal_tls`) with the certificates given to [`Self::tls`].
    pub fn internal_tls(mut self) -> Self {
        self.internal_tls = true;
        self
    }

    /// The `[apps.cors]` table of `app`, e.g. `allowed_origins = ["http://a.example"]`.
    pub fn cors(mut self, app: &str, table: &str) -> Self {
        self.cors.push((app.into(), table.into()));
        self
    }

    /// A `[listen]` entry, e.g. `listen("admin_max_connections", 2)` or
    /// `listen("external", "\"127.0.0.1:0\"")` (the value is written as TOML).
    pub fn listen(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.listen.push((key.into(), value.to_string()));
        self
    }

    /// `dev = true`: the router mints its own peer token from its keyring (a `[federation]`
    /// with other clusters needs one).
    pub fn dev(mut self) -> Self {
        self.dev = true;
        self
    }

    /// Whole TOML sections appended at the end of the config, e.g. a `[federation]` table
    /// whose `[[federation.clusters]]` name keyrings the test made (`keys_init`).
    pub fn tail(mut self, toml: &str) -> Self {
        self.tail.push_str(toml);
        self.tail.push('\n');
        self
    }

    /// An environment variable of the router process (e.g. the test-only
    /// `FEDBUS_FAULT_PANIC_SHARD` of the `fault-injection` feature).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// `limits.request_timeout_ms` (default 10000).
    pub fn request_timeout_ms(self, ms: u64) -> Self {
        self.limit("request_timeout_ms", ms)
    }

    /// Writes the config, makes the keyring, starts `fedbus run` and waits for its listeners.
    pub fn start(self) -> Router {
        let dir = TempDir::new("router");
        let home = dir.path().to_path_buf();
        let keys = home.join("keys");
        let app_names: Vec<&str> = self.apps.iter().map(|(a, _)| a.as_str()).collect();
        keys_init(&home, &keys, &app_names);

        let cores = if self.shards == 2 { "[0, 1]" } else { "[0]" };
        let mut cfg = String::new();
        let _ = writeln!(cfg, "region = \"local\"\ncluster = \"dev\"");
        if self.dev {
            let _ = writeln!(cfg, "dev = true");
        }
        let _ = writeln!(cfg, "keyring = {:?}", keys.to_str().expect("utf-8 path"));
        let _ = writeln!(
            cfg,
            "[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\""
        );
        if !self.tls.is_empty() {
            let _ = writeln!(cfg, "api_tls = \"127.0.0.1:0\"");
        }
        if self.internal_tls {
            let _ = writeln!(cfg, "internal_tls = true");
        }
        for (k, v) in &self.listen {
            let _ = writeln!(cfg, "{k} = {v}");
        }
        let _ = writeln!(cfg, "[tuning]\nshard_cores = {cores}\npin = {}", self.pin);
        for (k, v) in &self.tuning {
            let _ = writeln!(cfg, "{k} = {v}");
        }
        for (cert, key) in &self.tls {
            let _ = writeln!(cfg, "[[tls.certs]]\ncert = {cert:?}\nkey = {key:?}");
        }
        if !self.limits.is_empty() {
            let _ = writeln!(cfg, "[limits]");
            for (k, v) in &self.limits {
                let _ = writeln!(cfg, "{k} = {v}");
            }
        }
        for (a, p) in &self.apps {
            let _ = writeln!(cfg, "[[apps]]\nname = {a:?}\npartitions = {p}");
            for (_, table) in self.cors.iter().filter(|(app, _)| app == a) {
                let _ = writeln!(cfg, "[apps.cors]\n{table}");
            }
        }
        cfg.push_str(&self.tail);
        let cfg_path = home.join("router.toml");
        std::fs::write(&cfg_path, &cfg).expect("write config");

        let log = home.join("router.log");
        let (child, rx) = launch::spawn_run_child(&home, &cfg_path, &[], &self.envs, &log);
        let mut proc = Proc {
            child: Some(child),
            log: log.clone(),
            name: "router".into(),
        };
        let ready = wait_ready_line(&rx, || proc.alive(), &log, "router");
        let api = ready.api;
        let api_tls = ready.api_tls;
        assert_eq!(
            api_tls.is_some(),
            !self.tls.is_empty(),
            "a TLS api listener exactly when certificates are configured"
        );
        let admin = ready.admin.expect("admin listener enabled");
        let internal = ready.internal;
        let external = ready.external;
        assert_eq!(
            internal.len(),
            self.shards,
            "one internal listener per shard"
        );
        Router {
            proc,
            api,
            api_tls,
            internal,
            external,
            admin,
            keys,
            tokens: std::cell::RefCell::new(HashMap::new()),
            tasks_started: std::cell::Cell::new(0),
            dir,
        }
    }
}

/// `/metrics` of the admin listener at `admin`, as text.
pub fn metrics_text_at(admin: SocketAddr) -> String {
    let mut c = Conn::open(admin);
    c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read_response().expect("metrics response");
    assert_eq!(r.status, 200, "metrics: {r:?}");
    String::from_utf8(r.body).expect("utf-8 metrics")
}

/// `GET path` on the admin listener at `admin`: the status and the body as text.
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut c = Conn::open(admin);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let r = c.read_response().expect("admin response");
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// What `fedbus run` reports on its ready line (`fedbus-ready {json}`).
#[derive(Debug, Clone)]
pub struct Ready {
    /// The api listener.
    pub api: SocketAddr,
    /// The TLS api listener, when configured.
    pub api_tls: Option<SocketAddr>,
    /// Each shard's internal listener.
    pub internal: Vec<SocketAddr>,
    /// Each shard's unix task-link listener (`unix:<path>`), with `listen.internal_unix`.
    pub internal_unix: Vec<String>,
    /// The admin listener, when enabled.
    pub admin: Option<SocketAddr>,
    /// The external listener (peer links), when the federation has other clusters.
    pub external: Option<SocketAddr>,
}

/// Parses a `fedbus-ready {json}` line; None for any other line.
pub fn parse_ready_line(line: &str) -> Option<Ready> {
    let j: serde_json::Value = serde_json::from_str(line.strip_prefix("fedbus-ready ")?).ok()?;
    let addr = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse().ok());
    Some(Ready {
        api: addr(&j["api"])?,
        api_tls: addr(&j["api_tls"]),
        internal: j["internal"].as_array()?.iter().filter_map(addr).collect(),
        internal_unix: j["internal_unix"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        admin: addr(&j["admin"]),
        external: addr(&j["external"]),
    })
}

/// Waits (bounded by the start timeout) for the router's ready line on its stdout.
/// Shared by single routers and federations; `alive` says whether the process still runs.
pub(crate) fn wait_ready_line(
    rx: &mpsc::Receiver<String>,
    mut alive: impl FnMut() -> bool,
    log: &Path,
    name: &str,
) -> Ready {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(r) = parse_ready_line(&line) {
                    return r;
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => panic!(
                "{name} printed no ready line within {START_TIMEOUT:?} (alive: {})\nstdout:\n{seen}\nstderr:\n{}",
                alive(),
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

/// A running router (killed on drop).
pub struct Router {
    proc: Proc,
    /// Api listener (clients).
    pub api: SocketAddr,
    /// TLS api listener (HTTPS, `wss://`), when the builder configured certificates.
    pub api_tls: Option<SocketAddr>,
    /// Internal (task link) address of each shard.
    pub internal: Vec<SocketAddr>,
    /// External listener (peer links), when the config lists other clusters.
    pub external: Option<SocketAddr>,
    /// Admin listener (`/metrics`).
    pub admin: SocketAddr,
    /// The keyring directory.
    pub keys: PathBuf,
    tokens: std::cell::RefCell<HashMap<String, String>>,
    tasks_started: std::cell::Cell<u32>,
    // Last: removed after the process is gone.
    dir: TempDir,
}

impl Router {
    /// A builder with the defaults (one shard).
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> RouterBuilder {
        RouterBuilder::default()
    }

    /// `FEDBUS_HOME` of the router (its temp dir).
    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.internal.len()
    }

    /// The router's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// SIGTERM (the router starts its drain), without waiting.
    pub fn sigterm(&mut self) {
        self.proc.signal(libc::SIGTERM);
    }

    /// Waits up to `within` for the exit, sending nothing; None when it did not exit in time.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        wait_child_exit(&mut self.proc.child, within)
    }

    /// A client token from `fedbus token client` (cached per app and subject).
    pub fn token(&self, app: &str, sub: &str) -> String {
        let key = format!("{app} {sub}");
        if let Some(t) = self.tokens.borrow().get(&key) {
            return t.clone();
        }
        let t = launch::client_token(self.home(), &self.keys, app, sub);
        assert_eq!(t.split('.').count(), 3, "not a JWT: {t:?}");
        self.tokens.borrow_mut().insert(key, t.clone());
        t
    }

    /// The API path of `app` for `wsid` (local cluster, service `api`, `sys/echo`).
    pub fn path(&self, app: &str, wsid: u64) -> String {
        format!("/api/local/dev/{app}/api/{wsid}/sys/echo")
    }

    /// A new client connection to the api listener.
    pub fn conn(&self) -> Conn {
        Conn::open(self.api)
    }

    /// One request on a fresh connection.
    pub fn request(&self, req: &Req) -> Response {
        self.conn().request(req)
    }

    /// Builder of an echo task linked to this router.
    pub fn task(&self) -> TaskBuilder<'_> {
        TaskBuilder {
            router: self,
            app: "demo/echo".into(),
            partitions: "0-15".into(),
            role: "main".into(),
            delay_ms: 0,
            redirect_to: None,
            service_token: None,
        }
    }

    /// `/metrics` of the admin listener, as text.
    pub fn metrics_text(&self) -> String {
        metrics_text_at(self.admin)
    }

    /// `/metrics` parsed; panics on a line that is not Prometheus text.
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.metrics_text())
    }

    /// Waits (at most `START_TIMEOUT`) until the control thread published a routing table
    /// newer than `generation` (`fedbus_routing_generation`, read before a link registered:
    /// the link is registered before the table the shards route by holds it, and a request
    /// sent in between gets 503 `no_live_task`).
    pub fn wait_published_since(&self, generation: f64, what: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.metrics().get("fedbus_routing_generation") <= generation {
            assert!(
                Instant::now() < deadline,
                "{what}: no routing table published within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a routing table published after `generation` that routes to every task link
    /// open on the router and not ejected (`fedbus_routing_tasks` = `fedbus_task_links` -
    /// `fedbus_task_links_ejected`; a one-shard router, whose links are each a task): a
    /// generation alone may be the publication of an earlier change (a link that just closed)
    /// and not yet hold the link registered since.
    pub fn wait_routed_since(&self, generation: f64, what: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let m = self.metrics();
            let open = m.get("fedbus_task_links") - m.get("fedbus_task_links_ejected");
            if m.get("fedbus_routing_generation") > generation
                && m.get("fedbus_routing_tasks") == open
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no routing table with the {open} open task links published within {START_TIMEOUT:?} (it routes to {})",
                m.get("fedbus_routing_tasks")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn registrations(&self) -> usize {
        self.log().matches("task link registered").count()
    }

    /// Waits (at most 5 s) until `n` requests wait for a task's answer
    /// (`fedbus_pending_requests`): requests sent before a kill are in flight at the task, not
    /// still on their way to the router. On a loaded machine a fixed sleep was not always
    /// enough for the router to route them.
    pub fn wait_pending(&self, n: f64) {
        let pending = || self.metrics().get("fedbus_pending_requests");
        wait_for(Duration::from_secs(5), || (pending() >= n).then_some(()))
            .unwrap_or_else(|| panic!("{} requests pending, not {n}, after 5 s", pending()));
    }
}

/// Parsed Prometheus text: `name{labels}` -> value.
#[derive(Debug, Default)]
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    /// Parses the text format strictly: every non-comment, non-empty line is
    /// `name[{labels}] value`, the name `[a-zA-Z_:][a-zA-Z0-9_:]*`, the labels `k="v",...`,
    /// the value a float.
    pub fn parse(text: &str) -> Metrics {
        let mut m = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                if let Some(rest) = line.strip_prefix("# ") {
                    assert!(
                        rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                        "bad comment line {line:?}"
                    );
                }
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in metrics line {line:?}"));
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value of {line:?} is not a float"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, Some(l)),
                None => (series, None),
            };
            let mut chars = name.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
            assert!(
                first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            if let Some(l) = labels {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                for pair in l.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    assert!(
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name in {line:?}"
                    );
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
            }
            assert!(
                m.insert(series.to_string(), v).is_none(),
                "series twice: {line:?}"
            );
        }
        Metrics(m)
    }

    /// The value of a series (`name{labels}` exactly as printed), 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }
}

/// Builder of an echo task: `router.task().partitions("0-15").delay_ms(0).start()`.
pub struct TaskBuilder<'a> {
    router: &'a Router,
    app: String,
    partitions: String,
    role: String,
    delay_ms: u64,
    redirect_to: Option<String>,
    service_token: Option<String>,
}

/// Starts `fedbus <args> --router <shard 0> --keyring <keys>` linked to `r` and waits until every
/// shard registered a link of it and the control thread published a routing table after that
/// (a link is registered before the table the shards route by holds it: a request sent in
/// between gets 503 `no_live_task`). `label` tells tasks apart in logs.
pub fn spawn_task(r: &Router, args: &[String], label: &str) -> Task {
    let n = r.tasks_started.get();
    r.tasks_started.set(n + 1);
    let before = r.registrations();
    let generation = r.metrics().get("fedbus_routing_generation");
    let log = r.home().join(format!("task-{n}{label}.log"));
    let child = Command::new(bin())
        .args(args)
        .arg("--router")
        .arg(r.internal[0].to_string())
        .args(["--keyring", r.keys.to_str().expect("utf-8 path")])
        .env("FEDBUS_HOME", r.home())
        .env("FEDBUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("task log"))
        .spawn()
        .expect("spawn fedbus task");
    let mut task = Task {
        proc: Proc {
            child: Some(child),
            log,
            name: format!("task {n}{label}"),
        },
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while r.registrations() < before + r.shards() {
        assert!(task.proc.alive(), "task {n}{label} exited");
        assert!(
            Instant::now() < deadline,
            "task {n}{label} not registered on {} shards within {START_TIMEOUT:?}",
            r.shards()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    r.wait_published_since(generation, &format!("task {n}{label}"));
    task
}

impl TaskBuilder<'_> {
    /// Present this service token instead of a dev token minted by the task.
    pub fn service_token(mut self, t: &str) -> Self {
        self.service_token = Some(t.into());
        self
    }

    /// App served (default `demo/echo`).
    pub fn app(mut self, a: &str) -> Self {
        self.app = a.into();
        self
    }

    /// Partitions served: `0-15`, `0-3,8` (default `0-15`).
    pub fn partitions(mut self, p: &str) -> Self {
        self.partitions = p.into();
        self
    }

    /// Role (default `main`).
    pub fn role(mut self, r: &str) -> Self {
        self.role = r.into();
        self
    }

    /// Delay before each answer, in ms.
    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = ms;
        self
    }

    /// Redirect every request to `role` instead of answering.
    pub fn redirect_to(mut self, role: &str) -> Self {
        self.redirect_to = Some(role.into());
        self
    }

    /// Starts `fedbus task echo` and waits until every shard registered its link and a
    /// request to its first partition is routed (role `main` without redirect only).
    pub fn start(self) -> Task {
        let r = self.router;
        let mut args: Vec<String> = [
            "task",
            "echo",
            "--app",
            &self.app,
            "--partitions",
            &self.partitions,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend([
            "--role".into(),
            self.role.clone(),
            "--delay-ms".into(),
            self.delay_ms.to_string(),
        ]);
        if let Some(to) = &self.redirect_to {
            args.extend(["--redirect-to".into(), to.clone()]);
        }
        if let Some(t) = &self.service_token {
            args.extend(["--token".into(), t.clone()]);
        }
        // 1. Every shard of the router registered a link of this task, and a routing table was
        // published after that (a task reached only by a Redirect needs nothing more).
        let task = spawn_task(r, &args, "");
        let (n, deadline) = (&task.proc.name, Instant::now() + START_TIMEOUT);
        // 2. A request is routed (anything but 503; with a delay, no answer
        // within the probe time also counts). A 200 counts only from the task's own
        // partition: another task of the app may answer the probe as an emergency partition.
        if self.role == "main" && self.redirect_to.is_none() {
            let first: u64 = self
                .partitions
                .split([',', '-'])
                .next()
                .and_then(|p| p.trim().parse().ok())
                .expect("first partition");
            let tok = r.token(&self.app, "probe");
            let home = first.to_string();
            let probe = Req::post(&r.path(&self.app, first))
                .token(&tok)
                .body(b"probe");
            loop {
                let mut c = r.conn();
                c.set_read_timeout(Duration::from_millis(if self.delay_ms > 0 {
                    300
                } else {
                    2000
                }));
                c.send(&probe.bytes());
                match c.read_response() {
                    Ok(resp) if resp.status == 503 => {}
                    Ok(resp) => {
                        assert_eq!(resp.status, 200, "probe of {n}: {resp:?}");
                        let own = resp.header("fedbus-partition") == Some(home.as_str())
                            && resp.header("fedbus-emergency").is_none();
                        if own {
                            break;
                        }
                    }
                    Err(e) if self.delay_ms > 0 && is_timeout(&e) => break,
                    Err(e) => panic!("probe of {n}: {e}"),
                }
                assert!(
                    Instant::now() < deadline,
                    "{n} not routed within {START_TIMEOUT:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        task
    }
}

/// Whether a read or write error is a socket timeout (`WouldBlock` or `TimedOut`).
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Whether the other side closes `s` (end of stream or a reset) within `limit`, reading and
/// dropping whatever it sends first; false when it is still open after `limit`.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut chunk = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match read_retrying(s, &mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return false,
            Err(_) => return true,
        }
    }
}

/// Whether the server at `server` (IPv4) has read everything the client at local port
/// `client_port` sent it: its established socket's receive queue in `/proc/net/tcp` is empty.
/// A fact a test can wait on before it relies on the server having taken some bytes in (the
/// kernel's queue is drained; the server's code runs on them at its next turn).
pub fn server_read_all(server: SocketAddr, client_port: u16) -> bool {
    let std::net::IpAddr::V4(ip) = server.ip() else {
        return false;
    };
    // /proc/net/tcp writes an address as the 32-bit word in host order, then the port.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        server.port()
    );
    let tail = format!(":{client_port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 4
            && f[3] == "01"
            && f[1] == local
            && f[2].ends_with(&tail)
            && f[4]
                .split(':')
                .nth(1)
                .is_some_and(|rx| rx.trim_start_matches('0').is_empty())
    })
}

/// Holds `s`'s receive buffer to `bytes` (the kernel doubles it), so that a peer that stops
/// reading fills it after that much, whatever `net.ipv4.tcp_rmem` lets autotuning reach.
pub fn limit_receive_buffer(s: &TcpStream, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on an open socket with a pointer to an int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// A running echo task (killed on drop).
pub struct Task {
    proc: Proc,
}

impl Task {
    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// SIGSTOP: the task freezes with its links open (no pong, no answer) until [`Task::resume`].
    pub fn stop(&mut self) {
        self.proc.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Task::stop`].
    pub fn resume(&mut self) {
        self.proc.signal(libc::SIGCONT);
    }

    /// SIGTERM: the task stops gracefully (`TaskOptions::stop_timeout`).
    pub fn sigterm(&mut self) {
        self.proc.signal(libc::SIGTERM);
    }

    /// Waits up to `within` for the task to exit on its own; reaps it.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        wait_child_exit(&mut self.proc.child, within)
    }

    /// The task's log so far, without color codes.
    pub fn log(&self) -> String {
        launch::plain(&std::fs::read_to_string(&self.proc.log).unwrap_or_default())
    }
}

/// A request, built fluently: `Req::post(path).token(t).header("x", "y").body(b"..")`.
#[derive(Clone, Debug)]
pub struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    content_length: bool,
}

impl Req {
    /// A request with `method` and `path`.
    pub fn new(method: &str, path: &str) -> Req {
        Req {
            method: method.into(),
            path: path.into(),
            headers: vec![("Host".into(), "127.0.0.1".into())],
            body: Vec::new(),
            content_length: true,
        }
    }

    /// A POST to `path`.
    pub fn post(path: &str) -> Req {
        Req::new("POST", path)
    }

    /// A GET of `path`.
    pub fn get(path: &str) -> Req {
        Req::new("GET", path)
    }

    /// Adds `Authorization: Bearer <t>`.
    pub fn token(self, t: &str) -> Req {
        self.header("Authorization", &format!("Bearer {t}"))
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.into(), v.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, b: &[u8]) -> Req {
        self.body = b.to_vec();
        self
    }

    /// Leave out `Content-Length` (for chunked requests).
    pub fn no_content_length(mut self) -> Req {
        self.content_length = false;
        self
    }

    /// The request on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        for (k, val) in &self.headers {
            v.extend_from_slice(format!("{k}: {val}\r\n").as_bytes());
        }
        if self.content_length {
            v.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        v.extend_from_slice(b"\r\n");
        v.extend_from_slice(&self.body);
        v
    }
}

/// A response: status, headers (names lowercased), body.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: HashMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.body.len() > 300 {
            format!("<{} bytes>", self.body.len())
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        };
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Response {
    /// A header by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// Asserts a router error: `status`, content-type JSON and the body
    /// `{"status":N,"error":code,"message":"..."}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let j = self.json();
        assert_eq!(j["status"], status, "{self:?}");
        assert_eq!(j["error"], code, "{self:?}");
        assert!(
            j["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{self:?}"
        );
        let keys: Vec<&String> = j.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), 3, "only status, error, message: {self:?}");
    }
}

/// A blocking client connection with a read timeout.
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

/// `read` that tries again when a signal interrupts it. A blocking socket read with a timeout
/// (`SO_RCVTIMEO`, which the test clients set) is never restarted by the kernel, whatever
/// `SA_RESTART` says (signal(7)), so on a loaded machine one returned `Interrupted system
/// call` and failed a test that had nothing wrong with it.
pub fn read_retrying(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// [`read_retrying`] as a method of every reader, for the tests' raw sockets.
pub trait ReadRetrying: Read {
    /// `read`, tried again while a signal interrupts it.
    fn read_retrying(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_retrying(self, buf)
    }
}

impl<R: Read + ?Sized> ReadRetrying for R {}

impl Conn {
    /// Connects to `addr` (read timeout `READ_TIMEOUT`).
    pub fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(READ_TIMEOUT)).expect("timeout");
        let _ = s.set_nodelay(true);
        Conn { s, buf: Vec::new() }
    }

    /// A second handle on the socket, to write from another thread while this one reads.
    pub fn writer(&self) -> TcpStream {
        self.s.try_clone().expect("clone the socket")
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&mut self, t: Duration) {
        self.s.set_read_timeout(Some(t)).expect("timeout");
    }

    /// Local port of the connection.
    pub fn local_port(&self) -> u16 {
        self.s.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Writes raw bytes (one write call).
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write request");
    }

    /// Writes a raw request; tolerates the router closing early (it may answer and close
    /// before reading everything, e.g. 431).
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    /// One request, one response; panics on a read error or timeout.
    pub fn request(&mut self, req: &Req) -> Response {
        self.send(&req.bytes());
        self.read_response()
            .unwrap_or_else(|e| panic!("no response to {} {}: {e}", req.method, req.path))
    }

    /// True when the router closed the connection (reads EOF within the read timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(read_retrying(&mut self.s, &mut b), Ok(0) | Err(_)) && self.buf.is_empty()
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = read_retrying(&mut self.s, &mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed ({} bytes buffered)", self.buf.len()),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads one response (skipping `100 Continue`); the body by `content-length`.
    pub fn read_response(&mut self) -> std::io::Result<Response> {
        self.read_response_for("GET")
    }

    /// Reads the answer to a `method` request: the answer to HEAD has no body whatever its
    /// `content-length` says, and 204 and 304 have none and need no length (RFC 9110).
    pub fn read_response_for(&mut self, method: &str) -> std::io::Result<Response> {
        loop {
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                self.fill()?;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or("");
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                )
            })?;
            if version != "HTTP/1.1" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                ));
            }
            let mut headers = HashMap::new();
            for l in lines.filter(|l| !l.is_empty()) {
                let (k, v) = l.split_once(':').ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad header {l:?}"),
                    )
                })?;
                let k = k.trim().to_ascii_lowercase();
                assert!(
                    headers.insert(k.clone(), v.trim().to_string()).is_none(),
                    "header {k} twice in {head:?}"
                );
            }
            self.buf.drain(..end);
            if status == 100 {
                continue;
            }
            let bodiless = method == "HEAD" || status == 204 || status == 304;
            let len: usize = if bodiless {
                0
            } else {
                headers
                    .get("content-length")
                    .and_then(|v: &String| v.parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("no content-length in {head:?}"),
                        )
                    })?
            };
            while self.buf.len() < len {
                self.fill()?;
            }
            let body: Vec<u8> = self.buf.drain(..len).collect();
            return Ok(Response {
                status,
                headers,
                body,
            });
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), no extra crate.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// [`wait_for`] that panics with `what` and `ctx()` (a log, say) when `within` passes.
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
    ctx: impl Fn() -> String,
) -> T {
    wait_for(within, &mut f).unwrap_or_else(|| panic!("{what}: not within {within:?}\n{}", ctx()))
}

/// `kill -<sig> <pid>` (the tests have no libc of their own); panics when kill fails.
pub fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}: {st}");
}

/// Panics when `text` (a process's output) shows a panic instead of an error.
pub fn assert_no_panic(text: &str) {
    assert!(
        !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
        "a panic instead of an error:\n{text}"
    );
}

/// Polls `f` every 10 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
