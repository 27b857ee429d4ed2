//! The gRPC services: thin. Each RPC goes through [`Gate::run`], which
//! authenticates, checks the role, calls the core, maps the error to a
//! status in one place ([`to_status`]) and records the outcome.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    accounts::Caller,
    audit::Note,
    connections::{Reached, conn_info, hold_until_sent},
    error::Error,
    model::{
        Fields, MAX_BULK_IDS, Password, Purpose, RecordId, Role, TenantName, Username,
        parse_field_list,
    },
    pb::{self, admin_server, audit_server, auth_server, records_server},
    records::PlainRecord,
    vault::Vault,
};

/// The one mapping from core errors to gRPC statuses. Messages come from
/// `Error`'s `Display`, which never carries a value; causes are logged.
pub fn to_status(e: Error) -> Status {
    match &e {
        Error::Unavailable(cause) => tracing::error!(error = %cause, "storage unavailable"),
        Error::Internal(cause) => tracing::error!(error = %cause, "internal error"),
        _ => {}
    }
    let mut status = Status::new(status_code(&e), e.to_string());
    if let Error::OverBudget { retry_after_ms, .. } = e {
        // What clients back off by, in whole seconds as HTTP's Retry-After.
        if let Ok(v) = retry_after_ms.div_ceil(1000).to_string().parse() {
            status.metadata_mut().insert("retry-after", v);
        }
    }
    status
}

/// Which callers an RPC admits.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// No token (Login).
    Nobody,
    /// Any valid token.
    Anyone,
    /// Clinicians and services: the only roles that touch records.
    RecordReader,
    /// Administrators of tenant `system`.
    Admin,
    Auditor,
    /// Admins, and auditors (whose scope the handler checks).
    AdminOrAuditor,
}

/// A Coffre RPC as the front layer sees it before decoding: its audit
/// action and who it admits.
#[derive(Clone, Copy)]
pub struct Route {
    pub action: &'static str,
    pub need: Need,
}

macro_rules! routes {
    ($($action:literal => $need:ident;)*) => {
        const ROUTES: &[Route] = &[$(Route {
            action: concat!("coffre.v1.", $action),
            need: Need::$need,
        }),*];
    };
}

routes! {
    "Auth/Login" => Nobody;
    "Auth/Logout" => Anyone;
    "Auth/ChangePassword" => Anyone;
    "Records/PutRecord" => RecordReader;
    "Records/GetRecord" => RecordReader;
    "Records/DeleteRecord" => RecordReader;
    "Records/FindRecords" => RecordReader;
    "Records/BulkRead" => RecordReader;
    "Records/SetSecret" => RecordReader;
    "Records/VerifySecret" => RecordReader;
    "Admin/CreateTenant" => Admin;
    "Admin/CreatePrincipal" => Admin;
    "Admin/SetPrincipalLocked" => Admin;
    "Admin/CreateHoneytoken" => Admin;
    "Admin/RotateTenantKey" => Admin;
    "Admin/RewrapTenant" => Admin;
    "Admin/KeyStatus" => Admin;
    "Admin/RetireKeyVersion" => Admin;
    "Admin/ShredTenant" => Admin;
    "Admin/RotateIndexKey" => Admin;
    "Admin/ListPrincipals" => AdminOrAuditor;
    "Audit/QueryAudit" => Auditor;
    "Audit/VerifyAudit" => Auditor;
    "Audit/ListAlerts" => Auditor;
}

/// The route of a request path (`/coffre.v1.Records/GetRecord`).
pub fn route(path: &str) -> Option<Route> {
    let action = path.strip_prefix('/')?;
    ROUTES.iter().find(|r| r.action == action).copied()
}

fn route_of(action: &str) -> Route {
    // Every envelope names an action of the table (tested below).
    ROUTES
        .iter()
        .find(|r| r.action == action)
        .copied()
        .unwrap_or(Route {
            action: "unknown",
            need: Need::Admin,
        })
}

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

/// The status of a trailers-only response (an error before any message).
fn early_status(resp: &http::Response<tonic::body::Body>) -> Option<tonic::Code> {
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
        Box::pin(async move {
            let info = conn_info(req.extensions()).cloned();
            let call = info.as_ref().map(|i| i.state.begin());
            let route = route(req.uri().path());
            let reached = Reached::default();
            // What the gate needs if tonic refuses the request: its token.
            let auth = route.and_then(|_| req.headers().get("authorization").cloned());
            if route.is_some() {
                req.extensions_mut().insert(reached.clone());
            }
            let mut resp = inner.call(req).await?;
            if let Some(route) = route
                && !reached.get()
                && let Some(code) = early_status(&resp)
                // A timeout is not the request's fault.
                && !matches!(code, tonic::Code::Ok | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
            {
                let mut meta = MetadataMap::new();
                if let Some(v) = auth.and_then(|v| v.to_str().ok()?.parse().ok()) {
                    meta.insert("authorization", v);
                }
                let peer = info.as_ref().and_then(|i| i.remote);
                let status = gate.refuse_undecodable(route, &meta, peer, code).await;
                resp = status.into_http();
            }
            Ok(match call {
                Some(call) => hold_until_sent(resp, call),
                None => resp,
            })
        })
    }
}

/// Shared by the services: the vault, plus the per-RPC envelope.
#[derive(Clone)]
pub struct Gate {
    vault: Arc<Vault>,
    refused: Arc<RefusedCalls>,
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

fn bearer(meta: &MetadataMap) -> Option<&str> {
    meta.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Who a call is from, as far as its token tells, and whether its route
/// admits it.
struct Authorized {
    caller: Option<Caller>,
    /// The principal named in the trail: the caller's, or a refused
    /// token's once-valid owner.
    principal: Option<String>,
    tenant: Option<String>,
    role: String,
    result: Result<(), Error>,
}

/// A call of a principal in progress; counts toward
/// `connections.max_streams_per_principal` until dropped (a streamed
/// response holds it until its last message).
pub struct StreamPermit {
    streams: Arc<Mutex<HashMap<String, u32>>>,
    principal: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut m = self.streams.lock();
        if let Some(n) = m.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.principal);
            }
        }
    }
}

