//! Router configuration: TOML with `#[serde(default)]` everywhere, embedded defaults that run
//! a dev cluster with no file at all, and `validate()` that names the bad field.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The whole router configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Region of this router's cluster (seed: `<cluster>.<region>.<entry-point>`). Default `local`.
    pub region: String,
    /// Cluster of this router. Default `dev`.
    pub cluster: String,
    /// Name of this router inside its cluster, shown in responses and logs. Default `r0`.
    pub router: String,
    /// Dev mode: create a keyring with fresh keys on first run and warn that they are dev keys.
    /// Default true; set false in production so a missing keyring is an error.
    pub dev: bool,
    /// Keyring directory. Default: `$FEDBUS_HOME/keys`, else `./.fedbus/keys`.
    pub keyring: Option<PathBuf>,
    /// `[listen]`: the listeners (api, its TLS twin, internal, external, admin).
    pub listen: Listen,
    /// `[limits]`: sizes, counts and timeouts.
    pub limits: Limits,
    /// `[auth]`: key grace period, keyring reloads, verify caches.
    pub auth: Auth,
    /// `[tls]`: certificates and sessions of the TLS api listener (`listen.api_tls`).
    pub tls: Tls,
    /// `[routing]`: Redirect hops and the emergency election seed.
    pub routing: Routing,
    /// `[readiness]`: when this router counts as able to serve (`/readyz`, peer routers) and
    /// how long a SIGTERM drain may take.
    pub readiness: Readiness,
    /// `[tuning]`: cores, pinning and io_uring memory.
    pub tuning: Tuning,
    /// Apps served by this cluster. Default: `demo/echo` with 16 partitions.
    pub apps: Vec<App>,
    /// Other clusters of the federation and how to reach them. Default: none.
    pub federation: Federation,
    /// The file this config was read from ([`Config::load`]); the control thread re-reads it
    /// for `[[apps]]` and `[federation]` on SIGHUP and when it changes. Not a TOML key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The federation: every cluster, its routers' external addresses and its public keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Federation {
    /// The federation entry point DNS name (seed: `heeus.cloud`); geolocation DNS in front of
    /// it picks a nearby cluster. Informational: router addresses may be written as
    /// `<cluster>.<region>.<entry_point>:<port>`.
    pub entry_point: String,
    /// Peer token this router presents to other clusters (a service token signed by our own
    /// cluster key, `fedbus token peer --router <name> --cluster <ours>`). When
    /// empty and `dev = true`, the router mints one from the keyring's private cluster key.
    pub peer_token_file: Option<PathBuf>,
    /// Every cluster (our own may be listed too; it is skipped for peer links).
    pub clusters: Vec<PeerCluster>,
}

/// One cluster of the federation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerCluster {
    /// Region of the cluster.
    pub region: String,
    /// Cluster name within its region.
    pub cluster: String,
    /// External addresses (seed: External Address) of its routers, `host:port`; DNS names
    /// are resolved at start and again on every reconnect.
    pub routers: Vec<String>,
    /// Directory holding that cluster's public `cluster.toml` (versioned public keys) that
    /// verifies its peer tokens.
    pub keys: PathBuf,
}

/// Listener addresses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Client HTTP/1.1 and client websocket (`/api/ws`). Every shard binds it with SO_REUSEPORT.
    /// Default `127.0.0.1:8800`.
    pub api: SocketAddr,
    /// Task links (seed: Internal Address). Shard k listens on port + k (port 0: any free port
    /// per shard); the router's hello tells tasks every shard's address. Default `127.0.0.1:8900`.
    pub internal: SocketAddr,
    /// Peer links from routers of other clusters (seed: External Address). Every shard binds
    /// it with SO_REUSEPORT. Used only when `[federation]` lists other clusters.
    /// Default `127.0.0.1:8950`.
    pub external: SocketAddr,
    /// Metrics and health (`/metrics`, `/healthz`, `/readyz`). Loopback by default:
    /// `127.0.0.1:8700`. Empty string in TOML is not allowed; use `admin_enabled = false`.
    pub admin: SocketAddr,
    /// Serve the admin listener. Default true.
    pub admin_enabled: bool,
    /// Most admin connections served at once (a thread each); more are closed at accept. A
    /// scrape has 2 s to send its request head and 2 s per write, so a slow client holds one
    /// slot for at most that long and cannot block the others. Default 16.
    pub admin_max_connections: usize,
    /// HTTPS and `wss://` (`/api/ws`) for clients: the api listener behind TLS, on its own
    /// port, beside the plaintext `api` (which stays for loopback and for a trusted balancer in
    /// front). Every shard binds it with SO_REUSEPORT and does its own handshakes. Needs
    /// `[[tls.certs]]`, or `dev = true` (the keyring's dev certificate). Default: none; the
    /// embedded defaults of `fedbus run` without `--config` use `127.0.0.1:8443`.
    pub api_tls: Option<SocketAddr>,
    /// Task links over TLS: the internal listeners accept only TLS, with the certificates of
    /// `[[tls.certs]]` (the api listener's, reloaded the same way), or the keyring's dev
    /// certificate with `dev = true`. Tasks dial with a CA file (`fedbus task --tls-ca`, the
    /// SDK's `TaskOptions::tls_ca`). Internal networks are often trusted: off by default.
    pub internal_tls: bool,
    /// Task links over a unix socket as well, for tasks on the router's own host: shard 0
    /// listens on this path, shard k on `<path>.<k>`, and the hello lists them beside the TCP
    /// addresses (`internal_unix`). The same protocol and service tokens as the TCP listener,
    /// never TLS. A socket file left by a router that is gone is replaced; one a running
    /// router listens on fails the start (or, with `takeover`, is replaced atomically).
    /// Default: none.
    pub internal_unix: Option<std::path::PathBuf>,
    /// Host (name or address) that tasks should dial for the internal listeners, as told in
    /// the hello. Default: the bound address; set it when `internal` binds `0.0.0.0`.
    pub advertise_host: Option<String>,
    /// Bind every listener (api, TLS api, internal, external, admin) beside a router already
    /// running on the same addresses, for a zero-downtime upgrade of one router: start the new
    /// one with this (`fedbus run --takeover`), wait for its ready line, then SIGTERM the old
    /// one, which closes its listeners and drains (docs/FEDERATION.md, "Takeover"). Every
    /// listener is bound with SO_REUSEPORT so that this works; without `takeover` a router
    /// first probes each address without SO_REUSEPORT and fails to start when it is taken.
    /// Default false.
    pub takeover: bool,
}

