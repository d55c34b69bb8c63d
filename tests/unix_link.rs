//! Task links over the router's unix socket (`listen.internal_unix`), written from what
//! docs/TUNING.md and docs/PROTOCOL.md promise: shard 0 listens on the path and shard k on
//! `<path>.<k>`, the ready line and the hello list them, a task that dials `unix:<path>` links
//! every shard that way and is served; the service token is checked as on TCP; a socket file
//! left by a router that is gone is replaced, one a live router listens on fails a second
//! start, and `--takeover` replaces it so the task relinks to the new router. Every wait is
//! bounded and waits on a fact (a ready line, an answer, a log line).

use fedbus_testkit::launch::{client_token, spawn_echo_task, spawn_run, wait_ready, Run};
use fedbus_testkit::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const APP: &str = "demo/echo";

/// A router with two shards on 127.0.0.1 (ports chosen by the kernel) and a unix task-link
/// listener in its own folder.
struct Unix {
    dir: TempDir,
    cfg: PathBuf,
    keys: PathBuf,
    sock: PathBuf,
    runs: u32,
}

impl Unix {
    fn new() -> Unix {
        let dir = TempDir::new("unix-link");
        let keys = dir.path().join("keys");
        keys_init(dir.path(), &keys, &[APP]);
        let sock = dir.path().join("link.sock");
        let cfg = dir.path().join("router.toml");
        std::fs::write(
            &cfg,
            format!(
                "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\ninternal_unix = {:?}\nadmin_enabled = false\n[tuning]\nshard_cores = [0, 1]\npin = false\n[[apps]]\nname = \"{APP}\"\npartitions = 16\n",
                keys.to_str().expect("utf-8"),
                sock.to_str().expect("utf-8"),
            ),
        )
        .expect("write config");
        Unix {
            dir,
            cfg,
            keys,
            sock,
            runs: 0,
        }
    }

    /// `fedbus run` (with `--takeover` when asked), waited for until its ready line.
    fn launch(&mut self, takeover: bool) -> (Run, Ready) {
        self.runs += 1;
        let log = self.dir.path().join(format!("router-{}.log", self.runs));
        let args: &[&str] = if takeover { &["--takeover"] } else { &[] };
        let (run, rx) = spawn_run(self.dir.path(), &self.cfg, args, &log);
        let ready = wait_ready(&run, &rx, Duration::from_secs(10));
        (run, ready)
    }

    /// `fedbus run` that must fail: it exits non-zero within 10 s, with `error` in its output
    /// and no panic.
    fn start_fails(&self, label: &str, error: &str) {
        self.start_fails_with(&self.cfg, &[], label, error);
    }

    /// [`Unix::start_fails`] with another config file and arguments.
    fn start_fails_with(&self, cfg: &std::path::Path, args: &[&str], label: &str, error: &str) {
        let log = self.dir.path().join(format!("{label}.log"));
        let (mut run, _rx) = spawn_run(self.dir.path(), cfg, args, &log);
        let exit = run.wait_exit(Duration::from_secs(10));
        assert!(exit.is_some_and(|x| !x.success()), "{exit:?}");
        let out = run.log();
        assert_no_panic(&out);
        assert!(out.contains(error), "no clear error:\n{out}");
    }

    /// `fedbus task echo --router unix:<path>`.
    fn task(&self) -> Run {
        let log = self.dir.path().join("task.log");
        spawn_echo_task(
            self.dir.path(),
            format!("unix:{}", self.sock.display()),
            &self.keys,
            &[],
            log,
        )
    }

    /// Shard 1's socket path.
    fn shard1(&self) -> PathBuf {
        PathBuf::from(format!("{}.1", self.sock.display()))
    }

    /// A copy of the config with an HTTPS listener whose certificate is missing: a start
    /// fails after binding its listeners (certificates are read after).
    fn missing_certificate(&self) -> PathBuf {
        let text = std::fs::read_to_string(&self.cfg).unwrap();
        let missing = self.dir.path().join("missing");
        let broken = text.replace(
            "admin_enabled = false\n",
            "admin_enabled = false\napi_tls = \"127.0.0.1:0\"\n",
        ) + &format!(
            "[[tls.certs]]\ncert = {:?}\nkey = {:?}\n",
            missing.join("c.pem"),
            missing.join("k.pem")
        );
        let cfg2 = self.dir.path().join("broken.toml");
        std::fs::write(&cfg2, broken).unwrap();
        cfg2
    }

    fn token(&self) -> String {
        client_token(self.dir.path(), &self.keys, APP, "alice")
    }
}

/// One POST on a new connection to `api`: the status and the router shard whose task link
/// carried it (`echo-link-shard`, set by the echo task), or None when it could not be sent.
fn echo(api: SocketAddr, tok: &str, wsid: u64) -> Option<(u16, Option<String>)> {
    let path = format!("/api/local/dev/{APP}/api/{wsid}/sys/echo");
    let mut c = Conn::open(api);
    c.send(&Req::post(&path).token(tok).body(b"over unix").bytes());
    let r = c.read_response_for("POST").ok()?;
    Some((r.status, r.header("echo-link-shard").map(String::from)))
}

