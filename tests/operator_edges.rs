//! An operator's adversarial probe (4 of these failed on the build before: an empty
//! advertise_host, a huge io_memory panicking in glommio, a token command minting an app in a
//! keyring made on the spot, a stale doc on SIGTERM during the start), written from the docs (README.md, docs/TUNING.md,
//! docs/ARCHITECTURE.md "The listeners" / "Threads" / "Readiness and drain", docs/ROTATION.md
//! "Reload", docs/FEDERATION.md "Readiness and drain") and `fedbus --help`: what an operator of
//! nginx/NATS/Envoy touches. The config file and its validation, the CLI, the admin endpoints,
//! signals. Every wait is bounded and waits on a fact (a ready line, a metric, an exit status).
//!
//! Addresses: port 0 on 127.0.0.1, or fixed ports on 127.0.0.181-189 (no other test uses them).

use fedbus_testkit::launch::spawn_run_to_file;
use fedbus_testkit::seed;
use fedbus_testkit::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";
const APP_TOML: &str = "[[apps]]\nname = \"demo/echo\"\npartitions = 16\n";
const I64_MAX: i64 = i64::MAX;

// ---------------------------------------------------------------------------------------------
// Helpers: `fedbus run` on a config text, with stdout and stderr in one file (Rust's stdout is
// line-buffered, so the ready line is there as soon as it is printed).

struct Fb {
    child: Option<Child>,
    out: PathBuf,
}

impl Fb {
    fn start(home: &Path, name: &str, text: &str, args: &[&str]) -> Fb {
        let cfg = home.join(format!("{name}.toml"));
        std::fs::write(&cfg, text).expect("write config");
        Fb::start_path(home, name, &cfg, args)
    }

    fn start_path(home: &Path, name: &str, cfg: &Path, args: &[&str]) -> Fb {
        let out = home.join(format!("{name}.out"));
        let child = spawn_run_to_file(home, cfg, args, &out);
        Fb {
            child: Some(child),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// The ready line's JSON, or the exit status with the output; panics after `within`.
    fn ready_or_exit(
        &mut self,
        within: Duration,
    ) -> Result<serde_json::Value, (ExitStatus, String)> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.output();
            if let Some(l) = out.lines().find_map(|l| l.strip_prefix("fedbus-ready ")) {
                return Ok(serde_json::from_str(l).expect("ready line is JSON"));
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("wait"))
            {
                self.child = None;
                return Err((st, self.output()));
            }
            assert!(
                Instant::now() < deadline,
                "neither a ready line nor an exit within {within:?}:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ready(&mut self) -> serde_json::Value {
        self.ready_or_exit(Duration::from_secs(10))
            .unwrap_or_else(|(st, out)| panic!("exited {st} instead of starting:\n{out}"))
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGTERM; asserts exit 0 within `within`.
    fn term_and_expect_0(&mut self, within: Duration) {
        self.signal("TERM");
        let st = self
            .wait_exit(within)
            .unwrap_or_else(|| panic!("no exit within {within:?} of SIGTERM:\n{}", self.output()));
        assert!(st.success(), "exit {st} after SIGTERM:\n{}", self.output());
    }
}

impl Drop for Fb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- output of {} ----\n{}",
                self.out.display(),
                self.output()
            );
        }
    }
}

fn home_with_keys(tag: &str) -> (TempDir, PathBuf) {
    let home = TempDir::new(tag);
    let keys = home.path().join("keys");
    keys_init(home.path(), &keys, &[APP]);
    (home, keys)
}

fn base_config(keys: &Path) -> String {
    format!(
        "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = [0]\npin = false\n",
        keys.to_str().unwrap()
    )
}

/// `fedbus run` on `text` must fail: non-zero exit within 10 s, `fedbus: error:` naming
/// `needle`, no ready line, no panic. Returns the error line.
fn expect_refused(home: &Path, name: &str, text: &str, needle: &str) -> String {
    let mut fb = Fb::start(home, name, text, &[]);
    match fb.ready_or_exit(Duration::from_secs(10)) {
        Ok(_) => panic!("{name}: started, but the docs say it is refused:\n{text}"),
        Err((st, out)) => {
            assert_no_panic(&out);
            assert!(!st.success(), "{name}: exit {st}:\n{out}");
            assert!(
                out.contains("fedbus: error:"),
                "{name}: no clear error:\n{out}"
            );
            assert!(
                out.contains(needle),
                "{name}: the error does not name {needle:?}:\n{out}"
            );
            out.lines()
                .find(|l| l.contains("fedbus: error:"))
                .unwrap_or("")
                .to_string()
        }
    }
}

/// `fedbus run` on `text` must start (ready line) and exit 0 on SIGTERM.
fn expect_starts(home: &Path, name: &str, text: &str) {
    let mut fb = Fb::start(home, name, text, &[]);
    match fb.ready_or_exit(Duration::from_secs(10)) {
        Ok(_) => fb.term_and_expect_0(Duration::from_secs(10)),
        Err((st, out)) => panic!("{name}: refused ({st}), but the docs accept it:\n{text}\n{out}"),
    }
}

/// Runs `fedbus ARGS` (no panic on failure): (status, stdout, stderr).
fn cli(home: Option<&Path>, cwd: Option<&Path>, args: &[&str]) -> (ExitStatus, String, String) {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null());
    match home {
        Some(h) => {
            c.env("FEDBUS_HOME", h);
        }
        None => {
            c.env_remove("FEDBUS_HOME");
        }
    }
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().expect("run fedbus");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CLI call that must fail cleanly: non-zero, a message on stderr, nothing on stdout, no panic.
fn cli_fails(home: &Path, args: &[&str], needle: &str) -> String {
    let (st, so, se) = cli(Some(home), None, args);
    assert_no_panic(&se);
    assert!(
        !st.success(),
        "{args:?}: exit {st}, stdout {so:?}, stderr {se:?}"
    );
    assert!(
        so.trim().is_empty(),
        "{args:?}: printed on stdout on failure: {so:?}"
    );
    assert!(
        se.contains(needle),
        "{args:?}: stderr does not name {needle:?}: {se:?}"
    );
    se
}

/// GET on the admin listener; None when the connection fails or is closed without an answer.
fn try_get(a: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    try_method(a, "GET", path)
}

/// `METHOD path` on a fresh connection: (status, head, body).
fn try_method(a: SocketAddr, method: &str, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(4))).ok()?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_string(), body.to_string()))
}

fn wait_until<T>(what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for(within, f).unwrap_or_else(|| panic!("{what}: not within {within:?}"))
}

// =============================================================================================
// Config validation at start.

/// TUNING.md, "limits": "validation rejects 0 for every count and every `*_ms`, and names the
/// field, except where 0 means something: `task_pong_timeout_ms` and `task_eject_after_timeouts`
/// ... and `max_anonymous_body_bytes`".
#[test]
fn cfg_every_zero_limit_is_refused_naming_it() {
    let (home, keys) = home_with_keys("probe-zero");
    let base = base_config(&keys);
    let refused = [
        "max_header_bytes",
        "max_body_bytes",
        "handshake_timeout_ms",
        "idle_timeout_ms",
        "request_timeout_ms",
        "max_connections_per_shard",
        "max_link_connections_per_shard",
        "max_pending_per_link",
        "max_link_outbox_bytes",
        "max_inflight_per_connection",
        "ping_interval_ms",
        "min_body_bytes_per_sec",
        "body_budget_bytes",
        "max_connection_body_bytes",
        "max_connection_outbox_bytes",
        "min_answer_bytes_per_sec",
        "max_control_frames_per_sec",
        "max_peer_status_per_sec",
        "max_queued_control_frames",
    ];
    for k in refused {
        let text = format!("{base}[limits]\n{k} = 0\n{APP_TOML}");
        expect_refused(home.path(), k, &text, &format!("limits.{k}"));
    }
    // readiness / auth zeros the docs refuse.
    for (sect, k) in [
        ("readiness", "drain_idle_close_ms"),
        ("auth", "reload_poll_ms"),
        ("auth", "verify_cache_per_peer_link"),
    ] {
        let text = format!("{base}[{sect}]\n{k} = 0\n{APP_TOML}");
        expect_refused(home.path(), k, &text, &format!("{sect}.{k}"));
    }
}