/// Limits that bound memory and time per connection. Every one has a safe default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most bytes of a request head (request line + headers); more is 431. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Most bytes of a request body; more is 413. Default 8 MiB. Each in-flight body is held
    /// in memory once (it is not copied on its way to the task).
    pub max_body_bytes: usize,
    /// Time to complete a websocket handshake or to send a first request head. Default 5000 ms.
    pub handshake_timeout_ms: u64,
    /// A client connection with nothing in flight is closed after this. Default 60000 ms.
    pub idle_timeout_ms: u64,
    /// Time a task has to answer before the client gets 504. Default 10000 ms.
    pub request_timeout_ms: u64,
    /// Most client connections per shard. At the limit a new connection evicts the one that
    /// has waited the longest for a request to come whole: an HTTP keep-alive connection idle
    /// (`fedbus_idle_evicted_total`), a new connection still sending its first head, a served
    /// one's next head or a TLS handshake (`fedbus_unfinished_evicted_total`); with none
    /// waiting it is closed at accept (`fedbus_connections_refused_total`). Default 10000.
    pub max_connections_per_shard: usize,
    /// Most connections per shard on the internal listener (task links, and connections that
    /// have not finished their handshake) and, separately, on the external listener (peer
    /// links). At the limit a new connection evicts the oldest one that has not shown a token
    /// yet; with none it is closed at accept (`fedbus_connections_refused_total`). Default
    /// 1024.
    pub max_link_connections_per_shard: usize,
    /// Most roles one app's tasks may serve at once on this router, `main` included: a task
    /// link that registers another role while the app has this many is closed 1008
    /// `too_many_roles`. Each role costs every routing table a slot per partition. Default 64.
    pub max_roles_per_app: usize,
    /// Most requests pending on one task link; more get 503. Default 4096.
    pub max_pending_per_link: usize,
    /// Most bytes queued for writing on one link before new requests get 503. Default 64 MiB.
    pub max_link_outbox_bytes: usize,
    /// Most requests in flight on one client connection (pipelined HTTP or websocket).
    /// Default 256.
    pub max_inflight_per_connection: usize,
    /// Interval of websocket pings on task links; a link silent for 3 intervals is dropped.
    /// Default 2000 ms.
    pub ping_interval_ms: u64,
    /// A client `/api/ws` session quiet (nothing read from it) for this long with nothing in
    /// flight gets a websocket ping; one that stays quiet until `idle_timeout_ms` is closed
    /// (1001, `fedbus_client_ping_timeouts_total`). A browser answers pings by itself (its
    /// scripts cannot send one), so an open tab's idle session stays open and a vanished one
    /// still closes. 0 (the default): no pings, a session quiet for `idle_timeout_ms` is
    /// closed. Must be below `idle_timeout_ms`.
    pub client_ping_interval_ms: u64,
    /// Outlier ejection: a task link on which this many requests in a row timed out
    /// (`request_timeout_ms`, no answer in between) leaves routing while it stays open, so its
    /// partitions go to the emergency partition; its next answer (a late one counts) brings it
    /// back. 0: never. Default 5.
    pub task_eject_after_timeouts: u32,
    /// Outlier ejection of peer routers: a peer link on which this many requests in a row
    /// timed out (no answer in between) is ranked below every other router of its cluster,
    /// tried only when none of them takes the request; its next answer (a late one counts)
    /// brings it back. 0: never. Default 5.
    pub peer_eject_after_timeouts: u32,
    /// Outlier ejection: a task link that has sent nothing (no pong, no frame) this long after
    /// a ping leaves routing until it is heard again. Detection takes at most
    /// `ping_interval_ms` + this; the link itself closes after 3 silent ping intervals, so a
    /// value of 2 intervals or more never fires before that. 0: never. Default 1000 ms.
    pub task_pong_timeout_ms: u64,
    /// Slowest pace of a request body: once its head is complete, with R bytes of it received
    /// the next bytes are due `handshake_timeout_ms` + R / this many seconds after the head (or
    /// after the `100 Continue` it waited for), or the request gets 408 and the connection
    /// closes; the same for an `/api/ws` or peer message arriving in pieces (1008). Default
    /// 1024 bytes per second.
    pub min_body_bytes_per_sec: usize,
    /// Most bytes of a request body for an anonymous service (no token: anyone can send it);
    /// more is 413, refused from the head before the body is read. 0: anonymous requests
    /// carry no body. Default 64 KiB.
    pub max_anonymous_body_bytes: usize,
    /// Router-wide budget for client request bodies being received or in flight (HTTP and
    /// `/api/ws`) and for answers queued to client connections, shared evenly by the shards. A
    /// request body that would go over it gets 503 with `Retry-After`
    /// (`fedbus_overload_refused_total`); an answer already made is queued whatever is left
    /// (its request ran), within its connection's share (`max_connection_outbox_bytes`).
    /// Default 512 MiB.
    pub body_budget_bytes: usize,
    /// One client connection's share of that budget: its request bodies being received or in
    /// flight. Over it, 503 with `Retry-After` as well. Default 16 MiB.
    pub max_connection_body_bytes: usize,
    /// One client connection's share of the same budget for its answers queued to be written
    /// (an `/api/ws` session's outbox; an HTTP connection's answers that are ready, in its
    /// in-flight slots or being written). A client whose unread answers go over it is closed
    /// (websocket: 1013; `fedbus_slow_reader_closed_total`). Default 16 MiB.
    pub max_connection_outbox_bytes: usize,
    /// Slowest pace at which a client must take its answers (HTTP and `/api/ws`): a write of
    /// N bytes the socket does not take at once must be done within `handshake_timeout_ms` +
    /// max(N, what the socket still holds to send) / this many seconds, or the connection closes
    /// (`fedbus_slow_reader_closed_total`). Default 1024 bytes per second.
    pub min_answer_bytes_per_sec: usize,
    /// Most websocket control frames (ping, pong) one connection may send per second; more
    /// closes it with 1008 (`fedbus_abusive_closed_total`). Default 100.
    pub max_control_frames_per_sec: u32,
    /// Most text messages (statuses, renew answers) a router we dialed may send on its link
    /// per second, counted over 10 s; more close the link with 1008
    /// (`fedbus_abusive_closed_total`). A router sends its status at most once per 20 ms, so
    /// at least 100 (twice that). Default 200.
    pub max_peer_status_per_sec: u32,
    /// Most control frames (pongs, pings) queued on one connection's outbox; more are dropped
    /// (RFC 6455 lets a pong answer only the latest ping). Default 16.
    pub max_queued_control_frames: usize,
}

