//! Shards: one pinned glommio executor per configured core. A shard owns its client
//! connections, task links and pending requests (`!Send`, never shared); it reads the routing
//! and keyring snapshots without locks and reports task links to the control thread.

pub mod listen;
/// Public only with the `bench` feature (benches/micro.rs times [`snapshot::Local::load`]).
#[cfg(feature = "bench")]
pub mod snapshot;
#[cfg(not(feature = "bench"))]
mod snapshot;
pub(crate) mod steer;
mod trim;
pub(crate) mod unproven;
mod waiting;

use crate::config::Config;
use crate::control::{ControlEvent, Snapshots};
use crate::metrics::ShardMetrics;
use crate::route::TaskId;
use crate::task::link::{HealthChange, TaskLink};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

/// Everything a shard owns. Lives in an `Rc` on its executor.
pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) count: usize,
    pub(crate) cfg: Arc<Config>,
    /// The control thread's snapshots as this shard last saw them.
    pub(crate) snapshots: snapshot::ShardSnapshots,
    pub(crate) events: crossbeam_channel::Sender<ControlEvent>,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Internal (task link) address of every shard, for the hello.
    pub(crate) internal_addrs: Arc<Vec<SocketAddr>>,
    /// Task instance -> its link to this shard.
    pub(crate) links: RefCell<crate::route::FastMap<TaskId, Rc<TaskLink>>>,
    /// Request ids, unique on this shard.
    next_request: Cell<u64>,
    /// Round-robin cursor among the tasks of a partition.
    rr: Cell<usize>,
    /// Reused buffer for the header and metadata of outgoing frames.
    pub(crate) scratch: RefCell<bytes::BytesMut>,
    /// Open client connections (for the per-shard limit).
    pub(crate) client_conns: Cell<usize>,
    /// `region/cluster/router` and this shard's index, as put in responses.
    pub(crate) router_name: String,
    /// Other clusters: keys, routers, our peer token.
    pub(crate) federation: crate::peer::FederationRef,
    /// This shard's own peer links.
    pub(crate) peers: RefCell<crate::peer::Peers>,
    /// This shard's share of `limits.body_budget_bytes`: client request bodies and the
    /// answers queued for client connections.
    pub(crate) budget: Rc<Budget>,
    /// Keep-alive HTTP connections of this shard, for eviction at the connection limit.
    pub(crate) keepalive: RefCell<HashMap<u64, Rc<IdleSlot>>>,
    /// Those of them that wait for a request, longest wait first.
    waiting: waiting::Waiting,
    next_conn: Cell<u64>,
    /// Connections closed to make room at the connection limit that are not closed yet, less
    /// the lingering ones whose room is made ([`KeepAlive::room_made`]; see
    /// [`Shard::evict_for_room`]).
    evicting: Cell<usize>,
    /// Connections closed for room that linger for their client's close (at most
    /// [`MAX_ROOM_LINGERING`]).
    room_lingering: Cell<usize>,
    /// Wakes accept loops waiting for a connection closed for room to end or make its room
    /// (`room_for` in `shard::listen`).
    room_freed: Rc<RoomFreed>,
    /// The server config of the TLS api listener (`listen.api_tls`), when configured.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Router-wide readiness and drain state.
    pub(crate) health: Arc<crate::health::Health>,
    /// Bounds on the log lines of events a client or peer can repeat at will.
    pub(crate) log_gates: crate::util::LogGates,
    /// Connections in their handshake, by listener (`metrics::Listener`): on the api
    /// listeners their TLS handshake, on the link listeners everything before a verified
    /// token; closed oldest first for room ([`unproven`]).
    unproven: [Rc<unproven::Unproven>; 3],
    /// Closed when this shard sees a drain: wakes the accept loops, which stop.
    pub(crate) drain: glommio::sync::Semaphore,
    /// Set once this draining shard's internal listeners are closed and its task links were
    /// told `router_draining` ([`crate::task::link::tell_router_draining`]); a link that
    /// registers later is told at its registration.
    pub(crate) router_draining: Cell<bool>,
    /// A router that took its addresses over (`listen.takeover`): until then, a request for a
    /// partition with no live task waits for one to link instead of getting 503
    /// `no_live_task` (`readiness.takeover_task_wait_ms`; the tasks of the router it replaces
    /// link here once that one drains). None otherwise, and after it passed.
    pub(crate) task_wait_until: Cell<Option<std::time::Instant>>,
    /// Requests waiting for a task meanwhile, and what wakes them: permits given by
    /// `routing::local::wake_task_waiters` when the routing table moved, every 100 ms (their
    /// deadlines) and when the wait is over.
    pub(crate) task_waiters: Cell<usize>,
    pub(crate) task_wake: glommio::sync::Semaphore,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        count: usize,
        cfg: Arc<Config>,
        snapshots: Snapshots,
        events: crossbeam_channel::Sender<ControlEvent>,
        metrics: Arc<ShardMetrics>,
        internal_addrs: Arc<Vec<SocketAddr>>,
        federation: crate::peer::FederationRef,
        tls: Option<Arc<rustls::ServerConfig>>,
        health: Arc<crate::health::Health>,
    ) -> Shard {
        let router_name = format!("{}/{}/{}", cfg.region, cfg.cluster, cfg.router);
        let room_freed = Rc::new(RoomFreed::default());
        Shard {
            index,
            count,
            snapshots: snapshot::ShardSnapshots::new(&snapshots),
            events,
            metrics: metrics.clone(),
            internal_addrs,
            links: RefCell::new(Default::default()),
            next_request: Cell::new(1),
            rr: Cell::new(0),
            scratch: RefCell::new(bytes::BytesMut::with_capacity(1024)),
            client_conns: Cell::new(0),
            keepalive: RefCell::new(HashMap::new()),
            waiting: Default::default(),
            next_conn: Cell::new(0),
            evicting: Cell::new(0),
            room_lingering: Cell::new(0),
            router_name,
            federation,
            peers: RefCell::new(Default::default()),
            budget: Rc::new(Budget::new(
                cfg.limits.body_budget_bytes / count.max(1),
                metrics.clone(),
            )),
            cfg,
            tls,
            health,
            log_gates: Default::default(),
            unproven: [(); 3].map(|()| Rc::new(unproven::Unproven::new(room_freed.clone()))),
            room_freed,
            drain: glommio::sync::Semaphore::new(0),
            router_draining: Cell::new(false),
            task_wait_until: Cell::new(None),
            task_waiters: Cell::new(0),
            task_wake: glommio::sync::Semaphore::new(0),
        }
    }

    /// Charges a client request body of `n` bytes to this shard's share of the router-wide
    /// body budget and to its connection's share (`conn`: bytes that connection holds). The
    /// bytes come back when the [`BodyCharge`] drops. Over either: 503 `overloaded` (the HTTP
    /// answer carries `Retry-After`), counted in `fedbus_overload_refused_total`.
    #[allow(clippy::result_large_err)]
    pub(crate) fn charge_body(
        self: &Rc<Self>,
        conn: &Rc<Cell<usize>>,
        n: usize,
    ) -> Result<BodyCharge, crate::routing::Answer> {
        self.charge_arriving(conn, n, n)
    }

    /// Charges a body of `whole` bytes still arriving, of which `now` bytes are held now
    /// ([`charge_ahead`]: what came so far and a window ahead of it); the charge grows with
    /// what comes ([`BodyCharge::grow_to`]). The whole must fit in what is left of both
    /// budgets now, as [`Shard::charge_body`] would take it, or it is refused from its head;
    /// only `now` is taken. A client that announces a large body and trickles it so holds
    /// what it sent, not what it announced: 64 connections announcing 8 MiB at 1 KiB/s held a
    /// 512 MiB budget for two hours.
    #[allow(clippy::result_large_err)]
    pub(crate) fn charge_arriving(
        self: &Rc<Self>,
        conn: &Rc<Cell<usize>>,
        now: usize,
        whole: usize,
    ) -> Result<BodyCharge, crate::routing::Answer> {
        self.charge_within(conn, self.cfg.limits.max_connection_body_bytes, now, whole)
    }

    /// [`Shard::charge_arriving`] with the connection's share `share`: an accepted peer link
    /// carries the requests of many clients of other routers, so its forwarded bodies are held
    /// to the shard's budget only (`usize::MAX`), as well as to `limits.max_pending_per_link`.
    #[allow(clippy::result_large_err)]
    pub(crate) fn charge_within(
        self: &Rc<Self>,
        conn: &Rc<Cell<usize>>,
        share: usize,
        now: usize,
        whole: usize,
    ) -> Result<BodyCharge, crate::routing::Answer> {
        let mut charge = BodyCharge {
            shard: self.clone(),
            conn: conn.clone(),
            share,
            n: 0,
            announced: 0,
        };
        charge.grow_to(now, whole)?;
        Ok(charge)
    }

    /// Counts, logs and answers a body the budget or its connection's share has no room for.
    fn refuse_body(&self, bytes: usize, over_conn: bool) -> crate::routing::Answer {
        ShardMetrics::inc(&self.metrics.overload_refused);
        if let Some(suppressed) = self.log_gates.overload_refused.pass() {
            tracing::info!(
                shard = self.index,
                bytes,
                connection = over_conn,
                suppressed,
                "request body over the memory budget: 503"
            );
        }
        crate::routing::Answer::error(
            503,
            "overloaded",
            if over_conn {
                "this connection holds its share of the router's body budget; retry later"
            } else {
                "the router's body budget is spent; retry later"
            },
        )
    }
}

