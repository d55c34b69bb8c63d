//! HTTPS and `wss://` ingress on `listen.api_tls`: the TLS handshake runs on the shard that
//! accepted the connection, bounded by `limits.handshake_timeout_ms`; then the same HTTP/1.1
//! and `/api/ws` code as plaintext runs over the TLS stream (generic over
//! [`crate::ws::Stream`], so the plaintext path is unchanged). A failed handshake is a log
//! line and `fedbus_tls_handshake_failures_total`, never a panic.

use super::http::{serve_stream, OpenConn};
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use glommio::net::TcpStream;
use std::rc::Rc;
use std::time::Duration;

/// Serves one connection accepted on the TLS api listener until it closes.
pub(crate) async fn serve(shard: Rc<Shard>, tcp: TcpStream) {
    // Counted from accept: a connection mid-handshake holds memory like any other.
    let _open = OpenConn::new(&shard);
    let Some(acceptor) = shard.tls.clone() else {
        return;
    };
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let limit = Duration::from_millis(shard.cfg.limits.handshake_timeout_ms);
    let m = &shard.metrics;
    match glommio::timer::timeout(limit, async { Ok(acceptor.accept(tcp).await) }).await {
        Ok(Ok(tls)) => {
            ShardMetrics::inc(&m.tls_handshakes);
            serve_stream(&shard, tls).await;
        }
        Ok(Err(e)) => {
            ShardMetrics::inc(&m.tls_handshake_failures);
            tracing::info!(shard = shard.index, ?peer, "TLS handshake failed: {e}");
        }
        Err(_) => {
            ShardMetrics::inc(&m.tls_handshake_failures);
            tracing::info!(
                shard = shard.index,
                ?peer,
                "TLS handshake not complete within limits.handshake_timeout_ms"
            );
        }
    }
}