/// Token checks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// How long a replaced key version still verifies, counted from its successor's creation.
    /// Default 86400 s (one day).
    pub grace_secs: u64,
    /// How often the control thread looks at the keyring files for changes (SIGHUP also
    /// reloads). Default 1000 ms.
    pub reload_poll_ms: u64,
    /// How old a new app secret version must be before the router pushes it to the app's
    /// Auth Service to sign with: the time every router of the cluster needs to load a new
    /// keyring, so that no router sees a token signed by a version it does not know yet.
    /// Must be below `grace_secs`. Default 0 (pushed at once: one router, or a keyring
    /// loaded by every router at the same moment).
    pub secret_publish_delay_secs: u64,
    /// Client tokens whose verification a peer link remembers (the requests of many clients
    /// of the other cluster cross one link); each entry holds one token, ~300 bytes. An HTTP
    /// connection or websocket session remembers its one token. Default 64.
    pub verify_cache_per_peer_link: usize,
}

/// TLS of the api listener (`listen.api_tls`). See docs/TUNING.md, "TLS".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// Certificates, each a PEM chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or
    /// SEC1). A client's SNI name picks the first certificate valid for it; the first one is
    /// the default (no SNI, or a name none covers). The control thread reloads them when a
    /// file's mtime changes (checked every `auth.reload_poll_ms`) and on SIGHUP; open
    /// connections are not touched. Empty with `dev = true`: the keyring's dev certificate
    /// (`<keyring>/tls/router.pem`, made on first run). Default empty.
    pub certs: Vec<CertFiles>,
    /// TLS sessions the router remembers for resumption by session id (TLS 1.2) and for
    /// TLS 1.3 resumption when `tickets` is off; shared by all shards, a few hundred bytes
    /// each. 0 turns the cache off. Default 4096.
    pub session_cache: usize,
    /// Stateless session tickets (TLS 1.3 and 1.2): a returning client skips the certificate
    /// and key exchange work. The ticket keys live in this process only (rotated every 6 h),
    /// so a ticket resumes only on the router that issued it. Default true.
    pub tickets: bool,
    /// `[tls.peer]`: mutual TLS on peer links (the external listener and this router's
    /// dialers). Default: none (peer links in plaintext, the peer token alone).
    pub peer: Option<PeerTls>,
}

/// Mutual TLS between the routers of a federation: every router holds a certificate issued
/// by the federation's CA (`fedbus keys ca`, `fedbus keys cert --ca`) for the host of its
/// external address. The dialer checks the router it reached against the CA and that host;
/// the external listener requires a client certificate from the CA, and one that names a
/// router of the cluster whose peer token comes with it. See docs/TUNING.md, "TLS".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerTls {
    /// The federation CA certificate(s), PEM: the only issuer trusted on peer links. Read at
    /// start.
    pub ca: PathBuf,
    /// This router's certificate chain (leaf first), PEM; presented on both sides of a link.
    /// Reloaded like `[[tls.certs]]`.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// Refuse peer links that do not speak TLS. `false` (a rollout step) also serves
    /// plaintext links on the external listener; this router still dials with TLS.
    /// Default true.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// One certificate and its key, PEM files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf.
    pub key: PathBuf,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certs: Vec::new(),
            session_cache: 4096,
            tickets: true,
            peer: None,
        }
    }
}

/// Seed routing rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Routing {
    /// Most Redirect hops per request; the next one answers 508. At most 4 (seed). Default 4.
    pub max_hops: u8,
    /// Seed of the emergency partition election. Every router of a cluster must use the same
    /// value; change it to reshuffle elections. Default 0.
    pub election_seed: u64,
}

/// Readiness and drain. See docs/TUNING.md, "Readiness and drain".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Readiness {
    /// Task coverage this router needs to be ready. Default `all`.
    pub coverage: Coverage,
    /// Also require a live peer link to every other cluster of the federation on every shard
    /// for `/readyz`. Peer routers look only at coverage and drain. Default true.
    pub peers: bool,
    /// SIGTERM or SIGINT: the most time the router takes to finish in-flight work (requests
    /// pending on tasks, peer routers moving their traffic away) before it exits anyway.
    /// Default 30000.
    pub drain_timeout_ms: u64,
    /// While draining, a client keep-alive connection that has waited this long for its next
    /// request is closed; a busy one reads no further request and gets `Connection: close` on
    /// the answer that leaves nothing in flight, and a
    /// `/api/ws` session is closed with 1001 once its answers are out. Closing an idle
    /// connection races a request the client may be sending on it (RFC 9112 9.3.1 lets
    /// clients retry then), so only connections idle this long are closed. Also the other
    /// side: a link this router dialed to a draining peer that is its cluster's only way in
    /// is closed once it carried nothing this long (`peer::close_when_replaced`). Default 1000.
    pub drain_idle_close_ms: u64,
    /// How long a link this router dialed to a draining peer router is kept while that router
    /// is still its cluster's only ready way in (its sibling restarting, say): requests keep
    /// going to it, and it serves them, for at most this long; then the link closes once
    /// nothing is pending on it (`peer::close_when_replaced`). Bounds how long such a peer's
    /// drain waits for this router, as for a takeover of a router with no ready sibling. 0:
    /// close as soon as nothing is pending. Must be below `drain_timeout_ms` when
    /// `[federation]` lists clusters. Default 5000.
    pub drain_peer_hold_ms: u64,
    /// A router started with `listen.takeover` accepts clients only once its links to every
    /// peer router and sibling are up with their statuses, or after this long (clients wait in
    /// the listen queue meanwhile). Default 5000.
    pub takeover_wait_ms: u64,
    /// A router started with `listen.takeover`: for this long after it starts accepting
    /// clients, a request for a partition of its own cluster that has no live task waits for
    /// one to link (within the request's own deadline) instead of getting 503 `no_live_task`
    /// at once. The tasks of the router it replaces link to it once that router drains (it
    /// tells them `router_draining`), so the requests it takes before then are served, not
    /// refused. A drain of this router ends the hold (its task listeners are closed). 0: off.
    /// Default 5000.
    pub takeover_task_wait_ms: u64,
    /// A shard whose executor ends (a panic) is not restarted in place. True: the router then
    /// drains the shards that run (as on SIGTERM) and exits with status 70, so that its
    /// supervisor starts a whole one. False: it runs on without that shard, not ready
    /// (`/readyz` 503), until an operator restarts it. Default true.
    pub exit_on_dead_shard: bool,
    /// The control thread (reloads, task registrations into the routing table) is seen
    /// stalled when one pass of its loop has not finished for this long (it passes at least
    /// every second): `/readyz` answers 503 `control thread stalled` until it passes again.
    /// Default 10000.
    pub control_stall_ms: u64,
}

