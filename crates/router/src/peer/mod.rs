//! Peer links between routers of different clusters (seed: External Address). Each shard dials
//! its own link to every router of every other cluster, so forwarding never crosses a core; the
//! receiving router's external listener is SO_REUSEPORT, so each incoming link is owned by one
//! of its shards, which routes the requests on it by the local rules. A forwarded request is
//! marked FORWARDED and is never forwarded again.

use crate::auth::{self, verify_service_token};
use crate::metrics::{Listener, ShardMetrics};
use crate::proto::renew::{self, RenewPacer};
use crate::proto::{flags, tag, Frame, Kind};
use crate::route::ApiPath;
use crate::routing::answer::{send_answer, Served};
use crate::routing::{self, Answer, Ingress, Request, VerifyCache};
use crate::shard::unproven::Handshake;
use crate::shard::Shard;
use crate::task::link::{close_at_expiry, handle_renew, read_upgrade, RenewGate, TaskLink};
use crate::util::clipped;
use crate::ws::Socket as _;
use crate::ws::{self, handshake, Message, Side};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod status;
pub(crate) mod view;
pub(crate) use status::PeerStatus;
pub(crate) use view::FedView;

/// Federation facts fixed at start, shared by all shards. What reloads (peer keys, routers,
/// siblings) is the [`FedView`] in `control::Snapshots::fed`; `routers` and `siblings`
/// here are the start's values, which decide only what is bound at start (the external
/// listener, the clusters `/readyz` waits for).
pub(crate) struct Federation {
    /// `region/cluster` -> its routers' external addresses, at start.
    pub(crate) routers: HashMap<String, Vec<String>>,
    /// The token this router presents to peers: read at start, replaced by the control thread
    /// when `federation.peer_token_file` changes (or, in dev mode, when the cluster key is
    /// rotated); dialers present the newest one and send it on their open links (`renew`).
    pub(crate) token: PeerToken,
    /// External addresses of the other routers of our own cluster (siblings), at start.
    pub(crate) siblings: Vec<String>,
    /// Our own `region/cluster`.
    pub(crate) own: String,
    /// Mutual TLS on peer links (`[tls.peer]`), when configured.
    pub(crate) tls: Option<crate::tls::peer::PeerTls>,
}

impl Federation {
    /// Loads the other clusters' keys named by the config.
    pub(crate) fn load(
        cfg: &crate::config::Config,
        token: Option<String>,
    ) -> anyhow::Result<Federation> {
        let FedView {
            routers, siblings, ..
        } = FedView::load(cfg)?;
        Ok(Federation {
            routers,
            token: Arc::new(arc_swap::ArcSwapOption::from(token.map(Arc::new))),
            siblings,
            own: cfg.cluster_id(),
            tls: None,
        })
    }
}

/// The other routers of our own cluster: its `[[federation.clusters]]` entry's routers except
/// the one that is this router (its `listen.external`, or `listen.advertise_host` with that
/// port).
pub(crate) fn siblings(cfg: &crate::config::Config) -> Vec<String> {
    let port = cfg.listen.external.port();
    let me = [
        Some(cfg.listen.external.to_string()),
        cfg.listen
            .advertise_host
            .as_ref()
            .map(|h| format!("{h}:{port}")),
    ];
    cfg.federation
        .clusters
        .iter()
        .filter(|c| c.region == cfg.region && c.cluster == cfg.cluster)
        .flat_map(|c| c.routers.iter())
        .filter(|a| !me.iter().flatten().any(|m| m == *a))
        .cloned()
        .collect()
}

/// One remote router as seen by one shard.
pub(crate) struct Slot {
    pub(crate) addr: String,
    pub(crate) link: RefCell<Option<Rc<TaskLink>>>,
    /// The last status the router sent on the current link (None: none yet).
    status: RefCell<Option<PeerStatus>>,
    /// Set when a reload removed this router: its dialer closes the link and stops.
    stopped: std::cell::Cell<bool>,
    /// The router refused the last `renew` on the current link (it may not know the new key
    /// version yet): send it again a little later.
    renew_refused: std::cell::Cell<bool>,
    /// One `renew` outstanding at a time on the current link, spaced from its answer.
    renew_pacer: std::cell::Cell<RenewPacer>,
    /// When the current (or last) link came up; taken by the dialer when it ends.
    up_at: std::cell::Cell<Option<Instant>>,
}

impl Slot {
    fn new(addr: &str) -> Rc<Slot> {
        Rc::new(Slot {
            addr: addr.to_string(),
            link: RefCell::new(None),
            status: RefCell::new(None),
            stopped: std::cell::Cell::new(false),
            renew_refused: std::cell::Cell::new(false),
            renew_pacer: Default::default(),
            up_at: std::cell::Cell::new(None),
        })
    }

    /// Stops the dialer of a router a reload removed, closing its link (1001) once nothing
    /// is pending on it.
    fn stop(&self) {
        self.stopped.set(true);
        if let Some(l) = self.link.borrow().as_ref() {
            glommio::spawn_local(close_when_idle(l.clone())).detach();
        }
    }
}

impl Slot {
    /// The link, when it is up and below `max_pending` requests pending.
    fn usable_link(&self, max_pending: usize) -> Option<Rc<TaskLink>> {
        self.link
            .borrow()
            .as_ref()
            .filter(|l| l.is_usable(max_pending))
            .cloned()
    }

    /// How much `app`/`wsid` should go to this router, when its link takes requests: one
    /// more than [`PeerStatus::rank`] (or [`status::RANK_UNKNOWN`]) so that a draining or
    /// unready router stays a last resort, and [`RANK_EJECTED`] below those for a link out of
    /// routing for its timeouts (`limits.peer_eject_after_timeouts`): tried only when no other
    /// router of the cluster takes the request.
    fn rank(&self, app: &str, wsid: u64, max_pending: usize) -> Option<(u8, Rc<TaskLink>)> {
        let link = self
            .link
            .borrow()
            .as_ref()
            .filter(|l| l.takes_requests(max_pending))
            .cloned()?;
        if link.is_ejected() {
            return Some((RANK_EJECTED, link));
        }
        let r = match self.status.borrow().as_ref() {
            Some(s) => s.rank(app, wsid),
            None => status::RANK_UNKNOWN,
        };
        Some((r + 1, link))
    }
}

/// [`Slot::rank`] of a link out of routing: below every other.
const RANK_EJECTED: u8 = 0;
/// [`Slot::rank`] of a ready router serving the partition: none is better.
const RANK_BEST: u8 = 4;

/// A shard's peer links: cluster -> one slot per remote router.
#[derive(Default)]
pub(crate) struct Peers {
    pub(crate) clusters: HashMap<String, Vec<Rc<Slot>>>,
}

