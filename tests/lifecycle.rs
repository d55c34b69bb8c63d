//! An operator's lifecycle of a router, written from what the docs promise (docs/FEDERATION.md
//! "Readiness and drain", "Takeover"; docs/ROTATION.md "Reload"; docs/TUNING.md `readiness`,
//! `listen.*`): SIGTERM drains, SIGHUP reloads of broken and good files, `fedbus run` with bad
//! configs or taken ports, kill -9 and restart, tasks that die and come back, key rotation, and
//! the admin endpoints throughout. Every wait is bounded and waits on a fact (a ready line, a
//! metric, a log line), never on a fixed sleep, except where a test asserts that something
//! does *not* happen within a stated window.

use fedbus_proto::tag;
use fedbus_testkit::launch::{
    self, client_token, plain, spawn_echo_task, spawn_run, wait_ready, Run,
};
use fedbus_testkit::seed;
use fedbus_testkit::ws::{self, Answer as Msg};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// `GET path` on an admin listener without panicking: None when the connection fails.
pub(crate) fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn try_metrics(addr: SocketAddr) -> Option<Metrics> {
    let (st, body) = try_get(addr, "/metrics")?;
    (st == 200).then(|| Metrics::parse(&body))
}

/// One request on a new connection, read by hand: (status, body), or why it failed (connect
/// refused, reset, EOF before an answer).
fn raw_request(addr: SocketAddr, req: &[u8]) -> Result<(u16, String), String> {
    let mut st = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    st.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    st.write_all(req).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = st
            .read_retrying(&mut chunk)
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("EOF after {} bytes", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let t = String::from_utf8_lossy(&buf).into_owned();
        if let Some((h, b)) = t.split_once("\r\n\r\n") {
            let len: usize = h
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if b.len() >= len {
                let status = h
                    .split(' ')
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
                return Ok((status, b.to_string()));
            }
        }
    }
}

/// `fedbus_pending_requests` now.
fn pending(r: &Router) -> f64 {
    r.metrics().get("fedbus_pending_requests")
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    try_metrics(addr).map(|m| m.get(name)).unwrap_or(-1.0)
}

/// Waits until the router's log holds `needle` at least `n` times.
fn wait_log(r: &Router, needle: &str, n: usize, within: Duration) {
    wait_until(
        &format!("log line {needle:?} x{n}"),
        within,
        || (r.log().matches(needle).count() >= n).then_some(()),
        || r.log(),
    );
}

fn wait_metric_eq(r: &Router, name: &str, want: f64, within: Duration) {
    wait_until(
        &format!("{name} == {want}"),
        within,
        || (r.metrics().get(name) == want).then_some(()),
        || format!("now {}\n{}", r.metrics().get(name), r.log()),
    );
}

fn echo_ok(r: &Router, wsid: u64, tok: &str) -> Response {
    let resp = r.request(&Req::post(&r.path(APP, wsid)).token(tok).body(b"hi"));
    assert_eq!(resp.status, 200, "{resp:?}\n{}", r.log());
    assert_eq!(resp.body, b"hi");
    resp
}

/// Runs `fedbus run --config <text>` in `home`, expecting it to fail; returns
/// (status, stdout+stderr, time it took). Panics if it is still running after `within`.
fn run_expect_failure(
    home: &Path,
    name: &str,
    text: &str,
    within: Duration,
) -> (ExitStatus, String, Duration) {
    let cfg = home.join(format!("{name}.toml"));
    std::fs::write(&cfg, text).expect("write config");
    run_config_expect_failure(home, name, &cfg, within)
}

fn run_config_expect_failure(
    home: &Path,
    name: &str,
    cfg: &Path,
    within: Duration,
) -> (ExitStatus, String, Duration) {
    launch::run_expect_failure(home, cfg, &[], &home.join(format!("{name}.out")), within)
}

// ---------------------------------------------------------------------------------------------
// A router on fixed addresses (127.a.b.33:8800/8900/8700) that can be restarted, killed and
// taken over: the testkit's single Router binds port 0, so a restart would move it. Also used
// by probe_takeover (on 127.a.b.51).

static NEXT_SOLO: AtomicU32 = AtomicU32::new(0);

pub(crate) struct Solo {
    dir: TempDir,
    cfg: PathBuf,
    pub(crate) keys: PathBuf,
    pub(crate) api: SocketAddr,
    external: SocketAddr,
    pub(crate) internal: SocketAddr,
    pub(crate) admin: SocketAddr,
    runs: u32,
}

impl Solo {
    fn new(extra: &str) -> Solo {
        Solo::new_in("local", "dev", 33, extra)
    }

    /// A router of `region/cluster` on 127.a.b.`host` (b from a counter).
    pub(crate) fn new_in(region: &str, cluster: &str, host: u8, extra: &str) -> Solo {
        let n = NEXT_SOLO.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            127,
            100 + (std::process::id() % 150) as u8,
            (n % 250 + 1) as u8,
            host,
        );
        let dir = TempDir::new("solo");
        let keys = dir.path().join("keys");
        keys_init(dir.path(), &keys, &[APP]);
        let cfg = dir.path().join("router.toml");
        std::fs::write(
            &cfg,
            format!(
                "region = \"{region}\"\ncluster = \"{cluster}\"\nkeyring = {:?}\n[listen]\napi = \"{ip}:8800\"\ninternal = \"{ip}:8900\"\nexternal = \"{ip}:8950\"\nadmin = \"{ip}:8700\"\n[tuning]\nshard_cores = [0]\npin = false\n[[apps]]\nname = \"{APP}\"\npartitions = 16\n{extra}\n",
                keys.to_str().expect("utf-8")
            ),
        )
        .expect("write config");
        Solo {
            cfg,
            keys,
            external: SocketAddr::new(ip.into(), 8950),
            api: SocketAddr::new(ip.into(), 8800),
            internal: SocketAddr::new(ip.into(), 8900),
            admin: SocketAddr::new(ip.into(), 8700),
            runs: 0,
            dir,
        }
    }

    pub(crate) fn home(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `fedbus run` and waits for its ready line (10 s).
    pub(crate) fn launch(&mut self, takeover: bool) -> Run {
        self.runs += 1;
        let log = self.home().join(format!("router-{}.log", self.runs));
        let args: &[&str] = if takeover { &["--takeover"] } else { &[] };
        let (run, rx) = spawn_run(self.home(), &self.cfg, args, &log);
        wait_ready(&run, &rx, START_TIMEOUT);
        run
    }

    pub(crate) fn token(&self, sub: &str) -> String {
        client_token(self.home(), &self.keys, APP, sub)
    }

    /// `fedbus task echo` linked to this router (not waited for).
    pub(crate) fn task(&self, label: &str) -> Run {
        self.task_with(label, &[])
    }

    /// `fedbus task echo <args>` linked to this router (not waited for).
    pub(crate) fn task_with(&self, label: &str, args: &[&str]) -> Run {
        let log = self.home().join(format!("task-{label}.log"));
        spawn_echo_task(self.home(), self.internal, &self.keys, args, log)
    }

    pub(crate) fn path(&self, wsid: u64) -> String {
        format!("/api/local/dev/{APP}/api/{wsid}/sys/echo")
    }

    /// One request on a new connection.
    fn try_request(&self, tok: &str, wsid: u64) -> Result<(u16, String), String> {
        raw_request(
            self.api,
            &Req::post(&self.path(wsid)).token(tok).body(b"x").bytes(),
        )
    }

    /// Waits until the router has a task link and serves wsid 1 with 200.
    fn wait_served(&self, tok: &str, within: Duration, ctx: &Run) -> Duration {
        let start = Instant::now();
        wait_until(
            "served 200 again",
            within,
            || match self.try_request(tok, 1) {
                Ok((200, _)) => Some(()),
                _ => None,
            },
            || ctx.log(),
        );
        start.elapsed()
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal `/api/ws` client.

type Ws = ws::Ws;

/// Opens `/api/ws` at `addr` with `tok`; panics unless it is a 101.
fn open_ws(addr: SocketAddr, tok: &str) -> Ws {
    ws::open_api(addr, tok, Duration::from_secs(8)).unwrap_or_else(|e| panic!("{e}"))
}

// =============================================================================================
// SIGTERM drain.

/// FEDERATION.md "Drain": requests in flight at SIGTERM get their answers (the one that leaves
/// a connection with nothing in flight carries `Connection: close`, and it closes), `/readyz`
/// turns 503 `draining` at once while `/healthz` and `/metrics` keep answering, and the router
/// exits 0 once nothing is pending.
#[test]
fn drain_answers_requests_in_flight_and_exits_0() {
    let mut r = Router::new()
        .shards(2)
        .apps(&[(APP, 16)])
        .tail("[readiness]\ndrain_timeout_ms = 15000")
        .start();
    let _t = r.task().delay_ms(1500).start();
    let tok = r.token(APP, "alice");
    wait_until(
        "ready",
        Duration::from_secs(5),
        || (admin_get(r.admin, "/readyz").0 == 200).then_some(()),
        || r.log(),
    );
    let before = pending(&r);
    let mut conns: Vec<(u64, Conn)> = (0..6u64)
        .map(|i| {
            let mut c = r.conn();
            c.set_read_timeout(Duration::from_secs(8));
            c.send(
                &Req::post(&r.path(APP, i))
                    .token(&tok)
                    .body(&i.to_le_bytes())
                    .bytes(),
            );
            (i, c)
        })
        .collect();
    r.wait_pending(before + 6.0);
    let termed = Instant::now();
    r.sigterm();
    let (st, body) = wait_until(
        "/readyz 503 after SIGTERM",
        Duration::from_secs(2),
        || {
            let (s, b) = admin_get(r.admin, "/readyz");
            (s == 503 && b.contains("draining")).then_some((s, b))
        },
        || r.log(),
    );
    let to_503 = termed.elapsed();
    assert_eq!((st, body.as_str()), (503, "not ready: draining\n"));
    assert_eq!(admin_get(r.admin, "/healthz"), (200, "ok\n".to_string()));
    let m = r.metrics();
    assert_eq!(m.get("fedbus_draining"), 1.0);
    assert_eq!(m.get("fedbus_ready"), 0.0);
    for (i, c) in &mut conns {
        let resp = c.read_response().unwrap_or_else(|e| {
            panic!(
                "request {i} in flight at SIGTERM got no answer: {e}\n{}",
                r.log()
            )
        });
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body, i.to_le_bytes());
        assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
        assert!(c.is_closed(), "connection {i} closes after its last answer");
    }
    let exit = r.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "exit 0 after the drain: {exit:?}"
    );
    eprintln!(
        "/readyz 503 {to_503:?} after SIGTERM; exit {:?} after SIGTERM",
        termed.elapsed()
    );
}

