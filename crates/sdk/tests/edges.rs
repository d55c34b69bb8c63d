//! fedbus-sdk at its edges, written from docs/SDK.md, docs/PROTOCOL.md and docs/ROTATION.md as
//! an adversarial probe (8 of these failed on the SDK before: shards linked twice, token
//! commands without a time limit, renews faster than the router takes, an answer over the
//! router's bound): an SDK task in this process (tokio), a real `fedbus run` router from the
//! test kit (or, for restarts, one on fixed ports), and blocking HTTP clients. Every wait is on a fact and
//! bounded; the few fixed sleeps prove an absence and are bounded too.
//!
//! `cargo build --release -p fedbus && cargo test --release -p fedbus-sdk --test integration edges::`

use fedbus_sdk::{Error, Outcome, Partitions, Request, Task, TaskOptions};
use fedbus_testkit::{self as kit, Conn, Req, Response, Router};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
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

fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// API path of `demo/echo` for `wsid`, function `function` (service `api`, module `sys`).
fn p(wsid: u64, function: &str) -> String {
    format!("/api/local/dev/demo/echo/api/{wsid}/sys/{function}")
}

/// A service token for `demo/echo` from the router's keyring.
fn svc_token(home: &Path, keys: &Path, id: &str, extra: &[&str]) -> String {
    let k = keys.to_str().expect("utf-8");
    let mut a = vec![
        "token",
        "service",
        "--task-id",
        id,
        "--app",
        "demo/echo",
        "--keyring",
        k,
    ];
    a.extend_from_slice(extra);
    kit::fedbus(home, &a).trim().to_string()
}

fn svc(r: &Router, id: &str) -> String {
    svc_token(r.home(), &r.keys, id, &[])
}

fn opts_for(addrs: &[SocketAddr], token: &str) -> TaskOptions {
    TaskOptions::new(
        addrs.iter().map(|a| a.to_string()),
        "demo/echo",
        (0..16).collect::<Vec<u32>>(),
        token,
    )
}

fn spawn<H, F>(rt: &tokio::runtime::Runtime, opts: TaskOptions, h: H) -> Task
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Outcome> + Send + 'static,
{
    let _g = rt.enter();
    Task::spawn(opts, h).expect("spawn the task")
}

fn req(r: &Router, tok: &str, wsid: u64, function: &str, body: &[u8]) -> Response {
    r.request(&Req::post(&p(wsid, function)).token(tok).body(body))
}

/// Waits until `task` has a link on every shard and fresh client connections are routed to it
/// (several, so that both shards of a two-shard router have seen the routing table).
fn ready(rt: &tokio::runtime::Runtime, r: &Router, task: &Task, tok: &str) {
    assert!(
        rt.block_on(task.wait_registered(r.shards(), WAIT)),
        "registered on {} shards: {:?}, last error {:?}",
        r.shards(),
        task.stats(),
        task.last_error()
    );
    let mut ok = 0;
    let deadline = Instant::now() + WAIT;
    while ok < 8 {
        let resp = req(r, tok, ok, "echo", b"probe");
        if resp.status == 200 {
            ok += 1;
        } else {
            assert_eq!(resp.status, 503, "{resp:?}");
            ok = 0;
        }
        assert!(Instant::now() < deadline, "not routed: {resp:?}");
    }
}

fn metric(r: &Router, series: &str) -> f64 {
    r.metrics().get(series)
}

/// The probe handler: behaviour chosen by the request's function.
async fn probe(req: Request) -> Outcome {
    let function = req.function().unwrap_or("").to_string();
    let body = String::from_utf8_lossy(req.payload()).into_owned();
    let main = req.role() == Some("main");
    match function.as_str() {
        "echo" => {
            let ct = req.content_type().map(str::to_string);
            Outcome::ok(req.into_payload()).with_content_type(ct)
        }
        "panic" => panic!("probe: handler panics at once"),
        "panic_later" => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            panic!("probe: handler panics after an await")
        }
        "hang" => std::future::pending().await,
        "sleep" => {
            let ms: u64 = body.trim().parse().unwrap_or(300);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Outcome::ok(body)
        }
        "status" => Outcome::status(body.trim().parse().expect("status"), "status body"),
        "headers" => Outcome::ok("h")
            .with_header("x-probe", "yes")
            .with_header("content-length", "999")
            .with_header("transfer-encoding", "chunked")
            .with_header("connection", "close")
            .with_header("fedbus-shard", "99")
            .with_header("x-inject", "a\r\nx-evil: 1")
            .with_header("bad name", "v")
            .with_header("content-type", "text/evil")
            .with_content_type(Some("text/probe")),
        "big" => Outcome::ok(vec![b'z'; body.trim().parse::<usize>().expect("size")]),
        "redirect" if main => Outcome::redirect(body),
        "redirect_to" if main => {
            let (role, part) = body.split_once(':').expect("role:partition");
            Outcome::redirect_to(role, part.parse().expect("partition"))
        }
        _ => Outcome::json(
            200,
            &serde_json::json!({
                "app": req.app(), "role": req.role(), "service": req.service(),
                "module": req.module(), "function": req.function(), "wsid": req.wsid(),
                "method": req.method(), "subject": req.subject(),
                "content_type": req.content_type(), "partition": req.partition(),
                "hops": req.hops(), "emergency": req.is_emergency(),
                "forwarded": req.is_forwarded(), "router": req.router(), "shard": req.shard(),
                "payload": body,
            }),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Handlers that fail

#[test]
fn panicking_handler_answers_500_and_the_link_serves_on() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "panic")), probe);
    ready(&rt, &r, &task, &tok);
    for f in ["panic", "panic_later", "panic"] {
        let resp = req(&r, &tok, 3, f, b"x");
        assert_eq!(resp.status, 500, "{f}: {resp:?}");
        assert_eq!(resp.json()["error"], "task_panic", "{resp:?}");
        let ok = req(&r, &tok, 3, "echo", b"after");
        assert_eq!(
            (ok.status, ok.body.as_slice()),
            (200, b"after".as_slice()),
            "{ok:?}"
        );
    }
    let s = task.stats();
    assert_eq!(
        (s.panics, s.connects, s.registered_links),
        (3, 1, 1),
        "{s:?}"
    );
}

#[test]
fn handler_that_never_returns_gives_504_and_the_next_request_is_served() {
    let r = Router::new().request_timeout_ms(1000).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "hang")), probe);
    ready(&rt, &r, &task, &tok);
    let t0 = Instant::now();
    let resp = req(&r, &tok, 4, "hang", b"");
    resp.assert_error(504, "task_timeout");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    let ok = req(&r, &tok, 4, "echo", b"next");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(task.stats().connects, 1, "{:?}", task.stats());
}