/// Calls refused before they reach the vault (bad or missing token,
/// undecodable request, failed login), per peer address: a token bucket,
/// past which calls are refused without an event each and summed up.
struct RefusedCalls {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    summaries: Mutex<HashMap<IpAddr, Summary>>,
}

#[derive(Default)]
struct Summary {
    count: u64,
    actions: BTreeMap<String, u64>,
    outcomes: BTreeMap<String, u64>,
}

/// Bound on the peers tracked at once (a spoofing-free TCP peer set is
/// small; this only keeps memory bounded under a scan).
const MAX_PEERS_TRACKED: usize = 100_000;

impl RefusedCalls {
    /// Applies `f` to `peer`'s allowance of refused calls, refilled to now,
    /// under the one lock: a check and its spend cannot be split by a
    /// parallel call.
    fn with_allowance<R>(&self, peer: IpAddr, f: impl FnOnce(&mut f64) -> R) -> R {
        let mut m = self.buckets.lock();
        let now = Instant::now();
        if m.len() >= MAX_PEERS_TRACKED && !m.contains_key(&peer) {
            m.retain(|_, (tokens, at)| {
                *tokens + at.elapsed().as_secs_f64() * self.per_second < self.burst
            });
        }
        let (tokens, at) = m.entry(peer).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        f(tokens)
    }

    /// Whether `peer` may make one more refused call.
    fn allowed(&self, peer: IpAddr) -> bool {
        self.with_allowance(peer, |t| *t >= 1.0)
    }

    /// Takes one refused call of the allowance if there is one.
    fn take(&self, peer: IpAddr) -> bool {
        self.with_allowance(peer, |t| {
            let has = *t >= 1.0;
            if has {
                *t -= 1.0;
            }
            has
        })
    }

    /// Takes one refused call even past the allowance (a failed login,
    /// known to be refused only after its Argon2id work).
    fn spend(&self, peer: IpAddr) {
        self.with_allowance(peer, |t| *t -= 1.0)
    }

    fn summarize(&self, peer: IpAddr, action: &str, outcome: &str) {
        let mut m = self.summaries.lock();
        let s = m.entry(peer).or_default();
        s.count += 1;
        *s.actions.entry(action.to_string()).or_default() += 1;
        *s.outcomes.entry(outcome.to_string()).or_default() += 1;
    }

    fn take_summaries(&self) -> HashMap<IpAddr, Summary> {
        std::mem::take(&mut *self.summaries.lock())
    }
}

fn is_refusal(e: &Error) -> bool {
    matches!(e, Error::Unauthenticated(_))
}

