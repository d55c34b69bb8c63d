//! Per-shard counters and a latency histogram. Each shard writes only its own
//! `ShardMetrics` (relaxed atomics on cache lines no other shard writes), and the admin
//! listener adds them up only when scraped. Never blocks, never allocates on update.
//!
//! One writer per counter (its shard's thread), so an update is a relaxed load and a store
//! ([`ShardMetrics::add`]), not a locked read-modify-write: a request updates about ten of
//! them (status, bytes, latency bucket and sum, the body and outbox gauges up and down), and
//! on x86 each `fetch_add` is a `lock xadd` of about 20 cycles. A reader (the admin listener)
//! sees every value a shard stored, as before. The one exception is `api_open_peak`, which
//! `shard::trim`'s thread resets with `swap` while the shard raises it with `fetch_max`: it
//! stays a read-modify-write on both sides.

pub(crate) mod admin;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// HTTP statuses counted individually; anything else lands in "other".
pub(crate) const STATUSES: [u16; 20] = [
    200, 204, 304, 400, 401, 403, 404, 405, 408, 411, 413, 414, 431, 500, 502, 503, 504, 508, 101,
    0,
];
/// Upper bounds of latency buckets, microseconds (Prometheus `le`).
pub(crate) const LATENCY_BUCKETS_US: [u64; 16] = [
    25, 50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 102_400, 409_600,
    1_638_400, 10_000_000,
];

/// Close codes of client `/api/ws` sessions ended for bad input, counted one by one in
/// `fedbus_ws_bad_input_closed_total`: a protocol error, a text message, text that is not
/// UTF-8, a message over the bound.
pub(crate) const WS_BAD_INPUT_CODES: [u16; 4] = [1002, 1003, 1007, 1009];

/// Listener kinds for connection gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listener {
    Api = 0,
    Internal = 1,
    External = 2,
}

impl Listener {
    /// The `listener` label of its metrics.
    pub(crate) fn label(self) -> &'static str {
        ["api", "internal", "external"][self as usize]
    }
}

/// Counters of one shard. Aligned so two shards never share a cache line.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct ShardMetrics {
    pub(crate) requests: [AtomicU64; STATUSES.len()],
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) connections: [AtomicU64; 3],
    pub(crate) connections_refused: AtomicU64,
    /// Connections on a link listener closed in their handshake for a newer one, by listener.
    pub(crate) handshakes_evicted: [AtomicU64; 3],
    /// Client connections closed for room other than idle keep-alive ones: in their TLS
    /// handshake (0), waiting for a request head (1).
    pub(crate) unfinished_evicted: [AtomicU64; 2],
    pub(crate) task_links: AtomicU64,
    pub(crate) peer_links: AtomicU64,
    pub(crate) peer_links_ready: AtomicU64,
    pub(crate) pending: AtomicU64,
    pub(crate) latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub(crate) latency_sum_us: AtomicU64,
    pub(crate) redirects: AtomicU64,
    pub(crate) emergency: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) auth_cache_hits: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_handshake_failures: AtomicU64,
    pub(crate) peer_tls_refused: AtomicU64,
    pub(crate) peer_token_refused: AtomicU64,
    pub(crate) peer_tls_dial_refused: AtomicU64,
    pub(crate) origin_refused: AtomicU64,
    pub(crate) overload_refused: AtomicU64,
    pub(crate) busy_refused: AtomicU64,
    pub(crate) body_held: AtomicU64,
    pub(crate) abusive_closed: AtomicU64,
    /// Client `/api/ws` sessions closed for what the client sent, by [`WS_BAD_INPUT_CODES`].
    pub(crate) ws_bad_input_closed: [AtomicU64; WS_BAD_INPUT_CODES.len()],
    pub(crate) close_timeouts: AtomicU64,
    pub(crate) client_ping_timeouts: AtomicU64,
    pub(crate) slow_messages_closed: AtomicU64,
    pub(crate) ws_reads_paused: AtomicU64,
    pub(crate) links_revoked: AtomicU64,
    pub(crate) outbox_held: AtomicU64,
    pub(crate) slow_reader_closed: AtomicU64,
    pub(crate) idle_evicted: AtomicU64,
    /// Client connections that gave their buffers back after `tuning.idle_buffer_release_ms`.
    pub(crate) idle_buffers_released: AtomicU64,
    /// Client connections closed (api and TLS api listeners), so far.
    pub(crate) api_closed: AtomicU64,
    /// The most client connections open at once on this shard since `shard::trim` last
    /// looked (it resets it); not exported.
    pub(crate) api_open_peak: AtomicU64,
    /// Task links taken out of routing by outlier detection, by `task::link::Ejection`.
    pub(crate) task_ejected: [AtomicU64; 3],
    pub(crate) task_readmitted: AtomicU64,
    pub(crate) peer_ejected: AtomicU64,
    pub(crate) peer_protocol_errors: AtomicU64,
    pub(crate) task_protocol_errors: AtomicU64,
    pub(crate) peer_readmitted: AtomicU64,
    pub(crate) task_links_ejected: AtomicU64,
    /// `renew` messages on task links: accepted, refused.
    pub(crate) task_renewals: [AtomicU64; 2],
    /// `renew` messages on accepted peer links: accepted, refused.
    pub(crate) peer_renewals: [AtomicU64; 2],
    /// Task link handshakes refused after the upgrade began, by
    /// `task::link::LinkRefusal` (the reason label of `fedbus_task_link_refused_total`).
    pub(crate) task_link_refused: [AtomicU64; 4],
    pub(crate) forward_retries: AtomicU64,
    pub(crate) sibling_handoffs: AtomicU64,
    pub(crate) takeover_held: AtomicU64,
}

