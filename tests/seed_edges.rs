//! Adversarial probes of the seed rules and keys (a helper wrote them from the documents only;
//! 4 failed on 618df4e: a Redirect's PARTITION `+5` and a JWT `kid` of `+1` were read as
//! numbers, an `/api/ws` token inside the `exp` leeway was refused on its first request, and
//! EMERGENCY.md promised 503 where the code gives 502):
//! docs/REDIRECT.md, docs/EMERGENCY.md, docs/ROTATION.md, docs/PROTOCOL.md sections 2, 6 and 7
//! and the docs/TUNING.md entries they point to. Each test checks one documented promise or one
//! hostile / edge input, on a real router, bounded in time (every read has a timeout).
//!
//! `cargo test --release -p fedbus --test integration seed_edges::`

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use fedbus_auth::{sign_client_jwt, sign_service_token, ClientClaims, Keyring, ServiceClaims};
use fedbus_proto::{encode_frame, flags, put_meta, tag, Frame, Kind};
use fedbus_router::route;
use fedbus_router::ws::frame::opcode;
use fedbus_testkit::fed::{upgrade_refusal, ws_upgrade};
use fedbus_testkit::seed;
use fedbus_testkit::ws::{self, Msg};
use fedbus_testkit::*;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

// =============================================================================================
// Helpers.
// =============================================================================================

fn now() -> u64 {
    fedbus_auth::now_unix()
}

/// A service token for `app` signed by the router's newest cluster key, with every claim
/// chosen by the test.
fn svc_token(r: &Router, app: &str, role: Option<&str>, sub: &str, iat: u64, exp: u64) -> String {
    svc_token_cluster(r, app, role, sub, iat, exp, "local/dev")
}

fn svc_token_cluster(
    r: &Router,
    app: &str,
    role: Option<&str>,
    sub: &str,
    iat: u64,
    exp: u64,
    cluster: &str,
) -> String {
    let (kid, pair) = Keyring::cluster_signing_key(&r.keys).expect("cluster signing key");
    sign_service_token(
        &pair,
        &ServiceClaims {
            kid,
            sub: sub.into(),
            app: app.into(),
            cluster: cluster.into(),
            iat,
            exp,
            role: role.map(str::to_string),
        },
    )
}