/// Waits until requests over new connections have been answered 200 through both shards'
/// links (connections land on the shards by the kernel's SO_REUSEPORT hash).
fn wait_served_by_both(api: SocketAddr, tok: &str, ctx: &[&Run]) {
    let mut seen = [false, false];
    let mut wsid = 0;
    wait_until(
        "200 through both shards' links",
        Duration::from_secs(15),
        || {
            wsid += 1;
            if let Some((200, Some(shard))) = echo(api, tok, wsid % 16) {
                if let Ok(k) = shard.parse::<usize>() {
                    seen[k.min(1)] = true;
                }
            }
            (seen[0] && seen[1]).then_some(())
        },
        || {
            ctx.iter()
                .map(|r| r.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        },
    );
}

/// TUNING.md `listen.internal_unix`: shard 0 on the path, shard k on `<path>.<k>`, both in
/// the ready line; a task dialing `unix:<path>` links both shards over unix sockets (its log
/// names each) and requests through either shard are answered.
#[test]
fn a_task_on_the_unix_socket_links_every_shard_and_is_served() {
    let mut u = Unix::new();
    let (router, ready) = u.launch(false);
    let want = vec![
        format!("unix:{}", u.sock.display()),
        format!("unix:{}.1", u.sock.display()),
    ];
    assert_eq!(ready.internal_unix, want);
    assert_eq!(ready.internal.len(), 2, "the TCP listeners stay");
    let task = u.task();
    let tok = u.token();
    wait_served_by_both(ready.api, &tok, &[&router, &task]);
    let log = plain_log(&task);
    for w in &want {
        assert!(
            log.contains(&format!("link up addr={w} ")),
            "no link to {w}:\n{log}"
        );
    }
    assert!(!log.contains("addr=127.0.0.1"), "a TCP link:\n{log}");
    assert_no_panic(&router.log());
}

/// The unix listener checks the service token like the TCP one: an upgrade without one is
/// refused `401 missing_token` before any hello.
#[test]
fn the_unix_listener_refuses_an_upgrade_without_a_service_token() {
    let mut u = Unix::new();
    let (_router, _ready) = u.launch(false);
    let text = upgrade_without_token(&u.sock);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("missing_token"), "{text}");
}

/// A takeover that fails after binding (here: its TLS certificate is missing, read after the
/// listeners are bound) leaves the running router's socket paths alone and removes the
/// sockets it bound beside them: the path still reaches the running router.
#[test]
fn a_failed_takeover_leaves_the_running_routers_socket_alone() {
    let mut u = Unix::new();
    let (_router, _ready) = u.launch(false);
    let cfg2 = u.missing_certificate();
    u.start_fails_with(&cfg2, &["--takeover"], "takeover", "fedbus: error:");
    let text = upgrade_without_token(&u.sock);
    assert!(
        text.starts_with("HTTP/1.1 401"),
        "the running router no longer answers on its path: {text}"
    );
    let left: Vec<_> = std::fs::read_dir(u.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".new"))
        .collect();
    assert!(
        left.is_empty(),
        "sockets of the failed takeover left: {left:?}"
    );
}

/// Sends a link upgrade without a service token on the unix socket at `sock`; what came back
/// (the refusal, or nothing).
fn upgrade_without_token(sock: &std::path::Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /link HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("missing_token") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Restarts: a socket file left by a router killed with -9 is replaced by the next start and
/// the task relinks; a second router of the same config fails with "in use" while the first
/// serves on; `--takeover` replaces the socket, and after the old router drains the task is
/// served through the new one.
#[test]
fn restarts_replace_a_stale_socket_and_takeover_moves_the_task() {
    let mut u = Unix::new();
    let (mut first, ready) = u.launch(false);
    let task = u.task();
    let tok = u.token();
    wait_served_by_both(ready.api, &tok, &[&first, &task]);

    first.kill9();
    assert!(u.sock.exists(), "kill -9 leaves the socket file");
    let (mut second, ready) = u.launch(false);
    wait_served_by_both(ready.api, &tok, &[&second, &task]);

    // A second router of the same config: refused, and the running one is untouched.
    u.start_fails("refused", "is in use by a running router");
    assert_eq!(echo(ready.api, &tok, 1).map(|r| r.0), Some(200));

    // Takeover: the new router owns the path; the old one drains and exits 0, leaving the
    // path (now the new router's socket) alone.
    let (mut third, ready3) = u.launch(true);
    second.sig("TERM");
    let exit = second.wait_exit(Duration::from_secs(15));
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        second.log()
    );
    assert!(
        u.sock.exists() && u.shard1().exists(),
        "the old router removed the new one's sockets"
    );
    wait_served_by_both(ready3.api, &tok, &[&third, &task]);
    assert_no_panic(&third.log());
    // A router that stops removes its socket files, as nginx does.
    third.sig("TERM");
    let exit = third.wait_exit(Duration::from_secs(15));
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        third.log()
    );
    assert!(!u.sock.exists() && !u.shard1().exists(), "{}", third.log());
}

/// A start that fails after binding its unix sockets (here: its TLS certificate is missing,
/// read after the listeners are bound) removes them: no file is left for the next start to
/// find.
#[test]
fn a_failed_start_removes_the_sockets_it_bound() {
    let u = Unix::new();
    let cfg2 = u.missing_certificate();
    u.start_fails_with(&cfg2, &[], "failed", "fedbus: error:");
    assert!(
        !u.sock.exists() && !u.shard1().exists(),
        "socket files left"
    );
}

/// A path that exists and is not a socket is never removed: the start fails clearly.
#[test]
fn a_path_that_is_not_a_socket_fails_the_start() {
    let u = Unix::new();
    std::fs::write(&u.sock, b"not a socket").unwrap();
    u.start_fails("router", "exists and is not a socket");
    assert_eq!(std::fs::read(&u.sock).unwrap(), b"not a socket");
}

/// The task's log without color codes.
fn plain_log(r: &Run) -> String {
    fedbus_testkit::launch::plain(&r.log())
}
