//! The running task: one reconnecting loop per router shard, each driving a
//! [`fedbus_proto::link::Link`] over a tokio-tungstenite websocket.

use crate::{Error, Outcome, Request, TaskOptions, TokenSource};
use bytes::Bytes;
use fedbus_proto::link::{
    handover, next_redial, shard_key, Event, Handover, Input, Link, LinkConfig, LinkError, OldLink,
    RequestHead, ShardAddr,
};
use fedbus_proto::renew::{self, RenewAnswer, RenewPacer};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// Counters of a running task, for logs, health checks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Links registered now (one per shard of every router when all is well).
    pub registered_links: usize,
    /// Link loops running: one per router shard the task knows (configured, or announced by a
    /// router's hello), linked or dialing. A shard that a router's latest hello no longer
    /// lists (it restarted with fewer shards) has its loop retired.
    pub loops: usize,
    /// Websocket connections opened (upgrades that succeeded), in all.
    pub connects: u64,
    /// Connection attempts that failed before the upgrade (refused, unreachable, 401...).
    pub connect_failures: u64,
    /// Registrations the routers acknowledged, in all.
    pub registrations: u64,
    /// Requests received.
    pub requests: u64,
    /// Answers queued for sending (responses and redirects).
    pub answers: u64,
    /// Handlers that panicked (their requests were answered 500).
    pub panics: u64,
    /// Websocket pings received from routers (each answered with a pong).
    pub pings: u64,
    /// Answers over the router's message bound (its hello's `max_message`), sent as
    /// `502 answer_too_large` instead: the router would close the link over them.
    pub too_large: u64,
    /// Links closed right after the hello because another link of this task already holds
    /// that router shard (the same shard reached by a second address); they stand by.
    pub duplicates: u64,
    /// Requests answered `503 task_busy` at once because [`TaskOptions::max_in_flight`]
    /// handlers were running.
    pub busy: u64,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    registrations: AtomicU64,
    requests: AtomicU64,
    answers: AtomicU64,
    panics: AtomicU64,
    pings: AtomicU64,
    too_large: AtomicU64,
    duplicates: AtomicU64,
    busy: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Where a link loop dials: the configured address of a router's shard 0, or the address of
/// another shard as the latest hello announced it (a router restarted on new ports moves it).
#[derive(Clone)]
enum Dial {
    Fixed(String),
    /// None: retired (the router's latest hello no longer lists the shard); its loop ends.
    Announced(Arc<Mutex<Option<String>>>),
}

