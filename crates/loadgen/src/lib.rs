//! The bundled load generator behind `fedbus bench`.
//!
//! Owns everything a benchmark run needs: the system under test (spawned as child processes
//! when no `--target` is given), the load engine (one pinned glommio executor per load core,
//! batched writes, many answers per read, as the router itself does I/O), and the report
//! (table, `--json`, `--hgrm`, `--plot`). Runs in its own process; never part of a router.
//!
//! Modes:
//! - `--target http://H:P` (`--protocol http|ws`): a running router. `https://H:P` (and
//!   `wss://H:P`, which is `https://` with `--protocol ws`) speaks TLS, trusting `--cacert`
//!   (default: the keyring's dev CA, `<keyring>/tls/dev-ca.pem`); all connections share one
//!   rustls `ClientConfig`, so later connections resume the session of earlier ones.
//! - `--target nats://H:P`: nats-server request/reply, the anchor. Responders (queue group `q`)
//!   run on the same executors as the requesters, as the tasks would.
//! - `--direct`: no router. The bench plays the router's task-link side and starts one
//!   `fedbus task echo` child per connection (each child opens one link), so `--connections`
//!   is the number of task links. The one-hop floor is `--direct --connections 1`. All links
//!   are driven by the first load core.
//! - no `--target`: starts `fedbus run` (its shard on the second core this process may run on,
//!   its control thread on the first; both on the first with one core) and `fedbus task echo`
//!   on the first, then loads the router from the first (`--cores` to change). The cores are
//!   the process's CPU affinity, as `taskset` or a cpuset leaves it. `--tls`: the router also listens for HTTPS (a fresh CA and
//!   certificate in the scratch dir) and the load goes there (`https://`, or `wss://` with
//!   `--protocol ws`).
//! - `--conn-per-request` (HTTP, plain or TLS): every request on a new connection, closed
//!   after its answer; over TLS each is a full handshake (resumption off; `--resume` keeps
//!   it). `--connections` is the concurrency. This measures handshakes (connections) per
//!   second.
//!
//! Server CPU: with `--cpu-pid PID` (repeatable; the spawned router's pid is added by
//! itself) the report gives the user + system CPU time of those processes over the window,
//! per request and as requests per CPU-second.
//!
//! Closed loop (default): `--inflight` requests outstanding per connection. Open loop
//! (`--rate`): requests leave at scheduled times and latency counts from the scheduled time
//! (coordinated omission corrected); the uncorrected latency is reported beside it. In open
//! loop `--inflight` caps the outstanding requests per connection (default 256, the router's
//! default per-connection limit); time spent waiting on that cap is charged to the requests.

#![warn(unreachable_pub)]
#![deny(missing_docs)]

mod codec;
mod cpu;
mod engine;
mod http;
mod nats;
mod parse;
mod report;
mod schedule;
mod spawn;
mod tls;
mod websocket;

use anyhow::{bail, Context as _};
use engine::{Plan, Proto};
use fedbus_auth::{sign_client_jwt, ClientClaims, Keyring};
use parse::{parse_duration, parse_size, Target};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tls::TlsClient;

/// What the load generator speaks to a fedbus router.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 keep-alive with pipelining.
    Http,
    /// The client websocket endpoint `/api/ws`, one fedbus frame per message.
    Ws,
}

