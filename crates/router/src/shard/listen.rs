//! Starting a router: bind the listeners on the main thread (so port 0 resolves before any
//! shard starts and every shard shares the api port through SO_REUSEPORT), start one pinned
//! executor per shard with a readiness report, the control thread and the admin listener.

use super::{Room, Shard};
use crate::config::Config;
use crate::control::{Control, ControlEvent};
use crate::health::Health;
use crate::metrics::{Listener, Registry, ShardMetrics};
use crate::{api, task};
use anyhow::{anyhow, bail, Context};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::os::unix::io::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running router.
pub struct Running {
    /// Bound api listener (clients).
    pub api: SocketAddr,
    /// Bound TLS api listener (HTTPS, `wss://`), when `listen.api_tls` is set.
    pub api_tls: Option<SocketAddr>,
    /// Bound external listener (peer routers), when the federation has other clusters.
    pub external: Option<SocketAddr>,
    /// Internal listener of each shard (task links), by shard index.
    pub internal: Vec<SocketAddr>,
    /// Unix task-link listener of each shard (`listen.internal_unix`), by shard index; empty
    /// without one.
    pub internal_unix: Vec<std::path::PathBuf>,
    /// Those paths with the file each named once bound: removed by [`Running::drain`].
    unix_files: Vec<(std::path::PathBuf, (u64, u64))>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`), when enabled.
    pub admin: Option<SocketAddr>,
    /// That listener, closed by [`Running::drain`] when a router that took over listens
    /// beside it.
    admin_listener: Option<crate::metrics::admin::AdminListener>,
    /// The api and TLS api listening sockets of every shard, by address: [`Running::drain`]
    /// steers new clients away from them when a router that took over listens beside them,
    /// then shuts them down (`steer`).
    client_listeners: Vec<super::steer::Group>,
    /// Core of each shard, by shard index.
    pub shard_cores: Vec<usize>,
    /// Events to the control thread (`Reload` on SIGHUP).
    pub events: crossbeam_channel::Sender<ControlEvent>,
    /// The index of each shard whose executor ended, once its listeners are shut and it is
    /// marked dead (`readiness.exit_on_dead_shard` is the caller's to apply).
    pub dead_shards: crossbeam_channel::Receiver<usize>,
    control: std::thread::JoinHandle<()>,
    health: Arc<Health>,
    metrics: Registry,
}

fn listen_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s)
}

/// How long [`probe`] keeps trying an address that is in use. A router killed with SIGKILL
/// holds its listening sockets for a few milliseconds after it has been reaped (the kernel
/// tears its io_uring down later, in a work queue; 5-10 ms measured here), so a restart
/// straight after a crash found its own old address taken (`kill -9` then `fedbus run`: 20
/// failures in 20). nginx retries a bind in the same way (5 tries, 500 ms apart).
pub(crate) const PROBE_RETRY: Duration = Duration::from_secs(1);

/// Fails when `addr` is taken, after trying for [`PROBE_RETRY`]. Every listener is bound with
/// SO_REUSEPORT (so that a new router can take the addresses over, `listen.takeover`); a bind
/// without it first makes a second router on the same address fail with "address in use"
/// instead of silently sharing it. Skipped for port 0 and when taking over.
pub(crate) fn probe(addr: SocketAddr, takeover: bool) -> std::io::Result<()> {
    if addr.port() == 0 || takeover {
        return Ok(());
    }
    let start = Instant::now();
    loop {
        match listen_socket(addr, false) {
            Ok(s) => {
                drop(s);
                return Ok(());
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < PROBE_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A listening socket on `addr` shared through SO_REUSEPORT, after [`probe`].
pub(crate) fn shared_listener(addr: SocketAddr, takeover: bool) -> std::io::Result<Socket> {
    probe(addr, takeover)?;
    listen_socket(addr, true)
}

fn local(s: &Socket) -> std::io::Result<SocketAddr> {
    s.local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet socket"))
}

/// Binds `n` api sockets sharing one port (see [`probe`]).
fn bind_api(
    addr: SocketAddr,
    n: usize,
    takeover: bool,
) -> anyhow::Result<(SocketAddr, Vec<RawFd>)> {
    let first = shared_listener(addr, takeover).with_context(|| format!("api listener {addr}"))?;
    let actual = local(&first)?;
    let mut fds = vec![first.into_raw_fd()];
    for _ in 1..n {
        fds.push(listen_socket(actual, true)?.into_raw_fd());
    }
    Ok((actual, fds))
}

/// Binds shard k's internal listener on port + k (or any port when 0).
fn bind_internal(
    addr: SocketAddr,
    n: usize,
    takeover: bool,
) -> anyhow::Result<(Vec<SocketAddr>, Vec<RawFd>)> {
    let mut addrs = Vec::new();
    let mut fds = Vec::new();
    for k in 0..n {
        let mut a = addr;
        if a.port() != 0 {
            let p = a.port() as usize + k;
            a.set_port(u16::try_from(p).map_err(|_| anyhow!("internal port {p} out of range"))?);
        }
        let s = shared_listener(a, takeover)
            .with_context(|| format!("internal listener of shard {k} on {a}"))?;
        addrs.push(local(&s)?);
        fds.push(s.into_raw_fd());
    }
    Ok((addrs, fds))
}

/// The unix socket files a start bound, until every shard of this router is ready: the ones
/// bound on their paths (`fresh`) and the ones a takeover bound beside a running router's
/// (`<path>.<pid>.new`), to be renamed over its paths (`renames`). [`UnixBinds::commit`]
/// renames once every shard is ready; a start that fails before drops them instead, which
/// removes every file it bound and leaves the running router's paths as they were.
#[derive(Default)]
struct UnixBinds {
    fresh: Vec<std::path::PathBuf>,
    renames: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    /// Each shard's path and the file bound for it, read right after the bind (a rename keeps
    /// the file), for [`remove_unix_files`].
    files: Vec<(std::path::PathBuf, (u64, u64))>,
}

impl UnixBinds {
    /// Renames each new socket over its path (`rename(2)` is atomic: a task dialing the path
    /// reaches one router or the other, never nothing).
    /// A rename that fails leaves it and the ones after it to `Drop`, which removes them
    /// (and the fresh ones).
    fn commit(mut self) -> anyhow::Result<Vec<(std::path::PathBuf, (u64, u64))>> {
        while let Some((from, to)) = self.renames.first() {
            std::fs::rename(from, to).with_context(|| format!("takeover of {}", to.display()))?;
            self.renames.remove(0);
        }
        self.fresh.clear();
        Ok(std::mem::take(&mut self.files))
    }
}

impl Drop for UnixBinds {
    fn drop(&mut self) {
        for f in self
            .fresh
            .iter()
            .chain(self.renames.iter().map(|(from, _)| from))
        {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Which file a unix socket path names (device and inode), to tell this router's socket file
/// from one a router that took over renamed onto the same path.
fn file_id(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes this router's unix socket files as it stops, as nginx removes its unix listeners':
/// a path that names another file now (a router that took over renamed its own onto it) is
/// left alone. A takeover that renames onto the path between the check and the removal would
/// lose its file: a window of one system call, at the start of this router's drain.
fn remove_unix_files(files: &[(std::path::PathBuf, (u64, u64))]) {
    for (p, id) in files {
        if file_id(p) == Some(*id) {
            match std::fs::remove_file(p) {
                Ok(()) => tracing::info!(path = %p.display(), "unix task-link socket removed"),
                Err(e) => {
                    tracing::warn!(path = %p.display(), "could not remove the unix task-link socket: {e}")
                }
            }
        }
    }
}

/// Binds shard k's unix internal listener (`listen.internal_unix`): shard 0 on `path`, shard k
/// on `<path>.<k>`. A socket file nobody listens on (left by a router that is gone) is
/// replaced. One a running router listens on fails the start, or with `takeover` is replaced
/// atomically once this router is ready ([`UnixBinds`]): the new socket is bound beside it
/// and renamed over it, so a task that dials the path from then on reaches the new router while
/// the old one keeps its links.
fn bind_internal_unix(
    path: &std::path::Path,
    n: usize,
    takeover: bool,
) -> anyhow::Result<(Vec<std::path::PathBuf>, Vec<RawFd>, UnixBinds)> {
    let mut paths = Vec::new();
    let mut fds = Vec::new();
    let mut binds = UnixBinds::default();
    for k in 0..n {
        let p = unix_path(path, k);
        let live = unix_listened(&p, takeover);
        if live && !takeover {
            bail!(
                "internal unix listener of shard {k}: {} is in use by a running router (use takeover to replace it)",
                p.display()
            );
        }
        let bind_at = if live {
            let mut t = p.clone().into_os_string();
            t.push(format!(".{}.new", std::process::id()));
            std::path::PathBuf::from(t)
        } else {
            p.clone()
        };
        // A stale socket file (or the leftover of a takeover that failed) is ours to replace.
        if let Ok(m) = std::fs::symlink_metadata(&bind_at) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                bail!(
                    "internal unix listener of shard {k}: {} exists and is not a socket",
                    bind_at.display()
                );
            }
            std::fs::remove_file(&bind_at)
                .with_context(|| format!("removing the stale socket {}", bind_at.display()))?;
        }
        let l = std::os::unix::net::UnixListener::bind(&bind_at).with_context(|| {
            format!(
                "internal unix listener of shard {k} on {}",
                bind_at.display()
            )
        })?;
        if let Some(id) = file_id(&bind_at) {
            binds.files.push((p.clone(), id));
        }
        if live {
            binds.renames.push((bind_at, p.clone()));
        } else {
            binds.fresh.push(p.clone());
        }
        paths.push(p);
        fds.push(l.into_raw_fd());
    }
    Ok((paths, fds, binds))
}

/// Whether a router listens on the unix socket `p`. A router killed with SIGKILL keeps its
/// listening sockets for a few milliseconds after it is reaped (see [`PROBE_RETRY`]), and a
/// connect to one still succeeds: so, as [`probe`] does for TCP, a connect that succeeds is
/// tried again for up to [`PROBE_RETRY`] (not when taking over: a live router is expected)
/// before the socket counts as listened on.
fn unix_listened(p: &std::path::Path, takeover: bool) -> bool {
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(p).is_err() {
            return false;
        }
        if takeover || start.elapsed() >= PROBE_RETRY {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The unix socket path of shard `k` for `listen.internal_unix = path`, absolute: a relative
/// `path` is resolved against the router's working directory, so the ready line and the hello
/// name paths a task started elsewhere can dial.
pub(crate) fn unix_path(path: &std::path::Path, k: usize) -> std::path::PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if k == 0 {
        return path;
    }
    let mut p = path.into_os_string();
    p.push(format!(".{k}"));
    p.into()
}

/// Serves one accepted connection.
type ServeFn<C> = fn(Rc<Shard>, C) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// A listening socket a shard accepts on: TCP (every listener) or unix (task links).
trait Acceptor: FromRawFd {
    /// An accepted connection.
    type Conn;
    /// A TCP listener in an SO_REUSEPORT group hands its backlog to the rest of the group
    /// when shut down (see [`accept_loop`]); a unix listener has no group, so a draining
    /// shard just closes it (a task that had connected but was not accepted yet dials again).
    const SHUT_DOWN_ON_DRAIN: bool;
    fn accept(&self) -> impl std::future::Future<Output = glommio::Result<Self::Conn, ()>>;
}

impl Acceptor for TcpListener {
    type Conn = glommio::net::TcpStream;
    const SHUT_DOWN_ON_DRAIN: bool = true;
    fn accept(&self) -> impl std::future::Future<Output = glommio::Result<Self::Conn, ()>> {
        TcpListener::accept(self)
    }
}

impl Acceptor for glommio::net::UnixListener {
    type Conn = glommio::net::UnixStream;
    const SHUT_DOWN_ON_DRAIN: bool = false;
    fn accept(&self) -> impl std::future::Future<Output = glommio::Result<Self::Conn, ()>> {
        glommio::net::UnixListener::accept(self)
    }
}

/// Accepts on `l` until the shard drains. A drain does not drop the accept in flight: glommio
/// cancels a dropped io_uring accept, and one that the kernel completed meanwhile leaves an
/// accepted connection nobody owns, reset when the process exits (a takeover lost a request
/// that way). Instead the listening socket is shut down, which moves its backlog to the rest
/// of its SO_REUSEPORT group (`net.ipv4.tcp_migrate_req`, see `tune`) and makes the accept
/// in flight end: with a connection it got before, served like any other, or with an error.
async fn accept_loop<L: Acceptor>(
    shard: Rc<Shard>,
    fd: RawFd,
    serve: ServeFn<L::Conn>,
    kind: Listener,
) {
    // SAFETY: `start` hands each listening socket it bound to exactly one accept loop, which
    // owns it from here on.
    let l = unsafe { L::from_raw_fd(fd) };
    let mut draining = false;
    let mut steered = false;
    loop {
        let accepted = if draining {
            l.accept().await
        } else {
            let mut accept = std::pin::pin!(l.accept());
            let next = futures_lite::future::or(async { Some((&mut accept).await) }, async {
                // Fails (wakes) once the shard sees a drain.
                let _ = shard.drain.acquire(1).await;
                None
            })
            .await;
            match next {
                Some(a) => a,
                None => {
                    draining = true;
                    // New clients are steered to a router that took the address over: the
                    // drain shuts this listener down once those already on their way are in
                    // (`steer`); until then they are accepted and served.
                    steered = kind == Listener::Api && shard.health.clients_steered();
                    if !steered
                        && (!L::SHUT_DOWN_ON_DRAIN || !stop_accepting(fd, shard.index, kind))
                    {
                        // Still listening: waiting for the accept would keep taking clients
                        // through the drain. Drop it (and close the listener) instead.
                        return;
                    }
                    accept.await
                }
            }
        };
        // A steered listener ends when the drain shuts it down; an accept error before that
        // (a client gone before it was accepted, EMFILE) is handled as ever.
        if draining && accepted.is_err() && !(steered && super::steer::is_listening(fd)) {
            tracing::info!(shard = shard.index, listener = ?kind, "draining: listener closed");
            return;
        }
        match accepted {
            Ok(s) => {
                if !room_for(&shard, kind).await {
                    if let Some(suppressed) = shard.log_gates.connection_refused.pass() {
                        tracing::warn!(shard = shard.index, listener = ?kind, suppressed, "connection refused: listener at its per-shard limit");
                    }
                    ShardMetrics::inc(&shard.metrics.connections_refused);
                    drop(s);
                    continue;
                }
                glommio::spawn_local(serve(shard.clone(), s)).detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = shard.index, "accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The longest an accept loop waits for connections closed for room to end ([`room_for`]):
/// most close at their next turn; one whose request raced the eviction in whole is answered
/// first, which may take up to `limits.request_timeout_ms`, so the wait is short, and looks
/// again every [`ROOM_LOOK`] (a connection that ended meanwhile makes room too).
const ROOM_WAIT: Duration = Duration::from_millis(100);
const ROOM_LOOK: Duration = Duration::from_millis(10);

/// Whether a connection just accepted on `kind` may be served: its listener is under its
/// per-shard limit, or another connection was closed to make room for it. At the client limit
/// the connection that has waited the longest for a request makes room (`Shard::evict_for_room`);
/// otherwise idle connections, or connections that trickle a head, could lock every new client
/// out. At a link listener's, a connection that has not shown a token yet does (`unproven`);
/// otherwise anyone who can connect could lock new links out.
///
/// While the connection to close is held back by the bound on closes under way
/// ([`Room::Blocked`]: `MAX_PENDING_EVICTIONS`, `unproven::MAX_PENDING`), this waits for one of
/// them to end, up to [`ROOM_WAIT`], instead of refusing: a burst of connections at the limit
/// is then taken at the pace the closes end (the rest wait in the listen backlog), not refused
/// while the closes are under way.
async fn room_for(shard: &Shard, kind: Listener) -> bool {
    let limits = &shard.cfg.limits;
    let mut until = None;
    loop {
        // Every serve function counts its connection before its first await, so a connection
        // spawned earlier is counted before this one's turn.
        let full = match kind {
            Listener::Api => shard.client_conns.get() >= limits.max_connections_per_shard,
            // The gauge counts this shard's connections on that listener.
            other => {
                shard.metrics.connections[other as usize].load(Ordering::Relaxed) as usize
                    >= limits.max_link_connections_per_shard
            }
        };
        if !full {
            return true;
        }
        let room = match kind {
            Listener::Api => shard.evict_for_room(),
            link => shard.evict_handshake(link),
        };
        match room {
            Room::Made => return true,
            Room::None => return false,
            Room::Blocked => {}
        }
        let now = std::time::Instant::now();
        let until = *until.get_or_insert(now + ROOM_WAIT);
        if now >= until {
            return false;
        }
        let look = (until - now).min(ROOM_LOOK);
        let _ = glommio::timer::timeout(look, async {
            shard.room_freed().await;
            Ok(())
        })
        .await;
    }
}

/// Takes a listening socket out of the kernel's tables without closing its descriptor (see
/// [`accept_loop`]); false (with a warning) when `shutdown(2)` fails.
fn stop_accepting(fd: RawFd, shard: usize, kind: Listener) -> bool {
    // SAFETY: borrowed for this call only; the accept loop's listener owns the descriptor and
    // outlives the borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(shard, listener = ?kind, "draining: could not shut the listener down: {e}");
            false
        }
    }
}

/// A router taking over another's listeners (`listen.takeover`) waits, before it accepts
/// clients, until its links to every peer router and sibling are up with their statuses, or
/// `readiness.takeover_wait_ms`: a request it accepted earlier could find no way to its
/// cluster's tasks (they are still linked to the old router) or to another cluster.
async fn takeover_wait(shard: &Rc<Shard>) {
    let start = Instant::now();
    let limit = Duration::from_millis(shard.cfg.readiness.takeover_wait_ms);
    while !shard.peers.borrow().all_known() {
        if start.elapsed() >= limit {
            tracing::warn!(
                shard = shard.index,
                "takeover: not every peer link is up after readiness.takeover_wait_ms; accepting clients anyway"
            );
            return;
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    tracing::info!(
        shard = shard.index,
        waited_ms = start.elapsed().as_millis() as u64,
        "takeover: peer links up; accepting clients"
    );
}

/// Starts the router described by `cfg` with `keyring` already loaded.
pub fn start(cfg: Config, keyring: crate::auth::Keyring) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let cores = cfg.shard_cores();
    let n = cores.len();
    let takeover = cfg.listen.takeover;
    let (api_addr, api_fds) = bind_api(cfg.listen.api, n, takeover)?;
    let mut client_listeners = vec![super::steer::Group::bound(api_addr, api_fds.clone())];
    let (internal, internal_fds) = bind_internal(cfg.listen.internal, n, takeover)?;
    let (internal_unix, unix_fds, unix_binds) = match &cfg.listen.internal_unix {
        Some(p) => {
            let (paths, fds, binds) = bind_internal_unix(p, n, takeover)?;
            (paths, fds.into_iter().map(Some).collect(), binds)
        }
        None => (Vec::new(), vec![None; n], UnixBinds::default()),
    };
    // Certificates are read before anything starts: a bad file is an error at start. The
    // api TLS listener and TLS task links share one server config.
    let mut reloaders = Vec::new();
    let tls_config = if cfg.listen.api_tls.is_some() || cfg.listen.internal_tls {
        let t = crate::tls::ServerTls::load(&cfg.tls).context("[tls]")?;
        reloaders.push(t.reloader);
        Some(t.config)
    } else {
        None
    };
    let (api_tls, tls_fds) = match cfg.listen.api_tls {
        Some(addr) => {
            let (a, fds) = bind_api(addr, n, takeover).context("TLS api listener")?;
            client_listeners.push(super::steer::Group::bound(a, fds.clone()));
            (Some(a), fds.into_iter().map(Some).collect())
        }
        None => (None, vec![None; n]),
    };
    let internal = Arc::new(internal);
    let mut federation = crate::peer::Federation::load(&cfg, crate::peer::peer_token(&cfg)?)?;
    if let Some(p) = &cfg.tls.peer {
        let (t, r) = crate::tls::peer::PeerTls::load(p).context("[tls.peer]")?;
        federation.tls = Some(t);
        reloaders.push(r);
    }
    let federation = Arc::new(federation);
    // The external listener (peer links) only when there are other routers to talk to.
    let (external, external_fds) = if !federation.routers.is_empty()
        || !federation.siblings.is_empty()
    {
        let (a, fds) = bind_api(cfg.listen.external, n, takeover).context("external listener")?;
        (Some(a), fds.into_iter().map(Some).collect())
    } else {
        (None, vec![None; n])
    };

    let health = Arc::new(Health::new(n, federation.routers.keys().cloned().collect()));
    let control = Control::new(cfg.clone(), keyring, reloaders)
        .with_peer_token(federation.token.clone())
        .with_health(health.clone());
    let snapshots = control.snapshots();
    let (tx, rx) = crossbeam_channel::unbounded();
    let control_core = cfg.tuning.control_core;
    let pin = cfg.tuning.pin;
    let control = std::thread::Builder::new()
        .name("fedbus-control".into())
        .spawn(move || {
            if pin {
                pin_current_thread(control_core);
            }
            control.run(rx)
        })?;

    let metrics: Registry = Arc::new((0..n).map(|_| Arc::new(ShardMetrics::default())).collect());
    super::trim::spawn(
        metrics.clone(),
        Duration::from_millis(cfg.tuning.memory_trim_ms),
    )?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let mut handles = Vec::new();
    for (i, core) in cores.iter().copied().enumerate() {
        let placement = if cfg.tuning.pin {
            Placement::Fixed(core)
        } else {
            Placement::Unbound
        };
        let mut b = LocalExecutorBuilder::new(placement)
            .name(&format!("fedbus-shard-{i}"))
            .io_memory(cfg.tuning.io_memory);
        if cfg.tuning.spin_before_park_us > 0 {
            b = b.spin_before_park(Duration::from_micros(cfg.tuning.spin_before_park_us));
        }
        let (cfg2, snaps, tx2, m, int2, rtx) = (
            cfg.clone(),
            snapshots.clone(),
            tx.clone(),
            metrics[i].clone(),
            internal.clone(),
            ready_tx.clone(),
        );
        let (afd, ifd, efd, tfd) = (api_fds[i], internal_fds[i], external_fds[i], tls_fds[i]);
        let ufd = unix_fds[i];
        let fed = federation.clone();
        let health = health.clone();
        let acceptor = tls_config.clone();
        let h = b
            .spawn(move || async move {
                let _alive = health.shard_alive(i);
                let shard = Rc::new(Shard::new(
                    i, n, cfg2, snaps, tx2, m, int2, fed, acceptor, health,
                ));
                glommio::spawn_local(super::watch_drain(shard.clone())).detach();
                // The fds were bound and listening on the main thread and are owned by this
                // shard's accept loops from here on. Only once this shard's thread has ended
                // does the watcher thread borrow them (never closing them) to stop them
                // listening.
                let ext = efd.map(|fd| {
                    glommio::spawn_local(accept_loop::<TcpListener>(
                        shard.clone(),
                        fd,
                        |s, c| Box::pin(crate::peer::serve(s, c)),
                        Listener::External,
                    ))
                });
                crate::peer::start_dialers(&shard);
                glommio::spawn_local(super::sweep_deadlines(shard.clone())).detach();
                if shard.cfg.listen.takeover {
                    // Clients queue on the new listeners meanwhile (the old router still
                    // serves its own): accept them once they can be routed everywhere.
                    takeover_wait(&shard).await;
                    let wait = shard.cfg.readiness.takeover_task_wait_ms;
                    if wait > 0 {
                        shard.task_wait_until.set(Some(
                            std::time::Instant::now() + Duration::from_millis(wait),
                        ));
                        glommio::spawn_local(crate::routing::local::wake_task_waiters(
                            shard.clone(),
                        ))
                        .detach();
                    }
                }
                let tls_l = tfd.map(|fd| {
                    glommio::spawn_local(accept_loop::<TcpListener>(
                        shard.clone(),
                        fd,
                        |s, c| Box::pin(api::tls::serve(s, c)),
                        Listener::Api,
                    ))
                });
                let _ = rtx.send(Ok(i));
                // Test builds only (the `fault-injection` feature): see `crate::fault`.
                #[cfg(feature = "fault-injection")]
                crate::fault::arm(i);
                let a = glommio::spawn_local(accept_loop::<TcpListener>(
                    shard.clone(),
                    afd,
                    |s, c| Box::pin(api::http::serve(s, c)),
                    Listener::Api,
                ));
                let t = glommio::spawn_local(accept_loop::<TcpListener>(
                    shard.clone(),
                    ifd,
                    |s, c| Box::pin(task::link::serve(s, c)),
                    Listener::Internal,
                ));
                let u = ufd.map(|fd| {
                    glommio::spawn_local(accept_loop::<glommio::net::UnixListener>(
                        shard.clone(),
                        fd,
                        |s, c| Box::pin(task::link::serve_unix(s, c)),
                        Listener::Internal,
                    ))
                });
                // The task listeners first: once they are closed, a task told to link again
                // reaches the router that took the address over, or none.
                t.await;
                if let Some(u) = u {
                    u.await;
                }
                task::link::tell_router_draining(&shard);
                crate::routing::local::end_task_wait(&shard);
                a.await;
                if let Some(e) = ext {
                    e.await;
                }
                if let Some(t) = tls_l {
                    t.await;
                }
                // The listeners closed for a drain: the shard goes on serving what it has until
                // the process exits (an executor whose main future ends drops all its tasks).
                std::future::pending::<()>().await
            })
            .map_err(|e| anyhow!("shard {i} on core {core}: {e}"))?;
        handles.push(h);
    }
    drop(ready_tx);
    let mut up = vec![false; n];
    // A shard reports ready after its takeover wait: give it that long beyond the 10 s, or a
    // live shard still waiting is taken for a failed one (and joined: forever).
    let patience = Duration::from_secs(10)
        + if takeover {
            Duration::from_millis(cfg.readiness.takeover_wait_ms)
        } else {
            Duration::ZERO
        };
    while up.iter().any(|u| !u) {
        match ready_rx.recv_timeout(patience) {
            Ok(Ok(i)) => up[i] = true,
            Ok(Err(e)) => bail!(e),
            Err(_) => {
                // glommio reports a failed executor late: its closure is dropped and the
                // error comes from join(), which returns at once for a dead executor.
                let i = up.iter().position(|u| !u).unwrap_or(0);
                let h = handles.swap_remove(i);
                let why = match h.join() {
                    Err(e) => e.to_string(),
                    Ok(()) => "stopped before it was ready".into(),
                };
                bail!(
                    "shard {i} on core {} failed to start: {why}; run `fedbus tune`",
                    cores[i]
                );
            }
        }
    }
    // Every shard is up: a takeover's unix sockets replace the running router's now.
    let unix_files = unix_binds.commit()?;
    // Shard executors run until the process exits. A watcher thread joins each one: a shard
    // whose executor ends (a panic in any of its tasks ends the thread) is marked dead there.
    // The `ShardAlive` guard of the shard's main future is not enough: a panicking executor
    // may leak its tasks, and the main future with them, so the guard is never dropped.
    // Its listeners then stop taking connections (`stop_listening`).
    let (dead_tx, dead_shards) = crossbeam_channel::unbounded();
    for (i, h) in handles.into_iter().enumerate() {
        let (health, dead_tx) = (health.clone(), dead_tx.clone());
        let mut listeners = vec![(api_fds[i], api_addr), (internal_fds[i], internal[i])];
        listeners.extend(tls_fds[i].zip(api_tls));
        listeners.extend(external_fds[i].zip(external));
        let unix_fd = unix_fds[i];
        std::thread::Builder::new()
            .name(format!("fedbus-watch-{i}"))
            .spawn(move || {
                let end = h.join();
                // Listeners first: once /readyz says the shard is dead, no new connection
                // may still land in its backlog.
                for (fd, addr) in listeners {
                    stop_listening(i, fd, addr);
                }
                if let Some(fd) = unix_fd {
                    stop_listening_unix(i, fd);
                }
                health.shard_ended(i, end.err().map(|e| e.to_string()));
                let _ = dead_tx.send(i);
            })?;
    }

    let admin = if cfg.listen.admin_enabled {
        Some(crate::metrics::admin::start(
            cfg.listen.admin,
            cfg.listen.admin_max_connections,
            takeover,
            metrics.clone(),
            snapshots.clone(),
            health.clone(),
            cfg.readiness.clone(),
        )?)
    } else {
        None
    };
    Ok(Running {
        client_listeners,
        admin: admin.as_ref().map(|a| a.addr),
        admin_listener: admin,
        api: api_addr,
        api_tls,
        external,
        internal: internal.to_vec(),
        internal_unix,
        unix_files,
        shard_cores: cores,
        events: tx,
        dead_shards,
        control,
        health,
        metrics,
    })
}

impl Running {
    /// Drains the router (SIGTERM): `/readyz` turns 503, the listeners close (a router that
    /// took them over gets every new connection; new clients are steered to it first and the
    /// api listeners closed [`super::steer::SETTLE`] later), peer routers are told (they send nothing new
    /// and close their links once nothing is pending on them), client connections are closed
    /// as they finish (`Connection: close` on the next answer, idle ones after
    /// `readiness.drain_idle_close_ms`, `/api/ws` sessions with 1001 once their answers are
    /// out), then waits until no request is pending on a task, no peer link and no client
    /// connection is open, or `timeout`. Ends with the task links closed with 1001 (going away). True when the
    /// drain finished before the timeout.
    pub fn drain(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        // Before the drain: a task told `router_draining` dials its unix path again at once,
        // and must not find this router's socket there (a dropped unix listener may take a
        // moment to stop listening). A taken-over path names the new router's socket and is
        // left alone.
        remove_unix_files(&self.unix_files);
        // Probes go to the router that took over, if one did, before they could see this
        // one's 503.
        if let Some(a) = &self.admin_listener {
            a.close_if_shared();
        }
        let steered = self.steer_clients();
        if steered {
            self.health.steer_clients();
        }
        self.health.start_drain();
        tracing::info!(timeout_ms = timeout.as_millis() as u64, "draining");
        // Every shard and peer link looks at the flag within one poll.
        std::thread::sleep(crate::health::POLL * 2);
        if steered {
            std::thread::sleep(super::steer::SETTLE.saturating_sub(crate::health::POLL * 2));
            for g in &self.client_listeners {
                for &fd in &g.ours {
                    if let Err(e) = super::steer::shut_down(fd, g.addr) {
                        tracing::warn!(addr = %g.addr, "draining: could not shut the listener down (it closes when the process exits): {e}");
                    }
                }
            }
        }
        // A dead shard's counters stand where it died (its connections were never closed):
        // only the shards that run are waited for.
        let busy = || {
            self.metrics
                .iter()
                .enumerate()
                .filter(|(i, _)| self.health.shard_runs(*i))
                .map(|(_, m)| {
                    m.pending.load(Ordering::Relaxed)
                        + m.connections[Listener::External as usize].load(Ordering::Relaxed)
                        + m.connections[Listener::Api as usize].load(Ordering::Relaxed)
                })
                .sum::<u64>()
        };
        let done = loop {
            let b = busy();
            if b == 0 {
                break true;
            }
            if start.elapsed() >= timeout {
                tracing::warn!(busy = b, "drain timeout: closing with work left");
                break false;
            }
            std::thread::sleep(crate::health::POLL);
        };
        self.health.start_closing();
        // The shards close their task links and flush the close frames.
        std::thread::sleep(crate::health::POLL * 2);
        tracing::info!(
            took_ms = start.elapsed().as_millis() as u64,
            complete = done,
            "drained"
        );
        done
    }

    /// Steers the new connections on every client address to the listeners a router that
    /// took the addresses over has beside this router's (`steer`); true when it did on any.
    fn steer_clients(&self) -> bool {
        let mut steered = false;
        for g in &self.client_listeners {
            match g.steer_away() {
                Ok(Some(others)) => {
                    tracing::info!(addr = %g.addr, others, "draining: new connections steered to the listeners beside this router's");
                    steered = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(addr = %g.addr, "draining: could not steer new connections away: {e}")
                }
            }
        }
        steered
    }

    /// Stops the control thread (shards end with the process).
    pub fn shutdown(self) {
        let _ = self.events.send(ControlEvent::Shutdown);
        let _ = self.control.join();
    }

    /// Asks the control thread to stop without waiting for it (shards end with the process).
    pub fn stop_control(&self) {
        let _ = self.events.send(ControlEvent::Shutdown);
    }
}

/// Stops a dead shard's listening socket `fd` (bound to `addr`) from taking connections:
/// nobody accepts on it any more, yet it would keep its share of the `SO_REUSEPORT`
/// connections (and the task links of its internal port) waiting forever. `shutdown(2)` on a
/// listening socket takes it out of the kernel's tables and resets what waits in its
/// backlog; the descriptor itself stays the dead shard's. Only a descriptor that is still a
/// listening socket on `addr` is touched: a dying executor may have closed its own, and the
/// number been reused since by another shard's connection.
fn stop_listening(shard: usize, fd: RawFd, addr: SocketAddr) {
    // The dead shard's thread has ended, so nothing else uses the descriptor.
    match super::steer::shut_down(fd, addr) {
        Ok(true) => tracing::error!(shard, %addr, "dead shard's listener closed"),
        Ok(false) => {}
        Err(e) => tracing::error!(shard, %addr, "could not close a dead shard's listener: {e}"),
    }
}

/// [`stop_listening`] for a dead shard's unix task-link listener: once shut down, a connect to
/// its path is refused at once (instead of waiting in a backlog nobody accepts from).
fn stop_listening_unix(shard: usize, fd: RawFd) {
    // SAFETY: as in `stop_listening`.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    let unix = sock.local_addr().is_ok_and(|a| a.is_unix());
    if unix && sock.is_listener().unwrap_or(false) {
        match sock.shutdown(std::net::Shutdown::Both) {
            Ok(()) => tracing::error!(shard, "dead shard's unix task-link listener closed"),
            Err(e) => tracing::error!(shard, "could not close a dead shard's unix listener: {e}"),
        }
    }
}

/// Pins the calling thread to `core` (best effort: logs on failure).
pub(crate) fn pin_current_thread(core: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                core,
                "could not pin the control thread: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
