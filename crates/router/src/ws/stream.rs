//! The byte streams a client connection runs on: plain TCP, whose writes are one vectored
//! `sendmsg(2)` straight from the payload slices (the hot path), or TLS over TCP, whose writes
//! go through the rustls record layer. The connection code is generic over [`Stream`], so the
//! plaintext path is the same machine code as before TLS existed: no dynamic dispatch, no
//! extra allocation.

use super::conn::{split, ReadHalf, SocketWriter, WriteHalf};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpStream, UnixStream};
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::io::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// A server-side TLS stream over a glommio TCP stream.
pub type TlsStream = futures_rustls::server::TlsStream<TcpStream>;
/// A client-side TLS stream over a glommio TCP stream (peer dialers, built-in tasks).
pub type ClientTlsStream = futures_rustls::client::TlsStream<TcpStream>;

/// The socket under a [`Stream`]: the options the connection code sets on it.
pub trait Socket {
    /// Sends small writes at once (`TCP_NODELAY`); a unix socket has no Nagle to turn off.
    fn set_nodelay(&self) -> io::Result<()>;
    /// Bounds each read; `None` waits for ever.
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    /// Bounds each write; `None` waits for ever.
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    /// The descriptor (`sendmsg(2)`, the lingering close's `FIONREAD`).
    fn fd(&self) -> RawFd;
}

impl Socket for TcpStream {
    fn set_nodelay(&self) -> io::Result<()> {
        TcpStream::set_nodelay(self, true).map_err(io::Error::from)
    }

    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, d).map_err(io::Error::from)
    }

    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, d).map_err(io::Error::from)
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

impl Socket for UnixStream {
    fn set_nodelay(&self) -> io::Result<()> {
        Ok(())
    }

    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, d).map_err(io::Error::from)
    }

    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, d).map_err(io::Error::from)
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// A connection's transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Sized + 'static {
    /// The read half once split for a websocket.
    type Reader: AsyncRead + Unpin + 'static;
    /// The write half once split for a websocket.
    type Writer: PartsWriter + 'static;
    /// The socket underneath.
    type Socket: Socket;
    /// The socket underneath (socket options).
    fn socket(&self) -> &Self::Socket;
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

/// Plain TCP and unix sockets run the same way: vectored writes straight from the slices.
macro_rules! plain_stream {
    ($t:ty) => {
        impl Stream for $t {
            type Reader = ReadHalf<$t>;
            type Writer = WriteHalf<$t>;
            type Socket = $t;

            fn socket(&self) -> &$t {
                self
            }

            async fn write_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
                SocketWriter::new(self).write_all_vectored(parts).await
            }

            async fn shutdown_write(&mut self) -> io::Result<()> {
                <$t>::shutdown(self, std::net::Shutdown::Write)
                    .await
                    .map_err(io::Error::from)
            }

            fn into_split(self) -> (Self::Reader, Self::Writer) {
                split(self)
            }
        }
    };
}

plain_stream!(TcpStream);
plain_stream!(UnixStream);

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
            type Reader = Half<$t>;
            type Writer = TlsWriter<$t>;

            type Socket = TcpStream;

            fn socket(&self) -> &TcpStream {
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
                let (r, w) = Half::pair(self);
                (r, TlsWriter(w))
            }
        }
    };
}

tls_stream!(TlsStream);
tls_stream!(ClientTlsStream);

/// One stream (TCP, unix or TLS) shared by the two halves of a websocket (its reader task and
/// its writer task, on one shard thread). `futures_lite::io::split` did this, but its write
/// half has no `poll_write_vectored`: over TLS each slice of a batch became its own TLS record
/// and its own `send(2)` (1.9 sends per /api/ws answer over wss at 8x8, `fedbus bench --tls
/// --protocol ws --connections 8 --inflight 8` under `perf stat -e syscalls:sys_enter_sendto`),
/// where a batch is now one record and one send; and each poll of either half locked a
/// `Mutex` (two atomic operations; the read half's `poll_read` was 0.5% of the router's samples
/// at 8x8 over /api/ws, `benches/results/2026-12-05-profile-ws-8x8-s30-before-vm.txt`).
///
/// The halves are polled by different tasks of one thread, one poll at a time, and a poll
/// never reaches the other half (a waker only schedules its task), so the `RefCell` is never
/// borrowed twice.
pub struct Half<T>(Rc<RefCell<T>>);

impl<T> Half<T> {
    /// The two halves of `stream`.
    pub fn pair(stream: T) -> (Half<T>, Half<T>) {
        let s = Rc::new(RefCell::new(stream));
        (Half(s.clone()), Half(s))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Half<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Half<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}

/// The write half of a split TLS stream.
pub struct TlsWriter<T>(Half<T>);

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

    /// Counts the write calls that reach it; takes every slice of a vectored write.
    #[derive(Default)]
    struct Calls {
        got: Vec<u8>,
        calls: usize,
    }

    impl AsyncWrite for Calls {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            self.got.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            bufs.iter().for_each(|b| self.got.extend_from_slice(b));
            Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The write half of a split TLS stream hands a batch to the stream as one vectored write
    /// (one TLS record), not one write per slice.
    #[test]
    fn the_tls_write_half_writes_a_batch_in_one_vectored_call() {
        let parts: Vec<Bytes> = (0..20u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let shared = Rc::new(RefCell::new(Calls::default()));
        let mut w = TlsWriter(Half(shared.clone()));
        futures_lite::future::block_on(w.write_parts(&parts)).expect("write");
        let c = shared.borrow();
        assert_eq!(c.calls, 1, "one vectored write for the batch");
        let want: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(c.got, want);
    }
}
