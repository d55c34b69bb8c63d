//! A helper's TLS probe written from the docs (4 failed on 618df4e: `keys cert|ca --out` with
//! dots wrote the wrong files; the docs promised SNI by IP address, certificates read without a
//! TLS listener, a log line for a removed key file at the poll).
//! Probe of TLS at the edge, from the docs (README "Try it"/"Commands", ARCHITECTURE.md "TLS",
//! TUNING.md "TLS", `listen.api_tls`, `tls.certs`, `tls.session_cache`, `tls.tickets`,
//! `listen.internal_tls`, PROTOCOL.md 8.2): one documented promise or one hostile input per
//! test, every read bounded by a timeout.

use fedbus_proto::Frame;
use fedbus_testkit::tls::{connect, der, probe, verifying, Pki, Tls};
use fedbus_testkit::ws;
use fedbus_testkit::ReadRetrying;
use fedbus_testkit::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

// ---------------------------------------------------------------------------------------------
// Helpers.

fn ca13(ca: &Path) -> Arc<ClientConfig> {
    verifying(ca, &[&rustls::version::TLS13], &[b"http/1.1"], false)
}

fn served(addr: SocketAddr, name: &str) -> Vec<u8> {
    let s = connect(addr, &probe(), name).expect("probe handshake");
    s.conn.peer_certificates().expect("certificate")[0].to_vec()
}

/// A parsed answer: status, headers (lowercase), body.
#[derive(Debug)]
struct Ans {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Ans {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }
    fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|j| j["error"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// Reads one answer from `s`, buffering extra bytes in `buf`.
fn read_ans<S: Read>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<Ans> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let parsed = {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    (buf.len() >= n + len).then(|| (r.code.unwrap_or(0), headers, n, len))
                }
                Ok(httparse::Status::Partial) => None,
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{e}: {:?}", String::from_utf8_lossy(buf)),
                    ))
                }
            }
        };
        if let Some((status, headers, n, len)) = parsed {
            let body = buf[n..n + len].to_vec();
            buf.drain(..n + len);
            if status == 100 {
                continue;
            }
            return Ok(Ans {
                status,
                headers,
                body,
            });
        }
        let k = s.read_retrying(&mut chunk)?;
        if k == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed before an answer: {:?}",
                    String::from_utf8_lossy(buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn echo_req(r: &Router, tok: &str, wsid: u64, body: &[u8]) -> Vec<u8> {
    Req::post(&r.path(APP, wsid)).token(tok).body(body).bytes()
}

fn echo_over(r: &Router, s: &mut Tls, wsid: u64, body: &[u8]) {
    let tok = r.token(APP, "alice");
    s.write_all(&echo_req(r, &tok, wsid, body)).expect("write");
    s.flush().expect("flush");
    let a = read_ans(s, &mut Vec::new()).expect("answer");
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body == body, "echo differs");
}

/// How a TLS connection ended when read: `Ok(true)` close_notify then EOF (rustls read Ok(0)),
/// `Ok(false)` an EOF or reset without close_notify, `Err` a timeout or other error.
fn tls_end(s: &mut Tls, within: Duration) -> Result<bool, String> {
    s.sock.set_read_timeout(Some(within)).expect("timeout");
    let mut b = [0u8; 4096];
    match s.read_retrying(&mut b) {
        Ok(0) => Ok(true),
        Ok(n) => Err(format!(
            "unexpected data: {:?}",
            String::from_utf8_lossy(&b[..n])
        )),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(false),
        Err(e) => Err(format!("{:?}: {e}", e.kind())),
    }
}

/// Reads raw bytes until EOF/reset; Err on timeout.
fn raw_until_end(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, (String, Vec<u8>)> {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut got = Vec::new();
    let mut b = [0u8; 16 * 1024];
    loop {
        match s.read_retrying(&mut b) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err((format!("{e}"), got)),
        }
    }
}

fn metric(r: &Router, name: &str) -> f64 {
    r.metrics().get(name)
}

fn wait_metric(r: &Router, name: &str, at_least: f64) -> f64 {
    wait_for(Duration::from_secs(6), || {
        let v = metric(r, name);
        (v >= at_least).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "{name} stayed below {at_least}: {}\n{}",
            metric(r, name),
            r.log()
        )
    })
}

fn wait_log(r: &Router, needle: &str, count: usize) -> bool {
    wait_for(Duration::from_secs(6), || {
        (r.log().matches(needle).count() >= count).then_some(())
    })
    .is_some()
}

/// The ClientHello rustls would send for `name` with `cfg`.
fn client_hello(cfg: &Arc<ClientConfig>, name: &str) -> Vec<u8> {
    let mut c = ClientConnection::new(
        cfg.clone(),
        ServerName::try_from(name.to_string()).expect("name"),
    )
    .expect("conn");
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello).expect("hello");
    }
    hello
}

/// `openssl s_client` to `addr` with `args`: the first certificate the server sent (DER), and
/// the tool's stdout+stderr.
fn openssl_cert(addr: SocketAddr, args: &[&str]) -> (Option<Vec<u8>>, String) {
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = text.find("-----BEGIN CERTIFICATE-----").and_then(|i| {
        let end = text[i..].find("-----END CERTIFICATE-----")? + i + 25;
        CertificateDer::from_pem_slice(&text.as_bytes()[i..end])
            .ok()
            .map(|c| c.to_vec())
    });
    (cert, text)
}