/// What is charged for a body of `whole` bytes of which `got` have arrived: what came and
/// [`CHARGE_AHEAD`] more, up to the whole. Room for the whole body is reserved when its head
/// comes, in a buffer made for it when it is larger than [`CHARGE_AHEAD`] (never one a body
/// filled before: an HTTP connection lets go of such a buffer once a request is cut from it,
/// `/api/ws` makes a new one for each such frame and lets it go when the message is refused
/// as it arrives), and only what reads fill is resident: each read zeroes at most one read
/// chunk (64 KiB) past what came. A smaller buffer reused whole is within the charge. So this
/// covers the memory an upload holds.
pub(crate) fn charge_ahead(got: usize, whole: usize) -> usize {
    got.saturating_add(CHARGE_AHEAD).min(whole)
}

/// How far ahead of what has arrived a body being received is charged ([`charge_ahead`]).
pub(crate) const CHARGE_AHEAD: usize = 2 * crate::ws::conn::READ_CHUNK;

/// A shard's share of the router-wide memory budget (`limits.body_budget_bytes`): request
/// bodies ([`Shard::charge_body`], gauge `fedbus_body_bytes_held`) and answers queued for
/// client connections ([`OutboxCharge`], gauge `fedbus_outbox_bytes_held`) draw on the same
/// bytes, so a flood of either makes the router refuse new uploads with 503 instead of
/// growing.
pub(crate) struct Budget {
    left: Cell<usize>,
    metrics: Arc<ShardMetrics>,
}

