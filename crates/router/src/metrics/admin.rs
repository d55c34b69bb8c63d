//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`. Blocking sockets,
//! one short-lived thread per connection (at most `listen.admin_max_connections`), never on the
//! request path. A request head must arrive within [`HEAD_DEADLINE`] of the accept, so a client
//! that trickles bytes holds its thread only that long; and when every slot is busy, a new
//! connection takes the slot of the oldest one still waiting for its head (closed), so idle
//! connections opened faster than the deadline frees them cannot keep a health probe out.

use super::Registry;
use crate::config::Readiness;
use crate::control::Snapshots;
use crate::health::Health;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time from accept to a complete request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);

/// The admin listener of a running router: its address, and a way to stop it
/// ([`AdminListener::close_if_shared`]).
pub(crate) struct AdminListener {
    /// The bound address.
    pub(crate) addr: SocketAddr,
    /// The listening socket (a second descriptor of the one the thread accepts on).
    socket: TcpListener,
    /// Set before the socket is shut down: the accept loop ends on its error.
    closed: Arc<AtomicBool>,
}

impl AdminListener {
    /// Stops taking admin connections when another socket listens on the same address: a
    /// router that took this one's addresses over (`listen.takeover`) answers the probes
    /// from then on, so that they do not see this draining router's 503 and the new one's 200
    /// by turns. A router alone on its address keeps answering while it drains (`/readyz`
    /// 503, `/metrics` to watch the drain). Called at the start of a drain. Connections
    /// already accepted are answered; those waiting in the backlog move to the other
    /// listener with `net.ipv4.tcp_migrate_req = 1` (reset otherwise, as for the other
    /// listeners).
    pub(crate) fn close_if_shared(&self) {
        let own = std::os::fd::AsRawFd::as_raw_fd(&self.socket);
        if !others_listen_on(self.addr, crate::shard::steer::socket_inode(own)) {
            return;
        }
        self.closed.store(true, Ordering::Relaxed);
        // Ends the blocking accept (EINVAL) and takes the socket out of the port's group.
        match socket2::SockRef::from(&self.socket).shutdown(std::net::Shutdown::Both) {
            Ok(()) => {
                tracing::info!(addr = %self.addr, "admin listener closed: another router listens on its address (a takeover) and answers the probes")
            }
            Err(e) => {
                // Still listening: its accept errors (EMFILE...) are retried as before.
                self.closed.store(false, Ordering::Relaxed);
                tracing::warn!(addr = %self.addr, "could not close the admin listener: {e}");
            }
        }
    }
}

/// Whether a listening TCP socket other than inode `own` is bound to `addr` in this network
/// namespace.
fn others_listen_on(addr: SocketAddr, own: u64) -> bool {
    crate::shard::steer::listening_inodes(addr).is_ok_and(|l| l.iter().any(|&ino| ino != own))
}

