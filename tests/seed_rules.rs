//! The seed's routing rules end to end, on real routers and tasks (issue "Seed rules"):
//! Redirect chains and the hop limit, a task killed under load (502, emergency partition, back
//! home), the same election on two routers started apart, key rotation under load with a
//! keep-alive connection, retired and unknown key versions, and the app's Auth Service across
//! a rotation.

use fedbus_auth::{sign_client_jwt, ClientClaims, Keyring};
use fedbus_router::route::{self, AppSpec, Registration};
use fedbus_testkit::seed;
use fedbus_testkit::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = "demo/echo";
const PARTITIONS: u64 = 16;

fn header_u32(r: &Response, name: &str) -> Option<u32> {
    r.header(name).map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number: {r:?}"))
    })
}

/// A 200 echo of `body`, served by partition `partition` (not as an emergency) after `hops`
/// redirects.
fn assert_served(r: &Response, partition: u32, hops: u8, body: &[u8]) {
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body == body,
        "payload of {} bytes came back as {} different bytes: {r:?}",
        body.len(),
        r.body.len()
    );
    assert_eq!(header_u32(r, "fedbus-partition"), Some(partition), "{r:?}");
    assert_eq!(
        r.header("fedbus-hops"),
        Some(hops.to_string().as_str()),
        "{r:?}"
    );
    assert_eq!(r.header("fedbus-emergency"), None, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// 1. Role: main first, Redirect up to 4 hops, the 5th is 508.
// ---------------------------------------------------------------------------------------------

/// One router serves every chain at once, each on its own partitions of demo/echo:
///
/// | partitions | chain                                  | answer          |
/// |------------|----------------------------------------|-----------------|
/// | 0-2        | main > end                             | 200, 1 hop      |
/// | 3-5        | main > h2a > end                       | 200, 2 hops     |
/// | 6-8        | main > h3a > h3b > end                 | 200, 3 hops     |
/// | 9-11       | main > h4a > h4b > h4c > end           | 200, 4 hops     |
/// | 12-14      | main > h5a > h5b > h5c > h5d > (end)   | 508, 5th hop    |
/// | 15         | main > ghost (no task)                 | 503             |
#[test]
fn redirect_chains_of_1_to_4_hops_then_508() {
    let r = Router::new().shards(2).start();
    let tok = r.token(APP, "alice");
    let chains: [(u8, &str, &[&str]); 5] = [
        (1, "0-2", &[]),
        (2, "3-5", &["h2a"]),
        (3, "6-8", &["h3a", "h3b"]),
        (4, "9-11", &["h4a", "h4b", "h4c"]),
        (5, "12-14", &["h5a", "h5b", "h5c", "h5d"]),
    ];
    let mut tasks = vec![r.task().role("end").partitions("0-14").start()];
    for (_, parts, roles) in chains {
        // From the end of the chain back to main, so main redirects only into live roles.
        for (i, role) in roles.iter().enumerate().rev() {
            let next = roles.get(i + 1).copied().unwrap_or("end");
            tasks.push(
                r.task()
                    .role(role)
                    .partitions(parts)
                    .redirect_to(next)
                    .start(),
            );
        }
        let first = roles.first().copied().unwrap_or("end");
        tasks.push(r.task().partitions(parts).redirect_to(first).start());
    }
    tasks.push(r.task().partitions("15").redirect_to("ghost").start());
    let redirects_before = r.metrics().get("fedbus_redirects_total");

    let mut conns = [r.conn(), r.conn(), r.conn()];
    let mut redirects = 0.0;
    for (hops, parts, _) in chains {
        let (lo, hi) = parts.split_once('-').expect("range");
        for p in lo.parse::<u32>().unwrap()..=hi.parse::<u32>().unwrap() {
            for k in 0..3u64 {
                let wsid = u64::from(p) + PARTITIONS * (7 + k * 1000);
                let body = random_bytes(4096, wsid);
                let req = Req::post(&r.path(APP, wsid)).token(&tok).body(&body);
                let resp = conns[k as usize].request(&req);
                redirects += f64::from(hops);
                if hops <= 4 {
                    assert_served(&resp, p, hops, &body);
                } else {
                    resp.assert_error(508, "redirect_limit");
                    assert_eq!(resp.header("fedbus-hops"), Some("5"), "{resp:?}");
                    assert_eq!(resp.json()["message"], "more than 4 redirects", "{resp:?}");
                }
            }
        }
    }

    // A redirect to a role no task serves: 503, for the partition asked.
    for k in 0..3u64 {
        let wsid = 15 + PARTITIONS * k;
        let resp = conns[k as usize].request(&Req::post(&r.path(APP, wsid)).token(&tok).body(b"x"));
        redirects += 1.0;
        resp.assert_error(503, "no_live_task");
        assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");
        assert_eq!(resp.header("fedbus-partition"), Some("15"), "{resp:?}");
        assert!(
            resp.json()["message"]
                .as_str()
                .unwrap_or("")
                .contains("ghost"),
            "{resp:?}"
        );
    }

    // Every Redirect was counted; the connections are still fine after 508 and 503.
    assert_eq!(
        r.metrics().get("fedbus_redirects_total") - redirects_before,
        redirects
    );
    let body = random_bytes(4096, 99);
    let resp = conns[0].request(&Req::post(&r.path(APP, 9)).token(&tok).body(&body));
    assert_served(&resp, 9, 4, &body);
    drop(tasks);
}

// ---------------------------------------------------------------------------------------------
// 2. Partition: a task killed under load.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Rec {
    sent: Instant,
    done: Instant,
    /// 0 when the connection failed (read error, timeout): a hang or a drop.
    status: u16,
    /// The error code of a router error, or the I/O error.
    code: String,
    partition: Option<u32>,
    emergency: Option<u32>,
    body_ok: bool,
}

