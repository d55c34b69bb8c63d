//! The runner of the built-in tasks (`fedbus task echo|auth`): connects to every shard of every
//! router listed, registers the task's app, role and partitions on each link, serves an async
//! handler, and reconnects with backoff and jitter. Runs on one glommio executor of its own, so
//! the echo task used by the benchmarks is as fast as the router. Task authors use the
//! `fedbus-sdk` crate (tokio) instead.

use bytes::{Bytes, BytesMut};
use fedbus_proto::hello::{Hello, Register};
use fedbus_proto::link;
use fedbus_proto::renew::{self, RenewPacer};
use fedbus_proto::{self as proto, put_meta, put_meta_u64, tag, Frame, Header, Kind};
use fedbus_router::util::random_u64;
use fedbus_router::ws::{self, Message, Side, WsOut, WsReader};
use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// How a task connects.
#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// Internal address of shard 0 of each router (the hello names the other shards).
    pub routers: Vec<String>,
    pub app: String,
    pub role: String,
    pub partitions: Vec<u32>,
    /// Service token signed by the cluster key.
    pub token: String,
    /// Instance id, the same on every link (random by default).
    pub instance: u64,
    /// Largest message accepted from a router.
    pub max_message: usize,
    /// Add `echo-link-shard: <router shard>` to every answer (which router shard's link carried
    /// the request: lets tests prove requests never cross shards). Default false.
    pub report_link_shard: bool,
    /// Re-read the token from this file when it changes (every second) and send it on every
    /// open link as a `renew` (docs/PROTOCOL.md section 4). Default none: `token` is fixed.
    pub token_file: Option<std::path::PathBuf>,
    /// A router refusing the token at the upgrade (401/403) this long ends the process with
    /// status 1. Default 30 s.
    pub refused_exit_after: Duration,
    /// Dial the routers' internal listeners over TLS, trusting this client config
    /// (`fedbus task --tls-ca`; the routers run with `listen.internal_tls`). Default none.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// On SIGTERM or SIGINT the task stops gracefully: it tells every router it is stopping
    /// (`{"type":"draining"}`, docs/PROTOCOL.md section 4), answers what the routers sent
    /// before they answered `drained`, gives the handlers in flight up to this long in all,
    /// closes its links (1000) and exits 0. A router that never answers `drained` within it
    /// gets `503 task_stopping` for what it sends after. A second signal exits at once
    /// (status 1). Default 10 s.
    pub stop_timeout: Duration,
}

