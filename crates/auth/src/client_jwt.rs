//! Client JWTs: HS256 tokens signed with an app secret, `kid` = secret version.
//!
//! The app's Auth Service signs them ([`sign_client_jwt`]); the router verifies them on every
//! request ([`verify_client_jwt`]) against a keyring snapshot. Only HS256 is accepted: the
//! algorithm is checked from the header before any key is chosen, so `none`, RS256 or HS512
//! never reach a verifier. Bounded in length; never panics on bad input.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::keyring::{usable_version, AppSecretVersion, Keyring};
use super::AuthError;

/// Longest token accepted, checked before any decoding.
pub const MAX_CLIENT_JWT_LEN: usize = 8192;
/// Clock skew allowed on `exp` and `nbf`, seconds (jsonwebtoken's default of 60 is too loose).
const LEEWAY_SECS: u64 = 5;

/// Claims of a client JWT. `sub`, `app`, `iat` and `exp` are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientClaims {
    /// The client (user) the token was issued to.
    pub sub: String,
    /// `owner/app` the token is good for.
    pub app: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds.
    pub exp: u64,
    /// Not valid before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Signs `claims` with `secret` (HS256, header `kid` = the version in decimal).
pub fn sign_client_jwt(
    secret: &AppSecretVersion,
    claims: &ClientClaims,
) -> Result<String, AuthError> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(secret.version.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&secret.secret))
        .map_err(|_| AuthError::BadToken("cannot sign claims"))
}

/// Verifies a client JWT for `expected_app`.
///
/// The key version comes from the header `kid` and is checked with the rotation rule at `now`;
/// `exp` and `nbf` are checked by jsonwebtoken against the system clock with 5 s leeway.
/// Any `u64` claim (`exp = u64::MAX` included) and any `now`/`grace_secs` is handled without
/// overflow; a claim outside `u64` is a [`AuthError::BadToken`].
/// A valid token for another app gives [`AuthError::WrongApp`] (HTTP 403), whether that app's
/// secret or this one's signed it; all else 401.
pub fn verify_client_jwt(
    keyring: &Keyring,
    expected_app: &str,
    token: &str,
    now: u64,
    grace_secs: u64,
) -> Result<ClientClaims, AuthError> {
    match verify_for_app(keyring, expected_app, token, now, grace_secs) {
        Err(
            e @ (AuthError::BadSignature | AuthError::UnknownKey(_) | AuthError::RetiredKey(_)),
        ) => {
            // Signed by another app's secret: 403 if it is a valid token of that app.
            match claimed_app(token) {
                Some(other)
                    if other != expected_app
                        && verify_for_app(keyring, &other, token, now, grace_secs).is_ok() =>
                {
                    Err(AuthError::WrongApp)
                }
                _ => Err(e),
            }
        }
        r => r,
    }
}

fn verify_for_app(
    keyring: &Keyring,
    expected_app: &str,
    token: &str,
    now: u64,
    grace_secs: u64,
) -> Result<ClientClaims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.len() > MAX_CLIENT_JWT_LEN {
        return Err(AuthError::BadToken("token too long"));
    }
    // An unknown alg such as "none" (any case) fails to parse here.
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| AuthError::BadToken("bad header"))?;
    if header.alg != Algorithm::HS256 {
        return Err(AuthError::BadToken("algorithm not allowed"));
    }
    let kid = kid_version(
        header
            .kid
            .as_deref()
            .ok_or(AuthError::BadToken("missing kid"))?,
    )
    .ok_or(AuthError::BadToken("kid is not a version number"))?;
    let versions = keyring
        .app_versions(expected_app)
        .ok_or(AuthError::UnknownApp)?;
    let secret = usable_version(versions, kid, now, grace_secs)?;

    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECS;
    // `iat` and `app` are not spec claims for jsonwebtoken; serde requires them (no default).
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<ClientClaims>(
        token,
        &DecodingKey::from_secret(&secret.secret),
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::ExpiredToken,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm => AuthError::BadToken("algorithm not allowed"),
        ErrorKind::MissingRequiredClaim(_) => AuthError::BadToken("missing or malformed claim"),
        _ => AuthError::BadToken("malformed token"),
    })?;
    if data.claims.app != expected_app {
        return Err(AuthError::WrongApp);
    }
    Ok(data.claims)
}

