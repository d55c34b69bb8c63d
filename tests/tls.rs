//! TLS on the api listener (`listen.api_tls`, docs/ARCHITECTURE.md "TLS"), end to end against a
//! real router and echo task: HTTPS with a client that verifies the CA, ALPN, TLS 1.3 and 1.2,
//! session resumption, `wss://` from a Python `websockets` client, SNI choosing among
//! certificates, a certificate replaced on disk while a connection stays open, and bad input on
//! the TLS port. Certificates come from `fedbus keys cert` (the keyring's dev CA).

use fedbus_proto::{encode_frame, put_meta, tag, Frame, Kind};
use fedbus_testkit::tls::{connect, der, peer_cert, probe, verifying, Tls};
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use rustls::{ClientConfig, HandshakeKind};
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const APP: &str = "demo/echo";

/// Certificates issued by a fresh dev CA: `a` (the default) for `a.test` and 127.0.0.1, `b`
/// for `b.test`.
struct Certs {
    dir: TempDir,
    ca: PathBuf,
    a: (PathBuf, PathBuf),
    b: (PathBuf, PathBuf),
}

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("tls-certs");
        let a = dev_cert(dir.path(), "a", &["a.test", "127.0.0.1"]);
        let b = dev_cert(dir.path(), "b", &["b.test"]);
        Certs {
            ca: dir.path().join("keys/tls/dev-ca.pem"),
            dir,
            a,
            b,
        }
    }
}

fn client_config(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    verifying(ca, versions, &[b"http/1.1"], true)
}

/// One HTTP request and its answer (status, body) on a TLS connection.
fn exchange(s: &mut Tls, req: &Req) -> (u16, Vec<u8>) {
    s.write_all(&req.bytes()).expect("write request");
    s.flush().expect("flush");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let done = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&buf).expect("response head parses") {
                httparse::Status::Complete(n) => {
                    let len = r
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map(|h| {
                            std::str::from_utf8(h.value)
                                .expect("length")
                                .parse::<usize>()
                                .expect("length")
                        })
                        .unwrap_or(0);
                    (buf.len() >= n + len).then(|| (r.code.expect("status"), n, len))
                }
                httparse::Status::Partial => None,
            }
        };
        if let Some((code, n, len)) = done {
            return (code, buf[n..n + len].to_vec());
        }
        let k = s.read_retrying(&mut chunk).expect("read response");
        assert!(k > 0, "connection closed before the answer");
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn echo(r: &Router, s: &mut Tls, wsid: u64, body: &[u8]) {
    let tok = r.token(APP, "alice");
    let (status, got) = exchange(s, &Req::post(&r.path(APP, wsid)).token(&tok).body(body));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert!(got == body, "echo differs ({} bytes sent)", body.len());
}

#[test]
fn https_echo_with_alpn_tls13_tls12_and_resumption() {
    let certs = Certs::new();
    let r = Router::new()
        .tls(&[certs.a.clone(), certs.b.clone()])
        .start();
    let _t = r.task().start();
    let addr = r.api_tls.expect("TLS listener");
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let cfg = client_config(&certs.ca, &[version]);
        let mut s = connect(addr, &cfg, "a.test").expect("handshake");
        assert_eq!(s.conn.protocol_version(), Some(version.version));
        assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(s.conn.handshake_kind(), Some(HandshakeKind::Full));
        for i in 0..3u64 {
            echo(&r, &mut s, i, &random_bytes(1 + 1000 * i as usize, i));
        }
        // A body over many TLS records each way.
        echo(&r, &mut s, 9, &random_bytes(300_000, 9));
        drop(s);
        let mut s = connect(addr, &cfg, "a.test").expect("second handshake");
        assert_eq!(
            s.conn.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}: the second connection resumes the session"
        );
        echo(&r, &mut s, 4, b"resumed");
    }
    // The plaintext listener still serves beside it.
    let tok = r.token(APP, "alice");
    let resp = r.request(&Req::post(&r.path(APP, 1)).token(&tok).body(b"plain"));
    assert_eq!((resp.status, &resp.body[..]), (200, &b"plain"[..]));
    assert!(r.metrics().get("fedbus_tls_handshakes_total") >= 4.0);
}

