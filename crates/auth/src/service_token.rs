//! Service tokens: what a task (or a peer router) presents when it opens a link.
//!
//! Format: `fbs1.<base64url(JSON claims)>.<base64url(Ed25519 signature over "fbs1.<claims>")>`,
//! signed by the cluster key (version in `kid`). Signing happens in tools that hold the private
//! key; routers only verify, with the public halves in the keyring. Verification is pure (the
//! caller passes `now`), bounded in length, and never panics.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use super::keyring::{usable_version, ClusterKeyVersion};
use super::AuthError;

/// Longest token accepted, checked before any decoding.
pub const MAX_SERVICE_TOKEN_LEN: usize = 4096;
/// How far `iat` may lie in the future (clock skew between signer and router), seconds.
const MAX_IAT_SKEW_SECS: u64 = 60;
const PREFIX: &str = "fbs1.";

/// Claims of a service token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceClaims {
    /// Cluster key version that signed the token.
    pub kid: u32,
    /// Task id, or router name for a peer router.
    pub sub: String,
    /// `owner/app` of the task; empty for routers.
    pub app: String,
    /// `<region>/<cluster>` the token was issued for.
    pub cluster: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds (exclusive).
    pub exp: u64,
    /// Role the task may register in; absent: any role but `auth` (the role that receives the
    /// app secret must be named by the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Only the key version, read before the signature is checked to pick the key.
#[derive(Deserialize)]
struct KidOnly {
    kid: u32,
}

/// Signs `claims` with the cluster private key. `claims.kid` must name that key's version.
pub fn sign_service_token(key: &Ed25519KeyPair, claims: &ServiceClaims) -> String {
    // Serializing a struct of strings and integers cannot fail.
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let mut token = String::with_capacity(PREFIX.len() + json.len() * 2 + 100);
    token.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(&json, &mut token);
    let sig = key.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
    token
}

/// Verifies a service token against the cluster public keys under the rotation rule.
///
/// Order: length, structure, base64, key version (unknown / retired), signature, claims,
/// `exp > now`, `iat <= now + 60`.
///
/// Every `u64` is accepted for `now`, `grace_secs` and the claims without overflow (the sums
/// saturate). `exp` has no upper bound: `u64::MAX` verifies and never expires. A caller that
/// arms a timer for `exp` must use [`crate::expiry_wait`] (capped at
/// [`crate::MAX_EXPIRY_WAIT_SECS`]), never `Duration::from_secs(exp - now)` added to an
/// `Instant`, which panics for such a token.
pub fn verify_service_token(
    keys: &[ClusterKeyVersion],
    token: &str,
    now: u64,
    grace_secs: u64,
) -> Result<ServiceClaims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.len() > MAX_SERVICE_TOKEN_LEN {
        return Err(AuthError::BadToken("token too long"));
    }
    let rest = token
        .strip_prefix(PREFIX)
        .ok_or(AuthError::BadToken("not a fbs1 service token"))?;
    let (claims_b64, sig_b64) = rest
        .split_once('.')
        .ok_or(AuthError::BadToken("missing signature"))?;
    if sig_b64.contains('.') {
        return Err(AuthError::BadToken("too many parts"));
    }
    let json = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| AuthError::BadToken("claims are not base64url"))?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| AuthError::BadToken("signature is not base64url"))?;
    let kid = serde_json::from_slice::<KidOnly>(&json)
        .map_err(|_| AuthError::BadToken("claims have no numeric kid"))?
        .kid;
    let key = usable_version(keys, kid, now, grace_secs)?;
    let signed = &token.as_bytes()[..PREFIX.len() + claims_b64.len()];
    UnparsedPublicKey::new(&ED25519, &key.public)
        .verify(signed, &sig)
        .map_err(|_| AuthError::BadSignature)?;
    let claims: ServiceClaims =
        serde_json::from_slice(&json).map_err(|_| AuthError::BadToken("bad claims"))?;
    if claims.sub.is_empty() {
        return Err(AuthError::BadToken("empty sub"));
    }
    if claims.exp <= now {
        return Err(AuthError::ExpiredToken);
    }
    if claims.iat > now.saturating_add(MAX_IAT_SKEW_SECS) {
        return Err(AuthError::NotYetValid);
    }
    Ok(claims)
}

/// The `cluster` claim of a service token, read WITHOUT verifying it: only to pick which
/// cluster's keys then verify the token (peer links).
pub fn claimed_cluster(token: &str) -> Option<String> {
    peek_claims(token)?
        .get("cluster")?
        .as_str()
        .map(str::to_string)
}

