//! Random numbers for task ids and backoff jitter, from std's randomly keyed SipHash (no extra
//! crate; nothing here is a secret).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A random u64 (not for secrets).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

/// A random task instance id below 2^53 (so JSON readers that use doubles keep it exact).
pub fn random_task_id() -> u64 {
    random_u64() & ((1 << 53) - 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_differ_and_fit_a_double() {
        let a: Vec<u64> = (0..64).map(|_| super::random_task_id()).collect();
        assert!(a.iter().all(|v| *v < 1 << 53));
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(a.len(), b.len());
    }
}
