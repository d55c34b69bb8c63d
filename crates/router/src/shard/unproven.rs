//! Connections in their handshake, per listener: on a link listener (internal: task links;
//! external: peer links) everything before a valid token (a TLS handshake, the upgrade head);
//! on the api listeners a client's TLS handshake (`Shard::evict_for_room` weighs those
//! against the connections waiting for a request).
//!
//! `limits.max_link_connections_per_shard` bounds what such connections can hold, but a bound
//! alone let anyone who can connect keep every slot busy: about `limit / handshake_timeout`
//! connections a second (205 at the defaults) locked every new task link and peer link out
//! until the flood stopped. As `sshd` holds unauthenticated connections apart from sessions
//! (`MaxStartups`), and as the admin listener here treats connections still waiting for their
//! head, a new connection at the limit takes the slot of the **oldest** connection still
//! without a credential, which is closed
//! (`fedbus_link_handshakes_evicted_total`). A link that proved itself (a valid service or
//! peer token) is never closed for room; with every slot held by such links, a new connection
//! is closed at accept as before. A legitimate handshake takes milliseconds, so a flood would
//! have to bring the whole limit's worth of connections within one handshake's time to cut
//! it.

use super::{Room, RoomFreed, Shard};
use crate::metrics::{Listener, ShardMetrics};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

/// At most this many connections closed for room may still be open at once, per listener:
/// a new connection at the limit is let in only for one of them, so a shard holds at most the
/// limit plus this many connections on a link listener.
pub(crate) const MAX_PENDING: usize = 16;

/// The connections of one link listener of one shard still without a credential, oldest
/// first.
pub(crate) struct Unproven {
    /// (id, when it was accepted, its mark), oldest first.
    conns: RefCell<VecDeque<(u64, Instant, Rc<Mark>)>>,
    next: Cell<u64>,
    /// Connections closed for room whose handshake has not ended yet.
    closing: Cell<usize>,
    /// Told when one of them ends.
    freed: Rc<RoomFreed>,
}

/// Set when the connection is to close for room; wakes its handshake.
#[derive(Default)]
struct Mark {
    evicted: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Unproven {
    pub(crate) fn new(freed: Rc<RoomFreed>) -> Unproven {
        Unproven {
            conns: Default::default(),
            next: Cell::new(0),
            closing: Cell::new(0),
            freed,
        }
    }

    /// Registers a connection just accepted as one without a credential.
    fn enter(self: &Rc<Self>) -> Handshake {
        let id = self.next.get();
        self.next.set(id + 1);
        let mark = Rc::new(Mark::default());
        let now = Instant::now();
        self.conns.borrow_mut().push_back((id, now, mark.clone()));
        Handshake {
            list: self.clone(),
            id,
            mark,
        }
    }

    /// When the oldest connection still in its handshake was accepted.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.conns.borrow().front().map(|(_, t, _)| *t)
    }

    /// Closes the oldest connection still without a credential: [`Room::Made`] when one was
    /// told to close (its handshake ends at its next turn and its slot frees then),
    /// [`Room::Blocked`] while [`MAX_PENDING`] closed ones have not ended yet, [`Room::None`]
    /// when none is in its handshake.
    fn evict_oldest(&self) -> Room {
        let mut conns = self.conns.borrow_mut();
        if self.closing.get() >= MAX_PENDING && !conns.is_empty() {
            return Room::Blocked;
        }
        let Some((_, _, mark)) = conns.pop_front() else {
            return Room::None;
        };
        drop(conns);
        mark.evicted.set(true);
        self.closing.set(self.closing.get() + 1);
        if let Some(w) = mark.waker.take() {
            w.wake();
        }
        Room::Made
    }
}

/// A connection's place among the unproven ones of its listener, from accept until it shows
/// a credential ([`Handshake::proven`]) or ends (dropped).
pub(crate) struct Handshake {
    list: Rc<Unproven>,
    id: u64,
    mark: Rc<Mark>,
}

/// What a handshake that was closed for room ends with.
pub(crate) const EVICTED: &str =
    "closed in its handshake: a newer connection took its slot at the listener's connection limit";

impl Shard {
    pub(crate) fn unproven(&self, kind: Listener) -> &Rc<Unproven> {
        &self.unproven[kind as usize]
    }

    /// Registers a connection just accepted on a link listener as one without a credential.
    pub(crate) fn handshake(&self, kind: Listener) -> Handshake {
        self.unproven(kind).enter()
    }