impl Gate {
    pub fn new(vault: Arc<Vault>) -> Self {
        let c = &vault.connections;
        let refused = Arc::new(RefusedCalls {
            per_second: c.refused_per_second,
            burst: f64::from(c.refused_burst),
            buckets: Mutex::new(HashMap::new()),
            summaries: Mutex::new(HashMap::new()),
        });
        Self {
            vault,
            refused,
            streams: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The caller (if a token was given and is valid), and whether `need`
    /// admits it. The principal is kept even when refused (a wrong role, a
    /// revoked or expired token), so the refusal is attributed.
    fn authorize(&self, meta: &MetadataMap, need: Need) -> Authorized {
        let mut a = Authorized {
            caller: None,
            principal: None,
            tenant: None,
            role: String::new(),
            result: Ok(()),
        };
        if let Need::Nobody = need {
            return a;
        }
        let Some(token) = bearer(meta) else {
            a.result = Err(Error::Unauthenticated("missing bearer token"));
            return a;
        };
        let caller = match self.vault.accounts.authenticate(token) {
            Ok(c) => c,
            Err(refused) => {
                if let Some((t, u, role)) = refused.who {
                    a.principal = Some(format!("{t}/{u}"));
                    a.tenant = Some(t.to_string());
                    a.role = role.map(|r| r.as_str().to_string()).unwrap_or_default();
                }
                a.result = Err(refused.error);
                return a;
            }
        };
        let allowed = match need {
            Need::Nobody | Need::Anyone => true,
            Need::RecordReader => caller.role.reads_records(),
            Need::Admin => caller.role == Role::Admin && caller.tenant.is_system(),
            Need::Auditor => caller.role == Role::Auditor,
            Need::AdminOrAuditor => {
                (caller.role == Role::Admin && caller.tenant.is_system())
                    || caller.role == Role::Auditor
            }
        };
        a.principal = Some(caller.principal());
        a.tenant = Some(caller.tenant.to_string());
        a.role = caller.role.as_str().to_string();
        if !allowed {
            a.result = Err(Error::PermissionDenied("role not allowed for this call"));
        }
        a.caller = Some(caller);
        a
    }

    /// A permit for one more call of `principal`, or RESOURCE_EXHAUSTED.
    fn stream_permit(&self, principal: &str) -> Result<StreamPermit, Error> {
        let cap = self.vault.connections.max_streams_per_principal;
        let mut m = self.streams.lock();
        let n = m.entry(principal.to_string()).or_insert(0);
        if *n >= cap {
            return Err(Error::TooManyCalls);
        }
        *n += 1;
        Ok(StreamPermit {
            streams: self.streams.clone(),
            principal: principal.to_string(),
        })
    }

    /// Whether a refused call of `peer` is over its allowance: if so it is
    /// summed up for the next summary event instead of audited alone.
    fn over_refusal_limit(&self, peer: Option<SocketAddr>, action: &str, outcome: &str) -> bool {
        let Some(ip) = peer.map(|p| p.ip()) else {
            return false;
        };
        if self.refused.take(ip) {
            return false;
        }
        self.refused.summarize(ip, action, outcome);
        true
    }

    /// Writes one event per peer whose refused calls went past the limit
    /// since the last summary: how many, of which actions, with which
    /// outcomes. Called every `connections.refused_summary_secs`.
    pub async fn flush_refusal_summaries(&self) -> Result<usize, Error> {
        let summaries = self.refused.take_summaries();
        let n = summaries.len();
        for (ip, s) in summaries {
            let list = |m: &BTreeMap<String, u64>| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let event = pb::AuditEvent {
                action: "summary/refused_calls".into(),
                outcome: "resource_exhausted".into(),
                peer: ip.to_string(),
                fields: s.actions.keys().cloned().collect(),
                purpose: format!(
                    "{} calls refused past the per-peer limit without an event each; actions: {}; outcomes: {}",
                    s.count,
                    list(&s.actions),
                    list(&s.outcomes)
                ),
                ..Default::default()
            };
            self.vault.audit.record(event).await?;
        }
        Ok(n)
    }

    /// Answers a request that tonic could not decode (`code` is what tonic
    /// said): authenticated and authorized first, then audited with the
    /// first failure as its outcome.
    async fn refuse_undecodable(
        &self,
        route: Route,
        meta: &MetadataMap,
        peer: Option<SocketAddr>,
        code: tonic::Code,
    ) -> Status {
        let why = match code {
            tonic::Code::OutOfRange => "message too large",
            _ => "not one valid, uncompressed message of this method",
        };
        let result: Result<Response<()>, Status> = self
            .run(route.action, meta, peer, async move |_c, _n| {
                Err(Error::InvalidArgument(format!("malformed request: {why}")))
            })
            .await;
        result
            .err()
            .unwrap_or_else(|| Status::invalid_argument("malformed request"))
    }

    /// Runs one RPC: authorize, call `f`, then record the audit event
    /// before anything is returned. If the event cannot be stored the RPC
    /// fails with UNAVAILABLE and returns no data (fail-closed).
    async fn run<T>(
        &self,
        action: &'static str,
        meta: &MetadataMap,
        peer: Option<SocketAddr>,
        f: impl AsyncFnOnce(Option<Caller>, &mut Note) -> Result<T, Error>,
    ) -> Result<Response<T>, Status>
    where
        T: Reply,
    {
        let need = route_of(action).need;
        let auth = self.authorize(meta, need);
        let mut note = Note::default();
        let outcome_of = |r: &Result<T, Error>| match r {
            Ok(_) => "ok".to_string(),
            Err(e) => code_name(e),
        };
        // A peer past its allowance of refused calls: refused again, at
        // once (no Argon2id for a login), and summed up.
        if let Err(e) = &auth.result
            && is_refusal(e)
            && self.over_refusal_limit(peer, action, &code_name(e))
        {
            return Err(to_status(Error::TooManyRefused));
        }
        if matches!(need, Need::Nobody)
            && let Some(ip) = peer.map(|p| p.ip())
            && !self.refused.allowed(ip)
        {
            self.refused.summarize(ip, action, "resource_exhausted");
            return Err(to_status(Error::TooManyRefused));
        }
        let mut permit = None;
        let result = match auth.result {
            Ok(()) => match auth.principal.as_deref().map(|p| self.stream_permit(p)) {
                Some(Err(e)) => Err(e),
                Some(Ok(p)) => {
                    permit = Some(p);
                    f(auth.caller, &mut note).await
                }
                None => f(auth.caller, &mut note).await,
            },
            Err(e) => Err(e),
        };
        let outcome = outcome_of(&result);
        note.bound();
        if let Err(Error::Unavailable(_)) = &result {
            // Whatever path failed to write, health hears of it.
            self.vault.store.note_failure();
        }
        if let (Need::Nobody, Err(e)) = (need, &result)
            && is_refusal(e)
            && let Some(ip) = peer.map(|p| p.ip())
        {
            self.refused.spend(ip);
        }
        let event = pb::AuditEvent {
            tenant: note.tenant.or(auth.tenant).unwrap_or_default(),
            principal: auth.principal.or(note.principal).unwrap_or_default(),
            role: auth.role,
            action: action.to_string(),
            record_ids: note.record_ids,
            fields: note.fields,
            purpose: note.purpose,
            outcome,
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        tracing::info!(
            action,
            principal = %event.principal,
            peer = %event.peer,
            outcome = %event.outcome,
            "rpc"
        );
        // Only a stream needs to name its caller again (if it is dropped).
        let what = if T::STREAM {
            StreamOf {
                action,
                tenant: event.tenant.clone(),
                principal: event.principal.clone(),
                role: event.role.clone(),
                peer: event.peer.clone(),
            }
        } else {
            StreamOf::default()
        };
        if let Err(e) = self.vault.audit.record(event).await {
            tracing::error!(action, error = %e, "audit event not stored: failing the call");
            return Err(to_status(match e {
                Error::Unavailable(s) => Error::Unavailable(s),
                _ => Error::Unavailable(crate::store::StorageError::Io("audit".into())),
            }));
        }
        result
            .map(|r| Response::new(r.hold(self, permit, what)))
            .map_err(to_status)
    }

    /// Streams `source` to the client through a small buffer; a reader
    /// that takes longer than `connections.stream_send_timeout_secs` for
    /// one message gets no more (its buffers are freed), and the drop is
    /// audited with the count sent. The permit is held until the end.
    fn guard_stream<T: Send + 'static>(
        &self,
        mut source: BoxStream<T>,
        what: StreamOf,
        permit: Option<StreamPermit>,
    ) -> BoxStream<T> {
        let (tx, rx) = mpsc::channel(2);
        let timeout = Duration::from_secs(self.vault.connections.stream_send_timeout_secs);
        let audit = self.vault.audit.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut sent = 0u64;
            while let Some(item) = source.next().await {
                match tokio::time::timeout(timeout, tx.send(item)).await {
                    Ok(Ok(())) => sent += 1,
                    // The client went away: nothing to report.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        drop(source);
                        let event = pb::AuditEvent {
                            action: what.action.to_string(),
                            tenant: what.tenant,
                            principal: what.principal,
                            role: what.role,
                            outcome: "deadline_exceeded".into(),
                            purpose: format!(
                                "stream dropped: the reader stalled for {} s after {sent} messages",
                                timeout.as_secs()
                            ),
                            peer: what.peer,
                            ..Default::default()
                        };
                        if let Err(e) = audit.record(event).await {
                            tracing::error!(error = %e, "stalled-stream event not stored");
                        }
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// What a call answers, and what becomes of its permit: a unary response
/// gives it back at once, a stream keeps it to its end (and is guarded
/// against a stalled reader).
trait Reply: Sized {
    /// A streamed response (it keeps the permit and names its caller).
    const STREAM: bool = false;
    fn hold(self, gate: &Gate, permit: Option<StreamPermit>, what: StreamOf) -> Self;
}

macro_rules! unary_replies {
    ($($t:ty),* $(,)?) => {$(
        impl Reply for $t {
            fn hold(self, _: &Gate, _: Option<StreamPermit>, _: StreamOf) -> Self {
                self
            }
        }
    )*};
}

unary_replies!(
    (),
    pb::LoginResponse,
    pb::LogoutResponse,
    pb::ChangePasswordResponse,
    pb::PutRecordResponse,
    pb::GetRecordResponse,
    pb::DeleteRecordResponse,
    pb::FindRecordsResponse,
    pb::SetSecretResponse,
    pb::VerifySecretResponse,
    pb::CreateTenantResponse,
    pb::CreatePrincipalResponse,
    pb::SetPrincipalLockedResponse,
    pb::CreateHoneytokenResponse,
    pb::RotateTenantKeyResponse,
    pb::KeyStatusResponse,
    pb::RetireKeyVersionResponse,
    pb::ShredTenantResponse,
    pb::ListPrincipalsResponse,
    pb::VerifyAuditResponse,
);

impl<X: Send + 'static> Reply for BoxStream<X> {
    const STREAM: bool = true;
    fn hold(self, gate: &Gate, permit: Option<StreamPermit>, what: StreamOf) -> Self {
        gate.guard_stream(self, what, permit)
    }
}

/// Whose stream [`Gate::guard_stream`] carries, for the event of its drop.
#[derive(Debug, Clone, Default)]
struct StreamOf {
    action: &'static str,
    tenant: String,
    principal: String,
    role: String,
    peer: String,
}

/// The status code's name in lower case (`permission_denied`).
fn code_name(e: &Error) -> String {
    let s = format!("{:?}", status_code(e));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn status_code(e: &Error) -> tonic::Code {
    use tonic::Code;
    match e {
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::NotFound => Code::NotFound,
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::OverBudget { .. } | Error::TooManyCalls | Error::TooManyRefused => {
            Code::ResourceExhausted
        }
        Error::DataLoss => Code::DataLoss,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    }
}

/// The tenant, record and secret name a SetSecret/VerifySecret call is
/// about, noted for the audit event before they are parsed.
fn secret_target(
    v: &Vault,
    caller: Option<Caller>,
    record_id: &str,
    name: &str,
    n: &mut Note,
) -> Result<
    (
        Arc<crate::tenants::Tenant>,
        RecordId,
        crate::model::FieldName,
    ),
    Error,
> {
    let caller = must(caller)?;
    n.record_ids = vec![record_id.to_string()];
    n.fields = vec![name.to_string()];
    let id = RecordId::parse(record_id)?;
    let name = crate::model::FieldName::parse(name)?;
    Ok((v.tenants.get(&caller.tenant)?, id, name))
}

/// The tenant an administrator's key call is about, noted for the trail.
fn admin_target(v: &Vault, name: &str, n: &mut Note) -> Result<Arc<crate::tenants::Tenant>, Error> {
    let name = TenantName::parse(name)?;
    n.tenant = Some(name.to_string());
    v.tenants.get(&name)
}

/// The caller of an RPC whose `Need` guarantees one.
fn must(caller: Option<Caller>) -> Result<Caller, Error> {
    caller.ok_or(Error::Unauthenticated("missing bearer token"))
}

/// Where a long key job reports its progress.
#[derive(Clone)]
struct Progress(mpsc::Sender<Result<pb::RewrapProgress, Status>>);

impl Progress {
    /// Drops a report the client is too slow for: the last one counts.
    fn report(&self, done: u64, total: u64) {
        let _ = self.0.try_send(Ok(pb::RewrapProgress { done, total }));
    }
}

/// Runs a tenant-wide key job in its own task and streams its progress; the
/// last message is `{total, total}` or the error. The job goes on if the
/// client leaves: it is resumable, and half done is worth keeping.
fn progress_stream<F>(job: impl FnOnce(Progress) -> F) -> BoxStream<pb::RewrapProgress>
where
    F: std::future::Future<Output = Result<u64, Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let run = job(Progress(tx.clone()));
    tokio::spawn(async move {
        let end = match run.await {
            Ok(total) => Ok(pb::RewrapProgress { done: total, total }),
            Err(e) => Err(to_status(e)),
        };
        let _ = tx.send(end).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

const GET_RECORD: &str = "coffre.v1.Records/GetRecord";
const FIND_RECORDS: &str = "coffre.v1.Records/FindRecords";
const BULK_READ: &str = "coffre.v1.Records/BulkRead";
/// Records a BulkRead sends per durable budget write, at most.
const BULK_GROUP: usize = 32;
/// ... and bytes of field values per group: with records of up to 1 MiB,
/// 32 of them held per stalled stream would be 32 MiB.
const BULK_GROUP_BYTES: usize = 1 << 20;

/// Makes the budget spent on `group` durable, then sends it. False when the
/// stream is over (client gone, or storage failed and said so).
async fn send_group(
    vault: &Vault,
    tx: &mpsc::Sender<Result<pb::Record, Status>>,
    group: &mut Vec<pb::Record>,
) -> bool {
    if group.is_empty() {
        return true;
    }
    if let Err(e) = vault.store.sync().await {
        group.clear();
        let _ = tx.send(Err(to_status(e.into()))).await;
        return false;
    }
    for r in group.drain(..) {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}

fn to_pb(r: PlainRecord) -> pb::Record {
    pb::Record {
        id: r.id.to_string(),
        version: r.version,
        fields: r
            .fields
            .into_iter()
            // The response takes the value; what tonic encodes is beyond
            // our zeroizing anyway.
            .map(|(k, mut v)| (k, std::mem::take(&mut *v)))
            .collect(),
    }
}

macro_rules! envelope {
    ($self:ident, $req:ident, $action:literal, $body:expr) => {{
        let peer = conn_info($req.extensions())
            .and_then(|i| i.remote)
            .or_else(|| $req.remote_addr());
        let (meta, ext, msg) = $req.into_parts();
        if let Some(r) = ext.get::<Reached>() {
            r.mark();
        }
        $self
            .gate
            .run(
                concat!("coffre.v1.", $action),
                &meta,
                peer,
                async move |c, n: &mut Note| ($body)(c, msg, n).await,
            )
            .await
    }};
}

pub struct AuthService {
    gate: Gate,
}

impl AuthService {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

#[tonic::async_trait]
impl auth_server::Auth for AuthService {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/Login",
            async |_c: Option<Caller>, m: pb::LoginRequest, n: &mut Note| {
                // Only well-formed names reach the trail: a password typed
                // into the username box must not.
                let t = TenantName::parse(&m.tenant).ok();
                let u = Username::parse(&m.username).ok();
                n.tenant = t.as_ref().map(|t| t.to_string());
                n.principal = Some(match (&t, &u) {
                    (Some(t), Some(u)) => format!("{t}/{u}"),
                    _ => "(malformed)".into(),
                });
                let l = v
                    .accounts
                    .login(&m.tenant, &m.username, &m.password)
                    .await?;
                Ok(pb::LoginResponse {
                    token: l.token.to_string(),
                    expires_at_unix: l.expires_at_unix,
                })
            }
        )
    }

    async fn logout(
        &self,
        req: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/Logout",
            async |c: Option<Caller>, _m: pb::LogoutRequest, _n: &mut Note| {
                v.accounts.logout(&must(c)?).await?;
                Ok(pb::LogoutResponse {})
            }
        )
    }

    async fn change_password(
        &self,
        req: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/ChangePassword",
            async |c: Option<Caller>, m: pb::ChangePasswordRequest, _n: &mut Note| {
                v.accounts
                    .change_password(&must(c)?, &m.old_password, m.new_password)
                    .await?;
                Ok(pb::ChangePasswordResponse {})
            }
        )
    }
}

pub struct RecordsService {
    gate: Gate,
}

impl RecordsService {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream fed by `produce` on a blocking thread through a small channel:
/// the producer waits while the client is slow, so memory stays constant
/// whatever the answer's length, and stops once the client is gone. An
/// error ends the stream as its last item.
fn stream_blocking<T: Send + 'static>(
    produce: impl FnOnce(&mut dyn FnMut(T) -> bool) -> Result<(), Error> + Send + 'static,
) -> BoxStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        let mut emit = |item: T| tx.blocking_send(Ok(item)).is_ok();
        if let Err(e) = produce(&mut emit) {
            let _ = tx.blocking_send(Err(to_status(e)));
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl records_server::Records for RecordsService {
    async fn put_record(
        &self,
        req: Request<pb::PutRecordRequest>,
    ) -> Result<Response<pb::PutRecordResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/PutRecord",
            async |c: Option<Caller>, m: pb::PutRecordRequest, n: &mut Note| {
                let caller = must(c)?;
                let rec = m
                    .record
                    .ok_or_else(|| Error::InvalidArgument("record is required".into()))?;
                let id = if rec.id.is_empty() {
                    None
                } else {
                    Some(RecordId::parse(&rec.id)?)
                };
                n.record_ids = id.iter().map(|i| i.to_string()).collect();
                let mut names: Vec<String> = rec.fields.keys().cloned().collect();
                names.sort();
                n.fields = names;
                let fields = Fields::parse(rec.fields)?;
                let tenant = v.tenants.get(&caller.tenant)?;
                let w = v.put_record(&tenant, id, fields).await?;
                n.record_ids = vec![w.id.to_string()];
                // What `scrub` compares the stored record with (a rolled-
                // back copy has an older version or another write id).
                n.fields.push(format!("version={}", w.version));
                n.fields.push(format!("write={}", hex::encode(w.write_id)));
                Ok(pb::PutRecordResponse {
                    id: w.id.to_string(),
                    version: w.version,
                })
            }
        )
    }

    async fn get_record(
        &self,
        req: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::GetRecordResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/GetRecord",
            async |c: Option<Caller>, m: pb::GetRecordRequest, n: &mut Note| {
                let caller = must(c)?;
                n.record_ids = vec![m.id.clone()];
                n.purpose = m.purpose.clone();
                let id = RecordId::parse(&m.id)?;
                let fields = parse_field_list(&m.fields)?;
                n.fields = fields.iter().map(|f| f.to_string()).collect();
                let purpose = Purpose::parse(&m.purpose)?;
                let tenant = v.tenants.get(&caller.tenant)?;
                v.budgets.begin(&caller, &purpose).await?;
                let rec = v
                    .read_record(&caller, &tenant, &id, &fields, GET_RECORD)
                    .await?;
                Ok(pb::GetRecordResponse {
                    record: Some(to_pb(rec)),
                })
            }
        )
    }

    async fn delete_record(
        &self,
        req: Request<pb::DeleteRecordRequest>,
    ) -> Result<Response<pb::DeleteRecordResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/DeleteRecord",
            async |c: Option<Caller>, m: pb::DeleteRecordRequest, n: &mut Note| {
                let caller = must(c)?;
                n.record_ids = vec![m.id.clone()];
                n.purpose = m.purpose.clone();
                let id = RecordId::parse(&m.id)?;
                Purpose::parse(&m.purpose)?;
                let tenant = v.tenants.get(&caller.tenant)?;
                v.records.delete(&tenant, &id).await?;
                Ok(pb::DeleteRecordResponse {})
            }
        )
    }

    async fn find_records(
        &self,
        req: Request<pb::FindRecordsRequest>,
    ) -> Result<Response<pb::FindRecordsResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/FindRecords",
            async |c: Option<Caller>, m: pb::FindRecordsRequest, n: &mut Note| {
                let caller = must(c)?;
                n.purpose = m.purpose.clone();
                let field = crate::model::FieldName::parse(&m.field)?;
                n.fields = vec![field.to_string()];
                let purpose = Purpose::parse(&m.purpose)?;
                let tenant = v.tenants.get(&caller.tenant)?;
                v.budgets.begin(&caller, &purpose).await?;
                let ids = v
                    .find_records(&caller, &tenant, &field, &m.value, FIND_RECORDS)
                    .await?;
                n.record_ids = ids.iter().map(|i| i.to_string()).collect();
                Ok(pb::FindRecordsResponse {
                    ids: ids.into_iter().map(|i| i.to_string()).collect(),
                })
            }
        )
    }

