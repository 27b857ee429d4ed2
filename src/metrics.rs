//! Prometheus metrics and the probe listener (`metrics.listen`).
//!
//! One plaintext listener, never the gRPC port, serves `GET /metrics`
//! (OpenMetrics text, from `prometheus-client`) and the gRPC health service
//! (`grpc.health.v1.Health`, HTTP/2 without TLS), so that probes work when
//! the gRPC port requires client certificates.
//!
//! What is served: the standard gRPC server series, recorded once for every
//! call by the front layer ([`Metrics::begin`]); the core's counters
//! ([`crate::stats::Stats`]); and gauges read from the vault at each scrape
//! (the Argon2id queue, key encryptions against the rotation bound, key
//! jobs, the last backup, storage size, serving or not). No label ever
//! carries a record id, a principal or a value; tenant names only with
//! `metrics.tenant_labels = true`.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::vault::Vault;

/// Upper bounds of `grpc_server_handling_seconds`: from a cached read
/// (sub-millisecond) to a streamed backup's chunk.
pub const HANDLING_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The RPCs whose response is a stream (the rest are unary).
const SERVER_STREAMS: &[&str] = &[
    "BulkRead",
    "RewrapTenant",
    "RotateIndexKey",
    "QueryAudit",
    "ListAlerts",
    "Backup",
    "Scrub",
    "Watch",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    grpc_type: &'static str,
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: &'static str,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    backend: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn handling_histogram() -> Histogram {
    Histogram::new(HANDLING_BUCKETS)
}

/// The registry and the series this module updates itself.
pub struct Metrics {
    registry: Registry,
    tenant_labels: bool,
    started: Family<GrpcLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<GrpcLabels, Histogram, fn() -> Histogram>,
    /// The series of each known method, looked up by path without a lock
    /// or an allocation; every other path shares `unknown`.
    routes: std::collections::HashMap<String, Arc<RouteSeries>>,
    unknown: Arc<RouteSeries>,
    serving: Gauge,
    serving_now: AtomicBool,
    hash_queue: Gauge,
    key_encryptions: Family<TenantLabels, Gauge>,
    key_ratio: Family<TenantLabels, FloatGauge>,
    key_bound: Gauge,
    job_done: Family<JobLabels, Gauge>,
    job_total: Family<JobLabels, Gauge>,
    last_backup: Gauge,
    storage_bytes: Gauge,
    storage_free: FloatGauge,
    trail_bytes: Gauge,
}

