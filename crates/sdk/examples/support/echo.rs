//! The echo handler of `examples/echo.rs`, shared with `tests/router.rs` so that the test
//! serves exactly the example's code.

use fedbus_sdk::{Outcome, Request};

/// Answers every request with its own body and content type, and says which router shard's
/// link carried it (`echo-link-shard`: requests never cross shards, so it equals the
/// router's `fedbus-shard`).
pub async fn echo(req: Request) -> Outcome {
    let ct = req.content_type().map(str::to_string);
    let shard = req.shard().to_string();
    Outcome::ok(req.into_payload())
        .with_content_type(ct)
        .with_header("echo-link-shard", shard)
}
