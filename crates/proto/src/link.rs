//! The task side of a link, as a state machine: no I/O, no runtime, no clock of its own.
//!
//! One [`Link`] follows one websocket connection from a task to one router shard
//! (docs/PROTOCOL.md sections 1 to 7). The driver (the SDK, or a test) feeds it what arrives
//! ([`Link::handle`]) and the time ([`Link::handle_timeout`], due at [`Link::poll_timeout`]),
//! and acts on the [`Event`]s it queues ([`Link::poll_event`]):
//!
//! 1. awaiting the hello: the router's first text message. The link answers with the
//!    registration ([`Event::SendText`]) and names the router's other shards
//!    ([`Event::LinkShards`]): the driver opens a link to each one it has not linked yet.
//! 2. registering: until the router's `registered` ([`Event::Registered`]).
//! 3. registered: Request frames become [`Event::Request`] for the application, SecretPush
//!    frames (role `auth`) [`Event::Secret`]; unknown text messages and frame kinds are
//!    ignored.
//!
//! Answers are encoded from the request's [`RequestHead`] ([`RequestHead::response`],
//! [`RequestHead::redirect`]) in any order and from any thread. Websocket pings are answered
//! by the websocket layer; they count as life here ([`Input::Ping`]). A failed or closed link
//! is retried after [`next_backoff`].

use crate::hello::{Hello, Register};
use crate::{flags, put_meta, put_meta_u64, tag, Frame, Header, Kind, ProtoError, HEADER_LEN};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default limit for the hello after connecting, and for `registered` after the registration.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit of silence on a registered link (the router pings every 2 s by default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay (before jitter).
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest reconnect delay (before jitter).
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a task registers, the same on every link of the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Instance id, random per process, the same on every link (keep it below 2^53).
    pub task: u64,
    /// `owner/app`; must be the service token's app.
    pub app: String,
    /// Role (`main` receives every request first).
    pub role: String,
    /// Partitions served.
    pub partitions: Vec<u32>,
    /// Limit for the hello after connecting, and for `registered` after the registration.
    pub handshake_timeout: Duration,
    /// A registered link on which nothing arrives for this long is given up.
    pub idle_timeout: Duration,
}

impl LinkConfig {
    /// A configuration with the default timeouts.
    pub fn new(
        task: u64,
        app: impl Into<String>,
        role: impl Into<String>,
        partitions: Vec<u32>,
    ) -> LinkConfig {
        LinkConfig {
            task,
            app: app.into(),
            role: role.into(),
            partitions,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// The registration message (JSON text).
    pub fn register_message(&self) -> String {
        let reg = Register {
            kind: "register".into(),
            task: self.task,
            app: self.app.clone(),
            role: self.role.clone(),
            partitions: self.partitions.clone(),
        };
        // A struct of strings and integers always serializes.
        serde_json::to_string(&reg).unwrap_or_default()
    }
}

/// Where a link is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Connected; waiting for the router's hello.
    AwaitingHello,
    /// Registration sent; waiting for `registered`.
    Registering,
    /// Registered: requests flow.
    Registered,
    /// Failed or closed; the driver drops the connection and reconnects after a backoff.
    Closed,
}

/// What arrived on the websocket.
#[derive(Clone, Debug)]
pub enum Input<'a> {
    /// A text message (hello, registered, future control messages).
    Text(&'a str),
    /// A binary message: one fedbus frame.
    Binary(Bytes),
    /// A websocket ping (the websocket layer answers it); counts as life.
    Ping,
    /// A websocket pong; counts as life.
    Pong,
    /// The router's close frame.
    Close {
        /// Close code, when the frame carried one.
        code: Option<u16>,
        /// Close reason.
        reason: &'a str,
    },
}

/// One router shard to link to, as a hello announced it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShardAddr {
    /// `region/cluster/router`.
    pub router: String,
    /// Shard index.
    pub shard: usize,
    /// Internal address of the shard.
    pub addr: String,
}

impl ShardAddr {
    /// A key naming the shard whatever address reached it: `router#shard`.
    pub fn key(&self) -> String {
        shard_key(&self.router, self.shard)
    }
}

/// `router#shard`: names a router shard whatever address (name, IP) reached it.
pub fn shard_key(router: &str, shard: usize) -> String {
    format!("{router}#{shard}")
}

/// Most shards a hello may name (the most cores a Linux CPU set holds): a hello naming more is
/// refused, as each address costs the task a link loop.
pub const MAX_SHARDS: usize = 1024;

/// The role that receives SecretPush frames.
const AUTH_ROLE: &str = "auth";

/// Length in bytes of an app secret (a keyring refuses any other).
pub const APP_SECRET_LEN: usize = 32;

/// An app secret pushed to an `auth` task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretPush {
    /// `owner/app`.
    pub app: String,
    /// Secret version (the `kid` of the client JWTs it signs).
    pub version: u32,
    /// The raw secret.
    pub secret: Bytes,
}

/// What the driver must act on.
#[derive(Clone, Debug)]
pub enum Event {
    /// Send this text message to the router (the registration).
    SendText(String),
    /// The router's shards other than this link's, from the hello (empty for a router of one
    /// shard): open a link to each one not linked yet (by [`ShardAddr::key`]); a known key
    /// with a new address means the router moved that shard, and a shard of this router that
    /// the list no longer names is gone (the router restarted with fewer shards).
    LinkShards(Vec<ShardAddr>),
    /// The router accepted the registration.
    Registered {
        /// The shard that said so.
        shard: usize,
    },
    /// The newest app secret on this link (keep the newest over all links: [`SecretStore`]).
    Secret(SecretPush),
    /// A request for the application; answer it with [`RequestHead::response`] or
    /// [`RequestHead::redirect`] on this same link.
    Request(Request),
}

