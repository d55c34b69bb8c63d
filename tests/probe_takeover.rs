//! A probe of the router takeover with no sibling, written from the docs alone
//! (docs/FEDERATION.md "Takeover"; docs/PROTOCOL.md section 4, "A router that drains";
//! docs/TUNING.md `readiness.takeover_task_wait_ms`, `readiness.takeover_wait_ms`,
//! `readiness.drain_timeout_ms`; docs/ARCHITECTURE.md on `wait_for_task`): the new router's
//! hold of requests that find no task, bounded by each request's own deadline and by a window
//! counted from its first accept, released by a task's link, counted once per request, waited
//! for by a drain, and off when it should be; and `router_draining` told to a link that
//! registers on a router already draining.
//!
//! Every router is lifecycle's `Solo`, on fixed ports of 127.(100 + pid % 150).(counter).51,
//! an address no other test uses. Every wait is bounded and waits on a fact (a ready line, a metric, an answer),
//! except the one sleep that shows a request is still unanswered at a stated moment.
//!
//! `cargo test --release -p fedbus --test integration -- probe_takeover:: --nocapture` prints
//! the numbers.

use crate::lifecycle::{try_get as admin, Solo};
use fedbus_proto::ws::frame::opcode;
use fedbus_testkit::launch::Run;
use fedbus_testkit::ws::{self, Msg};
use fedbus_testkit::*;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

/// A one-shard router on fixed addresses 127.a.b.51 (lifecycle's `Solo`; b from its counter).
fn solo(extra: &str) -> Solo {
    Solo::new_in("local", "dev", 51, extra)
}

/// What this file asks of a [`Solo`] beyond what lifecycle needs.
trait Probe {
    fn service_token(&self) -> String;
    fn send(
        &self,
        tok: &str,
        wsid: u64,
        body: &[u8],
    ) -> JoinHandle<(Result<Response, String>, Duration)>;
    fn metric(&self, name: &str) -> f64;
    fn wait_metric(&self, name: &str, want: f64, within: Duration, r: &Run);
}

impl Probe for Solo {
    fn service_token(&self) -> String {
        fedbus_testkit::launch::service_token(self.home(), &self.keys, APP, "raw")
    }

    /// POSTs `body` to wsid on a new connection from a thread: the answer (or why none came)
    /// and how long it took from the send.
    fn send(
        &self,
        tok: &str,
        wsid: u64,
        body: &[u8],
    ) -> JoinHandle<(Result<Response, String>, Duration)> {
        let (api, req) = (self.api, Req::post(&self.path(wsid)).token(tok).body(body));
        std::thread::spawn(move || {
            let mut c = Conn::open(api);
            c.set_read_timeout(Duration::from_secs(15));
            let sent = Instant::now();
            c.send(&req.bytes());
            let res = c.read_response().map_err(|e| e.to_string());
            (res, sent.elapsed())
        })
    }

    fn metric(&self, name: &str) -> f64 {
        admin(self.admin, "/metrics")
            .map(|(_, b)| Metrics::parse(&b).get(name))
            .unwrap_or(-1.0)
    }

    fn wait_metric(&self, name: &str, want: f64, within: Duration, r: &Run) {
        wait_until(
            &format!("{name} == {want}"),
            within,
            || (self.metric(name) == want).then_some(()),
            || format!("now {}\n{}", self.metric(name), r.log()),
        );
    }
}

const WAITS: &str = "fedbus_takeover_task_waits_total";
const PENDING: &str = "fedbus_pending_requests";

/// The `error` of a router's JSON error body ("" when it has none).
fn error_code(r: &Response) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|j| j["error"].as_str().map(String::from))
        .unwrap_or_default()
}

// =============================================================================================

