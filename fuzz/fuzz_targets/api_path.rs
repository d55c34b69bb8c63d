//! `parse_api_path` (the target of every HTTP request): never panics; an accepted path is made
//! of its parts, and rebuilding it from them parses to the same parts.
#![no_main]

use fedbus_router::route::parse_api_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = parse_api_path(s) else {
        return;
    };
    assert_eq!(p.app_name, format!("{}/{}", p.owner, p.app));
    let rebuilt = format!(
        "/api/{}/{}/{}/{}/{}/{}/{}/{}",
        p.region, p.cluster, p.owner, p.app, p.service, p.wsid, p.module, p.function
    );
    assert_eq!(parse_api_path(&rebuilt), Ok(p));
});
