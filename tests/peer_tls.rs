//! Peer links over mutual TLS (`[tls.peer]`, docs/FEDERATION.md "Peer links over TLS"): a
//! federation whose routers hold certificates of a federation CA made with `fedbus keys ca`
//! and `fedbus keys cert --ca` routes across clusters; the external listener refuses a
//! plaintext dialer, a dialer without a client certificate, one with a certificate of another
//! CA, and one whose certificate names no router of its peer token's cluster, each before any
//! request crosses, counted and logged; a dialer that reaches an impostor on a peer router's
//! address (a certificate of another CA, or of the right CA for another name) refuses it
//! before it sends its peer token.

use fedbus_testkit::fed::*;
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        r.add(c.expect("CA PEM")).expect("CA certificate");
    }
    Arc::new(r)
}

fn chain(cert: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .map(|c| c.expect("cert PEM"))
        .collect()
}

/// A client config trusting `ca`, presenting `cert` (cert, key) when given.
fn client(ca: &Path, cert: Option<&(std::path::PathBuf, std::path::PathBuf)>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(ca));
    Arc::new(match cert {
        Some((c, k)) => b
            .with_client_auth_cert(chain(c), PrivateKeyDer::from_pem_file(k).expect("key"))
            .expect("client cert"),
        None => b.with_no_client_auth(),
    })
}

