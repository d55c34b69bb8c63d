//! Federation at its edges: an adversarial probe written from docs/FEDERATION.md, REDIRECT.md,
//! EMERGENCY.md, PROTOCOL.md (sections 8, 10) and TUNING.md (7 of these failed on the build
//! before: a client's big headers or a body over the other cluster's bound closed a shared
//! peer link; relayed /api/ws answers had hops and partition 0 in their header; peer link
//! floods and expiries were not counted). Each test starts its own federation (two
//! clusters of two routers, on loopback addresses of their own: `fedbus_testkit::fed`).

use fedbus_proto::{encode_frame, flags, put_meta, tag, Frame, Kind};
use fedbus_router::ws::frame as wsf;
use fedbus_testkit::fed::*;
use fedbus_testkit::*;
use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// A child process killed on drop.
struct Kid(Child);
impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fedbus task echo` for `cluster` linked to both of its routers, with extra args.
fn task(f: &Federation, cluster: &str, extra: &[&str]) -> Kid {
    let log = f.root.join(format!(
        "probe-task-{cluster}-{}.log",
        extra.join("_").replace('/', "")
    ));
    let mut cmd = Command::new(bin());
    cmd.args(["task", "echo", "--cluster", &format!("ru/{cluster}")])
        .args(["--keyring", f.keyring(cluster).to_str().unwrap()]);
    for r in 0..2 {
        cmd.args(["--router", &f.router(cluster, r).internal.to_string()]);
    }
    cmd.args(extra);
    let child = cmd
        .env("FEDBUS_HOME", &f.root)
        .env("FEDBUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Kid(child)
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn m(r: &FedRouter, name: &str) -> f64 {
    r.metrics().get(name)
}

/// Waits (bounded) until `cond` holds on a fresh metrics read of `r`.
fn wait_metric(r: &FedRouter, name: &str, within: Duration, cond: impl Fn(f64) -> bool) -> f64 {
    wait_for(within, || {
        let v = m(r, name);
        cond(v).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}: {name} = {} never met the condition",
            r.name,
            m(r, name)
        )
    })
}

fn served_by(r: &Response) -> &str {
    r.header("fedbus-served-by").unwrap_or("")
}

/// A websocket client of `/api/ws`.
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
enum Msg {
    Bin(Frame),
    Close(u16),
    Eof,
}

impl Ws {
    fn open(f: &FedRouter, token: Option<&str>) -> Ws {
        let (s, status, head, rest) = ws_upgrade(f.api, "/api/ws", token);
        assert_eq!(status, 101, "{head}");
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        Ws { s, buf: rest }
    }
    fn send_raw(&mut self, msg: &[u8]) {
        let mut h = [0u8; wsf::MAX_HEADER];
        let n = wsf::encode_head(wsf::opcode::BINARY, msg.len(), Some([0; 4]), &mut h);
        let _ = self.s.write_all(&h[..n]);
        let _ = self.s.write_all(msg);
    }
    fn send(&mut self, id: u64, path: &str, body: &[u8]) {
        self.send_with(id, path, body, &[]);
    }
    fn send_with(&mut self, id: u64, path: &str, body: &[u8], meta: &[(u8, &[u8])]) {
        let mut mm = bytes::BytesMut::new();
        put_meta(&mut mm, tag::PATH, path.as_bytes());
        for (t, v) in meta {
            put_meta(&mut mm, *t, v);
        }
        let fr = encode_frame(Kind::Request, 0, 0, 0, id, &mm, body).to_vec();
        self.send_raw(&fr);
    }
    fn recv(&mut self) -> Msg {
        loop {
            if let Ok(Some(h)) = wsf::parse_head(&self.buf) {
                let total = h.header_len + h.payload_len as usize;
                if self.buf.len() >= total {
                    let p: Vec<u8> = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    match h.opcode {
                        wsf::opcode::BINARY => {
                            return Msg::Bin(Frame::decode(bytes::Bytes::from(p)).expect("frame"))
                        }
                        wsf::opcode::CLOSE => {
                            let code = if p.len() >= 2 {
                                u16::from_be_bytes([p[0], p[1]])
                            } else {
                                1005
                            };
                            return Msg::Close(code);
                        }
                        _ => continue,
                    }
                }
            }
            let mut b = [0u8; 65536];
            match read_retrying(&mut self.s, &mut b) {
                Ok(0) => return Msg::Eof,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) => panic!("ws read: {e}"),
            }
        }
    }
    /// The close code the other side ends with (0: the stream ended without a close frame),
    /// skipping answers.
    fn close_code(&mut self) -> u16 {
        loop {
            match self.recv() {
                Msg::Bin(_) => continue,
                Msg::Close(c) => break c,
                Msg::Eof => break 0,
            }
        }
    }

    fn frame(&mut self) -> Frame {
        match self.recv() {
            Msg::Bin(f) => f,
            other => panic!("expected an answer frame, got {other:?}"),
        }
    }
}

fn hdr(f: &Frame, name: &str) -> Option<String> {
    f.meta_entries()
        .filter(|(t, _)| *t == tag::HEADER)
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
}

fn status(f: &Frame) -> u64 {
    f.get_u64(tag::STATUS).unwrap_or(200)
}

/// A raw peer link from the test to `r`, as a router of `cluster` (token signed by `keyring`).
fn raw_peer(f: &Federation, r: &FedRouter, cluster: &str, keyring: &std::path::Path) -> Ws {
    let (s, status, head, rest) = peer_upgrade(
        r.external,
        Some(&f.peer_token(cluster, keyring, Some("1h"))),
    );
    assert_eq!(status, 101, "{head}");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    Ws { s, buf: rest }
}

/// Sends a Request frame on a raw peer link; reads answers, skipping text (status) messages.
fn peer_req(w: &mut Ws, id: u64, meta: &[(u8, &[u8])], body: &[u8]) -> Frame {
    let mut mm = bytes::BytesMut::new();
    for (t, v) in meta {
        put_meta(&mut mm, *t, v);
    }
    let fr = encode_frame(Kind::Request, flags::FORWARDED, 0, 0, id, &mm, body).to_vec();
    w.send_raw(&fr);
    loop {
        let a = w.frame();
        if a.header.request_id == id {
            return a;
        }
    }
}

/// The metadata of a forwarded request for spb1's `sys/echo` of `wsid`, with a client token.
fn echo_meta<'a>(wsid: &'a [u8], tok: &'a str) -> Vec<(u8, &'a [u8])> {
    vec![
        (tag::CLUSTER, b"ru/spb1"),
        (tag::APP, APP.as_bytes()),
        (tag::SERVICE, b"api"),
        (tag::MODULE, b"sys"),
        (tag::FUNCTION, b"echo"),
        (tag::WSID, wsid),
        (tag::TOKEN, tok.as_bytes()),
    ]
}

/// Waits until spb1's routers each hold exactly `n` peer links per shard.
fn wait_peer_links(f: &Federation, cluster: &str, r: usize, n: f64) {
    wait_metric(
        f.router(cluster, r),
        "fedbus_peer_links",
        Duration::from_secs(8),
        |v| v == n,
    );
}

/// Pending requests at `r` now (a delayed task keeps the harness's own probes pending).
fn pending(r: &FedRouter) -> f64 {
    m(r, "fedbus_pending_requests")
}

/// Waits until the router `r` holds `n` more pending requests than `base`.
fn wait_pending(r: &FedRouter, base: f64, n: f64) {
    wait_metric(r, "fedbus_pending_requests", Duration::from_secs(5), |v| {
        v >= base + n
    });
}

fn send_http(entry: &FedRouter, req: &Req) -> Conn {
    let mut c = entry.conn();
    c.set_read_timeout(Duration::from_secs(8));
    c.send(&req.bytes());
    c
}

/// Rewrites a router's config with `edit` and SIGHUPs it; waits for the federation generation.
fn reload(r: &FedRouter, edit: impl FnOnce(String) -> String) {
    let gen = m(r, "fedbus_federation_generation");
    let failed = m(r, "fedbus_config_reload_failed_total");
    let text = std::fs::read_to_string(r.config_path()).unwrap();
    std::fs::write(r.config_path(), edit(text)).unwrap();
    r.sighup();
    wait_for(Duration::from_secs(8), || {
        (m(r, "fedbus_federation_generation") > gen
            || m(r, "fedbus_config_reload_failed_total") > failed)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{}: no reload seen", r.name));
}

fn without_cluster(text: &str, cluster: &str) -> String {
    let mut parts = text.split("[[federation.clusters]]");
    let mut out = parts.next().unwrap().to_string();
    for p in parts.filter(|p| !p.contains(&format!("cluster = \"{cluster}\""))) {
        out.push_str("[[federation.clusters]]");
        out.push_str(p);
    }
    out
}

// ---------------------------------------------------------------- HTTP forwarding basics

/// FEDERATION.md "Forwarding": relayed answer headers; fedbus_forwarded_total counts.
#[test]
fn p01_http_forward_headers_and_forwarded_counter() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let before = m(e, "fedbus_forwarded_total");
    let r = e.conn().request(&f.req("spb2", 3, b"abc"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"abc");
    assert_eq!(served_by(&r), "ru/spb2/r1", "{r:?}");
    assert_eq!(r.header("fedbus-partition"), Some("3"), "{r:?}");
    assert_eq!(r.header("fedbus-hops"), Some("0"), "{r:?}");
    assert!(r.header("fedbus-shard").is_some(), "{r:?}");
    assert_eq!(r.header("fedbus-emergency"), None, "{r:?}");
    assert_eq!(m(e, "fedbus_forwarded_total"), before + 1.0);
    // Local request: not counted as forwarded, served-by the entry router.
    let r = e.conn().request(&f.req("spb1", 3, b"abc"));
    assert_eq!(served_by(&r), "ru/spb1/r0");
    assert_eq!(m(e, "fedbus_forwarded_total"), before + 1.0);
}

/// A cluster neither ours nor in the federation: 404 unknown_cluster, named by the entry router.
#[test]
fn p02_http_unknown_cluster() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 1);
    for p in [
        format!("/api/ru/spb9/{APP}/api/1/sys/echo"),
        format!("/api/eu/spb2/{APP}/api/1/sys/echo"),
    ] {
        let r = e
            .conn()
            .request(&Req::post(&p).token(f.token("spb2")).body(b"x"));
        r.assert_error(404, "unknown_cluster");
        assert_eq!(served_by(&r), "ru/spb1/r1", "{r:?}");
    }
}

/// The target cluster's bad wsid / path are answered (no hang), documented error codes.
#[test]
fn p03_http_bad_wsid_for_other_cluster() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let r = e.conn().request(
        &Req::post(&format!("/api/ru/spb2/{APP}/api/notanumber/sys/echo"))
            .token(f.token("spb2"))
            .body(b"x"),
    );
    r.assert_error(400, "bad_wsid");
}

// ---------------------------------------------------------------- /api/ws across clusters

/// PROTOCOL.md 8: unknown cluster is 404 unknown_cluster per request; the session goes on.
#[test]
fn p04_ws_unknown_cluster_session_goes_on() {
    let f = Federation::builder().peer_tls(false).start();
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    w.send(1, &format!("/api/ru/spb9/{APP}/api/1/sys/echo"), b"x");
    let a = w.frame();
    assert_eq!((a.header.request_id, status(&a)), (1, 404), "{a:?}");
    assert_eq!(a.get_str(tag::ERROR), Some("unknown_cluster"), "{a:?}");
    w.send(2, &f.path("spb2", 4), b"y");
    let a = w.frame();
    assert_eq!((a.header.request_id, status(&a)), (2, 200), "{a:?}");
    assert_eq!(a.get_str(tag::SERVED_BY), Some("ru/spb2/r0"));
    assert_eq!(hdr(&a, "fedbus-partition").as_deref(), Some("4"));
    assert_eq!(hdr(&a, "fedbus-hops").as_deref(), Some("0"));
}

/// FEDERATION.md: a federated router accepts any token at the upgrade; requests for its own
/// cluster get the per-request 401; for another cluster that cluster's 401.
#[test]
fn p05_ws_garbage_token_accepted_at_upgrade_each_request_refused() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let mut w = Ws::open(e, Some("not.a.jwt"));
    let before = m(e, "fedbus_forwarded_total");
    w.send(1, &f.path("spb1", 4), b"x");
    let a = w.frame();
    assert_eq!(status(&a), 401, "{a:?}");
    w.send(2, &f.path("spb2", 4), b"x");
    let a = w.frame();
    assert_eq!(status(&a), 401, "{a:?}");
    assert!(
        a.get_str(tag::SERVED_BY)
            .is_some_and(|s| s.starts_with("ru/spb2/")),
        "{a:?}"
    );
    assert_eq!(
        m(e, "fedbus_forwarded_total"),
        before + 1.0,
        "ws forward is counted"
    );
}

/// No live link to the target cluster: 503 no_peer with retry-after: 1, on HTTP (JSON body,
/// served-by the entry router) and on /api/ws (ERROR, HEADER retry-after), session goes on.
#[test]
fn p06_no_peer_http_and_ws() {
    let mut f = Federation::builder().peer_tls(false).start();
    f.router_mut("spb2", 0).kill9();
    f.router_mut("spb2", 1).kill9();
    wait_peer_links(&f, "spb1", 0, 1.0);
    let e = f.router("spb1", 0);
    let t = Instant::now();
    let r = e.conn().request(&f.req("spb2", 5, b"x"));
    r.assert_error(503, "no_peer");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert_eq!(served_by(&r), "ru/spb1/r0", "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    let mut w = Ws::open(e, Some(f.token("spb2")));
    w.send(7, &f.path("spb2", 5), b"x");
    let a = w.frame();
    assert_eq!((a.header.request_id, status(&a)), (7, 503), "{a:?}");
    assert_eq!(a.get_str(tag::ERROR), Some("no_peer"), "{a:?}");
    assert_eq!(hdr(&a, "retry-after").as_deref(), Some("1"), "{a:?}");
    let j: serde_json::Value = serde_json::from_slice(&a.payload).expect("json error body");
    assert_eq!(j["error"], "no_peer");
    assert_eq!(j["status"], 503);
    // Session goes on: the entry's own cluster refuses spb2's token with 401.
    w.send(8, &f.path("spb1", 5), b"x");
    let a = w.frame();
    assert_eq!((a.header.request_id, status(&a)), (8, 401), "{a:?}");
}

/// FEDERATION.md "Readiness": with readiness.peers (default) /readyz wants a live peer link
/// to every other cluster; gauge fedbus_ready says the same.
#[test]
fn p07_readyz_without_peers() {
    let mut f = Federation::builder().peer_tls(false).start();
    let (st, _) = f.router("spb1", 0).readyz();
    assert_eq!(st, 200);
    assert_eq!(m(f.router("spb1", 0), "fedbus_ready"), 1.0);
    f.router_mut("spb2", 0).kill9();
    f.router_mut("spb2", 1).kill9();
    wait_peer_links(&f, "spb1", 0, 1.0);
    let (st, body) = f.router("spb1", 0).readyz();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("not ready"), "{body}");
    assert_eq!(m(f.router("spb1", 0), "fedbus_ready"), 0.0);
}

/// A peer link lost with /api/ws requests pending: 502 peer_lost at once; the other router's
/// requests are served; the session goes on and new requests go to the sibling.
#[test]
fn p08_ws_peer_lost_in_flight() {
    let mut f = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb2", 2500)
        .start();
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    let (b0, b1) = (pending(f.router("spb2", 0)), pending(f.router("spb2", 1)));
    w.send(10, &f.path("spb2", 0), b"to-r0");
    w.send(11, &f.path("spb2", 1), b"to-r1");
    wait_pending(f.router("spb2", 0), b0, 1.0);
    wait_pending(f.router("spb2", 1), b1, 1.0);
    let killed = Instant::now();
    f.router_mut("spb2", 0).kill9();
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let a = w.frame();
        let id = a.header.request_id;
        got.insert(id, (a, killed.elapsed()));
    }
    eprintln!("p08 answers: {got:?}");
    let (a, at) = &got[&10];
    assert_eq!(status(a), 502, "{a:?}");
    assert_eq!(a.get_str(tag::ERROR), Some("peer_lost"), "{a:?}");
    assert!(*at < Duration::from_secs(2), "{at:?}");
    let (a, _) = &got[&11];
    assert_eq!(status(a), 200, "{a:?}");
    assert_eq!(&a.payload[..], b"to-r1");
    wait_peer_links(&f, "spb1", 0, 2.0);
    w.send(12, &f.path("spb2", 0), b"again");
    let a = w.frame();
    assert_eq!((a.header.request_id, status(&a)), (12, 200), "{a:?}");
    assert_eq!(a.get_str(tag::SERVED_BY), Some("ru/spb2/r1"));
}

/// A peer cluster that goes away and comes back: 503 no_peer while away, served again after.
#[test]
fn p09_peer_cluster_returns() {
    let mut f = Federation::builder().peer_tls(false).start();
    f.router_mut("spb2", 0).kill9();
    f.router_mut("spb2", 1).kill9();
    wait_peer_links(&f, "spb1", 1, 1.0);
    f.router("spb1", 1)
        .conn()
        .request(&f.req("spb2", 2, b"x"))
        .assert_error(503, "no_peer");
    f.router_mut("spb2", 0).restart();
    let r = wait_for(Duration::from_secs(12), || {
        let r = f
            .router("spb1", 1)
            .conn()
            .request(&f.req("spb2", 2, b"back"));
        (r.status == 200).then_some(r)
    })
    .expect("spb2 served again after its router came back");
    assert_eq!(r.body, b"back");
    assert_eq!(served_by(&r), "ru/spb2/r0");
}

/// A frozen peer router (SIGSTOP): the entry router waits request_timeout_ms + 1 s and answers
/// 504 peer_timeout (HTTP and /api/ws), never hangs.
#[test]
fn p10_frozen_peer_gives_peer_timeout() {
    let f = Federation::builder()
        .peer_tls(false)
        .request_timeout_ms(1000)
        .start();
    let (p0, p1) = (
        f.router("spb2", 0).pid().unwrap(),
        f.router("spb2", 1).pid().unwrap(),
    );
    signal(p0, "-STOP");
    signal(p1, "-STOP");
    let e = f.router("spb1", 0);
    let t = Instant::now();
    let mut c = send_http(e, &f.req("spb2", 0, b"x"));
    let mut w = Ws::open(e, Some(f.token("spb2")));
    w.send(1, &f.path("spb2", 1), b"y");
    let r = c.read_response().expect("an answer");
    let took = t.elapsed();
    let a = w.frame();
    signal(p0, "-CONT");
    signal(p1, "-CONT");
    r.assert_error(504, "peer_timeout");
    assert_eq!(served_by(&r), "ru/spb1/r0");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(status(&a), 504, "{a:?}");
    assert_eq!(a.get_str(tag::ERROR), Some("peer_timeout"), "{a:?}");
}

/// A slow task in the other cluster: the serving router's own timeout answers first.
#[test]
fn p11_slow_task_across_clusters() {
    let f = Federation::builder()
        .peer_tls(false)
        .request_timeout_ms(1000)
        .task_delay_ms("spb2", 4000)
        .start();
    let t = Instant::now();
    let r = f.router("spb1", 0).conn().request(&f.req("spb2", 0, b"x"));
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    eprintln!(
        "slow task across clusters: {} after {took:?}, served-by {}",
        r.json()["error"],
        served_by(&r)
    );
    r.assert_error(504, "task_timeout");
    assert!(served_by(&r).starts_with("ru/spb2/"), "{r:?}");
    assert!(took < Duration::from_millis(1900), "{took:?}");
}

// ---------------------------------------------------------------- redirects and emergency

/// REDIRECT.md across a cluster boundary: spb2's main redirects to cmd; the relayed answer
/// carries fedbus-hops: 1, on HTTP and /api/ws.
#[test]
fn p12_redirect_in_the_serving_cluster_hops_relayed() {
    let mut f = Federation::builder().peer_tls(false).start();
    f.tasks[1].kill();
    let _main = task(&f, "spb2", &["--redirect-to", "cmd"]);
    let _cmd = task(&f, "spb2", &["--role", "cmd"]);
    let e = f.router("spb1", 0);
    let r = wait_for(Duration::from_secs(10), || {
        let r = e.conn().request(&f.req("spb2", 6, b"red"));
        (r.status == 200).then_some(r)
    })
    .expect("served after a redirect");
    assert_eq!(r.body, b"red");
    assert_eq!(r.header("fedbus-hops"), Some("1"), "{r:?}");
    assert_eq!(r.header("fedbus-partition"), Some("6"), "{r:?}");
    assert!(served_by(&r).starts_with("ru/spb2/"));
    let mut w = Ws::open(e, Some(f.token("spb2")));
    w.send(1, &f.path("spb2", 6), b"wsred");
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(hdr(&a, "fedbus-hops").as_deref(), Some("1"), "{a:?}");
    // The frame header's hops/partition are checked in p12b.
}

/// A redirect loop in the serving cluster: 508 redirect_limit, fedbus-hops 5, the documented
/// body; not retried on the sibling.
#[test]
fn p13_redirect_loop_across_clusters() {
    let mut f = Federation::builder().peer_tls(false).start();
    f.tasks[1].kill();
    let _main = task(&f, "spb2", &["--redirect-to", "cmd"]);
    let _cmd = task(&f, "spb2", &["--role", "cmd", "--redirect-to", "main"]);
    let e = f.router("spb1", 0);
    let redirects = || {
        m(f.router("spb2", 0), "fedbus_redirects_total")
            + m(f.router("spb2", 1), "fedbus_redirects_total")
    };
    let r = wait_for(Duration::from_secs(10), || {
        let r = e.conn().request(&f.req("spb2", 6, b"loop"));
        (r.status == 508).then_some(r)
    })
    .expect("508 after the loop");
    let retries = m(e, "fedbus_forward_retries_total");
    let red0 = redirects();
    let r2 = e.conn().request(&f.req("spb2", 6, b"loop"));
    r.assert_error(508, "redirect_limit");
    r2.assert_error(508, "redirect_limit");
    assert_eq!(r2.header("fedbus-hops"), Some("5"), "{r2:?}");
    assert_eq!(
        std::str::from_utf8(&r2.body).unwrap(),
        r#"{"error":"redirect_limit","message":"more than 4 redirects","status":508}"#
    );
    assert_eq!(m(e, "fedbus_forward_retries_total"), retries, "not retried");
    assert_eq!(redirects() - red0, 5.0, "5 redirects counted");
}

/// EMERGENCY.md across clusters: spb2 serves only 0-7; wsid 12 is served by its emergency
/// partition with fedbus-emergency: 12, the same from both entry routers and on /api/ws.
#[test]
fn p14_emergency_partition_across_clusters() {
    let f = Federation::builder()
        .peer_tls(false)
        .task_partitions("spb2", "0-7")
        .start();
    let em_before = m(f.router("spb2", 0), "fedbus_emergency_total")
        + m(f.router("spb2", 1), "fedbus_emergency_total");
    let mut parts = std::collections::BTreeSet::new();
    for r in 0..2 {
        let resp = f
            .router("spb1", r)
            .conn()
            .request(&f.req("spb2", 12, b"em"));
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.header("fedbus-emergency"), Some("12"), "{resp:?}");
        let p: u32 = resp.header("fedbus-partition").unwrap().parse().unwrap();
        assert!(p < 8, "{resp:?}");
        parts.insert(p);
    }
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    w.send(1, &f.path("spb2", 12), b"em");
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(hdr(&a, "fedbus-emergency").as_deref(), Some("12"), "{a:?}");
    parts.insert(hdr(&a, "fedbus-partition").unwrap().parse().unwrap());
    assert_eq!(parts.len(), 1, "routers agree on E: {parts:?}");
    let em_after = m(f.router("spb2", 0), "fedbus_emergency_total")
        + m(f.router("spb2", 1), "fedbus_emergency_total");
    assert_eq!(em_after - em_before, 3.0);
    assert_eq!(m(f.router("spb1", 0), "fedbus_emergency_total"), 0.0);
}

/// A federation whose spb2 has no task left, once spb1's router `entry` has seen both spb2
/// routers not ready (statuses reach it within 20 ms of a change).
fn spb2_without_tasks(entry: usize) -> Federation {
    let mut f = Federation::builder().peer_tls(false).start();
    f.tasks[1].kill();
    for r in 0..2 {
        wait_metric(
            f.router("spb2", r),
            "fedbus_task_links",
            Duration::from_secs(5),
            |v| v == 0.0,
        );
    }
    wait_metric(
        f.router("spb1", entry),
        "fedbus_peer_links_ready",
        Duration::from_secs(5),
        |v| v <= 1.0,
    );
    f
}

/// No task at all in the serving cluster: 503 no_live_task (retry-after, fedbus-partition),
/// retried once on the sibling (fedbus_forward_retries_total + 1).
#[test]
fn p15_no_live_task_in_peer_cluster_retried_once() {
    let f = spb2_without_tasks(0);
    let e = f.router("spb1", 0);
    let before = m(e, "fedbus_forward_retries_total");
    let r = e.conn().request(&f.req("spb2", 9, b"x"));
    r.assert_error(503, "no_live_task");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert_eq!(r.header("fedbus-partition"), Some("9"), "{r:?}");
    assert!(served_by(&r).starts_with("ru/spb2/"), "{r:?}");
    assert_eq!(
        m(e, "fedbus_forward_retries_total") - before,
        1.0,
        "retried once"
    );
}

// ---------------------------------------------------------------- peer tokens and the upgrade

/// An expired peer token: 401 expired_token before the 101.
#[test]
fn p16_expired_peer_token() {
    let f = Federation::builder().peer_tls(false).start();
    let tok = f.peer_token("ru/spb2", f.keyring("spb2"), Some("0s"));
    let (mut s, st, head, rest) = peer_upgrade(f.router("spb1", 0).external, Some(&tok));
    let (st, code) = upgrade_refusal(st, &head, &rest, &mut s);
    assert_eq!((st, code.as_str()), (401, "expired_token"), "{head}");
}

/// Websocket upgrade rules hold on the external listener (PROTOCOL.md 3).
#[test]
fn p17_peer_upgrade_rules() {
    let f = Federation::builder().peer_tls(false).start();
    let ext = f.router("spb1", 0).external;
    let tok = f.peer_token("ru/spb2", f.keyring("spb2"), Some("1h"));
    let send = |req: String| -> String {
        let mut s = TcpStream::connect(ext).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match read_retrying(&mut s, &mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&b[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let v12 = send(format!("GET /peer HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 12\r\nAuthorization: Bearer {tok}\r\n\r\n"));
    assert!(v12.starts_with("HTTP/1.1 426"), "{v12}");
    assert!(
        v12.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{v12}"
    );
    let nohost = send(format!("GET /peer HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok}\r\n\r\n"));
    assert!(nohost.starts_with("HTTP/1.1 400"), "{nohost}");
    let post = send(format!("POST /peer HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok}\r\n\r\n"));
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
}

/// PROTOCOL.md 10: Request frames on a peer link: no CLUSTER or APP 400 bad_request, unknown
/// app 404, no TOKEN 401 missing_token, a bad TOKEN 401; METHOD absent is POST; the Response
/// carries SERVED_BY and fedbus-partition/fedbus-hops HEADER lines.
#[test]
fn p18_peer_request_frame_validation() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    let tok = f.token("spb1").to_string();
    let full = |cluster: &'static [u8], app: &'static [u8], token: Option<&[u8]>| {
        let mut v: Vec<(u8, Vec<u8>)> = Vec::new();
        if !cluster.is_empty() {
            v.push((tag::CLUSTER, cluster.to_vec()));
        }
        if !app.is_empty() {
            v.push((tag::APP, app.to_vec()));
        }
        v.push((tag::SERVICE, b"api".to_vec()));
        v.push((tag::MODULE, b"sys".to_vec()));
        v.push((tag::FUNCTION, b"echo".to_vec()));
        v.push((tag::WSID, b"37".to_vec()));
        if let Some(t) = token {
            v.push((tag::TOKEN, t.to_vec()));
        }
        v
    };
    let ask = |w: &mut Ws, id: u64, meta: Vec<(u8, Vec<u8>)>| {
        let mm: Vec<(u8, &[u8])> = meta.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        peer_req(w, id, &mm, b"pp")
    };
    let a = ask(
        &mut w,
        1,
        full(b"ru/spb1", b"demo/echo", Some(tok.as_bytes())),
    );
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(&a.payload[..], b"pp");
    assert_eq!(a.get_str(tag::SERVED_BY), Some("ru/spb1/r0"));
    assert_eq!(hdr(&a, "fedbus-partition").as_deref(), Some("5"), "{a:?}");
    assert_eq!(hdr(&a, "fedbus-hops").as_deref(), Some("0"), "{a:?}");
    let a = ask(&mut w, 2, full(b"", b"demo/echo", Some(tok.as_bytes())));
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (400, Some("bad_request")),
        "no CLUSTER {a:?}"
    );
    let a = ask(&mut w, 3, full(b"ru/spb1", b"", Some(tok.as_bytes())));
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (400, Some("bad_request")),
        "no APP {a:?}"
    );
    let a = ask(
        &mut w,
        4,
        full(b"ru/spb1", b"demo/nope", Some(tok.as_bytes())),
    );
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (404, Some("unknown_app")),
        "{a:?}"
    );
    let a = ask(&mut w, 5, full(b"ru/spb1", b"demo/echo", None));
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (401, Some("missing_token")),
        "{a:?}"
    );
    let a = ask(
        &mut w,
        6,
        full(b"ru/spb1", b"demo/echo", Some(f.token("spb2").as_bytes())),
    );
    assert_eq!(status(&a), 401, "spb2's token at spb1: {a:?}");
    // Router-made error bodies are JSON.
    let j: serde_json::Value = serde_json::from_slice(&a.payload).expect("json");
    assert_eq!(j["status"], 401);
    // A frame that is not a Request closes the link with 1002.
    let fr = encode_frame(Kind::Response, 0, 0, 0, 77, &[], b"").to_vec();
    w.send_raw(&fr);
    loop {
        match w.recv() {
            Msg::Bin(_) => continue,
            Msg::Close(c) => {
                assert_eq!(c, 1002);
                break;
            }
            Msg::Eof => panic!("closed without a close frame"),
        }
    }
    // Counted and logged.
    assert_eq!(m(r, "fedbus_peer_protocol_errors_total"), 1.0);
    assert!(r
        .log()
        .contains("peer link closed (1002): a frame of kind Response, not a Request"));
}

/// An anonymous request crossing a peer link to service `auth`: allowed (anonymous_services),
/// `main` redirects it to role auth, which nobody serves: 503 no_live_task after 1 hop.
#[test]
fn p19_peer_anonymous_service() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let before = m(e, "fedbus_forward_retries_total");
    let r = e
        .conn()
        .request(&Req::post(&format!("/api/ru/spb2/{APP}/auth/3/sys/login")).body(b"creds"));
    r.assert_error(503, "no_live_task");
    assert_eq!(r.header("fedbus-hops"), Some("1"), "{r:?}");
    assert_eq!(m(e, "fedbus_forward_retries_total"), before);
    // Non-anonymous without a token: 401 missing_token from spb2.
    let r = e.conn().request(&Req::post(&f.path("spb2", 3)).body(b"x"));
    r.assert_error(401, "missing_token");
    assert!(served_by(&r).starts_with("ru/spb2/"), "{r:?}");
}

// ---------------------------------------------------------------- limits across the link

/// A body within the entry router's max_body_bytes but over the serving cluster's: the client
/// gets a documented answer, and requests on the same peer link are not lost.
#[test]
fn p20_body_over_the_serving_clusters_max_body() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb2", "max_body_bytes", 65536)
        .task_delay_ms("spb2", 1500)
        .start();
    let e = f.router("spb1", 0);
    // One request pending on the link to spb2/r0 (wsid 0).
    let b0 = pending(f.router("spb2", 0));
    let mut slow = send_http(e, &f.req("spb2", 0, b"bystander"));
    wait_pending(f.router("spb2", 0), b0, 1.0);
    let big = vec![b'z'; 200 * 1024];
    let t = Instant::now();
    let mut c = send_http(e, &f.req("spb2", 2, &big));
    let r = c.read_response().expect("an answer to the big body");
    eprintln!(
        "big body across: {} {:?} after {:?}",
        r.status,
        String::from_utf8_lossy(&r.body),
        t.elapsed()
    );
    let b = slow.read_response().expect("bystander answered");
    assert_eq!(b.status, 200, "a request on the same link was lost: {b:?}");
    assert_eq!(r.status, 413, "{r:?}");
}

/// PROTOCOL.md 8: on an anonymous /api/ws session a message over max_anonymous_body_bytes +
/// 64 KiB closes with 1009, also for requests to another cluster.
#[test]
fn p21_ws_anonymous_big_message_to_other_cluster_1009() {
    let f = Federation::builder().peer_tls(false).start();
    let mut w = Ws::open(f.router("spb1", 0), None);
    w.send(
        1,
        &format!("/api/ru/spb2/{APP}/auth/3/sys/login"),
        &vec![b'a'; 140 * 1024],
    );
    match w.recv() {
        Msg::Bin(a) => panic!("answered instead of closed: {a:?}"),
        Msg::Close(c) => assert_eq!(c, 1009),
        Msg::Eof => panic!("no close frame"),
    }
}

/// PROTOCOL.md 8: an anonymous /api/ws request over max_anonymous_body_bytes (but under the
/// close bound) to an anonymous service gets 413 body_too_large; across clusters too.
#[test]
fn p22_ws_anonymous_body_over_anon_limit_to_other_cluster() {
    let f = Federation::builder().peer_tls(false).start();
    let mut w = Ws::open(f.router("spb1", 0), None);
    w.send(
        1,
        &format!("/api/ru/spb2/{APP}/auth/3/sys/login"),
        &vec![b'a'; 100 * 1024],
    );
    let a = w.frame();
    assert_eq!(
        status(&a),
        413,
        "{a:?} {:?}",
        String::from_utf8_lossy(&a.payload)
    );
    assert_eq!(a.get_str(tag::ERROR), Some("body_too_large"));
}

/// HTTP without a token to another cluster's anonymous service, body over 64 KiB: the serving
/// router applies max_anonymous_body_bytes (413 body_too_large), never a hang.
#[test]
fn p23_http_anonymous_body_over_anon_limit_to_other_cluster() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0).conn().request(
        &Req::post(&format!("/api/ru/spb2/{APP}/auth/3/sys/login")).body(&vec![b'a'; 100 * 1024]),
    );
    eprintln!(
        "anon 100 KiB across: {} {:?} by {}",
        r.status,
        String::from_utf8_lossy(&r.body),
        served_by(&r)
    );
    r.assert_error(413, "body_too_large");
}

/// max_inflight_per_connection on /api/ws counts requests to another cluster too.
#[test]
fn p24_ws_too_many_inflight_cross_cluster() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_inflight_per_connection", 3)
        .task_delay_ms("spb2", 1500)
        .start();
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    for i in 0..5u64 {
        w.send(i + 1, &f.path("spb2", 16 + i), b"q");
    }
    let mut got = Vec::new();
    let t = Instant::now();
    for _ in 0..5 {
        let a = w.frame();
        got.push((
            a.header.request_id,
            status(&a),
            a.get_str(tag::ERROR).map(str::to_string),
            t.elapsed(),
        ));
    }
    let busy: Vec<_> = got.iter().filter(|g| g.1 == 503).collect();
    assert_eq!(busy.len(), 2, "{got:?}");
    for b in &busy {
        assert_eq!(b.2.as_deref(), Some("too_many_inflight"), "{got:?}");
        assert!(b.3 < Duration::from_millis(1000), "{got:?}");
    }
    assert_eq!(got.iter().filter(|g| g.1 == 200).count(), 3, "{got:?}");
}

/// max_pending_per_link bounds the dialing side: with both links to spb2 full, 503 no_peer.
#[test]
fn p25_max_pending_per_link_on_peer_links() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_pending_per_link", 1)
        .task_delay_ms("spb2", 2000)
        .start();
    let e = f.router("spb1", 0);
    let (b0, b1) = (pending(f.router("spb2", 0)), pending(f.router("spb2", 1)));
    let mut a = send_http(e, &f.req("spb2", 0, b"a"));
    wait_pending(f.router("spb2", 0), b0, 1.0);
    let mut b = send_http(e, &f.req("spb2", 2, b"b"));
    wait_pending(f.router("spb2", 1), b1, 1.0);
    let t = Instant::now();
    let r = e.conn().request(&f.req("spb2", 4, b"c"));
    r.assert_error(503, "no_peer");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(a.read_response().unwrap().status, 200);
    let rb = b.read_response().unwrap();
    assert_eq!(rb.status, 200);
    assert_eq!(served_by(&rb), "ru/spb2/r1", "{rb:?}");
}

/// A client token longer than a metadata value can hold (65535 bytes): not silently cut.
#[test]
fn p26_oversized_token_across_the_link() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_header_bytes", 200_000)
        .start();
    let e = f.router("spb1", 0);
    let real = f.token("spb2").to_string();
    // The real token followed by padding past 65535 bytes: a truncation leaves a different token.
    let long = format!("{real}{}", "A".repeat(70_000));
    let t = Instant::now();
    let mut c = e.conn();
    c.set_read_timeout(Duration::from_secs(8));
    let r = c.request(&f.req("spb2", 3, b"x").token(&long));
    eprintln!(
        "70 KB token across: {} {:?} by {} in {:?}",
        r.status,
        String::from_utf8_lossy(&r.body),
        served_by(&r),
        t.elapsed()
    );
    assert!(
        r.status == 401 || r.status == 400 || r.status == 431,
        "{r:?}"
    );
    // A 66000-byte value that is a prefix-valid token: the real token + padding such that the
    // cut at 65535 bytes is exactly the real token + '.'-free garbage is still refused.
    assert_ne!(r.status, 200);
}

// ---------------------------------------------------------------- reloads

/// A cluster removed by a reload: its links close once idle, a request in flight on one is
/// answered (not peer_lost); new requests for it are 404 unknown_cluster.
#[test]
fn p27_cluster_removed_by_reload_in_flight_completes() {
    let f = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb2", 1500)
        .start();
    let e = f.router("spb1", 0);
    let b0 = pending(f.router("spb2", 0));
    let mut c = send_http(e, &f.req("spb2", 0, b"inflight"));
    wait_pending(f.router("spb2", 0), b0, 1.0);
    reload(e, |t| without_cluster(&t, "spb2"));
    let r = c.read_response().expect("in-flight answered");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"inflight");
    e.conn()
        .request(&f.req("spb2", 0, b"x"))
        .assert_error(404, "unknown_cluster");
    // Links to spb2 are closed once idle: only the sibling remains.
    wait_peer_links(&f, "spb1", 0, 1.0);
    // "a removed one stops counting" for /readyz.
    let (st, body) = e.readyz();
    assert_eq!(st, 200, "{body}");
}

/// A cluster added by a reload whose router is not reachable: a known cluster, so 503 no_peer
/// (not 404 unknown_cluster), over HTTP and /api/ws.
#[test]
fn p28_cluster_added_by_reload_unreachable_is_no_peer() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let keys = f.keyring("spb2").to_str().unwrap().to_string();
    reload(e, |t| {
        format!("{t}[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb3\"\nrouters = [\"127.0.0.1:9\"]\nkeys = {keys:?}\n")
    });
    assert_eq!(m(e, "fedbus_config_reload_failed_total"), 0.0);
    // "A cluster added by a reload is dialed but not waited for by /readyz".
    let (st, body) = e.readyz();
    assert_eq!(st, 200, "{body}");
    let p = format!("/api/ru/spb3/{APP}/api/1/sys/echo");
    let r = e
        .conn()
        .request(&Req::post(&p).token(f.token("spb2")).body(b"x"));
    r.assert_error(503, "no_peer");
    assert_eq!(r.header("retry-after"), Some("1"));
    let mut w = Ws::open(e, Some(f.token("spb2")));
    w.send(1, &p, b"x");
    let a = w.frame();
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (503, Some("no_peer")),
        "{a:?}"
    );
    // spb2 still served.
    assert_eq!(e.conn().request(&f.req("spb2", 1, b"ok")).status, 200);
}

/// A [federation] list whose keys cannot be read is refused whole: counted, old list in force.
#[test]
fn p29_reload_with_unreadable_keys_refused_whole() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let failed = m(e, "fedbus_config_reload_failed_total");
    let gen = m(e, "fedbus_federation_generation");
    reload(e, |t| {
        let t = without_cluster(&t, "spb2");
        format!("{t}[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb3\"\nrouters = [\"127.0.0.1:9\"]\nkeys = \"/nonexistent/keys\"\n")
    });
    // Once by the SIGHUP, and once more when the mtime poll read the write first (the SIGHUP
    // then tries again: a retry is what it asks for, after a keys directory was fixed, say).
    let refusals = m(e, "fedbus_config_reload_failed_total") - failed;
    assert!((1.0..=2.0).contains(&refusals), "{refusals} refusals");
    assert_eq!(m(e, "fedbus_federation_generation"), gen);
    let r = e.conn().request(&f.req("spb2", 1, b"still"));
    assert_eq!(r.status, 200, "the old list is still in force: {r:?}");
    let p = format!("/api/ru/spb3/{APP}/api/1/sys/echo");
    e.conn()
        .request(&Req::post(&p).token(f.token("spb2")).body(b"x"))
        .assert_error(404, "unknown_cluster");
}

/// The loop guard after a misconfiguration by reload: spb2 listed with a router of spb1 gives
/// 508 forward_loop to the client (entry router relays the serving router's answer).
#[test]
fn p30_misconfigured_cluster_gives_forward_loop() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let sib = f.router("spb1", 1).external;
    reload(e, |t| {
        let t = without_cluster(&t, "spb2");
        let keys = f.keyring("spb2").to_str().unwrap().to_string();
        format!("{t}[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb2\"\nrouters = [\"{sib}\"]\nkeys = {keys:?}\n")
    });
    let r = wait_for(Duration::from_secs(10), || {
        let r = e.conn().request(&f.req("spb2", 1, b"x"));
        (r.status == 508).then_some(r)
    });
    let r = r.unwrap_or_else(|| {
        let r = e.conn().request(&f.req("spb2", 1, b"x"));
        panic!("no 508 forward_loop within 10 s; last: {r:?}")
    });
    r.assert_error(508, "forward_loop");
    assert_eq!(served_by(&r), "ru/spb1/r1", "{r:?}");
}

// ---------------------------------------------------------------- metrics

/// FEDERATION.md "Failures": gauges of links: fedbus_peer_links (dialled), _ready, and
/// fedbus_connections{listener="external"} (incoming).
#[test]
fn p31_peer_link_gauges() {
    let mut f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb2", 0);
    assert_eq!(m(r, "fedbus_peer_links"), 3.0);
    assert_eq!(m(r, "fedbus_peer_links_ready"), 3.0);
    // Incoming: spb1 r0, spb1 r1, sibling spb2 r1 (one shard each).
    assert_eq!(
        m(r, "fedbus_connections{listener=\"external\"}"),
        3.0,
        "{}",
        r.metrics()
            .0
            .iter()
            .filter(|(k, _)| k.contains("connections"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    f.router_mut("spb1", 1).kill9();
    let r = f.router("spb2", 0);
    wait_metric(r, "fedbus_peer_links", Duration::from_secs(8), |v| v == 2.0);
    wait_metric(
        r,
        "fedbus_connections{listener=\"external\"}",
        Duration::from_secs(8),
        |v| v == 2.0,
    );
}

/// PROTOCOL.md 10: a 503 retry after which the sibling also has no task: there is no second
/// retry; counters agree. Also: the forwarded counter counts the request once.
#[test]
fn p32_forwarded_total_counts_retry_once() {
    let f = spb2_without_tasks(1);
    let e = f.router("spb1", 1);
    let fw = m(e, "fedbus_forwarded_total");
    let r = e.conn().request(&f.req("spb2", 10, b"x"));
    r.assert_error(503, "no_live_task");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    let d = m(e, "fedbus_forwarded_total") - fw;
    eprintln!("fedbus_forwarded_total grew by {d} for one client request with one retry");
    // FEDERATION.md: it counts sends, the retry included.
    assert_eq!(d, 2.0);
    // The same relayed router-made 503 on /api/ws carries retry-after too (PROTOCOL.md 8).
    let mut w = Ws::open(e, Some(f.token("spb2")));
    w.send(7, &f.path("spb2", 10), b"x");
    let a = w.frame();
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (503, Some("no_live_task")),
        "{a:?}"
    );
    assert_eq!(hdr(&a, "retry-after").as_deref(), Some("1"), "{a:?}");
}

/// Control for p12: on the serving cluster's own /api/ws, the answer frame's header carries
/// the hops and partition of the answer (PROTOCOL.md 8).
#[test]
fn p12b_local_ws_answer_header_carries_hops_and_partition() {
    let mut f = Federation::builder().peer_tls(false).start();
    f.tasks[1].kill();
    let _main = task(&f, "spb2", &["--redirect-to", "cmd"]);
    let _cmd = task(&f, "spb2", &["--role", "cmd"]);
    let r0 = f.router("spb2", 0);
    wait_for(Duration::from_secs(10), || {
        let r = r0.conn().request(&f.req("spb2", 6, b"red"));
        (r.status == 200).then_some(r)
    })
    .expect("served after a redirect");
    let mut w = Ws::open(r0, Some(f.token("spb2")));
    w.send(1, &f.path("spb2", 6), b"local");
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(hdr(&a, "fedbus-hops").as_deref(), Some("1"), "{a:?}");
    assert_eq!((a.header.hops, a.header.partition), (1, 6), "local: {a:?}");
    // The same request entering spb1: the relayed frame's header.
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    w.send(2, &f.path("spb2", 6), b"relayed");
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(
        (a.header.hops, a.header.partition),
        (1, 6),
        "relayed: {a:?}"
    );
}

/// Symmetric limits in both clusters: a request within every documented client bound (body
/// <= max_body_bytes, head <= max_header_bytes) crossing the peer link must not take the
/// link down (PROTOCOL.md 10: the link's messages are bounded by max_body_bytes + 64 KiB,
/// and the forwarded metadata here is over 64 KiB).
#[test]
fn p33_big_metadata_within_client_limits_across_the_link() {
    let mut b = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb2", 1500);
    for c in CLUSTERS {
        b = b
            .limit(c, "max_header_bytes", 300_000)
            .limit(c, "max_body_bytes", 65536);
    }
    let f = b.start();
    let e = f.router("spb1", 0);
    let b0 = pending(f.router("spb2", 0));
    let mut slow = send_http(e, &f.req("spb2", 0, b"bystander"));
    wait_pending(f.router("spb2", 0), b0, 1.0);
    let ct = format!("text/plain; x={}", "c".repeat(60_000));
    let req = f
        .req("spb2", 2, &vec![b'q'; 65536])
        .header("Content-Type", &ct)
        .header("Origin", &format!("http://{}", "o".repeat(60_000)));
    let mut c = send_http(e, &req);
    let r = c.read_response().expect("an answer");
    eprintln!(
        "big metadata across: {} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let by = slow.read_response().expect("bystander answered");
    assert_eq!(
        by.status,
        200,
        "a bystander on the same peer link was lost (big one got {} {:?}): {by:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    // Refused by the entry router: the frame would be over the peer's message bound.
    r.assert_error(431, "headers_too_large");
}

/// A draining serving router finishes the /api/ws requests pending on it; new ones go to its
/// sibling; it exits 0 (FEDERATION.md "Readiness and drain").
#[test]
fn p34_ws_requests_survive_a_peer_drain() {
    let mut f = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb2", 1500)
        .start();
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    let b0 = pending(f.router("spb2", 0));
    w.send(1, &f.path("spb2", 0), b"drain-me");
    wait_pending(f.router("spb2", 0), b0, 1.0);
    f.router_mut("spb2", 0).sigterm();
    // spb1 learns of the drain via the status (20 ms); then wsid 0 goes to r1.
    wait_metric(
        f.router("spb1", 0),
        "fedbus_peer_links_ready",
        Duration::from_secs(5),
        |v| v <= 2.0,
    );
    w.send(2, &f.path("spb2", 0), b"new");
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let a = w.frame();
        let id = a.header.request_id;
        got.insert(id, a);
    }
    assert_eq!(status(&got[&1]), 200, "{:?}", got[&1]);
    assert_eq!(got[&1].get_str(tag::SERVED_BY), Some("ru/spb2/r0"));
    assert_eq!(status(&got[&2]), 200, "{:?}", got[&2]);
    assert_eq!(got[&2].get_str(tag::SERVED_BY), Some("ru/spb2/r1"));
    let st = f.router_mut("spb2", 0).wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
}

/// /api/ws METHOD rules apply to requests for another cluster: OPTIONS is 405.
#[test]
fn p35_ws_method_rules_cross_cluster() {
    let f = Federation::builder().peer_tls(false).start();
    let mut w = Ws::open(f.router("spb1", 0), Some(f.token("spb2")));
    w.send_with(1, &f.path("spb2", 3), b"", &[(tag::METHOD, b"OPTIONS")]);
    let a = w.frame();
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (405, Some("method_not_allowed")),
        "{a:?}"
    );
    w.send_with(2, &f.path("spb2", 3), b"d", &[(tag::METHOD, b"DELETE")]);
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
    // No PATH: 400 bad_request.
    let fr = encode_frame(Kind::Request, 0, 0, 0, 3, &[], b"").to_vec();
    w.send_raw(&fr);
    let a = w.frame();
    assert_eq!(
        (status(&a), a.get_str(tag::ERROR)),
        (400, Some("bad_request")),
        "{a:?}"
    );
}

/// Control-frame flood on a peer link: closed with 1008, counted (TUNING.md).
#[test]
fn p36_peer_link_ping_flood() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let before = m(r, "fedbus_abusive_closed_total");
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    let mut h = [0u8; wsf::MAX_HEADER];
    let n = wsf::encode_head(wsf::opcode::PING, 0, Some([0; 4]), &mut h);
    let mut burst = Vec::new();
    for _ in 0..400 {
        burst.extend_from_slice(&h[..n]);
    }
    let _ = w.s.write_all(&burst);
    let code = w.close_code();
    assert_eq!(code, 1008);
    wait_metric(
        r,
        "fedbus_abusive_closed_total",
        Duration::from_secs(3),
        |v| v > before,
    );
}

/// PROTOCOL.md 3: a peer-link message over max_body_bytes + 64 KiB closes the link with 1009.
#[test]
fn p37_peer_link_oversized_message_1009() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_body_bytes", 65536)
        .start();
    let r = f.router("spb1", 0);
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    let mut mm = bytes::BytesMut::new();
    put_meta(&mut mm, tag::CLUSTER, b"ru/spb1");
    put_meta(&mut mm, tag::APP, APP.as_bytes());
    let fr = encode_frame(
        Kind::Request,
        flags::FORWARDED,
        0,
        0,
        1,
        &mm,
        &vec![0u8; 140 * 1024],
    )
    .to_vec();
    w.send_raw(&fr);
    let code = w.close_code();
    assert_eq!(code, 1009);
}

/// PROTOCOL.md 6: router-made errors carry fedbus-hops only after a redirect. Errors the entry
/// router makes for a forwarded request (peer_lost, no_peer) had no redirect.
#[test]
fn p38_entry_router_errors_carry_fedbus_hops_0() {
    let mut f = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb2", 2000)
        .start();
    let e = f.router("spb1", 0);
    // A local router-made error (unknown app).
    let local = e
        .conn()
        .request(&Req::post("/api/ru/spb1/demo/nope/api/1/sys/echo").token(f.token("spb1")));
    local.assert_error(404, "unknown_app");
    let b0 = pending(f.router("spb2", 0));
    let mut c = send_http(e, &f.req("spb2", 0, b"x"));
    wait_pending(f.router("spb2", 0), b0, 1.0);
    f.router_mut("spb2", 0).kill9();
    let lost = c.read_response().expect("answer");
    lost.assert_error(502, "peer_lost");
    f.router_mut("spb2", 1).kill9();
    wait_peer_links(&f, "spb1", 0, 1.0);
    let nopeer = f.router("spb1", 0).conn().request(&f.req("spb2", 0, b"x"));
    nopeer.assert_error(503, "no_peer");
    let seen: Vec<(&str, Option<&str>)> = vec![
        ("local unknown_app", local.header("fedbus-hops")),
        ("peer_lost", lost.header("fedbus-hops")),
        ("no_peer", nopeer.header("fedbus-hops")),
    ];
    // PROTOCOL.md section 6: every answer carries fedbus-hops, 0 before any redirect.
    assert!(
        seen.iter().all(|(_, h)| *h == Some("0")),
        "fedbus-hops on router-made errors: {seen:?}"
    );
}

/// PROTOCOL.md 10: the receiving router closes a peer link with 1008 when the peer token
/// expires, counted in fedbus_links_revoked_total.
#[test]
fn p39_peer_link_closed_when_its_token_expires() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let before = m(r, "fedbus_links_revoked_total");
    let tok = f.peer_token("ru/spb2", f.keyring("spb2"), Some("2s"));
    let (s, st, head, rest) = peer_upgrade(r.external, Some(&tok));
    assert_eq!(st, 101, "{head}");
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut w = Ws { s, buf: rest };
    let t = Instant::now();
    let code = w.close_code();
    assert_eq!(code, 1008, "after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    wait_metric(
        r,
        "fedbus_links_revoked_total",
        Duration::from_secs(3),
        |v| v > before,
    );
}

/// PROTOCOL.md 10: a reload that no longer admits a peer closes its incoming links with 1008
/// (fedbus_links_revoked_total).
#[test]
fn p40_reload_removing_a_cluster_revokes_its_incoming_links() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let before = m(r, "fedbus_links_revoked_total");
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    reload(r, |t| without_cluster(&t, "spb2"));
    let code = w.close_code();
    assert_eq!(code, 1008);
    wait_metric(
        r,
        "fedbus_links_revoked_total",
        Duration::from_secs(3),
        |v| v > before,
    );
}

/// FEDERATION.md "Sibling links": an /api/ws request entering a router without the partition
/// is handed to the sibling that has it (one hop).
#[test]
fn p41_ws_sibling_handoff() {
    let mut f = Federation::builder()
        .peer_tls(false)
        .task_partitions("spb2", "0-12,14-15")
        .start();
    f.start_task_on("spb2", &[0], "13");
    let r1 = f.router("spb2", 1);
    let before = m(r1, "fedbus_sibling_handoffs_total");
    let mut w = Ws::open(r1, Some(f.token("spb2")));
    let a = wait_for(Duration::from_secs(10), || {
        w.send(1, &f.path("spb2", 13), b"hand");
        let a = w.frame();
        (status(&a) == 200 && hdr(&a, "fedbus-emergency").is_none()).then_some(a)
    })
    .expect("served on partition 13");
    assert_eq!(hdr(&a, "fedbus-partition").as_deref(), Some("13"), "{a:?}");
    assert!(m(r1, "fedbus_sibling_handoffs_total") > before);
}

/// PROTOCOL.md 8: the session token may come as ?access_token= (browsers); it crosses too.
#[test]
fn p42_ws_access_token_query_crosses_clusters() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let (s, st, head, rest) = ws_upgrade(
        e.api,
        &format!("/api/ws?access_token={}", f.token("spb2")),
        None,
    );
    assert_eq!(st, 101, "{head}");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut w = Ws { s, buf: rest };
    w.send(1, &f.path("spb2", 5), b"q");
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
    // The header wins over the query.
    let (s, st, head, rest) =
        ws_upgrade(e.api, "/api/ws?access_token=garbage", Some(f.token("spb2")));
    assert_eq!(st, 101, "{head}");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut w = Ws { s, buf: rest };
    w.send(1, &f.path("spb2", 5), b"q");
    let a = w.frame();
    assert_eq!(status(&a), 200, "{a:?}");
}

/// FEDERATION.md "Keys and trust": a router removed from a cluster's list by a reload has its
/// links closed; added back, it gets a dialer again.
#[test]
fn p43_router_removed_and_added_by_reload() {
    let f = Federation::builder().peer_tls(false).start();
    let e = f.router("spb1", 0);
    let r1 = f.router("spb2", 1).external.to_string();
    let orig = std::fs::read_to_string(e.config_path()).unwrap();
    assert_eq!(m(e, "fedbus_peer_links"), 3.0);
    let r1q = format!(", \"{r1}\"]");
    let cut = {
        // Only spb2's routers list has r1's address.
        assert!(orig.contains(&r1q), "{orig}");
        orig.replace(&r1q, "]")
    };
    reload(e, |_| cut.clone());
    wait_peer_links(&f, "spb1", 0, 2.0);
    // wsid 1 (slot of r1) goes to r0 now.
    let r = e.conn().request(&f.req("spb2", 1, b"x"));
    assert_eq!((r.status, served_by(&r)), (200, "ru/spb2/r0"), "{r:?}");
    reload(e, |_| orig.clone());
    wait_peer_links(&f, "spb1", 0, 3.0);
    let r = wait_for(Duration::from_secs(5), || {
        let r = e.conn().request(&f.req("spb2", 1, b"x"));
        (served_by(&r) == "ru/spb2/r1").then_some(r)
    });
    assert!(r.is_some(), "wsid 1 back on r1");
}

/// TUNING.md: external listener connections over max_link_connections_per_shard, with every
/// slot held by a peer link whose token was verified, are closed at accept, counted in
/// fedbus_connections_refused_total.
#[test]
fn p44_external_listener_connection_limit() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_link_connections_per_shard", 3)
        .start();
    let r = f.router("spb1", 0);
    assert_eq!(m(r, "fedbus_connections{listener=\"external\"}"), 3.0);
    let before = m(r, "fedbus_connections_refused_total");
    let mut s = TcpStream::connect(r.external).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 16];
    let n = read_retrying(&mut s, &mut b);
    assert!(matches!(n, Ok(0) | Err(_)), "closed at accept: {n:?}");
    wait_metric(
        r,
        "fedbus_connections_refused_total",
        Duration::from_secs(3),
        |v| v > before,
    );
    // Existing links unaffected.
    assert_eq!(r.conn().request(&f.req("spb2", 3, b"ok")).status, 200);
}

/// The entry router's own max_body_bytes applies to forwarded HTTP: 413, closes.
#[test]
fn p45_entry_max_body_applies_to_forwarded_http() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_body_bytes", 1024)
        .start();
    let r = f
        .router("spb1", 0)
        .conn()
        .request(&f.req("spb2", 3, &vec![b'x'; 2048]));
    r.assert_error(413, "body_too_large");
    assert_eq!(served_by(&r), "ru/spb1/r0");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
}

/// FEDERATION.md "Forwarding" step 3: a full peer-link outbox gives 503 peer_busy +
/// retry-after: 1.
#[test]
fn p46_peer_busy_when_the_outbox_is_over_its_limit() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "max_link_outbox_bytes", 16384)
        .start();
    let e = f.router("spb1", 0);
    let r = e.conn().request(&f.req("spb2", 3, &vec![b'x'; 100_000]));
    eprintln!(
        "100 KB over a 16 KiB outbox: {} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
    );
    r.assert_error(503, "peer_busy");
    assert_eq!(r.header("retry-after"), Some("1"));
}

/// TUNING.md `limits.max_pending_per_link`: "an accepting router answers requests over it on
/// one peer link `503 peer_busy`", counted in `fedbus_busy_refused_total`. Five requests at
/// once on one raw peer link to a router with a limit of 3 and a task that answers after
/// 300 ms: the two over the limit are answered 503 `peer_busy` at once, the three others 200;
/// once those are answered the link takes requests again.
#[test]
fn p52_accepted_peer_link_holds_at_most_max_pending_per_link() {
    let f = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb1", 300)
        .limit("spb1", "max_pending_per_link", 3)
        .start();
    let r = f.router("spb1", 0);
    let refused_before = m(r, "fedbus_busy_refused_total");
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    let tok = f.token("spb1").to_string();
    let meta = echo_meta(b"21", &tok);
    let mut mm = bytes::BytesMut::new();
    for (t, v) in &meta {
        put_meta(&mut mm, *t, v);
    }
    let sent = Instant::now();
    for id in 1..=5u64 {
        let fr = encode_frame(Kind::Request, flags::FORWARDED, 0, 0, id, &mm, b"x").to_vec();
        w.send_raw(&fr);
    }
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 5 {
        let a = w.frame();
        let error = a.get_str(tag::ERROR).map(str::to_string);
        answers.insert(a.header.request_id, (status(&a), error, sent.elapsed()));
    }
    eprintln!("five requests at once, limit 3: {answers:?}");
    let busy: Vec<_> = answers
        .iter()
        .filter(|(_, (st, e, _))| *st == 503 && e.as_deref() == Some("peer_busy"))
        .collect();
    let ok = answers.values().filter(|(st, _, _)| *st == 200).count();
    assert_eq!((busy.len(), ok), (2, 3), "{answers:?}");
    // Refused at once, not after the task's 300 ms.
    assert!(
        busy.iter()
            .all(|(_, (_, _, t))| *t < Duration::from_millis(250)),
        "{answers:?}"
    );
    assert_eq!(m(r, "fedbus_busy_refused_total") - refused_before, 2.0);
    // The three answered, the link is below its limit again.
    let a = peer_req(&mut w, 6, &meta, b"again");
    assert_eq!(status(&a), 200, "{a:?}");
}

/// p33 with the default max_body_bytes (8 MiB): only max_header_bytes raised (TUNING.md:
/// "when clients send large tokens"), in both clusters. An 8 MiB body with 80 KB of headers
/// (within both client bounds) crossing the link.
#[test]
fn p33b_default_body_limit_big_headers_across_the_link() {
    let mut b = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb2", 1500);
    for c in CLUSTERS {
        b = b.limit(c, "max_header_bytes", 131072);
    }
    let f = b.start();
    let e = f.router("spb1", 0);
    let b0 = pending(f.router("spb2", 0));
    let mut slow = send_http(e, &f.req("spb2", 0, b"bystander"));
    wait_pending(f.router("spb2", 0), b0, 1.0);
    let req = f
        .req("spb2", 2, &vec![b'q'; 8 * 1024 * 1024])
        .header(
            "Content-Type",
            &format!("text/plain; x={}", "c".repeat(40_000)),
        )
        .header("Origin", &format!("http://{}", "o".repeat(40_000)));
    let mut c = send_http(e, &req);
    let r = c.read_response().expect("an answer");
    let by = slow.read_response().expect("bystander answered");
    assert_eq!(
        by.status,
        200,
        "bystander lost (big one got {} {:?}): {by:?}",
        r.status,
        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
    );
    r.assert_error(431, "headers_too_large");
}

/// FEDERATION.md: a request that came over a peer link is served here or nowhere; it is not
/// handed to a sibling (that is for direct ingress only): partition 13 lives only on spb1/r1,
/// a forwarded request for it reaching spb1/r0 is served there by the emergency partition.
#[test]
fn p47_forwarded_request_is_never_handed_to_a_sibling() {
    let mut f = Federation::builder()
        .peer_tls(false)
        .task_partitions("spb1", "0-12,14-15")
        .start();
    f.start_task_on("spb1", &[1], "13");
    let r1 = f.router("spb1", 1);
    wait_for(Duration::from_secs(10), || {
        let r = r1.conn().request(&f.req("spb1", 13, b"x"));
        (r.status == 200 && r.header("fedbus-emergency").is_none()).then_some(())
    })
    .expect("13 linked on r1");
    let r0 = f.router("spb1", 0);
    let before = m(r0, "fedbus_sibling_handoffs_total");
    let mut w = raw_peer(&f, r0, "ru/spb2", f.keyring("spb2"));
    let tok = f.token("spb1").to_string();
    let meta = echo_meta(b"13", &tok);
    let a = peer_req(&mut w, 1, &meta, b"fw");
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(a.get_str(tag::SERVED_BY), Some("ru/spb1/r0"), "{a:?}");
    assert_eq!(hdr(&a, "fedbus-emergency").as_deref(), Some("13"), "{a:?}");
    assert_eq!(m(r0, "fedbus_sibling_handoffs_total"), before);
}

impl Ws {
    fn send_text(&mut self, text: &str) {
        let mut h = [0u8; wsf::MAX_HEADER];
        let n = wsf::encode_head(wsf::opcode::TEXT, text.len(), Some([0; 4]), &mut h);
        let _ = self.s.write_all(&h[..n]);
        let _ = self.s.write_all(text.as_bytes());
    }

    /// The next text message whose `type` is `renewed` or `renew_refused` (peer statuses and
    /// answers are skipped); a close frame or the end of the stream panics.
    fn renew_reply(&mut self) -> serde_json::Value {
        loop {
            if let Ok(Some(h)) = wsf::parse_head(&self.buf) {
                let total = h.header_len + h.payload_len as usize;
                if self.buf.len() >= total {
                    let p: Vec<u8> = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    match h.opcode {
                        wsf::opcode::TEXT => {
                            let v: serde_json::Value =
                                serde_json::from_slice(&p).expect("JSON text");
                            if v["type"] == "renewed" || v["type"] == "renew_refused" {
                                return v;
                            }
                        }
                        wsf::opcode::CLOSE => panic!("closed: {p:?}"),
                        _ => {}
                    }
                    continue;
                }
            }
            let mut b = [0u8; 65536];
            match read_retrying(&mut self.s, &mut b) {
                Ok(0) => panic!("end of stream"),
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) => panic!("ws read: {e}"),
            }
        }
    }
}

/// PROTOCOL.md section 10, "Renewing a peer token": a dialer sends a fresh peer token on its
/// open link; the accepting router checks it as at the upgrade, for the same cluster, and moves
/// the link's expiry: a link opened with a 3 s token and renewed serves past 3 s. A token of
/// another cluster is refused `wrong_token`; a renew within a second of the last one
/// `too_often`, and the next one closes the link with 1008 (`fedbus_abusive_closed_total`).
#[test]
fn p50_a_renewed_peer_token_keeps_the_link_past_the_old_expiry() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let abusive = m(r, "fedbus_abusive_closed_total");
    let (s, st, head, rest) = peer_upgrade(
        r.external,
        Some(&f.peer_token("ru/spb2", f.keyring("spb2"), Some("3s"))),
    );
    assert_eq!(st, 101, "{head}");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let opened = Instant::now();
    let mut w = Ws { s, buf: rest };
    let fresh = f.peer_token("ru/spb2", f.keyring("spb2"), Some("1h"));
    w.send_text(&serde_json::json!({"type": "renew", "token": fresh}).to_string());
    let v = w.renew_reply();
    assert_eq!(v["type"], "renewed", "{v}");
    // Past the first token's expiry (3 s, and the expiry timer's second), the link serves.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(opened.elapsed()));
    let tok = f.token("spb1").to_string();
    let meta: Vec<(u8, &[u8])> = vec![
        (tag::CLUSTER, b"ru/spb1"),
        (tag::APP, APP.as_bytes()),
        (tag::SERVICE, b"api"),
        (tag::MODULE, b"sys"),
        (tag::FUNCTION, b"echo"),
        (tag::WSID, b"3"),
        (tag::TOKEN, tok.as_bytes()),
    ];
    let a = peer_req(&mut w, 1, &meta, b"after");
    assert_eq!(status(&a), 200, "{a:?}");
    assert_eq!(m(r, "fedbus_links_revoked_total"), 0.0);
    // A peer token of another cluster (spb1's own, which this router verifies for its
    // sibling) cannot take over a link of spb2.
    let other = f.peer_token("ru/spb1", f.keyring("spb1"), Some("1h"));
    w.send_text(&serde_json::json!({"type": "renew", "token": other}).to_string());
    let v = w.renew_reply();
    assert_eq!(
        (&v["type"], &v["error"]),
        (&"renew_refused".into(), &"wrong_token".into()),
        "{v}"
    );
    // Within the second: refused, then closed.
    w.send_text(&serde_json::json!({"type": "renew", "token": fresh}).to_string());
    let v = w.renew_reply();
    assert_eq!(v["error"], "too_often", "{v}");
    w.send_text(&serde_json::json!({"type": "renew", "token": fresh}).to_string());
    let code = w.close_code();
    assert_eq!(code, 1008);
    wait_metric(
        r,
        "fedbus_abusive_closed_total",
        Duration::from_secs(3),
        |v| v > abusive,
    );
    assert_eq!(m(r, "fedbus_peer_renewals_total{result=\"accepted\"}"), 1.0);
    assert_eq!(m(r, "fedbus_peer_renewals_total{result=\"refused\"}"), 2.0);
}

/// The metadata of a peer Response as a list of `TAG value` strings, in frame order.
fn meta_list(a: &Frame) -> Vec<String> {
    a.meta_entries()
        .map(|(t, v)| {
            let name = match t {
                tag::STATUS => "STATUS",
                tag::SERVED_BY => "SERVED_BY",
                tag::ERROR => "ERROR",
                tag::HEADER => "HEADER",
                tag::CONTENT_TYPE => "CONTENT_TYPE",
                _ => "OTHER",
            };
            format!("{name} {}", String::from_utf8_lossy(v))
        })
        .collect()
}

/// PROTOCOL.md section 10, Response: STATUS, SERVED_BY, ERROR (router errors), the task's
/// HEADER and CONTENT_TYPE entries (for a router error, CONTENT_TYPE `application/json`), then
/// the serving router's `fedbus-partition` / `fedbus-hops` lines last, as on a local answer.
/// The entry router relays the error's content type, so an HTTP and an /api/ws client of spb1
/// see `application/json` on spb2's error exactly as on spb1's own.
#[test]
fn p51_peer_response_order_and_error_content_type() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    let tok = f.token("spb1").to_string();
    let mut meta: Vec<(u8, &[u8])> = vec![
        (tag::CLUSTER, b"ru/spb1"),
        (tag::APP, APP.as_bytes()),
        (tag::SERVICE, b"api"),
        (tag::MODULE, b"sys"),
        (tag::FUNCTION, b"echo"),
        (tag::WSID, b"21"),
        (tag::CONTENT_TYPE, b"text/plain"),
        (tag::TOKEN, tok.as_bytes()),
    ];
    let a = peer_req(&mut w, 1, &meta, b"hello");
    let got = meta_list(&a);
    assert_eq!(status(&a), 200, "{got:?}");
    assert_eq!(got[..2], ["STATUS 200", "SERVED_BY ru/spb1/r0"], "{got:?}");
    assert_eq!(
        got[got.len() - 2..],
        ["HEADER fedbus-partition: 5", "HEADER fedbus-hops: 0"],
        "the serving router's lines come last: {got:?}"
    );
    assert!(
        got[2..got.len() - 2].contains(&"CONTENT_TYPE text/plain".to_string()),
        "the task's CONTENT_TYPE, before the fedbus lines: {got:?}"
    );
    // A router error (no token): CONTENT_TYPE application/json, then the fedbus lines.
    meta.pop();
    let a = peer_req(&mut w, 2, &meta, b"x");
    let got = meta_list(&a);
    assert_eq!(
        got,
        [
            "STATUS 401",
            "SERVED_BY ru/spb1/r0",
            "ERROR missing_token",
            "CONTENT_TYPE application/json",
            // No fedbus-partition: the token is checked before a partition is chosen.
            "HEADER fedbus-hops: 0",
        ],
        "{a:?}"
    );
    // Relayed to spb1's clients: the same content type as spb1's own errors.
    let e = f.router("spb1", 0);
    let local = e.conn().request(&Req::post(&f.path("spb1", 3)).body(b"x"));
    local.assert_error(401, "missing_token");
    let relayed = e.conn().request(&Req::post(&f.path("spb2", 3)).body(b"x"));
    relayed.assert_error(401, "missing_token");
    assert!(served_by(&relayed).starts_with("ru/spb2/"), "{relayed:?}");
    let mut c = Ws::open(e, Some("not.a.jwt"));
    let mut cts = Vec::new();
    for (id, cluster) in [(1, "spb1"), (2, "spb2")] {
        c.send(id, &f.path(cluster, 3), b"x");
        let a = c.frame();
        assert_eq!(status(&a), 401, "{a:?}");
        cts.push(a.get_str(tag::CONTENT_TYPE).map(str::to_string));
    }
    assert_eq!(
        cts,
        [
            Some("application/json".into()),
            Some("application/json".into())
        ],
        "/api/ws: spb1's own 401, then spb2's relayed"
    );
}

// ---------------------------------------------------------------- peers that stall

/// A router of another cluster, played by the test: it takes any peer upgrade, answers pings,
/// and answers a request (200, body `name`) only while `answering` is set; requests it held
/// meanwhile are answered (late) once it is set. Each connection runs on its own thread.
struct FakePeer {
    addr: std::net::SocketAddr,
    answering: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakePeer {
    fn start(name: &'static str, answering: bool) -> FakePeer {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake peer");
        let addr = l.local_addr().expect("addr");
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(answering));
        let answering = flag.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let flag = flag.clone();
                std::thread::spawn(move || FakePeer::serve(s, name, &flag));
            }
        });
        FakePeer { addr, answering }
    }

    /// Reads a websocket upgrade head on `s` and answers 101; what followed the head.
    fn upgrade(s: &mut TcpStream) -> Option<Vec<u8>> {
        use fedbus_testkit::ReadRetrying;
        let mut got = Vec::new();
        let mut b = [0u8; 16 * 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read_retrying(&mut b) {
                Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                _ => return None,
            }
        }
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&got[..end]).into_owned();
        got.drain(..end);
        let key = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })?;
        let accept = fedbus_router::ws::handshake::accept_response(&key);
        s.write_all(accept.as_bytes()).ok()?;
        Some(got)
    }

    fn serve(mut s: TcpStream, name: &str, answering: &std::sync::atomic::AtomicBool) {
        use fedbus_testkit::ReadRetrying;
        let Some(mut got) = FakePeer::upgrade(&mut s) else {
            return;
        };
        let mut b = [0u8; 16 * 1024];
        let send = |s: &mut TcpStream, op: u8, payload: &[u8]| {
            s.write_all(&ws_message(op, payload)).is_ok()
        };
        let mut held: Vec<u64> = Vec::new();
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        loop {
            if answering.load(std::sync::atomic::Ordering::SeqCst) {
                for id in held.drain(..) {
                    let mut meta = bytes::BytesMut::new();
                    put_meta(&mut meta, tag::STATUS, b"200");
                    let f = encode_frame(Kind::Response, 0, 0, 0, id, &meta, name.as_bytes());
                    if !send(&mut s, wsf::opcode::BINARY, &f) {
                        return;
                    }
                }
            }
            while let Ok(Some(h)) = wsf::parse_head(&got) {
                let total = h.header_len + h.payload_len as usize;
                if got.len() < total {
                    break;
                }
                let mut p = got[h.header_len..total].to_vec();
                if let Some(m) = h.mask {
                    for (i, b) in p.iter_mut().enumerate() {
                        *b ^= m[i % 4];
                    }
                }
                got.drain(..total);
                match h.opcode {
                    wsf::opcode::PING if !send(&mut s, wsf::opcode::PONG, &p) => return,
                    wsf::opcode::CLOSE => return,
                    wsf::opcode::BINARY => {
                        if let Ok(f) = Frame::decode(bytes::Bytes::from(p)) {
                            held.push(f.header.request_id);
                        }
                    }
                    _ => {}
                }
            }
            match s.read_retrying(&mut b) {
                Ok(0) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// A one-shard router of cluster `local/dev` (dev mode) whose `[federation]` has one more
/// cluster, `local/far`, with `routers` (played by the test) and a keyring of its own; `limits`
/// are `[limits]` lines. The keyring's folder lives as long as the second value.
fn with_far_cluster(routers: &[std::net::SocketAddr], limits: &[(&str, u64)]) -> (Router, TempDir) {
    let far = TempDir::new("far-cluster");
    let far_keys = far.path().join("keys");
    keys_init(far.path(), &far_keys, &["demo/echo"]);
    let list: Vec<String> = routers.iter().map(|a| format!("\"{a}\"")).collect();
    let fed = format!(
        "[federation]\nentry_point = \"test.local\"\n[[federation.clusters]]\nregion = \"local\"\ncluster = \"far\"\nrouters = [{}]\nkeys = {:?}",
        list.join(", "),
        far_keys.to_str().expect("utf-8")
    );
    let mut b = Router::new()
        .shards(1)
        .dev()
        .listen("external", "\"127.0.0.1:0\"");
    for (k, v) in limits {
        b = b.limit(k, v);
    }
    (b.tail(&fed).start(), far)
}

/// docs/TUNING.md `limits.peer_eject_after_timeouts`: a router of another cluster that keeps
/// its link up (it answers pings) but answers no request is ranked last for its cluster after
/// that many timeouts in a row, so the requests it would get go to the cluster's other router
/// instead of each waiting for its 504; counted and logged. Its late answers bring it back.
#[test]
fn a_peer_router_that_answers_no_request_is_ejected_and_back_once_it_answers() {
    const APP: &str = "demo/echo";
    // Both ready by rank (no status: the same rank); wsid % 2 picks the first tried, so
    // an even wsid starts at `stalled`.
    let stalled = FakePeer::start("stalled", false);
    let good = FakePeer::start("good", true);
    let (r, _far) = with_far_cluster(
        &[stalled.addr, good.addr],
        &[
            ("request_timeout_ms", 300),
            ("peer_eject_after_timeouts", 2),
        ],
    );
    let tok = r.token(APP, "alice");
    let far_path = |wsid: u64| format!("/api/local/far/{APP}/api/{wsid}/sys/echo");
    wait_for(Duration::from_secs(10), || {
        (r.metrics().get("fedbus_peer_links") >= 2.0).then_some(())
    })
    .expect("peer links to both fake routers");
    let ask = |wsid: u64| {
        let (api, path, tok) = (r.api, far_path(wsid), tok.clone());
        std::thread::spawn(move || {
            let mut c = Conn::open(api);
            c.request(&Req::post(&path).token(&tok).body(b"x"))
        })
    };
    // Two requests the stalled router holds: both 504 at the peer deadline (300 ms + 1 s).
    let held: Vec<_> = [0, 2].map(ask).into_iter().collect();
    for h in held {
        let a = h.join().expect("client");
        a.assert_error(504, "peer_timeout");
    }
    wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_peer_ejected_total") >= 1.0).then_some(())
    })
    .expect("the stalled router's link ejected");
    assert!(r.log().contains("peer link ejected"), "{}", r.log());
    // The same wsids now go to the other router of the cluster, at once.
    for wsid in [0, 2, 4] {
        let t = Instant::now();
        let a = ask(wsid).join().expect("client");
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.body, b"good", "wsid {wsid}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // The stalled router answers what it held (late): back in its rank.
    stalled
        .answering
        .store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_peer_readmitted_total") >= 1.0).then_some(())
    })
    .expect("the stalled router back after its late answers");
    let a = ask(0).join().expect("client");
    assert_eq!((a.status, a.body.as_slice()), (200, &b"stalled"[..]));
}

/// docs/TUNING.md `limits.min_body_bytes_per_sec`: a peer link's message that arrives in
/// pieces is held to the pace an HTTP body is (as on `/api/ws`): a router of another cluster
/// trickling one byte at a time, which the link's read timeout never ends, is closed with
/// 1008 once the message is slower than `handshake_timeout_ms` + its length / the pace;
/// counted in `fedbus_slow_messages_closed_total` and logged.
#[test]
fn a_peer_message_trickled_below_the_minimum_pace_closes_the_link_1008() {
    let f = Federation::builder()
        .peer_tls(false)
        .limit("spb1", "handshake_timeout_ms", 1000)
        .start();
    let r = f.router("spb1", 0);
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    // A binary message of 2,000 bytes: whole within 1 s + 2000 / 1024 s at the default pace.
    let mut h = [0u8; wsf::MAX_HEADER];
    let n = wsf::encode_head(wsf::opcode::BINARY, 2000, Some([0; 4]), &mut h);
    w.s.write_all(&h[..n]).expect("frame head");
    let mut trickle = w.s.try_clone().expect("clone");
    let started = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let t = std::thread::spawn(move || {
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) && trickle.write_all(b"x").is_ok()
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let code = w.close_code();
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = t.join();
    assert_eq!(code, 1008, "after {took:?}");
    assert!(took < Duration::from_secs(6), "closed only after {took:?}");
    assert_eq!(r.metrics().get("fedbus_slow_messages_closed_total"), 1.0);
    assert!(
        r.log().contains("peer link message slower than"),
        "{}",
        r.log()
    );
}

/// docs/ARCHITECTURE.md, the memory budget: a forwarded request is held whole until answered
/// (its payload is a slice of the frame), so its metadata draws on `limits.body_budget_bytes`
/// with its body: frames of a peer router carrying 1 MiB of metadata each and 2 bytes of body
/// fill a 2.5 MB budget at the second, and the third is answered `503 overloaded` at once.
#[test]
fn a_forwarded_requests_metadata_is_charged_to_the_body_budget() {
    let f = Federation::builder()
        .peer_tls(false)
        .task_delay_ms("spb1", 1500)
        .limit("spb1", "body_budget_bytes", 2_500_000)
        .start();
    let r = f.router("spb1", 0);
    let mut w = raw_peer(&f, r, "ru/spb2", f.keyring("spb2"));
    let tok = f.token("spb1").to_string();
    let junk = vec![b'j'; 60_000];
    let mut mm = bytes::BytesMut::new();
    for (t, v) in [
        (tag::CLUSTER, &b"ru/spb1"[..]),
        (tag::APP, b"demo/echo"),
        (tag::SERVICE, b"api"),
        (tag::MODULE, b"sys"),
        (tag::FUNCTION, b"echo"),
        (tag::WSID, b"37"),
        (tag::TOKEN, tok.as_bytes()),
    ] {
        put_meta(&mut mm, t, v);
    }
    // An unknown tag, which a receiver skips: 18 entries of 60,000 bytes.
    for _ in 0..18 {
        put_meta(&mut mm, 250, &junk);
    }
    for id in 1..=3u64 {
        let fr = encode_frame(Kind::Request, flags::FORWARDED, 0, 0, id, &mm, b"pp").to_vec();
        w.send_raw(&fr);
    }
    let mut answers = std::collections::BTreeMap::new();
    let started = Instant::now();
    while answers.len() < 3 {
        let a = w.frame();
        answers.insert(a.header.request_id, (status(&a), started.elapsed()));
    }
    let (third, at) = answers[&3];
    assert_eq!(third, 503, "{answers:?}");
    assert!(at < Duration::from_millis(1000), "{answers:?}");
    assert_eq!((answers[&1].0, answers[&2].0), (200, 200), "{answers:?}");
    assert!(r.metrics().get("fedbus_overload_refused_total") >= 1.0);
}

/// A router of another cluster that takes the peer upgrade and closes the link at once (close
/// 1000) is dialed again with the backoff, as one that refuses the dial is: a link that lived
/// less than `limits.ping_interval_ms` does not reset it (it did: about 20 dials a second).
#[test]
fn a_peer_router_that_closes_each_link_at_once_is_dialed_with_backoff() {
    let (n, r, _far) = dials_in(Duration::from_secs(3), &[], |s| {
        let mut h = [0u8; wsf::MAX_HEADER];
        let n = wsf::encode_head(wsf::opcode::CLOSE, 2, None, &mut h);
        let mut m = h[..n].to_vec();
        m.extend_from_slice(&1000u16.to_be_bytes());
        let _ = s.write_all(&m);
    });
    println!("a peer that closes each link at once: {n} dials in 3 s");
    // With the backoff (50 ms doubling, jittered 0.5-1.5x): at most 8 in 3 s.
    assert!(n <= 10, "{n} dials in 3 s");
    assert!(r.log().contains("peer link up"));
}

/// The dialer's backoff starts over after a link that lived at least `limits.ping_interval_ms`,
/// however it ended: a router that drops each link (no close frame: a crash, a network cut)
/// after 600 ms is dialed again at once each time, not after a backoff that doubled with every
/// drop (it did: after a few drops each redial waited seconds).
#[test]
fn a_peer_link_that_lived_is_dialed_again_at_once_when_it_drops() {
    let limits = [("ping_interval_ms", 500)];
    let (n, r, _far) = dials_in(Duration::from_secs(8), &limits, |_| {
        std::thread::sleep(Duration::from_millis(600));
    });
    println!("a peer that drops each link after 600 ms: {n} dials in 8 s");
    // Each link lives 600 ms and is dialed again within 75 ms: about 12 in 8 s. With the
    // backoff doubling on each drop instead (50 ms to 5 s): at most 8.
    assert!(n >= 10, "{n} dials in 8 s");
    assert!(r.log().contains("peer link up"));
}

/// How many times a router (`with_far_cluster`, with `limits`) dials a far router played by
/// the test over `over` from its first dial; each link the far router upgrades is handed to
/// `then` and dropped after it. The far cluster's keyring lives as long as the third value.
fn dials_in(
    over: Duration,
    limits: &[(&str, u64)],
    then: fn(&mut TcpStream),
) -> (usize, Router, TempDir) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let dials = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            counted.fetch_add(1, SeqCst);
            if FakePeer::upgrade(&mut s).is_some() {
                then(&mut s);
            }
        }
    });
    let (r, far) = with_far_cluster(&[addr], limits);
    let first = wait_for(Duration::from_secs(5), || {
        (dials.load(SeqCst) > 0).then(Instant::now)
    })
    .expect("the router dials the far router");
    while first.elapsed() < over {
        std::thread::sleep(Duration::from_millis(50));
    }
    (dials.load(SeqCst), r, far)
}

/// docs/PROTOCOL.md section 10: the dialing router takes only answers (Response, Redirect) on
/// its link; a router of another cluster that sends a Request (or a SecretPush) on it breaks
/// the protocol: the link is closed with 1002, counted in `fedbus_peer_protocol_errors_total`
/// and logged, as the accepting side does for a frame other than a Request. Before, such a
/// frame was ignored at debug level and counted nowhere.
#[test]
fn a_request_from_the_router_we_dialed_closes_the_link_1002() {
    let f = encode_frame(Kind::Request, 0, 0, 0, 1, b"", b"not yours to send");
    let (code, r, _far) = far_router_sends(ws_message(wsf::opcode::BINARY, &f));
    assert_eq!(code, Some(1002));
    assert_eq!(r.metrics().get("fedbus_peer_protocol_errors_total"), 1.0);
    assert!(
        r.log()
            .contains("a frame other than a Response or Redirect"),
        "{}",
        r.log()
    );
}

/// docs/TUNING.md `limits.max_peer_status_per_sec`: a router we dialed that sends status
/// messages faster than that (here 3,000 at once, flipping ready each time, against the
/// default 200 a second counted over 10 s: 2,000) gets its link closed with 1008, counted in
/// `fedbus_abusive_closed_total` and logged. Before, each was parsed and each flip logged, at
/// whatever rate the link carried.
#[test]
fn a_status_flood_from_the_router_we_dialed_closes_the_link_1008() {
    let flood: Vec<u8> = (0..3_000)
        .flat_map(|i| {
            let st = format!(
                r#"{{"kind":"status","ready":{},"draining":false}}"#,
                i % 2 == 0
            );
            ws_message(wsf::opcode::TEXT, st.as_bytes())
        })
        .collect();
    let (code, r, _far) = far_router_sends(flood);
    assert_eq!(code, Some(1008));
    assert_eq!(r.metrics().get("fedbus_abusive_closed_total"), 1.0);
    assert!(
        r.log()
            .contains("status messages over limits.max_peer_status_per_sec"),
        "{}",
        r.log()
    );
}

/// One unmasked websocket message (a server's).
fn ws_message(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; wsf::MAX_HEADER];
    let n = wsf::encode_head(op, payload.len(), None, &mut h);
    let mut m = h[..n].to_vec();
    m.extend_from_slice(payload);
    m
}

/// A router (`with_far_cluster`) dials a far router played by the test, which takes the
/// upgrade, sends `bytes` and reads until the router closes the link: the close code (see
/// [`close_code_of`]), the router, and the far cluster's keyring folder. Only the first dial
/// is taken: later ones are refused and count nothing.
fn far_router_sends(bytes: Vec<u8>) -> (Option<u16>, Router, TempDir) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel::<Option<u16>>();
    std::thread::spawn(move || {
        let Some(mut s) = l.incoming().flatten().next() else {
            return;
        };
        if FakePeer::upgrade(&mut s).is_none() {
            return;
        }
        // The router may close before it reads them all.
        let _ = s.write_all(&bytes);
        let _ = tx.send(close_code_of(&mut s));
    });
    let (r, far) = with_far_cluster(&[addr], &[]);
    let code = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the router dials and closes");
    (code, r, far)
}

/// Reads websocket frames from the router (a client, so masked) on `s` until a close; its
/// code (None: a close without one, or the connection ended first).
fn close_code_of(s: &mut TcpStream) -> Option<u16> {
    use fedbus_testkit::ReadRetrying;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (mut got, mut b) = (Vec::new(), [0u8; 16 * 1024]);
    loop {
        while let Ok(Some(h)) = wsf::parse_head(&got) {
            let total = h.header_len + h.payload_len as usize;
            if got.len() < total {
                break;
            }
            let mut p = got[h.header_len..total].to_vec();
            if let Some(k) = h.mask {
                p.iter_mut().enumerate().for_each(|(i, b)| *b ^= k[i % 4]);
            }
            got.drain(..total);
            if h.opcode == wsf::opcode::CLOSE {
                return p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
        match s.read_retrying(&mut b) {
            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
            _ => return None,
        }
    }
}

/// docs/TUNING.md `limits.peer_eject_after_timeouts`, siblings: a router with no task of the
/// app at all hands a request for a partition only its sibling serves to that sibling even
/// while the sibling's link is ejected (its last resort, as an ejected router of another
/// cluster is), instead of answering 503 `no_live_task` at once. Here r1 of spb2 has no task;
/// r0's task serves partition 13; r0 is stopped (SIGSTOP) until two requests time out on its
/// link and r1 ejects it; a third request goes to r0 anyway and, once r0 runs again, is
/// answered by it. Before, the third got 503 `no_live_task` while r0 was out.
#[test]
fn an_ejected_sibling_is_the_last_resort_of_a_router_without_tasks() {
    // The third request's peer deadline (request_timeout_ms + 1 s) leaves a loaded machine
    // time to resume r0 and have it answer; pings every 10 s keep the link up while r0 is
    // stopped (3 silent intervals close it).
    let mut f = Federation::builder()
        .peer_tls(false)
        .request_timeout_ms(1500)
        .limit("spb2", "peer_eject_after_timeouts", 2)
        .limit("spb2", "ping_interval_ms", 10_000)
        .start();
    // spb2's own task leaves both routers; one serving partition 13 links to r0 only.
    f.tasks[1].kill();
    f.start_task_on("spb2", &[0], "13");
    let r1 = f.router("spb2", 1);
    let ask = |wsid: u64| {
        let (api, req) = (r1.api, f.req("spb2", wsid, b"x"));
        std::thread::spawn(move || Conn::open(api).request(&req))
    };
    wait_for(Duration::from_secs(10), || {
        let r = ask(13).join().expect("client");
        (r.status == 200 && served_by(&r) == "ru/spb2/r0").then_some(())
    })
    .expect("r1 hands partition 13 to r0");
    wait_metric(r1, "fedbus_routing_tasks", Duration::from_secs(5), |v| {
        v == 0.0
    });
    let pid = f.router("spb2", 0).pid().expect("r0 runs").to_string();
    let signal = |s: &str| {
        let ok = Command::new("kill").args([s, &pid]).status().expect("kill");
        assert!(ok.success(), "kill {s} {pid}");
    };
    signal("-STOP");
    struct Cont(String);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0]).status();
        }
    }
    let cont = Cont(pid.clone());
    // Two requests r0 does not answer: 504 at the peer deadline (1.5 s + 1 s), then ejected.
    for a in [ask(13), ask(29)].map(|h| h.join().expect("client")) {
        a.assert_error(504, "peer_timeout");
    }
    wait_metric(
        r1,
        "fedbus_peer_ejected_total",
        Duration::from_secs(5),
        |v| v >= 1.0,
    );
    let handoffs = m(r1, "fedbus_sibling_handoffs_total");
    let third = ask(45);
    wait_for(Duration::from_secs(5), || {
        (third.is_finished() || m(r1, "fedbus_sibling_handoffs_total") > handoffs).then_some(())
    })
    .expect("the third request handed on or answered");
    drop(cont);
    let a = third.join().expect("client");
    assert_eq!(
        (a.status, served_by(&a)),
        (200, "ru/spb2/r0"),
        "(a 504: r0 answered past the peer deadline) {a:?}"
    );
}