/// TUNING.md: 0 turns `task_pong_timeout_ms` / `task_eject_after_timeouts` off,
/// `max_anonymous_body_bytes = 0` means no body; `tls.session_cache`: "`0` turns it off".
#[test]
fn cfg_zero_is_accepted_where_the_docs_give_it_a_meaning() {
    let (home, keys) = home_with_keys("probe-zero-ok");
    let base = base_config(&keys);
    for k in [
        "task_pong_timeout_ms",
        "task_eject_after_timeouts",
        "max_anonymous_body_bytes",
    ] {
        expect_starts(
            home.path(),
            k,
            &format!("{base}[limits]\n{k} = 0\n{APP_TOML}"),
        );
    }
    expect_starts(
        home.path(),
        "session_cache",
        &format!("{base}[tls]\nsession_cache = 0\n{APP_TOML}"),
    );
}

/// TUNING.md: `max_header_bytes` "At most 1 MiB"; `max_body_bytes` "At most 2147483647";
/// `partitions` "must be 1 to 1048576"; `routing.max_hops` "(at most 4)";
/// `emergency_partition` "must be below `partitions`". Each bound: accepted at, refused past.
#[test]
fn cfg_documented_upper_bounds_hold_exactly() {
    let (home, keys) = home_with_keys("probe-bounds");
    let base = base_config(&keys);
    let lim = |k: &str, v: u64| format!("{base}[limits]\n{k} = {v}\n{APP_TOML}");
    expect_starts(home.path(), "hdr_at", &lim("max_header_bytes", 1 << 20));
    expect_refused(
        home.path(),
        "hdr_over",
        &lim("max_header_bytes", (1 << 20) + 1),
        "limits.max_header_bytes",
    );
    expect_starts(
        home.path(),
        "body_at",
        &lim("max_body_bytes", 2_147_483_647),
    );
    expect_refused(
        home.path(),
        "body_over",
        &lim("max_body_bytes", 2_147_483_648),
        "limits.max_body_bytes",
    );
    let app = |p: u64, e: Option<u64>| {
        let e = e
            .map(|e| format!("emergency_partition = {e}\n"))
            .unwrap_or_default();
        format!("{base}[[apps]]\nname = \"demo/echo\"\npartitions = {p}\n{e}")
    };
    expect_starts(home.path(), "parts_at", &app(1_048_576, None));
    expect_refused(
        home.path(),
        "parts_over",
        &app(1_048_577, None),
        "partitions",
    );
    expect_starts(home.path(), "emerg_last", &app(4, Some(3)));
    expect_refused(
        home.path(),
        "emerg_eq",
        &app(4, Some(4)),
        "emergency_partition",
    );
    expect_starts(
        home.path(),
        "hops_at",
        &format!("{base}[routing]\nmax_hops = 4\n{APP_TOML}"),
    );
    expect_refused(
        home.path(),
        "hops_over",
        &format!("{base}[routing]\nmax_hops = 5\n{APP_TOML}"),
        "routing.max_hops",
    );
}

/// Huge values (TOML's largest integer) for every limit without a documented maximum, the
/// readiness times and `[auth]`: the router must start, route, answer `/readyz` and drain, not
/// overflow a deadline (TUNING.md "Keyring files and token lifetimes": "take any 64-bit value
/// without overflow").
#[test]
fn cfg_huge_values_start_serve_and_drain() {
    let mut b = Router::new().apps(&[(APP, 16)]);
    for k in [
        "handshake_timeout_ms",
        "idle_timeout_ms",
        "request_timeout_ms",
        "ping_interval_ms",
        "task_pong_timeout_ms",
        "max_connections_per_shard",
        "max_link_connections_per_shard",
        "max_pending_per_link",
        "max_link_outbox_bytes",
        "max_inflight_per_connection",
        "body_budget_bytes",
        "max_connection_body_bytes",
        "max_connection_outbox_bytes",
        "min_body_bytes_per_sec",
        "min_answer_bytes_per_sec",
        "max_queued_control_frames",
        "max_anonymous_body_bytes",
    ] {
        b = b.limit(k, I64_MAX);
    }
    b = b
        .limit("max_control_frames_per_sec", u32::MAX)
        .limit("max_peer_status_per_sec", u32::MAX)
        .limit("task_eject_after_timeouts", u32::MAX)
        .tail(&format!(
            "[readiness]\ndrain_timeout_ms = {I64_MAX}\ndrain_peer_hold_ms = {}\ntakeover_wait_ms = {I64_MAX}\n[auth]\ngrace_secs = {I64_MAX}\nreload_poll_ms = {I64_MAX}\nverify_cache_per_peer_link = {I64_MAX}\n[tls]\nsession_cache = {I64_MAX}\n[routing]\nelection_seed = {I64_MAX}",
            I64_MAX - 1
        ));
    let mut r = b.start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    for wsid in [0u64, 7, 15] {
        let resp = r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(b"huge"));
        assert_eq!(
            (resp.status, resp.body.as_slice()),
            (200, &b"huge"[..]),
            "{resp:?}"
        );
    }
    let (st, body) = admin_get(r.admin, "/readyz");
    assert_eq!((st, body.as_str()), (200, "ready\n"));
    r.sigterm();
    let st = r
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", r.log()));
    assert!(st.success(), "{st}\n{}", r.log());
    assert_no_panic(&r.log());
}

/// TUNING.md `tuning.io_memory`: at most 1 GiB, refused at start naming the key; before, 64 GiB
/// panicked inside glommio (an allocation unwrapped) and named nothing.
#[test]
fn cfg_huge_io_memory_is_a_clear_error_not_a_panic() {
    let (home, keys) = home_with_keys("probe-iomem");
    let text = format!(
        "{}{APP_TOML}",
        base_config(&keys).replace("pin = false", "pin = false\nio_memory = 68719476736")
    );
    let mut fb = Fb::start(home.path(), "iomem", &text, &[]);
    match fb.ready_or_exit(Duration::from_secs(20)) {
        Ok(_) => panic!(
            "started with io_memory = 64 GiB; TUNING.md bounds it at 1 GiB:\n{}",
            fb.output()
        ),
        Err((st, out)) => {
            assert!(!st.success());
            assert_no_panic(&out);
            assert!(
                out.contains("io_memory"),
                "the error does not name io_memory:\n{out}"
            );
        }
    }
}

/// Unknown keys and typos in every section are refused naming the key (the top level,
/// `[limits]` and an unknown section are already in tests/lifecycle.rs).
#[test]
fn cfg_unknown_keys_in_every_section_are_refused_naming_them() {
    let (home, keys) = home_with_keys("probe-unknown");
    let base = base_config(&keys);
    let fed_keys = keys.to_str().unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("listen", base.replace("[tuning]", "admn = \"127.0.0.1:0\"\n[tuning]") + APP_TOML, "admn"),
        ("tuning", base.replace("pin = false", "pin = false\nshard_core = [0]") + APP_TOML, "shard_core"),
        ("readiness", format!("{base}[readiness]\ncoverag = \"none\"\n{APP_TOML}"), "coverag"),
        ("auth", format!("{base}[auth]\ngrace_sec = 1\n{APP_TOML}"), "grace_sec"),
        ("routing", format!("{base}[routing]\nmax_hop = 2\n{APP_TOML}"), "max_hop"),
        ("tls", format!("{base}[tls]\nticket = false\n{APP_TOML}"), "ticket"),
        ("apps", format!("{base}{APP_TOML}partitons = 4\n"), "partitons"),
        ("apps.cors", format!("{base}{APP_TOML}[apps.cors]\nallowed_origins = [\"*\"]\nallowed_origin = [\"x\"]\n"), "allowed_origin"),
        ("federation", format!("{base}{APP_TOML}[federation]\npeer_token_fil = \"/x\"\n"), "peer_token_fil"),
        ("federation.clusters", format!("dev = true\n{base}{APP_TOML}[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"o\"\nrouters = [\"127.0.0.1:9\"]\nkeys = {fed_keys:?}\nkey = \"x\"\n"), "key"),
        ("tls.peer", format!("{base}{APP_TOML}[tls.peer]\nca = \"/x\"\ncert = \"/y\"\nkey = \"/z\"\nrequird = true\n"), "requird"),
    ];
    for (name, text, needle) in &cases {
        let line = expect_refused(home.path(), name, text, needle);
        let out = std::fs::read_to_string(home.path().join(format!("{name}.out"))).unwrap();
        assert!(
            out.contains("unknown field"),
            "{name}: not reported as an unknown key ({line}):\n{out}"
        );
    }
}

