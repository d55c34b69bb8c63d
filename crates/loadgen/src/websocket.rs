//! Websocket codecs: a client of the router's websocket endpoint (`GET /api/ws`), and the
//! router side of a task link for `--direct`. Each request is one binary message holding a
//! fedbus frame (crates/proto); answers are Response frames matched by request id, in any order.

use super::codec::{Batch, Codec, Event, STATUS_UNEXPECTED};
use bytes::{Buf, Bytes, BytesMut};
use fedbus_proto::{self as proto, tag, Kind};
use fedbus_router::ws::frame::{self, opcode, MAX_HEADER};
use fedbus_router::ws::Side;

/// Largest websocket message accepted from the peer.
const MAX_MESSAGE: u64 = 1 << 30;

/// Takes one whole websocket frame from the front of `buf`, unmasked. Fragmented messages are
/// refused: no fedbus endpoint fragments. `our_side` is who we are (a server expects masked
/// frames). `Ok(None)`: not all there yet (room is reserved for it).
pub(crate) fn take_frame(
    buf: &mut BytesMut,
    our_side: Side,
) -> Result<Option<(u8, BytesMut)>, String> {
    let Some(h) = frame::parse_head(buf).map_err(|e| format!("bad websocket frame: {e:?}"))? else {
        return Ok(None);
    };
    if h.payload_len > MAX_MESSAGE {
        return Err(format!("websocket message of {} bytes", h.payload_len));
    }
    match (our_side, h.mask.is_some()) {
        (Side::Server, false) => return Err("client websocket frame not masked".into()),
        (Side::Client, true) => return Err("server websocket frame masked".into()),
        _ => {}
    }
    if !h.fin || h.opcode == opcode::CONTINUATION {
        return Err("fragmented websocket messages are not supported".into());
    }
    let total = h.header_len + h.payload_len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut f = buf.split_to(total);
    f.advance(h.header_len);
    if let Some(m) = h.mask {
        frame::unmask(&mut f, m, 0);
    }
    Ok(Some((h.opcode, f)))
}

/// Appends a whole unfragmented frame (header, then `parts`) as `side` sends it.
pub(crate) fn put_frame(batch: &mut Batch, side: Side, op: u8, len: usize) {
    let mut wh = [0u8; MAX_HEADER];
    // fedbus clients mask with key 0 so payloads pass unchanged (docs/PROTOCOL.md).
    let mask = (side == Side::Client).then_some([0u8; 4]);
    let n = frame::encode_head(op, len, mask, &mut wh);
    batch.put(&wh[..n]);
}

/// A whole control or text frame as bytes.
pub(crate) fn frame_bytes(side: Side, op: u8, payload: &[u8]) -> Bytes {
    let mut b = Batch::new();
    put_frame(&mut b, side, op, payload.len());
    b.put(payload);
    let parts = b.parts();
    parts.first().cloned().unwrap_or_default()
}

/// Request metadata of a client websocket request: the path only.
pub(crate) fn client_meta(region: &str, cluster: &str, app: &str, wsid: u32) -> Vec<u8> {
    let mut m = BytesMut::new();
    let path = format!("/api/{region}/{cluster}/{app}/api/{wsid}/sys/echo");
    proto::put_meta(&mut m, tag::PATH, path.as_bytes());
    m.to_vec()
}

/// Request metadata the router puts on a frame to a task (`--direct`).
pub(crate) fn task_meta(app: &str, wsid: u32) -> Vec<u8> {
    let mut m = BytesMut::new();
    proto::put_meta(&mut m, tag::APP, app.as_bytes());
    proto::put_meta(&mut m, tag::ROLE, b"main");
    proto::put_meta(&mut m, tag::SERVICE, b"api");
    proto::put_meta(&mut m, tag::MODULE, b"sys");
    proto::put_meta(&mut m, tag::FUNCTION, b"echo");
    proto::put_meta_u64(&mut m, tag::WSID, wsid as u64);
    proto::put_meta(&mut m, tag::METHOD, b"POST");
    m.to_vec()
}

/// Sends Request frames and matches Response frames by request id.
pub(crate) struct WsCodec {
    side: Side,
    /// Metadata per wsid, built once.
    metas: Vec<Vec<u8>>,
    /// Partition per wsid (0 for client requests: the router picks).
    partitions: Vec<u32>,
    body: Bytes,
    /// An error answer's body was handed out ([`crate::codec::error_body`]).
    sampled: bool,
}

impl WsCodec {
    /// `side`: ours. `metas[w]` and `partitions[w]` belong to wsid `w`.
    pub(crate) fn new(
        side: Side,
        metas: Vec<Vec<u8>>,
        partitions: Vec<u32>,
        body: Bytes,
    ) -> WsCodec {
        WsCodec {
            side,
            metas,
            partitions,
            body,
            sampled: false,
        }
    }
}

impl Codec for WsCodec {
    fn encode(&mut self, id: u64, wsid: u32, batch: &mut Batch) {
        let w = wsid as usize % self.metas.len().max(1);
        let meta: &[u8] = self.metas.get(w).map_or(&[], Vec::as_slice);
        let h = proto::Header {
            kind: Kind::Request,
            flags: 0,
            hops: 0,
            partition: self.partitions.get(w).copied().unwrap_or(0),
            request_id: id,
            meta_len: meta.len() as u32,
            payload_len: self.body.len() as u32,
        };
        put_frame(
            batch,
            self.side,
            opcode::BINARY,
            proto::HEADER_LEN + meta.len() + self.body.len(),
        );
        batch.put(&h.encode());
        batch.put(meta);
        batch.put_shared(&self.body);
        batch.count += 1;
    }

