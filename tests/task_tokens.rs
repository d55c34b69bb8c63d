//! Service tokens of the built-in tasks (`fedbus task echo`) over time, on a real router: a
//! short-lived token renewed from a file on the open link with no failed request, and a token
//! refused for good ending the task with status 1 within `--refused-exit-after`, and a renew
//! refused during a rotation done out of order sent again until the router takes it.
//!
//! `cargo test --release -p fedbus --test integration -- task_tokens:: --nocapture` prints what it measured.

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

/// ROTATION.md, out of order, with the built-in runner: the cluster key is rotated and a token
/// of the new version written to the task's `--token-file` before the router reloads its
/// keyring. The router refuses that `renew` (`unknown_key`); the runner used to never send it
/// again, and the link was closed (1008) when the old version's grace ended. Now a refused
/// renew is sent again every 5 s (`fedbus_proto::renew::REFUSED_RETRY`): after the reload it is
/// accepted, and the link outlives the grace.
#[test]
fn a_renew_refused_for_an_unknown_key_is_sent_again_after_the_reload() {
    // Refusals about 1 and 6 s after the rotation, the reload then, the retry at about 11 s:
    // the grace leaves room for a slow machine.
    const GRACE: u64 = 16;
    let r = seed::start_with(
        Router::new().shards(1),
        &format!("[auth]\ngrace_secs = {GRACE}\nreload_poll_ms = 600000"),
    );
    let file = r.home().join("task.token");
    write_token(&file, &service_token(r.home(), &r.keys, "1h"));
    let args: Vec<String> = ["task", "echo", "--partitions", "0-15", "--token-file"]
        .iter()
        .map(|a| a.to_string())
        .chain([file.to_str().expect("utf-8 path").to_string()])
        .collect();
    let mut task = spawn_task(&r, &args, "-rotate");
    let tok = r.token(APP, "alice");
    let path = r.path(APP, 5);
    let ok = || r.request(&Req::post(&path).token(&tok).body(b"r")).status == 200;
    wait_for(Duration::from_secs(5), || ok().then_some(())).expect("routed");
    let metric = |name: &str| r.metrics().get(name);
    let refused = || metric("fedbus_task_renewals_total{result=\"refused\"}");
    let accepted = || metric("fedbus_task_renewals_total{result=\"accepted\"}");

    // The router looks at a keyring written in the last 100 ms again (a second write in the
    // same clock tick keeps the mtime): rotate once the files it read are older, so that only
    // the SIGHUP below makes it read them.
    wait_keyring_settled(&r.keys);
    let keys = r.keys.to_str().expect("utf-8 path");
    fedbus(
        r.home(),
        &["keys", "rotate", "--cluster", "--keyring", keys],
    );
    let rotated = Instant::now();
    write_token(&file, &service_token(r.home(), &r.keys, "1h"));
    wait_for(Duration::from_secs(12), || (refused() >= 2.0).then_some(()))
        .unwrap_or_else(|| panic!("the v2 token refused twice: {}\n{}", refused(), r.log()));
    assert_eq!(accepted(), 0.0);
    let before = seed::reloads(&r);
    seed::sighup(&r);
    wait_for(Duration::from_secs(5), || {
        (seed::reloads(&r) > before).then_some(())
    })
    .expect("keyring reloaded after SIGHUP");
    let left = Duration::from_secs(GRACE).saturating_sub(rotated.elapsed());
    wait_for(left, || (accepted() >= 1.0).then_some(())).unwrap_or_else(|| {
        panic!(
            "the v2 token accepted before v1's grace ends: refused {}\n{}",
            refused(),
            r.log()
        )
    });
    println!(
        "refused {} then accepted at {:?} after the rotation",
        refused(),
        rotated.elapsed()
    );
    // Past v1's grace (the router checks a link's key each second): the link lives on.
    let past = rotated + Duration::from_secs(GRACE) + Duration::from_millis(2500);
    std::thread::sleep(past.saturating_duration_since(Instant::now()));
    assert_eq!(metric("fedbus_links_revoked_total"), 0.0, "{}", r.log());
    assert!(ok(), "served after the grace");
    assert_eq!(
        r.log().matches("task link registered").count(),
        1,
        "one link, never reopened"
    );
    assert!(task.alive());
}
