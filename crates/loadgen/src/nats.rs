//! The anchor: the NATS text protocol, spoken directly (no client crate) so that the broker is
//! the only thing that differs from a fedbus run. Requesters publish to `bench.echo` with a
//! reply subject `_INBOX.<conn>.<reqid>`; responders in queue group `q` echo each message to
//! its reply subject.

use super::codec::{Batch, Codec, Event};
use bytes::{Buf, Bytes, BytesMut};
use std::ops::Range;

/// Subject the responders serve.
pub(crate) const SUBJECT: &str = "bench.echo";
/// Longest control line accepted (INFO can be long).
const MAX_LINE: usize = 64 * 1024;

/// The client's first line: no `+OK` per message, no pedantic checks.
pub(crate) const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n";

/// One server operation; ranges index the buffer that was parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Msg {
        subject: Range<usize>,
        reply: Option<Range<usize>>,
        payload: Range<usize>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
    Info,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Parses one operation from the front of `b`: `Ok(None)` if it is not complete yet, else the
/// operation and the bytes it takes.
pub(crate) fn parse_op(b: &[u8]) -> Result<Option<(Op, usize)>, String> {
    let Some(eol) = find_crlf(&b[..b.len().min(MAX_LINE + 2)]) else {
        if b.len() > MAX_LINE {
            return Err("NATS control line over 64 KiB".into());
        }
        return Ok(None);
    };
    let line = &b[..eol];
    let after = eol + 2;
    let name_end = line
        .iter()
        .position(|c| *c == b' ' || *c == b'\t')
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let op = if name.eq_ignore_ascii_case(b"MSG") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let mut fields: Vec<Range<usize>> = Vec::with_capacity(4);
        let mut i = name_end;
        while i < line.len() {
            while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
                i += 1;
            }
            let s = i;
            while i < line.len() && line[i] != b' ' && line[i] != b'\t' {
                i += 1;
            }
            if i > s {
                fields.push(s..i);
            }
        }
        let (subject, reply, size) = match fields.len() {
            3 => (fields[0].clone(), None, fields[2].clone()),
            4 => (
                fields[0].clone(),
                Some(fields[2].clone()),
                fields[3].clone(),
            ),
            _ => return Err(format!("bad MSG line {:?}", String::from_utf8_lossy(line))),
        };
        let n: usize = std::str::from_utf8(&line[size])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad MSG size in {:?}", String::from_utf8_lossy(line)))?;
        let end = after + n;
        if b.len() < end + 2 {
            return Ok(None);
        }
        if &b[end..end + 2] != b"\r\n" {
            return Err("MSG payload not followed by CRLF".into());
        }
        return Ok(Some((
            Op::Msg {
                subject,
                reply,
                payload: after..end,
            },
            end + 2,
        )));
    } else if name.eq_ignore_ascii_case(b"PING") {
        Op::Ping
    } else if name.eq_ignore_ascii_case(b"PONG") {
        Op::Pong
    } else if name.eq_ignore_ascii_case(b"+OK") {
        Op::Ok
    } else if name.eq_ignore_ascii_case(b"-ERR") {
        Op::Err(
            String::from_utf8_lossy(&line[name_end..])
                .trim()
                .to_string(),
        )
    } else if name.eq_ignore_ascii_case(b"INFO") {
        Op::Info
    } else {
        return Err(format!(
            "unknown NATS operation {:?}",
            String::from_utf8_lossy(line)
        ));
    };
    Ok(Some((op, after)))
}

/// Requester side: publishes requests, matches replies by the id at the end of the subject.
pub(crate) struct NatsCodec {
    /// `PUB bench.echo _INBOX.<conn>.`
    pre: Vec<u8>,
    /// ` <n>\r\n`
    post: Vec<u8>,
    body: Bytes,
}

/// The inbox prefix of connection `conn` (`_INBOX.<conn>`); subscribe to it with `.*`.
pub(crate) fn inbox(conn: &str) -> String {
    format!("_INBOX.{conn}")
}

impl NatsCodec {
    pub(crate) fn new(conn: &str, body: Bytes) -> NatsCodec {
        NatsCodec {
            pre: format!("PUB {SUBJECT} {}.", inbox(conn)).into_bytes(),
            post: format!(" {}\r\n", body.len()).into_bytes(),
            body,
        }
    }
}

impl Codec for NatsCodec {
    fn encode(&mut self, id: u64, _wsid: u32, batch: &mut Batch) {
        let mut tmp = [0u8; 20];
        batch.put(&self.pre);
        batch.put(fedbus_proto::fmt_u64(id, &mut tmp));
        batch.put(&self.post);
        batch.put_shared(&self.body);
        batch.put(b"\r\n");
        batch.count += 1;
    }

    fn decode(&mut self, buf: &mut BytesMut, ev: &mut Vec<Event>) -> Result<(), String> {
        loop {
            let Some((op, n)) = parse_op(buf)? else {
                return Ok(());
            };
            match op {
                Op::Msg { subject, .. } => {
                    let s = &buf[subject];
                    let id = s
                        .iter()
                        .rposition(|c| *c == b'.')
                        .and_then(|i| std::str::from_utf8(&s[i + 1..]).ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| {
                            format!(
                                "reply on unexpected subject {:?}",
                                String::from_utf8_lossy(s)
                            )
                        })?;
                    ev.push(Event::Done { id, status: 200 });
                }
                Op::Ping => ev.push(Event::Reply(Bytes::from_static(b"PONG\r\n"))),
                Op::Err(e) => return Err(format!("nats-server: -ERR {e}")),
                Op::Pong | Op::Ok | Op::Info => {}
            }
            buf.advance(n);
        }
    }
}

