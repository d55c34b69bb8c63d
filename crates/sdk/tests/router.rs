//! fedbus-sdk against the real router: a two-shard `fedbus run` (the release binary, built
//! first with `cargo build --release -p fedbus`), the example's echo handler on a tokio runtime
//! in this process, and HTTP clients. Every wait is on a fact (the task's counters, the
//! router's `/metrics`, an answer) and bounded.

#[path = "../examples/support/echo.rs"]
mod support;

use fedbus_sdk::{Request, Task, TaskOptions};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Loopback address of this test's router (not 127.0.0.1, to keep clear of other tests).
const IP: &str = "127.0.0.61";
/// Longest wait for anything.
const WAIT: Duration = Duration::from_secs(15);
/// Requests held in the handler at once by the concurrency check.
const GATHER: usize = 8;

fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDBUS_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/fedbus");
    assert!(
        p.exists(),
        "the router binary {} is missing: build it first with `cargo build --release -p fedbus` \
         (or point FEDBUS_BIN at one)",
        p.display()
    );
    p
}

/// Polls `f` every 10 ms until it holds; panics with `what` after [`WAIT`].
fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("fedbus-sdk-it-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `fedbus ARGS` to completion; its stdout.
fn fedbus(home: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("FEDBUS_HOME", home)
        .stdin(Stdio::null())
        .output()
        .expect("run fedbus");
    assert!(
        out.status.success(),
        "fedbus {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// A port `p` on [`IP`] with `p + 1` free too (shard k listens on `p + k`).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind((IP, 0)).expect("bind");
        let p = a.local_addr().expect("addr").port();
        if p < u16::MAX && TcpListener::bind((IP, p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two free consecutive ports on {IP}");
}

/// A two-shard `fedbus run`, killed on drop (its log printed when the test fails).
struct Router {
    child: Child,
    log: PathBuf,
    api: SocketAddr,
    admin: SocketAddr,
}

impl Router {
    fn start(home: &Path, keys: &Path, internal_port: u16) -> Router {
        Router::start_with(home, keys, internal_port, "")
    }

    /// [`Router::start`] with more `[listen]` lines.
    fn start_with(home: &Path, keys: &Path, internal_port: u16, listen: &str) -> Router {
        let cfg = format!(
            "region = \"local\"\ncluster = \"dev\"\nkeyring = {keys:?}\n\
             [listen]\napi = \"{IP}:0\"\ninternal = \"{IP}:{internal_port}\"\nadmin = \"{IP}:0\"\n{listen}\n\
             [tuning]\nshard_cores = [0, 1]\npin = false\n\
             [limits]\nping_interval_ms = 200\nrequest_timeout_ms = 5000\n\
             [[apps]]\nname = \"demo/echo\"\npartitions = 16\n"
        );
        let cfg_path = home.join("router.toml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        let log = home.join("router.log");
        let mut child = Command::new(bin())
            .args(["run", "--config", cfg_path.to_str().expect("utf-8")])
            .env("FEDBUS_HOME", home)
            .env("FEDBUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn fedbus run");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut r = Router {
            child,
            log,
            api: "0.0.0.0:0".parse().expect("addr"),
            admin: "0.0.0.0:0".parse().expect("addr"),
        };
        let addr = |s: &str| -> SocketAddr {
            let s = s.strip_prefix("http://").unwrap_or(s);
            s.split('/').next().unwrap_or(s).parse().expect("address")
        };
        let (mut api, mut admin, mut shards) = (None, None, 0);
        let deadline = Instant::now() + WAIT;
        while api.is_none() || admin.is_none() || shards < 2 {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("router did not print its listeners within {WAIT:?}"));
            match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["api", url, ..] => api = Some(addr(url)),
                ["admin", url] => admin = Some(addr(url)),
                ["internal", a, "shard", k, ..] => {
                    let expect = format!("{IP}:{}", internal_port + k.parse::<u16>().expect("k"));
                    assert_eq!(*a, expect, "shard {k}'s internal address");
                    shards += 1;
                }
                _ => {}
            }
        }
        (r.api, r.admin) = (api.expect("api"), admin.expect("admin"));
        r
    }

    /// Waits until `fedbus_ready` is 1: every partition of `demo/echo` has a task in the
    /// published routing table (a link is registered a moment before it is published).
    fn wait_ready(&self) {
        wait("fedbus_ready 1", || self.metric("fedbus_ready") == 1.0);
    }

    /// A series of `/metrics` (0 when absent).
    fn metric(&self, series: &str) -> f64 {
        let r = http(self.admin, "GET", "/metrics", None, None, b"");
        assert_eq!(r.status, 200, "metrics");
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- router log ----");
            eprintln!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One HTTP/1.1 request on a fresh connection (read timeout 10 s); the body by content-length.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).expect("write request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("read response");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    while buf.len() < end + len {
        let n = s.read(&mut chunk).expect("read body");
        assert!(n > 0, "connection closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    Response {
        status,
        headers,
        body: buf[end..end + len].to_vec(),
    }
}

fn path(wsid: u64, function: &str) -> String {
    format!("/api/local/dev/demo/echo/api/{wsid}/sys/{function}")
}

#[test]
fn sdk_task_serves_through_a_two_shard_router() {
    let dir = TempDir::new();
    let home = dir.0.as_path();
    let keys = home.join("keys");
    let k = keys.to_str().expect("utf-8");
    fedbus(
        home,
        &["keys", "init", "--keyring", k, "--app", "demo/echo"],
    );
    let service = |id: &str, role: Option<&str>| {
        let mut a = vec!["token", "service", "--task-id", id, "--app", "demo/echo"];
        a.extend(["--keyring", k]);
        if let Some(r) = role {
            a.extend(["--role", r]);
        }
        fedbus(home, &a)
    };
    let svc = service("sdk-echo", None);
    let client = fedbus(
        home,
        &[
            "token",
            "client",
            "--app",
            "demo/echo",
            "--sub",
            "alice",
            "--keyring",
            k,
        ],
    );
    let port = free_port_pair();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // The example's handler; requests to function `gather` first wait until GATHER of them
    // are in the handler at once, which only a task that serves concurrently gets to.
    let barrier = Arc::new(tokio::sync::Barrier::new(GATHER));
    let handler = move |req: Request| {
        let barrier = barrier.clone();
        async move {
            if req.function() == Some("gather") {
                barrier.wait().await;
            }
            support::echo(req).await
        }
    };
    let opts = TaskOptions::new(
        [format!("{IP}:{port}")],
        "demo/echo",
        (0..16).collect::<Vec<u32>>(),
        svc,
    );
    let task = {
        let _rt = rt.enter();
        Task::spawn(opts, handler).expect("spawn the task")
    };

    // 1. Started before the router: the task retries (with backoff) until one listens.
    wait("the task retries while no router listens", || {
        task.stats().connect_failures >= 2
    });
    assert_eq!(task.stats().connects, 0);
    let router = Router::start(home, &keys, port);

    // 2. It registers on both shards (following the hello to shard 1).
    assert!(
        rt.block_on(task.wait_registered(2, WAIT)),
        "registered on 2 shards: {:?}, last error {:?}",
        task.stats(),
        task.last_error()
    );
    wait("fedbus_task_links 2", || {
        router.metric("fedbus_task_links") == 2.0
    });
    wait("a request is routed to the task", || {
        http(
            router.api,
            "POST",
            &path(0, "echo"),
            Some(&client),
            None,
            b"p",
        )
        .status
            == 200
    });

    // 3. Requests for many wsids come back through the router, from both shards' links.
    let mut by_shard: BTreeMap<String, u32> = BTreeMap::new();
    let mut wsid = 0u64;
    while wsid < 32 || by_shard.len() < 2 {
        assert!(wsid < 2000, "answers from both shards: {by_shard:?}");
        let body = format!("body of wsid {wsid}");
        let r = http(
            router.api,
            "POST",
            &path(wsid, "echo"),
            Some(&client),
            Some("text/plain"),
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, body.as_bytes(), "{r:?}");
        assert_eq!(r.header("content-type"), Some("text/plain"), "{r:?}");
        let partition = (wsid % 16).to_string();
        assert_eq!(r.header("fedbus-partition"), Some(partition.as_str()));
        let shard = r.header("fedbus-shard").expect("fedbus-shard").to_string();
        assert_eq!(r.header("echo-link-shard"), Some(shard.as_str()), "{r:?}");
        *by_shard.entry(shard).or_default() += 1;
        wsid += 1;
    }
    // A large body, and one without a content type.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = http(
        router.api,
        "POST",
        &path(7, "echo"),
        Some(&client),
        None,
        &big,
    );
    assert_eq!(r.status, 200);
    assert!(r.body == big, "1 MB body echoed");
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));

    // 4. Many requests in the handler at once: GATHER clients, each held until all are in
    // (at least GATHER / 2 of them on one link).
    let api = router.api;
    let clients: Vec<_> = (0..GATHER as u64)
        .map(|i| {
            let (client, p) = (client.clone(), path(100 + i, "gather"));
            std::thread::spawn(move || {
                http(
                    api,
                    "POST",
                    &p,
                    Some(&client),
                    None,
                    format!("g{i}").as_bytes(),
                )
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().expect("client thread");
        assert_eq!(r.status, 200, "gathered request {i}: {r:?}");
        assert_eq!(r.body, format!("g{i}").as_bytes());
    }

    // 5. Pings (every 200 ms here; 3 silent intervals drop a link) are answered: the links
    // outlive many of them without a reconnect.
    let pings = task.stats().pings;
    wait("pings arrive", || task.stats().pings >= pings + 10);
    let s = task.stats();
    assert_eq!(
        (s.connects, s.registrations, s.registered_links),
        (2, 2, 2),
        "{s:?}"
    );
    assert_eq!(router.metric("fedbus_task_links"), 2.0);
    assert!(
        s.requests >= 32 + GATHER as u64 && s.answers == s.requests,
        "{s:?}"
    );

    // 6. An `auth` task gets the app secret pushed; a JWT it signs is accepted by the router.
    let auth_opts = TaskOptions::new(
        [format!("{IP}:{port}")],
        "demo/echo",
        vec![0u32],
        service("sdk-auth", Some("auth")),
    )
    .role("auth");
    let auth = {
        let _rt = rt.enter();
        Task::spawn(auth_opts, support::echo).expect("spawn the auth task")
    };
    assert!(
        rt.block_on(auth.wait_registered(2, WAIT)),
        "{:?}",
        auth.last_error()
    );
    wait("the app secret is pushed", || {
        auth.secret("demo/echo").is_some()
    });
    let jwt = auth
        .secrets()
        .sign_client_jwt("demo/echo", "bob", Duration::from_secs(60))
        .expect("signed");
    let r = http(
        router.api,
        "POST",
        &path(3, "echo"),
        Some(&jwt),
        None,
        b"bob",
    );
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, b"bob".as_slice()),
        "{r:?}"
    );
    rt.block_on(auth.shutdown());
    wait("the auth task's links close", || {
        router.metric("fedbus_task_links") == 2.0
    });

    // 7. A bad service token: refused at the upgrade, retried with backoff, never registered.
    let bad = {
        let _rt = rt.enter();
        let o = TaskOptions::new(
            [format!("{IP}:{port}")],
            "demo/echo",
            vec![0u32],
            "fbs1.x.y",
        );
        Task::spawn(o, support::echo).expect("spawn")
    };
    wait("the bad token is refused", || {
        bad.stats().connect_failures >= 2
    });
    assert!(
        bad.last_error().is_some_and(|e| e.contains("401")),
        "{:?}",
        bad.last_error()
    );
    assert_eq!(bad.stats().registrations, 0);
    drop(bad);

    // 8. Dropping the task closes its links: the router answers 503 no_live_task.
    drop(task);
    wait("fedbus_task_links 0", || {
        router.metric("fedbus_task_links") == 0.0
    });
    let r = http(
        router.api,
        "POST",
        &path(5, "echo"),
        Some(&client),
        None,
        b"x",
    );
    assert_eq!(r.status, 503, "{r:?}");
    let j: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error body");
    assert_eq!(j["error"], "no_live_task", "{r:?}");
    drop(rt);
}

/// `TaskOptions::routers` takes `unix:<path>` (a router's `listen.internal_unix`): the task
/// links both shards over their unix sockets (the hello's `internal_unix`), makes no TCP
/// connection to the internal listeners, and requests through both shards are answered.
#[test]
fn sdk_task_links_every_shard_over_the_unix_socket() {
    let dir = TempDir::new();
    let home = dir.0.as_path();
    let sock = home.join("link.sock");
    let (rt, router, keys, port) = setup_with(home, &format!("internal_unix = {sock:?}"));
    let k = keys.to_str().expect("utf-8");
    let svc = fedbus(
        home,
        &[
            "token",
            "service",
            "--task-id",
            "sdk-unix",
            "--app",
            "demo/echo",
            "--keyring",
            k,
        ],
    );
    let client = client_token(home, &keys);
    let opts = TaskOptions::new(
        [format!("unix:{}", sock.display())],
        "demo/echo",
        (0..16).collect::<Vec<u32>>(),
        svc,
    );
    let task = spawn_registered(&rt, opts);
    wait("fedbus_task_links 2", || {
        router.metric("fedbus_task_links") == 2.0
    });
    // Registered is not yet routed: the control thread publishes the table after it.
    router.wait_ready();
    let mut by_shard: BTreeMap<String, u32> = BTreeMap::new();
    let mut wsid = 0u64;
    while wsid < 16 || by_shard.len() < 2 {
        assert!(wsid < 2000, "answers from both shards: {by_shard:?}");
        let r = http(
            router.api,
            "POST",
            &path(wsid, "echo"),
            Some(&client),
            None,
            b"u",
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, b"u", "{r:?}");
        let shard = r.header("fedbus-shard").expect("fedbus-shard").to_string();
        *by_shard.entry(shard).or_default() += 1;
        wsid += 1;
    }
    // No TCP connection on either internal port (/proc/net/tcp: the local address's port in
    // hex; state 01 is ESTABLISHED, which the router's side of a TCP link would be).
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let ports = [format!(":{port:04X}"), format!(":{:04X}", port + 1)];
    let over_tcp: Vec<&str> = tcp
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "01" && ports.iter().any(|p| f[1].ends_with(p.as_str()))
        })
        .collect();
    assert!(over_tcp.is_empty(), "TCP task links: {over_tcp:?}");
    assert_eq!(task.stats().connects, 2, "{:?}", task.stats());
}

