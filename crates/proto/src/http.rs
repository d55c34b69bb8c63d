//! HTTP pieces shared by the router's client ingress and the websocket handshake: the JSON
//! error body `{"status":N,"error":"<code>","message":"..."}`, status reason phrases, and the
//! filter on headers a task or peer router may pass through to a client.

/// The most header fields a request head may have (Envoy's default `max_headers_count`); more
/// gets `431 headers_too_large`, whatever `limits.max_header_bytes` allows.
pub const MAX_HEADERS: usize = 100;

/// Whether a `name: value` header line from a task (or, with `from_router`, from a peer
/// router) may reach the client. A task must not set framing headers (it would split or
/// smuggle responses) nor the router's own `fedbus-*` headers, and the line must not carry
/// control bytes (RFC 9110 section 5.5): any byte below 0x20 other than HTAB, or DEL (0x7f),
/// refuses it, CR and LF included. Bytes 0x80 and above (obs-text) pass.
pub fn allowed_header(line: &[u8], from_router: bool) -> bool {
    if line.iter().any(|&b| is_ctl(b)) {
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
    // CORS answer fields are the router's (from the app's policy), never a task's: a task
    // cannot open its app to an origin the operator did not allow.
    const CORS: [&[u8]; 3] = [
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
    ];
    if CORS.iter().any(|f| name.eq_ignore_ascii_case(f)) {
        return false;
    }
    from_router || !(name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"fedbus-"))
}

/// The `WWW-Authenticate` field (with its CRLF) of a router-made 401 whose error code is
/// `code`: RFC 9110 11.6.1 requires a challenge on every 401, and the scheme is `Bearer` (RFC
/// 6750 section 3): without an error attribute when no token came (`missing_token`), else
/// `error="invalid_token"` (expired, malformed, badly signed, of an unknown key...).
pub fn www_authenticate(code: &[u8]) -> &'static str {
    if code == b"missing_token" {
        "WWW-Authenticate: Bearer\r\n"
    } else {
        "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n"
    }
}

/// Whether a header line (`name: value`) is a `WWW-Authenticate` (any case).
pub fn is_www_authenticate(line: &[u8]) -> bool {
    is_named(line, b"www-authenticate:")
}

/// Whether a header line (`name: value`) is a `Retry-After` (any case).
pub fn is_retry_after(line: &[u8]) -> bool {
    is_named(line, b"retry-after:")
}

/// Whether `line` starts with `name_colon` (a lowercase field name and its colon), in any case.
fn is_named(line: &[u8], name_colon: &[u8]) -> bool {
    line.len() >= name_colon.len() && line[..name_colon.len()].eq_ignore_ascii_case(name_colon)
}

/// The request's `Origin` when the request is cross-origin: `None` without an `Origin`, or
/// when it names the origin the request was sent to (`http://` or `https://` followed by its
/// `Host`), as a browser sends it on a same-origin POST. Only a cross-origin request is subject
/// to an app's CORS policy (the Fetch standard's notion of origin; ports compared as written).
pub fn cross_origin<'a>(origin: Option<&'a [u8]>, host: Option<&[u8]>) -> Option<&'a [u8]> {
    let o = origin?;
    let same = host.is_some_and(|h| {
        let h = h.trim_ascii();
        [&b"http://"[..], b"https://"].iter().any(|scheme| {
            o.len() == scheme.len() + h.len()
                && o[..scheme.len()].eq_ignore_ascii_case(scheme)
                && o[scheme.len()..].eq_ignore_ascii_case(h)
        })
    });
    (!same).then_some(o)
}

/// A control byte that may not appear in a header field (RFC 9110 section 5.5): below 0x20
/// except HTAB, or DEL.
pub fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
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
        304 => "Not Modified",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
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
    use super::{allowed_header, cross_origin, is_retry_after};

    #[test]
    fn retry_after_lines_are_recognised_in_any_case() {
        assert!(is_retry_after(b"Retry-After: 30"));
        assert!(is_retry_after(b"retry-after:1"));
        assert!(!is_retry_after(b"retry-afterx: 1"));
        assert!(!is_retry_after(b"x-retry-after: 1"));
        assert!(!is_retry_after(b"retry"));
    }

    #[test]
    fn only_cross_origin_requests_carry_their_origin() {
        let host = Some(&b"api.example:8800"[..]);
        assert_eq!(cross_origin(None, host), None);
        assert_eq!(cross_origin(Some(b"http://api.example:8800"), host), None);
        assert_eq!(cross_origin(Some(b"HTTPS://API.example:8800"), host), None);
        assert_eq!(
            cross_origin(Some(b"http://app.example"), host),
            Some(&b"http://app.example"[..])
        );
        assert_eq!(
            cross_origin(Some(b"http://api.example:8801"), host),
            Some(&b"http://api.example:8801"[..])
        );
        assert_eq!(cross_origin(Some(b"null"), host), Some(&b"null"[..]));
        assert_eq!(
            cross_origin(Some(b"http://x"), None),
            Some(&b"http://x"[..])
        );
    }

    #[test]
    fn tasks_cannot_set_cors_answer_fields() {
        assert!(!allowed_header(b"Access-Control-Allow-Origin: *", false));
        assert!(!allowed_header(
            b"access-control-allow-credentials: true",
            true
        ));
        assert!(!allowed_header(b"access-control-expose-headers: x", false));
        assert!(allowed_header(b"access-control-max-age: 5", true));
    }

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

    #[test]
    fn control_bytes_are_refused_in_values_and_names() {
        for ctl in (0u8..0x20).filter(|b| *b != b'\t').chain([0x7f]) {
            let mut value = b"x-user: a".to_vec();
            value.push(ctl);
            value.extend_from_slice(b"b");
            assert!(!allowed_header(&value, false), "value with {ctl:#04x}");
            assert!(
                !allowed_header(&value, true),
                "value with {ctl:#04x} from router"
            );
            let mut name = b"x-us".to_vec();
            name.push(ctl);
            name.extend_from_slice(b"er: v");
            assert!(!allowed_header(&name, true), "name with {ctl:#04x}");
        }
        for bad in [
            &b"x-user: a\x00b"[..],
            b"x-user: \x04",
            b"x-user: a\x0bb",
            b"x-user: a\x7f",
            b"x-user: a\rb",
            b"x-user: a\nb",
        ] {
            assert!(!allowed_header(bad, false), "{bad:?}");
        }
        // HTAB and obs-text (0x80..) stay allowed in values.
        assert!(allowed_header(b"x-user: a\tb", false));
        assert!(allowed_header(b"x-user:\tb", false));
        assert!(allowed_header(b"x-user: caf\xc3\xa9 \xff", false));
        // But a tab is not a name character.
        assert!(!allowed_header(b"x-us\ter: v", false));
    }
}