/// Values of the wrong type or range name the key (line and caret of the TOML error, or the
/// field of the validation error).
#[test]
fn cfg_wrong_types_and_ranges_name_the_key() {
    let (home, keys) = home_with_keys("probe-types");
    let base = base_config(&keys);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "u32_over",
            format!("{base}[limits]\nmax_control_frames_per_sec = {I64_MAX}\n{APP_TOML}"),
            "max_control_frames_per_sec",
        ),
        (
            "neg_core",
            base.replace("shard_cores = [0]", "shard_cores = [-1]") + APP_TOML,
            "shard_cores",
        ),
        (
            "neg_parts",
            format!("{base}[[apps]]\nname = \"demo/echo\"\npartitions = -1\n"),
            "partitions",
        ),
        (
            "port_over",
            base.replace("api = \"127.0.0.1:0\"", "api = \"127.0.0.1:70000\"") + APP_TOML,
            "api",
        ),
        (
            "bool_str",
            format!("dev = \"yes\"\n{base}{APP_TOML}"),
            "dev",
        ),
        (
            "ms_float",
            format!("{base}[limits]\nrequest_timeout_ms = 1.5\n{APP_TOML}"),
            "request_timeout_ms",
        ),
        (
            "pin_int",
            base.replace("pin = false", "pin = 0") + APP_TOML,
            "pin",
        ),
        (
            "control_core_99",
            base.replace("pin = false", "pin = false\ncontrol_core = 99") + APP_TOML,
            "tuning.control_core",
        ),
    ];
    for (name, text, needle) in &cases {
        expect_refused(home.path(), name, text, needle);
    }
}

/// TUNING.md `readiness`: `drain_peer_hold_ms` "Must be below `drain_timeout_ms`" (equal is
/// not below); "`drain_timeout_ms` and `drain_idle_close_ms` must be above 0".
#[test]
fn cfg_readiness_cross_checks() {
    let (home, keys) = home_with_keys("probe-readiness");
    let base = base_config(&keys);
    // The hold applies to peer links: checked with a federation, not without (a router
    // without one may drain in 5 s or less without setting the hold).
    let fed = "[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb2\"\nrouters = [\"127.0.0.1:1\"]\nkeys = \"/nonexistent\"\n";
    expect_refused(
        home.path(),
        "hold_eq",
        &format!(
            "{base}[readiness]\ndrain_timeout_ms = 5000\ndrain_peer_hold_ms = 5000\n{fed}{APP_TOML}"
        ),
        "readiness.drain_peer_hold_ms",
    );
    expect_starts(
        home.path(),
        "short_drain_alone",
        &format!("{base}[readiness]\ndrain_timeout_ms = 2000\n{APP_TOML}"),
    );
    expect_starts(
        home.path(),
        "hold_below",
        &format!(
            "{base}[readiness]\ndrain_timeout_ms = 5001\ndrain_peer_hold_ms = 5000\n{APP_TOML}"
        ),
    );
    expect_starts(
        home.path(),
        "hold_0",
        &format!("{base}[readiness]\ndrain_timeout_ms = 1\ndrain_peer_hold_ms = 0\n{APP_TOML}"),
    );
    // TUNING.md `limits.client_ping_interval_ms`: "Must be below `limits.idle_timeout_ms`".
    expect_refused(
        home.path(),
        "ping_eq_idle",
        &format!(
            "{base}[limits]\nidle_timeout_ms = 1000\nclient_ping_interval_ms = 1000\n{APP_TOML}"
        ),
        "limits.client_ping_interval_ms",
    );
    expect_starts(
        home.path(),
        "ping_below_idle",
        &format!(
            "{base}[limits]\nidle_timeout_ms = 1000\nclient_ping_interval_ms = 999\n{APP_TOML}"
        ),
    );
    expect_refused(
        home.path(),
        "coverage_case",
        &format!("{base}[readiness]\ncoverage = \"ALL\"\n{APP_TOML}"),
        "coverage",
    );
}

/// TUNING.md `apps.cors`: `allowed_origins` "(required)", "exact origins scheme://host[:port]
/// ... `"null"`, or `"*"`", "`"*"` is refused with" `allow_credentials`.
#[test]
fn cfg_cors_validation() {
    let (home, keys) = home_with_keys("probe-cors");
    let base = base_config(&keys);
    let cors = |t: &str| format!("{base}{APP_TOML}[apps.cors]\n{t}\n");
    expect_refused(
        home.path(),
        "star_cred",
        &cors("allowed_origins = [\"*\"]\nallow_credentials = true"),
        "allowed_origins",
    );
    expect_refused(
        home.path(),
        "missing",
        &cors("max_age_secs = 5"),
        "allowed_origins",
    );
    expect_refused(
        home.path(),
        "no_scheme",
        &cors("allowed_origins = [\"shop.example\"]"),
        "shop.example",
    );
    // "null" with credentials starts (an app loaded from file:// needs it), with a warning:
    // every sandboxed iframe and data: page sends `Origin: null`.
    let text =
        cors("allowed_origins = [\"null\", \"https://a.example:8443\"]\nallow_credentials = true");
    let mut fb = Fb::start(home.path(), "null_ok", &text, &[]);
    if let Err((st, out)) = fb.ready_or_exit(Duration::from_secs(10)) {
        panic!("null_ok: refused ({st}), but the docs accept it:\n{text}\n{out}");
    }
    let out = fb.output();
    fb.term_and_expect_0(Duration::from_secs(10));
    assert!(
        out.contains("\"null\" with allow_credentials"),
        "no warning for \"null\" with credentials:\n{out}"
    );
}

/// Names: apps are `owner/app`; region, cluster and router are single path segments.
#[test]
fn cfg_names_are_validated_naming_the_field() {
    let (home, keys) = home_with_keys("probe-names");
    let base = base_config(&keys);
    let app = |n: &str| format!("{base}[[apps]]\nname = {n:?}\npartitions = 4\n");
    for (name, n) in [
        ("noslash", "demoecho"),
        ("three", "a/b/c"),
        ("empty", ""),
        ("dotdot", "../x"),
        ("space", "de mo/echo"),
    ] {
        expect_refused(home.path(), name, &app(n), "apps[0].name");
    }
    expect_refused(
        home.path(),
        "region",
        &(base.replace("region = \"local\"", "region = \"\"") + APP_TOML),
        "region",
    );
    expect_refused(
        home.path(),
        "cluster",
        &(base.replace("cluster = \"dev\"", "cluster = \"d/ev\"") + APP_TOML),
        "cluster",
    );
    expect_refused(
        home.path(),
        "router",
        &format!("router = \"a/b\"\n{base}{APP_TOML}"),
        "router",
    );
}

/// Two listeners on one address: `validate()` refuses `listen.api_tls` = `listen.api`
/// (TUNING.md "listen"); api = admin or api = internal fails at the bind, naming the listener and
/// the address, within the 1 s probe retry, never a hang.
#[test]
fn cfg_listeners_sharing_an_address_fail_clearly() {
    let (home, keys) = home_with_keys("probe-same-addr");
    let base = base_config(&keys);
    let a = "127.0.0.181:18800";
    let tls = base.replace(
        "api = \"127.0.0.1:0\"",
        &format!("api = \"{a}\"\napi_tls = \"{a}\""),
    );
    expect_refused(
        home.path(),
        "tls_eq_api",
        &format!("dev = true\n{tls}{APP_TOML}"),
        "listen.api_tls",
    );
    for (name, key) in [("admin_eq_api", "admin"), ("internal_eq_api", "internal")] {
        let text = base
            .replace("api = \"127.0.0.1:0\"", &format!("api = \"{a}\""))
            .replace(
                &format!("{key} = \"127.0.0.1:0\""),
                &format!("{key} = \"{a}\""),
            );
        let t = Instant::now();
        let line = expect_refused(home.path(), name, &format!("{text}{APP_TOML}"), a);
        assert!(line.to_lowercase().contains("in use"), "{name}: {line}");
        assert!(
            line.contains(key),
            "{name}: the error does not name the {key} listener: {line}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: took {:?}",
            t.elapsed()
        );
    }
}

/// TUNING.md `listen.advertise_host`: "Required (`validate()` refuses the config otherwise)
/// when `listen.internal` binds an unspecified address ... since tasks cannot dial that". An
/// empty host is no more dialable: the hello then names `:port` for shard 1 and a task dials
/// it forever. It must be refused like an absent one.
#[test]
fn cfg_empty_advertise_host_with_unspecified_internal_is_refused() {
    let (home, keys) = home_with_keys("probe-advertise");
    let text = base_config(&keys).replace(
        "internal = \"127.0.0.1:0\"",
        "internal = \"0.0.0.0:0\"\nadvertise_host = \"\"",
    );
    expect_refused(
        home.path(),
        "adv_empty",
        &format!("{text}{APP_TOML}"),
        "listen.advertise_host",
    );
}