#[test]
fn sni_picks_the_certificate_and_others_get_the_default() {
    let certs = Certs::new();
    let r = Router::new()
        .tls(&[certs.a.clone(), certs.b.clone()])
        .start();
    let addr = r.api_tls.expect("TLS listener");
    let cfg = client_config(&certs.ca, &[&rustls::version::TLS13]);
    let (a, b) = (der(&certs.a.0), der(&certs.b.0));
    assert_ne!(a, b);
    let s = connect(addr, &cfg, "b.test").expect("b.test verifies");
    assert!(peer_cert(&s) == b, "SNI b.test gets certificate b");
    let s = connect(addr, &cfg, "a.test").expect("a.test verifies");
    assert!(peer_cert(&s) == a, "SNI a.test gets certificate a");
    // An IP address is not sent as SNI: the default certificate (a) answers, and it is valid
    // for 127.0.0.1.
    let s = connect(addr, &cfg, "127.0.0.1").expect("no SNI: the default verifies");
    assert!(peer_cert(&s) == a);
    // A name no certificate covers gets the default too (which the client then refuses).
    let Err(e) = connect(addr, &cfg, "c.test") else {
        panic!("c.test must not verify: no certificate covers it");
    };
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[test]
fn sighup_reloads_the_certificates() {
    let certs = Certs::new();
    // No mtime poll within the test: only the signal can reload.
    let r = seed::start_with(
        Router::new().tls(std::slice::from_ref(&certs.a)),
        "[auth]\nreload_poll_ms = 3600000",
    );
    let addr = r.api_tls.expect("TLS listener");
    let probe = probe();
    let first = der(&certs.a.0);
    dev_cert(certs.dir.path(), "a", &["a.test", "127.0.0.1"]);
    let second = der(&certs.a.0);
    let s = connect(addr, &probe, "a.test").expect("handshake");
    assert!(peer_cert(&s) == first, "no reload before the signal");
    seed::sighup(&r);
    let served = wait_for(Duration::from_secs(5), || {
        let s = connect(addr, &probe, "a.test").ok()?;
        (peer_cert(&s) == second).then_some(())
    });
    assert!(served.is_some(), "SIGHUP did not reload:\n{}", r.log());
    let log = r.log();
    assert!(
        log.contains("TLS certificates reloaded") && !log.contains("certificate files changed"),
        "the reload came from the signal, not the file poll:\n{log}"
    );
}

#[test]
fn a_replaced_certificate_serves_new_connections_while_old_ones_keep_working() {
    let certs = Certs::new();
    let r = Router::new().tls(std::slice::from_ref(&certs.a)).start();
    let _t = r.task().start();
    let addr = r.api_tls.expect("TLS listener");
    let cfg = client_config(&certs.ca, &[&rustls::version::TLS13]);
    let mut old = connect(addr, &cfg, "a.test").expect("handshake");
    echo(&r, &mut old, 1, b"before");
    let first = peer_cert(&old);

    // Replaced on disk (a new key and certificate for the same names); no signal.
    dev_cert(certs.dir.path(), "a", &["a.test", "127.0.0.1"]);
    let second = der(&certs.a.0);
    assert_ne!(first, second);
    let probe = probe();
    let served = wait_for(Duration::from_secs(10), || {
        let s = connect(addr, &probe, "a.test").ok()?;
        (peer_cert(&s) == second).then_some(())
    });
    assert!(
        served.is_some(),
        "new connections never got the new certificate:\n{}",
        r.log()
    );
    // The new certificate verifies against the CA, and the old connection still works.
    let mut new = connect(addr, &cfg, "a.test").expect("new certificate verifies");
    echo(&r, &mut new, 2, b"after, new connection");
    echo(&r, &mut old, 3, b"after, old connection");
    assert!(r.log().contains("TLS certificates reloaded"), "{}", r.log());
}

/// Reads until the router closes; true when it did within the read timeout.
fn closed_by_router(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match s.read_retrying(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// What a plain HTTP client gets on a TLS port: `400 tls_required` naming `scheme`, then the
/// end of the connection (as nginx's "plain HTTP request was sent to HTTPS port").
fn assert_tls_required(s: &mut TcpStream, scheme: &str) {
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        match s.read_retrying(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => panic!(
                "no clean close after {:?}: {e}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("\"error\":\"tls_required\""), "{text}");
    assert!(text.contains(scheme), "{text}");
}

#[test]
fn plaintext_and_stalled_handshakes_are_counted_and_cut() {
    let certs = Certs::new();
    let mut r = Router::new()
        .tls(std::slice::from_ref(&certs.a))
        .limit("handshake_timeout_ms", 500)
        .start();
    let _t = r.task().start();
    let addr = r.api_tls.expect("TLS listener");
    let mut plain = TcpStream::connect(addr).expect("connect");
    plain.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    plain
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert_tls_required(&mut plain, "https://");
    let mut stalled = TcpStream::connect(addr).expect("connect");
    stalled
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    assert!(
        closed_by_router(&mut stalled),
        "a client that never starts its handshake is cut by limits.handshake_timeout_ms"
    );
    let counted = wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_tls_handshake_failures_total") >= 2.0).then_some(())
    });
    assert!(counted.is_some(), "{}", r.metrics_text());
    assert!(r.alive());
    assert!(r.log().contains("TLS handshake failed"), "{}", r.log());
    let cfg = client_config(&certs.ca, &[&rustls::version::TLS13]);
    let mut s = connect(addr, &cfg, "a.test").expect("handshake after bad input");
    echo(&r, &mut s, 5, b"still serving");
}

/// A Python 3 that has `websockets`; the test fails (does not skip) without one.
fn python() -> String {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`python3 -c 'import websockets'` fails: install python3-websockets; CI installs it"
    );
    "python3".into()
}

