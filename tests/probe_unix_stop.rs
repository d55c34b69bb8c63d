//! Probes of two features from their docs: task links over a unix socket
//! (`listen.internal_unix`, docs/TUNING.md; docs/PROTOCOL.md sections 1, 3, 4) and the graceful
//! stop of `fedbus task` on SIGTERM/SIGINT (`--stop-timeout`, PROTOCOL.md section 4
//! "Stopping"). Every wait is bounded and waits on a fact (a ready line, a metric, a log line,
//! an exit); a fixed sleep only asserts that something does not happen.

use fedbus_testkit::launch::{client_token, plain, spawn_echo_task, spawn_run, wait_ready, Run};
use fedbus_testkit::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

/// A router config of its own (so the test can SIGHUP, restart and rewrite it) with a unix
/// task-link listener and an admin listener.
struct Setup {
    dir: TempDir,
    cfg: PathBuf,
    keys: PathBuf,
    sock: PathBuf,
    runs: u32,
}

impl Setup {
    fn new(tag: &str, shards: usize, limits: &str) -> Setup {
        let dir = TempDir::new(tag);
        let keys = dir.path().join("keys");
        keys_init(dir.path(), &keys, &[APP]);
        let sock = dir.path().join("link.sock");
        let s = Setup {
            cfg: dir.path().join("router.toml"),
            dir,
            keys,
            sock: sock.clone(),
            runs: 0,
        };
        s.write_cfg(sock.to_str().expect("utf-8"), shards, limits);
        s
    }

    fn write_cfg(&self, unix: &str, shards: usize, limits: &str) {
        let cores = if shards == 2 { "[0, 1]" } else { "[0]" };
        std::fs::write(
            &self.cfg,
            format!(
                "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\ninternal_unix = {unix:?}\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = {cores}\npin = false\n[limits]\n{limits}\n[[apps]]\nname = \"{APP}\"\npartitions = 16\n",
                self.keys.to_str().expect("utf-8"),
            ),
        )
        .expect("write config");
    }

    fn launch(&mut self) -> (Run, Ready) {
        self.runs += 1;
        let log = self.dir.path().join(format!("router-{}.log", self.runs));
        let (run, rx) = spawn_run(self.dir.path(), &self.cfg, &[], &log);
        let ready = wait_ready(&run, &rx, Duration::from_secs(10));
        (run.plain_log(), ready)
    }

    /// `fedbus run` on this config in the test's directory, stdout piped, stderr to `log`.
    fn spawn_in_dir(&self, log: &Path) -> std::process::Child {
        Command::new(bin())
            .args(["run", "--config", self.cfg.to_str().unwrap()])
            .current_dir(self.dir.path())
            .env("FEDBUS_HOME", self.dir.path())
            .env("FEDBUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn")
    }

    fn task(&self, args: &[&str]) -> Run {
        let log = self.dir.path().join("task.log");
        spawn_echo_task(
            self.dir.path(),
            format!("unix:{}", self.sock.display()),
            &self.keys,
            args,
            log,
        )
        .plain_log()
    }

    fn token(&self) -> String {
        client_token(self.dir.path(), &self.keys, APP, "alice")
    }
}