/// Starts `fedbus run` on `cfg` (written in `home`) and waits for it to exit; returns
/// (exit status or None if still running after 10 s, stderr).
fn run_expecting_exit(home: &Path, cfg: &str) -> (Option<std::process::ExitStatus>, String) {
    let path = home.join("router.toml");
    std::fs::write(&path, cfg).expect("config");
    let log = home.join("run.log");
    let mut child = Command::new(bin())
        .args(["run", "--config", path.to_str().expect("utf-8")])
        .env("FEDBUS_HOME", home)
        .env("FEDBUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let st = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (st, std::fs::read_to_string(&log).unwrap_or_default())
}

/// A config with a TLS api listener and `certs` as `[[tls.certs]]`, keyring made in `home`.
fn tls_config(home: &Path, certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let keys = home.join("keys");
    keys_init(home, &keys, &[APP]);
    let mut c = format!(
        "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\napi_tls = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = [0]\npin = false\n",
        keys.to_str().expect("utf-8")
    );
    for (cert, key) in certs {
        c.push_str(&format!("[[tls.certs]]\ncert = {cert:?}\nkey = {key:?}\n"));
    }
    c.push_str(extra);
    c.push_str(&format!("\n[[apps]]\nname = {APP:?}\npartitions = 16\n"));
    c
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

// ---------------------------------------------------------------------------------------------
// Choosing the certificate (TUNING.md tls.certs: "A client's SNI name picks the first
// certificate valid for it (DNS names, `*.` wildcards, IP addresses); the first entry is the
// default (no SNI, or a name none covers)").

#[test]
fn sni_under_a_wildcard_picks_the_wildcard_certificate() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let w = p.cert("w", &["*.w.test"]);
    let r = Router::new().tls(&[a.clone(), w.clone()]).start();
    let addr = r.api_tls.expect("tls");
    assert!(
        served(addr, "x.w.test") == der(&w.0),
        "x.w.test gets *.w.test"
    );
    // And it verifies with the CA for that name.
    connect(addr, &ca13(&p.ca), "x.w.test").expect("wildcard verifies");
    // One label only: neither the bare name nor two labels.
    assert!(served(addr, "w.test") == der(&a.0), "w.test: the default");
    assert!(
        served(addr, "y.x.w.test") == der(&a.0),
        "y.x.w.test: the default"
    );
}

/// A router with certificates for `a.test` (the default) and `b.test`, and what
/// `openssl s_client -servername <sni>` got from it: (the certificates, b's (cert, key), the
/// router, [`openssl_cert`]'s answer).
#[allow(clippy::type_complexity)]
fn openssl_sni_of_a_and_b(
    sni: &str,
) -> (Pki, (PathBuf, PathBuf), Router, (Option<Vec<u8>>, String)) {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let b = p.cert("b", &["b.test"]);
    let r = Router::new().tls(&[a, b.clone()]).start();
    let addr = r.api_tls.expect("tls");
    let got = openssl_cert(addr, &["-servername", sni]);
    (p, b, r, got)
}

#[test]
fn sni_in_capitals_picks_the_same_certificate() {
    let (_p, b, _r, (cert, out)) = openssl_sni_of_a_and_b("B.TEST");
    assert!(
        cert == Some(der(&b.0)),
        "B.TEST should get b.test's certificate:\n{out}"
    );
}

#[test]
fn sni_with_a_trailing_dot_picks_the_certificate_of_the_name() {
    let (_p, b, r, (cert, out)) = openssl_sni_of_a_and_b("b.test.");
    assert!(
        cert == Some(der(&b.0)),
        "b.test. should get b.test's certificate:\n{out}\n{}",
        r.log()
    );
}

/// TUNING.md tls.certs: "A client dialing an IP address sends no SNI ... and rustls ignores one
/// a client sends anyway, so it gets the first entry". openssl does put an IP literal in SNI;
/// the router still serves the default (the probe that found the docs promising otherwise).
#[test]
fn sni_with_an_ip_literal_gets_the_default_certificate() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let ip = p.cert("ip", &["127.0.0.1"]);
    let r = Router::new().tls(&[a.clone(), ip.clone()]).start();
    let addr = r.api_tls.expect("tls");
    // openssl does put the literal into SNI: its ClientHello, caught on a local listener.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let la = l.local_addr().unwrap();
    let catcher = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; 4096];
        let n = c.read(&mut b).unwrap_or(0);
        b.truncate(n);
        b
    });
    let _ = openssl_cert(la, &["-servername", "127.0.0.1"]);
    let hello = catcher.join().unwrap();
    assert!(
        hello.windows(9).any(|w| w == b"127.0.0.1"),
        "openssl did not send the IP as SNI"
    );
    let (cert, out) = openssl_cert(addr, &["-servername", "127.0.0.1"]);
    assert!(cert.is_some(), "handshake: {out}");
    assert!(
        cert == Some(der(&a.0)),
        "SNI 127.0.0.1 did not get the default certificate (a.test)"
    );
}

#[test]
fn an_invalid_sni_name_is_refused_counted_and_logged() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let addr = r.api_tls.expect("tls");
    let before = metric(&r, "fedbus_tls_handshake_failures_total");
    let (cert, out) = openssl_cert(addr, &["-servername", "a..test"]);
    assert!(cert.is_none(), "an empty label is not a host name: {out}");
    wait_metric(&r, "fedbus_tls_handshake_failures_total", before + 1.0);
    assert!(wait_log(&r, "TLS handshake failed", 1), "{}", r.log());
    // Served on.
    connect(addr, &ca13(&p.ca), "a.test").expect("still serving");
}

