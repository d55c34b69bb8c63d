//! The byte streams a client connection runs on: plain TCP, whose writes are one vectored
//! `sendmsg(2)` straight from the payload slices (the hot path), or TLS over TCP, whose writes
//! go through the rustls record layer. The connection code is generic over [`Stream`], so the
//! plaintext path is the same machine code as before TLS existed: no dynamic dispatch, no
//! extra allocation.

use super::conn::{split, ReadHalf as TcpReadHalf, SocketWriter};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::Future;
use std::io::{self, IoSlice};

/// A server-side TLS stream over a glommio TCP stream.
pub type TlsStream = futures_rustls::server::TlsStream<TcpStream>;
/// A client-side TLS stream over a glommio TCP stream (peer dialers, built-in tasks).
pub type ClientTlsStream = futures_rustls::client::TlsStream<TcpStream>;

/// A client connection's transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Sized + 'static {
    /// The read half once split for a websocket.
    type Reader: AsyncRead + Unpin + 'static;
    /// The write half once split for a websocket.
    type Writer: PartsWriter + 'static;
    /// The TCP socket underneath (socket options).
    fn tcp(&self) -> &TcpStream;
    /// Writes all of `parts`, in order.
    fn write_parts(&mut self, parts: &[Bytes]) -> impl Future<Output = io::Result<()>>;
    /// Ends our sending side (TLS: `close_notify` first); reading goes on.
    fn shutdown_write(&mut self) -> impl Future<Output = io::Result<()>>;
    /// Splits for a websocket: reader and writer used by different tasks.
    fn into_split(self) -> (Self::Reader, Self::Writer);
}

/// The writing half of a split [`Stream`]: what a websocket's writer task drains its outbox
/// into.
pub trait PartsWriter {
    /// Writes all of `parts`, in order.
    fn write_parts(&mut self, parts: &[Bytes]) -> impl Future<Output = io::Result<()>>;
    /// Flushes and closes the sending side.
    fn close(&mut self) -> impl Future<Output = ()>;
}

impl Stream for TcpStream {
    type Reader = TcpReadHalf;
    type Writer = super::conn::WriteHalf;

    fn tcp(&self) -> &TcpStream {
        self
    }

    async fn write_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
        SocketWriter::new(self).write_all_vectored(parts).await
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Write)
            .await
            .map_err(io::Error::from)
    }

    fn into_split(self) -> (Self::Reader, Self::Writer) {
        split(self)
    }
}

impl<W: AsyncWrite + Unpin> PartsWriter for SocketWriter<W> {
    fn write_parts(&mut self, parts: &[Bytes]) -> impl Future<Output = io::Result<()>> {
        self.write_all_vectored(parts)
    }

    fn close(&mut self) -> impl Future<Output = ()> {
        SocketWriter::close(self)
    }
}

/// Most slices handed to rustls at once: it seals them into records of up to 16 KiB, so small
/// slices (a response head and its body) share one record and one `send`.
const TLS_IOV: usize = 64;

/// Writes `parts` through a TLS writer: vectored into the record layer (which copies and
/// encrypts; that copy is the cost of TLS), then one flush.
async fn tls_write_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: &[Bytes]) -> io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    while i < parts.len() {
        let n = {
            let mut iov: [IoSlice<'_>; TLS_IOV] = [IoSlice::new(&[]); TLS_IOV];
            let mut cnt = 0;
            for (k, p) in parts[i..].iter().take(TLS_IOV).enumerate() {
                iov[k] = IoSlice::new(if k == 0 { &p[off..] } else { &p[..] });
                cnt += 1;
            }
            w.write_vectored(&iov[..cnt]).await?
        };
        if n == 0 && parts[i..].iter().any(|p| !p.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut adv = n;
        while i < parts.len() {
            let left = parts[i].len() - off;
            if adv >= left {
                adv -= left;
                i += 1;
                off = 0;
            } else {
                off += adv;
                break;
            }
        }
    }
    w.flush().await
}

/// Both TLS streams (server side: api and internal listeners, peer links accepted; client
/// side: peer dialers, the built-in tasks) run the same way.
macro_rules! tls_stream {
    ($t:ty) => {
        impl Stream for $t {
            type Reader = futures_lite::io::ReadHalf<$t>;
            type Writer = TlsWriter<$t>;

            fn tcp(&self) -> &TcpStream {
                self.get_ref().0
            }

            fn write_parts(&mut self, parts: &[Bytes]) -> impl Future<Output = io::Result<()>> {
                tls_write_parts(self, parts)
            }

            fn shutdown_write(&mut self) -> impl Future<Output = io::Result<()>> {
                // Sends close_notify, then shuts the socket's write side.
                AsyncWriteExt::close(self)
            }

            fn into_split(self) -> (Self::Reader, Self::Writer) {
                // Both halves reach the one rustls session (its records leave in order from
                // one queue, whichever half wrote them).
                let (r, w) = futures_lite::io::split(self);
                (r, TlsWriter(w))
            }
        }
    };
}

tls_stream!(TlsStream);
tls_stream!(ClientTlsStream);

/// The write half of a split TLS stream.
pub struct TlsWriter<T>(futures_lite::io::WriteHalf<T>);

impl<T: AsyncWrite + Unpin> PartsWriter for TlsWriter<T> {
    fn write_parts(&mut self, parts: &[Bytes]) -> impl Future<Output = io::Result<()>> {
        tls_write_parts(&mut self.0, parts)
    }

    async fn close(&mut self) {
        let _ = self.0.flush().await;
        let _ = self.0.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, as a TLS stream does when its
    /// record buffer fills.
    struct Short {
        got: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Short {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn tls_parts_are_written_whole_and_in_order_through_short_writes() {
        let parts: Vec<Bytes> = (0..100u8)
            .map(|i| Bytes::from(vec![i; (i as usize * 7) % 40]))
            .collect();
        let want: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        for step in [1, 3, 64, 1 << 20] {
            let mut w = Short {
                got: Vec::new(),
                step,
            };
            futures_lite::future::block_on(tls_write_parts(&mut w, &parts)).expect("write");
            assert_eq!(w.got, want, "step {step}");
        }
    }
}
