//! How a task connects and what it registers.

use crate::{Error, Secrets, TokenSource};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How a task connects and what it registers.
#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// Internal address (`host:port`, or `unix:<path>` for a router's `listen.internal_unix`
    /// on this host) of shard 0 of each router of the cluster; each router's hello names its
    /// other shards, and the task links to those too (over their unix sockets when this one
    /// was).
    pub routers: Vec<String>,
    /// `owner/app` served; must be the service token's app.
    pub app: String,
    /// Role registered: `main` (the default) receives every request first; `auth` receives
    /// the app secret; other roles receive redirects.
    pub role: String,
    /// Partitions served, each below the app's partition count.
    pub partitions: Vec<u32>,
    /// Service token (`fedbus token service`), signed by the cluster key. With a
    /// [`TokenSource`] other than `Fixed` it may be empty: the source gives the first one.
    pub token: String,
    /// Where fresh service tokens come from (default `Fixed`: never renewed). With a file or a
    /// command the task fetches a new token a third of its lifetime before it expires and
    /// sends it on every open link (`renew`), so no link closes and no request fails.
    pub token_source: TokenSource,
    /// How often a token file is re-read (a `token_poll` from the start of one read to the
    /// start of the next), and the least time between two fetches. Default 1 s.
    pub token_poll: Duration,
    /// A token command runs again at least this long after its last run, even when no fresh
    /// token is due: after a cluster key rotation the command prints tokens of the new key
    /// version, and the open links must get one before the old version's grace
    /// (`auth.grace_secs`, one day by default) ends, while a token of 30 days is due only
    /// after 20. Keep it well below the grace. Default 1 h. Not used for a file, re-read every
    /// `token_poll`.
    pub token_refresh: Duration,
    /// Time limit of one run of a token command: at start ([`crate::Task::spawn`] waits for it)
    /// and on each renewal. A command still running then is killed with what it started, and
    /// counts as a failed fetch (tried again at the next look, a `token_poll` after the start of
    /// the failed one). Keep it well below a third of the token's lifetime, when the renewal
    /// falls due. Default 5 s.
    pub token_timeout: Duration,
    /// A router that refuses the token (401 at the upgrade: expired, retired or unknown key,
    /// bad signature...) or the registration (close 1008 before `registered`: `wrong_token`
    /// for a token of another app or role, `unknown_app`, `bad_partitions`...) for this long
    /// while no link of the task is registered, with fresh fetches from the source in between,
    /// ends the task: [`crate::serve`] returns [`Error::Refused`] (exit non-zero, so a
    /// supervisor sees it) instead of retrying forever. While another router's link is
    /// registered the task serves on and dials the refusing router on with backoff (logged
    /// once). Default 30 s.
    pub refused_exit_after: Duration,
    /// Instance id, the same on every link of the task: random by default
    /// ([`crate::random_task_id`]). A second link with the same id on a shard replaces the
    /// first, so two processes must not share one.
    pub task_id: u64,
    /// Limit for TCP connect, the TLS handshake (with [`TaskOptions::tls_ca`]) and the
    /// websocket upgrade.
    pub connect_timeout: Duration,
    /// Limit for the hello after the upgrade, and for `registered` after the registration.
    pub handshake_timeout: Duration,
    /// A registered link on which nothing (not even a ping) arrives for this long is reopened.
    /// The router pings every `limits.ping_interval_ms` (2 s by default): keep this at least
    /// 2 to 3 of its ping intervals. Below one interval (the default 10 s against a router with
    /// `ping_interval_ms = 12000`) every quiet link is torn down and reopened each
    /// `idle_timeout`, failing the requests in flight on it. Default 10 s.
    pub idle_timeout: Duration,
    /// Largest message accepted from a router (a request frame: body plus metadata).
    pub max_message: usize,
    /// Most requests held at once over all links, from the handler's start until the answer
    /// is written to the router (each holds its request or its answer): one more request is
    /// answered `503 task_busy` at once (counted in [`crate::Stats::busy`]). Routers free a
    /// request's slot at their `request_timeout_ms` without cancelling its handler, so handlers
    /// slower than that would otherwise pile up without bound. Default 16384.
    pub max_in_flight: usize,
    /// Bytes queued on one link and not yet written to its router: past this, the link reads
    /// no more requests until some are written, so that a router which sends requests but
    /// reads no answers meets TCP's flow control instead of this task's memory growing.
    /// Default 1 MiB.
    pub max_write_backlog: usize,
    /// Where the app secrets pushed to an `auth` task are kept; clone it before [`crate::serve`]
    /// to read them from the handler.
    pub secrets: Secrets,
    /// A PEM file of CA certificates: every link then dials `wss://` (routers with
    /// `[listen] internal_tls = true`), trusting only these CAs (not the system's roots), and
    /// the router's certificate must be valid for the host dialed, an IP address or a DNS
    /// name (announced shard addresses too). Read once by [`crate::Task::spawn`]: a missing,
    /// unreadable or empty file is [`Error::Options`]. None (the default): plaintext `ws://`.
    pub tls_ca: Option<PathBuf>,
}

