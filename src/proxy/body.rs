//! Body types of the proxy: what goes to an instance (the client's body, streamed and held to
//! `max_body`) and what goes back to the client (the instance's body, streamed, returning the
//! connection to the pool at its end; or a small body the gateway made itself).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::InstanceBody;
use super::h2::Http2Body;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body grew past `server.max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// Request body sent to an instance.
pub enum ForwardBody {
    Empty,
    /// Streamed from the client, failing with [`BodyTooLarge`] once more than `limit` bytes came.
    Stream {
        inner: Incoming,
        seen: u64,
        limit: u64,
    },
}

impl ForwardBody {
    pub fn stream(inner: Incoming, limit: u64) -> ForwardBody {
        ForwardBody::Stream {
            inner,
            seen: 0,
            limit,
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ForwardBody::Empty => Poll::Ready(None),
            ForwardBody::Stream { inner, seen, limit } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        *seen += data.len() as u64;
                        if *seen > *limit {
                            return Poll::Ready(Some(Err(BodyTooLarge { limit: *limit }.into())));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Empty => SizeHint::with_exact(0),
            ForwardBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// Response body sent to the client.
pub enum GatewayBody {
    /// A body the gateway wrote (errors, admin answers).
    Full(Option<Bytes>),
    /// An instance's body, streamed.
    Upstream(InstanceBody),
    /// An HTTP/2 instance's body, streamed.
    Http2(Http2Body),
    /// Chunks the gateway produces over time (server-sent events); ends when the sender drops.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    /// Chunks relayed by a task reading an instance's body (the cache storing a response while
    /// the client streams it); an `Err` breaks the body off.
    Relay(tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>),
}

impl GatewayBody {
    pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
        GatewayBody::Full(Some(bytes.into()))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            GatewayBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            GatewayBody::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
            GatewayBody::Relay(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| b.map(Frame::data))),
            GatewayBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            GatewayBody::Http2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(bytes) => bytes.is_none(),
            GatewayBody::Upstream(body) => body.is_end_stream(),
            GatewayBody::Http2(body) => body.is_end_stream(),
            GatewayBody::Channel(_) | GatewayBody::Relay(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            GatewayBody::Full(None) => SizeHint::with_exact(0),
            GatewayBody::Upstream(body) => body.size_hint(),
            GatewayBody::Http2(body) => body.size_hint(),
            GatewayBody::Channel(_) | GatewayBody::Relay(_) => SizeHint::default(),
        }
    }
}
