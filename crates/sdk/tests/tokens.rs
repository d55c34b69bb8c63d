//! Service tokens of an SDK task over time, against a real router (`fedbus run`, on
//! 127.23.3.1 with ports the kernel picks): a token file re-read every `token_poll`, a renew
//! refused for a key the router does not know yet sent again until it knows it, a token command
//! run again after a cluster key rotation, and registrations refused for the token's app or
//! role ending the task like a refused upgrade; and `Task::shutdown_graceful` letting the
//! handlers in flight answer. Every wait is on a fact (the router's metrics
//! and log, the task's counters) and bounded; the sleeps past a key's grace prove an absence.
//!
//! `cargo build --release -p fedbus && cargo test --release -p fedbus-sdk --test integration -- tokens:: --nocapture`

use fedbus_sdk::{Outcome, Request, Task, TaskOptions};
use fedbus_testkit::{self as kit, launch, Conn, Metrics, Req, TempDir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const IP: &str = "127.23.3.1";
const APP: &str = "demo/echo";
/// Longest wait for a fact that should come at once.
const WAIT: Duration = Duration::from_secs(15);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Echoes the body; a body `sleep MS` first sleeps that long.
async fn echo(req: Request) -> Outcome {
    let body = String::from_utf8_lossy(req.payload()).into_owned();
    if let Some(ms) = body.strip_prefix("sleep ").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    Outcome::ok(req.into_payload())
}

/// A one-shard router with its keyring; `grace` is `auth.grace_secs`. The keyring is reloaded
/// on SIGHUP only (`reload_poll_ms` of 10 min), so a test decides when the router learns a
/// rotation.
struct Router {
    run: launch::Run,
    dir: TempDir,
    keys: PathBuf,
    api: SocketAddr,
    admin: SocketAddr,
    internal: SocketAddr,
}

impl Router {
    fn start(tag: &str, grace: u64) -> Router {
        Router::start_with(tag, grace, 5000)
    }

    /// [`Router::start`] with this `limits.request_timeout_ms`.
    fn start_with(tag: &str, grace: u64, request_timeout_ms: u64) -> Router {
        let dir = TempDir::new(tag);
        let home = dir.path().to_path_buf();
        let keys = home.join("keys");
        kit::keys_init(&home, &keys, &[APP, "demo/other"]);
        let cfg = format!(
            "region = \"local\"\ncluster = \"dev\"\nkeyring = {keys:?}\n\
             [listen]\napi = \"{IP}:0\"\ninternal = \"{IP}:0\"\nadmin = \"{IP}:0\"\n\
             [tuning]\nshard_cores = [0]\npin = false\n\
             [limits]\nping_interval_ms = 500\nrequest_timeout_ms = {request_timeout_ms}\n\
             [auth]\ngrace_secs = {grace}\nreload_poll_ms = 600000\n\
             [[apps]]\nname = \"{APP}\"\npartitions = 16\n\
             [[apps]]\nname = \"demo/other\"\npartitions = 4\n"
        );
        let cfg_path = home.join("router.toml");
        std::fs::write(&cfg_path, cfg).expect("config");
        let (run, rx) = launch::spawn_run(&home, &cfg_path, &[], &home.join("router.log"));
        let run = run.plain_log();
        let ready = launch::wait_ready(&run, &rx, kit::START_TIMEOUT);
        Router {
            api: ready.api,
            admin: ready.admin.expect("admin"),
            internal: ready.internal[0],
            run,
            dir,
            keys,
        }
    }

    fn home(&self) -> &Path {
        self.dir.path()
    }

    fn metric(&self, series: &str) -> f64 {
        Metrics::parse(&kit::metrics_text_at(self.admin)).get(series)
    }

    fn accepted(&self) -> f64 {
        self.metric("fedbus_task_renewals_total{result=\"accepted\"}")
    }

    fn refused(&self) -> f64 {
        self.metric("fedbus_task_renewals_total{result=\"refused\"}")
    }

    fn revoked(&self) -> f64 {
        self.metric("fedbus_links_revoked_total")
    }

    /// `fedbus token service` for this router's cluster key (its newest version).
    fn service_token(&self, id: &str, extra: &[&str]) -> String {
        let k = self.keys.to_str().expect("utf-8");
        let mut a = vec![
            "token",
            "service",
            "--task-id",
            id,
            "--app",
            APP,
            "--keyring",
            k,
            "--ttl",
            "1h",
        ];
        a.extend_from_slice(extra);
        kit::fedbus(self.home(), &a).trim().to_string()
    }

    /// `fedbus keys rotate --cluster`: version 2 signs from now; the router learns it on SIGHUP
    /// (the rotation waits until the router no longer looks at a recently written keyring).
    fn rotate_cluster_key(&self) {
        kit::wait_keyring_settled(&self.keys);
        let k = self.keys.to_str().expect("utf-8");
        kit::fedbus(
            self.home(),
            &["keys", "rotate", "--cluster", "--keyring", k],
        );
    }

    /// SIGHUP, then waits for the `keyring reloaded` line it causes.
    fn reload(&self) {
        let before = self.run.log().matches("keyring reloaded").count();
        self.run.sig("HUP");
        kit::wait_until(
            "keyring reloaded after SIGHUP",
            WAIT,
            || (self.run.log().matches("keyring reloaded").count() > before).then_some(()),
            || self.run.log(),
        );
    }

    /// Waits until a request is answered 200: a link is registered before the control thread
    /// publishes the routing table that holds it, and a request in between gets 503.
    fn wait_routed(&self, client: &str) {
        kit::wait_until(
            "a request routed to the task",
            WAIT,
            || match self.request(client) {
                200 => Some(()),
                503 => None,
                other => panic!("status {other}"),
            },
            || self.run.log(),
        );
    }

    /// One request on a fresh connection; its status.
    fn request(&self, client: &str) -> u16 {
        self.request_body(client, b"x").status
    }

    /// One request with `body` on a fresh connection.
    fn request_body(&self, client: &str, body: &[u8]) -> kit::Response {
        let path = format!("/api/local/dev/{APP}/api/3/sys/echo");
        Conn::open(self.api).request(&Req::post(&path).token(client).body(body))
    }

    /// Options of a task on this router's shard 0 serving every partition of [`APP`].
    fn options(&self, token: impl Into<String>) -> TaskOptions {
        TaskOptions::new(
            [self.internal.to_string()],
            APP,
            (0..16).collect::<Vec<u32>>(),
            token.into(),
        )
    }

    fn client_token(&self) -> String {
        launch::client_token(self.home(), &self.keys, APP, "alice")
    }
}

fn write_token(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write token");
    std::fs::rename(&tmp, path).expect("rename token");
}

fn spawn(rt: &tokio::runtime::Runtime, opts: TaskOptions) -> Task {
    let _g = rt.enter();
    Task::spawn(opts, echo).expect("spawn the task")
}

fn registered(rt: &tokio::runtime::Runtime, task: &Task) {
    assert!(
        rt.block_on(task.wait_registered(1, WAIT)),
        "not registered: {:?}, last error {:?}",
        task.stats(),
        task.last_error()
    );
}

/// SDK.md: a token file is read every `token_poll` (1 s). Six tokens written 1.5 s apart each
/// reach the router in a renew of their own, each within 1.5 s of its write. The refresher
/// used to sleep `token_poll` after each read as well as before it, so it read every 2 s: some
/// reads found two rewrites and renewed only the second, and a token waited up to 2 s (4 s
/// tokens rewritten every 1.5 s then expired on open links).
#[test]
fn a_token_file_rewritten_every_1_5_s_is_renewed_once_per_rewrite() {
    let r = Router::start("sdk-file-poll", 86400);
    let file = r.home().join("task.token");
    write_token(&file, &r.service_token("file-0", &[]));
    let rt = rt();
    let task = spawn(
        &rt,
        TaskOptions::new([r.internal.to_string()], APP, vec![0, 1, 2, 3], "").token_file(&file),
    );
    registered(&rt, &task);
    // Minted first (each its own subject, so no two are equal), written on a fixed schedule.
    let tokens: Vec<String> = (1..=6)
        .map(|i| r.service_token(&format!("file-{i}"), &[]))
        .collect();
    let every = Duration::from_millis(1500);
    let t0 = Instant::now();
    let mut latencies = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let at = t0 + every * i as u32;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        write_token(&file, t);
        let written = Instant::now();
        // Until the next write: the renewal of this token, or none.
        let next = t0 + every * (i as u32 + 1);
        let seen = kit::wait_for(next.saturating_duration_since(written), || {
            (r.accepted() >= (i + 1) as f64).then(|| written.elapsed())
        });
        latencies.push(seen);
    }
    // The last one's renewal may come after the loop's window: give it the same 1.5 s.
    let accepted = kit::wait_for(every, || (r.accepted() >= 6.0).then_some(6.0))
        .unwrap_or_else(|| r.accepted());
    println!("write -> renewal accepted: {latencies:?}; accepted {accepted}");
    assert_eq!(accepted, 6.0, "one renewal per rewrite: {latencies:?}");
    assert!(
        latencies.iter().all(Option::is_some),
        "each renewal within 1.5 s of its write (token_poll 1 s + the renew): {latencies:?}"
    );
    assert_eq!(r.refused(), 0.0);
    assert_eq!(task.stats().registrations, 1, "the link never reopened");
}