/// TUNING.md `readiness.takeover_task_wait_ms` ("waits, within its own deadline") and
/// FEDERATION.md ("for up to `takeover_task_wait_ms` ... and within each request's
/// deadline"): a request held with no task whose deadline (`limits.request_timeout_ms`,
/// 800 ms) comes well before the window's end (6 s) is answered at its deadline, not at the
/// window's end; the window stays open after it (a second request is held too).
#[test]
fn a_held_request_is_answered_at_its_own_deadline_not_at_the_window_end() {
    let mut s =
        solo("[limits]\nrequest_timeout_ms = 800\n[readiness]\ntakeover_task_wait_ms = 6000\n");
    let r = s.launch(true);
    let ready = Instant::now();
    let tok = s.token("alice");
    let held = s.send(&tok, 2, b"x");
    s.wait_metric(PENDING, 1.0, Duration::from_secs(3), &r);
    let (answer, took) = held.join().unwrap();
    let answer = answer.unwrap_or_else(|e| panic!("no answer: {e}\n{}", r.log()));
    let code = error_code(&answer);
    eprintln!(
        "held request: {} {code} after {took:?} (deadline 800 ms, window 6 s, {:?} after the ready line)",
        answer.status,
        ready.elapsed()
    );
    // Held: not answered at once (a no_live_task answer comes within a few ms).
    assert!(
        took >= Duration::from_millis(650),
        "answered after {took:?}: not held? {answer:?}"
    );
    // At its deadline, not at the window's end.
    assert!(
        took < Duration::from_millis(1500),
        "answered {took:?} after it was sent, deadline 800 ms: {answer:?}\n{}",
        r.log()
    );
    assert!(
        (answer.status == 503 && code == "no_live_task")
            || (answer.status == 504 && code == "task_timeout"),
        "the answer at its deadline: {answer:?}"
    );
    assert_eq!(s.metric(WAITS), 1.0);
    assert_eq!(s.metric(PENDING), 0.0);
    // The window (6 s from the first accept) is still open: a second request is held as well.
    assert!(
        ready.elapsed() < Duration::from_millis(4500),
        "too slow to go on: {:?}",
        ready.elapsed()
    );
    let second = s.send(&tok, 3, b"y");
    s.wait_metric(PENDING, 1.0, Duration::from_secs(2), &r);
    let (answer, took2) = second.join().unwrap();
    let answer = answer.unwrap_or_else(|e| panic!("no answer: {e}"));
    eprintln!("second held request: {} after {took2:?}", answer.status);
    assert!(
        took2 >= Duration::from_millis(650) && took2 < Duration::from_millis(1500),
        "second request answered after {took2:?}: {answer:?}"
    );
    assert_eq!(s.metric(WAITS), 2.0);
}

/// FEDERATION.md: the hold lasts "up to `readiness.takeover_task_wait_ms` (5 s) after it
/// began accepting"; TUNING.md: "for this long after it starts accepting". So the window is
/// one span from the first accept, not a fresh span per request: a request sent 1.8 s into a
/// 2.5 s window is held only for what is left of it (about 0.7 s), and is answered 503
/// `no_live_task` together with the one held since the start; both are counted.
#[test]
fn the_hold_window_runs_from_the_first_accept_not_from_each_request() {
    let mut s = solo("[readiness]\ntakeover_task_wait_ms = 2500\n");
    let r = s.launch(true);
    let ready = Instant::now();
    let tok = s.token("alice");
    let first = s.send(&tok, 4, b"a");
    s.wait_metric(PENDING, 1.0, Duration::from_secs(2), &r);
    // The only fixed sleep: the first request is still unanswered 1.8 s into the window.
    let at = ready + Duration::from_millis(1800);
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    assert!(
        !first.is_finished(),
        "the first request was answered before 1.8 s"
    );
    assert_eq!(s.metric(PENDING), 1.0);
    let late_sent = ready.elapsed();
    let late = s.send(&tok, 5, b"b");
    let (a, took_a) = first.join().unwrap();
    let first_done = ready.elapsed();
    let (b, took_b) = late.join().unwrap();
    let (a, b) = (
        a.unwrap_or_else(|e| panic!("no answer: {e}\n{}", r.log())),
        b.unwrap_or_else(|e| panic!("no answer: {e}\n{}", r.log())),
    );
    eprintln!(
        "window 2.5 s: first request {} after {took_a:?} (done {first_done:?} after the ready line); late one sent at {late_sent:?}, {} after {took_b:?}",
        a.status, b.status
    );
    a.assert_error(503, "no_live_task");
    b.assert_error(503, "no_live_task");
    assert!(
        first_done >= Duration::from_millis(2200) && first_done < Duration::from_millis(3300),
        "the first request ended {first_done:?} after the ready line, window 2.5 s"
    );
    assert!(
        took_b < Duration::from_millis(1400),
        "a request sent {late_sent:?} into a 2.5 s window was held {took_b:?}: a window of its own?"
    );
    assert!(
        took_b >= Duration::from_millis(300),
        "the late request was not held: {took_b:?}"
    );
    assert_eq!(s.metric(WAITS), 2.0);
}

