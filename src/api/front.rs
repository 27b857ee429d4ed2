//! The front layer, before tonic's router: marks each Coffre request so that
//! one tonic refused while decoding is still authorized and audited.

use super::*;

/// The gate's layer before tonic's router. It counts each call on its
/// connection until the response is sent, and makes sure that a Coffre
/// request tonic refuses while decoding it (bad protobuf, invalid UTF-8,
/// over the size limit, compressed, missing) is audited and answered
/// INVALID_ARGUMENT like any other malformed request, after authentication
/// and authorization — instead of tonic's unaudited INTERNAL or
/// OUT_OF_RANGE. Requests are decoded once, by tonic.
#[derive(Clone)]
pub struct FrontLayer {
    gate: Gate,
    metrics: Arc<crate::metrics::Metrics>,
}

impl FrontLayer {
    pub fn new(gate: Gate, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self { gate, metrics }
    }
}

impl<S> tower::Layer<S> for FrontLayer {
    type Service = Front<S>;
    fn layer(&self, inner: S) -> Front<S> {
        Front {
            inner,
            gate: self.gate.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Front<S> {
    inner: S,
    gate: Gate,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The status of a trailers-only response (an error before any message).
pub(super) fn early_status(resp: &http::Response<tonic::body::Body>) -> Option<tonic::Code> {
    let code = resp
        .headers()
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(code))
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Front<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // The ready service is the one to call; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        // Every call's gRPC series, here and only here.
        let observed = self.metrics.begin(req.uri().path());
        Box::pin(async move {
            let info = conn_info(req.extensions()).cloned();
            let call = info.as_ref().map(|i| i.state.begin());
            let route = route(req.uri().path());
            let reached = Reached::default();
            // What the gate needs if tonic refuses the request: its token
            // (none when two are sent: the gate refuses those anyway).
            let path = req.uri().path().to_string();
            let auth = {
                let mut all = req.headers().get_all("authorization").iter();
                match (all.next(), all.next()) {
                    (Some(v), None) => Some(v.clone()),
                    _ => None,
                }
            };
            if route.is_some() {
                req.extensions_mut().insert(reached.clone());
            }
            let mut resp = inner.call(req).await?;
            let meta = || {
                let mut meta = MetadataMap::new();
                if let Some(v) = auth.as_ref().and_then(|v| v.to_str().ok()?.parse().ok()) {
                    meta.insert("authorization", v);
                }
                meta
            };
            let peer = info.as_ref().and_then(|i| i.remote);
            if route.is_none() && early_status(&resp) == Some(tonic::Code::Unimplemented) {
                // A probe for methods the server does not have is worth a
                // line in the trail too.
                gate.audit_unknown(&path, &meta(), peer).await;
            }
            if let Some(route) = route
                && !reached.get()
                && let Some(code) = early_status(&resp)
                // A timeout is not the request's fault.
                && !matches!(code, tonic::Code::Ok | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
            {
                let status = gate.refuse_undecodable(route, &meta(), peer, code).await;
                resp = status.into_http();
            }
            let resp = observed.observe(resp);
            Ok(match call {
                Some(call) => hold_until_sent(resp, call),
                None => resp,
            })
        })
    }
}
