//! What the attack tests measure beside the attack: the router's resident memory, and a
//! well-behaved client answered (or not) on the same shard while the attack runs.

use crate::{Conn, Req, Router};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// VmRSS of `pid`, KiB.
pub fn rss_kib_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("VmRSS of {pid}"))
}

/// The router's RSS, KiB.
pub fn rss_kib(r: &Router) -> u64 {
    rss_kib_of(crate::seed::pid(r))
}

/// A well-behaved client on its own thread: one echo request at a time on a keep-alive
/// connection (a new one after any error) until stopped; counts, live, the answers that were
/// right and the requests that failed, and keeps the slowest answer.
pub struct Normal {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<Duration>,
}

impl Normal {
    /// Starts echo requests to `app`, workspace `wsid`, with a token of its own.
    pub fn start(r: &Router, app: &str, wsid: u64) -> Normal {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (api, path, tok) = (r.api, r.path(app, wsid), r.token(app, "normal"));
        let (s, okc, failc) = (stop.clone(), ok.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            let mut c = Conn::open(api);
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let body = format!("normal {n}");
                let req = Req::post(&path).token(&tok).body(body.as_bytes());
                let t = Instant::now();
                c.send(&req.bytes());
                match c.read_response() {
                    Ok(resp) if resp.status == 200 && resp.body == body.as_bytes() => {
                        okc.fetch_add(1, Ordering::Relaxed);
                        slowest = slowest.max(t.elapsed());
                    }
                    _ => {
                        failc.fetch_add(1, Ordering::Relaxed);
                        c = Conn::open(api);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            slowest
        });
        Normal {
            stop,
            ok,
            failed,
            handle,
        }
    }

    /// Right answers so far.
    pub fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops; returns (answered, failed, slowest answer).
    pub fn stop(self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let slowest = self.handle.join().expect("normal client");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            slowest,
        )
    }
}

/// Clients on threads of their own, each sending one request after another on a keep-alive
/// connection until stopped (a rolling restart's load): every answer is tallied, `"200"` or
/// `"<status> <body>"`, and `"no answer: <error>"` when none came.
pub struct BackToBack {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<std::collections::BTreeMap<String, u64>>>,
}

impl BackToBack {
    /// `clients` connections to `api`; client `i` sends `request(i)` (a whole HTTP request).
    pub fn start(
        api: std::net::SocketAddr,
        clients: usize,
        request: impl Fn(usize) -> Vec<u8>,
    ) -> BackToBack {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let handles = (0..clients)
            .map(|i| {
                let (req, stop, answered) = (request(i), stop.clone(), answered.clone());
                std::thread::spawn(move || {
                    let mut c = Conn::open(api);
                    c.set_read_timeout(Duration::from_secs(10));
                    let mut seen = std::collections::BTreeMap::<String, u64>::new();
                    while !stop.load(Ordering::Relaxed) {
                        c.send(&req);
                        let got = match c.read_response() {
                            Ok(r) => {
                                // As any HTTP/1.1 client: the server closes after this
                                // answer (a draining router does), so the next request goes
                                // on a new connection.
                                if r.header("connection")
                                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                                {
                                    c = Conn::open(api);
                                    c.set_read_timeout(Duration::from_secs(10));
                                }
                                if r.status == 200 {
                                    "200".to_string()
                                } else {
                                    format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
                                }
                            }
                            Err(e) => {
                                c = Conn::open(api);
                                c.set_read_timeout(Duration::from_secs(10));
                                format!("no answer: {e}")
                            }
                        };
                        *seen.entry(got).or_default() += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    seen
                })
            })
            .collect();
        BackToBack {
            stop,
            answered,
            handles,
        }
    }

    /// Answers so far, of any kind.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops the clients; the tally of all of them.
    pub fn stop(self) -> std::collections::BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = std::collections::BTreeMap::new();
        for h in self.handles {
            for (k, n) in h.join().expect("client") {
                *all.entry(k).or_default() += n;
            }
        }
        all
    }
}
