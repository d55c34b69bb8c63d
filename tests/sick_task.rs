//! Sick-task detection (outlier ejection, docs/EMERGENCY.md) on a real router and tasks: a
//! frozen task (SIGSTOP: its link stays open, no pong, no answer) and a hung handler (answers
//! pings, requests time out) leave routing, their partitions go to the emergency partition, and
//! they come back when they answer again.
//!
//! `cargo test --release --test integration -- sick_task:: --nocapture` prints the times measured.

use fedbus_router::route;
use fedbus_testkit::*;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";

fn metric(r: &Router, series: &str) -> f64 {
    r.metrics().get(series)
}

/// Waits until `series` reaches `at_least`; the time it took.
fn wait_metric(r: &Router, series: &str, at_least: f64, within: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for(within, || (metric(r, series) >= at_least).then_some(()))
        .unwrap_or_else(|| panic!("{series} did not reach {at_least} within {within:?}"));
    t0.elapsed()
}

fn post(r: &Router, tok: &str, wsid: u64) -> Response {
    r.request(&Req::post(&r.path(APP, wsid)).token(tok).body(b"hi"))
}

/// The answer came from partition `p` itself.
fn assert_home(resp: &Response, p: u32) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("fedbus-partition"),
        Some(p.to_string().as_str()),
        "{resp:?}"
    );
    assert_eq!(resp.header("fedbus-emergency"), None, "{resp:?}");
}

/// The answer came from emergency partition `e`, standing in for `p`.
fn assert_emergency(resp: &Response, e: u32, p: u32) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("fedbus-partition"),
        Some(e.to_string().as_str()),
        "{resp:?}"
    );
    assert_eq!(
        resp.header("fedbus-emergency"),
        Some(p.to_string().as_str()),
        "{resp:?}"
    );
}

/// A task frozen with SIGSTOP stops answering pings: with the default `ping_interval_ms`
/// (2000) and `task_pong_timeout_ms` (1000) its link leaves routing within 3 s plus a sweep,
/// before the link itself would close (3 silent intervals, 6 s), and the emergency partition
/// serves its partitions. SIGCONT: its pongs bring the same link back.
#[test]
fn frozen_task_is_ejected_then_readmitted_on_its_pong() {
    let r = Router::new().shards(2).start();
    let _live = r.task().partitions("8-15").start();
    let mut victim = r.task().partitions("0-7").start();
    let tok = r.token(APP, "alice");
    let e = route::elect_emergency(APP, "main", 0, 8..16).expect("elected");
    assert_home(&post(&r, &tok, 3), 3);
    let links = metric(&r, "fedbus_task_links");
    assert_eq!(links, 4.0, "2 tasks x 2 shards");

    victim.stop();
    let frozen = Instant::now();
    // Both shards eject their link of the victim.
    let ejected = wait_metric(
        &r,
        "fedbus_task_ejected_total{reason=\"pongs\"}",
        2.0,
        Duration::from_secs(5),
    );
    let first = post(&r, &tok, 3);
    let served = frozen.elapsed();
    assert_emergency(&first, e, 3);
    assert_eq!(
        metric(&r, "fedbus_task_links"),
        links,
        "ejected, not closed"
    );
    assert_eq!(metric(&r, "fedbus_task_links_ejected"), 2.0);
    println!(
        "SIGSTOP -> both links ejected {ejected:?}, first request served by emergency partition {e} {served:?}"
    );
    assert!(
        ejected < Duration::from_millis(3000 + 1000),
        "ejection took {ejected:?}: ping interval + pong timeout is 3 s"
    );
    for wsid in [0u64, 5, 7 + 16] {
        assert_emergency(&post(&r, &tok, wsid), e, (wsid % 16) as u32);
    }
    assert_home(&post(&r, &tok, 9), 9);
    assert!(r.log().contains("task link ejected from routing"));

    victim.resume();
    let back = wait_metric(
        &r,
        "fedbus_task_readmitted_total",
        2.0,
        Duration::from_secs(5),
    );
    println!("SIGCONT -> both links back in routing {back:?}");
    assert_eq!(metric(&r, "fedbus_task_links_ejected"), 0.0);
    assert_eq!(
        metric(&r, "fedbus_task_links"),
        links,
        "the same links, no reconnect"
    );
    // The control thread publishes the task again a moment after the shards took it back.
    let home = wait_for(Duration::from_secs(2), || {
        let resp = post(&r, &tok, 3);
        (resp.header("fedbus-emergency").is_none()).then_some(resp)
    })
    .expect("partition 3 served by its own task again");
    assert_home(&home, 3);
}