/// Why a link ended. Every error ends the link; the driver reconnects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The first message was not a hello.
    #[error("expected the hello, got {0}")]
    ExpectedHello(String),
    /// The hello did not parse or does not add up.
    #[error("bad hello: {0}")]
    BadHello(String),
    /// A binary message that is not a valid fedbus frame.
    #[error("bad frame: {0}")]
    Frame(#[from] ProtoError),
    /// The router closed the link.
    #[error("router closed the link (code {code:?}, reason {reason:?})")]
    Closed {
        /// Close code, if any (1008: registration refused or replaced).
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// Nothing came in time: `hello`, `registered`, or anything on a registered link (`idle`).
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// The task side of one link. See the module documentation.
#[derive(Debug)]
pub struct Link {
    cfg: Arc<LinkConfig>,
    state: State,
    hello: Option<Hello>,
    router: Arc<str>,
    /// Start of the current handshake phase.
    phase_since: Instant,
    last_rx: Instant,
    events: VecDeque<Event>,
    requests: u64,
    was_registered: bool,
    /// Dialed over a unix socket: the other shards are linked over theirs.
    over_unix: bool,
}

impl Link {
    /// A link whose websocket just opened at `now`.
    pub fn new(cfg: Arc<LinkConfig>, now: Instant) -> Link {
        Link {
            cfg,
            state: State::AwaitingHello,
            hello: None,
            router: Arc::from(""),
            phase_since: now,
            last_rx: now,
            events: VecDeque::new(),
            requests: 0,
            was_registered: false,
            over_unix: false,
        }
    }

    /// Marks a link dialed over a unix socket (`unix:<path>`): the [`Event::LinkShards`] of
    /// its hello name the other shards' unix sockets when the router lists them.
    pub fn over_unix(mut self, yes: bool) -> Link {
        self.over_unix = yes;
        self
    }

    /// The link's configuration.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// Where the link is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The router's hello, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// `router#shard` of this link, once the hello arrived.
    pub fn key(&self) -> Option<String> {
        self.hello.as_ref().map(|h| shard_key(&h.router, h.shard))
    }

    /// Whether the router ever acknowledged the registration on this link (the driver resets
    /// its backoff after such a link ends, and lets it grow after links that never got there).
    pub fn was_registered(&self) -> bool {
        self.was_registered
    }

    /// Requests handed to the application so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The next queued event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Link::handle_timeout`] must be called next (None once closed).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingHello | State::Registering => {
                Some(self.phase_since + self.cfg.handshake_timeout)
            }
            State::Registered => Some(self.last_rx + self.cfg.idle_timeout),
            State::Closed => None,
        }
    }

    /// Checks the deadlines at `now`: an error ends the link.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
        let what = match self.state {
            State::AwaitingHello => "hello",
            State::Registering => "registered",
            State::Registered => "idle",
            State::Closed => return Ok(()),
        };
        match self.poll_timeout() {
            Some(t) if now >= t => self.fail(LinkError::Timeout(what)),
            _ => Ok(()),
        }
    }

    /// Feeds one message that arrived at `now`. An error ends the link (state
    /// [`State::Closed`]); input after that is ignored.
    pub fn handle(&mut self, now: Instant, input: Input<'_>) -> Result<(), LinkError> {
        if self.state == State::Closed {
            return Ok(());
        }
        self.last_rx = now;
        let r = match input {
            Input::Text(t) => self.on_text(now, t),
            Input::Binary(b) => self.on_binary(b),
            Input::Ping | Input::Pong => Ok(()),
            Input::Close { code, reason } => Err(LinkError::Closed {
                code,
                reason: reason.to_string(),
            }),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: LinkError) -> Result<(), LinkError> {
        self.state = State::Closed;
        Err(e)
    }

    fn on_text(&mut self, now: Instant, t: &str) -> Result<(), LinkError> {
        match self.state {
            State::AwaitingHello => {
                let v: serde_json::Value = serde_json::from_str(t)
                    .map_err(|_| LinkError::ExpectedHello(format!("text {:.80?}", t)))?;
                if v.get("type").and_then(|x| x.as_str()) != Some("hello") {
                    return Err(LinkError::ExpectedHello(format!("text {:.80?}", t)));
                }
                let hello: Hello =
                    serde_json::from_value(v).map_err(|e| LinkError::BadHello(e.to_string()))?;
                let unix_mismatch = !hello.internal_unix.is_empty()
                    && hello.internal_unix.len() != hello.internal.len();
                // Each address costs the task a link loop: a router has one per shard, at most
                // one per core.
                let shards_off =
                    hello.internal.len() > MAX_SHARDS || hello.shards != hello.internal.len();
                if hello.shard >= hello.internal.len()
                    || hello.router.is_empty()
                    || unix_mismatch
                    || shards_off
                {
                    return Err(LinkError::BadHello(format!(
                        "shard {} of {} addresses ({} shards, at most {MAX_SHARDS}), router {:?}",
                        hello.shard,
                        hello.internal.len(),
                        hello.shards,
                        hello.router
                    )));
                }
                let others: Vec<ShardAddr> = hello
                    .shard_addrs(self.over_unix)
                    .into_iter()
                    .enumerate()
                    .filter(|(k, _)| *k != hello.shard)
                    .map(|(k, addr)| ShardAddr {
                        router: hello.router.clone(),
                        shard: k,
                        addr,
                    })
                    .collect();
                self.router = Arc::from(hello.router.as_str());
                self.hello = Some(hello);
                self.events
                    .push_back(Event::SendText(self.cfg.register_message()));
                // Also when empty: a router restarted with one shard no longer has the others.
                self.events.push_back(Event::LinkShards(others));
                self.state = State::Registering;
                self.phase_since = now;
                Ok(())
            }
            State::Registering => {
                let v: Option<serde_json::Value> = serde_json::from_str(t).ok();
                let registered = v
                    .as_ref()
                    .is_some_and(|v| v.get("type").and_then(|x| x.as_str()) == Some("registered"));
                if registered {
                    let shard = v
                        .as_ref()
                        .and_then(|v| v.get("shard"))
                        .and_then(|s| s.as_u64())
                        .map_or(self.shard(), |s| s as usize);
                    self.state = State::Registered;
                    self.was_registered = true;
                    self.events.push_back(Event::Registered { shard });
                }
                // Anything else: a control message this revision does not know.
                Ok(())
            }
            State::Registered | State::Closed => Ok(()),
        }
    }

    fn shard(&self) -> usize {
        self.hello.as_ref().map_or(0, |h| h.shard)
    }

    fn on_binary(&mut self, b: Bytes) -> Result<(), LinkError> {
        if self.state == State::AwaitingHello {
            return Err(LinkError::ExpectedHello(format!(
                "a binary message of {} bytes",
                b.len()
            )));
        }
        let f = Frame::decode(b)?;
        match f.header.kind {
            // The router sends requests only after `registered`, on the same ordered stream;
            // a request seen while registering is served all the same.
            Kind::Request => {
                self.requests += 1;
                let shard = self.shard();
                self.events.push_back(Event::Request(Request {
                    frame: f,
                    router: self.router.clone(),
                    shard,
                }));
            }
            // Only on a link of role `auth`, for this task's app, and a secret of the length
            // a keyring holds: anything else is no push a router makes (PROTOCOL.md section
            // 7), and a kept one would sign the app's client tokens.
            Kind::SecretPush if self.cfg.role == AUTH_ROLE => {
                let app = f.get_str(tag::APP).filter(|a| *a == self.cfg.app);
                let version = f.get_u64(tag::VERSION).and_then(|v| u32::try_from(v).ok());
                let sized = f.payload.len() == APP_SECRET_LEN;
                if let (Some(app), Some(version), true) = (app.map(str::to_string), version, sized)
                {
                    self.events.push_back(Event::Secret(SecretPush {
                        app,
                        version,
                        secret: f.payload,
                    }));
                }
            }
            // Answers are the task's to send; a router never sends them on a task link.
            Kind::Response | Kind::Redirect | Kind::SecretPush => {}
        }
        Ok(())
    }
}