/// Sum of every series of metric `name` (any labels) on `admin`.
fn metric_sum(admin: SocketAddr, name: &str) -> f64 {
    Metrics::parse(&metrics_text_at(admin))
        .0
        .iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// One POST on a new connection: the status, or None when no answer came.
fn echo(api: SocketAddr, tok: &str, wsid: u64) -> Option<u16> {
    let mut c = Conn::open(api);
    c.set_read_timeout(Duration::from_secs(10));
    c.send(
        &Req::post(&format!("/api/local/dev/{APP}/api/{wsid}/sys/echo"))
            .token(tok)
            .body(b"probe")
            .bytes(),
    );
    c.read_response_for("POST").ok().map(|r| r.status)
}

fn wait_served(api: SocketAddr, tok: &str, within: Duration, ctx: &[&Run]) {
    let mut w = 0;
    wait_until(
        "a request answered 200",
        within,
        || {
            w += 1;
            (echo(api, tok, w % 16) == Some(200)).then_some(())
        },
        || {
            ctx.iter()
                .map(|r| r.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        },
    );
}

/// Reads until EOF or error (or `within`): how long it took, and what came.
fn read_until_closed(s: &mut impl Read, within: Duration) -> (Duration, Vec<u8>) {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    (t0.elapsed(), got)
}

fn unix_connect(p: &Path) -> UnixStream {
    let s = UnixStream::connect(p).expect("unix connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

fn upgrade_head(token: Option<&str>) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET /link HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// listen.internal_unix

/// TUNING.md: "`limits.max_link_connections_per_shard` counts both listeners". With a limit of
/// 2, one TCP and one unix connection in their handshake fill the shard: a third on either
/// listener takes the slot of the oldest of them, whichever listener it came on (closed at
/// once, well before the handshake timeout; `fedbus_link_handshakes_evicted_total`).
#[test]
fn the_link_connection_limit_counts_both_listeners() {
    let mut s = Setup::new(
        "probe-unix-limit",
        1,
        "max_link_connections_per_shard = 2\nhandshake_timeout_ms = 30000",
    );
    let (router, ready) = s.launch();
    let admin = ready.admin.expect("admin");
    let mut tcp = TcpStream::connect(ready.internal[0]).expect("tcp");
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let gauge =
        || Metrics::parse(&metrics_text_at(admin)).get("fedbus_connections{listener=\"internal\"}");
    wait_until(
        "the tcp connection open",
        Duration::from_secs(5),
        || (gauge() >= 1.0).then_some(()),
        || metrics_text_at(admin),
    );
    let mut unix = unix_connect(&s.sock);
    wait_until(
        "two link connections open",
        Duration::from_secs(5),
        || (gauge() >= 2.0).then_some(()),
        || metrics_text_at(admin),
    );
    // A third over unix: the TCP one, the oldest, is closed for it.
    let _third = unix_connect(&s.sock);
    let (took, got) = read_until_closed(&mut tcp, Duration::from_secs(4));
    assert!(
        took < Duration::from_secs(3) && got.is_empty(),
        "the tcp connection was not closed for a unix one: {took:?} {got:?}\n{}",
        router.log()
    );
    // And one over TCP takes the first unix connection's slot.
    let _t3 = TcpStream::connect(ready.internal[0]).expect("tcp");
    let (took, _) = read_until_closed(&mut unix, Duration::from_secs(4));
    assert!(
        took < Duration::from_secs(3),
        "the unix connection was not closed for a tcp one: {took:?}"
    );
    wait_until(
        "two evictions counted",
        Duration::from_secs(5),
        || {
            (metric_sum(admin, "fedbus_link_handshakes_evicted_total") >= 2.0 && gauge() == 2.0)
                .then_some(())
        },
        || metrics_text_at(admin),
    );
    assert_no_panic(&router.log());
}

/// TUNING.md `limits.handshake_timeout_ms` applies to the unix listener: a client that connects
/// and sends nothing is closed about the timeout later and counted
/// (`fedbus_task_link_refused_total{reason="handshake_timeout"}`); one upgraded over unix with
/// a garbage or other-cluster token gets 401 (`bad_token`, `wrong_cluster`).
#[test]
fn the_unix_listener_times_out_silent_clients_and_refuses_bad_tokens() {
    let mut s = Setup::new("probe-unix-hs", 1, "handshake_timeout_ms = 600");
    let (router, ready) = s.launch();
    let admin = ready.admin.expect("admin");
    let mut silent = unix_connect(&s.sock);
    let (took, got) = read_until_closed(&mut silent, Duration::from_secs(5));
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(4),
        "silent unix client closed after {took:?} ({got:?})"
    );
    wait_until(
        "handshake_timeout counted",
        Duration::from_secs(5),
        || {
            (Metrics::parse(&metrics_text_at(admin))
                .get("fedbus_task_link_refused_total{reason=\"handshake_timeout\"}")
                >= 1.0)
                .then_some(())
        },
        || metrics_text_at(admin),
    );
    let other = fedbus(
        s.dir.path(),
        &[
            "token",
            "service",
            "--task-id",
            "t",
            "--app",
            APP,
            "--cluster",
            "local/other",
            "--keyring",
            s.keys.to_str().unwrap(),
        ],
    );
    for (tok, want) in [
        ("fbs1.garbage", "bad_token"),
        (other.trim(), "wrong_cluster"),
    ] {
        let mut c = unix_connect(&s.sock);
        c.write_all(&upgrade_head(Some(tok))).unwrap();
        let (_, got) = read_until_closed(&mut c, Duration::from_secs(5));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 401"), "{tok}: {text}");
        assert!(text.contains(want), "{tok}: {text}");
    }
    assert_no_panic(&router.log());
}

/// ROTATION.md "Reload": `[listen]` cannot change live; a SIGHUP of a config whose
/// `internal_unix` changed logs `config change needs a restart; left as it is` and keeps the
/// old socket serving; the new path is not bound.
#[test]
fn a_reload_that_moves_the_unix_socket_needs_a_restart() {
    let mut s = Setup::new("probe-unix-reload", 1, "");
    let (router, ready) = s.launch();
    let task = s.task(&[]);
    let tok = s.token();
    wait_served(ready.api, &tok, Duration::from_secs(15), &[&router, &task]);
    let moved = s.dir.path().join("moved.sock");
    s.write_cfg(moved.to_str().unwrap(), 1, "");
    router.sig("HUP");
    wait_until(
        "reload logged as needing a restart",
        Duration::from_secs(5),
        || {
            router
                .log()
                .contains("config change needs a restart")
                .then_some(())
        },
        || router.log(),
    );
    let log = router.log();
    assert!(log.contains("listen"), "section not named:\n{log}");
    assert!(!moved.exists(), "the new path was bound");
    assert!(s.sock.exists());
    let mut c = unix_connect(&s.sock);
    c.write_all(&upgrade_head(None)).unwrap();
    let (_, got) = read_until_closed(&mut c, Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 401"));
    assert_eq!(echo(ready.api, &tok, 1), Some(200));
    assert_no_panic(&router.log());
}

/// A relative `internal_unix` (resolved against the router's working directory): a task in
/// another directory that dials the socket's absolute path links both shards (the hello must
/// name paths it can dial) and is served through both.
#[test]
fn a_relative_unix_path_links_a_task_started_elsewhere() {
    let s = Setup::new("probe-unix-rel", 2, "");
    s.write_cfg("link.sock", 2, "");
    let log = s.dir.path().join("router.log");
    let mut child = s.spawn_in_dir(&log);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let router = Run::new(child, log).plain_log();
    let ready = wait_ready(&router, &rx, Duration::from_secs(10));
    println!("ready internal_unix {:?}", ready.internal_unix);
    let abs = s.sock.display().to_string();
    assert_eq!(
        ready.internal_unix,
        [format!("unix:{abs}"), format!("unix:{abs}.1")],
        "the ready line names absolute paths"
    );
    assert!(s.sock.exists(), "socket not in the router's directory");
    let task = s.task(&[]); // cwd: the test's, not the router's
    let tok = s.token();
    let mut seen = [false, false];
    let mut w = 0;
    wait_until(
        "served by both shards over unix",
        Duration::from_secs(15),
        || {
            w += 1;
            let mut c = Conn::open(ready.api);
            c.send(
                &Req::post(&format!("/api/local/dev/{APP}/api/{}/sys/echo", w % 16))
                    .token(&tok)
                    .body(b"x")
                    .bytes(),
            );
            if let Ok(r) = c.read_response_for("POST") {
                if r.status == 200 {
                    if let Some(k) = r.header("echo-link-shard").and_then(|k| k.parse().ok()) {
                        seen[usize::min(k, 1)] = true;
                    }
                }
            }
            (seen[0] && seen[1]).then_some(())
        },
        || format!("{}\n----\n{}", router.log(), task.log()),
    );
    assert_no_panic(&router.log());
}

/// A router drained with SIGTERM closes the unix-linked task's links with 1001; started again,
/// the task relinks over the socket (the file was left behind) and is served.
#[test]
fn sigterm_drain_closes_unix_links_with_1001_and_the_task_relinks() {
    let mut s = Setup::new("probe-unix-drain", 1, "");
    let (mut a, ready) = s.launch();
    let task = s.task(&[]);
    let tok = s.token();
    wait_served(ready.api, &tok, Duration::from_secs(15), &[&a, &task]);
    a.sig("TERM");
    let exit = a.wait_exit(Duration::from_secs(15));
    assert!(exit.is_some_and(|x| x.success()), "{exit:?}\n{}", a.log());
    wait_until(
        "task saw its link close 1001",
        Duration::from_secs(5),
        || {
            task.log()
                .contains("router closed the link (Some(1001))")
                .then_some(())
        },
        || task.log(),
    );
    let (b, ready) = s.launch();
    wait_served(ready.api, &tok, Duration::from_secs(15), &[&b, &task]);
    assert_no_panic(&b.log());
    assert_no_panic(&task.log());
}

/// A socket path longer than a unix socket address holds (108 bytes with its NUL) fails the
/// start with a clear error, no panic; so does a path that fits for shard 0 but not with the
/// `.1` of shard 1.
#[test]
fn a_unix_path_too_long_fails_the_start_clearly() {
    let s = Setup::new("probe-unix-long", 2, "");
    let base = s.dir.path().to_str().unwrap().len() + 1;
    for total in [200usize, 107] {
        let name = "x".repeat(total.saturating_sub(base).max(1));
        let p = s.dir.path().join(&name);
        s.write_cfg(p.to_str().unwrap(), 2, "");
        let log = s.dir.path().join(format!("long-{total}.log"));
        let (mut run, rx) = spawn_run(s.dir.path(), &s.cfg, &[], &log);
        let exit = run.wait_exit(Duration::from_secs(10));
        let out = plain(&run.log());
        let lines: Vec<String> = rx.try_iter().collect();
        println!(
            "path of {} bytes: exit {exit:?}; {}",
            p.to_str().unwrap().len(),
            out.lines().last().unwrap_or("")
        );
        assert_no_panic(&out);
        assert!(
            exit.is_some_and(|x| !x.success()),
            "{} bytes: started? {exit:?} {lines:?}\n{out}",
            p.to_str().unwrap().len()
        );
        assert!(out.contains("fedbus: error:"), "{out}");
        assert!(
            out.contains("shorter than SUN_LEN"),
            "no clear error:\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// fedbus task: graceful stop

/// A router (admin enabled, 1 shard) and a task of ours with extra args, linked over TCP.
fn router_and_task(delay_ms: u64, args: &[&str]) -> (Router, Run) {
    let r = Router::new().apps(&[(APP, 16)]).start();
    let mut all = vec!["--delay-ms".to_string(), delay_ms.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let task = spawn_echo_task(
        r.home(),
        r.internal[0],
        &r.keys,
        &all,
        r.home().join("probe-task.log"),
    )
    .plain_log();
    // Registered is not yet routed: the control thread publishes the table after it, and
    // `/readyz` (coverage `all`) answers 200 once every partition has a task in it.
    wait_until(
        "task registered and routed (/readyz 200)",
        Duration::from_secs(10),
        || (admin_get(r.admin, "/readyz").0 == 200).then_some(()),
        || format!("{}\n{}", r.log(), task.log()),
    );
    (r, task)
}

/// Sends a request in its own thread; its status (None: no answer) comes back on join.
fn send_async(r: &Router, tok: &str, wsid: u64) -> std::thread::JoinHandle<Option<u16>> {
    let mut c = r.conn();
    let req = Req::post(&r.path(APP, wsid)).token(tok).body(b"held");
    std::thread::spawn(move || {
        c.set_read_timeout(Duration::from_secs(15));
        c.send(&req.bytes());
        c.read_response_for("POST").ok().map(|x| x.status)
    })
}

fn wait_pending(r: &Router, n: f64) {
    wait_until(
        "requests held by the task",
        Duration::from_secs(5),
        || (r.metrics().get("fedbus_pending_requests") >= n).then_some(()),
        || r.log(),
    );
}

/// `--stop-timeout 1s` with handlers that take 6 s: the task exits 0 about 1 s after SIGTERM,
/// and the requests it held fail (not 200) then, long before their handlers would have ended.
#[test]
fn a_task_whose_handlers_outlast_the_stop_timeout_exits_0_at_the_timeout() {
    let (r, mut task) = router_and_task(6000, &["--stop-timeout", "1s"]);
    let tok = r.token(APP, "alice");
    let held = send_async(&r, &tok, 1);
    wait_pending(&r, 1.0);
    let t0 = Instant::now();
    task.sig("TERM");
    let exit = task.wait_exit(Duration::from_secs(5));
    let took = t0.elapsed();
    let st = held.join().unwrap();
    let answered = t0.elapsed();
    println!("exit {exit:?} after {took:?}; held request {st:?} after {answered:?}");
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        task.log()
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "exit after {took:?}\n{}",
        task.log()
    );
    assert_ne!(st, Some(200));
    assert!(answered < Duration::from_secs(5), "{answered:?}");
    assert_no_panic(&task.log());
}

/// "a second signal exits at once, status 1": SIGTERM with a handler in flight (stop timeout
/// 10 s), then SIGTERM again: status 1 within a second.
#[test]
fn a_second_sigterm_during_the_stop_exits_1_at_once() {
    let (r, mut task) = router_and_task(8000, &[]);
    let tok = r.token(APP, "alice");
    let _held = send_async(&r, &tok, 1);
    wait_pending(&r, 1.0);
    task.sig("TERM");
    wait_until(
        "the stop under way",
        Duration::from_secs(5),
        || {
            (r.metrics()
                .get("fedbus_task_ejected_total{reason=\"stopping\"}")
                >= 1.0)
                .then_some(())
        },
        || task.log(),
    );
    assert!(task.alive(), "exited before the second signal");
    let t0 = Instant::now();
    task.sig("TERM");
    let exit = task.wait_exit(Duration::from_secs(3));
    println!("second signal: exit {exit:?} after {:?}", t0.elapsed());
    assert_eq!(exit.and_then(|x| x.code()), Some(1), "{}", task.log());
    // Far below the 10 s stop timeout (the bound is loose for a loaded machine).
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// SIGINT stops like SIGTERM: the router takes the link out (reason stopping), the request in
/// flight is answered 200, and the task exits 0.
#[test]
fn sigint_stops_the_task_like_sigterm() {
    let (r, mut task) = router_and_task(1000, &[]);
    let tok = r.token(APP, "alice");
    let held = send_async(&r, &tok, 1);
    wait_pending(&r, 1.0);
    task.sig("INT");
    let exit = task.wait_exit(Duration::from_secs(8));
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        task.log()
    );
    assert_eq!(held.join().unwrap(), Some(200));
    assert!(
        r.metrics()
            .get("fedbus_task_ejected_total{reason=\"stopping\"}")
            >= 1.0,
        "{}",
        r.metrics_text()
    );
    assert!(task.log().contains("stopping: told the routers"));
}

/// A task stopped while its only router is gone (drained and exited) exits promptly, status 0, without
/// waiting for the router or the stop timeout.
#[test]
fn a_task_stopped_while_its_router_is_down_exits_promptly() {
    let (mut r, mut task) = router_and_task(0, &[]);
    // The router drains and exits; the task keeps dialing it.
    r.sigterm();
    let _ = r.wait_exit(Duration::from_secs(15));
    wait_until(
        "task saw the router go",
        Duration::from_secs(10),
        || task.log().contains("router closed the link").then_some(()),
        || task.log(),
    );
    let t0 = Instant::now();
    task.sig("TERM");
    let exit = task.wait_exit(Duration::from_secs(5));
    println!("exit {exit:?} after {:?}", t0.elapsed());
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        task.log()
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// `--stop-timeout garbage` is refused clearly, before anything starts.
#[test]
fn a_garbage_stop_timeout_is_a_clear_error() {
    let dir = TempDir::new("probe-stop-garbage");
    let out = Command::new(bin())
        .args([
            "task",
            "echo",
            "--router",
            "127.0.0.1:1",
            "--stop-timeout",
            "garbage",
        ])
        .env("FEDBUS_HOME", dir.path())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert!(!out.status.success());
    assert_no_panic(&err);
    assert!(err.contains("--stop-timeout"), "{err}");
}

/// A router whose stdout pipe is closed (the supervisor or script that started it stopped
/// reading) still starts and drains to exit 0: its banner lines meet EPIPE and it goes on
/// (`println!` panicked there, exit 101: the CI failure of python_task's router).
#[test]
fn a_router_whose_stdout_is_closed_starts_and_drains_to_exit_0() {
    let s = Setup::new("probe-stdout-closed", 1, "");
    let log = s.dir.path().join("router.log");
    let mut child = s.spawn_in_dir(&log);
    // Closed before the router can write a line: every banner line gets EPIPE.
    drop(child.stdout.take());
    let mut router = Run::new(child, log).plain_log();
    // The unix listener is bound before the banner is written, and SIGTERM is caught from
    // then on: the signal is handled after the banner, whatever the order.
    wait_until(
        "the unix task-link listener accepts",
        Duration::from_secs(10),
        || UnixStream::connect(&s.sock).ok().map(|_| ()),
        || router.log(),
    );
    router.sig("TERM");
    let exit = router.wait_exit(Duration::from_secs(15));
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        router.log()
    );
    assert_no_panic(&router.log());
}
