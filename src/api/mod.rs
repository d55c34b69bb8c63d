//! Client ingress on the api listener: HTTP/1.1 with keep-alive and pipelining, and (with the
//! metrics issue) the multiplexed websocket endpoint. Errors are JSON
//! `{"status":N,"error":"<code>","message":"..."}`.

pub mod http;
pub mod ws;

/// The JSON error body.
pub fn error_body(status: u16, code: &str, message: &str) -> String {
    serde_json::json!({"status": status, "error": code, "message": message}).to_string()
}

/// Reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        508 => "Loop Detected",
        _ => "Status",
    }
}