impl Metrics {
    /// The series of `vault`, its core counters registered. `known_paths`
    /// (`/pkg.Service/Method`) are the methods counted by name.
    pub fn new<'a>(
        vault: &Vault,
        tenant_labels: bool,
        known_paths: impl IntoIterator<Item = &'a str>,
    ) -> Arc<Self> {
        let routes = known_paths
            .into_iter()
            .filter_map(|p| Some((p.to_string(), Arc::new(RouteSeries::new(labels_of(p)?)))))
            .collect();
        let mut m = Self {
            registry: Registry::default(),
            tenant_labels,
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(handling_histogram),
            routes,
            unknown: Arc::new(RouteSeries::new(GrpcLabels {
                grpc_type: "unary",
                grpc_service: "unknown".into(),
                grpc_method: "unknown".into(),
            })),
            serving: Gauge::default(),
            serving_now: AtomicBool::new(true),
            hash_queue: Gauge::default(),
            key_encryptions: Family::default(),
            key_ratio: Family::default(),
            key_bound: Gauge::default(),
            job_done: Family::default(),
            job_total: Family::default(),
            last_backup: Gauge::default(),
            storage_bytes: Gauge::default(),
            storage_free: FloatGauge::default(),
            trail_bytes: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "grpc_server_started",
            "RPCs started on the server.",
            m.started.clone(),
        );
        r.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            m.handled.clone(),
        );
        r.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's request to the end of its response.",
            m.handling.clone(),
        );
        let s = vault.audit.stats();
        r.register(
            "coffre_audit_append_seconds",
            "Time from an event handed to the audit trail to its durable answer.",
            s.audit_append_seconds.clone(),
        );
        r.register(
            "coffre_audit_append_failures",
            "Audit appends that failed (the call failed with them).",
            s.audit_append_failures.clone(),
        );
        r.register(
            "coffre_audit_group_commit_events",
            "Events written per group commit of the audit trail.",
            s.audit_group_commit_events.clone(),
        );
        r.register(
            "coffre_line_write_failures",
            "Lines the audit mirror file or the alert file failed to take.",
            s.line_write_failures.clone(),
        );
        r.register(
            "coffre_budget_throttles",
            "Reads refused by a read budget, by role.",
            s.budget_throttles.clone(),
        );
        r.register(
            "coffre_locks",
            "Accounts locked, by reason (budget, login, honeytoken) and role.",
            s.locks.clone(),
        );
        r.register(
            "coffre_login_failures",
            "Failed logins (wrong password or unknown name).",
            s.login_failures.clone(),
        );
        r.register(
            "coffre_honeytoken_hits",
            "Reads or finds that touched a honeytoken.",
            s.honeytoken_hits.clone(),
        );
        r.register(
            "coffre_oidc_refusals",
            "OpenID Connect id tokens refused, by reason (as in the trail).",
            s.oidc_refusals.clone(),
        );
        r.register(
            "coffre_approvals",
            "Two-person requests, by step (requested, granted, denied, used).",
            s.approvals.clone(),
        );
        r.register(
            "coffre_export_grant_records",
            "Records read or reserved beyond a read budget under an export grant.",
            s.export_grant_records.clone(),
        );
        r.register(
            "coffre_serving",
            "1 while the health service says SERVING, else 0.",
            m.serving.clone(),
        );
        r.register(
            "coffre_argon2_queue_depth",
            "Password hashes waiting for an Argon2id slot.",
            m.hash_queue.clone(),
        );
        r.register(
            "coffre_key_encryptions",
            "Encryptions under the active key version (without tenant labels: the highest of all tenants).",
            m.key_encryptions.clone(),
        );
        r.register(
            "coffre_key_encryptions_ratio",
            "Encryptions under the active key version over the rotation bound (without tenant labels: the highest).",
            m.key_ratio.clone(),
        );
        r.register(
            "coffre_key_rotation_bound",
            "Encryptions after which a key version must be rotated (keys.rotate_after_encryptions).",
            m.key_bound.clone(),
        );
        r.register(
            "coffre_key_job_done_records",
            "Records done by the key jobs (rewrap, reindex) running on this node.",
            m.job_done.clone(),
        );
        r.register(
            "coffre_key_job_total_records",
            "Records to do by the key jobs running on this node.",
            m.job_total.clone(),
        );
        r.register(
            "coffre_last_backup_timestamp_seconds",
            "When the last backup written whole was taken (0: none recorded).",
            m.last_backup.clone(),
        );
        r.register(
            "coffre_storage_bytes",
            "Bytes of the store (sled's files, or the PostgreSQL database).",
            m.storage_bytes.clone(),
        );
        r.register(
            "coffre_storage_free_bytes",
            "Free bytes on the data directory's filesystem (NaN where unknown: on PostgreSQL, watch the database host's disk).",
            m.storage_free.clone(),
        );
        r.register(
            "coffre_audit_trail_bytes",
            "Bytes of the audit trail's files (0 on PostgreSQL).",
            m.trail_bytes.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                backend: if vault.store.is_shared() {
                    "postgres"
                } else {
                    "sled"
                },
            })
            .set(1);
        m.registry
            .register("coffre_build_info", "The running build.", build);
        m.serving.set(1);
        m.storage_free.set(f64::NAN);
        Arc::new(m)
    }

    /// Notes what health says (set with every change of it).
    pub fn set_serving(&self, serving: bool) {
        self.serving_now.store(serving, Ordering::Relaxed);
        self.serving.set(i64::from(serving));
    }

    pub fn serving(&self) -> bool {
        self.serving_now.load(Ordering::Relaxed)
    }

    /// Starts the series of one call to `path` (`/pkg.Service/Method`).
    pub fn begin(self: &Arc<Self>, path: &str) -> GrpcCall {
        let route = self.routes.get(path).unwrap_or(&self.unknown).clone();
        route
            .started
            .get_or_init(|| self.started.get_or_create(&route.labels).clone())
            .inc();
        GrpcCall {
            metrics: self.clone(),
            route,
            started: Instant::now(),
            done: false,
        }
    }

    /// The text Prometheus scrapes, the vault's gauges read now.
    pub async fn render(&self, vault: &Vault) -> String {
        self.refresh(vault).await;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    async fn refresh(&self, vault: &Vault) {
        self.hash_queue
            .set(vault.accounts.hash_queue().try_into().unwrap_or(i64::MAX));
        let bound = vault.keys.rotation_bound();
        self.key_bound.set(to_i64(bound));
        self.key_encryptions.clear();
        self.key_ratio.clear();
        let mut highest = 0u64;
        if let Ok(names) = vault.tenants.names().await {
            for name in names {
                let Ok(t) = vault.tenants.get(&name).await else {
                    continue;
                };
                let active = t.keys.active_version();
                let n = t
                    .keys
                    .encryption_counts()
                    .into_iter()
                    .find(|(v, _)| *v == active)
                    .map_or(0, |(_, n)| n);
                if self.tenant_labels {
                    let l = TenantLabels {
                        tenant: name.to_string(),
                    };
                    self.key_encryptions.get_or_create(&l).set(to_i64(n));
                    self.key_ratio.get_or_create(&l).set(ratio(n, bound));
                }
                highest = highest.max(n);
            }
        }
        if !self.tenant_labels {
            let l = TenantLabels {
                tenant: String::new(),
            };
            self.key_encryptions.get_or_create(&l).set(to_i64(highest));
            self.key_ratio.get_or_create(&l).set(ratio(highest, bound));
        }
        self.job_done.clear();
        self.job_total.clear();
        for job in ["rewrap", "reindex"] {
            // Present at 0, so that a rule can name them on an idle node.
            let l = JobLabels {
                job,
                tenant: String::new(),
            };
            let _ = self.job_done.get_or_create(&l);
            let _ = self.job_total.get_or_create(&l);
        }
        for (tenant, p) in vault.key_jobs() {
            let l = JobLabels {
                job: p.job,
                tenant: if self.tenant_labels {
                    tenant.to_string()
                } else {
                    String::new()
                },
            };
            self.job_done.get_or_create(&l).inc_by(to_i64(p.done));
            self.job_total.get_or_create(&l).inc_by(to_i64(p.total));
        }
        self.last_backup.set(vault.last_backup_ms() / 1000);
        if let Some(n) = vault.store.size_bytes().await {
            self.storage_bytes.set(to_i64(n));
        }
        // NaN, not 0, where unknown: a disk-filling rule must not fire on it.
        self.storage_free
            .set(vault.store.free_bytes().map_or(f64::NAN, |n| n as f64));
        self.trail_bytes.set(to_i64(vault.audit.disk_bytes()));
    }
}