impl Dial {
    /// Where to dial; None once retired.
    fn addr(&self) -> Option<String> {
        match self {
            Dial::Fixed(a) => Some(a.clone()),
            Dial::Announced(a) => a.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

struct Ctx<H> {
    opts: TaskOptions,
    /// The TLS config of every link ([`TaskOptions::tls_ca`]); None: plaintext.
    tls: Option<Arc<rustls::ClientConfig>>,
    link: Arc<LinkConfig>,
    handler: H,
    /// `router#shard` -> the address its loop dials (the configured ones: the dialled address).
    shards: Mutex<HashMap<String, Dial>>,
    /// `router#shard` of every link past its hello now: one link per shard. A second one (the
    /// same shard reached by another configured or announced address) would replace the first
    /// at the router, which then replaces it back, forever (two links of one task id).
    linked: Mutex<HashSet<String>>,
    counters: Counters,
    registered: watch::Sender<usize>,
    loops: watch::Sender<usize>,
    stop: watch::Receiver<bool>,
    stop_tx: Arc<watch::Sender<bool>>,
    last_error: Mutex<Option<String>>,
    /// The service token links present: at the upgrade, and in `renew` when it changes.
    token: watch::Sender<String>,
    /// Asks the refresher for a fresh token now (a router refused the current one).
    refused: Arc<tokio::sync::Notify>,
    /// Why the task gave up (a token refused for good); set once.
    fatal: watch::Sender<Option<String>>,
    /// Set by [`Task::shutdown_graceful`]: every registered link tells its router
    /// (`{"type":"draining"}`), which sends it no new request and answers `drained`.
    draining_tx: Arc<watch::Sender<bool>>,
    /// Registered links whose router has not answered `drained` yet (a link that ends stops
    /// counting): [`Task::shutdown_graceful`] waits for 0, after which no request can come.
    undrained: Arc<watch::Sender<usize>>,
    /// Requests whose handler runs or whose answer is not written yet.
    in_flight: Arc<watch::Sender<usize>>,
}

/// A task running on the current tokio runtime. Dropping it stops every link (close 1000);
/// requests still in a handler are then not answered (their clients get `502 task_lost`):
/// [`Task::shutdown_graceful`] lets them finish first.
pub struct Task {
    stop: Arc<watch::Sender<bool>>,
    fatal: watch::Receiver<Option<String>>,
    registered: watch::Receiver<usize>,
    loops: watch::Receiver<usize>,
    stats: Arc<dyn Fn() -> Stats + Send + Sync>,
    last_error: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    secrets: crate::Secrets,
    draining_tx: Arc<watch::Sender<bool>>,
    undrained: watch::Receiver<usize>,
    in_flight: watch::Receiver<usize>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("stats", &self.stats())
            .finish()
    }
}

/// How long [`serve`] lets the handlers in flight finish after SIGTERM or SIGINT.
pub const SERVE_DRAIN: Duration = Duration::from_secs(10);

/// Serves `handler` until SIGTERM or SIGINT: [`Task::spawn`] on the current tokio runtime,
/// then waits; on either signal, [`Task::shutdown_graceful`] within [`SERVE_DRAIN`] (the
/// routers route nothing new to the task, the handlers in flight finish) and `Ok(())`, so a
/// rolling restart fails no request. Returns an error in the options, or [`Error::Refused`]
/// when a router refused the service token for [`TaskOptions::refused_exit_after`] (exit
/// non-zero on it).
pub async fn serve<H, F>(opts: TaskOptions, handler: H) -> Result<(), Error>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let task = Task::spawn(opts, handler)?;
    let listen = |k: SignalKind| {
        signal(k).map_err(|e| Error::Options(format!("cannot listen for SIGTERM/SIGINT: {e}")))
    };
    let (mut term, mut int) = (
        listen(SignalKind::terminate())?,
        listen(SignalKind::interrupt())?,
    );
    let refused = tokio::select! {
        why = task.failed() => Some(why),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    if let Some(why) = refused {
        return Err(Error::Refused(why));
    }
    tracing::info!(deadline = ?SERVE_DRAIN, "signal: the task stops taking requests and finishes those in flight");
    let left = task.shutdown_graceful(SERVE_DRAIN).await;
    if left > 0 {
        tracing::warn!(left, "handlers still running at the drain deadline");
    }
    Ok(())
}

/// The first token of a task: `opts.token`, or what its source gives now (read once,
/// blocking for at most `token_timeout`: the task is starting).
fn first_token(opts: &TaskOptions) -> Result<String, Error> {
    match crate::token::fetch_blocking(&opts.token_source, opts.token_timeout) {
        Ok(Some(t)) => Ok(t),
        // The token given in the options (Fixed, or until the source has one).
        _ if !opts.token.trim().is_empty() => Ok(opts.token.trim().to_string()),
        Ok(None) => Err(Error::Options("no service token".into())),
        Err(e) => Err(Error::Refused(format!("cannot read the token source: {e}"))),
    }
}

impl Task {
    /// Starts the task on the current tokio runtime (panics outside one): a link loop per
    /// configured router, which open the loops of the other shards from the hellos.
    pub fn spawn<H, F>(opts: TaskOptions, handler: H) -> Result<Task, Error>
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Outcome> + Send + 'static,
    {
        opts.validate()?;
        // Before the token: a bad CA file fails at once, without running a token command.
        let tls = opts
            .tls_ca
            .as_deref()
            .map(crate::tls::client_config)
            .transpose()?;
        let first = first_token(&opts)?;
        let mut link = LinkConfig::new(
            opts.task_id,
            opts.app.clone(),
            opts.role.clone(),
            opts.partitions.clone(),
        );
        link.handshake_timeout = opts.handshake_timeout;
        link.idle_timeout = opts.idle_timeout;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let (token, _) = watch::channel(first);
        let (fatal, fatal_rx) = watch::channel(None);
        let refused = Arc::new(tokio::sync::Notify::new());
        let (registered, registered_rx) = watch::channel(0usize);
        let (loops, loops_rx) = watch::channel(0usize);
        let (in_flight, in_flight_rx) = watch::channel(0usize);
        let draining_tx = Arc::new(watch::channel(false).0);
        let (undrained, undrained_rx) = watch::channel(0usize);
        let secrets = opts.secrets.clone();
        let routers = opts.routers.clone();
        let ctx = Arc::new(Ctx {
            opts,
            tls,
            link: Arc::new(link),
            handler,
            shards: Mutex::new(HashMap::new()),
            linked: Mutex::new(HashSet::new()),
            counters: Counters::default(),
            registered,
            loops,
            stop: stop_rx,
            stop_tx: stop_tx.clone(),
            last_error: Mutex::new(None),
            token,
            refused,
            fatal,
            draining_tx: draining_tx.clone(),
            undrained: Arc::new(undrained),
            in_flight: Arc::new(in_flight),
        });
        if ctx.opts.token_source != TokenSource::Fixed {
            tokio::spawn(crate::token::refresher(
                ctx.opts.token_source.clone(),
                ctx.opts.token_poll,
                ctx.opts.token_timeout,
                ctx.opts.token_refresh,
                ctx.token.clone(),
                ctx.refused.clone(),
                ctx.stop.clone(),
            ));
        }
        tracing::info!(
            app = %ctx.link.app,
            role = %ctx.link.role,
            partitions = ctx.link.partitions.len(),
            task = ctx.link.task,
            ?routers,
            tls = ctx.tls.is_some(),
            "fedbus task starting"
        );
        for r in routers {
            spawn_loop(&ctx, Dial::Fixed(r), None);
        }
        let c = ctx.clone();
        let stats = Arc::new(move || {
            let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let k = &c.counters;
            Stats {
                registered_links: *c.registered.borrow(),
                loops: *c.loops.borrow(),
                connects: n(&k.connects),
                connect_failures: n(&k.connect_failures),
                registrations: n(&k.registrations),
                requests: n(&k.requests),
                answers: n(&k.answers),
                panics: n(&k.panics),
                pings: n(&k.pings),
                too_large: n(&k.too_large),
                duplicates: n(&k.duplicates),
                busy: n(&k.busy),
            }
        });
        let c = ctx;
        let last_error = Arc::new(move || {
            c.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        });
        Ok(Task {
            stop: stop_tx,
            fatal: fatal_rx,
            registered: registered_rx,
            loops: loops_rx,
            stats,
            last_error,
            secrets,
            draining_tx,
            undrained: undrained_rx,
            in_flight: in_flight_rx,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        (self.stats)()
    }

    /// Links registered now.
    pub fn registered_links(&self) -> usize {
        *self.registered.borrow()
    }

    /// Waits until at least `links` links are registered; false if `timeout` passed first.
    pub async fn wait_registered(&self, links: usize, timeout: Duration) -> bool {
        let mut rx = self.registered.clone();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n >= links))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the task gives up: a router refused its service token for
    /// [`TaskOptions::refused_exit_after`]. Every link is closed by then. Returns why.
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.clone();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            // The task ended without giving up (every link stopped): nothing to report.
            None => std::future::pending().await,
        }
    }

    /// Why the task gave up, if it did ([`Task::failed`]).
    pub fn failure(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// The last reason a link failed or closed, if any.
    pub fn last_error(&self) -> Option<String> {
        (self.last_error)()
    }

    /// The app secrets pushed to this task (role `auth`).
    pub fn secrets(&self) -> &crate::Secrets {
        &self.secrets
    }

    /// The newest `(version, secret)` pushed for `app` (role `auth`).
    pub fn secret(&self, app: &str) -> Option<(u32, Vec<u8>)> {
        self.secrets.secret(app)
    }

    /// Closes every link (close 1000) and waits until every link loop has ended (at most
    /// about a second per link for the close to be written). Handlers still running are not
    /// waited for: their answers are dropped, and the router answers those requests
    /// `502 task_lost`. See [`Task::shutdown_graceful`].
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut loops = self.loops.clone();
        let _ = loops.wait_for(|n| *n == 0).await;
    }

    /// Stops taking requests, lets the handlers in flight finish for up to `deadline`, then
    /// [`Task::shutdown`]. Every registered link tells its router the task is stopping
    /// (`{"type":"draining"}`); the router routes nothing new to it and answers `drained`
    /// after the last request it sent on that link. Requests that arrive before that
    /// answer are served as any (the router sent them before it read `draining`); one that
    /// arrives after it (from a router that misbehaves) is answered `503 task_stopping`. The
    /// task waits, within `deadline`, for every link's `drained` and then for the handlers
    /// in flight and for their answers to be written. Returns the number of requests still
    /// held at the deadline, their handler running or their answer not yet written to a
    /// router that reads slowly (those requests get `502 task_lost`); 0 when every one was
    /// answered.
    pub async fn shutdown_graceful(self, deadline: Duration) -> usize {
        self.draining_tx.send_replace(true);
        let (mut undrained, mut in_flight) = (self.undrained.clone(), self.in_flight.clone());
        let waited = tokio::time::timeout(deadline, async {
            let _ = undrained.wait_for(|n| *n == 0).await;
            let _ = in_flight.wait_for(|n| *n == 0).await;
        })
        .await;
        if waited.is_err() && *undrained.borrow() > 0 {
            tracing::warn!(
                links = *undrained.borrow(),
                "a router did not answer drained before the shutdown deadline"
            );
        }
        let left = *in_flight.borrow();
        if left > 0 {
            tracing::warn!(
                left,
                ?deadline,
                "handlers still running at the shutdown deadline"
            );
        }
        self.shutdown().await;
        left
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Counts a link loop while it lives (also when it is aborted or panics).
struct LoopGuard(watch::Sender<usize>);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

fn spawn_loop<H, F>(ctx: &Arc<Ctx<H>>, dial: Dial, old: Option<OldLink>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    ctx.loops.send_modify(|n| *n += 1);
    let guard = LoopGuard(ctx.loops.clone());
    tokio::spawn(link_loop(ctx.clone(), dial, guard, old));
}

/// Links to one router shard, again and again, until the task stops. `old`: this loop
/// replaces the link of a draining router (`router_draining`); its dials follow
/// [`next_redial`].
async fn link_loop<H, F>(ctx: Arc<Ctx<H>>, dial: Dial, _guard: LoopGuard, mut old: Option<OldLink>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    let mut stop = ctx.stop.clone();
    let mut prev = None;
    // Since when this router refuses the token, upgrade after upgrade.
    let mut refused_since: Option<Instant> = None;
    // The refusal past `refused_exit_after` while other links serve was logged (once per run
    // of refusals).
    let mut refused_logged = false;
    loop {
        // A stopping task links nothing new: a link registered after `shutdown_graceful`
        // looked at its links would be closed with what the router routed to it.
        if *ctx.draining_tx.borrow() {
            return;
        }
        let Some(addr) = dial.addr() else {
            tracing::info!("a router shard no longer announced: its link loop ends");
            return;
        };
        let (registered_at, res) = link_once(&ctx, &addr, &dial, &mut stop).await;
        let was_registered = registered_at.is_some();
        if *stop.borrow() {
            return;
        }
        if let Err(End::HandedOver(why)) = &res {
            // Its router drained; the loop it started holds the shard now.
            tracing::info!(%addr, "link of a draining router ended: {why}");
            return;
        }
        if registered_at.is_some_and(|t| t.elapsed() >= LIVED) {
            prev = None;
        }
        match &res {
            Err(End::Duplicate(key)) => {
                (refused_since, refused_logged) = (None, false);
                prev = None;
                // Not a failure: the shard is served. Dial again later, in case the link that
                // holds it goes and this address is the one that still works.
                let delay = STANDBY + Duration::from_millis(crate::random_u64() % 5000);
                tracing::debug!(%addr, shard = %key, ?delay, "shard already linked by another address; standing by");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            Err(End::Refused(why)) => {
                // The source may hold a newer token than the one refused: fetch it now.
                ctx.refused.notify_one();
                // While a link to another router is registered the task serves: a router
                // that refuses (another cluster's keyring, a rollout that lags) is dialed on
                // with backoff, as a NATS client tries its other servers, and the clock of
                // `refused_exit_after` runs only while no link of the task is registered.
                if *ctx.registered.borrow() > 0 {
                    refused_since = None;
                    if !refused_logged {
                        refused_logged = true;
                        tracing::error!(%addr, "this router refuses the service token ({why}); the task serves through its other links and dials this one on");
                    }
                } else if refused_since.get_or_insert_with(Instant::now).elapsed()
                    >= ctx.opts.refused_exit_after
                {
                    let why = format!("{addr}: {why}");
                    tracing::error!(after = ?ctx.opts.refused_exit_after, "service token refused for good ({why}); the task stops");
                    ctx.fatal.send_if_modified(|f| {
                        let first = f.is_none();
                        if first {
                            *f = Some(why.clone());
                        }
                        first
                    });
                    let _ = ctx.stop_tx.send(true);
                    return;
                }
            }
            Err(End::Failed(_)) if !was_registered => {}
            _ => (refused_since, refused_logged) = (None, false),
        }
        let res = res.map_err(|e| match e {
            End::Refused(m) | End::Failed(m) | End::Duplicate(m) | End::HandedOver(m) => m,
        });
        let (b, old_open) = next_redial(&mut prev, &mut old, crate::random_u64());
        let why = res.err().unwrap_or_else(|| "closed".into());
        if old_open {
            // Expected until the draining router's replacement listens.
            tracing::debug!(%addr, delay = ?b.delay, "replacement of a draining router's link not up: {why}; dialing again");
        } else {
            tracing::warn!(%addr, delay = ?b.delay, "link down: {why}; reconnecting");
        }
        *ctx.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        tokio::select! {
            _ = tokio::time::sleep(b.delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Why a link ended.
enum End {
    /// The router refused the service token at the upgrade (401 or 403), or the registration
    /// (close 1008 before `registered`).
    Refused(String),
    /// Another link of this task holds this router shard (`router#shard`).
    Duplicate(String),
    /// The link ended (for the reason given) after its router said it drains
    /// (`router_draining`): a new loop already links the same address.
    HandedOver(String),
    /// Anything else.
    Failed(String),
}

/// The first delay before a refused `renew` is sent again ([`RENEW_RETRY_MAX`] at most,
/// doubling at each refusal): the router's keyring may not know the new token's key version yet.
const RENEW_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest delay between two tries of a refused `renew`.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a link that found its shard held by another link waits before dialing again
/// (plus up to 5 s of jitter).
const STANDBY: Duration = Duration::from_secs(10);

/// A link that stayed registered at least this long starts the backoff over when it ends;
/// a shorter one (a router that closes each link after `registered`, another process with
/// the same task id replacing it) lets the backoff grow, or the task would redial at once,
/// again and again.
const LIVED: Duration = Duration::from_secs(1);

/// One link: connect, then serve it until it ends. Returns when it got registered (None: it
/// did not), and why it ended.
async fn link_once<H, F>(
    ctx: &Arc<Ctx<H>>,
    addr: &str,
    dial: &Dial,
    stop: &mut watch::Receiver<bool>,
) -> (Option<Instant>, Result<(), End>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    // The token presented at the upgrade, taken from a subscription made first: one that
    // arrives while the upgrade is under way is then seen as changed, and sent as a `renew`.
    let mut token_rx = ctx.token.subscribe();
    let presented = token_rx.borrow_and_update().clone();
    let ws = tokio::select! {
        r = connect(ctx, addr, &presented) => r,
        _ = stop.wait_for(|s| *s) => return (None, Ok(())),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            bump(&ctx.counters.connect_failures);
            return (None, Err(e));
        }
    };
    bump(&ctx.counters.connects);
    let (mut sink, mut stream) = ws.split();

    // The writer: everything queued is fed before one flush, so answers that are ready
    // together leave in one write. An answer's handler stays counted in `in_flight` until the
    // flush that wrote it (`shutdown_graceful` waits for written answers, not queued ones);
    // the bytes queued and not yet written are the link's backlog, bounded below.
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let backlog = Arc::new(Backlog::default());
    let out = Outbox {
        tx,
        backlog: backlog.clone(),
    };
    let mut writer = tokio::spawn(async move {
        // Reused: no allocation per batch at steady state.
        let mut held: Vec<InFlight> = Vec::new();
        while let Some((m, g)) = rx.recv().await {
            let mut closing = matches!(m, Message::Close(_));
            let mut bytes = m.len();
            held.extend(g);
            sink.feed(m).await?;
            while !closing {
                match rx.try_recv() {
                    Ok((m, g)) => {
                        closing = matches!(m, Message::Close(_));
                        bytes += m.len();
                        held.extend(g);
                        sink.feed(m).await?;
                    }
                    Err(_) => break,
                }
            }
            sink.flush().await?;
            held.clear();
            backlog.bytes.fetch_sub(bytes, Ordering::Relaxed);
            backlog.written.notify_one();
            if closing {
                break;
            }
        }
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    });

    let mut link = Link::new(ctx.link.clone(), Instant::now())
        .over_unix(addr.starts_with(fedbus_proto::hello::UNIX_PREFIX));
    let (mut registered, mut claimed) = (false, false);
    let mut registered_at: Option<Instant> = None;
    // The shard this link holds in `ctx.linked`, released when it ends.
    let mut held: Option<String> = None;
    // The router's bound on one message from the task (from the hello).
    let mut max_answer = usize::MAX;
    // One renew outstanding at a time, the next spaced from its answer (the router refuses a
    // second within a second, `too_often`, and closes the link on a third: PROTOCOL.md
    // section 4); `renew_at`: when the newer token waiting goes out.
    let mut pacer = RenewPacer::default();
    let mut renew_at: Option<Instant> = None;
    // The token the router holds for this link (presented at the upgrade, then each renew it
    // accepted), and those sent in renews not answered yet, oldest first.
    let mut accepted = presented;
    let mut sent: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    // A refused renew is sent again (the same token, or a newer one by then) after this, doubled
    // at each refusal up to [`RENEW_RETRY_MAX`], while the router holds an older token than
    // the newest: a token of a new key version reached the task before the router's keyring
    // (ROTATION.md), or the router was busy (`too_often`). Reset by an accepted renew and by a
    // new token.
    let mut retry = RENEW_RETRY_FIRST;
    // `Task::shutdown_graceful`: tell the router once the link is registered, so that it routes
    // new requests to the other tasks (an older router ignores the message; the handler then
    // answers `503 task_stopping`).
    let mut drain_rx = ctx.draining_tx.subscribe();
    let mut drain_sent = false;
    // The router answered `drained`: nothing more comes on this link.
    let mut drained = false;
    // The router said it drains (`router_draining`): a new loop links its address again, and
    // this one ends with this link (and clears the new loop's flag then).
    let mut handed_over = false;
    let mut _handover: Option<Handover> = None;
    let res = loop {
        let deadline = link
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        // A router that sends requests but does not read the answers: past the backlog bound
        // this link reads nothing more until the writer has written some, so that the router's
        // writes block (TCP) instead of this task's memory growing.
        let reading = out.backlog.bytes.load(Ordering::Relaxed) < ctx.opts.max_write_backlog;
        let msg = tokio::select! {
            m = stream.next(), if reading => m,
            _ = out.backlog.written.notified(), if !reading => continue,
            _ = tokio::time::sleep_until(deadline.into()) => {
                match link.handle_timeout(Instant::now()) {
                    Ok(()) => continue,
                    Err(e) => break Err(End::Failed(e.to_string())),
                }
            }
            _ = stop.wait_for(|s| *s) => {
                out.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "task stopping".into(),
                })));
                break Ok(());
            }
            _ = drain_rx.wait_for(|d| *d), if !drain_sent => {
                drain_sent = true;
                if registered {
                    out.send(Message::Text(renew::DRAINING.into()));
                    continue;
                }
                // Stopping before this link registered: it closes instead of registering.
                out.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "task stopping".into(),
                })));
                break Ok(());
            }
            // Also while a refused renew waits for its retry: a new token goes out at once.
            changed = token_rx.changed(), if registered => {
                if changed.is_ok() {
                    retry = RENEW_RETRY_FIRST;
                    renew_at = Some(pacer.earliest(Instant::now()));
                }
                continue;
            }
            _ = tokio::time::sleep_until(renew_at.unwrap_or(deadline).into()), if renew_at.is_some() => {
                let now = Instant::now();
                if !pacer.may_send(now) {
                    renew_at = Some(pacer.earliest(now));
                    continue;
                }
                // The newest token (several changes within the spacing: only the last is sent).
                renew_at = None;
                let t = token_rx.borrow_and_update().clone();
                if t == accepted && sent.is_empty() {
                    // Back to the token the router holds (a source that went back): nothing to send.
                    continue;
                }
                pacer.sent(now);
                out.send(Message::Text(renew::renew(&t).into()));
                sent.push_back(t);
                continue;
            }
        };
        let msg = match msg {
            None => break Err(End::Failed("connection closed".into())),
            Some(Err(e)) => break Err(End::Failed(format!("websocket: {e}"))),
            Some(Ok(m)) => m,
        };
        let now = Instant::now();
        let r = match msg {
            Message::Text(t) => {
                if renew::is_drained(t.as_bytes()) && registered && !drained {
                    drained = true;
                    ctx.undrained.send_modify(|n| *n -= 1);
                }
                if renew::is_router_draining(t.as_bytes()) && !handed_over {
                    // The router's task listener is closed: a dial to this address reaches
                    // the router that took it over, or none yet (retried with backoff). This
                    // link serves on until the router closes it; it gives its shard to the
                    // new loop now, so that the new link is not taken for a duplicate.
                    handed_over = true;
                    if let Some(k) = held.take() {
                        ctx.linked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&k);
                    }
                    if !*ctx.draining_tx.borrow() {
                        tracing::info!(%addr, "router draining: linking its address again");
                        let (h, old) = handover();
                        spawn_loop(ctx, dial.clone(), Some(old));
                        _handover = Some(h);
                    }
                }
                if let Some(answer) = renew::renew_answer(t.as_bytes()) {
                    pacer.answered(now);
                    let token = sent.pop_front();
                    let refused = matches!(answer, RenewAnswer::Refused { .. });
                    if !refused {
                        if let Some(token) = token {
                            accepted = token;
                        }
                        retry = RENEW_RETRY_FIRST;
                    }
                    if renew_at.is_some() {
                        renew_at = Some(pacer.earliest(now));
                    } else if refused && *token_rx.borrow() != accepted {
                        // The router still holds an older token than the newest: try again.
                        renew_at = Some(pacer.earliest(now).max(now + retry));
                        tracing::info!(%addr, delay = ?retry, "renew refused; sending the newest token again after the delay");
                        retry = (retry * 2).min(RENEW_RETRY_MAX);
                    }
                    on_renew_answer(ctx, addr, answer);
                }
                link.handle(now, Input::Text(t.as_str()))
            }
            Message::Binary(b) => link.handle(now, Input::Binary(b)),
            // tungstenite queues the pong and writes it on the next read.
            Message::Ping(_) => {
                bump(&ctx.counters.pings);
                link.handle(now, Input::Ping)
            }
            Message::Pong(_) => link.handle(now, Input::Pong),
            Message::Close(c) => link.handle(
                now,
                Input::Close {
                    code: c.as_ref().map(|c| u16::from(c.code)),
                    reason: c.as_ref().map_or("", |c| c.reason.as_str()),
                },
            ),
            Message::Frame(_) => Ok(()),
        };
        if let Err(e) = r {
            break Err(match e {
                // Before `registered`, a 1008 is the router refusing the registration. When
                // it refuses the token (`wrong_token`; no reason from older routers) it will
                // refuse it again, so it counts toward `refused_exit_after` like a 401. The
                // other reasons (`unknown_app`, `bad_partitions`, ...) are about the router's
                // config, which may lag behind others' during a rollout: a failed link, retried.
                LinkError::Closed {
                    code: Some(1008),
                    reason,
                } if !registered && (reason.is_empty() || reason == "wrong_token") => {
                    End::Refused(format!(
                        "registration refused (close 1008{}{reason})",
                        if reason.is_empty() { "" } else { " " }
                    ))
                }
                e => End::Failed(e.to_string()),
            });
        }
        if !claimed {
            if let Some(k) = link.key() {
                claimed = true;
                // Before the other shards are opened, so that none of them opens this one.
                claim(ctx, k.clone(), dial);
                // Before the registration goes out (it waits in the link's events).
                if !ctx
                    .linked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(k.clone())
                {
                    bump(&ctx.counters.duplicates);
                    out.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "shard already linked by this task".into(),
                    })));
                    break Err(End::Duplicate(k));
                }
                held = Some(k);
                max_answer = link
                    .hello()
                    .and_then(|h| h.max_message)
                    .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
            }
        }
        while let Some(ev) = link.poll_event() {
            match ev {
                Event::SendText(t) => {
                    out.send(Message::Text(t.into()));
                }
                Event::LinkShards(others) => {
                    let hello = link.hello().map(|h| (h.router.clone(), h.shard));
                    link_shards(ctx, hello, others)
                }
                Event::Registered { shard } => {
                    registered = true;
                    registered_at.get_or_insert_with(Instant::now);
                    bump(&ctx.counters.registrations);
                    ctx.registered.send_modify(|n| *n += 1);
                    ctx.undrained.send_modify(|n| *n += 1);
                    let router = link.hello().map_or("", |h| h.router.as_str());
                    tracing::info!(%addr, router, shard, "link registered");
                }
                Event::Secret(p) => {
                    let (app, version) = (p.app.clone(), p.version);
                    if ctx.opts.secrets.offer(p) {
                        tracing::info!(app, version, "app secret received");
                    }
                }
                Event::Request(req) => on_request(ctx, req, &out, max_answer, drained),
            }
        }
    };
    if registered {
        ctx.registered.send_modify(|n| *n -= 1);
        if !drained {
            ctx.undrained.send_modify(|n| *n -= 1);
        }
    }
    if let Some(k) = held {
        ctx.linked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&k);
    }
    // Let the writer send what is queued (the close, on a stop), but not wait for long on a
    // router that does not read.
    drop(out);
    if tokio::time::timeout(Duration::from_secs(1), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    let res = match res {
        Err(End::Failed(why)) if handed_over => Err(End::HandedOver(why)),
        Ok(()) if handed_over => Err(End::HandedOver("closed".into())),
        res => res,
    };
    (registered_at, res)
}