/// `TaskOptions::max_in_flight`: handlers that never return hold their requests after the
/// router gave up on them (504 at its `request_timeout_ms`); once `max_in_flight` of them run,
/// a new request is answered `503 task_busy` at once (counted in `Stats::busy`) instead of
/// starting one more, and a request answered at once (`echo`) is refused the same way.
/// Before, handlers piled up without a bound.
#[test]
fn handlers_over_max_in_flight_are_refused_503_task_busy() {
    let r = Router::new().request_timeout_ms(300).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let opts = TaskOptions {
        max_in_flight: 2,
        ..opts_for(&r.internal, &svc(&r, "busy"))
    };
    let task = spawn(&rt, opts, probe);
    ready(&rt, &r, &task, &tok);
    for wsid in [1, 2] {
        req(&r, &tok, wsid, "hang", b"").assert_error(504, "task_timeout");
    }
    // A 503 from the task, not the router's 504 at its timeout: refused at once.
    req(&r, &tok, 3, "hang", b"").assert_error(503, "task_busy");
    req(&r, &tok, 4, "echo", b"x").assert_error(503, "task_busy");
    assert_eq!(task.stats().busy, 2, "{:?}", task.stats());
}

// ---------------------------------------------------------------------------------------
// Answers: status, headers, content type, sizes

#[test]
fn custom_statuses_reach_the_client() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "status")), probe);
    ready(&rt, &r, &task, &tok);
    let mut retry_after = None;
    for s in [201u16, 404, 418, 500, 503, 599] {
        let resp = req(&r, &tok, 1, "status", s.to_string().as_bytes());
        assert_eq!(resp.status, s, "{resp:?}");
        assert_eq!(resp.body, b"status body", "{resp:?}");
        if s == 503 {
            retry_after = Some(resp.header("retry-after").map(str::to_string));
        }
    }
    let mut c = r.conn();
    c.send(&Req::post(&p(1, "status")).token(&tok).body(b"204").bytes());
    let resp = c.read_response_for("POST").expect("204");
    assert_eq!(resp.status, 204, "{resp:?}");
    assert!(
        resp.body.is_empty() && resp.header("content-length").is_none(),
        "{resp:?}"
    );
    // PROTOCOL.md section 6: `retry-after: 1` only on a router-made 503; a task's 503 keeps its
    // own headers (this one sets none), as nginx passes an upstream's.
    assert_eq!(
        retry_after,
        Some(None),
        "a task's 503 gets no retry-after of the router's"
    );
}

/// `Outcome::Response::status` and PROTOCOL.md section 6: a STATUS outside 200..599, 1xx
/// included, reaches the client as `502 bad_task_status`.
#[test]
fn status_outside_the_range_reaches_the_client_as_documented_by_the_sdk() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "status-bad")), probe);
    ready(&rt, &r, &task, &tok);
    let mut seen = Vec::new();
    for s in [0u16, 99, 100, 600, 999] {
        let resp = req(&r, &tok, 1, "status", s.to_string().as_bytes());
        let json = resp
            .header("content-type")
            .filter(|c| *c == "application/json")
            .map(|_| resp.json());
        let err = json.as_ref().map(|j| j["error"].clone());
        let message = json
            .as_ref()
            .and_then(|j| j["message"].as_str().map(str::to_string));
        seen.push((s, resp.status, err, message));
    }
    println!("status sent -> client got: {seen:?}");
    for (s, got, err, message) in &seen {
        assert_eq!(
            (*got, err.as_ref().and_then(|e| e.as_str())),
            (502, Some("bad_task_status")),
            "Outcome::status({s}); all: {seen:?}"
        );
        // The message says what is wrong with that status (it said "a status that cannot
        // carry a body" for all of them).
        let m = message.as_deref().unwrap_or("");
        assert!(
            m.contains(&format!("status {s},")) && m.contains("200 to 599"),
            "{s}: {m}"
        );
    }
}

#[test]
fn forbidden_and_malformed_answer_headers_are_dropped() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "hdr")), probe);
    ready(&rt, &r, &task, &tok);
    // The test kit's reader also fails on a header name given twice.
    let mut c = r.conn();
    let resp = c.request(&Req::post(&p(2, "headers")).token(&tok).body(b""));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"h", "{resp:?}");
    assert_eq!(resp.header("x-probe"), Some("yes"), "{resp:?}");
    assert_eq!(resp.header("content-length"), Some("1"), "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("text/probe"), "{resp:?}");
    assert_eq!(resp.header("fedbus-shard"), Some("0"), "{resp:?}");
    for h in [
        "transfer-encoding",
        "x-inject",
        "x-evil",
        "bad name",
        "connection",
    ] {
        assert!(resp.header(h).is_none(), "{h} passed: {resp:?}");
    }
    // The connection is still usable (no `connection: close` from the task).
    let again = c.request(&Req::post(&p(2, "echo")).token(&tok).body(b"k"));
    assert_eq!(again.status, 200, "{again:?}");
}

#[test]
fn request_metadata_reaches_the_handler() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "meta")), probe);
    ready(&rt, &r, &task, &tok);
    let resp = r.request(
        &Req::new("PUT", &p(37, "meta"))
            .token(&tok)
            .header("Content-Type", "text/x-probe")
            .body(b"payload"),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let j = resp.json();
    let want = serde_json::json!({
        "app": "demo/echo", "role": "main", "service": "api", "module": "sys",
        "function": "meta", "wsid": 37, "method": "PUT", "subject": "alice",
        "content_type": "text/x-probe", "partition": 5, "hops": 0, "emergency": false,
        "forwarded": false, "shard": 0, "payload": "payload",
    });
    for (k, v) in want.as_object().expect("object") {
        assert_eq!(&j[k], v, "{k}: {j}");
    }
    assert!(
        j["router"]
            .as_str()
            .is_some_and(|s| s.starts_with("local/dev/")),
        "{j}"
    );
}

#[test]
fn request_for_a_partition_without_task_is_flagged_emergency() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let mut o = opts_for(&r.internal, &svc(&r, "emerg"));
    o.partitions = "0-7".parse::<Partitions>().expect("partitions").into();
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let resp = req(&r, &tok, 9, "meta", b"");
    assert_eq!(resp.status, 200, "{resp:?}");
    let j = resp.json();
    assert_eq!(j["emergency"], true, "{j}");
    assert_eq!(j["wsid"], 9, "{j}");
    assert!(j["partition"].as_u64().is_some_and(|p| p < 8), "{j}");
    assert_eq!(resp.header("fedbus-emergency"), Some("9"), "{resp:?}");
}

/// The emergency partition's failures say they were the emergency partition's, as its
/// answers do: a 504 (the task did not answer in time) and a 502 (its answer's status is not
/// HTTP) both carry `fedbus-emergency` with the partition asked for, besides the partition
/// that failed.
#[test]
fn an_error_of_the_emergency_partition_is_flagged_emergency() {
    let r = Router::new().request_timeout_ms(500).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let mut o = opts_for(&r.internal, &svc(&r, "emerg-err"));
    o.partitions = "0-7".parse::<Partitions>().expect("partitions").into();
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let resp = req(&r, &tok, 9, "hang", b"");
    resp.assert_error(504, "task_timeout");
    assert_eq!(resp.header("fedbus-emergency"), Some("9"), "{resp:?}");
    assert!(
        resp.header("fedbus-partition")
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| p < 8),
        "{resp:?}"
    );
    let resp = req(&r, &tok, 10, "status", b"99");
    resp.assert_error(502, "bad_task_status");
    assert_eq!(resp.header("fedbus-emergency"), Some("10"), "{resp:?}");
    // A partition the task serves is no emergency, answer or error.
    let resp = req(&r, &tok, 3, "status", b"99");
    resp.assert_error(502, "bad_task_status");
    assert_eq!(resp.header("fedbus-emergency"), None, "{resp:?}");
}