/// Flags of `fedbus bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// `http://HOST:PORT` or `https://HOST:PORT` (a running fedbus router; `ws://`/`wss://`
    /// imply `--protocol ws`) or `nats://HOST:PORT` (nats-server). Absent: start a router and
    /// an echo task as child processes.
    #[arg(long)]
    pub target: Option<String>,
    /// Client protocol towards a fedbus router.
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// Client connections (with --direct: task links, one echo task process each).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Requests outstanding per connection. Default 8 (closed loop); with --rate, a cap
    /// (default 256).
    #[arg(long)]
    pub inflight: Option<usize>,
    /// Open loop: requests per second over all connections.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Request body size: `<n>B`, `<n>KiB` or `<n>MiB`.
    #[arg(long, default_value = "64B", value_parser = parse_size)]
    pub size: usize,
    /// Measured time (`10s`, `500ms`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time before measuring starts, excluded from the statistics.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Spread requests over workspace ids 0..N.
    #[arg(long, default_value_t = 16)]
    pub wsids: u32,
    /// Target app, `owner/app`.
    #[arg(long, default_value = "demo/echo")]
    pub app: String,
    /// Region in request paths.
    #[arg(long, default_value = "local")]
    pub region: String,
    /// Cluster in request paths.
    #[arg(long, default_value = "dev")]
    pub cluster: String,
    /// Client JWT; else one is minted from the keyring.
    #[arg(long)]
    pub token: Option<String>,
    /// Keyring directory to mint a token from. Default `$FEDBUS_HOME/keys`, else
    /// `./.fedbus/keys`.
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Cores of the load generator's executors, e.g. `0` or `0,2-3`. Default: the first core
    /// this process may run on (its CPU affinity), `0` on most machines.
    #[arg(long)]
    pub cores: Option<String>,
    /// nats-server: responder connections. Default: --connections.
    #[arg(long)]
    pub responders: Option<usize>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write HdrHistogram's percentile distribution (microseconds).
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Draw latency by percentile to this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Add an earlier run's --json file to the plot (repeatable).
    #[arg(long = "plot-add")]
    pub plot_add: Vec<PathBuf>,
    /// Name of this run in the report, json and plot.
    #[arg(long)]
    pub label: Option<String>,
    /// No router: the bench plays the router's task-link side (the one-hop floor).
    #[arg(long)]
    pub direct: bool,
    /// The fedbus binary to start children from. Default: this executable.
    #[arg(long)]
    pub fedbus_bin: Option<PathBuf>,
    /// Busy-poll this many microseconds before a load executor parks.
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// Without --target: the spawned router's `tuning.spin_before_park_us` (its shard
    /// busy-polls this many microseconds before it parks). Default: 100 when the shard has a
    /// core to itself (2+ usable cores, no load executor on the shard's), as
    /// `tuning/2-core.toml` sets for that layout; else 0.
    #[arg(long)]
    pub router_spin_us: Option<u64>,
    /// Without --target: the spawned router also serves HTTPS and the load goes over TLS.
    #[arg(long)]
    pub tls: bool,
    /// CA certificate (PEM) trusted for an `https://`/`wss://` target. Default: the keyring's
    /// dev CA, `<keyring>/tls/dev-ca.pem`.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// A new connection per request (closed after its answer); over TLS a full handshake
    /// each. HTTP only, closed loop; --connections is the concurrency.
    #[arg(long)]
    pub conn_per_request: bool,
    /// With --conn-per-request over TLS: resume sessions instead of full handshakes.
    #[arg(long)]
    pub resume: bool,
    /// Measure this process's CPU time (user + system) over the window (repeatable).
    #[arg(long = "cpu-pid")]
    pub cpu_pids: Vec<u32>,
}

/// The spawned router's `tuning.spin_before_park_us` when its shard owns a core: what
/// `tuning/2-core.toml` sets for that layout (docs/TUNING.md: at 8 x 8 1.25x the requests per
/// second for the same router CPU per request; 2.8x at one request in flight).
const OWN_CORE_SPIN_US: u64 = 100;

/// Longest accepted values, to turn typos into errors rather than memory exhaustion.
const MAX_CONNECTIONS: usize = 10_000;
const MAX_INFLIGHT: usize = 65_536;
const MAX_WSIDS: u32 = 1_000_000;