impl TaskOptions {
    /// Options for role `main` with the default timeouts and a random task id.
    pub fn new<R, S>(
        routers: R,
        app: impl Into<String>,
        partitions: impl Into<Vec<u32>>,
        token: impl Into<String>,
    ) -> TaskOptions
    where
        R: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TaskOptions {
            routers: routers.into_iter().map(Into::into).collect(),
            app: app.into(),
            role: "main".into(),
            partitions: partitions.into(),
            token: token.into(),
            token_source: TokenSource::Fixed,
            token_poll: Duration::from_secs(1),
            token_refresh: Duration::from_secs(3600),
            token_timeout: Duration::from_secs(5),
            refused_exit_after: Duration::from_secs(30),
            task_id: crate::random_task_id(),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: fedbus_proto::link::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: fedbus_proto::link::DEFAULT_IDLE_TIMEOUT,
            max_message: 64 * 1024 * 1024,
            max_in_flight: 16 * 1024,
            max_write_backlog: 1024 * 1024,
            secrets: Secrets::new(),
            tls_ca: None,
        }
    }

    /// The same options in role `role`.
    pub fn role(mut self, role: impl Into<String>) -> TaskOptions {
        self.role = role.into();
        self
    }

    /// The same options with instance id `id`.
    pub fn task_id(mut self, id: u64) -> TaskOptions {
        self.task_id = id;
        self
    }

    /// The same options with the token read from `path`, re-read when it changes
    /// ([`TokenSource::File`]).
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> TaskOptions {
        self.token_source = TokenSource::File(path.into());
        self
    }

    /// The same options with the token printed by `command` ([`TokenSource::Command`]).
    pub fn token_command(mut self, command: impl Into<String>) -> TaskOptions {
        self.token_source = TokenSource::Command(command.into());
        self
    }

    /// The same options dialing every link over TLS, trusting the CA certificates of the PEM
    /// file `path` ([`TaskOptions::tls_ca`]).
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> TaskOptions {
        self.tls_ca = Some(path.into());
        self
    }

    /// The same options with this idle limit (see [`TaskOptions::idle_timeout`]).
    pub fn idle_timeout(mut self, d: Duration) -> TaskOptions {
        self.idle_timeout = d;
        self
    }

    /// Checks what the router would refuse anyway, so that a bad option fails at once
    /// instead of in a reconnect loop.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Options(m.to_string()));
        if self.routers.is_empty() || self.routers.iter().any(|r| r.trim().is_empty()) {
            return bad("no router address");
        }
        if self.app.split('/').count() != 2 || self.app.split('/').any(str::is_empty) {
            return bad("app must be owner/app");
        }
        if self.role.is_empty() || self.role.len() > 64 {
            return bad("role must be 1 to 64 bytes");
        }
        if self.partitions.is_empty() {
            return bad("no partition");
        }
        if self.token.trim().is_empty() && self.token_source == TokenSource::Fixed {
            return bad("no service token");
        }
        if self.token_poll.is_zero()
            || self.token_refresh.is_zero()
            || self.token_timeout.is_zero()
            || self.refused_exit_after.is_zero()
        {
            return bad(
                "token_poll, token_refresh, token_timeout and refused_exit_after must be > 0",
            );
        }
        if self.connect_timeout.is_zero()
            || self.handshake_timeout.is_zero()
            || self.idle_timeout.is_zero()
        {
            return bad("connect_timeout, handshake_timeout and idle_timeout must be > 0");
        }
        // Deadlines are `now + option`: a longer one would overflow the clock (a panic in the
        // link's loop, which then serves nothing).
        let durations = [
            self.token_poll,
            self.token_refresh,
            self.token_timeout,
            self.refused_exit_after,
            self.connect_timeout,
            self.handshake_timeout,
            self.idle_timeout,
        ];
        if durations.iter().any(|d| *d > MAX_DURATION) {
            return bad("durations must be at most 365 days");
        }
        if self.max_message < 64 * 1024 {
            return bad("max_message below 64 KiB");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be > 0");
        }
        if self.max_write_backlog == 0 {
            return bad("max_write_backlog must be > 0");
        }
        Ok(())
    }
}