#[test]
fn request_body_at_max_body_bytes_is_delivered_whole() {
    let r = Router::new().limit("max_body_bytes", 1 << 20).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "bigreq")), probe);
    ready(&rt, &r, &task, &tok);
    let body = kit::random_bytes(1 << 20, 7);
    let resp = req(&r, &tok, 5, "echo", &body);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.body == body, "1 MiB echoed");
    assert_eq!(
        resp.header("content-type"),
        Some("application/octet-stream")
    );
}

/// An answer is one message on the link; the router takes at most `max_body_bytes + 64 KiB`
/// (PROTOCOL.md section 3). An answer at `max_body_bytes` goes through; one over the router's
/// bound: what do its client and the other requests in flight on the same link get?
#[test]
fn answer_over_the_router_message_bound_fails_alone() {
    let max = 256 * 1024;
    let r = Router::new()
        .limit("max_body_bytes", max)
        .request_timeout_ms(4000)
        .start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "bigans")), probe);
    ready(&rt, &r, &task, &tok);
    let resp = req(&r, &tok, 5, "big", max.to_string().as_bytes());
    assert_eq!((resp.status, resp.body.len()), (200, max), "{resp:?}");

    // A slow request in flight on the same link while the oversized answer goes out.
    let api = r.api;
    let tok2 = tok.clone();
    let slow = std::thread::spawn(move || {
        let mut c = Conn::open(api);
        c.request(&Req::post(&p(6, "sleep")).token(&tok2).body(b"1500"))
    });
    r.wait_pending(1.0);
    let t0 = Instant::now();
    let big = req(
        &r,
        &tok,
        5,
        "big",
        (max + 128 * 1024).to_string().as_bytes(),
    );
    let big_took = t0.elapsed();
    let slow = slow.join().expect("slow client");
    println!(
        "oversized answer: client got {} {:?} after {big_took:?}; the slow request on the same link got {} {:?}; task {:?} last error {:?}",
        big.status,
        String::from_utf8_lossy(&big.body[..big.body.len().min(200)]),
        slow.status,
        String::from_utf8_lossy(&slow.body),
        task.stats(),
        task.last_error()
    );
    // The SDK answers it with an error itself (the hello's max_message), so the router does not
    // close the link (1009) and fail the other requests on it.
    assert_eq!(big.status, 502, "{big:?}");
    assert_eq!(big.json()["error"], "answer_too_large", "{big:?}");
    assert_eq!(slow.status, 200, "a request in flight on the link was failed by another request's oversized answer: {slow:?}");
    let s = task.stats();
    assert_eq!(
        (s.too_large, s.connects),
        (1, r.shards() as u64),
        "{s:?} {:?}",
        task.last_error()
    );
    assert_eq!(req(&r, &tok, 5, "echo", b"k").status, 200);
}

/// A request over `TaskOptions::max_message`: its client gets an error at once (not a 504
/// after the request timeout) and the task serves the next request.
#[test]
fn request_over_max_message_fails_and_the_task_recovers() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let mut o = opts_for(&r.internal, &svc(&r, "maxmsg"));
    o.max_message = 64 * 1024;
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let t0 = Instant::now();
    let resp = req(&r, &tok, 5, "echo", &vec![1u8; 100 * 1024]);
    println!(
        "over max_message: {} after {:?}; last error {:?}",
        resp.status,
        t0.elapsed(),
        task.last_error()
    );
    resp.assert_error(502, "task_lost");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    wait("served again", WAIT, || {
        req(&r, &tok, 5, "echo", b"small").status == 200
    });
}

// ---------------------------------------------------------------------------------------
// Concurrency and backpressure

#[test]
fn many_slow_requests_are_served_concurrently() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "conc")), probe);
    ready(&rt, &r, &task, &tok);
    let before = task.stats();
    let n = 48u64;
    let t0 = Instant::now();
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let (api, tok) = (r.api, tok.clone());
            std::thread::spawn(move || {
                Conn::open(api).request(&Req::post(&p(i, "sleep")).token(&tok).body(b"400"))
            })
        })
        .collect();
    for c in clients {
        let resp = c.join().expect("client");
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "48 x 400 ms handlers took {took:?}"
    );
    let s = task.stats();
    assert_eq!(s.requests - before.requests, n, "{s:?}");
    assert_eq!(s.answers, s.requests, "{s:?}");
}

#[test]
fn requests_over_max_pending_per_link_are_refused_not_queued_at_the_task() {
    let r = Router::new().limit("max_pending_per_link", 4).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "pending")), probe);
    ready(&rt, &r, &task, &tok);
    let before = task.stats().requests;
    let clients: Vec<_> = (0..12u64)
        .map(|i| {
            let (api, tok) = (r.api, tok.clone());
            std::thread::spawn(move || {
                Conn::open(api).request(&Req::post(&p(i, "sleep")).token(&tok).body(b"1000"))
            })
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().expect("client").status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + busy, 12, "{statuses:?}");
    assert!(ok >= 4 && busy >= 1, "{statuses:?}");
    assert_eq!(
        task.stats().requests - before,
        ok as u64,
        "{:?}",
        task.stats()
    );
}

// ---------------------------------------------------------------------------------------
// Redirects

#[test]
fn redirect_reaches_a_task_of_another_role() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let main = spawn(&rt, opts_for(&r.internal, &svc(&r, "rd-main")), probe);
    ready(&rt, &r, &main, &tok);
    let worker = spawn(
        &rt,
        opts_for(&r.internal, &svc(&r, "rd-worker")).role("worker"),
        probe,
    );
    assert!(
        rt.block_on(worker.wait_registered(1, WAIT)),
        "{:?}",
        worker.last_error()
    );
    let resp = (0..200)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            req(&r, &tok, 21, "redirect", b"worker")
        })
        .find(|x| x.status == 200)
        .expect("redirect served");
    let j = resp.json();
    assert_eq!(
        (j["role"].clone(), j["hops"].clone(), j["partition"].clone()),
        ("worker".into(), 1.into(), 5.into()),
        "{j}"
    );
    assert_eq!(resp.header("fedbus-hops"), Some("1"), "{resp:?}");
    let resp = req(&r, &tok, 21, "redirect_to", b"worker:3");
    assert_eq!(resp.status, 200, "{resp:?}");
    let j = resp.json();
    assert_eq!(
        (j["role"].clone(), j["partition"].clone()),
        ("worker".into(), 3.into()),
        "{j}"
    );
    assert_eq!(resp.header("fedbus-partition"), Some("3"), "{resp:?}");
}

