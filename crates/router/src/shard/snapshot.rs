//! A shard's handle on the snapshots the control thread publishes (routing table, keys, apps,
//! federation view).
//!
//! `ArcSwap::load` costs two atomic read-modify-writes (a debt slot taken with a `SeqCst`
//! store, paid back with a compare-exchange when the guard drops); a request loads three or
//! four snapshots. A shard is one thread, so it keeps the `Arc` it last saw and only compares
//! pointers: `arc_swap::Cache` (one relaxed load) and an `Rc` around the cached `Arc` (a
//! non-atomic count), taken again only when the control thread published a new one.
//! `cargo bench -p fedbus-router --features bench --bench micro` times both beside a routing
//! table lookup ("routing" rows; `benches/results/micro-2026-12-05-s30-vm.md`: 27.0 ns with
//! `ArcSwap::load`, 12.8 ns with [`Local::load`], 12.3 ns for the lookup alone).
//!
//! A snapshot stays alive until this shard's next load of it after a new one was published,
//! or until the last holder on the shard drops it; never longer.

use crate::control::Snapshots;
use arc_swap::{ArcSwap, Cache};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// One published snapshot as this shard sees it.
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub struct Local<T> {
    seen: RefCell<Seen<T>>,
}

/// The cache of the shared snapshot and the shard's handle on the same version.
struct Seen<T> {
    cache: Cache<Arc<ArcSwap<T>>, Arc<T>>,
    now: Held<T>,
}

/// A version of a snapshot held on the shard: cloned and dropped with a non-atomic count.
// The lint's premise (one allocation would do) does not hold: the `Arc` is shared with the
// control thread and the other shards, the `Rc` is this shard's own count on it.
#[allow(clippy::redundant_allocation)]
#[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
pub struct Held<T>(Rc<Arc<T>>);

impl<T> Clone for Held<T> {
    fn clone(&self) -> Self {
        Held(self.0.clone())
    }
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> Local<T> {
    /// A handle on `shared`, which the control thread publishes to.
    #[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
    pub fn new(shared: &Arc<ArcSwap<T>>) -> Local<T> {
        let mut cache = Cache::new(shared.clone());
        let now = Held(Rc::new(cache.load().clone()));
        Local {
            seen: RefCell::new(Seen { cache, now }),
        }
    }

    /// The snapshot in force now. Holding it across an await is fine: it only keeps that
    /// version alive.
    #[cfg_attr(not(feature = "bench"), allow(unreachable_pub))]
    pub fn load(&self) -> Held<T> {
        let mut seen = self.seen.borrow_mut();
        let Seen { cache, now } = &mut *seen;
        let current = cache.load();
        if Arc::ptr_eq(current, &now.0) {
            return now.clone();
        }
        let fresh = Held(Rc::new(current.clone()));
        let old = std::mem::replace(now, fresh.clone());
        // The replaced version is dropped (perhaps freed) after the borrow ends.
        drop(seen);
        drop(old);
        fresh
    }

    /// The snapshot in force now, to keep beyond this shard's thread of work.
    pub(crate) fn load_full(&self) -> Arc<T> {
        Arc::clone(&self.load().0)
    }
}

/// A shard's [`Local`] of each snapshot of [`Snapshots`].
pub(crate) struct ShardSnapshots {
    pub(crate) routes: Local<crate::route::RoutingTable>,
    pub(crate) keys: Local<crate::control::KeySnapshot>,
    pub(crate) apps: Local<crate::control::AppsSnapshot>,
    pub(crate) fed: Local<crate::peer::FedView>,
}

impl ShardSnapshots {
    pub(crate) fn new(s: &Snapshots) -> ShardSnapshots {
        ShardSnapshots {
            routes: Local::new(&s.routes),
            keys: Local::new(&s.keys),
            apps: Local::new(&s.apps),
            fed: Local::new(&s.fed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_sees_what_was_published_last_and_a_held_one_stays_only_while_held() {
        let shared = Arc::new(ArcSwap::from_pointee(1u32));
        let local = Local::new(&shared);
        let first = local.load();
        let old = Arc::downgrade(&first.0);
        assert_eq!(*first, 1);
        shared.store(Arc::new(2));
        let second = local.load();
        assert_eq!(*second, 2);
        assert_eq!(*first, 1, "a held snapshot is not changed under its holder");
        assert!(
            Rc::ptr_eq(&second.0, &local.load().0),
            "no new Rc while nothing new was published"
        );
        assert!(old.upgrade().is_some());
        drop(first);
        assert!(
            old.upgrade().is_none(),
            "the old version is gone once nobody holds it"
        );
        assert_eq!(*local.load_full(), 2);
    }
}