#[test]
fn a_chain_file_sends_the_whole_chain_leaf_first() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let chain = p.path().join("chain.pem");
    let mut pem = std::fs::read(&a.0).unwrap();
    pem.extend(std::fs::read(&p.ca).unwrap());
    std::fs::write(&chain, pem).unwrap();
    let r = Router::new().tls(&[(chain, a.1.clone())]).start();
    let s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").expect("verifies");
    let certs = s.conn.peer_certificates().expect("certs");
    assert_eq!(certs.len(), 2, "leaf and CA");
    assert!(certs[0].to_vec() == der(&a.0));
}

// ---------------------------------------------------------------------------------------------
// Certificates at start.

#[test]
fn a_key_of_another_certificate_stops_the_start_naming_the_files() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let b = p.cert("b", &["b.test"]);
    let home = TempDir::new("probe-tls-mismatch");
    let cfg = tls_config(home.path(), &[(a.0.clone(), b.1.clone())], "");
    let (st, log) = run_expecting_exit(home.path(), &cfg);
    let st = st.unwrap_or_else(|| panic!("router still running with a mismatched key:\n{log}"));
    assert!(!st.success(), "{log}");
    assert!(
        log.contains("a.pem") && log.contains("b.key"),
        "names the files: {log}"
    );
}

/// TUNING.md tls.certs: "The files are read only when a TLS listener is set ...; without one
/// the start logs a warning that `[[tls.certs]]` is unused" (before: not a word).
#[test]
fn certificates_without_a_tls_listener_are_warned_about() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let b = p.cert("b", &["b.test"]);
    let home = TempDir::new("probe-tls-nolistener");
    let cfg = tls_config(home.path(), &[(a.0.clone(), b.1.clone())], "")
        .replace("api_tls = \"127.0.0.1:0\"\n", "");
    assert!(!cfg.contains("api_tls"));
    let path = home.path().join("router.toml");
    std::fs::write(&path, &cfg).expect("config");
    let log = home.path().join("run.log");
    let mut child = Command::new(bin())
        .args(["run", "--config", path.to_str().expect("utf-8")])
        .env("FEDBUS_HOME", home.path())
        .env("FEDBUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let warned = wait_for(Duration::from_secs(10), || {
        read().contains("no TLS listener").then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        warned.is_some(),
        "no warning of unused [[tls.certs]]:\n{}",
        read()
    );
}

/// TUNING.md tls.certs: the key is "PKCS#8, PKCS#1 or SEC1".
#[test]
fn a_sec1_ec_key_is_accepted() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let sec1 = p.path().join("a-sec1.key");
    sh(&format!(
        "openssl ec -in {} -out {} 2>/dev/null",
        a.1.display(),
        sec1.display()
    ));
    assert!(std::fs::read_to_string(&sec1)
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    let r = Router::new().tls(&[(a.0.clone(), sec1)]).start();
    connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").expect("SEC1 key serves");
}

#[test]
fn a_pkcs1_rsa_key_is_accepted() {
    let p = Pki::new("probe-tls");
    let _ = p.cert("seed", &["seed.test"]); // makes the dev CA
    let d = p.path();
    let ca_key = d.join("keys/tls/dev-ca.key");
    sh(&format!(
        "cd {d} && openssl req -new -newkey rsa:2048 -nodes -keyout rsa8.key -subj /CN=rsa.test -out rsa.csr 2>/dev/null \
         && printf 'subjectAltName=DNS:rsa.test\\nextendedKeyUsage=serverAuth\\n' > ext \
         && openssl x509 -req -in rsa.csr -CA {ca} -CAkey {k} -CAcreateserial -days 2 -extfile ext -out rsa.pem 2>/dev/null \
         && openssl rsa -in rsa8.key -traditional -out rsa1.key 2>/dev/null",
        d = d.display(),
        ca = p.ca.display(),
        k = ca_key.display()
    ));
    let key = d.join("rsa1.key");
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let r = Router::new().tls(&[(d.join("rsa.pem"), key)]).start();
    let cfg = verifying(&p.ca, &[&rustls::version::TLS12], &[], false);
    connect(r.api_tls.expect("tls"), &cfg, "rsa.test").expect("PKCS#1 RSA key serves TLS 1.2");
    connect(r.api_tls.expect("tls"), &ca13(&p.ca), "rsa.test").expect("and TLS 1.3");
}

/// TUNING.md listen.internal_tls: "with `dev = true` and no `[[tls.certs]]`, the keyring's dev
/// certificate"; a task dials with `--tls-ca <keyring>/tls/dev-ca.pem`.
#[test]
fn internal_tls_in_dev_mode_serves_the_dev_certificate_to_tasks() {
    let r = Router::new().dev().listen("internal_tls", "true").start();
    let ca = r.keys.join("tls/dev-ca.pem");
    assert!(ca.is_file(), "dev CA at {}:\n{}", ca.display(), r.log());
    let _t = spawn_task(
        &r,
        &[
            "task".into(),
            "echo".into(),
            "--tls-ca".into(),
            ca.to_str().unwrap().into(),
        ],
        "-devtls",
    );
    let tok = r.token(APP, "alice");
    let resp = wait_for(Duration::from_secs(5), || {
        let resp = r.request(&Req::post(&r.path(APP, 3)).token(&tok).body(b"dev tls"));
        (resp.status == 200).then_some(resp)
    })
    .unwrap_or_else(|| panic!("never routed:\n{}", r.log()));
    assert_eq!(resp.body, b"dev tls");
    assert!(metric(&r, "fedbus_tls_handshakes_total") >= 1.0);
}

// ---------------------------------------------------------------------------------------------
// Reloads.