/// FEDERATION.md "Takeover" step 3: the new router holds the requests "until a task of the
/// partition links" (`fedbus_takeover_task_waits_total` counts them); ARCHITECTURE.md: the
/// waiters are woken when the routing table moves (polled every 2 ms). Four requests held on
/// four partitions are all served 200 with their own bodies once a task links, long before
/// the window (8 s) ends; each is counted once, and a request after the link is not held.
#[test]
fn held_requests_are_served_once_a_task_links_and_each_is_counted_once() {
    let mut s = solo("[readiness]\ntakeover_task_wait_ms = 8000\n");
    let r = s.launch(true);
    let ready = Instant::now();
    let tok = s.token("alice");
    let held: Vec<_> = (1..=4u64)
        .map(|w| s.send(&tok, w, format!("body-{w}").as_bytes()))
        .collect();
    s.wait_metric(PENDING, 4.0, Duration::from_secs(3), &r);
    let spawned = Instant::now();
    let task = s.task("t");
    let mut since_task = Vec::new();
    for (w, h) in (1..=4u64).zip(held) {
        let (res, took) = h.join().unwrap();
        let resp = res.unwrap_or_else(|e| panic!("no answer: {e}\n{}\n{}", r.log(), task.log()));
        since_task.push(spawned.elapsed());
        assert_eq!(resp.status, 200, "wsid {w}: {resp:?}\n{}", r.log());
        assert_eq!(resp.body, format!("body-{w}").as_bytes(), "wsid {w}");
        assert!(took < Duration::from_millis(7000), "wsid {w} held {took:?}");
    }
    let last = *since_task.iter().max().unwrap();
    eprintln!(
        "4 held requests served {since_task:?} after the task was started ({:?} after the ready line; window 8 s)",
        ready.elapsed()
    );
    assert!(
        last < Duration::from_secs(3),
        "served {last:?} after the task started"
    );
    assert_eq!(s.metric(WAITS), 4.0, "each held request counted once");
    assert_eq!(s.metric(PENDING), 0.0);
    let mut c = Conn::open(s.api);
    let t = Instant::now();
    let resp = c.request(&Req::post(&s.path(9)).token(&tok).body(b"after"));
    assert_eq!(resp.status, 200, "{resp:?}");
    eprintln!("a request after the link: 200 in {:?}", t.elapsed());
    assert_eq!(
        s.metric(WAITS),
        4.0,
        "a request that found the task was counted"
    );
}

