//! Upgraded connections (WebSocket and other `Upgrade` protocols): once the instance answered
//! 101, bytes are copied both ways until either side closes or nothing moves for the idle
//! timeout. The request's in-flight guard lives as long as the tunnel, so balancing and
//! draining see it, and so does the client connection's hold on a shutdown: a graceful stop
//! waits for open tunnels up to `shutdown_grace`, as nginx, HAProxy and Traefik do.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::client_io::ClientStream;
use super::connections::ConnectionPermit;
use super::h1::InstanceConn;
use super::record::RequestRecord;
use super::upstream::InFlightGuard;

/// What the HTTP/1.1 loop hands over once the 101 went out.
pub struct Handover {
    pub client: ClientStream,
    /// What the client sent after its request.
    pub early: Bytes,
    /// The connection's place under the connection limits, held as long as the tunnel lasts.
    pub permit: ConnectionPermit,
    /// The request's record, written when the tunnel ends.
    pub record: RequestRecord,
    /// Held as long as the tunnel lasts: a graceful stop waits for it.
    pub drain: watch::Receiver<bool>,
    /// The gateway's [`super::Gateway::cut`]: the tunnel ends with the stop's grace.
    pub cut: tokio_util::sync::CancellationToken,
    /// The 101's body, which holds the request's concurrency slots (`max_in_flight` of its
    /// route and upstream): a tunnel takes its place under them for as long as it lasts, as
    /// nginx, HAProxy and Envoy count an upgraded connection.
    pub held: super::body::GatewayBody,
}

/// The client's side of an upgrade. (HTTP/2 has no `Upgrade`.)
pub type ClientUpgrade = oneshot::Receiver<Handover>;

/// Joins the client's upgraded connection with the instance's, which answered 101.
pub fn spawn(
    client: ClientUpgrade,
    instance: Box<InstanceConn>,
    guard: InFlightGuard,
    idle: Duration,
) {
    tokio::spawn(async move {
        let Ok(handover) = client.await else {
            return;
        };
        let Handover {
            client: mut client_io,
            early: client_early,
            permit: _permit,
            mut record,
            drain: _drain,
            cut,
            held: _held,
        } = handover;
        // What either side sent right after the 101 or the request belongs to the new
        // protocol.
        let (mut instance, early) = instance.into_parts();
        if !early.is_empty() {
            if let Err(err) = client_io.write_all(&early).await {
                tracing::debug!(%err, "tunnel closed with an error");
                return;
            }
            record.sent(early.len());
        }
        if !client_early.is_empty() {
            if let Err(err) = instance.write_all(&client_early).await {
                tracing::debug!(%err, "tunnel closed with an error");
                return;
            }
        }
        let origin = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let record = TunnelRecord {
            record,
            to_client: Arc::new(AtomicU64::new(0)),
        };
        let mut client =
            TunnelActivity::new(client_io, origin, last.clone()).counting(record.to_client.clone());
        let mut instance = TunnelActivity::new(instance, origin, last.clone());
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut instance) => {
                if let Err(err) = result {
                    tracing::debug!(%err, "tunnel closed with an error");
                }
            }
            () = idle_expiry(origin, &last, idle) => {
                tracing::debug!(idle_secs = idle.as_secs_f64(), "tunnel idle: closed");
            }
            () = cut.cancelled() => {
                tracing::debug!("tunnel cut: the stop's grace is over");
            }
        }
        drop(record);
        drop(guard);
    });
}

/// A tunnel's request record, written with the bytes that reached the client however the
/// tunnel ends: also when a shutdown's grace runs out and the runtime drops the tunnel.
struct TunnelRecord {
    record: RequestRecord,
    to_client: Arc<AtomicU64>,
}

impl Drop for TunnelRecord {
    fn drop(&mut self) {
        self.record
            .sent(self.to_client.load(Ordering::Relaxed) as usize);
    }
}

/// Ends once nothing moved through the tunnel for `idle`.
async fn idle_expiry(origin: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let quiet_since = origin + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = quiet_since + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// An IO that stamps `last` (milliseconds since `origin`) whenever bytes move through it, either
/// way, and counts the bytes written to it into `written` when it has one. Writes count too: a
/// slow reader drains the copy's buffer for long stretches without a read, and is not idle.
struct TunnelActivity<T> {
    io: T,
    origin: Instant,
    last: Arc<AtomicU64>,
    written: Option<Arc<AtomicU64>>,
}

impl<T> TunnelActivity<T> {
    fn new(io: T, origin: Instant, last: Arc<AtomicU64>) -> Self {
        TunnelActivity {
            io,
            origin,
            last,
            written: None,
        }
    }

    fn stamp(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn counting(self, written: Arc<AtomicU64>) -> Self {
        TunnelActivity {
            written: Some(written),
            ..self
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TunnelActivity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.stamp();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TunnelActivity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n @ 1..)) = polled {
            this.stamp();
            if let Some(written) = &this.written {
                written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn bytes_written_keep_a_tunnel_side_awake_as_reads_do() {
        let (near, mut far) = tokio::io::duplex(64);
        let origin = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let mut side = TunnelActivity::new(near, origin, last.clone()).counting(written.clone());
        tokio::time::advance(Duration::from_secs(5)).await;
        side.write_all(b"slow").await.unwrap();
        assert_eq!(last.load(Ordering::Relaxed), 5_000);
        assert_eq!(written.load(Ordering::Relaxed), 4);
        tokio::time::advance(Duration::from_secs(2)).await;
        far.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        side.read_exact(&mut byte).await.unwrap();
        assert_eq!(last.load(Ordering::Relaxed), 7_000);
    }
}
