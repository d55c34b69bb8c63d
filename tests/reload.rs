//! Config reloads on a running router (docs/ROTATION.md, "What reloads"): `[[apps]]` added or
//! resized by SIGHUP, a broken config refused with the old one kept; and, across a
//! federation, a cluster key rotated with the new public key handed to the other cluster by a
//! SIGHUP, under load, with no failed request.

use fedbus_testkit::fed::{peer_upgrade, FedRouter, Federation, CLUSTERS};
use fedbus_testkit::seed;
use fedbus_testkit::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const APP: &str = "demo/echo";
const ADDED: &str = "demo/added";

/// Waits until `/metrics` series `name` is at least `want`; returns its value.
fn wait_metric(r: &Router, name: &str, want: f64) -> f64 {
    wait_for(Duration::from_secs(5), || {
        let v = r.metrics().get(name);
        (v >= want).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "{name} did not reach {want} within 5 s (now {}); log:\n{}",
            r.metrics().get(name),
            r.log()
        )
    })
}

/// A pinned router (the default `pin = true`) listing its `shard_cores` reloads its config:
/// the control thread, pinned to its one core, re-validates the file against the process's
/// CPU affinity as read at start, not its own (which allows only the control core, and refused
/// every reload of such a file: "core 1 of 1").
#[test]
fn a_pinned_router_with_listed_cores_reloads_its_config() {
    let r = seed::start_with(
        Router::new().shards(2).pin(true).apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let cfg_path = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg_path).expect("config");
    assert!(good.contains("shard_cores = [0, 1]\npin = true"), "{good}");
    std::fs::write(
        &cfg_path,
        format!("{good}[[apps]]\nname = \"demo/added\"\npartitions = 4\n"),
    )
    .expect("write config");
    seed::sighup(&r);
    wait_metric(&r, "fedbus_apps_generation", 2.0);
    assert_eq!(
        r.metrics().get("fedbus_config_reload_failed_total"),
        0.0,
        "{}",
        r.log()
    );
    r.request(&Req::post(&r.path(ADDED, 1)))
        .assert_error(401, "missing_token");
}

