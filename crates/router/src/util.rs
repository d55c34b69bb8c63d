//! Small helpers shared by the layers of the router.

/// A random u64 from the OS.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
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

    /// Runs `f` for at most `d`; the future is polled before the clock.
    pub async fn within<F: std::future::Future>(
        &mut self,
        d: std::time::Duration,
        f: F,
    ) -> Result<F::Output, Elapsed> {
        let timer = match &mut self.0 {
            Some(t) => {
                t.reset(d);
                t
            }
            None => self.0.insert(glommio::timer::Timer::new(d)),
        };
        let f = std::pin::pin!(f);
        match futures_util::future::select(f, timer).await {
            futures_util::future::Either::Left((out, _)) => Ok(out),
            futures_util::future::Either::Right(_) => Err(Elapsed),
        }
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
