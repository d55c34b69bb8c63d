//! What a config reload may change: pure functions of the config in force and the file just
//! read.

use crate::config::Config;

/// The config in force with the reloadable parts of `new`: `[[apps]]` and
/// `[federation]`'s `clusters` and `entry_point`. Everything else stays as the router started.
pub(crate) fn merge(started: &Config, new: &Config) -> Config {
    let mut m = started.clone();
    m.apps = new.apps.clone();
    m.federation.clusters = new.federation.clusters.clone();
    m.federation.entry_point = new.federation.entry_point.clone();
    m
}

/// The sections of `new` that differ from the config the router `started` with and do not
/// reload (listeners, limits...): each is logged as needing a restart and left as it is.
/// `[[tls.certs]]` counts only when `new` names some (dev mode fills them in at start).
pub(crate) fn restart_needed(started: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            v.push(name);
        }
    };
    check(
        "region, cluster, router",
        (&started.region, &started.cluster, &started.router)
            != (&new.region, &new.cluster, &new.router),
    );
    check("dev", started.dev != new.dev);
    check("keyring", started.keyring != new.keyring);
    // `listen.takeover` is how this run started (`fedbus run --takeover` sets it), not a
    // listener: a file without it after a takeover start is no change.
    let takeover = crate::config::Listen {
        takeover: new.listen.takeover,
        ..started.listen.clone()
    };
    check("[listen]", takeover != new.listen);
    check("[limits]", started.limits != new.limits);
    check("[auth]", started.auth != new.auth);
    check(
        "[tls]",
        started.tls.peer != new.tls.peer
            || started.tls.session_cache != new.tls.session_cache
            || started.tls.tickets != new.tls.tickets
            || (!new.tls.certs.is_empty() && started.tls.certs != new.tls.certs),
    );
    check("[routing]", started.routing != new.routing);
    check("[readiness]", started.readiness != new.readiness);
    check("[tuning]", started.tuning != new.tuning);
    check(
        "federation.peer_token_file",
        started.federation.peer_token_file != new.federation.peer_token_file,
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::App;

    fn app(name: &str, partitions: u32) -> App {
        App {
            partitions,
            name: name.into(),
            ..Config::default().apps[0].clone()
        }
    }

    #[test]
    fn apps_and_clusters_reload_and_listeners_need_a_restart() {
        let started = Config::default();
        let mut new = started.clone();
        new.apps = vec![app("demo/echo", 32), app("demo/new", 4)];
        assert!(restart_needed(&started, &new).is_empty());
        let mut took_over = started.clone();
        took_over.listen.takeover = true;
        assert!(restart_needed(&took_over, &new).is_empty(), "--takeover");
        new.listen.api = ([127, 0, 0, 1], 1).into();
        new.limits.max_body_bytes += 1;
        assert_eq!(restart_needed(&started, &new), vec!["[listen]", "[limits]"]);
        let m = merge(&started, &new);
        assert_eq!(m.apps, new.apps, "apps reload");
        assert_eq!(m.listen, started.listen, "listeners stay as started");
        assert_eq!(m.limits, started.limits);
    }

    #[test]
    fn dev_certificates_filled_in_at_start_are_no_change() {
        let mut started = Config::default();
        started.tls.certs = vec![crate::config::CertFiles {
            cert: "a.pem".into(),
            key: "a.key".into(),
        }];
        let new = Config::default();
        assert!(restart_needed(&started, &new).is_empty());
    }
}