/// Responder side: answers every whole `MSG` in `buf` with a `PUB` of its payload to its reply
/// subject, appended to `out`. The payloads are slices of the read buffer (not copied unless
/// small). Leaves a partial operation in `buf`.
pub(crate) fn answer(buf: &mut BytesMut, out: &mut Batch) -> Result<(), String> {
    loop {
        let Some((op, n)) = parse_op(buf)? else {
            return Ok(());
        };
        let chunk = buf.split_to(n).freeze();
        match op {
            Op::Msg {
                reply: Some(reply),
                payload,
                ..
            } => {
                out.put(b"PUB ");
                out.put(&chunk[reply]);
                let mut tmp = [0u8; 20];
                out.put(b" ");
                out.put(fedbus_proto::fmt_u64(payload.len() as u64, &mut tmp));
                out.put(b"\r\n");
                out.put_shared(&chunk.slice(payload));
                out.put(b"\r\n");
                out.count += 1;
            }
            Op::Ping => out.put(b"PONG\r\n"),
            Op::Err(e) => return Err(format!("nats-server: -ERR {e}")),
            Op::Msg { reply: None, .. } | Op::Pong | Op::Ok | Op::Info => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_with_and_without_reply() {
        let b = b"MSG bench.echo 1 _INBOX.a.7 5\r\nhello\r\nrest";
        let (op, n) = parse_op(b).unwrap().unwrap();
        assert_eq!(n, b.len() - 4);
        let Op::Msg {
            subject,
            reply,
            payload,
        } = op
        else {
            panic!("{op:?}")
        };
        assert_eq!(&b[subject], b"bench.echo");
        assert_eq!(&b[reply.unwrap()], b"_INBOX.a.7");
        assert_eq!(&b[payload], b"hello");

        let b = b"msg _INBOX.a.9  1   0\r\n\r\n";
        let (op, n) = parse_op(b).unwrap().unwrap();
        assert_eq!(n, b.len());
        let Op::Msg {
            subject,
            reply,
            payload,
        } = op
        else {
            panic!("{op:?}")
        };
        assert_eq!(&b[subject], b"_INBOX.a.9");
        assert_eq!(reply, None);
        assert!(payload.is_empty());
    }

    #[test]
    fn control_ops() {
        assert_eq!(parse_op(b"PING\r\n").unwrap(), Some((Op::Ping, 6)));
        assert_eq!(parse_op(b"PONG\r\nPING").unwrap(), Some((Op::Pong, 6)));
        assert_eq!(parse_op(b"+OK\r\n").unwrap(), Some((Op::Ok, 5)));
        assert_eq!(
            parse_op(b"-ERR 'Unknown Protocol Operation'\r\n").unwrap(),
            Some((Op::Err("'Unknown Protocol Operation'".into()), 35))
        );
        assert_eq!(
            parse_op(b"INFO {\"server_id\":\"x\"}\r\n")
                .unwrap()
                .unwrap()
                .0,
            Op::Info
        );
        assert!(parse_op(b"BOGUS\r\n").is_err());
        assert!(parse_op(b"MSG a 1\r\n").is_err());
        assert!(parse_op(b"MSG a 1 x\r\n").is_err());
        assert!(parse_op(b"MSG a 1 2\r\nabXY").is_err());
    }

    #[test]
    fn partial_buffers() {
        let full = b"MSG _INBOX.c.3 1 4\r\nabcd\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse_op(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse_op(full).unwrap().is_some());
        assert_eq!(parse_op(b"PIN").unwrap(), None);
        assert_eq!(parse_op(b"PING\r").unwrap(), None);
    }

    #[test]
    fn requester_round_trip() {
        let mut c = NatsCodec::new("p1_0", Bytes::from_static(b"xy"));
        let mut b = Batch::new();
        c.encode(12, 0, &mut b);
        assert_eq!(
            &b.parts()[0][..],
            b"PUB bench.echo _INBOX.p1_0.12 2\r\nxy\r\n"
        );

        let mut buf =
            BytesMut::from(&b"MSG _INBOX.p1_0.12 1 2\r\nxy\r\nPING\r\nMSG _INBOX.p1_0.1"[..]);
        let mut ev = Vec::new();
        c.decode(&mut buf, &mut ev).unwrap();
        assert_eq!(
            ev,
            vec![
                Event::Done {
                    id: 12,
                    status: 200
                },
                Event::Reply(Bytes::from_static(b"PONG\r\n"))
            ]
        );
        assert_eq!(&buf[..], b"MSG _INBOX.p1_0.1");
        let mut buf = BytesMut::from(&b"-ERR 'Slow Consumer'\r\n"[..]);
        assert!(c.decode(&mut buf, &mut ev).is_err());
    }

    #[test]
    fn responder_echoes_to_reply_subject() {
        let mut buf = BytesMut::from(
            &b"MSG bench.echo 1 _INBOX.a.1 3\r\nabc\r\nPING\r\nMSG bench.echo 1 _INBOX.a.2 1\r\nz"
                [..],
        );
        let mut out = Batch::new();
        answer(&mut buf, &mut out).unwrap();
        assert_eq!(out.count, 1);
        assert_eq!(&out.parts()[0][..], b"PUB _INBOX.a.1 3\r\nabc\r\nPONG\r\n");
        assert_eq!(&buf[..], b"MSG bench.echo 1 _INBOX.a.2 1\r\nz");
    }
}