/// "The router closes every listener": once it drains, a new client connection and a new task
/// link are refused at connect (a balancer or task moves on), while the admin listener keeps
/// answering (it is how the drain is watched).
#[test]
fn drain_refuses_new_connections_on_api_and_internal() {
    let mut r = Router::new()
        .shards(2)
        .tail("[readiness]\ndrain_timeout_ms = 15000")
        .start();
    let _t = r.task().delay_ms(4000).start();
    let tok = r.token(APP, "alice");
    let before = pending(&r);
    // One request keeps the drain going.
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(8));
    c.send(&Req::post(&r.path(APP, 5)).token(&tok).body(b"held").bytes());
    r.wait_pending(before + 1.0);
    r.sigterm();
    // Every shard's api and internal accept loops logged their close.
    wait_log(&r, "draining: listener closed", 4, Duration::from_secs(3));
    let api = TcpStream::connect_timeout(&r.api, Duration::from_secs(1));
    match api {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(mut s) => {
            // Accepted by someone: it must not be served by the draining router.
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.write_all(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x").bytes());
            let mut b = [0u8; 64];
            let got = s.read_retrying(&mut b);
            panic!(
                "a new api connection was accepted during the drain; read: {got:?} {:?}",
                got.as_ref()
                    .map(|n| String::from_utf8_lossy(&b[..*n]).into_owned())
            );
        }
    }
    for a in &r.internal {
        let e = TcpStream::connect_timeout(a, Duration::from_secs(1))
            .err()
            .unwrap_or_else(|| panic!("task link listener {a} still accepts during the drain"));
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
    assert_eq!(admin_get(r.admin, "/healthz").0, 200);
    let resp = c.read_response().expect("the held request is answered");
    assert_eq!(resp.status, 200, "{resp:?}");
    let exit = r.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

/// `readiness.drain_timeout_ms` bounds the drain: a request the task will not answer in time
/// does not keep the router: it exits 0 at the timeout ("drain timeout: closing with work
/// left"), and the client's connection ends (no hang).
#[test]
fn drain_timeout_ms_bounds_the_drain_and_exit_is_0() {
    let mut r = Router::new()
        .shards(1)
        .request_timeout_ms(30000)
        .tail("[readiness]\ndrain_timeout_ms = 1500\ndrain_peer_hold_ms = 500")
        .start();
    let _t = r.task().delay_ms(20000).start();
    let tok = r.token(APP, "alice");
    let before = pending(&r);
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(8));
    c.send(
        &Req::post(&r.path(APP, 5))
            .token(&tok)
            .body(b"never")
            .bytes(),
    );
    r.wait_pending(before + 1.0);
    let termed = Instant::now();
    r.sigterm();
    let exit = r.wait_exit(Duration::from_secs(8));
    let took = termed.elapsed();
    assert!(
        exit.is_some_and(|s| s.success()),
        "exit 0 at the drain timeout: {exit:?}"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(4000),
        "drain took {took:?}, drain_timeout_ms = 1500"
    );
    assert!(
        r.log().contains("drain timeout: closing with work left"),
        "{}",
        r.log()
    );
    // The task links close with 1001 at the end of the drain: the request still pending is
    // answered 502 task_lost (or its connection just ends); the client must not hang.
    let t = Instant::now();
    match c.read_response() {
        Ok(resp) => resp.assert_error(502, "task_lost"),
        Err(e) => assert!(!is_timeout(&e), "the client hung: {e}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the client hung {:?}",
        t.elapsed()
    );
}

/// `readiness.drain_idle_close_ms`: a keep-alive connection idle at SIGTERM is closed once it
/// has been idle that long, not at once and not at the end of the drain.
#[test]
fn drain_closes_an_idle_keep_alive_connection_after_drain_idle_close_ms() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 15000\ndrain_idle_close_ms = 800")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut idle = r.conn();
    let resp = idle.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"a"));
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("connection"),
        None,
        "keep-alive before the drain"
    );
    let idle_since = Instant::now();
    r.sigterm();
    let termed = Instant::now();
    idle.set_read_timeout(Duration::from_secs(6));
    assert!(
        idle.is_closed(),
        "the idle connection is closed by the drain"
    );
    let closed_after = idle_since.elapsed();
    assert!(
        closed_after >= Duration::from_millis(700) && closed_after < Duration::from_millis(2500),
        "idle connection closed {closed_after:?} after its last answer (drain_idle_close_ms 800)"
    );
    let exit = r.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    eprintln!(
        "idle closed {closed_after:?} after last answer; exit {:?} after SIGTERM",
        termed.elapsed()
    );
}

/// "A second signal exits at once": SIGTERM starts a long drain, SIGINT ends it now.
#[test]
fn a_second_signal_during_a_drain_exits_at_once() {
    let mut r = Router::new()
        .shards(1)
        .request_timeout_ms(30000)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let _t = r.task().delay_ms(20000).start();
    let tok = r.token(APP, "alice");
    let before = pending(&r);
    let mut c = r.conn();
    c.send(&Req::post(&r.path(APP, 5)).token(&tok).body(b"held").bytes());
    r.wait_pending(before + 1.0);
    r.sigterm();
    wait_until(
        "draining",
        Duration::from_secs(3),
        || (r.metrics().get("fedbus_draining") == 1.0).then_some(()),
        || r.log(),
    );
    let pid = seed::pid(&r) as u32;
    let t = Instant::now();
    signal(pid, "INT");
    let exit = r.wait_exit(Duration::from_secs(3));
    assert!(
        exit.is_some(),
        "still draining {:?} after the second signal",
        t.elapsed()
    );
    eprintln!("second signal: exit {exit:?} after {:?}", t.elapsed());
    assert!(
        r.log().contains("during the drain: exiting now"),
        "{}",
        r.log()
    );
}

/// An `/api/ws` session open at SIGTERM gets the answer to its request in flight, then a close
/// frame 1001 (going away); the router then exits 0.
#[test]
fn drain_closes_a_websocket_session_1001_after_its_answers() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 15000")
        .start();
    let _t = r.task().delay_ms(800).start();
    let tok = r.token(APP, "alice");
    let before = pending(&r);
    let mut w = open_ws(r.api, &tok);
    w.write_request(7, &r.path(APP, 3), b"in flight")
        .expect("write request");
    r.wait_pending(before + 1.0);
    r.sigterm();
    let mut answered = false;
    loop {
        match w.read_answer().expect("a message before the close") {
            Msg::Frame(f) => {
                assert_eq!(f.header.request_id, 7, "{f:?}");
                assert_eq!(f.get_u64(tag::STATUS), Some(200), "{f:?}");
                assert_eq!(&f.payload[..], b"in flight");
                answered = true;
            }
            Msg::Close(code) => {
                assert!(answered, "closed before the answer in flight went out");
                assert_eq!(code, Some(1001), "close code");
                break;
            }
            Msg::Other(op) => panic!("unexpected opcode {op:?}"),
        }
    }
    let exit = r.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

// =============================================================================================
// Restarts: SIGTERM, kill -9, takeover, a second router on the same addresses.

/// A router drained with SIGTERM closes its task links with 1001 ("the tasks reconnect with
/// backoff"); started again on the same addresses, its task relinks on its own and requests
/// are served again.
#[test]
fn sigterm_then_restart_on_the_same_addresses_relinks_the_task() {
    let mut s = Solo::new("");
    let mut a = s.launch(false);
    let task = s.task("t");
    let tok = s.token("alice");
    s.wait_served(&tok, Duration::from_secs(10), &a);
    a.sig("TERM");
    let exit = a.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", a.log());
    assert!(
        a.log().contains("drain over: closing task links"),
        "{}",
        a.log()
    );
    wait_until(
        "task saw its link close",
        Duration::from_secs(5),
        || {
            task.log()
                .contains("router closed the link (Some(1001))")
                .then_some(())
        },
        || task.log(),
    );
    let b = s.launch(false);
    let took = s.wait_served(&tok, Duration::from_secs(12), &b);
    let (st, _) = try_get(s.admin, "/readyz").expect("readyz");
    assert_eq!(st, 200);
    eprintln!("served {took:?} after the restart's ready line");
}

/// kill -9 and an immediate restart on the same addresses (PROBE_RETRY): the restart comes up,
/// the task relinks and requests are served.
#[test]
fn kill9_then_restart_relinks_the_task_and_serves() {
    let mut s = Solo::new("");
    let mut a = s.launch(false);
    let _task = s.task("t");
    let tok = s.token("alice");
    s.wait_served(&tok, Duration::from_secs(10), &a);
    a.kill9();
    let b = s.launch(false);
    let took = s.wait_served(&tok, Duration::from_secs(12), &b);
    assert!(metric(s.admin, "fedbus_task_links") >= 1.0);
    assert_no_panic(&b.log());
    eprintln!("served {took:?} after the restart's ready line");
}

/// TUNING.md `listen.takeover`: "Without it the router probes each address without
/// SO_REUSEPORT first and fails to start when one is taken". A second `fedbus run` of the same
/// config fails clearly, and the first keeps serving.
#[test]
fn a_second_router_on_the_same_addresses_fails_and_the_first_keeps_serving() {
    let mut s = Solo::new("");
    let a = s.launch(false);
    let _task = s.task("t");
    let tok = s.token("alice");
    s.wait_served(&tok, Duration::from_secs(10), &a);
    let cfg = s.cfg.clone();
    let (st, out, took) =
        run_config_expect_failure(s.home(), "second", &cfg, Duration::from_secs(10));
    assert!(!st.success(), "{out}");
    assert_no_panic(&out);
    assert!(
        out.contains("fedbus: error:") && out.to_lowercase().contains("in use"),
        "{out}"
    );
    assert!(!out.contains("fedbus-ready"), "{out}");
    eprintln!(
        "second router failed after {took:?}: {}",
        out.lines().last().unwrap_or("")
    );
    for wsid in 0..20 {
        let r = s
            .try_request(&tok, wsid)
            .expect("first router still answers");
        assert_eq!(r.0, 200, "{r:?}");
    }
}

/// docs/FEDERATION.md, "Takeover": a router with no sibling is taken over under load (clients
/// with a new connection per request and clients on keep-alive connections) and not one
/// request fails, `503 no_live_task` included. The old router tells its task
/// `router_draining` once its task listener is closed, the task links the address again (the
/// new router) at once, and the new router holds the requests it took before that link came
/// (`readiness.takeover_task_wait_ms`) instead of answering 503. Before both, the new router
/// answered `no_live_task` until the task relinked after the old one's drain.
#[test]
fn takeover_of_a_single_router_fails_no_request() {
    takeover_of_a_single_router("fedbus task", false, |s| s.task("t"));
}

/// The same takeover with a task that does not know `router_draining`: a task runner written
/// against the protocol before it, here `tests/python/echo_task.py` (written from PROTOCOL.md
/// alone), which skips a text message it does not know. It keeps its link to the old router
/// until that one closes it (1001, at the end of its drain) and links again one backoff later
/// (25-75 ms) through the address the new router now holds; the new router holds the requests
/// it took meanwhile (`readiness.takeover_task_wait_ms`), so no request fails either.
#[test]
fn takeover_with_a_task_that_ignores_router_draining_fails_no_request() {
    let py = crate::python_task::python();
    takeover_of_a_single_router("python task", true, |s| {
        let token = launch::service_token(s.home(), &s.keys, APP, "py");
        let log = s.home().join("task-py.log");
        let stderr = std::fs::File::create(&log).expect("task log");
        let child = crate::python_task::spawn_echo(&py, &s.internal.to_string(), &token, stderr);
        Run::new(child, log)
    });
}