/// SIGTERM to the new router while it holds a request (FEDERATION.md "Drain": requests on its
/// connections are served, the answer that leaves a connection with nothing in flight carries
/// `Connection: close`, `/readyz` turns 503 `draining`, exit 0; ARCHITECTURE.md: a held
/// request is in `fedbus_pending_requests`, "so a drain waits for it"). The held request gets
/// an answer (503, not a reset) as soon as the drain closed the task listener, not at the end
/// of the window, and the router exits 0; a drain is no task link: nothing serves it 200.
#[test]
fn a_sigterm_to_the_new_router_during_a_hold_answers_the_held_request_and_exits_0() {
    let mut s = solo("[readiness]\ntakeover_task_wait_ms = 3000\n");
    let mut r = s.launch(true);
    let ready = Instant::now();
    let tok = s.token("alice");
    let held = s.send(&tok, 6, b"x");
    s.wait_metric(PENDING, 1.0, Duration::from_secs(2), &r);
    let termed = Instant::now();
    r.sig("TERM");
    wait_until(
        "/readyz 503 draining",
        Duration::from_secs(2),
        || {
            admin(s.admin, "/readyz")
                .filter(|(st, b)| *st == 503 && b.contains("draining"))
                .map(|_| ())
        },
        || r.log(),
    );
    let pending_in_drain = s.metric(PENDING);
    let exit = r.wait_exit(Duration::from_secs(10));
    let exited = termed.elapsed();
    let (res, took) = held.join().unwrap();
    eprintln!(
        "SIGTERM {:?} after the ready line; pending while draining {pending_in_drain}; answer {:?} after {took:?}; exit {exit:?} {exited:?} after the SIGTERM",
        termed - ready,
        res.as_ref().map(|a| (a.status, error_code(a), a.header("connection").map(String::from)))
    );
    let resp = res.unwrap_or_else(|e| panic!("the held request got no answer: {e}\n{}", r.log()));
    assert!(
        exit.is_some_and(|x| x.success()),
        "exit {exit:?}\n{}",
        r.log()
    );
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        ["no_live_task", "draining"].contains(&error_code(&resp).as_str()),
        "{resp:?}"
    );
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    // The drain closed the task listener, so no task can link here any more: the hold ends
    // with it (`routing::local::end_task_wait`), and the request is answered at once instead
    // of at the end of the 3 s window (2.998 s before that change).
    assert!(
        took < Duration::from_millis(1500),
        "answered {took:?} after it was sent\n{}",
        r.log()
    );
    // Far below the window plus the idle close (1 s), and `drain_timeout_ms` (30 s).
    assert!(exited < Duration::from_secs(3), "drained in {exited:?}");
}

