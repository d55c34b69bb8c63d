//! Probes of rolling restarts, drains and readiness, written by a helper from the docs only (3
//! failed on 618df4e: an /api/ws request sent during a drain, or arriving when it began, got
//! no answer; a lone router refused drain_timeout_ms <= 5000 naming drain_peer_hold_ms)
//! (docs/FEDERATION.md "Readiness and drain", "Takeover"; docs/ARCHITECTURE.md "The listeners",
//! "Threads", "Readiness and drain"; docs/TUNING.md `readiness.*`, `listen.takeover`). Each test
//! checks one promise. Every wait is bounded and waits on a fact (a ready line, a metric, a log
//! line, a listening socket), except where a test needs a connection to have been idle for a
//! stated time.

use bytes::BytesMut;
use fedbus_proto::ws::frame::{encode_head, opcode, MAX_HEADER};
use fedbus_proto::{encode_frame, put_meta, tag, Kind};
use fedbus_testkit::launch::{
    self, client_token, plain, spawn_echo_task, spawn_run, wait_ready, Run,
};
use fedbus_testkit::ws::{self, Answer as Msg};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A parsed answer.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }
    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one answer from `s` (bytes already read in `buf`), skipping `100 Continue`.
fn read_resp(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Resp, String> {
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16 * 1024];
            match s.read_retrying(&mut chunk) {
                Ok(0) => return Err(format!("EOF ({} bytes buffered)", buf.len())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e} ({:?})", e.kind())),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let mut headers = HashMap::new();
        for l in lines.filter(|l| !l.is_empty()) {
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        buf.drain(..end);
        if status == 100 {
            continue;
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            let mut chunk = [0u8; 16 * 1024];
            match s.read_retrying(&mut chunk) {
                Ok(0) => return Err(format!("EOF in a body ({} of {len})", buf.len())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read body: {e}")),
            }
        }
        let body = buf.drain(..len).collect();
        return Ok(Resp {
            status,
            headers,
            body,
        });
    }
}

/// True when the peer closed `s` (EOF or reset) within its read timeout.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read_retrying(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !is_timeout(&e),
    }
}

/// One request on a new connection: the answer or why there was none.
fn one_shot(addr: SocketAddr, req: &[u8]) -> Result<Resp, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    s.write_all(req).map_err(|e| format!("write: {e}"))?;
    read_resp(&mut s, &mut Vec::new())
}

/// `GET path` on an admin listener without panicking.
fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let r = one_shot(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .ok()?;
    Some((r.status, r.text()))
}

fn metric_at(addr: SocketAddr, name: &str) -> Option<f64> {
    let (st, body) = try_get(addr, "/metrics")?;
    (st == 200).then(|| Metrics::parse(&body).get(name))
}