/// One router, one task (`task` starts it), two clients with a new connection per request and
/// two on keep-alive connections; a takeover by a new run, then SIGTERM to the old one: no
/// request fails, the old run exits 0 and the new one serves. `held`: at least one request
/// must have waited on the new router for the task (a task that relinks only after the old
/// router's drain leaves a gap of tens of milliseconds that the clients always hit; with
/// `router_draining` the gap is a few milliseconds and not asserted).
fn takeover_of_a_single_router(which: &str, held: bool, task: impl FnOnce(&Solo) -> Run) {
    launch::migrate_req_on();
    let mut s = Solo::new("");
    let mut old = s.launch(false);
    let _task = task(&s);
    let tok = s.token("alice");
    s.wait_served(&tok, Duration::from_secs(10), &old);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let per_request = (0..2)
        .map(|k| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let (api, tok, path) = (s.api, tok.clone(), s.path(3 + k));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let res = raw_request(api, &Req::post(&path).token(&tok).body(b"x").bytes());
                    match res {
                        Ok((200, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((st, b)) => failed.lock().unwrap().push(format!("{st} {b}")),
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect::<Vec<_>>();
    let keep_alive = fedbus_testkit::attack::BackToBack::start(s.api, 2, |w| {
        Req::post(&s.path(w as u64 + 7))
            .token(&tok)
            .body(b"over")
            .bytes()
    });
    wait_until(
        "clients running",
        Duration::from_secs(5),
        || (ok.load(Ordering::Relaxed) > 5 && keep_alive.answered() > 5).then_some(()),
        String::new,
    );
    let new = s.launch(true);
    let termed = Instant::now();
    old.sig("TERM");
    let exit = old.wait_exit(Duration::from_secs(10));
    let drained = termed.elapsed();
    assert!(
        exit.is_some_and(|x| x.success()),
        "old run: {exit:?}\n{}",
        old.log()
    );
    let (ok_at_exit, answered_at_exit) = (ok.load(Ordering::Relaxed), keep_alive.answered());
    wait_until(
        "new router serves",
        Duration::from_secs(12),
        || {
            (ok.load(Ordering::Relaxed) > ok_at_exit + 5
                && keep_alive.answered() > answered_at_exit + 5)
                .then_some(())
        },
        || new.log(),
    );
    stop.store(true, Ordering::Relaxed);
    for c in per_request {
        c.join().unwrap();
    }
    let kept = keep_alive.stop();
    let failed = failed.lock().unwrap().clone();
    let waits = metric(s.admin, "fedbus_takeover_task_waits_total");
    eprintln!(
        "takeover ({which}): old drained in {drained:?}; per-request ok {} failed {}: {:?}; keep-alive {kept:?}; requests that waited for the task on the new router: {waits}",
        ok.load(Ordering::Relaxed),
        failed.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        failed.is_empty(),
        "requests failed over the takeover: {failed:?}\nold: {}\nnew: {}",
        old.log(),
        new.log()
    );
    assert!(
        !held || waits >= 1.0,
        "no request waited on the new router for the task ({which}): the gap this test is \
         about was not hit\nnew: {}",
        new.log()
    );
    assert_eq!(kept.len(), 1, "keep-alive answers: {kept:?}\n{}", new.log());
    assert!(kept.contains_key("200"), "{kept:?}");
    assert_eq!(try_get(s.admin, "/readyz").map(|x| x.0), Some(200));
}

/// docs/FEDERATION.md "Takeover": once the old router drains, the admin address answers from
/// the new one alone. Before, both processes answered on it (SO_REUSEPORT) for the whole drain,
/// so a probe saw the old router's 503 and the new one's 200 by turns. The old router's drain
/// is held open by a request whose body is still arriving; meanwhile 20 probes on new
/// connections all get 200, and the held request is still answered by the old router.
#[test]
fn after_a_takeover_the_draining_router_leaves_the_admin_address_to_the_new_one() {
    launch::migrate_req_on();
    let mut s = Solo::new("[readiness]\ncoverage = \"none\"\n");
    let mut old = s.launch(false);
    let tok = s.token("alice");
    let mut held = TcpStream::connect(s.api).expect("connect");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 10\r\n\r\nhalf ",
        s.path(1)
    );
    held.write_all(head.as_bytes()).expect("head");
    let new = s.launch(true);
    assert_eq!(try_get(s.admin, "/readyz").map(|x| x.0), Some(200));
    old.sig("TERM");
    wait_until(
        "old router draining",
        Duration::from_secs(5),
        || {
            // The drain's own line (not main's "signal 15: draining"): it comes after the
            // admin listener's fate is decided.
            let log = old.log();
            let drain = |l: &&str| l.contains("shard::listen") && l.contains("draining");
            log.lines().any(|l| drain(&l)).then_some(())
        },
        || old.log(),
    );
    let answers: Vec<Option<u16>> = (0..20)
        .map(|_| try_get(s.admin, "/readyz").map(|x| x.0))
        .collect();
    assert!(
        answers.iter().all(|a| *a == Some(200)),
        "probes during the old router's drain: {answers:?}"
    );
    assert!(old.log().contains("admin listener closed"), "{}", old.log());
    // The old router is still draining, and answers the request it holds.
    assert!(old.wait_exit(Duration::from_millis(1)).is_none());
    held.write_all(b"half!").expect("rest of the body");
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = held.read_to_end(&mut buf);
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|x| x.success()),
        "old: {exit:?}\n{}",
        old.log()
    );
    assert_eq!(
        try_get(s.admin, "/readyz").map(|x| x.0),
        Some(200),
        "{}",
        new.log()
    );
}

/// A rolling upgrade of everything at once: three rounds in which a new task starts, a new
/// router takes the addresses over, and then the old router and the old task both get SIGTERM
/// together, under four clients sending back to back. The new task, linked to the old router,
/// is told `router_draining` and links the new one; the old task stops on the old router
/// (`draining`, `drained`) and links nothing new; the new router holds what it takes until the
/// new task has linked. Not one request fails, and both old processes exit 0.
#[test]
fn a_router_takeover_and_a_task_restart_at_once_fail_no_request() {
    launch::migrate_req_on();
    let mut s = Solo::new("");
    let mut router = s.launch(false);
    let mut task = s.task("t0");
    let tok = s.token("alice");
    s.wait_served(&tok, Duration::from_secs(10), &router);
    let load = fedbus_testkit::attack::BackToBack::start(s.api, 4, |w| {
        Req::post(&s.path(w as u64 * 5))
            .token(&tok)
            .body(b"both")
            .bytes()
    });
    for round in 1..=3 {
        // One router listens now: its routing table shows the new task before the roll.
        let generation = metric(s.admin, "fedbus_routing_generation");
        let next_task = s.task(&format!("t{round}"));
        wait_until(
            "a routing table with the new task",
            Duration::from_secs(10),
            || (metric(s.admin, "fedbus_routing_generation") > generation).then_some(()),
            || router.log(),
        );
        let next_router = s.launch(true);
        router.sig("TERM");
        task.sig("TERM");
        let (r_exit, t_exit) = (
            router.wait_exit(Duration::from_secs(15)),
            task.wait_exit(Duration::from_secs(15)),
        );
        assert!(
            r_exit.is_some_and(|x| x.success()),
            "round {round}, old router: {r_exit:?}\n{}",
            router.log()
        );
        assert!(
            t_exit.is_some_and(|x| x.success()),
            "round {round}, old task: {t_exit:?}\n{}",
            task.log()
        );
        let answered = load.answered();
        wait_until(
            "the new router and task serving",
            Duration::from_secs(10),
            || (load.answered() > answered + 50).then_some(()),
            || format!("{}\n{}", next_router.log(), next_task.log()),
        );
        (router, task) = (next_router, next_task);
    }
    let all = load.stop();
    println!(
        "answers over three rolls of router and task: {all:?}; waits for a task on the new routers (last): {}",
        metric(s.admin, "fedbus_takeover_task_waits_total")
    );
    assert!(all.get("200").is_some_and(|n| *n > 100), "{all:?}");
    assert_eq!(
        all.len(),
        1,
        "a request failed: {all:?}\n{}\n{}",
        router.log(),
        task.log()
    );
}

/// docs/TUNING.md `readiness.takeover_task_wait_ms`: a router started with `--takeover` holds
/// a request that finds no task until the window ends, then answers 503 `no_live_task`
/// (counted once in `fedbus_takeover_task_waits_total`, and in `fedbus_pending_requests`
/// while held); after the window a request with no task is answered at once, not held.
#[test]
fn a_takeover_router_holds_a_request_with_no_task_until_its_window_ends() {
    let mut s = Solo::new("[readiness]\ntakeover_task_wait_ms = 3000\n");
    let r = s.launch(true);
    let started = Instant::now();
    let tok = s.token("alice");
    let held = {
        let (api, req) = (s.api, Req::post(&s.path(2)).token(&tok).body(b"x").bytes());
        std::thread::spawn(move || {
            let sent = Instant::now();
            (raw_request(api, &req), sent.elapsed())
        })
    };
    wait_until(
        "the request held",
        Duration::from_secs(5),
        || (metric(s.admin, "fedbus_pending_requests") == 1.0).then_some(()),
        || r.log(),
    );
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "the window ended before the request was seen held: {:?}",
        started.elapsed()
    );
    let (answer, took) = held.join().unwrap();
    let (status, body) = answer.expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no_live_task"), "{body}");
    eprintln!("held {took:?} within a window of 3 s");
    assert_eq!(metric(s.admin, "fedbus_takeover_task_waits_total"), 1.0);
    assert_eq!(metric(s.admin, "fedbus_pending_requests"), 0.0);
    // After the window: answered at once, not counted.
    let (status, body) = s.try_request(&tok, 2).expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert_eq!(metric(s.admin, "fedbus_takeover_task_waits_total"), 1.0);
}

