//! Authorization of a client request for this cluster, the same for every ingress: anonymous
//! services, then the client JWT, verified once and then trusted from a small per-connection
//! [`VerifyCache`] until its `exp`, the end of its key version's grace period, or the next
//! keyring snapshot, whichever comes first. An HTTP connection and a websocket session keep one
//! entry (one client, one token); a peer link keeps several, because the requests of many
//! clients of its cluster cross it.

use super::Answer;
use crate::auth::{self, Keyring};
use std::rc::Rc;

/// One verified token.
struct Entry {
    token: Box<[u8]>,
    key_generation: u64,
    app: Box<str>,
    sub: Rc<str>,
    exp: u64,
    /// `exp`, or the end of the key version's grace period if sooner.
    until: u64,
}

/// Tokens verified on one connection. Lookups allocate nothing; a miss that verifies stores
/// one entry (evicting round robin when full).
pub(crate) struct VerifyCache {
    entries: Vec<Entry>,
    capacity: usize,
    next: usize,
}

impl VerifyCache {
    /// A cache of at most `capacity` tokens (at least one).
    pub(crate) fn new(capacity: usize) -> VerifyCache {
        VerifyCache {
            entries: Vec::new(),
            capacity: capacity.max(1),
            next: 0,
        }
    }

    fn find(&self, token: &[u8], key_generation: u64, now: u64) -> Option<&Entry> {
        // The signature ends the token and differs between tokens: compare the tail first.
        let tail = |t: &[u8]| t.len().saturating_sub(8);
        self.entries.iter().find(|e| {
            e.token.len() == token.len()
                && e.token[tail(&e.token)..] == token[tail(token)..]
                && *e.token == *token
                && e.key_generation == key_generation
                && e.until > now
        })
    }

    fn insert(&mut self, e: Entry) {
        if let Some(slot) = self.entries.iter_mut().find(|old| *old.token == *e.token) {
            *slot = e;
        } else if self.entries.len() < self.capacity {
            self.entries.push(e);
        } else {
            self.entries[self.next] = e;
            self.next = (self.next + 1) % self.capacity;
        }
    }
}

/// Who a request is from, once authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// No token, for one of the app's anonymous services.
    Anonymous,
    /// The `sub` of a verified client JWT; `cached` when the cache answered.
    Client {
        /// The JWT's `sub`.
        sub: Rc<str>,
        /// True when the token was not verified again.
        cached: bool,
        /// The token's `exp`, unix seconds.
        exp: u64,
    },
}

impl Principal {
    /// The subject sent to the task ("" for anonymous requests).
    pub(crate) fn subject(&self) -> &str {
        match self {
            Principal::Anonymous => "",
            Principal::Client { sub, .. } => sub,
        }
    }
}

/// The keyring a request is checked against, with the generation it was published at.
pub(crate) struct Keys<'a> {
    /// The keyring.
    pub(crate) keyring: &'a Keyring,
    /// Changes with every published keyring: cached verifications end with it.
    pub(crate) generation: u64,
    /// Seconds an old key version keeps verifying after a newer one signs.
    pub(crate) grace_secs: u64,
}