fn to_i64(n: u64) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn ratio(n: u64, bound: u64) -> f64 {
    if bound == 0 {
        0.0
    } else {
        n as f64 / bound as f64
    }
}

/// The labels of a method's path (`/pkg.Service/Method`).
fn labels_of(path: &str) -> Option<GrpcLabels> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(GrpcLabels {
        grpc_type: if SERVER_STREAMS.contains(&method) {
            "server_stream"
        } else if service.starts_with("grpc.reflection") {
            "bidi_stream"
        } else {
            "unary"
        },
        grpc_service: service.to_string(),
        grpc_method: method.to_string(),
    })
}

/// One method's series, fetched from their families on first use and kept.
struct RouteSeries {
    labels: GrpcLabels,
    started: std::sync::OnceLock<Counter>,
    handling: std::sync::OnceLock<Histogram>,
    /// By `tonic::Code` (0..=16).
    handled: [std::sync::OnceLock<Counter>; 17],
}

impl RouteSeries {
    fn new(labels: GrpcLabels) -> Self {
        Self {
            labels,
            started: Default::default(),
            handling: Default::default(),
            handled: Default::default(),
        }
    }
}

/// The name `grpc_code` takes (Go's `codes.Code.String()`, as every gRPC
/// dashboard expects).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// One call being served: counted as handled, with its code and duration,
/// when its response ends (or `Canceled` when it is dropped unfinished).
pub struct GrpcCall {
    metrics: Arc<Metrics>,
    route: Arc<RouteSeries>,
    started: Instant,
    done: bool,
}

