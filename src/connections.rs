//! Connections: what a slow, idle or silent client may hold.
//!
//! Every accepted TCP connection is a [`TrackedConn`]: it closes itself when
//! it has sent no request within `connections.handshake_secs` of being
//! accepted (a client that never speaks, a TLS handshake or HTTP/2 preface
//! that stalls), or when no call has been in progress on it for
//! `connections.idle_secs`. Keepalive pings (which a live client answers)
//! do not count as calls, so an idle connection closes however healthy.
//!
//! [`FrontLayer`] sits before tonic's router. It counts the calls in
//! progress on each connection (until the last byte of the response body),
//! and reads each Coffre request whole, within the message limit, and checks
//! that it decodes: a request that does not is answered INVALID_ARGUMENT
//! and audited by the gate after authentication and authorization, instead
//! of tonic's unaudited INTERNAL or OUT_OF_RANGE.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tonic::{body::Body, transport::server::Connected};

use crate::{config::ConnectionsConfig, server::MAX_MESSAGE_BYTES, service::Gate};

/// What a connection is doing, shared by its IO and its requests.
#[derive(Debug)]
pub struct ConnState {
    active: AtomicUsize,
    /// When the last call ended (or the connection was accepted), in ms
    /// since `epoch`.
    last_ms: AtomicI64,
    seen_request: AtomicBool,
    epoch: Instant,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            last_ms: AtomicI64::new(0),
            seen_request: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// Marks a call in progress until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.seen_request.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }
}

/// A call in progress on a connection.
#[derive(Debug)]
pub struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection a request arrived on: its peer and its state. Found in
/// request extensions, directly or inside tonic's `TlsConnectInfo`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub state: Arc<ConnState>,
}

/// The connection info of a request, with or without TLS.
pub fn conn_info(ext: &http::Extensions) -> Option<&ConnInfo> {
    ext.get::<ConnInfo>().or_else(|| {
        ext.get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>()
            .map(|t| t.get_ref())
    })
}

/// Timeouts of a connection, from `connections.*`.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub handshake: Duration,
    pub idle: Duration,
}

impl From<&ConnectionsConfig> for ConnLimits {
    fn from(c: &ConnectionsConfig) -> Self {
        Self {
            handshake: Duration::from_secs(c.handshake_secs),
            idle: Duration::from_secs(c.idle_secs),
        }
    }
}

/// An accepted TCP connection that closes itself when silent or idle.
pub struct TrackedConn {
    inner: TcpStream,
    remote: Option<SocketAddr>,
    state: Arc<ConnState>,
    limits: ConnLimits,
    timer: Pin<Box<Sleep>>,
}

impl TrackedConn {
    pub fn new(inner: TcpStream, limits: ConnLimits) -> Self {
        let remote = inner.peer_addr().ok();
        Self {
            inner,
            remote,
            state: ConnState::new(),
            limits,
            timer: Box::pin(tokio::time::sleep(limits.handshake)),
        }
    }

    /// When the connection is due to close if nothing changes; `None`
    /// while a call is in progress.
    fn deadline(&self) -> Option<Instant> {
        if self.state.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limit = if self.state.seen_request.load(Ordering::Relaxed) {
            self.limits.idle
        } else {
            self.limits.handshake
        };
        let last = Duration::from_millis(self.state.last_ms.load(Ordering::Relaxed) as u64);
        Some(self.state.epoch + last + limit)
    }

    /// Ready(error) once the connection has been silent or idle too long;
    /// otherwise keeps the timer armed for the next check.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.deadline() {
                Some(d) if d <= now => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle or silent too long",
                    ));
                }
                Some(d) => self.timer.as_mut().reset(d),
                // A call in progress: look again after an idle period.
                None => self.timer.as_mut().reset(now + self.limits.idle),
            }
        }
        Poll::Pending
    }
}

