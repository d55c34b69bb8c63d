//! The websocket opening handshake (RFC 6455 section 4), both sides. The request head is
//! parsed with httparse; the accept key comes from tungstenite.

use base64::Engine;
use bytes::BytesMut;

/// Most bytes of an upgrade request or response head.
pub const MAX_HEAD: usize = 16 * 1024;

/// What the router needs from an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub path: String,
    /// Token from `Authorization: Bearer <token>` (or None).
    pub bearer: Option<String>,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// Bytes of the head, so the caller can keep what followed it.
    pub head_len: usize,
}

/// Why an upgrade request is refused, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
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

/// Checks the upgrade headers of a parsed request and returns the `Sec-WebSocket-Key`.
pub fn check_upgrade(req: &httparse::Request<'_, '_>) -> Result<String, Refusal> {
    if req.method != Some("GET") {
        return Err(refuse(
            405,
            "method_not_allowed",
            "websocket upgrade needs GET",
        ));
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
    if header(req.headers, "sec-websocket-version") != Some(b"13") {
        return Err(refuse(
            400,
            "bad_upgrade",
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = header(req.headers, "sec-websocket-key")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|k| k.len() == 24)
        .ok_or_else(|| refuse(400, "bad_upgrade", "missing Sec-WebSocket-Key"))?;
    Ok(key.to_string())
}

/// Parses an upgrade request head from `buf`. `Ok(None)`: incomplete.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<UpgradeRequest>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
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
pub fn error_response(status: u16, code: &str, message: &str) -> String {
    let body = crate::http::error_body(status, code, message);
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

/// Builds a client upgrade request.
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
    Incomplete,
    /// 101 with the right accept key; bytes of the head.
    Accepted(usize),
    /// Any other status, with the body that came with it (best effort).
    Refused {
        status: u16,
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
}