/// A client JWT with a hand-made header and payload, HMAC-`alg` with `key` (`alg` None: no
/// signature at all, `h.p.`).
fn craft_jwt(
    header: &str,
    payload: &str,
    key: &[u8],
    alg: Option<ring::hmac::Algorithm>,
) -> String {
    let msg = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    match alg {
        Some(a) => {
            let tag = ring::hmac::sign(&ring::hmac::Key::new(a, key), msg.as_bytes());
            format!("{msg}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
        }
        None => format!("{msg}."),
    }
}

/// The newest secret of `app` in the router's keyring.
fn app_secret(r: &Router, app: &str) -> fedbus_auth::AppSecretVersion {
    Keyring::load(&r.keys)
        .expect("keyring")
        .signing_app_secret(app)
        .expect("secret")
        .clone()
}

fn client_jwt(r: &Router, app: &str, claims: &ClientClaims) -> String {
    sign_client_jwt(&app_secret(r, app), claims).expect("sign")
}

fn claims(app: &str, iat: u64, exp: u64, nbf: Option<u64>) -> ClientClaims {
    ClientClaims {
        sub: "alice".into(),
        app: app.into(),
        iat,
        exp,
        nbf,
    }
}

fn metric(r: &Router, series: &str) -> f64 {
    r.metrics().get(series)
}

fn wait_metric_above(r: &Router, series: &str, above: f64, within: Duration) -> bool {
    wait_for(within, || (metric(r, series) > above).then_some(())).is_some()
}

fn log_shows(r: &Router, needle: &str) -> bool {
    wait_for(Duration::from_secs(5), || {
        r.log().contains(needle).then_some(())
    })
    .is_some()
}

/// Sends SIGHUP and waits until it was handled (`fedbus_reloads_total`).
fn sighup_handled(r: &Router) {
    let before = metric(r, "fedbus_reloads_total");
    seed::sighup(r);
    assert!(
        wait_metric_above(r, "fedbus_reloads_total", before, Duration::from_secs(5)),
        "SIGHUP not handled within 5 s\n{}",
        r.log()
    );
}

/// After a change to the keyring: sends SIGHUP and waits until it was handled, and checks
/// that the keyring in force is a newer one than before the change (`gen_before`; the mtime
/// poll may have loaded it first, for a keyring written in the router's last 100 ms).
fn sighup_keys(r: &Router, gen_before: f64) {
    sighup_handled(r);
    let gen = metric(r, "fedbus_keyring_generation");
    assert!(
        gen > gen_before,
        "keyring generation {gen} after SIGHUP, {gen_before} before the change\n{}",
        r.log()
    );
}

fn post(r: &Router, tok: &str, wsid: u64, body: &[u8]) -> Response {
    r.request(&Req::post(&r.path(APP, wsid)).token(tok).body(body))
}

/// Starts `fedbus run --config` on a config made of the standard head and `tail`; expects it
/// to refuse to start. Returns (exit status, stderr+stdout).
fn start_refused(tail: &str) -> (Option<std::process::ExitStatus>, String) {
    let dir = TempDir::new("probe-refused");
    let keys = dir.path().join("keys");
    keys_init(dir.path(), &keys, &[APP]);
    let cfg = format!(
        "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = [0]\npin = false\n{tail}\n",
        keys.to_str().unwrap()
    );
    let path = dir.path().join("router.toml");
    std::fs::write(&path, cfg).expect("write config");
    let out = dir.path().join("out.log");
    let mut child = Command::new(bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .env("FEDBUS_HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap())
        .spawn()
        .expect("spawn fedbus run");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        std::fs::read_to_string(dir.path().join("err.log")).unwrap_or_default(),
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    (status, text)
}

fn assert_refused_start(tail: &str, needle: &str) {
    let (st, text) = start_refused(tail);
    let st = st.unwrap_or_else(|| panic!("router with {tail:?} still running after 10 s:\n{text}"));
    assert!(!st.success(), "router with {tail:?} exited 0:\n{text}");
    assert!(
        !text.contains("fedbus-ready"),
        "router with {tail:?} printed its ready line:\n{text}"
    );
    assert!(
        text.contains(needle),
        "refusal of {tail:?} does not name {needle:?}:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// A task link by hand (PROTOCOL.md sections 3 to 7).

type RawLink = ws::Ws;

/// What a hand-made task link needs beyond the kit's session.
trait Link: Sized {
    fn open(addr: SocketAddr, token: &str) -> Self;
    fn open_path(addr: SocketAddr, path: &str, token: &str) -> Self;
    fn register(
        addr: SocketAddr,
        token: &str,
        task: u64,
        app: &str,
        role: &str,
        parts: &[u32],
    ) -> Result<Self, Option<u16>>;
    fn next_frame(&mut self, within: Duration) -> Option<Frame>;
}

impl Link for RawLink {
    fn open(addr: SocketAddr, token: &str) -> RawLink {
        RawLink::open_path(addr, "/link", token)
    }

    fn open_path(addr: SocketAddr, path: &str, token: &str) -> RawLink {
        let dial = ws::Dial::new(READ_TIMEOUT)
            .write_timeout(Duration::from_secs(10))
            .nodelay();
        ws::open(ws::dial(addr, &dial).expect("connect"), path, Some(token))
    }

    /// Upgrade, hello, register; Ok once `registered` came, Err(close code) when refused.
    fn register(
        addr: SocketAddr,
        token: &str,
        task: u64,
        app: &str,
        role: &str,
        parts: &[u32],
    ) -> Result<RawLink, Option<u16>> {
        let mut l = RawLink::open(addr, token);
        match l.read_msg() {
            Ok(Msg::Text(t)) => {
                let v: serde_json::Value = serde_json::from_slice(&t).expect("hello JSON");
                assert_eq!(v["type"], "hello", "{v}");
            }
            other => panic!("expected the hello, got {other:?}"),
        }
        let reg = serde_json::json!({
            "type": "register", "task": task, "app": app, "role": role, "partitions": parts,
        });
        l.send_frame(opcode::TEXT, reg.to_string().as_bytes());
        loop {
            match l.read_msg() {
                Ok(Msg::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_slice(&t).expect("JSON");
                    assert_eq!(v["type"], "registered", "{v}");
                    return Ok(l);
                }
                Ok(Msg::Close(c, _)) => return Err(c),
                Ok(Msg::Ping(_)) => l.send_frame(opcode::PONG, b""),
                Ok(_) => continue,
                Err(e) => panic!("no answer to the registration: {e}"),
            }
        }
    }

    /// The next binary fedbus frame, answering pings, skipping text; within `within`.
    fn next_frame(&mut self, within: Duration) -> Option<Frame> {
        let deadline = Instant::now() + within;
        self.s
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got = loop {
            if Instant::now() > deadline {
                break None;
            }
            match self.read_msg() {
                Ok(Msg::Binary(b)) => break Some(Frame::decode(Bytes::from(b)).expect("frame")),
                Ok(Msg::Ping(_)) => self.send_frame(opcode::PONG, b""),
                Ok(Msg::Close(c, _)) => panic!("link closed by the router: {c:?}"),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("link: {e}"),
            }
        };
        self.s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        got
    }
}

/// Runs a hand-made task on its own thread until `stop`: `f(Some(frame))` for each Request,
/// `f(None)` every 50 ms; whatever frames `f` returns are sent. Pings are answered. Returns
/// every Request frame seen.
fn serve(
    mut l: RawLink,
    stop: Arc<AtomicBool>,
    mut f: impl FnMut(Option<&Frame>) -> Vec<Vec<u8>> + Send + 'static,
) -> std::thread::JoinHandle<Vec<Frame>> {
    std::thread::spawn(move || {
        l.s.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let out = match l.read_msg() {
                Ok(Msg::Binary(b)) => {
                    let fr = Frame::decode(Bytes::from(b)).expect("a fedbus frame");
                    if fr.header.kind != Kind::Request {
                        continue;
                    }
                    let out = f(Some(&fr));
                    seen.push(fr);
                    out
                }
                Ok(Msg::Ping(_)) => {
                    l.send_frame(opcode::PONG, b"");
                    Vec::new()
                }
                Ok(Msg::Close(c, _)) => panic!("hand-made task closed by the router: {c:?}"),
                Ok(_) => Vec::new(),
                Err(e) if is_timeout(&e) => f(None),
                Err(e) => panic!("hand-made task link: {e}"),
            };
            for o in out {
                l.send_frame(opcode::BINARY, &o);
            }
        }
        seen
    })
}

fn redirect_frame(req: &Frame, role: &[u8], partition: Option<&[u8]>) -> Vec<u8> {
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::ROLE, role);
    if let Some(p) = partition {
        put_meta(&mut meta, tag::PARTITION, p);
    }
    encode_frame(
        Kind::Redirect,
        0,
        req.header.hops,
        req.header.partition,
        req.header.request_id,
        &meta,
        b"",
    )
    .to_vec()
}

fn response_frame(req: &Frame, status: u16, body: &[u8]) -> Vec<u8> {
    let mut meta = BytesMut::new();
    put_meta(&mut meta, tag::STATUS, status.to_string().as_bytes());
    encode_frame(
        Kind::Response,
        0,
        req.header.hops,
        req.header.partition,
        req.header.request_id,
        &meta,
        body,
    )
    .to_vec()
}

/// Registers a hand-made task on shard 0 of a one-shard router and waits for the routing
/// snapshot that holds it.
fn raw_task(r: &Router, task: u64, app: &str, role: &str, parts: &[u32]) -> RawLink {
    let gen = metric(r, "fedbus_routing_generation");
    let tok = svc_token(r, app, None, "probe", now(), now() + 3600);
    let l = RawLink::register(r.internal[0], &tok, task, app, role, parts)
        .unwrap_or_else(|c| panic!("registration refused: {c:?}"));
    assert!(
        wait_metric_above(r, "fedbus_routing_generation", gen, Duration::from_secs(5)),
        "no routing snapshot after the registration"
    );
    l
}

/// A "director" main task: on a Request with hops 0 its payload `role|partition` (partition
/// `-` = absent) says where to redirect; on later hops it answers 200 `p=<partition> hops=<h>`.
fn director(r: &Router) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<Frame>>) {
    let l = raw_task(r, 4242, APP, "main", &(0..16).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let h = serve(l, stop.clone(), |f| {
        let Some(f) = f else { return Vec::new() };
        if f.header.hops == 0 {
            let p = String::from_utf8_lossy(&f.payload).into_owned();
            let (role, part) = p.split_once('|').unwrap_or((p.as_str(), "-"));
            let part = (part != "-").then_some(part.as_bytes());
            vec![redirect_frame(f, role.as_bytes(), part)]
        } else {
            let body = format!("p={} hops={}", f.header.partition, f.header.hops);
            vec![response_frame(f, 200, body.as_bytes())]
        }
    });
    (stop, h)
}

// =============================================================================================
// 1. Redirect (REDIRECT.md, PROTOCOL.md section 6).
// =============================================================================================

/// EMERGENCY.md: "A partition number at or above `partitions` (possible only through a
/// Redirect's PARTITION) is 502 `bad_redirect`, never rerouted." PARTITION exactly 16 of 16.
#[test]
fn redirect_partition_equal_to_partitions_is_502_bad_redirect() {
    let r = Router::new().start();
    let (stop, h) = director(&r);
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 1, b"main|16");
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    resp.assert_error(502, "bad_redirect");
}

/// PROTOCOL.md section 6: "a PARTITION that is not a decimal `u32` ... gives the client
/// `502 bad_redirect`". `+5` has a sign: not a decimal number (wsid and Content-Length refuse
/// the sign for the same reason).
#[test]
fn redirect_partition_with_a_plus_sign_is_502_bad_redirect() {
    let r = Router::new().start();
    let (stop, h) = director(&r);
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 1, b"main|+5");
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    resp.assert_error(502, "bad_redirect");
}

/// PROTOCOL.md section 6: negative, spaced, hex, empty and non-ASCII-digit PARTITION values
/// are all 502 `bad_redirect`, each with `fedbus-hops: 0`, and the connection goes on.
#[test]
fn redirect_partition_malformed_values_are_502_bad_redirect() {
    let r = Router::new().start();
    let (stop, h) = director(&r);
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    for p in ["-1", " 5", "5 ", "0x5", "", "\u{0665}", "1e1", "5.0"] {
        let body = format!("main|{p}");
        let resp = c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(body.as_bytes()));
        assert_eq!(resp.status, 502, "PARTITION {p:?}: {resp:?}");
        resp.assert_error(502, "bad_redirect");
        assert_eq!(resp.header("fedbus-hops"), Some("0"), "{p:?}: {resp:?}");
    }
    // Control: a good PARTITION is followed.
    let resp = c.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"main|9"));
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"p=9 hops=1", "{resp:?}");
    assert_eq!(resp.header("fedbus-partition"), Some("9"), "{resp:?}");
}

