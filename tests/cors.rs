//! CORS per app (docs/PROTOCOL.md section 7): preflights answered by the router, the
//! `Access-Control-*` fields on answers to an allowed origin, 403 `origin_not_allowed` before
//! any task (anonymous services included) for any other origin, and the same rule at the
//! `/api/ws` upgrade, against a real router.

use fedbus_testkit::*;

const APP: &str = "demo/echo";
const OTHER: &str = "demo/other";
const PAGE: &str = "http://app.example:3000";
const EVIL: &str = "http://evil.example";

fn router() -> Router {
    Router::new()
        .shards(1)
        .cors(
            APP,
            &format!(
                "allowed_origins = [{PAGE:?}]\nallowed_headers = [\"authorization\", \"content-type\", \"x-trace\"]\nmax_age_secs = 123"
            ),
        )
        .start()
}

fn assert_cors(resp: &Response, origin: &str) {
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some(origin),
        "{resp:?}"
    );
    assert_eq!(resp.header("vary"), Some("Origin"), "{resp:?}");
    let exposed = resp
        .header("access-control-expose-headers")
        .unwrap_or_default();
    for h in [
        "fedbus-partition",
        "fedbus-hops",
        "fedbus-shard",
        "fedbus-served-by",
    ] {
        assert!(exposed.contains(h), "{h} exposed: {resp:?}");
    }
    assert_eq!(resp.header("access-control-allow-credentials"), None);
}

fn assert_no_cors(resp: &Response) {
    assert_eq!(resp.header("access-control-allow-origin"), None, "{resp:?}");
}

fn refused(r: &Router) -> f64 {
    r.metrics().get("fedbus_origin_refused_total")
}

/// The preflight is the router's (no task is linked, so a request that reached routing would
/// be 503); then the real request carries the CORS fields and reaches the task.
#[test]
fn an_allowed_origin_gets_preflights_and_readable_answers() {
    let r = router();
    let p = r.path(APP, 7);
    let pre = r.request(
        &Req::new("OPTIONS", &p)
            .header("Origin", PAGE)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization"),
    );
    assert_eq!(pre.status, 204, "{pre:?}");
    assert!(pre.body.is_empty());
    assert_eq!(pre.header("content-length"), None, "{pre:?}");
    assert_cors(&pre, PAGE);
    let methods = pre
        .header("access-control-allow-methods")
        .unwrap_or_default();
    for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        assert!(methods.contains(m), "{m}: {pre:?}");
    }
    assert_eq!(
        pre.header("access-control-allow-headers"),
        Some("authorization, content-type, x-trace")
    );
    assert_eq!(pre.header("access-control-max-age"), Some("123"));

    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let resp = r.request(&Req::post(&p).token(&tok).header("Origin", PAGE).body(b"hi"));
    assert_eq!(
        (resp.status, resp.body.as_slice()),
        (200, &b"hi"[..]),
        "{resp:?}"
    );
    assert_cors(&resp, PAGE);
    assert_eq!(resp.header("fedbus-partition"), Some("7"));
    // Errors are readable by the page too.
    let unauth = r.request(&Req::post(&p).header("Origin", PAGE).body(b"x"));
    unauth.assert_error(401, "missing_token");
    assert_cors(&unauth, PAGE);
    // A non-preflight OPTIONS (no Access-Control-Request-Method) is the task's.
    let opt = r.request(&Req::new("OPTIONS", &p).token(&tok).header("Origin", PAGE));
    assert_eq!(opt.status, 200, "{opt:?}");
    assert_eq!(opt.header("echo-method"), Some("OPTIONS"), "{opt:?}");
    assert_eq!(refused(&r), 0.0);
}

