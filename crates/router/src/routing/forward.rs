//! Step 4 of routing, forwarding: a request for another cluster goes over this shard's own
//! peer link to a router of that cluster (chosen by wsid), marked FORWARDED, with the client's
//! credential for the destination to verify. The answer comes back relayed.

use super::{answer_status, Answer, Request};
use crate::metrics::ShardMetrics;
use crate::proto::{self, flags, put_meta, put_meta_u64, tag, Kind};
use crate::shard::Shard;
use crate::task::link::Reply;
use bytes::{BufMut, BytesMut};
use std::rc::Rc;
use std::time::Duration;

/// Errors of a serving router that mean the request reached no task there: the sender may
/// send it to another router of that cluster (docs/FEDERATION.md, "Readiness and drain").
const NEVER_DELIVERED: [&str; 3] = ["no_live_task", "draining", "not_ready"];

/// Forwards over this shard's peer link and waits for the answer. An answer saying the request
/// reached no task there is retried once on another router of the same cluster: it was never
/// delivered, so the retry cannot run it twice; the retry is itself marked FORWARDED (never
/// forwarded again), and there is only one.
pub(crate) async fn forward(shard: &Rc<Shard>, req: &Request<'_>) -> Answer {
    let (answer, link) = forward_once(shard, req, None).await;
    let Some(link) = link.filter(|_| never_delivered(&answer)) else {
        return answer;
    };
    let (again, other) = forward_once(shard, req, Some(&link)).await;
    match other {
        Some(_) => {
            ShardMetrics::inc(&shard.metrics.forward_retries);
            again
        }
        // No other router to try: the first answer stands.
        None => answer,
    }
}

/// True for a relayed 503 whose error code is one of [`NEVER_DELIVERED`], made before any
/// redirect: after one (the frame's hops above 0) the request reached the `main` task, and a
/// `no_live_task` names the role it redirected to, so sending it again would run it twice.
pub(crate) fn never_delivered(a: &Answer) -> bool {
    match a {
        Answer::Relayed { status: 503, frame } => {
            frame.header.hops == 0
                && frame
                    .get_str(tag::ERROR)
                    .is_some_and(|e| NEVER_DELIVERED.contains(&e))
        }
        _ => false,
    }
}

/// One attempt over a link other than `except`; also returns the link used (None: none).
async fn forward_once(
    shard: &Rc<Shard>,
    req: &Request<'_>,
    except: Option<&Rc<crate::task::link::TaskLink>>,
) -> (Answer, Option<Rc<crate::task::link::TaskLink>>) {
    let t = &req.target;
    let limits = &shard.cfg.limits;
    let picked = shard.peers.borrow().pick(
        t.region,
        t.cluster,
        t.app_name,
        t.wsid,
        limits.max_pending_per_link,
        except,
    );
    let Some(link) = picked else {
        let a = Answer::error(
            503,
            "no_peer",
            format!("no live router of cluster {}/{}", t.region, t.cluster),
        );
        return (a, None);
    };
    let answer = send(shard, req, &link).await;
    (answer, Some(link))
}

/// Sends over `link` and waits for the answer.
pub(crate) async fn send(
    shard: &Rc<Shard>,
    req: &Request<'_>,
    link: &Rc<crate::task::link::TaskLink>,
) -> Answer {
    let t = &req.target;
    let limits = &shard.cfg.limits;
    let id = shard.request_id();
    let rx = {
        let mut m = shard.scratch.borrow_mut();
        proto::begin_head(&mut m);
        put_cluster(&mut m, t.region, t.cluster);
        put_meta(&mut m, tag::APP, t.app_name.as_bytes());
        put_meta(&mut m, tag::SERVICE, t.service.as_bytes());
        put_meta(&mut m, tag::MODULE, t.module.as_bytes());
        put_meta(&mut m, tag::FUNCTION, t.function.as_bytes());
        put_meta_u64(&mut m, tag::WSID, t.wsid);
        put_meta(&mut m, tag::METHOD, req.method.as_bytes());
        if let Some(tok) = req.credential {
            put_meta(&mut m, tag::TOKEN, tok);
        }
        if let Some(ct) = req.content_type {
            put_meta(&mut m, tag::CONTENT_TYPE, ct);
        }
        if let Some(o) = req.origin {
            put_meta(&mut m, tag::ORIGIN, o);
        }
        let preflight = if req.preflight { flags::PREFLIGHT } else { 0 };
        proto::finish_head(
            &mut m,
            Kind::Request,
            flags::FORWARDED | preflight,
            0,
            0,
            id,
            req.payload.len(),
        );
        if let Some(refused) = over_link_bound(limits, link, m.len(), req.payload.len()) {
            return refused;
        }
        // A little longer than the serving router's own deadline, so that its 504
        // `task_timeout` reaches the client rather than our `peer_timeout`.
        let deadline = req.received + Duration::from_millis(limits.request_timeout_ms + 1000);
        match link.send_request(id, &m, &req.payload, deadline) {
            Ok(wait) => wait,
            Err(_) => {
                ShardMetrics::inc(&shard.metrics.busy_refused);
                return Answer::error(503, "peer_busy", "peer link over its queue limit");
            }
        }
    };
    ShardMetrics::inc(&shard.metrics.forwarded);
    let bad_answer = |why: &'static str| {
        ShardMetrics::inc(&shard.metrics.peer_protocol_errors);
        tracing::warn!(shard = shard.index, cluster = %format_args!("{}/{}", t.region, t.cluster), "bad answer from a peer router: {why}: 502");
        Answer::error(502, "bad_peer_answer", why)
    };
    match rx.await {
        Reply::Response(frame) => match answer_status(&frame, 502) {
            Some(status) => Answer::Relayed { status, frame },
            None => bad_answer(
                "the peer answered a status outside 200..599 (a 1xx cannot end a request; HTTP has none above 599)",
            ),
        },
        Reply::Redirect { .. } => bad_answer("peer answered with a redirect"),
        Reply::Lost => Answer::error(502, "peer_lost", "the peer link closed before the answer"),
        Reply::Timeout => Answer::error(
            504,
            "peer_timeout",
            "the peer router did not answer in time",
        ),
    }
}

