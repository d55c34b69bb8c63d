//! Small helpers shared by the layers of the router.

/// A random u64 from the OS.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// At most the first 200 bytes of `s` (cut at a character boundary), for a log line that
/// quotes what another side sent (an origin, a claim, a peer's words): log it with `?` so that
/// its control characters and line breaks are escaped.
pub fn clipped(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bytes a socket still holds to send (written, not yet acknowledged by the other side:
/// `SIOCOUTQ`); 0 when it cannot say.
pub fn unsent_bytes(fd: std::os::fd::RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int; `fd` is open while its owner holds it.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Seconds since the Unix epoch from `CLOCK_REALTIME_COARSE`: the kernel's last tick (at most
/// a few milliseconds old), read from the vDSO page without the TSC. For whole-second checks
/// on the request path (a token's `exp`), where `SystemTime::now()` was 0.6-0.7% of a shard's
/// CPU at 8x8 pipelined (perf, `fedbus bench --connections 8 --inflight 8`).
pub fn unix_secs_coarse() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc == 0 && ts.tv_sec > 0 {
        ts.tv_sec as u64
    } else {
        crate::auth::now_unix()
    }
}

/// A connection's one timer, armed again for each wait: `glommio::timer::timeout` creates (and
/// allocates) a timer per call, which on a keep-alive connection is once or twice per request.
/// The waits of one connection never overlap, so one timer serves all of them.
pub struct Deadline {
    timer: Option<glommio::timer::Timer>,
    /// When the timer, as last registered with the reactor, fires (None: never registered).
    /// It may be left registered after its wait ended: it then fires early for a later wait,
    /// whose poll arms it again for what is left.
    fires: Option<std::time::Instant>,
}

/// The wait of [`Deadline::within`] ran out.
#[derive(Debug)]
pub struct Elapsed;

impl Deadline {
    /// No timer yet: it is created at the first wait (an executor must be running then).
    pub const fn new() -> Self {
        Deadline {
            timer: None,
            fires: None,
        }
    }

    /// Runs `f` for at most `d`. The future is polled first, and the timer is armed only when
    /// it is pending: most waits end at once (a write the socket takes, bytes already read),
    /// and those read no clock and touch no timer (arming is a clock read and a timer-tree
    /// insert; at 8x8 pipelined every answer batch and read came here).
    ///
    /// A timer still registered from an earlier wait that fires no later than this wait's
    /// end is left as it is (the reactor's timer tree is not touched): on a keep-alive
    /// connection each request's idle wait would otherwise move the timer, a remove and an
    /// insert. When it fires before this wait's end, the wake finds the time not up yet and
    /// arms the timer for the rest. The connection's task is then woken once more per
    /// timeout period at most; every wait still ends on time.
    pub async fn within<F: std::future::Future>(
        &mut self,
        d: std::time::Duration,
        f: F,
    ) -> Result<F::Output, Elapsed> {
        self.within_lazy(|| d, f).await
    }

    /// [`Deadline::within`], the time allowed worked out by `d` only if `f` does not end at
    /// its first poll (a write blocked on a full socket asks the socket what it still holds).
    pub async fn within_lazy<F: std::future::Future>(
        &mut self,
        d: impl FnOnce() -> std::time::Duration,
        f: F,
    ) -> Result<F::Output, Elapsed> {
        use std::future::Future;
        use std::task::Poll;
        let mut f = std::pin::pin!(f);
        let mut due: Option<std::time::Instant> = None;
        let mut d = Some(d);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let now = std::time::Instant::now();
            let due =
                *due.get_or_insert_with(|| now + d.take().map_or(Default::default(), |d| d()));
            if now >= due {
                return Poll::Ready(Err(Elapsed));
            }
            if self.fires.is_some_and(|t| now < t && t <= due) {
                // Registered, and it wakes this task in time.
                return Poll::Pending;
            }
            let left = due - now;
            let timer = match &mut self.timer {
                Some(t) => {
                    t.reset(left);
                    t
                }
                None => self.timer.insert(glommio::timer::Timer::new(left)),
            };
            self.fires = Some(due);
            // Registers it with this task's waker (`due` is still ahead).
            match std::pin::Pin::new(timer).poll(cx) {
                Poll::Ready(_) => Poll::Ready(Err(Elapsed)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Waits `d`.
    pub async fn sleep(&mut self, d: std::time::Duration) {
        let _ = self.within(d, std::future::pending::<()>()).await;
    }
}

impl Default for Deadline {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts events in windows of a fixed length (the first event opens a window, the first
/// after it ends opens the next): [`Rate::over`] says when one window holds more than `max`.
/// The bound of pings and pongs on a websocket (1 s windows) and of status messages on a peer
/// link (10 s windows, so that a backlog after a stalled read passes).
#[derive(Debug)]
pub struct Rate {
    max: u32,
    window: std::time::Duration,
    current: Option<(std::time::Instant, u32)>,
}

impl Rate {
    /// At most `max` events a second (`u32::MAX`: no bound, and no clock read).
    pub fn per_second(max: u32) -> Rate {
        Rate::per(max, std::time::Duration::from_secs(1))
    }

    /// At most `max` events in each `window`.
    pub fn per(max: u32, window: std::time::Duration) -> Rate {
        Rate {
            max,
            window,
            current: None,
        }
    }

    /// Counts one event; true when its window now holds more than `max`.
    pub fn over(&mut self) -> bool {
        if self.max == u32::MAX {
            return false;
        }
        let now = std::time::Instant::now();
        let (start, n) = match self.current {
            Some((start, n)) if now.duration_since(start) < self.window => (start, n + 1),
            _ => (now, 1),
        };
        self.current = Some((start, n));
        n > self.max
    }
}

/// At most [`LogGate::LINES_PER_SEC`] log lines a second (per shard) for one kind of event
/// that a client or a peer can repeat at will: a refusal, a failed handshake. Log lines go to
/// a stderr all shards share, one write each, which blocks when whatever reads it falls
/// behind: a flood of such events must not become a flood of lines that stalls the shard.
/// The lines held back are counted and the next line written says how many (`suppressed`);
/// the event's own counter counts every one.
#[derive(Debug)]
pub struct LogGate {
    rate: std::cell::RefCell<Rate>,
    suppressed: std::cell::Cell<u64>,
}

impl Default for LogGate {
    fn default() -> Self {
        LogGate {
            rate: std::cell::RefCell::new(Rate::per_second(LogGate::LINES_PER_SEC)),
            suppressed: std::cell::Cell::new(0),
        }
    }
}

impl LogGate {
    /// Lines a second a gate lets through.
    pub const LINES_PER_SEC: u32 = 10;

    /// Some(the lines held back since the last one let through) when this line may be
    /// written; None when it is held back (and counted).
    pub fn pass(&self) -> Option<u64> {
        if self.rate.borrow_mut().over() {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        Some(self.suppressed.replace(0))
    }
}

/// The [`LogGate`]s of one shard, one per kind of line.
#[derive(Debug, Default)]
pub struct LogGates {
    /// A request or an `/api/ws` session refused for its `Origin`.
    pub origin_refused: LogGate,
    /// A connection refused at its listener's per-shard limit.
    pub connection_refused: LogGate,
    /// A link listener's connection closed in its handshake for a newer one.
    pub handshake_evicted: LogGate,
    /// A client connection closed in its TLS handshake or request head for a newer one.
    pub unfinished_evicted: LogGate,
    /// A client connection closed for room answered `503 too_many_connections`.
    pub evicted_answered: LogGate,
    /// A client's TLS handshake failed (`listen.api_tls`).
    pub tls_failed: LogGate,
    /// A peer link refused (its TLS, its token, its certificate).
    pub peer_refused: LogGate,
    /// An idle keep-alive connection closed for room.
    pub idle_evicted: LogGate,
    /// A client websocket session closed for what it sent (1002, 1003, 1007, 1008, 1009).
    pub ws_closed: LogGate,
    /// A request head or body that did not come in time (408).
    pub request_timeout: LogGate,
    /// A request body (HTTP or `/api/ws`) refused over the memory budget or its
    /// connection's share.
    pub overload_refused: LogGate,
}

#[cfg(test)]
mod tests {
    /// A gate lets [`super::LogGate::LINES_PER_SEC`] lines through in a second, holds the
    /// rest back, and the next line let through says how many were.
    #[test]
    fn a_log_gate_holds_lines_back_past_its_rate_and_counts_them() {
        let g = super::LogGate::default();
        let n = super::LogGate::LINES_PER_SEC as usize;
        let passed: Vec<Option<u64>> = (0..n + 5).map(|_| g.pass()).collect();
        assert!(passed[..n].iter().all(|p| *p == Some(0)), "{passed:?}");
        assert!(passed[n..].iter().all(Option::is_none), "{passed:?}");
        // A new window: the first line says how many were held back.
        *g.rate.borrow_mut() = super::Rate::per_second(super::LogGate::LINES_PER_SEC);
        assert_eq!(g.pass(), Some(5));
        assert_eq!(g.pass(), Some(0));
    }

    /// What a socket still holds to send is what the other side has not read (and acked): a
    /// blocked write's pace counts it.
    #[test]
    fn unsent_bytes_are_what_the_peer_has_not_taken() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        assert_eq!(super::unsent_bytes(a.as_raw_fd()), 0);
        a.write_all(&[7; 1000]).unwrap();
        let mut got = [0u8; 1000];
        b.read_exact(&mut got).unwrap();
        // A reader that stops reading: its window fills, then the writer's queue does.
        a.set_nonblocking(true).unwrap();
        let chunk = [1u8; 65536];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match a.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(super::unsent_bytes(a.as_raw_fd()) > 0, "sent {sent}");
        assert_eq!(super::unsent_bytes(-1), 0, "no socket: 0");
    }

    #[test]
    fn words_from_the_wire_are_clipped_for_the_log_at_a_character_boundary() {
        assert_eq!(super::clipped("short"), "short");
        let long = "é".repeat(150); // 300 bytes
        let c = super::clipped(&long);
        assert_eq!(c.len(), 200);
        assert!(long.starts_with(c));
        let odd = format!("a{long}"); // byte 200 falls inside a character
        assert_eq!(super::clipped(&odd).len(), 199);
    }

    /// The `max + 1`th event in a window is over; a window that ended starts the count over.
    #[test]
    fn rate_counts_in_windows() {
        let mut p = super::Rate::per_second(3);
        assert_eq!(
            [p.over(), p.over(), p.over(), p.over()],
            [false, false, false, true]
        );
        std::thread::sleep(std::time::Duration::from_millis(1_050));
        assert!(!p.over(), "a new window");
        let mut none = super::Rate::per_second(u32::MAX);
        assert!((0..10_000).all(|_| !none.over()));
    }

    /// Every wait of one `Deadline` ends on time, never early: a shorter wait after a longer
    /// one (the timer moves earlier), a longer wait after a shorter one (the registered timer
    /// fires early and is armed again for the rest), and a wait whose future finishes.
    #[test]
    fn each_wait_ends_after_its_own_duration() {
        use std::time::{Duration, Instant};
        let ms = Duration::from_millis;
        let out = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let mut d = super::Deadline::new();
                let sleep = |t| glommio::timer::sleep(ms(t));
                let mut waits = Vec::new();
                let mut answered = Vec::new();
                // Each pair: a wait that its future ends first (it leaves the timer
                // registered), then one that runs out: longer (the timer fires early and is
                // armed again), then much shorter (the timer moves earlier).
                for (first, want) in [(60, 150), (5_000, 40), (30, 20)] {
                    answered.push(d.within(ms(first), sleep(10)).await.is_ok());
                    let t = Instant::now();
                    let r = d.within(ms(want), std::future::pending::<()>()).await;
                    waits.push((ms(want), t.elapsed(), r.is_err()));
                }
                (waits, answered)
            })
            .expect("executor")
            .join()
            .expect("joined");
        for (want, took, timed_out) in out.0 {
            assert!(timed_out);
            assert!(took >= want, "ended after {took:?}, before {want:?}");
            assert!(took < want + ms(2_000), "ended after {took:?} for {want:?}");
        }
        assert_eq!(out.1, [true; 3]);
    }

    /// A task that I/O woke runs before its executor sleeps again, even when a preemption falls
    /// due just after the reactor collected that I/O. The vendored glommio used to park then
    /// (docs/ARCHITECTURE.md, "Lost wake-ups"): the sleep counted no task woken in its own pass,
    /// and with no other latency-ring completion to end it (its link poll spent by an earlier
    /// one, the executor having spun since) it lasted until the next timer or I/O. With one
    /// connection and one request in flight neither came, and the client waited for ever. A
    /// 20 us preemption period and an executor that spins between requests make that race
    /// frequent: the old code failed this test in each of 3 runs (round trips 600, 2380,
    /// 4749), the fixed one passes. The read timeout turns the lost wake-up into a failure
    /// instead of a hang.
    #[test]
    fn a_woken_task_runs_before_its_executor_sleeps_again() {
        use std::io::{Read, Write};
        use std::time::Duration;
        const ROUND_TRIPS: usize = 50_000;
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let _server = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .preempt_timer(Duration::from_micros(20))
            .spin_before_park(Duration::from_micros(500))
            .spawn(move || async move {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send");
                let mut s = listener.accept().await.expect("accept");
                let mut buf = [0u8; 64];
                use futures_lite::{AsyncReadExt, AsyncWriteExt};
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .expect("executor");
        let addr = addr_rx.recv().expect("address");
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut back = [0u8; 64];
        for i in 0..ROUND_TRIPS {
            let req = [(i % 251) as u8; 64];
            c.write_all(&req).expect("send");
            if let Err(e) = c.read_exact(&mut back) {
                panic!(
                    "round trip {i} of {ROUND_TRIPS}: no answer within 20 s ({e}): a lost wake-up"
                );
            }
            assert_eq!(back, req);
        }
    }

    #[test]
    fn the_coarse_unix_clock_agrees_with_the_system_clock() {
        let before = crate::auth::now_unix();
        let coarse = super::unix_secs_coarse();
        let after = crate::auth::now_unix();
        // The coarse clock lags by at most a tick, so it may still show the previous second.
        assert!(
            coarse + 1 >= before && coarse <= after,
            "{before} {coarse} {after}"
        );
    }
}
