//! The one routing step of every ingress. HTTP requests, requests on the client websocket
//! endpoint and requests forwarded by peer routers all become a protocol-neutral [`Request`]
//! and go through [`route`]:
//!
//! 1. **target** ([`decide`]): our cluster, another cluster of the federation, or unknown; a
//!    request that a peer forwarded is served here or nowhere (loop guard);
//! 2. **authorization** ([`verify::authorize`]): anonymous services, or the client JWT with the
//!    connection's [`VerifyCache`] (the same rule, hence the same refusal of a retired key
//!    version, on every ingress); requests for another cluster are verified by that cluster;
//! 3. **local delivery** ([`local::deliver`]): role `main`, `partition = wsid % partitions`,
//!    Redirect up to the hop limit, the emergency partition, the task link of this shard;
//! 4. **forwarding** ([`forward::forward`]): the peer link of this shard to a router of the
//!    target cluster.
//!
//! Ingress modules turn wire bytes into a [`Request`] and an [`Answer`] into wire bytes and do
//! nothing else. Nothing here reads a socket; everything runs on the shard that accepted the
//! request and never blocks.

pub(crate) mod answer;
pub(crate) mod cors;
pub(crate) mod forward;
pub(crate) mod local;
pub(crate) mod verify;

pub(crate) use answer::{answer_status, Answer, Field};
pub(crate) use verify::{Principal, VerifyCache};

use crate::route::ApiPath;
use crate::shard::Shard;
use bytes::Bytes;
use std::cell::RefCell;
use std::rc::Rc;

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ingress {
    /// An HTTP/1.1 request on the api listener.
    Http,
    /// A request frame on the client websocket endpoint `/api/ws`.
    Websocket,
    /// A request frame a router of another cluster forwarded over a peer link.
    Peer,
}

/// A client request, whatever protocol brought it. Borrows from the ingress's read buffer;
/// the payload is a slice of it too (never copied).
#[derive(Debug, Clone)]
pub(crate) struct Request<'a> {
    /// The target from the request path (or a forwarded frame's metadata).
    pub(crate) target: ApiPath<'a>,
    /// `GET`, `POST`, ...
    pub(crate) method: &'a str,
    /// The bearer token, if any.
    pub(crate) credential: Option<&'a [u8]>,
    /// The body's content type, if any.
    pub(crate) content_type: Option<&'a [u8]>,
    /// The body.
    pub(crate) payload: Bytes,
    /// Where it came in.
    pub(crate) ingress: Ingress,
    /// The page's `Origin`, only when the request is cross-origin (subject to the app's CORS
    /// policy, [`cors`]).
    pub(crate) origin: Option<&'a [u8]>,
    /// A CORS preflight: answered by the router that serves the app, never by a task.
    pub(crate) preflight: bool,
    /// When the ingress took it in: the request's deadlines count from here. An ingress reads
    /// the clock once per batch of requests (one read, one websocket turn), not per request.
    pub(crate) received: std::time::Instant,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Decision<'s> {
    /// This cluster serves it: the app's configuration.
    Local(&'s crate::config::App),
    /// Another cluster of the federation serves it.
    Remote,
}

/// Step 1: decides whose request this is. Pure: a function of the configuration, the
/// published `apps` and the published federation view. Errors are the client's answer.
#[allow(clippy::result_large_err)]
pub(crate) fn decide<'s>(
    shard: &Shard,
    apps: &'s [crate::config::App],
    req: &Request<'_>,
) -> Result<Decision<'s>, Answer> {
    let t = &req.target;
    let ours = t.region == shard.cfg.region && t.cluster == shard.cfg.cluster;
    if !ours {
        if req.ingress == Ingress::Peer {
            // Loop guard: a forwarded request is served here or nowhere.
            return Err(Answer::error(
                508,
                "forward_loop",
                format!(
                    "request for {}/{} was already forwarded once",
                    t.region, t.cluster
                ),
            ));
        }
        if shard.snapshots.fed.load().knows(t.region, t.cluster) {
            return Ok(Decision::Remote);
        }
        return Err(Answer::error(
            404,
            "unknown_cluster",
            format!("cluster {}/{} is not served here", t.region, t.cluster),
        ));
    }
    match apps.iter().find(|a| a.name == t.app_name) {
        Some(app) => Ok(Decision::Local(app)),
        None => Err(Answer::error(
            404,
            "unknown_app",
            format!("no app {}", t.app_name),
        )),
    }
}

/// What [`admit`] found.
#[derive(Debug)]
pub(crate) enum Admitted {
    /// For this cluster, from this principal.
    Local(Principal),
    /// For another cluster, which verifies the credential itself.
    Remote,
    /// Answered by the router: a CORS preflight.
    Answered(Answer),
}

/// Steps 1 and 2, synchronous: where the request goes and whether it may (the app's CORS
/// policy for a cross-origin request, then the credential). The HTTP ingress
/// also runs it on a request head before its body arrives (before `100 Continue`), so an
/// unauthenticated client cannot make the router buffer an upload for this cluster (a request for
/// another cluster is admitted without a token check: its home cluster makes it).
#[allow(clippy::result_large_err)]
pub(crate) fn admit(
    shard: &Shard,
    cache: &mut VerifyCache,
    req: &Request<'_>,
) -> Result<Admitted, Answer> {
    // The apps in force now (`[[apps]]` reloads); the shard's copy (no atomic refcount).
    let apps = shard.snapshots.apps.load();
    match decide(shard, &apps.apps, req)? {
        Decision::Remote => Ok(Admitted::Remote),
        Decision::Local(app) => {
            if let Some(a) = cors::check(shard, app, req.origin, req.preflight)? {
                return Ok(Admitted::Answered(a));
            }
            let keys = shard.snapshots.keys.load();
            let t = &req.target;
            let anonymous = app.anonymous_services.iter().any(|s| s == t.service);
            if anonymous && req.credential.is_none() {
                anonymous_body(shard, req.payload.len())?;
            }
            let p = verify::authorize(
                cache,
                &verify::Keys {
                    keyring: &keys.keyring,
                    generation: keys.generation,
                    grace_secs: shard.cfg.auth.grace_secs,
                },
                t.app_name,
                anonymous,
                req.credential,
                crate::util::unix_secs_coarse(),
            )?;
            if let Principal::Client { cached: true, .. } = p {
                crate::metrics::ShardMetrics::inc(&shard.metrics.auth_cache_hits);
            }
            Ok(Admitted::Local(p))
        }
    }
}

/// Bodies for anonymous services (anyone may send them) are held to
/// `limits.max_anonymous_body_bytes`: 413 `body_too_large` over it.
#[allow(clippy::result_large_err)]
pub(crate) fn anonymous_body(shard: &Shard, len: usize) -> Result<(), Answer> {
    if len > shard.cfg.limits.max_anonymous_body_bytes {
        return Err(Answer::error(
            413,
            "body_too_large",
            "request body over limits.max_anonymous_body_bytes for an anonymous service",
        ));
    }
    Ok(())
}

/// Routes one request to its answer: [`admit`], then local delivery or forwarding. The cache
/// is borrowed only before the first await.
pub(crate) async fn route(
    shard: &Rc<Shard>,
    cache: &RefCell<VerifyCache>,
    req: &Request<'_>,
) -> Answer {
    let admitted = admit(shard, &mut cache.borrow_mut(), req);
    match admitted {
        Err(a) => a,
        Ok(Admitted::Local(p)) => local::deliver(shard, req, p.subject()).await,
        Ok(Admitted::Remote) => forward::forward(shard, req).await,
        Ok(Admitted::Answered(a)) => a,
    }
}
