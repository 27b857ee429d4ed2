//! Connections: what a slow, idle or silent client may hold.
//!
//! Every accepted TCP connection is a [`TrackedConn`]: it closes itself when
//! it has sent no request within `connections.handshake_secs` of being
//! accepted (a client that never speaks, a TLS handshake or HTTP/2 preface
//! that stalls), or when no call has been in progress on it for
//! `connections.idle_secs`. Keepalive pings (which a live client answers)
//! do not count as calls, so an idle connection closes however healthy.
//!
//! The gate's front layer (`service::FrontLayer`) counts the calls in
//! progress on each connection with [`ConnState::begin`], holds the count
//! until the response is sent ([`hold_until_sent`]), and learns through
//! [`Reached`] whether a call got past tonic's decoding to its handler.

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
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tonic::{body::Body, transport::server::Connected};

use crate::config::ConnectionsConfig;

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
/// request extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub state: Arc<ConnState>,
}

/// The connection info of a request.
pub fn conn_info(ext: &http::Extensions) -> Option<&ConnInfo> {
    ext.get::<ConnInfo>()
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

/// A connection's bytes: plain TCP (dev mode) or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! either {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// An accepted connection that closes itself when silent or idle.
pub struct TrackedConn {
    inner: Stream,
    remote: Option<SocketAddr>,
    state: Arc<ConnState>,
    limits: ConnLimits,
    timer: Pin<Box<Sleep>>,
}

impl TrackedConn {
    pub fn new(inner: Stream, remote: Option<SocketAddr>, limits: ConnLimits) -> Self {
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

/// Put in a Coffre request's extensions by the front layer, marked by the
/// handler's envelope: a call answered with an error while unmarked never
/// reached its handler, so tonic refused it while decoding.
#[derive(Debug, Clone, Default)]
pub struct Reached(Arc<AtomicBool>);

impl Reached {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `resp` with `call` counted until its body is sent or dropped.
pub fn hold_until_sent(resp: http::Response<Body>, call: CallGuard) -> http::Response<Body> {
    resp.map(|b| {
        Body::new(Guarded {
            inner: b,
            _call: call,
        })
    })
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