/// Runs `fedbus bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let target = args
        .target
        .as_deref()
        .map(parse::parse_target)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    check(&args, target.as_ref())?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("install signal handler")?;
    }
    // The cores this process may use (its CPU affinity, cut to the CPU count), ascending: a
    // cpuset or `taskset` that leaves out core 0 moves the default layout with it.
    let usable = fedbus_router::config::default_cores();
    let cores = match &args.cores {
        Some(c) => parse::parse_cores(c).map_err(anyhow::Error::msg)?,
        None => vec![usable[0]],
    };
    let online = fedbus_router::config::online_cores();
    let inflight = args.inflight.unwrap_or(if args.rate.is_some() {
        256
    } else if args.conn_per_request {
        1
    } else {
        8
    });
    let mut plan = Plan {
        proto: Proto::Http {
            host: String::new(),
            addr: ([127, 0, 0, 1], 0).into(),
            tls: None,
        },
        cores: cores.clone(),
        connections: args.connections,
        inflight,
        rate: args.rate,
        size: args.size,
        wsids: args.wsids,
        warmup: args.warmup,
        duration: args.duration,
        token: String::new(),
        region: args.region.clone(),
        cluster: args.cluster.clone(),
        app: args.app.clone(),
        spin: args.spin_us.map(Duration::from_micros),
        conn_per_request: args.conn_per_request,
        cpu_pids: args.cpu_pids.clone(),
    };
    let mut protocol = args.protocol;
    let token_life = (args.warmup + args.duration).as_secs() + 3600;
    // Children (router, tasks) live until this drops: at the end, or on any error below.
    let mut guard = None;
    // The spawned router's spin before park (None: no router spawned).
    let mut router_spin = None;
    let mode;
    match (&target, args.direct) {
        (Some(Target::Nats { addr, .. }), _) => {
            mode = "nats";
            plan.proto = Proto::Nats {
                addr: *addr,
                responders: args.responders.unwrap_or(args.connections),
            };
        }
        (
            Some(Target::Router {
                host,
                addr,
                tls,
                ws,
            }),
            _,
        ) => {
            mode = "router";
            let dir = args
                .keyring
                .clone()
                .unwrap_or_else(fedbus_router::config::default_keyring_dir);
            plan.token = match &args.token {
                Some(t) => t.clone(),
                None => mint_token(&dir, &args.app, token_life)?,
            };
            if *ws {
                protocol = Protocol::Ws;
            }
            let tls = if *tls {
                let ca = args
                    .cacert
                    .clone()
                    .unwrap_or_else(|| fedbus_router::tls::dev::DevFiles::in_keyring(&dir).ca);
                Some(TlsClient::new(&ca, host, tls_resume(&args))?)
            } else {
                None
            };
            plan.proto = client_proto(protocol, host.clone(), *addr, tls);
        }
        (None, true) => {
            mode = "direct";
            if cores.len() > 1 {
                eprintln!(
                    "note: --direct drives all task links from the first load core ({})",
                    cores[0]
                );
                plan.cores.truncate(1);
            }
            let mut g = spawn::Guard::new()?;
            let keys = g.dir().join("keys");
            Keyring::init(&keys, &[args.app.as_str()], fedbus_auth::now_unix())
                .context("create keys for the echo tasks")?;
            let (fd, addr) = engine::direct_listener()?;
            let task_core = usable
                .iter()
                .copied()
                .find(|c| !cores.contains(c))
                .unwrap_or(cores[0]);
            let bin = fedbus_bin(&args)?;
            for i in 0..args.connections {
                let a = vec![
                    "task".into(),
                    "echo".into(),
                    "--router".into(),
                    addr.to_string(),
                    "--app".into(),
                    args.app.clone(),
                ];
                g.spawn(&format!("task{i}"), &bin, &a, Some(task_core))?;
            }
            eprintln!(
                "core layout: {} echo task(s) on core {task_core}, load generator (router side of the links) on core {}",
                args.connections, cores[0]
            );
            plan.proto = Proto::Direct {
                listener_fd: fd,
                addr,
            };
            guard = Some(g);
        }
        (None, false) => {
            mode = "spawned";
            let mut g = spawn::Guard::new()?;
            let keys = g.dir().join("keys");
            Keyring::init(&keys, &[args.app.as_str()], fedbus_auth::now_unix())
                .context("create keys for the bench router")?;
            let [api, internal, tls] = spawn::free_ports::<3>()?;
            let api: std::net::SocketAddr = ([127, 0, 0, 1], api).into();
            let internal: std::net::SocketAddr = ([127, 0, 0, 1], internal).into();
            let api_tls = if args.tls {
                let addr: std::net::SocketAddr = ([127, 0, 0, 1], tls).into();
                Some((addr, spawn::bench_certs(g.dir())?))
            } else {
                None
            };
            let (shards, control) = spawn::router_cores(&usable);
            let cfg = g.dir().join("router.toml");
            let mut text = spawn::router_config(
                api,
                internal,
                &keys,
                &args.app,
                &shards,
                control,
                api_tls.as_ref().map(|(a, c)| (*a, c)),
            );
            let own_core = shards[0] != control && !cores.contains(&shards[0]);
            let spin = args
                .router_spin_us
                .unwrap_or(if own_core { OWN_CORE_SPIN_US } else { 0 });
            if spin > 0 {
                text = spawn::with_spin(&text, spin);
            }
            router_spin = Some(spin);
            std::fs::write(&cfg, text).with_context(|| format!("write {}", cfg.display()))?;
            let bin = fedbus_bin(&args)?;
            g.spawn(
                "router",
                &bin,
                &["run".into(), "--config".into(), cfg.display().to_string()],
                None,
            )?;
            let task_args = vec![
                "task".into(),
                "echo".into(),
                "--router".into(),
                internal.to_string(),
                "--app".into(),
                args.app.clone(),
            ];
            g.spawn("task", &bin, &task_args, Some(control))?;
            plan.token = match &args.token {
                Some(t) => t.clone(),
                None => mint_token(&keys, &args.app, token_life)?,
            };
            let path = format!(
                "/api/{}/{}/{}/api/0/sys/echo",
                args.region, args.cluster, args.app
            );
            spawn::wait_ready(
                &mut g,
                api,
                &path,
                &plan.token,
                Duration::from_secs(10),
                &stop,
            )?;
            eprintln!(
                "core layout: router shards on {shards:?}, control thread and echo task on core {control}, load generator on cores {cores:?}; the shard spins {spin} us before it parks (--router-spin-us)"
            );
            plan.proto = match &api_tls {
                None => client_proto(protocol, api.to_string(), api, None),
                Some((addr, certs)) => {
                    let t = TlsClient::new(&certs.ca, &addr.to_string(), tls_resume(&args))?;
                    client_proto(protocol, addr.to_string(), *addr, Some(t))
                }
            };
            if let Some(pid) = g.pid("router") {
                plan.cpu_pids.push(pid);
            }
            guard = Some(g);
        }
    }

    let label = args.label.clone().unwrap_or_else(|| {
        let what = match (&plan.proto, mode) {
            (Proto::Nats { .. }, _) => "nats".to_string(),
            (Proto::Direct { .. }, _) => "direct".to_string(),
            (p, m) => format!(
                "fedbus-{}{}{}",
                proto_name(protocol, is_tls(p)),
                if args.conn_per_request { "-conn" } else { "" },
                if m == "spawned" { "" } else { "-target" }
            ),
        };
        format!("{what} {}", size_name(args.size))
    });
    let settings = json!({
        "mode": mode,
        "target": args.target,
        "protocol": match &plan.proto { Proto::Nats{..} => "nats", Proto::Direct{..} => "ws-task-link", p => proto_name(protocol, is_tls(p)) },
        "tls": is_tls(&plan.proto),
        "conn_per_request": args.conn_per_request,
        "router_spin_us": router_spin,
        "tls_resume": is_tls(&plan.proto) && tls_resume(&args),
        "cpu_pids": plan.cpu_pids,
        "connections": args.connections,
        "inflight": inflight,
        "rate": args.rate,
        "size": args.size,
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "wsids": args.wsids,
        "app": args.app,
        "cores": plan.cores,
        "responders": match &plan.proto { Proto::Nats { responders, .. } => Some(*responders), _ => None },
        "online_cores": online,
    });
    eprintln!(
        "bench {label}: {} connections x {inflight} in flight{}, {} bodies, {:?} warmup + {:?}",
        args.connections,
        args.rate
            .map(|r| format!(" at {r} req/s (open loop)"))
            .unwrap_or_default(),
        size_name(args.size),
        args.warmup,
        args.duration
    );
    if let Some(g) = guard.as_mut() {
        g.check_alive()?;
    }
    let out = engine::run(plan, stop)?;
    for f in out.failures.iter().take(4) {
        eprintln!("warning: {f}");
    }
    for (status, body) in &out.stats.error_samples {
        eprintln!(
            "warning: the first {} answer said: {body}",
            codec::status_name(*status)
        );
    }
    let rep = report::Report {
        label,
        seconds: out.seconds,
        open_loop: args.rate.is_some(),
        stats: out.stats,
        settings,
        cpu_seconds: out.cpu_seconds,
    };
    println!("{}", rep.table());
    write_outputs(&args, &rep)?;
    drop(guard);
    if rep.stats.ok == 0 {
        let by_status: Vec<String> = rep
            .stats
            .errors
            .iter()
            .map(|(k, v)| format!("{}: {v}", codec::status_name(*k)))
            .collect();
        match out.failures.first() {
            Some(f) => bail!("no request succeeded: {f}"),
            None if by_status.is_empty() => bail!("no request was answered"),
            None => {
                // The sample of the most frequent error status (samples include the warm-up).
                let sample = rep
                    .stats
                    .errors
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .and_then(|(s, _)| rep.stats.error_samples.get_key_value(s))
                    .or_else(|| rep.stats.error_samples.iter().next())
                    .map(|(s, b)| {
                        format!("; the first {} answer said: {b}", codec::status_name(*s))
                    })
                    .unwrap_or_default();
                bail!("no request succeeded ({}){sample}", by_status.join(", "))
            }
        }
    }
    Ok(())
}