/// TUNING.md `readiness.takeover_task_wait_ms` "0: off" and "a router started with
/// `listen.takeover`": with the window 0 under `--takeover`, and with a 5 s window on a plain
/// start, a request with no task is answered 503 `no_live_task` at once, with `Retry-After`
/// and `fedbus-partition` (EMERGENCY.md), and nothing is counted as held.
#[test]
fn no_hold_with_the_window_off_or_without_takeover() {
    for (takeover, extra) in [
        (true, "[readiness]\ntakeover_task_wait_ms = 0\n"),
        (false, "[readiness]\ntakeover_task_wait_ms = 5000\n"),
    ] {
        let mut s = solo(extra);
        let r = s.launch(takeover);
        let tok = s.token("alice");
        let mut c = Conn::open(s.api);
        let t = Instant::now();
        let resp = c.request(&Req::post(&s.path(7)).token(&tok).body(b"x"));
        let took = t.elapsed();
        eprintln!(
            "takeover {takeover}, {}: {} in {took:?}, retry-after {:?}",
            extra.trim().replace('\n', " "),
            resp.status,
            resp.header("retry-after")
        );
        resp.assert_error(503, "no_live_task");
        assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");
        assert_eq!(resp.header("fedbus-partition"), Some("7"), "{resp:?}");
        assert!(
            took < Duration::from_millis(400),
            "answered after {took:?}\n{}",
            r.log()
        );
        assert_eq!(s.metric(WAITS), 0.0, "counted as held\n{}", r.log());
        assert_eq!(s.metric(PENDING), 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A task link by hand.

/// Upgrades `/link` at `addr` and reads the hello.
fn link_hello(addr: SocketAddr, token: &str) -> ws::Ws {
    let dial = ws::Dial::new(Duration::from_secs(5)).nodelay();
    let st = ws::dial(addr, &dial).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut l = ws::open(st, "/link", Some(token));
    let hello = next_text(&mut l).expect("hello");
    assert_eq!(hello["type"], "hello", "{hello}");
    l
}

fn register(l: &mut ws::Ws, task: u64, parts: &[u32]) {
    let reg = serde_json::json!({
        "type": "register", "task": task, "app": APP, "role": "main", "partitions": parts,
    });
    l.send_frame(opcode::TEXT, reg.to_string().as_bytes());
}

/// The next text message as JSON, answering pings on the way; Err on a close, a binary
/// message or a read error.
fn next_text(l: &mut ws::Ws) -> Result<serde_json::Value, String> {
    loop {
        match l.read_msg() {
            Ok(Msg::Text(t)) => return serde_json::from_slice(&t).map_err(|e| e.to_string()),
            Ok(Msg::Ping(p)) => l.send_frame(opcode::PONG, &p),
            Ok(Msg::Pong(_)) => {}
            Ok(other) => return Err(format!("{other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The close code the router sends, answering pings and skipping text on the way.
fn close_code(l: &mut ws::Ws) -> Result<Option<u16>, String> {
    loop {
        match l.read_msg() {
            Ok(Msg::Close(c, _)) => return Ok(c),
            Ok(Msg::Ping(p)) => l.send_frame(opcode::PONG, &p),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// PROTOCOL.md section 4, "A router that drains": on SIGTERM the router closes its task
/// listeners, then sends `{"type":"router_draining"}` on every registered link "(and on a link
/// that registers later, right after `registered`)"; from then on a dial to the shard's
/// address does not reach it; the links keep working and are closed 1001 at the end of the
/// drain. Here a slow task (3 s) keeps the drain going; link A registered before the SIGTERM,
/// link B (upgraded and greeted before it) registers during the drain.
#[test]
fn a_link_that_registers_on_a_draining_router_is_told_router_draining() {
    let mut s = solo("[limits]\nping_interval_ms = 10000\n");
    let mut r = s.launch(false);
    let svc = s.service_token();
    let mut a = link_hello(s.internal, &svc);
    register(&mut a, 9001, &(0..15).collect::<Vec<_>>());
    let reg = next_text(&mut a).expect("registered");
    assert_eq!(reg["type"], "registered", "{reg}");
    let _slow = s.task_with("slow", &["--partitions", "15", "--delay-ms", "3000"]);
    wait_until(
        "/readyz 200 (link A and the slow task routed)",
        Duration::from_secs(10),
        || (admin(s.admin, "/readyz").map(|x| x.0) == Some(200)).then_some(()),
        || r.log(),
    );
    let mut b = link_hello(s.internal, &svc);
    let tok = s.token("alice");
    let slow = s.send(&tok, 15, b"slow");
    s.wait_metric(PENDING, 1.0, Duration::from_secs(3), &r);
    let termed = Instant::now();
    r.sig("TERM");
    let told_a = next_text(&mut a).unwrap_or_else(|e| panic!("link A: {e}\n{}", r.log()));
    let a_after = termed.elapsed();
    assert_eq!(told_a["type"], "router_draining", "{told_a}");
    // The task listener is closed: a dial to it fails.
    let dial = TcpStream::connect_timeout(&s.internal, Duration::from_millis(500));
    assert!(
        dial.is_err(),
        "a dial to the internal address of a draining router connected"
    );
    assert!(
        !slow.is_finished(),
        "the drain is over already: nothing to probe"
    );
    register(&mut b, 9002, &[0, 1]);
    let b_sent = Instant::now();
    let reg_b = next_text(&mut b).unwrap_or_else(|e| panic!("link B: {e}\n{}", r.log()));
    let told_b = next_text(&mut b);
    let b_after = b_sent.elapsed();
    eprintln!(
        "link A told {told_a} {a_after:?} after the SIGTERM; link B, registering in the drain: {reg_b} then {told_b:?} {b_after:?} after its register"
    );
    assert_eq!(reg_b["type"], "registered", "{reg_b}\n{}", r.log());
    let told_b = told_b.unwrap_or_else(|e| panic!("link B after registered: {e}\n{}", r.log()));
    assert_eq!(told_b["type"], "router_draining", "{told_b}");
    assert!(
        b_after < Duration::from_secs(1),
        "router_draining {b_after:?} after the register"
    );
    // The slow request is still answered, then both links are closed 1001 and it exits 0.
    let (res, _) = slow.join().unwrap();
    let resp = res.unwrap_or_else(|e| panic!("slow request: {e}\n{}", r.log()));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(close_code(&mut a), Ok(Some(1001)), "link A\n{}", r.log());
    assert_eq!(close_code(&mut b), Ok(Some(1001)), "link B\n{}", r.log());
    let exit = r.wait_exit(Duration::from_secs(10));
    eprintln!(
        "old router exited {exit:?} {:?} after the SIGTERM",
        termed.elapsed()
    );
    assert!(
        exit.is_some_and(|x| x.success()),
        "exit {exit:?}\n{}",
        r.log()
    );
}
