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

/// Sends the upgrade request on `s` and reads the answer.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
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
        let n = glommio::timer::timeout(STEP_TIMEOUT, async { Ok(s.read(&mut chunk).await) })
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
                return Ok(buf);
            }
            handshake::ClientHandshake::Refused { status, body } => {
                anyhow::bail!("refused with {status}: {body}")
            }
        }
    }
}