/// ROTATION.md, out of order: a token of the new cluster key version written before the
/// router reloaded its keyring is refused (`unknown_key`). The SDK used to never send it
/// again, and the link was closed (1008) when the old version's grace ended. Now the refused
/// renew is sent again with backoff (1 s doubling to 30 s) while the router holds an older
/// token than the newest: the reload lets it through, and the link outlives the grace.
#[test]
fn a_renew_refused_for_an_unknown_key_is_sent_again_until_the_router_knows_it() {
    // Retries fall about 1, 3 and 7 s after the rotation (then 15 s): room for a slow reload.
    const GRACE: u64 = 20;
    let r = Router::start("sdk-unknown-key", GRACE);
    let file = r.home().join("task.token");
    write_token(&file, &r.service_token("v1", &[]));
    let client = r.client_token();
    let rt = rt();
    let task = spawn(&rt, r.options("").token_file(&file));
    registered(&rt, &task);
    r.wait_routed(&client);

    r.rotate_cluster_key();
    let rotated = Instant::now();
    write_token(&file, &r.service_token("v2", &[]));
    // Refused, and sent again (a second refusal) before the router reloads.
    kit::wait_until(
        "the v2 token refused twice (sent again after the first refusal)",
        WAIT,
        || (r.refused() >= 2.0).then_some(()),
        || r.run.log(),
    );
    assert_eq!(r.accepted(), 0.0);
    r.reload();
    let left = Duration::from_secs(GRACE).saturating_sub(rotated.elapsed());
    kit::wait_until(
        "the v2 token accepted after the reload, before v1's grace ends",
        left,
        || (r.accepted() >= 1.0).then_some(()),
        || r.run.log(),
    );
    println!(
        "refused {} then accepted {} at {:?} after the rotation",
        r.refused(),
        r.accepted(),
        rotated.elapsed()
    );
    // Past v1's grace (the router checks a link's key each second): the link lives on.
    let past = rotated + Duration::from_secs(GRACE) + Duration::from_millis(2500);
    std::thread::sleep(past.saturating_duration_since(Instant::now()));
    assert_eq!(r.revoked(), 0.0, "no link closed at v1's grace end");
    assert_eq!(r.request(&client), 200);
    assert_eq!(task.registered_links(), 1);
    assert_eq!(task.stats().registrations, 1, "the link never reopened");
}