/// Sends requests for `wsid` one at a time on one keep-alive connection until `stop`, `pause`
/// apart; records each.
fn load(
    api: SocketAddr,
    path: String,
    tok: String,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> Vec<Rec> {
    let mut c = Conn::open(api);
    c.set_read_timeout(Duration::from_secs(5));
    let mut recs = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = format!("{path} #{n}").into_bytes();
        let sent = Instant::now();
        c.send(&Req::post(&path).token(&tok).body(&body).bytes());
        let res = c.read_response();
        let done = Instant::now();
        match res {
            Ok(r) => {
                let code = if r.status == 200 {
                    String::new()
                } else {
                    r.json()["error"].as_str().unwrap_or("").to_string()
                };
                recs.push(Rec {
                    sent,
                    done,
                    status: r.status,
                    code,
                    partition: header_u32(&r, "fedbus-partition"),
                    emergency: header_u32(&r, "fedbus-emergency"),
                    body_ok: r.body == body,
                });
            }
            Err(e) => {
                recs.push(Rec {
                    sent,
                    done,
                    status: 0,
                    code: e.to_string(),
                    partition: None,
                    emergency: None,
                    body_ok: false,
                });
                break;
            }
        }
        std::thread::sleep(pause);
    }
    recs
}

/// Two echo tasks: 0-7 (answers at once) and the victim 8-15 (answers after 300 ms, so
/// requests are in flight on it). With `election_seed` 0 the emergency partition of 0-15 and
/// of 0-7 is the same (7): the victim never held it.
#[test]
fn task_killed_under_load_502_then_emergency_then_home() {
    assert_eq!(route::elect_emergency(APP, "main", 0, 0..16), Some(7));
    kill_under_load((0, 7), 3, (8, 15), [9, 10]);
}

/// The victim serves 0-7 and so holds the emergency partition (7) when it dies: the router
/// must serve partition 7 itself, and the rest of 0-7, from the one elected among 8-15.
#[test]
fn task_holding_the_emergency_partition_killed_under_load() {
    assert_eq!(route::elect_emergency(APP, "main", 0, 0..16), Some(7));
    kill_under_load((8, 15), 12, (0, 7), [7, 2]);
}