/// A certificate file replaced by garbage (by rename, as the docs advise) is seen by the mtime
/// poll: the reload fails and is logged, the old certificate keeps serving; a good one then
/// applies.
#[test]
fn garbage_written_over_the_certificate_keeps_the_old_one_by_the_poll() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = seed::start_with(
        Router::new().tls(std::slice::from_ref(&a)),
        "[auth]\nreload_poll_ms = 100",
    );
    let addr = r.api_tls.expect("tls");
    let first = der(&a.0);
    let tmp = p.path().join("garbage.tmp");
    std::fs::write(
        &tmp,
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::rename(&tmp, &a.0).unwrap();
    assert!(
        wait_log(&r, "TLS certificate reload failed", 1),
        "no log of the failed reload:\n{}",
        r.log()
    );
    assert!(
        served(addr, "a.test") == first,
        "the old certificate serves"
    );
    connect(addr, &ca13(&p.ca), "a.test").expect("and still verifies");
    let a2 = p.cert("a", &["a.test"]);
    let second = der(&a2.0);
    let ok = wait_for(Duration::from_secs(5), || {
        (served(addr, "a.test") == second).then_some(())
    });
    assert!(
        ok.is_some(),
        "a good certificate never applied:\n{}",
        r.log()
    );
}

/// TUNING.md tls.certs: a file that cannot be read at a poll "is taken as a change still under
/// way and the old set serves on; one unreadable at 3 polls in a row is logged once (WARN,
/// naming the files) until it is back (a SIGHUP tries a reload at once and logs its error)".
/// Before, the poll said nothing at all.
#[test]
fn a_removed_key_file_keeps_the_old_certificate_and_is_logged() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = seed::start_with(
        Router::new().tls(std::slice::from_ref(&a)),
        "[auth]\nreload_poll_ms = 100",
    );
    let addr = r.api_tls.expect("tls");
    std::fs::remove_file(&a.1).unwrap();
    connect(addr, &ca13(&p.ca), "a.test").expect("the old certificate serves");
    let key = a.1.display().to_string();
    let warned = wait_for(Duration::from_secs(5), || {
        let l = r.log();
        (l.contains("TLS certificate files unreadable") && l.contains(&key)).then_some(())
    });
    assert!(
        warned.is_some(),
        "the poll never logged the missing key:\n{}",
        r.log()
    );
    assert_eq!(
        r.log().matches("TLS certificate files unreadable").count(),
        1,
        "logged once"
    );
    seed::sighup(&r);
    let logged = wait_for(Duration::from_secs(5), || {
        r.log()
            .contains("TLS certificate reload failed")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "the SIGHUP did not log the failed reload:\n{}",
        r.log()
    );
    connect(addr, &ca13(&p.ca), "a.test").expect("the old certificate still serves");
}

/// A reload that changes the names of the second certificate: SNI picks on the new set.
#[test]
fn a_renewal_with_a_new_name_is_picked_by_sni_after_the_reload() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let b = p.cert("b", &["b.test"]);
    let r = seed::start_with(
        Router::new().tls(&[a.clone(), b.clone()]),
        "[auth]\nreload_poll_ms = 100",
    );
    let addr = r.api_tls.expect("tls");
    assert!(
        served(addr, "c.test") == der(&a.0),
        "c.test: default before"
    );
    let b2 = p.cert("b", &["b.test", "c.test"]);
    let want = der(&b2.0);
    let ok = wait_for(Duration::from_secs(5), || {
        (served(addr, "c.test") == want).then_some(())
    });
    assert!(ok.is_some(), "c.test never got the renewed b:\n{}", r.log());
    connect(addr, &ca13(&p.ca), "c.test").expect("verifies");
}

// ---------------------------------------------------------------------------------------------
// Handshakes (TUNING.md "TLS": "rustls with ring, TLS 1.3 and 1.2, ALPN `http/1.1`. The TLS
// handshake is bounded by `limits.handshake_timeout_ms`; a failed or timed-out one ... is an
// `info` log line and `fedbus_tls_handshake_failures_total`").

#[test]
fn a_tls11_client_is_refused_counted_and_logged() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let addr = r.api_tls.expect("tls");
    let before = metric(&r, "fedbus_tls_handshake_failures_total");
    let (cert, out) = openssl_cert(
        addr,
        &[
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-servername",
            "a.test",
        ],
    );
    assert!(cert.is_none(), "TLS 1.1 must not complete: {out}");
    wait_metric(&r, "fedbus_tls_handshake_failures_total", before + 1.0);
    assert!(wait_log(&r, "TLS handshake failed", 1), "{}", r.log());
}

/// ARCHITECTURE.md "Known gaps": "a client offering only ALPN `h2`: refused, logged and counted".
#[test]
fn alpn_h2_only_is_refused_logged_and_counted() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let addr = r.api_tls.expect("tls");
    let cfg = verifying(&p.ca, &[&rustls::version::TLS13], &[b"h2"], false);
    let Err(e) = connect(addr, &cfg, "a.test") else {
        panic!("h2 only must not complete");
    };
    // The alert of RFC 7301 3.2, not a reset (TlsAcceptor::accept's one-try write of it was
    // always deferred by the glommio socket).
    assert!(
        e.to_string().contains("NoApplicationProtocol"),
        "the client read {e}, not the no_application_protocol alert"
    );
    wait_metric(&r, "fedbus_tls_handshake_failures_total", 1.0);
    assert!(wait_log(&r, "TLS handshake failed", 1), "{}", r.log());
    assert_eq!(metric(&r, "fedbus_tls_handshakes_total"), 0.0);
}