    type BulkReadStream = BoxStream<pb::Record>;

    async fn bulk_read(
        &self,
        req: Request<pb::BulkReadRequest>,
    ) -> Result<Response<Self::BulkReadStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/BulkRead",
            async |c: Option<Caller>, m: pb::BulkReadRequest, n: &mut Note| {
                let caller = must(c)?;
                if m.ids.len() > MAX_BULK_IDS {
                    return Err(Error::InvalidArgument(
                        "at most 1000 ids per BulkRead".into(),
                    ));
                }
                let ids = m
                    .ids
                    .iter()
                    .map(|s| RecordId::parse(s))
                    .collect::<Result<Vec<_>, _>>()?;
                let fields = parse_field_list(&m.fields)?;
                n.record_ids = ids.iter().map(|i| i.to_string()).collect();
                n.fields = fields.iter().map(|f| f.to_string()).collect();
                n.purpose = m.purpose.clone();
                let purpose = Purpose::parse_required(&m.purpose)?;
                let tenant = v.tenants.get(&caller.tenant)?;
                v.budgets.begin(&caller, &purpose).await?;
                // Records go out in small groups, each after the budget it
                // spent is durable: a crash mid-stream refills nothing. The
                // stream ends at the budget's edge.
                let (tx, rx) = mpsc::channel(2);
                let vault = v.clone();
                tokio::spawn(async move {
                    let mut group = Vec::with_capacity(BULK_GROUP);
                    let mut bytes = 0usize;
                    let mut end = None;
                    for id in ids {
                        match vault
                            .read_record(&caller, &tenant, &id, &fields, BULK_READ)
                            .await
                        {
                            Ok(r) => {
                                let r = to_pb(r);
                                bytes += r.fields.values().map(String::len).sum::<usize>();
                                group.push(r);
                            }
                            // Missing (or another tenant's) ids are left out.
                            Err(Error::NotFound) => {}
                            // Locked (a honeytoken, the budget's end):
                            // nothing more at all.
                            Err(e @ Error::PermissionDenied(_)) => {
                                group.clear();
                                end = Some(e);
                                break;
                            }
                            // The budget's edge, a record that fails
                            // authentication: what was read before goes out.
                            Err(e) => {
                                end = Some(e);
                                break;
                            }
                        }
                        if group.len() == BULK_GROUP || bytes >= BULK_GROUP_BYTES {
                            bytes = 0;
                            if !send_group(&vault, &tx, &mut group).await {
                                return;
                            }
                        }
                    }
                    if send_group(&vault, &tx, &mut group).await
                        && let Some(e) = end
                    {
                        let _ = tx.send(Err(to_status(e))).await;
                    }
                });
                Ok(Box::pin(ReceiverStream::new(rx)) as BoxStream<pb::Record>)
            }
        )
    }

    async fn set_secret(
        &self,
        req: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SetSecretResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/SetSecret",
            async |c: Option<Caller>, m: pb::SetSecretRequest, n: &mut Note| {
                let (tenant, id, name) = secret_target(&v, c, &m.record_id, &m.name, n)?;
                v.records.set_secret(&tenant, &id, &name, m.secret).await?;
                Ok(pb::SetSecretResponse {})
            }
        )
    }

    async fn verify_secret(
        &self,
        req: Request<pb::VerifySecretRequest>,
    ) -> Result<Response<pb::VerifySecretResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Records/VerifySecret",
            async |c: Option<Caller>, m: pb::VerifySecretRequest, n: &mut Note| {
                let (tenant, id, name) = secret_target(&v, c, &m.record_id, &m.name, n)?;
                let ok = v
                    .records
                    .verify_secret(&tenant, &id, &name, m.candidate)
                    .await?;
                Ok(pb::VerifySecretResponse { ok })
            }
        )
    }
}