/// Binds and serves in a background thread.
pub(crate) fn start(
    addr: SocketAddr,
    max_connections: usize,
    takeover: bool,
    reg: Registry,
    snaps: Snapshots,
    health: Arc<Health>,
    readiness: Readiness,
) -> anyhow::Result<AdminListener> {
    let l: TcpListener = crate::shard::listen::shared_listener(addr, takeover)
        .map_err(|e| anyhow::anyhow!("admin listener {addr}: {e}"))?
        .into();
    let bound = l.local_addr()?;
    let closed = Arc::new(AtomicBool::new(false));
    let handle = AdminListener {
        addr: bound,
        socket: l.try_clone()?,
        closed: closed.clone(),
    };
    let active = Arc::new(AtomicUsize::new(0));
    // Connections closed at accept because every slot was busy, and connections closed while
    // waiting for their head to make room for a newer one.
    let refused = Arc::new(AtomicU64::new(0));
    let evicted = Arc::new(AtomicU64::new(0));
    let waiting = Arc::new(Waiting::default());
    std::thread::Builder::new()
        .name("fedbus-admin".into())
        .spawn(move || {
            // At most one log line a second for refusals and accept errors: a flood of
            // either is what they report.
            let mut logged: Option<Instant> = None;
            let mut may_log = move || {
                let now = Instant::now();
                let ok = logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
                if ok {
                    logged = Some(now);
                }
                ok
            };
            loop {
                let s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) if closed.load(Ordering::Relaxed) => return,
                    Err(e) => {
                        // Out of descriptors or memory: the error repeats until some are
                        // free, and retrying at once would spin this thread at a full core.
                        if may_log() {
                            tracing::warn!(error = %e, "admin accept failed; retrying in 50 ms");
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if active.load(Ordering::Relaxed) >= max_connections {
                    // The oldest connection still waiting for its head gives its slot up
                    // (its thread sees its socket shut down and ends).
                    if waiting.evict_oldest() {
                        let n = evicted.fetch_add(1, Ordering::Relaxed) + 1;
                        if may_log() {
                            tracing::warn!(max_connections, evicted = n, "admin connection closed while waiting for its request head: all slots busy, a new connection took its slot (logged at most once a second)");
                        }
                    } else {
                        let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                        if may_log() {
                            tracing::warn!(max_connections, refused = n, "admin connection refused: all slots busy (logged at most once a second)");
                        }
                        continue;
                    }
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (reg, snaps, done) = (reg.clone(), snaps.clone(), active.clone());
                let counts = Counts {
                    refused: refused.clone(),
                    evicted: evicted.clone(),
                };
                let (health, readiness) = (health.clone(), readiness.clone());
                let id = waiting.push(&s);
                let w = waiting.clone();
                let spawned = std::thread::Builder::new()
                    .name("fedbus-admin-conn".into())
                    .spawn(move || {
                        let mut s = s;
                        let _ = serve(&mut s, id, &w, &reg, &snaps, &health, &readiness, &counts);
                        // The slot is free before the client sees the close: one that
                        // connects again at once finds it.
                        w.remove(id);
                        done.fetch_sub(1, Ordering::Relaxed);
                        drop(s);
                    });
                if spawned.is_err() {
                    waiting.remove(id);
                    active.fetch_sub(1, Ordering::Relaxed);
                }
            }
        })?;
    Ok(handle)
}

/// Admin connections refused at accept and closed for a newer one.
struct Counts {
    refused: Arc<AtomicU64>,
    evicted: Arc<AtomicU64>,
}

/// Connections waiting for their request head, oldest first: (id, a handle on the socket).
#[derive(Default)]
struct Waiting {
    conns: Mutex<VecDeque<(u64, Option<TcpStream>)>>,
    next: AtomicU64,
}

impl Waiting {
    /// Registers a connection just accepted; returns its id.
    fn push(&self, s: &TcpStream) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Without a handle (out of descriptors) it cannot be evicted, only time out.
        let mut q = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back((id, s.try_clone().ok()));
        id
    }

    /// The connection has its head (or is done): it can no longer be evicted.
    fn remove(&self, id: u64) {
        let mut q = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        q.retain(|(i, _)| *i != id);
    }

    /// Shuts down the oldest connection still waiting for its head; false if none.
    fn evict_oldest(&self) -> bool {
        let mut q = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((_, handle)) = q.pop_front() {
            if let Some(h) = handle {
                let _ = h.shutdown(std::net::Shutdown::Both);
                return true;
            }
        }
        false
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    s: &mut TcpStream,
    id: u64,
    waiting: &Waiting,
    reg: &Registry,
    snaps: &Snapshots,
    health: &Health,
    readiness: &Readiness,
    counts: &Counts,
) -> std::io::Result<()> {
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        s.set_read_timeout(Some(left))?;
        let r = s.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    waiting.remove(id);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    // The query is ignored (a Prometheus scrape may add `params`); HEAD gets the head alone.
    let (method, path) = match req.parse(&buf[..n]) {
        Ok(_) => (
            req.method.unwrap_or(""),
            req.path.unwrap_or("/").split('?').next().unwrap_or("/"),
        ),
        Err(_) => ("", ""),
    };
    let (status, ctype, body) = match path {
        _ if method.is_empty() => (400, "text/plain", "bad request\n".to_string()),
        _ if method != "GET" && method != "HEAD" => {
            (405, "text/plain", "only GET and HEAD\n".to_string())
        }
        "/metrics" => {
            let table = snaps.routes.load();
            let keys = snaps.keys.load();
            let ready = u8::from(health.readiness(&table, readiness).is_ok());
            let refused = counts.refused.load(Ordering::Relaxed);
            let evicted = counts.evicted.load(Ordering::Relaxed);
            let extra = format!(
                "# HELP fedbus_ready 1 when /readyz answers ready.\n# TYPE fedbus_ready gauge\nfedbus_ready {ready}\n# HELP fedbus_draining 1 once a drain (SIGTERM or SIGINT) started.\n# TYPE fedbus_draining gauge\nfedbus_draining {}\n# HELP fedbus_routing_generation Generation of the published routing snapshot.\n# TYPE fedbus_routing_generation gauge\nfedbus_routing_generation {}\n# HELP fedbus_routing_tasks Task instances in the published routing table: registered, with a live link, not ejected.\n# TYPE fedbus_routing_tasks gauge\nfedbus_routing_tasks {}\n# HELP fedbus_keyring_generation Generation of the published keyring.\n# TYPE fedbus_keyring_generation gauge\nfedbus_keyring_generation {}\n# HELP fedbus_apps_generation Generation of the published [[apps]] (+1 per reload that changed them).\n# TYPE fedbus_apps_generation gauge\nfedbus_apps_generation {}\n# HELP fedbus_federation_generation Generation of the published federation view: peer keys, routers, siblings (+1 per reload that changed it).\n# TYPE fedbus_federation_generation gauge\nfedbus_federation_generation {}\n# HELP fedbus_reloads_total Reload events (SIGHUP) handled: keyring, peer token, config and certificates re-read, each applied or refused.\n# TYPE fedbus_reloads_total counter\nfedbus_reloads_total {}\n# HELP fedbus_config_reload_failed_total Config, keyring or federation key reloads refused (what is in force stays).\n# TYPE fedbus_config_reload_failed_total counter\nfedbus_config_reload_failed_total {}\n# HELP fedbus_shards_alive Shards whose executor runs (a shard that panicked stays dead, and /readyz answers 503).\n# TYPE fedbus_shards_alive gauge\nfedbus_shards_alive {}\n# HELP fedbus_admin_connections_refused_total Admin connections closed at accept: listen.admin_max_connections busy.\n# TYPE fedbus_admin_connections_refused_total counter\nfedbus_admin_connections_refused_total {refused}\n# HELP fedbus_admin_connections_evicted_total Admin connections closed while waiting for their request head: every slot busy, a newer connection took the slot.\n# TYPE fedbus_admin_connections_evicted_total counter\nfedbus_admin_connections_evicted_total {evicted}\n",
                u8::from(health.draining()),
                table.generation,
                table.task_count(),
                keys.generation,
                snaps.apps.load().generation,
                snaps.fed.load().generation,
                snaps.reloads.load(Ordering::Relaxed),
                snaps.reload_failed.load(Ordering::Relaxed),
                health.shards_alive(),
            );
            let live: Vec<bool> = (0..reg.len()).map(|i| health.shard_runs(i)).collect();
            let text = super::render(reg, &live, &extra);
            (200, "text/plain; version=0.0.4", text)
        }
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" => match health.readiness(&snaps.routes.load(), readiness) {
            Ok(()) => (200, "text/plain", "ready\n".to_string()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let allow = if status == 405 {
        "allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{allow}connection: close\r\n\r\n",
        crate::proto::http::reason(status),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return Ok(());
    }
    s.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn reuse_port_listener(addr: SocketAddr) -> TcpListener {
        crate::shard::listen::shared_listener(addr, true)
            .expect("bind")
            .into()
    }

    #[test]
    fn another_listener_on_the_address_is_seen_in_proc_net_tcp() {
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(first) = std::panic::catch_unwind(|| reuse_port_listener(any.parse().unwrap()))
            else {
                continue; // no IPv6 loopback here
            };
            let addr = first.local_addr().unwrap();
            let own = crate::shard::steer::socket_inode(first.as_raw_fd());
            assert_ne!(own, 0);
            assert!(
                !others_listen_on(addr, own),
                "{addr}: alone, yet another seen"
            );
            let second = reuse_port_listener(addr);
            assert!(
                others_listen_on(addr, own),
                "{addr}: the second listener unseen"
            );
            // The second sees the first, and a listener on another port is not counted.
            assert!(others_listen_on(
                addr,
                crate::shard::steer::socket_inode(second.as_raw_fd())
            ));
            drop(second);
            let elsewhere = reuse_port_listener(SocketAddr::new(addr.ip(), 0));
            assert!(
                !others_listen_on(addr, own),
                "{addr}: {elsewhere:?} counted"
            );
        }
    }
}