/// Router (2 shards, `election_seed` 0) with a live task on partitions `live` and a victim
/// (300 ms delay) on `victim`. 4 clients keep requests in flight on partition `victim_ps[0]`
/// (different wsids), 1 polls partition `victim_ps[1]` every 2 ms, 1 uses partition `live_p`
/// of the live task; the victim is SIGKILLed, then comes back.
fn kill_under_load(live: (u32, u32), live_p: u32, victim: (u32, u32), victim_ps: [u32; 2]) {
    let r = Router::new().shards(2).start();
    let _live = r
        .task()
        .partitions(&format!("{}-{}", live.0, live.1))
        .start();
    let victim_parts = format!("{}-{}", victim.0, victim.1);
    let mut victim_task = r.task().partitions(&victim_parts).delay_ms(300).start();
    let tok = r.token(APP, "alice");
    let elected = route::elect_emergency(APP, "main", 0, live.0..=live.1).expect("elected");
    let is_live = |p: u32| (live.0..=live.1).contains(&p);

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let (v, poll) = (u64::from(victim_ps[0]), u64::from(victim_ps[1]));
    let plan = [
        (v, 1u64),
        (v + 16, 1),
        (v + 32, 1),
        (v + 48, 1),
        (poll, 2),
        (u64::from(live_p), 1),
    ];
    for (wsid, pause_ms) in plan {
        let (api, path, tok, stop) = (r.api, r.path(APP, wsid), tok.clone(), stop.clone());
        let h =
            std::thread::spawn(move || load(api, path, tok, stop, Duration::from_millis(pause_ms)));
        clients.push((wsid, h));
    }
    std::thread::sleep(Duration::from_millis(800));
    let links = r.metrics().get("fedbus_task_links");
    let killed = Instant::now();
    victim_task.kill();
    // The router sees the victim's links (one per shard) close when its shards next run and
    // read the EOF: on a loaded machine that is not at once, so the load goes on for 1.2 s
    // from that fact, not from the kill. It must be the EOF, not a silence timeout (6 s).
    let seen = wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_task_links") <= links - 2.0).then(Instant::now)
    })
    .expect("the router did not see the victim's links close within 5 s of the kill");
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);

    let mut in_flight_502 = 0;
    let mut first_emergency: Option<Duration> = None;
    let mut emergency_served = 0;
    for (wsid, h) in clients {
        let recs = h.join().expect("client thread");
        let own = (wsid % PARTITIONS) as u32;
        assert!(recs.len() >= 3, "wsid {wsid}: only {} requests", recs.len());
        for rec in &recs {
            let at = |t: Instant| {
                if t >= killed {
                    format!("+{:?}", t - killed)
                } else {
                    format!("-{:?}", killed - t)
                }
            };
            let what = format!(
                "wsid {wsid}: request sent {} answered {} after the kill: {rec:?}",
                at(rec.sent),
                at(rec.done)
            );
            assert_ne!(rec.status, 0, "connection failed (hang or drop): {what}");
            assert!(rec.done - rec.sent < Duration::from_secs(2), "slow: {what}");
            if is_live(own) {
                // The live task's partition never notices.
                assert_eq!(rec.status, 200, "{what}");
                assert!(rec.body_ok, "{what}");
                assert_eq!((rec.partition, rec.emergency), (Some(own), None), "{what}");
                continue;
            }
            let in_flight = rec.sent < killed && rec.done >= killed;
            if rec.done < killed {
                // Before the kill: the victim itself, after its delay.
                assert_eq!(rec.status, 200, "{what}");
                assert!(rec.body_ok, "{what}");
                assert_eq!((rec.partition, rec.emergency), (Some(own), None), "{what}");
                assert!(rec.done - rec.sent >= Duration::from_millis(300), "{what}");
            } else if in_flight && rec.status == 200 && rec.emergency.is_none() {
                // Answered by the victim just before it died, read just after.
                assert_eq!(rec.partition, Some(own), "{what}");
                assert!(rec.done < seen + Duration::from_secs(1), "{what}");
            } else if rec.status == 502 {
                // In flight on the victim (or sent before the router saw the link close).
                assert_eq!(rec.code, "task_lost", "{what}");
                assert!(
                    rec.done < seen + Duration::from_secs(2),
                    "502 too late: {what}"
                );
                assert!(
                    in_flight || rec.sent < seen,
                    "502 for a request sent after the router saw the link close: {what}"
                );
                if in_flight {
                    in_flight_502 += 1;
                }
            } else {
                // After the kill: the emergency partition, standing in for our partition.
                assert!(!in_flight, "in flight at the kill, not a 502: {what}");
                assert_eq!(rec.status, 200, "{what}");
                assert!(rec.body_ok, "{what}");
                assert_eq!(rec.emergency, Some(own), "{what}");
                assert_eq!(rec.partition, Some(elected), "{what}");
                emergency_served += 1;
                let t = rec.done - killed;
                first_emergency = Some(first_emergency.map_or(t, |f: Duration| f.min(t)));
            }
        }
    }
    let first_emergency = first_emergency.expect("no request served by the emergency partition");
    eprintln!(
        "seed_rules: kill -> first request served by emergency partition {elected}: {first_emergency:?} \
         ({in_flight_502} in-flight requests answered 502, {emergency_served} emergency answers; \
         the router saw the links close {:?} after the kill)",
        seen - killed
    );
    assert!(
        in_flight_502 >= 1,
        "no request was in flight on the victim at the kill"
    );
    assert!(
        emergency_served >= 20,
        "{emergency_served} emergency answers"
    );
    assert!(
        killed + first_emergency < seen + Duration::from_secs(1),
        "emergency only {first_emergency:?} after the kill, {:?} after the router saw it",
        seen - killed
    );

    // The partitions' task comes back: served at home again, no emergency.
    let _back = r.task().partitions(&victim_parts).start();
    let home = wait_for(Duration::from_secs(5), || {
        let resp = r.request(&Req::post(&r.path(APP, v)).token(&tok).body(b"home"));
        (resp.status == 200 && resp.header("fedbus-emergency").is_none()).then_some(resp)
    })
    .expect("victim's partition not served at home within 5 s of the task's return");
    assert_served(&home, victim_ps[0], 0, b"home");
    for p in victim.0..=victim.1 {
        for k in 0..2u64 {
            let wsid = u64::from(p) + PARTITIONS * (3 + k);
            let body = random_bytes(512, wsid);
            let resp = r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(&body));
            assert_served(&resp, p, 0, &body);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The election: the same on every router, whatever the order of registrations.
// ---------------------------------------------------------------------------------------------

#[test]
fn two_routers_started_apart_elect_the_same_emergency_partition() {
    // Not the default 0, and its choice differs from seed 0's and from the lowest and highest
    // live partition, so a router ignoring the config or a naive min/max choice would fail.
    let seed_value = 2u64;
    let extra = format!("[routing]\nelection_seed = {seed_value}");
    let a = seed::start_with(Router::new().shards(2), &extra);
    let _ta = a.task().partitions("0-4").start();
    std::thread::sleep(Duration::from_millis(100));
    let b = seed::start_with(Router::new().shards(1), &extra);
    let _tb = b.task().partitions("0-4").start();
    let expected = route::elect_emergency(APP, "main", seed_value, 0..5).expect("elected");
    assert_ne!(Some(expected), route::elect_emergency(APP, "main", 0, 0..5));
    assert!(
        expected != 0 && expected != 4,
        "pick another seed: {expected}"
    );

    let mut seen = Vec::new();
    for (name, r) in [("a", &a), ("b", &b)] {
        let tok = r.token(APP, "alice");
        for wsid in [9u64, 5, 15, 16 * 9 + 12] {
            let own = (wsid % PARTITIONS) as u32;
            let resp = r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(b"e"));
            assert_eq!(resp.status, 200, "router {name}: {resp:?}");
            assert_eq!(
                header_u32(&resp, "fedbus-emergency"),
                Some(own),
                "router {name}: {resp:?}"
            );
            let p = header_u32(&resp, "fedbus-partition").expect("fedbus-partition");
            assert!(p < 5, "router {name}: served by {p}, not a live partition");
            seen.push((name, wsid, p));
        }
    }
    eprintln!("seed_rules: election_seed {seed_value}, live 0-4: {seen:?}");
    assert!(
        seen.iter().all(|&(_, _, p)| p == expected),
        "routers disagree, or differ from elect_emergency = {expected}: {seen:?}"
    );
}