    fn decode(&mut self, buf: &mut BytesMut, ev: &mut Vec<Event>) -> Result<(), String> {
        while let Some((op, msg)) = take_frame(buf, self.side)? {
            match op {
                opcode::BINARY => {
                    let f = proto::Frame::decode(msg.freeze())
                        .map_err(|e| format!("bad fedbus frame: {e}"))?;
                    let status = match f.header.kind {
                        Kind::Response => match f.get(tag::STATUS) {
                            None => 200,
                            Some(_) => f
                                .get_u64(tag::STATUS)
                                .and_then(|s| u16::try_from(s).ok())
                                .filter(|s| *s >= 100)
                                .ok_or("bad STATUS in response frame")?,
                        },
                        Kind::Redirect => STATUS_UNEXPECTED,
                        // Not an answer to a request of ours (e.g. a secret push): ignore.
                        Kind::Request | Kind::SecretPush => continue,
                    };
                    ev.push(Event::Done {
                        id: f.header.request_id,
                        status,
                    });
                    ev.extend(crate::codec::error_body(
                        &mut self.sampled,
                        status,
                        &f.payload,
                    ));
                }
                opcode::PING => ev.push(Event::Reply(frame_bytes(self.side, opcode::PONG, &msg))),
                opcode::CLOSE => {
                    let code = (msg.len() >= 2).then(|| u16::from_be_bytes([msg[0], msg[1]]));
                    return Err(format!("peer closed the websocket (code {code:?})"));
                }
                // Text (control plane JSON) and pongs carry no answers.
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: u64, status: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
        let mut m = BytesMut::new();
        if let Some(s) = status {
            proto::put_meta(&mut m, tag::STATUS, s);
        }
        let f = proto::encode_frame(Kind::Response, 0, 0, 0, id, &m, payload);
        let mut b = Batch::new();
        put_frame(&mut b, Side::Server, opcode::BINARY, f.len());
        b.put(&f);
        b.parts().iter().flat_map(|p| p.to_vec()).collect()
    }

    #[test]
    fn client_request_is_a_masked_frame_with_the_path() {
        let metas = vec![
            client_meta("local", "dev", "demo/echo", 0),
            client_meta("local", "dev", "demo/echo", 1),
        ];
        let mut c = WsCodec::new(Side::Client, metas, vec![], Bytes::from_static(b"body"));
        let mut b = Batch::new();
        c.encode(77, 1, &mut b);
        let mut wire = BytesMut::from(&b.parts()[0][..]);
        // What the router sees: read as a server.
        let (op, msg) = take_frame(&mut wire, Side::Server).unwrap().unwrap();
        assert_eq!(op, opcode::BINARY);
        let f = proto::Frame::decode(msg.freeze()).unwrap();
        assert_eq!(f.header.kind, Kind::Request);
        assert_eq!(f.header.request_id, 77);
        assert_eq!(
            f.get_str(tag::PATH),
            Some("/api/local/dev/demo/echo/api/1/sys/echo")
        );
        assert_eq!(&f.payload[..], b"body");
    }

    #[test]
    fn answers_out_of_order_and_split() {
        let mut wire = response(5, Some(b"200"), b"a");
        wire.extend(response(3, Some(b"503"), b"{\"error\":\"no_live_task\"}"));
        wire.extend(frame_bytes(Side::Server, opcode::PING, b"p"));
        wire.extend(response(4, None, &[1; 300]));
        // Only a connection's first error answer hands out its body.
        wire.extend(response(6, Some(b"503"), b"again"));
        let mut c = WsCodec::new(Side::Client, vec![vec![]], vec![], Bytes::new());
        let mut buf = BytesMut::new();
        let mut ev = Vec::new();
        for ch in wire.chunks(5) {
            buf.extend_from_slice(ch);
            c.decode(&mut buf, &mut ev).unwrap();
        }
        assert!(buf.is_empty());
        assert_eq!(ev.len(), 6);
        assert_eq!(ev[0], Event::Done { id: 5, status: 200 });
        assert_eq!(ev[1], Event::Done { id: 3, status: 503 });
        assert_eq!(
            ev[2],
            Event::ErrorBody {
                status: 503,
                body: "{\"error\":\"no_live_task\"}".into()
            }
        );
        assert!(matches!(&ev[3], Event::Reply(p) if p[0] == 0x8A && p[1] == 0x80 | 1));
        assert_eq!(ev[4], Event::Done { id: 4, status: 200 });
        assert_eq!(ev[5], Event::Done { id: 6, status: 503 });
    }

    #[test]
    fn direct_side_reads_masked_task_frames() {
        let f = proto::encode_frame(Kind::Response, 0, 0, 0, 9, &[], b"x");
        let mut b = Batch::new();
        put_frame(&mut b, Side::Client, opcode::BINARY, f.len());
        b.put(&f);
        let mut buf = BytesMut::from(&b.parts()[0][..]);
        let mut c = WsCodec::new(
            Side::Server,
            vec![task_meta("demo/echo", 0)],
            vec![0],
            Bytes::new(),
        );
        let mut ev = Vec::new();
        c.decode(&mut buf, &mut ev).unwrap();
        assert_eq!(ev, vec![Event::Done { id: 9, status: 200 }]);
        // A server frame arriving at a server is refused.
        let mut buf = BytesMut::from(&response(1, None, b"")[..]);
        assert!(c.decode(&mut buf, &mut ev).is_err());
    }
}
