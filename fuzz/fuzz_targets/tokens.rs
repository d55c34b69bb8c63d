//! The token verifiers with a fixed keyring: client JWTs (HS256, app secrets), service tokens
//! and peer tokens (the same `fbs1` format, Ed25519 cluster key). Never panic on any bytes.
//! The first byte picks the mode:
//! - 0: the rest is a token string, given to every verifier and unverified claim reader;
//! - 1: the rest is the JSON payload of a client JWT correctly signed with the app secret, so
//!   the claim checks after the signature are reached (`exp` = u64::MAX and the like);
//! - 2: the rest is the JSON claims of a service token correctly signed with the cluster key.
//!
//! Whatever verifies is used as the router uses it: `trusted_until`, `expiry_wait` (the timer
//! a far-future `exp` once overflowed).
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fedbus_auth::service_token::claimed_cluster;
use fedbus_auth::{
    claimed_app, expiry_wait, now_unix, trusted_until, verify_client_jwt, verify_service_token,
    AppSecretVersion, ClusterKeyVersion, Keyring,
};
use libfuzzer_sys::fuzz_target;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

const APP: &str = "acme/shop";
const SECRET: [u8; 32] = [2; 32];
const GRACE: u64 = 3600;

struct Fixture {
    keyring: Keyring,
    cluster_key: Ed25519KeyPair,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let cluster_key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
        let mut public = [0u8; 32];
        public.copy_from_slice(cluster_key.public_key().as_ref());
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
                    secret: SECRET.to_vec(),
                    created: 1_000_000,
                },
            ],
        );
        let keyring = Keyring {
            cluster: vec![ClusterKeyVersion {
                version: 1,
                public,
                created: 0,
            }],
            apps,
        };
        Fixture {
            keyring,
            cluster_key,
        }
    })
}

fn check_token(f: &Fixture, token: &str, now: u64) {
    if let Ok(c) = verify_client_jwt(&f.keyring, APP, token, now, GRACE) {
        let until = trusted_until(&f.keyring, APP, token, &c, now, GRACE);
        let _ = Instant::now() + expiry_wait(until, now);
        let _ = Instant::now() + expiry_wait(c.exp, now);
    }
    let _ = verify_client_jwt(&f.keyring, "other/app", token, now, GRACE);
    let _ = claimed_app(token);
    if let Ok(c) = verify_service_token(&f.keyring.cluster, token, now, GRACE) {
        assert!(c.exp > now);
        let _ = Instant::now() + expiry_wait(c.exp, now);
    }
    let _ = claimed_cluster(token);
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let now = now_unix();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check_token(f, &String::from_utf8_lossy(rest), now),
        1 => {
            let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT","kid":"2"}"#);
            let signed = format!("{head}.{}", URL_SAFE_NO_PAD.encode(rest));
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &SECRET);
            let sig = ring::hmac::sign(&key, signed.as_bytes());
            let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
            check_token(f, &token, now);
        }
        _ => {
            let signed = format!("fbs1.{}", URL_SAFE_NO_PAD.encode(rest));
            let sig = f.cluster_key.sign(signed.as_bytes());
            let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
            check_token(f, &token, now);
        }
    }
});