/// The longest duration an option may take.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A partition list as people write it, `0-15` or `0-3,8,10-11`; parse it with
/// `"0-15".parse::<Partitions>()` and pass it where a `Vec<u32>` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partitions(pub Vec<u32>);

impl FromStr for Partitions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Partitions, Error> {
        let bad = || Error::Partitions(format!("{s:?}: expected e.g. 0-15 or 0-3,8"));
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b || b - a >= 1 << 20 {
                return Err(bad());
            }
            v.extend(a..=b);
        }
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            return Err(bad());
        }
        Ok(Partitions(v))
    }
}

impl From<Partitions> for Vec<u32> {
    fn from(p: Partitions) -> Vec<u32> {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse() {
        let p: Partitions = "0-3, 8,10-11".parse().unwrap();
        assert_eq!(p.0, [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!("5".parse::<Partitions>().unwrap().0, [5]);
        assert_eq!("3,1-2,2".parse::<Partitions>().unwrap().0, [1, 2, 3]);
        for bad in ["", "a", "3-1", "1-", "-1", "0-99999999"] {
            assert!(bad.parse::<Partitions>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validation() {
        let ok = TaskOptions::new(["127.0.0.1:8900"], "demo/echo", vec![0], "tok");
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.role, "main");
        assert!(ok.task_id < 1 << 53);
        let v = |f: fn(&mut TaskOptions)| {
            let mut o = ok.clone();
            f(&mut o);
            o.validate().is_err()
        };
        assert!(v(|o| o.routers.clear()));
        assert!(v(|o| o.app = "echo".into()));
        assert!(v(|o| o.app = "demo/".into()));
        assert!(v(|o| o.role = String::new()));
        assert!(v(|o| o.role = "r".repeat(65)));
        assert!(v(|o| o.partitions.clear()));
        assert!(v(|o| o.token = " ".into()));
        assert!(v(|o| o.token_timeout = Duration::ZERO));
        assert!(v(|o| o.token_refresh = Duration::ZERO));
        assert!(v(|o| o.idle_timeout = Duration::ZERO));
        // `now + MAX` overflows the clock: refused, not a panic in a link's loop.
        assert!(v(|o| o.idle_timeout = Duration::MAX));
        assert!(v(|o| o.handshake_timeout = Duration::MAX));
        assert!(v(|o| o.connect_timeout = Duration::MAX));
        assert!(v(|o| o.token_poll = Duration::MAX));
        assert!(!v(|o| o.idle_timeout = MAX_DURATION));
        assert!(v(|o| o.max_in_flight = 0));
        assert!(v(|o| o.max_write_backlog = 0));
    }
}
