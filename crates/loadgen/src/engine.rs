//! The load engine: one pinned glommio executor per load-generator core, each driving its share
//! of connections. A connection has a writer task (builds many requests into one batch, one
//! `sendmsg`) and a reader task (one read, every whole answer in it), like the router's own
//! I/O. Statistics stay on their core until the end; only counters for the progress line are
//! shared.

use super::codec::{Batch, Codec, Event, STATUS_TIMEOUT, STATUS_TRANSPORT};
use super::http::HttpCodec;
use super::nats;
use super::report::Stats;
use super::schedule::Schedule;
use super::tls::TlsClient;
use super::websocket::{self, take_frame, WsCodec};
use bytes::{Bytes, BytesMut};
use fedbus_router::ws::conn::{ReadSpace, SocketWriter};
use fedbus_router::ws::frame::opcode;
use fedbus_router::ws::Socket as _;
use fedbus_router::ws::{handshake, ClientTlsStream, PartsWriter, Side, Stream};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use rustls::HandshakeKind;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How long connections, handshakes and task registrations may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long answers still outstanding at the end of the run are waited for.
const DRAIN: Duration = Duration::from_secs(5);

/// What the connections speak, and to whom.
#[derive(Debug, Clone)]
pub(crate) enum Proto {
    /// HTTP/1.1 to a router's api listener (HTTPS with `tls`).
    Http {
        host: String,
        addr: SocketAddr,
        tls: Option<TlsClient>,
    },
    /// The router's client websocket endpoint (`GET /api/ws`; `wss://` with `tls`).
    Ws {
        host: String,
        addr: SocketAddr,
        tls: Option<TlsClient>,
    },
    /// nats-server request/reply, with `responders` echo connections.
    Nats { addr: SocketAddr, responders: usize },
    /// `--direct`: task links accepted on this listener (fd of a bound std listener).
    Direct {
        listener_fd: RawFd,
        addr: SocketAddr,
    },
}

/// Everything an executor needs to know; shared read-only.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) proto: Proto,
    pub(crate) cores: Vec<usize>,
    pub(crate) connections: usize,
    /// Most requests outstanding per connection.
    pub(crate) inflight: usize,
    /// Open loop: requests/s over all connections.
    pub(crate) rate: Option<f64>,
    pub(crate) size: usize,
    pub(crate) wsids: u32,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) token: String,
    pub(crate) region: String,
    pub(crate) cluster: String,
    pub(crate) app: String,
    pub(crate) spin: Option<Duration>,
    /// A new connection (and, over TLS, a new handshake) per request, one request per
    /// connection at a time (`--conn-per-request`); `connections` is the concurrency.
    pub(crate) conn_per_request: bool,
    /// Processes whose CPU time (user + system) is measured over the window.
    pub(crate) cpu_pids: Vec<u32>,
}

/// Counters for the live progress line, one set per executor.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) answered: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// p99 of the measurement window so far, ns.
    pub(crate) p99_ns: AtomicU64,
}

enum Start {
    Go(Instant),
    Abort,
}

/// Holds every executor until all are connected, then releases them with one start time.
#[derive(Default)]
struct Gate {
    start: Mutex<Option<Start>>,
    cv: Condvar,
}

impl Gate {
    fn open(&self, s: Start) {
        if let Ok(mut g) = self.start.lock() {
            *g = Some(s);
        }
        self.cv.notify_all();
    }

    /// Blocks the executor thread: it is called before any load runs on this executor.
    fn wait(&self) -> Option<Instant> {
        let mut g = self.start.lock().ok()?;
        loop {
            match &*g {
                Some(Start::Go(t)) => return Some(*t),
                Some(Start::Abort) => return None,
                None => g = self.cv.wait(g).ok()?,
            }
        }
    }
}

/// What one executor hands back.
#[derive(Default)]
pub(crate) struct ExecOut {
    pub(crate) stats: Stats,
    /// First few connection failures, for the report.
    pub(crate) failures: Vec<String>,
}

/// Result of a whole run.
pub(crate) struct RunOut {
    pub(crate) stats: Stats,
    pub(crate) failures: Vec<String>,
    /// Length of the measurement window actually covered.
    pub(crate) seconds: f64,
    /// CPU seconds (user + system) of `Plan::cpu_pids` over the measurement window.
    pub(crate) cpu_seconds: Option<f64>,
}

