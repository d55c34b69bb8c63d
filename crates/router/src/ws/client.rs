//! The client side of the websocket upgrade over a glommio stream, plain or TLS (peer dialers,
//! the built-in tasks).

use super::handshake;
use super::stream::ClientTlsStream;
use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;

/// Limit for the TCP connect, the TLS handshake and the upgrade, each.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a router over TLS: the client config (trusted CA, maybe a client
/// certificate) and the name its certificate must be valid for.
#[derive(Clone)]
pub struct TlsDial {
    /// Trust and client certificate.
    pub config: Arc<rustls::ClientConfig>,
    /// The name checked against the router's certificate (and sent as SNI when a DNS name).
    pub name: ServerName<'static>,
}

/// Why a dial failed; a certificate the dialer refused is told apart (it is counted and
/// logged louder than an unreachable router).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TLS handshake failed: for a dialer, most often the reached router's certificate is
    /// not from the trusted CA or not for the dialed name.
    #[error("TLS handshake with {addr}: {err}")]
    Tls {
        /// The address dialed.
        addr: String,
        /// What rustls said.
        err: std::io::Error,
    },
    /// Anything else: connect, timeouts, a refused upgrade.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

async fn connect_tcp(addr: &str) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect_timeout(addr, STEP_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Opens a client websocket to `addr` at `path`, with `Authorization: Bearer <token>` when
/// given: returns the stream and the bytes read past the handshake.
pub async fn connect(
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut s = connect_tcp(addr).await?;
    let rest = upgrade(&mut s, addr, path, token).await?;
    Ok((s, rest))
}

/// Like [`connect`] over the unix socket at `path` (a router's `listen.internal_unix`).
pub async fn connect_unix(
    path: &str,
    http_path: &str,
    token: Option<&str>,
) -> anyhow::Result<(glommio::net::UnixStream, BytesMut)> {
    let mut s = glommio::timer::timeout(STEP_TIMEOUT, async {
        Ok(glommio::net::UnixStream::connect(path).await)
    })
    .await
    .map_err(|_| anyhow::anyhow!("connect unix:{path}: timeout"))?
    .map_err(|e| anyhow::anyhow!("connect unix:{path}: {e}"))?;
    let rest = upgrade(&mut s, "localhost", http_path, token).await?;
    Ok((s, rest))
}

/// Like [`connect`] over TLS: the handshake (server certificate checked against `tls`)
/// completes before the upgrade request, and so the token, is sent.
pub async fn connect_tls(
    addr: &str,
    path: &str,
    token: Option<&str>,
    tls: &TlsDial,
) -> Result<(ClientTlsStream, BytesMut), DialError> {
    let s = connect_tcp(addr).await?;
    let connector = futures_rustls::TlsConnector::from(tls.config.clone());
    let mut s = glommio::timer::timeout(STEP_TIMEOUT, async {
        Ok(connector.connect(tls.name.clone(), s).await)
    })
    .await
    .map_err(|_| anyhow::anyhow!("TLS handshake with {addr}: timeout"))?
    .map_err(|err| DialError::Tls {
        addr: addr.to_string(),
        err,
    })?;
    let rest = upgrade(&mut s, addr, path, token).await?;
    Ok((s, rest))
}

/// Sends the upgrade request on `s` and reads the answer, within [`STEP_TIMEOUT`] for the
/// whole exchange.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<BytesMut> {
    upgrade_within(STEP_TIMEOUT, s, addr, path, token).await
}