impl Budget {
    pub(crate) fn new(bytes: usize, metrics: Arc<ShardMetrics>) -> Budget {
        Budget {
            left: Cell::new(bytes),
            metrics,
        }
    }

    /// Takes `n` bytes if they are left.
    fn take(&self, n: usize) -> bool {
        let left = self.left.get();
        if n > left {
            return false;
        }
        self.left.set(left - n);
        true
    }

    fn give(&self, n: usize) {
        self.left.set(self.left.get() + n);
    }
}

/// Bytes of answers queued for one client connection, charged to its shard's [`Budget`].
/// Grows and shrinks as answers are queued and written; whatever is still charged comes back
/// on drop (the connection closed).
pub(crate) struct OutboxCharge {
    budget: Rc<Budget>,
    n: usize,
    /// Bytes of `n` that were forced past an empty budget (not taken from it).
    debt: usize,
}

impl OutboxCharge {
    pub(crate) fn new(budget: Rc<Budget>) -> OutboxCharge {
        OutboxCharge {
            budget,
            n: 0,
            debt: 0,
        }
    }

    /// Charges `n` more bytes if the shard's budget has them.
    pub(crate) fn try_add(&mut self, n: usize) -> bool {
        if !self.budget.take(n) {
            return false;
        }
        self.add_held(n);
        true
    }

    /// Charges `n` more bytes whatever is left (bytes already in memory: an answer already
    /// made, within its connection's share; an error answer, a control frame); the budget may
    /// go below zero by these, shown as 0 left, and the debt is paid back first on release.
    pub(crate) fn force_add(&mut self, n: usize) {
        let left = self.budget.left.get();
        self.budget.left.set(left.saturating_sub(n));
        // What could not be taken is remembered as a debt paid back on release.
        self.add_held(n);
        self.debt += n.saturating_sub(left);
    }

    fn add_held(&mut self, n: usize) {
        self.n += n;
        ShardMetrics::add(&self.budget.metrics.outbox_held, n as u64);
    }

    /// Gives back `n` bytes (written or dropped).
    pub(crate) fn release(&mut self, n: usize) {
        let n = n.min(self.n);
        self.n -= n;
        let paid = n.min(self.debt);
        self.debt -= paid;
        self.budget.give(n - paid);
        ShardMetrics::sub(&self.budget.metrics.outbox_held, n as u64);
    }
}

impl Drop for OutboxCharge {
    fn drop(&mut self) {
        self.release(self.n);
    }
}

/// Bytes of one request body charged by [`Shard::charge_body`] (or growing with it as it
/// arrives, [`Shard::charge_arriving`]); given back on drop.
pub(crate) struct BodyCharge {
    shard: Rc<Shard>,
    conn: Rc<Cell<usize>>,
    /// The connection's share of the budget ([`Shard::charge_within`]).
    share: usize,
    n: usize,
    /// The most bytes the body announced so far (an `/api/ws` message's frames announce its
    /// length a frame at a time).
    announced: usize,
}