impl TaskOptions {
    pub fn new(
        routers: Vec<String>,
        app: &str,
        role: &str,
        partitions: Vec<u32>,
        token: String,
    ) -> Self {
        TaskOptions {
            routers,
            app: app.into(),
            role: role.into(),
            partitions,
            token,
            instance: random_u64(),
            max_message: 64 * 1024 * 1024,
            report_link_shard: false,
            token_file: None,
            refused_exit_after: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

thread_local! {
    /// App secrets pushed by routers to this (auth) task: app -> newest (version, secret).
    static SECRETS: RefCell<std::collections::HashMap<String, (u32, Vec<u8>)>> = RefCell::new(Default::default());
}

fn store_secret(f: &Frame) {
    let (Some(app), Some(v)) = (f.get_str(tag::APP), f.get_u64(tag::VERSION)) else {
        return;
    };
    let Ok(v) = u32::try_from(v) else { return };
    SECRETS.with(|s| {
        let mut s = s.borrow_mut();
        // Several routers push the same secret; keep the newest version.
        if s.get(app).is_none_or(|(old, _)| *old < v) {
            tracing::info!(app, version = v, "app secret received");
            s.insert(app.to_string(), (v, f.payload.to_vec()));
        }
    });
}

/// Newest app secret version pushed to this task, if any.
pub fn secret_version(app: &str) -> Option<u32> {
    SECRETS.with(|s| s.borrow().get(app).map(|(v, _)| *v))
}

/// Signs a client JWT for `sub` with the newest secret the routers pushed (Auth Service tasks
/// only: a task registered in role `auth`). None until a secret arrived.
pub fn sign_client_jwt(app: &str, sub: &str, ttl_secs: u64) -> Option<String> {
    let (version, secret) = SECRETS.with(|s| s.borrow().get(app).cloned())?;
    let now = fedbus_auth::now_unix();
    fedbus_auth::sign_client_jwt(
        &fedbus_auth::AppSecretVersion {
            version,
            secret,
            created: now,
        },
        &fedbus_auth::ClientClaims {
            sub: sub.into(),
            app: app.into(),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            nbf: None,
        },
    )
    .ok()
}

/// A request as the task sees it.
pub struct Request {
    pub frame: Frame,
}

impl Request {
    pub fn payload(&self) -> &Bytes {
        &self.frame.payload
    }
    pub fn meta(&self, t: u8) -> Option<&str> {
        self.frame.get_str(t)
    }
}

/// What a handler answers.
pub enum Outcome {
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        content_type: Option<String>,
        body: Bytes,
    },
    /// Seed: Redirect. Send the same request to `role` (same partition unless given).
    Redirect {
        role: String,
        partition: Option<u32>,
    },
}

impl Outcome {
    pub fn redirect(role: &str) -> Outcome {
        Outcome::Redirect {
            role: role.into(),
            partition: None,
        }
    }
}

thread_local! {
    /// Reused buffer for answer heads: answering allocates nothing but what the handler did.
    static HEAD: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(512));
}

/// Encodes the answer to `req_header` into `out`. `extra` is a ready `name: value` header line
/// the SDK adds itself (the link shard, when the task asks for it).
fn send_outcome(out: &RefCell<WsOut>, req: &Header, o: Outcome, extra: Option<&[u8]>) {
    HEAD.with(|head| {
        let mut m = head.borrow_mut();
        m.clear();
        m.resize(proto::HEADER_LEN, 0);
        let (kind, payload) = match o {
            Outcome::Response {
                status,
                headers,
                content_type,
                body,
            } => {
                put_meta_u64(&mut m, tag::STATUS, status as u64);
                if let Some(ct) = content_type {
                    put_meta(&mut m, tag::CONTENT_TYPE, ct.as_bytes());
                }
                for (k, v) in headers {
                    let mut line = Vec::with_capacity(k.len() + v.len() + 2);
                    line.extend_from_slice(k.as_bytes());
                    line.extend_from_slice(b": ");
                    line.extend_from_slice(v.as_bytes());
                    put_meta(&mut m, tag::HEADER, &line);
                }
                if let Some(x) = extra {
                    put_meta(&mut m, tag::HEADER, x);
                }
                (Kind::Response, body)
            }
            Outcome::Redirect { role, partition } => {
                put_meta(&mut m, tag::ROLE, role.as_bytes());
                if let Some(p) = partition {
                    put_meta_u64(&mut m, tag::PARTITION, p as u64);
                }
                (Kind::Redirect, Bytes::new())
            }
        };
        let h = Header {
            kind,
            flags: 0,
            hops: req.hops,
            partition: req.partition,
            request_id: req.request_id,
            meta_len: (m.len() - proto::HEADER_LEN) as u32,
            payload_len: payload.len() as u32,
        };
        m[..proto::HEADER_LEN].copy_from_slice(&h.encode());
        if out.borrow_mut().send_binary(&m, &payload).is_err() {
            tracing::warn!(
                id = req.request_id,
                "answer dropped: link outbox full or closed"
            );
        }
    });
}

/// Serves `handler` forever on a new glommio executor in this thread.
pub fn serve<H, F>(opts: TaskOptions, handler: H) -> anyhow::Result<()>
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Outcome> + 'static,
{
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .map_err(|e| anyhow::anyhow!("cannot start the task executor: {e}"))?;
    ex.run(run(opts, handler));
    Ok(())
}

/// The SDK's main future: one link loop per shard of every router, forever.
pub async fn run<H, F>(opts: TaskOptions, handler: H)
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Outcome> + 'static,
{
    let ctx = Rc::new(Ctx {
        token: RefCell::new(opts.token.clone()),
        token_generation: std::cell::Cell::new(0),
        opts,
        handler,
        started: RefCell::new(HashSet::new()),
        stopping: std::cell::Cell::new(false),
        refusing: std::cell::Cell::new(false),
        in_flight: Rc::new(std::cell::Cell::new(0)),
        links: RefCell::new(Vec::new()),
    });
    glommio::spawn_local(stop_on_signal(ctx.clone())).detach();
    if let Some(path) = ctx.opts.token_file.clone() {
        glommio::spawn_local(watch_token_file(ctx.clone(), path)).detach();
    }
    let mut all = Vec::new();
    for r in ctx.opts.routers.clone() {
        all.push(glommio::spawn_local(link_loop(ctx.clone(), r, None)));
    }
    for t in all {
        t.await;
    }
    // Link loops for other shards run detached; keep the executor alive.
    futures_lite::future::pending::<()>().await;
}

struct Ctx<H> {
    opts: TaskOptions,
    handler: H,
    /// `router#shard` keys of the links with a loop running.
    started: RefCell<HashSet<String>>,
    /// The service token links present, and how many times it changed.
    token: RefCell<String>,
    token_generation: std::cell::Cell<u64>,
    /// Set on SIGTERM or SIGINT ([`stop_on_signal`]).
    stopping: std::cell::Cell<bool>,
    /// Set when a router did not answer `drained` within the stop timeout: requests that still
    /// come are answered `503 task_stopping`.
    refusing: std::cell::Cell<bool>,
    /// Handlers running in a task of their own (not those that answered at once).
    in_flight: Rc<std::cell::Cell<usize>>,
    /// The registered links, to tell them the task is stopping and to know when each router
    /// answered `drained`.
    links: RefCell<Vec<Registered>>,
}

/// A registered link: its outbox, and whether the router answered `drained` on it (nothing
/// more comes on it).
struct Registered {
    out: std::rc::Weak<RefCell<WsOut>>,
    drained: Rc<std::cell::Cell<bool>>,
}

impl Registered {
    /// Nothing more comes on this link: the router said so, or the link is gone.
    fn done(&self) -> bool {
        self.drained.get() || self.out.strong_count() == 0
    }
}

/// The answer to a request that reaches a stopping task after its router answered `drained`
/// (it should send none) or after the stop timeout passed without that answer (a router that
/// predates `drained`), as the SDK's.
fn stopping_answer() -> Outcome {
    Outcome::Response {
        status: 503,
        headers: Vec::new(),
        content_type: Some("application/json".into()),
        body: Bytes::from_static(
            br#"{"error":"task_stopping","message":"the task is stopping; try again","status":503}"#,
        ),
    }
}

/// Waits for SIGTERM or SIGINT, then stops the task gracefully (see
/// [`TaskOptions::stop_timeout`]): every registered link is told `draining`; within
/// `stop_timeout` the task waits until each router answered `drained` (every request it routed
/// here came before that) and the handlers in flight are done; then every link closes with
/// 1000 once its answers are written (at most 1 s more), and the process exits 0. A second
/// signal exits at once with status 1.
async fn stop_on_signal<H>(ctx: Rc<Ctx<H>>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let got = std::sync::Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register_usize(sig, got.clone(), sig as usize) {
            tracing::warn!("cannot catch signal {sig}: it ends the task at once: {e}");
            return;
        }
    }
    // A flag polled by a timer: the executor needs no signal file descriptor, and 20 ms is
    // nothing against a stop that lasts seconds.
    while got.load(Ordering::SeqCst) == 0 {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    got.store(0, Ordering::SeqCst);
    ctx.stopping.set(true);
    let told = ctx.links.borrow().len();
    tracing::info!(
        links = told,
        in_flight = ctx.in_flight.get(),
        timeout = ?ctx.opts.stop_timeout,
        "stopping: told the routers; answering what is in flight"
    );
    for l in ctx.links.borrow().iter() {
        if let Some(out) = l.out.upgrade() {
            let _ = out.borrow_mut().send_text(renew::DRAINING);
        }
    }
    let start = std::time::Instant::now();
    let all_drained = || ctx.links.borrow().iter().all(Registered::done);
    while (ctx.in_flight.get() > 0 || !all_drained()) && start.elapsed() < ctx.opts.stop_timeout {
        if got.load(Ordering::SeqCst) != 0 {
            tracing::warn!("second signal while stopping: exiting now");
            std::process::exit(1);
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if !all_drained() {
        ctx.refusing.set(true);
        tracing::warn!("a router did not answer drained within the stop timeout: what it sends now is refused 503");
    }
    let links: Vec<_> = ctx
        .links
        .borrow()
        .iter()
        .filter_map(|l| l.out.upgrade())
        .collect();
    let left = ctx.in_flight.get();
    if left > 0 {
        tracing::warn!(
            left,
            "handlers still running at the stop timeout: their requests fail"
        );
    }
    for out in &links {
        out.borrow_mut().close(1000);
    }
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        for out in &links {
            ws::conn::written(out).await;
        }
        Ok(())
    })
    .await;
    tracing::info!("stopped");
    std::process::exit(0);
}

/// Re-reads the token file every second; a changed, non-empty token becomes the current one
/// (links send it as a `renew`, new links present it).
async fn watch_token_file<H>(ctx: Rc<Ctx<H>>, path: std::path::PathBuf) {
    loop {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() && t.trim() != ctx.token.borrow().as_str() => {
                tracing::info!(file = %path.display(), "new service token");
                *ctx.token.borrow_mut() = t.trim().to_string();
                ctx.token_generation.set(ctx.token_generation.get() + 1);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(file = %path.display(), "cannot read the token file: {e}"),
        }
    }
}

/// Sends the current token as a `renew` on `out` each time it changes, one outstanding at a
/// time (`pacer`, which the link's reader moves on each answer). A refused one (`refused`, set
/// by the reader) is sent again [`renew::REFUSED_RETRY`] later, until one is accepted: a token
/// of a key version the router has not loaded yet (a rotation done out of order) gets through
/// once it reloads, before the old version's grace ends.
async fn renew_on_change<H>(
    ctx: Rc<Ctx<H>>,
    out: Rc<RefCell<WsOut>>,
    pacer: Rc<std::cell::Cell<RenewPacer>>,
    refused: Rc<std::cell::Cell<bool>>,
) {
    let mut seen = ctx.token_generation.get();
    let mut retry_at: Option<std::time::Instant> = None;
    loop {
        glommio::timer::sleep(renew::SENDER_POLL).await;
        if out.borrow().is_closing() {
            return;
        }
        let now = std::time::Instant::now();
        if refused.replace(false) {
            retry_at = Some(now + renew::REFUSED_RETRY);
        }
        let retry = retry_at.is_some_and(|t| now >= t);
        if (ctx.token_generation.get() != seen || retry) && pacer.get().may_send(now) {
            retry_at = None;
            seen = ctx.token_generation.get();
            let _ = out
                .borrow_mut()
                .send_text(&renew::renew(ctx.token.borrow().as_str()));
            let mut p = pacer.get();
            p.sent(now);
            pacer.set(p);
        }
    }
}

/// Links to `addr` again and again until the task stops. `old`: this loop replaces the link of
/// a draining router (`router_draining`); its dials follow [`link::next_redial`].
async fn link_loop<H, F>(ctx: Rc<Ctx<H>>, addr: String, mut old: Option<link::OldLink>)
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Outcome> + 'static,
{
    // The last backoff's base; None after a link that closed normally.
    let mut prev = None;
    // Since when this router refuses the token at the upgrade, try after try.
    let mut refused_since: Option<std::time::Instant> = None;
    // Set when the router says it drains (`router_draining`): a new loop links the address
    // again at once, and this one ends with its link.
    let handed_over = std::cell::Cell::new(false);
    // A stopping task opens no new link.
    while !ctx.stopping.get() {
        let res = link_once(&ctx, &addr, &handed_over).await;
        if handed_over.get() {
            tracing::info!(%addr, "link of a draining router ended: {res:?}");
            return;
        }
        let failure = match res {
            Ok(()) => {
                tracing::info!(%addr, "link closed; reconnecting");
                prev = None;
                refused_since = None;
                None
            }
            Err(e) => {
                let m = e.to_string();
                if m.contains("refused with 401") || m.contains("refused with 403") {
                    let since = *refused_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= ctx.opts.refused_exit_after {
                        tracing::error!(%addr, "service token refused for good: {m}");
                        eprintln!(
                            "fedbus task: service token refused by {addr} for {:?}: {m}",
                            ctx.opts.refused_exit_after
                        );
                        std::process::exit(1);
                    }
                }
                Some(m)
            }
        };
        // Jittered, so a restarted router is not hit by every task at once.
        let (b, old_open) = link::next_redial(&mut prev, &mut old, random_u64());
        match failure {
            // Expected until the draining router's replacement listens.
            Some(m) if old_open => {
                tracing::debug!(%addr, "replacement of a draining router's link not up: {m}; dialing again in {:?}", b.delay)
            }
            Some(m) => tracing::warn!(%addr, "link failed: {m}; retrying in {:?}", b.delay),
            None => {}
        }
        glommio::timer::sleep(b.delay).await;
    }
}

async fn link_once<H, F>(
    ctx: &Rc<Ctx<H>>,
    addr: &str,
    handed_over: &std::cell::Cell<bool>,
) -> anyhow::Result<()>
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Outcome> + 'static,
{
    let token = ctx.token.borrow().clone();
    if let Some(path) = addr.strip_prefix(fedbus_proto::hello::UNIX_PREFIX) {
        // A unix socket is local: never TLS.
        let (s, leftover) = ws::client::connect_unix(path, "/link", Some(&token)).await?;
        return run_link(ctx, addr, s, leftover, handed_over).await;
    }
    match &ctx.opts.tls {
        Some(config) => {
            let dial = ws::TlsDial {
                config: config.clone(),
                name: fedbus_router::tls::peer::server_name(addr)?,
            };
            let (s, leftover) = ws::connect_tls(addr, "/link", Some(&token), &dial).await?;
            run_link(ctx, addr, s, leftover, handed_over).await
        }
        None => {
            let (s, leftover) = ws::connect(addr, "/link", Some(&token)).await?;
            run_link(ctx, addr, s, leftover, handed_over).await
        }
    }
}

/// Serves one connected link, plain or TLS, until it ends.
async fn run_link<H, F, S: ws::Stream>(
    ctx: &Rc<Ctx<H>>,
    addr: &str,
    s: S,
    leftover: bytes::BytesMut,
    handed_over: &std::cell::Cell<bool>,
) -> anyhow::Result<()>
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Outcome> + 'static,
{
    let ws::WsConn {
        mut reader,
        out,
        writer,
    } = ws::start(
        s,
        leftover,
        Side::Client,
        fedbus_proto::hello::MAX_HELLO_BYTES,
        &fedbus_router::config::Limits {
            max_link_outbox_bytes: 256 * 1024 * 1024,
            ..Default::default()
        },
    );
    let pacer = Rc::new(std::cell::Cell::new(RenewPacer::default()));
    let refused = Rc::new(std::cell::Cell::new(false));
    let renewer = glommio::spawn_local(renew_on_change(
        ctx.clone(),
        out.clone(),
        pacer.clone(),
        refused.clone(),
    ));
    let res = serve_link(ctx, addr, &mut reader, &out, &pacer, &refused, handed_over).await;
    drop(renewer.cancel());
    // A hello over its bound (or another broken frame) is answered with its close code (1009,
    // 1002...), not a normal close.
    let code = res
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<ws::WsError>())
        .and_then(ws::WsError::close_code)
        .unwrap_or(1000);
    out.borrow_mut().close(code);
    let _ = writer.await;
    res
}

