//! fedbus-sdk task links over TLS (`TaskOptions::tls_ca`) to routers with
//! `[listen] internal_tls = true`: real `fedbus run` routers from the test kit (on 127.0.0.1,
//! ports the kernel picks), certificates from `fedbus keys ca` / `fedbus keys cert --ca`, an SDK
//! task in this process (tokio) and blocking HTTP clients. Every wait is on a fact (registered
//! links, a counter, an answer) and bounded.
//!
//! `cargo build --release -p fedbus && cargo test --release -p fedbus-sdk --test integration tls::`

use fedbus_sdk::{Error, Outcome, Request, Task, TaskOptions};
use fedbus_testkit::fed::{issue_cert, PeerCerts};
use fedbus_testkit::{self as kit, Req, Router, TempDir};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest wait for any fact.
const WAIT: Duration = Duration::from_secs(15);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn wait(what: &str, mut f: impl FnMut() -> bool, ctx: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not within {WAIT:?}: {what}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A CA made with `fedbus keys ca` under `dir`, and a router certificate from it for `names`.
struct Pki {
    ca: PathBuf,
    cert: (PathBuf, PathBuf),
}

fn make_pki(dir: &Path, names: &[&str]) -> Pki {
    let ca = PeerCerts::make(dir);
    let cert = issue_cert(dir, &ca.ca, &ca.ca_key, "router", names);
    Pki { ca: ca.ca, cert }
}

/// The dev CA of a keyring under `dir` (another CA name than `fedbus keys ca`'s), made by
/// `fedbus keys cert --keyring` on first use.
fn dev_ca(dir: &Path) -> PathBuf {
    kit::dev_cert(dir, "unused", &["127.0.0.1"]);
    kit::dev_ca(dir)
}

/// A router with `shards` shards whose internal listeners speak TLS with `cert`.
fn tls_router(shards: usize, cert: &(PathBuf, PathBuf)) -> Router {
    Router::new()
        .shards(shards)
        .tls(std::slice::from_ref(cert))
        .internal_tls()
        .start()
}

/// A service token for `demo/echo` from the router's keyring.
fn svc(r: &Router, id: &str) -> String {
    let keys = r.keys.to_str().expect("utf-8");
    let args = [
        "token",
        "service",
        "--task-id",
        id,
        "--app",
        "demo/echo",
        "--keyring",
        keys,
    ];
    kit::fedbus(r.home(), &args).trim().to_string()
}

fn opts(router: String, token: &str) -> TaskOptions {
    TaskOptions::new([router], "demo/echo", (0..16).collect::<Vec<u32>>(), token)
}

async fn echo(req: Request) -> Outcome {
    let ct = req.content_type().map(str::to_string);
    Outcome::ok(req.into_payload()).with_content_type(ct)
}

fn spawn(rt: &tokio::runtime::Runtime, o: TaskOptions) -> Task {
    let _g = rt.enter();
    Task::spawn(o, echo).expect("spawn the task")
}

/// The task's state and the router's log, for a failed assertion.
fn state(task: &Task, r: &Router) -> String {
    format!(
        "stats {:?}\nlast error {:?}\nrouter log:\n{}",
        task.stats(),
        task.last_error(),
        r.log()
    )
}

/// With the CA that issued the router's certificate, the task dials shard 0 by a DNS name
/// (`localhost`), the other shard at the IP address its hello announces, registers on both
/// over TLS and serves requests.
#[test]
fn task_with_the_ca_registers_on_every_shard_over_tls_and_serves() {
    let dir = TempDir::new("sdk-tls-ok");
    let pki = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let r = tls_router(2, &pki.cert);
    let rt = rt();
    let router = format!("localhost:{}", r.internal[0].port());
    let task = spawn(&rt, opts(router, &svc(&r, "tls-ok")).tls_ca(&pki.ca));
    assert!(
        rt.block_on(task.wait_registered(2, WAIT)),
        "registered on both shards\n{}",
        state(&task, &r)
    );
    let s = task.stats();
    assert!(s.connects >= 2, "a TLS link per shard: {s:?}");
    assert!(
        r.metrics().get("fedbus_tls_handshakes_total") >= 2.0,
        "the links were TLS handshakes"
    );

    // Every wsid answered (both shards route to the task once their tables have it: 503
    // no_live_task until then).
    let tok = r.token("demo/echo", "alice");
    let mut ok = 0u64;
    let deadline = Instant::now() + WAIT;
    while ok < 16 {
        let body = format!("over tls {ok}");
        let resp = r.request(
            &Req::post(&r.path("demo/echo", ok))
                .token(&tok)
                .body(body.as_bytes()),
        );
        if resp.status == 200 {
            assert_eq!(resp.body, body.as_bytes(), "{resp:?}");
            ok += 1;
        } else {
            assert_eq!(resp.status, 503, "{resp:?}");
            assert!(Instant::now() < deadline, "not routed: {resp:?}");
            ok = 0;
        }
    }
    assert!(task.stats().requests >= 16, "{:?}", task.stats());
    assert_eq!(task.last_error(), None);
    rt.block_on(task.shutdown());
}

/// Waits until `task` has failed to connect `n` times, then checks it backed off (the least
/// total of the jittered delays between them: 0.5 x (50 + 100 + ...) ms), never linked and did
/// not give up; returns its last error.
fn fails_with_backoff(task: &Task, r: &Router, since: Instant, n: u64, what: &str) -> String {
    wait(
        &format!("{what}: {n} connect failures"),
        || task.stats().connect_failures >= n,
        || state(task, r),
    );
    let elapsed = since.elapsed();
    let least: u64 = (0..n - 1).map(|i| 25u64 << i).sum();
    assert!(
        elapsed >= Duration::from_millis(least),
        "{what}: {n} failures in {elapsed:?}: no backoff\n{}",
        state(task, r)
    );
    let s = task.stats();
    assert_eq!((s.connects, s.registrations), (0, 0), "{what}: {s:?}");
    assert_eq!(
        task.failure(),
        None,
        "{what}: a connect failure is not a refusal"
    );
    let e = task.last_error().unwrap_or_default();
    println!("{what}: {n} failures in {elapsed:?}, {s:?}, last error {e:?}");
    e
}

/// Links that cannot be trusted or are not TLS: a CA that did not issue the router's
/// certificate (another CA name: unknown issuer; a CA of the same name: bad signature), a host
/// name the certificate does not cover, a plaintext task on the TLS
/// listener. None links; each reads why in `last_error` and backs off.
#[test]
fn untrusted_and_plaintext_links_fail_with_a_reason_and_back_off() {
    let dir = TempDir::new("sdk-tls-bad");
    // The router's certificate covers 127.0.0.1 only.
    let pki = make_pki(&dir.path().join("good"), &["127.0.0.1"]);
    let same_name = make_pki(&dir.path().join("same-name"), &["127.0.0.1"]);
    let other_ca = dev_ca(&dir.path().join("other"));
    let r = tls_router(1, &pki.cert);
    let rt = rt();
    let port = r.internal[0].port();
    let ip = format!("127.0.0.1:{port}");

    let since = Instant::now();
    let wrong_ca = spawn(&rt, opts(ip.clone(), &svc(&r, "ca")).tls_ca(&other_ca));
    let impostor_ca = spawn(&rt, opts(ip.clone(), &svc(&r, "ca2")).tls_ca(&same_name.ca));
    let wrong_host = spawn(
        &rt,
        opts(format!("localhost:{port}"), &svc(&r, "host")).tls_ca(&pki.ca),
    );
    let plain = spawn(&rt, opts(ip.clone(), &svc(&r, "plain")));

    let e = fails_with_backoff(&wrong_ca, &r, since, 5, "another CA");
    assert!(
        e.contains(&format!(
            "connect {ip}: TLS: invalid peer certificate: UnknownIssuer"
        )),
        "{e}"
    );
    let e = fails_with_backoff(&impostor_ca, &r, since, 5, "a CA of the same name");
    assert!(
        e.contains(&format!(
            "connect {ip}: TLS: invalid peer certificate: BadSignature"
        )),
        "{e}"
    );
    let e = fails_with_backoff(&wrong_host, &r, since, 5, "another host name");
    assert!(
        e.contains("TLS: invalid peer certificate") && e.contains("not valid for name"),
        "{e}"
    );
    let e = fails_with_backoff(&plain, &r, since, 5, "plaintext");
    assert!(
        e.contains("400") && e.contains("tls_required") && e.contains("tls_ca"),
        "{e}"
    );
}

/// A CA file that cannot be used fails `Task::spawn` with `Error::Options` naming it.
#[test]
fn a_bad_ca_file_is_an_options_error_at_spawn() {
    let dir = TempDir::new("sdk-tls-spawn");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let no_cert = dir.path().join("no-cert.pem");
    std::fs::write(&no_cert, "not a certificate\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let rt = rt();
    let _g = rt.enter();
    for (p, want) in [
        (&missing, "No such file"),
        (&empty, "no CERTIFICATE"),
        (&no_cert, "no CERTIFICATE"),
        (&dir.path().to_path_buf(), "tls_ca"),
    ] {
        let o = opts("127.0.0.1:1".into(), "fbs1.x.y").tls_ca(p);
        match Task::spawn(o, echo) {
            Err(Error::Options(m)) => {
                assert!(m.contains(want), "{}: {m}", p.display());
                assert!(m.contains(&p.display().to_string()), "{m}");
            }
            other => panic!("{}: {other:?}", p.display()),
        }
    }
}