impl Connected for TrackedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            remote: self.remote,
            state: self.state.clone(),
        }
    }
}

impl AsyncRead for TrackedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Poll::Ready(e) = me.poll_expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The layer in front of the router (see the module header).
#[derive(Clone)]
pub struct FrontLayer {
    gate: Gate,
}

impl FrontLayer {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

impl<S> tower::Layer<S> for FrontLayer {
    type Service = Front<S>;
    fn layer(&self, inner: S) -> Front<S> {
        Front {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Front<S> {
    inner: S,
    gate: Gate,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Why a request was not decoded; no byte of it is kept.
fn undecodable(why: &'static str) -> tonic::Status {
    tonic::Status::invalid_argument(format!("malformed request: {why}"))
}

/// The one gRPC message of a unary request body, if it is one, within the
/// size limit, uncompressed, and decodes as the method's request type.
fn single_message(body: &[u8], decodes: fn(&[u8]) -> bool) -> Result<(), &'static str> {
    let Some((head, msg)) = body.split_at_checked(5) else {
        return Err("no message");
    };
    if head[0] != 0 {
        return Err("compressed messages are not accepted");
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err("message too large");
    }
    if len != msg.len() {
        return Err("not exactly one message");
    }
    if !decodes(msg) {
        return Err("not a valid message of this method");
    }
    Ok(())
}

impl<S> tower::Service<http::Request<Body>> for Front<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The ready service is the one to call; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            let info = conn_info(req.extensions()).cloned();
            let call = info.as_ref().map(|i| i.state.begin());
            let route = crate::service::route(req.uri().path());
            let req = match route {
                None => req,
                Some(route) => {
                    let (parts, body) = req.into_parts();
                    // A frame header and the largest message, plus one byte
                    // to tell "too large" from "exactly the limit".
                    let limit = MAX_MESSAGE_BYTES + 6;
                    let collected = http_body_util::Limited::new(body, limit)
                        .collect()
                        .await
                        .map(|c| c.to_bytes());
                    let checked = collected
                        .map_err(|_| "message too large or body unreadable")
                        .and_then(|bytes| single_message(&bytes, route.decodes).map(|()| bytes));
                    match checked {
                        Ok(bytes) => http::Request::from_parts(parts, Body::new(Full(Some(bytes)))),
                        Err(why) => {
                            let peer = info.as_ref().and_then(|i| i.remote);
                            let meta =
                                tonic::metadata::MetadataMap::from_headers(parts.headers.clone());
                            let status = gate
                                .refuse_undecodable(route, &meta, peer, undecodable(why))
                                .await;
                            drop(call);
                            return Ok(status.into_http());
                        }
                    }
                }
            };
            let resp = inner.call(req).await?;
            Ok(match call {
                Some(call) => resp.map(|b| {
                    Body::new(Guarded {
                        inner: b,
                        _call: call,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A body of one buffered message.
struct Full(Option<Bytes>);

impl http_body::Body for Full {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(
            self.get_mut()
                .0
                .take()
                .map(|b| Ok(http_body::Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// A response body that keeps its call counted until it is sent or dropped.
struct Guarded {
    inner: Body,
    _call: CallGuard,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &[u8]) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        b.extend_from_slice(msg);
        b
    }

    #[test]
    fn only_one_plain_decodable_message_passes() {
        let ok = |_: &[u8]| true;
        let bad = |_: &[u8]| false;
        assert!(single_message(&frame(b"abc"), ok).is_ok());
        assert!(single_message(&frame(b"abc"), bad).is_err());
        assert!(single_message(b"", ok).is_err());
        let mut two = frame(b"a");
        two.extend(frame(b"b"));
        assert!(single_message(&two, ok).is_err());
        let mut compressed = frame(b"abc");
        compressed[0] = 1;
        assert!(single_message(&compressed, ok).is_err());
        let mut huge = frame(b"");
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(single_message(&huge, ok).is_err());
    }
}