/// Listening TCP sockets bound to exactly `addr` (IPv4), from /proc/net/tcp.
fn listeners_on(addr: SocketAddr) -> usize {
    let SocketAddr::V4(a) = addr else { return 0 };
    let o = a.ip().octets();
    let want = format!(
        "{:02X}{:02X}{:02X}{:02X}:{:04X}",
        o[3],
        o[2],
        o[1],
        o[0],
        a.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
        .count()
}

/// Runs `fedbus run --config <cfg> [extra]` expecting a failure; (status, output, time).
fn run_expect_failure(
    home: &Path,
    cfg: &Path,
    extra: &[&str],
    within: Duration,
) -> (ExitStatus, String, Duration) {
    let out = home.join(format!(
        "fail-{}.out",
        NEXT_SITE.fetch_add(1, Ordering::Relaxed)
    ));
    let (st, text, took) = launch::run_expect_failure(home, cfg, extra, &out, within);
    (st, plain(&text), took)
}

// ---------------------------------------------------------------------------------------------
// A router on fixed addresses (127.a.b.<host>:8800/8900/8950/8700, :8443 with TLS) that can be
// drained, killed and taken over.

static NEXT_SITE: AtomicU32 = AtomicU32::new(0);

struct Site {
    dir: TempDir,
    cfg: PathBuf,
    keys: PathBuf,
    #[allow(dead_code)]
    ip: Ipv4Addr,
    api: SocketAddr,
    internal: SocketAddr,
    admin: SocketAddr,
    tls: Option<SocketAddr>,
    runs: u32,
}

impl Site {
    /// `top`: lines at the top of the config (before `keyring`); `listen`: more `[listen]`
    /// lines; `tail`: whole sections after `[tuning]`.
    fn new(top: &str, listen: &str, tail: &str) -> Site {
        let n = NEXT_SITE.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            127,
            100 + (std::process::id() % 150) as u8,
            (n % 250 + 1) as u8,
            41,
        );
        let dir = TempDir::new("probe-restart");
        let keys = dir.path().join("keys");
        keys_init(dir.path(), &keys, &[APP]);
        let cfg = dir.path().join("router.toml");
        let tls = listen
            .contains("api_tls")
            .then(|| SocketAddr::new(ip.into(), 8443));
        let listen = listen.replace("@IP", &ip.to_string());
        let tail = tail.replace("@IP", &ip.to_string());
        std::fs::write(
            &cfg,
            format!(
                "region = \"local\"\ncluster = \"dev\"\n{top}\nkeyring = {:?}\n[listen]\napi = \"{ip}:8800\"\ninternal = \"{ip}:8900\"\nexternal = \"{ip}:8950\"\nadmin = \"{ip}:8700\"\n{listen}\n[tuning]\nshard_cores = [0]\npin = false\n{tail}\n[[apps]]\nname = \"{APP}\"\npartitions = 16\n",
                keys.to_str().expect("utf-8")
            ),
        )
        .expect("write config");
        Site {
            cfg,
            keys,
            ip,
            api: SocketAddr::new(ip.into(), 8800),
            internal: SocketAddr::new(ip.into(), 8900),
            admin: SocketAddr::new(ip.into(), 8700),
            tls,
            runs: 0,
            dir,
        }
    }

    fn home(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `fedbus run`; returns it and its stdout lines.
    fn spawn(&mut self, takeover: bool) -> (Run, mpsc::Receiver<String>) {
        self.runs += 1;
        let log = self.home().join(format!("router-{}.log", self.runs));
        let args: &[&str] = if takeover { &["--takeover"] } else { &[] };
        let (run, rx) = spawn_run(self.home(), &self.cfg, args, &log);
        (run.plain_log(), rx)
    }

    /// Starts `fedbus run` and waits (up to `within`) for its ready line.
    fn launch_within(&mut self, takeover: bool, within: Duration) -> (Run, Ready) {
        let (run, rx) = self.spawn(takeover);
        let ready = wait_ready(&run, &rx, within);
        (run, ready)
    }

    fn launch(&mut self, takeover: bool) -> Run {
        self.launch_within(takeover, START_TIMEOUT).0
    }

    fn token(&self, sub: &str) -> String {
        client_token(self.home(), &self.keys, APP, sub)
    }

    /// `fedbus task echo ARGS` linked to this site's internal address (not waited for).
    fn task(&self, label: &str, args: &[&str]) -> Run {
        let log = self.home().join(format!("task-{label}.log"));
        spawn_echo_task(self.home(), self.internal, &self.keys, args, log).plain_log()
    }

    fn path(&self, wsid: u64) -> String {
        format!("/api/local/dev/{APP}/api/{wsid}/sys/echo")
    }

    fn req(&self, tok: &str, wsid: u64, body: &[u8]) -> Vec<u8> {
        Req::post(&self.path(wsid)).token(tok).body(body).bytes()
    }

    /// Waits until wsid is served 200 on a new connection.
    fn wait_served(&self, tok: &str, wsid: u64, within: Duration, ctx: &Run) -> Duration {
        let start = Instant::now();
        wait_until(
            &format!("wsid {wsid} served 200"),
            within,
            || match one_shot(self.api, &self.req(tok, wsid, b"x")) {
                Ok(r) if r.status == 200 => Some(()),
                _ => None,
            },
            || ctx.log(),
        );
        start.elapsed()
    }

    fn pending(&self) -> f64 {
        metric_at(self.admin, "fedbus_pending_requests").unwrap_or(-1.0)
    }

    /// Waits until `/readyz` answers 200: with the default `readiness.coverage = "all"`, every
    /// partition has a task in the published routing table. A request served on one partition
    /// says nothing of another task's partitions, whose link may have registered but not been
    /// published yet (a request there would get 503 `no_live_task` at once).
    fn wait_covered(&self, ctx: &Run) {
        wait_until(
            "every partition covered (/readyz 200)",
            Duration::from_secs(5),
            || (try_get(self.admin, "/readyz").map(|x| x.0) == Some(200)).then_some(()),
            || ctx.log(),
        );
    }

    fn wait_pending(&self, n: f64, ctx: &Run) {
        wait_until(
            &format!("{n} requests pending"),
            Duration::from_secs(5),
            || (self.pending() >= n).then_some(()),
            || ctx.log(),
        );
    }
}

/// A config with a `[federation]` naming one other cluster whose only router never answers
/// (nothing listens on its address): a takeover's wait for its peer links runs to
/// `readiness.takeover_wait_ms`.
fn site_with_a_dead_peer(takeover_wait_ms: u64) -> Site {
    let s = Site::new(
        "dev = true",
        "",
        &format!(
            "[readiness]\npeers = false\ntakeover_wait_ms = {takeover_wait_ms}\n[federation]\nentry_point = \"x\"\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"gone\"\nrouters = [\"127.0.0.1:9\"]\nkeys = \"@PEERKEYS\"\n"
        ),
    );
    let okeys = s.home().join("peer-keys");
    keys_init(s.home(), &okeys, &[APP]);
    let text = std::fs::read_to_string(&s.cfg).unwrap();
    std::fs::write(&s.cfg, text.replace("@PEERKEYS", okeys.to_str().unwrap())).unwrap();
    s
}

// ---------------------------------------------------------------------------------------------
// A minimal `/api/ws` client.

type Ws = ws::Ws;

/// Opens `/api/ws` at `addr` with `tok`, or why not.
fn try_open_ws(addr: SocketAddr, tok: &str) -> Result<Ws, String> {
    ws::open_api(addr, tok, Duration::from_secs(6))
}

fn open_ws(addr: SocketAddr, tok: &str) -> Ws {
    try_open_ws(addr, tok).expect("upgrade")
}

fn wait_draining(admin: SocketAddr, ctx: impl Fn() -> String) {
    wait_until(
        "fedbus_draining 1",
        Duration::from_secs(3),
        || (metric_at(admin, "fedbus_draining") == Some(1.0)).then_some(()),
        ctx,
    );
}

fn wait_api_conns(r: &Router, n: f64) {
    wait_until(
        &format!("{n} api connections"),
        Duration::from_secs(5),
        || (r.metrics().get("fedbus_connections{listener=\"api\"}") == n).then_some(()),
        || r.log(),
    );
}

// =============================================================================================
// Config refusals (docs/TUNING.md, `readiness`).

fn bare_config(home: &Path, readiness: &str) -> PathBuf {
    let keys = home.join("keys");
    if !keys.exists() {
        keys_init(home, &keys, &[APP]);
    }
    let cfg = home.join(format!(
        "cfg-{}.toml",
        NEXT_SITE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(
        &cfg,
        format!(
            "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = [0]\npin = false\n[readiness]\n{readiness}\n[[apps]]\nname = \"{APP}\"\npartitions = 16\n",
            keys.to_str().unwrap()
        ),
    )
    .unwrap();
    cfg
}

/// TUNING.md `readiness.drain_peer_hold_ms`: "Must be below `drain_timeout_ms` when
/// `[federation]` lists clusters": equal is refused, with the key named, no panic.
#[test]
fn cfg_drain_peer_hold_equal_to_drain_timeout_is_refused() {
    let d = TempDir::new("probe-cfg");
    let cfg = bare_config(
        d.path(),
        "drain_timeout_ms = 3000\ndrain_peer_hold_ms = 3000\n[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb2\"\nrouters = [\"127.0.0.1:1\"]\nkeys = \"/nonexistent\"",
    );
    let (st, out, _) = run_expect_failure(d.path(), &cfg, &[], Duration::from_secs(10));
    assert!(!st.success(), "{out}");
    assert_no_panic(&out);
    assert!(out.contains("readiness.drain_peer_hold_ms"), "{out}");
    assert!(!out.contains("fedbus-ready"), "{out}");
}

/// One below the bound is accepted: the router starts and, with nothing to wait for, drains
/// and exits 0 at once.
#[test]
fn cfg_drain_peer_hold_one_below_drain_timeout_starts_and_drains() {
    let mut s = Site::new(
        "",
        "",
        "[readiness]\ndrain_timeout_ms = 3000\ndrain_peer_hold_ms = 2999",
    );
    let mut a = s.launch(false);
    let t = Instant::now();
    a.sig("TERM");
    let exit = a.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", a.log());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// TUNING.md: "`drain_timeout_ms` and `drain_idle_close_ms` must be above 0".
#[test]
fn cfg_zero_drain_timeout_or_idle_close_is_refused() {
    let d = TempDir::new("probe-cfg");
    for (body, key) in [
        (
            "drain_timeout_ms = 0\ndrain_peer_hold_ms = 0",
            "readiness.drain_timeout_ms",
        ),
        ("drain_idle_close_ms = 0", "readiness.drain_idle_close_ms"),
    ] {
        let cfg = bare_config(d.path(), body);
        let (st, out, _) = run_expect_failure(d.path(), &cfg, &[], Duration::from_secs(10));
        assert!(!st.success(), "{body}: {out}");
        assert_no_panic(&out);
        assert!(out.contains(key), "{body}: {out}");
    }
}

/// TUNING.md `readiness.coverage`: `all`, `any`, `none`; anything else is a clear config
/// error (no panic, no start).
#[test]
fn cfg_unknown_readiness_coverage_is_refused() {
    let d = TempDir::new("probe-cfg");
    let cfg = bare_config(d.path(), "coverage = \"most\"");
    let (st, out, _) = run_expect_failure(d.path(), &cfg, &[], Duration::from_secs(10));
    assert!(!st.success(), "{out}");
    assert_no_panic(&out);
    assert!(out.contains("coverage") || out.contains("most"), "{out}");
}

/// TUNING.md `readiness.drain_timeout_ms` (default 30000; "must be above 0") on a router with
/// no federation at all: a shorter drain, set alone, is a valid config. `drain_peer_hold_ms`
/// is about peer links this router dialed; with none, its default (5000) should not make
/// `drain_timeout_ms = 2000` an error.
#[test]
fn cfg_a_short_drain_timeout_alone_is_accepted_without_a_federation() {
    let d = TempDir::new("probe-cfg");
    let cfg = bare_config(d.path(), "drain_timeout_ms = 2000");
    let out = d.path().join("short.out");
    let mut child = launch::spawn_run_to_file(d.path(), &cfg, &[], &out);
    let up = wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("fedbus-ready") {
            return Some(Ok(()));
        }
        match child.try_wait() {
            Ok(Some(st)) => Some(Err(format!("exited {st}: {}", plain(&text)))),
            _ => None,
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    match up {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("drain_timeout_ms = 2000 alone refused: {e}"),
        None => panic!("no ready line within 10 s"),
    }
}

// =============================================================================================
// Readiness on the admin listener.

/// ARCHITECTURE.md "The listeners", admin: "`/readyz` (a query is ignored; HEAD gets no body)".
#[test]
fn readyz_ignores_a_query_and_head_gets_no_body() {
    let r = Router::new().shards(1).start();
    // No task: not ready.
    let (st, body) = admin_get(r.admin, "/readyz");
    assert_eq!(st, 503, "{body}");
    let (st2, body2) = admin_get(r.admin, "/readyz?verbose=1&x");
    assert_eq!((st2, &body2), (st, &body), "a query changes nothing");
    let mut c = Conn::open(r.admin);
    c.send(b"HEAD /readyz?probe HTTP/1.1\r\nHost: x\r\n\r\n");
    let h = c.read_response_for("HEAD").expect("HEAD answer");
    assert_eq!(h.status, 503, "{h:?}");
    assert!(h.body.is_empty(), "{h:?}");
    // And the raw stream holds nothing after the head (no body sent anyway).
    let mut s = TcpStream::connect(r.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut all);
    let text = String::from_utf8_lossy(&all).into_owned();
    let (_, after) = text.split_once("\r\n\r\n").expect("a head");
    assert!(after.is_empty(), "HEAD carried a body: {text:?}");
}

// =============================================================================================
// Drain (SIGTERM), single router.

/// FEDERATION.md "Drain": "When no request is pending on a task, no peer link and no client
/// connection is open ... it closes its task links with 1001 ... and exits 0": a router with
/// only task links (no client) exits at once, not after `drain_idle_close_ms`.
#[test]
fn drain_of_a_router_with_only_task_links_exits_at_once() {
    let mut r = Router::new()
        .shards(2)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 5000")
        .start();
    let _t = r.task().start();
    wait_api_conns(&r, 0.0);
    let t = Instant::now();
    r.sigterm();
    let exit = r.wait_exit(Duration::from_secs(6));
    let took = t.elapsed();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}\n{}", r.log());
    assert!(
        took < Duration::from_millis(1500),
        "an idle router took {took:?} to drain"
    );
}

/// TUNING.md `readiness.drain_idle_close_ms`: a client connection that never sent a byte is
/// idle: closed after `drain_idle_close_ms`, and the router exits 0 (not at the timeout).
#[test]
fn drain_closes_a_connection_that_never_sent_a_byte() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 400")
        .start();
    let _t = r.task().start();
    let mut s = TcpStream::connect(r.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    wait_api_conns(&r, 1.0);
    let t = Instant::now();
    r.sigterm();
    assert!(closed_by_peer(&mut s), "the silent connection is closed");
    let closed = t.elapsed();
    let exit = r.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(2000),
        "closed {closed:?} after SIGTERM (drain_idle_close_ms 400)"
    );
}

/// `drain_idle_close_ms` counts the time a connection has been idle, not the time since the
/// drain began: one idle for longer than that at SIGTERM is closed at once.
#[test]
fn drain_closes_at_once_a_connection_already_idle_longer_than_drain_idle_close_ms() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 500")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    let resp = c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"a"));
    assert_eq!(resp.status, 200);
    // Idle for longer than drain_idle_close_ms before the drain starts.
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    r.sigterm();
    c.set_read_timeout(Duration::from_secs(5));
    assert!(c.is_closed(), "closed by the drain");
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(400),
        "a connection idle 1 s closed {took:?} after SIGTERM (drain_idle_close_ms 500)"
    );
    let exit = r.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// A request head cut short at SIGTERM is not idle: the head's own deadline
/// (`limits.handshake_timeout_ms`) answers it 408 `request_timeout` with `Connection: close`,
/// and the drain ends then, long before `drain_timeout_ms`.
#[test]
fn drain_answers_a_partial_head_408_at_the_head_deadline() {
    let mut r = Router::new()
        .shards(1)
        .limit("handshake_timeout_ms", 1000)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 300")
        .start();
    let _t = r.task().start();
    let mut s = TcpStream::connect(r.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    s.write_all(b"POST /api/local/dev/demo/echo/api/1/sys/echo HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    wait_api_conns(&r, 1.0);
    // Let the router read the partial head before the drain.
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    r.sigterm();
    let resp = read_resp(&mut s, &mut Vec::new());
    let answered = t.elapsed();
    let exit = r.wait_exit(Duration::from_secs(5));
    let resp = resp.unwrap_or_else(|e| panic!("no 408 for the partial head: {e}\n{}", r.log()));
    assert_eq!(resp.status, 408, "{resp:?}");
    assert!(resp.text().contains("request_timeout"), "{resp:?}");
    assert!(resp.closes(), "{resp:?}");
    assert!(answered < Duration::from_millis(2500), "{answered:?}");
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// ARCHITECTURE.md "The listeners": a TLS connection counts "from accept, during its handshake
/// too", and the handshake is bounded by `limits.handshake_timeout_ms` (api/tls): a client that
/// connects to the TLS port and never sends a ClientHello holds the drain at most that long.
#[test]
fn drain_with_a_silent_tls_connection_ends_by_the_handshake_timeout() {
    let certs = TempDir::new("probe-restart-tls");
    let a = dev_cert(certs.path(), "a", &["a.test"]);
    let mut r = Router::new()
        .shards(1)
        .tls(std::slice::from_ref(&a))
        .limit("handshake_timeout_ms", 1500)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 300")
        .start();
    let _t = r.task().start();
    let mut s = TcpStream::connect(r.api_tls.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    wait_api_conns(&r, 1.0);
    let t = Instant::now();
    r.sigterm();
    let exit = r.wait_exit(Duration::from_secs(8));
    let took = t.elapsed();
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", r.log());
    assert!(
        took < Duration::from_millis(3500),
        "drain held {took:?} by a silent TLS connection (handshake_timeout_ms 1500)"
    );
    assert!(closed_by_peer(&mut s));
}

/// ARCHITECTURE.md drain + pipelining: a client that pipelined more requests than
/// `limits.max_inflight_per_connection` at SIGTERM gets its started requests answered in order,
/// the one that leaves nothing in flight with `Connection: close`, then the close; never an
/// answer without `close` followed by EOF.
#[test]
fn drain_with_more_pipelined_requests_than_max_inflight() {
    let mut r = Router::new()
        .shards(1)
        .limit("max_inflight_per_connection", 2)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(600).start();
    let tok = r.token(APP, "alice");
    let before = r.metrics().get("fedbus_pending_requests");
    let mut s = TcpStream::connect(r.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut wire = Vec::new();
    for i in 0..4u64 {
        wire.extend(
            Req::post(&r.path(APP, i))
                .token(&tok)
                .body(format!("req{i}").as_bytes())
                .bytes(),
        );
    }
    s.write_all(&wire).unwrap();
    r.wait_pending(before + 2.0);
    r.sigterm();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    loop {
        match read_resp(&mut s, &mut buf) {
            Ok(resp) => {
                let close = resp.closes();
                got.push(resp);
                if close {
                    break;
                }
            }
            Err(e) => panic!("EOF/error before an answer with close: {e}; got {got:?}"),
        }
    }
    assert!(got.len() >= 2, "{got:?}");
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.status, 200, "{g:?}");
        assert_eq!(g.body, format!("req{i}").as_bytes(), "in order: {got:?}");
    }
    assert!(closed_by_peer(&mut s), "closes after the close answer");
    let exit = r.wait_exit(Duration::from_secs(8));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// TUNING.md `drain_idle_close_ms`: "`/api/ws` sessions get 1001 once their answers are out":
/// an idle session (nothing in flight) gets it at once, not after `drain_idle_close_ms`.
#[test]
fn drain_closes_an_idle_ws_session_1001_at_once() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 5000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open_ws(r.api, &tok);
    w.write_request(1, &r.path(APP, 3), b"warm").unwrap();
    match w.read_answer().expect("answer") {
        Msg::Frame(f) => assert_eq!(f.get_u64(tag::STATUS), Some(200), "{f:?}"),
        m => panic!("{m:?}"),
    }
    let t = Instant::now();
    r.sigterm();
    match w.read_answer() {
        Ok(Msg::Close(code)) => assert_eq!(code, Some(1001)),
        other => panic!("expected a close frame: {other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "idle /api/ws session closed {took:?} after SIGTERM"
    );
    let exit = r.wait_exit(Duration::from_secs(6));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// Several requests in flight on one `/api/ws` session at SIGTERM: every one is answered
/// before the 1001 close frame.
#[test]
fn drain_answers_every_ws_request_in_flight_before_1001() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(800).start();
    let tok = r.token(APP, "alice");
    let before = r.metrics().get("fedbus_pending_requests");
    let mut w = open_ws(r.api, &tok);
    for id in 1..=5u64 {
        w.write_request(id, &r.path(APP, id), &id.to_le_bytes())
            .unwrap();
    }
    r.wait_pending(before + 5.0);
    r.sigterm();
    let mut answered = Vec::new();
    loop {
        match w.read_answer().expect("a message before the close") {
            Msg::Frame(f) => {
                assert_eq!(f.get_u64(tag::STATUS), Some(200), "{f:?}");
                assert_eq!(&f.payload[..], f.header.request_id.to_le_bytes());
                answered.push(f.header.request_id);
            }
            Msg::Close(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
            Msg::Other(op) => panic!("opcode {op:?}"),
        }
    }
    answered.sort();
    assert_eq!(answered, vec![1, 2, 3, 4, 5]);
    let exit = r.wait_exit(Duration::from_secs(8));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// FEDERATION.md "Not yet": "An `/api/ws` request the client sent **after** the 1001 close
/// frame gets no answer"; sessions are "closed with 1001 (going away) once its answers are
/// out". A request sent on an open session during the drain, a second before the router sends
/// its close frame, is therefore expected to be answered (or the doc to say it is dropped).
#[test]
fn drain_ws_request_sent_before_the_close_frame_is_answered() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(1500).start();
    let tok = r.token(APP, "alice");
    let before = r.metrics().get("fedbus_pending_requests");
    let mut w = open_ws(r.api, &tok);
    w.write_request(1, &r.path(APP, 1), b"first").unwrap();
    r.wait_pending(before + 1.0);
    let termed = Instant::now();
    r.sigterm();
    wait_draining(r.admin, || r.log());
    // Every shard task looks at the flag within 20 ms (health::POLL).
    std::thread::sleep(Duration::from_millis(100));
    w.write_request(2, &r.path(APP, 2), b"second").unwrap();
    let sent_second = termed.elapsed();
    let mut answered = Vec::new();
    let close_at;
    loop {
        match w.read_answer() {
            Ok(Msg::Frame(f)) => answered.push(f.header.request_id),
            Ok(Msg::Close(code)) => {
                close_at = termed.elapsed();
                assert_eq!(code, Some(1001));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        answered.contains(&2),
        "request 2 was sent {sent_second:?} after SIGTERM, the close frame came {close_at:?} after it; answers: {answered:?}"
    );
}

/// ARCHITECTURE.md "Readiness and drain": "a request whose body is arriving is received and
/// answered first", and `Expect: 100-continue` is answered: an upload begun after SIGTERM on a
/// kept-alive connection (before `drain_idle_close_ms`) gets its `100 Continue`, then its
/// answer with `Connection: close`.
#[test]
fn drain_expect_continue_upload_begun_after_sigterm_is_completed() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 4000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut s = TcpStream::connect(r.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    s.write_all(&Req::post(&r.path(APP, 1)).token(&tok).body(b"a").bytes())
        .unwrap();
    assert_eq!(read_resp(&mut s, &mut buf).unwrap().status, 200);
    r.sigterm();
    wait_draining(r.admin, || r.log());
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        r.path(APP, 2)
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let cont = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break String::from_utf8_lossy(&got[..i]).into_owned();
        }
        let mut c = [0u8; 1024];
        match s.read_retrying(&mut c) {
            Ok(0) => panic!(
                "closed instead of 100 Continue: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&c[..n]),
            Err(e) => panic!("no 100 Continue: {e}"),
        }
    };
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont:?}");
    s.write_all(b"hello").unwrap();
    let resp = read_resp(&mut s, &mut buf).expect("the upload's answer");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"hello");
    assert!(resp.closes(), "{resp:?}");
    let exit = r.wait_exit(Duration::from_secs(6));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// ARCHITECTURE.md "Threads": SIGHUP reloads; "SIGTERM/SIGINT start a drain ... a second
/// signal exits at once". A SIGHUP during a drain (a config tool reloading every router) does
/// not cut the drain: the request in flight is answered and the exit is 0.
#[test]
fn sighup_during_a_drain_does_not_cut_it() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(1200).start();
    let tok = r.token(APP, "alice");
    let before = r.metrics().get("fedbus_pending_requests");
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(8));
    c.send(&Req::post(&r.path(APP, 4)).token(&tok).body(b"held").bytes());
    r.wait_pending(before + 1.0);
    r.sigterm();
    wait_draining(r.admin, || r.log());
    signal(seed::pid(&r) as u32, "HUP");
    let resp = c
        .read_response()
        .expect("the request in flight is answered");
    assert_eq!(resp.status, 200, "{resp:?}");
    let exit = r.wait_exit(Duration::from_secs(8));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", r.log());
}

/// `drain_timeout_ms` bounds everything: below `drain_idle_close_ms`, an idle keep-alive
/// connection does not keep the router past the timeout.
#[test]
fn drain_timeout_below_drain_idle_close_bounds_an_idle_connection() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 700\ndrain_peer_hold_ms = 100\ndrain_idle_close_ms = 5000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    assert_eq!(
        c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"a"))
            .status,
        200
    );
    let t = Instant::now();
    r.sigterm();
    let exit = r.wait_exit(Duration::from_secs(6));
    let took = t.elapsed();
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_millis(2000),
        "drain took {took:?} (drain_timeout_ms 700)"
    );
    assert!(
        r.log().contains("drain timeout: closing with work left"),
        "{}",
        r.log()
    );
}

/// Idle keep-alive connections on both shards of a 2-shard router are closed after
/// `drain_idle_close_ms`: each shard's `watch_drain` closes its own.
#[test]
fn drain_closes_idle_connections_on_every_shard() {
    let mut r = Router::new()
        .shards(2)
        .tail("[readiness]\ndrain_timeout_ms = 20000\ndrain_idle_close_ms = 400")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut conns: Vec<Conn> = (0..8)
        .map(|i| {
            let mut c = r.conn();
            let resp = c.request(&Req::post(&r.path(APP, i)).token(&tok).body(b"a"));
            assert_eq!(resp.status, 200);
            c
        })
        .collect();
    let shards: std::collections::HashSet<String> = conns
        .iter_mut()
        .map(|c| {
            c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"b"))
                .header("fedbus-shard")
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    let t = Instant::now();
    r.sigterm();
    for c in &mut conns {
        c.set_read_timeout(Duration::from_secs(5));
        assert!(c.is_closed(), "an idle connection stayed open");
    }
    let took = t.elapsed();
    let exit = r.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
    assert!(
        took < Duration::from_millis(2000),
        "{took:?} (shards {shards:?})"
    );
}

// =============================================================================================
// Takeover (docs/FEDERATION.md, "Takeover"; TUNING.md `listen.takeover`).

/// `--takeover` with no router on the addresses: it just starts, on the addresses of its config.
#[test]
fn takeover_with_nothing_to_take_over_starts_and_serves() {
    let mut s = Site::new("", "", "");
    let (a, ready) = s.launch_within(true, START_TIMEOUT);
    assert_eq!(ready.api, s.api);
    assert_eq!(ready.internal, vec![s.internal]);
    assert_eq!(ready.admin, Some(s.admin));
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &a);
    assert_eq!(try_get(s.admin, "/readyz").map(|x| x.0), Some(200));
}