#[test]
fn other_origins_are_refused_before_any_task() {
    let r = router();
    let _t = r.task().start();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 3);
    let resp = r.request(&Req::post(&p).token(&tok).header("Origin", EVIL).body(b"x"));
    resp.assert_error(403, "origin_not_allowed");
    assert_no_cors(&resp);
    // The anonymous Auth Service follows the same rule (no token needed to be refused).
    let auth = p.replace("/api/3/sys/echo", "/auth/3/sys/echo");
    assert_ne!(auth, p);
    r.request(&Req::post(&auth).header("Origin", EVIL).body(b"x"))
        .assert_error(403, "origin_not_allowed");
    let pre = r.request(
        &Req::new("OPTIONS", &p)
            .header("Origin", EVIL)
            .header("Access-Control-Request-Method", "POST"),
    );
    pre.assert_error(403, "origin_not_allowed");
    assert_no_cors(&pre);
    // An app without [apps.cors] allows no other origin at all.
    let other_tok = r.token(OTHER, "alice");
    r.request(
        &Req::post(&r.path(OTHER, 1))
            .token(&other_tok)
            .header("Origin", PAGE)
            .body(b"x"),
    )
    .assert_error(403, "origin_not_allowed");
    // Over the body: refused from the head, before `100 Continue`.
    let mut c = r.conn();
    // The request announces a body it does not send.
    let head = String::from_utf8(
        Req::post(&p)
            .token(&tok)
            .header("Origin", EVIL)
            .header("Expect", "100-continue")
            .bytes(),
    )
    .expect("ascii")
    .replace("Content-Length: 0", "Content-Length: 1000");
    c.send(head.as_bytes());
    c.read_response()
        .expect("refusal before the body")
        .assert_error(403, "origin_not_allowed");
    // Any client can send any origin: the log line quotes 200 bytes of it at most.
    let long = format!("https://{}.example", "a".repeat(8000));
    r.request(&Req::post(&p).token(&tok).header("Origin", &long).body(b"x"))
        .assert_error(403, "origin_not_allowed");
    assert_eq!(refused(&r), 6.0);
    let log = r.log();
    assert!(
        log.contains("origin not allowed"),
        "a log line for the refusals"
    );
    assert!(
        log.contains(&long[..190]) && !log.contains(&long[..201]),
        "the long origin is clipped to 200 bytes in the log"
    );
}

/// Requests without `Origin` (curl, servers) and same-origin requests are not subject to CORS.
#[test]
fn same_origin_and_originless_requests_are_not_cors() {
    let r = router();
    let _t = r.task().app(OTHER).partitions("0-3").start();
    let tok = r.token(OTHER, "alice");
    let p = r.path(OTHER, 2);
    let plain = r.request(&Req::post(&p).token(&tok).body(b"a"));
    assert_eq!(plain.status, 200, "{plain:?}");
    assert_no_cors(&plain);
    // Req::new sends `Host: 127.0.0.1`.
    let same = r.request(
        &Req::post(&p)
            .token(&tok)
            .header("Origin", "http://127.0.0.1")
            .body(b"b"),
    );
    assert_eq!(same.status, 200, "{same:?}");
    assert_no_cors(&same);
}

/// The head of a `POST` to `path` from `origin` announcing `len` body bytes (not sent), with
/// the extra header lines `extra`.
fn head_only(path: &str, origin: &str, extra: &str, len: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {origin}\r\n{extra}Content-Length: {len}\r\n\r\n"
    )
}