impl BodyCharge {
    /// Grows the charge to `now` bytes (at most `whole`) of a body that announced `whole`: when
    /// `whole` is more than it announced before (its head; an `/api/ws` message's next frame),
    /// what it adds must fit in what is left, or nothing is taken. Over the shard's budget or
    /// the connection's share: refused as [`Shard::charge_body`] refuses (counted, logged, 503
    /// `overloaded`), and the charge stays what it was. Never shrinks.
    #[allow(clippy::result_large_err)]
    pub(crate) fn grow_to(
        &mut self,
        now: usize,
        whole: usize,
    ) -> Result<(), crate::routing::Answer> {
        let budget = &self.shard.budget;
        if whole > self.announced {
            let rest = whole - self.n;
            let over_conn = self.conn.get().saturating_add(rest) > self.share;
            if over_conn || rest > budget.left.get() {
                return Err(self.shard.refuse_body(whole, over_conn));
            }
            self.announced = whole;
        }
        let Some(more) = now.min(whole).checked_sub(self.n).filter(|&m| m > 0) else {
            return Ok(());
        };
        let over_conn = self.conn.get().saturating_add(more) > self.share;
        if over_conn || !budget.take(more) {
            return Err(self.shard.refuse_body(whole, over_conn));
        }
        self.conn.set(self.conn.get() + more);
        ShardMetrics::add(&self.shard.metrics.body_held, more as u64);
        self.n += more;
        Ok(())
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        if self.n > 0 {
            self.shard.budget.give(self.n);
            self.conn.set(self.conn.get() - self.n);
            ShardMetrics::sub(&self.shard.metrics.body_held, self.n as u64);
        }
    }
}

/// One HTTP connection's waiting state, seen by the accept loop: when the shard is at
/// `limits.max_connections_per_shard`, the connection that has waited the longest for a request
/// to come whole (idle, or in a head) is closed to make room instead of refusing the new one
/// ([`Shard::evict_for_room`]).
pub(crate) struct IdleSlot {
    /// Since when the connection waits for a request with nothing in flight; None while busy.
    since: Cell<Option<std::time::Instant>>,
    /// Since when the request head it waits for has been arriving (part of it is in, nothing
    /// in flight); None otherwise.
    head_since: Cell<Option<std::time::Instant>>,
    /// Whether a request came on it: until then, waiting is waiting for the first request
    /// head, not keep-alive idleness (see [`Shard::evict_for_room`]).
    served: Cell<bool>,
    /// When the connection was accepted (a TLS one before its handshake): the age of its wait
    /// for its first request, however its bytes came.
    opened: std::time::Instant,
    evicted: Cell<bool>,
    /// The wait its current entry in [`Shard::waiting`] was queued with; None when it has
    /// none.
    queued: Cell<Option<std::time::Instant>>,
    /// Evicted to make room at the connection limit (not by a drain): counted in
    /// `Shard::evicting` until the connection closes or its room is made
    /// ([`KeepAlive::room_made`]).
    for_room: Cell<bool>,
    waker: Cell<Option<std::task::Waker>>,
}

impl IdleSlot {
    /// The state of a connection accepted at `opened`, busy.
    fn new(opened: std::time::Instant) -> IdleSlot {
        IdleSlot {
            since: Cell::new(None),
            head_since: Cell::new(None),
            served: Cell::new(false),
            opened,
            evicted: Cell::new(false),
            queued: Cell::new(None),
            for_room: Cell::new(false),
            waker: Cell::new(None),
        }
    }

    /// Marks the connection idle (waiting for a new request) or busy. Idle again while idle
    /// (its wait went on after its buffers were given back) keeps when it became idle.
    pub(crate) fn set_idle(&self, idle: bool) {
        let since = self.since.get();
        self.since
            .set(idle.then(|| since.unwrap_or_else(std::time::Instant::now)));
    }

    /// Marks the connection as waiting for the rest of a request head that began to arrive at
    /// `since` (None: not waiting for a head).
    pub(crate) fn set_head(&self, since: Option<std::time::Instant>) {
        self.head_since.set(since);
    }

    /// A request came on the connection: from now on, waiting for the next one is keep-alive
    /// idleness.
    pub(crate) fn set_served(&self) {
        self.served.set(true);
    }

    /// Whether a request came on it.
    pub(crate) fn was_served(&self) -> bool {
        self.served.get()
    }

    /// Since when it has been waiting as a keep-alive connection: a request was served on it
    /// and it waits for the next one.
    fn idle_since(&self) -> Option<std::time::Instant> {
        self.since.get().filter(|_| self.served.get())
    }

    /// Since when it has been waiting for a request to come whole (see
    /// [`Shard::evict_for_room`]): a keep-alive connection since it went idle, its next head
    /// since its first bytes; a new connection since it was accepted, whether or not its first bytes
    /// came, so that new connections are chosen in the order they came, not in the order
    /// their first bytes were read. None while it is busy (a request in flight, a body
    /// arriving, answers being written).
    fn waiting_since(&self) -> Option<std::time::Instant> {
        let waiting = self.since.get().or(self.head_since.get());
        match self.served.get() {
            true => waiting,
            false => waiting.map(|_| self.opened),
        }
    }