/// Which live tasks make a router ready.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Coverage {
    /// Every partition of every app's `main` role has a live task.
    All,
    /// Every app has at least one live partition in `main` (its emergency partition serves
    /// the others).
    Any,
    /// Tasks are not looked at.
    None,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            coverage: Coverage::All,
            peers: true,
            drain_timeout_ms: 30_000,
            drain_idle_close_ms: 1000,
            drain_peer_hold_ms: 5000,
            takeover_wait_ms: 5000,
            takeover_task_wait_ms: 5000,
            exit_on_dead_shard: true,
            control_stall_ms: 10_000,
        }
    }
}

/// Cores and executor settings. See docs/TUNING.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// Cores of the shards, one shard each. Empty (default): every core of
    /// [`default_cores`] except the control core (at least one shard).
    pub shard_cores: Vec<usize>,
    /// Core of the control thread. Default: the first of [`default_cores`] (0 unless the
    /// process's affinity excludes it).
    pub control_core: usize,
    /// Busy-poll this long before an idle shard parks, trading CPU for wake-up latency
    /// (measured on a 2-core VM: 1 connection, 1 in flight, p50 154 us -> 53 us at 100 us;
    /// docs/TUNING.md). Default 0 (off).
    pub spin_before_park_us: u64,
    /// glommio io_memory per shard in bytes (file I/O buffers; sockets do not use it). Must fit
    /// `ulimit -l` unless running as root. Default 1 MiB.
    pub io_memory: usize,
    /// Pin shards to their cores. Default true; false lets the kernel place them (tests).
    pub pin: bool,
    /// A client connection with nothing in flight and nothing buffered gives its read and
    /// write buffers back after this long idle, and takes new ones when its next bytes come
    /// (as nginx frees a keep-alive connection's buffers). 0: never (a connection keeps them
    /// for its life). Default 1000 ms. See docs/TUNING.md.
    pub idle_buffer_release_ms: u64,
    /// Once at least 1000 client connections closed or gave their buffers back, a thread
    /// returns the memory the allocator keeps to the kernel (`malloc_trim`), at most once
    /// per this interval. 0: never (the resident set stays at its high-water mark). Default
    /// 10000 ms. See docs/TUNING.md.
    pub memory_trim_ms: u64,
}

/// One app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// `owner/app`.
    pub name: String,
    /// Number of partitions; `partition = wsid % partitions`.
    pub partitions: u32,
    /// Fixed emergency partition; when absent the control thread elects one.
    #[serde(default)]
    pub emergency_partition: Option<u32>,
    /// Services reachable without a client JWT: the app's Auth Service must be, since a client
    /// asks it for its first token. Default `["auth"]`.
    #[serde(default = "default_anonymous_services")]
    pub anonymous_services: Vec<String>,
    /// Which web origins may call the app from a browser. Absent: none (a request whose
    /// `Origin` differs from its own origin gets 403 `origin_not_allowed`).
    #[serde(default)]
    pub cors: Option<Cors>,
}

/// An app's CORS policy, applied by the router that serves the app (on every ingress; the
/// router answers preflights itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Exact origins (`https://app.example`, `http://127.0.0.1:3000`), or `"*"` for any
    /// origin (refused with `allow_credentials`).
    pub allowed_origins: Vec<String>,
    /// Request headers a page may send (`Access-Control-Allow-Headers`). Default
    /// `["authorization", "content-type"]`.
    #[serde(default = "default_cors_headers")]
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer (`Access-Control-Max-Age`). Default 600.
    #[serde(default = "default_cors_max_age")]
    pub max_age_secs: u32,
    /// Answers carry `Access-Control-Allow-Credentials: true`, for pages that send cookies
    /// to a gateway in front of the router. fedbus itself never reads cookies (tokens travel in
    /// `Authorization` or `access_token`). Default false.
    #[serde(default)]
    pub allow_credentials: bool,
}

fn default_cors_headers() -> Vec<String> {
    vec!["authorization".into(), "content-type".into()]
}

fn default_cors_max_age() -> u32 {
    600
}

impl Cors {
    /// Whether a page of `origin` may call the app.
    pub fn allows(&self, origin: &[u8]) -> bool {
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.as_bytes().eq_ignore_ascii_case(origin))
    }
}

fn default_anonymous_services() -> Vec<String> {
    vec!["auth".into()]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            region: "local".into(),
            cluster: "dev".into(),
            router: "r0".into(),
            dev: true,
            keyring: None,
            listen: Listen::default(),
            limits: Limits::default(),
            auth: Auth::default(),
            tls: Tls::default(),
            routing: Routing::default(),
            readiness: Readiness::default(),
            tuning: Tuning::default(),
            apps: vec![App {
                name: "demo/echo".into(),
                partitions: 16,
                emergency_partition: None,
                anonymous_services: default_anonymous_services(),
                cors: None,
            }],
            federation: Federation::default(),
            source: None,
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            api: ([127, 0, 0, 1], 8800).into(),
            internal: ([127, 0, 0, 1], 8900).into(),
            external: ([127, 0, 0, 1], 8950).into(),
            admin: ([127, 0, 0, 1], 8700).into(),
            admin_enabled: true,
            admin_max_connections: 16,
            api_tls: None,
            internal_tls: false,
            internal_unix: None,
            advertise_host: None,
            takeover: false,
        }
    }
}

/// The largest `tuning.io_memory`: glommio allocates it at once per shard and panics when it
/// cannot; fedbus does little file I/O.
pub const MAX_IO_MEMORY: usize = 1 << 30;

/// Room beside `limits.max_body_bytes` in one websocket message, for the fedbus frame's header
/// and metadata.
pub const MESSAGE_SLACK: usize = 64 * 1024;