/// Runs the plan to the end (or until `stop`), printing progress once per second on stderr.
pub(crate) fn run(plan: Plan, stop: Arc<AtomicBool>) -> anyhow::Result<RunOut> {
    for c in &plan.cores {
        fedbus_router::config::check_placeable(*c).map_err(|e| anyhow::anyhow!("--cores: {e}"))?;
    }
    let execs = plan.cores.len();
    let plan = Arc::new(plan);
    let gate = Arc::new(Gate::default());
    let finished = Arc::new(AtomicUsize::new(0));
    let progress: Arc<Vec<Progress>> = Arc::new((0..execs).map(|_| Progress::default()).collect());
    let mut handles = Vec::new();
    let mut readies = Vec::new();
    for (ex, &core) in plan.cores.iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        readies.push(rx);
        let (plan, gate, finished, progress, stop) = (
            plan.clone(),
            gate.clone(),
            finished.clone(),
            progress.clone(),
            stop.clone(),
        );
        let mut b = LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(&format!("bench-{core}"))
            .io_memory(1 << 20);
        if let Some(s) = plan.spin {
            b = b.spin_before_park(s);
        }
        let h = b
            .spawn(move || async move {
                let _done = Finished(finished);
                executor_main(ex, plan, tx, gate, progress, stop).await
            })
            .map_err(|e| anyhow::anyhow!("start load-generator executor on core {core}: {e}"))?;
        handles.push(h);
    }

    // Wait until every executor has connected, or one fails.
    let mut setup_err = None;
    let deadline = Instant::now() + SETUP_TIMEOUT + Duration::from_secs(5);
    for rx in &readies {
        let r = loop {
            if stop.load(Ordering::Relaxed) {
                break Err("interrupted".to_string());
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => break r,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break Err("setup timed out".into()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Err("a load-generator executor failed to start".into())
                }
            }
        };
        if let Err(e) = r {
            setup_err = Some(e);
            break;
        }
    }
    if let Some(e) = setup_err {
        gate.open(Start::Abort);
        let mut detail = None;
        for h in handles {
            match h.join() {
                Ok(Err(e)) if detail.is_none() => detail = Some(e),
                Err(e) if detail.is_none() => detail = Some(e.to_string()),
                _ => {}
            }
        }
        anyhow::bail!("{}", detail.unwrap_or(e));
    }

    let t0 = Instant::now();
    gate.open(Start::Go(t0));
    let warm = plan.warmup.as_secs_f64();
    let total = warm + plan.duration.as_secs_f64();
    let mut stopped_at: Option<f64> = None;
    let mut last = (0u64, Instant::now());
    let mut next_tick = t0 + Duration::from_secs(1);
    let mut cpu = CpuWindow::new(
        &plan.cpu_pids,
        t0 + plan.warmup,
        t0 + plan.warmup + plan.duration,
    );
    while finished.load(Ordering::Acquire) < execs {
        std::thread::sleep(cpu.nap(Duration::from_millis(50)));
        cpu.sample(Instant::now());
        if stopped_at.is_none() && stop.load(Ordering::Relaxed) {
            stopped_at = Some(t0.elapsed().as_secs_f64());
            cpu.stop(Instant::now());
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick += Duration::from_secs(1);
            let answered: u64 = progress
                .iter()
                .map(|p| p.answered.load(Ordering::Relaxed))
                .sum();
            let errors: u64 = progress
                .iter()
                .map(|p| p.errors.load(Ordering::Relaxed))
                .sum();
            let p99 = progress
                .iter()
                .map(|p| p.p99_ns.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            let rate = (answered - last.0) as f64 / now.duration_since(last.1).as_secs_f64();
            last = (answered, now);
            let el = t0.elapsed().as_secs_f64();
            let phase = if el < warm {
                "warmup"
            } else if el < total {
                "measure"
            } else {
                "drain"
            };
            eprintln!(
                "[{el:5.1}s {phase:>7}] {rate:>10.0} req/s  errors {errors}  p99 so far {:.1} us",
                p99 as f64 / 1000.0
            );
        }
    }
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(out)) => {
                stats.merge(&out.stats);
                failures.extend(out.failures);
            }
            Ok(Err(e)) => failures.push(e),
            Err(e) => anyhow::bail!("load-generator executor failed: {e}"),
        }
    }
    let end = stopped_at.unwrap_or(total).min(total);
    Ok(RunOut {
        stats,
        failures,
        seconds: (end - warm).max(0.0),
        cpu_seconds: cpu.seconds(),
    })
}

/// Samples the CPU time of the server processes at the start and the end of the measurement
/// window, from the progress loop (which naps no longer than up to the next mark, so a mark
/// is sampled within a scheduler tick of its time).
struct CpuWindow<'a> {
    pids: &'a [u32],
    start_at: Instant,
    end_at: Instant,
    start: Option<f64>,
    end: Option<f64>,
}

impl<'a> CpuWindow<'a> {
    fn new(pids: &'a [u32], start_at: Instant, end_at: Instant) -> Self {
        CpuWindow {
            pids,
            start_at,
            end_at,
            start: None,
            end: None,
        }
    }