/// ROTATION.md step 4 with a token command: after `keys rotate --cluster` and the reload, the
/// command prints tokens of the new version, but it ran only when the token was due (days
/// later), so open links kept the old version until its grace ended (1008). Now it runs every
/// `token_refresh` too (here 2 s), and the links are renewed with a new-version token in time.
#[test]
fn a_token_command_runs_again_every_token_refresh_so_a_rotation_reaches_open_links() {
    const GRACE: u64 = 8;
    let r = Router::start("sdk-command-refresh", GRACE);
    let runs = r.home().join("runs");
    let cmd = format!(
        "echo run >> {runs:?}; exec {bin:?} token service --task-id cmd --app {APP} --keyring {keys:?} --ttl 1h",
        bin = kit::bin(),
        keys = r.keys,
    );
    let client = r.client_token();
    let rt = rt();
    let mut opts = r.options("").token_command(cmd);
    opts.token_refresh = Duration::from_secs(2);
    let task = spawn(&rt, opts);
    registered(&rt, &task);
    r.wait_routed(&client);

    r.rotate_cluster_key();
    let rotated = Instant::now();
    r.reload();
    let before = r.accepted();
    // The next refresh (within 2 s, and a new `iat` second) renews with a version-2 token.
    let left = Duration::from_secs(GRACE).saturating_sub(rotated.elapsed());
    kit::wait_until(
        "a renewal after the rotation, before v1's grace ends",
        left,
        || (r.accepted() > before).then_some(()),
        || r.run.log(),
    );
    let past = rotated + Duration::from_secs(GRACE) + Duration::from_millis(2500);
    std::thread::sleep(past.saturating_duration_since(Instant::now()));
    let n = std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count();
    println!(
        "command runs {n}, renewals accepted {}, refused {}",
        r.accepted(),
        r.refused()
    );
    assert_eq!(r.revoked(), 0.0, "no link closed at v1's grace end");
    assert_eq!(r.request(&client), 200);
    assert_eq!(task.stats().registrations, 1, "the link never reopened");
}