/// Broken keyring files at start (ROTATION.md "The keyring"): each is a clear error naming the
/// file, never a panic, never a start on half a keyring; a keyring path that is a file, too.
#[test]
fn cfg_broken_keyring_files_fail_naming_the_file() {
    let home = TempDir::new("probe-keyring");
    let mk = |name: &str| {
        let d = home.path().join(name);
        keys_init(home.path(), &d, &[APP]);
        d
    };
    let garbage = mk("garbage");
    std::fs::write(garbage.join("apps/demo.echo.toml"), "garbage = [").unwrap();
    let dir = mk("dir");
    std::fs::remove_file(dir.join("cluster.toml")).unwrap();
    std::fs::create_dir(dir.join("cluster.toml")).unwrap();
    let stray = mk("stray");
    std::fs::write(
        stray.join("apps/notanapp.toml"),
        "[[versions]]\nversion = 1\nsecret = \"00\"\ncreated = 0\n",
    )
    .unwrap();
    let empty = mk("empty");
    std::fs::write(empty.join("apps/demo.echo.toml"), "versions = []\n").unwrap();
    for dev in ["false", "true"] {
        for (d, file) in [
            (&garbage, "apps/demo.echo.toml"),
            (&dir, "cluster.toml"),
            (&stray, "apps/notanapp.toml"),
            (&empty, "apps/demo.echo.toml"),
        ] {
            let text = format!("dev = {dev}\n{}{APP_TOML}", base_config(d));
            let name = format!("{}-{dev}", d.file_name().unwrap().to_str().unwrap());
            expect_refused(home.path(), &name, &text, file);
        }
    }
    let text = format!("{}{APP_TOML}", base_config(Path::new("/etc/hostname")));
    expect_refused(home.path(), "keyring_is_a_file", &text, "/etc/hostname");
}

// =============================================================================================
// Ports in use.

/// TUNING.md `listen.takeover`: "Without it the router probes each address ... and fails to
/// start when one is taken": the TLS api and the external listener too (api, internal and
/// admin are in tests/lifecycle.rs).
#[test]
fn port_in_use_tls_api_and_external_fail_clearly() {
    let (home, keys) = home_with_keys("probe-taken");
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().unwrap().to_string();
    let base = base_config(&keys);
    let tls = format!(
        "dev = true\n{}{APP_TOML}",
        base.replace("[tuning]", &format!("api_tls = \"{taken}\"\n[tuning]"))
    );
    let fed = format!(
        "dev = true\n{}{APP_TOML}[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"other\"\nrouters = [\"127.0.0.1:9\"]\nkeys = {:?}\n",
        base.replace("[tuning]", &format!("external = \"{taken}\"\n[tuning]")),
        keys.to_str().unwrap()
    );
    for (name, text) in [("api_tls", tls), ("external", fed)] {
        let t = Instant::now();
        let line = expect_refused(home.path(), name, &text, &taken);
        assert!(line.to_lowercase().contains("in use"), "{name}: {line}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            t.elapsed()
        );
    }
    drop(holder);
}

// =============================================================================================
// Admin endpoints.

/// FEDERATION.md "Readiness and drain": `/readyz` answers "`200 ready`, or `503 not ready:
/// <why>` (for example `app demo/echo: 0 of 16 partitions have a live task`)"; `fedbus_ready`
/// says the same; `/healthz` 200 while the process lives; anything else is not an endpoint.
#[test]
fn admin_endpoints_answer_as_documented() {
    let r = Router::new().apps(&[(APP, 16)]).start();
    let (st, _, body) = try_get(r.admin, "/readyz").expect("readyz");
    assert_eq!(st, 503, "{body}");
    assert!(
        body.starts_with("not ready: ")
            && body.contains("app demo/echo: 0 of 16 partitions have a live task"),
        "{body:?}"
    );
    assert_eq!(r.metrics().get("fedbus_ready"), 0.0);
    let (st, _, _) = try_get(r.admin, "/healthz").expect("healthz");
    assert_eq!(st, 200);
    let (st, head, _) = try_get(r.admin, "/metrics").expect("metrics");
    assert_eq!(st, 200);
    assert!(
        head.to_lowercase().contains("content-type: text/plain"),
        "{head}"
    );
    let (st, _, _) = try_get(r.admin, "/nope").expect("unknown path");
    assert_eq!(st, 404);
    // As an operator's scraper expects: a query is ignored, HEAD has no body (RFC 9110 9.3.2),
    // another method is 405 with Allow.
    let (st, _, body) = try_get(r.admin, "/metrics?collect=all").expect("metrics with a query");
    assert_eq!(st, 200);
    assert!(body.contains("fedbus_ready"), "{body:?}");
    let (st, head, body) = try_method(r.admin, "HEAD", "/metrics").expect("HEAD");
    assert_eq!((st, body.as_str()), (200, ""), "{head}");
    assert!(head.to_lowercase().contains("content-length: "), "{head}");
    let (st, head, _) = try_method(r.admin, "POST", "/metrics").expect("POST");
    assert_eq!(st, 405, "{head}");
    assert!(head.to_lowercase().contains("allow: get, head"), "{head}");
    let _t = r.task().partitions("0-7").start();
    let (st, _, body) = try_get(r.admin, "/readyz").expect("readyz");
    assert_eq!(st, 503, "half the partitions: {body}");
    assert!(body.contains("8 of 16"), "{body:?}");
    let _t2 = r.task().partitions("8-15").start();
    wait_until(
        "readyz 200 with every partition",
        Duration::from_secs(5),
        || {
            (try_get(r.admin, "/readyz").map(|x| (x.0, x.2)) == Some((200, "ready\n".into())))
                .then_some(())
        },
    );
    assert_eq!(r.metrics().get("fedbus_ready"), 1.0);
}

/// Every `fedbus_*` metric named in README.md and docs/*.md is in `/metrics`, with `# HELP`
/// and `# TYPE` lines.
#[test]
fn admin_every_documented_metric_is_exported_with_help_and_type() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut docs = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).expect("docs dir") {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    let crates = [
        "fedbus_auth",
        "fedbus_proto",
        "fedbus_router",
        "fedbus_sdk",
        "fedbus_testkit",
        "fedbus_loadgen",
    ];
    let mut names = std::collections::BTreeMap::<String, String>::new();
    for d in &docs {
        let text = std::fs::read_to_string(d).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("fedbus_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..end].trim_end_matches('_');
            let after = &tail[end..];
            let word_start = i == 0
                || !rest[..i]
                    .ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if word_start && !crates.contains(&name) && !after.starts_with("::") {
                names
                    .entry(name.to_string())
                    .or_insert_with(|| d.file_name().unwrap().to_string_lossy().into_owned());
            }
            rest = &tail[end.max(1)..];
        }
    }
    assert!(names.len() > 30, "found only {names:?}");
    let r = Router::new().start();
    let text = r.metrics_text();
    let missing: Vec<String> = names
        .iter()
        .filter(|(n, _)| {
            !(text.contains(&format!("# HELP {n} ")) && text.contains(&format!("# TYPE {n} ")))
        })
        .map(|(n, d)| format!("{n} (in {d})"))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}"
    );
}

/// TUNING.md `listen.admin_enabled`: "serve the admin listener": false binds nothing (the
/// configured address stays free) and the ready line's `admin` is null.
#[test]
fn admin_disabled_binds_no_admin_listener() {
    let (home, keys) = home_with_keys("probe-admin-off");
    let a = "127.0.0.182:18700";
    let text = base_config(&keys).replace(
        "admin = \"127.0.0.1:0\"",
        &format!("admin = \"{a}\"\nadmin_enabled = false"),
    ) + APP_TOML;
    let mut fb = Fb::start(home.path(), "admin_off", &text, &[]);
    let ready = fb.ready();
    assert!(ready["admin"].is_null(), "{ready}");
    let l = TcpListener::bind(a).expect("the admin address is free while admin_enabled = false");
    drop(l);
    fb.term_and_expect_0(Duration::from_secs(10));
}

