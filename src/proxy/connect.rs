//! Opening connections to an instance: TCP, then TLS when the upstream has it, both within
//! `connect_timeout`. [`InstanceStream`] is either, so HTTP/1.1 pooling and framing, HTTP/2,
//! upgrades and health checks run the same over both.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{UpstreamConfig, UpstreamProtocol};

/// Why a connection to an instance could not be had. The request never left: it may be retried
/// elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
    /// The gateway's own resources ran short (descriptors, buffers, memory): not the instance's
    /// fault, and another instance would fail alike.
    #[error("the gateway could not open a connection: {0}")]
    Local(io::Error),
    #[error("TLS handshake with the instance failed: {0}")]
    Tls(io::Error),
    #[error("HTTP/2 handshake with the instance failed: {0}")]
    Http2(String),
    #[error("the instance did not agree to h2 in the TLS handshake (ALPN)")]
    NoH2,
}

impl ConnectError {
    /// The gateway's shortage, which says nothing about the instance.
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::Local(_))
    }
}

/// A connection to an instance, plain or TLS; or the read side of a plain one whose writes
/// go through a pipelined line's writer (`proxy::pipeline`).
pub enum InstanceStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    PipedRead(OwnedReadHalf),
}

/// Opens connections to one instance as its upstream says.
#[derive(Clone)]
pub struct Connector {
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// HTTP/2 over TLS: an instance that did not pick `h2` by ALPN would not understand it.
    requires_h2: bool,
}

impl Connector {
    pub fn new(addr: SocketAddr, upstream: &UpstreamConfig) -> Connector {
        Connector {
            addr,
            timeout: upstream.connect_timeout,
            tls: upstream.tls.as_ref().map(|tls| {
                let name = tls
                    .server_name
                    .clone()
                    .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
                (TlsConnector::from(tls.client.clone()), name)
            }),
            requires_h2: upstream.protocol == UpstreamProtocol::H2,
        }
    }

    /// The instance's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same instance on another port (a health check's own), with the same settings.
    pub fn on_port(&self, port: u16) -> Connector {
        Connector {
            addr: SocketAddr::new(self.addr.ip(), port),
            ..self.clone()
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection, handshake included, within the connect timeout.
    pub async fn connect(&self) -> Result<InstanceStream, ConnectError> {
        tokio::time::timeout(self.timeout, self.open())
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn open(&self) -> Result<InstanceStream, ConnectError> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|err| {
            if is_local_shortage(&err) {
                ConnectError::Local(err)
            } else {
                ConnectError::Io(err)
            }
        })?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(InstanceStream::Tcp(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                if self.requires_h2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(ConnectError::NoH2);
                }
                Ok(InstanceStream::Tls(Box::new(tls)))
            }
        }
    }
}

/// Whether a connect failed for want of the gateway's own resources rather than anything the
/// instance did. Not EADDRNOTAVAIL: local ports run out per destination, and it also means no
/// source address of the instance's family (IPv6 off), which is the instance's address at fault.
pub fn is_local_shortage(err: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

impl InstanceStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            InstanceStream::Tcp(tcp) => tcp,
            InstanceStream::Tls(tls) => tls.get_ref().0,
            InstanceStream::PipedRead(read) => read.as_ref(),
        }
    }

    pub fn local_port(&self) -> u16 {
        self.tcp().local_addr().map_or(0, |addr| addr.port())
    }

    /// Asks the kernel, not the runtime's last readiness, whether the instance has closed the
    /// connection: its close may have arrived since the runtime last looked. One system call;
    /// for requests that could not be sent again if the connection turned out closed.
    pub fn probe_open(&self) -> bool {
        let tcp = self.tcp();
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit()];
        match socket2::SockRef::from(tcp).peek(&mut probe) {
            Err(err) => err.kind() == io::ErrorKind::WouldBlock,
            Ok(0) => false,
            // Plain HTTP/1.1 instances send nothing unasked; TLS may have sent a late record.
            Ok(_) => matches!(self, InstanceStream::Tls(_)),
        }
    }

    /// False once the instance closed the idle connection or sent something unasked. Costs no
    /// system call while the socket has had no event since its last short read.
    pub fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self {
            InstanceStream::Tcp(_) | InstanceStream::PipedRead(_) => {
                let tcp = self.tcp();
                match tcp.poll_read_ready(&mut cx) {
                    Poll::Pending => true,
                    Poll::Ready(Err(_)) => false,
                    Poll::Ready(Ok(())) => {
                        let mut probe = [0u8; 1];
                        matches!(tcp.try_read(&mut probe), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
                    }
                }
            }
            InstanceStream::Tls(tls) => {
                if tls.get_ref().0.poll_read_ready(&mut cx).is_pending() {
                    return true;
                }
                // Read through TLS, not the socket: session tickets that arrive late are
                // records rustls consumes without producing data, so they keep it open.
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(&mut **tls)
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }
}

impl AsyncRead for InstanceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            InstanceStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            InstanceStream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
            InstanceStream::PipedRead(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for InstanceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            InstanceStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            InstanceStream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
            InstanceStream::PipedRead(_) => Poll::Ready(Err(piped_write())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            InstanceStream::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            InstanceStream::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
            InstanceStream::PipedRead(_) => Poll::Ready(Err(piped_write())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            InstanceStream::Tcp(tcp) => tcp.is_write_vectored(),
            InstanceStream::Tls(tls) => tls.is_write_vectored(),
            InstanceStream::PipedRead(_) => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            InstanceStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            InstanceStream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            InstanceStream::PipedRead(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            InstanceStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            InstanceStream::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
            InstanceStream::PipedRead(_) => Poll::Ready(Ok(())),
        }
    }
}

/// Writes to a pipelined line go through its writer, never through a request's read side.
#[cold]
fn piped_write() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "a pipelined connection is written by its line",
    )
}