    /// Whether the accept loop has chosen this connection for eviction.
    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.get()
    }

    /// Whether it was chosen to make room at the connection limit (not by a drain).
    pub(crate) fn is_evicted_for_room(&self) -> bool {
        self.for_room.get()
    }

    /// Resolves once the accept loop has chosen this connection for eviction.
    pub(crate) fn evicted(&self) -> impl std::future::Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(move |cx| {
            if self.evicted.get() {
                std::task::Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
    }
}

/// A connection's registration in [`Shard::keepalive`]; removed on drop.
pub(crate) struct KeepAlive {
    shard: Rc<Shard>,
    id: u64,
    /// The connection's idle state.
    pub(crate) slot: Rc<IdleSlot>,
    /// Closed for room and its room made ([`KeepAlive::room_made`]): no longer counted in
    /// `Shard::evicting`.
    released: Cell<bool>,
}

impl KeepAlive {
    /// Marks the connection as waiting for a new request (`idle`), for the rest of a request
    /// head that began to arrive at `head`, or neither (busy), and queues it among the
    /// connections that may be closed for room when it waits.
    pub(crate) fn set_waiting(&self, idle: bool, head: Option<std::time::Instant>) {
        self.slot.set_idle(idle);
        self.slot.set_head(head);
        let registered = self.shard.keepalive.borrow().len();
        self.shard.waiting.note(&self.slot, registered);
    }

    /// A connection closed for room has written its last answer and may linger for its
    /// client's close (Some) while at most [`MAX_ROOM_LINGERING`] do: then its room is made,
    /// and the accept loop need not wait for its close ([`MAX_PENDING_EVICTIONS`] no longer
    /// counts it). None beyond them: it closes at once, counted until it has (over TLS its
    /// `close_notify` may wait for room in the socket).
    pub(crate) fn room_made(&self) -> Option<RoomLinger> {
        let n = self.shard.room_lingering.get();
        if n >= MAX_ROOM_LINGERING {
            return None;
        }
        self.shard.room_lingering.set(n + 1);
        if self.slot.for_room.get() && !self.released.replace(true) {
            self.shard.evicting.set(self.shard.evicting.get() - 1);
            self.shard.room_freed.notify();
        }
        Some(RoomLinger(self.shard.clone()))
    }
}

/// A connection closed for room that lingers for its client's close; counted in
/// `Shard::room_lingering` until dropped.
pub(crate) struct RoomLinger(Rc<Shard>);

impl Drop for RoomLinger {
    fn drop(&mut self) {
        let n = &self.0.room_lingering;
        n.set(n.get() - 1);
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.shard.keepalive.borrow_mut().remove(&self.id);
        // Its entries in the waiting queue go stale, and keep no task alive.
        self.slot.queued.set(None);
        self.slot.waker.take();
        if self.slot.for_room.get() && !self.released.get() {
            self.shard.evicting.set(self.shard.evicting.get() - 1);
            self.shard.room_freed.notify();
        }
    }
}

/// What an attempt to make room at a listener's connection limit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// A connection was told to close: the new one may be served.
    Made,
    /// The connection to close next is held back by the bound on closes under way
    /// ([`MAX_PENDING_EVICTIONS`], `unproven::MAX_PENDING`): room comes when one of those ends.
    Blocked,
    /// No connection may be closed for room: the new one is refused.
    None,
}

/// Wakes the accept loops of a shard that wait for a connection closed for room to end
/// ([`crate::shard::listen`]'s `room_for`).
#[derive(Default)]
pub(crate) struct RoomFreed {
    /// How many have ended.
    ended: Cell<u64>,
    /// At most one per accept loop waiting (a waker already listed is not listed again).
    waiters: RefCell<Vec<std::task::Waker>>,
}

impl RoomFreed {
    /// A connection closed for room has ended, or made its room.
    pub(crate) fn notify(&self) {
        self.ended.set(self.ended.get() + 1);
        for w in self.waiters.take() {
            w.wake();
        }
    }