/// The emergency partition does not move while it is alive: partitions that come back, even
/// one the election ranks higher, leave it where it is.
#[test]
fn partitions_coming_back_do_not_move_the_emergency_partition() {
    let first: Vec<u32> = (0..7).collect();
    let all: Vec<u32> = (0..16).filter(|&p| p != 7).collect();
    // A seed whose election over every live partition picks one of the late ones (8-15), so a
    // router that re-elected on every change would move.
    let seed_value = (0..1000u64)
        .find(|&s| route::elect_emergency(APP, "main", s, all.iter().copied()).unwrap() >= 8)
        .expect("some seed ranks a late partition first");
    let before = route::elect_emergency(APP, "main", seed_value, first.iter().copied()).unwrap();
    let fresh = route::elect_emergency(APP, "main", seed_value, all.iter().copied()).unwrap();
    assert_ne!(before, fresh);
    let r = seed::start_with(
        Router::new().shards(1),
        &format!("[routing]\nelection_seed = {seed_value}"),
    );
    let tok = r.token(APP, "alice");
    let serve = |wsid: u64| r.request(&Req::post(&r.path(APP, wsid)).token(&tok).body(b"e"));
    let _early = r.task().partitions("0-6").start();
    // Partition 7 never has a task: the emergency partition serves it.
    let resp = serve(7);
    assert_eq!(
        header_u32(&resp, "fedbus-partition"),
        Some(before),
        "{resp:?}"
    );
    let _late = r.task().partitions("8-15").start();
    // Wait until the published table has the late partitions (8 served by itself).
    let published = wait_for(Duration::from_secs(10), || {
        let resp = serve(8);
        (resp.status == 200 && resp.header("fedbus-emergency").is_none()).then_some(())
    });
    assert!(
        published.is_some(),
        "the late task never served partition 8"
    );
    for wsid in [7u64, 23, 39] {
        let resp = serve(wsid);
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(header_u32(&resp, "fedbus-emergency"), Some(7), "{resp:?}");
        assert_eq!(
            header_u32(&resp, "fedbus-partition"),
            Some(before),
            "moved to {fresh}? {resp:?}"
        );
    }
}

