//! The websocket opening handshake (RFC 6455 section 4), both sides. The request head is
//! parsed with httparse; the accept key comes from tungstenite.

use base64::Engine;
use bytes::BytesMut;

/// Most bytes of an upgrade request or response head on task and peer links (the client
/// endpoint `/api/ws` holds its head to `limits.max_header_bytes`: [`parse_upgrade_within`]).
pub const MAX_HEAD: usize = 16 * 1024;

/// What the router needs from an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request target, e.g. `/api/...` (`/` when absent).
    pub path: String,
    /// Token from `Authorization: Bearer <token>` (or None).
    pub bearer: Option<String>,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// `Origin`, when it differs from the origin of `Host` (see [`crate::http::cross_origin`]).
    pub cross_origin: Option<String>,
    /// Bytes of the head, so the caller can keep what followed it.
    pub head_len: usize,
}

/// Why an upgrade request is refused, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status to answer with.
    pub status: u16,
    /// Machine-readable `error` of the JSON body.
    pub code: &'static str,
    /// Human-readable `message` of the JSON body.
    pub message: &'static str,
}

fn refuse(status: u16, code: &'static str, message: &'static str) -> Refusal {
    Refusal {
        status,
        code,
        message,
    }
}

/// Finds `name` among parsed headers (case-insensitive).
pub fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Extracts the token of an `Authorization: Bearer` header value.
pub fn bearer(value: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = token.trim();
    (!t.is_empty()).then_some(t)
}

/// The only websocket protocol version fedbus speaks (RFC 6455).
pub const WS_VERSION: &str = "13";

/// Checks the upgrade headers of a parsed request and returns the `Sec-WebSocket-Key`.
///
/// RFC 6455 section 4.2.1/4.2.2, in this order: method GET (405), HTTP/1.1 or later (400),
/// exactly one `Host` header (400), `Upgrade: websocket` and `Connection: upgrade` (400),
/// `Sec-WebSocket-Version` present (400) and 13 (otherwise **426**; [`error_response`] then
/// adds `Sec-WebSocket-Version: 13` so the client can retry with a version we speak), and
/// exactly one `Sec-WebSocket-Key` that is base64 of 16 bytes (400; RFC 6455 4.1 and 11.3.1).
pub fn check_upgrade(req: &httparse::Request<'_, '_>) -> Result<String, Refusal> {
    if req.method != Some("GET") {
        return Err(refuse(
            405,
            "method_not_allowed",
            "websocket upgrade needs GET",
        ));
    }
    // httparse knows HTTP/1.0 (0) and HTTP/1.1 (1) and refuses any other version as malformed.
    if req.version.is_none_or(|v| v < 1) {
        return Err(refuse(
            400,
            "bad_upgrade",
            "websocket upgrade needs HTTP/1.1",
        ));
    }
    match req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .count()
    {
        1 => {}
        0 => return Err(refuse(400, "bad_upgrade", "missing Host header")),
        _ => return Err(refuse(400, "bad_upgrade", "more than one Host header")),
    }
    let has_token = |name: &str, token: &str| {
        header(req.headers, name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(refuse(400, "bad_upgrade", "expected Upgrade: websocket"));
    }
    match header(req.headers, "sec-websocket-version") {
        None => return Err(refuse(400, "bad_upgrade", "missing Sec-WebSocket-Version")),
        Some(v) if v.trim_ascii() == WS_VERSION.as_bytes() => {}
        Some(_) => {
            return Err(refuse(
                426,
                "unsupported_version",
                "Sec-WebSocket-Version must be 13",
            ))
        }
    }
    let mut keys = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"));
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err(refuse(400, "bad_upgrade", "expected one Sec-WebSocket-Key"));
    };
    let mut nonce = [0u8; 18];
    let key = std::str::from_utf8(key.value)
        .ok()
        .map(str::trim)
        .filter(|k| {
            k.len() == 24
                && base64::engine::general_purpose::STANDARD.decode_slice(k, &mut nonce) == Ok(16)
        })
        .ok_or_else(|| {
            refuse(
                400,
                "bad_upgrade",
                "Sec-WebSocket-Key must be base64 of 16 bytes",
            )
        })?;
    Ok(key.to_string())
}