/// The example's echo task with `opts` on `rt`, once registered on both shards.
fn spawn_registered(rt: &tokio::runtime::Runtime, opts: TaskOptions) -> Task {
    let task = {
        let _rt = rt.enter();
        Task::spawn(opts, support::echo).expect("spawn the task")
    };
    assert!(
        rt.block_on(task.wait_registered(2, WAIT)),
        "registered on 2 shards: {:?}, last error {:?}",
        task.stats(),
        task.last_error()
    );
    task
}

/// A runtime and a router with a fresh keyring; the keyring path.
fn setup(home: &Path) -> (tokio::runtime::Runtime, Router, PathBuf, u16) {
    setup_with(home, "")
}

/// [`setup`] with more `[listen]` lines for the router.
fn setup_with(home: &Path, listen: &str) -> (tokio::runtime::Runtime, Router, PathBuf, u16) {
    let keys = home.join("keys");
    let k = keys.to_str().expect("utf-8");
    fedbus(
        home,
        &["keys", "init", "--keyring", k, "--app", "demo/echo"],
    );
    let port = free_port_pair();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let router = Router::start_with(home, &keys, port, listen);
    (rt, router, keys, port)
}

fn client_token(home: &Path, keys: &Path) -> String {
    let k = keys.to_str().expect("utf-8");
    let a = [
        "token",
        "client",
        "--app",
        "demo/echo",
        "--sub",
        "alice",
        "--keyring",
        k,
    ];
    fedbus(home, &a)
}