/// A client that sends its whole ClientHello and then nothing: the server flight goes out and
/// the deadline (from accept) cuts the connection.
#[test]
fn a_client_silent_after_its_client_hello_is_cut_at_the_deadline() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("handshake_timeout_ms", 600)
        .start();
    let hello = client_hello(&ca13(&p.ca), "a.test");
    let mut s = TcpStream::connect(r.api_tls.expect("tls")).unwrap();
    let t = Instant::now();
    s.write_all(&hello).unwrap();
    let got = raw_until_end(&mut s, Duration::from_secs(5))
        .unwrap_or_else(|(e, g)| panic!("not cut within 5 s: {e} ({} bytes)", g.len()));
    let took = t.elapsed();
    assert!(
        !got.is_empty() && got[0] == 0x16,
        "the server flight came first"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "cut after {took:?}, limit 600 ms"
    );
    wait_metric(&r, "fedbus_tls_handshake_failures_total", 1.0);
}

/// A ClientHello trickled one byte every 50 ms is cut at the deadline counted from accept, not
/// re-armed by each byte.
#[test]
fn a_trickled_client_hello_is_cut_at_the_deadline_from_accept() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("handshake_timeout_ms", 700)
        .start();
    let hello = client_hello(&ca13(&p.ca), "a.test");
    let mut s = TcpStream::connect(r.api_tls.expect("tls")).unwrap();
    let mut w = s.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        for b in hello {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let got = raw_until_end(&mut s, Duration::from_secs(6));
    let took = t.elapsed();
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    assert!(got.is_ok(), "not cut: {got:?}");
    assert!(
        took < Duration::from_millis(2500),
        "trickle cut after {took:?}, limit 700 ms"
    );
    wait_metric(&r, "fedbus_tls_handshake_failures_total", 1.0);
}

/// A record header announcing 65535 bytes (over TLS's 16 KiB + 2 KiB bound): refused at once,
/// not after the handshake deadline.
#[test]
fn an_oversized_record_is_refused_at_once_and_counted() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let mut s = TcpStream::connect(r.api_tls.expect("tls")).unwrap();
    let t = Instant::now();
    let mut rec = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    rec.extend(vec![0u8; 1024]);
    s.write_all(&rec).unwrap();
    let got = raw_until_end(&mut s, Duration::from_secs(8));
    let took = t.elapsed();
    let got = got.unwrap_or_else(|(e, _)| panic!("not closed: {e}"));
    assert!(got.is_empty() || got[0] == 0x15, "only an alert: {got:?}");
    assert!(
        took < Duration::from_secs(2),
        "closed after {took:?} (deadline 5 s)"
    );
    wait_metric(&r, "fedbus_tls_handshake_failures_total", 1.0);
}

/// A handshake message header announcing 16 MiB, then records of zeros: refused early, the
/// router does not buffer toward 16 MiB.
#[test]
fn a_client_hello_announcing_16_mib_is_refused_early() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let _t = r.task().start();
    let mut s = TcpStream::connect(r.api_tls.expect("tls")).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut w = s.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut sent = 0usize;
        let mut first = true;
        while sent < 4 << 20 {
            let mut rec = vec![0x16, 0x03, 0x01, 0x40, 0x00];
            let mut body = vec![0u8; 0x4000];
            if first {
                body[..4].copy_from_slice(&[0x01, 0xff, 0xff, 0xff]);
                first = false;
            }
            rec.extend(body);
            if w.write_all(&rec).is_err() {
                break;
            }
            sent += rec.len();
        }
        sent
    });
    let got = raw_until_end(&mut s, Duration::from_secs(8));
    let took = t.elapsed();
    let _ = s.shutdown(std::net::Shutdown::Both);
    let sent = writer.join().unwrap();
    assert!(got.is_ok(), "not closed: {got:?}");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    assert!(sent < 4 << 20, "the router read all {sent} bytes");
    wait_metric(&r, "fedbus_tls_handshake_failures_total", 1.0);
    // A normal client is served after it.
    connect(r.api_tls.unwrap(), &ca13(&p.ca), "a.test").expect("served on");
}