impl Peers {
    /// A live link to a router of `cluster` for `app`/`wsid`, other than `except`: the best
    /// ranked by the routers' statuses (ready and serving the partition, then ready, then no
    /// status yet, then unready or draining, then a link ejected for its timeouts: see
    /// [`Slot::rank`]), and among equals the first from `wsid % routers` on, so that a wsid
    /// keeps its router while all is well. Dead and full links are skipped.
    pub(crate) fn pick(
        &self,
        region: &str,
        cluster: &str,
        app: &str,
        wsid: u64,
        max_pending: usize,
        except: Option<&Rc<TaskLink>>,
    ) -> Option<Rc<TaskLink>> {
        // A handful of clusters: a scan that compares slices beats formatting a key.
        let (_, slots) = self
            .clusters
            .iter()
            .find(|(k, _)| is_cluster(k, region, cluster))?;
        let n = slots.len();
        let mut best: Option<(u8, Rc<TaskLink>)> = None;
        for i in 0..n {
            let slot = &slots[((wsid % n as u64) as usize + i) % n];
            let Some((r, link)) = slot.rank(app, wsid, max_pending) else {
                continue;
            };
            if except.is_some_and(|e| Rc::ptr_eq(e, &link)) {
                continue;
            }
            if r == RANK_BEST {
                return Some(link);
            }
            if best.as_ref().is_none_or(|(b, _)| r > *b) {
                best = Some((r, link));
            }
        }
        best.map(|(_, l)| l)
    }
}

impl Peers {
    /// True when a router of `cluster` (a key of [`Peers::clusters`]) other than the one on
    /// `link` is ready and not draining, with a live link.
    fn other_ready(&self, cluster: &str, link: &Rc<TaskLink>) -> bool {
        self.clusters.get(cluster).is_some_and(|slots| {
            slots.iter().any(|s| {
                let l = s.link.borrow();
                let st = s.status.borrow();
                l.as_ref()
                    .is_some_and(|l| !Rc::ptr_eq(l, link) && l.is_alive())
                    && st.as_ref().is_some_and(|st| st.ready && !st.draining)
            })
        })
    }

    /// True when every peer router (siblings included) has a live link that brought its
    /// status: what a router taking over another's listeners waits for before it accepts
    /// clients (it can then route every request the old one could).
    pub(crate) fn all_known(&self) -> bool {
        self.clusters.values().flatten().all(|s| {
            s.link.borrow().as_ref().is_some_and(|l| l.is_alive()) && s.status.borrow().is_some()
        })
    }

    /// A live link to a sibling (a router of our own `cluster` key) that has a live task for
    /// `app`/`wsid`'s partition, by its last status, and is not draining; ready or not (a
    /// sibling that lacks other partitions serves this one: docs/EMERGENCY.md, the exact rule,
    /// step 2). The scan starts at `wsid % routers`. With `ejected`, only a link out of
    /// routing for its timeouts (`limits.peer_eject_after_timeouts`) qualifies: the last
    /// resort once this router has no task to serve the request at all, as an ejected router
    /// of another cluster is in [`Peers::pick`].
    pub(crate) fn covering(
        &self,
        own: &str,
        app: &str,
        wsid: u64,
        max_pending: usize,
        ejected: bool,
    ) -> Option<Rc<TaskLink>> {
        let slots = self.clusters.get(own)?;
        let n = slots.len();
        (0..n)
            .map(|i| &slots[((wsid % n as u64) as usize + i) % n])
            .find_map(|s| {
                let serves = s
                    .status
                    .borrow()
                    .as_ref()
                    .is_some_and(|st| !st.draining && st.covers(app, wsid) == Some(true));
                if !serves {
                    return None;
                }
                match ejected {
                    false => s.usable_link(max_pending),
                    true => s
                        .link
                        .borrow()
                        .as_ref()
                        .filter(|l| l.is_ejected() && l.takes_requests(max_pending))
                        .cloned(),
                }
            })
    }
}

/// True when `key` is `region/cluster`.
fn is_cluster(key: &str, region: &str, cluster: &str) -> bool {
    key.split_once('/') == Some((region, cluster))
}

/// Starts this shard's dialers: one per router of every other cluster, and one per sibling
/// (another router of our own cluster, under our own cluster's key), as the published
/// [`FedView`] lists them; then follows that view ([`watch_view`]).
pub(crate) fn start_dialers(shard: &Rc<Shard>) {
    let view = shard.snapshots.fed.load_full();
    reconcile(shard, &view);
    glommio::spawn_local(watch_view(shard.clone(), view.generation)).detach();
}

/// Makes this shard's dialers match `view`: a dialer per listed router (kept when it was
/// already there, so its link stays), the dialers of routers no longer listed stopped.
fn reconcile(shard: &Rc<Shard>, view: &FedView) {
    let mut peers = shard.peers.borrow_mut();
    let mut old = std::mem::take(&mut peers.clusters);
    for (cluster, addrs) in view.dial_targets(&shard.federation.own) {
        let mut had = old.remove(&cluster).unwrap_or_default();
        let slots: Vec<Rc<Slot>> = addrs
            .iter()
            .map(|a| match had.iter().position(|s| s.addr == *a) {
                Some(i) => had.swap_remove(i),
                None => {
                    let s = Slot::new(a);
                    tracing::info!(shard = shard.index, %cluster, addr = %a, "peer router added by reload: dialing");
                    glommio::spawn_local(dial_loop(shard.clone(), cluster.clone(), s.clone()))
                        .detach();
                    s
                }
            })
            .collect();
        for s in had {
            tracing::info!(shard = shard.index, %cluster, addr = %s.addr, "peer router removed by reload: closing its link");
            s.stop();
        }
        peers.clusters.insert(cluster, slots);
    }
    for (cluster, slots) in old {
        tracing::info!(shard = shard.index, %cluster, "peer cluster removed by reload: closing its links");
        for s in slots {
            s.stop();
        }
    }
    let watched: Vec<String> = view.routers.keys().cloned().collect();
    shard.health.watch_clusters(&watched);
}

/// Follows the published [`FedView`]: when its generation moves, reconciles the dialers.
/// Checked every `health::POLL` (the view changes only on a reload).
async fn watch_view(shard: Rc<Shard>, mut seen: u64) {
    let mut timer = crate::util::Deadline::new();
    loop {
        timer.sleep(crate::health::POLL).await;
        let view = shard.snapshots.fed.load();
        if view.generation != seen {
            seen = view.generation;
            reconcile(&shard, &view);
        }
    }
}