/// A request as the application sees it: the frame (metadata and payload are views of the
/// received message, not copies) and the link that carried it.
#[derive(Clone, Debug)]
pub struct Request {
    frame: Frame,
    router: Arc<str>,
    shard: usize,
}

impl Request {
    /// A request from a decoded frame, carried by shard `shard` of `router` (for tests and
    /// other drivers; links make them from what they receive).
    pub fn new(frame: Frame, router: &str, shard: usize) -> Request {
        Request {
            frame,
            router: Arc::from(router),
            shard,
        }
    }

    /// What an answer needs from the request.
    pub fn head(&self) -> RequestHead {
        RequestHead {
            request_id: self.frame.header.request_id,
            partition: self.frame.header.partition,
            hops: self.frame.header.hops,
        }
    }

    /// The request id (unique among the requests pending on the link).
    pub fn id(&self) -> u64 {
        self.frame.header.request_id
    }

    /// The partition served (`wsid % partitions`, or the emergency partition).
    pub fn partition(&self) -> u32 {
        self.frame.header.partition
    }

    /// Redirects taken so far.
    pub fn hops(&self) -> u8 {
        self.frame.header.hops
    }

    /// Header flag bits ([`crate::flags`]).
    pub fn flags(&self) -> u8 {
        self.frame.header.flags
    }

    /// Served by an emergency partition on behalf of `wsid % partitions`.
    pub fn is_emergency(&self) -> bool {
        self.flags() & flags::EMERGENCY != 0
    }

    /// Came from another cluster over a peer link.
    pub fn is_forwarded(&self) -> bool {
        self.flags() & flags::FORWARDED != 0
    }

    /// `region/cluster/router` whose link carried the request.
    pub fn router(&self) -> &str {
        &self.router
    }

    /// Shard of that router whose link carried the request.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The client's body.
    pub fn payload(&self) -> &Bytes {
        &self.frame.payload
    }

    /// The client's body, owned (no copy).
    pub fn into_payload(self) -> Bytes {
        self.frame.payload
    }

    /// First metadata value with `tag` ([`crate::tag`]) as UTF-8.
    pub fn meta(&self, tag: u8) -> Option<&str> {
        self.frame.get_str(tag)
    }

    /// First metadata value with `tag` as bytes.
    pub fn meta_bytes(&self, tag: u8) -> Option<&[u8]> {
        self.frame.get(tag)
    }

    /// `owner/app`.
    pub fn app(&self) -> Option<&str> {
        self.meta(tag::APP)
    }

    /// The role the request is for.
    pub fn role(&self) -> Option<&str> {
        self.meta(tag::ROLE)
    }

    /// The `<service>` path segment.
    pub fn service(&self) -> Option<&str> {
        self.meta(tag::SERVICE)
    }