const WSS_CLIENT: &str = r#"
import asyncio, ssl, sys, websockets
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    async with websockets.connect(sys.argv[1], ssl=ctx, open_timeout=5) as ws:
        for frame in sys.argv[3:]:
            await ws.send(bytes.fromhex(frame))
        for _ in sys.argv[3:]:
            msg = await asyncio.wait_for(ws.recv(), 5)
            print(msg.hex())
asyncio.run(main())
"#;

#[test]
fn wss_api_ws_answers_a_python_websockets_client() {
    let certs = Certs::new();
    let r = Router::new().tls(std::slice::from_ref(&certs.a)).start();
    let _t = r.task().start();
    let addr = r.api_tls.expect("TLS listener");
    let tok = r.token(APP, "alice");
    let url = format!("wss://127.0.0.1:{}/api/ws?access_token={tok}", addr.port());
    wss_echo_round_trip(&url, &certs.ca, 3, &|| r.log());
}

/// Sends `n` echo requests (ids 1..=n, wsid = id) as one `/api/ws` session of the Python
/// `websockets` client over `url` (`wss://`, trusting the CA in `ca`) and checks that each
/// comes back answered with its own body; `log` is printed when the client fails.
fn wss_echo_round_trip(url: &str, ca: &Path, n: u64, log: &dyn Fn() -> String) {
    let frames: Vec<String> = (1..=n)
        .map(|id| {
            let mut meta = bytes::BytesMut::new();
            let path = format!("/api/local/dev/{APP}/api/{id}/sys/echo");
            put_meta(&mut meta, tag::PATH, path.as_bytes());
            let body = format!("wss request {id}");
            let f = encode_frame(Kind::Request, 0, 0, 0, id, &meta, body.as_bytes());
            f.iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect();
    let out = std::process::Command::new(python())
        .args(["-c", WSS_CLIENT, url, ca.to_str().expect("utf-8")])
        .args(&frames)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python wss client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let mut ids: Vec<u64> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|hex| {
            let b: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            let f = Frame::decode(bytes::Bytes::from(b)).expect("a fedbus frame");
            assert_eq!(f.header.kind, Kind::Response, "{f:?}");
            let id = f.header.request_id;
            assert_eq!(&f.payload[..], format!("wss request {id}").as_bytes());
            id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=n).collect::<Vec<_>>());
}

/// A child process killed and reaped on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The TLS issue's first acceptance point, from a fresh home: `fedbus run` on embedded
/// defaults (no config) makes a dev CA in its keyring and serves HTTPS on 127.0.0.1:8443;
/// `curl --cacert <dev CA>` gets the echo back from the built-in echo task, and a Python
/// `websockets` client over `wss://` gets answers. It binds the embedded defaults' fixed
/// ports (8800, 8443, 8900, ...) on 127.0.0.1: no other test uses them.
#[test]
fn embedded_defaults_serve_https_and_wss_through_the_dev_ca() {
    let home = TempDir::new("embedded");
    let h = home.path();
    let spawn = |args: &[&str], log: &str| {
        let c = std::process::Command::new(bin())
            .args(args)
            .env("FEDBUS_HOME", h)
            .current_dir(h)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(h.join(format!("{log}.out"))).expect("log"))
            .stderr(std::fs::File::create(h.join(format!("{log}.log"))).expect("log"))
            .spawn()
            .expect("spawn fedbus");
        KillOnDrop(c)
    };
    let _router = spawn(&["run"], "router");
    let log = || std::fs::read_to_string(h.join("router.log")).unwrap_or_default();
    wait_for(Duration::from_secs(20), || {
        TcpStream::connect("127.0.0.1:8443").ok()
    })
    .unwrap_or_else(|| panic!("no HTTPS listener on 127.0.0.1:8443:\n{}", log()));
    let _task = spawn(&["task", "echo"], "task");
    let ca = h.join("keys/tls/dev-ca.pem");
    assert!(ca.is_file(), "no dev CA at {}", ca.display());
    let tok = fedbus(h, &["token", "client", "--app", APP, "--sub", "alice"]);
    let tok = tok.lines().last().expect("a token").trim().to_string();
    let path = "/api/local/dev/demo/echo/api/42/sys/echo";
    // Until the task has linked (503 no_live_task before).
    let body = wait_for(Duration::from_secs(20), || {
        let out = std::process::Command::new("curl")
            .args(["-s", "--cacert", ca.to_str().expect("utf-8"), "-H"])
            .arg(format!("Authorization: Bearer {tok}"))
            .args(["--data-binary", "over https"])
            .arg(format!("https://localhost:8443{path}"))
            .output()
            .expect("run curl (scripts/deps installs it)");
        (out.status.success() && out.stdout == b"over https").then_some(out.stdout)
    });
    assert!(
        body.is_some(),
        "curl --cacert never got the echo\n{}",
        log()
    );
    let url = format!("wss://localhost:8443/api/ws?access_token={tok}");
    wss_echo_round_trip(&url, &ca, 2, &log);
}