impl GrpcCall {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (m, r) = (&self.metrics, &self.route);
        let l = &r.labels;
        let slot = (code as usize).min(r.handled.len() - 1);
        r.handled[slot]
            .get_or_init(|| {
                m.handled
                    .get_or_create(&HandledLabels {
                        grpc_type: l.grpc_type,
                        grpc_service: l.grpc_service.clone(),
                        grpc_method: l.grpc_method.clone(),
                        grpc_code: code_name(code),
                    })
                    .clone()
            })
            .inc();
        r.handling
            .get_or_init(|| m.handling.get_or_create(l).clone())
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// `resp` counted when it ends: at once for a trailers-only answer,
    /// else when its trailers pass.
    pub fn observe(
        mut self,
        resp: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        if let Some(code) = header_code(resp.headers()) {
            self.finish(code);
            return resp;
        }
        resp.map(|inner| tonic::body::Body::new(Observed { inner, call: self }))
    }
}

impl Drop for GrpcCall {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

fn header_code(h: &http::HeaderMap) -> Option<tonic::Code> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(code))
}

/// A response body that finishes its call's series at its trailers.
struct Observed {
    inner: tonic::body::Body,
    call: GrpcCall,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let me = self.get_mut();
        let polled = Pin::new(&mut me.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    me.call
                        .finish(header_code(t).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(status))) => me.call.finish(status.code()),
            Poll::Ready(None) => me.call.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long the probe listener waits for a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics` and the health service on `listener` until the task
/// is dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    vault: std::sync::Weak<Vault>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::conn::auto::Builder,
        service::TowerToHyperService,
    };
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = Probe {
            metrics: metrics.clone(),
            vault: vault.clone(),
            health: health.clone(),
        };
        tokio::spawn(async move {
            let mut b = Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            b.http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .max_concurrent_streams(16);
            if let Err(e) = b
                .serve_connection(TokioIo::new(conn), TowerToHyperService::new(svc))
                .await
            {
                tracing::debug!(error = %e, %peer, "metrics connection ended");
            }
        });
    }
}

/// What the probe listener answers: the scrape, the health service, and
/// 404 for the rest.
#[derive(Clone)]
struct Probe<H> {
    metrics: Arc<Metrics>,
    vault: std::sync::Weak<Vault>,
    health: H,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<H> tower::Service<http::Request<hyper::body::Incoming>> for Probe<H>
where
    H: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    H::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let path = req.uri().path();
        if path.starts_with("/grpc.health.v1.Health/") {
            let mut health = self.health.clone();
            // A tonic server is always ready (it serves each call on its
            // own).
            return Box::pin(health.call(req));
        }
        let scrape = path == "/metrics" && req.method() == http::Method::GET;
        let metrics = self.metrics.clone();
        let vault = self.vault.clone();
        Box::pin(async move {
            let plain = |status: http::StatusCode, body: String| {
                let mut r = http::Response::new(tonic::body::Body::new(body));
                *r.status_mut() = status;
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                r
            };
            if !scrape {
                return Ok(plain(
                    http::StatusCode::NOT_FOUND,
                    "GET /metrics, or grpc.health.v1.Health over HTTP/2\n".into(),
                ));
            }
            let Some(vault) = vault.upgrade() else {
                return Ok(plain(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "stopping\n".into(),
                ));
            };
            let text = metrics.render(&vault).await;
            let mut r = plain(http::StatusCode::OK, text);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(r)
        })
    }
}

/// Binds the probe listener of `metrics.listen`, if set.
pub async fn bind(listen: Option<&str>) -> std::io::Result<Option<TcpListener>> {
    match listen {
        None => Ok(None),
        Some(addr) => {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| std::io::Error::other("metrics.listen is not host:port"))?;
            TcpListener::bind(addr).await.map(Some)
        }
    }
}