/// A token of another app, and role `auth` with a token that names no role: the router closes
/// the registration with 1008 and the reason `wrong_token` (it used to send no reason), and the
/// SDK counts it as a refusal: the task ends within `refused_exit_after` (it used to dial
/// again forever).
#[test]
fn a_registration_refused_for_the_token_ends_the_task_like_a_refused_upgrade() {
    let r = Router::start("sdk-wrong-token", 86400);
    let rt = rt();
    let other_app = {
        let k = r.keys.to_str().expect("utf-8");
        let a = [
            "token",
            "service",
            "--task-id",
            "other",
            "--app",
            "demo/other",
            "--keyring",
            k,
        ];
        kit::fedbus(r.home(), &a).trim().to_string()
    };
    let no_role = r.service_token("auth-without-role", &[]);
    let exit_after = Duration::from_secs(2);
    let mut a = TaskOptions::new([r.internal.to_string()], APP, vec![0], other_app);
    a.refused_exit_after = exit_after;
    let mut b = TaskOptions::new([r.internal.to_string()], APP, vec![0], no_role).role("auth");
    b.refused_exit_after = exit_after;
    let t0 = Instant::now();
    let (ta, tb) = (spawn(&rt, a), spawn(&rt, b));
    let ended = rt.block_on(async {
        tokio::time::timeout(WAIT, async { tokio::join!(ta.failed(), tb.failed()) }).await
    });
    let took = t0.elapsed();
    let (why_a, why_b) = ended.unwrap_or_else(|_| {
        panic!(
            "the tasks still dial after {WAIT:?}: {:?} / {:?}",
            ta.last_error(),
            tb.last_error()
        )
    });
    println!("another app: {why_a}\nrole auth, no role: {why_b}\nafter {took:?}");
    for why in [&why_a, &why_b] {
        assert!(
            why.contains("registration refused") && why.contains("wrong_token"),
            "{why}"
        );
    }
    assert!(took >= exit_after, "{took:?}");
    assert_eq!(ta.registered_links() + tb.registered_links(), 0);
    let log = r.run.log();
    assert!(
        log.contains("registration refused (wrong_token)"),
        "router log:\n{log}"
    );
}

