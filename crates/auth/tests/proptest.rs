//! Property tests (stable Rust, no nightly fuzzer): the token verifiers and the unverified
//! claim readers take arbitrary strings without panicking, and random input never verifies.
//! Each property runs proptest's default 256 cases (or fewer) so the suite stays fast.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fedbus_auth::service_token::claimed_cluster;
use fedbus_auth::{
    claimed_app, now_unix, sign_client_jwt, verify_client_jwt, verify_service_token,
    AppSecretVersion, ClientClaims, ClusterKeyVersion, Keyring,
};
use proptest::prelude::*;

const APP: &str = "acme/shop";

fn keyring() -> Keyring {
    let mut apps = HashMap::new();
    apps.insert(
        APP.to_string(),
        vec![
            AppSecretVersion {
                version: 1,
                secret: vec![1; 32],
                created: 0,
            },
            AppSecretVersion {
                version: 2,
                secret: vec![2; 32],
                created: now_unix() - 10,
            },
        ],
    );
    Keyring {
        cluster: vec![ClusterKeyVersion {
            version: 1,
            public: [7; 32],
            created: 0,
        }],
        apps,
    }
}

/// Strings over the characters tokens are made of, plus a few that are not.
fn tokenish() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(b"AZaz09-_.=+/ fbs1eyJ".to_vec()),
        0..120,
    )
    .prop_map(|v| String::from_utf8(v).unwrap())
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn client_jwt_arbitrary_strings(s in any::<String>(), t in tokenish(), grace in any::<u64>()) {
        let k = keyring();
        let now = now_unix();
        for tok in [&s, &t] {
            prop_assert!(verify_client_jwt(&k, APP, tok, now, grace).is_err());
            let _ = claimed_app(tok);
        }
    }

    /// A well-formed HS256 header with our kid, arbitrary payload and signature bytes: the
    /// signature check (or the claims) refuse it.
    #[test]
    fn client_jwt_structured_garbage(
        kid in prop::sample::select(vec!["1", "2", "3", "0", "-1", "x"]),
        payload in prop::collection::vec(any::<u8>(), 0..120),
        sig in prop::collection::vec(any::<u8>(), 0..40),
        now in any::<u64>(),
        grace in any::<u64>(),
    ) {
        let k = keyring();
        let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#);
        let tok = format!("{}.{}.{}", b64(header.as_bytes()), b64(&payload), b64(&sig));
        prop_assert!(verify_client_jwt(&k, APP, &tok, now, grace).is_err());
    }

    /// Real claims with arbitrary values, signed by a secret the keyring does not hold.
    #[test]
    fn client_jwt_foreign_key_never_verifies(
        sub in "\\PC{0,20}",
        exp in any::<u64>(),
        iat in any::<u64>(),
        nbf in any::<Option<u64>>(),
        fill in 3u8..=255,
    ) {
        let k = keyring();
        let c = ClientClaims { sub, app: APP.into(), iat, exp, nbf };
        let foreign = AppSecretVersion { version: 2, secret: vec![fill; 32], created: 0 };
        let tok = sign_client_jwt(&foreign, &c).unwrap();
        prop_assert!(verify_client_jwt(&k, APP, &tok, now_unix(), 60).is_err());
        prop_assert_eq!(claimed_app(&tok), Some(APP.to_string()));
    }

    #[test]
    fn service_token_arbitrary_strings(
        s in any::<String>(), t in tokenish(), now in any::<u64>(), grace in any::<u64>()
    ) {
        let k = keyring();
        for tok in [s.clone(), t.clone(), format!("fbs1.{t}")] {
            prop_assert!(verify_service_token(&k.cluster, &tok, now, grace).is_err());
            let _ = claimed_cluster(&tok);
        }
    }

    /// `fbs1.<claims>.<signature>` with arbitrary (JSON-looking or not) claims and signature.
    #[test]
    fn service_token_structured_garbage(
        kid in any::<u32>(),
        exp in any::<u64>(),
        junk in prop::collection::vec(any::<u8>(), 0..80),
        sig in prop::collection::vec(any::<u8>(), 0..80),
        now in any::<u64>(),
        grace in any::<u64>(),
    ) {
        let k = keyring();
        let claims = format!(
            r#"{{"kid":{kid},"sub":"s","app":"","cluster":"c","iat":0,"exp":{exp}}}"#
        );
        for body in [claims.as_bytes(), &junk[..]] {
            let tok = format!("fbs1.{}.{}", b64(body), b64(&sig));
            prop_assert!(verify_service_token(&k.cluster, &tok, now, grace).is_err());
        }
    }

    /// The unverified readers return exactly the claim when it is there.
    #[test]
    fn claimed_app_and_cluster_round_trip(app in "\\PC{0,30}", other in any::<String>()) {
        let json = serde_json::json!({"app": app, "cluster": app, "x": other}).to_string();
        let tok = format!("h.{}.s", b64(json.as_bytes()));
        prop_assert_eq!(claimed_app(&tok), Some(app.clone()));
        let svc = format!("fbs1.{}.s", b64(json.as_bytes()));
        prop_assert_eq!(claimed_cluster(&svc), Some(app));
    }
}