impl ShardMetrics {
    /// Counts one finished request.
    pub(crate) fn request(&self, status: u16, latency_us: u64, bytes_in: usize, bytes_out: usize) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len() - 1);
        Self::inc(&self.requests[i]);
        Self::add(&self.bytes_in, bytes_in as u64);
        Self::add(&self.bytes_out, bytes_out as u64);
        let b = LATENCY_BUCKETS_US
            .iter()
            .position(|le| latency_us <= *le)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        Self::inc(&self.latency[b]);
        Self::add(&self.latency_sum_us, latency_us);
    }

    /// Adds `n` to a counter of this shard. Only its shard's thread may call it (the one
    /// writer: see the module's documentation).
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Takes `n` from a gauge of this shard; the same one-writer rule as [`ShardMetrics::add`].
    pub(crate) fn sub(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    pub(crate) fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }

    pub(crate) fn dec(c: &AtomicU64) {
        Self::sub(c, 1);
    }
}

/// All shards' metrics, shared with the admin listener.
pub(crate) type Registry = Arc<Vec<Arc<ShardMetrics>>>;

/// Picks one counter out of a shard's metrics.
type Field = fn(&ShardMetrics) -> &AtomicU64;

fn sum(reg: &Registry, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
    reg.iter().map(|m| f(m).load(Relaxed)).sum()
}

/// A gauge's sum over the shards that run (`live[i]`): a dead shard's gauges stay where its
/// thread left them (no task of it runs to take them down), and what it held serves nobody.
/// Its counters still count (a counter never goes back).
fn gauge(reg: &Registry, live: &[bool], f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
    reg.iter()
        .zip(live)
        .filter(|(_, live)| **live)
        .map(|(m, _)| f(m).load(Relaxed))
        .sum()
}