/// A task whose handler hangs (every answer 5 s late, the request timeout 400 ms) still answers
/// pings: `task_eject_after_timeouts` (3 here) timeouts in a row eject its link, the emergency
/// partition serves its partitions, and its late answers bring it back.
#[test]
fn hung_handler_is_ejected_after_consecutive_timeouts_then_readmitted_on_an_answer() {
    let r = Router::new()
        .shards(1)
        .request_timeout_ms(400)
        .limit("task_eject_after_timeouts", 3)
        .start();
    let _live = r.task().partitions("8-15").start();
    let started = Instant::now();
    let _hung = r.task().partitions("0-7").delay_ms(5000).start();
    let tok = r.token(APP, "alice");
    let e = route::elect_emergency(APP, "main", 0, 8..16).expect("elected");

    // 3 requests at once for its partitions: 504 each, then the link is out.
    let clients: Vec<_> = [1u64, 2, 3]
        .into_iter()
        .map(|wsid| {
            let (api, path, tok) = (r.api, r.path(APP, wsid), tok.clone());
            std::thread::spawn(move || {
                Conn::open(api).request(&Req::post(&path).token(&tok).body(b"hi"))
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client").assert_error(504, "task_timeout");
    }
    wait_metric(
        &r,
        "fedbus_task_ejected_total{reason=\"timeouts\"}",
        1.0,
        Duration::from_secs(2),
    );
    // Its answers are due 5 s after each request: until then it is out of routing.
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "too slow to test before the late answers: {:?}",
        started.elapsed()
    );
    let t0 = Instant::now();
    assert_emergency(&post(&r, &tok, 3), e, 3);
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "no wait on the hung task"
    );
    assert_eq!(metric(&r, "fedbus_task_readmitted_total"), 0.0);

    // The late answers (to requests that already got 504) show it serves again.
    wait_metric(
        &r,
        "fedbus_task_readmitted_total",
        1.0,
        Duration::from_secs(8),
    );
    let back = wait_for(Duration::from_secs(2), || {
        let resp = post(&r, &tok, 3);
        (resp.status == 504).then_some(resp)
    })
    .expect("partition 3 routed to its own (slow) task again");
    back.assert_error(504, "task_timeout");
}

/// EMERGENCY.md, "Sick tasks": an ejected link is not live, so when the task frozen is the one
/// whose partition is the emergency partition, the partitions nobody serves move to the
/// emergency partition of the tasks still live (the shard elects it at once, as for a closed
/// link, and the next snapshot agrees); "requests already pending on the link stay there (they
/// get their answer or 504)": a request sent to the frozen task before it was ejected is
/// answered by it, from its own partition, once it runs again.
#[test]
fn ejecting_the_emergency_partitions_task_moves_the_emergency_and_keeps_its_pending_request() {
    let r = Router::new().shards(1).start();
    // The first task elects among its own partitions and the second keeps that choice
    // (EMERGENCY.md rule 2): e is the victim's; once it is out, e2 is elected among 4-7.
    let mut victim = r.task().partitions("0-3").start();
    let _other = r.task().partitions("4-7").start();
    let e = route::elect_emergency(APP, "main", 0, 0..4).expect("elected");
    let e2 = route::elect_emergency(APP, "main", 0, 4..8).expect("elected");
    let tok = r.token(APP, "alice");
    assert_emergency(&post(&r, &tok, 12), e, 12);
    // A partition of the victim other than e.
    let p = (0..4).find(|p| *p != e).expect("a partition");

    victim.stop();
    let pending = {
        let (api, path, tok) = (r.api, r.path(APP, u64::from(p)), tok.clone());
        std::thread::spawn(move || {
            Conn::open(api).request(&Req::post(&path).token(&tok).body(b"hi"))
        })
    };
    // The request is on the frozen link (anywhere else it would be answered at once).
    r.wait_pending(1.0);
    wait_metric(
        &r,
        "fedbus_task_ejected_total{reason=\"pongs\"}",
        1.0,
        Duration::from_secs(5),
    );
    assert_emergency(&post(&r, &tok, 12), e2, 12);
    assert_emergency(&post(&r, &tok, u64::from(e)), e2, e);
    assert_emergency(&post(&r, &tok, u64::from(p) + 16), e2, p);
    assert_eq!(
        metric(&r, "fedbus_pending_requests"),
        1.0,
        "still on the frozen link"
    );
    let log = fedbus_testkit::launch::plain(&r.log());
    let line = log
        .lines()
        .find(|l| l.contains("task link ejected from routing"))
        .unwrap_or_else(|| panic!("no ejection line in\n{log}"));
    for field in ["task=", "app=demo/echo", "role=main", "reason=\"pongs\""] {
        assert!(line.contains(field), "{field} missing from {line}");
    }

    victim.resume();
    let answered = pending.join().expect("client");
    assert_home(&answered, p);
    assert_eq!(answered.body, b"hi");
    wait_metric(
        &r,
        "fedbus_task_readmitted_total",
        1.0,
        Duration::from_secs(5),
    );
    let back = wait_for(Duration::from_secs(2), || {
        let resp = post(&r, &tok, u64::from(e));
        (resp.header("fedbus-emergency").is_none()).then_some(resp)
    })
    .expect("partition e served by its own task again");
    assert_home(&back, e);
    // "A partition coming back never moves it": e2 stays the emergency partition.
    assert_emergency(&post(&r, &tok, 12), e2, 12);
}