/// `--takeover` skips the probe, so a port held by another program (a socket without
/// SO_REUSEPORT) must still fail the start clearly, not hang or panic.
#[test]
fn takeover_onto_a_port_held_by_a_foreign_socket_fails_clearly() {
    let s = Site::new("", "", "");
    let _hold = TcpListener::bind(s.api).expect("hold the api port");
    let (st, out, took) =
        run_expect_failure(s.home(), &s.cfg, &["--takeover"], Duration::from_secs(10));
    assert!(!st.success(), "{out}");
    assert_no_panic(&out);
    assert!(!out.contains("fedbus-ready"), "{out}");
    assert!(
        out.to_lowercase().contains("in use") && out.contains("8800"),
        "{out}"
    );
    eprintln!(
        "failed after {took:?}: {}",
        out.lines().last().unwrap_or("")
    );
}

/// FEDERATION.md "Takeover": "While both run, the admin port answers from either process":
/// the admin listener of a takeover run binds beside the old one and both answer.
#[test]
fn takeover_admin_port_answers_from_both_processes() {
    let mut s = Site::new("", "", "");
    let mut old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let new = s.launch(true);
    // The old run holds the task link, the new one none.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        if let Some(v) = metric_at(s.admin, "fedbus_task_links") {
            seen.insert(v as u64);
        }
        if seen.len() >= 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![0, 1],
        "both runs answer on the admin port"
    );
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    drop(new);
}