async fn dial_loop(shard: Rc<Shard>, cluster: String, slot: Rc<Slot>) {
    let mut backoff = Duration::from_millis(50);
    // The first failure after a link (or the first of all) is a warning, the retries that
    // fail the same way are debug: one line per outage, not one per backoff step.
    let mut warned = false;
    // A link closed by the other side sooner than this after it came up is dialed again with
    // the backoff, as a failed dial is: a router that takes the upgrade and closes at once
    // would otherwise be dialed 20 times a second by each shard.
    let steady = Duration::from_millis(shard.cfg.limits.ping_interval_ms);
    while !slot.stopped.get() {
        let ended = dial_once(&shard, &cluster, &slot).await;
        // A link that lived (however it ended: a close, a crash, a network drop) starts the
        // backoff over; a dial that failed, or a link that did not last, keeps it.
        if slot.up_at.take().is_some_and(|t| t.elapsed() >= steady) {
            backoff = Duration::from_millis(50);
            warned = false;
        }
        match ended {
            Ok(()) => {}
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(shard = shard.index, %cluster, addr = %slot.addr, "peer link: {e}; retrying with backoff (up to 5 s)")
            }
            Err(e) => {
                tracing::debug!(shard = shard.index, %cluster, addr = %slot.addr, "peer link: {e}")
            }
        }
        let j = 0.5 + (crate::util::random_u64() % 1000) as f64 / 1000.0;
        glommio::timer::sleep(backoff.mul_f64(j)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn dial_once(shard: &Rc<Shard>, cluster: &str, slot: &Rc<Slot>) -> anyhow::Result<()> {
    // Resolve on every reconnect (DNS names in the seed's form); off the shard's thread.
    let addr = slot.addr.clone();
    let resolved = glommio::executor()
        .spawn_blocking(move || {
            use std::net::ToSocketAddrs;
            addr.to_socket_addrs().map(|mut a| a.next())
        })
        .await?
        .ok_or_else(|| anyhow::anyhow!("{} resolves to nothing", slot.addr))?;
    let addr = resolved.to_string();
    let presented = shard.federation.token.load_full();
    let token = presented.as_deref().map(String::as_str);
    match &shard.federation.tls {
        Some(tls) => {
            let dial = ws::TlsDial {
                config: tls.client.clone(),
                name: crate::tls::peer::server_name(&slot.addr)?,
            };
            match ws::connect_tls(&addr, "/peer", token, &dial).await {
                Ok((s, leftover)) => run_link(shard, cluster, slot, s, leftover, presented).await,
                Err(e @ ws::DialError::Tls { .. }) => {
                    ShardMetrics::inc(&shard.metrics.peer_tls_dial_refused);
                    tracing::warn!(shard = shard.index, %cluster, addr = %slot.addr, "peer link refused: {e}");
                    Err(e.into())
                }
                Err(e) => Err(e.into()),
            }
        }
        None => {
            let (s, leftover) = ws::connect(&addr, "/peer", token).await?;
            run_link(shard, cluster, slot, s, leftover, presented).await
        }
    }
}

/// Runs a dialed peer link, plain or TLS, until it ends; `presented` is the peer token its
/// upgrade carried.
async fn run_link<S: ws::Stream>(
    shard: &Rc<Shard>,
    cluster: &str,
    slot: &Rc<Slot>,
    s: S,
    leftover: bytes::BytesMut,
    presented: Option<Arc<String>>,
) -> anyhow::Result<()> {
    let limits = &shard.cfg.limits;
    // Liveness: we ping, the other side answers; silence for 3 intervals ends the link.
    let every = Duration::from_millis(limits.ping_interval_ms);
    let _ = s.socket().set_write_timeout(Some(every * 3));
    s.socket()
        .set_read_timeout(Some(every * 3))
        .map_err(|e| anyhow::anyhow!("read timeout: {e}"))?;
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        s,
        leftover,
        Side::Client,
        limits.max_message_bytes(),
        limits,
    );
    // A message that arrives in pieces is held to an HTTP body's slowest pace, as on
    // `/api/ws`: otherwise a byte per ping interval held a message buffer (and, on a dialed
    // link, every request waiting behind it) for ever.
    reader.set_min_pace(
        Duration::from_millis(limits.handshake_timeout_ms),
        limits.min_body_bytes_per_sec,
    );
    let link = Rc::new(TaskLink::new(
        0,
        cluster.to_string(),
        "peer".into(),
        out.clone(),
    ));
    let pinger = ws::spawn_pinger(out.clone(), every);
    slot.renew_refused.set(false);
    slot.renew_pacer.set(RenewPacer::default());
    let renewer = glommio::spawn_local(send_renewals(
        shard.clone(),
        slot.clone(),
        out.clone(),
        presented,
    ));
    set_status(shard, slot, None);
    *slot.link.borrow_mut() = Some(link.clone());
    slot.up_at.set(Some(Instant::now()));
    if slot.stopped.get() {
        // Removed by a reload while it dialed.
        glommio::spawn_local(close_when_idle(link.clone())).detach();
    }
    ShardMetrics::inc(&shard.metrics.peer_links);
    shard.health.peer_link(shard.index, cluster, true);
    tracing::info!(shard = shard.index, %cluster, addr = %slot.addr, "peer link up");
    let read = read_dialed(shard, cluster, slot, &link, &mut reader);
    let end = ws::conn::until_closed_or_late(shard, &out, read).await;
    drop(pinger.cancel());
    drop(renewer.cancel());
    link.fail_all();
    *slot.link.borrow_mut() = None;
    set_status(shard, slot, None);
    ShardMetrics::dec(&shard.metrics.peer_links);
    shard.health.peer_link(shard.index, cluster, false);
    tracing::warn!(shard = shard.index, %cluster, addr = %slot.addr, "peer link down");
    match &end {
        Err(e) => match closed_for(shard, cluster, e) {
            Some(c) => out.borrow_mut().close(c),
            None => out.borrow_mut().abort(),
        },
        Ok(()) => out.borrow_mut().close(1000),
    }
    let _ = writer.await;
    end.map_err(anyhow::Error::from)
}

/// A text message from the dialing router: a `renew` ([`handle_renew`]) is checked as the
/// upgrade's token was (signature, expiry, key version, client certificate) and must name the
/// link's cluster; if good it moves the link's expiry and key version.
fn on_renew(
    shard: &Shard,
    from: &str,
    live: &LiveCred,
    admitted: &dyn Fn(&Shard, &str) -> Admission,
    out: &RefCell<ws::WsOut>,
    text: &[u8],
) {
    let what = format_args!("peer link from {from}");
    handle_renew(
        shard,
        out,
        &live.gate,
        &shard.metrics.peer_renewals,
        &what,
        text,
        |token| {
            let c = admitted(shard, token).map_err(|(_, code, why)| (code, why))?;
            if c.cluster != from {
                let why = format!("a peer token of {} on a link of {from}", c.cluster);
                return Err(("wrong_token", why));
            }
            live.exp.set(c.exp);
            live.key_until.set(c.key_until);
            *live.token.borrow_mut() = token.to_string();
            Ok(c.exp)
        },
    );
}

/// The close code for a peer link that failed with `e`; a policy breach by the other router
/// (a control frame flood) is logged and counted in `fedbus_abusive_closed_total`, as on task
/// links and client sessions; a message slower than `limits.min_body_bytes_per_sec` in
/// `fedbus_slow_messages_closed_total`, as on `/api/ws`.
fn closed_for(shard: &Shard, cluster: &str, e: &ws::WsError) -> Option<u16> {
    match e {
        ws::WsError::Policy(_) => {
            ShardMetrics::inc(&shard.metrics.abusive_closed);
            tracing::warn!(shard = shard.index, %cluster, "peer link closed: {e}");
        }
        ws::WsError::Slow => {
            ShardMetrics::inc(&shard.metrics.slow_messages_closed);
            tracing::warn!(
                shard = shard.index,
                %cluster,
                "peer link message slower than limits.min_body_bytes_per_sec: closed with 1008"
            );
        }
        _ => {}
    }
    e.close_code()
}

/// Sends each newer peer token on a dialed link as a `renew` (PROTOCOL.md section 10), so a
/// token rewritten in `federation.peer_token_file` (or minted after a rotation, in dev mode)
/// before the old one expires or retires keeps the link open. `sent` is the token the link
/// presented. A refused one is sent again every [`renew::REFUSED_RETRY`]. A router that predates
/// renewals ignores the message and closes the link when the old token expires; the dialer
/// then presents the new one. It looks every [`renew::SENDER_POLL`]; the pacer keeps one
/// `renew` outstanding, the next [`renew::RENEW_SPACING`] after its answer.
async fn send_renewals(
    shard: Rc<Shard>,
    slot: Rc<Slot>,
    out: Rc<RefCell<ws::WsOut>>,
    mut sent: Option<Arc<String>>,
) {
    let mut retry_at: Option<Instant> = None;
    loop {
        glommio::timer::sleep(renew::SENDER_POLL).await;
        if out.borrow().is_closing() {
            return;
        }
        if slot.renew_refused.replace(false) {
            retry_at = Some(Instant::now() + renew::REFUSED_RETRY);
        }
        // A look every SENDER_POLL on every link: compare pointers under the guard (no
        // refcount taken on the shared token), and take it only when it is newer.
        let newer = {
            let cur = shard.federation.token.load();
            match (cur.as_ref(), sent.as_ref()) {
                (Some(c), Some(s)) => !Arc::ptr_eq(c, s) && c != s,
                (c, _) => c.is_some(),
            }
        };
        let at = Instant::now();
        let retry = retry_at.is_some_and(|t| at >= t);
        if (newer || retry) && slot.renew_pacer.get().may_send(at) {
            retry_at = None;
            let now = shard.federation.token.load_full();
            let token = now.as_deref().map(String::as_str).unwrap_or_default();
            if out.borrow_mut().send_text(&renew::renew(token)).is_err() {
                return;
            }
            let mut pacer = slot.renew_pacer.get();
            pacer.sent(at);
            slot.renew_pacer.set(pacer);
            tracing::info!(
                shard = shard.index,
                "peer token sent on an open peer link (renew)"
            );
            sent = now;
        }
    }
}

/// The accepting router's answer to a `renew` this dialer sent (other text is ignored):
/// logged, and the slot's pacer and retry flag moved.
fn on_renew_answer(shard: &Shard, cluster: &str, slot: &Slot, text: &[u8]) {
    let Some(answer) = renew::renew_answer(text) else {
        return;
    };
    let mut pacer = slot.renew_pacer.get();
    let expected = pacer.answered(Instant::now());
    slot.renew_pacer.set(pacer);
    let addr = &slot.addr;
    if !expected {
        // None outstanding: not an answer to us (a peer repeating one would fill the log).
        tracing::debug!(shard = shard.index, %cluster, %addr, "renew answer with no renew outstanding ignored");
        return;
    }
    match answer {
        renew::RenewAnswer::Renewed { exp } => {
            tracing::info!(shard = shard.index, %cluster, %addr, ?exp, "peer link renewed");
        }
        renew::RenewAnswer::Refused { error, message } => {
            // The other router's words, at most a line of them each.
            let (error, message) = (clipped(&error), clipped(&message));
            tracing::warn!(shard = shard.index, %cluster, %addr, ?error, ?message, "peer link renew refused; sent again in 5 s, the link lives until its current token expires");
            slot.renew_refused.set(true);
        }
    }
}

/// Counts and logs a peer router breaking the link protocol on a link it dialed to us: closed
/// with 1002.
fn peer_protocol_error(shard: &Shard, cluster: &str, why: &str) -> Option<u16> {
    ShardMetrics::inc(&shard.metrics.peer_protocol_errors);
    tracing::warn!(shard = shard.index, %cluster, "peer link closed (1002): {why}");
    Some(1002)
}

/// Replaces `slot`'s last status, keeping `fedbus_peer_links_ready` in step.
fn set_status(shard: &Shard, slot: &Slot, st: Option<PeerStatus>) {
    let ready = |st: &Option<PeerStatus>| st.as_ref().is_some_and(|s| s.ready && !s.draining);
    let (was, now) = (ready(&slot.status.borrow()), ready(&st));
    match (was, now) {
        (false, true) => ShardMetrics::inc(&shard.metrics.peer_links_ready),
        (true, false) => ShardMetrics::dec(&shard.metrics.peer_links_ready),
        _ => {}
    }
    *slot.status.borrow_mut() = st;
}

/// Reads a dialed link: answers complete pending requests, status messages update the slot.
/// A router that says it is draining gets nothing new (see [`Peers::pick`]); once nothing is
/// pending on its link we close the link, which is what lets it finish its drain early.
async fn read_dialed<R: futures_lite::AsyncRead + Unpin>(
    shard: &Rc<Shard>,
    cluster: &str,
    slot: &Rc<Slot>,
    link: &Rc<TaskLink>,
    reader: &mut ws::WsReader<R>,
) -> Result<(), ws::WsError> {
    let mut closer: Option<glommio::Task<()>> = None;
    // Counted over 10 s: statuses the other router queued while this side's reads stalled
    // arrive together, and are no flood.
    let per_sec = shard.cfg.limits.max_peer_status_per_sec;
    let mut texts = crate::util::Rate::per(per_sec.saturating_mul(10), Duration::from_secs(10));
    loop {
        match reader.next().await? {
            Message::Binary(b) => {
                // As a Response on a link we accepted is (`serve_upgrade`).
                let why = match link.on_binary(b) {
                    Ok(true) => continue,
                    Ok(false) => "a frame other than a Response or Redirect on a link we dialed",
                    Err(_) => "a message that is no fedbus frame on a link we dialed",
                };
                ShardMetrics::inc(&shard.metrics.peer_protocol_errors);
                tracing::warn!(shard = shard.index, %cluster, addr = %slot.addr, "peer link closed (1002): {why}");
                return Err(ws::WsError::Protocol("a frame the dialer does not take"));
            }
            Message::Text(t) => {
                // Each is a JSON parse of up to the message bound and maybe a log line.
                if texts.over() {
                    return Err(ws::WsError::Policy(
                        "status messages over limits.max_peer_status_per_sec",
                    ));
                }
                let Some(st) = PeerStatus::parse(&t) else {
                    on_renew_answer(shard, cluster, slot, &t);
                    continue;
                };
                let draining = st.draining;
                if slot.status.borrow().as_ref().map(|s| (s.ready, s.draining))
                    != Some((st.ready, st.draining))
                {
                    tracing::info!(shard = shard.index, %cluster, addr = %slot.addr, ready = st.ready, draining, "peer status");
                }
                let max = st
                    .max_message
                    .map_or(usize::MAX, |m| m.try_into().unwrap_or(usize::MAX));
                link.peer_max_message.set(max);
                set_status(shard, slot, Some(st));
                if draining && closer.is_none() {
                    closer = Some(glommio::spawn_local(close_when_replaced(
                        shard.clone(),
                        cluster.to_string(),
                        link.clone(),
                    )));
                }
            }
            Message::Ping(p) => link
                .out
                .borrow_mut()
                .send_control(ws::frame::opcode::PONG, &p),
            Message::Pong(_) => {}
            Message::Close(_) => return Ok(()),
        }
    }
}

/// Closes a link to a draining router: first it is retired (it takes no new request) once it
/// is replaced (another router of its cluster is ready, so new requests go there; for a
/// sibling, this router serving its cluster itself also counts), or nothing was sent on it for
/// `readiness.drain_idle_close_ms`, or it was held `readiness.drain_peer_hold_ms`; then it
/// closes once no request is pending on it (answered, or expired by the sweeper). While the
/// draining router is the cluster's only way in (its sibling restarting, say, and not linked
/// again yet), requests keep going to it and it serves them, instead of failing here with 503
/// `no_peer`; the hold bounds that, since a router taken over on the same address is reached
/// only once this link closes. The draining router's drain waits for this close.
async fn close_when_replaced(shard: Rc<Shard>, cluster: String, link: Rc<TaskLink>) {
    let sibling = cluster == shard.federation.own;
    let replaced = || {
        shard.peers.borrow().other_ready(&cluster, &link)
            || (sibling
                && shard
                    .health
                    .serving_refusal(&shard.snapshots.routes.load(), shard.cfg.readiness.coverage)
                    .is_none())
    };
    let idle_close = Duration::from_millis(shard.cfg.readiness.drain_idle_close_ms);
    let hold = Duration::from_millis(shard.cfg.readiness.drain_peer_hold_ms);
    let start = Instant::now();
    let (mut sent, mut since) = (link.sent(), start);
    let mut timer = crate::util::Deadline::new();
    let mut retired = false;
    while link.is_open() {
        if link.sent() != sent {
            (sent, since) = (link.sent(), Instant::now());
        }
        // Retired first, closed once what it carries is answered: waiting for a moment with
        // nothing pending while new requests still went on it could outlast the hold by
        // seconds under steady load (it did in CI: 5.7 s for a 1 s hold).
        if !retired && (since.elapsed() >= idle_close || start.elapsed() >= hold || replaced()) {
            link.retire();
            retired = true;
        }
        if retired && link.pending_len() == 0 {
            break;
        }
        timer.sleep(crate::health::POLL).await;
    }
    link.out.borrow_mut().close(1001);
}

/// Closes a link to a router a reload removed once no request is pending on it.
async fn close_when_idle(link: Rc<TaskLink>) {
    while link.is_open() && link.pending_len() > 0 {
        glommio::timer::sleep(crate::health::POLL).await;
        // Out of `Peers`, the deadline sweeper (`shard::sweep_deadlines`) no longer sees this
        // link: its requests get their 504 `peer_timeout` here, or a peer that answers pings
        // but not requests would hold them (and the link) forever.
        link.expire(std::time::Instant::now());
    }
    link.out.borrow_mut().close(1001);
}

/// Serves one connection on the external listener: a peer router's link. With `[tls.peer]`,
/// the TLS handshake (a client certificate from the federation CA required) comes first; a
/// plaintext dialer is refused unless `required = false`.
pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    ShardMetrics::inc(&shard.metrics.connections[Listener::External as usize]);
    // Every step before the link (a TLS handshake, the upgrade head) within one
    // `limits.handshake_timeout_ms` from accept.
    let limit = Duration::from_millis(shard.cfg.limits.handshake_timeout_ms);
    let deadline = Instant::now() + limit;
    // Until its peer token is verified, a newer connection may close it for room.
    let hs = shard.handshake(Listener::External);
    match &shard.federation.tls {
        Some(tls) => serve_tls(&shard, tls, stream, deadline, hs).await,
        None => serve_upgrade(&shard, stream, None, deadline, hs).await,
    }
    ShardMetrics::dec(&shard.metrics.connections[Listener::External as usize]);
}