fn check(args: &BenchArgs, target: Option<&Target>) -> anyhow::Result<()> {
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if matches!(args.inflight, Some(n) if n == 0 || n > MAX_INFLIGHT) {
        bail!("--inflight must be 1..={MAX_INFLIGHT}");
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0 && r <= 1e8) {
            bail!("--rate must be a number of requests/s above 0");
        }
    }
    if args.wsids == 0 || args.wsids > MAX_WSIDS {
        bail!("--wsids must be 1..={MAX_WSIDS}");
    }
    if args.duration.is_zero() {
        bail!("--duration must be above 0");
    }
    if matches!(args.responders, Some(0)) {
        bail!("--responders must be at least 1");
    }
    fedbus_auth::keyring::validate_app_name(&args.app)
        .map_err(|e| anyhow::anyhow!("--app: {e}"))?;
    for (flag, v) in [("--region", &args.region), ("--cluster", &args.cluster)] {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("{flag} {v:?}: must be non-empty [A-Za-z0-9_-]");
        }
    }
    if args.direct && target.is_some() {
        bail!("--direct starts its own echo tasks; it takes no --target");
    }
    if args.responders.is_some() && !matches!(target, Some(Target::Nats { .. })) {
        bail!("--responders applies to nats:// targets only");
    }
    if matches!(target, Some(Target::Nats { .. })) && args.protocol != Protocol::Http {
        bail!("--protocol applies to fedbus targets; nats:// speaks the NATS protocol");
    }
    if args.direct && args.protocol != Protocol::Http {
        bail!("--direct speaks task links; --protocol does not apply");
    }
    if !args.plot_add.is_empty() && args.plot.is_none() {
        bail!("--plot-add needs --plot FILE.svg");
    }
    let router = matches!(target, Some(Target::Router { .. }));
    let tls_target = matches!(target, Some(Target::Router { tls: true, .. }));
    if args.router_spin_us.is_some() && (target.is_some() || args.direct) {
        bail!(
            "--router-spin-us tunes the router the bench starts; it takes no --target or --direct"
        );
    }
    if args.tls && (target.is_some() || args.direct) {
        bail!("--tls starts a router with HTTPS; for a running router use an https:// target");
    }
    if args.cacert.is_some() && !tls_target {
        bail!("--cacert applies to https:// and wss:// targets");
    }
    if args.conn_per_request {
        let ws = args.protocol == Protocol::Ws
            || matches!(target, Some(Target::Router { ws: true, .. }));
        if ws || args.direct || !(router || target.is_none()) {
            bail!("--conn-per-request applies to HTTP towards a fedbus router");
        }
        if args.rate.is_some() || matches!(args.inflight, Some(n) if n != 1) {
            bail!("--conn-per-request is a closed loop with one request per connection (no --rate, --inflight 1)");
        }
    }
    if args.resume && !(args.conn_per_request && (args.tls || tls_target)) {
        bail!("--resume applies to --conn-per-request over TLS");
    }
    Ok(())
}