/// PROTOCOL.md section 6: a redirect to a role and partition with no live task follows the
/// emergency rule of that role: PARTITION 15 (the last one) to role `cmd`, whose only task
/// serves 0-7, is served by cmd's emergency partition with `fedbus-emergency: 15`.
#[test]
fn redirect_to_last_partition_without_task_uses_target_roles_emergency() {
    let r = Router::new().start();
    let _cmd = r.task().role("cmd").partitions("0-7").start();
    let (stop, h) = director(&r);
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 1, b"cmd|15");
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let e = route::elect_emergency(APP, "cmd", 0, 0..8).unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"cmd|15", "echo of the same payload: {resp:?}");
    assert_eq!(
        resp.header("fedbus-partition"),
        Some(e.to_string().as_str()),
        "{resp:?}"
    );
    assert_eq!(resp.header("fedbus-emergency"), Some("15"), "{resp:?}");
    assert_eq!(resp.header("fedbus-hops"), Some("1"), "{resp:?}");
}

/// REDIRECT.md config: "`0` turns Redirect off: the first one is 508", with
/// `fedbus-hops: max_hops + 1` = 1.
#[test]
fn max_hops_0_makes_the_first_redirect_508() {
    let r = seed::start_with(Router::new(), "[routing]\nmax_hops = 0");
    let _cmd = r.task().role("cmd").start();
    let _main = r.task().redirect_to("cmd").start();
    let tok = r.token(APP, "alice");
    let before = metric(&r, "fedbus_redirects_total");
    let resp = post(&r, &tok, 3, b"x");
    resp.assert_error(508, "redirect_limit");
    assert_eq!(resp.header("fedbus-hops"), Some("1"), "{resp:?}");
    assert_eq!(resp.json()["message"], "more than 0 redirects", "{resp:?}");
    assert_eq!(metric(&r, "fedbus_redirects_total") - before, 1.0);
}

/// REDIRECT.md: "`Config::validate` refuses more than 4 (`proto::MAX_HOPS`)".
#[test]
fn max_hops_5_is_refused_at_start() {
    assert_refused_start("[routing]\nmax_hops = 5", "routing.max_hops");
}