/// TUNING.md `listen.admin_max_connections`: a connection over the limit takes the slot of the
/// oldest one still waiting for its request head, which is closed at once and counted in
/// `fedbus_admin_connections_evicted_total`; a slow client alone "must send its request head
/// within 2 s of the accept", so it holds its slot for at most that long.
#[test]
fn admin_max_connections_evicts_idle_slots_and_frees_slow_ones() {
    let r = Router::new().listen("admin_max_connections", 1).start();
    let mut idle = TcpStream::connect(r.admin).expect("connect");
    // A scrape while the idle one holds the only slot: served, the idle one closed.
    let m = wait_until(
        "a scrape beside an idle connection",
        Duration::from_secs(3),
        || try_get(r.admin, "/metrics").filter(|x| x.0 == 200),
    );
    let evicted = Metrics::parse(&m.2).get("fedbus_admin_connections_evicted_total");
    assert!(evicted >= 1.0, "no eviction counted: {evicted}");
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 64];
    let n = idle.read(&mut b);
    assert!(matches!(n, Ok(0) | Err(_)), "idle admin connection: {n:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the idle connection was closed only after {:?}",
        t.elapsed()
    );
    // A slow client alone is closed by the router within 2 s of its accept (plus slack). The
    // scrape's thread gives its slot back just after its answer is read: a connection that
    // comes before that is refused at once (counted), and the next one is tried.
    let mut refused_first = 0.0;
    let (n, held) = loop {
        let mut slow = TcpStream::connect(r.admin).expect("connect");
        let opened = Instant::now();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = slow.read(&mut b);
        let held = opened.elapsed();
        if held < Duration::from_millis(500) && refused_first < 20.0 {
            refused_first += 1.0;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        break (n, held);
    };
    assert!(
        matches!(n, Ok(0) | Err(_))
            || n.as_ref()
                .is_ok_and(|&n| n > 0 && b.starts_with(b"HTTP/1.1 408")),
        "slow admin connection: {n:?}"
    );
    assert!(
        (Duration::from_millis(1500)..Duration::from_millis(3500)).contains(&held),
        "slow admin connection held its slot {held:?}"
    );
    let m = r.metrics();
    assert_eq!(
        m.get("fedbus_admin_connections_refused_total"),
        refused_first
    );
}

// =============================================================================================
// Signals.

fn pending(r: &Router) -> f64 {
    r.metrics().get("fedbus_pending_requests")
}

/// FEDERATION.md "Readiness and drain": on SIGTERM "The router closes every listener, turns
/// `/readyz` to 503 (`draining`)", requests on connections it holds are served, the answer that
/// leaves a connection with nothing in flight carries `Connection: close`, and once nothing is
/// pending it "exits 0".
#[test]
fn sigterm_drain_readyz_503_inflight_finishes_exit_0() {
    let mut r = Router::new()
        .apps(&[(APP, 16)])
        .tail("[readiness]\ndrain_timeout_ms = 8000\ndrain_peer_hold_ms = 1000")
        .start();
    let _t = r.task().delay_ms(1500).start();
    let tok = r.token(APP, "alice");
    // The task start's probe is still pending at the task: let it be answered first.
    wait_until("the start probe answered", Duration::from_secs(5), || {
        (pending(&r) == 0.0).then_some(())
    });
    let (api, path) = (r.api, r.path(APP, 5));
    let inflight = std::thread::spawn(move || {
        let mut c = Conn::open(api);
        c.request(&Req::post(&path).token(&tok).body(b"in flight"))
    });
    wait_until(
        "the request is pending at the task",
        Duration::from_secs(5),
        || (pending(&r) >= 1.0).then_some(()),
    );
    let t = Instant::now();
    r.sigterm();
    let (st, _, body) = wait_until("readyz 503 draining", Duration::from_secs(3), || {
        try_get(r.admin, "/readyz").filter(|x| x.0 == 503)
    });
    assert!(
        body.contains("draining"),
        "/readyz during a drain: {st} {body:?}"
    );
    assert_eq!(r.metrics().get("fedbus_ready"), 0.0);
    let resp = inflight.join().expect("in-flight client");
    assert_eq!(
        (resp.status, resp.body.as_slice()),
        (200, &b"in flight"[..]),
        "{resp:?}"
    );
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    let st = r
        .wait_exit(Duration::from_secs(8))
        .unwrap_or_else(|| panic!("no exit within drain_timeout_ms:\n{}", r.log()));
    assert!(st.success(), "drain exit {st}\n{}", r.log());
    eprintln!("SIGTERM -> exit 0 in {:?}", t.elapsed());
}

/// ARCHITECTURE.md "Threads": "SIGTERM/SIGINT start a drain ... then exit 0".
#[test]
fn sigint_drains_like_sigterm() {
    let mut r = Router::new().start();
    let _t = r.task().delay_ms(800).start();
    let tok = r.token(APP, "alice");
    wait_until("the start probe answered", Duration::from_secs(5), || {
        (pending(&r) == 0.0).then_some(())
    });
    let (api, path) = (r.api, r.path(APP, 2));
    let inflight = std::thread::spawn(move || {
        Conn::open(api).request(&Req::post(&path).token(&tok).body(b"int"))
    });
    wait_until("pending", Duration::from_secs(5), || {
        (pending(&r) >= 1.0).then_some(())
    });
    signal(seed::pid(&r) as u32, "INT");
    wait_until("fedbus_draining 1", Duration::from_secs(3), || {
        (r.metrics().get("fedbus_draining") == 1.0).then_some(())
    });
    let resp = inflight.join().unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    let st = r
        .wait_exit(Duration::from_secs(10))
        .expect("exit after SIGINT");
    assert!(st.success(), "{st}\n{}", r.log());
}

/// "A second signal exits at once" (FEDERATION.md), even with a request that would hold the
/// drain for 30 s.
#[test]
fn a_second_sigterm_exits_at_once() {
    let mut r = Router::new().start();
    let _t = r.task().delay_ms(20_000).start();
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    c.send(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x").bytes());
    wait_until("pending", Duration::from_secs(5), || {
        (pending(&r) >= 1.0).then_some(())
    });
    r.sigterm();
    wait_until("fedbus_draining 1", Duration::from_secs(3), || {
        (r.metrics().get("fedbus_draining") == 1.0).then_some(())
    });
    let t = Instant::now();
    r.sigterm();
    let st = r.wait_exit(Duration::from_secs(3));
    assert!(
        st.is_some(),
        "still running {:?} after the second SIGTERM",
        t.elapsed()
    );
    eprintln!("second SIGTERM: exit {:?} after {:?}", st, t.elapsed());
}

/// ROTATION.md "Reload": "A config file that does not parse or validate ... is refused: an
/// `error` line `config reload refused; keeping the config in force` and
/// `fedbus_config_reload_failed_total` + 1". A config file that was deleted (an editor's
/// rename gone wrong) must be the same: refused, counted, nothing changes; the file put back
/// then applies.
#[test]
fn sighup_with_a_deleted_config_is_refused_counted_and_kept() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::remove_file(&cfg).unwrap();
    seed::sighup(&r);
    wait_until("reload failure counted", Duration::from_secs(5), || {
        (r.metrics().get("fedbus_config_reload_failed_total") >= 1.0).then_some(())
    });
    assert!(r.log().contains("config reload refused"), "{}", r.log());
    assert_eq!(r.metrics().get("fedbus_apps_generation"), 1.0);
    let resp = r.request(&Req::post(&r.path(APP, 9)).token(&tok).body(b"kept"));
    assert_eq!(resp.status, 200, "{resp:?}");
    std::fs::write(
        &cfg,
        format!("{good}[[apps]]\nname = \"demo/added\"\npartitions = 2\n"),
    )
    .unwrap();
    seed::sighup(&r);
    wait_until("the restored file applies", Duration::from_secs(5), || {
        (r.metrics().get("fedbus_apps_generation") >= 2.0).then_some(())
    });
    assert_eq!(r.metrics().get("fedbus_config_reload_failed_total"), 1.0);
}