/// The refusal of a request whose frame (`head` bytes of header and metadata, then `body`)
/// is over what the peer reads in one message, the smaller of its status's `max_message` and
/// ours: the peer would close the link with 1009 and fail every request on it. 413 when the
/// body alone is over the peer's body bound, else 431 (the client's token, content type or
/// origin made it so).
fn over_link_bound(
    limits: &crate::config::Limits,
    link: &crate::task::link::TaskLink,
    head: usize,
    body: usize,
) -> Option<Answer> {
    let bound = limits.max_message_bytes().min(link.peer_max_message.get());
    if head + body <= bound {
        return None;
    }
    let body_bound = bound.saturating_sub(crate::config::MESSAGE_SLACK);
    Some(if body > body_bound {
        Answer::error(
            413,
            "body_too_large",
            format!("request body over the limit of the target cluster ({body_bound} bytes)"),
        )
    } else {
        Answer::error(
            431,
            "headers_too_large",
            format!(
                "request metadata too large to forward ({head} bytes, bound {bound} with the body)"
            ),
        )
    })
}

/// The CLUSTER entry `region/cluster`, written from its two parts without formatting a string
/// (the layout of [`put_meta`]: tag, u16 length, value).
fn put_cluster(m: &mut BytesMut, region: &str, cluster: &str) {
    // Path segments are short (a path fits a request head), far below u16::MAX.
    m.put_u8(tag::CLUSTER);
    m.put_u16((region.len() + 1 + cluster.len()) as u16);
    m.put_slice(region.as_bytes());
    m.put_u8(b'/');
    m.put_slice(cluster.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::{never_delivered, Answer};
    use crate::proto::{encode_frame, put_meta, tag, Frame, Kind};
    use bytes::BytesMut;

    /// A relayed 503 `error` after `hops` redirects on the serving router.
    fn relayed(error: &str, hops: u8) -> Answer {
        let mut m = BytesMut::new();
        put_meta(&mut m, tag::ERROR, error.as_bytes());
        let frame = Frame::decode(encode_frame(Kind::Response, 0, hops, 10, 1, &m, b"{}").freeze())
            .expect("frame");
        Answer::Relayed { status: 503, frame }
    }

    /// `no_live_task` before any redirect reached no task: retried on a sibling. After a
    /// redirect the `main` task had it (the role it redirected to had no task): a retry would
    /// run it a second time.
    #[test]
    fn a_request_redirected_to_a_missing_role_was_delivered() {
        assert!(never_delivered(&relayed("no_live_task", 0)));
        assert!(never_delivered(&relayed("draining", 0)));
        assert!(!never_delivered(&relayed("no_live_task", 1)));
        assert!(!never_delivered(&relayed("no_live_task", 3)));
        assert!(!never_delivered(&relayed("task_timeout", 0)));
    }

    #[test]
    fn cluster_entry_is_a_put_meta_entry() {
        let mut a = BytesMut::new();
        super::put_cluster(&mut a, "ru", "spb2");
        let mut b = BytesMut::new();
        crate::proto::put_meta(&mut b, crate::proto::tag::CLUSTER, b"ru/spb2");
        assert_eq!(a, b);
    }
}