#[test]
fn bad_redirects_give_the_documented_errors() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "rd-bad")), probe);
    ready(&rt, &r, &task, &tok);
    req(&r, &tok, 2, "redirect", b"nobody").assert_error(503, "no_live_task");
    req(&r, &tok, 2, "redirect", b"").assert_error(502, "bad_redirect");
    req(&r, &tok, 2, "redirect_to", b"main:99").assert_error(502, "bad_redirect");
    // A redirect to its own role loops until the hop limit.
    req(&r, &tok, 2, "redirect", b"main").assert_error(508, "redirect_limit");
    assert_eq!(req(&r, &tok, 2, "echo", b"k").status, 200);
    assert_eq!(task.stats().connects, 1);
}

// ---------------------------------------------------------------------------------------
// Shards and router addresses

/// PROTOCOL.md section 4: skip the hello's own index, "whatever name you reached it by". A
/// task given shard 0 of the same router twice (or by two names) must still hold one link per
/// shard: two links with one task id on a shard replace each other (1008) forever.
#[test]
fn the_same_router_listed_twice_links_once_per_shard() {
    let r = Router::new().shards(2).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let a = r.internal[0].to_string();
    let o = TaskOptions::new(
        [a.clone(), a],
        "demo/echo",
        (0..16).collect::<Vec<u32>>(),
        svc(&r, "dup"),
    );
    let task = spawn(&rt, o, probe);
    assert!(
        rt.block_on(task.wait_registered(2, WAIT)),
        "{:?}",
        task.last_error()
    );
    // Proving an absence: 3 s without a new connection.
    std::thread::sleep(Duration::from_secs(3));
    let s = task.stats();
    println!(
        "same router twice after 3 s: {s:?}, last error {:?}, router links {}",
        task.last_error(),
        metric(&r, "fedbus_task_links")
    );
    let statuses: Vec<u16> = (0..20)
        .map(|i| req(&r, &tok, i, "echo", b"x").status)
        .collect();
    println!("20 requests meanwhile: {statuses:?}");
    assert!(
        s.connects <= 3,
        "links keep reconnecting: {s:?}, last error {:?}",
        task.last_error()
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// Every shard's address configured (a reasonable reading of "internal addresses"): still one
/// link per shard.
#[test]
fn every_shard_address_configured_links_once_per_shard() {
    let r = Router::new().shards(2).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal, &svc(&r, "allshards")), probe);
    ready(&rt, &r, &task, &tok);
    std::thread::sleep(Duration::from_secs(2));
    let s = task.stats();
    println!(
        "both shard addresses: {s:?}, last error {:?}",
        task.last_error()
    );
    let statuses: Vec<u16> = (0..40)
        .map(|i| req(&r, &tok, i, "sleep", b"100").status)
        .collect();
    println!("40 requests of 100 ms meanwhile: {statuses:?}");
    assert!(
        s.connects <= 3 && s.registered_links == 2,
        "{s:?} {:?}",
        task.last_error()
    );
    // 0 or 1: the loop of shard 0 opens one for shard 1 from its hello when the configured
    // loop of shard 1 has not claimed it yet, and that one is refused as a duplicate once
    // (usually 1; 0 when shard 1's own hello came first, as under a loaded machine).
    assert!(s.duplicates <= 1, "{s:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(metric(&r, "fedbus_task_links"), 2.0);
}

// ---------------------------------------------------------------------------------------
// Router restart

/// A two-shard `fedbus run` on fixed internal ports (shard k on `port + k`), restartable.
struct FixedRouter {
    home: kit::TempDir,
    port: u16,
    child: Option<Child>,
    api: SocketAddr,
}

impl FixedRouter {
    fn new() -> FixedRouter {
        let home = kit::TempDir::new("sdk-probe-fixed");
        kit::keys_init(home.path(), &home.path().join("keys"), &["demo/echo"]);
        let port = (0..100)
            .find_map(|_| {
                let a = TcpListener::bind("127.0.0.1:0").ok()?;
                let p = a.local_addr().ok()?.port();
                (p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok()).then_some(p)
            })
            .expect("two free ports");
        let cfg = format!(
            "region = \"local\"\ncluster = \"dev\"\nkeyring = {:?}\n[listen]\napi = \"127.0.0.1:0\"\n\
             internal = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:0\"\n[tuning]\nshard_cores = [0, 1]\n\
             pin = false\n[limits]\nping_interval_ms = 200\nrequest_timeout_ms = 5000\n\
             [[apps]]\nname = \"demo/echo\"\npartitions = 16\n",
            home.path().join("keys")
        );
        std::fs::write(home.path().join("router.toml"), cfg).expect("config");
        let mut r = FixedRouter {
            home,
            port,
            child: None,
            api: "0.0.0.0:0".parse().expect("addr"),
        };
        r.start();
        r
    }

    fn keys(&self) -> PathBuf {
        self.home.path().join("keys")
    }

    /// A client token, and a probe task (task id `id`) dialing shard 0.
    fn task(&self, rt: &tokio::runtime::Runtime, id: &str) -> (String, Task) {
        let svc = svc_token(self.home.path(), &self.keys(), id, &[]);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().expect("addr");
        (
            self.client_token(),
            spawn(rt, opts_for(&[addr], &svc), probe),
        )
    }

    /// The next start runs one shard (on `port`) instead of two.
    fn one_shard(&self) {
        let p = self.home.path().join("router.toml");
        let cfg = std::fs::read_to_string(&p).expect("config");
        let one = cfg.replace("shard_cores = [0, 1]", "shard_cores = [0]");
        assert_ne!(one, cfg);
        std::fs::write(p, one).expect("config");
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.path().join("router.log"))
            .expect("log");
        let mut child = Command::new(kit::bin())
            .args([
                "run",
                "--config",
                self.home
                    .path()
                    .join("router.toml")
                    .to_str()
                    .expect("utf-8"),
            ])
            .env("FEDBUS_HOME", self.home.path())
            .env("FEDBUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("fedbus run");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(ready) = kit::parse_ready_line(&l) {
                    let _ = tx.send(ready);
                }
            }
        });
        let ready = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "no ready line: {}",
                std::fs::read_to_string(self.home.path().join("router.log")).unwrap_or_default()
            )
        });
        assert_eq!(ready.internal[0].port(), self.port);
        self.api = ready.api;
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client_token(&self) -> String {
        let k = self.keys();
        kit::fedbus(
            self.home.path(),
            &[
                "token",
                "client",
                "--app",
                "demo/echo",
                "--sub",
                "alice",
                "--keyring",
                k.to_str().expect("utf-8"),
            ],
        )
        .trim()
        .to_string()
    }
}

impl Drop for FixedRouter {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "{}",
                std::fs::read_to_string(self.home.path().join("router.log")).unwrap_or_default()
            );
        }
    }
}