/// [`upgrade`] within `limit`: one deadline for the request and the whole answer, not one per
/// read (a server that sent a byte every few seconds kept a dial slot for hours).
async fn upgrade_within<S: AsyncRead + AsyncWrite + Unpin>(
    limit: Duration,
    s: &mut S,
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<BytesMut> {
    glommio::timer::timeout(limit, async { Ok(exchange(s, addr, path, token).await) })
        .await
        .map_err(|_| anyhow::anyhow!("handshake timeout"))?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<BytesMut> {
    let key = handshake::new_key();
    s.write_all(handshake::client_request(addr, path, &key, token).as_bytes())
        .await?;
    s.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("closed during handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
        match handshake::parse_client_response(&buf, &key).map_err(anyhow::Error::msg)? {
            handshake::ClientHandshake::Incomplete => continue,
            handshake::ClientHandshake::Accepted(h) => {
                let _ = buf.split_to(h);
                return Ok(buf);
            }
            handshake::ClientHandshake::Refused { status, body } => {
                anyhow::bail!("refused with {status}: {body}")
            }
        }
    }
}

/// The client side against a hostile server: the frames the client sends are masked with
/// fresh keys (RFC 6455 5.3), and the close frames RFC 6455 forbids (the Autobahn cases
/// 7.3.1, 7.5.1, 7.9.x) fail the connection with 1002 or 1007, as on the server side.
#[cfg(test)]
mod tests {
    use crate::ws::frame::{self, opcode};
    use crate::ws::{handshake, Message, Side};
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Reads one client frame: (opcode, mask key, unmasked payload).
    fn read_frame(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> (u8, [u8; 4], Vec<u8>) {
        loop {
            if let Some(h) = frame::parse_head(buf).expect("client frame head") {
                let total = h.header_len + h.payload_len as usize;
                if buf.len() >= total {
                    let mut p = buf[h.header_len..total].to_vec();
                    let key = h.mask.expect("client frames are masked");
                    frame::unmask(&mut p, key, 0);
                    buf.drain(..total);
                    return (h.opcode, key, p);
                }
            }
            let mut c = [0u8; 4096];
            let n = s.read(&mut c).expect("read client frame");
            assert!(n > 0, "client closed before its frame");
            buf.extend_from_slice(&c[..n]);
        }
    }

    /// What a client sent, frame by frame: opcode, mask key, unmasked payload.
    type Sent = Vec<(u8, [u8; 4], Vec<u8>)>;

    /// A server that accepts one websocket, sends `close` (a whole server frame) after
    /// reading `data_frames` client frames, and returns what the client sent.
    fn hostile_server(
        close: Vec<u8>,
        data_frames: usize,
    ) -> (String, std::thread::JoinHandle<Sent>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut c = [0u8; 1024];
                let n = s.read(&mut c).expect("read upgrade");
                buf.extend_from_slice(&c[..n]);
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .expect("key")
                .trim()
                .to_string();
            s.write_all(handshake::accept_response(&key).as_bytes())
                .expect("101");
            buf.clear();
            let mut got = Vec::new();
            for _ in 0..data_frames {
                got.push(read_frame(&mut s, &mut buf));
            }
            s.write_all(&close).expect("close frame");
            got.push(read_frame(&mut s, &mut buf));
            got
        });
        (addr, h)
    }

    fn server_close(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x88, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    /// Runs the client: sends `data` binary messages, then reads until the server's close and
    /// answers it as the peer links do. Returns the code it closed with.
    fn client(addr: String, data: usize) -> Option<u16> {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let (s, leftover) = super::connect(&addr, "/x", None).await.expect("connect");
                let limits = crate::config::Limits::default();
                let mut c = crate::ws::start(s, leftover, Side::Client, 1 << 20, &limits);
                for _ in 0..data {
                    c.out
                        .borrow_mut()
                        .send_binary(b"head-", &bytes::Bytes::from_static(b"same payload"))
                        .expect("queued");
                }
                let code = match c.reader.next().await {
                    Ok(Message::Close(Some(code))) => Some(code),
                    Ok(m) => panic!("unexpected {m:?}"),
                    Err(e) => e.close_code(),
                };
                c.out.borrow_mut().close(code.unwrap_or(1000));
                let _ = c.writer.await;
                code
            })
            .expect("executor")
            .join()
            .expect("client")
    }

    /// A server that trickles its upgrade answer (a byte every 50 ms, never done) runs into
    /// the upgrade's one deadline; before, each read had its own, so it never did.
    #[test]
    fn an_upgrade_answer_trickled_byte_by_byte_times_out_as_a_whole() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut c = [0u8; 4096];
            let _ = s.read(&mut c);
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nX-Pad: {}",
                "a".repeat(400)
            );
            for b in answer.bytes() {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let err = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let mut s = glommio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                let limit = std::time::Duration::from_millis(500);
                super::upgrade_within(limit, &mut s, &addr, "/x", None)
                    .await
                    .expect_err("a trickled answer is not an upgrade")
                    .to_string()
            })
            .expect("executor")
            .join()
            .expect("client");
        assert_eq!(err, "handshake timeout");
        server.join().expect("server");
    }

    #[test]
    fn client_frames_are_masked_with_fresh_keys() {
        let (addr, server) = hostile_server(server_close(&1000u16.to_be_bytes()), 8);
        assert_eq!(client(addr, 8), Some(1000));
        let got = server.join().expect("server");
        let mut keys: Vec<[u8; 4]> = got.iter().map(|f| f.1).collect();
        for (op, key, p) in &got[..8] {
            assert_eq!(*op, opcode::BINARY);
            assert_ne!(*key, [0; 4], "key 0 leaves the payload unmasked");
            assert_eq!(p, b"head-same payload");
        }
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 9, "every frame has its own key: {keys:?}");
        assert_eq!(got[8].0, opcode::CLOSE);
        assert_eq!(got[8].2, 1000u16.to_be_bytes());
    }

    #[test]
    fn bad_close_frames_from_a_server_fail_the_connection() {
        let mut cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x03], 1002),
            (
                [
                    &1000u16.to_be_bytes()[..],
                    &[
                        0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed,
                        0xa0, 0x80,
                    ],
                ]
                .concat(),
                1007,
            ),
        ];
        for code in [0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999] {
            cases.push((code.to_be_bytes().to_vec(), 1002));
        }
        for (payload, want) in cases {
            let (addr, server) = hostile_server(server_close(&payload), 0);
            assert_eq!(client(addr, 0), Some(want), "close payload {payload:?}");
            let got = server.join().expect("server");
            let (op, key, p) = &got[0];
            assert_eq!(*op, opcode::CLOSE);
            assert_ne!(*key, [0; 4]);
            assert_eq!(p, &want.to_be_bytes(), "close payload {payload:?}");
        }
    }
}