/// Refusals the router makes from a request head carry the CORS fields to an allowed origin, so
/// a page reads why its upload was refused (PROTOCOL.md 8.1): a body over
/// `limits.max_body_bytes`, a malformed `Authorization`, a refused token before the body, an
/// anonymous upload over its bound. Another origin gets them without the fields (403 first
/// where the policy runs). Before, every one of these answers lacked the fields and a browser
/// saw a network error.
#[test]
fn refusals_from_the_head_are_readable_by_an_allowed_origin() {
    let r = Router::new()
        .shards(1)
        .limit("max_body_bytes", 200_000)
        .cors(APP, &format!("allowed_origins = [{PAGE:?}]"))
        .start();
    let p = r.path(APP, 1);
    let anon = p.replace("/api/1/sys/echo", "/auth/1/sys/echo");
    let cases = [
        (
            "body over max_body_bytes",
            p.as_str(),
            "",
            300_000,
            413,
            "body_too_large",
            413,
        ),
        (
            "malformed Authorization",
            &p,
            "Authorization: Basic abc\r\n",
            10,
            401,
            "bad_token",
            401,
        ),
        (
            "refused token before the body",
            &p,
            "Authorization: Bearer nonsense\r\n",
            100_000,
            401,
            "bad_token",
            403,
        ),
        (
            "anonymous upload over its bound",
            &anon,
            "",
            100_000,
            413,
            "body_too_large",
            403,
        ),
    ];
    // The last field: what another origin gets (403 where the app's policy runs before the
    // refusal, from `check_head`; the refusals of the head itself come first).
    for (what, path, extra, len, status, code, other) in cases {
        let mut c = r.conn();
        c.send_lossy(head_only(path, PAGE, extra, len).as_bytes());
        let resp = c.read_response().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        assert_eq!(resp.json()["error"], code, "{what}: {resp:?}");
        assert_cors(&resp, PAGE);
        let mut c = r.conn();
        c.send_lossy(head_only(path, EVIL, extra, len).as_bytes());
        let resp = c.read_response().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status, other, "{what} from another origin: {resp:?}");
        assert_no_cors(&resp);
    }
}

/// A 404 for an app or a cluster this router does not know has no policy of its own: it carries
/// the CORS fields when some app of the cluster allows the origin (as the `/api/ws` upgrade's
/// check), and not for an origin no app allows, which so cannot read which apps and clusters
/// exist. Before, every origin got its own origin back.
#[test]
fn unknown_apps_and_clusters_are_readable_only_by_an_origin_some_app_allows() {
    let r = router();
    let p = r.path(APP, 1);
    for (path, code) in [
        (p.replace("demo/echo", "demo/nope"), "unknown_app"),
        (
            p.replace("/local/dev/", "/local/nowhere/"),
            "unknown_cluster",
        ),
    ] {
        let get = |origin: &str| r.request(&Req::new("GET", &path).header("Origin", origin));
        let page = get(PAGE);
        assert_eq!(
            (page.status, &page.json()["error"]),
            (404, &code.into()),
            "{page:?}"
        );
        assert_cors(&page, PAGE);
        let evil = get(EVIL);
        assert_eq!(evil.status, 404, "{evil:?}");
        assert_no_cors(&evil);
    }
}

/// A flood of requests from a refused origin is counted whole, but logged at most 10 lines a
/// second per shard (log lines go to a stderr every shard shares, which blocks when its reader
/// falls behind); the next line let through says how many were held back.
#[test]
fn refused_origins_are_logged_at_most_ten_lines_a_second() {
    let r = router();
    let tok = r.token(APP, "alice");
    let p = r.path(APP, 7);
    let lines = |r: &Router| {
        launch::plain(&r.log())
            .matches("origin not allowed")
            .count()
    };
    let refuse = |r: &Router| {
        r.request(&Req::post(&p).token(&tok).header("Origin", EVIL).body(b"x"))
            .assert_error(403, "origin_not_allowed")
    };
    let start = std::time::Instant::now();
    for _ in 0..50 {
        refuse(&r);
    }
    let secs = start.elapsed().as_secs() as usize;
    assert_eq!(refused(&r), 50.0);
    let logged = lines(&r);
    assert!(
        (1..=10 * (secs + 1)).contains(&logged) && logged < 50,
        "{logged} lines for 50 refusals in {secs} s"
    );
    // Once the second is over, the next line says how many were held back: all of them, over
    // the lines that say so.
    let held_back = |r: &Router| -> u64 {
        launch::plain(&r.log())
            .lines()
            .filter(|l| l.contains("origin not allowed"))
            .filter_map(|l| l.split("suppressed=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let want = (50 - logged) as u64;
    wait_for(std::time::Duration::from_secs(5), || {
        refuse(&r);
        (held_back(&r) >= want).then_some(())
    })
    .unwrap_or_else(|| panic!("not {want} held back:\n{}", r.log()));
}