/// The claims of a service token as JSON, read WITHOUT verifying it: only for what a holder
/// of its own token wants to know (its key version, its expiry), never to trust it.
pub fn peek_claims(token: &str) -> Option<serde_json::Value> {
    if token.len() > MAX_SERVICE_TOKEN_LEN {
        return None;
    }
    let claims_b64 = token.strip_prefix(PREFIX)?.split('.').next()?;
    let json = URL_SAFE_NO_PAD.decode(claims_b64).ok()?;
    serde_json::from_slice(&json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    fn gen_key(version: u32, created: u64) -> (Ed25519KeyPair, ClusterKeyVersion) {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        (
            pair,
            ClusterKeyVersion {
                version,
                public,
                created,
            },
        )
    }

    fn claims(kid: u32, now: u64) -> ServiceClaims {
        ServiceClaims {
            kid,
            sub: "task-17".into(),
            app: "acme/shop".into(),
            cluster: "ru/spb1".into(),
            iat: now,
            exp: now + 3600,
            role: None,
        }
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn service_token_round_trip() {
        let (pair, pubkey) = gen_key(1, NOW - 10);
        let c = claims(1, NOW);
        let token = sign_service_token(&pair, &c);
        assert!(token.starts_with("fbs1."));
        assert_eq!(verify_service_token(&[pubkey], &token, NOW, 60).unwrap(), c);
        // A router's token: empty app.
        let (pair, pubkey) = gen_key(1, NOW - 10);
        let mut c = claims(1, NOW);
        c.app.clear();
        c.sub = "router-a".into();
        let token = sign_service_token(&pair, &c);
        assert_eq!(verify_service_token(&[pubkey], &token, NOW, 60).unwrap(), c);
    }

    #[test]
    fn service_token_other_cluster_key_is_refused() {
        let (pair, _) = gen_key(1, NOW);
        let (_, other_pub) = gen_key(1, NOW);
        let token = sign_service_token(&pair, &claims(1, NOW));
        let e = verify_service_token(&[other_pub], &token, NOW, 60).unwrap_err();
        assert!(matches!(e, AuthError::BadSignature), "{e:?}");
        assert_eq!(e.http_status(), 401);
    }

    #[test]
    fn service_token_tampered_claims_are_refused() {
        let (pair, pubkey) = gen_key(1, NOW);
        let token = sign_service_token(&pair, &claims(1, NOW));
        let sig = token.rsplit('.').next().unwrap();
        let mut forged = claims(1, NOW);
        forged.app = "victim/bank".into();
        let json = serde_json::to_vec(&forged).unwrap();
        let forged_token = format!("fbs1.{}.{sig}", URL_SAFE_NO_PAD.encode(json));
        assert!(matches!(
            verify_service_token(std::slice::from_ref(&pubkey), &forged_token, NOW, 60),
            Err(AuthError::BadSignature)
        ));
        // Flipping one signature character is caught too.
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let token = String::from_utf8(bytes).unwrap();
        assert!(verify_service_token(&[pubkey], &token, NOW, 60).is_err());
    }

    #[test]
    fn service_token_expired_and_future_iat() {
        let (pair, pubkey) = gen_key(1, NOW);
        let mut c = claims(1, NOW - 7200);
        c.exp = NOW;
        let token = sign_service_token(&pair, &c);
        assert!(matches!(
            verify_service_token(std::slice::from_ref(&pubkey), &token, NOW, 60),
            Err(AuthError::ExpiredToken)
        ));
        assert!(verify_service_token(std::slice::from_ref(&pubkey), &token, NOW - 1, 60).is_ok());

        let token = sign_service_token(&pair, &claims(1, NOW + 61));
        assert!(matches!(
            verify_service_token(std::slice::from_ref(&pubkey), &token, NOW, 60),
            Err(AuthError::NotYetValid)
        ));
        let token = sign_service_token(&pair, &claims(1, NOW + 60));
        assert!(verify_service_token(&[pubkey], &token, NOW, 60).is_ok());
    }

    #[test]
    fn service_token_rotation_unknown_retired_grace() {
        let (old_pair, v1) = gen_key(1, NOW - 100_000);
        let (new_pair, v2) = gen_key(2, NOW - 1000);
        let keys = [v1, v2];
        let grace = 3600;
        let old = sign_service_token(&old_pair, &claims(1, NOW));
        let new = sign_service_token(&new_pair, &claims(2, NOW));
        // v2 created 1000 s ago, grace 1 h: v1 still verifies.
        assert!(verify_service_token(&keys, &old, NOW, grace).is_ok());
        assert!(verify_service_token(&keys, &new, NOW, grace).is_ok());
        // Grace over: v1 retired, v2 fine.
        let later = NOW - 1000 + grace;
        assert!(matches!(
            verify_service_token(&keys, &old, later, grace),
            Err(AuthError::RetiredKey(1))
        ));
        assert!(verify_service_token(&keys, &new, later, grace).is_ok());
        // A kid the keyring does not hold.
        let (p3, _) = gen_key(3, NOW);
        let t3 = sign_service_token(&p3, &claims(3, NOW));
        assert!(matches!(
            verify_service_token(&keys, &t3, NOW, grace),
            Err(AuthError::UnknownKey(3))
        ));
        // Signed by v2's key but claiming kid 1: checked against v1's public key.
        let lie = sign_service_token(&new_pair, &claims(1, NOW));
        assert!(matches!(
            verify_service_token(&keys, &lie, NOW, grace),
            Err(AuthError::BadSignature)
        ));
    }

    /// Property over extreme values: exp, iat, now and grace in {0, 1, u32::MAX, i64::MAX,
    /// u64::MAX} (and NOW): never a panic, and the result is exactly the documented rule.
    #[test]
    fn service_token_extreme_times_never_panic() {
        let extremes = [0, 1, u32::MAX as u64, i64::MAX as u64, u64::MAX, NOW];
        let (old_pair, v1) = gen_key(1, 0);
        let (new_pair, v2) = gen_key(2, 5);
        let keys = [v1, v2];
        for exp in extremes {
            for iat in extremes {
                let mut c = claims(2, NOW);
                (c.exp, c.iat) = (exp, iat);
                let new = sign_service_token(&new_pair, &c);
                c.kid = 1;
                let old = sign_service_token(&old_pair, &c);
                for now in extremes {
                    for grace in extremes {
                        let time_ok = exp > now && iat <= now.saturating_add(MAX_IAT_SKEW_SECS);
                        let r = verify_service_token(&keys, &new, now, grace);
                        assert_eq!(r.is_ok(), time_ok, "exp {exp} iat {iat} now {now}: {r:?}");
                        if let Ok(got) = &r {
                            assert_eq!((got.exp, got.iat), (exp, iat));
                            let _ = std::time::Instant::now() + crate::expiry_wait(got.exp, now);
                        }
                        // v1 verifies while now < created(v2) + grace (saturating).
                        let in_grace = now < 5u64.saturating_add(grace);
                        let r = verify_service_token(&keys, &old, now, grace);
                        assert_eq!(r.is_ok(), time_ok && in_grace, "old: {r:?}");
                        if !in_grace {
                            assert!(matches!(r, Err(AuthError::RetiredKey(1))), "{r:?}");
                        }
                    }
                }
            }
        }
        // Claims beyond u64 (or negative) are refused as bad claims, not wrapped.
        for exp in [
            "18446744073709551616",
            "-1",
            "1e30",
            "9223372036854775808.5",
        ] {
            let json =
                format!(r#"{{"kid":2,"sub":"s","app":"","cluster":"c","iat":0,"exp":{exp}}}"#);
            let mut t = String::from(PREFIX);
            URL_SAFE_NO_PAD.encode_string(json.as_bytes(), &mut t);
            let sig = new_pair.sign(t.as_bytes());
            t.push('.');
            URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut t);
            assert!(
                matches!(
                    verify_service_token(&keys, &t, NOW, 60),
                    Err(AuthError::BadToken(_))
                ),
                "{exp}"
            );
        }
    }

    #[test]
    fn service_token_garbage_never_panics() {
        let (pair, pubkey) = gen_key(1, NOW);
        let keys = [pubkey];
        let good = sign_service_token(&pair, &claims(1, NOW));
        let long = "fbs1.".to_string() + &"A".repeat(MAX_SERVICE_TOKEN_LEN);
        let mut inputs: Vec<String> = [
            "",
            ".",
            "..",
            "fbs1",
            "fbs1.",
            "fbs1..",
            "fbs1.a.b.c",
            "fbs2.a.b",
            "fbs1.!!!.AAAA",
            "fbs1.e30.AAAA",
            "fbs1.eyJraWQiOiJ4In0.AAAA",
            "fbs1.eyJraWQiOjF9.AAAA",
            "é.é.é",
            "fbs1.\u{0}.\u{0}",
            "Bearer fbs1.a.b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        inputs.push(long);
        // Every prefix and every single-byte mutation of a good token.
        for i in 0..good.len() {
            inputs.push(good[..i].to_string());
            let mut b = good.clone().into_bytes();
            b[i] ^= 0x01;
            if let Ok(s) = String::from_utf8(b) {
                inputs.push(s);
            }
        }
        for s in &inputs {
            let r = verify_service_token(&keys, s, NOW, 60);
            assert!(r.is_err(), "accepted {s:?}");
            assert_eq!(r.unwrap_err().http_status(), 401);
        }
        assert!(matches!(
            verify_service_token(&keys, &"A".repeat(MAX_SERVICE_TOKEN_LEN + 1), NOW, 60),
            Err(AuthError::BadToken("token too long"))
        ));
        assert!(matches!(
            verify_service_token(&keys, "", NOW, 60),
            Err(AuthError::MissingToken)
        ));
    }
}