/// Whether TLS connections may resume sessions: always, except for full-handshake runs.
fn tls_resume(args: &BenchArgs) -> bool {
    !args.conn_per_request || args.resume
}

fn is_tls(p: &Proto) -> bool {
    matches!(
        p,
        Proto::Http { tls: Some(_), .. } | Proto::Ws { tls: Some(_), .. }
    )
}

fn client_proto(
    p: Protocol,
    host: String,
    addr: std::net::SocketAddr,
    tls: Option<TlsClient>,
) -> Proto {
    match p {
        Protocol::Http => Proto::Http { host, addr, tls },
        Protocol::Ws => Proto::Ws { host, addr, tls },
    }
}

fn proto_name(p: Protocol, tls: bool) -> &'static str {
    match (p, tls) {
        (Protocol::Http, false) => "http",
        (Protocol::Http, true) => "https",
        (Protocol::Ws, false) => "ws",
        (Protocol::Ws, true) => "wss",
    }
}

fn size_name(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}MiB", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

fn fedbus_bin(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    match &args.fedbus_bin {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("find the fedbus executable (use --fedbus-bin)"),
    }
}

/// A client JWT for `app` from the newest secret in the keyring at `dir`.
fn mint_token(dir: &Path, app: &str, life_secs: u64) -> anyhow::Result<String> {
    let kr = Keyring::load(dir).with_context(|| {
        format!("no --token given and the keyring at {} cannot be read (use --keyring DIR or --token JWT)", dir.display())
    })?;
    let secret = kr
        .signing_app_secret(app)
        .with_context(|| format!("keyring {} holds no secret for app {app}", dir.display()))?;
    let now = fedbus_auth::now_unix();
    let claims = ClientClaims {
        sub: "fedbus-bench".into(),
        app: app.into(),
        iat: now,
        exp: now + life_secs,
        nbf: None,
    };
    sign_client_jwt(secret, &claims).map_err(|e| anyhow::anyhow!("sign a token for {app}: {e}"))
}