    /// How long to sleep: `most`, or less to wake at the next mark.
    fn nap(&self, most: Duration) -> Duration {
        let now = Instant::now();
        let next = if self.start.is_none() {
            self.start_at
        } else if self.end.is_none() {
            self.end_at
        } else {
            return most;
        };
        if self.pids.is_empty() {
            return most;
        }
        next.saturating_duration_since(now)
            .clamp(Duration::from_millis(1), most)
    }

    fn sample(&mut self, now: Instant) {
        if self.pids.is_empty() {
            return;
        }
        if self.start.is_none() && now >= self.start_at {
            self.start = super::cpu::total(self.pids);
            // Unreadable: give up on this run's CPU figure.
            if self.start.is_none() {
                self.pids = &[];
            }
        } else if self.start.is_some() && self.end.is_none() && now >= self.end_at {
            self.end = super::cpu::total(self.pids);
        }
    }

    /// Ctrl-C: the window ends now.
    fn stop(&mut self, now: Instant) {
        if self.start.is_some() && self.end.is_none() {
            self.end_at = now;
            self.sample(now);
        }
    }

    fn seconds(&self) -> Option<f64> {
        Some(self.end? - self.start?)
    }
}

/// Counts an executor as finished however it ends.
struct Finished(Arc<AtomicUsize>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// A connection's byte stream.
enum Transport {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream>),
}

/// A connected, handshaken connection ready for load.
struct Prepared {
    stream: Transport,
    leftover: BytesMut,
    codec: Box<dyn Codec>,
    /// Index among all connections.
    index: usize,
}

async fn executor_main(
    ex: usize,
    plan: Arc<Plan>,
    ready: mpsc::Sender<Result<(), String>>,
    gate: Arc<Gate>,
    progress: Arc<Vec<Progress>>,
    stop: Arc<AtomicBool>,
) -> Result<ExecOut, String> {
    let conns = match setup(ex, &plan).await {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let Some(t0) = gate.wait() else {
        return Ok(ExecOut::default());
    };
    let stats = Rc::new(RefCell::new(Stats::default()));
    let failures = Rc::new(RefCell::new(Vec::new()));
    let ctx = Rc::new(Ctx {
        t0,
        warm_ns: plan.warmup.as_nanos() as u64,
        end_ns: (plan.warmup + plan.duration).as_nanos() as u64,
        inflight: plan.inflight.max(1),
        rate: plan.rate,
        connections: plan.connections,
        wsids: plan.wsids.max(1),
        stats: stats.clone(),
        progress: progress.clone(),
        ex,
        stop,
        failures: failures.clone(),
    });
    let live = Rc::new(Cell::new(conns.len()));
    // Publishes p99-so-far for the progress line.
    let ticker = {
        let (stats, live, progress) = (stats.clone(), live.clone(), progress.clone());
        glommio::spawn_local(async move {
            while live.get() > 0 {
                glommio::timer::sleep(Duration::from_millis(500)).await;
                let p99 = stats.borrow().corrected.value_at_quantile(0.99);
                progress[ex].p99_ns.store(p99, Ordering::Relaxed);
            }
        })
    };
    let mut tasks = Vec::new();
    if plan.conn_per_request {
        for index in my_share(ex, plan.cores.len(), plan.connections) {
            let (ctx, live, plan) = (ctx.clone(), live.clone(), plan.clone());
            live.set(live.get() + 1);
            tasks.push(glommio::spawn_local(async move {
                churn(index, &plan, &ctx).await;
                live.set(live.get() - 1);
            }));
        }
    }
    for p in conns {
        let (ctx, live) = (ctx.clone(), live.clone());
        tasks.push(glommio::spawn_local(async move {
            drive(p, ctx).await;
            live.set(live.get() - 1);
        }));
    }
    for t in tasks {
        t.await;
    }
    ticker.await;
    drop(ctx);
    let stats = Rc::try_unwrap(stats)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone());
    let failures = failures.borrow().clone();
    Ok(ExecOut { stats, failures })
}

/// Connection indexes of executor `ex`.
fn my_share(ex: usize, execs: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).filter(move |i| i % execs == ex)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(addr, SETUP_TIMEOUT)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Reads more bytes into the spare room of `buf`. Ok(0): the peer closed. `space` tracks what
/// of the spare room is initialized, once per buffer.
async fn read_more<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    space: &mut ReadSpace,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    space.read(r, buf).await
}

fn payload(size: usize) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

