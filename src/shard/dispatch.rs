//! The per-request routing of a shard: seed rules (role `main` first, Redirect up to the hop
//! limit, `partition = wsid % partitions`, emergency partition), the task link of *this* shard,
//! and the wait for the answer. Shared by the HTTP and websocket client endpoints.

use super::Shard;
use crate::metrics::ShardMetrics;
use crate::proto::{self, put_meta, put_meta_u64, tag, Frame, Header, Kind};
use crate::route::{Lookup, MAIN_ROLE};
use crate::task::link::Reply;
use bytes::Bytes;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A client request, already authenticated, as the router sees it.
pub struct RouteReq<'a> {
    pub app: &'a str,
    pub service: &'a str,
    pub module: &'a str,
    pub function: &'a str,
    pub wsid: u64,
    pub method: &'a str,
    pub content_type: Option<&'a [u8]>,
    pub subject: &'a str,
    pub payload: Bytes,
    pub flags: u8,
}

/// The outcome for the client.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Router-made error: (code, message). None when a task answered.
    pub error: Option<(&'static str, String)>,
    /// The task's response frame (status, headers, payload).
    pub frame: Option<Frame>,
    pub partition: Option<u32>,
    pub emergency_for: Option<u32>,
    pub hops: u8,
    /// The frame came from a peer router over a peer link: its SERVED_BY and `fedbus-*`
    /// header lines are the router's own, not a task's (a task cannot set this).
    pub relayed: bool,
}

impl Answer {
    pub fn error(status: u16, code: &'static str, message: impl Into<String>) -> Answer {
        Answer {
            status,
            error: Some((code, message.into())),
            frame: None,
            partition: None,
            emergency_for: None,
            hops: 0,
            relayed: false,
        }
    }

    /// The body the client gets: the task's payload, or the JSON error.
    pub fn body(&self) -> Bytes {
        match (&self.frame, &self.error) {
            (Some(f), _) => f.payload.clone(),
            (None, Some((code, msg))) => {
                Bytes::from(crate::api::error_body(self.status, code, msg))
            }
            _ => Bytes::new(),
        }
    }
}

/// Routes one request and waits for its answer.
pub async fn dispatch(shard: &Rc<Shard>, req: &RouteReq<'_>) -> Answer {
    // A snapshot guard (no refcount traffic) held only while routing, never across an await;
    // the first one also serves the first hop.
    let mut first = Some(shard.snapshots.routes.load());
    let Some(partition) = first
        .as_ref()
        .and_then(|t| t.partition_of(req.app, req.wsid))
    else {
        return Answer::error(404, "unknown_app", format!("no app {}", req.app));
    };
    let max_hops = shard.cfg.routing.max_hops;
    let deadline = Instant::now() + Duration::from_millis(shard.cfg.limits.request_timeout_ms);
    let mut role: std::borrow::Cow<'_, str> = MAIN_ROLE.into();
    let mut want = partition;
    let mut hops: u8 = 0;
    let mut payload = req.payload.clone();
    loop {
        let table = first
            .take()
            .unwrap_or_else(|| shard.snapshots.routes.load());
        let (served, tasks, emergency_for) = match table.lookup(req.app, &role, want) {
            Lookup::Served {
                partition,
                tasks,
                emergency_for,
            } => (partition, tasks, emergency_for),
            Lookup::UnknownApp => {
                return Answer::error(404, "unknown_app", format!("no app {}", req.app))
            }
            Lookup::UnknownRole | Lookup::NoLiveTask { .. } => {
                return no_live_task(req.app, &role, want)
            }
        };
        // The snapshot may lag behind this shard's own view of its links by a moment; fall
        // back to the role's emergency partition when no local link serves the partition.
        let (link, served, emergency_for) = match shard.pick_link(req.app, &role, tasks) {
            Ok(l) => (l, served, emergency_for),
            Err(true) => {
                return Answer::error(
                    503,
                    "task_busy",
                    "every task of the partition is at its pending limit",
                )
            }
            Err(false) => {
                // No live link here for this partition, and the published snapshot may not
                // know yet (the control thread publishes a moment later): elect on the shard
                // among the partitions that have a live link here. The same pure election the
                // control thread runs, so the choice matches what it will publish.
                let local = table.apps.get(req.app).and_then(|a| {
                    let r = a.roles.get(role.as_ref())?;
                    let live_here = |p: &u32| *p != want && shard.has_live_link(r.tasks(*p));
                    let e = match a.emergency_partition.filter(live_here) {
                        Some(e) => e,
                        None => crate::route::elect_emergency(
                            req.app,
                            &role,
                            shard.cfg.routing.election_seed,
                            r.live_partitions().filter(live_here),
                        )?,
                    };
                    shard
                        .pick_link(req.app, &role, r.tasks(e))
                        .ok()
                        .map(|l| (l, e))
                });
                match local {
                    Some((l, e)) => (l, e, Some(want)),
                    None => return no_live_task(req.app, &role, want),
                }
            }
        };
        let id = shard.request_id();
        let rx = {
            let mut scratch = shard.scratch.borrow_mut();
            scratch.clear();
            scratch.resize(proto::HEADER_LEN, 0);
            put_meta(&mut scratch, tag::APP, req.app.as_bytes());
            put_meta(&mut scratch, tag::ROLE, role.as_bytes());
            put_meta(&mut scratch, tag::SERVICE, req.service.as_bytes());
            put_meta(&mut scratch, tag::MODULE, req.module.as_bytes());
            put_meta(&mut scratch, tag::FUNCTION, req.function.as_bytes());
            put_meta_u64(&mut scratch, tag::WSID, req.wsid);
            put_meta(&mut scratch, tag::METHOD, req.method.as_bytes());
            put_meta(&mut scratch, tag::SUBJECT, req.subject.as_bytes());
            if let Some(ct) = req.content_type {
                put_meta(&mut scratch, tag::CONTENT_TYPE, ct);
            }
            let h = Header {
                kind: Kind::Request,
                flags: req.flags
                    | if emergency_for.is_some() {
                        proto::flags::EMERGENCY
                    } else {
                        0
                    },
                hops,
                partition: served,
                request_id: id,
                meta_len: (scratch.len() - proto::HEADER_LEN) as u32,
                payload_len: payload.len() as u32,
            };
            scratch[..proto::HEADER_LEN].copy_from_slice(&h.encode());
            match link.send_request(id, &scratch, payload, deadline) {
                Ok(wait) => wait,
                Err(_) => {
                    return Answer::error(503, "task_busy", "task link is over its queue limit")
                }
            }
        };
        drop(table);
        let reply = {
            // Counted while waiting, also when the client goes away and this future is dropped.
            let _pending = PendingGauge::new(&shard.metrics);
            rx.await
        };
        if emergency_for.is_some() {
            ShardMetrics::inc(&shard.metrics.emergency);
        }
        match reply {
            Reply::Response(f) => {
                let Some(status) = answer_status(&f, 200) else {
                    return Answer::error(
                        502,
                        "bad_task_status",
                        "the task answered a status that cannot carry a body",
                    );
                };
                return Answer {
                    status,
                    error: None,
                    frame: Some(f),
                    partition: Some(served),
                    emergency_for,
                    hops,
                    relayed: false,
                };
            }
            Reply::Redirect {
                role: r,
                partition: p,
            } => {
                ShardMetrics::inc(&shard.metrics.redirects);
                if hops >= max_hops {
                    return Answer {
                        hops: hops + 1,
                        ..Answer::error(
                            508,
                            "redirect_limit",
                            format!("more than {max_hops} redirects"),
                        )
                    };
                }
                if r.is_empty() {
                    return Answer::error(502, "bad_redirect", "task redirected to an empty role");
                }
                hops += 1;
                role = r.into();
                if let Some(p) = p {
                    want = p;
                }
                payload = req.payload.clone();
            }
            Reply::Lost => {
                return Answer::error(
                    502,
                    "task_lost",
                    "the task's link closed before it answered",
                )
            }
            Reply::Timeout => {
                return Answer::error(504, "task_timeout", "the task did not answer in time");
            }
        }
    }
}

