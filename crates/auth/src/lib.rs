//! fedbus-auth, authentication for fedbus: the keyring on disk (cluster keys, app secrets,
//! rotation with grace), service tokens (Ed25519, what tasks and peer routers present) and
//! client JWTs (HS256).
//!
//! Owns every decision of the form "is this credential valid now". Verification is pure:
//! the caller passes `now` and a keyring snapshot; nothing here reads a clock or a file on the
//! hot path. Only the keyring's `load`/`init`/`rotate_*` functions touch the disk, and they run
//! on the control thread or in the CLI, never on a shard. Never panics on bad input, and never
//! prints or logs a secret.
//!
//! Feature `test-util` exposes `test_util` to other crates' tests.

#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod client_jwt;
pub mod keyring;
pub mod service_token;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use client_jwt::{
    claimed_app, client_token_expired, sign_client_jwt, trusted_until, verify_client_jwt,
    ClientClaims, MAX_CLIENT_JWT_LEN,
};
pub use keyring::{
    check_version, is_name_part, usable_version, validate_app_name, AppSecretVersion,
    ClusterKeyVersion, KeyVersion, Keyring, VersionState,
};
pub use service_token::{
    sign_service_token, verify_service_token, ServiceClaims, MAX_SERVICE_TOKEN_LEN,
};

/// Why a credential was refused or the keyring could not be used.
///
/// Token variants are cheap (no allocation) because they are built on the hot path; keyring
/// variants carry the file and field because an operator has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented. The client's fault; retry with a token.
    #[error("missing token")]
    MissingToken,
    /// The token is malformed, too long, or uses a forbidden algorithm. The client's fault.
    #[error("bad token: {0}")]
    BadToken(&'static str),
    /// The token's `exp` has passed. The client should fetch a fresh token.
    #[error("token expired")]
    ExpiredToken,
    /// The token's `nbf` (or `iat`) lies in the future beyond the allowed skew.
    #[error("token not yet valid")]
    NotYetValid,
    /// The token names a key version that the keyring does not hold.
    #[error("unknown key version {0}")]
    UnknownKey(u32),
    /// The token names a key version whose grace period has ended.
    #[error("retired key version {0}")]
    RetiredKey(u32),
    /// The keyring holds no secret for the app the request targets.
    #[error("no secret for this app")]
    UnknownApp,
    /// The token is valid but was issued for another app (HTTP 403).
    #[error("token issued for another app")]
    WrongApp,
    /// The signature does not match the key the token names.
    #[error("bad signature")]
    BadSignature,
    /// An app name outside `<owner>/<app>` with `[A-Za-z0-9_-]` parts.
    #[error("bad app name {0:?}: expected <owner>/<app>, each part non-empty [A-Za-z0-9_-]")]
    BadAppName(String),
    /// A keyring file is missing, unparsable or invalid. The operator's fault; fix the file.
    #[error("keyring {file}: {field}: {msg}")]
    Keyring {
        /// The file at fault.
        file: PathBuf,
        /// The field (or `-` for the whole file).
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// Reading or writing a keyring file failed.
    // The I/O error is in the message and not also a `source`: `{:#}` (anyhow's chain)
    // printed it twice ("File exists (os error 17): File exists (os error 17)").
    #[error("keyring {file}: {err}")]
    Io {
        /// The file or directory involved.
        file: PathBuf,
        /// The underlying error.
        err: std::io::Error,
    },
}

impl AuthError {
    /// Stable snake_case code for responses, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::BadToken(_) => "bad_token",
            AuthError::ExpiredToken => "expired_token",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::RetiredKey(_) => "retired_key",
            AuthError::UnknownApp => "unknown_app",
            AuthError::WrongApp => "wrong_app",
            AuthError::BadSignature => "bad_signature",
            AuthError::BadAppName(_) => "bad_app_name",
            AuthError::Keyring { .. } => "keyring",
            AuthError::Io { .. } => "keyring_io",
        }
    }

    /// HTTP status: 401 for anything about a token, 403 for a token of another app,
    /// 400 for a bad app name, 500 for keyring and I/O errors.
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::WrongApp => 403,
            AuthError::BadAppName(_) => 400,
            AuthError::Keyring { .. } | AuthError::Io { .. } => 500,
            _ => 401,
        }
    }

    pub(crate) fn keyring(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        AuthError::Keyring {
            file: file.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(file: impl Into<PathBuf>, err: std::io::Error) -> Self {
        AuthError::Io {
            file: file.into(),
            err,
        }
    }
}

/// Longest wait [`expiry_wait`] returns: 10 years. Token claims are `u64` and any value
/// verifies (a far-future `exp` such as `u64::MAX` is a valid, never-expiring token), but a
/// timer cannot be armed that far: `Instant::now() + Duration::from_secs(u64::MAX)` panics.
/// A caller that must act at expiry (close a link, drop a cache entry) waits at most this long
/// and may check again then; nothing in fedbus runs for 10 years.
pub const MAX_EXPIRY_WAIT_SECS: u64 = 10 * 365 * 86_400;

/// How long from `now` until `exp` (unix seconds): zero if it has passed, at most
/// [`MAX_EXPIRY_WAIT_SECS`]. Safe to add to `Instant::now()` or `SystemTime::now()` for any
/// `exp` and `now`. Use it instead of `Duration::from_secs(exp - now)` for a token's `exp` or a
/// [`trusted_until`] value.
pub fn expiry_wait(exp: u64, now: u64) -> Duration {
    Duration::from_secs(exp.saturating_sub(now).min(MAX_EXPIRY_WAIT_SECS))
}

/// Seconds since the Unix epoch; 0 if the clock is before 1970.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a duration such as `30s`, `15m`, `1h`, `7d` (a whole number and one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} has no unit (use s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("duration {s:?} has no number"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: number out of range"))?;
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (use s, m, h or d)"
            ))
        }
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