/// REDIRECT.md step 3: a redirect loop main -> main: the task sees the same request 5 times
/// with hops 0..=4 in the header, the same payload and metadata, a fresh request id each time;
/// the 5th Redirect is 508 with `fedbus-hops: 5`; every Redirect is counted.
#[test]
fn a_self_redirect_loop_sees_hops_0_to_4_same_request_then_508() {
    let r = Router::new().start();
    let l = raw_task(&r, 4343, APP, "main", &(0..16).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let h = serve(l, stop.clone(), |f| match f {
        Some(f) => vec![redirect_frame(f, b"main", None)],
        None => Vec::new(),
    });
    let tok = r.token(APP, "alice");
    let before = metric(&r, "fedbus_redirects_total");
    let body = random_bytes(3000, 7);
    let resp = r.request(
        &Req::post(&r.path(APP, 37))
            .token(&tok)
            .header("Content-Type", "text/x-probe")
            .body(&body),
    );
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    resp.assert_error(508, "redirect_limit");
    assert_eq!(resp.header("fedbus-hops"), Some("5"), "{resp:?}");
    assert_eq!(resp.header("fedbus-partition"), Some("5"), "{resp:?}");
    assert_eq!(seen.len(), 5, "requests seen by the task");
    let hops: Vec<u8> = seen.iter().map(|f| f.header.hops).collect();
    assert_eq!(hops, [0, 1, 2, 3, 4]);
    let mut ids: Vec<u64> = seen.iter().map(|f| f.header.request_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "a fresh request id per hop");
    for f in &seen {
        assert_eq!(&f.payload[..], &body[..], "same payload");
        assert_eq!(f.meta, seen[0].meta, "same metadata");
        assert_eq!(f.get_str(tag::CONTENT_TYPE), Some("text/x-probe"));
        assert_eq!(f.get_str(tag::SUBJECT), Some("alice"));
        assert_eq!(f.header.partition, 5);
    }
    assert_eq!(metric(&r, "fedbus_redirects_total") - before, 5.0);
}

/// REDIRECT.md: `routing.max_hops = 2`: two redirects are fine, the third is 508 with
/// `fedbus-hops: 3` and "more than 2 redirects".
#[test]
fn max_hops_2_allows_two_redirects_and_the_third_is_508() {
    let r = seed::start_with(Router::new(), "[routing]\nmax_hops = 2");
    let l = raw_task(&r, 4444, APP, "main", &(0..16).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    // The payload says how many redirects to make.
    let h = serve(l, stop.clone(), |f| {
        let Some(f) = f else { return Vec::new() };
        let n: u8 = String::from_utf8_lossy(&f.payload).parse().unwrap_or(0);
        if f.header.hops < n {
            vec![redirect_frame(f, b"main", None)]
        } else {
            vec![response_frame(
                f,
                200,
                format!("hops={}", f.header.hops).as_bytes(),
            )]
        }
    });
    let tok = r.token(APP, "alice");
    let mut c = r.conn();
    let two = c.request(&Req::post(&r.path(APP, 2)).token(&tok).body(b"2"));
    let three = c.request(&Req::post(&r.path(APP, 2)).token(&tok).body(b"3"));
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(two.status, 200, "{two:?}");
    assert_eq!(two.header("fedbus-hops"), Some("2"), "{two:?}");
    three.assert_error(508, "redirect_limit");
    assert_eq!(three.header("fedbus-hops"), Some("3"), "{three:?}");
    assert_eq!(
        three.json()["message"],
        "more than 2 redirects",
        "{three:?}"
    );
}

/// REDIRECT.md step 5: "All hops share one deadline: `limits.request_timeout_ms` from the
/// first hop". A task that takes 300 ms per redirect, with an 800 ms deadline: 504 after about
/// 800 ms, not after 800 ms per hop.
#[test]
fn redirect_hops_share_one_deadline() {
    let r = Router::new().request_timeout_ms(800).start();
    let l = raw_task(&r, 4545, APP, "main", &(0..16).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let h = serve(l, stop.clone(), |f| match f {
        Some(f) => {
            std::thread::sleep(Duration::from_millis(300));
            vec![redirect_frame(f, b"main", None)]
        }
        None => Vec::new(),
    });
    let tok = r.token(APP, "alice");
    let t = Instant::now();
    let resp = post(&r, &tok, 4, b"slow");
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    resp.assert_error(504, "task_timeout");
    let hops: u32 = resp
        .header("fedbus-hops")
        .unwrap_or("x")
        .parse()
        .expect("hops");
    assert!(hops >= 1, "{resp:?}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1500),
        "504 after {took:?}"
    );
}

/// PROTOCOL.md section 6: router-made errors carry `fedbus-hops` always. A redirect to a role
/// no task serves: 503 `no_live_task`, `retry-after: 1`, `fedbus-hops: 1`.
#[test]
fn redirect_to_a_role_nobody_serves_is_503_with_hops_1() {
    let r = Router::new().start();
    let _main = r.task().redirect_to("ghost").start();
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 42, b"x");
    resp.assert_error(503, "no_live_task");
    assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");
    assert_eq!(resp.header("fedbus-partition"), Some("10"), "{resp:?}");
    assert_eq!(resp.header("fedbus-hops"), Some("1"), "{resp:?}");
    assert_eq!(
        resp.json()["message"],
        "no live task serves demo/echo role ghost partition 10",
        "{resp:?}"
    );
}

/// REDIRECT.md step 3: "if ROLE is empty, answers 502 `bad_redirect`" (hops not taken:
/// `fedbus-hops: 0`).
#[test]
fn redirect_with_an_empty_role_is_502() {
    let r = Router::new().start();
    let (stop, h) = director(&r);
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 6, b"|-");
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    resp.assert_error(502, "bad_redirect");
    assert_eq!(resp.header("fedbus-hops"), Some("0"), "{resp:?}");
    assert_eq!(resp.header("fedbus-partition"), Some("6"), "{resp:?}");
}

// =============================================================================================
// 2. Partitions and the emergency partition (EMERGENCY.md).
// =============================================================================================

fn assert_emergency(resp: &Response, served: u32, asked: u32) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("fedbus-partition"),
        Some(served.to_string().as_str()),
        "{resp:?}"
    );
    assert_eq!(
        resp.header("fedbus-emergency"),
        Some(asked.to_string().as_str()),
        "{resp:?}"
    );
}

fn assert_home(resp: &Response, p: u32) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("fedbus-partition"),
        Some(p.to_string().as_str()),
        "{resp:?}"
    );
    assert_eq!(resp.header("fedbus-emergency"), None, "{resp:?}");
}

/// EMERGENCY.md "Try it": "with seed 0 and partitions 0 to 7 live, running the above printed
/// `fedbus-partition: 7`"; the answer has `fedbus-emergency: 12` and counts in
/// `fedbus_emergency_total`.
#[test]
fn seed_0_with_partitions_0_to_7_live_elects_7() {
    let r = Router::new().start();
    let _t = r.task().partitions("0-7").start();
    let tok = r.token(APP, "alice");
    let before = metric(&r, "fedbus_emergency_total");
    let resp = post(&r, &tok, 12, b"hello");
    assert_emergency(&resp, 7, 12);
    assert_eq!(resp.body, b"hello");
    assert_eq!(route::elect_emergency(APP, "main", 0, 0..8), Some(7));
    assert_eq!(metric(&r, "fedbus_emergency_total") - before, 1.0);
    assert_home(&post(&r, &tok, 3, b"hello"), 3);
}

/// EMERGENCY.md "Try it": a second task for 8-15 makes 12 answer from 12 again; when it dies
/// the emergency partition (7) serves 12 again.
#[test]
fn a_partition_coming_back_serves_home_and_falls_back_when_it_dies() {
    let r = Router::new().start();
    let _a = r.task().partitions("0-7").start();
    let tok = r.token(APP, "alice");
    assert_emergency(&post(&r, &tok, 12, b"1"), 7, 12);
    let mut b = r.task().partitions("8-15").start();
    let home = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"2");
        (resp.header("fedbus-emergency").is_none()).then_some(resp)
    })
    .expect("12 never served at home");
    assert_home(&home, 12);
    b.kill();
    let back = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"3");
        (resp.status == 200 && resp.header("fedbus-emergency").is_some()).then_some(resp)
    })
    .expect("12 never served by the emergency partition after the kill");
    assert_emergency(&back, 7, 12);
}

/// EMERGENCY.md: no partition with a live task: 503 `no_live_task`, `retry-after: 1`,
/// `fedbus-partition: <the partition asked for>`; a task coming back serves again.
#[test]
fn every_task_gone_is_503_for_the_asked_partition_then_recovers() {
    let r = Router::new().start();
    let mut a = r.task().start();
    let tok = r.token(APP, "alice");
    assert_home(&post(&r, &tok, 12, b"1"), 12);
    a.kill();
    let gone = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"2");
        (resp.status == 503).then_some(resp)
    })
    .expect("no 503 within 5 s of the kill");
    gone.assert_error(503, "no_live_task");
    assert_eq!(gone.header("retry-after"), Some("1"), "{gone:?}");
    assert_eq!(gone.header("fedbus-partition"), Some("12"), "{gone:?}");
    assert_eq!(gone.header("fedbus-hops"), Some("0"), "{gone:?}");
    assert_eq!(gone.header("fedbus-emergency"), None, "{gone:?}");
    let _b = r.task().partitions("0-3").start();
    assert_emergency(
        &post(&r, &tok, 12, b"3"),
        route::elect_emergency(APP, "main", 0, 0..4).unwrap(),
        12,
    );
}