/// PROTOCOL.md section 4, "A router that drains": the old router tells its tasks
/// `router_draining` when its drain begins, and they link to the router that took the address
/// over while the old one still drains (here it waits 6 s for a slow request): the new router
/// registers the task and serves its partitions before the old one has exited.
#[test]
fn a_taken_over_router_hands_its_tasks_over_before_it_has_drained() {
    launch::migrate_req_on();
    let mut s = Solo::new("");
    let mut old = s.launch(false);
    let log = s.home().join("task-fast.log");
    let fast = spawn_echo_task(
        s.home(),
        s.internal,
        &s.keys,
        &["--partitions", "0-14"],
        log,
    );
    let log = s.home().join("task-slow.log");
    let _slow = spawn_echo_task(
        s.home(),
        s.internal,
        &s.keys,
        &["--partitions", "15", "--delay-ms", "6000"],
        log,
    );
    let tok = s.token("alice");
    s.wait_served(&tok, Duration::from_secs(10), &old);
    wait_until(
        "both tasks routed",
        Duration::from_secs(10),
        || (try_get(s.admin, "/readyz").map(|x| x.0) == Some(200)).then_some(()),
        || old.log(),
    );
    // A request the old router holds for 6 s: its drain waits for it.
    let slow = {
        let (api, req) = (
            s.api,
            Req::post(&s.path(15)).token(&tok).body(b"slow").bytes(),
        );
        std::thread::spawn(move || {
            let mut c = Conn::open(api);
            c.set_read_timeout(Duration::from_secs(15));
            c.send(&req);
            c.read_response().map(|r| r.status)
        })
    };
    wait_until(
        "the slow request pending",
        Duration::from_secs(5),
        || (metric(s.admin, "fedbus_pending_requests") == 1.0).then_some(()),
        || old.log(),
    );
    let new = s.launch(true);
    old.sig("TERM");
    wait_until(
        "the new router registers the fast task while the old one drains",
        Duration::from_secs(3),
        || new.log().contains("task link registered").then_some(()),
        || {
            format!(
                "old:\n{}\nnew:\n{}\ntask:\n{}",
                old.log(),
                new.log(),
                fast.log()
            )
        },
    );
    assert!(
        old.alive(),
        "the old router exited before its slow request was answered"
    );
    assert!(
        old.log().contains("told the task links to link again"),
        "{}",
        old.log()
    );
    // The old router's api listener is closed: this goes to the new one, and is served.
    assert_eq!(
        s.try_request(&tok, 1).map(|r| r.0),
        Ok(200),
        "{}",
        new.log()
    );
    assert!(
        old.alive(),
        "the old router exited before its slow request was answered"
    );
    assert_eq!(slow.join().unwrap().ok(), Some(200));
    let exit = old.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
}

// =============================================================================================
// Tasks that die and come back.

/// A task killed: its partitions get 503 `no_live_task` (retry-after: 1) and `/readyz` 503;
/// a new task registers and requests are served again, `/readyz` 200.
#[test]
fn a_task_killed_and_started_again_is_served_again() {
    let r = Router::new().shards(2).apps(&[(APP, 16)]).start();
    let mut t = r.task().start();
    let tok = r.token(APP, "alice");
    echo_ok(&r, 1, &tok);
    wait_until(
        "ready",
        Duration::from_secs(5),
        || (admin_get(r.admin, "/readyz").0 == 200).then_some(()),
        || r.log(),
    );
    t.kill();
    wait_metric_eq(&r, "fedbus_task_links", 0.0, Duration::from_secs(5));
    let resp = wait_until(
        "503 no_live_task",
        Duration::from_secs(5),
        || {
            let resp = r.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x"));
            (resp.status == 503).then_some(resp)
        },
        || r.log(),
    );
    resp.assert_error(503, "no_live_task");
    assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");
    let (st, body) = admin_get(r.admin, "/readyz");
    assert_eq!(st, 503, "{body}");
    let _t2 = r.task().start();
    for w in 0..16 {
        echo_ok(&r, w, &tok);
    }
    wait_until(
        "ready again",
        Duration::from_secs(5),
        || (admin_get(r.admin, "/readyz").0 == 200).then_some(()),
        || r.log(),
    );
}

/// `fedbus task` on SIGTERM (TUNING.md and PROTOCOL.md "Stopping", `--stop-timeout`): it tells
/// the router it is stopping, so new requests go to the other task at once; the request it
/// holds is answered 200; it exits 0 well before the timeout. None fails: a rolling restart of
/// tasks loses no request.
#[test]
fn a_task_stopped_with_sigterm_answers_what_it_holds_and_fails_nothing() {
    let r = Router::new().apps(&[(APP, 16)]).start();
    let mut stopping = r.task().delay_ms(1500).start();
    let _staying = r.task().start();
    let tok = r.token(APP, "alice");
    // Two requests at once: the round robin gives one to each task; the stopping task's takes
    // 1.5 s.
    let slow: Vec<_> = (0..2u64)
        .map(|w| {
            let (c, req) = (
                r.conn(),
                Req::post(&r.path(APP, w)).token(&tok).body(b"held"),
            );
            std::thread::spawn(move || {
                let mut c = c;
                c.set_read_timeout(Duration::from_secs(10));
                c.send(&req.bytes());
                c.read_response().map(|x| x.status)
            })
        })
        .collect();
    wait_until(
        "a request held by the slow task",
        Duration::from_secs(5),
        || (pending(&r) >= 1.0).then_some(()),
        || r.log(),
    );
    let t0 = Instant::now();
    stopping.sigterm();
    wait_until(
        "the stopping task's link out of routing",
        Duration::from_secs(5),
        || {
            (r.metrics()
                .get("fedbus_task_ejected_total{reason=\"stopping\"}")
                >= 1.0)
                .then_some(())
        },
        || format!("{}\n{}", r.log(), stopping.log()),
    );
    let mut statuses = Vec::new();
    for w in 0..20 {
        statuses.push(
            r.request(&Req::post(&r.path(APP, w)).token(&tok).body(b"x"))
                .status,
        );
    }
    let slow: Vec<u16> = slow
        .into_iter()
        .map(|h| h.join().expect("client").expect("answer"))
        .collect();
    let exit = stopping.wait_exit(Duration::from_secs(8));
    let took = t0.elapsed();
    println!("statuses {statuses:?}; slow {slow:?}; exit {exit:?} after {took:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{statuses:?}\n{}",
        r.log()
    );
    assert_eq!(slow, [200, 200]);
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        stopping.log()
    );
    let log = stopping.log();
    assert!(log.contains("stopping: told the routers"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        r.log().contains("task stopping: its link leaves routing"),
        "{}",
        r.log()
    );
    // The other task serves on.
    echo_ok(&r, 3, &tok);
}

/// A rolling restart of tasks under load fails no request: four clients send back to back on
/// keep-alive connections while, five times over, a new task starts and the oldest is stopped
/// with SIGTERM. A request the router routed to the stopping task before it read the task's
/// `draining` is answered by that task (PROTOCOL.md section 4, "Stopping": the router's
/// `drained` tells the task nothing more comes), not refused `503 task_stopping` or lost.
#[test]
fn a_rolling_restart_of_tasks_under_load_fails_no_request() {
    let r = Router::new().shards(2).apps(&[(APP, 16)]).start();
    let mut tasks = std::collections::VecDeque::from([r.task().start()]);
    let tok = r.token(APP, "alice");
    echo_ok(&r, 1, &tok);
    let load = fedbus_testkit::attack::BackToBack::start(r.api, 4, |w| {
        Req::post(&r.path(APP, w as u64))
            .token(&tok)
            .body(b"roll")
            .bytes()
    });
    for _ in 0..5 {
        // The new task in a published routing table before the old one stops (its start
        // waits for its links; a probe answered 200 may have come from the old task).
        let generation = r.metrics().get("fedbus_routing_generation");
        tasks.push_back(r.task().start());
        wait_until(
            "a routing table with the new task",
            Duration::from_secs(5),
            || (r.metrics().get("fedbus_routing_generation") > generation).then_some(()),
            || r.log(),
        );
        let mut old = tasks.pop_front().expect("a task");
        old.sigterm();
        let exit = old.wait_exit(Duration::from_secs(15));
        assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", old.log());
    }
    let all = load.stop();
    println!("answers over five restarts: {all:?}");
    assert!(all.get("200").is_some_and(|n| *n > 100), "{all:?}");
    assert_eq!(
        all.len(),
        1,
        "a request failed during the restarts: {all:?}\n{}",
        r.log()
    );
}

/// docs/TUNING.md `tuning.memory_trim_ms`: after a wave of 1,200 keep-alive connections (one
/// request each) closes, the router gives the freed memory back to the kernel within the
/// interval and logs it, the resident set after below the one before.
#[test]
fn after_a_wave_of_connections_closes_the_router_gives_memory_back() {
    let r = Router::new().tuning("memory_trim_ms", 1000).start();
    let _task = r.task().start();
    let tok = r.token(APP, "alice");
    echo_ok(&r, 1, &tok);
    let req = Req::post(&r.path(APP, 2)).token(&tok).body(b"wave").bytes();
    let wave: Vec<Conn> = (0..1200)
        .map(|_| {
            let mut c = r.conn();
            c.set_read_timeout(Duration::from_secs(5));
            c.send(&req);
            let resp = c.read_response().expect("answer");
            assert_eq!(resp.status, 200, "{resp:?}");
            c
        })
        .collect();
    drop(wave);
    let line = wait_until(
        "a memory trim after the wave closed",
        Duration::from_secs(15),
        || {
            plain(&r.log())
                .lines()
                .find(|l| l.contains("memory trimmed"))
                .map(str::to_string)
        },
        || r.log(),
    );
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    println!("{line}");
    assert!(
        field("rss_after_kib") < field("rss_before_kib"),
        "nothing given back: {line}"
    );
}