fn write_outputs(args: &BenchArgs, rep: &report::Report) -> anyhow::Result<()> {
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&rep.to_json())?;
        std::fs::write(p, text + "\n").with_context(|| format!("write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.hgrm {
        std::fs::write(p, report::hgrm(&rep.stats.corrected))
            .with_context(|| format!("write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        let mut curves = Vec::new();
        for f in &args.plot_add {
            curves.push(report::curve_from_json(f)?);
        }
        curves.push(report::Curve {
            label: rep.label.clone(),
            points: report::curve(&rep.stats.corrected),
        });
        report::plot(p, &curves)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn defaults_and_flags() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.connections, 8);
        assert_eq!(a.size, 64);
        assert_eq!(a.duration, Duration::from_secs(10));
        assert_eq!(a.warmup, Duration::from_secs(2));
        assert_eq!(a.wsids, 16);
        assert_eq!(a.protocol, Protocol::Http);
        check(&a, None).unwrap();
        let a = parse(&[
            "--size",
            "1MiB",
            "--protocol",
            "ws",
            "--rate",
            "1000",
            "--plot",
            "x.svg",
            "--plot-add",
            "a.json",
            "--plot-add",
            "b.json",
        ])
        .unwrap();
        assert_eq!(a.size, 1 << 20);
        assert_eq!(a.protocol, Protocol::Ws);
        assert_eq!(a.plot_add.len(), 2);
        assert!(parse(&["--size", "12XB"]).is_err());
        assert!(parse(&["--duration", "10"]).is_err());
        assert!(parse(&["--protocol", "grpc"]).is_err());
    }

    #[test]
    fn bad_combinations_are_one_line_errors() {
        let nats = parse::parse_target("nats://127.0.0.1:4222").unwrap();
        let cases: Vec<(Vec<&str>, Option<&Target>)> = vec![
            (vec!["--connections", "0"], None),
            (vec!["--inflight", "0"], None),
            (vec!["--rate=-5"], None),
            (vec!["--rate", "0"], None),
            (vec!["--wsids", "0"], None),
            (vec!["--duration", "0s"], None),
            (vec!["--app", "noslash"], None),
            (vec!["--direct"], Some(&nats)),
            (vec!["--protocol", "ws"], Some(&nats)),
            (vec!["--responders", "2"], None),
            (vec!["--plot-add", "a.json"], None),
            (vec!["--region", "a/b"], None),
            (vec!["--tls"], Some(&nats)),
            (vec!["--cacert", "ca.pem"], None),
            (vec!["--conn-per-request", "--protocol", "ws"], None),
            (vec!["--conn-per-request", "--inflight", "4"], None),
            (vec!["--conn-per-request", "--rate", "10"], None),
            (vec!["--conn-per-request"], Some(&nats)),
            (vec!["--resume", "--conn-per-request"], None),
            (vec!["--resume", "--tls"], None),
        ];
        for (argv, t) in cases {
            let a = parse(&argv).unwrap();
            let e = check(&a, t).expect_err(&format!("{argv:?}"));
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        check(&parse(&["--responders", "2"]).unwrap(), Some(&nats)).unwrap();
        let https = parse::parse_target("https://127.0.0.1:8443").unwrap();
        check(&parse(&["--cacert", "ca.pem"]).unwrap(), Some(&https)).unwrap();
        check(
            &parse(&["--conn-per-request", "--resume"]).unwrap(),
            Some(&https),
        )
        .unwrap();
        check(
            &parse(&["--conn-per-request", "--resume", "--tls"]).unwrap(),
            None,
        )
        .unwrap();
        check(&parse(&["--tls", "--protocol", "ws"]).unwrap(), None).unwrap();
    }

    #[test]
    fn token_from_keyring() {
        let dir = std::env::temp_dir().join(format!("fedbus-bench-kr-{}", std::process::id()));
        Keyring::init(&dir, &["demo/echo"], fedbus_auth::now_unix()).unwrap();
        let t = mint_token(&dir, "demo/echo", 60).unwrap();
        let kr = Keyring::load(&dir).unwrap();
        let c = fedbus_auth::verify_client_jwt(&kr, "demo/echo", &t, fedbus_auth::now_unix(), 60)
            .unwrap();
        assert_eq!(c.sub, "fedbus-bench");
        let e = mint_token(&dir, "other/app", 60).unwrap_err();
        assert!(e.to_string().contains("no secret"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(mint_token(&dir, "demo/echo", 60).is_err());
    }

    #[test]
    fn size_names() {
        assert_eq!(size_name(64), "64B");
        assert_eq!(size_name(4096), "4KiB");
        assert_eq!(size_name(1 << 20), "1MiB");
        assert_eq!(size_name(1500), "1500B");
    }
}
