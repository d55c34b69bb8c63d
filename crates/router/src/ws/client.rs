//! The client side of the websocket upgrade over a glommio stream (peer dialers, the
//! built-in tasks).

use super::handshake;
use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::time::Duration;

/// Opens a client websocket to `addr` at `path`, with `Authorization: Bearer <token>` when
/// given: returns the stream and the bytes read past the handshake.
pub async fn connect(
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let key = handshake::new_key();
    s.write_all(handshake::client_request(addr, path, &key, token).as_bytes())
        .await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let mut chunk = [0u8; 4096];
        let n = glommio::timer::timeout(Duration::from_secs(5), async {
            Ok(s.read(&mut chunk).await)
        })
        .await
        .map_err(|_| anyhow::anyhow!("handshake timeout"))??;
        if n == 0 {
            anyhow::bail!("closed during handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
        match handshake::parse_client_response(&buf, &key).map_err(anyhow::Error::msg)? {
            handshake::ClientHandshake::Incomplete => continue,
            handshake::ClientHandshake::Accepted(h) => {
                let _ = buf.split_to(h);
                return Ok((s, buf));
            }
            handshake::ClientHandshake::Refused { status, body } => {
                anyhow::bail!("refused with {status}: {body}")
            }
        }
    }
}
