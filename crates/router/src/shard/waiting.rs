//! The client connections of a shard that wait for a request, in the order of how long they
//! have waited: what the accept loop closes, oldest first, to make room at
//! `limits.max_connections_per_shard` ([`super::Shard::evict_for_room`]).
//!
//! A connection is queued each time it starts to wait with a new age
//! ([`super::IdleSlot::waiting_since`]), and its older entries go stale; stale entries are
//! dropped when they reach the front, and all at once when they would outnumber the
//! connections twice over (a compaction, whose cost is shared by the pushes that made them). So
//! the oldest waiting connection is found in amortized constant time, where a scan of every
//! connection of the shard cost up to `limits.max_connections_per_shard` steps for each new
//! connection at the limit. nginx keeps its reusable connections in a queue in the same way.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use super::IdleSlot;

/// Stale entries kept beyond two per registered connection before a compaction.
const SLACK: usize = 64;

#[derive(Default)]
pub(crate) struct Waiting {
    /// (waiting since, connection), sorted by the time (equal times in the order queued). An
    /// entry is current while its connection's `queued` holds its time and it was not chosen
    /// to close (`evicted`); a connection has at most one current entry.
    queue: RefCell<VecDeque<(Instant, Rc<IdleSlot>)>>,
}

impl Waiting {
    /// Queues `slot` when it waits and is not queued already with the age it waits with.
    /// `registered`: the connections of the shard, which bounds the stale entries kept.
    pub(crate) fn note(&self, slot: &Rc<IdleSlot>, registered: usize) {
        let Some(since) = slot.waiting_since() else {
            return;
        };
        // Chosen to close already (a drain's choice: it finishes a head that raced in).
        if slot.queued.get() == Some(since) || slot.evicted.get() {
            return;
        }
        slot.queued.set(Some(since));
        let mut q = self.queue.borrow_mut();
        // A connection starts to wait now, so its time is almost always the latest; a new
        // connection's age runs from its accept, which may be before others started to wait
        // (a TLS one's handshake came between).
        match q.back() {
            Some((last, _)) if *last > since => {
                let at = q.partition_point(|(t, _)| *t <= since);
                q.insert(at, (since, slot.clone()));
            }
            _ => q.push_back((since, slot.clone())),
        }
        let bound = 2 * registered + SLACK;
        if q.len() > bound {
            q.retain(|(t, s)| current(*t, s));
            // After a wave of connections has gone, give its room back (never at a steady
            // number of connections, where the room stays below twice the bound).
            if q.capacity() > 4 * bound {
                q.shrink_to(2 * bound);
            }
        }
    }

    /// The connection that has waited the longest and was not chosen yet, with the time it
    /// waits since. A queued connection that is busy now (a read came and is being handled)
    /// leaves the queue, and is queued again when it waits again.
    pub(crate) fn oldest(&self) -> Option<(Instant, Rc<IdleSlot>)> {
        let mut q = self.queue.borrow_mut();
        while let Some((since, slot)) = q.front() {
            if current(*since, slot) {
                if slot.waiting_since() == Some(*since) {
                    return Some((*since, slot.clone()));
                }
                slot.queued.set(None);
            }
            q.pop_front();
        }
        None
    }

    /// Entries queued, stale ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.borrow().len()
    }
}

/// Whether an entry queued at `since` for `slot` is its connection's current one.
fn current(since: Instant, slot: &IdleSlot) -> bool {
    slot.queued.get() == Some(since) && !slot.evicted.get()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Oldest wait first, whatever order the connections started to wait in; a busy
    /// connection is skipped and found again once it waits again; one chosen or gone is never
    /// returned; and a connection that goes idle and busy again and again leaves a bounded
    /// number of stale entries behind.
    #[test]
    fn the_connection_waiting_longest_comes_first() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let w = Waiting::default();
        // A keep-alive connection idle since 10 ms.
        let idle = Rc::new(IdleSlot::new(at(0)));
        idle.set_served();
        idle.since.set(Some(at(10)));
        w.note(&idle, 3);
        // A new connection accepted at 5 ms (its TLS handshake ended later): queued after the
        // idle one, but older.
        let new = Rc::new(IdleSlot::new(at(5)));
        new.since.set(Some(at(20)));
        w.note(&new, 3);
        w.note(&new, 3);
        assert_eq!(w.len(), 2, "noted twice with one age: queued once");
        let (since, first) = w.oldest().expect("two wait");
        assert_eq!(since, at(5));
        assert!(
            Rc::ptr_eq(&first, &new),
            "the new connection waits since its accept"
        );
        // Busy now (its request came): skipped, and queued again when it waits again.
        new.since.set(None);
        let (since, _) = w.oldest().expect("the idle one");
        assert_eq!(since, at(10));
        new.set_head(Some(at(30)));
        w.note(&new, 3);
        assert_eq!(
            w.oldest().map(|(t, _)| t),
            Some(at(5)),
            "waits again, same age"
        );
        // Chosen to close: never returned again.
        new.evicted.set(true);
        assert_eq!(w.oldest().map(|(t, _)| t), Some(at(10)));
        // A third connection that goes idle and busy 10 000 times, each wait newer.
        let busy = Rc::new(IdleSlot::new(at(0)));
        busy.set_served();
        for i in 0..10_000 {
            busy.since.set(Some(at(100 + i)));
            w.note(&busy, 3);
            busy.since.set(None);
        }
        assert!(
            w.len() <= 2 * 3 + SLACK,
            "stale entries are bounded: {}",
            w.len()
        );
        assert_eq!(
            w.oldest().map(|(t, _)| t),
            Some(at(10)),
            "the idle one still first"
        );
        // Gone (its connection ended, `KeepAlive::drop`): stale.
        idle.queued.set(None);
        busy.since.set(Some(at(20_000)));
        w.note(&busy, 3);
        assert_eq!(w.oldest().map(|(t, _)| t), Some(at(20_000)));
    }
}
