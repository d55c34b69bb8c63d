//! The router's side of one task link: owned by one shard, with its own pending table. A lost
//! link leaves the routing table at once and answers every request pending on it at once.

use super::hello::{Hello, Register, Registered};
use crate::auth::{self, verify_service_token};
use crate::control::ControlEvent;
use crate::metrics::{Listener, ShardMetrics};
use crate::proto::{renew, Frame, Kind};
use crate::route::Registration;
use crate::shard::unproven::{self, Handshake};
use crate::shard::Shard;
use crate::ws::Socket as _;
use crate::ws::{self, handshake, Message, Side, WsOut, WsReader};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// What a pending request receives.
#[derive(Debug)]
pub(crate) enum Reply {
    Response(Frame),
    Redirect {
        role: String,
        /// Absent: the same partition. `Err`: present but not a decimal `u32`.
        partition: Result<Option<u32>, ()>,
    },
    /// The link died before the answer came.
    Lost,
    /// No answer before the request's deadline (`limits.request_timeout_ms`).
    Timeout,
}

/// A pending request: where its answer lands and who waits for it. Kept in the link's table
/// instead of a oneshot channel and a timer per request: completing, timing out and failing
/// a request allocate nothing (the shard's sweeper enforces deadlines).
struct Slot {
    waker: Option<Waker>,
    reply: Option<Reply>,
    deadline: Instant,
    /// The request's frame in the link's outbox ([`WsOut::last_frame`]).
    frame: u64,
}

impl Slot {
    /// Answers the request (without its task, or before the task read it). Its frame may still
    /// wait in `out`: copied, so that it keeps no slice of the client's read buffer
    /// ([`WsOut::own_payload`]).
    fn give_up(&mut self, reply: Reply, out: &mut WsOut) {
        self.reply = Some(reply);
        out.own_payload(self.frame);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Why a task link is out of routing while it stays open (outlier ejection, docs/EMERGENCY.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ejection {
    /// `limits.task_eject_after_timeouts` requests in a row timed out; an answer brings it back.
    Timeouts,
    /// A ping went unanswered for `limits.task_pong_timeout_ms`; anything heard brings it back.
    Pongs,
    /// The task said it is stopping (`{"type":"draining"}`, PROTOCOL.md section 4): it still
    /// answers what it holds, and nothing brings it back (its next link registers afresh).
    Stopping,
}

impl Ejection {
    /// The `reason` label of `fedbus_task_ejected_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Ejection::Timeouts => "timeouts",
            Ejection::Pongs => "pongs",
            Ejection::Stopping => "stopping",
        }
    }
}

/// A change of a link's routing state found by [`TaskLink::health_step`], for the shard to
/// tell the control thread, count and log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HealthChange {
    Ejected(Ejection),
    Readmitted,
}

/// Outlier detection of one task link. The reader notes what it hears ([`Health::heard`]),
/// the pinger when it pings, the deadline sweeper timeouts; only the sweeper ejects.
#[derive(Default)]
struct Health {
    /// Requests that timed out since the task last answered one.
    timeouts: Cell<u32>,
    /// When the oldest ping not followed by anything from the task was sent.
    ping_since: Cell<Option<Instant>>,
    /// Out of routing, and why. Cleared by the reader as soon as the task answers again.
    ejected: Cell<Option<Ejection>>,
    /// The control thread was told the link is out (an `Unregister` sent, no `Register` yet).
    reported: Cell<bool>,
}

impl Health {
    /// Something arrived from the task: `answer` for a Response or Redirect frame (even to a
    /// request that already timed out), else a pong or any other message.
    fn heard(&self, answer: bool) {
        self.ping_since.set(None);
        if answer {
            self.timeouts.set(0);
        }
        match self.ejected.get() {
            Some(Ejection::Pongs) => self.ejected.set(None),
            // A hung handler behind a live websocket keeps answering pings: only an answer
            // shows that requests are served again.
            Some(Ejection::Timeouts) if answer => self.ejected.set(None),
            _ => {}
        }
    }
}

/// One task's (or peer router's) link to this shard.
pub(crate) struct TaskLink {
    pub(crate) task: u64,
    pub(crate) app: String,
    pub(crate) role: String,
    /// Partitions the task registered (empty on a peer link).
    pub(crate) partitions: Vec<u32>,
    pub(crate) out: Rc<RefCell<WsOut>>,
    pending: RefCell<crate::route::FastMap<u64, Slot>>,
    alive: Cell<bool>,
    health: Health,
    /// When the link's credential expires (unix seconds): the service token it opened with,
    /// moved by each accepted `renew` (task links; 0 on a peer link).
    exp: Cell<u64>,
    /// The cluster key version of that credential, and until when (unix seconds) it verifies
    /// under the rotation rule ([`key_until`]; `u64::MAX` while it is the newest, and on a
    /// peer link). Kept by `shard::sweep_deadlines`, which closes the link once it passes.
    pub(crate) kid: Cell<u32>,
    pub(crate) key_until: Cell<u64>,
    /// At most one `renew` per second is verified.
    renew_gate: RenewGate,
    /// Requests sent on this link: a link to a draining peer is closed once it stops
    /// carrying any (`peer::close_when_replaced`).
    sent: Cell<u64>,
    /// On a dialed peer link, the largest message the peer reads (its status says;
    /// `usize::MAX` until then and on task links): `routing::forward` sends none larger.
    pub(crate) peer_max_message: Cell<usize>,
    /// A link to a draining peer that is to close (`peer::close_when_replaced`): it takes no
    /// new request, and closes once those pending are answered or expired.
    retired: Cell<bool>,
}

impl TaskLink {
    pub(crate) fn new(task: u64, app: String, role: String, out: Rc<RefCell<WsOut>>) -> TaskLink {
        TaskLink {
            task,
            app,
            role,
            partitions: Vec::new(),
            out,
            pending: RefCell::new(Default::default()),
            alive: Cell::new(true),
            health: Health::default(),
            exp: Cell::new(0),
            kid: Cell::new(0),
            key_until: Cell::new(u64::MAX),
            renew_gate: RenewGate::default(),
            sent: Cell::new(0),
            peer_max_message: Cell::new(usize::MAX),
            retired: Cell::new(false),
        }
    }

    /// What the task registered, as the control thread keeps it.
    pub(crate) fn registration(&self) -> Registration {
        Registration {
            task: self.task,
            app: self.app.clone(),
            role: self.role.clone(),
            partitions: self.partitions.clone(),
        }
    }

    /// The task said it is stopping (`{"type":"draining"}`): out of routing for good, whatever
    /// it was out for before (the sweeper reports it, once, if it was in routing). What the
    /// link holds is still answered.
    pub(crate) fn stopping(&self) {
        self.health.ejected.set(Some(Ejection::Stopping));
    }

    /// The pinger sent a ping at `now`.
    fn pinged(&self, now: Instant) {
        if self.health.ping_since.get().is_none() {
            self.health.ping_since.set(Some(now));
        }
    }