/// Parses an upgrade request head from `buf`, of at most [`MAX_HEAD`] bytes. `Ok(None)`:
/// incomplete.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<UpgradeRequest>, Refusal> {
    parse_upgrade_within(buf, MAX_HEAD)
}

/// [`parse_upgrade`] with a head of at most `max_head` bytes (more: 431).
pub fn parse_upgrade_within(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<UpgradeRequest>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; crate::http::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        // A head that arrived whole in one read is held to the same bound as one that
        // trickled in.
        Ok(httparse::Status::Complete(n)) if n > max_head => {
            return Err(refuse(431, "headers_too_large", "request head too large"))
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head {
                return Err(refuse(431, "headers_too_large", "request head too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "headers_too_large", "too many headers"))
        }
        Err(_) => return Err(refuse(400, "bad_request", "malformed request head")),
    };
    let key = check_upgrade(&req)?;
    Ok(Some(UpgradeRequest {
        path: req.path.unwrap_or("/").to_string(),
        bearer: header(req.headers, "authorization")
            .and_then(bearer)
            .map(str::to_string),
        key,
        cross_origin: crate::http::cross_origin(
            header(req.headers, "origin"),
            header(req.headers, "host"),
        )
        .map(|o| String::from_utf8_lossy(o).into_owned()),
        head_len,
    }))
}

/// The `101 Switching Protocols` answer for `key`.
pub fn accept_response(key: &str) -> String {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
}

/// An HTTP error answer with a JSON body `{"status","error","message"}`, connection closed.
/// A 426 (the [`Refusal`] for an unsupported `Sec-WebSocket-Version`) also carries
/// `Sec-WebSocket-Version: 13`, as RFC 6455 section 4.2.2 asks, and `Upgrade: websocket` with
/// the `upgrade` connection option, as RFC 9110 sections 15.5.22 and 7.8 require of a 426. A 401
/// carries a `WWW-Authenticate: Bearer` challenge (RFC 9110 11.6.1).
pub fn error_response(status: u16, code: &str, message: &str) -> String {
    let body = crate::http::error_body(status, code, message);
    // 426 names the protocol and version we speak; 405 the method we take (RFC 9110 15.5.6).
    let (extra, connection) = match status {
        426 => (
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            "Upgrade, close",
        ),
        405 => ("Allow: GET\r\n", "close"),
        // RFC 9110 11.6.1: every 401 carries a challenge.
        401 => (crate::http::www_authenticate(code.as_bytes()), "close"),
        _ => ("", "close"),
    };
    format!(
        "HTTP/1.1 {status} {}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        crate::http::reason(status),
        body.len()
    )
}

/// A fresh random `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    let mut k = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Builds a client upgrade request: HTTP/1.1 with `Host`, as [`check_upgrade`] requires.
pub fn client_request(host: &str, path: &str, key: &str, bearer: Option<&str>) -> String {
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
}

/// Outcome of parsing a server's answer to a client upgrade.
#[derive(Debug)]
pub enum ClientHandshake {
    /// The response head has not fully arrived; read more.
    Incomplete,
    /// 101 with the right accept key; bytes of the head.
    Accepted(usize),
    /// Any other status, with the body that came with it (best effort).
    Refused {
        /// Status of the answer.
        status: u16,
        /// What followed the head in the buffer, lossily decoded as UTF-8.
        body: String,
    },
}

/// Parses the server's answer in `buf`.
pub fn parse_client_response(buf: &BytesMut, key: &str) -> Result<ClientHandshake, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("response head too large".into())
        }
        Ok(httparse::Status::Partial) => return Ok(ClientHandshake::Incomplete),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        let body = String::from_utf8_lossy(&buf[n..]).into_owned();
        return Ok(ClientHandshake::Refused { status, body });
    }
    let expect = tungstenite::handshake::derive_accept_key(key.as_bytes());
    match header(resp.headers, "sec-websocket-accept") {
        Some(v) if v == expect.as_bytes() => Ok(ClientHandshake::Accepted(n)),
        _ => Err("bad Sec-WebSocket-Accept".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_accepts_rfc_example() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = client_request("h", "/link", key, Some("tok"));
        let up = parse_upgrade(req.as_bytes()).unwrap().unwrap();
        assert_eq!(up.path, "/link");
        assert_eq!(up.bearer.as_deref(), Some("tok"));
        assert_eq!(up.head_len, req.len());
        // RFC 6455 section 1.3 worked example.
        assert!(accept_response(key).contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        let mut b = BytesMut::from(accept_response(key).as_bytes());
        assert!(matches!(
            parse_client_response(&b, key),
            Ok(ClientHandshake::Accepted(_))
        ));
        b.clear();
        b.extend_from_slice(accept_response("AAAAAAAAAAAAAAAAAAAAAA==").as_bytes());
        assert!(parse_client_response(&b, key).is_err());
    }

    #[test]
    fn refusals() {
        assert_eq!(parse_upgrade(b"GET / HTTP/1.1\r\n").unwrap(), None);
        let r = parse_upgrade(b"POST / HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(r.status, 405);
        let r = parse_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
        assert_eq!(r.status, 400);
        let r = parse_upgrade(b"\x00\x01garbage\r\n\r\n").unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
    }

    const GOOD: &str = "GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn a_whole_head_over_the_limit_is_431() {
        let pad = |n: usize| {
            GOOD.replace(
                "Host: h\r\n",
                &format!("Host: h\r\nX: {}\r\n", "a".repeat(n)),
            )
        };
        let fits = pad(MAX_HEAD - GOOD.len() - 5);
        assert_eq!(fits.len(), MAX_HEAD);
        assert!(parse_upgrade(fits.as_bytes()).unwrap().is_some());
        let over = pad(MAX_HEAD - GOOD.len() - 4);
        let r = parse_upgrade(over.as_bytes()).unwrap_err();
        assert_eq!((r.status, r.code), (431, "headers_too_large"));
    }

    #[test]
    fn cross_origin_of_an_upgrade() {
        let with =
            |origin: &str| GOOD.replace("Host: h\r\n", &format!("Host: h\r\nOrigin: {origin}\r\n"));
        let up = parse_upgrade(with("http://h").as_bytes()).unwrap().unwrap();
        assert_eq!(up.cross_origin, None);
        let up = parse_upgrade(with("https://page.example").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(up.cross_origin.as_deref(), Some("https://page.example"));
        assert_eq!(
            parse_upgrade(GOOD.as_bytes())
                .unwrap()
                .unwrap()
                .cross_origin,
            None
        );
    }

    #[test]
    fn upgrade_needs_http_1_1() {
        assert!(parse_upgrade(GOOD.as_bytes()).unwrap().is_some());
        let r = parse_upgrade(GOOD.replace("HTTP/1.1", "HTTP/1.0").as_bytes()).unwrap_err();
        assert_eq!((r.status, r.code), (400, "bad_upgrade"));
        assert!(r.message.contains("HTTP/1.1"), "{r:?}");
        // httparse knows no later version; anything else is a malformed head, still 400.
        let r = parse_upgrade(GOOD.replace("HTTP/1.1", "HTTP/2.0").as_bytes()).unwrap_err();
        assert_eq!(r.status, 400);
    }

    #[test]
    fn upgrade_needs_exactly_one_host() {
        let r = parse_upgrade(GOOD.replace("Host: h\r\n", "").as_bytes()).unwrap_err();
        assert_eq!((r.status, r.code), (400, "bad_upgrade"));
        assert!(r.message.contains("Host"), "{r:?}");
        let two = GOOD.replace("Host: h\r\n", "Host: h\r\nhost: evil\r\n");
        let r = parse_upgrade(two.as_bytes()).unwrap_err();
        assert_eq!(r.status, 400);
        // Case-insensitive name.
        let lower = GOOD.replace("Host: h", "hOsT: h");
        assert!(parse_upgrade(lower.as_bytes()).unwrap().is_some());
    }

    #[test]
    fn upgrade_needs_one_key_of_16_base64_bytes() {
        const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        for bad in [
            "",
            "Sec-WebSocket-Key: abc\r\n",
            // 24 characters, not base64.
            "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!!\r\n",
            // Base64 of 18 bytes.
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSE/\r\n",
            // Twice (RFC 6455 11.3.1), even with the same value.
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ] {
            let r = parse_upgrade(GOOD.replace(KEY, bad).as_bytes()).unwrap_err();
            assert_eq!((r.status, r.code), (400, "bad_upgrade"), "{bad:?}");
            assert!(r.message.contains("Sec-WebSocket-Key"), "{r:?}");
        }
        for good in [KEY, "sec-websocket-key:  AAAAAAAAAAAAAAAAAAAAAA== \r\n"] {
            let up = parse_upgrade(GOOD.replace(KEY, good).as_bytes());
            assert!(up.unwrap().is_some(), "{good:?}");
        }
    }

    #[test]
    fn unsupported_version_is_426_with_the_version_header() {
        for v in ["8", "12", "14", "13, 8", "abc", ""] {
            let req = GOOD.replace(
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Version: {v}"),
            );
            let r = parse_upgrade(req.as_bytes()).unwrap_err();
            assert_eq!(r.status, 426, "{v:?}");
            let resp = error_response(r.status, r.code, r.message);
            assert!(
                resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
                "{resp}"
            );
            assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{resp}");
            // Still a well-formed response with the JSON body.
            let mut h = [httparse::EMPTY_HEADER; 8];
            let mut p = httparse::Response::new(&mut h);
            let n = match p.parse(resp.as_bytes()).unwrap() {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => panic!("partial"),
            };
            assert_eq!(p.code, Some(426));
            assert_eq!(header(p.headers, "sec-websocket-version"), Some(&b"13"[..]));
            // RFC 9110 15.5.22 and 7.8: a 426 names the protocol to upgrade to, with the
            // `upgrade` connection option; the connection still closes.
            assert_eq!(header(p.headers, "upgrade"), Some(&b"websocket"[..]));
            assert_eq!(
                header(p.headers, "connection"),
                Some(&b"Upgrade, close"[..])
            );
            let len: usize = std::str::from_utf8(header(p.headers, "content-length").unwrap())
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(resp.len() - n, len);
        }
        // Missing entirely: a malformed handshake, 400.
        let req = GOOD.replace("Sec-WebSocket-Version: 13\r\n", "");
        assert_eq!(parse_upgrade(req.as_bytes()).unwrap_err().status, 400);
        // Other refusals carry no version header.
        assert!(!error_response(400, "bad_upgrade", "x").contains("Sec-WebSocket-Version"));
        assert!(!error_response(400, "bad_upgrade", "x").contains("Upgrade:"));
    }

    #[test]
    fn own_client_request_passes_the_server_checks() {
        let req = client_request("example:80", "/api/ws", &new_key(), None);
        assert!(req.starts_with("GET /api/ws HTTP/1.1\r\n"));
        assert!(req.contains("\r\nHost: example:80\r\n"));
        let up = parse_upgrade(req.as_bytes()).unwrap().unwrap();
        assert_eq!(up.bearer, None);
        assert_eq!(up.head_len, req.len());
    }
}