/// `fedbus_pending_requests` up while alive.
struct PendingGauge<'a>(&'a ShardMetrics);

impl<'a> PendingGauge<'a> {
    fn new(m: &'a ShardMetrics) -> Self {
        ShardMetrics::inc(&m.pending);
        PendingGauge(m)
    }
}

impl Drop for PendingGauge<'_> {
    fn drop(&mut self) {
        ShardMetrics::dec(&self.0.pending);
    }
}

/// The status of an answer frame (`default` when it has none). Statuses that cannot carry a
/// body (1xx, 204, 304) or are out of range are refused: with the body the router always
/// sends, they would let a task split the client's keep-alive stream.
pub fn answer_status(f: &Frame, default: u16) -> Option<u16> {
    match f.get(tag::STATUS) {
        None => Some(default),
        Some(_) => f
            .get_u64(tag::STATUS)
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (200..600).contains(s) && *s != 204 && *s != 304),
    }
}

fn no_live_task(app: &str, role: &str, partition: u32) -> Answer {
    Answer {
        partition: Some(partition),
        ..Answer::error(
            503,
            "no_live_task",
            format!("no live task serves {app} role {role} partition {partition}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::answer_status;
    use crate::proto::{encode_frame, put_meta, tag, Frame, Kind};
    use bytes::BytesMut;

    fn with_status(st: Option<&[u8]>) -> Frame {
        let mut m = BytesMut::new();
        if let Some(v) = st {
            put_meta(&mut m, tag::STATUS, v);
        }
        Frame::decode(encode_frame(Kind::Response, 0, 0, 0, 1, &m, b"body").freeze())
            .expect("frame")
    }

    #[test]
    fn statuses_that_cannot_carry_a_body_are_refused() {
        assert_eq!(answer_status(&with_status(None), 200), Some(200));
        assert_eq!(answer_status(&with_status(Some(b"201")), 200), Some(201));
        assert_eq!(answer_status(&with_status(Some(b"599")), 200), Some(599));
        for bad in [
            &b"100"[..],
            b"101",
            b"199",
            b"204",
            b"304",
            b"600",
            b"abc",
            b"-1",
        ] {
            assert_eq!(answer_status(&with_status(Some(bad)), 200), None, "{bad:?}");
        }
    }
}