/// `route::build` from the same registrations in different orders (and at different
/// generations) gives the same table and the same emergency partitions.
#[test]
fn build_elects_the_same_emergency_whatever_the_order() {
    let apps = [
        AppSpec {
            name: APP.into(),
            partitions: 16,
            emergency_partition: None,
        },
        AppSpec {
            name: "demo/other".into(),
            partitions: 8,
            emergency_partition: Some(6),
        },
    ];
    let reg = |task: u64, app: &str, role: &str, parts: &[u32]| Registration {
        task,
        app: app.into(),
        role: role.into(),
        partitions: parts.to_vec(),
    };
    let regs = vec![
        reg(0xa1, APP, "main", &[0, 1, 2]),
        reg(0xb2, APP, "main", &[3, 4, 11]),
        reg(0xc3, APP, "main", &[2, 13]),
        reg(0xd4, APP, "cmd", &[5, 6, 7, 9]),
        reg(0xe5, APP, "cmd", &[9, 10]),
        reg(0xf6, "demo/other", "main", &[1, 2, 3]),
        reg(0x17, "demo/other", "auth", &[0, 6]),
    ];
    let emergencies = |t: &route::RoutingTable| {
        let mut v: Vec<(String, String, Option<u32>)> = t
            .apps
            .iter()
            .flat_map(|(a, routes)| {
                routes
                    .roles
                    .iter()
                    .map(move |(role, rr)| (a.clone(), role.clone(), rr.emergency))
            })
            .collect();
        v.sort();
        v
    };
    let first = route::build(&apps, &regs, 1, 42);
    let want = emergencies(&first);
    // Each elected partition is the pure election over that role's live set; demo/other
    // main has its configured 6 dead there, so it is elected too.
    for (app, role, e) in &want {
        let rr = &first.apps[app].roles[role];
        let elected = route::elect_emergency(app, role, 42, rr.live_partitions());
        let configured = apps
            .iter()
            .find(|s| &s.name == app)
            .and_then(|s| s.emergency_partition);
        match configured.filter(|&c| rr.is_live(c)) {
            Some(c) => assert_eq!(*e, Some(c), "{app} {role}"),
            None => assert_eq!(*e, elected, "{app} {role}"),
        }
        assert!(e.is_some(), "{app} {role}: nothing elected");
    }
    assert_eq!(first.apps["demo/other"].roles["auth"].emergency, Some(6));

    // Permutations: reversed, rotated, shuffled, each with partitions reversed too.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..24u64 {
        let mut order = regs.clone();
        match round % 3 {
            0 => order.reverse(),
            1 => order.rotate_left((round as usize) % regs.len()),
            _ => {
                for i in (1..order.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    order.swap(i, (x % (i as u64 + 1)) as usize);
                }
            }
        }
        if round % 2 == 1 {
            for r in &mut order {
                r.partitions.reverse();
            }
        }
        let t = route::build(&apps, &order, 100 + round, 42);
        assert_eq!(emergencies(&t), want, "order {round}: {order:?}");
        assert_eq!(t.apps, first.apps, "order {round}");
    }
    // Control: another seed moves at least one election (so the comparison above can fail).
    let moved = (0..8u64).any(|s| emergencies(&route::build(&apps, &regs, 1, s)) != want);
    assert!(moved, "no seed moves any election");
}