impl Limits {
    /// Largest websocket message accepted on any link: a body plus room for the frame header
    /// and metadata.
    pub fn max_message_bytes(&self) -> usize {
        self.max_body_bytes + MESSAGE_SLACK
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 8 * 1024 * 1024,
            handshake_timeout_ms: 5000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 10_000,
            max_connections_per_shard: 10_000,
            max_link_connections_per_shard: 1024,
            max_roles_per_app: 64,
            max_pending_per_link: 4096,
            max_link_outbox_bytes: 64 * 1024 * 1024,
            max_inflight_per_connection: 256,
            ping_interval_ms: 2000,
            client_ping_interval_ms: 0,
            task_eject_after_timeouts: 5,
            peer_eject_after_timeouts: 5,
            task_pong_timeout_ms: 1000,
            max_anonymous_body_bytes: 64 * 1024,
            min_body_bytes_per_sec: 1024,
            body_budget_bytes: 512 * 1024 * 1024,
            max_connection_body_bytes: 16 * 1024 * 1024,
            max_connection_outbox_bytes: 16 * 1024 * 1024,
            min_answer_bytes_per_sec: 1024,
            max_control_frames_per_sec: 100,
            max_peer_status_per_sec: 200,
            max_queued_control_frames: 16,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            grace_secs: 86_400,
            reload_poll_ms: 1000,
            secret_publish_delay_secs: 0,
            verify_cache_per_peer_link: 64,
        }
    }
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            max_hops: 4,
            election_seed: 0,
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            shard_cores: Vec::new(),
            control_core: default_cores().first().copied().unwrap_or(0),
            spin_before_park_us: 0,
            io_memory: 1 << 20,
            idle_buffer_release_ms: 1000,
            memory_trim_ms: 10_000,
            pin: true,
        }
    }
}