/// A task that exits with requests pending on both shards and on an `/api/ws` session: every
/// client gets 502 `task_lost` promptly, none hangs.
#[test]
fn a_task_exiting_with_requests_pending_answers_every_client_502() {
    let r = Router::new().shards(2).start();
    let mut t = r.task().delay_ms(6000).start();
    let tok = r.token(APP, "alice");
    let before = r.metrics().get("fedbus_pending_requests");
    let mut conns: Vec<Conn> = (0..4u64)
        .map(|i| {
            let mut c = r.conn();
            c.set_read_timeout(Duration::from_secs(5));
            c.send(&Req::post(&r.path(APP, i)).token(&tok).body(b"slow").bytes());
            c
        })
        .collect();
    let mut w = open_ws(r.api, &tok);
    w.write_request(9, &r.path(APP, 9), b"slow")
        .expect("write request");
    r.wait_pending(before + 5.0);
    let killed = Instant::now();
    t.kill();
    for c in &mut conns {
        let resp = c.read_response().expect("an answer after the kill");
        resp.assert_error(502, "task_lost");
    }
    match w.read_answer().expect("a ws answer after the kill") {
        Msg::Frame(f) => {
            assert_eq!(f.header.request_id, 9);
            assert_eq!(f.get_u64(tag::STATUS), Some(502), "{f:?}");
            assert_eq!(f.get_str(tag::ERROR), Some("task_lost"), "{f:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "answers took {:?}",
        killed.elapsed()
    );
    wait_metric_eq(&r, "fedbus_pending_requests", 0.0, Duration::from_secs(8));
}

// =============================================================================================
// SIGHUP reloads.

/// ROTATION.md "Reload": a keyring that does not load keeps the old one (`keyring reload
/// failed` in the log, generation unchanged, old tokens still verify); a later good keyring
/// with a rotated secret applies on the next SIGHUP.
#[test]
fn sighup_with_a_broken_keyring_keeps_the_old_one_then_a_good_one_applies() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let t1 = r.token(APP, "alice");
    echo_ok(&r, 1, &t1);
    let app_file = r.keys.join("apps").join("demo.echo.toml");
    let good = std::fs::read_to_string(&app_file).expect("app secret file");
    std::fs::write(&app_file, "[[versions]]\nversion = \"one\"\n").expect("break it");
    seed::sighup(&r);
    wait_log(&r, "keyring reload failed", 1, Duration::from_secs(5));
    assert_eq!(r.metrics().get("fedbus_keyring_generation"), 1.0);
    echo_ok(&r, 2, &t1);
    let pid = seed::pid(&r);
    // Cluster key file broken too.
    let cluster = r.keys.join("cluster.toml");
    let cluster_good = std::fs::read_to_string(&cluster).expect("cluster.toml");
    std::fs::write(&cluster, "garbage = [").expect("break cluster.toml");
    seed::sighup(&r);
    wait_log(&r, "keyring reload failed", 2, Duration::from_secs(5));
    echo_ok(&r, 3, &t1);
    std::fs::write(&cluster, cluster_good).expect("restore");
    std::fs::write(&app_file, good).expect("restore");
    seed::rotate_app(&r, APP);
    seed::sighup(&r);
    wait_metric_eq(&r, "fedbus_keyring_generation", 2.0, Duration::from_secs(5));
    let t2 = seed::fresh_token(&r, APP, "bob");
    assert_eq!(seed::jwt_kid(&t2), "2");
    echo_ok(&r, 4, &t2);
    echo_ok(&r, 5, &t1);
    assert_eq!(seed::pid(&r), pid);
    eprintln!(
        "fedbus_config_reload_failed_total after two keyring failures: {}",
        r.metrics().get("fedbus_config_reload_failed_total")
    );
}

/// A config that does not validate or cannot be read is refused whole on SIGHUP, logged and
/// counted in `fedbus_config_reload_failed_total` once per SIGHUP; the config in force stays;
/// a good one then applies.
#[test]
fn sighup_with_bad_configs_is_refused_and_counted_then_a_good_one_applies() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).expect("config");
    let bad: Vec<(&str, Option<String>)> = vec![
        ("unknown top-level key", Some(format!("bogus_key = 1\n{good}"))),
        ("partitions = 0", Some(good.replace("partitions = 16", "partitions = 0"))),
        ("duplicate app", Some(format!("{good}[[apps]]\nname = \"{APP}\"\npartitions = 4\n"))),
        ("app name without owner", Some(format!("{good}[[apps]]\nname = \"noslash\"\npartitions = 4\n"))),
        (
            "federation keys dir missing",
            Some(format!("{good}[federation]\n[[federation.clusters]]\nregion = \"x\"\ncluster = \"y\"\nrouters = [\"127.0.0.1:1\"]\nkeys = \"/nonexistent/fedbus-keys\"\n")),
        ),
        ("file removed", None),
    ];
    for (i, (what, text)) in bad.iter().enumerate() {
        match text {
            Some(t) => std::fs::write(&cfg, t).expect("write"),
            None => std::fs::remove_file(&cfg).expect("rm"),
        }
        seed::sighup(&r);
        wait_until(
            &format!("{what}: refused and counted"),
            Duration::from_secs(5),
            || {
                (r.metrics().get("fedbus_config_reload_failed_total") >= (i + 1) as f64)
                    .then_some(())
            },
            || r.log(),
        );
        assert_eq!(
            r.metrics().get("fedbus_config_reload_failed_total"),
            (i + 1) as f64,
            "{what}: counted once"
        );
        assert_eq!(
            r.log().matches("config reload refused").count(),
            i + 1,
            "{what}"
        );
        assert_eq!(r.metrics().get("fedbus_apps_generation"), 1.0, "{what}");
        echo_ok(&r, i as u64, &tok);
    }
    std::fs::write(
        &cfg,
        format!("{good}[[apps]]\nname = \"demo/added\"\npartitions = 4\n"),
    )
    .expect("write");
    seed::sighup(&r);
    wait_metric_eq(&r, "fedbus_apps_generation", 2.0, Duration::from_secs(5));
    assert_eq!(
        r.metrics().get("fedbus_config_reload_failed_total"),
        bad.len() as f64
    );
    r.request(&Req::post("/api/local/dev/demo/added/api/1/sys/echo"))
        .assert_error(401, "missing_token");
}

/// ROTATION.md: the config file is also re-read when its mtime changes (no SIGHUP); a broken
/// write is refused and counted once (not at every poll), and a good write then applies.
#[test]
fn a_config_write_without_sighup_is_picked_up_by_the_poll_once() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 200",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, good.replace("partitions = 16", "partitions = \"x\"")).expect("write");
    wait_metric_eq(
        &r,
        "fedbus_config_reload_failed_total",
        1.0,
        Duration::from_secs(5),
    );
    // Six more polls: still counted once (asserting an absence needs a window).
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        r.metrics().get("fedbus_config_reload_failed_total"),
        1.0,
        "{}",
        r.log()
    );
    echo_ok(&r, 1, &tok);
    std::fs::write(
        &cfg,
        format!("{good}[[apps]]\nname = \"demo/added\"\npartitions = 4\n"),
    )
    .expect("write");
    wait_metric_eq(&r, "fedbus_apps_generation", 2.0, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        r.metrics().get("fedbus_apps_generation"),
        2.0,
        "loaded once"
    );
    assert_eq!(r.metrics().get("fedbus_config_reload_failed_total"), 1.0);
    assert!(r.log().contains("config file changed"), "{}", r.log());
}

/// ROTATION.md: a file that names another `cluster` is refused as a whole (counted and logged),
/// and the app it adds is not applied: its `[federation]` would be read under the running
/// router's identity. Before, the identity change was only logged and the rest applied.
#[test]
fn a_reload_that_changes_the_routers_identity_is_refused_as_a_whole() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).expect("config");
    assert!(good.contains("cluster = \"dev\""), "{good}");
    let edited = good.replace("cluster = \"dev\"", "cluster = \"other\"")
        + "[[apps]]\nname = \"demo/added\"\npartitions = 4\n";
    std::fs::write(&cfg, edited).expect("write");
    seed::sighup(&r);
    wait_metric_eq(
        &r,
        "fedbus_config_reload_failed_total",
        1.0,
        Duration::from_secs(5),
    );
    assert_eq!(r.metrics().get("fedbus_apps_generation"), 1.0);
    let log = r.log();
    assert!(
        log.contains("config reload refused") && log.contains("region, cluster, router"),
        "{log}"
    );
}

/// "What cannot change live is left alone and logged": a SIGHUP of a file that changes
/// `[limits]` and `[listen]` and adds an app applies the app, logs each fixed section as
/// needing a restart, counts no failure, and the old limits and listeners stay in force.
#[test]
fn a_change_that_needs_a_restart_is_logged_and_left_while_apps_apply() {
    let r = seed::start_with(
        Router::new()
            .apps(&[(APP, 16)])
            .limit("max_body_bytes", 1048576),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).expect("config");
    assert!(good.contains("max_body_bytes = 1048576"), "{good}");
    let edited = good
        .replace("max_body_bytes = 1048576", "max_body_bytes = 16")
        .replace("admin = \"127.0.0.1:0\"", "admin = \"127.0.0.1:1\"")
        + "[[apps]]\nname = \"demo/added\"\npartitions = 4\n";
    std::fs::write(&cfg, edited).expect("write");
    seed::sighup(&r);
    wait_metric_eq(&r, "fedbus_apps_generation", 2.0, Duration::from_secs(5));
    let log = r.log();
    assert!(log.contains("config change needs a restart"), "{log}");
    assert!(
        log.contains("[limits]") && log.contains("[listen]"),
        "{log}"
    );
    assert_eq!(r.metrics().get("fedbus_config_reload_failed_total"), 0.0);
    let body = vec![b'z'; 1000];
    let resp = r.request(&Req::post(&r.path(APP, 1)).token(&tok).body(&body));
    assert_eq!(resp.status, 200, "the old max_body_bytes stays: {resp:?}");
}

/// An app removed by SIGHUP answers 404 `unknown_app` while its task link stays open; added
/// back, it is served again by that same open link (no relink).
#[test]
fn an_app_removed_and_added_back_is_served_again_by_its_open_link() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16), ("demo/other", 4)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _e = r.task().start();
    let _o = r.task().app("demo/other").partitions("0-3").start();
    let tok = r.token(APP, "alice");
    let other = r.token("demo/other", "bob");
    let other_path = r.path("demo/other", 2);
    let resp = r.request(&Req::post(&other_path).token(&other).body(b"o"));
    assert_eq!(resp.status, 200, "{resp:?}");
    let links = r.metrics().get("fedbus_task_links");
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).expect("config");
    let without = good.replace("[[apps]]\nname = \"demo/other\"\npartitions = 4\n", "");
    assert_ne!(without, good);
    std::fs::write(&cfg, &without).expect("write");
    seed::sighup(&r);
    wait_metric_eq(&r, "fedbus_apps_generation", 2.0, Duration::from_secs(5));
    r.request(&Req::post(&other_path).token(&other).body(b"o"))
        .assert_error(404, "unknown_app");
    echo_ok(&r, 1, &tok);
    assert_eq!(
        r.metrics().get("fedbus_task_links"),
        links,
        "links stay open"
    );
    std::fs::write(&cfg, &good).expect("write");
    seed::sighup(&r);
    wait_metric_eq(&r, "fedbus_apps_generation", 3.0, Duration::from_secs(5));
    let resp = r.request(&Req::post(&other_path).token(&other).body(b"o"));
    assert_eq!(
        resp.status,
        200,
        "demo/other is back in the config and its task link never closed: {resp:?}\n{}",
        r.log()
    );
}

/// TUNING.md `tls.certs`: "A reload that fails ... keeps the old set and logs why". A broken
/// certificate file and a certificate whose key does not match are refused on SIGHUP, the old
/// certificate keeps serving handshakes, and a good one then applies.
#[test]
fn sighup_with_broken_tls_files_keeps_serving_the_old_certificate() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let certs = TempDir::new("lifecycle-certs");
    let issue = |out: &str, names: &[&str]| dev_cert(certs.path(), out, names);
    let a = issue("a", &["a.test", "127.0.0.1"]);
    let other = issue("other", &["a.test"]);
    let ca = certs.path().join("keys/tls/dev-ca.pem");
    let r = seed::start_with(
        Router::new().tls(std::slice::from_ref(&a)),
        "[auth]\nreload_poll_ms = 3600000",
    );
    let _t = r.task().start();
    let addr = r.api_tls.expect("TLS listener");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).expect("CA") {
        roots.add(c.expect("pem")).expect("add");
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let served_cert = || -> Vec<u8> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let conn =
            rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("a.test").unwrap())
                .unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).expect("handshake");
        }
        s.conn.peer_certificates().expect("cert")[0].to_vec()
    };
    let der = |p: &Path| CertificateDer::from_pem_file(p).expect("pem").to_vec();
    let first = der(&a.0);
    assert!(served_cert() == first);
    let good_pem = std::fs::read(&a.0).unwrap();
    // 1. Garbage in the certificate file.
    std::fs::write(
        &a.0,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    seed::sighup(&r);
    wait_log(
        &r,
        "TLS certificate reload failed",
        1,
        Duration::from_secs(5),
    );
    assert!(served_cert() == first, "old certificate kept");
    // 2. A valid certificate with the wrong key.
    std::fs::write(&a.0, std::fs::read(&other.0).unwrap()).unwrap();
    seed::sighup(&r);
    wait_log(
        &r,
        "TLS certificate reload failed",
        2,
        Duration::from_secs(5),
    );
    assert!(
        served_cert() == first,
        "old certificate kept after a key mismatch"
    );
    // 3. The key file removed.
    std::fs::write(&a.0, &good_pem).unwrap();
    let key = std::fs::read(&a.1).unwrap();
    std::fs::remove_file(&a.1).unwrap();
    seed::sighup(&r);
    wait_log(
        &r,
        "TLS certificate reload failed",
        3,
        Duration::from_secs(5),
    );
    assert!(served_cert() == first);
    std::fs::write(&a.1, key).unwrap();
    // 4. A new good pair applies.
    let _ = issue("a", &["a.test", "127.0.0.1"]);
    let second = der(&a.0);
    assert!(second != first);
    seed::sighup(&r);
    wait_until(
        "new certificate served",
        Duration::from_secs(5),
        || (served_cert() == second).then_some(()),
        || r.log(),
    );
    assert_eq!(admin_get(r.admin, "/healthz").0, 200);
}