/// Test helpers shared with the router's tests. Compiled for this crate's own tests and, for
/// other crates, behind the `test-util` feature (`#[cfg(test)]` does not cross crates).
#[cfg(any(test, feature = "test-util"))]
pub mod test_util {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A unique directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        /// A fresh, not yet created path; `tag` makes it recognisable in the temp dir.
        pub fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "fedbus-auth-{tag}-{}-{n}-{}",
                std::process::id(),
                super::now_unix()
            ));
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }

        /// The directory's path.
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_parse_duration_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration(" 2h "), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn auth_parse_duration_rejects_garbage() {
        for bad in [
            "",
            "s",
            "30",
            "1x",
            "1.5h",
            "-1s",
            "1hh",
            "h1",
            "99999999999999999999s",
            "999999999999999999d",
            "é",
            "1 h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn expiry_wait_is_capped_and_never_overflows() {
        let extremes = [0, 1, u32::MAX as u64, i64::MAX as u64, u64::MAX];
        for exp in extremes {
            for now in extremes {
                let w = expiry_wait(exp, now);
                assert!(w.as_secs() <= MAX_EXPIRY_WAIT_SECS);
                if exp <= now {
                    assert_eq!(w, Duration::ZERO);
                }
                // What a caller does with it must not panic either.
                let _ = std::time::Instant::now() + w;
                let _ = SystemTime::now() + w;
            }
        }
        // The hazard it avoids: an uncapped wait for a far-future exp cannot be added to now.
        let uncapped = Duration::from_secs(u64::MAX.saturating_sub(now_unix()));
        assert!(std::time::Instant::now().checked_add(uncapped).is_none());
        assert_eq!(expiry_wait(1_000_060, 1_000_000), Duration::from_secs(60));
        assert_eq!(
            expiry_wait(u64::MAX, 0),
            Duration::from_secs(MAX_EXPIRY_WAIT_SECS)
        );
    }

    #[test]
    fn auth_error_codes_and_statuses() {
        assert_eq!(AuthError::WrongApp.http_status(), 403);
        assert_eq!(AuthError::WrongApp.code(), "wrong_app");
        assert_eq!(AuthError::ExpiredToken.http_status(), 401);
        assert_eq!(AuthError::RetiredKey(1).code(), "retired_key");
        let e = AuthError::keyring("cluster.toml", "versions[0].public", "bad hex");
        assert_eq!(e.http_status(), 500);
        assert_eq!(e.code(), "keyring");
        assert!(e.to_string().contains("cluster.toml"));
    }
}