/// `Task::shutdown` drops the answers of handlers still running (their clients get 502
/// `task_lost`); `Task::shutdown_graceful` takes its links out of routing (the only task of the
/// app: a new request is the router's `503 no_live_task`, answered at once; one that reached
/// the task first would be its `503 task_stopping`) and lets the three requests in a 1.5 s
/// handler answer 200 before the links close.
#[test]
fn a_graceful_shutdown_lets_the_handlers_in_flight_answer() {
    let r = std::sync::Arc::new(Router::start("sdk-graceful", 86400));
    let client = r.client_token();
    let rt = rt();
    let token = r.service_token("graceful", &[]);
    let task = spawn(&rt, r.options(token));
    registered(&rt, &task);
    r.wait_routed(&client);
    let before = task.stats().requests;
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (r, client) = (r.clone(), client.clone());
            std::thread::spawn(move || r.request_body(&client, b"sleep 1500"))
        })
        .collect();
    kit::wait_until(
        "the three slow requests in the handler",
        WAIT,
        || (task.stats().requests >= before + 3).then_some(()),
        String::new,
    );
    let t0 = Instant::now();
    let stopping = std::thread::spawn(move || {
        let left = rt.block_on(task.shutdown_graceful(Duration::from_secs(10)));
        (left, t0.elapsed())
    });
    // A request that arrives during the drain is answered at once.
    let refused = kit::wait_until(
        "a request answered 503 during the drain",
        WAIT,
        || {
            let resp = r.request_body(&client, b"x");
            (resp.status == 503).then_some(resp)
        },
        || r.run.log(),
    );
    let why = refused.json()["error"].clone();
    assert!(
        why == "no_live_task" || why == "task_stopping",
        "{refused:?}"
    );
    let answers: Vec<u16> = slow
        .into_iter()
        .map(|h| h.join().expect("client").status)
        .collect();
    let (left, took) = stopping.join().expect("shutdown");
    println!("slow requests: {answers:?}; handlers left {left}; shutdown took {took:?}");
    assert_eq!(answers, [200, 200, 200], "the handlers in flight answered");
    assert_eq!(left, 0);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// SDK.md: a rolling restart of tasks. Two tasks serve the same partitions and one stops with
/// `shutdown_graceful` while a slow request holds it open: its links tell the router it is
/// stopping (`{"type":"draining"}`), so every request sent meanwhile is answered 200 by the
/// other task, none `503 task_stopping`, and the slow one still gets its answer. Before, the
/// router kept sending the stopping task its share of new requests (round robin) until its
/// links closed, and each got 503.
#[test]
fn a_graceful_shutdown_moves_new_requests_to_the_other_task() {
    let r = std::sync::Arc::new(Router::start("sdk-rolling", 86400));
    let client = r.client_token();
    // Shared: the thread that stops one task must not drop the runtime the other runs on.
    let rt = std::sync::Arc::new(rt());
    let all: Vec<u32> = (0..16).collect();
    let opts = |id: &str| {
        TaskOptions::new(
            [r.internal.to_string()],
            APP,
            all.clone(),
            r.service_token(id, &[]),
        )
    };
    let stopping = spawn(&rt, opts("rolling-a"));
    registered(&rt, &stopping);
    let staying = spawn(&rt, opts("rolling-b"));
    registered(&rt, &staying);
    // Both in the routing snapshot (the control thread publishes a registration a moment
    // after the link has it): requests reach each.
    let (a0, b0) = (stopping.stats().requests, staying.stats().requests);
    kit::wait_until(
        "requests reaching both tasks",
        WAIT,
        || {
            // 503 until the table holds a task; anything else is a failure.
            let status = r.request(&client);
            assert!(status == 200 || status == 503, "status {status}");
            (status == 200 && stopping.stats().requests > a0 && staying.stats().requests > b0)
                .then_some(())
        },
        || format!("{:?} {:?}", stopping.stats(), staying.stats()),
    );
    // Two slow requests at once: the round robin gives one to each task.
    let (a0, b0) = (stopping.stats().requests, staying.stats().requests);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (r, client) = (r.clone(), client.clone());
            std::thread::spawn(move || r.request_body(&client, b"sleep 1500"))
        })
        .collect();
    kit::wait_until(
        "a slow request in each task",
        WAIT,
        || (stopping.stats().requests > a0 && staying.stats().requests > b0).then_some(()),
        || format!("{:?} {:?}", stopping.stats(), staying.stats()),
    );
    let t0 = Instant::now();
    let rt2 = rt.clone();
    let stopped = std::thread::spawn(move || {
        let left = rt2.block_on(stopping.shutdown_graceful(Duration::from_secs(10)));
        (left, t0.elapsed())
    });
    // The router has the message (the link is out of routing before the sweeper counts it).
    kit::wait_until(
        "the stopping task's link out of routing",
        WAIT,
        || (r.metric("fedbus_task_ejected_total{reason=\"stopping\"}") >= 1.0).then_some(()),
        || r.run.log(),
    );
    // While its slow request runs (1.5 s) and after its links close, new requests: none may
    // reach it.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let resp = r.request_body(&client, b"x");
        if resp.status != 200 {
            println!("{resp:?}");
        }
        statuses.push(resp.status);
    }
    let slow: Vec<u16> = slow
        .into_iter()
        .map(|h| h.join().expect("client").status)
        .collect();
    let (left, took) = stopped.join().expect("shutdown");
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{} requests during the graceful shutdown, {failed} not 200; slow {slow:?}; left {left}; took {took:?}",
        statuses.len()
    );
    assert_eq!(failed, 0, "statuses {statuses:?}\n{}", r.run.log());
    assert_eq!(slow, [200, 200]);
    assert_eq!(left, 0);
    assert!(
        r.run
            .log()
            .contains("task stopping: its link leaves routing"),
        "{}",
        r.run.log()
    );
    // The other task serves on.
    let after = r.request_body(&client, b"after");
    assert_eq!(after.status, 200, "{after:?}\n{}", r.run.log());
}