    /// Run by the shard's sweeper after [`TaskLink::expire`]: ejects the link after
    /// `eject_after` consecutive timeouts (0: never) or a ping unanswered for `pong_timeout`
    /// (None: never), and reports a link the reader found answering again. Each change is
    /// returned once, for the shard to tell the control thread.
    pub(crate) fn health_step(
        &self,
        now: Instant,
        eject_after: u32,
        pong_timeout: Option<Duration>,
    ) -> Option<HealthChange> {
        let h = &self.health;
        if !self.alive.get() {
            return None;
        }
        if h.ejected.get().is_none() {
            if eject_after > 0 && h.timeouts.get() >= eject_after {
                h.timeouts.set(0);
                h.ejected.set(Some(Ejection::Timeouts));
            } else if pong_timeout.is_some_and(|t| {
                h.ping_since
                    .get()
                    .is_some_and(|since| now.saturating_duration_since(since) >= t)
            }) {
                h.ejected.set(Some(Ejection::Pongs));
            }
        }
        match (h.ejected.get(), h.reported.get()) {
            (Some(why), false) => {
                h.reported.set(true);
                Some(HealthChange::Ejected(why))
            }
            (None, true) => {
                h.reported.set(false);
                Some(HealthChange::Readmitted)
            }
            _ => None,
        }
    }

    /// Handles one binary message from the other side: an answer or a Redirect. `Ok(false)`
    /// for a frame of another kind (a Request, a SecretPush), which nothing sends on this
    /// link: not acted on, for the caller to count.
    pub(crate) fn on_binary(&self, b: Bytes) -> Result<bool, ws::WsError> {
        match Frame::decode(b) {
            Ok(f) => {
                let answer = matches!(f.header.kind, Kind::Response | Kind::Redirect);
                self.health.heard(answer);
                if answer {
                    on_frame(self, f);
                }
                Ok(answer)
            }
            Err(e) => {
                tracing::warn!(task = self.task, "bad frame from task: {e}");
                Err(ws::WsError::Protocol("bad fedbus frame"))
            }
        }
    }

    /// Requests sent on this link and not answered yet.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Requests sent on this link so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.get()
    }

    /// Open and not closing, ejected or not.
    pub(crate) fn is_open(&self) -> bool {
        self.alive.get() && !self.out.borrow().is_closing()
    }

    /// Alive, not ejected and not closing: can still carry requests (maybe not now, if full).
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.get() && self.health.ejected.get().is_none() && !self.out.borrow().is_closing()
    }

    /// Alive, not ejected, not retired and below the pending limit.
    pub(crate) fn is_usable(&self, max_pending: usize) -> bool {
        self.health.ejected.get().is_none() && self.takes_requests(max_pending)
    }

    /// Alive, not retired, not closing and below the pending limit, ejected or not: a peer
    /// link out of routing for its timeouts is still a last resort (`peer::Peers::pick`).
    pub(crate) fn takes_requests(&self, max_pending: usize) -> bool {
        self.alive.get()
            && !self.retired.get()
            && self.pending.borrow().len() < max_pending
            && !self.out.borrow().is_closing()
    }

    /// Out of routing ([`TaskLink::health_step`]).
    pub(crate) fn is_ejected(&self) -> bool {
        self.health.ejected.get().is_some()
    }

    /// From now on the link takes no new request (see [`TaskLink::retired`]).
    pub(crate) fn retire(&self) {
        self.retired.set(true);
    }

    /// Queues a request frame (`head` = fedbus header + metadata) and registers it as pending
    /// until `deadline`. A refused send hands the payload back.
    pub(crate) fn send_request(
        self: &Rc<Self>,
        id: u64,
        head: &[u8],
        payload: &Bytes,
        deadline: Instant,
    ) -> Result<Wait, crate::ws::Refused> {
        if !self.alive.get() {
            return Err(crate::ws::Refused);
        }
        let frame = {
            let mut out = self.out.borrow_mut();
            out.send_binary(head, payload)?;
            out.last_frame()
        };
        self.pending.borrow_mut().insert(
            id,
            Slot {
                waker: None,
                reply: None,
                deadline,
                frame,
            },
        );
        self.sent.set(self.sent.get() + 1);
        Ok(Wait {
            link: self.clone(),
            id,
            done: false,
        })
    }

    fn complete(&self, id: u64, reply: Reply) {
        if let Some(slot) = self.pending.borrow_mut().get_mut(&id) {
            if slot.reply.is_none() {
                // Its frame is written by now, unless a task answers what it has not read
                // (request ids are easy to guess): then the frame must not keep the client's
                // buffer either. A number past the writer costs a subtraction.
                slot.give_up(reply, &mut self.out.borrow_mut());
            }
        }
    }

    /// Answers `Timeout` to every request past its deadline; counts them towards ejection.
    pub(crate) fn expire(&self, now: Instant) {
        let mut timed_out = 0u32;
        for slot in self.pending.borrow_mut().values_mut() {
            if slot.reply.is_none() && slot.deadline <= now {
                slot.give_up(Reply::Timeout, &mut self.out.borrow_mut());
                timed_out += 1;
            }
        }
        let t = &self.health.timeouts;
        t.set(t.get().saturating_add(timed_out));
    }

    /// Marks the link dead and answers everything pending on it with `Lost`.
    pub(crate) fn fail_all(&self) {
        self.alive.set(false);
        for slot in self.pending.borrow_mut().values_mut() {
            if slot.reply.is_none() {
                // The close frame is queued behind what waits: a slow reader could take
                // a while to get there.
                slot.give_up(Reply::Lost, &mut self.out.borrow_mut());
            }
        }
    }
}

/// Waits for the answer to one request; dropping it forgets the request.
pub(crate) struct Wait {
    link: Rc<TaskLink>,
    id: u64,
    done: bool,
}

impl Future for Wait {
    type Output = Reply;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let id = self.id;
        let mut pending = self.link.pending.borrow_mut();
        let Some(slot) = pending.get_mut(&id) else {
            drop(pending);
            self.done = true;
            return Poll::Ready(Reply::Lost);
        };
        if let Some(r) = slot.reply.take() {
            pending.remove(&id);
            drop(pending);
            self.done = true;
            return Poll::Ready(r);
        }
        match &slot.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if !self.done {
            let slot = self.link.pending.borrow_mut().remove(&self.id);
            // Forgotten before its answer (its client is gone): its frame may still wait, as a
            // slice of the client's read buffer ([`WsOut::own_payload`]; one given up already
            // was copied then). The outbox is never borrowed across an await, and no outbox
            // method drops a request, so the borrow does not fail.
            if let (Some(slot), Ok(mut out)) = (slot, self.link.out.try_borrow_mut()) {
                if slot.reply.is_none() {
                    out.own_payload(slot.frame);
                }
            }
        }
    }
}

/// Why a connection on the internal listener was closed before its task link registered:
/// the `reason` label of `fedbus_task_link_refused_total` (index = the metric's slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkRefusal {
    /// The upgrade head or the registration did not arrive within
    /// `limits.handshake_timeout_ms` (connection closed; 1002 once upgraded).
    HandshakeTimeout = 0,
    /// The registration is over its size bound (`register_bound`): 1009.
    RegisterTooBig = 1,
    /// The registration broke a rule of `registration_refusal`: 1008.
    RegisterRefused = 2,
    /// The first message after the hello is not a registration: 1002.
    NoRegistration = 3,
}

impl LinkRefusal {
    /// The `reason` labels, by slot.
    pub(crate) const LABELS: [&'static str; 4] = [
        "handshake_timeout",
        "register_too_big",
        "register_refused",
        "no_registration",
    ];

