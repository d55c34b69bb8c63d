//! Small helpers shared by the layers of the router.

/// A random u64 from the OS.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
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
pub struct Deadline(Option<glommio::timer::Timer>);

/// The wait of [`Deadline::within`] ran out.
#[derive(Debug)]
pub struct Elapsed;

impl Deadline {
    /// No timer yet: it is created at the first wait (an executor must be running then).
    pub const fn new() -> Self {
        Deadline(None)
    }

    /// Runs `f` for at most `d`. The future is polled first, and the timer is armed only when
    /// it is pending: most waits end at once (a write the socket takes, bytes already read),
    /// and those read no clock and touch no timer (arming is a clock read and a timer-tree
    /// insert; at 8x8 pipelined every answer batch and read came here).
    pub async fn within<F: std::future::Future>(
        &mut self,
        d: std::time::Duration,
        f: F,
    ) -> Result<F::Output, Elapsed> {
        use std::future::Future;
        use std::task::Poll;
        let mut f = std::pin::pin!(f);
        let mut armed = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let timer = match &mut self.0 {
                Some(t) if armed => t,
                Some(t) => {
                    t.reset(d);
                    t
                }
                None => self.0.insert(glommio::timer::Timer::new(d)),
            };
            armed = true;
            std::pin::Pin::new(timer).poll(cx).map(|_| Err(Elapsed))
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

#[cfg(test)]
mod tests {
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
