//! Harness additions for the seed-rule tests (`tests/seed_rules.rs`): config sections beyond
//! `[limits]`, the router's pid (for SIGHUP), the example Auth Service task, keyring rotation,
//! and the `kid` of a JWT.
//!
//! A child module of `common`, so it reaches the harness's private fields instead of
//! duplicating the router start.

use super::*;

/// Starts `b` with `extra` TOML (whole sections, e.g. `"[auth]\ngrace_secs = 1"`) added to the
/// generated config.
///
/// The harness writes `[limits]` entries as `key = value` lines right before the `[[apps]]`
/// tables; `extra` goes in as the last such entry, its own sections ending the `[limits]`
/// table, and a trailing `#` turns the ` = ` the harness appends into a comment.
pub fn start_with(mut b: RouterBuilder, extra: &str) -> Router {
    assert!(
        !extra.contains("[[apps]]"),
        "apps go through RouterBuilder::apps"
    );
    b.limits.push((format!("\n{extra}\n#"), String::new()));
    b.start()
}

/// The router's process id.
pub fn pid(r: &Router) -> i32 {
    let id = r.proc.child.as_ref().expect("router running").id();
    i32::try_from(id).expect("pid fits i32")
}

/// The `[auth]` grace of the tests that ask inside it and after it: 3 s.
///
/// A key version's grace counts in whole unix seconds from its replacement's `created`
/// (`now < created + grace_secs`, both rounded down), so it lasts between `grace_secs - 1` and
/// `grace_secs` seconds of real time. With 1 s a request right after the rotation could already
/// find it retired whenever the rotation came late in a second.
pub const GRACE_SECS: u64 = 3;

/// `[auth]` with [`GRACE_SECS`], for [`start_with`].
pub fn grace_config() -> String {
    format!("[auth]\ngrace_secs = {GRACE_SECS}")
}

/// [`rotate_app`], and the times that bound the old version's grace: it still verifies before
/// `.0` (`GRACE_SECS - 1` s after the rotation started), and is retired from `.1` on
/// (`GRACE_SECS` s after it ended, plus 100 ms for the router's clock read).
pub fn rotate_app_timed(r: &Router, app: &str) -> (Instant, Instant) {
    let start = Instant::now();
    rotate_app(r, app);
    let end = Instant::now();
    (
        start + Duration::from_secs(GRACE_SECS - 1),
        end + Duration::from_millis(GRACE_SECS * 1000 + 100),
    )
}

/// `kill -HUP <router>`: reload the keyring.
pub fn sighup(r: &Router) {
    // SAFETY: kill(2) on a pid we spawned and still own (not yet reaped).
    let rc = unsafe { libc::kill(pid(r), libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP {}", pid(r));
}

/// How many times the router logged a keyring reload.
pub fn reloads(r: &Router) -> usize {
    r.log().matches("keyring reloaded").count()
}

/// `fedbus keys rotate --app APP --keyring <router's keyring>`; returns the CLI's output.
pub fn rotate_app(r: &Router, app: &str) -> String {
    fedbus(
        r.home(),
        &[
            "keys",
            "rotate",
            "--app",
            app,
            "--keyring",
            r.keys.to_str().expect("utf-8 path"),
        ],
    )
}

/// A fresh (uncached) client token from `fedbus token client`.
pub fn fresh_token(r: &Router, app: &str, sub: &str) -> String {
    let t = crate::launch::client_token(r.home(), &r.keys, app, sub);
    assert_eq!(t.split('.').count(), 3, "not a JWT: {t:?}");
    t
}

/// The decoded JSON header of a JWT.
pub fn jwt_header(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let h = token.split('.').next().unwrap_or("");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .unwrap_or_else(|e| panic!("JWT header of {token:?} is not base64url: {e}"));
    serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("JWT header is not JSON: {e}"))
}

/// The `kid` of a JWT's header ("" when absent).
pub fn jwt_kid(token: &str) -> String {
    jwt_header(token)["kid"].as_str().unwrap_or("").to_string()
}

/// Starts `fedbus task auth` (role `auth`, all partitions of demo/echo) linked to `r`, and
/// waits until every shard registered it.
pub fn auth_task(r: &Router) -> Task {
    spawn_task(r, &["task".into(), "auth".into()], " (auth)")
}