    /// Counts this refusal on `shard`.
    fn count(self, shard: &Shard) {
        ShardMetrics::inc(&shard.metrics.task_link_refused[self as usize]);
    }
}

/// The error of [`read_upgrade`] when the head did not come in time.
pub(crate) const HANDSHAKE_TIMEOUT: &str =
    "upgrade head not complete within limits.handshake_timeout_ms";

fn http_error(status: u16, code: &str, msg: &str) -> String {
    handshake::error_response(status, code, msg)
}

/// The message of the `400 tls_required` a plaintext task link upgrade gets with
/// `listen.internal_tls`.
const PLAIN_LINK_HINT: &str =
    "task links on this listener speak TLS: dial it with TLS (fedbus task --tls-ca)";

/// Serves one connection on the internal listener until it closes; with
/// `listen.internal_tls`, after a TLS handshake (the api listener's certificates).
pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let m = shard.metrics.clone();
    ShardMetrics::inc(&m.connections[Listener::Internal as usize]);
    let peer = stream.peer_addr().ok();
    // The TLS handshake and the upgrade head share one deadline from accept.
    let accepted = Instant::now();
    let hs = shard.handshake(Listener::Internal);
    let served = match (&shard.tls, shard.cfg.listen.internal_tls) {
        (Some(acceptor), true) => {
            let limit = Duration::from_millis(shard.cfg.limits.handshake_timeout_ms);
            match hs
                .step(crate::tls::accept(acceptor, stream, limit, PLAIN_LINK_HINT))
                .await
            {
                Ok(Ok(tls)) => {
                    ShardMetrics::inc(&m.tls_handshakes);
                    serve_inner(&shard, tls, accepted, hs).await
                }
                Ok(Err(e)) => {
                    ShardMetrics::inc(&m.tls_handshake_failures);
                    Err(format!("TLS handshake failed: {e}"))
                }
                Err(evicted) => Err(evicted.to_string()),
            }
        }
        _ => serve_inner(&shard, stream, accepted, hs).await,
    };
    log_closed(&shard, served, peer);
    ShardMetrics::dec(&m.connections[Listener::Internal as usize]);
}

/// Logs why a connection on the internal listener ended; one closed in its handshake for room
/// was logged by the gate of its eviction (a flood of them would be a line each).
fn log_closed(shard: &Shard, served: Result<(), String>, peer: Option<std::net::SocketAddr>) {
    match served {
        Err(e) if e != unproven::EVICTED => {
            tracing::info!(shard = shard.index, ?peer, "task link closed: {e}")
        }
        _ => {}
    }
}

/// Serves one connection on the unix task-link listener (`listen.internal_unix`) until it
/// closes: the same protocol as [`serve`], never TLS.
pub(crate) async fn serve_unix(shard: Rc<Shard>, stream: glommio::net::UnixStream) {
    let m = shard.metrics.clone();
    ShardMetrics::inc(&m.connections[Listener::Internal as usize]);
    let hs = shard.handshake(Listener::Internal);
    log_closed(
        &shard,
        serve_inner(&shard, stream, Instant::now(), hs).await,
        None,
    );
    ShardMetrics::dec(&m.connections[Listener::Internal as usize]);
}

/// Writes a refusal of the upgrade (HTTP error head) and flushes it.
async fn refuse<S: futures_lite::AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    code: &str,
    msg: &str,
) {
    let _ = stream
        .write_all(http_error(status, code, msg).as_bytes())
        .await;
    let _ = stream.flush().await;
}