async fn serve_tls(
    shard: &Rc<Shard>,
    tls: &crate::tls::peer::PeerTls,
    stream: TcpStream,
    deadline: Instant,
    hs: Handshake,
) {
    let peer = stream.peer_addr().ok();
    let left = || deadline.saturating_duration_since(Instant::now());
    let refuse = |why: &str| {
        ShardMetrics::inc(&shard.metrics.peer_tls_refused);
        if let Some(suppressed) = shard.log_gates.peer_refused.pass() {
            tracing::warn!(
                shard = shard.index,
                ?peer,
                suppressed,
                "peer link refused: {why}"
            );
        }
    };
    // Peek (the bytes stay for the TLS handshake or the plaintext upgrade).
    let mut first = [0u8; 1];
    let peeked = glommio::timer::timeout(left(), async { Ok(stream.peek(&mut first).await) });
    // Closed for room (logged where it was closed): nothing more to do.
    let Ok(peeked) = hs.step(peeked).await else {
        return;
    };
    let tls_first = match peeked {
        Ok(Ok(1)) => first[0] == crate::tls::TLS_HANDSHAKE_RECORD,
        Ok(_) => return,
        Err(_) => return refuse("nothing sent within limits.handshake_timeout_ms"),
    };
    if !tls_first {
        if tls.required {
            refuse("plaintext, and [tls.peer] requires TLS");
            // The head is read only to answer it cleanly (closing on unread bytes would reset
            // the connection before the dialer reads why); nothing in it is looked at.
            let mut stream = stream;
            if let Ok(Ok(_)) = hs.step(read_upgrade(&mut stream, left())).await {
                let why = handshake::error_response(403, "tls_required", "peer links require TLS");
                let _ = hs.step(stream.write_all(why.as_bytes())).await;
            }
            return;
        }
        return serve_upgrade(shard, stream, None, deadline, hs).await;
    }
    let acceptor = futures_rustls::TlsAcceptor::from(tls.server.clone());
    let handshake = glommio::timer::timeout(left(), async { Ok(acceptor.accept(stream).await) });
    let Ok(handshake) = hs.step(handshake).await else {
        return;
    };
    match handshake {
        Ok(Ok(s)) => {
            let cert = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            serve_upgrade(shard, s, cert, deadline, hs).await
        }
        Ok(Err(e)) => refuse(&format!("TLS handshake: {e}")),
        Err(_) => refuse("TLS handshake not complete within limits.handshake_timeout_ms"),
    }
}