// ---------------------------------------------------------------------------------------------
// 4. Rotation: under load, with a keep-alive connection; retired and unknown versions.
// ---------------------------------------------------------------------------------------------

/// Waits until the router logged a reload on SIGHUP (`why="reload event"`) after `before`.
fn wait_sighup_reload(r: &Router, before: usize) {
    let ok = wait_for(Duration::from_secs(3), || {
        (r.log().matches("reload event").count() > before).then_some(())
    });
    assert!(ok.is_some(), "no keyring reload within 3 s of SIGHUP");
}

#[test]
fn rotation_under_load_keeps_old_tokens_and_the_connection() {
    let r = Router::new().shards(2).start();
    let _t = r.task().start();
    let t1 = r.token(APP, "alice");
    assert_eq!(seed::jwt_kid(&t1), "1");

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let (api, path, tok, stop2) = (r.api, r.path(APP, 11), t1.clone(), stop.clone());
    let answered2 = answered.clone();
    let client = std::thread::spawn(move || {
        let mut c = Conn::open(api);
        let port = c.local_port();
        let mut statuses = Vec::new();
        let mut n = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            n += 1;
            let body = n.to_le_bytes();
            c.send(&Req::post(&path).token(&tok).body(&body).bytes());
            // A read error here is the connection dropped: fail with it.
            let resp = c
                .read_response()
                .unwrap_or_else(|e| panic!("keep-alive connection lost after {n} requests: {e}"));
            assert!(resp.status != 200 || resp.body == body, "{resp:?}");
            statuses.push((Instant::now(), resp.status, resp.body));
            answered2.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
        (c, port, statuses)
    });

    // The load runs until 20 answers came before the rotation and 20 after the reload (at
    // least 300 ms and 700 ms; a starved client thread gets longer instead of failing).
    let at_least = |n: u64, min: Duration| {
        let since = Instant::now();
        let got = wait_for(Duration::from_secs(20), || {
            (answered.load(Ordering::Relaxed) >= n && since.elapsed() >= min).then_some(())
        });
        assert!(
            got.is_some(),
            "{} answers in 20 s",
            answered.load(Ordering::Relaxed)
        );
    };
    at_least(20, Duration::from_millis(300));
    let before = r.log().matches("reload event").count();
    let out = seed::rotate_app(&r, APP);
    assert!(out.contains("v2"), "keys rotate: {out}");
    seed::sighup(&r);
    wait_sighup_reload(&r, before);
    let reloaded = Instant::now();
    at_least(
        answered.load(Ordering::Relaxed) + 21,
        Duration::from_millis(700),
    );
    stop.store(true, Ordering::Relaxed);
    let (mut c, port, statuses) = client.join().expect("client thread");

    let after = statuses.iter().filter(|(t, _, _)| *t > reloaded).count();
    let bad: Vec<_> = statuses.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(
        bad.is_empty(),
        "T1 refused during rotation: {:?}",
        bad.iter()
            .map(|(_, s, b)| (s, String::from_utf8_lossy(b)))
            .collect::<Vec<_>>()
    );
    assert!(
        after >= 20,
        "only {after} requests after the reload ({} in all)",
        statuses.len()
    );

    // The same TcpStream still serves T1, then T2 (kid 2).
    assert_eq!(c.local_port(), port);
    let p = r.path(APP, 11);
    assert_served(
        &c.request(&Req::post(&p).token(&t1).body(b"t1")),
        11,
        0,
        b"t1",
    );
    let t2 = seed::fresh_token(&r, APP, "alice");
    assert_eq!(seed::jwt_kid(&t2), "2");
    assert_served(
        &c.request(&Req::post(&p).token(&t2).body(b"t2")),
        11,
        0,
        b"t2",
    );
    // And on fresh connections (no verify cache): both versions verify.
    assert_served(
        &r.request(&Req::post(&p).token(&t1).body(b"a")),
        11,
        0,
        b"a",
    );
    assert_served(
        &r.request(&Req::post(&p).token(&t2).body(b"b")),
        11,
        0,
        b"b",
    );
}