/// Reads the upgrade request head within the handshake timeout.
pub(crate) async fn read_upgrade<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(handshake::UpgradeRequest, BytesMut), String> {
    let mut buf = BytesMut::with_capacity(4096);
    let read = async {
        loop {
            match handshake::parse_upgrade(&buf) {
                Ok(Some(up)) => return Ok(up),
                Ok(None) => {}
                Err(r) => {
                    let _ = stream
                        .write_all(http_error(r.status, r.code, r.message).as_bytes())
                        .await;
                    let _ = stream.flush().await;
                    return Err(format!("bad upgrade: {}", r.message));
                }
            }
            // On the heap, not in every link's future for its life.
            let mut chunk = vec![0u8; 4096];
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during handshake".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let up = glommio::timer::timeout(timeout, async { Ok(read.await) })
        .await
        .map_err(|_| HANDSHAKE_TIMEOUT.to_string())??;
    let _ = buf.split_to(up.head_len);
    Ok((up, buf))
}

/// Serves a task link accepted at `accepted`: its upgrade head must be in within
/// `limits.handshake_timeout_ms` of that, a TLS handshake before it included. Until its
/// service token is verified, `hs` lets a newer connection close it for room.
async fn serve_inner<S: ws::Stream>(
    shard: &Rc<Shard>,
    mut stream: S,
    accepted: Instant,
    hs: Handshake,
) -> Result<(), String> {
    let limits = &shard.cfg.limits;
    let hs_timeout = Duration::from_millis(limits.handshake_timeout_ms);
    let head = read_upgrade(&mut stream, hs_timeout.saturating_sub(accepted.elapsed()));
    let (up, leftover) = hs
        .step(head)
        .await
        .map_err(str::to_string)?
        .inspect_err(|e| {
            if e == HANDSHAKE_TIMEOUT {
                LinkRefusal::HandshakeTimeout.count(shard);
            }
        })?;

    // The service token is checked before the upgrade completes.
    let claims = {
        let keys = shard.snapshots.keys.load();
        let Some(tok) = up.bearer.as_deref() else {
            let _ = hs
                .step(refuse(
                    &mut stream,
                    401,
                    "missing_token",
                    "service token required",
                ))
                .await;
            return Err("no service token".into());
        };
        match verify_service_token(
            &keys.keyring.cluster,
            tok,
            auth::now_unix(),
            shard.cfg.auth.grace_secs,
        ) {
            Ok(c) if c.cluster == shard.cfg.cluster_id() => c,
            Ok(c) => {
                let _ = hs
                    .step(refuse(
                        &mut stream,
                        401,
                        "wrong_cluster",
                        "service token of another cluster",
                    ))
                    .await;
                return Err(format!("service token for cluster {}", c.cluster));
            }
            Err(e) => {
                let why = e.to_string();
                let _ = hs
                    .step(refuse(&mut stream, e.http_status(), e.code(), &why))
                    .await;
                return Err(format!("service token refused: {e}"));
            }
        }
    };
    // Closed for room in the meantime: its slot is a newer connection's.
    hs.proven().map_err(str::to_string)?;
    stream
        .write_all(handshake::accept_response(&up.key).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let max_msg = limits.max_message_bytes();
    let tcp = stream.socket();
    let _ = tcp.set_write_timeout(Some(Duration::from_millis(limits.ping_interval_ms * 3)));
    // Frames are batched by the writer already; Nagle would only delay the last one.
    let _ = tcp.set_nodelay();
    tcp.set_read_timeout(Some(Duration::from_millis(limits.ping_interval_ms * 3)))
        .map_err(|e| e.to_string())?;

    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        stream,
        leftover,
        Side::Server,
        register_bound(&shard.snapshots.apps.load().apps),
        limits,
    );

    let hello = Hello {
        kind: "hello".into(),
        router: shard.router_name.clone(),
        cluster: shard.cfg.cluster_id(),
        shard: shard.index,
        shards: shard.count,
        internal: shard
            .internal_addrs
            .iter()
            .map(|a| match &shard.cfg.listen.advertise_host {
                Some(h) => format!("{h}:{}", a.port()),
                None => a.to_string(),
            })
            .collect(),
        internal_unix: match &shard.cfg.listen.internal_unix {
            Some(p) => (0..shard.count)
                .map(|k| crate::shard::listen::unix_path(p, k).display().to_string())
                .collect(),
            None => Vec::new(),
        },
        max_message: Some(max_msg as u64),
    };
    let _ = out
        .borrow_mut()
        .send_text(&serde_json::to_string(&hello).unwrap_or_default());

    // The registration is the first data message after the hello. Pings before it are
    // answered (RFC 6455 allows control frames at any time, and their rate is bounded); the
    // whole wait is `limits.handshake_timeout_ms`.
    let first = glommio::timer::timeout(hs_timeout, async {
        loop {
            match reader.next().await {
                Ok(Message::Ping(p)) => out.borrow_mut().send_control(ws::frame::opcode::PONG, &p),
                Ok(Message::Pong(_)) => {}
                other => return Ok(other),
            }
        }
    })
    .await;
    // What ends the link before a registration: (reason counted, close code or None to drop
    // the socket, log message).
    let refusal = match first {
        Ok(Ok(Message::Text(t))) => match serde_json::from_slice::<Register>(&t) {
            Ok(r) if r.kind == "register" => Ok(r),
            _ => Err((
                Some(LinkRefusal::NoRegistration),
                Some(1002),
                "no registration".into(),
            )),
        },
        // The task closed first: answered, not a refusal.
        Ok(Ok(Message::Close(_))) => Err((None, Some(1000), "closed before registering".into())),
        Ok(Ok(_)) => Err((
            Some(LinkRefusal::NoRegistration),
            Some(1002),
            "no registration".into(),
        )),
        // Over the register bound: 1009 before the rest of it is read.
        Ok(Err(e @ ws::WsError::TooBig(_))) => Err((
            Some(LinkRefusal::RegisterTooBig),
            Some(1009),
            format!("registration refused: {e}"),
        )),
        Ok(Err(ws::WsError::Io(e))) if e.kind() == std::io::ErrorKind::TimedOut => Err((
            Some(LinkRefusal::HandshakeTimeout),
            Some(1002),
            "no registration within limits.handshake_timeout_ms".into(),
        )),
        Err(_) => Err((
            Some(LinkRefusal::HandshakeTimeout),
            Some(1002),
            "no registration within limits.handshake_timeout_ms".into(),
        )),
        // A frame that breaks RFC 6455 gets its own close code (1002, 1007 bad UTF-8, 1008 a
        // control frame flood); a connection that just ends was not refused.
        Ok(Err(e)) => match e.close_code() {
            Some(code) => Err((
                Some(LinkRefusal::NoRegistration),
                Some(code),
                format!("no registration: {e}"),
            )),
            None => Err((None, None, format!("ended before a registration: {e}"))),
        },
    };
    let reg = match refusal {
        Ok(r) => r,
        Err((reason, code, why)) => {
            if let Some(r) = reason {
                r.count(shard);
            }
            if code == Some(1008) && reason == Some(LinkRefusal::NoRegistration) {
                // A control frame flood: counted as on a registered link.
                ShardMetrics::inc(&shard.metrics.abusive_closed);
            }
            match code {
                Some(c) => out.borrow_mut().close(c),
                None => out.borrow_mut().abort(),
            }
            let _ = writer.await;
            return Err(why);
        }
    };
    reader.set_max_message(max_msg);
    let app_partitions = shard
        .snapshots
        .apps
        .load()
        .apps
        .iter()
        .find(|a| a.name == reg.app)
        .map(|a| a.partitions);
    let holder = shard
        .links
        .borrow()
        .get(&reg.task)
        // An ejected link still holds its task id: only its own task may replace it.
        .filter(|l| l.is_open())
        .map(|l| (l.app.clone(), l.role.clone()));
    let refusal = registration_refusal(
        &reg,
        &claims,
        app_partitions,
        holder.as_ref().map(|(a, r)| (a.as_str(), r.as_str())),
    )
    .or_else(|| {
        // The roles of the routing table, and those of this shard's own open links of the
        // app (registered here since that table, or ejected from it and still open).
        let table = shard.snapshots.routes.load();
        let links = shard.links.borrow();
        let served = table.apps.get(reg.app.as_str()).map(|a| {
            let own = links.values().filter(|l| l.app == reg.app && l.is_open());
            a.roles
                .keys()
                .map(String::as_str)
                .chain(own.map(|l| l.role.as_str()))
        });
        roles_refusal(served, &reg.role, limits.max_roles_per_app)
    });
    if let Some((code, why)) = refusal {
        LinkRefusal::RegisterRefused.count(shard);
        out.borrow_mut().close_with_reason(1008, code);
        let _ = writer.await;
        return Err(format!("registration refused ({code}): {why}"));
    }

    let link = Rc::new(TaskLink {
        partitions: reg.partitions.clone(),
        exp: Cell::new(claims.exp),
        kid: Cell::new(claims.kid),
        key_until: Cell::new(key_until(shard, claims.kid)),
        ..TaskLink::new(reg.task, reg.app.clone(), reg.role.clone(), out.clone())
    });
    let replaced = shard.links.borrow_mut().insert(reg.task, link.clone());
    if let Some(old) = replaced {
        old.fail_all();
        old.out.borrow_mut().close(1008);
    }
    let _ = out.borrow_mut().send_text(
        &serde_json::to_string(&Registered {
            kind: "registered".into(),
            shard: shard.index,
        })
        .unwrap_or_default(),
    );
    if shard.router_draining.get() {
        // Accepted just before the listener closed: told as the links told before it.
        let _ = out.borrow_mut().send_text(renew::ROUTER_DRAINING);
    }
    let _ = shard.events.send(ControlEvent::Register {
        shard: shard.index,
        reg: Registration {
            task: reg.task,
            app: reg.app.clone(),
            role: reg.role.clone(),
            partitions: reg.partitions.clone(),
        },
    });
    ShardMetrics::inc(&shard.metrics.task_links);
    tracing::info!(shard = shard.index, task = reg.task, app = %reg.app, role = %reg.role, partitions = reg.partitions.len(), sub = %claims.sub, "task link registered");

    // Keepalive: a ping every interval; the read timeout (3 intervals) ends a silent link.
    let pinger = spawn_pinger(link.clone(), Duration::from_millis(limits.ping_interval_ms));
    let expiry = {
        let l = link.clone();
        let what = format!("task link of task {}", link.task);
        close_at_expiry(shard.clone(), link.out.clone(), move || l.exp.get(), what)
    };

    // The app's Auth Service gets the current app secret now and after every rotation (a new
    // version once it is `auth.secret_publish_delay_secs` old).
    let pusher = (reg.role == AUTH_ROLE).then(|| {
        let (shard, link) = (shard.clone(), link.clone());
        glommio::spawn_local(async move {
            // The keyring generation and the version last pushed.
            let mut pushed = (0u64, 0u32);
            let mut timer = crate::util::Deadline::new();
            let delay = shard.cfg.auth.secret_publish_delay_secs;
            while link.alive.get() {
                let keys = shard.snapshots.keys.load();
                let sec = keys
                    .keyring
                    .published_app_secret(&link.app, auth::now_unix(), delay);
                let version = sec.map_or(0, |s| s.version);
                if (keys.generation, version) != pushed {
                    // Advance only once the push is queued: a full outbox retries next tick.
                    match sec {
                        Some(sec) => {
                            if push_secret(&link, &link.app, sec.version, &sec.secret) {
                                pushed = (keys.generation, version);
                            }
                        }
                        None => pushed = (keys.generation, version),
                    }
                }
                drop(keys);
                timer.sleep(Duration::from_millis(100)).await;
            }
        })
    });

    // A link we close (expiry, replacement, drain) gets `limits.handshake_timeout_ms` to close
    // its end too.
    let read = read_loop(shard, &link, &mut reader, |t| on_text(shard, &link, &t));
    let end = ws::conn::until_closed_or_late(shard, &out, read).await;
    drop(expiry.cancel());
    if let Some(p) = pusher {
        drop(p.cancel());
    }

    // Closed first: an aborted outbox holds no frame for `fail_all` to copy out of a client's
    // buffer (one closed with a code still writes what waits, the close frame last).
    match &end {
        Err(e) => match e.close_code() {
            Some(code) => out.borrow_mut().close(code),
            None => out.borrow_mut().abort(),
        },
        Ok(()) => out.borrow_mut().close(1000),
    }
    // Leave the routing table at once, then answer everything pending with 502.
    link.fail_all();
    let current = {
        let mut links = shard.links.borrow_mut();
        let current = links.get(&reg.task).is_some_and(|l| Rc::ptr_eq(l, &link));
        if current {
            links.remove(&reg.task);
        }
        current
    };
    // A link replaced by a newer one of the same task must not unregister the newer one.
    if current {
        let _ = shard.events.send(ControlEvent::Unregister {
            shard: shard.index,
            task: reg.task,
        });
    }
    ShardMetrics::dec(&shard.metrics.task_links);
    if link.health.reported.get() {
        ShardMetrics::dec(&shard.metrics.task_links_ejected);
    }
    if let Err(e @ ws::WsError::Policy(_)) = &end {
        ShardMetrics::inc(&shard.metrics.abusive_closed);
        tracing::warn!(
            shard = shard.index,
            task = reg.task,
            "task link closed: {e}"
        );
    }
    drop(pinger.cancel());
    let _ = writer.await;
    end.map_err(|e| e.to_string())
}

async fn read_loop<R: futures_lite::AsyncRead + Unpin>(
    shard: &Shard,
    link: &TaskLink,
    reader: &mut WsReader<R>,
    mut on_text: impl FnMut(Bytes),
) -> Result<(), ws::WsError> {
    // The first frame of a kind a task does not send is logged, every one counted: the link
    // serves on (PROTOCOL.md section 6), and a line per frame would let a task flood the log.
    let mut logged = false;
    loop {
        match reader.next().await? {
            Message::Binary(b) => {
                if !link.on_binary(b)? {
                    ShardMetrics::inc(&shard.metrics.task_protocol_errors);
                    if !std::mem::replace(&mut logged, true) {
                        tracing::warn!(
                            shard = shard.index,
                            task = link.task,
                            "task sent a frame of a kind tasks do not send (a Request or a SecretPush): ignored, and counted in fedbus_task_protocol_errors_total (logged once per link)"
                        );
                    }
                }
            }
            Message::Ping(p) => {
                link.health.heard(false);
                link.out
                    .borrow_mut()
                    .send_control(ws::frame::opcode::PONG, &p)
            }
            Message::Pong(_) => link.health.heard(false),
            Message::Text(t) => {
                link.health.heard(false);
                on_text(t)
            }
            Message::Close(_) => return Ok(()),
        }
    }
}

/// Why a registration is refused, if it is: `(code, message)`, the chain of checks after the
/// service token verified. `app_partitions` is the configured partition count of the app it
/// names (None: not an app of this router); `holder` the app and role of a live link that
/// already has the task id. Pure, so every rule is tested without a socket.
///
/// The code is the close reason of the 1008 that refuses it: `wrong_token` when the token does
/// not allow the registration (another app, another role, role `auth` without a token naming
/// it: the same code a `renew` of such a token gets), `unknown_app`, `bad_role`,
/// `bad_partitions`, `task_id_in_use` for what the registration asks.
pub(crate) fn registration_refusal(
    reg: &Register,
    claims: &auth::ServiceClaims,
    app_partitions: Option<u32>,
    holder: Option<(&str, &str)>,
) -> Option<(&'static str, &'static str)> {
    if reg.app != claims.app {
        Some((
            "wrong_token",
            "registration for an app the service token does not name",
        ))
    } else if app_partitions.is_none() {
        Some(("unknown_app", "unknown app"))
    } else if reg.role.is_empty() || reg.role.len() > 64 {
        Some(("bad_role", "bad role"))
    } else if reg.partitions.iter().any(|p| Some(*p) >= app_partitions) {
        Some(("bad_partitions", "partition out of range"))
    } else if app_partitions.is_some_and(|n| reg.partitions.len() > n as usize) {
        // Each partition once at most: a longer list only costs the router memory.
        Some(("bad_partitions", "more partitions than the app has"))
    } else if holder.is_some_and(|(app, role)| app != reg.app || role != reg.role) {
        // A task id names one task of one app and role; another may not take it over.
        Some(("task_id_in_use", "task id in use by another app or role"))
    } else if claims.role.as_deref().is_some_and(|r| r != reg.role) {
        Some(("wrong_token", "the service token names another role"))
    } else if reg.role == AUTH_ROLE && claims.role.as_deref() != Some(AUTH_ROLE) {
        // Role auth receives the app secret: only a token that names it may register there.
        Some((
            "wrong_token",
            "role auth needs a service token with role auth",
        ))
    } else {
        None
    }
}

/// `too_many_roles` when `role` is not among the roles `served` (those of the app in the
/// routing table this shard holds, where `main` always is, and of this shard's own open links
/// of the app) and they number `max` already: each role costs every routing table built a slot
/// per partition (`limits.max_roles_per_app`). None when the app is not in the table (`served`
/// None; the refusal chain said `unknown_app`). Each shard counts its own registrations at
/// once and the others' once the control thread has published them, so shards registering new
/// roles at the same instant can pass the limit by what each let in meanwhile: at most
/// `max` per shard, never without bound.
pub(crate) fn roles_refusal<'a>(
    served: Option<impl Iterator<Item = &'a str>>,
    role: &str,
    max: usize,
) -> Option<(&'static str, &'static str)> {
    let served: std::collections::BTreeSet<&str> = served?.collect();
    (!served.contains(role) && served.len() >= max).then_some((
        "too_many_roles",
        "the app serves limits.max_roles_per_app roles already",
    ))
}

/// The largest `register` message a task can legitimately send to this router: its fields and
/// every partition of the largest app once (at most 7 digits and a comma each). Bigger ones
/// close the link with 1009 before they are buffered (a task once sent 7 MiB lists).
pub(crate) fn register_bound(apps: &[crate::config::App]) -> usize {
    let most = apps
        .iter()
        .map(|a| a.partitions as usize)
        .max()
        .unwrap_or(0);
    4096 + 8 * most
}

/// Role of the app's Auth Service: it receives the app secret over its links.
pub(crate) const AUTH_ROLE: &str = "auth";

/// Sends a SecretPush frame (docs/PROTOCOL.md): APP, VERSION, payload = the secret.
fn push_secret(link: &TaskLink, app: &str, version: u32, secret: &[u8]) -> bool {
    let mut meta = BytesMut::with_capacity(64);
    crate::proto::put_meta(&mut meta, crate::proto::tag::APP, app.as_bytes());
    crate::proto::put_meta_u64(&mut meta, crate::proto::tag::VERSION, version as u64);
    let f = crate::proto::encode_frame(Kind::SecretPush, 0, 0, 0, 0, &meta, secret);
    let ok = link.out.borrow_mut().send_binary(&f, &Bytes::new()).is_ok();
    if ok {
        tracing::info!(
            task = link.task,
            app,
            version,
            "app secret pushed to auth task"
        );
    }
    ok
}

/// The longest an expiry timer sleeps before it looks at the link's expiry again.
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);