    /// The `<module>` path segment.
    pub fn module(&self) -> Option<&str> {
        self.meta(tag::MODULE)
    }

    /// The `<function>` path segment.
    pub fn function(&self) -> Option<&str> {
        self.meta(tag::FUNCTION)
    }

    /// The workspace id.
    pub fn wsid(&self) -> Option<u64> {
        self.frame.get_u64(tag::WSID)
    }

    /// `GET` or `POST`.
    pub fn method(&self) -> Option<&str> {
        self.meta(tag::METHOD)
    }

    /// `sub` of the client's verified JWT (empty for an anonymous service).
    pub fn subject(&self) -> Option<&str> {
        self.meta(tag::SUBJECT)
    }

    /// The content type the client sent.
    pub fn content_type(&self) -> Option<&str> {
        self.meta(tag::CONTENT_TYPE)
    }

    /// The whole frame.
    pub fn frame(&self) -> &Frame {
        &self.frame
    }
}

/// The part of a request an answer repeats: id, partition and hops. `Copy`, so an answer can
/// be encoded wherever the application produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// The request's id.
    pub request_id: u64,
    /// The request's partition (echoed).
    pub partition: u32,
    /// The request's hops (echoed).
    pub hops: u8,
}

impl RequestHead {
    /// A whole Response frame: metadata STATUS, one HEADER per `(name, value)` (lines over
    /// 65535 bytes are left out; the router drops lines with CR or LF, framing headers and
    /// `fedbus-*`), then CONTENT_TYPE if given; payload `body`.
    pub fn response(
        &self,
        status: u16,
        headers: &[(String, String)],
        content_type: Option<&str>,
        body: &[u8],
    ) -> Bytes {
        let meta_cap = 8
            + headers
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
            + content_type.map_or(0, |c| 3 + c.len());
        let mut b = BytesMut::with_capacity(HEADER_LEN + meta_cap + body.len());
        b.resize(HEADER_LEN, 0);
        put_meta_u64(&mut b, tag::STATUS, u64::from(status));
        for (k, v) in headers {
            let len = k.len() + 2 + v.len();
            if len > usize::from(u16::MAX) {
                continue;
            }
            b.put_u8(tag::HEADER);
            b.put_u16(len as u16);
            b.put_slice(k.as_bytes());
            b.put_slice(b": ");
            b.put_slice(v.as_bytes());
        }
        if let Some(ct) = content_type {
            put_meta(&mut b, tag::CONTENT_TYPE, ct.as_bytes());
        }
        self.finish(&mut b, Kind::Response, body);
        b.freeze()
    }

    /// A whole Redirect frame: the same request to `role`, on `partition` (None: the same).
    pub fn redirect(&self, role: &str, partition: Option<u32>) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + 16 + role.len());
        b.resize(HEADER_LEN, 0);
        put_meta(&mut b, tag::ROLE, role.as_bytes());
        if let Some(p) = partition {
            put_meta_u64(&mut b, tag::PARTITION, u64::from(p));
        }
        self.finish(&mut b, Kind::Redirect, &[]);
        b.freeze()
    }

    /// Writes the header over the first 24 bytes and appends the payload.
    fn finish(&self, b: &mut BytesMut, kind: Kind, payload: &[u8]) {
        let h = Header {
            kind,
            flags: 0,
            hops: self.hops,
            partition: self.partition,
            request_id: self.request_id,
            meta_len: (b.len() - HEADER_LEN) as u32,
            payload_len: payload.len() as u32,
        };
        b[..HEADER_LEN].copy_from_slice(&h.encode());
        b.put_slice(payload);
    }
}

/// The newest secret of each app over all links (every shard of every router pushes on its
/// own link, and the same version may come more than once).
#[derive(Clone, Debug, Default)]
pub struct SecretStore {
    apps: HashMap<String, (u32, Bytes)>,
}

impl SecretStore {
    /// An empty store.
    pub fn new() -> SecretStore {
        SecretStore::default()
    }

    /// Keeps `push` if it is newer than what the store holds for its app; true if kept.
    pub fn offer(&mut self, push: SecretPush) -> bool {
        match self.apps.get(&push.app) {
            Some((v, _)) if *v >= push.version => false,
            _ => {
                self.apps.insert(push.app, (push.version, push.secret));
                true
            }
        }
    }

    /// The newest `(version, secret)` of `app`.
    pub fn get(&self, app: &str) -> Option<(u32, &Bytes)> {
        self.apps.get(app).map(|(v, s)| (*v, s))
    }
}

/// A reconnect delay: the base (doubling, capped) and the jittered delay to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before jitter; pass it as `prev` next time.
    pub base: Duration,
    /// The delay to wait: `base` times a factor in [0.5, 1.5) taken from `random`.
    pub delay: Duration,
}

/// The next reconnect delay after a failure. `prev` is the previous [`Backoff::base`], or None
/// after a link that registered (or before any failure): the base starts at [`BACKOFF_MIN`]
/// and doubles up to [`BACKOFF_MAX`]. `random` is any random number: the jitter factor is
/// `0.5 + (random % 1000) / 1000`, so routers that restart are not hit by every task at once.
pub fn next_backoff(prev: Option<Duration>, random: u64) -> Backoff {
    next_backoff_within(prev, random, BACKOFF_MAX)
}

/// The longest base delay between two dials of a draining router's address while the task's
/// link to that router is still open (`router_draining`, PROTOCOL.md section 4): its
/// replacement may come up at any moment of a drain that can last `readiness.drain_timeout_ms`,
/// and the task should link it soon after, as it would have after the old link's close.
pub const BACKOFF_WHILE_DRAINING: Duration = Duration::from_millis(250);