async fn serve_link<H, F, R>(
    ctx: &Rc<Ctx<H>>,
    addr: &str,
    reader: &mut WsReader<R>,
    out: &Rc<RefCell<WsOut>>,
    pacer: &std::cell::Cell<RenewPacer>,
    refused: &std::cell::Cell<bool>,
    handed_over: &std::cell::Cell<bool>,
) -> anyhow::Result<()>
where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Outcome> + 'static,
    R: futures_lite::AsyncRead + Unpin,
{
    // The hello is read under its own small bound; request frames may be larger.
    let hello: Hello = match reader.next().await? {
        Message::Text(t) => serde_json::from_slice(&t)?,
        other => anyhow::bail!("expected hello, got {other:?}"),
    };
    reader.set_max_message(ctx.opts.max_message);
    // Open links to the router's other shards, once per (router, shard): the address we
    // dialled may be spelled differently from the hello's (a DNS name, `localhost`).
    ctx.started
        .borrow_mut()
        .insert(format!("{}#{}", hello.router, hello.shard));
    // Reached over a unix socket: the other shards are linked the same way.
    let others = hello.shard_addrs(addr.starts_with(fedbus_proto::hello::UNIX_PREFIX));
    for (k, a) in others.iter().enumerate() {
        if k != hello.shard
            && ctx
                .started
                .borrow_mut()
                .insert(format!("{}#{k}", hello.router))
        {
            glommio::spawn_local(link_loop(ctx.clone(), a.clone(), None)).detach();
        }
    }
    let reg = Register {
        kind: "register".into(),
        task: ctx.opts.instance,
        app: ctx.opts.app.clone(),
        role: ctx.opts.role.clone(),
        partitions: ctx.opts.partitions.clone(),
    };
    if ctx.stopping.get() {
        // The signal came while this link was opening: it registers nothing (a registration
        // after the stop's wait would be closed with what the router routed to it).
        out.borrow_mut().close(1000);
        return Ok(());
    }
    let _ = out.borrow_mut().send_text(&serde_json::to_string(&reg)?);
    tracing::info!(%addr, router = %hello.router, shard = hello.shard, shards = hello.shards, "link up");
    let drained = Rc::new(std::cell::Cell::new(false));
    // The loop that replaced this link of a draining router learns of its end from this.
    let mut _handover: Option<link::Handover> = None;
    {
        let mut links = ctx.links.borrow_mut();
        links.retain(|l| l.out.strong_count() > 0);
        links.push(Registered {
            out: Rc::downgrade(out),
            drained: drained.clone(),
        });
    }
    let shard_line: Option<Rc<[u8]>> = ctx.opts.report_link_shard.then(|| {
        format!("echo-link-shard: {}", hello.shard)
            .into_bytes()
            .into()
    });
    loop {
        match reader.next().await? {
            Message::Binary(b) => {
                let f = Frame::decode(b)?;
                if f.header.kind == Kind::SecretPush {
                    store_secret(&f);
                    continue;
                }
                if f.header.kind != Kind::Request {
                    continue;
                }
                let h = f.header;
                // A request the router sent before it read our `draining` is served as any.
                if drained.get() || ctx.refusing.get() {
                    send_outcome(out, &h, stopping_answer(), shard_line.as_deref());
                    continue;
                }
                let fut = (ctx.handler)(Request { frame: f });
                let mut fut = Box::pin(fut);
                // Most handlers answer at once: skip a task spawn for those.
                match futures_util::FutureExt::now_or_never(&mut fut) {
                    Some(o) => send_outcome(out, &h, o, shard_line.as_deref()),
                    None => {
                        let (out, line) = (out.clone(), shard_line.clone());
                        let in_flight = ctx.in_flight.clone();
                        in_flight.set(in_flight.get() + 1);
                        glommio::spawn_local(async move {
                            let o = fut.await;
                            send_outcome(&out, &h, o, line.as_deref());
                            in_flight.set(in_flight.get() - 1);
                        })
                        .detach();
                    }
                }
            }
            Message::Text(t) => {
                if renew::is_drained(&t) {
                    drained.set(true);
                } else if renew::is_router_draining(&t) {
                    // The router's task listener is closed: a dial to this address reaches
                    // the router that took it over, or none yet (retried with backoff). This
                    // link serves on until the router closes it; the new loop holds the
                    // shard from now on.
                    if !handed_over.replace(true) && !ctx.stopping.get() {
                        tracing::info!(%addr, router = %hello.router, shard = hello.shard, "router draining: linking its address again");
                        let (handover, old) = link::handover();
                        glommio::spawn_local(link_loop(ctx.clone(), addr.to_string(), Some(old)))
                            .detach();
                        _handover = Some(handover);
                    }
                } else if let Some(answer) = renew::renew_answer(&t) {
                    let mut p = pacer.get();
                    p.answered(std::time::Instant::now());
                    pacer.set(p);
                    if let renew::RenewAnswer::Refused { error, message } = answer {
                        tracing::warn!(%addr, %error, %message, "router refused the renewed token; sent again in 5 s, the link lives until the current one expires");
                        refused.set(true);
                    }
                } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t) {
                    if v.get("type").and_then(|t| t.as_str()) == Some("registered") {
                        tracing::debug!(%addr, "registered");
                    }
                }
            }
            Message::Ping(p) => out.borrow_mut().send_control(ws::frame::opcode::PONG, &p),
            Message::Pong(_) => {}
            Message::Close(c) => anyhow::bail!("router closed the link ({c:?})"),
        }
    }
}