/// The router's answer to a `renew` (docs/PROTOCOL.md section 4), logged; a refusal asks the
/// refresher for another token. Other text goes to the link state machine.
fn on_renew_answer<H>(ctx: &Ctx<H>, addr: &str, answer: RenewAnswer) {
    match answer {
        RenewAnswer::Renewed { exp } => {
            tracing::debug!(%addr, ?exp, "service token renewed on the link")
        }
        RenewAnswer::Refused { error, message } => {
            tracing::warn!(%addr, %error, %message, "router refused the renewed token; the link lives until the current one expires or a renew is accepted");
            // `too_often` refuses the timing, not the token: no new one is needed.
            if error != "too_often" {
                ctx.refused.notify_one();
            }
        }
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<LinkIo>>;

/// The socket under a link: TCP (maybe with TLS above it), or a router's unix socket
/// (`unix:<path>`, its `listen.internal_unix`; never TLS).
enum LinkIo {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl tokio::io::AsyncRead for LinkIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkIo::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            LinkIo::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for LinkIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            LinkIo::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            LinkIo::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkIo::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            LinkIo::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkIo::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            LinkIo::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// TCP connect with TCP_NODELAY, the TLS handshake (with [`TaskOptions::tls_ca`]), then the
/// upgrade with the service token `token`; all within `connect_timeout`. The TCP connection is made
/// here rather than by tokio-tungstenite so that its failures and the TLS ones read apart.
async fn connect<H>(ctx: &Ctx<H>, addr: &str, token: &str) -> Result<WsStream, End> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::Connector;
    let failed = End::Failed;
    let unix = addr.strip_prefix(fedbus_proto::hello::UNIX_PREFIX);
    let (scheme, connector) = match &ctx.tls {
        // A unix socket is local: never TLS.
        Some(c) if unix.is_none() => ("wss", Connector::Rustls(c.clone())),
        _ => ("ws", Connector::Plain),
    };
    let host = if unix.is_some() { "localhost" } else { addr };
    let tls = matches!(connector, Connector::Rustls(_));
    let mut req = format!("{scheme}://{host}/link")
        .into_client_request()
        .map_err(|e| failed(format!("bad router address {addr:?}: {e}")))?;
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| failed("the service token is not a valid header value".to_string()))?;
    req.headers_mut().insert("authorization", auth);
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(ctx.opts.max_message))
        .max_frame_size(Some(ctx.opts.max_message));
    let dial = async {
        let io = match unix {
            Some(path) => LinkIo::Unix(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| failed(format!("connect {addr}: {e}")))?,
            ),
            None => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| failed(format!("connect {addr}: {e}")))?;
                tcp.set_nodelay(true)
                    .map_err(|e| failed(format!("connect {addr}: TCP_NODELAY: {e}")))?;
                LinkIo::Tcp(tcp)
            }
        };
        // The server name checked against the router's certificate is the URI's host.
        Ok::<_, End>(
            tokio_tungstenite::client_async_tls_with_config(req, io, Some(cfg), Some(connector))
                .await,
        )
    };
    let r = match tokio::time::timeout(ctx.opts.connect_timeout, dial).await {
        Err(_) => {
            let what = if tls {
                "no TLS handshake and upgrade"
            } else {
                "no upgrade"
            };
            return Err(failed(format!(
                "connect {addr}: {what} within {:?}",
                ctx.opts.connect_timeout
            )));
        }
        Ok(r) => r?,
    };
    match r {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let status = resp.status();
            let mut m = format!("connect {addr}: refused with {status}: {body}");
            // A TLS-only internal listener answers a plaintext upgrade `400 tls_required`.
            if body.contains("tls_required") && !tls {
                m.push_str(" (the router's internal listener speaks TLS: set TaskOptions::tls_ca)");
            }
            // 401/403: the token itself (expired, retired or unknown key, bad signature,
            // another cluster); anything else may pass on a later try.
            Err(if matches!(status.as_u16(), 401 | 403) {
                End::Refused(m)
            } else {
                failed(m)
            })
        }
        // The handshake's failures: tokio-rustls hands rustls' error over in an io::Error.
        Err(WsError::Io(e)) if tls => Err(failed(match crate::tls::reason(&e) {
            Some(why) => format!("connect {addr}: TLS: {why}"),
            None => format!("connect {addr}: TLS or upgrade: {e}"),
        })),
        Err(WsError::Tls(e)) => Err(failed(format!("connect {addr}: TLS: {e}"))),
        Err(e) => Err(failed(format!("connect {addr}: {e}"))),
    }
}

