//! Gives the memory that connections freed back to the kernel (`tuning.memory_trim_ms`).
//!
//! glibc's malloc keeps what is freed for the next allocations: after a wave of connections
//! has closed, or has gone idle and given its buffers back (`tuning.idle_buffer_release_ms`),
//! the router's resident set stays at the wave's high-water mark. `malloc_trim(0)` walks every
//! arena (each shard thread has its own) and returns the free pages to the kernel
//! (`madvise(MADV_DONTNEED)`). A thread of its own calls it, at most once per interval and only
//! after at least [`TRIM_AFTER_FREED`] connections closed or gave their buffers back since the
//! last call, so a steady load never pays for it.

use crate::metrics::Registry;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Connections closed or idle-released since the last trim that make the next one worth it:
/// at about 15 KiB each (docs/ARCHITECTURE.md, "Memory per idle connection"), 15 MiB.
pub(crate) const TRIM_AFTER_FREED: u64 = 1000;

/// Client connections closed and idle releases so far, all shards: both only grow, so a wave
/// that comes and goes between two samples still counts.
fn sample(metrics: &Registry) -> u64 {
    metrics.iter().fold(0, |n, m| {
        n + m.api_closed.load(Ordering::Relaxed) + m.idle_buffers_released.load(Ordering::Relaxed)
    })
}

/// What the trimmer has seen since its last trim.
#[derive(Debug)]
pub(crate) struct Trimmer {
    /// [`sample`] at the last trim (or at the start).
    freed_at_trim: u64,
    last: Option<Instant>,
    every: Duration,
}

impl Trimmer {
    pub(crate) fn new(every: Duration, freed: u64) -> Trimmer {
        Trimmer {
            freed_at_trim: freed,
            last: None,
            every,
        }
    }

    /// Called on each sample: true when a trim is due now.
    pub(crate) fn due(&mut self, now: Instant, freed: u64) -> bool {
        let waited = self
            .last
            .is_none_or(|t| now.duration_since(t) >= self.every);
        if freed.saturating_sub(self.freed_at_trim) < TRIM_AFTER_FREED || !waited {
            return false;
        }
        self.freed_at_trim = freed;
        self.last = Some(now);
        true
    }
}

/// Resident set of this process, KiB (0 when `/proc` cannot tell).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

/// Starts the trimmer thread (`every` zero: none). It samples the shards' counters once a
/// second.
pub(crate) fn spawn(metrics: Registry, every: Duration) -> std::io::Result<()> {
    if every.is_zero() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("fedbus-trim".into())
        .spawn(move || {
            let mut t = Trimmer::new(every, sample(&metrics));
            loop {
                std::thread::sleep(Duration::from_secs(1).min(every));
                if !t.due(Instant::now(), sample(&metrics)) {
                    continue;
                }
                let (before, start) = (rss_kib(), Instant::now());
                trim();
                tracing::info!(
                    rss_before_kib = before,
                    rss_after_kib = rss_kib(),
                    took_us = start.elapsed().as_micros() as u64,
                    "memory trimmed: freed connection memory given back to the kernel"
                );
            }
        })?;
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each arena in turn).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_enough_connections_went_and_not_more_often_than_asked() {
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut t = Trimmer::new(every, 0);
        // Fewer than TRIM_AFTER_FREED closed or released: not due.
        assert!(!t.due(t0, 999));
        // Enough: due.
        assert!(t.due(t0 + Duration::from_secs(1), 2000));
        // As many again one second later: within the interval.
        assert!(!t.due(t0 + Duration::from_secs(2), 4000));
        // After the interval: what was freed meanwhile still counts.
        assert!(t.due(t0 + Duration::from_secs(11), 4000));
        // Steady: nothing freed, never due.
        assert!(!t.due(t0 + Duration::from_secs(30), 4500));
        assert!(t.due(t0 + Duration::from_secs(31), 5000));
    }

    #[test]
    fn a_trim_does_not_disturb_the_heap() {
        let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 16 << 10]).collect();
        drop(v);
        trim();
        let w = vec![7u8; 1 << 20];
        assert!(w.iter().all(|b| *b == 7));
        assert!(rss_kib() > 0);
    }
}