/// A config that does not load or validate; names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// The config file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The file is not valid TOML for a config.
    #[error("{path}: {err}")]
    Parse {
        /// The config file.
        path: String,
        /// The TOML error.
        err: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: `{field}`: {why}")]
    Invalid {
        /// The dotted name of the field.
        field: String,
        /// What is wrong with it.
        why: String,
    },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

fn check_cors(i: usize, c: &Cors) -> Result<(), ConfigError> {
    let f = format!("apps[{i}].cors.allowed_origins");
    if c.allowed_origins.is_empty() {
        return Err(invalid(f, "at least one origin (or leave out [apps.cors])"));
    }
    for o in &c.allowed_origins {
        if o == "*" {
            if c.allow_credentials {
                return Err(invalid(
                    f,
                    "\"*\" cannot be combined with allow_credentials: list the origins",
                ));
            }
            continue;
        }
        if o == "null" && c.allow_credentials {
            // Every sandboxed iframe, `data:` page and local file sends `Origin: null`: with
            // credentials, any such page reads credentialed answers (the classic CORS
            // misconfiguration). Some deployments need it (an app loaded from file://), so
            // it is allowed, with a warning at each load.
            tracing::warn!(
                field = %f,
                "\"null\" with allow_credentials: any sandboxed iframe or data: page (they all send Origin: null) reads this app's credentialed answers"
            );
        }
        // An origin is scheme://host[:port]: no path, no trailing slash (browsers never send
        // one, so such an entry would never match).
        let rest = o
            .strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"));
        let ok = o == "null"
            || rest.is_some_and(|r| {
                !r.is_empty() && !r.contains('/') && r.bytes().all(|b| b.is_ascii_graphic())
            });
        if !ok {
            return Err(invalid(
                f,
                format!("{o:?} is not an origin (scheme://host[:port], \"null\" or \"*\")"),
            ));
        }
    }
    for h in &c.allowed_headers {
        let token = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
        if !token {
            return Err(invalid(
                format!("apps[{i}].cors.allowed_headers"),
                format!("{h:?} is not a header name"),
            ));
        }
    }
    Ok(())
}

fn check_name(field: &str, v: &str) -> Result<(), ConfigError> {
    if !crate::auth::is_name_part(v) {
        return Err(invalid(
            field,
            format!("{v:?} must be non-empty [A-Za-z0-9_-]"),
        ));
    }
    Ok(())
}

impl Config {
    /// The embedded defaults of `fedbus run` without `--config`: [`Config::default`] plus
    /// HTTPS on `127.0.0.1:8443` with the keyring's dev certificate.
    pub fn embedded() -> Config {
        let mut c = Config::default();
        c.listen.api_tls = Some(([127, 0, 0, 1], 8443).into());
        c
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: p.clone(),
            err,
        })?;
        Config::from_file_text(&text, path)
    }

    /// [`Config::load`] of `text`, already read from `path`.
    pub fn from_file_text(text: &str, path: &std::path::Path) -> Result<Config, ConfigError> {
        let mut c = Config::parse(text, &path.display().to_string())?;
        c.source = Some(path.to_path_buf());
        Ok(c)
    }

    /// Parses and validates TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            err: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks every field that can be wrong on its own or with others.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("region", &self.region)?;
        check_name("cluster", &self.cluster)?;
        check_name("router", &self.router)?;
        let l = &self.limits;
        for (f, v) in [
            ("limits.max_header_bytes", l.max_header_bytes),
            // 0 is not nginx's "no limit" here: no request could carry a body. Refused.
            ("limits.max_body_bytes", l.max_body_bytes),
            (
                "limits.max_connections_per_shard",
                l.max_connections_per_shard,
            ),
            (
                "limits.max_link_connections_per_shard",
                l.max_link_connections_per_shard,
            ),
            ("limits.max_roles_per_app", l.max_roles_per_app),
            ("limits.max_pending_per_link", l.max_pending_per_link),
            ("limits.max_link_outbox_bytes", l.max_link_outbox_bytes),
            (
                "limits.max_inflight_per_connection",
                l.max_inflight_per_connection,
            ),
            ("limits.body_budget_bytes", l.body_budget_bytes),
            ("limits.min_body_bytes_per_sec", l.min_body_bytes_per_sec),
            (
                "limits.max_connection_body_bytes",
                l.max_connection_body_bytes,
            ),
            (
                "limits.max_connection_outbox_bytes",
                l.max_connection_outbox_bytes,
            ),
            (
                "limits.min_answer_bytes_per_sec",
                l.min_answer_bytes_per_sec,
            ),
            (
                "limits.max_control_frames_per_sec",
                l.max_control_frames_per_sec as usize,
            ),
            (
                "limits.max_queued_control_frames",
                l.max_queued_control_frames,
            ),
        ] {
            if v == 0 {
                return Err(invalid(f, "must be > 0"));
            }
        }
        if l.max_header_bytes > 1 << 20 {
            return Err(invalid("limits.max_header_bytes", "at most 1 MiB"));
        }
        if l.max_body_bytes > u32::MAX as usize / 2 {
            return Err(invalid(
                "limits.max_body_bytes",
                "below 2 GiB (at most 2147483647)",
            ));
        }
        for (f, v) in [
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.request_timeout_ms", l.request_timeout_ms),
            ("limits.ping_interval_ms", l.ping_interval_ms),
            ("auth.reload_poll_ms", self.auth.reload_poll_ms),
            (
                "readiness.drain_timeout_ms",
                self.readiness.drain_timeout_ms,
            ),
            (
                "readiness.drain_idle_close_ms",
                self.readiness.drain_idle_close_ms,
            ),
            (
                "readiness.control_stall_ms",
                self.readiness.control_stall_ms,
            ),
        ] {
            if v == 0 {
                return Err(invalid(f, "must be > 0 ms"));
            }
        }
        // A router sends its status at most once per tick (`health::POLL`), and a renew
        // answer about once a second: a bound near that could close a healthy link.
        let statuses_per_sec = 2 * 1000 / crate::health::POLL.as_millis() as u32;
        if l.max_peer_status_per_sec < statuses_per_sec {
            return Err(invalid(
                "limits.max_peer_status_per_sec",
                format!(
                    "at least {statuses_per_sec}: twice what a router sends (a status every 20 ms)"
                ),
            ));
        }
        if l.client_ping_interval_ms >= l.idle_timeout_ms {
            return Err(invalid(
                "limits.client_ping_interval_ms",
                "must be below limits.idle_timeout_ms (0: no pings)",
            ));
        }
        // Each ping's pong counts against the client's control frame rate: at most half of it.
        let pongs_per_sec = 1000u64.div_ceil(l.client_ping_interval_ms.max(1));
        if l.client_ping_interval_ms != 0
            && (l.client_ping_interval_ms < 100
                || pongs_per_sec * 2 > u64::from(l.max_control_frames_per_sec))
        {
            return Err(invalid(
                "limits.client_ping_interval_ms",
                "at least 100 ms, and pongs may take at most half of limits.max_control_frames_per_sec",
            ));
        }
        // The hold only applies to peer links: a router without a federation may drain in
        // less than its default (5 s) without setting it.
        if !self.federation.clusters.is_empty()
            && self.readiness.drain_peer_hold_ms >= self.readiness.drain_timeout_ms
        {
            return Err(invalid(
                "readiness.drain_peer_hold_ms",
                "must be below readiness.drain_timeout_ms (a peer's drain would end with requests in flight)",
            ));
        }
        if self.listen.admin_max_connections == 0 {
            return Err(invalid("listen.admin_max_connections", "must be > 0"));
        }
        if self.auth.secret_publish_delay_secs > 0
            && self.auth.secret_publish_delay_secs >= self.auth.grace_secs
        {
            // The version before would retire before its successor is published: the Auth
            // Service would sign with a retired version meanwhile.
            return Err(invalid(
                "auth.secret_publish_delay_secs",
                "must be below auth.grace_secs",
            ));
        }
        if self.auth.verify_cache_per_peer_link == 0 {
            return Err(invalid("auth.verify_cache_per_peer_link", "must be > 0"));
        }
        if self.routing.max_hops > crate::proto::MAX_HOPS {
            return Err(invalid(
                "routing.max_hops",
                "the seed allows at most 4 hops",
            ));
        }
        if self.apps.is_empty() {
            return Err(invalid("apps", "at least one app"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in self.apps.iter().enumerate() {
            let f = format!("apps[{i}].name");
            let Some((owner, app)) = a.name.split_once('/') else {
                return Err(invalid(f, "must be owner/app"));
            };
            check_name(&f, owner)?;
            check_name(&f, app)?;
            if !seen.insert(&a.name) {
                return Err(invalid(f, format!("{} listed twice", a.name)));
            }
            if a.partitions == 0 || a.partitions > 1 << 20 {
                return Err(invalid(
                    format!("apps[{i}].partitions"),
                    "must be 1..=1048576",
                ));
            }
            if let Some(e) = a.emergency_partition {
                if e >= a.partitions {
                    return Err(invalid(
                        format!("apps[{i}].emergency_partition"),
                        "must be < partitions",
                    ));
                }
            }
            if let Some(c) = &a.cors {
                check_cors(i, c)?;
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, c) in self.federation.clusters.iter().enumerate() {
            check_name(&format!("federation.clusters[{i}].region"), &c.region)?;
            check_name(&format!("federation.clusters[{i}].cluster"), &c.cluster)?;
            if !ids.insert((c.region.as_str(), c.cluster.as_str())) {
                return Err(invalid(
                    format!("federation.clusters[{i}]"),
                    "cluster listed twice",
                ));
            }
            let ours = c.region == self.region && c.cluster == self.cluster;
            if c.routers.is_empty() && !ours {
                return Err(invalid(
                    format!("federation.clusters[{i}].routers"),
                    "at least one router",
                ));
            }
        }
        if self.listen.api_tls.is_some() && self.tls.certs.is_empty() && !self.dev {
            return Err(invalid(
                "tls.certs",
                "listen.api_tls needs at least one [[tls.certs]] (only dev mode makes its own)",
            ));
        }
        if self.listen.internal_tls && self.tls.certs.is_empty() && !self.dev {
            return Err(invalid(
                "tls.certs",
                "listen.internal_tls needs at least one [[tls.certs]] (only dev mode makes its own)",
            ));
        }
        if self.listen.api_tls == Some(self.listen.api) && self.listen.api.port() != 0 {
            return Err(invalid("listen.api_tls", "same address as listen.api"));
        }
        if self.listen.internal.ip().is_unspecified() && self.listen.advertise_host.is_none() {
            return Err(invalid(
                "listen.advertise_host",
                "required when listen.internal binds an unspecified address: tasks cannot dial it",
            ));
        }
        if self
            .listen
            .advertise_host
            .as_deref()
            .is_some_and(|h| h.trim().is_empty() || h.contains(char::is_whitespace))
        {
            return Err(invalid(
                "listen.advertise_host",
                "a host name or address tasks can dial (empty or with spaces: nothing to dial)",
            ));
        }
        if self.tuning.io_memory > MAX_IO_MEMORY {
            return Err(invalid(
                "tuning.io_memory",
                "at most 1 GiB per shard (a registered buffer area for file I/O; fedbus does little)",
            ));
        }
        // A core must be one this process may run on: below the CPU count where the affinity
        // is unknown.
        // With `pin = false` the cores are only counted (nothing is placed on them): below the
        // CPU count is enough.
        let t = &self.tuning;
        let allowed = if t.pin {
            placeable_cores()
        } else {
            (0..online_cores()).collect()
        };
        if let Some(why) = outside(t.control_core, &allowed) {
            return Err(invalid("tuning.control_core", why));
        }
        for c in &t.shard_cores {
            if let Some(why) = outside(*c, &allowed) {
                return Err(invalid("tuning.shard_cores", why));
            }
        }
        let mut s = t.shard_cores.clone();
        s.sort_unstable();
        s.dedup();
        if s.len() != t.shard_cores.len() {
            return Err(invalid("tuning.shard_cores", "a core is listed twice"));
        }
        Ok(())
    }

    /// The cores the shards run on, resolved from `tuning`.
    pub fn shard_cores(&self) -> Vec<usize> {
        if !self.tuning.shard_cores.is_empty() {
            return self.tuning.shard_cores.clone();
        }
        let v: Vec<usize> = default_cores()
            .into_iter()
            .filter(|c| *c != self.tuning.control_core)
            .collect();
        if v.is_empty() {
            vec![self.tuning.control_core]
        } else {
            v
        }
    }

    /// The keyring directory.
    pub fn keyring_dir(&self) -> PathBuf {
        match &self.keyring {
            Some(p) => p.clone(),
            None => default_keyring_dir(),
        }
    }

    /// `region/cluster`.
    pub fn cluster_id(&self) -> String {
        format!("{}/{}", self.region, self.cluster)
    }

    /// Clusters other than ours.
    pub fn peer_clusters(&self) -> impl Iterator<Item = &PeerCluster> {
        self.federation
            .clusters
            .iter()
            .filter(move |c| !(c.region == self.region && c.cluster == self.cluster))
    }

    /// Names of the configured apps.
    pub fn app_names(&self) -> Vec<&str> {
        self.apps.iter().map(|a| a.name.as_str()).collect()
    }
}

/// `$FEDBUS_HOME/keys`, else `./.fedbus/keys`.
pub fn default_keyring_dir() -> PathBuf {
    match std::env::var_os("FEDBUS_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join("keys"),
        _ => PathBuf::from(".fedbus/keys"),
    }
}

/// Online cores as the scheduler lets this process use them.
pub fn online_cores() -> usize {
    process_cores().1
}

/// `0-3,8` for [0, 1, 2, 3, 8] (ascending input), as `taskset -pc` and `/sys` write CPU lists.
fn cpu_list(cores: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        out.push(if j > i {
            format!("{}-{}", cores[i], cores[j])
        } else {
            cores[i].to_string()
        });
        i = j + 1;
    }
    out.join(",")
}

/// CPUs this process may run on, ascending, from `sched_getaffinity` (a container's cpuset,
/// `taskset`, systemd `CPUAffinity=`); `None` where the call fails.
///
/// Read once, at the first call (the config's load, on the main thread, before any thread is
/// pinned): the affinity is per thread, and the control thread, pinned to its one core,
/// re-validates the config on every reload. Read there, it allowed only the control core, and
/// every reload of a config listing `shard_cores` was refused.
pub fn affinity() -> Option<Vec<usize>> {
    process_cores().0.clone()
}

/// `(affinity, available_parallelism)` of the process, read once.
fn process_cores() -> &'static (Option<Vec<usize>>, usize) {
    static CORES: std::sync::OnceLock<(Option<Vec<usize>>, usize)> = std::sync::OnceLock::new();
    CORES.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (thread_affinity().filter(|v| !v.is_empty()), n)
    })
}