/// Closes `out` with 1008 when the link's credential expires: `exp()` (unix seconds), read again
/// on each wake, as an accepted `renew` moves it (docs/PROTOCOL.md sections 4 and 10). A link is
/// authenticated at its upgrade, so it must not outlive its token. Counted in
/// `fedbus_links_revoked_total`; `what` names the link in the log (`task 7`, `peer link from
/// ru/spb2`).
pub(crate) fn close_at_expiry(
    shard: Rc<Shard>,
    out: Rc<RefCell<WsOut>>,
    exp: impl Fn() -> u64 + 'static,
    what: String,
) -> glommio::Task<()> {
    glommio::spawn_local(async move {
        // Wakes at least once a minute: a renew may have brought a token that expires sooner.
        while auth::now_unix() < exp() {
            let wait = auth::expiry_wait(exp(), auth::now_unix()).min(EXPIRY_RECHECK);
            glommio::timer::sleep(wait).await;
        }
        let mut o = out.borrow_mut();
        if !o.is_closing() {
            ShardMetrics::inc(&shard.metrics.links_revoked);
            tracing::warn!(
                shard = shard.index,
                "{what} closed: its token expired (1008)"
            );
            o.close(1008);
        }
    })
}

/// Until when (unix seconds) a service token signed by cluster key version `kid` verifies on
/// `shard`'s keyring under the rotation rule: `u64::MAX` for the newest version, the end of
/// its grace for a replaced one, 0 once retired or unknown.
pub(crate) fn key_until(shard: &Shard, kid: u32) -> u64 {
    let keys = shard.snapshots.keys.load();
    let (now, grace) = (auth::now_unix(), shard.cfg.auth.grace_secs);
    auth::check_version(&keys.keyring.cluster, kid, now, grace).verifies_until()
}