pub struct AdminService {
    gate: Gate,
}

impl AdminService {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/CreateTenant",
            async |_c: Option<Caller>, m: pb::CreateTenantRequest, n: &mut Note| {
                let name = TenantName::parse(&m.name)?;
                n.tenant = Some(name.to_string());
                let indexed = parse_field_list(&m.indexed_fields)?;
                v.tenants.create(&name, &indexed).await?;
                Ok(pb::CreateTenantResponse {})
            }
        )
    }

    async fn create_principal(
        &self,
        req: Request<pb::CreatePrincipalRequest>,
    ) -> Result<Response<pb::CreatePrincipalResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/CreatePrincipal",
            async |_c: Option<Caller>, m: pb::CreatePrincipalRequest, n: &mut Note| {
                let tenant = TenantName::parse(&m.tenant)?;
                n.tenant = Some(tenant.to_string());
                let username = Username::parse(&m.username)?;
                // The subject of an account call is named in `fields`.
                n.fields = vec![format!("username={username}")];
                let role = pb::Role::try_from(m.role)
                    .ok()
                    .filter(|r| *r != pb::Role::Unspecified)
                    .ok_or_else(|| Error::InvalidArgument("role is required".into()))
                    .and_then(|r| Role::parse(r.as_str_name()))?;
                // Admins live in `system`; records live in other tenants.
                match (tenant.is_system(), role) {
                    (true, Role::Clinician | Role::Service) => {
                        return Err(Error::InvalidArgument(
                            "tenant system holds no records: no clinician or service there".into(),
                        ));
                    }
                    (false, Role::Admin) => {
                        return Err(Error::InvalidArgument(
                            "admins live in tenant system".into(),
                        ));
                    }
                    _ => {}
                }
                if !v.tenants.exists(&tenant)? {
                    return Err(Error::NotFound);
                }
                let password =
                    Password::new_checked(m.password, &[username.as_str(), tenant.as_str()])?;
                v.accounts
                    .create(&tenant, &username, &password, role)
                    .await?;
                Ok(pb::CreatePrincipalResponse {})
            }
        )
    }

    async fn set_principal_locked(
        &self,
        req: Request<pb::SetPrincipalLockedRequest>,
    ) -> Result<Response<pb::SetPrincipalLockedResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/SetPrincipalLocked",
            async |_c: Option<Caller>, m: pb::SetPrincipalLockedRequest, n: &mut Note| {
                let tenant = TenantName::parse(&m.tenant)?;
                n.tenant = Some(tenant.to_string());
                let username = Username::parse(&m.username)?;
                // The subject of an account call is named in `fields`.
                n.fields = vec![format!("username={username}")];
                v.accounts.set_locked(&tenant, &username, m.locked).await?;
                if !m.locked {
                    v.budgets.unlocked(&tenant, username.as_str())?;
                }
                Ok(pb::SetPrincipalLockedResponse {})
            }
        )
    }

    async fn create_honeytoken(
        &self,
        req: Request<pb::CreateHoneytokenRequest>,
    ) -> Result<Response<pb::CreateHoneytokenResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/CreateHoneytoken",
            async |_c: Option<Caller>, m: pb::CreateHoneytokenRequest, n: &mut Note| {
                let name = TenantName::parse(&m.tenant)?;
                n.tenant = Some(name.to_string());
                if name.is_system() {
                    return Err(Error::InvalidArgument(
                        "tenant system holds no records".into(),
                    ));
                }
                let tenant = v.tenants.get(&name)?;
                let w = v.honeytokens.create(&tenant, &v.records).await?;
                v.key_rotated(&tenant, w.rotated_to).await?;
                let id = w.id;
                // The canary's id is for the administrator alone: the trail
                // is read by auditors of the tenant, who must not learn it.
                Ok(pb::CreateHoneytokenResponse { id: id.to_string() })
            }
        )
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::RotateTenantKeyResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/RotateTenantKey",
            async |_c: Option<Caller>, m: pb::RotateTenantKeyRequest, n: &mut Note| {
                let tenant = admin_target(&v, &m.tenant, n)?;
                let version = v.keys.rotate(&tenant.keys)?;
                v.store.sync().await?;
                n.fields = vec![format!("active_version={version}")];
                Ok(pb::RotateTenantKeyResponse {
                    active_version: version,
                })
            }
        )
    }

    type RewrapTenantStream = BoxStream<pb::RewrapProgress>;

    async fn rewrap_tenant(
        &self,
        req: Request<pb::RewrapTenantRequest>,
    ) -> Result<Response<Self::RewrapTenantStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/RewrapTenant",
            async |_c: Option<Caller>, m: pb::RewrapTenantRequest, n: &mut Note| {
                let tenant = admin_target(&v, &m.tenant, n)?;
                n.fields = vec![format!("to_version={}", tenant.keys.active_version())];
                let vault = v.clone();
                Ok(progress_stream(async move |p: Progress| {
                    vault.rewrap(&tenant, |d, t| p.report(d, t)).await
                }))
            }
        )
    }

    async fn key_status(
        &self,
        req: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatusResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/KeyStatus",
            async |_c: Option<Caller>, m: pb::KeyStatusRequest, n: &mut Note| {
                let tenant = admin_target(&v, &m.tenant, n)?;
                let usage = v.records.key_usage(&tenant)?;
                let mut versions: Vec<_> = tenant
                    .keys
                    .encryption_counts()
                    .into_iter()
                    .map(|(version, encryptions)| pb::KeyVersionStatus {
                        version,
                        fields: usage.get(&version).copied().unwrap_or(0),
                        retired: false,
                        encryptions,
                    })
                    .collect();
                for (version, encryptions) in v.keys.retired_versions(&tenant.keys)? {
                    versions.push(pb::KeyVersionStatus {
                        version,
                        fields: 0,
                        retired: true,
                        encryptions,
                    });
                }
                versions.sort_by_key(|k| k.version);
                Ok(pb::KeyStatusResponse {
                    active_version: tenant.keys.active_version(),
                    versions,
                })
            }
        )
    }

    async fn retire_key_version(
        &self,
        req: Request<pb::RetireKeyVersionRequest>,
    ) -> Result<Response<pb::RetireKeyVersionResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/RetireKeyVersion",
            async |_c: Option<Caller>, m: pb::RetireKeyVersionRequest, n: &mut Note| {
                let tenant = admin_target(&v, &m.tenant, n)?;
                n.fields = vec![format!("version={}", m.version)];
                v.keys.retire::<Error>(&tenant.keys, m.version, || {
                    let usage = v.records.key_usage(&tenant)?;
                    Ok(usage.get(&m.version).copied().unwrap_or(0))
                })?;
                v.store.sync().await?;
                Ok(pb::RetireKeyVersionResponse {})
            }
        )
    }

    type RotateIndexKeyStream = BoxStream<pb::RewrapProgress>;

    async fn rotate_index_key(
        &self,
        req: Request<pb::RotateIndexKeyRequest>,
    ) -> Result<Response<Self::RotateIndexKeyStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/RotateIndexKey",
            async |_c: Option<Caller>, m: pb::RotateIndexKeyRequest, n: &mut Note| {
                let tenant = admin_target(&v, &m.tenant, n)?;
                let vault = v.clone();
                Ok(progress_stream(async move |p: Progress| {
                    vault.rotate_index(&tenant, |d, t| p.report(d, t)).await
                }))
            }
        )
    }

    async fn shred_tenant(
        &self,
        req: Request<pb::ShredTenantRequest>,
    ) -> Result<Response<pb::ShredTenantResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/ShredTenant",
            async |_c: Option<Caller>, m: pb::ShredTenantRequest, n: &mut Note| {
                let name = TenantName::parse(&m.tenant)?;
                n.tenant = Some(name.to_string());
                let records = v.shred_tenant(&name, &m.confirm).await?;
                n.fields = vec![format!("records_deleted={records}")];
                Ok(pb::ShredTenantResponse {})
            }
        )
    }

    async fn list_principals(
        &self,
        req: Request<pb::ListPrincipalsRequest>,
    ) -> Result<Response<pb::ListPrincipalsResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/ListPrincipals",
            async |c: Option<Caller>, m: pb::ListPrincipalsRequest, n: &mut Note| {
                let caller = must(c)?;
                let tenant = TenantName::parse(&m.tenant)?;
                n.tenant = Some(tenant.to_string());
                // Auditors see their own tenant, or all from `system`.
                if caller.role == Role::Auditor
                    && !caller.tenant.is_system()
                    && caller.tenant != tenant
                {
                    return Err(Error::PermissionDenied(
                        "auditors see their own tenant only",
                    ));
                }
                if !v.tenants.exists(&tenant)? {
                    return Err(Error::NotFound);
                }
                let principals = v
                    .accounts
                    .list(&tenant)?
                    .into_iter()
                    .map(|p| pb::PrincipalInfo {
                        username: p.username,
                        role: p.role,
                        locked: p.locked,
                        lock_reason: p.lock_reason,
                        locked_until_unix_ms: p.locked_until_ms,
                        failed_logins: p.failed_logins,
                    })
                    .collect();
                Ok(pb::ListPrincipalsResponse { principals })
            }
        )
    }
}