/// The calling thread's CPU affinity, ascending.
fn thread_affinity() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET only reads `set` for c < CPU_SETSIZE.
    Some(
        (0..bits)
            .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
            .collect(),
    )
}

/// The cores the default layout uses: the first [`online_cores`] of [`affinity`]. In a
/// container whose cpuset is 4-7 they are 4-7, not 0-3; under a CPU quota (cgroup `cpu.max`,
/// which `available_parallelism` counts) fewer than the affinity lists. `0..online_cores()`
/// where the affinity is unknown.
pub fn default_cores() -> Vec<usize> {
    let (aff, n) = process_cores();
    first_cores(aff.clone(), *n)
}

/// The first `n` of `affinity`; `0..n` where it is unknown or empty.
fn first_cores(affinity: Option<Vec<usize>>, n: usize) -> Vec<usize> {
    match affinity {
        Some(mut v) if !v.is_empty() => {
            v.truncate(n.max(1));
            v
        }
        _ => (0..n.max(1)).collect(),
    }
}

/// The cores a thread of this process may be pinned to: its CPU affinity, or `0..n` where that
/// is unknown. Unlike [`default_cores`], not cut to the CPU count.
pub fn placeable_cores() -> Vec<usize> {
    affinity().unwrap_or_else(|| (0..online_cores()).collect())
}

/// Whether a thread of this process may be pinned to `core`; the error names its affinity.
pub fn check_placeable(core: usize) -> Result<(), String> {
    outside(core, &placeable_cores()).map_or(Ok(()), Err)
}