/// A burst of SIGHUPs while a keep-alive client is served: the router stays up, every request
/// is answered 200, nothing is refused.
#[test]
fn a_burst_of_sighups_under_traffic_fails_nothing() {
    let r = seed::start_with(
        Router::new().shards(2).apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    for i in 0..40u64 {
        seed::sighup(&r);
        let resp = c.request(&Req::post(&r.path(APP, i)).token(&tok).body(b"x"));
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    wait_until(
        "SIGHUPs handled",
        Duration::from_secs(5),
        || (r.metrics().get("fedbus_reloads_total") >= 1.0).then_some(()),
        || r.log(),
    );
    assert_eq!(
        r.metrics().get("fedbus_config_reload_failed_total"),
        0.0,
        "{}",
        r.log()
    );
    assert_eq!(
        r.metrics().get("fedbus_apps_generation"),
        1.0,
        "no change, nothing published"
    );
    assert_no_panic(&r.log());
}

// =============================================================================================
// Keys.

/// ROTATION.md: `fedbus keys rotate` then SIGHUP "or wait for the file poll": the poll picks
/// the new version up alone; tokens of the old version verify inside the grace and are 401
/// `retired_key` after it (new connection and the same keep-alive connection); new tokens work.
#[test]
fn an_app_rotation_is_picked_up_by_the_poll_with_grace_then_retired() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 200\ngrace_secs = 3",
    );
    let _t = r.task().start();
    let t1 = r.token(APP, "alice");
    let mut keep = r.conn();
    assert_eq!(
        keep.request(&Req::post(&r.path(APP, 1)).token(&t1).body(b"a"))
            .status,
        200
    );
    let (inside, after) = seed::rotate_app_timed(&r, APP);
    wait_metric_eq(&r, "fedbus_keyring_generation", 2.0, Duration::from_secs(3));
    let t2 = seed::fresh_token(&r, APP, "bob");
    assert_eq!(seed::jwt_kid(&t2), "2");
    echo_ok(&r, 2, &t2);
    if Instant::now() < inside {
        echo_ok(&r, 3, &t1);
    }
    while Instant::now() < after {
        std::thread::sleep(Duration::from_millis(50));
    }
    r.request(&Req::post(&r.path(APP, 4)).token(&t1).body(b"x"))
        .assert_error(401, "retired_key");
    keep.request(&Req::post(&r.path(APP, 4)).token(&t1).body(b"x"))
        .assert_error(401, "retired_key");
    echo_ok(&r, 5, &t2);
}

/// `fedbus keys rotate --cluster` + SIGHUP: the router verifies service tokens of the new
/// version at once (a new task registers with a dev token of v2), and the task linked on a
/// v1 token stays linked inside the grace; both serve.
#[test]
fn a_cluster_key_rotation_admits_new_task_tokens_and_keeps_old_links() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _old = r.task().partitions("0-7").start();
    fedbus(
        r.home(),
        &[
            "keys",
            "rotate",
            "--cluster",
            "--keyring",
            r.keys.to_str().unwrap(),
        ],
    );
    seed::sighup(&r);
    wait_metric_eq(&r, "fedbus_keyring_generation", 2.0, Duration::from_secs(5));
    let _new = r.task().partitions("8-15").start();
    let tok = r.token(APP, "alice");
    for w in 0..16 {
        let resp = echo_ok(&r, w, &tok);
        assert_eq!(
            resp.header("fedbus-partition"),
            Some(w.to_string().as_str()),
            "{resp:?}"
        );
    }
    assert_eq!(r.metrics().get("fedbus_task_links"), 2.0);
}

// =============================================================================================
// `fedbus run` with bad input.

fn base_config(keys: &Path) -> String {
    format!(
        "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = [0]\npin = false\n",
        keys.to_str().unwrap()
    )
}