/// Configs that parse but do not validate, one after another on SIGHUP: each refused and
/// counted once, the router serving throughout with its old apps. Includes invalid values in
/// sections that "cannot change live" (`[limits]`): still a refused file, not "needs a restart".
#[test]
fn sighup_with_invalid_values_is_refused_and_counted_each_time() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let cfg = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let bad = [
        good.replace("partitions = 16", "partitions = 0"),
        good.replace("partitions = 16", "partitions = 16\npartitons = 3"),
        good.replace("[limits]", "[limits]\nmax_body_bytes = 0"),
        good.replace("[limits]", "[limits]\nrequest_timeout_ms = 0"),
        good.replace(
            "partitions = 16",
            "partitions = 16\n[apps.cors]\nallowed_origins = []",
        ),
        good.replace("[limits]", "[limits]\nclient_ping_interval_ms = 50"),
    ];
    for (i, text) in bad.iter().enumerate() {
        assert_ne!(text, &good, "case {i} changed nothing");
        std::fs::write(&cfg, text).unwrap();
        seed::sighup(&r);
        let want = (i + 1) as f64;
        wait_until(
            &format!("case {i} refused and counted"),
            Duration::from_secs(5),
            || (r.metrics().get("fedbus_config_reload_failed_total") >= want).then_some(()),
        );
        assert_eq!(
            r.metrics().get("fedbus_config_reload_failed_total"),
            want,
            "case {i} counted more than once:\n{text}"
        );
        let resp = r.request(&Req::post(&r.path(APP, i as u64)).token(&tok).body(b"ok"));
        assert_eq!(resp.status, 200, "case {i}: {resp:?}");
    }
    assert_eq!(r.metrics().get("fedbus_apps_generation"), 1.0);
}

/// ARCHITECTURE.md "Threads": the main thread catches SIGHUP from before it binds the
/// listeners; one during the start, a takeover's wait included, reloads once the router is
/// up. A takeover whose peer never answers waits `readiness.takeover_wait_ms`; SIGHUP during
/// that wait must not kill it.
#[test]
fn sighup_during_a_takeover_wait_is_handled_once_up() {
    let (_home, mut fb) = in_takeover_wait("probe-hup-start", "hup");
    fb.signal("HUP");
    let ready = fb.ready_or_exit(Duration::from_secs(10));
    assert!(
        ready.is_ok(),
        "SIGHUP during the start killed the router: {:?}",
        ready.err()
    );
    fb.term_and_expect_0(Duration::from_secs(10));
}

/// A router started as a takeover whose peer (127.0.0.189:9) never answers, once it is in its
/// `readiness.takeover_wait_ms` wait: dialing, not ready yet.
fn in_takeover_wait(tag: &str, name: &str) -> (TempDir, Fb) {
    let (home, keys) = home_with_keys(tag);
    let text = takeover_config(&keys);
    let fb = Fb::start(home.path(), name, &text, &[]);
    wait_until(
        "dialing its peer (in the takeover wait)",
        Duration::from_secs(5),
        || fb.output().contains("127.0.0.189:9").then_some(()),
    );
    assert!(
        !fb.output().contains("fedbus-ready"),
        "ready before the wait ended"
    );
    (home, fb)
}

fn takeover_config(keys: &Path) -> String {
    format!(
        "dev = true\n{}[readiness]\ntakeover_wait_ms = 3000\npeers = false\n{APP_TOML}[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"other\"\nrouters = [\"127.0.0.189:9\"]\nkeys = {:?}\n",
        base_config(keys).replace(
            "admin = \"127.0.0.1:0\"",
            "admin = \"127.0.0.1:0\"\nexternal = \"127.0.0.1:0\"\ntakeover = true"
        ),
        keys.to_str().unwrap()
    )
}

/// ARCHITECTURE.md "Threads": SIGTERM and SIGINT keep their default action until the router is
/// up: one during the start (here a takeover's wait for its peer links) stops it at once,
/// with nothing to drain yet (SIGHUP then is kept for later: the test above).
#[test]
fn sigterm_during_a_takeover_wait_stops_the_start() {
    let (_home, mut fb) = in_takeover_wait("probe-term-start", "term");
    fb.signal("TERM");
    let st = fb
        .wait_exit(Duration::from_secs(15))
        .expect("exit after SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(15), "exit {st}:\n{}", fb.output());
}

/// An empty config file on SIGHUP (a truncated write) parses and validates: whatever it
/// means for `[[apps]]`, the reload must be handled (logged), not crash, and the router keeps
/// answering. Records what an operator gets.
#[test]
fn sighup_with_an_empty_config_file_is_handled() {
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    std::fs::write(r.home().join("router.toml"), "").unwrap();
    seed::sighup(&r);
    wait_until("the reload logged", Duration::from_secs(5), || {
        (r.log().contains("needs a restart") || r.log().contains("config reload refused"))
            .then_some(())
    });
    let resp = r.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"x"));
    eprintln!(
        "empty config on SIGHUP: apps_generation {} reload_failed {} -> {} {}",
        r.metrics().get("fedbus_apps_generation"),
        r.metrics().get("fedbus_config_reload_failed_total"),
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    // An empty file is a valid config of defaults (TUNING.md: every key has one), whose one
    // app is demo/echo with 16 partitions: the apps in force are unchanged (no new generation),
    // the listeners it would move need a restart, and nothing is refused.
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(r.metrics().get("fedbus_apps_generation"), 1.0);
    assert_eq!(r.metrics().get("fedbus_config_reload_failed_total"), 0.0);
    assert!(r.log().contains("needs a restart"), "{}", r.log());
}

// =============================================================================================
// CLI.

/// README "Commands": `fedbus token client --app A --sub U [--ttl 1h] [--create-app]`: "an app
/// the keyring does not have is refused unless `--create-app`". Bad input: a clear error, a
/// non-zero exit, nothing on stdout, no panic.
#[test]
fn cli_token_bad_inputs_fail_clearly() {
    let (home, keys) = home_with_keys("probe-token");
    let k = keys.to_str().unwrap();
    let h = home.path();
    cli_fails(
        h,
        &[
            "token",
            "client",
            "--app",
            "demo/nope",
            "--sub",
            "a",
            "--keyring",
            k,
        ],
        "demo/nope",
    );
    for ttl in ["0", "1x", "", "99999999999999999d", "1.5h"] {
        cli_fails(
            h,
            &[
                "token",
                "client",
                "--app",
                APP,
                "--sub",
                "a",
                "--ttl",
                ttl,
                "--keyring",
                k,
            ],
            "--ttl",
        );
    }
    for bad in ["noslash", "../../etc/x", "a/b/c", ""] {
        cli_fails(
            h,
            &[
                "token",
                "client",
                "--app",
                bad,
                "--sub",
                "a",
                "--create-app",
                "--keyring",
                k,
            ],
            "app",
        );
    }
    cli_fails(
        h,
        &[
            "token",
            "service",
            "--task-id",
            "t1",
            "--app",
            "demo/nope",
            "--keyring",
            k,
        ],
        "demo/nope",
    );
    cli_fails(
        h,
        &[
            "token",
            "service",
            "--task-id",
            "t1",
            "--app",
            APP,
            "--ttl",
            "1y",
            "--keyring",
            k,
        ],
        "--ttl",
    );
    cli_fails(h, &["token", "client", "--app", APP], "--sub");
    cli_fails(h, &["token", "bogus"], "bogus");
    assert!(
        !keys.join("apps/demo.nope.toml").exists(),
        "a refused app got a secret"
    );
}

/// The same promise when the `--keyring` path is mistyped (a directory that does not exist):
/// the CLI makes a fresh dev keyring there and mints a token for an app it never had, exit 0,
/// with no `--create-app`; `fedbus token service` says it must not: "a mistyped name must not
/// mint a new app".
#[test]
fn cli_token_with_a_missing_keyring_does_not_mint_an_unknown_app() {
    let home = TempDir::new("probe-token-nokr");
    let h = home.path();
    let missing = h.join("typo-keys");
    let m = missing.to_str().unwrap();
    let (st, so, se) = cli(
        Some(h),
        None,
        &[
            "token",
            "client",
            "--app",
            "demo/other",
            "--sub",
            "a",
            "--keyring",
            m,
        ],
    );
    assert!(
        !st.success(),
        "minted a client token for demo/other from a keyring created on the spot: exit {st}, stdout {so:?}, stderr {se:?}"
    );
    let (st, so, se) = cli(
        Some(h),
        None,
        &[
            "token",
            "service",
            "--task-id",
            "t",
            "--app",
            "demo/other",
            "--keyring",
            m,
        ],
    );
    assert!(
        !st.success(),
        "service token: exit {st}, stdout {so:?}, stderr {se:?}"
    );
}