pub struct AuditService {
    gate: Gate,
}

impl AuditService {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

#[tonic::async_trait]
impl audit_server::Audit for AuditService {
    type QueryAuditStream = BoxStream<pb::AuditEvent>;

    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<Self::QueryAuditStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Audit/QueryAudit",
            async |c: Option<Caller>, m: pb::QueryAuditRequest, n: &mut Note| {
                let caller = must(c)?;
                if !m.record_id.is_empty() {
                    n.record_ids = vec![m.record_id.clone()];
                }
                // An auditor of `system` sees every tenant; others their own.
                let scope = (!caller.tenant.is_system()).then(|| caller.tenant.to_string());
                let q = crate::audit::Query {
                    scope,
                    tenant: m.tenant,
                    principal: m.principal,
                    record_id: m.record_id,
                    action: m.action,
                    outcome: m.outcome,
                    since_unix_ms: m.since_unix_ms,
                    until_unix_ms: m.until_unix_ms,
                    limit: m.limit as usize,
                    newest_first: m.newest_first,
                    // What was durable when the call came: never its own
                    // event, whose writing races with the stream.
                    before_seq: match (m.before_seq, v.audit.head().0 + 1) {
                        (0, head) => head,
                        (b, head) => b.min(head),
                    },
                    alerts_only: false,
                };
                Ok(stream_blocking(move |emit| v.audit.query_each(&q, emit)))
            }
        )
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Audit/VerifyAudit",
            async |_c: Option<Caller>, m: pb::VerifyAuditRequest, _n: &mut Note| {
                let checkpoint = if m.checkpoint_seq == 0 {
                    None
                } else {
                    let hash: [u8; 32] = m.checkpoint_hash.as_slice().try_into().map_err(|_| {
                        Error::InvalidArgument("checkpoint_hash must be 32 bytes".into())
                    })?;
                    Some((m.checkpoint_seq, hash))
                };
                let r = tokio::task::spawn_blocking(move || v.audit.verify(checkpoint))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                Ok(pb::VerifyAuditResponse {
                    ok: r.ok,
                    checked: r.checked,
                    first_bad_seq: r.first_bad_seq,
                    head_hash: r.head_hash.to_vec(),
                    head_seq: r.head_seq,
                    reason: r.reason.unwrap_or_default(),
                })
            }
        )
    }

    type ListAlertsStream = BoxStream<pb::Alert>;

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<Self::ListAlertsStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Audit/ListAlerts",
            async |c: Option<Caller>, m: pb::ListAlertsRequest, _n: &mut Note| {
                let caller = must(c)?;
                let scope = (!caller.tenant.is_system()).then(|| caller.tenant.to_string());
                Ok(stream_blocking(move |emit| {
                    v.audit.alerts_each(m.since_unix_ms, scope.as_deref(), emit)
                }))
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The front layer decodes and audits by this table: it must name every
    /// method of every Coffre service, once.
    #[test]
    fn the_route_table_covers_every_coffre_method() {
        let fds: prost_types::FileDescriptorSet =
            prost::Message::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for f in fds.file.iter().filter(|f| f.package() == "coffre.v1") {
            for s in &f.service {
                for m in &s.method {
                    methods.push(format!("coffre.v1.{}/{}", s.name(), m.name()));
                }
            }
        }
        methods.sort();
        let mut routes: Vec<String> = ROUTES.iter().map(|r| r.action.to_string()).collect();
        routes.sort();
        assert_eq!(routes, methods);
        assert!(route("/coffre.v1.Records/GetRecord").is_some());
        assert!(route("/grpc.health.v1.Health/Check").is_none());
    }
}