/// Why `core` cannot be configured: it is not in `allowed` (the affinity, or `0..n`).
fn outside(core: usize, allowed: &[usize]) -> Option<String> {
    (!allowed.contains(&core)).then(|| {
        format!(
            "core {core} is not one this process may run on (its CPU affinity is {})",
            cpu_list(allowed)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a cpuset or under `taskset` that leaves core 0 out, the default layout uses the
    /// cores the process may run on, and a configured core outside them is refused by name.
    #[test]
    fn default_cores_follow_the_affinity() {
        assert_eq!(first_cores(Some(vec![4, 5, 6, 7]), 4), vec![4, 5, 6, 7]);
        // A CPU quota of 2 on a 64-core affinity: two cores.
        assert_eq!(first_cores(Some((0..64).collect()), 2), vec![0, 1]);
        assert_eq!(first_cores(None, 3), vec![0, 1, 2]);
        assert_eq!(first_cores(Some(vec![]), 2), vec![0, 1]);
        assert_eq!(
            outside(0, &[4, 5, 6, 7]).as_deref(),
            Some("core 0 is not one this process may run on (its CPU affinity is 4-7)")
        );
        assert_eq!(outside(5, &[4, 5, 6, 7]), None);
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[5]), "5");
        // This process: the defaults are inside its affinity and valid.
        let d = Config::default();
        let allowed = affinity().expect("sched_getaffinity");
        assert!(allowed.contains(&d.tuning.control_core));
        assert!(d.shard_cores().iter().all(|c| allowed.contains(c)));
        d.validate().expect("the defaults fit the affinity");
    }

    /// A publish delay at or past the grace would leave the Auth Service signing with a
    /// version routers already retired.
    #[test]
    fn secret_publish_delay_must_be_below_the_grace() {
        let mut c = Config::default();
        c.auth.grace_secs = 600;
        c.auth.secret_publish_delay_secs = 599;
        c.validate().expect("below the grace");
        c.auth.secret_publish_delay_secs = 600;
        let e = c.validate().expect_err("at the grace").to_string();
        assert!(e.contains("auth.secret_publish_delay_secs"), "{e}");
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen.api.port(), 8800);
        assert_eq!(c.listen.internal.port(), 8900);
        assert_eq!(c.apps[0].partitions, 16);
        assert!(!c.shard_cores().is_empty());
        assert_eq!(c.listen.api_tls, None);
        let e = Config::embedded();
        e.validate().unwrap();
        assert_eq!(e.listen.api_tls.map(|a| a.port()), Some(8443));
    }

    #[test]
    fn tls_listener_needs_certificates_outside_dev_mode() {
        let e =
            Config::parse("dev = false\n[listen]\napi_tls = \"127.0.0.1:0\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("tls.certs"), "{e}");
        let c = Config::parse(
            "dev = false\n[listen]\napi_tls = \"127.0.0.1:0\"\n[[tls.certs]]\ncert = \"a.pem\"\nkey = \"a.key\"\n",
            "t",
        )
        .expect("with a certificate");
        assert_eq!(c.tls.certs.len(), 1);
        assert!(c.tls.tickets);
        let e = Config::parse("dev = false\n[listen]\ninternal_tls = true\n", "t").unwrap_err();
        assert!(e.to_string().contains("internal_tls"), "{e}");
    }

    #[test]
    fn peer_tls_is_required_by_default() {
        assert_eq!(Config::default().tls.peer, None);
        let c = Config::parse(
            "[tls.peer]\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n",
            "t",
        )
        .expect("peer tls");
        let p = c.tls.peer.expect("peer");
        assert!(p.required);
        assert_eq!(p.ca, PathBuf::from("ca.pem"));
        let c = Config::parse(
            "[tls.peer]\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\nrequired = false\n",
            "t",
        )
        .expect("optional");
        assert!(!c.tls.peer.expect("peer").required);
        assert!(Config::parse("[tls.peer]\nca = \"ca.pem\"\n", "t").is_err());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("", "t").unwrap(), Config::default());
    }

    #[test]
    fn cors_policies_are_checked() {
        let app =
            |cors: &str| format!("[[apps]]\nname = \"a/b\"\npartitions = 2\n[apps.cors]\n{cors}\n");
        let c = Config::parse(&app("allowed_origins = [\"https://x.example:8443\"]"), "t")
            .expect("valid");
        let cors = c.apps[0].cors.as_ref().expect("cors");
        assert_eq!(cors.allowed_headers, ["authorization", "content-type"]);
        assert_eq!((cors.max_age_secs, cors.allow_credentials), (600, false));
        assert!(cors.allows(b"https://X.example:8443"));
        assert!(!cors.allows(b"https://x.example"));
        let any = Config::parse(&app("allowed_origins = [\"*\"]"), "t").expect("valid");
        assert!(any.apps[0].cors.as_ref().expect("cors").allows(b"null"));
        for (bad, why) in [
            ("allowed_origins = []", "at least one"),
            (
                "allowed_origins = [\"*\"]\nallow_credentials = true",
                "allow_credentials",
            ),
            (
                "allowed_origins = [\"https://x.example/\"]",
                "not an origin",
            ),
            ("allowed_origins = [\"x.example\"]", "not an origin"),
            (
                "allowed_origins = [\"*\"]\nallowed_headers = [\"a b\"]",
                "allowed_headers",
            ),
            ("allowed_origin = [\"*\"]", "allowed_origin"),
        ] {
            let e = Config::parse(&app(bad), "t").unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let e = Config::parse("[routing]\nmax_hops = 5\n", "t").unwrap_err();
        assert!(e.to_string().contains("routing.max_hops"), "{e}");
        let e = Config::parse("[[apps]]\nname = \"noslash\"\npartitions = 2\n", "t").unwrap_err();
        assert!(e.to_string().contains("apps[0].name"), "{e}");
        let e = Config::parse(
            "[[apps]]\nname = \"a/b\"\npartitions = 2\nemergency_partition = 2\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("emergency_partition"), "{e}");
        let e = Config::parse("[limits]\nmax_body_byte = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("max_body_byte"), "{e}");
        let e = Config::parse(
            "[readiness]\ndrain_timeout_ms = 3000\ndrain_peer_hold_ms = 3000\n[federation]\n[[federation.clusters]]\nregion = \"ru\"\ncluster = \"spb2\"\nrouters = [\"127.0.0.1:1\"]\nkeys = \"/k\"\n",
            "t",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("readiness.drain_peer_hold_ms"),
            "{e}"
        );
        Config::parse("[readiness]\ndrain_peer_hold_ms = 0\n", "t").unwrap();
        let e = Config::parse("[listen]\ninternal = \"0.0.0.0:8900\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("listen.advertise_host"), "{e}");
        Config::parse(
            "[listen]\ninternal = \"0.0.0.0:8900\"\nadvertise_host = \"r0.example\"\n",
            "t",
        )
        .expect("advertised");
        let off = Config::parse(
            "[limits]\ntask_pong_timeout_ms = 0\ntask_eject_after_timeouts = 0\n",
            "t",
        )
        .expect("0 is off");
        assert_eq!(off.limits.task_pong_timeout_ms, 0);
        assert_eq!(Config::default().limits.task_eject_after_timeouts, 5);
        let e = Config::parse("[tuning]\ncontrol_core = 9999\n", "t").unwrap_err();
        assert!(e.to_string().contains("tuning.control_core"), "{e}");
        // 0 is not "no limit" (nginx's client_max_body_size 0): refused, not silently 413.
        let e = Config::parse("[limits]\nmax_body_bytes = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("limits.max_body_bytes"), "{e}");
        let e = Config::parse("[limits]\nmax_body_bytes = 2147483648\n", "t").unwrap_err();
        assert!(e.to_string().contains("limits.max_body_bytes"), "{e}");
        Config::parse("[limits]\nmax_body_bytes = 2147483647\n", "t").expect("just below 2 GiB");
        Config::parse("[limits]\nmax_anonymous_body_bytes = 0\n", "t").expect("no anonymous body");
    }
}