#[test]
fn retired_and_unknown_key_versions_are_401() {
    let r = seed::start_with(Router::new().shards(1), "[auth]\ngrace_secs = 1");
    let _t = r.task().start();
    let p = r.path(APP, 4);
    let t1 = r.token(APP, "alice");
    assert_served(&r.request(&Req::post(&p).token(&t1).body(b"1")), 4, 0, b"1");

    // kid 99: signed with the real v1 secret, but no such version.
    let keyring = Keyring::load(&r.keys).expect("keyring");
    let mut v99 = keyring.signing_app_secret(APP).expect("secret").clone();
    v99.version = 99;
    let now = fedbus_auth::now_unix();
    let claims = ClientClaims {
        sub: "alice".into(),
        app: APP.into(),
        iat: now,
        exp: now + 600,
        nbf: None,
    };
    let t99 = sign_client_jwt(&v99, &claims).expect("sign");
    assert_eq!(seed::jwt_kid(&t99), "99");
    r.request(&Req::post(&p).token(&t99))
        .assert_error(401, "unknown_key");

    let before = r.log().matches("reload event").count();
    seed::rotate_app(&r, APP);
    seed::sighup(&r);
    wait_sighup_reload(&r, before);
    std::thread::sleep(Duration::from_secs(2));

    r.request(&Req::post(&p).token(&t1))
        .assert_error(401, "retired_key");
    let t2 = seed::fresh_token(&r, APP, "alice");
    assert_eq!(seed::jwt_kid(&t2), "2");
    assert_served(&r.request(&Req::post(&p).token(&t2).body(b"2")), 4, 0, b"2");
    r.request(&Req::post(&p).token(&t99))
        .assert_error(401, "unknown_key");
}

/// A keep-alive connection that verified a token before a rotation must not keep trusting it
/// once its key version's grace ends (the per-connection verify cache ends with the grace).
#[test]
fn keep_alive_verify_cache_ends_with_the_grace_period() {
    let r = seed::start_with(Router::new().shards(1), &seed::grace_config());
    let _t = r.task().start();
    let p = r.path(APP, 4);
    let t1 = r.token(APP, "alice");
    let mut c = Conn::open(r.api);
    let ask = |c: &mut Conn| {
        c.send(&Req::post(&p).token(&t1).body(b"k").bytes());
        c.read_response().expect("keep-alive answer")
    };
    assert_eq!(ask(&mut c).status, 200);
    let before = r.log().matches("reload event").count();
    let (valid_until, retired_from) = seed::rotate_app_timed(&r, APP);
    seed::sighup(&r);
    wait_sighup_reload(&r, before);
    // Inside the grace period: still served, and cached on this connection.
    let inside = ask(&mut c);
    assert!(
        Instant::now() < valid_until,
        "the reload took the whole grace: nothing was asked inside it"
    );
    assert_eq!(inside.status, 200, "{inside:?}");
    std::thread::sleep(retired_from.saturating_duration_since(Instant::now()));
    let resp = ask(&mut c);
    resp.assert_error(401, "retired_key");
}

// ---------------------------------------------------------------------------------------------
// 5. The app's Auth Service (role `auth`), reached through main, across a rotation.
// ---------------------------------------------------------------------------------------------

const LOGIN: &str = "/api/local/dev/demo/echo/auth/3/sys/login";

/// Logs in as bob with no token; returns (the token, the response).
fn login(r: &Router) -> Response {
    r.request(
        &Req::post(LOGIN)
            .header("Content-Type", "application/json")
            .body(br#"{"sub":"bob"}"#),
    )
}

fn token_of(resp: &Response) -> String {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("fedbus-hops"),
        Some("1"),
        "main redirects to auth: {resp:?}"
    );
    resp.json()["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {resp:?}"))
        .to_string()
}