/// Reads the upgrade (by `deadline`), checks the peer token (and, over TLS, that the client
/// certificate names a router of the token's cluster), then serves the link.
async fn serve_upgrade<S: ws::Stream>(
    shard: &Rc<Shard>,
    mut stream: S,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
    deadline: Instant,
    hs: Handshake,
) {
    let left = deadline.saturating_duration_since(Instant::now());
    let Ok(head) = hs.step(read_upgrade(&mut stream, left)).await else {
        return;
    };
    match head {
        Ok((up, leftover)) => {
            let verdict = check_peer_token(shard, up.bearer.as_deref())
                .and_then(|c| check_peer_certificate(shard, cert.as_ref(), c));
            match verdict {
                Ok(cred) => {
                    // Closed for room in the meantime (logged where it was): its slot is a
                    // newer connection's.
                    if hs.proven().is_err() {
                        return;
                    }
                    let accepted = stream
                        .write_all(handshake::accept_response(&up.key).as_bytes())
                        .await;
                    if accepted.is_ok() && stream.flush().await.is_ok() {
                        tracing::info!(shard = shard.index, cluster = %cred.cluster, tls = cert.is_some(), "peer link accepted");
                        // The same checks again whenever a reload changes the federation, and
                        // for each token a `renew` brings.
                        let token = up.bearer.unwrap_or_default();
                        let admitted = move |shard: &Shard, token: &str| {
                            check_peer_token(shard, Some(token))
                                .and_then(|c| check_peer_certificate(shard, cert.as_ref(), c))
                        };
                        serve_link(shard, stream, leftover, cred, token, Rc::new(admitted)).await;
                    }
                }
                Err((status, code, msg)) => {
                    ShardMetrics::inc(if code == "peer_identity" {
                        &shard.metrics.peer_tls_refused
                    } else {
                        &shard.metrics.peer_token_refused
                    });
                    if let Some(suppressed) = shard.log_gates.peer_refused.pass() {
                        tracing::warn!(
                            shard = shard.index,
                            code,
                            suppressed,
                            "peer link refused: {msg}"
                        );
                    }
                    let answer = handshake::error_response(status, code, &msg);
                    let _ = hs
                        .step(async {
                            let _ = stream.write_all(answer.as_bytes()).await;
                            let _ = stream.flush().await;
                        })
                        .await;
                }
            }
        }
        Err(e) => tracing::debug!(shard = shard.index, "peer handshake: {e}"),
    }
}