/// Task links over TLS (`listen.internal_tls`): the built-in task dials with `--tls-ca` and
/// serves requests; a plaintext task link upgrade gets 400 at the handshake and is counted; a task
/// trusting another CA does not link.
#[test]
fn task_links_over_tls_with_a_ca_file() {
    let certs = Certs::new();
    let r = Router::new()
        .tls(std::slice::from_ref(&certs.a))
        .internal_tls()
        .start();
    let ca = certs.ca.to_str().expect("utf-8").to_string();
    let _t = spawn_task(
        &r,
        &["task".into(), "echo".into(), "--tls-ca".into(), ca],
        "-tls",
    );
    let tok = r.token(APP, "alice");
    for wsid in 0..4u64 {
        let body = random_bytes(100 + 5000 * wsid as usize, wsid);
        let resp = r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(&body));
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(resp.body == body);
    }
    let handshakes = r.metrics().get("fedbus_tls_handshakes_total");
    assert!(handshakes >= 1.0, "the task's link was a TLS handshake");

    // A plaintext upgrade on the internal listener: 400 tls_required, and closed.
    let failures = r.metrics().get("fedbus_tls_handshake_failures_total");
    let mut s = TcpStream::connect(r.internal[0]).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /link HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .expect("write");
    assert_tls_required(&mut s, "--tls-ca");
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.metrics().get("fedbus_tls_handshake_failures_total") < failures + 1.0 {
        assert!(std::time::Instant::now() < deadline, "failure not counted");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A task that trusts another CA refuses the router's certificate and never links.
    let other = TempDir::new("tls-other-ca");
    let other_ca = other.path().join("ca");
    fedbus(
        other.path(),
        &["keys", "ca", "--out", other_ca.to_str().expect("utf-8")],
    );
    let log = other.path().join("task.log");
    let mut child = std::process::Command::new(bin())
        .args(["task", "echo", "--keyring", r.keys.to_str().expect("utf-8")])
        .args(["--router", &r.internal[0].to_string()])
        .args([
            "--tls-ca",
            other_ca.with_extension("pem").to_str().expect("utf-8"),
        ])
        .env("FEDBUS_HOME", other.path())
        .env("FEDBUS_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "task log: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