async fn setup(ex: usize, plan: &Plan) -> Result<Vec<Prepared>, String> {
    let execs = plan.cores.len();
    let body = payload(plan.size);
    let mut out = Vec::new();
    match &plan.proto {
        Proto::Http { .. } | Proto::Ws { .. } if plan.conn_per_request => {}
        Proto::Http { host, addr, tls } => {
            for index in my_share(ex, execs, plan.connections) {
                let stream = connect_tls(*addr, tls.as_ref()).await?;
                let codec = HttpCodec::new(
                    host,
                    &plan.region,
                    &plan.cluster,
                    &plan.app,
                    &plan.token,
                    body.clone(),
                );
                out.push(Prepared {
                    stream,
                    leftover: BytesMut::new(),
                    codec: Box::new(codec),
                    index,
                });
            }
        }
        Proto::Ws { host, addr, tls } => {
            let metas = (0..plan.wsids)
                .map(|w| websocket::client_meta(&plan.region, &plan.cluster, &plan.app, w))
                .collect::<Vec<_>>();
            for index in my_share(ex, execs, plan.connections) {
                let (stream, leftover) = match connect_tls(*addr, tls.as_ref()).await? {
                    Transport::Plain(mut s) => {
                        let left = ws_upgrade(&mut s, addr, host, &plan.token).await?;
                        (Transport::Plain(s), left)
                    }
                    Transport::Tls(mut s) => {
                        let left = ws_upgrade(&mut *s, addr, host, &plan.token).await?;
                        (Transport::Tls(s), left)
                    }
                };
                let codec = WsCodec::new(Side::Client, metas.clone(), vec![], body.clone());
                out.push(Prepared {
                    stream,
                    leftover,
                    codec: Box::new(codec),
                    index,
                });
            }
        }
        Proto::Nats { addr, responders } => {
            for _ in my_share(ex, execs, *responders) {
                let (stream, leftover) = nats_connect(*addr, "SUB bench.echo q 1\r\n").await?;
                glommio::spawn_local(respond(stream, leftover)).detach();
            }
            for index in my_share(ex, execs, plan.connections) {
                let conn = format!("{}_{index}", std::process::id());
                let sub = format!("SUB {}.* 1\r\n", nats::inbox(&conn));
                let (stream, leftover) = nats_connect(*addr, &sub).await?;
                let codec = nats::NatsCodec::new(&conn, body.clone());
                out.push(Prepared {
                    stream: Transport::Plain(stream),
                    leftover,
                    codec: Box::new(codec),
                    index,
                });
            }
        }
        Proto::Direct { listener_fd, addr } => {
            // All task links are accepted on the first executor (see loadgen docs).
            if ex == 0 {
                out = accept_links(*listener_fd, *addr, plan, body).await?;
            }
        }
    }
    Ok(out)
}

/// Connects, and with `tls` does the TLS handshake (bounded by the setup timeout).
async fn connect_tls(addr: SocketAddr, tls: Option<&TlsClient>) -> Result<Transport, String> {
    let tcp = connect(addr).await?;
    let Some(t) = tls else {
        return Ok(Transport::Plain(tcp));
    };
    let s = tls_handshake(tcp, t, addr).await?;
    Ok(Transport::Tls(Box::new(s)))
}

/// The client side of a TLS handshake over `tcp`, bounded by the setup timeout.
async fn tls_handshake(
    tcp: TcpStream,
    t: &TlsClient,
    addr: SocketAddr,
) -> Result<ClientTlsStream, String> {
    let hs = t.connector().connect(t.name.clone(), tcp);
    match glommio::timer::timeout(SETUP_TIMEOUT, async { Ok(hs.await) }).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("TLS handshake with {addr}: {e}")),
        Err(_) => Err(format!(
            "TLS handshake with {addr}: not done within {}s",
            SETUP_TIMEOUT.as_secs()
        )),
    }
}

/// Sends the websocket upgrade request on `s` and waits for the 101; returns what was read
/// beyond it.
async fn ws_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    addr: &SocketAddr,
    host: &str,
    token: &str,
) -> Result<BytesMut, String> {
    let key = handshake::new_key();
    let req = handshake::client_request(host, "/api/ws", &key, Some(token));
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("websocket upgrade to {addr}: {e}"))?;
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        match handshake::parse_client_response(&buf, &key) {
            Ok(handshake::ClientHandshake::Accepted(n)) => {
                let _ = buf.split_to(n);
                return Ok(buf);
            }
            Ok(handshake::ClientHandshake::Refused { status, body }) => {
                return Err(format!(
                    "websocket upgrade to {addr} refused with {status}: {}",
                    body.trim()
                ))
            }
            Ok(handshake::ClientHandshake::Incomplete) => {}
            Err(e) => return Err(format!("websocket upgrade to {addr}: {e}")),
        }
        let n = read_more(s, &mut buf, &mut ReadSpace::default())
            .await
            .map_err(|e| format!("websocket upgrade to {addr}: {e}"))?;
        if n == 0 {
            return Err(format!("websocket upgrade to {addr}: connection closed"));
        }
    }
}