/// Marks `key` as linked by the loop that dials `dial`, so no second loop is opened for it.
fn claim<H>(ctx: &Ctx<H>, key: String, dial: &Dial) {
    let mut shards = ctx.shards.lock().unwrap_or_else(|p| p.into_inner());
    shards.entry(key).or_insert_with(|| dial.clone());
}

/// Opens a loop for each announced shard not linked yet; moves the address of a known one.
/// `hello`: the router and shard of the link whose hello announced `others` (that router's
/// other shards): an announced shard of that router it no longer lists is retired, so that
/// a router restarted with fewer shards is not dialed on its old ports forever.
fn link_shards<H, F>(ctx: &Arc<Ctx<H>>, hello: Option<(String, usize)>, others: Vec<ShardAddr>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    let mut new = Vec::new();
    {
        let mut shards = ctx.shards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((router, shard)) = hello {
            let listed: HashSet<String> = others
                .iter()
                .map(|s| shard_key(&s.router, s.shard))
                .chain([shard_key(&router, shard)])
                .collect();
            let prefix = format!("{router}#");
            shards.retain(|key, d| {
                let gone = key.starts_with(&prefix)
                    && !listed.contains(key)
                    && matches!(d, Dial::Announced(_));
                if let (true, Dial::Announced(cell)) = (gone, &*d) {
                    tracing::info!(shard = %key, "router shard no longer announced: retired");
                    *cell.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                !gone
            });
        }
        for s in others {
            let key = shard_key(&s.router, s.shard);
            match shards.get(&key) {
                Some(Dial::Announced(cell)) => {
                    let mut a = cell.lock().unwrap_or_else(|p| p.into_inner());
                    if a.as_deref() != Some(s.addr.as_str()) {
                        tracing::info!(shard = %key, from = ?a, to = %s.addr, "router shard moved");
                        *a = Some(s.addr);
                    }
                }
                Some(Dial::Fixed(_)) => {}
                None => {
                    let d = Dial::Announced(Arc::new(Mutex::new(Some(s.addr))));
                    shards.insert(key, d.clone());
                    new.push(d);
                }
            }
        }
    }
    for d in new {
        spawn_loop(ctx, d, None);
    }
}

/// Runs the handler; answers at once when it is ready at once (no task spawned), else from a
/// task of its own, so that requests on a link are served concurrently. A handler that
/// panics answers 500; an answer over `max_answer` bytes (the router's bound) 502. The
/// request counts in `in_flight` from here until its answer is written.
fn on_request<H, F>(ctx: &Arc<Ctx<H>>, req: Request, out: &Outbox, max_answer: usize, drained: bool)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    bump(&ctx.counters.requests);
    let head = req.head();
    // Counted in before the link's `drained` is read (this link's loop reads it after this
    // request), and `shutdown_graceful` waits for every link's `drained` before it waits for
    // this count: a request served here is always waited for.
    // Handlers running and answers not yet written hold memory (a request, an answer, up to
    // `max_message` each): past the bound a request is refused at once, as the router
    // refuses one over its pending limit, instead of memory growing with a handler that slows
    // down or a router that reads slowly.
    if *ctx.in_flight.borrow() >= ctx.opts.max_in_flight {
        bump(&ctx.counters.busy);
        bump(&ctx.counters.answers);
        let why = format!(
            "{} handlers running or answers unwritten (TaskOptions::max_in_flight)",
            ctx.opts.max_in_flight
        );
        out.send(Message::Binary(error_frame(&head, 503, "task_busy", why)));
        return;
    }
    let running = InFlight::new(ctx.in_flight.clone());
    if drained {
        drop(running);
        let why = "the task is stopping; try again".to_string();
        bump(&ctx.counters.answers);
        out.send(Message::Binary(error_frame(
            &head,
            503,
            "task_stopping",
            why,
        )));
        return;
    }
    let first = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut fut = Box::pin((ctx.handler)(req));
        match fut.as_mut().now_or_never() {
            Some(o) => Ok(o),
            None => Err(fut),
        }
    }));
    let answer = move |ctx: &Ctx<H>, out: &Outbox, o: Result<Outcome, ()>, running| {
        let frame = encode_answer(&ctx.counters, &head, o, max_answer);
        bump(&ctx.counters.answers);
        out.answer(frame, running);
    };
    match first {
        Ok(Ok(o)) => answer(ctx, out, Ok(o), running),
        Err(_) => answer(ctx, out, Err(()), running),
        Ok(Err(fut)) => {
            let (ctx, out) = (ctx.clone(), out.clone());
            tokio::spawn(async move {
                let o = AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ());
                answer(&ctx, &out, o, running);
            });
        }
    }
}

