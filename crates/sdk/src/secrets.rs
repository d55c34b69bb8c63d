//! App secrets pushed to an `auth` task, and client JWTs signed with them.

use fedbus_proto::link::{SecretPush, SecretStore};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The newest app secret of each app pushed to this task (role `auth`: docs/PROTOCOL.md
/// section 7). Cheap to clone; every clone sees the same secrets.
#[derive(Clone, Default)]
pub struct Secrets(Arc<Mutex<SecretStore>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret bytes.
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    /// An empty store.
    pub fn new() -> Secrets {
        Secrets::default()
    }

    fn lock(&self) -> MutexGuard<'_, SecretStore> {
        // The store is consistent after every call: a panic elsewhere does not spoil it.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest `(version, secret)` pushed for `app`, if any.
    pub fn secret(&self, app: &str) -> Option<(u32, Vec<u8>)> {
        self.lock().get(app).map(|(v, s)| (v, s.to_vec()))
    }

    /// The newest secret version pushed for `app`, if any.
    pub fn version(&self, app: &str) -> Option<u32> {
        self.lock().get(app).map(|(v, _)| v)
    }

    /// Keeps `push` if newer than what is held; true if kept.
    pub(crate) fn offer(&self, push: SecretPush) -> bool {
        self.lock().offer(push)
    }

    /// A client JWT for `sub` on `app`, valid for `ttl` from now, signed with the newest
    /// secret pushed (HS256, `kid` = the version, claims `sub`, `app`, `iat`, `exp`: what the
    /// router verifies, docs/ROTATION.md). None until a secret for `app` arrived.
    pub fn sign_client_jwt(&self, app: &str, sub: &str, ttl: Duration) -> Option<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.sign_client_jwt_at(app, sub, now, now.saturating_add(ttl.as_secs()))
    }

    /// [`Secrets::sign_client_jwt`] with explicit `iat` and `exp` (unix seconds).
    pub fn sign_client_jwt_at(&self, app: &str, sub: &str, iat: u64, exp: u64) -> Option<String> {
        let (version, secret) = self.secret(app)?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(version.to_string());
        let claims = serde_json::json!({"sub": sub, "app": app, "iat": iat, "exp": exp});
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn keeps_the_newest_and_signs_with_it() {
        let s = Secrets::new();
        assert_eq!(s.secret("demo/echo"), None);
        assert_eq!(
            s.sign_client_jwt("demo/echo", "alice", Duration::from_secs(60)),
            None
        );
        let push = |v: u32, b: &'static [u8]| SecretPush {
            app: "demo/echo".into(),
            version: v,
            secret: Bytes::from_static(b),
        };
        assert!(s
            .clone()
            .offer(push(2, b"k2k2k2k2k2k2k2k2k2k2k2k2k2k2k2k2")));
        assert!(!s.offer(push(1, b"old")));
        assert_eq!(s.version("demo/echo"), Some(2));
        assert_eq!(format!("{s:?}"), "Secrets { .. }");

        let t = s
            .sign_client_jwt_at("demo/echo", "alice", 1_700_000_000, 1_700_003_600)
            .unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let d = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"k2k2k2k2k2k2k2k2k2k2k2k2k2k2k2k2"),
            &v,
        )
        .unwrap();
        assert_eq!(d.header.kid.as_deref(), Some("2"));
        assert_eq!(
            d.claims,
            serde_json::json!({"sub":"alice","app":"demo/echo","iat":1_700_000_000u64,"exp":1_700_003_600u64})
        );
    }
}
