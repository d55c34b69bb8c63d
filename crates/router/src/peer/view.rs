//! The part of the federation that reloads: the other clusters' public keys and routers, and
//! our siblings. The control thread builds a [`FedView`] from the config (at start, on SIGHUP
//! and when the config file or a keys file changes) and publishes it in
//! `control::Snapshots::fed`; shards read it on every peer handshake and reconcile their
//! dialers with it ([`super::watch_view`]).

use crate::auth::{self, ClusterKeyVersion};
use std::collections::HashMap;
use std::path::PathBuf;

/// One published federation view.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FedView {
    /// Starts at 1; +1 on every change the control thread publishes.
    pub(crate) generation: u64,
    /// `region/cluster` -> that cluster's public keys (our own too when we have siblings).
    pub(crate) keys: HashMap<String, Vec<ClusterKeyVersion>>,
    /// Other clusters: `region/cluster` -> its routers' external addresses.
    pub(crate) routers: HashMap<String, Vec<String>>,
    /// External addresses of the other routers of our own cluster.
    pub(crate) siblings: Vec<String>,
}

impl FedView {
    /// Reads every key file the config names: a missing or broken one is an error (the
    /// caller keeps the view in force).
    pub(crate) fn load(cfg: &crate::config::Config) -> anyhow::Result<FedView> {
        let mut keys = HashMap::new();
        let mut routers = HashMap::new();
        for c in cfg.peer_clusters() {
            let id = format!("{}/{}", c.region, c.cluster);
            let k = auth::keyring::read_cluster_keys(&c.keys)
                .map_err(|e| anyhow::anyhow!("federation cluster {id}: keys: {e}"))?;
            keys.insert(id.clone(), k);
            routers.insert(id, c.routers.clone());
        }
        let siblings = super::siblings(cfg);
        if !siblings.is_empty() {
            // Siblings present peer tokens signed by our own cluster key.
            let own = cfg.cluster_id();
            let k = auth::keyring::read_cluster_keys(&cfg.keyring_dir())
                .map_err(|e| anyhow::anyhow!("own cluster {own}: keys: {e}"))?;
            keys.insert(own, k);
        }
        Ok(FedView {
            generation: 1,
            keys,
            routers,
            siblings,
        })
    }

    /// True when `region/cluster` is another cluster of the federation.
    pub(crate) fn knows(&self, region: &str, cluster: &str) -> bool {
        self.routers
            .keys()
            .any(|k| super::is_cluster(k, region, cluster))
    }

    /// Same keys, routers and siblings (the generation aside).
    pub(crate) fn same_as(&self, other: &FedView) -> bool {
        self.keys == other.keys && self.routers == other.routers && self.siblings == other.siblings
    }

    /// Every router a shard dials: `(cluster, addresses)`, siblings under our own cluster.
    pub(crate) fn dial_targets(&self, own: &str) -> Vec<(String, Vec<String>)> {
        let mut v: Vec<(String, Vec<String>)> = self
            .routers
            .iter()
            .map(|(c, a)| (c.clone(), a.clone()))
            .collect();
        if !self.siblings.is_empty() {
            v.push((own.to_string(), self.siblings.clone()));
        }
        v.sort();
        v
    }
}

/// The files whose change reloads the view: each other cluster's `cluster.toml`.
pub(crate) fn key_files(cfg: &crate::config::Config) -> Vec<PathBuf> {
    cfg.peer_clusters()
        .map(|c| c.keys.join("cluster.toml"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_util::TempDir;
    use crate::auth::Keyring;
    use crate::config::{Config, PeerCluster};

    fn cfg_with(peer_keys: &std::path::Path, routers: &[&str]) -> Config {
        let mut c = Config::default();
        c.federation.clusters = vec![PeerCluster {
            region: "ru".into(),
            cluster: "other".into(),
            routers: routers.iter().map(|s| s.to_string()).collect(),
            keys: peer_keys.to_path_buf(),
        }];
        c
    }

    #[test]
    fn a_rotated_peer_key_and_a_new_router_change_the_view() {
        let dir = TempDir::new("fedview");
        Keyring::init(dir.path(), &[], 1_000).expect("init");
        let a = FedView::load(&cfg_with(dir.path(), &["10.0.0.1:8950"])).expect("load");
        assert!(a.knows("ru", "other"));
        assert!(!a.knows("ru", "nope"));
        assert_eq!(a.keys["ru/other"].len(), 1);
        Keyring::rotate_cluster(dir.path(), 2_000).expect("rotate");
        let b = FedView::load(&cfg_with(dir.path(), &["10.0.0.1:8950"])).expect("load");
        assert!(!a.same_as(&b), "a new key version must change the view");
        assert_eq!(b.keys["ru/other"].len(), 2);
        let c = FedView::load(&cfg_with(dir.path(), &["10.0.0.1:8950", "10.0.0.2:8950"]))
            .expect("load");
        assert!(!b.same_as(&c));
        assert_eq!(c.dial_targets("ru/me")[0].1.len(), 2);
    }

    #[test]
    fn a_missing_keys_file_is_an_error() {
        let dir = TempDir::new("fedview-missing");
        let e = FedView::load(&cfg_with(&dir.path().join("nope"), &["10.0.0.1:8950"]));
        assert!(e.is_err());
    }
}