/// TLS to the plaintext api port: the router answers with a clear HTTP 400 and closes at once.
#[test]
fn a_tls_client_on_the_plaintext_port_gets_a_400_and_a_close() {
    let r = Router::new().start();
    let p = Pki::new("probe-tls");
    let _ = p.cert("a", &["a.test"]);
    let hello = client_hello(&ca13(&p.ca), "a.test");
    let mut s = TcpStream::connect(r.api).unwrap();
    s.write_all(&hello).unwrap();
    let t = Instant::now();
    let got = raw_until_end(&mut s, Duration::from_secs(8))
        .unwrap_or_else(|(e, g)| panic!("no close: {e}: {:?}", String::from_utf8_lossy(&g)));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// The plain-HTTP refusal arrives even when the client sends its request a byte at a time.
#[test]
fn plain_http_on_the_tls_port_one_byte_first_still_gets_tls_required() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let mut s = TcpStream::connect(r.api_tls.expect("tls")).unwrap();
    s.write_all(b"G").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = s.write_all(b"ET /api/x HTTP/1.1\r\nHost: x\r\n\r\n");
    let got = raw_until_end(&mut s, Duration::from_secs(6))
        .unwrap_or_else(|(e, g)| panic!("{e}: {:?}", String::from_utf8_lossy(&g)));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        text.contains("tls_required") && text.contains("https://"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Connection limits with TLS (ARCHITECTURE.md "The listeners": "a TLS connection counts from
// accept, during its handshake too").

#[test]
fn connections_in_their_handshake_count_against_the_shard_limit() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("max_connections_per_shard", 2)
        .limit("handshake_timeout_ms", 30000)
        .start();
    let addr = r.api_tls.expect("tls");
    let mut s1 = TcpStream::connect(addr).unwrap();
    wait_metric(&r, "fedbus_connections{listener=\"api\"}", 1.0);
    let _s2 = TcpStream::connect(addr).unwrap();
    wait_metric(&r, "fedbus_connections{listener=\"api\"}", 2.0);
    // A third at the limit, none idle: the handshake under way the longest (s1, silent) is
    // closed for it, long before its 30 s deadline, and the new client gets in.
    let t = Instant::now();
    let third = connect(addr, &ca13(&p.ca), "a.test");
    assert!(
        third.is_ok(),
        "a new client at the limit: {:?}",
        third.err()
    );
    let got = raw_until_end(&mut s1, Duration::from_secs(5));
    assert!(
        got.is_ok() && t.elapsed() < Duration::from_secs(5),
        "the oldest handshake was not closed: {got:?} after {:?}",
        t.elapsed()
    );
    wait_metric(
        &r,
        "fedbus_unfinished_evicted_total{stage=\"tls_handshake\"}",
        1.0,
    );
    assert_eq!(metric(&r, "fedbus_connections_refused_total"), 0.0);
}

/// At the limit, an idle TLS keep-alive connection makes room: evicted with close_notify
/// (PROTOCOL.md 8.2: "over TLS with `close_notify` first, as when it is closed to make room").
#[test]
fn eviction_at_the_limit_closes_an_idle_tls_connection_with_close_notify() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("max_connections_per_shard", 2)
        .start();
    let _t = r.task().start();
    let addr = r.api_tls.expect("tls");
    let cfg = ca13(&p.ca);
    let mut old = connect(addr, &cfg, "a.test").unwrap();
    echo_over(&r, &mut old, 1, b"first");
    std::thread::sleep(Duration::from_millis(50));
    let mut mid = connect(addr, &cfg, "a.test").unwrap();
    echo_over(&r, &mut mid, 2, b"second");
    let mut new = connect(addr, &cfg, "a.test").expect("third admitted by eviction");
    echo_over(&r, &mut new, 3, b"third");
    assert_eq!(
        tls_end(&mut old, Duration::from_secs(5)),
        Ok(true),
        "close_notify then EOF"
    );
    wait_metric(&r, "fedbus_idle_evicted_total", 1.0);
    echo_over(&r, &mut mid, 4, b"mid lives");
}

/// PROTOCOL.md 8.2, idle: "HTTP: the connection closes quietly (over TLS with `close_notify`
/// first ...)".
#[test]
fn an_idle_tls_connection_closes_with_close_notify() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("idle_timeout_ms", 500)
        .start();
    let _t = r.task().start();
    let mut s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").unwrap();
    echo_over(&r, &mut s, 1, b"then idle");
    let t = Instant::now();
    assert_eq!(tls_end(&mut s, Duration::from_secs(5)), Ok(true));
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
}

/// ...and by a drain.
#[test]
fn a_drain_closes_an_idle_tls_connection_with_close_notify() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let mut r = seed::start_with(
        Router::new().tls(&[a]),
        "[readiness]\ndrain_idle_close_ms = 200",
    );
    let _t = r.task().start();
    let mut s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").unwrap();
    echo_over(&r, &mut s, 1, b"before drain");
    r.sigterm();
    assert_eq!(tls_end(&mut s, Duration::from_secs(5)), Ok(true));
    assert!(
        r.wait_exit(Duration::from_secs(10)).is_some(),
        "router did not exit"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP over TLS.

#[test]
fn pipelined_requests_over_tls_are_answered_in_order() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").unwrap();
    let mut all = Vec::new();
    for i in 0..8u64 {
        all.extend(echo_req(&r, &tok, i, format!("pipelined {i}").as_bytes()));
    }
    s.write_all(&all).unwrap();
    s.flush().unwrap();
    let mut buf = Vec::new();
    for i in 0..8u64 {
        let a = read_ans(&mut s, &mut buf).expect("answer");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, format!("pipelined {i}").as_bytes());
    }
}

/// A request head left incomplete over TLS gets 408 through the TLS layer, then the close.
#[test]
fn an_incomplete_head_over_tls_gets_408_request_timeout() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("handshake_timeout_ms", 500)
        .start();
    let mut s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").unwrap();
    s.write_all(b"POST /api/local/dev/demo/echo/api/1/sys/echo HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.flush().unwrap();
    let a = read_ans(&mut s, &mut Vec::new()).expect("408 over TLS");
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.error_code(), "request_timeout");
    assert_eq!(a.header("connection"), Some("close"));
    assert!(tls_end(&mut s, Duration::from_secs(3)).is_ok());
}

/// A body over `limits.max_body_bytes` over TLS: 413 arrives intact before the close.
#[test]
fn a_body_over_the_limit_over_tls_gets_413_before_the_close() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("max_body_bytes", 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").unwrap();
    s.write_all(&echo_req(&r, &tok, 1, &vec![b'x'; 200_000]))
        .unwrap();
    s.flush().unwrap();
    let a = read_ans(&mut s, &mut Vec::new()).expect("413 over TLS");
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.error_code(), "body_too_large");
}

