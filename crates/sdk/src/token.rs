//! The task's service token over time: where a fresh one comes from ([`TokenSource`]), when one
//! is due (a third of its lifetime before `exp`), and the refresher that publishes new ones to
//! every link (each sends them to its router in a `renew` message, docs/PROTOCOL.md section 4).

use base64::Engine as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// Where the task's service token comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum TokenSource {
    /// [`crate::TaskOptions::token`] as given, never renewed.
    #[default]
    Fixed,
    /// A file holding the token (surrounding whitespace ignored): read at start, again when
    /// its content changes (checked every [`crate::TaskOptions::token_poll`]), and whenever a
    /// fresh token is due or a router refused the current one. Whoever issues tokens rewrites
    /// it (atomically: write a temporary file, then rename it).
    File(PathBuf),
    /// A command run with `sh -c` that prints a token on stdout: run at start, when a fresh
    /// token is due, and when a router refused the current one (at most once per
    /// `token_poll`), each run limited to [`crate::TaskOptions::token_timeout`].
    Command(String),
}

/// `iat` and `exp` of a service token (`fbs1.<claims>.<sig>`), read without verifying it:
/// only to know when to fetch the next one. None for anything else.
pub(crate) fn token_times(token: &str) -> Option<(u64, u64)> {
    let mut parts = token.trim().split('.');
    if parts.next()? != "fbs1" {
        return None;
    }
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts.next()?)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    Some((v.get("iat")?.as_u64()?, v.get("exp")?.as_u64()?))
}