/// SDK.md, a rolling restart under load: four clients send back to back on keep-alive
/// connections while, three times over, a new task starts and the oldest stops with
/// `shutdown_graceful`. No request fails: one the router routed to the stopping task before it
/// read `draining` is served by that task, which closes only after the router's `drained`
/// (PROTOCOL.md section 4). Before `drained`, such a request got `503 task_stopping`, or
/// `502 task_lost` when it reached a task that had already closed its links.
#[test]
fn a_rolling_restart_of_sdk_tasks_under_load_fails_no_request() {
    let r = std::sync::Arc::new(Router::start("sdk-rolling-load", 86400));
    let client = r.client_token();
    let rt = std::sync::Arc::new(rt());
    let all: Vec<u32> = (0..16).collect();
    let opts = |id: &str| {
        TaskOptions::new(
            [r.internal.to_string()],
            APP,
            all.clone(),
            r.service_token(id, &[]),
        )
    };
    let first = spawn(&rt, opts("roll-0"));
    registered(&rt, &first);
    let mut tasks = std::collections::VecDeque::from([first]);
    kit::wait_until(
        "the first task serving",
        WAIT,
        || (r.request(&client) == 200).then_some(()),
        || r.run.log(),
    );
    let path = format!("/api/local/dev/{APP}/api/3/sys/echo");
    let load = kit::attack::BackToBack::start(r.api, 4, |_| {
        Req::post(&path).token(&client).body(b"roll").bytes()
    });
    for i in 1..=3 {
        let next = spawn(&rt, opts(&format!("roll-{i}")));
        registered(&rt, &next);
        // In the routing snapshot, and both tasks under load a while.
        kit::wait_until(
            "the new task serving",
            WAIT,
            || (next.stats().requests > 300).then_some(()),
            || format!("{:?}", next.stats()),
        );
        tasks.push_back(next);
        let old = tasks.pop_front().expect("a task");
        let left = rt.block_on(old.shutdown_graceful(Duration::from_secs(10)));
        assert_eq!(left, 0);
    }
    let seen = load.stop();
    println!("answers over three restarts: {seen:?}");
    assert!(seen.get("200").is_some_and(|n| *n > 100), "{seen:?}");
    assert_eq!(seen.len(), 1, "a request failed: {seen:?}\n{}", r.run.log());
}