/// EMERGENCY.md rule 1: the configured `apps[].emergency_partition`, while it is live, serves
/// (here 3, where the election would say 7).
#[test]
fn the_configured_emergency_partition_serves_while_live() {
    let r = Router::new()
        .apps(&[(APP, 16)])
        .tail("emergency_partition = 3")
        .start();
    let _t = r.task().partitions("0-7").start();
    let tok = r.token(APP, "alice");
    assert_emergency(&post(&r, &tok, 12, b"x"), 3, 12);
}

/// EMERGENCY.md rule 1 before rule 2: the configured emergency partition coming back takes
/// over from the elected one (rule 2, "a partition coming back never moves it", is only for
/// the kept election).
#[test]
fn the_configured_emergency_partition_coming_back_takes_over() {
    let r = Router::new()
        .apps(&[(APP, 16)])
        .tail("emergency_partition = 3")
        .start();
    let _a = r.task().partitions("0-2,4-7").start();
    let tok = r.token(APP, "alice");
    let elected =
        route::elect_emergency(APP, "main", 0, [0, 1, 2, 4, 5, 6, 7].into_iter()).unwrap();
    assert_emergency(&post(&r, &tok, 12, b"x"), elected, 12);
    let _b = r.task().partitions("3").start();
    let moved = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"y");
        (resp.header("fedbus-partition") == Some("3")).then_some(resp)
    });
    assert!(
        moved.is_some(),
        "the configured partition 3 came back but 12 stays on {elected}"
    );
}

/// TUNING.md apps: `emergency_partition`, when set, must be below `partitions`.
#[test]
fn emergency_partition_equal_to_partitions_is_refused_at_start() {
    assert_refused_start(
        "[[apps]]\nname = \"demo/echo\"\npartitions = 16\nemergency_partition = 16",
        "emergency_partition",
    );
}

/// TUNING.md apps: `partitions` must be 1 to 1048576.
#[test]
fn partitions_0_and_1048577_are_refused_at_start() {
    assert_refused_start(
        "[[apps]]\nname = \"demo/echo\"\npartitions = 0",
        "partitions",
    );
    assert_refused_start(
        "[[apps]]\nname = \"demo/echo\"\npartitions = 1048577",
        "partitions",
    );
}

/// EMERGENCY.md / PROTOCOL.md section 5: on an emergency partition the Request frame's
/// `partition` is the emergency partition, flags carry EMERGENCY (0x02), WSID is the client's
/// and no PARTITION entry names the original one.
#[test]
fn an_emergency_request_frame_carries_the_flag_and_the_serving_partition() {
    let r = Router::new().start();
    let l = raw_task(&r, 4646, APP, "main", &[0]);
    let stop = Arc::new(AtomicBool::new(false));
    let h = serve(l, stop.clone(), |f| match f {
        Some(f) => vec![response_frame(f, 200, b"ok")],
        None => Vec::new(),
    });
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 5, b"x");
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_emergency(&resp, 0, 5);
    assert_eq!(seen.len(), 1);
    let f = &seen[0];
    assert_eq!(f.header.partition, 0);
    assert_eq!(
        f.header.flags & flags::EMERGENCY,
        flags::EMERGENCY,
        "{:?}",
        f.header
    );
    assert_eq!(f.header.flags & flags::FORWARDED, 0);
    assert_eq!(f.get_str(tag::WSID), Some("5"));
    assert_eq!(f.get(tag::PARTITION), None);
    assert_eq!(f.get(tag::EMERGENCY_FOR), None);
}

/// EMERGENCY.md: "The same rule applies to every hop of a Redirect": main (all partitions)
/// redirects to `cmd`, whose task serves 0-7: wsid 12 is served by cmd's emergency partition.
#[test]
fn a_redirected_hop_without_partition_uses_the_target_roles_emergency() {
    let r = Router::new().start();
    let _cmd = r.task().role("cmd").partitions("0-7").start();
    let _main = r.task().redirect_to("cmd").start();
    let tok = r.token(APP, "alice");
    let resp = post(&r, &tok, 12, b"hop");
    let e = route::elect_emergency(APP, "cmd", 0, 0..8).unwrap();
    assert_emergency(&resp, e, 12);
    assert_eq!(resp.header("fedbus-hops"), Some("1"), "{resp:?}");
    assert_eq!(resp.body, b"hop");
}

/// EMERGENCY.md "Sick tasks" with `task_eject_after_timeouts = 1`: the first 504 ejects the
/// link (`fedbus_task_ejected_total{reason="timeouts"}`, log line), the next request for its
/// partition is served by the emergency partition at once, and a late answer readmits it
/// (`fedbus_task_readmitted_total`).
#[test]
fn one_timeout_ejects_when_the_knob_is_1_and_a_late_answer_readmits() {
    let r = Router::new()
        .request_timeout_ms(400)
        .limit("task_eject_after_timeouts", 1)
        .start();
    let _fast = r.task().partitions("0-7").start();
    let l = raw_task(&r, 4747, APP, "main", &(8..16).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let answer = Arc::new(AtomicBool::new(false));
    let held: Arc<Mutex<Vec<Frame>>> = Arc::new(Mutex::new(Vec::new()));
    let (ans, hold) = (answer.clone(), held.clone());
    let h = serve(l, stop.clone(), move |f| {
        if ans.load(Ordering::Relaxed) {
            // Late answers for everything held, then answer at once.
            let mut out: Vec<Vec<u8>> = hold
                .lock()
                .unwrap()
                .drain(..)
                .map(|f| response_frame(&f, 200, b"late"))
                .collect();
            if let Some(f) = f {
                out.push(response_frame(f, 200, b"now"));
            }
            out
        } else {
            if let Some(f) = f {
                hold.lock().unwrap().push(f.clone());
            }
            Vec::new()
        }
    });
    let tok = r.token(APP, "alice");
    let first = post(&r, &tok, 12, b"1");
    first.assert_error(504, "task_timeout");
    assert_eq!(first.header("fedbus-partition"), Some("12"), "{first:?}");
    let t = Instant::now();
    let second = post(&r, &tok, 12, b"2");
    assert_emergency(&second, 7, 12);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        metric(&r, "fedbus_task_ejected_total{reason=\"timeouts\"}"),
        1.0,
        "{}",
        r.metrics_text()
    );
    assert!(log_shows(&r, "task link ejected from routing"));
    answer.store(true, Ordering::Relaxed);
    assert!(
        wait_metric_above(
            &r,
            "fedbus_task_readmitted_total",
            0.0,
            Duration::from_secs(5)
        ),
        "late answer did not readmit the link"
    );
    let home = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"3");
        (resp.header("fedbus-emergency").is_none()).then_some(resp)
    })
    .expect("12 not back home");
    assert_home(&home, 12);
    assert_eq!(home.body, b"now");
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
}

// =============================================================================================
// 3. Client JWTs (ROTATION.md "Client JWTs").
// =============================================================================================