/// Connects, says CONNECT and `sub`, and waits for the PONG that proves the subscription is in
/// place before any load starts.
async fn nats_connect(addr: SocketAddr, sub: &str) -> Result<(TcpStream, BytesMut), String> {
    let mut s = connect(addr).await?;
    let mut hello = nats::CONNECT.to_vec();
    hello.extend_from_slice(sub.as_bytes());
    hello.extend_from_slice(b"PING\r\n");
    s.write_all(&hello)
        .await
        .map_err(|e| format!("nats {addr}: {e}"))?;
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        while let Some((op, n)) = nats::parse_op(&buf).map_err(|e| format!("nats {addr}: {e}"))? {
            let _ = buf.split_to(n);
            match op {
                nats::Op::Pong => return Ok((s, buf)),
                nats::Op::Err(e) => return Err(format!("nats {addr}: -ERR {e}")),
                _ => {}
            }
        }
        let n = read_more(&mut s, &mut buf, &mut ReadSpace::default())
            .await
            .map_err(|e| format!("nats {addr}: {e}"))?;
        if n == 0 {
            return Err(format!("nats {addr}: connection closed during CONNECT"));
        }
    }
}

/// A responder: echoes every request to its reply subject, a whole read's worth per write.
async fn respond(mut s: TcpStream, mut buf: BytesMut) {
    let mut out = Batch::new();
    let mut space = ReadSpace::default();
    loop {
        if nats::answer(&mut buf, &mut out).is_err() {
            return;
        }
        if !out.is_empty() {
            let parts = out.parts().to_vec();
            if SocketWriter::new(&mut s)
                .write_all_vectored(&parts)
                .await
                .is_err()
            {
                return;
            }
            out.clear();
        }
        match read_more(&mut s, &mut buf, &mut space).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// `--direct`: accepts one task link per connection, with the router's side of the hello and
/// registration, then treats each link as a connection.
async fn accept_links(
    fd: RawFd,
    addr: SocketAddr,
    plan: &Plan,
    body: Bytes,
) -> Result<Vec<Prepared>, String> {
    // SAFETY: the fd is a bound, listening std socket whose ownership the caller gave up
    // (`into_raw_fd`) for this executor alone.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + SETUP_TIMEOUT;
    while out.len() < plan.connections {
        let left = deadline.saturating_duration_since(Instant::now());
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            glommio::timer::sleep(left).await;
            None
        })
        .await;
        let mut s = match accepted {
            None => {
                return Err(format!(
                    "--direct: only {} of {} task links registered within {}s",
                    out.len(),
                    plan.connections,
                    SETUP_TIMEOUT.as_secs()
                ))
            }
            Some(r) => r.map_err(|e| format!("--direct: accept: {e}"))?,
        };
        let _ = s.set_nodelay(true);
        let (task, partitions, leftover) = link_handshake(&mut s, addr, &plan.app).await?;
        if !seen.insert(task) {
            // A second link from the same task: keep it registered but idle.
            glommio::spawn_local(async move {
                let mut b = BytesMut::new();
                while matches!(read_more(&mut s, &mut b, &mut ReadSpace::default()).await, Ok(n) if n > 0) {
                    b.clear();
                }
            })
            .detach();
            continue;
        }
        let parts: Vec<u32> = (0..plan.wsids)
            .map(|w| {
                if partitions.is_empty() {
                    w
                } else {
                    partitions[w as usize % partitions.len()]
                }
            })
            .collect();
        let metas = (0..plan.wsids)
            .map(|w| websocket::task_meta(&plan.app, w))
            .collect();
        let codec = WsCodec::new(Side::Server, metas, parts, body.clone());
        let index = out.len();
        out.push(Prepared {
            stream: Transport::Plain(s),
            leftover,
            codec: Box::new(codec),
            index,
        });
    }
    Ok(out)
}