/// docs/FEDERATION.md "Takeover", with an SDK task: a new router takes the addresses of the
/// running one over (`--takeover`, its ports written into its config), the old one gets
/// SIGTERM, and four clients sending back to back through it all see 200. The old router tells
/// the task `router_draining` (PROTOCOL.md section 4): the SDK links the same address again
/// (the new router) at once and keeps the old link until the old router closes it.
#[test]
fn a_takeover_of_the_router_under_load_fails_no_request_of_an_sdk_task() {
    launch::migrate_req_on();
    let mut r = Router::start_with("sdk-takeover", 86400, 15_000);
    let client = r.client_token();
    let rt = rt();
    let task = spawn(&rt, r.options(r.service_token("over", &[])));
    registered(&rt, &task);
    kit::wait_until(
        "the task serving",
        WAIT,
        || (r.request(&client) == 200).then_some(()),
        || r.run.log(),
    );
    // A request the old router holds for 8 s (its request timeout is 15 s; sent before the load, so that it is the only
    // one pending): its drain lasts that long.
    let slow = {
        let (api, req) = (
            r.api,
            Req::post(&format!("/api/local/dev/{APP}/api/5/sys/echo"))
                .token(&client)
                .body(b"sleep 8000")
                .bytes(),
        );
        std::thread::spawn(move || {
            let mut c = Conn::open(api);
            c.set_read_timeout(Duration::from_secs(15));
            c.send(&req);
            c.read_response().map(|r| r.status)
        })
    };
    kit::wait_until(
        "the slow request pending",
        WAIT,
        || (r.metric("fedbus_pending_requests") == 1.0).then_some(()),
        || r.run.log(),
    );
    let path = format!("/api/local/dev/{APP}/api/3/sys/echo");
    let load = kit::attack::BackToBack::start(r.api, 4, |_| {
        Req::post(&path).token(&client).body(b"over").bytes()
    });
    kit::wait_until(
        "load running",
        WAIT,
        || (load.answered() > 100).then_some(()),
        || r.run.log(),
    );
    // The same config on the ports the old router got.
    let home = r.home().to_path_buf();
    let cfg = std::fs::read_to_string(home.join("router.toml"))
        .expect("config")
        .replace(
            &format!("api = \"{IP}:0\""),
            &format!("api = \"{}\"", r.api),
        )
        .replace(
            &format!("internal = \"{IP}:0\""),
            &format!("internal = \"{}\"", r.internal),
        )
        .replace(
            &format!("admin = \"{IP}:0\""),
            &format!("admin = \"{}\"", r.admin),
        );
    let cfg_path = home.join("router-new.toml");
    std::fs::write(&cfg_path, cfg).expect("config");
    let (new, rx) = launch::spawn_run(&home, &cfg_path, &["--takeover"], &home.join("new.log"));
    let new = new.plain_log();
    launch::wait_ready(&new, &rx, kit::START_TIMEOUT);
    r.run.sig("TERM");
    // Told `router_draining`, the task links the new router while the old one drains.
    kit::wait_until(
        "a second link registered",
        Duration::from_secs(2),
        || (task.stats().registrations == 2).then_some(()),
        || format!("{:?}\n{}", task.stats(), r.run.log()),
    );
    assert!(
        r.run.alive(),
        "the old router exited before its slow request was answered"
    );
    assert_eq!(slow.join().expect("slow client").ok(), Some(200));
    let exit = r.run.wait_exit(WAIT);
    assert!(
        exit.is_some_and(|x| x.success()),
        "{exit:?}\n{}",
        r.run.log()
    );
    assert!(
        r.run.log().contains("told the task links to link again"),
        "{}",
        r.run.log()
    );
    kit::wait_until(
        "the task on the new router only",
        WAIT,
        || (task.stats().registrations == 2 && task.registered_links() == 1).then_some(()),
        || format!("{:?}\n{}", task.stats(), new.log()),
    );
    let at_exit = load.answered();
    kit::wait_until(
        "the new router serving",
        WAIT,
        || (load.answered() > at_exit + 100).then_some(()),
        || new.log(),
    );
    let seen = load.stop();
    println!(
        "answers over the takeover: {seen:?}; task {:?}",
        task.stats()
    );
    assert_eq!(
        seen.len(),
        1,
        "a request failed: {seen:?}\nold:\n{}\nnew:\n{}",
        r.run.log(),
        new.log()
    );
    assert!(seen.contains_key("200"), "{seen:?}");
    drop(new);
}
