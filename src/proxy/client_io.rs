//! The connections the gateway's own HTTP/1.1 loop serves: plain TCP, or TLS whose client chose
//! http/1.1 (or nothing) by ALPN. Plain TCP splits into tokio's owned halves, which share the
//! socket without a lock; a TLS session splits with tokio's `split`, which locks the session.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

type TlsClient = tokio_rustls::server::TlsStream<TcpStream>;

/// A whole client connection: served, or handed to the tunnel after an upgrade.
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsClient>),
}

pub enum ClientRead {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Box<TlsClient>>),
}

pub enum ClientWrite {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Box<TlsClient>>),
}

impl ClientStream {
    pub fn split(self) -> (ClientRead, ClientWrite) {
        match self {
            ClientStream::Tcp(tcp) => {
                let (read, write) = tcp.into_split();
                (ClientRead::Tcp(read), ClientWrite::Tcp(write))
            }
            ClientStream::Tls(tls) => {
                let (read, write) = tokio::io::split(tls);
                (ClientRead::Tls(read), ClientWrite::Tls(write))
            }
        }
    }
}

impl ClientRead {
    /// The connection again, from the two halves it was split into.
    pub fn reunite(self, write: ClientWrite) -> Option<ClientStream> {
        match (self, write) {
            (ClientRead::Tcp(read), ClientWrite::Tcp(write)) => {
                read.reunite(write).ok().map(ClientStream::Tcp)
            }
            (ClientRead::Tls(read), ClientWrite::Tls(write)) if read.is_pair_of(&write) => {
                Some(ClientStream::Tls(read.unsplit(write)))
            }
            _ => None,
        }
    }
}

macro_rules! each_variant {
    ($value:expr, $io:ident => $body:expr) => {
        match $value {
            Self::Tcp($io) => $body,
            Self::Tls($io) => $body,
        }
    };
}

/// Implements tokio's I/O traits for an enum of `Tcp` and `Tls` variants by passing each call
/// to the variant's own implementation.
macro_rules! delegate_io {
    (read: $($reader:ty),+; write: $($writer:ty),+) => {
        $(impl AsyncRead for $reader {
            #[inline]
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                each_variant!(self.get_mut(), io => Pin::new(io).poll_read(cx, buf))
            }
        })+
        $(impl AsyncWrite for $writer {
            #[inline]
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                each_variant!(self.get_mut(), io => Pin::new(io).poll_write(cx, buf))
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each_variant!(self.get_mut(), io => Pin::new(io).poll_flush(cx))
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each_variant!(self.get_mut(), io => Pin::new(io).poll_shutdown(cx))
            }
        })+
    };
}

delegate_io!(read: ClientRead, ClientStream; write: ClientWrite, ClientStream);
