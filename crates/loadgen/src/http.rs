//! HTTP/1.1 client codec for the router's api listener: pipelined keep-alive POSTs, answers
//! matched in order (HTTP/1.1 answers pipelined requests in the order they were sent).

use super::codec::{Batch, Codec, Event};
use bytes::{Buf, Bytes, BytesMut};

/// Most bytes of a response head before the connection is given up.
const MAX_HEAD: usize = 64 * 1024;

/// Builds requests to `POST /api/<region>/<cluster>/<owner>/<app>/api/<wsid>/sys/echo`.
pub(crate) struct HttpCodec {
    /// Request line up to the wsid.
    pre: Vec<u8>,
    /// Rest of the request line and all headers.
    post: Vec<u8>,
    body: Bytes,
    /// Id of the next answer: ids are given out in send order and answers come back in it.
    next_answer: u64,
    /// An error answer's body was handed out ([`crate::codec::error_body`]).
    sampled: bool,
}

impl HttpCodec {
    pub(crate) fn new(
        host: &str,
        region: &str,
        cluster: &str,
        app: &str,
        token: &str,
        body: Bytes,
    ) -> Self {
        HttpCodec {
            pre: format!("POST /api/{region}/{cluster}/{app}/api/").into_bytes(),
            post: format!(
                "/sys/echo HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            body,
            next_answer: 0,
            sampled: false,
        }
    }
}

impl Codec for HttpCodec {
    fn encode(&mut self, _id: u64, wsid: u32, batch: &mut Batch) {
        let mut tmp = [0u8; 20];
        batch.put(&self.pre);
        batch.put(fedbus_proto::fmt_u64(wsid as u64, &mut tmp));
        batch.put(&self.post);
        batch.put_shared(&self.body);
        batch.count += 1;
    }

    fn decode(&mut self, buf: &mut BytesMut, ev: &mut Vec<Event>) -> Result<(), String> {
        loop {
            match parse_response(buf)? {
                Parsed::Partial { need } => {
                    if need > buf.len() {
                        buf.reserve(need - buf.len());
                    }
                    return Ok(());
                }
                Parsed::Complete { status, len, body } => {
                    let sample =
                        crate::codec::error_body(&mut self.sampled, status, &buf[len - body..len]);
                    buf.advance(len);
                    ev.push(Event::Done {
                        id: self.next_answer,
                        status,
                    });
                    ev.extend(sample);
                    self.next_answer += 1;
                }
            }
        }
    }
}

/// Outcome of looking at the front of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not all there yet; `need` is the total size when known (else the current length).
    Partial { need: usize },
    /// One whole response of `len` bytes (head + body), the last `body` of them its body.
    Complete {
        status: u16,
        len: usize,
        body: usize,
    },
}

/// Parses one response (head with httparse, body by Content-Length) from the front of `b`.
pub(crate) fn parse_response(b: &[u8]) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if b.len() > MAX_HEAD {
                return Err("response head over 64 KiB".into());
            }
            return Ok(Parsed::Partial { need: b.len() });
        }
        Err(e) => return Err(format!("malformed HTTP response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut body = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("bad Content-Length in response")?;
            body = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported by the load generator".into());
        }
    }
    let body = match (body, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Err(format!("response {status} without Content-Length")),
    };
    let len = head.checked_add(body).ok_or("Content-Length overflows")?;
    if b.len() < len {
        return Ok(Parsed::Partial { need: len });
    }
    Ok(Parsed::Complete { status, len, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello";
    const NOPE: &[u8] = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}";

    #[test]
    fn request_bytes() {
        let mut c = HttpCodec::new(
            "h:1",
            "local",
            "dev",
            "demo/echo",
            "TOK",
            Bytes::from_static(b"abc"),
        );
        let mut b = Batch::new();
        c.encode(0, 42, &mut b);
        let parts = b.parts().to_vec();
        assert_eq!(parts.len(), 1);
        assert_eq!(
            &parts[0][..],
            &b"POST /api/local/dev/demo/echo/api/42/sys/echo HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer TOK\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\nabc"[..]
        );
    }

    #[test]
    fn pipelined_answers_across_partial_reads() {
        let mut wire = OK.to_vec();
        wire.extend_from_slice(NOPE);
        wire.extend_from_slice(OK);
        let mut c = HttpCodec::new("h", "r", "c", "o/a", "t", Bytes::new());
        let mut buf = BytesMut::new();
        let mut ev = Vec::new();
        // Feed the bytes in awkward pieces: inside the status line, inside a header, inside
        // the body, and exactly at a response boundary.
        for chunk in wire.chunks(7) {
            buf.extend_from_slice(chunk);
            c.decode(&mut buf, &mut ev).unwrap();
        }
        assert!(buf.is_empty());
        assert_eq!(
            ev,
            vec![
                Event::Done { id: 0, status: 200 },
                Event::Done { id: 1, status: 401 },
                Event::ErrorBody {
                    status: 401,
                    body: "{}".into()
                },
                Event::Done { id: 2, status: 200 },
            ]
        );
    }

    #[test]
    fn partial_body_asks_for_the_whole_response() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
        let mut b = head.to_vec();
        b.extend_from_slice(&[0; 10]);
        assert_eq!(
            parse_response(&b),
            Ok(Parsed::Partial {
                need: head.len() + 1000
            })
        );
        assert_eq!(parse_response(&b[..5]), Ok(Parsed::Partial { need: 5 }));
    }

    #[test]
    fn bad_responses() {
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Ok(Parsed::Complete {
                status: 204,
                len: 27,
                body: 0
            })
        );
    }
}