/// ROTATION.md: "`auth::verify_client_jwt` accepts only HS256 (checked from the header before
/// a key is chosen)": alg none (unsigned), RS256 and HS512 with the right secret and kid are
/// 401 `bad_token`; the same claims as HS256 pass.
#[test]
fn jwt_algorithms_other_than_hs256_are_401_bad_token() {
    let r = Router::new().start();
    let _t = r.task().start();
    let s = app_secret(&r, APP);
    let n = now();
    let payload = format!(
        r#"{{"sub":"alice","app":"{APP}","iat":{n},"exp":{}}}"#,
        n + 600
    );
    let hdr = |alg: &str| format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{}"}}"#, s.version);
    let bad = [
        ("none", craft_jwt(&hdr("none"), &payload, &s.secret, None)),
        (
            "RS256",
            craft_jwt(
                &hdr("RS256"),
                &payload,
                &s.secret,
                Some(ring::hmac::HMAC_SHA256),
            ),
        ),
        (
            "HS512",
            craft_jwt(
                &hdr("HS512"),
                &payload,
                &s.secret,
                Some(ring::hmac::HMAC_SHA512),
            ),
        ),
        (
            "hs256",
            craft_jwt(
                &hdr("hs256"),
                &payload,
                &s.secret,
                Some(ring::hmac::HMAC_SHA256),
            ),
        ),
    ];
    for (alg, t) in &bad {
        let resp = post(&r, t, 1, b"x");
        assert_eq!(resp.status, 401, "alg {alg}: {resp:?}");
        resp.assert_error(401, "bad_token");
    }
    let good = craft_jwt(
        &hdr("HS256"),
        &payload,
        &s.secret,
        Some(ring::hmac::HMAC_SHA256),
    );
    assert_home(&post(&r, &good, 1, b"x"), 1);
}

/// ROTATION.md: `exp` is checked with 5 s of leeway: exp 2 s ago still passes; 30 s ago is
/// 401 `expired_token`.
#[test]
fn jwt_exp_within_the_leeway_passes_and_beyond_it_is_expired() {
    let r = Router::new().start();
    let _t = r.task().start();
    let n = now();
    let inside = client_jwt(&r, APP, &claims(APP, n - 100, n - 2, None));
    assert_home(&post(&r, &inside, 1, b"x"), 1);
    let outside = client_jwt(&r, APP, &claims(APP, n - 100, n - 30, None));
    post(&r, &outside, 1, b"x").assert_error(401, "expired_token");
}

/// ROTATION.md: `nbf` is checked with 5 s of leeway: nbf 2 s ahead passes; 60 s ahead is 401
/// `not_yet_valid`.
#[test]
fn jwt_nbf_within_the_leeway_passes_and_beyond_it_is_not_yet_valid() {
    let r = Router::new().start();
    let _t = r.task().start();
    let n = now();
    let inside = client_jwt(&r, APP, &claims(APP, n, n + 600, Some(n + 2)));
    assert_home(&post(&r, &inside, 1, b"x"), 1);
    let outside = client_jwt(&r, APP, &claims(APP, n, n + 600, Some(n + 60)));
    post(&r, &outside, 1, b"x").assert_error(401, "not_yet_valid");
}

/// ROTATION.md: "answers 403 `wrong_app` for a good token of another app": a demo/other token
/// (its own secret) and a token signed by demo/echo's secret that claims demo/other.
#[test]
fn jwt_of_another_app_is_403_wrong_app() {
    let r = Router::new().start();
    let _t = r.task().start();
    let other = r.token("demo/other", "alice");
    post(&r, &other, 1, b"x").assert_error(403, "wrong_app");
    let n = now();
    let mixed = client_jwt(&r, APP, &claims("demo/other", n, n + 600, None));
    post(&r, &mixed, 1, b"x").assert_error(403, "wrong_app");
}

/// ROTATION.md: "Tokens are bounded at 8192 bytes": a valid token of exactly 8192 bytes
/// passes, one of 8193 is 401 `bad_token`.
#[test]
fn jwt_of_8192_bytes_passes_and_8193_is_refused() {
    let r = Router::new().start();
    let _t = r.task().start();
    let s = app_secret(&r, APP);
    let n = now();
    let make = |want: usize| -> String {
        for pad in 0..4 {
            let hdr = format!(
                r#"{{"alg":"HS256","typ":"JWT","kid":"{}"{}}}"#,
                s.version,
                " ".repeat(pad)
            );
            for sub_len in 5800..6300 {
                let payload = format!(
                    r#"{{"sub":"{}","app":"{APP}","iat":{n},"exp":{}}}"#,
                    "s".repeat(sub_len),
                    n + 600
                );
                let t = craft_jwt(&hdr, &payload, &s.secret, Some(ring::hmac::HMAC_SHA256));
                if t.len() == want {
                    return t;
                }
            }
        }
        panic!("no token of {want} bytes")
    };
    let at = make(8192);
    let over = make(8193);
    assert_home(&post(&r, &at, 1, b"x"), 1);
    post(&r, &over, 1, b"x").assert_error(401, "bad_token");
}

/// ROTATION.md / PROTOCOL.md section 7: `kid` is "the app secret version as a decimal
/// string". A `kid` of `+1` (a sign, not what any signer writes) is 401 `bad_token`, as `-1`
/// and `abc` are.
#[test]
fn jwt_kid_with_a_plus_sign_is_bad_token() {
    let r = Router::new().start();
    let _t = r.task().start();
    let s = app_secret(&r, APP);
    assert_eq!(s.version, 1);
    let n = now();
    let payload = format!(
        r#"{{"sub":"alice","app":"{APP}","iat":{n},"exp":{}}}"#,
        n + 600
    );
    let plus = craft_jwt(
        r#"{"alg":"HS256","typ":"JWT","kid":"+1"}"#,
        &payload,
        &s.secret,
        Some(ring::hmac::HMAC_SHA256),
    );
    post(&r, &plus, 1, b"x").assert_error(401, "bad_token");
}

/// ROTATION.md, anonymous services: "(With a token, the token is verified as usual.)" A bad
/// token on the anonymous service `auth` is 401, not let through as anonymous.
#[test]
fn a_bad_token_on_an_anonymous_service_is_still_401() {
    let r = Router::new().start();
    let _t = r.task().start();
    let path = format!("/api/local/dev/{APP}/auth/3/sys/login");
    // Without a token: admitted (main redirects it to role auth, which nobody serves here).
    let anon = r.request(&Req::post(&path).body(b"{}"));
    anon.assert_error(503, "no_live_task");
    assert_eq!(anon.header("fedbus-hops"), Some("1"), "{anon:?}");
    let resp = r.request(&Req::post(&path).token("not.a.jwt").body(b"{}"));
    resp.assert_error(401, "bad_token");
}