/// Issue "a cluster behaves as one", point 5: an app added to the config file (and another
/// resized) serves after a SIGHUP, with the same router process and the old task link; a
/// config that does not parse is refused first, counted, and the old config stays.
#[test]
fn an_app_added_by_sighup_serves_without_restart() {
    // The timed mtime poll is pushed out of the way (the control thread still looks at the
    // files after each event it handles, SIGHUP included; a write the SIGHUP reload read is
    // not loaded again, so a broken one is refused and counted once).
    let r = seed::start_with(
        Router::new().apps(&[(APP, 16)]),
        "[auth]\nreload_poll_ms = 60000",
    );
    let _echo = r.task().start();
    let pid = seed::pid(&r);
    let echo_token = r.token(APP, "alice");
    assert_eq!(
        r.request(&Req::post(&r.path(APP, 20)).token(&echo_token))
            .header("fedbus-partition"),
        Some("4")
    );
    r.request(&Req::post(&r.path(ADDED, 1)))
        .assert_error(404, "unknown_app");
    let links = r.log().matches("task link registered").count();

    // A broken file: refused, counted, the old config in force.
    let cfg_path = r.home().join("router.toml");
    let good = std::fs::read_to_string(&cfg_path).expect("config");
    std::fs::write(
        &cfg_path,
        format!("{good}\n[[apps]]\nname = \"demo/added\"\npartitions = \"four\"\n"),
    )
    .expect("write broken config");
    seed::sighup(&r);
    let failed = wait_metric(&r, "fedbus_config_reload_failed_total", 1.0);
    assert!(r.log().contains("config reload refused"), "{}", r.log());
    assert_eq!(r.metrics().get("fedbus_apps_generation"), 1.0);
    let resp = r.request(&Req::post(&r.path(APP, 3)).token(&echo_token).body(b"x"));
    assert_eq!(resp.status, 200, "{resp:?}");

    // demo/echo grows to 32 partitions, demo/added appears with 4.
    let edited = good.replace("partitions = 16", "partitions = 32")
        + "[[apps]]\nname = \"demo/added\"\npartitions = 4\n";
    assert_ne!(edited, good);
    std::fs::write(&cfg_path, edited).expect("write config");
    seed::sighup(&r);
    wait_metric(&r, "fedbus_apps_generation", 2.0);
    let _added = r.task().app(ADDED).partitions("0-3").start();
    let added_token = r.token(ADDED, "bob");
    for wsid in 0..8u64 {
        let body = wsid.to_le_bytes();
        let resp = r.request(
            &Req::post(&r.path(ADDED, wsid))
                .token(&added_token)
                .body(&body),
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body, body);
        assert_eq!(
            resp.header("fedbus-partition"),
            Some((wsid % 4).to_string().as_str())
        );
    }
    // The resized app: wsid 20 is now partition 20 (no task there: the emergency partition
    // answers), wsid 3 still its task's partition 3, on the link made before the reload.
    let resp = r.request(&Req::post(&r.path(APP, 3)).token(&echo_token).body(b"y"));
    assert_eq!(
        (resp.status, resp.header("fedbus-partition")),
        (200, Some("3")),
        "{resp:?}"
    );
    let resp = r.request(&Req::post(&r.path(APP, 20)).token(&echo_token).body(b"z"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.header("fedbus-emergency").is_some(),
        "partition 20 has no task: {resp:?}"
    );
    assert_eq!(seed::pid(&r), pid, "same router process");
    let relinked = r.log().matches("task link registered").count() - links;
    assert_eq!(
        relinked,
        r.shards(),
        "only the new task linked (demo/echo kept its link)"
    );
    assert_eq!(
        r.metrics().get("fedbus_config_reload_failed_total"),
        failed,
        "the good config was not refused"
    );
}

/// Waits until `r`'s `/metrics` series `name` is at least `want`, within `within`.
fn wait_fed_metric(r: &FedRouter, name: &str, want: f64, within: Duration) {
    let got = wait_for(within, || (r.metrics().get(name) >= want).then_some(()));
    assert!(
        got.is_some(),
        "{}: {name} = {} did not reach {want} within {within:?}; log:\n{}",
        r.name,
        r.metrics().get(name),
        r.log()
    );
}

/// Waits until `r`'s `/readyz` answers 200.
fn wait_readyz(r: &FedRouter, within: Duration) {
    let got = wait_for(within, || (r.readyz().0 == 200).then_some(()));
    assert!(
        got.is_some(),
        "{} not ready within {within:?}: {:?}",
        r.name,
        r.readyz()
    );
}

/// Sends `wsid`'s echo for spb2 through `entry` until `want` serves it (its peer link from
/// `entry` is back and it said it is ready).
fn wait_served_by(f: &Federation, entry: &FedRouter, wsid: u64, want: &str) {
    let got = wait_for(Duration::from_secs(10), || {
        let resp = entry.conn().request(&f.req("spb2", wsid, b"probe"));
        (resp.status == 200 && resp.header("fedbus-served-by") == Some(want)).then_some(())
    });
    assert!(
        got.is_some(),
        "{} never reached {want} for wsid {wsid}",
        entry.name
    );
}

/// The status of a peer link upgrade to `r` with `token` (101: accepted).
fn peer_upgrade_status(r: &FedRouter, token: &str) -> u16 {
    peer_upgrade(r.external, Some(token)).1
}

/// One answer seen by the load: target cluster, wsid, status (None: the connection failed),
/// body or error.
type Obs = (&'static str, u64, Option<u16>, String);

/// Closed-loop clients entering `entry` for both clusters; every answer's status (None: the
/// connection failed) and target go into `log`.
fn load(
    f: &Federation,
    entry: &FedRouter,
    stop: &Arc<AtomicBool>,
    log: &Arc<Mutex<Vec<Obs>>>,
) -> std::thread::JoinHandle<()> {
    let addr = entry.api;
    let reqs: Vec<(&'static str, u64, Vec<u8>)> = (0..32u64)
        .map(|i| {
            let t = CLUSTERS[(i % 2) as usize];
            (t, i * 3, f.req(t, i * 3, &random_bytes(100, i)).bytes())
        })
        .collect();
    let (stop, log) = (stop.clone(), log.clone());
    std::thread::spawn(move || {
        let mut conn: Option<Conn> = None;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let (t, wsid, req) = &reqs[i % reqs.len()];
            i += 1;
            let c = conn.get_or_insert_with(|| {
                let mut c = Conn::open(addr);
                c.set_read_timeout(Duration::from_secs(3));
                c
            });
            c.send(req);
            let (status, why) = match c.read_response() {
                Ok(r) => (
                    Some(r.status),
                    String::from_utf8_lossy(&r.body).into_owned(),
                ),
                Err(e) => {
                    conn = None;
                    (None, e.to_string())
                }
            };
            log.lock().unwrap().push((t, *wsid, status, why));
        }
    })
}

/// Issue "a cluster behaves as one", point 5 (rotation acceptance): ru/spb2 rotates its
/// cluster key (`fedbus keys rotate --cluster`), the operator copies the new public
/// `cluster.toml` to ru/spb1's copy and SIGHUPs spb1's routers, then spb2's routers are
/// restarted one by one (SIGTERM drain, start: each now signs its peer token with the new
/// key). Under steady load entering spb1 for both clusters, not one request fails; spb1
/// refuses a new-key peer token before the copy and accepts it right after the SIGHUP; each
/// restarted spb2 router gets its peer links to spb1 and to its sibling (which reloaded its
/// own keyring) back.
#[test]
fn a_cluster_key_rotation_rolled_through_a_federation_fails_no_request() {
    let mut f = Federation::builder()
        .copied_peer_keys()
        .peer_tls(false)
        .start();
    for r in 0..2 {
        wait_readyz(f.router("spb2", r), Duration::from_secs(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let hs: Vec<_> = (0..2)
        .map(|r| load(&f, f.router("spb1", r), &stop, &log))
        .collect();

    // 1. Rotate in spb2: version 2 signs from now on.
    let spb2_keys = f.keyring("spb2").to_str().expect("utf-8").to_string();
    let out = f.fedbus(&["keys", "rotate", "--cluster", "--keyring", &spb2_keys]);
    assert!(out.contains("v2"), "keys rotate: {out}");
    let v2_token = f.fedbus(&[
        "token",
        "peer",
        "--router",
        "r0",
        "--cluster",
        "ru/spb2",
        "--keyring",
        &spb2_keys,
    ]);
    // spb1 does not know version 2 yet (its copy of spb2's keys is unchanged).
    assert_eq!(peer_upgrade_status(f.router("spb1", 0), &v2_token), 401);

    // 2. spb2's own routers reload (SIGHUP): siblings verify each other's new tokens.
    for r in 0..2 {
        f.router("spb2", r).sighup();
    }
    for r in 0..2 {
        wait_fed_metric(
            f.router("spb2", r),
            "fedbus_federation_generation",
            2.0,
            Duration::from_secs(5),
        );
    }

    // 3. The operator copies spb2's public key to spb1 and SIGHUPs spb1's routers.
    f.copy_peer_key("spb2", "spb1");
    let pids: Vec<_> = (0..2).map(|r| f.router("spb1", r).pid()).collect();
    for r in 0..2 {
        f.router("spb1", r).sighup();
    }
    for r in 0..2 {
        let router = f.router("spb1", r);
        wait_fed_metric(
            router,
            "fedbus_federation_generation",
            2.0,
            Duration::from_secs(5),
        );
        assert_eq!(
            peer_upgrade_status(router, &v2_token),
            101,
            "{}",
            router.name
        );
        assert_eq!(
            router.metrics().get("fedbus_config_reload_failed_total"),
            0.0
        );
    }

    // 4. Roll spb2: each router drains, exits and starts again with a version-2 peer token.
    let shards = f.router("spb2", 0).shards as f64;
    for r in 0..2 {
        let st = f
            .router_mut("spb2", r)
            .term(Duration::from_secs(10))
            .expect("the drained router exits within 10 s");
        assert!(st.success(), "spb2/r{r} exit status: {st:?}");
        f.router_mut("spb2", r).restart();
        let router = f.router("spb2", r);
        // Links to both spb1 routers and to the sibling: all accepted its version-2 token.
        wait_fed_metric(
            router,
            "fedbus_peer_links",
            3.0 * shards,
            Duration::from_secs(15),
        );
        wait_readyz(router, Duration::from_secs(15));
        // spb1 dials it again before its sibling goes down.
        for e in 0..2 {
            wait_served_by(&f, f.router("spb1", e), r as u64, &format!("ru/spb2/r{r}"));
        }
    }
    // Load goes on after the roll, through the restarted routers: 100 more answers.
    let rolled = log.lock().unwrap().len();
    let more = wait_for(Duration::from_secs(10), || {
        (log.lock().unwrap().len() >= rolled + 100).then_some(())
    });
    assert!(more.is_some(), "load stalled after the roll");
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().expect("load thread");
    }
    let obs = std::mem::take(&mut *log.lock().unwrap());
    let to_spb2 = obs.iter().filter(|o| o.0 == "spb2").count();
    eprintln!(
        "key rotation roll: {} answers, {to_spb2} for spb2",
        obs.len()
    );
    assert!(to_spb2 > 50, "load too thin: {to_spb2}");
    let bad: Vec<_> = obs.iter().filter(|o| o.2 != Some(200)).collect();
    assert!(bad.is_empty(), "{} failed requests: {bad:#?}", bad.len());
    let same: Vec<_> = (0..2).map(|r| f.router("spb1", r).pid()).collect();
    assert_eq!(pids, same, "spb1 was reloaded, not restarted");
}

/// Point 5, the cluster list: a cluster removed from a router's `[federation]` by a reload has
/// its dialers stopped (its peer links close; requests for it are 404 `unknown_cluster`) and
/// the links its routers dialed to this one closed, and put back it is dialed again and
/// served, with the same router process.
#[test]
fn a_cluster_removed_and_added_back_by_reload_stops_and_starts_its_dialers() {
    let f = Federation::builder().peer_tls(false).start();
    let r = f.router("spb1", 0);
    let pid = r.pid();
    let shards = r.shards as f64;
    let text = std::fs::read_to_string(r.config_path()).expect("config");
    // The config without spb2's [[federation.clusters]] entry.
    let mut parts = text.split("[[federation.clusters]]");
    let mut without = parts.next().expect("head").to_string();
    for p in parts.filter(|p| !p.contains("cluster = \"spb2\"")) {
        without.push_str("[[federation.clusters]]");
        without.push_str(p);
    }
    assert_ne!(without, text);
    std::fs::write(r.config_path(), &without).expect("write");
    r.sighup();
    wait_fed_metric(
        r,
        "fedbus_federation_generation",
        2.0,
        Duration::from_secs(5),
    );
    // Only the sibling link is left, on every shard.
    let gone = wait_for(Duration::from_secs(5), || {
        (r.metrics().get("fedbus_peer_links") == shards).then_some(())
    });
    assert!(
        gone.is_some(),
        "links to spb2 still up: {}",
        r.metrics().get("fedbus_peer_links")
    );
    // The closed links are no longer counted as ready ones (only the sibling's is).
    assert_eq!(r.metrics().get("fedbus_peer_links_ready"), shards);
    // The links spb2's routers dialed to this one are closed too (1008): their peer tokens
    // name a cluster no longer in the federation. Their new upgrades are refused (401
    // unknown_cluster), so only the sibling's links stay.
    let from_spb2: f64 = (0..2).map(|i| f.router("spb2", i).shards as f64).sum();
    let from_sibling = f.router("spb1", 1).shards as f64;
    let external = || r.metrics().get("fedbus_connections{listener=\"external\"}");
    let revoked = || r.metrics().get("fedbus_links_revoked_total");
    let closed = wait_for(Duration::from_secs(10), || {
        // At least one revoked: a link of spb2's that was being dialed again when the reload
        // came is refused at its upgrade instead.
        (external() == from_sibling && revoked() >= 1.0).then_some(())
    });
    assert!(
        closed.is_some(),
        "incoming links: {} (want {from_sibling}), revoked {} (want 1 to {from_spb2}); log:\n{}",
        external(),
        revoked(),
        r.log()
    );
    assert!(revoked() <= from_spb2);
    assert!(r.log().contains("peer link closed after a reload"));
    r.conn()
        .request(&f.req("spb2", 1, b"x"))
        .assert_error(404, "unknown_cluster");
    // Back: dialed again, served again.
    std::fs::write(r.config_path(), &text).expect("write");
    r.sighup();
    wait_fed_metric(
        r,
        "fedbus_federation_generation",
        3.0,
        Duration::from_secs(5),
    );
    wait_fed_metric(
        r,
        "fedbus_peer_links",
        3.0 * shards,
        Duration::from_secs(10),
    );
    let served = wait_for(Duration::from_secs(10), || {
        let resp = r.conn().request(&f.req("spb2", 1, b"x"));
        (resp.status == 200).then_some(resp)
    });
    assert!(
        served.is_some(),
        "spb2 not served after the cluster came back"
    );
    assert_eq!(r.pid(), pid, "reloaded, not restarted");
    assert_eq!(r.metrics().get("fedbus_config_reload_failed_total"), 0.0);
}

/// The grace of a key version ends without a reload: ru/spb2 rotates its cluster key and the
/// operator copies the new public key to ru/spb1 (SIGHUP), but spb2's routers run on a
/// `federation.peer_token_file` nobody rewrites, so their peer tokens stay signed with version
/// 1 (in dev mode without the file they would mint and renew one). Once version 1's grace ends,
/// spb1 closes the links spb2 dialed to it (1008, `fedbus_links_revoked_total`) on its own,
/// as it refuses a new upgrade with such a token; its sibling's links stay.
#[test]
fn an_accepted_peer_link_is_closed_once_its_key_version_retires() {
    // Long enough for the reload to land inside the grace on a loaded machine.
    const GRACE_SECS: u64 = 8;
    let mut f = Federation::builder()
        .copied_peer_keys()
        .peer_tls(false)
        .grace_secs(GRACE_SECS)
        .start();
    use_peer_token_files(&mut f, "1h");
    let r = f.router("spb1", 0);
    let from_spb2: f64 = (0..2).map(|i| f.router("spb2", i).shards as f64).sum();
    let from_sibling = f.router("spb1", 1).shards as f64;
    let external = || r.metrics().get("fedbus_connections{listener=\"external\"}");
    let revoked = || r.metrics().get("fedbus_links_revoked_total");
    wait_fed_metric(
        r,
        "fedbus_connections{listener=\"external\"}",
        from_spb2 + from_sibling,
        Duration::from_secs(15),
    );

    let spb2_keys = f.keyring("spb2").to_str().expect("utf-8").to_string();
    // Before the rotation: its version's `created` is a whole second, up to 1 s earlier.
    let rotated = std::time::Instant::now();
    let out = f.fedbus(&["keys", "rotate", "--cluster", "--keyring", &spb2_keys]);
    assert!(out.contains("v2"), "keys rotate: {out}");
    f.copy_peer_key("spb2", "spb1");
    r.sighup();
    wait_fed_metric(
        r,
        "fedbus_federation_generation",
        2.0,
        Duration::from_secs(5),
    );
    // Not the reload's own check: version 1 is still in its grace then.
    let closed = wait_for(Duration::from_secs(GRACE_SECS + 10), || {
        (external() == from_sibling && revoked() >= from_spb2).then_some(())
    });
    assert!(
        closed.is_some(),
        "incoming links: {} (want {from_sibling}), revoked {} (want {from_spb2}) {:?} after the rotation; log:\n{}",
        external(),
        revoked(),
        rotated.elapsed(),
        r.log()
    );
    let log = r.log();
    assert!(
        log.contains("the key version of its peer token retired"),
        "{log}"
    );
    assert!(
        !log.contains("peer link closed after a reload"),
        "the reload came after the grace: {log}"
    );
    assert!(
        rotated.elapsed() >= Duration::from_secs(GRACE_SECS - 2),
        "closed inside the grace: {:?}",
        rotated.elapsed()
    );
}

/// Restarts spb2's routers on a `federation.peer_token_file` each, holding a fresh `ttl` peer
/// token; returns the files.
fn use_peer_token_files(f: &mut Federation, ttl: &str) -> Vec<std::path::PathBuf> {
    let files: Vec<_> = (0..2)
        .map(|r| {
            let cfg = f.router("spb2", r).config_path();
            cfg.with_file_name(format!("peer-r{r}.token"))
        })
        .collect();
    for (r, file) in files.iter().enumerate() {
        write_peer_token(f, r, file, ttl);
        let cfg = f.router("spb2", r).config_path().to_path_buf();
        let text = std::fs::read_to_string(&cfg).expect("config");
        let text = text.replacen(
            "[federation]\n",
            &format!(
                "[federation]\npeer_token_file = {:?}\n",
                file.to_str().expect("utf-8")
            ),
            1,
        );
        std::fs::write(&cfg, text).expect("config");
        f.router_mut("spb2", r).restart();
    }
    files
}

/// Writes a fresh `ttl` peer token for spb2's router `r` to `path` (atomically: a temporary
/// file renamed into place, as an operator's issuer would).
fn write_peer_token(f: &Federation, r: usize, path: &std::path::Path, ttl: &str) {
    write_token_file(path, &spb2_peer_token(f, "spb2", r, ttl));
}

/// A peer token for spb2's router `r`, signed with cluster `signer`'s keyring (spb2's own, or
/// another's for a token spb2 must refuse).
fn spb2_peer_token(f: &Federation, signer: &str, r: usize, ttl: &str) -> String {
    let keys = f.keyring(signer).to_str().expect("utf-8").to_string();
    let router = format!("r{r}");
    f.fedbus(&[
        "token",
        "peer",
        "--router",
        &router,
        "--cluster",
        "ru/spb2",
        "--keyring",
        &keys,
        "--ttl",
        ttl,
    ])
}

/// Replaces `path` with `token` atomically (a temporary file renamed into place).
fn write_token_file(path: &std::path::Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("token file");
    std::fs::rename(&tmp, path).expect("rename the token file");
}

/// Peer tokens renewed on open links (PROTOCOL.md section 10, "Renewing a peer token"): spb2's
/// routers run on `federation.peer_token_file` with 4 s tokens, rewritten every 1.5 s. Their
/// dialers send each new one on their open links (to spb1 and to the sibling) as a `renew`, so
/// no link reaches its token's expiry: under load entering spb1 for both clusters for 10 s (2.5
/// lifetimes of a token), no request fails, no link is closed at expiry
/// (`fedbus_links_revoked_total` stays 0) and the accepting routers count the renewals. Before,
/// the file was read at start only: the links closed after 4 s and were refused after.
#[test]
fn a_peer_token_file_rewritten_before_expiry_renews_open_peer_links() {
    let mut f = Federation::builder().peer_tls(false).start();
    let shards = f.router("spb2", 0).shards as f64;
    let files = use_peer_token_files(&mut f, "4s");
    for r in 0..2 {
        // Links to both spb1 routers and to the sibling, on the file's tokens.
        wait_fed_metric(
            f.router("spb2", r),
            "fedbus_peer_links",
            3.0 * shards,
            Duration::from_secs(15),
        );
        for e in 0..2 {
            wait_served_by(&f, f.router("spb1", e), r as u64, &format!("ru/spb2/r{r}"));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let hs: Vec<_> = (0..2)
        .map(|r| load(&f, f.router("spb1", r), &stop, &log))
        .collect();
    // Seven rewrites at fixed times (1.5 s apart from the start, however long minting a token
    // takes on a loaded machine).
    let t0 = std::time::Instant::now();
    for k in 1..=7u32 {
        let at = t0 + Duration::from_millis(1500) * k;
        std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
        for (r, file) in files.iter().enumerate() {
            write_peer_token(&f, r, file, "4s");
        }
    }
    // The last rewrite's renewals (the file is looked at every reload poll) are waited for,
    // under load, before the load stops.
    for r in 0..2 {
        wait_fed_metric(
            f.router("spb1", r),
            "fedbus_peer_renewals_total{result=\"accepted\"}",
            5.0 * 2.0 * shards,
            Duration::from_secs(4),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().expect("load thread");
    }
    let obs = std::mem::take(&mut *log.lock().unwrap());
    let to_spb2 = obs.iter().filter(|o| o.0 == "spb2").count();
    let accepted = |c: &str, r: usize| {
        f.router(c, r)
            .metrics()
            .get("fedbus_peer_renewals_total{result=\"accepted\"}")
    };
    eprintln!(
        "peer token renewals: {} answers, {to_spb2} for spb2; renewals accepted by spb1 {} / {}, by spb2 {} / {}",
        obs.len(),
        accepted("spb1", 0),
        accepted("spb1", 1),
        accepted("spb2", 0),
        accepted("spb2", 1),
    );
    assert!(to_spb2 > 50, "load too thin: {to_spb2}");
    let bad: Vec<_> = obs.iter().filter(|o| o.2 != Some(200)).collect();
    assert!(
        bad.is_empty(),
        "{} failed requests: {:#?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    for c in CLUSTERS {
        for r in 0..2 {
            let m = f.router(c, r).metrics();
            assert_eq!(m.get("fedbus_links_revoked_total"), 0.0, "{c}/r{r}");
            assert_eq!(
                m.get("fedbus_peer_renewals_total{result=\"refused\"}"),
                0.0,
                "{c}/r{r}"
            );
        }
    }
    // Each spb2 shard's link to each spb1 router renewed at least 5 times: the file was
    // rewritten 7 times (one a 1.5 s), and the answer to each renew reopens the pacer 1.1 s
    // later. A dialer that looked for a new token only every 1.1 s found the pacer still shut
    // one look in two, renewed every 2.2 s (4 renewals here) and let tokens expire.
    for r in 0..2 {
        assert!(
            accepted("spb1", r) >= 5.0 * 2.0 * shards,
            "spb1/r{r}: {}",
            accepted("spb1", r)
        );
        assert!(
            accepted("spb2", r) >= 2.0 * shards,
            "spb2/r{r} (its sibling's links)"
        );
    }
}

/// A `federation.peer_token_file` rewritten with a token that does not verify against the
/// router's own cluster keys (here one signed with another cluster's key, as a misdirected
/// issuer would write) is refused: the token in force stays, the refusal is logged and
/// counted once (`fedbus_config_reload_failed_total`), and no open peer link is sent a renew
/// its peer would refuse. Before, the router switched to it at once: every renew and every
/// new peer link of its then failed.
#[test]
fn a_peer_token_file_rewritten_with_a_token_of_other_keys_is_refused() {
    let mut f = Federation::builder().peer_tls(false).start();
    let shards = f.router("spb2", 0).shards as f64;
    let files = use_peer_token_files(&mut f, "1h");
    let r = f.router("spb2", 0);
    wait_fed_metric(
        r,
        "fedbus_peer_links",
        3.0 * shards,
        Duration::from_secs(15),
    );
    let failed = r.metrics().get("fedbus_config_reload_failed_total");
    write_token_file(&files[0], &spb2_peer_token(&f, "spb1", 0, "1h"));
    wait_fed_metric(
        r,
        "fedbus_config_reload_failed_total",
        failed + 1.0,
        Duration::from_secs(10),
    );
    assert!(r.log().contains("peer token refused"), "{}", r.log());
    // The token in force stays: nothing sent to the peers to refuse, the links up.
    for c in CLUSTERS {
        for k in 0..2 {
            let m = f.router(c, k).metrics();
            assert_eq!(
                m.get("fedbus_peer_renewals_total{result=\"refused\"}"),
                0.0,
                "{c}/r{k}"
            );
        }
    }
    let m = r.metrics();
    assert_eq!(m.get("fedbus_peer_links"), 3.0 * shards);
    assert_eq!(m.get("fedbus_config_reload_failed_total"), failed + 1.0);
}
