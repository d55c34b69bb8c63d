//! The JSON messages of the link handshake (`hello`, `register`, `registered`): parsing any
//! bytes never panics, and whatever parses serializes and parses back to the same value.
#![no_main]

use fedbus_proto::hello::{Hello, Register, Registered};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let s = serde_json::to_string(&v).unwrap();
        let back: T = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Hello>(data);
    round_trip::<Register>(data);
    round_trip::<Registered>(data);
});