    /// Resolves at the next [`RoomFreed::notify`].
    pub(crate) fn next(&self) -> impl std::future::Future<Output = ()> + '_ {
        let seen = self.ended.get();
        std::future::poll_fn(move |cx| {
            if self.ended.get() != seen {
                return std::task::Poll::Ready(());
            }
            let mut w = self.waiters.borrow_mut();
            if !w.iter().any(|w| w.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
    }
}

/// At most this many connections closed to make room at `limits.max_connections_per_shard`
/// may still be open at once, besides those lingering after their room was made
/// ([`MAX_ROOM_LINGERING`]): a new connection beyond the limit is let in only for one of them.
pub(crate) const MAX_PENDING_EVICTIONS: usize = 16;

/// At most this many connections closed for room, whose answers are written, may linger for
/// their clients' close at once (`api::http::ROOM_LINGER`), no longer counted against
/// [`MAX_PENDING_EVICTIONS`]: a served connection whose next request raced its eviction reads
/// its 503 before the socket goes. Beyond them, one closes at once, still counted. So a shard
/// holds at most the limit, plus [`MAX_PENDING_EVICTIONS`] closes under way, 16 TLS handshakes
/// closed for room (`unproven::MAX_PENDING`), and these.
pub(crate) const MAX_ROOM_LINGERING: usize = 64;

impl Shard {
    /// Registers an HTTP connection accepted at `opened` as a candidate for eviction.
    pub(crate) fn keepalive(self: &Rc<Self>, opened: std::time::Instant) -> KeepAlive {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let slot = Rc::new(IdleSlot::new(opened));
        self.keepalive.borrow_mut().insert(id, slot.clone());
        KeepAlive {
            shard: self.clone(),
            id,
            slot,
            released: Cell::new(false),
        }
    }

    /// At the client limit: closes the connection that has waited the longest for a
    /// request to come whole, whatever it waits in, to make room for a new one. [`Room::Made`]
    /// when one was told to close (it closes at its next turn, and its slot frees then). It
    /// may be:
    /// - a keep-alive connection waiting for its next request (since it went idle): closed
    ///   quietly, as nginx and Envoy close idle connections for room;
    /// - a new connection that has not sent its whole first request head (since it was
    ///   accepted, so new connections go in the order they came): closed at once, answered
    ///   `503 too_many_connections` when part of the head came;
    /// - a served one whose next head has been arriving (since its first bytes): `503`;
    /// - a TLS handshake under way (since it was accepted; `unproven`).
    ///
    /// Without the last three, connections held in a handshake or a head (a few bytes at a
    /// time, within `limits.handshake_timeout_ms`) locked every new client out until they
    /// timed out. An upload under way, an `/api/ws` session and a request in flight are never
    /// chosen ([`Room::None`] when nothing else is open). [`Room::Blocked`] while
    /// [`MAX_PENDING_EVICTIONS`] connections closed for room are still open (or
    /// `unproven::MAX_PENDING` TLS handshakes, when the oldest is one): an eviction lets the
    /// new connection in before the old one has closed, and a client whose request raced the
    /// eviction (its bytes arrived as it was chosen) is answered first, so without a bound a
    /// burst of connections that each send part of a head got several times the limit in.
    pub(crate) fn evict_for_room(&self) -> Room {
        let conn = self.waiting.oldest();
        let tls = self.unproven(crate::metrics::Listener::Api).oldest();
        let Some((since, slot)) = conn.filter(|(since, _)| tls.is_none_or(|t| *since <= t)) else {
            return self.evict_handshake(crate::metrics::Listener::Api);
        };
        if self.evicting.get() >= MAX_PENDING_EVICTIONS {
            return Room::Blocked;
        }
        let idle = slot.idle_since().is_some();
        self.close_for_room(&slot);
        let waited_ms = since.elapsed().as_millis() as u64;
        if idle {
            ShardMetrics::inc(&self.metrics.idle_evicted);
            if let Some(suppressed) = self.log_gates.idle_evicted.pass() {
                tracing::info!(
                    shard = self.index,
                    idle_ms = waited_ms,
                    suppressed,
                    "at limits.max_connections_per_shard: closed the longest-idle keep-alive connection"
                );
            }
        } else {
            ShardMetrics::inc(&self.metrics.unfinished_evicted[1]);
            if let Some(suppressed) = self.log_gates.unfinished_evicted.pass() {
                tracing::warn!(
                    shard = self.index,
                    head_ms = waited_ms,
                    suppressed,
                    "at limits.max_connections_per_shard: closed the connection whose request head was on its way the longest (503 when part of it came)"
                );
            }
        }
        Room::Made
    }

    /// Tells `slot`'s connection to close for room; it counts against
    /// [`MAX_PENDING_EVICTIONS`] until it has, or until it lingers with its room made.
    fn close_for_room(&self, slot: &IdleSlot) {
        slot.evicted.set(true);
        slot.for_room.set(true);
        self.evicting.set(self.evicting.get() + 1);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }

    /// Resolves when a connection closed for room ends (or spuriously).
    pub(crate) fn room_freed(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.room_freed.next()
    }

    /// Closes every keep-alive connection that has waited at least `min_idle` for its next
    /// request (a drain); returns how many.
    pub(crate) fn close_idle(&self, min_idle: std::time::Duration) -> usize {
        let conns = self.keepalive.borrow();
        let mut n = 0;
        for slot in conns.values() {
            let idle_long = slot.since.get().is_some_and(|t| t.elapsed() >= min_idle);
            if idle_long && !slot.evicted.get() {
                slot.evicted.set(true);
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
                n += 1;
            }
        }
        n
    }

    /// A fresh request id.
    pub(crate) fn request_id(&self) -> u64 {
        let id = self.next_request.get();
        self.next_request.set(id.wrapping_add(1));
        id
    }

    /// True when one of `tasks` has a live link on this shard.
    pub(crate) fn has_live_link(&self, tasks: &[TaskId]) -> bool {
        let links = self.links.borrow();
        tasks
            .iter()
            .any(|t| links.get(t).is_some_and(|l| l.is_alive()))
    }

    /// Picks a live local link among `tasks`, round robin, skipping full ones.
    /// `Err(true)`: live links exist but all are at their pending limit (answer 503, do not
    /// spill onto the emergency partition); `Err(false)`: no live link on this shard.
    pub(crate) fn pick_link(
        &self,
        app: &str,
        role: &str,
        tasks: &[TaskId],
    ) -> Result<Rc<TaskLink>, bool> {
        if tasks.is_empty() {
            return Err(false);
        }
        let links = self.links.borrow();
        let start = self.rr.get();
        self.rr.set(start.wrapping_add(1));
        let max = self.cfg.limits.max_pending_per_link;
        let mut busy = false;
        for i in 0..tasks.len() {
            let found = links.get(&tasks[(start + i) % tasks.len()]);
            // The snapshot may name a task id that now belongs to another link.
            if let Some(l) = found.filter(|l| l.app == app && l.role == role) {
                if l.is_usable(max) {
                    return Ok(l.clone());
                }
                busy |= l.is_alive();
            }
        }
        Err(busy)
    }
}

/// Counts and logs a peer link leaving or coming back to its rank (`peer::Peers::pick`).
fn report_peer_health(shard: &Shard, addr: &str, change: HealthChange) {
    let m = &shard.metrics;
    match change {
        HealthChange::Ejected(_) => {
            ShardMetrics::inc(&m.peer_ejected);
            tracing::warn!(
                shard = shard.index,
                router = addr,
                after = shard.cfg.limits.peer_eject_after_timeouts,
                "peer link ejected: requests timed out in a row; ranked last for its cluster"
            );
        }
        HealthChange::Readmitted => {
            ShardMetrics::inc(&m.peer_readmitted);
            tracing::info!(
                shard = shard.index,
                router = addr,
                "peer link answers again: back in its rank"
            );
        }
    }
}

/// Tells the control thread that a task link left routing (as if it had closed) or came back
/// (as if it had registered again), counts it and logs it.
fn report_health(shard: &Shard, l: &TaskLink, change: HealthChange) {
    let m = &shard.metrics;
    match change {
        HealthChange::Ejected(why) => {
            ShardMetrics::inc(&m.task_ejected[why as usize]);
            ShardMetrics::inc(&m.task_links_ejected);
            tracing::warn!(
                shard = shard.index,
                task = l.task,
                app = %l.app,
                role = %l.role,
                reason = why.label(),
                "task link ejected from routing"
            );
            let _ = shard.events.send(ControlEvent::Unregister {
                shard: shard.index,
                task: l.task,
            });
        }
        HealthChange::Readmitted => {
            ShardMetrics::inc(&m.task_readmitted);
            ShardMetrics::dec(&m.task_links_ejected);
            tracing::info!(
                shard = shard.index,
                task = l.task,
                app = %l.app,
                role = %l.role,
                "task link answers again: back in routing"
            );
            let _ = shard.events.send(ControlEvent::Register {
                shard: shard.index,
                reg: l.registration(),
            });
        }
    }
}

/// Follows the router's drain on this shard: closes [`Shard::drain`] when it starts (the accept
/// loops stop), and closes the task links with 1001 (going away) when it ends.
pub(crate) async fn watch_drain(shard: Rc<Shard>) {
    let every = crate::health::POLL;
    // One timer for every tick (`glommio::timer::sleep` allocates one per call).
    let mut timer = crate::util::Deadline::new();
    while !shard.health.draining() {
        timer.sleep(every).await;
    }
    shard.drain.close();
    // Client connections idle this long are closed; busy ones close after their next answer.
    let idle = std::time::Duration::from_millis(shard.cfg.readiness.drain_idle_close_ms);
    while !shard.health.closing() {
        shard.close_idle(idle);
        timer.sleep(every).await;
    }
    let links: Vec<Rc<TaskLink>> = shard.links.borrow().values().cloned().collect();
    tracing::info!(
        shard = shard.index,
        links = links.len(),
        "drain over: closing task links"
    );
    for l in links {
        l.out.borrow_mut().close(1001);
    }
}

/// Enforces request deadlines on every link of the shard: one timer for the shard instead of
/// one per request. A request times out at most one sweep interval late.
pub(crate) async fn sweep_deadlines(shard: Rc<Shard>) {
    let limits = &shard.cfg.limits;
    let every = std::time::Duration::from_millis((limits.request_timeout_ms / 10).clamp(5, 100));
    // Outlier ejection of task links (docs/EMERGENCY.md), checked on the same tick.
    let eject_after = limits.task_eject_after_timeouts;
    let pong_timeout = (limits.task_pong_timeout_ms > 0)
        .then(|| std::time::Duration::from_millis(limits.task_pong_timeout_ms));
    let mut timer = crate::util::Deadline::new();
    let mut keys_seen = shard.snapshots.keys.load().generation;
    loop {
        timer.sleep(every).await;
        let now = std::time::Instant::now();
        // A keyring reload may have replaced the key version a task link's service token was
        // signed with: its grace then ends (or has ended) and the link is closed with 1008,
        // as a new link with that token would be refused.
        let keys = shard.snapshots.keys.load().generation;
        let rekeyed = std::mem::replace(&mut keys_seen, keys) != keys;
        let secs = crate::util::unix_secs_coarse();
        for l in shard.links.borrow().values() {
            l.expire(now);
            if let Some(change) = l.health_step(now, eject_after, pong_timeout) {
                report_health(&shard, l, change);
            }
            if rekeyed {
                l.key_until
                    .set(crate::task::link::key_until(&shard, l.kid.get()));
            }
            if secs >= l.key_until.get() && !l.out.borrow().is_closing() {
                ShardMetrics::inc(&shard.metrics.links_revoked);
                tracing::warn!(
                    shard = shard.index,
                    task = l.task,
                    kid = l.kid.get(),
                    "task link closed: the key version of its service token retired"
                );
                l.out.borrow_mut().close(1008);
            }
        }
        for slots in shard.peers.borrow().clusters.values() {
            for s in slots {
                if let Some(l) = s.link.borrow().as_ref() {
                    l.expire(now);
                    if let Some(change) = l.health_step(now, limits.peer_eject_after_timeouts, None)
                    {
                        report_peer_health(&shard, &s.addr, change);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which connections the accept loop weighs for room, and by what age: a keep-alive
    /// connection (served, waiting for its next request) is idle; a new one waits for its
    /// first head from when it opened, whether or not its first bytes came since, so new
    /// connections are chosen in the order they came. A served connection's next head counts
    /// from its first bytes.
    #[test]
    fn new_connections_are_weighed_by_when_they_opened() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let slot = |opened| IdleSlot::new(at(opened));
        // Opened first; its first bytes were read after `b` opened.
        let a = Rc::new(slot(0));
        a.set_head(Some(at(5)));
        // Opened second, nothing sent yet.
        let b = Rc::new(slot(2));
        b.since.set(Some(at(2)));
        assert_eq!(b.idle_since(), None, "a new connection is not idle");
        // Queued in the order they started to wait (`b` first), taken by age.
        let waiting = waiting::Waiting::default();
        waiting.note(&b, 2);
        waiting.note(&a, 2);
        let (since, _) = waiting.oldest().expect("two waiting");
        assert_eq!(since, at(0), "the first opened goes first");
        // Busy (a request in flight, a body arriving): never chosen.
        assert_eq!(slot(0).waiting_since(), None);
        // Served: waiting again is keep-alive idleness; its next head counts from its bytes.
        let c = slot(0);
        c.set_served();
        c.since.set(Some(at(7)));
        assert_eq!(c.idle_since(), Some(at(7)));
        assert_eq!(c.waiting_since(), Some(at(7)));
        c.set_idle(false);
        assert_eq!(c.waiting_since(), None, "busy");
        c.set_head(Some(at(9)));
        assert_eq!(c.waiting_since(), Some(at(9)));
        assert_eq!(c.idle_since(), None);
    }

    /// A panic in any task of a shard's executor (here a detached one, as a connection's)
    /// ends its thread, and the liveness guard held by the shard's main future, as
    /// `listen::start` holds it, marks the shard dead while the other shard runs on.
    #[test]
    fn a_shard_whose_task_panics_is_reported_dead() {
        let health = Arc::new(crate::health::Health::new(2, vec![]));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..2 {
            let (health, tx, stop) = (health.clone(), tx.clone(), stop.clone());
            let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .spawn(move || async move {
                    let _alive = health.shard_alive(i);
                    let _ = tx.send(i);
                    if i == 1 {
                        glommio::spawn_local(async { panic!("a bug in shard 1") }).detach();
                    }
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
                    }
                })
                .expect("executor");
            handles.push(h);
        }
        for _ in 0..2 {
            rx.recv().expect("ready");
        }
        let died = handles.pop().expect("shard 1").join();
        assert!(died.is_err(), "shard 1's executor must end with the panic");
        assert!(
            !health.all_shards_running(),
            "a shard whose task panicked must be reported dead"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handles
            .pop()
            .expect("shard 0")
            .join()
            .expect("shard 0 ends normally");
    }
}