/// `auth.secret_publish_delay_secs`: a new app secret reaches the Auth Service only once it
/// is that old (the time every router of a cluster needs to load it), so no router sees a
/// token signed by a version it does not know yet. Logins keep signing with v1 (which still
/// verifies) after the router has loaded v2, then switch to v2 once the delay has passed.
#[test]
fn a_new_app_secret_is_pushed_to_the_auth_service_after_the_publish_delay() {
    const DELAY: u64 = 5;
    let r = Router::new()
        .shards(1)
        .tail(&format!("[auth]\nsecret_publish_delay_secs = {DELAY}"))
        .start();
    let _echo = r.task().start();
    let _auth = seed::auth_task(&r);
    let first = wait_for(Duration::from_secs(5), || {
        let resp = login(&r);
        (resp.status != 503).then_some(resp)
    })
    .expect("no login within 5 s");
    assert_eq!(seed::jwt_kid(&token_of(&first)), "1", "{first:?}");
    let before = r.log().matches("reload event").count();
    let rotated = Instant::now();
    seed::rotate_app(&r, APP);
    seed::sighup(&r);
    wait_sighup_reload(&r, before);
    // `created` is in whole seconds: v2 may be published DELAY - 1 s after the rotation.
    let early = login(&r);
    let at = rotated.elapsed();
    // The rotation's CLI run and the reload (wait_sighup_reload allows 3 s): within DELAY - 1.
    assert!(
        at < Duration::from_secs(DELAY - 1),
        "reloaded only {at:?} after the rotation"
    );
    assert_eq!(
        seed::jwt_kid(&token_of(&early)),
        "1",
        "v2 signed {at:?} after the rotation, before the delay"
    );
    let second = wait_for(Duration::from_secs(DELAY + 5), || {
        let resp = login(&r);
        (seed::jwt_kid(&token_of(&resp)) == "2").then_some(resp)
    })
    .expect("login still signs with v1 5 s after the publish delay");
    let took = rotated.elapsed();
    eprintln!("seed_rules: login signed with v2 {took:?} after the rotation");
    assert!(
        took >= Duration::from_secs(DELAY - 1),
        "v2 published {took:?} after the rotation"
    );
    assert_served(
        &r.request(
            &Req::post(&r.path(APP, 3))
                .token(&token_of(&second))
                .body(b"v2"),
        ),
        3,
        0,
        b"v2",
    );
}

#[test]
fn auth_service_issues_tokens_of_the_newest_secret() {
    let r = Router::new().shards(2).start();
    let _echo = r.task().start();
    let _auth = seed::auth_task(&r);
    let echo = r.path(APP, 3);

    // Until the routes are published and the secret pushed: 503 (no_live_task, no_secret).
    let first = wait_for(Duration::from_secs(5), || {
        let resp = login(&r);
        (resp.status != 503).then_some(resp)
    })
    .expect("no login within 5 s");
    let tok1 = token_of(&first);
    assert_eq!(seed::jwt_kid(&tok1), "1", "{first:?}");
    assert_eq!(first.json()["kid"], 1, "{first:?}");
    assert_served(
        &r.request(&Req::post(&echo).token(&tok1).body(b"bob 1")),
        3,
        0,
        b"bob 1",
    );

    let before = r.log().matches("reload event").count();
    seed::rotate_app(&r, APP);
    seed::sighup(&r);
    let sent = Instant::now();
    let second = wait_for(Duration::from_secs(2), || {
        let resp = login(&r);
        let tok = token_of(&resp);
        (seed::jwt_kid(&tok) == "2").then_some(resp)
    })
    .unwrap_or_else(|| panic!("login still signs with v1 2 s after SIGHUP"));
    eprintln!(
        "seed_rules: login signed with v2 {:?} after SIGHUP",
        sent.elapsed()
    );
    wait_sighup_reload(&r, before);
    let tok2 = token_of(&second);
    assert_eq!(second.json()["kid"], 2, "{second:?}");
    assert_served(
        &r.request(&Req::post(&echo).token(&tok2).body(b"bob 2")),
        3,
        0,
        b"bob 2",
    );
    // v1 is in its grace period: the first token still works.
    assert_served(
        &r.request(&Req::post(&echo).token(&tok1).body(b"bob 1")),
        3,
        0,
        b"bob 1",
    );
}
