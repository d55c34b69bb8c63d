//! Peer status: what a router tells the routers that dial it, so that they send it only what
//! it can serve. A websocket **text** message on the peer link, JSON, from the accepting
//! router: one right after the upgrade and one whenever it changes (docs/PROTOCOL.md, "Peer
//! status"). Routers that predate it ignore text messages, and a link without a status is
//! used only when no sibling with a good status is usable.

use crate::config::Coverage;
use crate::health::Health;
use crate::route::{RoutingTable, MAIN_ROLE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `kind` of a status message.
const KIND: &str = "status";

/// One router's ability to serve its own cluster's requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PeerStatus {
    /// Always `"status"` (other kinds may follow; a receiver ignores what it does not know).
    pub(crate) kind: String,
    /// Not draining, every shard running, task coverage as its `readiness.coverage` asks.
    pub(crate) ready: bool,
    /// Going away: send nothing new, and close the link once nothing is pending on it.
    pub(crate) draining: bool,
    /// App -> its `main` role's partitions with a live task here.
    #[serde(default)]
    pub(crate) apps: BTreeMap<String, AppCoverage>,
    /// The largest message this router reads on the link (`limits.max_body_bytes + 64 KiB`):
    /// a larger one closes the link with 1009, failing every request on it, so the dialer
    /// refuses such a request itself. Absent from routers before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_message: Option<u64>,
}

/// Live partitions of one app, as inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppCoverage {
    pub(crate) partitions: u32,
    /// Ascending, disjoint `[first, last]` ranges.
    pub(crate) live: Vec<[u32; 2]>,
}

impl PeerStatus {
    /// This router's status now; it reads messages of up to `max_message` bytes.
    pub(crate) fn now(
        health: &Health,
        table: &RoutingTable,
        policy: Coverage,
        max_message: usize,
    ) -> PeerStatus {
        let apps = table
            .apps
            .iter()
            .map(|(name, app)| {
                let mut live: Vec<[u32; 2]> = Vec::new();
                if let Some(r) = app.roles.get(MAIN_ROLE) {
                    for p in r.live_partitions() {
                        match live.last_mut() {
                            Some(last) if last[1] + 1 == p => last[1] = p,
                            _ => live.push([p, p]),
                        }
                    }
                }
                (
                    name.clone(),
                    AppCoverage {
                        partitions: app.partitions,
                        live,
                    },
                )
            })
            .collect();
        PeerStatus {
            kind: KIND.into(),
            ready: health.serving_refusal(table, policy).is_none(),
            draining: health.draining(),
            apps,
            max_message: Some(max_message as u64),
        }
    }

    /// Reads a status message; `None` for anything else (another kind, bad JSON).
    pub(crate) fn parse(text: &[u8]) -> Option<PeerStatus> {
        serde_json::from_slice::<PeerStatus>(text)
            .ok()
            .filter(|s| s.kind == KIND)
    }

    /// Whether `wsid`'s partition of `app` has a live task there; `None` when the app is not
    /// in the status (the router does not serve it).
    pub(crate) fn covers(&self, app: &str, wsid: u64) -> Option<bool> {
        let a = self.apps.get(app)?;
        if a.partitions == 0 {
            return Some(false);
        }
        // < partitions, a u32.
        let p = (wsid % u64::from(a.partitions)) as u32;
        let i = a.live.partition_point(|r| r[1] < p);
        Some(a.live.get(i).is_some_and(|r| r[0] <= p))
    }

    /// How much a dialer wants to send `app`/`wsid` to this router: 3 ready and serving the
    /// partition, 2 ready (its emergency partition would serve), 0 not ready or draining.
    pub(crate) fn rank(&self, app: &str, wsid: u64) -> u8 {
        if self.draining || !self.ready {
            return 0;
        }
        match self.covers(app, wsid) {
            Some(true) => 3,
            _ => 2,
        }
    }
}

/// Rank of a link that has not sent a status (yet, or ever: an older router): below a ready
/// sibling, above one that is not ready.
pub(crate) const RANK_UNKNOWN: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{build, AppSpec, Registration};
    use std::sync::Arc;

    fn table(live: &[u32]) -> RoutingTable {
        let spec = AppSpec {
            name: "demo/echo".into(),
            partitions: 16,
            emergency_partition: None,
        };
        let regs = vec![Registration {
            task: 1,
            app: "demo/echo".into(),
            role: "main".into(),
            partitions: live.to_vec(),
        }];
        build(&[spec], &regs, 2, 0)
    }

    #[test]
    fn coverage_as_ranges_and_back() {
        let h = Arc::new(Health::new(1, vec![]));
        let _alive = h.shard_alive(0);
        let s = PeerStatus::now(&h, &table(&[0, 1, 2, 5, 7, 8]), Coverage::All, 1 << 20);
        assert!(!s.ready, "10 of 16 partitions live");
        assert_eq!(s.apps["demo/echo"].live, vec![[0, 2], [5, 5], [7, 8]]);
        let back = PeerStatus::parse(serde_json::to_string(&s).unwrap().as_bytes()).unwrap();
        assert_eq!(back, s);
        for (wsid, want) in [
            (0, true),
            (2, true),
            (3, false),
            (5, true),
            (6, false),
            (8, true),
        ] {
            assert_eq!(s.covers("demo/echo", wsid), Some(want), "wsid {wsid}");
            assert_eq!(
                s.covers("demo/echo", wsid + 16),
                Some(want),
                "wsid {wsid}+16"
            );
        }
        assert_eq!(s.covers("other/app", 0), None);
        let any = PeerStatus::now(&h, &table(&[3]), Coverage::Any, 1 << 20);
        assert!(any.ready);
        assert_eq!(any.rank("demo/echo", 3), 3);
        assert_eq!(any.rank("demo/echo", 4), 2);
        h.start_drain();
        let d = PeerStatus::now(&h, &table(&[3]), Coverage::Any, 1 << 20);
        assert!(d.draining && !d.ready);
        assert_eq!(d.rank("demo/echo", 3), 0);
    }

    #[test]
    fn other_messages_are_not_statuses() {
        assert!(PeerStatus::parse(b"{\"kind\":\"hello\"}").is_none());
        assert!(PeerStatus::parse(b"not json").is_none());
        assert!(
            PeerStatus::parse(b"{\"kind\":\"status\",\"ready\":true,\"draining\":false}").is_some(),
            "apps may be left out"
        );
    }
}