#[test]
fn router_killed_and_restarted_the_task_relinks_every_shard_and_serves() {
    let mut r = FixedRouter::new();
    let rt = rt();
    let (tok, task) = r.task(&rt, "restart");
    assert!(
        rt.block_on(task.wait_registered(2, WAIT)),
        "{:?}",
        task.last_error()
    );
    for round in 0..2 {
        r.kill9();
        wait("links down after the kill", Duration::from_secs(12), || {
            task.registered_links() == 0
        });
        let failures = task.stats().connect_failures;
        if round == 1 {
            // Down for a while: the task retries with a growing backoff, not in a tight loop.
            std::thread::sleep(Duration::from_millis(2500));
            let f = task.stats().connect_failures - failures;
            println!("router down 2.5 s: {f} failed connects");
            assert!(
                (2..=16).contains(&f),
                "{f} connect failures in 2.5 s (2 links)"
            );
        }
        let t0 = Instant::now();
        r.start();
        assert!(
            rt.block_on(task.wait_registered(2, WAIT)),
            "round {round}: relinked: {:?} {:?}",
            task.stats(),
            task.last_error()
        );
        let took = t0.elapsed();
        println!(
            "round {round}: relinked 2 shards {took:?} after the restart; {:?}",
            task.stats()
        );
        // Backoff is capped at 5 s times at most 1.5.
        assert!(took < Duration::from_secs(9), "{took:?}");
        wait("served after the restart", WAIT, || {
            (0..6).all(|i| {
                Conn::open(r.api)
                    .request(&Req::post(&p(i, "echo")).token(&tok).body(b"x"))
                    .status
                    == 200
            })
        });
    }
}

/// SDK.md: a router restarted with fewer shards (two, then one) has the link loop of the
/// shard its hello no longer lists retired (`Stats::loops` 2, then 1); the task serves through
/// the shard left. Before, the loop of shard 1 dialed the dead port forever.
#[test]
fn a_router_restarted_with_fewer_shards_retires_the_loop_of_the_shard_gone() {
    let mut r = FixedRouter::new();
    let rt = rt();
    let (tok, task) = r.task(&rt, "fewer");
    assert!(rt.block_on(task.wait_registered(2, WAIT)));
    assert_eq!(task.stats().loops, 2);
    r.kill9();
    r.one_shard();
    r.start();
    wait("the loop of shard 1 retired", WAIT, || {
        task.stats().loops == 1
    });
    assert!(rt.block_on(task.wait_registered(1, WAIT)));
    wait("served after the restart", WAIT, || {
        Conn::open(r.api)
            .request(&Req::post(&p(1, "echo")).token(&tok).body(b"x"))
            .status
            == 200
    });
    let failures = task.stats().connect_failures;
    std::thread::sleep(Duration::from_secs(2));
    let s = task.stats();
    assert_eq!((s.loops, s.registered_links), (1, 1), "{s:?}");
    assert_eq!(
        s.connect_failures, failures,
        "a retired shard dialed on: {s:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Shutdown

#[test]
fn shutdown_closes_every_link_cleanly() {
    let r = Router::new().shards(2).start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let task = spawn(&rt, opts_for(&r.internal[..1], &svc(&r, "shut")), probe);
    ready(&rt, &r, &task, &tok);
    let closed_before = r.log().matches("task link closed:").count();
    let api = r.api;
    let tok2 = tok.clone();
    let inflight = std::thread::spawn(move || {
        Conn::open(api).request(&Req::post(&p(3, "sleep")).token(&tok2).body(b"800"))
    });
    r.wait_pending(1.0);
    let t0 = Instant::now();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task.shutdown()).await })
        .expect("shutdown returns");
    let took = t0.elapsed();
    let resp = inflight.join().expect("client");
    println!(
        "shutdown took {took:?}; the in-flight request got {} {:?}",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    wait("router sees no link", WAIT, || {
        metric(&r, "fedbus_task_links") == 0.0
    });
    // The router logs an error end after it counts the link out: give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    // A close frame (1000) ends the router's read loop without an error line.
    let log = r.log();
    let errs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("task link closed:"))
        .collect();
    assert_eq!(
        errs.len(),
        closed_before,
        "router saw links end without a close frame: {errs:#?}"
    );
    assert_eq!(metric(&r, "fedbus_close_timeouts_total"), 0.0);
    assert!(resp.status == 200 || resp.status == 502, "{resp:?}");
}

// ---------------------------------------------------------------------------------------
// Service tokens

#[test]
fn fixed_token_that_expires_ends_the_task_with_refused() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let svc = svc_token(r.home(), &r.keys, "exp", &["--ttl", "3s"]);
    let mut o = opts_for(&r.internal, &svc);
    o.refused_exit_after = Duration::from_secs(2);
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let t0 = Instant::now();
    let why = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(14), task.failed()).await })
        .unwrap_or_else(|_| {
            panic!(
                "task did not give up: {:?} {:?}",
                task.stats(),
                task.last_error()
            )
        });
    println!(
        "expired fixed token: gave up after {:?}: {why}",
        t0.elapsed()
    );
    assert!(why.contains("expired_token"), "{why}");
    assert_eq!(task.registered_links(), 0);
    wait("router sees no link", WAIT, || {
        metric(&r, "fedbus_task_links") == 0.0
    });
}

/// Writes `token` to `path` atomically (temporary file, then rename).
fn write_token(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write token");
    std::fs::rename(&tmp, path).expect("rename token");
}

/// Sends `POST echo` every `every` for `span`; the failures.
fn steady(
    r: &Router,
    tok: &str,
    span: Duration,
    every: Duration,
) -> (u32, Vec<(Duration, u16, String)>) {
    let (t0, mut n, mut failed) = (Instant::now(), 0u32, Vec::new());
    while t0.elapsed() < span {
        let resp = req(r, tok, u64::from(n), "echo", b"x");
        if resp.status != 200 {
            failed.push((
                t0.elapsed(),
                resp.status,
                String::from_utf8_lossy(&resp.body).into_owned(),
            ));
        }
        n += 1;
        std::thread::sleep(every);
    }
    (n, failed)
}

#[test]
fn token_file_rewritten_before_expiry_is_renewed_on_the_open_link() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let file = r.home().join("task-token");
    write_token(&file, &svc_token(r.home(), &r.keys, "tf", &["--ttl", "4s"]));
    let mut o = opts_for(&r.internal, "").token_file(&file);
    o.token_poll = Duration::from_millis(200);
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let (home, keys, f2) = (r.home().to_path_buf(), r.keys.clone(), file.clone());
    let stop = Arc::new(AtomicU64::new(0));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        while stop2.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(1500));
            write_token(&f2, &svc_token(&home, &keys, "tf", &["--ttl", "4s"]));
        }
    });
    let (n, failed) = steady(&r, &tok, Duration::from_secs(9), Duration::from_millis(30));
    stop.store(1, Ordering::Relaxed);
    writer.join().expect("writer");
    let accepted = metric(&r, "fedbus_task_renewals_total{result=\"accepted\"}");
    let refused = metric(&r, "fedbus_task_renewals_total{result=\"refused\"}");
    println!(
        "token file: {n} requests, failed {failed:?}; renewals {accepted}/{refused}; {:?}",
        task.stats()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(accepted >= 4.0, "{accepted}");
    assert_eq!(
        task.stats().connects,
        1,
        "{:?} {:?}",
        task.stats(),
        task.last_error()
    );
}

