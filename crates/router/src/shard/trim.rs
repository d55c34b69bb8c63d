//! Gives the memory that connections freed back to the kernel (`tuning.memory_trim_ms`).
//!
//! glibc's malloc keeps what is freed for the next allocations: after a wave of connections
//! has closed, the router's resident set stays at the wave's high-water mark. `malloc_trim(0)`
//! walks every arena (each shard thread has its own) and returns the free pages to the kernel
//! (`madvise(MADV_DONTNEED)`). A thread of its own calls it, at most once per interval and only
//! once the client connections open have fallen by at least [`TRIM_AFTER_FREED`] from their
//! highest point since the last call. Each shard keeps its own highest point as connections
//! open (`api_open_peak`), so a wave that comes and goes between two samples still counts;
//! a steady load (as many connections opening as closing, clients idling and waking) never
//! pays for a trim.

use crate::metrics::{Listener, Registry};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How far the connections open must fall from their highest point for a trim: at about
/// 15 KiB each (docs/ARCHITECTURE.md, "Memory per idle connection"), 15 MiB.
pub(crate) const TRIM_AFTER_FREED: u64 = 1000;

/// Client connections open now and the most open at once since the last sample (each shard's
/// highest point, reset to what is open now), all shards.
fn sample(metrics: &Registry) -> (u64, u64) {
    metrics.iter().fold((0, 0), |(open, peak), m| {
        let now = m.connections[Listener::Api as usize].load(Ordering::Relaxed);
        let high = m.api_open_peak.swap(now, Ordering::Relaxed).max(now);
        (open + now, peak + high)
    })
}

/// What the trimmer has seen since its last trim.
#[derive(Debug)]
pub(crate) struct Trimmer {
    /// The most connections open at once since the last trim.
    peak: u64,
    last: Option<Instant>,
    every: Duration,
}

impl Trimmer {
    pub(crate) fn new(every: Duration) -> Trimmer {
        Trimmer {
            peak: 0,
            last: None,
            every,
        }
    }

    /// Called on each sample (connections open now, the most open since the last sample):
    /// true when a trim is due now.
    pub(crate) fn due(&mut self, now: Instant, (open, peak): (u64, u64)) -> bool {
        self.peak = self.peak.max(peak).max(open);
        let waited = self
            .last
            .is_none_or(|t| now.duration_since(t) >= self.every);
        if self.peak - open < TRIM_AFTER_FREED || !waited {
            return false;
        }
        self.peak = open;
        self.last = Some(now);
        true
    }
}

/// Resident set of this process, KiB (0 when `/proc` cannot tell).
fn rss_kib() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page / 1024)
}

/// Starts the trimmer thread (`every` zero: none). It samples the shards' counters once a
/// second (an interval under a second acts as one second).
pub(crate) fn spawn(metrics: Registry, every: Duration) -> std::io::Result<()> {
    if every.is_zero() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("fedbus-trim".into())
        .spawn(move || {
            let mut t = Trimmer::new(every);
            loop {
                std::thread::sleep(Duration::from_secs(1));
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
        let mut t = Trimmer::new(every);
        // A wave of 4000 comes and goes between two samples: the shards' peak saw it.
        assert!(t.due(t0, (0, 4000)));
        // Another within the interval: not yet.
        assert!(!t.due(t0 + Duration::from_secs(2), (0, 4000)));
        // After the interval: the wave still counts.
        assert!(t.due(t0 + Duration::from_secs(11), (0, 0)));
        // Steady: 3000 open, as many opening as closing: the peak is what is open; never due.
        assert!(!t.due(t0 + Duration::from_secs(30), (3000, 3000)));
        assert!(!t.due(t0 + Duration::from_secs(31), (3000, 3100)));
        // 999 fewer: not enough. 1000 fewer than the highest point: due.
        assert!(!t.due(t0 + Duration::from_secs(32), (2101, 2101)));
        assert!(t.due(t0 + Duration::from_secs(33), (2100, 2100)));
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
