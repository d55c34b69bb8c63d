//! The requests in flight on one client connection, polled in place by the connection's own
//! task. Each request's future lives in a slot that is allocated the first time the connection
//! has that many requests at once and reused for every later request, so a request costs no
//! allocation (a `FuturesOrdered` allocates a node per request, `spawn_local` a task).
//!
//! Every pending future is polled each time the connection's task wakes (one waker for all):
//! a poll of a request that waits for its task is a look at its pending slot, and a connection
//! holds at most `limits.max_inflight_per_connection` of them.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// One slot: a request's future while it runs, then its output until it is taken.
enum Slot<F: Future> {
    Free,
    Running(F),
    Done(F::Output),
}

impl<F: Future> Slot<F> {
    /// Polls a running future; a finished one becomes `Done`. True when the slot is `Done`.
    fn poll_done(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        // SAFETY: the future is never moved out of its slot: it is polled in place and dropped
        // in place by `Pin::set`.
        let out = match unsafe { self.as_mut().get_unchecked_mut() } {
            Slot::Running(f) => match unsafe { Pin::new_unchecked(f) }.poll(cx) {
                Poll::Ready(o) => o,
                Poll::Pending => return false,
            },
            Slot::Done(_) => return true,
            Slot::Free => return false,
        };
        self.set(Slot::Done(out));
        true
    }

    /// The output of a `Done` slot, in place.
    fn output(self: Pin<&mut Self>) -> Option<&mut F::Output> {
        // SAFETY: only the future is pinned (`Running`); a `Done` slot's output is not, and
        // nothing is moved here.
        match unsafe { self.get_unchecked_mut() } {
            Slot::Done(o) => Some(o),
            _ => None,
        }
    }
}

/// Reusable slots for the futures of one connection.
struct Slots<F: Future> {
    slots: Vec<Pin<Box<Slot<F>>>>,
    free: Vec<usize>,
}

impl<F: Future> Slots<F> {
    fn new() -> Self {
        Slots {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Puts `f` in a free slot (a new one only when all are busy); returns its index.
    fn insert(&mut self, f: F) -> usize {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Box::pin(Slot::Free));
                self.slots.len() - 1
            }
        };
        self.slots[i].as_mut().set(Slot::Running(f));
        i
    }

    /// Drops what slot `i` holds and frees it.
    fn remove(&mut self, i: usize) {
        self.slots[i].as_mut().set(Slot::Free);
        self.free.push(i);
    }
}

/// Requests answered in the order they came (HTTP/1.1 pipelining).
pub(crate) struct Ordered<F: Future> {
    slots: Slots<F>,
    /// Busy slots, oldest first.
    order: VecDeque<usize>,
}

impl<F: Future> Ordered<F> {
    pub(crate) fn new() -> Self {
        Ordered {
            slots: Slots::new(),
            order: VecDeque::new(),
        }
    }

    /// Requests in flight (answered ones not yet taken included).
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Starts `f` after every request already in flight.
    pub(crate) fn push_back(&mut self, f: F) {
        let i = self.slots.insert(f);
        self.order.push_back(i);
    }

    /// Frees the slots when nothing is in flight (an idle connection gives its memory back);
    /// the next request allocates one again.
    pub(crate) fn give_back(&mut self) {
        if self.is_empty() {
            *self = Ordered::new();
        }
    }

    /// Drops every request in flight.
    pub(crate) fn clear(&mut self) {
        while !self.order.is_empty() {
            self.pop_front();
        }
    }

    /// Ready(true) once the oldest request is done (its output is at [`Ordered::front_mut`]
    /// until [`Ordered::pop_front`]), Ready(false) when nothing is in flight; polls the others
    /// meanwhile.
    ///
    /// The output is used where it lies and dropped there: an HTTP answer (`api::http::Done`,
    /// its size printed by the `answer_state_stays_small` test) is not copied out of its slot,
    /// through `now_or_never` and into the batch loop on its way to the write.
    pub(crate) fn poll_front(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(&front) = self.order.front() else {
            return Poll::Ready(false);
        };
        let done = self.slots.slots[front].as_mut().poll_done(cx);
        for &i in self.order.iter().skip(1) {
            self.slots.slots[i].as_mut().poll_done(cx);
        }
        match done {
            true => Poll::Ready(true),
            false => Poll::Pending,
        }
    }

    /// [`Ordered::poll_front`] as a future: ready once the oldest request is done (or none is
    /// left), or once `stop` is set after a pass over the requests (the caller looks at it).
    /// With `front` false, ready only on `stop`: the requests are polled meanwhile.
    pub(crate) fn front_or<'a>(&'a mut self, stop: &'a Cell<bool>, front: bool) -> Front<'a, F> {
        Front {
            q: self,
            stop,
            front,
        }
    }

    /// The oldest request's output, once [`Ordered::poll_front`] found it done.
    pub(crate) fn front_mut(&mut self) -> Option<&mut F::Output> {
        let &front = self.order.front()?;
        self.slots.slots[front].as_mut().output()
    }