/// FEDERATION.md "Takeover" step 3: "The tasks relink to the new router as soon as the old one
/// closes their links": `/readyz` of the new run turns 200 soon after the old one exits.
#[test]
fn takeover_new_router_is_ready_soon_after_the_old_exits() {
    let mut s = Site::new("", "", "");
    let mut old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let new = s.launch(true);
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    let exited = Instant::now();
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    let took = wait_until(
        "/readyz 200 on the new run",
        Duration::from_secs(5),
        || (try_get(s.admin, "/readyz").map(|x| x.0) == Some(200)).then(|| exited.elapsed()),
        || new.log(),
    );
    eprintln!("new run ready {took:?} after the old one exited");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(metric_at(s.admin, "fedbus_task_links"), Some(1.0));
}

/// Outcome of one client's requests over a restart.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    no_live_task: AtomicU64,
    /// Pipelined requests the router never read (after an answer with `Connection: close`):
    /// the client sends them again, as the docs say.
    resent: AtomicU64,
    /// Upgrades refused 503 `draining` (a connection the draining router accepted in the
    /// instant its listener closed).
    ws_draining: AtomicU64,
    failed: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, why: String) {
        self.failed.lock().unwrap().push(why);
    }
    fn summary(&self) -> String {
        let f = self.failed.lock().unwrap();
        format!(
            "ok {} no_live_task {} resent {} ws_draining {} failed {}: {:?}",
            self.ok.load(Ordering::Relaxed),
            self.no_live_task.load(Ordering::Relaxed),
            self.resent.load(Ordering::Relaxed),
            self.ws_draining.load(Ordering::Relaxed),
            f.len(),
            f.iter().take(6).collect::<Vec<_>>()
        )
    }
}