/// Each bad config is a clear error (`fedbus: error:` naming the field or the TOML problem),
/// a non-zero exit within a few seconds, no ready line, no panic.
#[test]
fn run_refuses_bad_configs_with_a_clear_error() {
    let home = TempDir::new("badcfg");
    let keys = home.path().join("keys");
    keys_init(home.path(), &keys, &[APP]);
    let base = base_config(&keys);
    let app = "[[apps]]\nname = \"demo/echo\"\npartitions = 16\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown_top", format!("bogus = 1\n{base}{app}"), "bogus"),
        ("unknown_limits", format!("{base}[limits]\nmax_bodyy_bytes = 5\n{app}"), "max_bodyy_bytes"),
        ("unknown_section", format!("{base}[limitz]\nx = 1\n{app}"), "limitz"),
        ("toml_syntax", format!("{base}{app}partitions = = 3\n"), "toml_syntax.toml"),
        ("partitions_0", format!("{base}[[apps]]\nname = \"demo/echo\"\npartitions = 0\n"), "partitions"),
        ("partitions_type", format!("{base}[[apps]]\nname = \"demo/echo\"\npartitions = \"16\"\n"), "partitions"),
        ("emergency_oob", format!("{base}[[apps]]\nname = \"demo/echo\"\npartitions = 4\nemergency_partition = 4\n"), "emergency_partition"),
        ("dup_app", format!("{base}{app}{app}"), "apps[1].name"),
        ("body_0", format!("{base}[limits]\nmax_body_bytes = 0\n{app}"), "limits.max_body_bytes"),
        ("timeout_0", format!("{base}[limits]\nrequest_timeout_ms = 0\n{app}"), "limits.request_timeout_ms"),
        ("negative", format!("{base}[limits]\nrequest_timeout_ms = -5\n{app}"), "request_timeout_ms"),
        // With a federation: the hold applies to peer links only.
        ("hold_ge_timeout", format!("{base}[readiness]\ndrain_timeout_ms = 1000\n[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb2\"\nrouters = [\"127.0.0.1:1\"]\nkeys = \"/nonexistent\"\n{app}"), "readiness.drain_peer_hold_ms"),
        ("drain_0", format!("{base}[readiness]\ndrain_timeout_ms = 0\ndrain_peer_hold_ms = 0\n{app}"), "drain_timeout_ms"),
        ("coverage", format!("{base}[readiness]\ncoverage = \"most\"\n{app}"), "coverage"),
        ("bad_region", format!("{}{app}", base.replace("region = \"local\"", "region = \"lo cal\"")), "region"),
        ("bad_addr", format!("{}{app}", base.replace("api = \"127.0.0.1:0\"", "api = \"localhost\"")), "api"),
        ("shard_core_99", format!("{}{app}", base.replace("shard_cores = [0]", "shard_cores = [99]")), "tuning.shard_cores"),
        ("shard_core_dup", format!("{}{app}", base.replace("shard_cores = [0]", "shard_cores = [0, 0]")), "tuning.shard_cores"),
        ("admin_max_0", format!("{}{app}", base.replace("[tuning]", "admin_max_connections = 0\n[tuning]")), "listen.admin_max_connections"),
        ("internal_unspecified", format!("{}{app}", base.replace("internal = \"127.0.0.1:0\"", "internal = \"0.0.0.0:0\"")), "listen.advertise_host"),
        ("tls_no_certs_prod", format!("dev = false\n{}{app}", base.replace("[tuning]", "api_tls = \"127.0.0.1:0\"\n[tuning]")), "tls.certs"),
        ("max_hops", format!("{base}[routing]\nmax_hops = 9\n{app}"), "routing.max_hops"),
        ("fed_no_routers", format!("{base}{app}[federation]\n[[federation.clusters]]\nregion = \"x\"\ncluster = \"y\"\nrouters = []\nkeys = \"/tmp\"\n"), "routers"),
        ("reload_poll_0", format!("{base}[auth]\nreload_poll_ms = 0\n{app}"), "auth.reload_poll_ms"),
    ];
    let mut report = Vec::new();
    for (name, text, needle) in &cases {
        let (st, out, took) = run_expect_failure(home.path(), name, text, Duration::from_secs(10));
        assert_no_panic(&out);
        assert!(!st.success(), "{name}: exit {st}:\n{out}");
        assert!(!out.contains("fedbus-ready"), "{name}: started:\n{out}");
        assert!(
            out.contains("fedbus: error:"),
            "{name}: no clear error:\n{out}"
        );
        assert!(
            out.contains(needle),
            "{name}: the error does not name {needle:?}:\n{out}"
        );
        report.push(format!(
            "{name} ({took:?}): {}",
            out.lines().find(|l| l.contains("error")).unwrap_or("")
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// Missing or broken files at start: a missing config file, a missing keyring with `dev =
/// false` ("a missing keyring is an error"), a corrupt keyring, a missing TLS certificate, a
/// federation keys directory that does not exist, a missing peer token file outside dev mode.
#[test]
fn run_with_missing_or_broken_files_fails_clearly() {
    let home = TempDir::new("badfiles");
    let keys = home.path().join("keys");
    keys_init(home.path(), &keys, &[APP]);
    let app = "[[apps]]\nname = \"demo/echo\"\npartitions = 16\n";
    let mut report = Vec::new();
    let mut check = |name: &str, st: ExitStatus, out: String, took: Duration, needle: &str| {
        assert_no_panic(&out);
        assert!(!st.success(), "{name}: exit {st}:\n{out}");
        assert!(!out.contains("fedbus-ready"), "{name}: started:\n{out}");
        assert!(out.contains("fedbus: error:"), "{name}:\n{out}");
        assert!(
            out.contains(needle),
            "{name}: the error does not name {needle:?}:\n{out}"
        );
        report.push(format!(
            "{name} ({took:?}): {}",
            out.lines().find(|l| l.contains("error")).unwrap_or("")
        ));
    };
    let (st, out, took) = run_config_expect_failure(
        home.path(),
        "no_file",
        &home.path().join("nope.toml"),
        Duration::from_secs(10),
    );
    check("missing config file", st, out, took, "nope.toml");

    let missing = home.path().join("no-keys");
    let text = format!("dev = false\n{}{app}", base_config(&missing));
    let (st, out, took) =
        run_expect_failure(home.path(), "no_keyring", &text, Duration::from_secs(10));
    check("missing keyring, dev = false", st, out, took, "no-keys");
    assert!(!missing.exists(), "dev = false must not create the keyring");

    let empty = home.path().join("empty-keys");
    std::fs::create_dir_all(&empty).unwrap();
    let text = format!("dev = false\n{}{app}", base_config(&empty));
    let (st, out, took) =
        run_expect_failure(home.path(), "empty_keyring", &text, Duration::from_secs(10));
    check(
        "empty keyring dir, dev = false",
        st,
        out,
        took,
        "empty-keys",
    );

    let broken = home.path().join("broken-keys");
    keys_init(home.path(), &broken, &[APP]);
    std::fs::write(
        broken.join("cluster.toml"),
        "[[versions]]\nversion = 1\npublic = \"zz\"\ncreated = 0\n",
    )
    .unwrap();
    let text = format!("dev = false\n{}{app}", base_config(&broken));
    let (st, out, took) = run_expect_failure(
        home.path(),
        "broken_keyring",
        &text,
        Duration::from_secs(10),
    );
    check("corrupt cluster.toml", st, out, took, "broken-keys");

    let text = format!(
        "{}{app}[[tls.certs]]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/c.key\"\n",
        base_config(&keys).replace("[tuning]", "api_tls = \"127.0.0.1:0\"\n[tuning]")
    );
    let (st, out, took) =
        run_expect_failure(home.path(), "no_cert", &text, Duration::from_secs(10));
    check(
        "missing TLS certificate",
        st,
        out,
        took,
        "/nonexistent/c.pem",
    );

    let text = format!(
        "dev = true\n{}{app}[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"other\"\nrouters = [\"127.0.0.1:1\"]\nkeys = \"/nonexistent/other-keys\"\n",
        base_config(&keys)
    );
    let (st, out, took) =
        run_expect_failure(home.path(), "no_fed_keys", &text, Duration::from_secs(10));
    check(
        "missing federation keys dir",
        st,
        out,
        took,
        "/nonexistent/other-keys",
    );

    let text = format!(
        "dev = false\n{}{app}[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"other\"\nrouters = [\"127.0.0.1:1\"]\nkeys = {:?}\n",
        base_config(&keys),
        keys.to_str().unwrap()
    );
    let (st, out, took) =
        run_expect_failure(home.path(), "no_peer_token", &text, Duration::from_secs(10));
    check(
        "no peer_token_file outside dev mode",
        st,
        out,
        took,
        "peer_token_file",
    );
    eprintln!("{}", report.join("\n"));
}

/// TUNING.md `listen.*`: a port held by another process is "address in use" at start: a clear
/// error and a non-zero exit (after the 1 s probe retry), for the api, internal and admin
/// listeners alike; never a hang or a panic.
#[test]
fn run_on_a_port_taken_by_another_process_fails_clearly() {
    let home = TempDir::new("taken");
    let keys = home.path().join("keys");
    keys_init(home.path(), &keys, &[APP]);
    let app = "[[apps]]\nname = \"demo/echo\"\npartitions = 16\n";
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().unwrap().port();
    let taken = format!("127.0.0.1:{port}");
    let mut report = Vec::new();
    for (name, key) in [("api", "api"), ("internal", "internal"), ("admin", "admin")] {
        let text = format!(
            "{}{app}",
            base_config(&keys).replace(
                &format!("{key} = \"127.0.0.1:0\""),
                &format!("{key} = \"{taken}\"")
            )
        );
        assert!(text.contains(&taken));
        let (st, out, took) = run_expect_failure(home.path(), name, &text, Duration::from_secs(15));
        assert_no_panic(&out);
        assert!(!st.success(), "{name}: {st}\n{out}");
        assert!(out.contains("fedbus: error:"), "{name}:\n{out}");
        assert!(
            out.contains(&taken),
            "{name}: the error names the address:\n{out}"
        );
        assert!(out.to_lowercase().contains("in use"), "{name}:\n{out}");
        assert!(took < Duration::from_secs(5), "{name}: took {took:?}");
        report.push(format!(
            "{name} ({took:?}): {}",
            out.lines().find(|l| l.contains("error")).unwrap_or("")
        ));
    }
    drop(holder);
    eprintln!("{}", report.join("\n"));
}

// =============================================================================================
// Admin endpoints and readiness.

/// The admin listener is "never on the request path": `/metrics`, `/readyz` and `/healthz`
/// answer promptly while clients flood the api listener.
#[test]
fn admin_endpoints_answer_under_a_client_flood() {
    let r = Router::new().shards(2).apps(&[(APP, 16)]).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..6)
        .map(|k| {
            let (stop, served, api, tok) = (stop.clone(), served.clone(), r.api, tok.clone());
            let path = r.path(APP, k);
            std::thread::spawn(move || {
                let mut c = Conn::open(api);
                let req = Req::post(&path).token(&tok).body(b"flood").bytes();
                // Pipelined batches of 16.
                let batch: Vec<u8> = (0..16).flat_map(|_| req.clone()).collect();
                while !stop.load(Ordering::Relaxed) {
                    c.send(&batch);
                    for _ in 0..16 {
                        let resp = c.read_response().expect("flood answer");
                        assert_eq!(resp.status, 200);
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    wait_until(
        "flood running",
        Duration::from_secs(5),
        || (served.load(Ordering::Relaxed) > 1000).then_some(()),
        String::new,
    );
    let mut worst = Duration::ZERO;
    for i in 0..30 {
        let path = ["/metrics", "/readyz", "/healthz"][i % 3];
        let t = Instant::now();
        let (st, body) =
            try_get(r.admin, path).unwrap_or_else(|| panic!("{path} failed under the flood"));
        let took = t.elapsed();
        worst = worst.max(took);
        assert_eq!(st, 200, "{path}: {body}");
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.join().expect("flood thread");
    }
    eprintln!(
        "worst admin answer {worst:?} during {} flood requests",
        served.load(Ordering::Relaxed)
    );
    assert!(
        worst < Duration::from_secs(2),
        "admin answer took {worst:?}"
    );
}

/// TUNING.md `readiness.coverage`: `any` is ready with one live partition per app, `none`
/// without any task; `all` (default) wants every partition.
#[test]
fn readiness_coverage_any_and_none() {
    let any = Router::new()
        .apps(&[(APP, 16)])
        .tail("[readiness]\ncoverage = \"any\"")
        .start();
    let (st, body) = admin_get(any.admin, "/readyz");
    assert_eq!(st, 503, "no task yet: {body}");
    let _t = any.task().partitions("3").start();
    wait_until(
        "any: ready with one partition",
        Duration::from_secs(5),
        || (admin_get(any.admin, "/readyz").0 == 200).then_some(()),
        || format!("{:?}", admin_get(any.admin, "/readyz")),
    );
    let none = Router::new()
        .apps(&[(APP, 16)])
        .tail("[readiness]\ncoverage = \"none\"")
        .start();
    assert_eq!(
        admin_get(none.admin, "/readyz"),
        (200, "ready\n".to_string())
    );
    assert_eq!(none.metrics().get("fedbus_ready"), 1.0);
}

// =============================================================================================
// File polls: renewals and rotations with no SIGHUP.

/// TUNING.md `tls.certs`: "The control thread reloads the files when one's mtime changes
/// (checked every `auth.reload_poll_ms`) ... A reload that fails (say, the certificate is
/// written and its key not yet) keeps the old set and logs why; the next change retries." and
/// "Replace files by rename ... (`fedbus keys cert` does)". So a certificate renewed in place
/// with `fedbus keys cert`, with no SIGHUP, must be served to new connections soon after,
/// every time.
#[test]
fn certificates_renewed_with_keys_cert_are_always_picked_up_by_the_poll() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let certs = TempDir::new("lifecycle-renew");
    let keys = certs.path().join("keys");
    let issue = || dev_cert(certs.path(), "a", &["a.test", "127.0.0.1"]);
    let a = issue();
    let ca = keys.join("tls/dev-ca.pem");
    let r = seed::start_with(
        Router::new().tls(std::slice::from_ref(&a)),
        "[auth]\nreload_poll_ms = 1",
    );
    let addr = r.api_tls.expect("TLS listener");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).expect("CA") {
        roots.add(c.expect("pem")).expect("add");
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let served_cert = || -> Option<Vec<u8>> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let conn =
            rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("a.test").unwrap())
                .ok()?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).ok()?;
        }
        Some(s.conn.peer_certificates()?[0].to_vec())
    };
    let mut missed = Vec::new();
    for round in 0..20 {
        issue();
        let want = CertificateDer::from_pem_file(&a.0).expect("pem").to_vec();
        let got = wait_for(Duration::from_secs(2), || {
            (served_cert().as_deref() == Some(&want[..])).then_some(())
        });
        if got.is_none() {
            let ns = |p: &Path| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
                    .unwrap_or(0)
            };
            eprintln!(
                "round {round} missed: mtime ns key {} cert {}",
                ns(&a.1),
                ns(&a.0)
            );
            missed.push(round);
            // Let the next round start from a served certificate.
            seed::sighup(&r);
            wait_for(Duration::from_secs(3), || {
                (served_cert().as_deref() == Some(&want[..])).then_some(())
            })
            .unwrap_or_else(|| panic!("not even SIGHUP reloaded round {round}:\n{}", r.log()));
        }
    }
    let failed = r.log().matches("TLS certificate reload failed").count();
    eprintln!(
        "renewals missed by the poll: {missed:?} of 20; failed reload attempts logged: {failed}"
    );
    assert!(missed.is_empty(), "renewed certificates not picked up by the poll in rounds {missed:?} (log shows {failed} failed reloads)");
}

/// ROTATION.md "Reload": the keyring is re-read on "a change of the newest mtime of
/// `cluster.toml`, `apps/` or a file in it". Every `fedbus keys rotate` (no SIGHUP) must
/// therefore be picked up by the poll: a token of the new version verifies soon after.
#[test]
fn app_rotations_are_always_picked_up_by_the_keyring_poll() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 1",
    );
    let _t = r.task().start();
    let mut missed = Vec::new();
    for round in 0..20 {
        seed::rotate_app(&r, APP);
        let tok = seed::fresh_token(&r, APP, "alice");
        let ok = wait_for(Duration::from_secs(2), || {
            (r.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x"))
                .status
                == 200)
                .then_some(())
        });
        if ok.is_none() {
            missed.push((round, seed::jwt_kid(&tok)));
            let before = r.metrics().get("fedbus_keyring_generation");
            seed::sighup(&r);
            wait_metric_eq(
                &r,
                "fedbus_keyring_generation",
                before + 1.0,
                Duration::from_secs(3),
            );
        }
    }
    eprintln!("rotations missed by the poll: {missed:?} of 20");
    assert!(
        missed.is_empty(),
        "rotations not picked up by the keyring poll: {missed:?}"
    );
}

// =============================================================================================
// Federation added by a reload.