/// SDK.md: "A new token goes to every open link in a renew message: no link closes, no request
/// fails." PROTOCOL.md: a second renew within a second is refused `too_often`, a third closes
/// the link with 1008. A token file that changes more often than once a second (token_poll
/// 100 ms) must not cost the link.
#[test]
fn token_file_changing_faster_than_once_a_second_keeps_the_link() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let tokens: Vec<String> = (0..16)
        .map(|i| svc_token(r.home(), &r.keys, &format!("fast-{i}"), &[]))
        .collect();
    let file = r.home().join("task-token");
    write_token(&file, &tokens[0]);
    let mut o = opts_for(&r.internal, "").token_file(&file);
    o.token_poll = Duration::from_millis(100);
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let f2 = file.clone();
    let writer = std::thread::spawn(move || {
        for t in &tokens[1..] {
            std::thread::sleep(Duration::from_millis(300));
            write_token(&f2, t);
        }
    });
    let (n, failed) = steady(&r, &tok, Duration::from_secs(5), Duration::from_millis(30));
    writer.join().expect("writer");
    let accepted = metric(&r, "fedbus_task_renewals_total{result=\"accepted\"}");
    let refused = metric(&r, "fedbus_task_renewals_total{result=\"refused\"}");
    let abusive = metric(&r, "fedbus_abusive_closed_total");
    println!(
        "fast token file: {n} requests, failed {failed:?}; renewals accepted {accepted} refused {refused}; abusive closes {abusive}; {:?}; last error {:?}",
        task.stats(),
        task.last_error()
    );
    assert_eq!(
        task.stats().connects,
        1,
        "the link was closed: {:?}",
        task.last_error()
    );
    assert_eq!(abusive, 0.0);
}