// =============================================================================================
// 4. Rotation, grace and reload (ROTATION.md).
// =============================================================================================

/// ROTATION.md rotation rule: an old version verifies while `now < created(next) + grace`:
/// exactly at the end of the grace it is 401 `retired_key`; 120 s before it, it still passes.
/// Both apps rotated with chosen `created` times, one SIGHUP.
#[test]
fn an_old_key_version_is_retired_exactly_at_the_grace_end() {
    let r = seed::start_with(Router::new(), "[auth]\ngrace_secs = 3600");
    let _echo = r.task().start();
    let _other = r.task().app("demo/other").partitions("0-3").start();
    let echo_v1 = r.token(APP, "alice");
    let other_v1 = r.token("demo/other", "alice");
    let n = now();
    let gen = metric(&r, "fedbus_keyring_generation");
    assert_eq!(Keyring::rotate_app(&r.keys, APP, n - 3600).unwrap(), 2);
    assert_eq!(
        Keyring::rotate_app(&r.keys, "demo/other", n - 3600 + 120).unwrap(),
        2
    );
    sighup_keys(&r, gen);
    post(&r, &echo_v1, 1, b"x").assert_error(401, "retired_key");
    let other = r.request(
        &Req::post(&r.path("demo/other", 1))
            .token(&other_v1)
            .body(b"o"),
    );
    assert_home(&other, 1);
    // The new version signs and verifies.
    let echo_v2 = seed::fresh_token(&r, APP, "alice");
    assert_eq!(seed::jwt_kid(&echo_v2), "2");
    assert_home(&post(&r, &echo_v2, 1, b"x"), 1);
}

/// ROTATION.md "A broken file is refused as a whole. A keyring that does not load keeps the
/// old keyring (`keyring reload failed` in the log)": the generation stays, tokens still pass;
/// the fixed file loads again.
#[test]
fn a_broken_keyring_file_keeps_the_old_keyring() {
    let r = Router::new().start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let file = r.keys.join("apps/demo.echo.toml");
    let good = std::fs::read(&file).expect("app file");
    let gen = metric(&r, "fedbus_keyring_generation");
    std::fs::write(&file, b"[[versions]]\nversion = \"not a number\"\n").unwrap();
    seed::sighup(&r);
    assert!(log_shows(&r, "keyring reload failed"), "{}", r.log());
    assert_eq!(metric(&r, "fedbus_keyring_generation"), gen);
    assert_home(&post(&r, &tok, 2, b"x"), 2);
    // A fresh connection (no verify cache) too.
    let mut c = r.conn();
    let resp = c.request(&Req::post(&r.path(APP, 3)).token(&tok).body(b"y"));
    assert_home(&resp, 3);
    assert_eq!(metric(&r, "fedbus_config_reload_failed_total"), 1.0);
    // The file as it was: the keys in force, nothing new published.
    std::fs::write(&file, &good).unwrap();
    sighup_handled(&r);
    assert_eq!(metric(&r, "fedbus_keyring_generation"), gen);
    assert_home(&post(&r, &tok, 4, b"z"), 4);
}

/// ROTATION.md "Reload", apps: "a resized app's partitions follow its new size (registered
/// partitions beyond it are ignored ...)". A task registered for 0-15; demo/echo shrunk to 8 by
/// SIGHUP: wsid 12 is partition 4; grown back to 16: wsid 12 is partition 12 again, on the
/// same task, with no restart.
#[test]
fn an_app_shrunk_then_grown_back_by_reload_follows_its_size() {
    let r = Router::new().apps(&[(APP, 16)]).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    assert_home(&post(&r, &tok, 12, b"a"), 12);
    let cfg = r.home().join("router.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(text.matches("partitions = 16").count(), 1, "{text}");
    let resize = |n: u32| {
        let gen = metric(&r, "fedbus_apps_generation");
        std::fs::write(
            &cfg,
            text.replace("partitions = 16", &format!("partitions = {n}")),
        )
        .unwrap();
        seed::sighup(&r);
        assert!(
            wait_metric_above(&r, "fedbus_apps_generation", gen, Duration::from_secs(5)),
            "resize to {n} not applied\n{}",
            r.log()
        );
    };
    resize(8);
    let small = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"b");
        (resp.header("fedbus-partition") == Some("4")).then_some(resp)
    })
    .unwrap_or_else(|| {
        panic!(
            "wsid 12 not on partition 4 of 8: {:?}",
            post(&r, &tok, 12, b"b")
        )
    });
    assert_home(&small, 4);
    resize(16);
    let back = wait_for(Duration::from_secs(5), || {
        let resp = post(&r, &tok, 12, b"c");
        (resp.header("fedbus-partition") == Some("12") || resp.status != 200).then_some(resp)
    })
    .unwrap_or_else(|| panic!("wsid 12 not back on 12: {:?}", post(&r, &tok, 12, b"c")));
    assert_home(&back, 12);
    assert_eq!(
        r.log().matches("task link registered").count(),
        1,
        "the task kept its link"
    );
}

// =============================================================================================
// 5. SecretPush and role `auth` (PROTOCOL.md sections 4 and 7, ROTATION.md).
// =============================================================================================

fn secret_push(l: &mut RawLink, within: Duration) -> Frame {
    let f = l
        .next_frame(within)
        .unwrap_or_else(|| panic!("no SecretPush within {within:?}"));
    assert_eq!(f.header.kind, Kind::SecretPush, "{:?}", f.header);
    f
}