/// Over TLS, the client certificate must be valid for one of the routers of the cluster the
/// peer token names: a router's certificate cannot carry another cluster's token.
fn check_peer_certificate(
    shard: &Shard,
    cert: Option<&rustls::pki_types::CertificateDer<'static>>,
    cred: PeerCred,
) -> Admission {
    let Some(cert) = cert else {
        return Ok(cred);
    };
    let cluster = &cred.cluster;
    let view = shard.snapshots.fed.load();
    let routers = if *cluster == shard.federation.own {
        view.siblings.as_slice()
    } else {
        view.routers
            .get(cluster)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    if crate::tls::peer::names_one_of(cert, routers) {
        Ok(cred)
    } else {
        Err((
            403,
            "peer_identity",
            format!("the TLS client certificate names no router of {cluster}"),
        ))
    }
}

/// An accepted peer link's credential, as its upgrade verified it.
struct PeerCred {
    /// The cluster its peer token names (and its key signed).
    cluster: String,
    /// The token's `exp` (unix seconds).
    exp: u64,
    /// Until when (unix seconds) the key version that signed it verifies under the rotation
    /// rule: `u64::MAX` while it is the newest, the end of its grace once replaced.
    key_until: u64,
}

/// An accepted peer link's credential as it stands: the upgrade's, moved by each accepted
/// `renew`; read by its expiry timer and its status task.
struct LiveCred {
    token: RefCell<String>,
    exp: std::cell::Cell<u64>,
    key_until: std::cell::Cell<u64>,
    gate: RenewGate,
}

/// The upgrade's checks (peer token, client certificate) for a token.
type Admit = Rc<dyn Fn(&Shard, &str) -> Admission>;

/// The verdict of a peer link's upgrade checks: its credential, or the refusal (HTTP status,
/// code, message).
type Admission = Result<PeerCred, (u16, &'static str, String)>;

/// Whether verified claims `c` are a peer token of `cluster`: issued for that cluster, for no
/// app (a task's service token names its app). The accepting side checks a peer's token with
/// it, the control thread our own token from `federation.peer_token_file`.
pub(crate) fn is_peer_token_of(c: &crate::auth::ServiceClaims, cluster: &str) -> bool {
    c.cluster == cluster && c.app.is_empty()
}

/// Verifies a peer token: signed by the key of the cluster it names, which must be another
/// cluster of the federation. Returns that cluster.
fn check_peer_token(shard: &Shard, token: Option<&str>) -> Admission {
    let token = token.ok_or((401, "missing_token", "peer token required".to_string()))?;
    // The cluster named in the token picks the key; a token naming another cluster than the
    // one whose key signed it fails the signature check.
    let claimed = crate::auth::service_token::claimed_cluster(token).ok_or((
        401,
        "bad_token",
        "unreadable peer token".to_string(),
    ))?;
    // The published view: keys a reload added verify at once.
    let view = shard.snapshots.fed.load();
    let keys = view.keys.get(&claimed).ok_or((
        401,
        "unknown_cluster",
        // The claim is unverified: clipped and quoted (escaped) for the log line it ends in.
        format!("cluster {:?} is not in the federation", clipped(&claimed)),
    ))?;
    let (now, grace) = (auth::now_unix(), shard.cfg.auth.grace_secs);
    let c = verify_service_token(keys, token, now, grace)
        .map_err(|e| (e.http_status(), e.code(), e.to_string()))?;
    if !is_peer_token_of(&c, &claimed) {
        return Err((401, "bad_token", "not a peer token".into()));
    }
    Ok(PeerCred {
        cluster: c.cluster,
        exp: c.exp,
        key_until: auth::check_version(keys, c.kid, now, grace).verifies_until(),
    })
}

/// Serves an accepted peer link with credential `cred` (from `token`) until it ends.
/// `admitted` repeats the checks of its upgrade (peer token, client certificate): the link is
/// closed with 1008 when a reload changes the federation so that they fail (its cluster
/// removed from `[federation]`, the key that signed its token gone), when the grace of its
/// token's key version ends, and when its token expires; a `renew` with a token that passes
/// them (for the same cluster) moves the expiry and the key version.
async fn serve_link<S: ws::Stream>(
    shard: &Rc<Shard>,
    stream: S,
    leftover: bytes::BytesMut,
    cred: PeerCred,
    token: String,
    admitted: Admit,
) {
    let PeerCred {
        cluster: from,
        exp,
        key_until,
    } = cred;
    let live = Rc::new(LiveCred {
        token: RefCell::new(token),
        exp: std::cell::Cell::new(exp),
        key_until: std::cell::Cell::new(key_until),
        gate: RenewGate::default(),
    });
    let limits = &shard.cfg.limits;
    // The dialing router pings every interval; silence for 3 intervals ends the link.
    let tcp = stream.socket();
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(limits.ping_interval_ms * 3)));
    let _ = tcp.set_write_timeout(Some(Duration::from_millis(limits.ping_interval_ms * 3)));
    let _ = tcp.set_nodelay();
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        stream,
        leftover,
        Side::Server,
        limits.max_message_bytes(),
        limits,
    );
    // A message that arrives in pieces is held to an HTTP body's slowest pace, as on
    // `/api/ws`: otherwise a byte per ping interval held a message buffer (and, on a dialed
    // link, every request waiting behind it) for ever.
    reader.set_min_pace(
        Duration::from_millis(limits.handshake_timeout_ms),
        limits.min_body_bytes_per_sec,
    );
    let inflight = Rc::new(std::cell::Cell::new(0usize));
    // Bytes of forwarded bodies this link holds (charged to the shard's body budget).
    let held = Rc::new(std::cell::Cell::new(0usize));
    let cache = Rc::new(RefCell::new(VerifyCache::new(
        shard.cfg.auth.verify_cache_per_peer_link,
    )));
    let expiry = {
        let l = live.clone();
        let what = format!("peer link from {from}");
        close_at_expiry(shard.clone(), out.clone(), move || l.exp.get(), what)
    };
    let status = glommio::spawn_local(send_status(
        shard.clone(),
        from.clone(),
        out.clone(),
        live.clone(),
        admitted.clone(),
    ));
    let read = async {
        Ok(loop {
            match reader.next().await {
                // Once we closed the link (expiry, revocation) nothing more is served on it:
                // what still comes is read only to see the other side's close.
                Ok(Message::Binary(_)) if out.borrow().is_closing() => {}
                Ok(Message::Binary(b)) => {
                    let f = match Frame::decode(b) {
                        Ok(f) if f.header.kind == Kind::Request => f,
                        Ok(f) => {
                            break peer_protocol_error(
                                shard,
                                &from,
                                &format!("a frame of kind {:?}, not a Request", f.header.kind),
                            )
                        }
                        Err(e) => {
                            break peer_protocol_error(
                                shard,
                                &from,
                                &format!("a message that is no fedbus frame ({e})"),
                            )
                        }
                    };
                    // The body is held until answered, charged as a client's is on the router
                    // it entered.
                    let admitted = if inflight.get() >= limits.max_pending_per_link {
                        ShardMetrics::inc(&shard.metrics.busy_refused);
                        Err(Answer::error(
                            503,
                            "peer_busy",
                            "over the in-flight limit of this peer link",
                        ))
                    } else {
                        // The whole frame stays in memory until answered (the payload is a
                        // slice of it): its metadata counts too.
                        let n = f.meta.len() + f.payload.len();
                        shard.charge_within(&held, usize::MAX, n, n)
                    };
                    let charge = match admitted {
                        Ok(c) => c,
                        Err(a) => {
                            send_answer(
                                &out,
                                shard.index,
                                f.header.request_id,
                                &a,
                                Some(Served {
                                    by: &shard.router_name,
                                    cors_credentials: cors_credentials(shard, &f),
                                }),
                            );
                            continue;
                        }
                    };
                    inflight.set(inflight.get() + 1);
                    let (s, o, n, c) =
                        (shard.clone(), out.clone(), inflight.clone(), cache.clone());
                    glommio::spawn_local(async move {
                        let _charge = charge;
                        let start = Instant::now();
                        let a = match forwarded_request(&f, start) {
                            Ok(req) => routing::route(&s, &c, &req).await,
                            Err(a) => a,
                        };
                        let served = Served {
                            by: &s.router_name,
                            cors_credentials: cors_credentials(&s, &f),
                        };
                        let sent = send_answer(&o, s.index, f.header.request_id, &a, Some(served));
                        s.metrics.request(
                            a.status(),
                            start.elapsed().as_micros() as u64,
                            f.payload.len(),
                            sent,
                        );
                        n.set(n.get() - 1);
                    })
                    .detach();
                }
                Ok(Message::Ping(p)) => out.borrow_mut().send_control(ws::frame::opcode::PONG, &p),
                Ok(Message::Text(t)) => on_renew(shard, &from, &live, &*admitted, &out, &t),
                Ok(Message::Pong(_)) => {}
                Ok(Message::Close(_)) => break Some(1000),
                Err(e) => break closed_for(shard, &from, &e),
            }
        })
    };
    let end = ws::conn::until_closed_or_late(shard, &out, read)
        .await
        .unwrap_or_else(|e| e.close_code());
    drop(expiry.cancel());
    drop(status.cancel());
    tracing::info!(shard = shard.index, cluster = %from, "peer link from {from} closed");
    match end {
        Some(c) => out.borrow_mut().close(c),
        None => out.borrow_mut().abort(),
    }
    let _ = writer.await;
}