/// Judges one HTTP answer to a request with body `want`.
fn judge(t: &Tally, r: &Resp, want: &[u8]) {
    if r.status == 200 && r.body == want {
        t.ok.fetch_add(1, Ordering::Relaxed);
    } else if r.status == 503 && r.text().contains("no_live_task") {
        // FEDERATION.md "Not yet": a takeover with no sibling, until the task relinks.
        t.no_live_task.fetch_add(1, Ordering::Relaxed);
    } else {
        t.fail(format!("{} {}", r.status, r.text()));
    }
}

/// A keep-alive client that pipelines `depth` requests at a time until `stop`.
fn pipelining_client(
    api: SocketAddr,
    path: String,
    tok: String,
    depth: usize,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut s = match TcpStream::connect_timeout(&api, Duration::from_secs(1)) {
                Ok(s) => s,
                Err(e) => {
                    t.fail(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            let mut buf = Vec::new();
            'conn: while !stop.load(Ordering::Relaxed) {
                let bodies: Vec<Vec<u8>> = (0..depth)
                    .map(|i| format!("s{}", seq + i as u64).into_bytes())
                    .collect();
                seq += depth as u64;
                let mut wire = Vec::new();
                for b in &bodies {
                    wire.extend(Req::post(&path).token(&tok).body(b).bytes());
                }
                if let Err(e) = s.write_all(&wire) {
                    t.fail(format!("write on a kept-alive connection: {e}"));
                    break 'conn;
                }
                for (i, b) in bodies.iter().enumerate() {
                    match read_resp(&mut s, &mut buf) {
                        Ok(r) => {
                            judge(&t, &r, b);
                            if r.closes() {
                                t.resent
                                    .fetch_add((depth - i - 1) as u64, Ordering::Relaxed);
                                break 'conn;
                            }
                        }
                        Err(e) => {
                            t.fail(format!("answer {i} of {depth}: {e}"));
                            break 'conn;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    })
}

/// A takeover under load (FEDERATION.md "Takeover"): a router with a task, the clients that
/// `clients` starts on it (given the site, a token, the stop flag and the tally), then a second
/// run with `--takeover` and SIGTERM to the first, which exits 0; the clients go on until the
/// new run served 100 more requests, then stop. Returns their tally.
fn takeover_under(
    clients: impl FnOnce(
        &Site,
        &String,
        &Arc<AtomicBool>,
        &Arc<Tally>,
    ) -> Vec<std::thread::JoinHandle<()>>,
) -> Arc<Tally> {
    let mut s = Site::new("", "", "");
    let mut old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = clients(&s, &tok, &stop, &tally);
    wait_until(
        "clients running",
        Duration::from_secs(5),
        || (tally.ok.load(Ordering::Relaxed) > 50).then_some(()),
        || tally.summary(),
    );
    let new = s.launch(true);
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    let at_exit = tally.ok.load(Ordering::Relaxed);
    wait_until(
        "served by the new run",
        Duration::from_secs(10),
        || (tally.ok.load(Ordering::Relaxed) > at_exit + 100).then_some(()),
        || format!("{}\n{}", tally.summary(), new.log()),
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    tally
}

/// FEDERATION.md "Takeover: upgrading one router with no failed request", with clients that
/// pipeline 4 requests at a time on keep-alive connections: over the takeover every request is
/// answered (200, or 503 `no_live_task` until the task relinks, "Not yet"), except the
/// pipelined ones the old router never read behind an answer with `Connection: close`.
#[test]
fn takeover_with_pipelining_keep_alive_clients_fails_no_request() {
    let tally = takeover_under(|s, tok, stop, tally| {
        (0..2)
            .map(|i| {
                pipelining_client(
                    s.api,
                    s.path(i),
                    tok.clone(),
                    4,
                    stop.clone(),
                    tally.clone(),
                )
            })
            .collect()
    });
    eprintln!("pipelined takeover: {}", tally.summary());
    assert!(
        tally.failed.lock().unwrap().is_empty(),
        "{}",
        tally.summary()
    );
}

/// `/api/ws` sessions over a takeover: each session sends one request at a time; the old
/// router answers what it took and closes with 1001; the client opens a new session (on the
/// new router) and goes on. No answer is an error, no session ends without a close frame.
#[test]
fn takeover_with_ws_sessions_fails_no_request() {
    let tally = takeover_under(|s, tok, stop, tally| {
        (0..2u64)
            .map(|c| {
                let (api, tok, path, stop, t) =
                    (s.api, tok.clone(), s.path(c), stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    let mut id = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut w = match try_open_ws(api, &tok) {
                            Ok(w) => w,
                            Err(e) if e.contains("503") => {
                                t.ws_draining.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Err(e) => {
                                t.fail(format!("open: {e}"));
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                        };
                        'session: while !stop.load(Ordering::Relaxed) {
                            id += 1;
                            let body = id.to_le_bytes();
                            if let Err(e) = w.write_request(id, &path, &body) {
                                t.fail(format!("send: {e}"));
                                break 'session;
                            }
                            match w.read_answer() {
                                Ok(Msg::Frame(f)) => {
                                    let st = f.get_u64(tag::STATUS);
                                    if f.header.request_id != id {
                                        t.fail(format!(
                                            "answer to {} for {id}",
                                            f.header.request_id
                                        ));
                                    } else if st == Some(200) && f.payload[..] == body {
                                        t.ok.fetch_add(1, Ordering::Relaxed);
                                    } else if st == Some(503) {
                                        t.no_live_task.fetch_add(1, Ordering::Relaxed);
                                    } else {
                                        t.fail(format!("status {st:?}"));
                                    }
                                }
                                Ok(Msg::Close(Some(1001))) => {
                                    // The request just sent raced the close frame: sent again.
                                    t.resent.fetch_add(1, Ordering::Relaxed);
                                    break 'session;
                                }
                                Ok(m) => {
                                    t.fail(format!("{m:?}"));
                                    break 'session;
                                }
                                Err(e) => {
                                    t.fail(format!("read: {e}"));
                                    break 'session;
                                }
                            }
                        }
                    }
                })
            })
            .collect()
    });
    eprintln!("ws takeover: {}", tally.summary());
    assert!(
        tally.failed.lock().unwrap().is_empty(),
        "{}",
        tally.summary()
    );
}

/// FEDERATION.md "Takeover": "Every listener (api, TLS api, internal, external, admin) is bound
/// with SO_REUSEPORT": a takeover of a router with an HTTPS listener starts beside it, and
/// HTTPS clients (a new connection per request, curl) see no failed request.
#[test]
fn takeover_of_a_router_with_an_https_listener() {
    let mut s = Site::new("", "api_tls = \"@IP:8443\"", "");
    let certs = TempDir::new("probe-restart-certs");
    let (cert, key) = dev_cert(certs.path(), "a", &["a.test"]);
    let text = std::fs::read_to_string(&s.cfg).unwrap();
    std::fs::write(
        &s.cfg,
        text.replace(
            "[[apps]]",
            &format!("[[tls.certs]]\ncert = {cert:?}\nkey = {key:?}\n[[apps]]"),
        ),
    )
    .unwrap();
    let ca = dev_ca(certs.path());
    let tls = s.tls.unwrap();
    let mut old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let curl = {
        let (ca, tok, path) = (ca.clone(), tok.clone(), s.path(2));
        move || -> (String, String) {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "6", "--cacert"])
                .arg(&ca)
                .args(["--resolve", &format!("a.test:{}:{}", tls.port(), tls.ip())])
                .args(["-H", &format!("Authorization: Bearer {tok}")])
                .args(["--data-binary", "tls", "-o", "-", "-w", "\n%{http_code}"])
                .arg(format!("https://a.test:{}{path}", tls.port()))
                .output()
                .expect("curl");
            let o = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = o.rsplit_once('\n').unwrap_or(("", &o));
            (
                code.to_string(),
                format!("{body} {}", String::from_utf8_lossy(&out.stderr)),
            )
        }
    };
    assert_eq!(curl().0, "200", "HTTPS before the takeover");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let client = {
        let (stop, t, curl) = (stop.clone(), tally.clone(), curl.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (code, body) = curl();
                match code.as_str() {
                    "200" => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    "503" if body.contains("no_live_task") => {
                        t.no_live_task.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => t.fail(format!("{code} {body}")),
                }
            }
        })
    };
    let new = s.launch(true);
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    let at_exit = tally.ok.load(Ordering::Relaxed);
    wait_until(
        "HTTPS served by the new run",
        Duration::from_secs(10),
        || (tally.ok.load(Ordering::Relaxed) > at_exit + 5).then_some(()),
        || format!("{}\n{}", tally.summary(), new.log()),
    );
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    eprintln!("https takeover: {}", tally.summary());
    assert!(
        tally.failed.lock().unwrap().is_empty(),
        "{}",
        tally.summary()
    );
}

/// A takeover started while the old router is already draining (its listeners closed, a slow
/// request still in flight): the new run binds, prints its ready line and answers every new
/// connection (200 or 503 `no_live_task` until the tasks relink); the request in flight on the
/// old one is answered; afterwards both tasks' partitions are served by the new run.
#[test]
fn takeover_while_the_old_router_is_already_draining() {
    let mut s = Site::new("", "", "[readiness]\ndrain_timeout_ms = 20000");
    let mut old = s.launch(false);
    let _fast = s.task("fast", &["--partitions", "0-7"]);
    let _slow = s.task("slow", &["--partitions", "8-15", "--delay-ms", "2500"]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    s.wait_covered(&old);
    let before = s.pending();
    let mut held = TcpStream::connect(s.api).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(&s.req(&tok, 8, b"held")).unwrap();
    s.wait_pending(before + 1.0, &old);
    old.sig("TERM");
    wait_until(
        "old listeners closed",
        Duration::from_secs(3),
        || (listeners_on(s.api) == 0).then_some(()),
        || old.log(),
    );
    let new = s.launch(true);
    let mut answers = Vec::new();
    for i in 0..10u64 {
        let r = one_shot(s.api, &s.req(&tok, i, b"n"))
            .unwrap_or_else(|e| panic!("request {i} to the new run: {e}\n{}", new.log()));
        assert!(
            r.status == 200 || (r.status == 503 && r.text().contains("no_live_task")),
            "{r:?}"
        );
        answers.push(r.status);
    }
    let resp = read_resp(&mut held, &mut Vec::new()).expect("the held request is answered");
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"held"[..]));
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    s.wait_served(&tok, 1, Duration::from_secs(5), &new);
    s.wait_served(&tok, 9, Duration::from_secs(8), &new);
    eprintln!("answers during the old drain: {answers:?}");
}

/// Two takeovers back to back: B takes over A, A is SIGTERMed and still draining (a slow
/// request) when C takes over B and B is SIGTERMed. Clients with a new connection per request
/// see no failure (200, or 503 `no_live_task` while no run has the task), the slow request is
/// answered, and C serves at the end.
#[test]
fn two_takeovers_back_to_back_while_the_first_still_drains() {
    let mut s = Site::new("", "", "[readiness]\ndrain_timeout_ms = 20000");
    let mut a = s.launch(false);
    let _fast = s.task("fast", &["--partitions", "0-7"]);
    let _slow = s.task("slow", &["--partitions", "8-15", "--delay-ms", "2000"]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &a);
    s.wait_covered(&a);
    // The held request first, alone: the pending gauge then counts only it (a client request
    // in flight when `before` was read made the wait miss it under load).
    let before = s.pending();
    let mut held = TcpStream::connect(s.api).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(&s.req(&tok, 8, b"held")).unwrap();
    s.wait_pending(before + 1.0, &a);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let client = {
        let (stop, t, api, req) = (stop.clone(), tally.clone(), s.api, s.req(&tok, 3, b"x"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match one_shot(api, &req) {
                    Ok(r) => judge(&t, &r, b"x"),
                    Err(e) => t.fail(e),
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let mut b = s.launch(true);
    a.sig("TERM");
    wait_until(
        "A draining",
        Duration::from_secs(3),
        || a.log().contains("draining: listener closed").then_some(()),
        || a.log(),
    );
    let c = s.launch(true);
    b.sig("TERM");
    let exit_b = b.wait_exit(Duration::from_secs(10));
    assert!(
        exit_b.is_some_and(|x| x.success()),
        "B: {exit_b:?}\n{}",
        b.log()
    );
    let resp = read_resp(&mut held, &mut Vec::new()).expect("the held request is answered");
    assert_eq!(resp.status, 200, "{resp:?}");
    let exit_a = a.wait_exit(Duration::from_secs(10));
    assert!(
        exit_a.is_some_and(|x| x.success()),
        "A: {exit_a:?}\n{}",
        a.log()
    );
    let at_exit = tally.ok.load(Ordering::Relaxed);
    wait_until(
        "served by C",
        Duration::from_secs(10),
        || (tally.ok.load(Ordering::Relaxed) > at_exit + 20).then_some(()),
        || format!("{}\n{}", tally.summary(), c.log()),
    );
    s.wait_served(&tok, 9, Duration::from_secs(8), &c);
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    eprintln!("two takeovers: {}", tally.summary());
    assert!(
        tally.failed.lock().unwrap().is_empty(),
        "{}",
        tally.summary()
    );
}

/// FEDERATION.md "Takeover" step 1 and TUNING.md `readiness.takeover_wait_ms`: a takeover run
/// whose peer is down accepts clients (and prints its ready line) only after
/// `takeover_wait_ms`, with the warning; connections the kernel gave it meanwhile wait in its
/// listen queue and are answered after the wait, never reset.
#[test]
fn takeover_wait_runs_to_takeover_wait_ms_when_a_peer_is_down() {
    let mut s = site_with_a_dead_peer(1500);
    let mut old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let started = Instant::now();
    let (new, rx) = s.spawn(true);
    wait_until(
        "new run bound its api listener",
        Duration::from_secs(5),
        || (listeners_on(s.api) >= 2).then_some(()),
        || new.log(),
    );
    // Some of these land in the new run's listen queue.
    let mut conns: Vec<TcpStream> = (0..10u64)
        .map(|i| {
            let mut c = TcpStream::connect(s.api).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            c.write_all(&s.req(&tok, i, b"q")).unwrap();
            c
        })
        .collect();
    let ready_after = loop {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("fedbus-ready ") => break started.elapsed(),
            Ok(_) => {}
            Err(_) => panic!("no ready line:\n{}", new.log()),
        }
    };
    assert!(
        ready_after >= Duration::from_millis(1400),
        "ready line {ready_after:?} after the start, takeover_wait_ms 1500"
    );
    assert!(
        new.log()
            .contains("not every peer link is up after readiness.takeover_wait_ms"),
        "{}",
        new.log()
    );
    for (i, c) in conns.iter_mut().enumerate() {
        let r = read_resp(c, &mut Vec::new())
            .unwrap_or_else(|e| panic!("connection {i} made during the wait: {e}"));
        assert!(
            r.status == 200 || (r.status == 503 && r.text().contains("no_live_task")),
            "{r:?}"
        );
    }
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
}

/// SIGKILL of the new run during its takeover wait (before it accepts anything): the old
/// router keeps serving; connections the kernel had queued on the killed run's listeners move
/// to the old one (`net.ipv4.tcp_migrate_req = 1`) and are answered, and every later
/// connection is served.
#[test]
fn sigkill_of_the_new_run_during_its_takeover_wait_loses_nothing() {
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .unwrap_or_default()
        .trim()
        == "1";
    let mut s = site_with_a_dead_peer(8000);
    let old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let (mut new, _rx) = s.spawn(true);
    wait_until(
        "new run bound its api listener",
        Duration::from_secs(5),
        || (listeners_on(s.api) >= 2).then_some(()),
        || new.log(),
    );
    let mut conns: Vec<TcpStream> = (0..12u64)
        .map(|i| {
            let mut c = TcpStream::connect(s.api).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            c.write_all(&s.req(&tok, i, format!("k{i}").as_bytes()))
                .unwrap();
            c
        })
        .collect();
    // Those the old run took are answered at once; the rest wait in the new run's queue.
    let mut early = vec![None; conns.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let mut buf = Vec::new();
        if let Ok(r) = read_resp(c, &mut buf) {
            early[i] = Some(r);
        }
        c.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    }
    let queued = early.iter().filter(|e| e.is_none()).count();
    assert!(queued > 0, "no connection went to the new run's listener");
    assert!(new.alive(), "{}", new.log());
    new.kill9();
    let mut lost = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        let got = match early[i].take() {
            Some(r) => Ok(r),
            None => read_resp(c, &mut Vec::new()),
        };
        match got {
            Ok(r) if r.status == 200 && r.body == format!("k{i}").as_bytes() => {}
            other => lost.push(format!("{i}: {other:?}")),
        }
    }
    for i in 0..20u64 {
        let r = one_shot(s.api, &s.req(&tok, i, b"after"))
            .unwrap_or_else(|e| panic!("after the kill, request {i}: {e}\n{}", old.log()));
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(
        lost.is_empty() || !migrate,
        "tcp_migrate_req = 1, yet connections queued on the killed run were lost: {lost:?}"
    );
    eprintln!("migrate_req {migrate}; {queued} queued on the killed run; lost {lost:?}");
}

/// Rolling back an upgrade: the takeover run is SIGTERMed while the old one still runs. It
/// drains and exits 0; its listeners close, so every connection goes to the old run again,
/// and clients (a new connection per request) see no failure.
#[test]
fn a_takeover_run_sigtermed_before_the_old_one_hands_everything_back() {
    // The new run has no task (the old one is not draining, so the task stays linked to it):
    // its 503 `no_live_task` is how the test sees that it takes clients. The hold
    // (`readiness.takeover_task_wait_ms`) is off: it would keep that answer back for its whole
    // window (5 s) and race the 5 s wait below.
    let mut s = Site::new("", "", "[readiness]\ntakeover_task_wait_ms = 0");
    let old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let client = {
        let (stop, t, api, req) = (stop.clone(), tally.clone(), s.api, s.req(&tok, 3, b"x"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match one_shot(api, &req) {
                    Ok(r) => judge(&t, &r, b"x"),
                    Err(e) => t.fail(e),
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let mut new = s.launch(true);
    wait_until(
        "both runs take clients",
        Duration::from_secs(5),
        || (tally.no_live_task.load(Ordering::Relaxed) > 0).then_some(()),
        || format!("{}\n{}", tally.summary(), new.log()),
    );
    new.sig("TERM");
    let exit = new.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", new.log());
    let nlt = tally.no_live_task.load(Ordering::Relaxed);
    let ok = tally.ok.load(Ordering::Relaxed);
    wait_until(
        "served by the old run alone",
        Duration::from_secs(5),
        || (tally.ok.load(Ordering::Relaxed) > ok + 50).then_some(()),
        || tally.summary(),
    );
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    eprintln!("rollback: {}", tally.summary());
    assert!(
        tally.failed.lock().unwrap().is_empty(),
        "{}",
        tally.summary()
    );
    assert_eq!(
        tally.no_live_task.load(Ordering::Relaxed),
        nlt,
        "503s after the takeover run exited: {}",
        tally.summary()
    );
}

/// A takeover run with more shards than the old one (1 -> 2; shard k on internal port + k):
/// the task relinks to every shard of the new run, which is ready and serves on both shards.
#[test]
fn takeover_by_a_run_with_more_shards() {
    let mut s = Site::new("", "", "");
    let mut old = s.launch(false);
    let _t = s.task("t", &[]);
    let tok = s.token("alice");
    s.wait_served(&tok, 1, Duration::from_secs(10), &old);
    let text = std::fs::read_to_string(&s.cfg).unwrap();
    std::fs::write(
        &s.cfg,
        text.replace("shard_cores = [0]", "shard_cores = [0, 1]"),
    )
    .unwrap();
    let (new, ready) = s.launch_within(true, START_TIMEOUT);
    assert_eq!(ready.internal.len(), 2, "{ready:?}");
    assert_eq!(ready.internal[1].port(), 8901, "{ready:?}");
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    wait_until(
        "task linked to both shards of the new run",
        Duration::from_secs(5),
        || (metric_at(s.admin, "fedbus_task_links") == Some(2.0)).then_some(()),
        || new.log(),
    );
    // Linked is not yet published: ready once the control thread has published the links.
    s.wait_covered(&new);
    let mut shards = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let r = one_shot(s.api, &s.req(&tok, i, b"y")).expect("answer");
        assert_eq!(r.status, 200, "{r:?}");
        shards.insert(r.header("fedbus-shard").unwrap_or("?").to_string());
    }
    assert_eq!(shards.len(), 2, "answers from shards {shards:?}");
}

/// TUNING.md `readiness`: "`drain_timeout_ms` should exceed `limits.request_timeout_ms`, so a
/// request that is slow but answered is not cut": a request whose task never answers is
/// answered 504 `task_timeout` at `request_timeout_ms`, with `Connection: close`, and the
/// drain ends then (nothing pending), not at `drain_timeout_ms`.
#[test]
fn drain_ends_when_the_last_pending_request_times_out() {
    let mut r = Router::new()
        .shards(1)
        .request_timeout_ms(1000)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(8000).start();
    let tok = r.token(APP, "alice");
    let before = r.metrics().get("fedbus_pending_requests");
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(6));
    c.send(&Req::post(&r.path(APP, 2)).token(&tok).body(b"slow").bytes());
    r.wait_pending(before + 1.0);
    let t = Instant::now();
    r.sigterm();
    let resp = c.read_response().expect("an answer at the request timeout");
    resp.assert_error(504, "task_timeout");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    let exit = r.wait_exit(Duration::from_secs(6));
    let took = t.elapsed();
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}");
    assert!(took < Duration::from_millis(3000), "drain took {took:?}");
}

/// The `/api/ws` twin of "a request whose body is arriving is received and answered first"
/// (ARCHITECTURE.md "Readiness and drain", for HTTP): a request message whose first half
/// reached the session before SIGTERM and whose rest follows right after is, per
/// FEDERATION.md ("closed with 1001 once its answers are out"; only a request sent after the
/// close frame goes unanswered), answered before the close frame.
#[test]
fn drain_ws_message_arriving_at_sigterm_is_answered() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = open_ws(r.api, &tok);
    // The whole masked frame of one request, sent in two halves.
    let body = random_bytes(32 * 1024, 7);
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::PATH, r.path(APP, 5).as_bytes());
    let f = encode_frame(Kind::Request, 0, 0, 0, 9, &meta, &body);
    let mask = [9u8, 8, 7, 6];
    let mut h = [0u8; MAX_HEADER];
    let n = encode_head(opcode::BINARY, f.len(), Some(mask), &mut h);
    let mut wire = h[..n].to_vec();
    wire.extend(f.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let half = wire.len() / 2;
    w.s.write_all(&wire[..half]).unwrap();
    // The first half is read (charged to the body budget as it arrives).
    wait_until(
        "the first half is held",
        Duration::from_secs(3),
        || (r.metrics().get("fedbus_body_bytes_held") > 0.0).then_some(()),
        || r.log(),
    );
    r.sigterm();
    wait_draining(r.admin, || r.log());
    // Every shard task sees the flag within 20 ms (health::POLL).
    std::thread::sleep(Duration::from_millis(100));
    w.s.write_all(&wire[half..]).unwrap();
    match w.read_answer() {
        Ok(Msg::Frame(fr)) => {
            assert_eq!(fr.header.request_id, 9);
            assert_eq!(fr.get_u64(tag::STATUS), Some(200), "{fr:?}");
        }
        other => panic!("the request begun before SIGTERM got no answer: {other:?}"),
    }
}