    /// Drops the oldest request (its output, once used) and frees its slot.
    pub(crate) fn pop_front(&mut self) {
        if let Some(i) = self.order.pop_front() {
            self.slots.remove(i);
        }
    }
}

/// The future of [`Ordered::front_or`] (a named type without drop glue, so that the queue can
/// be used again as soon as the future is no longer polled).
pub(crate) struct Front<'a, F: Future> {
    q: &'a mut Ordered<F>,
    stop: &'a Cell<bool>,
    front: bool,
}

impl<F: Future> Future for Front<'_, F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let done = self.q.poll_front(cx).is_ready();
        match self.stop.get() || self.front && done {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}

/// Requests that finish in any order and deliver their answers themselves (`/api/ws`).
pub(crate) struct Unordered<F: Future<Output = ()>> {
    slots: Slots<F>,
    /// Busy slots.
    busy: Vec<usize>,
}

impl<F: Future<Output = ()>> Unordered<F> {
    pub(crate) fn new() -> Self {
        Unordered {
            slots: Slots::new(),
            busy: Vec::new(),
        }
    }

    /// Frees the slots when nothing is in flight (an idle session gives its memory back);
    /// the next request allocates one again.
    pub(crate) fn give_back(&mut self) {
        if self.busy.is_empty() {
            *self = Unordered::new();
        }
    }

    /// Starts `f`; it runs while [`Unordered::run`] is polled.
    pub(crate) fn push(&mut self, f: F) {
        let i = self.slots.insert(f);
        self.busy.push(i);
    }

    /// Polls every request, freeing the finished ones; Ready when none is left.
    pub(crate) fn poll_all(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut k = 0;
        while k < self.busy.len() {
            let i = self.busy[k];
            if self.slots.slots[i].as_mut().poll_done(cx) {
                self.busy.swap_remove(k);
                self.slots.remove(i);
            } else {
                k += 1;
            }
        }
        if self.busy.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Runs the requests in flight, calling `before_pass` before each pass over them; never
    /// completes (select it against something else).
    pub(crate) async fn run(&mut self, mut before_pass: impl FnMut()) -> std::convert::Infallible {
        std::future::poll_fn(|cx| {
            before_pass();
            let _ = self.poll_all(cx);
            Poll::Pending
        })
        .await
    }

    /// Runs the requests in flight until none is left.
    #[cfg(test)]
    async fn finish(&mut self) {
        std::future::poll_fn(|cx| self.poll_all(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::rc::Rc;

    /// A future that is ready once its flag is set.
    fn gate(flag: Rc<Cell<bool>>, v: u32) -> impl Future<Output = u32> {
        std::future::poll_fn(move |_| {
            if flag.get() {
                Poll::Ready(v)
            } else {
                Poll::Pending
            }
        })
    }

    #[test]
    fn ordered_answers_in_order_and_reuses_slots() {
        let flags: Vec<_> = (0..3).map(|_| Rc::new(Cell::new(false))).collect();
        let mut q = Ordered::new();
        for (i, f) in flags.iter().enumerate() {
            q.push_back(gate(f.clone(), i as u32));
        }
        // The oldest output once it is done (taken and freed), None when nothing is in flight.
        fn next<F: Future<Output = u32>>(q: &mut Ordered<F>) -> Option<Option<u32>> {
            q.front_or(&Cell::new(false), true).now_or_never()?;
            let out = q.front_mut().copied();
            q.pop_front();
            Some(out)
        }
        flags[2].set(true);
        flags[1].set(true);
        assert_eq!(next(&mut q), None, "the oldest is not done");
        assert_eq!(q.front_mut(), None);
        flags[0].set(true);
        assert_eq!(next(&mut q), Some(Some(0)));
        assert_eq!(next(&mut q), Some(Some(1)));
        assert_eq!(next(&mut q), Some(Some(2)));
        assert_eq!(next(&mut q), Some(None));
        q.push_back(gate(flags[0].clone(), 7));
        assert_eq!(q.slots.slots.len(), 3, "a free slot is reused");
        q.clear();
        assert!(q.is_empty());
    }

    #[test]
    fn unordered_frees_finished_slots() {
        let flags: Vec<_> = (0..2).map(|_| Rc::new(Cell::new(false))).collect();
        let done = Rc::new(Cell::new(0));
        let mut q = Unordered::new();
        for f in &flags {
            let (f, d) = (f.clone(), done.clone());
            q.push(async move {
                gate(f, 0).await;
                d.set(d.get() + 1);
            });
        }
        flags[1].set(true);
        assert_eq!(q.finish().now_or_never(), None);
        assert_eq!(done.get(), 1);
        flags[0].set(true);
        assert_eq!(q.finish().now_or_never(), Some(()));
        assert_eq!(done.get(), 2);
    }
}