/// Authorizes a request for `app` of this cluster. `anonymous` says whether `service` may be
/// called without a token. Errors are the client's answer (401 or 403).
#[allow(clippy::result_large_err)]
pub(crate) fn authorize(
    cache: &mut VerifyCache,
    keys: &Keys<'_>,
    app: &str,
    anonymous: bool,
    credential: Option<&[u8]>,
    now: u64,
) -> Result<Principal, Answer> {
    let Some(token) = credential else {
        if anonymous {
            return Ok(Principal::Anonymous);
        }
        return Err(Answer::error(
            401,
            "missing_token",
            "Authorization: Bearer <JWT> required",
        ));
    };
    if let Some(e) = cache.find(token, keys.generation, now) {
        if &*e.app != app {
            return Err(Answer::error(403, "wrong_app", "token of another app"));
        }
        return Ok(Principal::Client {
            sub: e.sub.clone(),
            cached: true,
            exp: e.exp,
        });
    }
    let tok = std::str::from_utf8(token).unwrap_or("");
    match auth::verify_client_jwt(keys.keyring, app, tok, now, keys.grace_secs) {
        Ok(claims) => {
            let sub: Rc<str> = claims.sub.as_str().into();
            let until = auth::trusted_until(keys.keyring, app, tok, &claims, now, keys.grace_secs);
            cache.insert(Entry {
                token: token.into(),
                key_generation: keys.generation,
                app: claims.app.into(),
                sub: sub.clone(),
                exp: claims.exp,
                until,
            });
            Ok(Principal::Client {
                sub,
                cached: false,
                exp: claims.exp,
            })
        }
        Err(e) => Err(Answer::error(e.http_status(), e.code(), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{sign_client_jwt, ClientClaims};

    /// A fresh keyring with `apps`, made in a temporary directory that is removed again.
    fn keyring_with(apps: &[&str], now: u64) -> Keyring {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fedbus-verify-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Keyring::init(&dir, apps, now).expect("init");
        let kr = Keyring::load(&dir).expect("load");
        let _ = std::fs::remove_dir_all(&dir);
        kr
    }

    fn token(kr: &Keyring, app: &str, sub: &str, now: u64) -> String {
        let s = kr.signing_app_secret(app).expect("secret");
        sign_client_jwt(
            s,
            &ClientClaims {
                sub: sub.into(),
                app: app.into(),
                exp: now + 3600,
                iat: now,
                nbf: Some(now),
            },
        )
        .expect("sign")
    }

    fn code(r: Result<Principal, Answer>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(a) => a.error_code().unwrap_or("?"),
        }
    }

    #[test]
    fn verified_once_then_cached_until_the_keyring_moves() {
        let now = auth::now_unix();
        let kr = keyring_with(&["demo/echo"], now);
        let t = token(&kr, "demo/echo", "alice", now);
        let mut cache = VerifyCache::new(1);
        let keys = Keys {
            keyring: &kr,
            generation: 1,
            grace_secs: 60,
        };
        let first = authorize(
            &mut cache,
            &keys,
            "demo/echo",
            false,
            Some(t.as_bytes()),
            now,
        );
        assert!(matches!(first, Ok(Principal::Client { cached: false, .. })));
        let second = authorize(
            &mut cache,
            &keys,
            "demo/echo",
            false,
            Some(t.as_bytes()),
            now,
        );
        assert!(
            matches!(second, Ok(Principal::Client { cached: true, ref sub, .. }) if &**sub == "alice")
        );
        // A new keyring snapshot ends every cached verification.
        let moved = Keys {
            generation: 2,
            ..keys
        };
        let third = authorize(
            &mut cache,
            &moved,
            "demo/echo",
            false,
            Some(t.as_bytes()),
            now,
        );
        assert!(matches!(third, Ok(Principal::Client { cached: false, .. })));
        // The cached token is not good for another app.
        assert_eq!(
            code(authorize(
                &mut cache,
                &moved,
                "demo/other",
                false,
                Some(t.as_bytes()),
                now
            )),
            "wrong_app"
        );
    }

    #[test]
    fn anonymous_services_and_missing_tokens() {
        let now = auth::now_unix();
        let kr = keyring_with(&["demo/echo"], now);
        let keys = Keys {
            keyring: &kr,
            generation: 1,
            grace_secs: 60,
        };
        let mut cache = VerifyCache::new(1);
        assert_eq!(
            authorize(&mut cache, &keys, "demo/echo", true, None, now).ok(),
            Some(Principal::Anonymous)
        );
        assert_eq!(
            code(authorize(&mut cache, &keys, "demo/echo", false, None, now)),
            "missing_token"
        );
        assert_eq!(
            code(authorize(
                &mut cache,
                &keys,
                "demo/echo",
                false,
                Some(b"x.y.z"),
                now
            )),
            "bad_token"
        );
    }

    #[test]
    fn a_cache_of_several_tokens_keeps_each() {
        let now = auth::now_unix();
        let kr = keyring_with(&["demo/echo"], now);
        let keys = Keys {
            keyring: &kr,
            generation: 1,
            grace_secs: 60,
        };
        let toks: Vec<String> = (0..4)
            .map(|i| token(&kr, "demo/echo", &format!("u{i}"), now))
            .collect();
        let mut cache = VerifyCache::new(4);
        for t in &toks {
            authorize(
                &mut cache,
                &keys,
                "demo/echo",
                false,
                Some(t.as_bytes()),
                now,
            )
            .expect("ok");
        }
        for (i, t) in toks.iter().enumerate() {
            let p = authorize(
                &mut cache,
                &keys,
                "demo/echo",
                false,
                Some(t.as_bytes()),
                now,
            );
            assert!(
                matches!(p, Ok(Principal::Client { cached: true, ref sub, .. }) if **sub == *format!("u{i}")),
                "{i}"
            );
        }
    }
}