/// What a link's writer sends: a message, and for an answer the count of its request, held
/// until the answer is written.
type Out = (Message, Option<InFlight>);

/// Bytes queued on a link and not yet written; `written` is notified after each write.
#[derive(Default)]
struct Backlog {
    bytes: std::sync::atomic::AtomicUsize,
    written: tokio::sync::Notify,
}

/// The sending half of a link: its writer's queue and the backlog it counts.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<Out>,
    backlog: Arc<Backlog>,
}

impl Outbox {
    fn send(&self, m: Message) {
        self.push(m, None);
    }

    /// An answer, its request counted in `in_flight` until the writer has written it.
    fn answer(&self, frame: Bytes, running: InFlight) {
        self.push(Message::Binary(frame), Some(running));
    }

    fn push(&self, m: Message, running: Option<InFlight>) {
        let n = m.len();
        self.backlog.bytes.fetch_add(n, Ordering::Relaxed);
        if self.tx.send((m, running)).is_err() {
            // The writer ended (the link failed): nothing more is written on it.
            self.backlog.bytes.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Counts a request from its handler's start until its answer is written (also when the
/// handler or the link is aborted).
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(n: Arc<watch::Sender<usize>>) -> InFlight {
        n.send_modify(|n| *n += 1);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// An error answer to `head`: JSON `{"error":code,"message":..,"status":..}`.
fn error_frame(head: &RequestHead, status: u16, code: &str, message: String) -> Bytes {
    let body = serde_json::json!({"error": code, "message": message, "status": status});
    Outcome::json(status, &body).encode(head)
}

/// The frame answering `head`: the handler's outcome, 500 for a handler that panicked, 502 for
/// an answer over `max_answer` bytes (the router would close the link over it).
fn encode_answer(
    counters: &Counters,
    head: &RequestHead,
    o: Result<Outcome, ()>,
    max_answer: usize,
) -> Bytes {
    let error = |status: u16, code: &str, message: String| error_frame(head, status, code, message);
    let frame = match o {
        Ok(Outcome::Response { status, .. }) if !(200..600).contains(&status) => {
            tracing::error!(
                id = head.request_id,
                status,
                "handler answered a status outside 200..599; answered 502 bad_task_status"
            );
            return error(502, "bad_task_status", bad_status(status));
        }
        Ok(o) => o.encode(head),
        Err(()) => {
            bump(&counters.panics);
            tracing::error!(id = head.request_id, "handler panicked");
            return error(500, "task_panic", "the task's handler failed".into());
        }
    };
    if frame.len() <= max_answer {
        return frame;
    }
    bump(&counters.too_large);
    tracing::error!(
        id = head.request_id,
        bytes = frame.len(),
        limit = max_answer,
        "answer over the router's message bound; answered 502 answer_too_large"
    );
    let why = format!(
        "the task's answer ({} bytes) is over the router's bound ({max_answer} bytes)",
        frame.len()
    );
    error(502, "answer_too_large", why)
}

/// What is wrong with a handler's `status` outside 200..599, for the client's 502
/// `bad_task_status` (the router's own message for a task that sends one says only that the
/// status cannot carry a body).
fn bad_status(status: u16) -> String {
    let what = match status {
        0..=99 => "is no HTTP status",
        100..=199 => "is an interim (1xx) status, not an answer",
        _ => "is no HTTP status (over 599)",
    };
    format!("the task's handler answered status {status}, which {what}: a task answers 200 to 599")
}
