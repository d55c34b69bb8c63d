//! HTTP pieces shared by the router and other users of the protocol: the JSON error body,
//! reason phrases, and which header lines a task may send to a client.

/// Whether a `name: value` header line from a task (or, with `from_router`, from a peer
/// router) may reach the client. A task must not set framing headers (it would split or
/// smuggle responses) nor the router's own `fedbus-*` headers.
pub fn allowed_header(line: &[u8], from_router: bool) -> bool {
    if line.contains(&b'\r') || line.contains(&b'\n') {
        return false;
    }
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    let name = &line[..colon];
    if name.is_empty()
        || !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    {
        return false;
    }
    const FRAMING: [&[u8]; 7] = [
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"upgrade",
        b"trailer",
        b"content-type",
    ];
    if FRAMING.iter().any(|f| name.eq_ignore_ascii_case(f)) {
        return false;
    }
    from_router || !(name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"fedbus-"))
}

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

#[cfg(test)]
mod tests {
    use super::allowed_header;

    #[test]
    fn task_headers_cannot_forge_framing_or_router_headers() {
        assert!(allowed_header(b"x-user: 1", false));
        assert!(!allowed_header(b"Content-Length: 0", false));
        assert!(!allowed_header(b"transfer-encoding: chunked", false));
        assert!(!allowed_header(b"fedbus-shard: 9", false));
        assert!(allowed_header(b"fedbus-partition: 3", true));
        assert!(!allowed_header(b"x: a\r\nset-cookie: b", false));
        assert!(!allowed_header(b"no colon", false));
        assert!(!allowed_header(b"bad name: v", false));
    }
}
