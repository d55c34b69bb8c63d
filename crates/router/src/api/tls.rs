//! HTTPS and `wss://` ingress on `listen.api_tls`: the TLS handshake runs on the shard that
//! accepted the connection, bounded by `limits.handshake_timeout_ms`; then the same HTTP/1.1
//! and `/api/ws` code as plaintext runs over the TLS stream (generic over
//! [`crate::ws::Stream`], so the plaintext path is unchanged). A failed handshake is a log
//! line and `fedbus_tls_handshake_failures_total`, never a panic; a plain HTTP request gets
//! `400 tls_required` first ([`crate::tls::accept`]).

use super::http::{serve_stream, OpenConn};
use crate::metrics::{Listener, ShardMetrics};
use crate::shard::Shard;
use glommio::net::TcpStream;
use std::rc::Rc;
use std::time::Duration;

/// Serves one connection accepted on the TLS api listener until it closes.
pub(crate) async fn serve(shard: Rc<Shard>, tcp: TcpStream) {
    // Counted from accept: a connection mid-handshake holds memory like any other.
    let _open = OpenConn::new(&shard);
    let accepted = std::time::Instant::now();
    let Some(acceptor) = shard.tls.clone() else {
        return;
    };
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let limit = Duration::from_millis(shard.cfg.limits.handshake_timeout_ms);
    let m = &shard.metrics;
    // At the connection limit, a handshake under way may be closed for a new connection
    // (`Shard::evict_for_room`).
    let hs = shard.handshake(Listener::Api);
    let handshake = hs
        .step(crate::tls::accept(&acceptor, tcp, limit, PLAIN_HTTP_HINT))
        .await;
    match handshake {
        // Closed for room (counted and logged where it was chosen).
        Err(_) => {}
        Ok(Ok(tls)) => {
            ShardMetrics::inc(&m.tls_handshakes);
            if hs.proven().is_ok() {
                serve_stream(&shard, tls, accepted).await;
            }
        }
        Ok(Err(e)) => {
            ShardMetrics::inc(&m.tls_handshake_failures);
            if let Some(suppressed) = shard.log_gates.tls_failed.pass() {
                tracing::info!(
                    shard = shard.index,
                    ?peer,
                    suppressed,
                    "TLS handshake failed: {e}"
                );
            }
        }
    }
}

/// The message of the `400 tls_required` a plain HTTP request on `listen.api_tls` gets.
const PLAIN_HTTP_HINT: &str = "this port speaks TLS: use https:// or wss://";