/// `fedbus keys show`: "Show versions and public keys (never secrets)". No keys command prints
/// an app secret or the private cluster key (ROTATION.md: mode 0600, read only by the CLI).
#[test]
fn cli_keys_commands_never_print_secrets() {
    let (home, keys) = home_with_keys("probe-secrets");
    let k = keys.to_str().unwrap();
    let h = home.path();
    let mut outputs = String::new();
    for args in [
        vec!["keys", "show", "--keyring", k],
        vec!["keys", "rotate", "--app", APP, "--keyring", k],
        vec!["keys", "rotate", "--cluster", "--keyring", k],
        vec!["keys", "show", "--keyring", k],
        vec![
            "keys",
            "init",
            "--keyring",
            k,
            "--app",
            APP,
            "--app",
            "demo/second",
        ],
        vec!["keys", "show", "--keyring", k],
    ] {
        let (st, so, se) = cli(Some(h), None, &args);
        assert!(st.success(), "{args:?}: {st} {se}");
        outputs.push_str(&so);
        outputs.push_str(&se);
    }
    let mut secrets = Vec::new();
    for e in std::fs::read_dir(keys.join("apps")).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for l in text.lines().filter(|l| l.starts_with("secret")) {
            secrets.push(l.split('"').nth(1).unwrap().to_string());
        }
    }
    for e in std::fs::read_dir(&keys).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "pk8") {
            // The 32-byte Ed25519 seed follows `04 22 04 20` in PKCS#8 (RFC 8410).
            let b = std::fs::read(&p).unwrap();
            let i = b
                .windows(4)
                .position(|w| w == [0x04, 0x22, 0x04, 0x20])
                .unwrap_or_else(|| panic!("no Ed25519 seed in {}", p.display()));
            let seed = &b[i + 4..i + 36];
            secrets.push(seed.iter().map(|x| format!("{x:02x}")).collect());
            secrets.push(seed[..12].iter().map(|x| format!("{x:02x}")).collect());
        }
    }
    assert!(secrets.len() >= 3, "{secrets:?}");
    for s in &secrets {
        assert!(
            !outputs.contains(s.as_str()),
            "a secret was printed: {s}\n{outputs}"
        );
    }
    assert!(outputs.contains("demo/second"), "{outputs}");
}

/// Bad input to `fedbus keys`: a clear error, non-zero, no panic; `keys show` of a missing
/// keyring does not create one.
#[test]
fn cli_keys_bad_inputs_fail_clearly() {
    let (home, keys) = home_with_keys("probe-keys");
    let k = keys.to_str().unwrap();
    let h = home.path();
    cli_fails(h, &["keys", "rotate", "--keyring", k], "--app");
    cli_fails(
        h,
        &["keys", "rotate", "--app", APP, "--cluster", "--keyring", k],
        "cannot be used",
    );
    cli_fails(
        h,
        &["keys", "rotate", "--app", "noslash", "--keyring", k],
        "noslash",
    );
    let missing = h.join("missing-keys");
    cli_fails(
        h,
        &["keys", "show", "--keyring", missing.to_str().unwrap()],
        "missing-keys",
    );
    assert!(!missing.exists(), "keys show created a keyring");
    cli_fails(
        h,
        &["keys", "init", "--keyring", "/etc/hostname"],
        "/etc/hostname",
    );
    cli_fails(
        h,
        &[
            "keys",
            "cert",
            "--out",
            h.join("x").to_str().unwrap(),
            "--keyring",
            k,
        ],
        "--name",
    );
    cli_fails(
        h,
        &[
            "keys",
            "cert",
            "--name",
            "a.test",
            "--out",
            h.join("x").to_str().unwrap(),
            "--ca",
            keys.join("tls/dev-ca.pem").to_str().unwrap(),
            "--keyring",
            k,
        ],
        "--ca-key",
    );
    cli_fails(
        h,
        &[
            "keys",
            "cert",
            "--name",
            "a.test",
            "--out",
            h.join("no/such/dir/x").to_str().unwrap(),
            "--keyring",
            k,
        ],
        "no/such/dir",
    );
    cli_fails(
        h,
        &[
            "keys",
            "ca",
            "--out",
            h.join("no/such/dir/ca").to_str().unwrap(),
        ],
        "no/such/dir",
    );
    cli_fails(
        h,
        &[
            "keys",
            "cert",
            "--name",
            "a.test",
            "--out",
            h.join("y").to_str().unwrap(),
            "--ca",
            "/etc/hostname",
            "--ca-key",
            "/etc/hostname",
        ],
        "/etc/hostname",
    );
}