/// Tells the dialing router this router's [`PeerStatus`]: once at once, then on each change.
/// On the same tick, closes the link with 1008 once `admitted` (the upgrade's checks) fails
/// after a reload changed the federation view, and once before the first tick (a reload
/// between the upgrade and this task's start is not missed); and once the clock passes
/// `key_until`, the end of the grace of its token's key version (moved by each check).
async fn send_status(
    shard: Rc<Shard>,
    from: String,
    out: Rc<RefCell<ws::WsOut>>,
    live: Rc<LiveCred>,
    admitted: Admit,
) {
    // What the status is made of; rebuilt only when one of these moves.
    let mut seen: Option<(u64, bool, bool)> = None;
    let mut last: Option<PeerStatus> = None;
    // The federation view last checked (generations start at 1).
    let mut fed_seen = 0;
    let mut timer = crate::util::Deadline::new();
    loop {
        if out.borrow().is_closing() {
            return;
        }
        let fed = shard.snapshots.fed.load().generation;
        let mut revoked = None;
        if std::mem::replace(&mut fed_seen, fed) != fed {
            let verdict = admitted(&shard, &live.token.borrow());
            match verdict {
                Ok(cred) => live.key_until.set(cred.key_until),
                Err((_, code, why)) => revoked = Some(format!(" after a reload: {code}: {why}")),
            }
        }
        // No reload needed: a replaced key version stops verifying when its grace ends, and
        // a new link with this token would be refused from then on.
        if revoked.is_none() && crate::util::unix_secs_coarse() >= live.key_until.get() {
            revoked = Some(": the key version of its peer token retired".into());
        }
        if let Some(why) = revoked {
            ShardMetrics::inc(&shard.metrics.links_revoked);
            tracing::warn!(shard = shard.index, cluster = %from, "peer link closed{why}");
            out.borrow_mut().close(1008);
            return;
        }
        let table = shard.snapshots.routes.load();
        let h = &shard.health;
        let key = (table.generation, h.draining(), h.all_shards_running());
        if seen != Some(key) {
            seen = Some(key);
            let max = shard.cfg.limits.max_message_bytes();
            let now = PeerStatus::now(h, &table, shard.cfg.readiness.coverage, max);
            if last.as_ref() != Some(&now) {
                let text = serde_json::to_string(&now).unwrap_or_default();
                if out.borrow_mut().send_text(&text).is_err() {
                    return;
                }
                last = Some(now);
            }
        }
        drop(table);
        timer.sleep(crate::health::POLL).await;
    }
}

/// Whether the answer to the forwarded request `f` carries CORS_CREDENTIALS: it is for an app
/// of this cluster whose policy allows its ORIGIN with credentials (the forwarding router adds
/// `Access-Control-Allow-Credentials` from it). Refusals too (`peer_busy`, the budget), so that
/// a credentialed page reads them; never for a request that is not for this cluster (`508
/// forward_loop`): an app of the same name here is another app.
fn cors_credentials(shard: &Shard, f: &Frame) -> bool {
    // ORIGIN first: most forwarded requests have none, and this runs for every answer.
    let Some(origin) = f.get(tag::ORIGIN) else {
        return false;
    };
    let ours = f
        .get_str(tag::CLUSTER)
        .and_then(|c| c.split_once('/'))
        .is_some_and(|(r, c)| r == shard.cfg.region && c == shard.cfg.cluster);
    match (ours, f.get_str(tag::APP)) {
        (true, Some(app)) => routing::cors::credentials_for(shard, app, origin),
        _ => false,
    }
}

