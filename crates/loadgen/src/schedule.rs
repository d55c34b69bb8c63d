//! The open-loop schedule: when each request of a connection is *meant* to be sent.
//!
//! Latency in open-loop mode is measured from these intended times, not from the moment the
//! request actually left, so a stall of the system under test (or of the load generator) is
//! charged to every request that should have gone out during it: coordinated omission is
//! corrected. Pure: time is passed in as nanoseconds since the run's start.

/// Intended send times of one connection: `offset + k * interval` for k = 0, 1, 2, ...
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Schedule {
    interval_ns: f64,
    offset_ns: f64,
    next: u64,
}

impl Schedule {
    /// Connection `index` of `connections`, sharing `rate` requests/s over all of them. The
    /// connections are staggered evenly within one interval so that the aggregate arrivals are
    /// evenly spaced rather than in bursts of `connections`.
    pub(crate) fn new(rate: f64, connections: usize, index: usize) -> Schedule {
        let per_conn = rate / connections.max(1) as f64;
        let interval_ns = 1e9 / per_conn;
        Schedule {
            interval_ns,
            offset_ns: interval_ns * index as f64 / connections.max(1) as f64,
            next: 0,
        }
    }

    /// Intended send time of request `k`.
    pub(crate) fn intended(&self, k: u64) -> u64 {
        (self.offset_ns + k as f64 * self.interval_ns) as u64
    }

    /// Intended time of the next request not yet taken.
    pub(crate) fn peek(&self) -> u64 {
        self.intended(self.next)
    }

    /// Takes the next request if it is due at `now_ns`, returning its intended time.
    pub(crate) fn take_due(&mut self, now_ns: u64) -> Option<u64> {
        let t = self.peek();
        if t <= now_ns {
            self.next += 1;
            Some(t)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_and_staggered() {
        // 1000 req/s over 4 connections: 250/s each, 4 ms apart, offsets 0,1,2,3 ms.
        let s0 = Schedule::new(1000.0, 4, 0);
        let s3 = Schedule::new(1000.0, 4, 3);
        assert_eq!(s0.intended(0), 0);
        assert_eq!(s0.intended(1), 4_000_000);
        assert_eq!(s0.intended(10), 40_000_000);
        assert_eq!(s3.intended(0), 3_000_000);
        assert_eq!(s3.intended(2), 11_000_000);
    }

    #[test]
    fn late_sender_catches_up_with_original_times() {
        let mut s = Schedule::new(1000.0, 1, 0);
        // The sender was stalled until 3.5 ms: four requests are due, each keeps its own
        // intended time (0, 1, 2, 3 ms) so their latency includes the stall.
        let mut due = Vec::new();
        while let Some(t) = s.take_due(3_500_000) {
            due.push(t);
        }
        assert_eq!(due, vec![0, 1_000_000, 2_000_000, 3_000_000]);
        assert_eq!(s.take_due(3_999_999), None);
        assert_eq!(s.peek(), 4_000_000);
        assert_eq!(s.take_due(4_000_000), Some(4_000_000));
    }
}