/// Keep-alive over TLS with `Connection: close` on the last request: answered, then
/// close_notify.
#[test]
fn connection_close_over_tls_answers_then_sends_close_notify() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut s = connect(r.api_tls.expect("tls"), &ca13(&p.ca), "a.test").unwrap();
    echo_over(&r, &mut s, 1, b"one");
    let req = Req::post(&r.path(APP, 2))
        .token(&tok)
        .header("Connection", "close")
        .body(b"last");
    s.write_all(&req.bytes()).unwrap();
    s.flush().unwrap();
    let a = read_ans(&mut s, &mut Vec::new()).expect("answer");
    assert_eq!((a.status, &a.body[..]), (200, &b"last"[..]));
    assert_eq!(tls_end(&mut s, Duration::from_secs(3)), Ok(true));
}

// ---------------------------------------------------------------------------------------------
// Sessions (TUNING.md tls.session_cache / tls.tickets).

fn second_handshake_kind(
    extra: &str,
    v: &'static rustls::SupportedProtocolVersion,
) -> HandshakeKind {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = seed::start_with(Router::new().tls(&[a]), extra);
    let cfg = verifying(&p.ca, &[v], &[b"http/1.1"], true);
    let addr = r.api_tls.expect("tls");
    let mut s = connect(addr, &cfg, "a.test").expect("first");
    // TLS 1.3 tickets arrive after the handshake: read until the client has them.
    s.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 16];
    let _ = s.read(&mut b);
    drop(s);
    let s = connect(addr, &cfg, "a.test").expect("second");
    s.conn.handshake_kind().expect("kind")
}

#[test]
fn without_tickets_tls13_resumes_from_the_session_cache() {
    let k = second_handshake_kind("[tls]\ntickets = false", &rustls::version::TLS13);
    assert_eq!(k, HandshakeKind::Resumed);
}

#[test]
fn without_tickets_and_cache_nothing_resumes_on_tls13() {
    let k = second_handshake_kind(
        "[tls]\ntickets = false\nsession_cache = 0",
        &rustls::version::TLS13,
    );
    assert_eq!(k, HandshakeKind::Full);
}

#[test]
fn without_tickets_and_cache_nothing_resumes_on_tls12() {
    let k = second_handshake_kind(
        "[tls]\ntickets = false\nsession_cache = 0",
        &rustls::version::TLS12,
    );
    assert_eq!(k, HandshakeKind::Full);
}

/// ServerTls: "Shared by every shard's acceptor (its session cache and ticket keys too, so a
/// client resumes on any shard)".
#[test]
fn sessions_resume_on_either_shard() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().shards(2).tls(&[a]).start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let cfg = verifying(&p.ca, &[&rustls::version::TLS13], &[b"http/1.1"], true);
    let addr = r.api_tls.expect("tls");
    let mut shards = std::collections::BTreeSet::new();
    let mut kinds = Vec::new();
    for i in 0..10u64 {
        let mut s = connect(addr, &cfg, "a.test").expect("handshake");
        kinds.push(s.conn.handshake_kind());
        s.write_all(&echo_req(&r, &tok, i, b"x")).unwrap();
        s.flush().unwrap();
        let a = read_ans(&mut s, &mut Vec::new()).expect("answer");
        assert_eq!(a.status, 200, "{a:?}");
        shards.insert(a.header("fedbus-shard").unwrap_or("?").to_string());
    }
    let resumed = kinds
        .iter()
        .skip(1)
        .filter(|k| **k == Some(HandshakeKind::Resumed))
        .count();
    assert_eq!(resumed, 9, "kinds {kinds:?}, shards {shards:?}");
}

// ---------------------------------------------------------------------------------------------
// wss:// (`/api/ws` over TLS: "byte for byte the same protocol inside").

type Wss = ws::Ws<Tls>;

fn wss_open(addr: SocketAddr, ca: &Path, tok: &str) -> Result<Wss, (u16, String)> {
    let s = connect(addr, &ca13(ca), "a.test").expect("handshake");
    let tcp = s.sock.try_clone().expect("clone");
    let head = ws::Head {
        host: "a.test",
        path: "/api/ws",
        bearer: Some(tok),
        origin: None,
    };
    match ws::upgrade_on(s, tcp, &head, false).unwrap_or_else(|e| panic!("{e}")) {
        ws::Upgraded::Open(w) => Ok(w),
        ws::Upgraded::Refused { status, body } => Err((status, body)),
    }
}

#[test]
fn wss_echo_and_an_oversized_message_closes_1009() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("max_body_bytes", 1024)
        .start();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let mut w = wss_open(r.api_tls.unwrap(), &p.ca, &tok).expect("101");
    let f = w.request_bytes(1, Some(&r.path(APP, 5)), b"over wss");
    w.s.write_all(&f).unwrap();
    w.s.flush().unwrap();
    let payload = match w.read_msg().expect("answer") {
        ws::Msg::Binary(p) => p,
        other => panic!("expected a binary message, got {other:?}"),
    };
    let fr = Frame::decode(bytes::Bytes::from(payload)).expect("frame");
    assert_eq!(&fr.payload[..], b"over wss");
    let limit = 1024 + 64 * 1024;
    let f = w.request_bytes(2, None, &vec![b'z'; limit - 24 + 1]);
    let _ = w.s.write_all(&f);
    let _ = w.s.flush();
    assert_eq!(w.close_code(), Ok(Some(1009)));
}

#[test]
fn wss_idle_session_closes_1001() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new()
        .tls(&[a])
        .limit("idle_timeout_ms", 500)
        .start();
    let tok = r.token(APP, "alice");
    let mut w = wss_open(r.api_tls.unwrap(), &p.ca, &tok).expect("101");
    let t = Instant::now();
    assert_eq!(w.close_code(), Ok(Some(1001)));
    assert!(t.elapsed() >= Duration::from_millis(400));
}