/// FEDERATION.md "Keys and trust" / ROTATION.md "Reload": "a cluster or router added gets a
/// dialer on every shard", "A cluster added by a reload is dialed and used". A router started
/// on its own (dev mode, no `[federation]`) to which the operator adds another cluster by
/// SIGHUP should then reach that cluster, as the same router started with that config does.
#[test]
fn a_first_peer_cluster_added_by_sighup_is_reached() {
    let mut a = Solo::new_in("local", "dev", 33, "");
    // Cluster ru/b lists local/dev (so it binds its external listener and verifies a's peer
    // tokens with a's public keys).
    let mut b = Solo::new_in("ru", "b", 34, "");
    let b_cfg = std::fs::read_to_string(&b.cfg).unwrap()
        + &format!(
            "[federation]\n[[federation.clusters]]\nregion = \"local\"\ncluster = \"dev\"\nrouters = [\"{}\"]\nkeys = {:?}\n",
            a.external,
            a.keys.to_str().unwrap()
        );
    std::fs::write(&b.cfg, b_cfg).unwrap();
    let rb = b.launch(false);
    let ra = a.launch(false);
    let fed = format!(
        "[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"b\"\nrouters = [\"{}\"]\nkeys = {:?}\n",
        b.external,
        b.keys.to_str().unwrap()
    );
    let a_cfg = std::fs::read_to_string(&a.cfg).unwrap() + &fed;
    std::fs::write(&a.cfg, &a_cfg).unwrap();
    ra.sig("HUP");
    wait_until(
        "federation reloaded on a",
        Duration::from_secs(5),
        || (metric(a.admin, "fedbus_federation_generation") >= 2.0).then_some(()),
        || ra.log(),
    );
    wait_until(
        "a dials ru/b",
        Duration::from_secs(3),
        || {
            ra.log()
                .contains("peer router added by reload: dialing")
                .then_some(())
        },
        || ra.log(),
    );
    let probe = Req::get("/api/ru/b/demo/nope/api/1/sys/echo").bytes();
    let reached = wait_for(Duration::from_secs(8), || {
        match raw_request(a.api, &probe) {
            Ok((404, body)) if body.contains("unknown_app") => Some(()),
            _ => None,
        }
    });
    let last = raw_request(a.api, &probe);
    let links = metric(a.admin, "fedbus_peer_links");
    let b_log = rb.log();
    let b_log = plain(&b_log);
    let refusals: Vec<&str> = b_log
        .lines()
        .filter(|l| l.contains("peer link refused"))
        .take(2)
        .collect();
    eprintln!("a -> ru/b after SIGHUP: last answer {last:?}; a's fedbus_peer_links {links}; b's refusals: {refusals:?}");
    // Control: the same router started with that federation in its config reaches ru/b.
    drop(ra);
    let ra2 = a.launch(false);
    let control = wait_for(Duration::from_secs(8), || {
        match raw_request(a.api, &probe) {
            Ok((404, body)) if body.contains("unknown_app") => Some(()),
            _ => None,
        }
    });
    eprintln!(
        "control (federation in the config at start): reached = {}",
        control.is_some()
    );
    drop(ra2);
    assert!(
        reached.is_some(),
        "a cluster added by SIGHUP to a router started without [federation] is never reached: last answer {last:?}, peer links {links}, peer's log: {refusals:?}"
    );
}

// =============================================================================================
// More of the drain.

/// "A request whose body is arriving is received and answered first": an upload whose head
/// came before SIGTERM and whose body comes after it is answered 200 with `Connection: close`.
#[test]
fn drain_finishes_an_upload_whose_body_is_still_arriving() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 15000\ndrain_idle_close_ms = 5000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let body = random_bytes(200_000, 7);
    let wire = Req::post(&r.path(APP, 2)).token(&tok).body(&body).bytes();
    let head_end = wire.len() - body.len();
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(8));
    c.send(&wire[..head_end + 1000]);
    // The head is in: the body is being received (charged to the budget).
    wait_until(
        "body held",
        Duration::from_secs(3),
        || (r.metrics().get("fedbus_body_bytes_held") > 0.0).then_some(()),
        || r.log(),
    );
    r.sigterm();
    wait_until(
        "draining",
        Duration::from_secs(3),
        || (r.metrics().get("fedbus_draining") == 1.0).then_some(()),
        || r.log(),
    );
    c.send(&wire[head_end + 1000..]);
    let resp = c.read_response().expect("the upload is answered");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.body == body, "echo differs");
    assert_eq!(resp.header("connection"), Some("close"));
    let exit = r.wait_exit(Duration::from_secs(8));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

/// A keep-alive connection idle at SIGTERM that sends a request during the drain (before
/// `drain_idle_close_ms`) gets its answer, with `Connection: close`, not a reset.
#[test]
fn drain_answers_a_request_sent_on_an_idle_connection_after_sigterm() {
    let mut r = Router::new()
        .shards(1)
        .tail("[readiness]\ndrain_timeout_ms = 15000\ndrain_idle_close_ms = 4000")
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    assert_eq!(
        c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"a"))
            .status,
        200
    );
    r.sigterm();
    wait_log(&r, "draining: listener closed", 2, Duration::from_secs(3));
    let resp = c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"b"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    assert!(c.is_closed());
    let exit = r.wait_exit(Duration::from_secs(8));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

/// A task that dies during a drain: the requests pending on it get 502 `task_lost` at once and
/// the drain ends then (exit 0), not at `drain_timeout_ms`.
#[test]
fn a_task_dying_during_a_drain_ends_the_drain() {
    let mut r = Router::new()
        .shards(1)
        .request_timeout_ms(30000)
        .tail("[readiness]\ndrain_timeout_ms = 20000")
        .start();
    let mut t = r.task().delay_ms(20000).start();
    let tok = r.token(APP, "alice");
    let before = pending(&r);
    let mut c = r.conn();
    c.set_read_timeout(Duration::from_secs(5));
    c.send(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x").bytes());
    r.wait_pending(before + 1.0);
    r.sigterm();
    wait_until(
        "draining",
        Duration::from_secs(3),
        || (r.metrics().get("fedbus_draining") == 1.0).then_some(()),
        || r.log(),
    );
    let killed = Instant::now();
    t.kill();
    c.read_response()
        .expect("an answer")
        .assert_error(502, "task_lost");
    let exit = r.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    eprintln!("exit {:?} after the task died", killed.elapsed());
}

/// Tasks started before their router (a host boot, a router restart taking long) keep
/// retrying and link once it is up; the router then serves.
#[test]
fn a_task_started_before_its_router_links_once_it_is_up() {
    let mut s = Solo::new("");
    let task = s.task("early");
    wait_until(
        "task retries",
        Duration::from_secs(5),
        || task.log().contains("Connection refused").then_some(()),
        || task.log(),
    );
    let r = s.launch(false);
    let tok = s.token("alice");
    let took = s.wait_served(&tok, Duration::from_secs(10), &r);
    eprintln!("served {took:?} after the router's ready line");
}

/// TLS clients during a drain: a request in flight on an HTTPS connection is answered with
/// `Connection: close`; an idle HTTPS keep-alive connection is closed after
/// `drain_idle_close_ms`; the router exits 0.
#[test]
fn drain_with_https_clients() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let certs = TempDir::new("lifecycle-drain-tls");
    let a = dev_cert(certs.path(), "a", &["a.test"]);
    let mut r = Router::new()
        .shards(1)
        .tls(std::slice::from_ref(&a))
        .tail("[readiness]\ndrain_timeout_ms = 15000\ndrain_idle_close_ms = 800")
        .start();
    let _t = r.task().delay_ms(1000).start();
    let tok = r.token(APP, "alice");
    let addr = r.api_tls.expect("TLS listener");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.path().join("keys/tls/dev-ca.pem")).expect("CA") {
        roots.add(c.expect("pem")).expect("add");
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let open = || {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let conn =
            rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("a.test").unwrap())
                .unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).expect("handshake");
        }
        s
    };
    // Reads everything until EOF (or error): the answers' text.
    fn read_all(
        s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    ) -> (String, Option<String>) {
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), None),
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) => {
                    return (
                        String::from_utf8_lossy(&got).into_owned(),
                        Some(e.to_string()),
                    )
                }
            }
        }
    }
    let mut idle = open();
    idle.write_all(
        &Req::post(&r.path(APP, 1))
            .token(&tok)
            .body(b"first")
            .bytes(),
    )
    .unwrap();
    idle.flush().unwrap();
    let mut b = [0u8; 4096];
    let n = idle.read(&mut b).expect("first answer");
    assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();
    let mut busy = open();
    let before = pending(&r);
    busy.write_all(
        &Req::post(&r.path(APP, 2))
            .token(&tok)
            .body(b"in flight")
            .bytes(),
    )
    .unwrap();
    busy.flush().unwrap();
    r.wait_pending(before + 1.0);
    r.sigterm();
    let (text, err) = read_all(&mut busy);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "busy HTTPS connection: {text:?} {err:?}"
    );
    assert!(
        err.is_none(),
        "busy HTTPS connection closed without close_notify: {err:?}"
    );
    assert!(
        text.contains("connection: close") && text.ends_with("in flight"),
        "{text:?}"
    );
    let (rest, err) = read_all(&mut idle);
    let closed_after = idle_since.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    eprintln!("idle HTTPS connection closed {closed_after:?} after its answer ({err:?})");
    assert!(
        closed_after < Duration::from_millis(3000),
        "{closed_after:?}"
    );
    let exit = r.wait_exit(Duration::from_secs(8));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

/// A router started with `--takeover` (the documented upgrade path) and then reloaded with its
/// unchanged config file: nothing changed, so nothing should be "left as it is" for a restart.
#[test]
fn a_sighup_after_a_takeover_start_reports_no_phantom_change() {
    let mut s = Solo::new("[auth]\nreload_poll_ms = 60000");
    let r = s.launch(true);
    r.sig("HUP");
    wait_until(
        "SIGHUP handled",
        Duration::from_secs(5),
        || (metric(s.admin, "fedbus_reloads_total") >= 1.0).then_some(()),
        || r.log(),
    );
    // The config reload runs right after the keyring's, on the same event.
    let log = wait_for(Duration::from_secs(2), || {
        let l = plain(&r.log());
        l.contains("config change needs a restart").then_some(l)
    });
    if let Some(l) = log {
        let line = l
            .lines()
            .find(|x| x.contains("config change needs a restart"))
            .unwrap_or("")
            .to_string();
        panic!("unchanged config reported as needing a restart after a --takeover start:\n{line}");
    }
}

/// RFC 8446 6.1: a TLS server sends `close_notify` before it closes. An idle HTTPS keep-alive
/// connection the router closes (`limits.idle_timeout_ms`) should end with it, as a
/// connection closed after `Connection: close` does.
#[test]
fn an_idle_https_connection_closed_by_the_router_ends_with_close_notify() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let certs = TempDir::new("lifecycle-idle-tls");
    let a = dev_cert(certs.path(), "a", &["a.test"]);
    let r = Router::new()
        .shards(1)
        .tls(std::slice::from_ref(&a))
        .limit("idle_timeout_ms", 500)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let addr = r.api_tls.expect("TLS listener");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.path().join("keys/tls/dev-ca.pem")).expect("CA") {
        roots.add(c.expect("pem")).expect("add");
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("a.test").unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x").bytes())
        .unwrap();
    s.flush().unwrap();
    let mut b = [0u8; 4096];
    let n = s.read(&mut b).expect("answer");
    assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let end = loop {
        match s.read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    eprintln!(
        "idle HTTPS connection ended after {:?}: {end:?}",
        t.elapsed()
    );
    assert!(end.is_ok(), "closed without close_notify: {end:?}");
}
