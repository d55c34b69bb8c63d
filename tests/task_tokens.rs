//! Service tokens of the built-in tasks (`fedbus task echo`) over time, on a real router: a
//! short-lived token renewed from a file on the open link with no failed request, and a token
//! refused for good ending the task with status 1 within `--refused-exit-after`.
//!
//! `cargo test --release -p fedbus --test task_tokens -- --nocapture` prints what it measured.

use fedbus_testkit::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";
/// Lifetime of each service token the renewal test issues, and how long it sends requests.
const TTL: &str = "5s";
const RUN: Duration = Duration::from_secs(12);

fn service_token(home: &std::path::Path, keys: &std::path::Path, ttl: &str) -> String {
    let k = keys.to_str().expect("utf-8 path");
    let args = [
        "token",
        "service",
        "--task-id",
        "tok",
        "--app",
        APP,
        "--keyring",
        k,
        "--ttl",
        ttl,
    ];
    fedbus(home, &args).trim().to_string()
}

/// Writes `token` to `path` atomically (temporary file, then rename), as an issuer should.
fn write_token(path: &std::path::Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write token");
    std::fs::rename(&tmp, path).expect("rename token");
}

/// Tokens living 5 s, a fresh one written to the task's `--token-file` every second: 12 s of
/// steady requests (more than 2 lifetimes) all succeed, on the task's first and only link.
///
/// The margin is deliberate. `exp` has whole seconds, so a 5 s token lives 4 to 5 s, and a new
/// token reaches the router at most write interval (1 s) + file poll (1 s) + renew check (0.2 s)
/// after the old one was issued. With 3 s tokens (2 to 3 s of life) a loaded CI machine once saw
/// the old token expire 13 ms before the renewal went out.
#[test]
fn token_file_renewed_on_the_open_link_without_a_failed_request() {
    let r = Router::new().shards(1).start();
    let file = r.home().join("task.token");
    write_token(&file, &service_token(r.home(), &r.keys, TTL));
    let args: Vec<String> = ["task", "echo", "--partitions", "0-15", "--token-file"]
        .iter()
        .map(|a| a.to_string())
        .chain([file.to_str().expect("utf-8 path").to_string()])
        .collect();
    let mut task = spawn_task(&r, &args, "-file");
    let tok = r.token(APP, "alice");
    let path = r.path(APP, 3);
    wait_for(Duration::from_secs(5), || {
        (r.request(&Req::post(&path).token(&tok).body(b"p")).status == 200).then_some(())
    })
    .expect("routed");
    let (start, mut last_write, mut sent, mut failed) = (Instant::now(), Instant::now(), 0, vec![]);
    let mut conn = r.conn();
    while start.elapsed() < RUN {
        if last_write.elapsed() >= Duration::from_secs(1) {
            write_token(&file, &service_token(r.home(), &r.keys, TTL));
            last_write = Instant::now();
        }
        let resp = conn.request(&Req::post(&path).token(&tok).body(b"x"));
        if resp.status != 200 {
            failed.push((start.elapsed(), resp));
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = r.metrics();
    let accepted = m.get("fedbus_task_renewals_total{result=\"accepted\"}");
    println!(
        "{sent} requests over {RUN:?}, {} failed; renewals accepted {accepted}, refused {}",
        failed.len(),
        m.get("fedbus_task_renewals_total{result=\"refused\"}")
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
    // One renewal per written token that the 1 s file poll saw, less a couple at the edges.
    assert!(accepted >= 6.0, "renewed on the link: {accepted}");
    assert_eq!(
        r.log().matches("task link registered").count(),
        1,
        "one link, never reopened"
    );
    assert!(task.alive());
}

/// A token the router refuses (signed by another keyring's cluster key): `fedbus task echo`
/// exits with status 1 after `--refused-exit-after`, instead of retrying forever.
#[test]
fn task_with_a_token_refused_for_good_exits_non_zero_within_the_bound() {
    let r = Router::new().shards(1).start();
    let other = r.home().join("other-keys");
    keys_init(r.home(), &other, &[APP]);
    let bad = service_token(r.home(), &other, "1h");
    let t0 = Instant::now();
    let mut child = Command::new(bin())
        .args([
            "task",
            "echo",
            "--router",
            &r.internal[0].to_string(),
            "--token",
            &bad,
        ])
        .args(["--refused-exit-after", "2s"])
        .env("FEDBUS_HOME", r.home())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fedbus task");
    let status = wait_for(Duration::from_secs(15), || child.try_wait().expect("wait"))
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("the task still runs 15 s after its token was refused")
        });
    let took = t0.elapsed();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    println!("refused token: exited {status} after {took:?}");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("bad_signature"), "{err}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(
        took < Duration::from_secs(9),
        "the bound plus one backoff: {took:?}"
    );
}