/// `fedbus keys rotate --app` of an app the keyring does not have is refused unless
/// `--create-app` (as the token commands: a mistyped name must not mint a new app); the names a
/// token carries are checked as the config checks them (`region/cluster`, a router name), and
/// free-form ones (`--task-id`, `--role`, `--sub`, `keys cert --name`, `--keyring`) may not be
/// empty. Before: each of these exited 0 (the rotate made `demo/nope` at v1).
#[test]
fn cli_typos_and_empty_names_are_refused() {
    let (home, keys) = home_with_keys("probe-names");
    let k = keys.to_str().unwrap();
    let h = home.path();
    cli_fails(
        h,
        &["keys", "rotate", "--app", "demo/nope", "--keyring", k],
        "--create-app",
    );
    assert!(
        !keys.join("apps/demo.nope.toml").exists(),
        "a refused rotate made the app"
    );
    let (st, so, se) = cli(
        Some(h),
        None,
        &[
            "keys",
            "rotate",
            "--app",
            "demo/nope",
            "--create-app",
            "--keyring",
            k,
        ],
    );
    assert!(st.success(), "rotate --create-app: {st} {so} {se}");
    assert!(keys.join("apps/demo.nope.toml").is_file(), "{so} {se}");
    let peer = |router: &str, cluster: &str| {
        vec![
            "token".to_string(),
            "peer".into(),
            "--router".into(),
            router.into(),
            "--cluster".into(),
            cluster.into(),
            "--keyring".into(),
            k.into(),
        ]
    };
    for (router, cluster, needle) in [
        ("r1", "nocluster", "--cluster"),
        ("r1", "a/b/c", "--cluster"),
        ("r1", "/dev", "--cluster"),
        ("r1", "local/", "--cluster"),
        ("r1", "", "--cluster"),
        ("", "local/dev", "--router"),
        ("r 1", "local/dev", "--router"),
    ] {
        let args = peer(router, cluster);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_fails(h, &args, needle);
    }
    let service = |task: &str, cluster: &str, role: Option<&str>| {
        let mut v: Vec<String> = [
            "token",
            "service",
            "--task-id",
            task,
            "--app",
            APP,
            "--cluster",
            cluster,
            "--keyring",
            k,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(r) = role {
            v.extend(["--role".to_string(), r.to_string()]);
        }
        v
    };
    for (task, cluster, role, needle) in [
        ("", "local/dev", None, "--task-id"),
        ("a b", "local/dev", None, "--task-id"),
        ("t1", "bad", None, "--cluster"),
        ("t1", "local/dev", Some(""), "--role"),
        ("t1", "local/dev", Some(&"r".repeat(65)), "--role"),
    ] {
        let args = service(task, cluster, role);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_fails(h, &args, needle);
    }
    // What the checks let through still works.
    let args = service("echo-1", "local/dev", Some("auth"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, so, se) = cli(Some(h), None, &args);
    assert!(st.success() && so.starts_with("fbs1."), "{st} {so} {se}");
    let args = peer("r-1_a", "eu-1/c_2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, so, se) = cli(Some(h), None, &args);
    assert!(st.success() && so.starts_with("fbs1."), "{st} {so} {se}");
    cli_fails(
        h,
        &["token", "client", "--app", APP, "--sub", "", "--keyring", k],
        "--sub",
    );
    cli_fails(
        h,
        &[
            "keys",
            "cert",
            "--name",
            "",
            "--out",
            h.join("c").to_str().unwrap(),
            "--keyring",
            k,
        ],
        "--name",
    );
    assert!(!h.join("c.pem").exists(), "a refused cert was written");
    cli_fails(h, &["keys", "show", "--keyring", ""], "--keyring");
    cli_fails(
        h,
        &[
            "token",
            "client",
            "--app",
            APP,
            "--sub",
            "a",
            "--keyring",
            "",
        ],
        "--keyring",
    );
}

/// An error names its cause once: `{:#}` printed an I/O error as both the message and its
/// source ("File exists (os error 17): File exists (os error 17)").
#[test]
fn cli_io_errors_are_not_repeated() {
    let home = TempDir::new("probe-io-once");
    let h = home.path();
    let file = h.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under = file.join("keys");
    for args in [
        vec!["keys", "init", "--keyring", file.to_str().unwrap()],
        vec!["keys", "init", "--keyring", under.to_str().unwrap()],
        vec!["keys", "show", "--keyring", under.to_str().unwrap()],
    ] {
        let se = cli_fails(h, &args, "fedbus: error:");
        let os = se.matches("(os error").count();
        assert!(os <= 1, "{args:?}: the cause is repeated: {se:?}");
    }
}

/// A router with `dev = false` and an app of `[[apps]]` the keyring has no secret for starts
/// (its tasks and anonymous services work) but says so: every client token of the app is
/// refused 401 `unknown_app`. Before, it logged nothing.
#[test]
fn an_app_without_a_secret_is_logged_at_start_and_on_reload() {
    let (home, keys) = home_with_keys("probe-nosecret");
    let text = format!(
        "dev = false\n{}{APP_TOML}[[apps]]\nname = \"demo/nosecret\"\npartitions = 4\n",
        base_config(&keys)
    );
    let mut fb = Fb::start(home.path(), "nosecret", &text, &[]);
    fb.ready();
    let warned = |out: &str, app: &str| {
        out.lines()
            .filter(|l| l.contains("WARN") && l.contains("no secret") && l.contains(app))
            .count()
    };
    let out = fb.output();
    assert_eq!(warned(&out, "demo/nosecret"), 1, "{out}");
    assert_eq!(warned(&out, APP), 0, "{out}");
    // A reload that adds another app without a secret names it.
    let more = format!("{text}[[apps]]\nname = \"demo/third\"\npartitions = 4\n");
    std::fs::write(home.path().join("nosecret.toml"), more).unwrap();
    fb.signal("HUP");
    wait_until("a warning for demo/third", Duration::from_secs(10), || {
        (warned(&fb.output(), "demo/third") >= 1).then_some(())
    });
    fb.term_and_expect_0(Duration::from_secs(10));
}

/// README: the keyring is "`./.fedbus/keys`, or `$FEDBUS_HOME/keys`". Unset: the current
/// directory; a FEDBUS_HOME that is a file: a clear error; a config without `keyring` uses
/// `$FEDBUS_HOME/keys` (ROTATION.md "Config": `keyring` default).
#[test]
fn cli_fedbus_home_variants() {
    let tmp = TempDir::new("probe-home");
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let (st, _, se) = cli(None, Some(&cwd), &["keys", "init"]);
    assert!(st.success(), "{se}");
    assert!(
        cwd.join(".fedbus/keys/cluster.toml").is_file(),
        "FEDBUS_HOME unset: not ./.fedbus/keys"
    );
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (st, so, se) = cli(
        Some(&file),
        Some(&cwd),
        &["token", "client", "--app", APP, "--sub", "a"],
    );
    assert_no_panic(&se);
    assert!(
        !st.success() && so.is_empty(),
        "FEDBUS_HOME a file: {st} {so:?}"
    );
    assert!(se.contains("a-file"), "{se}");
    // A config without `keyring`: $FEDBUS_HOME/keys.
    let home = tmp.path().join("home");
    keys_init(tmp.path(), &home.join("keys"), &[APP]);
    let text = base_config(Path::new("UNUSED")).replace("keyring = \"UNUSED\"\n", "") + APP_TOML;
    let mut fb = Fb::start(&home, "nokeyring", &text, &[]);
    fb.ready();
    let want = format!("keyring   {}", home.join("keys").display());
    assert!(
        fb.output().contains(&want),
        "{want:?} not in:\n{}",
        fb.output()
    );
    fb.term_and_expect_0(Duration::from_secs(10));
}

/// TUNING.md: `fedbus tune` "prints one line per check, `ok`, `WARN` (advice) or `FAIL` ...
/// with the fix under each failed line"; a bad config is an error naming it.
#[test]
fn cli_tune_output_as_documented() {
    let (home, keys) = home_with_keys("probe-tune");
    let h = home.path();
    let cfg = h.join("ok.toml");
    std::fs::write(&cfg, base_config(&keys) + APP_TOML).unwrap();
    let (st, so, se) = cli(Some(h), None, &["tune", "--config", cfg.to_str().unwrap()]);
    assert_no_panic(&se);
    let mut lines = so.lines();
    assert!(
        lines.next().is_some_and(|l| l.starts_with("fedbus tune:")),
        "{so}"
    );
    let mut prev_level = "";
    let mut checks = 0;
    for l in lines {
        if let Some(fix) = l.trim_start().strip_prefix("fix: ") {
            assert!(
                matches!(prev_level, "WARN" | "FAIL"),
                "a fix under an ok line: {fix}\n{so}"
            );
            continue;
        }
        let level = l.split_whitespace().next().unwrap_or("");
        assert!(matches!(level, "ok" | "WARN" | "FAIL"), "line {l:?}\n{so}");
        prev_level = level;
        checks += 1;
    }
    assert!(checks >= 5, "{so}");
    assert_eq!(
        st.success(),
        !so.lines().any(|l| l.starts_with("FAIL")),
        "exit {st}\n{so}"
    );
    for (name, text, needle) in [
        (
            "core99",
            (base_config(&keys) + APP_TOML).replace("shard_cores = [0]", "shard_cores = [99]"),
            "tuning.shard_cores",
        ),
        ("syntax", base_config(&keys) + "x = = 1\n", "syntax.toml"),
    ] {
        let p = h.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        cli_fails(h, &["tune", "--config", p.to_str().unwrap()], needle);
    }
    cli_fails(
        h,
        &["tune", "--config", h.join("missing.toml").to_str().unwrap()],
        "missing.toml",
    );
}

/// `fedbus bench` with bad flags fails fast and clearly (against a target, so nothing is
/// spawned).
#[test]
fn cli_bench_bad_flags_fail_fast() {
    let home = TempDir::new("probe-bench");
    let h = home.path();
    let t = [
        "--target",
        "http://127.0.0.1:1",
        "--duration",
        "1s",
        "--warmup",
        "0s",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--connections", "0"], "--connections"),
        (vec!["--inflight", "0"], "--inflight"),
        (vec!["--rate", "0"], "--rate"),
        (vec!["--size", "garbage"], "--size"),
        (vec!["--size", "99999MiB"], "--size"),
        (vec!["--protocol", "bogus"], "--protocol"),
        (vec!["--wsids", "0"], "--wsids"),
        (vec!["--app", "noslash"], "noslash"),
        (vec!["--duration", "0s"], "--duration"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["bench"];
        args.extend(t);
        args.extend(extra.iter().copied());
        let start = Instant::now();
        let (st, _so, se) = cli(Some(h), None, &args);
        assert_no_panic(&se);
        assert!(!st.success(), "{extra:?}: exit {st}");
        assert!(se.contains(needle), "{extra:?}: {se}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{extra:?}: {:?}",
            start.elapsed()
        );
    }
    for target in ["notaurl", "ftp://x:1"] {
        let (st, _, se) = cli(
            Some(h),
            None,
            &["bench", "--target", target, "--duration", "1s"],
        );
        assert!(!st.success() && se.contains(target), "{target}: {st} {se}");
    }
}

/// `fedbus run` with bad flags or a config path that is not a file.
#[test]
fn cli_run_bad_flags_and_paths() {
    let home = TempDir::new("probe-run-flags");
    let h = home.path();
    cli_fails(h, &["run", "--confg", "x.toml"], "--confg");
    cli_fails(h, &["run", "--config"], "--config");
    cli_fails(
        h,
        &["run", "--config", h.to_str().unwrap()],
        h.to_str().unwrap(),
    );
    cli_fails(h, &["run", "--config", "/dev/null/x"], "/dev/null/x");
}

/// `fedbus task` checks its names as the router would at registration, naming the flag, before
/// it dials anything: `--app` owner/app, `--role` and `--redirect-to` 1 to 64 bytes without
/// control characters. Before, `--role ""` or `--app demo-echo` dialed and was refused 1008 by
/// every router, retry after retry.
#[test]
fn task_names_are_checked_before_dialing() {
    let (home, keys) = home_with_keys("probe-task-names");
    let k = keys.to_str().unwrap();
    let h = home.path();
    let long = "r".repeat(65);
    for (flag, value, needle) in [
        ("--role", "", "--role"),
        ("--role", long.as_str(), "--role"),
        ("--role", "a\u{7}b", "--role"),
        ("--app", "demo-echo", "--app"),
        ("--app", "demo/", "--app"),
        ("--redirect-to", "", "--redirect-to"),
    ] {
        cli_fails(
            h,
            &[
                "task",
                "echo",
                flag,
                value,
                "--router",
                "127.0.0.1:9",
                "--keyring",
                k,
            ],
            needle,
        );
    }
}