/// True when a fresh token is due at `now` (unix seconds): a third of its lifetime (at least
/// 2 s) before `exp`. A token whose times are unknown is never due.
pub(crate) fn due(token: &str, now: u64) -> bool {
    token_times(token).is_some_and(|(iat, exp)| {
        let margin = (exp.saturating_sub(iat) / 3).max(2);
        now + margin >= exp
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sh -c command` with its output captured, in a process group of its own: a command that
/// runs past the time limit is killed with everything it started (a `sleep` holding the pipe
/// open would otherwise outlive `sh`).
fn command(c: &str) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(c)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd
}

/// Kills the process group `pid` leads (see [`command`]).
fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

fn too_slow(limit: Duration) -> String {
    format!(
        "the token command printed no token within {limit:?} (TaskOptions::token_timeout); killed"
    )
}

/// The token a finished command printed.
fn command_output(out: std::process::Output) -> Result<String, String> {
    if !out.status.success() {
        return Err(format!(
            "token command exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| "token command printed no UTF-8".to_string())
}

/// After the command exits, how long its output may take to reach the end of its pipes: a
/// process it left behind outside its group (`setsid`, a daemon) may hold them open for good,
/// and what the command printed is in them already.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Runs the token command `c` for at most `limit` (then kills its process group) and returns
/// its output once it exited: the end of its pipes is awaited [`OUTPUT_GRACE`] at most, so a
/// process it started and left holding them does not turn a token it printed into a timeout.
fn run_command(c: &str, limit: Duration) -> Result<String, String> {
    use std::io::Read as _;
    use std::sync::{Arc, Mutex};
    let deadline = std::time::Instant::now() + limit;
    let mut child = command(c)
        .spawn()
        .map_err(|e| format!("token command: {e}"))?;
    let pid = child.id();
    // Each pipe is read on a thread of its own into a buffer shared with this one.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(mut pipe) = pipe {
            let (buf, done) = (buf.clone(), done.clone());
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    buf.lock()
                        .expect("token output")
                        .extend_from_slice(&chunk[..n]);
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
        } else {
            done.store(true, std::sync::atomic::Ordering::Release);
        }
        (buf, done)
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() >= deadline => {
                kill_group(pid);
                let _ = child.wait();
                return Err(too_slow(limit));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("token command: {e}")),
        }
    };
    let grace = std::time::Instant::now() + OUTPUT_GRACE;
    let ended =
        |d: &Arc<std::sync::atomic::AtomicBool>| d.load(std::sync::atomic::Ordering::Acquire);
    while !(ended(&stdout.1) && ended(&stderr.1)) && std::time::Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(5));
    }
    let take = |b: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().expect("token output"));
    command_output(std::process::Output {
        status,
        stdout: take(&stdout.0),
        stderr: take(&stderr.0),
    })
}

/// A read token, trimmed; an empty one is an error.
fn non_empty(t: &str) -> Result<Option<String>, String> {
    let t = t.trim();
    if t.is_empty() {
        return Err("the token source gave an empty token".into());
    }
    Ok(Some(t.to_string()))
}

/// Reads a token from its source once; a command gets at most `limit`. Fixed: None.
pub(crate) async fn fetch(source: &TokenSource, limit: Duration) -> Result<Option<String>, String> {
    let t = match source {
        TokenSource::Fixed => return Ok(None),
        TokenSource::File(p) => tokio::fs::read_to_string(p)
            .await
            .map_err(|e| format!("token file {}: {e}", p.display()))?,
        TokenSource::Command(c) => {
            let c = c.clone();
            tokio::task::spawn_blocking(move || run_command(&c, limit))
                .await
                .map_err(|e| format!("token command: {e}"))??
        }
    };
    non_empty(&t)
}

/// [`fetch`] for a caller outside async code (a task starting): blocks for at most `limit`.
pub(crate) fn fetch_blocking(
    source: &TokenSource,
    limit: Duration,
) -> Result<Option<String>, String> {
    let t = match source {
        TokenSource::Fixed => return Ok(None),
        TokenSource::File(p) => {
            std::fs::read_to_string(p).map_err(|e| format!("token file {}: {e}", p.display()))?
        }
        TokenSource::Command(c) => run_command(c, limit)?,
    };
    non_empty(&t)
}

/// Keeps `current` fresh from `source` until `stop`: every `poll` a File is re-read; a
/// Command runs when a fresh token is due, and at least every `refresh`. `refused` asks for a
/// fetch (a router refused the current token); fetches are at most one per `poll`.
pub(crate) async fn refresher(
    source: TokenSource,
    poll: Duration,
    limit: Duration,
    refresh: Duration,
    current: watch::Sender<String>,
    refused: std::sync::Arc<Notify>,
    stop: watch::Receiver<bool>,
) {
    let is_file = matches!(source, TokenSource::File(_));
    let fetcher = move || {
        let source = source.clone();
        async move { fetch(&source, limit).await }
    };
    let cadence = Cadence {
        poll,
        refresh,
        is_file,
    };
    refresh_loop(cadence, fetcher, current, refused, stop).await
}

/// When [`refresh_loop`] looks at its source.
#[derive(Clone, Copy, Debug)]
struct Cadence {
    /// Looks are `poll` apart, counted from the start of the last one.
    poll: Duration,
    /// A command runs at least this long after its last run, due or not.
    refresh: Duration,
    /// A file is read at every look (cheap); a command runs only when wanted.
    is_file: bool,
}

/// [`refresher`] with the fetch given (tests count them).
///
/// Looks are `poll` apart from the start of one to the start of the next: a file is re-read
/// every `poll`, as documented. (Until this was fixed the loop slept `poll`, fetched, then
/// slept `poll` again to space fetches, so a file was read every 2 x `poll`: a rewritten token
/// waited up to 2 s with the default 1 s, and 4 s tokens rewritten every 1.5 s reached their
/// expiry on open links.) A refusal asks for a look at once, but not within `poll` of the last
/// one.
async fn refresh_loop<F, Fut>(
    cadence: Cadence,
    mut fetcher: F,
    current: watch::Sender<String>,
    refused: std::sync::Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, String>>,
{
    use tokio::time::Instant;
    // The first token was read when the task started.
    let (mut looked, mut fetched) = (Instant::now(), Instant::now());
    loop {
        let next = looked + cadence.poll;
        let was_refused = tokio::select! {
            _ = tokio::time::sleep_until(next) => false,
            _ = refused.notified() => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        if was_refused {
            // At most one look per `poll`, also when refusals keep coming.
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        looked = Instant::now();
        let cur = current.borrow().clone();
        let wanted = was_refused
            || cadence.is_file
            || due(&cur, now_unix())
            || looked >= fetched + cadence.refresh;
        if !wanted {
            continue;
        }
        fetched = looked;
        match fetcher().await {
            Ok(Some(t)) if t != cur => {
                tracing::info!(exp = ?token_times(&t).map(|(_, e)| e), "new service token");
                current.send_replace(t);
            }
            Ok(_) => {
                if due(&cur, now_unix()) {
                    tracing::debug!(
                        "a fresh service token is due; the source still has the old one"
                    );
                }
            }
            Err(e) => tracing::warn!("cannot read the service token: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(iat: u64, exp: u64) -> String {
        let c = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            r#"{{"kid":1,"sub":"t","app":"demo/echo","cluster":"local/dev","iat":{iat},"exp":{exp}}}"#
        ));
        format!("fbs1.{c}.sig")
    }

    #[test]
    fn a_fresh_token_is_due_a_third_of_its_life_before_exp() {
        let t = token(1000, 1900);
        assert_eq!(token_times(&t), Some((1000, 1900)));
        assert!(!due(&t, 1599));
        assert!(due(&t, 1600));
        assert!(due(&t, 5000));
        // Short-lived: at least 2 s before.
        assert!(due(&token(1000, 1003), 1001));
        assert!(!due(&token(1000, 1003), 1000));
        assert_eq!(token_times("a.b.c"), None);
        assert!(!due("not a token", 0));
    }

    /// Runs [`refresh_loop`] for `run` with a fetch that counts its calls and always gives
    /// the token `t`; `refusals`: how many refusals to signal, evenly spread. Returns the count.
    async fn looks(cadence: Cadence, run: Duration, refusals: u32) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let n = std::sync::Arc::new(AtomicUsize::new(0));
        let (current, _) = watch::channel("t".to_string());
        let (stop_tx, stop) = watch::channel(false);
        let refused = std::sync::Arc::new(Notify::new());
        let counter = n.clone();
        let fetcher = move || {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok(Some("t".to_string())) }
        };
        let h = tokio::spawn(refresh_loop(
            cadence,
            fetcher,
            current,
            refused.clone(),
            stop,
        ));
        let t0 = tokio::time::Instant::now();
        for i in 1..=refusals {
            tokio::time::sleep_until(t0 + run * i / (refusals + 1)).await;
            refused.notify_one();
        }
        tokio::time::sleep_until(t0 + run).await;
        let _ = stop_tx.send(true);
        h.await.unwrap();
        n.load(Ordering::Relaxed)
    }

    /// SDK.md: a token file is read every `token_poll`. The loop used to sleep `token_poll`
    /// after each fetch as well as before it: 10 reads in 2 s with a 100 ms poll, not 20
    /// (checked against that code), and a rewritten token waited up to 2 x `token_poll`.
    // Paused time: the count does not depend on how late a loaded machine wakes the loop.
    #[tokio::test(start_paused = true)]
    async fn a_file_is_read_every_poll_not_every_other_poll() {
        let cadence = Cadence {
            poll: Duration::from_millis(100),
            refresh: Duration::from_secs(3600),
            is_file: true,
        };
        let n = looks(cadence, Duration::from_millis(2050), 0).await;
        // 20 on time; a loaded machine's late wake-ups may cost a couple.
        assert!((16..=21).contains(&n), "{n} reads of the file in 2.05 s");
    }

    /// A command runs every `token_refresh` though no token is due (`t` has no times), after a
    /// refusal at the next look, and never more than once per `token_poll` however many
    /// refusals come.
    // Paused time: the count does not depend on how late a loaded machine wakes the loop.
    #[tokio::test(start_paused = true)]
    async fn a_command_runs_every_refresh_and_after_a_refusal_at_most_once_per_poll() {
        let poll = Duration::from_millis(100);
        let hour = Duration::from_secs(3600);
        let idle = Cadence {
            poll,
            refresh: hour,
            is_file: false,
        };
        assert_eq!(looks(idle, Duration::from_millis(1000), 0).await, 0);
        let refreshing = Cadence {
            poll,
            refresh: Duration::from_millis(300),
            is_file: false,
        };
        let n = looks(refreshing, Duration::from_millis(1050), 0).await;
        assert!((2..=3).contains(&n), "{n} runs in 1.05 s, refresh 300 ms");
        assert_eq!(looks(idle, Duration::from_millis(1000), 3).await, 3);
        // 50 refusals in 1 s: one run per poll at most.
        let n = looks(idle, Duration::from_millis(1000), 50).await;
        assert!((5..=10).contains(&n), "{n} runs for 50 refusals in 1 s");
    }

    /// Time limit of the commands that should finish.
    const L: Duration = Duration::from_secs(5);

    /// Waits until process `pid` is gone (killed and reaped); false after 5 s.
    fn gone(pid: &str) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < L {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie whose parent (this test's sh, killed too) init reaps.
            if state.is_empty() || state.split(' ').nth(2) == Some("Z") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_token_command_past_its_limit_is_killed_with_what_it_started() {
        let dir = std::env::temp_dir().join(format!("fedbus-sdk-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for blocking in [false, true] {
            let pidf = dir.join(format!("pid-{blocking}"));
            // sh starts a sleep that holds stdout open, then waits for it.
            let c = TokenSource::Command(format!("sleep 30 & echo $! > {pidf:?}; wait"));
            let limit = Duration::from_millis(300);
            let t0 = std::time::Instant::now();
            let r = if blocking {
                fetch_blocking(&c, limit)
            } else {
                fetch(&c, limit).await
            };
            let took = t0.elapsed();
            let e = r.expect_err("timed out");
            assert!(e.contains("token_timeout"), "{e}");
            assert!(
                took < Duration::from_secs(3),
                "blocking {blocking}: {took:?}"
            );
            let pid = std::fs::read_to_string(&pidf).unwrap();
            assert!(
                gone(pid.trim()),
                "blocking {blocking}: the command's sleep lives on"
            );
        }
        assert_eq!(
            fetch_blocking(&TokenSource::Command("echo fbs1.c.d".into()), L),
            Ok(Some("fbs1.c.d".into()))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn file_and_command_sources() {
        let dir = std::env::temp_dir().join(format!("fedbus-sdk-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, " fbs1.x.y\n").unwrap();
        assert_eq!(
            fetch(&TokenSource::File(f.clone()), L).await,
            Ok(Some("fbs1.x.y".into()))
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(fetch(&TokenSource::File(f), L).await.is_err(), "empty");
        assert!(fetch(&TokenSource::File(dir.join("none")), L)
            .await
            .is_err());
        assert_eq!(
            fetch(&TokenSource::Command("echo fbs1.a.b".into()), L).await,
            Ok(Some("fbs1.a.b".into()))
        );
        assert!(fetch(&TokenSource::Command("exit 3".into()), L)
            .await
            .is_err());
        assert_eq!(fetch(&TokenSource::Fixed, L).await, Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