// ---------------------------------------------------------------------------------------------
// Task links over TLS (`listen.internal_tls`).

#[test]
fn internal_tls_stalled_handshake_is_cut_and_counted() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test", "127.0.0.1"]);
    let r = Router::new()
        .tls(&[a])
        .internal_tls()
        .limit("handshake_timeout_ms", 500)
        .start();
    let mut s = TcpStream::connect(r.internal[0]).unwrap();
    let t = Instant::now();
    let got = raw_until_end(&mut s, Duration::from_secs(5));
    assert!(got.is_ok(), "not cut: {got:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    wait_metric(&r, "fedbus_tls_handshake_failures_total", 1.0);
}

/// TUNING.md limits.handshake_timeout_ms: the upgrade head of a task link must be in "within it
/// from accept, a TLS handshake included". Before, the TLS handshake and the head each had
/// their own, so a connection that finished its TLS handshake just in time and sent no head
/// held its slot (`limits.max_link_connections_per_shard`) twice as long.
#[test]
fn internal_tls_handshake_and_upgrade_head_share_one_deadline() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test", "127.0.0.1"]);
    let r = Router::new()
        .tls(&[a])
        .internal_tls()
        .limit("handshake_timeout_ms", 3000)
        .start();
    let tcp = TcpStream::connect(r.internal[0]).unwrap();
    let t = Instant::now();
    // A slow client: its ClientHello comes 1.5 s in, then it sends no upgrade head.
    std::thread::sleep(Duration::from_millis(1500));
    let name = ServerName::try_from("a.test").unwrap();
    let conn = ClientConnection::new(probe(), name).unwrap();
    let mut s: Tls = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake in time");
    }
    let end = tls_end(&mut s, Duration::from_secs(5));
    let took = t.elapsed();
    assert!(end.is_ok(), "not cut: {end:?}");
    // 3 s from accept; before, 3 s from the end of the handshake (4.5 s).
    assert!(took < Duration::from_millis(4200), "cut after {took:?}");
    assert!(wait_log(&r, "upgrade head not complete", 1), "{}", r.log());
}

/// "the certificate must be valid for the host the task dials": a certificate for a.test only,
/// a task dialing 127.0.0.1, does not link.
#[test]
fn a_task_dialing_a_host_the_certificate_does_not_name_does_not_link() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test"]);
    let r = Router::new().tls(&[a]).internal_tls().start();
    let log = p.path().join("task.log");
    let mut child = Command::new(bin())
        .args(["task", "echo", "--keyring", r.keys.to_str().unwrap()])
        .args(["--router", &r.internal[0].to_string()])
        .args(["--tls-ca", p.ca.to_str().unwrap()])
        .env("FEDBUS_HOME", r.home())
        .env("FEDBUS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let seen = wait_for(Duration::from_secs(8), || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        (t.contains("NotValidForName") || t.contains("not valid for")).then_some(t)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.is_some(),
        "task log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!r.log().contains("task link registered"), "{}", r.log());
}

/// TUNING.md max_link_connections_per_shard: "task links, and connections still in their
/// handshake"; at the limit a new connection takes the slot of the oldest one still in its
/// handshake, a TLS handshake included.
#[test]
fn internal_tls_handshakes_count_against_the_link_limit() {
    let p = Pki::new("probe-tls");
    let a = p.cert("a", &["a.test", "127.0.0.1"]);
    let r = Router::new()
        .tls(&[a])
        .internal_tls()
        .limit("max_link_connections_per_shard", 2)
        .limit("handshake_timeout_ms", 30000)
        .start();
    let mut s1 = TcpStream::connect(r.internal[0]).unwrap();
    wait_metric(&r, "fedbus_connections{listener=\"internal\"}", 1.0);
    let _s2 = TcpStream::connect(r.internal[0]).unwrap();
    wait_metric(&r, "fedbus_connections{listener=\"internal\"}", 2.0);
    let _s3 = TcpStream::connect(r.internal[0]).unwrap();
    let t = Instant::now();
    let got = raw_until_end(&mut s1, Duration::from_secs(5));
    assert!(
        got.is_ok() && t.elapsed() < Duration::from_secs(3),
        "{got:?} after {:?}",
        t.elapsed()
    );
    wait_metric(
        &r,
        "fedbus_link_handshakes_evicted_total{listener=\"internal\"}",
        1.0,
    );
}

// ---------------------------------------------------------------------------------------------
// `fedbus keys cert` (README: "a router certificate (`PATH.pem`, `PATH.key`)"; TUNING.md
// tls.certs: `--out /var/lib/fedbus/tls/spb1.ru.heeus.cloud` for
// `cert = "/var/lib/fedbus/tls/spb1.ru.heeus.cloud.pem"`).

#[test]
fn keys_cert_out_with_dots_writes_path_dot_pem_and_key() {
    let d = TempDir::new("probe-keys-cert");
    let out = d.path().join("spb1.ru.heeus.cloud");
    let keys = d.path().join("keys");
    fedbus(
        d.path(),
        &[
            "keys",
            "cert",
            "--keyring",
            keys.to_str().unwrap(),
            "--name",
            "spb1.ru.heeus.cloud",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let listing: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        d.path().join("spb1.ru.heeus.cloud.pem").is_file()
            && d.path().join("spb1.ru.heeus.cloud.key").is_file(),
        "expected spb1.ru.heeus.cloud.pem and .key, found {listing:?}"
    );
}
