//! Cross-origin requests from browsers (CORS), per app. The router that serves an app applies
//! its policy on every ingress, before any token check: a request whose `Origin` the app does
//! not allow is refused with 403 `origin_not_allowed` and never reaches a task; a preflight
//! (`OPTIONS` with `Access-Control-Request-Method`) is answered from the policy by the router.
//! The ingress that wrote the request adds `Access-Control-Allow-Origin`, `Vary: Origin` and
//! `Access-Control-Expose-Headers` to every other answer of a cross-origin request, so a page
//! reads its errors as well as its answers.

use super::Answer;
use crate::config::App;
use crate::metrics::ShardMetrics;
use crate::shard::Shard;

/// Methods a page may use (`Access-Control-Allow-Methods`): every method that reaches a task.
pub(crate) const ALLOW_METHODS: &[u8] =
    b"access-control-allow-methods: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The router's own response headers a page may read (`Access-Control-Expose-Headers`).
pub(crate) const EXPOSE_HEADERS: &[u8] = b"access-control-expose-headers: fedbus-partition, \
fedbus-hops, fedbus-emergency, fedbus-shard, fedbus-served-by";

/// Applies `app`'s policy to a request from `origin` (a cross-origin request; same-origin
/// requests and requests without `Origin` are not subject to CORS). `Ok(Some)`: the preflight
/// answer; `Ok(None)`: go on routing.
#[allow(clippy::result_large_err)]
pub(crate) fn check(
    shard: &Shard,
    app: &App,
    origin: Option<&[u8]>,
    preflight: bool,
) -> Result<Option<Answer>, Answer> {
    let Some(origin) = origin else {
        return Ok(None);
    };
    let Some(policy) = app.cors.as_ref().filter(|c| c.allows(origin)) else {
        ShardMetrics::inc(&shard.metrics.origin_refused);
        if let Some(suppressed) = shard.log_gates.origin_refused.pass() {
            tracing::info!(
                shard = shard.index,
                app = %app.name,
                // Clipped and escaped: any client can send any origin, up to a whole head.
                origin = ?crate::util::clipped(&String::from_utf8_lossy(origin)),
                suppressed,
                "origin not allowed: 403"
            );
        }
        return Err(Answer::error(
            403,
            "origin_not_allowed",
            format!("app {} does not allow this origin", app.name),
        ));
    };
    if !preflight {
        return Ok(None);
    }
    Ok(Some(Answer::Preflight {
        allow_headers: format!(
            "access-control-allow-headers: {}",
            policy.allowed_headers.join(", ")
        ),
        max_age: policy.max_age_secs,
    }))
}

/// Whether any app of this cluster allows `origin`: the `/api/ws` upgrade's check (a session
/// may call several apps; each request is then checked against its own app).
pub(crate) fn any_app_allows(shard: &Shard, origin: &[u8]) -> bool {
    shard
        .snapshots
        .apps
        .load()
        .apps
        .iter()
        .any(|a| a.cors.as_ref().is_some_and(|c| c.allows(origin)))
}

/// Whether the answer `a` to a cross-origin request from `origin` for `target` carries the CORS
/// fields, so that the page reads it. Never the refusal of the origin itself. For an app of
/// this cluster, its policy decides (a routed answer already passed it, [`check`]; a refusal
/// made from the request head before the policy ran, a body over the limit or a malformed
/// credential, did not). For another cluster's app, an answer relayed from the router that
/// applied that app's policy, unless it is a `404 unknown_app` (that router has no policy for
/// it either). Any other answer, and an answer this router made itself for another cluster's
/// app (a refusal from the head, a peer link down or late), is readable when any of this
/// router's apps allows the origin (the `/api/ws` upgrade's check): this router does not know
/// that app's policy, and a page on an origin no app trusts learns nothing from a 404 about
/// which apps and clusters exist. `routed`: the answer comes from routing, after this
/// cluster's app's policy passed, so only its 404s are looked at further.
pub(crate) fn readable(
    shard: &Shard,
    target: &crate::route::ApiPath<'_>,
    origin: &[u8],
    a: &Answer,
    routed: bool,
) -> bool {
    let tag = a.error_tag();
    if tag == Some(&b"origin_not_allowed"[..]) {
        return false;
    }
    let unknown = matches!(tag, Some(b"unknown_app" | b"unknown_cluster"));
    let ours = ours(shard, target);
    if routed && !unknown && ours {
        return true;
    }
    if !ours {
        if !unknown && matches!(a, Answer::Relayed { .. }) {
            return true;
        }
        return any_app_allows(shard, origin);
    }
    let apps = shard.snapshots.apps.load();
    match apps.apps.iter().find(|a| a.name == target.app_name) {
        Some(app) => app.cors.as_ref().is_some_and(|c| c.allows(origin)),
        None => any_app_allows(shard, origin),
    }
}

/// Whether `target` names this router's own cluster.
fn ours(shard: &Shard, target: &crate::route::ApiPath<'_>) -> bool {
    target.region == shard.cfg.region && target.cluster == shard.cfg.cluster
}

/// Whether the answer `a` to a cross-origin request from `origin` for `target` carries
/// `Access-Control-Allow-Credentials: true`: when the policy of the app that served it allows
/// `origin` and credentials. For an app of this cluster, its policy here. For another
/// cluster's app, the serving router says so in its relayed answer (CORS_CREDENTIALS, set by
/// [`credentials_for`] there); an answer this router made itself for another cluster's app
/// never carries it, since an app of the same name in this cluster is another app.
pub(crate) fn credentials(
    shard: &Shard,
    target: &crate::route::ApiPath<'_>,
    origin: &[u8],
    a: &Answer,
) -> bool {
    if ours(shard, target) {
        return credentials_for(shard, target.app_name, origin);
    }
    match a {
        Answer::Relayed { frame, .. } => frame.get(crate::proto::tag::CORS_CREDENTIALS).is_some(),
        _ => false,
    }
}

/// Whether this router's app `app_name` allows `origin` with credentials (`allow_credentials`).
pub(crate) fn credentials_for(shard: &Shard, app_name: &str, origin: &[u8]) -> bool {
    shard
        .snapshots
        .apps
        .load()
        .apps
        .iter()
        .find(|a| a.name == app_name)
        .and_then(|a| a.cors.as_ref())
        .is_some_and(|c| c.allow_credentials && c.allows(origin))
}