/// A link of a router that said it drains (`router_draining`), as the loop that replaces it
/// sees it: open until the [`Handover`] that link holds is dropped (when it ends).
#[derive(Debug)]
pub struct OldLink(Arc<AtomicBool>);

/// Held by a link handed over to a new loop after `router_draining`: dropped when the link
/// ends, which tells the new loop ([`OldLink`]).
#[derive(Debug)]
pub struct Handover(Arc<AtomicBool>);

impl Drop for Handover {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// A handover: the old link keeps the first, the loop that replaces it gets the second.
pub fn handover() -> (Handover, OldLink) {
    let open = Arc::new(AtomicBool::new(true));
    (Handover(open.clone()), OldLink(open))
}

/// The next reconnect delay of a link loop, from the last base (`prev`, moved on; None after
/// a link that registered). A loop that replaces a draining router's link (`old`) dials at
/// most [`BACKOFF_WHILE_DRAINING`] apart while that link is open, and from [`BACKOFF_MIN`]
/// again once it closed (`old` is then cleared). Also says whether the old link is still open
/// (dials that fail meanwhile are expected).
pub fn next_redial(
    prev: &mut Option<Duration>,
    old: &mut Option<OldLink>,
    random: u64,
) -> (Backoff, bool) {
    let old_open = match old {
        Some(o) if o.0.load(Ordering::Relaxed) => true,
        Some(_) => {
            *old = None;
            *prev = None;
            false
        }
        None => false,
    };
    let max = if old_open {
        BACKOFF_WHILE_DRAINING
    } else {
        BACKOFF_MAX
    };
    let b = next_backoff_within(*prev, random, max);
    *prev = Some(b.base);
    (b, old_open)
}

/// [`next_backoff`] with its base capped at `max` (at least [`BACKOFF_MIN`]).
pub fn next_backoff_within(prev: Option<Duration>, random: u64, max: Duration) -> Backoff {
    let max = max.max(BACKOFF_MIN);
    let base = match prev {
        None => BACKOFF_MIN,
        Some(p) => p.saturating_mul(2).clamp(BACKOFF_MIN, max),
    };
    let permille = 500 + u128::from(random % 1000);
    let nanos = base.as_nanos() * permille / 1000;
    Backoff {
        base,
        delay: Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_frame;
    use crate::hello::Registered;

    const HELLO0: &str = r#"{"type":"hello","router":"local/dev/r0","cluster":"local/dev","shard":0,"shards":2,"internal":["127.0.0.1:40111","127.0.0.1:40112"]}"#;

    fn cfg() -> Arc<LinkConfig> {
        Arc::new(LinkConfig::new(
            123456789,
            "demo/echo",
            "main",
            vec![0, 1, 2],
        ))
    }

    fn events(l: &mut Link) -> Vec<Event> {
        std::iter::from_fn(|| l.poll_event()).collect()
    }

    fn registered_text(shard: usize) -> String {
        serde_json::to_string(&Registered {
            kind: "registered".into(),
            shard,
        })
        .unwrap()
    }

    /// A link through hello and registered on shard 0.
    fn registered(t0: Instant) -> Link {
        registered_as(cfg(), t0)
    }

    /// [`registered`] with `cfg`.
    fn registered_as(cfg: Arc<LinkConfig>, t0: Instant) -> Link {
        let mut l = Link::new(cfg, t0);
        l.handle(t0, Input::Text(HELLO0)).unwrap();
        l.handle(t0, Input::Text(&registered_text(0))).unwrap();
        events(&mut l);
        l
    }

    /// The worked example of docs/PROTOCOL.md section 9.
    fn example_request() -> Bytes {
        let mut m = BytesMut::new();
        put_meta(&mut m, tag::APP, b"demo/echo");
        put_meta(&mut m, tag::ROLE, b"main");
        put_meta(&mut m, tag::SERVICE, b"shop");
        put_meta(&mut m, tag::MODULE, b"cart");
        put_meta(&mut m, tag::FUNCTION, b"add");
        put_meta_u64(&mut m, tag::WSID, 42);
        put_meta(&mut m, tag::METHOD, b"POST");
        put_meta(&mut m, tag::SUBJECT, b"alice");
        put_meta(&mut m, tag::CONTENT_TYPE, b"text/plain");
        encode_frame(Kind::Request, 0, 0, 10, 1, &m, b"hello").freeze()
    }

    #[test]
    fn hello_gets_the_registration_and_the_other_shards() {
        let t0 = Instant::now();
        let mut l = Link::new(cfg(), t0);
        assert_eq!(l.state(), State::AwaitingHello);
        l.handle(t0, Input::Text(HELLO0)).unwrap();
        assert_eq!(l.state(), State::Registering);
        assert_eq!(l.key().as_deref(), Some("local/dev/r0#0"));
        let ev = events(&mut l);
        assert_eq!(ev.len(), 2, "{ev:?}");
        let Event::SendText(reg) = &ev[0] else {
            panic!("{ev:?}")
        };
        let reg: Register = serde_json::from_str(reg).unwrap();
        assert_eq!(
            reg,
            Register {
                kind: "register".into(),
                task: 123456789,
                app: "demo/echo".into(),
                role: "main".into(),
                partitions: vec![0, 1, 2],
            }
        );
        let Event::LinkShards(others) = &ev[1] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            others,
            &[ShardAddr {
                router: "local/dev/r0".into(),
                shard: 1,
                addr: "127.0.0.1:40112".into()
            }]
        );
        assert_eq!(others[0].key(), "local/dev/r0#1");

        l.handle(t0, Input::Text(&registered_text(0))).unwrap();
        assert_eq!(l.state(), State::Registered);
        assert!(l.was_registered());
        assert!(matches!(
            events(&mut l).as_slice(),
            [Event::Registered { shard: 0 }]
        ));
        // Unknown control messages are ignored.
        l.handle(t0, Input::Text(r#"{"type":"future"}"#)).unwrap();
        l.handle(t0, Input::Text("not json")).unwrap();
        assert!(events(&mut l).is_empty());
        assert_eq!(l.state(), State::Registered);
    }

    /// A link dialed over a unix socket links the other shards over theirs when the hello
    /// lists them, over TCP when it does not; any other link ignores them. A hello whose unix
    /// list does not match its TCP list is refused.
    #[test]
    fn a_unix_link_names_the_other_shards_unix_sockets() {
        const UNIX: &str = r#"{"type":"hello","router":"r","cluster":"c","shard":0,"shards":2,"internal":["a:1","a:2"],"internal_unix":["/s","/s.1"]}"#;
        const TCP_ONLY: &str = r#"{"type":"hello","router":"r","cluster":"c","shard":0,"shards":2,"internal":["a:1","a:2"]}"#;
        let other = |over_unix: bool, hello: &str| {
            let t0 = Instant::now();
            let mut l = Link::new(cfg(), t0).over_unix(over_unix);
            l.handle(t0, Input::Text(hello)).unwrap();
            events(&mut l)
                .into_iter()
                .find_map(|e| match e {
                    Event::LinkShards(o) => Some(o[0].addr.clone()),
                    _ => None,
                })
                .expect("LinkShards")
        };
        assert_eq!(other(true, UNIX), "unix:/s.1");
        assert_eq!(other(false, UNIX), "a:2");
        assert_eq!(other(true, TCP_ONLY), "a:2");
        let t0 = Instant::now();
        let mut l = Link::new(cfg(), t0).over_unix(true);
        let bad = r#"{"type":"hello","router":"r","cluster":"c","shard":0,"shards":2,"internal":["a:1","a:2"],"internal_unix":["/s"]}"#;
        assert!(matches!(
            l.handle(t0, Input::Text(bad)),
            Err(LinkError::BadHello(_))
        ));
    }

    #[test]
    fn hello_on_another_shard_names_the_rest() {
        let t0 = Instant::now();
        let mut l = Link::new(cfg(), t0);
        let hello = HELLO0.replace(r#""shard":0"#, r#""shard":1"#);
        l.handle(t0, Input::Text(&hello)).unwrap();
        let ev = events(&mut l);
        let Some(Event::LinkShards(others)) = ev.get(1) else {
            panic!("{ev:?}")
        };
        assert_eq!(others.len(), 1);
        assert_eq!(
            (others[0].shard, others[0].addr.as_str()),
            (0, "127.0.0.1:40111")
        );

        // A one-shard router: nothing else to link, and an empty list says so (a driver
        // retires the links of shards the router had before a restart).
        let mut l = Link::new(cfg(), t0);
        l.handle(
            t0,
            Input::Text(r#"{"type":"hello","router":"r","cluster":"c","shard":0,"shards":1,"internal":["a:1"]}"#),
        )
        .unwrap();
        let ev = events(&mut l);
        assert!(
            matches!(ev.as_slice(), [Event::SendText(_), Event::LinkShards(o)] if o.is_empty()),
            "{ev:?}"
        );
    }

    #[test]
    fn requests_reach_the_application_with_their_metadata() {
        let t0 = Instant::now();
        let mut l = registered(t0);
        l.handle(t0, Input::Binary(example_request())).unwrap();
        let ev = events(&mut l);
        let [Event::Request(r)] = ev.as_slice() else {
            panic!("{ev:?}")
        };
        assert_eq!(r.id(), 1);
        assert_eq!(r.partition(), 10);
        assert_eq!(r.hops(), 0);
        assert_eq!((r.router(), r.shard()), ("local/dev/r0", 0));
        assert_eq!(r.app(), Some("demo/echo"));
        assert_eq!(r.role(), Some("main"));
        assert_eq!(r.service(), Some("shop"));
        assert_eq!(r.module(), Some("cart"));
        assert_eq!(r.function(), Some("add"));
        assert_eq!(r.wsid(), Some(42));
        assert_eq!(r.method(), Some("POST"));
        assert_eq!(r.subject(), Some("alice"));
        assert_eq!(r.content_type(), Some("text/plain"));
        assert_eq!(&r.payload()[..], b"hello");
        assert!(!r.is_emergency() && !r.is_forwarded());
        assert_eq!(l.requests(), 1);

        // Many in flight; answers in any order.
        for id in 2..=4u64 {
            let f = encode_frame(Kind::Request, flags::EMERGENCY, 1, 3, id, b"", b"x");
            l.handle(t0, Input::Binary(f.freeze())).unwrap();
        }
        let ids: Vec<u64> = events(&mut l)
            .into_iter()
            .map(|e| match e {
                Event::Request(r) => {
                    assert!(r.is_emergency());
                    r.id()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [2, 3, 4]);
        // Answer kinds from a router are ignored.
        l.handle(
            t0,
            Input::Binary(encode_frame(Kind::Response, 0, 0, 0, 9, b"", b"").freeze()),
        )
        .unwrap();
        assert!(events(&mut l).is_empty());
    }

    #[test]
    fn response_matches_the_worked_example() {
        let req = Frame::decode(example_request()).unwrap();
        let head = Request::new(req, "local/dev/r0", 0).head();
        let resp = head.response(
            200,
            &[("python-task".into(), "yes".into())],
            Some("text/plain"),
            b"hello",
        );
        // docs/PROTOCOL.md section 9, example-response.
        let expected: &[u8] = &[
            0xfb, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x26,
            0, 0, 0, 5, 0x10, 0x00, 0x03, b'2', b'0', b'0', 0x11, 0x00, 0x10, b'p', b'y', b't',
            b'h', b'o', b'n', b'-', b't', b'a', b's', b'k', b':', b' ', b'y', b'e', b's', 0x09,
            0x00, 0x0a, b't', b'e', b'x', b't', b'/', b'p', b'l', b'a', b'i', b'n', b'h', b'e',
            b'l', b'l', b'o',
        ];
        assert_eq!(&resp[..], expected);
    }

    #[test]
    fn answers_encode_as_the_router_reads_them() {
        let head = RequestHead {
            request_id: 77,
            partition: 5,
            hops: 2,
        };
        let f = Frame::decode(head.response(404, &[], None, b"")).unwrap();
        assert_eq!(f.header.kind, Kind::Response);
        assert_eq!(
            (f.header.request_id, f.header.partition, f.header.hops),
            (77, 5, 2)
        );
        assert_eq!(f.get_u64(tag::STATUS), Some(404));
        assert_eq!(f.get(tag::CONTENT_TYPE), None);

        // A header line too long for one entry is left out, the others kept.
        let long = "v".repeat(70_000);
        let hs = vec![("a".to_string(), long), ("b".to_string(), "2".to_string())];
        let f = Frame::decode(head.response(200, &hs, None, b"z")).unwrap();
        let lines: Vec<&[u8]> = f
            .meta_entries()
            .filter(|(t, _)| *t == tag::HEADER)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(lines, [b"b: 2".as_slice()]);

        let f = Frame::decode(head.redirect("auth", Some(3))).unwrap();
        assert_eq!(f.header.kind, Kind::Redirect);
        assert_eq!(f.header.request_id, 77);
        assert_eq!(f.get_str(tag::ROLE), Some("auth"));
        assert_eq!(f.get_u64(tag::PARTITION), Some(3));
        assert!(f.payload.is_empty());
        let f = Frame::decode(head.redirect("auth", None)).unwrap();
        assert_eq!(f.get(tag::PARTITION), None);
    }

    #[test]
    fn secret_pushes_keep_the_newest_version() {
        let t0 = Instant::now();
        let auth = Arc::new(LinkConfig::new(1, "demo/echo", "auth", vec![0]));
        let mut l = registered_as(auth, t0);
        let secret = |c: u8| [c; APP_SECRET_LEN];
        let push = |app: &str, v: &str, secret: &[u8]| {
            let mut m = BytesMut::new();
            put_meta(&mut m, tag::APP, app.as_bytes());
            put_meta(&mut m, tag::VERSION, v.as_bytes());
            encode_frame(Kind::SecretPush, 0, 0, 0, 0, &m, secret).freeze()
        };
        let mut store = SecretStore::new();
        for (app, v, s) in [
            ("demo/echo", "2", &secret(2)[..]),
            ("demo/echo", "3", &secret(3)[..]),
            ("demo/echo", "2", &secret(9)[..]),
            // A VERSION that is not a number, another app, a secret of another length: no
            // push at all.
            ("demo/echo", "x", &secret(8)[..]),
            ("demo/other", "7", &secret(7)[..]),
            ("demo/echo", "4294967295", b"short"),
        ] {
            l.handle(t0, Input::Binary(push(app, v, s))).unwrap();
        }
        let got: Vec<bool> = events(&mut l)
            .into_iter()
            .map(|e| match e {
                Event::Secret(p) => store.offer(p),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [true, true, false]);
        let (v, s) = store.get("demo/echo").unwrap();
        assert_eq!((v, &s[..]), (3, &secret(3)[..]));
        assert!(store.get("demo/other").is_none());
        // A link of another role takes no push.
        let mut main = registered(t0);
        main.handle(t0, Input::Binary(push("demo/echo", "5", &secret(5))))
            .unwrap();
        assert!(events(&mut main).is_empty());
    }

    /// A hello naming more shards than a CPU set holds, or a `shards` count other than its
    /// addresses, is refused: each address would cost the task a link loop.
    #[test]
    fn a_hello_with_too_many_or_miscounted_shards_is_refused() {
        let t0 = Instant::now();
        let hello = |shards: usize, n: usize| {
            let internal: Vec<String> = (0..n).map(|i| format!("10.0.0.1:{}", 1000 + i)).collect();
            serde_json::json!({"type": "hello", "router": "r", "cluster": "c", "shard": 0,
                "shards": shards, "internal": internal})
            .to_string()
        };
        for (shards, n) in [(MAX_SHARDS + 1, MAX_SHARDS + 1), (3, 2), (1, 2)] {
            let mut l = Link::new(cfg(), t0);
            let e = l.handle(t0, Input::Text(&hello(shards, n)));
            assert!(
                matches!(e, Err(LinkError::BadHello(_))),
                "{shards} / {n}: {e:?}"
            );
        }
        let mut l = Link::new(cfg(), t0);
        l.handle(t0, Input::Text(&hello(MAX_SHARDS, MAX_SHARDS)))
            .expect("MAX_SHARDS shards");
    }

    #[test]
    fn protocol_errors_end_the_link() {
        let t0 = Instant::now();
        let mut l = Link::new(cfg(), t0);
        assert!(matches!(
            l.handle(t0, Input::Binary(example_request())),
            Err(LinkError::ExpectedHello(_))
        ));
        assert_eq!(l.state(), State::Closed);
        assert_eq!(l.poll_timeout(), None);
        // Closed: input is ignored.
        l.handle(t0, Input::Text(HELLO0)).unwrap();
        assert!(events(&mut l).is_empty());

        let mut l = Link::new(cfg(), t0);
        assert!(matches!(
            l.handle(t0, Input::Text(r#"{"type":"registered","shard":0}"#)),
            Err(LinkError::ExpectedHello(_))
        ));
        let mut l = Link::new(cfg(), t0);
        assert!(matches!(
            l.handle(t0, Input::Text(r#"{"type":"hello","router":"r"}"#)),
            Err(LinkError::BadHello(_))
        ));
        let mut l = Link::new(cfg(), t0);
        let bad = HELLO0.replace(r#""shard":0"#, r#""shard":2"#);
        assert!(matches!(
            l.handle(t0, Input::Text(&bad)),
            Err(LinkError::BadHello(_))
        ));

        let mut l = registered(t0);
        assert_eq!(
            l.handle(t0, Input::Binary(Bytes::from_static(b"\xfb\x01"))),
            Err(LinkError::Frame(ProtoError::Short(2)))
        );
        let mut l = registered(t0);
        assert_eq!(
            l.handle(
                t0,
                Input::Close {
                    code: Some(1008),
                    reason: "replaced"
                }
            ),
            Err(LinkError::Closed {
                code: Some(1008),
                reason: "replaced".into()
            })
        );
        assert!(l.was_registered());
    }

    #[test]
    fn deadlines() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Link::new(cfg(), t0);
        assert_eq!(l.poll_timeout(), Some(t0 + DEFAULT_HANDSHAKE_TIMEOUT));
        l.handle_timeout(t0 + 9 * s).unwrap();
        assert_eq!(
            l.handle_timeout(t0 + 10 * s),
            Err(LinkError::Timeout("hello"))
        );
        assert!(!l.was_registered());

        // Registration acknowledged too late.
        let mut l = Link::new(cfg(), t0);
        l.handle(t0 + 5 * s, Input::Text(HELLO0)).unwrap();
        assert_eq!(l.poll_timeout(), Some(t0 + 15 * s));
        assert_eq!(
            l.handle_timeout(t0 + 15 * s),
            Err(LinkError::Timeout("registered"))
        );

        // Registered: pings (or anything) keep the link alive; silence ends it.
        let mut l = registered(t0);
        for k in 1..=5u32 {
            l.handle(t0 + 2 * k * s, Input::Ping).unwrap();
            l.handle_timeout(t0 + 2 * k * s).unwrap();
        }
        assert_eq!(l.poll_timeout(), Some(t0 + 20 * s));
        l.handle_timeout(t0 + 19 * s).unwrap();
        assert_eq!(
            l.handle_timeout(t0 + 20 * s),
            Err(LinkError::Timeout("idle"))
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut prev = None;
        let mut bases = Vec::new();
        for _ in 0..10 {
            let b = next_backoff(prev, 500);
            // random % 1000 == 500: factor exactly 1.
            assert_eq!(b.delay, b.base);
            bases.push(b.base.as_millis());
            prev = Some(b.base);
        }
        assert_eq!(
            bases,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        let b = next_backoff(Some(Duration::from_millis(100)), 0);
        assert_eq!(b.base, Duration::from_millis(200));
        assert_eq!(b.delay, Duration::from_millis(100)); // factor 0.5
        let b = next_backoff(Some(Duration::from_millis(100)), 1999);
        assert_eq!(b.delay, Duration::from_micros(299_800)); // factor 1.499
        for r in [0u64, 1, 999, 1000, u64::MAX] {
            let b = next_backoff(Some(BACKOFF_MAX), r);
            assert!(b.delay >= BACKOFF_MAX / 2 && b.delay < BACKOFF_MAX * 3 / 2);
        }
        // A wild previous value is brought back into range.
        assert_eq!(next_backoff(Some(Duration::ZERO), 500).base, BACKOFF_MIN);
        assert_eq!(next_backoff(Some(Duration::MAX), 500).base, BACKOFF_MAX);
        // A loop replacing a draining router's link: capped while it is open, from the
        // least delay once it closed.
        let (guard, old) = handover();
        let (mut prev, mut old) = (Some(Duration::from_secs(2)), Some(old));
        let (b, open) = next_redial(&mut prev, &mut old, 500);
        assert_eq!((b.base, open), (BACKOFF_WHILE_DRAINING, true));
        drop(guard);
        let (b, open) = next_redial(&mut prev, &mut old, 500);
        assert_eq!((b.base, open), (BACKOFF_MIN, false));
        assert!(old.is_none());
        let b = next_backoff_within(Some(Duration::from_secs(2)), 500, BACKOFF_WHILE_DRAINING);
        assert_eq!(b.base, BACKOFF_WHILE_DRAINING);
        assert_eq!(
            next_backoff_within(None, 500, BACKOFF_WHILE_DRAINING).base,
            BACKOFF_MIN
        );
    }

    #[test]
    fn register_message_is_the_documented_json() {
        let c = LinkConfig::new(7, "demo/echo", "auth", vec![0, 15]);
        let v: serde_json::Value = serde_json::from_str(&c.register_message()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"register","task":7,"app":"demo/echo","role":"auth","partitions":[0,15]})
        );
    }
}