/// Renders Prometheus text format (version 0.0.4). `live[i]`: whether shard `i` runs (see
/// [`gauge`]).
pub(crate) fn render(reg: &Registry, live: &[bool], extra: &str) -> String {
    use std::fmt::Write;
    let mut o = String::with_capacity(4096);
    let _ = writeln!(
        o,
        "# HELP fedbus_requests_total Client requests answered, by HTTP status (0: other)."
    );
    let _ = writeln!(o, "# TYPE fedbus_requests_total counter");
    for (i, s) in STATUSES.iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_requests_total{{status=\"{s}\"}} {}",
            sum(reg, |m| &m.requests[i])
        );
    }
    let simple: [(&str, &str, &str, Field); 34] = [
        (
            "fedbus_bytes_in_total",
            "counter",
            "Request payload bytes received from clients.",
            |m| &m.bytes_in,
        ),
        (
            "fedbus_bytes_out_total",
            "counter",
            "Response payload bytes sent to clients.",
            |m| &m.bytes_out,
        ),
        (
            "fedbus_connections_refused_total",
            "counter",
            "Connections closed at accept: over the per-shard limit.",
            |m| &m.connections_refused,
        ),
        ("fedbus_task_links", "gauge", "Task links open.", |m| {
            &m.task_links
        }),
        (
            "fedbus_peer_links",
            "gauge",
            "Peer router links open.",
            |m| &m.peer_links,
        ),
        (
            "fedbus_peer_links_ready",
            "gauge",
            "Peer router links whose router last said it is ready and not draining (preferred by routing).",
            |m| &m.peer_links_ready,
        ),
        (
            "fedbus_body_bytes_held",
            "gauge",
            "Bytes of client request bodies being received or in flight, charged to limits.body_budget_bytes.",
            |m| &m.body_held,
        ),
        (
            "fedbus_pending_requests",
            "gauge",
            "Requests waiting for a task's answer.",
            |m| &m.pending,
        ),
        (
            "fedbus_redirects_total",
            "counter",
            "Redirect hops taken.",
            |m| &m.redirects,
        ),
        (
            "fedbus_emergency_total",
            "counter",
            "Requests served by an emergency partition.",
            |m| &m.emergency,
        ),
        (
            "fedbus_forwarded_total",
            "counter",
            "Requests sent over peer links (a request sent again to another router of the target cluster after no_live_task counts twice; see fedbus_forward_retries_total).",
            |m| &m.forwarded,
        ),
        (
            "fedbus_auth_cache_hits_total",
            "counter",
            "Client tokens accepted from the per-connection verify cache.",
            |m| &m.auth_cache_hits,
        ),
        (
            "fedbus_tls_handshakes_total",
            "counter",
            "TLS handshakes completed on the api TLS listener and, with listen.internal_tls, the internal listener.",
            |m| &m.tls_handshakes,
        ),
        (
            "fedbus_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed or timed out (plaintext on the TLS port, no common version or cipher, limits.handshake_timeout_ms).",
            |m| &m.tls_handshake_failures,
        ),
        (
            "fedbus_peer_tls_refused_total",
            "counter",
            "Peer links refused on the external listener by [tls.peer]: plaintext, no client certificate or one not from the federation CA, a failed or slow handshake, or a certificate that names no router of the peer token's cluster.",
            |m| &m.peer_tls_refused,
        ),
        (
            "fedbus_peer_token_refused_total",
            "counter",
            "Peer link upgrades refused on the external listener for their peer token: none, unreadable, of a cluster not in [federation], a bad signature, expired, a retired key version, or not a peer token (answered 401 or 403 and closed).",
            |m| &m.peer_token_refused,
        ),
        (
            "fedbus_peer_tls_dial_refused_total",
            "counter",
            "Peer links this router dialed and refused at the TLS handshake: the reached router's certificate is not from the federation CA or not for the dialed name.",
            |m| &m.peer_tls_dial_refused,
        ),
        (
            "fedbus_origin_refused_total",
            "counter",
            "Cross-origin requests and /api/ws upgrades refused by the app's CORS policy (403).",
            |m| &m.origin_refused,
        ),
        (
            "fedbus_overload_refused_total",
            "counter",
            "Requests refused with 503 because their body would go over the router's body budget or its connection's share.",
            |m| &m.overload_refused,
        ),
        (
            "fedbus_busy_refused_total",
            "counter",
            "Requests refused with 503 task_busy or peer_busy: every task link of the partition at limits.max_pending_per_link, or a link's outbox over limits.max_link_outbox_bytes.",
            |m| &m.busy_refused,
        ),
        (
            "fedbus_abusive_closed_total",
            "counter",
            "Websocket connections closed with 1008 for a flood: control frames faster than limits.max_control_frames_per_sec, renews faster than one a second (task and peer links), status messages faster than limits.max_peer_status_per_sec (peer links this router dialed).",
            |m| &m.abusive_closed,
        ),
        (
            "fedbus_close_timeouts_total",
            "counter",
            "Task and peer links dropped because the other side did not answer the router's close frame within limits.handshake_timeout_ms.",
            |m| &m.close_timeouts,
        ),
        (
            "fedbus_client_ping_timeouts_total",
            "counter",
            "Client /api/ws sessions closed (1001) because they answered nothing, not even a ping, within limits.idle_timeout_ms (with limits.client_ping_interval_ms set).",
            |m| &m.client_ping_timeouts,
        ),
        (
            "fedbus_slow_messages_closed_total",
            "counter",
            "Client /api/ws sessions and peer links closed (1008) because a message arriving in pieces was slower than limits.min_body_bytes_per_sec (after limits.handshake_timeout_ms).",
            |m| &m.slow_messages_closed,
        ),
        (
            "fedbus_ws_reads_paused_total",
            "counter",
            "Times a client /api/ws session stopped reading until answers came back: the read buffers its requests in flight keep alive held more than twice their bytes plus two 64 KiB read chunks.",
            |m| &m.ws_reads_paused,
        ),
        (
            "fedbus_links_revoked_total",
            "counter",
            "Links closed with 1008 because their credential no longer verifies: task links and accepted peer links whose token expired or whose token's key version retired (its grace after a rotation ended), accepted peer links that a reload of [federation] no longer admits (their cluster removed, the key of their token gone).",
            |m| &m.links_revoked,
        ),
        (
            "fedbus_outbox_bytes_held",
            "gauge",
            "Bytes of answers queued to be written to client connections, charged to limits.body_budget_bytes.",
            |m| &m.outbox_held,
        ),
        (
            "fedbus_slow_reader_closed_total",
            "counter",
            "Client connections closed for not reading their answers (answers waiting over limits.max_connection_outbox_bytes: websocket 1013, HTTP closed; slower than limits.min_answer_bytes_per_sec: closed).",
            |m| &m.slow_reader_closed,
        ),
        (
            "fedbus_idle_evicted_total",
            "counter",
            "Idle keep-alive client connections closed to make room for a new one at limits.max_connections_per_shard.",
            |m| &m.idle_evicted,
        ),
        (
            "fedbus_idle_buffers_released_total",
            "counter",
            "Times a client connection (HTTP keep-alive or /api/ws session) idle for tuning.idle_buffer_release_ms gave its read and write buffers back; it takes new ones with its next bytes.",
            |m| &m.idle_buffers_released,
        ),
        (
            "fedbus_client_connections_closed_total",
            "counter",
            "Client connections (api and TLS api listeners) closed, for any reason.",
            |m| &m.api_closed,
        ),
        (
            "fedbus_forward_retries_total",
            "counter",
            "Forwarded requests sent again to another router of the destination cluster after the first said it reached no task (no_live_task, draining, not_ready).",
            |m| &m.forward_retries,
        ),
        (
            "fedbus_sibling_handoffs_total",
            "counter",
            "Handoffs of requests to another router of this cluster that has a live task for their partition when this router has none (a request whose first sibling had none after all may be handed to a second one, ejected, as the last resort).",
            |m| &m.sibling_handoffs,
        ),
        (
            "fedbus_takeover_task_waits_total",
            "counter",
            "Requests that found no live task for their partition on a router that took its addresses over and waited for one to link (readiness.takeover_task_wait_ms), served or not.",
            |m| &m.takeover_held,
        ),
    ];
    for (name, kind, help, f) in simple {
        let v = match kind {
            "gauge" => gauge(reg, live, f),
            _ => sum(reg, f),
        };
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_task_ejected_total Task links taken out of routing while open: consecutive request timeouts, an unanswered ping, or the task stopping.\n# TYPE fedbus_task_ejected_total counter"
    );
    for (i, why) in ["timeouts", "pongs", "stopping"].iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_task_ejected_total{{reason=\"{why}\"}} {}",
            sum(reg, |m| &m.task_ejected[i])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_task_readmitted_total Ejected task links back in routing after answering again.\n# TYPE fedbus_task_readmitted_total counter\nfedbus_task_readmitted_total {}",
        sum(reg, |m| &m.task_readmitted)
    );
    let _ = writeln!(
        o,
        "# HELP fedbus_peer_ejected_total Peer links ranked last for their cluster after limits.peer_eject_after_timeouts request timeouts in a row.\n# TYPE fedbus_peer_ejected_total counter\nfedbus_peer_ejected_total {}\n# HELP fedbus_peer_readmitted_total Ejected peer links back in their rank after answering again.\n# TYPE fedbus_peer_readmitted_total counter\nfedbus_peer_readmitted_total {}",
        sum(reg, |m| &m.peer_ejected),
        sum(reg, |m| &m.peer_readmitted)
    );
    let _ = writeln!(
        o,
        "# HELP fedbus_peer_protocol_errors_total What a peer router sent that breaks PROTOCOL.md section 10: a frame other than a Request on an accepted link or other than a Response or Redirect on a dialed one (closed 1002), a Redirect or a status outside 200..599 as an answer (502 bad_peer_answer).\n# TYPE fedbus_peer_protocol_errors_total counter\nfedbus_peer_protocol_errors_total {}",
        sum(reg, |m| &m.peer_protocol_errors)
    );
    let _ = writeln!(
        o,
        "# HELP fedbus_task_protocol_errors_total Frames a registered task sent of a kind tasks do not send (a Request, a SecretPush): ignored, the link serves on (PROTOCOL.md section 6).\n# TYPE fedbus_task_protocol_errors_total counter\nfedbus_task_protocol_errors_total {}",
        sum(reg, |m| &m.task_protocol_errors)
    );
    let _ = writeln!(
        o,
        "# HELP fedbus_ws_bad_input_closed_total Client /api/ws sessions closed for what the client sent, by close code: 1002 a frame or message that breaks RFC 6455 or is no fedbus Request frame, 1003 a text message, 1007 text that is not UTF-8, 1009 a message over its bound.\n# TYPE fedbus_ws_bad_input_closed_total counter"
    );
    for (i, code) in WS_BAD_INPUT_CODES.iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_ws_bad_input_closed_total{{code=\"{code}\"}} {}",
            sum(reg, |m| &m.ws_bad_input_closed[i])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_task_renewals_total Service tokens renewed on open task links (renew messages), by result.\n# TYPE fedbus_task_renewals_total counter"
    );
    for (i, result) in ["accepted", "refused"].iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_task_renewals_total{{result=\"{result}\"}} {}",
            sum(reg, |m| &m.task_renewals[i])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_peer_renewals_total Peer tokens renewed on open peer links this router accepted (renew messages), by result.\n# TYPE fedbus_peer_renewals_total counter"
    );
    for (i, result) in ["accepted", "refused"].iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_peer_renewals_total{{result=\"{result}\"}} {}",
            sum(reg, |m| &m.peer_renewals[i])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_task_link_refused_total Connections on the internal listener closed before a task link registered, by reason: upgrade head or registration not in limits.handshake_timeout_ms (handshake_timeout), registration over its size bound (register_too_big, 1009), registration refused (register_refused, 1008), first message not a registration (no_registration, 1002; 1007 or 1008 for text that is not UTF-8 or a control frame flood). A connection that ends or closes before registering is not counted.\n# TYPE fedbus_task_link_refused_total counter"
    );
    for (i, why) in crate::task::link::LinkRefusal::LABELS.iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_task_link_refused_total{{reason=\"{why}\"}} {}",
            sum(reg, |m| &m.task_link_refused[i])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_task_links_ejected Task links open but out of routing.\n# TYPE fedbus_task_links_ejected gauge\nfedbus_task_links_ejected {}",
        gauge(reg, live, |m| &m.task_links_ejected)
    );
    let _ = writeln!(
        o,
        "# HELP fedbus_link_handshakes_evicted_total Connections on a link listener closed before showing a token: at limits.max_link_connections_per_shard, a newer connection took the slot of the oldest one still in its handshake.\n# TYPE fedbus_link_handshakes_evicted_total counter"
    );
    for l in [Listener::Internal, Listener::External] {
        let _ = writeln!(
            o,
            "fedbus_link_handshakes_evicted_total{{listener=\"{}\"}} {}",
            l.label(),
            sum(reg, |m| &m.handshakes_evicted[l as usize])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_unfinished_evicted_total Client connections closed at limits.max_connections_per_shard for a new one, as the one that had waited the longest: in its TLS handshake (stage tls_handshake), or waiting for a request head (stage request_head: a new connection that had sent nothing, closed quietly, or a head that was arriving, answered 503 too_many_connections).\n# TYPE fedbus_unfinished_evicted_total counter"
    );
    for (i, stage) in ["tls_handshake", "request_head"].iter().enumerate() {
        let _ = writeln!(
            o,
            "fedbus_unfinished_evicted_total{{stage=\"{stage}\"}} {}",
            sum(reg, |m| &m.unfinished_evicted[i])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fedbus_connections Open connections by listener.\n# TYPE fedbus_connections gauge"
    );
    for l in [Listener::Api, Listener::Internal, Listener::External] {
        let _ = writeln!(
            o,
            "fedbus_connections{{listener=\"{}\"}} {}",
            l.label(),
            gauge(reg, live, |m| &m.connections[l as usize])
        );
    }
    let _ = writeln!(o, "# HELP fedbus_request_duration_seconds Time from request parsed to answer ready.\n# TYPE fedbus_request_duration_seconds histogram");
    let mut cum = 0;
    for (i, le) in LATENCY_BUCKETS_US.iter().enumerate() {
        cum += sum(reg, |m| &m.latency[i]);
        let _ = writeln!(
            o,
            "fedbus_request_duration_seconds_bucket{{le=\"{}\"}} {cum}",
            *le as f64 / 1e6
        );
    }
    cum += sum(reg, |m| &m.latency[LATENCY_BUCKETS_US.len()]);
    let _ = writeln!(
        o,
        "fedbus_request_duration_seconds_bucket{{le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        o,
        "fedbus_request_duration_seconds_sum {}",
        sum(reg, |m| &m.latency_sum_us) as f64 / 1e6
    );
    let _ = writeln!(o, "fedbus_request_duration_seconds_count {cum}");
    let _ = writeln!(
        o,
        "# HELP fedbus_shards Shards of this router.\n# TYPE fedbus_shards gauge\nfedbus_shards {}",
        reg.len()
    );
    o.push_str(extra);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_across_shards() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.request(200, 30, 10, 20);
        b.request(200, 3000, 1, 2);
        b.request(503, 1, 0, 0);
        let reg: Registry = Arc::new(vec![a, b]);
        let t = render(&reg, &[true, true], "");
        assert!(t.contains("fedbus_requests_total{status=\"200\"} 2"), "{t}");
        assert!(t.contains("fedbus_requests_total{status=\"503\"} 1"));
        assert!(t.contains("fedbus_bytes_in_total 11"));
        assert!(t.contains("fedbus_request_duration_seconds_count 3"));
        assert!(t.contains("fedbus_request_duration_seconds_bucket{le=\"0.000025\"} 1"));
    }

    #[test]
    fn a_dead_shards_gauges_read_zero_and_its_counters_stay() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        for m in [&a, &b] {
            ShardMetrics::inc(&m.task_links);
            ShardMetrics::inc(&m.connections[0]);
            m.request(200, 30, 10, 20);
        }
        let reg: Registry = Arc::new(vec![a, b]);
        let both = render(&reg, &[true, true], "");
        assert!(both.contains("\nfedbus_task_links 2\n"), "{both}");
        let one = render(&reg, &[true, false], "");
        assert!(one.contains("\nfedbus_task_links 1\n"), "{one}");
        assert!(one.contains("fedbus_connections{listener=\"api\"} 1\n"));
        assert!(one.contains("fedbus_requests_total{status=\"200\"} 2\n"));
    }
}