/// At most one `renew` per second on a link: each refusal queues a reply, so a link that
/// kept renewing would grow its outbox and the log as fast as it sends.
#[derive(Default)]
pub(crate) struct RenewGate {
    /// When the last `renew` was let through to be verified.
    renewed_at: Cell<Option<Instant>>,
    /// A renew within a second of the one before was refused (`too_often`) since then.
    refused_too_soon: Cell<bool>,
}

/// What to do with a `renew` ([`RenewGate::pass`]).
pub(crate) enum Gate {
    /// Verify it.
    Verify,
    /// Refuse it `too_often`.
    TooSoon,
    /// A second one too soon: close the link (1008, counted as abuse).
    Close,
}

impl RenewGate {
    pub(crate) fn pass(&self, now: Instant) -> Gate {
        let too_soon = self
            .renewed_at
            .get()
            .is_some_and(|t| now.saturating_duration_since(t) < renew::MIN_RENEW_INTERVAL);
        if !too_soon {
            self.renewed_at.set(Some(now));
            self.refused_too_soon.set(false);
            Gate::Verify
        } else if self.refused_too_soon.replace(true) {
            Gate::Close
        } else {
            Gate::TooSoon
        }
    }
}

/// What a `renew` verified: its `exp` (the link's state already moved), or the refusal's error
/// code a refused upgrade would get and a message.
pub(crate) type RenewVerdict = Result<u64, (&'static str, String)>;

/// A text message on a link that takes `renew` (a task link, an accepted peer link): anything
/// else is ignored, and so is all once the link is closing (what still comes is only read to
/// see the other side's close). At most one per second goes to `verify`, which checks the
/// token as the upgrade did and, if good, moves the link's expiry and key version; the answer
/// is `{"type":"renewed","exp":N}` or `{"type":"renew_refused","error":...,"message":...}`
/// (the link then lives until its current token expires), counted in `counter[0]` (accepted)
/// or `counter[1]` (refused). A second renew within a second is refused `too_often`, a third
/// closes the link with 1008 (`fedbus_abusive_closed_total`). `what` names the link in logs.
pub(crate) fn handle_renew(
    shard: &Shard,
    out: &RefCell<WsOut>,
    gate: &RenewGate,
    counter: &[AtomicU64; 2],
    what: &dyn std::fmt::Display,
    text: &[u8],
    verify: impl FnOnce(&str) -> RenewVerdict,
) {
    let Some(token) = renew::renew_token(text) else {
        return;
    };
    if out.borrow().is_closing() {
        return;
    }
    let verdict = match gate.pass(Instant::now()) {
        Gate::Close => {
            ShardMetrics::inc(&shard.metrics.abusive_closed);
            tracing::warn!(
                shard = shard.index,
                "{what} closed: renews faster than one per second"
            );
            out.borrow_mut().close(1008);
            return;
        }
        Gate::TooSoon => Err(("too_often", "at most one renew per second".to_string())),
        Gate::Verify => verify(&token),
    };
    let reply = match verdict {
        Ok(exp) => {
            ShardMetrics::inc(&counter[0]);
            tracing::info!(shard = shard.index, exp, "{what}: credential renewed");
            renew::renewed(exp)
        }
        Err((code, message)) => {
            ShardMetrics::inc(&counter[1]);
            tracing::warn!(shard = shard.index, code, %message, "{what}: renew refused");
            renew::renew_refused(code, &message)
        }
    };
    let _ = out.borrow_mut().send_text(&reply);
}

/// Tells every task linked to this draining shard `{"type":"router_draining"}` (PROTOCOL.md
/// section 4), once the shard's internal listeners are closed: a dial to the same address
/// then reaches the router that took it over, never this one, so a task may open its new
/// link at once while this one still carries what this router routes to it. A link that
/// registers later is told at its registration.
pub(crate) fn tell_router_draining(shard: &Shard) {
    shard.router_draining.set(true);
    let links = shard.links.borrow();
    for l in links.values() {
        let _ = l.out.borrow_mut().send_text(renew::ROUTER_DRAINING);
    }
    tracing::info!(
        shard = shard.index,
        links = links.len(),
        "draining: told the task links to link again"
    );
}

/// A text message from a registered task: a `renew` ([`handle_renew`]) must carry a service
/// token of the link's app, role and cluster.
fn on_text(shard: &Shard, link: &TaskLink, text: &[u8]) {
    if renew::is_draining(text) {
        if link.health.ejected.get() != Some(Ejection::Stopping) {
            tracing::info!(
                shard = shard.index,
                task = link.task,
                "task stopping: its link leaves routing and answers what it holds"
            );
            link.stopping();
        }
        // After every request routed to the link (routing appends to this same outbox, and
        // no request is routed to it from now on): the task may close once it answered them.
        let _ = link.out.borrow_mut().send_text(renew::DRAINED);
        return;
    }
    let what = format_args!("task link of task {}", link.task);
    handle_renew(
        shard,
        &link.out,
        &link.renew_gate,
        &shard.metrics.task_renewals,
        &what,
        text,
        |token| {
            let keys = shard.snapshots.keys.load();
            let grace = shard.cfg.auth.grace_secs;
            let c = verify_service_token(&keys.keyring.cluster, token, auth::now_unix(), grace)
                .map_err(|e| (e.code(), e.to_string()))?;
            if let Some(why) = renewal_refusal(&link.app, &link.role, &c, &shard.cfg.cluster_id()) {
                return Err(("wrong_token", why.to_string()));
            }
            link.exp.set(c.exp);
            link.kid.set(c.kid);
            link.key_until.set(key_until(shard, c.kid));
            Ok(c.exp)
        },
    );
}

/// Why a verified service token may not renew a link registered for `app` in `role`: the
/// same rules as at the registration (docs/PROTOCOL.md section 2).
pub(crate) fn renewal_refusal(
    app: &str,
    role: &str,
    claims: &auth::ServiceClaims,
    cluster: &str,
) -> Option<&'static str> {
    if claims.cluster != cluster {
        Some("service token of another cluster")
    } else if claims.app != app {
        Some("service token of another app")
    } else if claims.role.as_deref().is_some_and(|r| r != role) {
        Some("the service token names another role")
    } else if role == AUTH_ROLE && claims.role.as_deref() != Some(AUTH_ROLE) {
        Some("role auth needs a service token with role auth")
    } else {
        None
    }
}