/// The `app` claim of a token, read WITHOUT verifying it: only to pick the app whose secret
/// then verifies the token (the client websocket endpoint learns the app from the token, not
/// from a path). Never trust the result before `verify_client_jwt` succeeds.
pub fn claimed_app(token: &str) -> Option<String> {
    use base64::Engine;
    if token.len() > MAX_CLIENT_JWT_LEN {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get("app")?.as_str().map(str::to_string)
}

/// The header `kid` as an app secret version: decimal digits only (`+1` is not version 1). The
/// rule of `fedbus_proto::parse_decimal`, which this crate does not depend on.
fn kid_version(kid: &str) -> Option<u32> {
    if kid.is_empty() || !kid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    kid.parse().ok()
}

/// Whether a client JWT with this `exp` has expired at `now` (unix seconds), with the leeway
/// [`verify_client_jwt`] allows: a session accepted on a token must keep serving it as long as
/// an HTTP request carrying it would be.
pub fn client_token_expired(exp: u64, now: u64) -> bool {
    now > exp.saturating_add(LEEWAY_SECS)
}

/// Until when a token that just verified may be trusted without verifying it again: its `exp`,
/// or earlier the end of its key version's grace period (a per-connection verify cache must
/// not outlive a retiring key).
///
/// Unix seconds, any `u64` up to `u64::MAX` (a far-future `exp` with the newest key): compare
/// it with `now`, and to arm a timer use [`crate::expiry_wait`], which caps the wait at
/// [`crate::MAX_EXPIRY_WAIT_SECS`].
pub fn trusted_until(
    keyring: &Keyring,
    app: &str,
    token: &str,
    claims: &ClientClaims,
    now: u64,
    grace_secs: u64,
) -> u64 {
    let kid = jsonwebtoken::decode_header(token)
        .ok()
        .and_then(|h| h.kid)
        .and_then(|k| kid_version(&k));
    let until = match (kid, keyring.app_versions(app)) {
        (Some(kid), Some(v)) => match super::check_version(v, kid, now, grace_secs) {
            super::VersionState::Newest => u64::MAX,
            super::VersionState::Grace { until } => until,
            _ => now,
        },
        _ => now,
    };
    // The `exp` with the leeway `verify_client_jwt` allows: a token inside it verifies again
    // anyway, so a cache that dropped it at `exp` would only pay that verify per request.
    claims.exp.saturating_add(LEEWAY_SECS).min(until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::now_unix;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ring::hmac;
    use std::collections::HashMap;

    const APP: &str = "acme/shop";
    const GRACE: u64 = 3600;

    fn secret(version: u32, created: u64, fill: u8) -> AppSecretVersion {
        AppSecretVersion {
            version,
            secret: vec![fill; 32],
            created,
        }
    }

    /// A keyring with `acme/shop` v1 (old) and v2 (created `v2_age` seconds ago).
    fn keyring(now: u64, v2_age: u64) -> Keyring {
        let mut apps = HashMap::new();
        apps.insert(
            APP.to_string(),
            vec![secret(1, now - 1_000_000, 1), secret(2, now - v2_age, 2)],
        );
        apps.insert("other/app".to_string(), vec![secret(1, now - 10, 9)]);
        Keyring {
            cluster: Vec::new(),
            apps,
        }
    }

    fn claims(now: u64) -> ClientClaims {
        ClientClaims {
            sub: "user-1".into(),
            app: APP.into(),
            iat: now,
            exp: now + 600,
            nbf: None,
        }
    }

    /// Builds a JWT by hand from raw header and payload JSON, HMAC-SHA256 with `key`.
    fn craft(header: &str, payload: &str, key: &[u8]) -> String {
        let msg = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg.as_bytes());
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn verify(k: &Keyring, token: &str, now: u64) -> Result<ClientClaims, AuthError> {
        verify_client_jwt(k, APP, token, now, GRACE)
    }

    #[test]
    fn client_jwt_round_trip() {
        let now = now_unix();
        let k = keyring(now, 10);
        let signing = k.signing_app_secret(APP).unwrap();
        assert_eq!(signing.version, 2);
        let mut c = claims(now);
        c.nbf = Some(now - 1);
        let token = sign_client_jwt(signing, &c).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.kid.as_deref(), Some("2"));
        assert_eq!(verify(&k, &token, now).unwrap(), c);
        // The hand-crafted path agrees with jsonwebtoken's.
        let hand = craft(
            r#"{"alg":"HS256","typ":"JWT","kid":"2"}"#,
            &serde_json::to_string(&claims(now)).unwrap(),
            &[2u8; 32],
        );
        assert_eq!(verify(&k, &hand, now).unwrap(), claims(now));
    }

    #[test]
    fn client_jwt_wrong_key_is_refused() {
        let now = now_unix();
        let k = keyring(now, 10);
        let token = sign_client_jwt(&secret(2, now, 0x55), &claims(now)).unwrap();
        assert!(matches!(
            verify(&k, &token, now),
            Err(AuthError::BadSignature)
        ));
        // Another app's valid token, presented to acme/shop: its key does not match.
        let other = ClientClaims {
            app: "other/app".into(),
            ..claims(now)
        };
        let token = sign_client_jwt(k.signing_app_secret("other/app").unwrap(), &other).unwrap();
        assert!(verify(&k, &token, now).is_err());
    }

    #[test]
    fn client_jwt_alg_none_rs256_hs512_are_refused() {
        let now = now_unix();
        let k = keyring(now, 10);
        let payload = serde_json::to_string(&claims(now)).unwrap();
        for alg in ["none", "None", "NONE", "nOnE"] {
            let h = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"2"}}"#));
            let p = URL_SAFE_NO_PAD.encode(&payload);
            for token in [format!("{h}.{p}."), format!("{h}.{p}")] {
                let e = verify(&k, &token, now).unwrap_err();
                assert!(matches!(e, AuthError::BadToken(_)), "{alg}: {e:?}");
            }
        }
        // RS256 header with an HMAC over the app secret (key confusion attempt).
        let t = craft(
            r#"{"alg":"RS256","typ":"JWT","kid":"2"}"#,
            &payload,
            &[2u8; 32],
        );
        assert!(matches!(verify(&k, &t, now), Err(AuthError::BadToken(_))));
        // HS512 with the right secret and kid, signed by jsonwebtoken itself.
        let mut h = Header::new(Algorithm::HS512);
        h.kid = Some("2".into());
        let t =
            jsonwebtoken::encode(&h, &claims(now), &EncodingKey::from_secret(&[2u8; 32])).unwrap();
        assert!(matches!(verify(&k, &t, now), Err(AuthError::BadToken(_))));
    }

    #[test]
    fn client_jwt_expired_and_nbf_in_future() {
        let now = now_unix();
        let k = keyring(now, 10);
        let s = k.signing_app_secret(APP).unwrap();
        let c = ClientClaims {
            iat: now - 700,
            exp: now - 100,
            ..claims(now)
        };
        let t = sign_client_jwt(s, &c).unwrap();
        let e = verify(&k, &t, now).unwrap_err();
        assert!(matches!(e, AuthError::ExpiredToken), "{e:?}");
        assert_eq!(e.code(), "expired_token");

        let c = ClientClaims {
            nbf: Some(now + 300),
            ..claims(now)
        };
        let t = sign_client_jwt(s, &c).unwrap();
        assert!(matches!(verify(&k, &t, now), Err(AuthError::NotYetValid)));
    }

    #[test]
    fn client_jwt_malformed_claims_are_refused() {
        let now = now_unix();
        let k = keyring(now, 10);
        let h = r#"{"alg":"HS256","typ":"JWT","kid":"2"}"#;
        let key = [2u8; 32];
        let far = now + 600;
        let bad_payloads = [
            // exp as a string: jsonwebtoken sees no numeric exp.
            format!(r#"{{"sub":"u","app":"{APP}","iat":{now},"exp":"{far}"}}"#),
            // exp as a float: jsonwebtoken accepts it, our u64 claim does not.
            format!(r#"{{"sub":"u","app":"{APP}","iat":{now},"exp":{far}.5}}"#),
            format!(r#"{{"sub":"u","app":"{APP}","iat":{now}}}"#),
            format!(r#"{{"app":"{APP}","iat":{now},"exp":{far}}}"#),
            format!(r#"{{"sub":"u","iat":{now},"exp":{far}}}"#),
            format!(r#"{{"sub":"u","app":"{APP}","exp":{far}}}"#),
            format!(r#"{{"sub":"u","app":"{APP}","iat":{now},"exp":-1}}"#),
            "[]".to_string(),
            "not json".to_string(),
        ];
        // jsonwebtoken reports a string exp as a missing claim; confirm it.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let raw = jsonwebtoken::decode::<serde_json::Value>(
            craft(h, &bad_payloads[0], &key),
            &DecodingKey::from_secret(&key),
            &validation,
        );
        assert!(
            matches!(raw.as_ref().map_err(|e| e.kind()), Err(ErrorKind::MissingRequiredClaim(c)) if c == "exp"),
            "{raw:?}"
        );
        for p in &bad_payloads {
            let t = craft(h, p, &key);
            let e = verify(&k, &t, now).unwrap_err();
            assert!(matches!(e, AuthError::BadToken(_)), "{p}: {e:?}");
        }
        // The same crafting with a good payload passes: the failures above are the claims.
        let good = format!(r#"{{"sub":"u","app":"{APP}","iat":{now},"exp":{far}}}"#);
        assert!(verify(&k, &craft(h, &good, &key), now).is_ok());
    }

    #[test]
    fn client_jwt_other_app_is_wrong_app_403() {
        let now = now_unix();
        let k = keyring(now, 10);
        let c = ClientClaims {
            app: "other/app".into(),
            ..claims(now)
        };
        // Signed with acme/shop's key but claiming another app.
        let t = sign_client_jwt(k.signing_app_secret(APP).unwrap(), &c).unwrap();
        let e = verify(&k, &t, now).unwrap_err();
        assert!(matches!(e, AuthError::WrongApp), "{e:?}");
        assert_eq!(e.http_status(), 403);
        // An app the keyring does not know.
        let t = sign_client_jwt(k.signing_app_secret(APP).unwrap(), &claims(now)).unwrap();
        assert!(matches!(
            verify_client_jwt(&k, "nobody/here", &t, now, GRACE),
            Err(AuthError::UnknownApp)
        ));
    }

    #[test]
    fn client_jwt_kid_unknown_missing_and_rotation() {
        let now = now_unix();
        let payload = serde_json::to_string(&claims(now)).unwrap();
        // v2 replaced v1 10 s ago: v1 is inside its grace.
        let k = keyring(now, 10);
        let v1 = sign_client_jwt(&secret(1, 0, 1), &claims(now)).unwrap();
        assert!(verify(&k, &v1, now).is_ok());
        // Same token once the grace is over (v2 created 2 h ago, grace 1 h).
        let k_later = keyring(now, 2 * GRACE);
        let e = verify(&k_later, &v1, now).unwrap_err();
        assert!(matches!(e, AuthError::RetiredKey(1)), "{e:?}");
        assert_eq!(e.code(), "retired_key");
        // Boundary: exactly at created(v2) + grace, v1 is retired; a second before it is not.
        let k_edge = keyring(now, GRACE);
        assert!(matches!(
            verify(&k_edge, &v1, now),
            Err(AuthError::RetiredKey(1))
        ));
        assert!(verify(&k_edge, &v1, now - 1).is_ok());

        let t = sign_client_jwt(&secret(7, 0, 7), &claims(now)).unwrap();
        assert!(matches!(verify(&k, &t, now), Err(AuthError::UnknownKey(7))));
        for h in [
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"HS256","kid":"abc"}"#,
            r#"{"alg":"HS256","kid":"-1"}"#,
            r#"{"alg":"HS256","kid":"99999999999"}"#,
            r#"{"alg":"HS256","kid":2}"#,
        ] {
            let e = verify(&k, &craft(h, &payload, &[2u8; 32]), now).unwrap_err();
            assert!(matches!(e, AuthError::BadToken(_)), "{h}: {e:?}");
        }
    }

    /// Property over extreme values: exp, iat and nbf in {0, 1, u32::MAX, i64::MAX, u64::MAX}
    /// and grace likewise: never a panic; `exp` and `nbf` follow the rule (all these values are
    /// far from the system clock, so the 5 s leeway does not matter); `trusted_until` never
    /// exceeds `exp` and is safe to wait for.
    #[test]
    fn client_jwt_extreme_times_never_panic() {
        let now = now_unix();
        let extremes = [0, 1, u32::MAX as u64, i64::MAX as u64, u64::MAX];
        let k = keyring(now, 10);
        let nbfs = [
            None,
            Some(0),
            Some(1),
            Some(u32::MAX as u64),
            Some(i64::MAX as u64),
            Some(u64::MAX),
        ];
        for exp in extremes {
            for iat in extremes {
                for nbf in nbfs {
                    let c = ClientClaims {
                        iat,
                        exp,
                        nbf,
                        ..claims(now)
                    };
                    let new = sign_client_jwt(k.signing_app_secret(APP).unwrap(), &c).unwrap();
                    let old = sign_client_jwt(&secret(1, 0, 1), &c).unwrap();
                    let expect_ok = exp > now && nbf.is_none_or(|n| n <= now);
                    for grace in extremes {
                        for t in [&new, &old] {
                            let r = verify_client_jwt(&k, APP, t, now, grace);
                            // v1 was replaced 10 s ago: inside any grace above 10 s.
                            let in_grace = std::ptr::eq(t, &new) || grace > 10;
                            assert_eq!(
                                r.is_ok(),
                                expect_ok && in_grace,
                                "exp {exp} iat {iat} nbf {nbf:?} grace {grace}: {r:?}"
                            );
                            if let Ok(got) = r {
                                assert_eq!(got, c);
                                let until = trusted_until(&k, APP, t, &got, now, grace);
                                // `exp` with the verify's leeway, at most.
                                assert!(
                                    until <= exp.saturating_add(LEEWAY_SECS) && until > now,
                                    "{until}"
                                );
                                let _ = std::time::Instant::now() + crate::expiry_wait(until, now);
                            }
                        }
                    }
                }
            }
        }
        // A claim outside u64 is a bad token, not a wrap or a panic.
        for exp in ["18446744073709551616", "1e30", "-9223372036854775808"] {
            let p = format!(r#"{{"sub":"u","app":"{APP}","iat":0,"exp":{exp}}}"#);
            let t = craft(r#"{"alg":"HS256","kid":"2"}"#, &p, &[2u8; 32]);
            assert!(
                matches!(verify(&k, &t, now), Err(AuthError::BadToken(_))),
                "{exp}"
            );
        }
        // trusted_until itself with extreme now/grace and a claims value it did not verify.
        let t = sign_client_jwt(&secret(1, 0, 1), &claims(now)).unwrap();
        for now in extremes {
            for grace in extremes {
                for exp in extremes {
                    let c = ClientClaims { exp, ..claims(0) };
                    let until = trusted_until(&k, APP, &t, &c, now, grace);
                    assert!(until <= exp.saturating_add(LEEWAY_SECS));
                }
            }
        }
    }

    #[test]
    fn client_jwt_garbage_never_panics() {
        let now = now_unix();
        let k = keyring(now, 10);
        let good = sign_client_jwt(k.signing_app_secret(APP).unwrap(), &claims(now)).unwrap();
        let mut inputs: Vec<String> = [
            "",
            ".",
            "..",
            "...",
            "a.b.c",
            "a.b",
            "Bearer x",
            "é.é.é",
            "\u{0}.\u{0}.\u{0}",
            "eyJhbGciOiJIUzI1NiJ9..",
            "eyJhbGciOiJIUzI1NiJ9.e30.",
            "e30.e30.e30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        inputs.push("a".repeat(MAX_CLIENT_JWT_LEN + 1));
        inputs.push(format!("{good}.extra"));
        for i in 0..good.len() {
            inputs.push(good[..i].to_string());
            let mut b = good.clone().into_bytes();
            b[i] ^= 0x01;
            if let Ok(s) = String::from_utf8(b) {
                inputs.push(s);
            }
        }
        for s in &inputs {
            let r = verify(&k, s, now);
            assert!(r.is_err(), "accepted {s:?}");
            assert_eq!(r.unwrap_err().http_status(), 401, "{s:?}");
        }
        assert!(matches!(verify(&k, "", now), Err(AuthError::MissingToken)));
    }

    #[test]
    fn client_jwt_signed_with_keyring_from_disk() {
        let tmp = crate::test_util::TempDir::new("jwt-disk");
        let now = now_unix();
        Keyring::init(tmp.path(), &[APP], now - 100_000).unwrap();
        let k1 = Keyring::load(tmp.path()).unwrap();
        let old = sign_client_jwt(k1.signing_app_secret(APP).unwrap(), &claims(now)).unwrap();
        assert_eq!(Keyring::rotate_app(tmp.path(), APP, now - 60).unwrap(), 2);
        let k2 = Keyring::load(tmp.path()).unwrap();
        let new = sign_client_jwt(k2.signing_app_secret(APP).unwrap(), &claims(now)).unwrap();
        assert!(verify_client_jwt(&k2, APP, &new, now, 120).is_ok());
        assert!(verify_client_jwt(&k2, APP, &old, now, 120).is_ok());
        assert!(matches!(
            verify_client_jwt(&k2, APP, &old, now + 60, 120),
            Err(AuthError::RetiredKey(1))
        ));
        // Tokens of the old keyring fail against a freshly initialised one.
        let other = crate::test_util::TempDir::new("jwt-disk-other");
        Keyring::init(other.path(), &[APP], now).unwrap();
        let k3 = Keyring::load(other.path()).unwrap();
        assert!(matches!(
            verify_client_jwt(&k3, APP, &old, now, 120),
            Err(AuthError::BadSignature)
        ));
    }
}