/// Upgrade, hello, register, registered. Returns the task id, its partitions and what was read
/// beyond the registration.
async fn link_handshake(
    s: &mut TcpStream,
    addr: SocketAddr,
    app: &str,
) -> Result<(u64, Vec<u32>, BytesMut), String> {
    let err = |e: &dyn std::fmt::Display| format!("--direct: task link: {e}");
    let mut buf = BytesMut::with_capacity(8192);
    let up = loop {
        match handshake::parse_upgrade(&buf) {
            Ok(Some(u)) => break u,
            Ok(None) => {}
            Err(r) => return Err(err(&format!("bad upgrade request: {}", r.message))),
        }
        if read_more(s, &mut buf, &mut ReadSpace::default())
            .await
            .map_err(|e| err(&e))?
            == 0
        {
            return Err(err(&"closed during the upgrade"));
        }
    };
    let _ = buf.split_to(up.head_len);
    let hello = serde_json::json!({
        "type": "hello", "router": "bench/direct/r0", "cluster": "bench/direct",
        "shard": 0, "shards": 1, "internal": [addr.to_string()],
    });
    let mut w = handshake::accept_response(&up.key).into_bytes();
    w.extend_from_slice(&websocket::frame_bytes(
        Side::Server,
        opcode::TEXT,
        hello.to_string().as_bytes(),
    ));
    s.write_all(&w).await.map_err(|e| err(&e))?;
    loop {
        while let Some((op, msg)) = take_frame(&mut buf, Side::Server).map_err(|e| err(&e))? {
            if op == opcode::PING {
                let pong = websocket::frame_bytes(Side::Server, opcode::PONG, &msg);
                s.write_all(&pong).await.map_err(|e| err(&e))?;
                continue;
            }
            if op != opcode::TEXT {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&msg).map_err(|e| err(&e))?;
            if v["type"] != "register" {
                continue;
            }
            if v["app"].as_str() != Some(app) {
                return Err(err(&format!(
                    "task registered app {} instead of {app}",
                    v["app"]
                )));
            }
            let task = v["task"]
                .as_u64()
                .ok_or_else(|| err(&"register without a task id"))?;
            let parts = v["partitions"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_u64())
                        .map(|p| p as u32)
                        .collect()
                })
                .unwrap_or_default();
            let ok =
                websocket::frame_bytes(Side::Server, opcode::TEXT, br#"{"type":"registered"}"#);
            s.write_all(&ok).await.map_err(|e| err(&e))?;
            return Ok((task, parts, buf));
        }
        if read_more(s, &mut buf, &mut ReadSpace::default())
            .await
            .map_err(|e| err(&e))?
            == 0
        {
            return Err(err(&"task closed the link before registering"));
        }
    }
}

/// Per-executor run parameters.
struct Ctx {
    t0: Instant,
    warm_ns: u64,
    end_ns: u64,
    inflight: usize,
    rate: Option<f64>,
    connections: usize,
    wsids: u32,
    stats: Rc<RefCell<Stats>>,
    progress: Arc<Vec<Progress>>,
    ex: usize,
    stop: Arc<AtomicBool>,
    failures: Rc<RefCell<Vec<String>>>,
}

impl Ctx {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn in_window(&self, intended: u64) -> bool {
        intended >= self.warm_ns && intended < self.end_ns
    }