/// A task whose service token lives 4 s and comes from a command (`fedbus token service`)
/// renews it on its open links before it expires: steady requests for three token lifetimes
/// all succeed, on the same two links (no reconnect), and the router counts the renewals.
#[test]
fn short_lived_token_renewed_without_a_failed_request() {
    let dir = TempDir::new();
    let home = dir.0.as_path();
    let (rt, router, keys, port) = setup(home);
    let command = format!(
        "FEDBUS_HOME={home:?} {bin:?} token service --task-id sdk-renew --app demo/echo --keyring {keys:?} --ttl 4s",
        bin = bin(),
    );
    let mut opts = TaskOptions::new(
        [format!("{IP}:{port}")],
        "demo/echo",
        (0..16).collect::<Vec<u32>>(),
        "",
    )
    .token_command(command);
    opts.token_poll = Duration::from_millis(200);
    let task = spawn_registered(&rt, opts);
    router.wait_ready();
    let client = client_token(home, &keys);
    let (start, mut sent, mut failed) = (Instant::now(), 0u32, Vec::new());
    while start.elapsed() < Duration::from_secs(12) {
        let r = http(
            router.api,
            "POST",
            &path(sent as u64, "echo"),
            Some(&client),
            None,
            b"x",
        );
        if r.status != 200 {
            failed.push((
                start.elapsed(),
                r.status,
                String::from_utf8_lossy(&r.body).into_owned(),
            ));
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let renewed = router.metric("fedbus_task_renewals_total{result=\"accepted\"}");
    let refused = router.metric("fedbus_task_renewals_total{result=\"refused\"}");
    println!("{sent} requests over 12 s, {} failed; renewals accepted {renewed}, refused {refused}; {:?}", failed.len(), task.stats());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        renewed >= 2.0 * 3.0,
        "each of 2 links renewed at least 3 times: {renewed}"
    );
    assert_eq!(refused, 0.0);
    assert_eq!(
        task.stats().connects,
        2,
        "the same two links throughout: {:?}",
        task.stats()
    );
    assert_eq!(router.metric("fedbus_task_links"), 2.0);
}

/// A task whose token the router refuses for good (signed by another cluster's key) gives up
/// after `refused_exit_after`: `serve` returns `Error::Refused` naming the router's error code.
#[test]
fn token_refused_for_good_ends_the_task_within_the_bound() {
    let dir = TempDir::new();
    let home = dir.0.as_path();
    let (rt, _router, _keys, port) = setup(home);
    let other = home.join("other-keys");
    let o = other.to_str().expect("utf-8");
    fedbus(
        home,
        &["keys", "init", "--keyring", o, "--app", "demo/echo"],
    );
    let bad = fedbus(
        home,
        &[
            "token",
            "service",
            "--task-id",
            "x",
            "--app",
            "demo/echo",
            "--keyring",
            o,
        ],
    );
    let mut opts = TaskOptions::new([format!("{IP}:{port}")], "demo/echo", vec![0], bad);
    opts.refused_exit_after = Duration::from_secs(2);
    let t0 = Instant::now();
    let end = rt.block_on(async {
        tokio::time::timeout(WAIT, fedbus_sdk::serve(opts, support::echo)).await
    });
    let took = t0.elapsed();
    println!("token refused for good: serve returned after {took:?}: {end:?}");
    match end {
        Ok(Err(fedbus_sdk::Error::Refused(why))) => {
            assert!(why.contains("bad_signature"), "{why}")
        }
        other => panic!("expected Error::Refused, got {other:?}"),
    }
    assert!(
        took >= Duration::from_secs(2),
        "not before the bound: {took:?}"
    );
    // The bound plus at most one backoff (5 s cap) and a connect.
    assert!(took < Duration::from_secs(8), "{took:?}");
}