/// Pings the task every `every` (the same pings as `ws::spawn_pinger`), noting when a ping
/// goes out so that an unanswered one can eject the link (`limits.task_pong_timeout_ms`).
fn spawn_pinger(link: Rc<TaskLink>, every: Duration) -> glommio::Task<()> {
    glommio::spawn_local(async move {
        let mut timer = crate::util::Deadline::new();
        loop {
            timer.sleep(every).await;
            let mut o = link.out.borrow_mut();
            if o.is_closing() {
                break;
            }
            o.send_control(ws::frame::opcode::PING, b"");
            drop(o);
            link.pinged(Instant::now());
        }
    })
}

/// An answer or a Redirect ([`TaskLink::on_binary`] sends no other kind here).
fn on_frame(link: &TaskLink, f: Frame) {
    let id = f.header.request_id;
    match f.header.kind {
        Kind::Response => link.complete(id, Reply::Response(f)),
        Kind::Redirect => {
            let role = f.get_str(crate::proto::tag::ROLE).unwrap_or("").to_string();
            let partition = match f.get(crate::proto::tag::PARTITION) {
                None => Ok(None),
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(crate::proto::parse_decimal::<u32>)
                    .map(Some)
                    .ok_or(()),
            };
            link.complete(id, Reply::Redirect { role, partition });
        }
        Kind::Request | Kind::SecretPush => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{registration_refusal, Ejection, HealthChange, Register, TaskLink};
    use crate::auth::ServiceClaims;
    use crate::ws::{Side, WsOut};
    use std::time::{Duration, Instant};

    fn link() -> TaskLink {
        TaskLink::new(
            7,
            "demo/echo".into(),
            "main".into(),
            WsOut::new(Side::Server, 1 << 20),
        )
    }

    #[test]
    fn renewal_keeps_app_role_and_cluster() {
        let r = |c: &ServiceClaims, role: &str| {
            super::renewal_refusal("demo/echo", role, c, "local/dev")
        };
        assert_eq!(r(&claims("demo/echo", None), "main"), None);
        assert_eq!(r(&claims("demo/echo", Some("main")), "main"), None);
        assert_eq!(r(&claims("demo/echo", Some("auth")), "auth"), None);
        assert!(r(&claims("demo/other", None), "main").is_some());
        assert!(r(&claims("demo/echo", Some("b")), "main").is_some());
        assert!(r(&claims("demo/echo", None), "auth").is_some());
        let mut other = claims("demo/echo", None);
        other.cluster = "eu/x".into();
        assert!(r(&other, "main").is_some());
    }

    /// A request whose frame still waits in the outbox when its answer is given up (its 504 at
    /// the deadline, or the client gone) stops holding the client's read buffer: the frame's
    /// payload is copied.
    #[test]
    fn a_request_given_up_lets_go_of_the_clients_read_buffer() {
        let l = std::rc::Rc::new(link());
        let t0 = Instant::now();
        let buf = bytes::Bytes::from(vec![1u8; 64 * 1024]);
        let timed_out = l.send_request(1, b"head", &buf.slice(..4096), t0).unwrap();
        assert!(!buf.is_unique(), "queued as a slice");
        l.expire(t0);
        assert!(buf.is_unique(), "its 504 keeps no slice of the buffer");
        drop(timed_out);
        let later = t0 + Duration::from_secs(60);
        let forgotten = l
            .send_request(2, b"head", &buf.slice(4096..8192), later)
            .unwrap();
        l.expire(t0);
        assert!(!buf.is_unique(), "not due: still a slice");
        drop(forgotten);
        assert!(
            buf.is_unique(),
            "a request forgotten keeps no slice of the buffer"
        );
        let waited = l
            .send_request(3, b"head", &buf.slice(..4096), later)
            .unwrap();
        let lost = l
            .send_request(4, b"head", &buf.slice(4096..8192), later)
            .unwrap();
        drop(waited);
        assert!(
            !buf.is_unique(),
            "the other request's frame is still a slice"
        );
        l.fail_all();
        assert!(
            buf.is_unique(),
            "a request lost with its link keeps no slice"
        );
        drop(lost);
    }

    #[test]
    fn consecutive_timeouts_eject_until_an_answer() {
        let l = link();
        let t0 = Instant::now();
        let step = |l: &TaskLink| l.health_step(t0, 3, None);
        let time_out = |l: &TaskLink, ids: std::ops::Range<u64>| {
            for id in ids {
                let slot = super::Slot {
                    waker: None,
                    reply: None,
                    deadline: t0,
                    frame: 0,
                };
                l.pending.borrow_mut().insert(id, slot);
            }
            l.expire(t0);
        };
        time_out(&l, 0..2);
        assert_eq!(step(&l), None, "2 timeouts of 3");
        // An answer in between starts the count again.
        l.health.heard(true);
        time_out(&l, 2..4);
        assert_eq!(step(&l), None, "2 timeouts of 3 since the answer");
        time_out(&l, 4..5);
        assert_eq!(step(&l), Some(HealthChange::Ejected(Ejection::Timeouts)));
        assert!(!l.is_alive() && !l.is_usable(10), "out of routing");
        assert_eq!(step(&l), None, "reported once");
        // A pong is not an answer: a hung handler behind a live websocket stays out.
        l.health.heard(false);
        assert!(!l.is_alive());
        assert_eq!(step(&l), None);
        // A (late) answer brings it back, reported once.
        l.health.heard(true);
        assert!(l.is_alive());
        assert_eq!(step(&l), Some(HealthChange::Readmitted));
        assert_eq!(step(&l), None);
    }

    #[test]
    fn an_unanswered_ping_ejects_until_anything_is_heard() {
        let l = link();
        let t0 = Instant::now();
        let timeout = Some(Duration::from_millis(500));
        l.pinged(t0);
        // A second ping keeps the time of the first unanswered one.
        l.pinged(t0 + Duration::from_millis(400));
        assert_eq!(
            l.health_step(t0 + Duration::from_millis(499), 5, timeout),
            None
        );
        assert_eq!(
            l.health_step(t0 + Duration::from_millis(600), 5, None),
            None,
            "off"
        );
        assert_eq!(
            l.health_step(t0 + Duration::from_millis(500), 5, timeout),
            Some(HealthChange::Ejected(Ejection::Pongs))
        );
        assert!(!l.is_alive());
        l.health.heard(false);
        assert!(l.is_alive(), "a pong brings it back");
        assert_eq!(
            l.health_step(t0 + Duration::from_millis(600), 5, timeout),
            Some(HealthChange::Readmitted)
        );
        // Answered pings never eject.
        l.pinged(t0 + Duration::from_millis(700));
        l.health.heard(false);
        assert_eq!(l.health_step(t0 + Duration::from_secs(9), 5, timeout), None);
        // A dead link is never reported.
        l.pinged(t0);
        l.fail_all();
        assert_eq!(l.health_step(t0 + Duration::from_secs(9), 5, timeout), None);
    }

    #[test]
    fn a_stopping_task_stays_out_whatever_it_says() {
        let l = link();
        let t0 = Instant::now();
        l.stopping();
        assert!(!l.is_alive() && !l.is_usable(10));
        assert_eq!(
            l.health_step(t0, 5, None),
            Some(HealthChange::Ejected(Ejection::Stopping))
        );
        // Its answers to what it holds, and its pongs, do not bring it back.
        l.health.heard(true);
        l.health.heard(false);
        assert!(!l.is_alive());
        assert_eq!(l.health_step(t0, 5, None), None, "reported once");
        // Already out (an unanswered ping): no second report, and no way back.
        let l = link();
        l.pinged(t0);
        let timeout = Some(Duration::from_millis(1));
        assert_eq!(
            l.health_step(t0 + Duration::from_millis(5), 5, timeout),
            Some(HealthChange::Ejected(Ejection::Pongs))
        );
        l.stopping();
        l.health.heard(false);
        assert!(!l.is_alive());
        assert_eq!(
            l.health_step(t0 + Duration::from_millis(9), 5, timeout),
            None
        );
    }

    fn reg(app: &str, role: &str, partitions: &[u32]) -> Register {
        Register {
            kind: "register".into(),
            task: 7,
            app: app.into(),
            role: role.into(),
            partitions: partitions.to_vec(),
        }
    }

    fn claims(app: &str, role: Option<&str>) -> ServiceClaims {
        ServiceClaims {
            kid: 1,
            sub: "7".into(),
            app: app.into(),
            cluster: "local/dev".into(),
            iat: 0,
            exp: u64::MAX,
            role: role.map(str::to_string),
        }
    }

    #[test]
    fn a_new_role_is_refused_once_the_app_serves_the_most_roles() {
        use super::roles_refusal;
        let too_many = Some((
            "too_many_roles",
            "the app serves limits.max_roles_per_app roles already",
        ));
        let table = ["main", "cmd"];
        let r = |own: &[&'static str], role: &str, max: usize| {
            roles_refusal(Some(table.iter().chain(own).copied()), role, max)
        };
        assert_eq!(r(&[], "view", 3), None);
        assert_eq!(r(&[], "view", 2), too_many);
        // A role already served takes no more room: more of its tasks are welcome.
        assert_eq!(r(&[], "cmd", 2), None);
        assert_eq!(r(&[], "main", 1), None);
        assert_eq!(r(&[], "cmd", 1), None);
        assert_eq!(r(&[], "view", 1), too_many);
        // This shard's own links count before the routing table has them, once each.
        assert_eq!(r(&["audit"], "view", 3), too_many);
        assert_eq!(r(&["cmd", "main"], "view", 3), None);
        assert_eq!(r(&["audit"], "audit", 3), None);
        // Not an app of the routing table: the refusal chain already said unknown_app.
        assert_eq!(
            roles_refusal(None::<std::iter::Empty<&str>>, "view", 1),
            None
        );
    }

    #[test]
    fn the_refusal_chain_in_order() {
        let ok = |r: &Register, c: &ServiceClaims| registration_refusal(r, c, Some(16), None);
        assert_eq!(
            ok(
                &reg("demo/echo", "main", &[0, 15]),
                &claims("demo/echo", None)
            ),
            None
        );
        assert_eq!(
            ok(&reg("demo/other", "main", &[0]), &claims("demo/echo", None)),
            Some((
                "wrong_token",
                "registration for an app the service token does not name"
            ))
        );
        assert_eq!(
            registration_refusal(
                &reg("demo/echo", "main", &[0]),
                &claims("demo/echo", None),
                None,
                None
            ),
            Some(("unknown_app", "unknown app"))
        );
        assert_eq!(
            ok(&reg("demo/echo", "", &[0]), &claims("demo/echo", None)),
            Some(("bad_role", "bad role"))
        );
        assert_eq!(
            ok(
                &reg("demo/echo", &"r".repeat(65), &[0]),
                &claims("demo/echo", None)
            ),
            Some(("bad_role", "bad role"))
        );
        assert_eq!(
            ok(&reg("demo/echo", "main", &[16]), &claims("demo/echo", None)),
            Some(("bad_partitions", "partition out of range"))
        );
        // The task id is live on a link of another role (or app): refused; same role: a
        // reconnect of the same task, allowed.
        let r = reg("demo/echo", "main", &[0]);
        let c = claims("demo/echo", None);
        assert_eq!(
            registration_refusal(&r, &c, Some(16), Some(("demo/echo", "b"))),
            Some(("task_id_in_use", "task id in use by another app or role"))
        );
        assert_eq!(
            registration_refusal(&r, &c, Some(16), Some(("demo/x", "main"))),
            Some(("task_id_in_use", "task id in use by another app or role"))
        );
        assert_eq!(
            registration_refusal(&r, &c, Some(16), Some(("demo/echo", "main"))),
            None
        );
        assert_eq!(
            ok(
                &reg("demo/echo", "main", &[0]),
                &claims("demo/echo", Some("b"))
            ),
            Some(("wrong_token", "the service token names another role"))
        );
        assert_eq!(
            ok(&reg("demo/echo", "auth", &[0]), &claims("demo/echo", None)),
            Some((
                "wrong_token",
                "role auth needs a service token with role auth"
            ))
        );
        assert_eq!(
            ok(
                &reg("demo/echo", "auth", &[0]),
                &claims("demo/echo", Some("auth"))
            ),
            None
        );
    }
}