    fn record(&self, status: u16, intended: u64, sent: u64, now: u64) {
        let p = &self.progress[self.ex];
        p.answered.fetch_add(1, Ordering::Relaxed);
        if status != 200 {
            p.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.in_window(intended) {
            self.stats.borrow_mut().record(
                status,
                now.saturating_sub(intended),
                now.saturating_sub(sent),
            );
        }
    }

    fn sleep_until(&self, ns: u64) -> glommio::timer::Timer {
        glommio::timer::Timer::new(Duration::from_nanos(ns.saturating_sub(self.now())))
    }

    fn fail(&self, index: usize, why: String) {
        let mut f = self.failures.borrow_mut();
        if f.len() < 8 {
            f.push(format!("connection {index}: {why}"));
        }
    }
}

/// State shared by a connection's writer and reader.
#[derive(Default)]
struct Conn {
    /// id -> (intended send time, actual send time), ns since start.
    pending: HashMap<u64, (u64, u64)>,
    /// Unprompted answers the reader wants sent (PONG).
    replies: Vec<Bytes>,
    /// The reader stopped: the connection is gone.
    closed: bool,
    /// Why it is gone, if not by our own shutdown.
    error: Option<String>,
    /// We shut the socket down ourselves (end of run).
    shut: bool,
    notified: bool,
    waker: Option<Waker>,
}

impl Conn {
    fn notify(&mut self) {
        self.notified = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Waits until the reader has news for the writer.
async fn notified(c: &RefCell<Conn>) {
    futures_lite::future::poll_fn(|cx| {
        let mut c = c.borrow_mut();
        if std::mem::take(&mut c.notified) {
            Poll::Ready(())
        } else {
            c.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

async fn drive(p: Prepared, ctx: Rc<Ctx>) {
    // One copy of the connection code per transport: the plaintext one is the same code as
    // before TLS (one `sendmsg` per batch).
    match p.stream {
        Transport::Plain(s) => drive_on(s, p.leftover, p.codec, p.index, ctx).await,
        Transport::Tls(s) => drive_on(*s, p.leftover, p.codec, p.index, ctx).await,
    }
}

async fn drive_on<S: Stream>(
    stream: S,
    leftover: BytesMut,
    codec: Box<dyn Codec>,
    index: usize,
    ctx: Rc<Ctx>,
) {
    let fd = stream.socket().fd();
    let (r, mut w) = stream.into_split();
    let conn = Rc::new(RefCell::new(Conn::default()));
    let codec = Rc::new(RefCell::new(codec));
    let reader = glommio::spawn_local(read_side(
        r,
        leftover,
        codec.clone(),
        conn.clone(),
        ctx.clone(),
    ));
    write_side(&mut w, index, codec, conn.clone(), &ctx).await;
    // Wakes the reader out of its read: every answer that will come has come.
    conn.borrow_mut().shut = true;
    // SAFETY: shutdown(2) on this connection's own socket, kept open by the reader task's
    // half of the stream until `reader` completes below.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    reader.await;
    let c = conn.borrow();
    let status = if c.error.is_some() {
        STATUS_TRANSPORT
    } else {
        STATUS_TIMEOUT
    };
    let now = ctx.now();
    for (intended, sent) in c.pending.values() {
        ctx.record(status, *intended, *sent, now);
    }
    if let Some(e) = &c.error {
        ctx.fail(index, e.clone());
    }
}

async fn write_side<W: PartsWriter>(
    w: &mut W,
    index: usize,
    codec: Rc<RefCell<Box<dyn Codec>>>,
    conn: Rc<RefCell<Conn>>,
    ctx: &Ctx,
) {
    let mut sched = ctx.rate.map(|r| Schedule::new(r, ctx.connections, index));
    let mut batch = Batch::new();
    let mut next_id = 0u64;
    let wsids = ctx.wsids as u64;
    loop {
        let now = ctx.now();
        let sending = now < ctx.end_ns && !ctx.stop.load(Ordering::Relaxed);
        {
            let mut c = conn.borrow_mut();
            if c.closed {
                return;
            }
            for r in c.replies.drain(..) {
                batch.put_shared(&r);
            }
            if sending {
                let mut codec = codec.borrow_mut();
                while c.pending.len() < ctx.inflight {
                    let intended = match &mut sched {
                        None => now,
                        Some(s) => match s.take_due(now) {
                            Some(t) => t,
                            None => break,
                        },
                    };
                    let id = next_id;
                    next_id += 1;
                    let wsid = ((id + index as u64) % wsids) as u32;
                    codec.encode(id, wsid, &mut batch);
                    c.pending.insert(id, (intended, now));
                }
            }
        }
        if !batch.is_empty() {
            let parts = batch.parts().to_vec();
            batch.clear();
            if let Err(e) = w.write_parts(&parts).await {
                let mut c = conn.borrow_mut();
                c.error.get_or_insert_with(|| format!("write: {e}"));
                return;
            }
            continue;
        }
        if !sending {
            break;
        }
        // Sleep until the reader has news, the next scheduled send (unless the connection is
        // at its in-flight cap: then only an answer helps), or the end of the run; at least
        // every 100 ms to notice Ctrl-C.
        let full = conn.borrow().pending.len() >= ctx.inflight;
        let wake_at = match &sched {
            Some(s) if !full => s.peek(),
            _ => ctx.end_ns,
        }
        .min(ctx.end_ns)
        .min(now + 100_000_000);
        futures_lite::future::or(notified(&conn), async {
            ctx.sleep_until(wake_at).await;
        })
        .await;
    }
    // Drain: wait for the answers still outstanding, up to DRAIN.
    let deadline = ctx.end_ns.max(ctx.now()) + DRAIN.as_nanos() as u64;
    loop {
        {
            let c = conn.borrow();
            if c.closed || c.pending.is_empty() || ctx.now() >= deadline {
                break;
            }
        }
        futures_lite::future::or(notified(&conn), async {
            ctx.sleep_until(deadline).await;
        })
        .await;
        // Keep answering pings while draining.
        let replies: Vec<Bytes> = conn.borrow_mut().replies.drain(..).collect();
        if !replies.is_empty() && w.write_parts(&replies).await.is_err() {
            break;
        }
    }
    w.close().await;
}

async fn read_side<R: AsyncRead + Unpin>(
    mut r: R,
    mut buf: BytesMut,
    codec: Rc<RefCell<Box<dyn Codec>>>,
    conn: Rc<RefCell<Conn>>,
    ctx: Rc<Ctx>,
) {
    let mut ev = Vec::with_capacity(256);
    let mut first = true;
    let mut space = ReadSpace::default();
    loop {
        // Bytes that came with the handshake are decoded before the first read.
        if !first || buf.is_empty() {
            match read_more(&mut r, &mut buf, &mut space).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let mut c = conn.borrow_mut();
                    if c.error.is_none() && !c.shut {
                        c.error = Some(format!("read: {e}"));
                    }
                    break;
                }
            }
        }
        first = false;
        if let Err(e) = codec.borrow_mut().decode(&mut buf, &mut ev) {
            conn.borrow_mut().error = Some(e);
            break;
        }
        if ev.is_empty() {
            continue;
        }
        let now = ctx.now();
        let mut c = conn.borrow_mut();
        for e in ev.drain(..) {
            match e {
                Event::Done { id, status } => {
                    if let Some((intended, sent)) = c.pending.remove(&id) {
                        ctx.record(status, intended, sent, now);
                    }
                }
                Event::Reply(b) => c.replies.push(b),
                Event::ErrorBody { status, body } => {
                    ctx.stats.borrow_mut().sample_error(status, body)
                }
            }
        }
        c.notify();
    }
    let mut c = conn.borrow_mut();
    // EOF before our own shutdown: the peer closed on us.
    if !c.shut && c.error.is_none() {
        c.error = Some("peer closed the connection".into());
    }
    c.closed = true;
    c.notify();
}

/// `--conn-per-request`: one slot of the concurrency. Each request opens a new connection (over
/// TLS: a full handshake, or a resumed one with `--resume`), sends one request, reads its
/// answer and closes (TLS: `close_notify`). Latency covers all of it, connect included.
async fn churn(index: usize, plan: &Plan, ctx: &Ctx) {
    let (host, addr, tls) = match &plan.proto {
        Proto::Http { host, addr, tls } => (host, *addr, tls.as_ref()),
        _ => return,
    };
    let mut codec = HttpCodec::new(
        host,
        &plan.region,
        &plan.cluster,
        &plan.app,
        &plan.token,
        payload(plan.size),
    );
    let mut batch = Batch::new();
    let wsids = ctx.wsids as u64;
    for id in 0u64.. {
        let start = ctx.now();
        if start >= ctx.end_ns || ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        let wsid = ((id + index as u64) % wsids) as u32;
        batch.clear();
        codec.encode(id, wsid, &mut batch);
        let parts = batch.parts().to_vec();
        let once = async {
            let tcp = connect(addr).await?;
            match tls {
                None => one_request(tcp, &mut codec, &parts).await,
                Some(t) => {
                    let s = tls_handshake(tcp, t, addr).await?;
                    let resumed = s.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                    if ctx.in_window(start) {
                        let mut st = ctx.stats.borrow_mut();
                        if resumed {
                            st.resumed_handshakes += 1;
                        } else {
                            st.full_handshakes += 1;
                        }
                    }
                    one_request(s, &mut codec, &parts).await
                }
            }
        };
        let r = match glommio::timer::timeout(SETUP_TIMEOUT, async { Ok(once.await) }).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", SETUP_TIMEOUT.as_secs())),
        };
        match r {
            Ok((status, sample)) => {
                ctx.record(status, start, start, ctx.now());
                if let Some(body) = sample {
                    ctx.stats.borrow_mut().sample_error(status, body);
                }
            }
            Err(e) => {
                ctx.record(STATUS_TRANSPORT, start, start, ctx.now());
                ctx.fail(index, e);
                // A refused connect fails at once: do not spin on it.
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Writes the request in `batch` on a fresh connection, reads its answer, closes our side.
/// Returns the answer's status and, for the codec's first error answer, its body's start.
async fn one_request<S: Stream>(
    mut s: S,
    codec: &mut HttpCodec,
    parts: &[Bytes],
) -> Result<(u16, Option<String>), String> {
    s.write_parts(parts)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut space = ReadSpace::default();
    let mut ev = Vec::with_capacity(1);
    loop {
        codec.decode(&mut buf, &mut ev)?;
        if let Some(Event::Done { status, .. }) = ev.first() {
            let status = *status;
            let sample = ev.drain(..).find_map(|e| match e {
                Event::ErrorBody { body, .. } => Some(body),
                _ => None,
            });
            let _ = s.shutdown_write().await;
            return Ok((status, sample));
        }
        match read_more(&mut s, &mut buf, &mut space).await {
            Ok(0) => return Err("peer closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Binds the `--direct` listener on the calling thread; the executor takes the fd.
pub(crate) fn direct_listener() -> anyhow::Result<(RawFd, SocketAddr)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| anyhow::anyhow!("--direct: bind 127.0.0.1:0: {e}"))?;
    let addr = l.local_addr()?;
    Ok((l.into_raw_fd(), addr))
}