/// PROTOCOL.md section 7: right after `registered` a SecretPush: kind 4, flags 0, hops 0,
/// partition 0, request_id 0, APP, VERSION, payload = the 32 raw secret bytes of the newest
/// version. A reload without change publishes no keyring and pushes nothing (before, every
/// SIGHUP bumped the generation and pushed the same version again); a rotation pushes v2.
#[test]
fn secret_push_bytes_then_again_on_reload_then_the_rotated_version() {
    let r = Router::new().start();
    let tok = svc_token(&r, APP, Some("auth"), "auth-probe", now(), now() + 3600);
    let mut l = RawLink::register(r.internal[0], &tok, 5151, APP, "auth", &[0, 1, 2])
        .unwrap_or_else(|c| panic!("auth registration refused: {c:?}"));
    let f = secret_push(&mut l, Duration::from_secs(3));
    let v1 = app_secret(&r, APP);
    assert_eq!(
        (
            f.header.flags,
            f.header.hops,
            f.header.partition,
            f.header.request_id
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(f.get_str(tag::APP), Some(APP));
    assert_eq!(f.get_str(tag::VERSION), Some("1"));
    assert_eq!(f.payload.len(), 32);
    assert_eq!(&f.payload[..], &v1.secret[..]);
    // SIGHUP with nothing changed: the same keyring, no new generation, no push (the pusher
    // looks every 100 ms: 500 ms shows none came).
    let gen = metric(&r, "fedbus_keyring_generation");
    sighup_handled(&r);
    assert_eq!(metric(&r, "fedbus_keyring_generation"), gen);
    if let Some(f) = l.next_frame(Duration::from_millis(500)) {
        panic!("pushed again with no change: {:?}", f.header);
    }
    // Rotation + SIGHUP: v2 within about 100 ms of the reload.
    let gen = metric(&r, "fedbus_keyring_generation");
    assert_eq!(Keyring::rotate_app(&r.keys, APP, now()).unwrap(), 2);
    sighup_keys(&r, gen);
    let t = Instant::now();
    let mut got = secret_push(&mut l, Duration::from_secs(3));
    // The file poll may have reloaded once more in between: skip repeats of v1.
    while got.get_str(tag::VERSION) == Some("1") {
        got = secret_push(&mut l, Duration::from_secs(3));
    }
    assert_eq!(got.get_str(tag::VERSION), Some("2"));
    assert_eq!(&got.payload[..], &app_secret(&r, APP).secret[..]);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "v2 pushed after {:?}",
        t.elapsed()
    );
    assert!(log_shows(&r, "app secret pushed to auth task"));
}

/// PROTOCOL.md section 4 / ROTATION.md: role `auth` needs a service token naming it; a token
/// without a role registering `auth` is closed 1008 and counted
/// (`fedbus_task_link_refused_total{reason="register_refused"}`).
#[test]
fn role_auth_without_a_token_naming_it_is_1008() {
    let r = Router::new().start();
    let tok = svc_token(&r, APP, None, "sneaky", now(), now() + 3600);
    let before = metric(
        &r,
        "fedbus_task_link_refused_total{reason=\"register_refused\"}",
    );
    let got = RawLink::register(r.internal[0], &tok, 5252, APP, "auth", &[0]);
    assert!(matches!(got, Err(Some(1008))), "{:?}", got.as_ref().err());
    assert!(wait_metric_above(
        &r,
        "fedbus_task_link_refused_total{reason=\"register_refused\"}",
        before,
        Duration::from_secs(3)
    ));
    assert!(log_shows(
        &r,
        "role auth needs a service token with role auth"
    ));
}

/// PROTOCOL.md section 2: `role` is "the only role this token may register": a token for role
/// `cmd` registering `main` is closed 1008; a token for `auth` registering `main` too.
#[test]
fn a_token_for_one_role_cannot_register_another() {
    let r = Router::new().start();
    let cmd = svc_token(&r, APP, Some("cmd"), "t", now(), now() + 3600);
    let got = RawLink::register(r.internal[0], &cmd, 5353, APP, "main", &[0]);
    assert!(matches!(got, Err(Some(1008))), "{:?}", got.as_ref().err());
    let auth = svc_token(&r, APP, Some("auth"), "t", now(), now() + 3600);
    let got = RawLink::register(r.internal[0], &auth, 5354, APP, "main", &[0]);
    assert!(matches!(got, Err(Some(1008))), "{:?}", got.as_ref().err());
    let ok = RawLink::register(r.internal[0], &cmd, 5355, APP, "cmd", &[0]);
    assert!(ok.is_ok(), "{:?}", ok.as_ref().err());
}

// =============================================================================================
// 6. Service tokens at the upgrade (PROTOCOL.md section 2).
// =============================================================================================

fn link_upgrade(r: &Router, token: &str) -> (u16, String) {
    let (mut s, status, head, rest) = ws_upgrade(r.internal[0], "/link", Some(token));
    if status == 101 {
        return (101, String::new());
    }
    upgrade_refusal(status, &head, &rest, &mut s)
}

/// PROTOCOL.md section 2: "At most 4096 characters": a valid token of exactly 4096 is accepted,
/// one of 4098 (4097 cannot be base64url of a JSON) is 401 `bad_token`.
#[test]
fn service_token_of_4096_chars_passes_and_longer_is_bad_token() {
    let r = Router::new().start();
    let n = now();
    let make = |want: usize| -> String {
        for sub_len in 2800..3100 {
            let t = svc_token(&r, APP, None, &"s".repeat(sub_len), n, n + 3600);
            if t.len() == want {
                return t;
            }
        }
        panic!("no token of {want} chars")
    };
    let at = make(4096);
    assert_eq!(link_upgrade(&r, &at), (101, String::new()));
    let over = make(4098);
    assert_eq!(link_upgrade(&r, &over), (401, "bad_token".to_string()));
}

/// PROTOCOL.md section 2: `iat` "refused if more than 60 s in the future": 30 s ahead passes,
/// 120 s ahead is 401 `not_yet_valid`.
#[test]
fn service_token_iat_skew_bound_is_60s() {
    let r = Router::new().start();
    let n = now();
    let ok = svc_token(&r, APP, None, "t", n + 30, n + 3600);
    assert_eq!(link_upgrade(&r, &ok), (101, String::new()));
    let ahead = svc_token(&r, APP, None, "t", n + 120, n + 3600);
    assert_eq!(link_upgrade(&r, &ahead), (401, "not_yet_valid".to_string()));
}

/// PROTOCOL.md section 2: `exp` "expires at, unix seconds, exclusive": exp = now is 401
/// `expired_token`.
#[test]
fn service_token_with_exp_now_is_expired() {
    let r = Router::new().start();
    let n = now();
    let t = svc_token(&r, APP, None, "t", n - 10, n);
    assert_eq!(link_upgrade(&r, &t), (401, "expired_token".to_string()));
}

/// PROTOCOL.md section 3: an other-cluster token is 401 `wrong_cluster`.
#[test]
fn service_token_of_another_cluster_is_wrong_cluster() {
    let r = Router::new().start();
    let n = now();
    let t = svc_token_cluster(&r, APP, None, "t", n, n + 3600, "local/elsewhere");
    assert_eq!(link_upgrade(&r, &t), (401, "wrong_cluster".to_string()));
}

// =============================================================================================
// 7. /api/ws credentials (PROTOCOL.md section 8; the header wins over the query).
// =============================================================================================

/// PROTOCOL.md section 8: "the header wins when both are given".
#[test]
fn ws_bearer_header_wins_over_the_access_token_query() {
    let r = Router::new().start();
    let good = r.token(APP, "alice");
    let (_s, st, head, _) = ws_upgrade(r.api, "/api/ws?access_token=garbage", Some(&good));
    assert_eq!(st, 101, "{head}");
    let path = format!("/api/ws?access_token={good}");
    let (mut s, st, head, rest) = ws_upgrade(r.api, &path, Some("garbage"));
    assert_eq!(
        upgrade_refusal(st, &head, &rest, &mut s),
        (401, "bad_token".to_string()),
        "{head}"
    );
}