    /// At `kind`'s connection limit: closes the oldest connection of that listener still in
    /// its handshake to make room for a new one (counted and logged). See
    /// [`Unproven::evict_oldest`] for what it returns.
    pub(crate) fn evict_handshake(&self, kind: Listener) -> Room {
        let room = self.unproven(kind).evict_oldest();
        if room != Room::Made {
            return room;
        }
        if kind == Listener::Api {
            ShardMetrics::inc(&self.metrics.unfinished_evicted[0]);
            if let Some(suppressed) = self.log_gates.unfinished_evicted.pass() {
                tracing::warn!(shard = self.index, suppressed, "at limits.max_connections_per_shard: closed the connection whose TLS handshake was under way the longest");
            }
            return room;
        }
        ShardMetrics::inc(&self.metrics.handshakes_evicted[kind as usize]);
        if let Some(suppressed) = self.log_gates.handshake_evicted.pass() {
            tracing::warn!(shard = self.index, listener = ?kind, suppressed, "at limits.max_link_connections_per_shard: closed the oldest connection still in its handshake (no token shown yet) for a new one");
        }
        room
    }
}

impl Handshake {
    /// Runs `step` (a part of the handshake) unless the connection is closed for room first:
    /// then `Err(EVICTED)`, and `step` is dropped (with it the socket's pending I/O). The mark
    /// is looked at before each poll of `step`: a step whose input is ready when the mark is
    /// set does not get past it.
    pub(crate) async fn step<T>(&self, step: impl Future<Output = T>) -> Result<T, &'static str> {
        let evicted = std::future::poll_fn(|cx| {
            if self.mark.evicted.get() {
                return Poll::Ready(Err(EVICTED));
            }
            self.mark.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        });
        // `or` polls its first future first.
        futures_lite::future::or(evicted, async { Ok(step.await) }).await
    }

    /// The connection showed a valid credential: from now on it is never closed for room.
    /// `Err(EVICTED)` when it was told to close before that (it must close: its slot was given
    /// to a newer connection).
    pub(crate) fn proven(self) -> Result<(), &'static str> {
        if self.mark.evicted.get() {
            return Err(EVICTED);
        }
        Ok(())
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let list = &self.list;
        if self.mark.evicted.get() {
            list.closing.set(list.closing.get() - 1);
            list.freed.notify();
        } else {
            // Ids are handed out in order, so the queue is sorted by them.
            let mut q = list.conns.borrow_mut();
            if let Ok(at) = q.binary_search_by_key(&self.id, |(i, _, _)| *i) {
                q.remove(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now<T>(f: impl Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    /// Oldest first; a connection that proved itself, or ended, is never closed for room; a
    /// step whose input is ready when its connection is marked still ends `EVICTED`; at most
    /// [`MAX_PENDING`] closed ones may be ending at once.
    #[test]
    fn the_oldest_unproven_connection_is_closed_for_room() {
        let list = Rc::new(Unproven::new(Default::default()));
        let (a, b, c) = (list.enter(), list.enter(), list.enter());
        assert_eq!(b.proven(), Ok(()));
        drop(c);
        assert_eq!(list.evict_oldest(), Room::Made, "a is in its handshake");
        assert_eq!(now(a.step(async { 1 })), Err(EVICTED), "ready, but marked");
        assert_eq!(list.evict_oldest(), Room::None, "b proved itself, c ended");
        assert_eq!(a.proven(), Err(EVICTED));
        assert_eq!(list.closing.get(), 0, "a has ended");
        let d = list.enter();
        assert_eq!(now(d.step(async { 2 })), Ok(2), "not marked");
        drop(d);
        let held: Vec<Handshake> = (0..=MAX_PENDING).map(|_| list.enter()).collect();
        for _ in 0..MAX_PENDING {
            assert_eq!(list.evict_oldest(), Room::Made);
        }
        assert_eq!(
            list.evict_oldest(),
            Room::Blocked,
            "{MAX_PENDING} closed ones still ending"
        );
        // An accept loop waiting for room is woken when they end.
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let woken = std::sync::Arc::new(Count(Default::default()));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut freed = std::pin::pin!(list.freed.next());
        assert!(freed.as_mut().poll(&mut cx).is_pending());
        drop(held);
        assert!(woken.0.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert!(freed.as_mut().poll(&mut cx).is_ready());
        assert_eq!(list.closing.get(), 0);
        let _e = list.enter();
        assert_eq!(
            list.evict_oldest(),
            Room::Made,
            "room again once they ended"
        );
    }
}