/// `Task::spawn` reads the first token from a command synchronously: a command that hangs
/// holds it for `token_timeout` at most, then spawn fails with the reason.
#[test]
fn token_command_that_hangs_does_not_hang_spawn() {
    let rt = Arc::new(rt());
    let (tx, rx) = mpsc::channel();
    let rt2 = rt.clone();
    std::thread::spawn(move || {
        let _g = rt2.enter();
        let mut o = TaskOptions::new(["127.0.0.1:9"], "demo/echo", vec![0u32], "")
            .token_command("sleep 8; echo fbs1.x.y");
        o.token_timeout = Duration::from_secs(1);
        let t0 = Instant::now();
        let res = Task::spawn(o, probe).map(|_| ());
        let _ = tx.send((res, t0.elapsed()));
    });
    match rx.recv_timeout(Duration::from_secs(4)) {
        Ok((res, took)) => {
            println!("spawn returned {res:?} after {took:?}");
            match res {
                Err(Error::Refused(m)) => assert!(m.contains("token_timeout"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        Err(_) => {
            // Let the blocked spawn finish before the runtime is dropped.
            let (_, took) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("spawn ends with the command");
            panic!(
                "Task::spawn blocked for {took:?} on a token command that hangs (no time limit)"
            );
        }
    }
}

/// A token command that prints its token and exits, leaving a process of its own session
/// (`setsid`) holding its stdout: the token is taken when the command exits, not when the pipe
/// closes. Before, spawn waited for the end of the pipe and failed at `token_timeout`.
#[test]
fn token_command_leaving_a_process_holding_its_stdout_is_read_when_it_exits() {
    let rt = rt();
    let _g = rt.enter();
    let mut o = TaskOptions::new(["127.0.0.1:9"], "demo/echo", vec![0u32], "")
        .token_command("setsid sleep 6 & echo fbs1.x.y");
    o.token_timeout = Duration::from_secs(3);
    let t0 = Instant::now();
    let res = Task::spawn(o, probe);
    let took = t0.elapsed();
    assert!(res.is_ok(), "{:?}", res.err());
    assert!(took < Duration::from_secs(2), "spawn took {took:?}");
}

#[test]
fn token_source_that_fails_at_start_is_a_clear_error() {
    let rt = rt();
    let _g = rt.enter();
    let o = TaskOptions::new(["127.0.0.1:9"], "demo/echo", vec![0u32], "")
        .token_command("echo no >&2; exit 3");
    match Task::spawn(o, probe) {
        Err(Error::Refused(m)) => assert!(m.contains("exit"), "{m}"),
        other => panic!("{other:?}"),
    }
    let o = TaskOptions::new(["127.0.0.1:9"], "demo/echo", vec![0u32], "")
        .token_file("/nonexistent/fedbus-token");
    match Task::spawn(o, probe) {
        Err(Error::Refused(m)) => assert!(m.contains("/nonexistent/fedbus-token"), "{m}"),
        other => panic!("{other:?}"),
    }
    let o = TaskOptions::new(["127.0.0.1:9"], "demo/echo", vec![0u32], "").token_command("true");
    match Task::spawn(o, probe) {
        Err(Error::Refused(m)) => assert!(m.contains("empty"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// A token command that hangs once, when a renewal is due, then works again: the task must
/// get a fresh token later ("at most once per token_poll"), not lose its links for good.
#[test]
fn token_command_that_hangs_once_does_not_end_the_task() {
    let r = Router::new().start();
    let rt = rt();
    let tok = r.token("demo/echo", "alice");
    let counter = r.home().join("calls");
    let script = format!(
        "n=$(cat {c:?} 2>/dev/null || echo 0); echo $((n+1)) > {c:?}; \
         if [ \"$n\" = 1 ]; then sleep 60; fi; \
         FEDBUS_HOME={home:?} {bin:?} token service --task-id hang1 --app demo/echo --keyring {keys:?} --ttl 4s",
        c = counter,
        home = r.home(),
        bin = kit::bin(),
        keys = r.keys,
    );
    let mut o = opts_for(&r.internal, "").token_command(script);
    o.token_poll = Duration::from_millis(200);
    // The 4 s tokens fall due 2 s before they expire: a hung run must end well before that.
    o.token_timeout = Duration::from_secs(1);
    o.refused_exit_after = Duration::from_secs(3);
    let task = spawn(&rt, o, probe);
    ready(&rt, &r, &task, &tok);
    let (n, failed) = steady(&r, &tok, Duration::from_secs(11), Duration::from_millis(50));
    let calls = std::fs::read_to_string(&counter).unwrap_or_default();
    println!(
        "hang once: {n} requests, {} failed (first {:?}); command calls {}; failure {:?}; {:?}; last error {:?}",
        failed.len(),
        failed.first(),
        calls.trim(),
        task.failure(),
        task.stats(),
        task.last_error()
    );
    assert_eq!(task.failure(), None, "the task gave up");
    assert!(failed.is_empty(), "{} failed", failed.len());
}

// ---------------------------------------------------------------------------------------
// The SDK's own input validation

#[test]
fn bad_options_are_a_clear_error_never_a_panic() {
    let rt = rt();
    let _g = rt.enter();
    let ok = TaskOptions::new(["127.0.0.1:9"], "demo/echo", vec![0u32], "tok");
    let cases: Vec<(&str, TaskOptions)> = vec![
        (
            "no router",
            TaskOptions {
                routers: vec![],
                ..ok.clone()
            },
        ),
        (
            "blank router",
            TaskOptions {
                routers: vec![" ".into()],
                ..ok.clone()
            },
        ),
        (
            "app without owner",
            TaskOptions {
                app: "echo".into(),
                ..ok.clone()
            },
        ),
        (
            "app with 3 parts",
            TaskOptions {
                app: "a/b/c".into(),
                ..ok.clone()
            },
        ),
        (
            "app empty owner",
            TaskOptions {
                app: "/echo".into(),
                ..ok.clone()
            },
        ),
        ("empty role", ok.clone().role("")),
        ("long role", ok.clone().role("r".repeat(65))),
        (
            "no partition",
            TaskOptions {
                partitions: vec![],
                ..ok.clone()
            },
        ),
        (
            "no token",
            TaskOptions {
                token: "  ".into(),
                ..ok.clone()
            },
        ),
        (
            "zero poll",
            TaskOptions {
                token_poll: Duration::ZERO,
                ..ok.clone()
            },
        ),
        (
            "small max_message",
            TaskOptions {
                max_message: 1000,
                ..ok.clone()
            },
        ),
    ];
    for (what, o) in cases {
        match Task::spawn(o, probe) {
            Err(Error::Options(m)) => assert!(!m.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    for bad in ["", "x", "3-1", "0-", "-2", "0-99999999", "1,,a"] {
        assert!(
            matches!(bad.parse::<Partitions>(), Err(Error::Partitions(_))),
            "{bad:?}"
        );
    }
    assert_eq!("3, 1-2".parse::<Partitions>().expect("ok").0, [1, 2, 3]);
}

/// Router addresses that cannot work: no panic, a reason in `last_error`, and retries with a
/// growing backoff (not a tight loop).
#[test]
fn bad_router_addresses_fail_with_a_reason_and_back_off() {
    let rt = rt();
    for addr in [
        "127.0.0.1",
        "http://127.0.0.1:1",
        "no such host:1",
        "127.0.0.1:1",
        "[::1]:1",
    ] {
        let o = TaskOptions::new([addr], "demo/echo", vec![0u32], "fbs1.x.y");
        let task = {
            let _g = rt.enter();
            match Task::spawn(o, probe) {
                Ok(t) => t,
                Err(e) => {
                    println!("{addr:?}: spawn refused: {e}");
                    continue;
                }
            }
        };
        wait("a reason", WAIT, || task.last_error().is_some());
        std::thread::sleep(Duration::from_secs(2));
        let s = task.stats();
        println!("{addr:?}: {s:?} last error {:?}", task.last_error());
        assert!(s.connect_failures <= 8, "{addr:?}: tight retry loop: {s:?}");
        assert_eq!(s.connects, 0);
        drop(task);
    }
}

/// A registration the router refuses (1008: partition out of range, role auth without an auth
/// token): a reason in `last_error`, retried with backoff, never registered.
#[test]
fn registration_refused_by_the_router_is_reported_and_backed_off() {
    let r = Router::new().start();
    let rt = rt();
    for (what, o) in [
        (
            "partition 16 of 16",
            TaskOptions {
                partitions: vec![16],
                ..opts_for(&r.internal, &svc(&r, "oor"))
            },
        ),
        (
            "role auth, plain token",
            opts_for(&r.internal, &svc(&r, "noauth")).role("auth"),
        ),
    ] {
        let task = spawn(&rt, o, probe);
        wait("a reason", WAIT, || task.last_error().is_some());
        std::thread::sleep(Duration::from_secs(2));
        let s = task.stats();
        let e = task.last_error().unwrap_or_default();
        println!("{what}: {s:?} last error {e:?}");
        assert!(e.contains("1008"), "{what}: {e}");
        assert_eq!(s.registrations, 0, "{what}");
        assert!(s.connects <= 8, "{what}: tight loop {s:?}");
        drop(task);
    }
}

/// A router (played here) that takes each link, says hello, accepts the registration and
/// closes the link at once: the task dials again with a growing backoff, as after a failure,
/// since a link that stayed registered less than a second is no sign the router is well.
/// Before, every registration reset the backoff, and the task redialed about 20 times a
/// second per shard (two processes with the same task id replace each other that way).
#[test]
fn a_router_that_closes_each_link_after_registered_is_dialed_with_backoff() {
    use tokio_tungstenite::tungstenite::{accept, Message};
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let Ok(mut ws) = accept(s) else { continue };
            let hello = format!(
                r#"{{"type":"hello","router":"ru/x/r0","cluster":"ru/x","shard":0,"shards":1,"internal":["{addr}"]}}"#
            );
            if ws.send(Message::text(hello)).is_err() || ws.read().is_err() {
                continue;
            }
            let _ = ws.send(Message::text(r#"{"type":"registered","shard":0}"#));
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    });
    let rt = rt();
    let task = spawn(
        &rt,
        TaskOptions::new([addr.to_string()], "demo/echo", vec![0u32], "fbs1.x.y"),
        probe,
    );
    wait("a first registration", WAIT, || {
        task.stats().registrations >= 1
    });
    let first = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let s = task.stats();
    println!("{:?}: {s:?}", first.elapsed());
    // Doubling from 50 ms (jittered 0.5x-1.5x): at most about 8 in 3 s; before, about 60.
    assert!(s.registrations <= 10, "tight redial loop: {s:?}");
    assert!(s.registrations >= 2, "dialed again: {s:?}");
}

/// SDK.md `serve`: SIGTERM makes a task that runs `serve` (here `examples/echo`, which
/// `cargo test` builds) tell its routers it is stopping, finish what it holds and exit 0, as
/// a rolling restart needs; the router logs the stop. Before, `serve` had no signal handler
/// and SIGTERM killed the process (requests in flight got `502 task_lost`).
#[test]
fn serve_drains_on_sigterm_and_exits_0() {
    let exe = std::env::current_exe()
        .expect("test binary")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/echo");
    assert!(
        exe.exists(),
        "{} missing: `cargo test` builds the examples",
        exe.display()
    );
    let r = Router::new().shards(1).start();
    let log = r.home().join("sdk-echo.log");
    let mut child = Command::new(&exe)
        .args(["--router", &r.internal[0].to_string(), "--app", "demo/echo"])
        .args(["--partitions", "0-15", "--token", &svc(&r, "sigterm")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn examples/echo");
    wait("the example's link", WAIT, || {
        metric(&r, "fedbus_task_links") >= 1.0
    });
    let tok = r.token("demo/echo", "alice");
    let ok = req(&r, &tok, 3, "echo", b"before");
    assert_eq!(ok.status, 200, "{ok:?}");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "examples/echo still running after SIGTERM: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(r.log().contains("task stopping"), "{}", r.log());
}

// ---------------------------------------------------------------------------------------
// A router that reads no answers

/// A fake router of one shard that registers a task, then writes `count` requests for `echo`
/// with `body` bytes each from a thread of its own, reading nothing back until told to.
struct DeafRouter {
    addr: SocketAddr,
    /// Requests written whole so far.
    sent: Arc<AtomicU64>,
    /// Set with the registered link's socket: the test reads the answers through it.
    link: Arc<std::sync::Mutex<Option<std::net::TcpStream>>>,
}

impl DeafRouter {
    fn start(count: u64, body: usize) -> DeafRouter {
        use fedbus_proto::{encode_frame, put_meta, tag, Kind};
        use std::io::Write;
        use tokio_tungstenite::tungstenite::{accept, Message};
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let sent = Arc::new(AtomicU64::new(0));
        let link = Arc::new(std::sync::Mutex::new(None));
        let (sent2, link2) = (sent.clone(), link.clone());
        std::thread::spawn(move || {
            let Some(Ok(s)) = l.incoming().next() else {
                return;
            };
            let mut ws = accept(s).expect("upgrade");
            let hello = format!(
                r#"{{"type":"hello","router":"ru/x/r0","cluster":"ru/x","shard":0,"shards":1,"internal":["{addr}"]}}"#
            );
            ws.send(Message::text(hello)).expect("hello");
            ws.read().expect("register");
            ws.send(Message::text(r#"{"type":"registered","shard":0}"#))
                .expect("registered");
            let mut raw = ws.get_ref().try_clone().expect("clone");
            *link2.lock().expect("lock") = Some(ws.get_ref().try_clone().expect("clone"));
            let mut meta = bytes::BytesMut::new();
            put_meta(&mut meta, tag::APP, b"demo/echo");
            put_meta(&mut meta, tag::ROLE, b"main");
            put_meta(&mut meta, tag::FUNCTION, b"echo");
            let payload = vec![b'q'; body];
            for id in 1..=count {
                let frame = encode_frame(Kind::Request, 0, 0, 0, id, &meta, &payload);
                // An unmasked binary websocket frame (server to client), 64 KiB at most.
                let len = u16::try_from(frame.len()).expect("under 64 KiB");
                let mut m = vec![0x82, 126];
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(&frame);
                if raw.write_all(&m).is_err() {
                    return;
                }
                sent2.fetch_add(1, Ordering::Relaxed);
            }
        });
        DeafRouter { addr, sent, link }
    }

    /// A probe task linked to this router (partition 0).
    fn task(&self, rt: &tokio::runtime::Runtime) -> Task {
        let o = TaskOptions::new([self.addr.to_string()], "demo/echo", vec![0u32], "fbs1.x.y");
        spawn(rt, o, probe)
    }

    /// Waits until the requests written stop growing for a second (at most `WAIT`).
    fn stalled(&self) -> u64 {
        let t0 = Instant::now();
        let mut last = (self.sent.load(Ordering::Relaxed), Instant::now());
        while t0.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(100));
            let n = self.sent.load(Ordering::Relaxed);
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        last.0
    }
}

/// SDK.md `max_write_backlog`: a router that sends requests and reads no answers meets TCP's
/// flow control: the task stops reading the link once 1 MiB of answers waits, instead of
/// reading every request and queueing every answer (before, all 64 MB of them were read at
/// once and their answers held in memory). Once the router reads, every answer arrives.
#[test]
fn a_router_that_reads_no_answers_is_met_by_flow_control_not_task_memory() {
    use std::io::Read;
    const COUNT: u64 = 4000;
    const BODY: usize = 16 * 1024;
    let r = DeafRouter::start(COUNT, BODY);
    let rt = rt();
    let task = r.task(&rt);
    let stalled = r.stalled();
    println!("requests written before the router's writes blocked: {stalled} of {COUNT}");
    assert!(
        stalled < COUNT / 2,
        "the task read {stalled} of {COUNT} requests from a router that reads nothing: {:?}",
        task.stats()
    );
    // The router reads: the task writes, reads on, and answers every request.
    let mut link = r
        .link
        .lock()
        .expect("lock")
        .take()
        .expect("registered link");
    link.set_read_timeout(Some(WAIT)).expect("timeout");
    let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
    let want = COUNT as usize * BODY;
    while got < want {
        match link.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got >= want, "answers read: {got} bytes of at least {want}");
    assert_eq!(r.sent.load(Ordering::Relaxed), COUNT);
    assert_eq!(task.stats().busy, 0, "{:?}", task.stats());
}

/// SDK.md `shutdown_graceful`: a request counts as held until its answer is written, so the
/// shutdown waits for answers that wait on a slow router and reports those left at its
/// deadline (their clients get `502 task_lost`). Before, an answer counted out once queued
/// (and the task read every request of a router that read nothing: the first assert failed).
#[test]
fn shutdown_graceful_counts_answers_not_yet_written() {
    let r = DeafRouter::start(4000, 16 * 1024);
    let rt = rt();
    let task = r.task(&rt);
    let stalled = r.stalled();
    assert!(stalled < 4000, "{stalled}");
    let left = rt.block_on(task.shutdown_graceful(Duration::from_millis(300)));
    println!("requests written: {stalled}; held at the deadline: {left}");
    assert!(
        left > 0,
        "answers waiting on the router were reported as done"
    );
}

/// SDK.md: a router that refuses the token (here one that answers every upgrade 401, as a
/// router of another cluster does) does not stop a task whose link to another router is
/// registered: it is dialed on with backoff, long past `refused_exit_after`, and the task
/// serves. Before, the task stopped every link after `refused_exit_after` (1 s here).
#[test]
fn a_router_that_refuses_the_token_does_not_stop_a_task_that_serves_through_another() {
    use std::io::{Read, Write};
    let refusing = TcpListener::bind("127.0.0.1:0").expect("bind");
    let bad = refusing.local_addr().expect("addr");
    // When the refusing router saw its first and its latest upgrade.
    let seen: Arc<std::sync::Mutex<Option<(Instant, Instant)>>> = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for mut s in refusing.incoming().flatten() {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let now = Instant::now();
            let mut g = seen2.lock().expect("lock");
            *g = Some((g.map_or(now, |(first, _)| first), now));
            let body = r#"{"error":"bad_signature"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let r = Router::new().start();
    let rt = rt();
    let mut addrs = r.internal.clone();
    addrs.push(bad);
    let o = TaskOptions {
        refused_exit_after: Duration::from_secs(1),
        ..opts_for(&addrs, &svc(&r, "two-routers"))
    };
    let task = spawn(&rt, o, probe);
    let tok = r.token("demo/echo", "alice");
    ready(&rt, &r, &task, &tok);
    wait("refusals over 3 s", WAIT, || {
        seen.lock()
            .expect("lock")
            .is_some_and(|(first, last)| last.duration_since(first) >= Duration::from_secs(3))
    });
    assert_eq!(task.failure(), None, "{:?}", task.stats());
    assert_eq!(req(&r, &tok, 1, "echo", b"still").status, 200);
}