/// Dials `addr` over TLS and asks for a peer link with `token`: the upgrade's status, or why
/// there was none (the handshake failed or the router closed).
fn tls_peer_upgrade(addr: SocketAddr, cfg: Arc<ClientConfig>, token: &str) -> Result<u16, String> {
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let name = ServerName::try_from(addr.ip().to_string()).expect("name");
    let conn = ClientConnection::new(cfg, name).expect("client");
    let mut s = StreamOwned::new(conn, tcp);
    let req = format!(
        "GET /peer HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 2048];
        match s.read_retrying(&mut b) {
            Ok(0) => return Err(format!("closed: {:?}", String::from_utf8_lossy(&buf))),
            Ok(n) => buf.extend_from_slice(&b[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad head {head:?}"))
}

/// `text` without ANSI colour sequences (the routers' log lines).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut esc = false;
    for c in text.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

/// A CA of nobody's federation, made the same way.
fn other_ca(root: &Path) -> PeerCerts {
    let dir = root.join("evil");
    std::fs::create_dir_all(&dir).expect("mkdir");
    PeerCerts::make(&dir)
}

fn wait_metric(r: &FedRouter, name: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = r.metrics().get(name);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {name} = {v}, waited for {at_least}",
            r.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Requests enter every router and reach the right cluster over TLS peer links; nothing was
/// refused along the way, and the links were accepted over TLS.
#[test]
fn federation_routes_over_tls_peer_links() {
    let f = Federation::builder().shards(2).peer_tls(true).start();
    for entry in &f.routers {
        let mut c = entry.conn();
        for target in CLUSTERS {
            for wsid in [16u64, 17, 1_000_003] {
                let body = random_bytes(300, wsid);
                let resp = c.request(&f.req(target, wsid, &body));
                assert_eq!(resp.status, 200, "{} -> {target}: {resp:?}", entry.name);
                assert_eq!(resp.body, body);
                let want = if entry.cluster == target {
                    entry.name.clone()
                } else {
                    format!("ru/{target}/r{}", wsid % 2)
                };
                assert_eq!(resp.header("fedbus-served-by"), Some(want.as_str()));
            }
        }
    }
    for r in &f.routers {
        let m = r.metrics();
        assert_eq!(m.get("fedbus_peer_tls_refused_total"), 0.0, "{}", r.name);
        assert_eq!(
            m.get("fedbus_peer_tls_dial_refused_total"),
            0.0,
            "{}",
            r.name
        );
        let log = plain(&r.log());
        assert!(
            log.lines()
                .any(|l| l.contains("peer link accepted") && l.contains("tls=true")),
            "{}: links accepted over TLS",
            r.name
        );
    }
}

/// The external listener refuses, before any request is read: a plaintext dialer, a TLS
/// dialer without a client certificate, one with a certificate of another CA, and one whose
/// federation certificate names no router of the cluster of its peer token. A dialer with
/// spb2's certificate and spb2's token is let in (the control).
/// A peer link's first byte and its upgrade head share one `limits.handshake_timeout_ms` from
/// accept (as its TLS handshake does). Before, the head had a new one after the first byte
/// came: a dialer that sent one byte just in time held its slot
/// (`limits.max_link_connections_per_shard`) twice as long.
#[test]
fn a_peer_links_first_byte_and_head_share_one_deadline() {
    let f = Federation::builder()
        .peer_tls(true)
        .limit("spb1", "handshake_timeout_ms", 3000)
        .start();
    let target = f.router("spb1", 0);
    let mut s = TcpStream::connect(target.external).expect("connect");
    let t = Instant::now();
    // A slow dialer: one byte 1.5 s in (plaintext: refused, its head read only to answer),
    // then nothing.
    std::thread::sleep(Duration::from_millis(1500));
    s.write_all(b"G").expect("first byte");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1024];
    let end = loop {
        match s.read_retrying(&mut b) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let took = t.elapsed();
    assert!(end.is_ok(), "not cut: {end:?}");
    // 3 s from accept; before, 3 s from the first byte (4.5 s).
    assert!(took < Duration::from_millis(4200), "cut after {took:?}");
}

#[test]
fn peers_without_a_federation_certificate_are_refused() {
    let f = Federation::builder().peer_tls(true).start();
    let fed = f.peer_tls.as_ref().expect("peer tls");
    let target = f.router("spb1", 0);
    let spb2 = f.router("spb2", 0);
    let token = f.peer_token("ru/spb2", f.keyring("spb2"), None);
    let evil = other_ca(&f.root);
    let evil_cert = evil.issue(&f.root, "evil-spb2", &spb2.ip.to_string());
    let good_cert = fed.issue(&f.root, "test-spb2", &spb2.ip.to_string());
    let spb1_cert = fed.issue(&f.root, "test-spb1", &f.router("spb1", 1).ip.to_string());
    let before = target.metrics().get("fedbus_peer_tls_refused_total");

    // Plaintext: 403 tls_required, the upgrade is not read.
    let (_s, status, head, _) = peer_upgrade(target.external, Some(&token));
    assert_eq!(status, 403, "{head}");
    wait_metric(target, "fedbus_peer_tls_refused_total", before + 1.0);

    let cases = [
        ("no client certificate", client(&fed.ca, None)),
        (
            "a certificate of another CA",
            client(&fed.ca, Some(&evil_cert)),
        ),
        (
            "spb1's certificate with spb2's token",
            client(&fed.ca, Some(&spb1_cert)),
        ),
    ];
    for (i, (what, cfg)) in cases.into_iter().enumerate() {
        let got = tls_peer_upgrade(target.external, cfg, &token);
        assert!(got != Ok(101), "{what}: {got:?}");
        match i {
            // The dialer reads why (a TLS alert), not a reset.
            0 => assert_eq!(
                got,
                Err("received fatal alert: CertificateRequired".into()),
                "{what}"
            ),
            1 => assert!(
                got.as_ref()
                    .is_err_and(|e| e.starts_with("received fatal alert")),
                "{what}: {got:?}"
            ),
            _ => assert_eq!(got, Ok(403), "{what}: refused after the handshake, by name"),
        }
        wait_metric(
            target,
            "fedbus_peer_tls_refused_total",
            before + 2.0 + i as f64,
        );
    }
    // Control: the federation's certificate for spb2's router with spb2's token.
    let got = tls_peer_upgrade(target.external, client(&fed.ca, Some(&good_cert)), &token);
    assert_eq!(got, Ok(101));
    assert_eq!(
        target.metrics().get("fedbus_peer_tls_refused_total"),
        before + 4.0,
        "the good dialer is not counted"
    );
    let log = plain(&target.log());
    assert!(log.contains("peer link refused: plaintext"), "log line");
    assert!(log.contains("peer link refused: TLS handshake"), "log line");
    assert!(log.contains("peer_identity"), "log line");
}

/// What an impostor saw: connections, and whether any sent it application data.
struct Impostor {
    connections: Arc<AtomicUsize>,
    got_data: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Impostor {
    /// Listens on `addr` with `cert` and records what dialers do.
    fn start(addr: SocketAddr, cert: &(std::path::PathBuf, std::path::PathBuf)) -> Impostor {
        let cfg = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(
                    chain(&cert.0),
                    PrivateKeyDer::from_pem_file(&cert.1).expect("key"),
                )
                .expect("server cert"),
        );
        // The killed router's sockets stay bound for a few milliseconds after it has been
        // reaped (the kernel tears its io_uring down later): wait until the address is free.
        let since = Instant::now();
        let l = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && since.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("impostor bind {addr}: {e}"),
            }
        };
        l.set_nonblocking(true).expect("nonblocking");
        let (connections, got_data, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, g, st) = (connections.clone(), got_data.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                tcp.set_nonblocking(false).expect("blocking");
                tcp.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let conn = rustls::ServerConnection::new(cfg.clone()).expect("server");
                let mut s = StreamOwned::new(conn, tcp);
                let mut b = [0u8; 1];
                if let Ok(n) = s.read_retrying(&mut b) {
                    if n > 0 {
                        g.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
        Impostor {
            connections,
            got_data,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("impostor thread");
        }
    }
}

/// spb2's router r1 dies and an impostor takes its address: first with a certificate of
/// another CA for that address, then with one of the federation's CA for another name. spb1's
/// dialers refuse both at the handshake (counted, logged) and never send them a byte of the
/// upgrade, so not the peer token either; requests for spb2 go on through spb2's r0.
#[test]
fn a_dialer_refuses_an_impostor_router() {
    let mut f = Federation::builder().peer_tls(true).start();
    let victim_ip = f.router("spb2", 1).ip;
    let victim = f.router("spb2", 1).external;
    f.router_mut("spb2", 1).kill9();
    let fed = f.peer_tls.as_ref().expect("peer tls");
    let evil = other_ca(&f.root);
    let phases = [
        (
            "another CA",
            evil.issue(&f.root, "impostor-1", &victim_ip.to_string()),
        ),
        (
            "the federation CA, another name",
            fed.issue(&f.root, "impostor-2", "127.0.0.99"),
        ),
    ];
    let dialer = f.router("spb1", 0);
    let mut refused = dialer.metrics().get("fedbus_peer_tls_dial_refused_total");
    for (what, cert) in &phases {
        let imp = Impostor::start(victim, cert);
        refused = wait_metric(dialer, "fedbus_peer_tls_dial_refused_total", refused + 1.0);
        assert!(
            imp.connections.load(Ordering::Relaxed) >= 1,
            "{what}: dialed"
        );
        assert!(
            !imp.got_data.load(Ordering::Relaxed),
            "{what}: the dialer sent application data to an impostor"
        );
        imp.stop();
        // The cluster is still served by its real router r0.
        let resp = dialer.conn().request(&f.req("spb2", 0, b"still"));
        assert_eq!(resp.status, 200, "{what}: {resp:?}");
        assert_eq!(resp.header("fedbus-served-by"), Some("ru/spb2/r0"));
    }
    assert!(plain(&dialer.log()).contains("peer link refused: TLS handshake with"));
}
