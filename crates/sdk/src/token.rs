//! The task's service token over time: where a fresh one comes from ([`TokenSource`]), when one
//! is due (a third of its lifetime before `exp`), and the refresher that publishes new ones to
//! every link (each sends them to its router in a `renew` message, docs/PROTOCOL.md section 4).

use base64::Engine as _;
use std::path::PathBuf;
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
    /// `token_poll`).
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

/// Reads a token from its source once. Fixed: None.
pub(crate) async fn fetch(source: &TokenSource) -> Result<Option<String>, String> {
    let t = match source {
        TokenSource::Fixed => return Ok(None),
        TokenSource::File(p) => tokio::fs::read_to_string(p)
            .await
            .map_err(|e| format!("token file {}: {e}", p.display()))?,
        TokenSource::Command(c) => {
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(c)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("token command: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "token command exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            String::from_utf8(out.stdout).map_err(|_| "token command printed no UTF-8")?
        }
    };
    let t = t.trim();
    if t.is_empty() {
        return Err("the token source gave an empty token".into());
    }
    Ok(Some(t.to_string()))
}

/// Keeps `current` fresh from `source` until `stop`: every `poll` a File is re-read; a
/// Command runs when a fresh token is due. `refused` asks for a fetch now (a router refused
/// the current token); fetches are at most one per `poll`.
pub(crate) async fn refresher(
    source: TokenSource,
    poll: Duration,
    current: watch::Sender<String>,
    refused: std::sync::Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let was_refused = tokio::select! {
            _ = tokio::time::sleep(poll) => false,
            _ = refused.notified() => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        let cur = current.borrow().clone();
        // A file is cheap to read; a command runs only when needed.
        let wanted = was_refused || matches!(source, TokenSource::File(_)) || due(&cur, now_unix());
        if !wanted {
            continue;
        }
        match fetch(&source).await {
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
        // At most one fetch per `poll`, also when refusals keep coming.
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.wait_for(|s| *s) => return,
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

    #[tokio::test]
    async fn file_and_command_sources() {
        let dir = std::env::temp_dir().join(format!("fedbus-sdk-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, " fbs1.x.y\n").unwrap();
        assert_eq!(
            fetch(&TokenSource::File(f.clone())).await,
            Ok(Some("fbs1.x.y".into()))
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(fetch(&TokenSource::File(f)).await.is_err(), "empty");
        assert!(fetch(&TokenSource::File(dir.join("none"))).await.is_err());
        assert_eq!(
            fetch(&TokenSource::Command("echo fbs1.a.b".into())).await,
            Ok(Some("fbs1.a.b".into()))
        );
        assert!(fetch(&TokenSource::Command("exit 3".into())).await.is_err());
        assert_eq!(fetch(&TokenSource::Fixed).await, Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