/// The protocol-neutral request of a frame forwarded by a peer router: the target from its
/// CLUSTER, APP, SERVICE, MODULE, FUNCTION and WSID entries, the client's TOKEN.
#[allow(clippy::result_large_err)]
fn forwarded_request(f: &Frame, received: Instant) -> Result<Request<'_>, Answer> {
    let missing = || {
        Answer::error(
            400,
            "bad_request",
            "forwarded request without CLUSTER or APP",
        )
    };
    let (region, cluster) = f
        .get_str(tag::CLUSTER)
        .and_then(|c| c.split_once('/'))
        .ok_or_else(missing)?;
    let app_name = f.get_str(tag::APP).ok_or_else(missing)?;
    let (owner, app) = app_name.split_once('/').unwrap_or((app_name, ""));
    Ok(Request {
        target: ApiPath {
            region,
            cluster,
            owner,
            app,
            app_name,
            service: f.get_str(tag::SERVICE).unwrap_or(""),
            wsid: f.get_u64(tag::WSID).unwrap_or(0),
            module: f.get_str(tag::MODULE).unwrap_or(""),
            function: f.get_str(tag::FUNCTION).unwrap_or(""),
        },
        method: f.get_str(tag::METHOD).unwrap_or("POST"),
        credential: f.get(tag::TOKEN),
        content_type: f.get(tag::CONTENT_TYPE),
        payload: f.payload.clone(),
        ingress: Ingress::Peer,
        origin: f.get(tag::ORIGIN),
        preflight: f.header.flags & flags::PREFLIGHT != 0,
        received,
    })
}

/// The peer token this router presents: from `peer_token_file`, or minted from the private
/// cluster key of the keyring in dev mode. Read at start, also by a router with no other
/// router in its `[federation]` yet: a cluster added by a reload is dialed with it (before,
/// such a router dialed with no token and was refused for its whole life). With no other
/// router, a token that cannot be had is no error (none is needed yet): it is logged.
pub(crate) fn peer_token(cfg: &crate::config::Config) -> anyhow::Result<Option<String>> {
    let token = own_peer_token(cfg);
    if cfg.peer_clusters().next().is_none() && siblings(cfg).is_empty() {
        return Ok(token.map(Some).unwrap_or_else(|e| {
            if cfg.federation.peer_token_file.is_some() {
                tracing::info!("no peer token ({e:#}): a cluster added to [federation] by a reload is dialed once the file holds one");
            } else {
                tracing::info!("no peer token ({e:#}): a cluster added to [federation] by a reload needs a restart to be dialed");
            }
            None
        }));
    }
    token.map(Some)
}

/// The peer token to present from now on, when it differs from `current`: the file's content
/// when it changed, or, in dev mode, a token minted again once the newest cluster key version
/// is not the one that signed `current` (a rotation). None: `current` stays. Called by the
/// control thread on each look at the token file, on SIGHUP and when the keyring changes.
pub(crate) fn reloaded_peer_token(
    cfg: &crate::config::Config,
    current: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if cfg.federation.peer_token_file.is_none() && !cfg.dev {
        // No source: a router outside dev mode without a token file has none to reload (one
        // that needs it refused to start).
        return Ok(None);
    }
    if cfg.federation.peer_token_file.is_none() {
        let (newest, _) = crate::auth::Keyring::cluster_signing_key(&cfg.keyring_dir())?;
        let signed_by = current
            .and_then(crate::auth::service_token::peek_claims)
            .and_then(|c| c.get("kid")?.as_u64());
        if signed_by == Some(u64::from(newest)) {
            return Ok(None);
        }
    }
    let t = own_peer_token(cfg)?;
    if t.is_empty() {
        anyhow::bail!("the peer token file is empty");
    }
    Ok((Some(t.as_str()) != current).then_some(t))
}

fn own_peer_token(cfg: &crate::config::Config) -> anyhow::Result<String> {
    if let Some(p) = &cfg.federation.peer_token_file {
        let t = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("federation.peer_token_file {}: {e}", p.display()))?;
        return Ok(t.trim().to_string());
    }
    if !cfg.dev {
        anyhow::bail!("federation.peer_token_file is required outside dev mode");
    }
    let (kid, key) = crate::auth::Keyring::cluster_signing_key(&cfg.keyring_dir())?;
    let now = auth::now_unix();
    Ok(crate::auth::sign_service_token(
        &key,
        &crate::auth::ServiceClaims {
            kid,
            sub: cfg.router.clone(),
            app: String::new(),
            cluster: cfg.cluster_id(),
            iat: now,
            exp: now + 365 * 86400,
            role: None,
        },
    ))
}

/// The shared slot of this router's peer token (`Federation::token`), which the control thread
/// replaces.
pub(crate) type PeerToken = Arc<arc_swap::ArcSwapOption<String>>;

/// Shared handle type for shards.
pub(crate) type FederationRef = Arc<Federation>;

#[cfg(test)]
mod tests {
    use super::status::AppCoverage;
    use super::{PeerStatus, Peers, Slot};
    use crate::task::link::TaskLink;
    use crate::ws::{Side, WsOut};
    use std::rc::Rc;

    /// A sibling slot whose status covers partitions `live` of 16 of `demo/echo`, with a link
    /// (out of routing when `ejected`).
    fn sibling(addr: &str, live: &[[u32; 2]], draining: bool, ejected: bool) -> Rc<Slot> {
        let s = Slot::new(addr);
        let link = Rc::new(TaskLink::new(
            0,
            String::new(),
            String::new(),
            WsOut::new(Side::Client, 1 << 20),
        ));
        if ejected {
            link.stopping();
        }
        *s.link.borrow_mut() = Some(link);
        let apps = [(
            "demo/echo".to_string(),
            AppCoverage {
                partitions: 16,
                live: live.to_vec(),
            },
        )];
        *s.status.borrow_mut() = Some(PeerStatus {
            kind: "status".into(),
            ready: true,
            draining,
            apps: apps.into_iter().collect(),
            max_message: None,
        });
        s
    }

    /// `covering` hands a partition to a sibling whose status has it live and that is not
    /// draining: one in routing by default, only one out of routing (ejected) when asked for
    /// the last resort; never a draining one, nor one without the partition.
    #[test]
    fn covering_takes_an_ejected_sibling_only_as_the_last_resort() {
        let covering = |slots: Vec<Rc<Slot>>, ejected: bool| {
            let mut p = Peers::default();
            p.clusters.insert("ru/spb".into(), slots);
            p.covering("ru/spb", "demo/echo", 13, 16, ejected)
                .map(|l| Rc::as_ptr(&l))
        };
        let link = |s: &Rc<Slot>| s.link.borrow().as_ref().map(Rc::as_ptr);
        let (good, out) = (
            sibling("a", &[[13, 13]], false, false),
            sibling("b", &[[0, 15]], false, true),
        );
        let both = vec![good.clone(), out.clone()];
        assert_eq!(covering(both.clone(), false), link(&good));
        assert_eq!(covering(both, true), link(&out));
        assert_eq!(covering(vec![out.clone()], false), None);
        let draining = sibling("c", &[[13, 13]], true, true);
        let lacks = sibling("d", &[[0, 12]], false, true);
        assert_eq!(covering(vec![draining, lacks], true), None);
    }
}
